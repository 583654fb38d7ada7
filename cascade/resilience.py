"""Provider resilience: error-class-aware retries, ordered fallback between providers, circuit breakers.

A tier normally has one backend. A tier configured with ``providers`` gets a :class:`ResilientBackend`
instead: an ordered list of providers (each an ordinary :class:`~cascade.backends.base.Backend`, e.g. a
local vLLM server, then a replica, then a hosted API) tried in turn under one deadline.

What happens on each error class (the errors are already translated into ``cascade.errors`` at each
backend's boundary; anything untranslated is classified here):

=================================  ========================================================================
``ProviderInvalidRequestError``    400/413/422: raised at once, never retried, never fallen over
``ProviderMisconfiguredError``     404 (the tier's model is not there): next provider at once (breaker)
``ProviderContextLengthError``     raised at once; the engine escalates to a tier with a larger context
``ProviderAuthError``              401/403, 402 and 429 insufficient_quota (out of credits): provider
                                   marked unhealthy (breaker forced open), warning logged (never the
                                   key), next provider
``RateLimitedError``               429: same provider again after a backoff (full jitter, or the
                                   server's ``Retry-After``/``retry-after-ms`` when it is within
                                   ``max_retry_after_s``) while attempts and the deadline allow, then
                                   the next provider; a hint is remembered (at most ``max_hold_s``):
                                   later calls wait for it as a retry would, or skip the provider; once
                                   it runs out one call goes first, the others wait for its answer
``ProviderServerError``            5xx: next provider at once (counts against the breaker)
``ProviderTimeoutError``           connect/read/total timeout: next provider at once (breaker)
``ProviderConnectionError``        refused/reset: next provider at once (breaker)
all breakers open                  ``CircuitOpenError`` (503) at once, ``retry_after`` = the soonest
                                   half-open time
=================================  ========================================================================

**The deadline.** Retries, backoff sleeps and fallbacks share one deadline per call, passed explicitly:
``await backend.generate(request, deadline=time.monotonic() + budget_s)`` (an absolute
``time.monotonic()`` value). The effective deadline is the earlier of that and ``now + tier.timeout_s``;
without ``deadline=`` (plain :class:`Backend` callers) it is ``now + tier.timeout_s``. Each provider
attempt gets ``min(provider.timeout_s, time left)``; a backoff that would not leave time for the next
attempt is not slept: the backend falls over (or gives up) at once. Nothing below retries on its own (the
openai client is built with ``max_retries=0``), so retries never stack across layers.

**Accounting.** Every provider attempt, failed or not, is a :class:`ProviderAttempt` (provider, error
class, latency, tokens billed, cost, the wait before it, what was done next). Pass ``record=[]`` to
``generate``/``stream`` and each attempt is appended as soon as it ends, so even a call cancelled from
outside leaves its attempts there (the one cut short is recorded as ``Cancelled``). A raised error also
carries them as ``exc.attempts``. The engine writes them as ledger attempt rows
(:func:`merge_provider_attempts`); failed attempts are never served, so their cost is escalation waste.

**Streaming.** :meth:`ResilientBackend.stream` falls over only before its first chunk is yielded. Once a
chunk has gone to the consumer a failure is never hidden: the error is raised with ``fall_over = False``
and ``mid_stream = True`` set on it, and the consumer ends its stream with an error event.

**Circuit breakers** (one per provider, :class:`CircuitBreaker`): closed → open after
``failure_threshold`` consecutive failures or a failure rate of ``failure_rate`` over the last
``window_s`` seconds (with at least ``min_calls`` calls); open → half-open after ``cooldown_s``; in
half-open exactly one probe call is let through: success closes, failure re-opens. Failures are 5xx,
timeouts, connection errors and auth errors (auth forces the breaker open); 4xx invalid requests count
as successes (the provider answered), 429 and cancellations are neutral.

Everything here runs on one event loop; breakers are not thread-safe and need not be.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cascade.backends.base import Backend
from cascade.errors import (
    CascadeError,
    CircuitOpenError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderError,
    ProviderInvalidRequestError,
    ProviderTimeoutError,
    RateLimitedError,
)
from cascade.types import Attempt, GenerationRequest, GenerationResult, StreamChunk, answer_tokens

if TYPE_CHECKING:
    from cascade.config import Config, Price, TierConfig

log = logging.getLogger("cascade.resilience")

#: an attempt is not started with less time than this left before the deadline
MIN_ATTEMPT_S = 0.02
#: slack a caller's own hard timeout should leave beyond the deadline, so the backend can report first
DEADLINE_GRACE_S = 0.25
#: a provider that timed out with less than this share of the tier's time left to it was cut short by time
#: already spent (on another provider, a rate-limit wait, its own earlier chunks), not slow
FULL_TIME_SHARE = 0.9
#: a rate-limited provider is retried only if its wait leaves at least this share of the tier's time (of its
#: own timeout when shorter): a retry with less is likely cut short, while another provider may answer now
RETRY_MIN_SHARE = 0.25
#: error_class recorded for an attempt cut short by cancellation (client gone, caller's own timeout)
CANCELLED = "Cancelled"

Clock = Callable[[], float]


# --- retry policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a rate-limited (429) provider again.

    ``max_attempts`` counts attempts on one provider (the first one included). Without a server hint the
    wait before retry ``n`` (1-based) is "full jitter": uniform in ``[0, min(max_delay_s,
    base_delay_s * 2**(n-1))]``. A ``Retry-After``/``retry-after-ms`` hint is honoured exactly when it is at
    most ``max_retry_after_s``; a longer one is not waited out (the provider is left for the next one).
    """

    max_attempts: int = 3
    base_delay_s: float = 0.25
    max_delay_s: float = 4.0
    max_retry_after_s: float = 10.0
    #: a hint also keeps later calls off the provider for that long, at most this (0: not remembered)
    max_hold_s: float = 60.0

    def backoff(self, retry: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None: do not retry this provider."""
        if retry >= self.max_attempts:
            return None
        if retry_after is not None:
            return retry_after if 0.0 <= retry_after <= self.max_retry_after_s else None
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1)))


# --- circuit breaker -------------------------------------------------------------------------------


class Permit:
    """Leave to make one call through a breaker; hand it back with success/failure/release.

    ``epoch`` is the breaker's state epoch when the permit was given: a call that outlives the state it was let
    through in (started while closed, ending after the breaker opened, half-opened and closed again) says
    nothing of the provider as it is now, so its verdict is ignored."""

    __slots__ = ("probe", "done", "epoch")

    def __init__(self, probe: bool, epoch: int = 0) -> None:
        self.probe = probe
        self.done = False
        self.epoch = epoch


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, name: str = "", *, failure_threshold: int = 5, failure_rate: float = 0.5,
                 window_s: float = 30.0, min_calls: int = 10, cooldown_s: float = 15.0,
                 clock: Clock = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.window_s = window_s
        self.min_calls = min_calls
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._state = self.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()   # (time, failed)
        self._probe_out = False
        #: bumped at every change of state: a permit of an earlier epoch is a call from before it (see Permit)
        self._epoch = 0
        #: open because the provider refused our credentials (:meth:`trip`): only an operator can fix it
        self.tripped = False
        #: (time, new state, why), the last 50 transitions, for /metrics and tests
        self.transitions: deque[tuple[float, str, str]] = deque(maxlen=50)

    # --- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self._state == self.OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._set(self.HALF_OPEN, "cooldown elapsed")
        return self._state

    def retry_after(self) -> float:
        """Seconds until a call could be let through (0 when one can be now)."""
        state = self.state
        if state == self.OPEN:
            return max(0.0, self._opened_at + self.cooldown_s - self.clock())
        if state == self.HALF_OPEN and self._probe_out:
            return min(1.0, self.cooldown_s)
        return 0.0

    def _set(self, state: str, why: str) -> None:
        if state == self._state and state != self.OPEN:
            return
        self._state = state
        self._epoch += 1
        if state != self.HALF_OPEN:  # half-open after a trip: still refused until its probe gets through
            self.tripped = False
        self.transitions.append((self.clock(), state, why))
        if state == self.OPEN:
            self._opened_at = self.clock()
            self._probe_out = False
            self._window.clear()
            self._consecutive = 0
            log.warning("circuit breaker of provider %s opened: %s (cooldown %.3g s)", self.name, why,
                        self.cooldown_s)
        elif state == self.HALF_OPEN:
            self._probe_out = False
            log.info("circuit breaker of provider %s half-open: one probe allowed", self.name)
        else:
            self._window.clear()
            self._consecutive = 0
            self._probe_out = False
            log.info("circuit breaker of provider %s closed: %s", self.name, why)

    # --- calls ------------------------------------------------------------------------------------
    def acquire(self) -> Permit | None:
        """A permit for one call, or None when the breaker refuses (open, or half-open with its probe out)."""
        state = self.state
        if state == self.CLOSED:
            return Permit(probe=False, epoch=self._epoch)
        if state == self.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return Permit(probe=True, epoch=self._epoch)
        return None

    def _stale(self, permit: Permit) -> bool:
        """Hand ``permit`` back; True when its verdict is to be ignored: already given, or its call began
        before the breaker last changed state (late results of calls started before an opening, even once a
        probe has closed it again: counted, a few calls that hung on the provider while it failed would open
        the breaker again as soon as it had recovered)."""
        if permit.done:
            return True
        permit.done = True
        return permit.epoch != self._epoch

    def success(self, permit: Permit) -> None:
        if self._stale(permit):
            return
        if permit.probe:
            if self._state == self.HALF_OPEN:
                self._set(self.CLOSED, "probe succeeded")
            return
        if self._state == self.CLOSED:
            self._consecutive = 0
            self._note(False)

    def failure(self, permit: Permit, why: str = "failure") -> None:
        if self._stale(permit):
            return
        if permit.probe:
            if self._state == self.HALF_OPEN:
                self._set(self.OPEN, f"probe failed ({why})")
            return
        if self._state != self.CLOSED:
            return
        self._consecutive += 1
        self._note(True)
        if self._consecutive >= self.failure_threshold:
            self._set(self.OPEN, f"{self._consecutive} consecutive failures, the last {why}")
            return
        n = len(self._window)
        failed = sum(1 for _, f in self._window if f)
        if n >= self.min_calls and failed / n >= self.failure_rate:
            self._set(self.OPEN, f"failure rate {failed}/{n} over {self.window_s:g} s, the last {why}")

    def release(self, permit: Permit) -> None:
        """A neutral outcome (429, cancellation): frees a half-open probe without a verdict."""
        if self._stale(permit):
            return
        if permit.probe and self._state == self.HALF_OPEN:
            self._probe_out = False

    def trip(self, why: str) -> None:
        """Force the breaker open now: the provider rejected our credentials, which no retry fixes (a 503
        of this breaker tells clients not to retry, until a probe after the cooldown gets through)."""
        self._set(self.OPEN, why)
        self.tripped = True

    def _note(self, failed: bool) -> None:
        now = self.clock()
        self._window.append((now, failed))
        while self._window and self._window[0][0] < now - self.window_s:
            self._window.popleft()

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "retry_after_s": round(self.retry_after(), 3),
                "consecutive_failures": self._consecutive, "window_calls": len(self._window)}


# --- attempts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderAttempt:
    """One call to one provider, successful or not."""

    provider: str
    backend: str                  # the provider's backend kind, e.g. "openai"
    model: str
    attempt: int                  # 1-based attempt number on this provider within the call
    wait_s: float                 # backoff slept right before this attempt
    latency_s: float
    #: "served" | "retry" (same provider again) | "fall_over" (next provider) | "raise" (given up, the
    #: error goes to the caller) | "cancelled" | "failed" (a stream broke after its first chunk)
    action: str
    error_class: str | None = None
    error_message: str | None = None
    upstream_status: int | None = None
    prompt_tokens: int = 0        # tokens the provider billed (what it reported, or streamed before failing)
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those read from the provider's prompt cache

    @property
    def ok(self) -> bool:
        return self.error_class is None

    def describe(self) -> str:
        head = f"provider {self.provider!r} attempt {self.attempt}"
        if self.wait_s > 0:
            head += f" after {self.wait_s:.3f} s backoff"
        if self.ok:
            return f"{head}: served"
        status = f" (HTTP {self.upstream_status})" if self.upstream_status else ""
        nxt = {"retry": "retrying the same provider", "fall_over": "falling over",
               "raise": "not retried", "cancelled": "cancelled", "failed": "stream broken after its first chunk",
               "held": "cancelled while waiting out its Retry-After, never called"}
        return f"{head}: {self.error_class}{status}; {nxt.get(self.action, self.action)}"


def billed_prompt(backend: Any, request: GenerationRequest, exc: CascadeError | None) -> int:
    """The prompt tokens a failed call is billed for: its estimated prompt when the provider was working on it
    when the call ended (a timeout, or ``exc=None``: cancelled in flight) or had answered (a 200 that could not
    be read or was cut off), none when it answered with an error (providers do not bill error responses) or
    could not be reached."""
    if exc is None or isinstance(exc, ProviderTimeoutError) or getattr(exc, "answered", False):
        return backend.estimate_prompt_tokens(request)
    return 0


def merge_provider_attempts(attempts: list[Attempt], att: Attempt, provider_log: Sequence[ProviderAttempt],
                            *, served: bool) -> None:
    """Turn one tier attempt row into one row per provider attempt (for the engine's ledger record).

    ``att`` is the tier's row (already in ``attempts``). The provider attempts before the last become
    rows of their own, inserted before ``att`` (decision "error", never kept: their cost is waste); the
    last provider attempt is merged into ``att`` itself (provider in ``backend``, its model, latency,
    wait, and, when not ``served``, its billed tokens, cost and error). Indices are renumbered so they
    stay unique within the request.
    """
    if not provider_log:
        return
    *earlier, last = provider_log
    # cancelled between two provider attempts (in a rate-limit backoff): the last one had ended with its own
    # error, a row of its own; ``att`` is the cancellation, no call in flight (nothing billed)
    between = not served and att.error_class == CANCELLED and last.action in ("retry", "fall_over")
    # cancelled while waiting out a provider's Retry-After before calling it: ``att`` is that wait (nothing billed)
    held = not served and last.action == "held"
    if between:
        earlier = list(provider_log)
    rows = [Attempt(index=0, tier=att.tier, model=pa.model, backend=pa.provider, prompt_tokens=pa.prompt_tokens,
                    completion_tokens=pa.completion_tokens, latency_ms=pa.latency_s * 1e3, cost_usd=pa.cost_usd,
                    cached_prompt_tokens=pa.cached_prompt_tokens,
                    decision="error", reason=pa.describe(), error_class=pa.error_class or CANCELLED,
                    error_message=pa.error_message, wait_ms=pa.wait_s * 1e3)
            for pa in earlier]
    pos = next(i for i, a in enumerate(attempts) if a is att)
    first_index = att.index
    attempts[pos:pos] = rows
    for k, a in enumerate(attempts[pos:]):
        a.index = first_index + k
    if between or held:
        att.model, att.backend = last.model, last.provider
        att.prompt_tokens = att.completion_tokens = att.cached_prompt_tokens = 0
        att.cost_usd = att.wait_ms = 0.0
        att.latency_ms = 0.0
        if held:
            att.wait_ms = last.wait_s * 1e3
            att.reason = (f"cancelled while waiting out the Retry-After of provider {last.provider!r}, before "
                          f"calling it ({att.reason})")
        else:
            att.reason = f"cancelled before provider {last.provider!r} was tried again ({att.reason})"
        return
    att.model, att.backend = last.model, last.provider
    att.latency_ms, att.wait_ms = last.latency_s * 1e3, last.wait_s * 1e3
    att.cost_usd = last.cost_usd
    if not served:
        att.prompt_tokens, att.completion_tokens = last.prompt_tokens, last.completion_tokens
        att.cached_prompt_tokens = last.cached_prompt_tokens
        att.decision = att.decision or "error"
        att.error_class = att.error_class or last.error_class or CANCELLED
        att.error_message = att.error_message or last.error_message
        att.reason = last.describe() + (f"; {att.reason}" if att.reason and att.reason != att.error_message else "")


# --- error classification ---------------------------------------------------------------------------

#: what an API key looks like: OpenAI/Anthropic ``sk-``, ``pk-``/``rk-``/``key-``; Groq ``gsk_``, Hugging Face
#: ``hf_``, xAI ``xai-``, GitHub ``ghp_``/``github_pat_``, Google ``AIza``; a bearer token or basic credentials
SECRET = re.compile(
    r"\b(?:sk|pk|rk|key|xai)-[A-Za-z0-9_\-*.]{4,}"
    r"|\b(?:gsk|hf|ghp|gho|github_pat|sk|rk)_[A-Za-z0-9_\-*.]{8,}"
    r"|\bAIza[A-Za-z0-9_\-]{20,}"
    r"|(?i:bearer|basic)\s+[A-Za-z0-9_\-.=*+/]{8,}")


#: the password of a URL's user info (``https://user:password@host/``: httpx sends it as basic credentials), or
#: the user info whole where it has no password (``https://KEY@host/``: a key given as the basic user, which
#: httpx sends with an empty password; that user is the credential)
URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/\s:@]*:)?)[^/\s@]+@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Blank anything that looks like an API key or bearer token (providers echo keys in error bodies), the
    password of a URL, and every one of ``secrets`` (the keys a backend sends, whatever their shape) where it
    appears verbatim."""
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    if "@" in text:
        text = URL_PASSWORD.sub(r"\1[redacted]@", text)
    return SECRET.sub("[redacted]", text)


#: the shortest run of a request's own text that an upstream's error message is taken to quote (a shorter one is
#: as likely a common phrase of both)
QUOTED_MIN = 16


def unquoted(text: str, sources: Iterable[str]) -> str:
    """``text`` (an upstream's error message) with every run of :data:`QUOTED_MIN` or more characters that one of
    ``sources`` (the request's prompt) holds blanked as ``[request text]``: a hosted API may quote the prompt it
    refuses ("your prompt 'xyz' was flagged"), and the message goes on to the logs and the ledger, which keep no
    prompt. Time in proportion to the lengths (a megabyte's prompt: some 20 ms): each source is read in
    steps of half the shortest run, which every such run holds one of whole, and each step found in ``text`` is
    widened there as far as both agree."""
    k = QUOTED_MIN // 2
    spans: list[tuple[int, int]] = []
    for src in sources:
        if len(src) < QUOTED_MIN or len(text) < QUOTED_MIN:
            continue
        grams = {text[i:i + k] for i in range(len(text) - k + 1)}
        where: dict[str, list[int]] = {}
        for j in range(0, len(src) - k + 1, k):
            if (w := src[j:j + k]) in grams and len(at := where.setdefault(w, [])) < 8:  # (a few of a repeated one)
                at.append(j)
        covered = 0
        for i in range(len(text) - k + 1):
            if i < covered or (at := where.get(text[i:i + k])) is None:
                continue
            best = (i, i)
            for j in at:  # the run through text[i] and src[j], as far as both agree either way
                a, b = i, i + k
                while a > 0 and a - i + j > 0 and text[a - 1] == src[a - i + j - 1]:
                    a -= 1
                while b < len(text) and b - i + j < len(src) and text[b] == src[b - i + j]:
                    b += 1
                best = max(best, (a, b), key=lambda r: r[1] - r[0])
            if best[1] - best[0] >= QUOTED_MIN:
                spans.append(best)
                covered = best[1]
    merged: list[list[int]] = []
    for a, b in sorted(spans):  # (one source's runs may overlap another's)
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, end = [], 0
    for a, b in merged:
        out += [text[end:a], "[request text]"]
        end = b
    return "".join(out) + text[end:]


def _mro_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _refused_credential(status: int | None) -> str:
    """What a refused credential (:class:`ProviderAuthError`) says: a 402 or a 429 so refused is an account out of
    quota or credits (Payment Required; OpenAI's ``insufficient_quota``), the key itself fine; a 401/403 rejects
    the key."""
    return "account out of quota or credits" if status in (402, 429) else "credentials rejected"


def classify(exc: BaseException, provider: str, *, timeout_s: float | None = None) -> CascadeError:
    """Map anything a provider call raised to the error tree (a ``CascadeError`` is kept, its text redacted)."""
    if isinstance(exc, ProviderAuthError):
        # a fresh error, deliberately not chained: the original's text (and its cause's) may hold the key
        status = exc.upstream_status
        return ProviderAuthError(f"{provider}: {_refused_credential(status)}" + (f" (HTTP {status})" if status else ""),
                                 provider=provider, status=status)
    if isinstance(exc, CascadeError):
        if exc.message != (clean := redact(exc.message)):
            exc.message, exc.args = clean, (clean,)
        return exc
    out: CascadeError
    if isinstance(exc, TimeoutError) or "TimeoutException" in _mro_names(exc):
        within = f" within {timeout_s:.3g} s" if timeout_s is not None else ""
        out = ProviderTimeoutError(f"{provider}: no answer{within}", provider=provider)
    elif isinstance(exc, OSError) or _mro_names(exc) & {"TransportError", "NetworkError", "ProtocolError"}:
        out = ProviderConnectionError(f"{provider}: connection failed ({type(exc).__name__}: {redact(str(exc))})",
                                      provider=provider)
    else:
        out = ProviderError(f"{provider}: {type(exc).__name__}: {redact(str(exc))}", provider=provider)
    out.__cause__ = exc
    return out


# --- the resilient backend --------------------------------------------------------------------------


@dataclass
class Provider:
    """One provider of a tier at run time."""

    name: str
    backend: Backend
    breaker: CircuitBreaker
    timeout_s: float
    price: "Price | None" = None
    kind: str = ""
    #: ``time.monotonic()`` until which the provider asked not to be called (its 429's Retry-After)
    held_until: float = 0.0
    #: a hold was set and no call since has been answered otherwise than with a 429: when the hold ends, one call
    #: goes first (the probe) and the others wait for its answer, rather than all calling at the same instant
    #: (and, the provider still over its limit, all getting the 429 again)
    after_hold: bool = False
    #: set when the probe after a hold is answered (None: no probe out)
    probing: asyncio.Event | None = None

    def held_for(self) -> float:
        """Seconds left of the provider's own Retry-After (0 when it may be called)."""
        return max(0.0, self.held_until - time.monotonic())

    def end_probe(self, answered: bool) -> None:
        """The probe after a hold has ended: ``answered`` other than with a 429, the hold is over for every call;
        else (a 429, which set a new hold, or no answer: cancelled, not sent) the next call after it probes."""
        if answered:
            self.after_hold = False
        if self.probing is not None:
            self.probing.set()
            self.probing = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        return self.price.cost(prompt_tokens, completion_tokens, cached_tokens) if self.price is not None else 0.0


@dataclass
class _Win:
    provider: Provider
    permit: Permit
    value: Any
    started: float
    wait_s: float
    attempt: int


@dataclass
class _Call:
    """The bookkeeping of one generate/stream call."""

    deadline: float
    record: list[ProviderAttempt] = field(default_factory=list)
    #: the deadline is the caller's (a user tier's latency budget), earlier than the tier's own timeout
    by_caller: bool = False
    #: the tier's own time for the whole call (its ``timeout_s``)
    full: float = math.inf

    def cut_short(self, exc: CascadeError, p: Provider, limit: float) -> bool:
        """Whether ``exc`` is a timeout shorter than ``p``'s own that says nothing of its health: imposed by
        the caller's deadline (one key's tight budget must not open a breaker for every key), or by the tier's
        deadline when time had gone before (a fallback given what a hung primary left, a retry after a
        rate-limit wait, a stream that ran to the tier's time limit). A provider that had the tier's whole time,
        or its own timeout, and did not answer counts against its breaker."""
        if not isinstance(exc, ProviderTimeoutError) or limit >= p.timeout_s:
            return False
        return self.by_caller or limit < FULL_TIME_SHARE * self.full


class ResilientBackend(Backend):
    """A tier's backend made of an ordered list of providers, with retries, fallback and breakers."""

    kind = "resilient"

    def __init__(self, providers: Sequence[Provider], *, name: str, retry: RetryPolicy | None = None,
                 timeout_s: float = 120.0, context_length: int | None = None,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if not providers:
            raise ValueError("a ResilientBackend needs at least one provider")
        super().__init__(model=providers[0].backend.model, name=name)
        self.providers = list(providers)
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self._ctx = context_length
        self._rng = rng or random.Random()
        self._sleep = sleep

    @classmethod
    def from_tier(cls, tier: "TierConfig", config: "Config", *, clock: Clock = time.monotonic,
                  rng: random.Random | None = None) -> "ResilientBackend":
        """Build the providers of a tier configured with ``providers:`` (each via its backend's from_tier)."""
        from cascade.backends import backend_class

        if not tier.providers:
            raise ValueError(f"tier {tier.name!r} has no providers")
        b, r = tier.breaker, tier.retry
        providers = []
        for pc in tier.providers:
            timeout = pc.timeout_s or tier.timeout_s
            sub = tier.model_copy(update={"name": pc.name, "backend": pc.backend, "model": pc.model,
                                          "options": dict(pc.options), "timeout_s": timeout,
                                          "price": pc.price or tier.price, "providers": None})
            backend = backend_class(pc.backend).from_tier(sub, config)
            breaker = CircuitBreaker(pc.name, failure_threshold=b.failure_threshold, failure_rate=b.failure_rate,
                                     window_s=b.window_s, min_calls=b.min_calls, cooldown_s=b.cooldown_s,
                                     clock=clock)
            providers.append(Provider(name=pc.name, backend=backend, breaker=breaker, timeout_s=timeout,
                                      price=pc.price or tier.price, kind=pc.backend))
        policy = RetryPolicy(max_attempts=r.max_attempts, base_delay_s=r.base_delay_s,
                             max_delay_s=r.max_delay_s, max_retry_after_s=r.max_retry_after_s,
                             max_hold_s=r.max_hold_s)
        if rng is None and r.jitter_seed is not None:
            rng = random.Random(r.jitter_seed)
        return cls(providers, name=tier.name, retry=policy, timeout_s=tier.timeout_s,
                   context_length=tier.context_length, rng=rng)

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        if self._ctx is not None:
            return self._ctx
        known = [p.backend.context_length for p in self.providers if p.backend.context_length]
        return min(known) if known else None

    @property
    def ready(self) -> bool:
        """Ready when one provider is (the others are fallbacks)."""
        return any(p.backend.ready for p in self.providers)

    async def tokenize(self, request: GenerationRequest) -> None:
        await self.providers[0].backend.tokenize(request)

    def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        return self.providers[0].backend.count_prompt_tokens(request)

    async def start(self) -> None:
        for p in self.providers:
            await p.backend.start()

    async def close(self) -> None:
        for p in self.providers:
            await p.backend.close()

    def health(self) -> dict[str, dict[str, Any]]:
        """Each provider's breaker state and what is left of its Retry-After hold (for /ready and /metrics)."""
        return {p.name: {**p.breaker.snapshot(), "rate_limited_s": round(p.held_for(), 3)} for p in self.providers}

    # --- the attempt loop -------------------------------------------------------------------------
    def _call(self, deadline: float | None, record: list[ProviderAttempt] | None) -> _Call:
        own = time.monotonic() + self.timeout_s
        return _Call(own if deadline is None else min(own, deadline), record if record is not None else [],
                     by_caller=deadline is not None and deadline < own - 1e-3, full=self.timeout_s)

    def _attempt(self, p: Provider, n: int, wait: float, started: float, action: str, *,
                 exc: CascadeError | None = None, error_class: str | None = None, prompt_tokens: int = 0,
                 completion_tokens: int = 0, cached_tokens: int = 0) -> ProviderAttempt:
        return ProviderAttempt(
            provider=p.name, backend=p.kind or p.backend.kind, model=p.backend.model, attempt=n, wait_s=wait,
            latency_s=time.monotonic() - started, action=action,
            error_class=error_class or (type(exc).__name__ if exc is not None else None),
            error_message=exc.message if exc is not None else (None if error_class is None else "cancelled"),
            upstream_status=getattr(exc, "upstream_status", None), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cost_usd=p.cost(prompt_tokens, completion_tokens, cached_tokens),
            cached_prompt_tokens=cached_tokens)

    def _verdict(self, p: Provider, permit: Permit, exc: CascadeError, n: int, call: _Call, limit: float,
                 ) -> tuple[str, float]:
        """Tell the breaker and decide what comes next: ("raise"|"retry"|"fall_over", wait before retry)."""
        if call.cut_short(exc, p, limit):
            p.breaker.release(permit)
            return "fall_over", 0.0
        if isinstance(exc, ProviderInvalidRequestError):     # the provider answered: the request is at fault
            p.breaker.success(permit)
            return "raise", 0.0
        if isinstance(exc, ProviderAuthError):
            p.breaker.release(permit)
            what = _refused_credential(exc.upstream_status)
            p.breaker.trip(f"{what} (HTTP {exc.upstream_status or '?'})")
            log.warning("tier %s: provider %s: %s (HTTP %s); marked unhealthy for %.3g s, falling over",
                        self.name, p.name, what, exc.upstream_status or "?", p.breaker.cooldown_s)
            return "fall_over", 0.0
        if isinstance(exc, RateLimitedError):
            p.breaker.release(permit)
            if exc.retry_after and self.retry.max_hold_s > 0:  # later calls keep off it meanwhile
                p.held_until = max(p.held_until, time.monotonic() + min(exc.retry_after, self.retry.max_hold_s))
                p.after_hold = True
            wait = self.retry.backoff(n, exc.retry_after, self._rng)
            if wait is not None and self._affords(p, wait, call):
                return "retry", wait
            return "fall_over", 0.0
        if exc.fall_over:
            p.breaker.failure(permit, type(exc).__name__)
            return "fall_over", 0.0
        p.breaker.release(permit)
        return "raise", 0.0

    @staticmethod
    def _affords(p: Provider, wait: float, call: _Call) -> bool:
        """Whether a wait before calling ``p`` leaves it enough of the call's time (RETRY_MIN_SHARE)."""
        after = max(MIN_ATTEMPT_S, RETRY_MIN_SHARE * min(p.timeout_s, call.full))
        return time.monotonic() + wait + after < call.deadline

    async def _turn(self, p: Provider, call: _Call) -> tuple[float, bool] | None:
        """Wait until ``p`` may be called: out its Retry-After hold, then, while the first call after the hold (its
        probe) is out, until that call is answered. Returns (seconds waited, whether this call is the probe), or
        None: the provider is held longer than this call may wait (``max_retry_after_s``, the deadline)."""
        waited = 0.0
        while True:
            hold = p.held_for()
            if hold > 0:   # as a retry within one call would: wait out a short hint, fall over from a long one
                if hold > self.retry.max_retry_after_s or not self._affords(p, hold, call):
                    return None
                log.info("tier %s: provider %s asked not to be called for %.3f s more; waiting", self.name, p.name,
                         hold)
                await self._sleep(hold)
                waited += hold
                continue
            if p.probing is None:
                if p.after_hold:
                    p.probing = asyncio.Event()
                return waited, p.after_hold
            # another call probes the provider after its hold: wait for its answer (a 429 holds it again) as long
            # as this call could still afford a retry
            may = call.deadline - time.monotonic() - max(MIN_ATTEMPT_S, RETRY_MIN_SHARE * min(p.timeout_s, call.full))
            if may <= 0:
                return None
            since = time.monotonic()
            try:
                async with asyncio.timeout(may):
                    await p.probing.wait()
            except TimeoutError:
                return None
            finally:
                waited += time.monotonic() - since

    async def _first_success(self, request: GenerationRequest, call: _Call,
                             attempt_fn: Callable[[Provider, float], Awaitable[Any]]) -> _Win:
        last: CascadeError | None = None
        skipped: list[Provider] = []   # breaker open
        held: list[Provider] = []      # its last Retry-After runs longer than this call may wait
        hints: list[float] = []        # the Retry-After of every 429 of this call: the client is told the soonest
        for i, p in enumerate(self.providers):
            n, wait = 0, 0.0
            hold = p.held_for()
            if hold > 0 and p.breaker.state == CircuitBreaker.OPEN and p.breaker.retry_after() > hold:
                skipped.append(p)  # its breaker refuses it past the hold: waiting the hold out would be for nothing
                continue
            while True:
                held_since = time.monotonic()
                try:   # before each attempt, a retry's too: the provider's hold, and the probe after it
                    turn = await self._turn(p, call)
                except asyncio.CancelledError:  # cancelled before the call: nothing was sent, nothing is billed
                    if n == 0:
                        call.record.append(self._attempt(p, 0, time.monotonic() - held_since, held_since, "held",
                                                         error_class=CANCELLED))
                    raise
                if turn is None:
                    if n == 0:
                        held.append(p)
                    break
                wait += turn[0]
                probe = turn[1]
                permit = p.breaker.acquire()
                if permit is None:
                    if probe:
                        p.end_probe(False)
                    if n == 0:
                        skipped.append(p)
                    break
                remaining = call.deadline - time.monotonic()
                if remaining < MIN_ATTEMPT_S:
                    p.breaker.release(permit)
                    if probe:
                        p.end_probe(False)
                    raise self._attach(last or ProviderTimeoutError(
                        f"tier {self.name!r}: deadline reached before provider {p.name!r} could be tried",
                        provider=self.name), call)
                n += 1
                timeout = min(p.timeout_s, remaining)
                started = time.monotonic()
                try:
                    async with asyncio.timeout(timeout):
                        value = await attempt_fn(p, timeout)
                except asyncio.CancelledError:
                    p.breaker.release(permit)
                    if probe:
                        p.end_probe(False)
                    call.record.append(self._attempt(p, n, wait, started, "cancelled", error_class=CANCELLED,
                                                     prompt_tokens=billed_prompt(p.backend, request, None)))
                    raise
                except Exception as raw:  # noqa: BLE001 - every failure is classified, none escapes raw
                    exc = classify(raw, p.name, timeout_s=timeout)
                    action, next_wait = self._verdict(p, permit, exc, n, call, timeout)
                    if probe:   # after _verdict: a 429's new hold is set before the calls waiting on it look
                        p.end_probe(not isinstance(exc, RateLimitedError))
                    call.record.append(self._attempt(p, n, wait, started, action, exc=exc,
                                                     prompt_tokens=billed_prompt(p.backend, request, exc)))
                    if action == "raise":
                        raise self._attach(exc, call) from exc.__cause__
                    last = exc
                    if isinstance(exc, RateLimitedError) and exc.retry_after:
                        hints.append(exc.retry_after)
                    if action == "retry":
                        log.info("tier %s: provider %s rate limited; retrying in %.3f s", self.name, p.name,
                                 next_wait)
                        await self._sleep(next_wait)
                        wait = next_wait
                        continue
                    if i + 1 < len(self.providers):
                        log.info("tier %s: provider %s failed (%s); falling over to %s", self.name, p.name,
                                 type(exc).__name__, self.providers[i + 1].name)
                    break
                else:
                    if probe:
                        p.end_probe(True)
                    return _Win(p, permit, value, started, wait, n)
        if last is None and held:   # nothing was called: each provider's own hint says when to come back
            ra = min([p.held_for() for p in held] + [p.breaker.retry_after() for p in skipped])
            raise self._attach(RateLimitedError(
                f"tier {self.name!r}: every provider is rate limited or unavailable "
                f"({', '.join(p.name for p in held + skipped)}); retry after {ra:.1f} s",
                provider=self.name, retry_after=max(ra, 0.001)), call)
        if last is None:
            soonest = min(skipped, key=lambda p: p.breaker.retry_after()) if skipped else None
            ra = soonest.breaker.retry_after() if soonest is not None else 0.0
            refused = bool(skipped) and all(p.breaker.tripped for p in skipped)
            if not refused:
                when = f"retry after {ra:.1f} s"
            elif soonest.breaker.state == CircuitBreaker.HALF_OPEN:  # skipped half-open: its probe is out
                when = (f"they refused our credentials; {'its' if len(skipped) == 1 else 'a'} probe is in "
                        "flight and gets through once an operator fixes them")
            else:
                when = (f"they refused our credentials; a probe goes through in {ra:.1f} s, once an operator "
                        "fixes them")
            error = CircuitOpenError(
                f"tier {self.name!r}: every provider's circuit breaker is open "
                f"({', '.join(p.name for p in skipped)}); {when}",
                provider=self.name, retry_after=max(ra, 0.001))
            if refused:  # a client's retries cannot help: as ProviderAuthError says itself
                error.should_retry = False
            raise self._attach(error, call)
        if isinstance(last, RateLimitedError) and hints:  # the first provider free again, not the last one asked
            last.retry_after = min(hints)
        raise self._attach(last, call)

    @staticmethod
    def _attach(exc: CascadeError, call: _Call) -> CascadeError:
        exc.attempts = tuple(call.record)  # type: ignore[attr-defined]
        return exc

    # --- Backend API ------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, *, deadline: float | None = None,
                       record: list[ProviderAttempt] | None = None) -> GenerationResult:
        """Answer from the first provider that can, under one deadline (absolute ``time.monotonic()``).

        Every provider attempt is appended to ``record`` as it ends; a raised error carries them as
        ``exc.attempts``.
        """
        call = self._call(deadline, record)

        async def attempt(p: Provider, timeout: float) -> GenerationResult:
            return await p.backend.generate(request)

        win = await self._first_success(request, call, attempt)
        res: GenerationResult = win.value
        win.provider.breaker.success(win.permit)
        call.record.append(self._attempt(win.provider, win.attempt, win.wait_s, win.started, "served",
                                         prompt_tokens=res.usage.prompt_tokens,
                                         completion_tokens=res.usage.completion_tokens,
                                         cached_tokens=res.usage.cached_prompt_tokens))
        return res

    async def stream(self, request: GenerationRequest, *, deadline: float | None = None,
                     record: list[ProviderAttempt] | None = None) -> AsyncIterator[StreamChunk]:
        """Stream from the first provider that yields a first chunk; fall over only before that chunk."""
        call = self._call(deadline, record)

        async def first_chunk(p: Provider, timeout: float) -> tuple[AsyncIterator[StreamChunk], StreamChunk | None]:
            it = aiter(p.backend.stream(request))
            try:
                return it, await anext(it)
            except StopAsyncIteration:
                return it, None
            except BaseException:
                await _aclose(it)
                raise

        win = await self._first_success(request, call, first_chunk)
        p, permit = win.provider, win.permit
        it, chunk = win.value
        if permit.probe:
            # a half-open provider that streams has answered: its probe succeeds with its first chunk, not at the
            # end of an answer that may run for minutes while every other request skips the provider (a 503
            # where it is the tier's only one); the rest of the stream counts as any call of a closed breaker
            p.breaker.success(permit)
            permit = p.breaker.acquire() or permit
        n_tokens, texts, usage, settled = 0, [], None, False

        def settle(action: str, exc: CascadeError | None = None, error_class: str | None = None) -> None:
            nonlocal settled
            settled = True
            pt = usage.prompt_tokens if usage else p.backend.estimate_prompt_tokens(request)
            ct = usage.completion_tokens if usage else answer_tokens(n_tokens, "".join(texts))
            call.record.append(self._attempt(p, win.attempt, win.wait_s, win.started, action, exc=exc,
                                             error_class=error_class, prompt_tokens=pt, completion_tokens=ct,
                                             cached_tokens=usage.cached_prompt_tokens if usage else 0))

        try:
            while chunk is not None:
                n_tokens += len(chunk.tokens)
                texts.append(chunk.text)
                usage = chunk.usage or usage
                yield chunk
                remaining = call.deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(min(remaining, p.timeout_s), 0.0)):
                        chunk = await anext(it)
                except StopAsyncIteration:
                    chunk = None
                except asyncio.CancelledError:
                    raise
                except Exception as raw:  # noqa: BLE001
                    exc = classify(raw, p.name, timeout_s=min(remaining, p.timeout_s))
                    # the breaker hears of it as of the same error before the first chunk (a rate limit is neutral
                    # and holds the provider, refused credentials force it open, an invalid request is no failure),
                    # retries spent: nothing is retried once bytes went out
                    self._verdict(p, permit, exc, self.retry.max_attempts, call, remaining)
                    # bytes have gone to the consumer: never hide this failure behind another provider
                    exc.fall_over = False
                    exc.mid_stream = True  # type: ignore[attr-defined]
                    settle("failed", exc)
                    raise self._attach(exc, call) from exc.__cause__
            p.breaker.success(permit)
            settle("served")
        finally:
            if not settled:   # the consumer stopped early or the call was cancelled
                p.breaker.release(permit)
                settle("cancelled", error_class=CANCELLED)
            await _aclose(it)


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing a broken stream must not mask the real error
            log.debug("error while closing a provider stream", exc_info=True)


__all__ = ["CircuitBreaker", "Permit", "Provider", "ProviderAttempt", "ResilientBackend", "RetryPolicy",
           "billed_prompt", "classify", "merge_provider_attempts", "redact", "unquoted", "CANCELLED",
           "DEADLINE_GRACE_S", "MIN_ATTEMPT_S"]
