"""Confidence features computed from an answer's token logprobs.

Every feature is a float. Logprob features are log-probabilities (<= 0), floored at ``LOGPROB_FLOOR`` so
that a backend's ``-inf`` or ``-9999`` placeholder cannot dominate a mean. An answer with no tokens gets
the floor for every logprob feature and ``n_tokens == 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

LOGPROB_FLOOR = -30.0

FEATURE_NAMES: tuple[str, ...] = (
    "mean_logprob",         # mean token logprob (log of the geometric-mean token probability)
    "min_logprob",          # the least likely token
    "q10_logprob",          # 10th percentile of token logprobs
    "q25_logprob",          # 25th percentile
    "first_token_logprob",  # the first answer token (e.g. the answer letter)
    "first_token_prob",     # exp(first_token_logprob)
    "sum_logprob",          # sequence logprob
    "n_tokens",
    "mean_margin",          # mean (top1 - top2) logprob gap, where alternatives were returned
    "mean_topk_entropy",    # mean entropy (nats) of the renormalised top-k distribution
)

#: the confidence stored in a cascade-outputs line (the shared data's answer-letter or self-check "Y"
#: logprob), the offline commands' default score; the engine does not compute it
RAW_SCORE = "raw_conf_logprob"
#: the scores calibrators can be fit on offline: log-probabilities (a calibrator maps a logprob to a probability)
SCORES: tuple[str, ...] = (RAW_SCORE, *(f for f in FEATURE_NAMES if f.endswith("_logprob")))


def score_source(score: str) -> str:
    """Where a score comes from in a cascade-outputs line (an artifact's ``fitted_on.feature_source``)."""
    return score if score == RAW_SCORE else f"features.{score}"


class _TokenLike(Protocol):
    logprob: float
    top: Sequence  # of objects with .logprob


def _floor(x: float | None) -> float:
    """A logprob, floored at ``LOGPROB_FLOOR`` and capped at 0 (a log of a probability: a value above 0 that
    reached here is a certainty, never more); None and NaN give the floor (NaN fails the comparison)."""
    if x is None or not (x := float(x)) >= LOGPROB_FLOOR:
        return LOGPROB_FLOOR
    return x if x <= 0.0 else 0.0


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of an already sorted list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def extract_features(tokens: Sequence[_TokenLike], top_k: int | None = None) -> dict[str, float]:
    """Features of one answer from its generated tokens (each with ``.logprob`` and ``.top``).

    ``top_k``: read only each token's ``top_k`` most likely alternatives. The engine passes its tier's
    ``top_logprobs``: a client may ask for more alternatives (up to 20) to see them, and the top-k features
    (the entropy) must still be those the tier's calibrator was fit on, or the same answer's confidence would
    depend on what the client asked to see. None: every alternative given.

    On the request path of every attempt: plain loops over the tokens, one pass.
    """
    exp, log = math.exp, math.log
    lps: list[float] = []
    margins: list[float] = []
    entropies: list[float] = []
    for t in tokens:
        lps.append(_floor(t.logprob))
        top = t.top
        if top:
            alts = [_floor(a.logprob) for a in top]
            alts.sort(reverse=True)
            if top_k is not None:
                del alts[top_k:]
            if len(alts) < 2:
                continue
            margins.append(alts[0] - alts[1])
            probs = [exp(a) for a in alts]
            z = sum(probs)
            entropies.append(-sum([(q := p / z) * log(q) for p in probs if p > 0]))
    if not lps:
        empty = {name: LOGPROB_FLOOR for name in FEATURE_NAMES}
        empty.update(n_tokens=0.0, first_token_prob=0.0, mean_margin=0.0, mean_topk_entropy=0.0,
                     sum_logprob=LOGPROB_FLOOR)
        return empty
    s = sorted(lps)
    total = sum(lps)
    n = len(lps)
    return {
        "mean_logprob": total / n,
        "min_logprob": s[0],
        "q10_logprob": _quantile(s, 0.10),
        "q25_logprob": _quantile(s, 0.25),
        "first_token_logprob": lps[0],
        "first_token_prob": exp(lps[0]),
        "sum_logprob": max(total, LOGPROB_FLOOR * 10),
        "n_tokens": float(n),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        "mean_topk_entropy": sum(entropies) / len(entropies) if entropies else 0.0,
    }


def feature_value(features: Mapping[str, float], name: str) -> float:
    try:
        return float(features[name])
    except KeyError:
        raise KeyError(f"feature {name!r} not computed; known: {', '.join(sorted(features))}") from None
