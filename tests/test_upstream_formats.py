"""The `openai` backend against real servers' wire formats: llama.cpp, vLLM, SGLang, OpenAI.

A raw asyncio HTTP/1.1 server on loopback answers each request in the exact shape the named server sends
(the request's ``model`` picks the scenario): its error bodies, llama.cpp's chat-shaped logprobs on
``/v1/completions``, ``null`` logprobs, a reasoning model's thinking beside its answer, streams that carry
no answer or are cut off, a provider that refuses the logprobs parameters. Raw bytes, so a proxy's HTML
page, a JSON body where a stream was asked for, or a chunked stream that ends without ``[DONE]`` are exact.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cascade.backends.openai_backend import LOGPROB_MIN, NULL_TOKEN_LOGPROB, OpenAIBackend
from cascade.engine import Engine, StreamDelta, StreamEnd, StreamFailed
from cascade.errors import (
    ConfigError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderContextLengthError,
    ProviderError,
    ProviderInvalidRequestError,
    ProviderMisconfiguredError,
    ProviderServerError,
    RateLimitedError,
)
from cascade.types import GenerationRequest, Message
from tests.conftest import make_config

CHAT = GenerationRequest(messages=(Message("user", "What is 6*7?"),), max_tokens=16, top_logprobs=2)
RAW = GenerationRequest(prompt="6*7 =", max_tokens=16, top_logprobs=2)
TOKS = [("The", -0.01), (" answer", -0.2), (" is", -0.05), (" 4", -0.5), ("2", -0.3)]
TEXT = "".join(t for t, _ in TOKS)


# --- the wire formats ----------------------------------------------------------------------------------

def entry(tok: str, lp: float | None, *, alt: float | None = -5.0, llama: bool = False) -> dict[str, Any]:
    """One token of chat's ``logprobs.content`` (llama.cpp adds ``id``)."""
    e = {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
         "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode())},
                          {"token": "alt", "logprob": alt, "bytes": list(b"alt")}]}
    if llama:
        e = {"id": 1000 + len(tok), **e}
        for t in e["top_logprobs"]:
            t["id"] = 7
    return e


def chat(model: str, content: str | None = TEXT, entries: list | None = None, **message: Any) -> dict[str, Any]:
    entries = [entry(t, lp) for t, lp in TOKS] if entries is None else entries
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message},
                         "logprobs": {"content": entries}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": len(entries), "total_tokens": 11 + len(entries)}}


def chunk(model: str, delta: dict | None, lp: list | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": {"content": lp} if lp else None,
                         "finish_reason": finish}]}


def usage_chunk(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}


def oai_stream(model: str, toks=TOKS, *, null: bool = False) -> list[dict[str, Any]]:
    """OpenAI's: a role-only first chunk, one chunk per token, the finish chunk, the usage chunk."""
    ev = [chunk(model, {"role": "assistant", "content": ""})]
    ev += [chunk(model, {"content": t}, [entry(t, None if null and i == 0 else lp, alt=None if null else -5.0)])
           for i, (t, lp) in enumerate(toks)]
    return ev + [chunk(model, {}, finish="stop"), usage_chunk(model)]


def not_finished(events: list[dict[str, Any]], null: str) -> list[dict[str, Any]]:
    """A stream whose chunks say "not finished" as ``null`` (a string) where OpenAI writes null."""
    return [{**e, "choices": [{**c, "finish_reason": null if c["finish_reason"] is None else c["finish_reason"]}
                              for c in e["choices"]]} for e in events]


def cmpl_stream(model: str) -> list[dict[str, Any]]:
    """vLLM's /v1/completions stream: legacy logprobs per token, a finish chunk, a usage chunk."""
    ev = [{"id": "cmpl-x", "object": "text_completion", "created": 1, "model": model,
           "choices": [{"index": 0, "text": t, "finish_reason": None, "logprobs": {
               "text_offset": [0], "token_logprobs": [lp], "tokens": [t], "top_logprobs": [{t: lp}]}}]}
          for t, lp in TOKS]
    ev.append({"id": "cmpl-x", "object": "text_completion", "created": 1, "model": model,
               "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
    return ev + [{"id": "cmpl-x", "object": "text_completion", "created": 1, "model": model, "choices": [],
                  "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}]


def completion(model: str, logprobs: dict | None, text: str = TEXT) -> dict[str, Any]:
    return {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}


def legacy_logprobs(null: bool = False) -> dict[str, Any]:
    return {"tokens": [t for t, _ in TOKS], "text_offset": [0, 3, 10, 13, 15],
            "token_logprobs": [None if null and i == 0 else lp for i, (_, lp) in enumerate(TOKS)],
            "top_logprobs": [{t: lp, "zz": None if null else lp - 3} for t, lp in TOKS]}


def error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple:
    return ("body", status, "application/json", json.dumps(body).encode(), headers or {})


def oai_error(message: str, type_: str, code: Any, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


#: llama.cpp's error event, as its server_sent_event(sink, "error", ...) writes it (format_error_response's body)
LLAMA_ERROR_500 = b'error: {"code":500,"message":"llama_decode failed","type":"server_error"}\n\n'
LLAMA_ERROR_CTX = (b'error: {"code":400,"message":"the request exceeds the available context size, try increasing '
                   b'it","type":"exceed_context_size_error"}\r\n\r\n')
THINK = [("<think>", -0.01), ("Let", -1.5), (" me", -2.0), (" think", -2.5), ("</think>", -0.1)]
#: a proxy that cuts its text by UTF-16 units: an emoji's surrogate pair across two tokens (each a JSON escape of
#: its own, so each chunk of a stream holds half a character), or half of one alone (valid JSON, not UTF-8)
SURROGATES = {"surr-pair": [("Hi", -0.1), (" \ud83d", -0.2), ("\ude00", -0.2), (" there", -0.1)],
              "surr-lone": [("Hi", -0.1), (" \ud83d", -0.2), (" there", -0.1)],
              "surr-end": [("Hi", -0.1), (" \ud83d", -0.2)]}  # (a half that no chunk after it completes)


def surrogate_entry(tok: str, lp: float) -> dict[str, Any]:
    raw = list(tok.encode("utf-8", "surrogatepass"))
    return {"token": tok, "logprob": lp, "bytes": raw, "top_logprobs": [{"token": tok, "logprob": lp, "bytes": raw}]}


def openai_stop(model: str, stops: str | list[str], stream: bool) -> tuple:
    """OpenAI's ``stop``: at most 4 sequences (a 400 for more); the answer ends before the earliest, its
    logprobs running through the token the stop cut (as servers send them)."""
    stops = [stops] if isinstance(stops, str) else stops
    if len(stops) > 4:
        return error(400, oai_error(f"Invalid 'stop': array too long. Expected an array with maximum length 4, but "
                                    f"got an array with length {len(stops)} instead.", "invalid_request_error",
                                    "array_above_max_length", "stop"))
    cut = min((TEXT.find(s) for s in stops if s in TEXT), default=len(TEXT))
    toks, pos = [], 0
    for t, lp in TOKS:
        if pos >= cut:
            break
        toks.append((t, lp, t[:cut - pos]))
        pos += len(t)
    if not stream:
        body = chat(model, TEXT[:cut], [entry(t, lp) for t, lp, _ in toks])
        return ("body", 200, "application/json", json.dumps(body).encode(), {})
    events = [chunk(model, {"role": "assistant", "content": ""})]
    events += [chunk(model, {"content": kept}, [entry(t, lp)]) for t, lp, kept in toks]
    return ("sse", events + [chunk(model, {}, finish="stop"), usage_chunk(model)], True)


#: an answer whose second token ends inside a character (OpenAI's ``bytes`` say which), as "你" is split by byte-level
#: BPE: the token's text is the bytes' escape, the characters come whole in the text
CJK = [("Hi", -0.1, b"Hi"), (" \\xe4\\xbd", -0.2, b" \xe4\xbd"), ("\\xa0", -0.3, b"\xa0"),
       ("好", -0.4, "好".encode())]


def cjk_entry(tok: str, lp: float, raw: bytes) -> dict[str, Any]:
    return {"token": tok, "logprob": lp, "bytes": list(raw), "top_logprobs": [{"token": tok, "logprob": lp,
                                                                             "bytes": list(raw)}]}


BODY_ERRORS = {"body-502": {"code": 502, "message": "Provider returned error", "metadata": {"provider_name": "X"}},
               "body-429": {"code": 429, "message": "Provider rate limited the request"},
               "body-ctx": {"code": 400, "message": "This endpoint's maximum context length is 4096 tokens."},
               "body-text": "upstream failed",
               # no code or type to read: a context overflow in its words is a 400 all the same
               "body-ctx-text": "This model's maximum context length is 4096 tokens.",
               "body-400": {"code": 400, "message": "Invalid 'temperature': expected at most 2"}}


def respond(model: str, path: str, body: dict[str, Any]) -> tuple:
    """``("body", status, content-type, bytes, headers)`` or ``("sse", [event, ...], done)``."""
    stream, chat_path = bool(body.get("stream")), path.endswith("/chat/completions")
    if model in BODY_ERRORS:  # a 200 whose body is an error object (OpenRouter's, once the model began; a gateway's,
        # to a stream request too)
        return ("body", 200, "application/json", json.dumps({"error": BODY_ERRORS[model]}).encode(), {})
    if model == "cjk" and chat_path:  # (max_tokens ignored, as every scenario here does)
        if stream:
            return ("sse", [chunk(model, {"role": "assistant", "content": ""}),
                            chunk(model, {"content": "Hi"}, [cjk_entry(*CJK[0])]),
                            chunk(model, {"content": " 你"}, [cjk_entry(*CJK[1]), cjk_entry(*CJK[2])]),
                            chunk(model, {"content": "好"}, [cjk_entry(*CJK[3])]),
                            chunk(model, {}, finish="stop"), usage_chunk(model)], True)
        return ("body", 200, "application/json",
                json.dumps(chat(model, "Hi 你好", [cjk_entry(*e) for e in CJK])).encode(), {})
    if model == "vllm-sampled-first" and not chat_path:  # the same on legacy completions (a dict, in its order)
        lp = {"tokens": [" 4"], "token_logprobs": [-1.2], "text_offset": [0],
              "top_logprobs": [{" 4": -1.2, "alt": -0.3, "mid": -0.9}]}
        return ("body", 200, "application/json", json.dumps(completion(model, lp, text=" 4")).encode(), {})
    if model == "vllm-sampled-first":  # vLLM's server lists the sampled token first among its top_logprobs
        e = entry(" 4", -1.2, alt=-0.3)
        e["top_logprobs"].append({"token": "mid", "logprob": -0.9, "bytes": list(b"mid")})
        return ("body", 200, "application/json", json.dumps(chat(model, " 4", [e])).encode(), {})
    if model == "too-large":  # a proxy's limit on the request's body (nginx's client_max_body_size)
        return ("body", 413, "text/html", b"<html><head><title>413 Request Entity Too Large</title></head></html>", {})
    if model == "stop-openai" and chat_path:
        return openai_stop(model, body.get("stop") or [], stream)
    # --- redirects: a base_url that moved (the Location relative, as most servers write it)
    if model in ("moved-301", "moved-308") and "/moved/" not in path:
        return ("body", int(model[-3:]), "text/plain", b"", {"location": path.replace("/v1/", "/v1/moved/", 1)})
    if model == "moved-308":  # the POST kept its body: answered where it was sent
        return ("body", 200, "application/json", json.dumps(chat(model)).encode(), {})
    # --- errors, in each server's words (also the answer to a stream: the status comes first)
    if model == "ctx-llama":  # llama.cpp tools/server: exceed_context_size_error
        return error(400, {"error": {"code": 400, "message": "request (5000 tokens) exceeds the available context "
                                     "size (4096 tokens), try increasing it", "type": "exceed_context_size_error",
                                     "n_prompt_tokens": 5000, "n_ctx": 4096}})
    if model == "ctx-llama-type":  # the type alone says it, whatever the message's words
        return error(400, {"error": {"code": 400, "message": "prompt too large for the slot",
                                     "type": "exceed_context_size_error"}})
    if model == "ctx-vllm-decoder":
        return error(400, oai_error("The decoder prompt (length 5000) is longer than the maximum model length of "
                                    "4096. Make sure that `max_model_len` is no smaller than the number of text "
                                    "tokens.", "BadRequestError", 400))
    if model == "ctx-vllm-old":  # vLLM before 0.7: the error object at the top level
        return error(400, {"object": "error", "message": "The decoder prompt (length 5000) is longer than the "
                           "maximum model length of 4096.", "type": "BadRequestError", "param": None, "code": 400})
    if model == "ctx-tgi":  # text-generation-inference (its router's validation): a 422
        return error(422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
                                    "Given: 5000 `inputs` tokens and 16 `max_new_tokens`", "error_type": "validation"})
    if model == "ctx-tgi-input":
        return error(422, {"error": "Input validation error: `inputs` must have less than 4095 tokens. Given: 5000",
                           "error_type": "validation"})
    if model == "bad-request":
        return error(400, oai_error("top_logprobs requires logprobs to be set to true", "invalid_request_error",
                                    400))
    if model == "quota":  # OpenAI, out of credits
        return error(429, oai_error("You exceeded your current quota, please check your plan and billing details.",
                                    "insufficient_quota", "insufficient_quota"))
    if model == "credits":  # OpenRouter (and others), out of credits: 402 Payment Required
        return error(402, {"error": {"code": 402, "message": "Insufficient credits. Add more using "
                                     "https://openrouter.ai/settings/credits"}})
    if model == "credits-inflight":  # OpenRouter's in-flight spending budget: full for now, with a wait
        return error(402, {"error": {"code": 402, "message": "In-flight budget exhausted", "metadata": {
            "limit_source": "openrouter_in_flight_budget"}}}, {"retry-after": "3"})
    if model == "rate":
        return error(429, oai_error("Rate limit reached for requests per min (RPM).", "requests",
                                    "rate_limit_exceeded"), {"retry-after": "20"})
    if model == "mistral" and "stream_options" in body:  # Mistral's API: no stream_options (pydantic, extra forbidden)
        return error(422, {"object": "error", "message": {"detail": [{
            "type": "extra_forbidden", "loc": ["body", "stream_options", "include_usage"],
            "msg": "Extra inputs are not permitted", "input": True}]}, "type": "invalid_request_error", "param": None,
            "code": None})
    if model == "mistral":
        if stream:
            return ("sse", oai_stream(model)[:-1], True)  # (no usage chunk: none was asked for)
        return ("body", 200, "application/json", json.dumps(chat(model)).encode(), {})
    if model == "o-series":  # OpenAI's reasoning models: max_completion_tokens only, no sampling parameters
        for param in ("max_tokens", "logprobs", "top_logprobs", "stop"):  # (o3 and o4-mini refuse stop)
            if param in body:
                return error(400, oai_error(f"Unsupported parameter: '{param}' is not supported with this model.",
                                            "invalid_request_error", "unsupported_parameter", param))
        for param in ("temperature", "top_p"):
            if param in body and body[param] != 1:
                return error(400, oai_error(f"Unsupported value: '{param}' does not support {body[param]} with this "
                                            "model. Only the default (1) value is supported.",
                                            "invalid_request_error", "unsupported_value", param))
        if stream:
            return ("sse", [{**c, "choices": [{**ch, "logprobs": None} for ch in c["choices"]]}
                            for c in oai_stream(model)], True)
        return ("body", 200, "application/json", json.dumps(chat(model, entries=[])).encode(), {})
    if model == "no-logprobs-param":  # Groq, DeepSeek reasoner, OpenAI reasoning models
        if "logprobs" in body or "top_logprobs" in body:
            return error(400, oai_error("Unsupported parameter: 'logprobs' is not supported with this model.",
                                        "invalid_request_error", "unsupported_parameter", "logprobs"))
        if stream:  # logprobs sent all the same: not read
            return ("sse", oai_stream(model) if chat_path else cmpl_stream(model), True)
        return ("body", 200, "application/json",
                json.dumps(chat(model) if chat_path else completion(model, legacy_logprobs())).encode(), {})
    # --- streams
    if stream and chat_path:
        streams = {
            "ok": lambda: (oai_stream(model), True),
            "null-lp": lambda: (oai_stream(model, null=True), True),
            "done-only": lambda: ([], True),
            "usage-only": lambda: ([usage_chunk(model)], True),
            "truncated": lambda: (oai_stream(model)[:3], False),   # 2 tokens, then the body ends cleanly
            "role-then-close": lambda: (oai_stream(model)[:1], False),
            # SGLang before 0.4.4, Ollama, LocalAI: "" for null on every chunk until the last (KoboldCpp: "null")
            "finish-empty": lambda: (not_finished(oai_stream(model), ""), True),
            "finish-empty-cut": lambda: (not_finished(oai_stream(model), "")[:3], False),
            "finish-null-text-cut": lambda: (not_finished(oai_stream(model), "null")[:3], False),
            # OpenRouter's, when the model's provider failed mid-answer: the choice ends with finish_reason "error"
            "finish-error": lambda: (oai_stream(model)[:3] + [chunk(model, {}, finish="error"), usage_chunk(model)],
                                     True),
            # a server failing once its 200 went out: an error event, then [DONE] (vLLM's prompt longer than the
            # model's context, found as the engine takes the request; OpenAI's rate limit or server error)
            "event-ctx-vllm": lambda: ([{"error": {
                "message": "The decoder prompt (length 5000) is longer than the maximum model length of 4096.",
                "type": "BadRequestError", "param": None, "code": 400}}], True),
            "event-rate": lambda: ([{"error": {"message": "Rate limit reached for requests per min (RPM).",
                                               "type": "requests", "param": None, "code": "rate_limit_exceeded"}}],
                                   True),
            "event-rate-mid": lambda: (oai_stream(model)[:3] + [{"error": {
                "message": "Rate limit reached for tokens per min (TPM).", "type": "tokens", "param": None,
                "code": "rate_limit_exceeded"}}], True),
            "event-server": lambda: (oai_stream(model)[:1] + [{"error": {
                "message": "The server had an error while processing your request.", "type": "server_error",
                "param": None, "code": None}}], True),
            "event-tgi": lambda: ([{"error": "Request failed during generation: Server error: CUDA out of memory",
                                    "error_type": "generation"}], True),  # text-generation-inference's
            # TGI's request refused in the stream (its 422 over HTTP), and its queue full (its 429)
            "event-tgi-validation": lambda: ([{"error": "Input validation error: `temperature` must be strictly "
                                               "positive", "error_type": "validation"}], True),
            "event-tgi-overloaded": lambda: ([{"error": "Model is overloaded", "error_type": "overloaded"}], True),
            "event-tgi-template": lambda: ([{"error": "Template error: syntax error: unexpected end of input",
                                             "error_type": "template_error"}], True),
            # older vLLM's (its ErrorResponse as the event itself, no "error" key)
            "event-ctx-vllm-old": lambda: ([{"object": "error", "message": "This model's maximum context length is "
                                             "4096 tokens. However, you requested 5000 tokens.",
                                             "type": "BadRequestError", "param": None, "code": 400}], True),
            "event-credits": lambda: ([{"error": {"code": 402, "message": "Insufficient credits."}}], True),
            # llama.cpp's server: its error under a field of its own (``error:``, not ``data:``), then [DONE]
            "llama-event-server": lambda: (oai_stream(model)[:3] + [LLAMA_ERROR_500], True),
            "llama-event-ctx": lambda: ([LLAMA_ERROR_CTX], True),
            "llama-event-text": lambda: (oai_stream(model)[:1] + [b"error: slot unavailable\r\n\r\n"], True),
            **{m: (lambda m=m: ([chunk(model, {"role": "assistant", "content": ""})]
                                + [chunk(model, {"content": t}, [surrogate_entry(t, lp)]) for t, lp in SURROGATES[m]]
                                + [chunk(model, {}, finish="stop"), usage_chunk(model)], True)) for m in SURROGATES},
            "reasoning": lambda: ([chunk(model, {"role": "assistant", "content": None})]
                                  + [chunk(model, {"reasoning_content": t}, [entry(t, lp)]) for t, lp in THINK[1:4]]
                                  + [chunk(model, {"content": t}, [entry(t, lp)])
                                     for t, lp in (("4", -0.01), ("2", -0.02))]
                                  + [chunk(model, {}, finish="stop"), usage_chunk(model)], True),
        }
        if model in streams:
            events, done = streams[model]()
            return ("sse", events, done)
        if model == "html":  # a proxy's sign-in page, 200
            return ("body", 200, "text/html", b"<html><body>Please sign in to the proxy</body></html>", {})
        if model == "json-body":  # a server that ignores stream: true
            return ("body", 200, "application/json", json.dumps(chat(model)).encode(), {})
    if stream and not chat_path and model == "llama-cmpl":  # llama.cpp: {"content": [...]} in every chunk
        events = [{"choices": [{"text": t, "index": 0, "logprobs": {"content": [entry(t, lp, llama=True)]},
                                "finish_reason": None}], "created": 1, "model": model, "object": "text_completion",
                   "id": "x"} for t, lp in TOKS]
        events.append({"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}], "created": 1,
                       "model": model, "object": "text_completion", "id": "x",
                       "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}})
        return ("sse", events, True)
    # --- whole answers
    answers: dict[str, Any] = {}
    if chat_path:
        answers = {
            **{m: (lambda m=m: chat(model, "".join(t for t, _ in SURROGATES[m]),
                                    [surrogate_entry(t, lp) for t, lp in SURROGATES[m]])) for m in SURROGATES},
            "ok": lambda: chat(model),
            "finish-error": lambda: {**(c := chat(model)), "choices": [{**c["choices"][0], "finish_reason": "error"}]},
            # the answer's text as a list of parts (Mistral's reasoning models), not a string
            "content-parts": lambda: chat(model, [{"type": "text", "text": TEXT}]),
            "null-lp": lambda: chat(model, entries=[entry(t, None if i == 0 else lp, alt=None)
                                                   for i, (t, lp) in enumerate(TOKS)]),
            # vLLM's reasoning parser (reasoning_content), the thinking's tokens first in logprobs.content
            "reasoning": lambda: chat(model, "42", [entry(t, lp) for t, lp in
                                                    THINK + [("\n\n", -0.3), ("4", -0.01), ("2", -0.02)]],
                                      reasoning_content="Let me think"),
            # newer vLLM (``reasoning``), the answer's whitespace stripped by the parser, "\n\n" merged in a token
            "reasoning-new": lambda: chat(model, "42", [entry(t, lp) for t, lp in
                                                        THINK + [("\n\n4", -0.01), ("2", -0.02), ("\n", -0.5)]],
                                          reasoning="Let me think"),
            # the thinking ran into max_tokens: no answer
            "reasoning-cut": lambda: chat(model, None, [entry(t, lp) for t, lp in THINK[:3]],
                                          reasoning_content="Let me"),
            # tokens that do not end with the answer: kept as they came
            "reasoning-mismatch": lambda: chat(model, "42", [entry(t, lp) for t, lp in THINK + [("43", -0.4)]],
                                               reasoning_content="Let me think"),
        }
    elif model == "llama-cmpl":  # llama.cpp's /v1/completions (to_json_oaicompat): chat's logprobs shape
        llama_lp = {"content": [entry(t, lp, llama=True) for t, lp in TOKS]}
        answers = {"llama-cmpl": lambda: {**completion(model, llama_lp), "timings": {"prompt_n": 4, "predicted_n": 5}}}
    elif model == "llama-cmpl-null":
        answers = {"llama-cmpl-null": lambda: completion(model, {"content": [
            entry(t, None if i == 0 else lp, alt=None, llama=True) for i, (t, lp) in enumerate(TOKS)]})}
    elif model == "text-number":  # a completion's text that is no string
        answers = {"text-number": lambda: completion(model, legacy_logprobs(), text=42)}
    elif model == "null-lp":  # legacy completions: the first token's logprob null, the alternatives' too
        answers = {"null-lp": lambda: completion(model, legacy_logprobs(null=True))}
    if model in answers:
        return ("body", 200, "application/json", json.dumps(answers[model]()).encode(), {})
    return error(404, oai_error(f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found"))


class Upstream:
    """The raw server on 127.0.0.1 (an ephemeral port), in a thread with its own event loop. ``requests``:
    each request's path and body (its messages left out), in arrival order."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def seen(self, model: str) -> int:
        return sum(r["body"].get("model") == model for r in self.requests)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self) -> "Upstream":
        self._thread.start()
        assert self._ready.wait(10), "upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(task := asyncio.current_task())
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}
                n = int(headers.get("content-length", "0"))
                body = json.loads(await reader.readexactly(n)) if n else {}
                self.requests.append({"path": path, "body": {k: v for k, v in body.items() if k != "messages"}})
                out = (respond(str(body.get("model", "")), path, body) if method == "POST" else
                       error(405, oai_error("Method Not Allowed", "invalid_request_error", None)))
                if out[0] == "body":
                    _, status, ctype, payload, extra = out
                    lines = [f"HTTP/1.1 {status} X", f"content-type: {ctype}", f"content-length: {len(payload)}"]
                    lines += [f"{k}: {v}" for k, v in extra.items()]
                    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
                else:  # chunked SSE, ended cleanly (the 0-length chunk), with or without [DONE]
                    _, events, done = out
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    parts = [e if isinstance(e, bytes) else b"data: " + json.dumps(e).encode() + b"\n\n"
                             for e in events]  # (bytes: a line written as it is)
                    parts += [b"data: [DONE]\n\n"] if done else []
                    for part in parts:
                        writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


async def generate(up: Upstream, model: str, request: GenerationRequest = CHAT, **options: Any):
    b = OpenAIBackend(model=model, name=model, base_url=up.base_url, timeout_s=10, **options)
    try:
        return await b.generate(request)
    finally:
        await b.close()


async def stream(up: Upstream, model: str, request: GenerationRequest = CHAT, got: list | None = None,
                 **options: Any):
    """The stream's chunks; ``got`` collects them as they come (for a stream that raises)."""
    b = OpenAIBackend(model=model, name=model, base_url=up.base_url, timeout_s=10, **options)
    got = [] if got is None else got
    try:
        async for c in b.stream(request):
            got.append(c)
    finally:
        await b.close()
    return got


def remote(name: str, up: Upstream, model: str, **kw: Any) -> dict[str, Any]:
    options = {"base_url": up.base_url, **kw.pop("options", {})}
    return {"name": name, "backend": "openai", "model": model, "threshold": 0.5, "max_tokens": 16,
            "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "options": options, **kw}


async def engine_stream(cfg: Any) -> list:
    """The events of CHAT streamed through an engine opened on ``cfg`` (closed after)."""
    eng = await Engine.open(cfg)
    try:
        return [e async for e in eng.stream(CHAT)]
    finally:
        await eng.close()


def two_providers(tmp_path: Path, up: Upstream, first: tuple[str, str], second: tuple[str, str],
                  first_options: dict[str, Any] | None = None, **tier: Any) -> Any:
    """A config of one tier "t" (threshold 0: every answer kept) served by two providers of ``up``, each a
    (name, model): the second is the one the tier falls over to."""
    providers = [{"name": name, "backend": "openai", "model": model, "options": {"base_url": up.base_url, **opts}}
                 for (name, model), opts in ((first, first_options or {}), (second, {}))]
    return make_config(tmp_path, [{"name": "t", "threshold": 0.0, "max_tokens": 16, "timeout_s": 10,
                                   "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, **tier,
                                   "providers": providers}])


# --- 1. context overflow in llama.cpp's and vLLM's words ------------------------------------------------

@pytest.mark.parametrize("model", ["ctx-llama", "ctx-llama-type", "ctx-vllm-decoder", "ctx-vllm-old", "ctx-tgi",
                                   "ctx-tgi-input"])
async def test_a_context_overflow_in_each_servers_words_is_a_context_length_error(upstream, model):
    with pytest.raises(ProviderContextLengthError) as err:
        await generate(upstream, model)
    status = 422 if "tgi" in model else 400
    assert err.value.upstream_status == status and err.value.code == "context_length_exceeded"
    assert "tgi" not in model or "Given: 5000" in err.value.message  # its own words: {"error": "..."} kept
    with pytest.raises(ProviderContextLengthError):
        await stream(upstream, model)
    # another 400 stays an invalid request
    with pytest.raises(ProviderInvalidRequestError) as other:
        await generate(upstream, "bad-request")
    assert not isinstance(other.value, ProviderContextLengthError)


async def test_a_numeric_error_code_is_no_code_for_the_client(upstream, tmp_path):
    """vLLM's and llama.cpp's error ``code`` is the HTTP status (400), which the openai client turns into the string
    "400": the client's error had code "400" where OpenAI's protocol has a name or null. It has none."""
    with pytest.raises(ProviderInvalidRequestError) as err:
        await generate(upstream, "bad-request")
    assert err.value.upstream_status == 400 and err.value.code is None
    eng = await Engine.open(make_config(tmp_path, [remote("t", upstream, "bad-request")]))
    try:
        with pytest.raises(ProviderInvalidRequestError) as served:
            await eng.run(CHAT)
    finally:
        await eng.close()
    assert served.value.code is None and served.value.status_code == 400


async def test_a_413_is_the_clients_request_too_large_not_a_provider_failure(upstream):
    """A proxy's 413 (a body past its limit: the prompt the client sent) is a refused request, as a 400 is: not
    fallen over to another provider, whose limit the same body meets, nor counted against the breaker as a
    provider's failure (a 502)."""
    with pytest.raises(ProviderInvalidRequestError) as err:
        await generate(upstream, "too-large")
    assert type(err.value) is ProviderInvalidRequestError and err.value.upstream_status == 413
    assert not err.value.fall_over and err.value.status_code == 400


async def test_a_llamacpp_context_overflow_escalates_to_the_next_tier(upstream, tmp_path):
    cfg = make_config(tmp_path, [remote("small", upstream, "ctx-llama"), remote("big", upstream, "ok")])
    eng = await Engine.open(cfg)
    try:
        rec = (await eng.run(CHAT)).record
    finally:
        await eng.close()
    assert rec.tier == "big" and rec.status == "ok"
    assert [(a.tier, a.error_class) for a in rec.attempts] == [("small", "ProviderContextLengthError"),
                                                               ("big", None)]


# --- 2. llama.cpp's /v1/completions logprobs in chat's shape --------------------------------------------

async def test_llamacpp_completion_logprobs_in_the_chat_shape_are_read(upstream, tmp_path):
    res = await generate(upstream, "llama-cmpl", RAW)
    assert res.text == TEXT
    assert [(t.token, t.logprob) for t in res.tokens] == TOKS
    assert [(a.token, a.logprob) for a in res.tokens[0].top] == [("The", -0.01), ("alt", -5.0)]
    assert b"".join(t.utf8 for t in res.tokens) == TEXT.encode()
    chunks = await stream(upstream, "llama-cmpl", RAW)
    assert "".join(c.text for c in chunks) == TEXT
    assert [(t.token, t.logprob) for c in chunks for t in c.tokens] == TOKS
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 5
    # in a cascade the sure answer is accepted (no tokens read, it was an "empty answer", always escalated)
    cfg = make_config(tmp_path, [remote("small", upstream, "llama-cmpl", options={"endpoint": "completions"}),
                                 remote("big", upstream, "ok")])
    eng = await Engine.open(cfg)
    try:
        rec = (await eng.run(RAW, endpoint="completions")).record
    finally:
        await eng.close()
    assert rec.tier == "small" and rec.attempts[0].decision == "accept" and rec.confidence > 0.5


# --- 3. null logprobs (SGLang, llama.cpp write -inf as null) --------------------------------------------

@pytest.mark.parametrize("model,request_", [("null-lp", CHAT), ("null-lp", RAW), ("llama-cmpl-null", RAW)])
async def test_a_null_logprob_is_floored_on_every_endpoint(upstream, model, request_):
    """A chosen token's null is NULL_TOKEN_LOGPROB (-30, as the completions path always floored it), an
    alternative's null LOGPROB_MIN (as -inf): the answer is read, not a malformed response."""
    res = await generate(upstream, model, request_)
    assert res.text == TEXT and len(res.tokens) == 5
    assert res.tokens[0].logprob == NULL_TOKEN_LOGPROB == -30.0
    assert [t.logprob for t in res.tokens[1:]] == [lp for _, lp in TOKS[1:]]
    assert {a.logprob for t in res.tokens for a in t.top if a.token in ("alt", "zz")} == {LOGPROB_MIN}


async def test_a_null_logprob_in_a_stream_is_floored(upstream):
    chunks = await stream(upstream, "null-lp")
    toks = [t for c in chunks for t in c.tokens]
    assert [t.logprob for t in toks] == [NULL_TOKEN_LOGPROB] + [lp for _, lp in TOKS[1:]]
    assert all(a.logprob == LOGPROB_MIN for t in toks for a in t.top if a.token == "alt")


async def test_a_redirect_that_made_the_post_a_get_says_so(upstream):
    """A base_url that moved (http to https, a trailing slash): httpx follows a 301 as a GET, and the 405 that
    comes back named nothing of the cause. The message now names the redirect and the fix."""
    with pytest.raises(ProviderError) as err:
        await generate(upstream, "moved-301")
    assert err.value.upstream_status == 405 and err.value.fall_over
    msg = err.value.message
    assert f"redirected POST {upstream.base_url}/chat/completions with HTTP 301 to {upstream.base_url}/moved/" in msg
    assert "which made it a GET" in msg and "base_url" in msg


async def test_a_redirect_that_keeps_the_post_is_answered(upstream):
    """A 308 keeps the method and the body: answered where it points, nothing to report."""
    result = await generate(upstream, "moved-308")
    assert result.text == TEXT
    assert [r["path"] for r in upstream.requests if r["body"].get("model") == "moved-308"][-2:] == [
        "/v1/chat/completions", "/v1/moved/chat/completions"]


# --- 4. streams that carry no answer, or are cut off ----------------------------------------------------

@pytest.mark.parametrize("model", ["html", "json-body", "done-only", "usage-only"])
async def test_a_stream_that_carries_no_answer_is_a_malformed_response(upstream, model):
    """A 200 whose body is no answer's stream (a proxy's page, a server ignoring stream: true, nothing but
    [DONE] or usage) is what the same body unstreamed is: malformed, the provider's fault, billed as
    answered. Before, it was a successful empty "stop" answer."""
    got: list = []
    with pytest.raises(ProviderServerError, match="malformed response .*the stream carried no answer") as err:
        await stream(upstream, model, got=got)
    assert got == [] and err.value.answered and err.value.fall_over


@pytest.mark.parametrize(("model", "request_"), [("content-parts", CHAT), ("text-number", RAW)])
async def test_an_answer_whose_text_is_no_string_is_a_malformed_response(upstream, tmp_path, model, request_):
    """A 200 whose text is a list of parts or a number is malformed: the provider's fault, fallen over, its prompt
    billed as answered. Before, a raw TypeError left the backend (logged as a bug), recorded as a plain
    ProviderError billed nothing."""
    with pytest.raises(ProviderServerError, match="malformed response") as err:
        await generate(upstream, model, request_)
    assert err.value.answered and err.value.fall_over
    endpoint = "chat" if request_ is CHAT else "completions"
    cfg = two_providers(tmp_path, upstream, ("odd", model), ("healthy", "ok"), {"endpoint": endpoint})
    eng = await Engine.open(cfg)
    try:
        rec = (await eng.run(CHAT)).record
    finally:
        await eng.close()
    assert rec.status == "ok" and rec.attempts[-1].backend == "healthy"
    failed = rec.attempts[0]
    assert (failed.backend, failed.error_class) == ("odd", "ProviderServerError")
    assert failed.prompt_tokens > 0 and failed.cost_usd > 0  # it answered: its prompt is billed, as estimated


@pytest.mark.parametrize("model,sent", [("truncated", "The answer"), ("role-then-close", ""),
                                        ("finish-empty-cut", "The answer"), ("finish-null-text-cut", "The answer")])
async def test_a_stream_that_ends_without_a_finish_reason_was_cut_off(upstream, model, sent):
    """The body ended cleanly, with neither a finish reason nor [DONE]: as a connection lost mid-answer
    (what a drop mid-stream raises), after the chunks that came."""
    got: list = []
    with pytest.raises(ProviderConnectionError, match="ended without a finish reason") as err:
        await stream(upstream, model, got=got)
    assert "".join(c.text for c in got) == sent and err.value.answered
    assert all(c.finish_reason is None for c in got)


async def test_a_finish_reason_written_as_an_empty_string_is_no_answers_end(upstream):
    """SGLang (before 0.4.4), Ollama and LocalAI write "" where OpenAI writes a chunk's null finish_reason: the
    answer ends with the last chunk's real one. Each "" was read as "stop", so a stream cut off after its first
    chunk passed for a whole answer (above: a cut-off stream); a whole stream ends as it said."""
    chunks = await stream(upstream, "finish-empty")
    assert "".join(c.text for c in chunks) == TEXT and chunks[-1].finish_reason == "stop"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


async def test_an_answer_ended_by_finish_reason_error_is_the_providers_failure(upstream):
    """OpenRouter ends an answer whose provider failed mid-way with finish_reason "error": a part of an answer,
    not one that stopped. Before, it was read as "stop" and the part kept as the answer."""
    with pytest.raises(ProviderServerError, match="finish_reason 'error'.*after 16 characters") as err:
        await generate(upstream, "finish-error")
    assert err.value.answered and err.value.fall_over and err.value.upstream_status == 500
    got: list = []
    with pytest.raises(ProviderServerError, match="finish_reason 'error'.*after 10 characters") as err:
        await stream(upstream, "finish-error", got=got)
    assert "".join(c.text for c in got) == "The answer" and all(c.finish_reason is None for c in got)
    assert err.value.answered


async def test_an_answer_ended_by_finish_reason_error_falls_over_to_the_next_provider(upstream, tmp_path):
    cfg = two_providers(tmp_path, upstream, ("openrouter", "finish-error"), ("healthy", "ok"))
    eng = await Engine.open(cfg)
    try:
        out = await eng.run(CHAT)
    finally:
        await eng.close()
    rec = out.record
    assert rec.status == "ok" and out.result.text == TEXT
    assert [(a.backend, a.error_class) for a in rec.attempts] == [("openrouter", "ProviderServerError"),
                                                                  ("healthy", None)]
    assert rec.attempts[0].cost_usd > 0  # it answered (in part): billed


async def test_a_stream_with_no_answer_falls_over_to_the_next_provider(upstream, tmp_path):
    cfg = two_providers(tmp_path, upstream, ("proxy", "html"), ("healthy", "ok"))
    events = await engine_stream(cfg)
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == TEXT
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.record.status == "ok"
    assert [(a.backend, a.error_class) for a in end.record.attempts] == [("proxy", "ProviderServerError"),
                                                                          ("healthy", None)]


async def test_a_cut_off_stream_is_a_partial_answer(upstream, tmp_path):
    eng = await Engine.open(make_config(tmp_path, [remote("t", upstream, "truncated")]))
    try:
        events = [e async for e in eng.stream(CHAT)]
    finally:
        await eng.close()
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == "The answer"
    failed = events[-1]
    assert isinstance(failed, StreamFailed) and isinstance(failed.error, ProviderConnectionError)
    assert failed.record.status == "partial" and failed.record.error_class == "ProviderConnectionError"


@pytest.mark.parametrize(("model", "error", "status"), [("event-ctx-vllm", ProviderContextLengthError, 400),
                                                       ("event-rate", RateLimitedError, 429),
                                                       ("event-server", ProviderServerError, 500),
                                                       ("event-tgi", ProviderServerError, 500),
                                                       ("event-tgi-validation", ProviderInvalidRequestError, 422),
                                                       ("event-tgi-overloaded", RateLimitedError, 429),
                                                       ("event-tgi-template", ProviderInvalidRequestError, 422),
                                                       ("event-ctx-vllm-old", ProviderContextLengthError, 400),
                                                       ("llama-event-server", ProviderServerError, 500),
                                                       ("llama-event-ctx", ProviderContextLengthError, 400),
                                                       ("llama-event-text", ProviderServerError, 500)])
async def test_an_error_event_in_a_stream_is_read_as_the_status_it_stands_for(upstream, model, error, status):
    """A server that fails after its 200 went out sends ``data: {"error": {...}}``: read as the HTTP status it
    stands for (its numeric code, else its code or type), so that a context overflow escalates, a rate limit is
    retried and neither counts against the breaker. Before, each was a plain ProviderError, fallen over."""
    with pytest.raises(error) as err:
        await stream(upstream, model)
    assert type(err.value) is error and err.value.upstream_status == status
    assert "error in the stream" in err.value.message


async def test_llamacpps_error_field_is_the_error_it_states_not_a_cut_answer(upstream, tmp_path):
    """llama.cpp writes an error found once the stream's headers went out as ``error: {...}`` (a field of its own,
    where the others write ``data:``), then ``[DONE]``. The openai client ignores the field, so the stream read as
    cut off (after text) or as no answer: a 400 fell over like a dropped connection. Now it is its status: the
    text before it stays sent, and an error before any text falls over (a 5xx) or does not (a context overflow)."""
    got: list = []
    with pytest.raises(ProviderServerError, match=r"error in the stream \(as HTTP 500\): llama_decode failed") as err:
        await stream(upstream, "llama-event-server", got=got)
    assert "".join(c.text for c in got) == "The answer" and err.value.fall_over
    with pytest.raises(ProviderServerError, match="slot unavailable"):
        await stream(upstream, "llama-event-text")
    cfg = two_providers(tmp_path, upstream, ("llama", "llama-event-text"), ("healthy", "ok"))
    events = await engine_stream(cfg)
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == TEXT
    assert [(a.backend, a.error_class) for a in events[-1].record.attempts] == [("llama", "ProviderServerError"),
                                                                                ("healthy", None)]
    cfg = two_providers(tmp_path, upstream, ("llama-a", "llama-event-ctx"), ("llama-b", "ok"))
    before = upstream.seen("ok")
    eng = await Engine.open(cfg)
    try:
        with pytest.raises(ProviderContextLengthError):
            async for _ in eng.stream(CHAT):
                pass
    finally:
        await eng.close()
    assert upstream.seen("ok") == before  # the same model elsewhere is not asked


@pytest.mark.parametrize(("model", "error", "status"), [("body-502", ProviderServerError, 502),
                                                       ("body-429", RateLimitedError, 429),
                                                       ("body-ctx", ProviderContextLengthError, 400),
                                                       ("body-text", ProviderServerError, 500),
                                                       ("body-ctx-text", ProviderContextLengthError, 400),
                                                       ("body-400", ProviderInvalidRequestError, 400)])
@pytest.mark.parametrize("request_", [CHAT, RAW], ids=["chat", "completions"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_200_whose_body_is_an_error_is_read_as_the_status_it_stands_for(upstream, model, error, status,
                                                                                 request_, streamed):
    """OpenRouter answers a failure found once the model began with a 200 whose body is ``{"error": {...}}``. It was
    a malformed response (a TypeError in the log, the upstream's text lost); now it is the status its code stands
    for, as an error event in a stream is: a rate limit retried, a context overflow escalated, its text kept. Some
    gateways answer a stream request so too: that stream carried no answer (malformed, billed as answered)."""
    with pytest.raises(error) as err:
        await (stream if streamed else generate)(upstream, model, request_)
    assert type(err.value) is error and err.value.upstream_status == status
    assert "error in the answer" in err.value.message and "malformed" not in err.value.message
    said = BODY_ERRORS[model]
    assert (said if isinstance(said, str) else said["message"]) in err.value.message


async def test_a_200_error_body_to_a_stream_is_recorded_as_that_error_and_not_billed(upstream, tmp_path):
    """The live tier's provider answering a stream request with a 200 whose body is an error (a gateway's 502) falls
    over as a 502 does: its attempt in the ledger names the upstream's error, and bills nothing (no answer came)."""
    events = await engine_stream(two_providers(tmp_path, upstream, ("gw", "body-502"), ("healthy", "ok")))
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == TEXT
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.record.status == "ok"
    failed, served = end.record.attempts
    assert (failed.backend, failed.error_class, served.backend) == ("gw", "ProviderServerError", "healthy")
    assert "Provider returned error" in failed.error_message and failed.cost_usd == 0, failed


async def test_a_context_overflow_sent_as_a_stream_event_is_not_fallen_over(upstream, tmp_path):
    """vLLM streams a prompt longer than its model's context as an error event: the tier's other provider (the
    same model) is not asked, the breaker is not charged, and the client is told its prompt is too long."""
    cfg = two_providers(tmp_path, upstream, ("vllm-a", "event-ctx-vllm"), ("vllm-b", "json-body"))
    before = upstream.seen("json-body")
    eng = await Engine.open(cfg)
    try:
        with pytest.raises(ProviderContextLengthError) as err:
            async for _ in eng.stream(CHAT):
                pass
        breaker = eng.tiers["t"].backend.providers[0].breaker
        assert breaker.state == "closed" and breaker.snapshot()["consecutive_failures"] == 0
    finally:
        await eng.close()
    assert upstream.seen("json-body") == before
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"


async def test_a_rate_limit_event_after_the_first_chunk_is_no_breaker_failure(upstream, tmp_path):
    """A rate limit sent as an error event once a stream had begun ended the stream, as it must, but counted as a
    failure of the provider: under load (a tokens-per-minute limit hit by many streams) it opened the breaker of a
    healthy provider. It is neutral, as the same 429 before the first chunk is."""
    cfg = two_providers(tmp_path, upstream, ("rl", "event-rate-mid"), ("spare", "ok"),
                        breaker={"failure_threshold": 1, "cooldown_s": 30})
    eng = await Engine.open(cfg)
    try:
        events = [e async for e in eng.stream(CHAT)]
        assert isinstance(events[-1], StreamFailed) and isinstance(events[-1].error, RateLimitedError)
        assert eng.tiers["t"].backend.providers[0].breaker.state == "closed"
    finally:
        await eng.close()


@pytest.mark.parametrize(("model", "text"), [("surr-pair", "Hi \U0001f600 there"), ("surr-lone", "Hi \ufffd there"),
                                             ("surr-end", "Hi \ufffd")])
async def test_text_cut_by_utf16_units_is_whole_characters_in_the_answer_and_the_ledger(upstream, tmp_path, model,
                                                                                       text):
    """A proxy that cuts text by UTF-16 units sends half a character per chunk (or a half alone): JSON carries
    it, UTF-8 cannot. A split pair is joined, a lone half is U+FFFD, in the answer, its tokens and its ledger
    row, streamed or not. A streamed answer used to end with the connection dropped and no ledger row (its
    signature could not be encoded), an unstreamed one with a 500."""
    import sqlite3

    for res in (await generate(upstream, model), await stream(upstream, model)):
        chunks = res if isinstance(res, list) else [res]
        assert "".join(c.text for c in chunks) == text
        for c in chunks:
            c.text.encode("utf-8")
            for t in c.tokens:
                t.token.encode("utf-8")
    eng = await Engine.open(make_config(tmp_path, [remote("t", upstream, model)], ledger={
        "path": str(tmp_path / "ledger.sqlite"), "store_text": True}))
    try:
        out = await eng.run(CHAT, request_id="casc-whole")
        events = [e async for e in eng.stream(CHAT, request_id="casc-whole-stream")]
    finally:
        await eng.close()
    assert out.result.text == text and "".join(e.text for e in events if isinstance(e, StreamDelta)) == text
    assert isinstance(events[-1], StreamEnd)
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT r.status, a.text FROM requests r JOIN attempts a ON a.request_id = r.request_id "
                            "ORDER BY r.request_id").fetchall()
    assert rows == [("ok", text), ("ok", text)]


# --- 5. a reasoning model's thinking is not the answer's confidence --------------------------------------

@pytest.mark.parametrize("model,kept", [
    ("reasoning", [("4", -0.01), ("2", -0.02)]),                       # reasoning_content; "\n\n" its own token
    ("reasoning-new", [("\n\n4", -0.01), ("2", -0.02), ("\n", -0.5)]),  # reasoning; content stripped
    ("reasoning-cut", []),                                            # thinking only: no answer, no tokens
    ("reasoning-mismatch", THINK + [("43", -0.4)]),                   # no match: kept as they came
])
async def test_a_reasoning_models_thinking_is_left_out_of_the_answers_tokens(upstream, model, kept):
    res = await generate(upstream, model)
    assert [(t.token, t.logprob) for t in res.tokens] == kept


async def test_a_reasoning_models_streamed_thinking_is_left_out(upstream):
    chunks = await stream(upstream, "reasoning")
    assert "".join(c.text for c in chunks) == "42"
    assert [(t.token, t.logprob) for c in chunks for t in c.tokens] == [("4", -0.01), ("2", -0.02)]


# --- 6. out of credits is no rate limit -----------------------------------------------------------------

async def test_insufficient_quota_is_a_refused_credential(upstream):
    with pytest.raises(ProviderAuthError, match=r"out of quota .*\(HTTP 429 insufficient_quota\)") as err:
        await generate(upstream, "quota")
    assert err.value.fall_over and err.value.should_retry is False and err.value.upstream_status == 429
    with pytest.raises(ProviderAuthError):
        await stream(upstream, "quota")
    with pytest.raises(RateLimitedError) as rate:  # a rate limit stays one
        await generate(upstream, "rate")
    assert rate.value.retry_after == 20.0


async def test_payment_required_is_a_refused_credential(upstream):
    """A 402 (OpenRouter's account out of credits) fails every call until someone pays: a refused credential, as
    OpenAI's insufficient_quota is. It was a plain ProviderError: the breaker counted it as one failure among
    others, and every request called the exhausted provider again first."""
    with pytest.raises(ProviderAuthError, match=r"out of quota or credits \(HTTP 402\)") as err:
        await generate(upstream, "credits")
    assert err.value.fall_over and err.value.should_retry is False and err.value.upstream_status == 402
    with pytest.raises(ProviderAuthError):
        await stream(upstream, "credits")
    with pytest.raises(ProviderAuthError):  # told in a stream's error event
        await stream(upstream, "event-credits")
    with pytest.raises(RateLimitedError) as rate:  # with a wait (OpenRouter's in-flight budget): it passes
        await generate(upstream, "credits-inflight")
    assert rate.value.retry_after == 3.0 and rate.value.upstream_status == 402


@pytest.mark.parametrize("model", ["quota", "credits"])
async def test_an_account_out_of_quota_is_not_called_again(upstream, tmp_path, model):
    """The breaker is forced open, as for a rejected key: the tier falls over to its next provider, and the
    next requests skip the exhausted one (a 429 was retried on every request, max_attempts times)."""
    cfg = two_providers(tmp_path, upstream, ("openai", model), ("backup", "ok"),
                        retry={"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.02})
    before = upstream.seen(model)
    eng = await Engine.open(cfg)
    try:
        recs = [(await eng.run(CHAT)).record for _ in range(3)]
    finally:
        await eng.close()
    assert all(r.status == "ok" and r.attempts[-1].backend == "backup" for r in recs)
    assert upstream.seen(model) - before == 1
    assert recs[0].attempts[0].error_class == "ProviderAuthError"


# --- 7. a provider that refuses the logprobs parameters --------------------------------------------------

@pytest.mark.parametrize("request_", [CHAT, RAW], ids=["chat", "completions"])
async def test_logprobs_false_sends_neither_parameter(upstream, request_):
    asked = GenerationRequest(messages=request_.messages, prompt=request_.prompt, max_tokens=8, top_logprobs=5)
    with pytest.raises(ProviderInvalidRequestError, match="Unsupported parameter"):  # as it is without the option
        await generate(upstream, "no-logprobs-param", asked)
    n = len(upstream.requests)
    res = await generate(upstream, "no-logprobs-param", asked, logprobs=False)
    assert res.text == TEXT and res.tokens == ()  # the logprobs it sent anyway are not read: no confidence
    chunks = await stream(upstream, "no-logprobs-param", asked, logprobs=False)
    assert "".join(c.text for c in chunks) == TEXT and not any(c.tokens for c in chunks)
    sent = [r["body"] for r in upstream.requests[n:]]
    assert len(sent) == 2 and not any({"logprobs", "top_logprobs"} & set(b) for b in sent)


async def test_logprobs_false_from_a_tiers_options(upstream, tmp_path):
    cfg = make_config(tmp_path, [remote("small", upstream, "ok"),
                                 remote("groq", upstream, "no-logprobs-param", options={"logprobs": False})])
    eng = await Engine.open(cfg)
    try:
        rec = (await eng.run(CHAT, model="groq")).record
    finally:
        await eng.close()
    assert rec.status == "ok" and rec.tier == "groq"
    with pytest.raises(ConfigError, match="options.logprobs must be true or false"):
        OpenAIBackend(model="m", base_url=upstream.base_url, logprobs="no")


async def test_an_openai_reasoning_model_is_sent_what_it_takes(upstream, tmp_path):
    """OpenAI's reasoning models (o-series, gpt-5) refuse max_tokens (max_completion_tokens instead), a temperature
    or top_p but their default, logprobs, and (o3, o4-mini) stop: every call was a 400, whatever logprobs: false
    left out. ``reasoning: true`` sends what they take; the stop sequences are applied here."""
    asked = GenerationRequest(messages=CHAT.messages, max_tokens=16, top_logprobs=2, temperature=0.0,
                              stop=(" is",))
    for opts in ({}, {"logprobs": False}):
        with pytest.raises(ProviderInvalidRequestError, match="Unsupported"):
            await generate(upstream, "o-series", asked, **opts)
    n = len(upstream.requests)
    res = await generate(upstream, "o-series", asked, reasoning=True)
    assert (res.text, res.finish_reason, res.tokens) == ("The answer", "stop", ())
    chunks = await stream(upstream, "o-series", asked, reasoning=True)
    assert "".join(c.text for c in chunks) == "The answer" and chunks[-1].finish_reason == "stop"
    assert not any(c.tokens for c in chunks)
    for body in (r["body"] for r in upstream.requests[n:]):
        assert body["max_completion_tokens"] == 16
        assert not {"max_tokens", "temperature", "top_p", "logprobs", "top_logprobs", "stop"} & set(body)
    with pytest.raises(ConfigError, match="a reasoning model gives no token logprobs"):
        OpenAIBackend(model="o3", base_url=upstream.base_url, reasoning=True, logprobs=True)
    with pytest.raises(ConfigError, match="options.reasoning must be true or false"):
        OpenAIBackend(model="o3", base_url=upstream.base_url, reasoning="yes")
    o3 = remote("o3", upstream, "o-series", options={"reasoning": True})
    with pytest.raises(ConfigError, match=r"tier\(s\) \[.o3.\] have options.logprobs: false or reasoning: true"):
        make_config(tmp_path, [o3, remote("big", upstream, "ok")])
    eng = await Engine.open(make_config(tmp_path, [remote("small", upstream, "ok"), o3]))
    try:
        rec = (await eng.run(asked, model="o3")).record
    finally:
        await eng.close()
    assert rec.status == "ok" and rec.tier == "o3"


def test_a_tier_without_logprobs_can_only_be_last(tmp_path, upstream):
    no_lp = remote("groq", upstream, "no-logprobs-param", options={"logprobs": False})
    with pytest.raises(ConfigError, match=r"policies.cascade.chain: tier\(s\) \[.groq.\] have options.logprobs: false"):
        make_config(tmp_path, [no_lp, remote("big", upstream, "ok")])
    prov = {"name": "t", "providers": [{"name": "p", "backend": "openai", "model": "m",
                                        "options": {"base_url": upstream.base_url, "logprobs": False}}]}
    with pytest.raises(ConfigError, match="logprobs: false"):
        make_config(tmp_path, [prov, remote("big", upstream, "ok")])
    make_config(tmp_path, [remote("big", upstream, "ok"), no_lp])  # last: fine


@pytest.mark.parametrize("request_", [CHAT, RAW], ids=["chat", "completions"])
async def test_top_logprobs_are_most_likely_first_whatever_order_the_server_sends(upstream, request_):
    """vLLM's server lists a sampled token first among its top_logprobs, ahead of likelier ones (a list on chat, a
    dict on legacy completions): they are passed on most likely first, as OpenAI sends them."""
    res = await generate(upstream, "vllm-sampled-first", request_)
    (tok,) = res.tokens
    assert [(a.token, a.logprob) for a in tok.top] == [("alt", -0.3), ("mid", -0.9), (" 4", -1.2)]


# --- 8. stop sequences an upstream does not apply --------------------------------------------------------

def assert_joins(tokens, text: str) -> None:
    assert "".join(t.token for t in tokens) == text and b"".join(t.utf8 for t in tokens) == text.encode()


#: within a token, at a token's start, across three chunks (" answer", " is", " 4"), the answer's last token
@pytest.mark.parametrize("stop", [" is", "nswer", "r is 4", "2"])
@pytest.mark.parametrize(("model", "request_"), [("ok", CHAT), ("llama-cmpl", RAW), ("stop-openai", CHAT)],
                         ids=["ignored", "ignored-completions", "applied"])
async def test_an_answer_ends_before_its_stop_sequence_whether_the_upstream_applies_it_or_not(upstream, model,
                                                                                              request_, stop):
    """OpenAI's answer holds no stop sequence; a server that ignores ``stop`` ("ok", "llama-cmpl" here; some
    OpenAI-compatible servers do) answered past it, and the answer came back whole, with finish_reason "stop"
    whatever it held. The answer ends before the earliest stop sequence, its tokens cut to it; a stream sends
    no text past it, also when it is split across chunks, and its tokens are the whole answer's."""
    want = TEXT[:TEXT.find(stop)]
    req = request_.with_(stop=("zzz", stop))
    res = await generate(upstream, model, req)
    assert (res.text, res.finish_reason) == (want, "stop")
    assert_joins(res.tokens, want)
    assert [t.logprob for t in res.tokens] == [lp for _, lp in TOKS[:len(res.tokens)]]
    chunks = await stream(upstream, model, req)
    assert "".join(c.text for c in chunks) == want and chunks[-1].finish_reason == "stop"
    streamed = [t for c in chunks for t in c.tokens]
    assert [(t.token, t.utf8, t.logprob) for t in streamed] == [(t.token, t.utf8, t.logprob) for t in res.tokens]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(res.tokens)
    assert upstream.requests[-1]["body"]["stop"] == ["zzz", stop]


@pytest.mark.parametrize("stop", ["42!", "4x", "answer was"])
async def test_streamed_text_that_only_begins_a_stop_sequence_goes_out(upstream, stop):
    """Text that may begin a stop sequence waits for the next chunk (" 4" while "4x" may follow); once the stop
    is ruled out, or the answer ends, it goes out: the answer is the whole one, the upstream's usage kept."""
    chunks = await stream(upstream, "ok", CHAT.with_(stop=(stop,)))
    assert "".join(c.text for c in chunks) == TEXT and chunks[-1].finish_reason == "stop"
    assert [(t.token, t.logprob) for c in chunks for t in c.tokens] == TOKS
    assert chunks[-1].usage.completion_tokens == 5


async def test_more_stop_sequences_than_openai_takes_are_applied_here(upstream, tmp_path):
    """OpenAI takes at most 4 stop sequences and refuses more with a 400: a Python API request with 5 (the HTTP
    layer takes 4, as OpenAI) was refused by a remote tier, where a local one answers it. The first 4 are sent,
    the rest applied here, streamed or not."""
    stops = ("zzz", "yyy", "xxx", "www", " is")
    n = len(upstream.requests)
    eng = await Engine.open(make_config(tmp_path, [remote("t", upstream, "stop-openai")]))
    try:
        out = await eng.run(CHAT.with_(stop=stops))
        events = [e async for e in eng.stream(CHAT.with_(stop=stops))]
    finally:
        await eng.close()
    assert out.record.status == "ok" and (out.result.text, out.result.finish_reason) == ("The answer", "stop")
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == "The answer"
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "stop"
    assert events[-1].record.status == "ok"
    assert [r["body"]["stop"] for r in upstream.requests[n:]] == [list(stops[:4])] * 2


# --- 9. an upstream that ignores max_tokens ---------------------------------------------------------------

@pytest.mark.parametrize(("model", "request_"), [("ok", CHAT), ("llama-cmpl", RAW), ("null-lp", RAW)],
                         ids=["chat", "llama-completions", "legacy-completions"])
async def test_an_answer_past_max_tokens_is_cut_at_the_bound(upstream, model, request_):
    """Every scenario here answers whole whatever max_tokens says (a proxy that drops it, a llama.cpp server
    whose own n_predict wins). The answer was passed on at full length as a "stop"; now it is cut at max_tokens,
    as the upstream should have cut it, with finish_reason "length"; the usage stays what the upstream billed."""
    asked = request_.with_(max_tokens=3)
    res = await generate(upstream, model, asked)
    assert (res.text, res.finish_reason) == ("The answer is", "length")
    assert [t.token for t in res.tokens] == ["The", " answer", " is"]
    assert res.usage.completion_tokens == 5  # as billed
    if model != "null-lp":  # (the legacy-completions stream is vLLM's: cmpl_stream, not this scenario's)
        chunks = await stream(upstream, model, asked)
        assert "".join(c.text for c in chunks) == "The answer is" and chunks[-1].finish_reason == "length"
        assert [t.token for c in chunks for t in c.tokens] == ["The", " answer", " is"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 3
    full = await generate(upstream, model, request_)  # within the bound: as it came
    assert (full.text, full.finish_reason, len(full.tokens)) == (TEXT, "stop", 5)


async def test_a_stop_sequence_within_max_tokens_ends_the_answer_as_a_stop(upstream):
    """An upstream that ignores both: the answer is cut at max_tokens (3 tokens, "The answer is") and, within
    them, before the stop sequence (" answer"), which ends it first: finish_reason "stop", as OpenAI's, not the
    bound's "length"."""
    asked = CHAT.with_(max_tokens=3, stop=(" answer",))
    res = await generate(upstream, "ok", asked)
    assert (res.text, res.finish_reason, [t.token for t in res.tokens]) == ("The", "stop", ["The"])
    chunks = await stream(upstream, "ok", asked)
    assert "".join(c.text for c in chunks) == "The" and chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(("n", "text"), [(1, "Hi"), (2, "Hi "), (3, "Hi 你")])
async def test_an_answer_cut_at_max_tokens_keeps_the_whole_characters(upstream, n, text):
    """A bound that falls inside a character (its token holds part of its bytes) keeps the whole characters
    before it, whole or streamed; the tokens' bytes join to the text."""
    asked = CHAT.with_(max_tokens=n)
    for chunks in ([await generate(upstream, "cjk", asked)], await stream(upstream, "cjk", asked)):
        assert "".join(c.text for c in chunks) == text and chunks[-1].finish_reason == "length"
        toks = [t for c in chunks for t in c.tokens]
        assert b"".join(t.utf8 for t in toks) == text.encode()


async def test_a_reasoning_models_thinking_counts_against_max_tokens(upstream):
    """vLLM counts the thinking's tokens against max_tokens: 6 of thinking and a bound of 7 leave the answer one."""
    res = await generate(upstream, "reasoning", CHAT.with_(max_tokens=7))
    assert (res.text, res.finish_reason, [t.token for t in res.tokens]) == ("4", "length", ["4"])
    res = await generate(upstream, "reasoning", CHAT.with_(max_tokens=4))
    assert (res.text, res.finish_reason, res.tokens) == ("", "length", ())
    chunks = await stream(upstream, "reasoning", CHAT.with_(max_tokens=4))  # 3 tokens of thinking, then "4"
    assert "".join(c.text for c in chunks) == "4" and chunks[-1].finish_reason == "length"


async def test_an_answer_past_max_tokens_is_cut_in_the_ledger(upstream, tmp_path):
    """Through the engine: the client gets the cut answer, the ledger row its text and what the upstream billed."""
    import sqlite3

    eng = await Engine.open(make_config(tmp_path, [remote("t", upstream, "ok")], ledger={
        "path": str(tmp_path / "ledger.sqlite"), "store_text": True}))
    try:
        out = await eng.run(CHAT.with_(max_tokens=2))
        events = [e async for e in eng.stream(CHAT.with_(max_tokens=2))]
    finally:
        await eng.close()
    assert (out.result.text, out.result.finish_reason) == ("The answer", "length")
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == "The answer"
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "length"
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT a.text, a.completion_tokens FROM attempts a JOIN requests r "
                            "ON a.request_id = r.request_id ORDER BY r.created_at").fetchall()
    assert [r[0] for r in rows] == ["The answer", "The answer"] and rows[0][1] == 5


# --- 10. a provider that refuses stream_options -----------------------------------------------------------

async def test_a_provider_that_refuses_stream_options_is_a_configuration_fault(upstream, tmp_path):
    """Mistral's API refuses ``stream_options`` with a 422. Every streamed request to such a tier was refused as the
    client's invalid request (400, never fallen over), whatever it asked. Now the refusal is the configuration's
    fault (fallen over, the fix named), and ``options.stream_usage: false`` leaves the parameter out."""
    with pytest.raises(ProviderError, match="set the tier's options.stream_usage: false") as err:
        await stream(upstream, "mistral")
    assert type(err.value) is ProviderMisconfiguredError and err.value.fall_over and err.value.upstream_status == 422
    n = len(upstream.requests)
    chunks = await stream(upstream, "mistral", stream_usage=False)
    assert "".join(c.text for c in chunks) == TEXT and chunks[-1].finish_reason == "stop"
    assert "stream_options" not in upstream.requests[n]["body"]
    assert (await generate(upstream, "mistral", stream_usage=False)).text == TEXT  # (a whole answer: unchanged)
    cfg = two_providers(tmp_path, upstream, ("mistral", "mistral"), ("healthy", "ok"))
    events = await engine_stream(cfg)
    assert "".join(e.text for e in events if isinstance(e, StreamDelta)) == TEXT
    assert [(a.backend, a.error_class) for a in events[-1].record.attempts] == [
        ("mistral", "ProviderMisconfiguredError"), ("healthy", None)]
    cfg = make_config(tmp_path, [remote("t", upstream, "mistral", options={"stream_usage": False})])
    events = await engine_stream(cfg)
    assert isinstance(events[-1], StreamEnd) and events[-1].usage.completion_tokens > 0  # estimated
    with pytest.raises(ConfigError, match="stream_usage must be true or false"):
        OpenAIBackend(model="m", base_url=upstream.base_url, stream_usage="no")
