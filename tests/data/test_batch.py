"""Batched inserts on real SQLite and PostgreSQL: fast, and bad rows never sink good ones."""

from __future__ import annotations

import datetime as dt
import itertools
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening import (
    ConfigurationError,
    InsertReport,
    RowRejected,
    insert_batches,
    insert_batches_async,
)


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(40), unique=True)
    score: Mapped[float | None]
    joined: Mapped[dt.date | None]
    team_id: Mapped[int | None] = mapped_column(sa.ForeignKey("teams.id"))
    kind_: Mapped[str] = mapped_column("kind", sa.String(10), default="member")
    created: Mapped[dt.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(sa.String(20), default=lambda: f"T-{next(_codes)}")


_codes = itertools.count(1)
members = Member.__table__


@pytest.fixture
def engine(sql_engine: sa.Engine) -> Iterator[sa.Engine]:
    """Each backend with the tables, foreign keys enforced on SQLite too, and one team."""
    if sql_engine.dialect.name == "sqlite":
        sa.event.listen(
            sql_engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON")
        )
        sql_engine.dispose()
    Base.metadata.create_all(sql_engine)
    with sql_engine.begin() as conn:
        conn.execute(sa.insert(Team).values(id=1))
    return sql_engine


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(members)).scalar_one())


def _rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": i, "email": f"m{i}@example.com", "score": i / 2} for i in range(start, start + n)
    ]


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
def test_a_hundred_thousand_rows(engine: sa.Engine) -> None:
    """100,000 rows land in one call, COPY on PostgreSQL (executemany on SQLite)."""
    progress: list[tuple[int, int | None]] = []
    report = insert_batches(
        engine,
        members,
        _rows(100_000),
        batch_size=5000,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert (report.inserted, report.skipped, report.rejected, report.batches) == (
        100_000,
        0,
        (),
        20,
    )
    assert report.method == ("copy" if engine.dialect.name == "postgresql" else "executemany")
    assert _count(engine) == 100_000
    assert progress == [(5000 * (i + 1), 100_000) for i in range(20)]
    with engine.connect() as conn:  # server defaults were applied
        assert (
            conn.execute(sa.select(sa.func.count()).where(members.c.created.is_(None))).scalar()
            == 0
        )


@pytest.mark.parametrize("method", ["auto", "executemany"])
def test_bad_rows_are_reported_and_the_rest_land(engine: sa.Engine, method: str) -> None:
    """Validator and database refusals alike are reported by index; every good row lands."""
    rows: list[Any] = _rows(3000)
    bad = {
        5: {"id": 5, "email": None},  # NULL in NOT NULL
        17: {"id": 17, "email": "m17@example.com", "score": "high"},  # wrong type
        18: {"id": 18, "email": "x" * 41},  # too long
        19: {"id": 19, "email": "m19@example.com", "nickname": "x"},  # unknown column
        20: {"id": 20},  # missing required column
        21: ["not", "a", "mapping"],
        22: {"id": 22, "email": "m22@example.com", "joined": dt.datetime(2026, 1, 1)},
        1500: {"id": 1500, "email": "m3@example.com"},  # duplicate email: the database says no
        2999: {"id": 2, "email": "dup-id@example.com"},  # duplicate primary key
        2000: {"id": 2000, "email": "m2000@example.com", "team_id": 99},  # no such team
    }
    for index, row in bad.items():
        rows[index] = row
    report = insert_batches(engine, members, rows, batch_size=1000, method=method)  # type: ignore[arg-type]
    assert [r.index for r in report.rejected] == sorted(bad)
    assert [r.row for r in report.rejected] == [bad[i] for i in sorted(bad)]
    reasons = {r.index: r.reason.lower() for r in report.rejected}
    assert "null" in reasons[5]
    assert "expected float" in reasons[17]
    assert "longer than 40" in reasons[18]
    assert "unknown column 'nickname'" in reasons[19]
    assert "missing" in reasons[20]
    assert "mapping" in reasons[21]
    assert "expected date" in reasons[22]
    assert "unique" in reasons[1500]
    assert "foreign key" in reasons[2000]
    assert report.inserted == _count(engine) == 3000 - len(bad)


def test_orm_attribute_names_and_python_defaults(engine: sa.Engine) -> None:
    """A model's attribute names are accepted; Python-side defaults apply, with COPY too."""
    report = insert_batches(
        engine, Member, [{"id": 1, "email": "a@x", "kind_": "admin"}, {"id": 2, "email": "b@x"}]
    )
    assert report.inserted == 2
    with Session(engine) as session:
        assert [m.kind_ for m in session.scalars(sa.select(Member).order_by(Member.id))] == [
            "admin",
            "member",
        ]
    tickets = insert_batches(engine, Ticket, [{"id": 1}, {"id": 2, "code": "mine"}])
    with Session(engine) as session:
        codes = list(session.scalars(sa.select(Ticket.code).order_by(Ticket.id)))
    assert codes[0].startswith("T-")
    assert codes[1] == "mine"
    if engine.dialect.name == "postgresql":
        assert report.method == "copy"  # the scalar default of "kind" is sent along
        assert tickets.method == "copy+executemany"  # a callable default needs an INSERT


def test_stop_on_error_keeps_earlier_batches_per_batch(engine: sa.Engine) -> None:
    """Per-batch transactions: batches before the bad row stay, its batch is rolled back."""
    rows = _rows(250)
    rows[130] = {"id": 130, "email": "m3@example.com"}
    with pytest.raises(RowRejected) as info:
        insert_batches(engine, members, rows, batch_size=100, stop_on_error=True)
    assert info.value.index == 130
    assert "unique" in info.value.reason.lower()
    assert info.value.http_status == 422
    assert info.value.report is not None
    assert info.value.report.inserted == 100
    assert _count(engine) == 100
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.index, again.report) == (130, info.value.report)


def test_stop_on_error_in_one_transaction_leaves_nothing(engine: sa.Engine) -> None:
    """transaction="single" with an engine: a stop rolls every batch back (SAVEPOINTs nest)."""
    rows = _rows(250)
    rows[230] = {"id": 230, "email": None}
    with pytest.raises(RowRejected) as info:
        insert_batches(
            engine, members, rows, batch_size=100, stop_on_error=True, transaction="single"
        )
    assert info.value.index == 230
    assert info.value.report is not None
    assert info.value.report.inserted == 0
    assert _count(engine) == 0
    rows[230] = {"id": 230, "email": "m1@example.com"}  # refused by the database this time
    with pytest.raises(RowRejected, match="230"):
        insert_batches(
            engine, members, rows, batch_size=100, stop_on_error=True, transaction="single"
        )
    assert _count(engine) == 0


def test_single_transaction_rolls_back_with_the_caller(engine: sa.Engine) -> None:
    """With a Session, nothing is committed behind the caller's back (bad rows isolated)."""
    rows = _rows(300)
    rows[150] = {"id": 150, "email": "m1@example.com"}
    with Session(engine) as session:
        report = insert_batches(session, members, rows, batch_size=100)
        assert report.inserted == 299
        assert [r.index for r in report.rejected] == [150]
        session.rollback()
    assert _count(engine) == 0
    with Session(engine) as session:
        insert_batches(session, members, rows, batch_size=100)
        session.commit()
    assert _count(engine) == 299


def test_per_batch_commits_through_a_session_or_connection(engine: sa.Engine) -> None:
    """transaction="per_batch" commits the caller's Session or Connection after each batch."""
    with Session(engine) as session:
        insert_batches(session, members, _rows(150), batch_size=100, transaction="per_batch")
    with engine.connect() as conn:
        insert_batches(conn, members, _rows(150, 150), batch_size=100, transaction="per_batch")
    assert _count(engine) == 300


def test_upserts(engine: sa.Engine) -> None:
    """ignore skips conflicting rows; update overwrites; a column list updates only those."""
    insert_batches(engine, members, _rows(10))
    changed = [{"id": i, "email": f"new{i}@example.com", "score": 100.0} for i in range(5, 15)]
    ignored = insert_batches(engine, members, changed, upsert="ignore")
    assert (ignored.inserted, ignored.skipped) == (5, 5)
    with engine.connect() as conn:
        emails = {r.id: r.email for r in conn.execute(sa.select(members.c.id, members.c.email))}
    assert emails[5] == "m5@example.com"
    assert emails[14] == "new14@example.com"

    only_score = [{"id": 5, "email": "other@example.com", "score": 7.0}]
    insert_batches(engine, members, only_score, upsert=["score"])
    updated = insert_batches(engine, members, changed[:3], upsert="update")
    assert (updated.inserted, updated.skipped) == (3, 0)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(members))}
    assert (rows[5].email, rows[5].score) == ("new5@example.com", 100.0)
    assert rows[6].email == "new6@example.com"
    assert rows[8].email == "m8@example.com"

    by_email = [{"id": 99, "email": "m1@example.com", "score": -1.0}]
    report = insert_batches(engine, members, by_email, upsert="update", conflict_target=["email"])
    assert report.inserted == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(members.c.score).where(members.c.id == 1)).scalar() == -1.0


def test_generators_are_read_one_batch_at_a_time(engine: sa.Engine) -> None:
    """A generator's total is unknown (None); progress still counts every row."""
    consumed: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for row in _rows(25):
            consumed.append(row["id"])
            yield row

    progress: list[tuple[int, int | None]] = []
    seen_at_first_batch: list[int] = []

    def on_progress(done: int, total: int | None) -> None:
        progress.append((done, total))
        if not seen_at_first_batch:
            seen_at_first_batch.append(len(consumed))

    insert_batches(engine, members, rows(), batch_size=10, on_progress=on_progress)
    assert progress == [(10, None), (20, None), (25, None)]
    assert seen_at_first_batch == [10]


def test_refused_options(engine: sa.Engine) -> None:
    """Unknown methods, bad batch sizes, COPY where it cannot run, strangers as targets."""
    cases: list[dict[str, Any]] = [
        {"batch_size": 0},
        {"method": "values"},
        {"transaction": "sometimes"},
        {"upsert": "replace"},
        {"upsert": ["nope"]},
        {"conflict_target": ["email"]},
        {"upsert": "update", "conflict_target": ["nope"]},
    ]
    if engine.dialect.name == "sqlite":
        cases.append({"method": "copy"})
    else:
        cases.append({"method": "copy", "upsert": "ignore"})
    for options in cases:
        with pytest.raises(ConfigurationError):
            insert_batches(engine, members, _rows(1), **options)
    with pytest.raises(ConfigurationError):
        insert_batches("sqlite://", members, [])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        insert_batches(engine, object, [])  # type: ignore[arg-type]
    assert _count(engine) == 0


def test_report_is_plain_data() -> None:
    """The report is a frozen dataclass, safe to log or return."""
    report = InsertReport(inserted=1, skipped=0, rejected=(), batches=1, seconds=0.1, method="copy")
    with pytest.raises(AttributeError):
        report.inserted = 2  # type: ignore[misc]


@pytest.mark.anyio
async def test_async_engine_session_and_copy(pg_async_engine: AsyncEngine) -> None:
    """The asyncio twin: COPY through psycopg's async cursor, bad rows isolated, sessions too."""
    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    rows = _rows(5000)
    rows[42] = {"id": 42, "email": "m1@example.com", "score": 1.0}
    report = await insert_batches_async(pg_async_engine, members, rows, batch_size=2000)
    assert report.method == "copy+executemany"  # the batch with the duplicate was bisected
    assert report.inserted == 4999
    assert [r.index for r in report.rejected] == [42]
    async with AsyncSession(pg_async_engine) as session:
        more = await insert_batches_async(session, members, _rows(10, 10_000))
        assert more.inserted == 10
        await session.rollback()
    async with pg_async_engine.connect() as conn:
        with pytest.raises(RowRejected):
            await insert_batches_async(conn, members, rows[:100], stop_on_error=True)
        count = await conn.scalar(sa.select(sa.func.count()).select_from(members))
    assert count == 4999
