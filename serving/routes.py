"""Route handlers: authenticate, parse the wire request, call the engine, shape the wire response."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cascade.engine import Budget, Engine, StreamDelta, StreamEnd, StreamFailed, StreamStart
from cascade.errors import BudgetExceededError, CascadeError, InvalidRequestError, NotFoundError
from cascade.ledger import spend_since
from serving.auth import Caller, authenticate, authorize
from serving.errors import error_body
from serving.metrics import Metrics
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    cascade_block,
    cascade_headers,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
)

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _admit(request: Request, body: ChatCompletionRequest | CompletionRequest) -> tuple[Caller, Budget]:
    """Authenticate, authorise the model, check limits and the key's daily spend; give the budget."""
    engine = _engine(request)
    caller = authenticate(engine.config, request)
    model = body.model or engine.config.default_policy_name
    if model in engine.model_names():  # an unknown model is refused (and recorded) by the engine
        authorize(caller, model)
    limit = engine.config.server.max_tokens_limit
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > limit:
        raise InvalidRequestError(f"max_tokens: {asked} is above this server's limit of {limit}",
                                  param="max_tokens", code="invalid_value")
    lim = caller.limits
    if lim is None:
        return caller, Budget()
    if lim.daily_spend_limit_usd is not None and caller.key_id is not None:
        midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        spent = await spend_since(engine.ledger, caller.key_id, midnight)
        if spent >= lim.daily_spend_limit_usd:
            err = BudgetExceededError(f"daily spend limit of ${lim.daily_spend_limit_usd:g} reached "
                                      f"(${spent:.6f} spent today, UTC)", code="daily_spend_limit")
            err.status_code = 429
            raise err
    return caller, Budget(latency_s=lim.latency_budget_s, on_latency=lim.on_latency_budget,
                          cost_usd=lim.cost_budget_usd, on_cost=lim.on_cost_budget)


async def _complete(request: Request, body: ChatCompletionRequest | CompletionRequest, endpoint: str) -> Response:
    engine, metrics = _engine(request), _metrics(request)
    try:
        caller, budget = await _admit(request, body)
        kw = dict(model=body.model, endpoint=endpoint, api_key_id=caller.key_id, user_tier=caller.user_tier,
                  budget=budget)
        if body.stream:
            return await _stream(request, body, endpoint, kw)
        outcome = await engine.run(body.to_engine(), **kw)
    except CascadeError as exc:
        metrics.observe_error(type(exc).__name__)
        raise
    metrics.observe(outcome.record)
    shape = chat_response if endpoint == "chat" else completion_response
    return JSONResponse(shape(body, outcome.result, outcome.record), headers=cascade_headers(outcome.record))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "completions")


# --- streaming -------------------------------------------------------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: Request, body: ChatCompletionRequest | CompletionRequest, endpoint: str,
                  kw: dict) -> Response:
    """Start the engine's stream; errors before its first event become ordinary HTTP errors."""
    engine, metrics = _engine(request), _metrics(request)
    events = engine.stream(body.to_engine(), **kw)
    first = await anext(events)  # raises CascadeError before any byte is sent
    assert isinstance(first, StreamStart)
    rec = first.record
    chat = endpoint == "chat"
    rid = ("chatcmpl-" if chat else "cmpl-") + rec.request_id
    created = int(rec.created_at)
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    want_lp = bool(body.logprobs) if chat else body.logprobs is not None
    top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
    started = time.perf_counter()

    def chunk(choice: dict, **extra: object) -> bytes:
        return _sse({"id": rid, "object": obj, "created": created, "model": first.tier,
                     "choices": [choice] if choice else [], **extra})

    async def body_iter() -> AsyncIterator[bytes]:
        first_token = True
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            async for ev in events:
                if isinstance(ev, StreamDelta):
                    if first_token:
                        metrics.ttft.labels(rec.policy).observe(time.perf_counter() - started)
                        first_token = False
                    if chat:
                        lp = chat_logprobs(ev.tokens, top) if want_lp else None
                        yield chunk({"index": 0, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None})
                    else:
                        lp = completion_logprobs(ev.tokens, top) if want_lp else None
                        yield chunk({"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None})
                elif isinstance(ev, StreamEnd):
                    metrics.observe(ev.record)
                    end = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason} if chat
                           else {"index": 0, "text": "", "logprobs": None, "finish_reason": ev.finish_reason})
                    yield chunk(end, cascade=cascade_block(ev.record))
                    if include_usage and ev.usage is not None:
                        yield chunk({}, usage={"prompt_tokens": ev.usage.prompt_tokens,
                                               "completion_tokens": ev.usage.completion_tokens,
                                               "total_tokens": ev.usage.total_tokens})
                elif isinstance(ev, StreamFailed):
                    metrics.observe(ev.record)
                    err = ev.error
                    payload = error_body(f"stream interrupted: {err.message}", err.error_type, code=err.code)
                    payload["cascade"] = cascade_block(ev.record)
                    yield _sse(payload)
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()

    headers = cascade_headers(rec)
    for h in ("x-cascade-cost-usd", "x-cascade-escalation-waste-usd", "x-cascade-confidence"):
        headers.pop(h, None)  # known only at the end: in the final chunk's `cascade` object
    headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=headers)


# --- the rest --------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    engine = _engine(request)
    caller = authenticate(engine.config, request)
    allowed = caller.limits.allowed_models if caller.limits else []
    created = int(request.app.state.started_at)
    data = []
    for name, pol in engine.config.policies.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "cascade-engine",
                     "cascade": {"kind": "policy", "chain": list(pol.chain),
                                 "default": name == engine.config.default_policy_name,
                                 "description": pol.description}})
    for tier in engine.config.tiers:
        data.append({"id": tier.name, "object": "model", "created": created, "owned_by": "cascade-engine",
                     "cascade": {"kind": "tier", "backend": tier.backend, "model": tier.model,
                                 "price": tier.price.model_dump()}})
    if allowed:
        data = [d for d in data if d["id"] in allowed]
    return {"object": "list", "data": data}


async def _own_request(request: Request, request_id: str) -> dict:
    """The ledger row of one of the caller's requests (another key's request is as good as missing)."""
    engine = _engine(request)
    caller = authenticate(engine.config, request)
    row = await engine.ledger.get(request_id)
    if row is None or (caller.key_id is not None and row["api_key_id"] != caller.key_id):
        raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id")
    return row


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict:
    engine = _engine(request)
    await _own_request(request, body.request_id)
    fid = await engine.ledger.add_feedback(body.request_id, body.score, body.comment)
    if _metrics(request).drift is not None:  # a label for the rolling ECE (cascade/drift.py)
        _metrics(request).drift.observe_feedback(body.request_id, body.score)
    return {"object": "feedback", "id": fid, "request_id": body.request_id, "score": body.score}


@router.get("/v1/feedback/{request_id}")
async def read_feedback(request_id: str, request: Request) -> dict:
    row = await _own_request(request, request_id)
    return {"object": "list", "request_id": request_id,
            "data": [{"id": f["id"], "score": f["score"], "comment": f["comment"], "created_at": f["created_at"]}
                     for f in row["feedback"]]}


@router.post("/admin/reload")
async def admin_reload(request: Request) -> dict:
    """Swap in the calibrators and thresholds of the config file (and the artifacts it names) without
    dropping requests. Keys whose user tier has ``admin: true`` only (anyone on an open server)."""
    from cascade.recalibrate import authorize_admin, reload_engine_async

    engine = _engine(request)
    authorize_admin(engine.config, authenticate(engine.config, request))
    return await reload_engine_async(engine, getattr(request.app.state, "config_path", None))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_metrics(request).render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "uptime_s": round(time.time() - request.app.state.started_at, 3)}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    engine = _engine(request)
    state = {name: t.backend.ready for name, t in engine.tiers.items()}
    ok = all(state.values())
    return JSONResponse({"status": "ready" if ok else "loading", "tiers": state}, status_code=200 if ok else 503)
