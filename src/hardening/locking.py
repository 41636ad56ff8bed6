"""Optimistic locking for SQLAlchemy: versioned rows, one-statement saves, retries, ETag/If-Match.

A save names the version it was based on; the database applies it only if that is still the
current version, in the same statement that bumps it, so two concurrent saves can never both
win and a lost update becomes a :class:`~hardening.ConflictError` instead of silent data loss.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from hardening._backoff import Backoff
from hardening._conditional import check_if_match, check_if_none_match, etag_for, if_match_version
from hardening._imports import require
from hardening._sql import lost_race, sql_unavailable
from hardening.errors import ConfigurationError, ConflictError, NotFoundError

require("sqlalchemy", extra="sqlalchemy", feature="optimistic locking")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    Mapped,
    Session,
    attributes,
    declared_attr,
    mapped_column,
)
from sqlalchemy.orm.exc import StaleDataError  # noqa: E402

if TYPE_CHECKING:
    from hardening.metrics import Metrics

__all__ = [
    "ConflictEvents",
    "Versioned",
    "VersionedSession",
    "check_if_match",
    "check_if_none_match",
    "conflict_events",
    "etag_for",
    "if_match_version",
    "on_conflict",
    "retry_on_conflict",
    "update_versioned",
    "update_versioned_async",
]

logger = logging.getLogger("hardening.locking")
P = ParamSpec("P")
R = TypeVar("R")

# --- the version column ------------------------------------------------------------------


class Versioned:
    """Declarative mixin: a non-null integer ``version`` column, starting at 1.

    It is also the mapper's ``version_id_col``, so ORM flushes of changed rows are checked too:
    an ``UPDATE`` that finds another version raises (use :class:`VersionedSession` to get a
    :class:`~hardening.ConflictError` rather than SQLAlchemy's ``StaleDataError``).

    Example::

        class Page(Versioned, Base):
            __tablename__ = "pages"
            id: Mapped[int] = mapped_column(primary_key=True)
    """

    version: Mapped[int] = mapped_column(
        sa.Integer, nullable=False, default=1, server_default=sa.text("1")
    )

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        return {"version_id_col": cls.__table__.c.version}  # type: ignore[attr-defined]


# --- conflict events ---------------------------------------------------------------------

ConflictListener = Callable[[ConflictError], object]


class ConflictEvents:
    """Listeners told about every conflict (e.g. to broadcast it to collaborators).

    A listener that raises is logged and skipped: it never hides the conflict from the caller.
    """

    def __init__(self) -> None:
        self._listeners: list[ConflictListener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: ConflictListener) -> Callable[[], None]:
        """Register ``listener``; return a function that unregisters it.

        Args:
            listener: called with the :class:`~hardening.ConflictError` (entity, key, expected
                and current versions).

        Returns:
            The unsubscribe function.
        """
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def emit(self, error: ConflictError) -> None:
        """Call every listener with ``error``."""
        for listener in list(self._listeners):
            try:
                listener(error)
            except Exception:
                logger.exception("conflict listener %r failed", listener)


conflict_events = ConflictEvents()
"""The default listeners, used unless a call passes its own ``events=``."""


def on_conflict(listener: ConflictListener) -> Callable[[], None]:
    """Subscribe ``listener`` to the default :data:`conflict_events`; return the unsubscriber."""
    return conflict_events.subscribe(listener)


def _report(
    error: ConflictError, metrics: Metrics | None, events: ConflictEvents | None
) -> ConflictError:
    if metrics is not None:
        metrics.lock_conflict(error.entity)
    (events or conflict_events).emit(error)
    return error


# --- one-statement saves -----------------------------------------------------------------

Executor = Session | sa.Connection


class _Model:
    """What a versioned update needs to know of a mapped class, worked out once per class."""

    def __init__(self, model: type[Any]) -> None:
        mapper = sa.inspect(model, raiseerr=False)
        if mapper is None or not hasattr(mapper, "version_id_col"):
            raise ConfigurationError(f"{model!r} is not a mapped class")
        if mapper.version_id_col is None:
            raise ConfigurationError(f"{model.__name__} has no version column: mix in Versioned")
        self.model = model
        self.entity = model.__name__
        self.table = mapper.local_table
        self.version_col = mapper.version_id_col
        self.version_key = mapper.get_property_by_column(self.version_col).key
        self.pk_cols = list(mapper.primary_key)
        self.pk_keys = {mapper.get_property_by_column(c).key for c in self.pk_cols}
        self.columns = {prop.key: prop.columns[0] for prop in mapper.column_attrs}
        self.where = sa.and_(
            *(col == sa.bindparam(f"_pk{i}", type_=col.type) for i, col in enumerate(self.pk_cols))
        )
        self.current = sa.select(self.version_col).where(self.where)

    @functools.cache  # noqa: B019 - one entry per (model, set of columns), models live forever
    def update(self, names: tuple[str, ...], returning: bool) -> sa.Update:
        """The UPDATE for these attribute names, with bind parameters; built once."""
        for name in names:
            if name not in self.columns:
                raise ConfigurationError(f"{self.entity} has no column attribute {name!r}")
            if name == self.version_key:
                raise ConfigurationError("the version is bumped by update_versioned, not set")
            if name in self.pk_keys:
                raise ConfigurationError(f"{name!r} is the primary key; it cannot be updated")
        values: dict[Any, Any] = {
            self.columns[name]: sa.bindparam(f"_v_{name}", type_=self.columns[name].type)
            for name in names
        }
        values[self.version_col] = self.version_col + 1
        stmt = (
            sa.update(self.table)
            .where(self.where, self.version_col == sa.bindparam("_expected"))
            .values(values)
        )
        return stmt.returning(self.version_col) if returning else stmt


@functools.cache
def _model(model: Hashable) -> _Model:
    return _Model(cast(type[Any], model))


class _Plan:
    """One versioned update: the cached statements plus this call's parameters."""

    def __init__(self, model: type[Any], pk: object, expected: int, values: Mapping[str, object]):
        if isinstance(expected, bool) or not isinstance(expected, int):
            raise ConfigurationError(f"expected_version must be an int, not {expected!r}")
        info = _model(cast(Hashable, model))
        pk_values = pk if isinstance(pk, tuple) else (pk,)
        if len(pk_values) != len(info.pk_cols):
            raise ConfigurationError(f"{info.entity} has a {len(info.pk_cols)}-column primary key")
        self.info = info
        self.entity = info.entity
        self.pk = pk
        self.expected = expected
        self.values = dict(values)
        self.names = tuple(sorted(self.values))
        self.key_params = {f"_pk{i}": value for i, value in enumerate(pk_values)}
        self.params = {
            **self.key_params,
            "_expected": expected,
            **{f"_v_{name}": value for name, value in self.values.items()},
        }

    def update(self, returning: bool) -> sa.Update:
        return self.info.update(self.names, returning)

    def current(self) -> sa.Select[Any]:
        return self.info.current

    def failure(
        self, current: int | None, metrics: Metrics | None, events: ConflictEvents | None
    ) -> ConflictError | NotFoundError:
        """The error for an update that matched no row; conflicts are reported first."""
        if current is None:
            return NotFoundError(self.entity, self.pk)
        conflict = ConflictError(
            self.entity, self.pk, expected_version=self.expected, current_version=current
        )
        return _report(conflict, metrics, events)

    def lost(self, metrics: Metrics | None, events: ConflictEvents | None) -> ConflictError:
        """The error for an update whose transaction lost a race (serialization, deadlock).

        The transaction is aborted, so the current version cannot be read in it.
        """
        conflict = ConflictError(
            self.entity, self.pk, expected_version=self.expected, current_version=None
        )
        return _report(conflict, metrics, events)

    def synchronise(self, executor: object, new_version: int) -> None:
        """Keep a loaded ORM instance in step with the row, without another query."""
        session = executor.sync_session if hasattr(executor, "sync_session") else executor
        if not isinstance(session, Session) or not session.identity_map:
            return
        key = session.identity_key(self.info.model, self.pk)
        instance = session.identity_map.get(key)
        if instance is None:
            return
        for name, value in {**self.values, self.info.version_key: new_version}.items():
            attributes.set_committed_value(instance, name, value)


def _returning(executor: Any) -> bool:
    """Whether the executor's database can ``UPDATE … RETURNING`` (sessions lack .dialect)."""
    dialect = getattr(executor, "dialect", None) or executor.get_bind().dialect
    return bool(dialect.update_returning)


@sql_unavailable
def update_versioned(
    session: Session | sa.Connection,
    model: type[Any],
    pk: object,
    expected_version: int,
    values: Mapping[str, object],
    *,
    metrics: Metrics | None = None,
    events: ConflictEvents | None = None,
) -> int:
    """Update one row if, and only if, it is still at ``expected_version``; bump the version.

    One statement, ``UPDATE … SET …, version = version + 1 WHERE pk = :pk AND version =
    :expected RETURNING version`` (on a database without ``UPDATE … RETURNING`` the row count
    tells instead, still one round trip). It runs in the caller's transaction and does not
    commit. A loaded ORM instance of the row is updated in memory, so a later flush agrees.

    Args:
        session: a ``Session`` or ``Connection``.
        model: the mapped class (it must mix in :class:`Versioned` or set ``version_id_col``).
        pk: the primary key (a tuple for composite keys).
        expected_version: the version the change was based on.
        values: attribute name to new value.
        metrics: a registry to count conflicts into (``hardening_lock_conflicts_total``).
        events: the listeners to tell about a conflict (default: :data:`conflict_events`).

    Returns:
        The new version (``expected_version + 1``).

    Raises:
        ConflictError: the row is at another version (both versions attached); or, under
            ``REPEATABLE READ``/``SERIALIZABLE``, the database refused the update as a
            serialization failure or a deadlock (SQLSTATE 40001/40P01; ``current_version`` is
            ``None``, the driver's error is its ``__cause__``): the transaction is aborted, roll
            it back and run it again (:func:`retry_on_conflict` does).
        NotFoundError: the row does not exist.
        ConfigurationError: the model, key or values are not usable.
        BackendUnavailable: the database could not be reached or timed out (the caller's
            transaction is then the caller's to roll back).
    """
    plan = _Plan(model, pk, expected_version, values)
    try:
        if _returning(session):
            new = session.execute(plan.update(True), plan.params).scalar_one_or_none()
        else:
            result = cast(sa.CursorResult[Any], session.execute(plan.update(False), plan.params))
            new = expected_version + 1 if result.rowcount == 1 else None
        if new is None:
            current = session.execute(plan.current(), plan.key_params).scalar_one_or_none()
            raise plan.failure(current, metrics, events)
    except sa.exc.DBAPIError as exc:
        if not lost_race(exc):
            raise
        raise plan.lost(metrics, events) from exc
    plan.synchronise(session, new)
    return int(new)


@sql_unavailable
async def update_versioned_async(
    session: Any,
    model: type[Any],
    pk: object,
    expected_version: int,
    values: Mapping[str, object],
    *,
    metrics: Metrics | None = None,
    events: ConflictEvents | None = None,
) -> int:
    """The asyncio twin of :func:`update_versioned`, for ``AsyncSession`` / ``AsyncConnection``.

    Args:
        session: an ``AsyncSession`` or ``AsyncConnection``.
        model: the mapped class.
        pk: the primary key.
        expected_version: the version the change was based on.
        values: attribute name to new value.
        metrics: a registry to count conflicts into.
        events: the listeners to tell about a conflict.

    Returns:
        The new version.

    Raises:
        ConflictError: the row is at another version, or the transaction lost a race
            (serialization failure or deadlock; see :func:`update_versioned`).
        NotFoundError: the row does not exist.
        ConfigurationError: the model, key or values are not usable.
        BackendUnavailable: the database could not be reached or timed out (the caller's
            transaction is then the caller's to roll back).
    """
    plan = _Plan(model, pk, expected_version, values)
    try:
        if _returning(session):
            new = (await session.execute(plan.update(True), plan.params)).scalar_one_or_none()
        else:
            result = await session.execute(plan.update(False), plan.params)
            new = expected_version + 1 if result.rowcount == 1 else None
        if new is None:
            current = (await session.execute(plan.current(), plan.key_params)).scalar_one_or_none()
            raise plan.failure(current, metrics, events)
    except sa.exc.DBAPIError as exc:
        if not lost_race(exc):
            raise
        raise plan.lost(metrics, events) from exc
    plan.synchronise(session, new)
    return int(new)


class VersionedSession(Session):
    """A ``Session`` whose stale versioned flushes raise :class:`~hardening.ConflictError`.

    SQLAlchemy raises ``StaleDataError`` when a flush of a versioned row updates nothing;
    this session raises our ``ConflictError`` (``from`` the original) naming the entity, its
    key, the version the session held and the row's current version (one primary-key
    ``SELECT`` on the session's connection, on the failure path only; ``None`` if the row is
    gone). Under ``REPEATABLE READ``/``SERIALIZABLE`` the database refuses such a flush itself
    (a serialization failure, or a deadlock): that is a ``ConflictError`` too, with
    ``current_version=None`` (the transaction is aborted). Use it as ``sessionmaker(engine,
    class_=VersionedSession)``, or ``async_sessionmaker(engine,
    sync_session_class=VersionedSession)`` for asyncio.
    """

    def flush(self, objects: Any = None) -> None:
        """Flush, turning a stale versioned update (or a lost race) into a ``ConflictError``."""
        held = [h for h in map(_held_version, [*self.dirty, *self.deleted]) if h is not None]
        # the connection the flush will use, taken now: after a failed flush the session
        # refuses to hand it out until rolled back, and a second one could wait for the pool
        connection = self.connection(bind_arguments={"mapper": held[0].mapper}) if held else None
        try:
            super().flush(objects)
        except StaleDataError as exc:
            raise _stale_to_conflict(exc, held, connection) from exc
        except sa.exc.DBAPIError as exc:
            if not lost_race(exc):
                raise
            table = _table_of(exc.statement or "")
            candidates = _candidates(held, table)
            only = candidates[0] if len(candidates) == 1 else None
            raise _report(_conflict(only, None, table), None, None) from exc


class _Held:
    """A versioned instance as the session holds it before a flush, read without I/O."""

    __slots__ = ("entity", "identity", "key", "mapper", "table", "version")

    def __init__(self, mapper: Any, identity: tuple[Any, ...], version: int | None) -> None:
        self.mapper = mapper
        self.entity: str = mapper.class_.__name__
        self.table: str = mapper.version_id_col.table.name
        self.identity = identity
        self.key = identity[0] if len(identity) == 1 else identity
        self.version = version


def _held_version(obj: object) -> _Held | None:
    state = sa.inspect(obj)
    mapper = state.mapper
    if mapper.version_id_col is None or not state.identity:  # new rows are not checked
        return None
    version_key = mapper.get_property_by_column(mapper.version_id_col).key
    return _Held(mapper, state.identity, state.dict.get(version_key))


_STALE_TABLE = re.compile(r"on table '([^']+)'")  # SQLAlchemy's StaleDataError message
_STATEMENT_TABLE = re.compile(r'\s*(?:UPDATE|DELETE\s+FROM)\s+"?([\w.$]+)', re.IGNORECASE)
_MAX_LOOKUPS = 10  # rows read to find the stale one among several in one flush


def _table_of(text: str) -> str | None:
    """The table a StaleDataError message, or a failed UPDATE/DELETE statement, is about."""
    found = _STALE_TABLE.search(text) or _STATEMENT_TABLE.match(text)
    return found.group(1).rsplit(".", 1)[-1] if found else None


def _candidates(held: list[_Held], table: str | None) -> list[_Held]:
    """The held instances the failing statement could be about (its table's, if known)."""
    matching = [h for h in held if h.table == table]
    return matching or (held if table is None else [])


def _conflict(held: _Held | None, current: int | None, table: str | None) -> ConflictError:
    if held is None:
        return ConflictError(table or "row", None, expected_version=None, current_version=None)
    return ConflictError(
        held.entity, held.key, expected_version=held.version, current_version=current
    )


def _stale_to_conflict(
    exc: StaleDataError, held: list[_Held], connection: sa.Connection | None
) -> ConflictError:
    """The conflict a stale flush stands for, with the row's current version read back."""
    table = _table_of(str(exc))
    candidates = _candidates(held, table)
    stale: _Held | None = candidates[0] if len(candidates) == 1 else None
    current = None
    if connection is not None and candidates:
        found = _current_versions(connection, candidates[:_MAX_LOOKUPS])
        if stale is None:  # several rows of that table: the stale one is the one that moved
            moved = (h for h in candidates if id(h) in found and found[id(h)] != h.version)
            stale = next(moved, None)
        current = found.get(id(stale)) if stale is not None else None
    return _report(_conflict(stale, current, table), None, None)


def _current_versions(connection: sa.Connection, held: list[_Held]) -> dict[int, int | None]:
    """Each held row's version now (``None``: gone), read on the flush's own connection.

    The failed flush rolled its transaction back (unless it was a savepoint's): the reads
    then run in a transaction of their own, rolled back at once, leaving the connection as
    the flush left it. A failing read leaves the versions unknown; the conflict is raised
    either way.
    """
    began = not connection.in_transaction()
    versions: dict[int, int | None] = {}
    try:
        for row in held:
            mapper = row.mapper
            query = sa.select(mapper.version_id_col).where(
                *(col == value for col, value in zip(mapper.primary_key, row.identity, strict=True))
            )
            versions[id(row)] = connection.execute(query).scalar_one_or_none()
    except sa.exc.SQLAlchemyError:
        logger.debug("could not read the current version after a stale flush", exc_info=True)
    finally:
        if began and connection.in_transaction():
            connection.rollback()
    return versions


# --- retries -----------------------------------------------------------------------------

_CONFLICT_BACKOFF = Backoff(base=0.01, cap=0.5)


def _lost(exc: Exception) -> bool:
    """Whether ``exc`` means the function lost a race (and is worth calling again)."""
    return isinstance(exc, ConflictError) or lost_race(exc)


def _race_conflict(exc: Exception) -> ConflictError | None:
    """The ``ConflictError`` a raw serialization failure or deadlock stands for, else None."""
    if isinstance(exc, ConflictError) or not lost_race(exc):
        return None
    return ConflictError("transaction", None, expected_version=None, current_version=None)


def retry_on_conflict(
    attempts: int = 3,
    backoff: Backoff | float | timedelta = _CONFLICT_BACKOFF,
    *,
    sleep: Callable[[float], object] | None = None,
    async_sleep: Callable[[float], Awaitable[object]] | None = None,
    rng: random.Random | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a read-modify-write function when it loses a race.

    The decorated function must re-read what it changes on each call (it is simply called
    again, so it should open its own transaction); between attempts it waits an exponential
    backoff with full jitter. A race lost is a :class:`~hardening.ConflictError`, or a
    database's serialization failure or deadlock (SQLSTATE 40001/40P01, raised by any
    statement or by the commit under ``REPEATABLE READ``/``SERIALIZABLE``). When attempts run
    out, the last ``ConflictError`` is raised; a last serialization failure or deadlock is
    raised as a ``ConflictError`` (entity ``"transaction"``) from the driver's error.

    Args:
        attempts: total calls, at least 1.
        backoff: a :class:`Backoff`, or the first wait's ceiling in seconds.
        sleep: how to wait in sync functions (default :func:`time.sleep`).
        async_sleep: how to wait in async functions (default :func:`asyncio.sleep`).
        rng: the random source for jitter.

    Returns:
        The decorator, for sync and async functions alike.

    Raises:
        ConfigurationError: ``attempts`` is below 1.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(f"attempts must be a positive integer, not {attempts!r}")
    policy = Backoff.of(backoff)
    do_sleep = sleep or time.sleep
    do_async_sleep = async_sleep or asyncio.sleep

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(func):
            afunc = cast(Callable[P, Awaitable[Any]], func)

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                for attempt in range(1, attempts):
                    try:
                        return await afunc(*args, **kwargs)
                    except Exception as exc:
                        if not _lost(exc):
                            raise
                        await do_async_sleep(policy.delay(attempt, rng))
                try:
                    return await afunc(*args, **kwargs)
                except Exception as exc:  # the last attempt's conflict propagates
                    conflict = _race_conflict(exc)
                    if conflict is None:
                        raise
                    raise conflict from exc

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for attempt in range(1, attempts):
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    if not _lost(exc):
                        raise
                    do_sleep(policy.delay(attempt, rng))
            try:
                return func(*args, **kwargs)
            except Exception as exc:  # the last attempt's conflict propagates
                conflict = _race_conflict(exc)
                if conflict is None:
                    raise
                raise conflict from exc

        return wrapper

    return decorate
