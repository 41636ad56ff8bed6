"""The backoff policy: exponential ceilings, capped, with full jitter below them."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import Backoff, ConfigurationError


def test_ceilings_grow_then_cap() -> None:
    """Ceilings double from the base and stop at the cap."""
    backoff = Backoff(base=0.1, factor=2, cap=1.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


@given(st.integers(min_value=1, max_value=10**6), st.integers(min_value=0, max_value=2**32))
def test_jittered_delay_stays_below_ceiling(attempt: int, seed: int) -> None:
    """Property: every delay lies in [0, ceiling] and huge attempt numbers never overflow."""
    backoff = Backoff(base=0.05, factor=3, cap=30.0)
    delay = backoff.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= backoff.ceiling(attempt) <= 30.0


def test_of_accepts_seconds_and_timedelta() -> None:
    """A plain duration is the base of a default Backoff."""
    assert Backoff.of(0.5).base == 0.5
    assert Backoff.of(timedelta(milliseconds=20)).base == pytest.approx(0.02)
    policy = Backoff(base=1)
    assert Backoff.of(policy) is policy


@pytest.mark.parametrize("options", [{"base": -1}, {"factor": 0.5}, {"cap": float("inf")}])
def test_bad_backoff_is_configuration_error(options: dict[str, float]) -> None:
    """Negative, shrinking or infinite settings are refused."""
    with pytest.raises(ConfigurationError):
        Backoff(**options)
