"""Optimistic locking on PostgreSQL: update_versioned vs an ORM read-then-update vs a plain UPDATE.

One run, one database, each save in its own transaction (BEGIN ... COMMIT), paths interleaved
in rounds, best round of each. Statements per save are counted with SQLAlchemy's
``before_cursor_execute`` event (BEGIN/COMMIT excluded: the same for every path).

Usage: python benchmarks/locking.py [--url postgresql+psycopg://postgres@127.0.0.1/test] [--n 3000]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening import Versioned, update_versioned


class Base(DeclarativeBase):
    pass


class Page(Versioned, Base):
    __tablename__ = "bench_pages"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(args.url, connect_args={"options": f"-csearch_path={schema}"})
    statements = [0]

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(*_: Any) -> None:
        statements[0] += 1

    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Page), [{"id": i, "title": "t"} for i in (1, 2, 3)])
        versions = {1: 1}

        def ours() -> None:
            with engine.begin() as conn:
                versions[1] = update_versioned(conn, Page, 1, versions[1], {"title": "x"})

        def orm_read_then_update() -> None:
            with Session(engine) as session, session.begin():
                page = session.get(Page, 2)
                assert page is not None
                page.title = "y" if page.title != "y" else "z"  # a real change: flushed

        def plain_update() -> None:
            with engine.begin() as conn:
                conn.execute(sa.update(Page).where(Page.id == 3).values(title="z"))

        prebuilt = (
            sa.update(Page).where(Page.id == sa.bindparam("pk")).values(title=sa.bindparam("title"))
        )

        def plain_prebuilt() -> None:
            with engine.begin() as conn:
                conn.execute(prebuilt, {"pk": 3, "title": "w"})

        paths: dict[str, Callable[[], None]] = {
            "update_versioned (1 statement)": ours,
            "ORM get + flush (version-checked)": orm_read_then_update,
            "plain UPDATE (no check)": plain_update,
            "plain UPDATE, prebuilt statement": plain_prebuilt,
        }
        best = dict.fromkeys(paths, 0.0)
        per_save = dict.fromkeys(paths, 0.0)
        for call in paths.values():  # warm up connections and caches
            for _ in range(200):
                call()
        for _ in range(args.rounds):
            for name, call in paths.items():
                statements[0] = 0
                n = args.n // args.rounds
                start = time.perf_counter()
                for _ in range(n):
                    call()
                rate = n / (time.perf_counter() - start)
                best[name] = max(best[name], rate)
                per_save[name] = statements[0] / n
        plain = best["plain UPDATE (no check)"]
        print(f"{'path':<40}{'saves/s':>10}{'µs/save':>10}{'stmts':>7}{'vs plain':>10}")
        for name in paths:
            print(
                f"{name:<40}{best[name]:>10,.0f}{1e6 / best[name]:>10.0f}"
                f"{per_save[name]:>7.1f}{best[name] / plain:>9.2f}x"
            )
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
