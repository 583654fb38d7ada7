"""Calibrators: map a raw confidence score to a probability that the answer is correct.

A calibrator reads one *score* — a log-probability-valued feature such as ``mean_logprob`` or the shared
data's ``raw_conf_logprob`` — and returns a probability. The methods (``method`` in the artifact):

* ``temperature`` — p = sigmoid(logit(exp(score)) / T), one parameter (the default);
* ``platt`` — p = sigmoid(a * logit + b), two parameters (also fixes a shifted mean);
* ``isotonic`` — the best non-decreasing step map, stored as knots and interpolated;
* ``histogram`` — equal-mass bins of the score, each mapped to its smoothed accuracy;
* ``logistic`` — several features at once (a tier's confidence plus agreement with earlier tiers, ...).

All calibrators share the same interface:

* ``fit(scores, correct)`` on arrays, returning ``self``;
* ``predict(scores) -> probabilities`` (vectorised, numpy only, so the engine never needs netcal/torch);
* ``to_dict()`` / ``calibrator_from_dict()``: a versioned JSON artifact that the engine loads.

The artifact format::

    {"format": "cascade-engine/calibrator", "version": 1, "method": "temperature",
     "feature": "mean_logprob", "params": {"temperature": 1.31},
     "fitted_on": {"data": "...", "model": "...", "n": 1200, "date": "2026-11-27T..."},
     "metrics": {...}}
"""

from __future__ import annotations

import json
import math
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cascade.errors import ConfigError
from cascade.paths import expand_path

ARTIFACT_FORMAT = "cascade-engine/calibrator"
ARTIFACT_VERSION = 1
_EPS = 1e-6


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


#: the score range a logit is taken of: probabilities from 1e-6 to 1 - 1e-6. The floor, a log-probability of
#: -13.8, keeps one answer at -inf (or a provider's -9999) from dragging a Platt fit flat or backwards; it also
#: makes every score below it one value, so a score that is usually far below it (``sum_logprob`` of long
#: answers) ranks nothing: calibrate mean, min or first-token log-probabilities instead
_MAX_SCORE = float(np.log1p(-_EPS))
_MIN_SCORE = float(np.log(_EPS))


def score_to_logit(scores: Any) -> np.ndarray:
    """A log-probability score s -> the logit of exp(s), computed in log space: s - log(1 - exp(s))."""
    s = np.clip(_as_array(scores), _MIN_SCORE, _MAX_SCORE)
    return s - np.log(-np.expm1(s))


def _score_to_logit_one(score: Any) -> np.float64:
    """``score_to_logit([score])[0]`` on a numpy scalar: the same ufuncs (clip is max then min)."""
    s = np.minimum(np.maximum(np.float64(score), _MIN_SCORE), _MAX_SCORE)
    return s - np.log(-np.expm1(s))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _fit_arrays(scores: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    z = score_to_logit(scores)
    y = _as_array(correct)
    if len(z) != len(y) or len(z) == 0:
        raise ValueError("fit needs equal, non-empty scores and labels")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0/1")
    return z, y


#: what ``use_netcal`` needs where netcal is missing (netcal requires torch, which must come first, pinned)
NETCAL_MISSING = ("which is not installed (it requires torch: install torch==2.13.0 first, then pip install "
                  "'cascade-engine[calibration]')")


def _netcal_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """Fit netcal's TemperatureScaling (imported here, never at module import) and return T."""
    try:
        from netcal.scaling import TemperatureScaling as _NetcalTS
    except ImportError as exc:  # pragma: no cover - netcal is an optional extra
        raise ImportError(f"use_netcal=True needs netcal, {NETCAL_MISSING}") from exc
    import warnings

    ts = _NetcalTS()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts.fit(sigmoid(z), y.astype(np.int64))
    # netcal stores the multiplicative weight on the logit, i.e. 1/T
    w = float(np.asarray(ts.weights, dtype=np.float64).reshape(-1)[0])
    if not (w > 0 and math.isfinite(w)):
        raise ValueError(f"netcal returned a non-positive logit weight {w!r}")
    return 1.0 / w


def _short(v: Any) -> str:
    """``repr(v)``, cut to a readable length (an artifact's bad value may be a 300-digit integer)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _param_number(params: Mapping[str, Any], key: str) -> float:
    """One numeric parameter of an artifact: a finite number, else ValueError naming it."""
    v = params[key]
    try:  # an integer beyond a float's range (JSON allows 1e999 written out as digits) overflows
        finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"params.{key} must be a finite number, got {_short(v)}")
    return float(v)


def _param_array(params: Mapping[str, Any], key: str, *, probabilities: bool = False) -> np.ndarray:
    """A list parameter of an artifact: finite numbers (within [0, 1] for ``probabilities``)."""
    v = params[key]
    if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        raise ValueError(f"params.{key} must be a list of numbers, got {v!r}")
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except OverflowError:  # an integer beyond a float's range
        raise ValueError(f"params.{key} must hold finite numbers") from None
    if not np.all(np.isfinite(a)):
        raise ValueError(f"params.{key} must hold finite numbers")
    if probabilities and np.any((a < 0) | (a > 1)):
        raise ValueError(f"params.{key} must hold probabilities within [0, 1], got {float(a[(a < 0) | (a > 1)][0])!r}")
    return a


class Calibrator(ABC):
    """Base class. Subclasses set ``method`` and implement fit/predict/params."""

    method: ClassVar[str]
    #: the artifact's ``params``: those it must give, and those it may (each has a default)
    required_params: ClassVar[tuple[str, ...]] = ()
    optional_params: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type["Calibrator"]]] = {}

    def __init__(self, feature: str = "mean_logprob") -> None:
        self.feature = feature
        self.fitted_on: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "method", None):
            Calibrator._registry[cls.method] = cls

    # --- interface -------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, scores: Any, correct: Any) -> "Calibrator": ...

    @abstractmethod
    def predict(self, scores: Any) -> np.ndarray: ...

    @abstractmethod
    def params(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "Calibrator": ...

    # --- shared ----------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        """The features ``predict_one`` reads."""
        return [self.feature]

    def fit_warnings(self) -> list[str]:
        """What looks wrong with the fitted parameters (one sentence each): a fit that ran into its bounds
        or ranks answers backwards. The calibrator still works; its confidence just says little."""
        return []

    def with_feature(self, feature: str) -> "Calibrator":
        """The same fitted map read from another feature (e.g. an artifact fit on the shared data's stored
        answer-letter logprob, serving a tier whose engine feature for it is ``first_token_logprob``)."""
        d = self.to_dict()
        d["feature"] = feature
        d["fitted_on"] = {**d["fitted_on"], "served_feature": feature, "fitted_feature": self.feature}
        return calibrator_from_dict(d)

    def predict_one(self, features: Mapping[str, float]) -> float:
        """Calibrated confidence for one answer, from its feature dict."""
        try:
            score = features[self.feature]
        except KeyError:
            raise KeyError(f"calibrator needs feature {self.feature!r}") from None
        one = self._predict_scalar
        if one is not None:
            return float(one(score))
        return float(self.predict([score])[0])

    #: ``predict`` for one score without the arrays (the engine's path), where a subclass has one: the same
    #: numpy ufuncs on numpy scalars, so bit-identical to ``predict([score])[0]`` (plain ``math`` is not:
    #: numpy's exp/log/tanh differ from libm in the last bit for a fraction of inputs).
    _predict_scalar: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "method": self.method,
            "feature": self.feature,
            "params": self.params(),
            "fitted_on": dict(self.fitted_on),
            "metrics": dict(self.metrics),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(feature={self.feature!r}, {self.params()})"


class TemperatureScaling(Calibrator):
    """p = sigmoid(logit(exp(score)) / T). T = 1 leaves the raw probability unchanged.

    Fitting minimises the negative log-likelihood over the single parameter T (the same objective as
    netcal's ``TemperatureScaling``); ``fit(..., use_netcal=True)`` delegates to netcal when installed.
    """

    method = "temperature"
    required_params = ("temperature",)
    #: the range the fit searches (a fit at either end is reported by :meth:`fit_warnings`)
    T_MIN, T_MAX = 1e-2, 1e2

    def __init__(self, feature: str = "mean_logprob", temperature: float = 1.0) -> None:
        super().__init__(feature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.temperature = float(temperature)

    def fit(self, scores: Any, correct: Any, use_netcal: bool = False) -> "TemperatureScaling":
        z, y = _fit_arrays(scores, correct)
        if use_netcal:
            self.temperature = _netcal_temperature(z, y)
            return self
        # NLL is convex in 1/T for a logistic model without bias: golden-section search on log T.
        def nll(log_t: float) -> float:
            p = np.clip(sigmoid(z / math.exp(log_t)), 1e-12, 1 - 1e-12)
            return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

        lo, hi = math.log(self.T_MIN), math.log(self.T_MAX)
        g = (math.sqrt(5) - 1) / 2
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        fa, fb = nll(a), nll(b)
        for _ in range(100):
            # a tie goes to the lower temperature: where the score separates right from wrong answers, every
            # answer reaches the clip below some T and the NLL is flat there (it would keep falling towards T -> 0),
            # so the fit ends at the bottom of its range, as fit_warnings expects, not at the edge of the flat part
            if fa <= fb:
                hi, b, fb = b, a, fa
                a = hi - g * (hi - lo)
                fa = nll(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + g * (hi - lo)
                fb = nll(b)
        self.temperature = float(math.exp((lo + hi) / 2))
        return self

    def predict(self, scores: Any) -> np.ndarray:
        return sigmoid(score_to_logit(scores) / self.temperature)

    def fit_warnings(self) -> list[str]:
        t = self.temperature
        if t >= self.T_MAX / 1.01:
            return [f"temperature {t:.3g} is at the top of its range (<= {self.T_MAX:g}): the {self.feature} score "
                    "barely tells right answers from wrong, or ranks them backwards (temperature scaling cannot "
                    "flip it; --method platt shows which, by the sign of its slope), so every confidence is "
                    "squeezed towards 0.5; try another --feature, or --method platt"]
        if t <= self.T_MIN * 1.01:
            return [f"temperature {t:.3g} is at the bottom of its range (>= {self.T_MIN:g}): the {self.feature} "
                    "score separates right from wrong answers almost perfectly in the fit data, so confidences "
                    "are pushed to 0 and 1; check the labels (too few, or leaked from the answers themselves)"]
        return []

    def _predict_scalar(self, score: Any) -> np.float64:
        return sigmoid(_score_to_logit_one(score) / self.temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "TemperatureScaling":
        return cls(feature=feature, temperature=_param_number(params, "temperature"))


def _newton_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 100) -> np.ndarray:
    """Logistic regression by Newton's method on design matrix ``x`` (n, k) (first column: intercept).

    A small ridge penalty ``l2`` (not on the intercept) keeps the fit finite on separable data.
    """
    n, k = x.shape
    w = np.zeros(k)
    reg = np.full(k, l2 * n)
    reg[0] = 0.0
    for _ in range(iters):
        p = sigmoid(x @ w)
        g = x.T @ (p - y) + reg * w
        h = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(k)
        step = np.linalg.solve(h, g)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


class PlattScaling(Calibrator):
    """Platt / logistic scaling: p = sigmoid(a * logit(exp(score)) + b).

    Two parameters, so unlike temperature scaling it can also move the mean (a model that is
    over-confident on every answer). Fit by Newton's method on the NLL, numpy only.
    """

    method = "platt"
    required_params = ("a", "b")

    def __init__(self, feature: str = "mean_logprob", a: float = 1.0, b: float = 0.0) -> None:
        super().__init__(feature)
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError("platt parameters must be finite")
        self.a, self.b = float(a), float(b)

    def fit(self, scores: Any, correct: Any) -> "PlattScaling":
        z, y = _fit_arrays(scores, correct)
        w = _newton_logistic(np.column_stack([np.ones_like(z), z]), y)
        # a score with one value (every answer at logprob 0, or below the floor) has no slope to fit: Newton leaves
        # one of +-1e-13 by rounding, whose sign would rank answers (an AUROC of 0.0004 or 0.9996) on a score
        # that ranks nothing
        self.b, self.a = float(w[0]), float(w[1]) if z.min() < z.max() else 0.0
        return self

    def predict(self, scores: Any) -> np.ndarray:
        return sigmoid(self.a * score_to_logit(scores) + self.b)

    def _predict_scalar(self, score: Any) -> np.float64:
        return sigmoid(self.a * _score_to_logit_one(score) + self.b)

    def params(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}

    def fit_warnings(self) -> list[str]:
        if self.a <= 0:
            return [f"slope a = {self.a:.3g} <= 0: a higher {self.feature} score means a lower confidence (or "
                    "none at all), so the score does not rank answers; check the feature and the labels"]
        return []

    @classmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "PlattScaling":
        return cls(feature=feature, a=_param_number(params, "a"), b=_param_number(params, "b"))


def _pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool-adjacent-violators on y (already sorted by the score) with weights w.

    Returns per block: its mean value, total weight and index of its first element.
    """
    vals: list[float] = []
    wts: list[float] = []
    starts: list[int] = []
    for i, (yi, wi) in enumerate(zip(y, w)):
        vals.append(float(yi))
        wts.append(float(wi))
        starts.append(i)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            v2, w2 = vals.pop(), wts.pop()
            starts.pop()
            v1, w1 = vals[-1], wts[-1]
            vals[-1] = (v1 * w1 + v2 * w2) / (w1 + w2)
            wts[-1] = w1 + w2
    return np.asarray(vals), np.asarray(wts), np.asarray(starts, dtype=int)


class IsotonicCalibrator(Calibrator):
    """Isotonic regression: the best non-decreasing map from the score to the accuracy.

    Stored as knots (logit of the score, probability) and applied by linear interpolation between
    them; outside the knots it is flat. Block means are shrunk towards the overall accuracy with
    ``prior_strength`` pseudo-answers so that a small block never predicts exactly 0 or 1.
    """

    method = "isotonic"
    required_params = ("knots_x", "knots_y")
    optional_params = ("prior_strength",)

    def __init__(self, feature: str = "mean_logprob", knots_x: Any = (0.0,), knots_y: Any = (0.5,),
                 prior_strength: float = 1.0) -> None:
        super().__init__(feature)
        self.knots_x = _as_array(knots_x)
        self.knots_y = np.clip(_as_array(knots_y), 0.0, 1.0)
        if self.knots_x.size == 0 or self.knots_x.size != self.knots_y.size:
            raise ValueError("isotonic knots must be non-empty and of equal length")
        if np.any(np.diff(self.knots_x) < 0) or np.any(np.diff(self.knots_y) < -1e-12):
            raise ValueError("isotonic knots must be non-decreasing")
        self.prior_strength = float(prior_strength)
        if not self.prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")

    def fit(self, scores: Any, correct: Any) -> "IsotonicCalibrator":
        z, y = _fit_arrays(scores, correct)
        order = np.argsort(z, kind="mergesort")
        zs, ys = z[order], y[order]
        # ties in the score must share one value: pool equal scores first
        uz, inv = np.unique(zs, return_inverse=True)
        wy = np.bincount(inv, weights=ys)
        cnt = np.bincount(inv).astype(float)
        vals, wts, starts = _pav(wy / cnt, cnt)
        prior = float(y.mean())
        vals = (vals * wts + prior * self.prior_strength) / (wts + self.prior_strength)
        # one knot per block, at the weighted mean score of the block
        ends = np.append(starts[1:], uz.size)
        xs = np.array([np.average(uz[s:e], weights=cnt[s:e]) for s, e in zip(starts, ends)])
        # shrinking a small block further than a large one can reverse their order: pool those blocks again
        vals, _, merged = _pav(vals, wts)
        ends = np.append(merged[1:], xs.size)
        xs = np.array([np.average(xs[s:e], weights=wts[s:e]) for s, e in zip(merged, ends)])
        self.knots_x, self.knots_y = xs, np.maximum.accumulate(vals)  # (guards rounding)
        return self

    def predict(self, scores: Any) -> np.ndarray:
        z = score_to_logit(scores)
        if self.knots_x.size == 1:
            return np.full(z.shape, float(self.knots_y[0]))
        return np.interp(z, self.knots_x, self.knots_y)

    def params(self) -> dict[str, Any]:
        return {"knots_x": self.knots_x.tolist(), "knots_y": self.knots_y.tolist(),
                "prior_strength": self.prior_strength}

    @classmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "IsotonicCalibrator":
        prior = _param_number(params, "prior_strength") if "prior_strength" in params else 1.0
        return cls(feature=feature, knots_x=_param_array(params, "knots_x"),
                   knots_y=_param_array(params, "knots_y", probabilities=True), prior_strength=prior)


class HistogramBinning(Calibrator):
    """Histogram binning: equal-mass bins of the score, each mapped to its (smoothed) accuracy.

    ``edges`` are the interior bin boundaries in logit space (``n_bins - 1`` of them, or fewer where the
    score has ties); bin i holds scores in (edges[i-1], edges[i]]. Each bin's accuracy is shrunk towards
    the overall accuracy with ``prior_strength`` pseudo-answers.
    """

    method = "histogram"
    required_params = ("edges", "probs")
    optional_params = ("n_bins", "prior_strength")

    def __init__(self, feature: str = "mean_logprob", edges: Any = (), probs: Any = (0.5,), n_bins: int = 10,
                 prior_strength: float = 2.0) -> None:
        super().__init__(feature)
        self.edges = _as_array(edges)
        self.probs = np.clip(_as_array(probs), 0.0, 1.0)
        if self.probs.size != self.edges.size + 1:
            raise ValueError("histogram binning needs len(probs) == len(edges) + 1")
        if np.any(np.diff(self.edges) <= 0):
            raise ValueError("histogram bin edges must be strictly increasing")
        if n_bins < 1:
            raise ValueError("n_bins must be >= 1")
        self.n_bins = int(n_bins)
        self.prior_strength = float(prior_strength)
        if not self.prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")

    def fit(self, scores: Any, correct: Any) -> "HistogramBinning":
        z, y = _fit_arrays(scores, correct)
        qs = np.quantile(z, np.linspace(0, 1, self.n_bins + 1)[1:-1])
        # an edge at the highest score (many answers tied there) would leave the bin above it empty, and scores
        # higher still at the base rate, below the top bin: the top bin is open above instead
        edges = np.unique(qs)
        edges = edges[edges < z.max()]
        idx = np.searchsorted(edges, z, side="left")
        cnt = np.bincount(idx, minlength=edges.size + 1).astype(float)
        hits = np.bincount(idx, weights=y, minlength=edges.size + 1)
        prior = float(y.mean())
        self.edges = edges
        self.probs = (hits + prior * self.prior_strength) / (cnt + self.prior_strength)
        return self

    def predict(self, scores: Any) -> np.ndarray:
        z = score_to_logit(scores)
        p = self.probs[np.searchsorted(self.edges, z, side="left")]
        return np.where(np.isnan(z), np.nan, p)  # no score, no confidence (as the other methods)

    def params(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "probs": self.probs.tolist(), "n_bins": self.n_bins,
                "prior_strength": self.prior_strength}

    @classmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "HistogramBinning":
        n_bins = _param_number(params, "n_bins") if "n_bins" in params else 10
        if n_bins != int(n_bins):
            raise ValueError(f"params.n_bins must be a whole number, got {params['n_bins']!r}")
        prior = _param_number(params, "prior_strength") if "prior_strength" in params else 2.0
        return cls(feature=feature, edges=_param_array(params, "edges"),
                   probs=_param_array(params, "probs", probabilities=True), n_bins=int(n_bins), prior_strength=prior)


class LogisticCalibrator(Calibrator):
    """Logistic regression on several features: p = sigmoid(b + sum_i w_i * x_i).

    Used where a tier's confidence is combined with what else is known when it answers (the calibrated
    confidence of its own answer as a logit, agreement with tiers already consulted, answer format,
    prompt length). ``feature`` names the first feature; ``features`` lists them all, and ``predict``
    takes an (n, k) array in that order (a 1-D array is read as the single feature). Ridge-regularised
    (``l2``), numpy only.
    """

    method = "logistic"
    required_params = ("coef",)
    optional_params = ("features", "intercept", "l2")

    def __init__(self, feature: str = "mean_logprob", features: Any = None, coef: Any = None,
                 intercept: float = 0.0, l2: float = 1e-2) -> None:
        super().__init__(feature)
        self.features = list(features) if features else [feature]
        self.coef = _as_array(coef) if coef is not None else np.zeros(len(self.features))
        if self.coef.size != len(self.features):
            raise ValueError("logistic calibrator needs one coefficient per feature")
        self.intercept = float(intercept)
        self.l2 = float(l2)
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {l2!r}")

    def _matrix(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.shape[1] != len(self.features):
            raise ValueError(f"logistic calibrator expects {len(self.features)} features, got {x.shape[1]}")
        return x

    def fit(self, scores: Any, correct: Any) -> "LogisticCalibrator":
        x = self._matrix(scores)
        y = _as_array(correct)
        if x.shape[0] != y.size or y.size == 0:
            raise ValueError("fit needs equal, non-empty features and labels")
        w = _newton_logistic(np.column_stack([np.ones(y.size), x]), y, l2=self.l2)
        self.intercept, self.coef = float(w[0]), w[1:]
        return self

    def predict(self, scores: Any) -> np.ndarray:
        return sigmoid(self._matrix(scores) @ self.coef + self.intercept)

    @property
    def inputs(self) -> list[str]:
        return list(self.features)

    def with_feature(self, feature: str) -> "Calibrator":
        if len(self.features) != 1:
            raise ValueError(f"a calibrator of {len(self.features)} features ({', '.join(self.features)}) "
                             "cannot be read from one other feature")
        out = super().with_feature(feature)
        out.features = [feature]  # type: ignore[attr-defined]
        return out

    def predict_one(self, features: Mapping[str, float]) -> float:
        missing = [f for f in self.features if f not in features]
        if missing:
            raise KeyError(f"calibrator needs features {missing!r}")
        return float(self.predict(np.array([[float(features[f]) for f in self.features]]))[0])

    def params(self) -> dict[str, Any]:
        return {"features": list(self.features), "coef": self.coef.tolist(), "intercept": self.intercept,
                "l2": self.l2}

    @classmethod
    def from_params(cls, feature: str, params: Mapping[str, Any]) -> "LogisticCalibrator":
        features = params.get("features")
        if features is not None and (not isinstance(features, list) or not features
                                     or not all(isinstance(f, str) for f in features)):
            raise ValueError(f"params.features must be a non-empty list of feature names, got {features!r}")
        return cls(feature=feature, features=features, coef=_param_array(params, "coef"),
                   intercept=_param_number(params, "intercept") if "intercept" in params else 0.0,
                   l2=_param_number(params, "l2") if "l2" in params else 1e-2)


#: the one-score methods (``--method`` choices); ``logistic`` is the multi-feature extension
METHODS: tuple[str, ...] = ("temperature", "platt", "isotonic", "histogram")


def make_calibrator(method: str, feature: str = "mean_logprob") -> Calibrator:
    """A fresh, unfitted calibrator of the named method.

    ``histogram:N`` is histogram binning with N bins (plain ``histogram``: 10).
    """
    name, _, arg = method.partition(":")
    cls = Calibrator._registry.get(name)
    if cls is None:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(sorted(Calibrator._registry))}")
    if arg:
        if name != "histogram" or not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"bad calibration method {method!r} (only histogram:N takes an argument)")
        return HistogramBinning(feature=feature, n_bins=int(arg))
    return cls(feature=feature)


def calibrator_from_dict(d: Mapping[str, Any]) -> Calibrator:
    """Rebuild a calibrator from its artifact dict; raises ValueError naming what is wrong."""
    if not isinstance(d, Mapping):
        raise ValueError("calibrator artifact must be a JSON object")
    fmt = d.get("format", ARTIFACT_FORMAT)
    if fmt != ARTIFACT_FORMAT:
        raise ValueError(f"not a calibrator artifact (format {fmt!r})")
    version = d.get("version", ARTIFACT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"calibrator artifact version must be a whole number, got {version!r}")
    if version > ARTIFACT_VERSION:
        raise ValueError(f"calibrator artifact version {version!r} is newer than this engine reads "
                         f"({ARTIFACT_VERSION})")
    method = d.get("method")
    cls = Calibrator._registry.get(method) if isinstance(method, str) else None  # ([] or {}: unhashable)
    if cls is None:
        raise ValueError(f"unknown calibrator method {method!r}; known: {', '.join(sorted(Calibrator._registry))}")
    feature = d.get("feature", "mean_logprob")
    if not isinstance(feature, str):
        raise ValueError(f"feature must be a feature name, got {feature!r}")
    if "params" not in d:
        raise ValueError(f"the {method} calibrator has no params (it needs "
                         f"{', '.join(cls.required_params) or 'an empty mapping'})")
    params = d["params"]
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of {method} parameters "
                         f"({', '.join(cls.required_params + cls.optional_params)}), got {params!r}")
    unknown = sorted(k for k in params if k not in cls.required_params + cls.optional_params)
    missing = [k for k in cls.required_params if k not in params]
    if unknown or missing:
        what = ([f"unknown parameter(s) {unknown}"] if unknown else []) + \
               ([f"missing parameter(s) {missing}"] if missing else [])
        raise ValueError(f"{method} calibrator: {' and '.join(what)}; its parameters are "
                         f"{', '.join(cls.required_params + cls.optional_params)}")
    for key in ("fitted_on", "metrics"):
        if not isinstance(d.get(key, {}), Mapping):
            raise ValueError(f"{key} must be a mapping, got {d[key]!r}")
    cal = cls.from_params(feature, params)
    cal.fitted_on = dict(d.get("fitted_on", {}))
    cal.metrics = dict(d.get("metrics", {}))
    return cal


def load_calibrator(path: str | Path) -> Calibrator:
    try:
        p = expand_path(path, "calibrator artifact")
    except ConfigError as exc:  # a ValueError as every other fault of the artifact, which callers say where
        raise ValueError(str(exc)) from None
    try:
        mode = p.stat().st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a pipe, a device: read, it would wait or never end
            raise ValueError(f"calibrator artifact {p} is not a regular file")
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if p.is_symlink():  # a link there, to nothing (a rollback to a version that is gone): name what it names
            raise ValueError(f"calibrator artifact not found: {p} is a link to {os.readlink(p)}, "
                             "which is not there") from None
        raise ValueError(f"calibrator artifact not found: {p}") from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read calibrator artifact {p}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read calibrator artifact {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"calibrator artifact {p} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"calibrator artifact {p} is nested too deeply to be one") from None
    return calibrator_from_dict(data)


def save_calibrator(cal: Calibrator, path: str | Path) -> Path:
    """Write the artifact, atomically (OSError on failure)."""
    from calibration.output import dumps, write_file

    return write_file(path, dumps(cal.to_dict(), indent=2, sort_keys=True) + "\n")  # strict JSON: NaN is null
