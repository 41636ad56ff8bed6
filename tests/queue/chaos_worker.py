"""A worker process for the chaos test: processes jobs and logs each processed id.

Usage: python -m tests.queue.chaos_worker KIND URL NAMESPACE LOGFILE
KIND is ``postgres`` (NAMESPACE: schema) or ``redis`` (NAMESPACE: key prefix). Each processed
job id is appended to LOGFILE before the job is acked, so an id logged twice is a duplicate
delivery (at-least-once), and a job acked but not logged cannot exist.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from hardening.queue import Job, QueueProcessor


class ChaosProcessor(QueueProcessor):
    queue = "chaos"
    concurrency = 4
    lease = 2.0
    heartbeat = 0.5
    max_attempts = 6
    poll_interval = 0.05
    backoff = 0.05

    def __init__(self, backend: Any, log: Any, **options: Any) -> None:
        super().__init__(backend, **options)
        self.log = log

    def process(self, job: Job) -> None:
        time.sleep(0.01)  # some work, so kills land mid-job
        os.write(self.log, f"{job.id}\n".encode())


def build_backend(kind: str, url: str, namespace: str) -> Any:
    if kind == "postgres":
        import sqlalchemy as sa

        from hardening.queue.backends.sql import SQLBackend

        engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={namespace}"})
        return SQLBackend(engine)
    import redis

    from hardening.queue.backends.redis import RedisBackend

    return RedisBackend(redis.Redis.from_url(url), key_prefix=namespace, owns_client=True)


class HostileProcessor(ChaosProcessor):
    """Some jobs are poison (raise), some kill their worker (``os._exit``); the rest are
    normal. With ``transactional``, each job's effect is a row written through its session."""

    lease = 1.0
    heartbeat = 0.25
    max_attempts = 4
    max_lost = 3
    concurrency = 4
    backoff = 0.01

    def process(self, job: Job) -> None:
        kind = job.payload["kind"]  # type: ignore[index,call-overload]
        if kind == "exit":
            os._exit(3)  # the worker dies with every job it holds
        time.sleep(0.005)
        if kind == "poison":
            raise ValueError("poison")
        if self.options.transactional:
            import sqlalchemy as sa

            self.session.execute(
                sa.text("INSERT INTO effects (job_id) VALUES (:id)"), {"id": job.id}
            )
        os.write(self.log, f"{job.id}\n".encode())


def main() -> None:
    kind, url, namespace, logfile = sys.argv[1:5]
    mode = sys.argv[5] if len(sys.argv) > 5 else "plain"
    log = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    backend = build_backend(kind, url, namespace)
    if mode == "plain":
        ChaosProcessor(backend, log).run()
    else:
        HostileProcessor(backend, log, transactional=mode == "transactional").run()


if __name__ == "__main__":
    main()
