"""Shadow policies: what another policy would have done with each live request, at no extra model cost.

A shadow names a live policy (``of``) and differs from it in its chain, its thresholds and/or its
calibrators. For every finished live request of that policy, :func:`evaluate_shadow` walks the shadow's
chain over the attempts the live path already made:

* a tier the live path ran is decided again by the pure :func:`cascade.policy.decide` with the shadow's
  calibrator and threshold, on the features already in the record (no model call);
* a tier the live path did not run means the shadow's outcome is ``unknown`` (nothing is spent to find
  out; sampled shadow execution is refused by the config);
* a tier that failed on the live path is treated as failing for the shadow too: escalated past, or
  ``unknown`` when it is the shadow's last tier.

The shadow's predicted cost is the actual cost of the live attempts of the tiers it walked (actual token
counts times each tier's price). The result is one dict per shadow, written by
``Ledger.record(rec, shadows=...)`` into ``shadow_decisions`` in the same transaction as the request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.calibrators import Calibrator
from cascade.config import Config
from cascade.policy import decide
from cascade.types import Attempt, CascadeRecord

log = logging.getLogger("cascade.shadow")


@dataclass(frozen=True)
class ShadowPolicy:
    """A shadow at run time. ``calibrators`` holds only the shadow's own overrides; other tiers use the
    live tier's calibrator at evaluation time (so a reloaded live calibrator applies to shadows too)."""

    name: str
    of: str
    chain: tuple[str, ...]
    thresholds: tuple[float, ...]
    calibrators: Mapping[str, Calibrator] = field(default_factory=dict)


def build_shadow_policies(config: Config, *, build: Callable[..., Calibrator] | None = None) -> list[ShadowPolicy]:
    """The config's shadows, with thresholds resolved (shadow's, else live policy's, else the tier's)."""
    if build is None:
        from cascade.engine import build_calibrator as build
    out = []
    for name, sc in config.shadows.items():
        live = config.policies[sc.of]
        chain = tuple(sc.chain or live.chain)
        thresholds = tuple(sc.thresholds.get(t, live.thresholds.get(t, config.tier(t).threshold)) for t in chain)
        cals = {t: build(cc, tier=f"{t} (shadows.{name}.calibrators)") for t, cc in sc.calibrators.items()}
        out.append(ShadowPolicy(name=name, of=sc.of, chain=chain, thresholds=thresholds, calibrators=cals))
    return out


def _tier_outcomes(attempts: Sequence[Attempt]) -> dict[str, tuple[Attempt | None, float]]:
    """Per tier the live path tried: (its successful attempt or None if it only failed, the cost of all its
    attempts, provider fallbacks included). Budget-skipped tiers did not run and are left out."""
    out: dict[str, tuple[Attempt | None, float]] = {}
    for a in attempts:
        if a.decision == "skipped":
            continue
        ok, cost = out.get(a.tier, (None, 0.0))
        if a.error_class is None and a.features and ok is None:
            ok = a
        out[a.tier] = (ok, cost + a.cost_usd)
    return out


def evaluate_shadow(shadow: ShadowPolicy, rec: CascadeRecord,
                    live_calibrators: Mapping[str, Calibrator]) -> dict[str, Any] | None:
    """What ``shadow`` would have done with the finished live request ``rec`` (pure: no I/O, no clock).

    Returns the ``shadow_decisions`` row (without request id and time), or None when the request was not
    routed by the shadow's live policy.
    """
    if rec.policy != shadow.of:
        return None
    ran = _tier_outcomes(rec.attempts)
    cost = 0.0
    n = len(shadow.chain)
    first = shadow.chain[0]
    for i, (tname, threshold) in enumerate(zip(shadow.chain, shadow.thresholds, strict=True)):
        is_last = i == n - 1
        if tname not in ran:
            return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None, "cost_usd": None,
                    "diverges": None, "reason": f"needs tier {tname!r}, which the live path did not run"}
        att, tier_cost = ran[tname]
        cost += tier_cost
        if att is None:
            if is_last:
                return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None,
                        "cost_usd": None, "diverges": None,
                        "reason": f"its last tier {tname!r} failed on the live path"}
            continue
        cal = shadow.calibrators.get(tname) or live_calibrators.get(tname)
        if cal is None:
            return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None, "cost_usd": None,
                    "diverges": None, "reason": f"no calibrator for tier {tname!r}"}
        try:
            d = decide(att.features, cal, threshold, is_last=is_last)
        except KeyError as exc:  # the shadow's calibrator reads a feature the record lacks
            return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None, "cost_usd": None,
                    "diverges": None, "reason": f"tier {tname!r}: {exc.args[0] if exc.args else exc}"}
        if not d.escalate:
            return {"shadow": shadow.name, "status": "known", "tier": tname, "escalated": tname != first,
                    "cost_usd": cost, "diverges": tname != rec.tier,
                    "reason": f"{tname}: {d.reason}"}
    # every tier of the chain failed or escalated: only reachable when the last tier failed (handled above)
    return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None, "cost_usd": None,
            "diverges": None, "reason": "no tier of the shadow chain answered"}


class ShadowSet:
    """The shadows of one engine: ``evaluate(rec)`` gives the rows for ``Ledger.record(rec, shadows=...)``.

    Holds the engine's tier map (not a copy), so live calibrators swapped by a reload are used at once.
    Never raises: a failing shadow is logged and left out (a shadow must never break a live request).
    """

    def __init__(self, config: Config, tiers: Mapping[str, Any],
                 policy_calibrators: Mapping[str, Mapping[str, Calibrator]] | None = None) -> None:
        self.tiers = tiers
        #: the live policies' own calibrators (policy -> tier -> calibrator): a shadow of policy P is
        #: compared with what P itself uses
        self.policy_calibrators = policy_calibrators or {}
        self.policies = build_shadow_policies(config)

    def __bool__(self) -> bool:
        return bool(self.policies)

    def evaluate(self, rec: CascadeRecord) -> list[dict[str, Any]]:
        if not self.policies:
            return []
        tier_cals = {name: t.calibrator for name, t in self.tiers.items()}
        rows = []
        for sh in self.policies:
            own = self.policy_calibrators.get(sh.of)
            live = {**tier_cals, **own} if own else tier_cals
            try:
                row = evaluate_shadow(sh, rec, live)
            except Exception:  # noqa: BLE001 - never let a shadow break the live request
                log.exception("shadow %s failed on request %s", sh.name, rec.request_id)
                continue
            if row is not None:
                rows.append(row)
        return rows


__all__ = ["ShadowPolicy", "ShadowSet", "build_shadow_policies", "evaluate_shadow"]
