"""Effectively once on SQL: the handler's writes and the job's ack commit together or not at all."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from hardening import ConfigurationError, FakeClock
from hardening.queue import Job, MemoryBackend, QueueProcessor
from hardening.queue.backends.sql import SQLBackend

EFFECTS = sa.Table(
    "effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False),
)


class Writes(QueueProcessor):
    """Records its effect through the job's session; misbehaves as the payload says."""

    queue = "tx"
    transactional = True
    lease = 30
    poll_interval = 0.01
    backoff = 0.0

    def process(self, job: Job) -> None:
        self.session.execute(sa.insert(EFFECTS).values(job_id=job.id))
        if job.payload == "fail" and job.attempts == 1:
            raise RuntimeError("after writing")
        if job.payload == "stall" and job.attempts == 1:
            self.clock.advance(31)  # type: ignore[attr-defined]  # the lease lapses meanwhile


@pytest.fixture
def setup(sql_engine: sa.Engine) -> tuple[Writes, SQLBackend, sa.Engine, FakeClock]:
    """A transactional processor on SQLite or PostgreSQL, on a fake clock."""
    clock = FakeClock()
    backend = SQLBackend(sql_engine, clock=clock)
    backend.create_schema()
    EFFECTS.metadata.create_all(sql_engine)
    return Writes(backend, clock=clock), backend, sql_engine, clock


def _effects(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [row.job_id for row in conn.execute(sa.select(EFFECTS.c.job_id))]


def test_writes_and_ack_commit_together(setup: Any) -> None:
    """A job that succeeds: its write and its completion are both there."""
    proc, backend, engine, _ = setup
    job = proc.enqueue("ok")
    assert proc.run_until_empty() == 1
    assert _effects(engine) == [job.id]
    done = backend.get("tx", job.id)
    assert done is not None
    assert done.state == "completed"


def test_a_failing_handler_leaves_no_write(setup: Any) -> None:
    """A handler that raises after writing: the write is rolled back; the retry writes once."""
    proc, backend, engine, _ = setup
    job = proc.enqueue("fail")
    assert proc.run_until_empty() == 2
    assert _effects(engine) == [job.id]
    done = backend.get("tx", job.id)
    assert done is not None
    assert [a.outcome for a in done.history] == ["failed", "completed"]


def test_a_lapsed_lease_rolls_the_writes_back(setup: Any) -> None:
    """The lease lapses while the handler runs (another worker may take the job): its writes
    are rolled back with the refused ack, and the run that does complete writes once."""
    proc, backend, engine, _ = setup
    job = proc.enqueue("stall")
    assert proc.run_until_empty() == 2  # the stalled run, then the recovered one
    assert _effects(engine) == [job.id]  # the first run's write was rolled back
    done = backend.get("tx", job.id)
    assert done is not None
    assert [a.outcome for a in done.history] == ["lost", "completed"]


def test_transactional_needs_a_sql_backend_and_a_plain_def() -> None:
    """Redis and memory acks cannot join a database transaction; nor can an async handler."""
    with pytest.raises(ConfigurationError, match="SQL backend"):
        Writes(MemoryBackend())

    class AsyncWrites(QueueProcessor):
        queue = "tx"
        transactional = True

        async def process(self, job: Job) -> None:
            return None

    with pytest.raises(ConfigurationError, match="plain def"):
        AsyncWrites(SQLBackend("sqlite://"))


def test_session_exists_only_inside_process() -> None:
    """Outside a transactional run there is no session to write through."""
    proc = Writes(SQLBackend("sqlite://"))
    with pytest.raises(ConfigurationError, match="transactional"):
        _ = proc.session
    proc.close()
