"""OpenAI's Responses API (``POST /v1/responses``): its wire types and its response and stream shapes.

The cascade answers a Responses request as it answers a chat request (the input items become the chat's
messages, ``instructions`` its system message); only the shapes differ. Stateless: nothing is stored under
a response's id, so ``previous_response_id``, ``conversation`` and ``background`` are refused (400) rather
than ignored, as are tools and non-text inputs and formats this server cannot honour. ``store`` is accepted
and changes nothing (a response cannot be fetched again); send the earlier turns in ``input`` instead
(``resp.output`` goes back as it came).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from cascade.engine import StreamDelta, StreamEnd, StreamEvent, StreamFailed, StreamStart
from cascade.errors import CascadeError
from cascade.types import CascadeRecord, GenerationRequest, GenerationResult, Message, TokenLogprob, Usage
from serving.errors import first_error, json_type
from serving.protocol import (
    _NULL_IS_DEFAULT,
    MAX_MODEL_CHARS,
    PART_SEPARATOR,
    PromptCacheBreakpoint,
    PromptCacheOptions,
    _Attribution,
    _Wire,
    cascade_block,
    chat_logprobs,
    sampling,
)

#: the one ``include`` value this server honours: the answer's token logprobs
INCLUDE_LOGPROBS = "message.output_text.logprobs"

#: what a stateless server without tools says to the parameters that need state or tools
_UNSUPPORTED = {
    "previous_response_id": "this server keeps no responses: send the earlier turns in `input`",
    "conversation": "this server keeps no conversations: send the turns in `input`",
    "prompt": "stored prompts are not supported",
    "max_tool_calls": "this server has no tools",
    "tools": "tools are not supported by this server",
    "background": "background responses are not supported (nothing is stored to poll)",
}


def _check_item(item: dict[str, Any], i: int) -> None:
    """Refuse, with a clear message, the input item and content part types this server cannot take."""
    kind = item.get("type")
    if kind is not None and kind != "message":
        raise ValueError(f"item {i}: input items of type {kind!r} are not supported (only messages: this server "
                         "has no tools and keeps no items)")
    if isinstance(item.get("content"), list):
        for j, part in enumerate(item["content"]):
            if not isinstance(part, dict):
                raise ValueError(f"item {i}: content part {j} is not an object (an input_text part), got "
                                 f"{json_type(part)}")
            t = part.get("type")
            if t not in ("input_text", "output_text"):
                raise ValueError(f"item {i}: content parts of type {t!r} are not supported (only input_text and "
                                 "output_text)")


class InputText(_Wire):
    type: Literal["input_text", "output_text"]
    text: str
    # an assistant turn sent back as the API returned it (``resp.output``, or its ``model_dump()``): its
    # annotations and logprobs, and the SDK's ``parsed`` of a streamed or parsed response's text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    parsed: Any = None
    #: where a reusable prompt prefix ends, for a provider's prompt cache: accepted and without effect here
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class InputMessage(_Wire):
    """One turn of ``input``: ``{"role", "content"}`` (content a string or ``input_text`` parts), or an
    output message of an earlier response sent back as it came."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @field_validator("content")
    @classmethod
    def _not_empty(cls, v: str | list[InputText]) -> str | list[InputText]:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of parts")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else PART_SEPARATOR.join(p.text for p in self.content)


class TextFormat(_Wire):
    type: Literal["text"]  # plain text, the default; JSON schemas are not supported


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(_Wire):
    """Accepted and without effect: no tier here reasons apart from its answer. Every option of OpenAI's
    ``Reasoning`` (the openai SDK's ``shared_params.Reasoning``) is taken, any value: a client's reasoning
    settings, sent to every provider alike, are not a reason to refuse its request."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None
    #: which reasoning items go back to the model on later turns: there are none here
    context: str | None = None
    #: the reasoning execution mode ("standard", "pro"): OpenAI's list of them grows, so any is taken
    mode: str | None = None


class ResponsesStreamOptions(_Wire):
    include_obfuscation: bool | None = Field(None, strict=True)


#: OpenAI's optional parameters of ``POST /v1/responses`` (the openai SDK's ``response_create_params``): an
#: explicit ``null`` for any of them means its default (dropped before validation, a value still refused)
RESPONSES_PARAMS = _NULL_IS_DEFAULT | frozenset({
    "access_programs", "background", "background_options", "context_management", "conversation", "image",
    "include", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model", "moderation",
    "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "store", "stream_options",
    "text", "tool_choice", "tools", "top_logprobs", "truncation", "user"})


class ResponsesRequest(_Attribution):
    null_is_default = RESPONSES_PARAMS

    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_CHARS)
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0, strict=True)
    #: 0, as OpenAI: only the most likely token (greedy decoding)
    top_p: float = Field(1.0, ge=0.0, le=1.0, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: ResponsesStreamOptions | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    include: list[str] | None = None
    text: TextConfig | None = None
    # accepted and without effect, as OpenAI's own parameters for its service
    store: bool | None = Field(None, strict=True)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: str | None = None
    reasoning: Reasoning | None = None
    truncation: str | None = None
    # tools: none here, so only their empty forms
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    max_tool_calls: int | None = Field(None, strict=True)
    # state this server does not keep
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = Field(None, strict=True)
    prompt: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        """Say which item or part is not supported (a union's own error would be about the string form)."""
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list of input items")
            for i, item in enumerate(v):
                if not isinstance(item, dict):
                    raise ValueError(f"item {i}: an input item is an object (a message), got {json_type(item)}")
                _check_item(item, i)
                try:  # here, so that the message is about the item (the union's would be about a string input)
                    InputMessage.model_validate(item)
                except ValidationError as exc:
                    where, msg, others = first_error(exc.errors())
                    # (said apart from the request's own count of its other errors, which follows this message)
                    more = f" (and {others} more in this item)" if others else ""
                    raise ValueError(f"item {i}: {where + ': ' if where else ''}{msg}{more}") from None
        elif not isinstance(v, str):
            raise ValueError(f"a string or a list of input items, got {json_type(v)}")
        return v

    @field_validator("include")
    @classmethod
    def _includes(cls, v: list[str] | None) -> list[str] | None:
        for item in v or []:
            if item != INCLUDE_LOGPROBS:
                raise ValueError(f"{item!r} is not supported (only {INCLUDE_LOGPROBS!r})")
        return v

    @field_validator("previous_response_id", "conversation", "prompt", "max_tool_calls", "background", "tools")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v is not False and v != [] and not (v == 0 and info.field_name == "max_tool_calls"):
            raise ValueError(_UNSUPPORTED[info.field_name])
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        """Refused as the chat endpoint refuses it, saying why (pydantic's words were "Input should be 'none' or
        'auto'", which read as a typo to fix rather than a feature this server does not have)."""
        if v is not None and v not in ("none", "auto"):
            raise ValueError("tools are not supported by this server: only 'none' (or 'auto', which is none here)")
        return v

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, v: str | None) -> str | None:
        if v is not None and v != "disabled":
            raise ValueError(f"{v!r} is not supported (only 'disabled'): this server does not drop earlier turns to "
                             "fit a model's context; send fewer turns in `input`")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "ResponsesRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    # --- what the routes need of every completion request ----------------------------------------------
    def max_tokens_asked(self) -> tuple[str, int | None]:
        return "max_output_tokens", self.max_output_tokens

    def field_of(self, param: str) -> str:
        """The field of this request that the engine's request's ``messages.N...`` is (its instructions, an
        input item), as an error about it names it."""
        head, _, rest = param.partition(".")
        index, _, tail = rest.partition(".")
        if head != "messages" or not index.isdigit():
            return param
        i = int(index) - (self.instructions is not None)
        if i < 0:
            return "instructions"
        return "input" if isinstance(self.input, str) else ".".join(p for p in ("input", str(i), tail) if p)

    @property
    def logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or [])

    def to_engine(self) -> GenerationRequest:
        turns = [Message(role="user", content=self.input)] if isinstance(self.input, str) else [
            # "developer" is OpenAI's name for the system role of newer models; chat templates know "system"
            Message(role="system" if m.role == "developer" else m.role, content=m.text()) for m in self.input]
        if self.instructions is not None:
            turns.insert(0, Message(role="system", content=self.instructions))
        return GenerationRequest(messages=tuple(turns), max_tokens=self.max_output_tokens,
                                 **sampling(self.temperature, self.top_p), top_logprobs=self.top_logprobs or 0)


# --- responses --------------------------------------------------------------------------------------


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _logprobs(req: ResponsesRequest, tokens: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    return chat_logprobs(tokens, req.top_logprobs or 0)["content"] if req.logprobs else []


def _part(req: ResponsesRequest, text: str, tokens: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": _logprobs(req, tokens)}


def _message(rec: CascadeRecord, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "msg_" + rec.request_id, "type": "message", "status": status, "role": "assistant",
            "content": content}


def _status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """A response's status and ``incomplete_details`` from the answer's finish reason (OpenAI's two reasons)."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _response(req: ResponsesRequest, rec: CascadeRecord, model: str, *, status: str,
              output: list[dict[str, Any]], usage: Usage | None = None,
              incomplete: dict[str, str] | None = None, error: dict[str, str] | None = None,
              final: bool = False) -> dict[str, Any]:
    body = {
        "id": "resp_" + rec.request_id,
        "object": "response",
        "created_at": int(rec.created_at or time.time()),
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": bool(req.parallel_tool_calls) if req.parallel_tool_calls is not None else True,
        "temperature": req.temperature,
        "tool_choice": req.tool_choice or "auto",
        "tools": [],
        "top_p": req.top_p,
        "top_logprobs": req.top_logprobs or 0,
        "store": False,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": _usage(usage),
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "metadata": req.metadata or {},
    }
    if final:
        body["cascade"] = cascade_block(rec)
    return body


def response_object(req: ResponsesRequest, res: GenerationResult, rec: CascadeRecord) -> dict[str, Any]:
    """The answer as a Responses API ``response``, with the cascade's account under ``cascade``."""
    status, incomplete = _status(res.finish_reason)
    msg = _message(rec, status, [_part(req, res.text, res.tokens)])
    return _response(req, rec, rec.tier or "", status=status, output=[msg], usage=res.usage,
                     incomplete=incomplete, final=True)


def _sse(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **payload}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def response_events(req: ResponsesRequest, first: StreamStart, events: AsyncIterator[StreamEvent],
                          on_first_token: Callable[[], None],
                          set_tail: Callable[[Callable[[CascadeError], bytes]], None] | None = None,
                          ) -> AsyncIterator[bytes]:
    """The engine's stream as the Responses API's events: ``response.created``, ``response.in_progress``,
    the message item and its text part being added, ``response.output_text.delta`` per chunk, their
    ``done`` events, then ``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut
    the answer) whose response carries usage and the ``cascade`` account. A tier failing after text was
    sent ends the stream with ``response.failed`` (its ``error``, and the partial text in its output).
    ``set_tail`` is given the function that makes that ending for an error from outside the engine (the
    server's shutdown cutting the stream: serving/shutdown.py), from what was sent so far."""
    rec, model = first.record, first.tier
    seq = 0
    item_id = "msg_" + rec.request_id
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    text: list[str] = []
    tokens: list[TokenLogprob] = []

    def event(kind: str, **payload: Any) -> bytes:
        nonlocal seq
        seq += 1
        return _sse(kind, seq - 1, payload)

    def failed(record: CascadeRecord, err: CascadeError) -> bytes:
        item = _message(rec, "incomplete", [_part(req, "".join(text), tuple(tokens))])
        # OpenAI's codes for a failed response are a closed list: ours (its class) is in the message and in
        # the ledger row named by `cascade`
        code = "rate_limit_exceeded" if getattr(err, "upstream_status", None) == 429 else "server_error"
        response = _response(req, record, model, status="failed", output=[item], final=True,
                             error={"code": code, "message": f"stream interrupted: {err.message} "
                                    f"({type(err).__name__})"})
        return event("response.failed", response=response)

    if set_tail is not None:
        set_tail(lambda err: failed(rec, err))

    started = _response(req, rec, model, status="in_progress", output=[])
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    yield event("response.output_item.added", output_index=0, item=_message(rec, "in_progress", []))
    yield event("response.content_part.added", **where, part=_part(req, "", ()))
    async for ev in events:
        if isinstance(ev, StreamDelta):
            if not text:
                on_first_token()
            text.append(ev.text)
            tokens.extend(ev.tokens)
            yield event("response.output_text.delta", **where, delta=ev.text, logprobs=_logprobs(req, ev.tokens))
        elif isinstance(ev, StreamEnd):
            whole, toks = "".join(text), tuple(tokens)
            part = _part(req, whole, toks)
            status, incomplete = _status(ev.finish_reason)
            item = _message(rec, status, [part])
            yield event("response.output_text.done", **where, text=whole, logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=0, item=item)
            done = _response(req, ev.record, model, status=status, output=[item], usage=ev.usage,
                             incomplete=incomplete, final=True)
            yield event("response.completed" if status == "completed" else "response.incomplete", response=done)
        elif isinstance(ev, StreamFailed):
            yield failed(ev.record, ev.error)


__all__ = ["INCLUDE_LOGPROBS", "ResponsesRequest", "response_events", "response_object"]
