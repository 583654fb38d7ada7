"""Engine tiers on OpenAI-protocol fault servers (tests/fault_server.py), for the tests of resilience and
accounting: a plain tier (one backend), a provider, a tier of providers, and the ledger's rows read back."""

from __future__ import annotations

import sqlite3
from typing import Any


def plain(name: str, fs: Any, **kw: Any) -> dict[str, Any]:
    """An openai tier without providers (one backend, no resilience layer)."""
    return {"name": name, "backend": "openai", "model": f"model-{name}", "options": {"base_url": fs.base_url},
            "threshold": 0.0, "max_tokens": 4, "timeout_s": 5, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
            **kw}


def prov(name: str, fs: Any, **kw: Any) -> dict[str, Any]:
    """One provider of a tier with ``providers``."""
    return {"name": name, "backend": "openai", "model": f"model-{name}", "options": {"base_url": fs.base_url}, **kw}


def rtier(name: str, providers: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """A tier of providers: retries, fallback between them, breakers (quick settings for tests)."""
    d = {"name": name, "providers": providers, "threshold": 0.0, "max_tokens": 4, "timeout_s": 5,
         "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
         "retry": {"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.2, "max_retry_after_s": 2.0},
         "breaker": {"failure_threshold": 5, "cooldown_s": 30}}
    d.update(kw)
    return d


def db_rows(tmp_path: Any, sql: str, *args: Any) -> list[tuple]:
    """Rows of the test's SQLite ledger (``tmp_path/ledger.sqlite``, as ``make_config`` puts it)."""
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        return conn.execute(sql, args).fetchall()
