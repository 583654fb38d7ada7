"""API keys → user tiers. Keys are stored hashed (SHA-256) and never logged."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

from cascade.config import Config, UserTierConfig
from cascade.errors import AuthenticationError, PermissionDeniedError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "sk-casc-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    key_id: str | None
    user_tier: str | None
    limits: UserTierConfig | None


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("api-key") or None


def authenticate(config: Config, request: Request) -> Caller:
    """The caller's key decides its user tier; no client-settable header can."""
    auth = config.auth
    token = _bearer(request)
    if not auth.keys and not auth.required:
        tier = auth.anonymous_user_tier
        return Caller(None, tier, config.user_tiers.get(tier) if tier else None)
    if token is None:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token)
    for k in auth.keys:
        if hmac.compare_digest(k.sha256, digest):
            return Caller(k.id, k.user_tier, config.user_tiers[k.user_tier])
    raise AuthenticationError("invalid API key")


def refuse_cross_site(request: Request) -> None:
    """Refuse a request a browser sent on another site's behalf: a page anywhere can make a visitor's browser
    POST to a server on their machine or network (a form, a no-cors fetch: no preflight, no header of its own),
    and on an open server nothing else would stop it reloading the config. Browsers say where a request comes
    from (``Sec-Fetch-Site``, ``Origin``); curl, SDKs and scripts send neither, and are not refused."""
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    origin = request.headers.get("origin")
    if site in ("cross-site", "same-site") or (
            origin is not None and origin.partition("://")[2].lower() != request.headers.get("host", "").lower()):
        raise PermissionDeniedError(f"admin endpoints refuse requests a browser sends from another site (origin "
                                    f"{origin or site!r}): call them with curl or a script", code="cross_site_request")


def authorize(caller: Caller, model: str) -> None:
    limits = caller.limits
    if limits is not None and limits.allowed_models and model not in limits.allowed_models:
        raise PermissionDeniedError(
            f"user tier {caller.user_tier!r} may not use model {model!r}; allowed: {', '.join(limits.allowed_models)}",
            param="model", code="model_not_allowed")
