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


def test_store_clock_adds_the_measured_offset() -> None:
    """The store's time is the host's plus the offset, measured around one read."""
    from hardening._clock import StoreClock

    host = FakeClock(1_000.0)
    reads = []

    def read_store() -> float:
        reads.append(host.time())
        return host.time() + 45.0

    clock = StoreClock(host, read_store, refresh=10.0)
    assert clock.time() == 1_045.0
    host.advance(5)
    assert clock.time() == 1_050.0
    assert len(reads) == 1  # not due yet
    host.advance(5)
    clock.time()
    assert len(reads) == 2  # measured again after 10 s
    assert clock.offset == 45.0


def test_store_clock_read_failures_propagate() -> None:
    """A store that cannot say its time fails the call that needed it."""
    from hardening._clock import StoreClock

    def broken() -> float:
        raise ConnectionError("down")

    clock = StoreClock(FakeClock(), broken)
    with pytest.raises(ConnectionError):
        clock.time()
