"""Load with injected faults through the HTTP endpoint: latency percentiles and throughput.

The same run as ``tests/test_resilience.py::test_load_300_requests_with_20_percent_faults``: the real
endpoint (``serving.create_app`` on uvicorn, loopback) serving a two-tier cascade whose tiers each have
two providers, every provider a fault-injecting OpenAI-compatible server (``tests/fault_server.py``)
failing a share of requests (500, 503, 429 with and without a hint, connection reset and close, stalls
past the provider timeout, 400, 401). The load test's invariants are checked on every run (no unhandled
500, one ledger row per request, every client answered or given a classified error); this script adds
the figures, for a run with faults and a fault-free baseline, written with the machine's facts to
``results/resilience/load.json``. It measures the engine's resilience overhead and behaviour, not model
speed: the providers answer from a fixed script.

    .venv/bin/python -m benchmarks.resilience_load [--requests 300] [--concurrency 50] [--fault-rate 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, RESULTS, check_out, machine_facts, percentile, rel, write_json

if str(REPO) not in sys.path:  # tests/ is a plain folder: make `tests.*` importable when run as a script
    sys.path.insert(0, str(REPO))


async def one_run(n: int, concurrency: int, fault_rate: float, seed: int) -> dict[str, Any]:
    from cascade.config import parse_config
    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread
    from tests.test_resilience import LOAD_KINDS, check_load, fire, load_config

    names = ["s1", "s2", "l1", "l2"]
    with tempfile.TemporaryDirectory(prefix="cascade-load-") as tmp:
        tmp_path = Path(tmp)
        fss = {name: FaultServerThread(seed=seed + i) for i, name in enumerate(names)}
        for fs in fss.values():
            fs.__enter__()
        try:
            for fs in fss.values():
                fs.faults(rate=fault_rate, kinds=LOAD_KINDS)
            cfg = parse_config(load_config(tmp_path, fss), source="<load>", environ={})
            with ServerThread(create_app(cfg)) as srv:
                await fire(srv.url, min(20, n), min(concurrency, 20))      # warm-up: connections, imports
                for i, fs in enumerate(fss.values()):
                    fs.reset()
                    fs.faults(rate=fault_rate, kinds=LOAD_KINDS, seed=seed + i)
                db = tmp_path / "ledger.sqlite"
                t0 = time.perf_counter()
                results = await fire(srv.url, n, concurrency)
                elapsed = time.perf_counter() - t0
            faults = Counter()
            for fs in fss.values():
                faults.update(fs.stats()["by_fault"])
            counts = _check_after_warmup(check_load, results, db, fss, warm=min(20, n))
        finally:
            for fs in fss.values():
                fs.__exit__(None, None, None)
    lat = [r["latency_s"] * 1e3 for r in results]
    ok_lat = [r["latency_s"] * 1e3 for r in results if r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in results)
    error_types = Counter(r["body"]["error"]["type"] for r in results if r["status"] != 200)
    escalated = sum(1 for r in results if r["status"] == 200 and r["body"].get("cascade", {}).get("escalated"))

    def pct(values: list[float]) -> dict[str, float]:
        return {f"p{q}": round(percentile(values, q), 2) for q in (50, 90, 99)} | {
            "max": round(max(values), 2) if values else None}

    return {
        "requests": n, "concurrency": concurrency, "fault_rate_per_provider_call": fault_rate,
        "elapsed_s": round(elapsed, 3), "throughput_rps": round(n / elapsed, 1),
        "latency_ms_all": pct(lat), "latency_ms_ok": pct(ok_lat),
        "answered": counts["ok"], "classified_errors": counts["errors"], "statuses": dict(statuses),
        "error_types": dict(error_types), "escalated_answers": escalated,
        "provider_calls": counts["provider_calls"], "faults_injected": dict(faults),
        "attempts_by_class": counts["attempts_by_class"],
    }


def _check_after_warmup(check_load, results, db, fss, *, warm: int) -> dict[str, Any]:  # noqa: ANN001
    """The load invariants on the measured run: the warm-up's ledger rows are removed first."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        first = [r[0] for r in conn.execute("SELECT request_id FROM requests ORDER BY created_at LIMIT ?", (warm,))]
        conn.executemany("DELETE FROM attempts WHERE request_id=?", [(i,) for i in first])
        conn.executemany("DELETE FROM requests WHERE request_id=?", [(i,) for i in first])
    return check_load(results, db, fss)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    ap.add_argument("--out", default=str(RESULTS / "resilience" / "load.json"))
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be at least 1")
    if not 0.0 <= args.fault_rate <= 1.0:
        ap.error(f"--fault-rate is a share of requests, in [0, 1]: got {args.fault_rate}")
    check_out(ap, args.out)  # before the load runs, not after it

    import logging

    logging.basicConfig(level=logging.ERROR)
    runs = {f"faults_{round(args.fault_rate * 100)}pct": asyncio.run(
        one_run(args.requests, args.concurrency, args.fault_rate, args.seed))}
    if not args.no_baseline:
        runs["no_faults"] = asyncio.run(one_run(args.requests, args.concurrency, 0.0, args.seed))
    from tests.test_resilience import LOAD_KINDS

    out = {
        "benchmark": "resilience_load",
        "what": "HTTP endpoint on loopback, 2 tiers x 2 providers, every provider a scripted fault server; "
                "latency is client-side, per request, including retries, fallbacks and escalations",
        "fault_kinds": LOAD_KINDS,
        "runs": runs,
        "machine": machine_facts(openai_client=_version("openai"), setup="client, endpoint and the four fault "
                                 "servers share one Python process (one GIL) on this machine"),
    }
    path = write_json(args.out, out)
    for name, r in runs.items():
        print(f"{name}: {r['requests']} requests at concurrency {r['concurrency']}: "
              f"{r['throughput_rps']} req/s, p50 {r['latency_ms_all']['p50']} ms, p99 {r['latency_ms_all']['p99']} ms,"
              f" answered {r['answered']}, classified errors {r['classified_errors']} {r['error_types']}")
    print(f"wrote {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
