"""Wire types (pydantic) of the OpenAI-compatible API, and their conversion to and from engine types."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascade.types import (MAX_END_USER, MAX_FEEDBACK_COMMENT, MAX_METADATA_KEY, MAX_METADATA_PAIRS,
                           MAX_METADATA_VALUE, MAX_MODEL_CHARS, MAX_REQUEST_ID, CascadeRecord, GenerationRequest,
                           GenerationResult, Message, TokenLogprob, TopLogprob, Usage, is_utf8)


#: the longest stop sequence
MAX_STOP_CHARS = 256


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: optional parameters of every generating endpoint an OpenAI client may send as an explicit ``null``: it
#: means "the default"
_NULL_IS_DEFAULT = frozenset({"temperature", "top_p", "stream"})
#: OpenAI's optional parameters of ``POST /v1/chat/completions`` (the openai SDK's ``completion_create_params``):
#: an explicit ``null`` for any of them means its default, so it is dropped before validation, those this
#: server does not model included (``tools``, ``audio``...: a value for one of them is still refused)
CHAT_PARAMS = _NULL_IS_DEFAULT | frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "metadata", "modalities", "model", "moderation", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream_options",
    "tool_choice", "tools", "top_logprobs", "user", "verbosity", "web_search_options"})
#: the same of ``POST /v1/completions`` (with ``metadata`` and ``safety_identifier``: this server's cost
#: attribution, on every endpoint)
COMPLETION_PARAMS = _NULL_IS_DEFAULT | frozenset({
    "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "metadata", "model", "n",
    "presence_penalty", "safety_identifier", "seed", "stop", "stream_options", "suffix", "user"})


def _check_text(value: Any, where: str = "") -> None:
    """Refuse strings that are not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"`` is valid JSON
    but cannot be encoded: tokenizers, HTTP clients and the ledger would all fail on it)."""
    if isinstance(value, str):
        if not value.isascii() and not is_utf8(value):
            raise ValueError(f"{where or 'body'}: text is not valid Unicode (a lone surrogate such as \\ud800)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}.{i}" if where else str(i))


class _Request(_Wire):
    """A request body: valid Unicode throughout, and ``null`` for an optional parameter means its default."""

    #: the parameters whose explicit ``null`` is dropped (the endpoint's OpenAI parameters); a name that is not
    #: one of them stays an unknown parameter, null or not
    null_is_default: ClassVar[frozenset[str]] = _NULL_IS_DEFAULT

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _check_text(data)
            drop = cls.null_is_default
            if any(data.get(k, 0) is None for k in drop):
                data = {k: v for k, v in data.items() if not (v is None and k in drop)}
            # a value for one of the endpoint's OpenAI parameters that has no field here (predicted outputs,
            # audio, web search...): refused as what it is, not as "unknown parameter" (a name OpenAI has not,
            # a misspelling)
            unsupported = next((k for k in data if k in drop - _NULL_IS_DEFAULT and k not in cls.model_fields), None)
            if unsupported is not None:
                raise ValueError(f"{unsupported}: not supported by this server (OpenAI's parameter for a feature it "
                                 "does not have)")
        return data


#: between a message's text parts, as vLLM joins them: the parts are separate texts ("Translate to French:",
#: "Hello"), not pieces of one word
PART_SEPARATOR = "\n"


class PromptCacheOptions(_Wire):
    """OpenAI's ``prompt_cache_options`` (which replaces ``prompt_cache_retention``): its provider's prompt
    cache, accepted and without effect here, as ``prompt_cache_key`` is."""

    mode: Literal["implicit", "explicit"] | None = None
    #: the cache's minimum lifetime ("30m"): OpenAI's list of them grows, so any is taken
    ttl: str | None = None


class PromptCacheBreakpoint(_Wire):
    """OpenAI's ``prompt_cache_breakpoint`` on a text part: where a reusable prompt prefix ends, for its
    provider's prompt cache (:class:`PromptCacheOptions`); accepted and without effect here."""

    mode: Literal["explicit"]
    ttl: str | None = None


class TextPart(_Wire):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


#: fields of an assistant message that OpenAI's responses carry (the openai SDK sends them back as they came,
#: null when unused, e.g. ``messages.append(response.choices[0].message)``; ``parsed``: the SDK's own, of
#: ``.parse(...)`` and ``.stream(...).get_final_completion()``): accepted when empty
_ASSISTANT_ECHO_FIELDS = ("refusal", "tool_calls", "function_call", "audio", "annotations", "reasoning_content",
                          "parsed")


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    #: as OpenAI: no whitespace and none of <|\/> (nor, then, a chat template's special tokens)
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[^\s<|\\/>]+$")

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_response_fields(cls, data: Any) -> Any:
        """An assistant message as OpenAI (and this server) returned it: its unused fields are null, or an
        empty list, and mean nothing; a tool call or an audio answer is refused as unsupported."""
        if not isinstance(data, dict):
            return data
        if data.get("role") == "tool":
            raise ValueError("tool messages are not supported (this server has no tools)")
        parts = data.get("content")
        if isinstance(parts, list):  # an image, audio or file part: said so, not "Input should be a valid string"
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported (text parts only: the "
                                     "models behind this server read text)")
        if data.get("role") == "assistant" and any(k in data for k in _ASSISTANT_ECHO_FIELDS):
            for k in _ASSISTANT_ECHO_FIELDS:
                v = data.get(k)
                if v not in (None, [], ""):
                    raise ValueError(f"{k}: assistant messages with {k} are not supported")
            data = {k: v for k, v in data.items() if k not in _ASSISTANT_ECHO_FIELDS}
        return data

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content: an empty list of parts")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return PART_SEPARATOR.join(p.text for p in self.content)


class StreamOptions(_Wire):
    include_usage: bool = Field(False, strict=True)
    #: OpenAI pads stream chunks against side channels when true; this server sends no padding either way
    include_obfuscation: bool | None = Field(None, strict=True)


class _Attribution(_Request):
    """Who and what a request's cost is attributed to, as the caller says: kept in the ledger, never sent
    upstream (``cascade report --by user``, ``--by meta:KEY``)."""

    user: str | None = Field(None, max_length=MAX_END_USER)
    #: OpenAI's newer name for an end user's id
    safety_identifier: str | None = Field(None, max_length=MAX_END_USER)
    #: tags, within OpenAI's limits
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for k, val in v.items():
            if not 0 < len(k) <= MAX_METADATA_KEY:
                raise ValueError(f"keys must be 1 to {MAX_METADATA_KEY} characters, got {len(k)}")
            if len(val) > MAX_METADATA_VALUE:
                raise ValueError(f"value of {k!r}: at most {MAX_METADATA_VALUE} characters, got {len(val)}")
            if "\x00" in k or "\x00" in val:
                raise ValueError("keys and values must not contain a NUL character")
        return v

    @field_validator("user", "safety_identifier")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("must not contain a NUL character")
        return v

    def attribution(self) -> dict[str, Any]:
        """The engine's ``end_user`` and ``metadata`` of this request."""
        return {"end_user": self.user or self.safety_identifier, "metadata": self.metadata or None}


def attribution_of(body: Any) -> dict[str, Any]:
    """The cost attribution of a request body that did not validate (its ledger row is attributed all the
    same): each of ``user``, ``safety_identifier`` and ``metadata`` that is valid on its own."""
    if not isinstance(body, dict):
        return {}
    valid = {}
    for name in _Attribution.model_fields:
        if name in body:
            try:
                _Attribution.model_validate({name: body[name]})
            except ValidationError:
                continue
            valid[name] = body[name]
    return _Attribution.model_validate(valid).attribution()


def sampling(temperature: float, top_p: float) -> dict[str, float]:
    """A request's ``temperature`` and ``top_p`` for the engine: ``top_p`` 0 keeps only the most likely token,
    which is greedy decoding (temperature 0, top_p 1: vLLM and some providers refuse a top_p of 0)."""
    if top_p == 0:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": temperature, "top_p": top_p}


class _GenerationParams(_Attribution):
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0, strict=True)
    #: 0, as OpenAI: only the most likely token (greedy decoding, :func:`sampling`)
    top_p: float = Field(1.0, ge=0.0, le=1.0, strict=True)
    n: int = Field(1, strict=True)
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, strict=True, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's
    presence_penalty: float = Field(0.0, strict=True)
    frequency_penalty: float = Field(0.0, strict=True)
    #: nothing (``{}``) is accepted: no token's likelihood can be biased here
    logit_bias: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_GenerationParams":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:
            raise ValueError("not supported (only {} is accepted)")
        return v

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("presence/frequency penalties are not supported (must be 0)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must be non-empty")
        if any(len(x) > MAX_STOP_CHARS for x in ([v] if isinstance(v, str) else v or [])):
            # matching a stop string costs the local backends time per token in its length, on the compute
            # every tier shares
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters")
        return v

    def max_tokens_asked(self) -> tuple[str, int | None]:
        """The parameter that bounds the answer's length, as the client named it, and its value."""
        return "max_tokens", self.max_tokens

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ResponseFormat(_Wire):
    type: Literal["text"]  # plain text, the default; JSON modes are not supported


class ChatCompletionRequest(_GenerationParams):
    null_is_default = CHAT_PARAMS

    messages: list[ChatMessage] = Field(min_length=1)
    # accepted and without effect on the answer, as OpenAI's own parameters for its service (what a request
    # is stored as, its cache key and options, and priority; the effort of reasoning models, and their
    # verbosity, as the Responses API's ``text.verbosity``); ``user``, ``metadata`` and ``safety_identifier``
    # are kept in the ledger for cost attribution (:class:`_Attribution`)
    store: bool | None = Field(None, strict=True)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    #: ``["text"]``, OpenAI's default, is what every answer here is; audio is refused
    modalities: list[str] | None = None
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    response_format: ResponseFormat | None = None
    # tools: this server has none, so only their empty forms (no tools, a choice of none) are accepted
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    functions: Any = None
    function_call: Any = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v is not None and v != []:
            raise ValueError("tools are not supported by this server (it has none to call)")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(m != "text" for m in v):
            raise ValueError("only ['text'] is supported (this server answers in text)")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v is not None and v not in ("none", "auto"):
            raise ValueError("tools are not supported by this server: only 'none' (or 'auto', which is none here)")
        return v

    def max_tokens_asked(self) -> tuple[str, int | None]:
        if self.max_completion_tokens:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        return self

    def to_engine(self) -> GenerationRequest:
        return GenerationRequest(
            # "developer" is OpenAI's name for the system role of newer models; chat templates know "system"
            messages=tuple(Message(role="system" if m.role == "developer" else m.role, content=m.text(),
                                   name=m.name) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens, **sampling(self.temperature, self.top_p),
            stop=self.stop_tuple(), top_logprobs=self.top_logprobs or 0, seed=self.seed)


class CompletionRequest(_GenerationParams):
    null_is_default = COMPLETION_PARAMS

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    echo: bool = Field(False, strict=True)
    suffix: str | None = None
    #: 1 (the default) only: one answer generated, the one returned
    best_of: int | None = Field(None, strict=True)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only 1 is supported")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(x, int) or (isinstance(x, list) and x
                                                                    and all(isinstance(y, int) for y in x)) for x in v):
            raise ValueError("prompts of token ids are not supported (send the prompt as text)")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_engine(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt_text(), max_tokens=self.max_tokens,
                                 **sampling(self.temperature, self.top_p), stop=self.stop_tuple(),
                                 top_logprobs=self.logprobs or 0, seed=self.seed)


class FeedbackRequest(_Request):
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID)
    score: Literal[-1, 0, 1]
    comment: str | None = Field(None, max_length=MAX_FEEDBACK_COMMENT)

    @field_validator("score", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):  # True == 1 in Python, 1.0 and "1" are no scores
            raise ValueError(f"score must be -1, 0 or 1 (an integer), not {repr(v)[:40]}")
        return v


# --- responses (plain dicts: the OpenAI shapes, plus our `cascade` object) --------------------------


def cascade_block(rec: CascadeRecord) -> dict[str, Any]:
    return {
        "request_id": rec.request_id,
        "policy": rec.policy,
        "tier": rec.tier,
        "confidence": rec.confidence,
        "escalated": rec.escalated,
        "attempts": [
            {"tier": a.tier, "model": a.model, "backend": a.backend, "decision": a.decision,
             "reason": a.reason, "confidence": a.confidence, "prompt_tokens": a.prompt_tokens,
             "completion_tokens": a.completion_tokens, "latency_ms": round(a.latency_ms, 3),
             "cost_usd": a.cost_usd, "error_class": a.error_class}
            for a in rec.attempts],
        "cost_usd": rec.cost_usd,
        "baseline_cost_usd": rec.baseline_cost_usd,
        "baseline_estimated": rec.baseline_estimated,
        "escalation_waste_usd": rec.escalation_waste_usd,
        "latency_ms": round(rec.latency_ms, 3),
        "cached_from": rec.cached_from,
    }


def cascade_headers(rec: CascadeRecord) -> dict[str, str]:
    return {
        "x-cascade-request-id": rec.request_id,
        "x-cascade-policy": rec.policy,
        "x-cascade-tier": rec.tier or "",
        "x-cascade-escalated": "true" if rec.escalated else "false",
        "x-cascade-confidence": "" if rec.confidence is None else f"{rec.confidence:.6f}",
        "x-cascade-attempts": str(len(rec.attempts)),
        "x-cascade-cost-usd": f"{rec.cost_usd:.10f}",
        "x-cascade-escalation-waste-usd": f"{rec.escalation_waste_usd:.10f}",
        **({"x-cascade-cached-from": rec.cached_from} if rec.cached_from else {}),
    }


def usage_block(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` of an answer: with ``prompt_tokens_details.cached_tokens`` where the provider read some
    of the prompt from its prompt cache."""
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    if usage.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    return out


def _usage(res: GenerationResult) -> dict[str, Any]:
    return usage_block(res.usage)


def alternative_token(a: TopLogprob) -> str:
    """An alternative's token text. One whose bytes end inside a multi-byte character decodes to "\ufffd",
    the same for every such alternative (so they would share one key of completions' ``top_logprobs``): its
    text is its bytes with the undecodable ones escaped (``"\\xe2\\x80"``, Python's ``backslashreplace``);
    its ``bytes`` are exact either way."""
    if a.raw is None:
        return a.token
    try:
        a.raw.decode("utf-8")
    except UnicodeDecodeError:
        return a.raw.decode("utf-8", "backslashreplace")
    return a.token


def chat_logprobs(tokens: tuple[TokenLogprob, ...], top: int) -> dict[str, Any]:
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.utf8),
         "top_logprobs": [{"token": alternative_token(a), "logprob": a.logprob, "bytes": list(a.utf8)}
                          for a in t.top[:top]]}
        for t in tokens], "refusal": None}


def completion_logprobs(tokens: tuple[TokenLogprob, ...], top: int, start: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``start``: the text offset of the first token. Offsets count
    from the prompt's start, as OpenAI's (the first answer token's is the prompt's length, ``echo`` or not); a
    stream's later chunks continue where the text sent so far ends."""
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    tops: list[dict[str, float]] = []
    for t in tokens:
        d: dict[str, float] = {}
        for a in t.top[:top]:
            d.setdefault(alternative_token(a), a.logprob)
        tops.append(d)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def chat_response(req: ChatCompletionRequest, res: GenerationResult, rec: CascadeRecord) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + rec.request_id,
        "object": "chat.completion",
        "created": int(rec.created_at or time.time()),
        "model": rec.tier,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": res.text, "refusal": None},
            "logprobs": chat_logprobs(res.tokens, req.top_logprobs or 0) if req.logprobs else None,
            "finish_reason": res.finish_reason,
        }],
        "usage": _usage(res),
        "system_fingerprint": None,
        "cascade": cascade_block(rec),
    }


def completion_response(req: CompletionRequest, res: GenerationResult, rec: CascadeRecord) -> dict[str, Any]:
    return {
        "id": "cmpl-" + rec.request_id,
        "object": "text_completion",
        "created": int(rec.created_at or time.time()),
        "model": rec.tier,
        "choices": [{
            "index": 0,
            "text": res.text,
            "logprobs": (completion_logprobs(res.tokens, req.logprobs, len(req.prompt_text()))
                         if req.logprobs is not None else None),
            "finish_reason": res.finish_reason,
        }],
        "usage": _usage(res),
        "cascade": cascade_block(rec),
    }
