"""Any OpenAI-compatible HTTP server (hosted APIs, a vLLM server, llama.cpp's server, another cascade).

Uses the official ``openai`` async client with its own retries disabled (retries and fallback are the
engine's job, so they never stack). Token logprobs and top-k alternatives are requested on both
endpoints: chat (``logprobs=true, top_logprobs=k``) and completions (``logprobs=k``). Every ``openai``
exception is translated here into the engine's error tree, the original chained.

Options (a tier's or provider's ``options``): ``base_url``; ``api_key`` or ``api_key_env`` (the name of an
environment variable holding it); ``endpoint`` (``chat``, the default, or ``completions``); ``extra_body``
(fields added to every request's body, e.g. vLLM's ``top_k``); ``logprobs`` (default ``true``): ``false``
for a provider that refuses the ``logprobs``/``top_logprobs`` parameters with a 400 (Groq, DeepSeek's
reasoner): neither is sent (whatever ``top_logprobs`` a client asks for) and the answers carry no token
logprobs, so such a tier has no confidence: it can only be a route's last tier; ``reasoning`` (default
``false``): ``true`` for OpenAI's reasoning models, which also refuse ``max_tokens`` (``max_completion_tokens``
is sent), a temperature or top_p but their default (neither is sent) and, some, ``stop`` (applied here only).

What upstreams send is read in each real server's shape: llama.cpp's ``/v1/completions`` logprobs in the chat
shape (``{"content": [...]}``) as well as the legacy one; a ``null`` logprob (SGLang and llama.cpp write
``-inf`` so) floored; a reasoning model's thinking (``reasoning_content``/``reasoning`` beside the answer, its
tokens in the same ``logprobs.content``) left out of the answer's tokens; context overflows in OpenAI's, vLLM's
and llama.cpp's words; OpenAI's ``insufficient_quota`` 429 (out of credits, not a rate limit) and a 402 (Payment
Required: OpenRouter's and others', out of credits) as a refused credential (a 402 with a ``Retry-After``, a
spending limit that passes, as a rate limit); an error event in a streamed 200 (``data: {"error": ...}``, older
vLLM's ``{"object": "error", ...}``: vLLM's prompt too long for its model, found once the headers went out;
llama.cpp's ``error: {...}`` line, a field of its own), and a 200 whose body is ``{"error": {...}}``
(OpenRouter's), as the HTTP status it stands for. A streamed 200 that carries no answer (no event with
``choices``: an HTML page, a JSON body from a server that ignored ``stream``, only ``[DONE]``) is a malformed
response, a stream that ends without a finish reason (``""`` is none) was cut off, and an answer ended with
``finish_reason: "error"`` (OpenRouter's) is the provider's failure. A request's stop sequences are applied here
too (an upstream may ignore ``stop``, and OpenAI takes at most ``UPSTREAM_STOPS``, the first ones sent): the
answer ends before the earliest, streamed or not. So is ``max_tokens``, where the token logprobs tell where it
falls (an upstream may ignore it): the answer ends at the bound, ``finish_reason: "length"``.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from cascade.backends.base import Backend, option_number, option_str, option_url, tier_options
from cascade.errors import (
    CascadeError,
    ConfigError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderContextLengthError,
    ProviderError,
    ProviderInvalidRequestError,
    ProviderMisconfiguredError,
    ProviderServerError,
    ProviderTimeoutError,
    RateLimitedError,
)
from cascade.types import (
    GenerationRequest,
    GenerationResult,
    HeldText,
    HeldTokens,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
    answer_tokens,
    ends_in_high_surrogate,
    fit_tokens,
    paired_surrogates,
    stop_at,
)

log = logging.getLogger("cascade.backends.openai")

#: what an upstream's 400 says of a prompt too long for the model: OpenAI's and vLLM's "maximum context length",
#: vLLM's "The decoder prompt (length N) is longer than the maximum model length of M", llama.cpp's "request (N
#: tokens) exceeds the available context size (M tokens)", text-generation-inference's "`inputs` tokens +
#: `max_new_tokens` must be <= M" and "`inputs` must have less than M tokens"
_CONTEXT_MARKERS = ("context length", "context_length", "maximum context", "too many tokens", "prompt is too long",
                    "maximum model length", "exceeds the available context size", "`inputs` tokens + `max_new_tokens`",
                    "`inputs` must have less than")
#: the error ``code`` or ``type`` an upstream gives a context overflow (OpenAI's code, llama.cpp's type)
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
#: the ``code`` or ``type`` of OpenAI's 429 for an account out of credits: no rate limit that passes
_QUOTA_CODES = frozenset({"insufficient_quota"})


def _retry_after(headers: Any) -> float | None:
    """The server's wait hint in seconds: ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date, GMT
    even when written with ``-0000`` or no zone; a date already past means now). A value that is no wait
    (negative, not a number, infinite) is no hint: the next header is read, and with none the caller backs off
    with jitter, as with no header at all."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            wait = float(raw) * scale
        except ValueError:
            if name != "retry-after":
                continue
            from datetime import timezone
            from email.utils import parsedate_to_datetime

            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:  # "-0000" (RFC 2822's UTC) or no zone: an HTTP date is GMT, never our local time
                when = when.replace(tzinfo=timezone.utc)
            wait = max(0.0, when.timestamp() - time.time())
        if math.isfinite(wait) and wait >= 0:
            return wait
    return None


def _json_error_text(response: Any) -> str | None:
    """The ``error`` of an error response whose JSON body gives it as a string, else None."""
    try:
        error = json.loads(response.text).get("error")
    except Exception:  # noqa: BLE001 - no body, not JSON, not an object: no such text
        return None
    return error if isinstance(error, str) else None


def _failure_text(exc: BaseException) -> str:
    """What a connection failure says, from the first of its causes that says anything: on a connection reset the
    async client's ReadError (httpx's, httpcore's, anyio's) has no text of its own, only the OSError under it
    ("[Errno 104] Connection reset by peer"); the openai error's own "Connection error." says nothing more."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc.__cause__ or exc
    while cause is not None and cause not in seen:  # (a chain that loops: cut off)
        if text := str(cause).strip():
            return text
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc.__cause__ or exc).__name__


def _cut_off(exc: BaseException) -> bool:
    """Whether a connection failure broke an answer already on its way (h11: the body ended before the length
    its headers announced), rather than a request that got no response at all."""
    cause = exc.__cause__ or exc.__context__
    return cause is not None and "complete message body" in str(cause)


def translate_openai_error(exc: Exception, provider: str, secrets: Sequence[str] = ()) -> CascadeError:
    """Map an ``openai`` exception to our tree (the caller raises it ``from exc``). The upstream's text is
    redacted: providers echo the key (or the request's headers) in error bodies of any status, and this
    message reaches the client, the logs and the ledger. ``secrets``: the keys this backend sends."""
    import openai

    from cascade.resilience import redact

    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeoutError(f"{provider}: request timed out", provider=provider)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderConnectionError(redact(f"{provider}: connection failed ({_failure_text(exc)})", secrets),
                                       provider=provider, answered=_cut_off(exc))
    status: int | None = None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = str(getattr(exc, "message", "") or exc)
        if (said := _json_error_text(exc.response)) and said not in body:
            # {"error": "..."} (text-generation-inference's, and others'): the client's message is only "Error code:
            # N", without the upstream's reason, which says why (a prompt too long among them)
            body += f" - {said}"
        msg = redact(f"{provider}: HTTP {status}: {body}{_redirected(exc.response)}", secrets)
        retry = _retry_after(exc.response.headers if exc.response is not None else None)
    elif isinstance(exc, openai.APIError) and isinstance(exc.body, dict | str):
        # an error event in a 200's stream (``data: {"error": {...}}``, TGI's ``{"error": "..."}``): how a server
        # fails once its headers went out (vLLM's prompt longer than the model's context, a rate limit, an engine
        # crash), read as the HTTP status it stands for, so that it is retried, fallen over or escalated as that
        # status would be
        body = exc.body if isinstance(exc.body, str) else str(exc.message or "")
        status = _event_status(exc, body)
        msg = redact(f"{provider}: error in the stream (as HTTP {status}): {body}", secrets)
        retry = None
    if status is not None:
        return _status_error(exc, provider, status, msg, body, retry)
    if isinstance(exc, openai.OpenAIError):
        return ProviderError(redact(f"{provider}: {exc}", secrets), provider=provider)
    return ProviderError(redact(f"{provider}: {type(exc).__name__}: {exc}", secrets), provider=provider)


def _status_error(exc: Any, provider: str, status: int, msg: str, body: str,
                  retry: float | None) -> CascadeError:
    """The error an upstream's HTTP status (or the status an error event stands for) is, in our tree. ``exc``: what
    carries the upstream's error ``code`` and ``type`` (the openai exception); ``msg``: the message, redacted;
    ``body``: the upstream's own text."""
    if status == 402 and retry is not None:
        # a 402 with a wait: a spending limit that passes (OpenRouter's in-flight budget, full while paid
        # requests settle): as a rate limit, waited for and retried within the tier's limits
        return RateLimitedError(msg, provider=provider, status=status, retry_after=retry)
    if status == 402 or (status == 429 and _error_codes(exc) & _QUOTA_CODES):
        # out of credits (402 Payment Required without a wait: OpenRouter's and others'; OpenAI's 429
        # insufficient_quota): every call fails until someone pays, so it is a refused credential (the breaker
        # forced open, the tier falls over), not a rate limit or a failure retried on every request
        what = "HTTP 402" if status == 402 else "HTTP 429 insufficient_quota"
        return ProviderAuthError(f"{provider}: account out of quota or credits ({what})", provider=provider,
                                 status=status)
    if status == 429:
        return RateLimitedError(msg, provider=provider, status=status, retry_after=retry)
    if status in (401, 403):  # the body says no more than this, and may quote (part of) the key
        return ProviderAuthError(f"{provider}: credentials rejected (HTTP {status})", provider=provider,
                                 status=status)
    if status == 404:  # the upstream has no such model or route: our configuration's fault, not the client's;
        # another provider may have it, while the client's retries would meet the same 404
        return ProviderMisconfiguredError(msg, provider=provider, status=status)
    if status in (400, 413, 422):
        if any(m in body.lower() for m in _CONTEXT_MARKERS) or _error_codes(exc) & _CONTEXT_CODES:
            return ProviderContextLengthError(msg, provider=provider, status=status)
        if "stream_options" in f"{body} {getattr(exc, 'body', '')}" or getattr(exc, "param", None) == "stream_options":
            # a parameter this backend sends on its own (Mistral's API refuses it with a 422): the tier's
            # configuration is at fault, not the client's request; another provider may take it
            return ProviderMisconfiguredError(f"{msg} (the upstream refuses stream_options: set the tier's "
                                              "options.stream_usage: false)", provider=provider, status=status)
        # the upstream's own code for what is wrong with the request (e.g. invalid_value) tells the client most;
        # vLLM's and llama.cpp's code is the status itself (400, which the openai client makes "400"): no code
        code = getattr(exc, "code", None)
        return ProviderInvalidRequestError(msg, provider=provider, status=status,
                                           code=code if isinstance(code, str) and code and not code.isdigit()
                                           else None)
    if status >= 500:
        return ProviderServerError(msg, provider=provider, status=status, retry_after=retry)
    return ProviderError(msg, provider=provider, status=status)


def answer_error(provider: str, error: Any, secrets: Sequence[str] = ()) -> CascadeError:
    """A 200 whose body is an error object where an answer should be (``{"error": {"code": 502, "message": ...}}``:
    OpenRouter's, for a failure once the model began; a proxy's), read as the HTTP status it stands for, as an
    error event in a stream is (it was a malformed response, whatever status or text it gave)."""
    from types import SimpleNamespace

    from cascade.resilience import redact

    fields = error if isinstance(error, dict) else {}
    code = fields.get("code")
    # as the openai client reads an error body: its code as a string (a number's digits), its type as given
    said = SimpleNamespace(code=str(code) if code is not None else None, type=fields.get("type"))
    body = error if isinstance(error, str) else str(fields.get("message") or "")
    status = _event_status(said, body)
    msg = redact(f"{provider}: error in the answer (as HTTP {status}): {body}", secrets)
    return _status_error(said, provider, status, msg, body, None)


def _redirected(response: Any) -> str:
    """What an error's message adds when the upstream redirected the call: the status that came back is the
    answer to where the redirect pointed, and a 301, 302 or 303 turned the POST into a GET (httpx does as
    browsers do), so its 405 or 404 says nothing of the request itself. The fix is the tier's ``base_url``."""
    history = getattr(response, "history", None) or ()
    if not history:
        return ""
    first = history[0]
    became_get = any(r.status_code in (301, 302, 303) for r in history)
    return (f" (the upstream redirected {first.request.method} {first.request.url} with HTTP {first.status_code} to "
            f"{response.request.url}{', which made it a GET' if became_get else ''}: set the tier's base_url to "
            "where it points)")


def _error_codes(exc: Any) -> set[str]:
    """The ``code`` and ``type`` an upstream's error body gave (vLLM's and llama.cpp's code is the HTTP status as a
    number, which the openai client may make a string: it names nothing here)."""
    return {v for v in (getattr(exc, "code", None), getattr(exc, "type", None)) if isinstance(v, str) and v}


def _error_event(event: Any, response: Any) -> Exception:
    """An error event without an ``error`` key (older vLLM sends its ErrorResponse as the event), as the openai
    client raises the one with it: the ``APIError`` that :func:`translate_openai_error` reads as its status."""
    import openai

    body = event.model_dump() if hasattr(event, "model_dump") else {}
    return openai.APIError(str(body.get("message") or "an error event"), response.request, body=body)


#: the HTTP status an error event's ``code`` or ``type`` stands for (OpenAI's types and codes, vLLM's exception names)
_EVENT_STATUS = {"invalid_request_error": 400, "BadRequestError": 400, "context_length_exceeded": 400,
                 "exceed_context_size_error": 400, "authentication_error": 401, "invalid_api_key": 401,
                 "permission_error": 403, "not_found_error": 404, "NotFoundError": 404, "rate_limit_error": 429,
                 "rate_limit_exceeded": 429, "insufficient_quota": 429,
                 # text-generation-inference's error_type: a request it refuses (its 422: a bad parameter, a chat
                 # template or tools it cannot render), its queue full (its 429); a generation failure is a 5xx
                 "validation": 422, "template_error": 422, "tool_error": 422, "missing_template_variable": 422,
                 "overloaded": 429}


def _event_status(exc: Any, message: str) -> int:
    """The HTTP status an error event in a stream stands for: its numeric ``code`` (vLLM's, llama.cpp's,
    OpenRouter's: the status the server would have sent), else what its ``code`` or ``type`` names, else a
    context overflow in the message's words (400); anything else is the server's failure (500)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int | str) and str(code).isdigit() and 400 <= int(code) < 600:
        return int(code)
    for name in (code, getattr(exc, "type", None)):  # the code says most
        if isinstance(name, str) and name in _EVENT_STATUS:
            return _EVENT_STATUS[name]
    return 400 if any(m in message.lower() for m in _CONTEXT_MARKERS) else 500


def _error_field_event(value: str) -> str:
    """The ``data`` of the event that llama.cpp's ``error: {...}`` line stands for: ``{"error": {...}}``, which the
    openai client raises as the ``APIError`` that :func:`translate_openai_error` reads as its status (its text,
    when it is no JSON object, as the error's message)."""
    try:
        body = json.loads(value)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not body:
        body = value.strip() or "an error event with no message"
    return json.dumps({"error": body})


def _typed_error_event(value: str) -> str | None:
    """The ``data`` of text-generation-inference's error event, ``{"error": "...", "error_type": "validation"}``,
    as ``{"error": {"message": ..., "type": ...}}``: the openai client keeps only the ``error`` string, so the
    type that says whether the request was refused (never retried) or the server overloaded (retried) was lost
    and every such event read as a server failure. None when ``value`` is no such event."""
    try:
        body = json.loads(value)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not isinstance(
            body.get("error_type"), str):
        return None
    return json.dumps({"error": {"message": body["error"], "type": body["error_type"]}})


@functools.cache
def _client_class() -> Any:
    """``openai.AsyncOpenAI`` whose stream decoder also reads llama.cpp's error event. llama.cpp's server, failing
    once a stream's headers went out (a decode failure, a context shift refused), writes the error under a
    field of its own, ``error: {"code": 500, "message": ..., "type": ...}``, where the others write ``data:``;
    the SSE decoder ignores a field it does not know, so the stream just ended: a cut answer, or a malformed
    one, whatever the error said. Read as ``data: {"error": ...}``, it is the status it stands for, as the
    other servers' error events are; so is text-generation-inference's typed event (:func:`_typed_error_event`).
    An event that carries no data (a ``retry:``, ``id:`` or ``event:`` field alone, a bare ``data:``; the blank line
    after a keep-alive comment once an ``id:`` came, as gateways that number their events write it) is none: the
    SDK's decoder passed it on, its empty data read as JSON, and the whole stream failed as a malformed response.
    (``_make_sse_decoder`` is the SDK's hook for a decoder of one's own.)
    Made once, on first use: the SDK is imported only by a tier that uses it."""
    import openai
    from openai._streaming import SSEDecoder

    class ErrorFieldDecoder(SSEDecoder):
        def decode(self, line: str) -> Any:
            if not line and not "".join(self._data).strip():  # the end of an event without data: no event
                self._event, self._data, self._retry = None, [], None
                return None
            name, colon, value = line.partition(":")
            if name == "error" and colon:
                line = "data: " + _error_field_event(value)
            elif name == "data" and '"error_type"' in value and (typed := _typed_error_event(value)) is not None:
                line = "data: " + typed
            return super().decode(line)

    class Client(openai.AsyncOpenAI):
        def _make_sse_decoder(self) -> Any:
            return ErrorFieldDecoder()

    return Client


#: the most stop sequences sent upstream: OpenAI refuses more (a 400); the rest are applied here, as are those a
#: server ignores
UPSTREAM_STOPS = 4

#: the body fields each call sets from the request and the tier (``options.extra_body`` may not override them)
_OWN_FIELDS = frozenset({"model", "messages", "prompt", "stream", "stream_options", "max_tokens",
                         "max_completion_tokens", "logprobs", "top_logprobs", "temperature", "top_p", "stop", "seed",
                         "n", "echo"})


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, *, model: str, name: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, api_key_env: str | None = None, endpoint: str = "chat",
                 timeout_s: float = 120.0, context_length: int | None = None,
                 extra_body: dict[str, Any] | None = None, logprobs: bool | None = None, reasoning: bool = False,
                 stream_usage: bool = True, **unknown: Any) -> None:
        super().__init__(model=model, name=name)
        if unknown:
            raise ConfigError(f"tier {self.name!r}: unknown openai option(s) {sorted(unknown)}; known: "
                              "base_url, api_key, api_key_env, endpoint, extra_body, logprobs, reasoning, "
                              "stream_usage")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ConfigError(f"tier {self.name!r}: options.logprobs must be true or false")
        if not isinstance(reasoning, bool):
            raise ConfigError(f"tier {self.name!r}: options.reasoning must be true or false")
        if not isinstance(stream_usage, bool):
            raise ConfigError(f"tier {self.name!r}: options.stream_usage must be true or false")
        if reasoning and logprobs:
            raise ConfigError(f"tier {self.name!r}: options.reasoning is true, and a reasoning model gives no token "
                              "logprobs: leave options.logprobs out")
        if endpoint not in ("chat", "completions"):
            raise ConfigError(f"tier {self.name!r}: options.endpoint must be 'chat' or 'completions'")
        if api_key is not None and api_key_env:
            raise ConfigError(f"tier {self.name!r}: options api_key and api_key_env are both set: give one")
        if api_key is not None and not isinstance(api_key, str):  # (its value not quoted: it is a secret)
            raise ConfigError(f"tier {self.name!r}: options.api_key must be a string, not {type(api_key).__name__}: "
                              "quote the key in the config")
        if api_key is not None and not api_key.strip():
            raise ConfigError(f"tier {self.name!r}: options.api_key is empty: leave it out (no key), or give the key")
        if api_key is None and option_str(self.name, "api_key_env", api_key_env or None):
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ConfigError(f"tier {self.name!r}: environment variable {api_key_env} is not set")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ConfigError(f"tier {self.name!r}: options.extra_body must be a mapping of body fields")
        if taken := sorted(set(extra_body or ()) & _OWN_FIELDS):
            raise ConfigError(f"tier {self.name!r}: options.extra_body sets {taken}, which the cascade sets itself "
                              "on every call (for token logprobs: options.logprobs)")
        self.base_url = option_url(self.name, "base_url", base_url)
        self._api_key = api_key or "unused"
        self._endpoint = endpoint
        # (the tier's timeout_s, or an option of that name: one that is no number failed every call)
        self._timeout = option_number(self.name, "timeout_s", timeout_s)
        self._ctx = context_length
        self._extra_body = extra_body or {}
        #: OpenAI's reasoning models (o-series, gpt-5): ``max_completion_tokens`` for ``max_tokens`` (which they
        #: refuse), no temperature or top_p (only their default is taken), no logprobs, and the stop sequences
        #: applied here only (o3 and o4-mini refuse ``stop``)
        self._reasoning = reasoning
        #: ask for token logprobs (``options.logprobs: false``: a provider that refuses the parameters)
        self._logprobs = not reasoning if logprobs is None else logprobs
        #: ask a stream for its usage (``stream_options.include_usage``); ``options.stream_usage: false``: a provider
        #: that refuses the parameter (Mistral's API, with a 422), whose streams' usage is then estimated
        self._stream_usage = stream_usage
        self._client: Any = None
        #: the exception classes of malformed answers whose traceback this backend has logged (once each)
        self._traced: set[str] = set()

    @classmethod
    def from_tier(cls, tier, config):  # noqa: ANN001, ANN206
        opts = tier_options(tier, cls.kind, "context_length")
        opts.setdefault("timeout_s", tier.timeout_s)
        return cls(model=tier.model, name=tier.name, context_length=tier.context_length, **opts)

    @property
    def context_length(self) -> int | None:
        return self._ctx

    def _secrets(self) -> tuple[str, ...]:
        """What this backend sends that an upstream's error text must never carry on: its API key."""
        return (self._api_key,) if self._api_key != "unused" else ()

    async def start(self) -> None:
        if self._client is None:
            import openai

            import httpx

            # Idle keep-alive shorter than the servers' own (uvicorn and vLLM close idle connections at
            # 5 s): otherwise a request can race the server's close and fail with a spurious reset.
            http_client = openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0))
            self._client = _client_class()(base_url=self.base_url, api_key=self._api_key,
                                           max_retries=0, timeout=self._timeout, http_client=http_client)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- request building -------------------------------------------------------------------------
    def _use_chat(self, request: GenerationRequest) -> bool:
        return request.messages is not None and self._endpoint == "chat"

    def _kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model}
        if not self._reasoning:
            kw.update(temperature=request.temperature, top_p=request.top_p)
        if request.max_tokens is not None:
            kw["max_completion_tokens" if self._reasoning else "max_tokens"] = request.max_tokens
        if request.stop and not self._reasoning:
            kw["stop"] = list(request.stop[:UPSTREAM_STOPS])
        if request.seed is not None:
            kw["seed"] = request.seed
        if self._extra_body:
            kw["extra_body"] = dict(self._extra_body)
        if self._use_chat(request):
            # the messages go into the body as they are (plain dicts in the wire's shape): given as ``messages``
            # the SDK would walk each one through its TypedDict transform on the event loop, ~150 us a
            # message (a 1 MB body of 34k empty messages held every other request for 5 s); the SDK's own
            # ``messages`` is required, so it gets an empty list that the body's replaces
            kw["messages"] = []
            kw["extra_body"] = {**kw.get("extra_body", {}), "messages": [m.as_dict() for m in request.messages or ()]}
            if self._logprobs:
                kw["logprobs"] = True
                if request.top_logprobs:
                    kw["top_logprobs"] = request.top_logprobs
        else:
            prompt = request.prompt
            if prompt is None:  # chat messages sent to a completions-only server: plain transcript
                prompt = "".join(f"{m.role}: {m.content}\n" for m in request.messages or ()) + "assistant:"
            kw["prompt"] = prompt
            if self._logprobs:
                kw["logprobs"] = max(1, request.top_logprobs)
        return kw

    # --- generation -------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self.start()
        t0 = time.perf_counter()
        with _translated(self.name, self._secrets(), request, self._traced):
            if self._use_chat(request):
                resp = await self._client.chat.completions.create(**self._kwargs(request))
                self._check_answered(resp)
                choice = resp.choices[0]
                text = choice.message.content or ""
                tokens = _chat_tokens(choice.logprobs) if self._logprobs else ()
                generated = len(tokens)  # a reasoning model's thinking included: it is billed
                if tokens and _reasoning(choice.message):
                    tokens = _answer_tail(tokens, text)
            else:
                resp = await self._client.completions.create(**self._kwargs(request))
                self._check_answered(resp)
                choice = resp.choices[0]
                text = choice.text or ""
                tokens = _completion_tokens(choice.logprobs) if self._logprobs else ()
                generated = len(tokens)
            # a lone surrogate (valid JSON) is no text UTF-8 can carry; a text that is no string (a list of parts, a
            # number) is a malformed answer (TypeError)
            text = paired_surrogates(text)
        if choice.finish_reason == "error":
            raise self._failed_mid_answer(text)
        finish = _finish(choice.finish_reason)
        if request.max_tokens is not None and generated > request.max_tokens and (cut := _first_tokens(
                text, tokens, request.max_tokens - (generated - len(tokens)))) is not None:
            # an upstream that ignores max_tokens (a proxy that drops it, a llama.cpp server whose own n_predict
            # wins) answers past it: the answer is cut at the bound, as the upstream should have cut it (the
            # thinking of a reasoning model counts against it first, as there); its usage stays what it billed
            text, tokens = cut
            finish = "length"
        if request.stop:
            # a server that ignores ``stop`` (or got only the first UPSTREAM_STOPS) answers past a stop sequence: the
            # answer ends before the earliest, as OpenAI's would; and a server may send the logprobs of the tokens
            # its stop sequence cut away: the tokens are cut to the text either way
            if (at := stop_at(text, request.stop)) is not None:
                text, finish = text[:at], "stop"
            tokens = fit_tokens(tokens, text)
        latency = time.perf_counter() - t0
        return GenerationResult(
            text=text, tokens=tokens, finish_reason=finish,
            usage=self._usage(resp.usage, request, generated, text),
            latency_s=latency, model=getattr(resp, "model", None) or self.model)

    def _check_answered(self, resp: Any) -> None:
        """Raise the error a 200's body states in place of an answer (no ``choices``, an ``error``): see
        :func:`answer_error`."""
        error = (getattr(resp, "model_extra", None) or {}).get("error") if not getattr(resp, "choices", None) else None
        if error:
            raise answer_error(self.name, error, self._secrets())

    async def _check_stream_answered(self, response: Any) -> None:
        """Raise the error a 200 to a stream request states in a JSON body (``{"error": {...}}``, no events: some
        gateways answer a stream so), as :meth:`_check_answered` does unstreamed: read as an event stream, it
        carried no answer, a malformed response billed as answered, the upstream's text lost. Another JSON body
        (a server that ignores ``stream``) is read on as the stream's, from the bytes read here."""
        if not response.headers.get("content-type", "").split(";")[0].strip().lower().endswith("json"):
            return
        import openai

        try:
            raw = await response.aread()
        except Exception as exc:  # noqa: BLE001 - the transport's error, read as the client reads any other body's
            # (a body cut off, one said to be gzip that is not, a read that timed out): raw, the engine knew none of
            # them (its traceback logged; a ProviderError, neither fallen over as a cut answer nor billed as one)
            http = sys.modules[type(response).__module__.partition(".")[0]]  # httpx, or the SDK's httpx2
            if isinstance(exc, http.TimeoutException):
                raise openai.APITimeoutError(request=response.request) from exc
            if isinstance(exc, http.RequestError):
                raise openai.APIConnectionError(request=response.request) from exc
            raise
        try:
            body = json.loads(raw)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("error") and not body.get("choices"):
            raise answer_error(self.name, body["error"], self._secrets())

    def _failed_mid_answer(self, text: str) -> ProviderServerError:
        """An answer the upstream ended with ``finish_reason: "error"`` (OpenRouter's, when the model's provider
        failed while it generated): what came is part of an answer, not one that stopped. The provider's
        failure, fallen over as a 5xx; it answered, so the call is billed."""
        return ProviderServerError(f"{self.name}: the upstream ended the answer with finish_reason 'error' (it "
                                   f"failed mid-answer, after {len(text)} characters)", provider=self.name,
                                   status=500, answered=True)

    def _usage(self, usage: Any, request: GenerationRequest, generated: int, text: str) -> Usage:
        """A call's ``usage`` as the upstream gave it. A server that sends none (or leaves a count out) still
        bills the call: what it did not say is estimated (the prompt as budgets count it, the answer by its
        ``generated`` tokens' logprobs or, without them, its ``text``)."""
        prompt = _count(_field(usage, "prompt_tokens")) or self.estimate_prompt_tokens(request)
        return Usage(prompt, _count(_field(usage, "completion_tokens")) or answer_tokens(generated, text),
                     _cached(usage, prompt))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        await self.start()
        kw = self._kwargs(request)
        kw["stream"] = True
        if self._stream_usage:
            kw["stream_options"] = {"include_usage": True}
        chat = self._use_chat(request)
        # with stop sequences, the text that could begin one is held back until the next chunk tells (a server
        # that ignores them, or got only the first UPSTREAM_STOPS, may send one, split across chunks or not: the
        # answer ends before it, and the stream is closed), and a token goes out once the text sent covers it (the
        # stop may cut it): the tokens then join to the text, whatever logprobs of cut tokens the server sends
        held = HeldText(request.stop) if request.stop else None
        hold = HeldTokens() if request.stop else None
        import openai

        with _translated(self.name, self._secrets(), request, self._traced):
            api = self._client.chat.completions if chat else self._client.completions
            stream = await api.create(**kw)
            read: AsyncIterator[Any] | None = None
            try:
                await self._check_stream_answered(stream.response)
                finish: str | None = None
                usage: Usage | None = None
                answered = False  # an event with choices came: the body is an answer's stream
                seen_text, seen_tokens = [], 0  # for a usage block that leaves a count out
                limit = request.max_tokens
                over = False  # the upstream went past max_tokens: the answer ended at the bound
                # the first half of a surrogate pair that ended a chunk (a server that cut its text by UTF-16
                # units): held for the next chunk, which may start with its second half
                carry = ""
                lost = False  # the connection was lost after the answer's finish reason came

                async def events() -> AsyncIterator[Any]:
                    """The stream's events, to a connection lost once the answer's finish reason had come: that
                    ends it (the answer is whole; what did not come is at most its usage, estimated as when a
                    server sends none), rather than failing an answer its client has had in full."""
                    nonlocal lost
                    it = aiter(stream)
                    while True:
                        try:
                            ev = await anext(it)
                        except StopAsyncIteration:
                            return
                        except openai.APIConnectionError as exc:
                            if finish is None:
                                raise
                            lost = True
                            log.warning("%s: the stream's connection was lost after its finish reason (%s): the "
                                        "answer is whole, its usage estimated", self.name, type(exc).__name__)
                            return
                        yield ev

                read = events()
                async for ev in read:
                    if getattr(ev, "object", None) == "error":  # older vLLM's error event: its ErrorResponse
                        raise _error_event(ev, stream.response)  # itself ({"object": "error", "code": 400, ...})
                    if ev.choices:
                        answered = True
                        ch = ev.choices[0]
                        before = seen_tokens
                        if chat:
                            delta = ch.delta
                            text = (delta.content or "") if delta else ""
                            toks = _chat_tokens(ch.logprobs) if self._logprobs else ()
                            seen_tokens += len(toks)  # a reasoning model's thinking included: it is billed
                            if toks and delta is not None and _reasoning(delta):  # thinking: not the answer's
                                toks = _answer_tail(toks, text)
                        else:
                            text = ch.text or ""
                            toks = _completion_tokens(ch.logprobs) if self._logprobs else ()
                            seen_tokens += len(toks)
                        if ch.finish_reason == "error":  # its text, if any, is not passed on: no answer's end
                            raise self._failed_mid_answer("".join(seen_text) + text)
                        finish = _finish(ch.finish_reason) if _ends(ch.finish_reason) else finish
                        if limit is not None and seen_tokens > limit:
                            # past max_tokens (an upstream that ignores it): this chunk's answer is cut at the
                            # bound (its thinking counted first), where its tokens join to its text, else passed
                            # whole (over by less than a chunk), and the stream ends there, closed so that the
                            # upstream stops generating what would be billed
                            room = limit - before - (seen_tokens - before - len(toks))
                            text, toks = _first_tokens(text, toks, room) or (text, toks)
                            over = True
                        text, carry = carry + text, ""
                        if ends_in_high_surrogate(text):
                            text, carry = text[:-1], text[-1]
                        text = paired_surrogates(text)
                        seen_text.append(text)
                        if held is not None and hold is not None:
                            text = held.feed(text)
                            toks = hold.feed(text, toks) + (hold.finish() if held.stopped else ())
                        if text or toks:
                            yield StreamChunk(text=text, tokens=toks)
                    if ev.usage is not None:  # a count it leaves out is estimated, as for an answer without usage
                        usage = self._usage(ev.usage, request, seen_tokens, "".join(seen_text))
                    if held is not None and held.stopped:  # what the server sends after it is no answer's
                        finish = "stop"
                        break
                    if over:
                        finish = "length"
                        break
                if not answered:  # a 200 whose body is no answer's stream: as the same body unstreamed
                    ctype = stream.response.headers.get("content-type", "")
                    raise malformed_response(self.name, ValueError(
                        f"the stream carried no answer (no event with choices; content-type {ctype!r})"),
                        self._secrets(), self._traced)
                if finish is None:  # every server ends an answer with its finish reason: this one was cut off
                    raise ProviderConnectionError(
                        f"{self.name}: the stream ended without a finish reason (cut off after "
                        f"{len(''.join(seen_text))} characters)", provider=self.name, answered=True)
                if held is not None and held.stopped:
                    # cut at a stop sequence: the rest of the server's stream (its usage too) is not read, the
                    # call's tokens are estimated from what came
                    tail = ""
                    usage = usage or self._usage(None, request, seen_tokens, "".join(seen_text))
                else:
                    tail = paired_surrogates(carry)  # a first half that no second half followed: U+FFFD
                    if held is not None:
                        tail = held.feed(tail) + ("" if held.stopped else held.finish())
                        finish = "stop" if held.stopped else finish
                    if over or lost:  # the rest of the stream was not read (or lost): as for a stop sequence
                        usage = usage or self._usage(None, request, seen_tokens, "".join(seen_text))
                rest = hold.feed(tail, ()) + hold.finish() if hold is not None else ()
                yield StreamChunk(text=tail, tokens=rest, finish_reason=finish, usage=usage)
            finally:  # a consumer that stops early: the HTTP response is closed now, not by the collector
                if read is not None:
                    await read.aclose()
                await stream.close()


def _first_tokens(text: str, tokens: tuple[TokenLogprob, ...],
                  n: int) -> tuple[str, tuple[TokenLogprob, ...]] | None:
    """An answer (or a stream's chunk) cut to its first ``n`` tokens: the text they make up, and those tokens.
    The cut is found where the tokens join to the text, by their text or by their bytes (a token that holds part
    of a character: the cut keeps the whole characters before it); None where they join to it neither way (the
    answer cannot be cut at a token), or there is nothing to cut. None or fewer tokens: none of the text."""
    n = max(0, n)
    if n >= len(tokens) and (tokens or n):
        return None
    if n == 0:
        return "", ()
    if "".join(t.token for t in tokens) == text:
        return text[:sum(len(t.token) for t in tokens[:n])], tokens[:n]
    if b"".join(t.utf8 for t in tokens) == text.encode("utf-8", "surrogatepass"):
        # the characters the first n tokens' bytes complete (a character they end inside is left out, as a
        # server that stops there leaves it)
        head = codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(t.utf8 for t in tokens[:n]))
        return head, fit_tokens(tokens[:n], head)
    return None


#: what reading a malformed answer raises (a body that is no JSON, no ``choices``, a field of the wrong type, JSON
#: nested deeper than the decoder recurses)
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)


@contextlib.contextmanager
def _translated(provider: str, secrets: Sequence[str] = (), request: GenerationRequest | None = None,
                traced: set[str] | None = None) -> Iterator[None]:
    """Around the ``openai`` client's calls (and a stream's reading, yields included): what they raise, in
    our error tree, the original chained, its message quoting none of the ``request``'s text (an upstream's
    refusal may quote the prompt: see :func:`~cascade.resilience.unquoted`). A consumer leaving a stream
    (``GeneratorExit``) passes through."""
    import openai

    from cascade.resilience import unquoted

    try:
        try:
            yield
        except openai.OpenAIError as exc:
            raise translate_openai_error(exc, provider, secrets) from exc
        except UnicodeEncodeError as exc:  # before any byte left: a header (the API key) HTTP cannot carry
            raise unsendable(provider, exc) from exc
        except _MALFORMED as exc:
            raise malformed_response(provider, exc, secrets, traced) from exc
    except CascadeError as exc:
        if request is not None:
            texts = [m.content or "" for m in request.messages or ()] + [request.prompt or ""]
            if exc.message != (clean := unquoted(exc.message, texts)):
                exc.message, exc.args = clean, (clean,)
        raise


def unsendable(provider: str, exc: UnicodeEncodeError) -> ProviderAuthError:
    """A request this client cannot send: a header, in practice the API key, holds a character HTTP headers
    cannot carry. Nothing reached the provider; the key must be fixed (as for a key the provider refuses)."""
    return ProviderAuthError(f"{provider}: the API key or a header cannot be sent ({exc.reason}: a character "
                             "HTTP headers cannot carry); fix the tier's key", provider=provider)


def malformed_response(provider: str, exc: Exception, secrets: Sequence[str] = (),
                       traced: set[str] | None = None) -> ProviderServerError:
    """A 200 answer this backend cannot read: the provider's fault, so the call may fall over. Logged with its
    traceback the first time a provider's answer fails so (an answer of a shape this code does not expect looks
    the same from here), in one line after that: a provider that garbles every answer wrote some 40 lines for
    each call, thousands for a few hundred requests, each the same. ``traced``: the exception classes whose
    traceback the calling backend has logged (its own set, so a backend built anew, by a reload, logs again;
    None: always logged)."""
    from cascade.resilience import redact

    first = traced is None or type(exc).__name__ not in traced
    if traced is not None:
        traced.add(type(exc).__name__)
    log.warning("%s: malformed response: %s%s", provider, type(exc).__name__,
                "" if first else " (its traceback was logged at the first one)", exc_info=exc if first else None)
    return ProviderServerError(redact(f"{provider}: malformed response ({type(exc).__name__}: {exc})", secrets),
                               provider=provider, answered=True)


#: the lowest logprob passed on: a token's probability of 0 (-inf upstream) is -9999, as OpenAI sends it
LOGPROB_MIN = -9999.0
#: a chosen token's ``null`` logprob (legacy completions' first echoed token; SGLang and llama.cpp write -inf as
#: null): very unlikely, not impossible (it was chosen). An alternative's ``null`` is ``LOGPROB_MIN``, as -inf is
NULL_TOKEN_LOGPROB = -30.0
#: how far above 0 rounding may put a sure token's logprob (it is then 0)
_LOGPROB_SLACK = 1e-3
#: the finish reasons of OpenAI's protocol; any other an upstream sends is "stop"
_FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})


def _logprob(value: Any, if_null: float = LOGPROB_MIN) -> float:
    """An upstream's token logprob as the log of a probability: below ``LOGPROB_MIN`` (``-inf`` too) it is
    ``LOGPROB_MIN``, a hair above 0 is 0, ``None`` (JSON's null: how SGLang and llama.cpp write -inf) is
    ``if_null``. NaN, a positive value or no number is not a logprob: ValueError (a malformed answer, whose
    tier falls over: a confidence from it would be made up; JSON has no NaN)."""
    if value is None:
        return if_null
    x = float(value)
    if not x <= _LOGPROB_SLACK:  # NaN, +inf, 5.0
        raise ValueError(f"token logprob {value!r} is not the log of a probability")
    return min(0.0, max(x, LOGPROB_MIN))


def _cached(usage: Any, prompt_tokens: int) -> int:
    """Of a call's ``prompt_tokens``, those the upstream read from its prompt cache: OpenAI's (and vLLM's, with
    prefix caching) ``usage.prompt_tokens_details.cached_tokens``; 0 where it says none (a count that is no
    count reads as 0, one above the prompt as the whole prompt)."""
    details = _field(usage, "prompt_tokens_details") if usage is not None else None
    return min(_count(_field(details, "cached_tokens")), prompt_tokens) if details is not None else 0


#: the largest token count an upstream's ``usage`` is believed: more than any model's context window (10M tokens,
#: the largest yet), and small enough that a request's sums fit the ledger's 32-bit INTEGER columns (PostgreSQL's)
_MAX_COUNT = 2**24


def _count(value: Any) -> int:
    """A token count of an upstream's ``usage``, or 0 (then estimated, as a count it leaves out) where it is
    none: negative, fractional, not finite, not a number, above ``_MAX_COUNT`` (a NaN or negative count made
    negative costs, and a NaN or a 1e300 one a request the ledger could not hold: no row, a raw OverflowError)."""
    if isinstance(value, bool):
        return 0
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0
    return int(x) if math.isfinite(x) and 0 <= x <= _MAX_COUNT and x == int(x) else 0


#: what some servers write in a stream's chunk for "not finished" where OpenAI writes null: "" (SGLang before 0.4.4,
#: Ollama, LocalAI), "null" (KoboldCpp)
_NOT_FINISHED = frozenset({"", "null"})


def _ends(value: Any) -> bool:
    """Whether a stream's chunk says the answer ended: a finish reason that is not null, nor one of the ways some
    servers write null (``_NOT_FINISHED``). Read as "stop", those made every chunk an answer's end: a stream cut
    off after them passed for a whole answer."""
    return value is not None and not (isinstance(value, str) and value.strip() in _NOT_FINISHED)


def _finish(value: Any) -> str:
    """An upstream's finish reason, one of OpenAI's (anything else, a number included, is "stop")."""
    return value if isinstance(value, str) and value in _FINISH_REASONS else "stop"


def _field(item: Any, name: str) -> Any:
    """A field of an upstream's object, parsed (the SDK's model) or not (a dict: what the SDK leaves of a field
    its model lacks, as llama.cpp's ``content`` in a completion's logprobs)."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _chat_tokens(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """The tokens of ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``: chat's logprobs, and
    llama.cpp's completions' (the same shape)."""
    content = _field(logprobs, "content") or ()
    return tuple(
        TokenLogprob(token=_token(_field(c, "token")), logprob=_logprob(_field(c, "logprob"), NULL_TOKEN_LOGPROB),
                     raw=_raw(c),
                     # most likely first, as OpenAI sends them (vLLM's server lists the sampled token first)
                     top=tuple(sorted((TopLogprob(token=_token(_field(t, "token")),
                                                  logprob=_logprob(_field(t, "logprob")), raw=_raw(t))
                                       for t in (_field(c, "top_logprobs") or ())),
                                      key=lambda a: -a.logprob)))
        for c in content)


def _token(text: Any) -> str:
    """A token's text as UTF-8 can carry it (its ``bytes`` say what it was: half of a character's bytes). A token
    whose text is no string (null, a number, a list) is no token: TypeError (a malformed answer; passed on, it
    failed the response to the client, a 500 after an ok ledger row, or cut its stream)."""
    if not isinstance(text, str):
        raise TypeError(f"a token's text is {type(text).__name__}, not a string")
    return paired_surrogates(text)


def _reasoning(holder: Any) -> bool:
    """Whether a chat message (or a stream's delta) carries a reasoning model's thinking beside its answer:
    ``reasoning_content`` (vLLM's reasoning parsers, llama.cpp's reasoning_format, DeepSeek) or
    ``reasoning`` (newer vLLM). Its tokens are then in the same ``logprobs.content`` as the answer's."""
    return any(isinstance(v := _field(holder, name), str) and v for name in ("reasoning_content", "reasoning"))


def _answer_tail(tokens: tuple[TokenLogprob, ...], content: str) -> tuple[TokenLogprob, ...]:
    """Of a reasoning model's tokens (its thinking, then its answer), the trailing ones that make up the
    answer ``content``: the confidence is the answer's. Matched on the tokens' bytes: the answer's UTF-8 ends
    them (whitespace around it aside: a parser may strip what joins the thinking to the answer), beginning
    at a token (or within one whose part before it is whitespace). No content: no tokens. Tokens that do not
    end with the content are kept as they came, as any tokens that do not join to their text are (this
    module does not second-guess a server's logprobs); the confidence then includes the thinking's."""
    pieces = [t.utf8 for t in tokens]
    joined = b"".join(pieces)
    want = content.encode("utf-8", "replace")
    if joined.endswith(want):
        start = len(joined) - len(want)
    else:
        trimmed, want = joined.rstrip(), want.strip()
        if not want or not trimmed.endswith(want):
            return tokens  # no match: kept as they came (see above)
        start = len(trimmed) - len(want)
    pos = 0
    for i, piece in enumerate(pieces):
        end = pos + len(piece)
        if end > start:  # the token the answer begins in
            return tokens[i:] if not joined[pos:start].strip() else tokens
        pos = end
    return ()


def _raw(item: Any) -> bytes | None:
    """The upstream's ``bytes`` of a token (a list of byte values), when it sent them."""
    b = _field(item, "bytes")
    if not isinstance(b, list):  # none, or no list (a number N was read as N zero bytes: 2**70, an OverflowError)
        return None
    try:
        return bytes(b)
    except (TypeError, ValueError):  # not byte values: the token's text stands
        return None


def _completion_tokens(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """A completion's tokens: the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts), or
    llama.cpp's, which is chat's (``{"content": [...]}``)."""
    if logprobs is None:
        return ()
    if not _field(logprobs, "tokens"):
        return _chat_tokens(logprobs) if _field(logprobs, "content") else ()
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    out = []
    for tok, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, tops, strict=False):
        alts = tuple(sorted((TopLogprob(token=_token(k), logprob=_logprob(v)) for k, v in (top or {}).items()),
                            key=lambda a: -a.logprob))
        out.append(TokenLogprob(token=_token(tok), logprob=_logprob(lp, NULL_TOKEN_LOGPROB), top=alts))
    return tuple(out)
