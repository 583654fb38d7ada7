"""From `cascade calibrate` to a tier of the engine: the artifact's feature must be one the engine computes.

Runs on the live outputs committed under ``results/live/full`` (real Qwen2.5-Coder answers with the
engine's features, written by benchmarks/live_cascade.py) and, where present, on the shared data (whose
stored confidence, ``raw_conf_logprob``, the engine does not compute).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from calibration.calibrators import load_calibrator, make_calibrator, save_calibrator
from calibration.cli import main as calibration_main
from calibration.data import load_cascade_outputs
from cascade.config import CalibratorConfig
from cascade.engine import build_calibrator
from cascade.errors import ConfigError
from cascade.policy import decide

REPO = Path(__file__).resolve().parents[1]
LIVE = REPO / "results" / "live" / "full" / "mixed_smol135m-qc0.5b-qc1.5b_train.jsonl"
SHARED = Path(os.environ.get("CASCADE_DATA_DIR") or os.environ.get("CASCADE_SHARED_DATA")
              or REPO.parent / "shared" / "data").expanduser() / "cascade_outputs"


def _calibrate(capsys, *argv: str) -> tuple[int, str, str]:
    rc = calibration_main(["calibrate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_live_outputs_carry_the_engine_features():
    data = load_cascade_outputs(LIVE)
    tier = data.tier("qwen2.5-coder-0.5b")
    assert {"mean_logprob", "min_logprob", "first_token_logprob"} <= set(tier.features)
    assert all(len(v) == len(data) for v in tier.features.values())
    # the features survive a split
    half = data.subset(np.arange(10))
    assert len(half.tier("qwen2.5-coder-0.5b").features["mean_logprob"]) == 10


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_calibrate_on_an_engine_feature_gives_an_artifact_a_tier_serves(method, tmp_path, capsys):
    art = tmp_path / "q05.json"
    rc, out, err = _calibrate(capsys, "--data", str(LIVE), "--model", "qwen2.5-coder-0.5b", "--feature",
                              "mean_logprob", "--method", method, "--out", str(art), "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["feature"] == "mean_logprob" and rep["n"] == 72
    saved = load_calibrator(art)
    assert saved.feature == "mean_logprob" and saved.fitted_on["feature_source"] == "features.mean_logprob"

    cal = build_calibrator(CalibratorConfig(artifact=str(art)), tier="qwen2.5-coder-0.5b")
    data = load_cascade_outputs(LIVE)
    feats = data.tier("qwen2.5-coder-0.5b").features
    row = {k: float(v[0]) for k, v in feats.items()}
    # the engine's decision reads the same map the command fitted, from the answer's own features
    conf = decide(row, cal, 0.5, is_last=False).confidence
    assert conf == pytest.approx(float(saved.predict([row["mean_logprob"]])[0]), abs=1e-12)


def test_calibrate_on_a_feature_the_file_lacks_is_a_one_line_error(tmp_path, capsys):
    bare = tmp_path / "bare_chain_train.jsonl"
    lines = []
    for line in LIVE.read_text().splitlines()[:5]:
        row = json.loads(line)
        for m in row["models"].values():
            m.pop("features", None)
        lines.append(json.dumps(row))
    bare.write_text("\n".join(lines) + "\n")
    rc, out, err = _calibrate(capsys, "--data", str(bare), "--model", "qwen2.5-coder-0.5b",
                              "--feature", "mean_logprob", "--out", str(tmp_path / "x.json"))
    assert rc == 2 and not (tmp_path / "x.json").exists()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "features.mean_logprob" in lines[0] and "raw_conf_logprob" in lines[0]


def test_an_artifact_on_a_stored_confidence_needs_its_engine_feature(tmp_path):
    rng = np.random.default_rng(0)
    lp = -rng.exponential(0.7, 400)
    y = (rng.random(400) < np.exp(lp / 2.0)).astype(float)
    fitted = make_calibrator("temperature", "raw_conf_logprob").fit(lp, y)
    art = save_calibrator(fitted, tmp_path / "stored.json")

    with pytest.raises(ConfigError) as exc:
        build_calibrator(CalibratorConfig(artifact=str(art)), tier="small")
    msg = str(exc.value)
    assert msg.startswith("tiers.small.calibrator: ") and "'raw_conf_logprob'" in msg and "feature:" in msg

    served = build_calibrator(CalibratorConfig(artifact=str(art), feature="first_token_logprob"), tier="small")
    assert served.inputs == ["first_token_logprob"]
    assert served.fitted_on["fitted_feature"] == "raw_conf_logprob"
    for score in (-0.01, -0.5, -2.0):
        assert served.predict_one({"first_token_logprob": score}) == pytest.approx(
            float(fitted.predict([score])[0]), abs=1e-12)


def test_a_multi_feature_artifact_cannot_be_read_from_one_feature(tmp_path):
    from calibration.calibrators import LogisticCalibrator

    x = np.column_stack([np.linspace(-3, 0, 50), np.linspace(1, 0, 50)])
    y = (np.arange(50) % 3 == 0).astype(float)
    cal = LogisticCalibrator(feature="mean_logprob", features=["mean_logprob", "mean_margin"]).fit(x, y)
    art = save_calibrator(cal, tmp_path / "lr.json")
    assert build_calibrator(CalibratorConfig(artifact=str(art)), tier="t").inputs == ["mean_logprob", "mean_margin"]
    with pytest.raises(ConfigError, match="cannot be read from one other feature"):
        build_calibrator(CalibratorConfig(artifact=str(art), feature="min_logprob"), tier="t")


@pytest.mark.timeout(30)
def test_an_artifact_that_is_no_regular_file_is_refused_unread(tmp_path):
    """A config file that is a pipe or a device is never read (cascade/config.py); an artifact was: a FIFO waited for
    a writer for ever (serve, ask and a reload hung), and /dev/zero would have been read until memory ran out."""
    fifo = tmp_path / "cal.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match=f"tiers.t.calibrator: calibrator artifact {path} is not a regular file"):
            build_calibrator(CalibratorConfig(artifact=str(path)), tier="t")
    with pytest.raises(ConfigError, match="Is a directory"):  # a directory is still said as before
        build_calibrator(CalibratorConfig(artifact=str(tmp_path)), tier="t")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED} (set CASCADE_SHARED_DATA)")
def test_shared_data_artifact_serves_an_engine_tier_through_first_token_logprob(tmp_path, capsys):
    art = tmp_path / "mini.json"
    rc, _, err = _calibrate(capsys, "--data", str(SHARED / "mmlu_qwen_oai_train.jsonl"), "--model", "gpt-4o-mini",
                            "--out", str(art), "--json")
    assert rc == 0, err
    with pytest.raises(ConfigError, match="raw_conf_logprob"):
        build_calibrator(CalibratorConfig(artifact=str(art)), tier="gpt-4o-mini")
    cal = build_calibrator(CalibratorConfig(artifact=str(art), feature="first_token_logprob"), tier="gpt-4o-mini")
    stored = load_calibrator(art)
    assert cal.predict_one({"first_token_logprob": -0.05}) == pytest.approx(float(stored.predict([-0.05])[0]))


# --- replay --export-policy: the fitted policy as the engine loads it --------------------------------

LIVE_TEST = LIVE.with_name("mixed_smol135m-qc0.5b-qc1.5b_test.jsonl")
SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


def _replay(capsys, *argv: str) -> tuple[int, str, str]:
    rc = calibration_main(["replay", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_exported_policy_loads_into_the_engine_and_decides_as_the_replay_did(tmp_path, capsys):
    import yaml

    from cascade.config import parse_config
    from cascade.engine import build_policy_calibrators

    out_dir = tmp_path / "policy"
    # a 5-point drop on 72 questions: wide enough that this weak pair still cascades (the default 0.5 point
    # makes it `direct`, which exports a one-tier chain: covered below)
    rc, out, err = _replay(capsys, "--train", str(LIVE), "--test", str(LIVE_TEST), "--chain", f"{SMALL},{LARGE}",
                           "--feature", "mean_logprob", "--no-features", "--max-quality-drop", "0.05",
                           "--export-policy", str(out_dir), "--policy-name", "live", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["score_feature"] == "mean_logprob" and rep["verdict"] == "cascade"
    assert rep["exported"]["policy"] == str(out_dir / "policy.yaml")

    section = yaml.safe_load((out_dir / "policy.yaml").read_text())["policies"]["live"]
    assert section["chain"] == [SMALL, LARGE]
    threshold = section["thresholds"][SMALL]
    assert threshold == pytest.approx(rep["thresholds_by_model"][SMALL])

    # merged into a config whose tiers carry the models' names, it validates and its calibrators build
    tiers = [{"name": m, "backend": "transformers", "model": m, "price": {"input_per_1m": 1, "output_per_1m": 1}}
             for m in (SMALL, LARGE)]
    config = parse_config({"tiers": tiers, "policies": {"live": section}, "ledger": {"path": str(tmp_path / "l.db")}})
    cal = build_policy_calibrators(config)["live"][SMALL]
    assert cal.inputs == ["mean_logprob"]

    # the engine's decision on each TEST answer's own features escalates exactly where the replay did
    test = load_cascade_outputs(LIVE_TEST).tier(SMALL)
    rows = [{k: float(v[i]) for k, v in test.features.items()} for i in range(len(test.correct))]
    escalated = [decide(r, cal, config.policies["live"].thresholds[SMALL], is_last=False).escalate for r in rows]
    assert sum(escalated) == round(rep["escalation_rate"] * rep["n_test"])  # the report rounds to 6 digits



def test_an_answer_the_grader_could_not_read_is_judged_as_the_engine_judges_it(tmp_path, capsys):
    """A live line's ``answer`` is what the grader read from the response ("" for a GSM8K response with no
    number, or a multiple-choice one with no letter). The engine never grades: it escalates only an answer with
    no tokens. A replay that took such lines for empty answers escalated them whatever their confidence, so the
    policy it fit and exported promised an escalation rate (and a quality) that the engine, accepting them on
    their confidence, did not give."""
    import yaml

    from cascade.config import parse_config
    from cascade.engine import build_policy_calibrators

    rows = [json.loads(line) for line in LIVE_TEST.read_text().splitlines() if line.strip()]
    surest = sorted(range(len(rows)), key=lambda i: -rows[i]["models"][SMALL]["features"]["mean_logprob"])[:8]
    for i in surest:  # the grader could not read them: wrong, though the model did answer (tokens, features)
        rows[i]["models"][SMALL].update(answer="", correct=False)
    ungraded = tmp_path / "ungraded_test.jsonl"
    ungraded.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "policy"
    rc, out, err = _replay(capsys, "--train", str(LIVE), "--test", str(ungraded), "--chain", f"{SMALL},{LARGE}",
                           "--feature", "mean_logprob", "--no-features", "--max-quality-drop", "0.05",
                           "--export-policy", str(out_dir), "--policy-name", "live", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["verdict"] == "cascade"
    section = yaml.safe_load((out_dir / "policy.yaml").read_text())["policies"]["live"]
    tiers = [{"name": m, "backend": "transformers", "model": m, "price": {"input_per_1m": 1, "output_per_1m": 1}}
             for m in (SMALL, LARGE)]
    config = parse_config({"tiers": tiers, "policies": {"live": section}, "ledger": {"path": str(tmp_path / "l.db")}})
    cal = build_policy_calibrators(config)["live"][SMALL]
    test = load_cascade_outputs(ungraded).tier(SMALL)
    feats = [{k: float(v[i]) for k, v in test.features.items()} for i in range(len(test.correct))]
    kept = [not decide(f, cal, section["thresholds"][SMALL], is_last=False).escalate for f in feats]
    assert any(kept[i] for i in surest)  # the engine keeps the surest of them...
    assert rep["answered_by"][SMALL] == sum(kept)  # ...and the replay counts what the engine does

def test_the_embedded_default_is_the_policy_fit_on_the_live_train_split(tmp_path, capsys):
    """cascade/defaults/cpu.yaml (what `make serve` serves) carries a fitted calibrator and threshold, not
    placeholders: the same numbers `cascade replay --export-policy` and `cascade calibrate` fit on the
    committed live train split today, to the digits the file keeps."""
    from cascade.config import load_config

    rc, out, err = _replay(capsys, "--train", str(LIVE), "--test", str(LIVE_TEST), "--chain", f"{SMALL},{LARGE}",
                           "--feature", "mean_logprob", "--no-features", "--max-quality-drop", "0.05",
                           "--export-policy", str(tmp_path / "p"), "--json")
    assert rc == 0, err
    rep = json.loads(out)
    fitted_small = load_calibrator(tmp_path / "p" / f"{SMALL}.json")
    large = load_cascade_outputs(LIVE).tier(LARGE)
    fitted_large = make_calibrator("platt", feature="mean_logprob").fit(large.features["mean_logprob"], large.correct)

    tiers = {t.name: t for t in load_config(environ={}).tiers}
    assert tiers[SMALL].threshold == pytest.approx(rep["thresholds_by_model"][SMALL], abs=1e-4)
    for name, fitted in ((SMALL, fitted_small), (LARGE, fitted_large)):
        cc = tiers[name].calibrator
        assert (cc.method, cc.feature) == ("platt", "mean_logprob")
        assert cc.params == pytest.approx(fitted.params(), abs=1e-5), name
    # and what it means on the held-out split: far closer to the truth than the raw probability
    assert rep["ece_calibrated"] < rep["ece_raw"] / 3


def test_export_needs_no_features_and_a_direct_verdict_exports_the_last_tier(tmp_path, capsys):
    rc, out, err = _replay(capsys, "--train", str(LIVE), "--test", str(LIVE_TEST), "--chain", f"{SMALL},{LARGE}",
                           "--feature", "mean_logprob", "--export-policy", str(tmp_path / "x"))
    assert rc == 2 and "--no-features" in err and not (tmp_path / "x").exists()

    import yaml

    rc, out, err = _replay(capsys, "--train", str(LIVE), "--test", str(LIVE_TEST), "--chain", f"{SMALL},{LARGE}",
                           "--feature", "mean_logprob", "--no-features", "--export-policy", str(tmp_path / "d"),
                           "--json")
    assert rc == 0, err
    rep = json.loads(out)
    section = yaml.safe_load((tmp_path / "d" / "policy.yaml").read_text())["policies"]["replayed"]
    if rep["verdict"] == "direct":
        assert section["chain"] == [LARGE] and "thresholds" not in section
    else:
        assert section["chain"][-1] == LARGE and set(section["thresholds"]) == set(section["chain"][:-1])


@pytest.mark.parametrize("score", [float("-inf"), float("nan")])
def test_the_engine_never_accepts_an_answer_without_a_confidence(score):
    """As a replay never does: a calibrator maps -inf to its lowest value, which an accept-all threshold would
    take; the engine's decision escalates it whatever the threshold (and the last tier still answers)."""
    cal = make_calibrator("platt", "mean_logprob").fit(np.linspace(-3, 0, 50), (np.arange(50) % 3 > 0).astype(float))
    assert cal.predict_one({"mean_logprob": -20.0}) > 0.0  # what -inf would read as without the rule
    d = decide({"mean_logprob": score, "n_tokens": 3.0}, cal, 0.0, is_last=False)
    assert d.escalate and d.confidence == 0.0 and "no confidence" in d.reason
    d = decide({"mean_logprob": score, "n_tokens": 3.0}, cal, 0.0, is_last=True)
    assert not d.escalate and d.confidence == 0.0
    assert not decide({"mean_logprob": -20.0, "n_tokens": 3.0}, cal, 0.0, is_last=False).escalate
