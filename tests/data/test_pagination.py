"""Keyset pagination on real SQLite and PostgreSQL: every row once, in order, whatever happens."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, load_only, mapped_column

from hardening import ConfigurationError, FakeClock, InvalidCursor, Page, paginate, paginate_async
from tests.data.conftest import SECRET


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    a: Mapped[int]  # few distinct values: many ties
    b: Mapped[str] = mapped_column(sa.String(10))
    c: Mapped[int | None]  # nullable
    d: Mapped[float]


class Typed(Base):
    __tablename__ = "typed"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    day: Mapped[dt.date]
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 3))
    token: Mapped[uuid.UUID]
    blob: Mapped[bytes]


entries = Entry.__table__
ROWS = 60


def _row(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": i,
        "a": rng.randrange(3),
        "b": rng.choice(["x", "y", "z", "xy"]),
        "c": rng.choice([None, 1, 2]),
        "d": rng.choice([0.5, 1.25, -3.0]),
    }


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    """Each backend with 60 entries full of duplicate values and NULLs."""
    Base.metadata.create_all(sql_engine)
    rng = random.Random(7)
    with sql_engine.begin() as conn:
        conn.execute(sa.insert(Entry), [_row(i, rng) for i in range(1, ROWS + 1)])
    return sql_engine


# an ordering: (column name, descending, nulls_first) per term
Ordering = list[tuple[str, bool, bool]]
orderings = st.lists(
    st.tuples(st.sampled_from("abcd"), st.booleans(), st.booleans()),
    min_size=0,
    max_size=4,
    unique_by=lambda term: term[0],
)


def _order_by(ordering: Ordering) -> list[Any]:
    terms = []
    for name, descending, nulls_first in ordering:
        term = getattr(Entry, name).desc() if descending else getattr(Entry, name).asc()
        if name == "c":
            term = term.nulls_first() if nulls_first else term.nulls_last()
        terms.append(term)
    return terms


def _expected(session: Session, ordering: Ordering) -> list[int]:
    """The full order, straight from the database: the terms, then id in the last direction."""
    last_descending = ordering[-1][1] if ordering else False
    tiebreak = Entry.id.desc() if last_descending else Entry.id.asc()
    query = sa.select(Entry.id).order_by(*_order_by(ordering), tiebreak)
    return list(session.scalars(query))


def _walk_forward(session: Session, ordering: Ordering, limit: int) -> list[Page[Any]]:
    pages = [
        paginate(
            session, sa.select(Entry), order_by=_order_by(ordering), limit=limit, secret=SECRET
        )
    ]
    while pages[-1].has_next:
        assert pages[-1].next_cursor is not None
        pages.append(
            paginate(
                session,
                sa.select(Entry),
                order_by=_order_by(ordering),
                limit=limit,
                after=pages[-1].next_cursor,
                secret=SECRET,
            )
        )
    return pages


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ordering=orderings, limit=st.integers(1, 13))
def test_walking_forward_and_back_visits_every_row_once_in_order(
    engine: sa.Engine, ordering: Ordering, limit: int
) -> None:
    """Any ordering (ties, NULLs, mixed directions): forward then back, every row once."""
    with Session(engine) as session:
        expected = _expected(session, ordering)
        pages = _walk_forward(session, ordering, limit)
        assert [e.id for p in pages for e in p.items] == expected
        assert all(len(p.items) == limit for p in pages[:-1])
        assert not pages[0].has_previous
        assert pages[0].previous_cursor is None
        assert pages[-1].next_cursor is None

        backward = [pages[-1]]
        while backward[-1].has_previous:
            backward.append(
                paginate(
                    session,
                    sa.select(Entry),
                    order_by=_order_by(ordering),
                    limit=limit,
                    before=backward[-1].previous_cursor,
                    secret=SECRET,
                )
            )
        assert [e.id for p in reversed(backward) for e in p.items] == expected


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ordering=orderings, seed=st.integers(0, 2**32))
def test_rows_inserted_and_deleted_between_pages_never_shift_the_others(
    engine: sa.Engine, ordering: Ordering, seed: int
) -> None:
    """Rows that exist throughout are each seen exactly once, in order, whatever else changes.

    Between two pages another connection commits two deletes and three inserts.
    """
    rng = random.Random(seed)
    order_by = _order_by(ordering)
    with engine.connect() as conn:
        initial = [dict(row._mapping) for row in conn.execute(sa.select(entries))]
    survivors = {row["id"] for row in initial}
    seen: list[int] = []
    next_id, after = ROWS + 1, None
    try:
        with Session(engine) as session:
            while True:
                page = paginate(
                    session,
                    sa.select(Entry),
                    order_by=order_by,
                    limit=4,
                    after=after,
                    secret=SECRET,
                )
                session.rollback()  # each page is its own request
                seen += [e.id for e in page.items]
                if not page.has_next:
                    break
                after = page.next_cursor
                with engine.begin() as other:
                    present = list(other.scalars(sa.select(Entry.id)))
                    doomed = rng.sample(present, k=min(2, len(present)))
                    other.execute(sa.delete(Entry).where(Entry.id.in_(doomed)))
                    other.execute(sa.insert(Entry), [_row(next_id + i, rng) for i in range(3)])
                survivors -= set(doomed)
                next_id += 3
    finally:
        with engine.begin() as conn:
            conn.execute(sa.delete(Entry))
            conn.execute(sa.insert(Entry), initial)
    assert len(seen) == len(set(seen))  # nothing twice
    assert survivors <= set(seen)  # nothing that stayed was skipped
    with Session(engine) as session:  # and the walk kept the order
        order = {entry_id: n for n, entry_id in enumerate(_expected(session, ordering))}
    positions = [order[i] for i in seen if i in order]
    assert positions == sorted(positions)


def test_cursor_tampering_is_rejected(engine: sa.Engine) -> None:
    """A flipped byte, another secret, another ordering, garbage: InvalidCursor (HTTP 400)."""
    with Session(engine) as session:
        page = paginate(session, sa.select(Entry), order_by=[Entry.a], limit=5, secret=SECRET)
        cursor = page.next_cursor
        assert cursor is not None
        assert cursor.isascii()
        flipped = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
        cases = {
            flipped: "signature",
            cursor[:-3]: "signature",
            "": "malformed",
            "not a cursor!": "malformed",
            "x" * 5000: "malformed",
        }
        for bad, reason in cases.items():
            with pytest.raises(InvalidCursor) as info:
                paginate(session, sa.select(Entry), order_by=[Entry.a], after=bad, secret=SECRET)
            assert info.value.reason == reason, bad
            assert info.value.http_status == 400
        with pytest.raises(InvalidCursor, match="signature"):
            paginate(
                session,
                sa.select(Entry),
                order_by=[Entry.a],
                after=cursor,
                secret="another-secret-of-32-bytes-00000",
            )
        for other in ([Entry.a.desc()], [Entry.b], [Entry.a, Entry.b]):
            with pytest.raises(InvalidCursor) as info:
                paginate(session, sa.select(Entry), order_by=other, after=cursor, secret=SECRET)
            assert info.value.reason == "ordering"
        with pytest.raises(InvalidCursor):
            paginate(session, sa.select(Entry), order_by=[Entry.a], after=123, secret=SECRET)  # type: ignore[arg-type]
        again = paginate(
            session, sa.select(Entry), order_by=[Entry.a], limit=9, after=cursor, secret=SECRET
        )
        assert len(again.items) == 9  # another page size is fine


def test_cursors_expire_after_max_age(engine: sa.Engine) -> None:
    """With max_age, an old cursor is refused as expired."""
    clock = FakeClock()
    with Session(engine) as session:
        page = paginate(
            session, sa.select(Entry), order_by=[Entry.d], limit=5, secret=SECRET, clock=clock
        )
        clock.advance(60)
        paginate(
            session,
            sa.select(Entry),
            order_by=[Entry.d],
            after=page.next_cursor,
            secret=SECRET,
            max_age=60,
            clock=clock,
        )
        clock.advance(1)
        with pytest.raises(InvalidCursor, match="expired"):
            paginate(
                session,
                sa.select(Entry),
                order_by=[Entry.d],
                after=page.next_cursor,
                secret=SECRET,
                max_age=60,
                clock=clock,
            )


def test_first_last_and_empty_pages(engine: sa.Engine) -> None:
    """Flags and cursors at both ends, and past rows that have all been deleted."""
    with Session(engine) as session:
        whole = paginate(session, sa.select(Entry), order_by=[], limit=ROWS, secret=SECRET)
        assert (whole.has_next, whole.has_previous) == (False, False)
        assert (whole.next_cursor, whole.previous_cursor) == (None, None)
        first = paginate(session, sa.select(Entry), order_by=[], limit=2, secret=SECRET)
        session.execute(sa.delete(Entry).where(Entry.id > 2))
        empty = paginate(
            session, sa.select(Entry), order_by=[], limit=2, secret=SECRET, after=first.next_cursor
        )
        assert (empty.items, empty.has_next, empty.next_cursor) == ([], False, None)
        assert empty.has_previous
        assert empty.previous_cursor is not None
        back = paginate(
            session,
            sa.select(Entry),
            order_by=[],
            limit=2,
            secret=SECRET,
            before=empty.previous_cursor,
        )
        assert [e.id for e in back.items] == [1]  # before the position of row 2
        assert not back.has_previous
        assert back.has_next
        none = paginate(session, sa.select(Entry).where(Entry.id < 0), order_by=[], secret=SECRET)
        assert (none.items, none.next_cursor, none.previous_cursor) == ([], None, None)


def test_items_are_objects_scalars_or_rows(engine: sa.Engine) -> None:
    """One entity: objects; one column: scalars; several columns: rows (also on a Connection)."""
    with Session(engine) as session:
        objects = paginate(session, sa.select(Entry), order_by=[Entry.b], limit=3, secret=SECRET)
        assert all(isinstance(e, Entry) for e in objects.items)
        ids = paginate(session, sa.select(Entry.id), order_by=[Entry.b], limit=3, secret=SECRET)
        assert ids.items == [e.id for e in objects.items]
    with engine.connect() as conn:
        rows = paginate(
            conn,
            sa.select(entries.c.id, entries.c.b),
            order_by=[entries.c.b],
            limit=3,
            secret=SECRET,
        )
        assert [r.id for r in rows.items] == ids.items
        assert rows.items[0]._fields == ("id", "b")
        more = paginate(
            conn,
            sa.select(entries.c.id, entries.c.b),
            order_by=[entries.c.b],
            limit=3,
            after=rows.next_cursor,
            secret=SECRET,
        )
        assert not {r.id for r in more.items} & set(ids.items)


def test_expressions_and_eager_loading(engine: sa.Engine) -> None:
    """An order by an SQL expression works, and ORM options pass through."""
    order = [sa.func.lower(Entry.b).desc()]
    with Session(engine) as session:
        expected = list(
            session.scalars(
                sa.select(Entry.id).order_by(sa.func.lower(Entry.b).desc(), Entry.id.desc())
            )
        )
        seen, after = [], None
        while True:
            page = paginate(
                session,
                sa.select(Entry).options(load_only(Entry.b)),
                order_by=order,
                limit=7,
                after=after,
                secret=SECRET,
            )
            seen += [e.id for e in page.items]
            if not page.has_next:
                break
            after = page.next_cursor
        assert seen == expected


def test_values_of_every_cursor_type_round_trip(sql_engine: sa.Engine) -> None:
    """Datetimes, dates, decimals, UUIDs and bytes order pages exactly."""
    Base.metadata.create_all(sql_engine)
    rng = random.Random(3)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [
        {
            "id": i,
            "at": start + dt.timedelta(microseconds=rng.randrange(10**9)),
            "day": dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(5)),
            "amount": Decimal(rng.randrange(-5000, 5000)) / 1000,
            "token": uuid.UUID(int=rng.getrandbits(128)),
            "blob": rng.randbytes(3),
        }
        for i in range(40)
    ]
    with sql_engine.begin() as conn:
        conn.execute(sa.insert(Typed), rows)
    with Session(sql_engine) as session:
        for column in (Typed.at, Typed.day, Typed.amount, Typed.token, Typed.blob):
            expected = list(session.scalars(sa.select(Typed.id).order_by(column, Typed.id)))
            seen, after = [], None
            while True:
                page = paginate(
                    session,
                    sa.select(Typed.id),
                    order_by=[column],
                    limit=6,
                    after=after,
                    secret=SECRET,
                )
                seen += page.items
                if not page.has_next:
                    break
                after = page.next_cursor
            assert seen == expected, column


def test_refused_options(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nullable columns need a NULLs position; the statement must not order or limit itself."""
    monkeypatch.delenv("HARDENING_PAGINATION_SECRET", raising=False)
    with Session(engine) as session:
        bad: list[dict[str, Any]] = [
            {"order_by": [Entry.c]},
            {"order_by": [Entry.c.desc()]},
            {"order_by": [Entry.a], "statement": sa.select(Entry).order_by(Entry.id)},
            {"order_by": [Entry.a], "statement": sa.select(Entry).limit(3)},
            {"order_by": [Entry.a], "limit": 0},
            {"order_by": [Entry.a], "after": "x", "before": "y"},
            {"order_by": [Entry.a], "secret": "short"},
            {"order_by": [Entry.a], "secret": None},
            {"order_by": Entry.a},
            {"order_by": [Entry.a.nulls_last().desc()]},
            {"order_by": ["a"]},
        ]
        for options in bad:
            statement = options.pop("statement", sa.select(Entry))
            options.setdefault("secret", SECRET)
            with pytest.raises(ConfigurationError):
                paginate(session, statement, **options)
        monkeypatch.setenv("HARDENING_PAGINATION_SECRET", SECRET)
        page = paginate(session, sa.select(Entry), order_by=[Entry.a], limit=3)
        assert len(page.items) == 3


def test_joins_and_explicit_tiebreakers(engine: sa.Engine) -> None:
    """A join is tie-broken by both primary keys; a select with no table needs tiebreaker=."""
    other = sa.alias(entries, "other")
    joined = sa.select(entries.c.id, other.c.id.label("other_id")).join_from(
        entries, other, entries.c.a == other.c.a
    )
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(joined.subquery())).scalar_one()
        for tiebreaker in (None, [entries.c.id, other.c.id]):
            seen, after = [], None
            while True:
                page = paginate(
                    conn,
                    joined,
                    order_by=[entries.c.a],
                    limit=50,
                    after=after,
                    tiebreaker=tiebreaker,
                    secret=SECRET,
                )
                seen += [(r.id, r.other_id) for r in page.items]
                if not page.has_next:
                    break
                after = page.next_cursor
            assert len(seen) == len(set(seen)) == total
        with pytest.raises(ConfigurationError, match="tiebreaker"):
            paginate(conn, sa.select(sa.literal(1).label("x")), order_by=[], secret=SECRET)


@pytest.mark.anyio
async def test_paginate_async(pg_async_engine: AsyncEngine) -> None:
    """The asyncio twin walks the same pages, on an AsyncSession and an AsyncConnection."""
    from sqlalchemy.ext.asyncio import AsyncSession

    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        rng = random.Random(1)
        await conn.execute(sa.insert(Entry), [_row(i, rng) for i in range(1, 31)])
    async with AsyncSession(pg_async_engine) as session:
        expected = list(await session.scalars(sa.select(Entry.id).order_by(Entry.a, Entry.id)))
        seen, after = [], None
        while True:
            page = await paginate_async(
                session, sa.select(Entry), order_by=[Entry.a], limit=4, after=after, secret=SECRET
            )
            seen += [e.id for e in page.items]
            if not page.has_next:
                break
            after = page.next_cursor
        assert seen == expected
    async with pg_async_engine.connect() as conn:
        page = await paginate_async(
            conn, sa.select(entries.c.id), order_by=[entries.c.a], limit=4, secret=SECRET
        )
        assert page.items == expected[:4]
