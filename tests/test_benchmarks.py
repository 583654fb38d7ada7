"""The benchmark suite's own checks: graders on real question rows, RouteLLM metrics on a hand-computed case,
the cost-quality function on real shared files, and the live runner end to end with SmolLM2 (two questions).

No timing is ever asserted here: the benchmarks measure times, the tests only check what they compute.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks._common import REPO, shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "questions").is_dir(),
                                reason=f"shared data folder not found at {DATA} (set CASCADE_SHARED_DATA)")


# --- graders on real rows ----------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "boolq", "commonsense_qa", "openbook_qa", "mmlu"])
def test_letter_grader_on_real_rows(name):
    from benchmarks.questions import LETTERS, grade, load_question_set, sample_questions

    qs = [q for _, q in sample_questions(load_question_set(name, DATA), 5, seed=3)]
    assert len(qs) == 5
    for q in qs:
        n = len(q.source_example["choices"])
        assert q.gold in LETTERS[:n]
        wrong = next(L for L in LETTERS[:n] if L != q.gold)
        # the prompt shows every option letter
        for L in LETTERS[:n]:
            assert f"\n{L}. " in q.user_prompt
        assert grade(q, q.gold) [:2] == (q.gold, True)
        assert grade(q, f"({q.gold}) because")[:2] == (q.gold, True)
        assert grade(q, f"The answer is {q.gold}.")[:2] == (q.gold, True)
        assert grade(q, wrong)[:2] == (wrong, False)
        assert grade(q, "I am not sure")[:2] == ("", False)
        if q.choices:  # a reply that is exactly the gold option's text
            gold_text = q.choices[LETTERS.index(q.gold)]
            assert grade(q, gold_text)[:2] == (q.gold, True)


@needs_data
def test_numeric_grader_on_real_gsm8k_rows():
    from benchmarks.questions import grade, grade_numeric, gsm8k_gold, load_question_set

    qs = load_question_set("gsm8k", DATA)
    first = qs[0]  # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2
    assert first.gold == 18.0
    assert grade(first, first.source_example["answer"])[:2] == ("#### 18", True)  # the gold solution itself
    assert grade(first, "She sells 9 eggs for $2 each.\n#### 18")[1]
    assert grade(first, "The answer is $18.")[1]
    assert not grade(first, "#### 17")[1]
    assert grade(first, "no number here") == ("", False, -1)
    # every real gold solution grades as right, with thousands separators and all
    for q in qs[:200]:
        assert grade_numeric(q.source_example["answer"], q.gold)[1], q.source_example["answer"][-40:]
    assert gsm8k_gold("so 1,200 in total\n#### 1,200") == 1200.0


@needs_data
def test_alias_grader_on_real_triviaqa_rows():
    from benchmarks.questions import grade, load_question_set

    qs = load_question_set("triviaqa", DATA)
    q = qs[0]  # Brunswick, Lancastrian and Pearl Pickler are types of which vegetable? -> Onion
    assert "Onion" in q.gold
    assert grade(q, "Onion")[:2] == ("Onion", True)
    assert grade(q, "onions.")[1]  # an alias ("Onions"), normalised
    assert grade(q, "The onion\nmore text")[1]  # first line only, article dropped
    assert grade(q, "Answer: an onion")[1]
    assert not grade(q, "Leek")[1]
    assert not grade(q, "")[1]
    for r in qs[:100]:
        assert grade(r, r.source_example["answer"])[1]


def test_seeded_sample_is_nested():
    from benchmarks.questions import sample_questions

    items = list(range(500))
    qs = [type("Q", (), {"idx": i})() for i in items]
    small = sample_questions(qs, 10, seed=0)
    big = sample_questions(qs, 40, seed=0)
    assert [q.idx for _, q in small] == [q.idx for _, q in big[:10]]
    assert [r for r, _ in big] == list(range(40))


# --- RouteLLM metrics on a hand-computed case -------------------------------------------------------


def test_apgr_and_cpt_hand_computed():
    from benchmarks.cost_quality import apgr, cheapest_at_quality, cpt, escalation_curve, pgr

    weak = np.array([0.0, 0.0, 1.0, 1.0])
    strong = np.array([1.0, 1.0, 1.0, 1.0])
    wcost, scost = np.ones(4), np.full(4, 10.0)
    score = np.array([0.1, 0.2, 0.9, 0.8])  # the two wrong answers have the lowest confidence
    c = escalation_curve(score, weak, strong, wcost, scost, pays_both=True)
    # k = 0..4 escalated: quality 0.5, 0.75, 1, 1, 1; cost (4 + 10k) / 4
    assert np.allclose(c.quality, [0.5, 0.75, 1.0, 1.0, 1.0])
    assert np.allclose(c.cost, [1.0, 3.5, 6.0, 8.5, 11.0])
    assert np.allclose(pgr(c.quality, 0.5, 1.0), [0, 0.5, 1, 1, 1])
    # PGR rises linearly to 1 at 50 % calls, then stays: area 0.25 + 0.5
    assert apgr(c, 0.5, 1.0) == pytest.approx(0.75)
    assert cpt(c, 0.5, 0.5, 1.0) == pytest.approx(25.0)
    assert cpt(c, 0.8, 0.5, 1.0) == pytest.approx(40.0)
    best = cheapest_at_quality(c, 0.875)  # halfway between k=1 and k=2
    assert best["cost_usd"] == pytest.approx(4.75) and best["call_pct"] == pytest.approx(37.5)
    # a router paying one model: cost (4 + 9k) / 4
    r = escalation_curve(score, weak, strong, wcost, scost, pays_both=False)
    assert np.allclose(r.cost, [1.0, 3.25, 5.5, 7.75, 10.0])

    # all scores tied: random order in expectation -> the random-mixing line, APGR 0.5
    t = escalation_curve(np.zeros(4), weak, strong, wcost, scost, pays_both=True)
    assert np.allclose(t.quality, [0.5, 0.625, 0.75, 0.875, 1.0])
    assert apgr(t, 0.5, 1.0) == pytest.approx(0.5)
    assert cpt(t, 0.5, 0.5, 1.0) == pytest.approx(50.0)
    assert cpt(t, 0.8, 0.5, 1.0) == pytest.approx(80.0)
    # never reached; undefined when the strong model is no better
    low = escalation_curve(score, weak, np.array([0.0, 0.0, 1.0, 1.0]), wcost, scost, pays_both=True)
    assert apgr(low, 0.5, 0.5) is None and cpt(low, 0.5, 0.5, 0.5) is None


# --- the cost-quality function on real shared files -------------------------------------------------

DOC_KEYS = {"label", "weak", "strong", "split", "n_train", "n_test", "max_quality_drop", "q_weak", "q_strong",
            "cost_weak", "cost_strong", "oracle_cost_ratio", "routers", "operating_points", "calibration", "notes"}
CURVE_KEYS = {"call_pct", "quality", "cost_usd", "cost_ratio", "pgr"}


def _check_curves(doc: dict, expect: set[str]) -> None:
    assert DOC_KEYS <= set(doc)
    assert expect <= set(doc["routers"])
    for name, r in doc["routers"].items():
        if r["kind"] == "point":
            assert {"call_pct", "quality", "cost_usd", "cost_ratio"} <= set(r["point"])
            continue
        assert {"apgr", "apgr_fine", "cpt50", "cpt80", "savings_at_equal_quality", "curve", "pays"} <= set(r)
        cv = r["curve"]
        assert CURVE_KEYS <= set(cv)
        assert len(cv["call_pct"]) == len(cv["quality"]) == len(cv["cost_ratio"]) == 101
        assert cv["quality"][0] == pytest.approx(doc["q_weak"])
        assert cv["quality"][-1] == pytest.approx(doc["q_strong"])
    assert doc["routers"]["random"]["apgr"] == pytest.approx(0.5)
    assert doc["routers"]["oracle"]["apgr"] >= doc["routers"]["random"]["apgr"]
    json.dumps(doc, allow_nan=True)  # JSON-ready


@needs_data
def test_cost_quality_on_a_real_cascade_outputs_file(tmp_path):
    from benchmarks.cost_quality import ROUTERS, cost_quality, plot_case

    path = DATA / "cascade_outputs" / "mmlu_qwen_oai_train.jsonl"
    doc = cost_quality(path, None, max_quality_drop=0.005)  # no test split: fixed-seed halves
    expect = set(ROUTERS) - {"calibrated_cascade_token_features"}
    _check_curves(doc, expect)
    assert (doc["weak"], doc["strong"]) == ("gpt-4o-mini", "gpt-4o")
    assert doc["n_train"] + doc["n_test"] == 285 and "halves" in doc["split"]
    ops = doc["operating_points"]
    assert ops["calibrated_cascade"]["verdict"] in ("cascade", "direct")
    assert {"cost_ratio", "savings_captured", "test_quality"} <= set(ops["raw_logprob_cascade"])
    assert {"ece_raw", "ece_calibrated"} <= set(doc["calibration"])
    # the confidence carries signal on this pair: both cascades beat random mixing
    assert doc["routers"]["raw_logprob_cascade"]["apgr"] > 0.5
    assert plot_case(doc, tmp_path / "case.png").stat().st_size > 10_000


@needs_data
def test_cost_quality_on_routerbench(tmp_path):
    from benchmarks.cost_quality import cost_quality, load_routerbench

    tr = load_routerbench(DATA / "routerbench" / "mbpp_train.csv")
    te = load_routerbench(DATA / "routerbench" / "mbpp_test.csv")
    assert len(te) == 128 and tr.weak_logprob is None
    doc = cost_quality(tr, te)
    _check_curves(doc, {"random", "prompt_length", "oracle", "oracle_router", "always_small", "always_large"})
    assert "calibrated_cascade" not in doc["routers"] and doc["notes"]


def test_true_curve_recovers_a_known_logistic_curve():
    from benchmarks.ece_noise_floor import true_curve

    rng = np.random.default_rng(3)
    score = np.log(rng.uniform(0.05, 0.999, 20_000))  # log-probabilities
    logit = np.log(np.exp(score) / -np.expm1(score))
    p = 1 / (1 + np.exp(-(0.6 * logit - 0.4)))  # a known Platt curve
    curve = true_curve(score, (rng.random(score.size) < p).astype(float))
    grid = np.log(np.array([0.1, 0.5, 0.9, 0.99]))
    glogit = np.log(np.exp(grid) / -np.expm1(grid))
    assert curve(grid) == pytest.approx(1 / (1 + np.exp(-(0.6 * glogit - 0.4))), abs=0.02)


@needs_data
def test_ece_noise_floor_on_a_real_train_file(tmp_path):
    from benchmarks.ece_noise_floor import FIELDS, main

    assert main([str(DATA), "--out", str(tmp_path), "--reps", "20", "--n-test", "300,3000", "--n-train", "600",
                 "--files", "medmcqa_llama_train.jsonl"]) == 0
    doc = json.loads((tmp_path / "ece_noise_floor.json").read_text())
    (row,) = doc["files"]
    assert row["first_tier"] == "llama3.2-1b" and row["n_train"] == 300
    assert set(row["ece"]) == set(FIELDS)
    oracle = row["ece"]["oracle"]
    # a perfectly calibrated confidence still measures a positive ECE, and less of it on more questions
    assert 0 < oracle["3000"]["mean"] < oracle["300"]["mean"]
    assert 0 <= oracle["300"]["share_within_target"] <= 1
    assert set(doc["train_size_sweep"]) == {"600"}
    assert (tmp_path / "ece_noise_floor.png").stat().st_size > 10_000
    assert "noise floor" in (tmp_path / "ece_noise_floor.md").read_text()


# --- the live runner, end to end with the real small model ------------------------------------------


def test_score_answer_uses_the_answer_letter_logprob():
    from benchmarks.live_cascade import score_answer
    from benchmarks.questions import MC_SYSTEM, Question
    from cascade.types import GenerationResult, TokenLogprob, TopLogprob, Usage

    q = Question("arc_easy", 0, "mc", MC_SYSTEM, "Q?\n\nA. x\nB. y\n\nAnswer with A or B.", "B",
                 {"choices": ["x", "y"]}, 5, ("\n",), ["x", "y"])
    toks = (TokenLogprob(" (", -0.1), TokenLogprob("B", -0.7, top=(TopLogprob("B", -0.7), TopLogprob("A", -0.9))),
            TokenLogprob(")", -0.05))
    res = GenerationResult(" (B)", toks, "stop", Usage(20, 3), 0.5, "m")
    e = score_answer(q, res, {"input_per_1m": 1.0, "output_per_1m": 10.0})
    assert e["answer"] == "B" and e["correct"] is True
    assert e["raw_conf_logprob"] == pytest.approx(-0.7) and e["conf_source"] == "answer_letter_logprob"
    assert e["features"]["answer_token_margin"] == pytest.approx(0.2)
    assert e["cost_usd"] == pytest.approx((20 * 1.0 + 3 * 10.0) / 1e6)
    assert e["tokens"] == {"in": 20, "out": 3}


@needs_data
def test_live_runner_two_questions_with_smollm2(smol_path, tmp_path):
    from benchmarks.live_cascade import run
    from calibration.data import REQUIRED_MODEL_FIELDS, load_cascade_outputs

    out = tmp_path / "live"
    s = run(["arc_easy"], 2, ["smollm2-135m"], data_dir=DATA, out=out, show_progress=False)
    assert s["tiers"][0]["answered"] == 2 and s["per_set"]["arc_easy"]["n"] == 2
    assert (out / "live_run_smol135m.json").exists()
    for split in ("train", "test"):
        path = out / f"arc_easy_smol135m_{split}.jsonl"
        row = json.loads(path.read_text().splitlines()[0])
        assert {"dataset", "split", "chain", "idx", "system_prompt", "user_prompt", "source_example",
                "models"} <= set(row)
        assert row["split"] == split and row["dataset"] == "arc_easy"
        entry = row["models"]["smollm2-135m"]
        assert set(REQUIRED_MODEL_FIELDS) <= set(entry)
        assert {"latency_ms", "tokens", "features", "response"} <= set(entry)
        assert entry["raw_conf_logprob"] <= 0 and entry["cost_usd"] > 0
        data = load_cascade_outputs(path)  # the calibration loader accepts it
        assert data.models == ["smollm2-135m"] and len(data) == 1 and data.split == split
    # resumable: a second run answers nothing new and writes the same rows
    again = run(["arc_easy"], 2, ["smollm2-135m"], data_dir=DATA, out=out, show_progress=False)
    assert again["tiers"][0]["answered"] == 0 and again["tiers"][0]["from_cache"] == 2
    cached = (out / "cache" / "arc_easy" / "smollm2-135m.jsonl").read_text().splitlines()
    assert len(cached) == 2


@needs_data
def test_live_runner_interrupted_says_so_in_one_line_and_keeps_the_answers(smol_path, tmp_path):
    """Ctrl-C mid-run was a KeyboardInterrupt traceback and one "Task exception was never retrieved" traceback
    per pending question: one line, exit 130, the answers made so far in the cache, no output files."""
    out = tmp_path / "live"
    cache = out / "cache" / "boolq" / "smollm2-135m.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.live_cascade", "--sets", "boolq", "--n", "40",
                             "--chain", "smollm2-135m", "--batch", "1", "--data-dir", str(DATA), "--out", str(out),
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as a terminal delivers it: a run started in the background (`cmd &` of a shell
                            # without job control, as CI may be) inherits SIGINT ignored, and would never see it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and cache.read_text().count("\n") >= 1) and proc.poll() is None:
            assert time.monotonic() < deadline, "no answer in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["live_cascade: interrupted; the answers so far are kept in the cache, and "
                                        "the run resumes from them"]
    kept = cache.read_text().splitlines()
    assert 1 <= len(kept) < 40 and all(json.loads(line)["key"] for line in kept)
    assert sorted(p.name for p in out.iterdir()) == ["cache"]


def test_transformers_throughput_tiny_on_the_cpu(tmp_path):
    """The GPU benchmark's CPU smoke size: a real model and a random-weights one, each level measured after
    its warm-up batch, written as JSON and PNG."""
    from benchmarks.transformers_throughput import main

    assert main(["--tiny", "--random-init", "smollm2-135m", "--out", str(tmp_path), "--quiet"]) == 0
    d = json.loads((tmp_path / "transformers_throughput_tiny.json").read_text())
    assert (tmp_path / "transformers_throughput_tiny.png").stat().st_size > 10_000
    assert [m["model"] for m in d["models"]] == ["smollm2-135m", "smollm2-135m (random weights)"]
    assert all(m["device"] == "cpu" and m["load_s"] > 0 for m in d["models"])
    assert [(r["model"], r["concurrency"]) for r in d["rows"]] == [
        ("smollm2-135m", 1), ("smollm2-135m", 2),
        ("smollm2-135m (random weights)", 1), ("smollm2-135m (random weights)", 2)]
    for r in d["rows"]:
        assert r["errors"] == 0 and r["ok"] == r["requests"] == max(2 * r["concurrency"], r["concurrency"])
        assert r["tokens_per_s"] > 0 and r["warmup_s"] > 0 and r["latency_p50_s"] <= r["latency_p99_s"]
        assert 1 <= r["mean_completion_tokens"] <= 4
    assert d["parity"] == []  # on the CPU there is nothing to compare the CPU with
    assert d["config"]["max_tokens"] == 4 and d["machine"]["git"]["commit"]
    assert d["config"]["lengths"] == "mixed" and d["config"]["cudnn_attention"] == [False]
    assert all(r["lengths"] == "mixed" and r["cudnn_attention"] is False for r in d["rows"])
    assert d["config"]["stream"] is False and all("ttft_p50_s" not in r for r in d["rows"])


def test_transformers_throughput_streamed(tmp_path):
    """``--stream``: the same levels, every request streamed, each row with its time to the first token."""
    from benchmarks.transformers_throughput import main

    assert main(["--tiny", "--stream", "--out", str(tmp_path), "--name", "s", "--quiet"]) == 0
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["config"]["stream"] is True and [r["concurrency"] for r in d["rows"]] == [1, 2]
    for r in d["rows"]:
        assert r["stream"] is True and r["errors"] == 0 and 1 <= r["mean_completion_tokens"] <= 4
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["latency_p99_s"]
    from benchmarks.report import _streamed

    assert _streamed(d["rows"][0]) == f" (streamed; first token p50 {d['rows'][0]['ttft_p50_s']} s)"
    assert _streamed({"concurrency": 1}) == ""


def test_transformers_throughput_prompts_and_the_attention_axis():
    """Mixed lengths: each prompt its own filler, drawn by seed, and the warm-up's (seed 2c) not the timed ones'
    (seed 2c+1); `same` is the vLLM benchmark's prompts. Each dtype is measured under each attention setting,
    named once each, and rows from before the option render as torch's choice."""
    from benchmarks.report import _attention
    from benchmarks.transformers_throughput import level_prompts, main
    from benchmarks.vllm_throughput import prompts

    assert level_prompts(8, "same", seed=3) == prompts(8)
    warm, timed = level_prompts(8, "mixed", seed=16), level_prompts(16, "mixed", seed=17)
    assert level_prompts(16, "mixed", seed=17) == timed  # seeded: the same run twice is the same prompts
    assert all(t.startswith(p) for t, p in zip(timed, prompts(16), strict=True))
    lengths = [len(t.split()) for t in timed]
    assert len(set(lengths)) > 8 and [len(t.split()) for t in warm] != lengths[:8]
    assert _attention({}) == "torch's choice" and _attention({"cudnn_attention": True}) == "on"
    with pytest.raises(SystemExit):
        main(["--tiny", "--cudnn-attention", "maybe"])


async def test_transformers_throughput_parity_compares_real_answers(smol_path):
    """Parity on real answers of two dtypes (here both on the CPU): the same answers give zero gaps, and the
    gaps of a bfloat16 run are those of its token logprobs over the shared prefix."""
    from benchmarks.transformers_throughput import answers, compare, parity_questions

    qs = parity_questions(4)
    assert len(set(qs)) == 4 and "capital" in qs[1] and "+" in qs[0]
    f32 = await answers(smol_path, device="cpu", dtype="float32", questions=qs, max_tokens=8)
    bf16 = await answers(smol_path, device="cpu", dtype="bfloat16", questions=qs, max_tokens=8)
    same = compare(f32, f32)
    assert same["same_text"] == 4 and same["token_logprob_abs_diff"]["max"] == 0
    assert same["shared_tokens"] == sum(len(a.tokens) for a in f32)
    gaps = compare(bf16, f32)
    shared = []
    for b, f in zip(bf16, f32, strict=True):
        for x, y in zip(b.tokens, f.tokens):
            if x.token_id != y.token_id:
                break
            shared.append(abs(x.logprob - y.logprob))
    assert gaps["shared_tokens"] == len(shared) and gaps["token_logprob_abs_diff"]["max"] == round(max(shared), 6)
    assert gaps["same_text"] == sum(b.text == f.text for b, f in zip(bf16, f32, strict=True))


@needs_data
def test_live_answer_keys_name_a_gpu_but_keep_the_committed_cpu_answers():
    """The committed answer cache (results/live/cache) was made on the CPU: its keys stay valid, and answers made
    on a GPU get keys of their own (in bfloat16 they differ from the CPU's, docs/gpu.md)."""
    from benchmarks.live_cascade import load_cache, settings_key
    from benchmarks.questions import load_question_set
    from benchmarks._common import RESULTS

    cached = load_cache(RESULTS / "live" / "cache" / "arc_easy" / "qwen2.5-coder-0.5b.jsonl")
    questions = {q.idx: q for q in load_question_set("arc_easy", DATA)}
    idx, key = next(iter(cached))
    q = questions[idx]
    assert settings_key(q, "float32") == settings_key(q, "float32", device="cpu") == key
    on_gpu = {settings_key(q, "float32", device=d) for d in ("cuda", "cuda:1")}
    assert len(on_gpu) == 2 and key not in on_gpu


def test_gpu_attention_probe_needs_cuda_and_the_committed_run_renders(tmp_path, capsys):
    """The attention probe is a GPU measurement: without CUDA it says so in one line and writes nothing. Its
    committed H200 run renders into the results page, with the kernels that cannot take the inputs marked."""
    import torch

    from benchmarks._common import RESULTS
    from benchmarks.gpu_attention_probe import main, summary
    from benchmarks.report import build

    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "probe.json")]) == 2
        assert capsys.readouterr().err.strip().endswith("sees none") and not (tmp_path / "probe.json").exists()
    d = json.loads((RESULTS / "gpu" / "attention_probe.json").read_text())
    table = summary(d["rows"])
    assert "| float32 | cudnn | unavailable | unavailable |" in table
    assert len(table) == 2 + 2 * 5 and all(r["again_ms"] is None or r["again_ms"] < 5 for r in d["rows"])
    assert "\n".join(table) in build(RESULTS)


@needs_data
def test_a_gpu_runs_note_renders_under_its_own_table():
    """A committed run measured before a fix carries a note saying what it understates; the results page
    prints it under that run's table, not another's."""
    from benchmarks._common import RESULTS
    from benchmarks.report import build

    page = build(RESULTS)
    for name in ("smollm2_cuda_h100.json", "smollm2_cuda_h100_same.json"):
        note = json.loads((RESULTS / "gpu" / name).read_text())["note"]
        assert "two batches" in note
        assert note in page.split(f"### {name}\n")[1].split("\n### ")[0]
    assert page.count("understate the backend as committed") == 2


# --- the results scripts on odd but real inputs ------------------------------------------------------------

def _qwen_pair(tmp_path, name: str = "mmlu_llama") -> Path:
    """The live run's Qwen 0.5B -> 1.5B answers (the default chain's models) as a cascade_outputs pair named
    like a shared file: an oracle (escalate exactly when wrong, paying both) that costs more than the 1.5B alone."""
    src = Path(__file__).resolve().parents[1] / "results" / "live" / "full"
    out = tmp_path / "cascade_outputs"
    out.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (src / f"mixed_smol135m-qc0.5b-qc1.5b_{split}.jsonl").read_text().splitlines()]
        for r in rows:
            r["models"].pop("smollm2-135m")
        (out / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_calibration_results_when_the_oracle_saves_nothing(tmp_path, capsys, monkeypatch):
    """Savings captured is undefined where escalating exactly when wrong costs more than the last tier alone
    (the default Qwen pair): the table compares costs instead of failing on None."""
    from benchmarks.calibration_results import main

    data = _qwen_pair(tmp_path)
    monkeypatch.setenv("CASCADE_SHARED_DATA", str(data))  # the data folder when none is given, as elsewhere
    assert main(["--out", str(tmp_path / "res"), "--no-plots"]) == 0
    doc = json.loads((tmp_path / "res" / "results.json").read_text())
    rows = doc["rows"]
    assert rows and all(r["oracle_cost_ratio"] > 1 and r["savings_captured"] is None for r in rows)
    for r in rows:
        assert r["beats_anchor"] in ("yes (by cost)", "no", "no (does not hold)", "yes (direct)",
                                     "n/a (anchor saves nothing; we cascade)")
        if not r["holds"]:
            assert r["beats_anchor"].startswith("no") or not r["anchor_saves"]
    assert "| mixed | smol135m-qc0.5b-qc1.5b full | test split |" in (tmp_path / "res" / "results.md").read_text()


def test_calibration_results_refuses_bad_input_in_one_line_and_keeps_the_results(tmp_path, capsys):
    from benchmarks.calibration_results import main

    res = tmp_path / "res"
    res.mkdir()
    (res / "results.json").write_text('{"kept": true}\n')
    empty = tmp_path / "empty" / "cascade_outputs"
    empty.mkdir(parents=True)
    assert main([str(empty.parent), "--out", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibration_results: error: no <dataset>_<chain>_train.jsonl") and "\n" not in err
    (empty / "mmlu_llama_train.jsonl").write_text("{broken\n")
    assert main([str(empty.parent), "--out", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibration_results: error: ") and "mmlu_llama_train.jsonl" in err and "\n" not in err
    assert main([str(_qwen_pair(tmp_path)), "--out", str(res), "--confidence", "1.5"]) == 2
    assert "confidence" in capsys.readouterr().err
    assert json.loads((res / "results.json").read_text()) == {"kept": True}


def test_calibration_results_refuses_what_cascade_replay_refuses(tmp_path, capsys):
    """The script replays through ``calibration.replay.replay`` as ``cascade replay`` does, and refuses what it
    refuses: a test file that is the train file again (its figures were in-sample ones labelled "test split"),
    a last tier that costs nothing (every ratio was null, and "beats anchor" said yes), a file of one model."""
    from benchmarks.calibration_results import main

    data = _qwen_pair(tmp_path)
    train, test = data / "mmlu_llama_train.jsonl", data / "mmlu_llama_test.jsonl"
    res = tmp_path / "res"
    test.write_text(train.read_text())
    assert main([str(data), "--out", str(res), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibration_results: error: ") and "nothing may be fit on TEST" in err and "\n" not in err
    assert "--train" not in err and "test file must hold other questions than its train file" in err  # no options here
    test.unlink()  # the train file alone, split into halves: a free last tier on each
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    last = list(rows[0]["models"])[-1]
    for r in rows:
        r["models"][last]["cost_usd"] = 0
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(data), "--out", str(res), "--no-plots", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the last tier {last!r} costs $0 on every question" in err and "\n" not in err
    for r in rows:
        r["models"] = {last: r["models"][last]}
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(data), "--out", str(res), "--no-plots", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"calibration_results: error: {train}: one model ({last}): a cascade needs at least two"
    assert not (res / "results.json").exists()


def test_beats_anchor_needs_the_policy_to_hold():
    from benchmarks.calibration_results import _beats

    rep = {"anchor_in_sample": {"saves": True, "savings_captured": 0.2, "cost_ratio": 0.9}, "verdict": "cascade",
           "savings_captured": 0.8, "cost_ratio": 0.6, "test_quality": 0.70, "strong_quality": 0.75,
           "max_quality_drop": 0.005}
    assert _beats(rep) == "no (does not hold)"   # cheap, but 5 points worse: no win
    assert _beats({**rep, "test_quality": 0.745}) == "yes"
    assert _beats({**rep, "test_quality": 0.745, "savings_captured": None}) == "yes (by cost)"


def test_cost_quality_refuses_a_test_file_that_is_the_train_file_and_a_free_strong_model(tmp_path, capsys):
    from benchmarks.cost_quality import main

    data = _qwen_pair(tmp_path)
    train = data / "mmlu_llama_train.jsonl"
    assert main(["--train", str(train), "--test", str(train), "--out", str(tmp_path / "o"), "--no-plots"]) == 1
    out = capsys.readouterr().out
    assert "ERROR DataError" in out and "nothing may be fit on TEST" in out
    assert not (tmp_path / "o" / "cost_quality.json").exists()
    free = tmp_path / "free_train.jsonl"
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    for r in rows:
        r["models"]["qwen2.5-coder-1.5b"]["cost_usd"] = 0.0
    free.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--train", str(free), "--out", str(tmp_path / "o"), "--no-plots"]) == 1
    assert "costs $0 on every question" in capsys.readouterr().out


def test_cost_quality_live_folder_with_a_broken_file_reports_it_and_runs_the_rest(tmp_path, capsys):
    from benchmarks.cost_quality import main

    live = _qwen_pair(tmp_path)
    (live / "broken_train.jsonl").write_text("{broken\n")
    (live / "broken_test.jsonl").write_text("{broken\n")
    assert main(["--live", str(live), "--no-plots"]) == 1      # one case failed, said; the other written
    out = capsys.readouterr().out
    assert "live/broken: ERROR DataError" in out and "live/mmlu_llama " in out
    doc = json.loads((live / "cost_quality.json").read_text())
    assert [("error" in c) for c in doc["cases"]] == [True, False]


def test_replica_spend_refuses_bad_flags_in_one_line(capsys):
    from benchmarks.replica_spend import main

    for argv, said in ((["--replicas", "0"], "at least 1"), (["--ledger", "mysql://x"], "postgresql:// URL"),
                       (["--limit", "-1"], "above 0"), (["--delay", "99"], "from 0 to 30"),
                       (["--concurrency", "60,0"], "at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in err, err


def test_replica_spend_names_the_admissions_past_the_limit_in_admission_order():
    """The watcher's holds of two replicas, $1 each on a $2 limit: the third admitted (by created_at, whichever
    replica) is past the limit; each hold's delays after its request was sent and until it was seen."""
    from benchmarks.replica_spend import hold_timeline

    watch = {"polls": 9, "slowest_poll_s": 0.002,  # hold id: [instance, amount, created_at, first seen, last seen]
             "holds": {"c": ["i1", 1.0, 1.30, 1.35, 2.0], "a": ["i0", 1.0, 1.10, 1.12, 2.0],
                       "b": ["i1", 1.0, 1.20, 1.21, 2.0]}}
    out = hold_timeline(watch, 2.0, {"i0": 0, "i1": 1}, sent={"a": 1.0, "b": 1.0, "c": 1.0})
    (past,) = out["admissions_past_limit"]
    assert past["hold_id"] == "c" and past["replica"] == 1 and past["admitted_after_usd"] == 2.0
    assert past["admitted_ms_after_sent"] == pytest.approx(300.0)
    assert out["admitted_after_sent_ms"]["max"] == pytest.approx(300.0)
    assert out["hold_visible_after_admission_ms"]["max"] == pytest.approx(50.0)
    assert out["holds_seen"] == out["holds_matched_to_requests"] == 3 and out["held_usd_total"] == 3.0
