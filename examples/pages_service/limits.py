"""The service's rate-limit policy, shared by the ASGI app and the Flask (WSGI) app.

Who a caller is (:class:`Identity`), the tiers, the per-IP limit on every request and the
per-user limit on saves are one policy; only the limiter class differs between the apps
(``AsyncRateLimiter`` on ASGI, ``RateLimiter`` on WSGI).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from examples.pages_service.store import Settings
from hardening import AsyncRateLimiter, Metrics, RateLimiter, RequestInfo
from hardening.adapters import RateLimitRule

TIERS = {"free": 1, "pro": 5, "internal": None}  # multipliers of the save limit; None: unlimited
SAVES = ("POST /pages", "PATCH,PUT /pages/*")  # a save is a create, a patch or a full replace
UNLIMITED_PATHS = ("/metrics", "/healthz")

L = TypeVar("L", RateLimiter, AsyncRateLimiter)


class Identity:
    """Who a request is: a bearer token from ``API_TOKENS``, else the ``X-User`` header.

    ``X-User`` stands in for your real authentication; it decides only the save-limit key.
    """

    def __init__(self, tokens: Mapping[str, tuple[str, str]]) -> None:
        self.tokens = dict(tokens)

    def _token_entry(self, request: RequestInfo) -> tuple[str, str] | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None

    def user(self, request: RequestInfo) -> str | None:
        """The user id, or ``None`` (the save limit then falls back to the client IP)."""
        entry = self._token_entry(request)
        if entry is not None:
            return entry[0]
        user = request.headers.get("x-user", "").strip()
        return user[:64] or None

    def user_key(self, request: RequestInfo) -> str | None:
        """The save-limit key: ``user:<id>``."""
        user = self.user(request)
        return f"user:{user}" if user else None

    def tier(self, request: RequestInfo) -> str:
        """The tier of the caller's token; ``free`` without one."""
        entry = self._token_entry(request)
        return entry[1] if entry is not None else "free"


@dataclass(frozen=True)
class Limits(Generic[L]):
    """The two limiters and the rules that apply the saves limiter per user."""

    per_ip: L
    saves: L
    rules: list[RateLimitRule]

    def middleware_options(self, settings: Settings) -> dict[str, Any]:
        """The ``RateLimitMiddleware`` keyword arguments (after the app and ``per_ip``)."""
        return {
            "rules": self.rules,
            "bypass": settings.admin_token,
            "exempt_paths": UNLIMITED_PATHS,
            "trusted_proxies": settings.trusted_proxies,
        }


def build_limits(
    limiter_type: type[L], settings: Settings, storage: object, metrics: Metrics
) -> Limits[L]:
    """The per-IP limiter on every request and the per-user saves limiter with its tiers.

    Args:
        limiter_type: ``AsyncRateLimiter`` (ASGI) or ``RateLimiter`` (WSGI).
        settings: the limits, ``block_for``, key prefix and API tokens.
        storage: ``"memory://"`` or the Redis client both limiters share.
        metrics: the registry the decisions are counted in.
    """
    per_ip = limiter_type(
        settings.ip_limit,
        storage=storage,
        metrics=metrics,
        name="per_ip",
        key_prefix=settings.key_prefix,
    )
    saves = limiter_type(
        settings.save_limit,
        storage=storage,
        block_for=settings.save_block_for,
        tiers=TIERS,
        metrics=metrics,
        name="saves",
        key_prefix=f"{settings.key_prefix}:saves",
    )
    identity = Identity(settings.api_tokens)
    rules = [
        RateLimitRule(pattern, saves, key=identity.user_key, tier=identity.tier)
        for pattern in SAVES
    ]
    return Limits(per_ip, saves, rules)
