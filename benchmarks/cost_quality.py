"""Cost-quality curves of routers and cascades between a weak and a strong model, from stored outputs.

    .venv/bin/python -m benchmarks.cost_quality --shared [--out results/shared]
    .venv/bin/python -m benchmarks.cost_quality --live results/live/quick [--out DIR (default: the --live folder)]
    .venv/bin/python -m benchmarks.cost_quality --train A.jsonl [--test B.jsonl] [--weak M1 --strong M2]

:func:`cost_quality` works on any ``cascade_outputs``-shaped file (``calibration.data.load_cascade_outputs``)
or pair of files; :func:`load_routerbench` turns a RouterBench CSV into the same structure. Everything that
is fitted (calibrators, thresholds, the prompt-length direction) is fitted on TRAIN; curves and metrics are
measured on TEST. Files without a test split are split in halves with a fixed seed.

Routers, each a curve as its threshold sweeps (the x-axis is the share of requests that reach the strong
model; for cascades that is the escalation rate):

* ``calibrated_cascade``: the project's calibrated confidence of the weak tier, fitted on TRAIN by
  ``calibration.replay.fit_policy`` (calibration method chosen by held-out NLL on TRAIN folds, then the
  feature step on the calibrated logit and the answer format). Escalated requests pay both models.
* ``calibrated_cascade_token_features`` (live runs only): a ridge logistic model on the weak tier's token
  logprob features (``calibration.features``) fitted on TRAIN. Pays both.
* ``raw_logprob_cascade``: the weak tier's raw confidence logprob, uncalibrated. Pays both.
* ``random``: random mixing (its expectation). Pays one model.
* ``prompt_length``: longer prompts go to the strong model (direction chosen on TRAIN). Pays one.
* ``oracle``: escalate exactly when the weak answer is wrong, paying both (the ``cascade replay`` oracle).
* ``oracle_router``: send exactly the questions the weak model gets wrong (and the strong one right) to
  the strong model, paying one (RouteLLM's "optimal" line).
* ``always_small`` / ``always_large``: single points.

Metrics (RouteLLM, arXiv 2406.18665, as its ``evaluate.py`` computes them): PGR = (q - q_weak) /
(q_strong - q_weak); ``apgr``: the trapezoid average of PGR over strong-call % at 0, 10, ..., 100 %
(RouteLLM's 10 buckets), ``apgr_fine`` the same on 1 % steps; ``cpt50`` / ``cpt80``: the strong-call %
needed to reach PGR 0.5 / 0.8 (linear between points, None when never reached). Ties in a router's score
are broken at random *in expectation* (values interpolate linearly across a tie group).

``savings_at_equal_quality``: the cheapest point of the curve whose quality is at least q_strong - drop,
as ``cost_ratio`` (cost / strong alone) and ``savings_captured`` = (1 - cost_ratio) / (1 - oracle cost
ratio). Read on the TEST curve, this is a best case (the threshold is picked on the data it is scored
on); the out-of-sample numbers are in ``operating_points``: thresholds fitted on TRAIN, applied to TEST
(the calibrated cascade's is ``cascade replay``'s policy, with its statistical margin; the raw one is the
cheapest single raw-logprob threshold meeting the target on TRAIN).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, check_out, machine_facts, rel, shared_data_dir, to_jsonable, write_json
from cascade.errors import CascadeError, DataError

CALL_GRID = np.linspace(0.0, 1.0, 101)  # strong-call share, 1 % steps
BUCKETS = np.linspace(0.0, 1.0, 11)  # RouteLLM's 10 buckets
TOKEN_FEATURES = ("mean_logprob", "min_logprob", "q25_logprob", "mean_margin", "mean_topk_entropy",
                  "answer_token_margin", "n_tokens")
ROUTERS = ("calibrated_cascade", "calibrated_cascade_token_features", "raw_logprob_cascade", "random",
           "prompt_length", "oracle", "oracle_router", "always_small", "always_large")
SEED = 0


# --- curves ----------------------------------------------------------------------------------------


@dataclass
class Curve:
    """Expected quality and mean cost when the k lowest-scored questions go to the strong model, k = 0..n."""

    quality: np.ndarray  # (n + 1,)
    cost: np.ndarray  # (n + 1,) mean USD per request

    @property
    def call(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.quality.size)


def escalation_curve(score: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray,
                     weak_cost: np.ndarray, strong_cost: np.ndarray, pays_both: bool) -> Curve:
    """The curve of a threshold on ``score`` (higher = keep the weak answer), ties in expectation."""
    s = np.asarray(score, dtype=np.float64)
    n = s.size
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    dq = (strong_correct - weak_correct)[order].astype(np.float64)
    dc = (strong_cost if pays_both else strong_cost - weak_cost)[order].astype(np.float64)
    cq = np.concatenate(([0.0], np.cumsum(dq)))
    cc = np.concatenate(([0.0], np.cumsum(dc)))
    # tie groups: values at group boundaries are exact; inside a group they interpolate linearly
    bounds = np.concatenate(([0], np.flatnonzero(ss[1:] != ss[:-1]) + 1, [n]))
    k = np.arange(n + 1)
    q = np.interp(k, bounds, cq[bounds])
    c = np.interp(k, bounds, cc[bounds])
    base_q = float(weak_correct.sum())
    base_c = float(weak_cost.sum())
    return Curve((base_q + q) / n, (base_c + c) / n)


def random_curve(n: int, weak_correct: np.ndarray, strong_correct: np.ndarray, weak_cost: np.ndarray,
                 strong_cost: np.ndarray) -> Curve:
    f = np.linspace(0.0, 1.0, n + 1)
    q = (1 - f) * weak_correct.mean() + f * strong_correct.mean()
    c = (1 - f) * weak_cost.mean() + f * strong_cost.mean()
    return Curve(q, c)


def pgr(q: np.ndarray | float, q_weak: float, q_strong: float) -> np.ndarray | float | None:
    gap = q_strong - q_weak
    if not gap > 0:
        return None
    return (np.asarray(q, dtype=np.float64) - q_weak) / gap


def _trapz(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x) / 2.0))


def apgr(curve: Curve, q_weak: float, q_strong: float, grid: np.ndarray = BUCKETS) -> float | None:
    """Average PGR over the strong-call share (trapezoid over ``grid``, RouteLLM's APGR)."""
    q = np.interp(grid, curve.call, curve.quality)
    p = pgr(q, q_weak, q_strong)
    if p is None:
        return None
    return _trapz(p, grid) / (grid[-1] - grid[0])


def cpt(curve: Curve, x: float, q_weak: float, q_strong: float) -> float | None:
    """Strong-call % needed to reach PGR ``x`` (first crossing, linear between points); None if never."""
    p = pgr(curve.quality, q_weak, q_strong)
    if p is None:
        return None
    hit = np.flatnonzero(p >= x - 1e-12)
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return 0.0
    x0, x1 = curve.call[i - 1], curve.call[i]
    p0, p1 = p[i - 1], p[i]
    frac = (x - p0) / (p1 - p0) if p1 != p0 else 1.0
    return float(100.0 * (x0 + frac * (x1 - x0)))


def cheapest_at_quality(curve: Curve, target: float) -> dict[str, float] | None:
    """The cheapest point (interpolated between neighbours) with quality >= target; None if none."""
    q, c, x = curve.quality, curve.cost, curve.call
    best: tuple[float, float, float] | None = None
    ok = q >= target - 1e-12
    for i in np.flatnonzero(ok):
        cand = (float(c[i]), float(q[i]), float(x[i]))
        # where quality crosses the target between i-1 and i, the crossing point is cheaper still
        if i > 0 and not ok[i - 1] and q[i] != q[i - 1]:
            f = (target - q[i - 1]) / (q[i] - q[i - 1])
            cand = (float(c[i - 1] + f * (c[i] - c[i - 1])), float(target), float(x[i - 1] + f * (x[i] - x[i - 1])))
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None:
        return None
    return {"cost_usd": best[0], "quality": best[1], "call_pct": 100.0 * best[2]}


# --- data ------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Aligned arrays of one weak/strong pair on one split."""

    label: str
    weak: str
    strong: str
    weak_correct: np.ndarray
    strong_correct: np.ndarray
    weak_cost: np.ndarray
    strong_cost: np.ndarray
    weak_logprob: np.ndarray | None  # None: no confidence (RouterBench)
    prompt_chars: np.ndarray
    token_features: np.ndarray | None = None  # (n, k) of TOKEN_FEATURES, live runs only
    data: Any = None  # the CascadeData it came from, when it did

    def __len__(self) -> int:
        return self.weak_correct.size


def _token_features(path: str, model: str, idx: np.ndarray | None) -> np.ndarray | None:
    """The weak tier's cached ``features`` (live runs), aligned with the loader's row order."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        f = json.loads(line)["models"][model].get("features")
        if not isinstance(f, dict):
            return None
        rows.append([float(f.get(k, 0.0)) for k in TOKEN_FEATURES])
    x = np.asarray(rows, dtype=np.float64)
    return x[idx] if idx is not None else x


def pair_from_cascade(data: Any, weak: str, strong: str, idx: np.ndarray | None = None) -> PairData:
    d = data.subset(idx) if idx is not None else data
    w, s = d.tier(weak), d.tier(strong)
    return PairData(d.label, weak, strong, w.correct.astype(float), s.correct.astype(float), w.cost, s.cost,
                    w.logprob, d.prompt_chars, _token_features(data.path, weak, idx), d)


def _split_indices(n: int, seed: int = SEED, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The same fixed-seed halves as ``calibration.data.split_data`` (train, test)."""
    n_test = int(round(n * test_fraction))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_routerbench(path: str | Path, weak: str = "mistralai/mixtral-8x7b-chat",
                     strong: str = "gpt-4-1106-preview") -> PairData:
    """A RouterBench CSV as a weak/strong pair (0/1 scores, per-question cost; no logprobs).
    Rows where either model has no score are dropped."""
    import csv

    csv.field_size_limit(1 << 30)
    wc, sc, wcost, scost, chars = [], [], [], [], []
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            try:
                a, b = float(r[weak]), float(r[strong])
                ca, cb = float(r[f"{weak}|total_cost"]), float(r[f"{strong}|total_cost"])
            except (KeyError, ValueError):
                continue
            wc.append(a)
            sc.append(b)
            wcost.append(ca)
            scost.append(cb)
            chars.append(float(len(r.get("prompt") or "")))
    if not wc:
        raise ValueError(f"{p}: no rows with scores for {weak!r} and {strong!r}")
    return PairData(f"routerbench/{p.stem}", weak, strong, np.asarray(wc), np.asarray(sc), np.asarray(wcost),
                    np.asarray(scost), None, np.asarray(chars))


# --- routers ---------------------------------------------------------------------------------------


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    sd[sd == 0] = 1.0
    return (train - mu) / sd, (test - mu) / sd


def _raw_logit(lp: np.ndarray) -> np.ndarray:
    from calibration.calibrators import score_to_logit

    return score_to_logit(lp)


def _threshold_on_train(score_tr: np.ndarray, tr: PairData, drop: float, pays_both: bool) -> float | None:
    """The threshold on ``score`` (accept the weak answer when score >= t) that meets q_strong - drop at the
    least cost on TRAIN (no margin); None when no threshold saves money there."""
    s = np.asarray(score_tr, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    n = s.size
    cuts = np.concatenate(([0], np.flatnonzero(ss[1:] != ss[:-1]) + 1, [n]))
    gain = np.concatenate(([0.0], np.cumsum((tr.weak_correct - tr.strong_correct)[order])))
    save = np.concatenate(([0.0], np.cumsum(tr.strong_cost[order] - (0 if pays_both else tr.weak_cost[order]))))
    ref_q, ref_c = tr.strong_correct.mean(), tr.strong_cost.sum()
    fixed = tr.weak_cost.sum() if pays_both else 0.0
    best_c, best_t = ref_c, None
    for k in cuts[1:]:
        q = ref_q + gain[k] / n
        c = fixed + ref_c - save[k]
        if q >= ref_q - drop - 1e-12 and c < best_c - 1e-15:
            best_c, best_t = c, float(ss[k - 1])
    return best_t


def _apply_threshold(score: np.ndarray, te: PairData, t: float | None, pays_both: bool, oracle_ratio: float,
                     drop: float) -> dict[str, Any]:
    keep = np.zeros(len(te), dtype=bool) if t is None else np.asarray(score) >= t
    q = np.where(keep, te.weak_correct, te.strong_correct)
    if pays_both:
        cost = te.weak_cost + np.where(keep, 0.0, te.strong_cost)
    else:
        cost = np.where(keep, te.weak_cost, te.strong_cost)
    if t is None:  # direct: the strong model alone
        cost = te.strong_cost.copy()
    ratio = float(cost.mean() / te.strong_cost.mean())
    return {"threshold": t, "verdict": "direct" if t is None else "cascade",
            "test_quality": float(q.mean()), "strong_quality": float(te.strong_correct.mean()),
            "quality_diff": float(q.mean() - te.strong_correct.mean()),
            "within_drop": bool(q.mean() >= te.strong_correct.mean() - drop - 1e-12),
            "cost_ratio": ratio, "savings_captured": _captured(ratio, oracle_ratio),
            "strong_call_rate": float((~keep).mean())}


def _captured(ratio: float, oracle_ratio: float) -> float | None:
    d = 1.0 - oracle_ratio
    return float((1.0 - ratio) / d) if d > 0 else None


def _summarise(curve: Curve, kind: str, pays: str, q_weak: float, q_strong: float, strong_cost: float,
               oracle_ratio: float, drop: float) -> dict[str, Any]:
    q = np.interp(CALL_GRID, curve.call, curve.quality)
    c = np.interp(CALL_GRID, curve.call, curve.cost)
    p = pgr(q, q_weak, q_strong)
    best = cheapest_at_quality(curve, q_strong - drop)
    if best is not None:
        best["cost_ratio"] = best["cost_usd"] / strong_cost
        best["savings_captured"] = _captured(best["cost_ratio"], oracle_ratio)
    return {
        "kind": kind, "pays": pays,
        "curve": {"call_pct": (100 * CALL_GRID).round(2), "quality": q.round(6), "cost_usd": c,
                  "cost_ratio": (c / strong_cost).round(6), "pgr": None if p is None else np.round(p, 6)},
        "apgr": apgr(curve, q_weak, q_strong), "apgr_fine": apgr(curve, q_weak, q_strong, CALL_GRID),
        "cpt50": cpt(curve, 0.5, q_weak, q_strong), "cpt80": cpt(curve, 0.8, q_weak, q_strong),
        "savings_at_equal_quality": best,
    }


def cost_quality(train: Any, test: Any = None, *, weak: str | None = None, strong: str | None = None,
                 max_quality_drop: float = 0.005, seed: int = SEED, label: str | None = None,
                 replay_calibrated: bool = True) -> dict[str, Any]:
    """Curves and metrics of every router for one weak/strong pair.

    ``train``/``test``: paths or ``CascadeData`` (cascade_outputs shape), or :class:`PairData` (e.g. from
    :func:`load_routerbench`). Without ``test`` the train file is split in fixed-seed halves.
    Returns a JSON-ready dict; the keys are documented in ``docs/benchmarks.md``.
    """
    from calibration.data import CascadeData, load_cascade_outputs

    t0 = time.perf_counter()
    split_note = "given"
    if isinstance(train, (str, Path)):
        train = load_cascade_outputs(train)
    if isinstance(test, (str, Path)):
        test = load_cascade_outputs(test)
    if isinstance(train, CascadeData):
        weak = weak or train.models[0]
        strong = strong or train.models[-1]
        if test is None:
            tr_idx, te_idx = _split_indices(len(train), seed)
            tr = pair_from_cascade(train, weak, strong, tr_idx)
            te = pair_from_cascade(train, weak, strong, te_idx)
            split_note = f"halves of the train file (seed {seed})"
        else:
            from calibration.data import check_disjoint

            overlap = check_disjoint(train, test)  # most of TEST in TRAIN (the same file twice): a DataError
            if overlap:
                split_note = f"given; {overlap}"
            tr = pair_from_cascade(train, weak, strong)
            te = pair_from_cascade(test, weak, strong)
    else:
        tr, te = train, test
        if te is None:
            tr_idx, te_idx = _split_indices(len(train), seed)
            tr, te = _subset_pair(train, tr_idx), _subset_pair(train, te_idx)
            split_note = f"halves of the train file (seed {seed})"
        weak, strong = tr.weak, tr.strong
    drop = float(max_quality_drop)
    n = len(te)
    q_weak, q_strong = float(te.weak_correct.mean()), float(te.strong_correct.mean())
    c_weak, c_strong = float(te.weak_cost.mean()), float(te.strong_cost.mean())
    if not c_strong > 0 or not float(tr.strong_cost.mean()) > 0:
        raise DataError(f"the strong model {strong!r} costs $0 on every question of the "
                        f"{'test' if not c_strong > 0 else 'train'} part: no cost ratio against it is defined")
    wc, sc, wk, sk = te.weak_correct, te.strong_correct, te.weak_cost, te.strong_cost

    oracle_score = wc - sc  # escalate weak-wrong/strong-right first
    oracle = escalation_curve(oracle_score, wc, sc, wk, sk, pays_both=True)
    oracle_ratio = float((wk + np.where(wc < 0.5, sk, 0.0)).mean() / c_strong)  # escalate exactly when wrong

    def summ(curve: Curve, kind: str, pays: str) -> dict[str, Any]:
        return _summarise(curve, kind, pays, q_weak, q_strong, c_strong, oracle_ratio, drop)

    routers: dict[str, Any] = {}
    ops: dict[str, Any] = {}
    calib: dict[str, Any] = {}
    notes: list[str] = []
    has_conf = te.weak_logprob is not None and tr.weak_logprob is not None
    if has_conf:
        # calibrated cascade: the project's policy fit (TRAIN only), its confidence swept as a threshold
        cal_scores, rep = _calibrated(tr, te, weak, strong, drop, seed, replay_calibrated)
        routers["calibrated_cascade"] = summ(escalation_curve(cal_scores, wc, sc, wk, sk, True), "cascade", "both")
        if rep is not None:
            ops["calibrated_cascade"] = {k: rep.get(k) for k in (
                "verdict", "thresholds", "temperature", "calibration_method", "test_quality", "strong_quality",
                "quality_diff", "cost_ratio", "oracle_cost_ratio", "savings_captured", "escalation_rate",
                "escalation_waste_ratio")}
            ops["calibrated_cascade"]["source"] = "calibration.replay.replay (fit on TRAIN, margin-guarded)"
            ops["anchor_in_sample"] = rep.get("anchor_in_sample")
            calib = {k: rep.get(k) for k in ("ece_raw", "ece_calibrated", "auroc_raw", "auroc_calibrated",
                                              "brier_raw", "brier_calibrated", "temperature")}
        raw_te = te.weak_logprob
        routers["raw_logprob_cascade"] = summ(escalation_curve(raw_te, wc, sc, wk, sk, True), "cascade", "both")
        t_raw = _threshold_on_train(tr.weak_logprob, tr, drop, True)
        ops["raw_logprob_cascade"] = _apply_threshold(raw_te, te, t_raw, True, oracle_ratio, drop)
        ops["raw_logprob_cascade"]["source"] = "cheapest single raw-logprob threshold meeting the target on TRAIN"
        if tr.token_features is not None and te.token_features is not None:
            xtr = np.column_stack([_raw_logit(tr.weak_logprob), tr.token_features])
            xte = np.column_stack([_raw_logit(te.weak_logprob), te.token_features])
            xtr, xte = _standardize(xtr, xte)
            from calibration.calibrators import LogisticCalibrator

            names = ["raw_logit", *TOKEN_FEATURES]
            if len(np.unique(tr.weak_correct)) > 1:
                lr = LogisticCalibrator(feature=names[0], features=names, l2=0.05).fit(xtr, tr.weak_correct)
                s_tr, s_te = lr.predict(xtr), lr.predict(xte)
                routers["calibrated_cascade_token_features"] = summ(
                    escalation_curve(s_te, wc, sc, wk, sk, True), "cascade", "both")
                t_f = _threshold_on_train(s_tr, tr, drop, True)
                ops["calibrated_cascade_token_features"] = _apply_threshold(s_te, te, t_f, True, oracle_ratio, drop)
                ops["calibrated_cascade_token_features"]["source"] = (
                    "ridge logistic on token features, threshold meeting the target on TRAIN (no margin)")
    else:
        notes.append("no confidence logprobs in this data: the cascade routers are not applicable")
    routers["random"] = summ(random_curve(n, wc, sc, wk, sk), "router", "one")
    # prompt length: direction chosen on TRAIN by APGR
    best_dir, best_a = 1.0, -math.inf
    for direction in (1.0, -1.0):
        c_tr = escalation_curve(-direction * tr.prompt_chars, tr.weak_correct, tr.strong_correct, tr.weak_cost,
                                tr.strong_cost, False)
        a = apgr(c_tr, float(tr.weak_correct.mean()), float(tr.strong_correct.mean()))
        if a is not None and a > best_a:
            best_dir, best_a = direction, a
    pl_te = -best_dir * te.prompt_chars
    routers["prompt_length"] = summ(escalation_curve(pl_te, wc, sc, wk, sk, False), "router", "one")
    routers["prompt_length"]["direction"] = "longer prompts to strong" if best_dir > 0 else "shorter prompts to strong"
    t_pl = _threshold_on_train(-best_dir * tr.prompt_chars, tr, drop, False)
    ops["prompt_length"] = _apply_threshold(pl_te, te, t_pl, False, oracle_ratio, drop)
    ops["prompt_length"]["source"] = "prompt-length threshold meeting the target on TRAIN"
    routers["oracle"] = summ(oracle, "cascade", "both")
    routers["oracle_router"] = summ(escalation_curve(oracle_score, wc, sc, wk, sk, False), "router", "one")
    for name, (q, c, x) in {"always_small": (q_weak, c_weak, 0.0), "always_large": (q_strong, c_strong, 1.0)}.items():
        routers[name] = {"kind": "point", "pays": "one",
                         "point": {"call_pct": 100 * x, "quality": q, "cost_usd": c, "cost_ratio": c / c_strong,
                                   "pgr": pgr(q, q_weak, q_strong)}}
    if not q_strong > q_weak:
        notes.append("the strong model is not better than the weak one on TEST: PGR, APGR and CPT are undefined")
    return to_jsonable({
        "label": label or te.label, "weak": weak, "strong": strong, "split": split_note,
        "train": rel(tr.data.path) if tr.data is not None else None,
        "test": rel(te.data.path) if te.data is not None else None,
        "n_train": len(tr), "n_test": n, "max_quality_drop": drop,
        "q_weak": q_weak, "q_strong": q_strong, "cost_weak": c_weak, "cost_strong": c_strong,
        "oracle_cost_ratio": oracle_ratio,
        "routers": routers, "operating_points": ops, "calibration": calib, "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    })


def _subset_pair(p: PairData, idx: np.ndarray) -> PairData:
    return PairData(p.label, p.weak, p.strong, p.weak_correct[idx], p.strong_correct[idx], p.weak_cost[idx],
                    p.strong_cost[idx], None if p.weak_logprob is None else p.weak_logprob[idx], p.prompt_chars[idx],
                    None if p.token_features is None else p.token_features[idx],
                    None if p.data is None else p.data.subset(idx))


def _calibrated(tr: PairData, te: PairData, weak: str, strong: str, drop: float, seed: int,
                with_replay: bool) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The calibrated confidence of the weak tier on TEST (fit on TRAIN), and the replay report."""
    from calibration.replay import ReplayConfig, fit_policy, policy_scores, replay

    cfg = ReplayConfig(max_quality_drop=drop, seed=seed, subchains=False)
    if with_replay:
        rep, policy = replay(tr.data, te.data, [weak, strong], cfg)
    else:
        rep, policy = None, fit_policy(tr.data, [weak, strong], cfg)
    if policy.steps:
        return policy_scores(policy, te.data)[0], rep
    # verdict "direct": no step was kept; the tier's calibrated confidence still orders the questions
    return policy.tiers[weak].calibrator.predict(te.weak_logprob), rep


# --- plots -----------------------------------------------------------------------------------------

STYLE = {
    "calibrated_cascade": ("tab:blue", "-", "calibrated cascade"),
    "calibrated_cascade_token_features": ("tab:cyan", "-", "calibrated cascade (token features)"),
    "raw_logprob_cascade": ("tab:orange", "--", "raw-logprob cascade"),
    "random": ("tab:gray", ":", "random mixing"),
    "prompt_length": ("tab:brown", "-.", "prompt-length router"),
    "oracle": ("tab:green", "-", "oracle cascade (pays both)"),
    "oracle_router": ("tab:olive", ":", "oracle router (pays one)"),
}


def plot_case(case: dict[str, Any], path: str | Path) -> Path:
    from calibration.plots import pyplot

    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, r in case["routers"].items():
        if r["kind"] == "point" or name not in STYLE:
            continue
        color, ls, lab = STYLE[name]
        cv = r["curve"]
        a_txt = f" (APGR {r['apgr']:.2f})" if r.get("apgr") is not None else ""
        a1.plot(cv["call_pct"], cv["quality"], ls, color=color, label=lab + a_txt, lw=1.6)
        a2.plot(cv["cost_ratio"], cv["quality"], ls, color=color, label=lab, lw=1.6)
    for name, marker in (("always_small", "o"), ("always_large", "s")):
        pt = case["routers"][name]["point"]
        lab = f"{case['weak'] if name == 'always_small' else case['strong']} alone"
        a1.plot([pt["call_pct"]], [pt["quality"]], marker, color="black", label=lab)
        a2.plot([pt["cost_ratio"]], [pt["quality"]], marker, color="black")
    a1.axhline(case["q_strong"], color="red", lw=0.8, ls="--")
    a1.axhline(case["q_weak"], color="gray", lw=0.8, ls="--")
    a2.axhline(case["q_strong"] - case["max_quality_drop"], color="red", lw=0.8, ls="--")
    for name, marker, color in (("calibrated_cascade", "*", "tab:blue"), ("raw_logprob_cascade", "X", "tab:orange")):
        op = case["operating_points"].get(name)
        if op and op.get("cost_ratio") is not None:
            a2.plot([op["cost_ratio"]], [op["test_quality"]], marker, ms=12, color=color,
                    label=f"{STYLE[name][2]}: threshold fit on train")
    a1.set_xlabel("strong-model calls (%)")
    a1.set_ylabel("quality (accuracy on test)")
    a2.set_xlabel("cost / strong model alone")
    a2.set_ylabel("quality (accuracy on test)")
    title = case["label"] if "→" in case["label"] else f"{case['label']}: {case['weak']} → {case['strong']}"
    a1.set_title(title, fontsize=8)
    a2.set_title(f"n_test={case['n_test']}, target = strong − {case['max_quality_drop']:g}", fontsize=9)
    a1.legend(fontsize=7, loc="lower right")
    a2.legend(fontsize=7, loc="lower right")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# --- suites ----------------------------------------------------------------------------------------


def shared_cases(data_dir: Path) -> list[tuple[str, Any, Any, str | None, str | None]]:
    """(label, train, test, weak, strong) for every shared file: cascade_outputs/ (first -> last model of
    each chain; test split where one exists) and routerbench/ (Mixtral-8x7B -> GPT-4, RouteLLM's pair)."""
    cases: list[tuple[str, Any, Any, str | None, str | None]] = []
    co = data_dir / "cascade_outputs"
    for tr in sorted(co.glob("*_train.jsonl")):
        te = tr.with_name(tr.name.replace("_train.jsonl", "_test.jsonl"))
        label = "cascade_outputs/" + tr.stem.removesuffix("_train")
        cases.append((label, tr, te if te.exists() else None, None, None))
    rb = data_dir / "routerbench"
    for tr in sorted(rb.glob("*_train.csv")):
        te = tr.with_name(tr.name.replace("_train.csv", "_test.csv"))
        label = "routerbench/" + tr.stem.removesuffix("_train")
        try:
            cases.append((label, load_routerbench(tr), load_routerbench(te) if te.exists() else None, None, None))
        except (CascadeError, ValueError, OSError) as exc:  # reported as that case's error by run_suite
            cases.append((label, exc, None, None, None))
    return cases


def live_cases(live_dir: Path) -> list[tuple[str, Any, Any, str | None, str | None]]:
    """Every ``*_train.jsonl`` with a ``*_test.jsonl`` beside it in a live-run folder; for chains of three
    or more tiers, both first -> last and second-to-last -> last."""
    from calibration.data import load_cascade_outputs

    cases: list[tuple[str, Any, Any, str | None, str | None]] = []
    for tr in sorted(live_dir.glob("*_train.jsonl")):
        te = tr.with_name(tr.name.replace("_train.jsonl", "_test.jsonl"))
        if not te.exists():
            continue
        label = "live/" + tr.stem.removesuffix("_train")
        try:
            d = load_cascade_outputs(tr)
        except (CascadeError, ValueError, OSError) as exc:  # reported as that case's error by run_suite
            cases.append((label, exc, None, None, None))
            continue
        if len(d.models) < 2:
            cases.append((label, ValueError(f"{tr}: one model ({d.models[0]}), no weak/strong pair to compare"),
                          None, None, None))
            continue
        pairs = [(d.models[0], d.models[-1])]
        if len(d.models) >= 3:
            pairs.append((d.models[-2], d.models[-1]))
        for w, s in pairs:
            cases.append((label if len(pairs) == 1 else f"{label} [{w}→{s}]", tr, te, w, s))
    return cases


def run_suite(cases: Sequence[tuple[str, Any, Any, str | None, str | None]], out: Path, *, name: str,
              max_quality_drop: float = 0.005, plots: bool = True,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = []
    models: set[str] = set()
    for label, tr, te, w, s in cases:
        if isinstance(tr, Exception):  # its files could not even be listed
            results.append({"label": label, "error": f"{type(tr).__name__}: {tr}"})
            continue
        try:
            case = cost_quality(tr, te, weak=w, strong=s, max_quality_drop=max_quality_drop, label=label)
        except Exception as exc:  # noqa: BLE001 - one bad file must not sink the suite; it is reported
            results.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        models.update((case["weak"], case["strong"]))
        if plots:
            slug = label.replace("/", "_").replace(" ", "").replace("→", "-to-").replace("[", "_").replace("]", "")
            png = out / f"cq_{slug}.png"
            case["plot"] = rel(plot_case(case, png))
        results.append(case)
    doc = {"benchmark": f"cost_quality/{name}", "machine": machine_facts(models=sorted(models)),
           "max_quality_drop": max_quality_drop, "cases": results, **(extra or {}),
           "wall_s": round(time.perf_counter() - t0, 1)}
    if any("error" not in r for r in results):  # nothing but errors: the results already there are kept
        write_json(out / "cost_quality.json", doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cost_quality", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shared", action="store_true",
                     help="every file of the shared data's cascade_outputs/ and routerbench/ (see --data-dir)")
    src.add_argument("--live", metavar="DIR", help="every train/test pair of a live-run folder")
    src.add_argument("--train", metavar="FILE")
    ap.add_argument("--test", metavar="FILE")
    ap.add_argument("--weak")
    ap.add_argument("--strong")
    ap.add_argument("--data-dir", default=None, help="the shared data folder of --shared (default "
                    "$CASCADE_SHARED_DATA, else ../shared/data beside the repository)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-quality-drop", type=float, default=0.005)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.max_quality_drop <= 1:  # (NaN too) checked before any case runs or anything is written
        ap.error(f"--max-quality-drop must be in [0, 1] (0.005 = half a point), got {args.max_quality_drop}")
    if args.train is None and (given := [f for f in ("test", "weak", "strong") if getattr(args, f) is not None]):
        ap.error(f"--{given[0]} goes with --train (--shared and --live take every pair of their folder)")
    if args.shared:
        out, name, where = Path(args.out or RESULTS / "shared"), "shared", shared_data_dir(args.data_dir)
        cases = shared_cases(where)
    elif args.live:
        out, name, where = Path(args.out or args.live), "live", Path(args.live)
        cases = live_cases(where)
    else:
        out, name, where = Path(args.out or RESULTS / "custom"), "custom", Path(args.train)
        cases = [(Path(args.train).stem, args.train, args.test, args.weak, args.strong)]
    check_out(ap, str(out), directory=True)  # before the cases run, not after them
    if not cases:  # a wrong --data-dir or --live folder: said, and no empty results file over the real one
        print(f"cost_quality: error: no train/test files found in {where}", file=sys.stderr)
        return 2
    doc = run_suite(cases, out, name=name, max_quality_drop=args.max_quality_drop, plots=not args.no_plots)
    for c in doc["cases"]:
        if "error" in c:
            print(f"{c['label']}: ERROR {c['error']}")
            continue
        r = c["routers"]

        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

        cal = r.get("calibrated_cascade", {})
        print(f"{c['label']:45s} n={c['n_test']:4d} q_weak={c['q_weak']:.3f} q_strong={c['q_strong']:.3f} "
              f"APGR cal={f(cal.get('apgr'))} raw={f(r.get('raw_logprob_cascade', {}).get('apgr'))} "
              f"rand={f(r['random']['apgr'])} len={f(r['prompt_length']['apgr'])} oracle={f(r['oracle']['apgr'])}")
    failed = sum("error" in c for c in doc["cases"])
    if failed == len(doc["cases"]):
        print(f"cost_quality: error: every case failed; nothing written to {rel(out / 'cost_quality.json')}",
              file=sys.stderr)
        return 1
    print(f"wrote {rel(out / 'cost_quality.json')} ({doc['wall_s']} s)"
          + (f"; {failed} case(s) failed, listed above" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
