"""The live cost-quality benchmark with ``--backend vllm`` (what a GPU host runs) answers like transformers."""

from __future__ import annotations

import json

import pytest

from tests.vllm.conftest import VLLM_OPTIONS

pytestmark = pytest.mark.vllm


def test_live_benchmark_on_vllm_matches_transformers(tmp_path):
    from benchmarks._common import shared_data_dir
    from benchmarks.live_cascade import main

    data = shared_data_dir()
    if not (data / "questions").is_dir():
        pytest.skip(f"shared data folder not found at {data} (set CASCADE_SHARED_DATA)")
    common = ["--sets", "arc_easy,triviaqa", "--n", "4", "--chain", "smollm2-135m", "--no-progress",
              "--cache", str(tmp_path / "cache")]
    opts = [f"--backend-option={k}={json.dumps(v)}" for k, v in VLLM_OPTIONS.items() if k != "dtype"]
    assert main([*common, "--out", str(tmp_path / "vllm"), "--backend", "vllm", *opts]) == 0
    assert main([*common, "--out", str(tmp_path / "hf")]) == 0

    run = json.loads((tmp_path / "vllm" / "live_run_smol135m.json").read_text())
    assert run["settings"]["backend"] == "vllm" and run["tiers"][0]["answered"] == 8
    for name in ("arc_easy", "triviaqa"):
        # one cache file: the two backends' answers sit side by side under different settings keys
        rows = [json.loads(line) for line in (tmp_path / "cache" / name / "smollm2-135m.jsonl").open()]
        assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
        for split in ("train", "test"):
            v = [json.loads(x) for x in (tmp_path / "vllm" / f"{name}_smol135m_{split}.jsonl").open()]
            h = [json.loads(x) for x in (tmp_path / "hf" / f"{name}_smol135m_{split}.jsonl").open()]
            assert [r["idx"] for r in v] == [r["idx"] for r in h] and v
            for rv, rh in zip(v, h):
                a, b = rv["models"]["smollm2-135m"], rh["models"]["smollm2-135m"]
                assert a["answer"] == b["answer"] and a["correct"] == b["correct"]
                assert a["raw_conf_logprob"] == pytest.approx(b["raw_conf_logprob"], abs=1e-4)
