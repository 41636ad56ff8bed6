"""Pure ASGI middleware and apps: rate limits, metrics, errors, body limits, caching, /metrics.

Every middleware is a plain class: ``__init__`` does the setup once, ``__call__`` only
branches, non-HTTP scopes (lifespan, websocket) pass straight through, responses are changed by
wrapping ``send``, and per-request state lives in local variables. No ``BaseHTTPMiddleware``.
The order that reports everything (outermost first)::

    app = BodyLimitMiddleware(
        MetricsMiddleware(RateLimitMiddleware(ErrorMiddleware(app), limiter), metrics),
        max_bytes=1_000_000,
    )

The WSGI twins in :mod:`hardening.adapters.wsgi` have the same names and options.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from hardening.adapters._http import (
    UNAUTHORIZED,
    ASGIHeaders,
    HealthReport,
    PathMatcher,
    RateLimitPlan,
    RateLimitRule,
    answerable,
    asgi_request_info,
    asgi_route,
    bearer_ok,
    binding_headers,
    check_names,
    error_response,
    method_not_allowed,
    parse_content_length,
)
from hardening.cache import AsyncCache
from hardening.cache.http import CachedResponse, ResponseCachePlan
from hardening.errors import ConfigurationError, HardeningError, MalformedBody, PayloadTooLarge
from hardening.ratelimit import AsyncRateLimiter, RequestInfo

if TYPE_CHECKING:
    from hardening.adapters._http import CheckResult, Cost, HeaderList, Tier
    from hardening.cache.http import TagsArg
    from hardening.cache.policy import TTL
    from hardening.metrics import Metrics
    from hardening.ratelimit import KeyFunc, TrustedProxies

__all__ = [
    "ASGIApp",
    "BodyLimitMiddleware",
    "CacheMiddleware",
    "ErrorMiddleware",
    "MetricsMiddleware",
    "RateLimitMiddleware",
    "RateLimitRule",
    "health_app",
    "metrics_app",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _respond(
    send: Send, response: tuple[int, HeaderList, bytes], *, head: bool = False
) -> None:
    status, headers, body = response
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _raw_headers(headers),
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def _header(scope: Scope, name: bytes) -> str | None:
    """A header's value; repeated fields joined with ``", "`` (RFC 9110 §5.3), as WSGI does."""
    values = [value for key, value in scope.get("headers") or () if key.lower() == name]
    return b", ".join(values).decode("latin-1") if values else None


class RateLimitMiddleware:
    """Rate-limit every HTTP request before the app sees it; 429 problem+json when denied.

    Args:
        app: the ASGI app.
        limiter: the :class:`~hardening.AsyncRateLimiter` for every request, a limits string
            for an in-memory one (``"100/minute"``), or ``None`` to apply only ``rules``.
        key: who a request is (a :data:`~hardening.KeyFunc`); when it gives ``None`` (an
            anonymous request for :func:`~hardening.user_key`) the client IP is used. Defaults
            to the client IP.
        cost: units a request costs, or a function of the request.
        tier: the tier, or a function of the request giving it (e.g. from a header).
        rules: extra limits per method and path: ``{"PATCH /pages/*": "30/minute"}`` or
            :class:`RateLimitRule` items with keys, costs and tiers of their own. Every rule
            that matches applies, then the main limiter; a denial stops there.
        bypass: an admin token (compared in constant time against ``bypass_header`` and
            ``Authorization: Bearer``; at least 16 characters), or a function of the request
            (sync or async) returning true to skip limiting.
        bypass_header: the header carrying the bypass token.
        exempt_paths: paths never limited (``/healthz``, ``/metrics/**``).
        trusted_proxies: networks whose ``X-Forwarded-For`` is believed for the client IP;
            from anyone else the header is ignored, so it cannot be spoofed.
        headers: add the decision's ``X-RateLimit-*`` / ``RateLimit`` headers to responses.

    Raises:
        ConfigurationError: an option is invalid.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: AsyncRateLimiter | str | None,
        *,
        key: KeyFunc | None = None,
        cost: Cost = 1,
        tier: Tier = None,
        rules: Mapping[str, object] | Iterable[RateLimitRule] = (),
        bypass: str | Callable[[RequestInfo], object] | None = None,
        bypass_header: str = "X-RateLimit-Bypass",
        exempt_paths: Iterable[str] = (),
        trusted_proxies: TrustedProxies | Iterable[str] = (),
        headers: bool = True,
    ) -> None:
        self.app = app
        self.plan = RateLimitPlan(
            limiter,
            AsyncRateLimiter,
            key=key,
            cost=cost,
            tier=tier,
            rules=rules,
            bypass=bypass,
            bypass_header=bypass_header,
            exempt_paths=exempt_paths,
            trusted_proxies=trusted_proxies,
        )
        self.headers = headers
        self._bypass_header = bypass_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one request through the limits."""
        plan = self.plan
        if scope["type"] != "http" or (plan.exempt and plan.exempt.matches(scope["path"])):
            await self.app(scope, receive, send)
            return
        request = asgi_request_info(scope)
        if await self._bypassed(scope, request):
            await self.app(scope, receive, send)
            return
        decisions = []
        for limiter, key, cost, tier in plan.checks(request):
            decision = await limiter.hit(key, cost=cost, tier=tier)
            if not decision.allowed:
                head = scope.get("method") == "HEAD"
                await _respond(send, error_response(decision.refusal()), head=head)
                return
            decisions.append(decision)
        extra = binding_headers(decisions) if self.headers else []
        if not extra:
            await self.app(scope, receive, send)
            return
        raw = _raw_headers(extra)
        names = {name for name, _ in raw}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                # an app that reports its own limit (a 429 from ``limiter.limit``) keeps it
                if not any(name.lower() in names for name, _ in headers):
                    message = {**message, "headers": headers + raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _bypassed(self, scope: Scope, request: RequestInfo) -> bool:
        plan = self.plan
        if plan.bypass_token is not None:
            return plan.token_bypasses(
                _header(scope, self._bypass_header), _header(scope, b"authorization")
            )
        if plan.bypass_func is not None:
            result = plan.bypass_func(request)
            if inspect.isawaitable(result):
                result = await result
            return bool(result)
        return False


class MetricsMiddleware:
    """Observe every HTTP request in ``http_server_request_duration_seconds``.

    One observation per request, labelled with the method, the route **template** the
    framework matched (read from the scope after the call: ``scope["route"]`` in Starlette and
    FastAPI, or ``scope["hardening.route"]`` set by any app; one shared value for unmatched
    paths), and the status. Finished when the last body chunk is sent; an app that raises
    before responding is recorded as 500 with the exception's type, a client gone before the
    response as 499. ``http_server_active_requests`` counts requests in flight.
    Instrumentation never fails a request.

    Args:
        app: the ASGI app.
        metrics: the registry.
        exclude_paths: paths not observed (patterns as for ``exempt_paths``).
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, *, exclude_paths: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.exclude = PathMatcher(exclude_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time one request."""
        if scope["type"] != "http" or (self.exclude and self.exclude.matches(scope["path"])):
            await self.app(scope, receive, send)
            return
        timer = self.metrics.track_http_request(scope.get("method", "GET"))
        root_path = scope.get("root_path", "")
        status = 0
        ended = disconnected = False

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_watching(message: Message) -> None:
            nonlocal status, ended
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                ended = True
                if status < 500:  # a 5xx may be followed by the exception that caused it
                    timer.finish(status, asgi_route(scope, root_path))

        try:
            await self.app(scope, receive_watching, send_watching)
        except BaseException as exc:
            if timer.duration is None:
                timer.finish(status or 500, asgi_route(scope, root_path), type(exc).__name__)
            raise
        finally:
            if timer.duration is None:
                if ended or status:
                    timer.finish(status, asgi_route(scope, root_path))
                else:  # returned without responding
                    error = "disconnect" if disconnected else "no_response"
                    timer.finish(499 if disconnected else 500, asgi_route(scope, root_path), error)


class ErrorMiddleware:
    """Answer ``hardening`` errors raised by the app with their HTTP status as problem+json.

    ``ConflictError`` 409, ``PreconditionFailed`` 412, ``PreconditionRequired`` 428,
    ``InvalidPatch`` 422, ``MalformedBody`` 400, ``UnsupportedMediaType`` 415 with
    ``Accept-Patch``, ``PatchConflict`` 409, ``RateLimitExceeded`` 429 with its headers, and
    the rest of :mod:`hardening.errors` by their ``http_status``; the body carries the error's
    data (versions, the failing operation's index). A store outage that the app's own code
    meets (SQLAlchemy's operational errors, redis-py's connection errors and timeouts) is a
    503 like :class:`~hardening.BackendUnavailable`, not a 500. Other exceptions pass through,
    and so does an error raised after the response started (it can no longer be changed).

    Args:
        app: the ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, mapping errors it raises before responding."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _answering(self.app, scope, receive, send, HardeningError)


async def _answering(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, errors: type[HardeningError]
) -> None:
    """Run ``app``; answer an error of type ``errors`` it raises before it started responding.

    Once the response has started it can no longer be changed: the error propagates.
    """
    started = False

    async def send_watching(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, send_watching)
    except Exception as exc:
        error = answerable(exc, errors)
        if error is None or started:
            raise
        await _respond(send, error_response(error), head=scope.get("method") == "HEAD")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, by ``Content-Length`` and streaming.

    A declared ``Content-Length`` over the limit is refused before the app runs; a malformed
    one gets 400. A body without one (chunked) is counted as the app reads it: past the limit
    the app's ``receive`` raises :class:`~hardening.PayloadTooLarge`, and the middleware
    answers 413 if the app has not responded yet. Allowed bodies are passed through, never
    buffered.

    Args:
        app: the ASGI app.
        max_bytes: the largest body allowed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigurationError(f"max_bytes must be a non-negative integer, not {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with its body bounded."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope.get("method") == "HEAD"
        try:
            declared = parse_content_length(_header(scope, b"content-length"))
        except MalformedBody as exc:
            await _respond(send, error_response(exc), head=head)
            return
        limit = self.max_bytes
        if declared is not None and declared > limit:
            await _respond(send, error_response(PayloadTooLarge(limit, declared)), head=head)
            return
        received = 0

        async def receive_bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit, received)
            return message

        await _answering(self.app, scope, receive_bounded, send, PayloadTooLarge)


def _raw_headers(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _text_headers(raw: Iterable[tuple[bytes, bytes]]) -> HeaderList:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


class CacheMiddleware:
    """Cache whole ``GET`` responses in an :class:`~hardening.AsyncCache`, with ``ETag``/``304``.

    A ``GET`` or ``HEAD`` under ``paths`` is answered from the cache when a response is stored
    for its path, query and ``vary`` headers (``X-Cache: HIT``, ``Age``), or ``304`` when its
    ``If-None-Match`` names the stored ``ETag``. Otherwise the app answers (``X-Cache: MISS``)
    and a ``GET``'s response is stored when it is a 200 with a ``Content-Length`` up to
    ``max_body_bytes``, no ``Set-Cookie``, no ``Cache-Control: private|no-store|no-cache`` and
    no ``Vary`` beyond ``vary``; ``ETag`` (a hash of the body) and ``Cache-Control:
    max-age`` are added when the app set none. Such a response is buffered (it is small and
    its length is known); others stream through untouched. Requests carrying
    ``private_headers`` (credentials) bypass the cache unless those headers are in ``vary``.
    An unsafe request matching ``invalidate_on`` invalidates its tags as soon as the app
    answers it with a status below 400, before the answer reaches the client. A failing cache
    storage reads as a miss (see the cache's ``on_backend_error``): the app answers.

    Args:
        app: the ASGI app.
        cache: the :class:`~hardening.AsyncCache` to store responses in.
        ttl: how long responses are stored: seconds, ``timedelta`` or a TTL profile name.
        paths: path patterns whose responses are cached (``*`` one segment, ``**`` any,
            ``{param}`` / ``<param>`` one segment, captured for tags), or a mapping of
            pattern to its responses' tags: ``{"/projects/{project_id}/**":
            ["project:{project_id}"]}`` (format strings over the pattern's parameters, or a
            function of the :class:`~hardening.RequestInfo`).
        tags: tags of every stored response, as in ``paths``.
        vary: request headers that select different stored responses.
        private_headers: credentials: requests carrying them bypass the cache.
        invalidate_on: ``{"PUT,PATCH,DELETE /projects/{project_id}/**":
            ["project:{project_id}"]}``: tags to invalidate when such a request succeeds.
        max_body_bytes: the largest body stored.
        max_age: the ``max-age`` sent to clients when the app sets no ``Cache-Control``:
            ``None`` for the TTL, 0 for ``no-cache`` (revalidate each time: cheap ``304``
            answers, invalidations seen at once).

    Raises:
        ConfigurationError: ``cache`` is not an ``AsyncCache``, or an option is invalid.
    """

    def __init__(
        self,
        app: ASGIApp,
        cache: AsyncCache,
        *,
        ttl: TTL = 60.0,
        paths: Iterable[str] | Mapping[str, TagsArg] = ("/**",),
        tags: TagsArg | None = None,
        vary: Iterable[str] = ("accept",),
        private_headers: Iterable[str] = ("authorization", "cookie"),
        invalidate_on: Mapping[str, TagsArg] | None = None,
        max_body_bytes: int = 512 * 1024,
        max_age: float | None = None,
    ) -> None:
        if not isinstance(cache, AsyncCache):
            raise ConfigurationError(
                f"the ASGI CacheMiddleware needs an AsyncCache, not {type(cache).__name__}"
            )
        self.app = app
        self.cache = cache
        self.plan = ResponseCachePlan.for_cache(
            cache,
            ttl=ttl,
            paths=paths,
            tags=tags,
            vary=vary,
            private_headers=private_headers,
            invalidate_on=invalidate_on or {},
            max_body_bytes=max_body_bytes,
            max_age=max_age,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer from the cache, or run the app and store its answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await self._unsafe(scope, receive, send, method)
            return
        path = scope.get("path", "/")
        matched = self.plan.match(path)
        headers = ASGIHeaders(scope.get("headers") or ())
        if matched is None or self.plan.bypass(headers):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        key = self.plan.key(path, query, headers)
        entry = CachedResponse.from_json(await self.cache.get(key))
        clock = self.cache.clock
        if entry is not None:
            response = self.plan.replay(entry, headers.get("if-none-match"), clock.time(), "HIT")
            await _respond(send, response, head=method == "HEAD")
            return
        if method == "HEAD":
            await self.app(scope, receive, _marked(send))
            return
        route, params = matched
        held: Message | None = None
        parts: list[bytes] = []
        size = 0
        expected = 0

        async def send_storing(message: Message) -> None:
            nonlocal held, size, expected
            if held is None:
                if message["type"] == "http.response.start":
                    headers_out = _text_headers(message.get("headers", ()))
                    length = self.plan.storable(message["status"], headers_out)
                    if length is not None:
                        held, expected = message, length
                        return
                await _marked(send)(message)
                return
            if message["type"] != "http.response.body":  # an extension (pathsend, trailers)
                await _marked(send)(held)
                if parts:
                    await send(
                        {"type": "http.response.body", "body": b"".join(parts), "more_body": True}
                    )
                held = None
                await send(message)
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if message.get("more_body", False) and size <= expected:
                return
            await self._finish(send, held, parts, expected, scope, headers, key, route, params)

        await self.app(scope, receive, send_storing)

    async def _finish(
        self,
        send: Send,
        start: Message,
        parts: list[bytes],
        expected: int,
        scope: Scope,
        headers: ASGIHeaders,
        key: str,
        route: Any,
        params: dict[str, str],
    ) -> None:
        body = b"".join(parts)
        if len(body) != expected:  # the app broke its Content-Length: pass it on, unstored
            await _marked(send)(start)
            await send({"type": "http.response.body", "body": body})
            return
        plan = self.plan
        entry = plan.store(
            start["status"], _text_headers(start.get("headers", ())), body, self.cache.clock.time()
        )
        status, out, body = plan.replay(
            entry, headers.get("if-none-match"), entry.stored_at, "MISS"
        )
        await send({**start, "status": status, "headers": _raw_headers(out)})
        await send({"type": "http.response.body", "body": body})
        tags = plan.tags(route, params, asgi_request_info(scope))
        await self.cache.set(key, entry.to_json(), ttl=plan.ttl, tags=tags)

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        tags = (
            self.plan.invalidated(method, scope.get("path", "/"), asgi_request_info(scope))
            if self.plan.invalidations
            else []
        )
        if not tags:
            await self.app(scope, receive, send)
            return

        async def send_invalidating(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                await self.cache.invalidate_tags(tags)
            await send(message)

        await self.app(scope, receive, send_invalidating)


def _marked(send: Send) -> Send:
    """``send`` adding ``X-Cache: MISS`` to the response start."""

    async def send_marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"x-cache", b"MISS")]
            message = {**message, "headers": headers}
        await send(message)

    return send_marked


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _refuse_non_http(scope: Scope, receive: Receive, send: Send) -> bool:
    """Handle the scopes an endpoint app does not serve; return whether it was one."""
    if scope["type"] == "http":
        return False
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1003})
    return True


def metrics_app(
    metrics: Metrics, *, auth: str | Callable[[RequestInfo], object] | None = None
) -> ASGIApp:
    """The ``/metrics`` endpoint as an ASGI app (mount it, or route to it).

    Negotiates the format (Prometheus text, or OpenMetrics with exemplars), gzips when the
    scraper accepts it, always sends ``Content-Type``, renders in a worker thread so the event
    loop never waits on it, answers ``GET``/``HEAD`` (405 otherwise), completes lifespan
    events and closes websockets.

    Args:
        metrics: the registry to expose.
        auth: a bearer token (constant-time compare; 401 without it), or a function of the
            request (sync or async) returning true to allow.

    Returns:
        The ASGI app.
    """
    token = auth.encode() if isinstance(auth, str) else None
    check = auth if callable(auth) else None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _refuse_non_http(scope, receive, send):
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(send, method_not_allowed("GET, HEAD"))
            return
        head = method == "HEAD"
        if token is not None and not bearer_ok(_header(scope, b"authorization"), token):
            await _respond(send, UNAUTHORIZED, head=head)
            return
        if check is not None:
            allowed = check(asgi_request_info(scope))
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                await _respond(send, UNAUTHORIZED, head=head)
                return
        body, headers = await asyncio.to_thread(
            metrics.render_response, _header(scope, b"accept"), _header(scope, b"accept-encoding")
        )
        response = (200, [(name.lower(), value) for name, value in headers.items()], body)
        await _respond(send, response, head=head)

    return _Endpoint(app, "metrics_app")


HealthCheck = Callable[[], object]


def health_app(checks: Mapping[str, HealthCheck] | None = None, *, timeout: float = 2.0) -> ASGIApp:
    """The ``/healthz`` endpoint as an ASGI app: named checks, each with a timeout.

    Checks run concurrently: ``async`` ones on the loop, plain ones in worker threads. A check
    passes when it returns anything but ``False``; it fails when it raises (the error's type is
    reported, never its message), returns ``False`` or exceeds ``timeout``. The answer is 200
    when every check passes, else 503, with a JSON body ``{"status", "checks": {name:
    {"status", "duration_ms", "error"?}}}`` and ``Cache-Control: no-store``.

    Args:
        checks: name to a callable taking no arguments (see :func:`hardening.adapters.redis_check`
            and :func:`hardening.adapters.sql_check`). None or empty: a liveness probe.
        timeout: seconds each check may take.

    Returns:
        The ASGI app.
    """
    named = check_names(checks or {})
    in_thread: dict[str, asyncio.Future[object]] = {}  # a sync check's run still going

    async def call(name: str, check: HealthCheck) -> object:
        if inspect.iscoroutinefunction(check):
            return await check()
        # a hung sync check keeps its thread: later probes wait on that run instead of
        # taking one more thread each from the loop's shared pool
        future = in_thread.get(name)
        if future is None or future.done():
            future = in_thread[name] = asyncio.ensure_future(asyncio.to_thread(check))
        value = await asyncio.shield(future)
        return (await value) if inspect.isawaitable(value) else value

    async def run(name: str, check: HealthCheck) -> CheckResult:
        start = time.perf_counter()
        try:
            value = await asyncio.wait_for(call(name, check), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return HealthReport.failure(name, TimeoutError(), time.perf_counter() - start)
        except Exception as exc:
            return HealthReport.failure(name, exc, time.perf_counter() - start)
        return HealthReport.outcome(name, value, time.perf_counter() - start)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _refuse_non_http(scope, receive, send):
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(send, method_not_allowed("GET, HEAD"))
            return
        results = await asyncio.gather(*(run(name, check) for name, check in named.items()))
        await _respond(send, HealthReport.response(results), head=method == "HEAD")

    return _Endpoint(app, "health_app")


class _Endpoint:
    """An endpoint app as an object, so routers (Starlette's ``Route``) treat it as ASGI."""

    __slots__ = ("_app", "_name")

    def __init__(self, app: ASGIApp, name: str) -> None:
        self._app = app
        self._name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return f"<hardening {self._name}>"
