"""The ledger when its database misbehaves, on real SQLite files and real PostgreSQL servers: a read-only
server, a write lock held by another process, a hung server (its processes stopped), a role that may only
read, and passwords given where the URL's user info is not.

GET /ready must say 503 while writes fail and answer within a bounded time; a completion's write fails
with a ledger_error within a bounded time; reading commands need no rights to alter a current ledger;
no form of PostgreSQL URL shows its password."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from cascade.errors import LedgerError, LedgerTimeoutError, LedgerWriteHeldError
from cascade.ledger import Ledger, _redact, daily_spend
from tests.pg import PostgresServer
from tests.test_ledger import make_ledger, record

#: the ports this module's PostgreSQL servers may take
_PG_PORTS = range(5460, 5470)
_BODY = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}


def _port_in_range() -> int:
    for port in _PG_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free port in {_PG_PORTS.start}-{_PG_PORTS.stop - 1} for PostgreSQL")


def _start_postgres() -> PostgresServer:
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' for the PostgreSQL ledger tests")
    server = PostgresServer()
    server.port = _port_in_range()
    return server.start()


@pytest.fixture(scope="module")
def pg():
    server = _start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hung_pg():
    """A server of its own: its processes are stopped (SIGSTOP) and resumed by the tests."""
    server = _start_postgres()
    yield server
    server.stop()


def _admin_url(server: PostgresServer) -> str:
    return server.url.rsplit("/", 1)[0] + "/template1"


@contextmanager
def frozen(server: PostgresServer):
    """Every process of the server stopped, as a hung host or a stuck storage would leave it: connections stay
    open, nothing answers."""
    master = int((server.data / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:  # its parent
            pids.append(int(stat.parent.name))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextmanager
def read_only(server: PostgresServer):
    """``default_transaction_read_only`` on for the whole server, as the auditor did (and as a failover to a
    standby would leave a replica writing nothing)."""
    import psycopg

    def set_to(on: bool) -> None:
        with psycopg.connect(_admin_url(server), autocommit=True) as admin:
            admin.execute("SET default_transaction_read_only = off")  # this session may still change it back
            admin.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on
                          else "ALTER SYSTEM RESET default_transaction_read_only")
            admin.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the reload reaches every backend a moment later
            with psycopg.connect(server.url, autocommit=True) as c:
                if c.execute("SHOW default_transaction_read_only").fetchone()[0] == ("on" if on else "off"):
                    break
            assert time.monotonic() < deadline, "the configuration was not reloaded"
            time.sleep(0.05)
        time.sleep(0.3)

    set_to(True)
    try:
        yield
    finally:
        set_to(False)


@contextmanager
def refusing_connections(server: PostgresServer):
    import psycopg

    with psycopg.connect(_admin_url(server), autocommit=True) as admin:
        admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
    try:
        yield
    finally:
        with psycopg.connect(_admin_url(server), autocommit=True) as admin:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")


@contextmanager
def locked_by_another_process(path: Path):
    """Another process (a replica, an operator's sqlite3 shell) holding the SQLite ledger's write lock."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.close()  # its readline returns: it exits, and its lock goes with it
        proc.wait(timeout=30)


def _server_config(tmp_path: Path, ledger_path: str, **ledger):
    from tests.conftest import free_port, make_config

    return make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                   "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}],
                       {"p": {"chain": ["r"]}}, ledger={"path": ledger_path, **ledger})


def _timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t0


def _wait_ready(url: str, limit_s: float = 20.0):
    import httpx

    deadline = time.monotonic() + limit_s
    while True:
        r = httpx.get(url + "/ready", timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


# --- 1. writes that fail while a plain read works --------------------------------------------------------


async def test_a_read_only_postgresql_is_not_ready_until_writes_work(pg):
    pg.reset()
    async with Ledger(pg.url) as ledger:
        await ledger.record(record(1))
        assert await ledger.probe() is None
        with read_only(pg):
            with pytest.raises(LedgerWriteHeldError, match="read-only now; it is held"):  # told at once
                await ledger.record(record(2))
            assert ledger.unavailable and "read-only" in ledger.unavailable
            why = await ledger.probe()  # a SELECT still works: the probe writes (and rolls back)
            assert why and "read-only" in why and "cannot be written" in why
        assert await ledger.probe() is None and ledger.unavailable is None
        await ledger.record(record(3))  # after the held write's next try: it lands, as the failure told
        assert (await ledger.query("SELECT request_id, status, error_class FROM requests ORDER BY request_id")) == [
            ("r1", "ok", None), ("r2", "error", "LedgerWriteHeldError"), ("r3", "ok", None)]
        assert (await ledger.query("SELECT key FROM meta")) == [("schema_version",)]  # the probes left nothing


def test_ready_is_503_while_postgresql_is_read_only(pg, tmp_path):
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread

    pg.reset()
    with ServerThread(create_app(_server_config(tmp_path, pg.url))) as srv:
        assert httpx.get(srv.url + "/ready").status_code == 200
        with read_only(pg):
            r = httpx.get(srv.url + "/ready", timeout=30)  # before any request fails on it
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
            assert "read-only" in r.json()["ledger"]
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)  # refused, no tier run
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
            r = httpx.get(srv.url + "/ready", timeout=30)
            assert r.status_code == 503 and "read-only" in r.json()["ledger"]
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 502  # accounted


async def test_a_sqlite_ledger_locked_by_another_process_is_not_ready_and_fails_writes_in_time(tmp_path):
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path, timeout_s=1) as ledger:
        await ledger.record(record(1))
        assert await ledger.probe() is None
        with locked_by_another_process(path):
            t0 = time.monotonic()
            why = await ledger.probe()  # a SELECT still works (WAL): the probe takes the write lock
            assert why and "locked" in why and time.monotonic() - t0 < 3
            t0 = time.monotonic()
            with pytest.raises(LedgerError, match="locked|not committed within 1 s"):
                await ledger.record(record(2))
            assert time.monotonic() - t0 < 3  # not SQLite's 30 s
            assert ledger.unavailable
        # r2's write may still be in SQLite's busy wait (up to timeout_s) when the lock goes: ready once it ends
        deadline = time.monotonic() + 10
        while await ledger.probe() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await ledger.probe() is None and ledger.unavailable is None
        await ledger.record(record(3))
        rows = {r for (r,) in await ledger.query("SELECT request_id FROM requests")}
        # r2's caller was told it failed; had the lock gone before SQLite gave up waiting, it is kept
        assert rows in ({"r1", "r3"}, {"r1", "r2", "r3"})


def test_ready_is_503_while_another_process_holds_the_sqlite_write_lock(tmp_path):
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread

    path = tmp_path / "shared.sqlite"
    with ServerThread(create_app(_server_config(tmp_path, str(path)))) as srv:
        assert httpx.get(srv.url + "/ready").status_code == 200
        with locked_by_another_process(path):
            r, took = _timed(httpx.get, srv.url + "/ready", timeout=60)
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
            assert "locked" in r.json()["ledger"] and took < 4
            r, took = _timed(httpx.post, srv.url + "/v1/chat/completions", json=_BODY, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
            assert took < 4  # a probe's wait for the lock (1 s), not SQLite's 30 s busy wait
            assert httpx.get(srv.url + "/ready", timeout=60).status_code == 503
        r = _wait_ready(srv.url)
        assert r.status_code == 200, r.text
        assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 502


def test_requests_are_refused_before_any_model_call_while_the_ledger_cannot_be_written(tmp_path, caplog):
    """Once a write has failed, a request is refused with a 503 (Retry-After) before any tier runs: its
    answer could not be accounted, and a hosted tier would be paid for it. The refusal's row is written
    once the lock goes, and a request then is answered again. Why they are refused is logged once, not once
    a refusal (an outage under load would be a warning per request, twice over with each refusal's own)."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread, make_config
    from tests.fault_server import FaultServerThread

    path = tmp_path / "shared.sqlite"
    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                      "options": {"base_url": upstream.base_url}}],
                          {"p": {"chain": ["r"]}}, ledger={"path": str(path), "timeout_s": 1})
        calls = lambda: httpx.get(upstream.url + "/_stats").json()["requests"]  # noqa: E731
        with ServerThread(create_app(cfg)) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 200
            with locked_by_another_process(path):
                r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)  # the model answered
                assert r.status_code == 500 and r.json()["error"]["type"] == "ledger_error", r.text
                assert calls() == 2
                r, took = _timed(httpx.post, srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "ledger_unavailable" and r.headers["retry-after"] == "1"
                assert took < 4 and calls() == 2  # refused by the probe's verdict: no model was called
                refused = r.headers["x-request-id"]
                for _ in range(3):
                    r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
                assert caplog.text.count("requests refused while the ledger cannot record them") == 1
                # a request's own fault is told as itself (it was a 503, to repeat a request that cannot pass)
                r = httpx.post(srv.url + "/v1/chat/completions", json={**_BODY, "model": "nope"}, timeout=30)
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
                unknown = r.headers["x-request-id"]
            assert _wait_ready(srv.url).status_code == 200
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
            assert r.status_code == 200 and calls() == 3, r.text
    import sqlite3

    with sqlite3.connect(path) as c:
        row = c.execute("SELECT status, error_class, (SELECT count(*) FROM attempts a WHERE a.request_id = "
                        "r.request_id) FROM requests r WHERE request_id = ?", (refused,)).fetchone()
    assert row == ("error", "LedgerUnavailableError", 0)
    with sqlite3.connect(path) as c:  # its row too, queued while the lock was held
        assert c.execute("SELECT status, error_class FROM requests WHERE request_id = ?", (unknown,)).fetchone() == \
            ("error", "UnknownModelError")


async def test_a_request_cancelled_while_the_engine_probes_a_ledger_marked_down_gets_its_row(tmp_path):
    """A caller that gives up on a request (``asyncio.wait_for``, a task cancelled) while the engine asks the
    ledger whether it can be written again (it was marked down by a write that timed out) still leaves one
    row: ``cancelled``, as a request cancelled in its tiers does, written once the database answers."""
    import sqlite3

    from cascade import Engine
    from cascade.errors import LedgerUnavailableError
    from cascade.types import GenerationRequest, Message
    from tests.conftest import make_config
    from tests.fault_server import FaultServerThread

    path = tmp_path / "ledger.sqlite"
    req = GenerationRequest(messages=[Message(role="user", content="hi")], max_tokens=4)
    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                      "options": {"base_url": upstream.base_url}}],
                          {"p": {"chain": ["r"]}}, ledger={"path": str(path), "timeout_s": 1})
        engine = await Engine.open(cfg)
        try:
            await engine.run(req, end_user="first")
            with locked_by_another_process(path):
                with pytest.raises(LedgerError):
                    await engine.run(req, end_user="timed out")  # answered; its write times out: marked down
                assert engine.ledger.unavailable
                await asyncio.sleep(0.5)  # that write's own wait for the lock is over: the probe is not answered
                # at once (a stuck thread), it waits for the lock (1 s): the caller gives up on the request first
                with pytest.raises((TimeoutError, LedgerUnavailableError)) as given_up:
                    await asyncio.wait_for(engine.run(req, end_user="given up"), 0.2)
                assert given_up.type is TimeoutError
        finally:
            await engine.close()
    with sqlite3.connect(path) as c:
        rows = dict(c.execute("SELECT end_user, status || ' ' || coalesce(error_class, '') FROM requests"))
    assert rows.get("given up") == "cancelled ClientDisconnected", rows
    assert len(rows) == 3, rows


def test_a_client_that_leaves_while_its_answers_row_commits_is_recorded_as_cancelled(tmp_path):
    """A whole (unstreamed) answer goes out only once its row is committed; a client that closes its connection
    while that commit waits (another process holds the database's lock) never got the answer: its row, written
    as served, is made ``cancelled`` (as ``Engine.run`` and a streamed answer in hand make theirs), not left
    billed as an answer delivered."""
    import socket
    import sqlite3

    import httpx

    from serving import create_app
    from tests.conftest import ServerThread, make_config
    from tests.fault_server import FaultServerThread

    path = tmp_path / "ledger.sqlite"
    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                      "options": {"base_url": upstream.base_url}}],
                          {"p": {"chain": ["r"]}}, ledger={"path": str(path), "timeout_s": 10})
        calls = lambda: httpx.get(upstream.url + "/_stats").json()["requests"]  # noqa: E731
        with ServerThread(create_app(cfg)) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json={**_BODY, "user": "first"},
                              timeout=30).status_code == 200
            body = json.dumps({**_BODY, "user": "left"}).encode()
            with locked_by_another_process(path):
                s = socket.create_connection(("127.0.0.1", srv.port))
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 10
                while calls() < 2 and time.monotonic() < deadline:  # answered; its row waits for the lock
                    time.sleep(0.05)
                time.sleep(0.5)
                s.close()  # the client leaves before its answer could go out
                time.sleep(0.5)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                with sqlite3.connect(path) as c:
                    row = c.execute("SELECT status, error_class, tier FROM requests WHERE end_user = 'left'").fetchone()
                if row is not None and row[0] != "ok":
                    break
                time.sleep(0.1)
            metrics = httpx.get(srv.url + "/metrics").text
    assert row == ("cancelled", "ClientDisconnected", None), row  # nothing served
    assert 'cascade_requests_corrected_total{policy="p",status="cancelled",tier="r"} 1.0' in metrics


def test_a_known_ledger_outage_refuses_at_admission_before_reading_the_daily_spend(tmp_path):
    """A key with a daily spend limit is admitted by reading the ledger: while the ledger is known to be down,
    it is refused at once (503), not after that read's timeout and its refusal row's (a 500 after 2 x
    timeout_s); a request refused for its own fault is told so (400) without waiting for its row."""
    import httpx

    from serving import create_app
    from serving.auth import hash_key
    from tests.conftest import ServerThread, make_config

    path, key = tmp_path / "shared.sqlite", "sk-capped-0123456789abcdef"
    cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                  "options": {"base_url": "http://127.0.0.1:9/v1"}}],
                      {"p": {"chain": ["r"]}}, ledger={"path": str(path), "timeout_s": 5},
                      user_tiers={"capped": {"daily_spend_limit_usd": 1.0}},
                      auth={"keys": [{"id": "k1", "sha256": hash_key(key), "user_tier": "capped"}]})
    auth = {"authorization": f"Bearer {key}"}
    with ServerThread(create_app(cfg)) as srv, locked_by_another_process(path):
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 503  # the outage is known
        r, took = _timed(httpx.post, srv.url + "/v1/chat/completions", json=_BODY, headers=auth, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
        assert took < 4  # a probe's wait for the lock at most (1 s), not the spend read's 5 s
        r, took = _timed(httpx.post, srv.url + "/v1/chat/completions", headers=auth, timeout=30,
                         json={**_BODY, "n": 2})
        assert r.status_code == 400 and took < 4, r.text  # not its refusal row's 5 s


async def test_writes_past_max_pending_fail_at_once_rather_than_queue_without_bound(tmp_path):
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path, timeout_s=2, max_pending=1) as ledger:
        await ledger.record(record(1))
        with locked_by_another_process(path):
            first = ledger.submit(record(2))  # the ledger thread waits for the lock on it
            while ledger._busy_since is None:
                await asyncio.sleep(0.01)
            second = ledger.submit(record(3))  # waits behind it: one job pending, the most there may be
            third = ledger.submit(record(4))
            assert third.done()  # at once, not after timeout_s
            assert "request r4: 1 writes are waiting for the ledger already" in str(third.exception())
            assert "not keeping up" in ledger.unavailable
            for fut in (first, second):
                with pytest.raises(LedgerError):
                    await fut
        deadline = time.monotonic() + 10
        # ready again, and the queue drained (a late commit queues its correction: one job, the most there may be)
        while await ledger.probe() is not None or ledger._queue.qsize():
            assert time.monotonic() < deadline, ledger.unavailable
            await asyncio.sleep(0.1)
        await ledger.record(record(5))
        rows = {r for (r,) in await ledger.query("SELECT request_id FROM requests")}
        assert {"r1", "r5"} <= rows and "r4" not in rows


async def test_a_write_that_fails_through_its_own_record_leaves_the_ledger_ready(tmp_path):
    """A duplicate request id is that request's fault, not the database's: the server stays ready."""
    async with Ledger(tmp_path / "ledger.sqlite") as ledger:
        await ledger.record(record(1))
        with pytest.raises(LedgerError, match="r1"):
            await ledger.record(record(1))
        assert ledger.unavailable is None and await ledger.probe() is None


# --- 2. a database that does not answer ------------------------------------------------------------------


async def test_a_hung_postgresql_fails_writes_reads_and_the_probe_in_bounded_time(hung_pg, caplog):
    hung_pg.reset()
    async with Ledger(hung_pg.url, timeout_s=1) as ledger:
        await ledger.record(record(1))
        assert await ledger.probe() is None
        with frozen(hung_pg):
            t0 = time.monotonic()
            with pytest.raises(LedgerError, match="r2: not committed within 1 s"):
                await ledger.record(record(2))
            assert time.monotonic() - t0 < 2.5
            assert ledger.unavailable and "not answering" in ledger.unavailable
            t0 = time.monotonic()
            assert "not answering" in (await ledger.probe() or "")
            assert "not answering" in (await ledger.probe() or "")
            assert time.monotonic() - t0 < 2.5  # the thread is stuck: answered at once, or within timeout_s
            with pytest.raises(LedgerError, match="not answering"):  # a read (the daily spend limits')
                await daily_spend(ledger, 0.0, [("key", "k1")])
            streamed, refused = record(3), record(4)  # a stream's answer went out before its write
            refused.status, refused.error_class, refused.error_message = "error", "BudgetExceededError", "no"
            late = [ledger.submit(streamed, sent=True), ledger.submit(refused)]
            for fut in late:
                with pytest.raises(LedgerError, match="not committed within 1 s"):
                    await fut
        # the server answers again: the writes their callers were told had failed are committed, kept and logged;
        # r2's answer was held back for its write (its client had the 500): recorded as that failure
        deadline = time.monotonic() + 20
        while await ledger.probe() is not None:
            assert time.monotonic() < deadline, ledger.unavailable
        while not (await ledger.query("SELECT 1 FROM requests WHERE status = 'error' AND request_id = 'r2'")):
            assert time.monotonic() < deadline  # the correction is queued behind the probe
            await asyncio.sleep(0.05)
        assert (await ledger.query("SELECT request_id, status, error_class, tier FROM requests ORDER BY request_id")) \
            == [("r1", "ok", None, "large"), ("r2", "error", "LedgerTimeoutError", None), ("r3", "ok", None, "large"),
                ("r4", "error", "BudgetExceededError", "large")]
        assert "request r2 was committed after its caller had been told it failed" in caplog.text


async def test_closing_a_ledger_whose_postgresql_hangs_does_not_hang(hung_pg):
    hung_pg.reset()
    ledger = await Ledger(hung_pg.url, timeout_s=1).open()
    await ledger.record(record(1))
    with frozen(hung_pg):
        fut = ledger.submit(record(2))
        t0 = time.monotonic()
        await ledger.close()
        assert time.monotonic() - t0 < 3
        with pytest.raises(LedgerError, match="not committed"):
            await fut


def test_ready_and_completions_answer_in_bounded_time_while_postgresql_hangs(hung_pg, tmp_path):
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread

    hung_pg.reset()
    # ledger.timeout_s set in the config (5 s by default) is what the server waits
    with ServerThread(create_app(_server_config(tmp_path, hung_pg.url, timeout_s=1.5))) as srv:
        assert httpx.get(srv.url + "/ready").status_code == 200
        with frozen(hung_pg):
            r, took = _timed(httpx.get, srv.url + "/ready", timeout=60)  # its probe waits ledger.timeout_s
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
            assert "not answering" in r.json()["ledger"] and 1.3 < took < 8  # bounded: not a hang
            r, took = _timed(httpx.post, srv.url + "/v1/chat/completions", json=_BODY, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
            assert took < 8
            r, took = _timed(httpx.get, srv.url + "/ready", timeout=60)  # the thread stuck: at once
            assert r.status_code == 503 and took < 8
        r = _wait_ready(srv.url)
        assert r.status_code == 200, r.text


def test_a_write_that_timed_out_and_committed_later_counts_once_toward_the_daily_spend_limit(hung_pg, tmp_path):
    """The client whose write timed out got its 500, but the row committed once the database answered again:
    it is recorded as that failure (it said answered), and its cost, in the ledger's sum, no longer also
    counts as spend lost to a failed write (the key was refused until the UTC day's end, at half its limit)."""
    import threading

    import httpx

    from serving import create_app
    from serving.auth import hash_key
    from tests.conftest import ServerThread, make_config
    from tests.fault_server import FaultServerThread

    hung_pg.reset()
    key = "sk-test-spend-0123456789"
    with FaultServerThread() as upstream:
        # 4 prompt and 4 answer tokens at $1000 per million: $0.008 a request; the limit is $0.012
        remote = {"name": "r", "backend": "openai", "model": "m", "max_tokens": 4,
                  "price": {"input_per_1m": 1000.0, "output_per_1m": 1000.0},
                  "options": {"base_url": upstream.base_url}}
        cfg = make_config(tmp_path, [remote], {"p": {"chain": ["r"]}},
                          ledger={"path": hung_pg.url, "timeout_s": 1.5},
                          user_tiers={"capped": {"daily_spend_limit_usd": 0.012}},
                          auth={"keys": [{"id": "k1", "sha256": hash_key(key), "user_tier": "capped"}]})
        auth = {"authorization": f"Bearer {key}"}
        with ServerThread(create_app(cfg)) as srv:
            upstream.faults("slow:1")  # the answer takes a second: time to freeze the database after admission
            got: list[httpx.Response] = []
            t = threading.Thread(target=lambda: got.append(
                httpx.post(srv.url + "/v1/chat/completions", json=_BODY, headers=auth, timeout=60)))
            t.start()
            while upstream.stats()["requests"] < 1:
                time.sleep(0.02)
            with frozen(hung_pg):
                t.join(timeout=30)
                assert got[0].status_code == 500 and "not committed within 1.5 s" in got[0].text, got[0].text
            assert _wait_ready(srv.url).status_code == 200  # the row is committed now
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, headers=auth, timeout=60)
            assert r.status_code == 200, r.text  # $0.008 spent, not $0.016
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, headers=auth, timeout=60)
            assert r.status_code == 429 and "$0.016000 spent today" in r.json()["error"]["message"], r.text
    import psycopg

    late = got[0].headers["x-request-id"]
    with psycopg.connect(hung_pg.url) as c:
        rows = c.execute("SELECT request_id, status, error_class, tier, cost_usd, escalation_waste_usd FROM requests "
                         "WHERE cost_usd > 0 ORDER BY created_at").fetchall()
        kept = c.execute("SELECT SUM(kept) FROM attempts WHERE request_id = %s", (late,)).fetchone()[0]
    # the late row is recorded as the failure its client saw (a 500, never the answer): its cost counts, once
    assert [r[1:] for r in rows] == [("error", "LedgerTimeoutError", None, 0.008, 0.008),
                                     ("ok", None, "r", 0.008, 0.0)]
    assert rows[0][0] == late and kept == 0


# --- 3. reading commands with read rights only -----------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from cascade.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _make_old(target: str) -> None:
    """Take a current ledger back to schema version 4 (before end_user and metadata)."""
    ledger = Ledger(target).open_sync()
    try:
        for sql in ("DROP INDEX requests_end_user_created", "ALTER TABLE requests DROP COLUMN end_user",
                    "ALTER TABLE requests DROP COLUMN metadata",
                    "UPDATE meta SET value = '4' WHERE key = 'schema_version'"):
            ledger.execute(sql)
    finally:
        ledger.close_sync()


def test_reports_read_a_postgresql_ledger_through_a_role_that_may_only_select(pg, capsys):
    import psycopg

    pg.reset()
    make_ledger(pg.url, 2)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    url = pg.url.replace("cascade@", f"{role}@")
    rc, out, err = _cli(capsys, "report", "--json", "--ledger", url)
    assert rc == 0, err
    assert json.loads(out)["total"]["requests"] == 2
    rc, out, err = _cli(capsys, "shadow", "report", "--json", "--ledger", url)
    assert rc == 0, err
    # a ledger of an older schema is read as it is, by this role and by its owner alike: never migrated by a
    # command that only reads it (servers of its own version may still be writing to it)
    _make_old(pg.url)
    for who in (url, pg.url):
        rc, out, err = _cli(capsys, "report", "--json", "--by", "user", "--ledger", who)
        assert rc == 0, err
        assert json.loads(out)["total"]["requests"] == 2
        rc, out, err = _cli(capsys, "shadow", "report", "--json", "--ledger", who)
        assert rc == 0, err
    with psycopg.connect(pg.url, autocommit=True) as admin:
        assert admin.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("4",)
        assert admin.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'requests' "
                             "AND column_name = 'end_user'").fetchone() == (0,)


def test_reports_read_a_sqlite_ledger_from_a_read_only_file(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 2)

    def chattr(flag: str) -> bool:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0

    if not chattr("+i"):  # immutable: read-only even to root, who ignores file modes
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(OSError):
            path.open("r+b")
        rc, out, err = _cli(capsys, "report", "--json", "--ledger", str(path))
        assert rc == 0, err
        assert json.loads(out)["total"]["requests"] == 2
        rc, out, err = _cli(capsys, "shadow", "report", "--json", "--ledger", str(path))
        assert rc == 0, err
        chattr("-i")
        _make_old(str(path))
        assert chattr("+i")
        rc, out, err = _cli(capsys, "report", "--json", "--by", "user", "--ledger", str(path))  # read as it is
        assert rc == 0, err
        assert json.loads(out)["total"]["requests"] == 2
    finally:
        chattr("-i")


# --- 4. passwords ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, shown", [
    ("postgresql://app@127.0.0.1:5440/ledger?password=hunter2", "postgresql://app@127.0.0.1:5440/ledger?password=***"),
    ("postgresql:///x?host=db&password=hunter2", "postgresql:///x?host=db&password=***"),
    ("postgres://app:hunter2@db/x?sslmode=require&sslpassword=hunter2",
     "postgres://app:***@db/x?sslmode=require&sslpassword=***"),
    ("postgresql://app@db/x?pass%77ord=hunter2", "postgresql://app@db/x?pass%77ord=***"),
    ("postgresql://app:hun@ter2@db/x", "postgresql://app:***@db/x"),  # an "@" left unencoded
    ("postgresql://app:hun?ter2@db/x", "postgresql://app:***@db/x"),  # a "?" left unencoded
    ("postgresql://app@db/x?password=hun@ter2&application_name=a", "postgresql://app@db/x?password=***&"
     "application_name=a"),
    ("host=db password=hunter2 dbname=x", "host=db password=*** dbname=x"),
    ("host=db password='hunter2 x' dbname=x", "host=db password=*** dbname=x"),
])
def test_no_form_of_ledger_url_shows_its_password(target, shown):
    assert _redact(target) == shown


@pytest.mark.parametrize("target", [
    "postgresql://app:hunter2@[::1/ledger",  # libpq quotes a URL it cannot parse whole
    "postgresql://app:hun%zzter2@db/ledger",  # ... or the token it stumbled on: a bad %-escape
    "postgresql://app:hunter2 x@db/ledger",  # ... a space
    "postgresql://app@db/ledger?password=hun%zzter2",
    "postgres://app:hunter2@db/ledger?password=hunter2&bogus=1&sslpassword=hun%zzter2",
])
def test_a_url_libpq_cannot_parse_never_shows_its_password(target, capsys):
    """Not in a report's error (a read-only open), nor in the server's or `cascade ask`'s (an open to write)."""
    rc, out, err = _cli(capsys, "report", "--ledger", target)
    assert rc == 2 and err.startswith("cascade: error: cannot open ledger ") and err.count("\n") == 1, err
    assert "hunter2" not in err and "hun%zzter2" not in err and "***" in err, err
    with pytest.raises(LedgerError, match="cannot open ledger") as exc:
        Ledger(target).open_sync()
    assert "hunter2" not in str(exc.value) and "hun%zzter2" not in str(exc.value), exc.value


def test_a_password_given_as_a_url_query_parameter_never_shows(pg, tmp_path, capsys, caplog):
    """Not in GET /ready (unauthenticated), a completion's refusal, the logs, nor the reports."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread, free_port

    pg.reset()
    url = pg.url + "?password=hunter2"  # the test server trusts every local connection: accepted, unused
    make_ledger(url, 2)
    other = f"postgresql:///postgres?host=127.0.0.1&port={pg.port}&user=cascade&password=hunter2"
    for target in (url, other):
        rc, out, err = _cli(capsys, "report", "--json", "--ledger", target)
        assert rc == 0, err
        assert "hunter2" not in out and "password=***" in json.loads(out)["ledger"]
    rc, out, err = _cli(capsys, "report", "--ledger", f"postgresql://u@127.0.0.1:{free_port()}/x?password=hunter2")
    assert rc == 2 and "hunter2" not in err and "password=***" in err, err
    with ServerThread(create_app(_server_config(tmp_path, url))) as srv:
        with refusing_connections(pg):
            r = httpx.get(srv.url + "/ready", timeout=30)
            assert r.status_code == 503 and "password=***" in r.json()["ledger"], r.text
            assert "hunter2" not in r.text
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
            assert r.status_code == 503 and "hunter2" not in r.text, r.text  # refused: the ledger is down
        assert _wait_ready(srv.url).status_code == 200
    assert "hunter2" not in caplog.text


# --- a PostgreSQL COMMIT whose answer is lost; a full PostgreSQL disk ------------------------------------------


class _CommitCutter:
    """A TCP proxy in front of PostgreSQL that, once armed, forwards the COMMIT of the next transaction that wrote
    to ``requests`` and then cuts the connection before the server's answer comes back (the row is committed, the
    client never learns it), and refuses new connections for ``refuse_s`` (a failover)."""

    def __init__(self, server: PostgresServer) -> None:
        self.target = ("127.0.0.1", server.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = server.url.replace(f":{server.port}/", f":{self.listener.getsockname()[1]}/")
        self.armed, self.refusing_until, self.cuts = False, 0.0, 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, refuse_s: float) -> None:
        self.refuse_s, self.armed = refuse_s, True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refusing_until:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.socks += [client, server]
            state = {"insert": False, "cut": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if state["cut"]:
                    return
                if upstream and b"INSERT INTO requests" in data:
                    state["insert"] = True
                if upstream and self.armed and state["insert"] and b"COMMIT\x00" in data:
                    # the cut is decided before the COMMIT is forwarded: the server's answer can come back at once,
                    # and the other direction's pump must already see it cut (decided after forwarding, the answer
                    # slipped through to the client when this thread lost the race to it on a loaded machine)
                    self.armed, state["cut"] = False, True
                    self.cuts += 1
                    self.refusing_until = time.monotonic() + self.refuse_s
                    dst.sendall(data)
                    time.sleep(0.3)  # the server commits meanwhile
                    for s in (src, dst):
                        s.close()
                    return
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("refuse_s, told", [(0.5, False), (3.0, True)])
async def test_a_postgresql_write_whose_commit_answer_was_lost_is_not_refused_as_a_duplicate(pg, refuse_s, told):
    """The connection goes after the server had the COMMIT, before its answer came back (a network cut, a failover
    at that moment): the write looked failed and was held, and its next try met its own row, a duplicate key. It
    was told to its client as a failure, with the constraint's name, while the row said served; the day's spend
    counted it twice. Now a row of the same request and creation time is that write, committed: a success if its
    waiter still waits, else made the failure its waiter was told of."""
    pg.reset()
    proxy = _CommitCutter(pg)
    try:
        async with Ledger(proxy.url, timeout_s=2) as ledger:
            late: list = []
            ledger.late_listeners.append(lambda rec, exc: late.append((rec.request_id, exc)))
            await ledger.record(record(1))
            proxy.arm(refuse_s)
            if told:
                with pytest.raises(LedgerTimeoutError):
                    await ledger.record(record(2))
                for _ in range(100):
                    if late:
                        break
                    await asyncio.sleep(0.05)
                assert late == [("r2", None)]
            else:
                await ledger.record(record(2))  # committed in its first try: said so
            assert proxy.cuts == 1
            await ledger.record(record(3))
            got = await ledger.query("SELECT request_id, status, error_class FROM requests ORDER BY request_id")
            want = ("r2", "error", "LedgerTimeoutError") if told else ("r2", "ok", None)
            assert got == [("r1", "ok", None), want, ("r3", "ok", None)]
            assert ledger.unavailable is None
    finally:
        proxy.close()


@pytest.fixture
def pg_tiny_dir(pg):
    """A directory on a 2 MiB tmpfs of its own that the PostgreSQL server may write (a skip where mounting is not
    allowed), unmounted afterwards."""
    from tests.test_ledger_durability import tmpfs

    owner = f",uid={pg.user.pw_uid},gid={pg.user.pw_gid}" if pg.user else ""
    with tmpfs(pg.dir / f"tiny-{uuid.uuid4().hex[:8]}", f"size=2m,mode=0700{owner}") as mnt:
        yield mnt


async def test_postgresql_out_of_disk_is_not_ready_while_writes_are_held(pg, pg_tiny_dir):
    """The ledger's tables on a full disk (a tablespace on a small tmpfs): a write is held and told at once, and
    the server is not ready until the held writes commit. PostgreSQL's probe rolls its insert back, which fits a
    page already there: it said ready, and every request paid its tiers for a 500."""
    import psycopg

    pg.reset()
    with psycopg.connect(pg.url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLESPACE tiny LOCATION '{pg_tiny_dir}'")
    try:
        async with Ledger(pg.url + "?options=-c%20default_tablespace%3Dtiny", timeout_s=2) as ledger:
            await ledger.record(record(1))
            with psycopg.connect(pg.url, autocommit=True) as admin:
                admin.execute("CREATE TABLE filler (x text) TABLESPACE tiny")
                with pytest.raises(psycopg.errors.DiskFull):
                    while True:
                        admin.execute("INSERT INTO filler SELECT md5(random()::text) FROM generate_series(1, 2000)")
            n = 10
            while True:  # until the ledger's own pages are full too
                n += 1
                try:
                    await ledger.record(record(n))
                except LedgerWriteHeldError as exc:
                    assert "out of disk space" in str(exc) and "pg_tblspc" not in str(exc)
                    break
            why = await ledger.probe()
            assert why and "writes are held" in why, why
            with psycopg.connect(pg.url, autocommit=True) as admin:
                admin.execute("DROP TABLE filler")
            assert await ledger.probe() is None  # the held write tried again first: committed
            assert ledger._held == 0 and (await ledger.get(f"r{n}"))["error_class"] == "LedgerWriteHeldError"
    finally:
        pg.reset()
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("DROP TABLESPACE IF EXISTS tiny")
