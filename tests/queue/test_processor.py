"""The worker drivers with real time: heartbeats, graceful shutdown, options."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from hardening import ConfigurationError, FakeClock
from hardening.queue import Job, MemoryBackend, QueueProcessor


class Busy(QueueProcessor):
    """Spins the CPU (holding the GIL as much as Python lets it) for payload seconds."""

    queue = "busy"

    def process(self, job: Job) -> None:
        end = time.monotonic() + float(job.payload)  # type: ignore[arg-type]
        total = 0
        while time.monotonic() < end:
            total += sum(range(1000))


def test_heartbeat_keeps_a_cpu_bound_job(caplog: pytest.LogCaptureFixture) -> None:
    """A CPU-bound job running 3x its lease keeps it (heartbeat thread) and completes once."""
    backend = MemoryBackend()
    proc = Busy(backend, lease=0.4, heartbeat=0.1, poll_interval=0.01)
    job = proc.enqueue(1.2)
    assert proc.run_until_empty() == 1
    done = backend.get("busy", job.id)
    assert done is not None
    assert (done.state, done.attempts) == ("completed", 1)
    assert [a.outcome for a in done.history] == ["completed"]  # the lease never lapsed
    assert "lost the lease" not in caplog.text


class Blocking(QueueProcessor):
    queue = "blocking"
    concurrency = 2
    shutdown_grace = 0.2
    poll_interval = 0.01

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.release = threading.Event()

    def process(self, job: Job) -> None:
        if job.payload == "quick":
            return
        self.started.set()
        self.release.wait(10)


def test_graceful_shutdown_never_hands_back_a_running_job() -> None:
    """On stop: no new claims, quick jobs finish; a handler still running after the grace
    keeps its job leased (never handed back), so no second worker starts it meanwhile."""
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    proc = Blocking(backend, clock=clock, lease=30)
    slow = proc.enqueue("slow")
    worker = threading.Thread(target=proc.run, kwargs={"install_signal_handlers": False})
    worker.start()
    assert proc.started.wait(10)
    proc.enqueue("quick")
    time.sleep(0.1)
    proc.stop()
    worker.join(timeout=10)
    assert not worker.is_alive()
    held = backend.get("blocking", slow.id)
    assert held is not None
    assert (held.state, held.attempts) == ("running", 1)
    assert backend.claim("blocking", worker="other", limit=10, lease=30) == []  # no overlap
    proc.release.set()  # the handler ends in the stopped process; nothing records it
    clock.advance(31)
    (again,) = backend.claim("blocking", worker="other", limit=10, lease=30)
    assert (again.id, again.attempts) == (slow.id, 2)
    assert [a.outcome for a in again.history] == ["lost", "running"]


def test_async_shutdown_hands_back_cancelled_handlers_only() -> None:
    """The asyncio driver cancels ``async def`` handlers after the grace and hands their jobs
    back (nothing runs them any more); a sync handler in its thread keeps its job leased."""
    import asyncio

    class Stuck(QueueProcessor):
        queue = "stuck"
        shutdown_grace = 0.1
        poll_interval = 0.01
        concurrency = 2

        async def process(self, job: Job) -> None:
            await asyncio.sleep(3600)

    class StuckSync(QueueProcessor):
        queue = "stucksync"
        shutdown_grace = 0.1
        poll_interval = 0.01
        gate = threading.Event()

        def process(self, job: Job) -> None:
            self.gate.wait(10)

    backend = MemoryBackend()
    cancelled, in_thread = Stuck(backend), StuckSync(backend)
    first = cancelled.enqueue("x")
    second = in_thread.enqueue("y")

    stopped = threading.Event()

    async def main(proc: QueueProcessor) -> None:
        task = asyncio.create_task(proc.arun(install_signal_handlers=False))
        while proc.stats().running < 1:
            await asyncio.sleep(0.01)
        proc.stop()
        await asyncio.wait_for(task, 10)
        stopped.set()  # asyncio.run then waits for the executor's threads

    asyncio.run(main(cancelled))
    handed_back = backend.get("stuck", first.id)
    stopped.clear()
    runner = threading.Thread(target=asyncio.run, args=(main(in_thread),))
    runner.start()
    assert stopped.wait(10)
    kept = backend.get("stucksync", second.id)
    StuckSync.gate.set()
    runner.join(10)
    assert handed_back is not None
    assert kept is not None
    assert (handed_back.state, handed_back.attempts) == ("waiting", 0)
    assert (kept.state, kept.attempts) == ("running", 1)


def test_async_worker_stops_on_request() -> None:
    """``arun`` stops when asked and leaves nothing running."""
    import asyncio

    class AsyncNoop(QueueProcessor):
        queue = "async"
        poll_interval = 0.01

        async def process(self, job: Job) -> None:
            await asyncio.sleep(0)

    proc = AsyncNoop(MemoryBackend())
    for i in range(20):
        proc.enqueue(i)

    async def main() -> None:
        task = asyncio.create_task(proc.arun(install_signal_handlers=False))
        while proc.stats().completed < 20:
            await asyncio.sleep(0.01)
        proc.stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert proc.stats().running == 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"concurrency": -1},
        {"lease": 5, "heartbeat": 10},
        {"queue": ""},
        {"unknown": 1},
        {"lease": "30"},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    """Invalid options fail at construction."""
    with pytest.raises(ConfigurationError):
        Busy(MemoryBackend(), **options)


def test_options_from_class_and_keywords() -> None:
    """Class attributes are defaults; keyword arguments override them per instance."""
    proc = Blocking(MemoryBackend(), concurrency=5)
    assert (proc.options.concurrency, proc.options.shutdown_grace) == (5, 0.2)
    assert proc.queue_name == "blocking"


def test_process_must_be_implemented() -> None:
    """A subclass without process() fails its jobs with NotImplementedError, clearly."""

    class Empty(QueueProcessor):
        queue = "empty"
        max_attempts = 1

    proc = Empty(MemoryBackend())
    proc.enqueue("x")
    proc.run_until_empty()
    (dead,) = proc.dead_letters()
    assert dead.last_error is not None
    assert dead.last_error.type == "NotImplementedError"


class Succeeds(QueueProcessor):
    """Does nothing, successfully: one attempt per job, whatever the machine's speed."""

    def process(self, job: Job) -> None:
        pass


def test_stop_before_the_run_starts_is_kept() -> None:
    """A stop() that comes before the worker thread starts running is not lost."""
    # a job that succeeds: the base class's NotImplementedError would be retried after a
    # full-jitter backoff that can be short enough to fall due within the same run (2 attempts)
    proc = Succeeds(MemoryBackend())
    proc.stop()
    worker = threading.Thread(target=proc.run, kwargs={"install_signal_handlers": False})
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
    proc.enqueue({"n": 1})
    assert proc.run_until_empty() == 1  # the stop was used up: the processor runs again


class Hangs(QueueProcessor):
    """Hangs until told to go on (a stuck HTTP call, a lock never released)."""

    queue = "hangs"
    timeout = 0.2
    max_attempts = 1
    poll_interval = 0.01

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go_on = threading.Event()
        self.returned = threading.Event()

    def process(self, job: Job) -> None:
        self.go_on.wait(10)
        self.returned.set()


def _state(backend: MemoryBackend, queue: str, job_id: str) -> Job:
    job = backend.get(queue, job_id)
    assert job is not None
    return job


def test_an_overrunning_attempt_fails_and_its_late_result_is_discarded() -> None:
    """``timeout``: an attempt past it fails with JobTimedOut (here: dead, one attempt); when
    the hung handler finally returns, its success is discarded."""
    backend = MemoryBackend()
    proc = Hangs(backend)
    job = proc.enqueue("x")
    worker = threading.Thread(target=proc.run, kwargs={"install_signal_handlers": False})
    worker.start()
    deadline = time.monotonic() + 10
    while _state(backend, "hangs", job.id).state != "dead" and time.monotonic() < deadline:
        time.sleep(0.01)
    failed = _state(backend, "hangs", job.id)
    proc.go_on.set()
    assert proc.returned.wait(10)
    proc.stop()
    worker.join(10)
    assert failed.state == "dead"
    assert failed.last_error is not None
    assert failed.last_error.type == "JobTimedOut"
    final = _state(backend, "hangs", job.id)
    assert final.state == "dead"  # the late success changed nothing
    assert [a.outcome for a in final.history] == ["failed"]


def test_an_overrunning_async_handler_is_cancelled_and_retried() -> None:
    """An ``async def`` handler past its timeout is cancelled; the job is retried and can
    then complete."""
    import asyncio

    class SlowOnce(QueueProcessor):
        queue = "slowonce"
        timeout = 0.1
        poll_interval = 0.01
        backoff = 0.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cancelled = 0

        async def process(self, job: Job) -> None:
            if job.attempts == 1:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise

    backend = MemoryBackend()
    proc = SlowOnce(backend)
    job = proc.enqueue("x")
    assert asyncio.run(proc.arun_until_empty()) == 2
    done = _state(backend, "slowonce", job.id)
    assert proc.cancelled == 1
    assert done.state == "completed"
    assert [a.outcome for a in done.history] == ["failed", "completed"]
    assert done.history[0].error is not None
    assert done.history[0].error.type == "JobTimedOut"


@pytest.mark.parametrize("timeout", [0, -1, "soon"])
def test_bad_timeouts_are_refused(timeout: object) -> None:
    """A timeout must be positive seconds."""
    with pytest.raises(ConfigurationError):
        Hangs(MemoryBackend(), timeout=timeout)
