"""The SQLite ledger under conditions that lose rows or hide an outage, on real files: a full disk (a real tmpfs
filled up, where root may mount one), a write lock held by another process for longer than ``ledger.timeout_s``
(a VACUUM, a backup, another writer), a reader who may only read the file and its directory (a cleanly stopped
server left no ``-wal`` nor ``-shm``), and the ledger file moved or deleted under a running server.

A full disk must make the ledger not ready (the probe commits a write) so that requests are refused before any
tier runs; a write that found the database locked stays queued and is committed once the lock goes (its
waiter is told it timed out, as before); reports read a file its user may only read; a ledger file that is
no longer at its path makes the readiness probe fail."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cascade.errors import LedgerError, LedgerTimeoutError, LedgerWriteHeldError
from cascade.ledger import Ledger
from tests.test_ledger import make_ledger, record

_REPO = Path(__file__).resolve().parents[1]
_BODY = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}


# --- helpers --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A directory on a 600 KiB tmpfs of its own (unmounted afterwards), or a skip where mounting is not allowed."""
    with tmpfs(tmp_path / "tiny", "size=600k,mode=0755") as mnt:
        yield mnt


@contextmanager
def tmpfs(mnt: Path, options: str):
    """``mnt`` made a tmpfs mounted with ``options`` for the block (a skip where mounting is not allowed)."""
    mnt.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount here to make a small filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # never leave a mount behind


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` up with one file, until the kernel says it is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # the last bytes of the last block too
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def lock_for(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the SQLite ledger's write lock for ``seconds`` (as a VACUUM, a backup or a second
    writer would); returns once the lock is taken."""
    code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@contextmanager
def locked(path: Path):
    """Another process holding the write lock until the block ends."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


async def until(cond, limit_s: float = 15.0, what: str = "the condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not come within {limit_s} s"
        await asyncio.sleep(0.05)


def rows(path: Path) -> dict[str, tuple]:
    with sqlite3.connect(path) as c:
        return {r[0]: r[1:] for r in c.execute("SELECT request_id, status, error_class FROM requests")}


def _server_config(tmp_path: Path, ledger_path: Path, base_url: str, **ledger):
    from tests.conftest import make_config

    return make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m", "options": {"base_url": base_url}}],
                       {"p": {"chain": ["r"]}}, ledger={"path": str(ledger_path), **ledger})


def _chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return all(subprocess.run(["chattr", flag, str(p)], capture_output=True).returncode == 0 for p in paths)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from cascade.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- F1: a full disk ------------------------------------------------------------------------------------------


async def test_a_full_disk_fails_the_probe_and_keeps_the_ledger_not_ready_until_a_write_commits(tiny_fs):
    """A write rolled back never reaches SQLite's WAL, so it passed on a full disk where every commit fails:
    the probe commits a (one-row) write, and fails there. A write that found the disk full is told so at once
    (not after ``timeout_s``) and held: committed once there is room, as the failure its waiter was told of."""
    path = tiny_fs / "ledger.sqlite"
    async with Ledger(path, timeout_s=2) as ledger:
        late = listened(ledger)
        for i in range(5):
            await ledger.record(record(i))
        assert await ledger.probe() is None
        filler = fill(tiny_fs)
        try:
            why = await ledger.probe()  # before any request fails on it
            assert why and "full" in why and "cannot be written" in why, why
            t0 = time.monotonic()
            with pytest.raises(LedgerWriteHeldError, match="database or disk is full.*held and tried again"):
                await ledger.record(record(10))
            assert time.monotonic() - t0 < 1.0  # told at once: no wait for the 2 s timeout
            assert ledger.unavailable and "full" in ledger.unavailable
            await until(lambda: ledger._held == 1, what="the held write")
            for _ in range(3):  # it stays not ready: no probe clears the mark while no write can commit
                why = await ledger.probe()
                assert why and "full" in why
        finally:
            filler.unlink()
        assert await ledger.probe() is None and ledger.unavailable is None
        await ledger.record(record(11))  # after the held write's next try, which commits it
        assert late == {"r10": None}
        await until(lambda: ledger._queue.qsize() == 0 and ledger._held == 0, what="the correction")
        assert {r[0]: r[1:] for r in await ledger.query("SELECT request_id, status, error_class, cost_usd FROM "
                                                          "requests")} == {
            **{f"r{i}": ("ok", None, record(i).cost_usd) for i in (0, 1, 2, 3, 4, 11)},
            "r10": ("error", "LedgerWriteHeldError", record(10).cost_usd)}  # its spend is not lost
        # written as that failure at once (no correction after it, which a disk with room for one write lacks)
        assert await ledger.query("SELECT tier, confidence, escalated, escalation_waste_usd FROM requests WHERE "
                                  "request_id = 'r10'") == [(None, None, 0, record(10).cost_usd)]
        assert await ledger.query("SELECT SUM(kept) FROM attempts WHERE request_id = 'r10'") == [(0,)]
        # the probes leave one row behind, the time of the last one (overwritten each time)
        assert [k for (k,) in await ledger.query("SELECT key FROM meta ORDER BY key")] == ["ready_probe",
                                                                                           "schema_version"]


async def test_writes_held_on_a_full_disk_leave_reads_working_and_are_named_when_given_up(tiny_fs, caplog):
    """Held writes fill ``max_pending`` during an outage (every refused request's row is held): reads and probes
    went on being refused with them, as "not keeping up", naming the ledger's path to clients. And a ledger closed
    while the disk stays full gave its held writes up after the closer had stopped waiting: a process exiting
    then lost them without a line naming them."""
    path = tiny_fs / "ledger.sqlite"
    ledger = await Ledger(path, timeout_s=1, max_pending=2).open()
    late = listened(ledger)
    await ledger.record(record(0))
    filler = fill(tiny_fs)
    try:
        for i in (1, 2):
            with pytest.raises(LedgerWriteHeldError):
                await ledger.record(record(i))
        await until(lambda: ledger._held == 2, what="the held writes")
        assert (await ledger.get("r0"))["status"] == "ok"  # SQLite reads a full disk
        assert await ledger.query("SELECT COUNT(*) FROM requests") == [(1,)]
        assert "full" in await ledger.probe()
        with pytest.raises(LedgerError, match="2 writes are waiting for the ledger already") as refused:
            await ledger.record(record(3))
        assert str(tiny_fs) not in str(refused.value)
        t0 = time.monotonic()
        await ledger.close()
        assert time.monotonic() - t0 < 1.5
        given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
        assert len(given_up) == 1 and "their rows lost" in given_up[0] and "requests r1, r2" in given_up[0], given_up
        assert "database or disk is full" in given_up[0]
        await until(lambda: len(late) == 2, what="the late listeners")
        assert all(isinstance(err, LedgerError) and "full" in str(err) for err in late.values()), late
    finally:
        filler.unlink()
    assert set(rows(path)) == {"r0"}


def test_a_full_disk_makes_ready_503_and_refuses_requests_before_any_model_call(tiny_fs, tmp_path):
    """The first request after the disk filled runs its tiers (nothing has failed yet to say so): its answer is
    not let out (a 500 at once) and its row, its attempt and spend with it, is committed once there is room, as
    the failure its client saw. The requests after it are refused before any tier runs; their rows land too."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    path = tiny_fs / "ledger.sqlite"
    with FaultServerThread() as upstream:
        calls = lambda: httpx.get(upstream.url + "/_stats").json()["requests"]  # noqa: E731
        cfg = _server_config(tmp_path, path, upstream.base_url, timeout_s=2)
        with ServerThread(create_app(cfg)) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 200
            assert calls() == 1
            filler = fill(tiny_fs)
            refused = []
            try:
                t0 = time.monotonic()
                r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
                assert r.status_code == 500 and r.json()["error"]["type"] == "ledger_error", r.text
                assert "full" in r.json()["error"]["message"] and str(tiny_fs) not in r.text
                assert time.monotonic() - t0 < 1.5 and calls() == 2  # told at once, not after timeout_s
                paid = r.headers["x-request-id"]
                r = httpx.get(srv.url + "/ready", timeout=30)
                assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
                assert "full" in r.json()["ledger"]
                for _ in range(2):
                    r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
                    refused.append(r.headers["x-request-id"])
                assert calls() == 2  # refused before any tier ran: nothing paid for an answer that is not recorded
            finally:
                filler.unlink()
            r = httpx.get(srv.url + "/ready", timeout=30)
            assert r.status_code == 200, r.text
            r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
            assert r.status_code == 200 and calls() == 3, r.text
            answered = r.headers["x-request-id"]
    got = rows(path)
    assert got[answered] == ("ok", None)
    assert got[paid] == ("error", "LedgerWriteHeldError")
    assert all(got[rid] == ("error", "LedgerUnavailableError") for rid in refused), got
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT COUNT(*) FROM attempts WHERE request_id = ?", (paid,)).fetchone() == (1,)


def test_a_stream_whose_answer_went_out_ends_whole_when_its_write_is_held(tiny_fs, tmp_path):
    """The disk fills while a stream's tokens are going out: its held write used to be raised out of the
    stream (two tracebacks, the response cut off without its last chunk nor ``[DONE]``). Its answer is out: the
    stream ends as it would have, and its row lands as served once there is room."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    path = tiny_fs / "ledger.sqlite"
    with FaultServerThread() as upstream:
        with ServerThread(create_app(_server_config(tmp_path, path, upstream.base_url, timeout_s=2))) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 200
            upstream.faults("slow:0:0.3")
            lines, filler = [], None
            try:
                with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**_BODY, "stream": True},
                                  timeout=30) as r:
                    sid = r.headers["x-request-id"]
                    for line in filter(None, r.iter_lines()):
                        lines.append(line)
                        if '"content":"' in line and filler is None:
                            filler = fill(tiny_fs)  # a token is out: the write to come will find the disk full
                assert filler is not None and lines[-1] == "data: [DONE]", lines[-3:]
                finish = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-2:]
                assert any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in finish), finish
            finally:
                if filler is not None:
                    filler.unlink()
            deadline = time.monotonic() + 15
            while sid not in rows(path):
                assert time.monotonic() < deadline, "the stream's row did not land"
                time.sleep(0.1)
    assert rows(path)[sid] == ("ok", None)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT kept FROM attempts WHERE request_id = ?", (sid,)).fetchall() == [(1,)]


# --- F3: a write lock held elsewhere for longer than timeout_s -------------------------------------------------


async def test_writes_that_found_the_ledger_locked_past_its_timeout_are_committed_once_the_lock_goes(tmp_path):
    """A lock held elsewhere for longer than ``timeout_s`` (until this test lets it go): SQLite gives up waiting
    (SQLITE_BUSY) long before it goes. The waiters are told their write timed out, as before; the writes stay
    queued and are committed later (an answer's row as the failure its client saw, a refusal's as it is), and the
    late listeners hear so."""
    path = tmp_path / "ledger.sqlite"
    late: list[tuple[str, BaseException | None]] = []
    async with Ledger(path, timeout_s=2) as ledger:
        ledger.late_listeners.append(lambda rec, exc: late.append((rec.request_id, exc)))
        await ledger.record(record(1))
        # held until the block ends, not for a fixed time: the steps below take ~5 s (two 2 s timeouts and a
        # probe's 1 s wait for the lock), and a lock timed to go at 6 s could go before the last of them on a
        # loaded machine, committing r4 while the test still needs the lock held
        with locked(path):
            refusal = record(3)
            refusal.status, refusal.error_class, refusal.error_message = "error", "LedgerUnavailableError", "refused"
            refusal.attempts = []
            t0 = time.monotonic()
            futs = [ledger.submit(record(2)), ledger.submit(refusal)]
            for fut in futs:
                with pytest.raises(LedgerTimeoutError):
                    await fut
            assert time.monotonic() - t0 < 3.5  # the waiter's timeout (2 s), not the lock's (it is still held)
            await until(lambda: ledger._held == 2, what="the held writes")
            why = await ledger.probe()  # answered beside the held writes' tries, in time
            assert why and "locked" in why, why
            later = ledger.submit(record(4))  # joins the held writes
            with pytest.raises(LedgerTimeoutError):
                await later
            assert not late  # nothing committed while the lock is held
        await until(lambda: len(late) == 3, what="the late commits")
        assert sorted(late, key=lambda x: x[0]) == [("r2", None), ("r3", None), ("r4", None)]
        await until(lambda: ledger._queue.qsize() == 0 and ledger._held == 0, what="the corrections")
        await ledger.record(record(5))
        assert await ledger.probe() is None and ledger.unavailable is None
    got = rows(path)
    assert got == {"r1": ("ok", None), "r2": ("error", "LedgerTimeoutError"), "r3": ("error", "LedgerUnavailableError"),
                   "r4": ("error", "LedgerTimeoutError"), "r5": ("ok", None)}


async def test_held_writes_count_toward_max_pending(tmp_path):
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path, timeout_s=0.5, max_pending=2) as ledger:
        await ledger.record(record(1))
        with locked(path):
            futs = [ledger.submit(record(2)), ledger.submit(record(3))]
            await until(lambda: ledger._held == 2, what="two held writes")
            over = ledger.submit(record(4))
            assert over.done() and "2 writes are waiting for the ledger already" in str(over.exception())
            for fut in futs:
                with pytest.raises(LedgerTimeoutError):
                    await fut
        await until(lambda: ledger._held == 0 and ledger._queue.qsize() == 0, what="the held writes")
        assert {r for (r,) in await ledger.query("SELECT request_id FROM requests")} == {"r1", "r2", "r3"}


async def test_closing_commits_the_held_writes_if_the_lock_goes_within_its_timeout(tmp_path):
    path = tmp_path / "ledger.sqlite"
    late: list[tuple[str, BaseException | None]] = []
    ledger = await Ledger(path, timeout_s=2).open()
    ledger.late_listeners.append(lambda rec, exc: late.append((rec.request_id, exc)))
    holder = lock_for(path, 3.0)
    try:
        with pytest.raises(LedgerTimeoutError):
            await ledger.record(record(1))
        await until(lambda: ledger._held == 1, what="the held write")
        t0 = time.monotonic()
        await ledger.close()  # the lock goes ~1 s into it
        assert time.monotonic() - t0 < 3
    finally:
        holder.wait(timeout=30)
    assert late == [("r1", None)]
    assert rows(path)["r1"] == ("error", "LedgerTimeoutError")  # made the failure its caller saw, before closing


async def test_closing_gives_up_the_held_writes_after_its_timeout_while_the_lock_stays(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite"
    late: list[tuple[str, BaseException | None]] = []
    ledger = await Ledger(path, timeout_s=1).open()
    ledger.late_listeners.append(lambda rec, exc: late.append((rec.request_id, exc)))
    with locked(path):
        with pytest.raises(LedgerTimeoutError):
            await ledger.record(record(1))
        await until(lambda: ledger._held == 1, what="the held write")
        t0 = time.monotonic()
        await ledger.close()  # bounded: the closer waits timeout_s, as for a stuck ledger thread
        assert time.monotonic() - t0 < 4
        await until(lambda: late, what="the given-up write's failure")
    assert late[0][0] == "r1" and "locked" in str(late[0][1])
    assert "r1" not in rows(path)


def test_requests_during_a_long_lock_keep_their_rows(tmp_path):
    """Through the server, as the audit did: an answered request and a refused one while another process holds the
    lock for 4 s (timeout_s 1): each client gets its error at once, both rows are in the ledger afterwards."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    path = tmp_path / "ledger.sqlite"
    with FaultServerThread() as upstream:
        cfg = _server_config(tmp_path, path, upstream.base_url, timeout_s=1)
        with ServerThread(create_app(cfg)) as srv:
            assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 200
            holder = lock_for(path, 4.0)
            try:
                r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)  # the model answered
                assert r.status_code == 500 and r.json()["error"]["type"] == "ledger_error", r.text
                answered = r.headers["x-request-id"]
                r = httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30)
                assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
                refused = r.headers["x-request-id"]
            finally:
                holder.wait(timeout=30)
            deadline = time.monotonic() + 15
            while not {answered, refused} <= set(rows(path)):
                assert time.monotonic() < deadline, rows(path)
                time.sleep(0.1)
            assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
    got = rows(path)
    assert got[answered] == ("error", "LedgerTimeoutError")  # its client had the 500, never the answer
    assert got[refused] == ("error", "LedgerUnavailableError")


def _metric_lines(text: str, *prefixes: str) -> dict[str, float]:
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith(prefixes)}


@pytest.mark.parametrize("stream", [True, False])
def test_metrics_count_a_write_that_outlasted_its_timeout_as_its_row_stands(tmp_path, stream):
    """A stream's answer goes out before its write: when that write outlasts timeout_s (a lock held elsewhere), the
    row lands later as served, and /metrics counts it so, not as the LedgerTimeoutError its write met on the way;
    an answer held back for its write is counted once as the 500 its client had, as the ledger records it."""
    import sqlite3

    import httpx

    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    path = tmp_path / "ledger.sqlite"
    with FaultServerThread() as upstream:
        cfg = _server_config(tmp_path, path, upstream.base_url, timeout_s=1)
        with ServerThread(create_app(cfg)) as srv:
            holder = lock_for(path, 3.0)
            try:
                with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**_BODY, "stream": stream},
                                  timeout=30) as r:
                    body = r.read().decode()
                    rid = r.headers["x-request-id"]
                if stream:
                    assert r.status_code == 200 and body.rstrip().endswith("data: [DONE]") and '"error"' not in body
                else:
                    assert r.status_code == 500 and json.loads(body)["error"]["type"] == "ledger_error", body
            finally:
                holder.wait(timeout=30)
            deadline = time.monotonic() + 15
            while rid not in rows(path):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.5)  # (a held-back answer's correction, queued after the commit)
            metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    with sqlite3.connect(path) as c:
        status, error_class, cost, waste = c.execute(
            "SELECT status, error_class, cost_usd, escalation_waste_usd FROM requests WHERE request_id = ?",
            (rid,)).fetchone()
    counted = _metric_lines(metrics, "cascade_requests_total{", "cascade_errors_total{")
    if stream:
        assert (status, error_class) == ("ok", None)
        assert counted == {'cascade_requests_total{policy="p",status="ok",tier="r"}': 1.0}, counted
    else:
        assert (status, error_class) == ("error", "LedgerTimeoutError") and waste == cost
        assert counted == {'cascade_requests_total{policy="p",status="error",tier="-"}': 1.0,
                           'cascade_errors_total{error_class="LedgerTimeoutError"}': 1.0}, counted


# --- F4: a reader who may only read ----------------------------------------------------------------------------


def test_reports_read_a_ledger_whose_directory_and_file_may_not_be_written(tmp_path, capsys):
    """The server stopped cleanly (no -wal nor -shm): SQLite would have to create the -shm to read a WAL
    database; the file and its directory immutable (chattr +i: read-only even to root), it cannot."""
    d = tmp_path / "ro"
    d.mkdir()
    path = d / "ledger.sqlite"
    make_ledger(path, 3)
    assert sorted(p.name for p in d.iterdir()) == ["ledger.sqlite"]
    if not _chattr("+i", path, d):
        _chattr("-i", path, d)
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(OSError):
            (d / "x").touch()
        rc, out, err = _cli(capsys, "report", "--json", "--ledger", str(path))
        assert rc == 0, err
        assert json.loads(out)["total"]["requests"] == 3
        rc, out, err = _cli(capsys, "shadow", "report", "--json", "--ledger", str(path))
        assert rc == 0, err
    finally:
        _chattr("-i", path, d)
    assert sorted(p.name for p in d.iterdir()) == ["ledger.sqlite"]


def test_a_read_only_reader_is_not_given_a_stale_view_when_a_wal_holds_commits(tmp_path, capsys):
    """A -wal left by a killed server holds committed rows the database file lacks: a reader who cannot create
    the -shm gets an error, not a report that leaves them out (the file is not opened as immutable then)."""
    d = tmp_path / "ro"
    d.mkdir()
    path = d / "ledger.sqlite"
    make_ledger(path, 1)
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from cascade.ledger import Ledger; "
            "from tests.test_ledger import record; led = Ledger(sys.argv[1]).open_sync(); "
            "led.execute('PRAGMA wal_autocheckpoint=0'); [led.record_sync(record(i)) for i in range(1, 4)]; "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(path), str(_REPO)], check=False, timeout=60)
    assert (d / "ledger.sqlite-wal").stat().st_size > 0
    (d / "ledger.sqlite-shm").unlink()
    files = [path, d / "ledger.sqlite-wal", d]
    if not _chattr("+i", *files):
        _chattr("-i", *files)
        pytest.skip("chattr +i is not permitted here")
    try:
        rc, out, err = _cli(capsys, "report", "--json", "--ledger", str(path))
        assert rc == 2 and out == "" and "cannot open ledger" in err, (rc, out, err)
    finally:
        _chattr("-i", *files)
    rc, out, err = _cli(capsys, "report", "--json", "--ledger", str(path))  # with the rights to recover it: all 4
    assert rc == 0 and json.loads(out)["total"]["requests"] == 4, err


def _as_nobody() -> list[str]:
    """A command prefix running as uid/gid 65534 (nobody) with only CAP_DAC_READ_SEARCH (it reads and traverses
    anything, writes nothing it does not own), or a skip where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("running a reader as uid nobody needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+dac_read_search",
              "--ambient-caps=+dac_read_search"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.geteuid())"], capture_output=True,
                           text=True, cwd=_REPO)
    if probe.returncode != 0 or probe.stdout.strip() != "65534":
        pytest.skip(f"setpriv cannot switch to uid nobody with CAP_DAC_READ_SEARCH here: {probe.stderr.strip()}")
    return prefix


@pytest.mark.parametrize("dir_mode, file_mode", [(0o755, 0o644), (0o555, 0o444)],
                         ids=["dir755-file644", "dir555-file444"])
def test_reports_read_a_ledger_as_a_user_who_may_only_read_it(tmp_path, dir_mode, file_mode):
    prefix = _as_nobody()
    d = tmp_path / "ro"
    d.mkdir()
    path = d / "ledger.sqlite"
    make_ledger(path, 3)
    os.chmod(path, file_mode)
    os.chmod(d, dir_mode)
    try:
        for argv in (["report", "--json"], ["shadow", "report", "--json"]):
            done = subprocess.run([*prefix, sys.executable, "-c", "import sys; from cascade.cli import main; "
                                   "sys.exit(main(sys.argv[1:]))", *argv, "--ledger", str(path)],
                                  capture_output=True, text=True, cwd=_REPO, timeout=120,
                                  env={**os.environ, "HOME": str(tmp_path)})
            assert done.returncode == 0, done.stderr
            if argv[0] == "report":
                assert json.loads(done.stdout)["total"]["requests"] == 3
    finally:
        os.chmod(d, 0o755)
    assert sorted(p.name for p in d.iterdir()) == ["ledger.sqlite"]


# --- the ledger file moved or deleted while open --------------------------------------------------------------


async def test_a_ledger_file_moved_replaced_or_deleted_while_open_makes_the_probe_fail(tmp_path):
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path) as ledger:
        await ledger.record(record(1))
        assert await ledger.probe() is None
        path.rename(tmp_path / "moved.sqlite")
        why = await ledger.probe()
        assert why and "moved or deleted" in why and "no file is there" in why, why
        (tmp_path / "moved.sqlite").rename(path)  # put back: the same file again
        assert await ledger.probe() is None and ledger.unavailable is None
        shutil.copy(path, tmp_path / "copy.sqlite")
        os.replace(tmp_path / "copy.sqlite", path)  # another file at the path (a restore from a backup)
        why = await ledger.probe()
        assert why and "another file is there" in why, why
        path.unlink()
        why = await ledger.probe()
        assert why and "no file is there" in why and "restart" in why


def test_ready_is_503_once_the_ledger_file_is_deleted_and_no_request_is_served_meanwhile(tmp_path):
    """Once the file is gone, /ready says so and every request is refused before any tier runs: a refusal's
    own row, written on to the deleted file, used to clear the mark, and the requests after it were served and
    billed upstream with their rows lost."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    path = tmp_path / "ledger.sqlite"
    with FaultServerThread() as upstream:
        with ServerThread(create_app(_server_config(tmp_path, path, upstream.base_url))) as srv:
            assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
            assert httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code == 200
            path.unlink()
            r = httpx.get(srv.url + "/ready", timeout=30)
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
            assert "moved or deleted" in r.json()["ledger"]
            codes = [httpx.post(srv.url + "/v1/chat/completions", json=_BODY, timeout=30).status_code
                     for _ in range(4)]
            assert codes == [503] * 4, codes
            assert upstream.stats()["requests"] == 1


def listened(ledger: Ledger) -> dict[str, BaseException | None]:
    """What the ledger's late listeners hear, by request id (None: committed)."""
    late: dict[str, BaseException | None] = {}
    ledger.late_listeners.append(lambda rec, err: late.__setitem__(rec.request_id, err))
    return late


async def hold_a_write(ledger: Ledger) -> None:
    """Submit request r1 while the database is locked elsewhere, and wait until the ledger holds it."""
    first = ledger.submit(record(1))
    first.add_done_callback(lambda f: f.exception())  # (told it timed out: retrieved)
    await until(lambda: ledger._held == 1, what="the first write held")


async def test_writes_held_when_the_ledger_closes_are_never_reported_committed(tmp_path):
    """Closing while another process holds the lock: a held write is reported committed only if its row is
    there. One that joined the held writes without a try of its own was answered "committed" (no error yet),
    and a close with max_pending reached was itself refused, leaving the connection open."""
    path = tmp_path / "l.db"
    ledger = await Ledger(path, timeout_s=0.5, max_pending=2).open()
    late = listened(ledger)
    with locked(path):
        await hold_a_write(ledger)
        await asyncio.sleep(3.0)                    # its backoff has grown to 1 s
        await until(lambda: ledger._busy_since is not None, what="a retry")
        second = ledger.submit(record(2))           # queued behind the try: max_pending reached with it
        second.add_done_callback(lambda f: f.exception())
        await ledger.close()                        # queued all the same; it gives up the held writes
        # (r2's waiter hears it, or the late listeners if its timeout came first)
        await until(lambda: "r1" in late and second.done(), what="both writes settled")
    assert ledger._conn is None and rows(path) == {}
    r2 = late.get("r2") or second.exception()
    assert isinstance(late["r1"], LedgerError) and isinstance(r2, LedgerError), (late, r2)
    assert "closed before it could be written" in str(r2) or "locked" in str(r2), r2


async def test_a_write_after_the_close_in_a_retry_round_does_not_kill_the_ledger_thread(tmp_path):
    """A request finishing during shutdown, its write queued after the close while held writes are retried:
    the ledger thread used to die on it ("ledger is not open" raised outside any handler), so the write was
    never answered and its spend hold never released."""
    crashed: list[str] = []
    old = threading.excepthook
    threading.excepthook = lambda a: crashed.append(repr(a.exc_value))
    try:
        path = tmp_path / "l.db"
        ledger = await Ledger(path, timeout_s=2.0).open()
        listened(ledger)
        with locked(path):
            await hold_a_write(ledger)
            await until(lambda: ledger._busy_since is not None, what="a retry")
            await until(lambda: ledger._busy_since is None, what="the retry over")
            ledger._enqueue(fn=time.sleep, args=(1.5,), timeout=None, what="a slow read")
            await asyncio.sleep(0.2)
            closing = asyncio.create_task(ledger.close())
            await asyncio.sleep(0)
            last = ledger.submit(record(3))
            await asyncio.wait([closing], timeout=15)
            with pytest.raises(LedgerError):
                await last
            await asyncio.sleep(2.0)  # the ledger thread reaches the last write (it died there)
        assert crashed == []
    finally:
        threading.excepthook = old
