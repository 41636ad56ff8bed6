"""Cache storages: where values live. One small protocol, sync and async.

A storage keeps opaque bytes (the envelope made by :func:`hardening.cache.policy.pack`) under
ids the cache computes, with a TTL, and indexes them by tag and by key prefix so that
invalidation touches only the keys concerned. Every call names the cache's ``base`` (its
``<prefix>:c:{<namespace>}:``), so one storage can serve several namespaces.

Implementations: :class:`~hardening.cache.memory.MemoryCacheStorage` (in process, bounded LRU)
and :class:`~hardening.cache.redis.RedisCacheStorage` /
:class:`~hardening.cache.redis.AsyncRedisCacheStorage` (Lua scripts in ``lua/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = ["AsyncCacheStorage", "CacheStorage", "IndexKind", "Write"]

IndexKind = Literal["t", "p"]
"""Which index to invalidate: ``"t"`` tags, ``"p"`` key prefixes."""


@dataclass(frozen=True, slots=True)
class Write:
    """One value to store.

    Attributes:
        key_id: the key's id (see :meth:`hardening.cache.policy.KeyScheme.key_id`).
        value: the envelope bytes.
        ttl_ms: milliseconds the value lives (at least 1).
        tags: the ids of its tags.
        prefixes: the ids of its indexed key prefixes.
    """

    key_id: str
    value: bytes
    ttl_ms: int
    tags: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


@runtime_checkable
class CacheStorage(Protocol):
    """A blocking cache storage.

    Attributes:
        shared: whether other processes read it too (then a miss takes a stampede lock).
    """

    shared: bool

    def get(self, base: str, key_id: str) -> bytes | None:
        """Return the stored bytes of ``key_id``, or ``None``."""
        ...

    def get_many(self, base: str, key_ids: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes of each id, in order, in one round trip."""
        ...

    def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """Store every write in one round trip; then release ``unlock`` (key id, token)."""
        ...

    def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """Delete values; return how many existed."""
        ...

    def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """Delete every value in the given tag or prefix indexes; return how many existed."""
        ...

    def lock(
        self, base: str, key_id: str, token: str, ttl_ms: int, read: bool = True
    ) -> tuple[bool, bytes | None]:
        """Take the stampede lock of ``key_id`` for ``ttl_ms``, in one step with a read.

        ``read=False`` skips the read (the value there could not be decoded).

        Returns:
            ``(False, value)`` when the value is there, ``(True, None)`` when the lock was
            taken, ``(False, None)`` when another caller holds it.
        """
        ...

    def unlock(self, base: str, key_id: str, token: str) -> None:
        """Release the stampede lock of ``key_id`` if ``token`` still holds it."""
        ...


@runtime_checkable
class AsyncCacheStorage(Protocol):
    """An asyncio cache storage; the same operations as :class:`CacheStorage`.

    Attributes:
        shared: whether other processes read it too.
    """

    shared: bool

    async def get(self, base: str, key_id: str) -> bytes | None:
        """Return the stored bytes of ``key_id``, or ``None``."""
        ...

    async def get_many(self, base: str, key_ids: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes of each id, in order, in one round trip."""
        ...

    async def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """Store every write in one round trip; then release ``unlock`` (key id, token)."""
        ...

    async def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """Delete values; return how many existed."""
        ...

    async def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """Delete every value in the given tag or prefix indexes; return how many existed."""
        ...

    async def lock(
        self, base: str, key_id: str, token: str, ttl_ms: int, read: bool = True
    ) -> tuple[bool, bytes | None]:
        """Take the stampede lock of ``key_id`` for ``ttl_ms``, in one step with a read."""
        ...

    async def unlock(self, base: str, key_id: str, token: str) -> None:
        """Release the stampede lock of ``key_id`` if ``token`` still holds it."""
        ...
