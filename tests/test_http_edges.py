"""Edges of the HTTP endpoint found by a black-box review, on a real uvicorn server in front of the real small
model and a fault-injecting OpenAI-protocol server on loopback: text that is not valid Unicode, explicit
nulls, the key before the body, HEAD, clients that leave before the answer, a stream past its latency
budget, and /metrics agreeing with the ledger row for row."""

import json
import socket
import sqlite3
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.auth import hash_key
from tests.conftest import ServerThread, make_config, tier
from tests.fault_server import FaultServerThread

KEY, SLOW_KEY = "sk-test-edges", "sk-test-edges-budget"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fault():
    with FaultServerThread() as f:
        yield f


@pytest.fixture(scope="module")
def server(tmp_path_factory, fault):
    tmp = tmp_path_factory.mktemp("edges")
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 16,
              "price": {"input_per_1m": 1, "output_per_1m": 2}, "options": {"base_url": fault.base_url}}
    cfg = make_config(
        tmp, [tier("small", threshold=0.0), remote],
        {"cascade": {"chain": ["small", "remote"]},
         "remote-first": {"chain": ["remote", "small"], "thresholds": {"remote": 1.0}},
         "small-then-remote": {"chain": ["small", "remote"], "thresholds": {"small": 1.0}}},
        user_tiers={"plain": {}, "budgeted": {"latency_budget_s": 2.5}},
        auth={"keys": [{"id": "k", "sha256": hash_key(KEY), "user_tier": "plain"},
                       {"id": "k-slow", "sha256": hash_key(SLOW_KEY), "user_tier": "budgeted"}]})
    with ServerThread(__import__("serving").create_app(cfg)) as srv:
        srv.ledger_path = tmp / "ledger.sqlite"
        yield srv


def H(key=KEY):
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def rows(srv, where="1=1"):
    with sqlite3.connect(srv.ledger_path) as c:
        return c.execute(f"SELECT status, error_class, policy FROM requests WHERE {where} ORDER BY created_at").fetchall()


def wait_for_row(srv, where, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = rows(srv, where)
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"no ledger row where {where} within {timeout} s")


@pytest.fixture(autouse=True)
def _clean_faults(fault):
    fault.reset()
    yield
    fault.reset()


# --- text that is valid JSON but not valid Unicode ---------------------------------------------------

@pytest.mark.parametrize("raw", [
    '{"model": "small", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    '{"model": "remote", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
    '{"model": "cascade", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}',
    '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
])
def test_lone_surrogates_are_refused_and_the_connection_stays_usable(server, raw):
    before = len(rows(server))
    with httpx.Client(base_url=server.url, headers=H(), timeout=60) as c:
        r = c.post("/v1/chat/completions", content=raw.encode())
        assert r.status_code == 400, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
        # the same keep-alive connection serves the next request
        ok = c.post("/v1/chat/completions", json={"model": "remote", "messages": Q})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    # the refused request is in the ledger as an error (under no model when its model was the bad text)
    assert [r[:2] for r in rows(server)][before:] == [("error", "InvalidRequestError"), ("ok", None)]


def test_surrogate_prompt_on_completions_and_feedback(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "small", "prompt": "\\udfff"}', headers=H())
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/feedback", content=b'{"request_id": "x", "score": 1, "comment": "\\ud800"}',
                   headers=H())
    assert r.status_code == 400


@pytest.mark.parametrize(("content", "param", "fragment"), [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content", "not valid Unicode"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}', "top_logprobs", "requires logprobs"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", None,
     "too many digits"),
])
def test_a_check_of_the_whole_body_names_its_parameter_and_says_nothing_of_python(server, content, param, fragment):
    """A check that names a nested field (messages.0.content) gives it as ``param``, as a field's own check does;
    a number too long to read is said so, without Python's advice on sys.set_int_max_str_digits."""
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=H(), timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and fragment in err["message"], err
    assert "sys." not in err["message"]


@pytest.mark.parametrize(("body", "param", "message"), [
    # a text part without its text: it was "messages.0.content: Input should be a valid string (and 1 more)"
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text",
     "messages.0.content.0.text: missing required parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     "messages.0.content: Input should be a valid string or a valid list"),
    ({"messages": Q, "stop": 5}, "stop", "stop: Input should be a valid string or a valid list"),
    # "Input should be a valid dictionary or object to extract fields from"
    ({"messages": [5]}, "messages.0", "messages.0: Input should be an object"),
    ({"messages": Q, "metadata": "team"}, "metadata", "metadata: Input should be an object"),
])
def test_a_malformed_field_is_said_in_the_clients_words_not_pydantics(server, body, param, message):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "remote", **body}, headers=H(), timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["message"] == message, err
    assert wait_for_row(server, f"request_id = '{r.headers['x-request-id']}'") == [
        ("error", "InvalidRequestError", "remote")]


# --- explicit nulls, and values Python would quietly coerce -------------------------------------------

def test_explicit_null_means_the_default(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    resp = client.chat.completions.create(model="remote", messages=Q, temperature=None, top_p=None, n=None,
                                          presence_penalty=None, frequency_penalty=None, logprobs=None)
    assert resp.choices[0].message.content
    r = httpx.post(server.url + "/v1/completions", headers=H(), timeout=60,
                   json={"model": "remote", "prompt": "Hi", "stream": None, "echo": None, "logprobs": None})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": "remote", "messages": Q, "stop": ""}, "non-empty"),
    ({"model": "remote", "messages": Q, "max_tokens": True}, "max_tokens"),
    ({"model": "remote", "messages": Q, "stream": 1}, "stream"),
    # no lax coercion: `true` was read as temperature 1.0 (sampling where greedy was meant), "0.5" as 0.5
    ({"model": "remote", "messages": Q, "temperature": True}, "temperature"),
    ({"model": "remote", "messages": Q, "temperature": "0.5"}, "temperature"),
    ({"model": "remote", "messages": Q, "top_p": False}, "top_p"),
    ({"model": "remote", "messages": Q, "top_p": "1"}, "top_p"),
    ({"model": "remote", "messages": Q, "store": "yes"}, "store"),
    ({"model": "remote", "messages": Q, "presence_penalty": "0"}, "presence_penalty"),
    ({"model": "remote", "messages": Q, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"model": "remote", "messages": Q, "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ({"model": "", "messages": Q}, "model"),
    ({"model": "remote", "messages": [{"role": "user"}]}, "needs content"),
    ({"model": "remote", "messages": [{"role": "user", "content": None}]}, "needs content"),
    ({"model": "remote", "messages": [{"role": "user", "content": []}]}, "empty list"),
])
def test_values_that_mean_nothing_are_refused(server, body, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=H(), timeout=60)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_the_end_user_and_tags_are_kept_with_the_request_for_cost_attribution(server, fault):
    """OpenAI's ``user`` (or ``safety_identifier``) and ``metadata``, from the openai SDK: in the ledger row,
    not upstream; a request refused (by the server's max_tokens limit) is attributed too; tags beyond
    OpenAI's limits are a 400 naming the parameter."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    fault.reset()
    raw = client.chat.completions.with_raw_response.create(model="remote", messages=Q, user="customer-42",
                                                           metadata={"team": "search", "feature": "faq"})
    other = client.completions.with_raw_response.create(model="remote", prompt="Hi", max_tokens=2,
                                                        extra_body={"safety_identifier": "hashed-7"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="remote", messages=Q, user="customer-42", max_tokens=10**6,
                                       metadata={"team": "ads"})
    sent = [e["params"] for e in fault.stats()["log"]]
    assert len(sent) == 2 and all(not {"user", "metadata", "safety_identifier"} & set(p) for p in sent)
    with sqlite3.connect(server.ledger_path) as c:
        got = {r[0]: r[1:] for r in c.execute(
            "SELECT request_id, status, end_user, metadata FROM requests WHERE end_user IS NOT NULL")}
    assert got[raw.headers["x-request-id"]] == ("ok", "customer-42", '{"feature": "faq", "team": "search"}')
    assert got[other.headers["x-request-id"]] == ("ok", "hashed-7", None)
    assert sorted(v for v in got.values() if v[0] == "error") == [("error", "customer-42", '{"team": "ads"}')]
    for metadata, fragment in (({f"k{i}": "v" for i in range(17)}, "at most 16 key-value pairs"),
                               ({"k" * 65: "v"}, "keys must be 1 to 64 characters"),
                               ({"team": "v" * 513}, "at most 512 characters"),
                               ({"team": "a\x00b"}, "must not contain a NUL character")):
        r = httpx.post(server.url + "/v1/chat/completions", headers=H(), timeout=60,
                       json={"model": "remote", "messages": Q, "metadata": metadata})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "metadata"
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(), timeout=60,
                   json={"model": "remote", "messages": Q, "user": "a\x00b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user", r.text
    # refused by validation (its temperature), and still attributed by what was valid of the rest
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(), timeout=60,
                   json={"model": "remote", "messages": Q, "temperature": 9, "user": "customer-43",
                         "metadata": {"team": "ads"}})
    assert r.status_code == 400
    with sqlite3.connect(server.ledger_path) as c:
        assert c.execute("SELECT status, end_user, metadata FROM requests WHERE request_id = ?",
                         (r.headers["x-request-id"],)).fetchone() == ("error", "customer-43", '{"team": "ads"}')


def test_an_assistant_message_may_have_no_content(server):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "And the capital of France?"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "remote", "messages": msgs}, headers=H(),
                   timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("score", [True, 1.0, "1"])
def test_feedback_score_must_be_an_integer(server, score):
    r = httpx.post(server.url + "/v1/feedback", json={"request_id": "x", "score": score}, headers=H())
    assert r.status_code == 400 and "(an integer), not" in r.json()["error"]["message"], r.text


# --- the key before the body; HEAD ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/feedback", "/admin/reload"])
def test_the_key_is_checked_before_the_body(server, path):
    for body in (b"{not json", b'{"model": "remote", "messages": []}', json.dumps({"model": "remote"}).encode()):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, body, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + path, content=b"{not json", headers=H())
    assert r.status_code in (400, 403), r.text  # with the key, the body is what is wrong (admin: not an admin)


def test_head_on_health_ready_and_models(server):
    for path, headers in (("/health", {}), ("/ready", {}), ("/v1/models", H()), ("/v1/models/remote", H())):
        r = httpx.head(server.url + path, headers=headers)
        assert r.status_code == 200 and r.content == b"", path
    assert httpx.head(server.url + "/v1/models").status_code == 401
    # a method the path does not take: 405 naming GET (the HEAD route must not answer for the path)
    for method, path, headers in (("POST", "/health", {}), ("POST", "/ready", {}), ("DELETE", "/v1/models", H()),
                                  ("POST", "/v1/models/remote", H())):
        r = httpx.request(method, server.url + path, headers=headers)
        assert r.status_code == 405 and "GET" in r.headers["allow"], (method, path, r.headers.get("allow"))
        assert r.json()["error"]["code"] == "method_not_allowed"


# --- clients that leave before the answer -------------------------------------------------------------

def _send_and_leave(srv, fault, body):
    """POST ``body`` on a raw socket, wait until the upstream has the request, then close the socket."""
    seen = fault.stats()["requests"]
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                 f"authorization: Bearer {KEY}\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.monotonic() + 30
    while fault.stats()["requests"] == seen:
        assert time.monotonic() < deadline, "the upstream never got the request"
        time.sleep(0.05)
    sock.close()


@pytest.mark.parametrize(("model", "stream"), [
    ("remote", False), ("remote-first", True),
    ("remote", True),  # the live tier of a stream, before its first token
    ("small-then-remote", True), ("small-then-remote", False),  # after a tier answered and was paid
])
def test_a_client_that_leaves_cancels_its_request(server, fault, model, stream):
    """The upstream stalls for 30 s; the client gives up at once. The engine cancels the call (the fault
    server sees the engine's connection go) and records the request as cancelled, long before 30 s, with
    every attempt: the stalled one as a ``Cancelled`` error, a tier that already answered with its cost."""
    fault.faults("stall:30")
    t0 = time.time()
    _send_and_leave(server, fault, {"model": model, "messages": Q, "stream": stream, "max_tokens": 8})
    (row,) = wait_for_row(server, f"policy = '{model}' AND created_at >= {t0}")
    assert row[:2] == ("cancelled", "ClientDisconnected")
    with sqlite3.connect(server.ledger_path) as c:
        cost, waste, rid = c.execute("SELECT cost_usd, escalation_waste_usd, request_id FROM requests "
                                     f"WHERE policy = '{model}' AND created_at >= {t0}").fetchone()
        atts = c.execute("SELECT tier, decision, error_class, latency_ms, cost_usd FROM attempts "
                         "WHERE request_id = ? ORDER BY idx", (rid,)).fetchall()
    assert atts[-1][:3] == ("remote", "error", "Cancelled") and atts[-1][3] > 0
    assert atts[-1][4] > 0  # the upstream was working on it: its prompt is billed, as waste
    if model == "small-then-remote":  # the small tier's answer was paid for: it is in the cost, as waste
        assert atts[0][:3] == ("small", "escalate", None) and atts[0][4] > 0
        assert cost == pytest.approx(sum(a[4] for a in atts)) and waste == pytest.approx(cost)


# --- streams: the latency budget bounds the whole stream; offsets run on ----------------------------------

def test_a_stream_past_its_latency_budget_ends_with_a_timeout(server, fault):
    fault.faults("slow:0:1")  # the first chunk at once, then one a second (the answer has 6): past 2.5 s
    t0 = time.time()
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=H(SLOW_KEY), timeout=60,
                      json={"model": "remote", "messages": Q, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "did not finish within 2.5 s" in err["message"] and err["type"] == "timeout"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert any(deltas)  # some of the answer went out before the budget ran out
    (row,) = rows(server, f"policy = 'remote' AND created_at >= {t0}")
    assert row[:2] == ("partial", "ProviderTimeoutError")


def test_completion_text_offsets_count_from_the_prompts_start_and_run_on(server):
    """As OpenAI's: the first answer token's offset is the prompt's length (``echo`` or not), streamed or not."""
    prompt = "Hi there"
    with httpx.stream("POST", server.url + "/v1/completions", headers=H(), timeout=60,
                      json={"model": "remote", "prompt": prompt, "stream": True, "logprobs": 1}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = ""
    for ch in chunks:
        lp = ch["choices"][0]["logprobs"]
        if lp:
            assert lp["text_offset"][0] == len(prompt) + len(text)
            text += ch["choices"][0]["text"]
    assert len(text) > 10
    whole = httpx.post(server.url + "/v1/completions", headers=H(), timeout=60,
                       json={"model": "remote", "prompt": prompt, "logprobs": 1}).json()["choices"][0]
    offsets, tokens = whole["logprobs"]["text_offset"], whole["logprobs"]["tokens"]
    assert whole["text"] == text and offsets[0] == len(prompt)
    assert offsets == [len(prompt) + len("".join(tokens[:i])) for i in range(len(tokens))]


def test_a_request_that_named_no_model_has_one_policy_label_in_every_family(server):
    """A body that is no JSON names no policy: every family files its request under policy "-" (its baseline was
    under "", which Prometheus reads as no label at all, apart from its request's "-")."""
    r = httpx.post(server.url + "/v1/chat/completions", content=b"not json", headers=H(), timeout=60)
    assert r.status_code == 400
    fams = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    labelled = [s for f in fams for s in f.samples if "policy" in s.labels]
    assert all(s.labels["policy"] for s in labelled), [s for s in labelled if not s.labels["policy"]]
    assert {s.name for s in labelled if s.labels["policy"] == "-"} >= {"cascade_requests_total",
                                                                     "cascade_baseline_cost_usd_total"}


# --- /metrics and the ledger agree, row for row (keep this test last) -----------------------------------

def test_metrics_count_every_ledger_row(server, fault):
    # rows of every status, made here (the test runs alone as well as after the others): an answer (ok), a
    # client that leaves before its answer (cancelled), a stream it leaves in the middle (partial), and an
    # unknown model (error)
    assert httpx.post(server.url + "/v1/chat/completions", json={"model": "remote", "messages": Q},
                      headers=H(), timeout=60).status_code == 200
    fault.faults("stall:30")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={"model": "remote", "messages": Q}, headers=H(),
                   timeout=httpx.Timeout(60, read=1.0))
    wait_for_row(server, "status = 'cancelled'")
    fault.faults("slow:0:0.5")
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=H(), timeout=60,
                      json={"model": "remote", "messages": Q, "stream": True}) as r:
        next(line for line in r.iter_lines() if '"content":"' in line and '"content":""' not in line)
    httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": Q}, headers=H())
    wait_for_row(server, "status = 'partial' AND error_class = 'ClientDisconnected'")
    with sqlite3.connect(server.ledger_path) as c:
        ledger = dict(c.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall())
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    counted: dict[str, float] = {}
    for s in families["cascade_requests"].samples:
        if s.name.endswith("_total"):
            counted[s.labels["status"]] = counted.get(s.labels["status"], 0) + s.value
    assert {"ok", "partial", "error", "cancelled"} <= set(ledger)
    assert counted == {k: float(v) for k, v in ledger.items()}
    # a client's unknown model names share one label: no client can create series
    policies = {s.labels["policy"] for s in families["cascade_requests"].samples}
    assert "nope" not in policies and "(unknown)" in policies


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_a_chunked_body_over_the_limit_is_413_whatever_its_type(server, content_type):
    limit = 1 << 20  # the default server.max_body_bytes

    def chunks():
        yield b'{"model": "remote", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    headers = {"authorization": f"Bearer {KEY}", **({"content-type": content_type} if content_type else {})}
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    # its row, under the key that sent it (it had none: the body limit ran before the key was known)
    rid = r.headers["x-request-id"]
    with sqlite3.connect(server.ledger_path) as c:
        assert c.execute("SELECT status, error_class, api_key_id, policy FROM requests WHERE request_id = ?",
                         (rid,)).fetchall() == [("error", "RequestTooLargeError", "k", "")]


def test_an_oversize_body_without_a_key_is_401_and_no_row(server):
    """The key before the body: a caller without one learns nothing more (it was told the body limit, 413)."""
    before = rows(server)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * ((1 << 20) + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text
    assert rows(server) == before


def test_headers_over_the_limit_are_431_and_a_row_under_their_key(server):
    """Headers past server.max_header_bytes: a 431 and its row, under the key (it had none: the header limit ran
    before the key was known); a caller without a key gets its 401 and no row, as for a body over the limit."""
    pad = {"x-pad": "a" * 70_000}
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "remote"}, headers={**H(), **pad})
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large", r.text
    with sqlite3.connect(server.ledger_path) as c:
        assert c.execute("SELECT status, error_class, api_key_id, policy FROM requests WHERE request_id = ?",
                         (r.headers["x-request-id"],)).fetchall() == [("error", "RequestHeadersTooLargeError", "k", "")]
    before = rows(server)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "remote"}, headers=pad)
    assert r.status_code == 401, r.text
    assert rows(server) == before


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_request_of_another_method_than_post_refused_for_its_size_is_no_completion_row(server, method):
    """A GET (PUT, DELETE) of a completion path is no completion request: under the limits a 405 and no row, and
    over them (its headers, its body) its 431 or 413 is no row either, not a refused chat request in the report."""
    before = rows(server)
    r = httpx.request(method, server.url + "/v1/chat/completions", headers=H())
    assert r.status_code == 405, r.text
    r = httpx.request(method, server.url + "/v1/chat/completions", headers={**H(), "x-pad": "a" * 70_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large", r.text
    r = httpx.request(method, server.url + "/v1/completions", headers=H(), content=b" " * ((1 << 20) + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert rows(server) == before  # (a refusal's row is committed before its answer is sent)


def test_headers_of_exactly_the_limit_are_read_and_one_byte_more_is_431(server):
    """The limit (65,536 bytes of path, query and header names and values) is what a request may have: one of
    exactly that size is read (here a 400 for its body, which lacks messages), one byte more is a 431."""
    def sent(extra: int) -> httpx.Response:
        with httpx.Client() as client:
            req = client.build_request("POST", server.url + "/v1/chat/completions", json={"model": "remote"},
                                       headers={**H(), "x-pad": ""})
            size = len(req.url.raw_path) + sum(len(k) + len(v) for k, v in req.headers.raw)
            req.headers["x-pad"] = "a" * (65_536 - size + extra)
            return client.send(req)

    r = sent(0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = sent(1)
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large", r.text


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_refused_naming_it(server, seed):
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(), timeout=60,
                   json={"model": "small", "messages": Q, "temperature": 1, "seed": seed, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert rows(server, f"request_id = '{r.headers['x-request-id']}'") == [("error", "InvalidRequestError", "small")]


@pytest.mark.parametrize("stream", [False, True])
def test_sampling_edges_answer_instead_of_failing(server, stream):
    """A temperature too small to divide by samples as greedy (as vLLM does), and the largest seed is used as
    given: answers, not server errors (they were a 500 without a ledger row when streamed, a 502 otherwise)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def ask(**kw):
        if not stream:
            resp = client.chat.completions.create(model="small", messages=Q, max_tokens=6, **kw)
            return resp.choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="small", messages=Q, max_tokens=6, stream=True, **kw) if ch.choices)

    greedy = ask(temperature=0)
    assert ask(temperature=1e-45) == ask(temperature=5e-324) == greedy
    assert ask(temperature=1.0, seed=2**63 - 1)
    assert ask(temperature=1.0, seed=-(2**63))


def test_a_prompt_too_long_for_the_tier_names_the_field_of_its_endpoint(server):
    """The refusal names the prompt's field and the answer's bound as the client named them (the backends say
    ``max_tokens``; a client that sent ``max_completion_tokens`` is told to lower that)."""
    long = "hello world " * 4000  # about 8000 tokens: fits the context of 8192, not with 500 more
    chat = {"messages": [{"role": "user", "content": long}]}
    for path, body, param, bound in (
            ("/v1/completions", {"prompt": long, "max_tokens": 500}, "prompt", "max_tokens"),
            ("/v1/chat/completions", {**chat, "max_tokens": 500}, "messages", "max_tokens"),
            ("/v1/chat/completions", {**chat, "max_completion_tokens": 500}, "messages", "max_completion_tokens"),
            ("/v1/responses", {"input": long, "max_output_tokens": 500}, "input", "max_output_tokens")):
        r = httpx.post(server.url + path, headers=H(), timeout=120, json={"model": "small", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        err = r.json()["error"]
        assert err["param"] == param, (path, err)
        assert f"{bound} asks for {body.get(bound)} more" in err["message"] and f"lower {bound}" in err["message"]
    longer = "hello world " * 5000  # over the context alone
    for path, body, param in (("/v1/completions", {"prompt": longer}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": longer}]}, "messages"),
                              ("/v1/responses", {"input": longer}, "input")):
        r = httpx.post(server.url + path, headers=H(), timeout=120, json={"model": "small", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert r.json()["error"]["param"] == param, (path, r.json())


@pytest.mark.parametrize(("raw", "fragment"), [
    (b'{"model": "small", "messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
    (b'{"model": "small", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}", "nested too deeply"),
    (b'{"model": "small", "max_tokens": 1' + b"0" * 5000 + b', "messages": []}', "could not be read as JSON: "),
])
def test_a_body_that_cannot_be_read_is_a_clear_400_in_the_ledger(server, raw, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=H(), timeout=60)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "invalid_request"
    # (no model could be read from the body: the row is filed under none, as for a body that is not JSON)
    assert wait_for_row(server, f"request_id = '{r.headers['x-request-id']}'") == [("error", "InvalidRequestError", "")]
    # feedback's body is read by the same parser: said the same way (no ledger row: no completion)
    r = httpx.post(server.url + "/v1/feedback", content=raw.replace(b'"model": "small"', b'"request_id": "x"'),
                   headers=H(), timeout=60)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_its_body_arrived_is_a_cancelled_row_not_a_malformed_one(server, stream):
    """A client that closes its connection part way through sending its body (a dropped upload) sent nothing
    wrong: its row is ``cancelled`` ``ClientDisconnected``, as for a client gone at any later point, never
    an ``InvalidRequestError`` saying its body "could not be read as JSON" (counted as a malformed request)."""
    def ids() -> set[str]:
        with sqlite3.connect(server.ledger_path) as c:
            return {r for (r,) in c.execute("SELECT request_id FROM requests")}

    before = ids()
    body = json.dumps({"model": "small", "stream": stream, "messages": Q, "max_tokens": 2}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (KEY.encode(), len(body), body[:20]))
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 15
    while not (new := ids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(new) == 1, new
    found = rows(server, f"request_id = '{new.pop()}'")
    assert found == [("cancelled", "ClientDisconnected", "")], found


def test_a_compressed_body_is_a_415_that_says_so_in_the_ledger(server):
    """A gzip body (content-encoding: gzip) is refused as compressed, not as JSON that is not UTF-8."""
    import gzip

    body = json.dumps({"model": "small", "messages": Q, "max_tokens": 2}).encode()
    for encoding in ("gzip", "GZIP"):
        r = httpx.post(server.url + "/v1/chat/completions", content=gzip.compress(body), timeout=60,
                       headers={**H(), "content-type": "application/json", "content-encoding": encoding})
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_content_encoding" and "content-encoding: gzip" in err["message"], err
        assert "UTF-8" not in err["message"], err
        assert wait_for_row(server, f"request_id = '{r.headers['x-request-id']}'") == [
            ("error", "InvalidRequestError", "")]
    # the header alone on a plain body changes nothing: the body is read as it is
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={**H(), "content-type": "application/json", "content-encoding": "identity"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/health/", "/v1/chat/completions/", "/v1/models/"])
def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_clients_host(server, path):
    r = httpx.request("GET" if "health" in path or "models" in path else "POST", server.url + path,
                      headers={**H(), "host": "evil.example"}, json={"messages": Q}, timeout=30)
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "body", "fragment"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "content parts of type 'image_url' are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "content parts of type 'input_audio' are not supported"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompts of token ids are not supported"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompts of token ids are not supported"),
])
def test_what_the_server_cannot_read_is_named(server, path, body, fragment):
    r = httpx.post(server.url + path, json={"model": "small", **body}, headers=H(), timeout=60)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_a_request_naming_no_model_is_filed_under_the_default_policy_refused_or_not(server):
    """A body without ``model`` goes to the default policy: its ledger row says so whether it was served,
    refused by the server's limits or malformed (refused rows were filed under no policy at all)."""
    ids = {}
    for what, extra in (("served", {}), ("over the limit", {"max_tokens": 10**6}), ("malformed", {"top_p": "1"})):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": Q, **extra}, headers=H(), timeout=60)
        assert (r.status_code == 200) == (what == "served"), r.text
        ids[what] = r.headers["x-request-id"]
    policies = {what: wait_for_row(server, f"request_id = '{rid}'")[0][2] for what, rid in ids.items()}
    assert policies["served"] == "cascade" and set(policies.values()) == {"cascade"}, policies


@pytest.mark.parametrize("stream", [False, True])
def test_a_fault_of_the_servers_own_before_the_engine_runs_is_a_500_with_its_ledger_row(server, monkeypatch, stream):
    """Defence in depth: a bug between admission and the engine (as a Cache-Control header that int() could
    not read once was) is a 500 ``internal_error`` whose request still has its ledger row. The bug is
    injected into this process's own request code; no remote part is stood in for."""
    import serving.routes

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving.routes, "cache_mode", broken)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": Q, "stream": stream}, headers=H(),
                   timeout=60)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err == {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    assert wait_for_row(server, f"request_id = '{r.headers['x-request-id']}'") == [
        ("error", "InternalError", "cascade")]


def test_an_unexpected_fault_anywhere_is_a_500_naming_its_request(server, monkeypatch):
    """A bug past every handler (here in the feedback route, injected in this process) is still an OpenAI-shaped
    500 with the x-request-id its log line carries."""
    import serving.routes

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving.routes, "_own_request", broken)
    r = httpx.post(server.url + "/v1/feedback", json={"request_id": "x", "score": 1}, headers=H(), timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    assert r.headers.get("x-request-id")


#: every class of the error tree as a client meets it (README, Errors; docs/failure-handling.md): status, type,
#: code, x-should-retry, and Retry-After when the error names no time of its own
ERROR_TABLE = {
    "InternalError": (500, "server_error", "internal_error", None, None),
    "ConfigError": (500, "config_error", "invalid_config", "false", None),
    "ReloadRefusedError": (422, "invalid_request_error", "reload_refused", None, None),
    "ModelNotPreparedError": (503, "model_not_ready", "model_not_prepared", "false", None),
    "BackendUnavailableError": (503, "backend_unavailable", "backend_unavailable", "false", None),
    "InvalidRequestError": (400, "invalid_request_error", None, None, None),
    "RequestTooLargeError": (413, "invalid_request_error", "request_too_large", None, None),
    "RequestHeadersTooLargeError": (431, "invalid_request_error", "request_header_fields_too_large", None, None),
    "RequestTimeoutError": (408, "invalid_request_error", "request_timeout", None, None),
    "ContextLengthExceededError": (400, "invalid_request_error", "context_length_exceeded", None, None),
    "UnknownModelError": (404, "invalid_request_error", "model_not_found", None, None),
    "AuthenticationError": (401, "authentication_error", "invalid_api_key", None, None),
    "PermissionDeniedError": (403, "permission_error", "forbidden", None, None),
    "NotFoundError": (404, "invalid_request_error", "not_found", None, None),
    "BudgetExceededError": (402, "budget_exceeded", "budget_exceeded", None, None),
    "ProviderError": (502, "provider_error", None, None, None),
    "ProviderInvalidRequestError": (400, "invalid_request_error", None, None, None),
    "ProviderContextLengthError": (400, "invalid_request_error", "context_length_exceeded", None, None),
    "ProviderMisconfiguredError": (502, "provider_error", "provider_misconfigured", "false", None),
    "ProviderAuthError": (502, "provider_auth_error", None, "false", None),
    "RateLimitedError": (429, "rate_limit_error", None, None, "1"),
    "ProviderServerError": (502, "provider_error", None, None, None),
    "ProviderTimeoutError": (504, "timeout", None, None, None),
    "ProviderConnectionError": (502, "connection_error", None, None, None),
    "CircuitOpenError": (503, "service_unavailable", None, None, "1"),
    "ClientDisconnected": (499, "client_closed_request", None, None, None),
    "RequestLimitError": (429, "requests", "rate_limit_exceeded", None, "1"),
    "ServerOverloadedError": (503, "service_unavailable", "server_overloaded", None, "1"),
    "ServerShutdown": (503, "service_unavailable", "server_shutdown", "true", "1"),
    "EngineClosedError": (503, "service_unavailable", "engine_closed", "true", "1"),
    "EngineLoopError": (500, "server_error", "wrong_event_loop", None, None),
    "LedgerError": (500, "ledger_error", None, None, None),
    "LedgerTimeoutError": (500, "ledger_error", None, None, None),
    "LedgerWriteHeldError": (500, "ledger_error", None, None, None),
    "LedgerUnavailableError": (503, "ledger_error", "ledger_unavailable", "true", "1"),
    "DataError": (400, "invalid_request_error", "invalid_data", None, None),
}


def _error_tree(cls):
    for sub in cls.__subclasses__():
        if sub.__module__ == "cascade.errors":
            yield sub
            yield from _error_tree(sub)


def test_the_error_table_covers_the_tree():
    from cascade.errors import CascadeError

    assert sorted(c.__name__ for c in _error_tree(CascadeError)) == sorted(ERROR_TABLE)


@pytest.mark.parametrize("name", sorted(ERROR_TABLE))
def test_each_error_class_maps_to_its_status_body_and_retry_headers(name):
    """One mapping, at the edge: OpenAI's body, a status the openai SDK reads as the docs say, and an error that
    waiting cannot mend (an operator's to fix) says x-should-retry: false, so the SDK does not repeat it."""
    import cascade.errors
    from serving.errors import error_response

    status, type_, code, should_retry, retry_after = ERROR_TABLE[name]
    response = error_response(getattr(cascade.errors, name)("it failed"))
    assert response.status_code == status
    body = json.loads(response.body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"] == {"message": "it failed", "type": type_, "param": None, "code": code}
    assert response.headers.get("x-should-retry") == should_retry
    assert response.headers.get("retry-after") == retry_after
    if status in (408, 409, 429) or status >= 500:  # what the SDK would repeat: only where a repeat may help
        assert should_retry != "false" or retry_after is None


def test_a_tier_whose_model_is_not_prepared_says_retrying_cannot_help(tmp_path):
    """A tier loaded at its first call (create_app(preload=False)) whose model is not prepared: 503 with
    x-should-retry: false and no Retry-After, not a 1 s Retry-After the SDK would retry on twice."""
    from serving import create_app

    (tmp_path / "empty").mkdir()
    cfg = make_config(tmp_path, [tier("small")], models={"cache_dir": str(tmp_path / "empty")})
    with ServerThread(create_app(cfg, preload=False)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": Q}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_prepared", r.text
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
