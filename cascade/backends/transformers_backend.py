"""The transformers backend: a Hugging Face transformers model, run in-process with torch.

The CPU fallback (tests, laptops) and, with ``device: cuda``, a GPU tier where vLLM is not installed.

* Real forward passes; token logprobs are ``log_softmax`` of the model's raw logits at each step (the raw
  distribution, at temperature 1 and before top_p, whatever the sampling settings), so in float32 they equal
  a direct forward pass over prompt + answer (tested to 1e-4; in bfloat16 the cached, padded steps round
  differently, by up to a few tenths of a nat).
* Requests that wait while the model is busy are generated together in one left-padded batch, streamed or
  not (same sampling settings only; greedy by default; a seeded sampled request runs alone); a batch about
  to start waits a moment for requests arriving with it (``batch_wait_ms``), and a request, streamed or not,
  is answered once its own row ends, not once its batch does.
* All transformers backends of a process share one compute thread: on a small CPU, two models generating
  at once only fight over the same cores (and on one GPU, over its streams).
* A request whose caller goes away (cancelled task: client disconnect, latency budget) stops its row at the
  next token, and its batch once every row has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cascade.backends import LOCAL_INSTALL_HINT, missing_modules
from cascade.backends.base import (InProcessBackend, StartOnce, TokenBytes, TokenTexts, option_int,
                                   tier_options)
from cascade.errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthExceededError,
    ModelNotPreparedError,
    ProviderServerError,
)
from cascade.types import (
    GenerationRequest,
    GenerationResult,
    HeldTokens,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
    fit_tokens,
    stop_prefix_at_end,
)

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|auto|cuda(:(0|[1-9][0-9]*))?")


#: the libraries a model load imports: an install without them (the base install serves hosted tiers only)
#: gets one line naming what is missing and how to install it, before any ledger or banner
_LIBRARIES = ("torch", "transformers")


def missing_libraries() -> list[str]:
    """Which of torch and transformers cannot be imported here (nothing is imported)."""
    return missing_modules(*_LIBRARIES)


def _unavailable(tier: str, missing: list[str]) -> BackendUnavailableError:
    return BackendUnavailableError(f"tier {tier!r}: the transformers backend needs {' and '.join(missing)}, "
                                   f"which {'is' if len(missing) == 1 else 'are'} not installed: {LOCAL_INSTALL_HINT}")


def auto_device() -> str:
    """What ``device: auto`` picks: ``cuda`` when torch sees a CUDA device, else ``cpu`` (imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokens_to(pieces: list[str], end: int) -> int:
    """How many of the text pieces (one per token) it takes to cover the first ``end`` characters."""
    pos = 0
    for i, piece in enumerate(pieces):
        pos += len(piece)
        if pos >= end:
            return i + 1
    return len(pieces)


#: the longest a batch about to start waits for requests arriving together (``_gather``): a few short prompts
#: take milliseconds to tokenize, a step of a model on a GPU about 20 ms; a 1 MB prompt (half a second to
#: tokenize) holds no one longer
GATHER_S = 0.05
_compute_lock = threading.Lock()
_shared_executor: ThreadPoolExecutor | None = None


def _compute_executor() -> ThreadPoolExecutor:
    """One process-wide thread for torch compute (created on first use, not at import)."""
    global _shared_executor
    with _compute_lock:
        if _shared_executor is None:
            _shared_executor = ThreadPoolExecutor(1, thread_name_prefix="cascade-torch")
        return _shared_executor


def _retrieve(fut: asyncio.Future) -> None:
    """Mark ``fut``'s exception as seen (asyncio logs an unseen one when the future is collected)."""
    if not fut.cancelled():
        fut.exception()


@contextlib.contextmanager
def _without_cudnn_attention(torch: Any, device: Any, allowed: bool) -> Iterator[None]:
    """Keep torch's scaled-dot-product attention off cuDNN's kernel while a CUDA generation runs.

    cuDNN's attention builds an execution graph for every new shape, and a generation meets new shapes all
    the time: the keys grow by one token a step, and every batch's prompt width differs. Measured on an H200
    (torch 2.11, cuDNN 9.19, docs/gpu.md): each new key length cost cuDNN's kernel 64-68 ms, and a bfloat16
    tier answering prompts of mixed lengths generated 14 / 137 / 1201 tokens/s at 1 / 8 / 64 concurrent
    requests with it against 39 / 277 / 1791 without it. The switch is process-wide while on; the transformers
    backends' one compute thread is the only one that runs torch models in this process.
    """
    if allowed or device.type != "cuda":
        yield
        return
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


_CLOSED = object()  # put on a live stream's queue by close()

#: one request's answer from a batch: (text, tokens, finish reason, seconds to first token, tokens generated),
#: or the error that answers it
_BatchResult = tuple[str, tuple[TokenLogprob, ...], str, float, int] | ProviderServerError

#: a temperature below this samples as greedy decoding, as vLLM does (its _SAMPLING_EPS): dividing the logits by
#: 1e-45 overflows to inf and the sampler fails on the NaN probabilities that follow
SAMPLING_EPS = 1e-5


def _samples(request: GenerationRequest) -> bool:
    return request.temperature >= SAMPLING_EPS


@contextlib.contextmanager
def _seeded(torch: Any, device: Any, seed: int | None) -> Iterator[None]:
    """Run a seeded generation on a private copy of torch's random state: seeded from ``seed`` (any integer;
    torch takes only 64-bit ones: larger ones are reduced), and the state from before put back after, so a
    seeded request neither depends on nor fixes what later unseeded ones draw. (``generate`` of this
    transformers takes no generator of its own.) Nothing is done without a seed."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda" if cuda else None):
        torch.default_generator.manual_seed(seed % 2**64)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed % 2**64)
        yield


@dataclass
class _Pending:
    request: GenerationRequest
    prompt_ids: list[int]
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    #: a stream's: its tokens go here as they are generated, ``(token_id, logprob, top)``, then None once its
    #: row ends (put by the compute thread through ``loop``; by the worker when the batch failed)
    queue: asyncio.Queue | None = None
    #: the caller's loop, through which the compute thread answers it as soon as its row ends
    loop: asyncio.AbstractEventLoop | None = None
    started: float = 0.0  # when its batch started (the worker sets it)

    def batch_key(self) -> tuple:
        """Requests with equal keys may share a batch. A seeded sampled request runs alone: a batch draws its
        random numbers for all its rows at once, so a seeded answer would depend on what shared its batch."""
        r = self.request
        if not _samples(r):
            sampling: tuple = ("greedy",)
        elif r.seed is not None:
            sampling = ("seeded", id(self))
        else:
            sampling = ("sample", r.temperature, r.top_p)
        return sampling + (tuple(r.stop),)


#: most torch threads a tier may ask for (``options.threads``)
MAX_THREADS = 1024


class TransformersBackend(InProcessBackend):
    kind = "transformers"

    def __init__(self, *, model: str, name: str | None = None, cache_dir: str | Path | None = None,
                 dtype: str = "float32", threads: int | None = None, max_batch_size: int = 8,
                 device: str = "cpu", cudnn_attention: bool = False, batch_wait_ms: float = 5.0,
                 context_length: int | None = None, **unknown: Any) -> None:
        super().__init__(model=model, name=name)
        if unknown:
            raise ConfigError(f"tier {self.name!r}: unknown transformers option(s) {sorted(unknown)}; "
                              "known: dtype, threads, max_batch_size, device, cudnn_attention, batch_wait_ms")
        if dtype not in _DTYPES:
            raise ConfigError(f"tiers.{self.name}.options.dtype: must be one of {_DTYPES}, got {dtype!r}")
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise ConfigError(f"tiers.{self.name}.options.device: must be cpu, cuda, cuda:N or auto, got {device!r}")
        if not isinstance(cudnn_attention, bool):
            raise ConfigError(f"tiers.{self.name}.options.cudnn_attention: must be a boolean (true or false, "
                              f"unquoted), got {type(cudnn_attention).__name__} {cudnn_attention!r}")
        if (isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float))
                or not 0 <= batch_wait_ms <= GATHER_S * 1000):
            raise ConfigError(f"tiers.{self.name}.options.batch_wait_ms: must be a number within "
                              f"[0, {GATHER_S * 1000:g}], got {batch_wait_ms!r}")
        # bounded: torch starts that many threads when the model loads (a million exhausts the process's threads,
        # and one past a C long is a ValueError from torch, both only then, after the ledger opened)
        threads = option_int(self.name, "threads", threads, maximum=MAX_THREADS, optional=True)
        max_batch_size = option_int(self.name, "max_batch_size", max_batch_size)
        self._cache_dir = Path(cache_dir) if cache_dir else None  # cascade.models expands ~ (one line if it cannot)
        self._dtype_name = dtype
        self._device_asked = device
        self._cudnn_attention = cudnn_attention
        self._device: Any = None  # the torch.device, at start
        self._threads = threads
        self._max_batch = int(max_batch_size)
        self._batch_wait = batch_wait_ms / 1000
        self._configured_ctx = context_length
        self._model_ctx: int | None = None
        self._token_bytes: TokenBytes | None = None  # with the tokenizer, at start
        self._model: Any = None
        self._path: Path | None = None
        self._pending: deque[_Pending] = deque()
        self._running: list[_Pending] = []  # the batch in the compute thread
        #: streams started and not finished: their cancel flag and their queue (close() ends them)
        self._streams: dict[threading.Event, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closes = 0  # close() calls so far
        self._start_once = StartOnce(self._start)

    @classmethod
    def from_tier(cls, tier, config):  # noqa: ANN001, ANN206
        return cls(model=tier.model, name=tier.name, cache_dir=config.model_cache_dir(),
                   context_length=tier.context_length, **tier_options(tier, cls.kind, "cache_dir", "context_length"))

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        ctx = [c for c in (self._configured_ctx, self._model_ctx) if c]
        return min(ctx) if ctx else None

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def model_path(self) -> Path | None:
        return self._path

    @property
    def device(self) -> str:
        """Where the model runs: the torch device once started (``auto`` resolved), else what was asked."""
        return str(self._device) if self._device is not None else self._device_asked

    def check(self) -> None:
        import json

        if missing := missing_libraries():
            raise _unavailable(self.name, missing)

        path = self._resolve()
        config = path / "config.json"  # what loading reads first: a directory without it is no model
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"tier {self.name!r}: {path} is not a model directory (no config.json)",
                              param="model") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tier {self.name!r}: cannot read {config}: {exc}", param="model") from None
        # the weights, which loading reads next (after the banner, where a failure was a traceback)
        weights = ("*.safetensors", "pytorch_model*.bin")
        if not any(next(path.glob(pattern), None) for pattern in weights):
            raise ConfigError(f"tier {self.name!r}: {path} has a config.json but no weights (*.safetensors, "
                              f"pytorch_model*.bin); {self._redo_hint()}", param="model")
        self._check_safetensors_headers(path)
        if self._device_asked.startswith("cuda"):  # a GPU that is not there (only then is torch imported)
            import torch

            self._torch_device(torch)

    def _resolve(self) -> Path:
        """The model's directory; an error names the tier (a config may name several models)."""
        from cascade.models import resolve_model_path

        try:
            return resolve_model_path(self.model, self._cache_dir)
        except (ConfigError, ModelNotPreparedError) as exc:
            raise type(exc)(f"tier {self.name!r}: {exc.message}", param="model") from exc

    def _check_safetensors_headers(self, path: Path) -> None:
        """Read each safetensors file's header (quick: the tensors are not read): a corrupt one fails here, before
        ``cascade serve`` starts, in one line, rather than in the server's startup, as a traceback."""
        try:
            from safetensors import safe_open
        except ImportError:  # the load reports it
            return
        for weights in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="numpy") as fh:
                    fh.keys()
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: one line
                raise ConfigError(f"tier {self.name!r}: cannot read the weights {weights}: {type(exc).__name__}: "
                                  f"{exc} ({self._redo_hint()})", param="model") from exc

    async def start(self) -> None:
        """Load the model and start the batching worker (once; see ``StartOnce``)."""
        if self._worker is None:
            await self._start_once()

    async def _start(self) -> None:
        self._path = self._resolve()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(_compute_executor(), self._load)
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name=f"transformers-{self.name}")

    def _load(self) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
            from transformers.utils import logging as hf_logging
        except ModuleNotFoundError as exc:  # started without check() (the Python API): the same one line
            raise _unavailable(self.name, missing_libraries() or [str(exc.name)]) from exc

        hf_logging.disable_progress_bar()
        if self._threads:
            torch.set_num_threads(int(self._threads))
        device = self._torch_device(torch)
        try:
            tok = AutoTokenizer.from_pretrained(str(self._path))
            # the context limit is the backend's own (context_length): no "sequence length is longer than the
            # specified maximum" warning from counting a prompt that is about to be refused with a clear error
            tok.model_max_length = int(1e30)
            model = AutoModelForCausalLM.from_pretrained(str(self._path), dtype=getattr(torch, self._dtype_name))
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, safetensors' SafetensorError (a corrupt
            # header), a torch error on a truncated tensor: whatever the files do, one line naming them
            raise ConfigError(f"tier {self.name!r}: cannot load model from {self._path}: {type(exc).__name__}: "
                              f"{exc} ({self._redo_hint()})") from exc
        try:
            model.to(device)
        except RuntimeError as exc:  # CUDA out of memory among them
            raise ConfigError(f"tier {self.name!r}: cannot put the model on {device}: {exc}") from exc
        model.eval()
        # plain decoding, one forward per token, whatever the model's own generation_config.json asks for. A
        # field left None in the GenerationConfig passed to generate means "the model's": its beams or
        # prompt-lookup decoding would break the logprobs read step by step, and its sampling defaults
        # (top_k, repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids,
        # ...) would change even greedy answers, which then were no longer the argmax of the logprobs served.
        # The model's own is replaced by a neutral one that keeps only its special token ids.
        own = model.generation_config
        model.generation_config = GenerationConfig(**{
            k: getattr(own, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            if getattr(own, k, None) is not None})
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._tok, self._model = tok, model
        self._token_bytes = TokenBytes(tok)
        self._model_ctx = getattr(model.config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        self._eos_ids = sorted(eos_ids)
        self._device = device

    def _redo_hint(self) -> str:
        """What to do about a model directory whose files are broken: prepare a catalog model again."""
        from cascade.models import MODEL_CATALOG, prepare_hint

        if self.model in MODEL_CATALOG:
            return f"prepare it again: `{prepare_hint(self.model, self._cache_dir, force=True)}`"
        return "is it a complete Hugging Face model directory? a catalog model: `cascade models prepare ID --force`"

    def _nan_error(self) -> ProviderServerError:
        """The model produced no finite logprob: its logits are NaN, which corrupt weights cause (a healthy
        model's chosen tokens always have one). Served, this was an empty answer."""
        from cascade.models import MODEL_CATALOG, prepare_hint, verify_hint

        if self.model in MODEL_CATALOG:
            todo = (f"run `{verify_hint(self.model, self._cache_dir)}`, then prepare it again "
                    f"(`{prepare_hint(self.model, self._cache_dir, force=True)}`)")
        else:
            todo = "check the model directory (a catalog model: `cascade models verify`)"
        return ProviderServerError(f"model of tier {self.name!r} produced NaN logprobs ({self._path}): its weights "
                                   f"are probably corrupt; {todo}", provider=self.name, code="model_produced_nan")

    def _torch_device(self, torch: Any) -> Any:
        """The device asked for, checked against what this torch can use (``auto``: CUDA when there is one)."""
        asked = self._device_asked
        if asked == "auto":
            asked = auto_device()
        if asked == "cpu":
            return torch.device("cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(asked.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device(s)" if count else f"no CUDA device (torch {torch.__version__})"
            raise ConfigError(f"tiers.{self.name}.options.device: {self._device_asked!r} asked for, "
                              f"but torch sees {seen}")
        return torch.device("cuda", index)

    async def close(self) -> None:
        self._closes += 1  # a request still tokenizing its prompt is refused once it has (``_prepare``)
        await self._start_once.settle()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        # the batch the compute thread is running (its worker was just cancelled) and those still queued: each
        # caller is told, and the running batch stops at its next token (its stopping criterion sees them all
        # cancelled) instead of computing answers nobody will read
        left, self._running = [*self._running, *self._pending], []
        self._pending.clear()
        for p in left:
            p.cancelled.set()
            if not p.future.done():
                p.future.set_exception(ProviderServerError(f"backend {self.name!r} closed", provider=self.name))
        for cancelled, queue in self._streams.items():  # a live stream stops at its next token, and says why
            cancelled.set()
            queue.put_nowait(_CLOSED)
        self._streams.clear()
        self._recent_prompts.close()
        self._model = None
        self._tok = None

    # --- generation -------------------------------------------------------------------------------
    async def _prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, list[int]]:
        if self._worker is None:
            await self.start()
        closes = self._closes
        ids = await self._recent_prompts.load(self._tok, request, to_generate=True)
        if self._closes != closes:  # closed while it was counted: nobody would ever take it from the queue
            raise ProviderServerError(f"backend {self.name!r} closed", provider=self.name)
        ctx = self.context_length
        if ctx is not None and len(ids) >= ctx:
            raise ContextLengthExceededError(
                f"prompt is {len(ids)} tokens; tier {self.name!r} has a context of {ctx} tokens",
                param="messages")
        if request.max_tokens is None:  # (the engine always sets it: the tier's max_tokens)
            request = request.with_(max_tokens=16 if ctx is None else min(16, ctx - len(ids)))
        if ctx is not None and len(ids) + request.max_tokens > ctx:
            # refused, as OpenAI and vLLM refuse it, rather than answered with fewer tokens than asked: an
            # answer cut short to fit would be served (a confident one accepted) where the cascade escalates
            # this refusal to a tier with room for it (a 400 context_length_exceeded at the last tier)
            raise ContextLengthExceededError(
                f"tier {self.name!r} has a context of {ctx} tokens; the prompt has {len(ids)} tokens and "
                f"max_tokens asks for {request.max_tokens} more ({len(ids) + request.max_tokens} in all): "
                "shorten the prompt or lower max_tokens", param="messages")
        return request, ids

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        request, ids = await self._prepare(request)
        loop = asyncio.get_running_loop()
        item = _Pending(request=request, prompt_ids=ids, future=loop.create_future(), loop=loop)
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.cancelled.set()
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Yield tokens as the model produces them (with their logprobs), then a final chunk.

        A stream is batched with the requests waiting beside it, as ``generate``'s are, and ends as soon as its
        own row does. With stop strings, only the text that could begin one is held back (as vLLM holds it):
        the rest goes out as it is generated, and a token once the text sent covers it whole (``HeldTokens``);
        a stop string ends the answer before it, as ``generate`` cuts it.
        """
        request, ids = await self._prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        item = _Pending(request=request, prompt_ids=ids, future=loop.create_future(), queue=queue, loop=loop)
        item.future.add_done_callback(_retrieve)  # a failure after its consumer left is not "never retrieved"
        cancelled = item.cancelled
        self._streams[cancelled] = queue
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        tok, raw = self._tok, self._token_bytes
        eos = set(self._eos_ids)
        texts = TokenTexts(tok, raw)
        finish = "length"
        finite_seen = False
        stops = [s for s in request.stop if s]
        hold = HeldTokens()
        answer, sent, stopped = "", 0, False  # with stops: the answer so far, how much of it went out
        quiet: list[TokenLogprob] = []  # tokens that end inside a character: they go out with the next piece
        try:
            while True:
                got = await queue.get()
                if got is _CLOSED:
                    raise ProviderServerError(f"backend {self.name!r} closed", provider=self.name)
                last = got is None
                if last:
                    if not quiet:
                        break
                    # the answer ends inside a character: its last token gives the whole ones before it (as
                    # generate's does), which no piece gave, waiting for a token to complete that character
                    piece = texts.flush()
                    toks, quiet = (*quiet[:-1], replace(quiet[-1], token=piece)), []
                else:
                    token_id, logprob, top = got
                    if not math.isfinite(logprob) and not finite_seen:  # NaN logits: nothing sent yet, refused
                        raise self._nan_error()
                    finite_seen = True
                    if stopped:  # generated before the stop reached the compute thread: not part of the answer
                        continue
                    if token_id in eos:
                        finish = "stop"
                        cancelled.set()
                        continue
                    if len(texts.ids) >= request.max_tokens:
                        continue
                    piece = texts.push(token_id)
                    alts = tuple(TopLogprob(token=tok.decode([a]), logprob=v, token_id=a, raw=raw(a))
                                 for a, v in top[: request.top_logprobs])
                    token = TokenLogprob(piece, logprob, token_id, alts, raw(token_id))
                    if not piece:
                        quiet.append(token)
                        continue
                    toks, quiet = (*quiet, token), []
                if not stops:
                    yield StreamChunk(text=piece, tokens=toks)
                    if last:
                        break
                    continue
                answer += piece
                found = [at for at in (answer.find(s, sent) for s in stops) if at >= 0]
                if found:  # the answer ends before the earliest stop; the generation stops at its next token
                    stopped, finish = True, "stop"
                    cancelled.set()
                    cut = min(found)
                    text, sent = answer[sent:cut], cut
                    out = hold.feed(text, toks) + hold.finish(cut=True)
                else:
                    keep = max(sent, len(answer) - stop_prefix_at_end(answer, stops))
                    text, sent = answer[sent:keep], keep
                    out = hold.feed(text, toks)
                if text or out:
                    yield StreamChunk(text=text, tokens=out)
                if last:
                    break
            # its row ended, and the batch may run on for others; an answer cut short (no end of turn, no stop,
            # fewer tokens than asked) is the batch's failure, which the worker set before it ended the row
            cut_short = finish != "stop" and len(texts.ids) < request.max_tokens
            if cut_short and item.future.done() and not item.future.cancelled() and item.future.exception():
                raise item.future.exception()  # (translated by the worker, as generate()'s is)
        except BaseException:
            # the consumer went away (or the generation failed): as a cancelled generate() leaves the batch
            # queue, a stream not yet started never runs, and a running one's row stops at its next token
            cancelled.set()
            raise
        finally:
            self._streams.pop(cancelled, None)
        if stops and not stopped:  # no stop string came: what was held back goes out whole
            text = answer[sent:]
            out = hold.feed(text, ()) + hold.finish(cut=False)
            if text or out:
                yield StreamChunk(text=text, tokens=out)
        # usage: every token generated, to the one that completed a stop string (what generate counts)
        yield StreamChunk(text="", finish_reason=finish,
                          usage=Usage(prompt_tokens=len(ids), completion_tokens=len(texts.ids)))

    def _generation_failed(self, exc: Exception) -> ProviderServerError:
        """What the model raised while generating (torch, transformers), as the provider's server error (an
        error of the engine's own, such as ``_nan_error``, as it is)."""
        if isinstance(exc, ProviderServerError):
            return exc
        return ProviderServerError(f"transformers generation failed on {self.name!r}: {type(exc).__name__}: {exc}",
                                   provider=self.name)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._gather()
                batch = self._take_batch()
                if not batch:
                    continue
                started = time.perf_counter()
                for p in batch:
                    p.started = started
                self._running = batch
                try:
                    results = await loop.run_in_executor(_compute_executor(), self._generate_batch, batch)
                except Exception as exc:  # noqa: BLE001 - translated for every waiter
                    err = self._generation_failed(exc)
                    err.__cause__ = exc
                    self._running = []
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(err)
                        if p.queue is not None:  # its reader finds the error once it sees its row end
                            p.queue.put_nowait(None)
                    continue
                self._running = []
                for p in batch:
                    if p.queue is not None:  # (the compute thread ended its row already; a second end is not read)
                        p.queue.put_nowait(None)
                for p, result in zip(batch, results, strict=True):  # (most were answered as their row ended)
                    self._answer(p, result)

    def _answer(self, p: _Pending, result: _BatchResult | None) -> None:
        """Answer ``p`` with its row's result (on the event loop), unless it has its answer or is gone."""
        if p.future.done():
            return
        if result is None:  # a stream's, which has had its tokens
            p.future.set_result(None)
            return
        if isinstance(result, Exception):  # this request's answer (NaN logprobs, _nan_error)
            p.future.set_exception(result)
            return
        text, toks, finish, ttft, generated = result
        now = time.perf_counter()
        p.future.set_result(GenerationResult(
            text=text, tokens=toks, finish_reason=finish,
            usage=Usage(prompt_tokens=len(p.prompt_ids), completion_tokens=generated),
            latency_s=now - p.enqueued_at, model=self.model, ttft_s=(p.started - p.enqueued_at) + ttft))

    async def _gather(self) -> None:
        """Before a batch starts, let requests arriving together join it: wait while this backend is tokenizing
        prompts (their requests come next), and until no request has reached the queue for ``batch_wait_ms``;
        at most ``GATHER_S`` in all, and not once the batch is full. A batch runs to its end before the next
        one starts: without this a burst ran as the first request alone and the rest a whole generation later
        (8 requests sent together to SmolLM2 on an H100: twice one request's latency; docs/gpu.md). A lone
        request, streamed or not, waits ``batch_wait_ms`` (5 ms by default)."""
        prompts, loop = self._recent_prompts, asyncio.get_running_loop()
        deadline = loop.time() + GATHER_S
        while len(self._pending) < self._max_batch:
            left = deadline - loop.time()
            if left <= 0:
                return
            if prompts.counting:
                await prompts.wait_counted(left)
                continue
            if self._batch_wait <= 0:
                return
            seen = len(self._pending)
            await asyncio.sleep(min(self._batch_wait, left))
            if len(self._pending) == seen and not prompts.counting:
                return

    def _take_batch(self) -> list[_Pending]:
        """Take the oldest live request and every waiting one with the same sampling settings."""
        while self._pending and (self._pending[0].future.done() or self._pending[0].cancelled.is_set()):
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch, rest = [first], deque()
        key = first.batch_key()
        while self._pending:
            p = self._pending.popleft()
            if p.future.done() or p.cancelled.is_set():
                continue
            if len(batch) < self._max_batch and p.batch_key() == key:
                batch.append(p)
            else:
                rest.append(p)
        self._pending = rest
        return batch

    def _generate_batch(self, batch: list[_Pending]) -> list[_BatchResult | None]:
        """Each request's (text, tokens, finish reason, seconds to the first token, tokens generated), or the
        error that answers it (``_nan_error``); None for a stream, whose tokens went to its queue."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        tok, model, raw = self._tok, self._model, self._token_bytes
        req0 = batch[0].request
        width = max(len(p.prompt_ids) for p in batch)
        pad = tok.pad_token_id
        dev = self._device
        input_ids = torch.tensor([[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in batch],
                                 dtype=torch.long, device=dev)
        attention = torch.tensor([[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in batch],
                                 dtype=torch.long, device=dev)
        max_new = max(p.request.max_tokens or 16 for p in batch)
        top_k = max(p.request.top_logprobs for p in batch)

        class _RowsDone(StoppingCriteria):
            """A row ends once its caller is gone or its stream has all it reads (the stream's reader sets
            ``cancelled`` at the end of the turn, at a stop string, or on leaving), or at its own
            ``max_tokens``; the batch ends when every row has."""

            def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
                n = input_ids.shape[1] - width
                done = [p.cancelled.is_set() or n >= (p.request.max_tokens or max_new) for p in batch]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        first_token_at: list[float] = []
        # The logprobs are read step by step as the answer is generated: a hook on the model keeps the newest
        # position's log-softmax, and once the step's token is chosen (the stopping checks run then) its
        # logprob and the top k are kept and the step's logits let go. Asking generate for every step's
        # logits instead held batch x tokens x vocabulary at once (4.6 GiB at 64 x 128 tokens of Qwen's
        # vocabulary; three such copies when they were stacked)
        newest: dict[str, Any] = {}
        chosen_cols: list[Any] = []
        val_cols: list[Any] = []
        id_cols: list[Any] = []

        def hook(_module, _inputs, output):  # noqa: ANN001, ANN202 - the model's final logits, newest position
            newest["lp"] = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)

        streams = [i for i, p in enumerate(batch) if p.queue is not None]
        ended: set[int] = set()  # the stream rows whose end their reader was sent

        def send(i: int, got: Any) -> None:
            p = batch[i]
            assert p.loop is not None and p.queue is not None
            p.loop.call_soon_threadsafe(p.queue.put_nowait, got)

        def to_streams(input_ids: Any, chosen: Any, vals: Any, ids: Any) -> None:
            """This step's token of each stream row still open, with its logprob and top k (one copy to the
            host for them all), and the end of the rows that ended with it."""
            rows = [i for i in streams if i not in ended]
            if not rows:
                return
            n = input_ids.shape[1] - width
            index = torch.tensor(rows, device=input_ids.device)
            toks = input_ids[index, -1].tolist()
            lps = chosen[index, 0].tolist()
            tops = (vals[index].tolist(), ids[index].tolist()) if top_k > 0 else None
            for j, i in enumerate(rows):
                p = batch[i]
                if stop_check is not None and stop_check.done[i]:  # its stop string came a step ago
                    ended.add(i)
                    send(i, None)
                    continue
                if not p.cancelled.is_set():
                    top = list(zip(tops[1][j], tops[0][j], strict=True)) if tops is not None else []
                    send(i, (toks[j], lps[j], top))
                if p.cancelled.is_set() or toks[j] in eos or n >= (p.request.max_tokens or max_new):
                    ended.add(i)
                    send(i, None)

        class _Collect(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
                lp = newest.pop("lp")  # (B, V), of the step whose token input_ids now ends with
                chosen = torch.gather(lp, 1, input_ids[:, -1:])
                chosen_cols.append(chosen)
                vals = ids = None
                if top_k > 0:
                    vals, ids = torch.topk(lp, k=top_k, dim=-1)
                    val_cols.append(vals)
                    id_cols.append(ids)
                if streams:  # (a copy to the host at every step, which streams need; batches alone skip it)
                    to_streams(input_ids, chosen, vals, ids)
                if not first_token_at:
                    if input_ids.is_cuda:  # the GPU runs behind the host: the first token is there once it is done
                        torch.cuda.synchronize(input_ids.device)
                    first_token_at.append(time.perf_counter())
                return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

        eos = set(self._eos_ids)
        stops = [s for s in req0.stop if s]  # the same for every request of the batch (its key)
        longest = max((len(s) for s in stops), default=0)

        class _StopInAnswer(StoppingCriteria):
            """A row ends once its answer holds a stop string. Only the answer is searched: transformers' own
            ``stop_strings`` matched the whole sequence, so a stop spanning the prompt's end and the answer's
            start ended the answer early. (The answer is cut at the stop afterwards, below.)"""

            def __init__(self) -> None:
                self.texts = [TokenTexts(tok) for _ in batch]
                self.answers = [""] * len(batch)
                self.done = [False] * len(batch)

            def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
                for i, token_id in enumerate(input_ids[:, -1].tolist()):
                    if self.done[i]:
                        continue
                    if token_id in eos:  # the row ends there anyway (and is padded after)
                        self.done[i] = True
                        continue
                    piece = self.texts[i].push(token_id)
                    if not piece:
                        continue
                    answer = self.answers[i] = self.answers[i] + piece
                    tail = answer[-(longest + len(piece) - 1):]  # where a stop completed by this piece can be
                    self.done[i] = any(s in tail for s in stops)
                return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

        stop_check = _StopInAnswer() if stops else None

        def row_result(p: _Pending, ids: list[int], chosen: Any, top_vals: Any, top_ids: Any,
                       ttft: float) -> _BatchResult:
            """One request's answer from its row: the ids it generated, each one's logprob (T,) and top k
            (T, k), on the host."""
            limit = p.request.max_tokens or max_new
            stop_at = next((j for j, t in enumerate(ids) if t in eos), None)
            if stop_at is not None and stop_at < limit:
                n, finish = stop_at, "stop"
            else:
                n, finish = min(len(ids), limit), "length"
            # every token it chose, the end-of-turn one included, without a finite logprob: NaN logits (a NaN
            # argmax picks token 0, often the end token: an empty answer); refused, not served
            read = chosen[: min(len(ids), n + 1)]
            if read.numel() and not bool(torch.isfinite(read).any()):
                return self._nan_error()
            k = p.request.top_logprobs
            texts = TokenTexts(tok, raw)
            pieces = [texts.push(t) for t in ids[:n]]
            if pieces:  # an answer ending inside a character: its last token gives the whole ones before it
                pieces[-1] += texts.flush()
            text = "".join(pieces)
            # stop strings: cut the text at the earliest one, and the tokens to it (fit_tokens, below): the
            # ones after it go, the one it cuts keeps its part before the cut
            cut = None
            generated = n  # what the model produced (and the tier bills), the stop string's tokens included
            if p.request.stop:
                found = [(text.find(s), len(s)) for s in p.request.stop if s and text.find(s) >= 0]
                if found:
                    cut = min(at for at, _ in found)
                    generated = min(_tokens_to(pieces, at + length) for at, length in found)
                    text, finish = text[:cut], "stop"
                    pos, keep = 0, 0
                    for piece in pieces:  # the tokens that start before the cut
                        if pos >= cut:
                            break
                        pos += len(piece)
                        keep += 1
                    n = keep
            toks = []
            for j in range(n):
                alts: tuple[TopLogprob, ...] = ()
                if k > 0:
                    alts = tuple(
                        TopLogprob(token=tok.decode([int(a)]), logprob=float(v), token_id=int(a), raw=raw(int(a)))
                        for v, a in zip(top_vals[j, :k].tolist(), top_ids[j, :k].tolist(), strict=True))
                toks.append(TokenLogprob(token=pieces[j], logprob=float(chosen[j]), token_id=int(ids[j]),
                                         top=alts, raw=raw(int(ids[j]))))
            return text, fit_tokens(toks, text) if cut is not None else tuple(toks), finish, ttft, generated

        answered: dict[int, _BatchResult] = {}  # the rows answered as they ended
        answer = self._answer

        class _AnswerEnded(StoppingCriteria):
            """Answer each request (not a stream: its reader had its tokens) as soon as its row ends: at its end
            of turn, its stop string or its max_tokens. Its caller waited for the whole batch, the longest answer
            beside it (a 2-token answer batched with a 1000-token one: the 1000 tokens). Runs after the other
            checks, which decided this step's ends; a row its caller left is not answered."""

            def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
                n = min(input_ids.shape[1] - width, len(chosen_cols))
                last = input_ids[:, -1].tolist()
                for i, p in enumerate(batch):
                    if p.queue is not None or i in answered or p.cancelled.is_set() or p.loop is None:
                        continue
                    ended = (last[i] in eos or n >= (p.request.max_tokens or max_new)
                             or (stop_check is not None and stop_check.done[i]))
                    if not ended:
                        continue
                    chosen = torch.cat([c[i] for c in chosen_cols[:n]]).cpu()
                    vals = ids = None
                    if top_k > 0:
                        vals = torch.stack([v[i] for v in val_cols[:n]]).cpu()
                        ids = torch.stack([v[i] for v in id_cols[:n]]).cpu()
                    ttft = first_token_at[0] - t0
                    answered[i] = row_result(p, input_ids[i, width:width + n].tolist(), chosen, vals, ids, ttft)
                    p.loop.call_soon_threadsafe(answer, p, answered[i])
                return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

        criteria = [_Collect(), _RowsDone()] + ([stop_check] if stop_check is not None else [])
        if len(batch) > 1:  # (a row alone ends with its batch; a seeded one is answered once its random state is back)
            criteria.append(_AnswerEnded())
        sample = _samples(req0)
        cfg = GenerationConfig(  # top_k=0: the whole vocabulary, as OpenAI and vLLM sample (not the top 50)
            max_new_tokens=max_new, do_sample=sample, num_beams=1,
            temperature=req0.temperature if sample else None, top_p=req0.top_p if sample else None,
            top_k=0 if sample else None,
            pad_token_id=pad, eos_token_id=self._eos_ids, bos_token_id=None,
            return_dict_in_generate=False,
        )
        t0 = time.perf_counter()
        # a seeded request runs alone (batch_key), on its own copy of the random state
        with torch.inference_mode(), _without_cudnn_attention(torch, dev, self._cudnn_attention), \
                _seeded(torch, dev, req0.seed if sample else None):
            handle = model.register_forward_hook(hook)
            try:
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention, generation_config=cfg,
                    stopping_criteria=StoppingCriteriaList(criteria))
            finally:
                handle.remove()
            gen = sequences[:, width:]
            # one reading per generated token; a deferred stop check (transformers does it on some devices)
            # runs one step past the end and trims the sequences: its extra readings go too
            assert len(chosen_cols) >= gen.shape[1], (len(chosen_cols), gen.shape)
            del chosen_cols[gen.shape[1]:], val_cols[gen.shape[1]:], id_cols[gen.shape[1]:]
            chosen = torch.cat(chosen_cols, dim=1).cpu()  # (B, T), one copy off the device
            if top_k > 0:
                top_vals = torch.stack(val_cols, dim=1).cpu()  # (B, T, k)
                top_ids = torch.stack(id_cols, dim=1).cpu()
            gen = gen.cpu()
        ttft = (first_token_at[0] - t0) if first_token_at else (time.perf_counter() - t0)
        results: list[_BatchResult | None] = []
        for i, p in enumerate(batch):
            if p.queue is not None:  # a stream: its reader had its tokens as they came
                results.append(None)
            elif i in answered:
                results.append(answered[i])
            else:  # its caller left (or the batch ended another way): what its row holds
                results.append(row_result(p, gen[i].tolist(), chosen[i], top_vals[i] if top_k > 0 else None,
                                          top_ids[i] if top_k > 0 else None, ttft))
        return results
