"""Queue guarantees, each a test on every backend (memory, SQLite, PostgreSQL, Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from hardening import Backoff, FakeClock, JobRejected, LeaseLost, Metrics
from hardening.queue import Job, QueueBackend, QueueProcessor
from hardening.queue._inflight import Idle
from hardening.queue.job import JobError, NewJob
from tests.queue.conftest import new_job

Make = Callable[..., Any]
NO_JITTER = Backoff(base=10.0, factor=2.0, cap=1000.0, jitter=False)


class Recorder(QueueProcessor):
    """Records payloads in processing order; fails while ``payload["fail"]`` says so."""

    queue = "contract"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Any] = []
        self.failures: list[tuple[str, str]] = []
        self.dead: list[str] = []
        self.succeeded: list[str] = []

    def process(self, job: Job) -> None:
        self.seen.append(job.payload)
        payload = job.payload
        if isinstance(payload, dict) and payload.get("fail", 0) >= job.attempts:
            raise RuntimeError(f"boom {job.attempts}")

    def on_success(self, job: Job) -> None:
        self.succeeded.append(job.id)

    def on_failure(self, job: Job, exc: BaseException) -> None:
        self.failures.append((job.id, str(exc)))

    def on_dead(self, job: Job, exc: BaseException) -> None:
        self.dead.append(job.id)


def _new(queue: str = "contract", **fields: Any) -> NewJob:
    return new_job(queue, **fields)


def test_enqueue_and_process(make_processor: Make) -> None:
    """A job is processed once, completed, and counted."""
    proc = make_processor(Recorder)
    job = proc.enqueue({"page": 42})
    assert job.state == "waiting"
    assert proc.run_until_empty() == 1
    assert proc.seen == [{"page": 42}]
    done = proc.backend.get("contract", job.id)
    assert done is not None
    assert (done.state, done.attempts) == ("completed", 1)
    assert [a.outcome for a in done.history] == ["completed"]
    assert proc.stats().completed == 1
    assert proc.succeeded == [job.id]


def test_priorities_then_fifo(make_processor: Make, clock: FakeClock) -> None:
    """Higher priority first; equal priorities in order of enqueueing."""
    proc = make_processor(Recorder)
    for name, priority in [("low1", 0), ("high", 10), ("low2", 0), ("mid", 5), ("low3", 0)]:
        proc.enqueue(name, priority=priority)
        clock.advance(0.001)
    proc.run_until_empty()
    assert proc.seen == ["high", "mid", "low1", "low2", "low3"]


def test_delayed_job_not_run_early(make_processor: Make, clock: FakeClock) -> None:
    """A delayed job waits for its time; stats show it as delayed."""
    proc = make_processor(Recorder)
    proc.enqueue("later", delay=60)
    assert proc.run_until_empty() == 0
    assert proc.stats().delayed == 1
    clock.advance(59.9)
    assert proc.run_until_empty() == 0
    clock.advance(0.2)
    assert proc.run_until_empty() == 1
    assert proc.seen == ["later"]


def test_exactly_max_attempts_then_dead(make_processor: Make, clock: FakeClock) -> None:
    """A poison job is tried max_attempts times with backoff, then dead-lettered."""
    proc = make_processor(Recorder, max_attempts=3, backoff=NO_JITTER)
    job = proc.enqueue({"fail": 99})
    assert proc.run_until_empty() == 1  # attempt 1 fails; retry in 10 s
    retrying = proc.backend.get("contract", job.id)
    assert retrying.state == "retrying"
    assert retrying.run_at == pytest.approx(clock.time() + 10)
    assert proc.stats().retrying == 1
    clock.advance(9.9)
    assert proc.run_until_empty() == 0  # backoff respected
    clock.advance(0.2)
    assert proc.run_until_empty() == 1  # attempt 2; retry in 20 s
    clock.advance(20.1)
    assert proc.run_until_empty() == 1  # attempt 3: dead
    dead = proc.backend.get("contract", job.id)
    assert (dead.state, dead.attempts) == ("dead", 3)
    assert dead.last_error is not None
    assert (dead.last_error.type, dead.last_error.message) == ("RuntimeError", "boom 3")
    assert "Traceback" in dead.last_error.traceback
    assert [a.outcome for a in dead.history] == ["failed"] * 3
    assert len(proc.failures) == 3
    assert proc.dead == [job.id]
    assert [j.id for j in proc.dead_letters()] == [job.id]
    clock.advance(10_000)
    assert proc.run_until_empty() == 0  # dead jobs never run again by themselves


def test_job_that_recovers_completes(make_processor: Make, clock: FakeClock) -> None:
    """A job failing once then succeeding ends completed with two attempts."""
    proc = make_processor(Recorder, backoff=NO_JITTER)
    job = proc.enqueue({"fail": 1})
    proc.run_until_empty()
    clock.advance(11)
    proc.run_until_empty()
    done = proc.backend.get("contract", job.id)
    assert (done.state, done.attempts) == ("completed", 2)
    assert [a.outcome for a in done.history] == ["failed", "completed"]


def test_requeue_and_purge_dead(make_processor: Make) -> None:
    """Dead jobs can be requeued (fresh attempts) or purged."""
    proc = make_processor(Recorder, max_attempts=1)
    first = proc.enqueue({"fail": 1})
    second = proc.enqueue({"fail": 1})
    proc.run_until_empty()
    assert proc.stats().dead == 2
    assert proc.requeue_dead([first.id]) == 1
    assert proc.run_until_empty() == 1  # attempts reset: payload fail=1 >= attempts=1: fails
    again = proc.backend.get("contract", first.id)
    assert (again.state, again.attempts) == ("dead", 1)
    assert proc.purge_dead([second.id]) == 1
    assert proc.backend.get("contract", second.id) is None
    assert proc.purge_dead() == 1
    assert proc.stats().dead == 0


def test_lapsed_lease_is_redelivered_and_counts(backend: QueueBackend, clock: FakeClock) -> None:
    """A claim whose worker died is re-delivered after the lease; the lost attempt counts."""
    backend.enqueue(_new(now=clock.time()))
    (first,) = backend.claim("contract", worker="dead-worker", limit=10, lease=30)
    clock.advance(29)
    assert backend.claim("contract", worker="w2", limit=10, lease=30) == []
    clock.advance(2)
    (again,) = backend.claim("contract", worker="w2", limit=10, lease=30)
    assert again.id == first.id
    assert again.attempts == 2
    assert [a.outcome for a in again.history] == ["lost", "running"]
    assert again.history[0].error is not None
    assert again.history[0].error.type == "LeaseExpired"


def test_worker_killed_every_time_ends_dead(backend: QueueBackend, clock: FakeClock) -> None:
    """A job whose worker always dies is dead-lettered after max_attempts lost attempts."""
    backend.enqueue(_new(now=clock.time(), max_attempts=2))
    for _ in range(2):
        assert len(backend.claim("contract", worker="w", limit=1, lease=5)) == 1
        clock.advance(6)
    assert backend.claim("contract", worker="w", limit=1, lease=5) == []
    (dead,) = backend.dead_letters("contract")
    assert (dead.state, dead.attempts) == ("dead", 2)
    assert dead.last_error is not None
    assert dead.last_error.type == "LeaseExpired"


def test_lost_lease_cannot_finish(backend: QueueBackend, clock: FakeClock) -> None:
    """A worker whose lease lapsed cannot ack, fail or dead-letter; the new holder can."""
    backend.enqueue(_new(now=clock.time()))
    (stale,) = backend.claim("contract", worker="slow", limit=1, lease=5)
    clock.advance(6)
    (fresh,) = backend.claim("contract", worker="fast", limit=1, lease=5)
    with pytest.raises(LeaseLost):
        backend.ack(stale)
    with pytest.raises(LeaseLost):
        backend.fail(stale, JobError("X", "y"), retry_at=None)
    assert backend.ack(fresh).state == "completed"
    with pytest.raises(LeaseLost):
        backend.ack(fresh)  # twice is not allowed either


def test_expired_lease_cannot_ack_even_before_reclaim(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """Once the lease time has passed, the old holder is refused even if nobody reclaimed."""
    backend.enqueue(_new(now=clock.time()))
    (job,) = backend.claim("contract", worker="w", limit=1, lease=5)
    clock.advance(5.5)
    with pytest.raises(LeaseLost):
        backend.ack(job)


def test_heartbeat_extends_lease(backend: QueueBackend, clock: FakeClock) -> None:
    """Renewed leases are not reclaimed; lost ones are reported."""
    backend.enqueue(_new(now=clock.time()))
    backend.enqueue(_new(now=clock.time()))
    kept, dropped = backend.claim("contract", worker="w", limit=2, lease=30)
    clock.advance(20)
    assert backend.heartbeat("contract", [kept], 30) == {kept.id}
    clock.advance(20)  # 40 s after the claim: only `dropped` lapsed
    assert backend.heartbeat("contract", [kept, dropped], 30) == {kept.id}
    (reclaimed,) = backend.claim("contract", worker="w2", limit=2, lease=30)
    assert reclaimed.id == dropped.id
    assert backend.ack(kept).state == "completed"


def test_release_does_not_count_attempt(backend: QueueBackend, clock: FakeClock) -> None:
    """A job given back at shutdown keeps its attempts and runs again at once."""
    backend.enqueue(_new(now=clock.time()))
    (job,) = backend.claim("contract", worker="w", limit=1, lease=30)
    backend.release(job)
    back = backend.get("contract", job.id)
    assert back is not None
    assert (back.state, back.attempts) == ("waiting", 0)
    (again,) = backend.claim("contract", worker="w", limit=1, lease=30)
    assert again.attempts == 1
    with pytest.raises(LeaseLost):
        backend.ack(job)  # the released token is dead


def test_dedupe_while_waiting(make_processor: Make, backend: QueueBackend) -> None:
    """Repeated 'reindex page 42' collapse while one waits; once running, a new one is added."""
    proc = make_processor(Recorder)
    first = proc.enqueue({"page": 42}, dedupe_key="reindex:42")
    assert proc.enqueue({"page": 42}, dedupe_key="reindex:42").id == first.id
    other = proc.enqueue({"page": 7}, dedupe_key="reindex:7")
    assert other.id != first.id
    claimed = backend.claim("contract", worker="w", limit=2, lease=30)
    assert first.id in {job.id for job in claimed}  # same instant: either order is fine
    after = proc.enqueue({"page": 42}, dedupe_key="reindex:42")
    assert after.id != first.id  # the running one may have read stale data


def test_cleanup_deletes_only_old_finished(make_processor: Make, clock: FakeClock) -> None:
    """Cleanup removes completed and dead jobs older than retention, nothing else."""
    proc = make_processor(Recorder, max_attempts=1, retention=3600)
    old_done = proc.enqueue("old")
    old_dead = proc.enqueue({"fail": 1})
    proc.run_until_empty()
    clock.advance(3601)
    recent = proc.enqueue("recent")
    proc.run_until_empty()
    waiting = proc.enqueue("waiting", delay=10)
    assert proc.cleanup() == 2
    for job in (old_done, old_dead):
        assert proc.backend.get("contract", job.id) is None
    for job in (recent, waiting):
        assert proc.backend.get("contract", job.id) is not None


def test_stats_per_state(backend: QueueBackend, clock: FakeClock) -> None:
    """Stats count each state and the oldest ready job's age."""
    now = clock.time()
    backend.enqueue(_new(now=now))
    backend.enqueue(_new(now=now))
    backend.enqueue(_new(now=now, run_at=now + 100))
    clock.advance(5)
    (job,) = backend.claim("contract", worker="w", limit=1, lease=30)
    backend.fail(job, JobError("E", "x"), retry_at=clock.time() + 50)
    (job2,) = backend.claim("contract", worker="w", limit=1, lease=30)
    stats = backend.stats("contract")
    assert (stats.waiting, stats.delayed, stats.running, stats.retrying) == (0, 1, 1, 1)
    backend.release(job2)
    stats = backend.stats("contract")
    assert stats.waiting == 1
    assert stats.oldest_waiting_age == pytest.approx(0.0, abs=6)


def test_queues_are_isolated(backend: QueueBackend, clock: FakeClock) -> None:
    """Jobs of one queue are never claimed from another."""
    backend.enqueue(_new("a", now=clock.time()))
    assert backend.claim("b", worker="w", limit=5, lease=5) == []
    assert backend.stats("b").waiting == 0
    assert len(backend.claim("a", worker="w", limit=5, lease=5)) == 1


@pytest.mark.parametrize(
    "payload",
    [
        {1, 2},
        float("nan"),
        {"x": float("inf")},
        {1: "int key"},
        {"nested": {2: "x"}},
        (1, 2),
        {"point": (1, 2)},
        [[1, (2, 3)]],
        b"bytes",
        object(),
        "x" * 2_000_000,
    ],
)
def test_bad_payloads_refused_at_enqueue(make_processor: Make, payload: object) -> None:
    """Non-JSON, lossy or oversized payloads are refused with JobRejected; nothing stored."""
    proc = make_processor(Recorder)
    with pytest.raises(JobRejected):
        proc.enqueue(payload)
    assert proc.stats().waiting == 0


@pytest.mark.parametrize(
    "options", [{"priority": 1.5}, {"priority": True}, {"delay": -1}, {"dedupe_key": "k" * 500}]
)
def test_bad_enqueue_options_refused(make_processor: Make, options: dict[str, Any]) -> None:
    """Bad priorities, delays and dedupe keys are refused."""
    with pytest.raises(JobRejected):
        make_processor(Recorder).enqueue("x", **options)


def test_concurrency_runs_jobs_in_parallel(make_processor: Make) -> None:
    """With concurrency=4, four sync jobs run at the same time (in worker threads)."""
    barrier = threading.Barrier(4, timeout=10)

    class Parallel(QueueProcessor):
        queue = "contract"

        def process(self, job: Job) -> None:
            barrier.wait()  # raises BrokenBarrierError unless 4 run at once

    proc = make_processor(Parallel, concurrency=4)
    jobs = [proc.enqueue(i) for i in range(8)]
    assert proc.run_until_empty() == 8
    errors = [j.last_error for j in (proc.backend.get("contract", job.id) for job in jobs) if j]
    assert proc.stats().completed == 8, [e.traceback[-600:] for e in errors if e]


def test_async_processor(make_processor: Make) -> None:
    """``async def process`` runs on an event loop, several at once."""
    import asyncio

    running: list[int] = []
    peak: list[int] = [0]

    class AsyncWork(QueueProcessor):
        queue = "contract"

        async def process(self, job: Job) -> None:
            running.append(1)
            peak[0] = max(peak[0], len(running))
            await asyncio.sleep(0.01)
            running.pop()

    proc = make_processor(AsyncWork, concurrency=3)
    for i in range(6):
        proc.enqueue(i)
    assert proc.run_until_empty() == 6
    assert proc.stats().completed == 6
    assert peak[0] == 3


def test_metrics_report_outcomes_and_depth(make_processor: Make) -> None:
    """Outcomes, durations, dead letters and depth reach the metrics registry."""
    metrics = Metrics()
    proc = make_processor(Recorder, max_attempts=1)
    proc.metrics = metrics
    proc.enqueue("ok")
    proc.enqueue({"fail": 1})
    proc.run_until_empty()
    sample = metrics.registry.get_sample_value
    assert sample("hardening_jobs_total", {"queue": "contract", "outcome": "completed"}) == 1
    assert sample("hardening_jobs_total", {"queue": "contract", "outcome": "dead"}) == 1
    assert sample("hardening_jobs_dead_lettered_total", {"queue": "contract"}) == 1
    assert sample("hardening_queue_depth", {"queue": "contract", "state": "dead"}) == 1


def test_failing_hooks_do_not_break_the_worker(make_processor: Make) -> None:
    """A hook that raises is logged; the job's outcome stands."""

    class BadHooks(QueueProcessor):
        queue = "contract"

        def process(self, job: Job) -> None:
            pass

        def on_success(self, job: Job) -> None:
            raise ValueError("hook bug")

    proc = make_processor(BadHooks)
    proc.enqueue("x")
    assert proc.run_until_empty() == 1
    assert proc.stats().completed == 1


def test_queue_rate_limit_holds(make_processor: Make, clock: FakeClock) -> None:
    """A queue-global rate limit spaces jobs out (the fake clock moves instead of sleeping)."""
    # counted in process here: a Redis-shared limit decides by Redis' clock, not the fake one
    proc = make_processor(Recorder, rate_limit="2/second", rate_limit_storage="memory://")
    start = clock.time()
    for i in range(6):
        proc.enqueue(i)
    proc.run_until_empty()
    assert len(proc.seen) == 6
    assert clock.time() - start >= 2.0  # 6 jobs at 2 per second


def test_ack_many_acks_held_jobs_and_reports_lost_ones(
    backend: QueueBackend, clock: FakeClock
) -> None:
    """A batch ack completes every job whose lease is held and returns None for the others."""
    for _ in range(4):
        backend.enqueue(_new(now=clock.time()))
    first = backend.claim("contract", worker="w", limit=1, lease=5)
    clock.advance(6)  # the first claim lapses...
    rest = backend.claim("contract", worker="w", limit=4, lease=30)  # ...and is reclaimed
    assert len(rest) == 4
    results = backend.ack_many([*first, *rest])
    assert results[0] is None  # the stale token
    done = results[1:]
    assert all(job is not None and job.state == "completed" for job in done)
    for job in done:
        assert job is not None
        stored = backend.get("contract", job.id)
        assert stored == job  # what a batch ack returns is exactly what it stored
        assert stored.history[-1].outcome == "completed"
    assert backend.ack_many(rest) == [None] * 4  # once only
    assert backend.ack_many([]) == []


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
def test_ack_many_takes_any_batch_size(backend: QueueBackend, clock: FakeClock) -> None:
    """A batch larger than one script or statement step is acked whole, in order."""
    for _ in range(1200):
        backend.enqueue(_new(now=clock.time()))
    claimed: list[Job] = []
    while len(claimed) < 1200:
        batch = backend.claim("contract", worker="w", limit=500, lease=30)
        assert batch
        claimed += batch
    stale = claimed[700].with_changes(lease_token="stale")
    batch = [*claimed[:700], stale, *claimed[701:]]
    results = backend.ack_many(batch)
    assert [r is None for r in results] == [job is stale for job in batch]
    assert [r.id for r in results if r is not None] == [j.id for j in batch if j is not stale]
    stats = backend.stats("contract")
    assert (stats.completed, stats.running) == (1199, 1)


def test_crash_deaths_call_the_hooks_and_count(
    make_processor: Make, backend: QueueBackend, clock: FakeClock
) -> None:
    """Jobs whose worker died: the worker that finds them calls on_failure / on_dead and
    counts them, as for any other failure or death."""
    metrics = Metrics()
    proc = make_processor(Recorder, max_lost=2)
    proc.metrics = metrics
    doomed = proc.enqueue("crashes its worker every time")
    assert len(backend.claim("contract", worker="crashed", limit=10, lease=5)) == 1
    clock.advance(6)
    survivor = proc.enqueue("crashes once")
    claimed = backend.claim("contract", worker="crashed", limit=10, lease=5)
    assert {job.id for job in claimed} == {doomed.id, survivor.id}
    clock.advance(6)  # the crashed worker's leases lapse again
    assert proc.run_until_empty() == 1  # the survivor runs again; the doomed one is dead
    assert proc.dead == [doomed.id]
    assert sorted(job_id for job_id, _ in proc.failures) == sorted([doomed.id, survivor.id])
    assert proc.succeeded == [survivor.id]
    sample = metrics.registry.get_sample_value
    assert sample("hardening_jobs_dead_lettered_total", {"queue": "contract"}) == 1
    assert sample("hardening_jobs_total", {"queue": "contract", "outcome": "lost"}) == 2
    (dead,) = backend.dead_letters("contract")
    assert dead.id == doomed.id
    assert (dead.lost, dead.failures) == (2, 0)


def test_losses_and_failures_have_separate_budgets(
    make_processor: Make, backend: QueueBackend, clock: FakeClock
) -> None:
    """A job lost twice with crashed workers still has all its own attempts: it fails three
    times (max_attempts=3) before it is dead."""
    proc = make_processor(Recorder, max_attempts=3, max_lost=3, backoff=NO_JITTER)
    job = proc.enqueue({"fail": 99})
    for _ in range(2):
        backend.claim("contract", worker="crashed", limit=1, lease=5)
        clock.advance(6)
        proc._recover()
    for _ in range(5):
        clock.advance(10_000)
        proc.run_until_empty()
    dead = backend.get("contract", job.id)
    assert dead is not None
    assert dead.state == "dead"
    assert [a.outcome for a in dead.history] == ["lost", "lost", "failed", "failed", "failed"]
    assert (dead.lost, dead.failures) == (2, 3)


def test_a_suspect_job_runs_alone(
    make_processor: Make, backend: QueueBackend, clock: FakeClock
) -> None:
    """A job that lost an attempt with a crashed worker runs alone: an idle worker claims it
    and nothing else; the others wait for the next claim."""
    proc = make_processor(Recorder, concurrency=4)
    suspect = proc.enqueue("was in flight when a worker died")
    backend.claim("contract", worker="crashed", limit=1, lease=5)
    clock.advance(6)
    proc._recover()
    others = [proc.enqueue(n) for n in range(3)]
    jobs = proc._claim(4, Idle(0.01))
    assert [job.id for job in jobs] == [suspect.id]
    assert not proc._should_claim(3, 1)  # while it runs, nothing else is claimed
    waiting = [backend.get("contract", job.id) for job in others]
    assert all(job is not None and job.state == "waiting" for job in waiting)
    assert all(job is not None and job.attempts == 0 for job in waiting)  # handed back free
    assert proc._should_claim(4, 0)  # idle again: claims resume


class HangsUnlessQuick(QueueProcessor):
    """Hangs on ``"hang"`` payloads until released; any other payload returns at once."""

    queue = "contract"
    max_attempts = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.done: list[Any] = []

    def process(self, job: Job) -> None:
        if job.payload == "hang":
            self.release.wait(10)
        self.done.append(job.payload)


def test_a_job_carries_its_own_timeout(backend: QueueBackend, clock: FakeClock) -> None:
    """``enqueue(timeout=…)`` is stored with the job and comes back with every read."""
    backend.enqueue(_new(now=clock.time(), timeout=2.5))
    backend.enqueue(_new(now=clock.time()))
    claimed = backend.claim("contract", worker="w", limit=2, lease=30)
    assert sorted(str(job.timeout) for job in claimed) == ["2.5", "None"]
    for job in claimed:
        assert backend.get("contract", job.id) == job.with_changes(lease_token=job.lease_token)
        assert backend.ack(job).timeout == job.timeout


def test_a_per_job_timeout_fails_only_that_job(make_processor: Make) -> None:
    """A processor without a timeout still fails a job enqueued with one once it overruns;
    its other jobs run to the end."""
    proc = make_processor(HangsUnlessQuick)
    hung = proc.enqueue("hang", timeout=0.2)
    quick = proc.enqueue("quick", timeout=5)
    plain = proc.enqueue("plain")
    worker = threading.Thread(target=proc.run_until_empty)
    worker.start()
    deadline = time.monotonic() + 10
    while (job := proc.backend.get("contract", hung.id)).state != "dead":
        assert time.monotonic() < deadline, "the overrunning attempt never failed"
        time.sleep(0.01)
    proc.release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert job.last_error is not None
    assert job.last_error.type == "JobTimedOut"
    assert sorted(proc.done) == ["hang", "plain", "quick"]  # the late return is discarded...
    assert proc.backend.get("contract", hung.id).state == "dead"  # ...and changes nothing
    for other in (quick, plain):
        assert proc.backend.get("contract", other.id).state == "completed"


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "soon", True])
def test_bad_per_job_timeouts_are_rejected(make_processor: Make, timeout: object) -> None:
    """A job's timeout must be positive, finite seconds."""
    proc = make_processor(Recorder)
    with pytest.raises(JobRejected):
        proc.enqueue("x", timeout=timeout)
    assert proc.stats().waiting == 0
