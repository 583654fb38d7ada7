#!/usr/bin/env python3
"""Throughput of the transformers backend on a device (a GPU host without vLLM, or the CPU), and whether its
confidence there is the confidence the calibrator was fitted on.

    python benchmarks/transformers_throughput.py --model smollm2-135m --device cuda --dtype float32 bfloat16
    python benchmarks/transformers_throughput.py --random-init qwen2.5-coder-1.5b --device cuda --dtype bfloat16
    python benchmarks/transformers_throughput.py --tiny          # CPU smoke size: SmolLM2, a few tokens
    python benchmarks/transformers_throughput.py --plot results/gpu/transformers_throughput.json   # PNG only

``--model`` takes a prepared catalog id or a model directory. ``--random-init`` takes the same but keeps only
the architecture and the tokenizer: the weights are drawn at random (seeded), so a model whose weights cannot
reach the host is still measured at its real size. Its answers are noise and run to ``--max-tokens``; only its
speed means anything.

Throughput: the cascade's own ``TransformersBackend`` (chat template, batching of waiting requests, the logprob
of every token and ``top_logprobs=5`` alternatives), greedy chat completions of a fixed ``--max-tokens``, at
each concurrency level (``--requests`` per level, at most ``concurrency`` in flight; ``max_batch_size`` is the
largest level). Each level first runs one untimed batch of its size (``warmup_s``). Reported per level:
generated tokens/s, requests/s, p50/p99 latency; per model, load time and the device's peak memory.

``--lengths mixed`` (the default) gives every prompt a filler of seeded random length (0-200 words), the
warm-up other lengths than the timed requests, as a server's traffic does: on a GPU a kernel that prepares
itself per shape pays again for every new prompt length. ``--lengths same`` sends prompts of nearly one
length, whose shapes the warm-up has already met (the first GPU session's figures were taken so). At
large concurrency the widest of many mixed prompts is near the top of the range in every batch, so batch
widths differ little there: mixed lengths show new shapes best at low concurrency.
``--stream`` sends every request streamed and adds each level's time to the first token (p50, p99).
``--cudnn-attention off on`` measures both settings of the tier option (off, the default, keeps torch's
attention off cuDNN's kernel on CUDA).

Parity (``--parity N``, real weights on a device other than the CPU): the same N short questions answered on
the device and on the CPU in float32 (the setting the calibration data were produced with): how many answers
are the same text, and by how much the per-token logprobs and the policy's features (mean and min token
logprob) differ where they are. A calibrator is a function of those features: if they move, its
confidence moves with them.

Output: JSON (machine facts, GPUs, settings, every row) and a PNG under ``results/gpu/`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import (RESULTS, check_out, finish_throughput_plot, int_at_least, machine_facts,  # noqa: E402
                               percentile, rel, replot, write_json)
from benchmarks.vllm_throughput import gpu_facts, prompts, run_level  # noqa: E402

OUT_DIR = RESULTS / "gpu"
TOP_LOGPROBS = 5
FILLER = ("amber basalt cedar delta ember fjord garnet harbor indigo juniper kelp lagoon meadow nectar onyx prairie "
          "quartz river sierra tundra umber valley willow xenon yarrow zephyr").split()
CAPITALS = ["France", "Italy", "Japan", "Canada", "Egypt", "Peru", "Kenya", "Norway", "Chile", "Vietnam"]


def parity_questions(n: int) -> list[str]:
    """Short questions with short answers (sums and capitals), the same ones on every run."""
    out = []
    for i in range(n):
        if i % 2:
            out.append(f"What is the capital of {CAPITALS[(i // 2) % len(CAPITALS)]}? Answer in one word.")
        else:
            a, b = 17 + 37 * i, 205 + 91 * i
            out.append(f"What is {a} + {b}? Answer with the number only.")
    return out


def level_prompts(n: int, lengths: str, seed: int) -> list[str]:
    """``n`` story prompts; ``mixed``: each with a filler of 0-200 words drawn by ``seed`` (its own per use)."""
    texts = prompts(n)
    if lengths == "same":
        return texts
    rng = random.Random(seed)
    return [f"{t} Use some of these words: {' '.join(FILLER[j % len(FILLER)] for j in range(rng.randint(0, 200)))}."
            for t in texts]


def chat(text: str, max_tokens: int) -> Any:
    from cascade.types import GenerationRequest, Message

    return GenerationRequest(messages=(Message("user", text),), max_tokens=max_tokens, temperature=0.0,
                             top_logprobs=TOP_LOGPROBS)


def backend_for(path: Path, *, device: str, dtype: str, batch: int, name: str, cudnn_attention: bool = False) -> Any:
    from cascade.backends.transformers_backend import TransformersBackend

    return TransformersBackend(model=str(path), name=name, device=device, dtype=dtype, max_batch_size=batch,
                               cudnn_attention=cudnn_attention)


def random_weights(source: Path, dest: Path, dtype: str, device: str) -> Path:
    """A model directory with ``source``'s architecture and tokenizer and seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(source))
    torch.manual_seed(0)
    with torch.device(device):  # drawing a 1.5B model's weights on a CPU takes minutes; on a GPU, a moment
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
    try:
        GenerationConfig.from_pretrained(str(source)).save_pretrained(str(dest))
    except OSError:
        pass
    del model
    gc.collect()
    return dest


def device_memory(device: str) -> dict[str, float] | None:
    """The peak memory on ``device`` (GiB) since :func:`reset_device_memory`; None on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def reset_device_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


async def throughput(label: str, path: Path, dtype: str, cudnn: bool, args: argparse.Namespace,
                     log) -> dict[str, Any]:
    reset_device_memory(args.device)
    backend = backend_for(path, device=args.device, dtype=dtype, batch=max(args.concurrency), name=label,
                          cudnn_attention=cudnn)
    t0 = time.perf_counter()
    await backend.start()
    load_s = time.perf_counter() - t0
    rows = []
    ttfts: list[float] = []  # --stream: each streamed request's time to its first token
    try:
        async def call(text: str) -> int:
            if not args.stream:
                return (await backend.generate(chat(text, args.max_tokens))).usage.completion_tokens
            t0, first, n = time.perf_counter(), None, 0
            async for chunk in backend.stream(chat(text, args.max_tokens)):
                if chunk.tokens and first is None:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            ttfts.append(time.perf_counter() - t0 if first is None else first)
            return n

        for c in args.concurrency:
            # warm-up: one full batch of this level, not counted (warmup_s: the first batch of a new size)
            t0 = time.perf_counter()
            await asyncio.gather(*(call(t) for t in level_prompts(c, args.lengths, seed=2 * c)))
            warmup_s = time.perf_counter() - t0
            n = max(args.requests or 2 * c, c)
            ttfts.clear()
            row = await run_level(call, level_prompts(n, args.lengths, seed=2 * c + 1), c)
            row.update(model=label, dtype=dtype, device=backend.device, warmup_s=round(warmup_s, 3),
                       cudnn_attention=cudnn, lengths=args.lengths, stream=args.stream)
            if args.stream:
                row.update(ttft_p50_s=round(percentile(ttfts, 50), 4), ttft_p99_s=round(percentile(ttfts, 99), 4))
            rows.append(row)
            ttft_note = f"  first token p50 {row['ttft_p50_s']} s" if args.stream else ""
            log(f"  {label} {dtype}{' cudnn-attn' if cudnn else ''} c={c:<3} {row['tokens_per_s']:>9} tok/s  "
                f"{row['requests_per_s']:>7} req/s  "
                f"p50 {row['latency_p50_s']} s  p99 {row['latency_p99_s']} s{ttft_note}  warm-up {row['warmup_s']} s  "
                f"errors {row['errors']}")
    finally:
        device = backend.device
        await backend.close()
        del backend
    return {"model": label, "dtype": dtype, "cudnn_attention": cudnn, "device": device, "load_s": round(load_s, 2),
            "memory": device_memory(args.device), "rows": rows}


async def answers(path: Path, *, device: str, dtype: str, questions: list[str], max_tokens: int) -> list[Any]:
    backend = backend_for(path, device=device, dtype=dtype, batch=8, name=f"parity-{device}-{dtype}")
    await backend.start()
    try:
        return list(await asyncio.gather(*(backend.generate(chat(q, max_tokens)) for q in questions)))
    finally:
        await backend.close()


def compare(device_answers: list[Any], cpu_answers: list[Any]) -> dict[str, Any]:
    """Same text? And the logprob gaps over the tokens both answers share (their common prefix)."""
    token_gaps: list[float] = []
    mean_gaps: list[float] = []
    min_gaps: list[float] = []
    same = 0
    for d, c in zip(device_answers, cpu_answers, strict=True):
        for a, b in zip(d.tokens, c.tokens):
            if a.token_id != b.token_id:
                break
            token_gaps.append(abs(a.logprob - b.logprob))
        if d.text == c.text and d.tokens:
            same += 1
            lp_d = [t.logprob for t in d.tokens]
            lp_c = [t.logprob for t in c.tokens]
            mean_gaps.append(abs(sum(lp_d) / len(lp_d) - sum(lp_c) / len(lp_c)))
            min_gaps.append(abs(min(lp_d) - min(lp_c)))

    def stats(xs: list[float]) -> dict[str, float | None]:
        return {"median": round(percentile(xs, 50), 6) if xs else None,
                "p95": round(percentile(xs, 95), 6) if xs else None, "max": round(max(xs), 6) if xs else None}

    return {"questions": len(cpu_answers), "same_text": same, "shared_tokens": len(token_gaps),
            "token_logprob_abs_diff": stats(token_gaps), "mean_logprob_abs_diff": stats(mean_gaps),
            "min_logprob_abs_diff": stats(min_gaps),
            "examples": [{"device": d.text, "cpu": c.text} for d, c in zip(device_answers[:4], cpu_answers[:4])]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from cascade.backends.transformers_backend import auto_device
    from cascade.models import resolve_model_path

    log = (lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.device == "auto":
        args.device = auto_device()
    work = Path(tempfile.mkdtemp(prefix="cascade-tt-"))

    def name_of(m: str) -> str:  # a catalog id as is, a directory by its name
        return Path(m).name if "/" in m else m

    models: list[tuple[str, Path, bool]] = [(name_of(m), resolve_model_path(m), False) for m in args.model]
    models += [(f"{name_of(m)} (random weights)", resolve_model_path(m), True) for m in args.random_init]
    results, parity = [], []
    try:
        for label, path, random_init in models:
            if random_init:
                t0 = time.perf_counter()
                path = random_weights(path, work / f"random-{len(results)}", args.dtype[0], args.device)
                log(f"{label}: random weights drawn and saved in {time.perf_counter() - t0:.1f} s")
            for dtype in args.dtype:
                for cudnn in args.cudnn_attention:
                    log(f"{label} on {args.device}, {dtype}, cuDNN attention {'on' if cudnn else 'off'}")
                    results.append(await throughput(label, path, dtype, cudnn, args, log))
                if args.parity and not random_init and args.device != "cpu":
                    qs = parity_questions(args.parity)
                    dev = await answers(path, device=args.device, dtype=dtype, questions=qs, max_tokens=24)
                    ref = await answers(path, device="cpu", dtype="float32", questions=qs, max_tokens=24)
                    p = {"model": label, "device": args.device, "dtype": dtype, "reference": "cpu float32",
                         "cudnn_attention": False,
                         **compare(dev, ref)}
                    parity.append(p)
                    log(f"  parity vs CPU float32: {p['same_text']}/{p['questions']} same text; token logprob "
                        f"|diff| median {p['token_logprob_abs_diff']['median']}, max "
                        f"{p['token_logprob_abs_diff']['max']}; mean-logprob |diff| max "
                        f"{p['mean_logprob_abs_diff']['max']}")
            if random_init:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "transformers_throughput",
        "machine": machine_facts(models=[m for m, _, _ in models], gpus=gpu_facts()),
        "config": {"device": args.device, "dtypes": args.dtype, "concurrency": args.concurrency,
                   "max_tokens": args.max_tokens, "requests": args.requests, "top_logprobs": TOP_LOGPROBS,
                   "parity_questions": args.parity, "max_batch_size": max(args.concurrency),
                   "lengths": args.lengths, "cudnn_attention": args.cudnn_attention, "stream": args.stream},
        "models": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "rows": [row for r in results for row in r["rows"]],
        "parity": parity,
    }


def plot(result: dict[str, Any], png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed here: no PNG. Run `python {rel(__file__)} --plot JSON` where it is.",
              file=sys.stderr)
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    both = len(result["config"].get("cudnn_attention") or []) > 1  # the attention setting named when it varies

    def key_of(r: dict[str, Any]) -> tuple:
        return r["model"], r["dtype"], r.get("cudnn_attention", False)

    for key in dict.fromkeys(key_of(r) for r in rows):
        rs = sorted((r for r in rows if key_of(r) == key), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rs]
        label = f"{key[0]} {key[1]}" + (f" cuDNN attention {'on' if key[2] else 'off'}" if both else "")
        line, = axes[0].plot(xs, [r["tokens_per_s"] for r in rs], marker="o", label=label)
        axes[1].plot(xs, [r["latency_p50_s"] for r in rs], marker="o", color=line.get_color())
        axes[1].plot(xs, [r["latency_p99_s"] for r in rs], marker="x", color=line.get_color(), alpha=0.5)
    cfg = result["config"]
    return finish_throughput_plot(
        plt, fig, axes, f"transformers backend on {cfg['device']}, max_tokens={cfg['max_tokens']}, "
        f"top_logprobs={cfg['top_logprobs']}, prompt lengths {cfg.get('lengths', 'same')}", result["machine"], png,
        xlabel="concurrent requests (max_batch_size = largest level)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="catalog id or model directory (repeatable)")
    ap.add_argument("--random-init", action="append", default=[], metavar="MODEL",
                    help="catalog id or model directory whose architecture is measured with random weights")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default; --tiny: cpu)")
    ap.add_argument("--dtype", nargs="+", default=None, help="float32 bfloat16 float16 (default: float32)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default 1 8 32)")
    ap.add_argument("--max-tokens", type=int_at_least(1), default=None, help="tokens per answer (default 128)")
    ap.add_argument("--requests", type=int_at_least(1), default=None,
                    help="requests per level (default 2 x concurrency)")
    ap.add_argument("--parity", type=int_at_least(0), default=None, metavar="N",
                    help="N questions answered on the device and on the CPU in float32, compared (default 16)")
    ap.add_argument("--lengths", choices=("mixed", "same"), default="mixed",
                    help="prompt lengths: mixed (seeded random fillers, the default) or nearly the same")
    ap.add_argument("--stream", action="store_true",
                    help="streamed requests (each row adds their time to the first token, p50 and p99)")
    ap.add_argument("--cudnn-attention", nargs="+", choices=("off", "on"), default=["off"],
                    help="the tier option cudnn_attention, each setting measured (default off)")
    ap.add_argument("--tiny", action="store_true", help="smoke size: SmolLM2 on the CPU, 2 levels, a few tokens")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON and the PNG (default results/gpu; with "
                    "--plot: beside the JSON)")
    ap.add_argument("--name", default=None, help="file name stem (default transformers_throughput[_tiny])")
    ap.add_argument("--plot", type=Path, default=None, metavar="JSON", help="only redraw the PNG of a JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.plot:
        png = replot(ap, plot, args.plot, (args.out / args.plot.name if args.out else args.plot).with_suffix(".png"))
        print(png or "no PNG")
        return 0
    args.out = args.out or OUT_DIR
    stem = args.name or ("transformers_throughput_tiny" if args.tiny else "transformers_throughput")
    check_out(ap, str(args.out / f"{stem}.json"))  # before the run, not after its minutes
    if args.tiny:
        args.device = args.device or "cpu"
        args.model = args.model or ["smollm2-135m"]
        args.concurrency = args.concurrency or [1, 2]
        args.max_tokens = args.max_tokens or 4
        args.parity = 4 if args.parity is None else args.parity
    if not args.model and not args.random_init:
        ap.error("name a model: --model ID_OR_DIR and/or --random-init ID_OR_DIR (or --tiny)")
    args.device = args.device or "auto"
    args.dtype = args.dtype or ["float32"]
    args.cudnn_attention = [v == "on" for v in dict.fromkeys(args.cudnn_attention)]
    args.concurrency = sorted(set(args.concurrency or [1, 8, 32]))
    args.max_tokens = args.max_tokens or 128
    args.parity = 16 if args.parity is None else args.parity
    if min(args.concurrency) < 1 or args.max_tokens < 1:
        ap.error("--concurrency and --max-tokens must be at least 1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: torch sees no CUDA device on this machine")
    from cascade.errors import CascadeError

    try:
        result = asyncio.run(run(args))
    except CascadeError as exc:
        print(f"transformers_throughput: {exc}", file=sys.stderr)
        return 2
    path = write_json(args.out / f"{stem}.json", result)
    png = plot(result, path.with_suffix(".png"))
    print(rel(path))
    if png:
        print(rel(png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
