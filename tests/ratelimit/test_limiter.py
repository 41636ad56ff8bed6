"""The drivers: async twin, decorators, Redis specifics, backend faults and Redis Cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hardening import BackendUnavailable, ConfigurationError, FakeClock, RateLimitExceeded
from hardening.ratelimit import AsyncRateLimiter, RateLimiter
from tests.conftest import RedisServer


@pytest.mark.anyio
async def test_async_memory_exactly_n() -> None:
    """The async limiter on memory admits exactly N and reports the same decisions."""
    limiter = AsyncRateLimiter("3/minute", clock=FakeClock())
    decisions = [await limiter.hit("k") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert (await limiter.peek("k")).remaining == 0
    await limiter.reset("k")
    assert (await limiter.hit("k")).allowed


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", ["sliding-window-counter", "moving-window", "fixed-window"])
async def test_async_redis_matches_sync(
    async_redis_client: Any, redis_client: Any, redis_prefix: str, strategy: str
) -> None:
    """Async and sync limiters share keys and decisions on one Redis."""
    prefix = redis_prefix.rstrip(":")
    alimiter = AsyncRateLimiter(
        "4/minute",
        storage=async_redis_client,
        key_prefix=prefix,
        strategy=strategy,  # type: ignore[arg-type]
    )
    slimiter = RateLimiter("4/minute", storage=redis_client, key_prefix=prefix, strategy=strategy)  # type: ignore[arg-type]
    assert (await alimiter.hit("k", cost=2)).remaining == 2
    assert slimiter.hit("k").remaining == 1
    assert (await alimiter.hit("k")).remaining == 0
    assert not slimiter.hit("k").allowed
    await alimiter.reset("k")
    assert slimiter.hit("k").remaining == 3


def test_client_kind_must_match_driver(redis_url: str) -> None:
    """A blocking client in the async driver (or the reverse) is refused at start-up."""
    import redis
    import redis.asyncio

    with pytest.raises(ConfigurationError):
        AsyncRateLimiter("1/second", storage=redis.Redis.from_url(redis_url))
    with pytest.raises(ConfigurationError):
        RateLimiter("1/second", storage=redis.asyncio.Redis.from_url(redis_url))


def test_storage_url_builds_client(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    """A ``redis://`` URL is enough to get a shared limiter."""
    with RateLimiter("2/minute", storage=redis_url, key_prefix=redis_prefix.rstrip(":")) as lim:
        assert lim.hit("k").allowed
    assert redis_client.exists(f"{redis_prefix}rl:{{k}}:swc:60000") == 1


def test_decision_time_comes_from_redis(redis_client: Any, redis_prefix: str) -> None:
    """Redis decides by its own clock: a skewed app clock changes nothing."""
    skewed = FakeClock(0.0)  # an app server whose clock says 1970
    limiter = RateLimiter(
        "2/minute", storage=redis_client, key_prefix=redis_prefix.rstrip(":"), clock=skewed
    )
    seconds, micros = redis_client.time()
    decision = limiter.hit("k")
    assert abs(decision.timestamp - (seconds + micros / 1e6)) < 5


def test_one_round_trip_per_hit_with_headers(redis_url: str, redis_prefix: str) -> None:
    """A hit on three limits, headers included, costs exactly one command on the wire."""
    import redis

    sent: list[int] = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    limiter = RateLimiter(
        "10/second;100/minute;1000/hour", storage=client, key_prefix=redis_prefix.rstrip(":")
    )
    limiter.hit("warm")  # the first call may load the script (NOSCRIPT, then EVAL)
    sent.clear()
    for _ in range(20):
        limiter.hit("k").headers()
    assert len(sent) == 20
    client.delete(*client.keys(f"{redis_prefix}*"))
    client.close()


@pytest.mark.parametrize("key", ["a{b}c", "{x}", "*", "user:\u00e9\u4e2d", "k" * 500, ""])
def test_hostile_keys_on_redis(redis_client: Any, redis_prefix: str, key: str) -> None:
    """Braces, globs, unicode, huge and empty keys all limit correctly on Redis."""
    limiter = RateLimiter("1/minute", storage=redis_client, key_prefix=redis_prefix.rstrip(":"))
    assert limiter.hit(key).allowed
    assert not limiter.hit(key).allowed
    limiter.reset(key)
    assert limiter.hit(key).allowed


# --- decorators ------------------------------------------------------------------------


def test_decorator_raises_with_decision() -> None:
    """The sync decorator raises RateLimitExceeded carrying retry_after and headers."""
    limiter = RateLimiter("2/minute", clock=FakeClock())

    @limiter.limit(key=lambda user: f"user:{user}")
    def save(user: str) -> str:
        return f"saved {user}"

    assert save("a") == "saved a"
    assert save("a") == "saved a"
    with pytest.raises(RateLimitExceeded) as info:
        save("a")
    assert info.value.retry_after > 0
    assert info.value.headers["Retry-After"]
    assert info.value.decision is not None
    assert save("b") == "saved b"


@pytest.mark.anyio
async def test_sync_limiter_decorates_async_function() -> None:
    """``RateLimiter.limit`` also wraps ``async def`` functions."""
    limiter = RateLimiter("1/minute", clock=FakeClock())

    @limiter.limit(key="global", cost=1)
    async def work() -> int:
        return 7

    assert await work() == 7
    with pytest.raises(RateLimitExceeded):
        await work()


@pytest.mark.anyio
async def test_async_limiter_decorator() -> None:
    """``AsyncRateLimiter.limit`` wraps coroutines and refuses plain functions."""
    limiter = AsyncRateLimiter("1/minute", clock=FakeClock())

    @limiter.limit(key="k")
    async def work() -> str:
        return "ok"

    assert await work() == "ok"
    with pytest.raises(RateLimitExceeded):
        await work()
    with pytest.raises(ConfigurationError):
        limiter.limit(key="k")(lambda: None)  # type: ignore[arg-type, return-value]


# --- backend faults ---------------------------------------------------------------------


@pytest.fixture
def dying_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server of the test's own, which the test may kill and restart."""
    return redis_server_factory()


@pytest.fixture
def limiter_on() -> Iterator[Callable[[RedisServer, str, FakeClock], RateLimiter]]:
    """Build limiters on a throwaway server's URL; each is closed after the test."""
    made: list[RateLimiter] = []

    def make(server: RedisServer, mode: str, clock: FakeClock) -> RateLimiter:
        limiter = RateLimiter(
            "3/minute",
            storage=server.url,
            on_backend_error=mode,
            clock=clock,  # type: ignore[arg-type]
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()


def test_fail_open_when_redis_dies(
    dying_redis: RedisServer, limiter_on: Callable[[RedisServer, str, FakeClock], RateLimiter]
) -> None:
    """``allow``: a dead Redis lets requests through, flagged as errors, without raising."""
    limiter = limiter_on(dying_redis, "allow", FakeClock())
    assert limiter.hit("k").allowed
    dying_redis.kill()
    decisions = [limiter.hit("k") for _ in range(10)]
    assert all(d.allowed and d.error for d in decisions)
    assert decisions[0].headers() == {}


def test_fail_closed_when_redis_dies(
    dying_redis: RedisServer, limiter_on: Callable[[RedisServer, str, FakeClock], RateLimiter]
) -> None:
    """``deny``: a dead Redis refuses requests with a retry hint, without raising."""
    limiter = limiter_on(dying_redis, "deny", FakeClock())
    assert limiter.hit("k").allowed
    dying_redis.kill()
    decision = limiter.hit("k")
    assert not decision.allowed
    assert decision.error
    assert decision.retry_after is not None
    assert decision.retry_after > 0
    assert decision.headers() == {"Retry-After": "1"}  # a 429 always says when to retry


def test_local_fallback_then_recovery(
    dying_redis: RedisServer, limiter_on: Callable[[RedisServer, str, FakeClock], RateLimiter]
) -> None:
    """``local``: limits hold in process while Redis is down; Redis is used again after it
    returns and the backoff has passed."""
    clock = FakeClock()
    limiter = limiter_on(dying_redis, "local", clock)
    assert limiter.hit("k").allowed
    dying_redis.kill()
    during = [limiter.hit("k") for _ in range(4)]
    assert [d.allowed for d in during] == [True, True, True, False]
    assert all(d.error for d in during)
    assert during[-1].headers()["X-RateLimit-Remaining"] == "0"  # real local counts
    dying_redis.start()  # same port, empty
    assert limiter.hit("k").error  # still backing off: Redis not probed yet
    clock.advance(31)
    back = limiter.hit("k")
    assert back.allowed
    assert not back.error
    assert back.remaining == 2  # counted by the fresh Redis


def test_redis_unreachable_from_the_start(redis_server_factory: Callable[..., RedisServer]) -> None:
    """A Redis that never answers is handled like one that died."""
    server = redis_server_factory()
    server.kill()
    with RateLimiter("1/second", storage=server.url, on_backend_error="deny") as limiter:
        assert not limiter.hit("k").allowed


def test_reset_on_dead_redis_raises_typed_error(
    dying_redis: RedisServer, limiter_on: Callable[[RedisServer, str, FakeClock], RateLimiter]
) -> None:
    """An operator's reset must not silently do nothing: it raises BackendUnavailable."""
    limiter = limiter_on(dying_redis, "allow", FakeClock())
    dying_redis.kill()
    with pytest.raises(BackendUnavailable):
        limiter.reset("k")


@pytest.mark.anyio
async def test_async_fail_modes_when_redis_dies(dying_redis: RedisServer) -> None:
    """The async driver handles a dead Redis the same way."""
    async with AsyncRateLimiter(
        "2/minute", storage=dying_redis.url, on_backend_error="deny"
    ) as limiter:
        assert (await limiter.hit("k")).allowed
        dying_redis.kill()
        decision = await limiter.hit("k")
        assert not decision.allowed
        assert decision.error


# --- Redis Cluster ----------------------------------------------------------------------


def test_cluster_limits_across_slots(redis_cluster_url: str) -> None:
    """On a 3-node cluster, every principal's limits run in one script on one slot."""
    limiter = RateLimiter(
        "3/minute;10/hour",
        storage=redis_cluster_url,
        key_prefix=f"t{time.time_ns()}",
        block_for=30,
    )
    request_cleanup = limiter.close
    for user in range(20):  # many principals: their hash tags spread over all nodes
        decisions = [limiter.hit(f"user:{user}") for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert decisions[-1].blocked
    limiter.reset("user:0")
    assert limiter.hit("user:0").allowed
    client = limiter._storage.client
    nodes = {client.get_node_from_key(limiter.storage_key(f"user:{u}")).port for u in range(20)}
    assert len(nodes) >= 2  # the principals really were spread over several nodes
    request_cleanup()


@pytest.mark.anyio
async def test_async_cluster(redis_cluster_url: str) -> None:
    """The async driver works on Redis Cluster too."""
    async with AsyncRateLimiter(
        "2/minute",
        storage=redis_cluster_url,
        key_prefix=f"t{time.time_ns()}",
        strategy="moving-window",
    ) as limiter:
        assert [(await limiter.hit("k")).allowed for _ in range(3)] == [True, True, False]
        await limiter.reset("k")


# --- metrics ----------------------------------------------------------------------------


def test_decisions_are_counted_by_outcome(
    dying_redis: RedisServer, limiter_on: Callable[[RedisServer, str, FakeClock], RateLimiter]
) -> None:
    """With a registry attached, decisions are counted by limiter name and outcome."""
    from hardening import Metrics

    metrics = Metrics()
    clock = FakeClock()
    limiter = RateLimiter("2/minute", block_for=60, metrics=metrics, name="saves", clock=clock)
    for _ in range(4):
        limiter.hit("u")
    limiter.peek("u")  # peeks are not decisions
    broken = RateLimiter(
        "2/minute", storage=dying_redis.url, metrics=metrics, name="broken", clock=clock
    )
    dying_redis.kill()
    broken.hit("u")
    broken.close()

    def count(name: str, outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "hardening_rate_limit_decisions_total", {"limiter": name, "outcome": outcome}
        )

    assert count("saves", "allowed") == 2
    assert count("saves", "blocked") == 2  # the refusal that starts the block, then cached
    assert count("saves", "denied") is None
    assert count("broken", "error") == 1


# --- Redis Sentinel ---------------------------------------------------------------------


def test_sentinel_url(redis_server_factory: Callable[..., RedisServer], tmp_path: Any) -> None:
    """A ``redis+sentinel://`` URL finds the master through a real Sentinel."""
    import subprocess

    from tests.conftest import _wait_for_port, free_port

    master = redis_server_factory()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor svc 127.0.0.1 {master.port} 1\n"
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        with RateLimiter("2/minute", storage=f"redis+sentinel://127.0.0.1:{port}/svc") as limiter:
            assert [limiter.hit("k").allowed for _ in range(3)] == [True, True, False]
            assert not limiter.hit("k").error
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)


def test_with_limits_shares_storage_not_counters() -> None:
    """A derived limiter (per-route rules) keeps its own counters on the shared storage."""
    clock = FakeClock()
    base = RateLimiter("3/minute", clock=clock, tiers={"pro": 2, "team": "50/hour"})
    saves = base.with_limits("1/minute", name="PATCH /pages/*")
    assert saves._storage is base._storage
    assert saves.key_prefix == "hardening:PATCH%20/pages/*"
    assert saves.hit("user:1").allowed
    assert not saves.hit("user:1").allowed
    assert base.hit("user:1").remaining == 2  # the base limiter's counter is untouched
    assert saves.hit("user:2", tier="pro").limit == 2  # multiplier tiers carry over
    assert saves.hit("user:3", tier="team").limit == 1  # explicit ones do not
    saves.close()  # does not close the shared storage
    assert base.hit("user:1").allowed


def test_repeated_hits_reuse_the_request_but_still_check_arguments() -> None:
    """The per-principal request cache never lets a bad cost or key type through."""
    limiter = RateLimiter("5/minute", clock=FakeClock())
    limiter.hit("k", cost=1)
    with pytest.raises(ConfigurationError):
        limiter.hit("k", cost=True)  # equal to 1 as a dict key, still refused
    with pytest.raises(ConfigurationError):
        limiter.hit("k", cost=0)
    assert limiter.hit("k", tier="unknown").remaining == 3  # unknown tier: base limits
