"""Shadow policies on a ledger produced by real traffic (tests/ops_traffic.py: a real server in front of
two SmolLM2 tiers, requests and feedback through HTTP)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from tests.conftest import tier
from tests.ops_traffic import HOT_T, HOT_TEMP, LENIENT_T, LIVE_T, STRICT_T, Traffic, traffic  # noqa: F401

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
    for rid in policy_rids:
        assert sorted(s for r, s in rows if r == rid) == ["hot", "large_only", "lenient", "strict"]


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
            assert status == "unknown" and stier is None and cost is None and div is None
            assert "needs tier 'large', which the live path did not run" in reason
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
    rec.attempts[1].error_class = "ProviderServerError"  # the shadow's last tier failed live: unknown
    assert evaluate_shadow(ShadowPolicy("s", "cascade", ("small", "large"), (0.99, 0.0)), rec, live)["status"] == "unknown"


def test_sampled_shadow_execution_is_refused_by_the_config(tmp_path):
    from cascade.errors import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="sampled shadow execution is not implemented"):
        make_config(tmp_path, [tier("a"), tier("b")], shadows={"s": {"of": "cascade", "sample_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"shadows.s.of: unknown policy 'nope'"):
        make_config(tmp_path, [tier("a")], shadows={"s": {"of": "nope"}})


def test_shadow_report_json(traffic, capsys):
    from cascade.cli import main

    assert main(["shadow", "report", "--json", "--config", str(traffic.config_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) == {"report", "since", "ledger", "generated_at", "shadows"}
    by = {s["shadow"]: s for s in rep["shadows"]}
    assert set(by) == {"hot", "large_only", "lenient", "strict"}
    keys = {"shadow", "of", "description", "requests", "known", "unknown", "unknown_rate", "unknown_reasons",
            "diverged", "divergence_rate", "live_cost_usd", "shadow_cost_usd", "cost_delta_usd", "cost_delta_pct",
            "live_escalation_rate", "shadow_escalation_rate", "escalation_rate_delta", "cheaper", "pricier",
            "served_feedback_known", "agreement_diverged", "groups"}
    for s in rep["shadows"]:
        assert set(s) == keys and s["of"] == "cascade"
        assert set(s["cheaper"]) == {"requests", "saved_usd", "feedback", "agreement"}
        assert set(s["cheaper"]["feedback"]) == {"n", "up", "neutral", "down", "mean_score"}
        assert set(s["cheaper"]["agreement"]) == {"n", "agree", "rate"}
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
    assert main(["shadow", "report", "--config", str(traffic.config_path), "--since", "1h"]) == 0
    text = capsys.readouterr().out
    assert "shadow 'lenient' of policy 'cascade': small threshold 0.4" in text and "divergence rate" in text
