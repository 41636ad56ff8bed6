"""Redis cache storages, blocking and asyncio: one command or one script per operation.

A read is one ``GET`` (``MGET`` for many); a write is one ``EVALSHA`` of ``lua/set.lua``
(values, tag and prefix indexes, and the release of the stampede lock, atomically, however
many values); a delete one ``EVALSHA`` of ``lua/delete.lua``; an invalidation ``lua/
invalidate.lua`` in batches of :data:`INVALIDATE_BATCH` members, touching only indexed keys.
Every name carries the namespace's ``{hash tag}``, so all of this works on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hardening._redis import read_lua

if TYPE_CHECKING:
    from hardening.cache.storage import IndexKind, Write

__all__ = ["INVALIDATE_BATCH", "AsyncRedisCacheStorage", "RedisCacheStorage"]

INVALIDATE_BATCH = 500
"""Members taken from each index per invalidation script call: bounds how long one call
blocks Redis however many keys a tag has."""
_MAX_BATCHES = 100_000  # a safety net against an index refilled as fast as it is emptied


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
        """One ``MGET``."""
        if not key_ids:
            return []
        return list(self.client.mget([base + "k:" + key_id for key_id in key_ids]))

    def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """One ``EVALSHA`` of ``set.lua``."""
        if writes:
            keys, args = _set_call(base, writes, unlock)
            self._set(keys=keys, args=args)
        elif unlock is not None:
            self.unlock(base, *unlock)

    def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """One ``EVALSHA`` of ``delete.lua``."""
        if not key_ids:
            return 0
        keys = [base + "k:" + key_id for key_id in key_ids]
        return int(self._delete(keys=keys, args=[base, *key_ids]))

    def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """``invalidate.lua`` until the indexes are empty (one call below 500 keys each)."""
        if not index_ids:
            return 0
        keys, args = _invalidate_call(base, kind, index_ids)
        deleted = 0
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
        """One ``MGET``."""
        if not key_ids:
            return []
        return list(await self.client.mget([base + "k:" + key_id for key_id in key_ids]))

    async def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """One ``EVALSHA`` of ``set.lua``."""
        if writes:
            keys, args = _set_call(base, writes, unlock)
            await self._set(keys=keys, args=args)
        elif unlock is not None:
            await self.unlock(base, *unlock)

    async def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """One ``EVALSHA`` of ``delete.lua``."""
        if not key_ids:
            return 0
        keys = [base + "k:" + key_id for key_id in key_ids]
        return int(await self._delete(keys=keys, args=[base, *key_ids]))

    async def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """``invalidate.lua`` until the indexes are empty."""
        if not index_ids:
            return 0
        keys, args = _invalidate_call(base, kind, index_ids)
        deleted = 0
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
