"""The HTTP layer at its edges: each limit at its boundary, parameters that only a boundary or one header shows,
feedback on a partial answer, a neutral score and the cache, metrics by policy and tier as the ledger has them,
Retry-After rounded up, ``auth.required`` without keys. On a real uvicorn server, SmolLM2 and the loopback fault
server (tests written from a mutation audit: each fails on a one-line change the rest of the suite let pass)."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.auth import hash_key
from serving import create_app
from tests.conftest import ServerThread, make_config, tier
from tests.fault_server import FaultServerThread

KEY = "sk-test-mutprop"
LIMIT = 16


def Q(text="What is the capital of France?"):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def fault():
    with FaultServerThread() as f:
        yield f


@pytest.fixture(autouse=True)
def _clean(fault):
    fault.reset()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fault):
    tmp = tmp_path_factory.mktemp("mutprop")
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 16, "threshold": 0.0,
              "price": {"input_per_1m": 1, "output_per_1m": 2}, "options": {"base_url": fault.base_url},
              "retry": {"max_attempts": 1, "max_retry_after_s": 2.0}}
    cfg = make_config(tmp, [tier("small", threshold=0.0), remote],
                      {"cascade": {"chain": ["small", "remote"]},
                       "small-then-remote": {"chain": ["small", "remote"], "thresholds": {"small": 1.0}}},
                      user_tiers={"plain": {}}, server={"max_tokens_limit": LIMIT},
                      cache={"enabled": True, "ttl_s": 600},
                      auth={"keys": [{"id": "k", "sha256": hash_key(KEY), "user_tier": "plain"}]})
    with ServerThread(create_app(cfg)) as srv:
        srv.ledger_path = tmp / "ledger.sqlite"
        yield srv


def post(server, body, **headers):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {KEY}", **headers})


def test_limits_at_their_boundaries(server):
    ok = {"model": "remote", "messages": Q()}
    assert post(server, {**ok, "stop": ["s" * 256]}).status_code == 200                      # 256 chars: allowed
    assert post(server, {**ok, "stop": ["a", "b", "c", "d"]}).status_code == 200
    r = post(server, {**ok, "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and "at most 4 stop sequences" in r.json()["error"]["message"]
    assert post(server, {**ok, "metadata": {f"k{i}": "v" for i in range(16)}}).status_code == 200   # 16 pairs
    assert post(server, {**ok, "max_tokens": LIMIT}).status_code == 200                       # == the limit
    assert post(server, {**ok, "max_tokens": LIMIT + 1}).status_code == 400


def test_max_completion_tokens_reaches_the_tier(server, fault):
    r = post(server, {"model": "remote", "messages": Q("mct"), "max_completion_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_max_tokens_over_the_limit_beside_max_completion_tokens_is_refused(server, fault):
    """max_completion_tokens bounds the answer when both are sent, but a max_tokens past the server's limit beside
    it was let by unread (200): each bound the client sends is held to the limit, as OpenAI checks each one."""
    r = post(server, {"model": "remote", "messages": Q("both"), "max_completion_tokens": 3, "max_tokens": LIMIT + 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens" and f"above this server's limit of {LIMIT}" in r.text
    assert fault.stats()["requests"] == 0  # refused before any tier was called
    r = post(server, {"model": "remote", "messages": Q("both"), "max_completion_tokens": 3, "max_tokens": LIMIT})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # within it: the answer's bound is 3


def test_a_stream_says_no_cache(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "remote", "messages": Q("nc"), "stream": True},
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        r.read()
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"


def test_feedback_on_a_partial_answer_is_taken(server, fault):
    fault.faults("slow:0:0.5")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "remote", "messages": Q("partial"), "stream": True},
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        rid = r.headers["x-request-id"]
        next(line for line in r.iter_lines() if '"content":"' in line and '"content":""' not in line)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with sqlite3.connect(server.ledger_path) as c:
            row = c.execute("SELECT status FROM requests WHERE request_id = ?", (rid,)).fetchone()
        if row and row[0] == "partial":
            break
        time.sleep(0.05)
    assert row == ("partial",)
    fb = httpx.post(server.url + "/v1/feedback", json={"request_id": rid, "score": 1},
                    headers={"authorization": f"Bearer {KEY}"})
    assert fb.status_code == 200, fb.text


def test_a_neutral_score_keeps_the_cached_answer(server, fault):
    body = {"model": "remote", "messages": Q("cache me")}
    first = post(server, body)
    fb = httpx.post(server.url + "/v1/feedback", json={"request_id": first.headers["x-request-id"], "score": 0},
                    headers={"authorization": f"Bearer {KEY}"})
    assert fb.status_code == 200
    assert post(server, body).json()["cascade"]["cached_from"] == first.headers["x-request-id"]


def test_cost_and_waste_metrics_are_by_policy_and_tier_as_the_ledger(server):
    r = post(server, {"model": "small-then-remote", "messages": Q("waste"), "max_tokens": 4})
    assert r.status_code == 200 and r.json()["cascade"]["escalated"]
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    cost = {(s.labels["policy"], s.labels["tier"]): s.value for s in fams["cascade_cost_usd"].samples
            if s.name.endswith("_total") and s.labels["policy"] == "small-then-remote"}
    waste = {(s.labels["policy"], s.labels["tier"]): s.value for s in fams["cascade_escalation_waste_usd"].samples
             if s.name.endswith("_total") and s.labels["policy"] == "small-then-remote"}
    att = {a["tier"]: a["cost_usd"] for a in r.json()["cascade"]["attempts"]}
    assert cost == pytest.approx({("small-then-remote", t): c for t, c in att.items() if c})
    assert waste == pytest.approx({("small-then-remote", "small"): att["small"]})   # the kept answer is no waste


def test_a_provider_hint_is_rounded_up(server, fault):
    fault.faults("429:ms=7400")
    r = post(server, {"model": "remote", "messages": Q("ra")})
    assert r.status_code == 429 and r.headers["retry-after"] == "8", (r.status_code, r.headers)


def test_auth_required_without_keys_refuses_everyone(tmp_path):
    cfg = make_config(tmp_path, [tier("small")], auth={"required": True})
    with ServerThread(create_app(cfg)) as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"authorization": "Bearer sk-anything"})
        assert r.status_code == 401


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/feedback"])
def test_an_empty_body_is_said_to_be_empty(server, path):
    # it was "missing required parameter", naming none: the body, not a parameter, is what is missing
    r = httpx.post(server.url + path, content=b"", timeout=60,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"].startswith("the request body is empty") and err["param"] is None
    if path != "/v1/feedback":  # a refused completion request is a ledger row, as any other
        with sqlite3.connect(server.ledger_path) as db:
            row = db.execute("SELECT status, error_class, error_message FROM requests WHERE request_id = ?",
                             (r.headers["x-request-id"],)).fetchone()
        assert row is not None and row[:2] == ("error", "InvalidRequestError")
        assert row[2].startswith("the request body is empty")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_max_body_bytes_is_read_and_one_byte_more_is_413(server, chunked):
    limit = 1 << 20  # the default server.max_body_bytes: "over" it is refused, at it is not

    def body(size):
        head, tail = b'{"model": "remote", "max_tokens": 1, "messages": [{"role": "user", "content": "', b'"}]}'
        data = head + b"x" * (size - len(head) - len(tail)) + tail
        assert len(data) == size
        # with a Content-Length (refused by its header), or chunked (refused by counting what arrives)
        return (data[i:i + 65536] for i in range(0, size, 65536)) if chunked else data

    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=body(limit), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/chat/completions", content=body(limit + 1), headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_one_stop_string_is_one_stop_sequence(server, fault):
    # "stop": "capital" is the sequence, not its letters (which would cut the answer at the "a" of "Paris")
    r = post(server, {"model": "remote", "messages": Q("one stop string"), "stop": "capital"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Paris is the "  # the fault server's answer, cut
    assert r.json()["choices"][0]["finish_reason"] == "stop"
