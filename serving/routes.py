"""Route handlers: parse the wire request, call the engine, shape the wire response."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cascade.engine import Engine
from cascade.errors import InvalidRequestError
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    cascade_headers,
    chat_response,
    completion_response,
)

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _check_limits(engine: Engine, body: ChatCompletionRequest | CompletionRequest) -> None:
    limit = engine.config.server.max_tokens_limit
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > limit:
        raise InvalidRequestError(f"max_tokens: {asked} is above this server's limit of {limit}",
                                  param="max_tokens", code="invalid_value")
    if body.stream:
        raise InvalidRequestError("stream: streaming is not supported yet", param="stream",
                                  code="unsupported_value")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse:
    engine = _engine(request)
    _check_limits(engine, body)
    outcome = await engine.run(body.to_engine(), model=body.model, endpoint="chat")
    return JSONResponse(chat_response(body, outcome.result, outcome.record),
                        headers=cascade_headers(outcome.record))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> JSONResponse:
    engine = _engine(request)
    _check_limits(engine, body)
    outcome = await engine.run(body.to_engine(), model=body.model, endpoint="completions")
    return JSONResponse(completion_response(body, outcome.result, outcome.record),
                        headers=cascade_headers(outcome.record))


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    engine = _engine(request)
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
    return {"object": "list", "data": data}


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict:
    fid = await _engine(request).ledger.add_feedback(body.request_id, body.score, body.comment)
    return {"object": "feedback", "id": fid, "request_id": body.request_id, "score": body.score}


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "uptime_s": round(time.time() - request.app.state.started_at, 3)}
