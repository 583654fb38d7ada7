"""Stop sequences: the answer ends before the stop, streamed or not, and its logprob tokens fit it.

The invariant checked everywhere: the tokens' texts join to the answer, and their bytes (``bytes`` in chat
logprobs, ``TokenLogprob.utf8``) to its UTF-8, also when a stop sequence cut the answer inside a token.
Real parts only: SmolLM2-135M on CPU through the transformers backend, our own server on loopback reached
through the official openai client and through the openai backend.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from cascade.backends.openai_backend import OpenAIBackend
from cascade.types import (
    GenerationRequest,
    GenerationResult,
    HeldText,
    HeldTokens,
    Message,
    TokenLogprob,
    fit_tokens,
)
from tests.conftest import free_port, make_config, tier

QUESTION = "What is the capital of France?"  # SmolLM2: "The capital of France is Paris."
PROMPT = "The capital of France is"          # SmolLM2: " Paris.\n\n..."


def chat(stop: tuple[str, ...] = (), **kw) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", QUESTION),), max_tokens=16, top_logprobs=2, stop=stop, **kw)


def completion(stop: tuple[str, ...] = (), **kw) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, max_tokens=8, top_logprobs=2, stop=stop, **kw)


def assert_fits(text: str, tokens, stop: str | None = None) -> None:
    """The tokens join to the text, in characters and in UTF-8 bytes; the text holds no stop sequence."""
    assert tokens, text
    assert "".join(t.token for t in tokens) == text
    assert b"".join(t.utf8 for t in tokens) == text.encode("utf-8")
    if stop is not None:
        assert stop not in text


def assert_cut_at(text: str, full: str, stop: str) -> None:
    """``text`` is the unstopped answer ``full`` up to where ``stop`` begins in it."""
    assert full.startswith(text) and full[len(text):].startswith(stop), (text, full, stop)


# --- the cutting itself ------------------------------------------------------------------------------

def test_fit_tokens_cuts_the_straddling_token_and_completes_a_split_character():
    """A token begun by another token's partial bytes, cut after the character they share: its bytes are
    the character's rest, not the whole character again; tokens after the cut and a partial token right at
    it are dropped; logprobs and alternatives stay the model's."""
    fw = "\uff0d".encode()  # a full-width hyphen: 3 bytes
    toks = (TokenLogprob("ab", -0.1, 1, raw=b"ab"),
            TokenLogprob("", -0.2, 2, raw=fw[:2]),
            TokenLogprob("\uff0dxy", -0.3, 3, raw=fw[2:] + b"xy"),
            TokenLogprob("", -0.4, 4, raw=fw[:2]),
            TokenLogprob("\uff0d", -0.5, 5, raw=fw[2:]))
    whole = "ab\uff0dxy\uff0d"
    assert fit_tokens(toks, whole) == toks  # nothing cut: the very tokens
    for cut in range(len(whole) + 1):
        text = whole[:cut]
        out = fit_tokens(toks, text)
        assert "".join(t.token for t in out) == text
        assert b"".join(t.utf8 for t in out) == text.encode()
        assert [t.logprob for t in out] == [t.logprob for t in toks[:len(out)]]
    out = fit_tokens(toks, "ab\uff0d")
    assert [(t.token, t.raw, t.token_id) for t in out] == [("ab", b"ab", 1), ("", fw[:2], 2), ("\uff0d", fw[2:], 3)]
    assert fit_tokens(toks, "ab") == toks[:1]  # the partial token at the cut goes with its character
    plain = (TokenLogprob(" Paris", -0.1), TokenLogprob(".", -0.2))  # no raw bytes: the text stands
    assert fit_tokens(plain, " Pa") == (TokenLogprob(" Pa", -0.1),)
    # a "" token holding a space and the first bytes of an emoji, the stop on the emoji (SmolLM2 on
    # "Repeat after me: hello 😀 world", stop "😀"): it keeps the space only; the emoji's token adds nothing
    emoji = "\U0001F600".encode()
    toks = (TokenLogprob("hello", -0.1, raw=b"hello"), TokenLogprob("", -0.2, raw=b" " + emoji[:3]),
            TokenLogprob(" \U0001F600", -0.3, raw=emoji[3:]), TokenLogprob(" world", -0.4))
    out = fit_tokens(toks, "hello ")
    assert [(t.token, t.utf8) for t in out] == [("hello", b"hello"), ("", b" "), (" ", b"")]
    whole = "hello \U0001F600 world"
    for cut in range(len(whole) + 1):
        out = fit_tokens(toks, whole[:cut])
        assert "".join(t.token for t in out) == whole[:cut]
        assert b"".join(t.utf8 for t in out) == whole[:cut].encode()


def test_held_tokens_go_out_once_the_text_covers_them():
    """A stream whose server holds back text that may begin a stop sequence: a token goes out when the
    text sent covers it whole; the rest is cut at the end to the text the stop left."""
    hold = HeldTokens()
    t = [TokenLogprob(s, -1.0) for s in ("The", " is", " Paris", ".")]
    assert hold.feed("Th", t[:1]) == ()
    assert hold.feed("e is", t[1:2]) == tuple(t[:2])
    assert hold.feed(" ", t[2:3]) == ()          # " Paris" is not covered: a stop "Paris." may cut it
    assert hold.feed("", t[3:]) == ()
    assert hold.finish() == (TokenLogprob(" ", -1.0),)  # the stop "Paris." left "The is "


def test_held_text_holds_back_only_what_may_begin_a_stop():
    """A stream whose server may not apply the stop sequences: the text that could begin one waits for the next
    piece; a stop, split across pieces or not, ends the text before it, and nothing comes after."""
    held = HeldText(("r is 4", "!"))
    assert [held.feed(p) for p in ("The", " answer", " is", " 5")] == ["The", " answe", "", "r is 5"]
    assert (held.feed(" answer"), held.finish()) == (" answe", "r")  # the end: what was held goes out
    held = HeldText(("r is 4", "!"))
    assert [held.feed(p) for p in ("The", " answer", " is", " 42", " more")] == ["The", " answe", "", "", ""]
    assert held.stopped and held.finish() == ""
    held = HeldText(("!",))
    assert (held.feed("Hi! there"), held.stopped, held.feed("x")) == ("Hi", True, "")


# --- the transformers backend ------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "stop"), [(chat, "Paris"), (chat, "ris."), (completion, "Paris"),
                                            (completion, "ris.")])
async def test_transformers_generate_and_stream_cut_tokens_at_the_stop(smol_backend, make, stop):
    full = await smol_backend.generate(make())
    res = await smol_backend.generate(make((stop,)))
    assert res.finish_reason == "stop"
    assert_cut_at(res.text, full.text, stop)
    assert_fits(res.text, res.tokens, stop)
    # the cut token keeps its logprob; the tokens are the unstopped answer's, the last one cut
    assert [t.token_id for t in res.tokens] == [t.token_id for t in full.tokens[:len(res.tokens)]]
    assert [t.logprob for t in res.tokens] == pytest.approx([t.logprob for t in full.tokens[:len(res.tokens)]],
                                                            abs=1e-4)
    chunks = [c async for c in smol_backend.stream(make((stop,)))]
    assert "".join(c.text for c in chunks) == res.text
    assert_fits(res.text, [t for c in chunks for t in c.tokens], stop)
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == res.usage


async def test_transformers_stop_inside_split_characters(smol_backend):
    """A CJK answer whose characters are split over tokens ("" + partial bytes): cut at a character."""
    req = GenerationRequest(messages=(Message("user", "Translate 'thank you' into Chinese."),), max_tokens=8,
                            top_logprobs=0)
    full = await smol_backend.generate(req)
    assert any(t.token == "" for t in full.tokens) and len(full.text) >= 2, full.tokens
    stop = full.text[1]
    res = await smol_backend.generate(req.with_(stop=(stop,)))
    assert_cut_at(res.text, full.text, stop)
    assert_fits(res.text, res.tokens, stop)
    assert any(t.token == "" for t in res.tokens)  # the split character before the stop keeps its parts


@pytest.mark.parametrize("stop", ["Paris", "Paris.", "ris."])
async def test_stop_keeps_the_tokens_generated_in_usage(smol_backend, stop):
    """Usage counts every token the model generated (what a tier bills), the stop string's included, not
    only those that start before the cut."""
    full = await smol_backend.generate(chat())
    res = await smol_backend.generate(chat((stop,)))
    end = full.text.find(stop) + len(stop)
    generated = next(i + 1 for i in range(len(full.tokens))
                     if len("".join(t.token for t in full.tokens[:i + 1])) >= end)
    assert res.usage.completion_tokens == generated >= len(res.tokens)
    if stop == "Paris":
        assert res.tokens[-1].token == " " and res.tokens[-1].token_id is not None  # " Paris", cut


@pytest.mark.parametrize(("req", "stop"), [
    (GenerationRequest(messages=(Message("user", "Write a short poem about the sea."),), max_tokens=8), "\nThe"),
    (GenerationRequest(prompt="Count: 1, 2, 3,", max_tokens=6), "3, 4"),
], ids=["chat", "completions"])
async def test_a_stop_is_looked_for_in_the_answer_only(smol_backend, req, stop):
    """A stop spanning the prompt's end and the answer's start: the chat template ends "assistant\n" and the
    answer starts "The"; the prompt ends "3," and the answer starts " 4". transformers' stop_strings matched
    the whole sequence and ended the answer after its first token ("length"). The answer holds no stop:
    it is the unstopped one, streamed or not."""
    full = await smol_backend.generate(req)
    prompt = smol_backend._tok.decode(smol_backend._prompt_ids(req))
    assert stop not in full.text and stop in prompt + full.text  # across the boundary only
    res = await smol_backend.generate(req.with_(stop=(stop,)))
    assert (res.text, res.finish_reason, res.usage) == (full.text, full.finish_reason, full.usage)
    chunks = [c async for c in smol_backend.stream(req.with_(stop=(stop,)))]
    assert "".join(c.text for c in chunks) == full.text and chunks[-1].finish_reason == full.finish_reason


async def test_a_batch_with_a_stop_ends_each_answer_at_its_own_stop(smol_backend):
    """Requests with the same stop share a batch; each row ends at the stop in its own answer, and each
    answer is the one it gets alone."""
    reqs = [chat(("Paris",)), chat(("Paris",)).with_(messages=(Message("user", "Name a primary colour."),))]
    alone = [await smol_backend.generate(r) for r in reqs]
    holder = asyncio.create_task(smol_backend.generate(completion()))  # they queue while it runs: one batch
    while not smol_backend._running:
        await asyncio.sleep(0.005)
    batched = await asyncio.gather(*(smol_backend.generate(r) for r in reqs))
    await holder
    assert [(r.text, r.finish_reason, r.usage) for r in batched] == [(r.text, r.finish_reason, r.usage)
                                                                      for r in alone]
    assert alone[0].finish_reason == "stop" and "Paris" not in alone[0].text


@pytest.mark.parametrize("stop", ["Paris", " Paris!", "is Paris."])
async def test_a_stream_with_a_stop_holds_back_only_what_may_begin_it(smol_backend, stop):
    """A stream with a stop sequence goes out token by token; only the text that could begin the stop waits
    (" Paris" while the stop " Paris!" may follow, released once "." comes). It was generated whole first, and
    sent as one chunk. The chunks join to generate's answer, their tokens to its tokens."""
    whole = await smol_backend.generate(chat((stop,)))
    chunks = [c async for c in smol_backend.stream(chat((stop,)))]
    texts = [c.text for c in chunks if c.text]
    assert "".join(texts) == whole.text and len(texts) >= 4, texts
    streamed = [t for c in chunks for t in c.tokens]
    assert_fits(whole.text, streamed, stop)
    assert [(t.token, t.utf8, t.token_id) for t in streamed] == [(t.token, t.utf8, t.token_id) for t in whole.tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.tokens], abs=1e-3)
    assert (chunks[-1].finish_reason, chunks[-1].usage) == (whole.finish_reason, whole.usage)
    if stop == " Paris!":  # not the stop: the answer is the unstopped one
        assert whole.text == (await smol_backend.generate(chat())).text and " Paris." in whole.text
        before = "".join(texts[:next(i for i, t in enumerate(texts) if "Paris" in t)])
        assert before.endswith("is")  # " Paris" was held, and went out with the "." that ruled the stop out


# --- our server: chat and completions, pinned tier (live) and kept first tier (buffered replay) -------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serving import create_app
    from tests.conftest import ServerThread

    dead = {"name": "dead", "backend": "openai", "model": "x", "timeout_s": 5,
            "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}
    cfg = make_config(tmp_path_factory.mktemp("stop"), [tier("small", max_tokens=16), dead],
                      {"keep-small": {"chain": ["small", "dead"], "thresholds": {"small": 0.0}},
                       "fallback": {"chain": ["small", "dead"], "thresholds": {"small": 1.0}}})
    with ServerThread(create_app(cfg)) as srv:
        yield srv


#: pinned: the tier streams live; keep-small: the first tier's answer is kept and replayed as a stream;
#: fallback: the last tier fails before its first token and the answer in hand is replayed
MODELS = ["small", "keep-small", "fallback"]


def _chat_call(client, model, stop, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, logprobs=True,
              top_logprobs=2)
    if stop:
        kw["stop"] = stop
    if not stream:
        resp = client.chat.completions.create(**kw)
        choice = resp.choices[0]
        return (choice.message.content, [(c.token, bytes(c.bytes)) for c in choice.logprobs.content],
                choice.finish_reason, resp.model_extra["cascade"])
    text, toks, finish, casc = "", [], None, None
    for ch in client.chat.completions.create(stream=True, **kw):
        if ch.model_extra.get("cascade"):
            casc = ch.model_extra["cascade"]
        if not ch.choices:
            continue
        c = ch.choices[0]
        text += c.delta.content or ""
        toks += [(t.token, bytes(t.bytes)) for t in (c.logprobs.content if c.logprobs else ())]
        finish = c.finish_reason or finish
    return text, toks, finish, casc


def _completion_call(client, model, stop, stream):
    kw = dict(model=model, prompt=PROMPT, max_tokens=8, logprobs=2)
    if stop:
        kw["stop"] = stop
    if not stream:
        resp = client.completions.create(**kw)
        choice = resp.choices[0]
        return choice.text, [(t, t.encode()) for t in choice.logprobs.tokens], choice.finish_reason, \
            resp.model_extra["cascade"]
    text, toks, finish, casc = "", [], None, None
    for ch in client.completions.create(stream=True, **kw):
        if ch.model_extra.get("cascade"):
            casc = ch.model_extra["cascade"]
        if not ch.choices:
            continue
        c = ch.choices[0]
        text += c.text or ""
        toks += [(t, t.encode()) for t in (c.logprobs.tokens if c.logprobs else ())]
        finish = c.finish_reason or finish
    return text, toks, finish, casc


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("call", "stop"), [(_chat_call, "Paris"), (_completion_call, "ris.")],
                         ids=["chat", "completions"])
def test_http_stop_streamed_and_not(server, model, call, stop):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    full, _, _, _ = call(client, model, None, False)
    text, toks, finish, casc = call(client, model, stop, False)
    assert finish == "stop"
    assert_cut_at(text, full, stop)
    assert "".join(t for t, _ in toks) == text and b"".join(b for _, b in toks) == text.encode()
    streamed, stoks, sfinish, scasc = call(client, model, stop, True)
    assert streamed == text and sfinish == "stop"
    assert "".join(t for t, _ in stoks) == text and b"".join(b for _, b in stoks) == text.encode()
    assert stoks == toks
    for c in (casc, scasc):  # the path each model is meant to take
        assert c["tier"] == "small"
        assert [(a["tier"], a["decision"]) for a in c["attempts"]] == {
            "small": [("small", "final")], "keep-small": [("small", "accept")],
            "fallback": [("small", "accept"), ("dead", "error")]}[model]


# --- the openai backend against our server -----------------------------------------------------------

@pytest.mark.parametrize("model", ["small", "keep-small"])
@pytest.mark.parametrize(("endpoint", "make", "stop"), [("chat", chat, "Paris"), ("completions", completion, "ris.")])
async def test_openai_backend_generate_and_stream(server, smol_backend, model, endpoint, make, stop):
    b = OpenAIBackend(model=model, base_url=server.url + "/v1", endpoint=endpoint)
    try:
        full = await smol_backend.generate(make())
        res = await b.generate(make((stop,)))
        chunks = [c async for c in b.stream(make((stop,)))]
    finally:
        await b.close()
    assert isinstance(res, GenerationResult) and res.finish_reason == "stop"
    assert_cut_at(res.text, full.text, stop)
    assert_fits(res.text, res.tokens, stop)
    assert "".join(c.text for c in chunks) == res.text
    streamed = [t for c in chunks for t in c.tokens]
    assert_fits(res.text, streamed, stop)
    assert [(t.token, t.utf8) for t in streamed] == [(t.token, t.utf8) for t in res.tokens]
    assert chunks[-1].finish_reason == "stop"


# --- a remote tier whose upstream ignores stop -------------------------------------------------------

@pytest.fixture(scope="module")
def ignoring(tmp_path_factory):
    """Our server before a remote tier whose upstream (tests/fault_server.py) ignores ``stop``: it always answers
    "Paris is the capital of France.", a chunk per word."""
    from serving import create_app
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as upstream:
        remote = {"name": "remote", "backend": "openai", "model": "m", "max_tokens": 16, "timeout_s": 10,
                  "options": {"base_url": upstream.base_url}}
        cfg = make_config(tmp_path_factory.mktemp("ignoring"), [remote])
        with ServerThread(create_app(cfg)) as srv:
            yield srv


@pytest.mark.parametrize(("stop", "want"), [
    (["France", "Paris is"], ""), ([" capital"], "Paris is the"), (["xyz", "the cap"], "Paris is "),
    (["ce."], "Paris is the capital of Fran")])
@pytest.mark.parametrize("call", [_chat_call, _completion_call], ids=["chat", "completions"])
def test_a_remote_tier_ends_the_answer_before_a_stop_its_upstream_ignored(ignoring, call, stop, want):
    """The answer came back whole past a stop sequence its upstream ignored ("Paris is ..." to a request that
    stopped at "Paris is"). It ends before the earliest one, finish_reason "stop", streamed or not (a stop
    split across chunks included: "the cap" spans " the" and " capital"), its tokens cut to it."""
    client = openai.OpenAI(base_url=ignoring.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for stream in (False, True):
        text, toks, finish, casc = call(client, "remote", stop, stream)
        assert (text, finish, casc["tier"]) == (want, "stop", "remote")
        assert "".join(t for t, _ in toks) == want and b"".join(b for _, b in toks) == want.encode()
