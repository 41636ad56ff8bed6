"""Jobs and queue statistics: plain immutable data shared by every backend."""

from __future__ import annotations

import json
import traceback as tb
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from hardening.errors import JobRejected

__all__ = [
    "JSON",
    "Attempt",
    "Job",
    "JobError",
    "JobState",
    "NewJob",
    "QueueStats",
    "encode_payload",
]

JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"
JobState = Literal["waiting", "running", "retrying", "completed", "dead"]
# states a job can be claimed from, and states it may be deduplicated against
READY_STATES: tuple[JobState, ...] = ("waiting", "retrying")
FINISHED_STATES: tuple[JobState, ...] = ("completed", "dead")


@dataclass(frozen=True, slots=True)
class JobError:
    """What went wrong in an attempt.

    Attributes:
        type: the exception's class name (``"LeaseExpired"`` when the worker was lost).
        message: ``str(exception)``, truncated to 2,000 characters.
        traceback: the formatted traceback, truncated to 20,000 characters.
    """

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> JobError:
        """Capture an exception (its type, message and traceback)."""
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc)[:2000], text[-20000:])

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready form, for storage."""
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> JobError:
        """Rebuild from :meth:`to_dict` output."""
        return cls(data.get("type", ""), data.get("message", ""), data.get("traceback", ""))


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at a job.

    Attributes:
        number: 1 for the first attempt.
        started_at: when it was claimed (epoch seconds).
        finished_at: when it ended, if it did.
        outcome: ``"completed"``, ``"failed"``, ``"lost"`` (the lease expired: the worker
            died or stalled) or ``"released"`` (given back at shutdown; not counted).
        worker: the worker that claimed it.
        error: what went wrong, for failed and lost attempts.
    """

    number: int
    started_at: float
    finished_at: float | None = None
    outcome: str = "running"
    worker: str = ""
    error: JobError | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form, for storage."""
        return {
            "number": self.number,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "worker": self.worker,
            "error": self.error.to_dict() if self.error else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Attempt:
        """Rebuild from :meth:`to_dict` output."""
        error = data.get("error")
        finished = data.get("finished_at")
        return cls(
            number=int(str(data["number"])),
            started_at=float(str(data["started_at"])),
            finished_at=float(str(finished)) if finished is not None else None,
            outcome=str(data.get("outcome", "")),
            worker=str(data.get("worker", "")),
            error=JobError.from_dict(error) if isinstance(error, dict) else None,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """A unit of work in a queue. Immutable: backends return updated copies.

    Attributes:
        id: unique id (a UUID4 hex string).
        queue: the queue's name.
        payload: the job's JSON data.
        priority: higher runs first; equal priorities run in order of ``run_at``.
        attempts: attempts started so far (a claim counts, even if the worker dies).
        max_attempts: attempts allowed before the job is dead-lettered.
        state: ``waiting``, ``running``, ``retrying``, ``completed`` or ``dead``.
        created_at: when it was enqueued (epoch seconds).
        run_at: when it may run (later than ``created_at`` for delayed jobs and retries).
        finished_at: when it completed or was dead-lettered.
        dedupe_key: while a job with this key waits, enqueueing the same key returns it.
        last_error: the last failed attempt's error.
        history: every attempt so far.
        lease_token: set on a claimed job: the proof a worker must show to finish it.
        lease_expires_at: when the claim lapses unless renewed by a heartbeat.
        timeout: seconds one attempt may run, set at enqueue (``None``: the processor's
            ``timeout``).
    """

    id: str
    queue: str
    payload: JSON
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    state: JobState = "waiting"
    created_at: float = 0.0
    run_at: float = 0.0
    finished_at: float | None = None
    dedupe_key: str | None = None
    last_error: JobError | None = None
    history: tuple[Attempt, ...] = field(default=(), repr=False)
    lease_token: str | None = field(default=None, repr=False)
    lease_expires_at: float | None = None
    timeout: float | None = None

    @property
    def lost(self) -> int:
        """Attempts lost with their worker (its lease lapsed): counted apart from failures."""
        return sum(1 for attempt in self.history if attempt.outcome == "lost")

    @property
    def failures(self) -> int:
        """Attempts that were not lost: the job's own failures, the running one included."""
        return self.attempts - self.lost

    def with_changes(self, **changes: object) -> Job:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def closed_history(
        self, now: float, outcome: str, error: JobError | None = None
    ) -> tuple[Attempt, ...]:
        """The history with the running attempt (the last) closed at ``now`` as ``outcome``.

        A job with no history yet gets its attempt ``attempts`` opened and closed at ``now``.
        """
        last = self.history[-1] if self.history else Attempt(self.attempts, now)
        done = Attempt(last.number, last.started_at, now, outcome, last.worker, error)
        return (*self.history[:-1], done)

    def completed(self, now: float) -> Job:
        """This claimed job as its ack leaves it: completed at ``now``, attempt closed, no lease."""
        return replace(
            self,
            state="completed",
            finished_at=now,
            lease_token=None,
            lease_expires_at=None,
            history=self.closed_history(now, "completed"),
        )


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as ``enqueue`` hands it to a backend: validated and encoded.

    Attributes:
        id: the new job's id.
        queue: the queue.
        payload_json: the payload, encoded once as compact JSON.
        priority: higher first.
        run_at: when it may first run.
        created_at: now.
        max_attempts: attempts allowed.
        dedupe_key: optional deduplication key.
        timeout: seconds one attempt may run (``None``: the processor's ``timeout``).
    """

    id: str
    queue: str
    payload_json: str
    priority: int
    run_at: float
    created_at: float
    max_attempts: int
    dedupe_key: str | None = None
    timeout: float | None = None

    def job(self) -> Job:
        """The waiting job this describes."""
        return Job(
            id=self.id,
            queue=self.queue,
            payload=json.loads(self.payload_json),
            priority=self.priority,
            max_attempts=self.max_attempts,
            created_at=self.created_at,
            run_at=self.run_at,
            dedupe_key=self.dedupe_key,
            timeout=self.timeout,
        )


@dataclass(frozen=True, slots=True)
class QueueStats:
    """How a queue stands.

    Attributes:
        waiting: ready to run now.
        delayed: waiting for their ``run_at`` (first attempt).
        running: claimed by a worker.
        retrying: failed at least once and waiting for the next attempt.
        dead: dead-lettered.
        completed: done and kept until cleanup.
        oldest_waiting_age: seconds the oldest ready job has been ready (0 if none).
        finished_exact: whether ``completed`` and ``dead`` are exact counts. ``SQLBackend``
            on PostgreSQL gives its planner's estimate past 10,000 finished jobs of a state,
            so that ``stats()`` costs the same however much history a queue keeps.
    """

    waiting: int = 0
    delayed: int = 0
    running: int = 0
    retrying: int = 0
    dead: int = 0
    completed: int = 0
    oldest_waiting_age: float = 0.0
    finished_exact: bool = True

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, int], oldest_waiting_age: float, *, finished_exact: bool = True
    ) -> QueueStats:
        """Stats from counts by state name (a missing state counts 0)."""
        return cls(
            waiting=counts.get("waiting", 0),
            delayed=counts.get("delayed", 0),
            running=counts.get("running", 0),
            retrying=counts.get("retrying", 0),
            dead=counts.get("dead", 0),
            completed=counts.get("completed", 0),
            oldest_waiting_age=oldest_waiting_age,
            finished_exact=finished_exact,
        )


def new_job_id() -> str:
    """A fresh job id."""
    return uuid.uuid4().hex


def encode_payload(payload: object, *, queue: str, max_bytes: int) -> str:
    """Encode a payload as compact JSON, refusing what cannot be stored faithfully.

    Args:
        payload: the job's data.
        queue: the queue's name, for the error.
        max_bytes: the largest encoded size accepted.

    Returns:
        The JSON text.

    Raises:
        JobRejected: not JSON-serialisable (including NaN and infinities), not stored
            faithfully (keys that are not strings, tuples: JSON would change them), or larger
            than ``max_bytes``.
    """
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise JobRejected(f"payload is not JSON-serialisable: {exc}", queue=queue) from exc
    problem = _unfaithful(payload)  # what json.dumps would silently change
    if problem is not None:
        raise JobRejected(problem, queue=queue)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise JobRejected(f"payload is {size} bytes; the limit is {max_bytes}", queue=queue)
    return text


def _unfaithful(payload: object) -> str | None:
    """Why ``payload`` would not come back as it went in, or ``None``.

    ``json.dumps`` turns the key ``1`` into ``"1"`` and a tuple into a list: the handler would
    get something else than was enqueued (and ``job.payload == payload`` would be false).
    """
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return "payload object keys must be strings"
            stack.extend(item.values())
        elif isinstance(item, tuple):
            return "payload tuples would come back as lists: pass a list"
        elif isinstance(item, list):
            stack.extend(item)
    return None
