"""HTTP as real client software speaks it, to `cascade serve` (the production protocol, serving/streaming.py).

Java's ``java.net.http.HttpClient`` (and the OpenAI clients built on it: Spring AI, LangChain4j) offers an
HTTP/2 upgrade (``Upgrade: h2c``) with every ``http://`` request by default, as ``curl --http2`` does; the
server declines by answering in HTTP/1.1, and must read the request's body as it would without the offer.
The clients here are real sockets on 127.0.0.1 sending those exact bytes, in front of a real
OpenAI-protocol fault server on loopback. Nothing is patched.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import free_port
from tests.fault_server import FaultServer, FaultServerThread
from tests.test_slow_requests import parse_head, read_response
from tests.test_stalled_streams import serve, stop

pytestmark = pytest.mark.timeout(120)

#: the port the module's server listens on (a free one, chosen when it starts)
LISTEN: dict[str, int] = {}
ANSWER = "four"
BODY = json.dumps({"model": "cascade", "max_tokens": 5, "messages": [{"role": "user", "content": "2+2?"}]}).encode()
#: what Java's HttpClient (17, 21) sends before its headers' end on an ``http://`` request, HTTP/2 being its default
H2C_OFFER = (b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
             b"Upgrade: h2c\r\nUser-Agent: Java-http-client/21.0.2\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("clients")
    LISTEN["port"] = free_port()
    with FaultServerThread(FaultServer(answer=ANSWER)) as upstream:
        cfg = {"server": {"host": "127.0.0.1", "port": LISTEN["port"], "log_level": "warning"},
               "ledger": {"path": str(tmp_path / "ledger.sqlite")},
               "tiers": [{"name": "remote", "backend": "openai", "model": "fault-model", "timeout_s": 30,
                          "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
                          "options": {"base_url": upstream.base_url}}],
               "policies": {"cascade": {"chain": ["remote"]}}}
        proc = serve(cfg, tmp_path)
        try:
            yield upstream
        finally:
            out = stop(proc)
    assert "Traceback" not in out and "Invalid HTTP request" not in out, out


def connect() -> socket.socket:
    return socket.create_connection(("127.0.0.1", LISTEN["port"]), timeout=30)


def request(body: bytes = BODY, *, offer: bytes = H2C_OFFER, chunked: bool = False) -> tuple[bytes, bytes]:
    """A chat completion's head (with ``offer`` among its headers) and its body as framed on the wire."""
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(body)
    wire = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + framing + offer + b"\r\n"), wire


def answered(s: socket.socket) -> dict:
    status, headers, body = read_response(s)
    assert status == 200, body
    assert "upgrade" not in headers, headers  # declined: answered in HTTP/1.1, no 101
    return json.loads(body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_request_offering_an_h2c_upgrade_is_answered_with_its_body_read(server, chunked):
    """As Java's HttpClient sends it (Content-Length; Spring's RestClient streams it chunked): the answer to
    the body sent, then the next request on the same kept-alive connection (the body once read as one)."""
    with connect() as s:
        for _ in range(2):
            head, wire = request(chunked=chunked)
            s.sendall(head + wire)
            assert answered(s)["choices"][0]["message"]["content"] == ANSWER
        s.sendall(b"".join(request(offer=b"")))  # and without the offer, as after an upgrade declined
        assert answered(s)["choices"][0]["message"]["content"] == ANSWER


def test_requests_offering_h2c_sent_in_one_write_are_each_answered(server):
    """Pipelined: several such requests (heads and bodies) in one packet, each answered in turn."""
    with connect() as s:
        s.sendall(b"".join(request()) * 3)
        for _ in range(3):
            assert answered(s)["choices"][0]["message"]["content"] == ANSWER


def test_an_h2c_offer_whose_body_comes_after_its_headers_is_answered_once_it_is_in(server):
    """The head in one packet, the body in pieces later (a client that sends its headers first)."""
    head, wire = request()
    with connect() as s:
        s.sendall(head)
        time.sleep(0.3)
        for i in range(0, len(wire), 7):
            s.sendall(wire[i:i + 7])
            time.sleep(0.01)
        assert answered(s)["choices"][0]["message"]["content"] == ANSWER
    upstream_log = server.stats()["log"][-1]
    assert upstream_log["messages"] == [{"role": "user", "content": "2+2?"}], upstream_log


def test_a_streamed_request_offering_an_h2c_upgrade_streams(server):
    body = json.dumps({"model": "cascade", "stream": True, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "2+2?"}]}).encode()
    with connect() as s:
        s.sendall(b"".join(request(body)))
        s.settimeout(30)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    status, headers = parse_head(data.split(b"\r\n\r\n", 1)[0])
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), data
    assert b"data: [DONE]" in data and b'"content":"four"' in data, data


def read_until_closed(s: socket.socket) -> bytes:
    s.settimeout(30)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_stream_to_an_http_1_0_client_runs_to_the_close_without_chunk_sizes(server, path):
    """HTTP/1.0 has no chunked coding (RFC 9112 7.1: not to be sent to it): the stream's bytes are its events,
    ending where the server closes the connection; not chunk sizes between them (``10e\\r\\ndata: ...``)."""
    fields = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "2+2?"}]},
              "/v1/completions": {"prompt": "2+2="}, "/v1/responses": {"input": "2+2?"}}[path]
    body = json.dumps({"model": "cascade", "stream": True, **fields}).encode()
    with connect() as s:
        s.sendall(b"POST %s HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  b"\r\n%s" % (path.encode(), len(body), body))
        data = read_until_closed(s)
    raw_head, _, stream = data.partition(b"\r\n\r\n")
    status, headers = parse_head(raw_head)
    assert status == 200 and "transfer-encoding" not in headers and "content-length" not in headers, raw_head
    assert headers["connection"] == "close", raw_head
    events = stream.split(b"\n\n")
    assert events[-1] == b"" and all(e.startswith((b"data: ", b"event: ")) for e in events[:-1]), stream
    data_lines = [e.split(b"data: ", 1)[1] for e in events[:-1]]
    if path == "/v1/responses":
        objs = [json.loads(d) for d in data_lines]
        assert objs[-1]["type"] == "response.completed", stream
        text = "".join(o["delta"] for o in objs if o["type"] == "response.output_text.delta")
    else:
        assert data_lines[-1] == b"[DONE]", stream
        choices = [c for d in data_lines[:-1] for c in json.loads(d)["choices"]]
        text = "".join(c["delta"].get("content") or "" if "delta" in c else c["text"] for c in choices)
    assert text == ANSWER, stream


def test_an_answer_to_an_http_1_0_client_keeps_its_length(server):
    """A response with a length is sent as it was: its length, its body, then the close."""
    with connect() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
        data = read_until_closed(s)
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(raw_head)
    assert status == 200 and int(headers["content-length"]) == len(body), data
    assert json.loads(body)["choices"][0]["message"]["content"] == ANSWER
