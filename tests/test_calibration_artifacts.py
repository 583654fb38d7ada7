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
SHARED = Path(os.environ.get("CASCADE_DATA_DIR", REPO.parent / "shared" / "data")).expanduser() / "cascade_outputs"


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


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED} (set CASCADE_DATA_DIR)")
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
