"""A request's per-request limits (from its caller's user tier), and the one rule that fits a tier's call to
what the cost budget still pays for: the live cascade's, and a sampled shadow's walking its own chain."""

from __future__ import annotations

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


def dearest_price(tier: Any) -> Price:
    """The highest input and output prices a call of ``tier`` can be billed at: its own, or that of any of its
    providers (``tiers[].providers[].price``; a fallback provider can cost more than the first)."""
    prices = [tier.config.price, *(p.price for p in getattr(tier.backend, "providers", ()) if p.price is not None)]
    if len(prices) == 1:
        return prices[0]
    return Price(input_per_1m=max(p.input_per_1m for p in prices),
                 output_per_1m=max(p.output_per_1m for p in prices))


def fit_budget(tier: Any, req: GenerationRequest, spent: float,
               budget: Budget | None) -> tuple[GenerationRequest, str | None]:
    """Fit ``req`` for ``tier`` to what the cost budget still pays for, ``spent`` being what the request's
    earlier calls cost: (the request, maybe with fewer ``max_tokens``; None) or (it, why the tier is skipped)."""
    if budget is None or budget.cost_usd is None:
        return req, None
    price = dearest_price(tier)  # a fallback provider may answer, at its own price
    remaining = budget.cost_usd - spent
    prompt = tier.backend.estimate_prompt_tokens(req)
    max_tokens = req.max_tokens or 1
    estimate = price.cost(prompt, max_tokens)
    if estimate <= remaining:
        return req, None
    if budget.on_cost == "truncate" and price.output_per_1m > 0:
        affordable = int((remaining - price.cost(prompt, 0)) * 1e6 / price.output_per_1m)
        if affordable >= 1:
            return req.with_(max_tokens=min(max_tokens, affordable)), None
    return req, (f"cost budget: tier {tier.name!r} could cost ${estimate:.6f}, "
                 f"${max(remaining, 0.0):.6f} of ${budget.cost_usd:.6f} left")
