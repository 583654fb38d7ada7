"""The transformers backend on the real SmolLM2-135M model."""

import asyncio

import pytest
import torch

from cascade.errors import ContextLengthExceededError
from cascade.types import GenerationRequest, Message

Q = GenerationRequest(messages=(Message("user", "What is the capital of France?"),), max_tokens=10, top_logprobs=5)


async def test_logprobs_equal_a_direct_forward_pass(smol_backend):
    res = await smol_backend.generate(Q)
    assert res.tokens and res.text.strip()
    ids = smol_backend._prompt_ids(Q)
    full = ids + [t.token_id for t in res.tokens]
    with torch.inference_mode():
        logits = smol_backend._model(torch.tensor([full])).logits.float()
    lp = torch.log_softmax(logits, dim=-1)[0]
    start = len(ids)
    for j, tok in enumerate(res.tokens):
        direct = lp[start - 1 + j, tok.token_id].item()
        assert abs(direct - tok.logprob) < 1e-4, (j, direct, tok.logprob)
        # greedy: the chosen token is the top alternative, and alternatives are sorted
        assert tok.top[0].token_id == tok.token_id
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


async def test_stop_sequence_and_max_tokens(smol_backend):
    res = await smol_backend.generate(Q.with_(stop=("Paris",)))
    assert "Paris" not in res.text and res.finish_reason == "stop"
    short = await smol_backend.generate(Q.with_(max_tokens=3))
    assert short.usage.completion_tokens == 3 and short.finish_reason == "length"


async def test_raw_prompt_completion(smol_backend):
    res = await smol_backend.generate(GenerationRequest(prompt="The capital of France is", max_tokens=4))
    assert "Paris" in res.text


async def test_prompt_longer_than_context_is_refused(smol_path):
    from cascade.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(model=str(smol_path), name="tiny-ctx", context_length=32, threads=2)
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

    b = TransformersBackend(model=str(smol_path), name="smol-cancel", threads=2)
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
