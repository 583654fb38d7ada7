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
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("cascade.serving")


#: the open connections of servers run with :func:`http_protocol`, by (server address, client address)
_TRANSPORTS: dict[tuple[tuple, tuple], asyncio.BaseTransport] = {}


def _conn_key(server: Any, client: Any) -> tuple[tuple, tuple] | None:
    return (tuple(server), tuple(client)) if server and client else None


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's ``http="auto"`` protocol (httptools where installed, else h11), remembering each connection's
    transport so that :func:`abort_connection` can reset it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class AbortableHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # the addresses uvicorn puts in each request's scope ("server", "client")
            self._cascade_key = _conn_key(getattr(self, "server", None), getattr(self, "client", None))
            if self._cascade_key is not None:
                _TRANSPORTS[self._cascade_key] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            key = getattr(self, "_cascade_key", None)
            if key is not None and _TRANSPORTS.get(key) is self.transport:
                del _TRANSPORTS[key]
            super().connection_lost(exc)

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


class ClientStalled(Exception):
    """The client took no part of the stream within the send timeout (``args[0]``: the timeout, seconds)."""


class BoundedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` whose every send must be taken within ``send_timeout_s`` seconds, and whose
    body iterator is always closed (``aclose``) in the request's task before it returns.

    A client that stops reading is cut off: the response ends without its last chunk, and its connection is
    reset (:func:`abort_connection`; under another server, uvicorn closes it, logging that the response was
    not completed)."""

    def __init__(self, content: object, *, send_timeout_s: float, **kw: object) -> None:
        super().__init__(content, **kw)  # type: ignore[arg-type]
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        timeout = self.send_timeout_s

        async def bounded_send(msg: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(msg)
            except TimeoutError:
                raise ClientStalled(timeout) from None

        await super().stream_response(bounded_send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
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


__all__ = ["BoundedStreamingResponse", "ClientStalled", "abort_connection", "http_protocol"]
