"""What a worker holds while it runs jobs: leases, finished outcomes, timeouts, idle waits.

Shared by the thread and asyncio drivers of :class:`~hardening.queue.QueueProcessor`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hardening.errors import JobTimedOut
from hardening.queue.job import Job

__all__ = ["CANCEL_GRACE", "Held", "Idle", "Outcome"]

CANCEL_GRACE = 1.0  # seconds a cancelled handler gets to unwind before its job is judged
RECOVER_EVERY = 1.0  # seconds between a worker's recoveries of lapsed leases


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished attempt whose outcome the store has not recorded yet."""

    job: Job
    duration: float
    error: Exception | None  # None: it completed


class Held:
    """The jobs a worker holds leases on: running ones, and finished ones not yet recorded.

    Shared by the worker loop, the jobs (threads or tasks) and the heartbeats, under one lock.
    A job is held from its claim until its outcome is stored (or it is released at shutdown),
    so the heartbeats keep its lease while an outage delays the recording.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._outcomes: list[Outcome] = []
        self._stopped: set[str] = set()
        self._started: dict[str, float] = {}  # monotonic start of each running attempt
        self._timed_out: set[str] = set()  # their handler's own outcome, if any, is stale

    def add(self, job: Job) -> None:
        with self._lock:
            self._started[job.id] = time.monotonic()
            self._jobs[job.id] = job

    def drop(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def stopped(self, job: Job) -> None:
        """The job's handler was cancelled and has stopped: it may be handed back."""
        with self._lock:
            self._stopped.add(job.id)

    def stopped_ids(self) -> set[str]:
        """The jobs whose handlers were cancelled and stopped."""
        with self._lock:
            return set(self._stopped)

    def finished(self, outcome: Outcome) -> None:
        """The attempt is over; the job stays held until the loop records the outcome.

        The late outcome of an attempt that timed out is dropped: its failure stands.
        """
        with self._lock:
            job_id = outcome.job.id
            self._started.pop(job_id, None)
            if job_id in self._timed_out:
                self._timed_out.discard(job_id)
                return
            self._outcomes.append(outcome)

    def overdue(
        self, default: float | None, queue: str
    ) -> tuple[list[tuple[Job, float]], float | None]:
        """Fail the attempts running longer than their timeout: ``(them, seconds to the next)``.

        A job's own ``timeout`` (set at enqueue) comes first, then ``default``; an attempt
        with neither runs for ever. Each overdue attempt gets a :class:`~hardening.JobTimedOut`
        outcome now (recorded by the loop like any failure); whatever its handler returns
        later is discarded. Returns each failed job with its timeout.
        """
        now = time.monotonic()
        nearest: float | None = None
        expired: list[tuple[Job, float]] = []
        with self._lock:
            for job_id, started in list(self._started.items()):
                job = self._jobs.get(job_id)
                timeout = default if job is None or job.timeout is None else job.timeout
                if timeout is None:
                    continue
                left = started + timeout - now
                if left > 0:
                    nearest = left if nearest is None else min(nearest, left)
                    continue
                del self._started[job_id]
                if job is None:
                    continue
                self._timed_out.add(job_id)
                error = JobTimedOut(job_id, timeout, queue=queue)
                self._outcomes.append(Outcome(job, now - started, error))
                expired.append((job, timeout))
        return expired, nearest

    def take_outcomes(self) -> list[Outcome]:
        """Every outcome waiting; their jobs are no longer held.

        A heartbeat from now on must not call them lost: their outcomes are being stored.
        """
        with self._lock:
            batch, self._outcomes = self._outcomes, []
            for outcome in batch:
                self._jobs.pop(outcome.job.id, None)
        return batch

    def keep(self, outcomes: list[Outcome]) -> None:
        """Outcomes the store could not take: held again, first in line for the next pass."""
        with self._lock:
            self._outcomes[:0] = outcomes
            for outcome in outcomes:
                self._jobs[outcome.job.id] = outcome.job

    def waiting_outcomes(self) -> int:
        return len(self._outcomes)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._jobs

    def running(self) -> list[Job]:
        """The held jobs whose attempt is not over."""
        with self._lock:
            finished = {outcome.job.id for outcome in self._outcomes}
            return [job for job in self._jobs.values() if job.id not in finished]


class Idle:
    """How long to wait when there is nothing to claim.

    The poll interval, or a growing backoff (to 30 s) while the backend is failing.
    """

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.wait = poll

    def next(self) -> float:
        return self.wait

    def reset(self) -> None:
        self.wait = self.poll

    def failed(self) -> None:
        self.wait = min(30.0, max(self.wait * 2, self.poll))
