"""Batched inserts: many rows per round trip, ``COPY`` on PostgreSQL, bad rows set aside.

Rows are checked against the table before they are sent (unknown columns, missing required
values, ``NULL`` in ``NOT NULL``, values of the wrong type, strings over their length), then
written a batch at a time: ``COPY … FROM STDIN`` on PostgreSQL with psycopg 3, else one
``executemany`` (psycopg 3's pipeline, SQLAlchemy's multi-row ``insertmanyvalues`` for other
drivers), optionally ``INSERT … ON CONFLICT``. A batch the database refuses (a duplicate key, a
foreign key...) is split in halves, each inside a ``SAVEPOINT``, until the bad rows are isolated
and reported; the good ones land.

``_Validator`` and ``_Statements`` are the policy (no I/O); ``_Writer`` does the I/O through a
synchronous ``Connection``, and :func:`insert_batches_async` runs that same writer inside
``run_sync`` (SQLAlchemy's bridge to async drivers), so both share every line but ``COPY``'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from hardening._imports import require
from hardening._sql import map_outages, sql_unavailable
from hardening.errors import ConfigurationError, RowRejected

require("sqlalchemy", extra="sqlalchemy", feature="batched inserts")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from sqlalchemy.util import await_only  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

__all__ = ["InsertMethod", "InsertReport", "RejectedRow", "insert_batches", "insert_batches_async"]

InsertMethod = Literal["auto", "executemany", "copy"]
"""How rows are sent: ``"copy"`` (PostgreSQL + psycopg 3, no upsert), ``"executemany"``, or
``"auto"`` (``COPY`` where it can, else ``executemany``)."""
Upsert = Literal["ignore", "update"] | Sequence[str] | None
Transaction = Literal["per_batch", "single"]
ProgressCallback = Callable[[int, "int | None"], object]

_ISOLATABLE = (sa.exc.IntegrityError, sa.exc.DataError)


@dataclass(frozen=True)
class RejectedRow:
    """A row that was not inserted, and why.

    Attributes:
        index: its position in the input, from 0.
        row: the row as given.
        reason: what the validator or the database said.
    """

    index: int
    row: object
    reason: str


@dataclass(frozen=True)
class InsertReport:
    """What :func:`insert_batches` did.

    Attributes:
        inserted: rows written (with ``upsert="update"`` or a column list, rows that updated
            an existing row count too).
        skipped: rows left out by ``upsert="ignore"`` because they conflicted.
        rejected: the rows refused by the validator or the database, in input order.
        batches: how many batches were sent.
        seconds: the wall time taken.
        method: ``"copy"``, ``"executemany"``, or ``"copy+executemany"`` when some rows could not
            be copied (columns with Python-side defaults left out, or a batch that needed its bad
            rows isolated).
    """

    inserted: int
    skipped: int
    rejected: tuple[RejectedRow, ...]
    batches: int
    seconds: float
    method: str


# --- validation (pure) -------------------------------------------------------------------


def _type_check(column: sa.Column[Any]) -> Callable[[object], str | None] | None:
    """A function saying what is wrong with a value for this column, or ``None`` when fine."""
    col_type = column.type
    if isinstance(col_type, (sa.JSON, sa.ARRAY)):
        return None  # serialised by the driver; the database has the last word
    if isinstance(col_type, sa.Enum):
        allowed = set(col_type.enums)
        enum_class = col_type.enum_class

        def enum_check(value: object) -> str | None:
            if enum_class is not None and isinstance(value, enum_class):
                return None
            return None if value in allowed else f"{value!r} is not one of {sorted(allowed)}"

        return enum_check
    try:
        python_type = col_type.python_type
    except NotImplementedError:
        return None
    accepted: tuple[type, ...] = (python_type,)
    refused: tuple[type, ...] = ()
    if python_type is int:
        refused = (bool,)
    elif python_type in (float, Decimal):
        accepted, refused = (int, float, Decimal), (bool,)
    elif python_type is bytes:
        accepted = (bytes, bytearray, memoryview)
    elif python_type is dt.date:
        refused = (dt.datetime,)
    elif python_type is uuid.UUID:
        accepted = (uuid.UUID,)
    length = getattr(col_type, "length", None) if python_type is str else None
    name = python_type.__name__

    def check(value: object) -> str | None:
        if not isinstance(value, accepted) or isinstance(value, refused):
            return f"expected {name}, got {type(value).__name__} {value!r:.80}"
        if length is not None and len(value) > length:  # type: ignore[arg-type]
            return f"longer than {length} characters"
        return None

    return check


class _Validator:
    """Checks rows against a table before they are sent; maps ORM attribute names to columns."""

    def __init__(self, table: sa.Table, names: Mapping[str, str]) -> None:
        self.table = table
        self.columns: dict[str, sa.Column[Any]] = {}
        for key, column_key in names.items():
            self.columns[key] = table.c[column_key]
        self.renamed = any(key != column_key for key, column_key in names.items())
        self.required = frozenset(
            column.key
            for column in table.c
            if not column.nullable
            and column.default is None
            and column.server_default is None
            and column.identity is None
            and column.computed is None
            and column is not table.autoincrement_column
        )
        self.not_null = frozenset(c.key for c in table.c if not c.nullable)
        self.checks = {column.key: _type_check(column) for column in table.c}

    def check(self, row: object) -> tuple[dict[str, object] | None, str | None]:
        """The row keyed by column, or the reason it cannot be inserted."""
        if not isinstance(row, Mapping):
            return None, f"a row is a mapping of column names to values, not {type(row).__name__}"
        values: dict[str, object] = {}
        for key, value in row.items():
            column = self.columns.get(key) if isinstance(key, str) else None
            if column is None:
                return None, f"unknown column {key!r}"
            if value is None:
                if column.key in self.not_null:
                    return None, f"NULL in NOT NULL column {column.key!r}"
            else:
                check = self.checks[column.key]
                problem = check(value) if check is not None else None
                if problem is not None:
                    return None, f"column {column.key!r}: {problem}"
            values[column.key] = value
        missing = self.required.difference(values)
        if missing:
            return None, f"missing required column(s) {sorted(missing)}"
        return values, None


def _resolve_table(table_or_model: object) -> tuple[sa.Table, dict[str, str]]:
    """The table to insert into, and the accepted row keys (attribute or column) per column."""
    if isinstance(table_or_model, sa.Table):
        return table_or_model, {c.key: c.key for c in table_or_model.c}
    mapper = sa.inspect(table_or_model, raiseerr=False)
    local_table = getattr(mapper, "local_table", None)
    if mapper is None or not isinstance(local_table, sa.Table):
        raise ConfigurationError(f"{table_or_model!r} is neither a Table nor a mapped class")
    if mapper.inherits is not None and mapper.local_table is not mapper.inherits.local_table:
        raise ConfigurationError("joined-table inheritance: insert into each table in turn")
    names = {c.key: c.key for c in local_table.c}
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if isinstance(column, sa.Column) and column.table is local_table:
            names[prop.key] = column.key
    return local_table, names


# --- statements (pure) -------------------------------------------------------------------


class _Statements:
    """The INSERT (or upsert) for each set of columns a batch carries, built once."""

    def __init__(
        self,
        table: sa.Table,
        dialect: sa.Dialect,
        upsert: Upsert,
        conflict_target: Sequence[str] | None,
    ) -> None:
        self.table = table
        self.dialect = dialect
        self.upsert = upsert
        self._cache: dict[tuple[str, ...], sa.Insert] = {}
        if upsert is None:
            if conflict_target is not None:
                raise ConfigurationError("conflict_target is for upserts: give upsert= too")
            return
        if dialect.name not in ("postgresql", "sqlite"):
            raise ConfigurationError(
                f"upsert is supported on PostgreSQL and SQLite, not {dialect.name}"
            )
        if not (upsert in ("ignore", "update") or _is_names(upsert)):
            raise ConfigurationError('upsert is "ignore", "update" or a list of column names')
        if conflict_target is not None and not _is_names(conflict_target):
            raise ConfigurationError("conflict_target is a list of column names")
        target = list(conflict_target or [c.key for c in table.primary_key])
        for name in (*target, *(upsert if _is_names(upsert) else ())):
            if name not in table.c:
                raise ConfigurationError(f"{table.name} has no column {name!r}")
        if upsert != "ignore" and not target:
            raise ConfigurationError("an updating upsert needs conflict_target= (no primary key)")
        self.target = target

    def insert(self, columns: tuple[str, ...]) -> sa.Insert:
        statement = self._cache.get(columns)
        if statement is None:
            statement = self._build(columns).execution_options(preserve_rowcount=True)
            self._cache[columns] = statement
        return statement

    def _build(self, columns: tuple[str, ...]) -> sa.Insert:
        if self.upsert is None:
            return sa.insert(self.table)
        if self.dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            statement: postgresql.Insert | sqlite.Insert = postgresql.insert(self.table)
        else:
            from sqlalchemy.dialects import sqlite

            statement = sqlite.insert(self.table)
        if self.upsert == "ignore":
            return statement.on_conflict_do_nothing(
                index_elements=self.target if self.target else None
            )
        if self.upsert == "update":
            keep = {*self.target, *(c.key for c in self.table.primary_key)}
            updated = [c for c in columns if c not in keep]
        else:
            updated = [c for c in self.upsert if c in columns]
        if not updated:
            return statement.on_conflict_do_nothing(index_elements=self.target)
        return statement.on_conflict_do_update(
            index_elements=self.target,
            set_={name: statement.excluded[name] for name in updated},
        )


def _is_names(value: object) -> bool:
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _can_copy(connection: sa.Connection) -> bool:
    return connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg"


# --- the writer (I/O) --------------------------------------------------------------------

_Batch = list[tuple[int, dict[str, object]]]


@dataclass
class _Tally:
    inserted: int = 0
    skipped: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    batches: int = 0
    methods: set[str] = field(default_factory=set)


class _Target:
    """The connection batches go through, and who commits: us per batch, or the caller.

    ``owned``: the transaction is ours (an engine was given), so ``"single"`` commits at the
    end and a stop rolls everything back. Its I/O methods, with :meth:`_Writer.batch`, are
    where outages become ``BackendUnavailable``: the caller's rows and ``on_progress`` run
    outside them, so an ``OSError`` of theirs is not taken for the database's.
    """

    def __init__(
        self, target: object, transaction: Transaction | None, *, owned: bool | None = None
    ) -> None:
        if not isinstance(target, (sa.Engine, sa.Connection, Session)):
            raise ConfigurationError(
                f"insert_batches takes a Session, Connection or Engine, not {type(target).__name__}"
            )
        if transaction not in (None, "per_batch", "single"):
            raise ConfigurationError('transaction is "per_batch" or "single"')
        self.target = target
        self.owned = isinstance(target, sa.Engine) if owned is None else owned
        self.per_batch = (transaction or ("per_batch" if self.owned else "single")) == "per_batch"
        self._connection: sa.Connection | None = None

    @sql_unavailable
    def connection(self) -> sa.Connection:
        if self._connection is None:
            if isinstance(self.target, sa.Engine):
                self._connection = self.target.connect()
            elif isinstance(self.target, Session):
                self._connection = self.target.connection()
            else:
                self._connection = self.target
            _begin_sqlite(self._connection)
        return self._connection

    @sql_unavailable
    def commit(self) -> None:
        if isinstance(self.target, Session):
            self.target.commit()
            self._connection = None  # the next transaction may use another connection
        elif self._connection is not None:
            self._connection.commit()
            _begin_sqlite(self._connection)

    @sql_unavailable
    def rollback(self) -> None:
        """Roll back what is not committed yet (only ever called on a transaction of ours)."""
        if isinstance(self.target, Session):
            self.target.rollback()
            self._connection = None
        elif self._connection is not None:
            self._connection.rollback()

    @sql_unavailable
    def close(self) -> None:
        if isinstance(self.target, sa.Engine) and self._connection is not None:
            self._connection.close()  # rolls back whatever was not committed


def _begin_sqlite(connection: sa.Connection) -> None:
    """Open pysqlite's transaction now, so SAVEPOINTs nest inside it.

    pysqlite sends ``BEGIN`` only before the first DML statement; a ``SAVEPOINT`` sent
    before that starts the transaction itself, and its ``RELEASE`` then commits everything.
    """
    if connection.dialect.name != "sqlite" or connection.dialect.driver != "pysqlite":
        return
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is not None and not getattr(dbapi_connection, "in_transaction", True):
        connection.exec_driver_sql("BEGIN")


class _Writer:
    """Sends batches, isolates rows the database refuses, stops or carries on."""

    def __init__(
        self,
        target: _Target,
        statements: _Statements,
        *,
        copy: bool,
        stop_on_error: bool,
    ) -> None:
        self.target = target
        self.statements = statements
        self.copy = copy
        self.stop_on_error = stop_on_error
        self.tally = _Tally()

    @sql_unavailable
    def batch(self, rows: _Batch) -> None:
        """Write one validated batch (grouped by the columns each row sets)."""
        groups: dict[tuple[str, ...], _Batch] = {}
        for index, values in rows:
            groups.setdefault(tuple(values), []).append((index, values))
        connection = self.target.connection()
        self.tally.batches += 1
        if not self.stop_on_error:
            for columns, group in groups.items():
                self._isolate(connection, columns, group, self._copyable(columns))
            return
        before = (self.tally.inserted, self.tally.skipped)
        batch = connection.begin_nested()  # all of this batch, or none of it
        try:
            for columns, group in groups.items():
                try:
                    with connection.begin_nested():
                        self._attempt(connection, columns, group, self._copyable(columns))
                except _ISOLATABLE:
                    self._stop_at_first_bad(connection, columns, group)
        except _Stop:
            batch.rollback()
            self.tally.inserted, self.tally.skipped = before
            raise
        batch.commit()

    def _copyable(self, columns: tuple[str, ...]) -> bool:
        # COPY applies no Python-side default: scalar ones are sent along, others (callables,
        # sequences) need an INSERT
        return self.copy and all(
            c.key in columns or c.default is None or c.default.is_scalar
            for c in self.statements.table.c
        )

    def _attempt(
        self, connection: sa.Connection, columns: tuple[str, ...], rows: _Batch, copy: bool
    ) -> None:
        if copy:
            self.tally.methods.add("copy")
            try:
                _copy(connection, self.statements.table, columns, [r for _, r in rows])
            except Exception as exc:
                raise _as_sqlalchemy_error(exc) from exc
            self.tally.inserted += len(rows)
            return
        self.tally.methods.add("executemany")
        result = connection.execute(self.statements.insert(columns), [r for _, r in rows])
        written = result.rowcount if self.statements.upsert == "ignore" else -1
        if written < 0:
            written = len(rows)
        self.tally.inserted += written
        self.tally.skipped += len(rows) - written

    def _isolate(
        self, connection: sa.Connection, columns: tuple[str, ...], rows: _Batch, copy: bool
    ) -> None:
        """Write ``rows``; if the database refuses them, bisect until the bad ones are alone."""
        try:
            with connection.begin_nested():
                self._attempt(connection, columns, rows, copy)
            return
        except _ISOLATABLE as exc:
            if len(rows) == 1:
                index, row = rows[0]
                self.tally.rejected.append(RejectedRow(index, row, _reason(exc)))
                return
        middle = len(rows) // 2
        self._isolate(connection, columns, rows[:middle], False)
        self._isolate(connection, columns, rows[middle:], False)

    def _stop_at_first_bad(
        self, connection: sa.Connection, columns: tuple[str, ...], rows: _Batch
    ) -> None:
        """Find the first row the database refuses (probing in savepoints), then stop."""
        while len(rows) > 1:
            head = rows[: len(rows) // 2]
            with connection.begin_nested() as probe:
                try:
                    self._probe(connection, columns, head)
                    failed = False
                except _ISOLATABLE:
                    failed = True
                probe.rollback()
            rows = head if failed else rows[len(head) :]
        index, row = rows[0]
        try:
            with connection.begin_nested() as probe:
                self._probe(connection, columns, rows)
                probe.rollback()
        except _ISOLATABLE as exc:
            raise _Stop(RejectedRow(index, row, _reason(exc))) from exc
        raise _Stop(RejectedRow(index, row, "refused with the rest of its batch"))

    def _probe(self, connection: sa.Connection, columns: tuple[str, ...], rows: _Batch) -> None:
        connection.execute(self.statements.insert(columns), [r for _, r in rows])


class _Stop(Exception):
    """Internal: stop_on_error met a bad row."""

    def __init__(self, rejected: RejectedRow) -> None:
        super().__init__(rejected.reason)
        self.rejected = rejected


def _reason(exc: sa.exc.DBAPIError) -> str:
    message = " ".join(str(exc.orig).split())
    return message[:500]


def _as_sqlalchemy_error(exc: Exception) -> Exception:
    """Psycopg's errors (COPY bypasses SQLAlchemy) as SQLAlchemy's, for isolation and outages."""
    import psycopg

    if isinstance(exc, psycopg.errors.IntegrityError):
        return sa.exc.IntegrityError("COPY", None, exc)
    if isinstance(exc, psycopg.errors.DataError):
        return sa.exc.DataError("COPY", None, exc)
    if isinstance(exc, psycopg.errors.OperationalError):
        return sa.exc.OperationalError("COPY", None, exc)
    if isinstance(exc, psycopg.errors.InterfaceError):
        return sa.exc.InterfaceError("COPY", None, exc)
    return exc


def _copy(
    connection: sa.Connection,
    table: sa.Table,
    columns: tuple[str, ...],
    rows: list[dict[str, object]],
) -> None:
    """``COPY table (columns) FROM STDIN`` through psycopg 3, values as SQLAlchemy binds them.

    Omitted columns with a scalar Python-side default are sent with that default (the
    server only knows its own defaults).
    """
    dialect = connection.dialect
    preparer = dialect.identifier_preparer
    defaults = {
        c.key: c.default.arg  # type: ignore[attr-defined]
        for c in table.c
        if c.key not in columns and c.default is not None and c.default.is_scalar
    }
    names = [*columns, *defaults]
    column_list = ", ".join(preparer.quote(table.c[name].name) for name in names)
    sql = f"COPY {preparer.format_table(table)} ({column_list}) FROM STDIN"
    processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
    fill = tuple(defaults.values())

    def bind(value: object, process: Callable[[Any], object] | None) -> object:
        return value if process is None or value is None else process(value)

    def tuples() -> Iterator[tuple[object, ...]]:
        for row in rows:
            values = (*(row[name] for name in columns), *fill)
            yield tuple(map(bind, values, processors))

    driver = connection.connection.driver_connection
    if dialect.is_async:
        await_only(_copy_async(driver, sql, tuples()))
        return
    with driver.cursor() as cursor, cursor.copy(sql) as copy:  # type: ignore[union-attr]
        for values in tuples():
            copy.write_row(values)


async def _copy_async(driver: Any, sql: str, rows: Iterator[tuple[object, ...]]) -> None:
    async with driver.cursor() as cursor, cursor.copy(sql) as copy:
        for values in rows:
            await copy.write_row(values)


# --- the driver --------------------------------------------------------------------------


def _run(
    target: _Target,
    table_or_model: object,
    rows: Iterable[object],
    *,
    batch_size: int,
    upsert: Upsert,
    conflict_target: Sequence[str] | None,
    on_progress: ProgressCallback | None,
    method: InsertMethod,
    stop_on_error: bool,
) -> InsertReport:
    started = time.perf_counter()
    if type(batch_size) is not int or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive int, not {batch_size!r}")
    if method not in ("auto", "executemany", "copy"):
        raise ConfigurationError('method is "auto", "executemany" or "copy"')
    table, names = _resolve_table(table_or_model)
    validator = _Validator(table, names)
    total = len(rows) if isinstance(rows, Sized) else None
    try:
        connection = target.connection()
        statements = _Statements(table, connection.dialect, upsert, conflict_target)
        copy = method != "executemany" and upsert is None and _can_copy(connection)
        if method == "copy" and not copy:
            raise ConfigurationError("COPY needs PostgreSQL with psycopg 3, and no upsert")
        writer = _Writer(target, statements, copy=copy, stop_on_error=stop_on_error)
        tally = writer.tally
        committed = (0, 0)
        done = 0
        numbered = enumerate(rows)
        while chunk := list(itertools.islice(numbered, batch_size)):
            valid: _Batch = []
            for index, row in chunk:
                values, problem = validator.check(row)
                if values is None:
                    rejected = RejectedRow(index, row, problem or "invalid")
                    if stop_on_error:
                        raise _Stop(rejected)
                    tally.rejected.append(rejected)
                else:
                    valid.append((index, values))
            if valid:
                writer.batch(valid)
            if target.per_batch:
                target.commit()
                committed = (tally.inserted, tally.skipped)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, total)
        if target.owned and not target.per_batch:
            target.commit()
    except _Stop as stop:
        if target.per_batch or target.owned:  # what is not committed is ours to undo
            target.rollback()
            tally.inserted, tally.skipped = committed
        report = _report(tally, started, sorted_rejected=[*tally.rejected, stop.rejected])
        raise RowRejected(
            stop.rejected.index, stop.rejected.reason, report=report
        ) from stop.__cause__
    finally:
        target.close()
    return _report(tally, started, sorted_rejected=tally.rejected)


def _report(tally: _Tally, started: float, *, sorted_rejected: list[RejectedRow]) -> InsertReport:
    return InsertReport(
        inserted=tally.inserted,
        skipped=tally.skipped,
        rejected=tuple(sorted(sorted_rejected, key=lambda r: r.index)),
        batches=tally.batches,
        seconds=time.perf_counter() - started,
        method="+".join(sorted(tally.methods)) or "executemany",
    )


def insert_batches(
    target: Session | sa.Connection | sa.Engine,
    table_or_model: sa.FromClause | type[Any],
    rows: Iterable[Mapping[str, object]],
    *,
    batch_size: int = 1000,
    upsert: Upsert = None,
    conflict_target: Sequence[str] | None = None,
    on_progress: ProgressCallback | None = None,
    transaction: Transaction | None = None,
    method: InsertMethod = "auto",
    stop_on_error: bool = False,
) -> InsertReport:
    """Insert many rows fast, in batches; report the rows that could not be inserted.

    Each row is a mapping of column names (or ORM attribute names) to values. Rows are
    validated first; a batch the database refuses is bisected in savepoints so only its bad
    rows are left out. ``rows`` may be a generator: it is read one batch at a time.

    Args:
        target: an ``Engine`` (connections and transactions are ours), a ``Connection`` or a
            ``Session`` (the caller's transaction).
        table_or_model: a ``Table`` (``Model.__table__`` too) or a mapped class (its own
            table).
        rows: the rows.
        batch_size: rows per batch.
        upsert: ``None`` (a conflict is an error), ``"ignore"`` (``ON CONFLICT DO NOTHING``),
            ``"update"`` (``DO UPDATE`` every column the row sets but the conflict target and
            the primary key) or a list of the columns to update. PostgreSQL and SQLite.
        conflict_target: the unique columns a conflict is detected on (default: the primary
            key).
        on_progress: called after each batch with (rows processed, total or ``None``).
        transaction: ``"per_batch"`` commits after every batch, so a failure keeps the earlier
            ones; ``"single"`` commits once at the end (with an ``Engine``) or leaves the
            commit to the caller. Default: ``"per_batch"`` for an ``Engine``, ``"single"``
            otherwise (the caller's transaction is not committed behind its back).
        method: ``"auto"`` (``COPY`` on PostgreSQL with psycopg 3 when no upsert, else
            ``executemany``), ``"executemany"`` or ``"copy"``.
        stop_on_error: raise at the first bad row instead of reporting it; that row's batch
            is rolled back (earlier batches stay committed under ``"per_batch"``).

    Returns:
        How many rows were inserted and skipped, and which were rejected and why.

    Raises:
        RowRejected: ``stop_on_error`` and a row was refused (its index, reason and the report
            so far attached).
        ConfigurationError: bad options, or ``method="copy"`` where ``COPY`` cannot be used.
        BackendUnavailable: the database could not be reached or timed out (with
            ``"per_batch"``, the batches committed before stay committed).
    """
    return _run(
        _Target(target, transaction),
        table_or_model,
        rows,
        batch_size=batch_size,
        upsert=upsert,
        conflict_target=conflict_target,
        on_progress=on_progress,
        method=method,
        stop_on_error=stop_on_error,
    )


async def insert_batches_async(
    target: AsyncSession | AsyncConnection | AsyncEngine,
    table_or_model: sa.FromClause | type[Any],
    rows: Iterable[Mapping[str, object]],
    *,
    batch_size: int = 1000,
    upsert: Upsert = None,
    conflict_target: Sequence[str] | None = None,
    on_progress: ProgressCallback | None = None,
    transaction: Transaction | None = None,
    method: InsertMethod = "auto",
    stop_on_error: bool = False,
) -> InsertReport:
    """The asyncio twin of :func:`insert_batches`, for async sessions, connections and engines.

    The same code runs inside SQLAlchemy's ``run_sync`` (``COPY`` through psycopg's async
    cursor), so options, results and errors are identical.

    Args:
        target: an ``AsyncEngine``, ``AsyncConnection`` or ``AsyncSession``.
        table_or_model: a ``Table`` or a mapped class.
        rows: the rows.
        batch_size: rows per batch.
        upsert: ``None``, ``"ignore"``, ``"update"`` or the columns to update.
        conflict_target: the unique columns a conflict is detected on.
        on_progress: called after each batch with (rows processed, total or ``None``).
        transaction: ``"per_batch"`` or ``"single"`` (defaults as for :func:`insert_batches`).
        method: ``"auto"``, ``"executemany"`` or ``"copy"``.
        stop_on_error: raise at the first bad row.

    Returns:
        The report.

    Raises:
        RowRejected: ``stop_on_error`` and a row was refused.
        ConfigurationError: bad options.
        BackendUnavailable: the database could not be reached or timed out.
    """
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    owned = isinstance(target, AsyncEngine)  # its connection is opened (and closed) below

    def run(sync_target: Session | sa.Connection) -> InsertReport:
        return _run(
            _Target(sync_target, transaction, owned=owned),
            table_or_model,
            rows,
            batch_size=batch_size,
            upsert=upsert,
            conflict_target=conflict_target,
            on_progress=on_progress,
            method=method,
            stop_on_error=stop_on_error,
        )

    if isinstance(target, AsyncEngine):
        async with contextlib.AsyncExitStack() as stack:
            with map_outages:  # connecting; run() maps the outages of its own I/O
                connection = await stack.enter_async_context(target.connect())
            return await connection.run_sync(run)
    if isinstance(target, (AsyncConnection, AsyncSession)):
        return await target.run_sync(run)
    raise ConfigurationError(
        "insert_batches_async takes an AsyncSession, AsyncConnection or AsyncEngine, "
        f"not {type(target).__name__}"
    )
