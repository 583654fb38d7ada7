"""What works without vllm: the registry's clean refusal, and the server script's command line."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None  # tests/vllm itself is a namespace package "vllm"


@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed here: the refusal is for venvs without it")
def test_without_vllm_the_backend_is_unavailable_with_a_hint(tmp_path):
    from cascade.backends import backend_class
    from cascade.engine import Engine  # noqa: F401 - importing the engine never needs vllm
    from cascade.errors import BackendUnavailableError
    from tests.conftest import make_config

    with pytest.raises(BackendUnavailableError, match="vllm") as info:
        backend_class("vllm")
    assert "pip install" in str(info.value)
    # a config that names the backend still parses (the check is at build time, not at parse time)
    cfg = make_config(tmp_path, [{"name": "small", "backend": "vllm", "model": "smollm2-135m"}])
    assert cfg.tiers[0].backend == "vllm"


def test_server_script_command_on_cpu():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "vllm_server.py"), "smollm2-135m", "--device", "cpu",
         "--port", "8123", "--max-model-len", "2048", "--print-command", "--", "--max-num-seqs", "8"],
        capture_output=True, text=True, check=True, cwd=REPO)
    words = shlex.split(out.stdout)
    env = [w for w in words if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]  # the environment it sets, first
    cmd = words[len(env):]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    model = cmd[cmd.index("--model") + 1]
    assert Path(model).is_dir() and (Path(model) / "config.json").is_file()  # the prepared HF directory
    for flag, value in (("--served-model-name", "smollm2-135m"), ("--port", "8123"), ("--dtype", "float32"),
                        ("--max-model-len", "2048"), ("--max-num-seqs", "8")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and "--gpu-memory-utilization" not in cmd


def test_server_script_refuses_an_unprepared_or_unknown_model(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "vllm_server.py"), "smollm2-135m", "--cache-dir", str(tmp_path),
         "--print-command"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "cascade models prepare smollm2-135m" in out.stderr


def test_benchmark_summary_and_plot(tmp_path):
    """The benchmark's medians over repeats and its PNG, from runs shaped like a real JSON's."""
    import json

    pytest.importorskip("matplotlib")
    from benchmarks.vllm_throughput import parse_args, requests_per_level, summarize

    args = parse_args(["--tiny"])
    assert args.concurrency == [1, 8, 64] and args.repeats == 2 and args.max_tokens == 8
    assert [requests_per_level(args, c) for c in (1, 8, 64)] == [1, 8, 64]
    full = parse_args([])
    assert [requests_per_level(full, c) for c in (1, 8, 64)] == [32, 32, 256] and full.repeats == 3

    def run(target, k, c, tps, rep):
        return {"target": target, "logprobs": k, "concurrency": c, "repeat": rep, "requests": c, "errors": 0,
                "tokens_per_s": tps, "requests_per_s": tps / 8, "latency_p50_s": 8 / tps, "latency_p99_s": 9 / tps,
                "mean_completion_tokens": 8}

    runs = [run(t, k, c, tps, rep) for t in ("vllm-server", "cascade->vllm-server") for k in (0, 5)
            for c in (1, 8) for rep, tps in enumerate((10.0 * c, 12.0 * c, 20.0 * c))]
    rows = summarize(runs)
    assert len(rows) == 8
    r = next(r for r in rows if r["target"] == "vllm-server" and r["logprobs"] == 5 and r["concurrency"] == 8)
    assert r["tokens_per_s"] == 96.0 and r["tokens_per_s_min"] == 80.0 and r["repeats"] == 3
    result = {"config": {"model": "smollm2-135m", "max_tokens": 8}, "rows": rows, "runs": runs,
              "machine": {"cpu_model": "test", "cores_usable": 2, "gpus": []}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vllm_throughput.py"), "--plot", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "bench.png").stat().st_size > 10_000
