"""The limiter under pressure: full pools, blips, outages, silent servers and hostile keys.

Every test talks to real Redis (or a real Redis Cluster), directly or through the
fault-injecting proxy (``tests/faultproxy.py``). Time-dependent breaker behaviour runs on a
fake clock, so the assertions are exact; only the recovery test measures real time, against
the breaker's own window.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio

from hardening import BackendUnavailable, FakeClock
from hardening.ratelimit import AsyncRateLimiter, RateLimiter
from tests.concurrency import in_threads
from tests.conftest import free_port
from tests.faultproxy import FaultProxy, blip_under_load

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = pytest.mark.slow


def _prefix(redis_prefix: str) -> str:
    return redis_prefix.rstrip(":")


@pytest.mark.anyio
async def test_400_concurrent_async_hits_admit_exactly_the_limit(
    redis_url: str, redis_prefix: str
) -> None:
    """400 concurrent hits at 20/minute: 20 admitted, 380 denied, no decision from errors."""
    limiter = AsyncRateLimiter("20/minute", storage=redis_url, key_prefix=_prefix(redis_prefix))
    async with limiter:
        decisions = await asyncio.gather(*(limiter.hit("crowd") for _ in range(400)))
    assert sum(d.allowed for d in decisions) == 20
    assert sum(d.error for d in decisions) == 0
    assert limiter._health.failures == 0


def test_200_threads_admit_exactly_the_limit(redis_url: str, redis_prefix: str) -> None:
    """200 threads at 20/minute on the blocking limiter: exactly 20 admitted, no errors."""
    limiter = RateLimiter("20/minute", storage=redis_url, key_prefix=_prefix(redis_prefix))
    decisions = in_threads(200, lambda: limiter.hit("crowd"))
    limiter.close()
    assert len(decisions) == 200
    assert sum(d.allowed for d in decisions) == 20
    assert sum(d.error for d in decisions) == 0


@pytest.mark.anyio
async def test_a_refusing_user_pool_is_warned_about_and_trips_nothing(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's client whose pool raises when full: a warning, and the breaker stays closed."""
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=5)
    with caplog.at_level(logging.WARNING, logger="hardening"):
        limiter = AsyncRateLimiter("1000/minute", storage=client, key_prefix=_prefix(redis_prefix))
    assert any("MaxConnectionsError" in record.getMessage() for record in caplog.records)
    try:
        decisions = await asyncio.gather(*(limiter.hit("crowd") for _ in range(200)))
    finally:
        await client.aclose()
    refused = [d for d in decisions if d.error]
    assert refused  # the user's pool refused some callers at once...
    assert limiter._health.healthy  # ...which is not an outage: nobody else is affected
    assert limiter._health.failures == 0


def test_concurrent_failures_in_a_blip_open_the_breaker_once(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """50 callers failing during a cut: one 0.5 s window, not 50 doublings (30 s)."""
    clock = FakeClock()
    limiter = RateLimiter(
        "1000/minute",
        storage=redis_proxy.redis_url() + "?socket_timeout=2",
        key_prefix=_prefix(redis_prefix),
        clock=clock,
    )
    assert limiter.hit("warm").allowed
    redis_proxy.cut()
    decisions = in_threads(50, lambda: limiter.hit("crowd"))
    assert all(d.allowed and d.error for d in decisions)  # on_backend_error="allow"
    assert limiter._health.window == 0.5
    redis_proxy.restore()
    clock.advance(0.5)
    decision = limiter.hit("crowd")
    assert not decision.error
    assert limiter._health.healthy
    limiter.close()


def test_a_long_outage_doubles_per_failed_probe_then_recovers(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """Each failed probe doubles the window; the first probe after recovery closes it."""
    clock = FakeClock()
    limiter = RateLimiter(
        "1000/minute",
        storage=redis_proxy.redis_url(),
        key_prefix=_prefix(redis_prefix),
        clock=clock,
        on_backend_error="deny",
    )
    assert limiter.hit("k").allowed
    redis_proxy.cut()
    windows = []
    for _ in range(4):
        decision = limiter.hit("k")
        assert decision.error
        assert not decision.allowed
        windows.append(limiter._health.window)
        for _ in range(10):  # callers inside the window are answered without a probe
            assert limiter.hit("k").error
        clock.advance(limiter._health.window)
    assert windows == [0.5, 1.0, 2.0, 4.0]
    assert limiter._health.probes == 3
    redis_proxy.restore()
    assert not limiter.hit("k").error
    assert limiter._health.healthy
    limiter.close()


def test_normal_decisions_within_a_second_of_a_blip(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """A 0.2 s blip under 50 concurrent callers: normal decisions again within 1 s."""
    limiter = RateLimiter(
        "100000/minute", storage=redis_proxy.redis_url(), key_prefix=_prefix(redis_prefix)
    )
    try:
        report = blip_under_load(redis_proxy, lambda: limiter.hit("busy").error)
    finally:
        limiter.close()
    assert report.failed > 0, "the blip was not seen"
    assert report.recovered_after <= 1.0, f"errors went on {report.recovered_after:.2f}s"
    assert not report.last_failed


def test_a_server_that_never_answers_costs_one_timeout(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """A blackholed Redis: the first hit times out, the rest are answered at once by policy."""
    clock = FakeClock()
    limiter = RateLimiter(
        "10/minute",
        storage=redis_proxy.redis_url() + "?socket_timeout=0.3",
        key_prefix=_prefix(redis_prefix),
        clock=clock,
        on_backend_error="local",
    )
    assert limiter.hit("k").allowed
    redis_proxy.blackhole()
    connections = redis_proxy.connections_accepted
    first = limiter.hit("k")
    assert first.error
    assert redis_proxy.connections_accepted == connections  # a timeout is not retried
    storage = limiter._storage
    calls = []
    original = storage.hit
    storage.hit = lambda request: calls.append(request) or original(request)
    rest = [limiter.hit("k") for _ in range(20)]
    assert calls == []  # no call waited for the silent server: the breaker answered
    assert all(d.error for d in rest)
    assert sum(d.allowed for d in [first, *rest]) == 10  # "local": counted in process
    redis_proxy.restore()
    clock.advance(0.5)
    assert not limiter.hit("k").error
    limiter.close()


@pytest.mark.anyio
async def test_async_blackhole_then_recovery(redis_proxy: FaultProxy, redis_prefix: str) -> None:
    """The asyncio limiter against a silent server: bounded wait, then back to normal."""
    clock = FakeClock()
    limiter = AsyncRateLimiter(
        "10/minute",
        storage=redis_proxy.redis_url() + "?socket_timeout=0.3",
        key_prefix=_prefix(redis_prefix),
        clock=clock,
    )
    async with limiter:
        assert not (await limiter.hit("k")).error
        redis_proxy.blackhole()
        decisions = await asyncio.wait_for(
            asyncio.gather(*(limiter.hit("k") for _ in range(100))), timeout=10
        )
        assert all(d.error and d.allowed for d in decisions)
        assert limiter._health.window == 0.5
        redis_proxy.restore()
        clock.advance(0.5)
        assert not (await limiter.hit("k")).error


def test_cancelled_probe_does_not_wedge_the_breaker(redis_prefix: str) -> None:
    """A probe whose task is cancelled frees the probe slot for the next caller."""

    async def scenario() -> None:
        clock = FakeClock()
        limiter = AsyncRateLimiter(
            "10/minute",
            storage=f"redis://127.0.0.1:{free_port()}/0",
            key_prefix=_prefix(redis_prefix),
            clock=clock,
        )
        assert (await limiter.hit("k")).error
        clock.advance(0.5)
        probe = asyncio.ensure_future(limiter.hit("k"))
        await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert limiter._health.admit() is not None
        await limiter.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("key", ["}a", "{", "{}", "}", "{a}{b}", "\ud800", "x" * 10_000])
def test_hostile_keys_are_limited_exactly_on_a_cluster(
    redis_cluster_url: str, redis_prefix: str, key: str
) -> None:
    """Keys that used to break hash tags: each limited exactly, and nobody else affected."""
    limiter = RateLimiter("3/minute", storage=redis_cluster_url, key_prefix=_prefix(redis_prefix))
    try:
        decisions = [limiter.hit(key) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert not any(d.error for d in decisions)
        assert limiter._health.healthy
        other = [limiter.hit("someone-else") for _ in range(4)]
        assert [d.allowed for d in other] == [True, True, True, False]
        assert not any(d.error for d in other)
        limiter.reset(key)
        assert limiter.hit(key).allowed
    finally:
        for name in (key, "someone-else"):
            limiter.reset(name)
        limiter.close()


def test_a_key_redis_refuses_fails_alone(
    redis_client: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """A hit whose key holds the wrong type fails per policy; other keys are unaffected."""
    limiter = RateLimiter(
        "3/minute",
        storage=redis_url,
        key_prefix=_prefix(redis_prefix),
        on_backend_error="deny",
    )
    wrong = "wrongtype"
    redis_client.set(limiter.storage_key(wrong) + ":swc:60000", "not a hash")
    decision = limiter.hit(wrong)
    assert decision.error
    assert not decision.allowed
    assert limiter._health.healthy
    assert [limiter.hit("fine").allowed for _ in range(4)] == [True, True, True, False]
    limiter.close()


def test_deny_on_outage_is_503_not_429() -> None:
    """``on_backend_error="deny"`` refuses with BackendUnavailable carrying the window."""
    clock = FakeClock()
    limiter = RateLimiter(
        "3/minute",
        storage=f"redis://127.0.0.1:{free_port()}/0",
        clock=clock,
        on_backend_error="deny",
    )

    @limiter.limit("k")
    def guarded() -> str:
        return "ran"

    with pytest.raises(BackendUnavailable) as caught:
        guarded()
    assert caught.value.http_status == 503
    assert caught.value.retry_after == 0.5
    decision = limiter.hit("k")
    assert decision.refusal().http_status == 503
    limiter.close()


@pytest.mark.anyio
async def test_latency_slows_decisions_but_changes_none(
    redis_proxy: FaultProxy, redis_prefix: str
) -> None:
    """50 ms each way on every Redis reply and 300 concurrent hits: still exactly 20 admitted."""
    redis_proxy.latency(0.05)
    limiter = AsyncRateLimiter(
        "20/minute",
        storage=redis_proxy.redis_url() + "?max_connections=10&pool_timeout=30",
        key_prefix=_prefix(redis_prefix),
    )
    async with limiter:
        decisions = await asyncio.gather(*(limiter.hit("slow") for _ in range(300)))
    assert sum(d.allowed for d in decisions) == 20
    assert sum(d.error for d in decisions) == 0
    assert redis_proxy.connections_accepted <= 10  # the pool bounded the connections
