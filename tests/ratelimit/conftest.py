"""A harness running each rate-limit behaviour on the memory storage and on real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from hardening import FakeClock
from hardening.ratelimit import MemoryRateLimitStorage, RateLimiter


@dataclass
class Harness:
    """Builds limiters on one storage and waits in that storage's notion of time."""

    name: str
    make: Callable[..., RateLimiter]
    wait: Callable[[float], object]
    exact_time: bool  # a fake clock: waits are exact, boundaries can be probed


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def harness(request: pytest.FixtureRequest) -> Harness:
    """Each storage in turn: memory with a fake clock, then real Redis with real time."""
    if request.param == "memory":
        clock = FakeClock(1_700_000_000.0)
        storage = MemoryRateLimitStorage(clock=clock)  # shared, like one Redis for several limiters

        def make_memory(limits: Any, **options: Any) -> RateLimiter:
            return RateLimiter(limits, storage=storage, clock=clock, **options)

        return Harness("memory", make_memory, clock.advance, exact_time=True)
    client = request.getfixturevalue("redis_client")
    prefix = request.getfixturevalue("redis_prefix").rstrip(":")

    def make_redis(limits: Any, **options: Any) -> RateLimiter:
        return RateLimiter(limits, storage=client, key_prefix=prefix, **options)

    return Harness("redis", make_redis, time.sleep, exact_time=False)
