"""The response cache: an answer given once is given again, at no cost, to the same request.

Only greedy requests (temperature 0, the default) are cached: their answer is a function of the request, so
serving it again is what the tiers would do, without the tiers. The key is the route (policy or pinned
tier), the endpoint, the messages or prompt, ``max_tokens``, the stop sequences, ``top_logprobs``, the
caller's user tier and the request's budget (its user tier's as it is now, or the Python API's ``budget=``: a
budget shapes the answer), and, with ``cache.scope: key`` (the default), the API key: a key never receives an
answer first given to another. Only answers the policy itself chose are stored
(cascade/engine.py ``Engine._cache_put``): not one served because a later tier failed or ran out of budget,
nor one that stands in for an earlier tier that was down.

In memory, per server process: LRU over ``cache.max_entries`` and ``cache.max_bytes`` (an estimate of each
answer's size, its logprobs included), each entry living ``cache.ttl_s``. A hit is a ledger row of its own
(cost 0, no attempts) naming the request that paid for the answer (``cached_from``).

An answer is stored only once its own ledger row is committed (a hit never names a request the ledger lacks),
and dropped again when that row is then made ``cancelled`` (its client left before the answer went out: a hit
never names a request that served no answer), and only if no :meth:`ResponseCache.clear` came between the
request's start and its answer (a reload swaps the thresholds that decided it): the request carries the cache's
:attr:`~ResponseCache.generation`.

Identical non-streamed requests arriving while the first is being answered wait for its stored answer
(``Engine._cache_follow``): a burst of one request costs one model call.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cascade.budget import Budget
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
              api_key_id: str | None, budget: Budget | None = None) -> str | None:
    """The key of a request's answer, or None when it is not cacheable (sampled: temperature above 0)."""
    if request.temperature > 0:
        return None
    messages = None if request.messages is None else [m.as_dict() for m in request.messages]
    b = budget or Budget()  # (none, or one that limits nothing: the same answers)
    doc = [route, endpoint, messages, request.prompt, request.max_tokens, list(request.stop),
           request.top_logprobs, user_tier, api_key_id, [b.latency_s, b.on_latency, b.cost_usd, b.on_cost]]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def answer_size(result: GenerationResult) -> int:
    """A rough size in bytes of an answer held in memory: its text and, per token, its text and top
    alternatives with their Python object overhead (measured: about 200 bytes a token and 190 an alternative)."""
    size = 500 + 2 * len(result.text)
    for tok in result.tokens:
        size += 200 + 2 * len(tok.token) + sum(190 + 2 * len(alt.token) for alt in tok.top)
    return size


#: how many replaced answers per key a thumbs-down can still reach through a refresh with the same text
EARLIER_KEPT = 16


class ResponseCache:
    """LRU of answers with a time to live and a size bound. Not thread-safe: used from the event loop only."""

    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.ttl_s, self.max_bytes, self.clock = max_entries, ttl_s, max_bytes, clock
        #: key -> (stored at, size, answer, the (request id, hash of the text) of the answers it replaced, the
        #: latest :data:`EARLIER_KEPT`: feedback on one of those is about this answer when the text is the same)
        self._entries: OrderedDict[str, tuple[float, int, CachedAnswer, tuple[tuple[str, int], ...]]] = OrderedDict()
        #: the same keys, oldest stored first (hits do not move them): expiry in order, without a scan
        self._by_age: OrderedDict[str, float] = OrderedDict()
        self.hits = self.misses = 0
        #: bytes held (the sum of :func:`answer_size`)
        self.bytes = 0
        #: bumped by every :meth:`clear`: an answer decided before it is not stored after it
        self.generation = 0
        #: (key, hash of the text) of answers a user said were wrong -> when: not stored again for ``ttl_s``
        #: (an identical request in flight, or the next greedy miss, gives the same text), at most max_entries
        self._wrong: OrderedDict[tuple[str, int], float] = OrderedDict()
        #: request id -> (key, hash of the text) of the answers stored, the latest max_entries, kept after their
        #: entry is gone (evicted, expired, cleared): a thumbs-down then still leaves its verdict
        self._given: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        item = self._entries.get(key)
        if item is not None and self.clock() - item[0] < self.ttl_s:
            self._entries.move_to_end(key)
            self.hits += 1
            return item[2]
        if item is not None:  # expired
            self._drop(key)
        self.misses += 1
        return None

    def clear(self) -> int:
        """Drop every answer, and refuse the answers of requests already running (a reload changed what the
        policies decide); returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        self._by_age.clear()
        self.bytes = 0
        self.generation += 1
        return n

    def forget(self, request_id: str) -> int:
        """Drop the answers first given to ``request_id`` (a user said it was wrong), also where a refresh
        has since stored the same text under a newer request; returns how many."""
        keys = [k for k, (_, _, a, earlier) in self._entries.items()
                if a.request_id == request_id or (request_id, hash(a.result.text)) in earlier]
        now = self.clock()
        judged = {(k, hash(self._entries[k][2].result.text)) for k in keys}
        if request_id in self._given:  # its entry may be gone already: the same text must not come back
            judged.add(self._given[request_id])
        for verdict in judged:
            self._wrong.pop(verdict, None)
            self._wrong[verdict] = now
        for k in keys:
            self._drop(k)
        while len(self._wrong) > self.max_entries:
            self._wrong.popitem(last=False)
        return len(keys)

    def discard(self, request_id: str) -> int:
        """Drop the answers first given to ``request_id`` without judging them (its client left before the
        answer went out, so its ledger row says it served none: a hit must not name it); returns how many."""
        where = self._given.pop(request_id, None)  # (a request's answer is stored under its one key: no scan)
        item = None if where is None else self._entries.get(where[0])
        if item is None or item[2].request_id != request_id:
            return 0
        self._drop(where[0])
        return 1

    def _judged_wrong(self, key: str, text: str, now: float) -> bool:
        """Was this answer (its key and text) said to be wrong within ``ttl_s``? (Older verdicts are let go.)"""
        while self._wrong and now - next(iter(self._wrong.values())) >= self.ttl_s:
            self._wrong.popitem(last=False)
        return (key, hash(text)) in self._wrong

    def put(self, key: str, answer: CachedAnswer, generation: int | None = None) -> bool:
        """Store ``answer`` unless a :meth:`clear` came after ``generation`` (the cache's generation when the
        request started), a user said this same answer was wrong within ``ttl_s`` (:meth:`forget`), or it
        alone exceeds ``max_bytes`` (then the answer it would replace goes too); returns whether it was stored."""
        if generation is not None and generation != self.generation:
            return False
        if self._wrong and self._judged_wrong(key, answer.result.text, self.clock()):
            return False
        earlier: tuple[tuple[str, int], ...] = ()
        if key in self._entries:  # a refresh: feedback on an answer it replaced may be about the same text
            _, _, old, old_earlier = self._entries[key]
            earlier = (*old_earlier, (old.request_id, hash(old.result.text)))[-EARLIER_KEPT:]
        size = answer_size(answer.result) + 150 * len(earlier)
        if self.max_bytes is not None and size > self.max_bytes:
            if key in self._entries:  # a refresh: the answer it replaces is not served again either
                self._drop(key)
            return False
        if key in self._entries:
            self._drop(key)
        now = self.clock()
        self.expire(now)  # the expired go before any live answer is evicted
        self._entries[key] = (now, size, answer, earlier)
        self._by_age[key] = now
        self._given.pop(answer.request_id, None)
        self._given[answer.request_id] = (key, hash(answer.result.text))
        while len(self._given) > self.max_entries:
            self._given.popitem(last=False)
        self.bytes += size
        while len(self._entries) > self.max_entries or (self.max_bytes is not None and self.bytes > self.max_bytes):
            self._drop(next(iter(self._entries)))
        return True

    def expire(self, now: float | None = None) -> int:
        """Drop the answers older than ``ttl_s`` (lookups skip them anyway; this frees their memory and keeps
        the size gauges true); returns how many."""
        now = self.clock() if now is None else now
        n = 0
        while self._by_age and now - next(iter(self._by_age.values())) >= self.ttl_s:
            self._drop(next(iter(self._by_age)))
            n += 1
        return n

    def _drop(self, key: str) -> None:
        _, size, _, _ = self._entries.pop(key)
        del self._by_age[key]
        self.bytes -= size


__all__ = ["CachedAnswer", "ResponseCache", "answer_size", "cache_key"]
