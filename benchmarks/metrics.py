"""Added cost of HTTP request metrics on a Starlette no-op route, ours against two peers.

Run by hand on a quiet machine (``pip install -e '.[bench]'``, then ``python -m
benchmarks.metrics`` from the repository root); it takes well under a minute. Each app is the
same Starlette app with one route ``/items/{item_id}``; requests are direct in-process ASGI
calls (prebuilt scope, no-op receive/send) on one event loop, timed in batches, best batch
kept. Variants:

- bare: no metrics;
- hardening: ``hardening.adapters.asgi.MetricsMiddleware`` (status from
  ``http.response.start``, route template from ``scope["route"]`` after the call, finished on
  the last body chunk, disconnects watched);
- starlette-exporter: ``PrometheusMiddleware`` with its defaults;
- instrumentator: ``prometheus_fastapi_instrumentator.Instrumentator().instrument(app)``.

Targets: our added cost at most 0.25x each peer's and at most 5 us per request; under 1% of
the time of a request whose handler takes 1 ms.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import time

from prometheus_client import REGISTRY
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.applications import Starlette
from starlette.routing import Route
from starlette_exporter import PrometheusMiddleware

from benchmarks._asgi import SCOPE, ASGIApp, Message, item, receive
from hardening import Metrics
from hardening.adapters.asgi import MetricsMiddleware

BATCH = 5_000
ROUNDS = 15
HANDLER_US = 1_000.0


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/items/{item_id}", item)])


async def send(message: Message) -> None:
    return None


async def batch(app: ASGIApp, n: int) -> float:
    """Seconds per request over ``n`` sequential requests."""
    scope = SCOPE
    start = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - start) / n


async def measure(apps: dict[str, ASGIApp]) -> dict[str, float]:
    """Best batch per app in microseconds, rounds interleaved so drift hits all alike."""
    for app in apps.values():  # warm up: build middleware stacks, create label children
        await batch(app, 200)
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(ROUNDS):
        for name, app in apps.items():
            best[name] = min(best[name], await batch(app, BATCH) * 1e6)
    return best


def primitives(metrics: Metrics) -> dict[str, float]:
    """Microseconds per call of the hot-path methods alone."""
    n = 200_000
    results = {}
    calls = {
        "Metrics.http_request": lambda: metrics.http_request("GET", "/items/{item_id}", 200, 0.01),
        "track_http_request + finish": lambda: metrics.track_http_request("GET").finish(
            200, "/items/{item_id}"
        ),
    }
    for name, call in calls.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                call()
            best = min(best, (time.perf_counter() - start) / n * 1e6)
        results[name] = best
    return results


def main() -> None:
    metrics = Metrics()
    exporter = starlette_app()
    exporter.add_middleware(PrometheusMiddleware)
    instrumented = starlette_app()
    Instrumentator().instrument(instrumented)
    apps: dict[str, ASGIApp] = {
        "bare": starlette_app(),
        "hardening": MetricsMiddleware(starlette_app(), metrics),
        "starlette-exporter": exporter,
        "instrumentator": instrumented,
    }
    started = time.perf_counter()
    best = asyncio.run(measure(apps))
    recorded = {
        "hardening": metrics.registry.get_sample_value(
            "http_server_request_duration_seconds_count",
            {
                "http_request_method": "GET",
                "http_route": "/items/{item_id}",
                "http_response_status_code": "200",
                "error_type": "",
            },
        ),
        "starlette-exporter": REGISTRY.get_sample_value(
            "starlette_requests_total",
            {
                "method": "GET",
                "path": "/items/{item_id}",
                "status_code": "200",
                "app_name": "starlette",
            },
        ),
        "instrumentator": REGISTRY.get_sample_value(
            "http_requests_total", {"handler": "/items/{item_id}", "method": "GET", "status": "2xx"}
        ),
    }
    if not all(recorded.values()):  # a silently inactive peer would flatter it
        sys.exit(f"a variant recorded nothing: {recorded}")
    bare = best["bare"]
    ours = best["hardening"] - bare
    print(f"CPython {platform.python_version()} on {sys.platform}, {BATCH} x {ROUNDS} requests")
    print(f"{'variant':<20} {'us/request':>10} {'added us':>9} {'% of 1 ms':>9}")
    for name, us in best.items():
        added = us - bare
        share = added / (bare + HANDLER_US) * 100
        print(f"{name:<20} {us:>10.2f} {added:>9.2f} {share:>8.2f}%")
    for peer in ("starlette-exporter", "instrumentator"):
        print(f"ours / {peer} added cost: {ours / (best[peer] - bare):.3f}x")
    for name, us in primitives(metrics).items():
        print(f"{name:<30} {us:.2f} us")
    peers = ("starlette-exporter", "instrumentator")
    ok = ours <= 5 and ours / (bare + HANDLER_US) < 0.01
    ok = ok and all(ours <= 0.25 * (best[peer] - bare) for peer in peers)
    print(f"targets (<= 5 us, <= 0.25x peers, < 1% of 1 ms): {'met' if ok else 'check'}")
    print(f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
