"""Shared fixtures: the real small model, real configs, a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TEST_MODEL = "smollm2-135m"
#: where the transformers backend's own tests run the model: ``cpu`` (CI), or ``cuda`` on a GPU host
TEST_DEVICE = os.environ.get("CASCADE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def smol_path() -> Path:
    """The prepared SmolLM2-135M directory (`make test` prepares it; a missing one is an error)."""
    from cascade.models import resolve_model_path

    return resolve_model_path(TEST_MODEL)


@pytest.fixture(scope="session")
async def smol_backend(smol_path: Path):
    from cascade.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(model=str(smol_path), name="smol", threads=2, device=TEST_DEVICE)
    await backend.start()
    yield backend
    await backend.close()


def tier(name: str, **kw: Any) -> dict[str, Any]:
    """A transformers tier on SmolLM2 (tests change prices/thresholds per tier)."""
    d: dict[str, Any] = {
        "name": name, "backend": "transformers", "model": TEST_MODEL,
        "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}, "max_tokens": 8, "threshold": 0.5,
        "options": {"threads": 2},
    }
    d.update(kw)
    return d


def make_config(tmp_path: Path, tiers: list[dict[str, Any]], policies: dict[str, Any] | None = None,
                **extra: Any):
    from cascade.config import parse_config

    data: dict[str, Any] = {
        "ledger": {"path": str(tmp_path / "ledger.sqlite")},
        "tiers": tiers,
        "policies": policies or {"cascade": {"chain": [t["name"] for t in tiers]}},
    }
    data.update(extra)
    return parse_config(data, source="<test>", environ={})


@pytest.fixture
async def make_engine(tmp_path: Path):
    """``await make_engine(tiers, policies=None)``: an Engine on a config of those tiers (``make_config``), closed
    after the test."""
    from cascade.engine import Engine

    opened = []

    async def make(tiers: list[dict[str, Any]], policies: dict[str, Any] | None = None):
        eng = await Engine.open(make_config(tmp_path, tiers, policies))
        opened.append(eng)
        return eng

    yield make
    for e in opened:
        await e.close()


def chat_stream(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None
                ) -> tuple[str, dict[str, Any] | None, dict[str, str]]:
    """POST a streamed chat completion and read it whole: (its text, the final ``cascade`` object, the
    response headers); asserts a 200."""
    text, block = "", None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                for ch in obj.get("choices") or ():
                    text += ch.get("delta", {}).get("content") or ""
                block = obj.get("cascade", block)
        return text, block, dict(r.headers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: a library for LD_PRELOAD moving CLOCK_REALTIME by the whole seconds written in $JUMP_FILE (read at each call):
#: a step of the wall clock (NTP, a VM resumed) in the processes started with it, the machine's clock left alone
_CLOCK_STEP_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    const char *p = getenv("JUMP_FILE"); FILE *f; long s = 0;
    if (r == 0 && id == CLOCK_REALTIME && p && (f = fopen(p, "r"))) {
        if (fscanf(f, "%ld", &s) != 1) s = 0;
        fclose(f);
        ts->tv_sec += s;
    }
    return r;
}
"""


def clock_step(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that gives a subprocess a wall clock to step, and the file to write the step to (seconds,
    0 at first): write "-3600" and its time.time() is an hour back, its monotonic clock unmoved. Skips the test
    where no C compiler builds the library."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the clock-step library")
    src, lib, jump = tmp_path / "clock_step.c", tmp_path / "clock_step.so", tmp_path / "clock_step"
    src.write_text(_CLOCK_STEP_C)
    built = subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], capture_output=True, text=True)
    if built.returncode != 0:  # a compiler without the C library's headers
        pytest.skip(f"the clock-step library did not build: {built.stderr.strip()[-200:]}")
    jump.write_text("0")
    return {"LD_PRELOAD": str(lib), "JUMP_FILE": str(jump)}, jump


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread (as httpx's own tests do)."""

    def __init__(self, app, port: int | None = None) -> None:  # noqa: ANN001
        import uvicorn

        self.port = port or free_port()
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                     lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve_app() -> Iterator:
    """Start ``create_app(config)`` on a real uvicorn server; yields a starter function."""
    started: list[ServerThread] = []

    def start(config, config_path: str | None = None) -> ServerThread:  # noqa: ANN001
        from serving import create_app

        srv = ServerThread(create_app(config, config_path=config_path)).__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)
