"""cascade-engine used as a library: an Engine opened in code, on a real SQLite ledger, with hosted tiers that are
real OpenAI-protocol servers on loopback (tests/fault_server.py) and a local tier on the small model.

A malformed request, a reused request id, a closed engine or another event loop is refused in one of our error
classes before any tier is called (a hosted tier would be paid for nothing), and ``close()`` ends the requests
still running with a row that says why.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3

import pytest

from cascade.budget import Budget
from cascade.engine import Engine
from cascade.errors import EngineClosedError, EngineLoopError, InvalidRequestError
from cascade.types import GenerationRequest, Message
from tests.conftest import make_config, tier
from tests.fault_server import FaultServerThread

Q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),))


@pytest.fixture(scope="module")
def servers():
    with FaultServerThread(answer="Paris is the capital of France.") as small, FaultServerThread() as large:
        yield {"small": small, "large": large}


@pytest.fixture(autouse=True)
def _clean(servers):
    for s in servers.values():
        s.reset()


def hosted(name, fs, **kw):
    return {"name": name, "backend": "openai", "model": f"model-{name}", "max_tokens": 16, "timeout_s": 30,
            "options": {"base_url": fs.base_url, "api_key": "x"}, "price": {"input_per_1m": 1, "output_per_1m": 2},
            **kw}


def config(tmp_path, servers, **kw):
    return make_config(tmp_path, [hosted("small", servers["small"], threshold=0.5), hosted("large", servers["large"])],
                       **kw)


def calls(servers):
    return sum(s.stats()["requests"] for s in servers.values())


def rows(tmp_path, sql="SELECT request_id, status, error_class FROM requests ORDER BY created_at"):
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("request_, param", [
    (GenerationRequest(messages=()), "messages"),
    (GenerationRequest(), "messages"),
    (GenerationRequest(messages=(Message("user", None),)), "messages[0].content"),
    (GenerationRequest(messages=({"role": "user", "content": "hi"},)), "messages"),
    (GenerationRequest(messages=(Message("robot", "hi"),)), "messages"),
    (GenerationRequest(messages=(Message("user", "\ud800"),)), "messages[0].content"),
    (GenerationRequest(prompt=5), "prompt"),
    (GenerationRequest(prompt="hi", max_tokens=0), "max_tokens"),
    (GenerationRequest(prompt="hi", max_tokens=-5), "max_tokens"),
    (GenerationRequest(prompt="hi", max_tokens=2.5), "max_tokens"),
    (GenerationRequest(prompt="hi", temperature=math.nan), "temperature"),
    (GenerationRequest(prompt="hi", temperature=3.0), "temperature"),
    (GenerationRequest(prompt="hi", top_p=0.0), "top_p"),
    (GenerationRequest(prompt="hi", stop=("",)), "stop"),
    (GenerationRequest(prompt="hi", top_logprobs=21), "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "request"),
])
async def test_a_malformed_request_is_refused_and_recorded_before_any_tier_is_called(tmp_path, servers, request_,
                                                                                    param):
    async with await Engine.open(config(tmp_path, servers)) as eng:
        with pytest.raises(InvalidRequestError) as err:
            await eng.run(request_)
        assert err.value.param == param, err.value.message
        events = eng.stream(request_, request_id="mine")
        with pytest.raises(InvalidRequestError):
            await events.__anext__()
    assert calls(servers) == 0
    assert [(s, e) for _, s, e in rows(tmp_path)] == [("error", "InvalidRequestError")] * 2
    assert rows(tmp_path)[1][0] == "mine"  # a caller's own id names its refusal


@pytest.mark.parametrize("budget, param", [
    (Budget(latency_s=math.nan), "budget.latency_s"),
    (Budget(latency_s=0), "budget.latency_s"),
    (Budget(cost_usd=-1.0), "budget.cost_usd"),
    (Budget(on_latency="bogus"), "budget.on_latency"),
    (Budget(on_cost="ignore"), "budget.on_cost"),
])
async def test_a_malformed_budget_is_refused_before_any_tier_is_called(tmp_path, servers, budget, param):
    async with await Engine.open(config(tmp_path, servers)) as eng:
        with pytest.raises(InvalidRequestError) as err:
            await eng.run(Q, budget=budget)
        assert err.value.param == param
    assert calls(servers) == 0
    assert [(s, e) for _, s, e in rows(tmp_path)] == [("error", "InvalidRequestError")]


@pytest.mark.parametrize("kw, param", [
    ({"metadata": {"k": {1, 2}}}, "metadata"),                   # not JSON: the ledger could not write it
    ({"metadata": {"when": __import__("datetime").date(2026, 1, 1)}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),  # OpenAI's (and the HTTP layer's) 16 tags
    ({"metadata": {1: "v"}}, "metadata"),
    ({"metadata": ["team", "a"]}, "metadata"),
    ({"end_user": "\ud800"}, "end_user"),                        # no UTF-8 for the ledger
    ({"end_user": "u" * 513}, "end_user"),
    ({"end_user": 7}, "end_user"),
    ({"model": ["cascade"]}, "model"),
    ({"model": ""}, "model"),                                    # was answered by the default policy, unasked
    ({"model": "m" * 257}, "model"),                             # the HTTP layer's 256
    ({"endpoint": "(all)"}, "endpoint"),                         # a report's group: chat, completions... only
    ({"endpoint": "Chat"}, "endpoint"),
])
async def test_attribution_the_http_layer_would_refuse_is_refused_before_any_tier_is_called(tmp_path, servers, kw,
                                                                                           param):
    """``metadata``, ``end_user`` and ``model`` are held to the HTTP layer's rules: a value the ledger cannot
    write used to get the tiers called and paid, then a bare TypeError with no row (a stream: every delta, then
    the TypeError), and one in flight beside others kept their journal records out; a list as ``model`` marked
    the whole ledger unavailable. Now one of our errors naming it, before any call, with its refusal's row."""
    async with await Engine.open(config(tmp_path, servers)) as eng:
        with pytest.raises(InvalidRequestError) as err:
            await eng.run(Q, **kw)
        assert err.value.param == param, err.value.message
        with pytest.raises(InvalidRequestError):
            await eng.stream(Q, **kw).__anext__()
        assert eng.ledger.unavailable is None
        assert (await eng.run(Q, metadata={"team": "a"}, end_user="u1")).record.status == "ok"
    assert calls(servers) == 1
    assert [(s, e) for _, s, e in rows(tmp_path)] == [("error", "InvalidRequestError")] * 2 + [("ok", None)]


def test_sequences_given_as_lists_or_one_string_are_taken_as_tuples():
    from cascade.types import checked_request

    r = checked_request(GenerationRequest(messages=[Message("user", "hi")], stop=["a", "b"]))
    assert r.messages == (Message("user", "hi"),) and r.stop == ("a", "b")
    assert checked_request(GenerationRequest(prompt="hi", stop="a")).stop == ("a",)
    same = GenerationRequest(prompt="hi", stop=("a",))
    assert checked_request(same) is same  # (a well-formed request is not copied)


async def test_a_developer_message_reaches_every_tier_as_a_system_message(tmp_path, servers):
    """As the HTTP layer sends it: Qwen2.5's chat template drops a "developer" message without a word, and
    SmolLM2's renders it as a turn of its own after its default system prompt."""
    asked = (Message("developer", "Answer in French."), Message("user", "Hi"))
    as_system = (Message("system", "Answer in French."), Message("user", "Hi"))
    async with await Engine.open(config(tmp_path, servers)) as eng:
        await eng.run(GenerationRequest(messages=asked))
    sent = servers["small"].stats()["log"][0]["messages"]
    assert sent == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    local = make_config(tmp_path / "local", [tier("small", max_tokens=4, threshold=0.0)])
    async with await Engine.open(local) as eng:
        answers = [(await eng.run(GenerationRequest(messages=m))).result for m in (asked, as_system)]
    assert answers[0].usage == answers[1].usage and answers[0].text == answers[1].text


async def test_a_stop_string_is_one_stop_sequence_as_in_openais_api(tmp_path):
    # (a local tier: the engine cuts the answer at the stop itself)
    cfg = make_config(tmp_path, [tier("small", max_tokens=12, threshold=0.0)])
    async with await Engine.open(cfg) as eng:
        free = (await eng.run(Q)).result.text
        word = free.split()[1]  # a word inside the answer, not its first
        cut = (await eng.run(Q.with_(stop=word))).result.text
    assert cut == free[:free.index(word)], (free, word, cut)


async def test_a_reused_request_id_is_refused_before_any_tier_is_called(tmp_path, servers):
    async with await Engine.open(config(tmp_path, servers)) as eng:
        first = await eng.run(Q, request_id="order-42")
        n = calls(servers)
        with pytest.raises(InvalidRequestError, match="order-42") as err:
            await eng.run(Q, request_id="order-42")
        assert err.value.param == "request_id"
        assert calls(servers) == n
        # two at once under one id: one is answered, the other refused before it calls anything
        servers["small"].faults("slow:0.3")
        got = await asyncio.gather(eng.run(Q, request_id="order-43"), eng.run(Q, request_id="order-43"),
                                   return_exceptions=True)
    assert sorted(type(g).__name__ for g in got) == ["InvalidRequestError", "Outcome"]
    assert calls(servers) == n + 1
    assert rows(tmp_path) == [("order-42", first.record.status, None), ("order-43", "ok", None)]


async def test_a_closed_engine_takes_no_request_and_calls_no_tier(tmp_path, servers):
    eng = await Engine.open(config(tmp_path, servers))
    await eng.run(Q)
    await eng.close()
    n = calls(servers)
    with pytest.raises(EngineClosedError, match="closed"):
        await eng.run(Q)
    with pytest.raises(EngineClosedError):
        await eng.stream(Q).__anext__()
    await eng.close()  # a second close is a no-op
    assert calls(servers) == n
    assert [s for _, s, _ in rows(tmp_path)] == ["ok"]


async def test_close_lets_requests_finish_within_its_grace_and_cancels_the_rest_with_a_row_that_says_so(
        tmp_path, servers):
    eng = await Engine.open(config(tmp_path, servers))
    servers["small"].faults("slow:0.5", "stall:30")

    async def arrived(n):  # (in order: the faults are handed out in the order the requests arrive)
        while servers["small"].stats()["requests"] < n:
            await asyncio.sleep(0.02)

    quick = asyncio.ensure_future(eng.run(Q, request_id="quick"))
    await asyncio.wait_for(arrived(1), 30)
    stuck = asyncio.ensure_future(eng.run(Q, request_id="stuck"))
    await asyncio.wait_for(arrived(2), 30)
    t0 = asyncio.get_running_loop().time()
    await eng.close(grace_s=1.0)
    took = asyncio.get_running_loop().time() - t0
    assert (await quick).record.status == "ok"  # finished within the grace
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert 0.9 < took < 5, took
    assert rows(tmp_path) == [("quick", "ok", None), ("stuck", "error", "EngineClosedError")]
    # the stuck request was not escalated to the large tier as the engine closed
    assert servers["large"].stats()["requests"] == 0


def test_an_engine_used_from_another_event_loop_says_so_and_calls_no_tier(tmp_path, servers):
    loop = asyncio.new_event_loop()
    try:
        eng = loop.run_until_complete(Engine.open(config(tmp_path, servers)))
        loop.run_until_complete(eng.run(Q))
        n = calls(servers)
        with pytest.raises(EngineLoopError, match="another event loop"):
            asyncio.run(eng.run(Q))
        with pytest.raises(EngineLoopError):
            asyncio.run(eng.close())
        assert calls(servers) == n
        loop.run_until_complete(eng.close())  # its own loop closes it, whole
        assert eng.ledger.path is not None and rows(tmp_path) and not [
            r for r in rows(tmp_path, "SELECT * FROM instances")]
    finally:
        loop.close()


def test_the_package_names_the_engine_lazily_and_configs_fail_as_config_errors():
    import subprocess
    import sys

    code = ("import sys, cascade; light = 'cascade.engine' not in sys.modules; from cascade import Engine, Budget; "
            "import cascade.engine; print(light, Engine is cascade.engine.Engine, Budget.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "cascade.budget"]
    import cascade
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match="must be a path"):
        cascade.load_config(123)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        cascade.parse_config([1])
    assert {"Engine", "Budget", "load_config", "parse_config"} <= set(dir(cascade))  # the lazy names too


@pytest.mark.parametrize("wrong", [{"tiers": []}, "config.yaml", None])
async def test_engine_open_given_no_config_object_says_what_to_pass(wrong):
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match="Engine.open takes a cascade Config.*cascade.load_config"):
        await Engine.open(wrong)


async def test_close_does_not_wait_for_a_stream_its_own_caller_left_open(tmp_path, servers):
    # `async with` around a stream left open after its first event: the close (default grace 30 s) is the
    # caller's own, so it closes the stream at once and records it, instead of cancelling the caller at the grace
    t0 = asyncio.get_running_loop().time()
    async with await Engine.open(config(tmp_path, servers)) as eng:
        events = eng.stream(Q, request_id="left-open")
        first = await events.__anext__()
        assert type(first).__name__ == "StreamStart"
    assert asyncio.get_running_loop().time() - t0 < 10
    [(rid, status, error_class)] = rows(tmp_path)
    assert (rid, error_class) == ("left-open", "EngineClosedError") and status in ("cancelled", "partial")


WRAPPERS = {  # a close awaited through a task of its own, made in the caller's context
    "wait_for": lambda close: asyncio.wait_for(close, 30),  # (on Python 3.11 it runs `close` in a task)
    "create_task": asyncio.create_task,
    "gather": asyncio.gather,
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
async def test_close_through_a_task_of_its_callers_closes_the_callers_open_stream_without_cancelling_it(
        tmp_path, servers, wrap):
    # the closing task is the wrapper, and the caller, which holds a stream suspended between two events, waits
    # for it: the caller is not waited for (the grace) nor cancelled, and its stream is closed as an `async with`
    # around it would close it
    eng = await Engine.open(config(tmp_path, servers))
    events = eng.stream(Q, request_id="left-open")
    assert type(await events.__anext__()).__name__ == "StreamStart"
    t0 = asyncio.get_running_loop().time()
    try:
        await WRAPPERS[wrap](eng.close(grace_s=6.0))
    except asyncio.CancelledError:
        pytest.fail("the caller holding the stream was cancelled by its own close")
    assert asyncio.get_running_loop().time() - t0 < 3
    [(rid, status, error_class)] = rows(tmp_path)
    assert (rid, error_class) == ("left-open", "EngineClosedError") and status in ("cancelled", "partial")


async def test_close_through_a_task_still_waits_for_another_tasks_running_request_and_then_cancels_it(
        tmp_path, servers):
    # only the caller's own streams left open are spared the grace: a request another task is running is waited
    # for and then cancelled, with its row, as by a close awaited in the caller itself
    eng = await Engine.open(config(tmp_path, servers))
    servers["small"].faults("ok", "stall:30")  # (in the order the requests arrive: the stream first)
    events = eng.stream(Q, request_id="left-open")
    assert type(await events.__anext__()).__name__ == "StreamStart"
    stuck = asyncio.ensure_future(eng.run(Q, request_id="stuck"))
    while servers["small"].stats()["requests"] < 2:
        await asyncio.sleep(0.02)
    t0 = asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(eng.close(grace_s=1.0), 30)
    except asyncio.CancelledError:
        pytest.fail("the caller holding the stream was cancelled by its own close")
    took = asyncio.get_running_loop().time() - t0
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert 0.9 < took < 5, took
    assert sorted((r, e) for r, _, e in rows(tmp_path)) == [("left-open", "EngineClosedError"),
                                                             ("stuck", "EngineClosedError")]
    assert servers["large"].stats()["requests"] == 0


@pytest.mark.parametrize("how", ["run", "stream"])
async def test_close_through_a_task_waits_for_its_callers_own_running_request_and_then_cancels_it(
        tmp_path, servers, how):
    # the caller made the closing task and went on to run a request (a whole answer, or a stream it is reading: it
    # does not wait for the close): that request is waited for and cancelled at the grace as any other, though its
    # stream left open between two events is not waited for
    eng = await Engine.open(config(tmp_path, servers))
    servers["small"].faults("ok", "stall:30")
    events = eng.stream(Q, request_id="left-open")
    assert type(await events.__anext__()).__name__ == "StreamStart"

    async def close_soon():
        while servers["small"].stats()["requests"] < 2:
            await asyncio.sleep(0.02)
        await eng.close(grace_s=1.0)

    closing = asyncio.create_task(close_soon())
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        if how == "run":
            await eng.run(Q, request_id="stuck")
        else:
            await eng.stream(Q, request_id="stuck").__anext__()
    assert asyncio.current_task().uncancel() == 0  # (this test's task goes on, as its caller would not)
    await closing
    assert 0.9 < asyncio.get_running_loop().time() - t0 < 5
    assert sorted((r, e) for r, _, e in rows(tmp_path)) == [("left-open", "EngineClosedError"),
                                                             ("stuck", "EngineClosedError")]


async def test_a_refused_request_frees_its_id_and_ids_the_ledger_cannot_hold_are_refused(tmp_path, servers):
    from cascade.engine import new_request_id

    async with await Engine.open(config(tmp_path, servers)) as eng:
        with pytest.raises(InvalidRequestError, match="budget must be a cascade.Budget"):
            await eng.run(Q, request_id="order-7", budget={"cost_usd": 0.01})
        assert (await eng.run(Q, request_id="order-8")).record.status == "ok"  # (the refusal's row holds order-7)
        for bad in ("a\x00b", "\ud800", "", "x" * 129):
            with pytest.raises(InvalidRequestError) as err:
                await eng.run(Q, request_id=bad)
            assert err.value.param == "request_id"
        minted = new_request_id()
        await eng.run(Q, request_id=minted)
        n = calls(servers)
        with pytest.raises(InvalidRequestError, match="already made"):  # a minted id used twice is looked up
            await eng.run(Q, request_id=minted)
        assert calls(servers) == n
    assert eng._ids_in_flight == set()


async def test_a_run_cancelled_while_its_row_commits_is_recorded_as_cancelled(tmp_path, servers):
    """The answer is in, its row's write waits for a lock held elsewhere, the caller is cancelled: it never got
    the answer, so the row says cancelled (it said ok, as a stream's already did not)."""
    from tests.test_ledger_durability import lock_for

    async with await Engine.open(config(tmp_path, servers)) as eng:
        await eng.run(Q)  # (the ledger exists, warm)
        n = calls(servers)
        holder = lock_for(tmp_path / "ledger.sqlite", 2.0)
        try:
            task = asyncio.create_task(eng.run(Q, request_id="cancelled-at-commit"))
            while calls(servers) == n:  # a tier answered; its row is being written
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await asyncio.to_thread(holder.wait, 30)
        for _ in range(100):
            if ("cancelled-at-commit", "cancelled", "ClientDisconnected") in rows(tmp_path):
                break
            await asyncio.sleep(0.05)
    assert ("cancelled-at-commit", "cancelled", "ClientDisconnected") in rows(tmp_path), rows(tmp_path)


async def test_a_stream_whose_closing_is_cancelled_still_has_its_row(tmp_path, servers):
    """A caller closes a stream it has read part of, and is cancelled while the hosted tier's connection closes
    (a timeout around its reading and closing): the stream's row used to be skipped, the request left in the
    ledger as nothing (or as 'Interrupted' by the journal). It is written as what went out, then the caller is
    cancelled."""
    from cascade.engine import StreamDelta

    servers["large"].faults("slow:0:0.2")
    async with await Engine.open(config(tmp_path, servers, ledger={"path": str(tmp_path / "ledger.sqlite"),
                                                                   "journal": False})) as eng:
        events = eng.stream(Q, model="large", request_id="closing-cancelled")
        async for event in events:
            if isinstance(event, StreamDelta):
                break
        closing = asyncio.ensure_future(events.aclose())
        await asyncio.sleep(0)  # (it runs to its first wait: the tier's connection closing)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert rows(tmp_path) == [("closing-cancelled", "partial", "ClientDisconnected")]


async def test_an_engine_built_without_open_calls_no_tier(tmp_path, servers):
    """Engine(config, ledger=...) skips opening the ledger: a request used to call (and pay) a tier, then fail
    with 'ledger is not open' and no row. Now it is refused first, saying how to build one."""
    from cascade.ledger import Ledger

    cfg = config(tmp_path, servers)
    eng = Engine(cfg, ledger=Ledger(str(tmp_path / "ledger.sqlite")))
    with pytest.raises(EngineClosedError, match=r"ledger is not open: build the engine with `await Engine.open"):
        await eng.run(Q)
    with pytest.raises(EngineClosedError, match="ledger is not open"):
        async for _ in eng.stream(Q):
            pass
    assert calls(servers) == 0


@pytest.mark.parametrize("call", ["run_uncommitted", "stream"])
@pytest.mark.parametrize("cache", ["bogus", "USE", ["use"], None])
async def test_a_cache_mode_that_is_none_of_use_refresh_bypass_is_refused_and_recorded(tmp_path, servers, call,
                                                                                       cache):
    """``cache=`` was taken whatever it said: "bogus" (or a typo of "bypass") read no cache and stored the answer,
    a tier being called and paid. It is refused as any malformed field: before any tier, with its row."""
    async with await Engine.open(config(tmp_path, servers, cache={"enabled": True})) as eng:
        with pytest.raises(InvalidRequestError) as err:
            if call == "stream":
                await eng.stream(Q, cache=cache, request_id="mine").__anext__()
            else:
                await eng.run_uncommitted(Q, cache=cache, request_id="mine")
        assert err.value.param == "cache" and "use, refresh, bypass" in err.value.message
        assert (await eng.run(Q, request_id="mine-2")).record.status == "ok"  # (the engine goes on)
    assert calls(servers) == 1
    assert rows(tmp_path) == [("mine", "error", "InvalidRequestError"), ("mine-2", "ok", None)]


@pytest.mark.parametrize("grace_s", ["5", math.nan, -1.0, True, [1]])
async def test_close_given_a_grace_that_is_no_number_of_seconds_says_so_and_leaves_the_engine_open(
        tmp_path, servers, grace_s):
    """``close(grace_s="5")`` was a raw TypeError from the shadow sampler; NaN closed at once, logging 'after nan
    s'. Each is an InvalidRequestError naming grace_s, the engine still open: a close after it closes it."""
    eng = await Engine.open(config(tmp_path, servers))
    try:
        with pytest.raises(InvalidRequestError) as err:
            await eng.close(grace_s=grace_s)
        assert err.value.param == "grace_s"
        assert (await eng.run(Q)).record.status == "ok"
    finally:
        await eng.close(grace_s=0)
    with pytest.raises(EngineClosedError):
        await eng.run(Q)
    assert [s for _, s, _ in rows(tmp_path)] == ["ok"]


def _model_workers() -> set[asyncio.Task]:
    """The transformers backends' batching workers running on this loop (the tests' event loop is the session's:
    a session-scoped backend of another test file, run earlier on the same worker, has one too)."""
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("transformers-")}


async def test_an_open_that_fails_loading_a_later_tier_closes_the_tiers_it_loaded(tmp_path, smol_path):
    """``Engine.open(preload=True)`` whose second tier could not load closed only the ledger: the first tier's
    model and batching worker stayed up, with no engine to close them ('Task was destroyed but it is pending!'
    once collected), each failed open leaking one more model. They are closed before the error is raised."""
    from cascade.errors import ConfigError

    before = _model_workers()
    cfg = make_config(tmp_path, [tier("small"), tier("broken", model=str(tmp_path / "no-such-model"))])
    with pytest.raises(ConfigError, match="no-such-model") as err:
        await Engine.open(cfg, preload=True)
    assert "tier 'broken'" in str(err.value)  # (err holds the failed open's frames, and so its engine)
    assert _model_workers() - before == set()


async def test_start_names_only_this_engines_tiers_and_loads_nothing_once_closed(tmp_path, smol_path):
    """``start(["nope"])`` was a raw KeyError, ``start("small")`` looked for a tier 's', and ``start()`` after
    ``close()`` loaded every tier's model again into an engine nothing would close. Each is refused, in our
    errors, before anything loads."""
    from cascade.errors import UnknownModelError

    before = _model_workers()
    eng = await Engine.open(make_config(tmp_path, [tier("small")]))
    try:
        with pytest.raises(UnknownModelError, match=r"tier 'nope' does not exist; tiers: small") as err:
            await eng.start(["nope"])
        assert err.value.param == "names"
        with pytest.raises(InvalidRequestError, match=r"start\(\['small'\]\)"):
            await eng.start("small")
    finally:
        await eng.close()
    with pytest.raises(EngineClosedError):
        await eng.start()
    assert _model_workers() - before == set()


async def test_a_start_under_way_as_the_engine_closes_loads_no_tier_after_the_close(tmp_path, smol_path):
    """``start(["b", "a"])`` awaited in a task while ``close()`` ran: the close closed tier a (not loaded yet), then
    waited for b's load; the start then went on to load a, whose model and batching worker outlived the engine.
    The start stops at the close, in ``EngineClosedError``, and every tier loaded is closed."""
    before = _model_workers()
    eng = await Engine.open(make_config(tmp_path, [tier("a"), tier("b")]))
    starting = asyncio.ensure_future(eng.start(["b", "a"]))
    await asyncio.sleep(0.05)  # (b is loading)
    await eng.close()
    with pytest.raises(EngineClosedError):
        await starting
    assert _model_workers() - before == set()
    assert all(t.backend._model is None for t in eng.tiers.values())


async def test_feedback_in_code_is_held_to_the_http_rules_and_drops_a_wrong_answer_from_the_cache(tmp_path, servers):
    """A program labelled answers through ``engine.ledger.add_feedback``: any score was stored (5, True), a refused
    request labelled, a wrong answer still served from the response cache. ``Engine.feedback`` does what
    ``POST /v1/feedback`` does, with the same checks."""
    from cascade.errors import NotFoundError

    async with await Engine.open(config(tmp_path, servers, cache={"enabled": True})) as eng:
        first = await eng.run(Q)
        hit = await eng.run(Q)
        assert hit.record.cached_from == first.record.request_id
        for score, param in ((5, "score"), (True, "score"), (1.0, "score"), ("1", "score")):
            with pytest.raises(InvalidRequestError) as err:
                await eng.feedback(first.record.request_id, score)
            assert err.value.param == param
        with pytest.raises(InvalidRequestError) as err:
            await eng.feedback(first.record.request_id, 1, "x" * 4001)
        assert err.value.param == "comment"
        with pytest.raises(NotFoundError):
            await eng.feedback("no-such-request", 1)
        with pytest.raises(NotFoundError):  # another key's request is as good as missing
            await eng.feedback(first.record.request_id, 1, api_key_id="someone-else")
        with pytest.raises(InvalidRequestError):
            await eng.run(Q.with_(max_tokens=0), request_id="refused")
        with pytest.raises(InvalidRequestError) as err:
            await eng.feedback("refused", -1)
        assert err.value.code == "request_not_answered"
        # a thumbs-down on the hit labels the answer it served, its original's, which leaves the cache
        fb = await eng.feedback(hit.record.request_id, -1, "wrong city")
        assert (fb.request_id, fb.score, fb.answered_by) == (hit.record.request_id, -1, first.record.request_id)
        before = calls(servers)
        again = await eng.run(Q)
        assert again.record.cached_from is None and calls(servers) > before
    assert rows(tmp_path, "SELECT request_id, score, comment FROM feedback") == [
        (hit.record.request_id, -1, "wrong city")]
