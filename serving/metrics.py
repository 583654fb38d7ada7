"""Prometheus metrics of one app (its own registry: no process-global state)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cascade.cache import ResponseCache
from cascade.config import DriftConfig
from cascade.limits import Admission
from cascade.types import Attempt, CascadeRecord

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


#: the ``policy`` label of a request for a model that is neither a policy nor a tier (a client's free text:
#: one label for all of them, so no client can create series)
UNKNOWN_MODEL = "(unknown)"


class Metrics:
    def __init__(self, drift: "DriftConfig | None" = None, models: "Iterable[str] | None" = None) -> None:
        #: the policy and tier names a request's ``policy`` label may take (None: any)
        self.models = frozenset(models) if models is not None else None
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cascade_requests", "Requests by policy, serving tier and status",
                                ["policy", "tier", "status"], registry=r)
        self.escalations = Counter("cascade_escalations", "Requests answered by a later tier than the first",
                                   ["policy"], registry=r)
        self.escalation_rate = Gauge("cascade_escalation_rate", "Escalated / answered requests, per policy",
                                     ["policy"], registry=r)
        self.attempts = Counter("cascade_attempts", "Tier attempts by decision", ["tier", "decision"], registry=r)
        self.cost = Counter("cascade_cost_usd", "Spend per tier and policy (all attempts)", ["policy", "tier"],
                            registry=r)
        self.waste = Counter("cascade_escalation_waste_usd", "Cost of attempts whose answer was not served",
                             ["policy", "tier"], registry=r)
        self.baseline = Counter("cascade_baseline_cost_usd", "What the last tier alone would have cost",
                                ["policy"], registry=r)
        self.latency = Histogram("cascade_request_latency_seconds", "Total request latency", ["policy"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("cascade_time_to_first_token_seconds", "Time from a streamed request to its first token "
                              "(the buffered tiers' answers included)", ["policy"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.routing = Histogram("cascade_routing_overhead_seconds",
                                 "Engine time outside backend calls and the waits before them (features, policy, "
                                 "accounting)",
                                 buckets=_OVERHEAD_BUCKETS, registry=r)
        self.errors = Counter("cascade_errors", "Errors by class", ["error_class"], registry=r)
        self.corrected = Counter("cascade_requests_corrected", "Requests counted answered (status ok) whose client "
                                 "then left the streamed answer: the ledger row is now partial or cancelled",
                                 ["policy", "tier", "status"], registry=r)
        self.cache_hits = Counter("cascade_cache_hits", "Requests answered from the response cache (no tier ran; "
                                  "not counted in the escalation rate)", ["policy"], registry=r)
        self.shadow_calls = Counter("cascade_shadow_sample_calls", "Calls made by sampled shadow policies "
                                    "(tiers the live path skipped), by outcome", ["shadow", "tier", "outcome"],
                                    registry=r)
        self.shadow_cost = Counter("cascade_shadow_sample_cost_usd", "Spend of sampled shadow policies (never "
                                   "counted in cascade_cost_usd)", ["shadow", "tier"], registry=r)
        self._children: dict[tuple, object] = {}
        self._answered: dict[str, int] = {}
        self._escalated: dict[str, int] = {}
        #: escalated requests with one of their two halves seen (request id -> 'written' or 'served')
        self._escalation_halves: dict[str, str] = {}
        #: drift alarms (cascade/drift.py) when the config has a `drift:` section
        self.drift = None
        if drift is not None:
            from cascade.drift import DriftMonitor

            self.drift = DriftMonitor(drift, registry=r)

    def watch_cache(self, cache: "ResponseCache | None") -> None:
        """Read the response cache's size at every scrape (no such series while it is off), expired answers
        dropped first. The scrape runs on the event loop (an ``async`` route), where the cache lives."""
        if cache is not None:
            def entries() -> float:
                cache.expire()
                return len(cache)

            def held_bytes() -> float:
                cache.expire()
                return cache.bytes

            Gauge("cascade_cache_entries", "Answers held by the response cache",
                  registry=self.registry).set_function(entries)
            Gauge("cascade_cache_bytes", "Estimated memory held by the response cache (bounded by cache.max_bytes)",
                  registry=self.registry).set_function(held_bytes)

    def watch_admission(self, admission: "Admission") -> None:
        """Read at every scrape how many completion requests are in flight (admitted, not finished): what a
        drain waits for, and the figure ``server.max_concurrent_requests`` caps."""
        Gauge("cascade_requests_in_flight", "Completion requests admitted and not yet finished",
              registry=self.registry).set_function(lambda: admission.in_flight)

    def watch_breakers(self, tiers: "Mapping[str, Any]") -> None:
        """Read every provider's circuit breaker at every scrape: ``cascade_breaker_state{tier, provider,
        state}`` is 1 for its state (closed, open, half_open) and 0 for the others, and
        ``cascade_provider_rate_limited_seconds{tier, provider}`` what is left of its last Retry-After (tiers
        without providers have no breakers, and no series)."""
        from cascade.resilience import ResilientBackend

        watched = {name: t.backend for name, t in tiers.items() if isinstance(t.backend, ResilientBackend)}
        if not watched:
            return

        class Breakers:
            def collect(self) -> "Iterable[Any]":
                from prometheus_client.core import GaugeMetricFamily

                fam = GaugeMetricFamily("cascade_breaker_state", "1 for each provider's circuit breaker state",
                                        labels=["tier", "provider", "state"])
                held = GaugeMetricFamily("cascade_provider_rate_limited_seconds",
                                         "Seconds left of the Retry-After a provider's last 429 asked for",
                                         labels=["tier", "provider"])
                for tier, backend in watched.items():
                    for provider, snap in backend.health().items():
                        for state in ("closed", "open", "half_open"):
                            fam.add_metric([tier, provider, state], 1.0 if snap["state"] == state else 0.0)
                        held.add_metric([tier, provider], snap["rate_limited_s"])
                yield fam
                yield held

        self.registry.register(Breakers())

    def _child(self, metric: "Counter | Gauge | Histogram", *labels: str):  # noqa: ANN202
        """``metric.labels(*labels)``, looked up once per label set (prometheus' ``labels`` validates and
        locks on every call; the children themselves are thread-safe)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _policy_label(self, rec: CascadeRecord) -> str:
        """The record's policy as a label: one the server serves, ``(unknown)`` for a client's unknown model
        name (no client can create series), or ``-`` for a request refused before it named one (a body that was
        no JSON), in every family alike (an empty label value is no label to Prometheus)."""
        if not rec.policy:
            return "-"
        return rec.policy if self.models is None or rec.policy in self.models else UNKNOWN_MODEL

    def observe(self, rec: CascadeRecord) -> None:
        child = self._child
        policy = self._policy_label(rec)
        child(self.requests, policy, rec.tier or "-", rec.status).inc()
        if rec.error_class:
            child(self.errors, rec.error_class).inc()
        for a in rec.attempts:
            child(self.attempts, a.tier, a.decision or "-").inc()
            if a.cost_usd:
                child(self.cost, policy, a.tier).inc(a.cost_usd)
                if not a.kept:
                    child(self.waste, policy, a.tier).inc(a.cost_usd)
        # every request's, as its cost is counted whatever its status (the ledger's report sums the same)
        child(self.baseline, policy).inc(rec.baseline_cost_usd)
        if rec.status not in ("ok", "partial"):  # (a stream's answer that went out, its row lost: no escalation)
            self._escalation_halves.pop(rec.request_id, None)
        if rec.cached_from is not None:  # no tier ran: not a cascade decision, nor a drift signal
            if rec.status == "ok":  # a hit whose ledger write failed answered nobody
                # (counted in cache_hits once its answer goes out: observe_served)
                child(self.latency, policy).observe(rec.latency_ms / 1e3)
            return
        if rec.status in ("ok", "partial") and rec.tier:
            p = policy
            if rec.escalated:  # counted once its answer has gone out too (observe_served)
                self._escalation_half(rec, "written")
            self._count_answered(p, rec.escalated, 1)
            child(self.latency, p).observe(rec.latency_ms / 1e3)
            # the waits before provider attempts (a rate-limit backoff, a provider's Retry-After) are the
            # providers' time as their calls are, not the engine's: counted here, one Retry-After of a second
            # made the engine look a second slow
            backend_ms = sum(a.latency_ms + a.wait_ms for a in rec.attempts)
            self.routing.observe(max(rec.latency_ms - backend_ms, 0.0) / 1e3)
        if self.drift is not None:
            self.drift.observe(rec)

    def observe_served(self, rec: CascadeRecord) -> None:
        """A request whose answer began to go out (a whole response once its row committed, a stream's first chunk,
        or its end when no chunk came). A cache hit is counted then, not when its row is written as served: a
        client that leaves before any of it goes out has its row made ``cancelled``, a hit that answered nobody,
        which the report's cache_hits leaves out (a counter cannot take it back). An escalated request is counted
        once both its row is written as answered and its answer went out, whichever comes last: an answer in hand
        is written before it goes out, a live stream's after, and the report's escalated counts neither a
        cancelled row nor one lost."""
        if rec.cached_from is not None:
            self._child(self.cache_hits, self._policy_label(rec)).inc()
        elif rec.escalated:
            self._escalation_half(rec, "served")

    def _escalation_half(self, rec: CascadeRecord, half: str) -> None:
        """One of an escalated request's two halves (``written``, ``served``): counted with the second."""
        seen = self._escalation_halves.pop(rec.request_id, None)
        if seen is None:
            self._escalation_halves[rec.request_id] = half
        elif seen != half:
            self._child(self.escalations, self._policy_label(rec)).inc()

    def _count_answered(self, policy: str, escalated: bool, n: int) -> None:
        """Add ``n`` (1, or -1 for one no longer answered) to a policy's answered requests, and to its escalated
        ones if ``escalated``; its escalation rate follows (NaN when none is left)."""
        answered = self._answered[policy] = self._answered.get(policy, 0) + n
        escalated_now = self._escalated[policy] = self._escalated.get(policy, 0) + (n if escalated else 0)
        self._child(self.escalation_rate, policy).set(escalated_now / answered if answered else float("nan"))

    def observe_shadow_call(self, shadow: str, attempt: Attempt) -> None:
        """One call of a sampled shadow (a ``ShadowSampler`` listener)."""
        self._child(self.shadow_calls, shadow, attempt.tier, "error" if attempt.error_class else "ok").inc()
        if attempt.cost_usd:
            self._child(self.shadow_cost, shadow, attempt.tier).inc(attempt.cost_usd)

    def observe_client_left(self, rec: CascadeRecord, status: str, error_class: str) -> None:
        """A streamed answer in hand, counted answered when its row was written, that its client left: the
        ledger row is made ``status`` (an engine ``correction_listeners`` listener)."""
        policy = self._policy_label(rec)
        self._child(self.corrected, policy, rec.tier or "-", status).inc()
        self._child(self.errors, error_class).inc()
        # an escalated answer in hand waiting to go out: some went out (partial: the route may not have seen its
        # first chunk leave) or none did, no escalation in the ledger
        if self._escalation_halves.pop(rec.request_id, None) == "written" and status == "partial":
            self._child(self.escalations, policy).inc()
        if status == "cancelled":  # none of the answer went out: the ledger makes its attempts unkept, all waste
            for a in rec.attempts:
                if a.kept and a.cost_usd:
                    self._child(self.waste, policy, a.tier).inc(a.cost_usd)
            if rec.cached_from is None and self._answered.get(policy):  # nor is it answered: out of the
                self._count_answered(policy, rec.escalated, -1)         # escalation rate, as in the ledger's
            if self.drift is not None:  # no longer an answered request: out of the drift windows
                self.drift.forget(rec.request_id)

    def observe_error(self, error_class: str) -> None:
        self._child(self.errors, error_class).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
