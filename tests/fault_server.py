"""A fault-injecting OpenAI-compatible server, for tests and by hand.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not, with token
logprobs and top-k alternatives) from a fixed script: the answer text split into word tokens, each with
the configured logprob. Per request it can instead be told to fail, from a queue of faults (first in,
first out) or at a rate with a seeded RNG. Fault specs (a string, or the equivalent dict):

===================  ==============================================================================
``ok``               answer normally
``400`` ``404``      that HTTP status with an OpenAI-style error body (also 401, 403, 422, 500, 502,
``500`` ...          503, 504; ``401`` echoes a fake key in its body, as real providers do)
``429``              rate limited, no hint; ``429:ra=2`` adds ``Retry-After: 2``; ``429:ms=250`` adds
                     ``retry-after-ms: 250`` (both may be given: ``429:ra=1:ms=250``); ``500:echo`` (any
                     status) quotes the request's ``Authorization`` header in the error's message;
                     ``400:quote`` (any status) quotes the request's prompt (its last message's first 60
                     characters), as a hosted API's refusal may ("your prompt '...' was flagged");
                     ``429:after=0.5`` (any status) sends the error only 0.5 s after the request arrived
                     (ends early when the client goes away), so a later request's answer can come first
``context``          400 with code ``context_length_exceeded``
``stall:S``          send nothing for S seconds (default 60; ends early when the client goes away),
                     then answer
``reset``            close the socket with a TCP RST before any response byte
``close``            close the socket (FIN) before any response byte
``drop:K``           streams: send K token chunks then close the connection mid-stream; non-streams:
                     send part of the body, then close
``slow:S`` ``slow:S:C``  wait S seconds before answering (and C seconds between stream chunks)
``garbled:K``        a 200 that cannot be read: non-streams, a body cut to half its JSON (sent whole, the
                     connection kept); streams, K token chunks (default 1), then ``data: {not json``
``deep:K``           a 200 of JSON nested deeper than a JSON decoder recurses (100,000 arrays): non-streams,
                     its body; streams, K token chunks (default 1), then it as an event
``bare``             answer with neither ``usage`` nor logprobs (a server that reports no tokens)
``gzip``             a 200 whose headers say its body is gzip (``content-encoding``), which it is not
``gateway``          streams: each event numbered (``id:``), after a ``retry:`` and each followed by events
                     without data (a keep-alive comment, ``event: ping``, a bare ``data:``), as gateways write
``{"kind": "odd"}``  (a dict spec) answer with odd values, sent as Python's json writes them (NaN and
                     Infinity as such): ``logprob`` every token's, ``top_logprob`` every alternative's,
                     ``token`` every token's text, ``bytes`` every token's bytes (chat), ``usage`` the usage
                     object, ``finish_reason`` the final one, ``content_null`` a null text with the tokens'
                     logprobs kept; ``{"kind": "slow", "seconds": S, "per_chunk": C, "bare": true}`` a slow
                     stream without logprobs (``bare`` goes with any kind); ``"json": true`` (with any kind)
                     answers a stream request with the whole answer's JSON, as a server that ignores
                     ``stream`` (``{"kind": "drop", "json": true}``: its body cut off)
===================  ==============================================================================

Control (JSON): ``POST /_faults`` ``{"queue": [spec, ...], "rate": 0.2, "kinds": [spec, ...],
"seed": 1, "delay_s": 0.0, "clear": false}``; ``GET /_stats`` (requests received, by path and fault,
and a log of the latest 10,000 with arrival times); ``POST /_reset``.

By hand::

    python -m tests.fault_server --port 8100 --rate 0.2 --kinds 500,429:ms=100,reset --seed 1
    curl -s localhost:8100/_faults -d '{"queue": ["429:ra=1", "500"]}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_ANSWER = "Paris is the capital of France."
FAKE_KEY = "sk-live-THISISAFAKEKEY0123456789"

# --- raw connection control: uvicorn's h11 protocol, remembering each connection's transport --------

_TRANSPORTS: dict[tuple[int, str, int], asyncio.Transport] = {}


def _conn_key(server: Any, client: Any) -> tuple[int, str, int] | None:
    if not server or not client:
        return None
    return (int(server[1]), str(client[0]), int(client[1]))


class TrackingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, remembering each connection's transport so a handler can kill it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._fault_key = _conn_key(transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
        if self._fault_key:
            _TRANSPORTS[self._fault_key] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_fault_key", None):
            _TRANSPORTS.pop(self._fault_key, None)
        super().connection_lost(exc)


def _transport(request: Request) -> asyncio.Transport | None:
    key = _conn_key(request.scope.get("server"), request.scope.get("client"))
    return _TRANSPORTS.get(key) if key else None


def _kill(request: Request, *, rst: bool) -> None:
    t = _transport(request)
    if t is None:
        raise RuntimeError("fault server: run it with TrackingH11Protocol to reset connections")
    if rst:
        sock = t.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()
    else:
        t.close()


# --- fault specs -------------------------------------------------------------------------------------

_STATUS_TEXT = {400: ("invalid_request_error", "invalid_value", "Invalid value for 'temperature'."),
                401: ("invalid_request_error", "invalid_api_key",
                      f"Incorrect API key provided: {FAKE_KEY}. You can find your API key in your account."),
                403: ("permission_error", "forbidden", "You are not allowed to use this model."),
                404: ("invalid_request_error", "model_not_found", "The model does not exist."),
                422: ("invalid_request_error", "unprocessable", "Unprocessable entity."),
                429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
                500: ("server_error", "internal_error", "The server had an error processing your request."),
                502: ("server_error", "bad_gateway", "Bad gateway."),
                503: ("server_error", "overloaded", "The server is overloaded."),
                504: ("server_error", "gateway_timeout", "Gateway timeout.")}


#: JSON nested deeper than a JSON decoder recurses (a ``deep`` fault's body or event)
_DEEP = b"[" * 100_000 + b"]" * 100_000


def _gzip_claimed(kind: str) -> dict[str, str]:
    """The headers of a ``gzip`` fault's answer: a body said to be gzip, which is not."""
    return {"content-encoding": "gzip"} if kind == "gzip" else {}


def _bare(payload: dict[str, Any]) -> dict[str, Any]:
    """An answer (or stream chunk) without usage and logprobs."""
    out = {k: v for k, v in payload.items() if k != "usage"}
    out["choices"] = [{**c, "logprobs": None} for c in payload.get("choices", [])]
    return out


def _odd(payload: dict[str, Any], fault: dict[str, Any]) -> dict[str, Any]:
    """An answer (or stream chunk) with the odd values of an ``odd`` fault (see the module's doc)."""
    out = json.loads(json.dumps(payload))
    if "usage" in fault and out.get("usage") is not None:
        out["usage"] = fault["usage"]
    for c in out.get("choices", []):
        lp = c.get("logprobs") or {}
        entries = lp.get("content") or []  # chat
        for e in entries:
            if "logprob" in fault:
                e["logprob"] = fault["logprob"]
            if "token" in fault:
                e["token"] = fault["token"]
            if "bytes" in fault:
                e["bytes"] = fault["bytes"]
            for alt in e.get("top_logprobs") or []:
                if "top_logprob" in fault:
                    alt["logprob"] = fault["top_logprob"]
        if lp.get("token_logprobs") is not None:  # completions
            if "logprob" in fault:
                lp["token_logprobs"] = [fault["logprob"]] * len(lp["token_logprobs"])
            if "top_logprob" in fault:
                lp["top_logprobs"] = [{k: fault["top_logprob"] for k in d} for d in lp.get("top_logprobs") or []]
            if "token" in fault:
                lp["tokens"] = [fault["token"]] * len(lp["tokens"])
        if "finish_reason" in fault and c.get("finish_reason") is not None:
            c["finish_reason"] = fault["finish_reason"]
        if fault.get("content_null"):
            for holder in (c.get("message"), c.get("delta")):
                if isinstance(holder, dict) and "content" in holder:
                    holder["content"] = None
            if "text" in c:
                c["text"] = None
    return out


def parse_fault(spec: str | dict[str, Any]) -> dict[str, Any]:
    """``"429:ra=2"`` -> ``{"kind": "status", "status": 429, "retry_after": 2.0, "spec": "429:ra=2"}``."""
    if isinstance(spec, dict):
        d = dict(spec)
        d.setdefault("spec", json.dumps(spec, sort_keys=True))
        return d
    head, *rest = str(spec).strip().split(":")
    d: dict[str, Any] = {"spec": str(spec)}
    if head.isdigit():
        d.update(kind="status", status=int(head))
        for part in rest:
            k, _, v = part.partition("=")
            if k == "ra":
                d["retry_after"] = v
            elif k == "ms":
                d["retry_after_ms"] = v
            elif k == "echo":
                d["echo_auth"] = True
            elif k == "quote":
                d["quote_prompt"] = True
            elif k == "after":
                d["after_s"] = float(v)
            else:
                raise ValueError(f"unknown status option {part!r} in {spec!r}")
    elif head == "context":
        d.update(kind="status", status=400, code="context_length_exceeded",
                 message="This model's maximum context length is 2048 tokens. However, your messages "
                         "resulted in 9000 tokens.")
    elif head == "stall":
        d.update(kind="stall", seconds=float(rest[0]) if rest else 60.0)
    elif head in ("reset", "close", "ok", "gzip", "gateway"):
        d.update(kind=head)
    elif head in ("drop", "garbled", "deep"):
        d.update(kind=head, after=int(rest[0]) if rest else 1)
    elif head == "bare":
        d.update(kind="bare")
    elif head == "slow":
        d.update(kind="slow", seconds=float(rest[0]) if rest else 1.0,
                 per_chunk=float(rest[1]) if len(rest) > 1 else 0.0)
    else:
        raise ValueError(f"unknown fault {spec!r}")
    return d


# --- the server --------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


class FaultServer:
    """The app and its state (fault queue, rate, stats). Thread-safe: tests may poke it directly too."""

    def __init__(self, *, answer: str = DEFAULT_ANSWER, logprob: float = -0.05, seed: int = 0,
                 delay_s: float = 0.0, top_k: int = 5) -> None:
        self.answer, self.logprob, self.top_k = answer, logprob, top_k
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._queue: deque[dict[str, Any]] = deque()
        self._rate, self._kinds = 0.0, [parse_fault("500")]
        self._rng = random.Random(seed)
        self._log: deque[dict[str, Any]] = deque(maxlen=10_000)   # the latest requests, for /_stats
        self._count = 0
        self._by_path: Counter[str] = Counter()
        self._by_fault: Counter[str] = Counter()
        self.app = self._build()

    # --- state ------------------------------------------------------------------------------------
    def configure(self, *, queue: list | None = None, rate: float | None = None, kinds: list | None = None,
                  seed: int | None = None, delay_s: float | None = None, clear: bool = False) -> None:
        # every spec is read before any is applied: a bad one (ValueError) changes nothing
        queued = [parse_fault(q) for q in queue or ()]
        chosen = [parse_fault(k) for k in kinds or ()]
        with self._lock:
            if clear:
                self._queue.clear()
                self._rate = 0.0
            self._queue.extend(queued)
            if rate is not None:
                self._rate = float(rate)
            if chosen:
                self._kinds = chosen
            if seed is not None:
                self._rng = random.Random(seed)
            if delay_s is not None:
                self.delay_s = float(delay_s)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._rate = 0.0
            self._log.clear()
            self._count = 0
            self._by_path.clear()
            self._by_fault.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._count, "by_path": dict(self._by_path), "by_fault": dict(self._by_fault),
                    "pending_faults": len(self._queue), "log": list(self._log)}

    def _next_fault(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._queue:
                fault = self._queue.popleft()
            elif self._rate > 0 and self._rng.random() < self._rate:
                fault = self._rng.choice(self._kinds)
            else:
                fault = {"kind": "ok", "spec": "ok"}
            self._log.append({"n": self._count, "t": time.time(), "mono": time.monotonic(), "path": path,
                              "model": body.get("model"), "stream": bool(body.get("stream")),
                              "messages": body.get("messages"), "params": sorted(body),
                              "fault": fault["spec"]})
            self._count += 1
            self._by_path[path] += 1
            self._by_fault[fault["spec"]] += 1
            return fault

    # --- responses --------------------------------------------------------------------------------
    def _token_entries(self, max_tokens: int | None) -> tuple[list[str], list[float], str]:
        toks = _tokens(self.answer)
        finish = "stop"
        if max_tokens is not None and len(toks) > max_tokens:
            toks, finish = toks[:max_tokens], "length"
        lps = [self.logprob - 0.01 * (i % 3) for i in range(len(toks))]
        return toks, lps, finish

    def _alts(self, tok: str, lp: float, k: int) -> list[tuple[str, float]]:
        return [(tok, lp)] + [(f"{tok.strip()}~{j}", lp - 2.0 - j) for j in range(1, max(k, 1))]

    @staticmethod
    def _usage(body: dict[str, Any], n: int) -> dict[str, int]:
        if body.get("messages") is not None:
            words = sum(len(str(m.get("content", "")).split()) + 3 for m in body["messages"])
        else:
            words = len(str(body.get("prompt", "")).split())
        return {"prompt_tokens": words, "completion_tokens": n, "total_tokens": words + n}

    def _chat_lp(self, tok: str, lp: float, k: int) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in self._alts(tok, lp, k)]}

    def _full(self, chat: bool, body: dict[str, Any]) -> dict[str, Any]:
        toks, lps, finish = self._token_entries(body.get("max_tokens"))
        text = "".join(toks)
        base = {"id": f"fault-{int(time.time() * 1e6)}", "created": int(time.time()), "model": body.get("model"),
                "usage": self._usage(body, len(toks))}
        if chat:
            k = int(body.get("top_logprobs") or 0)
            lp = {"content": [self._chat_lp(t, v, k) for t, v in zip(toks, lps, strict=True)]} if body.get("logprobs") else None
            return {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                 "finish_reason": finish}]}
        k = int(body.get("logprobs") or 0)
        offs = [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
        lp = {"tokens": toks, "token_logprobs": lps, "text_offset": offs,
              "top_logprobs": [dict(self._alts(t, v, k)) for t, v in zip(toks, lps, strict=True)]} if k else None
        return {**base, "object": "text_completion", "choices": [
            {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}

    def _chunks(self, chat: bool, body: dict[str, Any]) -> list[dict[str, Any]]:
        toks, lps, finish = self._token_entries(body.get("max_tokens"))
        base = {"id": f"fault-{int(time.time() * 1e6)}", "created": int(time.time()), "model": body.get("model")}
        out = []
        for i, (t, v) in enumerate(zip(toks, lps, strict=True)):
            if chat:
                k = int(body.get("top_logprobs") or 0)
                delta = {"role": "assistant", "content": t} if i == 0 else {"content": t}
                lp = {"content": [self._chat_lp(t, v, k)]} if body.get("logprobs") else None
                out.append({**base, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]})
            else:
                k = int(body.get("logprobs") or 0)
                lp = {"tokens": [t], "token_logprobs": [v], "text_offset": [0],
                      "top_logprobs": [dict(self._alts(t, v, k))]} if k else None
                out.append({**base, "object": "text_completion",
                            "choices": [{"index": 0, "text": t, "logprobs": lp, "finish_reason": None}]})
        last = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish} if chat
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
        out.append({**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [last]})
        if (body.get("stream_options") or {}).get("include_usage"):
            out.append({**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                        "usage": self._usage(body, len(toks))})
        return out

    @staticmethod
    def _error(fault: dict[str, Any], authorization: str = "", body: dict[str, Any] | None = None) -> JSONResponse:
        status = int(fault["status"])
        type_, code, message = _STATUS_TEXT.get(status, ("server_error", None, f"HTTP {status}"))
        code = fault.get("code", code)
        message = fault.get("message", message)
        if fault.get("echo_auth"):  # as some providers do: the key, and the header it came in
            key = authorization.removeprefix("Bearer ")
            message += f" (key provided: {key}; request headers: authorization={authorization})"
        if fault.get("quote_prompt") and body:
            prompt = body["messages"][-1]["content"] if body.get("messages") else body.get("prompt")
            message += f": your prompt {str(prompt)[:60]!r} was flagged by the safety system"
        headers = {}
        if fault.get("retry_after") is not None:
            headers["retry-after"] = str(fault["retry_after"])
        if fault.get("retry_after_ms") is not None:
            headers["retry-after-ms"] = str(fault["retry_after_ms"])
        return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                            status_code=status, headers=headers)

    async def _answer(self, request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        fault = self._next_fault(request.url.path, body)
        kind = fault["kind"]
        if kind == "status":
            if fault.get("after_s"):  # the error is sent late (a later request's answer may come first)
                end = time.monotonic() + fault["after_s"]
                while time.monotonic() < end:
                    if await request.is_disconnected():
                        return Response(status_code=204)
                    await asyncio.sleep(0.02)
            return self._error(fault, request.headers.get("authorization", ""), body)
        if kind in ("reset", "close"):
            _kill(request, rst=kind == "reset")
            return Response(status_code=204)   # never sent: the connection is gone
        if kind == "stall":
            end = time.monotonic() + fault["seconds"]
            while time.monotonic() < end:
                if await request.is_disconnected():
                    return Response(status_code=204)
                await asyncio.sleep(0.02)
        delay = self.delay_s + (fault["seconds"] if kind == "slow" else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        per_chunk = fault.get("per_chunk", 0.0) if kind == "slow" else 0.0
        if body.get("stream") and not fault.get("json"):
            chunks = self._chunks(chat, body)
            if kind == "bare" or fault.get("bare"):
                chunks = [_bare(c) for c in chunks if c.get("choices")]
            elif kind == "odd":
                chunks = [_odd(c, fault) for c in chunks]
            drop_after = fault["after"] if kind in ("drop", "garbled", "deep") else None

            async def sse():  # noqa: ANN202
                if kind == "gateway":
                    yield b"retry: 3000\n\n"
                for i, c in enumerate(chunks):
                    if drop_after is not None and i >= drop_after:
                        if kind == "garbled":
                            yield b"data: {not json\n\n"
                            break
                        if kind == "deep":
                            yield b"data: " + _DEEP + b"\n\n"
                            break
                        await asyncio.sleep(0.01)
                        _kill(request, rst=False)
                        return
                    numbered = f"id: {i}\n" if kind == "gateway" else ""
                    yield f"{numbered}data: {json.dumps(c)}\n\n".encode()
                    if kind == "gateway":  # a keep-alive comment, events without data
                        yield b": ping\n\nevent: ping\n\ndata:\n\n"
                    if per_chunk:
                        await asyncio.sleep(per_chunk)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream", headers=_gzip_claimed(kind))
        full = self._full(chat, body)
        full = _bare(full) if kind == "bare" else _odd(full, fault) if kind == "odd" else full
        payload = json.dumps(full).encode()
        if kind == "garbled":
            return Response(payload[: len(payload) // 2], media_type="application/json")
        if kind == "deep":
            return Response(_DEEP, media_type="application/json")
        if kind == "drop":
            async def partial():  # noqa: ANN202
                yield payload[: len(payload) // 2]
                await asyncio.sleep(0.01)
                _kill(request, rst=False)

            return StreamingResponse(partial(), media_type="application/json")
        return Response(payload, media_type="application/json", headers=_gzip_claimed(kind))

    def _build(self) -> FastAPI:
        app = FastAPI(title="fault server")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._answer(request, True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._answer(request, False)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "fault-model", "object": "model", "created": 0,
                                                "owned_by": "fault-server"}]}

        @app.post("/_faults")
        async def faults(request: Request) -> Any:
            d = await request.json()
            try:
                self.configure(queue=d.get("queue"), rate=d.get("rate"), kinds=d.get("kinds"), seed=d.get("seed"),
                               delay_s=d.get("delay_s"), clear=bool(d.get("clear")))
            except ValueError as exc:  # a spec this server cannot read: say which, nothing applied
                return JSONResponse({"ok": False, "error": str(exc)}, status_code=400)
            return {"ok": True, "pending_faults": len(self._queue)}

        @app.get("/_stats")
        async def stats() -> dict:
            return self.stats()

        @app.post("/_reset")
        async def reset() -> dict:
            self.reset()
            return {"ok": True}

        return app


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):  # noqa: ANN201
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=TrackingH11Protocol, loop="asyncio",
                          log_level=log_level, lifespan="off", access_log=False, timeout_graceful_shutdown=2)


class FaultServerThread:
    """Run a :class:`FaultServer` on 127.0.0.1 in a background thread; control it over HTTP."""

    def __init__(self, server: FaultServer | None = None, port: int | None = None, **kw: Any) -> None:
        import uvicorn

        self.fault = server or FaultServer(**kw)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.server = uvicorn.Server(uvicorn_config(self.fault.app, port=port))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def __enter__(self) -> "FaultServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fault server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    # --- control over HTTP (as a test or a person would) --------------------------------------------
    def faults(self, *queue: str | dict, **kw: Any) -> dict:
        # (Python's json, NaN and Infinity allowed: an ``odd`` fault may carry them; httpx's json= refuses them)
        body = json.dumps({"queue": list(queue), **kw})
        r = httpx.post(self.url + "/_faults", content=body, headers={"content-type": "application/json"}, timeout=5)
        if r.status_code != 200:  # a spec the server cannot read: the test's own mistake, said at once
            raise ValueError(r.json()["error"])
        return r.json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/_stats", timeout=5).json()

    def reset(self) -> None:
        httpx.post(self.url + "/_reset", timeout=5)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--answer", default=DEFAULT_ANSWER)
    ap.add_argument("--logprob", type=float, default=-0.05)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    ap.add_argument("--rate", type=float, default=0.0, help="fraction of requests given a fault from --kinds")
    ap.add_argument("--kinds", default="500", help="comma-separated fault specs for --rate")
    ap.add_argument("--queue", default="", help="comma-separated fault specs for the first requests")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fs = FaultServer(answer=args.answer, logprob=args.logprob, seed=args.seed, delay_s=args.delay)
    fs.configure(rate=args.rate, kinds=[k for k in args.kinds.split(",") if k],
                 queue=[q for q in args.queue.split(",") if q])
    print(f"fault server on http://{args.host}:{args.port}/v1 (POST /_faults, GET /_stats)", flush=True)
    uvicorn.Server(uvicorn_config(fs.app, host=args.host, port=args.port, log_level="info")).run()


if __name__ == "__main__":
    main()
