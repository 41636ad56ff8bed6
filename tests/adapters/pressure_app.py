"""A limited app on Redis for the pressure tests, served by uvicorn in test_pressure.py.

``PRESSURE_REDIS_URL`` and ``PRESSURE_PREFIX`` pick the store; ``PRESSURE_LIMIT`` the limit
(``5/minute``) and ``PRESSURE_ON_ERROR`` the limiter's ``on_backend_error``. Every request
shares one key, so the limit is global.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hardening.adapters.asgi import ErrorMiddleware, RateLimitMiddleware, health_app
from hardening.ratelimit import AsyncRateLimiter


async def ok(request: Request) -> Response:
    """Anything: the limit in front of it is what matters."""
    return PlainTextResponse("ok")


limiter = AsyncRateLimiter(
    os.environ.get("PRESSURE_LIMIT", "5/minute"),
    storage=os.environ["PRESSURE_REDIS_URL"],
    key_prefix=os.environ["PRESSURE_PREFIX"],
    on_backend_error=os.environ.get("PRESSURE_ON_ERROR", "allow"),  # type: ignore[arg-type]
)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Close the limiter's Redis client at shutdown."""
    yield
    await limiter.aclose()


starlette = Starlette(
    routes=[Route("/ok", ok), Route("/healthz", health_app({"app": lambda: True}, timeout=5))],
    lifespan=lifespan,
)
app = RateLimitMiddleware(
    ErrorMiddleware(starlette), limiter, key=lambda request: "everyone", exempt_paths=["/healthz"]
)
