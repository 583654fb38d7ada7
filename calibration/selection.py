"""Choose a calibration method by held-out NLL (or ECE) on validation folds of the TRAINING data.

The test data never enters: ``select_calibrator`` splits the training arrays it is given into ``k``
folds (fixed seed), fits every candidate method on k-1 folds, scores it on the held-out fold, and
averages. The winner is then refit on all of the training data. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration import metrics
from calibration.calibrators import METHODS, Calibrator, make_calibrator

CRITERIA = ("nll", "ece", "brier")


@dataclass
class Selection:
    method: str
    criterion: str
    scores: dict[str, float]  # method -> mean held-out criterion (lower is better)
    calibrator: Calibrator  # the winner, refit on all of the training data
    folds: int
    fold_scores: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "criterion": self.criterion, "folds": self.folds,
                # null where nothing was held out (too few questions, one outcome): JSON has no NaN
                "heldout": {m: round(s, 6) if np.isfinite(s) else None for m, s in self.scores.items()}}


def kfold_indices(n: int, k: int, seed: int = 0, strata: np.ndarray | None = None) -> list[np.ndarray]:
    """k folds of range(n) (shuffled with ``seed``), stratified by ``strata`` labels when given."""
    if n < 2:
        raise ValueError("need at least 2 samples for cross-validation")
    k = max(2, min(k, n))
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    offset = 0
    for g in groups:
        g = rng.permutation(g)
        for j, i in enumerate(g):
            folds[(j + offset) % k].append(int(i))
        offset += len(g)
    return [np.sort(np.asarray(f, dtype=int)) for f in folds if f]


def _criterion(name: str, p: np.ndarray, y: np.ndarray) -> float:
    if name == "nll":
        return metrics.nll(p, y)
    if name == "ece":
        return metrics.ece(p, y)
    if name == "brier":
        return metrics.brier(p, y)
    raise ValueError(f"unknown selection criterion {name!r}; known: {', '.join(CRITERIA)}")


def cross_val_predict(method: str, scores: np.ndarray, correct: np.ndarray, k: int = 5, seed: int = 0,
                      feature: str = "raw_conf_logprob") -> np.ndarray:
    """Out-of-fold calibrated probabilities for every training sample (each from a fit without it)."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    out = np.empty(scores.size)
    for fold in kfold_indices(scores.size, k, seed, strata=correct):
        mask = np.ones(scores.size, dtype=bool)
        mask[fold] = False
        cal = make_calibrator(method, feature).fit(scores[mask], correct[mask])
        out[fold] = cal.predict(scores[fold])
    return out


def select_calibrator(scores: Any, correct: Any, methods: Sequence[str] = METHODS, criterion: str = "nll",
                      k: int = 5, seed: int = 0, feature: str = "raw_conf_logprob", repeats: int = 1) -> Selection:
    """Pick the method with the lowest mean held-out ``criterion`` over ``k`` folds of the given data
    (``repeats`` times with different shuffles). Method names as in ``make_calibrator`` (``histogram:5``)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if s.size != y.size or s.size == 0:
        raise ValueError("selection needs equal, non-empty scores and labels")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    methods = list(methods)
    if not methods:
        raise ValueError("no candidate methods")
    fold_scores: dict[str, list[float]] = {m: [] for m in methods}
    single_class = y.min() == y.max()
    if s.size >= 10 and not single_class:
        folds = [f for r in range(max(1, repeats)) for f in kfold_indices(s.size, k, seed + r, strata=y)]
        for fold in folds:
            mask = np.ones(s.size, dtype=bool)
            mask[fold] = False
            for m in methods:
                cal = make_calibrator(m, feature).fit(s[mask], y[mask])
                fold_scores[m].append(_criterion(criterion, cal.predict(s[fold]), y[fold]))
        n_folds = len(folds)
        mean = {m: float(np.mean(v)) for m, v in fold_scores.items()}
    else:  # too little data to hold any out: keep the first (default) method
        n_folds = 0
        mean = {m: float("nan") for m in methods}
    finite = {m: v for m, v in mean.items() if np.isfinite(v)}
    best = min(finite, key=lambda m: (finite[m], methods.index(m))) if finite else methods[0]
    cal = make_calibrator(best, feature).fit(s, y)
    return Selection(best, criterion, mean, cal, n_folds, fold_scores)
