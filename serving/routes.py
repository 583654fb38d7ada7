"""Route handlers: authenticate, parse the wire request, call the engine, shape the wire response."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.engine import (
    Budget,
    Engine,
    StreamDelta,
    StreamEnd,
    StreamEvent,
    StreamFailed,
    StreamStart,
    new_request_id,
)
from cascade.errors import (
    BudgetExceededError,
    CascadeError,
    ConfigError,
    ContextLengthExceededError,
    InternalError,
    InvalidRequestError,
    LedgerError,
    LedgerUnavailableError,
    NotFoundError,
    ReloadRefusedError,
)
from cascade.ledger import utc_day_start
from cascade.limits import SpendHolds
from cascade.resilience import ResilientBackend
from cascade.types import CascadeRecord, GenerationRequest
from serving.auth import Caller, authenticate, authorize, refuse_cross_site
from serving.errors import COMPLETION_PATHS, cascade_error_response, error_body
from serving.metrics import Metrics
from serving.protocol import (
    MAX_MODEL_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    cascade_block,
    cascade_headers,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    is_utf8,
    usage_block,
)
from serving.responses import ResponsesRequest, response_events, response_object
from serving.shutdown import SSE_TAIL
from serving.streaming import BoundedStreamingResponse

router = APIRouter()
#: the bodies of the completion endpoints: chat, (legacy) completions, responses
AnyRequest = ChatCompletionRequest | CompletionRequest | ResponsesRequest
log = logging.getLogger("cascade.serving")
T = TypeVar("T")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _caller(request: Request) -> Caller:
    """The caller :class:`AuthMiddleware` authenticated (or authenticate now, for an app mounted without it)."""
    caller = request.scope.get("state", {}).get("caller")
    return caller if caller is not None else authenticate(_engine(request).config, request)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the request body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work`` unless the client disconnects first; then cancel it (the engine records the request
    as cancelled, and a backend stops generating for it) and give ``(False, None)``. The work runs in this
    task; one watcher task cancels it if the client goes."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return True, await work
    except asyncio.CancelledError:
        if not gone:  # cancelled from outside (shutdown): not ours to swallow
            raise
        task.uncancel()
        return False, None
    finally:
        watcher.cancel()


async def _admit(request: Request, body: AnyRequest,
                 endpoint: str) -> tuple[Caller, Budget, GenerationRequest | None]:
    """Authorise the model, check limits and the key's daily spend; give the budget. A refusal here is
    recorded in the ledger (and so in the metrics) before it is raised."""
    try:
        return await _admit_checks(request, body)
    except CascadeError as exc:
        # a request naming no model was for the default policy: its row says so, as a served one's does
        await record_refusal(request, exc, _route_name(request, body), endpoint, body.attribution())
        raise
    except asyncio.CancelledError:
        # a shutdown that ran out of time while the request waited here (its spend check, or the ledger's probe,
        # on a slow database): the drain answers it with a 503, and its row says so, as the rows of those it
        # cancelled in their tiers do; queued, not waited for (the 503 goes out now, the row with the ledger's
        # close)
        shutdown = request.app.state.drain.error
        if shutdown is not None:
            await record_refusal(request, shutdown, _route_name(request, body), endpoint, body.attribution(),
                                 wait=False)
        raise


async def record_refusal(request: Request, exc: CascadeError, model: str | None, endpoint: str,
                         attribution: dict | None = None, *, wait: bool = True, status: str = "error") -> None:
    """A completion request refused before the engine ran it: its ledger row, under the response's request id
    and the caller's key (``wait``, ``status``: as :meth:`Engine.record_refusal`)."""
    caller = request.scope.get("state", {}).get("caller")
    if model is not None and (len(model) > MAX_MODEL_CHARS or not is_utf8(model)):  # refused for that: nothing
        model = None                                                                 # to file it under
    if not is_utf8(exc.message):
        exc.message = exc.message.encode("utf-8", "replace").decode("utf-8")
    await _engine(request).record_refusal(
        exc, model=model, endpoint=endpoint, request_id=request.scope.get("state", {}).get("request_id"),
        api_key_id=getattr(caller, "key_id", None), user_tier=getattr(caller, "user_tier", None), wait=wait,
        status=status, **(attribution or {}))


async def record_unread_refusal(scope: Scope, exc: CascadeError) -> None:
    """A completion request refused by a middleware before its body was read (its headers over the limit, its
    body too large or too late): its ledger row, under no policy (its model was never read), when its key is
    known. A request without a valid key got its 401 before; one to any other path, or with another method than
    POST (a GET of the path, which is a 405 and no row when it passes the limits), is no completion."""
    endpoint = COMPLETION_PATHS.get(scope.get("path", ""))
    if endpoint is not None and scope.get("method") == "POST" and scope.get("state", {}).get("caller") is not None:
        await record_refusal(Request(scope), exc, None, endpoint, {})


def _route_name(request: Request, body: AnyRequest) -> str:
    """The policy or tier a request is for: the model it names, else the default policy."""
    return body.model or _engine(request).config.default_policy_name


async def _admit_checks(request: Request, body: AnyRequest) -> tuple[Caller, Budget, GenerationRequest | None]:
    engine = _engine(request)
    caller = _caller(request)
    model = _route_name(request, body)
    # a key limited to some models is refused any other (403), whether it exists or not: it is told of its own
    # only, as GET /v1/models lists them (a 404 for a made-up name beside a 403 for a hidden one told which exist)
    authorize(caller, model)
    # an unknown model is refused here (404, recorded as every refusal), before it takes a place in any limit
    engine.resolve(model)
    limit = engine.config.server.max_tokens_limit
    # every bound the client gave: chat's max_tokens beside max_completion_tokens (which bounds the answer)
    # is checked too, as OpenAI checks each parameter it is sent, rather than a value past the limit let by
    bounds = [body.max_tokens_asked()]
    if isinstance(body, ChatCompletionRequest):
        bounds.append(("max_tokens", body.max_tokens))
    for param, asked in bounds:
        if asked is not None and asked > limit:
            raise InvalidRequestError(f"{param}: {asked} is above this server's limit of {limit}",
                                      param=param, code="invalid_value")
    # a ledger known to be down: refused (503) before any read of it, but after the request's own faults above,
    # which no retry mends: its client is told of those at once, not told to repeat it after a probe's wait
    await engine.check_ledger()
    lim = caller.limits
    budget = Budget() if lim is None else Budget(latency_s=lim.latency_budget_s, on_latency=lim.on_latency_budget,
                                                 cost_usd=lim.cost_budget_usd, on_cost=lim.on_cost_budget)
    state = request.scope.setdefault("state", {})
    rid = state.get("request_id") or state.setdefault("request_id", new_request_id())
    holds: SpendHolds = request.app.state.spend_holds
    buckets = _spend_buckets(caller, body.attribution()["end_user"])
    # the engine's request, once, for the limits that weigh it
    req = body.to_engine() if buckets or (lim is not None and lim.tokens_per_minute) else None
    if req is not None and lim is not None and lim.tokens_per_minute:
        await req.rough_prompt_tokens_off_loop()  # what the limit weighs, counted once and off the event loop
    ceiling = await engine.cost_ceiling(req, model, budget) if buckets else 0.0
    await _check_daily_spend(engine, holds, buckets, rid, ceiling)
    # last, the key's rate and in-flight limits and the server's: a request refused above takes no place in
    # them; an admitted one holds its slots until its response is sent (AuthMiddleware releases them)
    try:
        ticket = request.app.state.admission.admit(
            caller.key_id, requests_per_minute=lim.requests_per_minute if lim else None,
            max_concurrent=lim.max_concurrent_requests if lim else None,
            server_max_concurrent=engine.config.server.max_concurrent_requests,
            tokens_per_minute=lim.tokens_per_minute if lim else None,
            tokens=lambda: engine.tokens_asked(req, model) if req is not None else 0)
    except CascadeError:
        holds.release(rid)
        raise
    state["ticket"] = ticket
    return caller, budget, req  # the engine's request, where the limits built it: the engine runs that one


def _spend_buckets(caller: Caller, end_user: str | None) -> list[tuple[tuple, float, str, str, str | None]]:
    """The daily spend limits on a request: (bucket, limit, what, code, end user) for its key's limit and its
    end user's (the end users a key names are its own: each is limited within the key)."""
    lim, out = caller.limits, []
    if lim is None:
        return out
    if lim.daily_spend_limit_usd is not None:  # without a key (anonymous_user_tier): the keyless requests' total
        out.append((("key", caller.key_id), lim.daily_spend_limit_usd, "daily spend limit", "daily_spend_limit",
                    None))
    if lim.end_user_daily_spend_limit_usd is not None and end_user is not None:
        out.append((("user", caller.key_id, end_user), lim.end_user_daily_spend_limit_usd,
                    f"daily spend limit of user {end_user!r}", "end_user_daily_spend_limit", end_user))
    return out


#: spend sums are floats (0.024 + 0.204 is 0.22799999999999998): a limit counts as reached within this share
SPEND_REL_TOL = 1e-9


def spend_reached(spent: float, limit: float) -> bool:
    """Whether ``spent`` (USD, a float sum) has reached the daily ``limit``: within ``SPEND_REL_TOL`` of it."""
    return spent >= limit * (1 - SPEND_REL_TOL)


async def _check_daily_spend(engine: Engine, holds: SpendHolds, buckets: list, request_id: str,
                             ceiling: float) -> None:
    """Refuse (429) a request whose key or end user has reached a daily spend limit (``buckets``, from
    :func:`_spend_buckets`): the spend recorded today (UTC) plus the worst cases held by the requests in flight,
    on every replica sharing the ledger. Recorded spend alone at a limit: come back at 00:00 UTC (checked
    first, for every limit, so a passing burst never hides it); reached only with what is in flight: retry in a
    second. An admitted request holds ``ceiling`` (its worst case) until its row is written: checked and held
    in one transaction of the ledger (:meth:`cascade.ledger.Ledger.admit_spend`), so that nothing is admitted,
    here or on another replica, between this request's check and its hold."""
    if not buckets:
        return
    since = utc_day_start()

    def admit(figures: list[tuple[float, float, int]]) -> bool:
        return not any(spend_reached(spent + held, limit) for (_, limit, *_), (spent, held, _) in
                       zip(buckets, figures, strict=True))

    try:
        figures, admitted = await engine.ledger.admit_spend(request_id, [b for b, *_ in buckets], ceiling, since,
                                                            admit)
    except BaseException as exc:  # (cancelled, or not answered in time: the transaction may still run, and hold)
        engine.ledger.release_spend(request_id)
        if isinstance(exc, LedgerError):
            raise LedgerUnavailableError.of(exc, "the ledger could not check this request against its daily spend "
                                                 "limit now, so it was refused before any model was called: repeat "
                                                 "it shortly") from exc
        raise
    if admitted:
        holds.hold(request_id)
        return
    for (_, limit, what, code, _), (spent, _, _) in zip(buckets, figures, strict=True):
        if spend_reached(spent, limit):
            # the limit resets at 00:00 UTC; not before then: clients' quick retries would only be refused again
            _refuse_spend(f"{what} of ${limit:g} reached (${spent:.6f} spent today, UTC)", code,
                          retry_after=since + 86400.0 - time.time(), should_retry=False)
    for (_, limit, what, code, _), (spent, held, n) in zip(buckets, figures, strict=True):
        if spend_reached(spent + held, limit):
            _refuse_spend(f"{what} of ${limit:g} would be reached by the requests in flight (${spent:.6f} "
                          f"spent today, UTC, and up to ${held:.6f} more held by {n} request(s) not finished); "
                          "retry once they are", code, retry_after=1.0, should_retry=True)


def _refuse_spend(message: str, code: str, *, retry_after: float, should_retry: bool) -> None:
    err = BudgetExceededError(message, code=code)
    err.status_code, err.retry_after = 429, retry_after
    if not should_retry:
        err.should_retry = False
    raise err


#: the status nobody reads: the client closed the connection before the answer (nginx's 499)
CLIENT_CLOSED = 499


def cache_mode(cache_control: str | None, pragma: str | None = None) -> str:
    """The response cache's use for a request, from its ``Cache-Control`` header as HTTP means it:
    ``no-store``: neither read nor store ("bypass"); ``no-cache`` or ``max-age=0`` (and HTTP/1.0's
    ``Pragma: no-cache`` without a Cache-Control): answer afresh, store it ("refresh"). Other directives
    (``max-age`` above 0, ``min-fresh``...) are not read: the entry's own ``cache.ttl_s`` bounds its age."""
    directives: dict[str, str] = {}
    for part in (cache_control or "").split(","):
        name, _, value = part.partition("=")
        if name.strip():
            directives[name.strip().lower()] = value.strip().strip('"')
    if not directives:
        no_cache = any(p.strip().lower() == "no-cache" for p in (pragma or "").split(","))
        return "refresh" if no_cache else "use"
    if "no-store" in directives:
        return "bypass"
    # max-age=0 (delta-seconds: ASCII digits only; anything else, like ``max-age=²``, is not read)
    max_age_zero = re.fullmatch(r"0+", directives.get("max-age", ""), re.ASCII) is not None
    return "refresh" if "no-cache" in directives or max_age_zero else "use"


#: the request field that holds the prompt, per endpoint: an error about the prompt (too long for a tier's
#: context) names it, as the engine's errors name a chat's ``messages``
_PROMPT_PARAM = {"completions": "prompt", "responses": "input"}


async def _complete(request: Request, body: AnyRequest, endpoint: str) -> Response:
    try:
        return await _answer(request, body, endpoint)
    except CascadeError as exc:
        if exc.param == "messages" and endpoint in _PROMPT_PARAM:
            exc.param = _PROMPT_PARAM[endpoint]
        elif exc.param and exc.param.startswith("messages.") and isinstance(body, ResponsesRequest):
            # one message (a special token in its text): the instructions or input item it came from
            field = body.field_of(exc.param)
            exc.message = exc.message.replace(f"{exc.param}: ", f"{field}: ", 1)
            exc.param, exc.args = field, (exc.message,)
        named, _ = body.max_tokens_asked()  # the answer's bound as the client named it (max_completion_tokens)
        if isinstance(exc, ContextLengthExceededError) and named != "max_tokens":
            exc.message = exc.message.replace("max_tokens asks", f"{named} asks").replace(
                "lower max_tokens", f"lower {named}")
            exc.args = (exc.message,)
        raise


async def _answer(request: Request, body: AnyRequest, endpoint: str) -> Response:
    """Every record the engine finishes reaches the metrics once written (``engine.commit_listeners``)."""
    engine = _engine(request)
    caller, budget, req = await _admit(request, body, endpoint)
    try:
        kw = dict(model=body.model, endpoint=endpoint, api_key_id=caller.key_id, user_tier=caller.user_tier,
                  budget=budget, request_id=request.scope.get("state", {}).get("request_id"),
                  # a header sent as several lines is their comma-joined list (RFC 9110 5.3)
                  cache=cache_mode(", ".join(request.headers.getlist("cache-control")) or None,
                                   ", ".join(request.headers.getlist("pragma")) or None),
                  **body.attribution())
        # (one object from admission to the tiers: a local tier tokenizes its prompt once, RecentPrompts)
        req = req or body.to_engine()
    except Exception as exc:  # a fault of this server's before the engine ran: its row, as the engine's own have
        log.exception("request failed before the engine ran")
        err = InternalError("internal server error")
        await record_refusal(request, err, _route_name(request, body), endpoint, body.attribution())
        raise err from exc
    if body.stream:
        return await _stream(request, body, req, endpoint, kw)
    shape = _SHAPES[endpoint]

    async def answer() -> Response:
        outcome, committed = await engine.run_uncommitted(req, **kw)
        # the response is rendered while the ledger thread commits the record; it leaves only once committed. A
        # client that leaves meanwhile (a slow database) never gets it: the row, written as served, is made
        # cancelled (Engine.wait_committed), as a stream's answer in hand is, not billed as delivered
        response = JSONResponse(shape(body, outcome.result, outcome.record), headers=cascade_headers(outcome.record))
        await engine.wait_committed(outcome.record, committed)
        _metrics(request).observe_served(outcome.record)  # it answers (one whose client left is cancelled)
        return response

    answered, response = await _unless_disconnected(request, answer())
    if not answered or response is None:
        return Response(status_code=CLIENT_CLOSED)
    return response


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "completions")


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, stateless (serving/responses.py)."""
    return await _complete(request, body, "responses")


@router.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
async def stored_responses(rest: str) -> Response:
    """OpenAI's endpoints on stored responses (retrieve, delete, cancel, input items, input tokens): this
    server keeps none, and says so."""
    raise NotFoundError("this server keeps no responses (POST /v1/responses is stateless): nothing to fetch, "
                        "delete or cancel; send earlier turns in `input`", code="response_not_found")


#: endpoint -> the answer's response body
_SHAPES = {"chat": chat_response, "completions": completion_response, "responses": response_object}


# --- the hot path: the completion endpoints without FastAPI's per-request machinery ---------------

#: path -> (endpoint, request model) of the routes above
_HOT_ROUTES: dict[str, tuple[str, type[AnyRequest]]] = {
    "/v1/chat/completions": ("chat", ChatCompletionRequest),
    "/v1/completions": ("completions", CompletionRequest),
    "/v1/responses": ("responses", ResponsesRequest),
}


class HotPathMiddleware:
    """Serve well-formed, non-streaming ``POST /v1/chat/completions``, ``/v1/completions`` and
    ``/v1/responses`` requests directly, with the same handler (:func:`_complete`) and the same error
    responses as the routes above, but without FastAPI's routing, dependency solving, exit stacks and
    exception middleware (tens of µs per request; docs/benchmarks.md, overhead).

    Only requests FastAPI would accept take this path: a ``application/json`` body that parses with
    ``json.loads`` and validates against the route's model the way FastAPI validates it. Anything else
    (another path or method, another content type, a body that does not parse or validate, a stream, a
    disconnect while reading) goes to the FastAPI app with the body replayed, so its responses, errors
    included, are exactly those of the routes. Sits inside the body-size limit and inside
    ``ServerErrorMiddleware`` (an unexpected error gets the same 500).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = (_HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST"
               and not scope.get("root_path") else None)
        if hot is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            received.append(msg)
            if msg["type"] != "http.request":
                await self.app(scope, _replay(received, receive), send)
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        endpoint, model = hot
        try:
            body = model.model_validate(json.loads(b"".join(chunks)), from_attributes=True)
        except Exception:  # noqa: BLE001 - not JSON, not valid, or worse: the route answers it, as it always did
            body = None
        if body is None or body.stream:
            await self.app(scope, _replay(received, receive), send)
            return
        request = Request(scope, receive)
        try:
            response = await _complete(request, body, endpoint)
        except CascadeError as exc:
            response = cascade_error_response(exc)
        await response(scope, receive, send)


#: paths whose every request needs the caller's key (when the server has keys)
_AUTH_PREFIXES = ("/v1/", "/admin/")


class AuthMiddleware:
    """Authenticate ``/v1/`` and ``/admin/`` requests from their headers before anything reads or validates
    the body: without a valid key the answer is 401, whatever the body holds (as OpenAI does). The caller
    goes into the scope's state for the handlers (:func:`_caller`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_AUTH_PREFIXES):
            try:
                if scope["path"].startswith("/admin/"):  # (before the key: an open server has none to check)
                    refuse_cross_site(Request(scope))
                caller = authenticate(scope["app"].state.engine.config, Request(scope))
            except CascadeError as exc:
                scope["app"].state.metrics.observe_error(type(exc).__name__)
                await cascade_error_response(exc)(scope, receive, send)
                return
            state = scope.setdefault("state", {})
            state["caller"] = caller

            async def send_with_limits(msg: Message) -> None:
                ticket = state.get("ticket")  # an admitted completion: its rate-limit headers
                if ticket is not None and ticket.headers and msg["type"] == "http.response.start":
                    msg = {**msg, "headers": [*msg.get("headers", ()), *ticket.headers]}
                await send(msg)

            try:
                await self.app(scope, receive, send_with_limits)
            finally:
                ticket = state.pop("ticket", None)
                if ticket is not None:  # the response is sent (or abandoned): its in-flight slots are free
                    ticket.release()
                # its spend hold ends when its ledger row is committed; here only if it never wrote one
                scope["app"].state.spend_holds.release(state.get("request_id", ""), unless_submitted=True)
            return
        await self.app(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    """The request's first content-type header is application/json (parameters allowed)."""
    for k, v in scope["headers"]:
        if k == b"content-type":
            return v.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A receive callable that gives back the messages already read, then reads on."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


# --- streaming -------------------------------------------------------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: Request, body: AnyRequest, req: GenerationRequest, endpoint: str,
                  kw: dict) -> Response:
    """Start the engine's stream; errors before its first event become ordinary HTTP errors."""
    engine, metrics = _engine(request), _metrics(request)
    # the first token's wait counts from here, as its client waits: the buffered tiers' whole answers, a cache
    # hit's commit and the live tier's first token come before it (StreamStart comes after all of them)
    started = time.perf_counter()
    events = engine.stream(req, **kw)
    # raises CascadeError before any byte is sent; the buffered tiers stop if the client goes meanwhile
    answered, first = await _unless_disconnected(request, anext(events))
    if not answered:
        await events.aclose()
        return Response(status_code=CLIENT_CLOSED)
    assert isinstance(first, StreamStart)
    rec = first.record
    events = _served_when_out(events, lambda: metrics.observe_served(rec))
    # a client that stops reading is cut off after this long: its slots, spend hold and upstream call are freed
    send_timeout_s = engine.config.server.stream_send_timeout_s
    if isinstance(body, ResponsesRequest):
        def first_token() -> None:
            metrics.ttft.labels(rec.policy).observe(time.perf_counter() - started)

        async def sse() -> AsyncIterator[bytes]:
            try:
                # the server's shutdown ends this stream as the Responses API ends one (serving/shutdown.py)
                tail = request.scope.setdefault("state", {}).__setitem__
                async for b in response_events(body, first, events, first_token, lambda f: tail(SSE_TAIL, f)):
                    yield b
            finally:
                await events.aclose()

        return BoundedStreamingResponse(sse(), media_type="text/event-stream", headers=_stream_headers(rec),
                                        send_timeout_s=send_timeout_s)
    chat = endpoint == "chat"
    rid = ("chatcmpl-" if chat else "cmpl-") + rec.request_id
    created = int(rec.created_at)
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    want_lp = bool(body.logprobs) if chat else body.logprobs is not None
    top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)

    def chunk(choice: dict, **extra: object) -> bytes:
        if include_usage:  # as OpenAI: every chunk says usage, null but in the last one's
            extra.setdefault("usage", None)
        head = {"id": rid, "object": obj, "created": created, "model": first.tier}
        if chat:
            head["system_fingerprint"] = None  # as the unstreamed answer says it
        return _sse({**head, "choices": [choice] if choice else [], **extra})

    def failed(record: CascadeRecord, err: CascadeError) -> bytes:
        payload = error_body(f"stream interrupted: {err.message}", err.error_type, code=err.code)
        payload["cascade"] = cascade_block(record)
        return _sse(payload)

    # the server's shutdown ends this stream with the same error event, its account the row written as the stream
    # was closed (serving/shutdown.py)
    request.scope.setdefault("state", {})[SSE_TAIL] = lambda err: failed(rec, err) + b"data: [DONE]\n\n"

    async def body_iter() -> AsyncIterator[bytes]:
        first_token = True
        # completions' text_offset counts from the prompt's start (OpenAI's) and runs on across chunks, over the
        # tokens' texts (which join to the answer, but may arrive a chunk after their text while a stop string
        # could still cut them)
        offset = 0 if chat else len(body.prompt_text())
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                             "logprobs": None, "finish_reason": None})
            async for ev in events:
                if isinstance(ev, StreamDelta):
                    if first_token:
                        metrics.ttft.labels(rec.policy).observe(time.perf_counter() - started)
                        first_token = False
                    if chat:
                        lp = chat_logprobs(ev.tokens, top) if want_lp else None
                        yield chunk({"index": 0, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None})
                    else:
                        lp = completion_logprobs(ev.tokens, top, offset) if want_lp else None
                        offset += sum(len(t.token) for t in ev.tokens)
                        yield chunk({"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None})
                elif isinstance(ev, StreamEnd):
                    end = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason} if chat
                           else {"index": 0, "text": "", "logprobs": None, "finish_reason": ev.finish_reason})
                    yield chunk(end, cascade=cascade_block(ev.record))
                    if include_usage and ev.usage is not None:
                        yield chunk({}, usage=usage_block(ev.usage))
                elif isinstance(ev, StreamFailed):
                    yield failed(ev.record, ev.error)
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()

    return BoundedStreamingResponse(body_iter(), media_type="text/event-stream", headers=_stream_headers(rec),
                                    send_timeout_s=send_timeout_s)


async def _served_when_out(events: AsyncIterator[StreamEvent], served: Callable[[], None]
                           ) -> AsyncIterator[StreamEvent]:
    """``events``, calling ``served`` as the first of the answer goes out (its first chunk, or its end when it had
    none: an empty answer): the metrics count a hit or an escalation then (Metrics.observe_served)."""
    out = False
    try:
        async for ev in events:
            if not out and isinstance(ev, (StreamDelta, StreamEnd)):
                out = True
                served()
            yield ev
    finally:
        await events.aclose()


def _stream_headers(rec: CascadeRecord) -> dict[str, str]:
    headers = cascade_headers(rec)
    # known only at the end (a live tier's provider may still fall over): in the final event's `cascade` object
    for h in ("x-cascade-cost-usd", "x-cascade-escalation-waste-usd", "x-cascade-confidence", "x-cascade-attempts"):
        headers.pop(h, None)
    headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
    return headers


# --- the rest --------------------------------------------------------------------------------------


# each GET route is registered before its HEAD twin (decorators apply bottom-up): a 405 on the path lists the
# methods of the first route that matches it, and GET is the one to name
@router.head("/v1/models", include_in_schema=False)  # load balancers' health checks use HEAD
@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    engine = _engine(request)
    caller = _caller(request)
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


@router.head("/v1/models/{model_id:path}", include_in_schema=False)
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    for entry in (await list_models(request))["data"]:
        if entry["id"] == model_id:
            return entry
    raise NotFoundError(f"model {model_id!r} does not exist", param="model", code="model_not_found")


#: what the completion objects put before the request id (``chatcmpl-casc-...``): SDKs hand out that ``id``
_RESPONSE_ID_PREFIXES = ("chatcmpl-", "cmpl-", "resp_")


async def _own_request(request: Request, request_id: str) -> dict:
    """The ledger row of one of the caller's requests (another key's request is as good as missing), by its
    request id or by the ``id`` of the completion object that answered it (``chatcmpl-`` + the request id)."""
    engine = _engine(request)
    caller = _caller(request)
    try:
        row = await engine.ledger.get(request_id)
        if row is None and (prefix := next((p for p in _RESPONSE_ID_PREFIXES if request_id.startswith(p)), None)):
            row = await engine.ledger.get(request_id[len(prefix):])
    except LedgerError as exc:  # (the database unreachable, a restart, a failover): a 503 to repeat, not a 500
        raise LedgerUnavailableError.of(exc, "the ledger cannot be read now, so this call was not answered: "
                                             "repeat it shortly") from exc
    if row is None or (caller.key_id is not None and row["api_key_id"] != caller.key_id):
        raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id")
    return row


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict:
    row = await _own_request(request, body.request_id)  # the ledger's id, when the completion's id was given
    fb = await _engine(request).feedback(row["request_id"], body.score, body.comment,
                                         api_key_id=_caller(request).key_id)
    if _metrics(request).drift is not None:  # a label for the rolling ECE (cascade/drift.py)
        # (its confidence from the ledger too: another replica may have served it, and seen no feedback)
        _metrics(request).drift.observe_feedback(
            fb.request_id, fb.score, fb.answered_by,
            served=(fb.confidence, fb.created_at) if fb.confidence is not None else None)
    return {"object": "feedback", "id": fb.id, "request_id": fb.request_id, "score": fb.score}


@router.get("/v1/feedback/{request_id}")
async def read_feedback(request_id: str, request: Request) -> dict:
    row = await _own_request(request, request_id)
    return {"object": "list", "request_id": row["request_id"],
            "data": [{"id": f["id"], "score": f["score"], "comment": f["comment"], "created_at": f["created_at"]}
                     for f in row["feedback"]]}


@router.post("/admin/reload")
async def admin_reload(request: Request) -> dict:
    """Swap in the calibrators and thresholds of the config file (and the artifacts it names) without
    dropping requests. Keys whose user tier has ``admin: true`` only (anyone on an open server)."""
    from cascade.recalibrate import authorize_admin, reload_engine_async

    engine = _engine(request)
    authorize_admin(engine.config, _caller(request))
    try:
        return await reload_engine_async(engine, getattr(request.app.state, "config_path", None))
    except ConfigError as exc:  # the operator's file, not the server, is at fault: a 4xx, and a log line
        log.error("reload refused, the previous configuration stays: %s", exc.message)
        raise ReloadRefusedError(f"reload refused, the previous configuration stays in use: {exc.message}",
                                 param=exc.param) from exc


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_metrics(request).render(), media_type=CONTENT_TYPE_LATEST)


@router.head("/health", include_in_schema=False)  # load balancers' health checks use HEAD
@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "uptime_s": round(time.monotonic() - request.app.state.started_monotonic, 3)}


@router.head("/ready", include_in_schema=False)  # load balancers' health checks use HEAD
@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    engine = _engine(request)
    state = {name: t.backend.ready for name, t in engine.tiers.items()}
    ledger_down = await engine.ledger.probe()  # answers that cannot be accounted: not ready
    ok = all(state.values()) and ledger_down is None
    body = {"status": "ready" if ok else ("ledger_unavailable" if ledger_down else "loading"), "tiers": state,
            "ledger": "ok" if ledger_down is None else ledger_down}
    # each provider's circuit breaker (tiers with providers): said, not judged (an open breaker fails fast with
    # its own 503 and Retry-After; the server itself can still answer through other tiers and providers)
    breakers: dict[str, dict[str, str]] = {}
    held: dict[str, dict[str, float]] = {}
    for name, t in engine.tiers.items():
        if isinstance(t.backend, ResilientBackend):
            for p, snap in t.backend.health().items():
                breakers.setdefault(name, {})[p] = snap["state"]
                if snap["rate_limited_s"] > 0:
                    held.setdefault(name, {})[p] = snap["rate_limited_s"]
    if breakers:
        body["breakers"] = breakers
    if held:  # providers whose own Retry-After keeps requests off them (to their fallbacks) for so many seconds
        body["rate_limited"] = held
    return JSONResponse(body, status_code=200 if ok else 503)
