"""Data access on PostgreSQL: batched inserts against row-by-row ORM, keyset against OFFSET.

One run, one database, a fresh schema dropped at the end.

1. 100,000 rows into a 5-column table (bigint key, unique varchar, varchar, float, timestamptz),
   empty before each path (TRUNCATE), one transaction per path unless said otherwise:
   - ORM row by row: ``session.add(Item(...)); session.flush()`` for every row, one commit at
     the end: one INSERT round trip per row (the seeds' "before");
   - ORM ``add_all`` + one commit: SQLAlchemy 2 batches the flush itself (insertmanyvalues);
   - Core ``executemany`` in chunks of 1,000 (no validation, no bad-row isolation);
   - ``insert_batches(method="executemany")`` and ``insert_batches`` (auto: ``COPY``), batches
     of 1,000 and 10,000, each batch its own transaction (the default with an engine).
2. Page 1,000 (limit 50) of a 1,000,000-row table ordered by ``created_at DESC, id DESC`` with
   an index on ``(created_at, id)``: ``OFFSET 49950`` against ``paginate(after=cursor)``
   (median of 25 runs each, after a warm-up), and the time to walk pages 1 to 1,000 each way.

Usage: python -m benchmarks.data [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening import insert_batches, paginate

SECRET = "benchmark-secret-0123456789abcdef"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(32), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    price: Mapped[float]
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


class Event(Base):
    __tablename__ = "bench_events"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    body: Mapped[str]
    __table_args__ = (sa.Index("bench_events_created_idx", "created_at", "id"),)


items = Item.__table__


def _rows(n: int) -> list[dict[str, Any]]:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [
        {
            "id": i,
            "sku": f"SKU-{i:08d}",
            "name": f"item number {i}",
            "price": i * 0.25,
            "created_at": start + dt.timedelta(seconds=i),
        }
        for i in range(n)
    ]


def _timed(engine: sa.Engine, run: Callable[[], object], expected: int) -> float:
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE bench_items"))
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(items)).scalar_one()
    if count != expected:
        raise SystemExit(f"expected {expected} rows, found {count}")
    return elapsed


def inserts(engine: sa.Engine, n: int) -> list[tuple[str, float]]:
    rows = _rows(n)

    def orm_row_by_row() -> None:
        with Session(engine) as session:
            for row in rows:
                session.add(Item(**row))
                session.flush()
            session.commit()

    def orm_add_all() -> None:
        with Session(engine) as session:
            session.add_all([Item(**row) for row in rows])
            session.commit()

    def core_executemany() -> None:
        with engine.begin() as conn:
            for start in range(0, n, 1000):
                conn.execute(sa.insert(items), rows[start : start + 1000])

    paths: dict[str, Callable[[], object]] = {
        "ORM, add + flush per row": orm_row_by_row,
        "ORM, add_all + one commit": orm_add_all,
        "Core executemany, chunks of 1,000": core_executemany,
        "insert_batches, executemany, 1,000/batch": lambda: insert_batches(
            engine, items, rows, method="executemany"
        ),
        "insert_batches, executemany, 10,000/batch": lambda: insert_batches(
            engine, items, rows, method="executemany", batch_size=10_000
        ),
        "insert_batches, COPY, 1,000/batch": lambda: insert_batches(engine, items, rows),
        "insert_batches, COPY, 10,000/batch": lambda: insert_batches(
            engine, items, rows, batch_size=10_000
        ),
    }
    return [(name, _timed(engine, run, n)) for name, run in paths.items()]


def pages(engine: sa.Engine, total: int, page: int, limit: int) -> dict[str, float]:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO bench_events (id, created_at, body) SELECT g, "
                "timestamptz '2026-01-01' + (g / 3) * interval '1 second', md5(g::text) "
                "FROM generate_series(1, :n) g"
            ),
            {"n": total},
        )
        conn.execute(sa.text("ANALYZE bench_events"))
    order = [Event.created_at.desc()]  # the tie-break follows: id DESC
    query = sa.select(Event)
    results: dict[str, float] = {}
    with Session(engine) as session:
        started = time.perf_counter()
        cursor = None
        for _ in range(page - 1):
            cursor = paginate(
                session, query, order_by=order, limit=limit, after=cursor, secret=SECRET
            ).next_cursor
            session.expunge_all()
        results["walk keyset"] = time.perf_counter() - started
        offset_query = (
            sa.select(Event).order_by(Event.created_at.desc(), Event.id.desc()).limit(limit)
        )
        started = time.perf_counter()
        for number in range(page - 1):
            session.scalars(offset_query.offset(number * limit)).all()
            session.expunge_all()
        results["walk offset"] = time.perf_counter() - started

        last = session.scalars(offset_query.offset((page - 2) * limit)).all()[-1]
        raw_query = offset_query.where(
            sa.tuple_(Event.created_at, Event.id) < sa.tuple_(last.created_at, last.id)
        )

        def keyset_page() -> list[int]:
            found = paginate(
                session, query, order_by=order, limit=limit, after=cursor, secret=SECRET
            )
            return [e.id for e in found.items]

        def raw_keyset_page() -> list[int]:
            return [e.id for e in session.scalars(raw_query)]

        def offset_page() -> list[int]:
            return [e.id for e in session.scalars(offset_query.offset((page - 1) * limit))]

        if not keyset_page() == raw_keyset_page() == offset_page():
            raise SystemExit("keyset and OFFSET disagree on the page's rows")
        runs = {"keyset": keyset_page, "raw keyset": raw_keyset_page, "offset": offset_page}
        for name, run in runs.items():
            times = []
            for _ in range(3):
                run()
                session.expunge_all()
            for _ in range(25):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
                session.expunge_all()
            results[name] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(args.url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        Base.metadata.create_all(engine)
        print(f"{args.rows:,}-row insert (one run each)")
        timings = inserts(engine, args.rows)
        slowest = timings[0][1]
        print(f"{'path':<46}{'seconds':>9}{'rows/s':>12}{'vs row by row':>15}")
        for name, seconds in timings:
            print(
                f"{name:<46}{seconds:>9.2f}{args.rows / seconds:>12,.0f}{slowest / seconds:>14.1f}x"
            )
        print(f"\npage {args.page} (limit {args.limit}) of {args.table_rows:,} rows")
        result = pages(engine, args.table_rows, args.page, args.limit)
        print(f"{'OFFSET':<30}{result['offset'] * 1000:>9.2f} ms")
        print(f"{'keyset (paginate)':<30}{result['keyset'] * 1000:>9.2f} ms")
        print(f"{'keyset (hand-written SQL)':<30}{result['raw keyset'] * 1000:>9.2f} ms")
        print(f"{'ratio':<30}{result['offset'] / result['keyset']:>9.1f}x")
        print(f"walk pages 1-{args.page - 1}: OFFSET {result['walk offset']:.2f} s, "
              f"keyset {result['walk keyset']:.2f} s")  # fmt: skip
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
