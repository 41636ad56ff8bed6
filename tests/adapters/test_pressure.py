"""The rate-limit middleware on real servers under load and outage: exact, and 503 not 429.

uvicorn serves ``tests/adapters/pressure_app.py`` on real Redis; requests come over loopback,
many more at once than the Redis pool has connections.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hardening.adapters.asgi import ErrorMiddleware, RateLimitMiddleware
from hardening.adapters.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware
from hardening.ratelimit import AsyncRateLimiter, RateLimiter
from tests.adapters.test_uvicorn import UvicornServer
from tests.conftest import free_port

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = pytest.mark.slow

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def limited_server(
    redis_url: str, redis_prefix: str, tmp_path: Path, redis_client: object
) -> Iterator[UvicornServer]:
    """uvicorn serving a ``5/minute`` app on real Redis; stopped afterwards."""
    server = UvicornServer(
        "h11",
        tmp_path / "uvicorn.log",
        app="tests.adapters.pressure_app:app",
        env={"PRESSURE_REDIS_URL": redis_url, "PRESSURE_PREFIX": redis_prefix.rstrip(":")},
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()


async def _burst(url: str, count: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        responses = await asyncio.gather(*(client.get(url) for _ in range(count)))
    return Counter(response.status_code for response in responses)


def test_800_concurrent_requests_get_exactly_5_through(limited_server: UvicornServer) -> None:
    """800 requests at once against 5/minute: exactly 5 answered 200, the rest 429."""
    statuses = asyncio.run(_burst(f"{limited_server.url}/ok", 800))
    assert statuses == Counter({200: 5, 429: 795})


async def _ok(scope: object, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


@pytest.mark.anyio
async def test_deny_on_outage_answers_503_with_the_breaker_window() -> None:
    """Redis refused, ``on_backend_error="deny"``: 503 problem+json, Retry-After, not 429."""
    limiter = AsyncRateLimiter(
        "5/minute", storage=f"redis://127.0.0.1:{free_port()}/0", on_backend_error="deny"
    )
    app = RateLimitMiddleware(ErrorMiddleware(_ok), limiter)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    await limiter.aclose()
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.headers["retry-after"] == "1"  # the 0.5 s window, in whole seconds
    assert json.loads(response.content)["status"] == 503


def test_wsgi_deny_on_outage_answers_503() -> None:
    """The WSGI middleware answers a deny-on-outage with 503 too."""
    limiter = RateLimiter(
        "5/minute", storage=f"redis://127.0.0.1:{free_port()}/0", on_backend_error="deny"
    )

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        start_response("200 OK", [])  # type: ignore[operator]
        return [b"ok"]

    wrapped = WSGIRateLimitMiddleware(app, limiter)
    with httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t") as client:
        response = client.get("/")
    limiter.close()
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    assert "retry-after" in response.headers


@pytest.mark.anyio
async def test_an_outage_in_the_apps_own_code_is_503() -> None:
    """The app's own SQLAlchemy or redis-py call meeting a dead store: 503, not 500."""
    import redis.asyncio
    import sqlalchemy as sa

    engine = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test",
        connect_args={"connect_timeout": 2},
    )
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1)

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["path"] == "/sql":
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        elif scope["path"] == "/redis":
            await client.get("x")
        raise KeyError("a bug, not an outage")

    transport = httpx.ASGITransport(app=ErrorMiddleware(app))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        sql = await http.get("/sql")
        red = await http.get("/redis")
        with pytest.raises(KeyError):
            await http.get("/bug")
    await client.aclose()
    engine.dispose()
    assert (sql.status_code, red.status_code) == (503, 503)
    assert json.loads(sql.content)["backend"] == "sql"
    assert json.loads(red.content)["backend"] == "redis"
    assert sql.headers["content-type"] == PROBLEM_JSON


def test_wsgi_outage_in_the_apps_own_code_is_503() -> None:
    """The WSGI ErrorMiddleware answers a raw SQL outage from the app with 503."""
    import sqlalchemy as sa

    from hardening.adapters.wsgi import ErrorMiddleware as WSGIErrorMiddleware

    engine = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test",
        connect_args={"connect_timeout": 2},
    )

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return []

    wrapped = WSGIErrorMiddleware(app)
    with httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t") as http:
        response = http.get("/")
    engine.dispose()
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
