"""`cascade calibrate` and `cascade replay` end to end on the real shared data (no mocks).

The data folder is ``$CASCADE_DATA_DIR`` or ``$CASCADE_SHARED_DATA`` (default ``<repo>/../shared/data``); the tests
skip when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from calibration.calibrators import load_calibrator
from calibration.data import answer_agreement, load_cascade_outputs, normalize_answer, split_data
from cascade.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CASCADE_DATA_DIR") or os.environ.get("CASCADE_SHARED_DATA")
                or REPO.parent / "shared" / "data").expanduser()
OUTPUTS = DATA_DIR / "cascade_outputs"

pytestmark = pytest.mark.skipif(not OUTPUTS.is_dir(), reason=f"shared data not found at {OUTPUTS} "
                                                              "(set CASCADE_SHARED_DATA)")

ALL_FILES = sorted(p.name for p in OUTPUTS.glob("*.jsonl")) if OUTPUTS.is_dir() else []

REPLAY_KEYS = ("ece_raw", "ece_calibrated", "temperature", "thresholds", "verdict", "test_quality",
               "strong_quality", "cost_ratio", "oracle_cost_ratio", "savings_captured", "escalation_rate",
               "escalation_waste_ratio")


def _main():
    """The real `cascade` entry point when it imports cleanly, else calibration's own parser."""
    try:
        from cascade.cli import build_parser, main

        build_parser()
        return main
    except Exception:  # another area's sub-commands may be mid-edit
        from calibration.cli import main

        return main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = _main()(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("cascade: error: ")
    return lines[0]


# --- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_shared_file_loads(name):
    d = load_cascade_outputs(OUTPUTS / name)
    assert len(d) > 0 and len(d.models) >= 4
    for m in d.models:
        t = d.tier(m)
        assert t.correct.shape == (len(d),) and set(np.unique(t.correct)) <= {0.0, 1.0}
        assert np.all(t.logprob <= 0) and np.all(t.cost >= 0)
    train, test = split_data(d, 0.5, seed=0)
    assert len(train) + len(test) == len(d)
    with pytest.raises(DataError, match="unknown model"):
        d.tier("no-such-model")


def test_answer_normalisation_and_agreement():
    assert normalize_answer(" b ") == "B"
    assert normalize_answer("so the answer is\n#### 1,200") == normalize_answer("#### 1200.0")
    assert answer_agreement("The Eiffel Tower.", "eiffel tower") == 1.0
    assert 0 < answer_agreement("Nicholas Nickleby novel", "Nicholas Nickleby") < 1
    assert answer_agreement("A", "C") == 0.0


# --- calibrate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic", "histogram"])
def test_calibrate_end_to_end(method, tmp_path, capsys):
    art, png = tmp_path / "cal.json", tmp_path / "rel.png"
    rc, out, err = run_cli(capsys, "calibrate", "--data", str(OUTPUTS / "medmcqa_llama_train.jsonl"),
                           "--model", "llama3.2-1b", "--method", method, "--out", str(art), "--plot", str(png),
                           "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["method"] == method and rep["n"] == 300
    # llama3.2-1b is badly over-confident on medmcqa: every method must cut the in-sample ECE
    assert rep["calibrated"]["ece"] < rep["raw"]["ece"]
    assert rep["warnings"] == []  # a fit inside its bounds that ranks answers the right way round
    cal = load_calibrator(art)
    assert cal.method == method and cal.fitted_on["n"] == 300 and cal.fitted_on["model"] == "llama3.2-1b"
    assert cal.fitted_on["date"] and "raw" in cal.metrics
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ALL_FILES)
def test_calibrate_works_on_every_file(name, tmp_path, capsys):
    d = load_cascade_outputs(OUTPUTS / name)
    rc, out, err = run_cli(capsys, "calibrate", "--data", str(OUTPUTS / name), "--model", d.models[0],
                           "--out", str(tmp_path / "a.json"))
    assert rc == 0, err
    assert "ece" in out and (tmp_path / "a.json").exists()


# --- replay -------------------------------------------------------------------------------------------


def test_replay_json_contract_on_a_real_test_split(capsys):
    chain = "gpt-4o-mini,qwen2.5-72b-instruct,gpt-4o"
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_qwen_oai_train.jsonl"),
                           "--test", str(OUTPUTS / "medmcqa_qwen_oai_test.jsonl"), "--chain", chain,
                           "--max-quality-drop", "0.005", "--json")
    assert rc == 0, err
    rep = json.loads(out)  # one JSON object, nothing else on stdout
    for k in REPLAY_KEYS:
        assert k in rep, k
    assert rep["n_train"] == 300 and rep["n_test"] == 1000
    assert rep["verdict"] in ("cascade", "direct")
    assert len(rep["thresholds"]) == 2
    assert rep["ece_calibrated"] < rep["ece_raw"]
    # the floor no calibrator fit on train can go under: ECE >= |mean confidence - accuracy| on test
    assert rep["accuracy_first_train"] == pytest.approx(0.726667, abs=1e-6)  # 218/300 right on train
    assert rep["accuracy_first_test"] == pytest.approx(0.66, abs=1e-6)
    assert rep["ece_floor_mean_gap"] == pytest.approx(abs(rep["mean_confidence_calibrated"] - 0.66), abs=1e-5)
    assert rep["ece_calibrated"] >= rep["ece_floor_mean_gap"] - 1e-6
    assert rep["temperature"] > 0
    sc = (1 - rep["cost_ratio"]) / (1 - rep["oracle_cost_ratio"])
    assert rep["savings_captured"] == pytest.approx(sc, abs=1e-5)
    assert 0 <= rep["escalation_rate"] <= 1 and 0 <= rep["escalation_waste_ratio"] <= 1
    # gpt-4o-mini -> gpt-4o: the test set's own best single threshold saves money here
    assert rep["anchor_in_sample"]["saves"] is True
    # the operating point chosen on train holds on test: within the allowed drop, +- half a point
    assert rep["test_quality"] >= rep["strong_quality"] - 0.005 - 0.005
    assert sum(rep["answered_by"].values()) == 1000


def test_replay_direct_when_no_threshold_saves(capsys):
    # truthfulqa, gpt-4o-mini -> gpt-4o: not even the best threshold tuned on the test set saves money
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "truthfulqa_qwen_oai_train.jsonl"),
                           "--test", str(OUTPUTS / "truthfulqa_qwen_oai_test.jsonl"),
                           "--chain", "gpt-4o-mini,gpt-4o", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["anchor_in_sample"]["saves"] is False
    assert rep["verdict"] == "direct" and rep["cost_ratio"] == 1.0 and rep["escalation_rate"] == 0.0
    assert rep["thresholds"] == [None] and rep["test_quality"] == rep["strong_quality"]
    assert rep["reason"]


def test_replay_escalates_empty_answers_as_the_engine_does(capsys, tmp_path):
    # the engine escalates an answer with no tokens whatever its confidence; replay must too, or a policy
    # replayed on data with empty answers would claim savings the engine never makes
    chain = "gpt-4o-mini,qwen2.5-72b-instruct,gpt-4o"
    train, test = OUTPUTS / "medmcqa_qwen_oai_train.jsonl", OUTPUTS / "medmcqa_qwen_oai_test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    surest = sorted(range(len(rows)), key=lambda i: -rows[i]["models"]["gpt-4o-mini"]["raw_conf_logprob"])[:40]
    for i in surest:
        rows[i]["models"]["gpt-4o-mini"]["answer"] = ""
    blanked = tmp_path / "blanked.jsonl"
    blanked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reps = []
    for data in (test, blanked):
        rc, out, err = run_cli(capsys, "replay", "--train", str(train), "--test", str(data), "--chain", chain,
                               "--no-features", "--json")
        assert rc == 0, err
        reps.append(json.loads(out))
    before, after = reps
    assert before["thresholds"] == after["thresholds"] and before["verdict"] == "cascade"
    assert before["answered_by"]["gpt-4o-mini"] >= 40  # the surest answers were accepted...
    # ...and once empty, every one of them goes up the chain
    assert after["answered_by"]["gpt-4o-mini"] == before["answered_by"]["gpt-4o-mini"] - 40


@pytest.mark.parametrize("name", ALL_FILES)
def test_replay_works_on_every_file_with_a_seeded_split(name, capsys, tmp_path):
    d = load_cascade_outputs(OUTPUTS / name)
    chain = f"{d.models[0]},{d.models[-1]}"
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / name), "--test", str(OUTPUTS / name),
                           "--chain", chain, "--split-seed", "3", "--test-fraction", "0.4", "--json",
                           "--out", str(tmp_path / "r.json"), "--no-guard")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["split"]["seed"] == 3 and rep["n_test"] == round(len(d) * 0.4)
    assert rep["n_train"] + rep["n_test"] == len(d) and rep["guard"] == {}
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == rep["verdict"]


def test_replay_full_five_tier_chain(capsys):
    d = load_cascade_outputs(OUTPUTS / "medmcqa_llama_train.jsonl")
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_llama_train.jsonl"),
                           "--test", str(OUTPUTS / "medmcqa_llama_test.jsonl"), "--chain", ",".join(d.models),
                           "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert len(rep["thresholds"]) == 4 and len(rep["considered_on_train"]) == 15  # every sub-chain tried
    assert rep["policy_chain"][-1] == "llama3.1-405b"
    assert sum(rep["answered_by"].values()) == rep["n_test"] == 1000
    iv = rep["expected_from_train"]["cost_ratio"]
    assert iv["low"] <= iv["estimate"] <= iv["high"]
    tried = rep["guard"]["levels_tried"]
    assert tried and tried[0]["level"] == 0.9
    if rep["guard"]["level_used"] is not None:  # the level used passed the held-out check
        used = [t for t in tried if t["level"] == rep["guard"]["level_used"]][0]
        assert used["passed"] and used["heldout_quality_diff"] >= -0.005
    if rep["verdict"] == "cascade":
        consulted = [m for m, t in rep["thresholds_by_model"].items() if t is not None]
        assert consulted == rep["policy_chain"][:-1]
        assert rep["cost_ratio"] < 1.0


def test_replay_cost_budget(capsys):
    f = OUTPUTS / "medmcqa_qwen_oai_train.jsonl"
    d = load_cascade_outputs(f)
    budget = 0.5 * float(d.tier("gpt-4o").cost.mean())
    rc, out, err = run_cli(capsys, "replay", "--train", str(f), "--test", str(OUTPUTS / "medmcqa_qwen_oai_test.jsonl"),
                           "--chain", "gpt-4o-mini,gpt-4o", "--cost-budget", f"{budget:.8f}", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["objective"] == "budget" and rep["verdict"] == "cascade"
    assert rep["expected_from_train"]["cost_ratio"]["estimate"] <= 0.5 + 1e-9


def test_replay_cost_budget_skips_a_sub_chain_that_cannot_fit_it(capsys):
    """A budget below what the 70B costs alone: the sub-chain that starts at the 70B has no affordable policy,
    the one that starts at the 1B has; the fit goes on with it (one unaffordable sub-chain ended the replay)."""
    f, t = OUTPUTS / "medmcqa_llama_train.jsonl", OUTPUTS / "medmcqa_llama_test.jsonl"
    seventy = float(load_cascade_outputs(f).tier("llama3.1-70b").cost.mean())
    rc, out, err = run_cli(capsys, "replay", "--train", str(f), "--test", str(t), "--chain",
                           "llama3.2-1b,llama3.1-70b,llama3.1-405b", "--cost-budget", f"{0.7 * seventy:.8f}", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["verdict"] == "cascade" and rep["policy_chain"][0] == "llama3.2-1b"
    # nothing affordable at all, the last tier alone neither: the one-line refusal
    rc, _, err = run_cli(capsys, "replay", "--train", str(f), "--test", str(t), "--chain",
                         "llama3.1-70b,llama3.1-405b", "--cost-budget", f"{0.7 * seventy:.8f}")
    assert rc == 2 and "no policy fits a budget" in _error_line(err)


def test_replay_human_output_and_plot(capsys, tmp_path):
    png = tmp_path / "test_rel.png"
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "truthfulqa_llama_train.jsonl"),
                           "--test", str(OUTPUTS / "truthfulqa_llama_test.jsonl"),
                           "--chain", "llama3.2-3b,llama3.1-8b,llama3.1-405b", "--plot", str(png))
    assert rc == 0, err
    assert "savings captured" in out and "verdict" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


# --- one-line errors ------------------------------------------------------------------------------------


def _small_copy(tmp_path: Path, lines: int = 20) -> Path:
    src = (OUTPUTS / "mmlu_llama_train.jsonl").read_text().split("\n")[:lines]
    p = tmp_path / "small.jsonl"
    p.write_text("\n".join(src) + "\n")
    return p


def test_error_malformed_file(tmp_path, capsys):
    good = _small_copy(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"models": {"llama3.2-1b": \n')
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(bad), "--model", "llama3.2-1b",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and "bad.jsonl:21" in _error_line(err) and "not valid JSON" in err
    # a missing field and a non-boolean correctness are malformed too
    row = json.loads(good.read_text().split("\n")[0])
    del row["models"]["llama3.2-1b"]["raw_conf_logprob"]
    bad.write_text(json.dumps(row) + "\n")
    rc, _, err = run_cli(capsys, "replay", "--train", str(bad), "--test", str(good),
                         "--chain", "llama3.2-1b,llama3.1-405b")
    assert rc == 2 and "raw_conf_logprob" in _error_line(err)
    row = json.loads(good.read_text().split("\n")[0])
    row["models"]["llama3.2-1b"]["correct"] = "yes"
    bad.write_text(json.dumps(row) + "\n")
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(bad), "--model", "llama3.2-1b",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and "correct" in _error_line(err)


def test_error_unknown_model(tmp_path, capsys):
    f = str(OUTPUTS / "mmlu_llama_train.jsonl")
    rc, _, err = run_cli(capsys, "calibrate", "--data", f, "--model", "gpt-9", "--out", str(tmp_path / "a.json"))
    assert rc == 2 and "unknown model 'gpt-9'" in _error_line(err)
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,gpt-9", "--json")
    assert rc == 2 and "unknown model 'gpt-9'" in _error_line(err)


def test_error_empty_file_and_empty_split(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = _small_copy(tmp_path, 3)
    rc, _, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "mmlu_llama_train.jsonl"), "--test",
                         str(empty), "--chain", "llama3.2-1b,llama3.1-405b")
    assert rc == 2 and "empty" in _error_line(err)
    rc, _, err = run_cli(capsys, "replay", "--train", str(good), "--test", str(good), "--test-fraction", "0.9",
                         "--chain", "llama3.2-1b,llama3.1-405b")
    assert rc == 2 and "non-empty" in _error_line(err)
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(tmp_path / "missing.jsonl"), "--model", "x",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and "not found" in _error_line(err)


def test_error_bad_options(capsys):
    f = str(OUTPUTS / "mmlu_llama_train.jsonl")
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.1-405b",
                         "--max-quality-drop", "5")
    assert rc == 2 and "--max-quality-drop" in _error_line(err)
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", " , ")
    assert rc == 2 and "--chain" in _error_line(err)
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.2-1b")
    assert rc == 2 and "twice" in _error_line(err)


# --- strict JSON, plots, overlapping data, options that do nothing -------------------------------------------


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_stays_strict_when_a_held_out_score_is_undefined(tmp_path, capsys):
    # the last tier wrong on every line: its calibrator selection holds nothing out (one outcome), NaN scores
    rows = _rows(OUTPUTS / "mmlu_llama_train.jsonl")
    for r in rows:
        r["models"]["llama3.1-405b"]["correct"] = False
    lastwrong = _write_rows(tmp_path / "lastwrong.jsonl", rows)
    rc, out, err = run_cli(capsys, "replay", "--train", str(lastwrong), "--test", str(lastwrong), "--chain",
                           "llama3.2-1b,llama3.1-405b", "--no-guard", "--json", "--out", str(tmp_path / "r.json"))
    assert rc == 0, err
    rep = _strict_json(out)
    assert set(rep["tier_calibration"]["llama3.1-405b"]["heldout"].values()) == {None}
    assert _strict_json((tmp_path / "r.json").read_text())["tier_calibration"] == rep["tier_calibration"]
    # six questions with --method auto: nothing held out either, in stdout and in the artifact
    six = _small_copy(tmp_path, 6)
    art = tmp_path / "six.json"
    rc, out, err = run_cli(capsys, "calibrate", "--data", str(six), "--model", "llama3.2-1b", "--method", "auto",
                           "--folds", "2", "--out", str(art), "--json")
    assert rc == 0, err
    assert set(_strict_json(out)["selection"]["heldout"].values()) == {None}
    assert set(_strict_json(art.read_text())["metrics"]["selection"]["heldout"].values()) == {None}


def test_a_plot_format_that_needs_latex_is_refused_before_the_work(tmp_path, capsys):
    f = str(OUTPUTS / "medmcqa_llama_train.jsonl")
    art, exp = tmp_path / "a.json", tmp_path / "exp"
    rc, _, err = run_cli(capsys, "calibrate", "--data", f, "--model", "llama3.2-1b", "--out", str(art),
                         "--plot", str(tmp_path / "p.pgf"))
    line = _error_line(err)
    assert rc == 2 and "--plot" in line and ".pgf" in line and "LaTeX" in line and ".png" in line
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.1-405b",
                         "--no-features", "--export-policy", str(exp), "--plot", str(tmp_path / "p.pgf"))
    assert rc == 2 and ".pgf" in _error_line(err)
    assert not art.exists() and not exp.exists()
    # PostScript is written without external programs
    rc, _, err = run_cli(capsys, "calibrate", "--data", f, "--model", "llama3.2-1b", "--out", str(art),
                         "--plot", str(tmp_path / "p.eps"))
    assert rc == 0, err
    assert (tmp_path / "p.eps").read_bytes()[:4] == b"%!PS"


def test_a_plot_that_fails_while_drawing_is_one_line_and_leaves_nothing_written(tmp_path, capsys):
    # a real failure after the up-front checks: the plot's temporary file cannot be created (a directory holds
    # its name), as a full disk or a vanished folder would fail it
    blocker = tmp_path / ".p.png.tmp"
    blocker.mkdir()
    f = str(OUTPUTS / "medmcqa_llama_train.jsonl")
    art, exp, rep, png = tmp_path / "a.json", tmp_path / "exp", tmp_path / "r.json", tmp_path / "p.png"
    rc, _, err = run_cli(capsys, "calibrate", "--data", f, "--model", "llama3.2-1b", "--out", str(art),
                         "--plot", str(png))
    assert rc == 2 and f"--plot {png}: cannot write the plot: Is a directory" in _error_line(err)
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.1-405b",
                         "--no-features", "--no-guard", "--export-policy", str(exp), "--out", str(rep),
                         "--plot", str(png))
    assert rc == 2 and f"--plot {png}: cannot write the plot: Is a directory" in _error_line(err)
    # no artifact, policy, report or half a plot
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocker.name] and not any(blocker.iterdir())


def test_a_deeply_nested_line_is_a_data_error_naming_the_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(_small_copy(tmp_path, 1).read_text() + "[" * 3000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: not valid JSON \(nested too deeply\)"):
        load_cascade_outputs(deep)


def test_replay_refuses_test_questions_that_are_also_in_train(tmp_path, capsys):
    real = OUTPUTS / "mmlu_llama_train.jsonl"
    chain = "llama3.2-1b,llama3.1-405b"
    copy = _write_rows(tmp_path / "copy.jsonl", _rows(real))  # the same questions under another name
    rc, out, err = run_cli(capsys, "replay", "--train", str(real), "--test", str(copy), "--chain", chain, "--json")
    line = _error_line(err)
    assert rc == 2 and out == "" and "285 of the 285 questions" in line and "nothing may be fit on TEST" in line
    # without ids, the same prompts are the same questions; a few of them (benchmarks repeat some questions
    # across their splits) are a warning, in the JSON too, not a refusal
    rows = _rows(OUTPUTS / "medmcqa_llama_test.jsonl")[:40] + _rows(OUTPUTS / "medmcqa_llama_train.jsonl")[:3]
    for r in rows:
        del r["idx"]
    leaky = _write_rows(tmp_path / "leaky.jsonl", rows)
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_llama_train.jsonl"), "--test",
                           str(leaky), "--chain", chain, "--json")
    assert rc == 0 and "3 of the 43 questions" in err and "same question prompt" in err
    assert any("3 of the 43 questions" in w for w in json.loads(out)["warnings"])
    # most of TEST in TRAIN, without ids: refused
    rows = _rows(OUTPUTS / "medmcqa_llama_train.jsonl")[:30] + _rows(OUTPUTS / "medmcqa_llama_test.jsonl")[:10]
    for r in rows:
        del r["idx"]
    rc, _, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_llama_train.jsonl"), "--test",
                         str(_write_rows(tmp_path / "mostly.jsonl", rows)), "--chain", chain)
    assert rc == 2 and "30 of the 40 questions" in _error_line(err) and "nothing may be fit on TEST" in err


def test_a_question_id_twice_in_one_file_is_refused_with_its_line(tmp_path, capsys):
    rows = _rows(OUTPUTS / "mmlu_llama_train.jsonl")[:30]
    rows[7]["idx"] = rows[2]["idx"]
    dup = _write_rows(tmp_path / "dup.jsonl", rows)
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(dup), "--model", "llama3.2-1b",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and f"{dup}:8: duplicate question id (idx 2, first on line 3)" in _error_line(err)
    rows[7]["idx"] = float(rows[2]["idx"])  # 2.0, as pandas writes an integer column with a gap: the same id
    dup = _write_rows(tmp_path / "dup-float.jsonl", rows)
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(dup), "--model", "llama3.2-1b",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and f"{dup}:8: duplicate question id (idx 2.0, first on line 3)" in _error_line(err)


def test_real_train_and_test_files_are_disjoint_and_so_is_a_seeded_split():
    from calibration.data import check_disjoint

    pairs = 0
    for name in ALL_FILES:
        d = load_cascade_outputs(OUTPUTS / name)
        assert len(set(d.qids)) == len(d) and None not in d.qids  # every line has an id, once
        train, test = split_data(d, 0.4, seed=3)
        assert not set(train.qids) & set(test.qids) and len(train) + len(test) == len(d)
        if name.endswith("_test.jsonl"):
            assert check_disjoint(load_cascade_outputs(OUTPUTS / name.replace("_test", "_train")), d) is None
            pairs += 1
    assert pairs == 4


def test_export_policy_and_policy_name_are_checked_before_the_work(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")  # never read: the options are refused first
    base = ["replay", "--train", missing, "--test", missing, "--chain", "llama3.2-1b,llama3.1-405b", "--no-features"]
    for extra, needle in ((["--export-policy", ""], "--export-policy: empty path"),
                          (["--export-policy", str(tmp_path / "e"), "--policy-name", ""],
                           "--policy-name '': the engine's config would refuse the exported policy: policies: a "
                           "policy name must not be empty"),
                          (["--export-policy", str(tmp_path / "e"), "--policy-name", "llama3.1-405b"],
                           "are also tier names"),
                          (["--policy-name", "mine"], "--policy-name names the policy that --export-policy writes"),
                          (["--export-policy", "/proc/nope"], "--export-policy /proc/nope: cannot create")):
        rc, _, err = run_cli(capsys, *base, *extra)
        assert rc == 2 and needle in _error_line(err), extra
    assert not (tmp_path / "e").exists()


def test_replay_warns_when_the_chain_does_not_run_cheapest_first(capsys):
    train, test = str(OUTPUTS / "medmcqa_llama_train.jsonl"), str(OUTPUTS / "medmcqa_llama_test.jsonl")
    rc, out, err = run_cli(capsys, "replay", "--train", train, "--test", test, "--chain",
                           "llama3.1-405b,llama3.2-1b", "--no-guard", "--json")
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cascade: warning: the last tier 'llama3.2-1b' costs no more")
    assert "savings_captured is undefined" in lines[0] and "cheapest model to the strongest" in lines[0]
    rep = _strict_json(out)
    assert rep["warnings"] == [lines[0].removeprefix("cascade: warning: ")] and rep["savings_captured"] is None
    rc, out, err = run_cli(capsys, "replay", "--train", train, "--test", test, "--chain",
                           "llama3.2-1b,llama3.1-405b", "--no-guard", "--json")
    assert rc == 0 and err == "" and _strict_json(out)["warnings"] == []


def test_options_that_would_do_nothing_and_unwritable_outputs_are_refused_first(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")  # never read: the options are refused first
    cal = ["calibrate", "--data", missing, "--model", "llama3.2-1b"]
    out = ["--out", str(tmp_path / "a.json")]
    for extra, needle in ((["--use-netcal", "--method", "platt", *out], "--use-netcal fits temperature scaling"),
                          (["--use-netcal", "--method", "auto", *out], "needs --method temperature"),
                          (["--criterion", "ece", *out], "--criterion chooses the method of --method auto"),
                          (["--out", "/proc/nope/x.json"], "--out /proc/nope/x.json: cannot create the directory"),
                          ([*out, "--plot", ""], "--plot: empty path")):
        rc, _, err = run_cli(capsys, *cal, *extra)
        assert rc == 2 and needle in _error_line(err), extra
    rc, _, err = run_cli(capsys, "replay", "--train", missing, "--test", missing, "--chain",
                         "llama3.2-1b,llama3.1-405b", "--out", "/proc/nope/r.json")
    assert rc == 2 and "--out /proc/nope/r.json: cannot create the directory" in _error_line(err)
    if Path("/dev/full").exists():  # a device that takes no data: the failure names the option and the path
        rc, _, err = run_cli(capsys, "calibrate", "--data", str(_small_copy(tmp_path)), "--model", "llama3.2-1b",
                             "--out", "/dev/full")
        assert rc == 2 and "--out /dev/full: cannot write" in _error_line(err)
    rc, out_, err = run_cli(capsys, "calibrate", "--data", str(OUTPUTS / "medmcqa_llama_train.jsonl"), "--model",
                            "llama3.2-1b", "--method", "auto", "--criterion", "ece", *out, "--json")
    assert rc == 0 and _strict_json(out_)["selection"]["criterion"] == "ece"


def test_replay_waste_and_anchor_savings_recomputed_from_the_outcome():
    from calibration.replay import apply_policy, replay

    train = load_cascade_outputs(OUTPUTS / "medmcqa_qwen_oai_train.jsonl")
    test = load_cascade_outputs(OUTPUTS / "medmcqa_qwen_oai_test.jsonl")
    rep, pol = replay(train, test, ["gpt-4o-mini", "qwen2.5-72b-instruct", "gpt-4o"])
    out = apply_policy(pol, test)
    assert rep["verdict"] == "cascade"
    waste = sum(np.where(out.stop > j, test.tier(m).cost, 0.0).sum() for j, m in enumerate(pol.subchain[:-1]))
    assert rep["escalation_waste_ratio"] == pytest.approx(waste / out.cost.sum(), abs=1e-6)
    a = rep["anchor_in_sample"]
    assert a["savings_captured"] == pytest.approx((1 - a["cost_ratio"]) / (1 - rep["oracle_cost_ratio"]), abs=1e-5)
    # escalations not needed: a tier escalated from, any of them (not only the last one), was already right
    right = np.zeros(len(test), dtype=bool)
    for j, m in enumerate(pol.subchain[:-1]):
        right |= (out.stop > j) & (test.tier(m).correct > 0.5)
    assert len(pol.subchain) == 3 and rep["unneeded_escalation_share"] == pytest.approx(
        right.sum() / (out.stop > 0).sum(), abs=1e-6)


def test_a_model_without_a_confidence_on_some_lines_is_read_as_never_accepted(tmp_path, capsys):
    """Other splits of the same sources may give a model no confidence on a line (``raw_conf_logprob`` null or
    NaN, ``correct`` null where it gave no answer). That used to refuse the whole file, even for commands that
    never read that model; now such an answer reads as -inf (never accepted: escalated), and both commands
    say on how many lines, on stderr and under ``warnings``."""
    rows = _rows(OUTPUTS / "medmcqa_qwen_oai_test.jsonl")
    for i, r in enumerate(rows[:60]):
        r["models"]["gpt-4o-mini"].update(answer=None, correct=None, cost_usd=0,
                                         raw_conf_logprob=None if i % 2 else float("nan"))
    test = _write_rows(tmp_path / "test.jsonl", rows)
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_qwen_oai_train.jsonl"), "--test",
                           str(test), "--chain", "gpt-4o-mini,qwen2.5-72b-instruct,gpt-4o", "--json")
    rep = _strict_json(out)
    assert rc == 0 and all(k in rep for k in REPLAY_KEYS)
    note = "model 'gpt-4o-mini' has no confidence (raw_conf_logprob null or NaN) on 60 of 1000 questions"
    assert [w for w in rep["warnings"] if note in w] and f"cascade: warning: {test}: {note}" in err
    data = load_cascade_outputs(test)
    assert np.isneginf(data.tier("gpt-4o-mini").logprob[:60]).all() and data.tier("gpt-4o-mini").correct[:60].sum() == 0
    # a chain without that model, and calibrate of another model, say nothing of it
    rc, out, err = run_cli(capsys, "replay", "--train", str(OUTPUTS / "medmcqa_qwen_oai_train.jsonl"), "--test",
                           str(test), "--chain", "qwen2.5-72b-instruct,gpt-4o", "--json")
    assert rc == 0 and err == "" and _strict_json(out)["warnings"] == []
    rc, out, err = run_cli(capsys, "calibrate", "--data", str(test), "--model", "gpt-4o-mini", "--method", "platt",
                           "--out", str(tmp_path / "a.json"), "--json")
    assert rc == 0 and any(note in w for w in _strict_json(out)["warnings"]) and note in err
    # a graded answer without its grade is still malformed
    rows[0]["models"]["gpt-4o"]["correct"] = None
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(_write_rows(tmp_path / "bad.jsonl", rows)), "--model",
                         "gpt-4o", "--out", str(tmp_path / "b.json"))
    assert rc == 2 and "bad.jsonl:1: model 'gpt-4o': correct must be true/false" in _error_line(err)


def test_an_answer_without_a_confidence_is_never_accepted_by_a_replayed_policy_nor_by_the_anchor():
    """triviaqa/qwen_oai holds answers whose confidence is -inf. Read through a calibrator, agreement features
    and a grid that includes accept-all, one such answer used to be accepted by a middle tier (the docs promise
    it never is); and the in-sample anchor's accept-all cut took them too (its threshold then -inf: null)."""
    from calibration.replay import ReplayConfig, apply_policy, replay

    full = load_cascade_outputs(OUTPUTS / "triviaqa_qwen_oai_train.jsonl")
    chain = ["gpt-4o-mini", "qwen2.5-32b-coder-instruct", "qwen2.5-72b-instruct", "gpt-4o"]
    assert sum(int(np.isneginf(full.tier(m).logprob).sum()) for m in chain[:-1]) >= 10
    train, test = split_data(full, 0.5, 0)
    rep, pol = replay(train, test, chain, ReplayConfig(max_quality_drop=0.03, cv_guard=False))
    out = apply_policy(pol, test)
    assert rep["verdict"] == "cascade" and len(pol.subchain) > 2
    for j, m in enumerate(pol.subchain[:-1]):
        no_conf = ~np.isfinite(test.tier(m).logprob)
        assert no_conf.any() and not (no_conf & (out.stop == j)).any(), m
    # the anchor, on a split where it accepts every answer that has a confidence
    train, test = split_data(full, 0.5, 1)
    rep, _ = replay(train, test, ["gpt-4o-mini", "gpt-4o"], ReplayConfig(max_quality_drop=0.05))
    first = test.tier("gpt-4o-mini")
    a = rep["anchor_in_sample"]
    assert a["saves"] and a["accepted"] == int(np.isfinite(first.logprob).sum()) < len(test), a
    assert a["threshold"] == pytest.approx(first.logprob[np.isfinite(first.logprob)].min(), abs=1e-6)


def test_a_gzip_file_or_a_json_array_is_named_as_what_it_is(tmp_path, capsys):
    """A gzip data file was "not UTF-8 (byte 1: invalid start byte)", a JSON array "not valid JSON (Expecting
    value)" or "each line must be a JSON object": each now says what the file is and what to write instead."""
    import gzip

    small = _small_copy(tmp_path, 3)
    gz = tmp_path / "small.jsonl.gz"
    gz.write_bytes(gzip.compress(small.read_bytes()))
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(gz), "--model", "llama3.1-405b", "--out",
                         str(tmp_path / "a.json"))
    assert rc == 2 and f"{gz}: gzip-compressed: decompress it first" in _error_line(err), err
    rows = [json.loads(ln) for ln in small.read_text().splitlines()]
    one_line, pretty = tmp_path / "one.jsonl", tmp_path / "pretty.jsonl"
    one_line.write_text(json.dumps(rows))
    pretty.write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError, match=r"one\.jsonl:1: each line must be a JSON object \(a JSON array"):
        load_cascade_outputs(one_line)
    with pytest.raises(DataError, match=r"pretty\.jsonl:1: not valid JSON \(.*\) \(a JSON array\?"):
        load_cascade_outputs(pretty)


def test_small_files_byte_order_marks_and_output_clashes(tmp_path, capsys):
    """A 3-question file calibrates (the default --folds only matters where held-out scores are computed);
    a byte-order mark is not part of the first line; bytes that are not UTF-8 name their line; --plot and
    --out naming one file is refused before the work; a max quality drop of 1 (anything goes) is a drop."""
    small = _small_copy(tmp_path, 3)
    rc, out, _ = run_cli(capsys, "calibrate", "--data", str(small), "--model", "llama3.1-405b", "--method", "platt",
                         "--out", str(tmp_path / "a.json"), "--json")
    assert rc == 0 and _strict_json(out)["n"] == 3
    rc, _, err = run_cli(capsys, "calibrate", "--data", str(small), "--model", "llama3.1-405b", "--method", "auto",
                         "--out", str(tmp_path / "a.json"))
    assert rc == 2 and "--folds 5 is more than the 3 questions" in _error_line(err)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + small.read_bytes())
    assert len(load_cascade_outputs(bom)) == 3
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(small.read_bytes() + '{"user_prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl:4: not UTF-8"):
        load_cascade_outputs(latin)
    f = str(OUTPUTS / "medmcqa_llama_train.jsonl")
    same = str(tmp_path / "same.png")
    rc, _, err = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.1-405b",
                         "--out", same, "--plot", same)
    assert rc == 2 and "is the --out file" in _error_line(err) and not Path(same).exists()
    rc, out, _ = run_cli(capsys, "replay", "--train", f, "--test", f, "--chain", "llama3.2-1b,llama3.1-405b",
                         "--max-quality-drop", "1", "--no-guard", "--json")
    rep = _strict_json(out)
    assert rc == 0 and rep["verdict"] == "cascade" and rep["cost_ratio"] < 0.2
