"""Exponential backoff with full jitter: a pure policy, shared by retries and the job queue."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta

from hardening._clock import to_seconds
from hardening.errors import ConfigurationError

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter.

    After failed attempt ``n`` (1-based) the wait is uniform in ``[0, min(cap, base * factor
    ** (n - 1))]`` (AWS Architecture Blog, "Exponential Backoff And Jitter"), so many clients
    that failed together do not retry together.

    Attributes:
        base: the ceiling of the first wait, in seconds.
        factor: how much the ceiling grows per attempt.
        cap: the largest ceiling, in seconds.
        jitter: draw uniformly below the ceiling (``True``) or wait the ceiling exactly.
    """

    base: float = 0.05
    factor: float = 2.0
    cap: float = 5.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.cap >= 0 and math.isfinite(self.base + self.cap)):
            raise ConfigurationError(f"backoff base and cap must be finite and >= 0: {self}")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ConfigurationError(f"backoff factor must be >= 1: {self}")

    @classmethod
    def of(cls, value: Backoff | float | timedelta) -> Backoff:
        """Accept a ``Backoff`` or a base duration (seconds or ``timedelta``)."""
        if isinstance(value, Backoff):
            return value
        return cls(base=to_seconds(value, name="backoff"))

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        if self.base == 0 or self.cap == 0:
            return 0.0
        # compare in logarithms: factor ** exponent overflows a float long before it matters
        if exponent * math.log(self.factor) >= math.log(self.cap / self.base):
            return self.cap
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based).

        Args:
            attempt: how many attempts have failed so far.
            rng: the random source (a seeded one in tests).

        Returns:
            Seconds to wait.
        """
        ceiling = self.ceiling(attempt)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)
