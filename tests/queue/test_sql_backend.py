"""SQL backend specifics on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from hardening import FakeClock
from hardening.queue import Job, QueueProcessor
from hardening.queue.backends.sql import SQLBackend


class Indexer(QueueProcessor):
    queue = "indexing"

    def process(self, job: Job) -> None:
        pass


@pytest.fixture
def sql_backend(sql_engine: sa.Engine) -> SQLBackend:
    backend = SQLBackend(sql_engine, clock=FakeClock(1_700_000_000.0), table="indexing_queue")
    backend.create_schema()
    return backend


def test_enqueue_joins_the_callers_transaction(sql_backend: SQLBackend) -> None:
    """A job enqueued in a session commits with it, or vanishes with its rollback."""
    proc = Indexer(sql_backend, clock=sql_backend.clock)
    with Session(sql_backend.engine) as session:
        proc.enqueue({"page": 1}, session=session)
        session.rollback()
    assert proc.stats().waiting == 0
    with Session(sql_backend.engine) as session, session.begin():
        kept = proc.enqueue({"page": 2}, session=session)
        assert proc.stats().waiting == 0 or sql_backend.engine.dialect.name == "sqlite"
    assert proc.stats().waiting == 1
    assert sql_backend.get("indexing", kept.id) is not None


def test_dedupe_inside_a_transaction(sql_backend: SQLBackend) -> None:
    """Deduplication also works for jobs enqueued within a session."""
    proc = Indexer(sql_backend, clock=sql_backend.clock)
    with Session(sql_backend.engine) as session, session.begin():
        first = proc.enqueue({"page": 3}, dedupe_key="reindex:3", session=session)
        again = proc.enqueue({"page": 3}, dedupe_key="reindex:3", session=session)
    assert again.id == first.id
    assert proc.stats().waiting == 1


def test_dedupe_survives_prepared_statements(sql_backend: SQLBackend) -> None:
    """Many deduplicated enqueues on one connection all work.

    psycopg prepares a statement server-side after 5 runs, and PostgreSQL may then use a
    generic plan; an ON CONFLICT predicate with bound parameters matched no partial index
    there, so every 11th enqueue or so failed (found by the load test).
    """
    proc = Indexer(sql_backend, clock=sql_backend.clock)
    with sql_backend.engine.connect() as connection:  # one connection, as a busy pool gives
        for n in range(40):
            with Session(bind=connection) as session, session.begin():
                proc.enqueue({"page": n}, dedupe_key=f"reindex:{n % 20}", session=session)
    assert proc.stats().waiting == 20


def test_cleanup_of_ten_thousand_old_entries(sql_backend: SQLBackend) -> None:
    """Cleanup deletes exactly the 10,000 old finished entries, in chunks."""
    t = sql_backend.table
    now = sql_backend.clock.time()
    rows = [
        {
            "id": f"{i:032x}",
            "queue": "indexing",
            "payload": "{}",
            "state": "completed",
            "max_attempts": 3,
            "created_at": now - 30 * 86400,
            "run_at": now - 30 * 86400,
            "finished_at": now - 8 * 86400,
            "history": "[]",
        }
        for i in range(10_000)
    ]
    fresh = {**rows[0], "id": "f" * 32, "finished_at": now - 3600}
    with sql_backend.engine.begin() as conn:
        conn.execute(sa.insert(t), [*rows, fresh])
    assert sql_backend.cleanup("indexing", older_than=7 * 86400) == 10_000
    assert sql_backend.stats("indexing").completed == 1


@pytest.mark.postgres
def test_concurrent_claims_skip_locked(pg_engine: sa.Engine) -> None:
    """8 threads claiming from 400 jobs on PostgreSQL: every job claimed exactly once."""
    backend = SQLBackend(pg_engine)
    backend.create_schema()
    proc = Indexer(backend)
    with pg_engine.begin() as conn:
        now = backend.clock.time()
        conn.execute(
            sa.insert(backend.table),
            [
                {
                    "id": f"{i:032x}",
                    "queue": "indexing",
                    "payload": "{}",
                    "state": "waiting",
                    "max_attempts": 3,
                    "created_at": now,
                    "run_at": now,
                    "history": "[]",
                }
                for i in range(400)
            ],
        )
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            jobs = backend.claim("indexing", worker=f"w{n}", limit=7, lease=60)
            if not jobs:
                return
            with lock:
                claimed.extend(job.id for job in jobs)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(claimed) == 400
    assert len(set(claimed)) == 400
    assert proc.stats().running == 400


def test_url_builds_an_owned_engine(tmp_path: object) -> None:
    """``backend_from_url('sqlite:///…')`` builds a working backend that closes its engine."""
    from hardening.queue import backend_from_url

    backend = backend_from_url(f"sqlite:///{tmp_path}/jobs.db")
    assert isinstance(backend, SQLBackend)
    backend.create_schema()
    proc = Indexer(backend)
    proc.enqueue({"x": 1})
    assert proc.run_until_empty() == 1
    backend.close()


def test_create_schema_replaces_the_old_indexes(sql_engine: sa.Engine) -> None:
    """A table made by an earlier version loses the index a retry could violate, and its
    finished index gains the state."""
    from hardening.queue.job import JobError
    from tests.queue.conftest import new_job

    clock = FakeClock()
    backend = SQLBackend(sql_engine, clock=clock)
    backend.create_schema()
    with sql_engine.begin() as conn:  # what earlier versions created
        conn.execute(
            sa.text(
                "CREATE UNIQUE INDEX hardening_jobs_dedupe_idx ON hardening_jobs (queue, "
                "dedupe_key) WHERE state IN ('waiting', 'retrying') AND dedupe_key IS NOT NULL"
            )
        )
        conn.execute(sa.text("DROP INDEX hardening_jobs_finished_state_idx"))
        conn.execute(
            sa.text(
                "CREATE INDEX hardening_jobs_finished_idx ON hardening_jobs (queue, "
                "finished_at) WHERE state IN ('completed', 'dead')"
            )
        )
    backend.create_schema()
    names = {index["name"] for index in sa.inspect(sql_engine).get_indexes("hardening_jobs")}
    assert "hardening_jobs_dedupe_idx" not in names
    assert "hardening_jobs_finished_idx" not in names
    assert "hardening_jobs_finished_state_idx" in names
    assert "hardening_jobs_dedupe_waiting_idx" in names
    backend.enqueue(new_job("q", now=clock.time(), dedupe_key="k"))
    (running,) = backend.claim("q", worker="w", limit=1, lease=30)
    backend.enqueue(new_job("q", now=clock.time(), dedupe_key="k"))
    assert backend.fail(running, JobError("E", "x"), retry_at=clock.time()).state == "retrying"


def test_create_schema_adds_the_columns_added_since(sql_engine: sa.Engine) -> None:
    """A jobs table from before per-job timeouts gets the column, and its jobs still run."""
    from tests.queue.conftest import new_job

    clock = FakeClock()
    SQLBackend(sql_engine, clock=clock).create_schema()
    with sql_engine.begin() as conn:  # the table as the earlier version made it, with a job
        conn.execute(sa.text("ALTER TABLE hardening_jobs DROP COLUMN timeout"))
        conn.execute(
            sa.text(
                "INSERT INTO hardening_jobs (id, queue, payload, state, max_attempts, "
                "created_at, run_at) VALUES (:id, 'q', '1', 'waiting', 3, :now, :now)"
            ),
            {"id": "a" * 32, "now": clock.time()},
        )
    backend = SQLBackend(sql_engine, clock=clock)
    backend.create_schema()
    backend.create_schema()  # twice: nothing left to add
    columns = {c["name"] for c in sa.inspect(sql_engine).get_columns("hardening_jobs")}
    assert "timeout" in columns
    backend.enqueue(new_job("q", now=clock.time(), timeout=1.5))
    claimed = backend.claim("q", worker="w", limit=2, lease=30)
    assert sorted(str(job.timeout) for job in claimed) == ["1.5", "None"]


def test_claims_use_the_ready_index_under_a_generic_plan(pg_engine: sa.Engine) -> None:
    """The claim's state filter is the ready index's own predicate, as constants: a generic
    plan (what a prepared statement gets after 5 runs) can still use the partial index."""
    backend = SQLBackend(pg_engine, clock=FakeClock())
    backend.create_schema()
    statement = backend._claim_statement(10)
    params = {"p_queue": "q", "p_now": 1.0, "p_token": "t", "p_expires": 2.0, "p_worker": "w"}
    with pg_engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL plan_cache_mode = force_generic_plan"))
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        compiled = statement.compile(dialect=pg_engine.dialect)
        values = {**compiled.params, **params}
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {compiled}", values))
    assert "hardening_jobs_ready_idx" in plan, plan


def test_a_rate_limit_without_a_shared_store_is_refused(sql_backend: SQLBackend) -> None:
    """A queue-wide rate limit on SQL needs a store every worker shares: no silent per-process."""
    from hardening import ConfigurationError

    class Limited(QueueProcessor):
        queue = "limited"
        rate_limit = "5/second"

        def process(self, job: Job) -> None:
            return None

    with pytest.raises(ConfigurationError, match="rate_limit_storage"):
        Limited(sql_backend)
    per_process = Limited(sql_backend, rate_limit_storage="memory://")  # said out loud: fine
    assert per_process.options.rate_limit == "5/second"


def test_stats_cost_ignores_history(sql_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finished jobs are counted exactly up to the limit; past it PostgreSQL estimates
    (flagged) while live counts stay exact, and SQLite still counts them all."""
    from hardening.queue.backends import sql as sql_module
    from tests.queue.conftest import new_job

    monkeypatch.setattr(sql_module, "FINISHED_COUNT_LIMIT", 50)
    clock = FakeClock()
    backend = SQLBackend(sql_engine, clock=clock)
    backend.create_schema()
    for _ in range(80):
        backend.enqueue(new_job("q", now=clock.time()))
    done = backend.claim("q", worker="w", limit=70, lease=30)
    backend.ack_many(done[:50])
    exact = backend.stats("q")
    assert (exact.completed, exact.running, exact.waiting, exact.finished_exact) == (
        50,
        20,
        10,
        True,
    )
    backend.ack_many(done[50:])  # 70 completed: past the limit
    backend.enqueue(new_job("q", now=clock.time(), run_at=clock.time() + 60))
    if sql_engine.dialect.name == "postgresql":
        with sql_engine.begin() as conn:
            conn.execute(sa.text("ANALYZE hardening_jobs"))
    stats = backend.stats("q")
    assert (stats.running, stats.waiting, stats.delayed, stats.dead) == (0, 10, 1, 0)
    if sql_engine.dialect.name == "postgresql":
        assert stats.finished_exact is False
        assert stats.completed > 50  # the planner's estimate, at least what was counted
    else:
        assert (stats.completed, stats.finished_exact) == (70, True)
