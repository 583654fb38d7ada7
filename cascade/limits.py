"""Admission limits on completion requests: a key's requests per minute and requests in flight (its user
tier's ``requests_per_minute`` and ``max_concurrent_requests``), and the server's own requests in flight
(``server.max_concurrent_requests``).

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
        self._in_flight: dict[str, int] = {}
        self.in_flight = 0

    def admit(self, key: str | None, *, requests_per_minute: int | None = None,
              max_concurrent: int | None = None, server_max_concurrent: int | None = None) -> Ticket:
        """Admit one completion request of ``key`` (None: a request without a key), or raise
        :class:`ServerOverloadedError` (503) or :class:`RequestLimitError` (429). A refused request takes
        nothing: no slot, no place in the window."""
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
                err.headers = tuple(self._headers(requests_per_minute, window, now))
                raise err
        if server_max_concurrent is not None and self.in_flight >= server_max_concurrent:
            err = ServerOverloadedError(f"the server is at its limit of {server_max_concurrent} requests in flight; "
                                        "retry shortly")
            err.retry_after = 1.0
            raise err
        if window is not None and requests_per_minute is not None:
            window.append(now)
            headers = self._headers(requests_per_minute, window, now)
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

    @staticmethod
    def _headers(limit: int, window: deque[float], now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's request rate-limit headers: the limit, what is left of it now, and how long until it is
        whole again (the newest admitted request leaves the window)."""
        reset = window[-1] + WINDOW_S - now if window else 0.0
        return [(b"x-ratelimit-limit-requests", str(limit).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, limit - len(window))).encode()),
                (b"x-ratelimit-reset-requests", reset_text(reset).encode())]


__all__ = ["ANONYMOUS", "WINDOW_S", "Admission", "Ticket", "reset_text"]
