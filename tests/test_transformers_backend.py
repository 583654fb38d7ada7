"""The transformers backend on the real SmolLM2-135M model (on the CPU; ``CASCADE_TEST_DEVICE=cuda`` runs the
same tests on a GPU)."""

import asyncio

import pytest
import torch

from cascade.errors import ConfigError, ContextLengthExceededError
from cascade.types import GenerationRequest, Message
from tests.conftest import TEST_DEVICE

Q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),), max_tokens=10, top_logprobs=5)


def huge() -> GenerationRequest:
    """A 1 MB prompt (longer than SmolLM2's context): the tokenizer takes about half a second over it. A new
    one each call: a backend finds the ids it made by the prompt object's identity."""
    return GenerationRequest(messages=(Message("user", "All work and no play makes Jack a dull boy. " * 23_000),))


def assert_logprobs_equal_a_direct_forward_pass(backend, request, res) -> None:  # noqa: ANN001
    """Each token's logprob is the log-softmax of one forward pass over prompt + answer at its position (to
    1e-4), and, greedy, the chosen token is the top alternative."""
    ids = backend._prompt_ids(request)
    full = ids + [t.token_id for t in res.tokens]
    with torch.inference_mode():
        logits = backend._model(torch.tensor([full], device=backend._model.device)).logits.float()
    lp = torch.log_softmax(logits, dim=-1)[0]
    for j, tok in enumerate(res.tokens):
        direct = lp[len(ids) - 1 + j, tok.token_id].item()
        assert abs(direct - tok.logprob) < 1e-4, (j, direct, tok.logprob)
        assert tok.top[0].token_id == tok.token_id


async def test_logprobs_equal_a_direct_forward_pass(smol_backend):
    res = await smol_backend.generate(Q)
    assert res.tokens and res.text.strip()
    ids = smol_backend._prompt_ids(Q)
    assert_logprobs_equal_a_direct_forward_pass(smol_backend, Q, res)
    for tok in res.tokens:  # the alternatives are sorted
        assert [a.logprob for a in tok.top] == sorted((a.logprob for a in tok.top), reverse=True)
        assert len(tok.top) == 5
    assert "".join(t.token for t in res.tokens) == res.text
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(res.tokens)


async def test_concurrent_requests_batch_and_match_solo_runs(smol_backend):
    prompts = ["What is 2+2?", "Name a primary color.", "What is the capital of Italy?"]
    reqs = [Q.with_(messages=(Message("user", p),)) for p in prompts]
    batched = await asyncio.gather(*(smol_backend.generate(r) for r in reqs))
    for r, b in zip(reqs, batched, strict=True):
        solo = await smol_backend.generate(r)
        assert solo.text == b.text
        assert max(abs(x.logprob - y.logprob) for x, y in zip(solo.tokens, b.tokens, strict=True)) < 1e-3


def record_batches(backend, monkeypatch, seen=None):  # noqa: ANN001, ANN201
    """The size of every batch ``backend`` runs from now on (the real ``_generate_batch``, called by a recorder;
    ``seen()``, if given, is called as each batch starts and its value kept beside the size)."""
    sizes, real = [], backend._generate_batch

    def recorder(batch):  # noqa: ANN001, ANN202
        sizes.append(len(batch) if seen is None else (len(batch), seen()))
        return real(batch)

    monkeypatch.setattr(backend, "_generate_batch", recorder)
    return sizes


async def test_requests_sent_together_with_new_prompts_run_as_one_batch(smol_backend, monkeypatch):
    """Their prompts are tokenized one after another on the backend's tokenizer thread; the batch waits for
    them (GATHER_S at most). It did not: the first ran alone and the other seven a whole generation later."""
    sizes = record_batches(smol_backend, monkeypatch)
    reqs = [Q.with_(messages=(Message("user", f"Tell me a story about the number {i}."),), max_tokens=4)
            for i in range(8)]
    results = await asyncio.gather(*(smol_backend.generate(r) for r in reqs))
    assert all(r.tokens for r in results)
    assert sizes == [8]


async def test_a_prompt_still_being_tokenized_holds_a_batch_no_longer_than_the_gather_window(smol_backend,
                                                                                                monkeypatch):
    """A 1 MB prompt takes the tokenizer about half a second: a request already waiting starts its batch
    after ``GATHER_S`` (0.05 s), while that count is still running, not once it ends. A prompt counted for
    a cost ceiling (``tokenize``), which may never be generated here, holds no batch at all."""
    prompts = smol_backend._recent_prompts
    sizes = record_batches(smol_backend, monkeypatch, seen=lambda: prompts.counting)
    short = Q.with_(messages=(Message("user", "Name a primary color."),), max_tokens=2)
    await smol_backend.tokenize(short)  # its ids are made: it goes to the queue without the tokenizer thread
    assert prompts.counting == 0
    counting = asyncio.create_task(smol_backend.generate(huge()))
    while not prompts.counting:
        await asyncio.sleep(0)
    res = await smol_backend.generate(short)
    assert res.tokens
    assert sizes == [(1, 1)]  # it ran alone, while the huge prompt was still being counted
    with pytest.raises(ContextLengthExceededError):  # (then refused: longer than SmolLM2's context)
        await counting


async def test_a_request_tokenizing_when_its_backend_closes_is_told_so(smol_path):
    """close() tells every caller it knows of; a request still counting its prompt then used to join a queue
    no worker would ever take, and wait forever. It is refused once its prompt is counted."""
    from cascade.backends.transformers_backend import TransformersBackend
    from cascade.errors import ProviderServerError

    b = TransformersBackend(model=str(smol_path), name="closing", device=TEST_DEVICE, threads=2)
    await b.start()
    big = asyncio.create_task(b.tokenize(huge()))  # the tokenizer thread is busy: the next counts queue behind it
    await asyncio.sleep(0)
    calls = [asyncio.create_task(b.generate(Q)), asyncio.create_task(anext(b.stream(Q)))]
    while b._recent_prompts.counting < 2:
        await asyncio.sleep(0)
    await b.close()
    for call in calls:
        with pytest.raises(ProviderServerError, match="closed"):
            await asyncio.wait_for(call, 30)
    await asyncio.gather(big, return_exceptions=True)


async def test_a_request_arriving_within_batch_wait_joins_the_batch(smol_path, monkeypatch):
    """No prompt is being tokenized (both were counted before), yet the second request, sent 10 ms after the
    first, joins its batch: the batch waits until no request has arrived for batch_wait_ms (50 here)."""
    from cascade.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(model=str(smol_path), name="wait", device=TEST_DEVICE, threads=2, batch_wait_ms=50)
    await b.start()
    try:
        sizes = record_batches(b, monkeypatch)
        first, second = (Q.with_(messages=(Message("user", q),), max_tokens=2) for q in ("Hi!", "Hello!"))
        for r in (first, second):
            await b.tokenize(r)
        task = asyncio.create_task(b.generate(first))
        await asyncio.sleep(0.01)
        results = await asyncio.gather(task, b.generate(second))
        assert all(r.tokens for r in results)
        assert sizes == [2]
    finally:
        await b.close()


@pytest.mark.parametrize("bad", [-1, 51, "5", True, float("nan"), None])
def test_batch_wait_ms_must_be_a_number_of_milliseconds_within_the_gather_limit(smol_path, bad):
    from cascade.backends.transformers_backend import TransformersBackend

    with pytest.raises(ConfigError, match=r"^tiers\.w\.options\.batch_wait_ms: must be a number within \[0, 50\], "):
        TransformersBackend(model=str(smol_path), name="w", batch_wait_ms=bad)
    assert TransformersBackend(model=str(smol_path), name="w", batch_wait_ms=0)._batch_wait == 0


async def _read(stream) -> tuple[list, list]:  # noqa: ANN001
    chunks = [c async for c in stream]
    return chunks, [t for c in chunks for t in c.tokens]


async def test_streams_sent_together_are_one_batch_with_the_answers_they_have_alone(smol_backend, monkeypatch):
    """Three streams and a plain request sent together run as one batch (a stream used to run alone, one after
    another, on the one compute thread); each stream carries the answer it gets on its own."""
    sizes = record_batches(smol_backend, monkeypatch)
    reqs = [Q.with_(messages=(Message("user", q),), max_tokens=8)
            for q in ("What is 2+2?", "Name a primary color.", "What is the capital of Italy?", "Say hello.")]
    *streamed, plain = await asyncio.gather(*(_read(smol_backend.stream(r)) for r in reqs[:3]),
                                            smol_backend.generate(reqs[3]))
    assert sizes == [4]
    monkeypatch.undo()
    for r, (chunks, tokens) in zip(reqs, streamed, strict=False):
        solo = await smol_backend.generate(r)
        assert "".join(c.text for c in chunks) == solo.text
        assert [t.token_id for t in tokens] == [t.token_id for t in solo.tokens]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(tokens, solo.tokens, strict=True)) < 1e-3
        assert [a.token_id for a in tokens[0].top] == [a.token_id for a in solo.tokens[0].top]
        assert chunks[-1].finish_reason == solo.finish_reason and chunks[-1].usage == solo.usage
    assert plain.text == (await smol_backend.generate(reqs[3])).text


async def test_a_stream_ends_with_its_own_row_while_its_batch_runs_on(smol_backend, monkeypatch):
    """A 2-token stream batched with a 24-token request has its last chunk while the other still generates,
    and a stream whose reader leaves stops its row without cutting the others short."""
    sizes = record_batches(smol_backend, monkeypatch)
    long = asyncio.create_task(smol_backend.generate(GenerationRequest(
        prompt="Count from 1 to 1000: 1, 2, 3, 4,", max_tokens=24)))
    chunks, tokens = await _read(smol_backend.stream(Q.with_(max_tokens=2)))
    assert len(tokens) == 2 and chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2
    assert not long.done()
    res = await long
    assert res.usage.completion_tokens == 24 and res.finish_reason == "length"
    assert sizes == [2]
    # two streams: the reader of one leaves after its first chunk; the other has its whole answer
    sizes.clear()
    count = GenerationRequest(prompt="Count from 1 to 1000: 1, 2, 3, 4,", max_tokens=16)
    left, kept = smol_backend.stream(Q.with_(max_tokens=16)), smol_backend.stream(count)

    async def leave():  # noqa: ANN202
        first = await left.__anext__()
        await left.aclose()  # while the other stream is still generating
        return first

    first, rest = await asyncio.gather(leave(), _read(kept))
    assert first.tokens and sizes == [2]
    monkeypatch.undo()
    solo = await smol_backend.generate(count)
    assert [t.token_id for t in rest[1]] == [t.token_id for t in solo.tokens] and len(solo.tokens) == 16


async def test_a_short_answer_is_returned_when_its_row_ends_not_when_its_batch_does(smol_backend, monkeypatch):
    """A 2-token request batched with a 40-token one gets its answer once its own row ends, as a stream does: it
    waited for the whole batch (every short answer held back by the longest one beside it: seconds on a CPU,
    past a tier's timeout with max_tokens in the thousands). Its answer is the one it has alone."""
    sizes = record_batches(smol_backend, monkeypatch)
    # one stop string for all three, so that they share a batch: only the last meets it, a few tokens in
    two, stop = Q.with_(max_tokens=2, stop=(" of",)), Q.with_(max_tokens=30, stop=(" of",))
    long = asyncio.create_task(smol_backend.generate(GenerationRequest(
        prompt="Count from 1 to 1000: 1, 2, 3, 4,", max_tokens=40, stop=(" of",))))
    short, stopped = await asyncio.gather(smol_backend.generate(two), smol_backend.generate(stop))
    assert not long.done()
    res = await long
    assert res.usage.completion_tokens == 40 and res.finish_reason == "length"
    assert sizes == [3] and stopped.finish_reason == "stop" and short.finish_reason == "length"
    assert short.latency_s < res.latency_s / 2 and stopped.latency_s < res.latency_s / 2
    monkeypatch.undo()
    for req, got in ((two, short), (stop, stopped)):
        solo = await smol_backend.generate(req)
        assert (got.text, got.finish_reason, got.usage) == (solo.text, solo.finish_reason, solo.usage)
        assert [t.token_id for t in got.tokens] == [t.token_id for t in solo.tokens]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(got.tokens, solo.tokens, strict=True)) < 1e-4
        assert [len(t.top) for t in got.tokens] == [5] * len(solo.tokens)


async def test_a_stream_carries_the_tokens_and_logprobs_of_the_whole_answer(smol_backend):
    whole = await smol_backend.generate(Q)
    chunks = [c async for c in smol_backend.stream(Q)]
    streamed = [t for c in chunks for t in c.tokens]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t.token_id for t in streamed] == [t.token_id for t in whole.tokens]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, whole.tokens, strict=True)) < 1e-3
    assert [a.token_id for a in streamed[0].top] == [a.token_id for a in whole.tokens[0].top]
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage == whole.usage


async def test_device_option(smol_path):
    """``device`` names where the model runs: a malformed one is refused when the tier is built, a GPU that is
    not there when it starts (with what torch sees), and ``auto`` takes CUDA only where torch has it."""
    from cascade.backends.transformers_backend import TransformersBackend

    with pytest.raises(ConfigError, match=r"options.device: must be cpu, cuda, cuda:N or auto, got 'gpu'"):
        TransformersBackend(model=str(smol_path), name="d", device="gpu")
    missing = TransformersBackend(model=str(smol_path), name="d", device="cuda:99")
    with pytest.raises(ConfigError, match="'cuda:99' asked for"):  # `cascade serve` checks before it starts
        missing.check()
    with pytest.raises(ConfigError, match=r"'cuda:99' asked for, but torch sees (no CUDA device|\d+ CUDA)"):
        await missing.start()
    assert not missing.ready
    auto = TransformersBackend(model=str(smol_path), name="d", device="auto", threads=2)
    assert auto.device == "auto"
    await auto.start()
    try:
        assert auto.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
        assert str(auto._model.device) == auto.device
        assert (await auto.generate(Q.with_(max_tokens=2))).usage.completion_tokens == 2
    finally:
        await auto.close()


def test_cudnn_attention_is_switched_off_for_a_cuda_generation_and_restored_after():
    """The switch behind ``cudnn_attention: false`` (the default): real torch flags, no GPU needed."""
    from cascade.backends.transformers_backend import _without_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for was in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(was)
            with _without_cudnn_attention(torch, torch.device("cuda", 0), allowed=False):
                assert torch.backends.cuda.cudnn_sdp_enabled() is False
            assert torch.backends.cuda.cudnn_sdp_enabled() is was  # what it was, also when it was off already
            with _without_cudnn_attention(torch, torch.device("cuda", 0), allowed=True):  # the tier allows it
                assert torch.backends.cuda.cudnn_sdp_enabled() is was
            with _without_cudnn_attention(torch, torch.device("cpu"), allowed=False):  # no cuDNN on a CPU
                assert torch.backends.cuda.cudnn_sdp_enabled() is was
        torch.backends.cuda.enable_cudnn_sdp(True)
        with pytest.raises(RuntimeError), _without_cudnn_attention(torch, torch.device("cuda", 0), allowed=False):
            raise RuntimeError("a failed generation")
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("allowed", [False, True])
async def test_the_attention_kernel_setting_seen_by_the_model_while_it_generates(smol_path, allowed, monkeypatch):
    """What a forward pass sees: on CUDA cuDNN's attention is off unless the tier allows it; on the CPU the flag
    is left alone. Batched and streamed generation alike, and the flag is back after either. The switch itself
    runs as it is, wrapped to see that both ways of generating go through it with the tier's device and setting
    (on a CPU the flag alone could not tell)."""
    from cascade.backends import transformers_backend
    from cascade.backends.transformers_backend import TransformersBackend

    entered: list[tuple[str, bool, bool]] = []
    real = transformers_backend._without_cudnn_attention

    def recording(torch_, device, allowed_):  # noqa: ANN001, ANN202
        entered.append((str(device), allowed_, torch_ is torch))
        return real(torch_, device, allowed_)

    monkeypatch.setattr(transformers_backend, "_without_cudnn_attention", recording)

    refused = r"options.cudnn_attention: must be a boolean \(true or false, unquoted\), got str 'yes'"
    with pytest.raises(ConfigError, match=refused):
        TransformersBackend(model=str(smol_path), name="a", cudnn_attention="yes")
    b = TransformersBackend(model=str(smol_path), name="attn", device=TEST_DEVICE, threads=2,
                            cudnn_attention=allowed)
    await b.start()
    seen: list[bool] = []
    handle = b._model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        await b.generate(Q.with_(max_tokens=3))
        [c async for c in b.stream(Q.with_(max_tokens=3))]
    finally:
        handle.remove()
        await b.close()
    expected = before if (allowed or TEST_DEVICE == "cpu") else False
    assert len(seen) >= 6 and set(seen) == {expected}
    device = "cuda:0" if TEST_DEVICE == "cuda" else TEST_DEVICE
    assert entered == [(device, allowed, True)] * 2  # the batch, then the stream
    assert torch.backends.cuda.cudnn_sdp_enabled() is before


async def test_stop_sequence_and_max_tokens(smol_backend):
    res = await smol_backend.generate(Q.with_(stop=("Paris",)))
    assert "Paris" not in res.text and res.finish_reason == "stop"
    short = await smol_backend.generate(Q.with_(max_tokens=3))
    assert short.usage.completion_tokens == 3 and short.finish_reason == "length"


async def test_max_tokens_ending_inside_a_character_keeps_the_whole_characters_before_it(smol_backend):
    """A byte-level token may hold whole characters and the first bytes of the next one (SmolLM2's b" \\xd0": a
    space and half a Cyrillic letter; b"\\xd0\\xbe\\xd0": "о" and half the next). An answer that max_tokens ended
    on such a token lost them (its text waited for a next token to complete the character, and none came). They
    are kept, by its last token, streamed or not; only the partial character's bytes are left, in the tokens'
    bytes (as in OpenAI's)."""
    story = "Напиши короткий рассказ о собаке на русском языке."  # (write a short story about a dog, in Russian)
    req = GenerationRequest(messages=(Message("user", story),), max_tokens=40, top_logprobs=0)
    tok = smol_backend._tok
    whole = (await smol_backend.generate(req)).tokens
    ids, pieces = [t.token_id for t in whole], [t.token for t in whole]
    # the first answer cut where its tokens decode to more whole characters than their pieces give
    cut = next(j + 1 for j in range(len(ids))
               if tok.decode(ids[: j + 1]).removesuffix("\ufffd") != "".join(pieces[: j + 1]))
    want = tok.decode(ids[:cut]).removesuffix("\ufffd")
    res = await smol_backend.generate(req.with_(max_tokens=cut))
    chunks = [c async for c in smol_backend.stream(req.with_(max_tokens=cut))]
    streamed = [t for c in chunks for t in c.tokens]
    assert res.text == want and "".join(c.text for c in chunks) == want and res.finish_reason == "length"
    assert "".join(t.token for t in res.tokens) == want
    assert [t.token for t in streamed] == [t.token for t in res.tokens]
    raw = b"".join(t.utf8 for t in res.tokens)
    assert raw.startswith(want.encode()) and 0 < len(raw) - len(want.encode()) < 4  # the partial character's
    assert res.usage.completion_tokens == chunks[-1].usage.completion_tokens == cut


@pytest.mark.parametrize(("max_tokens", "want"), [(1, "\ufffd"), (3, "\ufffd x\ufffd")])
async def test_an_answer_ending_in_a_whole_replacement_character_keeps_it(smol_backend, max_tokens, want):
    """U+FFFD is a character a model may write (SmolLM2 has a token of its own for it, bytes EF BF BD), not only
    what a partial character decodes to: an answer ending in one lost it, streamed or not (its text "" where
    its one token's bytes were b"\\xef\\xbf\\xbd"). It is kept; only a partial character's stand-in goes."""
    req = GenerationRequest(prompt="x\ufffd x\ufffd x\ufffd x\ufffd x", max_tokens=max_tokens, top_logprobs=0)
    res = await smol_backend.generate(req)
    chunks = [c async for c in smol_backend.stream(req)]
    assert res.text == "".join(c.text for c in chunks) == want and res.finish_reason == "length"
    for tokens in (res.tokens, [t for c in chunks for t in c.tokens]):
        assert "".join(t.token for t in tokens) == want and b"".join(t.utf8 for t in tokens) == want.encode()


async def test_raw_prompt_completion(smol_backend):
    res = await smol_backend.generate(GenerationRequest(prompt="The capital of France is", max_tokens=4))
    assert "Paris" in res.text


async def test_prompt_longer_than_context_is_refused(smol_path):
    from cascade.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(model=str(smol_path), name="tiny-ctx", device=TEST_DEVICE, context_length=32, threads=2)
    await b.start()
    try:
        with pytest.raises(ContextLengthExceededError, match="context of 32 tokens"):
            await b.generate(Q.with_(messages=(Message("user", "word " * 100),)))
    finally:
        await b.close()


async def test_empty_prompt_generates_from_the_start_token(smol_backend):
    """Found by schemathesis: an empty completion prompt used to crash the forward pass."""
    res = await smol_backend.generate(GenerationRequest(prompt="", max_tokens=3))
    assert res.usage.prompt_tokens == 1 and res.usage.completion_tokens >= 1


async def test_a_request_cancelled_while_the_model_loads_leaves_the_backend_ready(smol_path):
    """A request cancelled mid-load (a client gone, a latency budget, a shutdown) used to leave the model
    loaded with no worker: every later request to the tier then failed."""
    from cascade.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(model=str(smol_path), name="smol-cancel", device=TEST_DEVICE, threads=2)
    try:
        first = asyncio.create_task(b.generate(GenerationRequest(prompt="The capital of France is", max_tokens=3)))
        await asyncio.sleep(0.05)  # the load (about a second) is under way in the compute thread
        assert b._worker is None
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        for _ in range(600):  # the start goes on without its caller and ends with the worker running
            if b._worker is not None:
                break
            await asyncio.sleep(0.05)
        assert b._model is not None and b._worker is not None
        # concurrent callers share the one start that kept going; both are served
        a, c = await asyncio.gather(*(b.generate(GenerationRequest(prompt="The capital of France is",
                                                                    max_tokens=3)) for _ in range(2)))
        assert "Paris" in a.text and a.text == c.text
    finally:
        await b.close()
    assert b._worker is None


async def test_a_stream_abandoned_while_queued_never_runs_and_close_logs_no_error(smol_path, caplog):
    """A stream whose consumer left while another generation held the compute thread used to run later
    anyway: after close() it failed on the closed model ('NoneType' object has no attribute
    'get_output_embeddings'), logged by asyncio as "Future exception was never retrieved" at shutdown. Its
    future is now cancelled (it never runs), and a stream still waiting when the backend closes is told so, as
    is the caller of the batch that was running."""
    import gc
    import logging

    from cascade.backends.transformers_backend import TransformersBackend, _compute_executor
    from cascade.errors import ProviderServerError

    loop = asyncio.get_running_loop()
    b = TransformersBackend(model=str(smol_path), name="smol-abandon", device=TEST_DEVICE, threads=2)
    await b.start()
    holder = None
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            # a long generation takes the compute thread
            holder = asyncio.create_task(b.generate(GenerationRequest(
                prompt="Count from 1 to 1000: 1, 2, 3, 4,", max_tokens=400)))
            while b._pending:  # taken by the worker
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not holder.done()
            # one stream is abandoned while it waits for the thread; another still waits when the backend closes
            abandoned = b.stream(Q)
            step = asyncio.create_task(abandoned.__anext__())
            waiting = b.stream(Q)
            waiter = asyncio.create_task(waiting.__anext__())
            await asyncio.sleep(0.2)
            assert not step.done() and not waiter.done() and not holder.done()
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
            await abandoned.aclose()
            await asyncio.wait_for(b.close(), 30)  # returns, with the generation still running
            assert b._model is None
            # the caller of the running batch is told at once (it used to wait until it was cancelled), and
            # the batch stops at its next token
            with pytest.raises(ProviderServerError, match="closed"):
                await asyncio.wait_for(holder, 5)
            with pytest.raises(ProviderServerError, match="closed"):
                await asyncio.wait_for(waiter, 60)
            await waiting.aclose()
            await loop.run_in_executor(_compute_executor(), lambda: None)  # whatever was queued has run
            del step, abandoned, waiter, waiting
            for _ in range(3):
                gc.collect()
                await asyncio.sleep(0)
        problems = [r for r in caplog.records if r.levelno >= logging.ERROR or "never retrieved" in r.getMessage()]
        assert not problems, [r.getMessage() for r in problems]
    finally:
        if holder is not None and not holder.done():
            holder.cancel()
        await b.close()


async def test_close_ends_a_live_stream(smol_path):
    """A stream generating when the backend closes is told so at once, and its generation stops at the next
    token (it used to stream to its end after close(), holding the compute thread)."""
    from cascade.backends.transformers_backend import TransformersBackend, _compute_executor
    from cascade.errors import ProviderServerError

    loop = asyncio.get_running_loop()
    b = TransformersBackend(model=str(smol_path), name="smol-close-stream", device=TEST_DEVICE, threads=2)
    await b.start()
    try:
        stream = b.stream(GenerationRequest(prompt="Count from 1 to 1000: 1, 2, 3, 4,", max_tokens=300))
        first = await stream.__anext__()
        assert first.tokens
        await b.close()
        with pytest.raises(ProviderServerError, match="closed"):
            async for _ in stream:
                pass
        # the compute thread is free again soon: the generation stopped, it did not run its 300 tokens
        await asyncio.wait_for(loop.run_in_executor(_compute_executor(), lambda: None), 10)
        assert b._streams == {}
    finally:
        await b.close()


@pytest.mark.parametrize("decoding", [{"num_beams": 4}, {"prompt_lookup_num_tokens": 3}])
async def test_a_models_own_generation_config_cannot_change_the_decoding(smol_path, tmp_path, decoding):
    """A model directory whose generation_config.json asks for beams or prompt-lookup decoding is still decoded
    one token per step (the logprobs are read step by step): its logprobs equal a direct forward pass."""
    import json

    from cascade.backends.transformers_backend import TransformersBackend

    for f in smol_path.iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).symlink_to(f)
    gen_cfg = json.loads((smol_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen_cfg, **decoding}))
    b = TransformersBackend(model=str(tmp_path), name="own-config", device=TEST_DEVICE, threads=2)
    await b.start()
    try:
        reqs = [Q, Q.with_(messages=(Message("user", "Repeat: one two one two one two"),), max_tokens=12)]
        for req, res in zip(reqs, await asyncio.gather(*(b.generate(r) for r in reqs)), strict=True):
            assert res.tokens
            assert_logprobs_equal_a_direct_forward_pass(b, req, res)  # greedy, one token a step
    finally:
        await b.close()


def test_a_requests_prompt_is_tokenized_once_for_its_ceiling_budget_and_generation(smol_path):
    """Admission (cost ceiling), the cost budget and the generation each count a request's prompt: the
    backend's RecentPrompts tokenizes it once, by the identity of its (immutable) messages or prompt, and gives
    the same ids as the tokenizer itself."""
    from transformers import AutoTokenizer

    from cascade.backends.base import RecentPrompts, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(smol_path)
    templated = []

    class Counting:  # the real tokenizer, its chat-template calls counted
        def apply_chat_template(self, *a, **k):
            templated.append(1)
            return tok.apply_chat_template(*a, **k)

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def __getattr__(self, name):
            return getattr(tok, name)

    counting, recent = Counting(), RecentPrompts(size=2)
    req = GenerationRequest(messages=(Message("user", "What is the capital of France?"),), max_tokens=8)
    first = recent.ids(counting, req)
    assert first == prompt_token_ids(tok, req)
    first.append(-1)  # a caller's copy: the memo keeps its own
    assert recent.ids(counting, req) == recent.ids(counting, req.with_(max_tokens=3)) == prompt_token_ids(tok, req)
    assert len(templated) == 1
    # an equal prompt in another request object is tokenized again (identity, never a content hash)
    other = GenerationRequest(messages=(Message("user", "What is the capital of France?"),))
    recent.ids(counting, other)
    assert len(templated) == 2
    recent.ids(counting, GenerationRequest(messages=(Message("user", "Hi"),)))  # the first falls out (size 2)
    recent.ids(counting, req)
    assert len(templated) == 4
    assert recent.ids(Counting(), req) and len(templated) == 5  # another tokenizer: its own ids


async def test_a_long_prompt_is_tokenized_on_the_backends_thread_while_the_event_loop_runs(smol_path, smol_backend):
    """A 1 MB prompt takes the tokenizer about half a second. ``load`` (what the backend's ``tokenize``, its
    generation and the engine's cost ceiling use) counts it on the backend's tokenizer thread: the event
    loop keeps serving meanwhile, and the sync counts after it find the ids made."""
    import threading

    from transformers import AutoTokenizer

    from cascade.backends.base import RecentPrompts, prompt_token_ids

    tok = AutoTokenizer.from_pretrained(smol_path)
    threads = []

    class Where:  # the real tokenizer, the threads it ran on recorded
        def __call__(self, *a, **k):
            threads.append(threading.current_thread().name)
            return tok(*a, **k)

        def __getattr__(self, name):
            return getattr(tok, name)

    where, recent = Where(), RecentPrompts()
    req = huge()
    ticks, done = [], asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            ticks.append(1)
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = len(ticks)
    ids = await recent.load(where, req)
    during = len(ticks) - before
    done.set()
    await ticker
    try:
        assert threads == ["cascade-tokenize_0"]  # not the event loop's thread
        assert during >= 2, "the event loop did not run while the prompt was tokenized"
        assert len(ids) > 200_000 and ids == prompt_token_ids(tok, req)
        assert recent.ids(where, req) == ids and len(threads) == 1  # the sync count finds it made
    finally:
        recent.close()
    # the backend's own: tokenize, then the count and the generation find the ids (one tokenizer call)
    req2 = GenerationRequest(messages=(Message("user", "Count to three. " * 3000),), max_tokens=2)
    await smol_backend.tokenize(req2)
    assert smol_backend._recent_prompts._find(smol_backend._tok, req2) is not None
    assert smol_backend.count_prompt_tokens(req2) == len(prompt_token_ids(tok, req2))


def _cache_with_broken_weights(smol_path, cache, how: str):  # noqa: ANN001, ANN202
    """A model cache whose smollm2-135m has the real config and tokenizer and broken weights, marked prepared."""
    import json

    from cascade import models

    d = cache / "smollm2-135m"
    d.mkdir(parents=True)
    for f in smol_path.iterdir():
        if f.name not in ("model.safetensors", models.MARKER_NAME):
            (d / f.name).symlink_to(f)
    data = bytearray((smol_path / "model.safetensors").read_bytes()[:4096])
    if how == "header":
        data[8:72] = b"\xff" * 64  # the JSON header: not UTF-8
    (d / "model.safetensors").write_bytes(bytes(data))
    (d / models.MARKER_NAME).write_text(json.dumps({"id": "smollm2-135m", "files": models._file_list(d)}))
    return d


async def test_a_corrupt_safetensors_header_is_one_config_error(smol_path, tmp_path):
    """safetensors' own error (SafetensorError) was a traceback from `cascade serve` and `cascade ask`: now the
    check before the server starts, and the load itself, say it in one line with the command that fixes it."""
    from cascade.backends.transformers_backend import TransformersBackend

    cache = tmp_path / "cache"
    _cache_with_broken_weights(smol_path, cache, "header")
    backend = TransformersBackend(model="smollm2-135m", name="small", cache_dir=cache)
    fix = f"cascade models prepare smollm2-135m --force --cache-dir {cache}"
    with pytest.raises(ConfigError, match="cannot read the weights") as info:
        backend.check()
    assert "SafetensorError" in str(info.value) and fix in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot load model from") as info:
        await backend.start()
    assert "SafetensorError" in str(info.value) and fix in str(info.value)
    assert not backend.ready


async def test_truncated_weights_are_one_config_error(smol_path, tmp_path):
    from cascade.backends.transformers_backend import TransformersBackend

    cache = tmp_path / "cache"
    _cache_with_broken_weights(smol_path, cache, "truncated")
    backend = TransformersBackend(model="smollm2-135m", name="small", cache_dir=cache)
    with pytest.raises(ConfigError, match="cannot (load model from|read the weights)") as info:
        backend.check()
        await backend.start()
    assert "--force" in str(info.value)


async def test_nan_logprobs_are_a_backend_error_not_an_empty_answer(smol_path):
    """Corrupt weights make the logits NaN: greedy decoding then picks token 0, SmolLM2's end of text, and the
    answer was empty. Now the request fails (the tier's error, which the cascade falls over from)."""
    from cascade.backends.transformers_backend import TransformersBackend
    from cascade.errors import ProviderServerError

    backend = TransformersBackend(model=str(smol_path), name="nan", threads=2, device=TEST_DEVICE)
    await backend.start()
    try:
        with torch.no_grad():
            backend._model.model.norm.weight.fill_(float("nan"))
        with pytest.raises(ProviderServerError, match="produced NaN logprobs") as info:
            await backend.generate(Q)
        assert info.value.code == "model_produced_nan" and "cascade models verify" in str(info.value)
        assert info.value.fall_over
        with pytest.raises(ProviderServerError, match="produced NaN logprobs"):
            _ = [c async for c in backend.stream(Q)]
    finally:
        await backend.close()
