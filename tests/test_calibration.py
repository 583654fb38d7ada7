"""Calibrators, metrics and threshold search on synthetic data with known answers (no shared data needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from calibration import metrics
from calibration.calibrators import (
    HistogramBinning,
    IsotonicCalibrator,
    LogisticCalibrator,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    load_calibrator,
    make_calibrator,
    save_calibrator,
    score_to_logit,
    sigmoid,
)
from calibration.selection import cross_val_predict, kfold_indices, select_calibrator
from calibration.thresholds import (
    TierArrays,
    best_single_threshold,
    evaluate_grid,
    oracle_outcome,
    quality_lower_bound,
    run_policy,
    search_thresholds,
)
from cascade.errors import CascadeError, ConfigError


def _synthetic(n: int, t_true: float, seed: int = 0, a: float | None = None, b: float = 0.0):
    """Raw confidences as log-probabilities, and labels drawn from sigmoid(logit / T) (or a*logit + b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    score = -np.log1p(np.exp(-z))  # log sigmoid(z): the raw confidence log-probability
    eta = z / t_true if a is None else a * z + b
    y = (rng.random(n) < sigmoid(eta)).astype(float)
    return score, y


# --- calibrators -------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_temperature_scaling_recovers_known_temperature(t_true):
    score, y = _synthetic(40000, t_true, seed=1)
    t = TemperatureScaling("raw_conf_logprob").fit(score, y).temperature
    assert abs(t - t_true) / t_true < 0.05, (t, t_true)


def test_a_fit_at_its_bounds_or_ranking_backwards_is_reported():
    score, y = _synthetic(4000, 1.0, seed=5)
    assert TemperatureScaling().fit(score, y).fit_warnings() == []
    assert PlattScaling().fit(score, y).fit_warnings() == []
    cal = TemperatureScaling("mean_logprob").fit(score, 1.0 - y)  # a score that ranks backwards: T to its top
    assert cal.temperature > 99 and "top of its range" in cal.fit_warnings()[0]
    assert "mean_logprob" in cal.fit_warnings()[0]
    exact = (score > np.log(0.5)).astype(float)      # labels the score separates perfectly: T runs to 0.01
    assert "bottom of its range" in TemperatureScaling().fit(score, exact).fit_warnings()[0]
    backwards = PlattScaling().fit(score, 1.0 - y)  # a higher score, a lower chance of being right
    assert backwards.a < 0 and "does not rank answers" in backwards.fit_warnings()[0]


def test_labels_the_score_separates_with_a_gap_take_the_temperature_to_its_bottom():
    # no answer near the cut (logit of every score beyond +-3): below T = 3 / 27.6 every answer is at the NLL's
    # clip, the NLL flat; the fit must still end at the bottom of its range and say so, not at T ~ 0.11
    score, _ = _synthetic(4000, 1.0, seed=5)
    score = score[np.abs(score_to_logit(score)) > 3.0]
    exact = (score > np.log(0.5)).astype(float)
    cal = TemperatureScaling().fit(score, exact)
    assert cal.temperature == pytest.approx(TemperatureScaling.T_MIN)
    assert "bottom of its range" in cal.fit_warnings()[0]

def test_temperature_scaling_with_netcal_matches():
    pytest.importorskip("netcal")
    score, y = _synthetic(20000, 2.0, seed=2)
    ours = TemperatureScaling().fit(score, y).temperature
    theirs = TemperatureScaling().fit(score, y, use_netcal=True).temperature
    assert abs(theirs - 2.0) / 2.0 < 0.05
    assert abs(theirs - ours) / ours < 0.02


def test_platt_recovers_slope_and_bias_and_reduces_ece():
    score, y = _synthetic(40000, 1.0, seed=3, a=0.6, b=-0.8)
    cal = PlattScaling().fit(score, y)
    assert abs(cal.a - 0.6) < 0.03 and abs(cal.b + 0.8) < 0.05
    s2, y2 = _synthetic(20000, 1.0, seed=4, a=0.6, b=-0.8)
    assert metrics.ece(cal.predict(s2), y2) < 0.02 < metrics.ece(np.exp(s2), y2)


@pytest.mark.parametrize("cls", [IsotonicCalibrator, HistogramBinning])
def test_nonparametric_calibrators_monotone_and_reduce_ece(cls):
    score, y = _synthetic(20000, 1.0, seed=5, a=0.5, b=-1.0)
    cal = cls().fit(score, y)
    grid = np.linspace(-20, -1e-6, 500)
    pred = cal.predict(grid)
    assert np.all((pred >= 0) & (pred <= 1))
    assert np.all(np.diff(pred) >= -1e-9)  # non-decreasing in the raw confidence
    s2, y2 = _synthetic(20000, 1.0, seed=6, a=0.5, b=-1.0)
    raw, calibrated = metrics.ece(np.exp(s2), y2), metrics.ece(cal.predict(s2), y2)
    assert calibrated < 0.03 and calibrated < raw / 3


@pytest.mark.parametrize("score", [0.0, -0.5, -1e300])
def test_platt_on_a_score_with_one_value_has_no_slope_and_ranks_nothing(score):
    # every answer at one score (a provider that sends logprob 0, or all below the floor): no slope can be fit
    y = np.tile([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], 5)
    cal = PlattScaling().fit(np.full(y.size, score), y)
    assert cal.a == 0.0 and cal.fit_warnings()
    new = np.linspace(-5.0, 0.0, 50)
    assert np.all(cal.predict(new) == cal.predict([score])[0])
    assert metrics.auroc(cal.predict(new), new > -2.5) == 0.5  # not 0.0004 nor 0.9996 by a rounding's sign

def test_one_impossible_answer_does_not_turn_a_platt_fit_around():
    """Scores are floored at a probability of 1e-6: a right answer at a log-probability of -inf (or a provider's
    -9999) weighs as one at -13.8, not as an outlier that drags the slope flat or negative."""
    score, y = _synthetic(400, 1.0, seed=11)
    base = make_calibrator("platt", "mean_logprob").fit(score, y).params()["a"]
    for outlier in (-math.inf, -9999.0, -1e4):
        a = make_calibrator("platt", "mean_logprob").fit(np.r_[score, outlier], np.r_[y, 1.0]).params()["a"]
        assert 0.8 * base < a <= base, outlier  # (under a floor of -1e4 it fell to about 0)
    assert score_to_logit([-math.inf, -50.0, 0.0]).tolist() == pytest.approx(
        [math.log(1e-6 / (1 - 1e-6)), math.log(1e-6 / (1 - 1e-6)), math.log((1 - 1e-6) / 1e-6)])


def test_histogram_binning_is_monotone_above_its_top_score():
    """Many answers tied at the top score: a higher score than any seen gets the top bin, not the base rate."""
    rng = np.random.default_rng(4)
    s = np.r_[np.full(100, -0.05), rng.uniform(-3, -0.1, 100)]
    y = np.r_[rng.random(100) < 0.96, rng.random(100) < 0.3].astype(float)
    h = HistogramBinning(n_bins=10).fit(s, y)
    top = h.predict([-0.05])[0]
    assert top > 0.9 and h.predict([-0.04, -0.001]).tolist() == [top, top]
    assert math.isnan(h.predict([math.nan])[0])


def test_isotonic_shrinkage_pools_blocks_it_would_reorder():
    """A 2-answer block at 50% and a 100-answer block at 55%: shrinking the small one towards a high base rate
    lifts it above the large one; they are pooled, not the large one raised to the small one's value."""
    s = np.log(np.r_[np.full(2, 0.2), np.full(100, 0.5), np.full(100, 0.9)])
    y = np.r_[1, 0, np.ones(55), np.zeros(45), np.ones(100)].astype(float)
    iso = IsotonicCalibrator().fit(s, y)
    assert np.all(np.diff(iso.knots_y) >= 0) and iso.knots_y.size == 2
    prior = y.mean()
    # the pooled block: the two shrunk blocks' values averaged by their answers, near 55%, far below 59%
    shrunk = [(1 + prior) / 3, (55 + prior) / 101]
    assert iso.knots_y[0] == pytest.approx((shrunk[0] * 2 + shrunk[1] * 100) / 102)
    assert iso.knots_y[0] < 0.56


def test_equal_mass_ece_does_not_depend_on_the_order_of_tied_rows():
    rng = np.random.default_rng(5)
    p = np.round(rng.uniform(0, 1, 300), 1)  # heavy ties, as histogram binning's few distinct outputs
    y = (rng.random(300) < p).astype(float)
    values = {round(metrics.ece(p[o], y[o], strategy="quantile"), 12)
              for o in (rng.permutation(300) for _ in range(20))}
    by_label = np.lexsort((y, p))
    values.add(round(metrics.ece(p[by_label], y[by_label], strategy="quantile"), 12))
    assert len(values) == 1
    half = np.full(30, 0.5)
    assert metrics.ece(half, np.r_[np.zeros(15), np.ones(15)], strategy="quantile") == 0.0 == metrics.ece(
        half, np.tile([0.0, 1.0], 15), strategy="quantile")


def _equal_mass_bins_reference(p: np.ndarray, n_bins: int) -> np.ndarray:
    """The bin of every row, one distinct value at a time: sorted position i belongs to bin i * n_bins // n, and
    a run of tied values goes whole to the bin of its middle position (the lower middle of an even run)."""
    n = p.size
    out = np.empty(n, dtype=int)
    pos = 0
    for v in sorted(set(p.tolist())):
        rows = [i for i in range(n) if p[i] == v]
        mid = pos + (len(rows) - 1) // 2
        out[rows] = min(mid * n_bins // n, n_bins - 1)
        pos += len(rows)
    return out


def test_equal_mass_bins_split_by_rank_and_keep_a_tied_run_in_the_bin_of_its_middle():
    # five distinct values in two bins: ranks 0-2 and 3-4 (not 0-1 and 2-4)
    b = metrics.reliability_bins([0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1], n_bins=2, strategy="quantile")
    assert b["count"].tolist() == [3.0, 2.0]
    assert metrics.ece([0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1], n_bins=2, strategy="quantile") == pytest.approx(
        0.6 * abs(0.2 - 1 / 3) + 0.4 * abs(0.45 - 1.0))
    # a run of three ties at ranks 2-4 straddles the two bins: its middle rank, 3, puts all of it in the upper one
    b = metrics.reliability_bins([0.5, 0.1, 0.5, 0.9, 0.15, 0.5], [1, 0, 0, 1, 0, 1], n_bins=2, strategy="quantile")
    assert b["count"].tolist() == [2.0, 4.0]
    assert b["confidence"].tolist() == pytest.approx([0.125, 0.6]) and b["accuracy"].tolist() == [0.0, 0.75]
    rng = np.random.default_rng(3)
    for n, n_bins in ((10, 3), (37, 15), (200, 7), (64, 10)):
        p = np.round(rng.uniform(0, 1, n), 1)  # ties everywhere
        y = (rng.random(n) < p).astype(float)
        ref = _equal_mass_bins_reference(p, n_bins)
        b = metrics.reliability_bins(p, y, n_bins, "quantile")
        assert b["count"].tolist() == np.bincount(ref, minlength=n_bins).astype(float).tolist()
        gaps = [abs(p[ref == k].mean() - y[ref == k].mean()) * (ref == k).sum() / n for k in range(n_bins)
                if (ref == k).any()]
        assert metrics.ece(p, y, n_bins, "quantile") == pytest.approx(sum(gaps))


def test_histogram_bins_and_isotonic_shrinkage():
    score, y = _synthetic(3000, 1.0, seed=7)
    h = HistogramBinning(n_bins=5).fit(score, y)
    assert h.edges.size == 4 and h.probs.size == 5
    assert len(np.unique(h.predict(score))) == 5
    iso = IsotonicCalibrator().fit(score, y)
    p = iso.predict(score)
    assert 0 < p.min() and p.max() < 1  # never exactly 0 or 1 thanks to the prior pseudo-answers


def test_logistic_calibrator_uses_extra_features():
    rng = np.random.default_rng(8)
    z = rng.normal(0, 2, 20000)
    agree = (rng.random(20000) < 0.5).astype(float)
    y = (rng.random(20000) < sigmoid(0.8 * z + 1.5 * agree - 0.5)).astype(float)
    cal = LogisticCalibrator(feature="conf_logit", features=["conf_logit", "agree_prev"], l2=1e-4)
    cal.fit(np.column_stack([z, agree]), y)
    assert abs(cal.coef[0] - 0.8) < 0.06 and abs(cal.coef[1] - 1.5) < 0.12 and abs(cal.intercept + 0.5) < 0.1
    assert cal.predict_one({"conf_logit": 0.0, "agree_prev": 1.0}) == pytest.approx(sigmoid(np.array(1.0)), abs=0.05)
    with pytest.raises(KeyError):
        cal.predict_one({"conf_logit": 0.0})


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic", "histogram", "histogram:5", "logistic"])
def test_artifact_round_trip(method, tmp_path):
    score, y = _synthetic(2000, 1.7, seed=9)
    cal = make_calibrator(method, "raw_conf_logprob")
    cal.fit(score, y)
    cal.fitted_on = {"data": "synthetic", "model": "m", "n": 2000, "date": "2026-11-27T00:00:00+00:00"}
    cal.metrics = {"ece": 0.01}
    path = save_calibrator(cal, tmp_path / f"{method.replace(':', '_')}.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "cascade-engine/calibrator" and doc["version"] == 1
    assert doc["method"] == method.split(":")[0] and doc["fitted_on"]["n"] == 2000
    back = load_calibrator(path)
    assert type(back) is type(cal)
    assert back.fitted_on == cal.fitted_on and back.metrics == cal.metrics
    probe = np.linspace(-12, 0, 101)
    np.testing.assert_allclose(back.predict(probe), cal.predict(probe), rtol=0, atol=1e-12)
    assert back.predict_one({"raw_conf_logprob": -0.3}) == pytest.approx(float(cal.predict([-0.3])[0]))


def test_artifact_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown calibrator method"):
        calibrator_from_dict({"format": "cascade-engine/calibrator", "version": 1, "method": "nope"})
    for method in (["platt"], {"name": "platt"}):  # a ValueError as every other fault, not "unhashable type"
        with pytest.raises(ValueError, match="unknown calibrator method"):
            calibrator_from_dict({"format": "cascade-engine/calibrator", "version": 1, "method": method,
                                  "params": {"a": 1.0, "b": 0.0}})
    with pytest.raises(ValueError, match="newer"):
        calibrator_from_dict({"format": "cascade-engine/calibrator", "version": 99, "method": "platt"})
    with pytest.raises(ValueError, match="histogram:N"):
        make_calibrator("platt:3")
    with pytest.raises(ValueError):
        HistogramBinning(edges=[0.0, 0.0], probs=[0.1, 0.2, 0.3])


def test_package_import_is_numpy_only():
    code = ("import sys, calibration, calibration.calibrators, calibration.metrics, calibration.thresholds, "
            "calibration.selection, calibration.data, calibration.replay, calibration.cli, calibration.plots; "
            "bad = [m for m in ('scipy', 'sklearn', 'netcal', 'matplotlib', 'torch') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- selection ---------------------------------------------------------------------------------------


def test_selection_prefers_platt_when_bias_is_needed():
    score, y = _synthetic(3000, 1.0, seed=10, a=1.0, b=-1.5)  # right slope, wrong bias
    sel = select_calibrator(score, y, ["temperature", "platt"], criterion="nll", k=5)
    assert sel.method == "platt" and sel.scores["platt"] < sel.scores["temperature"]
    assert sel.folds == 5 and isinstance(sel.calibrator, PlattScaling)
    folds = kfold_indices(103, 5, seed=0, strata=y[:103])
    assert sorted(np.concatenate(folds).tolist()) == list(range(103))
    oof = cross_val_predict("platt", score[:500], y[:500])
    assert oof.shape == (500,) and np.all((oof > 0) & (oof < 1))


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    p = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    # bins of width 1/15: 0.1 -> bin 1, 0.35 and 0.4 -> bin 5, 0.8 -> bin 11
    assert metrics.ece(p, y) == pytest.approx(0.25 * 0.1 + 0.5 * abs(0.375 - 0.5) + 0.25 * 0.2)
    assert metrics.mce(p, y) == pytest.approx(0.2)
    # two equal-mass bins: {0.1, 0.35} and {0.4, 0.8}
    assert metrics.ece(p, y, n_bins=2, strategy="quantile") == pytest.approx(0.5 * 0.275 + 0.5 * 0.1)
    assert metrics.brier(p, y) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert metrics.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))
    assert metrics.auroc(p, y) == pytest.approx(0.75)
    assert metrics.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(metrics.auroc([0.2, 0.3], [1, 1]))
    assert metrics.ece([1.0, 1.0, 0.0], [1, 1, 0]) == 0.0
    s = metrics.summary(p, y)
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["ece"] == pytest.approx(0.1375)
    with pytest.raises(ValueError):
        metrics.ece([0.1], [1, 0])


# --- threshold search ----------------------------------------------------------------------------------


def _two_tier_known_optimum(n: int = 1000, seed: int = 11):
    rng = np.random.default_rng(seed)
    right = rng.random(n) < 0.6
    # the first tier is right exactly when its score is in [0.6, 1], wrong when in [0, 0.4]
    score = np.where(right, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    first = TierArrays("small", score, right.astype(float), np.full(n, 1.0))
    last = TierArrays("big", np.zeros(n), np.ones(n), np.full(n, 10.0))
    return first, last, right


def test_threshold_search_finds_known_optimum():
    first, last, right = _two_tier_known_optimum()
    # a grid as fine as the data (every score a candidate), so the optimum is exact
    res = search_thresholds([first, last], max_quality_drop=0.005, confidence=0.9, n_boot=200, grid_size=1001)
    assert res.verdict == "cascade"
    t = res.thresholds[0]
    n = right.size
    # The margin allows L wrong acceptances while L + z*sqrt(L+1) <= 0.005*n = 5, i.e. L <= 2: the optimum
    # accepts every right answer (all scored above the wrong ones) and at most the two best-scored wrong ones.
    wrong_scores = np.sort(first.score[~right])[::-1]
    assert wrong_scores[2] < t <= first.score[right].min() + 1e-12
    n_wrong_accepted = int((wrong_scores >= t).sum())
    assert n_wrong_accepted <= 2
    # every question pays the small tier; the escalated ones pay the big tier too (double cost)
    expected_cost = (n * 1.0 + 10.0 * ((~right).sum() - n_wrong_accepted)) / n
    assert res.cost == pytest.approx(expected_cost)
    assert res.cost_ratio == pytest.approx(expected_cost / 10.0)
    assert res.quality == pytest.approx(1.0 - n_wrong_accepted / n)
    # with no margin at all (z = 0) the search may accept exactly five wrong answers, no more
    loose = search_thresholds([first, last], max_quality_drop=0.005, confidence=0.5, n_boot=0, grid_size=1001)
    assert int((wrong_scores >= loose.thresholds[0]).sum()) <= 5 and loose.cost <= res.cost
    iv = res.intervals
    assert iv["escalation_rate"]["low"] <= (~right).mean() <= iv["escalation_rate"]["high"]
    assert iv["cost_ratio"]["low"] <= res.cost_ratio <= iv["cost_ratio"]["high"]
    # the in-sample anchor agrees, and the oracle pays both tiers exactly for the wrong answers
    anchor = best_single_threshold(first.score, first, last, 0.005)
    assert anchor["saves"] and anchor["cost_ratio"] <= res.cost_ratio + 1e-12
    orc = oracle_outcome(first, last)
    assert orc.mean_cost == pytest.approx((n + 10.0 * (~right).sum()) / n) and orc.quality == 1.0


def test_threshold_search_budget_objective():
    first, last, right = _two_tier_known_optimum()
    # a budget of 3 per request: at most 20% escalations (1 + 10 * 0.2 = 3)
    res = search_thresholds([first, last], objective="budget", cost_budget=3.0, grid_size=200)
    assert res.verdict == "cascade" and res.cost <= 3.0 + 1e-9
    out = run_policy([first, last], res.thresholds)
    assert out.mean_cost <= 3.0 + 1e-9 and (out.stop == 1).mean() <= 0.2 + 1e-9
    with pytest.raises(ConfigError):
        search_thresholds([first, last], objective="budget", cost_budget=0.5)


def test_budget_objective_is_the_last_tier_alone_when_it_fits_and_is_better():
    """"The best quality within the budget": a cheaper, worse cascade does not win over the last tier alone that
    fits the budget too (it did whenever that cascade cost less)."""
    rng = np.random.default_rng(0)
    n = 1000
    cheap, strong = (rng.random(n) < 0.5).astype(float), (rng.random(n) < 0.9).astype(float)
    tiers = [TierArrays("a", rng.random(n), cheap, np.full(n, 1.0)),
             TierArrays("b", np.zeros(n), strong, np.full(n, 10.0))]
    for budget in (10.0, 10.5):  # exactly the last tier's cost, and more
        res = search_thresholds(tiers, objective="budget", cost_budget=budget, n_boot=0)
        assert res.verdict == "direct" and res.quality == pytest.approx(strong.mean()), budget
    res = search_thresholds(tiers, objective="budget", cost_budget=5.0, n_boot=0)  # it does not fit: a cascade
    assert res.verdict == "cascade" and res.cost <= 5.0


def test_cost_slack_never_reaches_past_the_last_tier_alone():
    """With cost_slack, the candidates within that margin of the cheapest are ranked by their lower bound; one
    dearer than the last tier alone is not among them (it turned a feasible cascade into `direct`)."""
    rng = np.random.default_rng(0)
    n = 2000
    s = rng.permutation(np.arange(n) / n)
    strong = (rng.random(n) < 0.7).astype(float)
    cheap = np.where(s >= 0.88, strong, 0.0)  # the cheap tier agrees with the strong one on its top 12%
    i_top = np.argmax(s)
    strong[i_top], cheap[i_top] = 0.0, 1.0  # one gain at the very top score
    i_band = np.flatnonzero((s > 0.96) & (s < 0.99))[0]
    strong[i_band], cheap[i_band] = 1.0, 0.0  # one loss
    tiers = [TierArrays("a", s, cheap, np.full(n, 0.1)), TierArrays("b", np.zeros(n), strong, np.full(n, 10.0))]
    plain = search_thresholds(tiers, max_quality_drop=0.005, n_boot=0)
    slack = search_thresholds(tiers, max_quality_drop=0.005, n_boot=0, cost_slack=0.2)
    assert plain.verdict == slack.verdict == "cascade" and slack.cost < slack.reference_cost


def test_threshold_search_verdict_direct_when_small_tier_is_too_weak():
    rng = np.random.default_rng(12)
    n = 800
    first = TierArrays("weak", rng.random(n), (rng.random(n) < 0.3).astype(float), np.full(n, 1.0))
    last = TierArrays("strong", np.zeros(n), np.ones(n), np.full(n, 10.0))
    res = search_thresholds([first, last], max_quality_drop=0.005)
    assert res.verdict == "direct" and res.thresholds == [None]
    assert res.cost_ratio == 1.0 and res.reason
    assert best_single_threshold(first.score, first, last, 0.005)["saves"] is False
    free = TierArrays("strong", np.zeros(n), np.ones(n), np.zeros(n))  # nothing is cheaper than a free tier
    anchor = best_single_threshold(first.score, first, free, 0.005)
    assert anchor["saves"] is False and anchor["threshold"] is None and np.isnan(anchor["cost_ratio"])


def test_threshold_search_verdict_direct_when_escalations_cost_more_than_they_save():
    rng = np.random.default_rng(13)
    n = 800
    right = rng.random(n) < 0.9
    score = np.where(right, rng.uniform(0.5, 1, n), rng.uniform(0, 0.5, n))
    # the small tier costs as much as the strong one: any escalation pays twice
    first = TierArrays("small", score, right.astype(float), np.full(n, 10.0))
    last = TierArrays("strong", np.zeros(n), np.ones(n), np.full(n, 10.0))
    res = search_thresholds([first, last], max_quality_drop=0.005)
    assert res.verdict == "direct"


def test_run_policy_accounts_double_cost_on_three_tiers():
    t1 = TierArrays("a", np.array([0.9, 0.2, 0.1]), np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]))
    t2 = TierArrays("b", np.array([0.0, 0.8, 0.3]), np.array([0.0, 1.0, 0.0]), np.array([3.0, 3.0, 3.0]))
    t3 = TierArrays("c", np.zeros(3), np.array([1.0, 1.0, 1.0]), np.array([10.0, 10.0, 10.0]))
    out = run_policy([t1, t2, t3], [0.5, 0.5])
    assert out.stop.tolist() == [0, 1, 2]
    assert out.cost.tolist() == [1.0, 4.0, 14.0]
    assert out.correct.tolist() == [1.0, 1.0, 1.0]
    res = search_thresholds([t1, t2, t3], max_quality_drop=0.9, confidence=0.5, n_boot=50)
    assert res.verdict == "cascade" and len(res.thresholds) == 2


def test_an_empty_answer_is_never_accepted_by_search_or_replay():
    # the engine escalates an answer with no tokens whatever its confidence: the search and the replay agree
    n = 400
    rng = np.random.default_rng(5)
    right = rng.random(n) < 0.7
    score = np.where(right, rng.uniform(0.6, 1, n), rng.uniform(0, 0.6, n))
    answered = np.ones(n, dtype=bool)
    answered[:50] = False  # empty answers, scored as sure as can be, and wrong
    score[:50], right[:50] = 1.0, False
    first = TierArrays("small", score, right.astype(float), np.full(n, 1.0), answered)
    last = TierArrays("big", np.zeros(n), np.ones(n), np.full(n, 10.0))
    out = run_policy([first, last], [0.0])  # accept everything that can be accepted
    assert (out.stop[:50] == 1).all() and (out.stop[50:] == 0).all()
    res = search_thresholds([first, last], max_quality_drop=0.5, confidence=0.5)
    replayed = run_policy([first, last], res.thresholds)
    assert res.quality == pytest.approx(replayed.correct.mean()) and res.cost == pytest.approx(replayed.cost.mean())
    assert (replayed.stop[:50] == 1).all()


def test_the_replay_anchor_never_accepts_an_empty_answer(tmp_path):
    """The in-sample anchor is a single threshold of the first tier, which the engine and the policy apply to
    answered questions only. It read empty answers as acceptable: five sure, empty and wrong answers on top of
    the scores kept it from accepting anything (saves: false, so a benchmark said the direct verdict beat it)."""
    from calibration.data import load_cascade_outputs
    from calibration.replay import ReplayConfig, replay

    def write(split: str, empty: int):
        rows = []
        for i in range(60):
            right = i % 3 != 2
            m1 = {"answer": "A" if right else "B", "correct": right, "cost_usd": 1e-6,
                  "raw_conf_logprob": -0.05 - 0.02 * i - (0.0 if right else 1.0)}
            if i < empty:
                m1.update(answer="", correct=False)
            m2 = {"answer": "A", "correct": True, "raw_conf_logprob": -0.1, "cost_usd": 1e-4}
            rows.append({"dataset": "t", "split": split, "idx": i, "user_prompt": f"{split} {i}",
                         "models": {"m1": m1, "m2": m2}})
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_cascade_outputs(tmp_path / f"{split}.jsonl")

    train, test = write("train", 0), write("test", 5)
    rep, _ = replay(train, test, ["m1", "m2"], ReplayConfig(cv_guard=False))
    a = rep["anchor_in_sample"]
    first = test.tier("m1")
    assert a["saves"] and a["quality"] == 1.0, a
    taken = first.acceptable & (first.logprob >= a["threshold"] - 1e-6)  # the report rounds to 6 places
    assert a["accepted"] == int(taken.sum()) and not taken[:5].any()
    assert a["cost_ratio"] == pytest.approx(1 + (first.cost.sum() - test.tier("m2").cost[taken].sum()) / 60e-4)


def test_ids_without_a_split_are_not_taken_for_the_same_questions_when_the_prompts_differ(tmp_path):
    """``idx`` numbers the questions of one split, and a train and a test file both count from 0: with no split
    on their lines nor in their names (train.jsonl, test.jsonl), every test question had the id of a training
    one (dataset t, split unknown, idx), and a valid pair was refused as the same questions. The prompts tell
    them apart; a copy is still one, and so are ids with no prompt to go by."""
    from calibration.data import check_disjoint, load_cascade_outputs
    from cascade.errors import DataError

    def write(name: str, prompts: bool = True):
        rows = [{"dataset": "t", "idx": i, **({"user_prompt": f"{name} question {i}"} if prompts else {}),
                 "models": {m: {"answer": "A", "correct": i % 2 == 0, "raw_conf_logprob": -0.5, "cost_usd": 1e-5}
                            for m in ("m1", "m2")}} for i in range(20)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_cascade_outputs(tmp_path / f"{name}.jsonl")

    train, test = write("train"), write("test")
    assert check_disjoint(train, test) is None
    (tmp_path / "copy.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    with pytest.raises(DataError, match="20 of the 20 questions .*[(]same question id and prompt"):
        check_disjoint(train, load_cascade_outputs(tmp_path / "copy.jsonl"))
    with pytest.raises(DataError, match="20 of the 20 questions .*[(]same question id\\)"):  # nothing else to go by
        check_disjoint(write("a", prompts=False), write("b", prompts=False))


def test_a_threshold_on_a_tied_score_accepts_it_with_room_to_spare():
    """Many answers share one calibrated value (every top-confidence answer does): a threshold found at that value
    accepted them by the last bit of the arithmetic (a recomputation 1e-13 lower accepted none of them). Thresholds
    sit just below their score now, never as far as the next lower one, so the same answers are accepted."""
    from calibration.thresholds import threshold_grid

    rng = np.random.default_rng(3)
    top = 0.9304725102931801
    score = np.concatenate([np.full(95, top), rng.uniform(0.2, 0.9, 55), [top - 1e-12]])
    grid = threshold_grid(score, 20)
    for t in grid:
        q = score[score >= t].min()  # the lowest score a threshold accepts: the value it was found at
        assert t < q and (score >= t).sum() == (score >= q).sum()
        assert (score * (1 - 1e-13) >= t).sum() == (score >= t).sum()  # the same under a last-bit difference
    right = score > 0.5
    first = TierArrays("small", score, right.astype(float), np.full(score.size, 1.0))
    last = TierArrays("big", np.zeros(score.size), np.ones(score.size), np.full(score.size, 10.0))
    res = search_thresholds([first, last], max_quality_drop=0.05, confidence=0.5)
    assert res.verdict == "cascade" and res.thresholds[0] < top
    assert (score - 1e-13 >= res.thresholds[0]).sum() == (score >= res.thresholds[0]).sum() >= 95


def test_quality_lower_bound_and_errors():
    lb = quality_lower_bound([0, 5], [0, 1], 100, 1.2816)
    assert lb[0] == pytest.approx(-1.2816 / 100)
    assert lb[1] == pytest.approx(0.04 - 1.2816 * math.sqrt(7) / 100)
    t = TierArrays("a", np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(ConfigError):
        run_policy([t, t], [])
    with pytest.raises(ConfigError):
        search_thresholds([t, t], max_quality_drop=2.0)
    assert issubclass(ConfigError, CascadeError)


# --- strict JSON, plot formats ----------------------------------------------------------------------------


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity tokens, as strict readers (JSON.parse, jq) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_selection_with_nothing_held_out_reports_null_scores_and_strict_json(tmp_path):
    from calibration.output import dumps

    lp = np.log(np.array([0.9, 0.8, 0.3, 0.6, 0.7, 0.2]))
    sel = select_calibrator(lp, np.array([1, 1, 0, 1, 0, 0]), k=2)  # 6 questions: too few to hold any out
    d = sel.to_dict()
    assert d["folds"] == 0 and set(d["heldout"].values()) == {None}
    assert _strict_json(json.dumps(d, allow_nan=False)) == d
    assert _strict_json(dumps({"a": float("nan"), "b": [np.float64("inf"), np.int64(3)], "c": (np.bool_(True),)})) \
        == {"a": None, "b": [None, 3], "c": [True]}
    cal = sel.calibrator
    cal.metrics = {"selection": {"nll": float("nan")}, "auroc": np.float64("nan")}
    art = save_calibrator(cal, tmp_path / "a.json")
    assert _strict_json(art.read_text())["metrics"] == {"selection": {"nll": None}, "auroc": None}


def test_every_offered_plot_format_is_written_without_external_programs(tmp_path):
    from calibration.plots import check_plot_path, plot_formats, pyplot, save_figure

    formats = plot_formats()
    assert {"png", "pdf", "svg", "eps", "ps"} <= set(formats) and "pgf" not in formats
    plt = pyplot()
    for fmt in formats:  # each one really saved: nothing offered needs LaTeX, ghostscript or the like
        fig, ax = plt.subplots(figsize=(1.5, 1.0))
        ax.bar([0, 1], [1, 2], alpha=0.7)
        ax.grid(alpha=0.3)
        out = save_figure(fig, tmp_path / f"p.{fmt}")
        assert out.stat().st_size > 0, fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"p.{f}" for f in formats)  # no temporary left
    with pytest.raises(ConfigError, match=r"unsupported image format \.pgf \(it needs LaTeX\); supported: .*\.png"):
        check_plot_path(tmp_path / "x.pgf")


def test_features_read_every_logprob_as_the_log_of_a_probability():
    """Whatever a backend hands over: above 0 is a certainty (5.0 made exp() 148, 1e308 overflowed it), NaN and
    -inf the floor; the features stay finite and first_token_prob a probability."""
    from types import SimpleNamespace as T

    from calibration.features import LOGPROB_FLOOR, extract_features

    toks = [T(logprob=1e308, top=[T(logprob=1e308), T(logprob=float("nan"))]), T(logprob=5.0, top=[]),
            T(logprob=float("-inf"), top=[]), T(logprob=float("nan"), top=[])]
    f = extract_features(toks)
    assert all(math.isfinite(v) for v in f.values()), f
    assert f["first_token_prob"] == 1.0 and f["min_logprob"] == LOGPROB_FLOOR and f["n_tokens"] == 4


# --- edges a mutation audit found unchecked: bins' bounds, a score on a histogram edge, artifacts' parameters,
# isotonic knots' positions -----------------------------------------------------------------------------------

def test_uniform_bins_are_right_closed_and_the_top_two_stay_apart():
    # bin i holds (i/15, (i+1)/15]; 0.9 -> bin 13, 0.99 -> bin 14
    b = metrics.reliability_bins([1 / 15, 0.5, 0.9, 0.99, 1.0], [1, 0, 1, 0, 1])
    assert np.flatnonzero(b["count"]).tolist() == [0, 7, 13, 14]
    filled = b["count"] > 0
    assert np.all((b["confidence"][filled] > b["lower"][filled]) | (b["confidence"][filled] == 1 / 15))
    assert np.all(b["confidence"][filled] <= b["upper"][filled] + 1e-12)
    assert metrics.ece([0.9, 0.99], [1, 0]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.99)


def test_histogram_predict_puts_a_score_on_an_edge_in_the_bin_fit_put_it():
    s = np.log(np.r_[np.full(60, 0.2), np.full(60, 0.5), np.full(30, 0.9)])
    rng = np.random.default_rng(0)
    y = (rng.random(150) < np.exp(s)).astype(float)
    h = HistogramBinning(n_bins=2, prior_strength=0.0).fit(s, y)
    assert h.edges.tolist() == pytest.approx(score_to_logit([np.log(0.5)]).tolist())  # an edge on a tied score
    assert h.predict([np.log(0.5)])[0] == h.probs[0]                                   # (edges[i-1], edges[i]]
    assert h.predict(s).mean() == pytest.approx(y.mean())  # in-sample calibration in the large, no prior


def test_histogram_artifact_round_trip_keeps_every_parameter(tmp_path):
    rng = np.random.default_rng(1)
    s = -rng.exponential(1.0, 500)
    y = (rng.random(500) < np.exp(s)).astype(float)
    cal = make_calibrator("histogram:5", "raw_conf_logprob").fit(s, y)
    back = load_calibrator(save_calibrator(cal, tmp_path / "h.json"))
    assert back.params() == cal.params() and back.n_bins == 5


def test_isotonic_knot_sits_at_the_weighted_mean_score_of_its_block():
    s = np.log(np.r_[0.2, np.full(9, 0.3), np.full(10, 0.9)])
    y = np.r_[1.0, np.zeros(9), np.ones(10)]
    iso = IsotonicCalibrator(prior_strength=0.0).fit(s, y)
    z = score_to_logit(s)
    assert iso.knots_x[0] == pytest.approx((z[0] + 9 * z[1]) / 10)


def test_features_against_numpy_on_known_tokens():
    from types import SimpleNamespace as T

    from calibration.features import extract_features

    lps = np.array([-0.1, -0.7, -0.2, -2.0, -0.05, -0.4, -1.3])
    # each token's alternatives, most likely first or not: the margin is top1 - top2, the entropy of the top-k
    tops = [[-0.1, -2.5, -3.0], [-0.9, -0.7, -4.0, -5.0], [-0.2, -1.8], [], [-0.05, -3.5, -3.6], [-0.4, -1.2, -2.2],
            [-1.3, -0.5, -2.0]]
    toks = [T(logprob=lp, top=[T(logprob=a) for a in top]) for lp, top in zip(lps, tops)]

    def entropy(alts):
        q = np.exp(alts) / np.exp(alts).sum()
        return float(-(q * np.log(q)).sum())

    for k in (None, 2, 3):
        f = extract_features(toks, top_k=k)
        kept = [sorted(t, reverse=True)[:k] for t in tops if t]
        assert f["mean_logprob"] == pytest.approx(lps.mean()) and f["sum_logprob"] == pytest.approx(lps.sum())
        assert f["min_logprob"] == lps.min() and f["first_token_logprob"] == lps[0] and f["n_tokens"] == 7
        assert f["q10_logprob"] == pytest.approx(np.quantile(lps, 0.10))
        assert f["q25_logprob"] == pytest.approx(np.quantile(lps, 0.25))
        assert f["first_token_prob"] == pytest.approx(math.exp(-0.1))
        assert f["mean_margin"] == pytest.approx(np.mean([a[0] - a[1] for a in kept]))
        assert f["mean_topk_entropy"] == pytest.approx(np.mean([entropy(np.array(a)) for a in kept]))


def test_run_policy_accepts_a_score_equal_to_its_threshold_as_the_search_does():
    # the engine accepts at confidence >= threshold; the replay (run_policy) and the search (evaluate_grid) alike
    t1 = TierArrays("a", np.array([0.5, 0.5 - 1e-12, 0.75]), np.array([1.0, 1.0, 0.0]), np.full(3, 1.0))
    t2 = TierArrays("b", np.array([0.5, 0.25, 0.5]), np.array([0.0, 1.0, 1.0]), np.full(3, 3.0))
    t3 = TierArrays("c", np.zeros(3), np.ones(3), np.full(3, 10.0))
    out = run_policy([t1, t2, t3], [0.5, 0.5])
    assert out.stop.tolist() == [0, 2, 0] and out.cost.tolist() == [1.0, 14.0, 1.0]
    q, c, _, _ = evaluate_grid([t1, t2, t3], np.array([[0.5, 0.5]]), t3.correct)
    assert q[0] == pytest.approx(out.quality) and c[0] == pytest.approx(out.mean_cost)


def test_z_for_a_level_not_in_the_table_is_the_normal_quantile():
    from statistics import NormalDist

    from calibration.thresholds import z_for

    for level in (0.7, 0.93, 0.999):
        assert z_for(level) == pytest.approx(NormalDist().inv_cdf(level)) and z_for(level) > 0
    assert z_for(0.9) == pytest.approx(NormalDist().inv_cdf(0.9), abs=1e-4)
