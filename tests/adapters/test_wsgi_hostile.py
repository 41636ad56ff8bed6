"""Hostile requests through the whole WSGI stack never make our code answer 500.

The stack is the documented order, BodyLimit(Metrics(RateLimit(Error(app)))), with every
rate-limit option that reads the request (rules, bypass token, trusted proxies, exempt paths).
Huge headers, paths that are not UTF-8, absurd ``Content-Length`` values, 10,000-hop
``X-Forwarded-For`` chains and random header sets (hypothesis) must each get a 2xx or 4xx,
pass ``wsgiref.validate`` and be observed once (BodyLimit, outermost, refuses a declared
length over the limit before metrics see it).
"""

from __future__ import annotations

from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening import ConflictError, FakeClock, Metrics
from hardening.adapters.wsgi import metrics_app
from hardening.ratelimit import RateLimiter
from tests.adapters.wsgi_support import (
    TOKEN,
    Environ,
    StartResponse,
    WSGIApp,
    call,
    full_stack,
    make_environ,
)

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

HTTP = "http_server_request_duration_seconds"
METHODS = ["GET", "HEAD", "POST", "OPTIONS", "PATCH", "PUT", "DELETE", "TRACE"]


def page_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Reads the body in chunks, names its route, and raises ConflictError under /conflict."""
    stream = environ["wsgi.input"]
    size = 0
    while chunk := stream.read(256):
        size += len(chunk)
    environ["hardening.route"] = "/pages/{id}"
    if environ["PATH_INFO"].startswith("/conflict"):
        raise ConflictError("Page", 1, expected_version=1, current_version=2)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(size).encode()]


def stack(metrics: Metrics, limits: str = "1000/minute") -> WSGIApp:
    """The full stack around ``page_app`` with every request-reading option on."""
    return full_stack(
        validator(page_app),
        RateLimiter(limits, clock=FakeClock()),
        metrics,
        max_bytes=1024,
        rules={"PATCH,PUT /pages/*": "100/minute"},
        bypass=TOKEN,
        trusted_proxies=["10.0.0.0/8", "fd00::/8"],
        exempt_paths=["/healthz", "/static/**"],
    )


def observations(metrics: Metrics) -> float:
    """Requests observed, over every label set."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == HTTP
        for sample in family.samples
        if sample.name == f"{HTTP}_count"
    )


def send(environ: Environ, *, validate_outside: bool = True) -> tuple[int, Metrics]:
    """One request through a fresh stack; the status and the registry."""
    metrics = Metrics()
    app = stack(metrics)
    result = call(validator(app) if validate_outside else app, environ)
    return result.status, metrics


def in_flight(metrics: Metrics) -> float:
    """Requests still counted as active, over every method."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "http_server_active_requests"
        for sample in family.samples
    )


def assert_handled(status: int, metrics: Metrics) -> None:
    """Not a server error, observed once (unless refused outside metrics), nothing active."""
    assert 200 <= status < 500, status
    if status in (400, 413):  # BodyLimit is outermost: a refused declared length is not seen
        assert observations(metrics) <= 1
    else:
        assert observations(metrics) == 1
    assert in_flight(metrics) == 0


BIG = "a" * 100_000


@pytest.mark.parametrize(
    "header",
    ["X-Anything", "X-Forwarded-For", "Authorization", "X-RateLimit-Bypass", "Cookie", "Accept"],
)
def test_100_kb_header(header: str) -> None:
    """A 100 KB header value, wherever it lands, is handled."""
    status, metrics = send(make_environ("/pages/1", headers={header: BIG}))
    assert status == 200
    assert_handled(status, metrics)


def test_100_kb_bearer_token() -> None:
    """A 100 KB bearer token is compared and refused, not crashed on."""
    environ = make_environ("/pages/1", headers={"Authorization": "Bearer " + BIG})
    status, metrics = send(environ)
    assert_handled(status, metrics)


def test_100_kb_accept_headers_on_metrics_app() -> None:
    """Huge Accept and Accept-Encoding headers on /metrics still get a valid scrape."""
    headers = {"Accept": BIG, "Accept-Encoding": BIG, "Authorization": BIG}
    result = call(validator(metrics_app(Metrics())), make_environ(headers=headers))
    assert result.status == 200
    assert result.headers["content-type"]


@pytest.mark.parametrize(
    "path",
    [
        "/pages/\xe9\xff\x80",  # latin-1 text of bytes that are not UTF-8
        "/pages/\xc3\xa9",  # UTF-8 'é' as PEP 3333 gives it
        "/pages/\u20ac",  # already decoded by a non-conforming server
        "/static/\x00\x01",
        "/healthz\xff",
        "/" + "\xff" * 10_000,
    ],
)
def test_path_that_is_not_utf8(path: str) -> None:
    """PATH_INFO that is not UTF-8 (or not even latin-1) goes through rules and patterns."""
    for method in ("GET", "PATCH"):
        status, metrics = send(make_environ(path, method))
        assert status == 200
        assert_handled(status, metrics)


@pytest.mark.parametrize(
    "value", ["1" * 30, "9" * 19, "-1", "abc", "", "1e3", "0x10", "1, 2", "\xff", "1\x00"]
)
def test_absurd_content_length(value: str) -> None:
    """Absurd Content-Length values get 400/413 (the outer validator would itself choke)."""
    environ = make_environ("/pages/1", "POST", body=b"x", content_length=value)
    status, metrics = send(environ, validate_outside=False)
    assert status in (200, 400, 413)
    assert_handled(status, metrics)


@pytest.mark.parametrize("remote", ["10.0.0.1", "203.0.113.9", "fd00::1"])
def test_ten_thousand_hop_forwarded_for(remote: str) -> None:
    """A 10,000-hop X-Forwarded-For, from a trusted proxy or not, is handled."""
    hops = ", ".join(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(10_000))
    environ = make_environ("/pages/1", headers={"X-Forwarded-For": "198.51.100.4, " + hops})
    environ["REMOTE_ADDR"] = remote
    status, metrics = send(environ)
    assert status == 200
    assert_handled(status, metrics)


@pytest.mark.parametrize("remote", ["", "unix:/run/app.sock", "not an ip", "[::1]:443"])
def test_odd_remote_addr(remote: str) -> None:
    """An empty or non-IP REMOTE_ADDR (Unix sockets) still gets a key."""
    environ = make_environ("/pages/1", headers={"X-Forwarded-For": "192.0.2.1"})
    environ["REMOTE_ADDR"] = remote
    status, metrics = send(environ)
    assert status == 200
    assert_handled(status, metrics)


# --- random requests ----------------------------------------------------------------------------

LATIN1 = st.characters(min_codepoint=0, max_codepoint=0xFF)
header_names = st.one_of(
    st.sampled_from(
        [
            "X-Forwarded-For",
            "Authorization",
            "X-RateLimit-Bypass",
            "Content-Type",
            "Accept",
            "Accept-Encoding",
            "Cookie",
            "Host",
            "Transfer-Encoding",
        ]
    ),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,24}\Z"),
).filter(lambda name: name.upper().replace("-", "_") != "CONTENT_LENGTH")
forwarded = st.lists(
    st.one_of(st.ip_addresses().map(str), st.text(LATIN1, max_size=20)), max_size=20
).map(", ".join)
header_values = st.one_of(
    st.text(LATIN1, max_size=300),
    forwarded,
    st.just(TOKEN),
    st.just(f"Bearer {TOKEN}"),
    st.text(LATIN1, max_size=3).map(lambda s: TOKEN[:-1] + s),
)
content_lengths = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=3000).map(str),
    st.from_regex(r"\A[0-9]{1,30}\Z"),
    st.sampled_from(["+5", "5_0", "\u0665", " 7\t"]),  # int() takes these, HTTP does not
)


@st.composite
def environs(draw: st.DrawFn) -> Environ:
    """A random but server-shaped environ (validator-clean), with hostile content."""
    body = draw(st.binary(max_size=2000))
    chunked = draw(st.booleans())
    prefix = draw(st.sampled_from(["pages/1", "conflict", "healthz", "static/x/y", ""]))
    return make_environ(
        "/" + prefix + draw(st.text(LATIN1, max_size=40)),
        draw(st.sampled_from(METHODS)),
        headers=draw(st.dictionaries(header_names, header_values, max_size=8)),
        body=body,
        content_length=None if chunked else draw(content_lengths),
        chunked=chunked,
        remote_addr=draw(
            st.one_of(st.ip_addresses().map(str), st.sampled_from(["10.0.0.1", "", "x"]))
        ),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(environ=environs())
def test_random_requests_never_500(environ: Environ) -> None:
    """Random header sets, paths, methods and bodies: never a 500, always PEP 3333 valid."""
    status, metrics = send(environ)
    assert_handled(status, metrics)
