"""hardening.adapters.wsgi: PEP 3333 middleware and apps, in Flask and Django, strictly checked.

Every response goes through ``wsgiref.validate.validator`` where it can: around our
middleware (what a server sees) and around the inner app (what the app sees), with its
``WSGIWarning`` turned into an error. Requests are made with ``httpx.WSGITransport`` or with
``wsgi_support.call``, a strict in-test server that honours ``exc_info`` and ``write``.
Rate limits run on the memory storage (with a fake clock) and on real Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.util import FileWrapper
from wsgiref.validate import WSGIWarning, validator

import flask
import pytest
import redis
import werkzeug.test
from redis.backoff import NoBackoff
from redis.retry import Retry

from hardening import (
    ConfigurationError,
    ConflictError,
    FakeClock,
    HardeningError,
    InvalidPatch,
    MalformedBody,
    Metrics,
    PatchConflict,
    PreconditionFailed,
    PreconditionRequired,
    UnsupportedMediaType,
    user_key,
)
from hardening.adapters import PROBLEM_JSON, RateLimitRule, redis_check, sql_check
from hardening.adapters.wsgi import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    flask_error_handler,
    health_app,
    metrics_app,
    record_flask_routes,
)
from hardening.ratelimit import AsyncRateLimiter, RateLimiter
from tests.adapters import django_app
from tests.adapters.wsgi_support import (
    TEXT,
    TOKEN,
    Body,
    Environ,
    StartResponse,
    WSGIApp,
    body_app,
    call,
    checked,
    client,
    exc_info_now,
    full_stack,
    make_environ,
    ok_app,
    raising_app,
    route_app,
    write_app,
)
from tests.conftest import free_port

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

HTTP = "http_server_request_duration_seconds"


def observed(
    metrics: Metrics, route: str, status: int, error_type: str = "", method: str = "GET"
) -> float:
    """How many requests ``metrics`` observed with these labels (0 when none)."""
    labels = {
        "http_request_method": method,
        "http_route": route,
        "http_response_status_code": str(status),
        "error_type": error_type,
    }
    return metrics.registry.get_sample_value(f"{HTTP}_count", labels) or 0.0


def active(metrics: Metrics, method: str = "GET") -> float | None:
    """``http_server_active_requests`` for ``method``."""
    return metrics.registry.get_sample_value(
        "http_server_active_requests", {"http_request_method": method}
    )


# Each middleware, configured so that it lets a plain request through.
WRAPPERS: dict[str, Callable[[WSGIApp], WSGIApp]] = {
    "ratelimit": lambda app: RateLimitMiddleware(app, RateLimiter("100/minute", clock=FakeClock())),
    "ratelimit-no-headers": lambda app: RateLimitMiddleware(
        app, RateLimiter("100/minute", clock=FakeClock()), headers=False
    ),
    "metrics": lambda app: MetricsMiddleware(app, Metrics()),
    "error": ErrorMiddleware,
    "bodylimit": lambda app: BodyLimitMiddleware(app, max_bytes=1024),
    "stack": lambda app: full_stack(app, RateLimiter("100/minute", clock=FakeClock()), Metrics()),
}


@pytest.fixture(params=list(WRAPPERS))
def wrap(request: pytest.FixtureRequest) -> Callable[[WSGIApp], WSGIApp]:
    """Each middleware (and the full stack) in turn."""
    return WRAPPERS[request.param]


class Streaming:
    """A generator app that records the generators it returned and how far they ran."""

    def __init__(self) -> None:
        self.generators: list[Iterator[bytes]] = []
        self.closed = False

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        generator = self._body(start_response)
        self.generators.append(generator)
        return generator

    def _body(self, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        try:
            yield b"first "
            yield b"second"
        finally:
            self.closed = True


# --- PEP 3333 through every middleware -------------------------------------------------------


def test_validator_harness_catches_a_broken_app() -> None:
    """The harness is not vacuous: an app without Content-Type fails the checks."""

    def no_content_type(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"x"]

    with pytest.raises(AssertionError, match="Content-Type"):
        call(checked(ErrorMiddleware, no_content_type), make_environ())


def test_validator_warnings_are_errors() -> None:
    """A WSGIWarning (here: an unknown method) fails the test instead of passing quietly."""
    with pytest.raises(WSGIWarning, match="REQUEST_METHOD"):
        call(checked(ErrorMiddleware, ok_app), make_environ(method="BREW"))


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PATCH"])
def test_list_response_passes_validated(wrap: Callable[[WSGIApp], WSGIApp], method: str) -> None:
    """A plain list response passes unchanged, checked on both sides of the middleware."""
    result = call(checked(wrap, ok_app), make_environ("/pages/1", method))
    assert (result.status, result.body) == (200, b"ok")
    assert result.headers["content-type"] == "text/plain"


def test_write_callable_works(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """start_response's return value is the server's write: legacy apps keep working."""
    result = call(checked(wrap, write_app), make_environ())
    assert (result.status, result.body) == (200, b"written returned")


def test_exc_info_reaches_the_server(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """An app replacing its own response passes exc_info through to the server."""

    def replacing(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        try:
            raise ValueError("late")
        except ValueError:
            start_response("503 Service Unavailable", TEXT, exc_info_now())
        return [b"replaced"]

    result = call(checked(wrap, replacing), make_environ())
    assert (result.status, result.body) == (503, b"replaced")
    (_, first), (_, second) = result.starts
    assert first is None
    assert second is not None
    assert isinstance(second[1], ValueError)


def test_generator_is_returned_unconsumed(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """The app's iterable comes back before any of it ran; chunks flow one at a time."""
    app = Streaming()
    environ = make_environ()
    server_starts: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Any:
        server_starts.append(status)
        return lambda data: None

    result = wrap(app)(environ, start_response)
    (generator,) = app.generators
    assert inspect.getgeneratorstate(generator) == inspect.GEN_CREATED  # type: ignore[arg-type]
    assert server_starts == []  # the generator has not started the response yet
    iterator = iter(result)
    assert next(iterator) == b"first "
    assert inspect.getgeneratorstate(generator) == inspect.GEN_SUSPENDED  # type: ignore[arg-type]
    assert server_starts == ["200 OK"]
    assert list(iterator) == [b"second"]
    result.close()  # type: ignore[attr-defined]
    assert app.closed


def test_close_after_normal_iteration(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """The app's iterable is closed exactly once after a full iteration."""
    body = Body([b"a", b"b"])
    result = call(checked(wrap, body_app(body)), make_environ())
    assert result.body == b"ab"
    assert body.closes == 1


def test_close_after_an_exception_mid_iteration(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """A body that raises half way is still closed once, and the exception reaches the server."""
    body = Body([b"a", b"b"], fail_at=1)
    with pytest.raises(RuntimeError, match="broken body"):
        call(checked(wrap, body_app(body)), make_environ())
    assert body.closes == 1


def test_close_when_the_server_stops_early(wrap: Callable[[WSGIApp], WSGIApp]) -> None:
    """A server that stops after one chunk (client gone) closes the app's iterable once."""
    body = Body([b"a", b"b", b"c"])
    result = checked(wrap, body_app(body))(make_environ(), lambda *args: lambda data: None)
    iterator = iter(result)
    assert next(iterator) == b"a"
    result.close()  # type: ignore[attr-defined]
    del iterator, result  # dropping a suspended generator must not close the body again
    assert body.yielded == 1
    assert body.closes == 1


def test_metrics_keeps_len_of_a_list_result() -> None:
    """Servers read len() of a list response (Content-Length): the wrapper keeps it."""
    result = MetricsMiddleware(ok_app, Metrics())(make_environ(), lambda *args: lambda data: None)
    try:
        assert len(result) == 2  # type: ignore[arg-type]
    finally:
        result.close()  # type: ignore[attr-defined]


def test_metrics_result_of_a_generator_has_no_len() -> None:
    """A generator response does not pretend to have a length."""
    result = MetricsMiddleware(Streaming(), Metrics())(make_environ(), lambda *a: lambda d: None)
    try:
        assert not hasattr(result, "__len__")
    finally:
        result.close()  # type: ignore[attr-defined]


def test_metrics_returns_a_file_wrapper_as_is() -> None:
    """A wsgi.file_wrapper response is handed to the server untouched (sendfile) and timed."""
    metrics = Metrics()
    wrapped: list[object] = []

    def file_app(environ: Environ, start_response: StartResponse) -> Any:
        start_response("200 OK", TEXT)
        wrapped.append(environ["wsgi.file_wrapper"](io.BytesIO(b"file body"), 4))
        return wrapped[0]

    environ = make_environ()
    result = MetricsMiddleware(file_app, metrics)(environ, lambda *args: lambda data: None)
    assert result is wrapped[0]
    assert isinstance(result, FileWrapper)
    assert observed(metrics, "_unmatched", 200) == 1
    assert active(metrics) == 0
    assert b"".join(result) == b"file body"


# --- generated responses, validated --------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_429_is_valid(method: str) -> None:
    """The rate-limit refusal passes the validator, with an empty body for HEAD."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = checked(lambda inner: RateLimitMiddleware(inner, limiter), ok_app)
    call(app, make_environ(method=method))
    result = call(app, make_environ(method=method))
    assert result.status == 429
    assert result.headers["content-type"] == PROBLEM_JSON
    if method == "HEAD":
        assert result.body == b""
    else:
        assert result.json()["status"] == 429


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_413_is_valid(method: str) -> None:
    """A declared body over the limit gets a valid 413 (empty for HEAD)."""
    app = checked(lambda inner: BodyLimitMiddleware(inner, max_bytes=10), ok_app)
    result = call(app, make_environ(method=method, body=b"x" * 11))
    assert result.status == 413
    assert result.headers["content-type"] == PROBLEM_JSON
    assert (result.body == b"") == (method == "HEAD")


@pytest.mark.parametrize("value", ["+5", "\u0665", "5_0"])
def test_400_for_content_length_int_accepts_but_http_does_not(value: str) -> None:
    """Values Python's int() takes but RFC 9110 does not get a valid 400."""
    app = checked(lambda inner: BodyLimitMiddleware(inner, max_bytes=1024), ok_app)
    result = call(app, make_environ(method="POST", body=b"hello", content_length=value))
    assert result.status == 400
    assert result.json()["title"] == "Malformed request body"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_metrics_app_405_is_valid(method: str) -> None:
    """/metrics answers other methods with a valid 405 naming GET and HEAD."""
    result = call(validator(metrics_app(Metrics())), make_environ(method=method))
    assert result.status == 405
    assert result.headers["allow"] == "GET, HEAD"
    assert result.headers["content-type"] == PROBLEM_JSON


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_metrics_app_401_is_valid(method: str) -> None:
    """A scrape without the token gets a valid 401 with WWW-Authenticate."""
    result = call(validator(metrics_app(Metrics(), auth=TOKEN)), make_environ(method=method))
    assert result.status == 401
    assert result.headers["www-authenticate"].startswith("Bearer")
    assert result.headers["content-type"] == PROBLEM_JSON
    assert (result.body == b"") == (method == "HEAD")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_metrics_app_200_is_valid(method: str) -> None:
    """A scrape passes the validator; HEAD has headers and no body."""
    metrics = Metrics()
    metrics.counter("pages_saved_total", "Pages saved.").inc()
    result = call(validator(metrics_app(metrics)), make_environ(method=method))
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/plain")
    assert (b"pages_saved_total 1.0" in result.body) == (method == "GET")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_health_app_is_valid(method: str) -> None:
    """/healthz passes the validator, passing and failing."""
    for checks, status in (({"ok": lambda: True}, 200), ({"bad": lambda: False}, 503)):
        result = call(validator(health_app(checks)), make_environ(method=method))
        assert result.status == status
        assert result.headers["content-type"] == "application/json"


def test_health_app_405_is_valid() -> None:
    """/healthz answers POST with a valid 405."""
    result = call(validator(health_app()), make_environ(method="POST"))
    assert result.status == 405
    assert result.headers["allow"] == "GET, HEAD"


def test_error_responses_are_valid_for_head() -> None:
    """A mapped error for a HEAD request is valid and has no body."""
    app = checked(ErrorMiddleware, raising_app(PreconditionRequired()))
    result = call(app, make_environ(method="HEAD"))
    assert (result.status, result.body) == (428, b"")
    assert result.headers["content-type"] == PROBLEM_JSON


# --- RateLimitMiddleware ----------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_limiter(request: pytest.FixtureRequest) -> Callable[..., RateLimiter]:
    """Blocking limiters on each storage: memory with a fake clock, then real Redis."""
    if request.param == "memory":
        clock = FakeClock(1_700_000_000.0)
        return lambda limits, **options: RateLimiter(limits, clock=clock, **options)
    redis_client = request.getfixturevalue("redis_client")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    return lambda limits, **options: RateLimiter(
        limits, storage=redis_client, key_prefix=prefix, **options
    )


def test_429_problem_with_rate_limit_headers(make_limiter: Callable[..., RateLimiter]) -> None:
    """The request over the limit gets 429 problem+json with every rate-limit header."""
    app = RateLimitMiddleware(validator(ok_app), make_limiter("2/minute"))
    with client(validator(app)) as http:
        first, second, third = (http.get("/pages/1") for _ in range(3))
    assert [first.status_code, second.status_code] == [200, 200]
    assert [first.headers["x-ratelimit-remaining"], second.headers["x-ratelimit-remaining"]] == [
        "1",
        "0",
    ]
    assert first.text == "ok"
    assert third.status_code == 429
    assert third.headers["content-type"] == PROBLEM_JSON
    assert 1 <= int(third.headers["retry-after"]) <= 120
    assert third.headers["x-ratelimit-limit"] == "2"
    assert third.headers["x-ratelimit-remaining"] == "0"
    assert int(third.headers["x-ratelimit-reset"]) > 1_600_000_000
    assert "q=2" in third.headers["ratelimit-policy"]
    assert "w=60" in third.headers["ratelimit-policy"]
    assert "r=0" in third.headers["ratelimit"]
    problem = third.json()
    assert (problem["status"], problem["title"]) == (429, "Too many requests")
    assert problem["retry_after"] > 0


def test_the_window_passing_admits_again() -> None:
    """After Retry-After seconds (fake clock) the key is admitted again."""
    clock = FakeClock(1_700_000_000.0)
    with client(RateLimitMiddleware(ok_app, RateLimiter("1/minute", clock=clock))) as http:
        assert http.get("/").status_code == 200
        refused = http.get("/")
        assert refused.status_code == 429
        clock.advance(int(refused.headers["retry-after"]))
        assert http.get("/").status_code == 200


def test_app_rate_headers_are_kept_not_duplicated() -> None:
    """Rate-limit headers the app set itself are kept; the middleware adds none beside them."""

    def own_headers(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [*TEXT, ("X-RateLimit-Limit", "999")])
        return [b"ok"]

    limiter = RateLimiter("5/minute", clock=FakeClock())
    result = call(
        checked(lambda app: RateLimitMiddleware(app, limiter), own_headers), make_environ()
    )
    limits = [value for name, value in result.header_list if name.lower() == "x-ratelimit-limit"]
    assert limits == ["999"]
    assert "ratelimit-policy" not in result.headers


def test_decorator_429_inside_the_middleware_keeps_its_headers() -> None:
    """A 429 from limiter.limit deep in the app is not relabelled with the outer, allowed
    decision's headers: the client sees the limit that refused it."""
    inner = RateLimiter("1/minute", clock=FakeClock(), name="export")

    @inner.limit("export")
    def export() -> bytes:
        return b"exported"

    def export_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = export()
        start_response("200 OK", TEXT)
        return [body]

    outer = RateLimiter("100/minute", clock=FakeClock())
    app = RateLimitMiddleware(ErrorMiddleware(export_app), outer)
    allowed = call(validator(app), make_environ())
    assert allowed.headers["x-ratelimit-limit"] == "100"
    refused = call(validator(app), make_environ())
    assert refused.status == 429
    assert refused.headers["x-ratelimit-limit"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert [n.lower() for n, _ in refused.header_list].count("x-ratelimit-limit") == 1


def test_headers_false_adds_none() -> None:
    """headers=False leaves allowed responses alone."""
    limiter = RateLimiter("5/minute", clock=FakeClock())
    result = call(RateLimitMiddleware(ok_app, limiter, headers=False), make_environ())
    assert result.status == 200
    assert not any(name.lower().startswith(("x-ratelimit", "ratelimit")) for name in result.headers)


def test_route_rule_has_its_own_counters(make_limiter: Callable[..., RateLimiter]) -> None:
    """A per-route rule limits only its requests, with counters apart from the main limit."""
    limiter = make_limiter("5/minute")
    app = RateLimitMiddleware(ok_app, limiter, rules={"PATCH /pages/*": "2/minute"})
    with client(validator(app)) as http:
        patches = [http.patch("/pages/1").status_code for _ in range(3)]
        assert patches == [200, 200, 429]
        assert http.patch("/pages/1/blocks").status_code == 200  # '*' is one segment
        assert http.get("/pages/1").status_code == 200
        # the main limit was charged for the two admitted PATCHes, the nested one and the GET
        assert limiter.peek("ip:127.0.0.1").remaining == 1


def test_rule_with_user_key(make_limiter: Callable[..., RateLimiter]) -> None:
    """A RateLimitRule with a user key counts per user, not per address."""
    rule = RateLimitRule(
        "PATCH /pages/*", "1/minute", key=user_key(lambda request: request.headers.get("x-user"))
    )
    app = RateLimitMiddleware(ok_app, make_limiter("100/minute"), rules=[rule])
    with client(app) as http:
        assert http.patch("/pages/1", headers={"X-User": "ann"}).status_code == 200
        assert http.patch("/pages/1", headers={"X-User": "ann"}).status_code == 429
        assert http.patch("/pages/1", headers={"X-User": "bob"}).status_code == 200


def test_rule_without_a_user_falls_back_to_the_address() -> None:
    """A rule key giving None (anonymous) uses the client address."""
    rule = RateLimitRule("/export", "1/minute", key=lambda request: None)
    app = RateLimitMiddleware(ok_app, None, rules=[rule])
    assert call(app, make_environ("/export", remote_addr="198.51.100.1")).status == 200
    assert call(app, make_environ("/export", remote_addr="198.51.100.1")).status == 429
    assert call(app, make_environ("/export", remote_addr="198.51.100.2")).status == 200


def test_tier_callable_including_unlimited() -> None:
    """The tier function picks each request's limits; the unlimited tier is never refused."""
    limiter = RateLimiter("1/minute", clock=FakeClock(), tiers={"pro": 3, "internal": "unlimited"})
    app = RateLimitMiddleware(
        ok_app,
        limiter,
        key=lambda request: request.headers.get("x-user"),
        tier=lambda request: request.headers.get("x-tier"),
    )

    def statuses(user: str, tier: str | None, n: int) -> list[int]:
        headers = {"X-User": user, **({"X-Tier": tier} if tier else {})}
        return [call(app, make_environ(headers=headers)).status for _ in range(n)]

    assert statuses("free", None, 2) == [200, 429]
    assert statuses("paid", "pro", 4) == [200, 200, 200, 429]
    assert statuses("ops", "internal", 20) == [200] * 20
    unlimited = call(app, make_environ(headers={"X-User": "ops", "X-Tier": "internal"}))
    assert "x-ratelimit-limit" not in unlimited.headers


def test_exempt_paths_are_never_limited() -> None:
    """Exempt paths pass without counting or headers, even for a refused client."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = RateLimitMiddleware(ok_app, limiter, exempt_paths=["/healthz", "/static/**"])
    with client(app) as http:
        assert http.get("/").status_code == 200
        assert http.get("/").status_code == 429
        for path in ("/healthz", "/static/css/site.css", "/healthz"):
            response = http.get(path)
            assert response.status_code == 200
            assert "x-ratelimit-limit" not in response.headers
        assert http.get("/healthz/more").status_code == 429


@pytest.fixture
def exhausted() -> WSGIApp:
    """A rate-limited app whose only client (203.0.113.7) has used up its limit."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = RateLimitMiddleware(ok_app, limiter, bypass=TOKEN)
    assert call(app, make_environ()).status == 200
    assert call(app, make_environ()).status == 429
    return app


@pytest.mark.parametrize("header", ["X-RateLimit-Bypass", "Authorization"])
def test_bypass_token_passes(exhausted: WSGIApp, header: str) -> None:
    """The exact token, in its header or as a bearer token, skips the limit."""
    value = f"Bearer {TOKEN}" if header == "Authorization" else TOKEN
    assert call(exhausted, make_environ(headers={header: value})).status == 200


def near_misses(token: str) -> Iterator[str]:
    """Every one-character change of ``token``: each position altered, shorter, longer."""
    for index, char in enumerate(token):
        yield token[:index] + ("x" if char != "x" else "y") + token[index + 1 :]
    yield token[:-1]
    yield token[1:]
    yield token + "0"
    yield "0" + token
    yield ""


@pytest.mark.parametrize("header", ["X-RateLimit-Bypass", "Authorization"])
def test_bypass_token_off_by_one_is_refused(exhausted: WSGIApp, header: str) -> None:
    """A token wrong in any position, or a character short or long, does not bypass."""
    for guess in near_misses(TOKEN):
        value = f"Bearer {guess}" if header == "Authorization" else guess
        result = call(exhausted, make_environ(headers={header: value}))
        assert result.status == 429, guess


def test_bypass_needs_the_bearer_scheme(exhausted: WSGIApp) -> None:
    """The token in Authorization under another scheme does not bypass."""
    for value in (TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}"):
        assert call(exhausted, make_environ(headers={"Authorization": value})).status == 429


def test_bypass_callable() -> None:
    """A bypass function of the request decides."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = RateLimitMiddleware(
        ok_app, limiter, bypass=lambda request: request.headers.get("x-internal") == "1"
    )
    call(app, make_environ())
    assert call(app, make_environ()).status == 429
    assert call(app, make_environ(headers={"X-Internal": "1"})).status == 200


def test_short_bypass_token_is_refused() -> None:
    """A guessable bypass token is a configuration error."""
    with pytest.raises(ConfigurationError, match="16"):
        RateLimitMiddleware(ok_app, "1/minute", bypass="short")


def test_async_limiter_is_a_configuration_error() -> None:
    """The WSGI middleware drives a blocking RateLimiter; an AsyncRateLimiter is refused."""
    with pytest.raises(ConfigurationError, match="AsyncRateLimiter"):
        RateLimitMiddleware(ok_app, AsyncRateLimiter("1/minute"))


def test_async_limiter_in_a_rule_is_a_configuration_error() -> None:
    """An AsyncRateLimiter given as a rule's limits is refused the same way."""
    rule = RateLimitRule("/x", AsyncRateLimiter("1/minute"))
    with pytest.raises(ConfigurationError, match="AsyncRateLimiter"):
        RateLimitMiddleware(ok_app, "5/minute", rules=[rule])


def test_limits_string_builds_a_memory_limiter() -> None:
    """A limits string gives an in-memory RateLimiter."""
    middleware = RateLimitMiddleware(ok_app, "1/minute")
    assert isinstance(middleware.plan.limiter, RateLimiter)
    assert call(middleware, make_environ()).status == 200
    assert call(middleware, make_environ()).status == 429


def test_spoofed_forwarded_for_does_not_change_the_key() -> None:
    """X-Forwarded-For from an untrusted peer is ignored: rotating it does not help."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = RateLimitMiddleware(ok_app, limiter, trusted_proxies=["10.0.0.0/8"])
    statuses = [
        call(app, make_environ(headers={"X-Forwarded-For": f"192.0.2.{i}"})).status
        for i in range(3)
    ]
    assert statuses == [200, 429, 429]


def test_forwarded_for_from_a_trusted_proxy_is_the_key() -> None:
    """Behind a trusted proxy, each forwarded client has its own counter."""
    limiter = RateLimiter("1/minute", clock=FakeClock())
    app = RateLimitMiddleware(ok_app, limiter, trusted_proxies=["10.0.0.0/8"])

    def status(client_ip: str) -> int:
        environ = make_environ(headers={"X-Forwarded-For": client_ip}, remote_addr="10.1.2.3")
        return call(app, environ).status

    assert [status("192.0.2.1"), status("192.0.2.2"), status("192.0.2.1")] == [200, 200, 429]


@pytest.mark.parametrize(("mode", "status"), [("allow", 200), ("deny", 503)])
def test_unreachable_redis_never_500(mode: str, status: int) -> None:
    """Redis down: on_backend_error decides (allow 200, deny 503 not 429), never a 500."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    limiter = RateLimiter("5/minute", storage=url, on_backend_error=mode)  # type: ignore[arg-type]
    try:
        with client(validator(RateLimitMiddleware(validator(ok_app), limiter))) as http:
            responses = [http.get("/") for _ in range(3)]
    finally:
        limiter.close()
    assert [response.status_code for response in responses] == [status] * 3
    if status == 503:
        assert responses[0].headers["content-type"] == PROBLEM_JSON
        assert int(responses[0].headers["retry-after"]) >= 1


# --- MetricsMiddleware --------------------------------------------------------------------------


def flask_pages() -> flask.Flask:
    """A Flask app with ``/pages/<int:page_id>``; page 9 raises ConflictError."""
    app = flask.Flask("pages")

    @app.get("/pages/<int:page_id>")
    def page(page_id: int) -> str:
        if page_id == 9:
            raise ConflictError("Page", page_id, expected_version=3, current_version=4)
        return f"page {page_id}"

    return app


def test_route_template_from_flask() -> None:
    """Flask's matched url_rule is the route label; unknown paths are _unmatched."""
    metrics = Metrics()
    app = flask_pages()
    app.wsgi_app = MetricsMiddleware(app.wsgi_app, metrics)  # type: ignore[method-assign]
    with client(validator(app)) as http:
        assert http.get("/pages/7").text == "page 7"
        assert http.get("/pages/8").status_code == 200
        assert http.get("/nowhere").status_code == 404
    assert observed(metrics, "/pages/<int:page_id>", 200) == 2
    assert observed(metrics, "_unmatched", 404) == 1
    assert active(metrics) == 0


def test_route_template_from_flask_through_the_stack() -> None:
    """MetricsMiddleware finds Flask's wsgi_app down the .app chain of the full stack."""
    metrics = Metrics()
    app = flask_pages()
    app.wsgi_app = full_stack(app.wsgi_app, "100/minute", metrics)  # type: ignore[method-assign]
    with client(validator(app)) as http:
        assert http.get("/pages/7").status_code == 200
    assert observed(metrics, "/pages/<int:page_id>", 200) == 1


def test_route_template_from_flask_behind_other_middleware() -> None:
    """With a plain-function middleware in between, record_flask_routes(app) is called."""
    metrics = Metrics()
    app = flask_pages()
    record_flask_routes(app)
    app.wsgi_app = validator(MetricsMiddleware(validator(app.wsgi_app), metrics))  # type: ignore[method-assign]
    with client(app) as http:
        assert http.get("/pages/7").status_code == 200
        assert http.get("/nowhere").status_code == 404
    assert observed(metrics, "/pages/<int:page_id>", 200) == 1
    assert observed(metrics, "_unmatched", 404) == 1


def test_route_template_from_django() -> None:
    """Django's matched pattern reaches the label through RouteMiddleware."""
    metrics = Metrics()
    app = validator(MetricsMiddleware(validator(django_app.wsgi_application()), metrics))
    with client(app) as http:
        assert http.get("/pages/3").text == "page 3"
        assert http.get("/nowhere").status_code == 404
    assert observed(metrics, "/pages/<int:pk>", 200) == 1
    assert observed(metrics, "_unmatched", 404) == 1


def test_route_template_from_environ() -> None:
    """A bare app names its route in environ["hardening.route"]."""
    metrics = Metrics()
    app = checked(lambda inner: MetricsMiddleware(inner, metrics), route_app("/items/{id}"))
    with client(app) as http:
        http.get("/items/1")
        http.get("/items/2")
    assert observed(metrics, "/items/{id}", 200) == 2


def test_unmatched_for_a_bare_app_without_a_route() -> None:
    """Without a route, the request is labelled _unmatched (bounded cardinality)."""
    metrics = Metrics()
    with client(MetricsMiddleware(ok_app, metrics)) as http:
        for i in range(5):
            http.get(f"/random/{i}")
    assert observed(metrics, "_unmatched", 200) == 5


def test_app_raising_is_500_with_its_type_and_propagates() -> None:
    """An app that raises is recorded as 500 with the exception class; the error goes on."""
    metrics = Metrics()
    app = MetricsMiddleware(raising_app(KeyError("boom")), metrics)
    with pytest.raises(KeyError):
        call(app, make_environ())
    assert observed(metrics, "_unmatched", 500, "KeyError") == 1
    assert active(metrics) == 0


def test_exception_during_iteration_records_its_type() -> None:
    """A body that raises while the server iterates is recorded with the exception class."""
    metrics = Metrics()
    app = MetricsMiddleware(body_app(Body([b"a", b"b"], fail_at=1)), metrics)
    with pytest.raises(RuntimeError):
        call(app, make_environ())
    assert observed(metrics, "_unmatched", 200, "RuntimeError") == 1
    assert active(metrics) == 0


def test_request_ends_at_close() -> None:
    """The request is active while the body iterates and observed only at close()."""
    metrics = Metrics()
    body = Body([b"a", b"b"])
    result = MetricsMiddleware(body_app(body), metrics)(
        make_environ(), lambda *args: lambda data: None
    )
    assert active(metrics) == 1
    assert list(result) == [b"a", b"b"]
    assert active(metrics) == 1
    assert observed(metrics, "_unmatched", 200) == 0
    result.close()  # type: ignore[attr-defined]
    assert active(metrics) == 0
    assert observed(metrics, "_unmatched", 200) == 1


def test_status_of_a_replaced_response_is_recorded() -> None:
    """When ErrorMiddleware replaces a started response, the final status is recorded."""

    def started_then_conflict(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        raise ConflictError("Page", 1, expected_version=1, current_version=2)

    metrics = Metrics()
    result = call(
        MetricsMiddleware(ErrorMiddleware(started_then_conflict), metrics), make_environ()
    )
    assert result.status == 409
    assert observed(metrics, "_unmatched", 409) == 1


def test_exclude_paths_are_not_observed() -> None:
    """Excluded paths are neither observed nor counted as active."""
    metrics = Metrics()
    app = MetricsMiddleware(ok_app, metrics, exclude_paths=["/metrics", "/static/**"])
    with client(app) as http:
        http.get("/metrics")
        http.get("/static/a/b.js")
        http.get("/page")
    assert observed(metrics, "_unmatched", 200) == 1


# --- ErrorMiddleware --------------------------------------------------------------------------

ERRORS: list[tuple[HardeningError, int, dict[str, object]]] = [
    (
        ConflictError("Page", 7, expected_version=3, current_version=5),
        409,
        {"entity": "Page", "key": 7, "expected_version": 3, "current_version": 5},
    ),
    (PreconditionFailed('"v3"', '"v5"'), 412, {"if_match": '"v3"', "current_etag": '"v5"'}),
    (PreconditionRequired(), 428, {"header": "If-Match"}),
    (
        InvalidPatch("unknown op 'frob'", op_index=2, op={"op": "frob"}),
        422,
        {"op_index": 2, "op": {"op": "frob"}},
    ),
    (MalformedBody("not JSON"), 400, {"reason": "not JSON"}),
    (
        UnsupportedMediaType("text/plain"),
        415,
        {"media_type": "text/plain", "accept_patch": ["application/json-patch+json"]},
    ),
    (
        PatchConflict("both edited", block_id="b1", field="/text", op_index=0),
        409,
        {"block_id": "b1", "field": "/text", "op_index": 0},
    ),
]


@pytest.mark.parametrize(("exc", "status", "members"), ERRORS, ids=lambda v: type(v).__name__)
def test_error_mapping(exc: HardeningError, status: int, members: dict[str, object]) -> None:
    """Each hardening error becomes its status as problem+json carrying its data."""
    with client(checked(ErrorMiddleware, raising_app(exc))) as http:
        response = http.get("/pages/7")
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["status"] == status
    assert problem["title"] == exc.title
    for name, value in members.items():
        assert problem[name] == value


def test_unsupported_media_type_sends_accept_patch() -> None:
    """415 tells the client which patch format to use."""
    app = ErrorMiddleware(raising_app(UnsupportedMediaType("application/json")))
    with client(app) as http:
        response = http.patch("/pages/1")
    assert response.headers["accept-patch"] == "application/json-patch+json"


def test_rate_limit_decorator_gives_429_with_headers() -> None:
    """RateLimitExceeded from RateLimiter.limit becomes 429 with Retry-After and its headers."""
    limiter = RateLimiter("1/minute", clock=FakeClock())

    @limiter.limit("export")
    def export() -> bytes:
        return b"exported"

    def export_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = export()
        start_response("200 OK", TEXT)
        return [body]

    with client(checked(ErrorMiddleware, export_app)) as http:
        assert http.get("/export").text == "exported"
        refused = http.get("/export")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert "ratelimit" in refused.headers
    assert refused.json()["limit"]


def test_error_before_start_response_sends_no_exc_info() -> None:
    """Nothing started: the error response carries no exc_info, which clients would re-raise."""
    exc = ConflictError("Page", 1, expected_version=1, current_version=2)
    result = call(ErrorMiddleware(raising_app(exc)), make_environ())
    assert result.status == 409
    assert [exc_info for _, exc_info in result.starts] == [None]
    response = werkzeug.test.Client(ErrorMiddleware(raising_app(exc))).get("/")
    assert response.status_code == 409


def test_started_response_is_replaced_through_exc_info() -> None:
    """An app that started a 200 before raising gets its response replaced via exc_info."""

    def started_then_failed(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [*TEXT, ("X-Partial", "1")])
        raise PreconditionFailed('"v1"', '"v2"')

    result = call(checked(ErrorMiddleware, started_then_failed), make_environ())
    assert result.status == 412
    assert "x-partial" not in result.headers
    assert result.headers["content-type"] == PROBLEM_JSON
    (_, first), (_, second) = result.starts
    assert first is None
    assert second is not None
    assert isinstance(second[1], PreconditionFailed)


def test_non_hardening_exceptions_propagate() -> None:
    """Other exceptions are left to the server (or an outer handler)."""
    with pytest.raises(ZeroDivisionError):
        call(ErrorMiddleware(raising_app(ZeroDivisionError())), make_environ())


def test_errors_during_iteration_pass_through() -> None:
    """An error raised while the body streams cannot change the response; it propagates."""

    def late(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"partial"
        raise ConflictError("Page", 1, expected_version=1, current_version=2)

    with pytest.raises(ConflictError):
        call(ErrorMiddleware(late), make_environ())


def test_flask_error_handler() -> None:
    """Flask: the registered handler answers hardening errors as problem+json."""
    app = flask_pages()
    app.register_error_handler(HardeningError, flask_error_handler)
    with client(validator(app)) as http:
        response = http.get("/pages/9")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["expected_version"] == 3
    assert response.json()["current_version"] == 4


def test_flask_without_the_handler_hides_errors_from_the_middleware() -> None:
    """Why the handler exists: Flask turns a view's exception into its own 500 inside
    wsgi_app, so ErrorMiddleware around the Flask app never sees the ConflictError."""
    app = flask_pages()
    app.logger.disabled = True  # the 500 is expected; keep its traceback out of the output
    app.wsgi_app = ErrorMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    with client(app) as http:
        assert http.get("/pages/9").status_code == 500


def test_django_error_response_middleware() -> None:
    """Django: ErrorResponseMiddleware answers a view's ConflictError with problem+json 409."""
    with client(validator(django_app.wsgi_application())) as http:
        response = http.get(f"/pages/{django_app.CONFLICT_PK}")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["current_version"] == 2


# --- BodyLimitMiddleware ----------------------------------------------------------------------

LIMIT = 64
# 256 distinct bytes, a newline every 10 (readline sees lines), CR and NUL included
PAYLOAD = bytes(range(256))

Reader = Callable[[Any], bytes]
READERS: dict[str, Reader] = {
    "read()": lambda stream: stream.read(),
    "read(-1)": lambda stream: stream.read(-1),
    "read(n) loop": lambda stream: b"".join(iter(lambda: stream.read(7), b"")),
    "readline()": lambda stream: b"".join(iter(stream.readline, b"")),
    "readline(n)": lambda stream: b"".join(iter(lambda: stream.readline(5), b"")),
    "readlines()": lambda stream: b"".join(stream.readlines()),
    "iteration": lambda stream: b"".join(stream),
}


def echo_app(reader: Reader, seen: list[bytes]) -> WSGIApp:
    """An app that reads the whole body with ``reader`` and echoes it."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = reader(environ["wsgi.input"])
        seen.append(body)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]

    return app


def test_declared_length_over_the_limit_never_calls_the_app() -> None:
    """Content-Length over max_bytes: 413 before the app runs."""
    called: list[bool] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        called.append(True)
        return ok_app(environ, start_response)

    with client(validator(BodyLimitMiddleware(app, max_bytes=LIMIT))) as http:
        response = http.post("/upload", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json()["max_bytes"] == LIMIT
    assert called == []


def test_declared_length_at_the_limit_passes() -> None:
    """A body of exactly max_bytes is allowed and arrives whole."""
    seen: list[bytes] = []
    app = BodyLimitMiddleware(echo_app(lambda s: s.read(LIMIT), seen), max_bytes=LIMIT)
    with client(validator(app)) as http:
        response = http.post("/upload", content=PAYLOAD[:LIMIT])
    assert response.status_code == 200
    assert response.content == PAYLOAD[:LIMIT]


@pytest.mark.parametrize("value", ["abc", "-1", "1" * 30, "1.5", "0x10", "5, 6", " "])
def test_malformed_content_length_is_400(value: str) -> None:
    """A Content-Length that is not a non-negative decimal gets 400 without the app."""
    app = BodyLimitMiddleware(validator(ok_app), max_bytes=LIMIT)
    result = call(app, make_environ(method="POST", body=b"x", content_length=value))
    assert result.status == 400
    assert result.headers["content-type"] == PROBLEM_JSON


@pytest.mark.parametrize("reader", list(READERS))
def test_chunked_body_over_the_limit_is_413(reader: str) -> None:
    """A body without Content-Length is counted as the app reads it: past the limit, 413."""
    seen: list[bytes] = []
    app = validator(BodyLimitMiddleware(echo_app(READERS[reader], seen), max_bytes=LIMIT))
    result = call(app, make_environ(method="POST", body=PAYLOAD, chunked=True))
    assert result.status == 413
    assert result.json()["max_bytes"] == LIMIT
    assert seen == []


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("size", [0, 1, 10, LIMIT - 1, LIMIT])
def test_allowed_chunked_body_arrives_byte_identical(reader: str, size: int) -> None:
    """A chunked body within the limit reaches the app unchanged, however it reads it."""
    seen: list[bytes] = []
    app = validator(BodyLimitMiddleware(echo_app(READERS[reader], seen), max_bytes=LIMIT))
    result = call(app, make_environ(method="POST", body=PAYLOAD[:size], chunked=True))
    assert result.status == 200
    assert seen == [PAYLOAD[:size]]
    assert result.body == PAYLOAD[:size]


class RecordingStream:
    """A wsgi.input recording the sizes asked for and the bytes handed out."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)
        self.asked: list[int] = []
        self.handed = 0

    def read(self, size: int = -1) -> bytes:
        self.asked.append(size)
        data = self._stream.read(size)
        self.handed += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        self.asked.append(size)
        data = self._stream.readline(size)
        self.handed += len(data)
        return data


@pytest.mark.parametrize("request_size", [-1, LIMIT + 2, 10**12])
def test_huge_read_never_reads_past_limit_plus_one(request_size: int) -> None:
    """read(huge) asks the server's stream for at most max_bytes + 1 bytes."""
    stream = RecordingStream(b"\n".join([b"y" * 1000] * 1000))
    seen: list[bytes] = []
    app = BodyLimitMiddleware(echo_app(lambda s: s.read(request_size), seen), max_bytes=LIMIT)
    result = call(app, make_environ(method="POST", chunked=True, **{"wsgi.input": stream}))
    assert result.status == 413
    assert stream.handed <= LIMIT + 1
    assert all(0 <= size <= LIMIT + 1 for size in stream.asked)


def test_huge_readline_never_reads_past_limit_plus_one() -> None:
    """readline() on one huge line is bounded the same way."""
    stream = RecordingStream(b"z" * 1_000_000)
    seen: list[bytes] = []
    app = BodyLimitMiddleware(echo_app(lambda s: s.readline(), seen), max_bytes=LIMIT)
    result = call(app, make_environ(method="POST", chunked=True, **{"wsgi.input": stream}))
    assert result.status == 413
    assert stream.handed <= LIMIT + 1


def test_payload_too_large_caught_by_error_middleware_too() -> None:
    """Inside the full stack, ErrorMiddleware answers the streaming 413 first."""
    seen: list[bytes] = []
    app = full_stack(echo_app(READERS["read()"], seen), "100/minute", Metrics(), max_bytes=LIMIT)
    result = call(validator(app), make_environ(method="POST", body=PAYLOAD, chunked=True))
    assert result.status == 413


def test_body_limit_413_replaces_a_started_response() -> None:
    """An app that started responding before reading too much gets a 413 instead."""

    def start_then_read(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", TEXT)
        environ["wsgi.input"].read()
        return [b"never"]

    app = BodyLimitMiddleware(start_then_read, max_bytes=LIMIT)
    result = call(app, make_environ(method="POST", body=PAYLOAD, chunked=True))
    assert result.status == 413
    assert result.starts[-1][1] is not None


def test_body_limit_rejects_a_bad_max_bytes() -> None:
    """max_bytes must be a non-negative integer."""
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ConfigurationError):
            BodyLimitMiddleware(ok_app, max_bytes=bad)  # type: ignore[arg-type]


# --- metrics_app --------------------------------------------------------------------------------


@pytest.fixture
def scraped() -> Metrics:
    """A registry with one counter incremented."""
    metrics = Metrics()
    metrics.counter("pages_saved_total", "Pages saved.").inc(3)
    return metrics


def test_metrics_app_text_by_default(scraped: Metrics) -> None:
    """Without Accept, the Prometheus text format."""
    with client(validator(metrics_app(scraped))) as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "pages_saved_total 3.0" in response.text


def test_metrics_app_openmetrics_when_asked(scraped: Metrics) -> None:
    """Accept: application/openmetrics-text gets OpenMetrics (ending in # EOF)."""
    with client(validator(metrics_app(scraped))) as http:
        response = http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_metrics_app_gzip(scraped: Metrics) -> None:
    """A scraper accepting gzip gets a gzip body with Content-Encoding and a true length."""
    result = call(
        validator(metrics_app(scraped)), make_environ(headers={"Accept-Encoding": "gzip"})
    )
    assert result.headers["content-encoding"] == "gzip"
    assert result.headers["content-type"].startswith("text/plain")
    assert int(result.headers["content-length"]) == len(result.body)
    assert b"pages_saved_total 3.0" in gzip.decompress(result.body)


def test_metrics_app_bearer_token(scraped: Metrics) -> None:
    """With a token: 401 + WWW-Authenticate without or with a wrong one, 200 with it."""
    app = validator(metrics_app(scraped, auth=TOKEN))
    with client(app) as http:
        missing = http.get("/metrics")
        wrong = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
        right = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
        assert refused.headers["content-type"] == PROBLEM_JSON
    assert right.status_code == 200
    assert "pages_saved_total" in right.text


def test_metrics_app_callable_auth(scraped: Metrics) -> None:
    """A function of the request decides who may scrape."""
    app = validator(metrics_app(scraped, auth=lambda request: request.client == "10.0.0.5"))
    with client(app, remote_addr="10.0.0.5") as http:
        assert http.get("/metrics").status_code == 200
    with client(app, remote_addr="10.0.0.6") as http:
        assert http.get("/metrics").status_code == 401


def test_metrics_app_mounted_behind_the_stack(scraped: Metrics) -> None:
    """/metrics reports the requests the stack observed."""
    stack = full_stack(route_app("/pages/{id}"), "100/minute", scraped)
    with client(stack) as http:
        http.get("/pages/1")
    with client(metrics_app(scraped)) as http:
        text = http.get("/metrics").text
    assert 'http_route="/pages/{id}"' in text


# --- health_app --------------------------------------------------------------------------------


def test_health_ok() -> None:
    """Every check passing: 200 and each check reported ok."""
    with client(health_app({"db": lambda: True, "cache": lambda: None})) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "ok"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "db": "ok",
        "cache": "ok",
    }


def test_health_without_checks_is_ok() -> None:
    """No checks: 200."""
    with client(health_app()) as http:
        assert http.get("/healthz").json() == {"status": "ok", "checks": {}}


def test_health_failing_check_reports_its_type_not_its_message() -> None:
    """A check that raises: 503 naming the exception type, never its message."""

    def leaky() -> bool:
        raise ConnectionRefusedError("password=hunter2 at db.internal:5432")

    with client(health_app({"db": leaky, "cache": lambda: True})) as http:
        response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["db"] == {
        "status": "fail",
        "duration_ms": response.json()["checks"]["db"]["duration_ms"],
        "error": "ConnectionRefusedError",
    }
    assert response.json()["checks"]["cache"]["status"] == "ok"
    assert "hunter2" not in response.text
    assert "internal" not in response.text


def test_health_check_returning_false_fails() -> None:
    """A check returning False fails."""
    with client(health_app({"flag": lambda: False})) as http:
        response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["flag"]["error"] == "check returned False"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event a hanging check waits on; set at teardown so its thread ends."""
    event = threading.Event()
    yield event
    event.set()


def test_health_timeout(release: threading.Event) -> None:
    """A check past the timeout: 503 "timeout", answered after about the timeout."""
    app = health_app({"slow": lambda: release.wait(30), "fast": lambda: True}, timeout=0.2)
    start = time.monotonic()
    with client(app) as http:
        response = http.get("/healthz")
    elapsed = time.monotonic() - start
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["slow"]["error"] == "timeout"
    assert checks["fast"]["status"] == "ok"
    assert 0.2 <= elapsed < 30  # waited for the timeout, not for the check


def test_health_hung_check_does_not_starve_the_others(release: threading.Event) -> None:
    """Probe after probe with one check hung: the healthy check keeps reporting ok."""
    app = health_app({"hung": lambda: release.wait(30), "fast": lambda: True}, timeout=0.05)
    for _ in range(6):  # more probes than the pool has threads
        checks = json.loads(call(app, make_environ()).body)["checks"]
        assert checks["hung"]["error"] == "timeout"
        assert checks["fast"]["status"] == "ok"


def test_health_hung_check_is_not_started_again(release: threading.Event) -> None:
    """While a check hangs, later probes wait on that run; once it returns, it runs afresh."""
    runs: list[int] = []

    def hung() -> bool:
        runs.append(1)
        return release.wait(30)

    app = health_app({"hung": hung}, timeout=0.05)
    for _ in range(3):
        assert call(app, make_environ()).status == 503
    assert len(runs) == 1
    release.set()
    deadline = time.monotonic() + 10
    while call(app, make_environ()).status != 200:  # the hung run ends, then a fresh one passes
        assert time.monotonic() < deadline
    assert len(runs) in (1, 2)


def test_health_async_check() -> None:
    """An async check function is run to completion."""

    async def ping() -> bool:
        await asyncio.sleep(0)
        return True

    async def down() -> bool:
        await asyncio.sleep(0)
        raise TimeoutError

    with client(health_app({"ping": ping, "down": down})) as http:
        response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["ping"]["status"] == "ok"
    assert response.json()["checks"]["down"]["error"] == "timeout"


def test_health_check_must_be_callable() -> None:
    """A non-callable check is a configuration error."""
    with pytest.raises(ConfigurationError):
        health_app({"db": "SELECT 1"})  # type: ignore[dict-item]


def test_health_redis_check(redis_client: redis.Redis) -> None:
    """redis_check PINGs a real Redis."""
    with client(validator(health_app({"redis": redis_check(redis_client)}))) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["redis"]["status"] == "ok"


def test_health_redis_check_unreachable() -> None:
    """redis_check against a closed port fails the health check (503, error type only)."""
    down = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with client(health_app({"redis": redis_check(down)}, timeout=10)) as http:
            response = http.get("/healthz")
    finally:
        down.close()
    assert response.status_code == 503
    assert response.json()["checks"]["redis"]["error"] == "ConnectionError"


@pytest.mark.parametrize(
    "engine_fixture", ["sqlite_engine", pytest.param("pg_engine", marks=pytest.mark.postgres)]
)
def test_health_sql_check(request: pytest.FixtureRequest, engine_fixture: str) -> None:
    """sql_check runs SELECT 1 on SQLite and on real PostgreSQL."""
    engine = request.getfixturevalue(engine_fixture)
    with client(validator(health_app({"sql": sql_check(engine)}))) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["sql"]["status"] == "ok"


def test_health_body_is_json_for_head() -> None:
    """HEAD gets the status and headers, no body."""
    result = call(health_app({"db": lambda: False}), make_environ(method="HEAD"))
    assert (result.status, result.body) == (503, b"")
    assert json.loads(call(health_app(), make_environ()).body)["status"] == "ok"
