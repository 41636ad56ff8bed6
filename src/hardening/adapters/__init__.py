"""Thin ASGI and WSGI adapters exposing the primitives to any framework.

``hardening.adapters.asgi`` and ``hardening.adapters.wsgi`` hold middleware and apps with the
same names and options: ``RateLimitMiddleware``, ``MetricsMiddleware``, ``ErrorMiddleware``,
``BodyLimitMiddleware``, ``metrics_app`` and ``health_app``. This package holds the pieces
both use and that apps call directly: body parsing that raises the right errors, per-route
rate-limit rules, and ready-made health checks.
"""

from hardening.adapters._checks import redis_check, sql_check
from hardening.adapters._http import (
    PROBLEM_JSON,
    PathMatcher,
    RateLimitRule,
    error_response,
    parse_content_length,
    parse_json_body,
    parse_patch_body,
    problem_response,
)

__all__ = [
    "PROBLEM_JSON",
    "PathMatcher",
    "RateLimitRule",
    "error_response",
    "parse_content_length",
    "parse_json_body",
    "parse_patch_body",
    "problem_response",
    "redis_check",
    "sql_check",
]
