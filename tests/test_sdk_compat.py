"""What the openai SDK sends, as its own helpers and signatures send it, on a real uvicorn server in front of a
real OpenAI-protocol server on loopback (tests/fault_server.py, which logs the messages it was sent) and of the
real SmolLM2 on CPU: assistant messages its ``.parse`` and ``.stream`` helpers return, sent back; an explicit
``null`` for any parameter the SDK knows; ``stream_options.include_obfuscation``; ``top_p=0``."""

from __future__ import annotations

import typing

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params

from tests.conftest import ServerThread, make_config, tier
from tests.fault_server import DEFAULT_ANSWER, FaultServerThread

Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def upstream():
    with FaultServerThread() as fs:
        yield fs


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 16, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    cfg = make_config(tmp_path_factory.mktemp("sdk"), [tier("small", threshold=0.0), remote])
    with ServerThread(__import__("serving").create_app(cfg)) as srv:
        yield srv


@pytest.fixture
def client(server, upstream) -> openai.OpenAI:
    upstream.reset()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-none", max_retries=0)


def _sdk_params(typed_dict: type, *required: str) -> list[str]:
    """The optional parameters the installed SDK sends for an endpoint (its ``*CreateParamsBase``)."""
    return sorted(set(typing.get_type_hints(typed_dict)) - set(required))


def _refusal(exc: openai.BadRequestError) -> str:
    return exc.body["message"] if isinstance(exc.body, dict) else str(exc.body)


# --- assistant messages the SDK's helpers return, sent back ---------------------------------------

def test_a_streamed_final_completions_message_goes_back_as_the_sdk_returned_it(client, upstream):
    """``.stream(...).get_final_completion()`` gives a ParsedChatCompletionMessage carrying ``parsed: None``:
    appended to the messages as it came, it is the assistant turn (upstream gets role and content only)."""
    with client.chat.completions.stream(model="remote", messages=Q) as stream:
        message = stream.get_final_completion().choices[0].message
    assert message.content == DEFAULT_ANSWER and message.parsed is None
    again = client.chat.completions.create(model="remote", messages=[*Q, message,
                                                                     {"role": "user", "content": "And Spain?"}])
    assert again.choices[0].message.content == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"][1] == {"role": "assistant", "content": DEFAULT_ANSWER}


def test_a_parsed_completions_message_goes_back_as_the_sdk_returned_it(client, upstream):
    first = client.chat.completions.parse(model="remote", messages=Q)
    message = first.choices[0].message
    assert message.parsed is None
    again = client.chat.completions.parse(model="remote", messages=[*Q, message,
                                                                    {"role": "user", "content": "And Spain?"}])
    assert again.choices[0].message.content == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"][1] == {"role": "assistant", "content": DEFAULT_ANSWER}


# --- an explicit null for an OpenAI parameter: its default -----------------------------------------

def test_null_for_every_chat_parameter_the_sdk_knows_is_its_default(client):
    nulls = {k: None for k in _sdk_params(chat_params.CompletionCreateParamsBase, "messages", "model")}
    assert {"logit_bias", "modalities", "verbosity", "prediction", "audio", "tools", "tool_choice", "functions",
            "prompt_cache_retention", "web_search_options"} <= set(nulls)
    resp = client.chat.completions.create(model="remote", messages=Q, stream=None, **nulls)
    assert resp.choices[0].message.content == DEFAULT_ANSWER


def test_no_tools_in_their_empty_forms_are_accepted(client):
    """A client that always sends its (empty) tool list and a choice of none, as agent frameworks do, is answered:
    this server has no tools, and that is what the request asks for."""
    resp = client.chat.completions.create(model="remote", messages=Q, tools=[], tool_choice="none",
                                          parallel_tool_calls=False)
    assert resp.choices[0].message.content == DEFAULT_ANSWER


def test_null_for_every_completions_parameter_the_sdk_knows_is_its_default(client):
    nulls = {k: None for k in _sdk_params(completion_params.CompletionCreateParamsBase, "prompt", "model")}
    assert {"best_of", "logit_bias"} <= set(nulls)
    resp = client.completions.create(model="remote", prompt="The capital of France is", stream=None, **nulls)
    assert resp.choices[0].text == DEFAULT_ANSWER


def test_null_for_every_responses_parameter_the_sdk_knows_is_its_default(client):
    nulls = {k: None for k in _sdk_params(responses_params.ResponseCreateParamsBase, "input", "model")}
    resp = client.responses.create(model="remote", input="Where is Paris?", stream=None, **nulls)
    assert resp.output_text == DEFAULT_ANSWER


#: what a value for an OpenAI parameter this server has no use for is told
UNSUPPORTED = "not supported by this server (OpenAI's parameter for a feature it does not have)"


@pytest.mark.parametrize(("endpoint", "body", "param", "why"), [
    ("chat", {"logit_bias": {"1": 5}}, "logit_bias", "not supported (only {} is accepted)"),
    ("completions", {"logit_bias": {"1": 5}}, "logit_bias", "not supported (only {} is accepted)"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "tools are not supported by this server (it has none to call)"),
    ("chat", {"tool_choice": "required"}, "tool_choice",
     "tools are not supported by this server: only 'none' (or 'auto', which is none here)"),
    ("chat", {"functions": [{"name": "f"}]}, "functions",
     "tools are not supported by this server (it has none to call)"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities",
     "only ['text'] is supported (this server answers in text)"),
    ("completions", {"best_of": 2}, "best_of", "only 1 is supported"),
    ("chat", {"frobnicate": None}, "frobnicate", "unknown parameter"),  # not an OpenAI parameter, null or not
    ("completions", {"audio": None}, "audio", "unknown parameter"),    # a chat parameter, not one of completions
    ("completions", {"echo": None, "store": True}, "store", "unknown parameter"),  # chat's service parameters
    ("completions", {"reasoning_effort": "high"}, "reasoning_effort", "unknown parameter"),
    ("chat", {"echo": None}, "echo", "unknown parameter"),              # a completions parameter
    ("responses", {"frobnicate": None}, "frobnicate", "unknown parameter"),
    ("responses", {"presence_penalty": None}, "presence_penalty", "unknown parameter"),
    # OpenAI's own parameters for what this server cannot do: not supported, not "unknown" (a misspelling)
    ("chat", {"prediction": {"type": "content", "content": "Paris"}}, "prediction", UNSUPPORTED),
    ("chat", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio", UNSUPPORTED),
    ("chat", {"web_search_options": {}}, "web_search_options", UNSUPPORTED),
    ("chat", {"moderation": {"model": "omni-moderation-latest"}}, "moderation", UNSUPPORTED),
    ("responses", {"context_management": [{"type": "compaction"}]}, "context_management", UNSUPPORTED),
    ("responses", {"moderation": {"model": "omni-moderation-latest"}}, "moderation", UNSUPPORTED),
])
def test_a_value_for_an_unsupported_parameter_is_still_refused_by_name(client, endpoint, body, param, why):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model="remote", messages=Q, extra_body=body)
        elif endpoint == "completions":
            client.completions.create(model="remote", prompt="Paris", extra_body=body)
        else:
            client.responses.create(model="remote", input="Paris", extra_body=body)
    assert _refusal(err.value) == f"{param}: {why}" and err.value.body["param"] == param


def test_the_defaults_of_unsupported_parameters_ask_nothing_and_are_accepted(client):
    """``logit_bias: {}`` and ``best_of: 1`` are OpenAI's defaults: nothing asked, so nothing refused; nor
    ``modalities: ["text"]`` (what every answer here is) and ``verbosity``, accepted without effect as
    ``reasoning_effort`` is, and as the Responses API's ``text.verbosity`` is (both were "unknown parameter")."""
    resp = client.chat.completions.create(model="remote", messages=Q, logit_bias={})
    assert resp.choices[0].message.content == DEFAULT_ANSWER
    resp = client.chat.completions.create(model="remote", messages=Q, modalities=["text"], verbosity="low")
    assert resp.choices[0].message.content == DEFAULT_ANSWER
    done = client.completions.create(model="remote", prompt="Paris", best_of=1, logit_bias={})
    assert done.choices[0].text == DEFAULT_ANSWER


def test_a_messages_text_parts_reach_the_model_as_separate_texts(client, upstream):
    """Parts are joined with a newline, as vLLM joins them: "Translate to French:" and "Hello" were sent to the
    tier as "Translate to French:Hello", on chat and on responses."""
    client.chat.completions.create(model="remote", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Translate to French:"}, {"type": "text", "text": "Hello"}]}])
    client.responses.create(model="remote", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Translate to French:"}, {"type": "input_text", "text": "Hello"}]}])
    sent = [e["messages"] for e in upstream.stats()["log"]]
    assert sent == [[{"role": "user", "content": "Translate to French:\nHello"}]] * 2


@pytest.mark.parametrize("retention", ["in_memory", "24h"])
def test_prompt_cache_retention_is_accepted_and_changes_nothing(client, retention):
    resp = client.chat.completions.create(model="remote", messages=Q, prompt_cache_retention=retention)
    assert resp.choices[0].message.content == DEFAULT_ANSWER


#: OpenAI's prompt caching as its SDK now sends it: ``prompt_cache_options`` (which replaces
#: ``prompt_cache_retention``) and a ``prompt_cache_breakpoint`` on a text part
CACHE_OPTIONS = {"mode": "explicit", "ttl": "30m"}
BREAKPOINT = {"mode": "explicit", "ttl": "12h"}


def test_prompt_cache_options_and_breakpoints_are_accepted_and_change_nothing_on_chat(client, upstream):
    parts = [{"type": "text", "text": "Translate to French:", "prompt_cache_breakpoint": BREAKPOINT},
             {"type": "text", "text": "Hello", "prompt_cache_breakpoint": {"mode": "explicit"}}]
    resp = client.chat.completions.create(model="remote", messages=[{"role": "user", "content": parts}],
                                          prompt_cache_options=CACHE_OPTIONS)
    assert resp.choices[0].message.content == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"] == [{"role": "user", "content": "Translate to French:\nHello"}]
    resp = client.chat.completions.create(model="remote", messages=Q, prompt_cache_options={})
    assert resp.choices[0].message.content == DEFAULT_ANSWER


def test_prompt_cache_options_and_breakpoints_are_accepted_and_change_nothing_on_responses(client, upstream):
    parts = [{"type": "input_text", "text": "Translate to French:", "prompt_cache_breakpoint": BREAKPOINT},
             {"type": "input_text", "text": "Hello", "prompt_cache_breakpoint": None}]
    resp = client.responses.create(model="remote", input=[{"role": "user", "content": parts}],
                                   prompt_cache_options=CACHE_OPTIONS)
    assert resp.output_text == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"] == [{"role": "user", "content": "Translate to French:\nHello"}]


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("chat", {"prompt_cache_options": {"mode": "sometimes"}}, "prompt_cache_options.mode"),
    ("chat", {"prompt_cache_options": {"ttl": "30m", "size": 1}}, "prompt_cache_options.size"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                          "prompt_cache_breakpoint": {"ttl": "30m"}}]}]},
     "messages.0.content.0.prompt_cache_breakpoint.mode"),
    ("responses", {"prompt_cache_options": "30m"}, "prompt_cache_options"),
])
def test_malformed_prompt_cache_options_are_refused_by_name(client, endpoint, body, param):
    create = client.chat.completions.create if endpoint == "chat" else client.responses.create
    base = {"messages": Q} if endpoint == "chat" else {"input": "Where is Paris?"}
    with pytest.raises(openai.BadRequestError) as exc:
        create(model="remote", **{**base, **body})
    assert exc.value.body["param"] == param, exc.value.body



def test_every_reasoning_option_the_sdk_knows_is_accepted_and_changes_nothing(client, upstream):
    """``reasoning`` changes nothing here (no tier reasons apart from its answer), whatever of it the SDK sends,
    streamed or not: its ``mode`` and ``context`` were refused as unknown parameters (400)."""
    from openai.types.shared_params import Reasoning

    options = {"effort": "high", "summary": "auto", "generate_summary": "concise", "mode": "pro",
               "context": "all_turns"}
    assert set(options) == set(typing.get_type_hints(Reasoning))  # (the SDK's own list of them)
    resp = client.responses.create(model="remote", input="Where is Paris?", reasoning=options)
    assert resp.output_text == DEFAULT_ANSWER
    with client.responses.stream(model="remote", input="Where is Paris?", reasoning=options) as stream:
        assert stream.get_final_response().output_text == DEFAULT_ANSWER
    assert upstream.stats()["log"][-1]["messages"] == [{"role": "user", "content": "Where is Paris?"}]

# --- stream_options.include_obfuscation --------------------------------------------------------------

@pytest.mark.parametrize("obfuscation", [False, True])
def test_include_obfuscation_is_accepted_and_changes_nothing(client, obfuscation):
    options = {"include_usage": True, "include_obfuscation": obfuscation}
    chunks = list(client.chat.completions.create(model="remote", messages=Q, stream=True, stream_options=options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert not any("obfuscation" in (c.model_extra or {}) for c in chunks)
    chunks = list(client.completions.create(model="remote", prompt="Paris", stream=True, stream_options=options))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_stream_chunks_carry_the_null_fields_openai_sends(server):
    """As OpenAI's: with include_usage every chunk carries ``usage`` (null but in the last), every chat chunk
    ``system_fingerprint`` (null, as the unstreamed answer), and the first delta ``refusal`` (null)."""
    import json

    import httpx

    body = {"model": "remote", "messages": Q, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert all("usage" in c and "system_fingerprint" in c for c in chunks)
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    body = {"model": "remote", "prompt": "Paris", "stream": True}  # no include_usage: no usage key
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert chunks and not any("usage" in c for c in chunks)


# --- top_p=0: only the most likely token, i.e. greedy ---------------------------------------------

def test_top_p_zero_is_greedy_decoding_on_every_endpoint(client):
    """OpenAI accepts 0 <= top_p <= 1; top_p 0 keeps only the most likely token. On the real SmolLM2 at
    temperature 2 it answers the greedy answer whatever the seed, where top_p 1 samples."""
    def chat(**kw):  # noqa: ANN003, ANN202
        return client.chat.completions.create(model="small", messages=Q, max_tokens=8, **kw).choices[0].message.content

    greedy = chat()
    assert all(chat(temperature=2.0, top_p=0, seed=s) == greedy for s in (1, 2, 3))
    assert any(chat(temperature=2.0, top_p=1, seed=s) != greedy for s in (1, 2, 3))   # the control: it samples

    def completion(**kw):  # noqa: ANN003, ANN202
        return client.completions.create(model="small", prompt="The capital of France is", max_tokens=8,
                                         **kw).choices[0].text

    greedy = completion()
    assert all(completion(temperature=2.0, top_p=0, seed=s) == greedy for s in (1, 2))

    greedy = client.responses.create(model="small", input="Where is Paris?", max_output_tokens=8).output_text
    for _ in range(2):   # no seed here: sampled at temperature 2, two answers would differ
        resp = client.responses.create(model="small", input="Where is Paris?", max_output_tokens=8,
                                       temperature=2.0, top_p=0)
        assert resp.output_text == greedy and resp.top_p == 0


def test_top_p_zero_is_answered_as_the_greedy_request_it_is(tmp_path, upstream, serve_app):
    """What the tiers are asked for top_p 0 is greedy decoding (temperature 0, top_p 1: vLLM and providers
    refuse a top_p of 0): the response cache, which keeps greedy answers only, serves a top_p 0 request at
    temperature 1.5 the greedy answer it holds, on each endpoint, without asking the upstream again."""
    remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 16, "threshold": 0.0,
              "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": {"base_url": upstream.base_url}}
    srv = serve_app(make_config(tmp_path, [remote], cache={"enabled": True}))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-none", max_retries=0)
    calls = [
        lambda **kw: client.chat.completions.create(model="remote", messages=Q, **kw),
        lambda **kw: client.completions.create(model="remote", prompt="The capital of France is", **kw),
        lambda **kw: client.responses.create(model="remote", input="Where is Paris?", **kw),
    ]
    for call in calls:
        greedy = call()
        asked = upstream.stats()["requests"]
        again = call(temperature=1.5, top_p=0)
        assert again.model_extra["cascade"]["cached_from"] == greedy.model_extra["cascade"]["request_id"]
        assert upstream.stats()["requests"] == asked
