"""Drift alarms: a rolling escalation rate, a rolling cost against the last tier alone, and a rolling ECE
where labels exist, on the server's traffic.

Configured by the ``drift:`` section::

    drift:
      window: 200                    # recent answered requests (and labelled answers) in the window
      escalation_rate: [0.05, 0.60]  # alarm when the rolling rate leaves this band
      max_ece: 0.15                  # alarm when the rolling ECE exceeds this...
      min_labels: 30                 # ...once this many answers carry a label
      max_cost_ratio: 1.0            # alarm when the window cost more than the last tier alone would have

The escalation rate and the cost ratio (the window's spend over its last-tier-alone baseline: above 1.0 the
small tiers cost more in escalations than they save, the case a cascade must show) are judged once the
window is full. Labels come from user feedback (``POST
/v1/feedback``: score 1 = right, -1 = wrong, 0 = no label) on the confidence of the answer served; the ECE
uses ``calibration.metrics.ece``. Each signal has a Prometheus gauge ``cascade_drift_alarm{signal}``
(1 while out of band) and ``cascade_drift_value{signal}`` (the rolling value); a log line on the
``cascade.drift`` logger says when an alarm goes on (warning) and off (info), once per transition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from cascade.config import DriftConfig
from cascade.types import CascadeRecord

log = logging.getLogger("cascade.drift")

SIGNALS = ("escalation_rate", "ece", "cost_ratio")


class DriftMonitor:
    def __init__(self, config: DriftConfig, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.alarm_gauge = Gauge("cascade_drift_alarm", "1 while a drift signal is outside its configured band",
                                 ["signal"], registry=self.registry)
        self.value_gauge = Gauge("cascade_drift_value", "Rolling value of a drift signal over the window",
                                 ["signal"], registry=self.registry)
        #: (request id, escalated) of recent answered requests
        self._escalated: deque[tuple[str, int]] = deque(maxlen=config.window)
        #: (request id, spend, last-tier-alone baseline) of the same requests
        self._costs: deque[tuple[str, float, float]] = deque(maxlen=config.window)
        #: requests whose row was made ``cancelled`` (:meth:`forget`), for one observed after it (bounded)
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        #: (confidence, label) of recently labelled answers, one per request: its latest feedback
        self._labelled: OrderedDict[str, tuple[float, int]] = OrderedDict()
        #: served confidence of recent requests, for feedback that arrives later (bounded)
        self._confidence: OrderedDict[str, float] = OrderedDict()
        self._keep = max(4 * config.window, 1000)
        self._lock = threading.Lock()
        #: requests that started before this (a :meth:`reset`) are not observed
        self._since = 0.0
        #: when this monitor started: an answer another process served before it is not labelled from the ledger
        #: (:meth:`observe_feedback`), as one this process served before a reset is not
        self._started = time.time()
        self.alarms: dict[str, bool] = {s: False for s in SIGNALS}
        self.values: dict[str, float | None] = {s: None for s in SIGNALS}
        for s in SIGNALS:  # every series from the start: NaN while a signal has no value (as after a reset)
            self.alarm_gauge.labels(s).set(0)
            self.value_gauge.labels(s).set(float("nan"))

    # --- inputs ----------------------------------------------------------------------------------
    def observe(self, rec: CascadeRecord) -> None:
        """One finished request (answered requests of a policy count; pinned tiers never escalate)."""
        if rec.status not in ("ok", "partial") or not rec.tier or rec.policy == rec.tier:
            return
        if rec.created_at < self._since:  # decided by what a reload has since replaced (see :meth:`reset`)
            return
        with self._lock:
            if rec.request_id in self._forgotten:  # its row was made cancelled before its write was heard
                return
            self._escalated.append((rec.request_id, int(rec.escalated)))
            self._costs.append((rec.request_id, rec.cost_usd, rec.baseline_cost_usd))
            if rec.confidence is not None:
                self._confidence[rec.request_id] = float(rec.confidence)
                while len(self._confidence) > self._keep:
                    self._confidence.popitem(last=False)
            self._check_escalation()
            self._check_cost()

    def forget(self, request_id: str) -> None:
        """A request observed as answered whose row was since made ``cancelled`` (its client left an answer in
        hand before any of it went out): out of the windows, as it is out of the ledger's answered requests (the
        reports' escalation rate; a request cancelled while it ran is never observed). One not observed yet is
        left out when it is."""
        with self._lock:
            self._forgotten[request_id] = None
            while len(self._forgotten) > self._keep:
                self._forgotten.popitem(last=False)
            if not any(rid == request_id for rid, _ in self._escalated):
                return
            # (deque's maxlen is kept: rebuilt whole, the window's order as it was)
            self._escalated = deque(((rid, e) for rid, e in self._escalated if rid != request_id),
                                    maxlen=self.config.window)
            self._costs = deque(((rid, c, b) for rid, c, b in self._costs if rid != request_id),
                                maxlen=self.config.window)
            self._check_escalation()
            self._check_cost()

    def observe_feedback(self, request_id: str, score: int, answered_by: str | None = None,
                         served: tuple[float, float] | None = None) -> None:
        """A label for a recent answer: score > 0 right, < 0 wrong, 0 no label. The latest feedback on a
        request is its label (a user who changes their mind replaces it; repeating it counts once).
        ``answered_by``: the request whose answer it served (a response-cache hit's original, whose
        confidence it carries); each request served is labelled on its own, so one caller's 0 on a hit never
        withdraws another's label on the original. ``served``: (confidence, created_at) of the answer as its
        ledger row has them, for an answer another replica served (behind a load balancer, feedback reaches
        any replica; without it, each would judge only the labels that happened to come back to it): counted
        when it was served since this monitor started or was last reset, and the policy decided it (not a
        pinned tier's: those are never observed)."""
        if self.config.max_ece is None:
            return
        with self._lock:
            conf = self._confidence.get(answered_by or request_id)
            if conf is None and served is not None and served[1] >= max(self._since, self._started):
                conf = float(served[0])
            if conf is None:
                return
            self._labelled.pop(request_id, None)
            if score != 0:
                self._labelled[request_id] = (conf, 1 if score > 0 else 0)
                while len(self._labelled) > self.config.window:
                    self._labelled.popitem(last=False)
            self._check_ece()

    # --- judging ---------------------------------------------------------------------------------
    def _check_escalation(self) -> None:
        n = len(self._escalated)
        rate = sum(e for _, e in self._escalated) / n if n else None
        self._set_value("escalation_rate", rate)
        band = self.config.escalation_rate
        if band is None or n < self.config.window or rate is None:
            return
        lo, hi = band
        self._transition("escalation_rate", not (lo <= rate <= hi),
                         f"escalation rate {rate:.3f} over the last {n} answered requests "
                         f"is outside [{lo:g}, {hi:g}]",
                         f"escalation rate {rate:.3f} over the last {n} answered requests is back within "
                         f"[{lo:g}, {hi:g}]")

    def _check_cost(self) -> None:
        n = len(self._costs)
        spend, base = sum(c for _, c, _ in self._costs), sum(b for _, _, b in self._costs)
        # spend against a free last tier (priced 0) is infinitely dearer; nothing spent at all says nothing
        ratio = spend / base if base > 0 else (float("inf") if spend > 0 else None)
        self._set_value("cost_ratio", ratio)
        limit = self.config.max_cost_ratio
        if limit is None or n < self.config.window or ratio is None:
            return
        self._transition("cost_ratio", ratio > limit,
                         f"the last {n} answered requests cost {ratio:.2f}x what the last tier alone would have "
                         f"(limit {limit:g}x): escalations cost more than the earlier tiers save",
                         f"the last {n} answered requests cost {ratio:.2f}x the last tier alone, back within "
                         f"{limit:g}x")

    def _check_ece(self) -> None:
        from calibration.metrics import ece

        n = len(self._labelled)
        e = ece([c for c, _ in self._labelled.values()], [y for _, y in self._labelled.values()]) if n else None
        self._set_value("ece", e)
        limit = self.config.max_ece
        if limit is None:
            return
        if n < self.config.min_labels:  # labels withdrawn below the minimum: no longer judged
            self._transition("ece", False, "", f"only {n} labelled answers left (fewer than "
                                               f"{self.config.min_labels}): the ECE is not judged")
            return
        self._transition("ece", e > limit, f"ECE {e:.3f} of the last {n} labelled answers exceeds {limit:g}",
                         f"ECE {e:.3f} of the last {n} labelled answers is back within {limit:g}")

    def _set_value(self, signal: str, v: float | None) -> None:
        self.values[signal] = v
        self.value_gauge.labels(signal).set(float("nan") if v is None else v)  # NaN: no value now

    def _transition(self, signal: str, out_of_band: bool, on_msg: str, off_msg: str) -> None:
        if out_of_band == self.alarms[signal]:
            return
        self.alarms[signal] = out_of_band
        self.alarm_gauge.labels(signal).set(1 if out_of_band else 0)
        if out_of_band:
            log.warning("drift alarm on: %s", on_msg)
        else:
            log.info("drift alarm off: %s", off_msg)

    def reset(self, why: str) -> None:
        """Start every window afresh (a reload changed the thresholds or calibrators: the rolling values
        judge what decides now, not a mixture with what decided before); ``why`` ends any alarm on."""
        with self._lock:
            self._since = time.time()  # requests already running finish with the old: left out too
            self._escalated.clear()
            self._costs.clear()
            self._forgotten.clear()
            self._labelled.clear()
            self._confidence.clear()  # feedback on an answer of the old calibrators labels nothing here
            for signal in SIGNALS:
                self._set_value(signal, None)
                self._transition(signal, False, "", why)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"window": self.config.window, "requests": len(self._escalated), "labelled": len(self._labelled),
                    "values": dict(self.values), "alarms": dict(self.alarms)}


__all__ = ["DriftMonitor", "SIGNALS"]
