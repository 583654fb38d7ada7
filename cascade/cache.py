"""The response cache: an answer given once is given again, at no cost, to the same request.

Only greedy requests (temperature 0, the default) are cached: their answer is a function of the request, so
serving it again is what the tiers would do, without the tiers. The key is the route (policy or pinned
tier), the endpoint, the messages or prompt, ``max_tokens``, the stop sequences, ``top_logprobs`` and the
caller's user tier (its budgets shape the answer), and, with ``cache.scope: key`` (the default), the API
key: a key never receives an answer first given to another. Only clean answers are stored: every attempt
succeeded (an answer served because a later tier failed stays a one-off).

In memory, per server process: LRU over ``cache.max_entries``, each entry living ``cache.ttl_s``. A hit is a
ledger row of its own (cost 0, no attempts) naming the request that paid for the answer (``cached_from``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cascade.types import CascadeRecord, GenerationRequest, GenerationResult


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    result: GenerationResult
    #: the request that paid for the answer, and what it found
    request_id: str
    tier: str
    model: str | None
    confidence: float | None
    baseline_cost_usd: float
    baseline_estimated: bool

    @classmethod
    def of(cls, rec: CascadeRecord, result: GenerationResult) -> "CachedAnswer":
        return cls(result=result, request_id=rec.request_id, tier=rec.tier or "", model=rec.model,
                   confidence=rec.confidence, baseline_cost_usd=rec.baseline_cost_usd,
                   baseline_estimated=rec.baseline_estimated)


def cache_key(route: str, endpoint: str, request: GenerationRequest, *, user_tier: str | None,
              api_key_id: str | None) -> str | None:
    """The key of a request's answer, or None when it is not cacheable (sampled: temperature above 0)."""
    if request.temperature > 0:
        return None
    messages = None if request.messages is None else [m.as_dict() for m in request.messages]
    doc = [route, endpoint, messages, request.prompt, request.max_tokens, list(request.stop),
           request.top_logprobs, user_tier, api_key_id]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class ResponseCache:
    """LRU of answers with a time to live. Not thread-safe: used from the event loop only."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        item = self._entries.get(key)
        if item is not None and self.clock() - item[0] < self.ttl_s:
            self._entries.move_to_end(key)
            self.hits += 1
            return item[1]
        if item is not None:  # expired
            del self._entries[key]
        self.misses += 1
        return None

    def clear(self) -> int:
        """Drop every answer (a reload changed what the policies decide); returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        return n

    def put(self, key: str, answer: CachedAnswer) -> None:
        self._entries[key] = (self.clock(), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


__all__ = ["CachedAnswer", "ResponseCache", "cache_key"]
