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


def _spawn(
    kind: str, url: str, namespace: str, log: Path, mode: str = "plain"
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.queue.chaos_worker", kind, url, namespace, str(log), mode],
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


HOSTILE_JOBS, POISON, EXITS, HOSTILE_WORKERS = 1000, 10, 5, 3


def _hostile(
    kind: str, url: str, namespace: str, tmp_path: Path, backend: Any, mode: str
) -> Counter[str]:
    """Normal, poison and worker-killing jobs; workers also SIGKILLed at random.

    Returns how often each job's effect was recorded (the log, or the effects table).
    """
    from tests.queue.chaos_worker import HostileProcessor

    log = tmp_path / "processed.log"
    producer = HostileProcessor(backend, None)
    kinds = ["poison"] * POISON + ["exit"] * EXITS
    kinds += ["normal"] * (HOSTILE_JOBS - len(kinds))
    random.Random(3).shuffle(kinds)
    jobs = {producer.enqueue({"kind": k}).id: k for k in kinds}
    rng = random.Random(11)
    workers = [_spawn(kind, url, namespace, log, mode) for _ in range(HOSTILE_WORKERS)]
    kills = 0
    try:
        deadline = time.monotonic() + 120
        next_kill = time.monotonic() + rng.uniform(1.5, 2.5)
        while time.monotonic() < deadline:
            stats = producer.stats()
            if stats.waiting + stats.running + stats.retrying + stats.delayed == 0:
                break
            for i, worker in enumerate(workers):  # a job killed it: a new one takes its place
                if worker.poll() is not None:
                    workers[i] = _spawn(kind, url, namespace, log, mode)
            if time.monotonic() >= next_kill and kills < 5:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait(timeout=10)
                workers[victim] = _spawn(kind, url, namespace, log, mode)
                kills += 1
                next_kill = time.monotonic() + rng.uniform(1.5, 2.5)
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
    final = {job_id: backend.get("chaos", job_id) for job_id in jobs}
    normal_dead = [i for i, k in jobs.items() if k == "normal" and final[i].state != "completed"]
    assert normal_dead == [], f"{len(normal_dead)} normal jobs not completed"
    for job_id, k in jobs.items():
        job = final[job_id]
        if k == "poison":
            assert (job.state, job.failures) == ("dead", HostileProcessor.max_attempts), job
        elif k == "exit":
            assert (job.state, job.lost) == ("dead", HostileProcessor.max_lost), job
    effects = Counter(log.read_text().split()) if log.exists() else Counter()
    print(
        f"\n{kind} ({mode}): {kills} SIGKILLs + {EXITS * HostileProcessor.max_lost} worker "
        f"deaths by os._exit jobs, {HOSTILE_JOBS} jobs: {len(jobs) - POISON - EXITS} normal "
        f"all completed, {POISON} poison dead after {HostileProcessor.max_attempts} failures, "
        f"{EXITS} crashing jobs dead after {HostileProcessor.max_lost} losses"
    )
    return effects


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_chaos_a_crashing_job_kills_only_itself(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Poison and worker-killing jobs among normal ones, plus random SIGKILLs: no normal job
    is dead-lettered; each poison job dies after exactly max_attempts failures and each
    crashing job after exactly max_lost losses."""
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        namespace = request.getfixturevalue("redis_prefix").rstrip(":")
        request.getfixturevalue("redis_client")  # cleans the keys up
    else:
        url = request.getfixturevalue("postgres_url")
        namespace = request.getfixturevalue("pg_schema")
    backend = build_backend(kind, url, namespace)
    if kind == "postgres":
        backend.create_schema()
    try:
        _hostile(kind, url, namespace, tmp_path, backend, "hostile")
    finally:
        backend.close()
        if kind == "postgres":
            backend.engine.dispose()


@pytest.mark.slow
def test_chaos_transactional_effects_exactly_once(
    postgres_url: str, pg_schema: str, pg_engine: Any, tmp_path: Path
) -> None:
    """The same chaos with the transactional opt-in on PostgreSQL: every normal job's effect
    row is written exactly once, whatever was killed when."""
    import sqlalchemy as sa

    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE effects (job_id VARCHAR(32) NOT NULL)"))
    backend = build_backend("postgres", postgres_url, pg_schema)
    backend.create_schema()
    try:
        _hostile("postgres", postgres_url, pg_schema, tmp_path, backend, "transactional")
    finally:
        backend.close()
        backend.engine.dispose()
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT job_id, count(*) FROM effects GROUP BY job_id")).all()
    duplicates = sum(count - 1 for _, count in rows)
    print(f"transactional: {len(rows)} effects, {duplicates} duplicates")
    assert len(rows) == HOSTILE_JOBS - POISON - EXITS
    assert duplicates == 0
