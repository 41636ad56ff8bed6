"""SQL outages become ``BackendUnavailable("sql")`` in every SQL primitive; other errors do not.

The classification is tested on real exceptions from real engines; then every primitive is run
against a PostgreSQL port nothing listens on and a SQLite file that cannot be opened, and an
app under the ASGI and WSGI ``ErrorMiddleware`` answers such an outage with 503 problem+json.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import werkzeug.test
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hardening import (
    AsyncDocumentHistory,
    BackendUnavailable,
    ConflictError,
    DataLoader,
    DocumentHistory,
    FakeClock,
    insert_batches,
    insert_batches_async,
    load_by_ids,
    load_by_ids_async,
    paginate,
    paginate_async,
    sql_loader,
    update_versioned,
    update_versioned_async,
)
from hardening._sql import map_outages, sql_unavailable, unavailable_from
from hardening.adapters import PROBLEM_JSON, asgi, wsgi
from hardening.blocks.history import Document
from hardening.queue import Job, JobError, QueueProcessor
from hardening.queue.backends.sql import SQLBackend
from hardening.queue.job import NewJob
from tests.conftest import free_port

SECRET = "test-pagination-secret-0123456789"
PAGE: dict[str, object] = {"title": "Plan", "blocks": [{"id": "b1", "type": "p", "text": ""}]}
ITEMS = sa.Table(
    "items",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
)


def refused_postgres_url() -> str:
    """A PostgreSQL URL on a loopback port nothing listens on (connects are refused at once)."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"


@pytest.fixture(params=["postgres", "sqlite"])
def dead_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine whose database cannot be reached: a refused port, or an unopenable file."""
    if request.param == "postgres":
        url = refused_postgres_url()
    else:
        url = f"sqlite:///{tmp_path / 'no-such-directory' / 'x.db'}"
    engine = sa.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def dead_async_engine() -> AsyncIterator[AsyncEngine]:
    """An async (psycopg) engine on a refused PostgreSQL port."""
    engine = create_async_engine(refused_postgres_url())
    try:
        yield engine
    finally:
        await engine.dispose()


def assert_sql_unavailable(raised: pytest.ExceptionInfo[BackendUnavailable]) -> None:
    """The error names the SQL backend and chains the driver's error."""
    assert raised.value.backend == "sql"
    assert isinstance(raised.value.__cause__, (sa.exc.SQLAlchemyError, OSError))


# --- which errors are outages -------------------------------------------------------------


def test_a_refused_connection_is_an_outage() -> None:
    """PostgreSQL on a refused port raises OperationalError, mapped with a short message."""
    engine = sa.create_engine(refused_postgres_url())
    with pytest.raises(sa.exc.OperationalError) as raised, engine.connect():
        pass
    engine.dispose()
    unavailable = unavailable_from(raised.value)
    assert unavailable is not None
    assert unavailable.backend == "sql"
    assert str(unavailable).startswith("sql backend unavailable: OperationalError: ")
    assert "\n" not in str(unavailable)


def test_an_unopenable_sqlite_file_is_an_outage(tmp_path: Path) -> None:
    """SQLite that cannot open its file raises OperationalError, mapped."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(sa.exc.OperationalError) as raised, engine.connect():
        pass
    assert unavailable_from(raised.value) is not None


def test_a_raw_connection_refused_is_an_outage() -> None:
    """A driver's unwrapped socket error (asyncpg connects without wrapping) is an outage."""
    with pytest.raises(ConnectionRefusedError) as raised:
        socket.create_connection(("127.0.0.1", free_port()), timeout=2).close()
    unavailable = unavailable_from(raised.value)
    assert unavailable is not None
    assert "ConnectionRefusedError" in str(unavailable)


def test_a_pool_checkout_timeout_is_an_outage(tmp_path: Path) -> None:
    """A QueuePool that stays exhausted for its whole pool_timeout raises BackendUnavailable."""
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'pool.db'}",
        poolclass=sa.QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    with engine.connect(), pytest.raises(BackendUnavailable) as raised, map_outages:
        engine.connect()
    engine.dispose()
    assert isinstance(raised.value.__cause__, sa.exc.TimeoutError)


def test_sqlite_database_is_locked_is_an_outage(tmp_path: Path) -> None:
    """SQLite's "database is locked" (a busy store, like a pool timeout) is an outage."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'busy.db'}", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (n INTEGER)"))
    with engine.connect() as holder:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        with (
            engine.connect() as other,
            pytest.raises(sa.exc.OperationalError, match="database is locked") as raised,
        ):
            other.execute(sa.text("INSERT INTO t VALUES (1)"))
        holder.rollback()
    engine.dispose()
    assert unavailable_from(raised.value) is not None


def test_a_killed_connection_is_an_outage_whose_message_has_no_sql(pg_engine: sa.Engine) -> None:
    """A connection the server terminated is an outage; the message carries no SQL or values."""
    with pg_engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("SELECT CAST(:secret AS text)"), {"secret": "s3cr3t-value"})
    assert raised.value.connection_invalidated
    assert "s3cr3t-value" in str(raised.value)
    unavailable = unavailable_from(raised.value)
    assert unavailable is not None
    assert "s3cr3t-value" not in str(unavailable)
    assert "CAST" not in str(unavailable)


def test_a_serialization_failure_is_not_an_outage(pg_engine: sa.Engine) -> None:
    """A real 40001 from two conflicting SERIALIZABLE transactions propagates unchanged."""
    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)"))
        conn.execute(sa.text("INSERT INTO counters VALUES (1, 0)"))
    serializable = pg_engine.execution_options(isolation_level="SERIALIZABLE")
    bump = sa.text("UPDATE counters SET n = n + 1 WHERE id = 1")
    with serializable.connect() as first, serializable.connect() as second:
        first.execute(sa.text("SELECT n FROM counters WHERE id = 1"))  # takes its snapshot
        second.execute(bump)
        second.commit()
        with pytest.raises(sa.exc.OperationalError) as raised, map_outages:
            first.execute(bump)
    assert getattr(raised.value.orig, "sqlstate", None) == "40001"
    assert unavailable_from(raised.value) is None


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        ("SELECT * FROM no_such_table", sa.exc.ProgrammingError),
        ("SELECT CAST('abc' AS integer)", sa.exc.DataError),
        ("INSERT INTO twice VALUES (1), (1)", sa.exc.IntegrityError),
    ],
)
def test_statement_and_data_errors_are_not_outages(
    pg_engine: sa.Engine, statement: str, error: type[sa.exc.DBAPIError]
) -> None:
    """A missing table, a bad value or a duplicate key propagates unchanged."""
    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE twice (id int PRIMARY KEY)"))
    with pg_engine.connect() as conn, pytest.raises(error) as raised, map_outages:
        conn.execute(sa.text(statement))
    assert unavailable_from(raised.value) is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 error codes are Python 3.11+")
def test_a_missing_table_on_sqlite_is_not_an_outage(sqlite_engine: sa.Engine) -> None:
    """SQLite reports a missing table as an OperationalError (SQLITE_ERROR): not an outage."""
    with sqlite_engine.connect() as conn, pytest.raises(sa.exc.OperationalError) as raised:
        conn.execute(sa.text("SELECT * FROM no_such_table"))
    assert unavailable_from(raised.value) is None


def test_hardening_errors_are_never_remapped() -> None:
    """A HardeningError (even another backend's BackendUnavailable) is left as it is."""
    assert unavailable_from(BackendUnavailable("redis", "down")) is None
    assert unavailable_from(ConflictError("page", 1, expected_version=1, current_version=2)) is None


def test_the_decorator_keeps_signatures_docs_and_coroutine_functions() -> None:
    """Decorated entry points keep their signature, docstring and async nature."""
    parameters = list(inspect.signature(update_versioned).parameters)
    assert parameters[:4] == ["session", "model", "pk", "expected_version"]
    assert (update_versioned.__doc__ or "").startswith("Update one row if")
    assert inspect.iscoroutinefunction(update_versioned_async)
    assert inspect.iscoroutinefunction(AsyncDocumentHistory.load)
    assert not inspect.iscoroutinefunction(DocumentHistory.load)


def test_the_decorator_refuses_generator_functions() -> None:
    """A generator's errors come after the call returns, so wrapping one is refused."""

    def rows() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        sql_unavailable(rows)


# --- the queue ----------------------------------------------------------------------------

NEW_JOB = NewJob(
    id="1" * 32,
    queue="q",
    payload_json="{}",
    priority=0,
    run_at=0.0,
    created_at=0.0,
    max_attempts=3,
)
CLAIMED = Job(id="2" * 32, queue="q", payload={}, attempts=1, state="running", lease_token="t")
OTHER = Job(id="3" * 32, queue="q", payload={}, attempts=1, state="running", lease_token="t")
QUEUE_CALLS: dict[str, Callable[[SQLBackend], object]] = {
    "create_schema": lambda b: b.create_schema(),
    "drop_schema": lambda b: b.drop_schema(),
    "enqueue": lambda b: b.enqueue(NEW_JOB),
    "enqueue_deduplicated": lambda b: b.enqueue(
        NewJob("4" * 32, "q", "{}", 0, 0.0, 0.0, 3, dedupe_key="k")
    ),
    "claim": lambda b: b.claim("q", worker="w", limit=5, lease=30.0),
    "heartbeat": lambda b: b.heartbeat("q", [CLAIMED], 30.0),
    "ack": lambda b: b.ack(CLAIMED),
    "ack_many": lambda b: b.ack_many([CLAIMED, OTHER]),
    "fail": lambda b: b.fail(CLAIMED, JobError("E", "m"), retry_at=None),
    "retry": lambda b: b.fail(CLAIMED, JobError("E", "m"), retry_at=10.0),
    "release": lambda b: b.release(CLAIMED),
    "get": lambda b: b.get("q", CLAIMED.id),
    "stats": lambda b: b.stats("q"),
    "dead_letters": lambda b: b.dead_letters("q"),
    "requeue_dead": lambda b: b.requeue_dead("q"),
    "purge_dead": lambda b: b.purge_dead("q", [CLAIMED.id]),
    "cleanup": lambda b: b.cleanup("q", older_than=60.0),
}


@pytest.mark.parametrize("operation", sorted(QUEUE_CALLS))
def test_sql_queue_backend_outage(dead_engine: sa.Engine, operation: str) -> None:
    """Every SQLBackend method raises BackendUnavailable("sql") when the database is down."""
    backend = SQLBackend(dead_engine, clock=FakeClock(1_700_000_000.0))
    with pytest.raises(BackendUnavailable) as raised:
        QUEUE_CALLS[operation](backend)
    assert_sql_unavailable(raised)


def test_sql_queue_outage_in_the_callers_session(dead_engine: sa.Engine) -> None:
    """An enqueue joining the caller's session maps the outage too."""
    backend = SQLBackend(dead_engine)
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        backend.enqueue(NEW_JOB, session=session)
    assert_sql_unavailable(raised)


class Indexer(QueueProcessor):
    queue = "indexing"

    def process(self, job: Job) -> None:
        pass


def test_queue_processor_on_sql_outage_raises_backend_unavailable(dead_engine: sa.Engine) -> None:
    """``except BackendUnavailable`` around enqueue catches SQL outages, as it does Redis ones."""
    processor = Indexer(SQLBackend(dead_engine))
    with pytest.raises(BackendUnavailable) as raised:
        processor.enqueue({"page": 1})
    assert_sql_unavailable(raised)


# --- document history and optimistic locking ----------------------------------------------

HISTORY_CALLS: dict[str, Callable[[Any], Any]] = {
    "create_schema": lambda h: h.create_schema(),
    "create": lambda h: h.create("d", PAGE),
    "save": lambda h: h.save(
        "d", [{"op": "replace", "path": "/title", "value": "x"}], base_version=1
    ),
    "load": lambda h: h.load("d"),
    "load_version": lambda h: h.load("d", 1),
    "versions": lambda h: h.versions("d"),
    "compact": lambda h: h.compact("d", keep=1),
}


@pytest.mark.parametrize("operation", sorted(HISTORY_CALLS))
def test_document_history_outage(dead_engine: sa.Engine, operation: str) -> None:
    """Every DocumentHistory method raises BackendUnavailable("sql") when the database is down."""
    with pytest.raises(BackendUnavailable) as raised:
        HISTORY_CALLS[operation](DocumentHistory(dead_engine))
    assert_sql_unavailable(raised)


@pytest.mark.parametrize("operation", sorted(HISTORY_CALLS))
@pytest.mark.anyio
async def test_async_document_history_outage(
    dead_async_engine: AsyncEngine, operation: str
) -> None:
    """Every AsyncDocumentHistory method raises BackendUnavailable("sql") too."""
    with pytest.raises(BackendUnavailable) as raised:
        await HISTORY_CALLS[operation](AsyncDocumentHistory(dead_async_engine))
    assert_sql_unavailable(raised)


def test_document_history_outage_in_the_callers_session(dead_engine: sa.Engine) -> None:
    """With ``session=``, the library's own statements still map their outage."""
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        DocumentHistory().load("d", session=session)
    assert_sql_unavailable(raised)


def test_update_versioned_outage(dead_engine: sa.Engine) -> None:
    """update_versioned raises BackendUnavailable("sql") when the database is down."""
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        update_versioned(session, Document, "d", 1, {"content": {}})
    assert_sql_unavailable(raised)


@pytest.mark.anyio
async def test_update_versioned_async_outage(dead_async_engine: AsyncEngine) -> None:
    """update_versioned_async raises BackendUnavailable("sql") when the database is down."""
    async with AsyncSession(dead_async_engine) as session:
        with pytest.raises(BackendUnavailable) as raised:
            await update_versioned_async(session, Document, "d", 1, {"content": {}})
    assert_sql_unavailable(raised)


# --- data access ----------------------------------------------------------------------------


def test_paginate_outage(dead_engine: sa.Engine) -> None:
    """paginate raises BackendUnavailable("sql") when the database is down."""
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        paginate(session, sa.select(Document), order_by=[Document.id], secret=SECRET)
    assert_sql_unavailable(raised)


@pytest.mark.anyio
async def test_paginate_async_outage(dead_async_engine: AsyncEngine) -> None:
    """paginate_async raises BackendUnavailable("sql") when the database is down."""
    async with AsyncSession(dead_async_engine) as session:
        with pytest.raises(BackendUnavailable) as raised:
            await paginate_async(
                session, sa.select(Document), order_by=[Document.id], secret=SECRET
            )
    assert_sql_unavailable(raised)


@pytest.mark.parametrize("target", ["engine", "session"])
def test_insert_batches_outage(dead_engine: sa.Engine, target: str) -> None:
    """insert_batches, given an engine or a session, raises BackendUnavailable("sql")."""
    rows = [{"id": 1, "name": "a"}]
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        insert_batches(dead_engine if target == "engine" else session, ITEMS, rows)
    assert_sql_unavailable(raised)


@pytest.mark.parametrize("target", ["engine", "session"])
@pytest.mark.anyio
async def test_insert_batches_async_outage(dead_async_engine: AsyncEngine, target: str) -> None:
    """insert_batches_async, given an engine or a session, raises BackendUnavailable("sql")."""
    rows = [{"id": 1, "name": "a"}]
    async with AsyncSession(dead_async_engine) as session:
        with pytest.raises(BackendUnavailable) as raised:
            await insert_batches_async(
                dead_async_engine if target == "engine" else session, ITEMS, rows
            )
    assert_sql_unavailable(raised)


def test_insert_batches_leaves_the_callers_os_errors_alone(sqlite_engine: sa.Engine) -> None:
    """An OSError raised by the caller's rows (a file they read) is theirs, not an outage."""
    ITEMS.create(sqlite_engine)

    def rows() -> Iterator[dict[str, object]]:
        yield {"id": 1, "name": "a"}
        raise FileNotFoundError("rows.csv")

    with pytest.raises(FileNotFoundError):
        insert_batches(sqlite_engine, ITEMS, rows(), batch_size=1)


def test_load_by_ids_outage(dead_engine: sa.Engine) -> None:
    """load_by_ids raises BackendUnavailable("sql") when the database is down."""
    with Session(dead_engine) as session, pytest.raises(BackendUnavailable) as raised:
        load_by_ids(session, Document, ["d"])
    assert_sql_unavailable(raised)


@pytest.mark.anyio
async def test_load_by_ids_async_outage(dead_async_engine: AsyncEngine) -> None:
    """load_by_ids_async raises BackendUnavailable("sql") when the database is down."""
    async with AsyncSession(dead_async_engine) as session:
        with pytest.raises(BackendUnavailable) as raised:
            await load_by_ids_async(session, Document, ["d"])
    assert_sql_unavailable(raised)


@pytest.mark.parametrize("source", ["session", "sessionmaker"])
@pytest.mark.anyio
async def test_sql_loader_outage_reaches_every_caller(
    dead_async_engine: AsyncEngine, source: str
) -> None:
    """A DataLoader on sql_loader gives every caller of the failed batch BackendUnavailable."""
    async with AsyncSession(dead_async_engine) as session:
        factory = async_sessionmaker(dead_async_engine)
        loader = DataLoader(sql_loader(session if source == "session" else factory, Document))
        results = await asyncio.gather(loader.load("a"), loader.load("b"), return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) and r.backend == "sql" for r in results)


# --- through the HTTP adapters --------------------------------------------------------------


@pytest.fixture
def dead_history() -> Iterator[DocumentHistory]:
    """A DocumentHistory on a refused PostgreSQL port."""
    engine = sa.create_engine(refused_postgres_url())
    try:
        yield DocumentHistory(engine)
    finally:
        engine.dispose()


@pytest.mark.anyio
async def test_asgi_error_middleware_answers_a_sql_outage_with_503(
    dead_history: DocumentHistory,
) -> None:
    """A Starlette handler whose DocumentHistory.load meets an outage answers 503 problem+json."""

    def page(request: Request) -> Response:
        loaded = dead_history.load(request.path_params["page_id"])
        return JSONResponse({"version": loaded.version})

    app = Starlette(routes=[Route("/pages/{page_id}", page)])
    app.add_middleware(asgi.ErrorMiddleware)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await http.get("/pages/p1")
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["backend"] == "sql"


def test_wsgi_error_middleware_answers_a_sql_outage_with_503(
    dead_history: DocumentHistory,
) -> None:
    """A WSGI app whose DocumentHistory.load meets an outage answers 503 problem+json."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        loaded = dead_history.load("p1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(loaded.version).encode()]

    response = werkzeug.test.Client(wsgi.ErrorMiddleware(app)).get("/pages/p1")
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json is not None
    assert response.json["backend"] == "sql"
