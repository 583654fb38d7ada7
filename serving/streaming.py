"""Streamed responses that a client cannot hold open by not reading.

uvicorn's ``send`` waits (flow control) while the client takes nothing; Starlette's ``StreamingResponse``
waits with it, without limit, so a client that keeps its connection open and stops reading would keep its
request's slots, its daily spend hold and its upstream call for as long as it likes. And when a stream is
cancelled while it waits there (a shutdown), Starlette leaves its body iterator suspended, never closed:
the engine's stream, which writes the request's ledger row when it is closed, would wait for the garbage
collector, past the ledger's close.

:class:`BoundedStreamingResponse` gives every send ``send_timeout_s`` (``server.stream_send_timeout_s``):
a client that has not taken a chunk by then is cut off (the engine records it as a client that left:
``ClientDisconnected``, ``partial`` once tokens went out). And it always closes its body iterator itself,
in the request's task, before it returns or raises: the ledger row is written then, whatever ended the
stream.

A connection cut off that way still holds what it could not send, and asyncio's ``close()`` waits for a
client that does not read to take it: uvicorn would count the connection open (a shutdown waits for it
until its own cut-off). :func:`http_protocol` (the protocol ``cascade serve`` runs) lets
:func:`abort_connection` reset such a connection at once; under another server it closes as uvicorn closes
it.

Nor can a client hold a connection by sending its request slowly, or not at all (a ``Content-Length`` larger
than the body it sends, headers it never finishes: slowloris). uvicorn's ``timeout_keep_alive`` only covers
the silence between a response and the next request's first byte: a connection that never sends a byte, and
a request that trickles in (any byte stops that timer), are waited for without limit. So a request must
arrive whole, headers and body, within ``server.request_read_timeout_s`` of its connection's opening, or of
its first byte on a kept-alive connection. :func:`http_protocol` times it: one whose headers never complete
gets a 408 and its connection closed (a connection that sent nothing is closed silently); one that reached the
app is answered by :class:`RequestReadTimeoutMiddleware` when its body is late: a 408 ``request_timeout``
JSON error, and the connection closed.

An HTTP/1.0 client reads no chunked transfer coding (RFC 9112 7.1: a server must not send it one), yet
httptools' protocol frames every response without a ``Content-Length`` (a stream) in it: the client reads the
chunk sizes as part of the stream (``10e\r\ndata: {...}``). Under :func:`http_protocol` such a response to an
HTTP/1.0 request runs to the connection's close instead, as h11 sends it.

A request may offer to switch its connection to HTTP/2 (``Upgrade: h2c``, with ``Connection: Upgrade,
HTTP2-Settings``): Java's ``java.net.http.HttpClient`` does on every ``http://`` request by default (and so
the OpenAI clients built on it: Spring AI, LangChain4j), as does ``curl --http2``. A server that does not
switch answers the request as HTTP/1.1 (RFC 9110 7.8). httptools stops parsing at such a request's headers,
so under uvicorn it reached the app without its body (a 400 "the request body is empty" to every Java
client) and the body was then parsed as the connection's next request (a plain-text 400). Under
:func:`http_protocol` the offer is declined: the request is parsed again without it, body included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.errors import RequestTimeoutError
from serving.errors import error_body

log = logging.getLogger("cascade.serving")

#: the scope key under which :func:`http_protocol` gives a request the loop time by which it must have arrived
READ_DEADLINE = "cascade.read_deadline"


#: the open connections of servers run with :func:`http_protocol`, by (server address, client address)
_TRANSPORTS: dict[tuple[tuple, tuple], asyncio.BaseTransport] = {}


def _conn_key(server: Any, client: Any) -> tuple[tuple, tuple] | None:
    return (tuple(server), tuple(client)) if server and client else None


def _timeout_message(timeout_s: float) -> str:
    return (f"the request did not arrive whole within {timeout_s:g} s (server.request_read_timeout_s): "
            "send its headers and body without pausing")


def _timeout_body(timeout_s: float) -> bytes:
    return json.dumps(error_body(_timeout_message(timeout_s), "invalid_request_error",
                                 code="request_timeout")).encode()


#: how long a connection refused for its headers (431) is read from and discarded before it is closed
LINGER_S = 2.0

#: what may arrive, beyond ``max_header_bytes``, before a request's headers are complete: the rest of the
#: previous request's body when it came in the same read, and slack for a request line and header names
HEAD_SLACK_BYTES = 262_144


def _head_too_large_body(limit: int) -> bytes:
    return json.dumps(error_body(f"request headers are larger than {limit} bytes", "invalid_request_error",
                                 code="request_header_fields_too_large")).encode()


#: the headers that make an offer to switch protocols (dropped, with their ``Connection`` tokens, when declined)
_UPGRADE_HEADERS = (b"upgrade", b"http2-settings")


class _UpgradeDecliningParser:
    """httptools' request parser, for :func:`http_protocol`, that declines an offer to upgrade the connection
    to anything but a WebSocket (``Upgrade: h2c``). httptools (llhttp) takes a request offering an upgrade as
    the connection's last HTTP/1.1 bytes: its body is skipped, and what follows it is handed back as the new
    protocol's. So the request is not answered then (the protocol keeps its head without the offer, as its
    ``declined_head``): that head is given to a fresh parser, then the bytes that came after it (its body, and
    any next request); the fresh parser goes on for the rest of the connection."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.inner = self.fresh()

    def fresh(self) -> Any:
        """A parser as uvicorn makes one (httptools_impl's ``HttpToolsProtocol.__init__``)."""
        import httptools

        parser = httptools.HttpRequestParser(self.protocol)
        try:
            parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        return parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def feed_data(self, data: bytes | memoryview) -> None:
        import httptools

        while True:  # (a loop, not a copy of the rest per request: many such requests may come in one read)
            try:
                self.inner.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                head = self.protocol.declined_head
                if head is None:  # a WebSocket's, or a CONNECT: uvicorn's own handling
                    raise
                self.protocol.declined_head = None
                self.inner = self.fresh()
                self.inner.feed_data(head)  # (no offer in it: parsed whole, its body awaited)
                data = memoryview(data)[exc.args[0]:]


def _close_delimited(cycle: Any) -> None:
    """Send the response of an HTTP/1.0 request (httptools' ``RequestResponseCycle``) without a chunked
    coding: one that names no length (a stream) runs to the connection's close, which uvicorn closes after
    any HTTP/1.0 response. (uvicorn counts a body's bytes against its length: each part is given its own.)"""
    send = cycle.send
    unframed = False

    async def send_close_delimited(message: Message) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", ())}
            if not names & {b"content-length", b"transfer-encoding"}:
                unframed = True
                cycle.chunked_encoding = False  # (None would have uvicorn add "transfer-encoding: chunked")
        elif unframed and message["type"] == "http.response.body":
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_close_delimited


def http_protocol(request_read_timeout_s: float | None = None,
                  max_header_bytes: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's ``http="auto"`` protocol (httptools where installed, else h11), remembering each connection's
    transport so that :func:`abort_connection` can reset it; with ``request_read_timeout_s``, a request must
    arrive whole within it (the module's doc).

    With ``max_header_bytes``, a request whose headers (with its target) are still incomplete after that many
    bytes and :data:`HEAD_SLACK_BYTES` more gets a 431 and its connection closed, before the parser sees the
    rest: neither parser bounds them (httptools joins a value sent in pieces again for each piece, so one
    endless header took the event loop for seconds, and thousands of small ones took gigabytes of memory).
    :class:`serving.app.HeaderLimitMiddleware` holds complete headers to the exact limit.

    The timer starts as the connection opens, or at the first byte once the previous request has arrived
    whole, and stops once a request (uvicorn's ``cycle``, of either protocol class) has its body complete;
    each request that reached the app carries its deadline in its scope (:data:`READ_DEADLINE`).

    An offer to switch to HTTP/2 (``Upgrade: h2c``) is declined and its request answered as HTTP/1.1, body
    included; a stream to an HTTP/1.0 client runs to the connection's close, without a chunked coding (the
    module's doc; h11 does both itself)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    timeout = request_read_timeout_s
    head_cap = None if max_header_bytes is None else max_header_bytes + HEAD_SLACK_BYTES
    #: uvicorn's "auto" is httptools' protocol where httptools is installed (its parser's callbacks), else h11's
    httptools_parser = hasattr(AutoHTTPProtocol, "on_headers_complete")

    class AbortableHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _read_timer: asyncio.TimerHandle | None = None
        #: bytes received since the last request's headers completed, while the next one's are not
        _head_bytes = 0
        _head_cycle: Any = None  # the cycle of the last request whose headers completed (None: none yet)
        _head_refused = False

        #: the head of a request whose upgrade offer is being declined, as it is parsed again (httptools only)
        declined_head: bytes | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if httptools_parser:  # (h11 answers a request that offers an upgrade as HTTP/1.1 itself)
                self.parser = _UpgradeDecliningParser(self)
            # the addresses uvicorn puts in each request's scope ("server", "client")
            self._cascade_key = _conn_key(getattr(self, "server", None), getattr(self, "client", None))
            if self._cascade_key is not None:
                _TRANSPORTS[self._cascade_key] = transport
            if timeout is not None:
                self._read_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._read_disarm()
            key = getattr(self, "_cascade_key", None)
            if key is not None and _TRANSPORTS.get(key) is self.transport:
                del _TRANSPORTS[key]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_refused:
                return
            if timeout is not None and self._read_timer is None:  # the first byte of the next request
                self._read_arm()
            self._read_bytes = True
            if head_cap is not None and self._head_pending():
                self._head_bytes += len(data)
                if self._head_bytes > head_cap:
                    self._head_refuse()
                    return
            super().data_received(data)
            if head_cap is not None and self.cycle is not self._head_cycle:  # a new request's headers are in
                self._head_cycle, self._head_bytes = self.cycle, 0
            if self._read_timer is not None and self._read_arrived():
                self._read_disarm()

        def _head_pending(self) -> bool:
            """Whether bytes arriving now belong to headers not yet complete (no request yet, or the last one's
            body is in whole: whatever comes next is the next request's start)."""
            cycle = self.cycle
            return cycle is None or not cycle.more_body

        def _head_refuse(self) -> None:
            """A 431, then the connection closed: at once where a response is being sent (not interleaved),
            else after its end (EOF) and a moment of discarding what the client is still sending, so that
            closing with its bytes unread (a reset) does not drop the 431 before the client reads it."""
            self._head_refused = True
            self._read_disarm()
            log.warning("a request's headers passed %d bytes before they were complete (server.max_header_bytes "
                        "%d): closing its connection", head_cap, max_header_bytes)
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                self.transport.close()
                return
            body = _head_too_large_body(max_header_bytes or 0)
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            try:
                self.transport.write_eof()
            except (NotImplementedError, OSError, RuntimeError):
                self.transport.close()
                return
            self.loop.call_later(LINGER_S, self.transport.close)

        # -- an upgrade offer declined (httptools: _UpgradeDecliningParser)

        def _declining(self) -> bool:
            """Whether the request whose headers are complete offers an upgrade this server declines: one to
            anything but a WebSocket that uvicorn would take (a CONNECT is left to uvicorn)."""
            return (self.parser.should_upgrade() and not self._should_upgrade()
                    and self.parser.get_method() != b"CONNECT")

        def on_headers_complete(self) -> None:
            if self._declining():  # not answered now: parsed again without the offer, then answered
                self.declined_head = self._head_without_upgrade()
                return
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope and self.scope.get("http_version") == "1.0":
                _close_delimited(cycle)

        def on_message_complete(self) -> None:
            if self.declined_head is not None:  # the offer's request, ended early by the parser: not this one
                return
            super().on_message_complete()

        def _head_without_upgrade(self) -> bytes:
            """The request line and headers of the request being parsed, without its upgrade offer."""
            out = [self.parser.get_method(), b" ", self.url, b" HTTP/", self.parser.get_http_version().encode(),
                   b"\r\n"]
            for name, value in self.headers:
                if name in _UPGRADE_HEADERS:
                    continue
                if name == b"connection":
                    tokens = [t.strip() for t in value.split(b",")
                              if t.strip() and t.strip().lower() not in _UPGRADE_HEADERS]
                    if not tokens:
                        continue
                    value = b", ".join(tokens)
                out += [name, b": ", value, b"\r\n"]
            out.append(b"\r\n")
            return b"".join(out)

        def handle_websocket_upgrade(self, *args: Any) -> None:
            self._read_disarm()  # the connection is a WebSocket's from now on
            super().handle_websocket_upgrade(*args)

        # -- server.request_read_timeout_s

        def _read_arm(self) -> None:
            self._read_deadline = self.loop.time() + timeout
            self._read_prev = self.cycle  # the previous request's cycle (None: none); any other is the new one's
            self._read_bytes = False
            self._read_timer = self.loop.call_at(self._read_deadline, self._read_timed_out)

        def _read_disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_arrived(self) -> bool:
            """Whether the request being timed is in whole; once its headers are, its scope gets its deadline."""
            cycle = self.cycle
            if cycle is None or cycle is self._read_prev:
                return False  # its headers are not complete
            cycle.scope.setdefault(READ_DEADLINE, self._read_deadline)  # type: ignore[typeddict-item]
            return not cycle.more_body

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or self._read_arrived():
                return
            cycle = self.cycle
            if (cycle is not None and not cycle.response_complete) or self.flow.read_paused:
                # a request is being answered (one whose body is late gets its 408 from the app, in
                # RequestReadTimeoutMiddleware), or the server itself is not reading: look again later
                self._read_timer = self.loop.call_later(timeout, self._read_timed_out)
                return
            if cycle is None or cycle is self._read_prev:  # its headers never completed
                if self._read_bytes:
                    body = _timeout_body(timeout)
                    self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                         b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                    log.warning("a request's headers did not arrive within %g s (server.request_read_timeout_s):"
                                " closing its connection", timeout)
            else:  # answered before its body came in whole, and the rest never came
                log.warning("a request's body did not arrive within %g s (server.request_read_timeout_s): "
                            "closing its connection", timeout)
            self.transport.close()

    return AbortableHTTPProtocol


async def abort_connection(scope: Scope) -> bool:
    """Reset the request's connection now, dropping whatever it has not sent (a client that stopped reading
    takes none of it); False where the server does not run :func:`http_protocol`."""
    key = _conn_key(scope.get("server"), scope.get("client"))
    transport = _TRANSPORTS.pop(key, None) if key is not None else None
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    try:  # a reset (RST), not a close that leaves the kernel still sending to a client that takes nothing
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass
    transport.abort()
    await asyncio.sleep(0)  # uvicorn learns of it (connection_lost, called soon) before the app returns
    return True


class _ReadTimedOut(BaseException):
    """Raised from the app's ``receive`` past the request's read deadline (``args[0]``: whose). A
    ``BaseException``: FastAPI turns any ``Exception`` met while reading a body into a vague 400."""


class RequestReadTimeoutMiddleware:
    """Answer a request whose body has not arrived whole by its deadline with 408 ``request_timeout``, and
    close its connection. The deadline is the one :func:`http_protocol` put in its scope (counted from its
    connection's opening, or its first byte), else ``timeout_s`` from when it reached the app. Only the body's
    reads are bounded: once it is in, a read waits for the client to leave, as long as that takes.

    A completion request refused so, with a valid key, is a ledger row (error ``RequestTimeoutError``, no
    policy: its body was never read whole), as a body over ``server.max_body_bytes`` is. One whose answer has
    already begun is cut off instead (:func:`abort_connection`)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = scope.get(READ_DEADLINE) or asyncio.get_running_loop().time() + self.timeout_s
        arrived = started = False

        async def timed_receive() -> Message:
            nonlocal arrived
            if arrived:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise _ReadTimedOut(self) from None
            arrived = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = True
            await send(msg)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _ReadTimedOut as exc:
            if exc.args[0] is not self:
                raise
            log.warning("a request's body did not arrive within %g s (server.request_read_timeout_s): "
                        "answering 408", self.timeout_s)
            if started:
                await abort_connection(scope)
                return
            from serving.routes import record_unread_refusal

            await record_unread_refusal(scope, RequestTimeoutError(_timeout_message(self.timeout_s)))
            body = _timeout_body(self.timeout_s)
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


class ClientStalled(Exception):
    """The client took no part of the stream within the send timeout (``args[0]``: the timeout, seconds)."""


class ClientGone(Exception):
    """The client's connection closed during the stream (uvicorn's ``send`` then drops what it is given)."""


class BoundedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` whose every send must be taken within ``send_timeout_s`` seconds, and whose
    body iterator is always closed (``aclose``) in the request's task before it returns.

    A client that stops reading is cut off: the response ends without its last chunk, and its connection is
    reset (:func:`abort_connection`; under another server, uvicorn closes it, logging that the response was
    not completed)."""

    def __init__(self, content: object, *, send_timeout_s: float, **kw: object) -> None:
        super().__init__(content, **kw)  # type: ignore[arg-type]
        self.send_timeout_s = send_timeout_s

    _transport: asyncio.BaseTransport | None = None

    async def stream_response(self, send: Send) -> None:
        timeout = self.send_timeout_s
        transport = self._transport

        async def bounded_send(msg: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(msg)
            except TimeoutError:
                raise ClientStalled(timeout) from None
            # a client gone (its connection reset or closed): the stream stops here, not at its end. uvicorn drops
            # every later send without a pause, so an answer in hand would otherwise run out whole, recorded as
            # taken, before the disconnect could be heard. (After the response's last message the connection is
            # closed by uvicorn itself where it is not kept alive, an HTTP/1.0 or `Connection: close` client's, or
            # a graceful shutdown's: the stream went out whole, and its client did not leave.)
            last = msg["type"] == "http.response.body" and not msg.get("more_body", False)
            if transport is not None and not last and transport.is_closing():
                raise ClientGone()

        await super().stream_response(bounded_send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _conn_key(scope.get("server"), scope.get("client"))  # (under http_protocol: its connection)
        self._transport = _TRANSPORTS.get(key) if key is not None else None
        try:
            await super().__call__(scope, receive, send)
        except ClientGone:
            log.info("the client closed its connection during the stream")
        except ClientStalled:
            log.warning("the client took nothing of its stream for %g s (server.stream_send_timeout_s): "
                        "cutting it off", self.send_timeout_s)
            await abort_connection(scope)
        finally:
            # a stream that ended early (cut off, cancelled while waiting to send) is closed here, not left to
            # the garbage collector: its ledger row is written before the request's slots are released
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


__all__ = ["READ_DEADLINE", "BoundedStreamingResponse", "ClientGone", "ClientStalled", "RequestReadTimeoutMiddleware",
           "abort_connection", "http_protocol"]
