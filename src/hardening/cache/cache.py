"""``Cache`` and ``AsyncCache``: one configuration and logic (``_base.py``), two drivers.

A miss is loaded once however many callers want the key: callers in this process wait for
the first one (single flight); on a shared storage (Redis) the first caller of each process
also takes a short lock (``SET NX PX``) and the other processes poll for the value until the
lock's holder stores it, releases it (they take it over) or the lock times out (they load
themselves). Early refresh (XFetch) reloads hot keys shortly before they expire while the
other callers keep reading the current value.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from typing_extensions import Self

from hardening.cache._base import MISSING, KeySpec, TagsSpec, _CacheBase, check_specs
from hardening.errors import ConfigurationError

if TYPE_CHECKING:
    from hardening.cache.policy import TTL
    from hardening.cache.storage import AsyncCacheStorage, CacheStorage, Write

__all__ = ["AsyncCache", "Cache"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


class _Flight:
    """One load in progress in this process; the callers that came later wait on ``done``."""

    __slots__ = ("done", "error", "payload", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = MISSING
        self.payload: bytes | None = None
        self.error: BaseException | None = None


class Cache(_CacheBase):
    """A blocking cache: get-or-set with stampede protection, tags, prefixes, batch ops.

    Args:
        storage: ``"memory://"`` (default: a bounded LRU in this process), a ``redis://``,
            ``rediss://``, ``redis+cluster://`` or ``redis+sentinel://`` URL, a ``redis.Redis``
            / ``RedisCluster`` client, or a :class:`~hardening.cache.CacheStorage`.
        namespace: keys of different namespaces never meet. On Redis a namespace is one
            Cluster slot (its ``{namespace}`` hash tag): spread load with several namespaces.
        default_ttl: the TTL of writes that give none: seconds, a ``timedelta`` or a profile
            name.
        serializer: how values become bytes; :class:`~hardening.JSONSerializer` by default.
            :class:`~hardening.PickleSerializer` is opt-in (see its warning).
        metrics: a :class:`~hardening.Metrics` registry to report into
            (``hardening_cache_*`` families, labelled with ``name``).
        profiles: TTL profiles by name (``ttl="project"``); default
            :data:`~hardening.DEFAULT_TTL_PROFILES`.
        jitter: each write's TTL is shortened by a random fraction up to this, so keys
            written together do not expire together (0 for exact TTLs).
        early_refresh: XFetch's beta: values that took time to load are reloaded by one
            reader shortly before they expire; higher is earlier, 0 disables.
        lock_timeout: on a shared storage, how long a loader holds the stampede lock and how
            long other processes wait for its value before loading themselves.
        max_value_bytes: the largest serialized value; larger ones raise
            :class:`~hardening.ValueTooLarge`.
        max_entries: ``memory://`` only: the most values kept (least recently used go first).
            Its hits return the stored object itself (decoded once): treat it as read-only.
        max_bytes: ``memory://`` only: the most bytes of values kept.
        max_prefix_depth: how many ``:``-separated prefixes of each key are indexed for
            :meth:`invalidate_prefix` (each costs an index write per set).
        on_backend_error: ``"miss"`` (default): a failing storage reads as misses (loaders
            run), writes and invalidations are skipped, nothing raises, failures are counted
            and logged once, and the storage is re-probed with backoff from 0.5 s to 30 s.
            ``"raise"``: raise :class:`~hardening.BackendUnavailable`.
        key_prefix: the first part of every storage key.
        clock: the clock for expiry (memory), early refresh and backoff.
        name: the cache's ``cache`` label in metrics; defaults to the namespace.

    Raises:
        ConfigurationError: an option or the storage is invalid.
    """

    def _init_driver(self) -> None:
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()

    # --- storage calls with failure handling ------------------------------------------

    def _read(self, key_id: str) -> bytes | None:
        ticket = self._usable("get")
        if ticket is None:
            return None
        storage: CacheStorage = self._storage
        try:
            raw = storage.get(self.base, key_id)
        except Exception as exc:
            self._failed("get", exc, ticket)
            return None
        self._ok()
        return raw

    def _store(self, writes: Sequence[Write], unlock: tuple[str, str] | None = None) -> None:
        ticket = self._usable("set")
        if ticket is None:
            return
        storage: CacheStorage = self._storage
        try:
            storage.set_many(self.base, writes, unlock)
        except Exception as exc:
            self._failed("set", exc, ticket)
        else:
            self._ok()

    def _try_lock(self, key_id: str, token: str) -> tuple[bool, Any]:
        """Take the stampede lock or find the value: ``(taken, value or MISSING)``.

        A failing storage counts as taken: load now rather than wait.
        """
        ticket = self._usable("lock")
        if ticket is None:
            return True, MISSING
        storage: CacheStorage = self._storage
        try:
            taken, raw = storage.lock(self.base, key_id, token, self._lock_ms)
            value = self._decode(raw)[0]
            if raw is not None and value is MISSING:  # unreadable bytes: lock over them
                taken, _ = storage.lock(self.base, key_id, token, self._lock_ms, read=False)
        except Exception as exc:
            self._failed("lock", exc, ticket)
            return True, MISSING
        self._ok()
        return taken, value

    def _unlock(self, key_id: str, token: str) -> None:
        storage: CacheStorage = self._storage
        try:
            storage.unlock(self.base, key_id, token)
        except Exception as exc:  # the lock expires by itself
            self._failed("lock", exc)

    # --- reads and writes ---------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` when there is none.

        Args:
            key: the key.
            default: returned on a miss (a stored ``None`` is a hit that returns ``None``).

        Returns:
            The value or ``default``. A failing storage reads as a miss.

        Raises:
            ConfigurationError: ``key`` is not a string.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        key_id = self.scheme.key_id(key)
        if self._sync_storage:
            value = self._remembered(key_id)[0]
        else:
            value = self._decode(self._read(key_id))[0]
        if value is MISSING:
            self._miss()
            return default
        self._hit()
        return value

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the values of the keys that have one, in one round trip (``MGET``).

        Args:
            keys: the keys.

        Returns:
            Key to value, for hits only.

        Raises:
            ConfigurationError: a key is not a string.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        keys = list(dict.fromkeys(keys))
        ids = [self.scheme.key_id(key) for key in keys]
        raws: list[bytes | None] = [None] * len(ids)
        ticket = self._usable("get") if ids else None
        if ticket is not None:
            storage: CacheStorage = self._storage
            try:
                raws = storage.get_many(self.base, ids)
            except Exception as exc:
                self._failed("get", exc, ticket)
            else:
                self._ok()
        found = {}
        for key, raw in zip(keys, raws, strict=True):
            value, _ = self._decode(raw)
            if value is not MISSING:
                found[key] = value
        self._hits(len(found))
        if len(found) < len(keys):
            self._miss(len(keys) - len(found))
        return found

    def set(
        self, key: str, value: Any, *, ttl: TTL | None = None, tags: Iterable[str] | None = None
    ) -> None:
        """Store ``value`` under ``key``.

        Args:
            key: the key.
            value: the value (JSON-encodable with the default serializer).
            ttl: seconds, a ``timedelta`` or a profile name; ``default_ttl`` when ``None``.
            tags: tags to invalidate it by (:meth:`invalidate_tags`).

        Raises:
            ValueTooLarge: the serialized value is over ``max_value_bytes``.
            CacheError: the serializer cannot encode the value.
            ConfigurationError: a bad key, TTL or tag.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        write, _ = self._encode(key, self.scheme.key_id(key), value, ttl, tags)
        self._store([write])

    def set_many(
        self,
        items: Mapping[str, Any],
        *,
        ttl: TTL | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        """Store several values in one round trip (one script on Redis).

        Args:
            items: key to value.
            ttl: the TTL of each (each jittered on its own).
            tags: tags given to every one of them.

        Raises:
            ValueTooLarge: a serialized value is over ``max_value_bytes`` (nothing is stored).
            CacheError: the serializer cannot encode a value.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        tag_list = list(tags) if tags is not None else None
        writes = [
            self._encode(key, self.scheme.key_id(key), value, ttl, tag_list)[0]
            for key, value in items.items()
        ]
        if writes:
            self._store(writes)

    def delete(self, key: str) -> bool:
        """Delete ``key``.

        Args:
            key: the key.

        Returns:
            Whether it had a value (``False`` also when the storage failed).

        Raises:
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        key_id = self.scheme.key_id(key)
        ticket = self._usable("delete")
        if ticket is None:
            return False
        storage: CacheStorage = self._storage
        try:
            deleted = storage.delete(self.base, [key_id])
        except Exception as exc:
            self._failed("delete", exc, ticket)
            return False
        self._ok()
        return deleted > 0

    def invalidate_tags(self, tags: str | Iterable[str]) -> int:
        """Delete every value carrying one of ``tags`` (e.g. ``"project:42"``).

        Touches only the keys indexed under those tags: no ``KEYS``, no ``SCAN``.

        Args:
            tags: a tag or several.

        Returns:
            How many values were deleted (0 when the storage failed).

        Raises:
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        return self._invalidate("t", self.scheme.tag_ids(tags))

    def invalidate_prefix(self, prefix: str) -> int:
        """Delete every value whose key starts with ``prefix`` (``"project:42:"``).

        Keys are indexed under their first ``max_prefix_depth`` ``:``-separated prefixes when
        written, so only those keys are touched: no ``KEYS``, no ``SCAN``.

        Args:
            prefix: ends in ``:`` and has at most ``max_prefix_depth`` parts.

        Returns:
            How many values were deleted (0 when the storage failed).

        Raises:
            ConfigurationError: the prefix does not end in ``:`` or is deeper than indexed.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        return self._invalidate("p", (self.scheme.prefix_id(prefix),))

    def _invalidate(self, kind: Any, ids: Sequence[str]) -> int:
        ticket = self._usable("invalidate") if ids else None
        if ticket is None:
            return 0
        storage: CacheStorage = self._storage
        try:
            deleted = storage.invalidate(self.base, kind, ids)
        except Exception as exc:
            self._failed("invalidate", exc, ticket)
            return 0
        self._ok()
        return deleted

    # --- get-or-set ---------------------------------------------------------------------

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl: TTL | None = None,
        tags: Iterable[str] | None = None,
    ) -> T:
        """Return the value of ``key``, loading and storing it on a miss, once for all callers.

        Args:
            key: the key.
            loader: computes the value on a miss (or an early refresh).
            ttl: the TTL of a loaded value.
            tags: tags of a loaded value.

        Returns:
            The cached or loaded value. Callers that waited for another caller's load get
            their own copy (decoded from the stored bytes).

        Raises:
            Exception: whatever ``loader`` raised, to every caller waiting for that load in
                this process; nothing is cached.
            ValueTooLarge: the loaded value is over ``max_value_bytes``.
            BackendUnavailable: the storage failed and ``on_backend_error="raise"``.
        """
        key_id = self.scheme.key_id(key)
        if self._sync_storage:
            value, refresh = self._remembered(key_id)
        else:
            value, refresh = self._decode(self._read(key_id))
        if value is not MISSING:
            self._hit()
            if refresh:
                return cast(T, self._refresh(key, key_id, loader, ttl, tags, value))
            return cast(T, value)
        self._miss()
        return cast(T, self._load_once(key, key_id, loader, ttl, tags))

    def _load_once(
        self, key: str, key_id: str, loader: Callable[[], Any], ttl: TTL | None, tags: object
    ) -> Any:
        while True:
            with self._flights_lock:
                flight = self._flights.get(key_id)
                if flight is None:
                    flight = self._flights[key_id] = _Flight()
                    break
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.value is not MISSING:
                self._avoided()
                return self._copy(flight.value, flight.payload)
            # the loading thread was interrupted without an error to share: try again
        try:
            flight.value, flight.payload = self._load_shared(key, key_id, loader, ttl, tags)
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._land(key_id, flight)

    def _land(self, key_id: str, flight: _Flight) -> None:
        with self._flights_lock:
            if self._flights.get(key_id) is flight:
                del self._flights[key_id]
        flight.done.set()

    def _load_shared(
        self, key: str, key_id: str, loader: Callable[[], Any], ttl: TTL | None, tags: object
    ) -> tuple[Any, bytes | None]:
        """Load across processes: take the lock, or wait for its holder's value."""
        token = None
        if self._shared:
            token = secrets.token_hex(8)
            taken, value = self._try_lock(key_id, token)
            if not taken and value is MISSING:
                value = self._wait_for_holder(key_id, token)
            if value is not MISSING:
                self._avoided()
                return value, None
        return self._load(key, key_id, loader, ttl, tags, token)

    def _wait_for_holder(self, key_id: str, token: str) -> Any:
        """Poll until the value appears (returned) or the lock is free (taken: MISSING)."""
        for delay in self._poll:
            self.clock.sleep(delay)
            taken, value = self._try_lock(key_id, token)
            if taken or value is not MISSING:
                return value  # the value, or MISSING: the holder gave up and this caller loads
        return MISSING

    def _load(
        self,
        key: str,
        key_id: str,
        loader: Callable[[], Any],
        ttl: TTL | None,
        tags: object,
        token: str | None,
        *,
        refresh: bool = False,
    ) -> tuple[Any, bytes | None]:
        start = self.clock.monotonic()
        try:
            value = loader()
            seconds = self.clock.monotonic() - start
            write, payload = self._encode(key, key_id, value, ttl, tags, _ms(seconds))
        except BaseException:
            self._loaded("error", self.clock.monotonic() - start)
            if token is not None:
                self._unlock(key_id, token)
            raise
        self._loaded("refreshed" if refresh else "loaded", seconds)
        self._store([write], (key_id, token) if token is not None else None)
        return value, payload

    def _refresh(
        self,
        key: str,
        key_id: str,
        loader: Callable[[], Any],
        ttl: TTL | None,
        tags: object,
        current: Any,
    ) -> Any:
        """Reload a value before it expires, unless another caller already does."""
        with self._flights_lock:
            if key_id in self._flights:
                return current
            flight = self._flights[key_id] = _Flight()
        try:
            token = None
            if self._shared:
                token = secrets.token_hex(8)
                if not self._try_lock(key_id, token)[0]:
                    flight.value = current
                    return current
            flight.value, flight.payload = self._load(
                key, key_id, loader, ttl, tags, token, refresh=True
            )
            return flight.value
        except Exception:  # the current value is still valid: serve it
            flight.value = current
            return current
        finally:
            self._land(key_id, flight)

    # --- decorator ----------------------------------------------------------------------

    def cached(
        self,
        *,
        ttl: TTL | None = None,
        key: KeySpec = None,
        tags: TagsSpec = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function so its results are cached per arguments (with get-or-set).

        Args:
            ttl: the TTL of each result.
            key: ``None`` (the function's module, qualified name and JSON of its arguments;
                long keys are hashed), a format string over the parameters
                (``"project:{project_id}"``), or a callable taking the function's arguments.
            tags: format strings over the parameters (``["project:{project_id}"]``) or a
                callable taking the function's arguments and returning tags.

        Returns:
            The decorator.

        Raises:
            ConfigurationError: applied to an ``async def`` function (use
                :class:`AsyncCache`), or ``key``/``tags`` of the wrong kind.
        """
        check_specs(key, tags)

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(func):
                raise ConfigurationError(
                    f"Cache.cached cannot wrap async function {func.__qualname__}: "
                    "its blocking storage calls would stall the event loop; use AsyncCache"
                )
            signature = _signature(func, key, tags)

            @functools.wraps(func)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                call_key = self._call_key(func, key, signature, args, kwargs)
                call_tags = self._call_tags(tags, signature, args, kwargs)
                return self.get_or_set(
                    call_key, lambda: func(*args, **kwargs), ttl=ttl, tags=call_tags
                )

            return wrapper

        return decorate

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the Redis client if the cache built it from a URL (idempotent)."""
        close = getattr(self._storage, "close", None)
        if close is not None and self._owns_storage:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000 + 0.999))


def _signature(func: Callable[..., Any], key: KeySpec, tags: TagsSpec) -> inspect.Signature | None:
    if isinstance(key, str) or (tags is not None and not callable(tags)):
        return inspect.signature(func)
    return None


def _own_cancel() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


class AsyncCache(_CacheBase):
    """The asyncio twin of :class:`Cache`: the same options and behaviour, awaitable I/O.

    Redis is reached through ``redis.asyncio``; the memory storage only computes. Loaders are
    coroutine functions (a plain function's result is used as is). Takes the same arguments
    as :class:`Cache`, with ``redis.asyncio`` clients in place of blocking ones.
    """

    _is_async = True

    def _init_driver(self) -> None:
        self._flights: dict[str, asyncio.Future[tuple[Any, bytes | None]]] = {}

    # --- storage calls with failure handling ------------------------------------------

    async def _read(self, key_id: str) -> bytes | None:
        ticket = self._usable("get")
        if ticket is None:
            return None
        try:
            if self._sync_storage:
                raw = self._storage.get(self.base, key_id)
            else:
                storage: AsyncCacheStorage = self._storage
                raw = await storage.get(self.base, key_id)
        except Exception as exc:
            self._failed("get", exc, ticket)
            return None
        except BaseException:  # cancelled: free the breaker's probe, if this was it
            self._health.abandon(ticket)
            raise
        self._ok()
        return cast("bytes | None", raw)

    async def _call(self, operation: str, method: str, *args: Any) -> Any:
        """Call a storage method; ``MISSING`` when it failed or was skipped."""
        ticket = self._usable(operation)
        if ticket is None:
            return MISSING
        try:
            result = getattr(self._storage, method)(self.base, *args)
            if not self._sync_storage:
                result = await result
        except Exception as exc:
            self._failed(operation, exc, ticket)
            return MISSING
        except BaseException:
            self._health.abandon(ticket)
            raise
        self._ok()
        return result

    async def _store(self, writes: Sequence[Write], unlock: tuple[str, str] | None = None) -> None:
        await self._call("set", "set_many", writes, unlock)

    async def _try_lock(self, key_id: str, token: str) -> tuple[bool, Any]:
        reply = await self._call("lock", "lock", key_id, token, self._lock_ms)
        if reply is MISSING:
            return True, MISSING
        taken, raw = reply
        value = self._decode(raw)[0]
        if raw is not None and value is MISSING:  # unreadable bytes: lock over them
            reply = await self._call("lock", "lock", key_id, token, self._lock_ms, False)
            return reply is MISSING or reply[0], MISSING
        return taken, value

    async def _unlock(self, key_id: str, token: str) -> None:
        await self._call("lock", "unlock", key_id, token)

    # --- reads and writes ---------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` when there is none (see ``Cache.get``)."""
        key_id = self.scheme.key_id(key)
        if self._sync_storage:
            value = self._remembered(key_id)[0]
        else:
            value = self._decode(await self._read(key_id))[0]
        if value is MISSING:
            self._miss()
            return default
        self._hit()
        return value

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the values of the keys that have one, in one round trip (``MGET``)."""
        keys = list(dict.fromkeys(keys))
        ids = [self.scheme.key_id(key) for key in keys]
        raws = await self._call("get", "get_many", ids) if ids else []
        if raws is MISSING:
            raws = [None] * len(ids)
        found = {}
        for key, raw in zip(keys, raws, strict=True):
            value, _ = self._decode(raw)
            if value is not MISSING:
                found[key] = value
        self._hits(len(found))
        if len(found) < len(keys):
            self._miss(len(keys) - len(found))
        return found

    async def set(
        self, key: str, value: Any, *, ttl: TTL | None = None, tags: Iterable[str] | None = None
    ) -> None:
        """Store ``value`` under ``key`` (see ``Cache.set``)."""
        write, _ = self._encode(key, self.scheme.key_id(key), value, ttl, tags)
        await self._store([write])

    async def set_many(
        self,
        items: Mapping[str, Any],
        *,
        ttl: TTL | None = None,
        tags: Iterable[str] | None = None,
    ) -> None:
        """Store several values in one round trip (see ``Cache.set_many``)."""
        tag_list = list(tags) if tags is not None else None
        writes = [
            self._encode(key, self.scheme.key_id(key), value, ttl, tag_list)[0]
            for key, value in items.items()
        ]
        if writes:
            await self._store(writes)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it had a value (see ``Cache.delete``)."""
        deleted = await self._call("delete", "delete", [self.scheme.key_id(key)])
        return deleted is not MISSING and deleted > 0

    async def invalidate_tags(self, tags: str | Iterable[str]) -> int:
        """Delete every value carrying one of ``tags`` (see ``Cache.invalidate_tags``)."""
        ids = self.scheme.tag_ids(tags)
        deleted = await self._call("invalidate", "invalidate", "t", ids) if ids else 0
        return 0 if deleted is MISSING else int(deleted)

    async def invalidate_prefix(self, prefix: str) -> int:
        """Delete every value whose key starts with ``prefix`` (see ``Cache.invalidate_prefix``)."""
        ids = (self.scheme.prefix_id(prefix),)
        deleted = await self._call("invalidate", "invalidate", "p", ids)
        return 0 if deleted is MISSING else int(deleted)

    # --- get-or-set ---------------------------------------------------------------------

    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: TTL | None = None,
        tags: Iterable[str] | None = None,
    ) -> T:
        """Return the value of ``key``, loading it on a miss once for all callers.

        See :meth:`Cache.get_or_set`; ``loader`` is a coroutine function here.
        """
        key_id = self.scheme.key_id(key)
        if self._sync_storage:
            value, refresh = self._remembered(key_id)
        else:
            value, refresh = self._decode(await self._read(key_id))
        if value is not MISSING:
            self._hit()
            if refresh:
                return cast(T, await self._refresh(key, key_id, loader, ttl, tags, value))
            return cast(T, value)
        self._miss()
        return cast(T, await self._load_once(key, key_id, loader, ttl, tags))

    async def _load_once(
        self, key: str, key_id: str, loader: Callable[[], Any], ttl: TTL | None, tags: object
    ) -> Any:
        while True:
            flight = self._flights.get(key_id)
            if flight is None:
                break
            try:
                value, payload = await asyncio.shield(flight)
            except asyncio.CancelledError:
                if flight.cancelled() and not _own_cancel():
                    continue  # the loading task was cancelled, not this one: try again
                raise
            self._avoided()
            return self._copy(value, payload)
        flight = self._flights[key_id] = asyncio.get_running_loop().create_future()
        try:
            result = await self._load_shared(key, key_id, loader, ttl, tags)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                flight.cancel()
            else:
                flight.set_exception(exc)
                flight.exception()  # retrieved: no "never retrieved" log without waiters
            raise
        finally:
            if self._flights.get(key_id) is flight:
                del self._flights[key_id]
        flight.set_result(result)
        return result[0]

    async def _load_shared(
        self, key: str, key_id: str, loader: Callable[[], Any], ttl: TTL | None, tags: object
    ) -> tuple[Any, bytes | None]:
        token = None
        if self._shared:
            token = secrets.token_hex(8)
            taken, value = await self._try_lock(key_id, token)
            if not taken and value is MISSING:
                value = await self._wait_for_holder(key_id, token)
            if value is not MISSING:
                self._avoided()
                return value, None
        return await self._load(key, key_id, loader, ttl, tags, token)

    async def _wait_for_holder(self, key_id: str, token: str) -> Any:
        for delay in self._poll:
            await asyncio.sleep(delay)
            taken, value = await self._try_lock(key_id, token)
            if taken or value is not MISSING:
                return value
        return MISSING

    async def _load(
        self,
        key: str,
        key_id: str,
        loader: Callable[[], Any],
        ttl: TTL | None,
        tags: object,
        token: str | None,
        *,
        refresh: bool = False,
    ) -> tuple[Any, bytes | None]:
        start = self.clock.monotonic()
        try:
            value = loader()
            if inspect.isawaitable(value):
                value = await value
            seconds = self.clock.monotonic() - start
            write, payload = self._encode(key, key_id, value, ttl, tags, _ms(seconds))
        except BaseException:
            self._loaded("error", self.clock.monotonic() - start)
            if token is not None:
                await self._unlock(key_id, token)
            raise
        self._loaded("refreshed" if refresh else "loaded", seconds)
        await self._store([write], (key_id, token) if token is not None else None)
        return value, payload

    async def _refresh(
        self,
        key: str,
        key_id: str,
        loader: Callable[[], Any],
        ttl: TTL | None,
        tags: object,
        current: Any,
    ) -> Any:
        if key_id in self._flights:
            return current
        flight = self._flights[key_id] = asyncio.get_running_loop().create_future()
        result: tuple[Any, bytes | None] = (current, None)
        try:
            token = None
            if self._shared:
                token = secrets.token_hex(8)
                if not (await self._try_lock(key_id, token))[0]:
                    return current
            result = await self._load(key, key_id, loader, ttl, tags, token, refresh=True)
            return result[0]
        except Exception:  # the current value is still valid: serve it
            return current
        finally:
            if self._flights.get(key_id) is flight:
                del self._flights[key_id]
            if not flight.done():
                flight.set_result(result)

    # --- decorator ----------------------------------------------------------------------

    def cached(
        self,
        *,
        ttl: TTL | None = None,
        key: KeySpec = None,
        tags: TagsSpec = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Decorate an ``async def`` function so its results are cached per arguments.

        Args:
            ttl: the TTL of each result.
            key: as for :meth:`Cache.cached`.
            tags: as for :meth:`Cache.cached`.

        Returns:
            The decorator.

        Raises:
            ConfigurationError: applied to a plain function (use :class:`Cache`), or
                ``key``/``tags`` of the wrong kind.
        """
        check_specs(key, tags)

        def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(
                    f"AsyncCache.cached wraps async functions, not {func.__qualname__}; "
                    "use Cache for plain ones"
                )
            signature = _signature(func, key, tags)

            @functools.wraps(func)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                call_key = self._call_key(func, key, signature, args, kwargs)
                call_tags = self._call_tags(tags, signature, args, kwargs)
                return await self.get_or_set(
                    call_key, lambda: func(*args, **kwargs), ttl=ttl, tags=call_tags
                )

            return wrapper

        return decorate

    # --- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the Redis client if the cache built it from a URL (idempotent)."""
        aclose = getattr(self._storage, "aclose", None)
        if aclose is not None and self._owns_storage:
            await aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
