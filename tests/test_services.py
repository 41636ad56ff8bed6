"""Smoke tests proving the service fixtures reach real servers and isolate each test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine


def test_redis_round_trip(redis_client: redis.Redis, redis_prefix: str) -> None:
    """A value written to the real Redis reads back."""
    redis_client.set(f"{redis_prefix}k", b"v")
    assert redis_client.get(f"{redis_prefix}k") == b"v"
    assert redis_client.info("server")["redis_version"]


def test_redis_prefix_is_unique(redis_prefix: str, request: pytest.FixtureRequest) -> None:
    """Two tests never share a key prefix."""
    other = request.getfixturevalue("redis_prefix")
    assert other == redis_prefix  # same test, same fixture value
    assert redis_prefix.startswith("hardening-test:")


@pytest.mark.anyio
async def test_async_redis_round_trip(
    async_redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """The asyncio client talks to the same real Redis."""
    await async_redis_client.set(f"{redis_prefix}a", b"1")
    assert await async_redis_client.incr(f"{redis_prefix}a") == 2


def test_postgres_schema_isolated(pg_engine: Engine, pg_schema: str) -> None:
    """Tables land in the test's own schema on a real PostgreSQL."""
    import sqlalchemy as sa

    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int primary key)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        assert conn.execute(sa.text("SELECT current_schema()")).scalar() == pg_schema
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
        version = conn.execute(sa.text("SHOW server_version")).scalar()
    assert version


@pytest.mark.anyio
async def test_postgres_async_engine(pg_async_engine: AsyncEngine, pg_schema: str) -> None:
    """The async engine reaches the same schema."""
    import sqlalchemy as sa

    async with pg_async_engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT current_schema()"))).scalar() == pg_schema


def test_sql_engine_both_backends(sql_engine: Engine) -> None:
    """The parametrised engine answers on SQLite and PostgreSQL."""
    import sqlalchemy as sa

    with sql_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
