#!/usr/bin/env python3
"""Throughput and latency of vLLM direct vs the cascade over the same vLLM engine.

    python benchmarks/vllm_throughput.py --model MODEL [--concurrency 1 8 64] [--logprobs 0 5] ...
    python benchmarks/vllm_throughput.py --tiny          # CPU smoke size: SmolLM2, a few tokens
    python benchmarks/vllm_throughput.py --plot results/vllm/vllm_throughput_tiny.json   # PNG only

Run it with the interpreter that has vllm (``.venv-vllm/bin/python`` here; the GPU host's venv there).
Requests are chat completions, greedy, a fixed ``max_tokens``, at each concurrency level: ``--requests``
requests (at least one per slot) sent with at most ``concurrency`` in flight. Each measurement repeats
with ``logprobs`` off (0) and with ``top_logprobs=5``. Reported per level: generated tokens/s (all
requests' completion tokens over the level's wall time), requests/s, p50/p99 latency per request. Each
level runs ``--repeats`` times, the targets of a phase taking turns, so that a busy spell of a shared
machine falls on all of them alike; the JSON keeps every run (``runs``) and the medians (``rows``).

Phases (never two engines at once):

``served``  one vLLM OpenAI server (``scripts/vllm_server.py``); over HTTP:
            ``vllm-server``            the server directly (vLLM's own endpoint),
            ``cascade->vllm-server``   the cascade's endpoint (``cascade serve``, a one-tier policy whose
                                       tier is the ``openai`` backend on that same server).
``inproc``  one in-process engine (the ``vllm`` backend's AsyncLLM) inside this process, no HTTP:
            ``asyncllm``               ``AsyncLLM.generate`` directly (what a vLLM user would write),
            ``vllm-backend``           the cascade's vLLM backend on that same engine (chat template,
                                       per-token logprobs mapped to the engine's types),
            ``cascade-engine``         the cascade engine's ``run`` on that same backend (policy,
                                       calibration, ledger write).
``http``    ``cascade serve`` with the in-process ``vllm`` backend (its own engine, same settings):
            ``cascade-http(vllm)``     the production shape on one host, compared with ``vllm-server``.

The one-tier policy always answers from its tier, so every phase generates the same tokens: what
differs is the path. With the cascade, logprobs=0 means no alternatives (the chosen token's logprob is
always computed, the policy needs it). Output: JSON (with machine facts and engine settings) and a PNG
under ``results/vllm/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import (RESULTS, check_out, finish_throughput_plot, int_at_least,  # noqa: E402
                               machine_facts, percentile, rel, replot, stop_processes, write_json)

OUT_DIR = RESULTS / "vllm"
TOPICS = ["a lighthouse keeper", "the first snow of winter", "a robot learning to paint", "an old map",
          "a city under the sea", "a clockmaker's apprentice", "a dragon who cooks", "the last train home",
          "a garden on Mars", "a lost violin", "two rival bakers", "a library that never closes"]
PHASE_TARGETS = {"served": ("vllm-server", "cascade->vllm-server"),
                 "inproc": ("asyncllm", "vllm-backend", "cascade-engine"),
                 "http": ("cascade-http(vllm)",)}


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i // len(TOPICS)})." for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def gpu_facts() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return [x.strip() for x in out.stdout.splitlines() if x.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


# --- load generation ------------------------------------------------------------------------------


async def run_level(call, texts: list[str], concurrency: int) -> dict[str, Any]:
    """Send every text through ``call(text) -> completion_tokens`` with ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    async def one(text: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                n = await call(text)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                return
            latencies.append(time.perf_counter() - t0)
            tokens.append(n)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": len(texts), "ok": len(latencies), "errors": len(errors),
        "error_examples": errors[:3], "wall_s": round(wall, 4), "completion_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 3) if wall > 0 else None,
        "requests_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
        "latency_mean_s": round(sum(latencies) / len(latencies), 4) if latencies else None,
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
    }


def requests_per_level(args: argparse.Namespace, concurrency: int) -> int:
    if args.requests:
        return max(args.requests, concurrency)
    return concurrency if args.tiny else max(4 * concurrency, 32)


async def measure(targets: dict[str, Any], args: argparse.Namespace, log) -> list[dict[str, Any]]:
    """Every level of every target, ``--repeats`` times, the targets of a phase taking turns (in a
    rotating order) so that a slow spell of a shared machine falls on all of them alike."""
    runs = []
    names = list(targets)
    for k in args.logprobs:
        calls = {name: make(k) for name, make in targets.items()}
        for name in names:
            await calls[name](prompts(1)[0])  # warm-up: the first request of a path pays one-time costs
        for conc in args.concurrency:
            n = requests_per_level(args, conc)
            for rep in range(args.repeats):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    row = await run_level(calls[name], prompts(n), conc)
                    row.update(target=name, logprobs=k, repeat=rep)
                    runs.append(row)
                    log(f"  {name:24s} logprobs={k}  c={conc:3d}  n={n:4d}  rep {rep}  {row['tokens_per_s']!s:>9} "
                        f"tok/s  p50 {row['latency_p50_s']:.3f} s  p99 {row['latency_p99_s']:.3f} s  "
                        f"errors {row['errors']}")
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, logprobs, concurrency): the median over the repeats, and their spread."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["logprobs"], r["concurrency"]), []).append(r)
    rows = []
    for (target, k, conc), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs if r["tokens_per_s"] is not None]
        rows.append({
            "target": target, "logprobs": k, "concurrency": conc, "repeats": len(rs),
            "requests": rs[0]["requests"], "errors": sum(r["errors"] for r in rs),
            "tokens_per_s": round(statistics.median(tps), 3) if tps else None,
            "tokens_per_s_min": min(tps) if tps else None, "tokens_per_s_max": max(tps) if tps else None,
            "requests_per_s": round(statistics.median(r["requests_per_s"] for r in rs), 3),
            "latency_p50_s": round(statistics.median(r["latency_p50_s"] for r in rs), 4),
            "latency_p99_s": round(statistics.median(r["latency_p99_s"] for r in rs), 4),
            "mean_completion_tokens": rs[0]["mean_completion_tokens"],
        })
    return rows


def openai_caller(base_url: str, model: str, max_tokens: int, concurrency: int):
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(
                                    max_connections=concurrency + 16, max_keepalive_connections=concurrency + 16),
                                    timeout=3600))

    def make_call(k: int):
        async def call(text: str) -> int:
            kw: dict[str, Any] = {"logprobs": True, "top_logprobs": k} if k else {}
            resp = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                temperature=0.0, **kw)
            if k:
                content = resp.choices[0].logprobs.content
                assert content and len(content[0].top_logprobs) == k, "no logprobs in the answer"
            return resp.usage.completion_tokens
        return call

    return client, make_call


# --- servers --------------------------------------------------------------------------------------


class Proc:
    """A server subprocess; its logs go to a file under the work dir."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=REPO,
                                     stdin=subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line.decode(errors="replace"))
            self.log.write(line)

    def stop(self) -> None:
        stop_processes([self.proc], grace_s=60.0)
        self.log.close()


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.proc.returncode}); see {proc.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready within {timeout:g} s; see {proc.log_path}")


def start_vllm_server(args: argparse.Namespace, work: Path) -> tuple[Proc, str, float]:
    cmd = [sys.executable, str(REPO / "scripts" / "vllm_server.py"), args.model, "--served-model-name",
           args.model, "--health-timeout", "1200"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--", "--max-num-seqs", str(max(args.concurrency + [8]))]
    t0 = time.perf_counter()
    proc = Proc(cmd, work / "vllm-server.log")
    try:
        url = proc.lines.get(timeout=1260).strip()
    except queue.Empty:
        proc.stop()
        raise RuntimeError(f"vllm_server.py printed no URL; see {proc.log_path}") from None
    if not url.startswith("http"):
        proc.stop()
        raise RuntimeError(f"vllm_server.py: {url!r}; see {proc.log_path}")
    return proc, url, time.perf_counter() - t0


def cascade_config(work: Path, name: str, tier: dict[str, Any], port: int) -> Path:
    import yaml

    cfg = {"server": {"host": "127.0.0.1", "port": port, "log_level": "warning", "max_tokens_limit": 32768},
           "ledger": {"path": str(work / f"{name}-ledger.sqlite")},
           "tiers": [tier], "policies": {"bench": {"chain": [tier["name"]]}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_cascade(config: Path, port: int, work: Path, name: str, timeout: float) -> tuple[Proc, str, float]:
    cascade_bin = Path(sys.executable).with_name("cascade")
    cmd = [str(cascade_bin), "serve", "--config", str(config)] if cascade_bin.exists() else \
        [sys.executable, "-c", "import sys; from cascade.cli import main; sys.exit(main())", "serve",
         "--config", str(config)]
    t0 = time.perf_counter()
    proc = Proc(cmd, work / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/ready", proc, timeout)
    return proc, base + "/v1", time.perf_counter() - t0


def vllm_tier_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_num_seqs": max(args.concurrency + [8])}
    if args.max_model_len:
        opts["max_model_len"] = args.max_model_len
    if args.dtype:
        opts["dtype"] = args.dtype
    if args.gpu_memory_utilization:
        opts["gpu_memory_utilization"] = args.gpu_memory_utilization
    return opts


# --- phases ---------------------------------------------------------------------------------------


async def phase_served(args, work: Path, log) -> tuple[list[dict], dict]:
    proc, url, started = start_vllm_server(args, work)
    facts: dict[str, Any] = {"vllm_server_start_s": round(started, 1), "vllm_server_url": url}
    log(f"vLLM server healthy after {started:.1f} s at {url}")
    clients = []
    casc = None
    targets: dict[str, Any] = {}
    try:
        if "vllm-server" in args.targets:
            client, targets["vllm-server"] = openai_caller(url, args.model, args.max_tokens, max(args.concurrency))
            clients.append(client)
        if "cascade->vllm-server" in args.targets:
            port = free_port()
            tier = {"name": "small", "backend": "openai", "model": args.model, "max_tokens": args.max_tokens,
                    "top_logprobs": 0, "timeout_s": 3600, "options": {"base_url": url}}
            casc, curl, cstart = start_cascade(cascade_config(work, "cascade-served", tier, port), port, work,
                                               "cascade-served", 300)
            facts["cascade_served_start_s"] = round(cstart, 1)
            client, targets["cascade->vllm-server"] = openai_caller(curl, "bench", args.max_tokens,
                                                                    max(args.concurrency))
            clients.append(client)
        runs = await measure(targets, args, log)
    finally:
        for c in clients:
            await c.close()
        if casc is not None:
            casc.stop()
        proc.stop()
    return runs, facts


async def phase_inproc(args, work: Path, log) -> tuple[list[dict], dict]:
    from cascade.config import parse_config
    from cascade.engine import Engine
    from cascade.types import GenerationRequest, Message

    tier = {"name": "small", "backend": "vllm", "model": args.model, "max_tokens": args.max_tokens,
            "top_logprobs": 0, "timeout_s": 3600, "options": vllm_tier_options(args)}
    cfg = parse_config({"ledger": {"path": str(work / "inproc-ledger.sqlite")}, "tiers": [tier],
                        "policies": {"bench": {"chain": ["small"]}}}, source="<benchmark>", environ={})
    eng = await Engine.open(cfg)
    targets: dict[str, Any] = {}
    try:
        backend = eng.tiers["small"].backend
        await backend.start()
        facts = {"inproc_engine_start_s": round(backend.start_seconds or 0, 1),
                 "engine_arguments": backend.engine_arguments}
        log(f"in-process vLLM engine started in {backend.start_seconds:.1f} s")
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        def req(text: str, k: int) -> GenerationRequest:
            return GenerationRequest(messages=(Message("user", text),), max_tokens=args.max_tokens,
                                     top_logprobs=k)

        if "asyncllm" in args.targets:
            counter = iter(range(10**9))

            def make_direct(k: int):
                async def call(text: str) -> int:
                    ids = backend._prompt_ids(req(text, k))
                    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=k or None,
                                            output_kind=RequestOutputKind.FINAL_ONLY)
                    out = None
                    async for out in backend.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                             f"direct-{next(counter)}"):
                        pass
                    c = out.outputs[0]
                    if k:
                        assert c.logprobs and len(c.logprobs) == len(c.token_ids)
                    return len(c.token_ids)
                return call

            targets["asyncllm"] = make_direct
        if "vllm-backend" in args.targets:
            def make_backend(k: int):
                async def call(text: str) -> int:
                    res = await backend.generate(req(text, k))
                    return res.usage.completion_tokens
                return call

            targets["vllm-backend"] = make_backend
        if "cascade-engine" in args.targets:
            def make_engine(k: int):
                async def call(text: str) -> int:
                    out = await eng.run(req(text, k), model="bench")
                    return out.record.completion_tokens
                return call

            targets["cascade-engine"] = make_engine
        runs = await measure(targets, args, log)
    finally:
        await eng.close()
    return runs, facts


async def phase_http(args, work: Path, log) -> tuple[list[dict], dict]:
    port = free_port()
    tier = {"name": "small", "backend": "vllm", "model": args.model, "max_tokens": args.max_tokens,
            "top_logprobs": 0, "timeout_s": 3600, "options": vllm_tier_options(args)}
    casc, curl, cstart = start_cascade(cascade_config(work, "cascade-vllm", tier, port), port, work,
                                       "cascade-vllm", 1200)
    log(f"cascade server with the in-process vLLM backend ready after {cstart:.1f} s")
    client, make_call = openai_caller(curl, "bench", args.max_tokens, max(args.concurrency))
    try:
        runs = await measure({"cascade-http(vllm)": make_call}, args, log)
    finally:
        await client.close()
        casc.stop()
    return runs, {"cascade_http_vllm_start_s": round(cstart, 1)}


# --- output ---------------------------------------------------------------------------------------


def plot(result: dict[str, Any], png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed here: no PNG. Run `python {rel(__file__)} --plot JSON` in a venv "
              "with matplotlib (the main .venv has it).", file=sys.stderr)
        return None
    rows = result["rows"]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, target in enumerate(targets):
        for k, style in ((0, "--"), (5, "-")):
            rs = sorted((r for r in rows if r["target"] == target and r["logprobs"] == k),
                        key=lambda r: r["concurrency"])
            if not rs:
                continue
            xs = [r["concurrency"] for r in rs]
            label = f"{target} (logprobs={k})"
            axes[0].plot(xs, [r["tokens_per_s"] for r in rs], style, marker="o", color=colors[i % len(colors)],
                         label=label)
            axes[1].plot(xs, [r["latency_p50_s"] for r in rs], style, marker="o", color=colors[i % len(colors)],
                         label=f"{label} p50")
            axes[1].plot(xs, [r["latency_p99_s"] for r in rs], style, marker="x", color=colors[i % len(colors)],
                         alpha=0.5)
    return finish_throughput_plot(
        plt, fig, axes, f"vLLM direct vs cascade: {result['config']['model']}, "
        f"max_tokens={result['config']['max_tokens']}", result["machine"], png)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parse(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="catalog id, HF directory or hub name (default: smollm2-135m)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke size: SmolLM2, max_tokens 8, few requests")
    p.add_argument("--concurrency", type=int_at_least(1), nargs="+", default=None, help="default 1 8 64")
    p.add_argument("--logprobs", type=int_at_least(0), nargs="+", default=[0, 5],
                   help="top logprobs per token (default 0 5)")
    p.add_argument("--requests", type=int_at_least(1), default=None,
                   help="requests per level, at least the concurrency (default: 4x the concurrency and at "
                        "least 32; --tiny: the concurrency, one wave)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None, help="default 128 (--tiny: 8)")
    p.add_argument("--repeats", type=int_at_least(1), default=None,
                   help="runs of each level, medians reported (default 3, --tiny: 2)")
    p.add_argument("--phases", nargs="+", choices=list(PHASE_TARGETS), default=list(PHASE_TARGETS))
    p.add_argument("--targets", nargs="+", default=None, help="subset of the phases' targets")
    p.add_argument("--max-model-len", type=int, default=None, help="default 2048 (--tiny), else the model's")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU: fraction per engine (one engine runs at a time)")
    p.add_argument("--out", default=None, help="JSON path (default results/vllm/vllm_throughput_<size>.json)")
    p.add_argument("--plot", metavar="JSON", default=None, help="only draw the PNG of an existing JSON")
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.out is not None and not args.plot:
        check_out(p, args.out)  # before the run (vLLM's start alone takes minutes), not after it
    args.model = args.model or "smollm2-135m"
    if args.tiny:
        args.concurrency = args.concurrency or [1, 8, 64]
        args.max_tokens = args.max_tokens or 8
        args.max_model_len = args.max_model_len or 2048
        args.repeats = args.repeats or 2
    else:
        args.repeats = args.repeats or 3
        args.concurrency = args.concurrency or [1, 8, 64]
        args.max_tokens = args.max_tokens or 128
    known = [t for ph in args.phases for t in PHASE_TARGETS[ph]]
    args.targets = args.targets or known
    bad = [t for t in args.targets if t not in known]
    if bad:
        p.error(f"unknown target(s) {bad} for phases {args.phases}; known: {known}")
    return args


async def amain(args: argparse.Namespace) -> int:
    size = "tiny" if args.tiny else ("gpu" if has_gpu() else "cpu")
    out = Path(args.out) if args.out else OUT_DIR / f"vllm_throughput_{size}.json"
    try:
        import vllm
    except ImportError:
        print("vllm_throughput: error: vllm is not installed in this environment: run it with .venv-vllm/bin/python "
              "(`make setup-vllm`, docs/vllm.md)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "benchmark": "vllm_throughput",
        "config": {"model": args.model, "size": size, "concurrency": args.concurrency, "logprobs": args.logprobs,
                   "requests_per_level": {c: requests_per_level(args, c) for c in args.concurrency},
                   "max_tokens": args.max_tokens, "repeats": args.repeats,
                   "max_model_len": args.max_model_len, "dtype": args.dtype, "phases": args.phases,
                   "targets": args.targets, "temperature": 0.0},
        "machine": machine_facts([args.model], gpus=gpu_facts(), vllm_version=vllm.__version__,
                                 vllm_env={k: v for k, v in os.environ.items() if k.startswith("VLLM_")}),
        "facts": {}, "rows": [], "runs": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        work = Path(tmp)
        for phase in args.phases:
            if not any(t in args.targets for t in PHASE_TARGETS[phase]):
                continue
            log(f"phase {phase}")
            fn = {"served": phase_served, "inproc": phase_inproc, "http": phase_http}[phase]
            runs, facts = await fn(args, work, log)
            result["runs"] += runs
            result["rows"] = summarize(result["runs"])
            result["facts"].update(facts)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(out, result)  # partial results survive a later failure
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, result)
    log(f"wrote {rel(out)} ({result['wall_s']} s)")
    png = plot(result, out.with_suffix(".png"))
    if png:
        log(f"wrote {rel(png)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = _parse(p, argv)
    if args.plot:
        src = Path(args.plot)
        png = replot(p, plot, src, Path(args.out or src).with_suffix(".png"))
        return 0 if png else 1
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
