"""Helpers for the WSGI adapter tests: environs, a strict in-test server, small apps.

``call`` plays a PEP 3333 server: it honours ``exc_info`` (replacing a response whose headers
are not sent yet, re-raising otherwise), gives ``write``, counts the body written through it,
and always calls ``close()`` on the app's iterable. ``checked`` wraps a middleware in
``wsgiref.validate.validator`` on both sides.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from wsgiref.util import FileWrapper, setup_testing_defaults
from wsgiref.validate import validator

import httpx

from hardening import Metrics
from hardening.adapters.wsgi import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
)
from hardening.ratelimit import RateLimiter

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

TOKEN = "admin-bypass-token-0123456789abcdef"  # a rate-limit bypass token


def make_environ(
    path: str = "/",
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    content_length: str | None = None,
    chunked: bool = False,
    remote_addr: str = "203.0.113.7",
    **extra: Any,
) -> Environ:
    """A complete environ (``wsgiref.util.setup_testing_defaults``) for one request.

    Args:
        path: ``PATH_INFO`` (PEP 3333 text: bytes as latin-1).
        method: ``REQUEST_METHOD``.
        headers: request headers by name; become ``HTTP_*`` (or ``CONTENT_TYPE``).
        body: the bytes behind ``wsgi.input``.
        content_length: ``CONTENT_LENGTH``; defaults to ``len(body)`` when there is a body.
        chunked: no ``CONTENT_LENGTH`` and ``wsgi.input_terminated`` set (a chunked body).
        remote_addr: ``REMOTE_ADDR``.
        **extra: more environ keys.
    """
    environ: Environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "REMOTE_ADDR": remote_addr,
        "wsgi.input": io.BytesIO(body),
        "wsgi.file_wrapper": FileWrapper,
    }
    if chunked:
        environ["wsgi.input_terminated"] = True
    elif content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    elif body:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    environ.update(extra)
    setup_testing_defaults(environ)
    return environ


@dataclass
class Result:
    """What the in-test server sent."""

    status: int
    header_list: list[tuple[str, str]]
    body: bytes
    starts: list[tuple[str, ExcInfo | None]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        """Header names (lower case) to values; a repeated name keeps its last value."""
        return {name.lower(): value for name, value in self.header_list}

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Server:
    """One request's server side: ``start_response``, ``write`` and the sent status."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.header_list: list[tuple[str, str]] = []
        self.starts: list[tuple[str, ExcInfo | None]] = []
        self.sent = False
        self.written: list[bytes] = []

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        """PEP 3333 ``start_response``."""
        if exc_info is not None:
            if self.sent:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self.status is not None:
            raise AssertionError("start_response called again without exc_info")
        self.status = status
        self.header_list = list(headers)
        self.starts.append((status, exc_info))
        return self.write

    def write(self, data: bytes) -> None:
        """The ``write`` callable start_response returns."""
        assert isinstance(data, bytes)
        assert self.status is not None, "write() before start_response()"
        self.sent = True
        self.written.append(data)


def call(app: WSGIApp, environ: Environ) -> Result:
    """Run one request through ``app`` like a server would, closing its iterable."""
    server = Server()
    result = app(environ, server.start_response)
    chunks: list[bytes] = []
    try:
        for chunk in result:
            assert isinstance(chunk, bytes)
            if chunk:
                server.sent = True
            chunks.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    assert server.status is not None, "the app never called start_response"
    return Result(
        int(server.status[:3]),
        server.header_list,
        b"".join(server.written) + b"".join(chunks),
        server.starts,
    )


def checked(wrap: Callable[[WSGIApp], WSGIApp], inner: WSGIApp) -> WSGIApp:
    """``validator(wrap(validator(inner)))``: PEP 3333 checked on both sides of a middleware."""
    return validator(wrap(validator(inner)))


def full_stack(
    app: WSGIApp, limiter: RateLimiter | str, metrics: Metrics, max_bytes: int = 1024, **rl: Any
) -> WSGIApp:
    """The documented order: BodyLimit(Metrics(RateLimit(Error(app)))); ``rl`` for RateLimit."""
    return BodyLimitMiddleware(
        MetricsMiddleware(RateLimitMiddleware(ErrorMiddleware(app), limiter, **rl), metrics),
        max_bytes=max_bytes,
    )


def client(app: WSGIApp, **options: Any) -> httpx.Client:
    """An httpx client calling ``app`` in process through ``httpx.WSGITransport``."""
    return httpx.Client(
        transport=httpx.WSGITransport(app=app, **options), base_url="http://testserver"
    )


# --- apps -----------------------------------------------------------------------------------

TEXT = [("Content-Type", "text/plain")]


def ok_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """``200 ok`` as a list of two chunks."""
    start_response("200 OK", [*TEXT, ("Content-Length", "2")])
    return [b"o", b"k"]


def write_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Sends part of its body through the ``write`` callable (the legacy API)."""
    write = start_response("200 OK", TEXT)
    write(b"written ")
    return [b"returned"]


def route_app(template: str) -> WSGIApp:
    """An app that reports ``template`` as its matched route in ``environ``."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        environ["hardening.route"] = template
        start_response("200 OK", TEXT)
        return [b"routed"]

    return app


def raising_app(exc: BaseException) -> WSGIApp:
    """An app that raises ``exc`` before responding."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        raise exc

    return app


class Body:
    """A response iterable that records how it was iterated and closed.

    Args:
        chunks: the chunks to yield.
        fail_at: raise ``RuntimeError`` instead of yielding the chunk at this index.
    """

    def __init__(self, chunks: Iterable[bytes], *, fail_at: int | None = None) -> None:
        self._chunks = list(chunks)
        self._fail_at = fail_at
        self.yielded = 0
        self.closes = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.yielded == self._fail_at:
            raise RuntimeError("broken body")
        if self.yielded >= len(self._chunks):
            raise StopIteration
        self.yielded += 1
        return self._chunks[self.yielded - 1]

    def close(self) -> None:
        self.closes += 1


def body_app(body: Body) -> WSGIApp:
    """An app returning ``body`` after starting a 200 text response."""

    def app(environ: Environ, start_response: StartResponse) -> Body:
        start_response("200 OK", TEXT)
        return body

    return app


def exc_info_now() -> ExcInfo:
    """``sys.exc_info()`` inside an ``except`` block, typed as a full tuple."""
    info = sys.exc_info()
    assert info[0] is not None
    assert info[1] is not None
    return info  # type: ignore[return-value]
