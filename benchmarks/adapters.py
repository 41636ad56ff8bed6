"""Requests/second of a rate-limited Starlette route: our middleware against slowapi.

Run by hand on a quiet machine (``pip install -e '.[bench]'``, Redis on
``HARDENING_REDIS_URL`` or 127.0.0.1:6379, ``wrk`` on PATH for the HTTP part), then
``python -m benchmarks.adapters`` from the repository root; it takes about three minutes.
Every variant is the same Starlette app with one route ``/items/{item_id}`` answering ``ok``,
limited per client IP with a limit it never reaches, with rate-limit headers on every response:

- ``none``: no limiter;
- ``hardening``: ``RateLimitMiddleware(app, AsyncRateLimiter(...))`` (pure ASGI, one Lua call
  per request on Redis through ``redis.asyncio``), default strategy (sliding-window counter)
  and fixed window;
- ``slowapi``: ``Limiter(key_func=get_remote_address, headers_enabled=True)`` with the
  documented ``@limiter.limit`` decorator (its default fixed window; ``limits`` storage,
  blocking Redis client), and with ``headers_enabled=False`` for the bare limit check.

Two measurements, rounds interleaved so drift hits every variant alike, best round kept:

1. in process: sequential ASGI calls with a prebuilt scope (no server), microseconds/request;
2. over HTTP: every variant served by its own uvicorn process (httptools, one worker) on
   loopback, loaded in turn by ``wrk -t1 -c16``; requests/second.

Targets (issue 8): hardening on Redis >= 2x slowapi on Redis; hardening memory >= 0.85x none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

from redis import Redis
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded as SlowAPIRateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarks._asgi import SCOPE, ASGIApp, Message, item, receive
from hardening import AsyncRateLimiter
from hardening.adapters.asgi import RateLimitMiddleware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_URL = os.environ.get("HARDENING_REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT = "1000000000/minute"  # never reached: every variant does the full allowed path
PREFIX = f"bench-adapters-{uuid.uuid4().hex[:8]}"
BATCH = 2_000
ROUNDS = 7
WRK_SECONDS = 4
WRK_ROUNDS = 3
HANDLER_US = 1_000.0

VARIANTS = (
    "none",
    "hardening-memory",
    "hardening-memory-fixed",
    "hardening-redis",
    "hardening-redis-fixed",
    "slowapi-memory",
    "slowapi-redis",
    "slowapi-memory-noheaders",
    "slowapi-redis-noheaders",
)


def build(variant: str) -> ASGIApp:
    """The app for one variant."""
    if variant == "none":
        return Starlette(routes=[Route("/items/{item_id}", item)])
    if variant.startswith("hardening"):
        strategy = "fixed-window" if variant.endswith("fixed") else "sliding-window-counter"
        storage = REDIS_URL if "redis" in variant else "memory://"
        limiter = AsyncRateLimiter(
            LIMIT, storage=storage, strategy=strategy, key_prefix=f"{PREFIX}-{variant}"
        )
        return RateLimitMiddleware(Starlette(routes=[Route("/items/{item_id}", item)]), limiter)
    storage = REDIS_URL if "redis" in variant else "memory://"
    limiter_ = Limiter(
        key_func=get_remote_address,
        storage_uri=storage,
        headers_enabled=not variant.endswith("noheaders"),
        key_prefix=f"{PREFIX}-{variant}",
    )

    @limiter_.limit(LIMIT)
    async def limited(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/items/{item_id}", limited)])
    app.state.limiter = limiter_
    app.add_exception_handler(SlowAPIRateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


# --- in process ----------------------------------------------------------------------------


class Sink:
    """A ``send`` that checks each response was a 200 with rate-limit headers."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.limited = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if any(name.lower() == b"x-ratelimit-limit" for name, _ in message["headers"]):
                self.limited += 1


async def batch(app: ASGIApp, sink: Sink, n: int) -> float:
    """Seconds per request over ``n`` sequential requests."""
    start = time.perf_counter()
    for _ in range(n):
        await app(dict(SCOPE, state={}), receive, sink)
    return (time.perf_counter() - start) / n


async def in_process() -> dict[str, float]:
    apps = {variant: build(variant) for variant in VARIANTS}
    sinks = {variant: Sink() for variant in VARIANTS}
    for variant, app in apps.items():
        await batch(app, sinks[variant], 200)
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(ROUNDS):
        for variant, app in apps.items():
            best[variant] = min(best[variant], await batch(app, sinks[variant], BATCH) * 1e6)
    for variant, sink in sinks.items():
        if set(sink.statuses) != {200}:
            sys.exit(f"{variant}: unexpected statuses {sink.statuses}")
        headers_expected = variant != "none" and not variant.endswith("noheaders")
        if headers_expected and sink.limited != sum(sink.statuses.values()):
            sys.exit(f"{variant}: responses without rate-limit headers")
    return best


# --- over HTTP -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(variant: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        build(variant),
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="asyncio",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def wait_ready(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def wrk(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", f"http://127.0.0.1:{port}/items/42"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "Non-2xx" in out:
        sys.exit(f"non-2xx responses on port {port}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        sys.exit(f"could not read wrk output:\n{out}")
    return float(match.group(1))


def over_http() -> dict[str, float]:
    servers = {}
    try:
        for variant in VARIANTS:
            port = free_port()
            command = ["-m", "benchmarks.adapters", "--serve", variant, "--port", str(port)]
            proc = subprocess.Popen([sys.executable, *command], cwd=ROOT)
            servers[variant] = (port, proc)
        for port, _ in servers.values():
            wait_ready(port)
        for port, _ in servers.values():
            wrk(port, 1)  # warm up
        best = dict.fromkeys(servers, 0.0)
        for _ in range(WRK_ROUNDS):
            for variant, (port, _) in servers.items():
                best[variant] = max(best[variant], wrk(port, WRK_SECONDS))
        return best
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            proc.wait(timeout=10)


def cleanup() -> None:
    client = Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"*{PREFIX}*", count=1000):
        client.delete(key)
    client.close()


def report(title: str, values: dict[str, float], unit: str, higher_is_better: bool) -> None:
    print(f"\n{title}")
    print(f"{'variant':<26} {unit:>12} {'vs none':>8}")
    base = values["none"]
    for variant, value in values.items():
        ratio = value / base if higher_is_better else base / value
        print(f"{variant:<26} {value:>12.1f} {ratio:>7.2f}x")

    def rate(variant: str) -> float:
        return values[variant] if higher_is_better else 1 / values[variant]

    print("ratios (throughput):")
    pairs = [
        ("hardening-redis", "slowapi-redis"),
        ("hardening-redis-fixed", "slowapi-redis"),
        ("hardening-redis", "slowapi-redis-noheaders"),
        ("hardening-memory", "slowapi-memory"),
        ("hardening-memory", "none"),
        ("hardening-memory-fixed", "none"),
    ]
    for ours, peer in pairs:
        print(f"  {ours} / {peer}: {rate(ours) / rate(peer):.2f}x")

    # the same added cost on a route that does work: a handler of 1 ms (a database query)
    def us(variant: str) -> float:
        return 1e6 / values[variant] if higher_is_better else values[variant]

    added = {variant: us(variant) - us("none") for variant in values}
    print("added us/request, and throughput vs none with a 1 ms handler:")
    for variant in ("hardening-memory", "hardening-redis", "slowapi-memory", "slowapi-redis"):
        base = us("none") + HANDLER_US
        print(f"  {variant:<24} {added[variant]:7.1f} us  {base / (base + added[variant]):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-http", action="store_true", help="skip the uvicorn + wrk part")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    print(f"CPython {platform.python_version()} on {sys.platform}; Redis {REDIS_URL}")
    try:
        report("in process (us/request, lower is better)", asyncio.run(in_process()), "us", False)
        if not args.no_http:
            if shutil.which("wrk") is None:
                sys.exit("wrk is not on PATH (apt-get install wrk), or pass --no-http")
            report(
                f"uvicorn + wrk -t1 -c16, {WRK_ROUNDS} x {WRK_SECONDS} s (requests/s)",
                over_http(),
                "req/s",
                True,
            )
    finally:
        cleanup()


if __name__ == "__main__":
    main()
