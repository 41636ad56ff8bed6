"""``SQLBackend.stats()`` at a large history: the bounded counts vs the grouped count it replaced.

Fills a queue with ``--rows`` finished jobs (1% dead) and 1,000 waiting ones on PostgreSQL,
runs ``ANALYZE``, then times ``stats()`` and the earlier implementation's one grouped
``count(*)`` over the queue (5 runs each after a warm-up, medians). Both answers are printed:
the waiting count must agree; past 10,000 the finished counts are the planner's estimate
(``finished_exact=False``).

Usage: python -m benchmarks.queue_stats [--rows 1000000] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from hardening.queue.backends.sql import SQLBackend

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def timed(call: Callable[[], object], runs: int = 5) -> tuple[float, object]:
    """Median seconds of ``runs`` calls after one warm-up, and the last answer."""
    answer = call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        answer = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    args = parser.parse_args()
    url = args.postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    schema = f"bench_stats_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        backend = SQLBackend(engine)
        backend.create_schema()
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO hardening_jobs (id, queue, payload, state, max_attempts, "
                    "created_at, run_at, finished_at, history) SELECT md5(g::text), 'q', '{}', "
                    "CASE WHEN g % 100 = 0 THEN 'dead' ELSE 'completed' END, 3, 1, 1, 2 + g, "
                    "'[]' FROM generate_series(1, :rows) g"
                ),
                {"rows": args.rows},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO hardening_jobs (id, queue, payload, state, max_attempts, "
                    "created_at, run_at, history) SELECT md5('w' || g::text), 'q', '{}', "
                    "'waiting', 3, 1, 1, '[]' FROM generate_series(1, 1000) g"
                )
            )
            conn.execute(sa.text("ANALYZE hardening_jobs"))
        t = backend.table
        grouped = sa.select(t.c.state, sa.func.count()).where(t.c.queue == "q").group_by(t.c.state)

        def old() -> object:
            with engine.connect() as conn:
                return dict(conn.execute(grouped).all())  # type: ignore[arg-type]

        old_s, old_answer = timed(old)
        new_s, new_answer = timed(lambda: backend.stats("q"))
        print(f"{args.rows:,} finished jobs, 1,000 waiting; PostgreSQL")
        print(f"grouped count(*) (before): {old_s * 1000:.1f} ms  {old_answer}")
        print(f"stats() (now):             {new_s * 1000:.1f} ms  {new_answer}")
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
