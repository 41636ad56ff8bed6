"""The drivers: early refresh, the cached decorator, configuration, sync/async twins."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest

from hardening import AsyncCache, Cache, ConfigurationError, FakeClock, Metrics, PickleSerializer

# --- early refresh (XFetch) ------------------------------------------------------------------


def _slow_loader(clock: FakeClock, seconds: float, runs: list[int]) -> Any:
    def load() -> int:
        runs.append(1)
        clock.advance(seconds)  # the load takes `seconds` of (fake) time: its delta
        return len(runs)

    return load


def test_early_refresh_reloads_before_expiry() -> None:
    """Close to expiry, a read of a slow-to-load value reloads it and serves the new one."""
    clock = FakeClock()
    metrics = Metrics()
    cache = Cache(clock=clock, jitter=0, metrics=metrics, name="x")
    cache._rng = random.Random(1)
    runs: list[int] = []
    load = _slow_loader(clock, 2.0, runs)
    assert cache.get_or_set("k", load, ttl=60) == 1
    clock.advance(10)
    assert cache.get_or_set("k", load, ttl=60) == 1  # 48 s left, delta 2 s: P = e^-24
    clock.advance(47.99)  # 10 ms left
    assert cache.get_or_set("k", load, ttl=60) == 2
    assert cache.stats().refreshes == 1
    sample = metrics.registry.get_sample_value
    assert sample("hardening_cache_loads_total", {"cache": "x", "outcome": "refreshed"}) == 1


def test_early_refresh_off_with_beta_zero() -> None:
    """early_refresh=0 keeps a value until it expires."""
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, early_refresh=0)
    runs: list[int] = []
    load = _slow_loader(clock, 2.0, runs)
    cache.get_or_set("k", load, ttl=60)
    clock.advance(57.99)
    assert cache.get_or_set("k", load, ttl=60) == 1


def test_one_refresher_others_keep_reading() -> None:
    """While one thread refreshes a hot key, the others read the current value at once."""
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, early_refresh=100)
    cache._rng = random.Random(0)  # the refresher's draw is "due"
    cache.set("k", "old")
    cache._storage._data[cache.scheme.value_name("k")].value = (
        b"h1:%d:1000:" % int((clock.time() + 1) * 1000) + b'"old"'
    )  # a value that took 1 s to load and expires in 1 s: every read wants a refresh
    entered, release = threading.Event(), threading.Event()

    def refresh() -> str:
        entered.set()
        release.wait(5)
        return "new"

    refresher = threading.Thread(target=cache.get_or_set, args=("k", refresh))
    refresher.start()
    assert entered.wait(5)
    assert [cache.get_or_set("k", lambda: "other") for _ in range(5)] == ["old"] * 5
    release.set()
    refresher.join(5)
    assert cache.get("k") == "new"


def test_failed_refresh_serves_the_current_value() -> None:
    """A refresh whose loader raises keeps serving the still-valid value."""
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, early_refresh=100)
    cache._rng = random.Random(0)  # P(due) is 0.989 here; the seed makes it certain
    runs: list[int] = []
    cache.get_or_set("k", _slow_loader(clock, 1.0, runs), ttl=10)
    clock.advance(8.9)

    def fail() -> int:
        raise RuntimeError("db down")

    assert cache.get_or_set("k", fail, ttl=10) == 1
    assert cache.stats().load_errors == 1


# --- the decorator -------------------------------------------------------------------------


def test_cached_keys_by_arguments() -> None:
    """Results are cached per arguments, positional or keyword alike for the default key."""
    cache = Cache()
    calls: list[tuple[int, str]] = []

    @cache.cached(ttl=60)
    def page(page_id: int, lang: str = "en") -> dict[str, Any]:
        calls.append((page_id, lang))
        return {"id": page_id, "lang": lang}

    assert page(1) == {"id": 1, "lang": "en"}
    assert page(1) == {"id": 1, "lang": "en"}
    assert page(2, lang="fr") == {"id": 2, "lang": "fr"}
    assert page(2, lang="fr") == {"id": 2, "lang": "fr"}
    assert calls == [(1, "en"), (2, "fr")]
    assert page.__name__ == "page"


def test_cached_key_format_and_tags() -> None:
    """key= and tags= format strings see every parameter, defaults included; invalidating the
    tag drops the result."""
    cache = Cache()
    calls: list[int] = []

    @cache.cached(ttl="project", key="project:{project_id}:{view}", tags=["project:{project_id}"])
    def project(project_id: int, view: str = "full") -> int:
        calls.append(project_id)
        return project_id * 10

    assert project(42) == 420
    assert cache.get("project:42:full") == 420
    assert project(project_id=42) == 420
    assert cache.invalidate_tags("project:42") == 1
    assert project(42) == 420
    assert calls == [42, 42]
    assert cache.invalidate_prefix("project:42:") == 1


def test_cached_key_and_tags_callables() -> None:
    """key= and tags= may be callables of the function's arguments."""
    cache = Cache()

    @cache.cached(key=lambda user, **_: f"user:{user}", tags=lambda user, **_: [f"u{user}"])
    def profile(user: int, *, verbose: bool = False) -> str:
        return f"profile {user}"

    assert profile(7, verbose=True) == "profile 7"
    assert cache.get("user:7") == "profile 7"
    assert cache.invalidate_tags("u7") == 1


def test_sync_cache_refuses_async_functions() -> None:
    """Cache.cached on an async function is a clear configuration error."""
    cache = Cache()
    with pytest.raises(ConfigurationError, match="use AsyncCache"):

        @cache.cached()
        async def fetch() -> int:
            return 1


def test_async_cache_refuses_plain_functions() -> None:
    """AsyncCache.cached on a plain function is a clear configuration error."""
    cache = AsyncCache()
    with pytest.raises(ConfigurationError, match="use Cache"):
        cache.cached()(lambda: 1)  # type: ignore[arg-type, return-value]


def test_bad_decorator_specs() -> None:
    """A tags string (not a list) or a key of another type is refused when decorating."""
    cache = Cache()
    with pytest.raises(ConfigurationError):
        cache.cached(tags="project")
    with pytest.raises(ConfigurationError):
        cache.cached(key=42)  # type: ignore[arg-type]


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"on_backend_error": "ignore"},
        {"jitter": 1.5},
        {"early_refresh": -1},
        {"default_ttl": 0},
        {"default_ttl": "nope"},
        {"max_value_bytes": 0},
        {"namespace": "a{b}"},
        {"serializer": object()},
        {"profiles": {"x": -1}},
        {"lock_timeout": 0},
    ],
)
def test_bad_options(options: dict[str, Any]) -> None:
    """Every invalid option is a ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        Cache(**options)


def test_pickle_serializer_is_opt_in() -> None:
    """With PickleSerializer, tuples and sets survive; JSON is the default."""
    cache = Cache(serializer=PickleSerializer())
    cache.set("k", {"t": (1, 2)})
    assert cache.get("k") == {"t": (1, 2)}
    assert Cache().serializer.__class__.__name__ == "JSONSerializer"


def test_stats_hit_ratio_starts_at_zero() -> None:
    """No reads: a hit ratio of 0.0, not a division error."""
    assert Cache().stats().hit_ratio == 0.0


# --- the async driver ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_hundred_tasks_one_load() -> None:
    """100 concurrent tasks missing one key run the loader once."""
    cache = AsyncCache()
    runs: list[int] = []

    async def load() -> list[int]:
        runs.append(1)
        await asyncio.sleep(0.05)
        return [1, 2]

    results = await asyncio.gather(*(cache.get_or_set("k", load) for _ in range(100)))
    assert runs == [1]
    assert results == [[1, 2]] * 100
    assert cache.stats().stampedes_avoided == 99


@pytest.mark.anyio
async def test_async_hundred_tasks_one_load_on_redis(
    async_redis_client: Any, redis_prefix: str
) -> None:
    """The same on real Redis, with the lock in play."""
    cache = AsyncCache(async_redis_client, key_prefix=redis_prefix.rstrip(":"))
    runs: list[int] = []

    async def load() -> str:
        runs.append(1)
        await asyncio.sleep(0.05)
        return "v"

    results = await asyncio.gather(*(cache.get_or_set("k", load) for _ in range(100)))
    assert runs == [1]
    assert results == ["v"] * 100
    assert await cache.get("k") == "v"


@pytest.mark.anyio
async def test_async_loader_error_reaches_every_task() -> None:
    """Every task waiting on a failing load gets its error; nothing is cached."""
    cache = AsyncCache()

    async def fail() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("bad")

    results = await asyncio.gather(
        *(cache.get_or_set("k", fail) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)
    assert await cache.get("k") is None


@pytest.mark.anyio
async def test_async_cancelled_loader_hands_over() -> None:
    """When the loading task is cancelled, a waiting task loads instead of hanging."""
    cache = AsyncCache()
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(10)
        return "slow"

    async def quick() -> str:
        return "quick"

    leader = asyncio.ensure_future(cache.get_or_set("k", slow))
    await started.wait()
    follower = asyncio.ensure_future(cache.get_or_set("k", quick))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await asyncio.wait_for(follower, 2) == "quick"
    with pytest.raises(asyncio.CancelledError):
        await leader


@pytest.mark.anyio
async def test_async_api_matches_sync() -> None:
    """Every sync operation has its awaitable twin with the same results."""
    clock = FakeClock()
    cache = AsyncCache(clock=clock, jitter=0)
    await cache.set("p:1", 1, tags=["t"], ttl=5)
    await cache.set_many({"p:2": 2, "q:1": 3}, tags=["t"])
    assert await cache.get_many(["p:1", "p:2", "q:1", "x"]) == {"p:1": 1, "p:2": 2, "q:1": 3}
    assert await cache.invalidate_prefix("p:") == 2
    assert await cache.delete("q:1") is True
    await cache.set("a", 1, tags=["t2"])
    assert await cache.invalidate_tags(["t2"]) == 1
    clock.advance(1)

    @cache.cached(key="sq:{n}", tags=["squares"])
    async def square(n: int) -> int:
        return n * n

    assert await square(4) == 16
    assert await cache.get("sq:4") == 16
    assert await cache.invalidate_tags("squares") == 1
    assert await cache.get_or_set("sync-loader", lambda: 5) == 5  # type: ignore[arg-type, return-value]


@pytest.mark.anyio
async def test_async_early_refresh() -> None:
    """The async driver refreshes early too, serving the new value."""
    clock = FakeClock()
    cache = AsyncCache(clock=clock, jitter=0, early_refresh=100)
    cache._rng = random.Random(0)
    count = 0

    async def load() -> int:
        nonlocal count
        count += 1
        clock.advance(1)
        return count

    assert await cache.get_or_set("k", load, ttl=10) == 1
    clock.advance(8.9)
    assert await cache.get_or_set("k", load, ttl=10) == 2
    assert cache.stats().refreshes == 1
