"""Plain data types used inside the engine (no pydantic here: that lives at the wire, in serving/)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool", "developer"]

#: what a BPE tokenizer rarely merges: a CJK or kana/hangul character, a digit (many tokenizers split
#: numbers digit by digit), a run of letters, a mark
_PIECES = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|\d|[^\W\d]+|[^\w\s]")
#: tokens a chat template adds per message (role markers, separators), and once per request
_PER_MESSAGE, _PER_REQUEST = 4, 3


#: whitespace beyond the single space between two words
_SPACES = re.compile(r"\s{2,}|[^\S ]")


def rough_token_count(text: str) -> int:
    """A tokenizer-free count that leans high, for budgets on tiers whose tokenizer we do not have (remote
    APIs): one token per CJK character, digit, punctuation mark and word, and one per 4 bytes of a long
    word, more for text that is no word (:func:`_piece_tokens`); other non-ASCII characters by their UTF-8
    length; of whitespace beyond the single space between words, one per newline, tab or other ASCII
    space character, two per other (an ideographic space is two tokens to many tokenizers), and one per 4
    spaces of a run (indentation), so that a prompt of whitespace is not free. Against Qwen2.5's byte-level
    BPE (151k tokens, as OpenAI's): English prose 1.3-1.4x its real count, code 1.6x, random letters 1.0-1.2x,
    hex and UUIDs 1.0x, base64 and JWTs 0.85x, Finnish 0.9x (benchmarks/token_estimate.py). A flat 4
    characters a token undercounts short words, digits and CJK text (2-4x) and let cost budgets be overrun;
    this count used to read random letters at 0.45x and base64 at 0.6x."""
    words = sum(_piece_tokens(p) for p in _PIECES.findall(text))
    return words + sum(_whitespace_tokens(run) for run in _SPACES.findall(text))


#: :func:`quick_token_count`: how many samples of a long text it counts, and their length in characters
QUICK_SAMPLES, QUICK_SAMPLE_CHARS = 16, 4096


def quick_token_count(text: str) -> int:
    """:func:`rough_token_count`, extrapolated from ``QUICK_SAMPLES`` evenly spaced samples where the text is
    longer than they are together (each cut where a space is, so that no word is split in two); exact below
    that. For long text whose kind does not change much along it (prose, code, a document), within a few
    percent of the whole count; bounded time whatever its length."""
    n = len(text)
    if n <= QUICK_SAMPLES * QUICK_SAMPLE_CHARS:
        return rough_token_count(text)
    counted = chars = 0
    step = n // QUICK_SAMPLES
    for i in range(QUICK_SAMPLES):
        start = i * step
        end = start + QUICK_SAMPLE_CHARS
        # from the first space on (a sample begins with a whole word), to the last space before its end
        lo = text.find(" ", start, end)
        hi = text.rfind(" ", start, end)
        if lo < 0 or hi <= lo:
            lo, hi = start, end
        counted += rough_token_count(text[lo:hi])
        chars += hi - lo
    return max(1, round(counted * n / chars))


def _piece_tokens(piece: str) -> int:
    """One piece of :func:`rough_token_count`. An ASCII word: split where its case turns up (camelCase), each
    part one token, one per 4 bytes when longer than 4 (per 3 past 12: a compound); text that is no word
    costs more: letters whose case flips every few of them (base64, a key) one token per 1.4, a part with
    few vowels or four consonants in a row (random letters, an id) one per 1.5. A CJK character: one.
    Other non-ASCII characters by their UTF-8 length, since a tokenizer that has not learnt a script falls
    back to its bytes: one for a 2-byte character (Cyrillic, Greek, Arabic, an accented letter), two for a
    3-byte one (Devanagari, Thai, Tibetan, a symbol), four for a 4-byte one (an emoji, a historic script: a
    token per byte), plus a token per 3 ASCII characters beside them."""
    if piece.isascii():
        if len(piece) <= 4:
            return 1
        if piece.islower() or piece.isupper():  # no case to turn (most words): one part
            return _ascii_word_tokens(piece)
        parts = _CASE_TURN.split(piece)
        if len(parts) >= 3 and len(piece) < 3 * len(parts):  # case flips every few letters: not camelCase
            return -(-len(piece) * 5 // 7)
        return sum(_ascii_word_tokens(p) for p in parts)
    if len(piece) == 1 and _CJK.match(piece):
        return 1
    ascii_chars = sum(c.isascii() for c in piece)
    return max(1, (ascii_chars + 2) // 3 + sum(_NON_ASCII_TOKENS[len(c.encode("utf-8", "surrogatepass"))]
                                               for c in piece if not c.isascii()))


#: where a lowercase letter is followed by a capital (camelCase, and the flips of base64)
_CASE_TURN = re.compile(r"(?<=[a-z])(?=[A-Z])")
_CONSONANTS4 = re.compile(r"[bcdfghjklmnpqrstvwxz]{4}")


def _ascii_word_tokens(word: str) -> int:
    """An ASCII run of letters: one token up to 4, then one per 4 (per 3 past 12 letters, a compound), one per
    1.5 when it is no word (under a fifth vowels, or four consonants in a row: random letters, an id)."""
    n = len(word)
    if n <= 4:
        return 1
    low = word.lower()
    vowels = sum(map(low.count, "aeiouy"))
    if vowels < 0.2 * n or _CONSONANTS4.search(low):
        return -(-n * 2 // 3)
    return -(-n // 3) if n > 12 else -(-n // 4)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
#: tokens counted for a non-ASCII character of 2, 3 or 4 UTF-8 bytes
_NON_ASCII_TOKENS = {2: 1, 3: 2, 4: 4}


def _whitespace_tokens(run: str) -> int:
    spaces = run.count(" ")
    return (spaces + 3) // 4 + sum(2 if c > "\x7f" else 1 for c in run if c != " ")


def answer_tokens(n_logprobs: int, text: str) -> int:
    """An answer's length in tokens where the server did not say (no usage): the tokens it sent logprobs for,
    else :func:`rough_token_count` of the text (a server that sends neither still billed the answer)."""
    return n_logprobs or rough_token_count(text)



def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a lone surrogate does not: Python makes them of bytes that are not
    UTF-8, and no tokenizer or database takes them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SURROGATE = re.compile("[\ud800-\udfff]")


def paired_surrogates(text: str) -> str:
    """``text`` as UTF-8 can carry it: a UTF-16 surrogate pair (an upstream that cut its text by UTF-16 units,
    each half a JSON escape of its own, here joined) is its character; a lone surrogate is U+FFFD."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def ends_in_high_surrogate(text: str) -> bool:
    """Whether ``text`` ends with the first half of a surrogate pair (its second half may come next)."""
    return bool(text) and "\ud800" <= text[-1] <= "\udbff"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    #: the participant's name (OpenAI's ``name``): sent on to an OpenAI-compatible tier; a local chat
    #: template sees it in the message and uses it if it has a place for one
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The message as a chat API (and a chat template) takes it."""
        d = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation asked of one backend: either chat ``messages`` or a raw ``prompt``."""

    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    #: None: each tier's configured default
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    #: alternatives to return per generated token (0 = only the chosen token's logprob)
    top_logprobs: int = 5
    seed: int | None = None
    #: :meth:`rough_prompt_tokens`, once counted: the limits, the budgets and every tier without a tokenizer
    #: ask for it, and a long prompt takes a fifth to half a second a MB (pure Python) each time
    _rough_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def with_(self, **changes) -> "GenerationRequest":
        new = replace(self, **changes)
        if self._rough_tokens is not None and "messages" not in changes and "prompt" not in changes:
            object.__setattr__(new, "_rough_tokens", self._rough_tokens)  # the same prompt: the same count
        return new

    def rough_prompt_tokens(self) -> int:
        """The prompt's length in tokens without a tokenizer (:func:`rough_token_count`, plus the chat
        template's tokens per message); counted once. On the event loop, a long prompt holds every other
        request for the count: :meth:`rough_prompt_tokens_off_loop` first."""
        n = self._rough_tokens
        if n is None:
            n = self._prompt_tokens(rough_token_count)
            object.__setattr__(self, "_rough_tokens", n)
        return n

    def _prompt_tokens(self, count: Callable[[str], int]) -> int:
        """The prompt's tokens by ``count`` of each text, plus the chat template's per message and request."""
        if self.messages is None:
            return count(self.prompt or "") + 1
        return _PER_REQUEST + sum(_PER_MESSAGE + count(m.content) for m in self.messages)

    async def rough_prompt_tokens_off_loop(self) -> int:
        """:meth:`rough_prompt_tokens`, counted on a thread where the prompt is longer than
        :meth:`quick_prompt_tokens` counts whole (a 1 MB prompt: 0.2-0.5 s), so that the loop serves other
        requests meanwhile; the count is kept for the calls after it."""
        if self._rough_tokens is None and self._prompt_chars() > QUICK_SAMPLES * QUICK_SAMPLE_CHARS:
            return await asyncio.to_thread(self.rough_prompt_tokens)
        return self.rough_prompt_tokens()

    def _prompt_chars(self) -> int:
        if self.messages is None:
            return len(self.prompt or "")
        return sum(len(m.content) for m in self.messages)

    def quick_prompt_tokens(self) -> int:
        """:meth:`rough_prompt_tokens` in bounded time: a text longer than ``QUICK_SAMPLES`` samples of
        ``QUICK_SAMPLE_CHARS`` is counted on those samples, spread over it, and the count scaled to its
        length. For an estimate made on the event loop that needs no more (the bill of a call a crash
        interrupted, in the journal): the whole count is pure Python, about half a second per MB of
        prompt, during which no other request is served."""
        return self._prompt_tokens(quick_token_count)


#: the roles a request's messages may have (the HTTP layer sends OpenAI's ``developer`` as ``system``)
REQUEST_ROLES = ("system", "user", "assistant", "developer")


def _bad(message: str, param: str) -> Exception:
    from cascade.errors import InvalidRequestError

    return InvalidRequestError(message, param=param)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{param} must be a string, got {type(value).__name__}", param)
    if not value.isascii() and not is_utf8(value):
        raise _bad(f"{param}: text is not valid Unicode (a lone surrogate such as \\ud800)", param)
    return value


def _number(value: Any, param: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        raise _bad(f"{param} must be a number {'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}"
                   f"to {high:g}, got {value!r}", param)
    return value


def _integer(value: Any, param: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _bad(f"{param} must be an integer of at least {low}" + (f" and at most {high}" if high is not None
                                                                      else "") + f", got {value!r}", param)
    return value


def checked_request(request: Any) -> "GenerationRequest":
    """``request`` as the engine takes it, or :class:`~cascade.errors.InvalidRequestError` naming the field: what
    the HTTP layer's wire types check, for a request built in code (the Python API), so that a malformed one is
    refused before any tier runs (a local tier's refusal would otherwise escalate it, and a hosted tier be paid
    for it). A single ``stop`` string and lists stand for tuples, as OpenAI's API takes them, and a
    ``developer`` message is a ``system`` one, as the HTTP layer sends it."""
    if not isinstance(request, GenerationRequest):
        raise _bad(f"the request must be a cascade.types.GenerationRequest, got {type(request).__name__}",
                   "request")
    changes: dict[str, Any] = {}
    if (request.messages is None) == (request.prompt is None):
        raise _bad("a request has either messages (chat) or a prompt (completion), not both or neither",
                   "messages")
    if request.messages is not None:
        messages = request.messages
        if not isinstance(messages, (tuple, list)) or not messages:
            raise _bad("messages must be a non-empty sequence of cascade.types.Message", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, Message):
                raise _bad(f"messages[{i}] must be a cascade.types.Message, got {type(m).__name__}", "messages")
            if m.role not in REQUEST_ROLES:
                raise _bad(f"messages[{i}].role must be one of {', '.join(REQUEST_ROLES)}, got {m.role!r}",
                           "messages")
            _text(m.content, f"messages[{i}].content")
            if m.name is not None and (not _text(m.name, f"messages[{i}].name") or len(m.name) > 64):
                raise _bad(f"messages[{i}].name must have 1 to 64 characters", "messages")
        if any(m.role == "developer" for m in messages):
            # OpenAI's name for the system role of newer models, sent as "system" as the HTTP layer sends it:
            # chat templates know "system" (Qwen2.5's drops a "developer" message without a word)
            messages = tuple(replace(m, role="system") if m.role == "developer" else m for m in messages)
        if isinstance(messages, list) or messages is not request.messages:
            changes["messages"] = tuple(messages)
    else:
        _text(request.prompt, "prompt")
    if request.max_tokens is not None:
        _integer(request.max_tokens, "max_tokens", 1)
    _number(request.temperature, "temperature", 0.0, 2.0)
    _number(request.top_p, "top_p", 0.0, 1.0, low_open=True)
    stop = request.stop
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (tuple, list)) or any(not isinstance(x, str) or not x for x in stop):
        raise _bad("stop must be a string or a sequence of non-empty strings", "stop")
    for x in stop:
        _text(x, "stop")
    if stop is not request.stop or type(stop) is not tuple:
        changes["stop"] = tuple(stop)
    _integer(request.top_logprobs, "top_logprobs", 0, 20)
    if request.seed is not None:
        _integer(request.seed, "seed", -(2**63), 2**63 - 1)
    return replace(request, **changes) if changes else request


#: OpenAI's limits on a request's ``metadata``, for the Python API and the HTTP layer alike: tags, key and value
#: lengths
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
#: the longest end user id (OpenAI's ``user``) taken
MAX_END_USER = 512
#: the longest ``model`` name a request may carry (names are a config's policies and tiers)
MAX_MODEL_CHARS = 256
#: the longest comment a piece of feedback may carry
MAX_FEEDBACK_COMMENT = 4000
#: the longest request id a caller may give (the Python API's ``request_id=``) or name (feedback)
MAX_REQUEST_ID = 128


def checked_feedback(request_id: Any, score: Any, comment: Any) -> None:
    """A piece of feedback as the engine takes it (:meth:`cascade.engine.Engine.feedback`), else
    :class:`~cascade.errors.InvalidRequestError` naming the field, as the HTTP layer's wire type refuses it: a
    score is the integer -1, 0 or 1 (``True`` is no score, nor ``1.0``), a comment text of at most
    ``MAX_FEEDBACK_COMMENT`` characters."""
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID:
        raise _bad(f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters, got {request_id!r:.60}",
                   "request_id")
    if isinstance(score, bool) or not isinstance(score, int) or score not in (-1, 0, 1):
        raise _bad(f"score must be -1, 0 or 1 (an integer), got {score!r:.40}", "score")
    if comment is not None and len(_text(comment, "comment")) > MAX_FEEDBACK_COMMENT:
        raise _bad(f"comment must be at most {MAX_FEEDBACK_COMMENT} characters, got {len(comment)}", "comment")


#: the APIs a request comes through, as the ledger's ``endpoint`` column (and ``cascade report --by endpoint``) names
#: them: the HTTP routes', and ``cascade ask``'s; the Python API files its requests under one of them ("chat" unless
#: told), so that a report's groups are these, not a program's free text
ENDPOINTS = ("chat", "completions", "responses", "cli")


def checked_attribution(*, model: Any = None, endpoint: Any = "chat", end_user: Any = None, metadata: Any = None,
                        api_key_id: Any = None, user_tier: Any = None) -> None:
    """What a request built in code names beside its request (the Python API's ``model``, ``endpoint``,
    ``end_user``, ``metadata``, ``api_key_id``, ``user_tier``), held to what the HTTP layer takes:
    :class:`~cascade.errors.InvalidRequestError` naming the first that is not, before any tier is called (a
    value the ledger cannot write would otherwise be found only after the tiers were paid)."""
    for param, value in (("model", model), ("end_user", end_user), ("api_key_id", api_key_id),
                         ("user_tier", user_tier)):
        if value is not None:
            if not isinstance(value, str):
                raise _bad(f"{param} must be a string or None, got {type(value).__name__}", param)
            _text(value, param)
            if "\x00" in value:
                raise _bad(f"{param} must not contain a NUL character", param)
    if model is not None and not 1 <= len(model) <= MAX_MODEL_CHARS:  # as over HTTP: "" is no default policy
        raise _bad(f"model must name a policy or a tier in 1 to {MAX_MODEL_CHARS} characters (or be None, for the "
                   f"default policy), got {len(model)} characters", "model")
    if end_user is not None and len(end_user) > MAX_END_USER:
        raise _bad(f"end_user must be at most {MAX_END_USER} characters, got {len(end_user)}", "end_user")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise _bad(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r:.70}", "endpoint")
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _bad(f"metadata must be a dict of strings to strings or None, got {type(metadata).__name__}",
                   "metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise _bad(f"metadata: at most {MAX_METADATA_PAIRS} key-value pairs, got {len(metadata)}", "metadata")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _bad(f"metadata must map strings to strings, got {type(k).__name__} -> {type(v).__name__}",
                       "metadata")
        _text(k, "metadata")
        _text(v, "metadata")
        if not 0 < len(k) <= MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE or "\x00" in k + v:
            raise _bad(f"metadata: keys of 1 to {MAX_METADATA_KEY} characters, values of at most "
                       f"{MAX_METADATA_VALUE}, no NUL character; {k[:70]!r} is not", "metadata")


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    token_id: int | None = None
    #: the token's own bytes, which may be part of a multi-byte character; None: ``token`` encoded as UTF-8
    raw: bytes | None = None

    @property
    def utf8(self) -> bytes:
        return self.token.encode("utf-8") if self.raw is None else self.raw


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its text, its logprob under the model, and the top-k alternatives.

    ``token`` is the text the token adds to the answer: "" for a token that ends inside a multi-byte
    character, whose next token carries the whole character. ``raw`` is the token's own bytes (as
    OpenAI's ``bytes``), so the tokens' bytes join to the answer's UTF-8; None: ``token`` encoded."""

    token: str
    logprob: float
    token_id: int | None = None
    top: tuple[TopLogprob, ...] = ()
    raw: bytes | None = None

    @property
    def utf8(self) -> bytes:
        return self.token.encode("utf-8") if self.raw is None else self.raw


def fit_tokens(tokens: "tuple[TokenLogprob, ...] | list[TokenLogprob]", text: str) -> tuple[TokenLogprob, ...]:
    """The tokens of an answer cut to ``text``, the part of their text that was kept (a stop sequence cut
    the answer): tokens are kept while their text fits; the one that straddles the cut keeps its text before
    the cut; the rest are dropped, as is a token with nothing before the cut (a partial character's ""
    token right at it). Then the bytes: each kept token keeps as much of its own bytes as still matches
    ``text``'s UTF-8 (a token holding the first bytes of a character the cut removed keeps only what
    precedes it), and the last one gets whatever is still missing (a character begun by an earlier token's
    partial bytes is completed, not repeated).

    Then ``"".join(t.token for t in out) == text`` and ``b"".join(t.utf8 for t in out) == text.encode()``
    for tokens that joined to a text ``text`` begins. Tokens that already join to ``text`` come back as
    they are. Logprobs and alternatives are left alone: they are the model's for the token it generated.
    """
    tokens = tuple(tokens)
    if "".join(t.token for t in tokens) == text:
        return tokens
    cut, kept, pos = len(text), [], 0
    for t in tokens:
        if pos >= cut:
            break
        end = pos + len(t.token)
        if end <= cut:
            kept.append(t)
            pos = end
            continue
        kept.append(replace(t, token=t.token[: cut - pos], raw=None))  # its bytes are settled below
        break
    target, done = text.encode("utf-8"), 0
    out = []
    for i, t in enumerate(kept):
        own = t.utf8 if i < len(kept) - 1 else target[done:]  # the last token takes what is still missing
        rest = target[done:]
        n = 0
        while n < len(own) and n < len(rest) and own[n] == rest[n]:
            n += 1
        raw = own[:n]
        done += n
        out.append(t if raw == t.utf8 else replace(t, raw=raw))
    return tuple(out)


class HeldTokens:
    """A stream's tokens held back while a stop sequence may still cut them, for servers that hold back
    the text that could begin a stop sequence (vLLM, OpenAI-compatible servers): :meth:`feed` takes each
    chunk's text and tokens and gives back the tokens whose text the text sent so far covers whole;
    :meth:`finish` gives the rest, cut to the text left (:func:`fit_tokens`) when a stop sequence ended
    the answer. All the tokens given back then join to the text fed, in characters and in UTF-8 bytes."""

    __slots__ = ("text", "released", "token_end", "sent_end", "held")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.released = 0   # characters of text fed so far
        self.token_end = 0  # characters covered by the tokens fed so far
        self.sent_end = 0   # characters covered by the tokens given back so far
        self.held: list[tuple[int, TokenLogprob]] = []  # (start position, token) not given back yet

    def feed(self, text: str, tokens: "tuple[TokenLogprob, ...] | list[TokenLogprob]") -> tuple[TokenLogprob, ...]:
        self.text.append(text)
        self.released += len(text)
        for t in tokens:
            self.held.append((self.token_end, t))
            self.token_end += len(t.token)
        n = 0
        for start, t in self.held:
            if start >= self.released or start + len(t.token) > self.released:
                break
            n += 1
        if n:
            start, t = self.held[n - 1]
            self.sent_end = start + len(t.token)
        out, self.held = tuple(t for _start, t in self.held[:n]), self.held[n:]
        return out

    def finish(self, cut: bool = True) -> tuple[TokenLogprob, ...]:
        """The tokens still held, cut to the text left when ``cut`` (a stop sequence ended the answer)."""
        held, self.held = [t for _start, t in self.held], []
        return fit_tokens(held, "".join(self.text)[self.sent_end:]) if cut else tuple(held)


def stop_at(text: str, stops: "tuple[str, ...] | list[str]") -> int | None:
    """Where the earliest of the stop sequences begins in ``text``, or None where none is in it."""
    found = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    return min(found) if found else None


def stop_prefix_at_end(text: str, stops: "tuple[str, ...] | list[str]") -> int:
    """How many characters at the end of ``text`` could begin one of the stop strings (the longest proper
    prefix of one that ``text`` ends with): what a stream holds back until the next piece tells."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class HeldText:
    """A stream's text cut at its stop sequences, for an upstream that may not apply them itself (one that
    ignores ``stop``, or takes fewer than were asked): :meth:`feed` takes each piece of text and gives back
    what may go out, holding back only the text that could begin a stop sequence (as vLLM and OpenAI hold
    it), so that no text past a stop goes out, also when a stop is split across pieces; once a stop sequence
    came, :attr:`stopped` is set and the text given back ends before it (nothing more comes out).
    :meth:`finish` gives what is still held, at the answer's end."""

    __slots__ = ("stops", "pending", "stopped")

    def __init__(self, stops: "tuple[str, ...] | list[str]") -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # held back: it could begin a stop sequence (no stop begins before it)
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        at = stop_at(self.pending, self.stops)
        if at is not None:
            out, self.pending, self.stopped = self.pending[:at], "", True
            return out
        keep = len(self.pending) - stop_prefix_at_end(self.pending, self.stops)
        out, self.pending = self.pending[:keep], self.pending[keep:]
        return out

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: of ``prompt_tokens``, those the provider read from its prompt cache (billed at a cached-input price)
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    tokens: tuple[TokenLogprob, ...]
    finish_reason: str
    usage: Usage
    latency_s: float
    model: str
    #: seconds from the call to the first generated token, when the backend knows it
    ttft_s: float | None = None

    def replay(self) -> "list[StreamChunk]":
        """The answer as stream chunks, one per token (an answer generated whole, sent as a stream): their
        texts join to ``text`` and their tokens are ``tokens`` cut to it (:func:`fit_tokens`). Tokens that
        do not join to the text go in one chunk with the whole text; no tokens: one chunk with the text."""
        tokens = fit_tokens(self.tokens, self.text)
        if tokens and "".join(t.token for t in tokens) == self.text:
            return [StreamChunk(text=t.token, tokens=(t,)) for t in tokens]
        return [StreamChunk(text=self.text, tokens=tokens)]


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """A piece of a streamed answer. The last chunk carries ``finish_reason`` and ``usage``."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Feedback:
    """A label given to a request's answer (:meth:`cascade.engine.Engine.feedback`): 1 right, -1 wrong, 0 an
    earlier label withdrawn (a request's latest feedback is its label, for recalibration and drift)."""

    id: int
    request_id: str
    score: int
    #: the request whose answer it labels: a response-cache hit's original (the answer was that one's)
    answered_by: str
    #: the confidence the policy served the answer with (None: no policy decided it, a tier asked by name)
    confidence: float | None
    #: when the labelled request was made (``time.time()``)
    created_at: float


@dataclass(frozen=True, slots=True)
class Decision:
    """What the escalation policy decided for one attempt, and why."""

    escalate: bool
    reason: str
    confidence: float | None


@dataclass(slots=True)
class Attempt:
    """One call to one tier, successful or not. Every attempt is recorded in the ledger."""

    index: int
    tier: str
    model: str
    backend: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    confidence: float | None = None
    features: dict[str, float] = field(default_factory=dict)
    #: of ``prompt_tokens``, those the provider reported read from its prompt cache
    cached_prompt_tokens: int = 0
    decision: str = ""            # "accept" | "escalate" | "error" | "final"
    reason: str = ""
    error_class: str | None = None
    error_message: str | None = None
    kept: bool = False            # was this attempt's answer the one served?
    text: str | None = None
    #: backoff slept right before this attempt (tiers with several providers: a rate-limited retry)
    wait_ms: float = 0.0
    #: the max_tokens the request's cost budget cut this call to (``on_cost_budget: truncate``), else None
    max_tokens_cut: int | None = None
    #: a request that asked for no max_tokens, at its route's last tier: the tier's default cut to this to fit
    #: the tier's context after the prompt, else None
    max_tokens_fit: int | None = None
    #: this call ran out of the request's latency budget under ``on_latency_budget: best_answer``: the cascade
    #: went no further, serving the answer in hand if it had one (not stored; a shadow walks its chain by it)
    latency_budget_out: bool = False


@dataclass(slots=True)
class CascadeRecord:
    """The accounting of one request through a chain: what the ledger stores, what clients see."""

    request_id: str
    policy: str
    created_at: float
    attempts: list[Attempt] = field(default_factory=list)
    tier: str | None = None
    model: str | None = None
    confidence: float | None = None
    escalated: bool = False
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0      # what the last tier alone would have cost
    baseline_estimated: bool = False    # True when the last tier did not run and its cost is estimated
    escalation_waste_usd: float = 0.0   # cost of attempts whose answer was thrown away
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"                  # "ok" | "partial" (a stream cut after tokens) | "error" | "cancelled"
    error_class: str | None = None
    error_message: str | None = None
    api_key_id: str | None = None
    user_tier: str | None = None
    endpoint: str = "chat"
    #: a response-cache hit: the request whose answer was served again (this one made no attempt, cost 0)
    cached_from: str | None = None
    #: cost attribution given by the caller: its end user (OpenAI's ``user``) and tags (``metadata``)
    end_user: str | None = None
    metadata: dict[str, str] | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["n_attempts"] = len(self.attempts)
        d["savings_usd"] = self.baseline_cost_usd - self.cost_usd
        return d
