"""The queue peers' side of ``benchmarks/jobqueue.py``, run inside each peer's own venv.

``python benchmarks/queue_peers.py SYSTEM --n N --redis-url URL --postgres-url DSN`` enqueues N
no-op jobs the way the peer's users do (one call per job, the peer's default job options), then
starts one worker in this process and times it until the N-th job has run. It prints one JSON
line: enqueue and process seconds, the handler's call count, and the peer's own record of the
run (its completed count, or what is left in its queue), which ``jobqueue.py`` checks.

Every system gets what ours gets: 16 concurrent jobs and a 10 ms poll where the peer has such
knobs (their defaults are 10/0.5 s for arq, 10 for saq, 8 threads and 1 s for dramatiq, one
process per core for celery, 1 for procrastinate); everything else is the peer's default.
Nothing here imports ``hardening``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from benchmarks.queue_noop import handled, noop

CONCURRENCY = 16
POLL = 0.01


def wait_for(n: int, timeout: float = 900) -> None:
    """Block until the handler has counted ``n`` calls (5 ms resolution)."""
    deadline = time.monotonic() + timeout
    while handled() < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{handled()} of {n} jobs ran in {timeout} s")
        time.sleep(0.005)


def delete_matching(client: Any, pattern: str) -> None:
    """Delete every key matching ``pattern``, in batches."""
    batch: list[Any] = []
    for key in client.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) == 5000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


def arq_run(n: int, redis_url: str, _pg: str) -> dict[str, Any]:
    """arq: ``enqueue_job`` per job, one burst ``Worker`` (keeps results: arq's default)."""
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def job(ctx: dict[str, Any], i: int) -> None:
        noop(i)

    async def main() -> dict[str, Any]:
        name = f"bench-arq-{uuid.uuid4().hex[:8]}"
        pool = await create_pool(RedisSettings.from_dsn(redis_url))
        ids: list[str] = []
        try:
            start = time.perf_counter()
            for i in range(n):
                queued = await pool.enqueue_job("noop", i, _queue_name=name)
                assert queued is not None
                ids.append(queued.job_id)
            enqueued = time.perf_counter() - start
            worker = Worker(
                functions=[func(job, name="noop")],
                redis_pool=pool,
                burst=True,
                queue_name=name,
                max_jobs=CONCURRENCY,
                poll_delay=POLL,
                handle_signals=False,
            )
            start = time.perf_counter()
            await worker.async_run()
            processed = time.perf_counter() - start
            record = {"completed": worker.jobs_complete, "failed": worker.jobs_failed}
            await worker.close()
            return {"enqueue_s": enqueued, "process_s": processed, "record": record}
        finally:
            keys = [f"arq:{kind}:{i}" for i in ids for kind in ("job", "result", "retry")]
            for at in range(0, len(keys), 5000):
                await pool.delete(*keys[at : at + 5000])
            await pool.delete(name)
            await pool.aclose()

    return asyncio.run(main())


def rq_run(n: int, redis_url: str, _pg: str) -> dict[str, Any]:
    """rq: ``Queue.enqueue`` per job, one burst ``SimpleWorker`` (no fork per job: rq at its
    fastest; ``rq worker`` forks a work horse per job by default)."""
    import redis
    import rq

    client = redis.Redis.from_url(redis_url)
    name = f"bench-rq-{uuid.uuid4().hex[:8]}"
    queue = rq.Queue(name, connection=client)
    ids: list[str] = []
    try:
        start = time.perf_counter()
        for i in range(n):
            ids.append(queue.enqueue("benchmarks.queue_noop.noop", i).id)
        enqueued = time.perf_counter() - start
        worker = rq.SimpleWorker([queue], connection=client)
        start = time.perf_counter()
        worker.work(burst=True, logging_level="ERROR")
        processed = time.perf_counter() - start
        finished = rq.registry.FinishedJobRegistry(queue=queue)
        record = {
            "finished_registry": finished.count,
            "failed_registry": rq.registry.FailedJobRegistry(queue=queue).count,
            "left_in_queue": queue.count,
        }
        return {"enqueue_s": enqueued, "process_s": processed, "record": record}
    finally:
        keys = [f"rq:{kind}:{i}" for i in ids for kind in ("job", "results")]
        for at in range(0, len(keys), 5000):
            client.delete(*keys[at : at + 5000])
        delete_matching(client, f"rq:*{name}*")
        client.close()


def saq_run(n: int, redis_url: str, _pg: str) -> dict[str, Any]:
    """saq: ``Queue.enqueue`` per job (default ``ttl``: results kept), one ``Worker``."""
    from saq import Queue, Worker

    async def job(ctx: dict[str, Any], **kwargs: Any) -> None:
        noop(**kwargs)

    async def main() -> dict[str, Any]:
        name = f"bench-saq-{uuid.uuid4().hex[:8]}"
        queue = Queue.from_url(redis_url, name=name)
        await queue.connect()
        try:
            start = time.perf_counter()
            for i in range(n):
                await queue.enqueue("noop", i=i)
            enqueued = time.perf_counter() - start
            worker = Worker(queue, functions=[("noop", job)], concurrency=CONCURRENCY)
            start = time.perf_counter()
            task = asyncio.create_task(worker.start())
            while handled() < n:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
            processed = time.perf_counter() - start
            await worker.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            info = await queue.info()
            record = {"queued": info.get("queued"), "active": info.get("active")}
            return {"enqueue_s": enqueued, "process_s": processed, "record": record}
        finally:
            await queue.disconnect()
            import redis

            client = redis.Redis.from_url(redis_url)
            delete_matching(client, f"saq:*{name}*")
            client.close()

    return asyncio.run(main())


def dramatiq_run(n: int, redis_url: str, _pg: str) -> dict[str, Any]:
    """dramatiq: ``actor.send`` per job, one ``Worker`` (default middleware)."""
    import dramatiq
    import redis
    from dramatiq.brokers.redis import RedisBroker

    namespace = f"bench-dramatiq-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url=redis_url, namespace=namespace)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(noop, actor_name="noop", broker=broker)
    try:
        start = time.perf_counter()
        for i in range(n):
            actor.send(i)
        enqueued = time.perf_counter() - start
        worker = dramatiq.Worker(
            broker, worker_threads=CONCURRENCY, worker_timeout=int(POLL * 1000)
        )
        start = time.perf_counter()
        worker.start()
        wait_for(n)
        processed = time.perf_counter() - start
        worker.join()  # every ack sent
        worker.stop()
        client = redis.Redis.from_url(redis_url)
        record = {
            "left_in_queue": client.llen(f"{namespace}:default"),
            "left_messages": client.hlen(f"{namespace}:default.msgs"),
        }
        client.close()
        return {"enqueue_s": enqueued, "process_s": processed, "record": record}
    finally:
        broker.close()
        client = redis.Redis.from_url(redis_url)
        delete_matching(client, f"{namespace}:*")
        client.close()


def celery_run(n: int, redis_url: str, _pg: str) -> dict[str, Any]:
    """celery: ``task.delay`` per job, one worker with a thread pool of 16 (no result backend,
    ack on receipt: celery's defaults)."""
    import redis
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    name = f"bench-celery-{uuid.uuid4().hex[:8]}"
    app = Celery(name, broker=redis_url)
    app.conf.update(
        task_default_queue=name,
        task_default_exchange=name,
        task_default_routing_key=name,
        worker_enable_remote_control=False,  # no pidbox keys left behind
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    task = app.task(name="noop")(noop)
    try:
        start = time.perf_counter()
        for i in range(n):
            task.delay(i)
        enqueued = time.perf_counter() - start
        start = time.perf_counter()
        with start_worker(
            app, pool="threads", concurrency=CONCURRENCY, perform_ping_check=False, loglevel="ERROR"
        ):
            wait_for(n)
            processed = time.perf_counter() - start
        client = redis.Redis.from_url(redis_url)
        record = {"left_in_queue": client.llen(name)}
        client.close()
        return {"enqueue_s": enqueued, "process_s": processed, "record": record}
    finally:
        client = redis.Redis.from_url(redis_url)
        delete_matching(client, f"*{name}*")
        client.close()


def procrastinate_run(n: int, _redis: str, pg_dsn: str) -> dict[str, Any]:
    """procrastinate: ``defer_async`` per job, one ``run_worker_async(wait=False)``."""
    import procrastinate
    import psycopg

    schema = f"bench_procrastinate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    async def main() -> dict[str, Any]:
        connector = procrastinate.PsycopgConnector(
            conninfo=pg_dsn, kwargs={"options": f"-csearch_path={schema}"}
        )
        app = procrastinate.App(connector=connector)

        @app.task(name="noop")
        async def job(i: int) -> None:
            noop(i)

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            start = time.perf_counter()
            for i in range(n):
                await job.defer_async(i=i)
            enqueued = time.perf_counter() - start
            start = time.perf_counter()
            await app.run_worker_async(
                wait=False,
                concurrency=CONCURRENCY,
                fetch_job_polling_interval=POLL,
                install_signal_handlers=False,
            )
            processed = time.perf_counter() - start
        return {"enqueue_s": enqueued, "process_s": processed}

    try:
        result = asyncio.run(main())
        with psycopg.connect(pg_dsn, options=f"-csearch_path={schema}") as conn:
            rows = conn.execute(
                "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"
            ).fetchall()
        result["record"] = dict(rows)
        return result
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# What each peer's own record must show once the N-th job ran (besides N handler calls).
CHECKS: dict[str, Callable[[dict[str, Any], int], bool]] = {
    "arq": lambda r, n: r == {"completed": n, "failed": 0},
    "rq": lambda r, n: r == {"finished_registry": n, "failed_registry": 0, "left_in_queue": 0},
    "saq": lambda r, n: r == {"queued": 0, "active": 0},
    "dramatiq": lambda r, n: r == {"left_in_queue": 0, "left_messages": 0},
    "celery": lambda r, n: r == {"left_in_queue": 0},
    "procrastinate": lambda r, n: r == {"succeeded": n},
}

PEERS: dict[str, tuple[str, Callable[[int, str, str], dict[str, Any]]]] = {
    "arq": ("arq", arq_run),
    "rq": ("rq", rq_run),
    "saq": ("saq", saq_run),
    "dramatiq": ("dramatiq", dramatiq_run),
    "celery": ("celery", celery_run),
    "procrastinate": ("procrastinate", procrastinate_run),
}


def main() -> None:
    """Run one peer and print its result as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(PEERS))
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--postgres-url", required=True)
    args = parser.parse_args()
    package, run = PEERS[args.system]
    result = run(args.n, args.redis_url, args.postgres_url)
    result.update(system=args.system, version=version(package), n=args.n, handled=handled())
    # every job ran (a duplicate run is counted, not hidden: jobqueue.py reports it)
    result["verified"] = result["handled"] >= args.n and CHECKS[args.system](
        result["record"], args.n
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
