"""Time, injectable: every primitive that reads the clock takes ``clock=`` so tests never sleep."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol, runtime_checkable

from hardening.errors import ConfigurationError

__all__ = ["Clock", "FakeClock", "StoreClock", "SystemClock", "backend_clock", "to_seconds"]


@runtime_checkable
class Clock(Protocol):
    """What `hardening` needs of a clock.

    ``time()`` is wall-clock seconds since the epoch (for timestamps that are stored or shown);
    ``monotonic()`` never goes backwards (for durations and deadlines within a process);
    ``sleep()`` waits, so that a fake clock can make waiting instantaneous.
    """

    def time(self) -> float:
        """Return seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock advances instead)."""
        ...


class SystemClock:
    """The real clock: :func:`time.time`, :func:`time.monotonic` and :func:`time.sleep`."""

    __slots__ = ()

    def time(self) -> float:
        """Return seconds since the Unix epoch."""
        return time.time()

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` (nothing when it is zero or negative)."""
        if seconds > 0:
            time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to; thread-safe. For tests and simulations.

    Args:
        start: the initial wall-clock time (seconds since the epoch).

    ``sleep(s)`` advances the clock by ``s`` at once, so code that waits runs instantly.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def time(self) -> float:
        """Return the current fake time."""
        return self._now

    def monotonic(self) -> float:
        """Return the current fake time (it never goes backwards)."""
        return self._now

    def sleep(self, seconds: float) -> None:
        """Advance the clock by ``seconds`` instead of waiting."""
        if seconds > 0:
            self.advance(seconds)

    def advance(self, seconds: float | timedelta) -> float:
        """Move the clock forward.

        Args:
            seconds: how far, as seconds or a :class:`~datetime.timedelta`; never negative.

        Returns:
            The new time.

        Raises:
            ConfigurationError: if ``seconds`` is negative.
        """
        step = to_seconds(seconds, name="seconds")
        with self._lock:
            self._now += step
            return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"


class StoreClock:
    """The time of a shared store (Redis ``TIME``, PostgreSQL's clock), read through a host clock.

    Decisions shared across hosts (leases, delays, back-off) must not depend on any one host's
    clock: a worker whose clock runs 45 s fast would take a healthy worker's live lease. This
    clock measures the store's offset from the host clock (one round trip, halved) and adds it,
    refreshing it every ``refresh`` seconds, so every host sees the store's time to within a
    round trip, however wrong its own clock is.

    Args:
        host: the host clock (its ``monotonic()`` paces the refreshes; ``sleep`` is its own).
        read_store: returns the store's time, epoch seconds (does I/O).
        refresh: seconds between offset measurements.
    """

    def __init__(
        self, host: Clock, read_store: Callable[[], float], *, refresh: float = 10.0
    ) -> None:
        self.host = host
        self._read_store = read_store
        self._refresh = refresh
        self._offset = 0.0
        self._measured_at = -math.inf
        self._lock = threading.Lock()

    @property
    def offset(self) -> float:
        """The store's time minus the host's, as last measured (seconds)."""
        return self._offset

    def time(self) -> float:
        """The store's time now (epoch seconds); measures the offset when it is due."""
        if self.host.monotonic() - self._measured_at >= self._refresh:
            self._measure()
        return self.host.time() + self._offset

    def _measure(self) -> None:
        with self._lock:
            if self.host.monotonic() - self._measured_at < self._refresh:
                return
            before = self.host.time()
            store = self._read_store()  # a failure propagates: the caller's I/O fails alike
            after = self.host.time()
            self._offset = store - (before + after) / 2
            self._measured_at = self.host.monotonic()

    def monotonic(self) -> float:
        """The host's monotonic clock (durations within this process)."""
        return self.host.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep on the host clock."""
        self.host.sleep(seconds)

    def __repr__(self) -> str:
        return f"StoreClock(offset={self._offset:+.3f}s)"


def backend_clock(
    clock: Clock | None, store_clock: bool | None, read_store: Callable[[], float]
) -> Clock:
    """The clock a backend decides shared time by: the store's, or the one given.

    Args:
        clock: the clock the user gave, if any (a ``FakeClock`` in tests).
        store_clock: read the store's time through it; ``None``: only when no clock is given.
        read_store: returns the store's time (does I/O).

    Returns:
        A :class:`StoreClock` over the host clock, or the host clock itself.
    """
    host = clock or SystemClock()
    use_store = clock is None if store_clock is None else store_clock
    return StoreClock(host, read_store) if use_store else host


def to_seconds(value: float | timedelta, *, name: str, allow_zero: bool = True) -> float:
    """Convert a duration given as seconds or a ``timedelta`` to non-negative float seconds.

    Args:
        value: the duration.
        name: the option's name, for the error message.
        allow_zero: whether zero is acceptable.

    Returns:
        The duration in seconds.

    Raises:
        ConfigurationError: if the value is negative, not finite, of the wrong type, or zero
            where zero is not allowed.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(f"{name} must be seconds or a timedelta, not {value!r}")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigurationError(f"{name} must be finite, not {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigurationError(f"{name} must be {bound}, not {value!r}")
    return seconds
