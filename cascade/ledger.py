"""The ledger: every request and every attempt, in a SQLite file (WAL mode).

Writes run on one dedicated thread (``await ledger.record(rec)`` never blocks the event loop) and are
committed before ``record`` returns, so a request that got its response is on disk: stopping the process
between requests loses nothing. WAL with ``synchronous=NORMAL`` survives a process crash.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cascade.errors import LedgerError, NotFoundError
from cascade.types import CascadeRecord

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    policy TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    api_key_id TEXT,
    user_tier TEXT,
    status TEXT NOT NULL,
    tier TEXT,
    model TEXT,
    confidence REAL,
    escalated INTEGER NOT NULL,
    n_attempts INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    baseline_cost_usd REAL NOT NULL,
    baseline_estimated INTEGER NOT NULL,
    escalation_waste_usd REAL NOT NULL,
    latency_ms REAL NOT NULL,
    error_class TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created_at);
CREATE INDEX IF NOT EXISTS requests_policy_created ON requests(policy, created_at);
CREATE INDEX IF NOT EXISTS requests_key_created ON requests(api_key_id, created_at);
CREATE TABLE IF NOT EXISTS attempts (
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    idx INTEGER NOT NULL,
    tier TEXT NOT NULL,
    model TEXT NOT NULL,
    backend TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    cost_usd REAL NOT NULL,
    confidence REAL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    kept INTEGER NOT NULL,
    error_class TEXT,
    error_message TEXT,
    features TEXT,
    text TEXT,
    PRIMARY KEY (request_id, idx)
);
CREATE INDEX IF NOT EXISTS attempts_tier ON attempts(tier);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    created_at REAL NOT NULL,
    score INTEGER NOT NULL,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""


class Ledger:
    """SQLite-backed ledger. Use ``await ledger.open()`` / ``await ledger.close()`` (or ``async with``)."""

    def __init__(self, path: str | Path, *, store_text: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.store_text = store_text
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> "Ledger":
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="cascade-ledger")
            await self._call(self._open_sync)
        return self

    def _open_sync(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        if self._executor is not None:
            await self._call(self._close_sync)
            self._executor.shutdown(wait=True)
            self._executor = None

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> "Ledger":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn, *args):  # noqa: ANN001, ANN202
        if self._executor is None:
            raise LedgerError("ledger is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # --- writes -----------------------------------------------------------------------------------
    async def record(self, rec: CascadeRecord) -> None:
        """Write one request and all its attempts in one transaction; returns once committed."""
        await self._call(self._record_sync, rec)

    def _record_sync(self, rec: CascadeRecord) -> None:
        conn = self._require()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.request_id, rec.created_at, rec.policy, rec.endpoint, rec.api_key_id, rec.user_tier,
                 rec.status, rec.tier, rec.model, rec.confidence, int(rec.escalated), len(rec.attempts),
                 rec.prompt_tokens, rec.completion_tokens, rec.cost_usd, rec.baseline_cost_usd,
                 int(rec.baseline_estimated), rec.escalation_waste_usd, rec.latency_ms, rec.error_class,
                 rec.error_message))
            conn.executemany(
                "INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(rec.request_id, a.index, a.tier, a.model, a.backend, a.prompt_tokens, a.completion_tokens,
                  a.latency_ms, a.cost_usd, a.confidence, a.decision, a.reason, int(a.kept), a.error_class,
                  a.error_message, json.dumps(a.features) if a.features else None,
                  a.text if self.store_text else None) for a in rec.attempts])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise LedgerError(f"ledger write failed for request {rec.request_id}: {exc}") from exc

    async def add_feedback(self, request_id: str, score: int, comment: str | None = None) -> int:
        return await self._call(self._feedback_sync, request_id, score, comment)

    def _feedback_sync(self, request_id: str, score: int, comment: str | None) -> int:
        conn = self._require()
        if conn.execute("SELECT 1 FROM requests WHERE request_id=?", (request_id,)).fetchone() is None:
            raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id")
        cur = conn.execute("INSERT INTO feedback(request_id, created_at, score, comment) VALUES (?,?,?,?)",
                           (request_id, time.time(), score, comment))
        return int(cur.lastrowid)

    # --- reads ------------------------------------------------------------------------------------
    async def get(self, request_id: str) -> dict[str, Any] | None:
        return await self._call(self._get_sync, request_id)

    def _get_sync(self, request_id: str) -> dict[str, Any] | None:
        conn = self._require()
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()
            if row is None:
                return None
            out = dict(row)
            out["attempts"] = [dict(a) for a in conn.execute(
                "SELECT * FROM attempts WHERE request_id=? ORDER BY idx", (request_id,))]
            out["feedback"] = [dict(f) for f in conn.execute(
                "SELECT * FROM feedback WHERE request_id=? ORDER BY id", (request_id,))]
            return out
        finally:
            conn.row_factory = None

    async def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return await self._call(lambda: self._require().execute(sql, tuple(params)).fetchall())

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError("ledger is not open")
        return self._conn


async def spend_since(ledger: Ledger, api_key_id: str, since: float) -> float:
    """Total cost recorded for one API key since a UNIX time (for daily spend limits)."""
    rows = await ledger.query("SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE api_key_id=? AND created_at>=?",
                              (api_key_id, since))
    return float(rows[0][0])
