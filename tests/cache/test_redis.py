"""Redis specifics: round trips, stampedes across processes, dead Redis, Cluster slots."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from hardening import BackendUnavailable, Cache, ConfigurationError, FakeClock, Metrics
from tests.cache.conftest import wait_for_misses
from tests.cache.stampede_worker import stampede
from tests.conftest import RedisServer


def _commands(sent: list[bytes]) -> list[str]:
    """The command names of packed commands (``*N\\r\\n$len\\r\\nNAME...``)."""
    return [raw.split(b"\r\n")[2].decode().upper() for raw in sent]


def test_round_trips(counting_client: tuple[Any, list[bytes]], redis_prefix: str) -> None:
    """A hit is one GET; get_many and set_many of 50 keys are one command each; a miss is
    GET, one script that re-reads and locks, and one that stores, indexes and unlocks."""
    client, sent = counting_client
    cache = Cache(client, key_prefix=redis_prefix.rstrip(":"))
    cache.set("warm", 1, tags=["t"])  # loads each script (NOSCRIPT then EVAL) once
    cache.delete("warm")
    cache.get_or_set("warm", lambda: 1)
    cache.invalidate_tags("x")
    sent.clear()
    cache.set_many({f"k:{i}": i for i in range(50)}, tags=["batch"])
    assert _commands(sent) == ["EVALSHA"]
    sent.clear()
    assert len(cache.get_many([f"k:{i}" for i in range(50)])) == 50
    assert _commands(sent) == ["MGET"]
    sent.clear()
    assert cache.get_or_set("k:1", lambda: 0) == 1
    assert _commands(sent) == ["GET"]
    sent.clear()
    assert cache.get_or_set("new", lambda: 2) == 2
    assert _commands(sent) == ["GET", "EVALSHA", "EVALSHA"]
    sent.clear()
    assert cache.invalidate_tags("batch") == 50
    assert _commands(sent) == ["EVALSHA"]


@pytest.mark.anyio
async def test_async_round_trips(redis_url: str, redis_prefix: str) -> None:
    """The async driver sends the same commands: one per batch operation, one GET per hit."""
    import redis.asyncio

    from hardening import AsyncCache

    sent: list[bytes] = []

    class CountingConnection(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(command if isinstance(command, bytes) else b"".join(command))
            await super().send_packed_command(command, check_health)

    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    cache = AsyncCache(client, key_prefix=redis_prefix.rstrip(":"))
    try:
        await cache.set("warm", 1)
        sent.clear()
        await cache.set_many({f"k:{i}": i for i in range(20)})
        await cache.get_many([f"k:{i}" for i in range(20)])
        await cache.get_or_set("k:3", lambda: _never())
        assert _commands(sent) == ["EVALSHA", "MGET", "GET"]
        await cache.invalidate_prefix("k:")
    finally:
        await client.aclose()
        await pool.aclose()


async def _never() -> int:
    raise AssertionError("a hit must not load")


@pytest.mark.slow
def test_four_processes_one_load(redis_url: str, redis_client: Any, redis_prefix: str) -> None:
    """4 processes x 25 threads miss one key together: the loader runs exactly once."""
    prefix = redis_prefix.rstrip(":")
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # after every process has imported and connected
    processes = [
        context.Process(target=stampede, args=(redis_url, prefix, 25, start_at, 100))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert int(redis_client.get(f"{prefix}:loader-runs")) == 1
    results = sorted(r.decode() for r in redis_client.lrange(f"{prefix}:results", 0, -1))
    assert results == ["25:25"] * 4
    assert int(redis_client.get(f"{prefix}:avoided")) == 99


def test_waits_for_another_process_then_reads_its_value(
    redis_client: Any, redis_prefix: str
) -> None:
    """While another process holds the lock, a miss polls and returns that process's value
    without loading; it counts as a stampede avoided."""
    prefix = redis_prefix.rstrip(":")
    cache = Cache(redis_client, key_prefix=prefix, lock_timeout=5)
    other = Cache(redis_client, key_prefix=prefix)
    redis_client.set(f"{prefix}:c:{{default}}:l:k", "other-process", px=5000)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(cache.get_or_set("k", lambda: "mine")))
    thread.start()
    time.sleep(0.1)
    other.set("k", "theirs")
    thread.join(5)
    assert result == ["theirs"]
    assert cache.stats().stampedes_avoided == 1
    assert cache.stats().loads == 0


def test_takes_over_when_the_holder_gives_up(redis_client: Any, redis_prefix: str) -> None:
    """A lock released without a value (the holder's loader failed) is taken over at once."""
    prefix = redis_prefix.rstrip(":")
    cache = Cache(redis_client, key_prefix=prefix, lock_timeout=5)
    lock = f"{prefix}:c:{{default}}:l:k"
    redis_client.set(lock, "other-process", px=5000)
    threading.Timer(0.1, lambda: redis_client.delete(lock)).start()
    started = time.monotonic()
    assert cache.get_or_set("k", lambda: "mine") == "mine"
    assert time.monotonic() - started < 2
    assert cache.stats().loads == 1
    assert redis_client.exists(lock) == 0  # released by the storing script


def test_loads_itself_when_the_lock_times_out(redis_client: Any, redis_prefix: str) -> None:
    """A lock holder that never stores (a crashed process) delays others by lock_timeout."""
    prefix = redis_prefix.rstrip(":")
    cache = Cache(redis_client, key_prefix=prefix, lock_timeout=0.3)
    redis_client.set(f"{prefix}:c:{{default}}:l:k", "crashed", px=300)
    assert cache.get_or_set("k", lambda: "mine") == "mine"
    assert cache.stats().loads == 1


# --- Redis failures ---------------------------------------------------------------------------


@pytest.fixture
def dying_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server of the test's own, which the test may kill and restart."""
    return redis_server_factory()


def test_redis_stopped_mid_run_then_back(dying_redis: RedisServer) -> None:
    """Redis dies: reads miss, loaders run, writes are skipped, nothing raises, errors are
    counted; once it is back and the backoff has passed, the cache works again."""
    clock = FakeClock()
    metrics = Metrics()
    cache = Cache(dying_redis.url, clock=clock, metrics=metrics, name="pages")
    runs: list[int] = []

    def load() -> int:
        runs.append(1)
        return len(runs)

    assert cache.get_or_set("k", load) == 1
    assert cache.get_or_set("k", load) == 1
    dying_redis.kill()
    assert [cache.get_or_set("k", load) for _ in range(3)] == [2, 3, 4]
    cache.set("x", 1)
    assert cache.get("x") is None
    assert cache.get_many(["x", "y"]) == {}
    assert cache.delete("x") is False
    assert cache.invalidate_tags("t") == 0
    assert cache.invalidate_prefix("k:") == 0

    def errors(operation: str) -> float:
        value = metrics.registry.get_sample_value(
            "hardening_cache_errors_total", {"cache": "pages", "operation": operation}
        )
        return value or 0.0

    assert errors("get") >= 3
    assert errors("set") >= 1
    assert errors("invalidate") == 2
    dying_redis.start()  # same port, empty
    clock.advance(31)  # past the longest backoff
    assert cache.get_or_set("k", load) == 5
    assert cache.get_or_set("k", load) == 5
    assert cache.stats().errors > 0
    cache.close()


def test_redis_stopped_while_threads_wait(dying_redis: RedisServer) -> None:
    """Threads waiting on a load whose storing fails still all get the loaded value."""
    cache = Cache(dying_redis.url, clock=FakeClock())
    gate = threading.Event()
    results: list[Any] = []

    def load() -> str:
        gate.wait(5)
        return "v"

    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_set("k", load)))
        for _ in range(10)
    ]
    for thread in threads:
        thread.start()
    wait_for_misses(cache, 10)
    dying_redis.kill()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == ["v"] * 10
    cache.close()


def test_raise_mode(dying_redis: RedisServer) -> None:
    """on_backend_error="raise" turns a dead Redis into BackendUnavailable (HTTP 503)."""
    cache = Cache(dying_redis.url, on_backend_error="raise")
    dying_redis.kill()
    with pytest.raises(BackendUnavailable) as info:
        cache.get("k")
    assert info.value.http_status == 503
    with pytest.raises(BackendUnavailable):
        cache.get_or_set("k", lambda: 1)
    cache.close()


@pytest.mark.anyio
async def test_async_redis_stopped_mid_run(dying_redis: RedisServer) -> None:
    """The async driver handles a dead Redis the same way: misses, loads, no exception."""
    from hardening import AsyncCache

    async with AsyncCache(dying_redis.url, clock=FakeClock()) as cache:

        async def load() -> str:
            return "v"

        assert await cache.get_or_set("k", load) == "v"
        dying_redis.kill()
        assert await cache.get_or_set("k", load) == "v"
        await cache.set("x", 1)
        assert await cache.get_many(["x"]) == {}
        assert await cache.invalidate_tags("t") == 0
        assert cache.stats().errors >= 3


def test_client_kind_must_match_driver(redis_url: str) -> None:
    """A blocking client in AsyncCache (or the reverse) is refused at start-up."""
    import redis
    import redis.asyncio

    from hardening import AsyncCache

    with pytest.raises(ConfigurationError):
        AsyncCache(redis.Redis.from_url(redis_url))
    with pytest.raises(ConfigurationError):
        Cache(redis.asyncio.Redis.from_url(redis_url))
    with pytest.raises(ConfigurationError):
        Cache("memcached://localhost")


def test_foreign_values_read_as_misses(redis_client: Any, redis_prefix: str) -> None:
    """Bytes another program left under a key (or a pickle) are a miss, never unpickled."""
    import pickle

    prefix = redis_prefix.rstrip(":")
    cache = Cache(redis_client, key_prefix=prefix)
    name = f"{prefix}:c:{{default}}:k:k"
    redis_client.set(name, pickle.dumps({"evil": 1}))
    assert cache.get("k") is None
    redis_client.set(name, b"h1:9999999999999:0:" + pickle.dumps({"evil": 1}))
    assert cache.get("k") is None  # not JSON: a miss
    started = time.monotonic()
    assert cache.get_or_set("k", lambda: "fresh") == "fresh"
    assert time.monotonic() - started < 1  # no waiting on a lock nobody holds
    assert cache.get("k") == "fresh"


# --- Redis Cluster --------------------------------------------------------------------------


def test_cluster_namespace_is_one_slot(redis_cluster_url: str) -> None:
    """Every name of a namespace maps to one slot; namespaces spread over the nodes."""
    prefix = f"t{time.time_ns()}"
    caches = [Cache(redis_cluster_url, key_prefix=prefix, namespace=f"ns{i}") for i in range(12)]
    client = caches[0]._storage.client
    for cache in caches:
        cache.set("project:42:blocks", 1, tags=["project:42"])
        names = [
            cache.scheme.value_name("project:42:blocks"),
            cache.base + "t:project:42",
            cache.base + "p:project:",
            cache.base + "l:x",
        ]
        assert len({client.keyslot(name) for name in names}) == 1
        assert cache.invalidate_tags("project:42") == 1
    nodes = {client.get_node_from_key(cache.base + "k:x").port for cache in caches}
    assert len(nodes) >= 2
    for cache in caches:
        cache.close()
