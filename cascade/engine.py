"""The cascade engine: routes a request through a chain of tiers and accounts for every attempt.

For each tier in order: generate (with token logprobs), compute confidence features, ask the pure policy
(:func:`cascade.policy.decide`) whether to keep the answer or escalate. The last tier always answers.
Every attempt, failed ones included, is recorded; the request's record carries the total cost, what
the last tier alone would have cost, and the escalation waste (attempts whose answer was thrown away).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from calibration.calibrators import Calibrator, calibrator_from_dict, load_calibrator
from calibration.features import extract_features
from cascade.backends import Backend, backend_class
from cascade.config import CalibratorConfig, Config, TierConfig
from cascade.errors import (
    CascadeError,
    ConfigError,
    ContextLengthExceededError,
    ProviderContextLengthError,
    ProviderTimeoutError,
    UnknownModelError,
)
from cascade.ledger import Ledger
from cascade.policy import decide
from cascade.types import Attempt, CascadeRecord, GenerationRequest, GenerationResult

log = logging.getLogger("cascade.engine")


def build_calibrator(cfg: CalibratorConfig, *, tier: str) -> Calibrator:
    try:
        if cfg.artifact:
            return load_calibrator(cfg.artifact)
        return calibrator_from_dict({"method": cfg.method, "feature": cfg.feature, "params": cfg.params})
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"tiers.{tier}.calibrator: {exc}") from exc


@dataclass
class Tier:
    """A configured tier at run time: its backend and its calibrator."""

    config: TierConfig
    backend: Backend
    calibrator: Calibrator

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Route:
    """What a request's ``model`` resolved to: a policy's chain, or one pinned tier."""

    name: str
    tiers: tuple[Tier, ...]
    thresholds: tuple[float, ...]
    pinned: bool = False


@dataclass
class Outcome:
    record: CascadeRecord
    result: GenerationResult


class Engine:
    """Holds the tiers, the policies and the ledger. Create with ``await Engine.open(config)``."""

    def __init__(self, config: Config, *, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self.tiers: dict[str, Tier] = {}
        for tc in config.tiers:
            cls = backend_class(tc.backend)
            self.tiers[tc.name] = Tier(config=tc, backend=cls.from_tier(tc, config),
                                       calibrator=build_calibrator(tc.calibrator, tier=tc.name))

    @classmethod
    async def open(cls, config: Config, *, preload: bool = False) -> "Engine":
        ledger = await Ledger(config.ledger_path(), store_text=config.ledger.store_text).open()
        try:
            engine = cls(config, ledger=ledger)
            if preload:
                await engine.start()
        except BaseException:
            await ledger.close()
            raise
        return engine

    async def start(self, names: list[str] | None = None) -> None:
        """Load the named tiers' backends (all by default), one after another (they share the CPU)."""
        for name in names or list(self.tiers):
            await self.tiers[name].backend.start()

    async def close(self) -> None:
        for tier in self.tiers.values():
            await tier.backend.close()
        await self.ledger.close()

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- routing ----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self.config.policies) + list(self.tiers)

    def resolve(self, model: str | None) -> Route:
        name = model or self.config.default_policy_name
        pol = self.config.policies.get(name)
        if pol is not None:
            tiers = tuple(self.tiers[t] for t in pol.chain)
            thresholds = tuple(pol.thresholds.get(t.name, t.config.threshold) for t in tiers)
            return Route(name=name, tiers=tiers, thresholds=thresholds)
        tier = self.tiers.get(name)
        if tier is not None:
            return Route(name=name, tiers=(tier,), thresholds=(0.0,), pinned=True)
        raise UnknownModelError(
            f"model {name!r} does not exist; valid models: {', '.join(self.model_names())}", param="model")

    # --- the cascade ------------------------------------------------------------------------------
    async def run(self, request: GenerationRequest, *, model: str | None = None, endpoint: str = "chat",
                  request_id: str | None = None, api_key_id: str | None = None,
                  user_tier: str | None = None) -> Outcome:
        """Answer one request through its route; the record is in the ledger when this returns."""
        rec = CascadeRecord(request_id=request_id or new_request_id(), policy=model or "",
                            created_at=time.time(), endpoint=endpoint, api_key_id=api_key_id,
                            user_tier=user_tier)
        t0 = time.perf_counter()
        try:
            route = self.resolve(model)
            rec.policy = route.name
            result = await self._run_route(route, request, rec)
        except CascadeError as exc:
            rec.status, rec.error_class, rec.error_message = "error", type(exc).__name__, exc.message
            self._finish(rec, route=None, t0=t0)
            await self.ledger.record(rec)
            raise
        except asyncio.CancelledError:
            rec.status, rec.error_class, rec.error_message = "cancelled", "ClientDisconnected", "cancelled"
            self._finish(rec, route=None, t0=t0)
            await asyncio.shield(self.ledger.record(rec))
            raise
        self._finish(rec, route=route, t0=t0)
        await self.ledger.record(rec)
        return Outcome(record=rec, result=result)

    async def _run_route(self, route: Route, request: GenerationRequest, rec: CascadeRecord) -> GenerationResult:
        answers: list[tuple[Attempt, GenerationResult]] = []
        last_error: CascadeError | None = None
        n = len(route.tiers)
        for i, (tier, threshold) in enumerate(zip(route.tiers, route.thresholds, strict=True)):
            is_last = i == n - 1
            tc = tier.config
            req = request.with_(max_tokens=request.max_tokens or tc.max_tokens,
                                top_logprobs=max(request.top_logprobs, tc.top_logprobs))
            att = Attempt(index=i, tier=tier.name, model=tc.model, backend=tc.backend)
            rec.attempts.append(att)
            started = time.perf_counter()
            try:
                try:
                    res = await asyncio.wait_for(tier.backend.generate(req), timeout=tc.timeout_s)
                except TimeoutError as exc:
                    raise ProviderTimeoutError(f"tier {tier.name!r} did not answer within {tc.timeout_s:g} s",
                                               provider=tier.name) from exc
            except CascadeError as exc:
                att.latency_ms = (time.perf_counter() - started) * 1e3
                att.decision, att.reason = "error", exc.message
                att.error_class, att.error_message = type(exc).__name__, exc.message
                last_error = exc
                escalate = exc.fall_over or isinstance(exc, (ContextLengthExceededError, ProviderContextLengthError))
                if escalate and not is_last:
                    log.warning("tier %s failed (%s); escalating", tier.name, type(exc).__name__)
                    continue
                if answers and exc.fall_over:
                    # the last tier failed: serve the best answer already in hand rather than nothing
                    best_att, best = max(answers, key=lambda ar: ar[0].confidence or 0.0)
                    best_att.kept, best_att.decision = True, "accept"
                    best_att.reason += f"; served because {tier.name!r} failed ({type(exc).__name__})"
                    return best
                raise
            att.latency_ms = res.latency_s * 1e3
            att.prompt_tokens, att.completion_tokens = res.usage.prompt_tokens, res.usage.completion_tokens
            att.cost_usd = tc.price.cost(res.usage.prompt_tokens, res.usage.completion_tokens)
            att.text = res.text
            att.features = extract_features(res.tokens)
            decision = decide(att.features, tier.calibrator, threshold, is_last=is_last)
            att.confidence, att.reason = decision.confidence, decision.reason
            if not decision.escalate:
                att.decision, att.kept = ("final" if is_last else "accept"), True
                return res
            att.decision = "escalate"
            answers.append((att, res))
        assert last_error is not None  # the loop returns on any accepted answer
        raise last_error

    def _finish(self, rec: CascadeRecord, *, route: Route | None, t0: float) -> None:
        rec.latency_ms = (time.perf_counter() - t0) * 1e3
        rec.cost_usd = sum(a.cost_usd for a in rec.attempts)
        rec.escalation_waste_usd = sum(a.cost_usd for a in rec.attempts if not a.kept)
        rec.prompt_tokens = sum(a.prompt_tokens for a in rec.attempts)
        rec.completion_tokens = sum(a.completion_tokens for a in rec.attempts)
        kept = next((a for a in rec.attempts if a.kept), None)
        if kept is not None:
            rec.tier, rec.model, rec.confidence = kept.tier, kept.model, kept.confidence
            rec.escalated = kept.index > 0
        if route is None:
            rec.baseline_cost_usd = rec.cost_usd
            return
        last = route.tiers[-1]
        ran_last = next((a for a in rec.attempts if a.tier == last.name and a.error_class is None), None)
        if ran_last is not None:
            rec.baseline_cost_usd = ran_last.cost_usd
        else:
            ref = kept or (rec.attempts[-1] if rec.attempts else None)
            p_tok = ref.prompt_tokens if ref else 0
            c_tok = ref.completion_tokens if ref else 0
            rec.baseline_cost_usd = last.config.price.cost(p_tok, c_tok)
            rec.baseline_estimated = True


def new_request_id() -> str:
    return "casc-" + uuid.uuid4().hex[:24]


__all__ = ["Engine", "Outcome", "Route", "Tier", "build_calibrator", "new_request_id"]
