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
from collections.abc import Callable
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
        # counted whether or not a limit applies now: a reload may give the key a limit while these are in flight,
        # and it holds for the next request (the README), which must see them
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


class SpendHolds:
    """The requests this process admitted under daily spend limits whose ledger rows are not queued yet.

    The limits are checked against the day's recorded spend plus the worst cases of the requests admitted and
    not yet recorded, by any process sharing the ledger; a burst admitted together would otherwise all see the
    spend from before any of them. Both the check and the hold of the admitted request's worst case are one
    transaction of the ledger (:meth:`cascade.ledger.Ledger.admit_spend`), and the transaction that writes the
    request's row deletes its hold, so a request is admitted while recorded spend plus holds is under the
    limit: a limit is overshot by at most the cost of the one request admitted last, on one replica or
    several. A row whose write failed for good leaves its hold counted until its UTC day ends, made the request's
    cost (the money was spent).
    This only remembers which admitted requests have not queued their rows, so that one that ends without a row
    (refused after admission, or cut off before its row) has its hold deleted (:attr:`ledger`'s
    :meth:`~cascade.ledger.Ledger.release_spend`). Event loop only.
    """

    def __init__(self) -> None:
        #: the ledger holding the holds (the serving engine's); None: nothing to release
        self.ledger: Any = None
        #: admitted request id -> whether its ledger row has been queued
        self._holds: dict[str, bool] = {}

    def hold(self, request_id: str) -> None:
        """``request_id`` was admitted, its hold written by the admission's transaction."""
        self._holds.setdefault(request_id, False)

    def submitted(self, request_id: str) -> None:
        """The request's ledger row is queued: its write deletes the hold."""
        if request_id in self._holds:
            self._holds[request_id] = True

    def release(self, request_id: str, *, unless_submitted: bool = False) -> None:
        """Forget ``request_id`` (idempotent; unknown ids are fine), deleting its hold in the ledger unless its
        row was queued (that write deletes it, or, failed, leaves it counted for the day). ``unless_submitted``:
        only if no row was queued (the response is over; a queued row's end releases it)."""
        queued = self._holds.get(request_id)
        if queued is None or (unless_submitted and queued):
            return
        del self._holds[request_id]
        if not queued and self.ledger is not None:
            self.ledger.release_spend(request_id)

    def __len__(self) -> int:
        """Requests of this process holding spend now."""
        return len(self._holds)


__all__ = ["ANONYMOUS", "WINDOW_S", "Admission", "SpendHolds", "Ticket", "reset_text"]
