"""The shared circuit breaker: one probe per window, doubling per failed probe, no more."""

from __future__ import annotations

import pytest
import redis
import redis.exceptions

from hardening import BackendUnavailable, FakeClock
from hardening._health import Breaker, is_backend_failure
from tests.concurrency import in_threads


def test_closed_breaker_admits_everyone() -> None:
    """A healthy backend: every call gets a (non-probe) ticket."""
    breaker = Breaker(FakeClock())
    tickets = [breaker.admit() for _ in range(100)]
    assert all(ticket is not None and ticket < 0 for ticket in tickets)
    assert breaker.healthy


def test_first_failure_opens_for_the_initial_window() -> None:
    """One failure opens the breaker for 0.5 s; calls in that window get no ticket."""
    clock = FakeClock()
    breaker = Breaker(clock)
    assert breaker.failed(breaker.admit()) is True
    assert breaker.window == 0.5
    assert breaker.admit() is None
    clock.advance(0.49)
    assert breaker.admit() is None


def test_concurrent_in_flight_failures_open_it_once() -> None:
    """Fifty callers in flight failing together: one opening, the window stays 0.5 s."""
    clock = FakeClock()
    breaker = Breaker(clock)
    tickets = [breaker.admit() for _ in range(50)]
    opened = [breaker.failed(ticket) for ticket in tickets]
    assert opened.count(True) == 1
    assert breaker.window == 0.5
    assert breaker.failures == 50


def test_exactly_one_probe_per_window() -> None:
    """When the window ends, one caller probes; the others keep answering by policy."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    admitted = [breaker.admit() for _ in range(20)]
    probes = [ticket for ticket in admitted if ticket is not None]
    assert len(probes) == 1
    assert probes[0] > 0
    assert breaker.probes == 1


def test_one_probe_across_threads() -> None:
    """Forty threads racing for the probe: exactly one wins."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    tickets = in_threads(40, breaker.admit)
    won = [ticket for ticket in tickets if ticket is not None]
    assert len(won) == 1


def test_failed_probe_doubles_the_window_up_to_the_cap() -> None:
    """Each failed probe doubles the window: 0.5, 1, 2, ... 30 s, never more."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    windows = [breaker.window]
    for _ in range(10):
        clock.advance(breaker.window)
        probe = breaker.admit()
        assert probe is not None
        breaker.failed(probe)
        windows.append(breaker.window)
    assert windows == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0]


def test_stragglers_do_not_double_the_window() -> None:
    """Failures of calls admitted before it opened change nothing once it is open."""
    clock = FakeClock()
    breaker = Breaker(clock)
    early = [breaker.admit() for _ in range(5)]
    breaker.failed(early[0])
    clock.advance(0.5)
    probe = breaker.admit()
    for ticket in early[1:]:
        assert breaker.failed(ticket) is False
    assert breaker.window == 0.5
    assert probe is not None
    assert breaker.admit() is None  # the probe is still out


def test_first_success_closes_it() -> None:
    """A successful probe closes the breaker at once: everyone is admitted again."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    assert breaker.admit() is not None
    assert breaker.succeeded() is True
    assert breaker.healthy
    assert all(breaker.admit() is not None for _ in range(10))
    assert breaker.succeeded() is False  # nothing to recover from


def test_failure_from_before_a_recovery_is_stale() -> None:
    """A call admitted before the last recovery that fails afterwards does not reopen it."""
    clock = FakeClock()
    breaker = Breaker(clock)
    old = breaker.admit()
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    breaker.admit()
    breaker.succeeded()
    assert breaker.failed(old) is False
    assert breaker.healthy
    assert breaker.failed(breaker.admit()) is True  # a fresh failure still counts


def test_abandoned_probe_frees_the_slot() -> None:
    """A probe whose caller was cancelled gives the next caller the probe."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    probe = breaker.admit()
    assert breaker.admit() is None
    breaker.abandon(probe)
    assert breaker.admit() is not None
    assert breaker.window == 0.5


def test_a_probe_that_never_reports_gives_way_after_the_cap() -> None:
    """A vanished probe cannot keep the breaker open for ever."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    assert breaker.admit() is not None
    clock.advance(29.9)
    assert breaker.admit() is None
    clock.advance(0.1)
    assert breaker.admit() is not None


def test_retry_in_is_the_time_to_the_next_probe() -> None:
    """``retry_in`` counts down the window, never below the initial window."""
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failed(breaker.admit())
    clock.advance(0.5)
    breaker.failed(breaker.admit())
    assert breaker.retry_in() == 1.0
    clock.advance(0.75)
    assert breaker.retry_in() == 0.5


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("refused"),
        redis.TimeoutError("timed out"),
        redis.ConnectionError("No connection available."),  # a pool that stayed full
        redis.exceptions.ReadOnlyError("READONLY"),
        redis.exceptions.BusyLoadingError("LOADING"),
        redis.exceptions.OutOfMemoryError("OOM"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        BackendUnavailable("sql", "down"),
        OSError("network unreachable"),
        RuntimeError("a storage of the user's own failing"),
    ],
)
def test_backend_failures(exc: Exception) -> None:
    """Connection trouble and server-side unavailability count against the breaker."""
    assert is_backend_failure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis.ResponseError("ERR Error running script: attempt to compare nil"),
        redis.exceptions.ClusterCrossSlotError("CROSSSLOT"),
        redis.exceptions.RedisClusterException("EVALSHA - all keys must map to the same slot"),
        redis.exceptions.DataError("Invalid input of type: 'dict'"),
        redis.exceptions.MaxConnectionsError("Too many connections"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        TypeError("bad argument"),
    ],
)
def test_request_failures(exc: Exception) -> None:
    """One request's own keys, types or arguments never open the breaker for everyone."""
    assert not is_backend_failure(exc)
