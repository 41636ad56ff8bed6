"""The cache under pressure: full pools, blips, silent servers and batches that must not block.

Real Redis (and a real Cluster), directly or through the fault-injecting proxy. Breaker
timing runs on a fake clock so the assertions are exact.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from hardening import AsyncCache, BackendUnavailable, Cache, FakeClock
from hardening.cache.redis import STEP_UNITS
from tests.concurrency import in_threads
from tests.faultproxy import FaultProxy

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = pytest.mark.slow


def _prefix(redis_prefix: str) -> str:
    return redis_prefix.rstrip(":")


@pytest.mark.anyio
async def test_200_concurrent_async_reads_are_200_hits(redis_url: str, redis_prefix: str) -> None:
    """200 concurrent reads of a stored key: 200 hits, no misses, no errors."""
    cache = AsyncCache(redis_url, key_prefix=_prefix(redis_prefix))
    try:
        await cache.set("hot", {"v": 1})
        values = await asyncio.gather(*(cache.get("hot") for _ in range(200)))
        stats = cache.stats()
    finally:
        await cache.aclose()
    assert values == [{"v": 1}] * 200
    assert (stats.hits, stats.misses, stats.errors) == (200, 0, 0)


def test_200_threads_reading_are_200_hits(redis_url: str, redis_prefix: str) -> None:
    """200 threads reading a stored key through the blocking cache: 200 hits."""
    cache = Cache(redis_url, key_prefix=_prefix(redis_prefix))
    cache.set("hot", [1, 2, 3])
    values = in_threads(200, lambda: cache.get("hot"))
    stats = cache.stats()
    cache.close()
    assert values == [[1, 2, 3]] * 200
    assert (stats.hits, stats.misses, stats.errors) == (200, 0, 0)


def test_blip_opens_once_and_recovers_after_one_window(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """50 readers failing in a cut: one 0.5 s window; the first probe after it recovers."""
    clock = FakeClock()
    cache = Cache(redis_proxy.redis_url(), key_prefix=_prefix(redis_prefix), clock=clock)
    cache.set("k", "v")
    redis_proxy.cut()
    values = in_threads(50, lambda: cache.get("k", "fallback"))
    assert values == ["fallback"] * 50  # fail open: misses
    assert cache._health.window == 0.5
    redis_proxy.restore()
    clock.advance(0.5)
    assert cache.get("k") == "v"
    assert cache._health.healthy
    cache.close()


def test_get_or_set_serves_the_loader_while_redis_is_silent(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """A blackholed Redis: one bounded wait, then loads without touching Redis."""
    clock = FakeClock()
    cache = Cache(
        redis_proxy.redis_url() + "?socket_timeout=0.3",
        key_prefix=_prefix(redis_prefix),
        clock=clock,
    )
    redis_proxy.blackhole()
    loads = []
    assert cache.get_or_set("k", lambda: loads.append(1) or "loaded") == "loaded"
    calls = []
    storage = cache._storage
    for name in ("get", "lock", "set_many"):
        original = getattr(storage, name)
        setattr(storage, name, lambda *a, _f=original, **k: calls.append(a) or _f(*a, **k))
    for _ in range(20):
        assert cache.get_or_set("k", lambda: "loaded") == "loaded"
    assert calls == []  # nobody waited for the silent server again: the breaker answered
    redis_proxy.restore()
    clock.advance(0.5)
    cache.set("k", "stored")
    assert cache.get("k") == "stored"
    cache.close()


def test_raise_mode_is_backend_unavailable_through_a_cut(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """``on_backend_error="raise"``: an outage is BackendUnavailable, then recovery."""
    cache = Cache(
        redis_proxy.redis_url(), key_prefix=_prefix(redis_prefix), on_backend_error="raise"
    )
    cache.set("k", 1)
    redis_proxy.cut()
    with pytest.raises(BackendUnavailable):
        cache.get("k")
    redis_proxy.restore()
    assert cache.get("k") == 1
    cache.close()


def test_a_key_redis_refuses_fails_alone(
    redis_client: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """A tag index of the wrong type fails that write only; the breaker stays closed."""
    cache = Cache(redis_url, key_prefix=_prefix(redis_prefix))
    redis_client.set(cache.base + "t:broken", "not a sorted set")
    cache.set("a", 1, tags=["broken"])  # refused by Redis: counted, logged, not an outage
    assert cache._health.healthy
    cache.set("b", 2)
    assert cache.get("b") == 2
    assert cache.stats().errors == 1
    cache.close()


@pytest.mark.slow
def test_set_many_of_100k_never_blocks_redis_for_50ms(
    redis_client: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """set_many(100_000): every command Redis ran for it took under 50 ms (SLOWLOG)."""
    threshold = int(redis_client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"])
    length = int(redis_client.config_get("slowlog-max-len")["slowlog-max-len"])
    # every step (a script touching up to 1,000 keys) takes well over 0.1 ms: all recorded;
    # Redis 7 also records the slower commands a script runs inside it
    redis_client.config_set("slowlog-log-slower-than", 100)
    redis_client.config_set("slowlog-max-len", 10_000)
    redis_client.slowlog_reset()
    cache = Cache(redis_url, key_prefix=_prefix(redis_prefix))
    try:
        items = {f"item:{i}": {"i": i, "tags": "x" * 20} for i in range(100_000)}
        cache.set_many(items, tags=["bulk"])
        entries = redis_client.slowlog_get(10_000)
    finally:
        redis_client.config_set("slowlog-log-slower-than", threshold)
        redis_client.config_set("slowlog-max-len", length)
    marker = _prefix(redis_prefix).encode()
    ours = [entry for entry in entries if marker in bytes(entry["command"])]
    steps = [entry for entry in ours if bytes(entry["command"]).startswith(b"EVALSHA")]
    assert len(steps) >= 100_000 // STEP_UNITS  # the steps themselves were recorded
    longest = max(entry["duration"] for entry in ours)
    assert longest < 50_000, f"a command took {longest / 1000:.1f} ms"
    assert cache.get("item:99999") == {"i": 99999, "tags": "x" * 20}
    assert cache.get_many(["item:0", "item:50000"]) == {
        "item:0": {"i": 0, "tags": "x" * 20},
        "item:50000": {"i": 50000, "tags": "x" * 20},
    }
    assert cache.invalidate_tags("bulk") == 100_000
    assert cache.get("item:1") is None
    cache.close()


def test_batches_are_split_into_bounded_steps(redis_url: str, redis_prefix: str) -> None:
    """A batch larger than one step reaches Redis as several script calls, all applied."""
    calls: list[int] = []
    cache = Cache(redis_url, key_prefix=_prefix(redis_prefix))
    storage = cache._storage
    original = storage._set

    def counting(keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys))
        return original(keys=keys, args=args)

    storage._set = lambda keys, args: counting(keys, args)
    count = 3 * STEP_UNITS
    cache.set_many({f"k{i}": i for i in range(count)})
    assert len(calls) > 1
    assert sum(calls) == count
    assert all(n * 2 <= STEP_UNITS for n in calls)
    assert cache.get_many([f"k{i}" for i in range(0, count, 7)]) == {
        f"k{i}": i for i in range(0, count, 7)
    }
    ids = [cache.scheme.key_id(f"k{i}") for i in range(count)]
    assert storage.delete(cache.base, ids) == count  # in steps too
    assert cache.get("k1") is None
    cache.close()
