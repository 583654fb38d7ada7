"""A request's per-request limits (from its caller's user tier), and the one rule that fits a tier's call to
what the cost budget still pays for: the live cascade's, and a sampled shadow's walking its own chain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade.config import Price

if TYPE_CHECKING:
    from cascade.types import GenerationRequest


@dataclass(frozen=True)
class Budget:
    """Per-request limits, from the caller's user tier."""

    latency_s: float | None = None          # per tier attempt
    on_latency: str = "escalate"            # escalate | best_answer
    cost_usd: float | None = None           # all attempts together
    on_cost: str = "refuse"                 # refuse | truncate

    def check(self) -> "Budget":
        """This budget, or :class:`~cascade.errors.InvalidRequestError` naming the field (the config's user tiers
        are checked when the config loads; a budget built in code is checked here)."""
        from cascade.errors import InvalidRequestError

        for name in ("latency_s", "cost_usd"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise InvalidRequestError(f"budget.{name} must be a finite number above 0 (or None), got {v!r}",
                                          param=f"budget.{name}")
        for name, allowed in (("on_latency", ("escalate", "best_answer")), ("on_cost", ("refuse", "truncate"))):
            if getattr(self, name) not in allowed:
                raise InvalidRequestError(f"budget.{name} must be one of {', '.join(allowed)}, got "
                                          f"{getattr(self, name)!r}", param=f"budget.{name}")
        return self


def latency_budget_out(budget: Budget | None, exc: BaseException, elapsed_s: float) -> bool:
    """Whether a call that failed with ``exc`` after ``elapsed_s`` seconds ran out of the request's latency budget
    under ``on_latency: best_answer``, so that the cascade goes no further and serves the answer in hand (if it
    has one): the rule of the live path and of a sampled shadow alike. A tier that timed out by itself (its own
    timeout_s, or a provider's, firing within the budget) failed, and fails over like any other failure."""
    from cascade.errors import ProviderTimeoutError

    return (budget is not None and budget.latency_s is not None and budget.on_latency == "best_answer"
            and isinstance(exc, ProviderTimeoutError) and elapsed_s >= budget.latency_s)


def dearest_price(tier: Any) -> Price:
    """The highest input and output prices a call of ``tier`` can be billed at: its own, or that of any of its
    providers (``tiers[].providers[].price``; a fallback provider can cost more than the first)."""
    providers = getattr(tier.config, "providers", None) or ()
    prices = [tier.config.price, *(p.price for p in providers if p.price is not None)]
    if len(prices) == 1:
        return prices[0]
    return Price(input_per_1m=max(p.input_per_1m for p in prices),
                 output_per_1m=max(p.output_per_1m for p in prices))


def first_price(tier: Any) -> Price:
    """The price a call of ``tier`` is billed at when all is well: its first provider's (``tiers[].providers[0]
    .price``, the tier's own where that sets none), or the tier's own without providers. What the tier alone
    would have cost, where it did not run, is estimated at it."""
    providers = getattr(tier.config, "providers", None) or ()
    if providers and providers[0].price is not None:
        return providers[0].price
    return tier.config.price


def fallback_prompts(tier: Any) -> int:
    """How many prompts a call of ``tier`` can be billed besides the answering provider's: a tier with several
    providers falls over after a timeout, and the provider that timed out is billed its prompt (an error
    answer is not billed, so retries after a 429 add nothing)."""
    return max(len(getattr(tier.config, "providers", None) or ()) - 1, 0)


def call_ceiling(tier: Any, prompt_tokens: int, max_tokens: int) -> float:
    """The most one call of ``tier`` can cost (USD): ``max_tokens`` answered at its dearest price, and the
    prompt once more for each provider that may time out before one answers."""
    price = dearest_price(tier)
    return price.cost(prompt_tokens, max_tokens) + price.cost(prompt_tokens, 0) * fallback_prompts(tier)


def fit_budget(tier: Any, req: GenerationRequest, spent: float,
               budget: Budget | None) -> tuple[GenerationRequest, str | None]:
    """Fit ``req`` for ``tier`` to what the cost budget still pays for, ``spent`` being what the request's
    earlier calls cost: (the request, maybe with fewer ``max_tokens``; None) or (it, why the tier is skipped).
    The call's worst case counts (:func:`call_ceiling`): its providers falling over after timeouts included,
    so that no way the call can go ends past the budget."""
    if budget is None or budget.cost_usd is None:
        return req, None
    price = dearest_price(tier)  # a fallback provider may answer, at its own price
    remaining = budget.cost_usd - spent
    prompt = tier.backend.estimate_prompt_tokens(req)
    max_tokens = req.max_tokens or 1
    estimate = call_ceiling(tier, prompt, max_tokens)
    if estimate <= remaining:
        return req, None
    if budget.on_cost == "truncate" and price.output_per_1m > 0:
        # what is left once every prompt the call may be billed is paid, in answer tokens
        affordable = int((remaining - call_ceiling(tier, prompt, 0)) * 1e6 / price.output_per_1m)
        if affordable >= 1:
            return req.with_(max_tokens=min(max_tokens, affordable)), None
    return req, (f"cost budget: tier {tier.name!r} could cost ${estimate:.6f}, "
                 f"${max(remaining, 0.0):.6f} of ${budget.cost_usd:.6f} left")
