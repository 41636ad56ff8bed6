"""Chaos: worker processes SIGKILLed at random while draining; no job is ever lost."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.queue.chaos_worker import ChaosProcessor, build_backend

ROOT = Path(__file__).resolve().parents[2]
JOBS = 1500
WORKERS = 4


def _spawn(kind: str, url: str, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.queue.chaos_worker", kind, url, namespace, str(log)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _chaos(kind: str, url: str, namespace: str, tmp_path: Path, backend: Any) -> None:
    log = tmp_path / "processed.log"
    producer = ChaosProcessor(backend, None)
    ids = {producer.enqueue({"n": n}).id for n in range(JOBS)}
    rng = random.Random(7)
    workers = [_spawn(kind, url, namespace, log) for _ in range(WORKERS)]
    kills = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # kill a random worker every ~0.4 s, replace it
            time.sleep(rng.uniform(0.2, 0.6))
            victim = rng.randrange(len(workers))
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait(timeout=10)
            kills += 1
            workers[victim] = _spawn(kind, url, namespace, log)
        drain_until = time.monotonic() + 90
        while time.monotonic() < drain_until:
            stats = producer.stats()
            if stats.waiting + stats.running + stats.retrying + stats.delayed == 0:
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
    stats = producer.stats()
    assert stats.completed + stats.dead == JOBS, stats  # every job accounted for: none lost
    processed = Counter(log.read_text().split())
    assert set(processed) <= ids
    completed = {
        job_id
        for job_id in ids
        if (job := backend.get("chaos", job_id)) is not None and job.state == "completed"
    }
    assert completed <= set(processed)  # nothing acked without being processed
    duplicates = sum(count - 1 for count in processed.values())
    print(
        f"\n{kind}: {kills} SIGKILLs, {JOBS} jobs: {stats.completed} completed, "
        f"{stats.dead} dead, {duplicates} duplicate deliveries (at-least-once)"
    )
    assert kills >= 10


@pytest.mark.slow
def test_chaos_postgres(pg_engine: Any, pg_schema: str, postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL: thousands of jobs, workers SIGKILLed at random: zero lost."""
    backend = build_backend("postgres", postgres_url, pg_schema)
    backend.create_schema()
    try:
        _chaos("postgres", postgres_url, pg_schema, tmp_path, backend)
    finally:
        backend.close()
        backend.engine.dispose()


@pytest.mark.slow
def test_chaos_redis(redis_url: str, redis_prefix: str, redis_client: Any, tmp_path: Path) -> None:
    """Redis: thousands of jobs, workers SIGKILLed at random: zero lost."""
    namespace = redis_prefix.rstrip(":")
    backend = build_backend("redis", redis_url, namespace)
    try:
        _chaos("redis", redis_url, namespace, tmp_path, backend)
    finally:
        backend.close()
