"""A streaming client that keeps its connection open and stops reading cannot hold its request.

`cascade serve` runs as an operator runs it, in front of a real fault-injecting OpenAI-compatible server on
loopback (tests/fault_server.py) that streams a long answer; the stalled client is a real socket with a small
receive buffer that reads the status line, then nothing. Nothing is patched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.auth import hash_key
from tests import fault_server
from tests.conftest import REPO, free_port
from tests.fault_server import FaultServer, FaultServerThread

pytestmark = pytest.mark.timeout(120)

CAPPED, OTHER = "sk-stall-capped", "sk-stall-other"
ANSWER = " ".join(f"w{i}" for i in range(3000))  # far more than the socket buffers between them hold


def config(tmp_path: Path, port: int, upstream: FaultServerThread, **server: object) -> dict:
    return {"server": {"host": "127.0.0.1", "port": port, "log_level": "warning", **server},
            "ledger": {"path": str(tmp_path / "ledger.sqlite")},
            "tiers": [{"name": "remote", "backend": "openai", "model": "fault-model", "timeout_s": 60,
                       "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
                       "options": {"base_url": upstream.base_url}}],
            "policies": {"cascade": {"chain": ["remote"]}},
            # the worst case of one 3000-token stream is the whole day's limit: while it is held, nothing more
            "user_tiers": {"capped": {"daily_spend_limit_usd": 0.006}, "open": {}},
            "auth": {"keys": [{"id": "capped", "user_tier": "capped", "sha256": hash_key(CAPPED)},
                              {"id": "other", "user_tier": "open", "sha256": hash_key(OTHER)}]}}


def serve(cfg: dict, tmp_path: Path) -> subprocess.Popen:
    """`cascade serve` on ``cfg``, ready for requests."""
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config", str(path)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{cfg['server']['port']}/health"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "cascade serve did not start"
        time.sleep(0.1)


def stalled_stream(port: int, key: str | None = CAPPED, logprobs: bool = True) -> tuple[socket.socket, str]:
    """A streamed chat request whose client reads the response's head, then nothing (its connection kept
    open); gives the socket and the request's id. ``key``: its API key (None: a server without keys)."""
    extra = {"logprobs": True, "top_logprobs": 20} if logprobs else {}
    body = json.dumps({"model": "cascade", "stream": True, "max_tokens": 3000, **extra,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key is not None else b""
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (auth, len(body)) + body)
    head = s.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    rid = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    return s, rid.decode()


def rows(tmp_path: Path) -> dict[str, tuple]:
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT request_id, status, error_class FROM requests")}


def upstream_connections(upstream: FaultServerThread) -> list:
    """The connections open at the fault server (it tracks them to kill them on demand)."""
    return [k for k in list(fault_server._TRANSPORTS) if k[0] == upstream.port]


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as an operator stops it; its output."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0].decode()


def probe(port: int, key: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "cascade", "max_tokens": 5, "messages": [{"role": "user", "content": "probe"}]},
                      timeout=30)


def test_a_client_that_stops_reading_is_cut_off_and_lets_go_of_everything_it_held(tmp_path):
    port = free_port()
    with FaultServerThread(FaultServer(answer=ANSWER)) as upstream:
        proc = serve(config(tmp_path, port, upstream, max_concurrent_requests=1, stream_send_timeout_s=2),
                     tmp_path)
        stalled = None
        try:
            stalled, rid = stalled_stream(port)
            t0 = time.monotonic()
            # while it is held: its key's spend hold blocks the key, its slot the server
            held = [probe(port, CAPPED), probe(port, OTHER)]
            assert [r.status_code for r in held] == [429, 503], [r.text for r in held]
            assert held[0].json()["error"]["code"] == "daily_spend_limit"
            while rid not in rows(tmp_path) and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            cut_after = time.monotonic() - t0
            # written once the client had taken nothing for 2 s, not at the tier's 60 s, not when the client goes
            assert rows(tmp_path).get(rid) == ("partial", "ClientDisconnected"), rows(tmp_path)
            assert cut_after < 15, cut_after
            deadline = time.monotonic() + 5
            while upstream_connections(upstream) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert upstream_connections(upstream) == []  # the upstream call is closed
            stalled.settimeout(5)
            with pytest.raises(ConnectionResetError):  # and the stalled connection reset, not left to drain
                while stalled.recv(1 << 16):
                    pass
            freed = [probe(port, CAPPED), probe(port, OTHER)]
            assert [r.status_code for r in freed] == [200, 200], [r.text for r in freed]
        finally:
            if stalled is not None:
                stalled.close()
            out = stop(proc)
    ids = [rid] + [r.headers["x-request-id"] for r in held + freed]
    got = rows(tmp_path)
    assert sorted(got) == sorted(ids), got  # every request exactly one row
    assert [got[i] for i in ids[1:]] == [("error", "BudgetExceededError"), ("error", "ServerOverloadedError"),
                                         ("ok", None), ("ok", None)], got
    assert "cutting it off" in out and "Exception in ASGI application" not in out, out


def sigterm_while_stalled(proc: subprocess.Popen, port: int, key: str | None, logprobs: bool = True,
                          ) -> tuple[str, str, float]:
    """A client that stops reading its stream from ``proc`` (serving on ``port``), then SIGTERM: the request's
    id, the server's output and how long it took to exit."""
    stalled = None
    try:
        stalled, rid = stalled_stream(port, key=key, logprobs=logprobs)
        time.sleep(1.0)  # the buffers between them fill up: the server waits for the client to read
        t_term = time.monotonic()
        out = stop(proc)
        return rid, out, time.monotonic() - t_term
    finally:
        if stalled is not None:
            stalled.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_a_client_is_not_reading_writes_its_row_and_exits_at_the_grace(tmp_path):
    port = free_port()
    with FaultServerThread(FaultServer(answer=ANSWER)) as upstream:
        proc = serve(config(tmp_path, port, upstream, graceful_shutdown_s=1, stream_send_timeout_s=60), tmp_path)
        rid, out, exited_after = sigterm_while_stalled(proc, port, CAPPED)
    assert proc.returncode in (0, -signal.SIGTERM), out
    # at the 1 s grace, not at uvicorn's own cut-off 5 s later
    assert exited_after < 3.5, (exited_after, out)
    assert "Exception in ASGI application" not in out and "timeout graceful shutdown exceeded" not in out, out
    assert rows(tmp_path) == {rid: ("partial", "ServerShutdown")}


def test_sigterm_while_a_stream_waits_for_its_model_and_its_client_is_not_reading_exits_at_the_grace(tmp_path):
    """The drain can find a stream between two chunks, waiting for its model, when the client has taken none of
    what was sent (the connection's buffers full): its error event then waited ANSWER_SEND_S, was given up, and
    the connection was left open, so uvicorn waited for it until its own cut-off 5 s later (seen in CI under
    load, where the model's chunks come slowly). Given up now means reset. Here one chunk larger than the
    buffers, and the model's next one 8 s later."""
    port = free_port()
    wmem = Path("/proc/sys/net/ipv4/tcp_wmem")  # the most a socket's send buffer may grow to (4 MiB by default)
    chunk = 2 * (int(wmem.read_text().split()[2]) if wmem.exists() else 4 << 20) + (1 << 20)
    with FaultServerThread(FaultServer(answer=" ".join(["x" * chunk] * 2))) as upstream:
        upstream.faults({"kind": "slow", "seconds": 0, "per_chunk": 8, "bare": True})  # no logprobs: their byte lists
        # would make the chunk many times larger and slow to parse
        proc = serve(config(tmp_path, port, upstream, graceful_shutdown_s=1, stream_send_timeout_s=60), tmp_path)
        rid, out, exited_after = sigterm_while_stalled(proc, port, OTHER, logprobs=False)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "answering 1 request(s) still running with 503" in out, out
    assert exited_after < 5, (exited_after, out)  # the grace (1 s) and the event's wait (1 s), not 6 s
    assert "Exception in ASGI application" not in out and "timeout graceful shutdown exceeded" not in out, out
    assert rows(tmp_path) == {rid: ("partial", "ServerShutdown")}


def buffered_config(tmp_path: Path, port: int, small: FaultServerThread, big: FaultServerThread,
                    **server: object) -> dict:
    """Two tiers: the first answers confidently, so its answer (buffered whole before the policy keeps it) is
    the one streamed; the second is never called."""
    def tier(name: str, upstream: FaultServerThread, threshold: float) -> dict:
        return {"name": name, "backend": "openai", "model": f"{name}-model", "timeout_s": 60, "threshold": threshold,
                "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    return {"server": {"host": "127.0.0.1", "port": port, "log_level": "warning", "stream_send_timeout_s": 2,
                       **server},
            "ledger": {"path": str(tmp_path / "ledger.sqlite")},
            "tiers": [tier("small", small, 0.5), tier("big", big, 0.0)],
            "policies": {"cascade": {"chain": ["small", "big"]}}}


@pytest.mark.parametrize("client", ["stops reading", "closes after a few events"])
def test_a_client_that_leaves_an_answer_in_hand_is_recorded_as_partial(tmp_path, client):
    """A kept first tier's answer is in hand, whole, and committed as served before it streams: a client that
    takes only part of it is recorded as one leaving a live stream is (`partial`, `ClientDisconnected`), not as
    answered."""
    port = free_port()
    with FaultServerThread(FaultServer(answer=ANSWER, logprob=-0.01)) as small, \
            FaultServerThread(FaultServer(answer="big answer")) as big:
        proc = serve(buffered_config(tmp_path, port, small, big), tmp_path)
        sock = None
        try:
            sock, rid = stalled_stream(port, key=None)
            if client == "closes after a few events":
                sock.recv(4096)
                sock.close()
                sock = None
            t0 = time.monotonic()
            while rows(tmp_path).get(rid, ("ok",))[0] == "ok" and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            whole = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                "model": "cascade", "stream": True, "max_tokens": 3000,
                "messages": [{"role": "user", "content": "again"}]})
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            if sock is not None:
                sock.close()
            out = stop(proc)
    assert rows(tmp_path)[rid] == ("partial", "ClientDisconnected"), (rows(tmp_path), out)
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # its answer and its costs stay as they were
        row = db.execute("SELECT tier, escalation_waste_usd, cost_usd FROM requests WHERE request_id = ?",
                         (rid,)).fetchone()
        kept = db.execute("SELECT tier FROM attempts WHERE request_id = ? AND kept = 1", (rid,)).fetchall()
    assert row[0] == "small" and row[1] == 0 and row[2] > 0 and kept == [("small",)], (row, kept)
    # a client that reads it all: answered, as before
    assert whole.status_code == 200 and whole.text.rstrip().endswith("data: [DONE]")
    assert rows(tmp_path)[whole.headers["x-request-id"]] == ("ok", None)
    assert "Exception in ASGI application" not in out, out
    # counted answered when its row was written, then said to have been left
    assert 'cascade_requests_corrected_total{policy="cascade",status="partial",tier="small"} 1.0' in metrics
    assert 'cascade_errors_total{error_class="ClientDisconnected"} 1.0' in metrics


def leave_before_an_answer_in_hand_goes_out(srv, tmp_path: Path) -> None:
    """Stream a request whose answer is in hand (a buffered tier kept it) while another process holds the
    ledger's lock, so that its row waits; leave before any of it went out; wait until the row is `cancelled`."""
    from tests.test_ledger_durability import lock_for

    holder = lock_for(tmp_path / "ledger.sqlite", 2.0)
    try:
        body = json.dumps({"model": "cascade", "stream": True, "max_tokens": 50,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(1.0)  # answered, its row waiting for the lock: the client goes
    finally:
        holder.wait(timeout=30)
    deadline = time.monotonic() + 15
    while "cancelled" not in [r[0] for r in rows(tmp_path).values()]:
        assert time.monotonic() < deadline, rows(tmp_path)
        time.sleep(0.1)


def test_a_client_gone_before_an_answer_in_hand_streams_moves_its_cost_to_waste_in_metrics_too(tmp_path):
    """The answer in hand is committed as served (its write slowed by a lock held elsewhere) after its client
    left: the row is made `cancelled`, its cost all waste; /metrics' waste moves with it (it stayed 0), and its
    escalation rate leaves it out, as the ledger's does (it stayed an answered request)."""
    from cascade.config import parse_config
    from serving import create_app
    from tests.conftest import ServerThread

    with FaultServerThread(FaultServer(answer=ANSWER, logprob=-0.01)) as small, \
            FaultServerThread(FaultServer(answer="big answer")) as big:
        cfg = parse_config(buffered_config(tmp_path, 0, small, big), source="<test>", environ={})
        with ServerThread(create_app(cfg)) as srv:
            small.faults("500")  # (creates the ledger) escalated: the small tier fails
            assert httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
                "model": "cascade", "max_tokens": 5, "messages": [{"role": "user", "content": "first"}]}
            ).status_code == 200
            leave_before_an_answer_in_hand_goes_out(srv, tmp_path)
            metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        (rid, cost, waste), = db.execute("SELECT request_id, cost_usd, escalation_waste_usd FROM requests "
                                         "WHERE status = 'cancelled'").fetchall()
        total_waste, = db.execute("SELECT SUM(escalation_waste_usd) FROM requests").fetchone()
    assert cost > 0 and waste == cost == total_waste
    assert 'cascade_requests_corrected_total{policy="cascade",status="cancelled",tier="small"} 1.0' in metrics
    counted = [float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
               if ln.startswith('cascade_escalation_waste_usd_total{policy="cascade"')]
    assert sum(counted) == pytest.approx(total_waste), metrics
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        answered, escalated = db.execute("SELECT COUNT(*), SUM(escalated) FROM requests WHERE status IN "
                                         "('ok', 'partial') AND cached_from IS NULL").fetchone()
    assert (answered, escalated) == (1, 1)
    assert 'cascade_escalation_rate{policy="cascade"} 1.0' in metrics, metrics


def test_sigterm_while_an_answer_in_hand_streams_to_a_client_not_reading_records_the_shutdown(tmp_path):
    """An answer in hand streams after its row is committed: a shutdown that runs out of time still cuts it off
    at the grace (not at uvicorn's cut-off 5 s later, with a traceback), and its row says so."""
    port = free_port()
    with FaultServerThread(FaultServer(answer=ANSWER, logprob=-0.01)) as small, \
            FaultServerThread(FaultServer(answer="big answer")) as big:
        proc = serve(buffered_config(tmp_path, port, small, big, graceful_shutdown_s=1, stream_send_timeout_s=60),
                     tmp_path)
        rid, out, exited_after = sigterm_while_stalled(proc, port, None)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert exited_after < 3.5, (exited_after, out)
    assert "Exception in ASGI application" not in out and "timeout graceful shutdown exceeded" not in out, out
    assert rows(tmp_path) == {rid: ("partial", "ServerShutdown")}


def test_a_client_gone_before_an_answer_in_hand_streams_leaves_the_drift_windows(tmp_path):
    """The drift windows hold answered requests (the ledger's: its reports' escalation rate counts `ok` and
    `partial` rows). A row committed as served and then made `cancelled` (its client left before any of its
    answer went out) stayed in them, counted answered: it leaves them, as the report leaves it out."""
    from cascade.config import parse_config
    from serving import create_app
    from tests.conftest import ServerThread

    with FaultServerThread(FaultServer(answer=ANSWER, logprob=-0.01)) as small, \
            FaultServerThread(FaultServer(answer="big answer")) as big:
        data = buffered_config(tmp_path, 0, small, big)
        data["drift"] = {"window": 10}
        with ServerThread(create_app(parse_config(data, source="<test>", environ={}))) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={  # (creates the ledger; a pinned
                "model": "small", "max_tokens": 5,                                 # tier: never in the windows)
                "messages": [{"role": "user", "content": "first"}]}).status_code == 200
            leave_before_an_answer_in_hand_goes_out(srv, tmp_path)
            metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    assert 'cascade_requests_corrected_total{policy="cascade",status="cancelled",tier="small"} 1.0' in metrics
    # the windows are empty again: no value (before, the cancelled request's escalation rate 0 and cost ratio)
    for name in ("escalation_rate", "cost_ratio"):
        assert f'cascade_drift_value{{signal="{name}"}} NaN' in metrics, metrics


@pytest.mark.parametrize("head", [b"HTTP/1.1\r\nConnection: close", b"HTTP/1.0"])
def test_a_stream_taken_whole_by_a_client_not_kept_alive_is_not_logged_as_a_client_gone(tmp_path, head):
    """uvicorn closes a connection not kept alive (`Connection: close`, HTTP/1.0) once the response's last message
    is sent: the stream went out whole, [DONE] included, and the log says no client closed it during the stream
    (it did: every such stream wrote that line)."""
    port = free_port()
    with FaultServerThread(FaultServer()) as upstream:
        proc = serve(config(tmp_path, port, upstream, log_level="info"), tmp_path)
        try:
            body = json.dumps({"model": "cascade", "stream": True, "max_tokens": 5,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /v1/chat/completions %s\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n" % (head, OTHER.encode(), len(body)) + body)
                got = b""
                while chunk := s.recv(1 << 16):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200") and b"data: [DONE]\n\n" in got, got[-300:]
            rid = re.search(rb"x-request-id: (\S+)", got).group(1).decode()
            deadline = time.monotonic() + 10
            while rid not in rows(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            out = stop(proc)
    assert rows(tmp_path) == {rid: ("ok", None)}
    assert rid in out and "closed its connection during the stream" not in out, out
