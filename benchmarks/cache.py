"""Cache hit path: ours vs cashews, aiocache and dogpile.cache, and a raw redis-py GET.

One run, one Redis. Every path reads a key that is present (a ~200-byte JSON object), through
the call an application makes on each request:
- ours: `Cache.get_or_set(key, loader)` / `await AsyncCache.get_or_set(key, loader)`;
- cashews: `await cache.get_or_set(key, loader)`;
- aiocache: `await cache.get(key)` (it has no get-or-set call; its `@cached` wraps the same get);
- dogpile.cache: `region.get_or_create(key, loader)` (redis backend, its default pickle);
- raw: `client.get(key)` / `await client.get(key)`, redis-py with the same hiredis parser.
Each library runs with its defaults (serializers included) on memory and on the same local
Redis. Paths are interleaved in rounds (fair under machine noise); the best round is kept.

Usage: python -m benchmarks.cache [--redis redis://127.0.0.1:6379/0] [--n 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio

from hardening import AsyncCache, Cache

VALUE = {
    "id": 42,
    "title": "Architecture notes",
    "owner": {"id": 7, "name": "Ana"},
    "tags": ["docs", "design", "2026"],
    "blocks": 128,
    "updated_at": "2026-11-23T10:00:00Z",
    "theme": {"name": "dark", "accent": "#3366ff"},
}


def loader() -> dict[str, Any]:
    raise AssertionError("a hit must not load")


async def aloader() -> dict[str, Any]:
    raise AssertionError("a hit must not load")


def timed(call: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


async def atimed(call: Callable[[], Awaitable[Any]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n * 1e6


def race(paths: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    """µs per call of each path: best round of ``rounds``, interleaved."""
    best = dict.fromkeys(paths, float("inf"))
    for call in paths.values():  # warm up: connections, scripts, caches
        timed(call, 200)
    for _ in range(rounds):
        for name, call in paths.items():
            best[name] = min(best[name], timed(call, n // rounds))
    return best


async def arace(
    paths: dict[str, Callable[[], Awaitable[Any]]], n: int, rounds: int
) -> dict[str, float]:
    best = dict.fromkeys(paths, float("inf"))
    for acall in paths.values():
        await atimed(acall, 200)
    for _ in range(rounds):
        for name, call in paths.items():
            best[name] = min(best[name], await atimed(call, n // rounds))
    return best


def sync_paths(url: str, prefix: str) -> tuple[dict[str, Callable[[], Any]], list[Any]]:
    from dogpile.cache import make_region

    host, port = url.split("//")[1].split("/")[0].split(":")
    client = redis.Redis.from_url(url)
    ours_memory = Cache(namespace="bench")
    ours_redis = Cache(client, key_prefix=prefix, namespace="bench")
    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=300,
        arguments={"host": host, "port": int(port), "redis_expiration_time": 300},
    )
    dogpile_memory = make_region().configure("dogpile.cache.memory", expiration_time=300)
    for cache in (ours_memory, ours_redis):
        cache.set("project:42", VALUE, ttl=300)
    region.set(f"{prefix}:dogpile", VALUE)
    dogpile_memory.set("project:42", VALUE)
    raw_key = ours_redis.scheme.value_name("project:42")
    paths = {
        "ours memory (Cache)": lambda: ours_memory.get_or_set("project:42", loader),
        "dogpile.cache memory": lambda: dogpile_memory.get_or_create("project:42", loader),
        "ours Redis (Cache)": lambda: ours_redis.get_or_set("project:42", loader),
        "dogpile.cache Redis": lambda: region.get_or_create(f"{prefix}:dogpile", loader),
        "raw redis-py GET": lambda: client.get(raw_key),
    }
    return paths, [client, region]


async def async_paths(
    url: str, prefix: str
) -> tuple[dict[str, Callable[[], Awaitable[Any]]], list[Any]]:
    from aiocache import RedisCache, SimpleMemoryCache
    from cashews import Cache as Cashews

    host, port = url.split("//")[1].split("/")[0].split(":")
    client = redis.asyncio.Redis.from_url(url)
    ours_memory = AsyncCache(namespace="bench")
    ours_redis = AsyncCache(client, key_prefix=prefix, namespace="bench")
    cashews_memory, cashews_redis = Cashews(), Cashews()
    cashews_memory.setup("mem://")
    cashews_redis.setup(url, client_side=False)
    aio_memory = SimpleMemoryCache()
    aio_redis = RedisCache(endpoint=host, port=int(port), namespace=prefix)
    for cache in (ours_memory, ours_redis):
        await cache.set("project:42", VALUE, ttl=300)
    await cashews_memory.set("project:42", VALUE, expire=300)
    await cashews_redis.set(f"{prefix}:cashews", VALUE, expire=300)
    await aio_memory.set("project:42", VALUE, ttl=300)
    await aio_redis.set("aiocache", VALUE, ttl=300)
    raw_key = ours_redis.scheme.value_name("project:42")
    paths: dict[str, Callable[[], Awaitable[Any]]] = {
        "ours memory (AsyncCache)": lambda: ours_memory.get_or_set("project:42", aloader),
        "cashews memory": lambda: cashews_memory.get_or_set("project:42", aloader),
        "aiocache memory (get)": lambda: aio_memory.get("project:42"),
        "ours Redis (AsyncCache)": lambda: ours_redis.get_or_set("project:42", aloader),
        "cashews Redis": lambda: cashews_redis.get_or_set(f"{prefix}:cashews", aloader),
        "aiocache Redis (get)": lambda: aio_redis.get("aiocache"),
        "raw redis.asyncio GET": lambda: client.get(raw_key),
    }
    for name in ("cashews memory", "cashews Redis", "aiocache Redis (get)"):
        if await paths[name]() != VALUE:
            raise AssertionError(f"{name} does not read the value back")
    return paths, [client, cashews_redis, aio_redis]


def report(title: str, results: dict[str, float], groups: list[tuple[str, list[str]]]) -> None:
    print(f"\n{title}")
    print(f"{'path':<30}{'µs/hit':>10}")
    for name, us in results.items():
        print(f"{name:<30}{us:>10.2f}")
    for ours, peers in groups:
        present = [p for p in peers if p in results]
        best = min(present, key=results.__getitem__)
        print(f"  {ours}: {results[best] / results[ours]:.2f}x faster than {best}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"hiredis parser: {redis.utils.HIREDIS_AVAILABLE}; n={args.n}, best of {args.rounds}")

    paths, closers = sync_paths(args.redis, prefix)
    results = race(paths, args.n, args.rounds)
    report(
        "sync",
        results,
        [
            ("ours memory (Cache)", ["dogpile.cache memory"]),
            ("ours Redis (Cache)", ["dogpile.cache Redis"]),
        ],
    )
    raw = results["raw redis-py GET"]
    print(f"  ours Redis hit / raw GET: {results['ours Redis (Cache)'] / raw:.2f}x")

    async def run_async() -> dict[str, float]:
        apaths, aclosers = await async_paths(args.redis, prefix)
        try:
            return await arace(apaths, args.n, args.rounds)
        finally:
            await aclosers[0].aclose()

    aresults = asyncio.run(run_async())
    report(
        "asyncio",
        aresults,
        [
            ("ours memory (AsyncCache)", ["cashews memory", "aiocache memory (get)"]),
            ("ours Redis (AsyncCache)", ["cashews Redis", "aiocache Redis (get)"]),
        ],
    )
    araw = aresults["raw redis.asyncio GET"]
    print(f"  ours Redis hit / raw GET: {aresults['ours Redis (AsyncCache)'] / araw:.2f}x")

    client = closers[0]
    keys = list(client.scan_iter(match=f"*{prefix}*")) + list(client.scan_iter(match="*aiocache*"))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
