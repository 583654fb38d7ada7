"""A client cannot hold a connection by sending its request slowly, or not at all.

`cascade serve` runs as an operator runs it (the production protocol, serving/streaming.py), with
``server.request_read_timeout_s`` short, in front of a real OpenAI-compatible fault server on loopback; the
clients are real sockets on 127.0.0.1 that send a ``Content-Length`` larger than their body, trickle their
body or their headers, stop halfway through their headers, or send nothing. Nothing is patched.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

import pytest

from serving.auth import hash_key
from tests.conftest import free_port
from tests.fault_server import FaultServer, FaultServerThread
from tests.test_stalled_streams import rows, serve, stop

pytestmark = pytest.mark.timeout(120)

#: the port the module's server listens on (a free one, chosen when it starts)
LISTEN: dict[str, int] = {}
KEY = "sk-slow-requests"
#: server.request_read_timeout_s in these tests
READ_TIMEOUT_S = 1.5
#: how much later than the timeout an answer may come on a busy test machine
SLACK_S = 2.0
#: uvicorn's own timeout_keep_alive (its default: serving/shutdown.py does not change it)
KEEP_ALIVE_S = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("slow")
    LISTEN["port"] = free_port()
    with FaultServerThread(FaultServer(answer="four")) as upstream:
        cfg = {"server": {"host": "127.0.0.1", "port": LISTEN["port"], "log_level": "warning",
                          "request_read_timeout_s": READ_TIMEOUT_S},
               "ledger": {"path": str(tmp_path / "ledger.sqlite")},
               "tiers": [{"name": "remote", "backend": "openai", "model": "fault-model", "timeout_s": 30,
                          "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
                          "options": {"base_url": upstream.base_url}}],
               "policies": {"cascade": {"chain": ["remote"]}},
               "user_tiers": {"open": {}},
               "auth": {"keys": [{"id": "slow", "user_tier": "open", "sha256": hash_key(KEY)}]}}
        proc = serve(cfg, tmp_path)
        try:
            yield tmp_path
        finally:
            out = stop(proc)
    assert "Exception in ASGI application" not in out and "Traceback" not in out, out


BODY = json.dumps({"model": "cascade", "max_tokens": 5, "messages": [{"role": "user", "content": "2+2?"}]}).encode()


def head(content_length: int = len(BODY)) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (KEY.encode(), content_length))


def connect() -> socket.socket:
    return socket.create_connection(("127.0.0.1", LISTEN["port"]), timeout=30)


def trickle(s: socket.socket, data: bytes, interval: float, pieces: int | None = None) -> bool:
    """Send ``data`` in ``pieces`` (default: a byte at a time), one every ``interval`` seconds, stopping early
    when the server answers or closes; False then."""
    n = pieces or len(data)
    step = -(-len(data) // n)
    for i in range(0, len(data), step):
        if i:
            ready, _, _ = select.select([s], [], [], interval)
            if ready:
                return False
        try:
            s.sendall(data[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            return False
    return True


def read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes the connection (within ``limit_s``), and when it closed
    (``time.monotonic()``; None: still open)."""
    data, deadline = b"", time.monotonic() + limit_s
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    return data, None


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length (the connection left open): status, headers, body."""
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    raw_head, body = data.split(b"\r\n\r\n", 1)
    return parse_head(raw_head) + (read_body(s, body, raw_head),)


def parse_head(raw_head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}


def read_body(s: socket.socket, body: bytes, raw_head: bytes) -> bytes:
    length = int(parse_head(raw_head)[1]["content-length"])
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, body
        body += chunk
    return body


def assert_408(data: bytes) -> dict[str, str]:
    """``data`` is one 408 response with the OpenAI-shaped request_timeout error, closing the connection."""
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(raw_head)
    assert status == 408, data
    assert headers["connection"] == "close" and headers["content-type"] == "application/json", headers
    assert len(body) == int(headers["content-length"]), data
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout", error
    assert error["param"] is None and "server.request_read_timeout_s" in error["message"], error
    return headers


def completion_ok(s: socket.socket) -> str:
    status, headers, body = read_response(s)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "four", body
    return headers["x-request-id"]


@pytest.mark.parametrize("how", ["content-length past the body", "body trickles"])
def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(server: Path, how: str):
    with connect() as s:
        t0 = time.monotonic()
        if how == "content-length past the body":
            s.sendall(head(len(BODY) + 10) + BODY)  # 10 bytes never come
        else:  # a byte every 0.4 s: the whole body would take minutes
            s.sendall(head())
            assert not trickle(s, BODY, 0.4)
        data, closed = read_until_closed(s, READ_TIMEOUT_S + SLACK_S + 5)
    assert closed is not None, data  # closed, not held open
    assert READ_TIMEOUT_S - 0.2 < closed - t0 < READ_TIMEOUT_S + SLACK_S, closed - t0
    rid = assert_408(data)["x-request-id"]  # answered by the app: the response carries the request's id
    # its key was known: a ledger row, as for a body over the limit (413); there was none
    assert rows(server).get(rid) == ("error", "RequestTimeoutError"), rows(server)


@pytest.mark.parametrize("how", ["headers stop halfway", "headers trickle", "nothing at all"])
def test_headers_that_do_not_arrive_in_time_get_the_connection_closed(server: Path, how: str):
    partial = head()[:60]  # the request line and part of a header
    with connect() as s:
        t0 = time.monotonic()
        if how == "headers stop halfway":
            s.sendall(partial)
        elif how == "headers trickle":  # slowloris: a byte every 0.4 s, headers that would take a minute
            assert not trickle(s, head(), 0.4)
        data, closed = read_until_closed(s, READ_TIMEOUT_S + SLACK_S + 5)
    assert closed is not None, data
    assert READ_TIMEOUT_S - 0.2 < closed - t0 < READ_TIMEOUT_S + SLACK_S, closed - t0
    if how == "nothing at all":
        assert data == b""  # a connection that said nothing is closed without a word
    else:
        assert_408(data)


def test_a_slow_but_steady_client_is_served_each_request_in_its_own_time(server: Path):
    """Each request's body takes most of the timeout to arrive; two on one kept-alive connection take longer
    than the timeout together: the time is counted per request, not per connection."""
    with connect() as s:
        t0 = time.monotonic()
        for _ in range(2):
            assert trickle(s, head() + BODY, READ_TIMEOUT_S * 0.6 / 5, pieces=6)  # over 0.9 s
            completion_ok(s)
        assert time.monotonic() - t0 > READ_TIMEOUT_S


def test_an_idle_kept_alive_connection_is_left_to_uvicorns_keep_alive(server: Path):
    """After a request, the wait for the next is not a request arriving: no 408, the connection stays open
    past request_read_timeout_s, serves another request, and is closed quietly at uvicorn's keep-alive."""
    with connect() as s:
        s.sendall(head() + BODY)
        completion_ok(s)
        data, closed = read_until_closed(s, READ_TIMEOUT_S + 1.0)
        assert (data, closed) == (b"", None)  # idle past the read timeout: still open, nothing said
        s.sendall(head() + BODY)
        completion_ok(s)
        t_idle = time.monotonic()
        data, closed = read_until_closed(s, KEEP_ALIVE_S + SLACK_S + 5)
    assert data == b"" and closed is not None, data  # closed without a 408
    assert KEEP_ALIVE_S - 0.5 < closed - t_idle < KEEP_ALIVE_S + SLACK_S, closed - t_idle


@pytest.mark.parametrize("kind", ["one endless value", "endless small headers", "endless target"])
def test_headers_that_grow_past_the_limit_are_refused_before_they_end(server, kind):
    """Neither HTTP parser bounds headers still arriving: one value sent in pieces took the event loop for
    seconds (httptools joins it again for every piece), thousands of small headers took gigabytes, and nothing
    was refused until they ended or the read timeout came. Past max_header_bytes (64 KiB) and some slack,
    the server answers 431 at once and closes the connection; its other clients are served meanwhile."""
    start, piece = {"one endless value": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 8192),
                    "endless small headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n" * 1024),
                    "endless target": (b"GET /health?q=", b"a" * 8192)}[kind]
    s = connect()
    t0 = time.monotonic()
    s.sendall(start)
    sent = 0
    try:
        while sent < 600_000:  # 64 KiB + 256 KiB of slack, and more
            s.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data, closed = read_until_closed(s, 10)
    s.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "request_header_fields_too_large", body
    assert closed is not None and closed - t0 < READ_TIMEOUT_S + SLACK_S  # not the read timeout's 408
    with connect() as c:  # the server goes on
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(c)[0] == 200


def test_a_large_body_is_not_counted_as_headers(server):
    """The header cap counts only what arrives before a request's headers are complete: a body of 900 KB (under
    max_body_bytes) on a kept-alive connection, and the request after it, are served."""
    big = json.dumps({"model": "cascade", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x " * 450_000}]}).encode()
    with connect() as c:
        for body in (big, BODY):
            c.sendall(head(len(body)) + body)
            status, headers, answer = read_response(c)
            assert status in (200, 400) and json.loads(answer), (status, answer[:300])
            assert status == 200 or json.loads(answer)["error"]["code"] != "request_header_fields_too_large"
