"""Batch loading: the loads made in one event-loop tick become one ``WHERE id IN (…)`` query.

A GraphQL resolver or a template that loads each post's author one by one sends N queries.
:class:`DataLoader` (after Facebook's DataLoader) collects every ``load(key)`` made until the
event loop next runs its callbacks, calls your batch function once with all the keys, and
hands each caller its value; a per-request cache answers repeated keys without a query.
:func:`sql_loader` is the batch function for a mapped class; :func:`load_by_ids` and
:func:`load_by_ids_async` load a list of ids in one query, in order, without a loader.

``DataLoader`` needs only asyncio; the SQL helpers import SQLAlchemy when called.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hardening._imports import require
from hardening._sql import sql_unavailable
from hardening.errors import ConfigurationError, NotFoundError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from sqlalchemy.orm import QueryableAttribute, Session

__all__ = ["BatchFunction", "DataLoader", "load_by_ids", "load_by_ids_async", "sql_loader"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
M = TypeVar("M")

BatchFunction = Callable[[list[K]], Awaitable[Sequence[V | Exception] | Mapping[K, V]]]
"""``async def batch(keys) -> values``: a sequence in key order (an ``Exception`` fails just
that key), or a mapping from key to value (a key it lacks is not found)."""

_IN_CHUNK = 1000  # keys per IN (...): well under every database's bound-parameter limit


class _Missing(enum.Enum):
    MISSING = enum.auto()


_MISSING = _Missing.MISSING


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a failed future's exception as seen (its waiter may have been cancelled)."""
    if not future.cancelled():
        future.exception()


class DataLoader(Generic[K, V]):
    """Coalesces ``load(key)`` calls made in one event-loop tick into one batch call.

    Make one loader per request: its cache then holds exactly what that request loaded (no
    stale data across requests, no unbounded growth).

    Args:
        batch_fn: ``async def batch(keys: list[K])`` returning the values in key order, or a
            mapping from key to value.
        max_batch_size: split larger batches into calls of at most this many keys.
        cache: answer a key already loaded by this loader from memory.
        default: the value of a key the batch function's mapping lacks; without it such a load
            raises :class:`~hardening.NotFoundError`.
        name: what the keys identify, for ``NotFoundError`` (default: the batch function's
            name).

    Raises:
        ConfigurationError: ``max_batch_size`` is not a positive int.

    Example::

        async def users_by_id(ids: list[int]) -> dict[int, User]:
            ...  # one query

        users = DataLoader(users_by_id)
        ana, bob = await asyncio.gather(users.load(1), users.load(2))  # one call
    """

    def __init__(
        self,
        batch_fn: BatchFunction[K, V],
        *,
        max_batch_size: int | None = None,
        cache: bool = True,
        default: V | _Missing = _MISSING,
        name: str | None = None,
    ) -> None:
        if max_batch_size is not None and (type(max_batch_size) is not int or max_batch_size < 1):
            raise ConfigurationError("max_batch_size must be a positive int or None")
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.cache = cache
        self.default = default
        self.name: str = name or str(getattr(batch_fn, "__name__", "DataLoader"))
        self._cache: dict[K, asyncio.Future[V]] = {}
        self._pending: dict[K, asyncio.Future[V]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, key: K) -> V:
        """The value for ``key``, loaded in a batch with every other key asked for this tick.

        Args:
            key: the key (hashable).

        Returns:
            The value.

        Raises:
            NotFoundError: the batch function's mapping lacks the key and there is no default.
            Exception: whatever the batch function raised, raised in every caller of its batch.
        """
        future = self._cache.get(key) if self.cache else None
        if future is None:
            future = self._pending.get(key)
            if future is None:
                future = self._enqueue(key)
        # shield: a cancelled caller must not cancel the value other callers wait for
        return await asyncio.shield(future)

    async def load_many(self, keys: Iterable[K]) -> list[V]:
        """The values for ``keys``, in order (all in one batch when called in one tick).

        Args:
            keys: the keys.

        Returns:
            The values, in key order.

        Raises:
            NotFoundError: a key is missing and there is no default.
            Exception: what the batch function raised.
        """
        return list(await asyncio.gather(*(self.load(key) for key in keys)))

    def prime(self, key: K, value: V) -> None:
        """Put a value in the cache (e.g. an object just created), unless the key is there.

        Args:
            key: the key.
            value: its value.
        """
        if self.cache and key not in self._cache:
            future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
            future.set_result(value)
            self._cache[key] = future

    def clear(self, key: K | None = None) -> None:
        """Forget a cached key (after changing its row), or every key.

        Args:
            key: the key to forget; ``None`` forgets all.
        """
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)

    def _enqueue(self, key: K) -> asyncio.Future[V]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V] = loop.create_future()
        future.add_done_callback(_consume)
        self._pending[key] = future
        if self.cache:
            self._cache[key] = future
        if not self._scheduled:
            self._scheduled = True
            # after every callback already queued: all the loads of this tick
            loop.call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        self._scheduled = False
        pending = list(self._pending.items())
        self._pending.clear()
        size = self.max_batch_size or len(pending)
        for start in range(0, len(pending), size):
            task = asyncio.get_running_loop().create_task(self._run(pending[start : start + size]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[K, asyncio.Future[V]]]) -> None:
        keys = [key for key, _ in batch]
        try:
            values = self._match(keys, await self.batch_fn(keys))
        except Exception as exc:
            for key, future in batch:
                self._fail(key, future, exc)
            return
        except asyncio.CancelledError:
            for key, future in batch:
                self._forget(key, future)
                future.cancel()
            raise
        for (key, future), value in zip(batch, values, strict=True):
            if isinstance(value, Exception):
                self._fail(key, future, value)
            elif not future.done():
                future.set_result(value)

    def _match(
        self, keys: list[K], result: Sequence[V | Exception] | Mapping[K, V]
    ) -> list[V | Exception]:
        if isinstance(result, Mapping):
            values: list[V | Exception] = []
            for key in keys:
                value = result.get(key, self.default)
                values.append(
                    NotFoundError(self.name, key) if isinstance(value, _Missing) else value
                )
            return values
        if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
            raise ConfigurationError(
                f"{self.name} returned a {type(result).__name__}: return a list in key order "
                "or a mapping from key to value"
            )
        if len(result) != len(keys):
            raise ConfigurationError(
                f"{self.name} returned {len(result)} values for {len(keys)} keys"
            )
        return list(result)

    def _fail(self, key: K, future: asyncio.Future[V], exc: Exception) -> None:
        self._forget(key, future)  # a later load tries again
        if not future.done():
            future.set_exception(exc)

    def _forget(self, key: K, future: asyncio.Future[V]) -> None:
        if self._cache.get(key) is future:
            del self._cache[key]

    def __repr__(self) -> str:
        return f"DataLoader({self.name}, cached={len(self._cache)})"


# --- SQL ---------------------------------------------------------------------------------


def _key_column(model: type[Any], key: QueryableAttribute[Any] | None) -> tuple[Any, str]:
    """The attribute to match ids against, and its name on the objects."""
    sa = require("sqlalchemy", extra="sqlalchemy", feature="SQL batch loading")
    mapper = sa.inspect(model, raiseerr=False)
    if mapper is None or not hasattr(mapper, "primary_key"):
        raise ConfigurationError(f"{model!r} is not a mapped class")
    if key is None:
        if len(mapper.primary_key) != 1:
            raise ConfigurationError(f"{model.__name__} has a composite primary key: pass key=")
        name = mapper.get_property_by_column(mapper.primary_key[0]).key
        return getattr(model, name), name
    name = getattr(key, "key", None)
    if not isinstance(name, str) or getattr(model, name, None) is not key:
        raise ConfigurationError(f"key must be an attribute of {model.__name__}, like Model.id")
    return key, name


def _chunks(keys: Sequence[Any]) -> Iterable[Sequence[Any]]:
    return (keys[start : start + _IN_CHUNK] for start in range(0, len(keys), _IN_CHUNK))


def _select(model: type[Any], column: Any, keys: Sequence[Any]) -> Any:
    sa = require("sqlalchemy", extra="sqlalchemy", feature="SQL batch loading")
    return sa.select(model).where(column.in_(keys))


def sql_loader(
    session: AsyncSession | async_sessionmaker[AsyncSession],
    model: type[M],
    *,
    key: QueryableAttribute[Any] | None = None,
) -> Callable[[list[Any]], Awaitable[dict[Any, M]]]:
    """The batch function loading rows of ``model`` by ``key``: one ``WHERE key IN (…)``.

    Given an ``AsyncSession``, its queries are serialised (an ``AsyncSession`` must not run
    two at once, and several loaders may share one); given an ``async_sessionmaker``, each
    batch opens a session of its own (loaded objects are then detached: load what you need).

    Args:
        session: an ``AsyncSession``, or an ``async_sessionmaker``.
        model: the mapped class.
        key: the attribute ids are matched on (default: the single-column primary key).

    Returns:
        The batch function, for :class:`DataLoader` (``DataLoader(sql_loader(s, User))``).
        Ids with no row are absent from its mapping (not found, or the loader's ``default``).
        It raises :class:`~hardening.BackendUnavailable` when the database could not be
        reached or timed out (every caller of that batch gets it).

    Raises:
        ConfigurationError: not a mapped class, a composite key without ``key=``.
    """
    column, name = _key_column(model, key)
    from sqlalchemy.ext.asyncio import AsyncSession

    @sql_unavailable
    async def batch(keys: list[Any]) -> dict[Any, M]:
        found: dict[Any, M] = {}
        for chunk in _chunks(keys):
            statement = _select(model, column, chunk)
            if isinstance(session, AsyncSession):
                lock = session.info.setdefault("hardening.loader_lock", asyncio.Lock())
                async with lock:
                    rows = (await session.scalars(statement)).all()
            else:
                async with session() as own:
                    rows = (await own.scalars(statement)).all()
            found.update((getattr(row, name), row) for row in rows)
        return found

    batch.__name__ = model.__name__
    return batch


def _in_order(ids: Sequence[Any], found: Mapping[Any, M]) -> list[M | None]:
    return [found.get(id_) for id_ in ids]


@sql_unavailable
def load_by_ids(
    session: Session,
    model: type[M],
    ids: Iterable[Any],
    *,
    key: QueryableAttribute[Any] | None = None,
) -> list[M | None]:
    """Load rows by id in one query (per 1,000 ids), in the order of ``ids``.

    Args:
        session: a ``Session``.
        model: the mapped class.
        ids: the ids (duplicates allowed).
        key: the attribute ids are matched on (default: the single-column primary key).

    Returns:
        One object per id, ``None`` where there is no row.

    Raises:
        ConfigurationError: not a mapped class, a composite key without ``key=``.
        BackendUnavailable: the database could not be reached or timed out.
    """
    column, name = _key_column(model, key)
    wanted = list(ids)
    unique = list(dict.fromkeys(wanted))
    found: dict[Any, M] = {}
    for chunk in _chunks(unique):
        rows = session.scalars(_select(model, column, chunk)).all()
        found.update((getattr(row, name), row) for row in rows)
    return _in_order(wanted, found)


@sql_unavailable
async def load_by_ids_async(
    session: AsyncSession,
    model: type[M],
    ids: Iterable[Any],
    *,
    key: QueryableAttribute[Any] | None = None,
) -> list[M | None]:
    """The asyncio twin of :func:`load_by_ids`.

    Args:
        session: an ``AsyncSession``.
        model: the mapped class.
        ids: the ids.
        key: the attribute ids are matched on.

    Returns:
        One object per id, ``None`` where there is no row.

    Raises:
        ConfigurationError: not a mapped class, a composite key without ``key=``.
        BackendUnavailable: the database could not be reached or timed out.
    """
    column, name = _key_column(model, key)
    wanted = list(ids)
    unique = list(dict.fromkeys(wanted))
    found: dict[Any, M] = {}
    for chunk in _chunks(unique):
        rows = (await session.scalars(_select(model, column, chunk))).all()
        found.update((getattr(row, name), row) for row in rows)
    return _in_order(wanted, found)
