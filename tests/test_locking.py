"""Optimistic locking on real SQLite and PostgreSQL: no lost update is ever silent."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hardening import (
    ConfigurationError,
    ConflictError,
    Metrics,
    NotFoundError,
    PreconditionFailed,
    PreconditionRequired,
)
from hardening._backoff import Backoff
from hardening.locking import (
    ConflictEvents,
    Versioned,
    VersionedSession,
    check_if_match,
    etag_for,
    if_match_version,
    on_conflict,
    retry_on_conflict,
    update_versioned,
    update_versioned_async,
)


class Base(DeclarativeBase):
    pass


class Page(Versioned, Base):
    __tablename__ = "pages"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    views: Mapped[int] = mapped_column(default=0)


class Plain(Base):
    __tablename__ = "plain"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    """Each SQL backend with the test tables and one page at version 1."""
    Base.metadata.create_all(sql_engine)
    with Session(sql_engine) as session, session.begin():
        session.add(Page(id=1, title="first"))
    return sql_engine


def _row(engine: sa.Engine) -> tuple[str, int, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(Page.title, Page.version, Page.views)).one()
    return row.title, row.version, row.views


def test_mixin_starts_at_version_one(engine: sa.Engine) -> None:
    """A new row's version is 1."""
    assert _row(engine)[1] == 1


def test_second_concurrent_save_conflicts_and_first_wins(engine: sa.Engine) -> None:
    """Two editors based on version 1: the second gets both versions; the row keeps the first."""
    with Session(engine) as alice_reads, Session(engine) as bob_reads:
        alice_base = alice_reads.get(Page, 1)
        bob_base = bob_reads.get(Page, 1)
        assert alice_base is not None
        assert bob_base is not None
        alice_version, bob_version = alice_base.version, bob_base.version
    with Session(engine) as alice, alice.begin():
        assert update_versioned(alice, Page, 1, alice_version, {"title": "alice"}) == 2
    with Session(engine) as bob, bob.begin(), pytest.raises(ConflictError) as info:
        update_versioned(bob, Page, 1, bob_version, {"title": "bob"})
    assert (info.value.expected_version, info.value.current_version) == (1, 2)
    assert (info.value.entity, info.value.key) == ("Page", 1)
    assert _row(engine)[:2] == ("alice", 2)


def test_versions_increment_by_exactly_one(engine: sa.Engine) -> None:
    """Each successful save adds exactly 1."""
    with engine.begin() as conn:
        versions = [update_versioned(conn, Page, 1, v, {"views": v}) for v in range(1, 6)]
    assert versions == [2, 3, 4, 5, 6]
    assert _row(engine)[1:] == (6, 5)


def test_missing_row_is_not_found(engine: sa.Engine) -> None:
    """A save to a deleted row is a NotFoundError, not a conflict."""
    with engine.begin() as conn, pytest.raises(NotFoundError) as info:
        update_versioned(conn, Page, 99, 1, {"title": "x"})
    assert (info.value.entity, info.value.key) == ("Page", 99)


def test_loaded_instance_follows_the_update(engine: sa.Engine) -> None:
    """An ORM instance in the session sees the new values and version without a query."""
    with Session(engine) as session, session.begin():
        page = session.get(Page, 1)
        assert page is not None
        update_versioned(session, Page, 1, 1, {"title": "new"})
        assert (page.title, page.version) == ("new", 2)
        page.views = 3  # a later ORM flush is checked against version 2, and passes
    assert _row(engine) == ("new", 3, 3)


def test_stale_orm_flush_is_a_conflict_error(engine: sa.Engine) -> None:
    """With VersionedSession, a stale ORM flush raises our ConflictError."""
    factory = sessionmaker(engine, class_=VersionedSession)
    with factory() as stale:
        page = stale.get(Page, 1)
        assert page is not None
        with engine.begin() as conn:
            update_versioned(conn, Page, 1, 1, {"title": "other"})
        page.title = "mine"
        with pytest.raises(ConflictError) as info:
            stale.commit()
    assert (info.value.entity, info.value.key, info.value.expected_version) == ("Page", 1, 1)
    assert _row(engine)[0] == "other"


@pytest.mark.parametrize(
    ("model", "values"),
    [(Plain, {}), (Page, {"version": 5}), (Page, {"id": 2}), (Page, {"nope": 1})],
)
def test_bad_calls_are_configuration_errors(
    engine: sa.Engine, model: type[Any], values: dict[str, object]
) -> None:
    """Unversioned models, setting the version or key, unknown columns: refused up front."""
    with engine.begin() as conn, pytest.raises(ConfigurationError):
        update_versioned(conn, model, 1, 1, values)


def test_conflict_listener_and_metrics(engine: sa.Engine) -> None:
    """Listeners hear every conflict; a failing listener never hides it; metrics count it."""
    heard: list[ConflictError] = []
    unsubscribe = on_conflict(heard.append)
    own = ConflictEvents()
    own.subscribe(lambda error: 1 / 0)  # a broken listener is logged, not raised
    metrics = Metrics()
    try:
        with engine.begin() as conn, pytest.raises(ConflictError):
            update_versioned(conn, Page, 1, 7, {"title": "x"}, metrics=metrics)
        with engine.begin() as conn, pytest.raises(ConflictError):
            update_versioned(conn, Page, 1, 7, {"title": "x"}, events=own)
    finally:
        unsubscribe()
    assert [(e.expected_version, e.current_version) for e in heard] == [(7, 1)]
    assert (
        metrics.registry.get_sample_value("hardening_lock_conflicts_total", {"entity": "Page"}) == 1
    )


# --- retries and lost updates ------------------------------------------------------------


def test_retry_reraises_last_conflict_after_attempts() -> None:
    """When every attempt conflicts, the last ConflictError propagates after N calls."""
    calls: list[int] = []
    waits: list[float] = []

    @retry_on_conflict(attempts=4, backoff=Backoff(base=0.1, jitter=False), sleep=waits.append)
    def always() -> None:
        calls.append(1)
        raise ConflictError("Page", 1, expected_version=len(calls), current_version=9)

    with pytest.raises(ConflictError) as info:
        always()
    assert len(calls) == 4
    assert info.value.expected_version == 4
    assert waits == [0.1, 0.2, 0.4]


@pytest.mark.anyio
async def test_retry_async_function() -> None:
    """The decorator also retries coroutines, waiting with the async sleep."""
    calls: list[int] = []
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    @retry_on_conflict(attempts=3, async_sleep=no_wait)
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConflictError("Page", 1, expected_version=1, current_version=2)
        return "saved"

    assert await flaky() == "saved"
    assert len(waits) == 2
    assert all(0 <= w <= 0.02 for w in waits)


def test_retry_needs_positive_attempts() -> None:
    """Zero attempts is a configuration error."""
    with pytest.raises(ConfigurationError):
        retry_on_conflict(attempts=0)


def _increment_threads(engine: sa.Engine, *, retry: bool) -> tuple[int, int]:
    """16 threads x 50 read-modify-write increments; return (successes, conflicts)."""
    successes, conflicts = [0], [0]
    lock = threading.Lock()

    def increment() -> None:
        with Session(engine) as session, session.begin():
            version, views = session.execute(
                sa.select(Page.version, Page.views).where(Page.id == 1)
            ).one()
            update_versioned(session, Page, 1, version, {"views": views + 1})

    attempt = (
        retry_on_conflict(attempts=200, backoff=Backoff(base=0.005, cap=0.1))(increment)
        if retry
        else increment
    )

    def worker() -> None:
        for _ in range(50):
            try:
                attempt()
            except ConflictError:
                with lock:
                    conflicts[0] += 1
            else:
                with lock:
                    successes[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=110)
    return successes[0], conflicts[0]


@pytest.mark.slow
def test_lost_update_impossible_with_retry(pg_engine: sa.Engine) -> None:
    """16 threads x 50 increments through retry_on_conflict end at exactly 800 on PostgreSQL."""
    Base.metadata.create_all(pg_engine)
    with Session(pg_engine) as session, session.begin():
        session.add(Page(id=1, title="counter"))
    successes, conflicts = _increment_threads(pg_engine, retry=True)
    assert (successes, conflicts) == (800, 0)
    assert _row(pg_engine)[1:] == (801, 800)


@pytest.mark.slow
def test_without_retry_every_lost_write_raises(pg_engine: sa.Engine) -> None:
    """Without retry, writes that lose a race raise ConflictError; none vanishes silently."""
    Base.metadata.create_all(pg_engine)
    with Session(pg_engine) as session, session.begin():
        session.add(Page(id=1, title="counter"))
    successes, conflicts = _increment_threads(pg_engine, retry=False)
    assert successes + conflicts == 800
    assert _row(pg_engine)[2] == successes  # every success counted, nothing else
    assert _row(pg_engine)[1] == successes + 1


# --- async -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_update_on_postgres(pg_async_engine: Any) -> None:
    """The async twin saves and conflicts the same way on PostgreSQL (psycopg async)."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(Page).values(id=1, title="a", views=0))
    factory = async_sessionmaker(pg_async_engine, class_=AsyncSession)
    async with factory() as session, session.begin():
        assert await update_versioned_async(session, Page, 1, 1, {"title": "b"}) == 2
    async with pg_async_engine.begin() as conn:
        with pytest.raises(ConflictError) as info:
            await update_versioned_async(conn, Page, 1, 1, {"title": "c"})
    assert info.value.current_version == 2
    async with pg_async_engine.begin() as conn:
        with pytest.raises(NotFoundError):
            await update_versioned_async(conn, Page, 5, 1, {"title": "c"})


@pytest.mark.anyio
async def test_async_stale_orm_flush(pg_async_engine: Any) -> None:
    """An AsyncSession on VersionedSession raises ConflictError for a stale flush."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(Page).values(id=1, title="a", views=0))
    factory = async_sessionmaker(pg_async_engine, sync_session_class=VersionedSession)
    async with factory() as session:
        page = await session.get(Page, 1)
        assert page is not None
        async with pg_async_engine.begin() as conn:
            await update_versioned_async(conn, Page, 1, 1, {"title": "other"})
        page.title = "mine"
        with pytest.raises(ConflictError) as info:
            await session.commit()
    assert (info.value.expected_version, info.value.current_version) == (1, 2)


# --- an existing table gains a version column --------------------------------------------


def test_existing_rows_get_version_one(sql_engine: sa.Engine) -> None:
    """The documented migration adds ``version`` to a table with rows, all at version 1."""
    with sql_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE pages (id INTEGER PRIMARY KEY, title VARCHAR(200), "
                "views INTEGER NOT NULL DEFAULT 0)"
            )
        )
        conn.execute(sa.text("INSERT INTO pages (id, title) VALUES (1, 'a'), (2, 'b')"))
        # the migration (docs/locking.md): one statement, no table rewrite on PostgreSQL 11+
        conn.execute(sa.text("ALTER TABLE pages ADD COLUMN version INTEGER NOT NULL DEFAULT 1"))
    with sql_engine.begin() as conn:
        assert update_versioned(conn, Page, 2, 1, {"title": "B"}) == 2
        assert conn.execute(sa.select(Page.id, Page.version).order_by(Page.id)).all() == [
            (1, 1),
            (2, 2),
        ]


# --- ETag and If-Match -------------------------------------------------------------------


def test_etag_round_trip() -> None:
    """The ETag of a version, sent back in If-Match, matches and names that version."""
    tag = etag_for(42)
    assert tag == '"v42"'
    check_if_match(tag, 42)
    assert if_match_version(tag) == 42
    check_if_match(f'"v1", {tag}', 42)  # a list matches if any tag does
    check_if_match("*", 42)


def test_stale_if_match_is_412() -> None:
    """An If-Match naming an old version is a precondition failure with the current tag."""
    with pytest.raises(PreconditionFailed) as info:
        check_if_match('"v3"', 4)
    assert (info.value.reason, info.value.current_etag) == ("stale", '"v4"')
    assert info.value.http_status == 412


def test_weak_tags_never_match() -> None:
    """If-Match uses strong comparison: W/ tags fail."""
    with pytest.raises(PreconditionFailed):
        check_if_match('W/"v4"', 4)


def test_missing_if_match_when_required_is_428() -> None:
    """A required but absent If-Match is 428 Precondition Required."""
    with pytest.raises(PreconditionRequired):
        check_if_match(None, 1, required=True)
    with pytest.raises(PreconditionRequired):
        if_match_version("  ")
    check_if_match(None, 1)  # optional: fine


@pytest.mark.parametrize(
    "header", ["v4", '"v4', 'v4"', '"v"4"', '"v4" "v5"', "W/v4", '"\x00"', "x" * 9000]
)
def test_malformed_if_match_is_refused_clearly(header: str) -> None:
    """Malformed values fail as 412 with reason 'malformed', never another exception."""
    with pytest.raises(PreconditionFailed) as info:
        check_if_match(header, 4)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    "header", ['"4"', '"v04"', '"v-1"', 'W/"v4"', '"v1", "v2"', '"v99999999999999999999"']
)
def test_if_match_version_only_accepts_our_tags(header: str) -> None:
    """A base version comes only from one strong tag that etag_for made."""
    with pytest.raises(PreconditionFailed):
        if_match_version(header)


@given(st.text(max_size=300), st.integers(min_value=0, max_value=10**9))
def test_any_if_match_gives_only_precondition_errors(header: str, version: int) -> None:
    """Property: hostile headers only ever raise the precondition errors."""
    for check in (lambda: check_if_match(header, version), lambda: if_match_version(header)):
        with contextlib.suppress(PreconditionFailed, PreconditionRequired):
            check()


def test_documented_indexes_build_on_postgres(pg_engine: sa.Engine) -> None:
    """The docs' index declarations create on real PostgreSQL; the seeds' NOW() one cannot."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "locking.md").read_text()
    snippet = next(s for s in page.split("```python\n")[1:] if "CreateIndex" in s)
    namespace: dict[str, Any] = {}
    exec(snippet.split("```")[0], namespace)
    namespace["metadata"].create_all(pg_engine)  # tables and their indexes
    with pg_engine.connect() as conn:
        names = set(
            conn.execute(
                sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            ).scalars()
        )
    assert {
        "pages_updated_recent_idx",
        "blocks_data_gin_idx",
        "pages_workspace_updated_idx",
    } <= names
    with pg_engine.begin() as conn, pytest.raises(sa.exc.ProgrammingError, match="IMMUTABLE"):
        conn.execute(
            sa.text(
                "CREATE INDEX seed_idx ON pages(updated_at DESC) "
                "WHERE updated_at > NOW() - INTERVAL '7 days'"
            )
        )


class Membership(Versioned, Base):
    __tablename__ = "memberships"
    org_id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(20))


def test_composite_primary_key(engine: sa.Engine) -> None:
    """Composite keys are given as a tuple; a wrong arity is refused."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Membership).values(org_id=1, user_id=2, role="member"))
        assert update_versioned(conn, Membership, (1, 2), 1, {"role": "admin"}) == 2
        with pytest.raises(ConflictError) as info:
            update_versioned(conn, Membership, (1, 2), 1, {"role": "owner"})
        assert info.value.key == (1, 2)
        with pytest.raises(ConfigurationError):
            update_versioned(conn, Membership, 1, 2, {"role": "owner"})
