"""The ledger on a real SQLite file and on a real PostgreSQL server, through the same code."""

import asyncio
import re
import sqlite3
import time
from pathlib import Path

import pytest

from cascade.errors import LedgerError, LedgerTimeoutError, NotFoundError
from cascade.ledger import _ADDED_COLUMNS, INTERRUPTED, SCHEMA_VERSION, Ledger, daily_spend, utc_day_start
from cascade.types import Attempt, CascadeRecord
from tests.pg import postgres  # noqa: F401 - fixture


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    pg = request.getfixturevalue("postgres")
    pg.reset()
    return pg.url


def record(i: int, key: str = "k1", cost: float = 1e-4) -> CascadeRecord:
    rec = CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=1_000_000.0 + i, api_key_id=key,
                        tier="large", model="m", confidence=0.9, escalated=True, cost_usd=cost,
                        baseline_cost_usd=cost * 0.8, escalation_waste_usd=cost * 0.2, latency_ms=12.5)
    rec.attempts = [Attempt(index=0, tier="small", model="s", backend="transformers", cost_usd=cost * 0.2,
                            decision="escalate", reason="low", features={"mean_logprob": -1.0}),
                    Attempt(index=1, tier="large", model="m", backend="openai", cost_usd=cost * 0.8,
                            decision="final", reason="last", kept=True)]
    return rec


def make_ledger(target: str | Path, n: int) -> None:
    """A ledger at ``target`` holding ``n`` requests (``record(0)`` ...), written and closed."""
    ledger = Ledger(target).open_sync()
    try:
        for i in range(n):
            ledger.record_sync(record(i))
    finally:
        ledger.close_sync()


async def test_feedback_on_a_request_deleted_meanwhile_is_not_found_not_a_ledger_error(tmp_path):
    """A request deleted between feedback's lookup and its insert (`cascade ledger prune` running) is as missing as
    one never there: a NotFoundError (404), not the foreign key's refusal as a LedgerError (500). A trigger deletes
    it at the insert, as a prune's batch committing just then would (the failed statement takes its deletes back)."""
    path = tmp_path / "ledger.sqlite"
    make_ledger(path, 2)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER pruned BEFORE INSERT ON feedback BEGIN "
                   "DELETE FROM attempts WHERE request_id = NEW.request_id; "
                   "DELETE FROM requests WHERE request_id = NEW.request_id; END")
    async with Ledger(path) as ledger:
        with pytest.raises(NotFoundError, match="'r1'"):
            await ledger.add_feedback("r1", 1)
        assert (await ledger.query("SELECT COUNT(*) FROM feedback"))[0][0] == 0


async def test_round_trip_feedback_spend_and_shadows(target):
    async with Ledger(target) as ledger:
        await asyncio.gather(*(ledger.record(record(i)) for i in range(20)))
        await ledger.record(record(99, key="k2"), shadows=[
            {"shadow": "strict", "status": "known", "tier": "small", "escalated": False, "cost_usd": 2e-5,
             "diverges": True, "reason": "would keep"}])
        row = await ledger.get("r3")
        assert row["tier"] == "large" and row["escalated"] == 1 and len(row["attempts"]) == 2
        assert row["n_attempts"] == 2  # (the shadow report's prompt-length groups divide by it)
        assert row["attempts"][0]["decision"] == "escalate" and row["attempts"][1]["kept"] == 1
        fid = await ledger.add_feedback("r3", 1, "thanks")
        assert fid >= 1 and (await ledger.get("r3"))["feedback"][0]["comment"] == "thanks"
        with pytest.raises(NotFoundError):
            await ledger.add_feedback("missing", -1)
        day = utc_day_start(1_000_000.0)
        assert await daily_spend(ledger, day, [("key", "k1"), ("key", "k2")]) == [
            (pytest.approx(20 * 1e-4), 0.0, 0), (pytest.approx(1e-4), 0.0, 0)]
        assert (await ledger.query("SELECT COUNT(*) FROM attempts"))[0][0] == 42
        assert (await ledger.query("SELECT shadow, diverges FROM shadow_decisions")) == [("strict", 1)]
        with pytest.raises(LedgerError, match="r3"):  # a duplicate request id is refused, nothing half-written
            await ledger.record(record(3))
        assert (await ledger.query("SELECT COUNT(*) FROM attempts WHERE request_id='r3'"))[0][0] == 2
    # reopening keeps everything (and the schema creation is idempotent)
    async with Ledger(target) as again:
        assert (await again.query("SELECT COUNT(*) FROM requests"))[0][0] == 21


async def test_group_commit_fails_only_the_bad_record(target):
    """Writes queued together are committed in one transaction; one that fails (a duplicate id) is refused
    alone, every other one lands, and a write whose caller stopped waiting still lands."""
    async with Ledger(target) as ledger:
        await ledger.record(record(5))
        futs = [ledger.submit(record(i)) for i in range(10)]  # queued back to back: written as a group
        results = await asyncio.gather(*futs, return_exceptions=True)
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert len(failed) == 1 and failed[0][0] == 5
        assert isinstance(failed[0][1], LedgerError) and "r5" in str(failed[0][1])
        assert (await ledger.query("SELECT COUNT(*) FROM requests"))[0][0] == 10
        assert (await ledger.query("SELECT COUNT(*) FROM attempts"))[0][0] == 20
        abandoned = asyncio.ensure_future(ledger.record(record(50)))
        await asyncio.sleep(0)  # queued
        abandoned.cancel()
        await ledger.query("SELECT 1")  # runs after the queued write on the ledger thread
        assert (await ledger.query("SELECT COUNT(*) FROM requests WHERE request_id='r50'"))[0][0] == 1


def test_bad_target_is_a_clear_error(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger(tmp_path / "dir.sqlite").open_sync()
    with pytest.raises(LedgerError, match=r"cannot open ledger postgresql://u:\*\*\*@127.0.0.1:1/db") as err:
        Ledger("postgresql://u:secret@127.0.0.1:1/db").open_sync()
    assert "\n" not in str(err.value) and "\n" not in err.value.message  # libpq's two lines made one


async def ledger_with_schema_version(target: str, version: str) -> None:
    """A ledger at ``target`` with one request, its meta table then made to say ``version``."""
    async with Ledger(target) as ledger:
        await ledger.record(record(1))
    ledger = Ledger(target).open_sync()
    ledger.execute("UPDATE meta SET value = ? WHERE key = ?", (version, "schema_version"))
    ledger.close_sync()


async def test_a_ledger_of_a_newer_schema_is_refused_by_the_writers_too(target):
    """The reports refused a ledger written by a newer version; the server (and `cascade ask`) wrote into it.
    Now opening it for writing is refused too, in one line."""
    await ledger_with_schema_version(target, "99")
    for opening in (lambda: Ledger(target).open(), lambda: asyncio.to_thread(Ledger(target).open_sync)):
        newer = rf"has schema version 99, newer than this cascade-engine writes \({SCHEMA_VERSION}\)"
        with pytest.raises(LedgerError, match=newer):
            await opening()
    with pytest.raises(LedgerError, match="newer than this cascade-engine reads"):
        Ledger(target).open_existing_sync()


async def test_a_schema_version_that_is_no_number_is_refused(target):
    """A meta table edited by hand ("8a", "", "eight"): which columns the ledger has is anyone's guess. It was
    read as current by the reports and written into by the server as it was; now both refuse it in one line."""
    await ledger_with_schema_version(target, "8a")
    for opening in (lambda: Ledger(target).open(), lambda: asyncio.to_thread(Ledger(target).open_existing_sync)):
        with pytest.raises(LedgerError, match="has schema version '8a', which is no version number"):
            await opening()


def test_an_sqlite_file_of_another_program_is_not_made_a_ledger(tmp_path):
    """Pointed at another program's SQLite database, the ledger refuses to add its tables beside theirs
    (the reports already called it "not a cascade ledger"); an empty file is a new ledger."""
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY AUTOINCREMENT, total REAL)")
        c.execute("INSERT INTO invoices(total) VALUES (9.5)")
    with pytest.raises(LedgerError, match=r"app.db is not a cascade ledger \(it holds other tables: invoices\)"):
        Ledger(other).open_sync()
    with sqlite3.connect(other) as c:
        assert {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
            "invoices", "sqlite_sequence"}
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    Ledger(empty).open_sync().close_sync()
    with sqlite3.connect(empty) as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


@pytest.mark.parametrize("content", [b"x", b"ab", b"not a database, 24 bytes"])
def test_a_file_that_is_not_sqlite_is_refused_and_left_as_it_was(tmp_path, content):
    """SQLite reads a file of one byte (``printf x > ledger.db``) as an empty database, so the ledger was made
    over it, the byte gone; a longer one it refuses itself. Any such file is now refused in SQLite's words,
    before SQLite opens it, and left as it was."""
    path = tmp_path / "x.db"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=rf"^cannot open ledger {re.escape(str(path))}: file is not a database$"):
        Ledger(path).open_sync()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def _shadow_call(i: int, cost: float) -> Attempt:
    return Attempt(index=i, tier="large", model="m", backend="openai", prompt_tokens=40, completion_tokens=8,
                   cost_usd=cost, decision="final", reason="last", features={"n_tokens": 8.0}, text="Paris")


async def test_old_ledger_is_migrated_and_shadow_samples_are_idempotent(target):
    """A ledger from before sampled shadows (no shadow_attempts, no sampled columns) opens and is migrated in
    place; writing a sampled shadow's outcome twice leaves one copy of it, its spend counted once."""
    async with Ledger(target) as ledger:  # make it, then take it back to schema version 2
        await ledger.record(record(1), shadows=[{"shadow": "strict", "status": "unknown", "reason": "needs large"}])
        for sql in ("DROP TABLE shadow_attempts", "ALTER TABLE shadow_decisions DROP COLUMN sampled",
                    "ALTER TABLE shadow_decisions DROP COLUMN sample_cost_usd",
                    "ALTER TABLE requests DROP COLUMN cached_from", "DROP INDEX requests_end_user_created",
                    "ALTER TABLE requests DROP COLUMN end_user",
                    "ALTER TABLE requests DROP COLUMN metadata",
                    "UPDATE meta SET value = '2' WHERE key = 'schema_version'"):
            await ledger.query(sql)
    async with Ledger(target) as ledger:
        assert (await ledger.query("SELECT value FROM meta WHERE key = 'schema_version'")) == [(str(SCHEMA_VERSION),)]
        assert (await ledger.query("SELECT request_id, cached_from, end_user, metadata FROM requests")) == [
            ("r1", None, None, None)]
        await ledger.record(record(2))  # rows go on being written into the migrated table
        assert (await ledger.query("SELECT status, sampled, sample_cost_usd FROM shadow_decisions")) == \
            [("unknown", None, None)]  # the old row, untouched
        decision = {"shadow": "strict", "status": "known", "tier": "large", "escalated": True, "cost_usd": 3e-4,
                    "diverges": False, "reason": "large: sampled", "sampled": True, "sample_cost_usd": 2e-4}
        for _ in range(2):
            await ledger.record_shadow_sample("r1", 1_000_001.0, decision, [_shadow_call(0, 2e-4)], [1_000_002.0])
        assert (await ledger.query("SELECT status, tier, sampled, sample_cost_usd, created_at FROM shadow_decisions")) \
            == [("known", "large", 1, 2e-4, 1_000_001.0)]
        assert (await ledger.query("SELECT idx, tier, cost_usd, created_at, answer_sig IS NOT NULL, text "
                                   "FROM shadow_attempts")) == [(0, "large", 2e-4, 1_000_002.0, True, None)]
        # the shadow's spend of that day (what its daily sample budget reads) counts the call once, not per write
        assert (await daily_spend(ledger, utc_day_start(1_000_002.0), [("shadow", "strict")]))[0][0] == 2e-4
        # a decision the request's write did not carry is inserted
        await ledger.record_shadow_sample("r1", 1_000_001.0, {**decision, "shadow": "other"}, [], [])
        assert (await ledger.query("SELECT COUNT(*) FROM shadow_decisions"))[0][0] == 2
        with pytest.raises(LedgerError, match="shadow 'strict' of request missing"):  # no such request
            await ledger.record_shadow_sample("missing", 0.0, decision, [_shadow_call(0, 1e-4)], [0.0])


async def test_a_ledger_of_this_version_lacking_an_added_column_gets_it_back_at_open(target):
    """A ledger whose added columns were dropped by hand, its schema version left as this one's, was taken as up
    to date: `cascade ask` (and a server) answered, then every request's row was refused ("no column named
    cached_from") and lost. Opening it adds the columns again, as the migration of an older ledger does."""
    async with Ledger(target) as ledger:
        await ledger.record(record(1))
        await ledger.query("DROP INDEX requests_end_user_created")
        for table, cols in _ADDED_COLUMNS.items():
            for col, _ in cols:
                await ledger.query(f"ALTER TABLE {table} DROP COLUMN {col}")
    async with Ledger(target, timeout_s=2) as ledger:
        assert (await ledger.query("SELECT value FROM meta WHERE key = 'schema_version'")) == [(str(SCHEMA_VERSION),)]
        rec = record(2)
        rec.end_user, rec.metadata = "alice", {"team": "search"}
        await ledger.record(rec)
        assert (await ledger.query("SELECT request_id, cached_from, end_user, metadata FROM requests ORDER BY "
                                   "request_id")) == [("r1", None, None, None), ("r2", None, "alice",
                                                                                   '{"team": "search"}')]
        for table, cols in _ADDED_COLUMNS.items():  # every one there again
            await ledger.query(f"SELECT {', '.join(col for col, _ in cols)} FROM {table}")


async def test_request_lookups_survive_a_column_another_replica_adds(target):
    """A newer replica migrating the ledger adds its columns (ALTER TABLE ... ADD COLUMN) under replicas still
    serving it. On PostgreSQL a lookup this replica had made often enough for psycopg to prepare it (SELECT *)
    then failed at every call ('cached plan must not change result type'): POST /v1/feedback and GET
    /v1/feedback/{id} answered 500 until a restart. It reads the rows as they now are."""
    async with Ledger(target) as ledger:
        await ledger.record(record(1))
        for _ in range(6):  # past psycopg's prepare_threshold (5)
            assert (await ledger.get("r1"))["attempts"][0]["tier"] == "small"
        newer = Ledger(target).open_sync()  # another process's connection
        for table in ("requests", "attempts", "feedback"):
            newer.execute(f"ALTER TABLE {table} ADD COLUMN added_later TEXT")
        newer.close_sync()
        row = await ledger.get("r1")
        assert [a["tier"] for a in row["attempts"]] == ["small", "large"]
        assert row["added_later"] is None and row["attempts"][0]["added_later"] is None
        await ledger.add_feedback("r1", 1)
        assert [f["score"] for f in (await ledger.get("r1"))["feedback"]] == [1]


async def test_end_users_their_spend_and_text_postgresql_cannot_hold(target):
    """The end user and tags are kept; an end user's spend is counted within its key (or among requests made
    without one); a NUL character, which PostgreSQL's text refuses (and with it the whole write), is kept as
    U+FFFD on both databases' reading of it, and the request is not lost."""
    async with Ledger(target) as ledger:
        for i, (key, user) in enumerate([("k1", "alice"), ("k1", "alice"), ("k2", "alice"), (None, "alice"),
                                         ("k1", "bob"), ("k1", "nul\x00user")]):
            rec = record(i, key=key)
            rec.end_user, rec.metadata = user, {"team": "search"}
            rec.error_message = "quoted \x00 back"
            await ledger.record(rec)
        spent = await daily_spend(ledger, utc_day_start(1_000_000.0), [
            ("user", "k1", "alice"), ("user", None, "alice"), ("key", "k1"), ("user", "k1", "nul\x00user"),
            ("key", None), ("key", "k2"), ("user", "k2", "bob")])
        assert [s for s, _, _ in spent] == [pytest.approx(x) for x in (2e-4, 1e-4, 4e-4, 1e-4, 1e-4, 1e-4, 0.0)]
        row = await ledger.get("r5")
        assert row["end_user"] in ("nul\x00user", "nul\ufffduser") and row["metadata"] == '{"team": "search"}'
        assert row["error_message"] in ("quoted \x00 back", "quoted \ufffd back")


async def test_replicas_creating_a_new_ledger_at_once_all_open_it(target):
    """A new SQLite file switched to WAL by several processes at once: the switch's lock is not one the busy
    timeout waits for, and all but one failed at once ("database is locked")."""
    def open_close() -> None:
        Ledger(target).open_sync().close_sync()

    await asyncio.gather(*(asyncio.to_thread(open_close) for _ in range(6)))
    async with Ledger(target) as ledger:
        assert (await ledger.query("SELECT value FROM meta WHERE key = 'schema_version'")) == [(str(SCHEMA_VERSION),)]


async def test_replicas_opening_an_old_ledger_at_once_migrate_it_once(target):
    """Several processes starting together on a ledger of an older schema each check for the new columns and
    add them: without a lock around that, all but one failed ("column already exists")."""
    async with Ledger(target) as ledger:
        await ledger.record(record(1))
        for sql in ("DROP INDEX requests_end_user_created", "ALTER TABLE requests DROP COLUMN end_user",
                    "ALTER TABLE requests DROP COLUMN metadata",
                    "UPDATE meta SET value = '4' WHERE key = 'schema_version'"):
            await ledger.query(sql)

    def open_close() -> None:
        Ledger(target).open_sync().close_sync()

    for _ in range(3):
        await asyncio.gather(*(asyncio.to_thread(open_close) for _ in range(4)))
    async with Ledger(target) as ledger:
        assert (await ledger.query("SELECT value FROM meta WHERE key = 'schema_version'")) == [(str(SCHEMA_VERSION),)]
        assert (await ledger.query("SELECT request_id, end_user FROM requests")) == [("r1", None)]


async def test_a_ledger_from_before_end_users_and_spend_totals_is_migrated(target):
    """A ledger of schema 4 (no `end_user` column, no `spend_daily` table) could not be opened by a server: the
    migration made the day's spend totals from its requests' `end_user` before adding that column ("no such column"
    on SQLite, "column does not exist" on PostgreSQL). The columns are added first, then the totals made."""
    now = utc_day_start()
    rec = record(1, cost=0.5)
    rec.created_at = now + 10
    _ledger_of_schema_4(target, rec)
    async with Ledger(target) as ledger:
        assert (await ledger.query("SELECT value FROM meta WHERE key = 'schema_version'")) == [(str(SCHEMA_VERSION),)]
        assert (await ledger.query("SELECT request_id, end_user, metadata FROM requests")) == [("r1", None, None)]
        assert [s for s, _, _ in await daily_spend(ledger, now, [("key", "k1")])] == [0.5]  # today's, from its row


def _ledger_of_schema_4(target: str, rec: CascadeRecord) -> None:
    """A ledger at ``target`` holding ``rec``, as a server of schema 4 left it."""
    old = Ledger(target).open_sync()
    old.record_sync(rec)
    for sql in ("DROP TABLE spend_daily", "DROP TABLE spend_holds", "DROP TABLE inflight", "DROP TABLE instances",
                "DROP INDEX requests_end_user_created", "ALTER TABLE requests DROP COLUMN end_user",
                "ALTER TABLE requests DROP COLUMN metadata", "ALTER TABLE attempts DROP COLUMN cached_prompt_tokens",
                "ALTER TABLE shadow_attempts DROP COLUMN cached_prompt_tokens",
                "UPDATE meta SET value = '4' WHERE key = 'schema_version'"):
        old.execute(sql)
    old.close_sync()


def test_a_migration_does_not_deadlock_with_an_older_replica_writing(postgres):
    """A replica of an older version still serving writes a request's row, then its attempts, in one transaction.
    A newer one migrating the ledger meanwhile added the attempts' column first, then the requests': each waited
    for the other, and PostgreSQL ended the migration ("deadlock detected"), so the newer replica did not start
    (nor did the next, while the older ones wrote). The migration takes the tables in the order the writes do."""
    import threading

    import psycopg

    postgres.reset()
    _ledger_of_schema_4(postgres.url, record(1))
    failed: list[BaseException] = []

    def migrate() -> None:
        try:
            Ledger(postgres.url).open_sync().close_sync()
        except BaseException as exc:  # noqa: BLE001 - said below
            failed.append(exc)

    with psycopg.connect(postgres.url, autocommit=True) as older, psycopg.connect(postgres.url) as watch:
        with older.transaction():
            older.execute("INSERT INTO requests (request_id, created_at, policy, endpoint, status, escalated, "
                          "n_attempts, prompt_tokens, completion_tokens, cost_usd, baseline_cost_usd, "
                          "baseline_estimated, escalation_waste_usd, latency_ms) VALUES ('r2', 1000002.0, 'cascade', "
                          "'chat', 'ok', 0, 1, 1, 1, 0.1, 0.1, 0, 0, 1)")
            newer = threading.Thread(target=migrate)
            newer.start()
            for _ in range(200):  # the migration waits for this transaction
                if watch.execute("SELECT COUNT(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
                    break
                time.sleep(0.05)
            older.execute("INSERT INTO attempts (request_id, idx, tier, model, backend, prompt_tokens, "
                          "completion_tokens, latency_ms, cost_usd, decision, reason, kept) VALUES ('r2', 0, 'large', "
                          "'m', 'openai', 1, 1, 1, 0.1, 'final', 'last', 1)")
        newer.join(60)
    assert not failed, failed
    ledger = Ledger(postgres.url).open_existing_sync()
    try:
        assert ledger.execute("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
        assert ledger.execute("SELECT request_id, end_user FROM requests ORDER BY request_id") == [
            ("r1", None), ("r2", None)]
        assert ledger.execute("SELECT request_id, cached_prompt_tokens FROM attempts WHERE request_id = 'r2'") == [
            ("r2", None)]
    finally:
        ledger.close_sync()


async def test_the_latest_feedback_on_a_request_is_its_label(target):
    """A user who changes their mind replaces the label (votes are not summed: +1 +1 -1 was +1, +1 -1 was
    no label); a later 0 withdraws it."""
    from cascade.recalibrate import labelled_answers

    async with Ledger(target) as ledger:
        votes = {"r1": [1, 1, -1], "r2": [1, -1, 1], "r3": [-1, 1], "r4": [1, 0], "r5": [-1, -1, -1]}
        for i in range(1, 6):
            rec = record(i)
            rec.attempts[1].features = {"mean_logprob": -0.5}  # the served answer, with its features
            await ledger.record(rec)
        for rid, scores in votes.items():
            for s in scores:
                await ledger.add_feedback(rid, s)
        labels = {r["request_id"]: r["label"] for r in labelled_answers(ledger, "large", sources=("feedback",))}
    assert labels == {"r1": 0, "r2": 1, "r3": 1, "r5": 0}


async def test_feedback_on_cache_hits_labels_every_tier_of_the_original_and_a_0_withdraws_only_its_own(target):
    """A hit serves its original's answer: feedback on it labels an earlier tier's identical answer too (it
    was left out when that tier escalated), and each request's latest feedback is its own label: one caller's
    0 on a hit does not erase another's label on the original (nor on another hit)."""
    from cascade.recalibrate import labelled_answers
    from cascade.types import CascadeRecord

    async with Ledger(target) as ledger:
        for i in range(1, 5):
            rec = record(i)  # small escalated, large served: the same text
            rec.attempts[0].text = rec.attempts[1].text = "Paris"
            await ledger.record(rec)
        for hit, original in (("h1", "r1"), ("h2", "r2"), ("h3a", "r3"), ("h3b", "r3"), ("h4", "r4")):
            await ledger.record(CascadeRecord(request_id=hit, policy="cascade", created_at=1_000_100.0, tier="large",
                                              model="m", api_key_id="k2", cached_from=original))
        for rid, score in (("h1", -1), ("r2", 1), ("h2", 0), ("h3a", -1), ("h3b", 0), ("r4", 1), ("h4", -1)):
            await ledger.add_feedback(rid, score)
        labels = {r["request_id"]: r["label"] for r in labelled_answers(ledger, "small", sources=("feedback",))}
    assert labels == {"r1": 0, "r2": 1, "r3": 0, "r4": 0}


async def test_a_postgresql_ledger_reconnects_after_the_server_drops_it(postgres):
    """The server ends our connection (as on a restart or failover): the next write and read open a new
    one, instead of every request failing until the gateway is restarted."""
    import psycopg

    postgres.reset()
    async with Ledger(postgres.url) as ledger:
        await ledger.record(record(1))
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE pid <> pg_backend_pid() AND datname = current_database()").fetchall()
        assert killed and all(ok for (ok,) in killed)
        await ledger.record(record(2))  # the write that finds the connection gone is retried on a new one
        assert (await ledger.query("SELECT COUNT(*) FROM requests"))[0][0] == 2
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE pid <> pg_backend_pid() AND datname = current_database()")
        assert (await ledger.get("r1"))["tier"] == "large"  # a read, too


async def test_a_postgresql_ledger_that_cannot_reconnect_says_so_until_a_write_succeeds(postgres):
    """While the database refuses connections, writes fail and ``unavailable`` says why (GET /ready answers
    503 with it); once it takes them again, the next write reconnects and clears it. A write that failed meanwhile
    is held, as on SQLite (a restart, a failover): its waiter is told after ``timeout_s``, and it is committed
    once the database is back, as that failure, where it used to be lost with the money its request spent."""
    import psycopg

    postgres.reset()
    admin_url = postgres.url.rsplit("/", 1)[0] + "/template1"
    async with Ledger(postgres.url, timeout_s=1) as ledger:
        late = []
        ledger.late_listeners.append(lambda rec, exc: late.append((rec.request_id, exc)))
        await ledger.record(record(1))
        assert ledger.unavailable is None
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
        try:
            with pytest.raises(LedgerTimeoutError):
                await ledger.record(record(2))
            assert ledger.unavailable and "unreachable" in ledger.unavailable
            assert ledger._held == 1 and "unreachable" in await ledger.probe()
            with pytest.raises(LedgerError) as read:  # what a client is told (a feedback lookup) names no server
                await ledger.get("r1")
            assert "cannot be reached" in str(read.value) and "127.0.0.1" not in str(read.value), read.value
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")
        await ledger.record(record(3))  # after the held write's next try
        assert ledger.unavailable is None and late == [("r2", None)]
        for _ in range(100):  # its correction: the failure its waiter was told of
            got = dict(await ledger.query("SELECT request_id, status FROM requests"))
            if got.get("r2") == "error":
                break
            await asyncio.sleep(0.05)
        assert got == {"r1": "ok", "r2": "error", "r3": "ok"}
        assert (await ledger.get("r2"))["error_class"] == "LedgerTimeoutError"


async def test_a_replica_stopped_just_after_a_failed_heartbeat_removes_its_heartbeat_row(postgres):
    """A served ledger closed after a heartbeat had failed (its database restarted a moment before) took itself for
    never served: it left its heartbeat row (and its journal), which the other replicas took for a process that
    died, 120 s later on another machine. It removes them, on a new connection if the database dropped its own."""
    import psycopg

    postgres.reset()
    admin_url = postgres.url.rsplit("/", 1)[0] + "/template1"
    async with Ledger(postgres.url, heartbeat_s=1.0) as ledger:
        assert (await ledger.query("SELECT COUNT(*) FROM instances")) == [(1,)]
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
        try:
            for _ in range(100):  # the next heartbeat fails
                if ledger.unavailable is not None:
                    break
                await asyncio.sleep(0.05)
            assert ledger.unavailable and "unreachable" in ledger.unavailable
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")
    with psycopg.connect(postgres.url) as conn:  # (closed before its next heartbeat)
        assert conn.execute("SELECT COUNT(*) FROM instances").fetchone() == (0,)


async def test_feedback_through_the_python_api_says_the_ledger_is_unavailable_while_it_cannot_be_reached(
        postgres, tmp_path):
    """Engine.feedback raised a plain LedgerError while the ledger's database could not be reached, where a request
    is refused with LedgerUnavailableError (to repeat shortly): feedback says the same, as the HTTP route does."""
    import psycopg

    from cascade.engine import Engine
    from cascade.errors import LedgerUnavailableError
    from tests.conftest import free_port, make_config

    postgres.reset()
    cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                  "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}],
                      {"p": {"chain": ["r"]}}, ledger={"path": postgres.url})
    admin_url = postgres.url.rsplit("/", 1)[0] + "/template1"
    async with await Engine.open(cfg, preload=False) as eng:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
        try:
            with pytest.raises(LedgerUnavailableError, match="repeat it shortly"):
                await eng.feedback("casc-1", 1)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")


def test_ready_is_503_while_the_ledger_cannot_be_written(postgres, tmp_path):
    """A gateway whose answers cannot be accounted is not ready: a load balancer must stop sending it traffic.
    Feedback meanwhile was a 500 ("the ledger's database cannot be reached now"): a 503 to repeat shortly."""
    import httpx
    import psycopg

    from serving import create_app
    from tests.conftest import ServerThread, free_port, make_config

    postgres.reset()
    cfg = make_config(tmp_path, [{"name": "r", "backend": "openai", "model": "m",
                                  "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}],
                      {"p": {"chain": ["r"]}}, ledger={"path": postgres.url})
    admin_url = postgres.url.rsplit("/", 1)[0] + "/template1"
    body = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}
    with ServerThread(create_app(cfg)) as srv:
        assert httpx.get(srv.url + "/ready").json()["ledger"] == "ok"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
        try:
            # an idle server sees it before any request fails on it (it said ready until one did)
            r = httpx.get(srv.url + "/ready")
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable", r.text
            assert "unreachable" in r.json()["ledger"] and "\n" not in r.json()["ledger"]  # libpq's, on one line
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)  # refused, no tier run
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
            r = httpx.get(srv.url + "/ready")
            assert r.status_code == 503 and r.json()["status"] == "ledger_unavailable"
            assert "unreachable" in r.json()["ledger"]
            # feedback, which must read the ledger, is refused as completions are: a 503 to repeat, not a 500
            for r in (httpx.post(srv.url + "/v1/feedback", json={"request_id": "casc-1", "score": 1}, timeout=30),
                      httpx.get(srv.url + "/v1/feedback/casc-1", timeout=30)):
                assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
                assert r.headers["retry-after"] == "1"
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")
        # ready again as soon as the database is back, before any write (a not-ready server gets no traffic)
        assert httpx.get(srv.url + "/ready").status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 502  # accounted


def test_a_ledger_path_under_a_user_that_does_not_exist_is_one_clear_error():
    """`~nosuchuser/...` made Path.expanduser raise a bare RuntimeError (a traceback on the command line)."""
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ledger.path: cannot expand '~no-such-user-cascade/l.sqlite': no such user"):
        Ledger("~no-such-user-cascade/l.sqlite").open_sync()


async def _until(check, what: str) -> None:  # noqa: ANN001
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"never: {what}")


async def test_replicas_check_and_hold_daily_spend_in_one_transaction(target):
    """Two processes sharing a ledger (two Ledgers: two instances): a request admitted under a daily spend limit
    is checked against the day's recorded spend and every process's holds, and holds its worst case, in one
    transaction; the transaction writing its row deletes the hold, so a read sees the request held or recorded,
    never both. A hold whose request writes no row is released; a process closing takes its holds with it."""
    day = utc_day_start()
    key, user = ("key", "k1"), ("user", "k1", "alice")
    seen: list = []

    def admit_under(limit: float):  # noqa: ANN202
        def admit(figures: list) -> bool:
            seen.append(figures)
            return all(spent + held < limit for spent, held, _ in figures)
        return admit

    async with Ledger(target) as a, Ledger(target, heartbeat_s=0.1, stale_s=0.5) as b:
        assert await a.admit_spend("r1", [key, user], 0.25, day, admit_under(1.0)) == (
            [(0.0, 0.0, 0), (0.0, 0.0, 0)], True)
        assert (await b.admit_spend("r2", [key], 0.5, day, admit_under(1.0)))[1]
        assert await a.admit_spend("r0", [key], 0.0, day, admit_under(1.0)) == ([(0.0, 0.75, 2)], True)  # no hold
        refused = await b.admit_spend("r3", [key], 0.5, day, admit_under(0.75))
        assert refused == ([(0.0, 0.75, 2)], False)       # 0.75 held already: not admitted, nothing held
        assert await daily_spend(b, day, [key, user]) == [(0.0, 0.75, 2), (0.0, 0.25, 1)]
        rec = record(1)  # r1
        rec.created_at, rec.end_user = day + 1, "alice"
        await a.record(rec)
        assert await daily_spend(b, day, [key, user]) == [(pytest.approx(1e-4), 0.5, 1),
                                                          (pytest.approx(1e-4), 0.0, 0)]
        a.release_spend("r2")                             # another process's hold: not a's to release
        assert (await daily_spend(a, day, [key]))[0][1:] == (0.5, 1)  # (a's read runs after a's release)
        b.release_spend("r2")                             # refused after its hold: no row will come
        await _until(lambda: _count(a, "spend_holds", 0), "the released hold is gone")
        assert (await b.admit_spend("r4", [key], 0.125, day, admit_under(1.0)))[1]
        assert (await daily_spend(a, utc_day_start(2e9), [key]))[0][1:] == (0.0, 0)  # a hold counts on its day
        with pytest.raises(ValueError, match="00:00 UTC"):
            await daily_spend(a, day + 1, [key])
    async with Ledger(target) as c:  # b closed: its hold went with its heartbeat row
        assert await _count(c, "spend_holds", 0)


async def test_a_process_taken_for_dead_while_its_requests_are_in_flight_holds_their_spend_again(target, caplog):
    """A replica only paused for ``stale_s`` (SIGSTOP, or cut off from the database) is taken for dead by
    another, which deletes its spend holds with its heartbeat row. Its requests are still in flight and will
    spend: its next heartbeat writes their holds again, as they were (the same amount and time), so the
    other replicas count them until their rows are written (they were unheld, and a burst could pass the limit).
    The peer's ``stale_s`` is shorter than this process's heartbeat period: it takes it for dead between two."""
    day = utc_day_start()
    key = ("key", "k1")
    async with Ledger(target, heartbeat_s=0.6, stale_s=30) as slow:
        assert (await slow.admit_spend("r1", [key], 0.25, day, lambda figures: True))[1]
        held = await slow.query("SELECT hold_id, bucket, instance, amount_usd, created_at FROM spend_holds")
        assert len(held) == 1
        async with Ledger(target, heartbeat_s=0.05, stale_s=0.2) as peer:
            await _until(lambda: _count(peer, "spend_holds", 0), "the peer took the slow process for dead")
        await _until(lambda: _count(slow, "spend_holds", 1), "the slow process held its request's spend again")
        assert await slow.query("SELECT hold_id, bucket, instance, amount_usd, created_at FROM spend_holds") == held
        assert await daily_spend(slow, day, [key]) == [(0.0, 0.25, 1)]
        assert "took this one for dead" in caplog.text and "1 requests in flight" in caplog.text
        rec = record(1)  # r1 finishes: its row ends its hold, as ever
        rec.created_at = day + 1
        await slow.record(rec)
        assert await daily_spend(slow, day, [key]) == [(pytest.approx(1e-4), 0.0, 0)]


async def test_a_hold_swept_from_a_past_day_is_forgotten_not_written_again(target):
    """A hold no row ends (its request's row refused for good, or its release failed) is deleted by the sweep of
    holds from before yesterday; the process kept it in memory all the same, one more for each such request as
    long as it ran, and wrote it again once taken for dead. It is forgotten with its row: here the process is
    then taken for dead (its heartbeat row and holds deleted) and writes back only the hold still in flight."""
    day, key = utc_day_start(), ("key", "k1")
    async with Ledger(target, heartbeat_s=0.05, stale_s=0.2) as led:
        for rid in ("lost", "live"):
            assert (await led.admit_spend(rid, [key], 0.25, day, lambda figures: True))[1]
        await led.query("UPDATE spend_holds SET created_at = created_at - 3 * 86400 WHERE hold_id = 'lost'")
        await _until(lambda: _count(led, "spend_holds", 1), "the sweep deleted the hold of three days ago")
        await _taken_for_dead(led)
        assert await led.query("SELECT hold_id FROM spend_holds") == [("live",)]


async def test_a_released_hold_is_forgotten_not_written_again_once_the_process_is_taken_for_dead(target):
    """A request that will write no row (refused after its admission) releases its hold, and the process forgets
    it then: taken for dead, it writes back only the holds still in flight. Kept in memory, the released one came
    back at its worst case, counted against its key's limit for the rest of the day with no request behind it."""
    day, key = utc_day_start(), ("key", "k1")
    async with Ledger(target, heartbeat_s=0.05, stale_s=30) as led:
        for rid in ("released", "live"):
            assert (await led.admit_spend(rid, [key], 0.25, day, lambda figures: True))[1]
        led.release_spend("released")
        await _until(lambda: _count(led, "spend_holds", 1), "the released hold is gone")
        await _taken_for_dead(led)
        assert await led.query("SELECT hold_id FROM spend_holds") == [("live",)]
        assert await daily_spend(led, day, [key]) == [(0.0, 0.25, 1)]


async def test_a_renewed_hold_written_again_keeps_the_time_it_was_first_written(target):
    """A shadow sample holds again, its new total, before each call: the row keeps its first time (a hold
    counts on the UTC day it was written), and so does what the process writes back once taken for dead. Taking
    the renewal's time there wrote it back as held from its last call (on that call's day, past a midnight)."""
    day, key = utc_day_start(), ("shadow", "s")
    async with Ledger(target, heartbeat_s=0.05, stale_s=30) as led:
        assert (await led.admit_spend("sample", [key], 0.25, day, lambda figures: True))[1]
        [(first,)] = await led.query("SELECT created_at FROM spend_holds")
        await asyncio.sleep(0.05)
        led.hold_spend("sample", [key], 0.5)

        async def renewed() -> bool:
            return await led.query("SELECT amount_usd, created_at FROM spend_holds") == [(0.5, first)]

        await _until(renewed, "the hold renewed, at its first time")
        await _taken_for_dead(led)
        assert await led.query("SELECT amount_usd, created_at FROM spend_holds") == [(0.5, first)]


async def test_a_hold_from_the_last_minute_of_a_day_counts_against_the_next_until_its_row_is_written(target):
    """A request's row is dated when the engine starts it, after its admission: one admitted in a day's last
    instant may be recorded in the next day, so its hold counts there too until its row is written (it did not:
    the new day's admissions could spend past its limit by the requests admitted just before midnight)."""
    today = utc_day_start()
    tomorrow, key = today + 86400, ("key", "k1")
    async with Ledger(target) as led:
        for rid, amount, written in (("late", 0.5, tomorrow - 0.5), ("early", 0.25, tomorrow - 3600)):
            assert (await led.admit_spend(rid, [key], amount, today, lambda figures: True))[1]
            await led.query("UPDATE spend_holds SET created_at = ? WHERE hold_id = ?", (written, rid))
        assert await daily_spend(led, tomorrow, [key]) == [(0.0, 0.5, 1)]  # the hour-old hold: today's only
        assert await daily_spend(led, today, [key]) == [(0.0, 0.75, 2)]
        rec = record(1)
        rec.request_id, rec.created_at = "late", tomorrow + 0.1
        await led.record(rec)  # recorded tomorrow: counted there once, and no longer held anywhere
        assert await daily_spend(led, tomorrow, [key]) == [(pytest.approx(1e-4), 0.0, 0)]
        assert await daily_spend(led, today, [key]) == [(0.0, 0.25, 1)]


async def test_admissions_racing_on_two_processes_never_hold_past_the_limit(target):
    """The check and the hold are one transaction, run one at a time per bucket by every process: admissions
    racing from two processes (two Ledgers, each on its own thread) are admitted exactly as far as the limit,
    however their reads and holds interleave; the figures each was judged on are consistent."""
    day = utc_day_start()
    key = ("key", "race")
    async with Ledger(target) as a, Ledger(target) as b:
        results = await asyncio.gather(*(
            led.admit_spend(f"q{i}", [key], 0.1, day, lambda figures: figures[0][1] + 1e-9 < 1.0)
            for i, led in enumerate([a, b] * 15)))
        admitted = sum(ok for _, ok in results)
        assert admitted == 10
        assert sorted(f[0][2] for f, ok in results if ok) == list(range(10))  # each saw all admitted before it
        assert (await daily_spend(a, day, [key]))[0][1:] == (pytest.approx(1.0), 10)


async def test_the_days_spend_totals_agree_with_the_rows_they_count(target):
    """``spend_daily`` (what the daily limits read: one row per key or end user and UTC day) is added to by the
    transaction writing the requests, so it always equals the sum of their rows: per day, per key (the keyless
    requests' too), per end user within its key; a row recorded from the journal and replaced by the request's
    own counts once; a ledger of schema 7 gets it from its rows of today and yesterday when migrated (each of a
    shadow's calls too)."""
    day = utc_day_start(1_000_000.0)
    rows = [("k1", "alice", 0.0), ("k1", "alice", 1.0), ("k1", "bob", 2.0), ("k1", None, 4.0), ("k2", "alice", 8.0),
            (None, "alice", 16.0), (None, None, 32.0), ("k1", "alice", 0.0)]
    async with Ledger(target) as led:
        for i, (key, user, cost) in enumerate(rows):
            rec = record(i, key=key, cost=cost)
            rec.end_user = user
            await led.record(rec)
        late = record(100, cost=64.0)
        late.created_at = day + 86400 + 5  # the next UTC day
        await led.record(late)
        buckets = [("key", "k1"), ("user", "k1", "alice"), ("user", "k1", "bob"), ("key", "k2"), ("key", None),
                   ("user", None, "alice"), ("user", "k2", "alice"), ("user", "k1", "carol")]
        expect = [7.0, 1.0, 2.0, 8.0, 48.0, 16.0, 8.0, 0.0]
        assert [s for s, _, _ in await daily_spend(led, day, buckets)] == expect
        assert [s for s, _, _ in await daily_spend(led, day + 86400, buckets[:1])] == [64.0]
        summed = await led.query("SELECT api_key_id, SUM(cost_usd) FROM requests WHERE created_at < ? GROUP BY "
                                 "api_key_id", (day + 86400,))
        assert sorted(summed, key=str) == sorted([("k1", 7.0), ("k2", 8.0), (None, 48.0)], key=str)
        # a request recorded as interrupted (its process taken for dead), then by itself: counted once
        gone = record(200, cost=0.5)
        gone.error_class = INTERRUPTED
        await led.record(gone)
        assert (await daily_spend(led, day, buckets[:1]))[0][0] == 7.5
        await led.record(record(200, cost=0.25))  # it finished after all: its row replaces the interrupted one
        assert (await daily_spend(led, day, buckets[:1]))[0][0] == 7.25
        assert (await led.query("SELECT cost_usd FROM requests WHERE request_id = 'r200'")) == [(0.25,)]
        # an older ledger: its totals are made from its rows of today and yesterday when a server migrates it
        now = utc_day_start()
        for i, cost in enumerate([1.0, 2.0]):
            rec = record(300 + i, cost=cost)
            rec.created_at = now - 86400 * i + 10
            await led.record(rec)
        decision = {"shadow": "s", "status": "known", "tier": "large", "escalated": True, "cost_usd": 0.75,
                    "diverges": False, "reason": "sampled", "sampled": True, "sample_cost_usd": 0.75}
        await led.record_shadow_sample("r300", now + 10, decision, [_shadow_call(0, 0.5), _shadow_call(1, 0.25)],
                                       [now + 20, now + 30])
        await led.query("DROP TABLE spend_daily")
        await led.query("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    async with Ledger(target) as led:
        assert [s for s, _, _ in await daily_spend(led, now, [("key", "k1")])] == [1.0]
        assert [s for s, _, _ in await daily_spend(led, now - 86400, [("key", "k1")])] == [2.0]
        assert [s for s, _, _ in await daily_spend(led, now, [("shadow", "s")])] == [0.75]  # both its calls
        assert [s for s, _, _ in await daily_spend(led, day, [("key", "k1")])] == [0.0]  # older days: not kept


async def _taken_for_dead(led: Ledger) -> None:
    """Delete ``led``'s heartbeat row and its holds, as a peer that took its process for dead does, and wait for
    the process (alive after all) to write its holds again."""
    await led.query("DELETE FROM spend_holds")
    await led.query("DELETE FROM instances")

    async def held_again() -> bool:
        return not await _count(led, "spend_holds", 0)

    await _until(held_again, "the process wrote its holds again")


async def _count(ledger: Ledger, table: str, n: int) -> bool:
    return (await ledger.query(f"SELECT COUNT(*) FROM {table}"))[0][0] == n


async def test_a_hold_is_released_even_when_the_ledger_queue_is_full(postgres):
    """A stall (here another session holding the key's day-total row) fills the ledger's queue: admissions time
    out or are refused at once, and the caller releases each. Those queued run once the stall ends and commit
    their holds, for requests whose clients were already refused, so their releases must run after them, never
    dropped for the full queue (they were: the holds blocked the key for the rest of the day)."""
    import psycopg

    from cascade.ledger import spend_bucket

    postgres.reset()
    day, key = utc_day_start(), ("key", "stall")
    async with Ledger(postgres.url, timeout_s=0.5, max_pending=4) as led:
        assert (await led.admit_spend("warm", [key], 0.1, day, lambda figures: True))[1]  # (the total's row)
        led.release_spend("warm")
        with psycopg.connect(postgres.url) as blocker:
            blocker.execute("SELECT cost_usd FROM spend_daily WHERE bucket = %s FOR UPDATE", (spend_bucket(key),))
            admissions = [asyncio.ensure_future(led.admit_spend(f"q{i}", [key], 0.1, day, lambda figures: True))
                          for i in range(4)]
            await asyncio.sleep(0.1)  # q0 waits for the row lock on the ledger thread, q1-q3 behind it
            other = asyncio.ensure_future(led.query("SELECT 1"))  # and one more job: the queue is full (4)
            results = await asyncio.gather(*admissions, return_exceptions=True)
            assert all(isinstance(r, LedgerError) for r in results)  # their callers gave up, and release them
            for i in range(4):
                led.release_spend(f"q{i}")
            blocker.commit()
        await asyncio.gather(other, return_exceptions=True)

        async def drained() -> bool:
            try:
                return await _count(led, "spend_holds", 0)
            except LedgerError:  # (still full)
                return False

        await _until(drained, "every hold released")
