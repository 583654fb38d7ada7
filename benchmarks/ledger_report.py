"""Report time on a generated million-request ledger, SQLite and (where a server can start) PostgreSQL.

Generates a synthetic but internally consistent ledger (requests, their attempts, feedback and one
shadow policy's decisions: costs from token counts and tier prices, waste, last-tier-alone baselines),
bulk-loads it (secondary indexes dropped during the load and rebuilt by ``Ledger.open``), then times
``cascade report --by tier|policy|key|day`` over the whole ledger and over the last 7 days, and
``cascade shadow report``, each the median of ``--repeats`` runs of the same code the CLI runs. Writes
``results/ledger/report.json`` with the machine's facts and each query plan. ``median_cpu_s`` is this
process's CPU time: for SQLite (in-process) it is the query work itself, steady on a loaded machine where
wall time is not; for PostgreSQL the work happens in the server and it only counts the client's share.

    .venv/bin/python -m benchmarks.ledger_report [--rows 1000000] [--repeats 3] [--no-postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import REPO, RESULTS, check_out, int_at_least, machine_facts, write_json

if str(REPO) not in sys.path:  # tests/ is a plain folder: make `tests.*` importable when run as a script
    sys.path.insert(0, str(REPO))

DAY = 86400.0
SMALL = (0.10, 0.20)   # USD per 1M input / output tokens
LARGE = (2.00, 6.00)
POLICIES = np.array(["cascade", "strict", "large", "small"])
USER_TIERS = np.array(["free", "paid", "batch"])

_REQ_COLS = ("request_id, created_at, policy, endpoint, api_key_id, user_tier, status, tier, model, confidence, "
             "escalated, n_attempts, prompt_tokens, completion_tokens, cost_usd, baseline_cost_usd, "
             "baseline_estimated, escalation_waste_usd, latency_ms, error_class, error_message")
_ATT_COLS = ("request_id, idx, tier, model, backend, prompt_tokens, completion_tokens, latency_ms, cost_usd, "
             "confidence, decision, reason, kept, error_class, error_message, features, text, answer_sig")
_SECONDARY = [("requests", "requests_created"), ("requests", "requests_policy_created"),
              ("requests", "requests_key_created"), ("requests", "requests_tier_created"),
              ("attempts", "attempts_tier"), ("feedback", "feedback_request"), ("shadow_decisions", "shadow_created")]


def _cost(price: tuple[float, float], p: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (p * price[0] + c * price[1]) / 1e6


def generate(n: int, seed: int = 0, now: float | None = None, days: int = 30,
             batch: int = 100_000) -> Iterator[dict[str, list[tuple]]]:
    """Batches of rows for requests, attempts, feedback and shadow_decisions (a shadow 'lenient' of policy
    'cascade' with a lower small-tier threshold)."""
    rng = np.random.default_rng(seed)
    now = time.time() if now is None else now
    start = now - days * DAY
    n_keys = 200
    key_weights = 1.0 / np.arange(1, n_keys + 1) ** 1.1  # a few keys send most traffic
    key_weights /= key_weights.sum()
    key_tier = rng.choice(USER_TIERS, size=n_keys, p=[0.6, 0.3, 0.1])
    for off in range(0, n, batch):
        m = min(batch, n - off)
        ids = [f"casc-{seed:02d}{i:012d}" for i in range(off, off + m)]
        created = start + (np.arange(off, off + m) + rng.random(m)) * (now - start) / n  # increasing
        policy = rng.choice(POLICIES, size=m, p=[0.8, 0.1, 0.05, 0.05])
        endpoint = np.where(rng.random(m) < 0.85, "chat", "completions")
        key = rng.choice(n_keys, size=m, p=key_weights)
        anonymous = rng.random(m) < 0.02
        ptok = np.minimum(np.round(rng.lognormal(5.0, 1.1, m)), 30000).astype(int) + 5
        c_small = rng.integers(1, 65, m)
        c_large = rng.integers(1, 129, m)
        conf = rng.beta(4, 2, m)
        thr = np.where(policy == "strict", 0.8, 0.6)
        escalate = ((policy == "cascade") | (policy == "strict")) & (conf < thr)
        error = rng.random(m) < 0.01
        small_cost = _cost(SMALL, ptok, c_small)
        large_cost = _cost(LARGE, ptok, c_large)
        fb_roll = rng.random(m)
        fb_score = np.where(rng.random(m) < 0.8, 1, -1)
        agree = rng.random(m) < 0.5 + 0.45 * conf
        req, att, fb, sh = [], [], [], []
        for i in range(m):
            rid, t, pol = ids[i], float(created[i]), str(policy[i])
            kid = None if anonymous[i] else f"key-{int(key[i]):03d}"
            ut = None if anonymous[i] else str(key_tier[key[i]])
            runs_small = pol in ("cascade", "strict", "small")
            runs_large = pol == "large" or bool(escalate[i])
            attempts = []
            if runs_small:
                kept = not runs_large
                attempts.append(("small", "smollm2", int(ptok[i]), int(c_small[i]), float(small_cost[i]),
                                 float(conf[i]), "escalate" if runs_large else ("final" if pol == "small" else "accept"),
                                 kept, "s%015x" % (i * 7919 + off)))
            if runs_large:
                sig = attempts[0][-1] if attempts and agree[i] else "l%015x" % (i * 104729 + off)
                attempts.append(("large", "qwen", int(ptok[i]), int(c_large[i]), float(large_cost[i]), 0.9,
                                 "final", True, sig))
            status, err = "ok", None
            if error[i]:  # the last attempt failed: nothing served (an upstream 500 is billed no tokens, as the
                status, err = "error", "ProviderServerError"  # engine records it: cascade.resilience.billed_prompt)
                a = attempts[-1]
                attempts[-1] = (a[0], a[1], 0, 0, 0.0, None, "error", False, None)
                attempts = [(x[0], x[1], x[2], x[3], x[4], x[5], x[6] if x[6] == "error" else "escalate", False, x[8])
                            for x in attempts]
            kept_att = next((a for a in attempts if a[7]), None)
            cost = sum(a[4] for a in attempts)
            waste = sum(a[4] for a in attempts if not a[7])
            if runs_large and attempts[-1][6] != "error":
                base, est = float(large_cost[i]), 0
            elif status == "error":  # as the engine: a pinned tier is its own baseline, else estimated from the
                base, est = (cost, 0) if pol in ("large", "small") else (0.0, 1)  # failed attempt's tokens: none
            else:
                base, est = (float(large_cost[i]) if pol != "small" else float(small_cost[i])), 1
            if pol in ("large", "small"):
                est = 0
            escalated = int(kept_att is not None and kept_att[0] != attempts[0][0])
            req.append((rid, t, pol, str(endpoint[i]), kid, ut, status, kept_att[0] if kept_att else None,
                        kept_att[1] if kept_att else None, kept_att[5] if kept_att else None, escalated,
                        len(attempts), sum(a[2] for a in attempts), sum(a[3] for a in attempts), cost, base, est,
                        waste, 50.0 + 400.0 * len(attempts) * rng.random(), err, "upstream 500" if err else None))
            for j, a in enumerate(attempts):
                feats = None if a[5] is None or a[0] == "large" else (
                    '{"mean_logprob": %.4f, "n_tokens": %d.0}' % (float(np.log(max(a[5], 1e-6))), a[3]))
                att.append((rid, j, a[0], a[1], "transformers" if a[0] == "small" else "openai", a[2], a[3],
                            40.0 + 300.0 * rng.random(), a[4], a[5], a[6], a[6], int(a[7]),
                            "ProviderServerError" if a[6] == "error" else None, None, feats, None, a[8]))
            if fb_roll[i] < 0.02 and status == "ok":
                fb.append((rid, t + 30.0, int(fb_score[i]), None))
            if pol == "cascade":
                if not runs_small:
                    continue
                if status == "error":
                    sh.append((rid, "lenient", t, "unknown", None, None, None, None, "its last tier failed"))
                elif conf[i] >= 0.45:  # the shadow keeps the small answer
                    sh.append((rid, "lenient", t, "known", "small", 0, float(small_cost[i]), int(runs_large),
                               "small: confidence >= threshold 0.450"))
                else:
                    sh.append((rid, "lenient", t, "known", "large", 1, cost, 0, "large: last tier always answers"))
        yield {"requests": req, "attempts": att, "feedback": fb, "shadow_decisions": sh}


def bulk_load(target: str, n: int, seed: int = 0, now: float | None = None) -> dict[str, Any]:
    """Fill an empty ledger at ``target`` with ``n`` generated requests; returns counts and seconds."""
    from cascade.ledger import Ledger

    t0 = time.perf_counter()
    ledger = Ledger(target).open_sync()
    conn, d = ledger._require(), ledger.dialect
    for _table, idx in _SECONDARY:
        conn.execute(f"DROP INDEX IF EXISTS {idx}")
    counts = {"requests": 0, "attempts": 0, "feedback": 0, "shadow_decisions": 0}
    cols = {"requests": _REQ_COLS, "attempts": _ATT_COLS, "feedback": "request_id, created_at, score, comment",
            "shadow_decisions": "request_id, shadow, created_at, status, tier, escalated, cost_usd, diverges, reason"}
    for rows in generate(n, seed, now):
        with d.transaction(conn):
            for table in ("requests", "attempts", "feedback", "shadow_decisions"):
                if not rows[table]:
                    continue
                counts[table] += len(rows[table])
                if d.name == "postgresql":
                    with conn.cursor().copy(f"COPY {table} ({cols[table]}) FROM STDIN") as cp:
                        for r in rows[table]:
                            cp.write_row(r)
                else:
                    marks = ",".join("?" * len(rows[table][0]))
                    conn.executemany(f"INSERT INTO {table} ({cols[table]}) VALUES ({marks})", rows[table])
    load_s = time.perf_counter() - t0
    ledger.close_sync()
    t1 = time.perf_counter()
    ledger = Ledger(target).open_sync()  # recreates the secondary indexes
    ledger.execute("ANALYZE")  # planner statistics for the new indexes (both databases)
    ledger.close_sync()
    return {"rows": counts, "load_s": round(load_s, 2), "index_s": round(time.perf_counter() - t1, 2)}


def _plans(ledger: Any, by: str, since: float | None) -> list[str]:
    """The database's plan for the report's scan of the requests (to check which indexes it uses)."""
    from cascade.reports import _ensure_sql_functions, cost_report_sql

    _ensure_sql_functions(ledger)
    sql, params = cost_report_sql(by, since), ((since,) if since is not None else ())
    if ledger.dialect.name == "sqlite":
        return [str(r[-1]) for r in ledger.execute("EXPLAIN QUERY PLAN " + sql, params)]
    return [str(r[0]) for r in ledger.execute("EXPLAIN " + sql, params)]


def time_reports(target: str, repeats: int, now: float) -> dict[str, Any]:
    from cascade.ledger import Ledger
    from cascade.reports import REPORT_BY, cost_report, shadow_report

    out: dict[str, Any] = {}
    ledger = Ledger(target).open_sync()
    try:
        for label, since in (("all", None), ("since_7d", now - 7 * DAY)):
            for by in REPORT_BY:
                times, cpu = [], []
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    rep = cost_report(ledger, by, since)
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                out[f"report_by_{by}_{label}"] = {
                    "median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times],
                    "median_cpu_s": round(statistics.median(cpu), 3),
                    "groups": len(rep["groups"]), "requests": rep["total"]["requests"],
                    "spend_usd": round(rep["total"]["spend_usd"], 4), "plan": _plans(ledger, by, since)}
                print(f"  report --by {by:<6} {label:<8} median {statistics.median(times):.3f} s "
                      f"({rep['total']['requests']:,} requests, {len(rep['groups'])} groups)", flush=True)
        for label, since in (("all", None), ("since_7d", now - 7 * DAY)):
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                shadow_report(ledger, since)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            out[f"shadow_report_{label}"] = {"median_s": round(statistics.median(times), 3),
                                             "runs_s": [round(t, 3) for t in times],
                                             "median_cpu_s": round(statistics.median(cpu), 3)}
            print(f"  shadow report    {label:<8} median {statistics.median(times):.3f} s", flush=True)
    finally:
        ledger.close_sync()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int_at_least(1), default=1_000_000, help="requests to generate (1,000,000)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="runs per report; the median is kept (3)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--out", default=str(RESULTS / "ledger" / "report.json"))
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    now = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cascade-ledger-bench-") as tmp:
        db = str(Path(tmp) / "ledger.sqlite")
        print(f"sqlite: generating and loading {args.rows:,} requests", flush=True)
        load = bulk_load(db, args.rows, args.seed, now)
        load["file_mb"] = round(sum(p.stat().st_size for p in Path(tmp).glob("ledger.sqlite*")) / 1e6, 1)
        print(f"  loaded in {load['load_s']} s, indexes in {load['index_s']} s, {load['file_mb']} MB", flush=True)
        import sqlite3

        results["sqlite"] = {"version": sqlite3.sqlite_version, "load": load,
                             "timings": time_reports(db, args.repeats, now)}
    if args.no_postgres:
        results["postgresql"] = {"skipped": "--no-postgres"}
    else:
        results["postgresql"] = _postgres(args, now)
    facts = machine_facts(rows=args.rows, repeats=args.repeats, seed=args.seed)
    path = write_json(args.out, {"benchmark": "ledger_report", "machine": facts, "results": results})
    print(f"wrote {path}")
    return 0


def _postgres(args: argparse.Namespace, now: float) -> dict[str, Any]:
    try:
        from tests.pg import PostgresServer

        server = PostgresServer().start()
    except BaseException as exc:  # pytest.skip raises a BaseException subclass  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"postgresql: skipped ({exc})", flush=True)
        return {"skipped": str(exc)}
    try:
        import psycopg

        with psycopg.connect(server.url) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
        print(f"postgresql {version}: generating and loading {args.rows:,} requests", flush=True)
        load = bulk_load(server.url, args.rows, args.seed, now)
        print(f"  loaded in {load['load_s']} s, indexes in {load['index_s']} s", flush=True)
        return {"version": version, "settings": "initdb defaults, fsync=off (tests/pg.py)", "load": load,
                "timings": time_reports(server.url, args.repeats, now)}
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
