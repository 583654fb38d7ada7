"""Request limits: a key's requests per minute and requests in flight, the server's requests in flight.

The limiter on its own with a controlled clock, then the endpoint on a real uvicorn server in front of a
real OpenAI-protocol server on loopback (tests/fault_server.py), with a real SQLite ledger.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import pytest

from cascade.errors import RequestLimitError, ServerOverloadedError
from cascade.limits import Admission, SpendHolds, reset_text
from serving.auth import hash_key
from tests.conftest import make_config
from tests.fault_server import FaultServerThread
from tests.pg import postgres  # noqa: F401 - fixture


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_is_a_sliding_window_and_a_refusal_takes_nothing():
    clock = Clock()
    adm = Admission(clock)
    heads = []
    for _ in range(3):
        heads.append(dict(adm.admit("k", requests_per_minute=3).headers))
        clock.t += 10
    assert [h[b"x-ratelimit-remaining-requests"] for h in heads] == [b"2", b"1", b"0"]
    assert heads[0][b"x-ratelimit-limit-requests"] == b"3" and heads[0][b"x-ratelimit-reset-requests"] == b"1m0s"
    with pytest.raises(RequestLimitError) as err:         # t = 1030: the first leaves the window at 1060
        adm.admit("k", requests_per_minute=3)
    assert err.value.retry_after == pytest.approx(30.0) and err.value.status_code == 429
    assert err.value.code == "rate_limit_exceeded" and "3 requests per minute" in err.value.message
    assert dict(err.value.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    adm.admit("other", requests_per_minute=3)             # each key has its own window
    clock.t = 1060.0
    assert dict(adm.admit("k", requests_per_minute=3).headers)[b"x-ratelimit-remaining-requests"] == b"0"
    with pytest.raises(RequestLimitError):                # the refused one at 1030 took no place
        adm.admit("k", requests_per_minute=3)
    assert dict(adm.admit("k", requests_per_minute=5).headers)[b"x-ratelimit-remaining-requests"] == b"1"


def test_in_flight_limits_per_key_and_per_server_hold_until_released():
    adm = Admission(Clock())
    a1 = adm.admit("a", max_concurrent=2, server_max_concurrent=3)
    a2 = adm.admit("a", max_concurrent=2, server_max_concurrent=3)
    with pytest.raises(RequestLimitError) as err:
        adm.admit("a", max_concurrent=2, server_max_concurrent=3)
    assert err.value.code == "concurrency_limit_exceeded" and err.value.retry_after == 1.0
    b1 = adm.admit("b", max_concurrent=2, server_max_concurrent=3)
    with pytest.raises(ServerOverloadedError) as over:
        adm.admit("c", server_max_concurrent=3)
    assert over.value.status_code == 503 and over.value.code == "server_overloaded"
    a1.release()
    a1.release()                                         # idempotent
    assert adm.in_flight == 2
    adm.admit("a", max_concurrent=2, server_max_concurrent=3).release()
    for t in (a2, b1):
        t.release()
    assert adm.in_flight == 0 and adm.admit(None).headers == []  # no limits: no headers (still counted in flight)


async def test_spend_holds_release_in_the_ledger_only_what_no_row_will(tmp_path):
    """An admitted request's hold is the ledger's (written by the admission's transaction); the process only
    remembers the requests whose rows are not queued, and deletes the hold of one that ends without a row.
    Once its row is queued, that write deletes it (or, failed, leaves it counted for the day)."""
    from cascade.ledger import Ledger, utc_day_start

    async with Ledger(tmp_path / "ledger.sqlite") as led:
        h = SpendHolds()
        h.ledger = led
        key = ("key", "k")
        for rid in ("r1", "r2", "r3"):
            _, ok = await led.admit_spend(rid, [key], 0.25, utc_day_start(), lambda figures: True)
            assert ok
            h.hold(rid)
        assert len(h) == 3

        async def holds() -> list[str]:
            return sorted(r[0] for r in await led.query("SELECT hold_id FROM spend_holds"))

        h.release("r1")                                   # refused after admission: no row will come
        h.release("r1")                                   # idempotent
        h.release("unknown")
        h.submitted("r2")
        h.release("r2", unless_submitted=True)            # its row is on the way: its write deletes the hold
        h.release("r3", unless_submitted=True)            # the response ended without a row
        assert await holds() == ["r2"] and len(h) == 1
        h.release("r2")                                   # (its write failed: the hold stays, counted today)
        assert await holds() == ["r2"] and len(h) == 0


def test_tokens_per_minute_is_a_sliding_window_of_what_requests_ask():
    clock = Clock()
    adm = Admission(clock)
    h = dict(adm.admit("k", tokens_per_minute=100, tokens=60).headers)
    assert h[b"x-ratelimit-limit-tokens"] == b"100" and h[b"x-ratelimit-remaining-tokens"] == b"40"
    assert h[b"x-ratelimit-reset-tokens"] == b"1m0s"
    clock.t += 20
    adm.admit("k", tokens_per_minute=100, tokens=30)
    clock.t += 10                                          # t = 1030: 90 used, the 60 leave at 1060
    with pytest.raises(RequestLimitError) as err:
        adm.admit("k", tokens_per_minute=100, tokens=20)
    assert err.value.error_type == "tokens" and err.value.code == "rate_limit_exceeded"
    assert err.value.retry_after == pytest.approx(30.0) and err.value.should_retry is None
    assert dict(err.value.headers)[b"x-ratelimit-remaining-tokens"] == b"10"
    adm.admit("k", tokens_per_minute=100, tokens=10)       # what fits still goes (the refused took nothing)
    with pytest.raises(RequestLimitError) as big:          # more than a whole minute's worth: never
        adm.admit("other", tokens_per_minute=100, tokens=101)
    assert big.value.should_retry is False and "request too large" in big.value.message
    clock.t = 1060.0                                       # the 60 left the window
    assert dict(adm.admit("k", tokens_per_minute=100, tokens=50).headers)[b"x-ratelimit-remaining-tokens"] == b"10"
    both = dict(adm.admit("k", requests_per_minute=10, tokens_per_minute=1000, tokens=1).headers)
    assert b"x-ratelimit-remaining-requests" in both and b"x-ratelimit-remaining-tokens" in both


def test_a_refusal_by_either_limit_carries_both_limits_headers():
    """As OpenAI's 429s do: a refusal for requests says what is left of the tokens too, and the other way."""
    clock = Clock()
    adm = Admission(clock)
    adm.admit("k", requests_per_minute=2, tokens_per_minute=100, tokens=70)
    with pytest.raises(RequestLimitError) as by_tokens:
        adm.admit("k", requests_per_minute=2, tokens_per_minute=100, tokens=40)
    names = [name for name, _ in by_tokens.value.headers]
    assert len(names) == len(set(names)) == 6  # each limit's three, once
    h = dict(by_tokens.value.headers)
    assert by_tokens.value.error_type == "tokens"
    assert h[b"x-ratelimit-remaining-requests"] == b"1" and h[b"x-ratelimit-remaining-tokens"] == b"30"
    clock.t += 61                                          # the 70 tokens have left the window
    adm.admit("k", requests_per_minute=2, tokens_per_minute=100, tokens=5)
    adm.admit("k", requests_per_minute=2, tokens_per_minute=100, tokens=5)
    clock.t += 1
    with pytest.raises(RequestLimitError) as by_requests:
        adm.admit("k", requests_per_minute=2, tokens_per_minute=100, tokens=5)
    names = [name for name, _ in by_requests.value.headers]
    assert len(names) == len(set(names)) == 6
    h = dict(by_requests.value.headers)
    assert by_requests.value.error_type != "tokens" and "requests per minute" in by_requests.value.message
    assert h[b"x-ratelimit-remaining-requests"] == b"0" and h[b"x-ratelimit-remaining-tokens"] == b"90"
    assert h[b"x-ratelimit-reset-tokens"] == b"59s" and h[b"x-ratelimit-reset-requests"] == b"59s"


def test_a_daily_limit_is_reached_by_a_float_sum_that_equals_it():
    """0.024 + 0.204 is 0.22799999999999998 in floats: a request costing that has reached a $0.228 limit (one
    more request went through); a tiny limit is still not reached by nothing."""
    from serving.routes import spend_reached

    assert 0.024 + 0.204 < 0.228 and spend_reached(0.024 + 0.204, 0.228)
    assert not spend_reached(0.0, 1e-9) and not spend_reached(0.2279, 0.228) and spend_reached(0.3, 0.228)


def test_reset_text_is_openais_format():
    assert [reset_text(s) for s in (0.0171, 0.9999, 1.0, 20.2, 60.0, 361.0)] == \
        ["18ms", "1000ms", "1s", "21s", "1m0s", "6m1s"]


# --- on the endpoint --------------------------------------------------------------------------------

KEY, OTHER = "sk-limited", "sk-other"


@pytest.fixture
def upstream():
    with FaultServerThread() as fs:
        yield fs


def _config(tmp_path, fs, **server):
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": fs.base_url}}
    return make_config(tmp_path, [remote], server={"max_concurrent_requests": 3, **server},
                       user_tiers={"limited": {"requests_per_minute": 3, "max_concurrent_requests": 2}, "open": {}},
                       auth={"keys": [{"id": "k-limited", "sha256": hash_key(KEY), "user_tier": "limited"},
                                      {"id": "k-other", "sha256": hash_key(OTHER), "user_tier": "open"}]})


BODY = {"model": "cascade", "messages": [{"role": "user", "content": "hi"}]}


def _in_flight(metrics: httpx.Response) -> float:
    """The ``cascade_requests_in_flight`` gauge of a /metrics page."""
    return float(next(line.split()[1] for line in metrics.text.splitlines()
                      if line.startswith("cascade_requests_in_flight ")))


def test_a_key_over_its_rate_gets_429_with_openais_headers_and_a_ledger_row(tmp_path, upstream, serve_app):
    srv = serve_app(_config(tmp_path, upstream))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        ok = [c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"}) for _ in range(3)]
        assert [r.status_code for r in ok] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
        assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in ok)
        r = c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
        assert 50 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining-requests"] == "0"
        refused_id = r.headers["x-request-id"]
        # another key, whose user tier has no rate limit, is not held back (nor told about limits)
        other = c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {OTHER}"})
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
    assert upstream.stats()["requests"] == 4              # the refused request never reached a tier
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        row = db.execute("SELECT status, error_class, api_key_id, n_attempts FROM requests WHERE request_id=?",
                         (refused_id,)).fetchone()
    assert row == ("error", "RequestLimitError", "k-limited", 0)


def test_a_request_refused_before_admission_takes_no_place_in_the_window(tmp_path, upstream, serve_app):
    """A key over its daily spend is told so (until midnight UTC), every time: its refusals neither use up its
    requests per minute nor turn into a rate-limit 429 that says to retry in a minute."""
    cfg = _config(tmp_path, upstream)
    cfg.user_tiers["limited"] = cfg.user_tiers["limited"].model_copy(update={"daily_spend_limit_usd": 1e-9})
    srv = serve_app(cfg)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        first = c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "2"
        for _ in range(4):
            r = c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "daily_spend_limit", r.text
            assert r.headers["x-should-retry"] == "false" and "x-ratelimit-remaining-requests" not in r.headers


async def test_in_flight_limits_refuse_at_once_and_free_their_slots_when_answered(tmp_path, upstream, serve_app):
    upstream.faults(delay_s=1.0)                          # every answer takes a second
    srv = serve_app(_config(tmp_path, upstream, max_concurrent_requests=3))
    lim, oth = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {OTHER}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        slow = [asyncio.create_task(c.post("/v1/chat/completions", json=BODY, headers=lim)) for _ in range(2)]
        slow.append(asyncio.create_task(c.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=oth)))
        while upstream.stats()["requests"] < 3:
            await asyncio.sleep(0.02)
        assert _in_flight(await c.get("/metrics")) == 3   # what an operator sees on /metrics meanwhile
        third = await c.post("/v1/chat/completions", json=BODY, headers=lim)   # the key has 2 in flight
        assert third.status_code == 429 and third.json()["error"]["code"] == "concurrency_limit_exceeded"
        over = await c.post("/v1/chat/completions", json=BODY, headers=oth)    # the server has 3 in flight
        assert over.status_code == 503 and over.json()["error"]["code"] == "server_overloaded"
        assert over.headers["retry-after"] == "1"
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200, 200]
        after = await c.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=oth)
        assert after.status_code == 200 and "data: [DONE]" in after.text  # every slot came back, streams' too
        assert _in_flight(await c.get("/metrics")) == 0
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        classes = sorted(r[0] for r in db.execute("SELECT error_class FROM requests WHERE status = 'error'"))
    assert classes == ["RequestLimitError", "ServerOverloadedError"]


async def test_a_reload_that_limits_a_keys_requests_in_flight_counts_those_already_running(tmp_path, upstream,
                                                                                           serve_app):
    """A key without an in-flight limit is given one by a reload while 3 of its requests run: the limit holds
    for the next request, which sees those 3 (they were not counted, so 2 more were let through to the tier)."""
    import yaml

    upstream.faults(delay_s=1.0)                          # every answer takes a second
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "options": {"base_url": upstream.base_url}}
    data = {"ledger": {"path": str(tmp_path / "ledger.sqlite")}, "tiers": [remote],
            "policies": {"cascade": {"chain": ["remote"]}}, "user_tiers": {"std": {}, "ops": {"admin": True}},
            "auth": {"keys": [{"id": "k", "sha256": hash_key(KEY), "user_tier": "std"},
                              {"id": "ops", "sha256": hash_key(OTHER), "user_tier": "ops"}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    srv = serve_app(make_config(tmp_path, **{k: v for k, v in data.items() if k != "ledger"}), config_path=str(path))
    key = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        running = [asyncio.create_task(c.post("/v1/chat/completions", json=BODY, headers=key)) for _ in range(3)]
        while upstream.stats()["requests"] < 3:
            await asyncio.sleep(0.02)
        data["user_tiers"]["std"] = {"max_concurrent_requests": 2}
        path.write_text(yaml.safe_dump(data))
        r = await c.post("/admin/reload", headers={"authorization": f"Bearer {OTHER}"})
        assert r.status_code == 200 and r.json()["not_applied"] == [], r.text
        more = await c.post("/v1/chat/completions", json=BODY, headers=key)
        assert more.status_code == 429 and more.json()["error"]["code"] == "concurrency_limit_exceeded", more.text
        assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200, 200]
        assert (await c.post("/v1/chat/completions", json=BODY, headers=key)).status_code == 200  # slots freed
    assert upstream.stats()["requests"] == 4


def test_each_end_user_of_a_key_has_its_own_daily_spend_limit(tmp_path, upstream, serve_app):
    """``end_user_daily_spend_limit_usd``: the end users a key names (``user``) are limited one by one, within
    that key; requests naming no user, other users and other keys' users of the same name go on."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"app": {"end_user_daily_spend_limit_usd": 1e-9}},
                                auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "app"},
                                               {"id": "k2", "sha256": hash_key(OTHER), "user_tier": "app"}]}))

    def ask(c: httpx.Client, key: str, user: str | None) -> httpx.Response:
        return c.post("/v1/chat/completions", json={**BODY, **({"user": user} if user else {})},
                      headers={"authorization": f"Bearer {key}"})

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert ask(c, KEY, "alice").status_code == 200          # nothing spent yet today
        refused = ask(c, KEY, "alice")
        assert refused.status_code == 429, refused.text
        err = refused.json()["error"]
        assert err["code"] == "end_user_daily_spend_limit" and "of user 'alice'" in err["message"]
        assert refused.headers["x-should-retry"] == "false" and 0 < int(refused.headers["retry-after"]) <= 86400
        assert [ask(c, k, u).status_code for k, u in ((KEY, "bob"), (KEY, None), (KEY, None), (OTHER, "alice"))] \
            == [200, 200, 200, 200]
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        row = db.execute("SELECT status, error_class, api_key_id, end_user FROM requests WHERE request_id=?",
                         (refused.headers["x-request-id"],)).fetchone()
    assert row == ("error", "BudgetExceededError", "k1", "alice")


def test_the_anonymous_user_tiers_daily_spend_limit_holds_for_the_keyless_requests(tmp_path, upstream, serve_app):
    """A server without keys (``anonymous_user_tier``): its requests share one daily spend limit, as they share
    its other limits (it was never checked)."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"open": {"daily_spend_limit_usd": 1e-9}},
                                auth={"anonymous_user_tier": "open"}))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=BODY).status_code == 200  # nothing spent yet today
        refused = c.post("/v1/chat/completions", json=BODY)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "daily_spend_limit", refused.text
    assert upstream.stats()["requests"] == 1


async def _until_spent_today(ask, most: int) -> httpx.Response:  # noqa: ANN001
    """Ask (``ask()``: one request) until the committed spend itself reaches the daily limit, at most ``most``
    times: each answer before it a 200, then a 429 saying so, returned."""
    for _ in range(most):
        r = await ask()
        if r.status_code == 429:
            assert "spent today" in r.json()["error"]["message"], r.text
            return r
        assert r.status_code == 200, r.text
    pytest.fail("the daily limit never applied")


@pytest.mark.parametrize(("limit_of", "priced_by"), [("key", "tier"), ("end_user", "tier"), ("key", "provider")])
async def test_a_burst_in_flight_cannot_spend_past_a_daily_limit(tmp_path, upstream, serve_app, limit_of, priced_by):
    """Each admitted request holds its worst case (every tier's prompt and max_tokens, at its dearest
    provider's price) until its ledger row is committed, so a burst arriving together is admitted only as
    far as the limit: the rest get a 429 to retry shortly (not a come-back-tomorrow), and the day's spend
    ends within one request of the limit."""
    from serving.protocol import ChatCompletionRequest

    price = {"input_per_1m": 1.0, "output_per_1m": 2.0}
    remote = {"name": "remote", "max_tokens": 4, "threshold": 0.0}
    if priced_by == "tier":
        remote.update(backend="openai", model="m", price=price, options={"base_url": upstream.base_url})
    else:  # the tier's own price is 0; its only provider bills (a hosted fallback, as in failure-handling.md)
        remote["providers"] = [{"name": "hosted", "backend": "openai", "model": "m", "price": price,
                                "options": {"base_url": upstream.base_url}}]
    req = ChatCompletionRequest.model_validate(BODY).to_engine()
    ceiling = (req.rough_prompt_tokens() * 1.0 + 4 * 2.0) / 1e6     # the one tier's prompt and 4 tokens
    field = "daily_spend_limit_usd" if limit_of == "key" else "end_user_daily_spend_limit_usd"
    limit = 2.5 * ceiling                                 # holds: 0 < 2.5, 1 < 2.5, 2 < 2.5, then 3 >= 2.5
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"capped": {field: limit}},
                                auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]}))
    engine, holds = srv.config.app.state.engine, srv.config.app.state.spend_holds
    assert await engine.cost_ceiling(req, "cascade") == pytest.approx(ceiling)
    body = {**BODY, "user": "alice"}
    head = {"authorization": f"Bearer {KEY}"}
    upstream.faults(delay_s=1.0)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        burst = await asyncio.gather(*(c.post("/v1/chat/completions", json=body, headers=head) for _ in range(6)))
        codes = sorted(r.status_code for r in burst)
        assert codes == [200, 200, 200, 429, 429, 429], [r.text for r in burst]
        for r in burst:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["code"] == ("daily_spend_limit" if limit_of == "key" else "end_user_daily_spend_limit")
                assert "requests in flight" in err["message"] and r.headers["retry-after"] == "1"
                assert r.headers.get("x-should-retry") != "false"   # the SDK's own retry may take it
        upstream.faults(delay_s=0.0)
        r = await _until_spent_today(lambda: c.post("/v1/chat/completions", json=body, headers=head), 20)
        assert r.headers["x-should-retry"] == "false"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        spent = db.execute("SELECT SUM(cost_usd) FROM requests").fetchone()[0]
        refused = db.execute("SELECT COUNT(*) FROM requests WHERE error_class='BudgetExceededError'").fetchone()[0]
    assert limit <= spent <= limit + ceiling and refused == 4
    assert len(holds) == 0                                # every hold ended with its row


async def test_a_hold_ends_when_its_client_leaves(tmp_path, upstream, serve_app):
    """A request whose client goes away is recorded as cancelled, and its hold ends with that row: the key is
    not left blocked by spend that will never come."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": 1e-9}},
                                auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]}))
    holds = srv.config.app.state.spend_holds
    head = {"authorization": f"Bearer {KEY}"}
    upstream.faults(delay_s=5.0)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        task = asyncio.create_task(c.post("/v1/chat/completions", json=BODY, headers=head))
        while upstream.stats()["requests"] < 1:
            await asyncio.sleep(0.02)
        assert len(holds) == 1
        busy = await c.post("/v1/chat/completions", json=BODY, headers=head)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        task.cancel()
        for _ in range(200):
            if len(holds) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(holds) == 0
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        statuses = sorted(r[0] for r in db.execute("SELECT status FROM requests"))
    assert statuses == ["cancelled", "error"]


async def test_a_limit_reached_for_the_day_is_said_even_while_another_is_only_held(tmp_path, upstream, serve_app):
    """An end user over their own limit is told to come back tomorrow, not to retry in a second because the
    key's limit is momentarily full of another user's requests in flight."""
    from serving.protocol import ChatCompletionRequest

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    req = ChatCompletionRequest.model_validate(BODY).to_engine()
    ceiling = (req.rough_prompt_tokens() * 1.0 + 4 * 2.0) / 1e6
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": 2.5 * ceiling,
                                                                          "end_user_daily_spend_limit_usd": 1e-9}},
                                auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]}))
    head = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json={**BODY, "user": "alice"}, headers=head)).status_code == 200
        upstream.faults(delay_s=2.0)
        bob = [asyncio.create_task(c.post("/v1/chat/completions", json={**BODY, "user": f"bob{i}"}, headers=head))
               for i in range(2)]
        while upstream.stats()["requests"] < 3:
            await asyncio.sleep(0.02)
        alice = await c.post("/v1/chat/completions", json={**BODY, "user": "alice"}, headers=head)
        assert alice.status_code == 429 and alice.json()["error"]["code"] == "end_user_daily_spend_limit"
        assert alice.headers["x-should-retry"] == "false" and int(alice.headers["retry-after"]) > 1
        carol = await c.post("/v1/chat/completions", json={**BODY, "user": "carol"}, headers=head)
        assert carol.status_code == 429 and carol.json()["error"]["code"] == "daily_spend_limit"   # the key's,
        assert carol.headers["retry-after"] == "1"                                                # held only
        assert [r.status_code for r in await asyncio.gather(*bob)] == [200, 200]


def test_a_key_over_its_tokens_per_minute_gets_429_with_openais_token_headers(tmp_path, upstream, serve_app):
    """``tokens_per_minute`` counts each request's prompt and its max_tokens (the tier's when it names none),
    as OpenAI counts them; over it: 429 of type ``tokens`` with the ``x-ratelimit-*-tokens`` headers."""
    from serving.protocol import ChatCompletionRequest

    prompt = ChatCompletionRequest.model_validate(BODY).to_engine().rough_prompt_tokens()
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    limit = 2 * (prompt + 4) + prompt + 1                 # two requests as they come, then one with max_tokens 1
    srv = serve_app(make_config(tmp_path, [remote], user_tiers={"t": {"tokens_per_minute": limit}},
                                auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "t"}]}))
    head = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        unknown = c.post("/v1/chat/completions", json={**BODY, "model": "nope", "max_tokens": 3}, headers=head)
        assert unknown.status_code == 404                 # refused before it took a place in the window
        ok = [c.post("/v1/chat/completions", json=BODY, headers=head) for _ in range(2)]
        assert [r.status_code for r in ok] == [200, 200]
        assert [int(r.headers["x-ratelimit-remaining-tokens"]) for r in ok] == [2 * prompt + 5, prompt + 1]
        over = c.post("/v1/chat/completions", json=BODY, headers=head)
        assert over.status_code == 429, over.text
        err = over.json()["error"]
        assert err["type"] == "tokens" and err["code"] == "rate_limit_exceeded"
        assert "tokens per minute" in err["message"]
        assert over.headers["x-ratelimit-limit-tokens"] == str(limit) and 50 <= int(over.headers["retry-after"]) <= 60
        fits = c.post("/v1/responses", json={"model": "cascade", "input": "hi", "max_output_tokens": 1}, headers=head)
        assert fits.status_code == 200 and fits.headers["x-ratelimit-remaining-tokens"] == "0", fits.text
        huge = c.post("/v1/chat/completions", json={**BODY, "max_tokens": limit}, headers=head)
        assert huge.status_code == 429 and huge.headers["x-should-retry"] == "false"
        assert "retry-after" not in huge.headers          # no time would make it fit
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        refused = db.execute("SELECT COUNT(*) FROM requests WHERE error_class='RequestLimitError'").fetchone()[0]
    assert refused == 2 and upstream.stats()["requests"] == 3
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # the unknown model is in the ledger all the same
        assert db.execute("SELECT status, error_class, policy FROM requests WHERE request_id=?",
                          (unknown.headers["x-request-id"],)).fetchone() == ("error", "UnknownModelError", "nope")


async def test_replicas_sharing_a_ledger_count_each_others_requests_in_flight(tmp_path, upstream, serve_app):
    """Two servers on one ledger file (two replicas): each admitted request's worst case is written to the ledger
    as it is admitted, so a burst at the second server while the first's requests are in flight is held back by
    them (before, each replica saw only its own, and a burst split between N replicas spent N times the limit),
    and the day's spend ends within one request of the limit; every hold ends with its row."""
    from serving.protocol import ChatCompletionRequest

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    ceiling = (ChatCompletionRequest.model_validate(BODY).to_engine().rough_prompt_tokens() + 4 * 2.0) / 1e6
    limit = 2.5 * ceiling                                 # one server alone admits 3 at once
    cfg = make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": limit}},
                      auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]})
    first, second = serve_app(cfg), serve_app(cfg)
    head = {"authorization": f"Bearer {KEY}"}
    upstream.faults(delay_s=1.5)
    async with httpx.AsyncClient(timeout=30) as c:
        async def ask(srv) -> httpx.Response:  # noqa: ANN001
            return await c.post(f"{srv.url}/v1/chat/completions", json=BODY, headers=head)

        burst = [asyncio.create_task(ask(first)) for _ in range(3)]
        with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
            for _ in range(200):                          # the first server's three holds are in the ledger
                if db.execute("SELECT COUNT(*) FROM spend_holds").fetchone()[0] == 3:
                    break
                await asyncio.sleep(0.02)
            else:  # pragma: no cover
                pytest.fail("the holds were not written")
        other = await asyncio.gather(*(ask(second) for _ in range(3)))
        assert [r.status_code for r in other] == [429] * 3, [r.text for r in other]
        err = other[0].json()["error"]
        assert "requests in flight" in err["message"] and "held by 3 request(s)" in err["message"]
        assert other[0].headers["retry-after"] == "1"
        assert [r.status_code for r in await asyncio.gather(*burst)] == [200] * 3
        upstream.faults(delay_s=0.0)
        await _until_spent_today(lambda: ask(second), 10)  # the second goes on from the first's committed spend
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        spent = db.execute("SELECT SUM(cost_usd) FROM requests").fetchone()[0]
        assert db.execute("SELECT COUNT(*) FROM spend_holds").fetchone()[0] == 0
    assert limit <= spent <= limit + ceiling


async def test_a_stalled_spend_check_is_a_503_and_leaves_no_hold(tmp_path, upstream, serve_app, postgres):
    """The daily spend check is a ledger transaction: when it cannot run in time (here another session holds the
    key's day-total row on PostgreSQL), the request is refused with a 503 `ledger_unavailable` to repeat shortly
    (it was a 500), and the hold its transaction commits once the stall ends is released: the key is not left
    blocked for the day."""
    import psycopg

    from cascade.ledger import spend_bucket

    postgres.reset()
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    cfg = make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": 1.0}},
                      auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]},
                      ledger={"path": postgres.url, "timeout_s": 0.5})
    srv = serve_app(cfg)
    head = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json=BODY, headers=head)).status_code == 200
        with psycopg.connect(postgres.url) as blocker:
            blocker.execute("SELECT cost_usd FROM spend_daily WHERE bucket = %s FOR UPDATE",
                            (spend_bucket(("key", "k1")),))
            stalled = await c.post("/v1/chat/completions", json=BODY, headers=head)
            blocker.commit()
        assert stalled.status_code == 503 and stalled.json()["error"]["code"] == "ledger_unavailable", stalled.text
        for _ in range(200):
            with psycopg.connect(postgres.url) as db:
                if db.execute("SELECT COUNT(*) FROM spend_holds").fetchone()[0] == 0:
                    break
            await asyncio.sleep(0.02)
        else:  # pragma: no cover
            pytest.fail("the stalled request's hold was never released")
        # the stall marked the ledger not ready until a probe finds it answering again (a probe that meets the
        # ledger thread still busy, on a loaded machine, says so: requests meanwhile are told to repeat shortly)
        for _ in range(100):
            if (await c.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await c.post("/v1/chat/completions", json=BODY, headers=head)).status_code == 200


async def _a_request_whose_row_is_refused_for_good(c: httpx.AsyncClient, db: Path, head: dict) -> None:
    """Send one chat request whose ledger row the database refuses for good (a trigger: the row's own fault, never
    tried again): its client gets the 500; the trigger is gone afterwards."""
    with sqlite3.connect(db) as x:
        x.execute("CREATE TRIGGER refuse BEFORE INSERT ON requests BEGIN SELECT RAISE(ABORT, 'refused'); END")
    lost = await c.post("/v1/chat/completions", json=BODY, headers=head)
    assert lost.status_code == 500 and "refused" in lost.json()["error"]["message"], lost.text
    with sqlite3.connect(db) as x:
        x.execute("DROP TRIGGER refuse")


async def test_a_row_the_ledger_refuses_for_good_holds_its_cost_not_its_worst_case(tmp_path, upstream, serve_app):
    """A request whose row the database refuses for good (here a trigger: the row's own fault, never tried
    again) keeps its spend hold counted for the rest of the day, as the money was spent; it held its worst case
    (max_tokens at the output price, a hundred times what it cost), which kept the rest of the key's limit
    from it all day. Now the day's totals take what the request cost, and the hold goes."""
    from serving.protocol import ChatCompletionRequest

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 1000, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    ceiling = (ChatCompletionRequest.model_validate(BODY).to_engine().rough_prompt_tokens() + 1000 * 2.0) / 1e6
    cfg = make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": ceiling / 2}},
                      auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]})
    srv, db = serve_app(cfg), tmp_path / "ledger.sqlite"
    head = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        first = await c.post("/v1/chat/completions", json=BODY, headers=head)
        assert first.status_code == 200, first.text
        await _a_request_whose_row_is_refused_for_good(c, db, head)
        with sqlite3.connect(db) as x:
            (cost,) = x.execute("SELECT cost_usd FROM requests").fetchone()  # the first's: the same call
            assert 0 < cost < ceiling / 100
            # its cost is spent, in the day's totals beside the first's; no hold is left
            assert x.execute("SELECT cost_usd FROM spend_daily").fetchone() == (pytest.approx(2 * cost),)
            assert x.execute("SELECT COUNT(*) FROM spend_holds").fetchone() == (0,)
        after = await c.post("/v1/chat/completions", json=BODY, headers=head)  # 429 when the worst case stayed
        assert after.status_code == 200, after.text


async def test_the_cost_of_a_row_refused_for_good_is_spent_not_a_request_in_flight(tmp_path, upstream, serve_app):
    """The cost of a request whose row the database refused for good is spent: once it takes the key to its daily
    limit, the key is refused until 00:00 UTC, as for any spend. It was counted as a hold, so the 429 said
    'held by 1 request(s) not finished; retry once they are' with Retry-After: 1 and x-should-retry: true, and
    said so, every second, for the rest of the day."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    open_cfg = make_config(tmp_path / "probe", [remote])
    probe = serve_app(open_cfg)
    async with httpx.AsyncClient(base_url=probe.url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200
    with sqlite3.connect(tmp_path / "probe" / "ledger.sqlite") as x:
        (cost,) = x.execute("SELECT cost_usd FROM requests").fetchone()  # what each of these calls costs
    cfg = make_config(tmp_path, [remote], user_tiers={"capped": {"daily_spend_limit_usd": cost * 1.5}},
                      auth={"keys": [{"id": "k1", "sha256": hash_key(KEY), "user_tier": "capped"}]})
    srv, db = serve_app(cfg), tmp_path / "ledger.sqlite"
    head = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
        assert (await c.post("/v1/chat/completions", json=BODY, headers=head)).status_code == 200
        await _a_request_whose_row_is_refused_for_good(c, db, head)
        after = await c.post("/v1/chat/completions", json=BODY, headers=head)
    assert after.status_code == 429 and "not finished" not in after.json()["error"]["message"], after.text
    assert "reached" in after.json()["error"]["message"] and after.headers["x-should-retry"] == "false"
    assert int(after.headers["retry-after"]) > 1
    with sqlite3.connect(db) as x:
        assert x.execute("SELECT COUNT(*) FROM spend_holds").fetchone() == (0,)
