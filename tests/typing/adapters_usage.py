"""The documented adapter usage, type-checked by mypy --strict (never run)."""

from __future__ import annotations

from flask import Flask
from starlette.applications import Starlette

from hardening import (
    AsyncRateLimiter,
    HardeningError,
    Metrics,
    RateLimiter,
    RequestInfo,
    user_key,
)
from hardening.adapters import (
    RateLimitRule,
    asgi,
    parse_json_body,
    parse_patch_body,
    redis_check,
    sql_check,
    wsgi,
)

metrics = Metrics()


def user_of(request: RequestInfo) -> str | None:
    return request.headers.get("x-user")


starlette_app = Starlette()
starlette_app.add_middleware(asgi.ErrorMiddleware)
asgi_stack: asgi.ASGIApp = asgi.BodyLimitMiddleware(
    asgi.MetricsMiddleware(
        asgi.RateLimitMiddleware(
            starlette_app,
            AsyncRateLimiter("100/minute"),
            rules=[RateLimitRule("PATCH /pages/*", "30/minute", key=user_key(user_of))],
            bypass="an-admin-token-of-32-characters!",
            exempt_paths=["/metrics", "/healthz"],
            trusted_proxies=["10.0.0.0/8"],
            tier=lambda request: request.headers.get("x-plan"),
            cost=lambda request: 2 if request.method == "PUT" else 1,
        ),
        metrics,
        exclude_paths=["/metrics"],
    ),
    max_bytes=1_000_000,
)
scrape: asgi.ASGIApp = asgi.metrics_app(metrics, auth="scrape-token")
health: asgi.ASGIApp = asgi.health_app({"alive": lambda: True}, timeout=1.0)

flask_app = Flask(__name__)
flask_app.register_error_handler(HardeningError, wsgi.flask_error_handler)
flask_app.wsgi_app = wsgi.BodyLimitMiddleware(  # type: ignore[method-assign]
    wsgi.MetricsMiddleware(
        wsgi.RateLimitMiddleware(flask_app.wsgi_app, RateLimiter("2/minute")), metrics
    ),
    max_bytes=1_000_000,
)
wsgi.record_flask_routes(flask_app)
wsgi_scrape: wsgi.WSGIApp = wsgi.metrics_app(metrics)
wsgi_health: wsgi.WSGIApp = wsgi.health_app({"alive": lambda: True})

patch_ops: list[object] = parse_patch_body(b"[]", "application/json-patch+json")
body: object = parse_json_body(b"{}", "application/json")
checks = {"redis": redis_check(object()), "db": sql_check(object())}
