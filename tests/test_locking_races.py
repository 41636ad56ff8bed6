"""Races the database settles itself: serialization failures (40001) and deadlocks (40P01) under
REPEATABLE READ and SERIALIZABLE on real PostgreSQL are ``ConflictError`` (409, retried by
``retry_on_conflict``), never a raw ``OperationalError`` (500); and a stale ORM flush says the
row's current version, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hardening import ConflictError, Metrics, retry_on_conflict
from hardening._sql import lost_race
from hardening.locking import Versioned, VersionedSession, update_versioned
from tests.concurrency import in_threads

ISOLATIONS = ["REPEATABLE READ", "SERIALIZABLE"]


class Base(DeclarativeBase):
    pass


class Page(Versioned, Base):
    __tablename__ = "race_pages"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))


class Note(Versioned, Base):
    __tablename__ = "race_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(200))


def _setup(engine: sa.Engine, pages: int = 2) -> sa.Engine:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Page(id=i, title=f"p{i}") for i in range(1, pages + 1))
        session.add(Note(id=1, body="n"))
    return engine


def _version(engine: sa.Engine, pk: int, model: type[Any] = Page) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(model.version).where(model.id == pk)).scalar_one())


def _cause_sqlstate(error: BaseException) -> str | None:
    cause = error.__cause__
    return getattr(getattr(cause, "orig", None), "sqlstate", None)


# --- serialization failures --------------------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_lost_update_under_strict_isolation_is_a_conflict(
    pg_engine: sa.Engine, isolation: str
) -> None:
    """Two interleaved transactions: the second's update is a ConflictError, not a 500."""
    _setup(pg_engine)
    strict = pg_engine.execution_options(isolation_level=isolation)
    metrics = Metrics()
    with strict.connect() as first, strict.connect() as second:
        first.execute(sa.select(Page.version).where(Page.id == 1))  # takes its snapshot
        assert update_versioned(second, Page, 1, 1, {"title": "second"}) == 2
        second.commit()
        with pytest.raises(ConflictError) as info:
            update_versioned(first, Page, 1, 1, {"title": "first"}, metrics=metrics)
        first.rollback()
    conflict = info.value
    assert (conflict.entity, conflict.key, conflict.expected_version) == ("Page", 1, 1)
    assert conflict.current_version is None  # the transaction is aborted: unknown
    assert _cause_sqlstate(conflict) == "40001"
    assert lost_race(conflict.__cause__)  # type: ignore[arg-type]
    sample = metrics.registry.get_sample_value("hardening_lock_conflicts_total", {"entity": "Page"})
    assert sample == 1
    assert _version(pg_engine, 1) == 2


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_retry_on_conflict_reruns_a_lost_update(pg_engine: sa.Engine, isolation: str) -> None:
    """The same race inside ``retry_on_conflict``: the rerun reads the new version and wins."""
    _setup(pg_engine)
    strict = pg_engine.execution_options(isolation_level=isolation)
    calls: list[int] = []

    @retry_on_conflict(attempts=3, sleep=lambda _: None)
    def rename(title: str) -> int:
        calls.append(1)
        with strict.begin() as conn:
            version = conn.execute(sa.select(Page.version).where(Page.id == 1)).scalar_one()
            if len(calls) == 1:  # a concurrent save lands between our read and our write
                with pg_engine.begin() as other:
                    update_versioned(other, Page, 1, version, {"title": "other"})
            return update_versioned(conn, Page, 1, version, {"title": title})

    assert rename("mine") == 3
    assert len(calls) == 2
    assert _version(pg_engine, 1) == 3


def test_serialization_failure_at_commit_is_retried(pg_engine: sa.Engine) -> None:
    """SERIALIZABLE write skew fails at a write or at COMMIT; ``retry_on_conflict`` reruns it."""
    _setup(pg_engine)
    serializable = pg_engine.execution_options(isolation_level="SERIALIZABLE")
    calls: list[int] = []

    def titles(conn: sa.Connection) -> str:
        return "".join(conn.execute(sa.select(Page.title).order_by(Page.id)).scalars())

    @retry_on_conflict(attempts=3, sleep=lambda _: None)
    def stamp() -> None:
        calls.append(1)
        with serializable.begin() as conn:
            seen = titles(conn)  # reads both rows, then writes row 1
            if len(calls) == 1:  # another reads both and writes row 2 meanwhile
                with serializable.begin() as other:
                    titles(other)
                    update_versioned(other, Page, 2, 1, {"title": "skew"})
            update_versioned(conn, Page, 1, _version_in(conn, 1), {"title": seen[:100]})

    stamp()
    assert len(calls) == 2
    assert (_version(pg_engine, 1), _version(pg_engine, 2)) == (2, 2)


def _version_in(conn: sa.Connection, pk: int) -> int:
    return int(conn.execute(sa.select(Page.version).where(Page.id == pk)).scalar_one())


def test_last_serialization_failure_is_raised_as_a_conflict(pg_engine: sa.Engine) -> None:
    """Out of attempts, a raw 40001 (here from COMMIT) leaves as ConflictError from it."""
    _setup(pg_engine)
    serializable = pg_engine.execution_options(isolation_level="SERIALIZABLE")

    @retry_on_conflict(attempts=1)
    def skew() -> None:
        with serializable.connect() as conn, serializable.connect() as other:
            conn.execute(sa.select(Page.title))
            other.execute(sa.select(Page.title))
            conn.execute(sa.update(Page).where(Page.id == 1).values(title="a"))
            other.execute(sa.update(Page).where(Page.id == 2).values(title="b"))
            conn.commit()
            other.commit()  # the write skew is detected here

    with pytest.raises(ConflictError) as info:
        skew()
    assert info.value.entity == "transaction"
    assert _cause_sqlstate(info.value) == "40001"


def test_other_database_errors_are_not_retried(pg_engine: sa.Engine) -> None:
    """Only 40001 and 40P01 count as a lost race: a bad statement raises at once."""
    calls: list[int] = []

    @retry_on_conflict(attempts=3, sleep=lambda _: None)
    def broken() -> None:
        calls.append(1)
        with pg_engine.begin() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table"))

    with pytest.raises(sa.exc.ProgrammingError):
        broken()
    assert calls == [1]


# --- deadlocks ---------------------------------------------------------------------------


def _crossed(engine: sa.Engine, work: Callable[[int, int], object]) -> list[object]:
    """Two threads: one takes row 1 then row 2, the other row 2 then row 1."""
    orders = iter([(1, 2), (2, 1)])
    lock = threading.Lock()

    def run() -> object:
        with lock:
            first, second = next(orders)
        try:
            return work(first, second)
        except ConflictError as conflict:
            return conflict

    return in_threads(2, run, timeout=60)


def _deadlocking(engine: sa.Engine, *, retry: bool) -> Callable[[int, int], object]:
    both_hold_one = threading.Barrier(2, timeout=20)
    attempts: dict[int, int] = {}

    def touch(first: int, second: int) -> int:
        attempts[first] = attempts.get(first, 0) + 1
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '100ms'"))
            conn.execute(sa.text("SET LOCAL lock_timeout = '20s'"))  # never hang the suite
            update_versioned(conn, Page, first, _version_in(conn, first), {"title": "x"})
            if attempts[first] == 1:
                both_hold_one.wait()  # each holds one row and now asks for the other's
            return update_versioned(conn, Page, second, _version_in(conn, second), {"title": "y"})

    return retry_on_conflict(attempts=5, sleep=lambda _: None)(touch) if retry else touch


def test_deadlock_is_a_conflict(pg_engine: sa.Engine) -> None:
    """Rows locked in opposite orders: PostgreSQL kills one (40P01), which is a ConflictError."""
    _setup(pg_engine)
    outcomes = _crossed(pg_engine, _deadlocking(pg_engine, retry=False))
    conflicts = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(conflicts) == 1
    assert conflicts[0].entity == "Page"
    assert _cause_sqlstate(conflicts[0]) == "40P01"
    assert sorted((_version(pg_engine, 1), _version(pg_engine, 2))) == [2, 2]


def test_deadlock_is_retried_to_success(pg_engine: sa.Engine) -> None:
    """With ``retry_on_conflict`` the deadlock's loser runs again and both saves land."""
    _setup(pg_engine)
    outcomes = _crossed(pg_engine, _deadlocking(pg_engine, retry=True))
    assert not any(isinstance(o, ConflictError) for o in outcomes)
    assert (_version(pg_engine, 1), _version(pg_engine, 2)) == (3, 3)


# --- VersionedSession ----------------------------------------------------------------------


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    """Each SQL backend with two pages and a note at version 1."""
    return _setup(sql_engine)


def _bump(engine: sa.Engine, pk: int, times: int = 1, model: type[Any] = Page) -> None:
    for _ in range(times):
        with engine.begin() as conn:
            update_versioned(conn, model, pk, _version_in_model(conn, model, pk), {})


def _version_in_model(conn: sa.Connection, model: type[Any], pk: int) -> int:
    return int(conn.execute(sa.select(model.version).where(model.id == pk)).scalar_one())


def test_stale_flush_says_the_current_version(engine: sa.Engine) -> None:
    """The ConflictError of a stale flush carries the row's version now, not ``None``."""
    factory = sessionmaker(engine, class_=VersionedSession)
    with factory() as session:
        page = session.get(Page, 1)
        assert page is not None
        _bump(engine, 1, times=2)
        page.title = "mine"
        with pytest.raises(ConflictError) as info:
            session.flush()
        session.rollback()
        assert session.get(Page, 1) is not None  # the session works again after rollback
    conflict = info.value
    assert (conflict.entity, conflict.key) == ("Page", 1)
    assert (conflict.expected_version, conflict.current_version) == (1, 3)


def test_stale_flush_among_several_rows_finds_the_stale_one(engine: sa.Engine) -> None:
    """Several versioned rows in one flush: the conflict names the one that moved."""
    factory = sessionmaker(engine, class_=VersionedSession)
    with factory() as session:
        pages = [session.get(Page, 1), session.get(Page, 2)]
        note = session.get(Note, 1)
        _bump(engine, 2)
        for item in pages:
            item.title = "mine"  # type: ignore[union-attr]
        note.body = "mine"  # type: ignore[union-attr]
        with pytest.raises(ConflictError) as info:
            session.commit()
    conflict = info.value
    assert (conflict.entity, conflict.key) == ("Page", 2)
    assert (conflict.expected_version, conflict.current_version) == (1, 2)


def test_stale_delete_of_a_deleted_row(engine: sa.Engine) -> None:
    """Deleting a row another session changed: a conflict with its version now."""
    factory = sessionmaker(engine, class_=VersionedSession)
    with factory() as session:
        page = session.get(Page, 1)
        _bump(engine, 1)
        session.delete(page)
        with pytest.raises(ConflictError) as info:
            session.flush()
    assert (info.value.key, info.value.expected_version, info.value.current_version) == (1, 1, 2)


def test_stale_flush_on_a_callers_connection(engine: sa.Engine) -> None:
    """A session bound to the caller's connection: the version is read and the connection is
    left out of any transaction, ready for the caller's next one."""
    with engine.connect() as conn:
        conn.begin()
        session = VersionedSession(bind=conn)
        page = session.get(Page, 1)
        assert page is not None
        _bump(engine, 1)
        page.title = "mine"
        with pytest.raises(ConflictError) as info:
            session.flush()
        session.close()
        assert not conn.in_transaction()
        with conn.begin():
            assert _version_in(conn, 1) == 2
    assert info.value.current_version == 2


def test_stale_flush_in_a_savepoint_keeps_the_outer_transaction(engine: sa.Engine) -> None:
    """A stale flush inside ``begin_nested`` reads the version inside the outer transaction,
    whose own work survives."""
    factory = sessionmaker(engine, class_=VersionedSession)
    with factory() as session, session.begin():
        note, page = session.get(Note, 1), session.get(Page, 2)
        assert note is not None
        assert page is not None
        _bump(engine, 2)  # before this session writes (SQLite has one writer at a time)
        note.body = "kept"
        session.flush()
        with pytest.raises(ConflictError) as info, session.begin_nested():
            page.title = "lost"
    assert info.value.current_version == 2
    with Session(engine) as check:
        assert check.get(Note, 1).body == "kept"  # type: ignore[union-attr]


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_flush_under_strict_isolation_is_a_conflict(pg_engine: sa.Engine, isolation: str) -> None:
    """On PostgreSQL at REPEATABLE READ/SERIALIZABLE a stale flush is refused by the server
    (40001): still a ConflictError naming the row."""
    _setup(pg_engine)
    factory = sessionmaker(
        pg_engine.execution_options(isolation_level=isolation), class_=VersionedSession
    )
    with factory() as session:
        page = session.get(Page, 1)
        assert page is not None
        _bump(pg_engine, 1)
        page.title = "mine"
        with pytest.raises(ConflictError) as info:
            session.commit()
    conflict = info.value
    assert (conflict.entity, conflict.key, conflict.expected_version) == ("Page", 1, 1)
    assert _cause_sqlstate(conflict) == "40001"
