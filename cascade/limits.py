"""Admission limits on completion requests: a key's requests per minute and requests in flight (its user
tier's ``requests_per_minute`` and ``max_concurrent_requests``), the server's own requests in flight
(``server.max_concurrent_requests``), and the spend held by requests in flight against the daily spend
limits (:class:`SpendHolds`).

One :class:`Admission` per server process (limits are per replica: N replicas admit N times as much).
:meth:`Admission.admit` either refuses, with a 429 (the key's limit) or a 503 (the server's), each saying
when to retry, or gives a :class:`Ticket` that holds the in-flight slots until it is released, once the
response has been sent. Pure Python, no I/O; the clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from cascade.errors import RequestLimitError, ServerOverloadedError

#: the window ``requests_per_minute`` counts in
WINDOW_S = 60.0
#: the bucket of requests made without a key (no keys configured: ``auth.anonymous_user_tier``'s limits)
ANONYMOUS = "(anonymous)"


def reset_text(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``"17ms"``, ``"1s"``, ``"6m0s"``."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class Ticket:
    """An admitted request: its rate-limit headers, and the in-flight slots it holds until :meth:`release`."""

    __slots__ = ("headers", "_release")

    def __init__(self, headers: list[tuple[bytes, bytes]], release: Callable[[], None] | None) -> None:
        self.headers = headers
        self._release = release

    def release(self) -> None:
        """Give the slots back (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Admission:
    """Per-key sliding windows of admitted requests, and in-flight counts per key and in all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._windows: dict[str, deque[float]] = {}
        #: per key: (admitted at, tokens) of the last minute, and their sum
        self._token_windows: dict[str, deque[tuple[float, int]]] = {}
        self._token_sums: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self.in_flight = 0

    def admit(self, key: str | None, *, requests_per_minute: int | None = None,
              max_concurrent: int | None = None, server_max_concurrent: int | None = None,
              tokens_per_minute: int | None = None, tokens: "int | Callable[[], int]" = 0) -> Ticket:
        """Admit one completion request of ``key`` (None: a request without a key), or raise
        :class:`ServerOverloadedError` (503) or :class:`RequestLimitError` (429). A refused request takes
        nothing: no slot, no place in the window. ``tokens``: what the request counts against
        ``tokens_per_minute`` (its prompt and its ``max_tokens``, as OpenAI counts them), or a function
        that counts them, called only once the cheaper limits have let the request through."""
        key = key or ANONYMOUS
        # the key's own limits first (its fault: 429), then the server's (503); nothing is taken until all pass
        if max_concurrent is not None and self._in_flight.get(key, 0) >= max_concurrent:
            err = RequestLimitError(f"this key already has {max_concurrent} requests in flight, its limit: wait for "
                                    "one to finish", code="concurrency_limit_exceeded")
            err.retry_after = 1.0
            raise err
        headers: list[tuple[bytes, bytes]] = []
        window: deque[float] | None = None
        now = self.clock()
        if requests_per_minute is not None:
            window = self._windows.setdefault(key, deque())
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if len(window) >= requests_per_minute:
                wait = window[0] + WINDOW_S - now
                err = RequestLimitError(f"rate limit of {requests_per_minute} requests per minute reached for this "
                                        f"key; retry in {reset_text(wait)}")
                err.retry_after = wait
                # both limits' headers on either refusal, as OpenAI sends them (the tokens' window as it stands)
                err.headers = tuple(self._headers(requests_per_minute, window, now))
                if tokens_per_minute:
                    err.headers += tuple(self._token_headers(tokens_per_minute, key, now))
                raise err
        token_window = None
        if tokens_per_minute:
            tokens = tokens() if callable(tokens) else tokens
            try:
                token_window = self._tokens_check(key, tokens_per_minute, tokens, now)
            except RequestLimitError as err:
                if window is not None and requests_per_minute is not None:
                    err.headers = tuple(self._headers(requests_per_minute, window, now)) + err.headers
                raise
        if server_max_concurrent is not None and self.in_flight >= server_max_concurrent:
            err = ServerOverloadedError(f"the server is at its limit of {server_max_concurrent} requests in flight; "
                                        "retry shortly")
            err.retry_after = 1.0
            raise err
        if window is not None and requests_per_minute is not None:
            window.append(now)
            headers = self._headers(requests_per_minute, window, now)
        if token_window is not None and tokens_per_minute:
            assert isinstance(tokens, int)
            token_window.append((now, tokens))
            self._token_sums[key] = self._token_sums.get(key, 0) + tokens
            headers += self._token_headers(tokens_per_minute, key, now)
        if max_concurrent is None and server_max_concurrent is None:
            return Ticket(headers, None)
        self.in_flight += 1
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

        def release() -> None:
            self.in_flight -= 1
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

        return Ticket(headers, release)

    def _tokens_check(self, key: str, limit: int, tokens: int, now: float) -> deque[tuple[float, int]]:
        """Refuse a request whose tokens do not fit in the key's last minute (or in a minute at all)."""
        window, used = self._tokens_used(key, now)
        if tokens > limit:
            err = RequestLimitError(f"request too large: {tokens} tokens (prompt and max_tokens) against this "
                                    f"key's limit of {limit} tokens per minute; lower max_tokens or shorten the prompt")
            err.error_type, err.should_retry = "tokens", False  # waiting cannot help
            err.headers = tuple(self._token_headers(limit, key, now))
            raise err
        if used + tokens > limit:
            # the wait until enough of the window has left for this request to fit
            need, freed, wait = used + tokens - limit, 0, WINDOW_S
            for t, n in window:
                freed += n
                if freed >= need:
                    wait = t + WINDOW_S - now
                    break
            err = RequestLimitError(f"rate limit of {limit} tokens per minute reached for this key ({used} in the "
                                    f"last minute, this request {tokens}); retry in {reset_text(wait)}")
            err.error_type, err.retry_after = "tokens", wait  # OpenAI's type for a tokens-per-minute limit
            err.headers = tuple(self._token_headers(limit, key, now))
            raise err
        return window

    def _tokens_used(self, key: str, now: float) -> tuple[deque[tuple[float, int]], int]:
        """The key's token window with what left it in the last minute dropped, and the tokens still in it."""
        window = self._token_windows.setdefault(key, deque())
        used = self._token_sums.get(key, 0)
        while window and window[0][0] <= now - WINDOW_S:
            used -= window.popleft()[1]
        self._token_sums[key] = used
        return window, used

    def _token_headers(self, limit: int, key: str, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's token rate-limit headers: the limit, what is left of it in the last minute, and how long until
        it is whole."""
        window, used = self._tokens_used(key, now)
        reset = window[-1][0] + WINDOW_S - now if window else 0.0
        return [(b"x-ratelimit-limit-tokens", str(limit).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(0, limit - used)).encode()),
                (b"x-ratelimit-reset-tokens", reset_text(reset).encode())]

    @staticmethod
    def _headers(limit: int, window: deque[float], now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's request rate-limit headers: the limit, what is left of it now, and how long until it is
        whole again (the newest admitted request leaves the window)."""
        reset = window[-1] + WINDOW_S - now if window else 0.0
        return [(b"x-ratelimit-limit-requests", str(limit).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, limit - len(window))).encode()),
                (b"x-ratelimit-reset-requests", reset_text(reset).encode())]


class _Hold:
    __slots__ = ("amount", "buckets", "queued")

    def __init__(self, amount: float, buckets: tuple[Hashable, ...]) -> None:
        self.amount, self.buckets = amount, buckets
        #: the order in which its ledger row was queued (:meth:`SpendHolds.submitted`); None: not yet
        self.queued: int | None = None


class _Bucket:
    __slots__ = ("holds", "released", "readers", "lost", "lost_day")

    def __init__(self) -> None:
        self.holds: dict[str, _Hold] = {}
        #: (queued, amount) of the holds released while a reading was open (see :meth:`Reading.unseen`)
        self.released: list[tuple[float, float]] = []
        self.readers = 0
        #: spend whose ledger write failed on UTC day ``lost_day``: counted as committed until the day ends
        self.lost, self.lost_day = 0.0, 0.0


class Reading:
    """One admission's read of the committed spend of some buckets (:meth:`SpendHolds.reading`).

    The ledger runs its jobs in the order they were queued, so the read's SQL sees exactly the rows queued
    before it: those of the holds already :meth:`~SpendHolds.submitted` when the reading began. Every other
    hold, held now or released since (its row committed after the read), is spend the read did not see.
    Open the reading right before queueing the SQL, with no ``await`` between."""

    __slots__ = ("_holds", "_buckets", "_mark", "_start", "_open")

    def __init__(self, holds: "SpendHolds", buckets: tuple[Hashable, ...]) -> None:
        self._holds, self._buckets, self._open = holds, buckets, True
        self._mark = holds._queued
        self._start = []
        for b in buckets:
            bucket = holds._buckets.setdefault(b, _Bucket())
            bucket.readers += 1
            self._start.append(len(bucket.released))

    def unseen(self, bucket: Hashable) -> tuple[float, float]:
        """What ``bucket`` must add to the spend the read found: (the holds whose rows were not queued before
        the read, held now or released during it; the spend whose ledger write failed today)."""
        b = self._holds._buckets[bucket]
        mark = self._mark
        held = sum(h.amount for h in b.holds.values() if h.queued is None or h.queued > mark)
        gone = sum(a for q, a in b.released[self._start[self._buckets.index(bucket)]:] if q > mark)
        return held + gone, self._holds._lost(b)

    def close(self) -> None:
        """End the read (idempotent); a bucket nobody holds or reads is forgotten."""
        if not self._open:
            return
        self._open = False
        for b in self._buckets:
            bucket = self._holds._buckets[b]
            bucket.readers -= 1
            if not bucket.readers:
                bucket.released.clear()
            self._holds._forget_if_idle(b, bucket)

    def __enter__(self) -> "Reading":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpendHolds:
    """The worst-case cost of admitted requests whose ledger rows are not committed yet, per spend bucket
    (a key, or an end user of a key), for the daily spend limits.

    The limits are checked against the day's committed spend, read from the ledger; a burst of requests
    admitted together would all see the spend from before any of them and all be let through. So each
    admitted request *holds* its worst case (:meth:`hold`) on its buckets until its row is committed
    (:meth:`release`), and an admission counts the holds its read of the ledger could not see
    (:class:`Reading`). A request is admitted while committed spend plus holds is under the limit, so a
    limit is overshot by at most the cost of the one request admitted last (never by a burst). A row whose
    write failed keeps its cost counted until the UTC day ends (:meth:`release` with ``lost``); one whose
    write timed out stays held until the ledger has committed it after all, or failed it. Counted in memory
    for this process; with a :attr:`mirror` (a served ledger) each hold is written to the ledger too, so that
    the other processes sharing it count this one's requests in flight (:func:`cascade.ledger.daily_spend`).
    Pure Python, event-loop only (no locks): an admission's check and hold run without an await between them.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        #: where holds are written for the other processes sharing the ledger to count (the serving engine's
        #: :class:`cascade.ledger.Ledger`: ``hold_spend``/``release_spend``); None: this process alone
        self.mirror: Any = None
        self._buckets: dict[Hashable, _Bucket] = {}
        self._holds: dict[str, _Hold] = {}
        self._queued = 0
        self._day = self.clock() // 86400

    def reading(self, buckets: tuple[Hashable, ...]) -> Reading:
        """Begin a read of the ledger's committed spend of ``buckets`` (close it, or use it as a context)."""
        return Reading(self, buckets)

    def held(self, bucket: Hashable) -> tuple[float, int]:
        """The worst cases held on ``bucket`` and by how many requests."""
        b = self._buckets.get(bucket)
        return (sum(h.amount for h in b.holds.values()), len(b.holds)) if b is not None else (0.0, 0)

    def hold(self, request_id: str, buckets: tuple[Hashable, ...], amount: float) -> None:
        """``request_id`` holds ``amount`` (USD) on each of ``buckets`` until :meth:`release`."""
        if not buckets or request_id in self._holds:
            return
        self._sweep()
        h = self._holds[request_id] = _Hold(amount, buckets)
        for b in buckets:
            self._buckets.setdefault(b, _Bucket()).holds[request_id] = h
        if self.mirror is not None:  # (queued before the request's row: that row's write deletes it)
            self.mirror.hold_spend(request_id, buckets, amount)

    def submitted(self, request_id: str) -> None:
        """The request's ledger row is queued (call it right as it is): a read queued after it sees it, and
        :meth:`release` comes once it is committed."""
        h = self._holds.get(request_id)
        if h is not None and h.queued is None:
            self._queued += 1
            h.queued = self._queued

    def release(self, request_id: str, *, unless_submitted: bool = False, lost: float | None = None) -> None:
        """Its ledger row is committed (or will never be): the hold goes (idempotent; unknown ids are fine).
        ``unless_submitted``: only if no row was queued (the response is over; a queued row releases the
        hold when it is committed, so that the spend is never in neither place). ``lost``: the row's write
        failed; its cost (USD) stays counted on the hold's buckets until the UTC day ends."""
        h = self._holds.get(request_id)
        if h is None or (unless_submitted and h.queued is not None):
            return
        del self._holds[request_id]
        if h.queued is None and self.mirror is not None:  # no row will delete it (a queued row's write does)
            self.mirror.release_spend(request_id)
        for b in h.buckets:
            bucket = self._buckets[b]
            del bucket.holds[request_id]
            if bucket.readers:
                bucket.released.append((math.inf if h.queued is None else h.queued, h.amount))
            if lost:
                self._lost(bucket)
                bucket.lost += lost
            self._forget_if_idle(b, bucket)

    def __len__(self) -> int:
        """Requests holding spend now."""
        return len(self._holds)

    def _lost(self, bucket: _Bucket) -> float:
        """The bucket's spend lost to failed ledger writes today (a new UTC day starts it at 0)."""
        day = self.clock() // 86400
        if bucket.lost_day != day:
            bucket.lost, bucket.lost_day = 0.0, day
        return bucket.lost

    def _forget_if_idle(self, key: Hashable, bucket: _Bucket) -> None:
        if not bucket.holds and not bucket.readers and not self._lost(bucket):
            del self._buckets[key]

    def _sweep(self) -> None:
        """On the first hold of a UTC day, forget the buckets kept only for yesterday's lost spend (an end
        user who never comes back would otherwise keep one for good, one more per user a ledger outage met)."""
        day = self.clock() // 86400
        if day != self._day:
            self._day = day
            for key, bucket in list(self._buckets.items()):
                self._forget_if_idle(key, bucket)


__all__ = ["ANONYMOUS", "WINDOW_S", "Admission", "Reading", "SpendHolds", "Ticket", "reset_text"]
