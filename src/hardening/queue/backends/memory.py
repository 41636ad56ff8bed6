"""In-process queue backend: the embedded default, exact and thread-safe, for one process."""

from __future__ import annotations

import heapq
import itertools
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from hardening._clock import Clock, SystemClock
from hardening.errors import LeaseLost
from hardening.queue.backends.base import LEASE_EXPIRED, ack_each
from hardening.queue.job import (
    FINISHED_STATES,
    READY_STATES,
    Attempt,
    Job,
    JobError,
    NewJob,
    QueueStats,
)

__all__ = ["MemoryBackend"]


@dataclass
class _Queue:
    jobs: dict[str, Job] = field(default_factory=dict)
    ready: list[tuple[int, float, int, str]] = field(default_factory=list)  # -prio, run_at, seq
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # run_at, seq
    running: dict[str, Job] = field(default_factory=dict)
    dedupe: dict[str, str] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)  # id -> its live heap entry


class MemoryBackend:
    """Jobs in a dict and two heaps per queue, under one lock. Lost with the process.

    Args:
        clock: the clock deciding leases and delays (a ``FakeClock`` in tests).
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._counter = itertools.count()

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def _schedule(self, queue: _Queue, job: Job, now: float) -> None:
        seq = next(self._counter)
        queue.seq[job.id] = seq
        if job.run_at > now:
            heapq.heappush(queue.delayed, (job.run_at, seq, job.id))
        else:
            heapq.heappush(queue.ready, (-job.priority, job.run_at, seq, job.id))

    def enqueue(self, job: NewJob, *, session: object | None = None) -> Job:
        """Store a new job, or return the waiting one with the same ``dedupe_key``."""
        with self._lock:
            queue = self._queue(job.queue)
            if job.dedupe_key is not None:
                existing = queue.jobs.get(queue.dedupe.get(job.dedupe_key, ""))
                if existing is not None and existing.state in READY_STATES:
                    return existing
            stored = job.job()
            queue.jobs[stored.id] = stored
            if job.dedupe_key is not None:
                queue.dedupe[job.dedupe_key] = stored.id
            self._schedule(queue, stored, self.clock.time())
            return stored

    def _recover(self, queue: _Queue, now: float, max_lost: int | None = None) -> list[Job]:
        recovered: list[Job] = []
        for job in [j for j in queue.running.values() if (j.lease_expires_at or 0) <= now]:
            del queue.running[job.id]
            attempt = job.history[-1]
            lost = Attempt(
                attempt.number, attempt.started_at, now, "lost", attempt.worker, LEASE_EXPIRED
            )
            history = (*job.history[:-1], lost)
            if _out_of_budget(job, max_lost):
                queue.jobs[job.id] = job.with_changes(
                    state="dead",
                    finished_at=now,
                    last_error=LEASE_EXPIRED,
                    history=history,
                    lease_token=None,
                    lease_expires_at=None,
                )
            else:
                again = job.with_changes(
                    state="retrying",
                    run_at=now,
                    last_error=LEASE_EXPIRED,
                    history=history,
                    lease_token=None,
                    lease_expires_at=None,
                )
                queue.jobs[job.id] = again
                self._schedule(queue, again, now)
            recovered.append(queue.jobs[job.id])
        return recovered

    def recover(self, queue: str, *, limit: int = 1000, max_lost: int | None = None) -> list[Job]:
        """Retry or dead-letter the jobs whose lease lapsed; return them as they are now.

        Args:
            queue: the queue.
            limit: ignored (in process, recovering every lapsed job is cheap).
            max_lost: dead-letter a job once it lost this many attempts (``None``: once its
                attempts reach ``max_attempts``).

        Returns:
            The recovered jobs (``retrying`` or ``dead``).
        """
        with self._lock:
            return self._recover(self._queue(queue), self.clock.time(), max_lost)

    def claim(
        self, queue: str, *, worker: str, limit: int, lease: float, recover: bool = True
    ) -> list[Job]:
        """Recover lapsed leases (unless ``recover=False``), then lease up to ``limit`` jobs."""
        now = self.clock.time()
        with self._lock:
            q = self._queue(queue)
            if recover:
                self._recover(q, now)
            while q.delayed and q.delayed[0][0] <= now:
                run_at, seq, job_id = heapq.heappop(q.delayed)
                job = q.jobs.get(job_id)
                if job is not None and q.seq.get(job_id) == seq:
                    heapq.heappush(q.ready, (-job.priority, run_at, seq, job_id))
            claimed: list[Job] = []
            while q.ready and len(claimed) < limit:
                _, _, seq, job_id = heapq.heappop(q.ready)
                job = q.jobs.get(job_id)
                if job is None or q.seq.get(job_id) != seq or job.state not in READY_STATES:
                    continue  # a stale heap entry
                del q.seq[job_id]
                if job.dedupe_key is not None and q.dedupe.get(job.dedupe_key) == job_id:
                    del q.dedupe[job.dedupe_key]
                attempts = job.attempts + 1
                leased = job.with_changes(
                    state="running",
                    attempts=attempts,
                    lease_token=uuid.uuid4().hex,
                    lease_expires_at=now + lease,
                    history=(*job.history, Attempt(attempts, now, worker=worker)),
                )
                q.jobs[job_id] = q.running[job_id] = leased
                claimed.append(leased)
            return claimed

    def _held(self, q: _Queue, job: Job, now: float) -> Job:
        current = q.running.get(job.id)
        if (
            current is None
            or current.lease_token != job.lease_token
            or (current.lease_expires_at or 0) <= now
        ):
            raise LeaseLost(job.id, queue=job.queue)
        return current

    def heartbeat(self, queue: str, jobs: Sequence[Job], lease: float) -> set[str]:
        """Extend the leases still held; return their ids."""
        now = self.clock.time()
        held: set[str] = set()
        with self._lock:
            q = self._queue(queue)
            for job in jobs:
                current = q.running.get(job.id)
                if (
                    current is not None
                    and current.lease_token == job.lease_token
                    and (current.lease_expires_at or 0) > now
                ):
                    q.jobs[job.id] = q.running[job.id] = current.with_changes(
                        lease_expires_at=now + lease
                    )
                    held.add(job.id)
        return held

    def ack(self, job: Job) -> Job:
        """Mark a claimed job completed (``LeaseLost`` if the lease is gone)."""
        now = self.clock.time()
        with self._lock:
            q = self._queue(job.queue)
            current = self._held(q, job, now)
            del q.running[job.id]
            done = current.completed(now)
            q.jobs[job.id] = done
            return done

    def ack_many(self, jobs: Sequence[Job]) -> list[Job | None]:
        """Ack each job; ``None`` where its lease is gone."""
        return ack_each(self.ack, jobs)

    def fail(self, job: Job, error: JobError, *, retry_at: float | None) -> Job:
        """Record a failed attempt; retry at ``retry_at`` or dead-letter."""
        now = self.clock.time()
        with self._lock:
            q = self._queue(job.queue)
            current = self._held(q, job, now)
            del q.running[job.id]
            history = current.closed_history(now, "failed", error)
            common = {
                "last_error": error,
                "history": history,
                "lease_token": None,
                "lease_expires_at": None,
            }
            if retry_at is None:
                failed = current.with_changes(state="dead", finished_at=now, **common)
            else:
                failed = current.with_changes(state="retrying", run_at=retry_at, **common)
                self._schedule(q, failed, now)
            q.jobs[job.id] = failed
            return failed

    def release(self, job: Job) -> None:
        """Give a claimed job back: waiting again, this attempt not counted."""
        now = self.clock.time()
        with self._lock:
            q = self._queue(job.queue)
            current = q.running.get(job.id)
            if current is None or current.lease_token != job.lease_token:
                return
            del q.running[job.id]
            back = current.with_changes(
                state="waiting" if current.attempts <= 1 else "retrying",
                attempts=current.attempts - 1,
                run_at=now,
                lease_token=None,
                lease_expires_at=None,
                history=current.closed_history(now, "released", None),
            )
            q.jobs[job.id] = back
            self._schedule(q, back, now)

    def get(self, queue: str, job_id: str) -> Job | None:
        """The job, or ``None``."""
        with self._lock:
            return self._queue(queue).jobs.get(job_id)

    def stats(self, queue: str) -> QueueStats:
        """Counts per state and the oldest ready job's age."""
        now = self.clock.time()
        counts = {
            "waiting": 0,
            "delayed": 0,
            "running": 0,
            "retrying": 0,
            "dead": 0,
            "completed": 0,
        }
        oldest = now
        with self._lock:
            for job in self._queue(queue).jobs.values():
                if job.state == "waiting" and job.run_at > now:
                    counts["delayed"] += 1
                else:
                    counts[job.state] += 1
                if job.state in READY_STATES and job.run_at <= now:
                    oldest = min(oldest, job.run_at)
        return QueueStats.from_counts(counts, now - oldest)

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[Job]:
        """Dead jobs, most recently dead first."""
        with self._lock:
            dead = [j for j in self._queue(queue).jobs.values() if j.state == "dead"]
        dead.sort(key=lambda j: j.finished_at or 0.0, reverse=True)
        return dead[:limit]

    def _dead_ids(self, q: _Queue, job_ids: Sequence[str] | None) -> list[str]:
        ids = q.jobs.keys() if job_ids is None else job_ids
        return [i for i in ids if i in q.jobs and q.jobs[i].state == "dead"]

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Dead jobs back to waiting with fresh attempts (history kept)."""
        now = self.clock.time()
        with self._lock:
            q = self._queue(queue)
            ids = self._dead_ids(q, job_ids)
            for job_id in ids:
                again = q.jobs[job_id].with_changes(
                    state="waiting", attempts=0, run_at=now, finished_at=None
                )
                q.jobs[job_id] = again
                self._schedule(q, again, now)
            return len(ids)

    def purge_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs."""
        with self._lock:
            q = self._queue(queue)
            ids = self._dead_ids(q, job_ids)
            for job_id in ids:
                del q.jobs[job_id]
            return len(ids)

    def cleanup(self, queue: str, *, older_than: float) -> int:
        """Delete completed and dead jobs finished more than ``older_than`` seconds ago."""
        cutoff = self.clock.time() - older_than
        with self._lock:
            q = self._queue(queue)
            old = [
                i
                for i, j in q.jobs.items()
                if j.state in FINISHED_STATES and (j.finished_at or 0.0) < cutoff
            ]
            for job_id in old:
                del q.jobs[job_id]
            return len(old)

    def close(self) -> None:
        """Nothing to release."""


def _out_of_budget(job: Job, max_lost: int | None) -> bool:
    """Whether a job whose running attempt was just lost goes to the dead letters."""
    if max_lost is None:
        return job.attempts >= job.max_attempts
    return job.lost + 1 >= max_lost
