"""`cascade ledger prune`: the requests of days past deleted with every row that references them, on a real SQLite
file and a real PostgreSQL server, while a real server writes to the same ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from cascade.ledger import PRUNED_TABLES, Ledger, utc_day_start
from cascade.types import Attempt
from tests.pg import postgres  # noqa: F401 - fixture
from tests.test_cli_errors import cli, one_error
from tests.test_ledger import record
from tests.test_ledger import target  # noqa: F401 - fixture

DAY = 86400.0
TABLES = (*PRUNED_TABLES, "spend_daily")


def counts(ledger: Ledger) -> dict[str, int]:
    return {t: ledger.execute(f"SELECT COUNT(*) FROM {t}")[0][0] for t in (*TABLES, "inflight", "instances",
                                                                            "spend_holds", "meta")}


def aged_ledger(target: str, ages: dict[int, int]) -> float:
    """A ledger holding, per age in days, that many requests created that many UTC days ago, the first at that
    day's 00:00 UTC exactly (a cut at that instant keeps it: prune deletes what was created before it), each with
    two attempts and a shadow decision (the 1st, 4th, 7th... of a day with feedback, the 1st, 6th... with a
    sampled shadow's call), and rows of the tables prune leaves alone, old ones included. Returns today's 00:00
    UTC."""
    today = utc_day_start()
    ledger = Ledger(target).open_sync()
    try:
        items = []
        for age, n in ages.items():
            for i in range(n):
                rec = record(i)
                rec.request_id, rec.created_at = f"a{age}-{i}", today - age * DAY + i
                rec.end_user = "u1" if i % 2 else None
                items.append((rec, [{"shadow": "lenient", "status": "known", "tier": "small", "reason": "r"}]))
        ledger._write(items)
        for rec, _ in items:
            if int(rec.request_id.split("-")[1]) % 3 == 0:
                ledger._feedback_sync(rec.request_id, 1, None)
        for rec, _ in items:
            if int(rec.request_id.split("-")[1]) % 5:
                continue
            ledger._shadow_sample_sync(rec.request_id, rec.created_at, {"shadow": "lenient", "status": "known",
                                       "reason": "sampled", "sampled": True},
                                       [Attempt(index=0, tier="small", model="s", backend="b", cost_usd=1e-5)],
                                       [rec.created_at])
        old = today - 9 * DAY
        ledger.execute("INSERT INTO spend_holds (hold_id, bucket, instance, amount_usd, created_at) "
                       "VALUES ('h', '[\"key\", \"k1\"]', 'gone:1:x', 1.0, ?)", (old,))
        ledger.execute("INSERT INTO inflight (request_id, instance, created_at, updated_at, record) "
                       "VALUES ('f', 'gone:1:x', ?, ?, '{}')", (old, old))
        ledger.execute("INSERT INTO instances (instance, host, pid, started_at, heartbeat_at) "
                       "VALUES ('gone:1:x', 'h', 1, ?, ?)", (old, old))
    finally:
        ledger.close_sync()
    return today


def test_prune_deletes_the_days_before_the_cut_and_every_row_of_their_requests(target, capsys):
    """Requests of 0 to 5 days ago, pruned before 3 days ago in batches of 7: the dry run counts exactly what
    the prune then deletes, the requests of the cut's day and after are all there with their rows, nothing
    references a deleted request, the days' spend totals before the cut go, and the tables of the processes
    serving now are left alone. `cascade report` then counts the requests kept, and a second prune finds none."""
    today = aged_ledger(target, {0: 4, 1: 5, 2: 6, 3: 7, 4: 8, 5: 9})
    cut = today - 3 * DAY
    ledger = Ledger(target).open_existing_sync()
    try:
        before = counts(ledger)
        old = [r[0] for r in ledger.execute("SELECT request_id FROM requests WHERE created_at < ?", (cut,))]
        assert len(old) == 8 + 9
        # days 4 and 5 (8 and 9 requests): feedback on 3 + 3, shadow calls of 2 + 2
        expect = {"requests": 17, "attempts": 34, "feedback": 6, "shadow_decisions": 17, "shadow_attempts": 4}
        assert ledger.prune_sync(cut, dry_run=True)["requests"] == 17
        would = ledger.prune_sync(cut, dry_run=True)
        assert counts(ledger) == before  # (nothing written)
        done = ledger.prune_sync(cut, batch=7)
        after = counts(ledger)
        assert done == would
        assert {k: done[k] for k in expect} == expect
        assert done["spend_daily"] == before["spend_daily"] - after["spend_daily"] > 0
        assert after == {t: before[t] - done.get(t, 0) for t in before}
        assert after["requests"] == 4 + 5 + 6 + 7
        for t in ("inflight", "instances", "spend_holds", "meta"):
            assert after[t] == before[t] > 0
        for t in PRUNED_TABLES[1:]:  # nothing left that references a request no longer there
            assert ledger.execute(f"SELECT COUNT(*) FROM {t} WHERE request_id NOT IN (SELECT request_id FROM "
                                  "requests)") == [(0,)]
        assert ledger.execute("SELECT MIN(day) FROM spend_daily")[0][0] == int(cut // DAY)
        assert ledger.prune_sync(cut) == dict.fromkeys(TABLES, 0)
    finally:
        ledger.close_sync()
    r = cli(capsys, "report", "--json", "--ledger", target)
    assert r.returncode == 0 and json.loads(r.stdout)["total"]["requests"] == 22


def test_the_command_prints_what_it_deletes_and_refuses_in_one_line(tmp_path, capsys):
    """`cascade ledger prune`: its counts (text and JSON), the latest cut it takes (yesterday: today's and
    yesterday's rows stay), and each refusal, one line and exit status 2, nothing deleted or created."""
    path = tmp_path / "ledger.sqlite"
    today = aged_ledger(str(path), {0: 2, 1: 2, 2: 3, 4: 5})
    day = time.strftime("%Y-%m-%d", time.gmtime(today - 2 * DAY))
    r = cli(capsys, "ledger", "prune", "--ledger", str(path), "--before", day, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] and out["before"] == day and out["rows"]["requests"] == 5
    r = cli(capsys, "ledger", "prune", "--ledger", str(path), "--older-than-days", "2")
    assert r.returncode == 0, r.stderr
    assert f"deleted from ledger {path}: the requests created before {day} 00:00 UTC" in r.stdout
    assert "  requests          5\n  attempts          10\n" in r.stdout and "VACUUM" in r.stdout
    r = cli(capsys, "ledger", "prune", "--ledger", str(path), "--older-than-days", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"]["requests"] == 3  # the day before yesterday's

    today_s, tomorrow = (time.strftime("%Y-%m-%d", time.gmtime(today + d * DAY)) for d in (0, 1))
    for argv, needle in [
        (["--before", tomorrow], f"--before {tomorrow}: in the future"),
        (["--older-than-days", "-1"], "in the future"),
        (["--before", today_s], f"--before {today_s}: within the last 2 UTC days"),
        (["--older-than-days", "0"], f"--older-than-days 0 (before {today_s}): within the last 2 UTC days"),
        (["--before", "2026-02-30"], "--before 2026-02-30: not a date (YYYY-MM-DD"),
        (["--before", "20260101"], "--before 20260101: not a date"),
        (["--older-than-days", "2d"], "argument --older-than-days: invalid int value"),
        ([], "one of the arguments --before --older-than-days is required"),
    ]:
        one_error(cli(capsys, "ledger", "prune", "--ledger", str(path), *argv), needle)
    one_error(cli(capsys, "ledger", "prune", "--ledger", str(tmp_path / "none.sqlite"), "--before", "2026-01-01"),
              "no ledger at")
    assert not (tmp_path / "none.sqlite").exists()
    one_error(cli(capsys, "ledger", "prune", "--ledger", " ", "--before", "2026-01-01"), "--ledger: empty path")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE notes (x)")
    one_error(cli(capsys, "ledger", "prune", "--ledger", str(other), "--before", "2026-01-01"),
              "is not a cascade ledger")
    for version, needle in [("7", "has schema version 7, not this cascade-engine's (8)"),
                            ("99", "newer than this cascade-engine reads")]:
        with sqlite3.connect(path) as c:
            c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        one_error(cli(capsys, "ledger", "prune", "--ledger", str(path), "--before", "2026-01-01"), needle)
    with sqlite3.connect(path) as c:  # today's and yesterday's, as they were
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT CAST(created_at / 86400 AS INTEGER)) FROM requests"
                         ).fetchone() == (4, 2)


def test_prune_while_a_server_writes_to_the_same_ledger(target, tmp_path):
    """`cascade ledger prune`, its own process, deletes 30,000 requests of days past while a real server answers
    requests on the same ledger, its writes waiting at most 0.5 s for a lock: every request answered (in batches,
    the prune never held the ledger that long), every one of their rows there, the old ones all gone, the count
    exact."""
    import httpx

    from serving import create_app
    from tests.conftest import ServerThread, make_config
    from tests.fault_server import FaultServerThread

    today, ledger = utc_day_start(), Ledger(target).open_sync()
    try:  # in one transaction, the whole of it would hold SQLite's write lock for about 1 s on a 2-core machine
        old = [(record(i), []) for i in range(30000)]
        for rec, _ in old:
            rec.created_at = today - 5 * DAY + rec.created_at % DAY
        ledger._write(old)
    finally:
        ledger.close_sync()
    body = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}
    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                      "options": {"base_url": upstream.base_url}}],
                          {"p": {"chain": ["r"]}}, ledger={"path": target, "timeout_s": 0.5})
        with ServerThread(create_app(cfg)) as srv:
            answered: list[tuple[int, str]] = []
            stop = threading.Event()

            def send() -> None:
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        r = client.post(srv.url + "/v1/chat/completions", json=body)
                        answered.append((r.status_code, r.headers.get("x-request-id", "")))

            senders = [threading.Thread(target=send) for _ in range(2)]
            for t in senders:
                t.start()
            try:
                pruned = subprocess.run([sys.executable, "-m", "cascade.cli", "ledger", "prune", "--ledger", target,
                                         "--older-than-days", "2", "--json"], capture_output=True, text=True,
                                        timeout=120, env={**os.environ, "CASCADE_CONFIG": ""})
                during = len(answered)
            finally:
                stop.set()
                for t in senders:
                    t.join(timeout=60)
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["rows"]["requests"] == 30000
    assert during > 0 and {s for s, _ in answered} == {200}, answered[:5]
    ledger = Ledger(target).open_existing_sync()
    try:
        ids = {r[0] for r in ledger.execute("SELECT request_id FROM requests")}
    finally:
        ledger.close_sync()
    assert ids == {rid for _, rid in answered}


def test_a_number_of_days_beyond_the_calendar_is_one_line(tmp_path, capsys):
    """`--older-than-days` so large (or so negative) that its day is before year 1 or after 9999, or beyond any
    float, is refused in one line as `--since` is, not a traceback; nothing is created."""
    path = tmp_path / "ledger.sqlite"
    for n in ("800000", "-3000000", "99999999999999999999", "9" * 400):
        one_error(cli(capsys, "ledger", "prune", "--ledger", str(path), "--older-than-days", n, "--dry-run"),
                  f"--older-than-days {n}: out of range (dates run from year 1 to 9999)")
    assert list(tmp_path.iterdir()) == []
    r = cli(capsys, "ledger", "prune", "--ledger", str(path), "--older-than-days", "700000")  # year 0110: a day
    one_error(r, "no ledger at")
