"""The pages service on WSGI (Flask), wired with ``hardening``'s public API only.

The same HTTP API as ``examples.pages_service.app`` (ASGI), over the same
:class:`~examples.pages_service.store.PageStore`::

    client → BodyLimit → Metrics → RateLimit (per IP; saves per user, tiers, admin bypass) →
    /metrics, /healthz (plain WSGI apps, mounted) or Flask (hardening errors → problem+json) →
    If-Match → BlockHistory.apply (optimistic lock, version + 1) + indexing job in the same
    transaction → IndexWorker (a thread of each worker process) → search index.

Serve it with gunicorn (``gunicorn -c examples/flask_pages/gunicorn.conf.py``, which starts
the indexing thread in each worker process after the fork), or ``python -m examples.flask_pages``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from examples.pages_service.limits import build_limits
from examples.pages_service.store import (
    Page,
    PageStore,
    Settings,
    check_blocks,
    make_engine,
    window_limit,
)
from hardening import (
    HardeningError,
    MalformedBody,
    Metrics,
    RateLimiter,
    etag_for,
    if_match_version,
)
from hardening.adapters import (
    parse_json_body,
    parse_patch_body,
    redis_check,
    sql_check,
)
from hardening.adapters.wsgi import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    WSGIApp,
    flask_error_handler,
    health_app,
    metrics_app,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

logger = logging.getLogger("pages_service")

MAX_BODY = 8 * 1024 * 1024  # a new 10,000-block page is 1-3 MB of JSON
EXTENSION = "pages"  # the key of the PagesService in ``app.extensions``


class PagesService:
    """Everything :func:`create_app` builds besides the Flask app; ``app.extensions["pages"]``.

    Flask has no lifespan, so the in-process worker and the shutdown are explicit:
    :meth:`start_worker` (gunicorn's ``post_worker_init`` hook calls it in each worker process),
    :meth:`close` (gunicorn's ``worker_exit``; also registered with ``atexit`` once a worker
    thread runs).

    Attributes:
        settings: the configuration.
        store: the pages, their history, jobs and search index.
        metrics: the registry ``/metrics`` exposes.
        limiters: the per-IP and the saves limiter.
        redis: the blocking Redis client both limiters share (``None`` without ``REDIS_URL``).
    """

    def __init__(
        self,
        settings: Settings,
        store: PageStore,
        metrics: Metrics,
        limiters: tuple[RateLimiter, RateLimiter],
        redis: Any = None,
        *,
        owns_engine: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.limiters = limiters
        self.redis = redis
        self._owns_engine = owns_engine
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._exit_hook = False
        self._closed = False

    @property
    def worker_running(self) -> bool:
        """Whether this process runs the indexing thread."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start_worker(self) -> bool:
        """Start the indexing thread in this process, when ``WORKER_MODE=inprocess``.

        Call it after the server forked (never in a parent that forks workers afterwards: a
        thread does not survive a fork). Idempotent per process.

        Returns:
            Whether a thread was started.
        """
        if self.settings.worker != "inprocess":
            return False
        with self._lock:
            if self._closed or self.worker_running:
                return False
            self.after_fork()
            thread = threading.Thread(
                target=self.store.indexer.run,
                kwargs={"install_signal_handlers": False},
                name="pages-index-worker",
                daemon=True,
            )
            thread.start()
            self._thread = thread
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True
        logger.info("pages service: indexing worker started in process %d", os.getpid())
        return True

    def stop_worker(self, timeout: float = 35.0) -> None:
        """Stop claiming jobs, let in-flight ones finish, join the thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            # asked again on every turn: a stop() that lands before run() has begun is
            # forgotten (run() clears the flag when it starts)
            self.store.indexer.stop()
            thread.join(0.05)
        if thread.is_alive():
            logger.warning("pages service: the indexing worker did not stop in %.0f s", timeout)

    def after_fork(self) -> None:
        """In a forked child, drop the pooled connections inherited from the parent.

        They belong to the parent's sockets (``create_app`` ran there with ``--preload``);
        ``dispose(close=False)`` forgets them without closing the parent's.
        """
        if os.getpid() != self._pid:
            self.store.engine.dispose(close=False)
            self._pid = os.getpid()

    def close(self) -> None:
        """Stop the worker and release the queue, the Redis client and an engine we made."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop_worker()
        self.store.close()
        if self.redis is not None:
            self.redis.close()
        if self._owns_engine:
            self.store.engine.dispose()
        if self._exit_hook:
            atexit.unregister(self.close)
            self._exit_hook = False


def pages_service(app: Flask) -> PagesService:
    """The :class:`PagesService` of an app made by :func:`create_app`.

    Raises:
        LookupError: the app was not made by :func:`create_app`.
    """
    service = app.extensions.get(EXTENSION)
    if not isinstance(service, PagesService):
        raise LookupError("not a flask_pages app: no PagesService in app.extensions")
    return service


def _page_response(page: Page, status: int = 200, **headers: str) -> Response:
    response = jsonify(page.to_json())
    response.status_code = status
    response.headers["ETag"] = page.etag
    response.headers.update(headers)
    return response


def _saved_response(page: Page) -> Response:
    """A save's answer: the new version and ETag; the page only with ``Prefer:
    return=representation`` (the client already holds what it sent)."""
    if "return=representation" in request.headers.get("Prefer", ""):
        return _page_response(page)
    response = jsonify({"id": page.id, "version": page.version})
    response.headers["ETag"] = page.etag
    return response


def _blocks_body() -> object:
    body = parse_json_body(request.get_data(), request.headers.get("Content-Type"))
    if not isinstance(body, dict) or "blocks" not in body:
        raise MalformedBody('expected {"blocks": [...]}')
    return body["blocks"]


def register_routes(app: Flask, store: PageStore) -> None:
    """The HTTP endpoints over ``store`` (the same as the ASGI app's ``build_routes``)."""

    @app.post("/pages")
    def create_page() -> Response:
        page = store.create(_blocks_body())
        return _page_response(page, 201, Location=f"/pages/{page.id}")

    @app.get("/pages/<page_id>")
    def get_page(page_id: str) -> Response:
        limit = window_limit(request.args.get("limit"))
        if limit is not None:  # a window of the page: ?limit=100[&after=<next_after>]
            window = store.window(page_id, limit=limit, after=request.args.get("after"))
            response = jsonify(window)
            response.headers["ETag"] = etag_for(cast(int, window["version"]))
            return response
        page = store.get(page_id)
        if request.if_none_match.contains_weak(page.etag.strip('"')):
            return Response(status=304, headers={"ETag": page.etag})
        return _page_response(page)

    @app.patch("/pages/<page_id>")
    def patch_page(page_id: str) -> Response:
        # If-Match: * gives None: the patch applies to whatever version is current, atomically
        base = if_match_version(request.headers.get("If-Match"), required=True)
        ops = parse_patch_body(request.get_data(), request.headers.get("Content-Type"))
        full = "return=representation" in request.headers.get("Prefer", "")
        return _saved_response(store.patch(page_id, ops, base, full=full))

    @app.put("/pages/<page_id>")
    def put_page(page_id: str) -> Response:
        base = if_match_version(request.headers.get("If-Match"), required=True)
        blocks = check_blocks(_blocks_body())
        return _saved_response(store.replace(page_id, blocks, base))

    @app.get("/pages/<page_id>/versions/<int:number>")
    def get_version(page_id: str, number: int) -> Response:
        return _page_response(store.get(page_id, number))

    @app.get("/search")
    def search() -> Response:
        query = request.args.get("q", "")[:200]
        return jsonify({"query": query, "results": store.search(query)})


def _labelled(route: str, app: WSGIApp) -> WSGIApplication:
    """``app`` reporting ``route`` as its template to ``MetricsMiddleware``."""

    def labelled(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["hardening.route"] = route
        return app(environ, start_response)

    return labelled


def create_app(
    settings: Settings | None = None,
    *,
    engine: sa.Engine | None = None,
    metrics: Metrics | None = None,
    start_worker: bool = True,
) -> Flask:
    """Build the whole service: the Flask app with the ``hardening`` middleware around it.

    The tables are created here. The :class:`PagesService` is ``app.extensions["pages"]``
    (:func:`pages_service`).

    Args:
        settings: the configuration (default: from the environment).
        engine: the database engine (default: built from ``settings.database_url`` and
            disposed by :meth:`PagesService.close`).
        metrics: the registry (default: a new one).
        start_worker: start the indexing thread now when ``settings.worker`` is
            ``inprocess``. Pass ``False`` when the app is created before the server forks its
            workers, and call :meth:`PagesService.start_worker` in each (``gunicorn.conf.py``
            does, in ``post_worker_init``).

    Returns:
        The Flask app; its ``wsgi_app`` is wrapped in the middleware.
    """
    settings = settings or Settings.from_env()
    owns_engine = engine is None
    engine = engine if engine is not None else make_engine(settings.database_url)
    metrics = metrics or Metrics()
    store = PageStore(engine, metrics=metrics)
    store.create_schema()

    redis_client: Any = None
    if settings.redis_url:
        import redis

        # blocking pool: wait for a free connection rather than fail (and let requests through)
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=100, timeout=2.0
        )
        redis_client = redis.Redis.from_pool(pool)
    storage: object = redis_client if redis_client is not None else "memory://"
    limits = build_limits(RateLimiter, settings, storage, metrics)
    checks: dict[str, Callable[[], object]] = {"database": sql_check(engine)}
    if redis_client is not None:
        checks["redis"] = redis_check(redis_client)

    app = Flask(__name__)
    app.register_error_handler(HardeningError, flask_error_handler)
    register_routes(app, store)
    service = PagesService(
        settings,
        store,
        metrics,
        (limits.per_ip, limits.saves),
        redis_client,
        owns_engine=owns_engine,
    )
    app.extensions[EXTENSION] = service

    mounted = DispatcherMiddleware(
        app.wsgi_app,
        {
            "/metrics": _labelled("/metrics", metrics_app(metrics)),
            "/healthz": _labelled("/healthz", health_app(checks, timeout=2.0)),
        },
    )
    limited = RateLimitMiddleware(
        cast("WSGIApp", mounted), limits.per_ip, **limits.middleware_options(settings)
    )
    observed = MetricsMiddleware(limited, metrics, exclude_paths=["/metrics"])
    app.wsgi_app = BodyLimitMiddleware(observed, max_bytes=MAX_BODY)  # type: ignore[method-assign]

    logger.info("pages service (WSGI): %s", settings.describe())
    if start_worker:
        service.start_worker()
    return app
