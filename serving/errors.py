"""The one place where errors become HTTP responses (OpenAI-style bodies, never a stack trace)."""

from __future__ import annotations

import json
import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cascade.errors import CascadeError, ClientDisconnected, InvalidRequestError, ProviderError

log = logging.getLogger("cascade.serving")


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


#: the longest wait an upstream provider's Retry-After may ask of our client: the hint is about our key at
#: that provider (the engine itself waits at most ``retry.max_retry_after_s`` for it, then falls over)
MAX_FORWARDED_RETRY_AFTER_S = 60


def retry_after_header(exc: CascadeError) -> str | None:
    """The ``Retry-After`` of an error response, in whole seconds: every 429 and 503 has one (1 s when nobody
    said), but one that retrying cannot help; a provider's hint is capped at :data:`MAX_FORWARDED_RETRY_AFTER_S`;
    our own (a daily limit's reset) is given as it is."""
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None or not retry_after == retry_after:  # None or NaN
        # a refusal that waiting cannot mend (x-should-retry: false) names no time to come back
        return "1" if exc.status_code in (429, 503) and exc.should_retry is not False else None
    if isinstance(exc, ProviderError):
        retry_after = min(retry_after, MAX_FORWARDED_RETRY_AFTER_S)
    return str(max(1, math.ceil(retry_after)))


def error_response(exc: CascadeError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in getattr(exc, "headers", ())}
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return JSONResponse(error_body(exc.message, exc.error_type, param=exc.param, code=exc.code),
                        status_code=exc.status_code, headers=headers)


#: pydantic's own wording of some error types (a Python dictionary, a model class's name), said as JSON says it
_PLAIN_MESSAGES = {"missing": "missing required parameter", "extra_forbidden": "unknown parameter",
                   "model_type": "Input should be an object", "model_attributes_type": "Input should be an object",
                   "dict_type": "Input should be an object"}


def _branch(part: object) -> bool:
    """Whether a part of an error's location is pydantic's label of a union's branch ("str", "list[TextPart]")."""
    return isinstance(part, str) and (any(c in part for c in "[]") or part in ("str", "int", "float", "bool"))


def first_error(errors: list) -> tuple[str, str, int]:
    """The first of pydantic's ``errors`` as a client reads it: (its location, dotted, without union-branch
    labels; its message; how many other problems there are). Of a value that no branch of its union took, the
    branch that got furthest is said (a text part without its text, not "content: Input should be a valid
    string"), or, where none got past the value itself, what each branch expects ("a valid string or a valid
    list")."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    cut = next((i for i, p in enumerate(loc) if _branch(p)), None)
    others = len(errors) - 1
    msg = first.get("msg", "invalid value")
    if cut is not None:
        branches = [e for e in errors if len(e.get("loc", ())) > cut and tuple(e["loc"][:cut]) == loc[:cut]
                    and _branch(e["loc"][cut])]
        first = max(branches, key=lambda e: len(e["loc"]))  # (the first of the furthest)
        loc = tuple(first["loc"])
        # the other problems: outside this union, and the chosen branch's others
        others = len(errors) - len(branches) + sum(e["loc"][cut] == loc[cut] for e in branches) - 1
        msg = first.get("msg", "invalid value")
        if len(loc) == cut + 1:  # no branch took the value: what each expects
            said = [_PLAIN_MESSAGES.get(e["type"], e.get("msg", "")) for e in branches]
            msg = said[0] + "".join(" or " + m.removeprefix("Input should be ") for m in said[1:] if m != said[0])
            others = len(errors) - len(branches)
    msg = _PLAIN_MESSAGES.get(first.get("type"), msg)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = ".".join(str(p) for p in loc if p != "body" and not _branch(p))
    return where, msg, others


def json_type(value: object) -> str:
    """What a parsed JSON value is, in JSON's words ("an object", "null"; not Python's "dict", "NoneType")."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), (dict, "an object"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _validation_message(exc: RequestValidationError, content_type: str = "application/json") -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            return (f"the request body must be JSON sent with content-type: application/json "
                    f"(got {content_type or 'no content-type'})"), None
        return "the request body must be a JSON object", None
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):  # no body at all
        return "the request body is empty: send a JSON object with content-type: application/json", None
    where, msg, others = first_error(errors)
    param = where or None
    if param is None and (named := re.match(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ", msg)):  # a body check naming one
        param = named.group(1)
        msg = msg[named.end():]
    more = f" (and {others} more)" if others else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


#: FastAPI's detail for a body it could not parse (as JSON, or as text at all)
_FASTAPI_UNPARSED = "There was an error parsing the body"


def _unreadable_body(cause: BaseException | None) -> str:
    """Why a request's body could not be read, in one line."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start}): send JSON in UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to read"
    if isinstance(cause, ValueError) and "int_max_str_digits" in str(cause):  # Python's own advice is not ours
        return "the request body could not be read as JSON: a number in it has too many digits"
    detail = f": {cause}" if isinstance(cause, ValueError) and str(cause) else ""
    return f"the request body could not be read as JSON{detail}"


def cascade_error_response(exc: CascadeError) -> JSONResponse:
    """The response to a ``CascadeError`` (logged when it is the server's fault)."""
    if exc.status_code >= 500:
        log.warning("request failed: %s: %s", type(exc).__name__, exc.message)
    return error_response(exc)


#: path -> endpoint of the completion routes, whose refused requests are recorded in the ledger
COMPLETION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CascadeError)
    async def _cascade_error(request: Request, exc: CascadeError) -> JSONResponse:
        return cascade_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc, request.headers.get("content-type", ""))
        endpoint = COMPLETION_PATHS.get(request.url.path)
        if endpoint is not None:  # a malformed completion request is in the ledger too
            from serving.protocol import attribution_of
            from serving.routes import record_refusal

            body = getattr(exc, "body", None)
            model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
            if isinstance(body, dict) and body.get("model") is None:  # (none named: the default policy's)
                model = request.app.state.engine.config.default_policy_name
            await record_refusal(request, InvalidRequestError(msg, param=param), model, endpoint,
                                 attribution_of(body))
        return JSONResponse(error_body(msg, "invalid_request_error", param=param, code="invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        endpoint = COMPLETION_PATHS.get(request.url.path)
        status = exc.status_code
        if status == 400 and message == _FASTAPI_UNPARSED and isinstance(exc.__cause__, ClientDisconnect):
            # the client closed its connection before its body arrived whole (a dropped upload): it sent nothing
            # wrong, and nobody reads an answer; a completion's row says it left, as at any later point
            if endpoint is not None:
                from serving.routes import record_refusal

                await record_refusal(request, ClientDisconnected("the client disconnected before its request "
                                                                 "arrived whole"), None, endpoint, {},
                                     status="cancelled")
            return Response(status_code=ClientDisconnected.status_code)
        if status == 400 and message == _FASTAPI_UNPARSED:
            # a body that is not UTF-8, JSON nested past the parser's depth, a number too long to read: said as
            # what it is (on every route), and, for a completion, recorded like any refusal
            message, code = _unreadable_body(exc.__cause__), "invalid_request"
            encoding = request.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):  # compressed: the parser's complaint would be
                # about bytes the client never wrote
                message = (f"the request body is compressed (content-encoding: {encoding[:40]}), which this server "
                           "does not read: send the JSON uncompressed")
                status, code = 415, "unsupported_content_encoding"
            if endpoint is not None:
                from serving.routes import record_refusal

                await record_refusal(request, InvalidRequestError(message), None, endpoint, {})
        return JSONResponse(error_body(message, "invalid_request_error", code=code),
                            status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.observe_error("InternalError")
        # (outside the middleware that names the request: named here, so the log line can be found)
        rid = request.scope.get("state", {}).get("request_id")
        return JSONResponse(error_body("internal server error", "server_error", code="internal_error"),
                            status_code=500, headers={"x-request-id": rid} if rid else None)


def json_error_bytes(exc: CascadeError) -> bytes:
    return json.dumps(error_body(exc.message, exc.error_type, param=exc.param, code=exc.code)).encode()
