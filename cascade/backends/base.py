"""The backend interface every model provider implements."""

from __future__ import annotations

import abc
import asyncio
import codecs
import contextlib
import re
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cascade.types import GenerationRequest, GenerationResult, StreamChunk

if TYPE_CHECKING:
    from cascade.config import Config, TierConfig


def option_int(tier: str, key: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
               optional: bool = False) -> int | None:
    """A backend option that must be a whole number >= ``minimum`` (and <= ``maximum``, when given); ConfigError
    naming ``tiers.<tier>.options.<key>`` otherwise."""
    from cascade.errors import ConfigError

    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        span = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigError(f"tiers.{tier}.options.{key}: must be a whole number {span}, got {value!r}")
    return value


def option_number(tier: str, key: str, value: Any, *, low: float = 0.0, high: float = float("inf"),
                  optional: bool = True) -> float | None:
    """A backend option that must be a finite number in ``(low, high]``."""
    from cascade.errors import ConfigError

    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high
            or value == float("inf")):
        span = f"> {low:g}" if high == float("inf") else f"within ({low:g}, {high:g}]"
        raise ConfigError(f"tiers.{tier}.options.{key}: must be a number {span}, got {value!r}")
    return float(value)


def option_bool(tier: str, key: str, value: Any) -> bool | None:
    """A backend option that must be true or false (or unset)."""
    from cascade.errors import ConfigError

    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"tiers.{tier}.options.{key}: must be true or false, got {value!r}")


def option_str(tier: str, key: str, value: Any) -> str | None:
    """A backend option that must be a non-empty string (or unset)."""
    from cascade.errors import ConfigError

    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise ConfigError(f"tiers.{tier}.options.{key}: must be a non-empty string, got {value!r}")


def option_url(tier: str, key: str, value: Any) -> str | None:
    """A backend option that must be an http:// or https:// URL with a host (or unset)."""
    from urllib.parse import urlsplit

    from cascade.errors import ConfigError

    if value is None:
        return None
    ok = isinstance(value, str)
    if ok:
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # a port that is not a number raises here
        except ValueError:
            ok = False
    if not ok:
        raise ConfigError(f"tiers.{tier}.options.{key}: must be an http:// or https:// URL with a host, "
                          f"got {_without_user_info(value)!r}")
    return value


def tier_options(tier: "TierConfig", kind: str, *own: str) -> dict[str, Any]:
    """A copy of the tier's ``options`` for its backend's constructor, which takes ``model``, ``name`` and ``own``
    (``context_length``, ``cache_dir``...) from the tier itself: an option of one of those names is a ConfigError
    naming it, where the constructor would raise a TypeError ("got multiple values"), a traceback."""
    from cascade.errors import ConfigError

    if taken := sorted(set(tier.options) & {"model", "name", *own}):
        raise ConfigError(f"tier {tier.name!r}: unknown {kind} option(s) {taken}: set from the tier itself (its name, "
                          "model and context_length, and models.cache_dir), not by its options")
    return dict(tier.options)


def _without_user_info(value: Any) -> Any:
    """A URL refused as malformed, as its error quotes it: the user info (``user:password@``, or a key given as
    the user) blanked, through the last "@", since a URL that does not parse cannot say where its host begins.
    The error reaches the CLI's one line, logs and the 422 of ``POST /admin/reload``."""
    if not isinstance(value, str) or "@" not in value:
        return value
    start = re.match(r"\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?/*", value).end()  # (the scheme and its slashes)
    return value[:start] + "***@" + value.rpartition("@")[2]


class Backend(abc.ABC):
    """An async model provider.

    Lifecycle: ``await start()`` loads weights or opens clients (idempotent), ``generate``/``stream`` may
    then be called concurrently, ``await close()`` releases resources. Failures are raised as
    ``cascade.errors`` classes, translated from the library's own at this boundary.
    """

    #: registry name, e.g. "transformers"
    kind: str = "abstract"

    def __init__(self, *, model: str, name: str | None = None) -> None:
        self.model = model
        self.name = name or model

    @classmethod
    def from_tier(cls, tier: "TierConfig", config: "Config") -> "Backend":
        """Build the backend of one configured tier. Backends override this to take what they need."""
        return cls(model=tier.model, name=tier.name, **tier_options(tier, cls.kind))

    @property
    def context_length(self) -> int | None:
        """Maximum prompt + completion tokens, if known."""
        return None

    @property
    def ready(self) -> bool:
        """True once ``start()`` has loaded what generation needs."""
        return True

    def check(self) -> None:  # noqa: B027 - optional hook
        """Check, cheaply and without loading anything, what ``start()`` will need (e.g. that the model
        names a prepared model); raise a ``CascadeError`` if it is missing. `cascade serve` calls it before
        the server starts."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model / open connections. Safe to call more than once."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one answer with per-token logprobs (and ``request.top_logprobs`` alternatives)."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Yield the answer in pieces. The default generates whole and yields it as one final chunk."""
        result = await self.generate(request)
        yield StreamChunk(text=result.text, tokens=result.tokens, finish_reason=result.finish_reason,
                          usage=result.usage)

    async def tokenize(self, request: GenerationRequest) -> None:
        """Count ``request``'s prompt off the event loop, where this backend counts it with a tokenizer of its
        own (in-process models), so that :meth:`count_prompt_tokens` after it finds the count made. A 1 MB
        prompt takes a tokenizer about half a second: on the loop, every other request would wait for it.
        Default (no tokenizer here): the tokenizer-free count :meth:`estimate_prompt_tokens` falls back on,
        made once and off the loop for a long prompt (it too is a fifth to half a second a MB)."""
        if self.count_prompt_tokens(request) is None:
            await request.rough_prompt_tokens_off_loop()

    def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Prompt length in this backend's tokens, when it can tell cheaply (for context checks)."""
        return None

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt length for costs (budgets, a broken stream's bill): :meth:`count_prompt_tokens` where this
        backend can tell, else a tokenizer-free count that leans high (``GenerationRequest.rough_prompt_tokens``)."""
        n = self.count_prompt_tokens(request)
        return request.rough_prompt_tokens() if n is None else n

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self.model!r})"


class InProcessBackend(Backend):
    """A backend whose model runs in this process, with a tokenizer of its own (``self._tok``, set at start):
    it counts a prompt exactly, once per request (:class:`RecentPrompts`), off the event loop."""

    def __init__(self, *, model: str, name: str | None = None) -> None:
        super().__init__(model=model, name=name)
        self._tok: Any = None
        self._recent_prompts = RecentPrompts()  # one request's prompt tokenized once

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self._recent_prompts.ids(self._tok, request)

    async def tokenize(self, request: GenerationRequest) -> None:
        from cascade.errors import InvalidRequestError

        if self._tok is not None:
            try:
                await self._recent_prompts.load(self._tok, request)
            except InvalidRequestError as exc:
                if not exc.fall_over:
                    raise
                # messages its chat template refuses: counted roughly, and refused by the tier's call (which the
                # cascade escalates), not before it
                await request.rough_prompt_tokens_off_loop()

    def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        from cascade.errors import InvalidRequestError

        if self._tok is None:
            return None
        try:
            return len(self._prompt_ids(request))
        except InvalidRequestError as exc:  # messages its chat template refuses: the rough count, as in tokenize
            if not exc.fall_over:
                raise
            return None


class StartOnce:
    """A backend's start (loading a model: seconds to minutes), run once for all its callers.

    The start runs as a task of its own, shielded from its callers: a request cancelled while the model
    loads (a client gone, a latency budget, a shutdown) must not abandon the start half-way (a model loaded
    with no worker to serve it, or an engine built in a thread and never kept, holding its memory while the
    next caller builds another). A start that failed or was cancelled is tried again by the next caller.
    """

    def __init__(self, start: Callable[[], Awaitable[None]]) -> None:
        self._start = start
        self._task: asyncio.Future | None = None

    async def __call__(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._start())
        task = self._task
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and (task.cancelled() or task.exception() is not None) and self._task is task:
                self._task = None

    async def settle(self) -> None:
        """Before a close: let a start in flight finish (its outcome is the closer's no more), then forget it
        so that a later call starts afresh."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)


class RecentPrompts:
    """The token ids of the last few prompts an in-process backend tokenized, found by the prompt object itself
    (a request's messages tuple or prompt string, both immutable, compared by identity and held here so that
    the identity stays theirs). One request's prompt is counted for its cost ceiling at admission, for its cost
    budget and for its generation: with this it is tokenized once, and :meth:`load` does it on a thread of
    its own (a 1 MB prompt takes the tokenizer about half a second, and the tokenizer lets go of the GIL)."""

    def __init__(self, size: int = 8) -> None:
        self._items: deque[tuple[object, Any, tuple[int, ...]]] = deque(maxlen=size)
        self._thread: ThreadPoolExecutor | None = None
        self._counting = 0  # counts on the thread, queued or running
        self._waiters: list[asyncio.Future] = []  # wait_counted's, woken as each count ends

    @property
    def counting(self) -> int:
        """How many prompts on their way to be generated are being counted on the thread now (queued or
        running)."""
        return self._counting

    async def wait_counted(self, timeout: float) -> None:
        """Until a count in flight ends (or ``timeout`` seconds pass): by then its request has gone on with
        its ids, into its backend's queue if it was on its way to be generated."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _find(self, tokenizer: Any, request: GenerationRequest) -> tuple[int, ...] | None:
        key = request.messages if request.messages is not None else request.prompt
        for k, tok, ids in self._items:
            if k is key and tok is tokenizer:
                return ids
        return None

    def _keep(self, tokenizer: Any, request: GenerationRequest, ids: tuple[int, ...]) -> None:
        self._items.append((request.messages if request.messages is not None else request.prompt, tokenizer, ids))

    def ids(self, tokenizer: Any, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: those :meth:`load` made, else counted here, on the caller's thread."""
        ids = self._find(tokenizer, request)
        if ids is None:
            ids = tuple(prompt_token_ids(tokenizer, request))
            self._keep(tokenizer, request, ids)
        return list(ids)

    async def load(self, tokenizer: Any, request: GenerationRequest, *, to_generate: bool = False) -> list[int]:
        """The prompt's token ids, counted on this backend's tokenizer thread (one, made on first use: counts
        made here queue for it) while the event loop serves other requests. ``to_generate``: its request is on
        its way to be generated by this backend (:attr:`counting` counts those only; a cost ceiling counts a
        prompt on every tier of its route, most of which never generate it)."""
        ids = self._find(tokenizer, request)
        if ids is None:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="cascade-tokenize")
            loop = asyncio.get_running_loop()
            self._counting += to_generate
            try:
                ids = tuple(await loop.run_in_executor(self._thread, prompt_token_ids, tokenizer, request))
            finally:
                self._counting -= to_generate
                waiters, self._waiters = self._waiters, []
                for fut in waiters:  # they run once this task has gone on (to its backend's queue)
                    if not fut.done():
                        fut.set_result(None)
            self._keep(tokenizer, request, ids)
        return list(ids)

    def close(self) -> None:
        """Forget every count and let the thread go (a count in flight finishes on it; nobody waits)."""
        self._items.clear()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=False)


def prompt_token_ids(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids of a request's prompt for an in-process model: chat messages through the tokenizer's
    chat template, or a raw prompt (an empty one starts from the beginning-of-text token). A message's text
    is text: a special token's string written in it (``<|im_end|>``) is not that token, so it cannot end its
    turn and forge another (a raw prompt is the model's input as given, special tokens included)."""
    if request.messages is not None:
        msgs = [m.as_dict() for m in request.messages]
        text = _chat_template(tokenizer, msgs)
        specials = _special_pattern(tokenizer)
        if specials is not None and any(specials.search(m.content) for m in request.messages):
            return _chat_ids_with_literal_text(tokenizer, msgs, text, specials)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids


def _chat_template(tokenizer: Any, msgs: list[dict[str, str]]) -> str:
    """``msgs`` rendered by the model's chat template, ending with the assistant's turn begun. Messages its
    template refuses (its ``raise_exception``: "Conversation roles must alternate user/assistant/...", "System
    role not supported"), or any, where the model has no template (a base model), are an
    :class:`InvalidRequestError` naming why; another tier's model may take them (``fall_over``: the cascade
    escalates it, and the last tier's is the 400). They were the template's own error: a 502, or a 500 where
    the prompt was counted before the tier's call. (A template that does not parse stays the tier's failure.)"""
    from jinja2 import TemplateError, TemplateSyntaxError

    from cascade.errors import InvalidRequestError

    def refused(why: str) -> InvalidRequestError:
        err = InvalidRequestError(f"messages: {why}", param="messages")
        err.fall_over = True
        return err

    if getattr(tokenizer, "chat_template", None) is None:
        raise refused("this tier's model has no chat template (a base model): send it a prompt (the completions "
                      "endpoint), not messages")
    try:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except TemplateSyntaxError:
        raise
    except TemplateError as exc:
        raise refused(f"this tier's chat template refuses them: {exc}") from exc


#: per tokenizer, the pattern of its special strings (made once: every chat prompt is searched with it)
_SPECIAL_PATTERNS: "weakref.WeakKeyDictionary[Any, re.Pattern[str] | None]" = weakref.WeakKeyDictionary()
_SPECIAL_PATTERNS_LOCK = threading.Lock()  # prompts are counted on each backend's tokenizer thread


def _special_pattern(tokenizer: Any) -> "re.Pattern[str] | None":
    """The strings the tokenizer reads as special tokens (its chat template's turn markers among them), as
    one pattern; None when it has none."""
    with _SPECIAL_PATTERNS_LOCK, contextlib.suppress(KeyError, TypeError):  # (TypeError: no weak reference)
        return _SPECIAL_PATTERNS[tokenizer]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False) and t.content}
    found.update(t for t in getattr(tokenizer, "all_special_tokens", ()) if t)
    pattern = re.compile("|".join(map(re.escape, sorted(found, key=len, reverse=True)))) if found else None
    with _SPECIAL_PATTERNS_LOCK, contextlib.suppress(TypeError):
        _SPECIAL_PATTERNS[tokenizer] = pattern
    return pattern


def _chat_ids_with_literal_text(tokenizer: Any, msgs: list[dict[str, str]], text: str,
                                specials: "re.Pattern[str]") -> list[int]:
    """Token ids of a chat whose messages hold special tokens' strings, each message's text read as text:
    the template is rendered with a mark in place of each message's text, the template's own parts are
    tokenized as usual (its special tokens are tokens) and each message's text with its special strings
    split into ordinary tokens. A template that changes a message's text (a trim) cannot be rendered this
    way exactly: such a request is refused rather than sent with the wrong turns."""
    from cascade.errors import InvalidRequestError

    marks = [f"\ue000cascade-text-{i}\ue001" for i in range(len(msgs))]
    marked = _chat_template(tokenizer, [{**m, "content": mark} for m, mark in zip(msgs, marks, strict=True)])
    parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", marked)
    order = parts[1::2]
    contents = {mark: m["content"] for mark, m in zip(marks, msgs, strict=True)}
    if sorted(order) != sorted(marks) or "".join(contents.get(p, p) for p in parts) != text:
        first = next(i for i, m in enumerate(msgs) if specials.search(m["content"]))
        raise InvalidRequestError(f"messages.{first}.content: holds a special token of this model's chat template "
                                  "(as <|im_end|>), which its template cannot take as plain text: remove it",
                                  param=f"messages.{first}.content")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if not part:
            continue
        if i % 2:
            ids += tokenizer(contents[part], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves, the rest
    are shifted to code points from 256 (the table every byte-level BPE tokenizer uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class TokenBytes:
    """A token id's own bytes, as OpenAI's ``bytes`` gives them: a token may hold part of a multi-byte
    character (byte-level BPE, SentencePiece byte fallback). ``None`` where the tokenizer's vocabulary
    does not say (the caller then encodes the token's text), and for special tokens. Cached per id."""

    __slots__ = ("tok", "cache", "alphabet", "special")

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.cache: dict[int, bytes | None] = {}
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        self.alphabet = _byte_level_alphabet() if "ByteLevel" in repr(decoder) else None
        self.special = set(getattr(tok, "all_special_ids", ()) or ())

    def __call__(self, token_id: int) -> bytes | None:
        try:
            return self.cache[token_id]
        except KeyError:
            pass
        out: bytes | None = None
        if token_id not in self.special:
            try:
                piece = self.tok.convert_ids_to_tokens(int(token_id))
            except Exception:  # noqa: BLE001 - an id outside the vocabulary: no bytes to give
                piece = None
            if isinstance(piece, str):
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte
                    try:
                        out = bytes([int(piece[3:5], 16)])
                    except ValueError:
                        out = None
                elif self.alphabet is not None and all(c in self.alphabet for c in piece):
                    out = bytes(self.alphabet[c] for c in piece)
                elif self.alphabet is None and "\u2581" in piece:  # SentencePiece's word marker
                    out = piece.replace("\u2581", " ").encode("utf-8")
        self.cache[token_id] = out
        return out


class TokenTexts:
    """Incremental detokenization: the text that each generated token adds.

    The pieces join to the decoded answer. A token that ends inside a multi-byte character adds ""; the
    token that completes the character carries it. Decodes a window of a few tokens per step (O(1)).
    """

    __slots__ = ("tok", "raw", "ids", "prefix_offset", "read_offset")

    def __init__(self, tok: Any, raw: TokenBytes | None = None) -> None:
        self.tok = tok
        self.raw = raw  # the tokens' own bytes, which tell a U+FFFD the answer holds from a partial character's
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix):] if full.startswith(prefix) else full
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """At the answer's end: the whole characters that the tokens pushed since the last piece hold before a
        character the answer ends inside (a token b" \\xd0" is a space and a Cyrillic letter's first byte),
        which :meth:`push` gives only once that character is complete; "" when there are none."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if full.endswith("\ufffd") and self._ends_inside_a_character():
            full = full[:-1]
        if len(full) > len(prefix) and full.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def _ends_inside_a_character(self) -> bool:
        """Whether the tokens since the last piece end inside a character (their decoded text's last U+FFFD
        stands for its first bytes), not with a whole U+FFFD the model wrote (bytes EF BF BD, a token of its
        own in SmolLM2), which is answer text. Without the bytes of every one of them: assumed so."""
        if self.raw is None:
            return True
        tail = b""
        for token_id in self.ids[self.prefix_offset:]:
            own = b"" if token_id in self.raw.special else self.raw(token_id)
            if own is None:
                return True
            tail += own
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(tail, final=False)
        return bool(decoder.getstate()[0])  # bytes held back: a character begun and not completed
