"""The queue under network faults: every backend call, and a running worker, through the proxy.

Redis and PostgreSQL each sit behind the fault-injecting proxy (``tests/faultproxy.py``). A
backend call during an outage raises BackendUnavailable -- never a driver error -- within the
timeouts the client was given; a worker rides out a blip and a long outage and then finishes
every job exactly once, none lost, none dead-lettered; a crowd of callers far larger than the
pool waits for a connection instead of failing. Backend-level tests run on a fake clock, so no
lease lapses while the network is down; the worker tests need real time (the worker waits).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from hardening import BackendUnavailable, FakeClock
from hardening._clock import Clock
from hardening._redis import client_from_url
from hardening.queue import Job, JobError, QueueProcessor
from hardening.queue.backends.redis import RedisBackend
from hardening.queue.backends.sql import SQLBackend
from tests.concurrency import in_threads, outcome_within
from tests.faultproxy import (
    CONNECT_TIMEOUT,
    SLACK,
    UNBOUNDED_PG_REPLY,
    FaultProxy,
    wait_until,
)
from tests.queue.conftest import new_job

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = pytest.mark.slow

QUEUE = "faults"
NOW = 1_700_000_000.0
SOCKET_TIMEOUT = 0.5  # Redis: how long one reply may take
SMALL_POOL = {"redis": 5, "postgres": 2}
POLL = 0.02  # the workers' idle wait while the store answers

STORES = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@dataclass
class Store:
    """A queue backend whose every connection goes through ``proxy``."""

    kind: str
    backend: Any  # RedisBackend | SQLBackend
    proxy: FaultProxy
    silent_bound: float
    """The longest a call may wait on a server that accepts and never answers."""
    drop_connections: Callable[[], None]
    """Close the pooled connections, so the next call connects anew."""


@pytest.fixture(params=STORES)
def open_store(request: pytest.FixtureRequest) -> Iterator[Callable[..., Store]]:
    """Open queue backends on Redis or PostgreSQL behind one proxy; all closed afterwards."""
    kind: str = request.param
    if kind == "redis":
        request.getfixturevalue("redis_client")  # deletes the test's keys afterwards
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
    else:
        schema = request.getfixturevalue("pg_schema")
        base_url = request.getfixturevalue("postgres_url")
    proxy: FaultProxy = request.getfixturevalue(f"{kind}_proxy")  # closed before the schema
    opened: list[Store] = []

    def open_(*, clock: Clock | None = None, small_pool: bool = False) -> Store:
        if kind == "redis":
            pool: dict[str, Any] = {"max_connections": SMALL_POOL[kind]} if small_pool else {}
            url = f"{proxy.redis_url()}?socket_timeout={SOCKET_TIMEOUT}"
            client = client_from_url(url, **pool)
            backend: Any = RedisBackend(client, clock=clock, key_prefix=prefix, owns_client=True)
            # one retry at once after a failed reply (hardening._redis): two socket timeouts
            store = Store(
                kind, backend, proxy, 2 * SOCKET_TIMEOUT, client.connection_pool.disconnect
            )
        else:
            options: dict[str, Any] = (
                {"pool_size": SMALL_POOL[kind], "max_overflow": 0, "pool_timeout": 30}
                if small_pool
                else {}
            )
            engine = sa.create_engine(
                proxy.postgres_url(base_url),
                connect_args={
                    "options": f"-csearch_path={schema}",
                    "connect_timeout": CONNECT_TIMEOUT,
                },
                **options,
            )
            backend = SQLBackend(engine, clock=clock)
            backend.create_schema()
            store = Store(kind, backend, proxy, CONNECT_TIMEOUT, engine.dispose)
        opened.append(store)
        return store

    try:
        yield open_
    finally:
        proxy.restore()
        for store in opened:
            store.backend.close()
            store.drop_connections()


def _backend_name(store: Store) -> str:
    return "redis" if store.kind == "redis" else "sql"


def _calls(backend: Any, held: Job, other: Job) -> dict[str, Callable[[], object]]:
    """One call of each kind a worker or a producer makes."""
    return {
        "enqueue": lambda: backend.enqueue(new_job(QUEUE)),
        "claim": lambda: backend.claim(QUEUE, worker="w", limit=1, lease=30),
        "heartbeat": lambda: backend.heartbeat(QUEUE, [held, other], 30),
        "ack": lambda: backend.ack(held),
        "ack_many": lambda: backend.ack_many([held, other]),
        "fail": lambda: backend.fail(other, JobError("Boom", "boom"), retry_at=None),
        "stats": lambda: backend.stats(QUEUE),
        "get": lambda: backend.get(QUEUE, held.id),
    }


def _all_at_once(
    calls: dict[str, Callable[[], object]],
) -> dict[str, tuple[float, BaseException | None]]:
    """Run every call in a thread of its own; how long each took and what it raised."""
    outcomes: dict[str, tuple[float, BaseException | None]] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        started = time.monotonic()
        try:
            call()
        except BaseException as exc:
            outcomes[name] = (time.monotonic() - started, exc)
        else:
            outcomes[name] = (time.monotonic() - started, None)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(outcomes) == set(calls)
    return outcomes


def _claim_two(backend: Any) -> tuple[Job, Job]:
    for _ in range(2):
        backend.enqueue(new_job(QUEUE))
    held, other = backend.claim(QUEUE, worker="w", limit=2, lease=30)
    return held, other


# --- backend calls -------------------------------------------------------------------------


def test_every_call_during_a_cut_is_backend_unavailable(open_store: Callable[..., Store]) -> None:
    """During a cut each call raises BackendUnavailable, bounded; claims survive the cut."""
    store = open_store(clock=FakeClock(NOW))
    held, other = _claim_two(store.backend)
    store.proxy.cut()
    for name, call in _calls(store.backend, held, other).items():
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as caught:
            call()
        assert time.monotonic() - started < store.silent_bound, name
        assert caught.value.backend == _backend_name(store), name
    store.proxy.restore()
    assert store.backend.ack(held).state == "completed"  # the lease was held all along
    assert store.backend.fail(other, JobError("Boom", "boom"), retry_at=None).state == "dead"
    stats = store.backend.stats(QUEUE)
    assert (stats.waiting, stats.running, stats.completed, stats.dead) == (0, 0, 1, 1)


def test_a_silent_server_costs_at_most_the_timeouts(open_store: Callable[..., Store]) -> None:
    """A server that accepts and never answers: every call, all at once, gives up in time."""
    store = open_store(clock=FakeClock(NOW))
    held, other = _claim_two(store.backend)
    store.drop_connections()
    store.proxy.blackhole()
    outcomes = _all_at_once(_calls(store.backend, held, other))
    store.proxy.restore()
    for name, (elapsed, error) in outcomes.items():
        assert isinstance(error, BackendUnavailable), (name, error)
        assert error.backend == _backend_name(store), name
        assert elapsed < store.silent_bound + SLACK, (name, elapsed)
    stats = store.backend.stats(QUEUE)
    assert (stats.waiting, stats.running, stats.completed, stats.dead) == (0, 2, 0, 0)


@pytest.mark.parametrize(
    "open_store",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param(
            "postgres",
            marks=[pytest.mark.postgres, pytest.mark.xfail(strict=True, reason=UNBOUNDED_PG_REPLY)],
        ),
    ],
    indirect=True,
)
def test_a_silent_server_on_a_pooled_connection_costs_at_most_the_timeouts(
    open_store: Callable[..., Store],
) -> None:
    """A server that goes silent under an open connection: the call still gives up in time."""
    store = open_store(clock=FakeClock(NOW))
    store.backend.enqueue(new_job(QUEUE))  # leaves an established connection in the pool
    store.proxy.blackhole()
    outcome = outcome_within(
        lambda: store.backend.stats(QUEUE),
        store.silent_bound + SLACK,
        release=store.proxy.restore,  # resets the blackholed connection: frees the caller
    )
    assert isinstance(outcome, BackendUnavailable)


def test_300_concurrent_enqueues_wait_for_a_small_pool(open_store: Callable[..., Store]) -> None:
    """300 threads enqueueing through a pool of 2-5 connections: all 300 stored, none refused."""
    store = open_store(small_pool=True)
    store.backend.stats(QUEUE)
    store.proxy.latency(0.005)  # each call holds its connection a while: the pool is contended
    in_threads(300, lambda: store.backend.enqueue(new_job(QUEUE)))
    assert store.backend.stats(QUEUE).waiting == 300
    assert store.proxy.connections_accepted <= SMALL_POOL[store.kind]


@pytest.mark.parametrize(
    "open_store", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True
)
def test_a_resent_enqueue_leaves_a_claimed_job_alone(
    open_store: Callable[..., Store], redis_client: Any, redis_prefix: str
) -> None:
    """An enqueue whose reply is lost is sent again; a worker's claim in between survives it."""
    store = open_store(clock=FakeClock(NOW))
    worker = RedisBackend(redis_client, clock=FakeClock(NOW), key_prefix=redis_prefix.rstrip(":"))
    store.backend.stats(QUEUE)
    store.proxy.latency(0.2)  # the reply will be on its way for a while
    job = new_job(QUEUE)
    enqueued: list[Job] = []
    producer = threading.Thread(target=lambda: enqueued.append(store.backend.enqueue(job)))
    producer.start()
    assert wait_until(lambda: worker.get(QUEUE, job.id) is not None)  # stored, not answered
    (claimed,) = worker.claim(QUEUE, worker="w", limit=1, lease=30)
    store.proxy.blackhole()  # the reply is lost...
    store.proxy.restore()  # ...and the connection reset: the client sends the script again
    producer.join(10)
    assert [j.id for j in enqueued] == [job.id]
    assert worker.ack(claimed).state == "completed"  # the worker's lease was never disturbed
    stats = worker.stats(QUEUE)
    assert (stats.waiting, stats.running, stats.completed) == (0, 0, 1)
    assert worker.claim(QUEUE, worker="w", limit=1, lease=30) == []


# --- a running worker ------------------------------------------------------------------------


class Recording(QueueProcessor):
    """Records when each payload was processed; each job takes a few milliseconds."""

    queue = QUEUE
    concurrency = 4
    poll_interval = POLL
    lease = 10.0
    heartbeat = 1.0
    backoff = 0.05

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.lock = threading.Lock()
        self.runs: list[tuple[float, object]] = []

    def process(self, job: Job) -> None:
        time.sleep(0.005)
        with self.lock:
            self.runs.append((time.monotonic(), job.payload))

    def processed(self) -> int:
        with self.lock:
            return len(self.runs)


class AsyncRecording(Recording):
    """The same work as ``async def process``: the asyncio driver."""

    async def process(self, job: Job) -> None:  # type: ignore[override]
        await asyncio.sleep(0.005)
        with self.lock:
            self.runs.append((time.monotonic(), job.payload))


@dataclass
class Producer:
    """Enqueues ``count`` numbered jobs, one every few milliseconds, through an outage."""

    proc: QueueProcessor
    count: int
    stored: set[int]  # enqueue returned
    refused: set[int]  # enqueue raised BackendUnavailable (it may still have been stored)

    def run(self, start: int) -> None:
        for n in range(start, start + self.count):
            try:
                self.proc.enqueue(n)
            except BackendUnavailable:
                self.refused.add(n)
            else:
                self.stored.add(n)
            time.sleep(0.003)


def _drained(proc: QueueProcessor) -> bool:
    stats = proc.stats()
    return stats.waiting + stats.delayed + stats.running + stats.retrying == 0


def _ride_out(
    store: Store, outage: Callable[[], float], seconds: float, kind: type[Recording] = Recording
) -> None:
    """Run a worker and a producer through an outage of ``seconds``; check every job ran once.

    ``outage`` returns when the store is back. The worker's idle wait doubles while claims
    fail, so the wait in progress at that moment is at most about twice the outage.
    """
    proc = kind(store.backend)
    for n in range(200):
        proc.enqueue(n)
    producer = Producer(proc, 150, set(), set())
    worker = threading.Thread(target=proc.run, kwargs={"install_signal_handlers": False})
    producing = threading.Thread(target=producer.run, args=(1000,))
    worker.start()
    try:
        assert wait_until(lambda: proc.processed() >= 50, timeout=10)
        producing.start()
        restored = outage()
        producing.join(30)
        assert wait_until(lambda: _drained(proc), timeout=30), proc.stats()
    finally:
        proc.stop()
        worker.join(30)
    stats = proc.stats()
    runs = Counter(payload for _, payload in proc.runs)
    assert producer.refused, "the outage was not seen by the producer"
    assert set(range(200)) | producer.stored <= set(runs)  # every acknowledged job ran...
    assert set(runs) <= set(range(200)) | producer.stored | producer.refused
    assert [p for p, times in runs.items() if times > 1] == []  # ...exactly once
    assert (stats.completed, stats.dead) == (len(runs), 0)
    resumed = min(at for at, _ in proc.runs if at > restored) - restored
    print(f"\n{store.kind}: worker resumed {resumed * 1000:.0f} ms after the store came back")
    assert resumed < 2 * seconds + POLL + SLACK


@pytest.mark.parametrize("open_store", STORES, indirect=True)
def test_a_worker_rides_out_a_blip(open_store: Callable[..., Store]) -> None:
    """A 0.3 s blip under a worker and a producer: every job completes exactly once."""
    store = open_store()

    def blip() -> float:
        store.proxy.blip(0.3)
        assert store.proxy.wait_blip(timeout=10)
        return time.monotonic()

    _ride_out(store, blip, 0.3)


@pytest.mark.parametrize("open_store", STORES, indirect=True)
def test_a_worker_rides_out_a_long_outage(open_store: Callable[..., Store]) -> None:
    """A 2 s cut under a worker and a producer: every job completes exactly once afterwards."""
    store = open_store()

    def cut() -> float:
        store.proxy.cut()
        time.sleep(2.0)  # the outage itself: nothing to wait for but time
        store.proxy.restore()
        return time.monotonic()

    _ride_out(store, cut, 2.0)


@pytest.mark.parametrize("open_store", STORES, indirect=True)
def test_an_async_worker_rides_out_a_blip(open_store: Callable[..., Store]) -> None:
    """The asyncio driver through a 0.3 s blip: every job completes exactly once."""
    store = open_store()

    def blip() -> float:
        store.proxy.blip(0.3)
        assert store.proxy.wait_blip(timeout=10)
        return time.monotonic()

    _ride_out(store, blip, 0.3, AsyncRecording)


class FailsOnCue(QueueProcessor):
    """Each job waits for ``cue``, then fails."""

    queue = QUEUE
    max_attempts = 1
    poll_interval = POLL

    def __init__(self, backend: Any, clock: Clock) -> None:
        super().__init__(backend, clock=clock)
        self.started = threading.Event()
        self.cue = threading.Event()

    def process(self, job: Job) -> None:
        self.started.set()
        self.cue.wait(10)
        raise ValueError("the job's own failure")


def test_a_failure_during_an_outage_is_recorded_once_the_store_is_back(
    open_store: Callable[..., Store], caplog: pytest.LogCaptureFixture
) -> None:
    """A job that fails while the store is cut is recorded with its own error afterwards."""
    clock = FakeClock(NOW)  # no lease lapses: only the worker itself can record the failure
    store = open_store(clock=clock)
    proc = FailsOnCue(store.backend, clock)
    job = proc.enqueue("x")
    worker = threading.Thread(target=proc.run, kwargs={"install_signal_handlers": False})
    worker.start()
    try:
        assert proc.started.wait(10)
        store.proxy.cut()
        proc.cue.set()  # fails now: recording it must wait for the store
        assert wait_until(lambda: "recording 1 finished jobs failed" in caplog.text, timeout=10)
        store.proxy.restore()
        assert wait_until(lambda: proc.stats().dead == 1, timeout=10), proc.stats()
    finally:
        proc.stop()
        worker.join(30)
    dead = store.backend.get(QUEUE, job.id)
    assert dead is not None
    assert dead.last_error is not None
    assert (dead.state, dead.attempts, dead.last_error.type) == ("dead", 1, "ValueError")
    assert [a.outcome for a in dead.history] == ["failed"]
