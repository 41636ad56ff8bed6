"""A backend's health as the primitives see it: after a failure, stay away with doubling backoff.

Shared by the primitives that must keep serving when their store fails: the rate limiter and
the cache.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hardening._clock import Clock

__all__ = ["BackendHealth"]


class BackendHealth:
    """Circuit breaker for a storage: after a failure, skip it for a doubling backoff.

    Args:
        clock: the clock whose ``monotonic()`` times the backoff.
        initial: the first backoff in seconds.
        cap: the longest backoff in seconds.
    """

    __slots__ = ("_backoff", "_cap", "_clock", "_initial", "_lock", "_retry_at")

    def __init__(self, clock: Clock, initial: float = 0.5, cap: float = 30.0) -> None:
        self._clock = clock
        self._initial = initial
        self._cap = cap
        self._backoff = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        """Whether the last call succeeded (no backoff in force)."""
        return self._backoff == 0.0

    def usable(self) -> bool:
        """Whether to call the storage now: healthy, or failing but due for a probe."""
        return self._backoff == 0.0 or self._clock.monotonic() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until the next probe (at least the initial backoff)."""
        return max(self._retry_at - self._clock.monotonic(), self._initial)

    def failed(self) -> bool:
        """Record a failure; return whether the backend had been healthy until now."""
        with self._lock:
            was_healthy = self._backoff == 0.0
            self._backoff = min(self._cap, self._backoff * 2) if self._backoff else self._initial
            self._retry_at = self._clock.monotonic() + self._backoff
            return was_healthy

    def succeeded(self) -> bool:
        """Record a success; return whether the backend had been failing until now."""
        if self._backoff == 0.0:  # the hot path: no lock
            return False
        with self._lock:
            recovered = self._backoff != 0.0
            self._backoff = 0.0
            return recovered
