"""Graceful shutdown with an answer for everyone: requests still running when ``server.graceful_shutdown_s``
runs out get a 503 ``server_shutdown`` (a stream: an error event and ``[DONE]``) and a ledger row saying so,
never a bare 500 or a cut connection.

On SIGTERM uvicorn stops accepting, lets in-flight requests finish, and after its own timeout cancels
whatever still runs and answers a plain 500 (or drops a started stream). So uvicorn is given
``graceful_shutdown_s + ABORT_WINDOW_S``, and :class:`Drain` acts at ``graceful_shutdown_s``: it tells the
engine why (:meth:`Engine.abort_in_flight`, so the ledger rows read ``ServerShutdown``), cancels each
request's task, and :class:`DrainMiddleware` answers for it. A request whose ledger row is already written
is not cancelled: its answer goes out. A stream writes its row as it is closed, in its request's task
(serving/streaming.py closes it even when cancelled waiting for a client that stopped reading), and the
drain's own answers wait for no such client. The answered connections close, and uvicorn goes on to the
lifespan shutdown, which flushes the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.errors import CascadeError, ServerShutdown
from cascade.types import CascadeRecord
from serving.errors import error_body, error_response
from serving.streaming import abort_connection, http_protocol

log = logging.getLogger("cascade.serving")

#: how long uvicorn waits, after the drain has answered, before it cancels what is left (its own 500)
ABORT_WINDOW_S = 5.0
#: how long the drain's own answer (a 503, a stream's error event) may wait for a client to take it
ANSWER_SEND_S = 1.0


class Drain:
    """The requests in flight, and the moment a shutdown gives up on them.

    A request whose ledger row is already written (queued: :meth:`observe` is an engine record listener) is
    left alone: it only waits for that commit and for its response to go out, and cancelling it would send a
    503 for an answer the ledger records, and bills, as served."""

    def __init__(self) -> None:
        #: each request's task, with its request id (the id of its ledger row)
        self.tasks: dict[asyncio.Task, str | None] = {}
        self._ids: set[str] = set()
        #: ids of requests in flight whose ledger rows are written
        self.recorded: set[str] = set()
        #: the tasks of streams under way (an event stream started and not ended): cancelled by an abort even
        #: when their rows are written (an answer in hand streams after its row is committed)
        self.streaming: set[asyncio.Task] = set()
        #: set when the shutdown ran out of time: the error every request still running is answered with
        self.error: CascadeError | None = None
        #: called with that error before the tasks are cancelled (the app sets it to the engine's)
        self.on_abort: Callable[[CascadeError], None] | None = None
        #: called with ``grace_s`` as the shutdown begins (the app sets it to the shadow sampler's stop_drawing)
        self.on_begin: Callable[[float], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, grace_s: float) -> None:
        """A shutdown has begun: abort whatever still runs in ``grace_s`` seconds (in the running loop)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(grace_s, self.abort, grace_s)
            if self.on_begin is not None:
                try:
                    self.on_begin(grace_s)
                except Exception:  # noqa: BLE001 - the shutdown goes on whatever a hook does
                    log.exception("shutdown hook failed")

    def enter(self, task: asyncio.Task, request_id: str | None) -> None:
        self.tasks[task] = request_id
        if request_id is not None:
            self._ids.add(request_id)

    def leave(self, task: asyncio.Task) -> None:
        self.streaming.discard(task)
        request_id = self.tasks.pop(task, None)
        if request_id is not None:
            self._ids.discard(request_id)
            self.recorded.discard(request_id)

    def observe(self, rec: CascadeRecord) -> None:
        if rec.request_id in self._ids:
            self.recorded.add(rec.request_id)

    def abort(self, grace_s: float, why: str | None = None) -> None:
        """Answer the requests still running with 503 ``server_shutdown`` now (``why``: what ended them, when
        not the grace running out)."""
        if self._timer is not None:
            self._timer.cancel()
        running = [t for t, rid in self.tasks.items() if rid not in self.recorded or t in self.streaming]
        if self.error is not None or not running:
            return
        cut = why
        why = why or f"it ran past the {grace_s:g} s graceful shutdown"
        self.error = ServerShutdown(f"the server shut down before the request finished ({why}); repeat it")
        log.warning("%s: answering %d request(s) still running with 503",
                    cut or f"graceful shutdown ran out after {grace_s:g} s", len(running))
        if self.on_abort is not None:
            self.on_abort(self.error)
        for task in running:
            task.cancel()


#: ``scope["state"]`` key of a stream's own ending for an error from outside its engine (a function of the
#: error, giving the bytes that end the stream in its protocol, with the ledger row's account): set by each route
#: that streams
SSE_TAIL = "sse_tail"


class DrainMiddleware:
    """Track each HTTP request's task; when :class:`Drain` cancels it, answer for it: a 503 JSON error when
    nothing was sent yet, an SSE error event and ``[DONE]`` for a stream already under way. A client that
    is not reading is not waited for: cancelled while its send waited, it gets nothing more (its connection
    is reset); an answer it does not take within ``ANSWER_SEND_S`` is given up, and its connection reset."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        started = ended = sse = sending = False

        async def tracking_send(msg: Message) -> None:
            nonlocal started, ended, sse, sending
            if msg["type"] == "http.response.start":
                started = True
                sse = any(k == b"content-type" and v.startswith(b"text/event-stream")
                          for k, v in msg.get("headers", ()))
                if sse:
                    self.drain.streaming.add(task)
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                ended = True
                self.drain.streaming.discard(task)
            sending = True  # still true if cancelled in it: uvicorn waits in send only for a client not reading
            await send(msg)
            sending = False

        self.drain.enter(task, scope.get("state", {}).get("request_id"))
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            error = self.drain.error
            if error is None or (ended and not sending):  # not the drain's doing (or nothing left to say)
                raise
            task.uncancel()
            if sending:  # cancelled waiting for a client that is not reading: it would take no answer either
                await abort_connection(scope)  # (its ledger row is written: its stream was closed on the way out)
                return
            try:
                async with asyncio.timeout(ANSWER_SEND_S):  # a client that stops reading now: not waited for
                    if not started:
                        await error_response(error)(scope, receive, send)
                    else:
                        tail = b""
                        own_tail = scope.get("state", {}).get(SSE_TAIL)
                        if sse and own_tail is not None:  # the stream's own (Responses: response.failed)
                            tail = own_tail(error)
                        elif sse:  # a stream that set none: an error event, then [DONE]
                            payload = error_body(f"stream interrupted: {error.message}", error.error_type,
                                                 code=error.code)
                            tail = b"data: " + json.dumps(payload, separators=(",", ":")).encode()
                            tail += b"\n\ndata: [DONE]\n\n"
                        await send({"type": "http.response.body", "body": tail, "more_body": False})
            except TimeoutError:  # not taken: given up, and the connection reset (closed, it would wait for the
                await abort_connection(scope)  # client to take its unsent bytes, and uvicorn for it, to its cut-off)
        finally:
            self.drain.leave(task)


def run_server(app: ASGIApp, drain: Drain, *, host: str, port: int, log_level: str, graceful_shutdown_s: float,
               uvicorn_logging: bool = True, request_read_timeout_s: float | None = None,
               max_header_bytes: int | None = None) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; requests get ``graceful_shutdown_s`` to finish, then
    ``drain`` answers those still running (503) and the process exits. ``uvicorn_logging=True``: uvicorn's
    own text lines, its access lines ending with the request's id (:func:`serving.logs.uvicorn_log_config`);
    ``False``: uvicorn leaves logging alone and its lines go to the root logger's handler (the JSON lines of
    serving/logs.py). A request must arrive whole within ``request_read_timeout_s`` (by default the
    ``server.request_read_timeout_s`` that :func:`serving.create_app` gave ``app``: serving/streaming.py)."""
    import uvicorn

    from serving.logs import uvicorn_log_config

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _cut_short = False

        async def serve(self, sockets: list | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        async def shutdown(self, sockets: list | None = None) -> None:
            drain.begin(graceful_shutdown_s)
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            # a second Ctrl-C during the grace: uvicorn would quit at once, skipping the lifespan's shutdown (the
            # ledger's flush of the rows still queued) and leaving the requests running to its plain 500s, recorded
            # as clients that left. The grace ends now instead: they get the drain's 503s and ServerShutdown rows,
            # and the ledger is closed. A third Ctrl-C is uvicorn's force quit.
            if (sig == signal.SIGINT and self.should_exit and not self.force_exit and not self._cut_short
                    and self._loop is not None):
                self._cut_short = True
                log.warning("second Ctrl-C: the graceful shutdown is cut short (a third one quits at once)")
                self._loop.call_soon_threadsafe(drain.abort, graceful_shutdown_s,
                                                "a second Ctrl-C cut the graceful shutdown short")
                return
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    if request_read_timeout_s is None:
        request_read_timeout_s = getattr(getattr(app, "state", None), "request_read_timeout_s", None)
    if max_header_bytes is None:
        max_header_bytes = getattr(getattr(app, "state", None), "max_header_bytes", None)
    # loop/http "auto": uvloop and httptools (runtime dependencies) where installed, else asyncio and h11; the
    # protocol lets a connection whose client stopped reading be reset, and bounds how long a request may take
    # to arrive (serving/streaming.py)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, loop="auto",
                            http=http_protocol(request_read_timeout_s, max_header_bytes),
                            log_config=uvicorn_log_config() if uvicorn_logging else None,
                            timeout_graceful_shutdown=graceful_shutdown_s + ABORT_WINDOW_S)
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C: uvicorn.run ends quietly too
        pass
    finally:
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            # the closed loop put back SIGHUP's default (ending the process): a late one is ignored, as the
            # server's own handler ignored it during the shutdown (cascade/recalibrate.py install_sighup)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run does: the socket could not be bound, or the app failed to start


__all__ = ["ABORT_WINDOW_S", "Drain", "DrainMiddleware", "run_server"]
