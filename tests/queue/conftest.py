"""Every queue backend under one contract: memory, SQLite, PostgreSQL and Redis.

Backends take the clock the tests advance, so leases, delays and backoff are exercised
without sleeping, on real databases as on memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hardening import FakeClock
from hardening.queue import MemoryBackend, QueueBackend
from hardening.queue.job import NewJob, new_job_id

BACKENDS = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]


def _available(name: str) -> bool:
    import importlib.util

    module = {"sqlite": "sql", "postgres": "sql", "redis": "redis"}.get(name)
    return (
        module is None or importlib.util.find_spec(f"hardening.queue.backends.{module}") is not None
    )


@pytest.fixture
def clock() -> FakeClock:
    """The clock shared by the backend and the processor."""
    return FakeClock(1_700_000_000.0)


@pytest.fixture(
    params=[b for b in BACKENDS if _available(b if isinstance(b, str) else b.values[0])]
)
def backend(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[QueueBackend]:
    """Each backend in turn, empty, on the test's fake clock."""
    name = request.param
    made: Any
    if name == "memory":
        made = MemoryBackend(clock=clock)
    elif name in ("sqlite", "postgres"):
        from hardening.queue.backends.sql import SQLBackend

        engine = request.getfixturevalue("sqlite_engine" if name == "sqlite" else "pg_engine")
        made = SQLBackend(engine, clock=clock)
        made.create_schema()
    else:
        from hardening.queue.backends.redis import RedisBackend

        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix")
        made = RedisBackend(client, clock=clock, key_prefix=prefix.rstrip(":"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def make_processor(backend: QueueBackend, clock: FakeClock) -> Callable[..., Any]:
    """Build a processor class instance on the test's backend and clock."""

    def make(cls: type[Any], **options: Any) -> Any:
        options.setdefault("poll_interval", 0.01)
        return cls(backend, clock=clock, **options)

    return make


def new_job(queue: str, now: float = 1_700_000_000.0, **fields: Any) -> NewJob:
    """A validated job as ``enqueue`` would hand it to a backend (for backend-level tests)."""
    job = NewJob(
        id=new_job_id(),
        queue=queue,
        payload_json=fields.pop("payload", "{}"),
        priority=fields.pop("priority", 0),
        run_at=fields.pop("run_at", now),
        created_at=now,
        max_attempts=fields.pop("max_attempts", 3),
        dedupe_key=fields.pop("dedupe_key", None),
        timeout=fields.pop("timeout", None),
    )
    assert not fields, f"unknown job fields {sorted(fields)}"
    return job
