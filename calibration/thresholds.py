"""Threshold selection for a confidence-escalation chain of any length.

A *policy* consults the tiers of a chain in order. At tier j (all but the last) it accepts that tier's
answer when the tier's calibrated confidence ``score_j >= t_j``; otherwise it escalates to the next
tier. The last tier always answers. An escalated request pays every tier it passed (the double cost).

``search_thresholds`` enumerates a grid of per-tier thresholds on a calibration (training) set and
picks, for

* ``objective="quality"``: the cheapest thresholds whose quality *lower bound* stays within
  ``max_quality_drop`` of the reference (by default the last tier alone), or
* ``objective="budget"``: the best quality whose mean cost per request stays within ``cost_budget``.

The statistical margin: per question, the difference d = (policy correct) - (reference correct) is -1
(a loss), 0 or +1 (a gain). With L losses and G gains among n questions the lower bound on the mean
difference is ``(G - L)/n - z * sqrt(L + G + 1)/n`` (a normal bound on a sum of +-1 outcomes with one
pseudo-disagreement, so a policy with no observed losses still pays a margin). ``z`` is the one-sided
normal quantile of ``confidence``. The chosen operating point is then re-sampled with a paired
bootstrap to report intervals for quality, cost and escalation rate.

When no thresholds beat the last tier's cost at the target, the verdict is ``direct``: send everything
to the last tier. Numpy only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascade.errors import ConfigError

#: one-sided normal quantiles for the supported confidence levels (no scipy at import)
_Z = {0.5: 0.0, 0.8: 0.8416, 0.85: 1.0364, 0.9: 1.2816, 0.95: 1.6449, 0.975: 1.96, 0.99: 2.3263}


def z_for(confidence: float) -> float:
    if confidence in _Z:
        return _Z[confidence]
    if not (0.5 <= confidence < 1.0):
        raise ConfigError(f"confidence must be in [0.5, 1), got {confidence}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


@dataclass
class TierArrays:
    """What the search needs of one tier, aligned by question."""

    name: str
    score: np.ndarray  # calibrated confidence in this tier's answer (ignored for the last tier)
    correct: np.ndarray  # 0/1
    cost: np.ndarray  # USD per question
    #: False where this tier gave no answer (empty text): never accepted there, whatever its score, as the
    #: engine escalates an answer with no tokens (None: every answer counts)
    answered: np.ndarray | None = None

    def acceptable(self) -> np.ndarray | bool:
        return True if self.answered is None else np.asarray(self.answered, dtype=bool)


@dataclass
class Outcome:
    """Per-question result of running a policy: which tier answered, correctness, cost paid."""

    stop: np.ndarray  # index (into the tiers list) of the answering tier
    correct: np.ndarray
    cost: np.ndarray

    @property
    def quality(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())


def run_policy(tiers: Sequence[TierArrays], thresholds: Sequence[float | None]) -> Outcome:
    """Replay one policy: ``thresholds[j]`` for every tier but the last (None: never accept there)."""
    if len(tiers) == 0:
        raise ConfigError("a chain needs at least one tier")
    if len(thresholds) != len(tiers) - 1:
        raise ConfigError(f"{len(tiers)} tiers need {len(tiers) - 1} thresholds, got {len(thresholds)}")
    n = tiers[0].correct.size
    remaining = np.ones(n, dtype=bool)
    stop = np.full(n, len(tiers) - 1)
    correct = np.zeros(n)
    cost = np.zeros(n)
    for j, t in enumerate(tiers):
        cost += np.where(remaining, t.cost, 0.0)
        if j == len(tiers) - 1:
            accept = remaining
        else:
            th = thresholds[j]
            accept = remaining & (t.score >= th) & t.acceptable() if th is not None else np.zeros(n, dtype=bool)
        correct += np.where(accept, t.correct, 0.0)
        stop[accept] = j
        remaining &= ~accept
    return Outcome(stop, correct, cost)


def quality_lower_bound(gains: Any, losses: Any, n: int, z: float) -> np.ndarray:
    """Lower bound on the mean paired difference from counts of +1 (gains) and -1 (losses)."""
    g = np.asarray(gains, dtype=np.float64)
    l = np.asarray(losses, dtype=np.float64)
    return (g - l) / n - z * np.sqrt(g + l + 1.0) / n


#: how far below a score a threshold at that score is put (relative): an answer is accepted at a confidence
#: >= the threshold, and a threshold equal to a score that many answers share (the calibrated value of every
#: top-confidence answer, say) would accept them or not by the last bit of the arithmetic that computes them
THRESHOLD_SLACK = 1e-9


def threshold_grid(score: np.ndarray, size: int) -> np.ndarray:
    """Candidate thresholds: the distinct quantiles of a tier's scores (accept-all included), each put just
    below its value (by :data:`THRESHOLD_SLACK`, never as far as the next lower score), so that a score equal
    to it is accepted with room to spare: the same answers are accepted on these scores."""
    qs = np.unique(np.quantile(score, np.linspace(0.0, 1.0, size)))
    distinct = np.unique(score[np.isfinite(score)])
    at = np.searchsorted(distinct, qs, side="left") - 1  # the largest distinct score below each candidate
    below = np.where(at >= 0, distinct[np.clip(at, 0, None)], -np.inf) if distinct.size else np.full(qs.shape, -np.inf)
    with np.errstate(invalid="ignore"):
        nudged = np.maximum(qs - THRESHOLD_SLACK * np.maximum(1.0, np.abs(qs)), (below + qs) / 2)
    return np.where(np.isfinite(qs), nudged, qs)


@dataclass
class SearchResult:
    verdict: str  # "cascade" or "direct"
    thresholds: list[float | None]  # per tier but the last; None everywhere for "direct"
    objective: str
    quality: float  # on the calibration set
    reference_quality: float
    quality_diff_lower_bound: float
    cost: float  # mean USD per request on the calibration set
    reference_cost: float  # mean cost of the last tier alone
    n: int
    z: float
    candidates: int
    reason: str = ""
    intervals: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.reference_cost if self.reference_cost > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "thresholds": self.thresholds, "objective": self.objective,
            "train_quality": self.quality, "train_reference_quality": self.reference_quality,
            "train_quality_diff_lower_bound": self.quality_diff_lower_bound,
            "train_cost_ratio": self.cost_ratio, "n": self.n, "z": self.z, "candidates": self.candidates,
            "reason": self.reason, "intervals": self.intervals,
        }


def _enumerate(tiers: Sequence[TierArrays], grid_size: int, max_candidates: int) -> np.ndarray:
    """All threshold combinations (K, m-1), shrinking the per-tier grid to stay under max_candidates."""
    m = len(tiers) - 1
    if m == 0:
        return np.zeros((1, 0))
    size = grid_size
    while size > 2 and size ** m > max_candidates:
        size -= 1
    grids = [threshold_grid(t.score, size) for t in tiers[:-1]]
    return np.array(list(itertools.product(*grids)), dtype=np.float64)


def evaluate_grid(tiers: Sequence[TierArrays], combos: np.ndarray, reference: np.ndarray,
                  chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every threshold combination: (quality, mean cost, gains, losses) against ``reference``."""
    k = combos.shape[0]
    n = tiers[0].correct.size
    quality = np.empty(k)
    cost = np.empty(k)
    gains = np.empty(k, dtype=np.int64)
    losses = np.empty(k, dtype=np.int64)
    ref = np.asarray(reference, dtype=np.float64)
    # a question is a gain where the answering tier is right and the reference wrong, a loss the reverse
    # per tier: what an accepted question adds (correct, gain, loss) and what a visit costs
    val_j = [np.column_stack([t.correct > 0.5, (t.correct > 0.5) & (ref < 0.5),
                              (t.correct < 0.5) & (ref > 0.5)]).astype(np.float32) for t in tiers]
    cost_j = [t.cost.astype(np.float64) for t in tiers]
    for lo in range(0, k, chunk):
        hi = min(k, lo + chunk)
        c = combos[lo:hi]
        remaining = np.ones((hi - lo, n), dtype=bool)
        acc_sum = np.zeros((hi - lo, 3))
        cs = np.zeros(hi - lo)
        for j, t in enumerate(tiers):
            r = remaining.view(np.uint8)
            cs += r @ cost_j[j] if j else cost_j[j].sum()
            if j == len(tiers) - 1:
                a = remaining
            else:
                a = remaining & (t.score[None, :] >= c[:, j:j + 1]) & t.acceptable()
                remaining &= ~a
            acc_sum += a.astype(np.float32) @ val_j[j]
        quality[lo:hi] = acc_sum[:, 0] / n
        cost[lo:hi] = cs / n
        gains[lo:hi] = np.rint(acc_sum[:, 1]).astype(np.int64)
        losses[lo:hi] = np.rint(acc_sum[:, 2]).astype(np.int64)
    return quality, cost, gains, losses


def bootstrap_intervals(tiers: Sequence[TierArrays], thresholds: Sequence[float | None], reference: np.ndarray,
                        n_boot: int = 1000, level: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap (over questions) intervals for quality, quality difference, cost ratio and
    escalation rate of one policy."""
    out = run_policy(tiers, thresholds)
    n = out.correct.size
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) / n  # (B, n) weights
    ref_cost = tiers[-1].cost
    esc = (out.stop > 0).astype(np.float64)
    q = w @ out.correct
    diff = w @ (out.correct - reference)
    cost_ratio = (w @ out.cost) / np.maximum(w @ ref_cost, 1e-300)
    esc_rate = w @ esc
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2

    def iv(x: np.ndarray, point: float) -> dict[str, float]:
        a, b = np.quantile(x, [lo, hi])
        return {"estimate": float(point), "low": float(a), "high": float(b)}

    return {
        "level": level, "n_boot": n_boot,
        "quality": iv(q, out.quality),
        "quality_diff": iv(diff, float(np.mean(out.correct - reference))),
        "cost_ratio": iv(cost_ratio, out.mean_cost / float(ref_cost.mean()) if ref_cost.mean() > 0 else math.nan),
        "escalation_rate": iv(esc_rate, float(esc.mean())),
    }


def search_thresholds(tiers: Sequence[TierArrays], *, objective: str = "quality", max_quality_drop: float = 0.005,
                      cost_budget: float | None = None, reference_correct: Any = None, confidence: float = 0.9,
                      grid_size: int = 20, max_candidates: int = 2000, n_boot: int = 1000,
                      seed: int = 0, cost_slack: float = 0.0) -> SearchResult:
    """Choose per-tier thresholds on a calibration set (see the module docstring)."""
    if not tiers:
        raise ConfigError("a chain needs at least one tier")
    n = tiers[0].correct.size
    if n == 0:
        raise ConfigError("the calibration set is empty")
    for t in tiers:
        if t.correct.size != n or t.cost.size != n or (t.score is not None and t.score.size != n):
            raise ConfigError(f"tier {t.name!r}: arrays differ in length")
    if objective not in ("quality", "budget"):
        raise ConfigError(f"objective must be 'quality' or 'budget', got {objective!r}")
    if objective == "quality" and not (0.0 <= max_quality_drop <= 1.0):
        raise ConfigError(f"max quality drop must be in [0, 1], got {max_quality_drop}")
    if objective == "budget" and (cost_budget is None or not cost_budget > 0):
        raise ConfigError("objective 'budget' needs a positive cost budget per request")
    z = z_for(confidence)
    reference = np.asarray(tiers[-1].correct if reference_correct is None else reference_correct, dtype=np.float64)
    ref_q = float(reference.mean())
    ref_cost = float(tiers[-1].cost.mean())
    direct_thr: list[float | None] = [None] * (len(tiers) - 1)

    combos = _enumerate(tiers, grid_size, max_candidates)
    quality, cost, gains, losses = evaluate_grid(tiers, combos, reference)
    lb = quality_lower_bound(gains, losses, n, z)
    direct_lb = float(quality_lower_bound(0, 0, n, z))

    if objective == "quality":
        feasible = lb >= -max_quality_drop - 1e-12
        if feasible.any():
            idx = np.flatnonzero(feasible)
            # cheapest; ties (and, with cost_slack, anything within that fraction of the cheapest): the
            # highest lower bound, which tempers the winner's curse of picking the luckiest candidate
            cmin = float(cost[idx].min())
            near = idx[cost[idx] <= cmin * (1 + cost_slack) + 1e-15]
            cheaper = near[cost[near] < ref_cost * (1 - 1e-9)]  # the slack never reaches past the last tier alone
            near = cheaper if cheaper.size else near
            best = near[np.lexsort((cost[near], -lb[near]))[0]]
        else:
            best = None
        if best is None or cost[best] >= ref_cost * (1 - 1e-9):
            why = ("no thresholds meet the quality target with margin" if best is None else
                   f"the cheapest thresholds that meet the target cost {cost[best] / ref_cost:.3f}x the last tier")
            # the best the chain could do at any quality, for the record
            cheapest_ok = float(np.min(cost[feasible]) / ref_cost) if feasible.any() else None
            res = SearchResult("direct", direct_thr, objective, ref_q, ref_q, 0.0, ref_cost, ref_cost, n, z,
                               int(combos.shape[0]), why)
            res.intervals = {"best_feasible_cost_ratio": cheapest_ok,
                             "best_unconstrained": _best_summary(quality, cost, lb, ref_cost)}
            return res
    else:
        feasible = cost <= cost_budget * (1 + 1e-12)
        direct_ok = ref_cost <= cost_budget * (1 + 1e-12)  # the tolerance of ``feasible``
        if not feasible.any():
            raise ConfigError(f"no policy fits a budget of {cost_budget:.3g} USD per request "
                              f"(the cheapest costs {float(cost.min()):.3g})")
        idx = np.flatnonzero(feasible)
        best = idx[np.lexsort((cost[idx], -lb[idx], -quality[idx]))[0]]
        # the best quality within the budget: the last tier alone when it fits and is better, or as good for less
        if direct_ok and (ref_q > quality[best] or (ref_q == quality[best] and ref_cost <= cost[best])):
            res = SearchResult("direct", direct_thr, objective, ref_q, ref_q, direct_lb, ref_cost, ref_cost, n, z,
                               int(combos.shape[0]), "the last tier alone fits the budget at no lower quality")
            return res
    thr = [float(x) for x in combos[best]]
    res = SearchResult("cascade", thr, objective, float(quality[best]), ref_q, float(lb[best]), float(cost[best]),
                       ref_cost, n, z, int(combos.shape[0]))
    if n_boot > 0:
        res.intervals = bootstrap_intervals(tiers, thr, reference, n_boot=n_boot, seed=seed)
    return res


def _best_summary(quality: np.ndarray, cost: np.ndarray, lb: np.ndarray, ref_cost: float) -> dict[str, float]:
    i = int(np.argmax(lb))
    return {"quality_diff_lower_bound": float(lb[i]), "cost_ratio": float(cost[i] / ref_cost)}


def oracle_outcome(first: TierArrays, last: TierArrays) -> Outcome:
    """Escalate exactly when the first tier is wrong, paying both: the best a first-tier router can do."""
    wrong = first.correct < 0.5
    correct = np.where(wrong, last.correct, first.correct)
    cost = first.cost + np.where(wrong, last.cost, 0.0)
    return Outcome(np.where(wrong, 1, 0), correct, cost)


def best_single_threshold(score: Any, first: TierArrays, last: TierArrays, max_quality_drop: float) -> dict[str, Any]:
    """The *in-sample* anchor: the one threshold on ``score`` (first tier -> last tier) that meets the quality
    target at least cost on the very data it is evaluated on (no margin). Used only as a yardstick."""
    s = np.asarray(score, dtype=np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)  # no confidence: never accepted (sorted last, cut off below)
    order = np.argsort(-s, kind="mergesort")
    n = s.size
    n_finite = int(np.isfinite(s).sum())
    ref_q = float(last.correct.mean())
    ref_cost = float(last.cost.sum())
    # accept the top-k by score for k = 0..n, respecting ties (only cut between distinct scores)
    ss = s[order]
    cuts = np.concatenate(([0], np.flatnonzero(ss[1:] != ss[:-1]) + 1, [n]))
    gain = np.concatenate(([0.0], np.cumsum(first.correct[order] - last.correct[order])))
    saved = np.concatenate(([0.0], np.cumsum(last.cost[order])))
    if not ref_cost > 0:  # a free last tier: nothing is cheaper than it, and no ratio against it is defined
        return {"threshold": None, "accepted": 0, "quality": ref_q, "cost_ratio": float("nan"), "saves": False}
    best = {"threshold": None, "accepted": 0, "quality": ref_q, "cost_ratio": 1.0 + float(first.cost.sum()) / ref_cost,
            "saves": False}
    best_cost = ref_cost  # the last tier alone
    for k in cuts[cuts <= n_finite]:
        q = ref_q + gain[k] / n
        c = float(first.cost.sum()) + ref_cost - saved[k]
        if q >= ref_q - max_quality_drop - 1e-12 and c < best_cost - 1e-15:
            best_cost = c
            best = {"threshold": float(ss[k - 1]) if k > 0 else None, "accepted": int(k), "quality": float(q),
                    "cost_ratio": c / ref_cost, "saves": True}
    if not best["saves"]:
        best["cost_ratio"] = 1.0  # best the anchor can do: send everything to the last tier
    return best
