"""A Flask app in the full hardening WSGI stack, served by real gunicorn in test_gunicorn.py.

``app`` dispatches ``/metrics`` to ``metrics_app`` and ``/healthz`` to ``health_app``;
everything else goes to Flask inside BodyLimit(Metrics(RateLimit(Error(flask)))): 3 requests a
minute per client (the ``X-Client`` header, else the address; in memory, so one worker), a
stricter rule for ``POST /upload``, bodies up to 1 KiB. ``/pages/<int:page_id>`` answers and
raises ``ConflictError`` for page 9, answered by ``flask_error_handler``.
"""

from __future__ import annotations

from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from hardening import ConflictError, HardeningError, Metrics
from hardening.adapters.wsgi import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    flask_error_handler,
    health_app,
    metrics_app,
)
from hardening.ratelimit import RateLimiter, RequestInfo

MAX_BYTES = 1024
CONFLICT_PAGE = 9

metrics = Metrics()
flask_app = Flask(__name__)
flask_app.register_error_handler(HardeningError, flask_error_handler)


@flask_app.get("/pages/<int:page_id>")
def page(page_id: int) -> str:
    """The page; a 409 for :data:`CONFLICT_PAGE`."""
    if page_id == CONFLICT_PAGE:
        raise ConflictError("Page", page_id, expected_version=1, current_version=2)
    return f"page {page_id}"


@flask_app.post("/upload")
def upload() -> str:
    """Reads the whole body (bounded by BodyLimitMiddleware) and tells its size."""
    return str(len(request.get_data()))


def client_key(request: RequestInfo) -> str | None:
    """Each test names its own client, so tests sharing the server do not share counters."""
    client = request.headers.get("x-client")
    return f"client:{client}" if client else None


flask_app.wsgi_app = BodyLimitMiddleware(  # type: ignore[method-assign]
    MetricsMiddleware(
        RateLimitMiddleware(
            ErrorMiddleware(flask_app.wsgi_app),
            RateLimiter("3/minute"),
            key=client_key,
            rules={"POST /upload": "2/minute"},
        ),
        metrics,
    ),
    max_bytes=MAX_BYTES,
)

app = DispatcherMiddleware(
    flask_app,
    {"/metrics": metrics_app(metrics), "/healthz": health_app({"self": lambda: True})},
)
