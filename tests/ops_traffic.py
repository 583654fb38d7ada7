"""Real traffic for the operations tests (shadow policies, reports, recalibration, drift).

A real uvicorn server in front of two SmolLM2 tiers; requests through HTTP (chat, streaming, completions,
two API keys) and feedback through the API. Made once per test session by :func:`ops_traffic` (every
answer is a real generation: it is the slow part) and shared by test_shadow.py, test_reports.py and
test_recalibrate.py, which import the ``traffic`` fixture from here (as tests/pg.py's ``postgres``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ServerThread, chat_stream, tier

# question, keyword of a right answer (feedback: thumbs up when the served answer contains it), stream?
QUESTIONS = [
    ("What is the capital of France? Answer in one word.", "paris", False),
    ("What is 2 + 2? Reply with just the number.", "4", False),
    ("Which planet is known as the Red Planet? One word.", "mars", False),
    ("Who wrote Hamlet?", "shakespeare", False),
    ("What is the chemical symbol for gold?", "au", True),
    ("What is 7 times 8?", "56", False),
    ("Spell 'cat' backwards.", "tac", False),
    ("What is the opposite of hot? One word.", "cold", False),
    ("Is water wet? Answer yes or no.", "yes", True),
    ("Which ocean is the largest?", "pacific", False),
]
KEYS = {"free-1": ("sk-test-free", "free"), "paid-1": ("sk-test-paid", "paid"), "ops-1": ("sk-test-ops", "ops")}
LIVE_T, LENIENT_T, STRICT_T, HOT_T, HOT_TEMP = 0.5, 0.4, 0.7, 0.55, 2.0
#: the daily sample budget of the `large_only_capped` shadow: a couple of 10-token answers of the large tier
#: ($2/$6 per million tokens, ~40-token prompts: ~$0.00014 predicted each), far fewer than it would sample
SAMPLE_CAP_USD = 0.0003


@dataclass
class Traffic:
    dir: Path
    config_path: Path
    ledger: Path
    cal_dir: Path
    server: ServerThread
    sent: list[dict[str, Any]] = field(default_factory=list)
    drift_log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, key_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[key_id][0]}"}

    def rows(self, sql: str, *args: Any) -> list[tuple]:
        with sqlite3.connect(self.ledger) as c:
            return c.execute(sql, args).fetchall()


class _Collect(logging.Handler):
    """The drift log lines of the traffic server's thread (not those of other tests' monitors)."""

    def __init__(self, out: list[str], thread: str) -> None:
        super().__init__(logging.INFO)
        self.out, self.thread = out, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName == self.thread:
            self.out.append(record.getMessage())


def ops_config(d: Path, cal_dir: Path) -> dict[str, Any]:
    from serving.auth import hash_key

    return {
        "ledger": {"path": str(d / "ledger.sqlite")},
        # one thread per tier: on shared cores two spinning OpenMP threads per generation cost ~5x more
        "tiers": [tier("small", max_tokens=8, threshold=LIVE_T, calibrator={"artifact": str(cal_dir / "small.json")},
                       options={"threads": 1}),
                  tier("large", max_tokens=10, price={"input_per_1m": 2.0, "output_per_1m": 6.0},
                       options={"threads": 1})],
        "policies": {"cascade": {"chain": ["small", "large"]}},
        "user_tiers": {"free": {}, "paid": {}, "ops": {"admin": True}},
        "auth": {"keys": [{"id": k, "sha256": hash_key(v[0]), "user_tier": v[1]} for k, v in KEYS.items()]},
        "shadows": {
            "lenient": {"of": "cascade", "thresholds": {"small": LENIENT_T}, "description": "small threshold 0.4"},
            "strict": {"of": "cascade", "thresholds": {"small": STRICT_T}},
            "hot": {"of": "cascade", "thresholds": {"small": HOT_T},
                    "calibrators": {"small": {"method": "temperature", "feature": "mean_logprob",
                                              "params": {"temperature": HOT_TEMP}}}},
            "large_only": {"of": "cascade", "chain": ["large"]},
            # sampled shadow execution: strict again, but running the large tier where the live path kept
            # small, on every such request (plenty of budget) ...
            "strict_sampled": {"of": "cascade", "thresholds": {"small": STRICT_T}, "sample_rate": 1.0,
                               "sample_budget_usd": 1.0, "sample_seed": 0},
            # ... and large-only on a budget that runs out after a sample or two
            "large_only_capped": {"of": "cascade", "chain": ["large"], "sample_rate": 1.0,
                                  "sample_budget_usd": SAMPLE_CAP_USD},
            # a user-tier rule: lenient for the paid user tier only
            "lenient_paid": {"of": "cascade", "thresholds": {"small": LENIENT_T}, "user_tiers": ["paid"]},
        },
        # a band no real traffic stays in: the alarms must go on
        "drift": {"window": 3, "escalation_rate": [0.0, 0.1], "max_ece": 0.0001, "min_labels": 3},
    }


def _make_traffic(pytest_config: Any) -> Traffic:
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import load_config
    from serving import create_app

    d = Path(tempfile.mkdtemp(prefix="cascade-ops-"))
    cal_dir = d / "calibrators"
    save_calibrator(TemperatureScaling("mean_logprob", 1.0), cal_dir / "small.json")
    cfg_path = d / "cascade.yaml"
    cfg_path.write_text(yaml.safe_dump(ops_config(d, cal_dir), sort_keys=False))
    # the environment the server itself reloads with (POST /admin/reload, SIGHUP), less the overrides that
    # would point this test's ledger or address elsewhere; the model cache override is kept
    env = {k: v for k, v in os.environ.items() if k not in ("CASCADE_LEDGER_PATH", "CASCADE_HOST", "CASCADE_PORT")}
    cfg = load_config(cfg_path, environ=env)
    t = Traffic(dir=d, config_path=cfg_path, ledger=d / "ledger.sqlite", cal_dir=cal_dir,
                server=ServerThread(create_app(cfg, config_path=str(cfg_path))))
    handler = _Collect(t.drift_log, t.server.thread.name)
    logging.getLogger("cascade.drift").addHandler(handler)
    logging.getLogger("cascade.drift").setLevel(logging.INFO)
    t.server.__enter__()

    def stop() -> None:
        t.server.__exit__(None, None, None)
        logging.getLogger("cascade.drift").removeHandler(handler)
        shutil.rmtree(d, ignore_errors=True)

    pytest_config.add_cleanup(stop)  # at the end of the session, before the interpreter's own exit hooks
    with httpx.Client(base_url=t.url, timeout=300) as c:
        for i, (q, keyword, stream) in enumerate(QUESTIONS):
            key = "free-1" if i % 2 == 0 else "paid-1"
            body = {"model": "cascade", "messages": [{"role": "user", "content": q}], "stream": stream}
            if i % 4 != 3:  # cost attribution: an end user on most requests, tags on some (report --by user)
                body["user"] = f"user-{i % 3}"
            if i % 3 != 2:
                body["metadata"] = {"team": ("search", "ads")[i % 2], "feature": "qa"}
            if stream:
                text, block, _ = chat_stream(c, body, t.headers(key))
                rid = block["request_id"]
            else:
                r = c.post("/v1/chat/completions", json=body, headers=t.headers(key))
                assert r.status_code == 200, r.text
                text, rid = r.json()["choices"][0]["message"]["content"], r.json()["cascade"]["request_id"]
            score = 1 if keyword in text.lower() else -1
            fb = c.post("/v1/feedback", json={"request_id": rid, "score": score}, headers=t.headers(key))
            assert fb.status_code == 200, fb.text
            t.sent.append({"request_id": rid, "question": q, "text": text, "score": score, "key": key})
        # a pinned tier through the completions endpoint: no shadow (shadows follow their live policy)
        r = c.post("/v1/completions", json={"model": "large", "prompt": "The sky is", "max_tokens": 2},
                   headers=t.headers("paid-1"))
        assert r.status_code == 200, r.text
        t.sent.append({"request_id": r.json()["id"].removeprefix("cmpl-"), "question": None, "pinned": True})
    # sampled shadows run after each response, in the background: wait until the last one is recorded
    sampler = t.server.config.app.state.engine.sampler
    deadline = time.monotonic() + 300
    while sampler.in_flight:
        assert time.monotonic() < deadline, "shadow samples did not finish"
        time.sleep(0.05)
    return t


_TRAFFIC: list[Traffic] = []


def ops_traffic(pytest_config: Any) -> Traffic:
    if not _TRAFFIC:
        _TRAFFIC.append(_make_traffic(pytest_config))
    return _TRAFFIC[0]


@pytest.fixture
def traffic(pytestconfig: Any) -> Traffic:
    return ops_traffic(pytestconfig)
