"""The service's ``/metrics`` as the run reads them, and the generator's event-loop lag probe.

From ``/metrics``: the index queue's depth and the request-duration histograms.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from examples.loadtest.stats import to_ms

QUEUE_STATES = ("waiting", "running", "retrying")


@dataclasses.dataclass
class QueueSample:
    """The index queue's depth at one scrape."""

    at: float
    waiting: float
    running: float
    retrying: float

    @property
    def total(self) -> float:
        """Jobs not finished."""
        return self.waiting + self.running + self.retrying


def queue_depth(exposition: str, queue: str = "index") -> dict[str, float]:
    """``hardening_queue_depth{queue=...}`` by state, from a Prometheus text exposition."""
    depth: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "hardening_queue_depth":
            continue
        for sample in family.samples:
            if sample.labels.get("queue") == queue:
                depth[sample.labels.get("state", "")] = sample.value
    return depth


Histograms = dict[str, dict[float, float]]
SERVER_ROUTES = ("PATCH /pages/{page_id}", "GET /pages/{page_id}")


def request_histograms(exposition: str) -> Histograms:
    """``http_server_request_duration_seconds`` buckets by ``"METHOD route"`` (statuses summed)."""
    histograms: Histograms = collections.defaultdict(lambda: collections.defaultdict(float))
    for family in text_string_to_metric_families(exposition):
        if family.name != "http_server_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = sample.labels
                key = f"{labels.get('http_request_method')} {labels.get('http_route')}"
                histograms[key][float(labels["le"])] += sample.value
    return histograms


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``buckets`` (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the highest finite bucket: its bound is all we know
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, count
    return lower


def server_latency(before: Histograms, after: Histograms) -> dict[str, dict[str, float | None]]:
    """Server-side latency (ms) per route over the load phase: the difference of two scrapes."""
    table: dict[str, dict[str, float | None]] = {}
    for route in SERVER_ROUTES:
        end, start = after.get(route, {}), before.get(route, {})
        delta = {bound: count - start.get(bound, 0.0) for bound, count in end.items()}
        table[route] = {
            "n": max(delta.values(), default=0.0),
            **{f"p{q}": to_ms(histogram_quantile(q / 100, delta)) for q in (50, 95, 99)},
        }
    return table


async def scrape_histograms(http: httpx.AsyncClient) -> Histograms:
    """The request-duration histograms from ``/metrics`` (empty if the scrape fails)."""
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return {}
    return request_histograms(response.text) if response.status_code == 200 else {}


@dataclasses.dataclass
class Sampler:
    """The index queue's depth over the load phase, scraped from ``/metrics``."""

    samples: list[QueueSample] = dataclasses.field(default_factory=list)
    failures: int = 0

    async def run(
        self, http: httpx.AsyncClient, clock: Callable[[], float], interval: float
    ) -> None:
        """Scrape ``/metrics`` every ``interval`` seconds (until cancelled).

        ``clock()`` dates each sample (seconds since the load started).
        """
        while True:
            try:
                response = await http.get("/metrics")
                if response.status_code == 200:
                    depth = queue_depth(response.text)
                    if depth:
                        self.samples.append(
                            QueueSample(clock(), *(depth.get(s, 0.0) for s in QUEUE_STATES))
                        )
            except httpx.HTTPError:
                self.failures += 1
            await asyncio.sleep(interval)


async def wait_for_idle_queue(
    http: httpx.AsyncClient, timeout: float, interval: float = 0.5, quiet_scrapes: int = 3
) -> float | None:
    """Wait until the index queue is empty: ``quiet_scrapes`` scrapes in a row with nothing
    waiting, running or retrying (the depth gauge is refreshed every second, so one empty
    scrape is not enough). Return the seconds waited, or ``None`` when ``timeout`` passed first
    or the service exports no queue depth.

    The load starts after this, so indexing the pages just created does not compete with it:
    the scenario is users editing pages that exist, not a bulk import.
    """
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < timeout:
        try:
            response = await http.get("/metrics")
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            depth = queue_depth(response.text)
            if not depth:
                return None
            quiet = quiet + 1 if sum(depth.get(s, 0.0) for s in QUEUE_STATES) == 0 else 0
            if quiet >= quiet_scrapes:
                return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


async def measure_lag(lags: list[float], interval: float = 0.1) -> None:
    """Record how late the event loop wakes (the load generator's own saturation)."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(max(0.0, time.perf_counter() - start - interval))
