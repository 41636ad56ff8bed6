"""PEP 3333 middleware and apps: rate limits, metrics, errors, body limits, caching, /metrics.

The twins of :mod:`hardening.adapters.asgi`, with the same names, options and behaviour. Each
middleware wraps ``start_response`` (accepting ``exc_info`` and returning ``write``), returns
the app's iterable as soon as the app does, never buffers it, and always calls its
``close()``; every response it makes has a ``Content-Type``. Nothing is kept on the middleware
per request, so they are safe under threaded servers. The order that reports everything
(outermost first)::

    app.wsgi_app = BodyLimitMiddleware(
        MetricsMiddleware(RateLimitMiddleware(ErrorMiddleware(app.wsgi_app), limiter), metrics),
        max_bytes=1_000_000,
    )
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol

from hardening.adapters._http import (
    ROUTE_KEY,
    UNAUTHORIZED,
    EnvironHeaders,
    HealthReport,
    PathMatcher,
    RateLimitPlan,
    RateLimitRule,
    answerable,
    bearer_ok,
    binding_headers,
    check_names,
    error_response,
    method_not_allowed,
    parse_content_length,
    wsgi_path,
    wsgi_request_info,
    wsgi_route,
)
from hardening.cache import Cache
from hardening.cache.http import CachedResponse, ResponseCachePlan
from hardening.errors import ConfigurationError, HardeningError, MalformedBody, PayloadTooLarge
from hardening.ratelimit import RateLimiter, RequestInfo

if TYPE_CHECKING:
    from hardening.adapters._http import CheckResult, Cost, HeaderList, Tier
    from hardening.cache.http import TagsArg
    from hardening.cache.policy import TTL
    from hardening.metrics import Metrics
    from hardening.ratelimit import KeyFunc, TrustedProxies

__all__ = [
    "BodyLimitMiddleware",
    "CacheMiddleware",
    "ErrorMiddleware",
    "MetricsMiddleware",
    "RateLimitMiddleware",
    "RateLimitRule",
    "WSGIApp",
    "flask_error_handler",
    "health_app",
    "metrics_app",
    "record_flask_routes",
]

# The standard WSGI types (typeshed's ``_typeshed.wsgi``, which Flask and Django's stubs use),
# spelled out so they exist at run time too.
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
Environ = dict[str, Any]


class StartResponse(Protocol):
    """The ``start_response`` callable of PEP 3333."""

    def __call__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = ...,
        /,
    ) -> Callable[[bytes], object]: ...


WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _respond(
    start_response: StartResponse,
    response: tuple[int, HeaderList, bytes],
    *,
    head: bool = False,
    exc_info: ExcInfo | None = None,
) -> list[bytes]:
    status, headers, body = response
    start_response(_status_line(status), [(n.title(), v) for n, v in headers], exc_info)
    return [b"" if head else body]


class _Started:
    """``start_response`` remembering whether the app called it.

    An error response passes ``exc_info`` only to replace a response the app had started:
    servers and test clients (werkzeug's, httpx's ``WSGITransport``) re-raise any ``exc_info``
    they are given, which would turn the mapped error back into an exception.
    """

    __slots__ = ("called", "start_response")

    def __init__(self, start_response: StartResponse) -> None:
        self.start_response = start_response
        self.called = False

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.called = True
        return self.start_response(status, headers, exc_info)

    def exc_info(self, exc: BaseException) -> ExcInfo | None:
        if not self.called or exc.__traceback__ is None:
            return None
        return (type(exc), exc, exc.__traceback__)


def _answering(
    app: WSGIApp, environ: Environ, start_response: StartResponse, errors: type[HardeningError]
) -> Iterable[bytes]:
    """Run ``app``; answer an error of type ``errors`` it raises.

    A response the app had started is replaced through ``exc_info``, as PEP 3333 allows until
    its headers are sent.
    """
    started = _Started(start_response)
    try:
        return app(environ, started)
    except Exception as exc:
        error = answerable(exc, errors)
        if error is None:
            raise
        return _respond(
            start_response,
            error_response(error),
            head=environ.get("REQUEST_METHOD") == "HEAD",
            exc_info=started.exc_info(exc),
        )


class RateLimitMiddleware:
    """Rate-limit every HTTP request before the app sees it; 429 problem+json when denied.

    Args:
        app: the WSGI app.
        limiter: the :class:`~hardening.RateLimiter` for every request, a limits string for an
            in-memory one (``"100/minute"``), or ``None`` to apply only ``rules``.
        key: who a request is; when it gives ``None`` the client IP is used. Defaults to the
            client IP (``REMOTE_ADDR``, and ``X-Forwarded-For`` only from ``trusted_proxies``).
        cost: units a request costs, or a function of the request.
        tier: the tier, or a function of the request giving it.
        rules: extra limits per method and path (``{"PATCH /pages/*": "30/minute"}`` or
            :class:`RateLimitRule` items); every matching rule applies, then the main limiter.
        bypass: an admin token (constant-time compare against ``bypass_header`` and
            ``Authorization: Bearer``; at least 16 characters), or a function of the request.
        bypass_header: the header carrying the bypass token.
        exempt_paths: paths never limited.
        trusted_proxies: networks whose ``X-Forwarded-For`` is believed.
        headers: add the decision's ``X-RateLimit-*`` / ``RateLimit`` headers to responses.

    Raises:
        ConfigurationError: an option is invalid.
    """

    def __init__(
        self,
        app: WSGIApp,
        limiter: RateLimiter | str | None,
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
            RateLimiter,
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
        self._bypass_key = "HTTP_" + bypass_header.upper().replace("-", "_")

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Run one request through the limits."""
        plan = self.plan
        if plan.exempt and plan.exempt.matches(wsgi_path(environ)):
            return self.app(environ, start_response)
        request = wsgi_request_info(environ)
        if self._bypassed(environ, request):
            return self.app(environ, start_response)
        decisions = []
        for limiter, key, cost, tier in plan.checks(request):
            decision = limiter.hit(key, cost=cost, tier=tier)
            if not decision.allowed:
                return _respond(
                    start_response,
                    error_response(decision.refusal()),
                    head=request.method == "HEAD",
                )
            decisions.append(decision)
        extra = [(n.title(), v) for n, v in binding_headers(decisions)] if self.headers else []
        if not extra:
            return self.app(environ, start_response)
        names = {name.lower() for name, _ in extra}

        def start_with_headers(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            # an app that reports its own limit (a 429 from ``limiter.limit``) keeps it
            if not any(name.lower() in names for name, _ in headers):
                headers = headers + extra
            return start_response(status, headers, exc_info)

        return self.app(environ, start_with_headers)

    def _bypassed(self, environ: Environ, request: RequestInfo) -> bool:
        plan = self.plan
        if plan.bypass_token is not None:
            return plan.token_bypasses(
                environ.get(self._bypass_key), environ.get("HTTP_AUTHORIZATION")
            )
        if plan.bypass_func is not None:
            return bool(plan.bypass_func(request))
        return False


class _Observed:
    """The app's iterable, passed through chunk by chunk; the request ends at ``close()``."""

    __slots__ = ("_error", "_finish", "_result")

    def __init__(self, result: Iterable[bytes], finish: Callable[[str | None], None]) -> None:
        self._result = result
        self._finish = finish
        self._error: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        # a loop, not ``yield from``: when the server stops early, closing this generator must
        # not close the app's iterable a second time (``close()`` below already did)
        try:
            for chunk in self._result:  # noqa: UP028
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._error = type(exc).__name__
            raise

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._finish(self._error)


class _ObservedSized(_Observed):
    """:class:`_Observed` for an iterable with a length, which servers use for Content-Length."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]


class MetricsMiddleware:
    """Observe every HTTP request in ``http_server_request_duration_seconds``.

    One observation per request, labelled with the method, the route **template** the framework
    matched (Flask's ``url_rule``, recorded by :func:`record_flask_routes`, which this
    middleware installs when it finds ``flask_app.wsgi_app`` down the ``.app`` chain; Django's
    ``resolver_match`` through :class:`hardening.adapters.django.RouteMiddleware`; or
    ``environ["hardening.route"]`` set by any app; one shared value for unmatched paths) and the
    status. The request ends when the server closes the response iterable (after its last
    chunk); an app that raises is recorded as 500 with the exception's type. A
    ``wsgi.file_wrapper`` response is returned untouched (so the server can still send the file
    efficiently) and timed until the app returned it. ``http_server_active_requests`` counts
    requests in flight.

    Args:
        app: the WSGI app.
        metrics: the registry.
        exclude_paths: paths not observed.
    """

    def __init__(
        self, app: WSGIApp, metrics: Metrics, *, exclude_paths: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.exclude = PathMatcher(exclude_paths)
        inner: object = app
        for _ in range(16):  # down the ``.app`` chain of wrapping middleware to Flask's wsgi_app
            owner = getattr(inner, "__self__", None)  # ``flask_app.wsgi_app`` is a bound method
            if hasattr(owner, "url_map") and hasattr(owner, "before_request_funcs"):
                record_flask_routes(owner)
                break
            inner = getattr(inner, "app", None)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Time one request."""
        if self.exclude and self.exclude.matches(wsgi_path(environ)):
            return self.app(environ, start_response)
        timer = self.metrics.track_http_request(environ.get("REQUEST_METHOD", "GET"))
        status = 0

        def start_watching(
            line: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            nonlocal status
            write = start_response(line, headers, exc_info)
            status = int(line[:3]) if line[:3].isascii() and line[:3].isdigit() else 500
            return write

        def finish(error: str | None) -> None:
            timer.finish(status or 500, wsgi_route(environ), error)

        try:
            result = self.app(environ, start_watching)
        except BaseException as exc:
            finish(type(exc).__name__)
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            finish(None)
            return result
        if hasattr(result, "__len__"):
            return _ObservedSized(result, finish)
        return _Observed(result, finish)


def record_flask_routes(flask_app: Any) -> None:
    """Make a Flask app record its matched ``url_rule`` where ``MetricsMiddleware`` reads it.

    Flask drops its request object from the environ before ``wsgi_app`` returns, so the
    middleware cannot read the match afterwards; this registers a first ``before_request``
    hook copying ``request.url_rule.rule`` into ``environ["hardening.route"]``.
    ``MetricsMiddleware`` calls it itself when it wraps ``flask_app.wsgi_app`` directly; call it
    when other middleware sits in between. Idempotent.

    Args:
        flask_app: the ``flask.Flask`` application.
    """
    if getattr(flask_app, "_hardening_routes", False):
        return
    from flask import request

    def record_route() -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_KEY] = rule.rule

    flask_app.before_request_funcs.setdefault(None, []).insert(0, record_route)
    flask_app._hardening_routes = True


class ErrorMiddleware:
    """Answer ``hardening`` errors raised by the app with their HTTP status as problem+json.

    The same mapping as :class:`hardening.adapters.asgi.ErrorMiddleware` (store outages met by
    the app's own code included: 503, not 500). Errors raised while
    the server iterates the body (after the app returned) pass through, as do other
    exceptions. A response the app had started is replaced through ``start_response``'s
    ``exc_info``, as PEP 3333 allows until the headers are sent.

    Args:
        app: the WSGI app.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Run the app, mapping errors it raises."""
        return _answering(self.app, environ, start_response, HardeningError)


def flask_error_handler(exc: HardeningError) -> tuple[bytes, int, list[tuple[str, str]]]:
    """A Flask error handler answering ``hardening`` errors as problem+json.

    Flask turns exceptions into 500 responses inside ``wsgi_app``, so :class:`ErrorMiddleware`
    around it never sees them; register this instead::

        app.register_error_handler(HardeningError, flask_error_handler)

    Args:
        exc: the error the view raised.

    Returns:
        ``(body, status, headers)``, which Flask turns into the response.
    """
    status, headers, body = error_response(exc)
    return body, status, [(name.title(), value) for name, value in headers]


class _BoundedInput:
    """``wsgi.input`` that raises :class:`PayloadTooLarge` once more than the limit is read."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._read = 0

    def _count(self, data: bytes) -> bytes:
        self._read += len(data)
        if self._read > self._limit:
            raise PayloadTooLarge(self._limit, self._read)
        return data

    def _size(self, size: int | None) -> int:
        # never ask for more than one byte past the limit: a huge read cannot be buffered
        room = self._limit - self._read + 1
        return room if size is None or size < 0 else min(size, room)

    def read(self, size: int | None = -1) -> bytes:
        return self._count(self._stream.read(self._size(size)))

    def readline(self, size: int | None = -1) -> bytes:
        return self._count(self._stream.readline(self._size(size)))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = []
        while line := self.readline():
            lines.append(line)
            if hint is not None and hint > 0 and sum(map(len, lines)) >= hint:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, by ``Content-Length`` and streaming.

    A declared ``Content-Length`` over the limit is refused before the app runs; a malformed
    one gets 400. A body without one (chunked, with ``wsgi.input_terminated``) is counted as
    the app reads ``wsgi.input``: past the limit the read raises
    :class:`~hardening.PayloadTooLarge`, which this middleware answers with 413. Allowed
    bodies are never buffered.

    Args:
        app: the WSGI app.
        max_bytes: the largest body allowed.
    """

    def __init__(self, app: WSGIApp, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigurationError(f"max_bytes must be a non-negative integer, not {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Run the app with its body bounded."""
        head = environ.get("REQUEST_METHOD") == "HEAD"
        try:
            declared = parse_content_length(environ.get("CONTENT_LENGTH") or None)
        except MalformedBody as exc:
            return _respond(start_response, error_response(exc), head=head)
        limit = self.max_bytes
        if declared is not None and declared > limit:
            return _respond(
                start_response, error_response(PayloadTooLarge(limit, declared)), head=head
            )
        if declared is None and "wsgi.input" in environ:
            environ["wsgi.input"] = _BoundedInput(environ["wsgi.input"], limit)
        return _answering(self.app, environ, start_response, PayloadTooLarge)


class _Capture:
    """``start_response`` for a cacheable request: holds a storable response, passes others."""

    __slots__ = ("expected", "headers", "passed", "plan", "start_response", "status", "written")

    def __init__(self, start_response: StartResponse, plan: ResponseCachePlan) -> None:
        self.start_response = start_response
        self.plan = plan
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.expected = 0
        self.passed = False
        self.written: list[bytes] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        code = int(status[:3]) if status[:3].isdigit() else 0
        length = None if exc_info is not None else self.plan.storable(code, headers)
        if length is None or self.passed:
            self.passed = True
            self.status = None
            return self.start_response(status, [*headers, ("X-Cache", "MISS")], exc_info)
        self.status, self.headers, self.expected = status, headers, length
        return self.written.append

    def release(self) -> None:
        """Send the held response start after all (the body broke its ``Content-Length``)."""
        if self.status is not None and not self.passed:
            self.passed = True
            self.start_response(self.status, [*self.headers, ("X-Cache", "MISS")])


class _Replay:
    """The chunks already read, then the rest of the app's iterable; closes it."""

    __slots__ = ("_head", "_iterator", "_result")

    def __init__(self, head: list[bytes], iterator: Iterator[bytes], result: Iterable[bytes]):
        self._head = head
        self._iterator = iterator
        self._result = result

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._iterator

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            close()


class CacheMiddleware:
    """Cache whole ``GET`` responses in a :class:`~hardening.Cache`, with ``ETag``/``304``.

    The twin of :class:`hardening.adapters.asgi.CacheMiddleware`, with the same options and
    behaviour. A storable response (a 200 with a small ``Content-Length``, see there) is read
    whole, closed, stored and returned as one chunk; any other response is returned as the
    app's own iterable, untouched but for ``X-Cache: MISS``. An app that calls
    ``start_response`` only when its iterable is first iterated is handled too.

    Args:
        app: the WSGI app.
        cache: the :class:`~hardening.Cache` to store responses in.
        ttl: how long responses are stored.
        paths: path patterns whose responses are cached, or pattern to their tags.
        tags: tags of every stored response.
        vary: request headers that select different stored responses.
        private_headers: credentials: requests carrying them bypass the cache.
        invalidate_on: unsafe method and path patterns to the tags they invalidate.
        max_body_bytes: the largest body stored.
        max_age: the ``max-age`` sent to clients when the app sets no ``Cache-Control``.

    Raises:
        ConfigurationError: ``cache`` is not a ``Cache``, or an option is invalid.
    """

    def __init__(
        self,
        app: WSGIApp,
        cache: Cache,
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
        if not isinstance(cache, Cache):
            raise ConfigurationError(
                f"the WSGI CacheMiddleware needs a Cache, not {type(cache).__name__}"
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

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Answer from the cache, or run the app and store its answer."""
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self._unsafe(environ, start_response, method)
        path = wsgi_path(environ)
        matched = self.plan.match(path)
        headers = EnvironHeaders(environ)
        if matched is None or self.plan.bypass(headers):
            return self.app(environ, start_response)
        key = self.plan.key(path, environ.get("QUERY_STRING", ""), headers)
        entry = CachedResponse.from_json(self.cache.get(key))
        if entry is not None:
            response = self.plan.replay(
                entry, headers.get("if-none-match"), self.cache.clock.time(), "HIT"
            )
            return _respond(start_response, response, head=method == "HEAD")
        capture = _Capture(start_response, self.plan)
        if method == "HEAD":
            capture.passed = True
            return self.app(environ, capture)
        result = self.app(environ, capture)
        iterator = iter(result)
        chunks: list[bytes] = []
        size = 0
        try:
            while not capture.passed:
                chunk = next(iterator, None)
                if chunk is None:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if capture.status is not None and size > capture.expected:
                    break
        except BaseException:
            _close(result)
            raise
        if (
            capture.passed
            or capture.status is None
            or size + len(b"".join(capture.written)) != (capture.expected)
        ):
            capture.release()
            return _Replay([*capture.written, *chunks], iterator, result)
        _close(result)
        return self._store(capture, b"".join([*capture.written, *chunks]), environ, key, matched)

    def _store(
        self,
        capture: _Capture,
        body: bytes,
        environ: Environ,
        key: str,
        matched: tuple[Any, dict[str, str]],
    ) -> list[bytes]:
        plan = self.plan
        status_line = capture.status or "200 OK"
        entry = plan.store(200, capture.headers, body, self.cache.clock.time())
        route, params = matched
        self.cache.set(
            key,
            entry.to_json(),
            ttl=plan.ttl,
            tags=plan.tags(route, params, wsgi_request_info(environ)),
        )
        inm = environ.get("HTTP_IF_NONE_MATCH")
        status, headers, out = plan.replay(entry, inm, entry.stored_at, "MISS")
        line = status_line if status == 200 else _status_line(status)
        capture.start_response(line, [(n.title(), v) for n, v in headers])
        return [out]

    def _unsafe(
        self, environ: Environ, start_response: StartResponse, method: str
    ) -> Iterable[bytes]:
        tags = (
            self.plan.invalidated(method, wsgi_path(environ), wsgi_request_info(environ))
            if self.plan.invalidations
            else []
        )
        if not tags:
            return self.app(environ, start_response)

        def start_invalidating(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            if status[:3].isdigit() and int(status[:3]) < 400:
                self.cache.invalidate_tags(tags)
            return start_response(status, headers, exc_info)

        return self.app(environ, start_invalidating)


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def metrics_app(
    metrics: Metrics, *, auth: str | Callable[[RequestInfo], object] | None = None
) -> WSGIApp:
    """The ``/metrics`` endpoint as a WSGI app.

    Negotiates the format (Prometheus text, or OpenMetrics with exemplars), gzips when the
    scraper accepts it, always sends ``Content-Type``, answers ``GET``/``HEAD`` (405 with a
    body and a ``Content-Type`` otherwise).

    Args:
        metrics: the registry to expose.
        auth: a bearer token (constant-time compare; 401 without it), or a function of the
            request returning true to allow.

    Returns:
        The WSGI app.
    """
    token = auth.encode() if isinstance(auth, str) else None
    check = auth if callable(auth) else None

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, method_not_allowed("GET, HEAD"))
        head = method == "HEAD"
        if token is not None and not bearer_ok(environ.get("HTTP_AUTHORIZATION"), token):
            return _respond(start_response, UNAUTHORIZED, head=head)
        if check is not None and not check(wsgi_request_info(environ)):
            return _respond(start_response, UNAUTHORIZED, head=head)
        body, headers = metrics.render_response(
            environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING")
        )
        return _respond(start_response, (200, list(headers.items()), body), head=head)

    return app


HealthCheck = Callable[[], object]


def _call_check(check: HealthCheck) -> object:
    if inspect.iscoroutinefunction(check):
        return asyncio.run(check())
    value = check()
    if inspect.iscoroutine(value):
        return asyncio.run(value)
    return value


def health_app(checks: Mapping[str, HealthCheck] | None = None, *, timeout: float = 2.0) -> WSGIApp:
    """The ``/healthz`` endpoint as a WSGI app: named checks, each with a timeout.

    Checks run concurrently in a small thread pool owned by the app. A check passes when it
    returns anything but ``False``; it fails when it raises (its type is reported, never its
    message), returns ``False`` or exceeds ``timeout`` (a check that hangs keeps its thread
    until it returns; later requests wait on that run instead of starting another). 200 when
    every check passes, else 503, with the JSON body of the ASGI ``health_app``.

    Args:
        checks: name to a callable taking no arguments; async callables are run with
            :func:`asyncio.run` in the pool thread.
        timeout: seconds each check may take.

    Returns:
        The WSGI app.
    """
    named = check_names(checks or {})
    pool = (
        concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, 2 * len(named)), thread_name_prefix="hardening-health"
        )
        if named
        else None
    )
    # One run per check at a time: a probe finding a check still running (hung) waits on that
    # run instead of starting another, so hung checks cannot take every thread of the pool and
    # make the healthy checks of later probes report a timeout too.
    running: dict[str, concurrent.futures.Future[tuple[object, float, BaseException | None]]] = {}
    running_lock = threading.Lock()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, method_not_allowed("GET, HEAD"))
        results: list[CheckResult] = []
        if pool is not None:
            start = time.perf_counter()
            with running_lock:
                for name, check in named.items():
                    if name not in running or running[name].done():
                        running[name] = pool.submit(_timed, check)
                futures = {name: running[name] for name in named}
            concurrent.futures.wait(futures.values(), timeout=timeout)
            for name, future in futures.items():
                if not future.done():
                    error = TimeoutError()
                    results.append(HealthReport.failure(name, error, time.perf_counter() - start))
                    continue
                value, seconds, exc = future.result()
                if exc is not None:
                    results.append(HealthReport.failure(name, exc, seconds))
                else:
                    results.append(HealthReport.outcome(name, value, seconds))
        return _respond(start_response, HealthReport.response(results), head=method == "HEAD")

    return app


def _timed(check: HealthCheck) -> tuple[object, float, BaseException | None]:
    start = time.perf_counter()
    try:
        value = _call_check(check)
    except Exception as exc:
        return None, time.perf_counter() - start, exc
    return value, time.perf_counter() - start, None
