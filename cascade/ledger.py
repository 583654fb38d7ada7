"""The ledger: every request and every attempt, in SQLite (WAL mode) or PostgreSQL, through one code path.

Writes run on one dedicated thread (``await ledger.record(rec)`` never blocks the event loop) and are
committed before ``record`` returns, so a request that got its response is on disk: stopping the process
between requests loses nothing. Writes queued while the thread was busy are committed together, in one
transaction (group commit: one commit for everything queued; a record that fails is retried alone so
that only its own caller sees the error). SQLite runs in WAL mode with ``synchronous=NORMAL``: a
committed transaction survives a crash or kill of the process (it is in the WAL file); only an OS crash or
power loss can lose the last commits. PostgreSQL (``postgresql://…``) lets several server replicas share
one ledger.

A caller waits at most ``timeout_s`` for its write (or read): past it, a LedgerError, and the ledger is not
ready (a database that does not answer); the write stays queued, and is kept (and logged) should it commit
later. A write that found SQLite locked by another process for that long (a VACUUM, a backup, another writer)
stays queued too, and is tried again until it commits. A write that fails through no fault of its record
also makes the ledger not ready, until a write succeeds or the readiness probe (:meth:`Ledger.probe`: on
SQLite a one-row write committed, so that a full disk fails it; on PostgreSQL a write rolled back) proves
that one can; the probe also fails once the SQLite file is no longer at its path (moved or deleted).

A request still in flight ``JOURNAL_DELAY_S`` after a tier call started is journaled (table ``inflight``,
:meth:`Ledger.journal`), and its journal row deleted by the transaction that writes its own: a process killed
outright leaves those rows, and the next process serving the ledger to see it dead (its heartbeat in
``instances`` unchanged for ``STALE_S``, or its pid gone on this machine) writes them as requests that failed
with ``Interrupted``, with the attempts paid for until then.

The SQL is written once, with ``?`` placeholders and types both databases accept; the dialect object
only rewrites placeholders and says how to connect.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import math
import os
import queue
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cascade.errors import ConfigError, LedgerError, LedgerTimeoutError, LedgerWriteHeldError, NotFoundError
from cascade.paths import LEDGER_URL_SCHEMES, expand_path, ledger_url_problem
from cascade.types import Attempt, CascadeRecord

SCHEMA_VERSION = 8

#: how long a request waits for its ledger write (or read), and GET /ready for its probe, by default
#: (``ledger.timeout_s``): past it the ledger counts as not answering (a hung database server)
DEFAULT_TIMEOUT_S = 5.0
#: the most the readiness probe waits for SQLite's write lock (held by another process's transaction)
_PROBE_LOCK_WAIT_S = 1.0
#: a write that found SQLite's write lock held by another process for longer than ``timeout_s`` (a VACUUM, a
#: backup, another writer) stays queued and is tried again: first after this many seconds, then after twice
#: as long each time up to the most ...
_RETRY_FIRST_S, _RETRY_MOST_S = 0.05, 1.0
#: ... each try waiting for the lock this long at most (a quarter of ``timeout_s`` if less), so that the probes
#: and reads queued meanwhile are answered in time
_RETRY_LOCK_WAIT_S = 0.25
#: the most jobs (writes, reads, probes) waiting for the ledger thread by default (``ledger.max_pending``)
DEFAULT_MAX_PENDING = 2000
#: a served ledger writes its process's heartbeat (table ``instances``) this often ...
HEARTBEAT_S = 15.0
#: ... and counts another process dead once it has seen that one's heartbeat unchanged for this long while writing
#: its own (on its own clock: the machines' clocks need not agree, and a database out for every process kills none
#: of them), or at once where it can see that the process is gone (same machine). Its requests in flight are then
#: written as errors ``Interrupted``
STALE_S = 120.0
#: :meth:`Ledger.prune_sync`: requests deleted per transaction (a few thousand: each batch's transaction is short, so
#: that servers writing to the ledger meanwhile wait for none of them long) ...
PRUNE_BATCH = 2000
#: ... and the tables it deletes from: the requests, then those of rows referencing a request
PRUNED_TABLES = ("requests", "attempts", "feedback", "shadow_decisions", "shadow_attempts")
#: the error class of a request whose process died before it finished (see :meth:`Ledger.journal`)
INTERRUPTED = "Interrupted"
#: a request is journaled this long after a tier call starts, if it has not finished by then: most finish
#: sooner and are never journaled (their own row is the only write), and those that do not are journaled
#: together, in one transaction
JOURNAL_DELAY_S = 0.1

#: columns added after version 1, added in place to older ledgers when they are opened: the tables in the order the
#: writes lock them (a shadow sample's calls, then the request they reference; a request, then its attempts, then its
#: shadow decisions), so that a migration under older replicas still writing waits for their transactions rather
#: than deadlocking with them (PostgreSQL then ended the migration, and the newer replica did not start)
_ADDED_COLUMNS = {
    "shadow_attempts": [("cached_prompt_tokens", "INTEGER")],  # version 6
    # version 4: response-cache hits name the request whose answer they served (cascade/cache.py); version
    # 5: cost attribution given by the caller, its end user (OpenAI's ``user``) and tags (``metadata``, JSON)
    "requests": [("cached_from", "TEXT"), ("end_user", "TEXT"), ("metadata", "TEXT")],
    # version 2: agreement between tiers; version 6: prompt tokens read from the provider's prompt cache
    "attempts": [("answer_sig", "TEXT"), ("cached_prompt_tokens", "INTEGER")],
    # version 3: sampled shadow execution (cascade/shadow.py)
    "shadow_decisions": [("sampled", "INTEGER"), ("sample_cost_usd", "DOUBLE PRECISION")],
}


#: indexes on columns of :data:`_ADDED_COLUMNS`
_ADDED_INDEXES = [
    # an end user's spend today (user_tiers.*.end_user_daily_spend_limit_usd)
    "CREATE INDEX IF NOT EXISTS requests_end_user_created ON requests(end_user, created_at)",
]


def _missing_columns(conn: Any, tables: Iterable[str], schema: str = "") -> list[tuple[str, str, str]]:
    """The columns of :data:`_ADDED_COLUMNS` that those of its tables among ``tables`` lack, as (table, column,
    type); ``schema``: a prefix naming the tables' schema (``"main."``)."""
    out = []
    for table, cols in _ADDED_COLUMNS.items():
        if table in tables:
            have = {c[0] for c in conn.execute(f"SELECT * FROM {schema}{table} LIMIT 0").description}
            out += [(table, col, typ) for col, typ in cols if col not in have]
    return out


def _created(stmt: str) -> str:
    """The name of the table or index a ``CREATE ... IF NOT EXISTS`` statement creates."""
    return re.match(r"\s*CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", stmt).group(1)  # type: ignore[union-attr]


#: how a command that only reads an older ledger reads it (it never migrates it)
_READ_OLDER = ("temporary views add the columns added since; a session that may create none (a read-only "
               "PostgreSQL transaction, a standby) cannot read it until a server of this version has migrated it")


def answer_signature(text: str | None) -> str | None:
    """A short digest of an answer's normalised text: lets agreement between tiers be measured later
    without storing the text itself (``ledger.store_text`` is off by default)."""
    if text is None:
        return None
    norm = " ".join(text.lower().split()).strip(" .!?;:,")
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()[:16]

_TABLES = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        policy TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        api_key_id TEXT,
        user_tier TEXT,
        status TEXT NOT NULL,
        tier TEXT,
        model TEXT,
        confidence DOUBLE PRECISION,
        escalated INTEGER NOT NULL,
        n_attempts INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        baseline_cost_usd DOUBLE PRECISION NOT NULL,
        baseline_estimated INTEGER NOT NULL,
        escalation_waste_usd DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        error_class TEXT,
        error_message TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS requests_created ON requests(created_at)",
    "CREATE INDEX IF NOT EXISTS requests_policy_created ON requests(policy, created_at)",
    "CREATE INDEX IF NOT EXISTS requests_key_created ON requests(api_key_id, created_at)",
    "CREATE INDEX IF NOT EXISTS requests_tier_created ON requests(tier, created_at)",
    """CREATE TABLE IF NOT EXISTS attempts (
        request_id TEXT NOT NULL REFERENCES requests(request_id),
        idx INTEGER NOT NULL,
        tier TEXT NOT NULL,
        model TEXT NOT NULL,
        backend TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        confidence DOUBLE PRECISION,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        kept INTEGER NOT NULL,
        error_class TEXT,
        error_message TEXT,
        features TEXT,
        text TEXT,
        answer_sig TEXT,
        PRIMARY KEY (request_id, idx)
    )""",
    "CREATE INDEX IF NOT EXISTS attempts_tier ON attempts(tier)",
    """CREATE TABLE IF NOT EXISTS feedback (
        id {serial},
        request_id TEXT NOT NULL REFERENCES requests(request_id),
        created_at DOUBLE PRECISION NOT NULL,
        score INTEGER NOT NULL,
        comment TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id)",
    # what each shadow policy would have done for a live request (see cascade/shadow.py)
    """CREATE TABLE IF NOT EXISTS shadow_decisions (
        request_id TEXT NOT NULL REFERENCES requests(request_id),
        shadow TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL,
        tier TEXT,
        escalated INTEGER,
        cost_usd DOUBLE PRECISION,
        diverges INTEGER,
        reason TEXT NOT NULL,
        sampled INTEGER,
        sample_cost_usd DOUBLE PRECISION,
        PRIMARY KEY (request_id, shadow)
    )""",
    "CREATE INDEX IF NOT EXISTS shadow_created ON shadow_decisions(shadow, created_at)",
    # the calls a shadow made itself (sampled shadow execution): shadow spend, never live spend
    """CREATE TABLE IF NOT EXISTS shadow_attempts (
        request_id TEXT NOT NULL REFERENCES requests(request_id),
        shadow TEXT NOT NULL,
        idx INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        tier TEXT NOT NULL,
        model TEXT NOT NULL,
        backend TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        confidence DOUBLE PRECISION,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        error_class TEXT,
        error_message TEXT,
        features TEXT,
        text TEXT,
        answer_sig TEXT,
        PRIMARY KEY (request_id, shadow, idx)
    )""",
    "CREATE INDEX IF NOT EXISTS shadow_attempts_spend ON shadow_attempts(shadow, created_at)",
    # version 7: the requests being answered, each as it would be recorded were its process to die before it
    # finished (written once a tier call has run JOURNAL_DELAY_S, deleted with the request's own row), and
    # the processes serving the ledger with their heartbeats, so that another can tell one has died
    """CREATE TABLE IF NOT EXISTS inflight (
        request_id TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS inflight_instance ON inflight(instance)",
    """CREATE TABLE IF NOT EXISTS instances (
        instance TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    )""",
    # version 8: the worst cases held by requests admitted under a daily spend limit whose rows are not written
    # yet, one row per request and limit (its bucket), written by the admission's own transaction (the check
    # and the hold in one: Ledger.admit_spend) and deleted by the transaction that writes its request, so that
    # the processes sharing the ledger count each other's requests in flight; and the shadow samples'
    # reservations of their daily budget (bucket ["shadow", name]), deleted as the sample is written
    """CREATE TABLE IF NOT EXISTS spend_holds (
        hold_id TEXT NOT NULL,
        bucket TEXT NOT NULL,
        instance TEXT NOT NULL,
        amount_usd DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (hold_id, bucket)
    )""",
    "CREATE INDEX IF NOT EXISTS spend_holds_bucket ON spend_holds(bucket, created_at)",
    "CREATE INDEX IF NOT EXISTS spend_holds_instance ON spend_holds(instance)",
    # version 8: the spend recorded per UTC day (UNIX time // 86400) of each key, of each end user of a key and of
    # each shadow's samples (bucket, as spend_holds names them), added to by the transaction that writes the
    # requests (the samples): the daily limits read one row, where summing a key's rows grew with them
    """CREATE TABLE IF NOT EXISTS spend_daily (
        day INTEGER NOT NULL,
        bucket TEXT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (day, bucket)
    )""",
]
#: the ledger's tables (an SQLite file holding none of them is another program's)
_TABLE_NAMES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", "\n".join(_TABLES)))


#: SQLite's readiness probe commits this ``meta`` row (the time it ran), one row overwritten by each probe
_SQLITE_PROBE_KEY = "ready_probe"
#: SQLite's primary result codes that say another connection holds the lock a statement needs
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
#: ... and those that say the file, or the files beside it, may not be written or created
_SQLITE_READONLY, _SQLITE_CANTOPEN = 8, 14


def _sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of a driver error (None: not an SQLite error, or none given)."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return None if code is None else code & 0xFF


def _is_locked(exc: BaseException) -> bool:
    """Did an SQLite statement fail because another connection held the lock it needed (SQLITE_BUSY, SQLITE_LOCKED:
    a VACUUM, a backup, another writer), for longer than the busy timeout? Such a write may succeed later."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = _sqlite_code(exc)
    return code in (_SQLITE_BUSY, _SQLITE_LOCKED) if code is not None else "locked" in str(exc)


class _FileMoved(LedgerError):
    """SQLite: the ledger file is no longer at its path (a write to it is refused, and held: it may come back)."""


def _cannot_write_beside(exc: BaseException) -> bool:
    """Did opening an SQLite database fail for want of the right to write it or to create its ``-shm``?"""
    code = _sqlite_code(exc)
    if code is not None:
        return code in (_SQLITE_READONLY, _SQLITE_CANTOPEN)
    return "readonly" in str(exc) or "unable to open" in str(exc)


def _make_parent(path: Path) -> None:
    """Create a new SQLite ledger's directory. Under a file (``afile/ledger.sqlite``) mkdir says "File exists",
    naming the file, as if the directory were there: the OSError says instead which path is not a directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = path.parent
        while not above.is_dir() and above != above.parent:  # the nearest existing ancestor: not a directory
            if os.path.lexists(above):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(above)) from None
            above = above.parent
        raise


#: the first bytes of every SQLite database file that is not empty
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _refuse_not_sqlite(path: Path) -> None:
    """Refuse a file that is not empty and is not an SQLite database, as SQLite refuses all but one of them: it
    reads a file of one byte (a stray ``printf x``) as an empty database, and the ledger would be written over
    it. A file the ledger did not create is never overwritten."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except (FileNotFoundError, IsADirectoryError):
        return  # a new ledger, or SQLite's own error for a directory
    if head and head != _SQLITE_MAGIC:
        raise sqlite3.DatabaseError("file is not a database")  # SQLite's own words for a longer one


class _Dialect:
    name = "sqlite"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def sql(self, statement: str) -> str:
        return statement

    #: errors that are one record's own fault (a duplicate request id), not the database's
    record_faults: tuple[type[BaseException], ...] = (sqlite3.IntegrityError, sqlite3.DataError)
    #: the database's faults that may pass (a lock held elsewhere, a full disk, a file read-only or moved, an I/O
    #: error): a write that met one is held, and tried again until it commits
    held_faults: tuple[type[BaseException], ...] = (sqlite3.OperationalError, _FileMoved)

    def may_pass_soon(self, exc: BaseException) -> bool:
        """Might a held write's fault pass within the waiter's ``timeout_s`` (a lock another process holds), so
        that its waiter waits for the next tries rather than being told at once?"""
        return _is_locked(exc)

    def connect(self, target: str, timeout: float | None = None) -> Any:
        # (``timeout`` bounds PostgreSQL's connection set-up; SQLite's busy timeout is set by the ledger)
        path = expand_path(target, "ledger.path")
        _make_parent(path)
        _refuse_not_sqlite(path)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        # switching a new file to WAL takes a lock the busy timeout does not wait for: processes opening a new
        # ledger together would fail at once ("database is locked"), so wait for it here
        deadline = time.monotonic() + 30
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def execute_whole_rows(self, conn: Any, sql: str, params: Sequence[Any]) -> Any:
        """Run a statement that may read whole rows (``SELECT *``). SQLite prepares it again when another
        connection changes the table."""
        return conn.execute(sql, params)

    def connect_reader(self, target: str, timeout: float | None = None) -> Any:
        """A connection for reading an existing ledger: nothing is created or switched (a read-only file
        opens read-only). A WAL database is read through its ``-shm`` file, which SQLite creates if it is
        missing: a user who may only read the file and its directory (the server stopped cleanly, leaving no
        ``-wal`` nor ``-shm``) cannot, and gets "attempt to write a readonly database". Then, and only when
        no ``-wal`` file exists (so no committed write is left unread), the file is opened read-only as
        immutable, which needs no ``-shm``."""
        path = expand_path(target, "ledger.path")
        busy = 30 if timeout is None else timeout  # a lock waited for as a write is
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the -shm of a WAL database
            return conn
        except sqlite3.Error as exc:
            conn.close()
            if not _cannot_write_beside(exc) or Path(f"{path}-wal").exists():
                raise
        uri = f"file:{quote(str(path.absolute()))}?mode=ro&immutable=1"
        return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=busy)

    def probe_write(self, conn: Any, key: str, lock_wait_s: float, restore_busy_ms: int) -> None:
        """A small write committed: it takes the write lock (waiting at most ``lock_wait_s`` for another
        process's transaction) and commits one row (``meta`` key ``ready_probe``: when it ran, overwritten by
        each probe), so a locked, read-only or full database fails here. (A write rolled back, as
        PostgreSQL's probe does, would not do on SQLite: its changes never reach the WAL, so it passes on a
        full disk where every commit fails.) ``key`` is PostgreSQL's."""
        conn.execute(f"PRAGMA busy_timeout={max(1, int(lock_wait_s * 1000))}")
        try:
            with self.transaction(conn):
                conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                             "value = excluded.value", (_SQLITE_PROBE_KEY, f"{time.time():.6f}"))
        finally:
            conn.execute(f"PRAGMA busy_timeout={restore_busy_ms}")

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled the transaction back itself (a full disk, an I/O error), or left it open
            # (a COMMIT that failed): either way none is left open for the next one to trip over
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.warning("ledger: rolling back a failed transaction failed: %s", exc)
            raise

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def row(self, values: Sequence[Any]) -> tuple:
        """A row of parameters as this database takes it."""
        return tuple(values)

    @contextmanager
    def schema_lock(self, conn: Any) -> Iterator[None]:
        """Held while the schema is created or migrated: processes opening one ledger at once would race to
        add the same column ("duplicate column"). SQLite: one write transaction."""
        with self.transaction(conn):
            yield


class _Postgres(_Dialect):
    name = "postgresql"
    serial = "BIGSERIAL PRIMARY KEY"

    def __init__(self) -> None:
        import psycopg

        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.record_faults = (psycopg.IntegrityError, psycopg.DataError)
        # the server unreachable (a restart, a failover), out of disk, a statement or lock timeout, read-only (a
        # primary demoted, default_transaction_read_only set for maintenance)
        self.held_faults = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)

    def may_pass_soon(self, exc: BaseException) -> bool:
        # a restart or a failover takes seconds: its waiter waits (timeout_s at most); a full disk or a read-only
        # server is told at once
        return isinstance(exc, self._psycopg.OperationalError) and not isinstance(exc, self._psycopg.errors.DiskFull)

    def sql(self, statement: str) -> str:
        return statement.replace("%", "%%").replace("?", "%s")

    def connect(self, target: str, timeout: float | None = None) -> Any:
        from psycopg.conninfo import conninfo_to_dict

        extra: dict[str, Any] = {}
        if timeout is not None and "connect_timeout" not in conninfo_to_dict(target):  # the URL's own wins
            extra["connect_timeout"] = max(2, math.ceil(timeout))  # (libpq: whole seconds, 2 at least)
        return self._psycopg.connect(target, autocommit=True, **extra)

    def connect_reader(self, target: str, timeout: float | None = None) -> Any:
        return self.connect(target, timeout)

    def execute_whole_rows(self, conn: Any, sql: str, params: Sequence[Any]) -> Any:
        # never as a prepared statement (psycopg prepares one run 5 times): PostgreSQL refuses to run a prepared
        # SELECT * once its table has a column more ("cached plan must not change result type"), at every call,
        # which a newer replica migrating the ledger under this one would make of each lookup until a restart
        return conn.execute(sql, params, prepare=False)

    def probe_write(self, conn: Any, key: str, lock_wait_s: float, restore_busy_ms: int) -> None:
        # a row inserted and rolled back: a read-only server (default_transaction_read_only, a standby) or a
        # role that may not write fails here; the server itself bounds the statement too
        with conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = {max(1, int(lock_wait_s * 1000))}")
            conn.execute("INSERT INTO meta(key, value) VALUES (%s, %s)", (key, ""))
            raise self._psycopg.Rollback

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def row(self, values: Sequence[Any]) -> tuple:
        # PostgreSQL's text holds no NUL character (psycopg refuses the whole write): a client's text that
        # has one (an error message quoting it, a stored prompt) is kept with U+FFFD in its place
        return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for v in values)

    @contextmanager
    def schema_lock(self, conn: Any) -> Iterator[None]:
        # replicas opening one ledger at once would race to create or migrate it ("column already exists"):
        # one transaction (PostgreSQL's DDL is transactional: a failed migration leaves nothing half done)
        # under a transaction-level advisory lock, waited for a bounded time (a replica stuck mid-migration
        # makes the others fail with a message, not hang)
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '60s'")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            yield


#: the advisory lock key PostgreSQL replicas take around schema changes (any constant: "cascade" in ASCII)
_SCHEMA_LOCK = 0x636173636164


def _dialect_for(target: str) -> _Dialect:
    if why := ledger_url_problem(target):  # (a command's --ledger and the Python API: a config's path was checked)
        raise ConfigError(f"ledger: {why}")
    if target.startswith(LEDGER_URL_SCHEMES):
        try:
            return _Postgres()
        except ImportError as exc:
            raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'psycopg[binary]'") from exc
    return _Dialect()


#: connection parameters that hold a secret (libpq's names)
_SECRET_PARAMS = ("password", "sslpassword")
#: ``password=…`` in a key=value connection string (a value quoted, with backslash escapes, or up to a space)
_SECRET_KV = re.compile(r"(?i)\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")


def _redact(target: str) -> str:
    """A ledger target without its secrets, for messages (logs, /ready, errors, reports): the password of a
    URL's user info, its ``password=`` and ``sslpassword=`` query parameters, those keys of a ``key=value``
    connection string, and wherever else libpq would find them (their values are masked wherever they
    appear)."""
    if "://" not in target:
        return _SECRET_KV.sub(r"\1***", target)
    scheme, rest = target.split("://", 1)
    head, sep, query = rest.partition("?")
    if "@" in head:  # user info: up to the last "@" before the query (at worst, more is masked)
        creds, host = head.rsplit("@", 1)
        head = f"{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else head
    rest = head + sep + query
    base, sep, query = rest.partition("?")
    if sep:
        params = []
        for param in query.split("&"):
            key, eq, _ = param.partition("=")
            secret = eq and unquote(key).strip().lower() in _SECRET_PARAMS
            params.append(f"{key}=***" if secret else param)
        rest = base + "?" + "&".join(params)
    for value in _secret_values(target):  # where libpq finds one that the above missed (an odd URL)
        for form in {value, quote(value, safe=""), quote(value)}:
            rest = re.sub(rf"(?<=[:=]){re.escape(form)}(?=[@&#]|$)", "***", rest)
    return f"{scheme}://{rest}"


def _secret_values(target: str) -> list[str]:
    """The secrets of a PostgreSQL URL as libpq reads it (longest first); none where it does not parse."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(target)
    except Exception:  # noqa: BLE001 - no psycopg, or not a URL libpq takes: the masking above stands
        return []
    return sorted((str(params[k]) for k in _SECRET_PARAMS if params.get(k)), key=len, reverse=True)


def _redact_in(text: str, target: str) -> str:
    """A driver's message about ``target`` without the target's secrets. libpq quotes a URL it cannot parse,
    whole ("... in URI: "postgresql://u:pw@[::1/db"") or the part it stumbled on (a password with a bad %-escape
    or a space), and such a URL gives no secrets to :func:`_secret_values`: those written in it (its user info's
    password, its password parameters, as written and decoded) are masked wherever they stand apart. (Of a URL it
    parses, its messages name hosts, ports and users, never the password.)"""
    if "://" not in target:
        return text
    try:
        from psycopg.conninfo import conninfo_to_dict

        conninfo_to_dict(target)
        return text
    except Exception:  # noqa: BLE001 - not a URL libpq takes (or no psycopg): its message may quote it
        pass
    text = text.replace(target, _redact(target))
    head, _, query = target.split("://", 1)[1].partition("?")
    creds = head.rsplit("@", 1)[0] if "@" in head else ""
    written = [creds.split(":", 1)[1]] if ":" in creds else []
    for param in query.split("&"):
        key, eq, value = param.partition("=")
        if eq and unquote(key).strip().lower() in _SECRET_PARAMS:
            written.append(value)
    secrets = {form for value in written for form in (value, unquote(value)) if form}
    for secret in sorted(secrets, key=len, reverse=True):  # (not inside a word: a password "on" in "connection")
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


_INSERT_REQUEST = (
    "INSERT INTO requests (request_id, created_at, policy, endpoint, api_key_id, user_tier, status, tier, model, "
    "confidence, escalated, n_attempts, prompt_tokens, completion_tokens, cost_usd, baseline_cost_usd, "
    "baseline_estimated, escalation_waste_usd, latency_ms, error_class, error_message, cached_from, end_user, "
    "metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (request_id, idx, tier, model, backend, prompt_tokens, completion_tokens, "
    "latency_ms, cost_usd, confidence, decision, reason, kept, error_class, error_message, features, "
    "text, answer_sig, cached_prompt_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_SHADOW_COLUMNS = ("request_id, shadow, created_at, status, tier, escalated, cost_usd, diverges, reason, sampled, "
                   "sample_cost_usd")
_INSERT_SHADOW = f"INSERT INTO shadow_decisions ({_SHADOW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
#: a sampled shadow's outcome replaces the decision written with the request (or is written, if missing)
_UPSERT_SHADOW = (_INSERT_SHADOW + " ON CONFLICT (request_id, shadow) DO UPDATE SET status = excluded.status, "
                  "tier = excluded.tier, escalated = excluded.escalated, cost_usd = excluded.cost_usd, "
                  "diverges = excluded.diverges, reason = excluded.reason, sampled = excluded.sampled, "
                  "sample_cost_usd = excluded.sample_cost_usd")
_INSERT_SHADOW_ATTEMPT = (
    "INSERT INTO shadow_attempts (request_id, shadow, idx, created_at, tier, model, backend, prompt_tokens, "
    "completion_tokens, latency_ms, cost_usd, confidence, decision, reason, error_class, error_message, features, "
    "text, answer_sig, cached_prompt_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (request_id, shadow, idx) DO NOTHING")

_UPSERT_INFLIGHT = (
    "INSERT INTO inflight (request_id, instance, created_at, updated_at, record) VALUES (?,?,?,?,?) "
    "ON CONFLICT (request_id) DO UPDATE SET instance = excluded.instance, updated_at = excluded.updated_at, "
    "record = excluded.record")
#: a request's row recorded from the journal (and its attempts), replaced by its own (:meth:`Ledger._write`)
_DROP_INTERRUPTED_ATTEMPTS = (f"DELETE FROM attempts WHERE request_id IN (SELECT request_id FROM requests "
                              f"WHERE request_id = ? AND error_class = '{INTERRUPTED}')")
_DROP_INTERRUPTED = f"DELETE FROM requests WHERE request_id = ? AND error_class = '{INTERRUPTED}'"
_UPSERT_HOLD = ("INSERT INTO spend_holds (hold_id, bucket, instance, amount_usd, created_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT (hold_id, bucket) DO UPDATE SET amount_usd = excluded.amount_usd")
_ADD_SPEND = ("INSERT INTO spend_daily (day, bucket, cost_usd) VALUES (?,?,?) ON CONFLICT (day, bucket) "
              "DO UPDATE SET cost_usd = spend_daily.cost_usd + excluded.cost_usd")
_UPSERT_INSTANCE = (
    "INSERT INTO instances (instance, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?) "
    "ON CONFLICT (instance) DO UPDATE SET heartbeat_at = excluded.heartbeat_at")

_STOP = object()
#: "the ledger's own timeout" (``Ledger._call``)
_DEFAULT = object()

#: SQLite, served ledger: a PASSIVE checkpoint (copying the WAL back into the database file, with its
#: fsyncs) runs on a thread of its own every this many written records (~1000 WAL pages, SQLite's default
#: threshold), so that no request waits for one ...
_CHECKPOINT_EVERY_RECORDS = 100
#: ... and the writer's own automatic checkpoint stays as a safety net, at a higher threshold (pages)
_WRITER_AUTOCHECKPOINT_PAGES = 10000

log = logging.getLogger("cascade.ledger")


class _Checkpointer:
    """A thread with its own SQLite connection that checkpoints the WAL when poked (PASSIVE: it never blocks
    the writer or readers; WAL mode lets a checkpoint run beside a write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cascade-ledger-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        conn = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer's automatic checkpoint remains
                    log.warning("ledger checkpoint failed: %s", exc)
        except sqlite3.Error as exc:
            log.warning("ledger checkpoint thread cannot open %s: %s", self.path, exc)
        finally:
            if conn is not None:
                conn.close()


class _Job:
    """One unit of work for the ledger thread: a record to write (``rec`` set) or a call (``fn``)."""

    __slots__ = ("rec", "shadows", "fn", "args", "loop", "fut", "expired", "sent", "error", "told", "corrected",
                 "telling")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future, *, rec: CascadeRecord | None = None,
                 shadows: list[dict[str, Any]] | None = None, fn: Callable[..., Any] | None = None,
                 args: tuple = ()) -> None:
        self.rec, self.shadows, self.fn, self.args, self.loop, self.fut = rec, shadows, fn, args, loop, fut
        #: its waiter was told it failed (``ledger.timeout_s`` passed): set on the event loop only
        self.expired = False
        #: the record's answer went out before its write (a stream): a late commit leaves it as it is
        self.sent = False
        #: a write held for another try (the database was locked, full...): why its last try failed
        self.error: BaseException | None = None
        #: the failure its waiter was told of, its write still queued (set on the event loop before ``fut`` gets it)
        self.told: LedgerTimeoutError | None = None
        #: held, its waiter is being told so at once (:meth:`Ledger._tell_now`), not after ``timeout_s``: ledger thread
        self.telling = False
        #: committed late, its row was made that failure on the ledger thread already (no correction to queue)
        self.corrected = False


def log_failure(fut: asyncio.Future) -> None:
    """Done callback of a ledger job (or write) nobody awaits: its failure is logged."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.warning("%s", exc)


def _refuse_newer(row: tuple, what: str, verb: str) -> None:
    """A ledger whose schema version (``row[0]``) is newer than this version ``verb`` (reads, writes), or is no
    version number at all (a meta table edited by hand: which columns it has is anyone's guess): refused."""
    if not str(row[0]).isdigit():
        raise LedgerError(f"ledger {what} has schema version {str(row[0])[:40]!r}, which is no version number (its "
                          "meta table was edited?): set meta.schema_version back to the version that wrote it")
    if int(row[0]) > SCHEMA_VERSION:
        raise LedgerError(f"ledger {what} has schema version {row[0]}, newer than this cascade-engine {verb} "
                          f"({SCHEMA_VERSION}): upgrade cascade-engine")


def _settle(done: list[tuple[_Job, BaseException | None, Any]], ledger: "Ledger") -> None:
    """On the event loop: hand each job's outcome to its waiter (a cancelled waiter no longer wants it); a
    write whose waiter was told it timed out goes to :meth:`Ledger._settled_late`."""
    for job, exc, result in done:
        fut = job.fut
        if fut.done():
            if job.expired and job.rec is not None:
                ledger._settled_late(job, exc)
            elif exc is not None:  # nobody waits for it any more: say so rather than drop it
                log.warning("ledger: %s (the caller had stopped waiting)", exc)
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


@cache
def _host_key() -> str:
    """This machine, its boot and this process's PID namespace: another process is looked for by its pid only
    where all three are the same (a pid of another container or machine means nothing here)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:  # not Linux: the host name alone
        pass
    return " ".join(parts)


def _pid_alive(pid: int) -> bool:
    """Is process ``pid`` (of this machine and namespace) running? A zombie (dead, not yet reaped) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _record_json(rec: CascadeRecord, store_text: bool) -> str:
    """A record as the ``inflight`` table keeps it (answers' text only where the ledger stores text)."""
    d = asdict(rec)
    if not store_text:
        for a in d["attempts"]:
            a["text"] = None
    return json.dumps(d, ensure_ascii=False)


def _record_from_json(text: str) -> CascadeRecord:
    d = json.loads(text)
    names = {f.name for f in fields(Attempt)}
    attempts = [Attempt(**{k: v for k, v in a.items() if k in names}) for a in d.pop("attempts", ())]
    names = {f.name for f in fields(CascadeRecord)}
    return CascadeRecord(**{k: v for k, v in d.items() if k in names}, attempts=attempts)


class Ledger:
    """The ledger. ``target`` is a SQLite file path or a ``postgresql://`` URL.

    Use ``await ledger.open()`` / ``await ledger.close()`` (or ``async with``).
    """

    def __init__(self, target: str | Path, *, store_text: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_pending: int = DEFAULT_MAX_PENDING, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, journal_delay_s: float = JOURNAL_DELAY_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"ledger timeout_s must be above 0, not {timeout_s!r}")
        if max_pending < 1:
            raise ValueError(f"ledger max_pending must be at least 1, not {max_pending!r}")
        if not 0 < heartbeat_s < stale_s:
            raise ValueError(f"ledger heartbeat_s ({heartbeat_s!r}) must be above 0 and below stale_s ({stale_s!r})")
        self.target = str(target)
        self.store_text = store_text
        #: how long a caller waits for its write or read on the ledger thread (and GET /ready for its probe)
        #: before it is told the ledger is not answering; bounds connecting to PostgreSQL and SQLite's wait
        #: for another process's write lock too
        self.timeout_s = float(timeout_s)
        #: the most jobs waiting for the ledger thread: past it a job fails at once (and the ledger is not
        #: ready) rather than the queue, and the memory it holds, growing through a long outage
        self.max_pending = int(max_pending)
        #: called on the event loop with ``(record, error or None)`` once a write whose waiter was told it
        #: timed out (:class:`LedgerTimeoutError`) is committed after all (then recorded as that failure), or
        #: fails; must be quick, not raise
        self.late_listeners: list[Callable[[CascadeRecord, BaseException | None], None]] = []
        self.dialect = _dialect_for(self.target)
        self._conn: Any = None
        #: why the ledger cannot be written right now (its database unreachable, read-only, locked, not
        #: answering), for readiness checks; None while writes succeed. Set by a write that failed through
        #: no fault of its record; cleared by the next write that succeeds or readiness probe that proves
        #: writes work
        self.unavailable: str | None = None
        #: since when (time.monotonic()) the ledger thread has been on its current job; None while idle
        self._busy_since: float | None = None
        #: the readiness probe queued and not yet answered (GET /ready calls share it)
        self._probing: _Job | None = None
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._checkpointer: _Checkpointer | None = None
        self._since_checkpoint = 0
        #: writes the ledger thread holds for another try (:meth:`_retryable`): they count toward
        #: ``max_pending`` as the queued records do; the fault the latest try met, and their requests' ids (for
        #: a close that stops waiting before the ledger thread gives them up)
        self._held = 0
        self._held_fault: BaseException | None = None
        self._held_ids: list[str] = []
        #: SQLite: the ledger file's ``(st_dev, st_ino)`` when it was opened, so that the readiness probe sees
        #: it moved or deleted (the connection would go on writing to the file it opened, unseen)
        self._file_id: tuple[int, int] | None = None
        #: a served ledger's heartbeat period, and the heartbeat age past which another process counts as dead
        self.heartbeat_s, self.stale_s = float(heartbeat_s), float(stale_s)
        #: how long a journaled record waits before it is written (:meth:`journal`)
        self.journal_delay_s = max(0.0, float(journal_delay_s))
        #: this ledger's process as the ``instances`` table names it (one per open ledger: a process may open
        #: several), and since when (time.monotonic()) its heartbeats have been written without a failure
        self._instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._beating_since: float | None = None
        #: the other processes' heartbeats as this one last read them, each with since when (time.monotonic())
        #: it has read that same value
        self._seen: dict[str, tuple[float, float]] = {}
        #: this process's daily spend holds as written (ledger thread only): hold id -> bucket -> (amount, written
        #: at), so that a process another took for dead (and deleted the holds of) writes them again
        self._holds: dict[str, dict[str, tuple[float, float]]] = {}
        self._registered = False  # (its heartbeat row written once: missing later, it was taken for dead)
        self._beat_task: asyncio.Task | None = None
        #: the journal (:meth:`journal`): how to make the record of each request in flight not yet written, and
        #: the requests journaled whose own write is not done, both under the lock (the event loop adds, the ledger
        #: thread takes); the timer set for the next one due (event loop only)
        self._journal_lock = threading.Lock()
        self._journal_pending: dict[str, tuple[float, Callable[[], CascadeRecord]]] = {}  # (when due, how)
        self._journaled: set[str] = set()
        self._journal_timer: asyncio.TimerHandle | None = None
        #: held writes were given up as the ledger closed (another process holds the lock): no more writes
        self._gave_up = False
        #: the reads on this connection are within :meth:`snapshot` (the caller's thread: a reading command's)
        self._snapshot = False
        d = self.dialect
        self._sql_request, self._sql_attempt, self._sql_shadow = (
            d.sql(_INSERT_REQUEST), d.sql(_INSERT_ATTEMPT), d.sql(_INSERT_SHADOW))

    @property
    def path(self) -> Path | None:
        return None if self.dialect.name != "sqlite" else expand_path(self.target, "ledger.path")

    # --- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> "Ledger":
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._worker, args=(self._queue,), name="cascade-ledger",
                                            daemon=True)
            self._thread.start()
            try:  # no deadline: creating or migrating a big ledger may take long
                await self._call(self._open_sync, timeout=None)
                if self.dialect.name == "sqlite":  # checkpoints off the request path (see _Checkpointer)
                    await self._call(self.execute, f"PRAGMA wal_autocheckpoint={_WRITER_AUTOCHECKPOINT_PAGES}",
                                     timeout=None)
                    # a write waits for another process's lock no longer than its caller waits for it
                    await self._call(self.execute, f"PRAGMA busy_timeout={self._busy_ms}", timeout=None)
                    self._checkpointer = _Checkpointer(expand_path(self.target, "ledger.path"))
            except BaseException:
                self._stop_thread()
                self.close_sync()  # the thread is gone: nobody else uses the connection
                raise
            try:  # the first heartbeat: the requests of processes gone since are recorded before any of ours
                await self._call(self._heartbeat_sync, timeout=None)
            except LedgerError as exc:  # unreachable: not ready, as any write would say; the heartbeats go on
                log.warning("ledger heartbeat failed: %s", exc)
            self._beat_task = asyncio.get_running_loop().create_task(self._beat(), name="cascade-ledger-heartbeat")
        return self

    def open_sync(self) -> "Ledger":
        """Open for synchronous use from one thread (command-line reports)."""
        self._open_sync()
        return self

    @property
    def _busy_ms(self) -> int:
        """SQLite's busy timeout (ms) on the served ledger's connection: ``timeout_s``."""
        return max(1, int(self.timeout_s * 1000))

    def open_existing_sync(self) -> "Ledger":
        """Open a ledger that must already exist, for commands that only read it (reports, recalibration):
        a missing file, or a database without a cascade ledger's ``meta`` and ``requests`` tables, is a
        LedgerError, and nothing is created in it. It is only read (a role with SELECT alone, a read-only file
        will do), whatever its schema: one of an older schema is never migrated (:meth:`_read_as_current`);
        one of a newer schema is refused."""
        what = _redact(self.target)
        if self.dialect.name == "sqlite":
            path = expand_path(self.target, "ledger.path")
            if not path.exists():
                raise LedgerError(f"no ledger at {what} (serve some traffic first, or pass --ledger PATH_OR_URL)")
            if not path.is_file():
                raise LedgerError(f"{what} is not a cascade ledger (not a file)")
        conn, keep, row = None, False, None
        try:
            # a plain connection: no WAL switch, nothing written
            conn = self.dialect.connect_reader(self.target, self.timeout_s)
            tables = self._tables(conn)
            if {"meta", "requests"} <= tables:
                row = conn.execute(self.dialect.sql("SELECT value FROM meta WHERE key = ?"),
                                   ("schema_version",)).fetchone()
            if row is not None and str(row[0]) != str(SCHEMA_VERSION):
                _refuse_newer(row, what, "reads")
                self._read_as_current(conn, tables)
            keep = row is not None
        except (*self.dialect.errors, OSError) as exc:
            older = f" (schema version {row[0]}, read as it is: {_READ_OLDER})" if row is not None else ""
            raise LedgerError(f"cannot open ledger {what}{older}: {_redact_in(str(exc), self.target)}") from exc
        finally:
            if conn is not None and not keep:
                conn.close()
        if row is None:
            raise LedgerError(f"{what} is not a cascade ledger (no meta and requests tables with a schema version)")
        self._conn = conn  # read as it is, with the rights to read it only
        return self

    def _read_as_current(self, conn: Any, tables: set[str]) -> None:
        """An older ledger read as it is, never migrated by a command that only reads it (servers of its own
        version may be writing to it, and could not once it is migrated): on this connection only, temporary
        views show its tables with the columns added since as NULL (what a migration gives the rows it finds),
        and temporary empty tables stand in for the tables it lacks."""
        d = self.dialect
        schema = "main" if d.name == "sqlite" else conn.execute("SELECT current_schema()").fetchone()[0]
        for stmt in _TABLES:
            if stmt.startswith("CREATE TABLE") and _created(stmt) not in tables:  # (a temporary one references none)
                ddl = re.sub(r"\s+REFERENCES\s+\w+\s*\([^)]*\)", "", stmt.replace("{serial}", d.serial))
                conn.execute(d.sql(ddl.replace("CREATE TABLE", "CREATE TEMP TABLE", 1)))
        missing: dict[str, list[str]] = {}
        for table, col, typ in _missing_columns(conn, tables, f"{schema}."):
            missing.setdefault(table, []).append(f"CAST(NULL AS {typ}) AS {col}")
        for table, cols in missing.items():
            conn.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {', '.join(cols)} FROM {schema}.{table}")

    def _open_sync(self) -> None:
        conn = None
        try:
            conn = self.dialect.connect(self.target, self.timeout_s)
            with self.dialect.schema_lock(conn):
                self._check_ours(conn)
                self._create_or_migrate(conn)
            if self.dialect.name == "sqlite":
                st = os.stat(expand_path(self.target, "ledger.path"))
                self._file_id = (st.st_dev, st.st_ino)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, (*self.dialect.errors, OSError)):
                raise LedgerError(f"cannot open ledger {_redact(self.target)}: {_redact_in(str(exc), self.target)}") \
                    from exc
            raise
        self._conn = conn

    def _tables(self, conn: Any) -> set[str]:
        """The tables of the ledger's database (SQLite's own left out), or of its PostgreSQL schema."""
        if self.dialect.name == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        else:
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        return {r[0] for r in conn.execute(sql).fetchall()}

    def _indexes(self, conn: Any) -> set[str]:
        """The indexes of the ledger's database, or of its PostgreSQL schema."""
        if self.dialect.name == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
        else:
            sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        return {r[0] for r in conn.execute(sql).fetchall()}

    def _check_ours(self, conn: Any) -> None:
        """Before anything is created or migrated: refuse a ledger of a newer schema (this version would write
        rows that version does not expect; this version's reports refuse it already), and an SQLite file
        holding another program's tables (the ledger's would be added beside them). A PostgreSQL schema may
        hold other tables: only the version is checked there."""
        what = _redact(self.target)
        tables = self._tables(conn)
        if self.dialect.name == "sqlite" and tables and not tables & _TABLE_NAMES:
            listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise LedgerError(f"{what} is not a cascade ledger (it holds other tables: {listed}); "
                              "point ledger.path at a new file")
        if "meta" in tables:
            row = conn.execute(self.dialect.sql("SELECT value FROM meta WHERE key = ?"),
                               ("schema_version",)).fetchone()
            if row is not None:
                _refuse_newer(row, what, "writes")

    def _create_or_migrate(self, conn: Any) -> None:
        row = conn.execute(self.dialect.sql("SELECT value FROM meta WHERE key = ?"), ("schema_version",)).fetchone() \
            if "meta" in (tables := self._tables(conn)) else None
        # (a column of _ADDED_COLUMNS missing from a ledger of this version: one dropped by hand, the version left
        # as it was; the migration adds it again, where every request would be answered, then its row refused)
        if row is not None and str(row[0]) == str(SCHEMA_VERSION) and _TABLE_NAMES <= tables \
                and not _missing_columns(conn, tables):
            # up to date: no DDL, whose table locks (PostgreSQL's CREATE INDEX IF NOT EXISTS takes one even when the
            # index is there) would deadlock with the writes of the replicas serving it already
            return
        # only what is missing: PostgreSQL's CREATE INDEX IF NOT EXISTS locks its table even when the index is
        # there, in this list's order, which could deadlock with the writes of older replicas still serving
        have = tables | self._indexes(conn)
        for stmt in _TABLES:
            if _created(stmt) not in have:
                conn.execute(self.dialect.sql(stmt.replace("{serial}", self.dialect.serial)))
        for table, col, typ in _missing_columns(conn, _ADDED_COLUMNS):  # (every table is there by now)
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
        for stmt in _ADDED_INDEXES:  # on added columns: after them
            if _created(stmt) not in have:
                conn.execute(stmt)
        if "requests" in tables and "spend_daily" not in tables:  # an older ledger: today's and yesterday's spend
            self._seed_spend_daily(conn)                            # (the limits read today only; after end_user)
        conn.execute(self.dialect.sql("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT DO NOTHING"),
                     ("schema_version", str(SCHEMA_VERSION)))
        row = conn.execute(self.dialect.sql("SELECT value FROM meta WHERE key = ?"), ("schema_version",)).fetchone()
        if row is not None and row[0].isdigit() and int(row[0]) < SCHEMA_VERSION:  # migrated just above
            conn.execute(self.dialect.sql("UPDATE meta SET value = ? WHERE key = ?"),
                         (str(SCHEMA_VERSION), "schema_version"))

    def _seed_spend_daily(self, conn: Any) -> None:
        """Migrating to version 8: ``spend_daily`` from the requests and shadow calls recorded since yesterday
        (UTC)."""
        d, since = self.dialect, utc_day_start() - 86400.0
        rows = conn.execute(d.sql("SELECT created_at, api_key_id, end_user, cost_usd FROM requests WHERE "
                                  "created_at >= ? AND cost_usd <> 0"), (since,)).fetchall()
        add = dict(_spend_by_bucket(rows))
        for shadow, t, cost in conn.execute(d.sql("SELECT shadow, created_at, cost_usd FROM shadow_attempts WHERE "
                                                  "created_at >= ? AND cost_usd <> 0"), (since,)).fetchall():
            k = (int(t // 86400), spend_bucket(("shadow", shadow)))
            add[k] = add.get(k, 0.0) + cost
        if add:
            conn.cursor().executemany(d.sql(_ADD_SPEND), [d.row((day, b, c)) for (day, b), c in sorted(add.items())])

    async def close(self) -> None:
        """Close once everything queued is written. A ledger thread stuck on a database that does not answer
        (for longer than ``timeout_s``) is left behind, not waited for: the writes still queued behind it
        have been answered with an error already."""
        if self._beat_task is not None:
            self._beat_task.cancel()
            self._beat_task = None
        if self._journal_timer is not None:  # (the close writes no journal: every request in flight has ended)
            self._journal_timer.cancel()
            self._journal_timer = None
        if self._thread is not None:
            ckpt, self._checkpointer = self._checkpointer, None
            if ckpt is not None:  # first, so that the writer's connection is the last and checkpoints on close
                ckpt.stop()
            job = self._enqueue(fn=self.close_sync, timeout=self.timeout_s, what="closing the ledger", force=True)
            join = True
            try:
                await job.fut
            except LedgerError as exc:
                if not job.expired:
                    raise
                join = False
                log.warning("%s; closing without waiting for it", exc)
                if ids := list(self._held_ids):  # the ledger thread may not get to give them up before the exit
                    log.warning("ledger %s: %d held writes may be lost, their requests %s", _redact(self.target),
                                len(ids), _named(ids))
            finally:
                self._stop_thread(join=join)

    def _stop_thread(self, join: bool = True) -> None:
        thread, q, ckpt = self._thread, self._queue, self._checkpointer
        self._thread = self._queue = self._checkpointer = None
        if thread is not None and q is not None:
            q.put(_STOP)  # after everything queued before it
            if join:
                thread.join()
        if ckpt is not None:
            ckpt.stop()

    def close_sync(self) -> None:
        if self._conn is not None:
            if self._registered:  # served (its latest heartbeat may have failed): its leftovers recorded, its
                self._retire()    # heartbeat row gone
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> "Ledger":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the ledger thread ------------------------------------------------------------------------
    async def _call(self, fn, *args, timeout: float | None | object = _DEFAULT):  # noqa: ANN001, ANN202
        """Run ``fn(*args)`` on the ledger thread, after everything queued before it; a LedgerError once
        ``timeout`` seconds (default ``timeout_s``; None: none) pass without an answer."""
        limit = self.timeout_s if timeout is _DEFAULT else timeout
        return await self._enqueue(fn=fn, args=args, timeout=limit, what="a query").fut  # type: ignore[arg-type]

    def _enqueue(self, *, timeout: float | None, what: str, rec: CascadeRecord | None = None,
                 shadows: list[dict[str, Any]] | None = None, fn: Callable[..., Any] | None = None,
                 args: tuple = (), force: bool = False) -> _Job:
        """Queue a job for the ledger thread (from the event loop). Its future gets a LedgerError once
        ``timeout`` seconds pass without an answer (the job itself still runs when the thread reaches it).
        ``force``: queued even past ``max_pending`` (closing the ledger, which must reach the held writes)."""
        q = self._queue
        if q is None:
            raise LedgerError("ledger is not open")
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), rec=rec, shadows=shadows, fn=fn, args=args)
        # an outage has lasted: fail at once. Held writes count toward the limit of records, and of the readiness
        # probe (a server whose writes would be refused is not ready); other jobs are never held, and are run
        # between their tries (SQLite reads a full disk, or a file it may not write)
        waiting = q.qsize() + (self._held if rec is not None or fn == self._probe_sync else 0)
        if waiting >= self.max_pending and not force:
            self.unavailable = (f"ledger {_redact(self.target)} is not keeping up: {waiting} jobs are waiting for "
                                f"it (ledger.max_pending)")
            job.fut.set_exception(LedgerError(  # (said to a client: no target in it)
                f"ledger write failed for request {rec.request_id}: {waiting} writes are waiting for the ledger "
                "already (it is not keeping up)" if rec is not None else
                f"the ledger is not keeping up: {waiting} jobs are waiting for it"))
            return job
        if timeout is not None:
            timer = loop.call_later(timeout, self._expire, job, timeout, what)
            job.fut.add_done_callback(lambda _f: timer.cancel())
        q.put(job)
        return job

    def _settled_late(self, job: _Job, exc: BaseException | None) -> None:
        """On the event loop: a write whose waiter was told it failed (it timed out, or was held for a full disk...)
        is done at last. Committed, the row of an answer held back for it is made the failure its client saw (it
        had a 500, never the answer): status ``error`` with that error, nothing kept, no shadow decisions, as a
        failed request is recorded, so the ledger's answered requests are those whose answers went out (a stream's
        answer went out before its write: kept as it is). Failed: said. The late listeners hear either."""
        rec = job.rec
        told = job.fut.exception()
        why = ("it did not finish within the ledger's timeout" if type(told) is LedgerTimeoutError else
               "the ledger could not be written then")
        if exc is None:
            fix = not job.corrected and not job.sent and rec.status in ("ok", "partial")
            as_told = ", as that failure" if fix or job.corrected else ""
            log.warning("ledger: the write of request %s was committed after its caller had been told it failed "
                        "(%s); the row is kept%s", rec.request_id, why, as_told)
            if fix:  # not made that failure on the ledger thread right after the commit (:meth:`_correct`)
                try:
                    fixing = self._enqueue(fn=self._record_told_failure_sync, timeout=None, what="a correction",
                                           args=(rec.request_id, type(told).__name__, str(told)))
                    fixing.fut.add_done_callback(log_failure)
                except LedgerError as closed:  # the ledger is closing
                    log.warning("ledger: request %s stays recorded as answered: %s", rec.request_id, closed)
        else:
            log.warning("ledger: %s (the caller had stopped waiting)", exc)
        for listener in self.late_listeners:
            try:
                listener(rec, exc)
            except Exception:  # noqa: BLE001 - an observer never fails the ledger's delivery
                log.exception("ledger late listener %r failed", listener)

    def _record_told_failure_sync(self, request_id: str, error_class: str, message: str, status: str = "error",
                                  why: str = "committed after its caller was told it failed") -> None:
        """On the ledger thread: a committed request whose caller was told it failed (or, ``status`` cancelled,
        that got nothing of its answer), made that failure: no answer, nothing kept, all its cost waste, no
        shadow decisions (as a failed request is recorded). Only a row recorded as answered is changed."""
        conn, d = self._require(), self.dialect
        try:
            with d.transaction(conn):
                changed = conn.execute(d.sql(
                    "UPDATE requests SET status = ?, error_class = ?, error_message = ?, tier = NULL, model = NULL, "
                    "confidence = NULL, escalated = 0, escalation_waste_usd = cost_usd "
                    "WHERE request_id = ? AND status IN ('ok', 'partial')"),
                    d.row((status, error_class, message, request_id))).rowcount
                if changed:
                    conn.execute(d.sql("UPDATE attempts SET kept = 0 WHERE request_id = ?"), (request_id,))
                    conn.execute(d.sql("DELETE FROM shadow_decisions WHERE request_id = ?"), (request_id,))
        except d.errors as exc:
            self._write_failed(exc)
            raise LedgerError(f"ledger: request {request_id}, {why}, is still recorded as answered: {exc}") from exc

    def record_client_left(self, request_id: str, status: str, error_class: str, message: str) -> None:
        """From the event loop, once the row of ``request_id`` (an answer in hand, streamed) is committed as
        served: its client left before the end. ``status`` ``partial`` (some of the answer went out: the row
        keeps its answer) or ``cancelled`` (none did: as :meth:`_record_told_failure_sync`). Queued; a failure is
        logged."""
        if status == "cancelled":
            fn, args = self._record_told_failure_sync, (request_id, error_class, message, status,
                                                        "whose client left before its answer")
        else:
            fn, args = self._record_partial_sync, (request_id, error_class, message)
        try:
            self._enqueue(fn=fn, args=args, timeout=None, what="a correction").fut.add_done_callback(log_failure)
        except LedgerError as closed:  # the ledger is closing
            log.warning("ledger: request %s stays recorded as answered whole (its client left): %s", request_id,
                        closed)

    def _record_partial_sync(self, request_id: str, error_class: str, message: str) -> None:
        """On the ledger thread: a committed answer whose client took only part of it (a stream it left)."""
        conn, d = self._require(), self.dialect
        try:
            with d.transaction(conn):
                conn.execute(d.sql("UPDATE requests SET status = 'partial', error_class = ?, error_message = ? "
                                   "WHERE request_id = ? AND status = 'ok'"), d.row((error_class, message, request_id)))
        except d.errors as exc:
            self._write_failed(exc)
            raise LedgerError(f"ledger: request {request_id}, whose client left during its answer, is still "
                              f"recorded as answered whole: {exc}") from exc

    def _expire(self, job: _Job, timeout: float, what: str) -> None:
        """On the event loop: ``job`` got no answer in time: the ledger is not answering (a hung database
        server, a lock held elsewhere), so not ready; its waiter gets a LedgerError (a write that commits
        later is kept, and logged)."""
        if job.fut.done():
            return
        job.expired = True
        held = job.error  # (set by the ledger thread: tried, and held for another try)
        if held is None:  # (a held write's fault is in ``unavailable`` already, as it is)
            since = self._busy_since
            stuck = f"; the ledger has been on one statement for {time.monotonic() - since:.1f} s" if since else ""
            self.unavailable = f"ledger {_redact(self.target)} is not answering: {what} got no answer within " \
                               f"{timeout:g} s{stuck}"
        if job.rec is not None:  # (said to a client: no target in it)
            msg = (f"ledger write failed for request {job.rec.request_id}: not committed within {timeout:g} s " +
                   ("(the ledger is not answering)" if held is None else
                    f"({_held_why(held)}; it is held and tried again until it commits)"))
        else:
            msg = f"the ledger is not answering: {what} got no answer within {timeout:g} s"
        job.told = LedgerTimeoutError(msg)
        job.fut.set_exception(job.told)

    def _worker(self, q: queue.SimpleQueue) -> None:
        """The ledger thread: takes everything queued, writes consecutive records in one transaction. A write
        that failed through a fault of the database that may pass (:meth:`_retryable`: SQLite locked by another
        process, a full disk, a server unreachable...) is held and tried again, with the writes that arrive
        meanwhile, until it commits (probes and reads go on meanwhile); held writes count toward ``max_pending``,
        and a shutdown waits for them no longer than it waits for the ledger thread."""
        held: list[_Job] = []  # writes waiting for another try, oldest first
        tries, retry_at = 0, 0.0
        while True:
            self._note_held(held)
            if held:
                self._busy_since = None
                try:
                    first = q.get(timeout=max(0.0, retry_at - time.monotonic()))
                except queue.Empty:
                    first = None
            else:
                first = q.get()
            if first is _STOP:
                self._give_up(held)
                return
            jobs = [] if first is None else [first]
            stop = False
            while True:  # everything queued meanwhile joins this round
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            retried = bool(held) and time.monotonic() >= retry_at
            if retried:  # first: they were queued before everything now waiting
                jobs, held = held + jobs, []
            i = 0
            while i < len(jobs):
                self._busy_since = time.monotonic()
                if jobs[i].rec is not None:
                    j = i
                    while j < len(jobs) and jobs[j].rec is not None:
                        j += 1
                    if held:  # the database is locked still: these wait for the held writes' next try
                        held.extend(jobs[i:j])
                    else:
                        held.extend(self._write_or_hold(jobs[i:j], short=retried))
                    i = j
                else:
                    job = jobs[i]
                    if held and job.fn == self.close_sync:  # closing: the held writes first, while it waits
                        held = self._flush_held(held, job, retry_at)
                    elif (job.fn == self._probe_sync and (fault := self._held_fault) is not None
                          and not self.dialect.may_pass_soon(fault)):
                        held = self._write_or_hold(held, short=True)  # the probe says whether they can commit now
                        self._note_held(held)
                    try:
                        outcome = (None, job.fn(*job.args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                        outcome = (exc, None)
                    self._deliver([job], [outcome])
                    i += 1
            self._busy_since = None
            if not held:
                tries = 0
            elif retried or tries == 0:  # (tried and still locked) another try a little later
                tries += 1
                retry_at = time.monotonic() + min(_RETRY_FIRST_S * 2 ** (tries - 1), _RETRY_MOST_S)
            if stop:
                self._give_up(held)
                return

    def _note_held(self, held: list[_Job]) -> None:
        """On the ledger thread: how many writes are held, the fault the latest try met, and their requests."""
        if not held and not self._held:  # (every round of a ledger with nothing held: no more to say)
            return
        self._held = len(held)  # (a write that joined them without a try of its own has no fault yet)
        self._held_fault = next((_cause(j.error) for j in reversed(held) if j.error is not None), None)
        self._held_ids = [j.rec.request_id for j in held if j.rec is not None]

    def _write_or_hold(self, jobs: list[_Job], short: bool) -> list[_Job]:
        """Commit the records of ``jobs`` and hand each its outcome, but for those that failed through a fault of
        the database that may pass (:meth:`_retryable`): returned, to be held for another try."""
        for job in jobs:  # its waiter was told it failed (timed out) before this try: written as that failure
            if job.told is not None and not job.corrected:
                _write_as_told(job, job.told)
        outcomes = self._run_writes(jobs, short=short)
        held, done, new = [], [], 0
        for job, (exc, result) in zip(jobs, outcomes, strict=True):
            if exc is not None and self._retryable(exc):
                new += job.error is None
                job.error = exc
                held.append(job)
                if not job.telling and not self.dialect.may_pass_soon(exc.__cause__ or exc):  # told now
                    self._tell_now(job, exc)
            else:
                if exc is None:
                    self._correct(job)
                elif job.rec is not None:  # failed for good: nothing will delete its spend holds
                    self._settle_holds(job.rec)
                done.append((job, (exc, result)))
        if done:
            self._deliver([j for j, _ in done], [o for _, o in done])
        if new:  # (once for each write, not at every try)
            log.warning("ledger %s cannot be written now (%s): %d more writes are held, tried again until they "
                        "commit (%d held)", _redact(self.target), _held_why(held[-1].error, told=False), new, len(held))
        return held

    def _settle_holds(self, rec: CascadeRecord) -> None:
        """On the ledger thread: ``rec``'s row will never be written (refused for its own fault: a constraint, a
        value the database will not take), so no transaction deletes its spend holds, and they would count until
        their UTC day ends, at the worst case they were taken at. What it spent was spent: the day's totals take
        its cost and its holds go, as the transaction writing its row would have done, so its key's limit counts
        it as spent (a 429 until 00:00 UTC once reached), not as a request in flight that the client may wait
        for."""
        held, cost = self._holds.get(rec.request_id), float(rec.cost_usd or 0.0)
        if not held or not math.isfinite(cost):
            return
        d = self.dialect
        try:
            conn = self._require()
            with self._lock_wait(short=True), d.transaction(conn):
                conn.execute(d.sql("DELETE FROM spend_holds WHERE hold_id = ? AND instance = ?"),
                             (rec.request_id, self._instance))
                _add_spend(conn.cursor(), d, [(rec.created_at, rec.api_key_id, rec.end_user, cost)])
        except (*d.errors, LedgerError) as exc:  # left at its worst case for the day
            log.warning("ledger %s: the spend hold of request %s, whose row could not be written, stays at its "
                        "worst case: %s", _redact(self.target), rec.request_id, exc)
            return
        self._unheld([rec.request_id])

    def _tell_now(self, job: _Job, exc: BaseException) -> None:
        """On the ledger thread: ``job``'s write is held for a fault that no wait of ``timeout_s`` mends (a full disk,
        a file read-only or moved; not a lock another process may release meanwhile). Its waiter is told now that it
        failed, as one that timed out is told later; and the record it will commit, if it ever does, is made that
        failure now (as :meth:`_record_told_failure_sync` would make it once committed), so that no second
        transaction is needed where there may be room for one but not for both."""
        job.telling = True
        assert job.rec is not None
        if job.told is not None:  # told it timed out meanwhile: written as that (:meth:`_write_or_hold`)
            return
        told = LedgerWriteHeldError(f"ledger write failed for request {job.rec.request_id}: {_held_why(exc)}; "
                                    "it is held and tried again until it commits")
        _write_as_told(job, told)
        try:
            job.loop.call_soon_threadsafe(self._tell, job, told)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _tell(job: _Job, told: LedgerWriteHeldError) -> None:
        """On the event loop: :meth:`_tell_now`'s word to the waiter (unless it was told something already)."""
        if job.fut.done():
            return
        job.expired, job.told = True, told
        job.fut.set_exception(told)

    def _correct(self, job: _Job) -> None:
        """On the ledger thread, right after ``job``'s write committed: if its waiter was told it timed out (and
        its answer was held back for it), its row is made that failure now, as :meth:`_settled_late` would
        have queued it to be (so that a write committed while the ledger closes is corrected too)."""
        told = job.told
        if told is None or job.sent or job.rec is None or job.rec.status not in ("ok", "partial"):
            return
        try:
            self._record_told_failure_sync(job.rec.request_id, type(told).__name__, str(told))
            job.corrected = True
        except LedgerError as exc:  # queued again by _settled_late
            log.warning("%s", exc)

    def _flush_held(self, held: list[_Job], closing: _Job, retry_at: float) -> list[_Job]:
        """Before the ledger closes: try the held writes again until they commit or the closer stops waiting
        (``timeout_s``); those still held then are given up (their failure is logged, and told to the late
        listeners). Returns the writes left held (none)."""
        tries = 0
        # done before the closer stops waiting, so that the writes given up are named (the process may exit then)
        deadline = time.monotonic() + 0.75 * self.timeout_s
        while held and not closing.fut.done():
            self._busy_since = None  # waiting, not stuck on a statement
            time.sleep(max(0.0, min(retry_at - time.monotonic(), _RETRY_MOST_S, deadline - time.monotonic())))
            if closing.fut.done() or time.monotonic() >= deadline:
                break
            self._busy_since = time.monotonic()
            held = self._write_or_hold(held, short=True)
            tries += 1
            retry_at = time.monotonic() + min(_RETRY_FIRST_S * 2 ** tries, _RETRY_MOST_S)
        self._give_up(held)
        return []

    def _give_up(self, held: list[_Job]) -> None:
        """Held writes that will not be tried again (the ledger is closing): each is answered with its last
        failure (its waiter has been told it timed out: the failure is logged, the late listeners hear it)."""
        self._note_held([])
        if held:
            self._gave_up = True
            ids = [j.rec.request_id for j in held if j.rec is not None]
            log.warning("ledger %s: %d held writes are given up, their rows lost (the ledger is closing and they "
                        "still cannot be written: %s): requests %s", _redact(self.target), len(held),
                        _held_why(held[0].error, told=False), _named(ids))
            # a write held behind others without a try of its own has no error yet: it was not written either
            self._deliver(held, [(j.error or _write_error(j.rec, LedgerError(  # type: ignore[arg-type]
                "the ledger closed before it could be written")), None) for j in held])

    def _written(self, n: int) -> None:
        """``n`` more transactions in the WAL (records, SQLite's probes): the checkpoint thread is poked every
        ``_CHECKPOINT_EVERY_RECORDS``."""
        ckpt = self._checkpointer
        if ckpt is not None:
            self._since_checkpoint += n
            if self._since_checkpoint >= _CHECKPOINT_EVERY_RECORDS:
                self._since_checkpoint = 0
                ckpt.poke()

    def _run_writes(self, jobs: list[_Job], short: bool = False) -> list[tuple[BaseException | None, None]]:
        """Commit the records of ``jobs``: all in one transaction, or (when that fails through no lock held
        elsewhere) each alone; ``short``: waiting for another process's lock briefly (see :meth:`_lock_wait`)."""
        if (moved := self._moved()) is not None:  # they would go to a file no longer at the path: refused, and the
            self.unavailable = moved              # ledger not ready, until the file is back (or a restart)
            return [(_write_error(j.rec, _FileMoved(moved)), None) for j in jobs]  # type: ignore[arg-type]
        self._written(len(jobs))
        with self._lock_wait(short):
            if len(jobs) > 1:
                try:
                    self._write([(j.rec, j.shadows) for j in jobs])  # type: ignore[misc]
                    self.unavailable = None
                    return [(None, None)] * len(jobs)
                except self.dialect.errors as exc:  # rolled back
                    if self._retryable(exc):  # the database's fault, no one record's: no use trying each alone
                        self._write_failed(exc)
                        return [(_write_error(j.rec, exc), None) for j in jobs]  # type: ignore[arg-type]
                except BaseException:  # noqa: BLE001 - rolled back: redo one by one for precise errors
                    pass
            out: list[tuple[BaseException | None, None]] = []
            locked: BaseException | None = None
            for j in jobs:
                if locked is not None:  # a write just waited for the lock in vain: the others would too
                    out.append((_write_error(j.rec, locked), None))  # type: ignore[arg-type]
                    continue
                try:  # (a PostgreSQL write held for a lost connection may have committed in that try)
                    self.record_sync(j.rec, j.shadows, tried=j.error is not None and self.dialect.name != "sqlite")
                    out.append((None, None))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                    out.append((exc, None))
                    if self._retryable(exc):
                        locked = exc.__cause__
            return out

    def _deliver(self, jobs: list[_Job], outcomes: list[tuple[BaseException | None, Any]]) -> None:
        if ids := [j.rec.request_id for j in jobs if j.rec is not None]:  # their own writes done: no longer in
            with self._journal_lock:                                      # flight (a failed one's journal row is
                for rid in ids:                                           # recorded at the next heartbeat)
                    self._journaled.discard(rid)
                    self._journal_pending.pop(rid, None)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, (exc, result) in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job, exc, result))
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, done, self)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _require(self) -> Any:
        """The open connection. A PostgreSQL connection the server dropped (a restart, a failover, an
        administrator's terminate) is opened anew here, so one lost connection does not fail every request
        that follows until the gateway is restarted."""
        if self._conn is None:
            raise LedgerError("ledger is not open")
        if getattr(self._conn, "closed", False) or getattr(self._conn, "broken", False):
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - it is gone already
                pass
            try:
                self._conn = self.dialect.connect(self.target, self.timeout_s)
            except (*self.dialect.errors, OSError) as exc:
                self.unavailable = f"ledger {_redact(self.target)} is unreachable: {exc}"
                # (said to clients too: no URL, host nor user in it; ``unavailable`` has them, for /ready and logs)
                raise LedgerError("the ledger's database cannot be reached now") from exc
            log.warning("ledger %s: the connection was lost; reconnected", _redact(self.target))
        return self._conn

    async def probe(self) -> str | None:
        """Why the ledger cannot be written now, or None, within ``timeout_s``: a write on the ledger thread
        (which reconnects) decides (:meth:`_Dialect.probe_write`: SQLite commits one row, PostgreSQL rolls it
        back), so a database that went away, turned read-only, stays locked or is full (SQLite), or an SQLite
        file moved or deleted under the server, is seen before a request fails on it (and whatever a failed
        write said is confirmed or cleared), and one that came back clears the mark without waiting for a write
        (a server that is not ready gets no traffic). A thread stuck for ``timeout_s`` already (a hung server)
        answers at once; concurrent probes share one."""
        since = self._busy_since
        if since is not None and (stuck := time.monotonic() - since) >= self.timeout_s:
            self.unavailable = (f"ledger {_redact(self.target)} is not answering: one statement has been running "
                                f"for {stuck:.1f} s")
            return self.unavailable
        job = self._probing
        if job is None or job.fut.done() or job.loop is not asyncio.get_running_loop():
            job = self._probing = self._enqueue(fn=self._probe_sync, timeout=self.timeout_s,
                                                what="the readiness probe")
        try:  # every time: an idle server must not say ready while its database is gone
            await asyncio.shield(job.fut)
        except LedgerError:  # the probe, or its timeout, has set ``unavailable``
            pass
        return self.unavailable

    def _probe_sync(self) -> None:
        """On the ledger thread: prove that a write can be made now (or say why not in ``unavailable``)."""
        key = f"ready-probe {uuid.uuid4().hex}"
        lock_wait = min(_PROBE_LOCK_WAIT_S, self.timeout_s)
        if (moved := self._moved()) is not None:
            self.unavailable = moved
            raise LedgerError(moved)
        try:
            self._retrying(lambda conn: self.dialect.probe_write(conn, key, lock_wait, self._busy_ms))
        except self.dialect.errors as exc:
            self.unavailable = f"ledger {_redact(self.target)} cannot be written: {exc}"
            raise LedgerError(self.unavailable) from exc
        except LedgerError as exc:  # unreachable (``_require`` has said why in ``unavailable``), or closed
            if exc.__cause__ is None or self.unavailable is None:
                self.unavailable = f"ledger {_redact(self.target)}: {exc.message}"
            raise
        if self._held and (fault := self._held_fault) is not None and not self.dialect.may_pass_soon(fault):
            # a write can be made (PostgreSQL's probe rolls back: it fits a full disk's last page), but the held
            # ones cannot: not ready until they commit, at their next try (within a second)
            self.unavailable = (f"ledger {_redact(self.target)}: {self._held} writes are held: "
                                f"{_held_why(fault, told=False)}")
            raise LedgerError(self.unavailable)
        self._written(1)
        self.unavailable = None

    def _moved(self) -> str | None:
        """SQLite: why the file at the ledger's path is no longer the one its connection writes to (moved,
        deleted or replaced since it was opened), or None. The writes would still succeed, to the old file,
        which nobody reads: only a restart (which opens the file now at the path) sets that right."""
        if self._file_id is None:
            return None
        path = expand_path(self.target, "ledger.path")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            now = "no file is there any more"
        except OSError as exc:
            now = f"it cannot be seen: {exc}"
        else:
            if (st.st_dev, st.st_ino) == self._file_id:
                return None
            now = "another file is there now"
        return (f"ledger {_redact(self.target)} was moved or deleted while open ({now}): writes go to the file "
                "opened at start, which is no longer at that path; restart the server")

    def _lost(self) -> bool:
        """Did the last statement fail because the connection went (worth one retry on a new one)?"""
        conn = self._conn
        return conn is not None and bool(getattr(conn, "closed", False) or getattr(conn, "broken", False))

    def _retrying(self, fn):  # noqa: ANN001, ANN202
        """``fn(conn)``, once more on a new connection if the connection was lost during the first try (a
        failed transaction was rolled back, so the retry cannot write twice). Not within :meth:`snapshot`: a
        statement run again on a new connection would read outside the snapshot the others read."""
        try:
            return fn(self._require())
        except self.dialect.errors:
            if not self._lost() or self._snapshot:
                raise
        return fn(self._require())

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Within it, this connection's reads all see the ledger as it was at the first of them: the several
        statements of one report (requests, then their attempts; shadow spend, then its holds) add up while
        replicas write, where each statement on its own would see the rows committed before it ran and count a
        request in one figure but not the next. SQLite: one read transaction (WAL keeps its snapshot);
        PostgreSQL: one REPEATABLE READ, READ ONLY transaction (a standby and a role that may only SELECT can
        run it). For the reading commands, on the caller's thread; nested, the outer one holds."""
        conn, d = self._require(), self.dialect
        if self._snapshot:
            yield
            return
        try:
            if d.name == "sqlite":
                conn.execute("BEGIN")  # deferred: its first read takes the snapshot, the commit ends it
            else:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        except d.errors as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc
        self._snapshot = True
        try:
            yield
        finally:
            self._snapshot = False
            try:  # (nothing was written: the end of a read, whatever happened within it)
                conn.execute("ROLLBACK")
            except d.errors as exc:
                log.debug("ledger: ending a read snapshot failed: %s", exc)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Run one statement synchronously (on the caller's thread) and return its rows."""
        def run(conn: Any) -> list[tuple]:
            cur = conn.execute(self.dialect.sql(sql), self.dialect.row(params))
            return cur.fetchall() if cur.description else []

        try:
            return self._retrying(run)
        except self.dialect.errors as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc

    def execute_dicts(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Run one statement synchronously and return its rows by column name: whole rows (``SELECT *``) as
        the table has them now, columns added by a newer replica included."""
        def run(conn: Any) -> list[dict[str, Any]]:
            cur = self.dialect.execute_whole_rows(conn, self.dialect.sql(sql), self.dialect.row(params))
            cols = [d[0] for d in cur.description or ()]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

        try:
            return self._retrying(run)
        except self.dialect.errors as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc

    # --- writes -----------------------------------------------------------------------------------
    async def record(self, rec: CascadeRecord, shadows: Iterable[dict[str, Any]] = ()) -> None:
        """Write one request, its attempts (and shadow decisions) in one transaction; returns once committed.

        The write happens even if the caller stops waiting (it is queued to the ledger thread at once)."""
        await self.submit(rec, shadows)

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` has run and :meth:`close` has not: jobs can be queued."""
        return self._queue is not None

    def submit(self, rec: CascadeRecord, shadows: Iterable[dict[str, Any]] = (), *, sent: bool = False
               ) -> asyncio.Future:
        """Queue the write of ``rec`` now (from the event loop); the future resolves once it is committed,
        or raises ``LedgerError``: the write failed, or was not committed within ``timeout_s`` (a database
        that does not answer; the ledger is then not ready). The write happens whether or not anyone awaits
        the future; one that times out stays queued, and is kept (and logged) if it commits later: as the
        failure its caller was told of (:meth:`_settled_late`), unless its answer was ``sent`` already (a
        stream's tokens) or it records a failure itself."""
        with self._journal_lock:  # its journal record not written yet: never to be (the row is written now)
            self._journal_pending.pop(rec.request_id, None)
        job = self._enqueue(rec=rec, shadows=list(shadows), timeout=self.timeout_s, what="a write")
        job.sent = sent
        if job.fut.done():  # refused at once (too much waiting): no longer in flight, as a failed write is
            with self._journal_lock:
                self._journaled.discard(rec.request_id)
        return job.fut

    def record_sync(self, rec: CascadeRecord, shadows: list[dict[str, Any]] | None = None, *,
                    tried: bool = False) -> None:
        """Write one record now (on the caller's thread). ``tried``: an earlier try of this write failed on a
        lost connection, so it may have committed (the server had the COMMIT, its answer never came)."""
        tries = 0

        def write(conn: Any) -> None:
            nonlocal tries
            tries += 1
            self._write([(rec, shadows or [])], conn)

        try:
            try:
                self._retrying(write)
            except self.dialect.record_faults:
                if (tried or tries > 1) and self._committed_before(rec):  # (tries > 1: the connection went)
                    self.unavailable = None
                    return
                if not self._recorded_from_journal(rec.request_id):
                    raise
                self._retrying(lambda conn: self._write([(rec, shadows or [])], conn, replace=True))
        except self.dialect.errors as exc:
            self._write_failed(exc)
            raise _write_error(rec, exc) from exc
        self.unavailable = None

    def _retryable(self, exc: BaseException) -> bool:
        """Did a write fail through no fault of its own record, in a way that may pass later (worth holding for
        another try): SQLite locked by another process, a full disk, a file read-only or not at its path now, an
        I/O error; PostgreSQL unreachable (a restart, a failover), out of disk?"""
        return isinstance(_cause(exc), self.dialect.held_faults)

    @contextmanager
    def _lock_wait(self, short: bool) -> Iterator[None]:
        """SQLite: ``short``, a write waits for another process's lock briefly (``_RETRY_LOCK_WAIT_S``, not
        ``timeout_s``), so that a ledger thread retrying held writes stays free for probes and reads."""
        if not short or self.dialect.name != "sqlite" or self._conn is None:  # (closed: the write fails alone)
            yield
            return
        conn = self._require()
        conn.execute(f"PRAGMA busy_timeout={max(1, int(min(_RETRY_LOCK_WAIT_S, self.timeout_s / 4) * 1000))}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")

    def _write_failed(self, exc: BaseException) -> None:
        """A write failed: unless through its own record's fault (a duplicate request id), the database is
        at fault (gone, read-only, locked, full): not ready until a write succeeds or a probe proves that
        one can."""
        if not isinstance(exc, self.dialect.record_faults):
            self.unavailable = f"ledger {_redact(self.target)}: a write failed: {exc}"

    def _write(self, items: list[tuple[CascadeRecord, list[dict[str, Any]]]], conn: Any = None, *,
               replace: bool = False) -> None:
        """Insert requests, their attempts and shadow decisions in one transaction, and delete their rows of
        the journal (raises the driver's error). ``replace``: rows recorded from the journal for these
        requests (:meth:`_recorded_from_journal`) are replaced."""
        conn, d = conn if conn is not None else self._require(), self.dialect
        ids = [(rec.request_id,) for rec, _ in items]
        with d.transaction(conn):
            cur = conn.cursor()
            # the journal rows first, as a process recording a dead one's requests takes them (PostgreSQL's row
            # locks in one order: the two cannot deadlock)
            cur.executemany(d.sql("DELETE FROM inflight WHERE request_id = ?"), ids)
            if replace:
                gone = [r for (rid,) in ids for r in conn.execute(d.sql(
                    "SELECT created_at, api_key_id, end_user, -cost_usd FROM requests WHERE request_id = ? AND "
                    f"error_class = '{INTERRUPTED}'"), (rid,)).fetchall()]
                cur.executemany(d.sql(_DROP_INTERRUPTED_ATTEMPTS), ids)
                cur.executemany(d.sql(_DROP_INTERRUPTED), ids)
                _add_spend(cur, d, gone)  # (its spend, counted by the day's totals, goes with it)
            self._insert(conn, items)
        self._unheld(rec.request_id for rec, _ in items)

    def _committed_before(self, rec: CascadeRecord) -> bool:
        """Is ``rec`` in the ledger already, committed by an earlier try of this same write (the connection went
        after the server had the COMMIT, before its answer came back: the try looked failed, and was held)? Its
        row is the one with its request id and its creation time. Made the failure its waiter was told of since,
        if it is one (:func:`_write_as_told`)."""
        row = self._retrying(lambda conn: conn.execute(self.dialect.sql(
            "SELECT created_at, status, error_class FROM requests WHERE request_id = ?"), (rec.request_id,)).fetchone())
        if row is None or row[0] != rec.created_at or row[2] == INTERRUPTED:
            return False  # another request's id (the record's own fault), or its journal's row (replaced)
        self._unheld([rec.request_id])  # (that commit deleted its holds)
        if rec.error_class in _TOLD and row[1] in ("ok", "partial"):
            self._record_told_failure_sync(rec.request_id, rec.error_class, rec.error_message or "")
        return True

    def _recorded_from_journal(self, request_id: str) -> bool:
        """Is the request's row one recorded from its journal, by a process that took this one for dead (it was
        stopped, or could not write its heartbeats, for ``stale_s``)? Its own row replaces it: it did finish."""
        row = self._retrying(lambda conn: conn.execute(
            self.dialect.sql("SELECT error_class FROM requests WHERE request_id = ?"), (request_id,)).fetchone())
        return row is not None and row[0] == INTERRUPTED

    def _insert(self, conn: Any, items: list[tuple[CascadeRecord, list[dict[str, Any]]]]) -> None:
        """Insert requests, their attempts and shadow decisions, within the caller's transaction."""
        d = self.dialect
        store_text = self.store_text
        requests, attempts, shadow_rows = [], [], []
        for rec, shadows in items:
            rid = rec.request_id
            requests.append(d.row((
                rid, rec.created_at, rec.policy, rec.endpoint, rec.api_key_id, rec.user_tier,
                rec.status, rec.tier, rec.model, rec.confidence, int(rec.escalated), len(rec.attempts),
                rec.prompt_tokens, rec.completion_tokens, rec.cost_usd, rec.baseline_cost_usd,
                int(rec.baseline_estimated), rec.escalation_waste_usd, rec.latency_ms, rec.error_class,
                rec.error_message, rec.cached_from, rec.end_user,
                json.dumps(rec.metadata, ensure_ascii=False, sort_keys=True) if rec.metadata else None)))
            for a in rec.attempts:
                attempts.append(d.row((
                    rid, a.index, a.tier, a.model, a.backend, a.prompt_tokens, a.completion_tokens,
                    a.latency_ms, a.cost_usd, a.confidence, a.decision, a.reason, int(a.kept), a.error_class,
                    a.error_message, json.dumps(a.features) if a.features else None,
                    a.text if store_text else None,
                    answer_signature(a.text) if a.error_class is None else None, a.cached_prompt_tokens)))
            for s in shadows:
                shadow_rows.append(d.row(_shadow_row(rid, rec.created_at, s)))
        cur = conn.cursor()
        # the worst cases these requests held against daily spend limits end as their spend is in (one snapshot of
        # another process sees either, never both or neither)
        cur.executemany(d.sql("DELETE FROM spend_holds WHERE hold_id = ?"), [(rec.request_id,) for rec, _ in items])
        if len(requests) == 1:
            cur.execute(self._sql_request, requests[0])
        else:
            cur.executemany(self._sql_request, requests)
        if attempts:
            cur.executemany(self._sql_attempt, attempts)
        # the day's totals of their keys and end users (in one order: PostgreSQL's row locks cannot deadlock)
        _add_spend(cur, d, [(r.created_at, r.api_key_id, r.end_user, r.cost_usd) for r, _ in items])
        if shadow_rows:
            cur.executemany(self._sql_shadow, shadow_rows)

    async def record_shadow_sample(self, request_id: str, created_at: float, decision: dict[str, Any],
                                   attempts: Sequence[Attempt], started_at: Sequence[float]) -> None:
        """Write a sampled shadow's outcome after its request is in the ledger: the shadow's calls
        (``shadow_attempts``, each stamped with when it started: ``started_at``) and its decision, which
        replaces the one written with the request (none once the request is no longer answered: its client
        left before the answer). One transaction, idempotent (a repeat changes nothing)."""
        await self._call(self._shadow_sample_sync, request_id, created_at, decision, list(attempts),
                         list(started_at))

    def _shadow_sample_sync(self, request_id: str, created_at: float, decision: dict[str, Any],
                            attempts: list[Attempt], started_at: list[float]) -> None:
        conn, d = self._require(), self.dialect
        rows = [d.row((request_id, decision["shadow"], a.index, t, a.tier, a.model, a.backend, a.prompt_tokens,
                 a.completion_tokens, a.latency_ms, a.cost_usd, a.confidence, a.decision or "error", a.reason,
                 a.error_class, a.error_message, json.dumps(a.features) if a.features else None,
                 a.text if self.store_text else None,
                 answer_signature(a.text) if a.error_class is None else None, a.cached_prompt_tokens))
                for a, t in zip(attempts, started_at, strict=True)]
        try:
            with d.transaction(conn):
                cur = conn.cursor()
                bucket = spend_bucket(("shadow", decision["shadow"]))
                add: dict[int, float] = {}
                for row, t, a in zip(rows, started_at, attempts, strict=True):
                    # the shadow's spend per UTC day, of the calls written now (a sample written again adds none)
                    if conn.execute(d.sql(_INSERT_SHADOW_ATTEMPT + " RETURNING idx"), row).fetchall() and a.cost_usd:
                        add[int(t // 86400)] = add.get(int(t // 86400), 0.0) + a.cost_usd
                if add:
                    cur.executemany(d.sql(_ADD_SPEND), [d.row((day, bucket, c)) for day, c in sorted(add.items())])
                # the decision only beside an answer: a request whose client left before its answer was made
                # cancelled meanwhile, its decisions deleted (the calls above were paid for all the same)
                if conn.execute(d.sql("SELECT 1 FROM requests WHERE request_id = ? AND status IN ('ok', 'partial')"),
                                (request_id,)).fetchall():
                    cur.execute(d.sql(_UPSERT_SHADOW), d.row(_shadow_row(request_id, created_at, decision)))
                # what the sample reserved of its shadow's budget ends as its spend is in (ShadowSampler)
                cur.execute(d.sql("DELETE FROM spend_holds WHERE hold_id = ? AND bucket = ?"), (request_id, bucket))
            if (held := self._holds.get(request_id)) is not None and held.pop(bucket, None) and not held:
                del self._holds[request_id]
        except d.errors as exc:
            self._write_failed(exc)
            raise LedgerError(f"ledger write failed for shadow {decision['shadow']!r} of request {request_id}: "
                              f"{exc}") from exc

    async def add_feedback(self, request_id: str, score: int, comment: str | None = None) -> int:
        return await self._call(self._feedback_sync, request_id, score, comment)

    def _feedback_sync(self, request_id: str, score: int, comment: str | None) -> int:
        if not self.execute("SELECT 1 FROM requests WHERE request_id=?", (request_id,)):
            raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id")
        try:
            rows = self.execute("INSERT INTO feedback(request_id, created_at, score, comment) VALUES (?,?,?,?) "
                                "RETURNING id", (request_id, time.time(), score, comment))
        except LedgerError as exc:
            if isinstance(exc.__cause__, self.dialect.record_faults):  # the request was deleted since (a prune)
                raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id") from exc
            raise
        return int(rows[0][0])

    # --- reads ------------------------------------------------------------------------------------
    async def get(self, request_id: str) -> dict[str, Any] | None:
        return await self._call(self.get_sync, request_id)

    def get_sync(self, request_id: str) -> dict[str, Any] | None:
        rows = self.execute_dicts("SELECT * FROM requests WHERE request_id=?", (request_id,))
        if not rows:
            return None
        out = rows[0]
        out["attempts"] = self.execute_dicts("SELECT * FROM attempts WHERE request_id=? ORDER BY idx", (request_id,))
        out["feedback"] = self.execute_dicts("SELECT * FROM feedback WHERE request_id=? ORDER BY id", (request_id,))
        return out

    async def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return await self._call(self.execute, sql, tuple(params))

    # --- retention --------------------------------------------------------------------------------
    def prune_sync(self, before: float, *, dry_run: bool = False, batch: int = PRUNE_BATCH) -> dict[str, int]:
        """Delete the requests created before ``before`` (00:00 UTC of a day, yesterday's at the latest) with every
        row that references them (:data:`PRUNED_TABLES`), and the days of ``spend_daily`` before it. Returns the rows
        deleted per table; ``dry_run``: the rows that would be, counted in one snapshot, nothing written.

        While servers write to the ledger: ``batch`` requests per transaction, each short (on SQLite the write lock
        is held for one batch, then let go for as long again, at least 0.1 s: a server's write waiting for it
        gets in), so a server's write waits one batch at most, far less than its ``timeout_s``. The requests of
        today and yesterday (UTC) are never deleted: the daily spend limits and the shadows' budgets read today's
        rows, a ledger migrated to schema 8 seeds ``spend_daily`` from yesterday's, and the sweep of spend holds
        reaches back to yesterday. ``inflight``, ``instances``, ``spend_holds`` and ``meta`` are left alone (rows of the
        processes serving now). On the caller's thread, on a ledger opened with :meth:`open_existing_sync`
        (reading commands' connection: nothing migrated) whose schema is this version's."""
        day = _day_of(before)
        if before > utc_day_start() - 86400.0:
            raise ValueError("prune keeps today's and yesterday's rows (UTC): the cut is yesterday's 00:00 at the "
                             "latest")
        if batch < 1:
            raise ValueError(f"prune batch must be at least 1, not {batch!r}")
        d, what = self.dialect, _redact(self.target)
        version = self.execute("SELECT value FROM meta WHERE key = ?", ("schema_version",))
        if not version or str(version[0][0]) != str(SCHEMA_VERSION):
            raise LedgerError(f"ledger {what} has schema version {version[0][0] if version else None}, not this "
                              f"cascade-engine's ({SCHEMA_VERSION}): prune it with the version that serves it, or once "
                              "a server of this version has migrated it")
        if dry_run:
            with self.snapshot():
                counts = {"requests": self.execute("SELECT COUNT(*) FROM requests WHERE created_at < ?",
                                                   (before,))[0][0]}
                for table in PRUNED_TABLES[1:]:
                    counts[table] = self.execute(f"SELECT COUNT(*) FROM {table} t JOIN requests r ON r.request_id = "
                                                 "t.request_id WHERE r.created_at < ?", (before,))[0][0]
                counts["spend_daily"] = self.execute("SELECT COUNT(*) FROM spend_daily WHERE day < ?", (day,))[0][0]
            return {k: int(v) for k, v in counts.items()}
        conn = self._require()
        counts = dict.fromkeys((*PRUNED_TABLES, "spend_daily"), 0)
        # the requests oldest first, by their created_at index; PostgreSQL: their rows locked, so that feedback
        # given on one meanwhile waits for this transaction (then is refused: the request is gone) rather than adding
        # a row that references it between the deletes below, which would fail the batch
        pick = d.sql("SELECT request_id FROM requests WHERE created_at < ? ORDER BY created_at LIMIT ?"
                     + (" FOR UPDATE" if d.name == "postgresql" else ""))
        try:
            if d.name == "sqlite":  # (a reading connection: on, a row left referencing a request fails its batch)
                conn.execute("PRAGMA foreign_keys=ON")
            while True:
                started = time.monotonic()
                with d.transaction(conn):
                    if d.name == "postgresql":  # a lock held elsewhere fails the command, never hangs it
                        conn.execute(f"SET LOCAL lock_timeout = {max(1, int(self.timeout_s * 1000))}")
                    ids = [r[0] for r in conn.execute(pick, (before, batch)).fetchall()]
                    marks = ", ".join("?" * len(ids))
                    for table in (*PRUNED_TABLES[1:], "requests") if ids else ():  # the rows referencing them first
                        counts[table] += conn.execute(d.sql(f"DELETE FROM {table} WHERE request_id IN ({marks})"),
                                                      ids).rowcount
                if len(ids) < batch:
                    break
                if d.name == "sqlite":
                    time.sleep(max(0.1, time.monotonic() - started))
            for (old,) in conn.execute(d.sql("SELECT DISTINCT day FROM spend_daily WHERE day < ? ORDER BY day"),
                                       (day,)).fetchall():  # one day's totals a transaction
                with d.transaction(conn):
                    counts["spend_daily"] += conn.execute(d.sql("DELETE FROM spend_daily WHERE day = ?"),
                                                          (old,)).rowcount
        except d.errors as exc:
            done = ", ".join(f"{n} {t}" for t, n in counts.items() if n) or "nothing"
            raise LedgerError(f"pruning ledger {what} failed (deleted until then: {done}): "
                              f"{_redact_in(str(exc), self.target)}") from exc
        return counts

    # --- requests in flight -------------------------------------------------------------------------
    def journal(self, request_id: str, snapshot: Callable[[], CascadeRecord]) -> None:
        """From the event loop, as a tier call starts: ``snapshot()`` makes the request as the ledger is to keep
        it should this process die before the request's own row is written (its attempts so far, and the call
        in flight as an error ``Interrupted``). It is called, and its record written (a row of table
        ``inflight``), ``journal_delay_s`` later, unless the request's own write has been queued by then, as
        most are: they are never journaled. The records due together are written in one transaction (the
        latest of each request: a later call replaces an earlier one not yet made), and each row is deleted
        by the transaction that writes its request's own. Nobody waits for them; one that cannot be written is
        logged, and lost only should the process die then. The rows of a process that died are written as
        their requests by the next process of this ledger to see it dead (:meth:`_heartbeat_sync`)."""
        if self._queue is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + self.journal_delay_s
        with self._journal_lock:
            self._journal_pending[request_id] = (when, snapshot)
            self._journaled.add(request_id)
        if self._journal_timer is None:  # (else a timer is set, for an earlier one)
            self._journal_timer = loop.call_at(when, self._journal_due)

    def _journal_due(self) -> None:
        """On the event loop (where the requests' records change): the records of the requests journaled
        ``journal_delay_s`` ago or more and still in flight are made now, and queued for the ledger thread
        together; the timer is set again for the next one due."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        with self._journal_lock:
            due = {rid: e for rid, e in self._journal_pending.items() if e[0] <= now}
            for rid in due:
                del self._journal_pending[rid]
            nxt = min((e[0] for e in self._journal_pending.values()), default=None)
        self._journal_timer = loop.call_at(nxt, self._journal_due) if nxt is not None else None
        recs = []
        for rid, (_when, snapshot) in due.items():
            try:
                recs.append(snapshot())
            except Exception:  # noqa: BLE001 - a bug there must not fail the others (or the request)
                log.exception("ledger: the journal record of request %s could not be made", rid)
        if recs and self._background(self._journal_sync, "the journal of requests in flight", recs) is None:
            with self._journal_lock:  # (too much waiting) tried again when the next one is due
                for rid, entry in due.items():
                    self._journal_pending.setdefault(rid, entry)

    def _background(self, fn: Callable[..., Any], what: str, *args: Any) -> _Job | None:
        """Queue ``fn(*args)`` for the ledger thread with nobody waiting for it (its failure is logged), unless
        the ledger is closed or ``max_pending`` jobs wait already (None: such work never takes a request's place)."""
        q = self._queue
        if q is None or q.qsize() + self._held >= self.max_pending:
            return None
        job = self._enqueue(fn=fn, args=args, timeout=None, what=what)
        job.fut.add_done_callback(log_failure)
        return job

    def _journal_sync(self, recs: list[CascadeRecord]) -> None:
        """On the ledger thread: write records of the journal (not those whose request has a row now)."""
        if not recs or self._moved() is not None:
            return
        conn, d, now = self._require(), self.dialect, time.time()
        try:
            with self._lock_wait(short=True), d.transaction(conn):  # another process's lock: not waited for long
                have = self._existing(conn, [r.request_id for r in recs])
                rows = []
                for r in recs:
                    if r.request_id in have:
                        continue
                    try:  # one record that cannot be written as JSON must not keep the others out
                        rows.append(d.row((r.request_id, self._instance, r.created_at, now,
                                           _record_json(r, self.store_text))))
                    except (TypeError, ValueError) as exc:
                        log.warning("ledger %s: request %s in flight could not be journaled: %s",
                                    _redact(self.target), r.request_id, exc)
                if rows:
                    conn.cursor().executemany(d.sql(_UPSERT_INFLIGHT), rows)
        except d.errors as exc:
            log.warning("ledger %s: %d requests in flight could not be journaled (should this process die before "
                        "they finish, they are lost): %s", _redact(self.target), len(recs), exc)
            return
        self._written(1)

    def _existing(self, conn: Any, request_ids: list[str]) -> set[str]:
        """Those of ``request_ids`` that have a row in ``requests``."""
        d, have = self.dialect, set()
        for i in range(0, len(request_ids), 500):
            part = request_ids[i:i + 500]
            sql = f"SELECT request_id FROM requests WHERE request_id IN ({', '.join('?' * len(part))})"
            have.update(r[0] for r in conn.execute(d.sql(sql), d.row(part)).fetchall())
        return have

    async def _beat(self) -> None:
        """The heartbeat of a served ledger, every ``heartbeat_s`` (one at a time), until it closes."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if (job := self._background(self._heartbeat_sync, "the heartbeat")) is not None:
                await asyncio.wait([job.fut])

    def _heartbeat_sync(self) -> None:
        """On the ledger thread: write this process's heartbeat, then record the requests left in flight by
        processes now dead (another on this machine whose pid is gone, or one whose heartbeat this process has
        seen unchanged for ``stale_s`` while writing its own all along: judged on this process's own clock, so
        that neither another machine's clock nor an outage of the database for everybody makes anyone dead)
        and this one's whose own write failed for good, each as the error ``Interrupted`` it was journaled as,
        unless its request has a row by now. Each request is taken from ``inflight`` by the transaction that
        writes it, so that processes doing this at once never write one twice."""
        d, now, mono = self.dialect, time.time(), time.monotonic()
        try:
            if (moved := self._moved()) is not None:
                raise LedgerError(moved)
            conn = self._require()
            rewritten = 0
            with self._lock_wait(short=True), d.transaction(conn):
                known = conn.execute(d.sql("SELECT 1 FROM instances WHERE instance = ?"), (self._instance,)).fetchall()
                conn.execute(d.sql(_UPSERT_INSTANCE), d.row((self._instance, _host_key(), os.getpid(), now, now)))
                if not known and self._holds:  # taken for dead (or never seen): its holds, deleted with it, again
                    rewritten = self._rewrite_holds(conn)
            self._written(1)
            if rewritten and self._registered:
                log.warning("ledger %s: another process took this one for dead (no heartbeat from it for its "
                            "stale_s) and deleted its daily spend holds: %d requests in flight hold their worst "
                            "case again", _redact(self.target), rewritten)
            self._registered = True
            others = conn.execute(d.sql("SELECT instance, host, pid, heartbeat_at FROM instances WHERE instance <> ?"),
                                  (self._instance,)).fetchall()
        except (*d.errors, LedgerError) as exc:  # what was seen of the others no longer counts
            if self._beating_since is not None:
                log.warning("ledger %s: the heartbeat could not be written: %s", _redact(self.target), exc)
            self._beating_since, self._seen = None, {}
            return
        if self._beating_since is None:
            self._beating_since = mono
        seen = {}
        for inst, host, pid, beat in others:
            was = self._seen.get(inst)
            seen[inst] = was if was is not None and was[0] == beat else (beat, mono)  # (its heartbeat, seen since)
            if host == _host_key() and not _pid_alive(int(pid)):
                self._interrupt(conn, "instance = ?", (inst,), f"its process ({inst}) is gone", instance=inst)
            elif mono - seen[inst][1] >= self.stale_s:
                self._interrupt(conn, "instance = ?", (inst,), f"its process ({inst}) has written no heartbeat "
                                f"for {mono - seen[inst][1]:.0f} s", instance=inst)
        self._seen = seen
        if mono - self._beating_since >= self.stale_s:  # a process counted dead while it still wrote: its later
            self._interrupt(conn, "instance NOT IN (SELECT instance FROM instances) AND updated_at < ?",  # rows
                            (now - self.stale_s,), "its process is gone")  # have no heartbeat row
            self._sweep_holds(conn, now)
        with self._journal_lock:
            journaled = set(self._journaled)
        try:
            mine = [r[0] for r in conn.execute(d.sql("SELECT request_id FROM inflight WHERE instance = ?"),
                                               (self._instance,)).fetchall() if r[0] not in journaled]
        except d.errors as exc:  # (the next heartbeat looks again)
            log.warning("ledger %s: this process's journal could not be read: %s", _redact(self.target), exc)
            return
        for rid in mine:
            self._interrupt(conn, "request_id = ?", (rid,), "its own write failed")

    def _rewrite_holds(self, conn: Any) -> int:
        """Within the caller's transaction: write this process's holds (:attr:`_holds`) as they were written,
        their times included (a hold counts on the UTC day it was written); returns for how many requests."""
        rows = [self.dialect.row((hold_id, bucket, self._instance, amount, at))
                for hold_id, held in self._holds.items() for bucket, (amount, at) in held.items()]
        conn.cursor().executemany(self.dialect.sql(_UPSERT_HOLD), rows)
        return len(self._holds)

    def _sweep_holds(self, conn: Any, now: float) -> None:
        """Delete the spend holds no process will end: those of a process without a heartbeat row (counted dead,
        or never served) older than ``stale_s``, and any from before yesterday (a row whose write failed leaves
        its hold behind; the limits count a hold on its UTC day only). This process's own among them leave
        :attr:`_holds` too: no transaction of a request's row ends a hold whose row or release failed, which would
        otherwise stay in memory as long as the process runs (one more each time), and be written again should
        the process be taken for dead."""
        d = self.dialect
        try:
            with d.transaction(conn):
                gone = conn.execute(d.sql("DELETE FROM spend_holds WHERE (created_at < ? AND instance NOT IN (SELECT "
                                          "instance FROM instances)) OR created_at < ? RETURNING hold_id, bucket, "
                                          "instance"), (now - self.stale_s, utc_day_start(now) - 86400.0)).fetchall()
        except d.errors as exc:  # (the next heartbeat tries again)
            log.warning("ledger %s: spend holds left by processes gone could not be deleted: %s",
                        _redact(self.target), exc)
            return
        for hold_id, bucket, instance in gone:
            if instance == self._instance and (held := self._holds.get(hold_id)) is not None:
                held.pop(bucket, None)
                if not held:
                    del self._holds[hold_id]

    # --- daily spend holds, shared by the processes of a ledger ---------------------------------------
    async def admit_spend(self, hold_id: str, buckets: Sequence[Hashable], amount_usd: float, day_start: float,
                          admit: Callable[[list[tuple[float, float, int]]], bool],
                          ) -> tuple[list[tuple[float, float, int]], bool]:
        """Check a request against daily spend limits and hold its worst case, as one transaction that every
        process sharing the ledger runs one at a time for a bucket: per bucket of ``buckets``, (the spend
        recorded on the UTC day starting at ``day_start``, the worst cases held that day by requests of any
        process not yet recorded, how many) is handed to ``admit`` (on the ledger thread: pure and quick), and
        only if it says yes is ``amount_usd`` held on each bucket (rows of ``spend_holds``) until the request's
        row is written, which deletes them in its own transaction (or :meth:`release_spend`: no row will be).
        Returns those figures and the answer. A read that came back to the caller late (its event loop busy)
        and a hold written after it would let another process admit against the same spend in between: here
        nothing passes between the check and the hold (SQLite: the write lock from the start; PostgreSQL: the
        buckets' rows of ``spend_daily`` locked, in one order)."""
        names = [spend_bucket(b) for b in buckets]
        return await self._call(self._admit_spend_sync, hold_id, names, float(amount_usd), day_start, admit)

    def _admit_spend_sync(self, hold_id: str, names: list[str], amount: float, day_start: float,
                          admit: Callable[[list[tuple[float, float, int]]], bool],
                          ) -> tuple[list[tuple[float, float, int]], bool]:
        d, day = self.dialect, _day_of(day_start)
        sql, params = _spend_read(names, day, day_start)

        def run(conn: Any) -> tuple[list[tuple[float, float, int]], bool]:
            with d.transaction(conn):  # (SQLite: BEGIN IMMEDIATE, the write lock first)
                if d.name != "sqlite":  # PostgreSQL: the check and the hold are serialised by the totals' rows
                    for name in sorted(set(names)):
                        conn.execute(d.sql("INSERT INTO spend_daily (day, bucket, cost_usd) VALUES (?, ?, 0) "
                                           "ON CONFLICT (day, bucket) DO NOTHING"), (day, name))
                        conn.execute(d.sql("SELECT cost_usd FROM spend_daily WHERE day = ? AND bucket = ? FOR UPDATE"),
                                     (day, name))
                figures = _spend_figures(conn.execute(d.sql(sql), d.row(params)).fetchone(), len(names))
                ok = bool(admit(figures))
                if ok and amount > 0:  # (a shadow sample holds again, its new total, before each call)
                    rows = [(hold_id, name, self._instance, amount, time.time()) for name in dict.fromkeys(names)]
                    conn.cursor().executemany(d.sql(_UPSERT_HOLD), [d.row(r) for r in rows])
            if ok and amount > 0:
                self._note_holds(rows)
            return figures, ok

        try:
            return self._retrying(run)
        except d.errors as exc:
            raise LedgerError(f"ledger spend check failed: {exc}") from exc

    def hold_spend(self, hold_id: str, buckets: Sequence[Hashable], amount_usd: float) -> None:
        """From the event loop: write that ``hold_id`` holds ``amount_usd`` on each of ``buckets`` (see
        :func:`spend_bucket`), or now holds that much (a hold written before is updated), until the transaction
        that records what it held for deletes it, or :meth:`release_spend`. Nobody waits: it is written after
        the jobs queued before it, and one that cannot be written is logged (the other processes then see that
        spend only once it is recorded). For a shadow sample's reservation of its daily budget."""
        if buckets:
            rows = [(hold_id, spend_bucket(b), self._instance, float(amount_usd)) for b in buckets]
            self._background(self._hold_sync, "a daily spend hold", rows, time.time())

    def release_spend(self, hold_id: str) -> None:
        """From the event loop: the request ``hold_id`` will write no row; its spend holds go. Queued even past
        ``max_pending`` (a release dropped would leave a hold that blocks its key for the rest of the day: an
        admission queued during a stall may still commit its hold after its waiter gave up), after everything
        queued before it, the admission it ends included; a failure is logged."""
        if self._queue is None:
            return
        job = self._enqueue(fn=self._release_sync, args=(hold_id,), timeout=None,
                            what="the end of a daily spend hold", force=True)
        job.fut.add_done_callback(log_failure)

    def _hold_sync(self, rows: list[tuple], now: float) -> None:
        conn, d = self._require(), self.dialect
        with self._lock_wait(short=True), d.transaction(conn):  # another process's long lock: not waited for
            conn.cursor().executemany(d.sql(_UPSERT_HOLD), [d.row((*r, now)) for r in rows])
        self._note_holds([(*r, now) for r in rows])

    def _unheld(self, hold_ids: Iterable[str]) -> None:
        """Forget holds a committed transaction deleted (every bucket's) as it wrote their requests' rows."""
        for hold_id in hold_ids:
            self._holds.pop(hold_id, None)

    def _note_holds(self, rows: list[tuple]) -> None:
        """Note holds committed (rows as :data:`_UPSERT_HOLD` takes them): one written before keeps its time."""
        for hold_id, bucket, _, amount, at in rows:
            held = self._holds.setdefault(hold_id, {})
            held[bucket] = (amount, held[bucket][1] if bucket in held else at)

    def _release_sync(self, hold_id: str) -> None:
        conn, d = self._require(), self.dialect
        with self._lock_wait(short=True), d.transaction(conn):
            conn.execute(d.sql("DELETE FROM spend_holds WHERE hold_id = ? AND instance = ?"), (hold_id, self._instance))
        self._unheld([hold_id])

    def _interrupt(self, conn: Any, where: str, params: tuple, why: str, *, instance: str | None = None) -> int:
        """Write the journal's rows selected by ``where`` as their requests (one transaction each, so that one a
        database refuses is only logged and dropped), then forget ``instance``; returns how many were written."""
        d, written = self.dialect, 0
        try:
            ids = [r[0] for r in conn.execute(d.sql(f"SELECT request_id FROM inflight WHERE {where}"),
                                              d.row(params)).fetchall()]
            for rid in ids:
                inserted = False
                try:
                    with d.transaction(conn):
                        taken = conn.execute(d.sql("DELETE FROM inflight WHERE request_id = ? RETURNING record"),
                                             (rid,)).fetchall()
                        if taken and not self._existing(conn, [rid]):
                            rec = _record_from_json(taken[0][0])
                            rec.error_message = (f"not finished: {why}; recorded from the journal of requests in "
                                                 "flight, with its attempts until then")
                            self._insert(conn, [(rec, [])])
                            written += 1
                            inserted = True
                    if inserted:
                        self._unheld([rid])
                except (*d.record_faults, ValueError, TypeError) as exc:  # this record's fault: dropped
                    log.error("ledger: request %s, in flight when %s, cannot be recorded: %s", rid, why, exc)
                    with d.transaction(conn):
                        conn.execute(d.sql("DELETE FROM inflight WHERE request_id = ?"), (rid,))
            if instance is not None:  # (its spend holds with it: what they held never reaches the ledger)
                with d.transaction(conn):
                    conn.execute(d.sql("DELETE FROM spend_holds WHERE instance = ?"), (instance,))
                    conn.execute(d.sql("DELETE FROM instances WHERE instance = ?"), (instance,))
        except d.errors as exc:
            log.warning("ledger %s: the requests in flight when %s are not recorded yet: %s",
                        _redact(self.target), why, exc)
        if written:
            self._written(written)
            log.warning("ledger: %d requests were in flight when %s: recorded as errors %r, with the attempts "
                        "made until then", written, why, INTERRUPTED)
        return written

    def _retire(self) -> None:
        """On the ledger thread, closing a served ledger: its requests left in the journal (their own writes
        failed, or were given up) recorded as interrupted, and its heartbeat row deleted; waiting briefly for a
        lock another process holds, and not at all when held writes were just given up for one (the close is not
        held up: the next process to open the ledger on this machine, or a replica ``stale_s`` later, does
        both)."""
        self._beating_since = None
        if self._moved() is not None or self._gave_up:
            return
        try:  # a connection the database dropped since its last use (a restart) is opened anew
            conn = self._require()
        except LedgerError as exc:
            log.warning("ledger %s: closing without recording its requests left in flight nor deleting its heartbeat "
                        "row (another process does): %s", _redact(self.target), exc)
            return
        with self._lock_wait(short=True):  # (the connection is closed next)
            self._interrupt(conn, "instance = ?", (self._instance,), "its server closed", instance=self._instance)


#: the failures a write's waiter is told of while the write stays queued (its record made that failure)
_TOLD = frozenset({"LedgerTimeoutError", "LedgerWriteHeldError"})


def _write_as_told(job: _Job, told: LedgerError) -> None:
    """On the ledger thread, before a try of ``job``'s write: its record made the failure its waiter was told of
    (:func:`_as_told`), so that its commit needs no second transaction to correct it (:meth:`Ledger._correct`),
    unless it is not an answer held back (a stream's answer went out: kept as served; a failure: as it is)."""
    assert job.rec is not None
    if not job.sent and job.rec.status in ("ok", "partial"):
        job.rec, job.shadows = _as_told(job.rec, told), []
        job.corrected = True


def _as_told(rec: CascadeRecord, told: LedgerError) -> CascadeRecord:
    """``rec`` as the failure its client was told of: status ``error``, nothing kept nor served, its spend all
    waste (as :meth:`Ledger._record_told_failure_sync` makes a committed row)."""
    return replace(rec, status="error", error_class=type(told).__name__, error_message=told.message, tier=None,
                   model=None, confidence=None, escalated=False, escalation_waste_usd=rec.cost_usd,
                   attempts=[replace(a, kept=False) for a in rec.attempts])


def _named(ids: list[str], most: int = 50) -> str:
    """Request ids for a warning: the first ``most`` of them, and how many more."""
    return ", ".join(ids[:most]) + (f" and {len(ids) - most} more" if len(ids) > most else "")


def _cause(exc: BaseException | None) -> BaseException | None:
    """The driver's error behind a write's failure (``_write_error`` wraps it in a LedgerError), or ``exc``."""
    return exc.__cause__ if isinstance(exc, LedgerError) and exc.__cause__ is not None else exc


def _held_why(exc: BaseException | None, *, told: bool = True) -> str:
    """Why a held write could not be written: ``told``, in words a client may read (no path, no host, no URL)."""
    cause = _cause(exc)
    if cause is None:
        return "not tried yet"
    if isinstance(cause, _FileMoved):
        return "the ledger file was moved or deleted while the server runs"
    # SQLite's words name no file; a database server's may (a full disk's: its data file), a connection's name
    # the host: said in a class of their own
    if told and not isinstance(cause, sqlite3.Error):
        sqlstate = getattr(cause, "sqlstate", None) or ""
        return {"53": "the ledger's database is out of disk space", "25": "the ledger's database is read-only now"
                }.get(sqlstate[:2], "the ledger's database cannot be reached or written now")
    return str(cause)


def _write_error(rec: CascadeRecord, exc: BaseException) -> LedgerError:
    """The error a write's waiter gets when its record could not be written (``exc``: the driver's)."""
    err = LedgerError(f"ledger write failed for request {rec.request_id}: {exc}")
    err.__cause__ = exc
    return err


def _shadow_row(request_id: str, created_at: float, s: dict[str, Any]) -> tuple:
    """A ``shadow_decisions`` row from a shadow decision dict (cascade/shadow.py)."""
    return (request_id, s["shadow"], created_at, s["status"], s.get("tier"),
            None if s.get("escalated") is None else int(s["escalated"]), s.get("cost_usd"),
            None if s.get("diverges") is None else int(s["diverges"]), s.get("reason", ""),
            int(bool(s.get("sampled"))), s.get("sample_cost_usd"))


def utc_day_start(now: float | None = None) -> float:
    """UNIX time of the start (00:00 UTC) of the UTC day holding ``now`` (default: the present)."""
    t = time.time() if now is None else now
    return (t // 86400) * 86400.0  # UNIX time counts no leap seconds: every UTC day is 86400 s


def _spend_by_bucket(rows: Iterable[tuple[float, str | None, str | None, float]],
                     ) -> list[tuple[tuple[int, str], float]]:
    """(created_at, api_key_id, end_user, cost) rows summed per (UTC day, bucket) for ``spend_daily``: the key's
    bucket and, for a row with an end user, that user's; sorted; no zero sums."""
    out: dict[tuple[int, str], float] = {}
    for created_at, key, user, cost in rows:
        if not cost:
            continue
        day = int(created_at // 86400)
        for b in (("key", key),) if user is None else (("key", key), ("user", key, user)):
            k = (day, spend_bucket(b))
            out[k] = out.get(k, 0.0) + cost
    return sorted(out.items())


def _add_spend(cur: Any, d: _Dialect, rows: Iterable[tuple[float, str | None, str | None, float]]) -> None:
    """Add ``rows`` (as :func:`_spend_by_bucket` takes them; a negative cost takes spend back) to the day's totals
    in ``spend_daily``, through ``cur`` in the caller's transaction."""
    if add := _spend_by_bucket(rows):
        cur.executemany(d.sql(_ADD_SPEND), [d.row((day, b, c)) for (day, b), c in add])


def spend_bucket(bucket: Hashable) -> str:
    """A daily spend limit's bucket (a tuple of strings and None: ``("key", key_id)``, ``("user", key_id,
    end_user)``, ``("shadow", name)``) as tables ``spend_holds`` and ``spend_daily`` name it."""
    return json.dumps(list(bucket) if isinstance(bucket, tuple) else bucket, ensure_ascii=False)


def _day_of(day_start: float) -> int:
    """The UTC day (UNIX time // 86400) that starts at ``day_start``; ValueError for a time that starts none."""
    day = int(day_start // 86400)
    if day * 86400.0 != day_start:
        raise ValueError(f"day_start must be 00:00 UTC of a day (utc_day_start()), not {day_start!r}")
    return day


#: a hold written this long before 00:00 UTC also counts against the new day until its row is written: the
#: request's row is dated when the engine starts it, after its admission (by up to a busy event loop's delay),
#: so one admitted in the day's last instant is recorded in the next without having been held there
HOLD_DAY_SLACK_S = 60.0


def _spend_read(names: Sequence[str], day: int, day_start: float) -> tuple[str, list]:
    """One statement (one snapshot) reading, per bucket, its spend total of ``day`` and the spend holds written
    since ``day_start`` (less :data:`HOLD_DAY_SLACK_S`), with how many."""
    cols: list[str] = []
    params: list[Any] = []
    held = "FROM spend_holds WHERE bucket = ? AND created_at >= ?"
    since = day_start - HOLD_DAY_SLACK_S
    for name in names:
        cols += ["COALESCE((SELECT cost_usd FROM spend_daily WHERE day = ? AND bucket = ?), 0)",
                 f"(SELECT COALESCE(SUM(amount_usd), 0) {held})", f"(SELECT COUNT(*) {held})"]
        params += [day, name, name, since, name, since]
    return f"SELECT {', '.join(cols)}", params


def _spend_figures(row: Sequence[Any], n: int) -> list[tuple[float, float, int]]:
    return [(float(row[3 * i]), float(row[3 * i + 1]), int(row[3 * i + 2])) for i in range(n)]


async def daily_spend(ledger: Ledger, day_start: float, buckets: Sequence[Hashable]) -> list[tuple[float, float, int]]:
    """Per bucket of ``buckets`` (``("key", key_id)``, ``("user", key_id, end_user)``, ``("shadow", name)``),
    in one read (one snapshot): the spend recorded on the UTC day starting at ``day_start`` (its ``spend_daily``
    row), and the spend held that day and not yet recorded, by any process, with how many hold it. A hold is
    deleted by the transaction that records what it held for, so each request counts once: recorded, or held.
    (The limits check and hold in one transaction: :meth:`Ledger.admit_spend`.)"""
    names = [spend_bucket(b) for b in buckets]
    sql, params = _spend_read(names, _day_of(day_start), day_start)
    return _spend_figures((await ledger.query(sql, tuple(params)))[0], len(names))
