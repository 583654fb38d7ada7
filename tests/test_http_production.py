"""The production endpoint on a real uvicorn server: streaming, API keys and user tiers, budgets, metrics."""

import json
import socket
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.auth import hash_key
from tests.conftest import ServerThread, make_config, tier

FREE, PAID = "sk-test-free", "sk-test-paid"
Q = [{"role": "user", "content": "What is the capital of France?"}]
#: the interactive user tiers' latency budget: the hung tier is cut off when it runs out
LATENCY_BUDGET_S = 4.0


class StallServer:
    """A real TCP server on loopback that accepts connections and never answers (a hung provider)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def stall():
    s = StallServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, stall):
    tmp = tmp_path_factory.mktemp("prod")
    hung = {"name": "hung", "backend": "openai", "model": "x", "price": {"input_per_1m": 5, "output_per_1m": 5},
            "options": {"base_url": f"http://127.0.0.1:{stall.port}/v1"}}
    cfg = make_config(
        tmp,
        [tier("small", threshold=0.0, max_tokens=8), tier("large", price={"input_per_1m": 1, "output_per_1m": 3}), hung],
        {"cascade": {"chain": ["small", "large"]},
         "always-escalate": {"chain": ["small", "large"], "thresholds": {"small": 1.0}},
         "premium": {"chain": ["small", "large"], "thresholds": {"small": 1.0}},
         "to-hung": {"chain": ["small", "hung", "large"], "thresholds": {"small": 1.0, "hung": 0.0}}},
        user_tiers={
            "free": {"allowed_models": ["cascade", "always-escalate", "small"], "cost_budget_usd": 1e-9},
            "paid": {},
            "interactive-escalate": {"latency_budget_s": LATENCY_BUDGET_S},
            "interactive": {"latency_budget_s": LATENCY_BUDGET_S, "on_latency_budget": "best_answer"},
            "batch": {"cost_budget_usd": 6e-6, "on_cost_budget": "truncate", "daily_spend_limit_usd": 3e-5},
        },
        auth={"keys": [{"id": "k-free", "sha256": hash_key(FREE), "user_tier": "free"},
                       {"id": "k-paid", "sha256": hash_key(PAID), "user_tier": "paid"},
                       {"id": "k-inter", "sha256": hash_key("sk-test-inter"), "user_tier": "interactive"},
                       {"id": "k-inter-esc", "sha256": hash_key("sk-test-inter-esc"), "user_tier": "interactive-escalate"},
                       {"id": "k-batch", "sha256": hash_key("sk-test-batch"), "user_tier": "batch"}]})
    with ServerThread(__import__("serving").create_app(cfg)) as srv:
        srv.ledger_path = tmp / "ledger.sqlite"
        yield srv


def client(server, key=PAID):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_streaming_chat_matches_the_non_streamed_answer(server):
    c = client(server)
    whole = c.chat.completions.create(model="cascade", messages=Q, max_tokens=8)
    chunks = list(c.chat.completions.create(model="cascade", messages=Q, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["cascade"]["tier"] == "small"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    lps = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert len(lps) == whole.usage.completion_tokens and all(len(lp.top_logprobs) == 2 for lp in lps)


def test_escalated_stream_serves_the_last_tier_live(server):
    with client(server).chat.completions.with_streaming_response.create(
            model="always-escalate", messages=Q, max_tokens=6, stream=True) as resp:
        assert resp.headers["x-cascade-tier"] == "large" and resp.headers["x-cascade-escalated"] == "true"
        chunks = list(resp.parse())
    final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    casc = final.model_extra["cascade"]
    assert [a["decision"] for a in casc["attempts"]] == ["escalate", "final"]
    assert casc["escalation_waste_usd"] == pytest.approx(casc["attempts"][0]["cost_usd"]) and casc["cost_usd"] > 0
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
    with sqlite3.connect(server.ledger_path) as db:
        row = db.execute("SELECT status, tier, n_attempts FROM requests WHERE request_id=?",
                         (casc["request_id"],)).fetchone()
    assert row == ("ok", "large", 2)


def _ttft(server, policy):
    """(count, sum) of cascade_time_to_first_token_seconds for ``policy``."""
    name = "cascade_time_to_first_token_seconds"
    got = {s.name: s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
           if f.name == name for s in f.samples if s.labels.get("policy") == policy}
    return got.get(name + "_count", 0.0), got.get(name + "_sum", 0.0)


@pytest.mark.parametrize("endpoint", ["chat/completions", "responses"])
def test_time_to_first_token_counts_the_buffered_tiers_as_the_client_waits(server, endpoint):
    """An escalated stream's first token comes after the small tier's whole (buffered) answer: the metric counts
    it, as the client waits for it (it was timed from the stream's start, after that answer: about 1 ms)."""
    body = {"model": "always-escalate", "stream": True,
            **({"messages": Q, "max_tokens": 6} if endpoint == "chat/completions"
               else {"input": Q[0]["content"], "max_output_tokens": 6})}
    count, total = _ttft(server, "always-escalate")
    block = None
    with httpx.stream("POST", f"{server.url}/v1/{endpoint}", json=body, timeout=120,
                      headers={"authorization": f"Bearer {PAID}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"cascade"' in line:
                obj = json.loads(line[6:])
                block = obj.get("cascade") or obj.get("response", {}).get("cascade") or block
    assert [a["decision"] for a in block["attempts"]] == ["escalate", "final"]
    small_s = block["attempts"][0]["latency_ms"] / 1e3
    count_after, total_after = _ttft(server, "always-escalate")
    assert count_after == count + 1
    assert total_after - total >= small_s > 0.01


async def test_streaming_completion_with_the_async_client(server):
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=PAID, max_retries=0)
    stream = await c.completions.create(model="small", prompt="The capital of France is", max_tokens=4, stream=True)
    text = "".join([ev.choices[0].text async for ev in stream if ev.choices])
    assert "Paris" in text
    await c.close()


def test_keys_decide_the_user_tier(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "cascade", "messages": Q})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # the scheme's name is case-insensitive (RFC 9110 11.1): "bearer" is the same key, sent as some clients write it
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"bearer {FREE}"}).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(server, FREE).chat.completions.create(model="premium", messages=Q, max_tokens=4)
    assert "may not use model 'premium'" in err.value.message
    assert [m.id for m in client(server, FREE).models.list()] == ["cascade", "always-escalate", "small"]
    # told of its own models only, as the list says: a made-up name is refused as a hidden one is (a 404 for one
    # beside a 403 for the other told which models exist)
    with pytest.raises(openai.PermissionDeniedError) as missing:
        client(server, FREE).chat.completions.create(model="nope", messages=Q, max_tokens=4)
    assert missing.value.message.endswith("may not use model 'nope'; allowed: cascade, always-escalate, small")
    assert err.value.message.endswith("may not use model 'premium'; allowed: cascade, always-escalate, small")
    # a header cannot upgrade the caller
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "premium", "messages": Q},
                   headers={"authorization": f"Bearer {FREE}", "x-user-tier": "paid"})
    assert r.status_code == 403
    # refusals are in the ledger, under the key, as the requests they were (a malformed one too)
    bad = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 0},
                     headers={"authorization": f"Bearer {FREE}"})
    assert bad.status_code == 400
    with sqlite3.connect(server.ledger_path) as c:
        got = {rid: c.execute("SELECT status, error_class, policy, api_key_id, user_tier, endpoint, n_attempts "
                              "FROM requests WHERE request_id = ?", (rid,)).fetchone()
               for rid in (r.headers["x-request-id"], bad.headers["x-request-id"])}
    assert got == {r.headers["x-request-id"]: ("error", "PermissionDeniedError", "premium", "k-free", "free", "chat", 0),
                   bad.headers["x-request-id"]: ("error", "InvalidRequestError", "small", "k-free", "free",
                                                 "completions", 0)}


def test_cost_budget_refuses_with_402(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "cascade", "messages": Q},
                   headers={"authorization": f"Bearer {FREE}"}, timeout=60)
    assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exceeded"
    assert "cost budget" in r.json()["error"]["message"]


def test_cost_budget_truncates_for_batch_and_daily_limit_applies(server):
    c = client(server, "sk-test-batch")
    resp = c.chat.completions.create(model="small", messages=Q, max_tokens=64)
    # 6e-6 USD at $0.1/M prompt (~40 tokens) and $0.2/M output: about 10 of the 64 tokens are affordable
    assert 1 <= resp.usage.completion_tokens < 64
    spent = resp.model_extra["cascade"]["cost_usd"]
    assert spent <= 6e-6
    for _ in range(40):  # spend until the daily limit (3e-5) is reached, then 429
        try:
            c.chat.completions.create(model="small", messages=Q, max_tokens=64)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "daily_spend_limit"
            # come back when the limit resets, at 00:00 UTC
            to_midnight = 86400 - time.time() % 86400
            assert abs(int(exc.response.headers["retry-after"]) - to_midnight) <= 5
            assert exc.response.headers["x-should-retry"] == "false"  # the openai SDK would retry a 429
            break
    else:  # pragma: no cover
        pytest.fail("daily spend limit never applied")


def test_latency_budget_cancels_a_hung_tier(server):
    # escalate mode: the hung middle tier is cancelled as the budget runs out and the chain goes on to the next tier
    resp = client(server, "sk-test-inter-esc").chat.completions.create(
        model="to-hung", messages=Q, max_tokens=6, timeout=60)
    casc = resp.model_extra["cascade"]
    decisions = [(a["tier"], a["decision"], a["error_class"]) for a in casc["attempts"]]
    assert decisions[1] == ("hung", "error", "ProviderTimeoutError")
    assert decisions[2][0] == "large", decisions   # escalate: went on to the next tier
    # which answers, unless a loaded machine makes it run past its own 4 s too (the answer in hand is then served:
    # seen on a 2-core machine running the suite beside other work)
    assert resp.model == "large" or decisions[2][1:] == ("error", "ProviderTimeoutError"), decisions
    # best_answer mode: on the same timeout it serves the answer already in hand, no further tier
    resp = client(server, "sk-test-inter").chat.completions.create(model="to-hung", messages=Q, max_tokens=6)
    casc = resp.model_extra["cascade"]
    assert resp.model == "small" and len(casc["attempts"]) == 2
    assert "exceeded the latency budget" in casc["attempts"][0]["reason"]
    small_s, hung_s = (a["latency_ms"] / 1000 for a in casc["attempts"])
    assert LATENCY_BUDGET_S - small_s - 1.0 < hung_s < LATENCY_BUDGET_S + 0.5  # cut off by the budget, not before


def test_feedback_readable_and_metrics_parse(server):
    c = client(server)
    resp = c.chat.completions.create(model="always-escalate", messages=Q, max_tokens=4)
    rid = resp.model_extra["cascade"]["request_id"]
    h = {"authorization": f"Bearer {PAID}"}
    assert httpx.post(server.url + "/v1/feedback", json={"request_id": rid, "score": -1}, headers=h).status_code == 200
    fb = httpx.get(server.url + f"/v1/feedback/{rid}", headers=h).json()
    assert [f["score"] for f in fb["data"]] == [-1]
    # another key cannot see or rate this request
    other = {"authorization": f"Bearer {FREE}"}
    assert httpx.get(server.url + f"/v1/feedback/{rid}", headers=other).status_code == 404
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    reqs = families["cascade_requests"].samples
    assert any(s.labels["policy"] == "always-escalate" and s.labels["tier"] == "large" and s.value >= 1 for s in reqs)
    rate = {s.labels["policy"]: s.value for s in families["cascade_escalation_rate"].samples}
    assert rate["always-escalate"] == 1.0
    assert any(s.value > 0 for s in families["cascade_escalation_waste_usd"].samples if s.name.endswith("_total"))
    assert "cascade_request_latency_seconds" in families and "cascade_routing_overhead_seconds" in families
    errors = {s.labels["error_class"] for s in families["cascade_errors"].samples if s.name.endswith("_total")}
    assert "BudgetExceededError" in errors or "PermissionDeniedError" in errors or errors == set()


def test_ready_reports_loaded_backends(server):
    r = httpx.get(server.url + "/ready")
    body = r.json()
    assert set(body["tiers"]) == {"small", "large", "hung"}
    assert body["tiers"]["small"] is True and r.status_code == 200
    assert body["status"] == "ready" and body["ledger"] == "ok"
