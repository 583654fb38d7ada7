"""Edge cases of the engine's accounting and of provider resilience, each pinned to an exact value.

What is checked here, on real parts only (SmolLM2 on CPU, OpenAI-protocol fault servers on loopback, the
real SQLite ledger read back from its file; nothing monkeypatched):

* the escalation threshold is inclusive: an answer exactly as confident as the threshold is kept;
* an empty answer escalates whatever the threshold (even 0.0, which accepts every other answer);
* a request's token totals add up every attempt's: failed ones and escalated ones too;
* a plain tier (no ``providers``) that times out is billed its prompt, as escalation waste;
* when the last tier fails, the most confident answer in hand is served, not the latest one;
* the cost budget is inclusive (a call that can cost exactly what is left is made), counts what earlier
  tiers spent, and ``truncate`` cuts max_tokens to what is left once the prompt is paid (run and stream);
* circuit breakers: a caller's own latency budget never opens one, a stream broken mid-way counts as a
  failure; a provider's rate-limit hold keeps the longest hint it was given, and a hold longer than the
  call can wait sends the call to the next provider at once;
* a buffered answer whose client left before any of it went out is made a cancellation: no tier, all
  its cost waste;
* ``Price.cost`` never bills more cached prompt tokens than the prompt has.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cascade.budget import Budget
from cascade.config import Price
from cascade.errors import CascadeError, ProviderTimeoutError
from cascade.resilience import ResilientBackend
from cascade.types import GenerationRequest, Message
from tests.conftest import make_config, tier
from tests.hosted import db_rows, plain, prov, rtier
from tests.fault_server import FaultServer, FaultServerThread

pytestmark = pytest.mark.timeout(120)

QUESTION = "What is the capital of France?"
Q = GenerationRequest(messages=(Message("user", QUESTION),), max_tokens=4)
SURE, UNSURE = "Sure: Paris.", "Maybe Lyon."
LONG = " ".join(f"w{i}" for i in range(200))


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    with FaultServerThread() as a, FaultServerThread() as b, FaultServerThread() as c, \
            FaultServerThread(FaultServer(answer=SURE, logprob=-0.01)) as hi, \
            FaultServerThread(FaultServer(answer=UNSURE, logprob=-2.0)) as lo, \
            FaultServerThread(FaultServer(answer=LONG)) as long, \
            FaultServerThread(FaultServer(answer="")) as empty:
        yield {"a": a, "b": b, "c": c, "hi": hi, "lo": lo, "long": long, "empty": empty}


@pytest.fixture(autouse=True)
def _clean(request):
    if "servers" in request.fixturenames:
        for s in request.getfixturevalue("servers").values():
            s.reset()










def seen(fs) -> int:
    return fs.stats()["requests"]


# --- the threshold ------------------------------------------------------------------------------------------


async def test_an_answer_exactly_as_confident_as_the_threshold_is_kept(make_engine):
    """``confidence >= threshold`` keeps the answer: SmolLM2's greedy answer on CPU is the same every time, so
    a threshold set to the confidence it had once is met exactly the next time."""
    probe = await make_engine([tier("small", threshold=0.0), tier("large")])
    conf = (await probe.run(GenerationRequest(messages=Q.messages))).record.attempts[0].confidence
    assert 0.0 < conf < 1.0
    eng = await make_engine([tier("small", threshold=conf), tier("large")])
    rec = (await eng.run(GenerationRequest(messages=Q.messages))).record
    assert [(x.tier, x.decision) for x in rec.attempts] == [("small", "accept")]
    att = rec.attempts[0]
    assert att.confidence == conf
    assert att.decision == "accept" and att.kept and not rec.escalated and rec.tier == "small"
    assert f"confidence {conf:.3f} >= threshold {conf:.3f}" in att.reason


async def test_an_empty_answer_escalates_even_past_a_threshold_of_zero(servers, make_engine, tmp_path):
    """An answer with no tokens has nothing to serve: it escalates whatever its calibrated confidence, even on a
    tier whose threshold (0.0) accepts every answer that has tokens; the next tier's answer is served."""
    eng = await make_engine([plain("blank", servers["empty"], threshold=0.0), plain("last", servers["a"])])
    out = await eng.run(Q, request_id="blank")
    rec = out.record
    assert [(x.tier, x.decision, x.kept) for x in rec.attempts] == [("blank", "escalate", False),
                                                                     ("last", "final", True)]
    assert rec.attempts[0].reason == "empty answer" and rec.attempts[0].confidence == 0.0
    assert out.result.text and rec.tier == "last" and rec.escalated
    assert db_rows(tmp_path, "SELECT tier, escalated FROM requests WHERE request_id = 'blank'") == [("last", 1)]


async def test_an_empty_streamed_answer_is_read_as_one_with_no_tokens_as_a_whole_one_is(make_engine):
    """SmolLM2's first token here is the first half of a 4-byte character, and max_tokens 1 leaves no room for
    the rest: the answer is empty, with one token. Generated whole, it was read as having no tokens (the floor,
    confidence 0); streamed, its features were that token's (confidence 0.31), in the ledger beside it."""
    eng = await make_engine([tier("small")])
    fraktur = "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522"  # "Unicode" in Fraktur
    req = GenerationRequest(prompt="\ue000" + fraktur, max_tokens=1)
    whole = await eng.run(req, endpoint="completions")
    streamed = [e async for e in eng.stream(req, endpoint="completions")][-1].record
    assert whole.result.text == "" and len(whole.result.tokens) == 1
    for att in (whole.record.attempts[0], streamed.attempts[0]):
        assert (att.text, att.features["n_tokens"], att.confidence) == ("", 0.0, 0.0)
    assert streamed.attempts[0].features == whole.record.attempts[0].features


# --- token totals and the bill of failed attempts --------------------------------------------------------


async def test_a_requests_token_totals_add_up_every_attempt(servers, make_engine, tmp_path):
    """A request's prompt and completion tokens are those of all its attempts: a failed one (a 200 that could
    not be read, its prompt billed) and an escalated one (its answer thrown away) included."""
    a, b, c = servers["a"], servers["b"], servers["c"]
    eng = await make_engine([plain("broken", c), plain("doubt", a, threshold=1.0), plain("last", b)])
    c.faults("garbled")
    rec = (await eng.run(Q, request_id="sums")).record
    broken, doubt, last = rec.attempts
    assert [(x.tier, x.decision) for x in rec.attempts] == [("broken", "error"), ("doubt", "escalate"),
                                                             ("last", "final")]
    assert broken.prompt_tokens == Q.rough_prompt_tokens() > 0 and broken.completion_tokens == 0
    # the fault server counts a chat prompt as its words + 3: 6 + 3; it answers max_tokens (4) word tokens
    assert (doubt.prompt_tokens, doubt.completion_tokens) == (9, 4) == (last.prompt_tokens, last.completion_tokens)
    assert rec.prompt_tokens == broken.prompt_tokens + 9 + 9
    assert rec.completion_tokens == 4 + 4
    assert db_rows(tmp_path, "SELECT prompt_tokens, completion_tokens, n_attempts FROM requests "
                             "WHERE request_id = 'sums'") == [(rec.prompt_tokens, 8, 3)]
    assert db_rows(tmp_path, "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM attempts "
                             "WHERE request_id = 'sums'") == [(rec.prompt_tokens, 8)]


async def test_a_plain_tier_that_times_out_is_billed_its_prompt_as_waste(servers, make_engine, tmp_path):
    """A tier without providers that does not answer within its timeout_s was working on the prompt: the
    attempt is billed its (estimated) prompt at the tier's price, as escalation waste, in the ledger too."""
    a, b = servers["a"], servers["b"]
    eng = await make_engine([plain("slow", a, timeout_s=1, threshold=1.0,
                                   price={"input_per_1m": 3.0, "output_per_1m": 5.0}),
                             plain("next", b)])
    a.faults("stall:10")
    rec = (await eng.run(Q, request_id="timed-out")).record
    slow, nxt = rec.attempts
    assert slow.error_class == "ProviderTimeoutError" and slow.decision == "error" and not slow.kept
    assert slow.prompt_tokens == Q.rough_prompt_tokens() > 0 and slow.completion_tokens == 0
    assert slow.cost_usd == pytest.approx(slow.prompt_tokens * 3.0 / 1e6) and slow.cost_usd > 0
    assert nxt.kept and nxt.cost_usd == pytest.approx((9 * 1.0 + 4 * 2.0) / 1e6)
    assert rec.escalation_waste_usd == pytest.approx(slow.cost_usd)
    assert rec.cost_usd == pytest.approx(slow.cost_usd + nxt.cost_usd)
    assert rec.prompt_tokens == slow.prompt_tokens + 9
    assert db_rows(tmp_path, "SELECT error_class, prompt_tokens, cost_usd, kept FROM attempts "
                             "WHERE request_id = 'timed-out' AND idx = 0") == [
        ("ProviderTimeoutError", slow.prompt_tokens, pytest.approx(slow.cost_usd), 0)]
    assert db_rows(tmp_path, "SELECT escalation_waste_usd FROM requests WHERE request_id = 'timed-out'") == [
        (pytest.approx(slow.cost_usd),)]


# --- the answer served when the last tier fails -------------------------------------------------------------


async def test_the_most_confident_answer_in_hand_is_served_not_the_latest(servers, make_engine, tmp_path):
    """Two tiers both escalate, the first more confident than the second; the last tier fails (a 200 it could
    not read, billed its prompt). The first tier's answer is served; the second's and the failed call are waste."""
    hi, lo, c = servers["hi"], servers["lo"], servers["c"]
    eng = await make_engine([plain("sure", hi, threshold=1.0),
                             plain("unsure", lo, threshold=1.0, price={"input_per_1m": 3.0, "output_per_1m": 5.0}),
                             plain("dead", c, price={"input_per_1m": 7.0, "output_per_1m": 11.0})])
    c.faults("garbled")
    out = await eng.run(Q, request_id="best")
    rec = out.record
    sure, unsure, dead = rec.attempts
    assert sure.confidence > unsure.confidence
    assert out.result.text == SURE and rec.tier == "sure" and rec.confidence == sure.confidence
    assert (sure.decision, sure.kept) == ("accept", True)
    assert "served because 'dead' failed (ProviderServerError)" in sure.reason
    assert (unsure.decision, unsure.kept) == ("escalate", False)
    assert (dead.decision, dead.kept, dead.error_class) == ("error", False, "ProviderServerError")
    assert dead.cost_usd == pytest.approx(dead.prompt_tokens * 7.0 / 1e6) and dead.cost_usd > 0
    assert unsure.cost_usd == pytest.approx((9 * 3.0 + 2 * 5.0) / 1e6)   # "Maybe Lyon." is 2 word tokens
    assert rec.escalation_waste_usd == pytest.approx(unsure.cost_usd + dead.cost_usd)
    assert db_rows(tmp_path, "SELECT status, tier, escalated, escalation_waste_usd FROM requests "
                             "WHERE request_id = 'best'") == [("ok", "sure", 0, pytest.approx(rec.escalation_waste_usd))]
    assert db_rows(tmp_path, "SELECT tier, kept FROM attempts WHERE request_id = 'best' ORDER BY idx") == [
        ("sure", 1), ("unsure", 0), ("dead", 0)]


# --- the cost budget ----------------------------------------------------------------------------------------


async def test_the_cost_budget_counts_what_earlier_tiers_spent(servers, make_engine, tmp_path):
    """Each call's worst case is 4 answer tokens at $10,000 per 1M ($0.04, and a prompt at $1 per 1M): within
    a $0.06 budget once, not twice. The first tier spends $0.04, so the second is skipped (never called) and
    the first tier's answer is served."""
    a, b = servers["a"], servers["b"]
    price = {"input_per_1m": 1.0, "output_per_1m": 10000.0}
    eng = await make_engine([plain("first", a, threshold=1.0, price=price), plain("second", b, price=price)])
    out = await eng.run(Q, request_id="budgeted", budget=Budget(cost_usd=0.06, on_cost="refuse"))
    rec = out.record
    assert [x.decision for x in rec.attempts] == ["accept", "skipped"]
    assert rec.tier == "first" and rec.attempts[0].kept and "served because cost budget" in rec.attempts[0].reason
    assert rec.cost_usd == pytest.approx((9 * 1.0 + 4 * 10000.0) / 1e6) and rec.cost_usd <= 0.06
    assert seen(a) == 1 and seen(b) == 0
    assert db_rows(tmp_path, "SELECT decision, cost_usd FROM attempts WHERE request_id = 'budgeted' ORDER BY idx") == [
        ("accept", pytest.approx(rec.cost_usd)), ("skipped", 0.0)]


async def test_a_call_whose_worst_case_is_exactly_the_budget_is_made(servers, make_engine):
    """The budget is what a request may spend, inclusive: a call whose worst case (4 answer tokens at $10,000 per
    1M, the prompt free) is exactly the $0.04 budget is made and answers, not refused."""
    a = servers["a"]
    eng = await make_engine([plain("only", a, price={"input_per_1m": 0.0, "output_per_1m": 10000.0})])
    rec = (await eng.run(Q, budget=Budget(cost_usd=0.04, on_cost="refuse"))).record
    assert [(x.decision, x.max_tokens_cut) for x in rec.attempts] == [("final", None)]
    assert rec.cost_usd == 0.04 and seen(a) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_truncate_leaves_room_for_the_prompt(servers, make_engine, tmp_path, stream):
    """``on_cost: truncate`` cuts max_tokens to what the budget pays once the prompt is paid: a budget of the
    estimated prompt and 10 answer tokens ($1,000 per 1M each way) gets an answer of (about) 10 tokens, not
    one as long as the prompt and 10, and the request costs no more than its budget."""
    long = servers["long"]
    eng = await make_engine([plain("t", long, max_tokens=64, price={"input_per_1m": 1000.0, "output_per_1m": 1000.0})])
    req = GenerationRequest(messages=Q.messages, max_tokens=64)
    est = eng.tiers["t"].backend.estimate_prompt_tokens(req)
    assert est >= 9   # the server bills the prompt as 9: the estimate leans high
    budget = Budget(cost_usd=(est + 10) * 1e-3, on_cost="truncate")
    if stream:
        events = [ev async for ev in eng.stream(req, request_id="cut", budget=budget)]
        assert type(events[-1]).__name__ == "StreamEnd"
        rec = events[-1].record
    else:
        rec = (await eng.run(req, request_id="cut", budget=budget)).record
    (att,) = rec.attempts
    assert att.max_tokens_cut in (9, 10)   # (what is left, in float arithmetic, rounded down)
    assert att.completion_tokens == att.max_tokens_cut and att.prompt_tokens == 9
    assert rec.cost_usd == pytest.approx((9 + att.max_tokens_cut) * 1e-3) and rec.cost_usd <= budget.cost_usd
    assert long.stats()["log"][0]["fault"] == "ok" and seen(long) == 1
    assert db_rows(tmp_path, "SELECT completion_tokens FROM requests WHERE request_id = 'cut'") == [
        (att.max_tokens_cut,)]


async def test_truncate_to_a_single_answer_token_is_still_an_answer(servers, make_engine):
    """A budget that pays for exactly one answer token (the prompt free, $10,000 per 1M out: $0.01) is cut to
    ``max_tokens`` 1 and answered, not refused."""
    long = servers["long"]
    eng = await make_engine([plain("t", long, max_tokens=4, price={"input_per_1m": 0.0, "output_per_1m": 10000.0})])
    rec = (await eng.run(Q, budget=Budget(cost_usd=0.01, on_cost="truncate"))).record
    (att,) = rec.attempts
    assert (rec.status, att.max_tokens_cut, att.completion_tokens) == ("ok", 1, 1)
    assert rec.cost_usd == pytest.approx(0.01) and seen(long) == 1


# --- circuit breakers and rate-limit holds -----------------------------------------------------------------


async def test_a_callers_latency_budget_just_under_the_tiers_timeout_leaves_the_breaker_closed(
        servers, make_engine, tmp_path):
    """A budget of 2.95 s on a 3 s tier leaves the provider nearly all its time, yet the timeout is still the
    caller's, not the provider's: its breaker (opened by one failure) stays closed."""
    a = servers["a"]
    eng = await make_engine([rtier("t", [prov("a", a)], timeout_s=3, retry={"max_attempts": 1},
                                   breaker={"failure_threshold": 1, "cooldown_s": 30})])
    a.faults("stall:10")
    with pytest.raises(ProviderTimeoutError):
        await eng.run(Q, request_id="tight", budget=Budget(latency_s=2.95))
    breaker = eng.tiers["t"].backend.providers[0].breaker
    assert breaker.state == "closed" and breaker.snapshot()["consecutive_failures"] == 0
    assert db_rows(tmp_path, "SELECT error_class FROM attempts WHERE request_id = 'tight'") == [
        ("ProviderTimeoutError",)]
    out = await eng.run(Q, request_id="after")   # the provider is still called
    assert out.record.status == "ok" and out.record.attempts[-1].backend == "a" and seen(a) == 2


async def test_a_stream_broken_mid_way_counts_against_the_breaker(servers, tmp_path):
    """A provider that drops the connection after two chunks failed: with failure_threshold 1, its breaker opens."""
    a = servers["a"]
    cfg = make_config(tmp_path, [rtier("t", [prov("a", a)], breaker={"failure_threshold": 1, "cooldown_s": 30})])
    backend = ResilientBackend.from_tier(cfg.tiers[0], cfg)
    a.faults("drop:2")
    texts = []
    try:
        with pytest.raises(CascadeError) as err:
            async for chunk in backend.stream(GenerationRequest(messages=Q.messages, max_tokens=6)):
                texts.append(chunk.text)
    finally:
        await backend.close()
    assert "".join(texts) == "Paris is"
    assert err.value.mid_stream and not err.value.fall_over
    assert [p.action for p in err.value.attempts] == ["failed"]
    assert backend.providers[0].breaker.state == "open"


async def test_a_provider_hold_keeps_the_longest_hint(servers, make_engine):
    """Two requests rate limited by the same provider: the first's short hint (100 ms) arrives after the second's
    long one (30 s). The provider stays held for the long one; a third request goes to the fallback."""
    a, b = servers["a"], servers["b"]
    eng = await make_engine([rtier("t", [prov("a", a), prov("b", b)],
                                   retry={"max_attempts": 1, "max_retry_after_s": 2})])
    a.faults("429:ms=100:after=1.0", "429:ra=30")
    first = asyncio.create_task(eng.run(Q, request_id="held-1"))
    deadline = time.monotonic() + 30
    while seen(a) < 1:
        assert time.monotonic() < deadline and not first.done()
        await asyncio.sleep(0.02)
    second = await eng.run(Q, request_id="held-2")
    first = await first
    for out in (first, second):
        assert [(x.backend, x.error_class) for x in out.record.attempts] == [("a", "RateLimitedError"), ("b", None)]
    assert a.stats()["by_fault"] == {"429:ms=100:after=1.0": 1, "429:ra=30": 1}
    assert eng.tiers["t"].backend.providers[0].held_for() > 25
    third = await eng.run(Q, request_id="held-3")
    assert [(x.backend, x.error_class) for x in third.record.attempts] == [("b", None)]
    assert seen(a) == 2 and seen(b) == 3


async def test_a_hold_the_call_cannot_wait_out_sends_it_to_the_next_provider(servers, make_engine):
    """A provider held for 5 s (its Retry-After, within max_retry_after_s) on a 2 s tier: a call cannot wait that
    long, so it goes to the next provider at once, without asking the held one again."""
    a, b = servers["a"], servers["b"]
    eng = await make_engine([rtier("t", [prov("a", a), prov("b", b)], timeout_s=2,
                                   retry={"max_attempts": 3, "max_retry_after_s": 10})])
    a.faults("429:ra=5")
    first = await eng.run(Q, request_id="hold-1")
    assert [(x.backend, x.error_class) for x in first.record.attempts] == [("a", "RateLimitedError"), ("b", None)]
    held = eng.tiers["t"].backend.providers[0].held_for()
    assert 2.5 < held <= 5
    second = await eng.run(Q, request_id="hold-2")
    (att,) = second.record.attempts
    assert (att.backend, att.error_class, att.kept, att.wait_ms) == ("b", None, True, 0.0)
    assert att.latency_ms < 2000   # answered within the tier's time, not after a wait on the held provider
    assert seen(a) == 1 and seen(b) == 2


# --- a client that left a buffered answer ------------------------------------------------------------------


async def test_a_buffered_answer_left_before_it_went_out_is_all_waste(servers, make_engine, tmp_path):
    """A stream served by a buffered tier whose client leaves right after the first event got nothing: its row,
    committed as answered, is made a cancellation: no tier, and all its cost is escalation waste."""
    a, b = servers["a"], servers["b"]
    eng = await make_engine([plain("first", a), plain("second", b)])
    events = eng.stream(Q, request_id="left")
    start = await anext(events)
    assert type(start).__name__ == "StreamStart" and start.tier == "first"
    await events.aclose()
    deadline = time.monotonic() + 30
    while db_rows(tmp_path, "SELECT status FROM requests WHERE request_id = 'left'") != [("cancelled",)]:
        assert time.monotonic() < deadline, "the row was never made a cancellation"
        await asyncio.sleep(0.05)
    ((tier_, model, escalated, cost, waste, error_class),) = db_rows(
        tmp_path, "SELECT tier, model, escalated, cost_usd, escalation_waste_usd, error_class FROM requests "
                  "WHERE request_id = 'left'")
    assert (tier_, model, escalated, error_class) == (None, None, 0, "ClientDisconnected")
    assert cost == pytest.approx((9 * 1.0 + 4 * 2.0) / 1e6)
    assert waste == cost   # (copied by the correction: exactly equal)
    assert db_rows(tmp_path, "SELECT kept FROM attempts WHERE request_id = 'left'") == [(0,)]
    assert seen(b) == 0


# --- prices ------------------------------------------------------------------------------------------------


def test_cached_prompt_tokens_are_capped_at_the_prompt():
    price = Price(input_per_1m=1, output_per_1m=2, cached_input_per_1m=0.5)
    assert price.cost(10, 0, cached_tokens=50) == pytest.approx(10 * 0.5 / 1e6)
    assert price.cost(10, 3, cached_tokens=4) == pytest.approx((6 * 1 + 4 * 0.5 + 3 * 2) / 1e6)
    assert price.cost(10, 0, cached_tokens=-5) == pytest.approx(10 * 1 / 1e6)


# --- the last-tier-alone baseline ----------------------------------------------------------------------------


async def test_an_estimated_baseline_is_priced_as_the_last_tiers_first_provider_bills(servers, make_engine,
                                                                                       tmp_path):
    """A tier of providers may be priced on its providers only (``providers[].price``; the tier's own ``price``
    is their default). Its calls are billed at the provider's price, but where it did not run the baseline was
    estimated at the tier's own price, $0 when unset: every request an earlier tier kept cost "more than the
    last tier alone", and the report's savings went negative (a live server: -37% where they were +66%). Now
    the estimate uses the price its first provider bills, as a call of the tier would be billed."""
    a, b, c = servers["a"], servers["b"], servers["c"]
    dear = {"input_per_1m": 3.0, "output_per_1m": 5.0}
    last = {"name": "last", "providers": [prov("p1", b, price=dear), prov("p2", c)], "max_tokens": 4,
            "timeout_s": 5}
    eng = await make_engine([plain("first", a, threshold=0.0), last])
    kept = (await eng.run(Q, request_id="kept")).record
    assert [(x.tier, x.decision) for x in kept.attempts] == [("first", "accept")]
    assert kept.baseline_estimated
    assert kept.baseline_cost_usd == pytest.approx((9 * 3.0 + 4 * 5.0) / 1e6)
    # the same request where the last tier ran: its actual bill, at the same price
    ran = (await eng.run(Q, model="last", request_id="ran")).record
    assert ran.cost_usd == pytest.approx(kept.baseline_cost_usd)
    assert db_rows(tmp_path, "SELECT baseline_cost_usd, baseline_estimated FROM requests WHERE request_id = 'kept'"
                   ) == [(pytest.approx(kept.baseline_cost_usd), 1)]


async def test_an_estimated_baseline_prices_the_served_answers_tokens_not_the_first_attempts(servers, make_engine):
    """Where a middle tier's answer is kept, the last tier alone is estimated to have written an answer as long as
    that one (8 tokens here), not as long as the first tier's thrown-away answer (2)."""
    lo, long, c = servers["lo"], servers["long"], servers["c"]
    price = {"input_per_1m": 3.0, "output_per_1m": 5.0}
    eng = await make_engine([plain("first", lo, threshold=0.9, max_tokens=8), plain("mid", long, max_tokens=8),
                             plain("last", c, max_tokens=8, price=price)])
    rec = (await eng.run(GenerationRequest(messages=Q.messages, max_tokens=8))).record
    first, mid = rec.attempts
    assert (first.decision, mid.decision, mid.kept) == ("escalate", "accept", True) and seen(c) == 0
    assert first.completion_tokens != mid.completion_tokens == 8
    assert rec.baseline_estimated
    assert rec.baseline_cost_usd == pytest.approx((mid.prompt_tokens * 3.0 + 8 * 5.0) / 1e6)
