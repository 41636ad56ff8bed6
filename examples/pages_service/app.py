"""The pages service on ASGI (Starlette), wired with ``hardening``'s public API only.

client → BodyLimit → Metrics → RateLimit (per IP; saves per user, tiers, admin bypass) →
Starlette (ErrorMiddleware inside) → If-Match → BlockHistory.apply (optimistic lock,
version + 1) + indexing job in the same transaction → IndexWorker → search index.

Run it with ``python -m examples.pages_service`` (see ``__main__``), or under uvicorn with
``uvicorn --factory examples.pages_service.app:app_from_env``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.pages_service.limits import build_limits
from examples.pages_service.store import (
    MAX_BODY,
    Page,
    PageStore,
    Settings,
    check_blocks,
    make_engine,
    window_limit,
)
from hardening import (
    AsyncRateLimiter,
    MalformedBody,
    Metrics,
    check_if_none_match,
    etag_for,
    if_match_version,
)
from hardening.adapters import (
    parse_json_body,
    parse_patch_body,
    redis_check,
    sql_check,
)
from hardening.adapters.asgi import (
    ASGIApp,
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    health_app,
    metrics_app,
)

logger = logging.getLogger("pages_service")


def _page_response(page: Page, status: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(page.to_json(), status_code=status, headers={"ETag": page.etag, **headers})


def _saved_response(request: Request, page: Page) -> JSONResponse:
    """A save's answer: the new version and ETag; the blocks only if asked for.

    The client already holds what it sent, so echoing a large page back is waste; RFC 7240's
    ``Prefer: return=representation`` asks for it.
    """
    if "return=representation" in request.headers.get("prefer", ""):
        return _page_response(page)
    body = {"id": page.id, "version": page.version}
    return JSONResponse(body, headers={"ETag": page.etag})


def build_routes(store: PageStore) -> list[Route]:
    """The HTTP endpoints over ``store``; blocking store calls run in the thread pool."""

    async def create_page(request: Request) -> Response:
        body = parse_json_body(await request.body(), request.headers.get("content-type"))
        if not isinstance(body, dict) or "blocks" not in body:
            raise MalformedBody('expected {"blocks": [...]}')
        page = await run_in_threadpool(store.create, body["blocks"])
        return _page_response(page, 201, Location=f"/pages/{page.id}")

    async def get_page(request: Request) -> Response:
        limit = window_limit(request.query_params.get("limit"))
        if limit is not None:  # a window of the page: ?limit=100[&after=<next_after>]
            window = await run_in_threadpool(
                functools.partial(
                    store.window,
                    request.path_params["page_id"],
                    limit=limit,
                    after=request.query_params.get("after"),
                )
            )
            version = window["version"]
            assert isinstance(version, int)
            return JSONResponse(window, headers={"ETag": etag_for(version)})
        head, body = await run_in_threadpool(store.get_json, request.path_params["page_id"])
        etag = etag_for(head)
        if check_if_none_match(request.headers.get("if-none-match"), head):  # weak comparison
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag})

    async def patch_page(request: Request) -> Response:
        # If-Match: * gives None: the patch applies to whatever version is current, atomically
        base = if_match_version(request.headers.get("if-match"), required=True)
        ops = parse_patch_body(await request.body(), request.headers.get("content-type"))
        page_id = request.path_params["page_id"]
        full = "return=representation" in request.headers.get("prefer", "")
        page = await run_in_threadpool(
            functools.partial(store.patch, page_id, ops, base, full=full)
        )
        return _saved_response(request, page)

    async def put_page(request: Request) -> Response:
        base = if_match_version(request.headers.get("if-match"), required=True)
        body = parse_json_body(await request.body(), request.headers.get("content-type"))
        if not isinstance(body, dict) or "blocks" not in body:
            raise MalformedBody('expected {"blocks": [...]}')
        blocks = check_blocks(body["blocks"])
        page_id = request.path_params["page_id"]
        page = await run_in_threadpool(store.replace, page_id, blocks, base)
        return _saved_response(request, page)

    async def get_patches(request: Request) -> Response:
        since = request.query_params.get("since", "")
        if not since.isascii() or not since.isdigit() or len(since) > 12:
            raise MalformedBody("since must be a version number")
        changes = await run_in_threadpool(
            store.patches_since, request.path_params["page_id"], int(since)
        )
        version = changes["version"]
        assert isinstance(version, int)
        return JSONResponse(changes, headers={"ETag": etag_for(version)})

    async def get_version(request: Request) -> Response:
        page_id, number = request.path_params["page_id"], request.path_params["number"]
        page = await run_in_threadpool(store.get, page_id, number)
        return _page_response(page)

    async def search(request: Request) -> Response:
        query = request.query_params.get("q", "")[:200]
        results = await run_in_threadpool(store.search, query)
        return JSONResponse({"query": query, "results": results})

    return [
        Route("/pages", create_page, methods=["POST"]),
        Route("/pages/{page_id}", get_page, methods=["GET"]),
        Route("/pages/{page_id}", patch_page, methods=["PATCH"]),
        Route("/pages/{page_id}", put_page, methods=["PUT"]),
        Route("/pages/{page_id}/versions/{number:int}", get_version, methods=["GET"]),
        Route("/pages/{page_id}/patches", get_patches, methods=["GET"]),
        Route("/search", search, methods=["GET"]),
    ]


class InProcessWorker:
    """Runs the indexing worker in a thread of the web process (``WORKER_MODE=inprocess``)."""

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self.thread = threading.Thread(
            target=self.store.indexer.run,
            kwargs={"install_signal_handlers": False},
            name="pages-index-worker",
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        """Stop claiming, let in-flight jobs finish, join the thread."""
        if self.thread is not None:
            self.store.indexer.stop()
            self.thread.join(timeout=35)
            self.thread = None


def create_app(
    settings: Settings | None = None,
    *,
    engine: sa.Engine | None = None,
    metrics: Metrics | None = None,
) -> ASGIApp:
    """Build the whole service: the Starlette app inside the ``hardening`` middleware.

    Args:
        settings: the configuration (default: from the environment).
        engine: the database engine (default: built from ``settings.database_url``).
        metrics: the registry (default: a new one).

    Returns:
        The ASGI app; its lifespan creates the tables and starts/stops the in-process worker.
    """
    settings = settings or Settings.from_env()
    engine = engine if engine is not None else make_engine(settings.database_url)
    metrics = metrics or Metrics()
    store = PageStore(engine, metrics=metrics)
    worker = InProcessWorker(store) if settings.worker == "inprocess" else None

    redis_client: Any = None
    if settings.redis_url:
        import redis.asyncio

        # a blocking pool: past max_connections, wait for a free one rather than fail (a
        # failing limiter storage would switch the limits off: on_backend_error="allow")
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=100, timeout=2.0
        )
        redis_client = redis.asyncio.Redis.from_pool(pool)
    storage: object = redis_client if redis_client is not None else "memory://"
    limits = build_limits(AsyncRateLimiter, settings, storage, metrics)

    checks: dict[str, Any] = {"database": sql_check(engine)}
    if redis_client is not None:
        checks["redis"] = redis_check(redis_client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(store.create_schema)
        logger.info("pages service: %s", settings.describe())
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await run_in_threadpool(worker.stop)
            store.close()
            if redis_client is not None:
                await redis_client.aclose()

    app = Starlette(
        routes=[
            *build_routes(store),
            Route("/metrics", metrics_app(metrics)),
            Route("/healthz", health_app(checks, timeout=2.0)),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(ErrorMiddleware)  # inside Starlette's error handling, see the docs
    app.state.store = store
    app.state.metrics = metrics

    limited = RateLimitMiddleware(app, limits.per_ip, **limits.middleware_options(settings))
    observed = MetricsMiddleware(limited, metrics, exclude_paths=["/metrics"])
    return BodyLimitMiddleware(observed, max_bytes=MAX_BODY)


def app_from_env() -> ASGIApp:
    """The app configured from the environment (for ``uvicorn --factory``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app(Settings.from_env())
