"""Daily spend limits with several replicas on one ledger: how far a burst ends past the limit.

One fault-injecting OpenAI-compatible server (``tests/fault_server.py``, answering after ``--delay`` seconds so
that the burst's requests overlap) prices one tier so that a request costs ``--request-cost`` (USD; its output
only, so that a request's worst case, which it holds while in flight, is its cost). N replicas are real
``cascade serve`` processes sharing one ledger, as in production; one API key whose user tier has
``daily_spend_limit_usd: --limit``. A burst of ``--requests`` requests at each ``--concurrency`` (``180`` with
180 requests: the whole burst at once), round-robin over the replicas, no retries. Per run: the day's spend
from the ledger (sum of ``requests.cost_usd``), spend/limit, requests admitted and refused (429 by error code,
and by wording: "requests in flight", retry in a second, or "spent today", come back tomorrow), the largest
request's cost, the rows left in ``spend_holds`` once every answer is in (must be 0), and the wall time. The
bound is one request past the limit however many replicas share it (README, ``daily_spend_limit_usd``: every
replica checks and holds in one ledger transaction, one at a time per key).

Nothing in the replicas is patched: a watcher process polls ``spend_holds`` every ``--poll-ms`` and notes when
each hold is first seen. A hold's ``created_at`` is stamped inside its admission's transaction, so per request:
admitted how long after the client sent it (``created_at`` minus the send), and seen how long after that (its
commit, plus up to a poll). The admissions past the limit are those made once the holds admitted before them
(in ``created_at`` order) summed to the limit.

    .venv/bin/python -m benchmarks.replica_spend [--replicas 1,3] [--ledger sqlite] [--postgres] [--repeat 3]
        [--requests 180] [--concurrency 60,180] [--limit 1.0] [--request-cost 0.017] [--delay 0.75]
        [--ledger postgresql://user@host/db] [--port-base 8950] [--out results/limits/replica_spend.json]

``--replicas``: the replica counts to compare, comma-separated (``3``, ``2,3``); one replica, the baseline, is
always run too. ``--concurrency``: comma-separated too; each is run with every ledger and replica count.
``--ledger``: ``sqlite`` (a fresh file per run; the default), ``postgres`` (a throwaway server started like
``tests/pg.py``'s, as ``--postgres`` does) or a ``postgresql://`` URL of a database of the benchmark's own (each
run uses a key of its own, so nothing is deleted there); give it several times to run several ledgers. Ports:
the fault server on ``--port-base``, PostgreSQL on the next, the replicas after. Writes the JSON and a Markdown
table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks._common import (REPO, RESULTS, check_out, int_at_least, machine_facts, percentile, rel,
                                stop_processes, write_json, write_text)

if str(REPO) not in sys.path:  # tests/ is a plain folder: make `tests.*` importable when run as a script
    sys.path.insert(0, str(REPO))

ANSWER_TOKENS = 6  # the fault server's answer, "Paris is the capital of France.", in word tokens
BODY = {"model": "cascade", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": ANSWER_TOKENS}
READY_S = 120.0


# --- the replicas --------------------------------------------------------------------------------


def config(ledger: str, upstream: str, key_id: str, key: str, limit: float, cost: float) -> dict[str, Any]:
    """A replica's config: one tier on the fault server, priced so that a request's answer costs ``cost``."""
    from serving.auth import hash_key

    tier = {"name": "remote", "backend": "openai", "model": "bench-model", "options": {"base_url": upstream},
            "threshold": 0.0, "max_tokens": ANSWER_TOKENS, "timeout_s": 60,
            "price": {"input_per_1m": 0.0, "output_per_1m": cost / ANSWER_TOKENS * 1e6}}
    return {"server": {"host": "127.0.0.1", "log_level": "warning"}, "ledger": {"path": ledger},
            "tiers": [tier], "policies": {"cascade": {"chain": ["remote"]}},
            "user_tiers": {"capped": {"daily_spend_limit_usd": limit}},
            "auth": {"keys": [{"id": key_id, "sha256": hash_key(key), "user_tier": "capped"}]}}


class Replicas:
    """``cascade serve`` processes on one config, one port each, started together, stopped with SIGTERM."""

    def __init__(self, cfg: dict[str, Any], ports: list[int], tmp: Path) -> None:
        import yaml

        self.ports, self.tmp = ports, tmp
        self.path = tmp / "cascade.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.procs: list[subprocess.Popen] = []
        self.logs = [tmp / f"replica-{i}.log" for i in range(len(ports))]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def __enter__(self) -> "Replicas":
        import httpx

        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            for port, log in zip(self.ports, self.logs, strict=True):
                cmd = [sys.executable, "-m", "cascade.cli", "serve", "--config", str(self.path), "--port", str(port)]
                with open(log, "wb") as out:
                    self.procs.append(subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=out,
                                                       stderr=subprocess.STDOUT))
            deadline = time.monotonic() + READY_S
            waiting = set(range(len(self.procs)))
            while waiting:
                for i in sorted(waiting):
                    if self.procs[i].poll() is not None:
                        tail = self.logs[i].read_text(errors="replace").strip().splitlines()[-1:]
                        raise RuntimeError(f"replica {i} exited with {self.procs[i].returncode}: {' '.join(tail)}")
                    try:
                        if httpx.get(f"{self.urls[i]}/ready", timeout=2).status_code == 200:
                            waiting.discard(i)
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replicas {sorted(waiting)} not ready after {READY_S:.0f} s")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes(self.procs)

    def warnings(self) -> list[str]:
        """The replicas' log lines at WARNING and above (a hold that could not be written is logged so)."""
        out = []
        for i, log in enumerate(self.logs):
            for line in log.read_text(errors="replace").splitlines():
                if any(w in line for w in ("WARNING", "ERROR", "CRITICAL")):
                    out.append(f"replica {i}: {line[:300]}")
        return out


# --- the ledger ----------------------------------------------------------------------------------


def _connect(target: str) -> Any:
    if target.startswith(("postgresql://", "postgres://")):
        import psycopg

        return psycopg.connect(target, autocommit=True, connect_timeout=10)
    conn = sqlite3.connect(target, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _q(target: str, sql: str) -> str:
    return sql.replace("?", "%s") if target.startswith(("postgresql://", "postgres://")) else sql


def ledger_facts(target: str, key_id: str, bucket: str) -> dict[str, Any]:
    conn = _connect(target)
    try:
        def one(sql: str, *params: Any) -> tuple:
            return conn.execute(_q(target, sql), params).fetchone()

        spend, n_rows, n_costed, max_cost = one(
            "SELECT COALESCE(SUM(cost_usd), 0), COUNT(*), COALESCE(SUM(CASE WHEN cost_usd > 0 THEN 1 ELSE 0 END), 0), "
            "COALESCE(MAX(cost_usd), 0) FROM requests WHERE api_key_id = ?", key_id)
        by_status = dict(conn.execute(_q(target, "SELECT status, COUNT(*) FROM requests WHERE api_key_id = ? "
                                                 "GROUP BY status"), (key_id,)).fetchall())
        holds = one("SELECT COUNT(*) FROM spend_holds WHERE bucket = ?", bucket)[0]
    finally:
        conn.close()
    return {"spend_usd": float(spend), "rows": int(n_rows), "rows_with_cost": int(n_costed),
            "max_request_cost_usd": float(max_cost), "rows_by_status": {str(k): int(v) for k, v in by_status.items()},
            "spend_holds_left": int(holds)}


def watch_main(target: str, bucket: str, out: str, poll_ms: float) -> int:
    """Entry of the watcher process: poll ``spend_holds`` for ``bucket`` until SIGTERM; write, per hold, its
    instance, amount, ``created_at`` and when it was first and last seen (wall clock)."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    conn = _connect(target)
    sql = _q(target, "SELECT hold_id, instance, amount_usd, created_at FROM spend_holds WHERE bucket = ?")
    seen: dict[str, list] = {}
    polls, slowest = 0, 0.0
    print("watching", flush=True)
    while not stop:
        t0 = time.time()
        rows = conn.execute(sql, (bucket,)).fetchall()
        t1 = time.time()
        polls, slowest = polls + 1, max(slowest, t1 - t0)
        for hold_id, instance, amount, created in rows:
            if hold_id in seen:
                seen[hold_id][4] = t0
            else:  # the hold was committed by the time this read began at the latest (and after the last read)
                seen[hold_id] = [instance, float(amount), float(created), t0, t0]
        time.sleep(max(0.0, poll_ms / 1e3 - (t1 - t0)))
    conn.close()
    Path(out).write_text(json.dumps({"polls": polls, "slowest_poll_s": slowest, "holds": seen}))
    return 0


class Watcher:
    def __init__(self, target: str, bucket: str, tmp: Path, poll_ms: float) -> None:
        self.out = tmp / "holds.json"
        self.args = [sys.executable, "-m", "benchmarks.replica_spend", "--watch", target, "--watch-bucket", bucket,
                     "--watch-out", str(self.out), "--poll-ms", str(poll_ms)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Watcher":
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "watching":
            raise RuntimeError(f"the spend_holds watcher did not start (exit {self.proc.wait()})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_processes([self.proc])

    def result(self) -> dict[str, Any]:
        return json.loads(self.out.read_text())


# --- the burst -----------------------------------------------------------------------------------


async def burst(urls: list[str], key: str, n: int, concurrency: int) -> list[dict[str, Any]]:
    """``n`` requests, at most ``concurrency`` at once, request i to replica i % len(urls); no retries."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    head = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(i: int) -> dict[str, Any]:
            async with sem:
                t0 = time.time()
                try:
                    r = await client.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=BODY, headers=head)
                except httpx.HTTPError as exc:
                    return {"i": i, "replica": i % len(urls), "status": None, "error": repr(exc), "t0": t0,
                            "t1": time.time()}
                err = r.json().get("error") if r.status_code != 200 else None
                return {"i": i, "replica": i % len(urls), "status": r.status_code, "t0": t0, "t1": time.time(),
                        "request_id": r.headers.get("x-request-id"), "code": (err or {}).get("code"),
                        "message": (err or {}).get("message"), "retry_after": r.headers.get("retry-after")}

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def refusal_kind(message: str | None) -> str:
    """A daily-limit 429's wording: held by requests in flight (retry in a second) or spent (tomorrow)."""
    return "in_flight" if "requests in flight" in (message or "") else "spent_today"


def hold_timeline(watch: dict[str, Any], limit: float, instances: dict[str, int],
                  sent: dict[str, float]) -> dict[str, Any]:
    """From the watcher's holds (by hold id, the request id: instance, amount, ``created_at``, first and last
    seen): how long after the client sent its request each was admitted (``sent``, by request id) and how long
    after its admission it was first seen; and the admissions made once the holds admitted before them (in
    ``created_at`` order: the admission transactions run one at a time) summed to ``limit``."""
    holds = sorted(watch["holds"].items(), key=lambda kv: kv[1][2])
    delays = [(first - created) * 1e3 for _, (_, _, created, first, _) in holds]
    admit_ms = [(created - sent[hid]) * 1e3 for hid, (_, _, created, _, _) in holds if hid in sent]
    past, admitted = [], 0.0
    for hid, (inst, amount, created, _first, _last) in holds:
        if admitted >= limit * (1 - 1e-9):
            past.append({"hold_id": hid, "replica": instances.get(inst), "amount_usd": round(amount, 6),
                         "admitted_after_usd": round(admitted, 6),
                         "admitted_ms_after_sent": round((created - sent[hid]) * 1e3, 2) if hid in sent else None})
        admitted += amount
    return {
        "holds_seen": len(holds), "holds_matched_to_requests": len(admit_ms), "polls": watch["polls"],
        "slowest_poll_ms": round(watch["slowest_poll_s"] * 1e3, 2),
        "admitted_after_sent_ms": _pcts(admit_ms), "hold_visible_after_admission_ms": _pcts(delays),
        "held_usd_total": round(admitted, 6), "admissions_past_limit": past,
    }


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": round(percentile(values, q), 2) if values else None for q in (50, 90, 99)} | {
        "max": round(max(values), 2) if values else None, "min": round(min(values), 2) if values else None}


def run_once(target: str, label: str, replicas: int, concurrency: int, ports: list[int], upstream: str,
             args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from cascade.ledger import spend_bucket

    key_id = f"bench-{label}-{replicas}r-{secrets.token_hex(4)}"
    key = "sk-bench-" + secrets.token_urlsafe(16)
    bucket = spend_bucket(("key", key_id))
    cfg = config(target, upstream, key_id, key, args.limit, args.request_cost)
    t_start = time.perf_counter()
    with Replicas(cfg, ports[:replicas], tmp) as reps:
        startup = time.perf_counter() - t_start
        instances = _instances(target)
        with Watcher(target, bucket, tmp, args.poll_ms) as watcher:
            t0 = time.perf_counter()
            results = asyncio.run(burst(reps.urls, key, args.requests, concurrency))
            wall = time.perf_counter() - t0
            facts = ledger_facts(target, key_id, bucket)  # every answer is in: no hold may be left
        after = ledger_facts(target, key_id, bucket)
    facts["spend_holds_left_after_stop"] = after["spend_holds_left"]
    warnings = reps.warnings()
    sent = {r["request_id"]: r["t0"] for r in results if r.get("request_id")}
    timeline = hold_timeline(watcher.result(), args.limit, instances, sent)
    statuses = Counter(str(r["status"]) for r in results)
    refused = [r for r in results if r["status"] == 429]
    max_cost = facts["max_request_cost_usd"]
    spend = facts["spend_usd"]
    over = spend - args.limit
    return {
        "ledger": label, "replicas": replicas, "key_id": key_id, "requests": args.requests,
        "concurrency": concurrency, "limit_usd": args.limit, "upstream_delay_s": args.delay,
        "spend_usd": round(spend, 6), "spend_over_limit": round(spend / args.limit, 4),
        "overshoot_usd": round(over, 6),
        "overshoot_requests": round(over / max_cost, 2) if max_cost else None,
        "bound_requests": 1, "within_bound": spend <= args.limit + max_cost + 1e-9,
        "admitted": statuses.get("200", 0), "statuses": dict(statuses),
        "refused_by_code": dict(Counter(r["code"] for r in refused)),
        "refused_by_wording": dict(Counter(refusal_kind(r["message"]) for r in refused)),
        "admitted_by_replica": dict(Counter(str(r["replica"]) for r in results if r["status"] == 200)),
        "max_request_cost_usd": round(max_cost, 6), "ledger_rows": facts,
        "spend_holds_left": facts["spend_holds_left"], "wall_s": round(wall, 3), "startup_s": round(startup, 2),
        "client_errors": [r["error"] for r in results if r["status"] is None][:5],
        "holds": timeline, "replica_warnings": warnings[:20], "replica_warning_count": len(warnings),
        "refusal_examples": {k: next((r["message"] for r in refused if refusal_kind(r["message"]) == k), None)
                             for k in ("in_flight", "spent_today")},
    }


def _instances(target: str) -> dict[str, int]:
    """The replicas' ledger instance ids, numbered in the order their heartbeats began."""
    conn = _connect(target)
    try:
        rows = conn.execute("SELECT instance FROM instances ORDER BY started_at").fetchall()
    finally:
        conn.close()
    return {r[0]: i for i, r in enumerate(rows)}


# --- PostgreSQL ----------------------------------------------------------------------------------


def start_postgres(port: int) -> Any:
    """A throwaway PostgreSQL server (tests/pg.py's) on ``port``; its skips become a RuntimeError."""
    import pytest

    from tests.pg import PostgresServer

    try:
        server = PostgresServer()
        server.port = port
        return server.start()
    except pytest.skip.Exception as exc:
        raise RuntimeError(f"PostgreSQL: {exc.msg}") from None


def _postgres_version(url: str) -> str | None:
    try:
        conn = _connect(url)
        try:
            return conn.execute("SHOW server_version").fetchone()[0]
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - a fact for the report only
        return None


# --- the report ----------------------------------------------------------------------------------


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ledger, concurrency and replica count: the spend's mean, min and max over the repetitions."""
    out = []
    for label, conc, n in dict.fromkeys((r["ledger"], r["concurrency"], r["replicas"]) for r in runs):
        rs = [r for r in runs if (r["ledger"], r["concurrency"], r["replicas"]) == (label, conc, n)]
        spends = [r["spend_usd"] for r in rs]
        out.append({"ledger": label, "concurrency": conc, "replicas": n, "runs": len(rs),
                    "spend_usd_mean": round(sum(spends) / len(spends), 4), "spend_usd_min": min(spends),
                    "spend_usd_max": max(spends), "admitted_max": max(r["admitted"] for r in rs),
                    "overshoot_requests_max": max(r["overshoot_requests"] or 0 for r in rs),
                    "admissions_past_limit_max": max(len(r["holds"]["admissions_past_limit"]) for r in rs),
                    "all_within_bound": all(r["within_bound"] for r in rs),
                    "spend_holds_left_max": max(r["spend_holds_left"] for r in rs),
                    "admitted_after_sent_ms_max": max(r["holds"]["admitted_after_sent_ms"]["max"] or 0 for r in rs),
                    "hold_visible_ms_max": max(r["holds"]["hold_visible_after_admission_ms"]["max"] or 0
                                               for r in rs)})
    return out


def markdown(doc: dict[str, Any]) -> str:
    m, st = doc["machine"], doc["settings"]
    lines = [f"# Daily spend limit, replicas sharing one ledger ({m['date']}, commit "
             f"{(m['git']['commit'] or '?')[:10]})", "",
             f"Limit ${st['limit_usd']:g}/day on one key; {st['requests']} requests at concurrency "
             f"{', '.join(map(str, st['concurrency']))}, round-robin over the replicas (real `cascade serve` "
             f"processes); upstream delay {st['upstream_delay_s']} s; a request costs ~${st['request_cost_usd']:g}. "
             f"{m['cores_usable']} cores ({m['cpu_model']}), load {m['load_average_1_5_15']}. The bound: one "
             f"request past the limit, ${st['limit_usd'] + st['request_cost_usd']:.3f}, however many replicas. "
             "'admitted after sent': from the client's send to the admission transaction (its hold's "
             "`created_at`); 'hold visible': from then until the watcher first saw the hold (its commit, plus up "
             f"to a {st['poll_ms']:g} ms poll).", "",
             "| ledger | concurrency | replicas | runs | spend $ mean | min | max | within bound | "
             "admissions past limit (max) | holds left (max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in doc["summary"]:
        lines.append(f"| {x['ledger']} | {x['concurrency']} | {x['replicas']} | {x['runs']} | "
                     f"{x['spend_usd_mean']:.4f} | {x['spend_usd_min']:.4f} | {x['spend_usd_max']:.4f} | "
                     f"{'yes' if x['all_within_bound'] else '**no**'} | {x['admissions_past_limit_max']} | "
                     f"{x['spend_holds_left_max']} |")
    lines += ["", "Every run:", "",
              "| ledger | concurrency | replicas | run | spend $ | spend/limit | past limit (requests) | "
              "within bound | admitted | 429 in flight | 429 spent today | max cost $ | holds left | "
              "admitted after sent p50/max ms | hold visible p50/max ms | admissions past limit | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(doc["runs"]):
        h = r["holds"]
        adm, vis = h["admitted_after_sent_ms"], h["hold_visible_after_admission_ms"]
        lines.append(f"| {r['ledger']} | {r['concurrency']} | {r['replicas']} | {r.get('repetition', i)} | "
                     f"{r['spend_usd']:.4f} | {r['spend_over_limit']:.3f} | {r['overshoot_requests']} | "
                     f"{'yes' if r['within_bound'] else '**no**'} | {r['admitted']} | "
                     f"{r['refused_by_wording'].get('in_flight', 0)} | "
                     f"{r['refused_by_wording'].get('spent_today', 0)} | "
                     f"{r['max_request_cost_usd']:.4f} | {r['spend_holds_left']} | {adm['p50']}/{adm['max']} | "
                     f"{vis['p50']}/{vis['max']} | {len(h['admissions_past_limit'])} | {r['wall_s']} |")
    lines += ["", "Before the check and the hold were one transaction (a spend read, then a hold written in the "
              "background; commit ba36b1b), 3 replicas spent $1.02 at concurrency 60 and $1.24-2.82 at "
              "concurrency 180 (SQLite $2.14-2.82, PostgreSQL $1.24-2.64); one replica: $1.003.", ""]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def _replica_counts(text: str) -> list[int]:
    try:
        counts = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: replica counts are whole numbers, comma-separated") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: replica counts must be at least 1")
    return sorted(counts | {1})


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrencies are whole numbers, comma-separated") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrencies must be at least 1")
    return list(dict.fromkeys(values))


def progress(r: dict[str, Any]) -> str:
    """A run in one line, as it ends."""
    h = r["holds"]
    return (f"{r['ledger']} concurrency {r['concurrency']} {r['replicas']} replica(s) run {r.get('repetition')}: "
            f"spend ${r['spend_usd']:.4f} ({r['spend_over_limit']:.3f} x limit, {r['overshoot_requests']} requests "
            f"past it, within bound: {r['within_bound']}), admitted {r['admitted']}, 429 {r['refused_by_wording']}, "
            f"holds left {r['spend_holds_left']}, admitted after sent p50/max {h['admitted_after_sent_ms']['p50']}/"
            f"{h['admitted_after_sent_ms']['max']} ms, hold visible p50/max "
            f"{h['hold_visible_after_admission_ms']['p50']}/{h['hold_visible_after_admission_ms']['max']} ms, "
            f"past limit {len(h['admissions_past_limit'])}, wall {r['wall_s']} s")


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0 or x != x or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number above 0")
    return x


def _ledger(text: str) -> str:
    if text in ("sqlite", "postgres") or text.startswith(("postgresql://", "postgres://")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give sqlite, postgres (a throwaway server) or a postgresql:// URL")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replica_spend", description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=_replica_counts, default=[1, 3],
                    help="replica counts to compare, comma-separated; 1 (the baseline) is always run (default 3)")
    ap.add_argument("--ledger", type=_ledger, action="append",
                    help="sqlite (default), postgres (a throwaway server) or a postgresql:// URL; repeatable")
    ap.add_argument("--postgres", action="store_true", help="also run on a throwaway PostgreSQL server")
    ap.add_argument("--repeat", type=int_at_least(1), default=1, help="runs of each replica count (default 1)")
    ap.add_argument("--requests", type=int_at_least(1), default=180)
    ap.add_argument("--concurrency", type=_concurrencies, default=[60],
                    help="requests in flight at once, comma-separated to run several (default 60)")
    ap.add_argument("--limit", type=_positive, default=1.0, help="daily_spend_limit_usd of the key (default 1.0)")
    ap.add_argument("--request-cost", type=_positive, default=0.017, help="USD per request (default 0.017)")
    ap.add_argument("--delay", type=float, default=0.75, help="seconds the upstream takes to answer (default 0.75)")
    ap.add_argument("--poll-ms", type=_positive, default=5.0, help="the spend_holds watcher's period (default 5)")
    ap.add_argument("--port-base", type=int_at_least(1024), default=8950,
                    help="fault server's port; PostgreSQL's the next, the replicas' after (default 8950)")
    ap.add_argument("--out", default=str(RESULTS / "limits" / "replica_spend.json"))
    ap.add_argument("--watch", help=argparse.SUPPRESS)
    ap.add_argument("--watch-bucket", help=argparse.SUPPRESS)
    ap.add_argument("--watch-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.watch:
        return watch_main(args.watch, args.watch_bucket, args.watch_out, args.poll_ms)
    if not 0.0 <= args.delay <= 30.0:
        ap.error(f"--delay {args.delay}: seconds from 0 to 30")
    ledgers = list(dict.fromkeys((args.ledger or ["sqlite"]) + (["postgres"] if args.postgres else [])))
    ports = list(range(args.port_base, args.port_base + 2 + max(args.replicas)))
    if ports[-1] > 65535:
        ap.error(f"--port-base {args.port_base}: the ports it needs go past 65535")
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        ap.error(f"--port-base {args.port_base}: port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1")
    check_out(ap, args.out)

    import logging

    from tests.fault_server import FaultServerThread

    logging.basicConfig(level=logging.ERROR)
    runs: list[dict[str, Any]] = []
    pg_versions: dict[str, str | None] = {}
    t_all = time.perf_counter()
    with FaultServerThread(port=ports[0], delay_s=args.delay) as upstream, \
            tempfile.TemporaryDirectory(prefix="cascade-replica-spend-") as td:
        for ledger in ledgers:
            pg = None
            try:
                if ledger == "postgres":
                    try:
                        pg = start_postgres(ports[1])
                    except RuntimeError as exc:
                        print(f"replica_spend: {exc}", file=sys.stderr)
                        return 1
                target = pg.url if pg is not None else ledger
                label = "sqlite" if ledger == "sqlite" else "postgresql"
                if label == "postgresql":
                    pg_versions[ledger if pg is None else "throwaway"] = _postgres_version(target)
                for conc in args.concurrency:
                    for rep in range(args.repeat):
                        for n in args.replicas:
                            tmp = Path(td) / f"{label}-c{conc}-{n}-{rep}"
                            tmp.mkdir()
                            where = str(tmp / "ledger.sqlite") if ledger == "sqlite" else target
                            upstream.reset()
                            r = run_once(where, label, n, conc, ports[2:], upstream.base_url, args, tmp)
                            r["repetition"] = rep
                            r["upstream_calls"] = upstream.stats()["requests"]
                            runs.append(r)
                            print(progress(r), flush=True)
            finally:
                if pg is not None:
                    pg.stop()
    doc = {
        "benchmark": "replica_spend",
        "what": "a burst at one key with a daily spend limit, round-robin over N `cascade serve` processes sharing "
                "one ledger; spend read from the ledger after the burst (sum of requests.cost_usd of the key)",
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "limit_usd": args.limit,
                     "request_cost_usd": args.request_cost, "upstream_delay_s": args.delay,
                     "replica_counts": args.replicas, "repeat": args.repeat, "ledgers": ledgers,
                     "poll_ms": args.poll_ms,
                     "pricing": f"output only: {ANSWER_TOKENS} answer tokens at "
                                f"${args.request_cost / ANSWER_TOKENS * 1e6:.2f}/1M, max_tokens {ANSWER_TOKENS}: "
                                "a request's held worst case is its cost"},
        "summary": summary(runs),
        "runs": runs,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "machine": machine_facts(postgres=pg_versions or None, setup="replicas are separate `cascade serve` "
                                 "processes on 127.0.0.1, not patched; the client, the fault server and a "
                                 "spend_holds watcher (a process of its own) on the same machine"),
    }
    path = write_json(args.out, doc)
    md = write_text(Path(args.out).with_suffix(".md"), markdown(doc))
    print(f"wrote {rel(path)} and {rel(md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
