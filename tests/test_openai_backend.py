"""The `openai` backend against a real OpenAI-compatible server on loopback.

The server is cascade-engine's own endpoint serving one SmolLM2 tier through the transformers backend:
a real uvicorn server speaking the OpenAI protocol, reached through the official `openai` client.
"""

import pytest

from cascade.backends.openai_backend import OpenAIBackend
from cascade.engine import Engine
from cascade.errors import ProviderConnectionError, ProviderError, ProviderInvalidRequestError
from cascade.types import GenerationRequest, Message
from tests.conftest import free_port, make_config, tier

Q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),), max_tokens=8, top_logprobs=3)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    from serving import create_app
    from tests.conftest import ServerThread

    cfg = make_config(tmp_path_factory.mktemp("remote"), [tier("smol-remote")])
    with ServerThread(create_app(cfg)) as srv:
        yield srv


async def test_chat_tokens_and_logprobs_match_the_local_backend(remote, smol_backend):
    b = OpenAIBackend(model="smol-remote", base_url=remote.url + "/v1")
    try:
        res = await b.generate(Q)
    finally:
        await b.close()
    local = await smol_backend.generate(Q)
    assert res.text == local.text
    assert [t.token for t in res.tokens] == [t.token for t in local.tokens]
    assert max(abs(a.logprob - c.logprob) for a, c in zip(res.tokens, local.tokens, strict=True)) < 1e-4
    assert all(len(t.top) == 3 for t in res.tokens)
    assert res.usage.prompt_tokens == local.usage.prompt_tokens
    assert res.usage.completion_tokens == local.usage.completion_tokens


async def test_token_bytes_pass_through_from_upstream(remote, smol_backend):
    """Tokens that split a multi-byte character keep the bytes the upstream sent (its ``bytes``)."""
    q = GenerationRequest(messages=(Message("user", "Translate 'thank you' into Chinese."),), max_tokens=8,
                          top_logprobs=2)
    b = OpenAIBackend(model="smol-remote", base_url=remote.url + "/v1")
    try:
        res = await b.generate(q)
    finally:
        await b.close()
    local = await smol_backend.generate(q)
    assert any(t.token == "" for t in res.tokens)  # the answer is CJK: some tokens hold part of a character
    assert [t.utf8 for t in res.tokens] == [t.utf8 for t in local.tokens]
    assert b"".join(t.utf8 for t in res.tokens) == res.text.encode("utf-8")


async def test_completions_endpoint(remote):
    b = OpenAIBackend(model="smol-remote", base_url=remote.url + "/v1", endpoint="completions")
    try:
        res = await b.generate(GenerationRequest(prompt="The capital of France is", max_tokens=4, top_logprobs=2))
    finally:
        await b.close()
    assert "Paris" in res.text and len(res.tokens) == res.usage.completion_tokens
    assert all(len(t.top) == 2 for t in res.tokens)


async def test_errors_are_translated(remote):
    b = OpenAIBackend(model="no-such-model", base_url=remote.url + "/v1")
    with pytest.raises(ProviderError) as err:  # a model the upstream lacks: the configuration's fault
        await b.generate(Q)
    assert not isinstance(err.value, ProviderInvalidRequestError) and err.value.status_code == 502
    assert err.value.upstream_status == 404 and isinstance(err.value.__cause__, Exception)
    await b.close()
    dead = OpenAIBackend(model="x", base_url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=5)
    with pytest.raises(ProviderConnectionError):
        await dead.generate(Q)
    await dead.close()
    # a key HTTP headers cannot carry (a curly quote pasted in): the key's fault, said so (not a "malformed
    # response" from a provider that never saw the request)
    from cascade.errors import ProviderAuthError

    curly = OpenAIBackend(model="m", base_url=remote.url + "/v1", api_key="sk-test\u2019s")
    for call in (curly.generate(Q), anext(curly.stream(Q))):
        with pytest.raises(ProviderAuthError, match="the API key or a header cannot be sent"):
            await call
    await curly.close()


async def test_cascade_with_a_remote_first_tier(remote, tmp_path):
    remote_tier = {"name": "remote", "backend": "openai", "model": "smol-remote", "threshold": 1.0,
                   "price": {"input_per_1m": 0.05, "output_per_1m": 0.1}, "max_tokens": 8,
                   "options": {"base_url": remote.url + "/v1"}}
    eng = await Engine.open(make_config(tmp_path, [remote_tier, tier("local")]))
    try:
        rec = (await eng.run(Q)).record
    finally:
        await eng.close()
    assert [a.tier for a in rec.attempts] == ["remote", "local"]
    assert rec.attempts[0].decision == "escalate" and rec.attempts[0].confidence is not None
    assert rec.attempts[0].prompt_tokens > 0 and rec.attempts[0].cost_usd > 0
    assert rec.tier == "local" and rec.escalation_waste_usd == pytest.approx(rec.attempts[0].cost_usd)


async def test_a_message_name_reaches_the_upstream():
    """OpenAI's ``name`` of a participant goes on to an OpenAI-compatible tier as the client sent it."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            await b.generate(GenerationRequest(messages=(Message("system", "Be brief."),
                                                         Message("user", "Hi, I am Ada.", name="ada_l")), max_tokens=4))
        finally:
            await b.close()
        sent = upstream.stats()["log"][-1]["messages"]
    assert sent == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, I am Ada.", "name": "ada_l"}]


async def test_a_long_conversation_does_not_hold_the_event_loop():
    """34k messages (a 1 MB body) reach the upstream intact, with the tier's own extra_body beside them, and
    building the call leaves the event loop free: the SDK's TypedDict transform took ~150 us a message on it,
    5 s here, holding every other request of the server (GET /health included) that long."""
    import asyncio
    import time

    from tests.fault_server import FaultServerThread

    msgs = tuple(Message("user", "") for _ in range(34_000)) + (Message("user", "Hi", name="ada"),)
    with FaultServerThread() as upstream:
        b = OpenAIBackend(model="m", base_url=upstream.base_url, extra_body={"top_k": 5})
        try:
            await b.generate(GenerationRequest(messages=(Message("user", "warm up"),), max_tokens=2))
            stalls: list[float] = []

            async def tick() -> None:
                while True:
                    t = time.perf_counter()
                    await asyncio.sleep(0.01)
                    stalls.append(time.perf_counter() - t - 0.01)

            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)
            await b.generate(GenerationRequest(messages=msgs, max_tokens=2))
            ticker.cancel()
        finally:
            await b.close()
        entry = upstream.stats()["log"][-1]
    assert len(entry["messages"]) == 34_001
    assert entry["messages"][-1] == {"role": "user", "content": "Hi", "name": "ada"}
    assert "top_k" in entry["params"] and "messages" in entry["params"]
    assert max(stalls) < 2.0, max(stalls)  # 5 s and more before (a bound far above what it takes now, ~0.1 s)


def test_an_upstream_error_that_quotes_the_key_reaches_no_one(serve_app, tmp_path, caplog):
    """Providers echo the key (and the request's headers) in error bodies of any status. Whatever the key's
    shape, it reaches neither the client, nor the served answer's attempts, nor the ledger, nor the logs."""
    import httpx

    from tests.fault_server import FaultServerThread

    keys = {"remote": "gsk_Secr3tGroqStyleKey0123456789abcdef", "odd": "Zx9QmT4pLw2Rb7Kc"}  # no known key shape
    with FaultServerThread() as upstream, caplog.at_level("INFO"):
        remote = [{"name": name, "backend": "openai", "model": "m", "max_tokens": 4,
                   "price": {"input_per_1m": 1.0, "output_per_1m": 2.0},
                   "options": {"base_url": upstream.base_url, "api_key": key}} for name, key in keys.items()]
        cfg = make_config(tmp_path, [tier("small", threshold=1.0), *remote],
                          policies={"cascade": {"chain": ["small", "remote"]}})
        srv = serve_app(cfg)
        seen = []
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for model, fault in [("remote", "500:echo"), ("remote", "400:echo"), ("remote", "429:echo"),
                                 ("remote", "401:echo"), ("odd", "404:echo"), ("odd", "503:echo")]:
                upstream.faults(fault)
                r = c.post("/v1/chat/completions", json={"model": model, "messages": [
                    {"role": "user", "content": "Hi"}]})
                assert r.status_code >= 400, (fault, r.text)
                seen.append(r.text)
            upstream.faults("503:echo")  # the cascade: the small answer is served, the remote's failure noted
            r = c.post("/v1/chat/completions", json={"model": "cascade", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.json()["cascade"]["attempts"][1]["decision"] == "error"
            seen.append(r.text)
        assert "credentials rejected (HTTP 401)" in seen[3]
    import sqlite3

    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT error_message FROM requests UNION ALL "
                            "SELECT COALESCE(error_message, '') || ' ' || COALESCE(reason, '') FROM attempts")
        seen += [str(row) for row in rows]
    seen += [r.getMessage() for r in caplog.records]
    assert sum("HTTP 500" in s for s in seen) >= 2  # what the upstream said is kept: only its secrets go
    for key in keys.values():
        assert not [s for s in seen if key in s]
    assert not [s for s in seen if "Bearer " in s and "[redacted]" not in s]


def test_an_upstream_error_that_quotes_the_prompt_reaches_neither_the_ledger_nor_the_logs(serve_app, tmp_path,
                                                                                          caplog):
    """The ledger keeps no prompt (only answers' text, with store_text), and the logs none: a hosted API's refusal
    that quotes the prompt ("your prompt '...' was flagged") had it in the error columns and the log lines, through
    a provider's fallback, a chat or a completion, streamed or not. The run of it is blanked, the rest is kept."""
    import sqlite3

    import httpx

    from tests.fault_server import FaultServerThread

    prompt = "My SSN is 123-45-6789 and my doctor is Jane Roe at Mercy General; what does a 400 mean?"
    with FaultServerThread() as upstream, caplog.at_level("INFO"):
        cfg = make_config(tmp_path, [{"name": "remote", "max_tokens": 4, "providers": [
            {"name": n, "backend": "openai", "model": "m", "options": {"base_url": upstream.base_url}}
            for n in ("a", "b")]}])
        srv = serve_app(cfg)
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
                               ("/v1/completions", {"prompt": prompt})):
                for stream in (False, True):
                    upstream.faults("500:quote", "400:quote")  # (a falls over to b, which refuses it)
                    r = c.post(path, json={"model": "remote", "stream": stream, **body})
                    assert r.status_code == 400 or "error" in r.text, r.text
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        seen = [str(row) for row in conn.execute(
            "SELECT error_message FROM requests UNION ALL "
            "SELECT COALESCE(error_message, '') || ' ' || COALESCE(reason, '') FROM attempts")]
    assert sum("your prompt '[request text]' was flagged by the safety system" in s for s in seen) >= 4, seen
    seen += [r.getMessage() for r in caplog.records]
    assert not [s for s in seen if "123-45-6789" in s or "Jane Roe" in s]


# --- numbers an upstream should never send ------------------------------------------------------------

INF, NAN = float("inf"), float("nan")
LP = GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=4, top_logprobs=2)


async def _answer(b: OpenAIBackend, req: GenerationRequest, stream: bool) -> object:
    """``b``'s answer to ``req``: streamed (its chunks read to the end) or not."""
    if stream:
        return [c async for c in b.stream(req)]
    return await b.generate(req)


@pytest.mark.parametrize("odd", [{"logprob": NAN}, {"logprob": INF}, {"logprob": 5.0}, {"logprob": 1e308},
                                 {"top_logprob": NAN}, {"top_logprob": 1e308}])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_logprob_that_is_no_log_of_a_probability_makes_the_answer_malformed(odd, stream):
    """NaN, a positive value or +inf is no logprob: a confidence made from it would be made up (5.0 read as
    sure), a NaN could not be sent on in JSON (a 500 after an ok ledger row) and 1e308 overflowed exp() in
    the features (a 500, no row). The answer is malformed: its tier falls over, the cascade escalates."""
    from cascade.errors import ProviderServerError
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", **odd})
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            with pytest.raises(ProviderServerError, match="malformed response .*not the log of a probability"):
                await _answer(b, LP, stream)
        finally:
            await b.close()


@pytest.mark.parametrize("token", [None, 5, ["a"]])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_token_whose_text_is_no_string_makes_the_answer_malformed(token, endpoint, stream):
    """A token's text that is null, a number or a list was passed on as it came: the response to the client
    failed (a 500 after an ok ledger row; a stream cut without an error event, recorded as the client's
    disconnection), or a stop sequence's cut raised a TypeError the engine did not know. The answer is
    malformed, as one whose text is no string: its tier falls over."""
    from cascade.errors import ProviderServerError
    from tests.fault_server import FaultServerThread

    req = LP if endpoint == "chat" else GenerationRequest(prompt="Hi", max_tokens=4, top_logprobs=2)
    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "token": token})
        b = OpenAIBackend(model="m", base_url=upstream.base_url, endpoint=endpoint)
        try:
            with pytest.raises(ProviderServerError, match="malformed response .*not a string"):
                await _answer(b, req, stream)
        finally:
            await b.close()


@pytest.mark.parametrize("raw", [5, 2**70, "ab", [300]])
@pytest.mark.parametrize("stream", [False, True])
async def test_token_bytes_that_are_no_byte_values_leave_the_tokens_text(raw, stream):
    """A token's ``bytes`` that are no list of byte values say nothing of it: its text stands. A number N was
    read as N zero bytes (the client got bytes [0, 0, 0, 0, 0]; 2**70, an OverflowError the engine did not
    know, its traceback logged; 10**12, a terabyte asked of memory)."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "bytes": raw})
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            if stream:
                toks = [t async for c in b.stream(LP) for t in c.tokens]
            else:
                toks = list((await b.generate(LP)).tokens)
        finally:
            await b.close()
    assert [t.token for t in toks] == ["Paris", " is", " the", " capital"]
    assert all(t.raw is None and t.utf8 == t.token.encode() for t in toks)


@pytest.mark.parametrize("fault, cut", [({"kind": "drop", "json": True}, True), ({"kind": "gzip", "json": True}, False),
                                        ("gzip", False)])
async def test_a_stream_answered_with_a_body_that_cannot_be_read_is_a_connection_error(fault, cut):
    """A stream request answered with a JSON body (a server that ignores ``stream``) whose reading failed, cut off
    or said to be gzip when it is not, raised the transport's own error (httpx's RemoteProtocolError,
    DecodingError), which the engine did not know: a ProviderError, its traceback logged, not billed. It is what
    the client's reading of any other body (an event stream, an answer unstreamed) says: a failed connection, an
    answer cut off when it was."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults(fault, fault)
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            with pytest.raises(ProviderConnectionError, match="connection failed") as err:
                async for _ in b.stream(LP):
                    pass
            with pytest.raises(ProviderConnectionError, match="connection failed"):  # as the same body unstreamed
                await b.generate(LP)
        finally:
            await b.close()
    assert err.value.answered is cut


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_stream_events_without_data_are_no_events(endpoint):
    """A gateway that numbers its events (``id:``), sends a ``retry:`` first and keeps the connection alive with a
    comment, an ``event: ping`` or a bare ``data:``: each block without data is no event (the SSE spec's), where
    the SDK's decoder passed it on with empty data, read as JSON: every such stream failed as a malformed
    response (JSONDecodeError), fallen over, or cut with an error event once its first chunk was out."""
    from tests.fault_server import FaultServerThread

    req = LP if endpoint == "chat" else GenerationRequest(prompt="Hi", max_tokens=4, top_logprobs=2)
    with FaultServerThread() as upstream:
        upstream.faults("gateway")
        b = OpenAIBackend(model="m", base_url=upstream.base_url, endpoint=endpoint)
        try:
            chunks = [c async for c in b.stream(req)]
        finally:
            await b.close()
    assert "".join(c.text for c in chunks) == "Paris is the capital"
    assert len([t for c in chunks for t in c.tokens]) == 4 and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_a_zero_probability_is_the_lowest_logprob_and_a_hair_above_zero_is_zero(endpoint):
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "logprob": 2e-4, "top_logprob": -INF})
        b = OpenAIBackend(model="m", base_url=upstream.base_url, endpoint=endpoint)
        try:
            res = await b.generate(LP if endpoint == "chat" else GenerationRequest(prompt="Hi", max_tokens=4,
                                                                                   top_logprobs=2))
        finally:
            await b.close()
    assert res.tokens and all(t.logprob == 0.0 for t in res.tokens)
    assert all(a.logprob == -9999.0 for t in res.tokens for a in t.top)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstreams_own_length_finish_is_passed_on(endpoint, stream):
    """An upstream that ends the answer at max_tokens says so, "length": passed on as it came, so that the client
    knows its answer was cut (a "stop" says it is whole). The fault server answers "Paris is the capital of
    France." a word a token, cut at max_tokens itself."""
    from tests.fault_server import FaultServerThread

    def ask(max_tokens: int) -> GenerationRequest:
        return (LP.with_(max_tokens=max_tokens) if endpoint == "chat"
                else GenerationRequest(prompt="Hi", max_tokens=max_tokens, top_logprobs=2))

    async def answer(b: OpenAIBackend, req: GenerationRequest) -> tuple[str, str]:
        if stream:
            chunks = [c async for c in b.stream(req)]
            return "".join(c.text for c in chunks), chunks[-1].finish_reason
        res = await b.generate(req)
        return res.text, res.finish_reason

    with FaultServerThread() as upstream:
        b = OpenAIBackend(model="m", base_url=upstream.base_url, endpoint=endpoint)
        try:
            assert await answer(b, ask(3)) == ("Paris is the", "length")
            assert await answer(b, ask(16)) == ("Paris is the capital of France.", "stop")
        finally:
            await b.close()


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1_000_000, "completion_tokens": -5}, {"prompt_tokens": NAN, "completion_tokens": NAN},
    {"prompt_tokens": INF, "completion_tokens": INF}, {"prompt_tokens": 3.7, "completion_tokens": 2.5},
    {"prompt_tokens": "many", "completion_tokens": None}, {"prompt_tokens": 10**30, "completion_tokens": 1e300}])
@pytest.mark.parametrize("stream", [False, True])
async def test_token_counts_that_are_no_counts_are_estimated(usage, stream):
    """A negative, fractional, infinite, NaN or absurd count made negative costs, a row the ledger could not hold,
    a report that could not be written (int(inf)): such a count is estimated, as a missing one is."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "usage": usage, "finish_reason": 123})
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            if stream:
                chunks = [c async for c in b.stream(LP)]
                got, finish = chunks[-1].usage, chunks[-1].finish_reason
            else:
                res = await b.generate(LP)
                got, finish = res.usage, res.finish_reason
        finally:
            await b.close()
    assert isinstance(got.prompt_tokens, int) and isinstance(got.completion_tokens, int)
    assert 0 < got.prompt_tokens < 100 and 0 < got.completion_tokens <= 4, got
    assert finish == "stop"  # 123 is no finish reason


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cached_count_above_the_prompt_is_the_whole_prompt(stream):
    """A provider that says more of the prompt came from its cache than the prompt holds (800 cached of 100): the
    whole prompt was cached, no more. Taken as it came, the prompt's uncached part was -700 tokens, billed at the
    input price as a credit."""
    from tests.fault_server import FaultServerThread

    usage = {"prompt_tokens": 100, "completion_tokens": 4, "total_tokens": 104,
             "prompt_tokens_details": {"cached_tokens": 800}}
    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "usage": usage})
        b = OpenAIBackend(model="m", base_url=upstream.base_url)
        try:
            got = [c async for c in b.stream(LP)][-1].usage if stream else (await b.generate(LP)).usage
        finally:
            await b.close()
    assert (got.prompt_tokens, got.cached_prompt_tokens, got.completion_tokens) == (100, 100, 4)


async def test_an_absurd_token_count_still_leaves_a_ledger_row(tmp_path):
    """A count beyond any context window (10**30, 1e300) overflowed the ledger's INTEGER columns: the request
    failed with a raw OverflowError and left no row (or only the journal's "Interrupted"). It is estimated."""
    import sqlite3

    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "usage": {"prompt_tokens": 10**30, "completion_tokens": 1e300}})
        eng = await Engine.open(make_config(tmp_path, [
            {"name": "t", "backend": "openai", "model": "m", "threshold": 0.0,
             "options": {"base_url": upstream.base_url}, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}}]))
        try:
            out = await eng.run(LP, request_id="casc-huge")
        finally:
            await eng.close()
    assert out.record.status == "ok" and 0 < out.record.prompt_tokens < 100 and out.record.cost_usd < 1e-3
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        assert conn.execute("SELECT status, error_class FROM requests WHERE request_id='casc-huge'").fetchall() == [
            ("ok", None)]


def two_remote_tiers(tmp_path, first, second):
    """A config of two openai tiers on fault servers, ``first`` (threshold 0.5) then ``second``, as `cascade`."""
    return make_config(tmp_path, [
        {"name": "first", "backend": "openai", "model": "m", "threshold": 0.5, "options": {"base_url": first.base_url}},
        {"name": "second", "backend": "openai", "model": "m", "options": {"base_url": second.base_url}}],
        {"cascade": {"chain": ["first", "second"]}})


async def test_an_empty_answer_with_sure_logprobs_escalates(tmp_path):
    """A null text that comes with confident logprobs is an empty answer: nothing to serve, so it escalates
    (its features say no tokens), as the README promises."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as first, FaultServerThread() as second:
        first.faults({"kind": "odd", "content_null": True, "logprob": -0.001})
        cfg = two_remote_tiers(tmp_path, first, second)
        engine = await Engine.open(cfg)
        try:
            out = await engine.run(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=4),
                                   model="cascade")
        finally:
            await engine.close()
    rec = out.record
    assert rec.tier == "second" and rec.escalated
    assert rec.attempts[0].decision == "escalate" and rec.attempts[0].reason == "empty answer"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_null_logprob_is_floored_alike_on_both_endpoints(endpoint, stream):
    """SGLang and llama.cpp write a logprob of -inf as ``null``: a chosen token's is NULL_TOKEN_LOGPROB (-30, as
    the completions path always floored it), an alternative's LOGPROB_MIN (-inf's). On chat it made the answer
    malformed (float(None)), and an alternative's null did on completions too: the tier fell over."""
    from cascade.backends.openai_backend import LOGPROB_MIN, NULL_TOKEN_LOGPROB
    from tests.fault_server import FaultServerThread

    req = LP if endpoint == "chat" else GenerationRequest(prompt="Hi", max_tokens=4, top_logprobs=2)
    with FaultServerThread() as upstream:
        upstream.faults({"kind": "odd", "logprob": None, "top_logprob": None})
        b = OpenAIBackend(model="m", base_url=upstream.base_url, endpoint=endpoint)
        try:
            if stream:
                tokens = [t for c in [c async for c in b.stream(req)] for t in c.tokens]
            else:
                tokens = list((await b.generate(req)).tokens)
        finally:
            await b.close()
    assert len(tokens) == 4 and all(t.logprob == NULL_TOKEN_LOGPROB for t in tokens)
    assert all(t.top and all(a.logprob == LOGPROB_MIN for a in t.top) for t in tokens)


async def test_an_answer_with_text_but_no_logprobs_says_so(tmp_path):
    """Text with no token logprobs escalates as an empty answer does, but its reason says what happened."""
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as first, FaultServerThread() as second:
        first.faults("bare", "bare")
        cfg = two_remote_tiers(tmp_path, first, second)
        engine = await Engine.open(cfg)
        try:
            q = GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=4)
            rec = (await engine.run(q, model="cascade")).record
            pinned = (await engine.run(q, model="first")).record
        finally:
            await engine.close()
    assert rec.tier == "second" and rec.attempts[0].decision == "escalate"
    assert rec.attempts[0].reason == "the upstream sent no token logprobs"
    assert pinned.attempts[0].reason == "last tier always answers (the upstream sent no token logprobs)"


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_tokens_read_from_the_providers_cache_are_billed_at_the_cached_price(tmp_path, stream):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (prompt caching: half price or less) is billed at
    the tier's, or its provider's, ``cached_input_per_1m``; without one, at the input price. The ledger keeps
    the count beside the prompt's, and the client's usage carries it as OpenAI's does."""
    import sqlite3

    from tests.fault_server import FaultServerThread

    from serving.protocol import usage_block

    usage = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
             "prompt_tokens_details": {"cached_tokens": 800}}
    with FaultServerThread() as up:
        prices = {"input_per_1m": 2.0, "output_per_1m": 4.0}
        cfg = make_config(tmp_path, [
            {"name": "cached", "backend": "openai", "model": "m", "threshold": 0.0, "max_tokens": 4,
             "price": {**prices, "cached_input_per_1m": 0.5}, "options": {"base_url": up.base_url}},
            {"name": "uncached", "backend": "openai", "model": "m", "threshold": 0.0, "max_tokens": 4,
             "price": prices, "options": {"base_url": up.base_url}},
            {"name": "providers", "threshold": 0.0, "max_tokens": 4, "price": prices,
             "providers": [{"name": "p", "backend": "openai", "model": "m", "options": {"base_url": up.base_url},
                            "price": {**prices, "cached_input_per_1m": 0.2}}]}])
        engine = await Engine.open(cfg)
        q = GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=4)
        got = {}
        try:
            for name in ("cached", "uncached", "providers"):
                up.faults({"kind": "odd", "usage": usage})
                if stream:
                    events = [ev async for ev in engine.stream(q, model=name, request_id=f"r-{name}")]
                    end = events[-1]
                    got[name] = (end.record, end.usage)
                else:
                    out = await engine.run(q, model=name, request_id=f"r-{name}")
                    got[name] = (out.record, out.result.usage)
        finally:
            await engine.close()
    costs = {name: rec.cost_usd for name, (rec, _) in got.items()}
    assert costs["cached"] == pytest.approx((200 * 2.0 + 800 * 0.5 + 10 * 4.0) / 1e6)
    assert costs["uncached"] == pytest.approx((1000 * 2.0 + 10 * 4.0) / 1e6)
    assert costs["providers"] == pytest.approx((200 * 2.0 + 800 * 0.2 + 10 * 4.0) / 1e6)
    for rec, use in got.values():
        assert rec.attempts[-1].cached_prompt_tokens == use.cached_prompt_tokens == 800
        assert usage_block(use)["prompt_tokens_details"] == {"cached_tokens": 800}
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT request_id, cached_prompt_tokens, cost_usd FROM attempts ORDER BY 1").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("r-cached", 800), ("r-providers", 800), ("r-uncached", 800)]
    assert {r[0]: r[2] for r in rows} == pytest.approx({f"r-{n}": c for n, c in costs.items()})


@pytest.mark.parametrize("userinfo,shown", [("proxyuser:{secret}", "proxyuser:***@127.0.0.1"),
                                             ("{secret}", "http://***@127.0.0.1")])
def test_a_base_url_with_basic_credentials_keeps_its_password_out_of_the_log(tmp_path, userinfo, shown):
    """httpx sends a base_url's user:password as basic credentials, and logs every call's URL at INFO: the
    server's log (text lines, as `cascade serve` writes them) shows the URL with its password masked. A key
    given as the user alone (``https://KEY@host``: httpx sends it as the basic user, with no password) is the
    credential itself: it is masked whole (it was logged on every call)."""
    import sqlite3

    import httpx

    from tests.conftest import free_port
    from tests.fault_server import FaultServerThread
    from tests.test_stalled_streams import serve, stop

    password = "hunter2-PROXY-PASS"
    with FaultServerThread() as upstream:
        port = free_port()
        base_url = upstream.base_url.replace("http://", f"http://{userinfo.format(secret=password)}@")
        cfg = {"server": {"host": "127.0.0.1", "port": port, "log_level": "info"},
               "ledger": {"path": str(tmp_path / "ledger.sqlite")},
               "tiers": [{"name": "remote", "backend": "openai", "model": "m", "timeout_s": 30,
                          "options": {"base_url": base_url}}],
               "policies": {"cascade": {"chain": ["remote"]}}}
        proc = serve(cfg, tmp_path)
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": "cascade", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
            upstream.faults("500:echo")
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": "cascade", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code >= 500 and password not in r.text
        finally:
            out = stop(proc)
    assert shown in out, out  # the call's line is there, its password is not
    assert password not in out, out
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        assert not [m for (m,) in conn.execute("SELECT error_message FROM attempts") if m and password in m]


async def test_each_backend_logs_a_malformed_answers_traceback_once_of_its_own(caplog):
    """The malformed answers whose traceback was logged were a module-level set, shared by every backend the
    process ever built: state at import, so a backend built anew (a reload, another engine in the same process)
    never logged one. Each backend keeps its own: the first malformed answer of each kind has its traceback."""
    from cascade.errors import ProviderServerError
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        upstream.faults(rate=1.0, kinds=["garbled"])
        for _ in range(2):
            b = OpenAIBackend(model="m", name="same", base_url=upstream.base_url)
            try:
                for _ in range(3):
                    with pytest.raises(ProviderServerError, match="malformed response"):
                        await b.generate(LP)
            finally:
                await b.close()
    records = [r for r in caplog.records if "malformed response" in r.getMessage()]
    assert len(records) == 6, [r.getMessage() for r in records]
    assert [r.exc_info is not None for r in records] == [True, False, False] * 2
