"""Behaviour every storage must show, run on memory (fake clock) and on real Redis."""

from __future__ import annotations

import threading

import pytest

from hardening.ratelimit import RateLimiter
from tests.ratelimit.conftest import Harness

STRATEGIES = ["sliding-window-counter", "moving-window", "fixed-window"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exactly_n_per_window(harness: Harness, strategy: str) -> None:
    """A single key gets exactly N hits in a window, then a denial with retry data."""
    limiter = harness.make("30/minute", strategy=strategy)
    decisions = [limiter.hit("user:1") for _ in range(31)]
    assert [d.allowed for d in decisions] == [True] * 30 + [False]
    assert [d.remaining for d in decisions[:30]] == list(range(29, -1, -1))
    denied = decisions[-1]
    assert denied.retry_after is not None
    assert 0 < denied.retry_after <= 120
    assert denied.limit == 30
    assert denied.remaining == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_retry_after_is_when_a_retry_passes(harness: Harness, strategy: str) -> None:
    """Waiting ``retry_after`` is enough for the same hit to pass."""
    limiter = harness.make("3/second", strategy=strategy)
    for _ in range(3):
        assert limiter.hit("k").allowed
    denied = limiter.hit("k")
    assert not denied.allowed
    assert denied.retry_after is not None
    if harness.exact_time:
        harness.wait(denied.retry_after - 0.01)
        assert not limiter.hit("k").allowed
        harness.wait(0.01)
    else:
        harness.wait(denied.retry_after + 0.02)
    assert limiter.hit("k").allowed


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keys_are_independent(harness: Harness, strategy: str) -> None:
    """Exhausting one key leaves another untouched."""
    limiter = harness.make("2/minute", strategy=strategy)
    assert limiter.hit("a").allowed
    assert limiter.hit("a").allowed
    assert not limiter.hit("a").allowed
    assert limiter.hit("b").remaining == 1


def test_cost_above_one(harness: Harness) -> None:
    """A hit may cost several units; a hit that does not fit is refused whole."""
    limiter = harness.make("10/minute")
    assert limiter.hit("k", cost=4).remaining == 6
    assert limiter.hit("k", cost=4).remaining == 2
    denied = limiter.hit("k", cost=4)
    assert not denied.allowed
    assert denied.remaining == 2
    assert limiter.hit("k", cost=2).allowed
    assert not limiter.hit("k").allowed


def test_cost_larger_than_limit_never_passes(harness: Harness) -> None:
    """A cost above the quota is refused without charging anything."""
    limiter = harness.make("5/minute")
    assert not limiter.hit("k", cost=6).allowed
    assert limiter.hit("k", cost=5).allowed


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multi_limit_is_all_or_nothing(harness: Harness, strategy: str) -> None:
    """A hit denied by one limit charges none of the others."""
    limiter = harness.make("2/second;3/hour", strategy=strategy)
    assert limiter.hit("k").allowed
    assert limiter.hit("k").allowed
    denied = limiter.hit("k")  # refused by the per-second limit
    assert not denied.allowed
    hour = next(s for s in denied.states if s.limit.window == 3600)
    assert hour.remaining == 1  # the refused hit did not consume the hour limit
    harness.wait(2.05)
    assert limiter.hit("k").allowed  # hour: 3 of 3
    refused_by_hour = limiter.hit("k")
    assert not refused_by_hour.allowed
    second = next(s for s in refused_by_hour.states if s.limit.window == 1)
    assert second.remaining == 1  # the per-second limit was not charged either
    assert refused_by_hour.retry_after is not None
    hour = next(s for s in refused_by_hour.states if s.limit.window == 3600)
    assert hour.retry_after is not None  # the hour limit refused it
    assert refused_by_hour.retry_after == hour.retry_after  # and it binds
    if strategy != "fixed-window":
        # a fixed window ends on the clock's hour, which may be seconds away: there the
        # retry's size depends on when the test runs (it failed at hh:59:04 with 55.8 s)
        assert refused_by_hour.retry_after > 60


def test_peek_does_not_consume(harness: Harness) -> None:
    """``peek`` reports without charging."""
    limiter = harness.make("2/minute")
    assert limiter.peek("k").remaining == 2
    assert limiter.peek("k").remaining == 2
    assert limiter.hit("k").remaining == 1
    assert limiter.peek("k").remaining == 1
    assert limiter.peek("k").allowed
    limiter.hit("k")
    assert limiter.peek("k").remaining == 0
    assert not limiter.peek("k").allowed


def test_block_for_holds_and_releases(harness: Harness) -> None:
    """An exceeded key stays blocked for ``block_for``, then is let through again."""
    block = 600 if harness.exact_time else 1.5
    limiter = harness.make("2/second", block_for=block)
    limiter.hit("k")
    limiter.hit("k")
    first = limiter.hit("k")
    assert not first.allowed
    assert first.blocked
    assert first.retry_after == pytest.approx(block, abs=0.05)
    harness.wait(1.1)  # the limit itself would allow a hit now
    # a fresh limiter has no in-process block cache: the storage itself keeps the block
    fresh = harness.make("2/second", block_for=block)
    still = fresh.hit("k")
    assert not still.allowed
    assert still.blocked
    assert still.retry_after is not None
    assert still.retry_after < block
    harness.wait(still.retry_after + 0.05)
    assert fresh.hit("k").allowed


def test_block_cache_answers_in_process(harness: Harness) -> None:
    """Once blocked, the same limiter refuses without asking the storage."""
    limiter = harness.make("1/minute", block_for=60)
    limiter.hit("k")
    assert limiter.hit("k").blocked
    limiter._storage = None  # any storage access would now fail loudly
    cached = limiter.hit("k")
    assert cached.blocked
    assert not cached.allowed
    assert cached.headers()["Retry-After"]


def test_reset_clears_counters_and_block(harness: Harness) -> None:
    """``reset`` forgets a key's counters and block."""
    limiter = harness.make("1/minute", block_for=60)
    limiter.hit("k")
    assert not limiter.hit("k").allowed
    limiter.reset("k")
    assert limiter.hit("k").allowed


def test_tiers_multiplier_explicit_and_unlimited(harness: Harness) -> None:
    """Tiers scale the base limits, replace them, or lift them."""
    limiter = harness.make("10/hour", tiers={"pro": 5, "team": "20/hour", "enterprise": None})
    assert sum(limiter.hit("free", tier=None).allowed for _ in range(12)) == 10
    assert sum(limiter.hit("pro", tier="pro").allowed for _ in range(60)) == 50
    assert sum(limiter.hit("team", tier="team").allowed for _ in range(25)) == 20
    unlimited = [limiter.hit("ent", tier="enterprise") for _ in range(500)]
    assert all(d.allowed for d in unlimited)
    assert unlimited[0].limit is None
    assert unlimited[0].headers() == {}


def test_tier_change_keeps_counters(harness: Harness) -> None:
    """Upgrading a user's tier keeps what they used (counters are per window, not amount)."""
    limiter = harness.make("10/hour", tiers={"pro": 5})
    for _ in range(10):
        limiter.hit("u")
    assert not limiter.hit("u").allowed
    upgraded = limiter.hit("u", tier="pro")
    assert upgraded.allowed
    assert upgraded.remaining == 39
    assert not limiter.hit("u").allowed  # back on the free tier: still over


def test_unknown_tier_gets_base_limits(harness: Harness) -> None:
    """A tier name the limiter does not know (e.g. from a header) never grants more."""
    limiter = harness.make("1/hour", tiers={"pro": 10})
    assert limiter.hit("u", tier="forged").allowed
    assert not limiter.hit("u", tier="forged").allowed


def test_headers_describe_the_decision(harness: Harness) -> None:
    """Denied decisions carry X-RateLimit-*, RateLimit, RateLimit-Policy and Retry-After."""
    limiter = harness.make("2/minute;5/hour")
    ok = limiter.hit("k").headers()
    assert ok["X-RateLimit-Limit"] == "2"
    assert ok["X-RateLimit-Remaining"] == "1"
    assert ok["RateLimit-Policy"] == '"2-per-60s";q=2;w=60, "5-per-3600s";q=5;w=3600'
    assert '"2-per-60s";r=1;t=' in ok["RateLimit"]
    assert "Retry-After" not in ok
    limiter.hit("k")
    denied = limiter.hit("k")
    headers = denied.headers()
    retry = int(headers["Retry-After"])
    assert retry >= 1
    assert denied.retry_after is not None
    assert retry >= denied.retry_after
    for part in headers["RateLimit"].split(", "):
        assert int(part.rsplit("t=", 1)[1]) <= retry  # Retry-After never earlier than t
    assert int(headers["X-RateLimit-Reset"]) >= int(denied.timestamp)


@pytest.mark.parametrize("storage_name", ["memory", "redis"])
def test_moving_window_exact_under_64_threads(
    storage_name: str, request: pytest.FixtureRequest
) -> None:
    """64 threads hammering one key with 100/minute admit exactly 100."""
    if storage_name == "redis":
        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        limiter = RateLimiter(
            "100/minute", storage=client, key_prefix=prefix, strategy="moving-window"
        )
    else:
        limiter = RateLimiter("100/minute", strategy="moving-window")
    allowed = []
    barrier = threading.Barrier(64)

    def worker() -> None:
        barrier.wait()
        mine = sum(limiter.hit("hot").allowed for _ in range(10))
        allowed.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(allowed) == 64
    assert sum(allowed) == 100
