"""SQL queue backend: PostgreSQL (many workers, ``FOR UPDATE SKIP LOCKED``) and SQLite (one node).

One table, every state change one conditional statement: a claim is ``UPDATE … WHERE id IN
(SELECT … ORDER BY priority DESC, run_at LIMIT n FOR UPDATE SKIP LOCKED) RETURNING …``, so
concurrent workers never claim the same job and never wait on each other's rows; ack and fail
check the lease token and expiry in their ``WHERE`` and append the attempt to the JSON history
in the same statement. Partial indexes keep the hot paths small however many finished jobs the
table keeps. With ``enqueue(..., session=s)`` the insert joins the caller's transaction: a job
is committed together with the change that caused it, or not at all.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from hardening._clock import Clock, backend_clock
from hardening._imports import require
from hardening._sql import sql_unavailable, unavailable_from
from hardening.errors import ConfigurationError, LeaseLost
from hardening.queue.backends.base import LEASE_EXPIRED, ack_each
from hardening.queue.job import (
    FINISHED_STATES,
    Attempt,
    Job,
    JobError,
    NewJob,
    QueueStats,
)

require("sqlalchemy", extra="sqlalchemy", feature="the SQL queue backend")

import sqlalchemy as sa  # noqa: E402

__all__ = ["RECOVER_BATCH", "SQLBackend", "jobs_table"]

logger = logging.getLogger("hardening.queue")

_CLEANUP_CHUNK = 5000
RECOVER_BATCH = 1000
"""The most lapsed leases one claim recovers: a statement's work is bounded however many
workers died at once (the rest are recovered by the next claims)."""


# the dedupe index's predicate; ``enqueue`` repeats it, as constants, in ON CONFLICT. Only a
# job that waits and was never claimed holds its key (as on memory and Redis, where a claim
# lets go of it): no state change can enter this set, only an insert, which ON CONFLICT
# guards, so no retry, recovery, release or requeue can ever violate the unique index.
_DEDUPE_WHERE = "state = 'waiting' AND started_at IS NULL AND dedupe_key IS NOT NULL"
# indexes of earlier versions, dropped by create_schema: the dedupe index held retrying jobs
# too (a retry could violate it); the finished index lacked the state (counting dead jobs read
# every finished row)
_OLD_INDEXES = ("{name}_dedupe_idx", "{name}_finished_idx")
_READY = sa.text("state IN ('waiting', 'retrying')")  # the ready index's predicate
FINISHED_COUNT_LIMIT = 10_000
"""``SQLBackend.stats`` counts finished jobs exactly up to this many per state."""
_LOST = '"outcome":"lost"'  # how a lost attempt reads in the stored history JSON
_STORE_NOW = sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")  # PostgreSQL's own time


def jobs_table(
    metadata: sa.MetaData, name: str = "hardening_jobs", *, schema: str | None = None
) -> sa.Table:
    """The jobs table, for your own metadata and migrations (Alembic autogenerate sees it).

    Args:
        metadata: the ``MetaData`` to add it to.
        name: the table's name (e.g. ``"indexing_queue"``).
        schema: the database schema, if not the default.

    Returns:
        The table, with its partial indexes: ready jobs by priority, running jobs by lease
        expiry, finished jobs by state and finish time (``<name>_finished_state_idx``), and
        a unique deduplication key among jobs that wait and were never claimed
        (``<name>_dedupe_waiting_idx``). They replace the earlier ``<name>_finished_idx``
        and ``<name>_dedupe_idx``, which :meth:`SQLBackend.create_schema` drops.
    """
    ready = _READY
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("run_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("dedupe_key", sa.String(200)),
        sa.Column("last_error", sa.Text),
        sa.Column("history", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", sa.Double),
        sa.Column("worker", sa.String(200)),
        sa.Column("timeout", sa.Double),  # seconds per attempt; NULL: the processor's
        schema=schema,
    )
    sa.Index(
        f"{name}_ready_idx",
        table.c.queue,
        table.c.priority.desc(),
        table.c.run_at,
        postgresql_where=ready,
        sqlite_where=ready,
    )
    sa.Index(
        f"{name}_running_idx",
        table.c.queue,
        table.c.lease_expires_at,
        postgresql_where=sa.text("state = 'running'"),
        sqlite_where=sa.text("state = 'running'"),
    )
    finished = sa.text("state IN ('completed', 'dead')")
    sa.Index(
        f"{name}_finished_state_idx",
        table.c.queue,
        table.c.state,
        table.c.finished_at,
        postgresql_where=finished,
        sqlite_where=finished,
    )
    dedupe = sa.text(_DEDUPE_WHERE)
    sa.Index(
        f"{name}_dedupe_waiting_idx",
        table.c.queue,
        table.c.dedupe_key,
        unique=True,
        postgresql_where=dedupe,
        sqlite_where=dedupe,
    )
    return table


class SQLBackend:
    """Jobs in one SQL table (see :func:`jobs_table`), on PostgreSQL or SQLite.

    Args:
        engine: a SQLAlchemy ``Engine`` or URL (a URL makes an engine this backend owns).
        clock: the clock deciding leases and delays. By default, on PostgreSQL, the
            database's own (``clock_timestamp()``, read through the host clock as a measured
            offset), so hosts whose clocks disagree still agree on every lease; SQLite (one
            host) uses the host clock. A clock given here is used as it is (a ``FakeClock`` in
            tests), unless ``store_clock=True``.
        table: the table's name.
        schema: the database schema.
        store_clock: read time from the database through ``clock`` (default: on PostgreSQL,
            only when no clock is given; SQLite never).

    Every method that runs SQL raises :class:`~hardening.BackendUnavailable` (``backend="sql"``)
    when the database cannot be reached, drops the connection or times out, as the Redis
    backend does; other database errors propagate unchanged.

    Raises:
        ConfigurationError: the database is neither PostgreSQL nor SQLite.
    """

    def __init__(
        self,
        engine: sa.Engine | str,
        *,
        clock: Clock | None = None,
        table: str = "hardening_jobs",
        schema: str | None = None,
        store_clock: bool | None = None,
    ) -> None:
        self._owns_engine = isinstance(engine, str)
        self.engine: sa.Engine = sa.create_engine(engine) if isinstance(engine, str) else engine
        dialect = self.engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise ConfigurationError(f"SQLBackend supports PostgreSQL and SQLite, not {dialect}")
        self._postgres = dialect == "postgresql"
        # Every step below is one atomic statement: run it in autocommit, one round trip,
        # rather than BEGIN + statement + COMMIT (same pool, same connections).
        self._single: sa.Engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite lives on this host: its clock is the host's
        store = store_clock if self._postgres else False
        self.clock: Clock = backend_clock(clock, store, self._store_time)
        self.metadata = sa.MetaData()
        self.table = jobs_table(self.metadata, table, schema=schema)
        self._prepare()

    @sql_unavailable
    def _store_time(self) -> float:
        with self._single.connect() as conn:
            return float(conn.execute(_STORE_NOW).scalar_one())

    @sql_unavailable
    def create_schema(self) -> None:
        """Create the table and its indexes if they do not exist, or bring an older one up to date.

        An existing table's dedupe index of earlier versions (``<name>_dedupe_idx``, which
        also covered retrying jobs, so that a retry could violate it) is dropped, and the
        current one created; so is the finished index without the state
        (``<name>_finished_idx``, now ``<name>_finished_state_idx``). Columns added since
        (``timeout``) are added.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        quote = self.engine.dialect.identifier_preparer
        schema = f"{quote.quote_schema(self.table.schema)}." if self.table.schema else ""
        with self.engine.begin() as conn:
            for old in _OLD_INDEXES:
                name = quote.quote(old.format(name=self.table.name))
                conn.execute(sa.text(f"DROP INDEX IF EXISTS {schema}{name}"))
        self.metadata.create_all(self.engine)
        present = {
            column["name"]
            for column in sa.inspect(self.engine).get_columns(
                self.table.name, schema=self.table.schema
            )
        }
        table = quote.format_table(self.table)
        with self.engine.begin() as conn:
            for column in self.table.c:
                if column.name not in present:  # added since: nullable, no default
                    kind = column.type.compile(dialect=self.engine.dialect)
                    conn.execute(
                        sa.text(f"ALTER TABLE {table} ADD COLUMN {quote.quote(column.name)} {kind}")
                    )
            for index in self.table.indexes:  # create_all skips an existing table's indexes
                index.create(conn, checkfirst=True)

    @sql_unavailable
    def drop_schema(self) -> None:
        """Drop the table.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        self.metadata.drop_all(self.engine)

    def close(self) -> None:
        """Dispose of the engine if this backend created it."""
        if self._owns_engine:
            self.engine.dispose()

    # --- rows <-> jobs -----------------------------------------------------------------

    def _job(self, row: Any) -> Job:
        history = tuple(Attempt.from_dict(a) for a in json.loads(row.history or "[]"))
        if row.state == "running":
            history = (*history, Attempt(row.attempts, row.started_at, worker=row.worker or ""))
        return Job(
            id=row.id,
            queue=row.queue,
            payload=json.loads(row.payload),
            priority=row.priority,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            state=row.state,
            created_at=row.created_at,
            run_at=row.run_at,
            finished_at=row.finished_at,
            dedupe_key=row.dedupe_key,
            last_error=JobError.from_dict(json.loads(row.last_error)) if row.last_error else None,
            history=history,
            lease_token=row.lease_token if row.state == "running" else None,
            lease_expires_at=row.lease_expires_at if row.state == "running" else None,
            timeout=row.timeout,
        )

    def _append(self, entry: Attempt | None = None) -> Any:
        """SQL for ``history`` with one more attempt appended (portable string concatenation).

        Without ``entry`` the attempt's JSON is the bind parameter ``attempt``, so the statement
        can be built once and reused.
        """
        history = self.table.c.history
        text: Any = (
            sa.bindparam("attempt", type_=sa.Text)
            if entry is None
            else sa.literal(json.dumps(entry.to_dict(), separators=(",", ":")), sa.Text)
        )
        return sa.case(
            (history == "[]", "[" + text + "]"),
            else_=sa.func.substr(history, 1, sa.func.length(history) - 1) + "," + text + "]",
        )

    def _prepare(self) -> None:
        """Build the hot statements once; calls only bind parameters.

        SQLAlchemy's statement construction costs more Python time than a round trip to a
        local database.
        """
        t = self.table
        holding = sa.and_(
            t.c.id == sa.bindparam("job_id"),
            t.c.state == "running",
            t.c.lease_token == sa.bindparam("p_token"),
            t.c.lease_expires_at > sa.bindparam("p_now"),
        )
        done = {"lease_token": None, "lease_expires_at": None, "history": self._append()}
        finish = sa.update(t).where(holding).returning(t.c.state, t.c.run_at, t.c.finished_at)
        self._ack_stmt = finish.values(state="completed", finished_at=sa.bindparam("p_now"), **done)
        self._dead_stmt = finish.values(
            state="dead",
            finished_at=sa.bindparam("p_now"),
            last_error=sa.bindparam("error_json"),
            **done,
        )
        self._retry_stmt = finish.values(
            state="retrying",
            run_at=sa.bindparam("retry_at"),
            last_error=sa.bindparam("error_json"),
            **done,
        )
        self._lapsed = (
            sa.select(t.c.id)
            .where(
                t.c.queue == sa.bindparam("p_queue"),
                t.c.state == "running",
                t.c.lease_expires_at <= sa.bindparam("p_now"),
            )
            .limit(1)
        )
        self._claims: dict[int, Any] = {}
        self._insert = sa.insert(t)  # values are bound per call
        if self._postgres:
            self._ack_many_stmt = self._batch_ack()

    def _batch_ack(self) -> Any:
        """PostgreSQL: ack a batch in one ``UPDATE … FROM unnest(ids, tokens, attempts)``.

        Three array parameters, so one statement (compiled once, planned once) serves every
        batch size. Each row still needs its own live lease (token and expiry).
        """
        from sqlalchemy.dialects.postgresql import ARRAY

        t = self.table
        acks = (
            sa.func.unnest(
                sa.bindparam("p_ids", type_=ARRAY(sa.String)),
                sa.bindparam("p_tokens", type_=ARRAY(sa.String)),
                sa.bindparam("p_attempts", type_=ARRAY(sa.Text)),
            )
            .table_valued("v_id", "v_token", "v_attempt")
            .render_derived(name="acks")
        )
        history, attempt = t.c.history, sa.cast(acks.c.v_attempt, sa.Text)
        return (
            sa.update(t)
            .where(
                t.c.id == acks.c.v_id,
                t.c.lease_token == acks.c.v_token,
                t.c.state == "running",
                t.c.lease_expires_at > sa.bindparam("p_now"),
            )
            .values(
                state="completed",
                finished_at=sa.bindparam("p_now"),
                lease_token=None,
                lease_expires_at=None,
                history=sa.case(
                    (history == "[]", "[" + attempt + "]"),
                    else_=sa.func.substr(history, 1, sa.func.length(history) - 1)
                    + ","
                    + attempt
                    + "]",
                ),
            )
            .returning(t.c.id, acks.c.v_token)
        )

    def _claim_statement(self, limit: int) -> Any:
        statement = self._claims.get(limit)
        if statement is None:
            t = self.table
            ids = (
                sa.select(t.c.id)
                .where(
                    t.c.queue == sa.bindparam("p_queue"),
                    # the ready index's own predicate, as constants: bound parameters would let
                    # a prepared statement's generic plan miss the partial index (394 ms vs
                    # 12 ms per claim at 500k rows)
                    _READY,
                    t.c.run_at <= sa.bindparam("p_now"),
                )
                .order_by(t.c.priority.desc(), t.c.run_at)  # the ready index's order: no sort
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            statement = (
                sa.update(t)
                .where(t.c.id.in_(ids.scalar_subquery()), _READY)
                .values(
                    state="running",
                    attempts=t.c.attempts + 1,
                    lease_token=sa.bindparam("p_token"),
                    lease_expires_at=sa.bindparam("p_expires"),
                    started_at=sa.bindparam("p_now"),
                    worker=sa.bindparam("p_worker"),
                )
                .returning(*t.c)
            )
            if len(self._claims) < 64:
                self._claims[limit] = statement
        return statement

    # --- producing ---------------------------------------------------------------------

    @sql_unavailable
    def enqueue(self, job: NewJob, *, session: object | None = None) -> Job:
        """Insert a job, or return the waiting one with the same ``dedupe_key``.

        With ``session``, the insert runs in that session's transaction (it commits with it).

        Raises:
            BackendUnavailable: the database could not be reached or timed out (in a
                ``session``, its transaction is then yours to roll back).
        """
        values = {
            "id": job.id,
            "queue": job.queue,
            "payload": job.payload_json,
            "priority": job.priority,
            "state": "waiting",
            "attempts": 0,
            "max_attempts": job.max_attempts,
            "created_at": job.created_at,
            "run_at": job.run_at,
            "dedupe_key": job.dedupe_key,
            "history": "[]",
            "timeout": job.timeout,
        }
        if job.dedupe_key is None:
            if session is not None:
                session.execute(self._insert, values)  # type: ignore[attr-defined]
            else:
                with self._single.connect() as conn:
                    conn.execute(self._insert, values)
            return job.job()
        for _ in range(3):  # the waiting twin may be claimed between our two statements
            # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING
            inserted = self._execute(session, self._insert_unless_waiting(values)).first()
            if inserted is not None:
                return job.job()
            existing = self._execute(
                session,
                sa.select(self.table).where(
                    self.table.c.queue == job.queue,
                    self.table.c.dedupe_key == job.dedupe_key,
                    self.table.c.state == "waiting",
                    self.table.c.started_at.is_(None),
                ),
            ).first()
            if existing is not None:
                return self._job(existing)
        raise ConfigurationError(f"could not enqueue deduplicated job {job.dedupe_key!r}")

    def _insert_unless_waiting(self, values: dict[str, object]) -> Any:
        from sqlalchemy.dialects import postgresql, sqlite

        insert: Any = postgresql.insert if self._postgres else sqlite.insert
        # the index's own predicate, as constants: bound parameters here would let a prepared
        # statement's generic plan (psycopg prepares after 5 runs) match no partial index
        where = sa.text(_DEDUPE_WHERE)
        return (
            insert(self.table)
            .values(**values)
            .on_conflict_do_nothing(
                index_elements=[self.table.c.queue, self.table.c.dedupe_key], index_where=where
            )
        )

    def _execute(self, session: object | None, statement: Any) -> _Buffered:
        if session is not None:
            return _Buffered.of(session.execute(statement))  # type: ignore[attr-defined]
        with self._single.connect() as conn:
            return _Buffered.of(conn.execute(statement))

    # --- claiming ----------------------------------------------------------------------

    @sql_unavailable
    def claim(
        self, queue: str, *, worker: str, limit: int, lease: float, recover: bool = True
    ) -> list[Job]:
        """Recover lapsed leases, then lease up to ``limit`` ready jobs (``SKIP LOCKED``).

        With ``recover=False`` the recovery is skipped (the caller just ran :meth:`recover`).

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        now = self.clock.time()
        if recover:
            self._recover(queue, now)
        if limit <= 0:
            return []
        params = {
            "p_queue": queue,
            "p_now": now,
            "p_token": uuid.uuid4().hex,
            "p_expires": now + lease,
            "p_worker": worker,
        }
        with self._single.connect() as conn:
            rows = conn.execute(self._claim_statement(limit), params).all()
        jobs = [self._job(row) for row in rows]
        jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id))
        return jobs

    @sql_unavailable
    def recover(
        self, queue: str, *, limit: int = RECOVER_BATCH, max_lost: int | None = None
    ) -> list[Job]:
        """Retry or dead-letter up to ``limit`` jobs whose lease lapsed (``claim`` does it too).

        Args:
            queue: the queue.
            limit: how many at most (at most :data:`RECOVER_BATCH`).
            max_lost: dead-letter a job once it lost this many attempts (``None``: once its
                attempts reach ``max_attempts``).

        Returns:
            The recovered jobs as they are now (``retrying`` or ``dead``).

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        ids = self._recover(queue, self.clock.time(), limit, max_lost)
        if not ids:
            return []
        t = self.table
        with self._single.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.id.in_(ids))).all()
        return [self._job(row) for row in rows]

    def _recover(
        self, queue: str, now: float, limit: int = RECOVER_BATCH, max_lost: int | None = None
    ) -> list[str]:
        """Retry or dead-letter lapsed leases: at most :data:`RECOVER_BATCH` per call.

        One statement for the batch; should it fail for anything but an outage (a row the
        database refuses), the batch is redone row by row, each in its own transaction, and a
        row that still fails is logged and skipped: one bad row never stops the claims.
        """
        t = self.table
        where = (t.c.queue == queue, t.c.state == "running", t.c.lease_expires_at <= now)
        with self._single.connect() as conn:  # the common case: nothing lapsed, one query
            if conn.execute(self._lapsed, {"p_queue": queue, "p_now": now}).first() is None:
                return []
        limit = max(0, min(limit, RECOVER_BATCH))
        lapsed = (
            sa.select(t.c.id)
            .where(*where)
            .order_by(t.c.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        error = json.dumps(LEASE_EXPIRED.to_dict())
        try:
            with self.engine.begin() as conn:  # the lapsed rows and their history: one transaction
                return self._recover_in(conn, lapsed, error, now, max_lost)
        except sa.exc.SQLAlchemyError as exc:
            if unavailable_from(exc) is not None:
                raise
            logger.warning("recovering lapsed leases of %r failed; row by row", queue, exc_info=exc)
        with self._single.connect() as conn:
            ids = [row.id for row in conn.execute(sa.select(t.c.id).where(*where).limit(limit))]
        recovered: list[str] = []
        for job_id in ids:
            one = (
                sa.select(t.c.id).where(t.c.id == job_id, *where).with_for_update(skip_locked=True)
            )
            try:
                with self.engine.begin() as conn:
                    recovered += self._recover_in(conn, one, error, now, max_lost)
            except sa.exc.SQLAlchemyError as exc:
                if unavailable_from(exc) is not None:
                    raise
                logger.error(
                    "job %s: its lapsed lease cannot be recovered; skipped", job_id, exc_info=exc
                )
        return recovered

    def _recover_in(
        self, conn: sa.Connection, lapsed: Any, error: str, now: float, max_lost: int | None
    ) -> list[str]:
        t = self.table
        if max_lost is None:
            spent: Any = t.c.attempts >= t.c.max_attempts
        else:  # the attempts lost before, counted in the history text, and this one
            lost_before = (
                sa.func.length(t.c.history)
                - sa.func.length(sa.func.replace(t.c.history, _LOST, ""))
            ) / len(_LOST)
            spent = lost_before + 1 >= max_lost
        rows = conn.execute(
            sa.update(t)
            .where(t.c.id.in_(lapsed.scalar_subquery()), t.c.state == "running")
            .values(
                state=sa.case((spent, "dead"), else_="retrying"),
                finished_at=sa.case((spent, now), else_=None),
                run_at=now,
                last_error=error,
                lease_token=None,
                lease_expires_at=None,
            )
            .returning(t.c.id, t.c.attempts, t.c.started_at, t.c.worker)
        ).all()
        for row in rows:  # rare: record the lost attempt (the rows are ours in this transaction)
            lost = Attempt(
                row.attempts, row.started_at or now, now, "lost", row.worker or "", LEASE_EXPIRED
            )
            conn.execute(sa.update(t).where(t.c.id == row.id).values(history=self._append(lost)))
        return [row.id for row in rows]

    def _holding(self, job: Job, now: float) -> Any:
        t = self.table
        return sa.and_(
            t.c.id == job.id,
            t.c.state == "running",
            t.c.lease_token == job.lease_token,
            t.c.lease_expires_at > now,
        )

    @sql_unavailable
    def heartbeat(self, queue: str, jobs: Sequence[Job], lease: float) -> set[str]:
        """Extend the leases still held; return their ids.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        if not jobs:
            return set()
        now = self.clock.time()
        t = self.table
        held = sa.or_(*(self._holding(job, now) for job in jobs))
        with self._single.connect() as conn:
            rows = conn.execute(
                sa.update(t).where(held).values(lease_expires_at=now + lease).returning(t.c.id)
            ).all()
        return {row.id for row in rows}

    def _finish(
        self,
        job: Job,
        statement: Any,
        outcome: str,
        error: JobError | None,
        session: object | None = None,
        **params: object,
    ) -> Job:
        now = self.clock.time()
        last = job.history[-1] if job.history else Attempt(job.attempts, now)
        entry = Attempt(last.number, last.started_at, now, outcome, last.worker, error)
        attempt = json.dumps(entry.to_dict(), separators=(",", ":"))
        values = {"job_id": job.id, "p_token": job.lease_token, "p_now": now, "attempt": attempt}
        if session is not None:  # the caller's transaction: its writes and this commit as one
            row = session.execute(statement, {**values, **params}).first()  # type: ignore[attr-defined]
        else:
            with self._single.connect() as conn:
                row = conn.execute(statement, {**values, **params}).first()
        if row is None:
            raise LeaseLost(job.id, queue=job.queue)
        # the worker holds the rest of the job: rebuild it without re-parsing the row
        return job.with_changes(
            state=row.state,
            run_at=row.run_at,
            finished_at=row.finished_at,
            last_error=error if error is not None else job.last_error,
            history=(*job.history[:-1], entry),
            lease_token=None,
            lease_expires_at=None,
        )

    @sql_unavailable
    def ack(self, job: Job, *, session: object | None = None) -> Job:
        """Mark a claimed job completed.

        Args:
            job: the job as claimed.
            session: a SQLAlchemy ``Session`` or ``Connection`` whose transaction the ack
                joins (it commits with the caller's own writes, or not at all).

        Raises:
            LeaseLost: the lease lapsed or the token is stale.
            BackendUnavailable: the database could not be reached or timed out.
        """
        return self._finish(job, self._ack_stmt, "completed", None, session=session)

    @sql_unavailable
    def ack_many(self, jobs: Sequence[Job]) -> list[Job | None]:
        """Ack several jobs with one prebuilt ``UPDATE … FROM unnest(…)`` on PostgreSQL.

        Each row still needs its own live lease (token and expiry) to be completed.

        Args:
            jobs: the jobs as claimed.

        Returns:
            Per job: the completed job, or ``None`` where the lease was lost.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        if len(jobs) < 2 or not self._postgres:
            return ack_each(self.ack, jobs)
        now = self.clock.time()
        done = [job.completed(now) for job in jobs]
        params = {
            "p_now": now,
            "p_ids": [job.id for job in jobs],
            "p_tokens": [job.lease_token or "" for job in jobs],
            "p_attempts": [
                json.dumps(job.history[-1].to_dict(), separators=(",", ":")) for job in done
            ],
        }
        with self._single.connect() as conn:  # (id, token): a stale twin of a job stays lost
            acked = {(row.id, row.v_token) for row in conn.execute(self._ack_many_stmt, params)}
        return [
            finished if (job.id, job.lease_token or "") in acked else None
            for job, finished in zip(jobs, done, strict=True)
        ]

    @sql_unavailable
    def fail(self, job: Job, error: JobError, *, retry_at: float | None) -> Job:
        """Record a failed attempt; retry at ``retry_at`` or dead-letter.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        text = json.dumps(error.to_dict())
        if retry_at is None:
            return self._finish(job, self._dead_stmt, "failed", error, error_json=text)
        return self._finish(
            job, self._retry_stmt, "failed", error, error_json=text, retry_at=retry_at
        )

    @sql_unavailable
    def release(self, job: Job) -> None:
        """Give a claimed job back: waiting again, this attempt not counted.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        t = self.table
        now = self.clock.time()
        with self._single.connect() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.id == job.id, t.c.state == "running", t.c.lease_token == job.lease_token)
                .values(
                    state=sa.case((t.c.attempts <= 1, "waiting"), else_="retrying"),
                    attempts=t.c.attempts - 1,
                    run_at=now,
                    lease_token=None,
                    lease_expires_at=None,
                )
            )

    # --- reading and operating ---------------------------------------------------------

    @sql_unavailable
    def get(self, queue: str, job_id: str) -> Job | None:
        """The job, or ``None``.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        t = self.table
        with self._single.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.queue == queue, t.c.id == job_id)).first()
        return None if row is None else self._job(row)

    @sql_unavailable
    def stats(self, queue: str) -> QueueStats:
        """Counts per state and the oldest ready job's age, at a cost that ignores history.

        Live jobs are counted through the partial ready and running indexes. Finished jobs
        (``completed``, ``dead``), which pile up until cleanup, are counted exactly up to
        :data:`FINISHED_COUNT_LIMIT` each; past it, PostgreSQL gives its planner's estimate
        (``finished_exact`` is then ``False``) and SQLite counts them all.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        now = self.clock.time()
        t = self.table
        later = t.c.run_at > now
        live = (
            sa.select(
                t.c.state,
                later.label("later"),
                sa.func.count(),
                sa.func.min(sa.case((sa.not_(later), t.c.run_at))),
            )
            .where(t.c.queue == queue, _READY)
            .group_by(t.c.state, later)
        )
        running = sa.select(sa.func.count()).where(t.c.queue == queue, t.c.state == "running")
        counts = dict.fromkeys(("waiting", "delayed", "retrying"), 0)
        oldest: float | None = None
        exact = True
        with self._single.connect() as conn:
            for state, is_later, count, first_due in conn.execute(live):
                kind = "delayed" if state == "waiting" and is_later else str(state)
                counts[kind] += int(count)
                if first_due is not None:
                    oldest = first_due if oldest is None else min(oldest, first_due)
            counts["running"] = int(conn.execute(running).scalar_one())
            for state in ("completed", "dead"):
                counts[state], counted = self._count_finished(conn, queue, state)
                exact = exact and counted
        age = max(0.0, now - oldest) if oldest is not None else 0.0
        return QueueStats.from_counts(counts, age, finished_exact=exact)

    def _count_finished(self, conn: sa.Connection, queue: str, state: str) -> tuple[int, bool]:
        """``(count, exact)`` of a queue's jobs in ``state``, reading a bounded number of rows."""
        t = self.table
        where = sa.and_(t.c.queue == queue, t.c.state == state)
        capped = sa.select(sa.literal(1)).where(where).limit(FINISHED_COUNT_LIMIT + 1).subquery()
        count = int(conn.execute(sa.select(sa.func.count()).select_from(capped)).scalar_one())
        if count <= FINISHED_COUNT_LIMIT:
            return count, True
        if not self._postgres:
            return int(conn.execute(sa.select(sa.func.count()).where(where)).scalar_one()), True
        query = (
            sa.select(sa.literal(1))
            .where(where)
            .compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        )
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {query}").scalar_one()
        if isinstance(plan, str):
            plan = json.loads(plan)
        estimate = int(plan[0]["Plan"]["Plan Rows"])
        return max(estimate, count), False

    @sql_unavailable
    def dead_letters(self, queue: str, *, limit: int = 100) -> list[Job]:
        """Dead jobs, most recently dead first.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        t = self.table
        with self._single.connect() as conn:
            rows = conn.execute(
                sa.select(t)
                .where(t.c.queue == queue, t.c.state == "dead")
                .order_by(t.c.finished_at.desc())
                .limit(limit)
            ).all()
        return [self._job(row) for row in rows]

    def _dead(self, queue: str, job_ids: Sequence[str] | None) -> Any:
        t = self.table
        where = sa.and_(t.c.queue == queue, t.c.state == "dead")
        return where if job_ids is None else sa.and_(where, t.c.id.in_(list(job_ids)))

    @sql_unavailable
    def requeue_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Dead jobs back to waiting with fresh attempts (history kept).

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        now = self.clock.time()
        with self._single.connect() as conn:
            result = conn.execute(
                sa.update(self.table)
                .where(self._dead(queue, job_ids))
                .values(state="waiting", attempts=0, run_at=now, finished_at=None)
            )
        return int(result.rowcount)

    @sql_unavailable
    def purge_dead(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        with self._single.connect() as conn:
            result = conn.execute(sa.delete(self.table).where(self._dead(queue, job_ids)))
        return int(result.rowcount)

    @sql_unavailable
    def cleanup(self, queue: str, *, older_than: float) -> int:
        """Delete finished jobs older than ``older_than`` seconds.

        In chunks of 5,000 rows, so no transaction holds its locks for long.

        Raises:
            BackendUnavailable: the database could not be reached or timed out.
        """
        cutoff = self.clock.time() - older_than
        t = self.table
        old = (
            sa.select(t.c.id)
            .where(t.c.queue == queue, t.c.state.in_(FINISHED_STATES), t.c.finished_at < cutoff)
            .limit(_CLEANUP_CHUNK)
        )
        deleted = 0
        while True:
            with self._single.connect() as conn:
                count = conn.execute(sa.delete(t).where(t.c.id.in_(old.scalar_subquery()))).rowcount
            deleted += count
            if count < _CLEANUP_CHUNK:
                return deleted


class _Buffered:
    """A finished result: rows fetched before the connection went back to the pool."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    @classmethod
    def of(cls, result: Any) -> _Buffered:
        # an INSERT ... ON CONFLICT DO NOTHING RETURNING that inserted nothing may report
        # that it returns no rows at all: treat that as an empty result
        rows = list(result.all()) if result.returns_rows else []
        return cls(rows, result.rowcount)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None
