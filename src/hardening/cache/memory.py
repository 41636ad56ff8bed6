"""The in-process cache storage: a bounded LRU with expiry and exact tag and prefix indexes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hardening._clock import SystemClock
from hardening.errors import ConfigurationError

if TYPE_CHECKING:
    from hardening._clock import Clock
    from hardening.cache.storage import IndexKind, Write

__all__ = ["MemoryCacheStorage", "MemoryEntry"]


@dataclass(slots=True)
class MemoryEntry:
    """A stored value.

    Attributes:
        value: the envelope bytes (what a shared storage would hold; counted by ``max_bytes``).
        expires_at: when it expires, on the storage's clock.
        indexes: the tag and prefix index names listing it.
        memo: the value decoded once by a cache: ``(serializer, expires_ms, delta_ms, value)``.
    """

    value: bytes
    expires_at: float
    indexes: tuple[str, ...]
    memo: tuple[object, int, int, Any] | None = None


class MemoryCacheStorage:
    """In-process storage: a least-recently-used map bounded by entries and by bytes.

    Reads move an entry to the recent end; a write past ``max_entries`` or ``max_bytes``
    evicts from the other end. Expired entries are dropped when read or evicted. Tag and prefix
    indexes list exactly the live entries, so an invalidation touches only the keys concerned.
    Thread-safe; not shared between processes (use Redis for several workers).

    Args:
        max_entries: the most values kept.
        max_bytes: the most bytes of stored values kept (``None``: only ``max_entries``).
        clock: the clock expiry is measured by (a :class:`~hardening.FakeClock` in tests).

    Raises:
        ConfigurationError: a bound is not a positive integer.
    """

    shared = False

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        for name, bound in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if bound is None and name == "max_bytes":
                continue
            if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
                raise ConfigurationError(f"{name} must be a positive integer, not {bound!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock: Clock = clock or SystemClock()
        self._data: OrderedDict[str, MemoryEntry] = OrderedDict()
        self._indexes: dict[str, set[str]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        """The bytes of stored values now."""
        return self._bytes

    def __repr__(self) -> str:
        return (
            f"MemoryCacheStorage(max_entries={self.max_entries}, max_bytes={self.max_bytes}, "
            f"entries={len(self._data)})"
        )

    # --- reads --------------------------------------------------------------------------

    def entry(self, base: str, key_id: str) -> MemoryEntry | None:
        """Return the live entry of ``key_id`` (marking it recently used), or ``None``.

        The cache keeps the decoded value in ``memo``, so a hit decodes nothing: every reader
        gets the same object, as with ``functools.lru_cache``. Treat cached values as
        read-only.
        """
        name = base + "k:" + key_id
        with self._lock:
            entry = self._data.get(name)
            if entry is None:
                return None
            if entry.expires_at <= self._clock.time():
                self._drop(name)
                return None
            self._data.move_to_end(name)
            return entry

    def get(self, base: str, key_id: str) -> bytes | None:
        """Return the stored bytes of ``key_id``, or ``None``."""
        entry = self.entry(base, key_id)
        return None if entry is None else entry.value

    def get_many(self, base: str, key_ids: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes of each id, in order."""
        return [self.get(base, key_id) for key_id in key_ids]

    # --- writes -------------------------------------------------------------------------

    def set_many(
        self, base: str, writes: Sequence[Write], unlock: tuple[str, str] | None = None
    ) -> None:
        """Store every write, evicting the least recently used past the bounds."""
        now = self._clock.time()
        with self._lock:
            for write in writes:
                name = base + "k:" + write.key_id
                if name in self._data:
                    self._drop(name)
                size = len(write.value)
                if self.max_bytes is not None and size > self.max_bytes:
                    continue  # it would evict everything and still not fit
                indexes = tuple(base + "t:" + tag for tag in write.tags) + tuple(
                    base + "p:" + prefix for prefix in write.prefixes
                )
                self._data[name] = MemoryEntry(write.value, now + write.ttl_ms / 1000, indexes)
                self._bytes += size
                for index in indexes:
                    self._indexes.setdefault(index, set()).add(name)
            self._evict()

    def _evict(self) -> None:
        data = self._data
        while len(data) > self.max_entries or (
            self.max_bytes is not None and self._bytes > self.max_bytes
        ):
            self._drop(next(iter(data)))

    def _drop(self, name: str) -> bool:
        entry = self._data.pop(name, None)
        if entry is None:
            return False
        self._bytes -= len(entry.value)
        for index in entry.indexes:
            members = self._indexes.get(index)
            if members is not None:
                members.discard(name)
                if not members:
                    del self._indexes[index]
        return True

    def delete(self, base: str, key_ids: Sequence[str]) -> int:
        """Delete values; return how many existed (expired ones count as gone)."""
        now = self._clock.time()
        deleted = 0
        with self._lock:
            for key_id in key_ids:
                name = base + "k:" + key_id
                entry = self._data.get(name)
                if entry is not None:
                    deleted += entry.expires_at > now
                    self._drop(name)
        return deleted

    def invalidate(self, base: str, kind: IndexKind, index_ids: Sequence[str]) -> int:
        """Delete every value in the given tag or prefix indexes; return how many were live."""
        now = self._clock.time()
        deleted = 0
        with self._lock:
            for index_id in index_ids:
                for name in list(self._indexes.get(base + kind + ":" + index_id, ())):
                    entry = self._data.get(name)
                    if entry is not None:
                        deleted += entry.expires_at > now
                        self._drop(name)
        return deleted

    def clear(self) -> None:
        """Forget everything (every namespace)."""
        with self._lock:
            self._data.clear()
            self._indexes.clear()
            self._bytes = 0

    # --- locks: one process, where single flight already makes callers wait ---------------

    def lock(
        self, base: str, key_id: str, token: str, ttl_ms: int, read: bool = True
    ) -> tuple[bool, bytes | None]:
        """Always granted: in one process, the cache's single flight already serializes."""
        return True, None

    def unlock(self, base: str, key_id: str, token: str) -> None:
        """Nothing to release."""
