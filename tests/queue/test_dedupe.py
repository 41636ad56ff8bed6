"""Deduplication that no state change can violate, on every backend (the contract suite's).

A job holds its ``dedupe_key`` only while it waits and has never been claimed. A twin enqueued
while the first one runs is a new job; whatever then happens to the first one (it fails and
retries, its lease lapses, it is released at shutdown, it dies and is requeued) must never
collide with the twin and must never stop the queue.
"""

from __future__ import annotations

import pytest

from hardening import FakeClock
from hardening.queue import QueueBackend
from hardening.queue.job import JobError
from tests.queue.conftest import new_job

KEY = "reindex:42"


def _running_with_a_waiting_twin(backend: QueueBackend, clock: FakeClock) -> tuple[str, str]:
    first = backend.enqueue(new_job("contract", now=clock.time(), dedupe_key=KEY))
    (running,) = backend.claim("contract", worker="w1", limit=1, lease=30)
    assert running.id == first.id
    twin = backend.enqueue(
        new_job("contract", now=clock.time(), dedupe_key=KEY, run_at=clock.time() + 60)
    )
    assert twin.id != first.id  # the running one may have read stale data: a new job
    return first.id, twin.id


def _drains(backend: QueueBackend, clock: FakeClock, expected: int) -> None:
    """Twenty later jobs, plus what is left, are all claimed and acked: the queue moves."""
    for n in range(20):
        backend.enqueue(new_job("contract", now=clock.time(), payload=f'{{"n": {n}}}'))
    clock.advance(3600)  # every delay and backoff over
    done = 0
    for _ in range(100):
        jobs = backend.claim("contract", worker="w2", limit=10, lease=30)
        if not jobs:
            break
        for job in jobs:
            backend.ack(job)
        done += len(jobs)
    assert done == 20 + expected
    stats = backend.stats("contract")
    assert (stats.waiting, stats.delayed, stats.running, stats.retrying) == (0, 0, 0, 0)


def test_a_failing_job_retries_beside_its_waiting_twin(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """The running job fails and retries while its twin waits: no clash, the queue drains."""
    first, _twin = _running_with_a_waiting_twin(backend, clock)
    job = backend.get("contract", first)
    assert job is not None
    retried = backend.fail(job, JobError("Boom", "x"), retry_at=clock.time() + 1)
    assert retried.state == "retrying"
    _drains(backend, clock, expected=2)


def test_a_lapsed_lease_retries_beside_its_waiting_twin(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """The running job's worker dies: recovery retries it beside the twin; claims go on."""
    first, _twin = _running_with_a_waiting_twin(backend, clock)
    clock.advance(31)
    (again,) = backend.claim("contract", worker="w2", limit=1, lease=30)
    assert again.id == first  # recovered and claimed; the delayed twin is not due
    backend.ack(again)
    _drains(backend, clock, expected=1)


def test_a_released_job_goes_back_beside_its_waiting_twin(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """Released at shutdown while a twin waits: both wait, neither is lost."""
    first, _twin = _running_with_a_waiting_twin(backend, clock)
    job = backend.get("contract", first)
    assert job is not None
    backend.release(job)
    released = backend.get("contract", first)
    assert released is not None
    assert released.state == "waiting"
    _drains(backend, clock, expected=2)


def test_a_dead_job_is_requeued_beside_its_waiting_twin(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """A dead job with the twin's key goes back to waiting: no clash, both run."""
    first, _twin = _running_with_a_waiting_twin(backend, clock)
    job = backend.get("contract", first)
    assert job is not None
    backend.fail(job, JobError("Boom", "x"), retry_at=None)
    assert backend.requeue_dead("contract") == 1
    assert backend.requeue_dead("contract", [first]) == 0  # not dead any more
    _drains(backend, clock, expected=2)


def test_the_key_is_free_again_once_the_holder_runs(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """While the twin waits it holds the key; a third enqueue returns the twin."""
    _first, twin = _running_with_a_waiting_twin(backend, clock)
    third = backend.enqueue(new_job("contract", now=clock.time(), dedupe_key=KEY))
    assert third.id == twin


@pytest.mark.parametrize("how", ["fail", "lapse"])
def test_many_clashes_never_stop_the_queue(
    backend: QueueBackend, clock: FakeClock, how: str
) -> None:
    """Fifty keys, each running with a twin waiting, all retried at once: claims go on."""
    holders = []
    for n in range(50):
        backend.enqueue(new_job("contract", now=clock.time(), dedupe_key=f"k{n}"))
    holders = backend.claim("contract", worker="w1", limit=50, lease=30)
    assert len(holders) == 50
    for n in range(50):
        backend.enqueue(
            new_job("contract", now=clock.time(), dedupe_key=f"k{n}", run_at=clock.time() + 5)
        )
    if how == "fail":
        for job in holders:
            backend.fail(job, JobError("Boom", "x"), retry_at=clock.time())
    else:
        clock.advance(31)
    _drains(backend, clock, expected=100)
