"""Configuration: one YAML file, validated at load, plus environment overrides.

The file is an external input, so it is validated like a wire format (pydantic, unknown keys refused);
errors name the bad key (``tiers.1.price.input_per_1m: Input should be a valid number``). The validated
objects are frozen and passed explicitly: there is no module-level configuration state.

Environment overrides (applied after the file):

==========================  ================================
``CASCADE_CONFIG``          config file used when none is given
``CASCADE_HOST``            server.host
``CASCADE_PORT``            server.port
``CASCADE_LEDGER_PATH``     ledger.path
``CASCADE_MODEL_CACHE``     models.cache_dir
==========================  ================================
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from cascade.errors import ConfigError
from cascade.paths import LEDGER_URL_SCHEMES, expand_path, ledger_url_problem

ENV_CONFIG = "CASCADE_CONFIG"
#: the largest config file read (a config is a few KiB; anything near this is not one)
MAX_CONFIG_BYTES = 16 * 1024 * 1024
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "CASCADE_HOST": ("server", "host"),
    "CASCADE_PORT": ("server", "port"),
    "CASCADE_LEDGER_PATH": ("ledger", "path"),
    "CASCADE_MODEL_CACHE": ("models", "cache_dir"),
}


def _unit_thresholds(v: dict[str, float]) -> dict[str, float]:
    for k, t in v.items():
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold for {k!r} must be within [0, 1], got {t}")
    return v


#: per-tier thresholds, each a probability
Thresholds = Annotated[dict[str, float], AfterValidator(_unit_thresholds)]


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    if "\x00" in v:  # no path, host or name holds one (the OS refuses it, as a traceback)
        raise ValueError("must not contain a NUL character")
    return v


#: a model name, a path: something, not whitespace
NonBlank = Annotated[str, AfterValidator(_not_blank)]


def _holds(annotation: Any, kinds: tuple[Any, ...]) -> bool:
    """Whether a field of this type holds one of ``kinds`` (itself, or in a union or container type)."""
    return annotation in kinds or any(_holds(a, kinds) for a in get_args(annotation))


def _bool_in(value: Any) -> tuple[str, bool] | None:
    """The first boolean in the value or among its items (a mapping's values, a list's elements): where it is
    ("" for the value itself, else the key or index path) and what it is; None if there is none."""
    if isinstance(value, bool):
        return "", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _bool_in(v)
        if found is not None:
            return ".".join(p for p in (str(k), found[0]) if p), found[1]
    return None


class _Strict(BaseModel):
    # every number of the config is finite: an infinite price or budget would reach the ledger's costs
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean where a number belongs is refused (pydantic would read ``threshold: true`` as 1.0, a tier
        that never keeps an answer), as the HTTP API refuses one: a field's own value, or an item of a mapping
        or list of numbers (``thresholds: {small: true}``, ``escalation_rate: [false, true]``)."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name is not None else Any
        numeric = _holds(annotation, (int, float)) and not _holds(annotation, (bool, Any))
        found = _bool_in(value) if numeric else None
        if found is not None:
            where, what = found
            raise ValueError(f"{where + ': ' if where else ''}must be a number, not a boolean ({str(what).lower()})")
        # and a string where a boolean belongs (pydantic would read `required: "false"`, or "no", as False)
        if isinstance(value, str) and (annotation is bool or set(get_args(annotation)) == {bool, type(None)}):
            raise ValueError(f"must be true or false (unquoted), not the string {value!r}")
        return value


class Price(_Strict):
    """USD per one million tokens. Local tiers carry an amortised price (hardware time per token)."""

    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)
    #: prompt tokens the provider read from its prompt cache (OpenAI's ``usage.prompt_tokens_details.
    #: cached_tokens``), billed at this price instead; unset: at ``input_per_1m``
    cached_input_per_1m: float | None = Field(None, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for a call's tokens, ``cached_tokens`` of the prompt's at the cached-input price (when set)."""
        cached = min(max(cached_tokens, 0), prompt_tokens) if self.cached_input_per_1m is not None else 0
        return ((prompt_tokens - cached) * self.input_per_1m + cached * (self.cached_input_per_1m or 0.0)
                + completion_tokens * self.output_per_1m) / 1e6


class CalibratorConfig(_Strict):
    """Either an inline calibrator or a path to a fitted artifact (JSON written by `cascade calibrate`)."""

    method: str = "temperature"
    feature: str = "mean_logprob"
    #: the method's parameters, all of them (an unknown or missing one is an error); a calibrator that names
    #: neither a method nor params (none at all, or only its feature) is the identity (temperature 1)
    params: dict[str, float] = Field(default_factory=dict)
    artifact: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _identity_default(cls, data: Any) -> Any:
        # `{method: temperature}` alone is refused with the rest: it names a method and forgets its parameter
        if isinstance(data, dict) and not {"method", "params"} & data.keys() and data.get("artifact") is None:
            data = {**data, "params": {"temperature": 1.0}}
        return data

    @model_validator(mode="after")
    def _artifact_alone(self) -> "CalibratorConfig":
        given = sorted(k for k in ("method", "params") if k in self.model_fields_set)
        if self.artifact is not None and given:
            raise ValueError(f"with artifact, leave out {', '.join(given)}: the artifact names its own method "
                             "and parameters (only feature may be set beside it)")
        if self.artifact is None:  # an inline calibrator: its method and parameters are checked here, at load
            from calibration.calibrators import calibrator_from_dict

            try:
                calibrator_from_dict({"method": self.method, "feature": self.feature, "params": self.params})
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(str(exc).strip("'\"")) from None
        return self

    @field_validator("feature")
    @classmethod
    def _known_feature(cls, v: str) -> str:
        from calibration.features import FEATURE_NAMES

        if v not in FEATURE_NAMES:
            raise ValueError(f"unknown feature {v!r}; known: {', '.join(FEATURE_NAMES)}")
        return v


def _check_backend_name(v: str) -> str:
    from cascade.backends import backend_names

    if v not in backend_names():
        raise ValueError(f"unknown backend {v!r}; known: {', '.join(backend_names())}")
    return v


class ProviderConfig(_Strict):
    """One provider of a tier with several (tried in order: e.g. local vLLM, a replica, a hosted API)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    backend: str
    model: NonBlank
    options: dict[str, Any] = Field(default_factory=dict)
    #: one attempt's time limit (default: the tier's timeout_s, which also bounds the whole tier)
    timeout_s: float | None = Field(None, gt=0)
    #: this provider's price (default: the tier's)
    price: Price | None = None

    _known_backend = field_validator("backend")(classmethod(lambda cls, v: _check_backend_name(v)))


class RetryConfig(_Strict):
    """Retries of a rate-limited (429) provider, for tiers with providers (see cascade/resilience.py)."""

    #: attempts on one provider, the first included, before falling over to the next
    max_attempts: int = Field(3, ge=1, le=10)
    #: full-jitter backoff: uniform in [0, min(max_delay_s, base_delay_s * 2**(retry-1))]
    base_delay_s: float = Field(0.25, ge=0)
    max_delay_s: float = Field(4.0, ge=0)
    #: a server's Retry-After / retry-after-ms is honoured up to this; a longer one means fall over now
    max_retry_after_s: float = Field(10.0, ge=0)
    #: a server's Retry-After also keeps later requests off that provider (to the next one, or waiting when it
    #: is within max_retry_after_s) for as long as it says, at most this (0: each request tries it again)
    max_hold_s: float = Field(60.0, ge=0)
    #: seed the jitter (reproducible runs); None: random
    jitter_seed: int | None = None


class BreakerConfig(_Strict):
    """A circuit breaker per provider, for tiers with providers."""

    #: open after this many consecutive failures (5xx, timeouts, connection errors, auth)
    failure_threshold: int = Field(5, ge=1)
    #: or when at least this fraction of the calls of the last window_s seconds failed...
    failure_rate: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(30.0, gt=0)
    #: ...and the window holds at least this many calls
    min_calls: int = Field(10, ge=1)
    #: open -> half-open (one probe call) after this many seconds
    cooldown_s: float = Field(15.0, gt=0)


class TierConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    backend: str
    #: a model id of the local catalog (see `cascade models list`), a local directory, or a remote name
    model: NonBlank
    price: Price = Price()
    max_tokens: int = Field(64, ge=1, le=32768)
    #: context window in tokens: a local tier (transformers, vllm) refuses a prompt its tokenizer counts past
    #: it (the request goes on to the next tier); a remote tier has no tokenizer here, and its provider's
    #: own context-length refusal does the same
    context_length: int | None = Field(None, ge=16)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    calibrator: CalibratorConfig = CalibratorConfig()
    top_logprobs: int = Field(5, ge=0, le=20)
    timeout_s: float = Field(120.0, gt=0)
    #: backend-specific options (e.g. transformers: dtype, threads, max_batch_size; openai: base_url)
    options: dict[str, Any] = Field(default_factory=dict)
    #: several providers tried in order instead of the single backend (then leave backend, model and
    #: options out: they describe the first provider); retries and fallbacks share timeout_s
    providers: list[ProviderConfig] | None = Field(None, min_length=1)
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()

    @model_validator(mode="before")
    @classmethod
    def _from_providers(cls, data: Any) -> Any:
        # (providers that are no list: refused by the field's own validation)
        if isinstance(data, dict) and isinstance(providers := data.get("providers"), list) and providers:
            given = sorted(k for k in ("backend", "model", "options") if k in data)
            if given:
                raise ValueError(f"with providers, leave out {', '.join(given)}: each provider has its own")
            first = providers[0]
            if isinstance(first, dict):
                data = {**data, "backend": first.get("backend"), "model": first.get("model")}
        return data

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        return _check_backend_name(v)

    @model_validator(mode="after")
    def _room_for_a_prompt(self) -> "TierConfig":
        # a request that asks for no max_tokens gets this one: at or above the context it leaves no token for
        # the prompt, so such a request is refused by the tier (context overflow) every time, and escalated
        if self.context_length is not None and self.max_tokens >= self.context_length:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below context_length ({self.context_length}): "
                             "a request that asks for no max_tokens gets the tier's, and would leave no room for "
                             "its prompt (the tier would refuse it every time)")
        return self

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, v: list[ProviderConfig] | None) -> list[ProviderConfig] | None:
        names = [p.name for p in v or ()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate provider name(s) {dupes}")
        return v


class PolicyConfig(_Strict):
    """A named route: an ordered chain of tiers. The last tier always answers."""

    chain: list[str] = Field(min_length=1)
    #: per-tier threshold overrides for this policy
    thresholds: Thresholds = Field(default_factory=dict)
    #: per-tier calibrator overrides for this policy (a per-task calibrator: e.g. one fit on this route's
    #: traffic), inline or {artifact: path}; tiers not named use their own
    calibrators: dict[str, CalibratorConfig] = Field(default_factory=dict)
    description: str = ""



class ServerConfig(_Strict):
    host: NonBlank = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    #: the request line's target and all header names and values together (beyond: 431)
    max_header_bytes: int = Field(65_536, ge=1024)
    #: largest max_tokens a client may ask for (per request); every tier's own max_tokens, which a request
    #: that names none gets, must be within it
    max_tokens_limit: int = Field(4096, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    #: "text" lines, or "json": one object per line (uvicorn's lines too); both carry the request's id
    log_format: Literal["text", "json"] = "text"
    #: on SIGTERM, how long in-flight requests may take to finish before the server stops
    graceful_shutdown_s: float = Field(30.0, gt=0)
    #: a streamed response's client must take each chunk within this many seconds; one that stops reading for
    #: longer is cut off (ledger: ClientDisconnected), freeing its slots, its spend hold and its upstream call
    stream_send_timeout_s: float = Field(30.0, gt=0)
    #: a request must arrive whole, headers and body, within this many seconds of its connection's opening (of
    #: its first byte, on a kept-alive connection); a client that sends it slower, or stops, gets a 408
    #: request_timeout and its connection closed (no ledger row)
    request_read_timeout_s: float = Field(30.0, gt=0)
    #: completion requests in flight at once, all keys together (beyond: 503 server_overloaded); None: no limit
    max_concurrent_requests: int | None = Field(None, gt=0)


class LedgerConfig(_Strict):
    #: a SQLite file, or a ``postgresql://user:pass@host:port/db`` URL (several replicas, one ledger)
    path: NonBlank = "~/.local/share/cascade-engine/ledger.sqlite"
    #: store prompts and answers' text in the ledger (off by default: privacy)
    store_text: bool = False
    #: how long a request waits for its ledger write (or read) and GET /ready for its probe: past it the
    #: request gets a 500 ledger_error and the server is not ready (a database that does not answer)
    timeout_s: float = Field(5.0, gt=0)
    #: the most writes (and reads) waiting for the ledger: past it one fails at once and the server is not
    #: ready, rather than the queue (and the memory it holds) growing through a long outage. While the
    #: ledger cannot be written, requests are refused (503) before any tier runs anyway
    max_pending: int = Field(2000, gt=0)
    #: journal a request still in flight 0.1 s after a tier call started, as it stands (table ``inflight``,
    #: written in the background, the requests due together in one transaction; most requests finish sooner
    #: and are never journaled), so that a server killed outright (SIGKILL, out of memory, a crash) does not
    #: lose the requests it was answering: the next server on the ledger records each, with the attempts paid
    #: for until then, as an error ``Interrupted``. Off: those requests are lost with the process
    journal: bool = True

    @field_validator("path")
    @classmethod
    def _a_ledger_url(cls, v: str) -> str:
        if why := ledger_url_problem(v):
            raise ValueError(why)
        return v


class ModelsConfig(_Strict):
    cache_dir: NonBlank = "~/.cache/cascade-engine/models"


class UserTierConfig(_Strict):
    """What a class of API keys may do and spend (e.g. free/paid, interactive/batch)."""

    #: policies and pinned tiers this user tier may ask for (empty: all)
    allowed_models: list[str] = Field(default_factory=list)
    #: cancel a tier that has not answered within this many seconds
    latency_budget_s: float | None = Field(None, gt=0)
    #: on a latency-budget timeout: escalate to the next tier, or serve the best answer already in hand
    on_latency_budget: Literal["escalate", "best_answer"] = "escalate"
    #: most a single request may cost, all attempts included
    cost_budget_usd: float | None = Field(None, gt=0)
    #: when the next tier could exceed the cost budget: refuse it (402 if nothing is in hand), or
    #: truncate its max_tokens to what the budget still pays for
    on_cost_budget: Literal["refuse", "truncate"] = "refuse"
    #: per-key spend limit per UTC day, enforced from the ledger (429 once reached)
    daily_spend_limit_usd: float | None = Field(None, gt=0)
    #: spend limit per UTC day of each end user a key names (the requests' ``user``), from the ledger (429)
    end_user_daily_spend_limit_usd: float | None = Field(None, gt=0)
    #: per-key completion requests in any 60 s, per server process (429 rate_limit_exceeded beyond)
    requests_per_minute: int | None = Field(None, gt=0)
    #: per-key tokens (prompt and max_tokens, as OpenAI counts them) of completion requests in any 60 s, per
    #: server process (429 rate_limit_exceeded, type tokens)
    tokens_per_minute: int | None = Field(None, gt=0)
    #: per-key completion requests in flight at once, per server process (429 concurrency_limit_exceeded)
    max_concurrent_requests: int | None = Field(None, gt=0)
    #: keys of this user tier may call the admin endpoints (POST /admin/reload)
    admin: bool = False


class ApiKeyConfig(_Strict):
    """An API key, stored only as the SHA-256 hex digest of the key (see `cascade keys hash`)."""

    id: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    user_tier: str


class AuthConfig(_Strict):
    #: with no keys configured the server is open: for local use only
    keys: list[ApiKeyConfig] = Field(default_factory=list)
    #: refuse every request without a valid key even when no key is configured yet
    required: bool = False
    #: user tier of requests when the server is open
    anonymous_user_tier: str | None = None


class ShadowConfig(_Strict):
    """A shadow policy: evaluated beside a live policy on its requests (or those of some user tiers), never
    served (cascade/shadow.py)."""

    #: the live policy whose requests this shadow is evaluated on
    of: str
    #: the shadow's chain (default: the live policy's chain)
    chain: list[str] | None = Field(None, min_length=1)
    #: per-tier thresholds (default: the live policy's)
    thresholds: Thresholds = Field(default_factory=dict)
    #: per-tier calibrators, inline or {artifact: path} (default: the live tier's)
    calibrators: dict[str, CalibratorConfig] = Field(default_factory=dict)
    #: evaluate the shadow only on requests of these user tiers (default: every request of ``of``)
    user_tiers: list[str] | None = None

    @field_validator("user_tiers")
    @classmethod
    def _some_user_tiers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:  # read as "none given" it would evaluate the shadow on every request
            raise ValueError("must name at least one user tier (leave it out to evaluate the shadow on every "
                             "request of its policy)")
        return v

    #: sampled shadow execution: the share of answered requests whose shadow outcome is unknown only
    #: because it needs tiers the live path did not run, on which those tiers are run in the background
    #: (after the response) to find out; 0: never (the outcome stays unknown and nothing is spent)
    sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    #: most the shadow's sampled calls may cost per UTC day, enforced from the ledger (needed when
    #: sample_rate > 0)
    sample_budget_usd: float = Field(0.0, ge=0.0)
    #: seed of the sampling draw (reproducible runs); None: random
    sample_seed: int | None = None
    description: str = ""


class CacheConfig(_Strict):
    """The response cache (cascade/cache.py): greedy requests answered again from memory, at no cost."""

    enabled: bool = False
    #: how long an answer is served again
    ttl_s: float = Field(3600.0, gt=0)
    #: answers kept (least recently used first out)
    max_entries: int = Field(10_000, ge=1)
    #: and the memory they may hold, estimated (logprobs make a long answer weigh megabytes); null: no bound
    max_bytes: int | None = Field(256 * 1024 * 1024, ge=1)
    #: "key": a key gets only answers first given to it; "global": any caller of the same user tier
    scope: Literal["key", "global"] = "key"
    #: a stream identical to a request being answered waits for that answer and is served it from the cache
    #: (one model call for the burst, but its first token comes only once the whole answer is in)
    coalesce_streams: bool = False


class DriftConfig(_Strict):
    """Rolling escalation-rate, ECE and cost-ratio monitor in the server (cascade/drift.py)."""

    #: how many recent answered requests (and, for ECE, feedback-labelled answers) the window holds
    window: int = Field(200, ge=2)
    #: alarm when the rolling escalation rate leaves [lo, hi]
    escalation_rate: tuple[float, float] | None = None
    #: alarm when the rolling ECE of served confidences against feedback labels exceeds this
    max_ece: float | None = Field(None, ge=0.0, le=1.0)
    #: labelled answers needed before the ECE is judged
    min_labels: int = Field(30, ge=1)
    #: alarm when the window's spend exceeds this multiple of what the last tier alone would have cost
    #: (1.0: the cascade has become dearer than sending everything to the strong tier)
    max_cost_ratio: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _labels_fit_the_window(self) -> "DriftConfig":
        # the window keeps at most `window` labelled answers: with more needed, the ECE is never judged
        if self.max_ece is not None and self.min_labels > self.window:
            raise ValueError(f"min_labels ({self.min_labels}) must not be above window ({self.window}): the window "
                             f"holds at most {self.window} labelled answers, so max_ece would never be judged")
        return self

    @field_validator("escalation_rate")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(v)}")
        return v


def _without_logprobs(tier: "TierConfig") -> bool:
    """Whether a tier (one of its providers) is told not to ask for token logprobs (openai's ``logprobs:
    false``, or ``reasoning: true``, a model that gives none): its answers carry no confidence, so anywhere but
    last in a chain it would always escalate."""
    options = [p.options for p in tier.providers] if tier.providers else [tier.options]
    return any(o.get("logprobs") is False or o.get("reasoning") is True for o in options)


def _last_only(chain: list[str], no_logprobs: set[str], where: str) -> None:
    early = [t for t in chain[:-1] if t in no_logprobs]
    if early:
        raise ValueError(f"{where}: tier(s) {early} have options.logprobs: false or reasoning: true (their answers "
                         "carry no confidence, so they would always escalate): such a tier can only be a chain's last")


#: features computed from each token's top-k alternatives: with fewer than two per token they are 0 for every answer
TOPK_FEATURES = ("mean_margin", "mean_topk_entropy")


def topk_problem(where: str, inputs: Iterable[str], tier: str, top_logprobs: int) -> str | None:
    """Why a calibrator reading ``inputs`` cannot judge the answers of ``tier``, which asks for ``top_logprobs``
    alternatives per token (None: it can)."""
    needs = [f for f in inputs if f in TOPK_FEATURES]
    if not needs or top_logprobs >= 2:
        return None
    return (f"{where}: reads {needs[0]!r}, computed from each token's top alternatives, but tier {tier!r} has "
            f"top_logprobs {top_logprobs}: with fewer than 2 it is 0 for every answer (a constant confidence); "
            "set the tier's top_logprobs to 2 or more")


def _calibrator_inputs(cc: CalibratorConfig) -> list[str]:
    """The engine features a calibrator reads, where the config says (an artifact's own: only when it opens)."""
    if cc.artifact is None:
        from calibration.calibrators import calibrator_from_dict

        return list(calibrator_from_dict({"method": cc.method, "feature": cc.feature, "params": cc.params}).inputs)
    return [cc.feature] if "feature" in cc.model_fields_set else []


def _check_topk(tier: "TierConfig", cc: CalibratorConfig, where: str) -> None:
    """(An artifact's own feature is checked when the engine opens it: :func:`cascade.engine.build_calibrator`.)"""
    if why := topk_problem(where, _calibrator_inputs(cc), tier.name, tier.top_logprobs):
        raise ValueError(why)


def tokens_per_minute_problem(name: str, user_tier: "UserTierConfig", tiers: "Iterable[TierConfig]",
                              policies: "Mapping[str, PolicyConfig]") -> str | None:
    """Why user tier ``name``'s ``tokens_per_minute`` refuses every request that names no max_tokens, on these
    tiers and policies (None: it does not). Such a request counts its route's largest tier default with its
    prompt (``Engine.tokens_asked``): a limit at or below that default finds every one "too large"."""
    tpm = user_tier.tokens_per_minute
    if tpm is None:
        return None
    by_name = {t.name: t for t in tiers}
    reach = {t for m in user_tier.allowed_models or [*policies, *by_name]
             for t in (policies[m].chain if m in policies else [m]) if t in by_name}
    if not reach:
        return None
    top = max(sorted(reach), key=lambda n: by_name[n].max_tokens)
    if tpm > by_name[top].max_tokens:
        return None
    return (f"user_tiers.{name}.tokens_per_minute ({tpm}) must be above the max_tokens of tier {top!r} "
            f"({by_name[top].max_tokens}), which its keys may use: a request that names no max_tokens counts the "
            "tier's and its prompt, so every one would be refused as too large; raise the limit or lower the "
            "tier's max_tokens")


def _unique_chain(chain: list[str], where: str) -> None:
    dupes = sorted({t for t in chain if chain.count(t) > 1})
    if dupes:
        raise ValueError(f"{where}: tier(s) {dupes} appear more than once; a chain consults each tier once")


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    ledger: LedgerConfig = LedgerConfig()
    models: ModelsConfig = ModelsConfig()
    tiers: list[TierConfig] = Field(min_length=1)
    policies: dict[str, PolicyConfig] = Field(min_length=1)
    default_policy: str | None = None
    user_tiers: dict[str, UserTierConfig] = Field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    #: shadow policies evaluated beside the live ones (cascade/shadow.py)
    shadows: dict[str, ShadowConfig] = Field(default_factory=dict)
    #: drift alarms in the server (cascade/drift.py)
    drift: DriftConfig | None = None
    #: the response cache (cascade/cache.py); off by default
    cache: CacheConfig = CacheConfig()
    #: the settings given on the command line over the file's ("server.port", "ledger.path"...): a reload of
    #: the file does not compare them (the command line's value stays in force)
    _cli_overrides: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @model_validator(mode="after")
    def _cross_check(self) -> "Config":
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tiers: duplicate tier name(s) {dupes}")
        clash = sorted(set(names) & set(self.policies))
        if clash:
            raise ValueError(f"policies: name(s) {clash} are also tier names; a model name must be unambiguous")
        no_logprobs = {t.name for t in self.tiers if _without_logprobs(t)}
        by_name = {t.name: t for t in self.tiers}
        limit = self.server.max_tokens_limit
        for i, t in enumerate(self.tiers):
            _check_topk(t, t.calibrator, f"tiers.{i}.calibrator")
            # a request that names no max_tokens gets the tier's: above the limit, it would be answered at a
            # length no client may ask for (the limit is what bounds an answer, and what capacity is sized by)
            if t.max_tokens > limit:
                given = "" if "max_tokens" in t.model_fields_set else ", the default"
                raise ValueError(f"tiers.{i}.max_tokens ({t.max_tokens}{given}) is above server.max_tokens_limit "
                                 f"({limit}): a request that names no max_tokens gets the tier's, longer than any "
                                 "client may ask for; lower the tier's max_tokens or raise the limit")
        for pname, pol in self.policies.items():
            if not pname.strip():
                raise ValueError("policies: a policy name must not be empty")
            _unique_chain(pol.chain, f"policies.{pname}.chain")
            for t in pol.chain:
                if t not in names:
                    raise ValueError(f"policies.{pname}.chain: unknown tier {t!r}; tiers are {names}")
            _last_only(pol.chain, no_logprobs, f"policies.{pname}.chain")
            for t in pol.thresholds:
                if t not in pol.chain:
                    raise ValueError(f"policies.{pname}.thresholds: tier {t!r} is not in the chain")
            for t, cc in pol.calibrators.items():
                if t not in pol.chain:
                    raise ValueError(f"policies.{pname}.calibrators: tier {t!r} is not in the chain")
                _check_topk(by_name[t], cc, f"policies.{pname}.calibrators.{t}")
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(f"default_policy: unknown policy {self.default_policy!r}")
        models = set(self.policies) | set(names)
        for uname, ut in self.user_tiers.items():
            if not uname.strip():
                raise ValueError("user_tiers: a user tier name must not be empty")
            for m in ut.allowed_models:
                if m not in models:
                    raise ValueError(f"user_tiers.{uname}.allowed_models: unknown model {m!r}")
            if why := tokens_per_minute_problem(uname, ut, self.tiers, self.policies):
                raise ValueError(why)
        for i, key in enumerate(self.auth.keys):
            if key.user_tier not in self.user_tiers:
                raise ValueError(f"auth.keys.{i}.user_tier: unknown user tier {key.user_tier!r}")
        ids = [k.id for k in self.auth.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("auth.keys: duplicate key id")
        first_with: dict[str, str] = {}
        for key in self.auth.keys:  # one secret, two entries: the second (and its user tier) could never be used
            other = first_with.setdefault(key.sha256, key.id)
            if other != key.id:
                raise ValueError(f"auth.keys: keys {other!r} and {key.id!r} have the same sha256 (one secret): "
                                 "give each key its own")
        anon = self.auth.anonymous_user_tier
        if anon is not None and anon not in self.user_tiers:
            raise ValueError(f"auth.anonymous_user_tier: unknown user tier {anon!r}")
        for sname, sh in self.shadows.items():
            if not sname.strip():  # (its name labels its metrics, ledger rows and report lines)
                raise ValueError("shadows: a shadow name must not be empty")
            if sh.of not in self.policies:
                raise ValueError(f"shadows.{sname}.of: unknown policy {sh.of!r}; policies are {list(self.policies)}")
            chain = sh.chain or self.policies[sh.of].chain
            _unique_chain(sh.chain or [], f"shadows.{sname}.chain")
            for t in sh.chain or ():
                if t not in names:
                    raise ValueError(f"shadows.{sname}.chain: unknown tier {t!r}; tiers are {names}")
            _last_only(sh.chain or [], no_logprobs, f"shadows.{sname}.chain")
            for what in ("thresholds", "calibrators"):
                for t in getattr(sh, what):
                    if t not in chain:
                        raise ValueError(f"shadows.{sname}.{what}: tier {t!r} is not in the shadow's chain")
            for t, cc in sh.calibrators.items():
                _check_topk(by_name[t], cc, f"shadows.{sname}.calibrators.{t}")
            for ut in sh.user_tiers or ():
                if ut not in self.user_tiers:
                    raise ValueError(f"shadows.{sname}.user_tiers: unknown user tier {ut!r}; user tiers are "
                                     f"{list(self.user_tiers)}")
            if sh.sample_rate > 0 and sh.sample_budget_usd <= 0:
                raise ValueError(f"shadows.{sname}.sample_budget_usd: must be above 0 when sample_rate is above 0 "
                                 f"(sample_rate {sh.sample_rate:g} runs tiers the live path skipped, paid from a "
                                 "budget per UTC day)")
        return self

    # --- lookups ---------------------------------------------------------------------------------
    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def default_policy_name(self) -> str:
        return self.default_policy or next(iter(self.policies))

    def ledger_path(self) -> Path:
        return expand_path(self.ledger.path, "ledger.path")

    def ledger_target(self) -> str:
        """What :class:`cascade.ledger.Ledger` opens: a PostgreSQL URL, or a SQLite path made absolute (a relative
        one is read from the current directory: every message, and the server's banner, names the file itself)."""
        p = self.ledger.path
        return p if p.startswith(LEDGER_URL_SCHEMES) else str(self.ledger_path().absolute())

    def model_cache_dir(self) -> Path:
        return expand_path(self.models.cache_dir, "models.cache_dir")

    def price_warnings(self) -> list[str]:
        """Tiers that call a hosted (openai) backend and were given no ``price``: their calls cost 0 in the
        ledger, so cost budgets, daily spend limits, shadow budgets and the reports never count them (an
        explicit price of 0, a free local server, is a choice and not warned of)."""
        out = []
        for t in self.tiers:
            remote = any(p.backend == "openai" and p.price is None for p in t.providers) if t.providers \
                else t.backend == "openai"
            if remote and "price" not in t.model_fields_set:
                out.append(f"tier {t.name!r} calls a hosted API and has no price: its calls are recorded at $0, "
                           "and no cost budget, spend limit or shadow budget counts them (set tiers[].price)")
        return out


# --- loading -------------------------------------------------------------------------------------


def _format_validation_error(exc: ValidationError, source: str,
                             overridden: Mapping[tuple[str, ...], str] | None = None) -> str:
    """One line for a validation error. ``overridden`` maps the config paths set from the environment to the
    variable that set them: an error there blames the variable, not the file."""
    parts, env_parts = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "finite_number":
            msg = "must be a finite number"
        var = next((v for path, v in (overridden or {}).items() if tuple(err["loc"][:len(path)]) == path), None)
        if var is not None:
            env_parts.append(f"environment variable {var} ({loc}): {msg}")
        else:
            parts.append(f"{loc}: {msg}" if err["loc"] else msg)  # a check across keys names them itself
    if not parts:
        return "invalid " + "; ".join(env_parts)
    return f"invalid config {source}: " + "; ".join(parts + env_parts)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = dict(data)
    for var, path in ENV_OVERRIDES.items():
        if var in environ and environ[var] != "":
            section = out.get(path[0])
            if section is not None and not isinstance(section, dict):
                continue  # a section that is no mapping (`server: [1, 2]`): validation names it, in one line
            # copy the section so the caller's dict is untouched
            out[path[0]] = dict(section or {})
            _set_path(out, path, environ[var])
    return out


def environ_without_flags(environ: Mapping[str, str], given: Iterable[str]) -> dict[str, str]:
    """``environ`` less the override variables of the settings the command line gave (``"server.port"``...): a
    flag wins over its variable, which is then not read at all, at start and on every reload alike (a bad value
    in it would otherwise refuse each reload of a server that started without reading it)."""
    skip = set(given)
    return {k: v for k, v in environ.items() if ".".join(ENV_OVERRIDES.get(k, ())) not in skip}


def default_config_text() -> str:
    return resources.files("cascade").joinpath("defaults/cpu.yaml").read_text()


def _artifacts_relative_to(cfg: Config, base: Path) -> Config:
    """``cfg`` with every relative calibrator ``artifact`` path (tiers, policies, shadows) made relative to
    ``base``, the directory of the config file that names it; absolute and ``~`` paths are kept."""

    def fix(cc: CalibratorConfig, where: str) -> CalibratorConfig:
        if cc.artifact is None or expand_path(cc.artifact, f"{where}.artifact").is_absolute():
            return cc
        return cc.model_copy(update={"artifact": str(base / cc.artifact)})

    def fix_map(cals: dict[str, CalibratorConfig], where: str) -> dict[str, CalibratorConfig]:
        return {t: fix(cc, f"{where}.calibrators.{t}") for t, cc in cals.items()}

    return cfg.model_copy(update={
        "tiers": [t.model_copy(update={"calibrator": fix(t.calibrator, f"tiers.{i}.calibrator")})
                  for i, t in enumerate(cfg.tiers)],
        "policies": {n: p.model_copy(update={"calibrators": fix_map(p.calibrators, f"policies.{n}")})
                     for n, p in cfg.policies.items()},
        "shadows": {n: s.model_copy(update={"calibrators": fix_map(s.calibrators, f"shadows.{n}")})
                    for n, s in cfg.shadows.items()},
    })


#: the most values a config may hold once its aliases are expanded (a few hundred in a large real one): aliases
#: of aliases can expand exponentially ("billion laughs"), and every check walks the expanded values
MAX_CONFIG_VALUES = 100_000


def _check_aliases(root: yaml.Node) -> None:
    """Refuse an alias that refers to a collection holding it (``port: &x [*x]``: a value without end, which
    every later check would recurse into) and aliases that expand past ``MAX_CONFIG_VALUES`` values."""
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    values = 0
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        values += 1
        if values > MAX_CONFIG_VALUES:
            raise yaml.composer.ComposerError(None, None, f"its aliases expand to more than {MAX_CONFIG_VALUES:,} "
                                              "values", node.start_mark)
        if id(node) in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a collection that holds it (a value "
                                              "without end)", node.start_mark)
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            on_path.add(id(node))
            stack.append((node, True))
            children = node.value if isinstance(node, yaml.SequenceNode) else [c for kv in node.value for c in kv]
            stack.extend((c, False) for c in children)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a second ``port:`` or a pasted ``tiers:`` block would quietly replace the first), and an alias
    that refers to a collection holding it."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_aliases(node)
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says what is wrong with it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"the key {key!r} is given twice",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        # an integer of more digits than Python converts (4300) is a ValueError, not a YAMLError: a traceback
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, "an integer too long to read (more than 4300 digits)", node.start_mark) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def parse_config(data: Any, *, source: str = "<dict>", environ: Mapping[str, str] | None = None,
                 base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate a parsed config. ``base_dir``: the directory relative calibrator artifact paths are read
    from (the config file's); None leaves them relative to the current directory."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of keys")
    overridden: dict[tuple[str, ...], str] = {}
    if environ is not None:
        environ = _checked_environ(environ)
        data = apply_env_overrides(data, environ)
        overridden = {path: var for var, path in ENV_OVERRIDES.items() if environ.get(var)}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, overridden)) from exc
    except (TypeError, KeyError, IndexError, AttributeError) as exc:  # a validator met a shape it did not expect
        raise ConfigError(f"invalid config {source}: {type(exc).__name__}: {exc}") from exc
    return cfg if base_dir is None else _artifacts_relative_to(cfg, Path(base_dir))


def _checked_environ(environ: Any) -> Mapping[str, str]:
    """``environ=`` of :func:`load_config` and :func:`parse_config`: a mapping of names to values (as
    ``os.environ``), else a one-line :class:`ConfigError` (a list of pairs was a raw ``AttributeError``)."""
    if not isinstance(environ, Mapping):
        raise ConfigError(f"environ must be a mapping of variable names to values (as os.environ, or {{}} to "
                          f"ignore the environment), got {type(environ).__name__}")
    return environ


def config_file(path: str | os.PathLike[str] | None = None, *,
                environ: Mapping[str, str] | None = None) -> str | os.PathLike[str] | None:
    """The config file a command reads: ``path`` (``--config``) when given, else ``$CASCADE_CONFIG`` when set;
    None: the embedded default."""
    if path is not None:
        return path
    return (os.environ if environ is None else environ).get(ENV_CONFIG) or None


def load_config(path: str | os.PathLike[str] | None = None, *,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (or the embedded CPU default), then apply env overrides. Relative
    calibrator ``artifact`` paths in a file are read relative to the file's directory.

    ``environ`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    """
    env = os.environ if environ is None else _checked_environ(environ)
    path = config_file(path, environ=env)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"the config file must be a path (str or os.PathLike), got {type(path).__name__}")
    base_dir = None
    if path is None:
        text, source = default_config_text(), "<embedded default cpu.yaml>"
    else:
        p = expand_path(path, "config file")
        source = str(p)
        base_dir = p.resolve().parent
        try:
            st = p.stat()
            if stat.S_ISREG(st.st_mode) and st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file {p} is {st.st_size} bytes, more than a config holds "
                                  f"(at most {MAX_CONFIG_BYTES})")
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):  # a pipe, a device: never read
                raise ConfigError(f"config file {p} is not a regular file")
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cannot read config file {p}: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # a character YAML refuses (a NUL, an escape): no mark, a position
        line, column = text.count("\n", 0, exc.position) + 1, exc.position - text.rfind("\n", 0, exc.position)
        raise ConfigError(f"invalid config {source}: {exc.reason} (character #x{exc.character:04x}) at line {line}, "
                          f"column {column}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        context = getattr(exc, "context", None)
        if context and problem.startswith("but "):  # "but found another document": the first half says what of
            problem = f"{context}, {problem}"
        raise ConfigError(f"invalid config {source}: {problem}{where}") from exc
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"invalid config {source}: collections nested too deeply") from None
    return parse_config(data, source=source, environ=env, base_dir=base_dir)
