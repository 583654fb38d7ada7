"""OpenAI's Responses API (``POST /v1/responses``) on a real uvicorn server, driven by the openai SDK's own
``client.responses`` (which parses every object and event into its types): the cascade in front of a real
OpenAI-protocol server on loopback (tests/fault_server.py, which logs the messages it was sent) and of the
real SmolLM2 on CPU, with a real SQLite ledger."""

from __future__ import annotations

import json
import sqlite3

import httpx
import openai
import pytest

from tests.conftest import make_config, tier
from tests.fault_server import DEFAULT_ANSWER, FaultServerThread


@pytest.fixture
def upstream():
    with FaultServerThread() as fs:
        yield fs


def _remote(fs: FaultServerThread, **kw: object) -> dict:
    return {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 32, "threshold": 0.0,
            "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": fs.base_url}, **kw}


def _client(srv) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-none", max_retries=0)


def _events(text: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of an SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_response_is_the_cascades_answer_in_the_responses_shape(tmp_path, upstream, serve_app):
    """Instructions become the system message, a developer turn a system one, an earlier ``resp.output``
    sent back an assistant turn; the answer comes back as a message item with usage, the cascade's account
    and the ledger row's id, which the ledger files under the endpoint ``responses``."""
    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    client = _client(srv)
    first = client.responses.create(model="cascade", input="Where is Paris?", instructions="Be brief.",
                                    user="u-1", metadata={"team": "geo"})
    assert first.output_text == DEFAULT_ANSWER and first.status == "completed" and first.model == "remote"
    assert first.object == "response" and first.id.startswith("resp_") and first.incomplete_details is None
    (item,) = first.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].logprobs == []   # not asked for
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens > 0
    assert first.instructions == "Be brief." and first.metadata == {"team": "geo"} and first.user == "u-1"
    acct = first.model_extra["cascade"]
    assert acct["tier"] == "remote" and acct["cost_usd"] > 0 and first.id == "resp_" + acct["request_id"]

    raw = client.responses.with_raw_response.create(
        model="cascade", input=[{"role": "developer", "content": "Answer in French."},
                                {"role": "user", "content": "Where is Paris?"}, *first.output,
                                {"role": "user", "content": [{"type": "input_text", "text": "And Lyon?"}]}],
        max_output_tokens=16)
    second = raw.parse()
    assert raw.headers["x-request-id"] == second.model_extra["cascade"]["request_id"]
    sent = [e["messages"] for e in upstream.stats()["log"]]
    assert sent[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    assert sent[1] == [{"role": "system", "content": "Answer in French."},
                       {"role": "user", "content": "Where is Paris?"},
                       {"role": "assistant", "content": DEFAULT_ANSWER},
                       {"role": "user", "content": "And Lyon?"}]
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT endpoint, status, end_user, metadata, completion_tokens FROM requests "
                          "ORDER BY created_at").fetchall()
    assert rows[0] == ("responses", "ok", "u-1", '{"team": "geo"}', first.usage.output_tokens)
    assert rows[1][:2] == ("responses", "ok")
    # strictly as the SDK types it, not only its lenient parsing; and nothing is kept to fetch again
    from openai.types.responses import Response as SDKResponse

    body = httpx.post(srv.url + "/v1/responses", json={"model": "cascade", "input": "hi"}, timeout=30).json()
    SDKResponse.model_validate(body)
    gone = httpx.get(srv.url + "/v1/responses/" + body["id"], timeout=30)
    assert gone.status_code == 404 and "keeps no responses" in gone.json()["error"]["message"]


def test_a_streamed_response_is_the_sdks_event_sequence_and_its_final_response(tmp_path, upstream, serve_app):
    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    with _client(srv).responses.stream(model="cascade", input="Where is Paris?",
                                       include=["message.output_text.logprobs"], top_logprobs=2) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == DEFAULT_ANSWER == final.output_text
    assert all(len(lp.top_logprobs) == 2 for d in deltas for lp in d.logprobs)
    assert final.status == "completed" and final.usage.output_tokens == len(final.output[0].content[0].logprobs)
    acct = final.model_extra["cascade"]
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        row = db.execute("SELECT endpoint, status, cost_usd FROM requests WHERE request_id=?",
                         (acct["request_id"],)).fetchone()
    assert row == ("responses", "ok", pytest.approx(acct["cost_usd"]))
    # a saved history goes back as input: the dump of a streamed response's output (the SDK adds `parsed`)
    again = _client(srv).responses.create(model="cascade", input=[{"role": "user", "content": "Where is Paris?"},
                                                                 *[o.model_dump() for o in final.output],
                                                                 {"role": "user", "content": "And Lyon?"}])
    assert again.output_text == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"][1] == {"role": "assistant", "content": DEFAULT_ANSWER}


def test_max_output_tokens_makes_an_incomplete_response(tmp_path, serve_app):
    """On the real SmolLM2: an answer cut by ``max_output_tokens`` is ``incomplete`` (reason
    ``max_output_tokens``), streamed or not, as OpenAI says it."""
    srv = serve_app(make_config(tmp_path, [tier("small", threshold=0.0, max_tokens=64)]))
    resp = _client(srv).responses.create(model="small", input="Count from one to twenty.", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.output[0].status == "incomplete" and resp.output_text
    r = httpx.post(srv.url + "/v1/responses", timeout=120, json={"model": "small", "input": "Count from one to "
                   "twenty.", "max_output_tokens": 3, "stream": True})
    events = _events(r.text)
    assert events[-1][0] == "response.incomplete" and events[-1][1]["response"]["status"] == "incomplete"
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == resp.output_text  # greedy: the same


def test_a_filtered_answer_makes_an_incomplete_response(tmp_path, upstream, serve_app):
    """An upstream's ``content_filter`` finish is OpenAI's other reason for ``incomplete`` (it was reported
    ``completed``, as if the answer were whole), streamed or not."""
    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    filtered = {"kind": "odd", "finish_reason": "content_filter"}
    upstream.faults(filtered, filtered)
    resp = _client(srv).responses.create(model="cascade", input="hi")
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "content_filter"
    r = httpx.post(srv.url + "/v1/responses", timeout=60, json={"model": "cascade", "input": "hi", "stream": True})
    events = _events(r.text)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_a_stream_that_breaks_ends_with_response_failed_and_a_partial_row(tmp_path, upstream, serve_app):
    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    upstream.faults("drop:2")                              # two chunks, then the upstream connection closes
    r = httpx.post(srv.url + "/v1/responses", timeout=60, json={"model": "cascade", "input": "hi", "stream": True})
    assert r.status_code == 200
    events = _events(r.text)
    kind, data = events[-1]
    assert kind == "response.failed" and data["response"]["status"] == "failed"
    from openai.types.responses import ResponseFailedEvent

    ResponseFailedEvent.model_validate(data)              # its error code is one of OpenAI's
    assert data["response"]["error"]["message"].startswith("stream interrupted")
    sent = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    assert sent and data["response"]["output"][0]["content"][0]["text"] == sent
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        status = db.execute("SELECT status FROM requests WHERE request_id=?",
                            (data["response"]["cascade"]["request_id"],)).fetchone()[0]
    assert status == "partial"



def test_a_connection_lost_after_the_finish_reason_ends_the_stream_whole(tmp_path, upstream, serve_app):
    """The upstream sends every token and the finish reason, then its connection is lost before the usage chunk
    (and ``[DONE]``): the answer is whole, so the stream ends as one does (``response.completed``; a chat stream's
    ``finish_reason`` chunk, no error for the SDK to raise), its usage estimated and its row ``ok``. It ended with
    ``response.failed`` (chat: an error event, the SDK's APIError) after the whole text, and a ``partial`` row."""
    from tests.fault_server import _tokens

    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    after_finish = f"drop:{len(_tokens(DEFAULT_ANSWER)) + 1}"     # the token chunks and the finish chunk
    upstream.faults(after_finish)
    with _client(srv).responses.stream(model="cascade", input="hi") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.output_text == DEFAULT_ANSWER
    assert final.usage.output_tokens > 0
    upstream.faults(after_finish)
    chunks = list(_client(srv).chat.completions.create(model="cascade", stream=True,
                                                       messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT endpoint, status, completion_tokens FROM requests ORDER BY created_at").fetchall()
    assert [r[:2] for r in rows] == [("responses", "ok"), ("chat", "ok")] and all(r[2] > 0 for r in rows)

@pytest.mark.parametrize(("body", "param", "words"), [
    ({"previous_response_id": "resp_x"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no conversations"),
    ({"background": True}, "background", "not supported"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "tools are not supported"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format.type", "text"),
    # said as the chat endpoint says it, not pydantic's "Input should be 'none' or 'auto'" / "... 'disabled'"
    ({"tool_choice": "required"}, "tool_choice", "tools are not supported by this server: only 'none'"),
    ({"tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "tools are not supported by this server"),
    ({"truncation": "auto"}, "truncation", "truncation: 'auto' is not supported (only 'disabled'): this server "
                                           "does not drop earlier turns"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "only 'message.output_text.logprobs'"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}, "input", "'function_call_output'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "input_image"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"role": "user", "content": "x", "foo": 1}]}, "input", "item 0: foo: unknown parameter"),
    # pydantic's words were "content.str: Input should be a valid string (and 1 more)", "Field required"
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input",
     "input: item 0: content.0.text: missing required parameter"),
    ({"input": [{"role": "user"}]}, "input", "input: item 0: content: missing required parameter"),
    # two errors in an item, one elsewhere: each count said once, and of what ("(and 1 more) (and 1 more)")
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 1, "x": 2}]}], "temperature": "x"},
     "input", "item 0: content.0.text: Input should be a valid string (and 1 more in this item) (and 1 more)"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input", "item 0: content part 0 is not an object"),
    ({"input": [5]}, "input", "an input item is an object (a message), got a number"),
    ({"input": None}, "input", "a string or a list of input items, got null"),
    ({"input": [{"role": "user", "content": "x"}, {"role": "tool", "content": "4"}]}, "input", "item 1: role"),
    ({"input": {"role": "user", "content": "x"}}, "input", "a string or a list of input items"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options",
     "stream_options: only allowed when stream is true"),
    ({"n": None}, "n", "n: unknown parameter"),  # a chat parameter, not one of responses: unknown even when null
    ({"echo": None}, "echo", "echo: unknown parameter"),
    # no lax coercion ("false" was read as false, 0 as no parallel tool calls)
    ({"background": "false"}, "background", "valid boolean"),
    ({"store": "yes"}, "store", "valid boolean"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls", "valid boolean"),
    ({"temperature": True}, "temperature", "valid number"),
    ({"top_p": "1"}, "top_p", "valid number"),
])
def test_what_a_stateless_server_without_tools_cannot_do_is_a_400_naming_it(tmp_path, upstream, serve_app, body,
                                                                         param, words):
    srv = serve_app(make_config(tmp_path, [_remote(upstream)]))
    r = httpx.post(srv.url + "/v1/responses", json={"model": "cascade", "input": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    assert upstream.stats()["requests"] == 0
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:   # refused, and in the ledger under its endpoint
        row = db.execute("SELECT endpoint, status, error_class FROM requests WHERE request_id=?",
                         (r.headers["x-request-id"],)).fetchone()
    assert row == ("responses", "error", "InvalidRequestError")


def test_the_service_parameters_an_sdk_sends_are_accepted(tmp_path, upstream, serve_app):
    """What changes nothing here (``store``, ``reasoning``, ``truncation``, an empty tool list...) is accepted,
    as the chat endpoint accepts OpenAI's service parameters; ``max_output_tokens`` over the server's limit is
    refused as ``max_tokens`` is."""
    srv = serve_app(make_config(tmp_path, [_remote(upstream)], server={"max_tokens_limit": 64}))
    resp = _client(srv).responses.create(
        model="cascade", input="hi", store=True, reasoning={"effort": "low"}, truncation="disabled", tools=[],
        tool_choice="auto", parallel_tool_calls=False, service_tier="auto", prompt_cache_key="k",
        text={"format": {"type": "text"}}, temperature=None, top_p=None, background=False)
    assert resp.output_text == DEFAULT_ANSWER and resp.store is False and resp.parallel_tool_calls is False
    r = httpx.post(srv.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 65}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"


def test_a_special_token_in_a_turn_is_refused_naming_the_field_it_came_in(tmp_path, serve_app, smol_path):
    """On the real SmolLM2 under a chat template that trims each message (so a special token's string in a
    message's text cannot be kept as text): the refusal names the input item, or the instructions, it came in
    (it named ``messages.3.content``, a field a Responses request does not have, counting the instructions)."""
    model = tmp_path / "smol-trimming"
    model.mkdir()
    for f in smol_path.iterdir():
        if f.name != "chat_template.jinja":
            (model / f.name).symlink_to(f)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    srv = serve_app(make_config(tmp_path, [tier("small", model=str(model), threshold=0.0)]))
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": " <|im_end|>"}]
    for body, param in [({"instructions": "Be brief.", "input": turns}, "input.2.content"),
                        ({"input": turns}, "input.2.content"),
                        ({"instructions": " <|im_end|>", "input": "hi"}, "instructions"),
                        ({"input": " <|im_end|>"}, "input")]:
        r = httpx.post(srv.url + "/v1/responses", json={"model": "small", **body}, timeout=120)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, err
        assert err["message"].startswith(f"{param}: holds a special token"), err
