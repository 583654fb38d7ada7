"""Shadow policies on a ledger produced by real traffic (tests/ops_traffic.py: a real server in front of
two SmolLM2 tiers, requests and feedback through HTTP)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest

from tests.conftest import make_config, tier
from tests.ops_traffic import (  # noqa: F401 - traffic is a fixture
    HOT_T,
    HOT_TEMP,
    LENIENT_T,
    LIVE_T,
    SAMPLE_CAP_USD,
    STRICT_T,
    Traffic,
    traffic,
)

ALL_SHADOWS = ["hot", "large_only", "large_only_capped", "lenient", "strict", "strict_sampled"]
LARGE_PRICE = (2.0, 6.0)  # tests/ops_traffic.py: the large tier's USD per million input/output tokens


async def settled(sampler: Any) -> None:
    """Wait (up to 30 s) until ``sampler`` (an engine's ShadowSampler) has no sample in flight."""
    import asyncio

    for _ in range(600):
        if not sampler.in_flight:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sample did not finish")


def remote(name: str, upstream: Any, price: tuple[float, float] = LARGE_PRICE, **kw: Any) -> dict[str, Any]:
    """A tier on a loopback OpenAI-compatible server (tests/fault_server.py), max_tokens 4, ``price`` USD per
    million input/output tokens."""
    return {"name": name, "backend": "openai", "model": "m", "max_tokens": 4, "options": {
        "base_url": upstream.base_url}, "price": {"input_per_1m": price[0], "output_per_1m": price[1]}, **kw}

def _attempts(t: Traffic) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with sqlite3.connect(t.ledger) as c:
        c.row_factory = sqlite3.Row
        for a in c.execute("SELECT * FROM attempts WHERE error_class IS NULL"):
            out.setdefault(a["request_id"], {})[a["tier"]] = dict(a)
    return out


# --- tests -----------------------------------------------------------------------------------------


def test_every_live_request_has_its_shadow_decisions(traffic):
    policy_rids = {r[0] for r in traffic.rows("SELECT request_id FROM requests WHERE policy = 'cascade'")}
    assert {s["request_id"] for s in traffic.sent if not s.get("pinned")} <= policy_rids
    rows = traffic.rows("SELECT request_id, shadow FROM shadow_decisions")
    assert {r[0] for r in rows} == policy_rids  # the pinned request has none
    paid = {r[0] for r in traffic.rows("SELECT request_id FROM requests WHERE user_tier = 'paid'")}
    for rid in policy_rids:
        # lenient_paid only looks at the paid user tier's requests
        assert sorted(s for r, s in rows if r == rid) == sorted(ALL_SHADOWS + ["lenient_paid"] * (rid in paid))


def test_lenient_shadow_diverges_exactly_where_its_threshold_keeps_the_small_answer(traffic):
    att = _attempts(traffic)
    rows = traffic.rows("SELECT s.request_id, s.status, s.tier, s.escalated, s.cost_usd, s.diverges, r.tier, "
                        "r.cost_usd FROM shadow_decisions s JOIN requests r USING (request_id) "
                        "WHERE s.shadow = 'lenient'")
    diverged = 0
    for rid, status, stier, sesc, scost, div, live_tier, live_cost in rows:
        small = att[rid]["small"]
        conf = small["confidence"]
        assert status == "known"  # the first tier always ran: a lower threshold costs nothing to evaluate
        expect = "small" if conf >= LENIENT_T else "large"
        assert stier == expect and sesc == (expect == "large")
        assert div == (expect != live_tier)
        if expect == "small":
            assert scost == pytest.approx(small["cost_usd"])  # the small attempt's actual tokens x price
        else:
            assert scost == pytest.approx(live_cost)
        if div:
            diverged += 1
            assert LENIENT_T <= conf < LIVE_T and live_tier == "large" and scost < live_cost
    assert diverged >= 1, "the traffic should hold answers between the two thresholds"


def test_strict_shadow_is_unknown_where_it_needs_the_tier_the_live_path_skipped(traffic):
    att = _attempts(traffic)
    rows = traffic.rows("SELECT s.request_id, s.status, s.tier, s.diverges, s.cost_usd, s.reason, r.tier "
                        "FROM shadow_decisions s JOIN requests r USING (request_id) WHERE s.shadow = 'strict'")
    unknown = 0
    for rid, status, stier, div, cost, reason, live_tier in rows:
        conf = att[rid]["small"]["confidence"]
        if LIVE_T <= conf < STRICT_T:  # live kept small; the shadow would escalate to a tier that never ran
            unknown += 1
            # its answer and cost are unknown, not that it diverges: it would serve large, the live path small
            assert status == "unknown" and stier is None and cost is None and div == 1
            assert reason == "needs tier 'large', which the live path did not run"  # sample_rate 0: no sample
        else:
            assert status == "known" and stier == live_tier and div == 0  # stricter never diverges when known
    assert unknown >= 1
    assert traffic.rows("SELECT COUNT(*) FROM shadow_decisions WHERE shadow = 'large_only' AND status = 'unknown'")[0][0] \
        == traffic.rows("SELECT COUNT(*) FROM requests WHERE policy = 'cascade' AND tier = 'small'")[0][0]


def test_shadow_calibrator_decides_from_the_recorded_features(traffic):
    from calibration.calibrators import TemperatureScaling

    cal = TemperatureScaling("mean_logprob", HOT_TEMP)
    att = _attempts(traffic)
    for rid, status, stier in traffic.rows("SELECT request_id, status, tier FROM shadow_decisions WHERE shadow = 'hot'"):
        small = att[rid]["small"]
        conf = cal.predict_one(json.loads(small["features"]))
        if conf >= HOT_T:
            assert (status, stier) == ("known", "small")
        elif "large" in att[rid]:
            assert (status, stier) == ("known", "large")
        else:
            assert status == "unknown"


def test_evaluate_shadow_is_pure_and_skips_other_policies():
    from calibration.calibrators import TemperatureScaling
    from cascade.shadow import ShadowPolicy, evaluate_shadow
    from cascade.types import Attempt, CascadeRecord

    rec = CascadeRecord(request_id="r1", policy="cascade", created_at=0.0, tier="large", escalated=True)
    rec.attempts = [Attempt(0, "small", "m", "transformers", cost_usd=1e-6, features={"mean_logprob": -0.1, "n_tokens": 3},
                            decision="escalate"),
                    Attempt(1, "large", "m", "transformers", cost_usd=5e-6, features={"mean_logprob": -0.5, "n_tokens": 3},
                            decision="final", kept=True)]
    live = {"small": TemperatureScaling(), "large": TemperatureScaling()}
    sh = ShadowPolicy("s", "cascade", ("small", "large"), (0.5, 0.0))
    row = evaluate_shadow(sh, rec, live)
    assert row == evaluate_shadow(sh, rec, live)
    assert row["status"] == "known" and row["tier"] == "small" and row["diverges"] and row["cost_usd"] == 1e-6
    assert evaluate_shadow(ShadowPolicy("s", "other", ("small",), (0.0,)), rec, live) is None
    rec.attempts[1].error_class = "ProviderServerError"  # the shadow's last tier failed live: as the engine
    strict = ShadowPolicy("s", "cascade", ("small", "large"), (0.99, 0.0))   # does, it serves the answer in hand
    row = evaluate_shadow(strict, rec, live)
    assert (row["status"], row["tier"], row["escalated"], row["cost_usd"]) == ("known", "small", False, 6e-6)
    assert "most confident answer in hand" in row["reason"] and "'large' failed on the live path" in row["reason"]
    assert evaluate_shadow(ShadowPolicy("s", "cascade", ("large",), (0.0,)), rec, live)["status"] == "unknown"
    # a tier the live path skipped for the cost budget: a shadow that spent as much by then skips it too
    rec.attempts[1] = Attempt(1, "large", "m", "transformers", decision="skipped", reason="cost budget")
    rec.tier, rec.escalated = "small", False
    same = evaluate_shadow(ShadowPolicy("s", "cascade", ("small", "large"), (0.99, 0.0)), rec, live)
    assert (same["status"], same["tier"], same["diverges"]) == ("known", "small", False)
    assert "the cost budget would skip 'large'" in same["reason"]
    alone = evaluate_shadow(ShadowPolicy("s", "cascade", ("large",), (0.0,)), rec, live)   # spent less: unknown
    assert alone["status"] == "unknown" and alone["needs"] == "large"
    # a shadow that spent less than the live path before the skipped tier (it skips a middle tier) may skip it too
    # and serve the same answer in hand: neither its divergence nor its escalation is certain
    rec.attempts = [Attempt(0, "small", "m", "transformers", cost_usd=1e-6, features={"mean_logprob": -0.1,
                                                                                     "n_tokens": 3},
                            decision="escalate"),
                    Attempt(1, "mid", "m", "transformers", cost_usd=4e-6, features={"mean_logprob": -0.2,
                                                                                   "n_tokens": 3},
                            decision="escalate"),
                    Attempt(2, "large", "m", "transformers", decision="skipped", reason="cost budget")]
    live["mid"] = TemperatureScaling()
    no_mid = evaluate_shadow(ShadowPolicy("s", "cascade", ("small", "large"), (0.99, 0.0)), rec, live)
    assert (no_mid["status"], no_mid["diverges"], no_mid["escalated"]) == ("unknown", None, None), no_mid
    rec.tier = "mid"  # the live path served its middle tier: the shadow (small or large) diverges for certain
    assert evaluate_shadow(ShadowPolicy("s", "cascade", ("small", "large"), (0.99, 0.0)), rec, live)["diverges"]


def test_a_shadow_whose_last_tier_failed_serves_its_most_confident_answer_in_hand():
    """Two answers in hand when the last tier fails: the shadow serves the more confident, as the engine does
    (temperature 1 on mean_logprob: small exp(-0.1) = 0.905 beats mid exp(-0.2) = 0.819), wherever it stands
    in the chain."""
    from calibration.calibrators import TemperatureScaling
    from cascade.shadow import ShadowPolicy, evaluate_shadow
    from cascade.types import Attempt, CascadeRecord

    def att(i: int, tier: str, ml: float | None) -> Attempt:
        if ml is None:
            return Attempt(i, tier, "m", "transformers", error_class="ProviderServerError", decision="error")
        return Attempt(i, tier, "m", "transformers", cost_usd=1e-6, features={"mean_logprob": ml, "n_tokens": 3},
                       decision="escalate")

    live = {t: TemperatureScaling() for t in ("small", "mid", "large")}
    for order in (("small", "mid"), ("mid", "small")):
        mls = {"small": -0.1, "mid": -0.2}
        rec = CascadeRecord(request_id="r", policy="cascade", created_at=0.0, tier="mid", escalated=True,
                            attempts=[att(0, order[0], mls[order[0]]), att(1, order[1], mls[order[1]]),
                                      att(2, "large", None)])
        row = evaluate_shadow(ShadowPolicy("s", "cascade", (*order, "large"), (0.99, 0.99, 0.0)), rec, live)
        assert (row["status"], row["tier"], row["diverges"]) == ("known", "small", True), row
        assert "(0.905)" in row["reason"]


def _shadow_attempts(t: Traffic, shadow: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    with sqlite3.connect(t.ledger) as c:
        c.row_factory = sqlite3.Row
        for a in c.execute("SELECT * FROM shadow_attempts WHERE shadow = ? ORDER BY idx", (shadow,)):
            out.setdefault(a["request_id"], []).append(dict(a))
    return out


def _price(a: dict[str, Any], price: tuple[float, float] = LARGE_PRICE) -> float:
    return (a["prompt_tokens"] * price[0] + a["completion_tokens"] * price[1]) / 1e6


def test_sampled_shadow_runs_the_skipped_tier_after_the_live_request(traffic):
    """strict_sampled (strict, sample_rate 1, ample budget) resolves every decision strict leaves unknown by
    really running the large tier in the background; its spend is shadow spend, the live records untouched."""
    att = _attempts(traffic)
    sampled_calls = _shadow_attempts(traffic, "strict_sampled")
    strict = {r[0]: r[1:] for r in traffic.rows("SELECT request_id, status, tier, cost_usd FROM shadow_decisions "
                                                 "WHERE shadow = 'strict'")}
    rows = traffic.rows("SELECT s.request_id, s.status, s.tier, s.escalated, s.cost_usd, s.diverges, s.reason, "
                        "s.sampled, s.sample_cost_usd, r.tier, r.created_at, r.latency_ms "
                        "FROM shadow_decisions s JOIN requests r USING (request_id) WHERE s.shadow = 'strict_sampled'")
    assert len(rows) == len(strict)
    n_sampled = 0
    for rid, status, stier, esc, cost, div, reason, sampled, sample_cost, live_tier, created, latency_ms in rows:
        s_status, s_tier, s_cost = strict[rid]
        assert status == "known"  # nothing left unknown: every skipped tier was run
        if s_status == "known":  # the live path had every tier it needed: nothing run, nothing spent
            assert (stier, cost, sampled, sample_cost) == (s_tier, pytest.approx(s_cost), 0, None)
            assert rid not in sampled_calls
            continue
        n_sampled += 1
        (call,) = sampled_calls[rid]  # one call of the one tier the shadow needed
        assert call["tier"] == "large" and call["error_class"] is None and call["decision"] == "final"
        assert call["completion_tokens"] >= 1 and call["answer_sig"] and json.loads(call["features"])["n_tokens"] >= 1
        # the sample's spend: its own token counts times the large tier's price
        assert call["cost_usd"] == pytest.approx(_price(call))
        assert sampled == 1 and sample_cost == pytest.approx(call["cost_usd"])
        assert stier == "large" and esc == 1 and div == 1 and live_tier == "small"
        assert cost == pytest.approx(att[rid]["small"]["cost_usd"] + call["cost_usd"])
        assert reason == "large: last tier always answers (sampled: large)"
        # the live request: only its own attempt, its own cost; the sample started after it had finished
        assert set(att[rid]) == {"small"}
        (n_att, live_cost), = traffic.rows("SELECT n_attempts, cost_usd FROM requests WHERE request_id = ?", rid)
        assert n_att == 1 and live_cost == pytest.approx(att[rid]["small"]["cost_usd"])
        assert call["created_at"] >= created + latency_ms / 1e3
    assert n_sampled == sum(1 for st in strict.values() if st[0] == "unknown") >= 1
    # sample_rate 0 (every other shadow) calls nothing
    assert {r[0] for r in traffic.rows("SELECT DISTINCT shadow FROM shadow_attempts")} == \
        {"strict_sampled", "large_only_capped"}
    # no shadow spend in the live accounting: every request costs exactly its own attempts
    assert traffic.rows("SELECT COUNT(*) FROM requests r WHERE ABS(r.cost_usd - (SELECT COALESCE(SUM(a.cost_usd), 0) "
                        "FROM attempts a WHERE a.request_id = r.request_id)) > 1e-12")[0][0] == 0


def test_sample_budget_stops_sampling_at_the_daily_cap(traffic):
    rows = traffic.rows("SELECT s.request_id, s.status, s.reason, s.sampled, s.sample_cost_usd, r.tier "
                        "FROM shadow_decisions s JOIN requests r USING (request_id) "
                        "WHERE s.shadow = 'large_only_capped'")
    calls = _shadow_attempts(traffic, "large_only_capped")
    sampled = [r for r in rows if r[3] == 1]
    refused = [r for r in rows if r[1] == "unknown"]
    assert len(sampled) >= 1 and len(refused) >= 1
    assert len(sampled) + len(refused) == sum(1 for r in rows if r[5] == "small")  # every small answer drawn
    for rid, status, reason, _, sample_cost, _ in sampled:
        assert status == "known" and sample_cost == pytest.approx(sum(c["cost_usd"] for c in calls[rid]))
    for rid, _, reason, flag, sample_cost, _ in refused:
        assert reason == ("needs tier 'large', which the live path did not run; not sampled: "
                          f"today's sample budget (${SAMPLE_CAP_USD:g}, UTC day) is spent")
        assert flag == 0 and sample_cost is None and rid not in calls
    # never over the budget, per UTC day, by the recorded calls' token counts x price
    spend = [_price(c) for cs in calls.values() for c in cs]
    assert 0 < sum(spend) <= SAMPLE_CAP_USD
    for day, total in traffic.rows("SELECT CAST(created_at / 86400 AS INTEGER), SUM(cost_usd) FROM shadow_attempts "
                                   "WHERE shadow = 'large_only_capped' GROUP BY 1"):
        assert total <= SAMPLE_CAP_USD


def test_user_tier_shadow_sees_only_its_user_tiers(traffic):
    got = dict(traffic.rows("SELECT s.request_id, s.tier FROM shadow_decisions s WHERE s.shadow = 'lenient_paid'"))
    paid = traffic.rows("SELECT request_id FROM requests WHERE policy = 'cascade' AND user_tier = 'paid'")
    assert set(got) == {r[0] for r in paid} and got
    lenient = dict(traffic.rows("SELECT request_id, tier FROM shadow_decisions WHERE shadow = 'lenient'"))
    assert all(lenient[rid] == t for rid, t in got.items())  # the same rule, on a subset of the traffic


def test_sampling_and_user_tier_config_errors(tmp_path):
    from cascade.errors import ConfigError

    two = [tier("a"), tier("b")]
    with pytest.raises(ConfigError, match=r"shadows\.s\.sample_budget_usd: must be above 0 when sample_rate is above 0"):
        make_config(tmp_path, two, shadows={"s": {"of": "cascade", "sample_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"shadows\.s\.sample_rate: Input should be less than or equal to 1"):
        make_config(tmp_path, two, shadows={"s": {"of": "cascade", "sample_rate": 2, "sample_budget_usd": 1}})
    ok = make_config(tmp_path, two, shadows={"s": {"of": "cascade", "sample_rate": 0.1, "sample_budget_usd": 0.5}})
    assert ok.shadows["s"].sample_budget_usd == 0.5
    with pytest.raises(ConfigError, match=r"shadows\.s\.user_tiers: unknown user tier 'gold'; user tiers are \['free'\]"):
        make_config(tmp_path, two, user_tiers={"free": {}}, shadows={"s": {"of": "cascade", "user_tiers": ["gold"]}})
    with pytest.raises(ConfigError, match=r"shadows.s.of: unknown policy 'nope'"):
        make_config(tmp_path, [tier("a")], shadows={"s": {"of": "nope"}})


def test_sample_draw_is_seeded_and_only_on_answered_requests(tmp_path):
    """Which decisions are sampled is a seeded draw per shadow (sample_seed): reproducible, at sample_rate."""
    from cascade.shadow import ShadowSampler, ShadowSet
    from cascade.types import Attempt, CascadeRecord, GenerationRequest

    cfg = make_config(tmp_path, [tier("a"), tier("b")], shadows={
        "s": {"of": "cascade", "chain": ["b"], "sample_rate": 0.3, "sample_budget_usd": 1, "sample_seed": 7}})
    shadows = ShadowSet(cfg, {})
    req = GenerationRequest(prompt="hi")

    def draws(sampler: ShadowSampler, status: str = "ok") -> list[bool]:
        out = []
        for i in range(300):
            rec = CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=0.0, tier="a", status=status)
            rec.attempts = [Attempt(0, "a", "m", "transformers", features={"n_tokens": 2.0}, decision="accept",
                                    kept=True)]
            rows = shadows.evaluate(rec)
            if status != "ok":  # a request that served no answer has nothing to compare: no row, no sample
                assert rows == [] and not sampler.select(shadows, rec, req, rows)
                out.append(False)
                continue
            picked = sampler.select(shadows, rec, req, rows)
            assert rows[0]["reason"].endswith("; sample pending") == bool(picked)
            out.append(bool(picked))
        return out

    first = draws(ShadowSampler(None, None))
    assert first == draws(ShadowSampler(None, None)) and 60 <= sum(first) <= 120  # same seed, same draw; ~30%
    for status in ("error", "cancelled"):  # refused, failed and cancelled requests are never evaluated
        assert not any(draws(ShadowSampler(None, None), status=status))


async def test_engine_close_waits_for_samples_or_records_them_cancelled(tmp_path):
    """A sample runs after run() has returned; close() lets it finish, or (past its grace) cancels it, and
    either way its decision is recorded."""
    from cascade.engine import Engine
    from cascade.shadow import ShadowSampler
    from cascade.types import GenerationRequest, Message

    cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1}),
                                 tier("large", max_tokens=4, options={"threads": 1},
                                      price={"input_per_1m": 2.0, "output_per_1m": 6.0})],
                      shadows={"big": {"of": "cascade", "chain": ["large"], "sample_rate": 1, "sample_budget_usd": 1}})

    def ask(q: str) -> GenerationRequest:
        return GenerationRequest(messages=(Message("user", q),))

    async with await Engine.open(cfg, preload=True) as eng:
        patient = eng.sampler
        eng.sampler = ShadowSampler(eng.call_tier, eng.ledger, grace_s=0.0)  # no time to finish
        cut = (await eng.run(ask("Name a colour."))).record
        await eng.sampler.close()
        eng.sampler = patient
        waited = (await eng.run(ask("Name a fruit."))).record
        assert eng.sampler.in_flight == 1  # run() returned with the sample still to run
    db = tmp_path / "ledger.sqlite"
    with sqlite3.connect(db) as c:
        dec = {r[0]: r[1:] for r in c.execute("SELECT request_id, status, reason, sampled, sample_cost_usd "
                                               "FROM shadow_decisions")}
        calls = c.execute("SELECT request_id, tier, error_class, cost_usd, prompt_tokens, completion_tokens "
                          "FROM shadow_attempts").fetchall()
    assert cut.tier == waited.tier == "small"
    status, reason, _, _ = dec[cut.request_id]
    assert status == "unknown" and reason.endswith("; sample cancelled: the engine shut down")
    assert all(err == "Cancelled" for rid, _, err, *_ in calls if rid == cut.request_id)
    status, reason, sampled, sample_cost = dec[waited.request_id]
    assert (status, sampled) == ("known", 1) and reason == "large: last tier always answers (sampled: large)"
    (call,) = [c for c in calls if c[0] == waited.request_id]
    assert call[1:3] == ("large", None) and call[3] == pytest.approx((call[4] * 2.0 + call[5] * 6.0) / 1e6)
    assert sample_cost == pytest.approx(call[3])


def test_shadow_report_json(traffic, capsys):
    from cascade.cli import main

    assert main(["shadow", "report", "--json", "--config", str(traffic.config_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) == {"report", "since", "ledger", "generated_at", "shadows"}
    by = {s["shadow"]: s for s in rep["shadows"]}
    assert set(by) == {*ALL_SHADOWS, "lenient_paid"}
    keys = {"shadow", "of", "description", "requests", "known", "unknown", "unknown_rate", "unknown_reasons",
            "diverged", "divergence_rate", "diverged_unknown", "divergence_rate_all", "live_escalation_rate_all",
            "shadow_escalation_rate_all", "live_cost_usd", "shadow_cost_usd", "cost_delta_usd", "cost_delta_pct",
            "live_escalation_rate", "shadow_escalation_rate", "escalation_rate_delta", "cheaper", "pricier",
            "served_feedback_known", "agreement_diverged", "groups", "sampled"}
    for s in rep["shadows"]:
        assert set(s) == keys and s["of"] == "cascade"
        assert set(s["cheaper"]) == {"requests", "saved_usd", "feedback", "agreement"}
        assert set(s["cheaper"]["feedback"]) == {"n", "up", "neutral", "down", "mean_score"}
        assert set(s["cheaper"]["agreement"]) == {"n", "agree", "rate"}
        assert set(s["sampled"]) == {"requests", "failed", "diverged", "divergence_rate", "live_cost_usd",
                                     "shadow_cost_usd", "cost_delta_usd", "spend_usd", "spend_today_usd",
                                     "held_today_usd", "sample_rate", "budget_usd", "budget_left_today_usd"}
    # the numbers agree with the ledger rows
    len_live = traffic.rows("SELECT COUNT(*) FROM requests WHERE policy = 'cascade'")[0][0]
    le = by["lenient"]
    (div, known, cheaper_saved) = traffic.rows(
        "SELECT SUM(s.diverges), COUNT(*), SUM(CASE WHEN s.diverges = 1 THEN r.cost_usd - s.cost_usd ELSE 0 END) "
        "FROM shadow_decisions s JOIN requests r USING (request_id) WHERE s.shadow = 'lenient' AND s.status = 'known'")[0]
    assert le["requests"] == len_live and le["known"] == known and le["diverged"] == div
    assert le["divergence_rate"] == pytest.approx(div / known)
    assert le["cheaper"]["requests"] == div and le["cheaper"]["saved_usd"] == pytest.approx(cheaper_saved)
    assert le["cost_delta_usd"] == pytest.approx(-cheaper_saved) and le["escalation_rate_delta"] < 0
    assert le["cheaper"]["feedback"]["n"] == div  # every request got feedback
    assert le["cheaper"]["agreement"]["n"] == div  # the small and the large answer are both in the ledger
    assert le["groups"] and le["groups"][0]["diverged"] >= 1 and le["groups"][0]["example_request_ids"]
    st = by["strict"]
    assert st["unknown"] >= 1 and st["diverged"] == 0 and "did not run" in st["unknown_reasons"][0]["reason"]
    assert st["sampled"]["requests"] == 0 and st["sampled"]["spend_usd"] == 0 and st["sampled"]["sample_rate"] == 0
    # the sampled shadow: what strict left unknown is known, diverging (it escalates), paid from its budget
    ss, ss_s = by["strict_sampled"], by["strict_sampled"]["sampled"]
    (n_smp, spend), = traffic.rows("SELECT COUNT(DISTINCT request_id), SUM(cost_usd) FROM shadow_attempts "
                                   "WHERE shadow = 'strict_sampled'")
    assert ss["unknown"] == 0 and ss["known"] == ss["requests"] == st["requests"]
    assert ss_s["requests"] == n_smp == st["unknown"] and ss_s["failed"] == 0
    assert ss_s["diverged"] == n_smp and ss["diverged"] == n_smp and ss_s["divergence_rate"] == 1.0
    assert ss_s["spend_usd"] == pytest.approx(spend) and ss_s["spend_today_usd"] == pytest.approx(spend)
    assert (ss_s["budget_usd"], ss_s["sample_rate"]) == (1.0, 1.0)
    assert ss_s["budget_left_today_usd"] == pytest.approx(1.0 - spend)
    assert ss_s["cost_delta_usd"] == pytest.approx(ss_s["shadow_cost_usd"] - ss_s["live_cost_usd"])
    assert ss_s["cost_delta_usd"] > 0
    assert ss["pricier"]["requests"] == n_smp and ss["escalation_rate_delta"] > 0
    # over all requests, strict's unknown ones diverge and escalate for certain: what sampling measured
    truth = ss["diverged"] / ss["requests"]
    assert st["diverged_unknown"] == st["unknown"] and st["divergence_rate_all"] == [pytest.approx(truth)] * 2
    assert st["shadow_escalation_rate_all"] == [pytest.approx(ss["shadow_escalation_rate"])] * 2
    assert st["live_escalation_rate_all"] == pytest.approx(ss["live_escalation_rate"])
    assert by["lenient"]["divergence_rate_all"] == [pytest.approx(le["divergence_rate"])] * 2  # nothing unknown
    assert ss["agreement_diverged"]["n"] == n_smp  # the sampled answers are compared with the served ones
    assert ss["groups"] and sum(g["sampled"] for g in ss["groups"]) == n_smp
    cap = by["large_only_capped"]["sampled"]
    assert 0 < cap["spend_today_usd"] <= SAMPLE_CAP_USD and cap["budget_usd"] == SAMPLE_CAP_USD
    assert any("sample budget" in r["reason"] for r in by["large_only_capped"]["unknown_reasons"])
    assert main(["shadow", "report", "--config", str(traffic.config_path), "--since", "1h"]) == 0
    text = capsys.readouterr().out
    assert "shadow 'lenient' of policy 'cascade': small threshold 0.4" in text and "divergence rate" in text
    block = text[text.index("shadow 'strict_sampled'"):]
    block = block[:block.find("\nshadow '", 1) if "\nshadow '" in block[1:] else len(block)]
    assert f"known {ss['known']} ({n_smp} by sampling), unknown 0" in block
    assert f"sampled          {n_smp} known by running tiers the live path skipped; diverged {n_smp} (100.0%)" in block
    assert f"today (UTC) ${spend:.6f} of $1.000000 budget (sample rate 100.0%)" in block


def test_shadow_report_on_a_named_ledger_reads_the_config_that_cascade_config_names(traffic, capsys, monkeypatch):
    """``--ledger L`` without ``--config``: the config named by $CASCADE_CONFIG (the default --config's help
    gives) still adds each shadow's description and sample rate; it was read only without --ledger."""
    from cascade.cli import main

    monkeypatch.setenv("CASCADE_CONFIG", str(traffic.config_path))
    assert main(["shadow", "report", "--json", "--ledger", str(traffic.ledger)]) == 0
    by = {s["shadow"]: s for s in json.loads(capsys.readouterr().out)["shadows"]}
    assert by["lenient"]["description"] == "small threshold 0.4", by["lenient"]
    assert by["strict_sampled"]["sampled"]["sample_rate"] == 1.0
    monkeypatch.delenv("CASCADE_CONFIG")  # no config at all: the ledger's numbers alone
    assert main(["shadow", "report", "--json", "--ledger", str(traffic.ledger)]) == 0
    by = {s["shadow"]: s for s in json.loads(capsys.readouterr().out)["shadows"]}
    assert by["lenient"]["description"] == "" and by["strict_sampled"]["sampled"]["sample_rate"] is None


def test_the_shadow_report_counts_a_requests_latest_feedback_only(tmp_path):
    """A user who changes their mind replaces their label (as recalibration and drift read it): one request
    with feedback -1, +1, +1 is one thumbs-up, not three votes."""
    from cascade.ledger import Ledger
    from cascade.reports import shadow_report
    from cascade.types import Attempt, CascadeRecord

    ledger = Ledger(tmp_path / "ledger.sqlite").open_sync()
    try:
        small = Attempt(index=0, tier="small", model="s", backend="transformers", cost_usd=1e-6, decision="escalate",
                        confidence=0.45, features={"mean_logprob": -0.5}, text="Lyon")
        large = Attempt(index=1, tier="large", model="l", backend="transformers", cost_usd=1e-5, decision="final",
                        kept=True, confidence=0.9, features={"mean_logprob": -0.1}, text="Paris")
        rec = CascadeRecord(request_id="r1", policy="cascade", created_at=time.time(), tier="large", escalated=True,
                            cost_usd=1.1e-5, attempts=[small, large])
        ledger.record_sync(rec, [{"shadow": "lenient", "status": "known", "tier": "small", "escalated": False,
                                  "cost_usd": 1e-6, "diverges": True, "reason": "small: accept"}])
        for score in (-1, 1, 1):
            ledger._feedback_sync("r1", score, None)
        (rep,) = shadow_report(ledger)["shadows"]
    finally:
        ledger.close_sync()
    assert rep["cheaper"]["requests"] == 1
    assert {k: rep["cheaper"]["feedback"][k] for k in ("n", "up", "down")} == {"n": 1, "up": 1, "down": 0}
    assert rep["served_feedback_known"]["n"] == 1


def test_a_samples_reservation_covers_every_provider_that_may_bill_it(tmp_path):
    """A sample of a tier with providers may be billed the prompt by each provider that times out before the
    last one answers: the reservation holds that too, so a day's budget cannot be overspent that way."""
    from types import SimpleNamespace

    from cascade.backends.openai_backend import OpenAIBackend
    from cascade.shadow import estimate_sample_cost
    from cascade.types import CascadeRecord, GenerationRequest, Message

    def prov(name, price):
        return {"name": name, "backend": "openai", "model": "m", "options": {"base_url": "http://127.0.0.1:1/v1"},
                "price": price}

    cheap, dear = {"input_per_1m": 1.0, "output_per_1m": 2.0}, {"input_per_1m": 3.0, "output_per_1m": 4.0}
    cfg = make_config(tmp_path, [{"name": "big", "providers": [prov("a", cheap), prov("b", dear), prov("c", cheap)],
                                  "price": cheap, "max_tokens": 10}])
    req = GenerationRequest(messages=(Message("user", "What is the capital of France?"),), max_tokens=10)
    backend = OpenAIBackend(model="m", name="big", base_url="http://127.0.0.1:1/v1")  # never started: no call
    tier_ = SimpleNamespace(config=cfg.tier("big"), backend=backend)
    prompt = backend.estimate_prompt_tokens(req)
    rec = CascadeRecord(request_id="r", policy="cascade", created_at=0.0)
    # the dearest provider answering in full, and the two others timing out first, each billed its prompt
    want = (prompt * 3.0 + 10 * 4.0) / 1e6 + 2 * prompt * 3.0 / 1e6
    assert estimate_sample_cost(tier_, req, rec) == pytest.approx(want)
    one = make_config(tmp_path, [{"name": "big", "providers": [prov("a", dear)], "price": cheap, "max_tokens": 10}])
    assert estimate_sample_cost(SimpleNamespace(config=one.tier("big"), backend=backend), req, rec) == pytest.approx(
        (prompt * 3.0 + 10 * 4.0) / 1e6)
    # a live attempt billed a longer prompt than the tier's own count (a provider's chat template): that one
    from cascade.types import Attempt

    rec.attempts = [Attempt(0, "small", "m", "openai", prompt_tokens=prompt + 500)]
    assert estimate_sample_cost(SimpleNamespace(config=one.tier("big"), backend=backend), req, rec) == pytest.approx(
        ((prompt + 500) * 3.0 + 10 * 4.0) / 1e6)


async def test_a_sample_keeps_to_the_requests_cost_budget(tmp_path):
    """A sampled shadow walks its chain under the cost budget the request ran under: a tier the budget would
    have skipped is not called (it used to be, spending shadow money on a call this user tier forbids and
    recording an outcome the shadow would never have had). With room in the budget it is sampled."""
    from cascade.engine import Budget, Engine
    from cascade.types import GenerationRequest, Message

    cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1}),
                                 tier("large", max_tokens=4, options={"threads": 1},
                                      price={"input_per_1m": 2000.0, "output_per_1m": 6000.0})],
                      shadows={"strict": {"of": "cascade", "thresholds": {"small": 1.0}, "sample_rate": 1,
                                          "sample_budget_usd": 10}})
    q = GenerationRequest(messages=(Message("user", "Name a colour."),))
    async with await Engine.open(cfg, preload=True) as eng:
        tight = (await eng.run(q, budget=Budget(cost_usd=0.01))).record
        ample = (await eng.run(q, budget=Budget(cost_usd=1.0))).record
    assert tight.tier == ample.tier == "small"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as c:
        dec = {r[0]: r[1:] for r in c.execute("SELECT request_id, status, sampled, reason FROM shadow_decisions")}
        called = {r[0] for r in c.execute("SELECT request_id FROM shadow_attempts")}
    status, sampled, reason = dec[tight.request_id]
    # the shadow would skip large, as the engine does, and serve the answer in hand: known, without a call
    assert status == "known" and not sampled and tight.request_id not in called
    assert "most confident answer in hand" in reason and "the cost budget would skip 'large'" in reason
    assert "(cost budget: tier 'large' could cost" in reason
    assert dec[ample.request_id][:2] == ("known", 1) and ample.request_id in called


async def test_a_sample_counts_what_the_shadows_earlier_tiers_spent_against_the_cost_budget(tmp_path):
    """The cost budget binds the shadow's whole chain: what its earlier tiers spent (here small's answer, at
    least 1 token at $0.001) counts before a sampled tier. large alone (4 tokens at $0.000875: $0.0035) fits a
    budget of $0.00404, small's spend and large together do not, so the shadow would skip large: not called."""
    from cascade.engine import Budget, Engine
    from cascade.types import GenerationRequest, Message

    cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1},
                                      price={"input_per_1m": 0.0, "output_per_1m": 1000.0}),
                                 tier("large", max_tokens=4, options={"threads": 1},
                                      price={"input_per_1m": 0.0, "output_per_1m": 875.0})],
                      shadows={"strict": {"of": "cascade", "thresholds": {"small": 1.0}, "sample_rate": 1,
                                          "sample_budget_usd": 10}})
    async with await Engine.open(cfg, preload=True) as eng:
        rec = (await eng.run(GenerationRequest(messages=(Message("user", "Name a colour."),)),
                             budget=Budget(cost_usd=0.00404))).record
    assert rec.tier == "small" and rec.cost_usd >= 0.001
    with sqlite3.connect(tmp_path / "ledger.sqlite") as c:
        status, sampled, reason = c.execute("SELECT status, sampled, reason FROM shadow_decisions").fetchone()
        calls = c.execute("SELECT COUNT(*) FROM shadow_attempts").fetchone()[0]
    assert (status, sampled, calls) == ("known", 0, 0), reason
    assert "the cost budget would skip 'large'" in reason


async def test_a_request_whose_client_left_before_its_answer_has_no_shadow_decision(tmp_path):
    """A request whose client left before its answer is made cancelled once its row is in, and its shadow
    decisions deleted, as for any request that answered nobody. Its sample ran on regardless: one whose call
    was in flight wrote its decision back beside the cancelled row (counted by the shadow report as a known
    outcome of an answered request), and one not yet started paid for a call with nothing to compare it with.
    Now a sample of a request no longer answered is not run, and one in flight writes its calls (their spend
    counts) but no decision."""
    import asyncio

    from cascade.engine import Engine, StreamStart
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServerThread
    from tests.test_ledger_durability import lock_for

    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1}),
                                     remote("large", upstream)],
                          shadows={"big": {"of": "cascade", "chain": ["large"], "sample_rate": 1,
                                           "sample_budget_usd": 1}})
        db = tmp_path / "ledger.sqlite"
        upstream.faults(delay_s=1.0)
        async with await Engine.open(cfg, preload=True) as eng:
            await eng.run(GenerationRequest(messages=(Message("user", "Name a fruit."),)), request_id="warm")
            await settled(eng.sampler)
            # a run cancelled while its row commits (another process holds the lock): its sample is not run
            holder = lock_for(db, 3.0)
            try:
                task = asyncio.create_task(eng.run(GenerationRequest(messages=(Message("user", "Name a colour."),)),
                                                   request_id="gone-at-commit"))
                while not eng.sampler.in_flight:  # answered: its row waits for the lock, its sample for the row
                    await asyncio.sleep(0.01)
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                await asyncio.to_thread(holder.wait, 30)
            await settled(eng.sampler)
            # a stream of an answer in hand left once its sample's call is in flight: the call is written, no decision
            events = eng.stream(GenerationRequest(messages=(Message("user", "Name an animal."),)),
                                request_id="gone-in-flight")
            assert isinstance(await events.__anext__(), StreamStart)
            for _ in range(200):
                with sqlite3.connect(db) as c:
                    if c.execute("SELECT 1 FROM spend_holds WHERE hold_id = 'gone-in-flight'").fetchall():
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the sample's call did not start")
            await events.aclose()
            await settled(eng.sampler)
        calls = upstream.stats()["requests"]
    with sqlite3.connect(db) as c:
        status = dict(c.execute("SELECT request_id, status FROM requests").fetchall())
        dec = {r[0] for r in c.execute("SELECT request_id FROM shadow_decisions")}
        paid = dict(c.execute("SELECT request_id, SUM(cost_usd) FROM shadow_attempts GROUP BY request_id").fetchall())
        (daily,) = c.execute("SELECT cost_usd FROM spend_daily WHERE bucket = ?", ('["shadow", "big"]',)).fetchone()
        left = c.execute("SELECT COUNT(*) FROM spend_holds").fetchone()[0]
    assert status == {"warm": "ok", "gone-at-commit": "cancelled", "gone-in-flight": "cancelled"}
    assert dec == {"warm"} and calls == 2 and set(paid) == {"warm", "gone-in-flight"}
    assert daily == pytest.approx(sum(paid.values())) and left == 0  # the call in flight was paid: it counts


async def test_a_sample_whose_write_failed_counts_until_its_day_ends_and_is_let_go(tmp_path):
    """A sample whose ledger write fails spent real money: it counts against the shadow's budget for the rest
    of its UTC day (its reservation stays in the ledger, for every replica), then no more; the sample itself
    (its request and record) is let go, not held for good. The failure is SQLite's own: a trigger refuses the
    sample's rows."""
    from cascade.engine import Engine
    from cascade.ledger import daily_spend, utc_day_start
    from cascade.shadow import ShadowSampler
    from cascade.types import GenerationRequest, Message

    cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1}),
                                 tier("large", max_tokens=4, options={"threads": 1},
                                      price={"input_per_1m": 2.0, "output_per_1m": 6.0})],
                      shadows={"big": {"of": "cascade", "chain": ["large"], "sample_rate": 1, "sample_budget_usd": 1}})
    db = tmp_path / "ledger.sqlite"
    now = [time.time()]

    async with await Engine.open(cfg, preload=True) as eng:
        sampler = eng.sampler = ShadowSampler(eng.call_tier, eng.ledger, clock=lambda: now[0])
        with sqlite3.connect(db) as c:
            c.execute("CREATE TRIGGER refuse BEFORE INSERT ON shadow_attempts BEGIN SELECT RAISE(ABORT, 'no'); END")
        lost = (await eng.run(GenerationRequest(messages=(Message("user", "Name a colour."),)))).record
        await settled(sampler)
        assert sampler._reserved["big"] == {}                 # the sample is let go
        with sqlite3.connect(db) as c:                        # its spend still counts today: its reservation
            (held,) = c.execute("SELECT amount_usd FROM spend_holds WHERE hold_id = ?", (lost.request_id,)).fetchall()
            c.execute("DROP TRIGGER refuse")
        assert held[0] > 0 and (await daily_spend(eng.ledger, utc_day_start(now[0]), [("shadow", "big")]))[0][1:] \
            == (held[0], 1)
        now[0] += 86400                                       # the next UTC day: no longer counted
        rec = (await eng.run(GenerationRequest(messages=(Message("user", "Name a fruit."),)))).record
        await settled(sampler)
        assert sampler._reserved["big"] == {}
        assert (await daily_spend(eng.ledger, utc_day_start(now[0]), [("shadow", "big")]))[0][1:] == (0.0, 0)
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT sampled FROM shadow_decisions WHERE request_id = ?", (rec.request_id,)).fetchone()
    assert row == (1,)


async def test_replicas_sharing_a_ledger_count_each_others_samples_in_flight(tmp_path):
    """Two engines on one ledger (two replicas): a sample in flight on one reserves its estimate in the ledger,
    so the other's sample that would take the shadow's daily budget past its cap is not run (each saw only its
    own reservations before, so N replicas could spend N times the budget); the reservation goes as the
    sample's spend is written."""
    import asyncio

    from cascade.engine import Engine
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        # every output token at $1, the prompt free: a sample of max_tokens 4 is estimated at exactly $4
        cfg = make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=4, options={"threads": 1}),
                                     remote("large", upstream, price=(0.0, 1e6))],
                          shadows={"big": {"of": "cascade", "chain": ["large"], "sample_rate": 1,
                                           "sample_budget_usd": 6}})
        db = tmp_path / "ledger.sqlite"
        upstream.faults(delay_s=1.5)
        async with await Engine.open(cfg, preload=True) as a, await Engine.open(cfg, preload=True) as b:
            first = (await a.run(GenerationRequest(messages=(Message("user", "Name a colour."),)))).record
            for _ in range(200):  # a's sample reserved its $4 in the ledger
                with sqlite3.connect(db) as c:
                    if c.execute("SELECT amount_usd FROM spend_holds").fetchall() == [(4.0,)]:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the reservation was not written")
            second = (await b.run(GenerationRequest(messages=(Message("user", "Name a fruit."),)))).record
            await settled(b.sampler)
            await settled(a.sampler)
        calls = upstream.stats()["requests"]
    with sqlite3.connect(db) as c:
        dec = {r[0]: r[1:] for r in c.execute("SELECT request_id, sampled, sample_cost_usd, reason "
                                               "FROM shadow_decisions")}
        spent = c.execute("SELECT SUM(cost_usd) FROM shadow_attempts").fetchone()[0]
        left = c.execute("SELECT COUNT(*) FROM spend_holds").fetchone()[0]
        total = c.execute("SELECT cost_usd FROM spend_daily WHERE bucket = ?", ('["shadow", "big"]',)).fetchall()
    assert dec[first.request_id][:2] == (1, 4.0)
    assert dec[second.request_id][0] == 0 and "not sampled: today's sample budget ($6, UTC day) is spent" \
        in dec[second.request_id][2]
    assert spent == 4.0 and left == 0 and calls == 1 and total == [(4.0,)]  # the day's total: what the budget reads


async def test_the_budget_left_today_is_what_the_reservations_of_unrecorded_samples_leave(tmp_path):
    """A sample's daily budget is checked against today's recorded samples and the reservations of those not
    recorded (in flight, or whose write failed: the money was spent), by any process. The shadow report's
    budget left counted the recorded only, promising more than a sample could spend: it is now what the
    check leaves, the reservations shown apart (``held_today_usd``). A failed write (a trigger refuses the
    sample's rows) leaves its reservation for the day; remote tiers on loopback servers."""
    from cascade.engine import Engine
    from cascade.ledger import Ledger, daily_spend, utc_day_start
    from cascade.reports import shadow_report, shadow_report_text
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServerThread

    db = tmp_path / "ledger.sqlite"
    with FaultServerThread() as small, FaultServerThread() as large:
        expensive = {"price": (2000.0, 6000.0), "timeout_s": 10}
        cfg = make_config(tmp_path, [remote("small", small, threshold=0.0, **expensive),
                                     remote("large", large, **expensive)],
                          shadows={"big": {"of": "cascade", "chain": ["large"], "sample_rate": 1,
                                           "sample_budget_usd": 1}})
        async with await Engine.open(cfg) as eng:
            q = GenerationRequest(messages=(Message("user", "Name a colour."),))
            await eng.run(q)  # recorded: today's spend
            await settled(eng.sampler)
            with sqlite3.connect(db) as c:
                c.execute("CREATE TRIGGER refuse BEFORE INSERT ON shadow_attempts BEGIN SELECT RAISE(ABORT, 'no'); END")
            await eng.run(q)  # its sample's write fails: its reservation stays
            await settled(eng.sampler)
            (spent, held, n), = await daily_spend(eng.ledger, utc_day_start(), [("shadow", "big")])
            reader = Ledger(db).open_sync()
            try:
                (rep,) = shadow_report(reader, shadows=dict(cfg.shadows))["shadows"]
            finally:
                reader.close_sync()
    sm = rep["sampled"]
    assert spent > 0 and held > 0 and n == 1
    assert sm["budget_left_today_usd"] == pytest.approx(1.0 - spent - held)  # (it was 1 - spent)
    assert sm["spend_today_usd"] == pytest.approx(spent) and sm["held_today_usd"] == pytest.approx(held)
    assert "held by samples not yet recorded" in shadow_report_text({"since": None, "ledger": "x", "shadows": [rep]})


async def test_a_stream_whose_write_timed_out_is_sampled_once_its_row_commits(tmp_path):
    """A stream's answer goes out before its row is written; a write that times out (another process holds the
    SQLite lock) stays queued and, committed later, is kept as served with its shadow decisions. Its sample was
    not run (the write had failed, as far as the sampler knew), and the decision kept its reason "...; sample
    pending" for good. The sample now waits for the write to settle, and runs once it is in."""
    import asyncio

    from cascade.engine import Engine, StreamEnd
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServerThread
    from tests.test_ledger_durability import lock_for

    db = tmp_path / "ledger.sqlite"
    with FaultServerThread() as upstream:
        cfg = make_config(tmp_path, [remote(n, upstream, model=n, timeout_s=10) for n in ("small", "large")],
                          {"cascade": {"chain": ["large"]}},
                          ledger={"path": str(db), "timeout_s": 0.5},
                          shadows={"cheap": {"of": "cascade", "chain": ["small"], "sample_rate": 1,
                                             "sample_budget_usd": 1}})
        async with await Engine.open(cfg) as eng:
            holder = lock_for(db, 2.0)
            try:
                events = [e async for e in eng.stream(GenerationRequest(messages=(Message("user", "Hi"),)),
                                                      request_id="late")]
            finally:
                await asyncio.to_thread(holder.wait, 30)
            assert isinstance(events[-1], StreamEnd)  # (its answer went out whole)
            await settled(eng.sampler)
        models = [r["model"] for r in upstream.stats()["log"]]
    with sqlite3.connect(db) as c:
        status, error = c.execute("SELECT status, error_class FROM requests WHERE request_id = 'late'").fetchone()
        reason, sampled, known = c.execute("SELECT reason, sampled, status FROM shadow_decisions "
                                           "WHERE request_id = 'late'").fetchone()
        calls = c.execute("SELECT tier FROM shadow_attempts WHERE request_id = 'late'").fetchall()
    assert (status, error) == ("ok", None)  # kept as served: the answer went out
    assert "sample pending" not in reason and (sampled, known) == (1, "known") and calls == [("small",)], reason
    assert models == ["large", "small"]


async def test_a_sample_keeps_to_the_requests_latency_budget(tmp_path):
    """A sampled shadow's call is cut short by the request's latency budget, as the live path's would be: a tier
    that answers only past it would have been cancelled there, and the shadow serves the answer in hand. It used
    to be given the tier's whole timeout_s, and recorded the late answer as the shadow's (a divergence the shadow
    could never have had, for a call the user tier forbids)."""
    from cascade.engine import Budget, Engine
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServer, FaultServerThread

    with FaultServerThread(FaultServer(answer="Sure: Paris.", logprob=-0.01)) as small, \
            FaultServerThread() as large:
        cfg = make_config(tmp_path, [remote("small", small, threshold=0.0), remote("large", large, timeout_s=10)],
                          shadows={"strict": {"of": "cascade", "thresholds": {"small": 1.0}, "sample_rate": 1,
                                              "sample_budget_usd": 10}})
        large.faults("slow:4")  # answers after 4 s: within the tier's timeout_s, past the caller's budget
        q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),))
        async with await Engine.open(cfg) as eng:
            rec = (await eng.run(q, budget=Budget(latency_s=2.0, on_latency="best_answer"))).record
            await settled(eng.sampler)
    assert rec.tier == "small"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as c:
        (status, shadow_tier, sampled, reason), = c.execute("SELECT status, tier, sampled, reason "
                                                            "FROM shadow_decisions")
        (tier_, error_class, latency_ms, cost), = c.execute("SELECT tier, error_class, latency_ms, cost_usd "
                                                            "FROM shadow_attempts")
    # the shadow's last tier ran out of the budget: it serves the answer in hand, as the engine would
    assert (status, shadow_tier, sampled) == ("known", "small", 1)
    assert "its last tier 'large' failed when sampled" in reason
    assert (tier_, error_class) == ("large", "ProviderTimeoutError") and 2000 <= latency_ms < 3500
    assert cost > 0  # the timed-out call is billed its prompt, as shadow spend


async def test_a_shadow_stops_where_a_best_answer_latency_budget_ran_out(tmp_path):
    """Under ``on_latency_budget: best_answer`` a tier that runs out of the budget ends the cascade with the
    answer in hand. A shadow walking the same tiers stops there too, whether the live path's call or its own
    sampled one ran out: it used to escalate past it, as past any failed tier, recording an outcome it needed
    the next tier for (unknown, diverging for certain) and paying a sample of that tier, whose answer it then
    called its own: a shadow that differs only in its last tier's threshold diverged from the live path."""
    import asyncio

    from cascade.engine import Budget, Engine
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServer, FaultServerThread

    chain = ["small", "medium", "large"]
    with FaultServerThread(FaultServer(answer="Maybe Lyon.", logprob=-2.0)) as small, \
            FaultServerThread() as medium, FaultServerThread() as large:
        cfg = make_config(
            tmp_path, [remote("small", small), remote("medium", medium, timeout_s=10), remote("large", large)],
            # the small tier's answer (confidence 0.135) escalates under 'cascade', is kept under 'lenient'
            policies={"cascade": {"chain": chain, "thresholds": {"small": 0.5}},
                      "lenient": {"chain": chain, "thresholds": {"small": 0.1}}},
            shadows={"same": {"of": "cascade", "thresholds": {"large": 0.9}, "sample_rate": 1, "sample_budget_usd": 10},
                     "strict": {"of": "lenient", "thresholds": {"small": 0.5}, "sample_rate": 1,
                                "sample_budget_usd": 10}})
        medium.faults("slow:4", "slow:4")  # within its timeout_s, past the caller's budget: live, then sampled
        q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),))
        budget = Budget(latency_s=2.0, on_latency="best_answer")
        async with await Engine.open(cfg) as eng:
            live, lenient = await asyncio.gather(eng.run(q, model="cascade", budget=budget),
                                                 eng.run(q, model="lenient", budget=budget))
            await settled(eng.sampler)
        assert large.stats()["requests"] == 0  # never called, live or sampled
    assert [(a.tier, a.error_class) for a in live.record.attempts] == [("small", None),
                                                                        ("medium", "ProviderTimeoutError")]
    assert live.record.tier == lenient.record.tier == "small"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as c:
        dec = {r[0]: r[1:] for r in c.execute("SELECT shadow, status, tier, diverges, sampled, reason "
                                              "FROM shadow_decisions")}
        calls = c.execute("SELECT shadow, tier, error_class FROM shadow_attempts").fetchall()
    # the live path's medium ran out: 'same' serves the small answer as the live path did, without a sample
    assert dec["same"][:4] == ("known", "small", 0, 0)
    assert dec["same"][4].endswith("because 'medium' exceeded the latency budget")
    # the sampled medium ran out: 'strict' serves the small answer it escalated from
    assert dec["strict"][:4] == ("known", "small", 0, 1)
    assert "because 'medium' exceeded the latency budget (sampled: medium)" in dec["strict"][4]
    assert calls == [("strict", "medium", "ProviderTimeoutError")]
