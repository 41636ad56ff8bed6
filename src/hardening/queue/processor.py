"""``QueueProcessor``: subclass it, implement ``process(job)``, and run workers.

The retry policy (when is the next attempt, or is the job dead) is pure and written once; the
thread driver (``run``, for plain ``def process``) and the asyncio driver (``arun``, for
``async def process``) only do I/O. Backend calls from the asyncio driver run in worker threads,
so the event loop never blocks on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from hardening._backoff import Backoff
from hardening._clock import Clock, SystemClock, to_seconds
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    JobRejected,
    JobTimedOut,
    LeaseLost,
)
from hardening.queue._inflight import CANCEL_GRACE, RECOVER_EVERY, Held, Idle, Outcome
from hardening.queue.backends.base import RecoveringBackend
from hardening.queue.job import Job, JobError, NewJob, QueueStats, encode_payload, new_job_id
from hardening.queue.options import QueueOptions, backend_from_url, next_run_at

if TYPE_CHECKING:
    from hardening.metrics import Metrics
    from hardening.queue.backends.base import QueueBackend
    from hardening.ratelimit import RateLimiter

__all__ = ["QueueOptions", "QueueProcessor", "backend_from_url", "next_run_at"]

logger = logging.getLogger("hardening.queue")

_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "hardening_queue_session", default=None
)


class QueueProcessor:
    """Base class of a job queue's workers: subclass and implement :meth:`process`.

    Options are class attributes, overridable per instance by keyword argument:
    ``queue`` (name), ``max_attempts`` (3: the job's own failures), ``max_lost`` (3:
    attempts lost with a crashed worker, counted apart, so that a job killing its worker does
    not cost its innocent neighbours their attempts; a job that lost one runs alone next
    time), ``backoff`` (a :class:`~hardening.Backoff` or base
    seconds: exponential with full jitter), ``lease`` (30 s a claim lasts unless renewed),
    ``heartbeat`` (10 s between renewals, from a separate thread, so CPU-bound jobs keep their
    lease), ``concurrency`` (1), ``rate_limit`` (queue-global, e.g. ``"100/second"``),
    ``retention`` (finished jobs kept 7 days), ``poll_interval`` (0.5 s idle wait),
    ``shutdown_grace`` (30 s for in-flight jobs at shutdown), ``max_payload_bytes`` (1 MiB),
    ``timeout`` (``None``: an attempt may run for ever; seconds: an attempt that runs longer
    fails with :class:`~hardening.JobTimedOut` and is retried by the backoff policy, its
    late result discarded. ``async def`` handlers are cancelled; a thread cannot be, so its
    slot stays busy until the handler returns), ``transactional`` (``False``; on a SQL
    backend, ``True`` runs each job in a database transaction: ``process`` writes through
    :attr:`session`, and those writes commit together with the job's ack or not at all --
    a job whose lease lapsed meanwhile has its writes rolled back: effectively once).

    A plain ``def process`` runs in worker threads (:meth:`run`); an ``async def process``
    runs on the event loop (:meth:`arun`). Delivery is at least once: a job whose worker dies
    is re-delivered when its lease lapses, and that lost attempt counts toward
    ``max_attempts``, so a poison job always ends in the dead letters.

    When the store is unavailable (:class:`~hardening.BackendUnavailable`) a worker keeps
    going: its idle wait doubles from ``poll_interval`` up to 30 s while claims fail, and a
    job that finishes meanwhile stays leased (the heartbeats renew it) until its outcome --
    completed, or failed with its own error -- is stored on a later pass, so an outage
    shorter than the lease neither runs a finished job again nor loses its outcome.

    Args:
        backend: a :class:`~hardening.queue.QueueBackend` or a URL for :func:`backend_from_url`.
        clock: the clock for backoff and metrics (give the backend the same one in tests).
        metrics: a registry to report depth, durations and outcomes into.
        rate_limit_storage: where ``rate_limit`` is counted: by default the Redis backend's
            client, or the process for the memory backend; any other backend (SQL) needs one
            (a Redis URL shared by every worker, or ``"memory://"`` for a per-process limit).
        **options: any option above.

    Raises:
        ConfigurationError: an unknown or invalid option, or a ``rate_limit`` on a SQL
            backend without ``rate_limit_storage``.
    """

    queue: ClassVar[str] = "default"
    max_attempts: ClassVar[int] = 3
    backoff: ClassVar[Backoff | float | timedelta] = Backoff(base=1.0, factor=2.0, cap=300.0)
    lease: ClassVar[float | timedelta] = 30.0
    heartbeat: ClassVar[float | timedelta] = 10.0
    concurrency: ClassVar[int] = 1
    rate_limit: ClassVar[str | None] = None
    retention: ClassVar[float | timedelta] = 7 * 86400.0
    poll_interval: ClassVar[float | timedelta] = 0.5
    shutdown_grace: ClassVar[float | timedelta] = 30.0
    timeout: ClassVar[float | timedelta | None] = None
    max_lost: ClassVar[int] = 3
    transactional: ClassVar[bool] = False
    max_payload_bytes: ClassVar[int] = 1 << 20
    metrics_interval: ClassVar[float] = 10.0

    def __init__(
        self,
        backend: QueueBackend | str = "memory://",
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        rate_limit_storage: object | None = None,
        **options: Any,
    ) -> None:
        self.options = QueueOptions.resolve(type(self), options)
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        self.queue_name = self.options.queue
        self.backend: QueueBackend = (
            backend_from_url(backend, clock=clock) if isinstance(backend, str) else backend
        )
        self._limiter = self._make_limiter(self.options.rate_limit, rate_limit_storage)
        if self.options.transactional:
            self._check_transactional()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._async = inspect.iscoroutinefunction(self.process)
        self._last_report = -math.inf
        self._last_claim = -math.inf
        self._last_recover = -math.inf
        self._recover_skipped = False  # the last claim left lapsed leases for later
        self._isolating = False  # a suspect job runs alone: no claims until this worker idles

    def _check_transactional(self) -> None:
        from hardening.queue.backends.sql import SQLBackend

        if not isinstance(self.backend, SQLBackend):
            raise ConfigurationError(
                f"transactional processors need a SQL backend, not {type(self.backend).__name__}"
                " (a Redis or memory ack cannot join a database transaction)"
            )
        if inspect.iscoroutinefunction(self.process):
            raise ConfigurationError(
                "transactional processors run a plain def process (in a worker thread)"
            )

    def _make_limiter(self, rate: str | None, storage: object | None) -> RateLimiter | None:
        if rate is None:
            return None
        from hardening.ratelimit import RateLimiter

        if storage is None:
            from hardening.queue.backends.memory import MemoryBackend

            client = getattr(self.backend, "client", None)
            if client is not None and hasattr(client, "register_script"):
                storage = client  # the Redis backend's own Redis: shared by every worker
            elif isinstance(self.backend, MemoryBackend):
                storage = "memory://"  # one process holds the whole queue
            else:
                raise ConfigurationError(
                    f"rate_limit={rate!r} is queue-wide, but {type(self.backend).__name__} "
                    "gives the workers no shared place to count it: pass "
                    "rate_limit_storage='redis://…' (or 'memory://' to limit each process "
                    "on its own)"
                )
        return RateLimiter(
            rate,
            storage=storage,
            key_prefix="hardening:queue",
            clock=self.clock,
            on_backend_error="local",
            strategy="moving-window",
        )

    # --- to override ---------------------------------------------------------------------

    def process(self, job: Job) -> object:
        """Do the job's work (override; ``def`` or ``async def``). Raise to fail the attempt.

        Args:
            job: the claimed job; its ``payload`` is the enqueued JSON.

        Returns:
            Anything; it is ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement process(job)")

    def on_success(self, job: Job) -> None:
        """Called after a job completed (exceptions here are logged, never raised)."""

    def on_failure(self, job: Job, exc: BaseException) -> None:
        """Called after each failed attempt, including the last one."""

    def on_dead(self, job: Job, exc: BaseException) -> None:
        """Called when a job is dead-lettered (for alerting)."""

    # --- producing -----------------------------------------------------------------------

    def enqueue(
        self,
        payload: object,
        *,
        priority: int = 0,
        delay: float | timedelta = 0,
        dedupe_key: str | None = None,
        timeout: float | timedelta | None = None,
        session: object | None = None,
    ) -> Job:
        """Add a job to this processor's queue.

        Args:
            payload: JSON-serialisable data (object keys must be strings).
            priority: higher runs first.
            delay: seconds (or a timedelta) before it may run.
            dedupe_key: while a job with this key is waiting, return it instead of adding one
                (e.g. ``f"reindex:page:{page_id}"``).
            timeout: seconds (or a timedelta) each attempt of this job may run, instead of
                the processor's ``timeout``: an overrunning attempt fails (and is retried by
                the backoff policy) and whatever its handler returns later is discarded.
            session: with ``SQLBackend``, a SQLAlchemy session whose transaction the insert
                joins: the job is committed with the caller's change, or not at all.

        Returns:
            The job (the existing one when deduplicated).

        Raises:
            JobRejected: the payload is not JSON-serialisable or too large, or an option is bad.
        """
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 10**6:
            raise JobRejected(
                f"priority must be an int within ±1,000,000, not {priority!r}",
                queue=self.queue_name,
            )
        try:
            wait = to_seconds(delay, name="delay")
            limit = None if timeout is None else to_seconds(timeout, name="timeout")
        except ConfigurationError as exc:
            raise JobRejected(str(exc), queue=self.queue_name) from exc
        if limit is not None and not 0 < limit < float("inf"):
            raise JobRejected(
                f"timeout must be a positive number of seconds, not {timeout!r}",
                queue=self.queue_name,
            )
        if dedupe_key is not None and (not isinstance(dedupe_key, str) or len(dedupe_key) > 200):
            raise JobRejected(
                "dedupe_key must be a string of at most 200 characters", queue=self.queue_name
            )
        text = encode_payload(
            payload, queue=self.queue_name, max_bytes=self.options.max_payload_bytes
        )
        now = self._store_now()
        new = NewJob(
            id=new_job_id(),
            queue=self.queue_name,
            payload_json=text,
            priority=priority,
            run_at=now + wait,
            created_at=now,
            max_attempts=self.options.max_attempts,
            dedupe_key=dedupe_key,
            timeout=limit,
        )
        return self.backend.enqueue(new, session=session)

    # --- operating -----------------------------------------------------------------------

    def stats(self) -> QueueStats:
        """Counts per state and the oldest waiting job's age."""
        return self.backend.stats(self.queue_name)

    def dead_letters(self, *, limit: int = 100) -> list[Job]:
        """Dead-lettered jobs, most recent first."""
        return self.backend.dead_letters(self.queue_name, limit=limit)

    def requeue_dead(self, job_ids: Sequence[str] | None = None) -> int:
        """Put dead jobs (all, or these) back to waiting with fresh attempts."""
        return self.backend.requeue_dead(self.queue_name, job_ids)

    def purge_dead(self, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs (all, or these)."""
        return self.backend.purge_dead(self.queue_name, job_ids)

    def cleanup(self, older_than: float | timedelta | None = None) -> int:
        """Delete finished (completed or dead) jobs older than ``older_than`` (default: retention).

        Returns:
            How many were deleted.
        """
        age = (
            self.options.retention
            if older_than is None
            else to_seconds(older_than, name="older_than")
        )
        return self.backend.cleanup(self.queue_name, older_than=age)

    def stop(self) -> None:
        """Ask running workers to stop: no new claims; in-flight jobs get ``shutdown_grace``."""
        self._stop.set()

    # --- one attempt (shared by both drivers) --------------------------------------------

    def _wait_for_rate_limit(self) -> None:
        if self._limiter is None:
            return
        while not self._stop.is_set():
            decision = self._limiter.hit(self.queue_name)
            if decision.allowed:
                return
            self.clock.sleep(min(decision.retry_after or 0.01, 1.0))

    def _store_now(self) -> float:
        """Now on the backend's clock (the store's by default), which delays count from."""
        clock: Clock = getattr(self.backend, "clock", self.clock)
        return clock.time()

    def _failed(self, job: Job, exc: BaseException, duration: float) -> None:
        """Record a failed attempt (retry or dead letter); an outage raises BackendUnavailable."""
        retry_at = next_run_at(job, self._store_now(), self.options.backoff)
        try:
            failed = self.backend.fail(job, JobError.from_exception(exc), retry_at=retry_at)
        except LeaseLost:
            logger.warning("job %s failed after its lease was lost; not recorded", job.id)
            self._count(job, "lost", duration)
            return
        self._count(job, "dead" if retry_at is None else "failed", duration)
        _guard(self.on_failure, failed, exc)
        if retry_at is None:
            logger.error(
                "job %s dead-lettered after %d attempts", job.id, job.attempts, exc_info=exc
            )
            if self.metrics is not None:
                self.metrics.job_dead_lettered(self.queue_name)
            _guard(self.on_dead, failed, exc)

    def _count(self, job: Job, outcome: str, duration: float) -> None:
        if self.metrics is not None:
            self.metrics.job_finished(self.queue_name, outcome, duration)

    def _report_depth(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.metrics is None or (
            not force and now - self._last_report < self.options.metrics_interval
        ):
            return
        self._last_report = now
        try:
            stats = self.stats()
        except Exception:
            logger.warning("could not read queue stats for metrics", exc_info=True)
            return
        for state in ("waiting", "delayed", "running", "retrying", "dead", "completed"):
            self.metrics.queue_depth(self.queue_name, state, getattr(stats, state))
        self.metrics.queue_oldest_age(self.queue_name, stats.oldest_waiting_age)

    def _run_sync_job(self, job: Job, held: Held) -> None:
        start = time.perf_counter()
        try:
            self._wait_for_rate_limit()
            if self.options.transactional:
                self._run_in_transaction(job, held, start)
                return
            self.process(job)
        except Exception as exc:
            held.finished(Outcome(job, time.perf_counter() - start, exc))
        except BaseException:
            held.drop(job)
            raise
        else:
            held.finished(Outcome(job, time.perf_counter() - start, None))

    def _run_in_transaction(self, job: Job, held: Held, start: float) -> None:
        """``transactional``: the handler's writes and the ack commit together, or neither.

        The ack is the transaction's last statement and checks the lease: a lease that lapsed
        meanwhile (another worker may now run the job) rolls the handler's writes back.
        """
        from sqlalchemy.orm import Session

        engine = self.backend.engine  # type: ignore[attr-defined]
        with Session(engine) as session:
            token = _SESSION.set(session)
            try:
                with session.begin():
                    self.process(job)
                    done: Job = self.backend.ack(job, session=session)  # type: ignore[call-arg]
            except LeaseLost:
                held.drop(job)
                self._count(job, "lost", time.perf_counter() - start)
                logger.warning(
                    "job %s: its lease lapsed before its transaction committed; its writes "
                    "were rolled back and it runs again",
                    job.id,
                )
                return
            except BackendUnavailable:
                held.drop(job)  # committed or not, nobody can tell: at worst its lease lapses
                logger.warning("job %s: the database failed at commit", job.id, exc_info=True)
                return
            finally:
                _SESSION.reset(token)
        held.drop(job)
        self._count(done, "completed", time.perf_counter() - start)
        _guard(self.on_success, done)

    @property
    def session(self) -> Any:
        """The SQLAlchemy ``Session`` of the running job's transaction (``transactional``).

        What ``process`` writes through it commits together with the job's ack, or not at
        all: effectively once.

        Raises:
            ConfigurationError: outside ``process`` of a ``transactional`` processor.
        """
        session = _SESSION.get()
        if session is None:
            raise ConfigurationError(
                "QueueProcessor.session exists only inside process() of a transactional "
                "processor (transactional = True, on a SQL backend)"
            )
        return session

    def _record(self, held: Held) -> None:
        """Store the outcomes of finished attempts: failures one by one, then one batch of acks.

        A job stays held, its lease renewed by the heartbeats, until its outcome is stored.
        While the store is unavailable the outcomes wait for the next pass instead of being
        dropped: a job that finished during an outage is recorded as soon as the store
        answers, rather than run again once its lease lapses.
        """
        batch = held.take_outcomes()
        failures = [o for o in batch if o.error is not None]
        completed = [o for o in batch if o.error is None]
        try:
            while failures:
                self._record_failure(failures[0])
                del failures[0]
            if completed:
                self._acked(completed)
        except BackendUnavailable as exc:  # nothing after it was stored: all of it next pass
            unrecorded = failures + completed
            held.keep(unrecorded)
            logger.warning("recording %d finished jobs failed; retrying (%s)", len(unrecorded), exc)

    def _record_failure(self, outcome: Outcome) -> None:
        """Record one failed attempt; an outage raises BackendUnavailable."""
        if outcome.error is None:
            return
        try:
            self._failed(outcome.job, outcome.error, outcome.duration)
        except BackendUnavailable:
            raise
        except Exception:  # not an outage: the lease lapses and the job runs again
            logger.warning(
                "recording the failure of job %s failed; it runs again once its lease lapses",
                outcome.job.id,
                exc_info=True,
            )

    def _acked(self, completed: list[Outcome]) -> None:
        """Ack completed jobs in one round trip; an outage raises BackendUnavailable."""
        try:
            results = self.backend.ack_many([o.job for o in completed])
        except BackendUnavailable:
            raise
        except Exception:  # not an outage: the leases lapse and the jobs run again
            logger.warning(
                "acking %d jobs failed; they will be re-delivered", len(completed), exc_info=True
            )
            return
        for outcome, done in zip(completed, results, strict=True):
            if done is None:
                logger.warning(
                    "job %s finished after its lease was lost; not acked", outcome.job.id
                )
                self._count(outcome.job, "lost", outcome.duration)
            else:
                self._count(outcome.job, "completed", outcome.duration)
                _guard(self.on_success, done)

    def _leftovers(self, held: Held) -> list[Job]:
        """At shutdown: the held jobs still running, which the caller releases.

        Outcomes the store never took are left to lapse: releasing a finished job would run it
        again at once.
        """
        unrecorded = held.waiting_outcomes()
        if unrecorded:
            logger.warning(
                "%d finished jobs could not be recorded before shutdown; they run again once "
                "their leases lapse",
                unrecorded,
            )
        return held.running()

    # --- the thread driver ---------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Work until :meth:`stop` (or SIGTERM/SIGINT): claim, process, ack; blocking.

        On stop, no new jobs are claimed and in-flight jobs get ``shutdown_grace`` seconds,
        their leases renewed meanwhile. A job whose handler is still running then is never
        handed back (another worker would start it while it runs): its lease lapses and it
        runs again elsewhere, its attempt counted as lost. (The asyncio driver cancels
        ``async def`` handlers after the grace and hands back the jobs whose handlers
        stopped.)

        Args:
            install_signal_handlers: handle SIGTERM and SIGINT (main thread only).
        """
        if self._async:
            asyncio.run(self.arun(install_signal_handlers=install_signal_handlers))
            return
        with self._signals(install_signal_handlers):
            self._run_threads(until_empty=False)

    def run_until_empty(self) -> int:
        """Process jobs until none is ready now; for tests and cron.

        Delayed jobs and jobs backing off before a retry stay in the queue.

        Returns:
            How many attempts were made.
        """
        if self._async:
            return asyncio.run(self.arun_until_empty())
        return self._run_threads(until_empty=True)

    @contextlib.contextmanager
    def _signals(self, install: bool) -> Iterator[None]:
        if not install or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, lambda *_: self.stop())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_threads(self, *, until_empty: bool) -> int:
        # ``_stop`` is cleared when a run ends, not when it starts: a stop() that comes
        # before the worker thread gets here must not be lost
        held = Held()
        self._last_recover = -math.inf  # a run's first claim recovers
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeats,
            args=(held, beat_stop),
            daemon=True,
            name=f"hardening-heartbeat-{self.queue_name}",
        )
        beat.start()
        pool = ThreadPoolExecutor(
            self.options.concurrency, thread_name_prefix=f"hardening-{self.queue_name}"
        )
        futures: set[Future[None]] = set()
        attempts = 0
        idle = Idle(self.options.poll_interval)
        try:
            while not self._stop.is_set():
                self._report_depth()
                futures = {f for f in futures if not f.done()}
                free = self.options.concurrency - len(futures)
                claim = self._should_claim(free, len(futures))
                deadline = self._expire(held)
                if claim or not futures or deadline == 0.0:  # record at the claims' pace
                    self._record(held)
                jobs = self._claim(free, idle) if claim else []
                for job in jobs:
                    held.add(job)
                    futures.add(pool.submit(self._run_sync_job, job, held))
                attempts += len(jobs)
                if jobs:
                    continue
                if until_empty and not futures:
                    if self._drained():
                        break
                    continue  # the skipped recovery runs at the next claim, with no wait
                if futures:
                    pause = idle.next() if deadline is None else min(idle.next(), deadline)
                    wait(futures, timeout=pause, return_when=FIRST_COMPLETED)
                else:
                    self._stop.wait(idle.next())
        finally:
            # the heartbeats go on renewing the leases while the handlers finish
            wait(futures, timeout=self.options.shutdown_grace)
            self._record(held)
            for job in self._leftovers(held):
                # a thread cannot be stopped: handing its job back would let another worker
                # start it while this handler still runs. Its lease lapses instead.
                logger.warning(
                    "job %s still running after the %.0f s shutdown grace; left leased, it "
                    "runs again elsewhere once its lease lapses",
                    job.id,
                    self.options.shutdown_grace,
                )
            beat_stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._report_depth(force=True)
            self._stop.clear()
        return attempts

    def _expire(self, held: Held) -> float | None:
        """Fail overdue attempts (``timeout``); seconds to the next deadline, 0.0 if any failed.

        Each job's own timeout (set at enqueue) comes first, then the processor's. ``None``
        when no running attempt has a deadline.
        """
        expired, nearest = held.overdue(self.options.timeout, self.queue_name)
        for job, timeout in expired:
            logger.warning(
                "job %s ran longer than its %g s timeout: failed (retried by the backoff "
                "policy); whatever its handler returns later is discarded",
                job.id,
                timeout,
            )
        return 0.0 if expired else nearest

    def _should_claim(self, free: int, busy: int) -> bool:
        # Claim in batches (half the slots or more) rather than a round trip per job, but
        # never leave a free slot idle longer than the poll interval.
        if busy == 0:
            self._isolating = False  # the suspect (or the jobs it waited for) are done
        if free <= 0 or self._isolating:
            return False
        now = time.monotonic()
        if busy == 0 or free * 2 >= self.options.concurrency:
            self._last_claim = now
            return True
        if now - self._last_claim >= self.options.poll_interval:
            self._last_claim = now
            return True
        return False

    def _recover(self) -> None:
        """Recover a crashed worker's jobs before claiming, and report each one.

        At the first claim of a run, then at most every ``RECOVER_EVERY`` seconds: leases last
        tens of seconds, and a busy worker claims hundreds of times a second.

        Every death gets its hooks and metrics whichever process discovers it: the lost
        attempt is counted (``lost``), ``on_failure`` runs with a :class:`~hardening.LeaseLost`,
        and a job out of attempts is dead-lettered with ``on_dead`` and the dead-letter count.
        """
        backend = self.backend
        if not isinstance(backend, RecoveringBackend):
            return
        now = time.monotonic()
        self._recover_skipped = now - self._last_recover < RECOVER_EVERY
        if self._recover_skipped:
            return
        self._last_recover = now
        try:
            recovered = backend.recover(self.queue_name, max_lost=self.options.max_lost)
        except Exception:  # the claim that follows meets the same trouble and reports it
            return
        for job in recovered:
            exc = LeaseLost(job.id, queue=job.queue)
            self._count(job, "lost", 0.0)
            _guard(self.on_failure, job, exc)
            if job.state == "dead":
                logger.error(
                    "job %s dead-lettered after %d attempts, the last lost with its worker",
                    job.id,
                    job.attempts,
                )
                if self.metrics is not None:
                    self.metrics.job_dead_lettered(self.queue_name)
                _guard(self.on_dead, job, exc)
            else:
                logger.warning("job %s lost its worker; it runs again", job.id)

    def _drained(self) -> bool:
        """For ``run_until_empty``, once a claim found nothing and nothing runs: done?

        Not while that claim skipped recovering lapsed leases (paced): the next one recovers.
        """
        if not self._recover_skipped:
            return True
        self._recover_skipped = False
        self._last_recover = -math.inf
        return False

    def _claim(self, free: int, idle: Idle) -> list[Job]:
        backend = self.backend
        try:
            if isinstance(backend, RecoveringBackend):  # every recovery with our lost budget
                self._recover()
                jobs = backend.claim(
                    self.queue_name,
                    worker=self.worker_id,
                    limit=free,
                    lease=self.options.lease,
                    recover=False,
                )
            else:
                jobs = backend.claim(
                    self.queue_name, worker=self.worker_id, limit=free, lease=self.options.lease
                )
        except Exception:
            logger.warning(
                "claiming from queue %r failed; retrying", self.queue_name, exc_info=True
            )
            idle.failed()
            return []
        idle.reset()  # the backend answered: back to the normal poll interval
        return self._isolate(jobs, busy=free < self.options.concurrency)

    def _isolate(self, jobs: list[Job], *, busy: bool) -> list[Job]:
        """Run a suspect job alone, so that a job that kills its worker kills only itself.

        A suspect lost an attempt with a crashed worker: it may be the job that crashed it,
        or an innocent that was in flight beside it. Idle, this worker keeps one suspect and
        claims nothing else until it ends; busy, it hands suspects back (they wait for an
        idle worker) and claims no more until its jobs are done. Hand-backs count no attempt.
        """
        suspects = [job for job in jobs if job.lost]
        if not suspects:
            return jobs
        keep = [job for job in jobs if not job.lost] if busy else suspects[:1]
        for job in jobs:
            if job not in keep:
                try:
                    self.backend.release(job)
                except Exception:  # its lease lapses instead: one lost attempt more
                    logger.warning("could not hand back job %s", job.id, exc_info=True)
        self._isolating = True
        return keep

    def _heartbeats(self, held: Held, stop: threading.Event) -> None:
        while not stop.wait(self.options.heartbeat):
            self._beat(held)

    def _beat(self, held: Held) -> None:
        jobs = held.jobs()
        if not jobs:
            return
        try:
            renewed = self.backend.heartbeat(self.queue_name, jobs, self.options.lease)
        except Exception:
            logger.warning("heartbeat failed; leases may lapse", exc_info=True)
            return
        # a job recorded meanwhile is no longer held: not a lost lease
        lost = [job.id for job in jobs if job.id not in renewed and held.holds(job.id)]
        for job_id in lost:
            logger.warning("lost the lease on job %s (it may run again elsewhere)", job_id)

    # --- the asyncio driver --------------------------------------------------------------

    async def arun(self, *, install_signal_handlers: bool = True) -> None:
        """The asyncio worker; stops on :meth:`stop`, SIGTERM or SIGINT.

        ``async def process`` runs on this loop, ``concurrency`` at a time; backend calls run
        in threads.

        Args:
            install_signal_handlers: handle SIGTERM and SIGINT (main thread only).
        """
        loop = asyncio.get_running_loop()
        installed = []
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        try:
            await self._run_tasks(until_empty=False)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def arun_until_empty(self) -> int:
        """The asyncio twin of :meth:`run_until_empty`."""
        return await self._run_tasks(until_empty=True)

    async def _run_async_job(self, job: Job, held: Held) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self._wait_for_rate_limit)
            work = self.process(job) if self._async else asyncio.to_thread(self.process, job)
            timeout = self.options.timeout if job.timeout is None else job.timeout
            try:
                await asyncio.wait_for(work, timeout)  # type: ignore[arg-type]
            except asyncio.TimeoutError as exc:
                if timeout is None or time.perf_counter() - start < timeout:
                    raise  # the handler's own timeout, not ours
                # a coroutine handler was cancelled; a sync one goes on in its thread, unheard
                logger.warning("job %s ran longer than its %g s timeout: failed", job.id, timeout)
                raise JobTimedOut(job.id, timeout, queue=self.queue_name) from exc
        except Exception as exc:
            held.finished(Outcome(job, time.perf_counter() - start, exc))
        except asyncio.CancelledError:
            if self._async:  # the handler itself stopped: its job may be handed back
                held.stopped(job)
            # a sync handler goes on in its thread: the job stays held, never handed back
            raise
        except BaseException:
            held.drop(job)
            raise
        else:
            held.finished(Outcome(job, time.perf_counter() - start, None))

    async def _run_tasks(self, *, until_empty: bool) -> int:
        held = Held()
        self._last_recover = -math.inf  # a run's first claim recovers
        tasks: set[asyncio.Task[None]] = set()
        attempts = 0
        idle = Idle(self.options.poll_interval)

        async def beats() -> None:
            while True:
                await asyncio.sleep(self.options.heartbeat)
                await asyncio.to_thread(self._beat, held)

        beater = asyncio.create_task(beats())
        try:
            while not self._stop.is_set():
                await asyncio.to_thread(self._report_depth)
                tasks = {t for t in tasks if not t.done()}
                free = self.options.concurrency - len(tasks)
                claim = self._should_claim(free, len(tasks))
                if (claim or not tasks) and held.waiting_outcomes():
                    await asyncio.to_thread(self._record, held)
                jobs = await asyncio.to_thread(self._claim, free, idle) if claim else []
                for job in jobs:
                    held.add(job)
                    tasks.add(asyncio.create_task(self._run_async_job(job, held)))
                attempts += len(jobs)
                if jobs:
                    continue
                if until_empty and not tasks:
                    if self._drained():
                        break
                    continue  # the skipped recovery runs at the next claim, with no wait
                if tasks:
                    await asyncio.wait(
                        tasks, timeout=idle.next(), return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    await asyncio.sleep(idle.next())
        finally:
            if tasks:
                await asyncio.wait(tasks, timeout=self.options.shutdown_grace)
            running = [task for task in tasks if not task.done()]
            for task in running:  # past the grace: stop the handlers first...
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=CANCEL_GRACE)
            await asyncio.to_thread(self._record, held)
            stopped = held.stopped_ids()
            for job in self._leftovers(held):
                if job.id not in stopped:  # a sync handler in its thread, or one that ignored
                    logger.warning(  # its cancellation: another worker must not start it now
                        "job %s still running at shutdown; left leased, it runs again "
                        "elsewhere once its lease lapses",
                        job.id,
                    )
                    continue
                # ...then hand back the jobs whose handlers have stopped: none still runs
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.backend.release, job)
                logger.warning("released job %s, cancelled at shutdown", job.id)
            beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beater
            self._stop.clear()
        return attempts

    def close(self) -> None:
        """Close the backend if this processor built it from a URL."""
        self.backend.close()

    def __repr__(self) -> str:
        backend = type(self.backend).__name__
        return f"{type(self).__name__}(queue={self.queue_name!r}, backend={backend})"


def _guard(hook: Callable[..., object], *args: object) -> None:
    try:
        hook(*args)
    except Exception:
        logger.exception("queue hook %s failed", getattr(hook, "__name__", hook))
