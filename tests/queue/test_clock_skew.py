"""Leases, delays and back-off on the store's clock: a host whose clock is off steals nothing.

Two workers share one real store; one host's clock runs 45 s fast. With the store clock (the
default when no clock is given) both agree on every lease.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from hardening import SystemClock
from hardening.queue.job import JobError
from tests.queue.conftest import new_job

SKEW = 45.0


class FastClock(SystemClock):
    """A host clock 45 s ahead of everyone else's."""

    def time(self) -> float:
        """The real time plus the skew."""
        return time.time() + SKEW


def _backends(request: pytest.FixtureRequest, kind: str) -> tuple[Any, Any]:
    if kind == "redis":
        from hardening.queue.backends.redis import RedisBackend

        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        return (
            RedisBackend(client, key_prefix=prefix),
            RedisBackend(client, key_prefix=prefix, clock=FastClock(), store_clock=True),
        )
    from hardening.queue.backends.sql import SQLBackend

    engine = request.getfixturevalue("pg_engine")
    honest = SQLBackend(engine)
    honest.create_schema()
    return honest, SQLBackend(engine, clock=FastClock(), store_clock=True)


@pytest.fixture(params=["redis", pytest.param("postgres", marks=pytest.mark.postgres)])
def pair(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """A backend on an honest host and one on a host 45 s fast, sharing one store."""
    return _backends(request, request.param)


def test_a_fast_host_steals_no_live_lease(pair: tuple[Any, Any]) -> None:
    """The honest worker holds a 30 s lease; the fast host, 45 s ahead, cannot take it."""
    honest, fast = pair
    honest.enqueue(new_job("skew", now=honest.clock.time()))
    (held,) = honest.claim("skew", worker="honest", limit=1, lease=30)
    assert fast.claim("skew", worker="fast", limit=1, lease=30) == []
    assert honest.heartbeat("skew", [held], 30) == {held.id}
    assert honest.ack(held).state == "completed"


def test_both_hosts_read_the_same_time(pair: tuple[Any, Any]) -> None:
    """The store clock cancels the host's skew: both see the store's time."""
    honest, fast = pair
    assert abs(fast.clock.time() - honest.clock.time()) < 5  # 45 s apart on their hosts
    assert abs(fast.clock.offset + SKEW) < 5


def test_a_delay_counts_from_the_store_clock(pair: tuple[Any, Any]) -> None:
    """A 30 s retry delay holds on the fast host too (its own clock says it is past)."""
    honest, fast = pair
    honest.enqueue(new_job("skew", now=honest.clock.time()))
    (job,) = honest.claim("skew", worker="honest", limit=1, lease=30)
    honest.fail(job, JobError("E", "x"), retry_at=honest.clock.time() + 30)
    assert fast.claim("skew", worker="fast", limit=1, lease=30) == []
    stats = fast.stats("skew")
    assert (stats.retrying, stats.running) == (1, 0)
