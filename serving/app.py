"""The FastAPI application factory."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.config import Config
from cascade.types import CascadeRecord
from cascade.engine import Engine, new_request_id
from cascade.errors import CascadeError, LedgerTimeoutError, RequestHeadersTooLargeError, RequestTooLargeError
from cascade.limits import Admission, SpendHolds
from serving.errors import error_body, install_error_handlers
from serving.logs import current_request_id
from serving.metrics import Metrics
from serving.shutdown import Drain, DrainMiddleware
from serving.streaming import RequestReadTimeoutMiddleware


class _TooLarge(BaseException):
    """Raised from inside the app's ``receive`` when the body passes the limit (``args[0]``: whose limit).
    A ``BaseException``: FastAPI turns any ``Exception`` met while reading a body into a vague 400, and
    this must reach :class:`BodyLimitMiddleware` to become the 413 it is."""


class HeaderLimitMiddleware:
    """Refuse requests whose target and headers together pass ``limit`` bytes with 431 (uvicorn's httptools
    parser sets no limit of its own), before any route reads them. Inside the key's check: a completion request
    refused so, with a valid key, is a ledger row like every refusal (under no policy: its body was never read)."""

    def __init__(self, app: ASGIApp, limit: int = 65_536) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.limit:
                from serving.routes import record_unread_refusal

                exc = RequestHeadersTooLargeError(f"request headers are larger than {self.limit} bytes")
                await record_unread_refusal(scope, exc)
                await _send_error(send, exc.status_code, exc.message, exc.code)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, by header or by counting what arrives. Inside the
    key's check: a completion request refused so, with a valid key, is a ledger row like every refusal (under
    no policy: its model was never read)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await self._refuse(scope, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self)
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as exc:
            if exc.args[0] is not self:
                raise
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        from serving.routes import record_unread_refusal

        exc = RequestTooLargeError(f"request body is larger than {self.limit} bytes")
        await record_unread_refusal(scope, exc)
        await _send_error(send, exc.status_code, exc.message, exc.code)


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    """An OpenAI-style error response sent from a middleware, before any route."""
    import json

    body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


#: a client's own id for a request (OpenAI's header, and the common one), echoed as ``x-client-request-id``
_CLIENT_ID_HEADERS = (b"x-client-request-id", b"x-request-id")


def _client_request_id(scope: Scope) -> bytes | None:
    """The client's request id, when it is one that can be echoed as given: 1-128 visible ASCII
    characters. Anything else is dropped, never trimmed (an altered id matches nothing the client logged)."""
    for name in _CLIENT_ID_HEADERS:
        for k, v in scope.get("headers", ()):
            if k == name:
                if 0 < len(v) <= 128 and all(0x21 <= c <= 0x7E for c in v):
                    return v
                break  # this header's id cannot be echoed: the other header's may
    return None


def _startup_failure_in_one_line(send: Send) -> Send:
    """The lifespan's ``send``: a CascadeError that stops the server's startup (a model whose tokenizer or
    config.json will not load, a GPU out of memory) is logged as its one line: starlette hands uvicorn the whole
    traceback, which buried the line that says what is wrong and how to fix it. Other exceptions keep their
    traceback."""

    async def send_one_line(message: Message) -> None:
        exc = sys.exc_info()[1]  # starlette sends the failure from inside its except block
        if message["type"] == "lifespan.startup.failed" and isinstance(exc, CascadeError):
            message = {**message, "message": f"{type(exc).__name__}: {exc.message}"}
        await send(message)

    return send_one_line


class RequestIdMiddleware:
    """Give every HTTP request an id and every response an ``x-request-id`` header carrying it (the header
    the openai SDK reads into ``response._request_id``). A completion's ledger row is filed under the same
    id, errors included, so the id in any answer finds its row (``GET /v1/feedback/{id}``, ``cascade report``).
    A client's own ``X-Client-Request-Id`` (or ``X-Request-ID``) is echoed back as ``x-client-request-id``.
    Outermost, it also gives the lifespan its ``send`` (:func:`_startup_failure_in_one_line`): here rather than
    in a middleware of its own, which every HTTP request would pass through for nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, _startup_failure_in_one_line(send) if scope["type"] == "lifespan" else send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        extra = [(b"x-request-id", rid.encode())]
        client_id = _client_request_id(scope)
        if client_id is not None:
            extra.append((b"x-client-request-id", client_id))

        async def send_with_id(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), *extra]}
            await send(msg)

        token = current_request_id.set(rid)  # every log line of this request names it (serving/logs.py)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


def create_app(config: Config, *, engine: Engine | None = None, preload: bool = True,
               config_path: str | None = None) -> FastAPI:
    """Build the app. With ``engine=None`` the app opens (and closes) its own engine from ``config``.

    ``config_path``: the file ``config`` came from; POST /admin/reload and SIGHUP re-read it (calibrators,
    thresholds, shadows). Without it they re-read the calibrator artifacts the config names.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        app.state.engine = engine if engine is not None else await Engine.open(config, preload=preload)
        app.state.started_at = time.time()  # (the models' "created")
        # uptime by the monotonic clock: a step of the wall clock (NTP, a VM resumed) made it negative or a jump
        app.state.started_monotonic = time.monotonic()
        app.state.metrics = Metrics(drift=config.drift, models=app.state.engine.model_names())
        app.state.metrics.watch_cache(app.state.engine.cache)
        app.state.metrics.watch_breakers(app.state.engine.tiers)
        app.state.metrics.watch_admission(app.state.admission)
        listeners = app.state.engine.sampler.listeners  # sampled shadows' calls and spend
        listeners.append(app.state.metrics.observe_shadow_call)
        app.state.engine.correction_listeners.append(app.state.metrics.observe_client_left)
        metrics = app.state.metrics

        def metrics_committed(rec: CascadeRecord, error: BaseException | None) -> None:
            # every request once its row is written; one whose write failed as the error its client got (the
            # calls it made still cost what they cost; nothing kept, as the ledger records a row committed
            # after its client was told it timed out)
            metrics.observe(rec if error is None else replace(
                rec, status="error", error_class=type(error).__name__, error_message=str(error), tier=None,
                attempts=[replace(a, kept=False) for a in rec.attempts]))

        app.state.engine.commit_listeners.append(metrics_committed)

        def reloaded(summary: dict) -> None:
            if metrics.drift is not None and summary.get("decisions_changed"):
                metrics.drift.reset("the windows start afresh: a reload changed the thresholds or calibrators")

        app.state.engine.reload_listeners.append(reloaded)
        drain.on_abort = app.state.engine.abort_in_flight  # a shutdown out of time: its rows say so
        drain.on_begin = app.state.engine.sampler.stop_drawing  # no sample is paid for while requests drain
        app.state.engine.record_listeners.append(drain.observe)  # ...and requests already recorded finish
        # admitted under a daily spend limit, a request holds its worst case in the ledger until its row is
        # written (which deletes the hold); one that ends without a row has its hold deleted there
        holds = app.state.spend_holds
        holds.ledger = app.state.engine.ledger

        def row_submitted(rec: CascadeRecord) -> None:
            holds.submitted(rec.request_id)

        def row_written(rec: CascadeRecord, error: BaseException | None) -> None:
            # (a row that could not be written leaves its hold in the ledger, made its cost: the money was spent)
            holds.release(rec.request_id)

        def row_committed(rec: CascadeRecord, error: BaseException | None) -> None:
            if not isinstance(error, LedgerTimeoutError):  # one that timed out (or is held) is still queued:
                row_written(rec, error)                     # until it commits after all, or fails (late_listeners)

        app.state.engine.record_listeners.append(row_submitted)
        app.state.engine.commit_listeners.append(row_committed)
        app.state.engine.ledger.late_listeners.append(row_written)
        from cascade.recalibrate import install_sighup

        remove_sighup = install_sighup(app.state.engine, config_path)  # reload on SIGHUP (main thread only)
        try:
            yield
        finally:
            if remove_sighup is not None:
                remove_sighup()
            listeners.remove(app.state.metrics.observe_shadow_call)
            app.state.engine.commit_listeners.remove(metrics_committed)
            app.state.engine.reload_listeners.remove(reloaded)
            app.state.engine.record_listeners.remove(drain.observe)
            app.state.engine.record_listeners.remove(row_submitted)
            app.state.engine.commit_listeners.remove(row_committed)
            app.state.engine.ledger.late_listeners.remove(row_written)
            holds.ledger = None
            if owned:
                await app.state.engine.close()

    # redirect_slashes off: `/health/` is a 404, not a 307 to a Location built from the client's Host header
    app = FastAPI(title="cascade-engine", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="OpenAI-compatible confidence-escalation cascade.")
    app.state.config_path = config_path
    #: requests in flight, answered with 503 when a shutdown runs out of time (serving/shutdown.py)
    app.state.drain = drain = Drain()
    #: the keys' request-rate and in-flight limits, and the server's (cascade/limits.py): one per process
    app.state.admission = Admission()
    #: the requests admitted under daily spend limits whose rows are not queued yet (their holds: the ledger's)
    app.state.spend_holds = SpendHolds()
    install_error_handlers(app)
    from serving.routes import AuthMiddleware, HotPathMiddleware, router

    app.include_router(router)
    app.add_middleware(HotPathMiddleware)  # inside the body limit (the later add_middleware is the outer one)
    app.add_middleware(BodyLimitMiddleware, limit=config.server.max_body_bytes)  # a 413 knows its key: recorded
    app.add_middleware(HeaderLimitMiddleware, limit=config.server.max_header_bytes)  # a 431 too
    app.add_middleware(AuthMiddleware)  # the key before the body: a caller without one learns nothing more
    # a body that does not arrive in time: 408 (the protocol serve runs times the headers: serving/streaming.py)
    app.add_middleware(RequestReadTimeoutMiddleware, timeout_s=config.server.request_read_timeout_s)
    app.state.request_read_timeout_s = config.server.request_read_timeout_s  # for that protocol (run_server)
    app.state.max_header_bytes = config.server.max_header_bytes  # (and the headers it lets reach the parser)
    app.add_middleware(DrainMiddleware, drain=drain)  # answers for requests a shutdown gives up on
    # outermost: every response carries its id, a 413 or 401 too; a startup failing for a CascadeError, its one line
    app.add_middleware(RequestIdMiddleware)
    return app


__all__ = ["create_app", "BodyLimitMiddleware", "CascadeError", "HeaderLimitMiddleware", "RequestIdMiddleware"]
