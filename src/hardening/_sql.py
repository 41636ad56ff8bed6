"""Which SQL errors are outages, decided once for every SQL-backed primitive.

An outage (the database cannot be reached, dropped the connection, timed out, or a busy pool
or store could not serve in time) becomes :class:`~hardening.BackendUnavailable` ``("sql",
…)``, which the adapters answer with 503. Everything else is the caller's to see unchanged: a
serialization failure or deadlock (SQLSTATE class 40, retried by the caller), an integrity,
data or programming error (a bug or a configuration problem, not an outage), and every
:class:`~hardening.HardeningError`.

:func:`unavailable_from` is the decision; :data:`map_outages` (a context manager) and
:func:`sql_unavailable` (a decorator for functions and coroutine functions) apply it.
:func:`lost_race` recognises the two errors that mean "this transaction lost a race and is
worth running again from the start" (serialization failure and deadlock), which the locking
primitives turn into a :class:`~hardening.ConflictError`. Nothing here imports SQLAlchemy: no
SQLAlchemy error can exist before ``sqlalchemy.exc`` is imported.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import inspect
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from hardening.errors import BackendUnavailable, HardeningError

__all__ = [
    "lost_race",
    "map_outages",
    "sql_unavailable",
    "statement_deadline",
    "unavailable_from",
]

P = ParamSpec("P")
R = TypeVar("R")

_BACKEND = "sql"
_MAX_MESSAGE = 200
_SQLITE_ERROR = 1  # SQLITE_ERROR: a bad statement (no such table, syntax error), not an outage
# a raw socket error (asyncpg connects without wrapping them); asyncio's own TimeoutError is
# not an OSError before Python 3.11
_RAW_OUTAGES = (OSError, asyncio.TimeoutError)


def unavailable_from(exc: BaseException) -> BackendUnavailable | None:
    """The :class:`~hardening.BackendUnavailable` an SQL error stands for, if it is an outage.

    Outages: SQLAlchemy's ``OperationalError`` and ``InterfaceError``, its pool ``TimeoutError``
    (every connection stayed checked out for the whole ``pool_timeout``), any ``DBAPIError``
    that invalidated its connection, and a raw ``OSError`` (or asyncio timeout) from a driver
    that does not wrap its connection errors.

    Args:
        exc: the exception raised while running SQL.

    Returns:
        ``BackendUnavailable("sql", "<class>: <first line of the driver's message>")``, not yet
        raised (raise it ``from exc``); ``None`` when ``exc`` is not an outage.
    """
    if not isinstance(exc, Exception) or isinstance(exc, HardeningError):
        return None
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        return _from_sqlalchemy(exc, sa_exc) if _is_outage(exc, sa_exc) else None
    if isinstance(exc, _RAW_OUTAGES):
        return BackendUnavailable(_BACKEND, _describe(exc))
    return None


def _is_outage(exc: Exception, sa_exc: Any) -> bool:
    if isinstance(exc, sa_exc.TimeoutError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    orig = exc.orig
    if _sqlstate(orig).startswith("40"):
        # serialization_failure, deadlock_detected...: the transaction lost a race and is
        # worth retrying, which callers decide; psycopg raises them as OperationalError
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return False
    # SQLite reports a bad statement as an OperationalError too; its other operational errors
    # (cannot open the file, disk I/O, full) are outages, and so is "database is locked"
    # (SQLITE_BUSY): the store stayed busy for its whole busy timeout, like a pool timeout.
    code = getattr(orig, "sqlite_errorcode", None)  # Python 3.11+
    return not (isinstance(code, int) and code & 0xFF == _SQLITE_ERROR)


# serialization_failure (REPEATABLE READ / SERIALIZABLE lost update, or a read/write
# dependency cycle) and deadlock_detected: the server rolled the transaction back, and the
# same work run again from its start may well succeed
_LOST_RACE = frozenset({"40001", "40P01"})


def lost_race(exc: BaseException) -> bool:
    """Whether ``exc`` is a serialization failure or a deadlock (SQLSTATE 40001, 40P01).

    Either means the database rolled the transaction back because a concurrent one won: the
    work is worth running again, from the start of a new transaction (the failed one is
    aborted, so a retry inside it can only fail).

    Args:
        exc: an exception raised while running SQL: SQLAlchemy's ``DBAPIError`` wrapping a
            driver error, or a driver error itself (psycopg, psycopg2, asyncpg).

    Returns:
        ``True`` for those two SQLSTATEs, else ``False``.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        return _sqlstate(exc.orig) in _LOST_RACE
    return _sqlstate(exc) in _LOST_RACE


def _sqlstate(orig: object) -> str:
    """The SQLSTATE of a driver error: psycopg 3 and asyncpg (``sqlstate``), psycopg2."""
    for name in ("sqlstate", "pgcode"):
        value = getattr(orig, name, None)
        if isinstance(value, str):
            return value
    return ""


def _from_sqlalchemy(exc: Exception, sa_exc: Any) -> BackendUnavailable:
    # a DBAPIError's own text carries the SQL and its parameters: describe the driver's error
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else None
    return BackendUnavailable(_BACKEND, _describe(orig if isinstance(orig, Exception) else exc))


def _describe(exc: BaseException) -> str:
    # args[0], where it is the message: SQLAlchemy's str() appends a link to its docs
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > _MAX_MESSAGE:
        first = first[: _MAX_MESSAGE - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _MapOutages:
    """Re-raise an outage leaving the block as ``BackendUnavailable`` (``from`` it)."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            unavailable = unavailable_from(exc)
            if unavailable is not None:
                raise unavailable from exc


map_outages = _MapOutages()
"""``with map_outages: ...``: an outage raised in the block leaves it as ``BackendUnavailable``.

Stateless, so one instance serves every thread and task (async code may use it too: it only
wraps what is raised)."""


def sql_unavailable(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function or coroutine function so its SQL outages raise ``BackendUnavailable``.

    Args:
        func: a plain or ``async def`` function (or method) that runs SQL.

    Returns:
        The same kind of function, with the same signature and docstring.

    Raises:
        TypeError: ``func`` is a generator function: its errors happen after it returns,
            while it is iterated, which a wrapper around the call would not see.
    """
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"sql_unavailable cannot wrap the generator function {func.__name__}")
    if inspect.iscoroutinefunction(func):
        async_func = cast(Callable[P, Awaitable[Any]], func)

        @functools.wraps(func)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with map_outages:
                return await async_func(*args, **kwargs)

        return cast(Callable[P, R], async_wrapper)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with map_outages:
            return func(*args, **kwargs)

    return wrapper


# --- a client-side deadline for every statement ----------------------------------------------


class _Armed:
    __slots__ = ("cancelled", "deadline", "fd")

    def __init__(self, deadline: float, fd: int) -> None:
        self.deadline = deadline
        self.fd = fd
        self.cancelled = False

    def __lt__(self, other: _Armed) -> bool:
        return self.deadline < other.deadline


class _Watchdog:
    """One thread for every armed statement: at its deadline, shut its socket down."""

    def __init__(self) -> None:
        self._heap: list[_Armed] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fd: int) -> _Armed:
        armed = _Armed(time.monotonic() + seconds, fd)
        with self._cond:
            heapq.heappush(self._heap, armed)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="hardening-sql-deadline", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is armed:
                self._cond.notify()
        return armed

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(60)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                left = self._heap[0].deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                due = heapq.heappop(self._heap)
            if not due.cancelled:
                _shut(due.fd)


def _shut(fd: int) -> None:
    """Shut a socket down under its owner: a blocked read returns, the driver fails."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:  # closed meanwhile: the statement ended
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_WATCHDOG = _Watchdog()


def _socket_of(dbapi_connection: Any) -> int | None:
    """The socket a DBAPI connection talks over (psycopg sync or async), or ``None``."""
    for candidate in (dbapi_connection, getattr(dbapi_connection, "_connection", None)):
        fileno = getattr(candidate, "fileno", None)
        if callable(fileno):
            try:
                fd = fileno()
            except Exception:  # closed, or a driver without one (SQLite): no deadline
                return None
            return fd if isinstance(fd, int) and fd >= 0 else None
    return None


def statement_deadline(engine: Any, seconds: float) -> None:
    """Bound every statement ``engine`` runs: past ``seconds``, its connection is cut.

    A database server that goes silent under an open connection (a hung process, a
    partition whose kernel still acknowledges packets) is otherwise waited on for ever:
    libpq's ``connect_timeout`` covers connecting only, TCP keepalives see a live peer, and
    ``statement_timeout`` runs on the silent server itself. With a deadline, the statement's
    socket is shut down when it passes; the driver fails, SQLAlchemy invalidates the
    connection, and the primitives raise :class:`~hardening.BackendUnavailable` (503). One
    watchdog thread serves every statement. Choose a deadline longer than your slowest
    legitimate statement (it cuts those too).

    Args:
        engine: a SQLAlchemy ``Engine`` or ``AsyncEngine`` (psycopg; drivers without a socket,
            such as SQLite, are left unbounded).
        seconds: the longest a statement may take.

    Raises:
        ConfigurationError: ``seconds`` is not positive.
    """
    import sqlalchemy as sa

    from hardening._clock import to_seconds

    limit = to_seconds(seconds, name="seconds", allow_zero=False)
    target = getattr(engine, "sync_engine", engine)

    def before(
        conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any
    ) -> None:
        fd = _socket_of(conn.connection.dbapi_connection)
        if fd is not None and context is not None:
            context._hardening_deadline = _WATCHDOG.arm(limit, fd)

    def after(conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any) -> None:
        _disarm(context)

    def failed(exception_context: Any) -> None:
        _disarm(exception_context.execution_context)

    sa.event.listen(target, "before_cursor_execute", before)
    sa.event.listen(target, "after_cursor_execute", after)
    sa.event.listen(target, "handle_error", failed)


def _disarm(context: Any) -> None:
    armed = getattr(context, "_hardening_deadline", None)
    if armed is not None:
        armed.cancelled = True
