"""Overhead of our layer: the routing decision, the accounting, and the HTTP endpoint.

    .venv/bin/python -m benchmarks.overhead [--quick] [--out results/overhead] [--skip-model] [--no-profile]

1. In process (µs per request, p50/p99 over thousands of timed calls):
   ``extract_features`` on an answer's token logprobs (1, 8 and 48 tokens with top-5 alternatives),
   ``cascade.policy.decide`` (the decision itself: calibrator + threshold), the record building of the
   engine (``CascadeRecord`` + attempts + ``Engine._finish``), and a real ledger write (SQLite file, WAL,
   awaited one at a time: the hand-off to the ledger thread and back included).
2. The whole engine around an instant backend (``engine.run`` with a backend that answers at once).
3. HTTP: ``POST /v1/chat/completions`` on a real uvicorn server (a separate process on 127.0.0.1, uvloop and
   httptools when installed, as ``cascade serve`` runs) against the same backend called directly
   in-process, same prompts, at concurrency 1, 8 and 32 (bounded request counts): added ms at p50/p99 and
   requests/s. Twice: with an *instant* backend (isolates the layer: nothing else moves) and with
   SmolLM2-135M (``max_tokens=1``), the real small model. Two clients, interleaved: ``RawHTTP`` (below: a
   minimal keep-alive HTTP/1.1 client on asyncio streams, whose own cost is a few µs; the figures at the
   top level of each level and the target's figure) and ``httpx.AsyncClient`` (~0.35 ms of its own per
   request; under the key ``httpx``). ``GET /health`` by the same client at the same concurrency is the
   transport floor (loopback + uvicorn + that client + FastAPI's cheapest route). The client side runs on
   uvloop when installed. Each response's ``x-bench-server-ms`` header (added by the benchmark's ASGI
   wrapper) is the time inside the app, arrival to response start.
4. The profile (on unless ``--no-profile``): cProfile of the endpoint in process (httpx ASGI transport,
   instant backend), top functions by cumulative and own time, to say where the time goes.

Targets (issue 7): <= 1 ms p50 added by our layer; <= 0.1 ms p99 for the decision itself. The JSON says
whether each was met on this machine, and which client and server stack the figure comes from; tests
never assert times.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import REPO, RESULTS, check_out, int_at_least, machine_facts, rel, stop_processes, write_json
from cascade.backends.base import Backend

INSTANT = "bench-instant"
MODEL = "smollm2-135m"
PROMPTS = [
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "What is 12 times 12?", "Which planet is known as the red planet?", "Who wrote Hamlet?",
    "What gas do plants take in?", "What is the boiling point of water in Celsius?",
]


def stats_us(samples_ns: Sequence[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": int(a.size), "p50_us": round(float(np.percentile(a, 50)), 2),
            "p90_us": round(float(np.percentile(a, 90)), 2), "p99_us": round(float(np.percentile(a, 99)), 2),
            "mean_us": round(float(a.mean()), 2), "max_us": round(float(a.max()), 2)}


def stats_ms(samples_s: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p90_ms": round(float(np.percentile(a, 90)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3)}


# --- an instant backend (registered under INSTANT) --------------------------------------------------


def _fake_tokens(n: int, seed: int = 0) -> tuple:
    from cascade.types import TokenLogprob, TopLogprob

    rng = random.Random(seed)
    toks = []
    for i in range(n):
        lp = -abs(rng.gauss(0.0, 0.6))
        alts = tuple(TopLogprob(token=f"t{j}", logprob=lp - j * abs(rng.gauss(1.0, 0.5)), token_id=j)
                     for j in range(5))
        toks.append(TokenLogprob(token=f" w{i}", logprob=lp, token_id=100 + i, top=alts))
    return tuple(toks)


def _register_instant() -> None:
    from cascade.backends import register_backend

    register_backend(INSTANT, "benchmarks.overhead:InstantBackend")


class InstantBackend(Backend):
    """Answers at once with a fixed 8-token answer (with logprobs): the cost of everything but the model."""

    kind = INSTANT

    def __init__(self, *, model: str, name: str | None = None, tokens: int = 8, **_: Any) -> None:
        super().__init__(model=model, name=name)
        self._tokens = _fake_tokens(int(tokens))

    async def generate(self, request):  # noqa: ANN001, ANN201
        from cascade.types import GenerationResult, Usage

        n = min(len(self._tokens), request.max_tokens or len(self._tokens))
        toks = self._tokens[:n]
        return GenerationResult(text="".join(t.token for t in toks), tokens=toks, finish_reason="length",
                                usage=Usage(prompt_tokens=12, completion_tokens=n), latency_s=0.0, model=self.model)

    def count_prompt_tokens(self, request) -> int:  # noqa: ANN001
        return 12


# --- configs ---------------------------------------------------------------------------------------


def _config_dict(tmp: Path, backend: str, *, threads: int = 1, journal: bool = True) -> dict[str, Any]:
    if backend == INSTANT:
        tiers = [{"name": "small", "backend": INSTANT, "model": "instant-small", "max_tokens": 8,
                  "price": {"input_per_1m": 0.5, "output_per_1m": 5.0}, "threshold": 0.5},
                 {"name": "large", "backend": INSTANT, "model": "instant-large", "max_tokens": 8,
                  "price": {"input_per_1m": 1.5, "output_per_1m": 15.0}, "threshold": 0.0}]
    else:
        tiers = [{"name": "small", "backend": "transformers", "model": MODEL, "max_tokens": 1,
                  "price": {"input_per_1m": 0.15, "output_per_1m": 1.5}, "threshold": 0.0,
                  "options": {"threads": threads, "max_batch_size": 8}}]
    return {"server": {"log_level": "warning", "max_tokens_limit": 64},
            "ledger": {"path": str(tmp / f"ledger-{backend}{'' if journal else '-nojournal'}.sqlite"),
                       "journal": journal},
            "tiers": tiers, "policies": {"cascade": {"chain": [t["name"] for t in tiers]}}}


def _config(tmp: Path, backend: str, **kw: Any):
    from cascade.config import parse_config

    return parse_config(_config_dict(tmp, backend, **kw), source="<overhead>", environ={})


# --- 1. in-process micro-benchmarks ----------------------------------------------------------------


def _time_calls(fn, n: int, warmup: int = 200) -> list[int]:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    out = []
    pc = time.perf_counter_ns
    for _ in range(n):
        t = pc()
        fn()
        out.append(pc() - t)
    return out


async def in_process(n: int, tmp: Path) -> dict[str, Any]:
    import gc

    from calibration.calibrators import calibrator_from_dict
    from calibration.features import extract_features
    from cascade.engine import Engine
    from cascade.ledger import Ledger
    from cascade.policy import decide
    from cascade.types import Attempt, CascadeRecord

    _register_instant()
    res: dict[str, Any] = {"n": n}
    cal = calibrator_from_dict({"method": "temperature", "feature": "mean_logprob", "params": {"temperature": 1.3}})
    iso = calibrator_from_dict({"method": "isotonic", "feature": "mean_logprob",
                                "params": {"knots_x": list(np.linspace(-5, 0, 40)),
                                           "knots_y": list(np.linspace(0.05, 0.97, 40))}})
    gc_was = gc.isenabled()
    feats_by_len = {}
    for k in (1, 8, 48):
        toks = _fake_tokens(k, seed=k)
        feats_by_len[k] = extract_features(toks)
        res[f"extract_features_{k}_tokens"] = stats_us(_time_calls(lambda t=toks: extract_features(t), n))
    f8 = feats_by_len[8]
    res["decide_temperature"] = stats_us(_time_calls(lambda: decide(f8, cal, 0.5, is_last=False), n))
    res["decide_isotonic"] = stats_us(_time_calls(lambda: decide(f8, iso, 0.5, is_last=False), n))
    t8 = _fake_tokens(8, seed=8)
    res["features_plus_decide_8_tokens"] = stats_us(
        _time_calls(lambda: decide(extract_features(t8), cal, 0.5, is_last=False), n))
    gc.disable()
    res["decide_temperature_gc_off"] = stats_us(_time_calls(lambda: decide(f8, cal, 0.5, is_last=False), n))
    if gc_was:
        gc.enable()

    # record building: the engine's own _finish over a two-attempt escalated request
    cfg = _config(tmp, INSTANT)
    engine = await Engine.open(cfg)
    route = engine.resolve("cascade")

    def build() -> CascadeRecord:
        t0 = time.perf_counter()
        rec = CascadeRecord(request_id="casc-x", policy="cascade", created_at=time.time())
        for i, tier in enumerate(route.tiers):
            a = Attempt(index=i, tier=tier.name, model=tier.config.model, backend=tier.config.backend,
                        prompt_tokens=12, completion_tokens=8, latency_ms=1.0,
                        cost_usd=tier.config.price.cost(12, 8), confidence=0.4, features=f8,
                        decision="escalate" if i == 0 else "final", reason="r", kept=i == 1)
            rec.attempts.append(a)
        engine._finish(rec, route=route, t0=t0)
        return rec

    res["record_build_2_attempts"] = stats_us(_time_calls(build, n))

    # a real ledger write (its own file), awaited like the engine does
    ledger = await Ledger(tmp / "ledger-micro.sqlite").open()
    samples = []
    for i in range(min(n, 3000) + 100):
        rec = build()
        rec.request_id = f"casc-{i:08d}"
        t = time.perf_counter_ns()
        await ledger.record(rec)
        if i >= 100:
            samples.append(time.perf_counter_ns() - t)
    await ledger.close()
    res["ledger_write_2_attempts"] = stats_us(samples)

    # 2. the whole engine around an instant backend: everything but the model
    from cascade.types import GenerationRequest, Message

    req = GenerationRequest(messages=(Message("user", "hello"),), max_tokens=8)
    # with the journal of requests in flight (the default) and without it, in alternating rounds
    plain = await Engine.open(_config(tmp, INSTANT, journal=False))
    totals: dict[bool, list[int]] = {True: [], False: []}
    for i in range(min(n, 3000) + 100):
        for journal, eng in ((True, engine), (False, plain)):
            t = time.perf_counter_ns()
            await eng.run(req, model="cascade")
            dt = time.perf_counter_ns() - t
            if i >= 100:
                totals[journal].append(dt)
    await engine.close()
    await plain.close()
    res["engine_run_2_tiers_instant_backend"] = stats_us(totals[True])
    res["engine_run_2_tiers_instant_backend_no_journal"] = stats_us(totals[False])
    res["engine_run_note"] = ("engine.run on a two-tier chain whose backends answer at once (8 tokens, escalated "
                              "by the first tier's confidence or not): resolve, budget, features, decide, record, "
                              "ledger write, and the journal of requests in flight (one background write per tier "
                              "call; _no_journal: ledger.journal off), alternating request by request")
    return res


# --- 3. HTTP ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerTiming:
    """ASGI wrapper of the benchmark server: adds ``x-bench-server-ms``, the time from the request's arrival
    in the app to its response start (routing, validation, auth, engine, ledger, response rendering)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1e3
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-bench-server-ms", f"{ms:.4f}".encode())]}
            await send(msg)

        await self.app(scope, receive, timed_send)


def serve_main(config_path: str, port: int) -> None:
    """Entry of the server subprocess: register the instant backend, serve the config on 127.0.0.1."""
    import uvicorn

    _register_instant()
    from cascade.config import load_config
    from serving import create_app

    cfg = load_config(config_path, environ={})
    uvicorn.run(ServerTiming(create_app(cfg)), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, lifespan="on", loop="auto", http="auto")  # uvloop + httptools when installed


class ServerProcess:
    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        import yaml

        self.port = _free_port()
        self.path = tmp / f"server-{self.port}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.overhead", "--serve", str(self.path),
                                      "--port", str(self.port)], cwd=REPO, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"benchmark server exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("benchmark server did not become ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_processes([self.proc], signal.SIGINT)


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client on raw asyncio streams: the leanest client we can write, so that
    what the endpoint adds is not hidden under the client's own cost (httpx's AsyncClient spends ~0.35 ms per
    request of its own). Content-Length bodies only, which is all our non-streaming endpoints send; one
    connection per concurrent caller, reused (a pool of idle connections)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    def post_bytes(self, path: str, body: bytes) -> bytes:
        """The whole request, built once (what a client would send for a JSON body)."""
        return (f"POST {path} HTTP/1.1\r\n".encode() + self._host_header +
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def get_bytes(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\n".encode() + self._host_header + b"\r\n"

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one prepared request; (status, headers with lower-case names, body).

        A pooled connection the server has closed meanwhile (uvicorn closes idle keep-alive connections
        after 5 s) is dropped for a new one, as httpx does: before anything of a response came back, the
        server never read the request."""
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            try:
                return await self._exchange(reader, writer, raw)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                if getattr(exc, "partial", b""):
                    raise
        return await self._exchange(*await self._connect(), raw)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        raw: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = (reader, writer)
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" not in headers:
            writer.close()
            raise RuntimeError(f"RawHTTP reads Content-Length bodies only, got headers {sorted(headers)}")
        body = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(conn)
        return status, headers, body

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._all.append(writer)
        return reader, writer

    async def close(self) -> None:
        for w in self._all:
            w.close()
        for w in self._all:
            try:
                await w.wait_closed()
            except OSError:
                pass
        self._all.clear()
        self._idle.clear()


async def _load(fn, concurrency: int, total: int) -> tuple[list[float], float]:  # noqa: ANN001
    """``total`` calls of ``fn(i)`` by ``concurrency`` workers; (latencies in s, wall s)."""
    lat: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t = time.perf_counter()
            await fn(i)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return lat, time.perf_counter() - t0


def _summ(lat: list[float], wall: float) -> dict[str, Any]:
    return {**stats_ms(lat), "requests_per_s": round(len(lat) / wall, 2), "wall_s": round(wall, 3)}


def _p(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 3)


#: the clients the endpoint is driven with: the raw one (the target's figure) and httpx (for reference)
CLIENTS = ("raw", "httpx")


async def http_compare(backend: str, levels: Sequence[int], totals: dict[int, int], tmp: Path,
                       max_tokens: int, threads: int = 1, rounds: int = 4) -> dict[str, Any]:
    """Direct backend calls vs the HTTP endpoint (and /health) at each concurrency level, with both clients.

    Interleaved in ``rounds`` alternating chunks (direct, endpoint and health by the raw client, endpoint and
    health by httpx, direct, ...), so that the load other processes put on a shared machine drifts over all
    alike. The raw client's responses are parsed after each chunk, outside the timed calls (httpx's are
    parsed inside them, as before).
    """
    import httpx

    from cascade.backends import backend_class
    from cascade.types import GenerationRequest, Message

    _register_instant()
    cfg = _config(tmp, backend, threads=threads)
    tier = cfg.tiers[0]
    out: dict[str, Any] = {"backend": backend, "model": tier.model, "max_tokens": max_tokens, "rounds": rounds,
                           "client": "raw: keep-alive HTTP/1.1 on asyncio streams (RawHTTP in this file); "
                                     "httpx: httpx.AsyncClient, under the key 'httpx'",
                           "client_event_loop": type(asyncio.get_running_loop()).__module__,
                           "levels": {}}

    def req(i: int) -> GenerationRequest:
        return GenerationRequest(messages=(Message("user", PROMPTS[i % len(PROMPTS)]),), max_tokens=max_tokens)

    def payload(i: int) -> dict[str, Any]:
        return {"model": tier.name, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}

    # direct: the tier's own backend class, built the way the engine builds it, in this process
    direct = backend_class(tier.backend).from_tier(tier, cfg)
    await direct.start()
    # per client: server-side ms of each response, and its engine/backend ms from the `cascade` block
    seen: dict[str, dict[str, list[float]]] = {}
    raw_bodies: list[bytes] = []

    def reset() -> None:
        seen.clear()
        for c in CLIENTS:
            seen[c] = {"server_endpoint": [], "server_health": [], "engine": [], "backend": []}
        raw_bodies.clear()

    def note_body(client_name: str, body: dict[str, Any]) -> None:
        seen[client_name]["engine"].append(body["cascade"]["latency_ms"])
        seen[client_name]["backend"].append(sum(a["latency_ms"] for a in body["cascade"]["attempts"]))

    reset()
    try:
        with ServerProcess(_config_dict(tmp, backend, threads=threads), tmp) as srv:
            raw = RawHTTP("127.0.0.1", srv.port)
            chat_raw_reqs = [raw.post_bytes("/v1/chat/completions", json.dumps(payload(i)).encode())
                             for i in range(len(PROMPTS))]
            health_raw_req = raw.get_bytes("/health")
            limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
            async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=300) as client:
                async def call_direct(i: int) -> None:
                    await direct.generate(req(i))

                async def chat_raw(i: int) -> None:
                    status, headers, body = await raw.request(chat_raw_reqs[i % len(PROMPTS)])
                    if status != 200:
                        raise RuntimeError(f"chat: HTTP {status}: {body[:300]!r}")
                    seen["raw"]["server_endpoint"].append(float(headers["x-bench-server-ms"]))
                    raw_bodies.append(body)  # parsed after the chunk, outside the timed call

                async def health_raw(i: int) -> None:
                    status, headers, body = await raw.request(health_raw_req)
                    if status != 200:
                        raise RuntimeError(f"health: HTTP {status}")
                    seen["raw"]["server_health"].append(float(headers["x-bench-server-ms"]))

                async def chat_httpx(i: int) -> None:
                    r = await client.post("/v1/chat/completions", json=payload(i))
                    r.raise_for_status()
                    seen["httpx"]["server_endpoint"].append(float(r.headers["x-bench-server-ms"]))
                    note_body("httpx", r.json())

                async def health_httpx(i: int) -> None:
                    r = await client.get("/health")
                    r.raise_for_status()
                    seen["httpx"]["server_health"].append(float(r.headers["x-bench-server-ms"]))

                async def warm(name: str, c: int) -> None:
                    """Untimed: ``c`` live keep-alive connections in the client's pool before a timed chunk
                    (uvicorn closes a connection idle for 5 s, e.g. while the other client's chunks ran)."""
                    if name in ("endpoint", "health"):
                        await asyncio.gather(*[raw.request(health_raw_req) for _ in range(c)])
                    elif name.startswith("httpx"):
                        await asyncio.gather(*[client.get("/health") for _ in range(c)])

                calls = (("direct", call_direct), ("endpoint", chat_raw), ("health", health_raw),
                         ("httpx_endpoint", chat_httpx), ("httpx_health", health_httpx))
                for i in range(20):  # warm every path
                    for _, fn in calls:
                        await fn(i)
                for c in levels:
                    reset()
                    per = max(c, totals[c] // rounds)
                    lat: dict[str, list[float]] = {k: [] for k, _ in calls}
                    wall = dict.fromkeys(lat, 0.0)
                    round_added: dict[str, list[float]] = {c_: [] for c_ in CLIENTS}
                    for _ in range(rounds):
                        p50 = {}
                        for name, fn in calls:
                            await warm(name, c)
                            ls, w = await _load(fn, c, per)
                            lat[name] += ls
                            wall[name] += w
                            p50[name] = float(np.percentile(ls, 50)) * 1e3
                        for b in raw_bodies:
                            note_body("raw", json.loads(b))
                        raw_bodies.clear()
                        round_added["raw"].append(round(p50["endpoint"] - p50["direct"], 3))
                        round_added["httpx"].append(round(p50["httpx_endpoint"] - p50["direct"], 3))
                    summ = {k: _summ(lat[k], wall[k]) for k in lat}
                    d = summ["direct"]

                    def block(client_name: str, e: dict[str, Any], h: dict[str, Any]) -> dict[str, Any]:
                        s = seen[client_name]
                        inner = np.asarray(s["engine"]) - np.asarray(s["backend"])
                        app_minus = np.asarray(s["server_endpoint"]) - np.asarray(s["backend"])
                        return {
                            "endpoint": e, "health": h,
                            "added_ms_p50": round(e["p50_ms"] - d["p50_ms"], 3),
                            "added_ms_p99": round(e["p99_ms"] - d["p99_ms"], 3),
                            "added_ms_p50_by_round": round_added[client_name],
                            "engine_minus_backend_ms": {"p50": _p(inner, 50), "p99": _p(inner, 99)},
                            # time inside the server app, arrival to response start (the backend call included)
                            "server_app_ms": {"endpoint": {"p50": _p(s["server_endpoint"], 50),
                                                           "p99": _p(s["server_endpoint"], 99)},
                                              "health": {"p50": _p(s["server_health"], 50),
                                                         "p99": _p(s["server_health"], 99)}},
                            "server_app_minus_backend_ms": {"p50": _p(app_minus, 50), "p99": _p(app_minus, 99)},
                            "throughput_ratio": round(e["requests_per_s"] / d["requests_per_s"], 3),
                        }

                    out["levels"][str(c)] = {"requests": per * rounds, "client": "raw", "direct": d,
                                             **block("raw", summ["endpoint"], summ["health"]),
                                             "httpx": block("httpx", summ["httpx_endpoint"], summ["httpx_health"])}
            await raw.close()
    finally:
        await direct.close()
    return out


# --- 4. profile ------------------------------------------------------------------------------------


async def profile_endpoint(tmp: Path, n: int = 600, top: int = 25) -> dict[str, Any]:
    """cProfile of ``n`` chat requests through the app in process (ASGI transport, instant backend)."""
    import httpx

    from serving import create_app

    _register_instant()
    cfg = _config(tmp, INSTANT)
    app = create_app(cfg)
    body = {"model": "small", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for _ in range(50):
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
            lat = []
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                t = time.perf_counter()
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                lat.append(time.perf_counter() - t)
            prof.disable()
            # without the profiler, for the in-process (no socket) latency; /health as the stack's floor
            clean, floor = [], []
            for _ in range(n):
                t = time.perf_counter()
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                clean.append(time.perf_counter() - t)
                t = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                floor.append(time.perf_counter() - t)
    st = pstats.Stats(prof)

    def rows(key: int) -> list[dict[str, Any]]:
        items = sorted(st.stats.items(), key=lambda kv: kv[1][key], reverse=True)[:top]  # type: ignore[attr-defined]
        return [{"function": f"{Path(f).name}:{line}:{fn}", "where": _where(f), "calls": v[1],
                 "own_ms_per_request": round(v[2] / n * 1e3, 4), "cum_ms_per_request": round(v[3] / n * 1e3, 4)}
                for (f, line, fn), v in items]

    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    by_area: dict[str, float] = {}
    for (f, _line, _fn), v in st.stats.items():  # type: ignore[attr-defined]
        by_area[_where(f)] = by_area.get(_where(f), 0.0) + v[2]
    return {"requests": n, "asgi_in_process_ms": stats_ms(clean), "asgi_health_in_process_ms": stats_ms(floor),
            "profiled_ms": stats_ms(lat),
            "own_time_by_package_ms_per_request": {k: round(v / n * 1e3, 4) for k, v in
                                                   sorted(by_area.items(), key=lambda kv: -kv[1])},
            "top_cumulative": rows(3), "top_own": rows(2), "pstats_text": buf.getvalue()[-12000:],
            "note": "profiled times are inflated by the profiler; use them for shares, not absolutes"}


def _where(filename: str) -> str:
    f = filename.replace("\\", "/")
    for key in ("cascade/", "serving/", "calibration/", "benchmarks/"):
        if f"/{key}" in f and "site-packages" not in f:
            return "ours:" + key.rstrip("/")
    if "site-packages/" in f:
        return f.split("site-packages/", 1)[1].split("/", 1)[0]
    if f.startswith("<") or f == "~":
        return "builtins"
    return "stdlib"


# --- main ------------------------------------------------------------------------------------------


def server_stack() -> dict[str, Any]:
    """What serves and what measures: uvicorn's event loop and HTTP parser as ``loop="auto", http="auto"``
    pick them (uvloop and httptools when installed), and the versions of the layers in between."""
    from benchmarks._common import _version

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    return {"uvicorn": f"loop={loop}, http={http}",
            "versions": {m: _version(m) for m in ("uvloop", "httptools", "starlette", "pydantic", "prometheus-client")}}


def _run_async(coro):  # noqa: ANN001, ANN202
    """Run on uvloop when installed (as the server does), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def run(*, quick: bool = False, out: Path = RESULTS / "overhead", skip_model: bool = False,
        profile: bool = True, threads: int = 1) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    levels = (1, 8, 32)
    n_micro = 2000 if quick else 10000
    instant_totals = {1: 300, 8: 800, 32: 1600} if quick else {1: 1000, 8: 2000, 32: 4000}
    model_totals = {1: 16, 8: 32, 32: 64} if quick else {1: 40, 8: 96, 32: 128}
    doc: dict[str, Any] = {"benchmark": "overhead", "quick": quick,
                           "machine": machine_facts(models=[] if skip_model else [MODEL], stack=server_stack())}
    with tempfile.TemporaryDirectory(prefix="cascade-overhead-") as td:
        tmp = Path(td)
        doc["in_process"] = _run_async(in_process(n_micro, tmp))
        doc["http_instant"] = _run_async(http_compare(INSTANT, levels, instant_totals, tmp, max_tokens=8))
        if not skip_model:
            doc["http_model"] = _run_async(http_compare("transformers", levels, model_totals, tmp, max_tokens=1,
                                                        threads=threads))
        if profile:
            doc["profile"] = _run_async(profile_endpoint(tmp, n=300 if quick else 1000))
    ip = doc["in_process"]
    h1 = doc["http_instant"]["levels"]["1"]
    server_side = h1["server_app_minus_backend_ms"]["p50"]
    doc["targets"] = {
        "layer_added_client": (
            "layer_added_p50_ms_concurrency_1 is the p50 latency of POST /v1/chat/completions minus the p50 of the "
            "same backend called directly in process, concurrency 1, instant backend, driven by the raw client "
            "(RawHTTP: keep-alive HTTP/1.1 on asyncio streams, " + doc["http_instant"]["client_event_loop"] +
            " event loop). It includes the loopback TCP round trip, uvicorn (" + doc["machine"]["stack"]["uvicorn"] +
            ") and the client's own send/receive: transport_floor_p50_ms_concurrency_1 (GET /health, same client) "
            "is that part alone. The httpx.AsyncClient figure is beside it (*_httpx)."),
        "layer_server_side_p50_ms_concurrency_1": server_side,
        "layer_server_side_p50_le_1ms": server_side <= 1.0,
        "decision_p99_us": ip["decide_temperature"]["p99_us"],
        "decision_p99_le_100us": ip["decide_temperature"]["p99_us"] <= 100.0,
        "features_plus_decision_p99_us": ip["features_plus_decide_8_tokens"]["p99_us"],
        "features_plus_decision_p99_le_100us": ip["features_plus_decide_8_tokens"]["p99_us"] <= 100.0,
        "layer_added_p50_ms_concurrency_1": h1["added_ms_p50"],
        "layer_added_p50_le_1ms": h1["added_ms_p50"] <= 1.0,
        "transport_floor_p50_ms_concurrency_1": h1["health"]["p50_ms"],
        "layer_added_minus_transport_floor_p50_ms": round(h1["added_ms_p50"] - h1["health"]["p50_ms"], 3),
        "layer_added_p50_ms_concurrency_1_httpx": h1["httpx"]["added_ms_p50"],
        "transport_floor_p50_ms_concurrency_1_httpx": h1["httpx"]["health"]["p50_ms"],
        "engine_run_p50_us": ip["engine_run_2_tiers_instant_backend"]["p50_us"],
    }
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "overhead.json", doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (make bench)")
    ap.add_argument("--out", default=str(RESULTS / "overhead"))
    ap.add_argument("--skip-model", action="store_true", help="instant backend only (no SmolLM2)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads of the SmolLM2 tier")
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_main(args.serve, args.port)
        return 0
    check_out(ap, args.out, directory=True)
    doc = run(quick=args.quick, out=Path(args.out), skip_model=args.skip_model, profile=not args.no_profile,
              threads=args.threads)
    ip, t = doc["in_process"], doc["targets"]
    dt = ip["decide_temperature"]
    print(f"decide (temperature) p50 {dt['p50_us']} µs, p99 {dt['p99_us']} µs"
          f" -> target p99 <= 100 µs {'met' if t['decision_p99_le_100us'] else 'NOT met'}")
    print(f"features(8 tok)+decide p50 {ip['features_plus_decide_8_tokens']['p50_us']} µs, "
          f"p99 {ip['features_plus_decide_8_tokens']['p99_us']} µs")
    print(f"record build p50 {ip['record_build_2_attempts']['p50_us']} µs; ledger write p50 "
          f"{ip['ledger_write_2_attempts']['p50_us']} µs p99 {ip['ledger_write_2_attempts']['p99_us']} µs; "
          f"engine.run (instant) p50 {ip['engine_run_2_tiers_instant_backend']['p50_us']} µs")
    for key in ("http_instant", "http_model"):
        if key not in doc:
            continue
        for c, v in doc[key]["levels"].items():
            print(f"{key} c={c:>2}: direct p50 {v['direct']['p50_ms']} ms, endpoint p50 {v['endpoint']['p50_ms']} ms "
                  f"p99 {v['endpoint']['p99_ms']} ms, added p50 {v['added_ms_p50']} ms p99 {v['added_ms_p99']} ms, "
                  f"health p50 {v['health']['p50_ms']} ms, {v['endpoint']['requests_per_s']} req/s "
                  f"(direct {v['direct']['requests_per_s']}); server app-backend p50 "
                  f"{v['server_app_minus_backend_ms']['p50']} ms; httpx: added p50 {v['httpx']['added_ms_p50']} ms "
                  f"p99 {v['httpx']['added_ms_p99']} ms, health p50 {v['httpx']['health']['p50_ms']} ms")
    print(f"layer added p50 at c=1 (raw client): {t['layer_added_p50_ms_concurrency_1']} ms -> target <= 1 ms "
          f"{'met' if t['layer_added_p50_le_1ms'] else 'NOT met'}")
    print(f"wrote {rel(Path(args.out) / 'overhead.json')} ({doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
