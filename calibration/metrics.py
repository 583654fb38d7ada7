"""Calibration metrics of a confidence ``p`` (probability the answer is correct) against 0/1 correctness.

* ``ece``: expected calibration error with 15 equal-width bins (``strategy="uniform"``, the default) or
  equal-mass bins (``strategy="quantile"``): sum over bins of (bin share) * |mean confidence - accuracy|.
* ``mce``: the largest of those per-bin gaps (non-empty bins only).
* ``brier``: mean squared error of p against the 0/1 outcome.
* ``nll``: mean negative log-likelihood (p clipped to [1e-12, 1 - 1e-12]).
* ``auroc``: probability that a correct answer gets a higher confidence than a wrong one (ties count
  half); NaN when only one class is present.

Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BINS = 15


def _arrays(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"confidences ({p.size}) and labels ({y.size}) differ in length")
    if p.size == 0:
        raise ValueError("no samples")
    return np.clip(p, 0.0, 1.0), y


def bin_edges(p: Any, n_bins: int = N_BINS, strategy: str = "uniform") -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.quantile(np.asarray(p, dtype=np.float64), np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        return edges
    raise ValueError(f"unknown binning strategy {strategy!r} (uniform or quantile)")


def reliability_bins(p: Any, y: Any, n_bins: int = N_BINS, strategy: str = "uniform") -> dict[str, np.ndarray]:
    """Per bin: lower/upper edge, count, mean confidence and accuracy (NaN for empty bins)."""
    p, y = _arrays(p, y)
    edges = bin_edges(p, n_bins, strategy)
    if strategy == "uniform":
        # bin i holds (edges[i], edges[i+1]], the first bin also 0: same as netcal/Guo et al.
        idx = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    else:
        # equal-mass: rank-based assignment, each run of tied confidences kept whole in the bin of its middle
        # rank, so that the bins (and the ECE) cannot depend on the order of the rows
        order = np.argsort(p, kind="mergesort")
        sp = p[order]
        rank_bin = np.minimum((np.arange(p.size) * n_bins) // max(p.size, 1), n_bins - 1)
        starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if p.size else np.zeros(0, dtype=int)
        ends = np.r_[starts[1:], p.size]
        idx = np.empty(p.size, dtype=int)
        idx[order] = np.repeat(rank_bin[(starts + ends - 1) // 2], ends - starts)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "confidence": conf, "accuracy": acc}


def ece(p: Any, y: Any, n_bins: int = N_BINS, strategy: str = "uniform") -> float:
    b = reliability_bins(p, y, n_bins, strategy)
    n = b["count"].sum()
    filled = b["count"] > 0
    return float(np.sum(b["count"][filled] / n * np.abs(b["confidence"][filled] - b["accuracy"][filled])))


def mce(p: Any, y: Any, n_bins: int = N_BINS, strategy: str = "uniform") -> float:
    b = reliability_bins(p, y, n_bins, strategy)
    filled = b["count"] > 0
    return float(np.max(np.abs(b["confidence"][filled] - b["accuracy"][filled])))


def brier(p: Any, y: Any) -> float:
    p, y = _arrays(p, y)
    return float(np.mean((p - y) ** 2))


def nll(p: Any, y: Any) -> float:
    p, y = _arrays(p, y)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean rank, like scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # group boundaries of equal values; a group at sorted positions s..e-1 shares rank (s + e + 1) / 2
    change = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [x.size]))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(p: Any, y: Any) -> float:
    p, y = _arrays(p, y)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rankdata(p)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def summary(p: Any, y: Any, n_bins: int = N_BINS) -> dict[str, float]:
    """Every metric at once, plus accuracy and mean confidence."""
    p, y = _arrays(p, y)
    return {
        "n": int(p.size),
        "accuracy": float(y.mean()),
        "mean_confidence": float(p.mean()),
        "ece": ece(p, y, n_bins),
        "ece_equal_mass": ece(p, y, n_bins, "quantile"),
        "mce": mce(p, y, n_bins),
        "brier": brier(p, y),
        "nll": nll(p, y),
        "auroc": auroc(p, y),
    }
