"""Requests in flight when their server dies are not lost: the journal (table ``inflight``) and the heartbeats.

A real `cascade serve` killed with SIGKILL while a tier answers, then started again on the same SQLite file;
processes that journal requests and kill themselves, on SQLite and on a real PostgreSQL server; a process of
another machine whose heartbeat stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from cascade.cli import main
from cascade.errors import LedgerError, LedgerWriteHeldError
from cascade.ledger import INTERRUPTED, Ledger, _record_json
from cascade.types import Attempt, CascadeRecord
from tests.conftest import REPO, free_port
from tests.fault_server import FaultServerThread
from tests.pg import postgres  # noqa: F401 - fixture
from tests.test_ledger import record, target  # noqa: F401 - fixture
from tests.test_ledger_durability import locked, until
from tests.test_resilience import serve_config, serving

pytestmark = pytest.mark.timeout(120)

PRICE = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}


def _tier(name: str, fs: FaultServerThread, threshold: float) -> dict:
    return {"name": name, "backend": "openai", "model": f"model-{name}", "options": {"base_url": fs.base_url},
            "threshold": threshold, "max_tokens": 8, "timeout_s": 60, "price": PRICE}


def _rows(path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


async def _kill_while_the_last_tier_answers(tmp_path, *, journal: bool, stream: bool = False,
                                           big_fault: str = "stall:60", step: tuple | None = None) -> None:
    """`cascade serve` on a two-tier chain (the first escalates, the second stalls); a request sent;
    nothing but a client's; the server killed with SIGKILL while the second tier works on it (once its journal row shows
    both attempts, when journaling), then started again on the same ledger, until healthy. ``step``: (the
    :func:`tests.conftest.clock_step` file, seconds), the wall clock stepped while the first tier answers (in 1 s)."""
    with FaultServerThread(logprob=-2.0) as small, FaultServerThread() as big:
        big.faults(big_fault)
        if step is not None:
            small.faults("slow:1")
        cfg = serve_config(tmp_path, [_tier("small", small, 0.9), _tier("big", big, 0.0)], ["small", "big"])
        cfg["ledger"]["journal"] = journal
        ledger = tmp_path / "ledger.sqlite"
        async with serving(cfg, tmp_path) as (client, proc):
            body = {"model": "cascade", "messages": [{"role": "user", "content": "What is 17 * 23?"}],
                    "stream": stream}
            task = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            deadline = time.monotonic() + 30
            if step is not None:
                while small.stats()["requests"] < 1:
                    assert time.monotonic() < deadline and not task.done()
                    await asyncio.sleep(0.05)
                step[0].write_text(str(step[1]))
            while big.stats()["requests"] < 1:  # the second tier is working on it
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            if journal:  # its journal row is written in the background, right before the call
                while not any(len(json.loads(r[0])["attempts"]) == 2
                              for r in _rows(ledger, "SELECT record FROM inflight")):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(proc.wait, 30) == -signal.SIGKILL
            with pytest.raises(httpx.TransportError):
                await task
        assert _rows(ledger, "SELECT COUNT(*) FROM requests") == [(0,)]  # its own row was never written
        cfg["server"]["port"] = free_port()
        async with serving(cfg, tmp_path) as (_client, proc):  # the next: healthy once it has recorded it
            proc.send_signal(signal.SIGTERM)  # stopped cleanly, it leaves no heartbeat row behind
            assert await asyncio.to_thread(proc.wait, 30) in (0, -signal.SIGTERM)


async def test_a_request_in_flight_when_its_server_is_killed_is_recorded_by_the_next_server(tmp_path, capsys):
    await _kill_while_the_last_tier_answers(tmp_path, journal=True)
    ledger = tmp_path / "ledger.sqlite"
    (rid, status, error_class, n, cost, waste, prompt, tier, policy), = _rows(
        ledger, "SELECT request_id, status, error_class, n_attempts, cost_usd, escalation_waste_usd, prompt_tokens, "
        "tier, policy FROM requests")
    assert (status, error_class, n, tier, policy) == ("error", INTERRUPTED, 2, None, "cascade")
    attempts = _rows(ledger, "SELECT idx, tier, decision, error_class, kept, prompt_tokens, completion_tokens, "
                     "cost_usd FROM attempts WHERE request_id = ? ORDER BY idx", rid)
    # the first tier's answer, as it came (paid for, thrown away); the second's call, billed its estimated prompt
    (i0, t0, d0, e0, k0, p0, c0, cost0), (i1, t1, d1, e1, k1, p1, c1, cost1) = attempts
    assert (i0, t0, d0, e0, k0) == (0, "small", "escalate", None, 0) and p0 > 0 and c0 > 0
    assert cost0 == pytest.approx((p0 * PRICE["input_per_1m"] + c0 * PRICE["output_per_1m"]) / 1e6)
    assert (i1, t1, d1, e1, k1, c1) == (1, "big", "error", INTERRUPTED, 0, 0) and p1 > 0
    assert cost1 == pytest.approx(p1 * PRICE["input_per_1m"] / 1e6)
    assert cost == waste == pytest.approx(cost0 + cost1) and prompt == p0 + p1
    assert _rows(ledger, "SELECT COUNT(*) FROM inflight") == [(0,)]
    assert _rows(ledger, "SELECT COUNT(*) FROM instances") == [(0,)]  # the dead one forgotten, the live one closed
    assert main(["report", "--json", "--ledger", str(ledger)]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert (total["requests"], total["errors"], total["interrupted"], total["answered"]) == (1, 1, 1, 0)
    assert total["spend_usd"] == pytest.approx(cost)
    assert main(["report", "--ledger", str(ledger)]) == 0
    assert "1 failed or refused (1 interrupted: their server stopped)" in capsys.readouterr().out


@pytest.mark.parametrize("big_fault", ["stall:60", "slow:0:1.5"], ids=["before-its-first-token", "mid-stream"])
async def test_a_stream_in_flight_when_its_server_is_killed_is_recorded_too(tmp_path, big_fault):
    """Killed before the live tier's first token, or while its tokens flow (one every 1.5 s): the live call is
    an interrupted error billed its prompt, nothing served (it was once recorded as the kept answer, at $0)."""
    await _kill_while_the_last_tier_answers(tmp_path, journal=True, stream=True, big_fault=big_fault)
    ledger = tmp_path / "ledger.sqlite"
    rows = _rows(ledger, "SELECT endpoint, error_class, n_attempts, tier, escalated FROM requests")
    assert rows == [("chat", INTERRUPTED, 2, None, 0)]
    (tier, decision, kept, prompt, cost), = _rows(ledger, "SELECT tier, decision, kept, prompt_tokens, cost_usd "
                                                  "FROM attempts WHERE idx = 1")
    assert (tier, decision, kept) == ("big", "error", 0) and prompt > 0 and cost == pytest.approx(prompt * 1000.0 / 1e6)


async def test_a_step_of_the_wall_clock_is_no_latency_of_a_killed_servers_request(tmp_path, monkeypatch):
    """The interrupted row's latency was the wall clock's since the request began: a step of an hour forward (NTP)
    while its first tier answered recorded 3,600 s for a request that ran a second or two. It is now counted on
    the monotonic clock, as an answered request's is."""
    from tests.conftest import clock_step

    step_env, jump = clock_step(tmp_path)
    for name, value in step_env.items():  # (for the servers started: this process has loaded its libraries)
        monkeypatch.setenv(name, value)
    await _kill_while_the_last_tier_answers(tmp_path, journal=True, step=(jump, 3600))
    (error_class, latency_ms), = _rows(tmp_path / "ledger.sqlite", "SELECT error_class, latency_ms FROM requests")
    assert error_class == INTERRUPTED and 1000 <= latency_ms < 60_000, latency_ms


async def test_without_the_journal_a_killed_servers_request_is_lost(tmp_path):
    await _kill_while_the_last_tier_answers(tmp_path, journal=False)
    ledger = tmp_path / "ledger.sqlite"
    assert _rows(ledger, "SELECT COUNT(*) FROM requests") == [(0,)]
    assert _rows(ledger, "SELECT COUNT(*) FROM inflight") == [(0,)]


async def test_answered_requests_leave_no_journal_rows(tmp_path):
    with FaultServerThread(logprob=-2.0) as small, FaultServerThread() as big:
        cfg = serve_config(tmp_path, [_tier("small", small, 0.9), _tier("big", big, 0.0)], ["small", "big"])
        async with serving(cfg, tmp_path) as (client, _proc):
            for stream in (False, True, False):
                body = {"model": "cascade", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
            ledger = tmp_path / "ledger.sqlite"
            assert _rows(ledger, "SELECT COUNT(*), SUM(n_attempts) FROM requests WHERE status = 'ok'") == [(3, 6)]
            assert _rows(ledger, "SELECT COUNT(*) FROM inflight") == [(0,)]
            (host, beat), = _rows(ledger, "SELECT host, heartbeat_at FROM instances")  # the server's own
            assert abs(beat - time.time()) < 60


async def test_a_record_that_cannot_be_journaled_keeps_no_other_out(tmp_path):
    """The records due together are written in one transaction: one that cannot be made JSON (the Python API
    once let a set through as metadata) used to drop the whole batch, so a good request beside it would be lost
    should the process die. Now only that one is left out, with a warning."""
    led = await Ledger(tmp_path / "ledger.sqlite").open()
    try:
        def bad() -> CascadeRecord:
            rec = in_flight(1)
            rec.metadata = {"k": {1, 2}}  # type: ignore[dict-item]
            return rec

        led.journal("dead-0", lambda: in_flight(0))
        led.journal("dead-1", bad)
        await asyncio.sleep(led.journal_delay_s + 0.2)
        await led._call(lambda: None)
        assert _rows(tmp_path / "ledger.sqlite", "SELECT request_id FROM inflight") == [("dead-0",)]
    finally:
        await led.close()


# --- processes that die with requests journaled ----------------------------------------------------------

_DIE = """
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[2])
from cascade.ledger import Ledger
from tests.test_ledger_journal import in_flight

async def run():
    led = await Ledger(sys.argv[1]).open()
    for i in range(int(sys.argv[3])):
        led.journal(f"dead-{i}", lambda i=i: in_flight(i))
    await asyncio.sleep(led.journal_delay_s + 0.2)  # the journal's write is due, and queued ...
    await led._call(lambda: None)  # ... and committed once this is answered
    print("journaled", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(run())
"""


def in_flight(i: int) -> CascadeRecord:
    """A request as the engine journals it while its second tier answers: the first tier's answer thrown away,
    the second's call an error ``Interrupted``."""
    rec = record(i)
    rec.request_id = f"dead-{i}"
    rec.status, rec.error_class, rec.error_message = "error", INTERRUPTED, "the server stopped"
    rec.tier = rec.model = rec.confidence = None
    rec.escalated, rec.escalation_waste_usd = False, rec.cost_usd
    rec.attempts[1] = Attempt(index=1, tier="large", model="m", backend="openai", prompt_tokens=12,
                              cost_usd=rec.cost_usd * 0.8, decision="error", reason="interrupted",
                              error_class=INTERRUPTED, error_message="interrupted")
    return rec


def _die_with(target: str, n: int) -> None:
    """A process that opens the ledger, journals ``n`` requests in flight and is killed (SIGKILL)."""
    out = subprocess.run([sys.executable, "-c", _DIE, target, str(REPO), str(n)], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == -signal.SIGKILL and "journaled" in out.stdout, out.stderr


async def test_processes_opening_the_ledger_at_once_record_a_dead_ones_requests_once(target):
    _die_with(target, 5)
    ledgers = [Ledger(target) for _ in range(4)]
    await asyncio.gather(*(led.open() for led in ledgers))
    try:
        rows = await ledgers[0].query("SELECT request_id, status, error_class, n_attempts, cost_usd FROM requests "
                                      "ORDER BY request_id")
        assert [r[0] for r in rows] == [f"dead-{i}" for i in range(5)]
        assert all(r[1:4] == ("error", INTERRUPTED, 2) and r[4] == pytest.approx(1e-4) for r in rows), rows
        assert (await ledgers[0].query("SELECT COUNT(*) FROM attempts"))[0][0] == 10
        assert (await ledgers[0].query("SELECT COUNT(*) FROM inflight"))[0][0] == 0
        assert (await ledgers[0].query("SELECT COUNT(*) FROM instances"))[0][0] == 4  # the four open ones
        _die_with(target, 6)  # requests recorded already are not journaled again: only the new one
        assert await ledgers[0].query("SELECT request_id FROM inflight") == [("dead-5",)]
    finally:
        await asyncio.gather(*(led.close() for led in ledgers))
    async with Ledger(target) as led:
        assert (await led.query("SELECT COUNT(*) FROM requests"))[0][0] == 6
        assert (await led.query("SELECT COUNT(*) FROM instances"))[0][0] == 1


async def test_another_machines_process_is_dead_once_its_heartbeat_stops(target):
    """A process elsewhere (its pid means nothing here) is dead once this process has seen its heartbeat unchanged
    for ``stale_s`` of its own clock (the other's clock, here 5 minutes ahead, does not matter), while one that
    goes on beating is alive whatever its heartbeat says."""
    now = time.time()
    async with Ledger(target) as setup:
        await setup.query("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", ("elsewhere:1:a", "another host", 1,
                                                                          now - 600, now + 300))
        for i in (0, 1):
            await setup.query("INSERT INTO inflight VALUES (?, ?, ?, ?, ?)",
                              (f"dead-{i}", "elsewhere:1:a", now, now, _record_json(in_flight(i), False)))
    async with Ledger(target, heartbeat_s=0.1, journal_delay_s=0.0) as live:
        live.journal("dead-2", lambda: in_flight(2))
        async with Ledger(target, heartbeat_s=0.1, stale_s=1.0) as led:
            await asyncio.sleep(0.3)  # seen unchanged, but not yet for stale_s: nobody counted dead
            assert (await led.query("SELECT COUNT(*) FROM requests"))[0][0] == 0
            deadline = time.monotonic() + 10
            while (await led.query("SELECT COUNT(*) FROM requests"))[0][0] < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)
            rows = await led.query("SELECT request_id, error_message FROM requests ORDER BY request_id")
            assert [r[0] for r in rows] == ["dead-0", "dead-1"]  # the live one's request stays in flight
            assert all("has written no heartbeat for 1 s" in r[1] for r in rows), rows
            assert await led.query("SELECT request_id FROM inflight") == [("dead-2",)]
            assert "elsewhere:1:a" not in {r[0] for r in await led.query("SELECT instance FROM instances")}


async def test_a_request_whose_own_write_was_held_lands_itself_and_takes_its_journal_row(tmp_path):
    """The ledger file moved away: the request's own write is refused and held, its journal row kept (the
    request is not in flight, nor lost); once the file is back the held write commits, as the failure its
    caller was told of, with all its attempts, and the journal row goes with it."""
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path, heartbeat_s=0.1) as led:
        led.journal("dead-0", lambda: in_flight(0))
        await asyncio.sleep(led.journal_delay_s + 0.2)
        await led._call(lambda: None)  # after the journal's write
        path.rename(tmp_path / "away.sqlite")  # the ledger file moved: the request's own write is refused
        final = record(0)
        final.request_id = "dead-0"
        with pytest.raises(LedgerWriteHeldError, match="moved or deleted"):
            await led.record(final)
        await asyncio.sleep(0.3)  # heartbeats meanwhile write nothing (to the file no longer at the path)
        (tmp_path / "away.sqlite").rename(path)
        row = await _until_recorded(led, "dead-0")
        assert (row["status"], row["error_class"], row["n_attempts"]) == ("error", "LedgerWriteHeldError", 2)
        assert row["cost_usd"] == final.cost_usd and "held and tried again" in row["error_message"]
        assert await led.query("SELECT COUNT(*) FROM inflight") == [(0,)]


async def test_a_request_whose_own_write_failed_is_recorded_from_the_journal_once_the_ledger_is_back(tmp_path):
    """A write refused for good (``max_pending`` writes were waiting, held for a lock another process kept): the
    request's journal row is recorded at the next heartbeat after the lock goes, not left in the journal."""
    path = tmp_path / "ledger.sqlite"
    async with Ledger(path, heartbeat_s=0.1, timeout_s=0.5, max_pending=1) as led:
        led.journal("dead-0", lambda: in_flight(0))
        await asyncio.sleep(led.journal_delay_s + 0.2)
        await led._call(lambda: None)  # after the journal's write
        with locked(path):
            first = led.submit(record(1))  # held for the lock: max_pending reached
            first.add_done_callback(lambda f: f.exception())
            await until(lambda: led._held == 1, what="the first write held")
            final = record(0)
            final.request_id = "dead-0"
            with pytest.raises(LedgerError, match="1 writes are waiting for the ledger already"):
                await led.record(final)
        row = await _until_recorded(led, "dead-0")
        assert (row["status"], row["error_class"], row["n_attempts"]) == ("error", INTERRUPTED, 2)
        assert "its own write failed" in row["error_message"]
        assert await led.query("SELECT COUNT(*) FROM inflight") == [(0,)]
        assert (await _until_recorded(led, "r1"))["error_class"] == "LedgerTimeoutError"  # held: as its waiter was told


async def _until_recorded(led: Ledger, request_id: str) -> dict:
    """The ledger's row of ``request_id``, once there (a read refused meanwhile, max_pending reached, is retried)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            if (row := await led.get(request_id)) is not None:
                return row
        except LedgerError:
            pass
        assert time.monotonic() < deadline, f"{request_id} was not recorded"
        await asyncio.sleep(0.05)


async def test_a_process_taken_for_dead_that_finishes_its_request_replaces_the_interrupted_row(target):
    """A process whose heartbeats stopped for stale_s (suspended, or its database out for it alone) is taken for
    dead and its request recorded as interrupted; when it comes back and finishes the request, its own row
    replaces that one (it used to be refused as a duplicate, and its client got a 500 for an answer it had)."""
    async with Ledger(target, journal_delay_s=0.0) as slow:
        slow.journal("dead-0", lambda: in_flight(0))
        deadline = time.monotonic() + 10
        while await slow.query("SELECT request_id FROM inflight") != [("dead-0",)]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with Ledger(target, heartbeat_s=0.1, stale_s=0.5) as peer:  # slow's heartbeat (every 15 s) is stale
            while (row := await peer.get("dead-0")) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert row["error_class"] == INTERRUPTED and "written no heartbeat" in row["error_message"]
        final = record(0)
        final.request_id = "dead-0"
        await slow.record(final)  # it finished after all
        row = await slow.get("dead-0")
        assert (row["status"], row["error_class"], row["tier"], row["cost_usd"]) == ("ok", None, "large", 1e-4)
        assert [a["decision"] for a in row["attempts"]] == ["escalate", "final"]
        assert (await slow.query("SELECT COUNT(*) FROM attempts"))[0][0] == 2
