"""The response-cache middleware, ASGI (over httpx and Starlette) and WSGI (under
``wsgiref.validate``), on memory and on real Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hardening import AsyncCache, Cache, ConfigurationError, FakeClock
from hardening.adapters import asgi, wsgi
from hardening.cache.http import etag_matches, etag_of
from tests.adapters.wsgi_support import call, make_environ
from tests.conftest import RedisServer

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

Scope = MutableMapping[str, Any]


# --- a Starlette app that counts what reaches it ----------------------------------------------


def starlette_app(hits: list[str]) -> Starlette:
    """Projects API: JSON GETs, a PATCH, and responses that must never be stored."""

    async def project(request: Request) -> Response:
        hits.append(request.url.path)
        return JSONResponse({"id": request.path_params["project_id"], "n": len(hits)})

    async def patch(request: Request) -> Response:
        hits.append("PATCH")
        status = 409 if request.headers.get("x-conflict") else 200
        return JSONResponse({"saved": status == 200}, status_code=status)

    async def private(request: Request) -> Response:
        hits.append("private")
        return JSONResponse({"me": 1}, headers={"cache-control": "private"})

    async def cookie(request: Request) -> Response:
        hits.append("cookie")
        response = JSONResponse({"c": 1})
        response.set_cookie("session", "abc")
        return response

    async def missing(request: Request) -> Response:
        hits.append("404")
        return JSONResponse({"error": "nope"}, status_code=404)

    async def stream(request: Request) -> Response:
        hits.append("stream")

        async def chunks() -> Any:
            yield b"a"
            yield b"b"

        return StreamingResponse(chunks(), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/projects/{project_id}", project),
            Route("/projects/{project_id}", patch, methods=["PATCH"]),
            Route("/private", private),
            Route("/cookie", cookie),
            Route("/missing", missing),
            Route("/stream", stream),
        ]
    )


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def cached_app(hits: list[str], cache: AsyncCache | None = None, **options: Any) -> Any:
    cache = cache or AsyncCache(clock=FakeClock())
    options.setdefault(
        "paths",
        {
            "/projects/{project_id}": ["project:{project_id}"],
            **{key: ["other"] for key in ["/private", "/cookie", "/missing", "/stream"]},
        },
    )
    return asgi.CacheMiddleware(starlette_app(hits), cache, ttl=300, **options)


@pytest.fixture
def anyio_backend() -> str:
    """asyncio only."""
    return "asyncio"


@pytest.mark.anyio
async def test_asgi_miss_then_hit() -> None:
    """The first GET reaches the app (MISS) and is stored with an ETag and max-age; the second
    is answered from the cache (HIT) with the same body and headers."""
    hits: list[str] = []
    async with asgi_client(cached_app(hits)) as client:
        first = await client.get("/projects/42")
        second = await client.get("/projects/42")
    assert hits == ["/projects/42"]
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["age"] == "0"
    assert first.json() == second.json() == {"id": "42", "n": 1}
    assert first.headers["etag"] == second.headers["etag"] == etag_of(first.content)
    assert second.headers["cache-control"] == "max-age=300"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(second.content))


@pytest.mark.anyio
async def test_asgi_if_none_match_gets_304() -> None:
    """A client holding the current ETag gets 304 without a body, from the cache or on a miss."""
    hits: list[str] = []
    async with asgi_client(cached_app(hits)) as client:
        etag = (await client.get("/projects/1")).headers["etag"]
        hit = await client.get("/projects/1", headers={"if-none-match": f'W/{etag}, "x"'})
        other = await client.get("/projects/1", headers={"if-none-match": '"stale"'})
    assert (hit.status_code, hit.content) == (304, b"")
    assert hit.headers["etag"] == etag
    assert "content-type" not in hit.headers
    assert other.status_code == 200


@pytest.mark.anyio
async def test_asgi_invalidate_on_mutation() -> None:
    """A successful PATCH invalidates the project's tag before it answers; a 409 does not."""
    hits: list[str] = []
    app = cached_app(hits, invalidate_on={"PATCH /projects/{project_id}": ["project:{project_id}"]})
    async with asgi_client(app) as client:
        await client.get("/projects/7")
        await client.get("/projects/8")
        await client.patch("/projects/7", headers={"x-conflict": "1"})
        assert (await client.get("/projects/7")).headers["x-cache"] == "HIT"
        await client.patch("/projects/7")
        after = await client.get("/projects/7")
        other = await client.get("/projects/8")
    assert after.headers["x-cache"] == "MISS"
    assert after.json()["n"] == 5
    assert other.headers["x-cache"] == "HIT"


@pytest.mark.anyio
async def test_asgi_never_stores_private_cookies_errors_or_streams() -> None:
    """Cache-Control private, Set-Cookie, non-200 and unsized streams reach the app each time."""
    hits: list[str] = []
    async with asgi_client(cached_app(hits)) as client:
        for path in ("/private", "/cookie", "/missing", "/stream"):
            for _ in range(2):
                response = await client.get(path)
                assert response.headers["x-cache"] == "MISS"
                client.cookies.clear()  # a cookie would make the next request bypass
        assert (await client.get("/stream")).text == "ab"
    assert hits == ["private"] * 2 + ["cookie"] * 2 + ["404"] * 2 + ["stream"] * 3


@pytest.mark.anyio
async def test_asgi_credentials_bypass_unless_varied() -> None:
    """Requests with Authorization skip the cache; with authorization in vary, each token gets
    its own entry."""
    hits: list[str] = []
    async with asgi_client(cached_app(hits)) as client:
        for _ in range(2):
            response = await client.get("/projects/1", headers={"authorization": "Bearer a"})
            assert "x-cache" not in response.headers
    assert len(hits) == 2
    hits.clear()
    app = cached_app(hits, vary=("accept", "authorization"))
    async with asgi_client(app) as client:
        for token in ("a", "b", "a", "b"):
            await client.get("/projects/1", headers={"authorization": f"Bearer {token}"})
    assert len(hits) == 2


@pytest.mark.anyio
async def test_asgi_query_and_vary_select_entries() -> None:
    """Query strings and Accept values are parts of the key."""
    hits: list[str] = []
    async with asgi_client(cached_app(hits)) as client:
        await client.get("/projects/1?page=1")
        await client.get("/projects/1?page=2")
        await client.get("/projects/1?page=1", headers={"accept": "text/html"})
        await client.get("/projects/1?page=1")
    assert len(hits) == 3


@pytest.mark.anyio
async def test_asgi_head_and_unlisted_paths() -> None:
    """HEAD is answered from a stored GET (no body); a HEAD miss and unlisted paths pass."""
    hits: list[str] = []
    app = cached_app(hits, paths=["/projects/{project_id}"])
    async with asgi_client(app) as client:
        assert (await client.head("/projects/1")).headers["x-cache"] == "MISS"
        await client.get("/projects/1")
        head = await client.head("/projects/1")
        await client.get("/missing")
    assert head.headers["x-cache"] == "HIT"
    assert head.content == b""
    assert hits == ["/projects/1", "/projects/1", "404"]


@pytest.mark.anyio
async def test_asgi_non_http_scopes_pass() -> None:
    """Lifespan and websocket scopes go straight to the app."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = asgi.CacheMiddleware(app, AsyncCache())
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@pytest.mark.anyio
async def test_asgi_on_redis_and_when_redis_dies(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Responses are shared through Redis; with Redis dead the app answers, nothing raises."""
    server = redis_server_factory()
    hits: list[str] = []
    cache = AsyncCache(server.url, clock=FakeClock())
    async with asgi_client(cached_app(hits, cache)) as client:
        await client.get("/projects/3")
        assert (await client.get("/projects/3")).headers["x-cache"] == "HIT"
        server.kill()
        response = await client.get("/projects/3")
        assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
    assert len(hits) == 2
    assert cache.stats().errors >= 1
    await cache.aclose()


def test_configuration_errors() -> None:
    """Wrong cache kind, tags naming parameters the pattern lacks, oversize bodies."""
    with pytest.raises(ConfigurationError, match="AsyncCache"):
        asgi.CacheMiddleware(starlette_app([]), Cache())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="needs a Cache"):
        wsgi.CacheMiddleware(lambda e, s: [], AsyncCache())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="project_id"):
        asgi.CacheMiddleware(
            starlette_app([]), AsyncCache(), paths=["/p/{id}"], tags=["project:{project_id}"]
        )
    with pytest.raises(ConfigurationError, match="max_value_bytes"):
        asgi.CacheMiddleware(starlette_app([]), AsyncCache(max_value_bytes=1000))


def test_etag_matching() -> None:
    """Weak comparison, lists and the wildcard."""
    assert etag_matches('"a"', '"a"')
    assert etag_matches('W/"a"', '"a"')
    assert etag_matches('"x", "a"', '"a"')
    assert etag_matches("*", '"a"')
    assert not etag_matches(None, '"a"')
    assert not etag_matches('"b"', '"a"')


# --- WSGI ------------------------------------------------------------------------------------


def wsgi_projects(hits: list[str]) -> Any:
    """A plain WSGI app: JSON for /projects/<id>, a PUT that may conflict, a generator body."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        hits.append(f"{method} {path}")
        if method == "PUT":
            if environ.get("HTTP_X_CONFLICT"):
                start_response("409 Conflict", [("Content-Type", "text/plain")])
                return [b"conflict"]
            start_response("204 No Content", [])
            return []
        if path == "/lazy":

            def lazy() -> Iterable[bytes]:  # calls start_response on first iteration
                start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
                yield b"la"
                yield b"zy"

            return lazy()
        if path == "/written":
            write = start_response(
                "200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")]
            )
            write(b"wri")
            return [b"tten"]
        body = json.dumps({"path": path, "n": len(hits)}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if path == "/private":
            headers.append(("Cache-Control", "no-store"))
        start_response("200 OK", headers)
        return [body]

    return app


def wsgi_cached(hits: list[str], cache: Cache | None = None, **options: Any) -> Any:
    from wsgiref.validate import validator

    middleware = wsgi.CacheMiddleware(
        validator(wsgi_projects(hits)),
        cache or Cache(clock=FakeClock()),
        ttl=60,
        paths={
            "/projects/<int:project_id>": ["project:{project_id}"],
            "/lazy": None,
            "/written": None,
            "/private": None,
        },
        invalidate_on={"PUT /projects/<project_id>": ["project:{project_id}"]},
        **options,
    )
    return validator(middleware)


def test_wsgi_miss_hit_and_304() -> None:
    """MISS then HIT with the same body; If-None-Match gives 304; all under the validator."""
    hits: list[str] = []
    app = wsgi_cached(hits)
    first = call(app, make_environ("/projects/5"))
    second = call(app, make_environ("/projects/5"))
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.body == second.body
    assert second.headers["cache-control"] == "max-age=60"
    etag = second.headers["etag"]
    revalidated = call(app, make_environ("/projects/5", headers={"If-None-Match": etag}))
    assert (revalidated.status, revalidated.body) == (304, b"")
    head = call(app, make_environ("/projects/5", "HEAD"))
    assert (head.status, head.body, head.headers["x-cache"]) == (200, b"", "HIT")
    assert hits == ["GET /projects/5"]


def test_wsgi_invalidate_on_put() -> None:
    """A successful PUT invalidates the project's responses; a 409 keeps them."""
    hits: list[str] = []
    app = wsgi_cached(hits)
    call(app, make_environ("/projects/5"))
    call(app, make_environ("/projects/5", "PUT", headers={"X-Conflict": "1"}))
    assert call(app, make_environ("/projects/5")).headers["x-cache"] == "HIT"
    call(app, make_environ("/projects/5", "PUT"))
    assert call(app, make_environ("/projects/5")).headers["x-cache"] == "MISS"


def test_wsgi_lazy_written_and_no_store_bodies() -> None:
    """start_response on first iteration and write() bodies are stored whole; no-store never."""
    hits: list[str] = []
    app = wsgi_cached(hits)
    for path, body in (("/lazy", b"lazy"), ("/written", b"written")):
        assert call(app, make_environ(path)).body == body
        again = call(app, make_environ(path))
        assert (again.body, again.headers["x-cache"]) == (body, "HIT")
    for _ in range(2):
        assert call(app, make_environ("/private")).headers["x-cache"] == "MISS"
    assert hits == ["GET /lazy", "GET /written", "GET /private", "GET /private"]


def test_wsgi_closes_the_app_iterable() -> None:
    """The app's iterable is closed whether its response is stored or passed on."""
    closed: list[bool] = []

    class Body:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        def __iter__(self) -> Any:
            return iter(self.chunks)

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        length = "2" if environ["PATH_INFO"] == "/sized" else None
        headers = [("Content-Type", "text/plain")]
        if length:
            headers.append(("Content-Length", length))
        start_response("200 OK", headers)
        return Body([b"o", b"k"])

    middleware = wsgi.CacheMiddleware(app, Cache())
    assert call(middleware, make_environ("/sized")).body == b"ok"
    assert call(middleware, make_environ("/unsized")).body == b"ok"
    assert closed == [True, True]


@pytest.mark.anyio
async def test_asgi_extension_messages_release_the_held_response() -> None:
    """A storable start followed by an extension message (pathsend) is sent on, unstored."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.pathsend", "path": "/tmp/x"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    cache = AsyncCache()
    middleware = asgi.CacheMiddleware(app, cache)
    scope = {"type": "http", "method": "GET", "path": "/f", "headers": [], "query_string": b""}
    await middleware(scope, receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert (b"x-cache", b"MISS") in sent[0]["headers"]
    assert await cache.get_many(["http:/f?"]) == {}
