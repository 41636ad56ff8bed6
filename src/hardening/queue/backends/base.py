"""The queue backend protocol: what a store must do, atomically, for the processor.

Every method that changes a job is one atomic step in the store (one SQL statement or
transaction, one Lua script, one lock hold in memory). Claims are leases: a claimed job carries
a ``lease_token`` and ``lease_expires_at``; only the holder of a live lease can finish it, and a
claim also recovers jobs whose lease lapsed (their worker died): back to ``retrying`` if they
have attempts left, else dead-lettered. One contract suite (tests/queue/test_contract.py) runs
every backend through the same behaviours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from hardening.errors import LeaseLost
from hardening.queue.job import Job, JobError, NewJob, QueueStats

__all__ = ["LEASE_EXPIRED", "QueueBackend", "ack_each"]

LEASE_EXPIRED = JobError(
    "LeaseExpired", "the worker's lease lapsed before it finished (the worker died or stalled)"
)


@runtime_checkable
class QueueBackend(Protocol):
    """A job store. Times are epoch seconds from the backend's clock."""

    def enqueue(self, job: NewJob, *, session: object | None = None) -> Job:
        """Store a new job, or return the waiting job with the same ``dedupe_key``.

        Args:
            job: the validated, encoded job.
            session: a SQLAlchemy session whose transaction the insert joins (SQL only).

        Returns:
            The stored (or deduplicated) job.
        """
        ...

    def claim(self, queue: str, *, worker: str, limit: int, lease: float) -> list[Job]:
        """Recover lapsed leases, then lease up to ``limit`` ready jobs.

        Highest priority first, then oldest ``run_at``; each claim counts an attempt.

        Returns:
            The claimed jobs, each with its ``lease_token``.
        """
        ...

    def heartbeat(self, queue: str, jobs: Sequence[Job], lease: float) -> set[str]:
        """Extend the leases of jobs this worker holds.

        Returns:
            The ids whose lease is still held (the others were lost to a lapse).
        """
        ...

    def ack(self, job: Job) -> Job:
        """Mark a claimed job completed.

        Raises:
            LeaseLost: the lease lapsed or the token is stale.
        """
        ...

    def ack_many(self, jobs: Sequence[Job]) -> list[Job | None]:
        """Mark several claimed jobs completed, in one round trip where the store allows.

        Returns:
            Per job, in order: the completed job, or ``None`` where the lease was lost.
        """
        ...

    def fail(self, job: Job, error: JobError, *, retry_at: float | None) -> Job:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter when ``None``.

        Raises:
            LeaseLost: the lease lapsed or the token is stale.
        """
        ...

    def release(self, job: Job) -> None:
        """Give a claimed job back unfinished (shutdown): its attempt is not counted."""
        ...

    def get(self, queue: str, job_id: str) -> Job | None:
        """The job, or ``None``."""
        ...

    def stats(self, queue: str) -> QueueStats:
        """Counts per state and the oldest ready job's age."""
        ...

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[Job]:
        """Dead jobs, most recently dead first."""
        ...

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Put dead jobs (all, or these) back to waiting with fresh attempts; return how many."""
        ...

    def purge_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs (all, or these); return how many."""
        ...

    def cleanup(self, queue: str, *, older_than: float) -> int:
        """Delete completed and dead jobs that finished more than ``older_than`` seconds ago."""
        ...

    def close(self) -> None:
        """Release connections the backend opened itself."""
        ...


@runtime_checkable
class RecoveringBackend(Protocol):
    """A backend that can recover lapsed leases on their own and say which jobs it recovered.

    Every backend recovers lapsed leases inside ``claim``; one that also offers ``recover``
    lets the worker that finds a crashed worker's jobs call ``on_failure`` / ``on_dead`` and
    count them, whichever process that is, with its own lost budget; its ``claim`` then takes
    ``recover=False`` so that every recovery applies that budget. The built-in backends all do.
    """

    def claim(
        self, queue: str, *, worker: str, limit: int, lease: float, recover: bool = True
    ) -> list[Job]:
        """``QueueBackend.claim``, recovering lapsed leases first only when ``recover``."""
        ...

    def recover(self, queue: str, *, limit: int = 1000, max_lost: int | None = None) -> list[Job]:
        """Retry or dead-letter up to ``limit`` jobs whose lease lapsed.

        With ``max_lost``, a job is dead-lettered once it has lost that many attempts with a
        worker (its own failures count apart, against ``max_attempts``); without it, once its
        attempts reach ``max_attempts`` (as the recovery inside ``claim`` does).

        Returns:
            The recovered jobs as they are now (``retrying`` or ``dead``).
        """
        ...


def _or_none(ack: Callable[[Job], Job], job: Job) -> Job | None:
    try:
        return ack(job)
    except LeaseLost:
        return None


def ack_each(ack: Callable[[Job], Job], jobs: Sequence[Job]) -> list[Job | None]:
    """``ack_many`` for stores without a batch form: one ack per job, ``None`` when lost."""
    return [_or_none(ack, job) for job in jobs]
