"""Redis cache storages, blocking and asyncio: one command or one script per operation.

A read is one ``GET`` (``MGET`` for many); a write is one ``EVALSHA`` of ``lua/set.lua``
(values, tag and prefix indexes, and the release of the stampede lock, atomically); a delete
one ``EVALSHA`` of ``lua/delete.lua``; an invalidation ``lua/invalidate.lua`` in batches of
:data:`INVALIDATE_BATCH` members, touching only indexed keys. No step touches more than
:data:`STEP_UNITS` keys: larger batches are split into several steps, each atomic.
Every name carries the namespace's ``{hash tag}``, so all of this works on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from hardening._redis import read_lua

if TYPE_CHECKING:
    from hardening.cache.storage import IndexKind, Write

__all__ = ["INVALIDATE_BATCH", "STEP_UNITS", "AsyncRedisCacheStorage", "RedisCacheStorage"]

_T = TypeVar("_T")

INVALIDATE_BATCH = 500
"""Members taken from each index per invalidation script call: bounds how long one call
blocks Redis however many keys a tag has."""
STEP_UNITS = 1_000
"""The most keys one command or script call touches: batch calls are split into steps of
at most this many (values plus the tag and prefix indexes they update), so no single step
blocks Redis for long however large the batch (``set_many`` of 100,000 values is 100+ short
scripts, each atomic, instead of one that blocks every other client for seconds)."""
_INDEXES_PER_CALL = STEP_UNITS // INVALIDATE_BATCH
_MAX_BATCHES = 100_000  # a safety net against an index refilled as fast as it is emptied


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_steps(writes: Sequence[Write]) -> Iterator[Sequence[Write]]:
    """``writes`` in consecutive steps of at most :data:`STEP_UNITS` keys touched each."""
    start, units = 0, 0
    for end, write in enumerate(writes):
        cost = 2 + len(write.tags) + len(write.prefixes)  # the value, its tag list, indexes
        if units and units + cost > STEP_UNITS:
            yield writes[start:end]
            start, units = end, 0
        units += cost
    if start < len(writes):
        yield writes[start:]


def _set_call(
    base: str, writes: Sequence[Write], unlock: tuple[str, str] | None
) -> tuple[list[str], list[str | int | bytes]]:
    keys = [base + "k:" + write.key_id for write in writes]
    args: list[str | int | bytes] = [base, *(unlock or ("", ""))]
    for write in writes:
        args += (write.key_id, write.value, write.ttl_ms, len(write.tags), *write.tags)
        args += (len(write.prefixes), *write.prefixes)
    return keys, args


def _invalidate_call(
    base: str, kind: IndexKind, index_ids: Sequence[str]
) -> tuple[list[str], list[str | int]]:
    keys = [f"{base}{kind}:{index_id}" for index_id in index_ids]
    return keys, [base, kind, INVALIDATE_BATCH, *index_ids]


def _scripts(client: Any) -> tuple[Any, Any, Any, Any, Any]:
    set_, delete, invalidate, lock, unlock = (
        client.register_script(read_lua("hardening.cache", name))
        for name in ("set.lua", "delete.lua", "invalidate.lua", "lock.lua", "unlock.lua")
    )
    return set_, delete, invalidate, lock, unlock


def _lock_reply(reply: Sequence[Any]) -> tuple[bool, bytes | None]:
    code = int(reply[0])
    return code == 2, reply[1] if code == 1 else None


class RedisCacheStorage:
    """Redis (or Redis Cluster, or a Sentinel master) cache storage.

    Args:
        client: a ``redis.Redis``, ``redis.cluster.RedisCluster`` or Sentinel master client.
        owns_client: close the client in :meth:`close` (true when built from a URL).
    """

    shared = True

    def __init__(self, client: Any, *, owns_client: bool = False) -> None:
        self.client = client
        self.owns_client = owns_client
        self._set, self._delete, self._invalidate, self._lock, self._unlock = _scripts(client)

    def close(self) -> None:
        """Close the client if this storage created it."""
        if self.owns_client:
            self.client.close()

    def get(self, base: str, key_id: str) -> bytes | None:
        """One ``GET``."""
        value: bytes | None = self.client.get(base + "k:" + key_id)
        return value

    def get_many(self, base: str, key_ids: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` per :data:`STEP_UNITS` keys."""
        found: list[bytes | None] = []
        for chunk in _chunks(key_ids, STEP_UNITS):
            found += self.client.mget([base + "k:" + key_id for key_id in chunk])
        return found

    def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """One ``EVALSHA`` of ``set.lua`` per step (the lock is released by the last)."""
        if not writes:
            if unlock is not None:
                self.unlock(base, *unlock)
            return
        steps = list(_write_steps(writes))
        for n, step in enumerate(steps, 1):
            keys, args = _set_call(base, step, unlock if n == len(steps) else None)
            self._set(keys=keys, args=args)

    def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """One ``EVALSHA`` of ``delete.lua`` per :data:`STEP_UNITS` keys."""
        deleted = 0
        for chunk in _chunks(key_ids, STEP_UNITS):
            keys = [base + "k:" + key_id for key_id in chunk]
            deleted += int(self._delete(keys=keys, args=[base, *chunk]))
        return deleted

    def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """``invalidate.lua`` until the indexes are empty, 500 members of 2 indexes a call."""
        deleted = 0
        for chunk in _chunks(index_ids, _INDEXES_PER_CALL):
            keys, args = _invalidate_call(base, kind, chunk)
            for _ in range(_MAX_BATCHES):
                done, left = self._invalidate(keys=keys, args=args)
                deleted += int(done)
                if not int(left):
                    break
        return deleted

    def lock(
        self, base: str, key_id: str, token: str, ttl_ms: int, read: bool = True
    ) -> tuple[bool, bytes | None]:
        """``lock.lua``: the value if it is there, else ``SET lock token NX PX ttl``."""
        keys = [base + "k:" + key_id, base + "l:" + key_id]
        return _lock_reply(self._lock(keys=keys, args=[token, ttl_ms, int(read)]))

    def unlock(self, base: str, key_id: str, token: str) -> None:
        """``unlock.lua``: delete the lock if ``token`` still holds it."""
        self._unlock(keys=[base + "l:" + key_id], args=[token])


class AsyncRedisCacheStorage:
    """The asyncio twin of :class:`RedisCacheStorage`: same commands and scripts.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` client.
        owns_client: close the client in :meth:`aclose` (true when built from a URL).
    """

    shared = True

    def __init__(self, client: Any, *, owns_client: bool = False) -> None:
        self.client = client
        self.owns_client = owns_client
        self._set, self._delete, self._invalidate, self._lock, self._unlock = _scripts(client)

    async def aclose(self) -> None:
        """Close the client if this storage created it."""
        if self.owns_client:
            await self.client.aclose()

    async def get(self, base: str, key_id: str) -> bytes | None:
        """One ``GET``."""
        value: bytes | None = await self.client.get(base + "k:" + key_id)
        return value

    async def get_many(self, base: str, key_ids: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` per :data:`STEP_UNITS` keys."""
        found: list[bytes | None] = []
        for chunk in _chunks(key_ids, STEP_UNITS):
            found += await self.client.mget([base + "k:" + key_id for key_id in chunk])
        return found

    async def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """One ``EVALSHA`` of ``set.lua`` per step (the lock is released by the last)."""
        if not writes:
            if unlock is not None:
                await self.unlock(base, *unlock)
            return
        steps = list(_write_steps(writes))
        for n, step in enumerate(steps, 1):
            keys, args = _set_call(base, step, unlock if n == len(steps) else None)
            await self._set(keys=keys, args=args)

    async def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """One ``EVALSHA`` of ``delete.lua`` per :data:`STEP_UNITS` keys."""
        deleted = 0
        for chunk in _chunks(key_ids, STEP_UNITS):
            keys = [base + "k:" + key_id for key_id in chunk]
            deleted += int(await self._delete(keys=keys, args=[base, *chunk]))
        return deleted

    async def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """``invalidate.lua`` until the indexes are empty, 500 members of 2 indexes a call."""
        deleted = 0
        for chunk in _chunks(index_ids, _INDEXES_PER_CALL):
            keys, args = _invalidate_call(base, kind, chunk)
            for _ in range(_MAX_BATCHES):
                done, left = await self._invalidate(keys=keys, args=args)
                deleted += int(done)
                if not int(left):
                    break
        return deleted

    async def lock(
        self, base: str, key_id: str, token: str, ttl_ms: int, read: bool = True
    ) -> tuple[bool, bytes | None]:
        """``lock.lua``: the value if it is there, else ``SET lock token NX PX ttl``."""
        keys = [base + "k:" + key_id, base + "l:" + key_id]
        return _lock_reply(await self._lock(keys=keys, args=[token, ttl_ms, int(read)]))

    async def unlock(self, base: str, key_id: str, token: str) -> None:
        """``unlock.lua``: delete the lock if ``token`` still holds it."""
        await self._unlock(keys=[base + "l:" + key_id], args=[token])
