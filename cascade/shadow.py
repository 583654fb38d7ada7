"""Shadow policies: what another policy would have done with each live request.

A shadow names a live policy (``of``) and differs from it in its chain, its thresholds, its calibrators
and/or the user tiers it looks at (``user_tiers``: only those requests). For every finished live request
of that policy, :func:`evaluate_shadow` walks the shadow's chain over the attempts the live path already
made:

* a tier the live path ran is decided again by the pure :func:`cascade.policy.decide` with the shadow's
  calibrator and threshold, on the features already in the record (no model call);
* a tier the live path did not run means the shadow's outcome is ``unknown``, and nothing is spent, unless
  the shadow samples (below);
* a tier that failed on the live path is treated as failing for the shadow too: escalated past, or
  ``unknown`` when it is the shadow's last tier; one that ran out of a ``best_answer`` latency budget ends
  the walk as it ended the live path's, with the most confident answer in hand (if any).

The shadow's predicted cost is the actual cost of the attempts of the tiers it walked (actual token counts
times each tier's price). The result is one dict per shadow, written by ``Ledger.record(rec, shadows=...)``
into ``shadow_decisions`` in the same transaction as the request.

Sampled shadow execution (``sample_rate`` > 0, with ``sample_budget_usd``): on that share of the answered
requests whose shadow outcome is unknown only because it needs tiers the live path did not run,
:class:`ShadowSampler` runs those tiers in the background, after the live record is committed, through the
engine's own tier call (:meth:`cascade.engine.Engine.call_tier`: retries, fallbacks, breakers), walking the
shadow's chain as above and calling only the tiers it needs. Each shadow may spend ``sample_budget_usd``
per UTC day on its calls: before each call, today's spend (the day's total of its recorded calls,
``spend_daily``) and the reservations of the calls in flight (``spend_holds``) are read from the ledger, and
the call's predicted cost (:func:`estimate_sample_cost`: the prompt, ``max_tokens`` and the prompts of
providers that may time out first) reserved, in one transaction: the budget holds across restarts and
replicas, and concurrent samples cannot overshoot it. The decision is then rewritten:
status ``known`` (or still ``unknown``, with the reason), ``sampled`` set, ``sample_cost_usd`` what the
shadow's own calls cost; the calls themselves are ``shadow_attempts`` rows, never live spend.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.calibrators import Calibrator
from cascade.budget import Budget, call_ceiling, fit_budget, latency_budget_out
from cascade.config import Config
from cascade.errors import CascadeError, LedgerTimeoutError
from cascade.ledger import Ledger, utc_day_start
from cascade.policy import decide
from cascade.resilience import CANCELLED
from cascade.types import Attempt, CascadeRecord, GenerationRequest

log = logging.getLogger("cascade.shadow")


@dataclass(frozen=True)
class ShadowPolicy:
    """A shadow at run time. ``calibrators`` holds only the shadow's own overrides; other tiers use the
    live policy's calibrator, as its :class:`ShadowSet` holds them (a reload's new ones with a new set).
    ``user_tiers``: evaluated only on requests of these user tiers (None: on every request of ``of``)."""

    name: str
    of: str
    chain: tuple[str, ...]
    thresholds: tuple[float, ...]
    calibrators: Mapping[str, Calibrator] = field(default_factory=dict)
    user_tiers: frozenset[str] | None = None
    sample_rate: float = 0.0
    sample_budget_usd: float = 0.0
    sample_seed: int | None = None

    def calibrator(self, tier: str, live: Mapping[str, Calibrator]) -> Calibrator | None:
        """The calibrator the shadow decides ``tier`` with: its own override, else the live policy's."""
        return self.calibrators.get(tier) or live.get(tier)


def build_shadow_policies(config: Config, *, build: Callable[..., Calibrator] | None = None,
                          kept: Mapping[str, ShadowPolicy] | None = None) -> list[ShadowPolicy]:
    """The config's shadows, with thresholds resolved (shadow's, else live policy's, else the tier's). ``kept``:
    running shadows whose own calibrators are kept as built (a reload that does not apply the file's shadows:
    their artifacts may be gone)."""
    if build is None:
        from cascade.engine import build_calibrator as build
    out = []
    for name, sc in config.shadows.items():
        live = config.policies[sc.of]
        chain = tuple(sc.chain or live.chain)
        thresholds = tuple(sc.thresholds.get(t, live.thresholds.get(t, config.tier(t).threshold)) for t in chain)
        cals = dict(kept[name].calibrators) if kept is not None and name in kept else \
            {t: build(cc, tier=t, where=f"shadows.{name}.calibrators.{t}", top_logprobs=config.tier(t).top_logprobs)
             for t, cc in sc.calibrators.items()}
        out.append(ShadowPolicy(name=name, of=sc.of, chain=chain, thresholds=thresholds, calibrators=cals,
                                user_tiers=frozenset(sc.user_tiers) if sc.user_tiers else None,
                                sample_rate=sc.sample_rate, sample_budget_usd=sc.sample_budget_usd,
                                sample_seed=sc.sample_seed))
    return out


def _tier_outcomes(attempts: Sequence[Attempt]) -> dict[str, tuple[Attempt | None, float]]:
    """Per tier tried: (its successful attempt or None if it only failed, the cost of all its attempts,
    provider fallbacks included). Budget-skipped tiers did not run and are left out."""
    out: dict[str, tuple[Attempt | None, float]] = {}
    for a in attempts:
        if a.decision == "skipped":
            continue
        ok, cost = out.get(a.tier, (None, 0.0))
        if a.error_class is None and a.features and ok is None:
            ok = a
        out[a.tier] = (ok, cost + a.cost_usd)
    return out


def _unknown(shadow: ShadowPolicy, reason: str, **extra: Any) -> dict[str, Any]:
    return {"shadow": shadow.name, "status": "unknown", "tier": None, "escalated": None, "cost_usd": None,
            "diverges": None, "reason": reason, **extra}


def _live_skips(attempts: Sequence[Attempt]) -> dict[str, float]:
    """Tiers the live path skipped for the cost budget, with what it had spent before each: the shadow would
    skip one as well once it has spent as much (the budget refuses a tier when spent + its cost is over)."""
    out: dict[str, float] = {}
    spent = 0.0
    for a in attempts:
        if a.decision == "skipped":
            out.setdefault(a.tier, spent)
        spent += a.cost_usd
    return out


def evaluate_shadow(shadow: ShadowPolicy, rec: CascadeRecord, live_calibrators: Mapping[str, Calibrator],
                    sampled: Sequence[Attempt] = (), skipped: Collection[str] = ()) -> dict[str, Any] | None:
    """What ``shadow`` would have done with the finished live request ``rec`` (pure: no I/O, no clock).

    ``sampled``: the shadow's own calls of tiers the live path did not run (sampled shadow execution),
    walked like the live attempts; ``skipped``: tiers the sampler found the request's cost budget would make
    the shadow skip. Returns the ``shadow_decisions`` row (without request id and time), or None when the
    request was not routed by the shadow's live policy, is not of its user tiers, or was not answered
    (refused, failed or cancelled: there is no live outcome to compare). An ``unknown`` row for a tier that
    nothing ran has ``needs`` (that tier; not stored).

    As the engine does, a shadow whose next tier is skipped for the cost budget, whose last tier fails, or
    whose tier ran out of a ``best_answer`` latency budget, serves the most confident answer it escalated from
    (if any).
    """
    if rec.policy != shadow.of or rec.status in ("error", "cancelled"):
        return None
    if shadow.user_tiers is not None and rec.user_tier not in shadow.user_tiers:
        return None
    ran = _tier_outcomes(rec.attempts)
    own = _tier_outcomes(sampled)
    ran.update(own)  # the shadow samples only tiers the live path did not run: no overlap
    live_skips = _live_skips(rec.attempts)
    # tiers whose call ran out of the request's latency budget under best_answer (live, or when sampled)
    out_of_time = {a.tier for a in (*rec.attempts, *sampled) if a.latency_budget_out}
    cost = 0.0
    n = len(shadow.chain)
    first = shadow.chain[0]
    in_hand: list[tuple[str, float]] = []  # (tier, confidence) of the answers the shadow escalated from

    def known(tname: str, reason: str) -> dict[str, Any]:
        if own:
            reason += f" (sampled: {', '.join(own)})"
        return {"shadow": shadow.name, "status": "known", "tier": tname, "escalated": tname != first,
                "cost_usd": cost, "diverges": tname != rec.tier, "reason": reason}

    def best(why: str) -> dict[str, Any] | None:
        if not in_hand:
            return None
        tname, conf = max(in_hand, key=lambda tc: tc[1])
        return known(tname, f"{tname}: served as the most confident answer in hand ({conf:.3f}) because {why}")

    for i, (tname, threshold) in enumerate(zip(shadow.chain, shadow.thresholds, strict=True)):
        is_last = i == n - 1
        if tname not in ran:
            if tname in skipped or (tname in live_skips and cost >= live_skips[tname] - 1e-15):
                why = f"the cost budget would skip {tname!r}"
                return best(why) or _unknown(shadow, f"{why}, with no answer in hand: the shadow would refuse "
                                                     "the request", diverges=True, escalated=None)
            # its answer and cost are unknown, but (as long as the tiers it needs answer) it serves this tier or a
            # later one: a divergence for certain when the live path served none of them, an escalation for
            # certain past the first tier. A tier the live path skipped for the cost budget, the shadow (which
            # spent less by then) may skip as well, and serve an answer in hand: those count as outcomes too
            could_serve = set(shadow.chain[i:])
            escalates = i > 0
            if tname in live_skips and in_hand:
                could_serve |= {t for t, _ in in_hand}
                escalates = escalates and first not in could_serve
            return _unknown(shadow, f"needs tier {tname!r}, which the live path did not run", needs=tname,
                            diverges=True if rec.tier not in could_serve else None,
                            escalated=True if escalates else None)
        att, tier_cost = ran[tname]
        cost += tier_cost
        if att is None:
            if is_last:
                where = "when sampled" if tname in own else "on the live path"
                return best(f"its last tier {tname!r} failed {where}") or \
                    _unknown(shadow, f"its last tier {tname!r} failed {where}")
            if tname in out_of_time and in_hand:  # the engine goes no further, as it did on the live path
                return best(f"{tname!r} exceeded the latency budget")  # (with nothing in hand, it escalates)
            continue
        cal = shadow.calibrator(tname, live_calibrators)
        if cal is None:
            return _unknown(shadow, f"no calibrator for tier {tname!r}")
        try:
            d = decide(att.features, cal, threshold, is_last=is_last)
        except KeyError as exc:  # the shadow's calibrator reads a feature the record lacks
            return _unknown(shadow, f"tier {tname!r}: {exc.args[0] if exc.args else exc}")
        if not d.escalate:
            return known(tname, f"{tname}: {d.reason}")
        in_hand.append((tname, d.confidence or 0.0))
    # every tier of the chain failed or escalated: only reachable when the last tier failed (handled above)
    return _unknown(shadow, "no tier of the shadow chain answered")


class ShadowSet:
    """The shadows of one engine: ``evaluate(rec)`` gives the rows for ``Ledger.record(rec, shadows=...)``.

    Holds the engine's tier map (for the sampled calls) and the tiers' calibrators as they were when it was
    made (``tier_calibrators``; default: the tiers' now). A reload makes a new set with the new calibrators,
    and a request is judged by the set in force when it started (its route's), as its live decisions were:
    never the old live decision beside the new shadow calibrators. Never raises: a failing shadow is logged
    and left out (a shadow must never break a live request).
    """

    def __init__(self, config: Config, tiers: Mapping[str, Any],
                 policy_calibrators: Mapping[str, Mapping[str, Calibrator]] | None = None,
                 tier_calibrators: Mapping[str, Calibrator] | None = None,
                 kept: "ShadowSet | None" = None) -> None:
        self.tiers = tiers
        self.tier_calibrators = dict(tier_calibrators) if tier_calibrators is not None else \
            {name: t.calibrator for name, t in tiers.items()}
        #: the live policies' own calibrators (policy -> tier -> calibrator): a shadow of policy P is
        #: compared with what P itself uses
        self.policy_calibrators = policy_calibrators or {}
        self.policies = build_shadow_policies(config, kept=kept.by_name if kept is not None else None)
        self.by_name = {sh.name: sh for sh in self.policies}

    def __bool__(self) -> bool:
        return bool(self.policies)

    def live_calibrators(self, shadow: ShadowPolicy) -> Mapping[str, Calibrator]:
        """Per tier, the calibrator the shadow's live policy uses (its own override, else the tier's)."""
        own = self.policy_calibrators.get(shadow.of)
        return {**self.tier_calibrators, **own} if own else self.tier_calibrators

    def evaluate(self, rec: CascadeRecord) -> list[dict[str, Any]]:
        if not self.policies:
            return []
        rows = []
        for sh in self.policies:
            try:
                row = evaluate_shadow(sh, rec, self.live_calibrators(sh))
            except Exception:  # noqa: BLE001 - never let a shadow break the live request
                log.exception("shadow %s failed on request %s", sh.name, rec.request_id)
                continue
            if row is not None:
                rows.append(row)
        return rows


# --- sampled shadow execution ----------------------------------------------------------------------


def estimate_sample_cost(tier: Any, req: GenerationRequest, rec: CascadeRecord) -> float:
    """What one call of ``tier`` (an engine Tier) for ``req`` may cost at most: the prompt's tokens (the
    tier's own count, at least the longest prompt the live path billed), all of ``req.max_tokens`` answered,
    at the dearest of the tier's and its providers' prices; and, for a tier with several providers, the
    prompt billed by each provider but one (a provider that times out is billed its prompt before the next
    one answers; error answers are not billed, so retries add nothing)."""
    prompt = max(tier.backend.estimate_prompt_tokens(req), max((a.prompt_tokens for a in rec.attempts), default=0))
    return call_ceiling(tier, prompt, req.max_tokens or tier.config.max_tokens)


@dataclass(eq=False)
class _Sample:
    """One shadow decision to resolve by running the tiers it needs."""

    shadows: ShadowSet            # the set the request was evaluated with (a reload may swap the engine's)
    shadow: ShadowPolicy
    rec: CascadeRecord
    request: GenerationRequest
    row: dict[str, Any]           # the decision so far: unknown, needing a tier nothing ran
    budget: Budget | None = None  # the request's limits: the shadow walks its chain under the same budgets
    calls: list[Attempt] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    #: tiers the request's cost budget makes the shadow skip (not called: it serves an answer in hand)
    skipped: set[str] = field(default_factory=set)


#: sentinel of ``ShadowSampler._reserve``: the live request is not in the ledger as answered (its write failed,
#: or its client left before its answer and the row was made ``cancelled``)
_MISSING = object()


class ShadowSampler:
    """Runs sampled shadows' missing tiers in the background, within each shadow's daily budget.

    One per engine (it outlives reloads, which swap the :class:`ShadowSet`). ``call_tier`` is the
    engine's :meth:`~cascade.engine.Engine.call_tier`. ``rng`` (tests) replaces every shadow's own
    ``random.Random(sample_seed)``; ``clock`` gives UNIX time (the budget's UTC day, the calls' times).
    At most ``max_in_flight`` samples run at once; a request drawn beyond that stays unknown, saying so.
    ``listeners`` are called with (shadow name, attempt) for each shadow call (metrics).
    """

    def __init__(self, call_tier: Callable[..., Awaitable[Any]], ledger: Ledger, *, grace_s: float = 30.0,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time,
                 max_in_flight: int = 16) -> None:
        self.call_tier = call_tier
        self.ledger = ledger
        self.grace_s = grace_s
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.listeners: list[Callable[[str, Attempt], None]] = []
        self._rng = rng
        self._rngs: dict[tuple[str, int | None], random.Random] = {}
        #: shadow -> sample -> USD held: predicted cost of a call in flight, then actual cost until written
        self._reserved: dict[str, dict[_Sample, float]] = {}
        self._tasks: set[asyncio.Task] = set()
        #: request id -> (its write's late outcome, how many samples wait on it), for a stream's (its answer went
        #: out before its write): a write whose waiter was told it timed out stays queued, and a stream's is kept
        #: as served if it commits (:meth:`cascade.ledger.Ledger.submit`); its samples wait for it
        self._late: dict[str, tuple[asyncio.Future, int]] = {}
        if ledger is not None:  # (a sampler that only draws has none)
            ledger.late_listeners.append(self._settled_late)
        self._gate = asyncio.Lock()
        self._closing = False
        #: ``time.monotonic()`` by which samples in flight must end (set when a shutdown begins)
        self._deadline: float | None = None

    @property
    def in_flight(self) -> int:
        """Samples started and not yet recorded."""
        return len(self._tasks)

    def _draw(self, sh: ShadowPolicy) -> float:
        if self._rng is not None:
            return self._rng.random()
        key = (sh.name, sh.sample_seed)
        rng = self._rngs.get(key)
        if rng is None:
            rng = self._rngs[key] = random.Random(sh.sample_seed)
        return rng.random()

    def select(self, shadows: ShadowSet, rec: CascadeRecord, request: GenerationRequest,
               rows: list[dict[str, Any]], budget: Budget | None = None) -> list[_Sample]:
        """Draw, among ``rows`` (about to be written with ``rec``), the decisions to resolve by sampling;
        their reasons say a sample is pending (or why a drawn one will not be). Synchronous, no I/O;
        only answered requests are sampled. Never raises (it runs on the live request's path)."""
        if rec.status != "ok":
            return []
        out: list[_Sample] = []
        try:
            for row in rows:
                sh = shadows.by_name.get(row["shadow"])
                if row.get("needs") is None or sh is None or sh.sample_rate <= 0 or self._draw(sh) >= sh.sample_rate:
                    continue
                if self._closing:
                    row["reason"] += "; not sampled: the engine is shutting down"
                elif len(self._tasks) + len(out) >= self.max_in_flight:
                    row["reason"] += f"; not sampled: {self.max_in_flight} samples already in flight"
                else:
                    out.append(_Sample(shadows=shadows, shadow=sh, rec=rec, request=request, row=dict(row), budget=budget))
                    row["reason"] += "; sample pending"  # until the sample's outcome replaces it
        except Exception:  # noqa: BLE001 - a shadow must never break a live request
            log.exception("shadow sampling failed on request %s", rec.request_id)
            return []
        return out

    def start(self, samples: Sequence[_Sample], committed: asyncio.Future, *, sent: bool = False) -> None:
        """Run ``samples`` in the background once ``committed`` (the live record's write) is done; ``sent``: the
        answer went out before the write (a stream's), which, told it timed out, is waited for until it settles."""
        loop = asyncio.get_running_loop()
        for smp in samples:
            late: asyncio.Future | None = None
            if sent:
                rid = smp.rec.request_id
                late, n = self._late.get(rid) or (loop.create_future(), 0)
                self._late[rid] = (late, n + 1)
            task = loop.create_task(self._run(smp, committed, late), name=f"shadow-sample:{smp.shadow.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stop_drawing(self, grace_s: float | None = None) -> None:
        """A shutdown has begun (SIGTERM): draw no new samples, none paid for while requests drain; those in
        flight have ``grace_s`` seconds from now (default ``self.grace_s``), the same grace as the requests,
        not a fresh one when the engine closes after them."""
        self._closing = True
        if self._deadline is None:
            self._deadline = time.monotonic() + (self.grace_s if grace_s is None else grace_s)

    async def close(self) -> None:
        """Refuse new samples; give those in flight what is left of their grace (``grace_s`` from the
        shutdown's start, :meth:`stop_drawing`), then cancel them. Every one is recorded (a cancelled one as
        unknown, with the calls it made) before this returns."""
        self.stop_drawing()
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, (self._deadline or 0.0) - time.monotonic()))
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shadow sampling: %d sample(s) still running at shutdown were cancelled", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    def _settled_late(self, rec: CascadeRecord, error: BaseException | None) -> None:
        """A ledger late listener: a write whose waiter was told it timed out is done (committed, or lost)."""
        late = self._late.get(rec.request_id)
        if late is not None and not late[0].done():
            late[0].set_result(error)

    # --- one sample -------------------------------------------------------------------------------
    async def _run(self, smp: _Sample, committed: asyncio.Future, late: asyncio.Future | None) -> None:
        sh, rid = smp.shadow, smp.rec.request_id
        row: dict[str, Any] | None
        try:
            await asyncio.wait([committed])  # wait for the live write; never cancels the request's future
            error = asyncio.CancelledError() if committed.cancelled() else committed.exception()
            if late is not None and isinstance(error, LedgerTimeoutError):
                # a stream's write, still queued: its row (its answer went out) is kept as served if it commits,
                # its decision saying a sample is pending; waited for, as the live write is (a shutdown cancels it)
                await asyncio.wait([late])
                error = late.result()
            # a live write that failed or (not a stream's) timed out: its client had an error, not the answer (a row
            # committed late is made that error): nothing to compare a shadow with, nor to pay a sample for
            row = None if error is not None else await self._walk(smp)
        except asyncio.CancelledError:
            for a in smp.calls:  # the call cut short
                if a.error_class is None and not a.features:
                    a.decision, a.error_class = "error", CANCELLED
                    a.reason = a.error_message = "cancelled: the engine shut down"
            row = {**smp.row, "reason": f"{smp.row['reason']}; sample cancelled: the engine shut down"}
        except Exception as exc:  # noqa: BLE001 - a sample must not take anything else down
            log.exception("shadow %s: sampling request %s failed", sh.name, rid)
            row = {**smp.row, "reason": f"{smp.row['reason']}; sample failed: {type(exc).__name__}"}
        try:
            if row is not None:
                row["sampled"] = bool(smp.calls)
                row["sample_cost_usd"] = sum(a.cost_usd for a in smp.calls) if smp.calls else None
                row.pop("needs", None)
                await asyncio.shield(self.ledger.record_shadow_sample(rid, smp.rec.created_at, row, smp.calls,
                                                                      smp.started_at))
        except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - logged: never silent
            log.error("shadow %s: the sample of request %s (%d call(s), $%.6f) may not be recorded: %s",
                      sh.name, rid, len(smp.calls), sum(a.cost_usd for a in smp.calls), exc or type(exc).__name__)
        # the sample is let go; one not written leaves its reservation in the ledger (the calls' cost by then),
        # counted by every replica until its UTC day ends: the money was spent
        held = self._reserved.get(sh.name)
        if held is not None:
            held.pop(smp, None)
        waiting = self._late.pop(rid, None) if late is not None else None
        if waiting is not None and waiting[1] > 1:
            self._late[rid] = (waiting[0], waiting[1] - 1)

    async def _walk(self, smp: _Sample) -> dict[str, Any] | None:
        """Call the tiers the shadow needs, one by one, until its outcome is decided (or the budget says
        no). None when the live request is not in the ledger as answered (its write failed, or its client left
        before its answer): nothing to attach to."""
        sh, rec = smp.shadow, smp.rec
        live = smp.shadows.live_calibrators(sh)
        while (tname := smp.row.get("needs")) is not None:
            row = smp.row
            tier = smp.shadows.tiers.get(tname)
            if tier is None:
                return {**row, "reason": f"{row['reason']}; not sampled: tier {tname!r} is not served here"}
            tc = tier.config
            req = smp.request.with_(max_tokens=smp.request.max_tokens or tc.max_tokens,
                                    top_logprobs=max(smp.request.top_logprobs, tc.top_logprobs))
            # the request's cost budget binds the shadow as it bound the live path: counting what the shadow's
            # chain spent before this tier, a tier it would skip is not called (the outcome stays unknown)
            done = _tier_outcomes(rec.attempts)
            done.update(_tier_outcomes(smp.calls))
            spent = sum(done[t][1] for t in sh.chain[:sh.chain.index(tname)] if t in done)
            await tier.backend.tokenize(req)  # off the event loop, for the budget and the estimate below
            req, refusal = fit_budget(tier, req, spent, smp.budget)
            if refusal is not None:  # the shadow would skip it, as the live path would: decided without a call
                smp.skipped.add(tname)
                smp.row = evaluate_shadow(sh, rec, live, smp.calls, smp.skipped) or _unknown(sh, "no longer evaluated")
                smp.row["reason"] += f" ({refusal})"
                continue
            estimate = estimate_sample_cost(tier, req, rec)
            refusal = await self._reserve(smp, estimate)
            if refusal is _MISSING:
                log.warning("shadow %s: request %s is not in the ledger as answered; not sampled", sh.name,
                            rec.request_id)
                return None
            if refusal is not None:
                return {**row, "reason": f"{row['reason']}; not sampled: {refusal}"}
            before = len(smp.calls)
            att = Attempt(index=before, tier=tname, model=tc.model, backend=tc.backend)
            smp.calls.append(att)
            t0, called = self.clock(), time.perf_counter()
            # the request's latency budget cuts the tier short as it would have on the live path: a tier that
            # answers only past it would have been cancelled there, never served (a shorter call, too)
            lat = smp.budget.latency_s if smp.budget is not None else None
            timeout = tc.timeout_s if lat is None else min(tc.timeout_s, lat)
            try:
                await self.call_tier(tier, req, att, smp.calls, timeout=timeout)
            except CascadeError as exc:  # recorded in att; the walk treats the tier as failed
                log.warning("shadow %s: sampled tier %s failed on request %s: %s", sh.name, tname,
                            rec.request_id, exc)
                att.latency_budget_out = latency_budget_out(smp.budget, exc, time.perf_counter() - called)
            finally:
                smp.started_at += [t0] * (len(smp.calls) - len(smp.started_at))
                # the reservation becomes the calls' actual cost, held until it is in the ledger
                self._reserved[sh.name][smp] += sum(a.cost_usd for a in smp.calls[before:]) - estimate
                self._mirror(smp)
            if att.error_class is None:
                i = sh.chain.index(tname)
                cal = sh.calibrator(tname, live)
                if cal is not None:
                    d = decide(att.features, cal, sh.thresholds[i], is_last=i == len(sh.chain) - 1)
                    att.confidence, att.reason = d.confidence, f"shadow {sh.name}: {d.reason}"
                    att.decision = "escalate" if d.escalate else "final"
            for a in smp.calls[before:]:
                for listener in self.listeners:
                    try:
                        listener(sh.name, a)
                    except Exception:  # noqa: BLE001 - metrics must not fail a sample
                        log.exception("shadow sample listener %r failed", listener)
            smp.row = evaluate_shadow(sh, rec, live, smp.calls, smp.skipped) or _unknown(sh, "no longer evaluated")
        return smp.row

    async def _reserve(self, smp: _Sample, estimate: float) -> str | object | None:
        """Hold ``estimate`` of the shadow's budget for today (UTC) for one call: None when held, else why
        not (or ``_MISSING``). Today's spend is the ledger's (all replicas, restarts included): the samples
        recorded, and the reservations of those in flight, this one's included, checked and extended in one
        transaction (:meth:`cascade.ledger.Ledger.admit_spend`), so no replica reserves between the check and
        the hold."""
        sh = smp.shadow
        since = utc_day_start(self.clock())
        budget = sh.sample_budget_usd
        async with self._gate:  # one check-and-hold at a time in this process (the ledger's: across them)
            # a request whose client left before its answer is made cancelled, its shadow decisions deleted:
            # nothing to compare a shadow with, nor to pay a sample for
            if not (await self.ledger.query("SELECT COUNT(*) FROM requests WHERE request_id = ? "
                                            "AND status IN ('ok', 'partial')", (smp.rec.request_id,)))[0][0]:
                return _MISSING
            held = self._reserved.setdefault(sh.name, {})
            total = held.get(smp, 0.0) + estimate  # (its hold so far is among those read: the call's is added)
            _, ok = await self.ledger.admit_spend(smp.rec.request_id, [("shadow", sh.name)], total, since,
                                                  lambda figures: figures[0][0] + figures[0][1] + estimate <= budget)
            if not ok:
                return f"today's sample budget (${budget:g}, UTC day) is spent"
            held[smp] = total
            return None

    def _mirror(self, smp: _Sample) -> None:
        """Set ``smp``'s reservation in the ledger to what it holds now (after a call: the calls' actual cost)."""
        amount = self._reserved.get(smp.shadow.name, {}).get(smp)
        if amount is not None:
            self.ledger.hold_spend(smp.rec.request_id, [("shadow", smp.shadow.name)], max(amount, 0.0))


__all__ = ["ShadowPolicy", "ShadowSampler", "ShadowSet", "build_shadow_policies", "estimate_sample_cost",
           "evaluate_shadow"]
