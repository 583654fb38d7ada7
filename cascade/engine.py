"""The cascade engine: routes a request through a chain of tiers and accounts for every attempt.

For each tier in order: generate (with token logprobs), compute confidence features, ask the pure policy
(:func:`cascade.policy.decide`) whether to keep the answer or escalate. The last tier always answers.
Every attempt, failed ones included, is recorded; the request's record carries the total cost, what
the last tier alone would have cost, and the escalation waste (attempts whose answer was thrown away).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from calibration.calibrators import Calibrator, calibrator_from_dict, load_calibrator
from calibration.features import FEATURE_NAMES, extract_features
from cascade.backends import Backend, backend_class
from cascade.budget import Budget, call_ceiling, dearest_price, first_price, fit_budget, latency_budget_out
from cascade.cache import CachedAnswer, ResponseCache, cache_key
from cascade.config import CalibratorConfig, Config, TierConfig, topk_problem
from cascade.errors import (
    BudgetExceededError,
    CascadeError,
    CircuitOpenError,
    ClientDisconnected,
    ConfigError,
    ContextLengthExceededError,
    EngineClosedError,
    EngineLoopError,
    InternalError,
    InvalidRequestError,
    LedgerError,
    LedgerTimeoutError,
    LedgerUnavailableError,
    NotFoundError,
    ProviderContextLengthError,
    ProviderInvalidRequestError,
    ProviderTimeoutError,
    RateLimitedError,
    UnknownModelError,
)
from cascade.ledger import INTERRUPTED, Ledger, log_failure
from cascade.policy import decide
from cascade.resilience import (
    CANCELLED,
    DEADLINE_GRACE_S,
    ProviderAttempt,
    ResilientBackend,
    billed_prompt,
    classify,
    merge_provider_attempts,
)
from cascade.types import (MAX_REQUEST_ID, Attempt, CascadeRecord, Feedback, GenerationRequest, GenerationResult,
                           StreamChunk, Usage, answer_tokens, checked_attribution, checked_feedback, checked_request,
                           is_utf8)

if TYPE_CHECKING:
    from cascade.shadow import ShadowSet

log = logging.getLogger("cascade.engine")

#: what ``cache=`` of :meth:`Engine.run_uncommitted` and :meth:`Engine.stream` may say: "use" the response cache,
#: "refresh" it (answer afresh, store the answer) or "bypass" it (neither read nor store)
CACHE_MODES = ("use", "refresh", "bypass")

#: while the ledger cannot be written, how often (seconds) the reason its requests are refused is logged again
LEDGER_REFUSAL_LOG_S = 60.0

#: the tasks of this chain of contexts that ran requests, each with its engine (weak references both). A task made by
#: ``create_task``, ``wait_for`` (3.11) or ``gather`` starts with a copy of its creator's context, so
#: :meth:`Engine.close` called in one knows the tasks it was called on behalf of (:meth:`Engine._closer_family`).
#: Appended, never reset: a stream's generator may be closed from another context. (Context state, not configuration:
#: a ContextVar is made once, at module level.)
_REQUEST_TASKS: "contextvars.ContextVar[tuple[tuple[weakref.ref[Engine], weakref.ref[asyncio.Task]], ...]]" = \
    contextvars.ContextVar("cascade_engine_request_tasks", default=())


def build_calibrator(cfg: CalibratorConfig, *, tier: str, where: str | None = None,
                     top_logprobs: int | None = None) -> Calibrator:
    """The calibrator a config section describes; ConfigError naming ``where`` (default
    ``tiers.<tier>.calibrator``) when it cannot be built or reads a feature the engine does not compute, or
    (given the tier's ``top_logprobs``) one computed from top alternatives that the tier does not ask for.

    Beside ``artifact``, an explicit ``feature`` serves the artifact's fitted map from that engine feature
    (an artifact fit offline on a stored confidence, e.g. the shared data's answer-letter logprob, which
    the engine computes as ``first_token_logprob``)."""
    where = where or f"tiers.{tier}.calibrator"
    try:
        if cfg.artifact:
            cal = load_calibrator(cfg.artifact)
            if "feature" in cfg.model_fields_set and cal.inputs != [cfg.feature]:
                cal = cal.with_feature(cfg.feature)
        else:
            cal = calibrator_from_dict({"method": cfg.method, "feature": cfg.feature, "params": cfg.params})
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    unknown = [f for f in cal.inputs if f not in FEATURE_NAMES]
    if unknown:
        raise ConfigError(
            f"{where}: the artifact {cfg.artifact} reads {unknown[0]!r}, which the engine does not compute "
            f"(it computes {', '.join(FEATURE_NAMES)}); set `feature:` beside `artifact:` to the engine feature "
            f"it stands for (first_token_logprob for an answer-letter logprob), or fit on live outputs with "
            f"`cascade calibrate --feature mean_logprob`")
    if top_logprobs is not None and (why := topk_problem(where, cal.inputs, tier, top_logprobs)):
        raise ConfigError(why)  # (the config checked what it names; an artifact's own feature is known here)
    return cal


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
    """What a request's ``model`` resolved to: a policy's chain, or one pinned tier, with the thresholds,
    calibrators and shadows in force when it resolved, so that a reload meanwhile never mixes the old and the
    new in one request. ``calibrators`` holds one per tier: the policy's own where it has one (a per-task
    calibrator), else the tier's."""

    name: str
    tiers: tuple[Tier, ...]
    thresholds: tuple[float, ...]
    calibrators: tuple[Calibrator, ...]
    pinned: bool = False
    shadows: ShadowSet | None = field(default=None, compare=False)

    def calibrator(self, i: int) -> Calibrator:
        return self.calibrators[i]


def build_policy_calibrators(config: Config) -> dict[str, dict[str, Calibrator]]:
    """Every policy's per-tier calibrator overrides (``policies.<name>.calibrators``), built."""
    return {name: {t: build_calibrator(cc, tier=t, where=f"policies.{name}.calibrators.{t}",
                                       top_logprobs=config.tier(t).top_logprobs)
                   for t, cc in pol.calibrators.items()}
            for name, pol in config.policies.items() if pol.calibrators}


@dataclass
class Outcome:
    record: CascadeRecord
    result: GenerationResult


@dataclass
class _Live:
    """The last tier, to be streamed live by the caller (``_run_route(..., stream_last=True)``)."""

    tier: Tier
    request: GenerationRequest
    attempt: Attempt
    answers: list
    timeout: float
    calibrator: Calibrator
    #: the request as the caller made it (``request`` is fitted to this tier), for shadow samples
    original: GenerationRequest | None = None
    #: the caller's limits, which a shadow sample keeps to as well
    budget: Budget | None = None
    #: the errors of the earlier tiers rate limited or with every breaker open (:func:`_soonest_retry`)
    hints: list = field(default_factory=list)


@dataclass
class StreamStart:
    record: CascadeRecord
    tier: str


@dataclass
class StreamDelta:
    text: str
    tokens: tuple


@dataclass
class StreamEnd:
    record: CascadeRecord
    finish_reason: str
    usage: Usage | None


@dataclass
class StreamFailed:
    record: CascadeRecord
    error: CascadeError


StreamEvent = StreamStart | StreamDelta | StreamEnd | StreamFailed


def _class_names(*roots: type) -> frozenset[str]:
    """The names of ``roots`` and of every class derived from them (attempts record their error by name)."""
    names, todo = set(), list(roots)
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


#: errors an earlier tier gives the same request every time (it refuses the request itself, e.g. too long a
#: prompt): an answer from the tier after it is still the policy's own, and may be cached (cascade/cache.py)
_REFUSALS_EVERY_TIME = _class_names(InvalidRequestError, ProviderInvalidRequestError)


def build_backend(tc: TierConfig, config: Config) -> Backend:
    """A tier's backend, not loaded: a tier with ``providers`` gets retries, fallback between providers and
    breakers."""
    return (ResilientBackend.from_tier(tc, config) if tc.providers
            else backend_class(tc.backend).from_tier(tc, config))


def check_backends(config: Config, tiers: "set[str] | None" = None) -> None:
    """Build every tier's backend and calibrator (or those of ``tiers``) as the engine does, without loading a
    model or opening the ledger, and check what each backend needs before it loads (a model id that names
    nothing): a ConfigError, one line, on the first problem."""
    for tc in config.tiers:
        if tiers is not None and tc.name not in tiers:
            continue
        backend = build_backend(tc, config)
        providers = getattr(backend, "providers", None)  # a tier with providers checks each
        for b in [p.backend for p in providers] if providers else [backend]:
            b.check()
        build_calibrator(tc.calibrator, tier=tc.name, top_logprobs=tc.top_logprobs)


class Engine:
    """Holds the tiers, the policies and the ledger. Create with ``await Engine.open(config)`` (or ``async with
    await Engine.open(config) as engine``), use it on that event loop only, and ``await engine.close()``."""

    def __init__(self, config: Config, *, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        #: the event loop the engine belongs to (its ledger thread answers there, its backends' workers and
        #: connections live there): set when it is built inside one, else at its first request
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()
        #: set by :meth:`close`: its task, which a second close waits for
        self._closing: asyncio.Task[None] | None = None
        #: the tasks running a request now (:meth:`run_uncommitted`, :meth:`stream`), with how many each runs
        self._callers: dict[asyncio.Task, int] = {}
        #: of those, how many of each task's requests are streams suspended at a ``yield`` to their reader: a task
        #: that called close() through another task holds only such, and is not waited for (:meth:`close`)
        self._parked: dict[asyncio.Task, int] = {}
        #: request ids given by callers that are being answered now (the ledger's are checked as well)
        self._ids_in_flight: set[str] = set()
        #: the streams handed out (:meth:`stream`), so that :meth:`close` can close one left open
        self._streams: "weakref.WeakSet[AsyncIterator[StreamEvent]]" = weakref.WeakSet()
        self.tiers: dict[str, Tier] = {}
        for tc in config.tiers:
            self.tiers[tc.name] = Tier(config=tc, backend=build_backend(tc, config),
                                       calibrator=build_calibrator(tc.calibrator, tier=tc.name,
                                                                   top_logprobs=tc.top_logprobs))
        #: per-policy (per-task) calibrator overrides: policy -> tier -> calibrator; swapped whole on reload
        self.policy_calibrators = build_policy_calibrators(config)
        from cascade.shadow import ShadowSampler, ShadowSet

        #: shadow policies, evaluated on every finished request and written with it (cascade/shadow.py)
        self.shadows = ShadowSet(config, self.tiers, self.policy_calibrators)
        #: runs, in the background, the tiers a sampled shadow needs and the live path skipped; outlives
        #: reloads (which swap ``shadows``), so its budget reservations and in-flight samples are kept
        self.sampler = ShadowSampler(self.call_tier, ledger, grace_s=config.server.graceful_shutdown_s)
        #: called with every finished record as its ledger write is queued, whatever the outcome (answered,
        #: partial, error, cancelled): one row, one call, so a listener (the HTTP layer's metrics) agrees
        #: with the ledger by construction. Listeners must be quick and must not raise.
        self.record_listeners: list[Callable[[CascadeRecord], None]] = []
        #: called with every record and its write's error (None: committed) once its ledger write is done or
        #: no longer awaited: the HTTP layer's daily spend holds end there, when the ledger's sum includes the
        #: request. A stream whose answer went out before its write timed out (:class:`LedgerTimeoutError`) is
        #: heard once the write settles instead (:meth:`_settled_late`), as its row stands then: as served, or the
        #: error of its write, lost. Same rules as ``record_listeners``.
        self.commit_listeners: list[Callable[[CascadeRecord, BaseException | None], None]] = []
        #: streams whose answer went out and whose write timed out, not yet heard by ``commit_listeners``
        self._settling: set[str] = set()
        ledger.late_listeners.append(self._settled_late)
        #: called with (record, status, error class) when a streamed answer in hand, written as answered, is left
        #: by its client and its row is made ``partial`` or ``cancelled`` (:meth:`_client_left`). Same rules.
        self.correction_listeners: list[Callable[[CascadeRecord, str, str], None]] = []
        #: called with a reload's summary once it is swapped in (cascade/recalibrate.py): the HTTP layer's
        #: drift windows start afresh when it changed what decides. Same rules as ``record_listeners``.
        self.reload_listeners: list[Callable[[dict], None]] = []
        #: set by :meth:`abort_in_flight`: why requests cancelled from now on were cancelled
        self._aborted: CascadeError | None = None
        #: when (monotonic) :meth:`check_ledger` last logged why it refuses requests: said once, not once a request
        self._ledger_refused_logged: float | None = None
        #: answers given again to the same greedy request (cascade/cache.py); None when ``cache.enabled`` is off
        self.cache = (ResponseCache(config.cache.max_entries, config.cache.ttl_s, config.cache.max_bytes)
                      if config.cache.enabled else None)
        #: cacheable non-streamed requests being answered now, by (key, generation): identical ones arriving
        #: meanwhile wait for the stored answer instead of calling the model again (:meth:`_cache_follow`)
        self._inflight: dict[tuple[str, int], asyncio.Future[None]] = {}

    @classmethod
    async def open(cls, config: Config, *, preload: bool = False) -> "Engine":
        """Open the ledger and build the tiers (``preload``: load every tier's model now, else at its first
        call). The engine belongs to the running event loop."""
        if not isinstance(config, Config):  # a dict, a path: one of our errors, saying what to pass
            raise ConfigError(f"Engine.open takes a cascade Config, got {type(config).__name__}: make one with "
                              "cascade.load_config(path) or cascade.parse_config(dict)")
        ledger = Ledger(config.ledger_target(), store_text=config.ledger.store_text,
                        timeout_s=config.ledger.timeout_s, max_pending=config.ledger.max_pending)
        # everything the config builds first (tiers, calibrators, policies, shadows): a config refused there
        # leaves the ledger untouched, neither created nor migrated
        engine = cls(config, ledger=ledger)
        await ledger.open()
        try:
            if preload:
                await engine.start()
        except BaseException:
            # the tiers loaded before the one that failed hold their models, workers and connections, and the
            # caller gets no engine to close them with: closed here, each even if one before it failed
            for tier in engine.tiers.values():
                try:
                    await tier.backend.close()
                except Exception as exc:  # noqa: BLE001 - the open's own error is the one raised
                    log.warning("opening the engine failed; closing tier %r then failed too: %s: %s", tier.name,
                                type(exc).__name__, exc)
            await ledger.close()
            raise
        return engine

    async def start(self, names: list[str] | None = None) -> None:
        """Load the named tiers' backends (all by default), one after another (they share the CPU)."""
        self._check_open()  # a closed engine's tiers, loaded now, would never be closed
        if isinstance(names, str):  # (its letters would be read as names)
            raise InvalidRequestError(f"names must be a list of tier names, got the string {names!r}: "
                                      f"start([{names!r}])", param="names")
        for name in names or ():
            if not isinstance(name, str) or name not in self.tiers:
                raise UnknownModelError(f"tier {name!r} does not exist; tiers: {', '.join(self.tiers)}",
                                        param="names")
        for name in names or list(self.tiers):
            self._check_open()  # (a close meanwhile closed the tiers not loaded yet: one loaded now is never closed)
            await self.tiers[name].backend.start()

    async def close(self, grace_s: float | None = None) -> None:
        """Stop taking requests (a new one raises :class:`EngineClosedError`), let those in flight finish for at
        most ``grace_s`` seconds (default ``server.graceful_shutdown_s``), cancel the rest (their rows carry
        ``EngineClosedError``), then close the shadow sampler, every backend and the ledger, each even if one
        before it failed. A second call waits for the first.

        The calling task's streams left open are closed, not waited for (it cannot read them while it waits here);
        so are those of a task that called this through one it made (``asyncio.wait_for``, ``create_task``,
        ``gather``) while that task holds only streams suspended between two events: it is waiting for this task,
        as the caller itself would be (:meth:`_closer_family`)."""
        self._check_loop()
        if grace_s is not None and (isinstance(grace_s, bool) or not isinstance(grace_s, (int, float))
                                    or math.isnan(grace_s) or grace_s < 0):
            raise InvalidRequestError(f"grace_s must be a number of seconds of at least 0 (or None: "
                                      f"server.graceful_shutdown_s), got {grace_s!r}", param="grace_s")
        if self._closing is None:
            grace = self.config.server.graceful_shutdown_s if grace_s is None else grace_s
            self.sampler.stop_drawing(grace)  # no sample is drawn (and paid for) while requests finish
            closer = asyncio.current_task()
            self._closing = asyncio.ensure_future(self._close(grace, closer, self._closer_family(closer)))
        await asyncio.shield(self._closing)

    def _closer_family(self, closer: "asyncio.Task | None") -> "set[asyncio.Task]":
        """The tasks, other than ``closer``, that ran this engine's requests in the chain of contexts ``closer`` was
        made in: those that made it (or made the task that made it), directly or through ``wait_for`` or
        ``gather``. A server's lifespan task has none: its request tasks are not made in its context."""
        return {t for e, ref in _REQUEST_TASKS.get() if e() is self and (t := ref()) is not None and t is not closer}

    async def _close(self, grace_s: float, closer: "asyncio.Task | None", family: "set[asyncio.Task]") -> None:
        await self._wait_for_callers(grace_s, closer, family)
        await self._close_streams()
        failed: list[BaseException] = []
        # in-flight shadow samples finish (or are cancelled) and are recorded first, the ledger last
        for close in [self.sampler.close, *(tier.backend.close for tier in self.tiers.values()), self.ledger.close]:
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - the rest still close; the first failure is raised after
                log.warning("closing the engine: %s failed: %s: %s", getattr(close, "__qualname__", close),
                            type(exc).__name__, exc)
                failed.append(exc)
        if failed:
            raise failed[0]

    async def _wait_for_callers(self, grace_s: float, closer: "asyncio.Task | None",
                                family: "set[asyncio.Task]") -> None:
        """Until no request runs, for at most ``grace_s``; then cancel those still running (as a server's
        shutdown does) and wait until they have recorded themselves. The task that called :meth:`close` (it
        may hold a stream open), tasks already done (a stream left open by one), and tasks of the closer's
        ``family`` while all their requests are streams suspended at a ``yield`` (likely waiting for the close,
        as the closer itself) are not waited for: their streams are closed by :meth:`_close_streams`. A family
        task that is running a request (a whole answer, a stream being read now) is waited for as any other."""
        def idle(t: asyncio.Task) -> bool:
            return t in family and self._parked.get(t, 0) >= self._callers.get(t, 0)

        def running() -> list[asyncio.Task]:
            return [t for t in self._callers if t is not closer and not t.done() and not idle(t)]

        deadline = time.monotonic() + grace_s
        while running() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        late = running()
        if not late:
            return
        log.warning("closing the engine: %d requests still running after %.1f s are cancelled", len(late), grace_s)
        self.abort_in_flight(EngineClosedError(f"the engine was closed before the request finished (it ran past "
                                               f"the close's grace of {grace_s:g} s)"))
        for t in late:
            t.cancel()
        deadline = time.monotonic() + 10.0  # (their rows are written under shield; a stuck one is not waited on)
        while running() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _close_streams(self) -> None:
        """Close the streams still open that no running task is reading (left open by the closer, or by a task
        that ended): each is recorded as what its reader got, ``EngineClosedError`` its reason."""
        open_ = [g for g in list(self._streams) if g.ag_frame is not None and not g.ag_running]
        if not open_:
            return
        if self._aborted is None:
            self._aborted = EngineClosedError("the engine was closed while the stream was open")
        for gen in open_:
            try:
                await gen.aclose()
            except Exception as exc:  # noqa: BLE001 - one stream's failure does not keep the rest open
                log.warning("closing the engine: a stream left open failed to close: %s: %s", type(exc).__name__,
                            exc)

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise EngineLoopError("this engine was opened on another event loop: its ledger thread, backends and "
                                  "connections belong to that loop; use it there, or open an engine in this one "
                                  "(Engine.open)")

    def _check_open(self) -> None:
        """The engine is open, and this is its event loop (else raised, with no row: nothing could record it)."""
        self._check_loop()
        if self._closing is not None:
            raise EngineClosedError("the engine is closed (Engine.close()): it takes no more requests")
        if not self.ledger.is_open:  # built by hand (Engine(config, ledger=...)): its answers could not be recorded
            raise EngineClosedError("the engine's ledger is not open: build the engine with `await "
                                    "Engine.open(config)`, which opens it")

    @contextlib.contextmanager
    def _in_flight(self) -> "Iterator[asyncio.Task | None]":
        """Count the current task as running a request (:meth:`close` waits for it), and name it in its context
        (:meth:`_closer_family`); yields the task counted."""
        task = asyncio.current_task()
        self._callers[task] = self._callers.get(task, 0) + 1
        if task is not None:
            self._name_in_context(task)
        try:
            yield task
        finally:
            if (n := self._callers.get(task, 1) - 1) > 0:
                self._callers[task] = n
            else:
                self._callers.pop(task, None)

    def _name_in_context(self, task: asyncio.Task) -> None:
        """Add ``task`` to the context's tasks that ran this engine's requests, once; tasks done (or gone) are
        dropped from it then, so a chain of tasks that each make the next keeps only the live ones."""
        known = _REQUEST_TASKS.get()
        if any(e() is self and ref() is task for e, ref in known):
            return
        live = tuple((e, ref) for e, ref in known if e() is not None and (t := ref()) is not None and not t.done())
        _REQUEST_TASKS.set((*live, (weakref.ref(self), weakref.ref(task))))

    def _park(self, task: "asyncio.Task | None", n: int) -> None:
        """Count one more (``n`` 1) or one fewer (-1) of ``task``'s streams as suspended at a ``yield``."""
        if (left := self._parked.get(task, 0) + n) > 0:
            self._parked[task] = left
        else:
            self._parked.pop(task, None)

    async def _check_request_id(self, request_id: str) -> None:
        """A caller's own request id names no request yet (the ledger keeps one row per id, so a second request
        under it would be answered, and paid, and then fail to be recorded); it is held as in flight."""
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID \
                or "\x00" in request_id or not is_utf8(request_id):
            raise InvalidRequestError(f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters of valid "
                                      f"Unicode, without NUL, got {request_id!r}", param="request_id")
        reused = InvalidRequestError(f"request_id {request_id!r} names a request already made: the ledger keeps "
                                     "one row per request; give each request its own id", param="request_id")
        if request_id in self._ids_in_flight:  # (another request's hold: never released here)
            raise reused
        self._ids_in_flight.add(request_id)  # (before the read: a second request under it waits for none)
        try:
            if await self.ledger.query("SELECT 1 FROM requests WHERE request_id = ?", (request_id,)):
                raise reused
        except LedgerError as exc:  # (not recorded: the ledger could not say whether the id is free)
            self._ids_in_flight.discard(request_id)
            raise LedgerUnavailableError("the ledger cannot be read now, so this request (with its own "
                                         "request_id) was refused before any model was called: repeat it "
                                         "shortly") from exc
        except BaseException:
            self._ids_in_flight.discard(request_id)
            raise

    def abort_in_flight(self, reason: CascadeError) -> None:
        """Say why the requests about to be cancelled are cancelled (a graceful shutdown ran out of time):
        their ledger rows carry ``reason`` (status ``error``, or ``partial`` for a stream that had sent
        tokens) instead of ``cancelled`` by a client that left. The caller then cancels their tasks."""
        self._aborted = reason

    def _cancel_reason(self) -> CascadeError:
        return self._aborted or ClientDisconnected("client disconnected during the stream")

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
            own = self.policy_calibrators.get(name) or {}
            cals = tuple(own.get(t.name, t.calibrator) for t in tiers)
            return Route(name=name, tiers=tiers, thresholds=thresholds, calibrators=cals, shadows=self.shadows)
        tier = self.tiers.get(name)
        if tier is not None:
            return Route(name=name, tiers=(tier,), thresholds=(0.0,), calibrators=(tier.calibrator,), pinned=True,
                         shadows=self.shadows)
        raise UnknownModelError(
            f"model {name!r} does not exist; valid models: {', '.join(self.model_names())}", param="model")

    async def cost_ceiling(self, request: GenerationRequest, model: str | None,
                           budget: Budget | None = None) -> float:
        """The most ``request`` can cost through its route (USD): every tier of it tried, each billed for the
        prompt and ``max_tokens`` of answer at its dearest provider's price, within the per-request cost
        budget if there is one, and for a tier with providers the prompt once more for each that may time out
        before one answers (:func:`cascade.budget.call_ceiling`). What an admitted request holds against the
        daily spend limits until its ledger row is in. An estimate as the cost budget's is: a tier without a
        local tokenizer counts the prompt on the high side. Either count is made on a thread, off the event
        loop, and once (the tiers after, and the tiers' calls, find it made)."""
        total = 0.0
        for tier in self.resolve(model).tiers:
            await tier.backend.tokenize(request)
            prompt = tier.backend.estimate_prompt_tokens(request)
            total += call_ceiling(tier, prompt, request.max_tokens or tier.config.max_tokens)
        return total if budget is None or budget.cost_usd is None else min(total, budget.cost_usd)

    def tokens_asked(self, request: GenerationRequest, model: str | None) -> int:
        """What ``request`` counts against a tokens-per-minute limit, as OpenAI counts it: its prompt and the
        most it may generate (its ``max_tokens``, or the largest default of its route's tiers). The prompt is
        counted without a tokenizer (``rough_prompt_tokens``): the same for every route, and no tokenizer
        runs for a request that may yet be refused. The HTTP layer has it counted off the event loop first
        (``rough_prompt_tokens_off_loop``); here the count made is read."""
        tiers = self.resolve(model).tiers
        return request.rough_prompt_tokens() + (request.max_tokens or max(t.config.max_tokens for t in tiers))

    # --- the cascade ------------------------------------------------------------------------------
    async def run(self, request: GenerationRequest, *, model: str | None = None, endpoint: str = "chat",
                  request_id: str | None = None, api_key_id: str | None = None,
                  user_tier: str | None = None, budget: Budget | None = None,
                  end_user: str | None = None, metadata: dict[str, str] | None = None) -> Outcome:
        """Answer one request through its route; the record is in the ledger when this returns."""
        outcome, committed = await self.run_uncommitted(request, model=model, endpoint=endpoint,
                                                        request_id=request_id, api_key_id=api_key_id,
                                                        user_tier=user_tier, budget=budget, end_user=end_user,
                                                        metadata=metadata)
        # a caller cancelled while the row commits never got the answer: the row is made cancelled then
        await self._committed(outcome.record, committed)
        return outcome

    async def run_uncommitted(self, request: GenerationRequest, *, model: str | None = None,
                              endpoint: str = "chat", request_id: str | None = None,
                              api_key_id: str | None = None, user_tier: str | None = None,
                              budget: Budget | None = None, cache: str = "use", end_user: str | None = None,
                              metadata: dict[str, str] | None = None
                              ) -> "tuple[Outcome, asyncio.Future[None]]":
        """As :meth:`run`, but the answered request's ledger write is only queued: the second item resolves
        once it is committed (or raises ``LedgerError``). The caller must await it (:meth:`wait_committed`, so
        that a caller that gives up meanwhile leaves a ``cancelled`` row) before it lets the answer out;
        meanwhile it can prepare the response (the HTTP layer renders its body during the commit).

        The write happens even if nobody awaits it. Failed requests are recorded before this raises.

        ``cache`` (with the response cache on): "use" it, "refresh" it (answer afresh, store the answer) or
        "bypass" it (neither read nor store).
        """
        with self._in_flight():
            request = await self._admitted(request, budget, model=model, endpoint=endpoint, request_id=request_id,
                                           cache=cache, api_key_id=api_key_id, user_tier=user_tier,
                                           end_user=end_user, metadata=metadata)
            try:
                return await self._run_uncommitted(request, model, endpoint, request_id, api_key_id, user_tier,
                                                   budget, cache, end_user, metadata)
            finally:
                self._ids_in_flight.discard(request_id)

    async def _admitted(self, request: GenerationRequest, budget: Budget | None, *, model: str | None,
                        endpoint: str, request_id: str | None, cache: object = "use",
                        **attribution: object) -> GenerationRequest:
        """What every request meets first: the engine open and on its own loop; a caller's own request id that
        names no request yet (it is then held as in flight: the caller discards it when done); a well-formed
        request and budget, else :class:`InvalidRequestError`, recorded as a refusal as the HTTP layer's are."""
        self._check_open()
        if type(request_id) is _MintedId and not request_id.used:  # fresh: no lookup (the HTTP layer's ids)
            request_id.used = True
            self._ids_in_flight.add(request_id)
        elif request_id is not None:
            await self._check_request_id(request_id)
        try:
            try:
                checked_attribution(model=model, endpoint=endpoint, **attribution)
            except InvalidRequestError:  # its refusal's row holds none of it: the ledger could not write it
                model, endpoint, attribution = None, "chat", dict.fromkeys(attribution)
                raise
            if budget is not None:
                if not isinstance(budget, Budget):
                    raise InvalidRequestError(f"budget must be a cascade.Budget, got {type(budget).__name__}",
                                              param="budget")
                budget.check()
            if not isinstance(cache, str) or cache not in CACHE_MODES:
                raise InvalidRequestError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}",
                                          param="cache")
            return checked_request(request)
        except InvalidRequestError as exc:
            try:
                await self.record_refusal(exc, model=model, endpoint=endpoint, request_id=request_id, **attribution)
            finally:
                self._ids_in_flight.discard(request_id)
            raise
        except BaseException:
            self._ids_in_flight.discard(request_id)
            raise

    async def _run_uncommitted(self, request: GenerationRequest, model: str | None, endpoint: str,
                               request_id: str | None, api_key_id: str | None, user_tier: str | None,
                               budget: Budget | None, cache: str, end_user: str | None,
                               metadata: dict[str, str] | None) -> "tuple[Outcome, asyncio.Future[None]]":
        rec = self._new_record(model, endpoint, request_id, api_key_id, user_tier, end_user, metadata)
        t0 = time.perf_counter()
        await self._refuse_while_ledger_down(rec, model, t0)
        slot, hit = self._cache_lookup(model, endpoint, request, api_key_id, user_tier, budget, cache)
        # wait for an identical request being answered, unless a latency budget bounds this one: if that answer
        # is not stored, this one would start its own only after the wait
        if hit is None and slot is not None and cache == "use" and (budget is None or budget.latency_s is None):
            if await self._cache_follow(slot, rec, model, t0):
                slot, hit = self._cache_lookup(model, endpoint, request, api_key_id, user_tier, budget, cache)
        if hit is not None:
            return Outcome(record=rec, result=hit.result), self._serve_cached(rec, hit, t0)
        lead = self._cache_lead(slot)
        try:
            route, result = await self._start(rec, model, request, budget, t0, stream_last=False)
            assert isinstance(result, GenerationResult)
            self._finish(rec, route=route, t0=t0)
            committed = self._submit(rec, request, budget, route.shadows)
            if slot is not None:  # stored once its ledger row is committed: a hit never names a missing request
                committed.add_done_callback(lambda f: self._cache_store(f, slot, lead, rec, result))
        except BaseException:
            self._cache_settle(slot, lead)
            raise
        return Outcome(record=rec, result=result), committed

    def stream(self, request: GenerationRequest, *, model: str | None = None, endpoint: str = "chat",
               request_id: str | None = None, api_key_id: str | None = None,
               user_tier: str | None = None, budget: Budget | None = None,
               cache: str = "use", end_user: str | None = None,
               metadata: dict[str, str] | None = None) -> AsyncGenerator[StreamEvent, None]:
        """Stream one request's answer (an async generator: ``aclose()`` it to leave early; its row then says
        what went out).

        Every tier but the last is buffered: its answer must be complete before the policy can keep it.
        The first event, :class:`StreamStart`, comes once the serving tier is known; errors before it
        are raised (the caller can still answer with an HTTP error). The last tier streams live; if it
        fails before its first token, the best answer in hand is served; after bytes were sent, the
        stream ends with :class:`StreamFailed` and the ledger records the partial answer. ``cache``: as
        :meth:`run_uncommitted` (a hit is streamed as a buffered answer; an answer streamed live is stored).
        """
        events = self._checked_stream(request, model=model, endpoint=endpoint, request_id=request_id,
                                      api_key_id=api_key_id, user_tier=user_tier, budget=budget, cache=cache,
                                      end_user=end_user, metadata=metadata)
        self._streams.add(events)  # (close() closes one left open)
        return events

    async def _checked_stream(self, request: GenerationRequest, *, model: str | None, endpoint: str,
                              request_id: str | None, api_key_id: str | None, user_tier: str | None,
                              budget: Budget | None, cache: str, end_user: str | None,
                              metadata: dict[str, str] | None) -> AsyncGenerator[StreamEvent, None]:
        with self._in_flight() as task:
            request = await self._admitted(request, budget, model=model, endpoint=endpoint, request_id=request_id,
                                           cache=cache, api_key_id=api_key_id, user_tier=user_tier,
                                           end_user=end_user, metadata=metadata)
            events = self._stream(request, model, endpoint, request_id, api_key_id, user_tier, budget, cache,
                                  end_user, metadata)
            try:
                async for event in events:
                    self._park(task, 1)  # (the task counted, whichever task resumes the stream)
                    try:
                        yield event
                    finally:
                        self._park(task, -1)
            finally:
                try:
                    await events.aclose()
                finally:
                    self._ids_in_flight.discard(request_id)

    async def _stream(self, request: GenerationRequest, model: str | None, endpoint: str, request_id: str | None,
                      api_key_id: str | None, user_tier: str | None, budget: Budget | None, cache: str,
                      end_user: str | None, metadata: dict[str, str] | None) -> AsyncIterator[StreamEvent]:
        rec = self._new_record(model, endpoint, request_id, api_key_id, user_tier, end_user, metadata)
        t0 = time.perf_counter()
        await self._refuse_while_ledger_down(rec, model, t0)
        slot, hit = self._cache_lookup(model, endpoint, request, api_key_id, user_tier, budget, cache)
        # with cache.coalesce_streams, wait for an identical request being answered, as run_uncommitted does
        if (hit is None and slot is not None and cache == "use" and self.config.cache.coalesce_streams
                and (budget is None or budget.latency_s is None)):
            if await self._cache_follow(slot, rec, model, t0):
                slot, hit = self._cache_lookup(model, endpoint, request, api_key_id, user_tier, budget, cache)
        if hit is not None:
            committed = self._serve_cached(rec, hit, t0)
            await self._committed(rec, committed)
            served: GenerationResult = hit.result
        else:
            # identical requests arriving meanwhile (non-streamed ones, and streams if they coalesce) wait for
            # this answer: they are woken once it is stored, or is not to be
            lead = self._cache_lead(slot)
            try:
                route, outcome = await self._start(rec, model, request, budget, t0, stream_last=True)
                if not isinstance(outcome, GenerationResult):
                    live = self._stream_live(outcome, route, rec, t0, slot)
                    # past the live tier's time limit nothing will be stored: wake the others then, even if this
                    # stream's own client has stopped reading (its time limit only bounds the model)
                    wake = (asyncio.get_running_loop().call_later(outcome.timeout, self._cache_settle, slot, lead)
                            if lead is not None else None)
                    try:
                        async for event in live:
                            if isinstance(event, (StreamEnd, StreamFailed)):  # stored (or not): wake the others
                                self._cache_settle(slot, lead)
                            yield event
                    finally:  # closed with this stream, not whenever the collector gets to it: its row is written
                        if wake is not None:
                            wake.cancel()
                        await live.aclose()
                    return
                self._finish(rec, route=route, t0=t0)  # a buffered answer was kept
                committed = self._submit(rec, request, budget, route.shadows)
                await self._committed(rec, committed)
                self._cache_put(slot, rec, outcome)
            finally:
                self._cache_settle(slot, lead)
            served = outcome
        replay = self._replay(rec, served, committed)
        try:
            async for event in replay:
                yield event
        finally:
            await replay.aclose()

    async def wait_committed(self, record: CascadeRecord, committed: "asyncio.Future[None]") -> None:
        """Wait for the row of an answer from :meth:`run_uncommitted` (``record``, ``committed``) to commit
        before the answer goes out. Cancelled meanwhile (its client left), the answer never went out: the row,
        written as served, is made ``cancelled`` once committed, as :meth:`run` does for its own caller."""
        await self._committed(record, committed)

    async def _committed(self, rec: CascadeRecord, committed: "asyncio.Future[None]") -> None:
        """Wait for the row of an answer in hand to commit before the answer goes out (as a whole answer's
        response waits for it). A client that leaves meanwhile got nothing: the row, written as served, is made
        ``cancelled`` once committed (:meth:`_client_left`)."""
        try:
            await asyncio.shield(committed)
        except asyncio.CancelledError:
            self._client_left(rec, committed, sent=False)
            raise

    async def _replay(self, rec: CascadeRecord, served: GenerationResult,
                      committed: "asyncio.Future[None]") -> AsyncIterator[StreamEvent]:
        """Stream an answer in hand whose row is committed already (a buffered tier's, a cache hit's, the best
        one after the live tier failed), as the text served whole (stop-trimmed), its tokens cut to it. A client
        that leaves before the end (or is cut off for not reading) is recorded as it would be on a live stream:
        ``partial`` once any of the answer went out, else ``cancelled``, with ``ClientDisconnected`` (or the
        shutdown's error). ``committed``: the row's write."""
        sent = False
        try:
            yield StreamStart(record=rec, tier=rec.tier or "")
            for chunk in served.replay():
                sent = True
                yield StreamDelta(chunk.text, chunk.tokens)
        except (asyncio.CancelledError, GeneratorExit):
            self._client_left(rec, committed, sent=sent)
            raise
        yield StreamEnd(record=rec, finish_reason=served.finish_reason, usage=served.usage)

    def _client_left(self, rec: CascadeRecord, committed: "asyncio.Future[None]", *, sent: bool) -> None:
        """A client left an answer in hand (or was cut off) after its row was queued as served: once that write
        has committed, the row is made what the client got (:meth:`Ledger.record_client_left`)."""
        reason = self._cancel_reason()
        status = "partial" if sent else "cancelled"

        def correct(f: "asyncio.Future[None]") -> None:
            if f.cancelled() or f.exception() is not None:  # not written as served: nothing to correct
                return
            self.ledger.record_client_left(rec.request_id, status, type(reason).__name__, reason.message)
            # its answer, stored at that commit (by a callback that ran before this one), served nobody: a hit
            # naming it would name a request the ledger says answered none, and feedback on the hit label nothing
            if status == "cancelled" and self.cache is not None:
                self.cache.discard(rec.request_id)
            for listener in self.correction_listeners:
                try:
                    listener(rec, status, type(reason).__name__)
                except Exception:  # noqa: BLE001 - an observer never fails the request
                    log.exception("correction listener %r failed", listener)

        if committed.done():
            correct(committed)
        else:
            committed.add_done_callback(correct)

    async def _stream_live(self, live: "_Live", route: Route, rec: CascadeRecord, t0: float,
                           cache_slot: "tuple[str, int] | None" = None) -> AsyncIterator[StreamEvent]:
        tier, req, att, answers = live.tier, live.request, live.attempt, live.answers
        tc = tier.config
        started = time.perf_counter()
        text: list[str] = []
        tokens: list = []
        finish, usage = "stop", None
        sent = False
        provider_log: list[ProviderAttempt] = []  # one per provider attempt, for tiers with providers
        if isinstance(tier.backend, ResilientBackend):  # falls over between providers before the first chunk
            # the tier's time limit (timeout_s, or a shorter latency budget): the backend times its providers out
            # by it, rather than being cancelled by the timer below
            agen = tier.backend.stream(req, deadline=time.monotonic() + live.timeout, record=provider_log)
        else:
            agen = tier.backend.stream(req)
        # the tier's time limit (timeout_s or the latency budget) bounds the whole stream, as a whole answer; a tier
        # with providers keeps that deadline itself, this timer (a grace later) only backs it up
        grace = DEADLINE_GRACE_S if isinstance(tier.backend, ResilientBackend) else 0.0
        deadline = asyncio.get_running_loop().time() + live.timeout + grace
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    with _translating(tier.name):
                        first = await anext(agen)
            except TimeoutError as exc:
                raise ProviderTimeoutError(f"tier {tier.name!r} sent nothing within {live.timeout:g} s",
                                           provider=tier.name) from exc
            except StopAsyncIteration:
                first = StreamChunk(text="", finish_reason="stop")
        except CascadeError as exc:
            await _close_backend_stream(agen)
            self._mark_error(att, exc, started, tier, req)
            merge_provider_attempts(rec.attempts, att, provider_log, served=False)
            if answers and _serves_answer_in_hand(exc):
                best = self._serve_best(answers, f"{tier.name!r} failed before its first token ({type(exc).__name__})")
                self._finish(rec, route=route, t0=t0)
                committed = self._submit(rec, live.original, live.budget, route.shadows)
                await self._committed(rec, committed)
                replay = self._replay(rec, best, committed)
                try:
                    async for event in replay:
                        yield event
                finally:
                    await replay.aclose()
                return
            _soonest_retry(exc, live.hints)
            await self._record_failure(rec, exc, route, t0)
            raise
        except asyncio.CancelledError:  # the client left before the live tier's first token
            await _close_backend_stream(agen)
            self._mark_cancelled(att, started, tier, req)
            merge_provider_attempts(rec.attempts, att, provider_log, served=False)
            await self._record_failure(rec, None, route, t0)
            raise
        att.kept, att.decision = True, "final"
        rec.tier, rec.model, rec.escalated = tier.name, tc.model, att.index > 0
        error: CascadeError | None = None
        recorded = False  # the row is written once: by the finally below, or as a cancellation
        unwritten = False  # its write failed (or timed out) after the answer went out: not cached
        try:
            # inside the try: a consumer that closes the stream here (its client gone before the response
            # started) still gets the live tier's call recorded, as at any later point
            yield StreamStart(record=rec, tier=tier.name)
            chunk: StreamChunk | None = first
            while chunk is not None:
                if chunk.text or chunk.tokens:
                    sent = True
                    text.append(chunk.text)
                    tokens.extend(chunk.tokens)
                    yield StreamDelta(chunk.text, chunk.tokens)
                if chunk.finish_reason:
                    finish, usage = chunk.finish_reason, chunk.usage or usage
                try:
                    async with asyncio.timeout_at(deadline):  # in this task: no task per chunk, nothing left running
                        with _translating(tier.name):
                            chunk = await anext(agen)
                except StopAsyncIteration:
                    chunk = None
                except TimeoutError as exc:
                    raise ProviderTimeoutError(f"tier {tier.name!r} did not finish within {live.timeout:g} s",
                                               provider=tier.name) from exc
        except CascadeError as exc:
            error = exc
        except (asyncio.CancelledError, GeneratorExit):
            if not sent:  # closed before any token reached the client: as a client gone before the first token
                recorded = True
                await _close_backend_stream(agen)
                self._mark_cancelled(att, started, tier, req)
                att.completion_tokens = len(first.tokens)  # the first chunk had come: billed
                att.cost_usd = tc.price.cost(att.prompt_tokens, att.completion_tokens)
                merge_provider_attempts(rec.attempts, att, provider_log, served=False)
                rec.tier, rec.model, rec.escalated = None, None, False
                await self._record_failure(rec, None, route, t0)
                raise
            error = self._cancel_reason()
            raise
        finally:
            if not recorded:
                await _close_backend_stream(agen)
                att.latency_ms = (time.perf_counter() - started) * 1e3
                att.text = "".join(text)
                # a broken stream has no usage: the provider still billed the prompt, so estimate it
                att.prompt_tokens = usage.prompt_tokens if usage else tier.backend.estimate_prompt_tokens(req)
                att.completion_tokens = usage.completion_tokens if usage else answer_tokens(len(tokens), att.text)
                att.cached_prompt_tokens = usage.cached_prompt_tokens if usage else 0
                att.cost_usd = tc.price.cost(att.prompt_tokens, att.completion_tokens, att.cached_prompt_tokens)
                # the provider's price, and its failed attempts
                merge_provider_attempts(rec.attempts, att, provider_log, served=True)
                # an empty answer has no tokens to be confident in, as call_tier reads a whole one (a token that
                # ends inside the one character max_tokens left room for has no text)
                att.features = extract_features(tokens if att.text else (), top_k=tc.top_logprobs)
                att.confidence = decide(att.features, live.calibrator, 0.0, is_last=True).confidence
                att.reason = "last tier always answers (streamed)"
                att.reason += _shaped(att)
                if error is not None:
                    att.error_class, att.error_message = type(error).__name__, error.message
                    att.reason += f"; stream broke after {len(tokens)} tokens"
                    rec.status = "partial" if sent else "error"
                    rec.error_class, rec.error_message = type(error).__name__, error.message
                self._finish(rec, route=route, t0=t0)
                try:
                    await asyncio.shield(self._submit(rec, live.original, live.budget, route.shadows, sent=sent))
                except LedgerError as failed:
                    if not sent:
                        raise
                    # its answer is out already: the stream ends as it would have (its row is still queued, kept
                    # as served if it commits later; or lost, and the ledger named it), not cut off mid-response
                    log.warning("%s (the stream's answer had gone out)", failed)
                    unwritten = True  # not stored: a hit would name a request the ledger may never hold
        if error is not None:
            yield StreamFailed(record=rec, error=error)
            return
        usage = Usage(att.prompt_tokens, att.completion_tokens, att.cached_prompt_tokens)
        if not unwritten:
            self._cache_put(cache_slot, rec, GenerationResult(text=att.text, tokens=tuple(tokens), finish_reason=finish,
                                                             usage=usage, latency_s=att.latency_ms / 1e3,
                                                             model=tc.model))
        yield StreamEnd(record=rec, finish_reason=finish, usage=usage)

    # --- shared steps -----------------------------------------------------------------------------
    async def _start(self, rec: CascadeRecord, model: str | None, request: GenerationRequest,
                     budget: Budget | None, t0: float, *, stream_last: bool) -> "tuple[Route, GenerationResult | _Live]":
        """Resolve the route and run it; a failure is recorded in the ledger before it is raised."""
        route: Route | None = None
        try:
            route = self.resolve(model)
            rec.policy = route.name
            return route, await self._run_route(route, request, rec, budget or Budget(), t0,
                                                stream_last=stream_last)
        except CascadeError as exc:
            await self._record_failure(rec, exc, route, t0)
            raise
        except asyncio.CancelledError:
            await self._record_failure(rec, None, route, t0)
            raise
        except Exception as exc:  # a fault of ours: recorded, and raised as one of ours (the cause chained)
            log.exception("request %s failed", rec.request_id)  # (the detail: in the log only, as at the edge)
            err = InternalError("internal server error")
            await self._record_failure(rec, err, route, t0)
            raise err from exc

    async def _refuse_while_ledger_down(self, rec: CascadeRecord, model: str | None, t0: float) -> None:
        """While the ledger cannot be written (a write failed, or a probe said so), refuse the request before
        any tier runs: its answer could not be accounted, so it would not be let out, and a hosted tier would
        be paid for nothing. A probe shared by the requests arriving meanwhile decides, so a database that is
        back lets the request go on. The refusal's row is queued: committed once the database answers."""
        try:
            await self.check_ledger()
        except LedgerUnavailableError as exc:
            rec.policy = model or self.config.default_policy_name
            rec.status, rec.error_class, rec.error_message = "error", type(exc).__name__, exc.message
            self._finish(rec, route=None, t0=t0)
            self._submit(rec, None).add_done_callback(log_failure)  # not awaited: it may wait for the database
            raise
        except asyncio.CancelledError:
            # its caller gave up (or a shutdown ran out of time) while the probe waited for the database: its row,
            # as a request cancelled in its tiers has one (cancelled, or the shutdown's error), queued as above
            why = self._aborted
            rec.policy = model or self.config.default_policy_name
            rec.status, rec.error_class, rec.error_message = (
                ("cancelled", "ClientDisconnected", "cancelled") if why is None
                else ("error", type(why).__name__, why.message))
            self._finish(rec, route=None, t0=t0)
            self._submit(rec, None).add_done_callback(log_failure)
            raise

    async def record_refusal(self, exc: CascadeError, *, model: str | None = None, endpoint: str = "chat",
                             request_id: str | None = None, api_key_id: str | None = None,
                             user_tier: str | None = None, end_user: str | None = None,
                             metadata: dict[str, str] | None = None, wait: bool = True,
                             status: str = "error") -> None:
        """Record a request refused before any tier ran (malformed, over a limit, a model the key may not
        use, the key's daily spend reached, a shutdown that ran out of time while it was admitted): one ledger
        row with status ``error`` and no attempts, so the ledger holds every request a caller made, refused
        ones included. ``wait=False``: the row is queued, not waited for (a request being cancelled: its
        answer must not wait for a slow database; the ledger's close writes what is queued). ``status``
        ``cancelled``: a request whose client left before it could be read (``ClientDisconnected``)."""
        if status not in ("error", "cancelled"):
            raise InvalidRequestError(f"status must be error or cancelled, got {status!r}", param="status")
        rec = self._new_record(model, endpoint, request_id, api_key_id, user_tier, end_user, metadata)
        rec.status, rec.error_class, rec.error_message = status, type(exc).__name__, exc.message
        self._finish(rec, route=None, t0=time.perf_counter())
        committed = self._submit(rec, None)
        if not wait or self.ledger.unavailable is not None:  # the refusal goes out now, its row when it can
            committed.add_done_callback(log_failure)
            return
        try:
            await asyncio.shield(committed)
        except LedgerError as failed:  # the client is told of its request's fault, not of the ledger's
            log.warning("%s", failed)

    async def check_ledger(self) -> None:
        """Raise :class:`LedgerUnavailableError` while the ledger cannot be written (a write failed, or a probe
        said so) and a probe, shared by the requests arriving meanwhile, agrees: the HTTP layer asks before
        it reads the ledger to admit a request (the daily spend limits), so that it is refused at once."""
        if self.ledger.unavailable is None or (why := await self.ledger.probe()) is None:
            self._ledger_refused_logged = None  # the next outage is said as it starts
            return
        now = time.monotonic()
        if self._ledger_refused_logged is None or now - self._ledger_refused_logged >= LEDGER_REFUSAL_LOG_S:
            # why requests are refused, once a minute while it lasts (each refusal has its own line; /ready says
            # the reason of the moment)
            log.warning("requests refused while the ledger cannot record them: %s", why)
            self._ledger_refused_logged = now
        raise LedgerUnavailableError("the ledger cannot record requests now, so this one was refused before any "
                                     "model was called: repeat it shortly")

    # --- the response cache (cascade/cache.py) ------------------------------------------------------
    def _cache_lookup(self, model: str | None, endpoint: str, request: GenerationRequest, api_key_id: str | None,
                      user_tier: str | None, budget: Budget | None,
                      mode: str) -> "tuple[tuple[str, int] | None, CachedAnswer | None]":
        """The request's place in the response cache, ``(key, generation)`` (None: not cacheable, or the cache
        is off or bypassed), and the answer stored there (mode "use" only)."""
        if self.cache is None or mode == "bypass":
            return None, None
        scope_key = api_key_id if self.config.cache.scope == "key" else None
        key = cache_key(model or self.config.default_policy_name, endpoint, request, user_tier=user_tier,
                        api_key_id=scope_key, budget=budget)
        if key is None:
            return None, None
        return (key, self.cache.generation), (self.cache.get(key) if mode == "use" else None)

    async def _cache_follow(self, slot: tuple[str, int], rec: CascadeRecord, model: str | None, t0: float) -> bool:
        """Wait for the identical request already being answered, if there is one (streamed or not, see
        :meth:`_cache_lead`), until it is done and its answer stored or not: a burst of the same request costs
        one model call, since the caller then finds the answer in the cache. Returns whether it waited (False
        at once when there is no such request). When the answer was not stored (it failed, was cancelled, or
        is not one to repeat) every follower answers for itself, together, rather than one after another. A
        follower whose caller leaves while it waits is recorded as cancelled."""
        leader = self._inflight.get(slot)
        if leader is None:
            return False
        try:
            await asyncio.shield(leader)  # the leader's caller may leave; that settles it
            return True
        except asyncio.CancelledError:
            rec.policy = model or self.config.default_policy_name
            await self._record_failure(rec, None, None, t0)
            raise

    def _cache_lead(self, slot: "tuple[str, int] | None") -> "asyncio.Future[None] | None":
        """Make this request the one identical requests arriving meanwhile wait for (None: one already is,
        or the request is not cacheable)."""
        if slot is None or slot in self._inflight:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = fut
        return fut

    def _cache_store(self, committed: "asyncio.Future[None]", slot: tuple[str, int],
                     lead: "asyncio.Future[None] | None", rec: CascadeRecord, result: GenerationResult) -> None:
        """Once the ledger write is done: store the answer if it was committed, then wake the requests waiting
        for it (whatever happens, so none waits forever)."""
        try:
            if not committed.cancelled() and committed.exception() is None:
                self._cache_put(slot, rec, result)
        finally:
            self._cache_settle(slot, lead)

    def _cache_settle(self, slot: "tuple[str, int] | None", lead: "asyncio.Future[None] | None") -> None:
        """The leading request is done (its answer stored or not): wake those waiting for it."""
        if lead is None or slot is None:
            return
        if self._inflight.get(slot) is lead:
            del self._inflight[slot]
        if not lead.done():
            lead.set_result(None)

    def _cache_put(self, slot: "tuple[str, int] | None", rec: CascadeRecord, result: GenerationResult) -> None:
        """Store an answer the policy itself chose: answered, and the kept attempt is the last one tried (an
        answer served because a later tier failed, timed out or was over budget is not one to repeat, nor one
        whose max_tokens a cost budget cut), and
        no earlier tier failed but by refusing the request as it would every time (too long a prompt): an
        answer that stands in for a tier that was down is not repeated for an hour either, nor one from a
        fallback provider serving another model than its tier's first provider's (that one failed, or was skipped
        with its breaker open), whether kept or escalated from. A provider retried, or a replica of the same
        model, is fine. Not after a :meth:`ResponseCache.clear` since the request started (``slot``'s
        generation)."""
        if slot is None or self.cache is None or rec.status != "ok" or rec.tier is None:
            return
        if not rec.attempts or not rec.attempts[-1].kept:
            return
        if any(a.max_tokens_cut is not None for a in rec.attempts):  # shaped by this caller's cost budget
            return
        kept = rec.attempts[-1]
        answered = {a.tier for a in rec.attempts if a.error_class is None}  # a retry within a tier that answered
        if any(a.tier != kept.tier and a.tier not in answered and a.error_class is not None
               and a.error_class not in _REFUSALS_EVERY_TIME
               for a in rec.attempts):  # an earlier tier's outage or timeout: next time it may answer itself
            return
        # a fallback provider's other model, standing in for the primary (failed, or its breaker open): as the kept
        # answer, and as an earlier tier's answer whose escalation it decided (judged by the calibrator and threshold
        # fit on the primary's answers; once the primary is back that tier may keep its own)
        for a in rec.attempts:
            tier = self.tiers.get(a.tier)
            if a.error_class is None and tier is not None and isinstance(tier.backend, ResilientBackend) \
                    and a.model != tier.backend.providers[0].backend.model:
                return
        self.cache.put(slot[0], CachedAnswer.of(rec, result), generation=slot[1])

    async def feedback(self, request_id: str, score: int, comment: str | None = None, *,
                       api_key_id: str | None = None) -> Feedback:
        """Label the answer of request ``request_id``: ``score`` 1 right, -1 wrong, 0 withdraws an earlier label
        (a request's latest feedback is its label, for `cascade recalibrate` and drift). An answer marked wrong
        is no longer served from the response cache. With ``api_key_id`` (the caller's key), only that key's
        requests: another's is as good as missing. Raises :class:`InvalidRequestError` (a malformed argument, a
        request that served no answer), :class:`NotFoundError` (no such request in the ledger) or
        :class:`LedgerUnavailableError` (the ledger cannot be read or written now: repeat it shortly)."""
        self._check_open()
        checked_feedback(request_id, score, comment)
        unreachable = "the ledger cannot be read or written now, so this feedback was not recorded: repeat it shortly"
        try:
            row = await self.ledger.get(request_id)
        except LedgerError as exc:  # (the database unreachable, a restart, a failover): to repeat, as a request
            raise LedgerUnavailableError.of(exc, unreachable) from exc
        if row is None or (api_key_id is not None and row["api_key_id"] != api_key_id):
            raise NotFoundError(f"no request {request_id!r} in the ledger", param="request_id")
        if row["status"] not in ("ok", "partial"):  # feedback labels an answer: there was none
            raise InvalidRequestError(f"request {request_id!r} served no answer (status {row['status']!r}): "
                                      "feedback is for answers", param="request_id", code="request_not_answered")
        try:
            fid = await self.ledger.add_feedback(request_id, score, comment)
        except LedgerError as exc:
            raise LedgerUnavailableError.of(exc, unreachable) from exc
        answered_by = row.get("cached_from") or request_id  # a cache hit's answer is its original's
        if score < 0:  # an answer a user says is wrong is not served again from the cache
            self.cache_forget(answered_by)
        decided = row.get("confidence") is not None and row.get("tier") and row.get("policy") != row.get("tier")
        return Feedback(id=fid, request_id=request_id, score=score, answered_by=answered_by,
                        confidence=float(row["confidence"]) if decided else None,
                        created_at=float(row["created_at"]))

    def cache_forget(self, request_id: str) -> int:
        """Drop the stored answers first given to ``request_id`` (a user marked it wrong); returns how many."""
        return self.cache.forget(request_id) if self.cache is not None else 0

    def _serve_cached(self, rec: CascadeRecord, hit: CachedAnswer, t0: float) -> "asyncio.Future[None]":
        """A cache hit's ledger row: the answer's tier, model and confidence, no attempts, cost 0, and the
        baseline of the request that paid for it (what the last tier alone would have cost: the saving)."""
        rec.tier, rec.model, rec.confidence, rec.cached_from = hit.tier, hit.model, hit.confidence, hit.request_id
        rec.policy = rec.policy or self.config.default_policy_name
        rec.baseline_cost_usd, rec.baseline_estimated = hit.baseline_cost_usd, hit.baseline_estimated
        rec.latency_ms = (time.perf_counter() - t0) * 1e3
        return self._submit(rec, None)

    def _new_record(self, model: str | None, endpoint: str, request_id: str | None, api_key_id: str | None,
                    user_tier: str | None, end_user: str | None = None,
                    metadata: dict[str, str] | None = None) -> CascadeRecord:
        return CascadeRecord(request_id=str(request_id or new_request_id()), policy=model or "",
                             created_at=time.time(), endpoint=endpoint, api_key_id=api_key_id,
                             user_tier=user_tier, end_user=end_user, metadata=metadata or None)

    async def _record_failure(self, rec: CascadeRecord, exc: CascadeError | None, route: Route | None,
                              t0: float) -> None:
        exc = exc or self._aborted  # cancelled (exc None): by a client that left, or by a shutdown
        if exc is None:
            rec.status, rec.error_class, rec.error_message = "cancelled", "ClientDisconnected", "cancelled"
        else:
            rec.status, rec.error_class, rec.error_message = "error", type(exc).__name__, exc.message
        for a in rec.attempts:
            a.kept = False
        self._finish(rec, route=route, t0=t0)
        await asyncio.shield(self._submit(rec, None))

    def _submit(self, rec: CascadeRecord, request: GenerationRequest | None, budget: Budget | None = None,
                shadows: ShadowSet | None = None, *, sent: bool = False) -> "asyncio.Future[None]":
        """Queue the ledger write of a finished request with its shadow decisions (the future resolves once
        it is committed). Shadows sampled on this request (``request`` given) start in the background: after
        the commit, off the request's path (cascade/shadow.py), within the request's ``budget``. ``shadows``:
        those in force when its route resolved (its :class:`Route`'s), else the engine's now."""
        shadows = self.shadows if shadows is None else shadows
        # a cache hit made no decision for a shadow to be compared with (its answer's request had its rows)
        rows = shadows.evaluate(rec) if rec.cached_from is None else []
        samples = self.sampler.select(shadows, rec, request, rows, budget) if rows and request is not None else ()
        committed = self.ledger.submit(rec, shadows=rows, sent=sent)  # sent: a stream's tokens went out
        if samples:
            self.sampler.start(samples, committed, sent=sent)
        notify(self.record_listeners, rec)
        if self.commit_listeners:
            def heard(f: "asyncio.Future[None]") -> None:
                error = None if f.cancelled() else f.exception()
                if sent and isinstance(error, LedgerTimeoutError):  # still queued; its answer went out, and its
                    self._settling.add(rec.request_id)               # row will say so if it commits: heard then
                    return
                notify(self.commit_listeners, rec, error)

            committed.add_done_callback(heard)
        return committed

    def _settled_late(self, rec: CascadeRecord, error: BaseException | None) -> None:
        """A ledger late listener: a stream's write that timed out is done (committed as served, or lost)."""
        if rec.request_id in self._settling:
            self._settling.discard(rec.request_id)
            notify(self.commit_listeners, rec, error)

    @staticmethod
    def _mark_error(att: Attempt, exc: CascadeError, started: float, tier: Tier, req: GenerationRequest) -> None:
        att.latency_ms = (time.perf_counter() - started) * 1e3
        att.decision, att.reason = "error", exc.message
        att.error_class, att.error_message = type(exc).__name__, exc.message
        att.prompt_tokens = billed_prompt(tier.backend, req, exc)  # a timed-out call was being worked on
        att.cost_usd = tier.config.price.cost(att.prompt_tokens, 0)

    def _mark_cancelled(self, att: Attempt, started: float, tier: Tier, req: GenerationRequest) -> None:
        """The attempt in flight when the request was cancelled (its client left, or a shutdown ran out of
        time): an error row of its own, never a silent success, billed its prompt (the tier was working on it)."""
        att.latency_ms = (time.perf_counter() - started) * 1e3
        why = "the server shut down" if self._aborted is not None else "the client disconnected"
        att.decision, att.reason = "error", f"cancelled: {why}"
        att.error_class, att.error_message = CANCELLED, "cancelled"
        att.prompt_tokens = billed_prompt(tier.backend, req, None)
        att.cost_usd = tier.config.price.cost(att.prompt_tokens, 0)

    @staticmethod
    def _serve_best(answers: list[tuple[Attempt, GenerationResult]], why: str) -> GenerationResult:
        """Serve the most confident answer already in hand (a later tier failed or ran out of budget)."""
        best_att, best = max(answers, key=lambda ar: ar[0].confidence or 0.0)
        best_att.kept, best_att.decision = True, "accept"
        best_att.reason += f"; served because {why}"
        return best

    async def _run_route(self, route: Route, request: GenerationRequest, rec: CascadeRecord, budget: Budget,
                         t0: float, *, stream_last: bool = False) -> "GenerationResult | _Live":
        answers: list[tuple[Attempt, GenerationResult]] = []
        last_error: CascadeError | None = None
        hints: list[CascadeError] = []  # each tier's rate limit or open breakers (_soonest_retry)
        n = len(route.tiers)
        for i, (tier, threshold) in enumerate(zip(route.tiers, route.thresholds, strict=True)):
            is_last = i == n - 1
            tc = tier.config
            req = request.with_(max_tokens=request.max_tokens or tc.max_tokens,
                                top_logprobs=max(request.top_logprobs, tc.top_logprobs))
            att = Attempt(index=len(rec.attempts), tier=tier.name, model=tc.model, backend=tc.backend)
            rec.attempts.append(att)
            if is_last and request.max_tokens is None:
                req = await _fit_context(tier, req, att)
            elif budget.cost_usd is not None:
                await tier.backend.tokenize(req)  # counted off the event loop, for the budget and the call
            asked = req.max_tokens
            req, refusal = fit_budget(tier, req, sum(a.cost_usd for a in rec.attempts), budget)
            if req.max_tokens != asked:
                att.max_tokens_cut = req.max_tokens
            if refusal is not None:
                att.decision, att.reason = "skipped", refusal
                if answers:
                    return self._serve_best(answers, refusal)
                raise BudgetExceededError(f"request refused: {refusal}")
            timeout = tc.timeout_s if budget.latency_s is None else min(tc.timeout_s, budget.latency_s)
            self._journal(rec, tier, req, route, t0)
            if is_last and stream_last:
                return _Live(tier=tier, request=req, attempt=att, answers=answers, timeout=timeout, budget=budget,
                             calibrator=route.calibrator(i), original=request, hints=hints)
            called = time.perf_counter()
            try:
                res = await self.call_tier(tier, req, att, rec.attempts, timeout=timeout)
            except CascadeError as exc:
                last_error = exc
                # the budget ran out, rather than the tier's own timeout_s (or a provider's) firing within it: a
                # tier that timed out by itself failed, and fails over like any other failure
                att.latency_budget_out = latency_budget_out(budget, exc, time.perf_counter() - called)
                if answers and att.latency_budget_out:
                    return self._serve_best(answers, f"{tier.name!r} exceeded the latency budget")
                escalate = exc.fall_over or isinstance(exc, (ContextLengthExceededError, ProviderContextLengthError))
                if isinstance(exc, (RateLimitedError, CircuitOpenError)) and exc.retry_after is not None:
                    hints.append(exc)
                if escalate and not is_last:
                    # a tier skipped for its open breakers is no new failure: the breaker's opening was the warning
                    # (and is on /metrics); one a request, it was a warning for every request answered meanwhile
                    log.log(logging.INFO if isinstance(exc, CircuitOpenError) else logging.WARNING,
                            "tier %s failed (%s); escalating", tier.name, type(exc).__name__)
                    continue
                if answers and _serves_answer_in_hand(exc):
                    # the last tier failed: serve the best answer already in hand rather than nothing
                    return self._serve_best(answers, f"{tier.name!r} failed ({type(exc).__name__})")
                _soonest_retry(exc, hints)
                raise
            decision = decide(att.features, route.calibrator(i), threshold, is_last=is_last)
            att.confidence, att.reason = decision.confidence, decision.reason
            if res.text and not res.tokens:  # not an empty answer: a text with no tokens to be confident in
                why = "the upstream sent no token logprobs"
                att.reason = f"last tier always answers ({why})" if is_last else why
            att.reason += _shaped(att)
            if not decision.escalate:
                att.decision, att.kept = ("final" if is_last else "accept"), True
                return res
            att.decision = "escalate"
            answers.append((att, res))
        assert last_error is not None  # the loop returns on any accepted answer
        raise last_error

    async def call_tier(self, tier: Tier, req: GenerationRequest, att: Attempt, attempts: list[Attempt], *,
                        timeout: float) -> GenerationResult:
        """One call of one tier, as the cascade makes it: within ``timeout`` seconds, with the retries,
        provider fallbacks and breakers of a tier with providers. Fills ``att`` (already in ``attempts``)
        with what happened: tokens, cost, latency, answer text and confidence features, or the error, with a
        row of its own inserted before it for each earlier provider attempt. Raises the call's
        :class:`CascadeError` (``att`` marked) or ``CancelledError``."""
        started = time.perf_counter()
        provider_log: list[ProviderAttempt] = []  # one per provider attempt, for tiers with providers
        try:
            try:
                if isinstance(tier.backend, ResilientBackend):  # it keeps the deadline itself
                    call = tier.backend.generate(req, deadline=time.monotonic() + timeout, record=provider_log)
                    limit = timeout + DEADLINE_GRACE_S
                else:
                    call, limit = tier.backend.generate(req), timeout
                # the backend call runs in this task (no task per call, as wait_for would create)
                async with asyncio.timeout(limit):
                    with _translating(tier.name):
                        res = await call
            except TimeoutError as exc:
                raise ProviderTimeoutError(f"tier {tier.name!r} did not answer within {timeout:g} s",
                                           provider=tier.name) from exc
        except asyncio.CancelledError:
            self._mark_cancelled(att, started, tier, req)
            merge_provider_attempts(attempts, att, provider_log, served=False)
            raise
        except CascadeError as exc:
            self._mark_error(att, exc, started, tier, req)
            merge_provider_attempts(attempts, att, provider_log, served=False)
            raise
        att.latency_ms = res.latency_s * 1e3
        att.prompt_tokens, att.completion_tokens = res.usage.prompt_tokens, res.usage.completion_tokens
        att.cached_prompt_tokens = res.usage.cached_prompt_tokens
        att.cost_usd = tier.config.price.cost(att.prompt_tokens, att.completion_tokens, att.cached_prompt_tokens)
        merge_provider_attempts(attempts, att, provider_log, served=True)  # provider price, failed attempts
        att.text = res.text
        # an empty answer has nothing to be confident in, whatever logprobs came with it: no tokens, so it escalates
        # the tier's own top_logprobs, whatever more the client asked to see: the features its calibrator reads
        att.features = extract_features(res.tokens if res.text else (), top_k=tier.config.top_logprobs)
        return res

    def _journal(self, rec: CascadeRecord, tier: Tier, req: GenerationRequest, route: Route, t0: float) -> None:
        """As ``tier`` is called (its attempt the last of ``rec``): how the ledger is to record the request should
        this process die before the request's own row is written (:meth:`Ledger.journal`, which makes it only
        for a request still in flight a moment later): the attempts made so far, and this call, if still in
        flight, as an error ``Interrupted`` billed its estimated prompt (the tier was working on it); nothing
        served."""
        if not self.config.ledger.journal:
            return
        att = rec.attempts[-1]

        def snapshot() -> CascadeRecord:
            snap = copy.deepcopy(rec)
            running = snap.attempts[next(i for i, a in enumerate(rec.attempts) if a is att)]
            # a call that ended has its latency (a stream's is set as it ends: until then it is kept and "final")
            if running.latency_ms == 0.0 and running.error_class is None:
                running.decision, running.reason = "error", "interrupted: the server stopped while this tier answered"
                running.error_class, running.error_message = INTERRUPTED, "interrupted"
                # (made on the event loop: counted on samples of a long prompt, not the whole of it, which took
                # half a second a MB, for each request journaled, while no other request was served)
                running.prompt_tokens = req.quick_prompt_tokens()
                # the dearest of its providers' prices: which one was answering is not known here
                running.cost_usd = dearest_price(tier).cost(running.prompt_tokens, 0)
                snap.tier = snap.model = snap.confidence = None
                snap.escalated = False
            snap.attempts = [a for a in snap.attempts if a.decision]  # (a next tier's row, its call not begun)
            for a in snap.attempts:
                a.kept = False
            snap.status, snap.error_class, snap.error_message = "error", INTERRUPTED, "not finished"
            # its latency so far by the request's own monotonic start (``t0``), as its row's would be: the wall
            # clock since created_at took a step of the clock (NTP) between them for time the request ran
            self._finish(snap, route=route, t0=t0)
            return snap

        self.ledger.journal(rec.request_id, snapshot)

    def _finish(self, rec: CascadeRecord, *, route: Route | None, t0: float) -> None:
        rec.latency_ms = (time.perf_counter() - t0) * 1e3
        rec.cost_usd = sum(a.cost_usd for a in rec.attempts)
        rec.escalation_waste_usd = sum(a.cost_usd for a in rec.attempts if not a.kept)
        rec.prompt_tokens = sum(a.prompt_tokens for a in rec.attempts)
        rec.completion_tokens = sum(a.completion_tokens for a in rec.attempts)
        kept = next((a for a in rec.attempts if a.kept), None)
        if kept is not None:
            rec.tier, rec.model, rec.confidence = kept.tier, kept.model, kept.confidence
            rec.escalated = kept.tier != rec.attempts[0].tier  # provider fallbacks within a tier are not escalations
        if route is None or len(route.tiers) == 1:  # a request pinned to one tier is its own baseline
            rec.baseline_cost_usd = rec.cost_usd
            return
        last = route.tiers[-1]
        # the last tier's answer, if it gave one (not an error, nor skipped by a budget before it ran): alone it
        # would have paid that answer and the failed provider attempts before it, as it did here
        ran = [a for a in rec.attempts if a.tier == last.name and a.decision != "skipped"]
        if any(a.error_class is None for a in ran):
            rec.baseline_cost_usd = sum(a.cost_usd for a in ran)
        else:
            ref = kept or (rec.attempts[-1] if rec.attempts else None)
            p_tok = ref.prompt_tokens if ref else 0
            c_tok = ref.completion_tokens if ref else 0
            # as its calls are billed: at its first provider's price, which may not be the tier's own
            rec.baseline_cost_usd = first_price(last).cost(p_tok, c_tok)
            rec.baseline_estimated = True


def notify(listeners: list[Callable[..., None]], *args: object) -> None:
    """Call each listener; one that raises is logged, never the caller's failure."""
    for listener in listeners:
        try:
            listener(*args)
        except Exception:  # noqa: BLE001 - an observer never fails the request it observes
            log.exception("listener %r failed", listener)


@contextlib.contextmanager
def _translating(tier: str) -> Iterator[None]:
    """Around one call of a tier's backend: an exception that is no ``CascadeError`` (a library's error the
    backend did not translate, a bug) becomes one, as ``resilience.classify`` maps a provider's (redacted; a
    timeout, a connection, else a provider error), so that the request is recorded, falls over or is served
    the answer in hand like any other failure; the cause is logged with its traceback. The end of a stream
    (``StopAsyncIteration``) passes through."""
    try:
        yield
    except (CascadeError, StopAsyncIteration):
        raise
    except Exception as exc:
        log.error("tier %s raised %s, not a CascadeError", tier, type(exc).__name__, exc_info=exc)
        raise classify(exc, tier) from exc


async def _close_backend_stream(agen: AsyncIterator[StreamChunk]) -> None:
    """Close a tier's stream (its connection, its row of a batch) before its request is recorded. A cancellation
    that comes meanwhile (the caller gave up while closing the stream, a close's grace ran out) is not raised here,
    where it would skip the request's row: the task is cancelled again, to be raised at its next wait, once the row
    is queued (its count of cancellations unchanged, so that an ``asyncio.timeout`` still says TimeoutError)."""
    try:
        await agen.aclose()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None:
            raise
        task.uncancel()
        task.cancel()


async def _fit_context(tier: Tier, req: GenerationRequest, att: Attempt) -> GenerationRequest:
    """A request that asked for no max_tokens, at its route's last tier: the tier's default max_tokens, cut to
    what the tier's context holds after the prompt where both are known (as OpenAI answers such a request),
    rather than refused with nowhere left to escalate. An earlier tier refuses it, and the cascade escalates it
    to a tier with room; one that asked for its max_tokens is refused rather than answered with fewer."""
    await tier.backend.tokenize(req)  # counted off the event loop, for this, the budget and the call
    ctx, n = tier.backend.context_length, tier.backend.count_prompt_tokens(req)
    if ctx is None or n is None or n >= ctx or n + (req.max_tokens or 0) <= ctx:
        return req
    att.max_tokens_fit = ctx - n
    return req.with_(max_tokens=ctx - n)


def _shaped(att: Attempt) -> str:
    """What the reason of an attempt adds when its max_tokens was not the one asked for (or the tier's default)."""
    why = ""
    if att.max_tokens_fit is not None:
        why += f"; max_tokens (none asked for) cut to {att.max_tokens_fit} to fit the tier's context"
    if att.max_tokens_cut is not None:
        why += f"; max_tokens cut to {att.max_tokens_cut} by the cost budget"
    return why


def _soonest_retry(exc: CascadeError, hints: list[CascadeError]) -> None:
    """A rate limit (or every breaker open) that reaches the client says when the first provider of the request's
    route is free again: an earlier tier that failed alike (``hints``, their errors) may be free sooner than the
    last one, as a tier's own error says the soonest of its providers'."""
    if isinstance(exc, (RateLimitedError, CircuitOpenError)) and exc.retry_after is not None:
        exc.retry_after = min([exc.retry_after, *(e.retry_after for e in hints
                                                  if type(e) is type(exc) and e.should_retry == exc.should_retry)])


def _serves_answer_in_hand(exc: CascadeError) -> bool:
    """When the last tier fails with ``exc``, is an earlier tier's answer served instead of the error? Yes
    for a failure another provider might not have had (``fall_over``), and for the last tier refusing as
    invalid, or as too long, a request an earlier tier answered: that is a mismatch between the tiers (a
    smaller context, stricter validation), and the client's request was answered and paid for."""
    return exc.fall_over or isinstance(exc, (ContextLengthExceededError, ProviderInvalidRequestError))


class _MintedId(str):
    """A request id minted by :func:`new_request_id` (96 random bits): it names no request yet, so the first
    request under it is not looked up in the ledger (the HTTP layer mints one per request, before the engine
    sees it); a second one is, as a caller's own id is."""

    used = False


def new_request_id() -> str:
    return _MintedId("casc-" + uuid.uuid4().hex[:24])


def _running_loop() -> "asyncio.AbstractEventLoop | None":
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


__all__ = ["Budget", "Engine", "Outcome", "Route", "StreamDelta", "StreamEnd", "StreamEvent", "StreamFailed",
           "StreamStart", "Tier", "build_calibrator", "new_request_id"]
