"""The one error tree of cascade-engine.

Every failure the engine can report derives from :class:`CascadeError`. Library errors (openai, torch,
sqlite, yaml) are translated where they enter the engine (``raise ConfigError(...) from exc``), and the
tree is mapped to HTTP exactly once, in ``serving/errors.py``. Each class carries the HTTP status and the
OpenAI-style ``type``/``code`` it maps to, so the edge has no table of its own to keep in sync.
"""

from __future__ import annotations

import re

from cascade.types import paired_surrogates

#: a line break and the indentation around it
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


class CascadeError(Exception):
    """Base of every error raised by cascade-engine."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    #: May another provider or tier be tried after this error?
    fall_over: bool = False
    #: May the client usefully repeat the request soon? False is sent as ``x-should-retry: false`` (which the
    #: openai SDKs obey); None leaves it to the status (SDKs retry 408, 409, 429 and 5xx)
    should_retry: bool | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        # one line, whatever a library's text held (libpq's "...refused\n\tIs the server running...")
        # an upstream's text may hold lone surrogates, which UTF-8 (logs, the ledger) cannot carry
        message = paired_surrogates(_LINE_BREAKS.sub(" ", message))
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # one line, for the CLI and logs
        return self.message


class InternalError(CascadeError):
    """A fault of this server's own (a bug), not of the request, a provider or the configuration: 500, the
    detail in the server's log only."""

    code = "internal_error"


# --- configuration and set-up ---------------------------------------------------------------------


class ConfigError(CascadeError):
    """The configuration file or an override is invalid. Names the bad key."""

    error_type = "config_error"
    code = "invalid_config"
    should_retry = False  # (a tier that cannot load, met by a request) until an operator fixes the file


class ReloadRefusedError(CascadeError):
    """A live reload could not apply the config file (bad YAML, a missing artifact, an invalid value):
    nothing was changed, the running configuration stays."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "reload_refused"


class ModelNotPreparedError(CascadeError):
    """A model's local weights are missing; run `cascade models prepare`."""

    status_code = 503
    error_type = "model_not_ready"
    code = "model_not_prepared"
    should_retry = False  # until an operator prepares it: a client's retry a second later meets the same


class BackendUnavailableError(CascadeError):
    """A backend's library is not installed (e.g. vllm, transformers)."""

    status_code = 503
    error_type = "backend_unavailable"
    code = "backend_unavailable"
    should_retry = False  # until an operator installs it


# --- the client's request -------------------------------------------------------------------------


class InvalidRequestError(CascadeError):
    """The request is malformed or asks for something we cannot do. Never retried."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLargeError(InvalidRequestError):
    """The request's body is over the server's ``server.max_body_bytes``."""

    status_code = 413
    code = "request_too_large"


class RequestHeadersTooLargeError(InvalidRequestError):
    """The request's target and headers together are over the server's ``server.max_header_bytes``."""

    status_code = 431
    code = "request_header_fields_too_large"


class RequestTimeoutError(InvalidRequestError):
    """The request's body did not arrive whole within ``server.request_read_timeout_s``."""

    status_code = 408
    code = "request_timeout"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit a tier's context window."""

    code = "context_length_exceeded"


class UnknownModelError(InvalidRequestError):
    """The requested model names neither a policy nor a tier."""

    status_code = 404
    code = "model_not_found"


class AuthenticationError(CascadeError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(CascadeError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFoundError(CascadeError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class BudgetExceededError(CascadeError):
    """A per-request or per-key cost budget refuses the request."""

    status_code = 402
    error_type = "budget_exceeded"
    code = "budget_exceeded"


# --- providers (backends) -------------------------------------------------------------------------


class ProviderError(CascadeError):
    """A backend failed to produce an answer. Subclasses say whether falling over may help."""

    status_code = 502
    error_type = "provider_error"
    fall_over = True

    def __init__(self, message: str, *, provider: str | None = None, status: int | None = None,
                 retry_after: float | None = None, code: str | None = None, answered: bool = False) -> None:
        super().__init__(message, code=code)
        self.provider = provider
        self.upstream_status = status
        self.retry_after = retry_after
        #: the provider answered (a 200 this backend could not read, a body cut off mid-way): it billed the
        #: call, so the call's prompt is billed as for a timeout (its answer's length is not known)
        self.answered = answered


class ProviderInvalidRequestError(ProviderError):
    """The provider rejected the request as invalid (400/413/422): the client's fault, not retried. (A 404,
    a model or route the provider lacks, is the configuration's: ``ProviderMisconfiguredError``, fallen over.)"""

    status_code = 400
    error_type = "invalid_request_error"
    fall_over = False


class ProviderContextLengthError(ProviderInvalidRequestError):
    """The provider says the prompt is too long: escalate to a tier with a larger context."""

    code = "context_length_exceeded"


class ProviderMisconfiguredError(ProviderError):
    """The provider refuses what the tier's configuration sends, not what the client asked: a model or route it
    does not have (404), a parameter it does not take (``stream_options``). Another provider or tier may answer;
    with none left, the client's retries meet the same refusal until an operator fixes the tier."""

    code = "provider_misconfigured"
    should_retry = False


class ProviderAuthError(ProviderError):
    """401/403 from a provider: our credentials are wrong. Fall over, mark unhealthy."""

    error_type = "provider_auth_error"
    should_retry = False  # until an operator fixes the key


class RateLimitedError(ProviderError):
    """429 from a provider. Back off (honouring retry_after), then fall over."""

    status_code = 429
    error_type = "rate_limit_error"


class ProviderServerError(ProviderError):
    """5xx from a provider, or it is overloaded."""

    status_code = 502


class ProviderTimeoutError(ProviderError):
    status_code = 504
    error_type = "timeout"


class ProviderConnectionError(ProviderError):
    """Connection refused or reset."""

    status_code = 502
    error_type = "connection_error"


class CircuitOpenError(ProviderError):
    """Every provider of a tier has an open circuit breaker: fail fast."""

    status_code = 503
    error_type = "service_unavailable"


class ClientDisconnected(CascadeError):
    status_code = 499
    error_type = "client_closed_request"


class RequestLimitError(CascadeError):
    """A key's request limit (its user tier's ``requests_per_minute`` or ``max_concurrent_requests``) is
    reached: 429 with ``Retry-After`` (and, for the rate, OpenAI's ``x-ratelimit-*-requests`` headers)."""

    status_code = 429
    error_type = "requests"  # OpenAI's type for a requests-per-minute limit
    code = "rate_limit_exceeded"
    retry_after: float | None = None
    #: response headers that go with the refusal (the rate limit's state)
    headers: tuple[tuple[bytes, bytes], ...] = ()


class ServerOverloadedError(CascadeError):
    """The server is at ``server.max_concurrent_requests``: shed the request at once, with ``Retry-After``,
    rather than queue it behind work that would make it time out anyway."""

    status_code = 503
    error_type = "service_unavailable"
    code = "server_overloaded"
    retry_after: float | None = None


class ServerShutdown(CascadeError):
    """The server stopped before the request finished: it was still running when a graceful shutdown's
    ``server.graceful_shutdown_s`` ran out. Nothing is wrong with the request: repeat it (another instance
    answers it; this one is going away)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "server_shutdown"
    should_retry = True


class EngineClosedError(ServerShutdown):
    """The engine was closed (``Engine.close()``): it takes no request; one still running when the close's grace
    ran out was cancelled, and its ledger row carries this class."""

    code = "engine_closed"


class EngineLoopError(CascadeError):
    """An engine was used from an event loop other than the one that opened it. Its ledger thread, its backends'
    workers and connections belong to that loop: open one engine per loop (one ``asyncio.run`` for the engine's
    whole life, or ``Engine.open`` inside each)."""

    code = "wrong_event_loop"


class LedgerError(CascadeError):
    error_type = "ledger_error"


class LedgerTimeoutError(LedgerError):
    """The ledger did not answer within ``ledger.timeout_s`` (a hung database, a lock held elsewhere). A write
    that timed out stays queued: it may still be committed, or fail, later (``Ledger.late_listeners``)."""


class LedgerWriteHeldError(LedgerTimeoutError):
    """A write failed through no fault of its record (the disk is full; the SQLite file is read-only or not at its
    path any more, an I/O error; the PostgreSQL server is read-only): its waiter is told at once rather than after
    ``ledger.timeout_s``. As a write that timed out, it stays queued: tried again until it commits (recorded then
    as this failure) or the ledger closes."""


class LedgerUnavailableError(LedgerError):
    """The ledger cannot be written now (its database unreachable, read-only, locked, not answering): the
    request is refused before any tier runs, since its answer could not be accounted (and so would not be
    let out) while a hosted tier would be paid for it. Repeat it shortly, or on another replica."""

    status_code = 503
    code = "ledger_unavailable"
    should_retry = True

    @classmethod
    def of(cls, exc: LedgerError, message: str) -> "LedgerUnavailableError":
        """A ledger call that failed with ``exc`` (the database unreachable, not answering, a write held) as a
        refusal to repeat shortly: ``exc`` itself where it is one already, else one saying ``message``."""
        return exc if isinstance(exc, cls) else cls(message)


class DataError(CascadeError):
    """An input data file (calibration set, ledger export) is malformed, empty or lacks a field."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_data"
