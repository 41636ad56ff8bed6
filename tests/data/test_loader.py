"""DataLoader: one batch per event-loop tick, a per-request cache, errors to every waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening import (
    ConfigurationError,
    DataLoader,
    NotFoundError,
    load_by_ids,
    load_by_ids_async,
    sql_loader,
)
from tests.data.conftest import Recorder

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    handle: Mapped[str] = mapped_column(unique=True)


class Batches:
    """A batch function that records every call."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    async def __call__(self, keys: list[int]) -> Sequence[str]:
        self.calls.append(list(keys))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [f"v{key}" for key in keys]


async def test_loads_in_one_tick_are_one_batch() -> None:
    """50 concurrent loads: one call, keys deduplicated, each caller gets its own value."""
    batches = Batches()
    loader = DataLoader(batches)
    keys = [i % 40 for i in range(50)]
    values = await asyncio.gather(*(loader.load(k) for k in keys))
    assert values == [f"v{k}" for k in keys]
    assert batches.calls == [list(range(40))]


async def test_loads_in_different_ticks_are_separate_batches() -> None:
    """A load made after the first batch went out starts another batch."""
    batches = Batches()
    loader = DataLoader(batches, cache=False)
    assert await loader.load(1) == "v1"
    assert await loader.load_many([2, 3]) == ["v2", "v3"]
    assert await loader.load(1) == "v1"  # no cache: asked again
    assert batches.calls == [[1], [2, 3], [1]]


async def test_cache_hits_do_not_call_the_batch_function() -> None:
    """A key loaded once is answered from memory until cleared; prime fills it without a call."""
    batches = Batches()
    loader = DataLoader(batches)
    await loader.load_many([1, 2])
    assert await loader.load_many([2, 1]) == ["v2", "v1"]
    loader.prime(3, "primed")
    assert await loader.load(3) == "primed"
    loader.clear(1)
    await loader.load(1)
    loader.clear()
    await loader.load(2)
    assert batches.calls == [[1, 2], [1], [2]]


async def test_max_batch_size_splits_batches() -> None:
    """Larger batches are split into calls of at most max_batch_size keys."""
    batches = Batches()
    loader = DataLoader(batches, max_batch_size=4)
    await loader.load_many(range(10))
    assert batches.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    """The batch function's exception is raised in each caller; a later load tries again."""
    batches = Batches(fail=RuntimeError("database down"))
    loader = DataLoader(batches)
    results = await asyncio.gather(loader.load(1), loader.load(2), return_exceptions=True)
    assert [str(r) for r in results] == ["database down", "database down"]
    batches.fail = None
    assert await loader.load(1) == "v1"
    assert batches.calls == [[1, 2], [1]]


async def test_mappings_missing_keys_and_defaults() -> None:
    """A mapping lacking a key: NotFoundError (404), or the default."""

    async def users(keys: list[int]) -> Mapping[int, str]:
        return {k: f"user{k}" for k in keys if k % 2}

    strict = DataLoader(users)
    assert await strict.load(1) == "user1"
    with pytest.raises(NotFoundError) as info:
        await strict.load(2)
    assert (info.value.entity, info.value.key, info.value.http_status) == ("users", 2, 404)
    lenient = DataLoader(users, default=None)
    assert await lenient.load_many([1, 2]) == ["user1", None]


async def test_per_key_exceptions_and_bad_results() -> None:
    """An Exception in the list fails one key; a wrong-length result fails the batch."""

    async def some_fail(keys: list[int]) -> list[str | Exception]:
        return [ValueError(k) if k == 2 else str(k) for k in keys]

    loader = DataLoader(some_fail)
    results = await asyncio.gather(loader.load(1), loader.load(2), return_exceptions=True)
    assert results[0] == "1"
    assert isinstance(results[1], ValueError)

    async def short(keys: list[int]) -> list[str]:
        return ["only one"]

    with pytest.raises(ConfigurationError, match="1 values for 2 keys"):
        await DataLoader(short).load_many([1, 2])

    async def wrong(keys: list[int]) -> Any:
        return "abc"

    with pytest.raises(ConfigurationError, match="mapping"):
        await DataLoader(wrong).load(1)
    with pytest.raises(ConfigurationError):
        DataLoader(short, max_batch_size=0)


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    """Cancelling one waiter leaves the shared load running for everyone else."""
    release = asyncio.Event()

    async def slow(keys: list[int]) -> list[int]:
        await release.wait()
        return keys

    loader = DataLoader(slow)
    first = asyncio.ensure_future(loader.load(1))
    second = asyncio.ensure_future(loader.load(1))
    await asyncio.sleep(0.01)
    first.cancel()
    release.set()
    assert await second == 1
    with pytest.raises(asyncio.CancelledError):
        await first


# --- SQL -------------------------------------------------------------------------------------


async def _users(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(User), [{"id": i, "handle": f"u{i}"} for i in range(1, 61)])


async def test_sql_loader_runs_one_query_per_tick(pg_async_engine: AsyncEngine) -> None:
    """50 resolvers loading authors at once: exactly one SELECT … WHERE id IN (…)."""
    await _users(pg_async_engine)
    recorder = Recorder(pg_async_engine.sync_engine)
    try:
        async with AsyncSession(pg_async_engine) as session:
            users = DataLoader(sql_loader(session, User), default=None)
            found = await asyncio.gather(*(users.load(i) for i in range(1, 51)))
            assert [u.handle for u in found if u is not None] == [f"u{i}" for i in range(1, 51)]
            assert len(recorder.statements) == 1
            assert " IN " in recorder.statements[0].upper()
            assert await users.load(999) is None
            handles = DataLoader(sql_loader(session, User, key=User.handle))
            both = await asyncio.gather(handles.load("u3"), users.load(60))
            assert [u.id for u in both if u is not None] == [3, 60]
            with pytest.raises(NotFoundError, match="User"):
                await DataLoader(sql_loader(session, User)).load(1000)
        factory = async_sessionmaker(pg_async_engine)
        own_sessions = DataLoader(sql_loader(factory, User))
        assert [u.id for u in await own_sessions.load_many([5, 6])] == [5, 6]
    finally:
        recorder.close()


async def test_load_by_ids_async(pg_async_engine: AsyncEngine) -> None:
    """Ids in, objects out in the same order, None where missing, duplicates kept."""
    await _users(pg_async_engine)
    async with AsyncSession(pg_async_engine) as session:
        found = await load_by_ids_async(session, User, [3, 999, 1, 3])
    assert [u.id if u else None for u in found] == [3, None, 1, 3]


def test_load_by_ids_sync(sql_engine: sa.Engine) -> None:
    """The sync helper: one query per 1,000 ids, in order."""
    Base.metadata.create_all(sql_engine)
    with sql_engine.begin() as conn:
        conn.execute(sa.insert(User), [{"id": i, "handle": f"u{i}"} for i in range(1, 2501)])
    recorder = Recorder(sql_engine)
    try:
        with Session(sql_engine) as session:
            ids = [2500, 7, 9999, 7, *range(1, 2001)]
            found = load_by_ids(session, User, ids)
            assert [u.id if u else None for u in found] == [2500, 7, None, 7, *range(1, 2001)]
            assert len(recorder.statements) == 3  # 2,002 distinct ids
            assert load_by_ids(session, User, ["u5"], key=User.handle)[0] is not None
            with pytest.raises(ConfigurationError):
                load_by_ids(session, User, [1], key=Base.metadata)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                load_by_ids(session, int, [1])
    finally:
        recorder.close()
