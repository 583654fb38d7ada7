"""A two-tier cascade whose first tier is vLLM: it escalates as configured, the ledger says so."""

from __future__ import annotations

import sqlite3

import pytest

from cascade.engine import StreamDelta, StreamEnd, StreamStart
from cascade.types import GenerationRequest, Message

pytestmark = pytest.mark.vllm

Q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),))


def rows(path, sql, *args):
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


async def test_strict_policy_escalates_from_vllm_to_the_next_tier(lane_engine, lane_ledger):
    rec = (await lane_engine.run(Q, model="strict")).record
    assert rec.escalated and rec.tier == "large" and [a.tier for a in rec.attempts] == ["small", "large"]
    small, large = rec.attempts
    assert small.backend == "vllm" and small.decision == "escalate" and not small.kept
    assert "< threshold 1.000" in small.reason and 0.0 < small.confidence < 1.0
    assert small.completion_tokens > 0 and small.prompt_tokens > 0
    assert small.cost_usd == pytest.approx((small.prompt_tokens * 0.05 + small.completion_tokens * 0.1) / 1e6)
    assert large.backend == "transformers" and large.decision == "final" and large.kept
    assert rec.escalation_waste_usd == pytest.approx(small.cost_usd)

    db = lane_ledger / "ledger.sqlite"
    (req,) = rows(db, "SELECT policy, tier, escalated, n_attempts, status FROM requests WHERE request_id=?",
                  rec.request_id)
    assert req == ("strict", "large", 1, 2, "ok")
    att = rows(db, "SELECT idx, tier, backend, decision, kept FROM attempts WHERE request_id=? ORDER BY idx",
               rec.request_id)
    assert att == [(0, "small", "vllm", "escalate", 0), (1, "large", "transformers", "final", 1)]


async def test_lenient_policy_keeps_the_vllm_answer(lane_engine, lane_ledger, vllm_backend):
    out = await lane_engine.run(Q, model="lenient")
    rec = out.record
    assert not rec.escalated and rec.tier == "small" and len(rec.attempts) == 1
    assert rec.attempts[0].backend == "vllm" and rec.attempts[0].kept
    assert "Paris" in out.result.text
    direct = await vllm_backend.generate(Q.with_(max_tokens=16))
    assert out.result.text == direct.text  # the tier's max_tokens (16) applies
    (row,) = rows(lane_ledger / "ledger.sqlite", "SELECT tier, escalated FROM requests WHERE request_id=?",
                  rec.request_id)
    assert row == ("small", 0)


async def test_threshold_between_confidences_decides(lane_engine):
    """The default policy (threshold 0.5 on small) decides by the calibrated confidence of vLLM's tokens."""
    rec = (await lane_engine.run(Q, model="lenient")).record
    conf = rec.confidence
    expected_escalation = conf < 0.5
    rec2 = (await lane_engine.run(Q, model="cascade")).record
    assert rec2.attempts[0].confidence == pytest.approx(conf, abs=1e-6)
    assert rec2.escalated is expected_escalation


async def test_vllm_tier_streams_live_when_last(lane_engine):
    """A request pinned to the vLLM tier streams its tokens from the engine as they come."""
    events = [e async for e in lane_engine.stream(Q, model="small")]
    assert isinstance(events[0], StreamStart) and events[0].tier == "small"
    deltas = [e for e in events if isinstance(e, StreamDelta)]
    assert len(deltas) > 2 and "Paris" in "".join(d.text for d in deltas)
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.usage.completion_tokens == sum(len(d.tokens) for d in deltas)
    assert end.record.attempts[0].backend == "vllm"
