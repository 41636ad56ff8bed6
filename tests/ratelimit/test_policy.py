"""The pure policy: parsing, tiers, and (hypothesis) no strategy admits more than its contract."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import ConfigurationError, FakeClock
from hardening.ratelimit import MemoryRateLimitStorage, RateLimit, RateLimiter
from hardening.ratelimit.policy import (
    CounterState,
    counter_commit,
    counter_hit,
    moving_window_hit,
    parse_limits,
    parse_tiers,
)


def test_parse_limits_notation() -> None:
    """``limits``' notation parses into limits sorted by window."""
    assert parse_limits("500/hour;30/minute") == (RateLimit(30, 60.0), RateLimit(500, 3600.0))
    assert parse_limits(["10 per second", RateLimit(5, 2.5)]) == (
        RateLimit(10, 1.0),
        RateLimit(5, 2.5),
    )


def test_parse_limits_accepts_limits_items() -> None:
    """Parsed ``limits`` items are accepted as they are."""
    import limits

    assert parse_limits(limits.parse("7/day")) == (RateLimit(7, 86400.0),)


@pytest.mark.parametrize("bad", ["", "abc", "10/fortnight", "0/minute", [], "1/minute;2/minute"])
def test_parse_limits_rejects_garbage(bad: object) -> None:
    """Malformed, empty, zero or duplicate-window limits are configuration errors."""
    with pytest.raises(ConfigurationError):
        parse_limits(bad)  # type: ignore[arg-type]


def test_tiers_resolve() -> None:
    """Multipliers keep windows, explicit limits replace them, None lifts them."""
    base = parse_limits("10/hour")
    tiers = parse_tiers(
        {"pro": 5, "half": 0.5, "x": "3/minute", "ent": None, "u": "unlimited"}, base
    )
    assert tiers == {
        "pro": (RateLimit(50, 3600.0),),
        "half": (RateLimit(5, 3600.0),),
        "x": (RateLimit(3, 60.0),),
        "ent": None,
        "u": None,
    }


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_tier_multiplier_must_be_positive(bad: float) -> None:
    """A multiplier of zero, below zero or not finite is refused."""
    with pytest.raises(ConfigurationError):
        parse_tiers({"t": bad}, parse_limits("1/second"))


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "token-bucket"},
        {"on_backend_error": "explode"},
        {"block_for": -1},
        {"storage": "mongodb://x"},
        {"storage": 42},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    """Every invalid option fails at construction with a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        RateLimiter("1/second", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("cost", [0, -1, 1.5, True, "2"])
def test_bad_cost_is_refused(cost: object) -> None:
    """Only positive integers are costs."""
    with pytest.raises(ConfigurationError):
        RateLimiter("1/second").hit("k", cost=cost)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [None, 1, b"bytes"])
def test_non_string_key_is_refused(key: object) -> None:
    """Keys are strings."""
    with pytest.raises(ConfigurationError):
        RateLimiter("1/second").hit(key)  # type: ignore[arg-type]


def test_long_keys_are_hashed() -> None:
    """Huge keys become a bounded hash; distinct keys stay distinct."""
    limiter = RateLimiter("1/second")
    a, b = limiter.storage_key("x" * 10_000), limiter.storage_key("x" * 9_999 + "y")
    assert len(a) < 100
    assert a != b
    assert limiter.hit("x" * 10_000).allowed
    assert not limiter.hit("x" * 10_000).allowed


# --- properties ----------------------------------------------------------------------------

steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.integers(1, 4)),
    min_size=1,
    max_size=120,
)


def _admitted(
    strategy: str, amount: int, window: float, ops: list[tuple[float, int]]
) -> list[tuple[float, int]]:
    clock = FakeClock(1_000_000.0)
    limiter = RateLimiter(RateLimit(amount, window), strategy=strategy, clock=clock)  # type: ignore[arg-type]
    admitted = []
    for advance, cost in ops:
        clock.advance(advance)
        if limiter.hit("k", cost=cost).allowed:
            admitted.append((clock.time(), cost))
    return admitted


@settings(max_examples=300, deadline=None)
@given(ops=steps, amount=st.integers(1, 12), window=st.sampled_from([1.0, 10.0, 60.0]))
def test_moving_window_never_exceeds_amount_in_any_window(
    ops: list[tuple[float, int]], amount: int, window: float
) -> None:
    """Exact log: every window of the period ending at an admitted hit holds <= amount."""
    admitted = _admitted("moving-window", amount, window, ops)
    for t, _ in admitted:
        assert sum(c for s, c in admitted if t - window < s <= t) <= amount


@settings(max_examples=300, deadline=None)
@given(ops=steps, amount=st.integers(1, 12), window=st.sampled_from([1.0, 10.0, 60.0]))
def test_fixed_window_never_exceeds_amount_per_window(
    ops: list[tuple[float, int]], amount: int, window: float
) -> None:
    """Fixed window: each aligned window holds <= amount."""
    admitted = _admitted("fixed-window", amount, window, ops)
    per_window: dict[int, int] = {}
    for t, cost in admitted:
        per_window[math.floor(t / window)] = per_window.get(math.floor(t / window), 0) + cost
    assert all(total <= amount for total in per_window.values())


@settings(max_examples=300, deadline=None)
@given(ops=steps, amount=st.integers(1, 12), window=st.sampled_from([1.0, 10.0, 60.0]))
def test_sliding_counter_contract(ops: list[tuple[float, int]], amount: int, window: float) -> None:
    """Sliding counter: each aligned window <= amount, any sliding window < 2 x amount,
    and the weighted estimate at every admission stays within the amount."""
    admitted = _admitted("sliding-window-counter", amount, window, ops)
    per_window: dict[int, int] = {}
    for t, cost in admitted:
        index = math.floor(t / window)
        per_window[index] = per_window.get(index, 0) + cost
        previous = per_window.get(index - 1, 0)
        weight = 1 - (t - index * window) / window
        assert previous * weight + per_window[index] <= amount + 1e-6
    for t, _ in admitted:
        assert sum(c for s, c in admitted if t - window < s <= t) <= 2 * amount


@settings(max_examples=200, deadline=None)
@given(ops=steps, amount=st.integers(1, 12))
def test_denied_hits_change_nothing(ops: list[tuple[float, int]], amount: int) -> None:
    """Refused hits leave the counters as they were (what a peek sees is unchanged)."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(RateLimit(amount, 10.0), clock=clock)
    for advance, cost in ops:
        clock.advance(advance)
        before = limiter.peek("k").remaining
        if not limiter.hit("k", cost=cost).allowed:
            assert limiter.peek("k").remaining == before


def test_counter_policy_is_pure_and_rolls_windows() -> None:
    """The counter policy function rolls the previous window and charges only on commit."""
    state, limit = CounterState(), RateLimit(10, 10.0)
    ok, st1 = counter_hit(state, limit, 5.0, 4, sliding=True)
    assert ok
    assert st1.remaining == 6
    assert state.current == 0  # not charged until committed
    counter_commit(state, 4)
    ok, st2 = counter_hit(state, limit, 15.0, 1, sliding=True)  # next window, half way
    assert (state.previous, state.current) == (4, 0)
    assert st2.remaining == 10 - 2 - 1  # 4 weighted by one half, plus this hit


def test_moving_window_policy_prunes_the_log() -> None:
    """Entries older than the window leave the log."""
    log = deque([0.0, 1.0, 2.0])
    ok, state = moving_window_hit(log, RateLimit(2, 10.0), 10.5, 1)
    assert list(log) == [1.0, 2.0]
    assert not ok
    assert state.retry_after == pytest.approx(0.5)


def test_memory_storage_reclaims_expired_keys() -> None:
    """Memory stays bounded: keys whose windows have passed are reclaimed as time goes on."""
    clock = FakeClock(0.0)
    storage = MemoryRateLimitStorage(clock=clock)
    limiter = RateLimiter("5/minute", storage=storage, clock=clock)
    for i in range(5_000):
        limiter.hit(f"ip:{i}")
    assert len(storage) == 5_000
    clock.advance(121)
    for _ in range(700):
        limiter.hit("steady")
    assert len(storage) <= 2
