"""The ASGI middleware and apps, on bare ASGI, Starlette, FastAPI and Django, over httpx.

Requests go through ``httpx.ASGITransport`` or, where a test needs to control the wire
(streamed bodies, disconnects, lifespan, websockets, bytes no HTTP client would send), through
hand-written ``receive``/``send`` callables. Each test reads a fresh :class:`hardening.Metrics`.
Rate limits run on the memory storage with a :class:`hardening.FakeClock`, and on real Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from hardening import FakeClock, Metrics, user_key
from hardening.adapters import PROBLEM_JSON, RateLimitRule, redis_check, sql_check
from hardening.adapters.asgi import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    health_app,
    metrics_app,
)
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    ConflictError,
    HardeningError,
    InvalidPatch,
    MalformedBody,
    NotFoundError,
    PatchConflict,
    PayloadTooLarge,
    PreconditionFailed,
    PreconditionRequired,
    UnsupportedMediaType,
)
from hardening.ratelimit import AsyncRateLimiter, RateLimiter, RequestInfo
from tests.conftest import free_port

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Any, Any, Any], Awaitable[None]]

PEER = ("203.0.113.7", 50000)
TOKEN = "adm1n-bypass-token-0123456789"
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
)
DURATION = "http_server_request_duration_seconds"


# --- helpers ------------------------------------------------------------------------------


def client(
    app: App, *, peer: tuple[str, int] = PEER, raise_errors: bool = True
) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in process, from the peer address ``peer``."""
    transport = httpx.ASGITransport(app=app, client=peer, raise_app_exceptions=raise_errors)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def http_scope(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    peer: tuple[str, int] | None = PEER,
    raw_path: bytes | None = None,
) -> Scope:
    """An ASGI 3 HTTP scope as a server builds it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape") if raw_path is None else raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": peer,
        "server": ("testserver", 80),
    }


@dataclass
class Exchange:
    """What an app sent for one raw ASGI call."""

    messages: list[Message] = field(default_factory=list)

    @property
    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]

    @property
    def status(self) -> int:
        (start,) = self.starts
        status: int = start["status"]
        return status

    @property
    def headers(self) -> dict[str, str]:
        (start,) = self.starts
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: App,
    scope: Scope,
    chunks: Sequence[bytes] = (b"",),
    *,
    incoming: Sequence[Message] | None = None,
) -> Exchange:
    """Call ``app`` once: the request body in ``chunks`` (or the messages ``incoming``)."""
    queue: list[Message] = (
        list(incoming)
        if incoming is not None
        else [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
    )
    exchange = Exchange()

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        exchange.messages.append(message)

    await app(scope, receive, send)
    return exchange


async def read_body(receive: Receive) -> bytes:
    """The whole request body."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int = 200, body: bytes = b"ok", **headers: str) -> None:
    """Send a whole response."""
    raw = [(b"content-type", b"text/plain")]
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class EchoApp:
    """A bare ASGI app answering 200 with the request body; counts its calls."""

    def __init__(self, route: str | None = None) -> None:
        self.calls = 0
        self.scopes: list[Scope] = []
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            return
        if self.route is not None:
            scope["hardening.route"] = self.route
        await respond(send, body=await read_body(receive))


def raising(exc: BaseException) -> App:
    """A bare ASGI app raising ``exc`` before responding."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def count(
    metrics: Metrics, route: str, status: int = 200, method: str = "GET", error: str = ""
) -> float:
    """How many requests ``metrics`` observed with these labels."""
    labels = {
        "http_request_method": method,
        "http_route": route,
        "http_response_status_code": str(status),
        "error_type": error,
    }
    return metrics.registry.get_sample_value(f"{DURATION}_count", labels) or 0.0


def series(metrics: Metrics) -> list[dict[str, str]]:
    """The label sets of every observed request series."""
    return [
        dict(sample.labels)
        for family in metrics.registry.collect()
        if family.name == DURATION
        for sample in family.samples
        if sample.name == f"{DURATION}_count"
    ]


def active(metrics: Metrics, method: str = "GET") -> float:
    """``http_server_active_requests`` for ``method``."""
    value = metrics.registry.get_sample_value(
        "http_server_active_requests", {"http_request_method": method}
    )
    return value or 0.0


def limiter(limits: str = "2/minute", **options: Any) -> AsyncRateLimiter:
    """An in-memory limiter on a fake clock."""
    options.setdefault("clock", FakeClock())
    return AsyncRateLimiter(limits, **options)


def has_rate_headers(response: httpx.Response) -> bool:
    """Whether any rate-limit header is present."""
    return any(name in response.headers for name in RATE_HEADERS)


# --- frameworks ---------------------------------------------------------------------------


async def sl_page(request: Request) -> Response:
    return JSONResponse({"page": request.path_params["page_id"]})


async def sl_boom(request: Request) -> Response:
    raise ValueError("boom")


async def sl_conflict(request: Request) -> Response:
    raise ConflictError("page", 1, expected_version=1, current_version=2)


async def sl_upload(request: Request) -> Response:
    return JSONResponse({"size": len(await request.body())})


def starlette_app() -> Starlette:
    """Routes, a Mount of a sub-app, an endpoint that raises and one raising ConflictError."""
    api = Starlette(routes=[Route("/pages/{page_id}", sl_page)])
    return Starlette(
        routes=[
            Route("/pages/{page_id}", sl_page, methods=["GET", "PATCH"]),
            Route("/boom", sl_boom),
            Route("/conflict", sl_conflict),
            Route("/upload", sl_upload, methods=["POST"]),
            Mount("/api", app=api),
        ]
    )


def fastapi_app() -> Any:
    """A FastAPI app with a path parameter route and a prefixed router."""
    from fastapi import APIRouter, FastAPI

    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    router = APIRouter(prefix="/v1")

    @router.get("/users/{user_id}/posts/{post_id}")
    async def post(user_id: int, post_id: int) -> dict[str, int]:
        return {"user": user_id, "post": post_id}

    api.include_router(router)
    return api


# --- MetricsMiddleware --------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_bare_app_one_observation_per_request() -> None:
    """Each request is observed once, with its method, route and status."""
    metrics = Metrics()
    app = MetricsMiddleware(EchoApp(route="/things/{id}"), metrics)
    async with client(app) as http:
        for _ in range(3):
            assert (await http.get("/things/1")).status_code == 200
        assert (await http.post("/things/2", content=b"x")).status_code == 200
    assert count(metrics, "/things/{id}") == 3
    assert count(metrics, "/things/{id}", method="POST") == 1
    assert len(series(metrics)) == 2
    assert active(metrics) == 0


@pytest.mark.anyio
async def test_metrics_bare_app_without_route_is_unmatched() -> None:
    """A bare app that names no route is reported under the one unmatched value."""
    metrics = Metrics()
    async with client(MetricsMiddleware(EchoApp(), metrics)) as http:
        for n in range(5):
            await http.get(f"/raw/{n}")
    assert count(metrics, "_unmatched") == 5
    assert len(series(metrics)) == 1


@pytest.mark.anyio
async def test_metrics_starlette_route_templates() -> None:
    """Starlette routes are reported by template, mounted ones with their prefix."""
    metrics = Metrics()
    async with client(MetricsMiddleware(starlette_app(), metrics)) as http:
        assert (await http.get("/pages/1")).status_code == 200
        assert (await http.patch("/pages/2")).status_code == 200
        assert (await http.get("/api/pages/3")).status_code == 200
    assert count(metrics, "/pages/{page_id}") == 1
    assert count(metrics, "/pages/{page_id}", method="PATCH") == 1
    assert count(metrics, "/api/pages/{page_id}") == 1


@pytest.mark.anyio
async def test_metrics_unmatched_paths_share_one_series() -> None:
    """404s for unknown paths do not mint a series per path."""
    metrics = Metrics()
    async with client(MetricsMiddleware(starlette_app(), metrics)) as http:
        for n in range(20):
            assert (await http.get(f"/nope/{n}")).status_code == 404
    assert count(metrics, "_unmatched", 404) == 20
    assert series(metrics) == [
        {
            "http_request_method": "GET",
            "http_route": "_unmatched",
            "http_response_status_code": "404",
            "error_type": "",
        }
    ]


@pytest.mark.anyio
async def test_metrics_unmatched_under_a_mount_is_the_mount_template() -> None:
    """A path under a Mount that matches nothing inside is one series: the Mount's template.

    (Not ``/api/api/{path}``: the Mount's own path is in both ``root_path`` and its template.)
    """
    metrics = Metrics()
    async with client(MetricsMiddleware(starlette_app(), metrics)) as http:
        for n in range(5):
            assert (await http.get(f"/api/nope/{n}")).status_code == 404
    assert count(metrics, "/api/{path}", 404) == 5
    assert len(series(metrics)) == 1


@pytest.mark.anyio
async def test_metrics_mounted_asgi_app_template() -> None:
    """A plain ASGI app mounted in Starlette is reported as the Mount's template."""
    metrics = Metrics()
    app = Starlette(routes=[Mount("/files", app=EchoApp())])
    async with client(MetricsMiddleware(app, metrics)) as http:
        assert (await http.get("/files/a/b.txt")).status_code == 200
    assert count(metrics, "/files/{path}") == 1


@pytest.mark.anyio
async def test_metrics_fastapi_route_templates() -> None:
    """FastAPI routes (prefixed routers too) are reported by template; 404 is unmatched."""
    metrics = Metrics()
    async with client(MetricsMiddleware(fastapi_app(), metrics)) as http:
        assert (await http.get("/items/5")).json() == {"id": 5}
        assert (await http.get("/items/six")).status_code == 422
        assert (await http.get("/v1/users/1/posts/2")).status_code == 200
        assert (await http.get("/v1/missing")).status_code == 404
    assert count(metrics, "/items/{item_id}") == 1
    assert count(metrics, "/items/{item_id}", 422) == 1
    assert count(metrics, "/v1/users/{user_id}/posts/{post_id}") == 1
    assert count(metrics, "_unmatched", 404) == 1


@pytest.mark.anyio
async def test_metrics_streaming_response_ends_at_last_chunk() -> None:
    """A streamed response is in flight until its last chunk, then observed once."""
    metrics = Metrics()
    seen: list[tuple[float, float]] = []

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
            seen.append((active(metrics), count(metrics, "_unmatched")))
        await send({"type": "http.response.body", "body": b"end", "more_body": False})
        seen.append((active(metrics), count(metrics, "_unmatched")))

    exchange = await call(MetricsMiddleware(stream, metrics), http_scope())
    assert exchange.body == b"chunkchunkchunkend"
    assert seen == [(1, 0), (1, 0), (1, 0), (0, 1)]
    assert active(metrics) == 0
    assert count(metrics, "_unmatched") == 1


@pytest.mark.anyio
async def test_metrics_app_raising_before_response() -> None:
    """An app raising before responding is a 500 with the exception's type; it propagates."""
    metrics = Metrics()
    with pytest.raises(RuntimeError, match="kaput"):
        await call(MetricsMiddleware(raising(RuntimeError("kaput")), metrics), http_scope())
    assert count(metrics, "_unmatched", 500, error="RuntimeError") == 1
    assert len(series(metrics)) == 1
    assert active(metrics) == 0


@pytest.mark.anyio
async def test_metrics_starlette_raising_records_the_exception_type() -> None:
    """Starlette sends its 500, then re-raises: the series carries the exception's type."""
    metrics = Metrics()
    async with client(MetricsMiddleware(starlette_app(), metrics), raise_errors=False) as http:
        assert (await http.get("/boom")).status_code == 500
    assert count(metrics, "/boom", 500, error="ValueError") == 1
    assert len(series(metrics)) == 1


@pytest.mark.anyio
async def test_metrics_starlette_exception_reaches_the_server() -> None:
    """The middleware does not swallow the exception the server should log."""
    async with client(MetricsMiddleware(starlette_app(), Metrics())) as http:
        with pytest.raises(ValueError, match="boom"):
            await http.get("/boom")


@pytest.mark.anyio
async def test_metrics_5xx_without_exception_reports_status() -> None:
    """A 503 answered normally is reported with the status as its error type."""
    metrics = Metrics()

    async def unavailable(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 503, b"down")

    exchange = await call(MetricsMiddleware(unavailable, metrics), http_scope())
    assert exchange.status == 503
    assert count(metrics, "_unmatched", 503, error="503") == 1


@pytest.mark.anyio
async def test_metrics_error_after_response_started_keeps_the_status() -> None:
    """A failure mid-stream is recorded with the status sent and the exception's type."""
    metrics = Metrics()

    async def broken_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await call(MetricsMiddleware(broken_stream, metrics), http_scope())
    assert count(metrics, "_unmatched", 200, error="OSError") == 1


@pytest.mark.anyio
async def test_metrics_client_disconnect_is_499() -> None:
    """A client gone before the response is 499."""
    metrics = Metrics()

    async def waits_for_body(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "http.disconnect"

    disconnect = [{"type": "http.disconnect"}]
    await call(MetricsMiddleware(waits_for_body, metrics), http_scope(), incoming=disconnect)
    assert count(metrics, "_unmatched", 499, error="disconnect") == 1
    assert active(metrics) == 0


@pytest.mark.anyio
async def test_metrics_app_returning_without_response_is_500() -> None:
    """An app that returns without answering (and no disconnect) is a 500."""
    metrics = Metrics()

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    await call(MetricsMiddleware(silent, metrics), http_scope())
    assert count(metrics, "_unmatched", 500, error="no_response") == 1


@pytest.mark.anyio
async def test_metrics_exclude_paths() -> None:
    """Excluded paths are neither observed nor counted as active."""
    metrics = Metrics()
    app = MetricsMiddleware(EchoApp(), metrics, exclude_paths=["/healthz", "/metrics/**"])
    async with client(app) as http:
        await http.get("/healthz")
        await http.get("/metrics/x/y")
        await http.get("/healthz/extra")
    assert count(metrics, "_unmatched") == 1


@pytest.mark.anyio
async def test_metrics_lifespan_passes_through() -> None:
    """Lifespan messages reach the app untouched and nothing is observed."""
    metrics = Metrics()
    app = EchoApp()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    exchange = await call(
        MetricsMiddleware(app, metrics),
        scope,
        incoming=[{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in exchange.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert app.scopes == [scope]
    assert series(metrics) == []


# --- the full stack: pass-through of non-HTTP scopes --------------------------------------


def full_stack(app: App, metrics: Metrics | None = None, **rate: Any) -> App:
    """BodyLimit(Metrics(RateLimit(Error(app)))), the documented order."""
    rate.setdefault("limiter", limiter("1000/minute"))
    return BodyLimitMiddleware(
        MetricsMiddleware(RateLimitMiddleware(ErrorMiddleware(app), **rate), metrics or Metrics()),
        max_bytes=10_000,
    )


@pytest.mark.anyio
async def test_full_stack_passes_lifespan_scope_through() -> None:
    """The whole stack hands lifespan to the app: same scope object, every message."""
    app = EchoApp()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    exchange = await call(
        full_stack(app),
        scope,
        incoming=[{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert app.scopes[0] is scope
    assert [m["type"] for m in exchange.messages][-1] == "lifespan.shutdown.complete"


@pytest.mark.anyio
async def test_full_stack_passes_websocket_scope_through() -> None:
    """A websocket scope is neither limited nor observed; the app sees it as sent."""
    metrics = Metrics()
    app = EchoApp()
    scope: Scope = {**http_scope(), "type": "websocket", "subprotocols": []}
    del scope["method"]
    stack = full_stack(app, metrics, limiter=limiter("1/minute"))
    for _ in range(3):
        exchange = await call(stack, scope, incoming=[{"type": "websocket.connect"}])
        assert exchange.messages == [{"type": "websocket.accept"}]
    assert all(seen is scope for seen in app.scopes)
    assert series(metrics) == []


# --- RateLimitMiddleware ------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_limit_429_with_headers() -> None:
    """Allowed responses carry the rate headers; the denial is problem+json with Retry-After."""
    app = EchoApp()
    async with client(RateLimitMiddleware(app, limiter("2/minute"))) as http:
        first, second, third = [await http.get("/x") for _ in range(3)]
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert app.calls == 2
    for response in (first, second, third):
        for name in RATE_HEADERS:
            assert name in response.headers, name
        assert response.headers["x-ratelimit-limit"] == "2"
    assert [r.headers["x-ratelimit-remaining"] for r in (first, second, third)] == ["1", "0", "0"]
    assert "retry-after" not in first.headers
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["content-type"] == PROBLEM_JSON
    body = third.json()
    assert (body["status"], body["title"]) == (429, "Too many requests")
    assert body["limit"] == "2/60s"


@pytest.mark.anyio
async def test_rate_limit_keeps_app_rate_headers() -> None:
    """An app that reports a limit of its own (a decorator's 429) keeps its headers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, x_ratelimit_limit="999", x_other="kept")

    async with client(RateLimitMiddleware(app, limiter("5/minute"))) as http:
        response = await http.get("/")
    assert response.headers.get_list("x-ratelimit-limit") == ["999"]
    assert "ratelimit-policy" not in response.headers
    assert response.headers["x-other"] == "kept"


@pytest.mark.anyio
async def test_rate_limit_headers_can_be_turned_off() -> None:
    """``headers=False`` adds nothing to allowed responses."""
    async with client(RateLimitMiddleware(EchoApp(), limiter("5/minute"), headers=False)) as http:
        assert not has_rate_headers(await http.get("/"))


@pytest.mark.anyio
async def test_rate_limit_window_passes_on_fake_clock() -> None:
    """After the window (moved on a fake clock) the key is allowed again."""
    clock = FakeClock()
    async with client(RateLimitMiddleware(EchoApp(), limiter("1/minute", clock=clock))) as http:
        assert (await http.get("/")).status_code == 200
        denied = await http.get("/")
        assert denied.status_code == 429
        clock.advance(int(denied.headers["retry-after"]))
        assert (await http.get("/")).status_code == 200


@pytest.mark.anyio
async def test_rate_limit_head_denial_has_no_body() -> None:
    """A denied HEAD gets the 429 status and headers, without a body."""
    scope = http_scope("HEAD")
    stack = RateLimitMiddleware(EchoApp(), limiter("1/minute"))
    await call(stack, scope)
    exchange = await call(stack, scope)
    assert exchange.status == 429
    assert exchange.body == b""
    assert "retry-after" in exchange.headers


@pytest.mark.anyio
async def test_rate_limit_route_rule_applies_only_to_its_method() -> None:
    """``PATCH /pages/*`` limits PATCHes of one page segment, with counters of its own."""
    app = RateLimitMiddleware(EchoApp(), limiter("5/minute"), rules={"PATCH /pages/*": "2/minute"})
    async with client(app) as http:
        patches = [await http.patch("/pages/1") for _ in range(3)]
        assert [r.status_code for r in patches] == [200, 200, 429]
        assert patches[0].headers["x-ratelimit-limit"] == "2"  # the tighter of the two
        # the main limit counted only the two allowed PATCHes: 3 of 5 left before this GET
        gets = [await http.get("/pages/1") for _ in range(4)]
        assert [r.status_code for r in gets] == [200, 200, 200, 429]
        assert [r.headers["x-ratelimit-remaining"] for r in gets[:3]] == ["2", "1", "0"]


@pytest.mark.anyio
async def test_rate_limit_route_rule_counts_only_matching_paths() -> None:
    """Paths the rule's pattern does not match use only the main limit."""
    app = RateLimitMiddleware(EchoApp(), limiter("10/minute"), rules={"PATCH /pages/*": "1/minute"})
    async with client(app) as http:
        assert (await http.patch("/pages/1/blocks")).status_code == 200
        assert (await http.patch("/pages/1/blocks")).status_code == 200
        assert (await http.patch("/pages/1")).status_code == 200
        assert (await http.patch("/pages/2")).status_code == 429  # same IP key, same rule


@pytest.mark.anyio
async def test_rate_limit_rule_with_user_key() -> None:
    """A rule keyed by user limits each user apart; anonymous requests fall back to the IP."""
    rule = RateLimitRule(
        "POST /comments", "1/minute", key=user_key(lambda r: r.headers.get("x-user"))
    )
    app = RateLimitMiddleware(EchoApp(), None, rules=[rule])
    async with client(app) as http, client(app, peer=("198.51.100.2", 1)) as other:
        assert (await http.post("/comments", headers={"x-user": "ann"})).status_code == 200
        assert (await http.post("/comments", headers={"x-user": "bob"})).status_code == 200
        assert (await http.post("/comments", headers={"x-user": "ann"})).status_code == 429
        assert (await http.post("/comments")).status_code == 200
        assert (await http.post("/comments")).status_code == 429
        assert (await other.post("/comments")).status_code == 200
        assert (await http.get("/comments")).status_code == 200  # not the rule's method


@pytest.mark.anyio
async def test_rate_limit_key_none_falls_back_to_ip() -> None:
    """A main key function giving None falls back to the client IP, not one shared key."""
    app = RateLimitMiddleware(
        EchoApp(), limiter("1/minute"), key=user_key(lambda r: r.headers.get("x-user"))
    )
    async with client(app) as http, client(app, peer=("198.51.100.2", 1)) as other:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/")).status_code == 429
        assert (await other.get("/")).status_code == 200
        assert (await http.get("/", headers={"x-user": "ann"})).status_code == 200


@pytest.mark.anyio
async def test_rate_limit_tiers_from_a_header() -> None:
    """The tier comes from a header; an unlimited tier is never limited and gets no headers."""
    app = RateLimitMiddleware(
        EchoApp(),
        limiter("1/minute", tiers={"pro": 3, "unlimited": None}),
        tier=lambda r: r.headers.get("x-tier"),
    )
    async with client(app) as http:
        unlimited = [await http.get("/", headers={"x-tier": "unlimited"}) for _ in range(20)]
        assert all(r.status_code == 200 and not has_rate_headers(r) for r in unlimited)
    async with client(app, peer=("198.51.100.3", 1)) as http:
        pro = [await http.get("/", headers={"x-tier": "pro"}) for _ in range(4)]
        assert [r.status_code for r in pro] == [200, 200, 200, 429]
        assert pro[0].headers["x-ratelimit-limit"] == "3"
    async with client(app, peer=("198.51.100.4", 1)) as http:
        assert [(await http.get("/")).status_code for _ in range(2)] == [200, 429]


@pytest.mark.anyio
async def test_rate_limit_cost_function() -> None:
    """A cost function charges expensive requests more."""
    app = RateLimitMiddleware(
        EchoApp(), limiter("5/minute"), cost=lambda r: 3 if r.method == "POST" else 1
    )
    async with client(app) as http:
        post = await http.post("/", content=b"x")
        assert post.headers["x-ratelimit-remaining"] == "2"
        assert (await http.post("/", content=b"x")).status_code == 429
        get = await http.get("/")
        assert (get.status_code, get.headers["x-ratelimit-remaining"]) == (200, "1")


@pytest.mark.anyio
async def test_rate_limit_exempt_paths() -> None:
    """Exempt paths are never limited, never charged and get no headers."""
    app = RateLimitMiddleware(
        EchoApp(), limiter("2/minute"), exempt_paths=["/healthz", "/static/**"]
    )
    async with client(app) as http:
        for path in ["/healthz"] * 10 + ["/static/a/b.css"] * 10:
            response = await http.get(path)
            assert response.status_code == 200
            assert not has_rate_headers(response)
        assert (await http.get("/")).headers["x-ratelimit-remaining"] == "1"


@pytest.mark.anyio
async def test_rate_limit_bypass_token_header_and_bearer() -> None:
    """The exact token in the bypass header or as a bearer token skips the limit."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), bypass=TOKEN)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/")).status_code == 429
        for _ in range(3):
            via_header = await http.get("/", headers={"X-RateLimit-Bypass": TOKEN})
            assert via_header.status_code == 200
            assert not has_rate_headers(via_header)
            bearer = await http.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert bearer.status_code == 200


@pytest.mark.anyio
async def test_rate_limit_bypass_custom_header() -> None:
    """``bypass_header`` names the header carrying the token."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), bypass=TOKEN, bypass_header="X-Admin")
    async with client(app) as http:
        await http.get("/")
        assert (await http.get("/", headers={"x-admin": TOKEN})).status_code == 200
        assert (await http.get("/", headers={"X-RateLimit-Bypass": TOKEN})).status_code == 429


def _near_misses(token: str) -> list[str]:
    changed = [
        token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1 :] for i in range(len(token))
    ]
    return [*changed, token[:-1], token + "x", token[1:], "x" + token, token.upper(), ""]


@pytest.mark.anyio
async def test_rate_limit_bypass_near_miss_tokens_are_limited() -> None:
    """A token wrong in any one character, or one character short or long, is refused."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), bypass=TOKEN)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
        for guess in _near_misses(TOKEN):
            assert (await http.get("/", headers={"X-RateLimit-Bypass": guess})).status_code == 429
            bearer = await http.get("/", headers={"Authorization": f"Bearer {guess}"})
            assert bearer.status_code == 429, guess


@pytest.mark.anyio
async def test_rate_limit_bypass_token_other_schemes_refused() -> None:
    """The token under another auth scheme or a repeated bypass header does not bypass."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), bypass=TOKEN)
    scope_headers = [
        [(b"authorization", f"Basic {TOKEN}".encode())],
        [(b"authorization", TOKEN.encode())],
        [(b"x-ratelimit-bypass", TOKEN.encode()), (b"x-ratelimit-bypass", b"other")],
    ]
    await call(app, http_scope())
    for headers in scope_headers:
        assert (await call(app, http_scope(headers=headers))).status == 429


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_rate_limit_bypass_callable(kind: str) -> None:
    """A bypass function (sync or async) returning true skips the limit."""

    def sync_bypass(request: RequestInfo) -> bool:
        return request.headers.get("x-internal") == "yes"

    async def async_bypass(request: RequestInfo) -> bool:
        return request.headers.get("x-internal") == "yes"

    bypass = sync_bypass if kind == "sync" else async_bypass
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), bypass=bypass)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/")).status_code == 429
        assert (await http.get("/", headers={"x-internal": "no"})).status_code == 429
        for _ in range(3):
            assert (await http.get("/", headers={"x-internal": "yes"})).status_code == 200


def test_rate_limit_short_bypass_token_refused() -> None:
    """A bypass token under 16 characters is a configuration error."""
    with pytest.raises(ConfigurationError, match="16"):
        RateLimitMiddleware(EchoApp(), "5/minute", bypass="too-short")


def test_rate_limit_sync_limiter_refused() -> None:
    """The ASGI middleware refuses a blocking RateLimiter (it would block the loop)."""
    with pytest.raises(ConfigurationError, match="AsyncRateLimiter"):
        RateLimitMiddleware(EchoApp(), RateLimiter("5/minute"))


def test_rate_limit_sync_limiter_in_rule_refused() -> None:
    """A blocking limiter given to a rule is refused as well."""
    rule = RateLimitRule("/x", RateLimiter("5/minute"))
    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(EchoApp(), None, rules=[rule])


@pytest.mark.anyio
async def test_rate_limit_spoofed_forwarded_for_is_ignored() -> None:
    """X-Forwarded-For from an untrusted peer does not change the key."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), trusted_proxies=["10.0.0.0/8"])
    async with client(app) as http:
        assert (await http.get("/", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 200
        assert (await http.get("/", headers={"x-forwarded-for": "2.2.2.2"})).status_code == 429
        assert (await http.get("/")).status_code == 429


@pytest.mark.anyio
async def test_rate_limit_trusted_proxy_forwarded_for_is_the_client() -> None:
    """From a trusted proxy, the X-Forwarded-For client is the key."""
    app = RateLimitMiddleware(EchoApp(), limiter("1/minute"), trusted_proxies=["127.0.0.1"])
    async with client(app, peer=("127.0.0.1", 123)) as http:
        assert (await http.get("/", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 200
        assert (await http.get("/", headers={"x-forwarded-for": "2.2.2.2"})).status_code == 200
        assert (await http.get("/", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 429
        # a client cannot prepend a hop: the rightmost untrusted address is the client
        spoof = await http.get("/", headers={"x-forwarded-for": "9.9.9.9, 2.2.2.2"})
        assert spoof.status_code == 429


@pytest.mark.anyio
async def test_rate_limit_on_real_redis(async_redis_client: Any, redis_prefix: str) -> None:
    """On real Redis: the limit, a route rule and their counters under the test's prefix."""
    prefix = redis_prefix.rstrip(":")
    redis_limiter = AsyncRateLimiter("3/minute", storage=async_redis_client, key_prefix=prefix)
    app = RateLimitMiddleware(EchoApp(), redis_limiter, rules={"POST /pages/*": "1/minute"})
    async with client(app) as http:
        assert (await http.post("/pages/1")).status_code == 200
        denied = await http.post("/pages/1")
        assert denied.status_code == 429
        assert denied.headers["content-type"] == PROBLEM_JSON
        assert int(denied.headers["retry-after"]) >= 1
        gets = [await http.get("/pages/1") for _ in range(3)]
        assert [r.status_code for r in gets] == [200, 200, 429]
        assert gets[0].headers["x-ratelimit-remaining"] == "1"
    keys = [key.decode() async for key in async_redis_client.scan_iter(match=f"{prefix}*")]
    assert any(key.startswith(f"{prefix}:rl:{{ip:{PEER[0]}}}") for key in keys), keys
    assert any(key.startswith(f"{prefix}:POST%20/pages/*:rl:{{ip:") for key in keys), keys


@pytest.mark.anyio
async def test_rate_limit_real_redis_spoofed_forwarded_for(
    async_redis_client: Any, redis_prefix: str
) -> None:
    """On Redis too, spoofed X-Forwarded-For values share the peer's counter."""
    redis_limiter = AsyncRateLimiter(
        "2/minute", storage=async_redis_client, key_prefix=redis_prefix.rstrip(":")
    )
    app = RateLimitMiddleware(EchoApp(), redis_limiter)
    async with client(app) as http:
        statuses = [
            (await http.get("/", headers={"x-forwarded-for": f"10.1.1.{n}"})).status_code
            for n in range(4)
        ]
    assert statuses == [200, 200, 429, 429]


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "statuses"), [("allow", {200}), ("deny", {503})])
async def test_rate_limit_unreachable_redis(mode: str, statuses: set[int]) -> None:
    """A Redis nobody listens on: ``allow`` lets requests through, ``deny`` answers 503."""
    dead = AsyncRateLimiter(
        "2/minute",
        storage=f"redis://127.0.0.1:{free_port()}/0",
        on_backend_error=mode,  # type: ignore[arg-type]
    )
    try:
        async with client(RateLimitMiddleware(EchoApp(), dead)) as http:
            responses = [await http.get("/") for _ in range(5)]
    finally:
        await dead.aclose()
    assert {r.status_code for r in responses} == statuses
    if mode == "deny":
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses)
        assert all(r.headers["content-type"] == PROBLEM_JSON for r in responses)


# --- ErrorMiddleware ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "members"),
    [
        (
            ConflictError("page", 7, expected_version=3, current_version=4),
            409,
            {"expected_version": 3, "current_version": 4, "entity": "page", "key": 7},
        ),
        (PreconditionFailed('"v1"', '"v2"'), 412, {"current_etag": '"v2"'}),
        (PreconditionRequired(), 428, {"header": "If-Match"}),
        (InvalidPatch("unknown op", op_index=2, op={"op": "frob"}), 422, {"op_index": 2}),
        (MalformedBody("the body is empty"), 400, {"reason": "the body is empty"}),
        (UnsupportedMediaType("text/plain"), 415, {"media_type": "text/plain"}),
        (PatchConflict("clash", op_index=0, block_id="b1", field="/text"), 409, {"field": "/text"}),
        (NotFoundError("page", 9), 404, {"entity": "page"}),
        (PayloadTooLarge(10, 50), 413, {"max_bytes": 10}),
    ],
)
@pytest.mark.anyio
async def test_error_middleware_maps_errors(
    exc: HardeningError, status: int, members: dict[str, object]
) -> None:
    """Each hardening error is answered with its status as problem+json with its data."""
    async with client(ErrorMiddleware(raising(exc))) as http:
        response = await http.patch("/pages/7")
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status
    assert body["title"] == exc.title
    for name, value in members.items():
        assert body[name] == value


@pytest.mark.anyio
async def test_error_middleware_unsupported_media_type_accept_patch() -> None:
    """415 tells the client which patch type to use."""
    async with client(ErrorMiddleware(raising(UnsupportedMediaType("application/json")))) as http:
        response = await http.patch("/")
    assert response.headers["accept-patch"] == "application/json-patch+json"


@pytest.mark.anyio
async def test_error_middleware_server_errors_hide_the_message() -> None:
    """A 503 from BackendUnavailable shows its title, not the message naming the host."""
    exc = BackendUnavailable("redis", "redis-secret.internal:6379 refused")
    async with client(ErrorMiddleware(raising(exc))) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert "redis-secret" not in response.text


@pytest.mark.anyio
async def test_error_middleware_rate_limit_decorator_429() -> None:
    """RateLimitExceeded from ``AsyncRateLimiter.limit`` is a 429 with its headers."""
    limits = limiter("1/minute")

    @limits.limit(key="export")
    async def export() -> bytes:
        return b"data"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, body=await export())

    async with client(ErrorMiddleware(app)) as http:
        assert (await http.get("/export")).content == b"data"
        denied = await http.get("/export")
    assert denied.status_code == 429
    assert int(denied.headers["retry-after"]) >= 1
    assert denied.headers["x-ratelimit-limit"] == "1"
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert denied.json()["retry_after"] > 0


@pytest.mark.anyio
async def test_error_middleware_other_exceptions_propagate() -> None:
    """Exceptions that are not hardening's pass through untouched."""
    error = KeyError("missing")
    with pytest.raises(KeyError) as info:
        await call(ErrorMiddleware(raising(error)), http_scope())
    assert info.value is error


@pytest.mark.anyio
async def test_error_middleware_error_after_start_propagates() -> None:
    """Once the response started it cannot be changed: the error propagates as raised."""
    error = ConflictError("page", 1, expected_version=1, current_version=2)

    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise error

    exchange = Exchange()

    async def send(message: Message) -> None:
        exchange.messages.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    with pytest.raises(ConflictError) as info:
        await ErrorMiddleware(half)(http_scope(), receive, send)
    assert info.value is error
    assert [m["status"] for m in exchange.starts] == [200]


@pytest.mark.anyio
async def test_error_middleware_head_has_no_body() -> None:
    """A mapped error answering HEAD sends the status and headers only."""
    exc = ConflictError("page", 1, expected_version=1, current_version=2)
    exchange = await call(ErrorMiddleware(raising(exc)), http_scope("HEAD"))
    assert exchange.status == 409
    assert exchange.body == b""
    assert int(exchange.headers["content-length"]) > 0


@pytest.mark.anyio
async def test_error_middleware_added_inside_starlette() -> None:
    """In Starlette, add it with ``app.add_middleware(ErrorMiddleware)``.

    Starlette's outermost ``ServerErrorMiddleware`` answers any exception with a 500 and then
    re-raises it; wrapped around the whole app, ``ErrorMiddleware`` would only see an error
    whose response already started. ``add_middleware`` puts it inside ``ServerErrorMiddleware``,
    so it answers first.
    """
    app = starlette_app()
    app.add_middleware(ErrorMiddleware)
    async with client(app) as http:
        response = await http.get("/conflict")
        assert (await http.get("/pages/1")).status_code == 200
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["current_version"] == 2


@pytest.mark.anyio
async def test_error_middleware_around_starlette_cannot_help() -> None:
    """Wrapped around Starlette, the 500 was already sent: the error propagates unchanged."""
    async with client(ErrorMiddleware(starlette_app()), raise_errors=False) as http:
        assert (await http.get("/conflict")).status_code == 500
    async with client(ErrorMiddleware(starlette_app())) as http:
        with pytest.raises(ConflictError):
            await http.get("/conflict")


@pytest.mark.anyio
async def test_error_middleware_non_http_passthrough() -> None:
    """Lifespan is not wrapped: an error there propagates as is."""
    with pytest.raises(ConflictError):
        await call(
            ErrorMiddleware(raising(ConflictError("x", 1, expected_version=1, current_version=2))),
            {"type": "lifespan"},
            incoming=[{"type": "lifespan.startup"}],
        )


# --- BodyLimitMiddleware ------------------------------------------------------------------


@pytest.mark.anyio
async def test_body_limit_declared_length_over_is_413_before_the_app() -> None:
    """A Content-Length over the limit is refused without calling the app."""
    app = EchoApp()
    async with client(BodyLimitMiddleware(app, max_bytes=100)) as http:
        response = await http.post("/", content=b"x" * 101)
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["max_bytes"] == 100
    assert app.calls == 0


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"abc")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"+5")],
        [(b"content-length", b"1" * 30)],
        [(b"content-length", b"5, 6")],
        [(b"content-length", b"\xef\xbc\x95")],  # fullwidth five, in UTF-8
        [(b"content-length", b"5"), (b"content-length", b"6")],
    ],
)
@pytest.mark.anyio
async def test_body_limit_malformed_length_is_400(headers: list[tuple[bytes, bytes]]) -> None:
    """A malformed (or conflicting repeated) Content-Length is 400; the app is not called."""
    app = EchoApp()
    exchange = await call(
        BodyLimitMiddleware(app, max_bytes=100), http_scope("POST", headers=headers)
    )
    assert exchange.status == 400
    assert exchange.headers["content-type"] == PROBLEM_JSON
    assert app.calls == 0


@pytest.mark.anyio
async def test_body_limit_equal_repeated_lengths_are_one() -> None:
    """The same Content-Length sent twice is one valid length."""
    headers = [(b"content-length", b"3"), (b"content-length", b"3")]
    exchange = await call(
        BodyLimitMiddleware(EchoApp(), max_bytes=100), http_scope("POST", headers=headers), [b"abc"]
    )
    assert (exchange.status, exchange.body) == (200, b"abc")


@pytest.mark.anyio
async def test_body_limit_streamed_body_over_is_413() -> None:
    """Without Content-Length, the body is counted as read; past the limit it is 413."""
    received: list[bytes] = []

    async def reader(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message["body"])
            if not message.get("more_body"):
                break
        await respond(send)

    chunks = [b"a" * 40] * 5
    exchange = await call(BodyLimitMiddleware(reader, max_bytes=100), http_scope("POST"), chunks)
    assert exchange.status == 413
    assert exchange.json()["status"] == 413
    assert received == [b"a" * 40] * 2  # the chunk crossing the limit never reached the app


@pytest.mark.anyio
async def test_body_limit_streamed_body_under_reaches_the_app_intact() -> None:
    """An allowed streamed body reaches the app byte for byte, chunking kept."""
    payload = os.urandom(3000)
    chunks = [payload[i : i + 700] for i in range(0, len(payload), 700)]
    exchange = await call(
        BodyLimitMiddleware(EchoApp(), max_bytes=3000), http_scope("POST"), chunks
    )
    assert exchange.status == 200
    assert exchange.body == payload


@pytest.mark.anyio
async def test_body_limit_allowed_body_is_byte_identical() -> None:
    """An allowed body with Content-Length reaches the app unchanged (all byte values)."""
    payload = bytes(range(256)) * 20
    async with client(BodyLimitMiddleware(EchoApp(), max_bytes=len(payload))) as http:
        response = await http.post("/", content=payload)
    assert response.status_code == 200
    assert response.content == payload


@pytest.mark.anyio
async def test_body_limit_zero_allows_empty_bodies() -> None:
    """``max_bytes=0`` lets bodiless requests through."""
    async with client(BodyLimitMiddleware(EchoApp(), max_bytes=0)) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.post("/", content=b"x")).status_code == 413


@pytest.mark.anyio
async def test_body_limit_head_413_has_empty_body() -> None:
    """A HEAD refused for its declared length gets 413 without a body."""
    app = EchoApp()
    scope = http_scope("HEAD", headers=[(b"content-length", b"1000")])
    exchange = await call(BodyLimitMiddleware(app, max_bytes=10), scope)
    assert exchange.status == 413
    assert exchange.body == b""
    assert app.calls == 0


@pytest.mark.anyio
async def test_body_limit_after_response_started_propagates() -> None:
    """An app that already answered and then reads too much gets the error raised."""

    async def answers_then_reads(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await read_body(receive)

    with pytest.raises(PayloadTooLarge):
        await call(
            BodyLimitMiddleware(answers_then_reads, max_bytes=5),
            http_scope("POST"),
            [b"123", b"456"],
        )


@pytest.mark.anyio
async def test_body_limit_starlette_streamed_body_with_error_middleware() -> None:
    """In Starlette, a streamed body over the limit is 413 when ErrorMiddleware is inside.

    ``PayloadTooLarge`` is raised from the app's ``receive``; Starlette's
    ``ServerErrorMiddleware`` would turn it into a 500 first, so ``ErrorMiddleware`` is added
    with ``add_middleware`` and answers 413.
    """
    app = starlette_app()
    app.add_middleware(ErrorMiddleware)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"z" * 40

    async with client(BodyLimitMiddleware(app, max_bytes=100)) as http:
        response = await http.post("/upload", content=chunks())
        small = await http.post("/upload", content=b"z" * 100)
    assert response.status_code == 413
    assert small.json() == {"size": 100}


@pytest.mark.parametrize("max_bytes", [-1, True, 1.5, "10"])
def test_body_limit_bad_max_bytes(max_bytes: Any) -> None:
    """``max_bytes`` must be a non-negative integer."""
    with pytest.raises(ConfigurationError):
        BodyLimitMiddleware(EchoApp(), max_bytes=max_bytes)


# --- metrics_app --------------------------------------------------------------------------


def _metrics_with_data() -> Metrics:
    metrics = Metrics()
    metrics.counter("widgets_total", "Widgets made.").inc()
    return metrics


@pytest.mark.anyio
async def test_metrics_app_text_format_by_default() -> None:
    """Without Accept, the Prometheus text format, Content-Type set."""
    async with client(metrics_app(_metrics_with_data())) as http:
        response = await http.get("/metrics", headers={"accept-encoding": "identity"})
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.headers["content-type"].startswith("text/plain")
    assert "widgets_total 1.0" in response.text
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.anyio
async def test_metrics_app_openmetrics_when_asked() -> None:
    """``Accept: application/openmetrics-text`` gets OpenMetrics."""
    async with client(metrics_app(_metrics_with_data())) as http:
        response = await http.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


@pytest.mark.anyio
async def test_metrics_app_gzip() -> None:
    """``Accept-Encoding: gzip`` gets a gzipped body with a matching length."""
    exchange = await call(
        metrics_app(_metrics_with_data()), http_scope(headers=[(b"accept-encoding", b"gzip")])
    )
    assert exchange.headers["content-encoding"] == "gzip"
    assert exchange.headers["content-type"].startswith("text/plain")
    assert int(exchange.headers["content-length"]) == len(exchange.body)
    assert b"widgets_total 1.0" in gzip.decompress(exchange.body)


@pytest.mark.anyio
async def test_metrics_app_head() -> None:
    """HEAD gets the headers without a body."""
    exchange = await call(metrics_app(_metrics_with_data()), http_scope("HEAD"))
    assert exchange.status == 200
    assert exchange.body == b""
    assert "content-type" in exchange.headers


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_metrics_app_other_methods_405(method: str) -> None:
    """Only GET and HEAD are answered; others get 405 with Allow."""
    async with client(metrics_app(Metrics())) as http:
        response = await http.request(method, "/metrics")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.headers["content-type"] == PROBLEM_JSON


@pytest.mark.anyio
async def test_metrics_app_bearer_token() -> None:
    """With a token, scrapes without it or with a wrong one get 401 and WWW-Authenticate."""
    token = "scrape-token-0123456789"
    async with client(metrics_app(_metrics_with_data(), auth=token)) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"authorization": f"Bearer {token}x"})
        basic = await http.get("/metrics", headers={"authorization": f"Basic {token}"})
        right = await http.get("/metrics", headers={"authorization": f"Bearer {token}"})
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "widgets_total" not in response.text
    assert right.status_code == 200
    assert "widgets_total" in right.text


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_metrics_app_callable_auth(kind: str) -> None:
    """A function of the request (sync or async) decides who may scrape."""

    def sync_auth(request: RequestInfo) -> bool:
        return request.client == "127.0.0.1"

    async def async_auth(request: RequestInfo) -> bool:
        return request.client == "127.0.0.1"

    app = metrics_app(Metrics(), auth=sync_auth if kind == "sync" else async_auth)
    async with client(app, peer=("127.0.0.1", 1)) as local, client(app) as remote:
        assert (await local.get("/metrics")).status_code == 200
        assert (await remote.get("/metrics")).status_code == 401


@pytest.mark.anyio
async def test_metrics_app_lifespan() -> None:
    """Served alone, it completes lifespan startup and shutdown."""
    exchange = await call(
        metrics_app(Metrics()),
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        incoming=[{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in exchange.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.anyio
async def test_metrics_app_closes_websockets() -> None:
    """A websocket connection is closed."""
    scope: Scope = {"type": "websocket", "path": "/metrics", "headers": []}
    exchange = await call(metrics_app(Metrics()), scope, incoming=[{"type": "websocket.connect"}])
    assert exchange.messages == [{"type": "websocket.close", "code": 1003}]


@pytest.mark.anyio
async def test_metrics_app_routed_in_starlette() -> None:
    """``Route("/metrics", metrics_app(m))`` serves the app's own request metrics."""
    metrics = Metrics()
    app = starlette_app()
    app.router.routes.append(Route("/metrics", metrics_app(metrics)))
    stack = MetricsMiddleware(app, metrics, exclude_paths=["/metrics"])
    async with client(stack) as http:
        await http.get("/pages/1")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert 'http_route="/pages/{page_id}"' in response.text
    assert 'http_route="/metrics"' not in response.text
    assert repr(metrics_app(metrics)) == "<hardening metrics_app>"


# --- health_app ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_health_app_all_ok() -> None:
    """Every check passing is 200 with each check listed; never cached."""

    async def async_ok() -> bool:
        return True

    app = health_app({"sync": lambda: True, "async": async_ok, "none": lambda: None})
    async with client(app) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"sync", "async", "none"}
    assert all(check["status"] == "ok" for check in body["checks"].values())
    assert all(check["duration_ms"] >= 0 for check in body["checks"].values())


@pytest.mark.anyio
async def test_health_app_without_checks_is_liveness() -> None:
    """No checks: 200, an empty check list."""
    async with client(health_app()) as http:
        response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok", "checks": {}})


@pytest.mark.anyio
async def test_health_app_failing_check_hides_message() -> None:
    """A raising check fails the probe; its type is reported, never its message."""

    def broken() -> bool:
        raise ConnectionRefusedError("db.secret.internal:5432 password=hunter2")

    async with client(health_app({"db": broken, "ok": lambda: True})) as http:
        response = await http.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["db"] == {
        "status": "fail",
        "duration_ms": body["checks"]["db"]["duration_ms"],
        "error": "ConnectionRefusedError",
    }
    assert body["checks"]["ok"]["status"] == "ok"
    assert "secret" not in response.text
    assert "hunter2" not in response.text


@pytest.mark.anyio
async def test_health_app_false_fails() -> None:
    """A check returning False fails."""
    async with client(health_app({"flag": lambda: False})) as http:
        response = await http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["flag"]["error"] == "check returned False"


@pytest.mark.anyio
async def test_health_app_slow_async_check_times_out() -> None:
    """An async check over the timeout fails as "timeout"; the answer does not wait for it."""

    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    timeout = 0.2
    started = time.monotonic()
    async with client(health_app({"slow": hangs, "ok": lambda: True}, timeout=timeout)) as http:
        response = await http.get("/healthz")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["checks"]["slow"]["error"] == "timeout"
    assert response.json()["checks"]["ok"]["status"] == "ok"
    assert elapsed < timeout + 10  # bounded by the timeout (a generous margin, not a perf bar)


@pytest.mark.anyio
async def test_health_app_slow_sync_check_times_out() -> None:
    """A blocking check over the timeout fails as "timeout" without holding the response."""
    release = threading.Event()

    def hangs() -> bool:
        release.wait(30)
        return True

    timeout = 0.2
    try:
        started = time.monotonic()
        async with client(health_app({"slow": hangs}, timeout=timeout)) as http:
            response = await http.get("/healthz")
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert response.status_code == 503
    assert response.json()["checks"]["slow"]["error"] == "timeout"
    assert elapsed < timeout + 10


@pytest.mark.anyio
async def test_health_app_methods_and_head() -> None:
    """GET and HEAD only; HEAD has no body."""
    app = health_app({"ok": lambda: True})
    assert (await call(app, http_scope("POST"))).status == 405
    head = await call(app, http_scope("HEAD"))
    assert (head.status, head.body) == (200, b"")


@pytest.mark.anyio
async def test_health_app_lifespan_and_websocket() -> None:
    """Served alone, it completes lifespan and closes websockets."""
    app = health_app()
    lifespan = await call(
        app,
        {"type": "lifespan"},
        incoming=[{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in lifespan.messages][-1] == "lifespan.shutdown.complete"
    websocket = await call(app, {"type": "websocket"}, incoming=[{"type": "websocket.connect"}])
    assert websocket.messages == [{"type": "websocket.close", "code": 1003}]


def test_health_app_non_callable_check_refused() -> None:
    """A check that is not callable is refused when the app is built."""
    with pytest.raises(ConfigurationError):
        health_app({"db": "SELECT 1"})  # type: ignore[dict-item]


@pytest.mark.anyio
async def test_health_app_real_redis(async_redis_client: Any, redis_client: Any) -> None:
    """``redis_check`` passes against a real Redis, asyncio and blocking clients alike."""
    app = health_app({"redis": redis_check(async_redis_client), "sync": redis_check(redis_client)})
    async with client(app) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_health_app_unreachable_redis_fails() -> None:
    """``redis_check`` on a Redis nobody listens on fails the probe."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    dead = redis.asyncio.Redis(
        port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        async with client(health_app({"redis": redis_check(dead)}, timeout=5)) as http:
            response = await http.get("/healthz")
    finally:
        await dead.aclose()
    assert response.status_code == 503
    assert response.json()["checks"]["redis"]["error"] == "ConnectionError"


@pytest.mark.anyio
async def test_health_app_sql_engines(sqlite_engine: Any) -> None:
    """``sql_check`` passes on a real SQLite engine."""
    async with client(health_app({"sqlite": sql_check(sqlite_engine)})) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_health_app_postgres_engines(pg_engine: Any, pg_async_engine: Any) -> None:
    """``sql_check`` passes on real PostgreSQL, blocking and async engines."""
    app = health_app({"pg": sql_check(pg_engine), "pg_async": sql_check(pg_async_engine)})
    async with client(app) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_health_app_unreachable_database_fails() -> None:
    """``sql_check`` on a database nobody listens on fails the probe."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    try:
        async with client(health_app({"db": sql_check(engine)}, timeout=5)) as http:
            response = await http.get("/healthz")
    finally:
        engine.dispose()
    assert response.status_code == 503
    assert response.json()["checks"]["db"]["error"] == "OperationalError"


# --- hostile inputs through the full stack ------------------------------------------------

ALLOWED = {200, 400, 413, 429}


@pytest.mark.anyio
async def test_hostile_huge_headers() -> None:
    """100 KB header values (in the headers the stack reads, too) do not break anything."""
    big = b"x" * 100_000
    headers = [
        (b"x-big", big),
        (b"x-forwarded-for", big),
        (b"authorization", b"Bearer " + big),
        (b"x-ratelimit-bypass", big),
        (b"accept", big),
    ]
    exchange = await call(full_stack(EchoApp(), bypass=TOKEN), http_scope(headers=headers))
    assert exchange.status == 200


@pytest.mark.anyio
async def test_hostile_invalid_utf8_path_and_header_bytes() -> None:
    """Latin-1 bytes 0x80-0xff in the raw path and header values are fine."""
    metrics = Metrics()
    high = bytes(range(0x80, 0x100))
    stack = full_stack(EchoApp(), metrics, key=lambda r: r.headers.get("x-user"))
    for scope in [
        http_scope(path="/\udcff\udcfe", raw_path=b"/\xff\xfe"),
        http_scope(path=high.decode("latin-1"), raw_path=b"/" + high),
        http_scope(headers=[(b"x-user", high), (b"x-forwarded-for", high), (high, high)]),
        http_scope(headers=[(b"content-type", high), (b"host", high)]),
    ]:
        assert (await call(stack, scope)).status == 200
    assert count(metrics, "_unmatched") == 4


@pytest.mark.anyio
@pytest.mark.parametrize("length", [b"1" * 30, b"-5", b"", b" ", b"0x10", b"\xff"])
async def test_hostile_content_length_is_400(length: bytes) -> None:
    """Absurd Content-Length values are 400 from the outermost layer, never 500."""
    metrics = Metrics()
    scope = http_scope("POST", headers=[(b"content-length", length)])
    exchange = await call(full_stack(EchoApp(), metrics), scope)
    assert exchange.status == 400
    assert series(metrics) == []  # refused before the metrics layer


@pytest.mark.anyio
async def test_hostile_empty_host_and_no_client() -> None:
    """An empty Host, no Host at all and no peer address (a Unix socket) are served."""
    stack = full_stack(EchoApp())
    assert (await call(stack, http_scope(headers=[(b"host", b"")]))).status == 200
    assert (await call(stack, http_scope(peer=None))).status == 200


@pytest.mark.anyio
async def test_hostile_ten_thousand_forwarded_hops() -> None:
    """10,000 X-Forwarded-For hops, from a trusted proxy or not, are handled."""
    hops = b", ".join(
        b"10.%d.%d.%d" % (n >> 16 & 255, n >> 8 & 255, n & 255) for n in range(10_000)
    )
    stack = full_stack(EchoApp(), trusted_proxies=["10.0.0.0/8", "127.0.0.1"])
    for peer in [("127.0.0.1", 1), PEER]:
        scope = http_scope(headers=[(b"x-forwarded-for", hops)], peer=peer)
        assert (await call(stack, scope)).status == 200


@pytest.mark.parametrize(
    "value",
    [
        b"not-an-ip",
        b", , ,",
        b"[::1",
        b"]]]:80",
        b"1.2.3.4:99999",
        b"::::",
        b"unknown, 1.1.1.1",
        b"fe80::1%eth0",
        b"\x00\x01",
    ],
)
@pytest.mark.anyio
async def test_hostile_garbage_forwarded_for(value: bytes) -> None:
    """Garbage X-Forwarded-For from a trusted proxy never breaks the key."""
    stack = full_stack(EchoApp(), trusted_proxies=["127.0.0.1"])
    scope = http_scope(headers=[(b"x-forwarded-for", value)], peer=("127.0.0.1", 1))
    assert (await call(stack, scope)).status == 200


_HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"content-length",
            b"x-forwarded-for",
            b"authorization",
            b"x-ratelimit-bypass",
            b"x-user",
            b"x-tier",
            b"host",
            b"accept",
            b"content-type",
        ]
    ),
    st.binary(min_size=1, max_size=20),
)
_HEADER_VALUES = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"5", b"0", b"-1", b"1" * 30, b"1.1.1.1, 10.0.0.1", TOKEN.encode()]),
    st.text(max_size=30).map(lambda text: text.encode("utf-8")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=8),
    method=st.sampled_from(["GET", "POST", "HEAD", "PATCH", "BREW", ""]),
    path=st.text(max_size=20).map(lambda text: "/" + text),
    chunks=st.lists(st.binary(max_size=40), min_size=1, max_size=4),
)
@pytest.mark.anyio
async def test_hostile_headers_never_500(
    headers: list[tuple[bytes, bytes]], method: str, path: str, chunks: list[bytes]
) -> None:
    """Any header list, method, path and body through the full stack: never a 500."""
    metrics = Metrics()
    stack = BodyLimitMiddleware(
        MetricsMiddleware(
            RateLimitMiddleware(
                ErrorMiddleware(EchoApp()),
                limiter("3/minute", tiers={"unlimited": None, "pro": 2}),
                rules={"POST /**": "2/minute"},
                key=user_key(lambda r: r.headers.get("x-user")),
                tier=lambda r: r.headers.get("x-tier"),
                bypass=TOKEN,
                trusted_proxies=["10.0.0.0/8", "203.0.113.0/24"],
                exempt_paths=["/healthz"],
            ),
            metrics,
        ),
        max_bytes=64,
    )
    scope = http_scope(method, path, headers)
    for _ in range(2):
        exchange = await call(stack, scope, chunks)
        assert exchange.status in ALLOWED
        assert len(exchange.starts) == 1
    assert all(labels["error_type"] == "" for labels in series(metrics))


# --- Django over ASGI ---------------------------------------------------------------------


@pytest.fixture
def django_asgi() -> Any:
    """The shared test Django project as an ASGI app."""
    pytest.importorskip("django")
    from tests.adapters import django_app

    return django_app.asgi_application()


@pytest.mark.anyio
async def test_django_asgi_route_template(django_asgi: Any) -> None:
    """Django's matched URL pattern reaches the metrics as ``/pages/<int:pk>``."""
    metrics = Metrics()
    async with client(MetricsMiddleware(django_asgi, metrics)) as http:
        response = await http.get("/pages/5")
        missing = await http.get("/nope/1")
    assert (response.status_code, response.text) == (200, "page 5")
    assert missing.status_code == 404
    assert count(metrics, "/pages/<int:pk>") == 1
    assert count(metrics, "_unmatched", 404) == 1


@pytest.mark.anyio
async def test_django_asgi_conflict_is_409(django_asgi: Any) -> None:
    """A ConflictError raised in a Django view is a 409 problem+json."""
    from tests.adapters.django_app import CONFLICT_PK

    metrics = Metrics()
    async with client(full_stack(django_asgi, metrics)) as http:
        response = await http.get(f"/pages/{CONFLICT_PK}")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["expected_version"], body["current_version"]) == (1, 2)
    assert count(metrics, "/pages/<int:pk>", 409) == 1
