"""The response cache: the LRU on its own with a controlled clock, then the endpoint on a real uvicorn server
in front of a real OpenAI-protocol server on loopback (tests/fault_server.py), with a real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import httpx
import pytest
import yaml

from cascade.cache import CachedAnswer, ResponseCache, cache_key
from cascade.engine import Engine
from cascade.types import GenerationRequest, GenerationResult, Message, Usage
from serving.auth import hash_key
from serving.protocol import ChatCompletionRequest
from tests.conftest import chat_stream, make_config
from tests.fault_server import FaultServer, FaultServerThread


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _answer(i: int) -> CachedAnswer:
    res = GenerationResult(text=f"a{i}", tokens=(), finish_reason="stop", usage=Usage(3, 1), latency_s=0.1, model="m")
    return CachedAnswer(result=res, request_id=f"r{i}", tier="t", model="m", confidence=0.9, baseline_cost_usd=1e-5,
                        baseline_estimated=False)


def test_lru_with_a_time_to_live():
    clock = Clock()
    cache = ResponseCache(max_entries=2, ttl_s=10, clock=clock)
    cache.put("a", _answer(1))
    cache.put("b", _answer(2))
    assert cache.get("a").request_id == "r1"          # a is now the most recently used
    cache.put("c", _answer(3))                          # so b goes
    assert cache.get("b") is None and cache.get("c").request_id == "r3" and len(cache) == 2
    clock.t = 10.0
    assert cache.get("a") is None and len(cache) == 1   # expired, and dropped
    assert (cache.hits, cache.misses) == (2, 2)


def test_expired_answers_go_first_and_free_their_bytes():
    """``expire`` drops what is past its time to live, oldest stored first (a hit does not extend a life), so
    the size gauges count only live answers; a store drops the expired before it evicts a live answer."""
    clock = Clock()
    cache = ResponseCache(max_entries=2, ttl_s=10, clock=clock)
    cache.put("a", _answer(1))
    clock.t = 5.0
    cache.put("b", _answer(2))
    assert cache.get("a") is not None                   # a hit: most recently used, but no younger
    clock.t = 12.0
    assert cache.expire() == 1 and len(cache) == 1 and cache.get("b").request_id == "r2"
    assert cache.bytes > 0                              # b's size alone
    cache.put("a", _answer(1))                          # stored again at 12
    clock.t = 16.0                                      # b (stored at 5) has expired, a has not
    cache.put("c", _answer(3))                          # at the bound: the expired b goes, not the live a
    assert cache.get("a").request_id == "r1" and cache.get("c").request_id == "r3" and cache.get("b") is None
    clock.t = 100.0
    assert cache.expire() == 2 and len(cache) == 0 and cache.bytes == 0
    cache.put("d", _answer(4))
    cache.clear()
    assert cache.expire() == 0 and cache.bytes == 0


def test_a_thumbs_down_reaches_a_refreshed_answer_with_the_same_text():
    """A refresh (``Cache-Control: no-cache``) stores its answer under a newer request: feedback that an older
    request's answer was wrong still evicts it when the text is the same, and not when it changed. The same
    text is not stored again for ttl_s (an identical request in flight, or the next greedy miss, gives it
    again). What a key keeps of the answers it replaced is bounded, however often it is refreshed."""
    from cascade.cache import EARLIER_KEPT

    def ans(rid: str, text: str) -> CachedAnswer:
        res = GenerationResult(text=text, tokens=(), finish_reason="stop", usage=Usage(3, 1), latency_s=0.1, model="m")
        return CachedAnswer(result=res, request_id=rid, tier="t", model="m", confidence=0.9, baseline_cost_usd=1e-5,
                            baseline_estimated=False)

    clock = Clock()
    cache = ResponseCache(max_entries=10, ttl_s=100, clock=clock)
    cache.put("k", ans("p", "X"))
    cache.put("k", ans("r1", "X"))
    assert cache.forget("p") == 1 and cache.get("k") is None
    assert not cache.put("k", ans("r2", "X")) and cache.get("k") is None  # judged wrong: not stored again
    assert cache.put("k", ans("r3", "Y")) and cache.put("j", ans("r4", "X"))  # another text, another key: fine
    cache.clear()  # (a reload): r4's entry is gone, a thumbs-down on it still leaves its verdict
    assert cache.forget("r4") == 0 and not cache.put("j", ans("r5", "X"))
    clock.t += 100  # the verdict is let go with the answers of its time
    cache.put("k", ans("p", "X"))
    cache.put("k", ans("r1", "Y"))  # the refresh answered otherwise: a verdict on p's X drops nothing...
    assert cache.forget("p") == 0 and cache.get("k").request_id == "r1"
    assert not cache.put("k", ans("r2", "X"))  # ... but X is not stored under k again
    clock.t += 100
    cache.put("k", ans("q", "X"))
    cache.put("k", ans("r1", "Y"))
    cache.put("k", ans("r2", "X"))  # a refresh gave q's text again: a verdict on q reaches it
    assert cache.forget("q") == 1 and len(cache) == 0
    clock.t += 100
    for i in range(10 * EARLIER_KEPT):
        cache.put("k", ans(f"r{i}", "X"))
    assert len(cache._entries["k"][3]) == EARLIER_KEPT
    assert cache.bytes == cache._entries["k"][1] and cache.forget(f"r{9 * EARLIER_KEPT}") == 1


def test_a_cancelled_request_takes_out_its_own_answer_only():
    """``discard`` (the request's row was made cancelled: its client left before the answer went out) drops
    the answer that request stored, and never the one a later request (a refresh) stored under its key since:
    that answer went out, and its hits name a request the ledger holds as answered."""
    cache = ResponseCache(max_entries=10, ttl_s=100, clock=Clock())
    cache.put("k", _answer(1))
    cache.put("j", _answer(2))
    assert cache.discard("r2") == 1 and cache.get("j") is None and cache.discard("r2") == 0
    cache.put("k", _answer(3))  # a refresh of k: r3's answer replaces r1's
    assert cache.discard("r1") == 0 and cache.get("k").request_id == "r3"
    assert len(cache) == 1 and cache.bytes == cache._entries["k"][1]


def test_the_key_covers_what_shapes_the_answer_and_sampled_requests_have_none():
    base = GenerationRequest(messages=(Message("user", "hi"),), max_tokens=8)
    k = cache_key("cascade", "chat", base, user_tier=None, api_key_id=None)
    assert k == cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), max_tokens=8),
                          user_tier=None, api_key_id=None)
    variants = [
        cache_key("other", "chat", base, user_tier=None, api_key_id=None),
        cache_key("cascade", "completions", base, user_tier=None, api_key_id=None),
        cache_key("cascade", "chat", base, user_tier="free", api_key_id=None),
        cache_key("cascade", "chat", base, user_tier=None, api_key_id="k1"),
        cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi", name="ada"),), max_tokens=8),
                  user_tier=None, api_key_id=None),
        cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), max_tokens=9),
                  user_tier=None, api_key_id=None),
        cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), max_tokens=8, stop=("x",)),
                  user_tier=None, api_key_id=None),
        cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), max_tokens=8,
                                                       top_logprobs=2), user_tier=None, api_key_id=None),
    ]
    assert len({k, *variants}) == len(variants) + 1
    assert cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), temperature=0.7),
                     user_tier=None, api_key_id=None) is None
    # any sampling at all: even a low temperature's answer is not a function of the request
    assert cache_key("cascade", "chat", GenerationRequest(messages=(Message("user", "hi"),), temperature=0.1),
                     user_tier=None, api_key_id=None) is None


# --- on the endpoint --------------------------------------------------------------------------------

A, B, OPS = "sk-a", "sk-b", "sk-ops"
BODY = {"model": "cascade", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "logprobs": True, "top_logprobs": 2}


@pytest.fixture
def upstream():
    with FaultServerThread() as fs:
        yield fs


@pytest.fixture
def srv(tmp_path, upstream, serve_app):
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    extra = dict(cache={"enabled": True, "ttl_s": 600}, user_tiers={"std": {}, "ops": {"admin": True}},
                 auth={"keys": [{"id": "k-a", "sha256": hash_key(A), "user_tier": "std"},
                                {"id": "k-b", "sha256": hash_key(B), "user_tier": "std"},
                                {"id": "k-ops", "sha256": hash_key(OPS), "user_tier": "ops"}]})
    path = tmp_path / "c.yaml"

    def write(threshold: float) -> None:  # the config file a reload reads
        data = {"ledger": {"path": str(tmp_path / "ledger.sqlite")}, "tiers": [{**remote, "threshold": threshold}],
                "policies": {"cascade": {"chain": ["remote"]}}, **extra}
        path.write_text(yaml.safe_dump(data))

    write(0.0)
    server = serve_app(make_config(tmp_path, [remote], **extra), config_path=str(path))
    server.ledger_path = tmp_path / "ledger.sqlite"
    server.set_threshold = write
    return server


def post(c: httpx.Client, key: str = A, body: dict = BODY, **headers: str) -> httpx.Response:
    return c.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}", **headers})


def test_a_repeated_request_is_answered_from_the_cache_at_no_cost(srv, upstream):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        first = post(c)
        again = post(c)
        assert first.status_code == again.status_code == 200
        assert upstream.stats()["requests"] == 1              # the second never reached a tier
        f, a = first.json(), again.json()
        assert a["choices"] == f["choices"] and a["usage"] == f["usage"]  # the same answer, logprobs included
        assert a["id"] != f["id"] and again.headers["x-request-id"] != first.headers["x-request-id"]
        assert a["cascade"]["cached_from"] == f["cascade"]["request_id"] and f["cascade"]["cached_from"] is None
        assert again.headers["x-cascade-cached-from"] == first.headers["x-request-id"]
        assert a["cascade"]["cost_usd"] == 0 and a["cascade"]["attempts"] == [] and f["cascade"]["cost_usd"] > 0
        # the same answer as a stream, from the cache too
        with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True},
                      headers={"authorization": f"Bearer {A}"}) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        chunks = [json.loads(x[6:]) for x in lines]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        assert text == f["choices"][0]["message"]["content"] and upstream.stats()["requests"] == 1
        assert chunks[-1]["cascade"]["cached_from"] == f["cascade"]["request_id"]
        # not for another key (scope: key), nor a sampled request, nor a client that says no-cache / no-store
        post(c, key=B)
        post(c, body={**BODY, "temperature": 0.7})
        post(c, **{"cache-control": "no-cache"})            # answered afresh (and stored again)
        post(c, **{"cache-control": "no-store"})
        assert upstream.stats()["requests"] == 5
        metrics = c.get("/metrics").text
        # an answer streamed live is stored too: the same request whole is a hit
        with c.stream("POST", "/v1/chat/completions", json={**BODY, "max_tokens": 3, "stream": True},
                      headers={"authorization": f"Bearer {B}"}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        whole = post(c, key=B, body={**BODY, "max_tokens": 3})
        assert whole.json()["cascade"]["cached_from"] == r.headers["x-request-id"] and upstream.stats()["requests"] == 6
        assert whole.json()["choices"][0]["logprobs"]["content"]  # its tokens were kept
    assert 'cascade_cache_hits_total{policy="cascade"} 2.0' in metrics
    # held then: key A's answer (refreshed in place) and key B's
    assert "cascade_cache_entries 2.0" in metrics
    (held,) = [float(x.split()[1]) for x in metrics.splitlines() if x.startswith("cascade_cache_bytes ")]
    assert held > 1000
    with sqlite3.connect(srv.ledger_path) as db:
        rows = db.execute("SELECT request_id, cached_from, cost_usd, n_attempts, status, tier, baseline_cost_usd "
                          "FROM requests ORDER BY created_at").fetchall()
    assert len(rows) == 9
    assert [r[1] is not None for r in rows] == [False, True, True, False, False, False, False, False, True]
    paid = rows[0]
    for hit in (rows[1], rows[2]):
        assert hit[1] == paid[0] and hit[2] == 0 and hit[3] == 0 and hit[4] == "ok" and hit[5] == "remote"
        assert hit[6] == pytest.approx(paid[6])              # the saving: what the last tier would have cost


def test_cache_control_sent_as_several_lines_is_read_whole(srv, upstream):
    """A header sent as two lines means their comma-joined list (RFC 9110): ``no-store`` on the second line keeps
    the request out of the cache. Only the first line was read: such a request was answered from the cache."""
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert post(c).status_code == 200 and upstream.stats()["requests"] == 1
        r = c.post("/v1/chat/completions", json=BODY, headers=[("authorization", f"Bearer {A}"),
                                                               ("cache-control", "max-age=100"),
                                                               ("cache-control", "no-store")])
        assert r.status_code == 200 and "x-cascade-cached-from" not in r.headers
        assert upstream.stats()["requests"] == 2


def test_the_report_counts_hits_and_keeps_them_out_of_the_escalation_rate(srv, capsys):
    from cascade.cli import main

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(3):
            assert post(c).status_code == 200
    assert main(["report", "--json", "--ledger", str(srv.ledger_path)]) == 0
    tot = json.loads(capsys.readouterr().out)["total"]
    assert (tot["requests"], tot["answered"], tot["cache_hits"], tot["spend_usd"] > 0) == (3, 3, 2, True)
    assert tot["escalation_rate"] == 0.0 and tot["savings_usd"] > tot["baseline_usd"] / 2


def _leave_at_once(url: str, body: dict) -> None:
    """A streamed request whose client closes its connection as soon as it is sent (a browser tab closed, a
    retrying client that gave up): the server sees it gone before the first byte of the answer goes out."""
    import socket

    data = json.dumps({**body, "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + A.encode() + b"\r\ncontent-length: " + str(len(data)).encode()
                  + b"\r\n\r\n" + data)


def _hits_left_before_their_answer(srv, c: httpx.Client, n: int = 2) -> None:
    """Pay for BODY's answer, then send streamed hits of it whose clients leave at once until ``n`` of them left
    before any of it went out (rows made ``cancelled``), then one hit answered."""
    import time

    assert post(c).status_code == 200  # paid: the answer is stored
    left = 0
    for i in range(40):  # as many as it takes for n to leave before their answer's first byte
        _leave_at_once(srv.url, BODY)
        for _ in range(100):  # its row is written as served, then corrected once the server sees it gone
            with sqlite3.connect(srv.ledger_path) as db:
                rows = db.execute("SELECT status, cached_from IS NOT NULL FROM requests").fetchall()
            if len(rows) == i + 2:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # (the correction, queued on the ledger thread after the row)
        with sqlite3.connect(srv.ledger_path) as db:
            rows = db.execute("SELECT status, cached_from IS NOT NULL FROM requests").fetchall()
        left = rows.count(("cancelled", 1))
        if left >= n:
            break
    assert left >= n, rows
    assert post(c).status_code == 200  # a hit answered
    time.sleep(0.5)  # (the last correction, queued on the ledger thread)


def test_a_hit_whose_client_left_before_its_answer_is_no_cache_hit_in_the_report(srv, capsys):
    """A streamed hit whose client left before any of it went out is made ``cancelled``: it answered nobody.
    The report counted every row with ``cached_from`` a cache hit, so such rows were "answered requests served
    by the cache" that were in no answered count, and the escalation rate, over answered requests but hits,
    lost them from its denominator: -0.0 here, above 100% on a ledger with escalations (a live server, 10
    abandoned hits among 40 requests: cascade 111.1%). A hit is counted among the answered hits only."""
    from cascade.cli import main

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        _hits_left_before_their_answer(srv, c)
    with sqlite3.connect(srv.ledger_path) as db:
        rows = db.execute("SELECT status, cached_from IS NOT NULL FROM requests").fetchall()
    answered_hits = sum(1 for s, hit in rows if hit and s in ("ok", "partial"))
    assert main(["report", "--json", "--ledger", str(srv.ledger_path)]) == 0
    tot = json.loads(capsys.readouterr().out)["total"]
    assert tot["cancelled"] == rows.count(("cancelled", 1)) >= 2
    assert tot["cache_hits"] == answered_hits >= 1 and tot["cache_hits"] <= tot["answered"]
    assert tot["escalation_rate"] == 0.0  # one answer a tier gave, not escalated


def test_a_hit_whose_client_left_before_its_answer_is_no_cache_hit_in_metrics(srv):
    """``cascade_cache_hits_total`` counts the hits that answered, as the report's cache_hits does: a streamed
    hit whose client left before any of it went out (its row made ``cancelled``) was counted when its row was
    written as served, and no counter said it was taken back."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        _hits_left_before_their_answer(srv, c)
        samples = [s for fam in text_string_to_metric_families(c.get("/metrics").text) for s in fam.samples]
    with sqlite3.connect(srv.ledger_path) as db:
        rows = db.execute("SELECT status FROM requests WHERE cached_from IS NOT NULL").fetchall()
    hits = sum(s.value for s in samples if s.name == "cascade_cache_hits_total")
    assert ("cancelled",) in rows
    assert hits == sum(1 for (s,) in rows if s in ("ok", "partial")) >= 1, rows


def test_an_answer_a_cost_budget_cut_short_is_not_stored(tmp_path, upstream, serve_app):
    """``on_cost_budget: truncate`` lowers max_tokens to what this caller's budget pays for: the cut answer is
    shaped by that budget, not the policy, so it is not served to the next caller (nor after the budget rises)."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 8, "threshold": 0.0,
              "price": {"input_per_1m": 0.0, "output_per_1m": 1000.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], cache={"enabled": True},
                                user_tiers={"std": {"cost_budget_usd": 0.0025, "on_cost_budget": "truncate"}},
                                auth={"keys": [{"id": "k-a", "sha256": hash_key(A), "user_tier": "std"}]}))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        first, again = post(c).json(), post(c).json()
    assert first["choices"][0]["message"]["content"] == "Paris is" and first["choices"][0]["finish_reason"] == "length"
    assert "max_tokens cut to 2 by the cost budget" in first["cascade"]["attempts"][0]["reason"]
    assert again["cascade"]["cached_from"] is None and upstream.stats()["requests"] == 2


def test_a_reload_empties_the_cache(srv, upstream):
    """Answers decided by the old thresholds and calibrators are not served after a reload swapped them; a
    reload that changed neither (a logrotate hook's SIGHUP) keeps them."""
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        post(c)
        assert post(c).json()["cascade"]["cached_from"]
        r = c.post("/admin/reload", headers={"authorization": f"Bearer {OPS}"})
        assert r.status_code == 200 and r.json()["cache_cleared"] == 0, r.text
        assert post(c).json()["cascade"]["cached_from"] and upstream.stats()["requests"] == 1
        srv.set_threshold(0.25)
        r = c.post("/admin/reload", headers={"authorization": f"Bearer {OPS}"})
        assert r.status_code == 200 and r.json()["cache_cleared"] == 1, r.text
        assert post(c).json()["cascade"]["cached_from"] is None and upstream.stats()["requests"] == 2


def test_an_answer_decided_before_a_reload_is_not_stored_after_it(srv, upstream):
    """The reload empties the cache while a request is still being answered: that answer, decided by the old
    thresholds, must not be stored when it arrives (it used to be, and was served after the reload)."""
    import threading

    upstream.faults("slow:1.5")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        got: list[httpx.Response] = []
        t = threading.Thread(target=lambda: got.append(post(c)))
        t.start()
        while upstream.stats()["requests"] < 1:  # the request reached the tier
            t.join(0.05)
        srv.set_threshold(0.25)
        r = c.post("/admin/reload", headers={"authorization": f"Bearer {OPS}"})
        assert r.status_code == 200 and r.json()["cache_cleared"] == 0, r.text
        t.join()
        assert got[0].status_code == 200 and got[0].json()["cascade"]["cached_from"] is None
        again = post(c)
        assert again.json()["cascade"]["cached_from"] is None and upstream.stats()["requests"] == 2
        assert post(c).json()["cascade"]["cached_from"] == again.headers["x-request-id"]  # stored as usual


def test_an_answer_whose_ledger_write_failed_is_not_stored(srv, upstream):
    """A hit names the request that paid for its answer: that request must be in the ledger. A write refused
    by the database (a real SQLite trigger, for key B only) leaves nothing in the cache."""
    with sqlite3.connect(srv.ledger_path) as db:
        db.execute("CREATE TRIGGER refuse_b BEFORE INSERT ON requests WHEN NEW.api_key_id = 'k-b' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    from prometheus_client.parser import text_string_to_metric_families

    def metric(c: httpx.Client, name: str, **labels: str) -> float:
        samples = [s for fam in text_string_to_metric_families(c.get("/metrics").text) for s in fam.samples]
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        errors_before = metric(c, "cascade_errors_total", error_class="LedgerError")
        failed = post(c, key=B)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "ledger_error", failed.text
        # /metrics says what the client got, as the ledger would: an error, not an ok request
        assert metric(c, "cascade_errors_total", error_class="LedgerError") == errors_before + 1
        with sqlite3.connect(srv.ledger_path) as db:
            db.execute("DROP TRIGGER refuse_b")
        again = post(c, key=B)
        assert again.status_code == 200 and again.json()["cascade"]["cached_from"] is None
        assert upstream.stats()["requests"] == 2
        hit = post(c, key=B).json()["cascade"]["cached_from"]
    with sqlite3.connect(srv.ledger_path) as db:
        ids = {r[0] for r in db.execute("SELECT request_id FROM requests")}
    assert hit == again.headers["x-request-id"] and hit in ids and failed.headers["x-request-id"] not in ids


def test_a_streamed_answer_whose_ledger_write_failed_is_not_stored(srv, upstream):
    """The same for the live last tier's stream, whose answer goes out before its write: the stream ends whole,
    and nothing is stored (a hit named the unrecorded request, served again at cost 0 for the whole TTL)."""
    with sqlite3.connect(srv.ledger_path) as db:
        db.execute("CREATE TRIGGER refuse_b BEFORE INSERT ON requests WHEN NEW.api_key_id = 'k-b' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True},
                      headers={"authorization": f"Bearer {B}"}) as r:
            text = r.read().decode()
            unrecorded = r.headers["x-request-id"]
        assert r.status_code == 200 and text.rstrip().endswith("data: [DONE]"), text
        with sqlite3.connect(srv.ledger_path) as db:
            db.execute("DROP TRIGGER refuse_b")
        again = post(c, key=B)
        assert again.status_code == 200 and again.json()["cascade"]["cached_from"] is None, again.text
        assert upstream.stats()["requests"] == 2
        assert post(c, key=B).json()["cascade"]["cached_from"] == again.headers["x-request-id"]
    with sqlite3.connect(srv.ledger_path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests WHERE request_id = ?", (unrecorded,)).fetchone() == (0,)


def test_a_thumbs_down_on_a_hit_evicts_the_answer_and_labels_the_original(srv, upstream):
    from cascade.ledger import Ledger
    from cascade.recalibrate import labelled_answers

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        first = post(c)
        hit = post(c)
        assert hit.json()["cascade"]["cached_from"] == first.headers["x-request-id"]
        fb = c.post("/v1/feedback", json={"request_id": hit.headers["x-request-id"], "score": -1},
                    headers={"authorization": f"Bearer {A}"})
        assert fb.status_code == 200, fb.text
        fresh = post(c)  # the answer a user called wrong is not served again from memory
        assert fresh.json()["cascade"]["cached_from"] is None and upstream.stats()["requests"] == 2
        again = post(c)  # nor stored again when the model gives it again (greedy): for ttl_s
        assert again.json()["cascade"]["cached_from"] is None and upstream.stats()["requests"] == 3
    ledger = Ledger(srv.ledger_path).open_existing_sync()
    try:
        labels = {r["request_id"]: (r["label"], r["source"]) for r in labelled_answers(ledger, "remote")}
    finally:
        ledger.close_sync()
    assert labels == {first.headers["x-request-id"]: (0, "feedback")}  # the hit's label is its original's


@pytest.mark.parametrize(("header", "mode"), [
    ({}, "use"), ({"cache-control": "No-Cache"}, "refresh"), ({"cache-control": "max-age=0"}, "refresh"),
    ({"cache-control": "private, max-age = 0"}, "refresh"), ({"cache-control": "max-age=60"}, "use"),
    ({"pragma": "no-cache"}, "refresh"), ({"cache-control": "max-age=60", "pragma": "no-cache"}, "use"),
    ({"cache-control": "no-cache, no-store"}, "bypass"), ({"cache-control": "max-age=00"}, "refresh"),
    ({"cache-control": 'max-age="0"'}, "refresh"), ({"cache-control": "max-age\t=\t0"}, "refresh"),
    ({"cache-control": "max-age=-1"}, "use"), ({"cache-control": ",,,"}, "use"),
    ({"cache-control": " ", "pragma": "no-cache"}, "refresh"), ({"pragma": "x-no-cache-please"}, "use"),
    ({"cache-control": 'no-cache="set-cookie"'}, "refresh"),
    # not delta-seconds, or too long for int(): not read (they were a 500)
    ({"cache-control": "max-age=\u00b2"}, "use"), ({"cache-control": "max-age=\u0660"}, "use"),
    ({"cache-control": "max-age=" + "9" * 5000}, "use"), ({"cache-control": "max-age=" + "0" * 5000}, "refresh")])
def test_cache_control_as_http_means_it(header, mode):
    from serving.routes import cache_mode

    assert cache_mode(header.get("cache-control"), header.get("pragma")) == mode


def test_a_retried_provider_and_a_hit_keep_what_the_original_knew(tmp_path, upstream, serve_app):
    """A tier whose provider was retried after a 429 still answered by the policy: its answer is stored (it
    used to be refused for having an error row). The hit copies whether the baseline was estimated."""
    remote = {"name": "remote", "max_tokens": 4, "threshold": 0.0, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
              "providers": [{"name": "p1", "backend": "openai", "model": "m", "options": {"base_url": upstream.base_url}}],
              "retry": {"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.2, "max_retry_after_s": 2.0}}
    server = serve_app(make_config(tmp_path, [remote], cache={"enabled": True}))
    upstream.faults("429:ms=50")
    body = {k: v for k, v in BODY.items() if "logprobs" not in k}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        first = c.post("/v1/chat/completions", json=body)
        hit = c.post("/v1/chat/completions", json=body)
    assert [a["error_class"] for a in first.json()["cascade"]["attempts"]] == ["RateLimitedError", None]
    assert hit.json()["cascade"]["cached_from"] == first.headers["x-request-id"] and upstream.stats()["requests"] == 2
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        flags = dict(db.execute("SELECT request_id, baseline_estimated FROM requests").fetchall())
    assert flags[hit.headers["x-request-id"]] == flags[first.headers["x-request-id"]] == 0


def test_the_cache_is_bounded_in_bytes():
    from cascade.cache import answer_size
    from cascade.types import TokenLogprob, TopLogprob

    def long_answer(i: int) -> CachedAnswer:
        toks = tuple(TokenLogprob(" w", -0.1, top=tuple(TopLogprob(f" t{k}", -1.0) for k in range(5)))
                     for _ in range(1000))
        res = GenerationResult(text=" w" * 1000, tokens=toks, finish_reason="length", usage=Usage(3, 1000),
                               latency_s=1.0, model="m")
        return CachedAnswer(result=res, request_id=f"r{i}", tier="t", model="m", confidence=0.9,
                            baseline_cost_usd=1e-5, baseline_estimated=False)

    one = answer_size(long_answer(0).result)
    assert 1_000_000 < one < 1_500_000  # about 1.1 kB a token with 5 alternatives
    cache = ResponseCache(max_entries=100, ttl_s=60, max_bytes=int(2.5 * one))
    for i in range(4):
        assert cache.put(f"k{i}", long_answer(i))
    assert len(cache) == 2 and cache.bytes <= 2.5 * one and cache.get("k3") is not None and cache.get("k0") is None
    assert not ResponseCache(max_entries=10, ttl_s=60, max_bytes=one // 2).put("k", long_answer(9))  # too big alone
    cache.clear()
    assert cache.bytes == 0 and not cache.put("late", long_answer(5), generation=0)  # decided before the clear


def test_an_answer_standing_in_for_a_tier_that_was_down_is_not_stored(tmp_path, upstream, serve_app):
    """The first tier cannot be reached, so the second answers: right for now, but once the first is back the
    policy would answer otherwise, so the stand-in is not served again from memory."""
    from tests.conftest import free_port

    small = {"name": "small", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0, "timeout_s": 5,
             "price": {"input_per_1m": 0.1, "output_per_1m": 0.2},
             "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}  # nothing listens there
    big = {"name": "big", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
           "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    server = serve_app(make_config(tmp_path, [small, big], cache={"enabled": True}))
    body = {k: v for k, v in BODY.items() if "logprobs" not in k}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        first = c.post("/v1/chat/completions", json=body).json()["cascade"]
        again = c.post("/v1/chat/completions", json=body).json()["cascade"]
    assert first["tier"] == "big" and first["attempts"][0]["error_class"] == "ProviderConnectionError"
    assert again["cached_from"] is None and upstream.stats()["requests"] == 2


def _burst(url: str, upstream: FaultServerThread, n: int, timeouts: dict[int, float] | None = None) -> list:
    """``n`` identical requests from threads (one client each): the first alone until it reached the
    upstream, then the others at once. A request given a timeout in ``timeouts`` leaves early, and its slot
    holds the exception."""
    import threading

    got: list = [None] * n
    seen = upstream.stats()["requests"]

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=(timeouts or {}).get(i, 30)) as c:
            try:
                got[i] = post(c)
            except httpx.TimeoutException as exc:
                got[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    threads[0].start()
    while upstream.stats()["requests"] == seen:
        threads[0].join(0.02)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    return got


def test_a_burst_of_the_same_request_costs_one_model_call(srv, upstream):
    """Identical requests that arrive while the first is being answered wait for its answer instead of each
    calling the model; each is a ledger row of its own (a hit naming the one that paid). One whose client
    leaves while it waits is recorded as cancelled."""
    import time

    upstream.faults(delay_s=1.5)
    got = _burst(srv.url, upstream, 6, timeouts={5: 0.5})
    assert isinstance(got[5], httpx.TimeoutException)
    answered = got[:5]
    assert all(r.status_code == 200 for r in answered), [r.text for r in answered]
    assert upstream.stats()["requests"] == 1
    paid = [r for r in answered if r.json()["cascade"]["cached_from"] is None]
    assert len(paid) == 1 and paid[0] is got[0]
    payer = paid[0].headers["x-request-id"]
    assert all(r.json()["cascade"]["cached_from"] == payer and r.json()["cascade"]["cost_usd"] == 0
               for r in answered if r is not paid[0])
    assert {r.json()["choices"][0]["message"]["content"] for r in answered} == {
        paid[0].json()["choices"][0]["message"]["content"]}
    for _ in range(100):  # the abandoned follower's row is written as the server notices the client left
        with sqlite3.connect(srv.ledger_path) as db:
            rows = db.execute("SELECT status, cached_from, cost_usd, error_class FROM requests").fetchall()
        if len(rows) == 6:
            break
        time.sleep(0.05)
    assert sorted((r[0], r[1] is not None) for r in rows) == [("cancelled", False)] + [("ok", False)] + [
        ("ok", True)] * 4
    assert sum(r[2] for r in rows) == pytest.approx(paid[0].json()["cascade"]["cost_usd"])


def test_when_the_first_of_a_burst_fails_the_others_answer_for_themselves(tmp_path, upstream, serve_app):
    """The request the others wait for times out: its answer is not one to store, so they are not served an
    error that was not theirs; each asks the model (together, not one after another), and the next identical
    request is a hit."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "timeout_s": 1.0, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
              "options": {"base_url": upstream.base_url}}
    server = serve_app(make_config(tmp_path, [remote], cache={"enabled": True}))
    upstream.faults("slow:3")
    got = _burst(server.url, upstream, 4)
    codes = sorted(r.status_code for r in got)
    assert codes == [200, 200, 200, 504], [r.text for r in got]
    log = upstream.stats()["log"]
    assert len(log) == 4 and log[0]["fault"] == "slow:3"
    # the three that answered for themselves asked once the first had timed out, not before
    assert min(e["mono"] for e in log[1:]) - log[0]["mono"] > 0.9
    assert all(r.json()["cascade"]["cached_from"] is None for r in got if r.status_code == 200)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        hit = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
    assert hit["cached_from"] is not None and upstream.stats()["requests"] == 4


def test_feedback_on_a_hit_reaches_the_shadow_report(tmp_path, upstream, serve_app):
    """A hit decided nothing, so it has no shadow rows; feedback on it is about the answer its original served,
    and the shadow report counts it there (where a lenient shadow would have kept the cheaper answer)."""
    from cascade.ledger import Ledger
    from cascade.reports import shadow_report

    small, large = ({"name": n, "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.99,
                     "price": {"input_per_1m": p, "output_per_1m": 2 * p}, "options": {"base_url": upstream.base_url}}
                    for n, p in (("small", 0.1), ("large", 1.0)))
    server = serve_app(make_config(tmp_path, [small, large], cache={"enabled": True},
                                   shadows={"lenient": {"of": "cascade", "thresholds": {"small": 0.5}}}))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        first = c.post("/v1/chat/completions", json=BODY)
        hit = c.post("/v1/chat/completions", json=BODY)
        assert first.json()["cascade"]["tier"] == "large" and hit.json()["cascade"]["cached_from"] == first.headers[
            "x-request-id"]
        for r in (first, hit, hit):
            fb = c.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "score": 1})
            assert fb.status_code == 200, fb.text
    ledger = Ledger(tmp_path / "ledger.sqlite").open_existing_sync()
    try:
        (le,) = shadow_report(ledger)["shadows"]
    finally:
        ledger.close_sync()
    assert (le["requests"], le["diverged"], le["cheaper"]["requests"]) == (1, 1, 1)  # the hit has no shadow row
    # one label per request that was judged, its latest: the original's and the hit's (given twice)
    assert le["cheaper"]["feedback"]["n"] == 2 and le["cheaper"]["feedback"]["up"] == 2


def test_a_fallback_to_another_model_is_not_stored_but_one_to_a_replica_is(tmp_path, serve_app):
    """A tier's providers: a primary, a replica of the same model, and a different model as the last resort.
    With the primary down, the replica's answer is the tier's own (stored); with both down, the other model's
    answer stands in for them (not stored: once they are back they answer)."""
    with FaultServerThread() as primary, FaultServerThread() as replica, FaultServerThread() as other:
        provs = [{"name": n, "backend": "openai", "model": m, "options": {"base_url": fs.base_url}}
                 for n, m, fs in (("primary", "qwen", primary), ("replica", "qwen", replica),
                                  ("other", "llama", other))]
        t = {"name": "t", "providers": provs, "threshold": 0.0, "max_tokens": 4, "timeout_s": 5,
             "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "retry": {"max_attempts": 1}}
        server = serve_app(make_config(tmp_path, [t], cache={"enabled": True}))
        with httpx.Client(base_url=server.url, timeout=30) as c:
            primary.faults("500", "500")
            replica.faults("500")
            by_other = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
            by_replica = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
            hit = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
    assert [a["model"] for a in by_other["attempts"]] == ["qwen", "qwen", "llama"]
    assert [a["model"] for a in by_replica["attempts"]] == ["qwen", "qwen"]
    assert by_replica["cached_from"] is None and hit["cached_from"] == by_replica["request_id"]


def test_an_answer_from_a_fallback_model_is_not_stored_when_the_primary_is_skipped_by_its_breaker(tmp_path,
                                                                                                serve_app):
    """With the primary's breaker open, the primary is not tried at all (no attempt row): the other model's
    answer still stands in for it, and is not stored; once the primary is back it answers."""
    import time

    with FaultServerThread() as primary, FaultServerThread() as other:
        provs = [{"name": n, "backend": "openai", "model": m, "options": {"base_url": fs.base_url}}
                 for n, m, fs in (("primary", "qwen", primary), ("other", "llama", other))]
        t = {"name": "t", "providers": provs, "threshold": 0.0, "max_tokens": 4, "timeout_s": 5,
             "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "retry": {"max_attempts": 1},
             "breaker": {"failure_threshold": 1, "cooldown_s": 1.0}}
        server = serve_app(make_config(tmp_path, [t], cache={"enabled": True}))
        with httpx.Client(base_url=server.url, timeout=30) as c:
            primary.faults("500")
            assert c.post("/v1/chat/completions", json={**BODY, "max_tokens": 2}).status_code == 200  # opens it
            skipped = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
            time.sleep(1.2)  # the cooldown is over
            back = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
    assert [a["model"] for a in skipped["attempts"]] == ["llama"]
    assert back["cached_from"] is None and [a["model"] for a in back["attempts"]] == ["qwen"]


async def test_waiting_requests_never_hang_when_the_first_cannot_be_recorded(tmp_path, upstream):
    """The first request's ledger write cannot even be queued (the ledger closed under it): the one waiting
    for it is woken, and nothing is left in the engine's table of requests in flight."""
    import asyncio

    from cascade.engine import Engine
    from cascade.errors import LedgerError

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    engine = await Engine.open(make_config(tmp_path, [remote], cache={"enabled": True}))
    req = GenerationRequest(messages=(Message("user", "hi"),))
    upstream.faults("slow:1")
    try:
        leader = asyncio.create_task(engine.run(req))
        while upstream.stats()["requests"] < 1:
            await asyncio.sleep(0.02)
        follower = asyncio.create_task(engine.run(req))
        await asyncio.sleep(0.1)
        assert len(engine._inflight) == 1 and not follower.done()
        await engine.ledger.close()
        with pytest.raises(LedgerError):
            await leader
        with pytest.raises(LedgerError):  # woken, it answered for itself, and could not be recorded either
            await asyncio.wait_for(follower, 10)
        assert engine._inflight == {} and upstream.stats()["requests"] == 2
    finally:
        for t in engine.tiers.values():
            await t.backend.close()


def test_a_request_with_a_latency_budget_does_not_wait_for_another(tmp_path, upstream, serve_app):
    """Its budget bounds each tier's time; waiting for another request's answer first (and then answering for
    itself if that one is not stored) would not be bounded by it."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    server = serve_app(make_config(tmp_path, [remote], cache={"enabled": True},
                                   user_tiers={"fast": {"latency_budget_s": 5}},
                                   auth={"keys": [{"id": "k-a", "sha256": hash_key(A), "user_tier": "fast"}]}))
    upstream.faults(delay_s=1.0)
    got = _burst(server.url, upstream, 3)
    assert all(r.status_code == 200 for r in got) and upstream.stats()["requests"] == 3


def test_an_answer_escalated_past_a_tier_that_answered_after_a_retry_is_stored(tmp_path, serve_app):
    """The first tier's first provider failed and its replica answered (with too little confidence, so the
    second tier answered): that tier was not down, the answer is the policy's own, and it is stored."""
    with FaultServerThread() as a, FaultServerThread() as b, FaultServerThread() as big:
        small = {"name": "small", "threshold": 0.999, "max_tokens": 4, "timeout_s": 5, "retry": {"max_attempts": 1},
                 "price": {"input_per_1m": 0.1, "output_per_1m": 0.2},
                 "providers": [{"name": n, "backend": "openai", "model": "m", "options": {"base_url": fs.base_url}}
                               for n, fs in (("a", a), ("b", b))]}
        large = {"name": "large", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
                 "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": big.base_url}}
        server = serve_app(make_config(tmp_path, [small, large], cache={"enabled": True}))
        a.faults("500")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            first = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
            again = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
    assert [(x["tier"], x["error_class"]) for x in first["attempts"]] == [
        ("small", "ProviderServerError"), ("small", None), ("large", None)]
    assert again["cached_from"] == first["request_id"]


@pytest.mark.parametrize("coalesce", [False, True])
async def test_requests_arriving_while_a_stream_is_answered_wait_for_it(tmp_path, upstream, serve_app, coalesce):
    """A stream being answered leads a burst as a non-streamed request does: identical non-streamed requests
    wait for its answer and are served it (one model call). Identical streams wait too only with
    ``cache.coalesce_streams`` (their first token then comes with the whole answer); otherwise each streams
    its own."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    server = serve_app(make_config(tmp_path, [remote], cache={"enabled": True, "coalesce_streams": coalesce}))
    upstream.faults(delay_s=1.0)

    def one(stream: bool):  # noqa: ANN202
        with httpx.Client(base_url=server.url, timeout=30) as c:
            if stream:
                return chat_stream(c, BODY)
            r = c.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.json()["cascade"], dict(r.headers)

    lead = asyncio.create_task(asyncio.to_thread(one, True))
    while upstream.stats()["requests"] == 0:
        await asyncio.sleep(0.02)
    others = await asyncio.gather(*(asyncio.to_thread(one, s) for s in (False, False, True)))
    text, paid, _ = await lead
    assert paid["cached_from"] is None and text
    assert all(t == text for t, _, _ in others)
    assert [o[1]["cached_from"] for o in others[:2]] == [paid["request_id"]] * 2
    stream_follower = others[2][1]
    if coalesce:
        assert stream_follower["cached_from"] == paid["request_id"] and stream_follower["cost_usd"] == 0
        assert others[2][2]["x-cascade-cached-from"] == paid["request_id"]
        assert upstream.stats()["requests"] == 1
    else:
        assert stream_follower["cached_from"] is None and upstream.stats()["requests"] == 2


async def test_when_a_leading_stream_breaks_the_others_answer_for_themselves(tmp_path, upstream, serve_app):
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    server = serve_app(make_config(tmp_path, [remote], cache={"enabled": True, "coalesce_streams": True}))

    def one(stream: bool):  # noqa: ANN202
        with httpx.Client(base_url=server.url, timeout=30) as c:
            if stream:
                with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                    return r.status_code, r.read().decode()
            r = c.post("/v1/chat/completions", json=BODY)
            return r.status_code, r.text

    upstream.faults("drop:2", delay_s=1.0)                # every answer after 1 s; the first cut after 2 chunks
    lead = asyncio.create_task(asyncio.to_thread(one, True))
    while upstream.stats()["requests"] == 0:
        await asyncio.sleep(0.01)
    others = await asyncio.gather(*(asyncio.to_thread(one, s) for s in (False, True)))
    code, body = await lead
    assert code == 200 and "stream interrupted" in body     # the leader's own stream broke
    assert [c for c, _ in others] == [200, 200] and all("interrupted" not in b for _, b in others)
    assert upstream.stats()["requests"] == 3                # not handed the leader's failure: each asked


async def test_a_leading_stream_whose_reader_stalls_holds_no_one_past_its_time_limit(tmp_path, upstream):
    """A leader stream whose consumer stops reading is parked at its next token, where no time limit of the
    model runs; the requests waiting for it are woken at the live tier's time limit (nothing can be stored
    after it) and answer for themselves, instead of waiting as long as that client keeps its connection."""
    import time

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "timeout_s": 1.0, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
              "options": {"base_url": upstream.base_url}}
    engine = await Engine.open(make_config(tmp_path, [remote], cache={"enabled": True}))
    try:
        req = ChatCompletionRequest.model_validate(BODY).to_engine()
        leader = engine.stream(req, model="cascade")
        assert type(await anext(leader)).__name__ == "StreamStart"
        assert type(await anext(leader)).__name__ == "StreamDelta"   # ... and its reader stops here
        t = time.monotonic()
        outcome, committed = await asyncio.wait_for(engine.run_uncommitted(req, model="cascade"), 10)
        await committed
        assert time.monotonic() - t < 5 and outcome.record.cached_from is None  # woken at 1 s from the start
        # the follower led the next round itself; its slot is released by a done-callback of its ledger write,
        # which runs on the loop's next turns (an awaited future that is already done does not yield to it)
        for _ in range(100):
            if not engine._inflight:
                break
            await asyncio.sleep(0.01)
        assert upstream.stats()["requests"] == 2 and engine._inflight == {}
        await leader.aclose()
    finally:
        await engine.close()


async def test_an_answer_whose_client_left_while_its_row_committed_is_not_served_again(tmp_path, upstream):
    """The answer is in and stored once its row commits, but its caller left while that commit waited (another
    process held the ledger's lock): its row is made ``cancelled`` (nothing was served, its attempts unkept). A
    hit naming it would name a request that served no answer: feedback on the hit labels nothing (recalibration
    reads the original's kept answer) and the ledger says nobody got it. It is dropped from the cache."""
    import asyncio

    from tests.test_ledger_durability import lock_for

    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    engine = await Engine.open(make_config(tmp_path, [remote], cache={"enabled": True}))
    req = GenerationRequest(messages=(Message("user", "hi"),))
    try:
        await engine.run(GenerationRequest(messages=(Message("user", "warm"),)))  # (the ledger exists)
        holder = lock_for(tmp_path / "ledger.sqlite", 1.5)
        try:
            left = asyncio.create_task(engine.run(req, request_id="left-at-commit"))
            while upstream.stats()["requests"] < 2:  # answered; its row waits for the lock
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            left.cancel()
            with pytest.raises(asyncio.CancelledError):
                await left
        finally:
            await asyncio.to_thread(holder.wait, 30)
        for _ in range(200):
            with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
                status = db.execute("SELECT status FROM requests WHERE request_id = 'left-at-commit'").fetchone()
            if status == ("cancelled",):
                break
            await asyncio.sleep(0.05)
        assert status == ("cancelled",)
        again = await engine.run(req)
        assert again.record.cached_from is None and upstream.stats()["requests"] == 3
        assert (await engine.run(req)).record.cached_from == again.record.request_id  # its answer is stored
    finally:
        await engine.close()


def test_an_answer_escalated_past_a_tier_whose_fallback_model_answered_is_not_stored(tmp_path, serve_app):
    """The first tier's primary failed and its fallback provider, another model, answered: judged by the tier's
    calibrator and threshold (fit on the primary's answers) it escalated, and the second tier answered. That
    escalation stood in for the primary: once it is back the policy answers from the first tier, so the second
    tier's answer is not stored (it was, and was served for ttl_s instead of the first tier's own answer)."""
    with FaultServerThread() as primary, FaultServerThread(answer="Lyon", logprob=-3.0) as other, \
            FaultServerThread(answer="Paris, the large tier says.") as big:
        small = {"name": "small", "threshold": 0.5, "max_tokens": 4, "timeout_s": 5, "retry": {"max_attempts": 1},
                 "price": {"input_per_1m": 0.1, "output_per_1m": 0.2},
                 "providers": [{"name": n, "backend": "openai", "model": m, "options": {"base_url": fs.base_url}}
                               for n, m, fs in (("primary", "qwen", primary), ("other", "llama", other))]}
        large = {"name": "large", "backend": "openai", "model": "m", "max_tokens": 8, "threshold": 0.0,
                 "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": big.base_url}}
        server = serve_app(make_config(tmp_path, [small, large], cache={"enabled": True}))
        primary.faults("500")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            first = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
            back = c.post("/v1/chat/completions", json=BODY).json()["cascade"]
    assert [(x["tier"], x["model"], x["decision"]) for x in first["attempts"]] == [
        ("small", "qwen", "error"), ("small", "llama", "escalate"), ("large", "m", "final")]
    assert back["cached_from"] is None and back["tier"] == "small"  # the primary is back: its answer is kept
    assert [(x["model"], x["decision"]) for x in back["attempts"]] == [("qwen", "accept")]


def test_metrics_agree_with_the_ledger_on_a_mix_of_traffic(tmp_path, upstream, serve_app, capsys):
    """After answered, escalated (whole, streamed from an answer in hand, streamed live), refused and cached
    requests, and escalated ones whose client left while their row committed (a slow database: rows made
    ``cancelled``), /metrics counts what the ledger and its report say. ``cascade_escalations_total`` counted an
    escalation when its row was written as served, so those that left stayed escalations (5 against 3 here)."""
    from prometheus_client.parser import text_string_to_metric_families

    from cascade.cli import main
    from tests.test_ledger_durability import lock_for

    def remote(name: str, **kw: object) -> dict:
        return {"name": name, "backend": "openai", "model": "m", "max_tokens": 4, "timeout_s": 10,
                "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}, **kw}

    # the fault server's answer has confidence ~0.95: small always escalates, mid keeps its answer
    cfg = make_config(tmp_path, [remote("small", threshold=0.99), remote("mid", threshold=0.0), remote("large")],
                      {"cascade": {"chain": ["small", "mid", "large"]}, "live": {"chain": ["small", "large"]}},
                      cache={"enabled": True, "ttl_s": 600})
    srv = serve_app(cfg)
    db = tmp_path / "ledger.sqlite"

    def ask(c: httpx.Client, text: str, timeout: float = 30, **kw: object) -> httpx.Response:
        return c.post("/v1/chat/completions", json={**BODY, "messages": [{"role": "user", "content": text}], **kw},
                      timeout=timeout)

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert ask(c, "a").status_code == 200                           # escalated to mid
        assert ask(c, "a").headers["x-cascade-cached-from"]             # a hit
        assert ask(c, "b", stream=True).status_code == 200              # mid's answer in hand, streamed
        assert ask(c, "c", model="live", stream=True).status_code == 200  # large streamed live
        assert ask(c, "d", model="nope").status_code == 404
        holder = lock_for(db, 2.0)  # rows wait to commit; these clients leave meanwhile
        for i, stream in enumerate((False, True)):
            with pytest.raises(httpx.TimeoutException):
                ask(c, f"left {i}", stream=stream, timeout=0.8)
        holder.wait(30)
        for _ in range(100):  # the corrections, queued on the ledger thread after the rows
            with sqlite3.connect(db) as conn:
                if conn.execute("SELECT COUNT(*) FROM requests WHERE status = 'cancelled'").fetchone()[0] == 2:
                    break
            time.sleep(0.05)
        samples = [s for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert main(["report", "--json", "--ledger", str(db)]) == 0
    tot = json.loads(capsys.readouterr().out)["total"]
    assert (tot["requests"], tot["cancelled"], tot["cache_hits"], tot["escalated"]) == (7, 2, 1, 3), tot
    assert total("cascade_escalations_total") == tot["escalated"]
    assert total("cascade_cache_hits_total") == tot["cache_hits"]
    assert total("cascade_requests_total") == tot["requests"]
    ok = total("cascade_requests_total", status="ok") - total("cascade_requests_corrected_total")
    assert ok == tot["answered"] - tot["partial"]
    assert total("cascade_cost_usd_total") == pytest.approx(tot["spend_usd"])


def test_an_answer_is_not_served_to_a_request_whose_budget_would_answer_otherwise(tmp_path, serve_app):
    """The budget shapes the answer (a tier it cannot pay for is skipped): a reload that gives a user tier a cost
    budget does not serve its requests the answers of the tier it now skips, as the Python API's ``budget=`` does
    not get an unbudgeted call's. The key held the user tier's name only: the dear tier's answer was served."""
    with FaultServerThread(FaultServer(answer="cheap answer")) as a, \
            FaultServerThread(FaultServer(answer="dear answer")) as b:
        tiers = [{"name": "cheap", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.99,
                  "price": {"input_per_1m": 0.01, "output_per_1m": 0.01}, "options": {"base_url": a.base_url}},
                 {"name": "dear", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
                  "price": {"input_per_1m": 100.0, "output_per_1m": 100.0}, "options": {"base_url": b.base_url}}]
        path = tmp_path / "c.yaml"

        def write(std: dict) -> dict:
            data = {"ledger": {"path": str(tmp_path / "ledger.sqlite")}, "tiers": tiers,
                    "policies": {"cascade": {"chain": ["cheap", "dear"]}}, "cache": {"enabled": True},
                    "user_tiers": {"std": std, "ops": {"admin": True}},
                    "auth": {"keys": [{"id": "k-a", "sha256": hash_key(A), "user_tier": "std"},
                                      {"id": "k-ops", "sha256": hash_key(OPS), "user_tier": "ops"}]}}
            path.write_text(yaml.safe_dump(data))
            return data

        server = serve_app(make_config(tmp_path, tiers, **{k: v for k, v in write({}).items()
                                                          if k not in ("ledger", "tiers", "policies")}),
                           config_path=str(path))
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert post(c).json()["cascade"]["tier"] == "dear"
            assert post(c).json()["cascade"]["cached_from"]
            write({"cost_budget_usd": 0.00001})
            r = c.post("/admin/reload", headers={"authorization": f"Bearer {OPS}"})
            assert r.status_code == 200 and r.json()["cache_cleared"] == 0, r.text
            got = post(c).json()
        assert got["cascade"]["cached_from"] is None and got["cascade"]["tier"] == "cheap"
        assert got["choices"][0]["message"]["content"] == "cheap answer" and b.stats()["requests"] == 1


def test_a_refreshed_answer_too_large_to_store_takes_the_one_it_replaces_out(tmp_path, upstream, serve_app):
    """``Cache-Control: no-cache`` asks for a fresh answer that replaces the stored one: when the fresh one is over
    ``max_bytes`` and cannot be stored, the older answer goes too. It stayed, and was served to the next request."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 4, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], cache={"enabled": True, "max_bytes": 4000},
                                auth={"keys": [{"id": "k-a", "sha256": hash_key(A), "user_tier": "std"}]},
                                user_tiers={"std": {}}))
    upstream.fault.answer = "Paris."  # one token: stored
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert post(c).json()["choices"][0]["message"]["content"] == "Paris."
        assert post(c).json()["cascade"]["cached_from"]
        upstream.fault.answer = "Paris is the capital of France."  # its 4 tokens with their alternatives: too large
        fresh = post(c, **{"cache-control": "no-cache"}).json()
        assert fresh["choices"][0]["message"]["content"] == "Paris is the capital"
        again = post(c).json()
    assert again["cascade"]["cached_from"] is None
    assert again["choices"][0]["message"]["content"] == "Paris is the capital"
    assert upstream.stats()["requests"] == 3
