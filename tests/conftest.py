"""Shared fixtures: real Redis, real PostgreSQL and SQLite, each isolated per test and cleaned up.

Services come from ``HARDENING_REDIS_URL`` and ``HARDENING_POSTGRES_URL`` (defaulting to the local
services on 127.0.0.1). When a service cannot be reached, tests that need it are skipped with the
reason -- unless ``HARDENING_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where they fail instead.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

REDIS_URL = os.environ.get("HARDENING_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "HARDENING_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("HARDENING_REQUIRE_SERVICES") == "1"

# One id per test session: every key and schema this run creates carries it.
RUN_ID = f"{os.getpid()}{secrets.token_hex(3)}"
_counter = itertools.count()

_REDIS_FIXTURES = {"redis_url", "redis_client", "async_redis_client"}
_POSTGRES_FIXTURES = {"postgres_url", "pg_engine", "pg_async_engine"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a real service, so ``-m "not redis"`` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
        if names & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)


def service_unavailable(service: str, reason: str) -> None:
    """Skip the test (or fail it when services are required) because ``service`` is down."""
    message = f"{service} is unreachable ({reason})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and HARDENING_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"{message}; start it (../shared/services.sh) or set its HARDENING_*_URL")


@cache
def _redis_problem() -> str | None:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        return f"redis-py not installed: {exc}"
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:  # any failure means "not usable", the reason is reported
        return f"{REDIS_URL}: {exc}"
    return None


@cache
def _postgres_problem() -> str | None:
    try:
        import sqlalchemy as sa
    except ImportError as exc:  # pragma: no cover
        return f"SQLAlchemy not installed: {exc}"
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"{POSTGRES_URL}: {exc}"
    return None


def unique_name(kind: str) -> str:
    """Return a name unique to this test run and call, e.g. ``ht_1234ab_7``."""
    return f"{kind}_{RUN_ID}_{next(_counter)}"


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (the event loop every supported ASGI server uses)."""
    return "asyncio"


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """The URL of a real, reachable Redis."""
    problem = _redis_problem()
    if problem:
        service_unavailable("Redis", problem)
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test; every key under it is deleted after the test."""
    return f"hardening-test:{unique_name('t')}:"


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A real synchronous Redis client; keys under ``redis_prefix`` are removed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        _delete_prefixed(client, redis_prefix)
        client.close()


@pytest.fixture
async def async_redis_client(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[redis.asyncio.Redis]:
    """A real asyncio Redis client; keys under ``redis_prefix`` are removed afterwards."""
    import redis
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
        sync = redis.Redis.from_url(redis_url)
        _delete_prefixed(sync, redis_prefix)
        sync.close()


# --- SQL ---------------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> str:
    """The SQLAlchemy URL of a real, reachable PostgreSQL."""
    problem = _postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    return POSTGRES_URL


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped with everything in it afterwards."""
    import sqlalchemy as sa

    schema = unique_name("ht")
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_engine(postgres_url: str, pg_schema: str) -> Iterator[Engine]:
    """A real PostgreSQL engine whose ``search_path`` is this test's own schema."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        postgres_url, connect_args={"options": f"-csearch_path={pg_schema}"}, pool_size=20
    )
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def pg_async_engine(postgres_url: str, pg_schema: str) -> AsyncIterator[AsyncEngine]:
    """A real async (psycopg) PostgreSQL engine on this test's own schema."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        postgres_url, connect_args={"options": f"-csearch_path={pg_schema}"}
    )
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite engine on a file of this test's own (so several connections share it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'test.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_engine(request: pytest.FixtureRequest) -> Engine:
    """Each SQL backend in turn: SQLite, then real PostgreSQL."""
    name = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    engine: Engine = request.getfixturevalue(name)
    return engine
