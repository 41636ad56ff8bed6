"""Replica routing: reads to a healthy replica; writes, and what follows them, to the primary.

:class:`RoutedSession` is SQLAlchemy's documented pattern, a ``Session`` whose ``get_bind``
chooses the engine per statement. The choice (which statements are reads, which replicas are
healthy, whose reads must stay on the primary after a write) is :class:`ReplicaRouter`'s, shared
by every session of one factory; the session only keeps what its current transaction did.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hardening._backoff import Backoff
from hardening._clock import SystemClock, to_seconds
from hardening._imports import require
from hardening._sql import unavailable_from
from hardening.errors import ConfigurationError

require("sqlalchemy", extra="sqlalchemy", feature="replica routing")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker  # noqa: E402
from sqlalchemy.sql import visitors  # noqa: E402
from sqlalchemy.sql.dml import UpdateBase  # noqa: E402

if TYPE_CHECKING:
    from hardening._clock import Clock

__all__ = [
    "ReplicaRouter",
    "RoutedSession",
    "async_routed_sessionmaker",
    "async_routed_sessionmaker_from_env",
    "routed_sessionmaker",
    "routed_sessionmaker_from_env",
]

READ = "hardening_read"
"""Execution option marking a ``text()`` statement as a read (``hardening_read=True``)."""
PRIMARY = "hardening_primary"
"""Execution option sending a ``SELECT`` to the primary (it must see the latest writes)."""

_DEFAULT_BACKOFF = Backoff(base=1.0, factor=2.0, cap=30.0, jitter=False)
_LAG_SQL = sa.text(
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0"
    " WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


# --- which statements are reads (pure) ----------------------------------------------------


def is_read(clause: object) -> bool:
    """Whether a statement may run on a replica.

    A ``SELECT`` (or ``UNION`` …) is a read unless it locks rows (``FOR UPDATE``/``SHARE``),
    carries a data-modifying CTE, or is marked with the :data:`PRIMARY` execution option.
    ``text()`` is a write unless marked with :data:`READ`: the router cannot see inside it.
    Everything else (``INSERT``, ``UPDATE``, ``DELETE``, DDL) is a write.
    """
    get_options = getattr(clause, "get_execution_options", None)
    options: Mapping[str, object] = get_options() if get_options is not None else {}
    if options.get(PRIMARY):
        return False
    if isinstance(clause, (sa.Select, sa.CompoundSelect)):
        if getattr(clause, "_for_update_arg", None) is not None:
            return False
        walk = visitors.iterate(clause, {"column_collections": False})
        return not any(isinstance(element, UpdateBase) for element in walk)
    if isinstance(clause, (sa.TextClause, sa.TextualSelect)):
        return bool(options.get(READ))
    return False


# --- replica health and read-your-writes stickiness (no I/O) -------------------------------


@dataclass
class _Health:
    """One replica's standing: down after a connection error, for a doubling backoff."""

    failures: int = 0
    down_until: float = -math.inf
    lag_checked_at: float = -math.inf
    lagging: bool = False

    def usable(self, now: float) -> bool:
        return now >= self.down_until and not self.lagging


class ReplicaRouter:
    """The routing policy shared by every session of one factory; thread-safe.

    Args:
        primary: the engine that takes writes (and reads, when no replica can).
        replicas: read-only engines; empty means every statement goes to the primary.
        sticky_for: after a session commits a write, how long (seconds or ``timedelta``) its
            reads, and those of every session with the same ``sticky_key``, stay on the
            primary, so a user reads their own writes despite replication lag.
        backoff: how long a replica that failed to connect is skipped: seconds (doubled per
            consecutive failure, up to 30 s) or a :class:`Backoff`. When it ends, one read
            probes the replica while the others keep to the next one (or the primary).
        max_lag: on PostgreSQL, skip a replica whose replay lags more than this; ``None``
            checks no lag.
        health_check_interval: how often the lag is measured, per replica.
        clock: the clock whose ``monotonic()`` times stickiness and health.
        max_sticky_keys: the most ``sticky_key`` values remembered at once (oldest dropped).

    Each replica engine's pooled connections are checked before a checkout, as
    ``pool_pre_ping=True`` does (one round trip; skipped when the engine pre-pings already):
    a replica that dropped them (a restart, a network cut) then fails over instead of failing
    the first read of each pooled connection.

    Raises:
        ConfigurationError: bad durations, or ``max_lag`` with a replica that is not PostgreSQL.
    """

    def __init__(
        self,
        primary: sa.Engine,
        replicas: Sequence[sa.Engine] = (),
        *,
        sticky_for: float | timedelta = 5.0,
        backoff: Backoff | float | timedelta = _DEFAULT_BACKOFF,
        max_lag: float | timedelta | None = None,
        health_check_interval: float | timedelta = 10.0,
        clock: Clock | None = None,
        max_sticky_keys: int = 100_000,
    ) -> None:
        if not isinstance(primary, sa.Engine) or not all(
            isinstance(r, sa.Engine) for r in replicas
        ):
            raise ConfigurationError("primary and replicas must be sqlalchemy Engines")
        if type(max_sticky_keys) is not int or max_sticky_keys < 1:
            raise ConfigurationError("max_sticky_keys must be a positive int")
        self.primary = primary
        self.replicas: tuple[sa.Engine, ...] = tuple(replicas)
        self.sticky_for = to_seconds(sticky_for, name="sticky_for")
        self.backoff = (
            backoff
            if isinstance(backoff, Backoff)
            else Backoff(to_seconds(backoff, name="backoff"), 2.0, 30.0, jitter=False)
        )
        self.max_lag = None if max_lag is None else to_seconds(max_lag, name="max_lag")
        self.health_check_interval = to_seconds(health_check_interval, name="health_check_interval")
        if self.max_lag is not None and any(r.dialect.name != "postgresql" for r in replicas):
            raise ConfigurationError("max_lag is measured on PostgreSQL replicas only")
        self.clock = clock or SystemClock()
        self._health = {engine: _Health() for engine in self.replicas}
        self._sticky: OrderedDict[Hashable, float] = OrderedDict()
        self._max_sticky_keys = max_sticky_keys
        self._turn = itertools.count()
        self._lock = threading.Lock()
        for engine in self.replicas:
            sa.event.listen(engine, "handle_error", self._on_error)
            if not getattr(engine.pool, "_pre_ping", False):  # SQLAlchemy's own pre-ping flag
                sa.event.listen(engine, "checkout", _pinger(engine.dialect))

    # stickiness ------------------------------------------------------------------------

    def stick(self, key: Hashable) -> float:
        """Send ``key``'s reads to the primary for ``sticky_for`` seconds from now.

        Called for you when a session with a ``sticky_key`` commits a write; call it yourself
        when a write happened elsewhere (another service, another process).

        Args:
            key: the sticky key (a user id, a client id...).

        Returns:
            The ``clock.monotonic()`` time the stickiness ends.
        """
        now = self.clock.monotonic()
        until = now + self.sticky_for
        with self._lock:
            self._sticky[key] = until
            self._sticky.move_to_end(key)
            # every key shares one sticky_for, so insertion order is expiry order
            sticky = self._sticky
            while sticky and (
                len(sticky) > self._max_sticky_keys or next(iter(sticky.values())) <= now
            ):
                sticky.popitem(last=False)
        return until

    def is_sticky(self, key: Hashable) -> bool:
        """Whether ``key``'s reads must go to the primary now.

        Args:
            key: the sticky key.

        Returns:
            ``True`` within ``sticky_for`` of a write under that key.
        """
        until = self._sticky.get(key)
        return until is not None and self.clock.monotonic() < until

    # health --------------------------------------------------------------------------

    def mark_down(self, replica: sa.Engine) -> None:
        """Skip ``replica`` for the next backoff period (longer after each consecutive failure).

        Args:
            replica: one of the router's replicas (others are ignored).
        """
        health = self._health.get(replica)
        if health is None:
            return
        with self._lock:
            health.failures += 1
            delay = self.backoff.delay(health.failures)
            health.down_until = self.clock.monotonic() + delay

    def mark_up(self, replica: sa.Engine) -> None:
        """Record that ``replica`` answered: its backoff starts over.

        Args:
            replica: one of the router's replicas.
        """
        health = self._health.get(replica)
        if health is not None and health.failures:
            with self._lock:
                health.failures = 0
                health.down_until = -math.inf

    def healthy_replicas(self) -> list[sa.Engine]:
        """The replicas a read may use now, without probing any.

        Returns:
            The replicas neither backing off from a failure nor lagging, in configured order.
        """
        now = self.clock.monotonic()
        return [engine for engine, health in self._health.items() if health.usable(now)]

    def replicas_to_try(self) -> list[sa.Engine]:
        """The usable replicas, starting from the next one in round-robin order.

        Measures the lag of those due a check first (``max_lag``), which is I/O. A replica
        whose backoff has just ended goes to one caller only, as a probe: its backoff is armed
        again until that caller reports it up (:meth:`mark_up`) or down (:meth:`mark_down`),
        so a replica that still cannot answer costs one read a connect timeout per backoff,
        not every read that arrives meanwhile.

        Returns:
            The replicas to try, in order; empty when none is usable.
        """
        if not self.replicas:
            return []
        if self.max_lag is not None:
            self._check_lag()
        now = self.clock.monotonic()
        with self._lock:
            usable = []
            for engine, health in self._health.items():
                if not health.usable(now):
                    continue
                if health.failures:  # recovering: this caller probes it, the others skip it
                    health.down_until = now + self.backoff.delay(health.failures)
                usable.append(engine)
        if not usable:
            return []
        start = next(self._turn) % len(usable)
        return usable[start:] + usable[:start]

    def _check_lag(self) -> None:
        now = self.clock.monotonic()
        for engine, health in self._health.items():
            if now < health.down_until or now - health.lag_checked_at < self.health_check_interval:
                continue
            with self._lock:  # one thread measures; the others use the last verdict
                if now - health.lag_checked_at < self.health_check_interval:
                    continue
                health.lag_checked_at = now
            try:
                with engine.connect() as conn:
                    lag = float(conn.execute(_LAG_SQL).scalar_one())
            except Exception as exc:
                # down for the same outages every SQL primitive answers 503 for; others are bugs
                if unavailable_from(exc) is None:
                    raise
                self.mark_down(engine)
                continue
            health.lagging = self.max_lag is not None and lag > self.max_lag

    def _on_error(self, context: sa.engine.ExceptionContext) -> None:
        if context.is_disconnect and context.engine is not None:
            self.mark_down(context.engine)

    def __repr__(self) -> str:
        return f"ReplicaRouter(primary={self.primary!r}, replicas={list(self.replicas)!r})"


def _pinger(dialect: sa.Dialect) -> Callable[[Any, Any, Any], None]:
    """A pool ``checkout`` listener that pings a pooled connection, as ``pool_pre_ping`` does.

    A dead connection raises ``InvalidatePoolError``: SQLAlchemy discards every connection
    pooled before it and connects anew, so a replica that is back serves the read, and one that
    is still gone fails to connect, which the session answers by failing over.
    """

    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            raise sa.exc.InvalidatePoolError(str(exc)) from exc

    return ping


# --- the session -------------------------------------------------------------------------


class RoutedSession(Session):
    """A ``Session`` that sends each statement to the primary or to a replica.

    To the primary: writes (``INSERT``/``UPDATE``/``DELETE``, DDL, unmarked ``text()``),
    flushes, ``SELECT … FOR UPDATE``, selects marked with :data:`PRIMARY`, ``connection()``
    without arguments, and everything after any of these in the same transaction; reads within
    ``sticky_for`` of a committed write (by this session, or under the same ``sticky_key``).
    Other reads go to one healthy replica, the same for the whole transaction; a replica that
    cannot be connected to (refused, timed out, its pool exhausted, a pooled connection that
    fails its ping: the outages every SQL primitive answers 503 for) is marked down and the
    next one (finally the primary) is used.

    Args:
        bind: the primary (set by the factory).
        router: the shared :class:`ReplicaRouter` (set by the factory); without one, every
            statement goes to ``bind``.
        sticky_key: whose writes this session's reads must see (a user or client id);
            ``None`` keeps the stickiness on this session alone.
        primary_only: send everything to the primary (a read-modify-write that must not
            read stale rows).
        **kw: the usual ``Session`` options.

    Raises:
        ConfigurationError: neither ``router`` nor an ``Engine`` ``bind``.
    """

    def __init__(
        self,
        bind: Any = None,
        *,
        router: ReplicaRouter | None = None,
        sticky_key: Hashable | None = None,
        primary_only: bool = False,
        **kw: Any,
    ) -> None:
        if router is None:
            if not isinstance(bind, sa.Engine):
                raise ConfigurationError("RoutedSession needs router= or an Engine bind")
            router = ReplicaRouter(bind)
        super().__init__(bind=bind if bind is not None else router.primary, **kw)
        self.router = router
        self.sticky_key = sticky_key
        self.primary_only = primary_only
        self._on_primary = False  # this transaction used the primary: its reads stay there
        self._wrote = False  # this transaction wrote: stick to the primary after commit
        self._replica: sa.Engine | None = None
        self._sticky_until = -math.inf

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: Any = None,
        bind: sa.Engine | sa.Connection | None = None,
        **kw: Any,
    ) -> sa.Engine | sa.Connection:
        """The engine for one statement (see the class docstring for the rules)."""
        if bind is not None:
            return bind
        router = self.router
        if self.primary_only or not router.replicas:
            return router.primary
        if self._flushing or (clause is not None and not is_read(clause)):
            self._on_primary = self._wrote = True
            return router.primary
        if clause is None:  # introspection (dialect, tables); connection() pins on its own
            return router.primary
        if self._on_primary:
            return router.primary
        if self._replica is not None:
            return self._replica
        if self._sticky():
            self._on_primary = True
            return router.primary
        return self._open_replica()

    def connection(
        self,
        bind_arguments: Any = None,
        execution_options: Any = None,
    ) -> sa.Connection:
        """The transaction's connection; without arguments, the primary's (treated as a write)."""
        if not bind_arguments or not {"bind", "clause", "mapper"} & set(bind_arguments):
            self._on_primary = self._wrote = True
        return super().connection(bind_arguments, execution_options)

    def _sticky(self) -> bool:
        if self.router.clock.monotonic() < self._sticky_until:
            return True
        return self.sticky_key is not None and self.router.is_sticky(self.sticky_key)

    def _open_replica(self) -> sa.Engine:
        """Connect this transaction to a usable replica now, skipping any that fails."""
        router = self.router
        for engine in router.replicas_to_try():
            try:
                super().connection(bind_arguments={"bind": engine})
            except Exception as exc:
                if unavailable_from(exc) is None:
                    raise
                router.mark_down(engine)
                continue
            router.mark_up(engine)
            self._replica = engine
            return engine
        self._on_primary = True
        return router.primary

    def _committed(self) -> None:
        if self._wrote:
            router = self.router
            self._sticky_until = router.clock.monotonic() + router.sticky_for
            if self.sticky_key is not None:
                router.stick(self.sticky_key)

    def _ended(self) -> None:
        self._on_primary = self._wrote = False
        self._replica = None


@sa.event.listens_for(RoutedSession, "after_commit")
def _after_commit(session: Session) -> None:
    if isinstance(session, RoutedSession):
        session._committed()


@sa.event.listens_for(RoutedSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if isinstance(session, RoutedSession) and transaction.parent is None:
        session._ended()


# --- factories ---------------------------------------------------------------------------


def routed_sessionmaker(
    primary: sa.Engine,
    replicas: Sequence[sa.Engine] = (),
    *,
    sticky_for: float | timedelta = 5.0,
    backoff: Backoff | float | timedelta = _DEFAULT_BACKOFF,
    max_lag: float | timedelta | None = None,
    health_check_interval: float | timedelta = 10.0,
    clock: Clock | None = None,
    class_: type[RoutedSession] = RoutedSession,
    **options: Any,
) -> sessionmaker[RoutedSession]:
    """A ``sessionmaker`` whose sessions read from replicas and write to the primary.

    Call it like any ``sessionmaker``, with ``sticky_key=`` (e.g. the user id) when a user's
    reads must see their own writes from other sessions: ``Session(sticky_key=user_id)``.

    Args:
        primary: the engine that takes writes.
        replicas: read-only engines; none means every statement goes to the primary.
        sticky_for: how long reads stay on the primary after a committed write.
        backoff: how long a replica that failed to connect is skipped.
        max_lag: on PostgreSQL, skip replicas lagging more than this (``None``: no check).
        health_check_interval: how often each replica's lag is measured.
        clock: the clock timing stickiness and health (a :class:`~hardening.FakeClock` in
            tests).
        class_: a :class:`RoutedSession` subclass.
        **options: other ``sessionmaker`` options (``expire_on_commit``...).

    Returns:
        The session factory; its sessions share one :class:`ReplicaRouter` (``.router``).

    Raises:
        ConfigurationError: bad options.
    """
    router = ReplicaRouter(
        primary,
        replicas,
        sticky_for=sticky_for,
        backoff=backoff,
        max_lag=max_lag,
        health_check_interval=health_check_interval,
        clock=clock,
    )
    return sessionmaker(bind=primary, class_=class_, router=router, **options)


def async_routed_sessionmaker(
    primary: AsyncEngine,
    replicas: Sequence[AsyncEngine] = (),
    *,
    sticky_for: float | timedelta = 5.0,
    backoff: Backoff | float | timedelta = _DEFAULT_BACKOFF,
    max_lag: float | timedelta | None = None,
    health_check_interval: float | timedelta = 10.0,
    clock: Clock | None = None,
    sync_session_class: type[RoutedSession] = RoutedSession,
    **options: Any,
) -> async_sessionmaker[AsyncSession]:
    """The asyncio twin of :func:`routed_sessionmaker`, for ``AsyncEngine``.

    Its ``AsyncSession`` runs a :class:`RoutedSession` inside (``session.sync_session``), so
    the rules and the router are the same.

    Args:
        primary: the engine that takes writes.
        replicas: read-only engines.
        sticky_for: how long reads stay on the primary after a committed write.
        backoff: how long a replica that failed to connect is skipped.
        max_lag: on PostgreSQL, skip replicas lagging more than this.
        health_check_interval: how often each replica's lag is measured.
        clock: the clock timing stickiness and health.
        sync_session_class: a :class:`RoutedSession` subclass.
        **options: other ``async_sessionmaker`` options.

    Returns:
        The ``async_sessionmaker``.

    Raises:
        ConfigurationError: bad options.
    """
    router = ReplicaRouter(
        primary.sync_engine,
        [replica.sync_engine for replica in replicas],
        sticky_for=sticky_for,
        backoff=backoff,
        max_lag=max_lag,
        health_check_interval=health_check_interval,
        clock=clock,
    )
    return async_sessionmaker(
        bind=primary, sync_session_class=sync_session_class, router=router, **options
    )


def _urls(environ: Mapping[str, str] | None) -> tuple[str, list[str]]:
    env = os.environ if environ is None else environ
    primary = env.get("DATABASE_URL", "").strip()
    if not primary:
        raise ConfigurationError("DATABASE_URL is not set")
    replica = env.get("DATABASE_READ_REPLICA_URL", "").strip()
    return primary, [replica] if replica else []


def routed_sessionmaker_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> sessionmaker[RoutedSession]:
    """A :func:`routed_sessionmaker` on ``DATABASE_URL`` and, if set, ``DATABASE_READ_REPLICA_URL``.

    Without a replica URL every statement goes to the primary, so the same code runs in
    development (one database) and production (a primary and a replica).

    Args:
        environ: where to read the variables (default: ``os.environ``).
        engine_options: ``create_engine`` options for both engines (default:
            ``{"pool_pre_ping": True}``).
        **options: :func:`routed_sessionmaker` options.

    Returns:
        The session factory.

    Raises:
        ConfigurationError: ``DATABASE_URL`` is missing.
    """
    primary, replicas = _urls(environ)
    engine_kw = dict(engine_options if engine_options is not None else {"pool_pre_ping": True})
    return routed_sessionmaker(
        sa.create_engine(primary, **engine_kw),
        [sa.create_engine(url, **engine_kw) for url in replicas],
        **options,
    )


def async_routed_sessionmaker_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> async_sessionmaker[AsyncSession]:
    """The asyncio twin of :func:`routed_sessionmaker_from_env` (URLs with an async driver).

    Args:
        environ: where to read the variables (default: ``os.environ``).
        engine_options: ``create_async_engine`` options for both engines (default:
            ``{"pool_pre_ping": True}``).
        **options: :func:`async_routed_sessionmaker` options.

    Returns:
        The ``async_sessionmaker``.

    Raises:
        ConfigurationError: ``DATABASE_URL`` is missing.
    """
    primary, replicas = _urls(environ)
    engine_kw = dict(engine_options if engine_options is not None else {"pool_pre_ping": True})
    return async_routed_sessionmaker(
        create_async_engine(primary, **engine_kw),
        [create_async_engine(url, **engine_kw) for url in replicas],
        **options,
    )
