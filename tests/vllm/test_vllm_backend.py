"""The in-process vLLM backend on SmolLM2 (fp32, eager), checked against the transformers backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from cascade.errors import (ConfigError, ContextLengthExceededError, ProviderInvalidRequestError,
                            ProviderServerError, ProviderTimeoutError)
from cascade.types import GenerationRequest, Message

pytestmark = pytest.mark.vllm

TOL = 1e-3
CHATS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is 12 plus 7?",
    "Translate 'thank you' into Chinese.",  # CJK answer: tokens that split a character
]


def chat(text: str, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 24)
    kw.setdefault("top_logprobs", 5)
    return GenerationRequest(messages=(Message("user", text),), **kw)


def assert_same_answer(got, ref, tol: float = TOL) -> float:
    """Same greedy tokens, logprobs and top-k within ``tol``; returns the largest difference seen."""
    assert [t.token_id for t in got.tokens] == [t.token_id for t in ref.tokens]
    assert [t.token for t in got.tokens] == [t.token for t in ref.tokens]
    assert [t.utf8 for t in got.tokens] == [t.utf8 for t in ref.tokens]  # a split character's own bytes
    assert got.text == ref.text
    assert got.finish_reason == ref.finish_reason
    assert got.usage == ref.usage
    worst = 0.0
    for g, r in zip(got.tokens, ref.tokens, strict=True):
        worst = max(worst, abs(g.logprob - r.logprob))
        assert len(g.top) == len(r.top)
        ref_top = {a.token_id: a.logprob for a in r.top}
        for i, a in enumerate(g.top):
            if a.token_id in ref_top:
                worst = max(worst, abs(a.logprob - ref_top[a.token_id]))
            else:  # only a near-tie at the k-th place may differ
                assert i == len(g.top) - 1 and abs(a.logprob - r.top[-1].logprob) <= tol, (g.top, r.top)
        assert all(a.logprob >= b.logprob for a, b in zip(g.top, g.top[1:]))
    assert worst <= tol, worst
    return worst


async def test_engine_started_fp32_eager(vllm_backend):
    args = vllm_backend.engine_arguments
    assert args["dtype"] == "float32" and args["enforce_eager"] is True and args["max_model_len"] == 2048
    assert vllm_backend.context_length == 2048
    assert vllm_backend.start_seconds and vllm_backend.start_seconds > 0
    print(f"\nvLLM engine start: {vllm_backend.start_seconds:.1f} s")


@pytest.mark.parametrize("question", CHATS)
async def test_greedy_chat_logprobs_equal_transformers(vllm_backend, hf_backend, question):
    req = chat(question)
    got = await vllm_backend.generate(req)
    ref = await hf_backend.generate(req)
    assert got.tokens and all(len(t.top) == 5 for t in got.tokens)
    assert got.tokens[0].top[0].token_id == got.tokens[0].token_id  # greedy: the chosen one is the top one
    worst = assert_same_answer(got, ref)
    assert got.ttft_s is not None and 0 < got.ttft_s <= got.latency_s
    print(f"\n{question!r}: {len(got.tokens)} tokens, max |dlogprob| = {worst:.2e}")


async def test_raw_prompt_and_no_alternatives(vllm_backend, hf_backend):
    req = GenerationRequest(prompt="The capital of France is", max_tokens=10, top_logprobs=0)
    got, ref = await vllm_backend.generate(req), await hf_backend.generate(req)
    assert got.finish_reason == "length" and len(got.tokens) == 10
    assert all(t.top == () for t in got.tokens)
    assert_same_answer(got, ref)


@pytest.mark.parametrize("stop", ["Paris", "ris.", "Paris."])
async def test_stop_string_cuts_like_transformers(vllm_backend, hf_backend, stop):
    """Stops "Paris" and "Paris." cut before " Paris" (its " " is kept), "ris." inside it (" Pa"); "Paris."
    ends a token later, so " Paris" is generated, and held, before the stop is known."""
    req = chat("What is the capital of France?", stop=(stop,))
    got, ref = await vllm_backend.generate(req), await hf_backend.generate(req)
    assert stop not in got.text and got.finish_reason == "stop"
    assert_same_answer(got, ref)
    # the tokens fit the text the stop left: the cut token keeps its part before the cut
    assert "".join(t.token for t in got.tokens) == got.text
    assert b"".join(t.utf8 for t in got.tokens) == got.text.encode("utf-8")
    # streamed: the text held back while it could start the stop string, the same tokens in the end
    chunks = [c async for c in vllm_backend.stream(req)]
    assert "".join(c.text for c in chunks) == got.text
    streamed = [t for c in chunks for t in c.tokens]
    assert [(t.token_id, t.token, t.utf8) for t in streamed] == [(t.token_id, t.token, t.utf8) for t in got.tokens]
    assert chunks[-1].usage == got.usage


@pytest.mark.parametrize("stop", [(), ("Zebra",)])  # a stop string that never comes: the text held, then released
async def test_max_tokens_ending_inside_a_character_keeps_the_whole_characters_before_it(vllm_backend, hf_backend,
                                                                                       stop):
    """A byte-level token may hold whole characters and the first bytes of the next one (SmolLM2's b" \\xd0": a
    space and half a Cyrillic letter). An answer that max_tokens ended on such a token lost those characters:
    vLLM's text and the token pieces both wait for the token that completes the character, and none came. They
    are kept, by the last token, streamed or not, as the transformers backend keeps them."""
    story = "Напиши короткий рассказ о собаке на русском языке."  # (write a short story about a dog, in Russian)
    req = chat(story, max_tokens=40, top_logprobs=0, stop=stop)
    tok = vllm_backend._tok
    ids = [t.token_id for t in (await vllm_backend.generate(req)).tokens]
    # the first cut where the tokens decode to whole characters and then the first bytes of the next one
    cut = next(j + 1 for j in range(1, len(ids)) if (d := tok.decode(ids[: j + 1])).endswith("\ufffd")
               and d.removesuffix("\ufffd") != tok.decode(ids[:j]))
    want = tok.decode(ids[:cut]).removesuffix("\ufffd")
    req = req.with_(max_tokens=cut)
    got, ref = await vllm_backend.generate(req), await hf_backend.generate(req)
    assert got.text == want == ref.text and got.finish_reason == "length"
    assert "".join(t.token for t in got.tokens) == want
    assert [t.token for t in got.tokens] == [t.token for t in ref.tokens]
    raw = b"".join(t.utf8 for t in got.tokens)
    assert raw.startswith(want.encode()) and 0 < len(raw) - len(want.encode()) < 4  # the partial character's
    chunks = [c async for c in vllm_backend.stream(req)]
    assert "".join(c.text for c in chunks) == want
    streamed = [t for c in chunks for t in c.tokens]
    assert [(t.token_id, t.token) for t in streamed] == [(t.token_id, t.token) for t in got.tokens]
    assert chunks[-1].usage == got.usage and got.usage.completion_tokens == cut


async def test_stream_yields_tokens_as_they_come(vllm_backend):
    req = chat("Name three colours of the rainbow.", max_tokens=20)
    whole = await vllm_backend.generate(req)
    arrivals, chunks = [], []
    async for c in vllm_backend.stream(req):
        arrivals.append(time.perf_counter())
        chunks.append(c)
    assert len(chunks) > 2  # chunks as the steps come, not one at the end
    assert arrivals[-1] - arrivals[0] > 0
    assert "".join(c.text for c in chunks) == whole.text
    toks = [t for c in chunks for t in c.tokens]
    assert [t.token_id for t in toks] == [t.token_id for t in whole.tokens]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(toks, whole.tokens)) <= TOL
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage == whole.usage
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_concurrent_requests_are_batched(vllm_backend):
    """Concurrent calls run in the engine together (continuous batching) and answer as alone."""
    reqs = [chat(f"Count from {i} to {i + 10}.", max_tokens=16) for i in range(8)]
    alone = [await vllm_backend.generate(r) for r in reqs[:2]]
    in_flight: list[int] = []
    done = False

    async def watch():
        while not done:
            in_flight.append(vllm_backend.engine.get_num_unfinished_requests())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    together = await asyncio.gather(*(vllm_backend.generate(r) for r in reqs))
    wall = time.perf_counter() - t0
    done = True
    await watcher
    assert max(in_flight) >= 4, in_flight
    for a, b in zip(alone, together[:2]):
        assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, b.tokens)) <= TOL
    n = sum(r.usage.completion_tokens for r in together)
    print(f"\n8 concurrent requests: {n} tokens in {wall:.2f} s = {n / wall:.1f} tok/s")


async def wait_idle(backend, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while backend.engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return backend.engine.get_num_unfinished_requests()


LONG = chat("Write a long story about a dragon who learns to cook.", max_tokens=1000)


async def test_cancelled_caller_aborts_the_request(vllm_backend):
    task = asyncio.create_task(vllm_backend.generate(LONG))
    deadline = time.monotonic() + 60
    while vllm_backend.engine.get_num_unfinished_requests() == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_idle(vllm_backend) == 0


async def test_closed_stream_aborts_the_request(vllm_backend):
    agen = vllm_backend.stream(LONG)
    first = await anext(agen)
    assert first.finish_reason is None
    await agen.aclose()
    assert await wait_idle(vllm_backend) == 0


async def test_deadline_aborts_and_raises_timeout(vllm_backend):
    old = vllm_backend._timeout
    vllm_backend._timeout = 1.0
    try:
        t0 = time.perf_counter()
        with pytest.raises(ProviderTimeoutError, match="within 1 s"):
            await vllm_backend.generate(LONG)
        assert time.perf_counter() - t0 < 10
    finally:
        vllm_backend._timeout = old
    assert await wait_idle(vllm_backend) == 0


async def test_prompt_longer_than_the_context_is_refused(vllm_backend):
    req = GenerationRequest(prompt="hello " * 2100, max_tokens=4)
    with pytest.raises(ContextLengthExceededError):
        await vllm_backend.generate(req)
    # a prompt that fits, with a max_tokens that does not, is refused too: never cut short to fit (a cascade
    # escalates it to a tier with room), as OpenAI and vLLM's server refuse it
    req = GenerationRequest(prompt="hello " * 2040, max_tokens=100, top_logprobs=0)
    n_prompt = vllm_backend.count_prompt_tokens(req)
    assert n_prompt < 2048 < n_prompt + 100
    with pytest.raises(ContextLengthExceededError, match="max_tokens asks for 100 more"):
        await vllm_backend.generate(req)
    # without a max_tokens: what the context still holds
    out = await vllm_backend.generate(req.with_(max_tokens=None))
    assert out.usage.completion_tokens <= 2048 - n_prompt


async def test_bad_options_are_config_errors():
    from cascade.backends.vllm_backend import VLLMBackend

    with pytest.raises(ConfigError, match="unknown vllm option"):
        VLLMBackend(model="smollm2-135m", threads=2)
    # option types are checked when the tier is built, not when the engine starts minutes later
    for opts, msg in (({"max_num_seqs": "32"}, r"options\.max_num_seqs: must be a whole number"),
                      ({"enforce_eager": "yes"}, r"options\.enforce_eager: must be true or false"),
                      ({"kv_cache_space_gb": "2"}, r"options\.kv_cache_space_gb: must be a number > 0"),
                      ({"kv_cache_space_gb": float("inf")}, r"options\.kv_cache_space_gb: must be a number > 0"),
                      ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization: must be a number within \(0, 1\]"),
                      ({"dtype": 16}, r"options\.dtype: must be a non-empty string"),
                      ({"seed": -1}, r"options\.seed: must be a whole number >= 0"),
                      ({"engine_args": [1]}, r"options\.engine_args: must be a mapping")):
        with pytest.raises(ConfigError, match=msg):
            VLLMBackend(model="smollm2-135m", name="b", **opts)
    bad = VLLMBackend(model="smollm2-135m", name="b", engine_args={"no_such_argument": 1})
    with pytest.raises(ConfigError, match="no_such_argument"):
        await bad.start()
    with pytest.raises(ConfigError, match="GGUF"):
        await VLLMBackend(model="/nowhere/model.gguf", name="g").start()


async def test_an_answer_the_engine_aborted_itself_is_a_failure_not_a_stop(vllm_backend):
    """An answer vLLM ended short (its own abort: an admin pause; an error) is a ProviderServerError, so the
    cascade fails over: "abort" used to read as "stop", and the short answer was scored and could be served."""
    engine = vllm_backend.engine
    if not hasattr(engine, "pause_generation"):
        pytest.skip("this vLLM has no pause_generation")
    task = asyncio.create_task(vllm_backend.generate(LONG))
    while engine.get_num_unfinished_requests() == 0:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    try:
        await engine.pause_generation(mode="abort")
        with pytest.raises(ProviderServerError, match="finish reason 'abort'"):
            await asyncio.wait_for(task, 60)
    finally:
        await engine.resume_generation()
    assert await wait_idle(vllm_backend) == 0


async def test_seed_minus_one_is_a_seed_and_bad_sampling_values_are_invalid_requests(vllm_backend):
    """vLLM reads seed -1 as "no seed": the backend passes any 64-bit seed as the transformers backend does, so
    the same seeded request gives the same text. Sampling values vLLM refuses are the request's fault (a
    ProviderInvalidRequestError), not vLLM's own exception."""
    req = chat("Say one random word.", max_tokens=8, temperature=1.0, seed=-1)
    first, second = await vllm_backend.generate(req), await vllm_backend.generate(req)
    assert first.text == second.text
    with pytest.raises(ProviderInvalidRequestError):
        await vllm_backend.generate(chat("hi", max_tokens=4, temperature=2.5))
