"""The injectable clock and duration parsing."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hardening import Clock, ConfigurationError, FakeClock, SystemClock
from hardening._clock import to_seconds


def test_fake_clock_moves_only_when_told() -> None:
    """A fake clock stands still until advanced; sleep advances it instantly."""
    clock = FakeClock(100.0)
    assert clock.time() == clock.monotonic() == 100.0
    clock.advance(timedelta(seconds=2))
    clock.sleep(0.5)
    assert clock.time() == 102.5


def test_fake_clock_refuses_going_back() -> None:
    """Time never runs backwards."""
    with pytest.raises(ConfigurationError):
        FakeClock().advance(-1)


def test_clocks_satisfy_protocol() -> None:
    """Both clocks are ``Clock``s."""
    assert isinstance(SystemClock(), Clock)
    assert isinstance(FakeClock(), Clock)
    assert SystemClock().monotonic() > 0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "3", True, None])
def test_to_seconds_rejects_bad_values(bad: object) -> None:
    """Durations must be finite non-negative numbers or timedeltas."""
    with pytest.raises(ConfigurationError):
        to_seconds(bad, name="lease")  # type: ignore[arg-type]


def test_to_seconds_accepts_timedelta_and_numbers() -> None:
    """Seconds and timedeltas convert once to float seconds."""
    assert to_seconds(timedelta(minutes=1), name="x") == 60.0
    assert to_seconds(3, name="x") == 3.0
    with pytest.raises(ConfigurationError):
        to_seconds(0, name="x", allow_zero=False)
