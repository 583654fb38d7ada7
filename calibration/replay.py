"""Offline replay: fit calibrators and an escalation policy on TRAIN, then run TEST through the chain.

Every question of the test file goes through the chain with the fitted policy, using the stored answers,
correctness and costs of each model. Nothing fitted ever sees the test file's labels; the test file is
only replayed and scored (plus, clearly labelled, the *in-sample anchor*: the best single raw-logprob
threshold tuned on the test file itself, the yardstick the issue asks us to beat).

The policy (see ``fit_policy``):

1. Every tier of the chain gets a one-score calibrator of its raw confidence logprob. The method
   (temperature, platt, isotonic, histogram) is chosen per tier by held-out NLL on folds of TRAIN.
2. Optionally (``features=True``, the default) a tier's confidence is refined by a small logistic model
   on what is known when that tier answers: its calibrated confidence (as a logit), whether its answer
   agrees with the tiers already consulted, and whether the answer has the expected format.
3. The policy may consult any sub-chain of the given chain that ends at the last tier (e.g. skip a
   middle tier that never pays for itself), with one threshold per consulted tier. Thresholds are
   chosen on TRAIN with a statistical margin on the quality (``calibration.thresholds``).
4. If no sub-chain beats the last tier's cost at the quality target, the verdict is ``direct``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from calibration import metrics
from calibration.calibrators import (
    METHODS,
    Calibrator,
    LogisticCalibrator,
    TemperatureScaling,
    make_calibrator,
)
from calibration.data import (
    SPLIT_HINT,
    CascadeData,
    answer_agreement,
    answer_format_ok,
    check_both_outcomes,
    check_disjoint,
)
from calibration.selection import kfold_indices, select_calibrator
from calibration.thresholds import (
    Outcome,
    SearchResult,
    TierArrays,
    best_single_threshold,
    bootstrap_intervals,
    oracle_outcome,
    run_policy,
    search_thresholds,
    z_for,
)
from cascade.errors import ConfigError, DataError

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _noop(what: str, done: int, total: int) -> None:  # pragma: no cover - trivial
    return None


@dataclass
class ReplayConfig:
    max_quality_drop: float = 0.005
    objective: str = "quality"  # or "budget"
    cost_budget: float | None = None  # USD per request, for objective "budget"
    confidence: float = 0.9  # one-sided level of the quality lower bound
    method: str = "auto"  # calibration method of every tier, or "auto" (held-out NLL on TRAIN folds)
    criterion: str = "nll"  # selection criterion for "auto" (the policy's per-tier scores)
    #: the first tier's reported calibrator (ece_calibrated): chosen by held-out ECE among these
    report_methods: tuple[str, ...] = ("temperature", "platt", "isotonic", "histogram", "histogram:5")
    report_criterion: str = "ece"
    features: bool = True  # agreement / answer-format features beyond each tier's own confidence
    subchains: bool = True  # may skip tiers of the chain
    folds: int = 5
    seed: int = 0
    n_boot: int = 1000
    #: threshold grid: up to ``grid_size`` quantiles per tier, at most ``max_candidates`` combinations per
    #: sub-chain. A coarse grid tempers the winner's curse of the cheapest-feasible choice.
    grid_size: int = 20
    max_candidates: int = 2000
    #: among candidates within this fraction of the cheapest feasible cost, take the highest lower bound
    cost_slack: float = 0.0
    #: cross-validate the whole fitting procedure on TRAIN and tighten the level until it holds
    cv_guard: bool = True
    guard_levels: tuple[float, ...] = (0.9, 0.95, 0.99, 0.999)
    #: fit the first tier's reported calibrator (off inside the guard's cross-validation, which needs none)
    report: bool = True
    #: one-sided level of the held-out check (0.5: the pooled held-out difference itself must be within the drop)
    guard_confidence: float = 0.5

    def validate(self) -> None:
        if not (0.0 <= self.max_quality_drop <= 1.0):
            raise ConfigError(f"--max-quality-drop must be in [0, 1], got {self.max_quality_drop}")
        if self.objective not in ("quality", "budget"):
            raise ConfigError(f"objective must be quality or budget, got {self.objective!r}")
        if self.objective == "budget" and not (self.cost_budget and 0 < self.cost_budget < math.inf):
            raise ConfigError(f"--cost-budget must be a positive, finite USD amount per request, got {self.cost_budget}")
        if self.method != "auto" and self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; known: auto, {', '.join(METHODS)}")
        if not (0.5 <= self.confidence < 1.0):
            raise ConfigError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if self.folds < 2:
            raise ConfigError("--folds must be at least 2")


# --- features --------------------------------------------------------------------------------------


class _Features:
    """Raw per-question inputs of every tier, and pairwise answer agreement, computed once."""

    def __init__(self, data: CascadeData, chain: Sequence[str]) -> None:
        self.chain = list(chain)
        self.n = len(data)
        self.logprob = {m: data.tier(m).logprob for m in chain}
        self.correct = {m: data.tier(m).correct for m in chain}
        self.cost = {m: data.tier(m).cost for m in chain}
        self.fmt = {m: np.array([answer_format_ok(a) for a in data.tier(m).answer]) for m in chain}
        answers = {m: data.tier(m).answer for m in chain}
        self.answered = {m: data.tier(m).acceptable for m in chain}
        self.agree: dict[tuple[str, str], np.ndarray] = {}
        for a, b in itertools.combinations(chain, 2):
            v = np.array([answer_agreement(x, y) for x, y in zip(answers[a], answers[b])])
            self.agree[(a, b)] = self.agree[(b, a)] = v

    def design(self, tier: str, prefix: Sequence[str], base_prob: np.ndarray,
               prefix_probs: Sequence[np.ndarray] = (), names: Sequence[str] | None = None
               ) -> tuple[np.ndarray, list[str]]:
        """Feature matrix of ``tier`` answering after ``prefix`` was consulted.

        With ``names`` (a fitted model's features) exactly those columns; without, every candidate
        column that is not constant on this data.
        """
        cols: dict[str, np.ndarray] = {"conf_logit": _logit(base_prob), "format_ok": self.fmt[tier]}
        if prefix:
            prev = prefix[-1]
            a_prev = self.agree[(tier, prev)]
            cols["agree_prev"] = a_prev
            if len(prefix) > 1:
                cols["agree_any"] = np.max(np.stack([self.agree[(tier, p)] for p in prefix]), axis=0)
            if prefix_probs:
                # the previous tier's own confidence, counted only where it agrees with this tier
                cols["agree_prev_x_prev_logit"] = a_prev * _logit(prefix_probs[-1])
        if names is None:
            names = [k for k, v in cols.items() if k == "conf_logit" or v.min() != v.max()]
        return np.column_stack([cols[k] for k in names]), list(names)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.clip(np.log(p) - np.log1p(-p), -12.0, 12.0)


# --- fitting ---------------------------------------------------------------------------------------


@dataclass
class TierModel:
    name: str
    calibrator: Calibrator  # one-score calibrator of the raw confidence logprob
    selection: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyStep:
    tier: str
    prefix: list[str]
    logistic: LogisticCalibrator | None  # None: the tier's one-score calibrator is its confidence


@dataclass
class FittedPolicy:
    chain: list[str]
    tiers: dict[str, TierModel]
    subchain: list[str]  # tiers consulted, in order; [last] for "direct"
    steps: list[PolicyStep]  # one per consulted tier but the last
    thresholds: list[float | None]  # per consulted tier but the last
    search: SearchResult
    considered: list[dict[str, Any]] = field(default_factory=list)
    temperature: float = 1.0  # the first tier's temperature-scaling fit, reported always
    config: ReplayConfig = field(default_factory=ReplayConfig)
    #: the first tier's calibrator as reported (ece_calibrated); chosen by held-out ECE on TRAIN folds
    report_calibrator: Calibrator | None = None
    report_selection: dict[str, Any] = field(default_factory=dict)
    #: the cross-validated guard: levels tried with their held-out lower bounds, and the level used
    guard: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.search.verdict

    def thresholds_by_model(self) -> dict[str, float | None]:
        """Threshold per tier of the given chain but the last; None where the tier is not consulted."""
        out: dict[str, float | None] = {m: None for m in self.chain[:-1]}
        for step, t in zip(self.steps, self.thresholds):
            out[step.tier] = t
        return out


def _fit_tier_calibrator(method: str, lp: np.ndarray, y: np.ndarray, cfg: ReplayConfig) -> tuple[Calibrator, dict]:
    if method == "auto":
        sel = select_calibrator(lp, y, METHODS, cfg.criterion, cfg.folds, cfg.seed, feature="raw_conf_logprob")
        return sel.calibrator, sel.to_dict()
    return make_calibrator(method, "raw_conf_logprob").fit(lp, y), {"method": method}


def _subchains(chain: Sequence[str], allow: bool) -> list[list[str]]:
    """Sub-chains ending at the last tier, at least two tiers long (the full chain first)."""
    last = chain[-1]
    body = list(chain[:-1])
    if not allow:
        return [list(chain)]
    out = []
    for r in range(len(body), 0, -1):
        for combo in itertools.combinations(body, r):
            out.append(list(combo) + [last])
    return out


def _step_scores(feats: _Features, sub: Sequence[str], base: dict[str, np.ndarray], y: dict[str, np.ndarray],
                 fit_idx: np.ndarray, pred_idx: np.ndarray, use_features: bool,
                 models: dict | None = None) -> list[np.ndarray]:
    """Confidence of each consulted tier (but the last) on ``pred_idx``, fitting logistic steps on
    ``fit_idx``. ``base`` holds each tier's one-score calibrated probability on all questions."""
    scores = []
    for j, tier in enumerate(sub[:-1]):
        if not use_features:
            scores.append(base[tier][pred_idx])
            if models is not None:
                models[(tuple(sub[:j]), tier)] = None
            continue
        prefix = list(sub[:j])
        x, names = feats.design(tier, prefix, base[tier], [base[p] for p in prefix])
        lr = LogisticCalibrator(feature=names[0], features=names)
        lr.fit(x[fit_idx], y[tier][fit_idx])
        scores.append(lr.predict(x[pred_idx]))
        if models is not None:
            models[(tuple(prefix), tier)] = lr
    return scores


def fit_policy(train: CascadeData, chain: Sequence[str], cfg: ReplayConfig | None = None,
               progress: Progress = _noop) -> FittedPolicy:
    """Fit calibrators and thresholds on TRAIN only.

    With ``cfg.cv_guard`` (the default, quality objective) the whole fitting procedure is first
    cross-validated on TRAIN: fit on k-1 folds, replay the held-out fold, pool the held-out quality
    differences against the last tier. Picking the cheapest of many candidate policies favours the
    luckiest, so the in-sample lower bound is optimistic; the held-out differences are not. The least
    strict confidence level in ``cfg.guard_levels`` whose held-out lower bound stays within the allowed
    drop is used for the final fit on all of TRAIN; if none passes, the verdict is ``direct``.
    """
    cfg = cfg or ReplayConfig()
    cfg.validate()
    if not cfg.cv_guard or cfg.objective != "quality" or len(chain) < 2:
        return _fit_once(train, chain, cfg, progress)
    chain = train.check_models(chain)
    n = len(train)
    if n < 2 * cfg.folds:
        raise DataError(f"{train.path}: the training split has {len(train)} questions; "
                        f"at least {2 * cfg.folds} are needed")
    if n - -(-n // cfg.folds) < 2 * cfg.folds:  # too few questions to cross-validate the whole procedure
        pol = _fit_once(train, chain, replace(cfg, cv_guard=False), progress)
        pol.guard = {"skipped": f"{n} training questions are too few to cross-validate the fit"}
        pol.config = cfg
        return pol
    ref = train.tier(chain[-1]).correct
    levels = sorted({cfg.confidence, *[lv for lv in cfg.guard_levels if lv > cfg.confidence]})
    folds = kfold_indices(n, cfg.folds, cfg.seed + 1)
    z0 = z_for(cfg.guard_confidence)
    checks: list[dict[str, Any]] = []
    total = len(levels) * len(folds) + 1
    done = 0
    for level in levels:
        inner = replace(cfg, confidence=level, cv_guard=False, n_boot=0, report=False)
        d = np.zeros(n)
        any_cascade = False
        for fold in folds:
            mask = np.ones(n, dtype=bool)
            mask[fold] = False
            pol = _fit_once(train.subset(np.flatnonzero(mask)), chain, inner)
            held = train.subset(fold)
            out = apply_policy(pol, held)
            d[fold] = out.correct - ref[fold]
            any_cascade |= pol.verdict == "cascade"
            done += 1
            progress(f"cross-validating the guard (level {level:g})", done, total)
        gains, losses = int((d > 0).sum()), int((d < 0).sum())
        lb = (gains - losses) / n - z0 * math.sqrt(gains + losses) / n
        ok = lb >= -cfg.max_quality_drop - 1e-12
        checks.append({"level": level, "heldout_gains": gains, "heldout_losses": losses,
                       "heldout_quality_diff": (gains - losses) / n, "heldout_lower_bound": lb,
                       "any_fold_cascades": any_cascade, "passed": ok})
        if ok:
            pol = _fit_once(train, chain, replace(cfg, confidence=level, cv_guard=False), progress)
            pol.guard = {"levels_tried": checks, "level_used": level}
            pol.config = cfg
            return pol
        if not any_cascade:  # stricter levels cannot cascade either
            break
    pol = _fit_once(train, chain, replace(cfg, cv_guard=False), progress)
    return _as_direct(pol, train, chain, checks, cfg)


def _as_direct(pol: FittedPolicy, train: CascadeData, chain: list[str], checks: list[dict[str, Any]],
               cfg: ReplayConfig) -> FittedPolicy:
    """Turn a fitted policy into the ``direct`` verdict because the cross-validated guard failed."""
    last = train.tier(chain[-1])
    q = float(last.correct.mean())
    c = float(last.cost.mean())
    res = SearchResult("direct", [None] * (len(chain) - 1), cfg.objective, q, q, 0.0, c, c, len(train),
                       z_for(cfg.confidence), pol.search.candidates,
                       "policies fit on part of TRAIN lost more than the allowed quality on the held-out part "
                       "(cross-validated guard), at every confidence level tried")
    res.intervals = {"cost_ratio": {"estimate": 1.0, "low": 1.0, "high": 1.0},
                     "escalation_rate": {"estimate": 0.0, "low": 0.0, "high": 0.0},
                     "quality": {"estimate": q, "low": q, "high": q},
                     "quality_diff": {"estimate": 0.0, "low": 0.0, "high": 0.0},
                     "in_sample_choice": {"policy_chain": pol.subchain, "train_cost_ratio": pol.search.cost_ratio}}
    out = FittedPolicy(list(chain), pol.tiers, [chain[-1]], [], [], res, pol.considered, pol.temperature, cfg,
                       pol.report_calibrator, pol.report_selection)
    out.guard = {"levels_tried": checks, "level_used": None}
    return out


def _fit_once(train: CascadeData, chain: Sequence[str], cfg: ReplayConfig,
              progress: Progress = _noop) -> FittedPolicy:
    """One fit of calibrators and thresholds on TRAIN (no cross-validated guard)."""
    chain = train.check_models(chain)
    if len(set(chain)) != len(chain):
        raise ConfigError(f"--chain names a model twice: {','.join(chain)}")
    if len(train) < 2 * cfg.folds:
        raise DataError(f"{train.path}: the training split has {len(train)} questions; "
                        f"at least {2 * cfg.folds} are needed")
    feats = _Features(train, chain)
    n = len(train)
    y = feats.correct
    subs = _subchains(chain, cfg.subchains) if len(chain) > 1 else []
    total = len(chain) + 1 + len(subs)
    done = 0

    # 1. one-score calibrators per tier, method chosen on TRAIN folds
    tiers: dict[str, TierModel] = {}
    for m in chain:
        cal, sel = _fit_tier_calibrator(cfg.method, feats.logprob[m], y[m], cfg)
        tiers[m] = TierModel(m, cal, sel)
        done += 1
        progress("calibrating tiers", done, total)
    temperature = TemperatureScaling("raw_conf_logprob").fit(feats.logprob[chain[0]], y[chain[0]]).temperature
    if cfg.method == "auto" and cfg.report:
        rsel = select_calibrator(feats.logprob[chain[0]], y[chain[0]], cfg.report_methods, cfg.report_criterion,
                                 cfg.folds, cfg.seed, feature="raw_conf_logprob", repeats=3)
        report_cal, report_sel = rsel.calibrator, rsel.to_dict()
    else:
        report_cal, report_sel = tiers[chain[0]].calibrator, tiers[chain[0]].selection
    extra = {"report_calibrator": report_cal, "report_selection": report_sel}

    if len(chain) == 1:
        res = SearchResult("direct", [], cfg.objective, float(y[chain[0]].mean()), float(y[chain[0]].mean()), 0.0,
                           float(feats.cost[chain[0]].mean()), float(feats.cost[chain[0]].mean()), n, 0.0, 1,
                           "a chain of one tier")
        return FittedPolicy(chain, tiers, [chain[0]], [], [], res, [], temperature, cfg, **extra)

    # 2. every step's score on TRAIN, from models fit on all of TRAIN. (Thresholds must live on the scale
    # of the models that are deployed: thresholds picked on out-of-fold scores do not transfer when the
    # score has ties, e.g. a model that is certain, logprob 0, on a third of the questions.)
    base_all = {m: tiers[m].calibrator.predict(feats.logprob[m]) for m in chain}
    all_idx = np.arange(n)
    step_models: dict = {}
    scores: dict[tuple[str, ...], list[np.ndarray]] = {}
    for s in subs:
        scores[tuple(s)] = _step_scores(feats, s, base_all, y, all_idx, all_idx, cfg.features, step_models)
    done += 1
    progress("scoring train", done, total)

    # 3. threshold search per sub-chain; keep the best
    ref = y[chain[-1]]
    found: list[tuple[list[str], SearchResult]] = []
    considered = []
    unaffordable: list[ConfigError] = []
    for s in subs:
        arrays = [TierArrays(m, scores[tuple(s)][j] if j < len(s) - 1 else np.zeros(n), y[m], feats.cost[m],
                             feats.answered[m]) for j, m in enumerate(s)]
        try:
            res = search_thresholds(arrays, objective=cfg.objective, max_quality_drop=cfg.max_quality_drop,
                                    cost_budget=cfg.cost_budget, reference_correct=ref, confidence=cfg.confidence,
                                    grid_size=cfg.grid_size, max_candidates=cfg.max_candidates,
                                    n_boot=0, seed=cfg.seed, cost_slack=cfg.cost_slack)
        except ConfigError as exc:  # no policy of this sub-chain fits the budget: another one may
            unaffordable.append(exc)
            considered.append({"subchain": s, "verdict": "over budget", "reason": exc.message})
            done += 1
            progress("searching thresholds", done, total)
            continue
        considered.append({"subchain": s, "verdict": res.verdict, "train_cost_ratio": res.cost_ratio,
                           "train_quality": res.quality, "quality_diff_lower_bound": res.quality_diff_lower_bound})
        if res.verdict == "cascade":
            found.append((s, res))
        done += 1
        progress("searching thresholds", done, total)
    best = _pick(found, cfg)
    last_alone = float(feats.cost[chain[-1]].mean())
    if best is None and len(unaffordable) == len(subs) and last_alone > (cfg.cost_budget or 0.0) * (1 + 1e-12):
        raise unaffordable[0]  # nothing fits the budget, the last tier alone neither

    if best is None:
        direct = search_thresholds([TierArrays(chain[-1], np.zeros(n), ref, feats.cost[chain[-1]])],
                                   objective="quality", max_quality_drop=cfg.max_quality_drop,
                                   confidence=cfg.confidence)
        direct.verdict = "direct"
        direct.reason = _direct_reason(considered, cfg)
        q = float(ref.mean())
        direct.intervals = {"cost_ratio": {"estimate": 1.0, "low": 1.0, "high": 1.0},
                            "escalation_rate": {"estimate": 0.0, "low": 0.0, "high": 0.0},
                            "quality": {"estimate": q, "low": q, "high": q},
                            "quality_diff": {"estimate": 0.0, "low": 0.0, "high": 0.0},
                            "best_train_cost_ratio_at_target": _best_considered(considered)}
        return FittedPolicy(chain, tiers, [chain[-1]], [], [], direct, considered, temperature, cfg, **extra)
    sub, res = best
    # intervals of the chosen operating point: paired bootstrap over TRAIN questions
    arrays = [TierArrays(m, scores[tuple(sub)][j] if j < len(sub) - 1 else np.zeros(n), y[m], feats.cost[m],
                         feats.answered[m]) for j, m in enumerate(sub)]
    if cfg.n_boot > 0:
        res.intervals = bootstrap_intervals(arrays, res.thresholds, ref, n_boot=cfg.n_boot, seed=cfg.seed)
    steps = [PolicyStep(t, list(sub[:j]), step_models[(tuple(sub[:j]), t)]) for j, t in enumerate(sub[:-1])]
    return FittedPolicy(chain, tiers, list(sub), steps, list(res.thresholds), res, considered, temperature, cfg,
                        **extra)


def _pick(found: list[tuple[list[str], SearchResult]], cfg: ReplayConfig) -> tuple[list[str], SearchResult] | None:
    """The best sub-chain: cheapest (within ``cost_slack``, then highest lower bound) for the quality
    objective; best quality, then cheapest, under a budget."""
    if not found:
        return None
    if cfg.objective == "quality":
        cmin = min(r.cost for _, r in found)
        near = [(s, r) for s, r in found if r.cost <= cmin * (1 + cfg.cost_slack) + 1e-15]
        return min(near, key=lambda sr: (-sr[1].quality_diff_lower_bound, sr[1].cost) if cfg.cost_slack > 0
                   else (sr[1].cost, -sr[1].quality_diff_lower_bound))
    return min(found, key=lambda sr: (-sr[1].quality, sr[1].cost))


def _best_considered(considered: list[dict[str, Any]]) -> float | None:
    vals = [c["train_cost_ratio"] for c in considered if c.get("train_cost_ratio") is not None]
    return float(min(vals)) if vals else None


def _direct_reason(considered: list[dict[str, Any]], cfg: ReplayConfig) -> str:
    if cfg.objective == "budget":
        return "no sub-chain beats the last tier alone within the budget"
    return (f"no thresholds on any sub-chain cost less than the last tier alone while keeping the quality "
            f"lower bound within {cfg.max_quality_drop:g} of it on TRAIN")


def policy_scores(policy: FittedPolicy, data: CascadeData) -> list[np.ndarray]:
    """Scores of every consulted tier (but the last) on new data."""
    feats = _Features(data, policy.chain)
    base = {m: policy.tiers[m].calibrator.predict(feats.logprob[m]) for m in policy.chain}
    out = []
    for step in policy.steps:
        if step.logistic is None:
            out.append(base[step.tier])
        else:
            x, _ = feats.design(step.tier, step.prefix, base[step.tier], [base[p] for p in step.prefix],
                                names=step.logistic.features)
            out.append(step.logistic.predict(x))
    return out


def apply_policy(policy: FittedPolicy, data: CascadeData) -> Outcome:
    """Run every question of ``data`` through the fitted policy."""
    data.check_models(policy.chain)
    n = len(data)
    scores = policy_scores(policy, data)
    arrays = []
    for j, m in enumerate(policy.subchain):
        t = data.tier(m)
        arrays.append(TierArrays(m, scores[j] if j < len(scores) else np.zeros(n), t.correct, t.cost, t.acceptable))
    return run_policy(arrays, policy.thresholds)


# --- the replay report -----------------------------------------------------------------------------


def check_inputs(train: CascadeData, test: CascadeData, chain: Sequence[str], split: bool = False,
                 hint: str = SPLIT_HINT) -> list[str]:
    """What a replay of ``chain`` refuses before any fit, for every caller (``cascade replay`` and the benchmark
    script alike): a last tier that costs $0 on every question of TRAIN or TEST (every cost ratio is against it),
    a TEST file that holds most of TRAIN's questions (``check_disjoint``; not checked for ``split``, disjoint
    parts of one file; ``hint`` says what to do about it), and a first tier with one outcome on TRAIN (nothing to
    calibrate). DataError naming the file; returns the warnings (a few questions of TEST also in TRAIN)."""
    for d in (train, test):
        if not d.tier(chain[-1]).cost.sum() > 0:
            raise DataError(f"{d.path}: the last tier {chain[-1]!r} costs $0 on every question of the "
                            f"{'training' if d is train else 'test'} split, so no cost ratio against it is "
                            "defined: end the chain with a tier that has a cost")
    overlap = None if split else check_disjoint(train, test, hint)
    check_both_outcomes(train.tier(chain[0]).correct, chain[0], f"the training split of {train.path}")
    return [overlap] if overlap else []


def _r(x: float, nd: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


def replay(train: CascadeData, test: CascadeData, chain: Sequence[str], cfg: ReplayConfig | None = None,
           progress: Progress = _noop) -> tuple[dict[str, Any], FittedPolicy]:
    """Fit on TRAIN, replay TEST; returns (the JSON-ready report, the fitted policy)."""
    cfg = cfg or ReplayConfig()
    chain = train.check_models(chain)
    test.check_models(chain)
    if len(test) == 0:
        raise DataError(f"{test.path}: the test split is empty")
    policy = fit_policy(train, chain, cfg, progress)
    out = apply_policy(policy, test)

    first, last = chain[0], chain[-1]
    t_first, t_last = test.tier(first), test.tier(last)
    raw_p = np.exp(t_first.logprob)
    cal_p = policy.report_calibrator.predict(t_first.logprob)
    strong_cost = float(t_last.cost.mean())
    strong_q = float(t_last.correct.mean())
    cost_ratio = out.mean_cost / strong_cost if strong_cost > 0 else float("nan")
    a_first = TierArrays(first, raw_p, t_first.correct, t_first.cost)
    a_last = TierArrays(last, np.zeros(len(test)), t_last.correct, t_last.cost)
    orc = oracle_outcome(a_first, a_last)
    oracle_ratio = orc.mean_cost / strong_cost if strong_cost > 0 else float("nan")

    def captured(cr: float) -> float:
        denom = 1.0 - oracle_ratio
        return (1.0 - cr) / denom if denom > 0 else float("nan")

    # escalations: questions answered by a tier after the first one consulted
    escalated = out.stop > 0
    n_esc = int(escalated.sum())
    wasted = np.zeros(len(test))
    for j, m in enumerate(policy.subchain[:-1]):
        wasted += np.where(out.stop > j, test.tier(m).cost, 0.0)
    # escalations that were not needed: a tier escalated from (any of them) was already right
    right_in_hand = np.zeros(len(test), dtype=bool)
    for j, m in enumerate(policy.subchain[:-1]):
        right_in_hand |= (out.stop > j) & (test.tier(m).correct > 0.5)
    unneeded = int(right_in_hand.sum())
    # an empty answer (or one without a confidence) is never accepted, by the engine nor by the policy: nor by
    # the anchor, which would otherwise be charged for accepting it or credited with it
    anchor = best_single_threshold(np.where(t_first.acceptable, t_first.logprob, -np.inf), a_first, a_last,
                                   cfg.max_quality_drop)
    anchor["savings_captured"] = captured(anchor["cost_ratio"])

    report: dict[str, Any] = {
        "train": train.path, "test": test.path, "dataset": test.dataset, "chain_name": test.chain,
        "chain": list(chain), "n_train": len(train), "n_test": len(test),
        "max_quality_drop": cfg.max_quality_drop, "objective": cfg.objective,
        "first_tier": first,
        "calibration_method": _method_label(policy.report_calibrator),
        "calibration_selection": policy.report_selection,
        "ece_raw": _r(metrics.ece(raw_p, t_first.correct)),
        "ece_calibrated": _r(metrics.ece(cal_p, t_first.correct)),
        # ECE >= |mean confidence - accuracy|: a shift of the first tier's accuracy between TRAIN and TEST
        # that its confidence does not follow puts a floor under the ECE of any calibrator fit on TRAIN
        "accuracy_first_train": _r(float(train.tier(first).correct.mean())),
        "accuracy_first_test": _r(float(t_first.correct.mean())),
        "mean_confidence_calibrated": _r(float(cal_p.mean())),
        "ece_floor_mean_gap": _r(abs(float(cal_p.mean()) - float(t_first.correct.mean()))),
        "ece_equal_mass_raw": _r(metrics.ece(raw_p, t_first.correct, strategy="quantile")),
        "ece_equal_mass_calibrated": _r(metrics.ece(cal_p, t_first.correct, strategy="quantile")),
        "brier_raw": _r(metrics.brier(raw_p, t_first.correct)),
        "brier_calibrated": _r(metrics.brier(cal_p, t_first.correct)),
        "auroc_raw": _r(metrics.auroc(raw_p, t_first.correct)),
        "auroc_calibrated": _r(metrics.auroc(cal_p, t_first.correct)),
        "temperature": _r(policy.temperature),
        "thresholds": [policy.thresholds_by_model()[m] for m in chain[:-1]],
        "thresholds_by_model": policy.thresholds_by_model(),
        "policy_chain": list(policy.subchain),
        "verdict": policy.verdict,
        "test_quality": _r(out.quality),
        "strong_quality": _r(strong_q),
        "quality_diff": _r(out.quality - strong_q),
        "cost_ratio": _r(cost_ratio),
        "oracle_cost_ratio": _r(oracle_ratio),
        "oracle_quality": _r(orc.quality),
        "savings_captured": _r(captured(cost_ratio)),
        "escalation_rate": _r(n_esc / len(test)),
        "escalation_waste_ratio": _r(float(wasted.sum()) / float(out.cost.sum()) if out.cost.sum() > 0 else 0.0),
        "unneeded_escalation_share": _r(unneeded / n_esc if n_esc else 0.0),
        "answered_by": {m: int((out.stop == j).sum()) for j, m in enumerate(policy.subchain)},
        "mean_cost_usd": _r(out.mean_cost, 10),
        "strong_mean_cost_usd": _r(strong_cost, 10),
        "expected_from_train": _train_expectations(policy),
        "guard": policy.guard,
        "anchor_in_sample": {k: (_r(v) if isinstance(v, float) else v) for k, v in anchor.items()},
        "tier_calibration": {m: policy.tiers[m].selection for m in chain},
        "reason": policy.search.reason,
        "considered_on_train": [{k: (_r(v) if isinstance(v, float) else v) for k, v in c.items()}
                                for c in policy.considered],
    }
    return report, policy


def _method_label(cal: Calibrator) -> str:
    if cal.method == "histogram":
        return f"histogram:{getattr(cal, 'n_bins', 10)}"
    return cal.method


def _train_expectations(policy: FittedPolicy) -> dict[str, Any]:
    s = policy.search
    iv = s.intervals or {}
    return {
        "quality_diff_lower_bound": _r(s.quality_diff_lower_bound),
        "confidence": policy.config.confidence,
        "cost_ratio": iv.get("cost_ratio"),
        "escalation_rate": iv.get("escalation_rate"),
        "quality": iv.get("quality"),
        "quality_diff": iv.get("quality_diff"),
    }
