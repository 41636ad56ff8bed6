"""The one circuit breaker every backed primitive shares, and which errors may open it.

A backend's health as the primitives see it. Closed, every call goes to the backend. The
first backend failure opens the breaker for a window (0.5 s); while open, calls are answered
by the primitive's policy without I/O, except **exactly one probe** per window. A failed probe
doubles the window (up to 30 s); the first success from any call closes it. Failures of calls
that were already in flight when it opened change nothing: 50 concurrent callers failing
during one blip open it once, for 0.5 s, not 50 times.

Only *backend* failures count (:func:`is_backend_failure`): a request whose own data fails
(a cross-slot key, a wrong type, a script error on hostile input, a value that cannot be
encoded) fails alone and never opens the breaker for everyone else.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hardening._clock import Clock

__all__ = ["Breaker", "is_backend_failure"]

# Server replies that say the backend (not the request) is in trouble.
_BACKEND_REPLIES = (
    "ReadOnlyError",
    "OutOfMemoryError",
    "ClusterDownError",
    "TryAgainError",
    "MasterDownError",
    "BusyLoadingError",
)


def is_backend_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the backend is unavailable, rather than that one request was bad.

    Backend failures: connection errors and timeouts (including a pool that stayed full for
    its whole ``pool_timeout``), server replies such as ``READONLY``, ``OOM``, ``CLUSTERDOWN``,
    ``BUSY``/``LOADING``, SQL operational errors, and anything unrecognised. Request
    failures: Redis error replies to the command itself (``WRONGTYPE``, ``CROSSSLOT``, a Lua
    error), client-side encoding and cross-slot errors, and redis-py's ``MaxConnectionsError``
    from a pool that refuses instead of waiting (the client is busy, not the server down).

    Args:
        exc: the exception a backend call raised.

    Returns:
        ``True`` when it should count against the breaker.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__
    if module.startswith("redis"):
        if "MaxConnectionsError" in names:
            return False
        if names & set(_BACKEND_REPLIES):
            return True
        if "ResponseError" in names or "DataError" in names:
            return False  # the server refused this command: its keys, types or arguments
        if "RedisClusterException" in names and "Unreachable" not in type(exc).__name__:
            return "SlotNotCovered" in type(exc).__name__  # cross-slot etc. are client-side
        return True
    # encoding a hostile key or value, or parsing a reply: this request's own problem
    return not isinstance(exc, (UnicodeError, TypeError, ValueError, LookupError))


class Breaker:
    """Circuit breaker for one backend: one probe per window, doubling per failed probe.

    Use: ``ticket = breaker.admit()``; ``None`` means do not call the backend now (answer by
    policy). Otherwise call it and report ``breaker.succeeded()`` or
    ``breaker.failed(ticket)``; a call that ends otherwise (cancelled) reports
    ``breaker.abandon(ticket)`` so a probe slot is never lost.

    Args:
        clock: the clock whose ``monotonic()`` times the windows.
        initial: the first window in seconds.
        cap: the longest window in seconds.
    """

    __slots__ = (
        "_cap",
        "_clock",
        "_epoch",
        "_initial",
        "_lock",
        "_next_probe",
        "_opened",
        "_probe",
        "_probe_started",
        "_retry_at",
        "_window",
        "failures",
        "probes",
    )

    def __init__(self, clock: Clock, initial: float = 0.5, cap: float = 30.0) -> None:
        self._clock = clock
        self._initial = initial
        self._cap = cap
        self._window = 0.0  # 0: closed
        self._retry_at = 0.0
        self._probe = 0  # the ticket of the probe in flight, 0 when none
        self._probe_started = 0.0
        self._next_probe = 1
        self._opened = 0
        self._epoch = 1  # closed tickets are -epoch: a failure from before a recovery is stale
        self._lock = threading.Lock()
        self.failures = 0
        """Backend failures recorded (for tests and metrics)."""
        self.probes = 0
        """Probes admitted while open."""

    @property
    def healthy(self) -> bool:
        """Whether the breaker is closed."""
        return self._window == 0.0

    @property
    def window(self) -> float:
        """The current window in seconds (0 when closed)."""
        return self._window

    def admit(self) -> int | None:
        """A ticket to call the backend now, or ``None`` to answer without it.

        Returns:
            A negative ticket when closed; a probe's (positive) ticket for the one caller
            admitted per window while open; ``None`` for everyone else.
        """
        if self._window == 0.0:  # the hot path: no lock
            return -self._epoch
        now = self._clock.monotonic()
        if now < self._retry_at:
            return None
        with self._lock:
            if self._window == 0.0:
                return -self._epoch
            # a probe that never reported (its caller vanished) gives way after a full cap
            stuck = self._probe and now - self._probe_started >= self._cap
            if now < self._retry_at or (self._probe and not stuck):
                return None
            self._probe = self._next_probe
            self._next_probe += 1
            self._probe_started = now
            self.probes += 1
            return self._probe

    def retry_in(self) -> float:
        """Seconds until the next probe is due (at least the initial window)."""
        return max(self._retry_at - self._clock.monotonic(), self._initial)

    def failed(self, ticket: int | None = None) -> bool:
        """Record a backend failure of the call holding ``ticket``.

        Args:
            ticket: what :meth:`admit` gave the call; ``None`` for a call made now.

        Returns:
            Whether this failure opened a closed breaker (log it once).
        """
        with self._lock:
            self.failures += 1
            now = self._clock.monotonic()
            if self._window == 0.0:
                if ticket is not None and ticket < 0 and ticket != -self._epoch:
                    return False  # began before the last recovery: says nothing new
                self._window = self._initial
                self._retry_at = now + self._window
                self._opened += 1
                return True
            if ticket is not None and ticket > 0 and ticket == self._probe:
                self._window = min(self._cap, self._window * 2)
                self._retry_at = now + self._window
                self._probe = 0
            return False

    def abandon(self, ticket: int | None) -> None:
        """The call holding ``ticket`` ended without an answer: free its probe slot."""
        if ticket is not None and ticket > 0 and ticket == self._probe:
            with self._lock:
                if ticket == self._probe:
                    self._probe = 0

    def succeeded(self) -> bool:
        """Record a success; return whether the breaker had been open until now."""
        if self._window == 0.0:  # the hot path: no lock
            return False
        with self._lock:
            recovered = self._window != 0.0
            if recovered:
                self._epoch += 1
            self._window = 0.0
            self._retry_at = 0.0
            self._probe = 0
            return recovered
