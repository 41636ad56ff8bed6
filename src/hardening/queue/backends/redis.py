"""Redis queue backend: one Lua script per state change, a queue in one Cluster slot.

Each queue is a handful of keys sharing the hash tag ``{<queue>}``, so a whole queue lives in
one slot of a Redis Cluster and every script reaches all of it::

    <prefix>:{<queue>}:job:<id>   HASH  one per job (payload, state, attempts, times, history...)
    <prefix>:{<queue>}:ready      ZSET  claimable now: score -priority, member run_at|seq|id
    <prefix>:{<queue>}:delayed    ZSET  waiting or retrying, not yet due, by run_at
    <prefix>:{<queue>}:running    ZSET  claimed, by lease expiry
    <prefix>:{<queue>}:waiting    ZSET  state index: waiting jobs by run_at (for stats)
    <prefix>:{<queue>}:retrying   ZSET  state index: retrying jobs by run_at (for stats)
    <prefix>:{<queue>}:completed  ZSET  by finished_at
    <prefix>:{<queue>}:dead       ZSET  by finished_at
    <prefix>:{<queue>}:dedupe     HASH  dedupe_key -> id of the waiting job holding it
    <prefix>:{<queue>}:seq        STRING the enqueue sequence (fifo among equal priorities)

Jobs never sit in a list between two commands (no ``BRPOPLPUSH``): a claim is one script that
first recovers lapsed leases, then moves due delayed jobs to ``ready``, then leases the best
ones; ack, fail and heartbeat check the lease token and expiry in the same script that changes
the job. The scripts ship as package data in ``hardening/queue/lua/``.

Times come from the backend's ``clock``: by default Redis' own time (``TIME``, read as an offset
from the host clock that is measured every 10 s), so hosts whose clocks disagree still agree on
leases, delays and back-off; a clock given explicitly (a ``FakeClock`` in tests) is used as is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, get_args

from hardening._clock import Clock, backend_clock
from hardening._imports import require
from hardening._redis import check_key_prefix, is_async_client, read_lua, redis_key
from hardening._storage import warn_about_pool
from hardening.errors import BackendUnavailable, ConfigurationError, LeaseLost
from hardening.queue.backends.base import LEASE_EXPIRED, ack_each
from hardening.queue.job import Attempt, Job, JobError, JobState, NewJob, QueueStats

_redis_exceptions = require("redis.exceptions", extra="redis", feature="the Redis queue backend")

__all__ = ["RedisBackend"]

# the keys every script receives, in this order (see lua/common.lua)
_KEY_NAMES = (
    "ready",
    "delayed",
    "running",
    "waiting",
    "retrying",
    "completed",
    "dead",
    "dedupe",
    "seq",
)
_SCRIPTS = (
    "enqueue",
    "claim",
    "recover",
    "heartbeat",
    "ack",
    "ack_many",
    "fail",
    "release",
    "requeue_dead",
    "purge_dead",
    "cleanup",
    "stats",
    "dead_letters",
)
# finished jobs deleted per cleanup script: each call stays short however much has piled up
_CLEANUP_BATCH = 1000
_STATES: dict[str, JobState] = {state: state for state in get_args(JobState)}
_UNAVAILABLE = (
    _redis_exceptions.ConnectionError,
    _redis_exceptions.TimeoutError,
    _redis_exceptions.ClusterDownError,
)


_STEP = 500  # the most jobs one script call touches (claim.lua, recover.lua and common.lua agree)


def _number(value: float) -> str:
    """A time as text that round-trips exactly (``repr``), for Redis scores and the hashes."""
    return repr(float(value))


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _fields(reply: object) -> dict[str, str]:
    """A job hash from ``HGETALL``: a dict from redis-py, a flat list from a script."""
    if isinstance(reply, Mapping):
        return {_text(k): _text(v) for k, v in reply.items()}
    if not isinstance(reply, (list, tuple)):
        return {}
    items = [item.decode() if type(item) is bytes else str(item) for item in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


def _job(queue: str, reply: object) -> Job:
    """Rebuild a :class:`Job` from its hash."""
    f = _fields(reply)
    attempts = int(f["attempts"])
    stored = f.get("history", "[]")
    history = () if stored == "[]" else tuple(Attempt.from_dict(e) for e in json.loads(stored))
    if "attempt_started_at" in f:  # the running attempt, closed by the script that ends it
        running = Attempt(
            attempts, float(f["attempt_started_at"]), worker=json.loads(f["attempt_worker"])
        )
        history = (*history, running)
    last_error = f.get("last_error")
    finished_at = f.get("finished_at")
    lease_expires_at = f.get("lease_expires_at")
    timeout = f.get("timeout")
    return Job(
        id=f["id"],
        queue=queue,
        payload=json.loads(f["payload"]),
        priority=int(f["priority"]),
        attempts=attempts,
        max_attempts=int(f["max_attempts"]),
        state=_STATES[f["state"]],
        created_at=float(f["created_at"]),
        run_at=float(f["run_at"]),
        finished_at=float(finished_at) if finished_at else None,
        dedupe_key=f.get("dedupe_key"),
        last_error=JobError.from_dict(json.loads(last_error)) if last_error else None,
        history=history,
        lease_token=f.get("lease_token"),
        lease_expires_at=float(lease_expires_at) if lease_expires_at else None,
        timeout=float(timeout) if timeout else None,
    )


@contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BackendUnavailable("redis", str(exc)) from exc


class RedisBackend:
    """Jobs in Redis (a server, a Sentinel master or a Cluster), one Lua script per change.

    Shared by any number of workers on any number of hosts; see the module docstring for the
    key layout. Times come from ``clock``, so the hosts need synchronised clocks (NTP).

    Args:
        client: a blocking ``redis.Redis``, ``redis.cluster.RedisCluster`` or Sentinel master
            client (e.g. from ``hardening._redis.client_from_url``); also used by
            :class:`~hardening.queue.QueueProcessor` as its rate-limit storage.
        clock: the clock deciding leases and delays. By default Redis' own (``TIME``, read
            through the host clock as a measured offset: :class:`~hardening._clock.StoreClock`),
            so hosts whose clocks disagree still agree on every lease. A clock given here is
            used as it is (a ``FakeClock`` in tests), unless ``store_clock=True``.
        key_prefix: the first part of every key: letters, digits and ``_.:/-*%`` (the
            queue's name, escaped by the shared key builder, is the hash tag).
        owns_client: close the client in :meth:`close` (true when built from a URL).
        store_clock: read time from Redis through ``clock`` (default: only when no clock
            is given).

    Raises:
        ConfigurationError: an asyncio client, or a bad ``key_prefix``.
    """

    def __init__(
        self,
        client: Any,
        *,
        clock: Clock | None = None,
        key_prefix: str = "hardening:q",
        owns_client: bool = False,
        store_clock: bool | None = None,
    ) -> None:
        if is_async_client(client):
            raise ConfigurationError("RedisBackend needs a blocking redis client, not asyncio")
        if not owns_client:
            warn_about_pool(client, "RedisBackend")
        self.client = client
        self.clock: Clock = backend_clock(clock, store_clock, self._store_time)
        self.key_prefix = check_key_prefix(key_prefix)
        self.owns_client = owns_client
        self._key_cache: dict[str, tuple[tuple[str, ...], str]] = {}
        common = read_lua("hardening.queue", "common.lua")
        self._scripts = {
            name: client.register_script(common + read_lua("hardening.queue", f"{name}.lua"))
            for name in _SCRIPTS
        }

    # --- keys ----------------------------------------------------------------------------

    def queue_keys(self, queue: str) -> tuple[str, ...]:
        """A queue's fixed keys (its job hashes are :meth:`job_key`), all in one slot.

        Args:
            queue: the queue's name.

        Returns:
            ``ready``, ``delayed``, ``running``, ``waiting``, ``retrying``, ``completed``,
            ``dead``, ``dedupe`` and ``seq``, in that order (the order the scripts take them).
        """
        return self._keys(queue)[0]

    def _keys(self, queue: str) -> tuple[tuple[str, ...], str]:
        """A queue's fixed keys and its job key prefix, built once per queue."""
        keys = self._key_cache.get(queue)
        if keys is None:
            keys = (
                tuple(redis_key(self.key_prefix, queue, name) for name in _KEY_NAMES),
                redis_key(self.key_prefix, queue, "job:"),
            )
            if len(self._key_cache) < 1024:  # a worker has a few queues: never a growing cache
                self._key_cache[queue] = keys
        return keys

    def job_key(self, queue: str, job_id: str) -> str:
        """The key of one job's hash.

        Args:
            queue: the queue's name.
            job_id: the job's id.

        Returns:
            ``<prefix>:{<queue>}:job:<id>``.
        """
        return self._job_prefix(queue) + job_id

    def _job_prefix(self, queue: str) -> str:
        return self._keys(queue)[1]

    def _store_time(self) -> float:
        with _unavailable():
            seconds, micros = self.client.time()
        return int(seconds) + int(micros) / 1_000_000

    def _run(self, name: str, queue: str, *args: str) -> Any:
        """Run one script on ``queue``'s keys, with the job key prefix and now first."""
        now = _number(self.clock.time())
        keys, prefix = self._keys(queue)
        with _unavailable():
            return self._scripts[name](keys=keys, args=[prefix, now, *args])

    # --- the protocol --------------------------------------------------------------------

    def enqueue(self, job: NewJob, *, session: object | None = None) -> Job:
        """Store a new job, or return the waiting one with the same ``dedupe_key``.

        Idempotent per job id: the client resends a script whose reply was lost, and a job
        that the first run stored (and a worker may have claimed since) is left as it is.

        Args:
            job: the validated, encoded job.
            session: ignored (a SQL transaction cannot include Redis).

        Returns:
            The stored (or deduplicated) job.

        Raises:
            BackendUnavailable: Redis could not be reached or did not answer in time.
        """
        reply = self._run(
            "enqueue",
            job.queue,
            job.id,
            job.queue,
            job.payload_json,
            str(job.priority),
            _number(job.run_at),
            _number(job.created_at),
            str(job.max_attempts),
            "0" if job.dedupe_key is None else "1",
            job.dedupe_key or "",
            "" if job.timeout is None else _number(job.timeout),
        )
        if int(reply[0]) == 1:
            return job.job()
        return _job(job.queue, reply[1])

    def claim(
        self, queue: str, *, worker: str, limit: int, lease: float, recover: bool = True
    ) -> list[Job]:
        """Recover lapsed leases, then lease up to ``limit`` ready jobs.

        Args:
            queue: the queue.
            worker: the claiming worker's id, recorded in the attempt.
            limit: how many jobs at most.
            lease: seconds the claim lasts unless renewed.
            recover: recover lapsed leases first (``False`` when the caller just called
                :meth:`recover`, with its own lost budget).

        Returns:
            The claimed jobs, best first, each with its ``lease_token``.
        """
        expires = _number(self.clock.time() + lease)
        reply = self._run(
            "claim",
            queue,
            expires,
            str(limit),
            json.dumps(worker),
            json.dumps(LEASE_EXPIRED.to_dict()),
            uuid.uuid4().hex,
            "1" if recover else "0",
        )
        return [_job(queue, fields) for fields in reply]

    def recover(self, queue: str, *, limit: int = _STEP, max_lost: int | None = None) -> list[Job]:
        """Retry or dead-letter up to ``limit`` (at most 500) jobs whose lease lapsed.

        Args:
            queue: the queue.
            limit: how many jobs at most.
            max_lost: dead-letter a job once it lost this many attempts (``None``: once its
                attempts reach ``max_attempts``).

        Returns:
            The recovered jobs as they are now (``retrying`` or ``dead``).

        Raises:
            BackendUnavailable: Redis could not be reached or did not answer in time.
        """
        reply = self._run(
            "recover",
            queue,
            str(max(0, min(limit, _STEP))),
            json.dumps(LEASE_EXPIRED.to_dict()),
            "" if max_lost is None else str(max_lost),
        )
        return [_job(queue, fields) for fields in reply]

    def heartbeat(self, queue: str, jobs: Sequence[Job], lease: float) -> set[str]:
        """Extend the leases still held.

        Args:
            queue: the queue.
            jobs: the jobs this worker holds.
            lease: seconds from now each renewed lease lasts.

        Returns:
            The ids whose lease is still held.
        """
        if not jobs:
            return set()
        pairs = [value for job in jobs for value in (job.id, job.lease_token or "")]
        reply = self._run("heartbeat", queue, _number(self.clock.time() + lease), *pairs)
        return {_text(job_id) for job_id in reply}

    def ack(self, job: Job) -> Job:
        """Mark a claimed job completed.

        Args:
            job: the job as claimed (its ``lease_token`` is the proof).

        Returns:
            The completed job.

        Raises:
            LeaseLost: the lease lapsed or the token is stale.
        """
        reply = self._run("ack", job.queue, job.id, job.lease_token or "")
        if int(reply[0]) != 1:
            raise LeaseLost(job.id, queue=job.queue)
        return _job(job.queue, reply[1])

    def ack_many(self, jobs: Sequence[Job]) -> list[Job | None]:
        """Ack several jobs of one queue in one script call per 500 (``ack`` each otherwise).

        Each job still needs its own live lease. The script answers only acked or not: the
        completed job is the claimed one with its attempt closed, exactly what is stored.

        Args:
            jobs: the jobs as claimed.

        Returns:
            Per job: the completed job, or ``None`` where the lease was lost.
        """
        if len(jobs) < 2 or len({job.queue for job in jobs}) > 1:
            return ack_each(self.ack, jobs)
        queue = jobs[0].queue
        results: list[Job | None] = []
        for at in range(0, len(jobs), _STEP):
            batch = jobs[at : at + _STEP]
            now = self.clock.time()
            pairs = [value for job in batch for value in (job.id, job.lease_token or "")]
            keys, prefix = self._keys(queue)
            with _unavailable():
                replies = self._scripts["ack_many"](keys=keys, args=[prefix, _number(now), *pairs])
            results.extend(
                job.completed(now) if int(reply) == 1 else None
                for job, reply in zip(batch, replies, strict=True)
            )
        return results

    def fail(self, job: Job, error: JobError, *, retry_at: float | None) -> Job:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter when ``None``.

        Args:
            job: the job as claimed.
            error: what went wrong.
            retry_at: when to try again, or ``None`` to dead-letter it.

        Returns:
            The job, retrying or dead.

        Raises:
            LeaseLost: the lease lapsed or the token is stale.
        """
        reply = self._run(
            "fail",
            job.queue,
            job.id,
            job.lease_token or "",
            json.dumps(error.to_dict()),
            "" if retry_at is None else _number(retry_at),
        )
        if int(reply[0]) != 1:
            raise LeaseLost(job.id, queue=job.queue)
        return _job(job.queue, reply[1])

    def release(self, job: Job) -> None:
        """Give a claimed job back unfinished (shutdown): its attempt is not counted.

        Args:
            job: the job as claimed; nothing happens unless it is still held with its token.
        """
        self._run("release", job.queue, job.id, job.lease_token or "")

    def get(self, queue: str, job_id: str) -> Job | None:
        """The job, or ``None``.

        Args:
            queue: the queue.
            job_id: the job's id.

        Returns:
            The job, with its history, or ``None`` if there is no such job.
        """
        with _unavailable():
            fields = self.client.hgetall(self.job_key(queue, job_id))
        return _job(queue, fields) if fields else None

    def stats(self, queue: str) -> QueueStats:
        """Counts per state and the oldest ready job's age, read in one script.

        Args:
            queue: the queue.

        Returns:
            The counts; ``delayed`` are waiting jobs whose ``run_at`` is still ahead.
        """
        now = self.clock.time()
        reply = self._run("stats", queue)
        waiting, delayed, running, retrying, dead, completed = (int(n) for n in reply[:6])
        oldest = _text(reply[6])
        return QueueStats(
            waiting=waiting,
            delayed=delayed,
            running=running,
            retrying=retrying,
            dead=dead,
            completed=completed,
            oldest_waiting_age=now - float(oldest) if oldest else 0.0,
        )

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[Job]:
        """Dead jobs, most recently dead first.

        Args:
            queue: the queue.
            limit: how many at most.

        Returns:
            The dead jobs.
        """
        if limit <= 0:
            return []
        return [_job(queue, fields) for fields in self._run("dead_letters", queue, str(limit))]

    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Put dead jobs (all, or these) back to waiting with fresh attempts (history kept).

        Args:
            queue: the queue.
            job_ids: the jobs to requeue; ``None`` for every dead job.

        Returns:
            How many were requeued.
        """
        return self._by_ids("requeue_dead", queue, job_ids)

    def purge_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs (all, or these).

        Args:
            queue: the queue.
            job_ids: the jobs to delete; ``None`` for every dead job.

        Returns:
            How many were deleted.
        """
        return self._by_ids("purge_dead", queue, job_ids)

    def _by_ids(self, script: str, queue: str, job_ids: Sequence[str] | None) -> int:
        """Run a dead-letter script over ids in steps of at most :data:`_STEP` jobs."""
        done = 0
        if job_ids is None:  # every dead job: as many steps as there were dead jobs at the start
            for _ in range(self.stats(queue).dead // _STEP + 1):
                count = int(self._run(script, queue, "1"))
                done += count
                if count < _STEP:
                    break
            return done
        for start in range(0, len(job_ids), _STEP):
            done += int(self._run(script, queue, "0", *job_ids[start : start + _STEP]))
        return done

    def cleanup(self, queue: str, *, older_than: float) -> int:
        """Delete completed and dead jobs that finished more than ``older_than`` seconds ago.

        Deletes in batches of 1,000 (one script each), so Redis is never blocked for long.

        Args:
            queue: the queue.
            older_than: the age in seconds.

        Returns:
            How many were deleted.
        """
        cutoff = _number(self.clock.time() - older_than)
        total = 0
        while True:
            deleted = int(self._run("cleanup", queue, cutoff, str(_CLEANUP_BATCH)))
            total += deleted
            if deleted < _CLEANUP_BATCH:
                return total

    def close(self) -> None:
        """Close the client if this backend created it (``owns_client``)."""
        if self.owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"RedisBackend(key_prefix={self.key_prefix!r})"
