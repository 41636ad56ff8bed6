"""Ready-made health checks for ``health_app``: a Redis ``PING`` and a SQL ``SELECT 1``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hardening._imports import require
from hardening._redis import is_async_client

__all__ = ["redis_check", "sql_check"]


def redis_check(client: Any) -> Callable[[], object] | Callable[[], Awaitable[object]]:
    """A health check that sends ``PING`` to a Redis client.

    Args:
        client: a ``redis.Redis`` / ``RedisCluster`` or a ``redis.asyncio`` client.

    Returns:
        A check (async for an asyncio client) that raises when Redis does not answer.
    """
    if is_async_client(client):

        async def check_async() -> object:
            return bool(await client.ping())

        return check_async

    def check() -> object:
        return bool(client.ping())

    return check


def sql_check(engine: Any) -> Callable[[], object] | Callable[[], Awaitable[object]]:
    """A health check that runs ``SELECT 1`` on a SQLAlchemy engine.

    Args:
        engine: an ``Engine`` or an ``AsyncEngine``.

    Returns:
        A check (async for an ``AsyncEngine``) that raises when the database does not answer.
    """
    sqlalchemy = require("sqlalchemy", extra="sqlalchemy", feature="sql_check")
    select_one = sqlalchemy.text("SELECT 1")
    if hasattr(engine, "sync_engine"):

        async def check_async() -> object:
            async with engine.connect() as connection:
                return (await connection.execute(select_one)).scalar() == 1

        return check_async

    def check() -> object:
        with engine.connect() as connection:
            return connection.execute(select_one).scalar() == 1

    return check
