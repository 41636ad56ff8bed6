"""Caches on every storage: memory (fake clock), real Redis and a real 3-node Redis Cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from hardening import Cache, FakeClock


@dataclass
class Harness:
    """Builds caches on one storage; every cache it built is closed after the test."""

    name: str
    clock: FakeClock | None  # memory only: expiry follows this clock
    options: dict[str, Any]
    made: list[Cache] = field(default_factory=list)

    def make(self, **options: Any) -> Cache:
        """A cache on this storage (``jitter=0`` unless given, so TTLs are exact)."""
        merged = {"jitter": 0.0, **self.options, **options}
        storage = merged.pop("storage")
        cache = Cache(storage, **merged)
        self.made.append(cache)
        return cache


def wait_for_misses(cache: Cache, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` callers have missed (and so are joining the load in flight).

    A fixed sleep raced on a loaded machine: a thread that had not yet missed when the load
    ended started a load of its own.
    """
    deadline = time.monotonic() + timeout
    while cache.stats().misses < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {cache.stats().misses} of {count} callers missed")
        time.sleep(0.005)
    time.sleep(0.05)  # from the miss to the in-process flight is a few statements, no I/O


def _cleanup(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for key in keys:
        client.delete(key)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Each storage in turn: memory on a fake clock, real Redis, real Redis Cluster."""
    if request.param == "memory":
        clock = FakeClock()
        made = Harness("memory", clock, {"storage": "memory://", "clock": clock})
        yield made
        return
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        yield Harness("redis", None, {"storage": client, "key_prefix": prefix})
        return
    url = request.getfixturevalue("redis_cluster_url")
    prefix = f"hardening-test:{time.time_ns()}"
    made = Harness("cluster", None, {"storage": url, "key_prefix": prefix})
    try:
        yield made
    finally:
        if made.made:
            _cleanup(made.made[0]._storage.client, prefix)
        for cache in made.made:
            cache.close()


@pytest.fixture
def counting_client(redis_url: str, redis_prefix: str) -> Iterator[tuple[Any, list[bytes]]]:
    """A blocking client that records each command written to the socket (a pipeline or a
    script is one), for counting round trips."""
    import redis

    sent: list[bytes] = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(command if isinstance(command, bytes) else b"".join(command))
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        yield client, sent
    finally:
        _cleanup(client, redis_prefix)
        client.close()


Loader = Callable[[], Any]
