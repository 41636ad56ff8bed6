"""A Starlette app in the full ASGI middleware stack, served by uvicorn in test_uvicorn.py.

``python -m uvicorn tests.adapters.uvicorn_app:app --lifespan on`` from the repository root.
Rate limits: ``1000/minute`` per client IP for everything, ``3/minute`` for ``GET /limited``
(moving window: exact, whatever the wall clock does). Bodies over 1,000 bytes are refused.
``/metrics`` and ``/healthz`` are neither limited nor observed.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from hardening import ConflictError, Metrics
from hardening.adapters.asgi import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    health_app,
    metrics_app,
)
from hardening.ratelimit import AsyncRateLimiter

MAX_BYTES = 1000
LIMITED = 3
ENDPOINTS = ["/metrics", "/healthz"]


async def page(request: Request) -> Response:
    """The page id back."""
    return JSONResponse({"page": request.path_params["page_id"]})


async def limited(request: Request) -> Response:
    """Anything; the rule on this path is what matters."""
    return PlainTextResponse("ok")


async def upload(request: Request) -> Response:
    """The size of the body read."""
    return JSONResponse({"size": len(await request.body())})


async def conflict(request: Request) -> Response:
    """Always an edit conflict."""
    raise ConflictError("page", 1, expected_version=1, current_version=2)


metrics = Metrics()
starlette = Starlette(
    routes=[
        Route("/pages/{page_id}", page),
        Route("/limited", limited),
        Route("/upload", upload, methods=["POST"]),
        Route("/conflict", conflict),
        Route("/metrics", metrics_app(metrics)),
        Route("/healthz", health_app({"app": lambda: True}, timeout=5)),
    ]
)
# inside Starlette's ServerErrorMiddleware, which would answer hardening errors with a 500
starlette.add_middleware(ErrorMiddleware)

app = BodyLimitMiddleware(
    MetricsMiddleware(
        RateLimitMiddleware(
            starlette,
            AsyncRateLimiter("1000/minute", strategy="moving-window"),
            rules={"GET /limited": f"{LIMITED}/minute"},
            exempt_paths=ENDPOINTS,
        ),
        metrics,
        exclude_paths=ENDPOINTS,
    ),
    max_bytes=MAX_BYTES,
)
