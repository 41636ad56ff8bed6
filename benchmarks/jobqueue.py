"""Queue throughput: enqueue + process N no-op jobs, ours vs arq, rq, procrastinate and saq.

One run, same machine, same Redis and PostgreSQL, one producer+worker process per system, each
system in its own isolated namespace (Redis key prefix / database schema) cleaned up after.
Each figure is N / (time to enqueue N jobs + time until the last one is processed).

Usage: python benchmarks/jobqueue.py [--n 20000] [--only ours,arq,...]
Peers: pip install 'hardening[bench]' (arq, rq, procrastinate, saq).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: put the repository root there
# instead, so `benchmarks.queue_noop` (which rq imports by name) resolves.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa

from hardening import Job, MemoryBackend, QueueProcessor
from hardening.queue.backends.sql import SQLBackend

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


class Noop(QueueProcessor):
    queue = "bench"
    poll_interval = 0.01

    def process(self, job: Job) -> None:
        pass


def ours(backend: Any, n: int, concurrency: int) -> float:
    proc = Noop(backend, concurrency=concurrency)
    start = time.perf_counter()
    for i in range(n):
        proc.enqueue({"i": i})
    proc.run_until_empty()
    elapsed = time.perf_counter() - start
    done = proc.stats().completed
    if done != n:
        raise RuntimeError(f"only {done} of {n} jobs completed")
    return elapsed


def ours_memory(n: int) -> float:
    return ours(MemoryBackend(), n, concurrency=8)


def ours_redis(n: int) -> float:
    from hardening.queue.backends.redis import RedisBackend

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench-ours-{uuid.uuid4().hex[:6]}"
    try:
        return ours(RedisBackend(client, key_prefix=prefix), n, concurrency=16)
    finally:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i : i + 5000])
        client.close()


@contextlib.contextmanager
def pg_schema() -> Any:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def ours_postgres(n: int) -> float:
    with pg_schema() as schema:
        engine = sa.create_engine(
            PG_URL, connect_args={"options": f"-csearch_path={schema}"}, pool_size=20
        )
        backend = SQLBackend(engine)
        backend.create_schema()
        try:
            return ours(backend, n, concurrency=16)
        finally:
            engine.dispose()


def arq_bench(n: int) -> float:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def noop(ctx: dict[str, Any], i: int) -> None:
        return None

    async def main() -> float:
        name = f"bench-arq-{uuid.uuid4().hex[:6]}"
        pool = await create_pool(RedisSettings())
        start = time.perf_counter()
        for i in range(n):
            await pool.enqueue_job("noop", i, _queue_name=name)
        worker = Worker(
            functions=[func(noop, name="noop")],
            redis_pool=pool,
            burst=True,
            queue_name=name,
            max_jobs=16,
            keep_result=0,
            poll_delay=0.01,
            handle_signals=False,
        )
        await worker.async_run()
        elapsed = time.perf_counter() - start
        if worker.jobs_complete != n:
            raise RuntimeError(f"arq completed {worker.jobs_complete} of {n}")
        await worker.close()
        return elapsed

    return asyncio.run(main())


def rq_bench(n: int) -> float:
    import rq

    client = redis.Redis.from_url(REDIS_URL)
    queue = rq.Queue(f"bench-rq-{uuid.uuid4().hex[:6]}", connection=client)
    start = time.perf_counter()
    for i in range(n):
        queue.enqueue("benchmarks.queue_noop.noop", i, result_ttl=0)
    worker = rq.SimpleWorker([queue], connection=client)  # no fork per job: rq at its fastest
    worker.work(burst=True, logging_level="ERROR")
    elapsed = time.perf_counter() - start
    if queue.count != 0:
        raise RuntimeError(f"rq left {queue.count} jobs")
    queue.delete(delete_jobs=True)
    return elapsed


def procrastinate_bench(n: int) -> float:
    import procrastinate

    with pg_schema() as schema:

        async def main() -> float:
            connector = procrastinate.PsycopgConnector(
                conninfo=PG_DSN, kwargs={"options": f"-csearch_path={schema}"}
            )
            app = procrastinate.App(connector=connector)

            @app.task(name="noop")
            async def noop(i: int) -> None:
                return None

            async with app.open_async():
                await app.schema_manager.apply_schema_async()
                start = time.perf_counter()
                for i in range(n):
                    await noop.defer_async(i=i)
                await app.run_worker_async(
                    wait=False, concurrency=16, install_signal_handlers=False
                )
                return time.perf_counter() - start

        return asyncio.run(main())


def saq_bench(n: int) -> float:
    from saq import Queue, Worker

    async def noop(ctx: dict[str, Any], **kwargs: Any) -> None:
        return None

    async def main() -> float:
        queue = Queue.from_url(REDIS_URL, name=f"bench-saq-{uuid.uuid4().hex[:6]}")
        await queue.connect()
        done = asyncio.Event()
        count = [0]

        async def after(ctx: dict[str, Any]) -> None:
            count[0] += 1
            if count[0] >= n:
                done.set()

        worker = Worker(queue, functions=[("noop", noop)], concurrency=16, after_process=after)
        start = time.perf_counter()
        for i in range(n):
            await queue.enqueue("noop", i=i, ttl=0)
        task = asyncio.create_task(worker.start())
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - start
        await worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await queue.disconnect()
        return elapsed

    return asyncio.run(main())


SYSTEMS: dict[str, Callable[[int], float]] = {
    "ours-memory": ours_memory,
    "ours-redis": ours_redis,
    "ours-postgres": ours_postgres,
    "arq (redis)": arq_bench,
    "rq (redis, SimpleWorker)": rq_bench,
    "saq (redis)": saq_bench,
    "procrastinate (postgres)": procrastinate_bench,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--only", default="", help="comma-separated names")
    args = parser.parse_args()
    rates: dict[str, float] = {}
    for name, bench in SYSTEMS.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        try:
            elapsed = bench(args.n)
        except Exception as exc:  # a peer that fails to run is reported, not fatal
            print(f"{name:<28} failed: {type(exc).__name__}: {exc}")
            continue
        rates[name] = args.n / elapsed
        print(f"{name:<28} {elapsed:8.2f} s  {rates[name]:10,.0f} jobs/s", flush=True)
    print()
    for mine, peer, target in (
        ("ours-redis", "arq (redis)", 2.0),
        ("ours-redis", "rq (redis, SimpleWorker)", None),
        ("ours-redis", "saq (redis)", None),
        ("ours-postgres", "procrastinate (postgres)", 3.0),
    ):
        if mine in rates and peer in rates:
            goal = f"   (target >= {target}x)" if target else ""
            print(f"{mine} / {peer}: {rates[mine] / rates[peer]:.2f}x{goal}")


if __name__ == "__main__":
    main()
