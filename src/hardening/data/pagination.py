"""Keyset (cursor) pagination: pages that neither skip nor repeat rows while rows come and go.

``OFFSET 50000`` makes the database read and discard 50,000 rows, and a row inserted before
the offset shifts every later page by one. A keyset page instead asks for the rows *after the
last row seen*, by value: ``WHERE (created_at, id) < (:t, :id) ORDER BY created_at DESC, id
DESC LIMIT 50``, which an index on ``(created_at, id)`` answers by reading 50 rows. The
position travels to the client as an opaque, signed cursor (``_cursor.py``).

:class:`_Keyset` is the plan (ordering, predicate, page assembly) and does no I/O;
:func:`paginate` and :func:`paginate_async` only execute it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hardening._imports import require
from hardening._sql import sql_unavailable
from hardening.data._cursor import CursorCodec, fingerprint
from hardening.errors import ConfigurationError

require("sqlalchemy", extra="sqlalchemy", feature="keyset pagination")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import QueryableAttribute, Session  # noqa: E402
from sqlalchemy.sql import operators  # noqa: E402
from sqlalchemy.sql.elements import UnaryExpression  # noqa: E402

if TYPE_CHECKING:
    from typing import TypeAlias

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from typing_extensions import Unpack

    from hardening._clock import Clock

    AnySelect: TypeAlias = sa.Select[Unpack[tuple[Any, ...]]]

__all__ = ["OrderTerm", "Page", "paginate", "paginate_async"]

T = TypeVar("T")
OrderTerm = sa.ColumnElement[Any] | QueryableAttribute[Any]
"""One ``order_by`` entry: a column or expression, optionally ``.desc()`` and
``.nulls_first()``/``.nulls_last()``."""

_DIRECTIONS = {operators.asc_op: False, operators.desc_op: True}
_NULLS = {
    operators.nulls_first_op: True,
    operators.nullsfirst_op: True,
    operators.nulls_last_op: False,
    operators.nullslast_op: False,
}
_KEY_LABEL = "_hardening_key_{}"


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a keyset-paginated query.

    Attributes:
        items: the rows: ORM objects or scalars when the query selects one entity or column,
            otherwise ``Row`` objects.
        next_cursor: pass as ``after=`` for the next page; ``None`` when there is none.
        previous_cursor: pass as ``before=`` for the previous page; ``None`` on the first.
        has_next: whether rows follow this page (exact when walking forward).
        has_previous: whether rows precede this page (exact when walking backward; walking
            forward it is ``True`` whenever a cursor was given, as checking would cost a query).
    """

    items: list[T]
    next_cursor: str | None
    previous_cursor: str | None
    has_next: bool
    has_previous: bool


@dataclass(frozen=True)
class _Term:
    """One ordering term: an expression, its direction, and where its NULLs sort."""

    expr: sa.ColumnElement[Any]
    descending: bool
    nulls_first: bool | None  # None: the expression is taken to be never NULL

    def reverse(self) -> _Term:
        nulls = None if self.nulls_first is None else not self.nulls_first
        return _Term(self.expr, not self.descending, nulls)

    def order(self) -> sa.ColumnElement[Any]:
        ordered = self.expr.desc() if self.descending else self.expr.asc()
        if self.nulls_first is None:
            return ordered
        return ordered.nulls_first() if self.nulls_first else ordered.nulls_last()

    def describe(self) -> str:
        nulls = {None: "", True: " NULLS FIRST", False: " NULLS LAST"}[self.nulls_first]
        return f"{self.expr} {'DESC' if self.descending else 'ASC'}{nulls}"

    def bind(self, value: object) -> sa.ColumnElement[Any]:
        return sa.bindparam(None, value, type_=self.expr.type)

    def equal(self, value: object) -> sa.ColumnElement[bool]:
        return self.expr.is_(None) if value is None else self.expr == self.bind(value)

    def beyond(self, value: object) -> sa.ColumnElement[bool]:
        """Rows strictly after ``value`` in this term's order."""
        if value is None:  # NULLs first: every non-NULL follows; NULLs last: nothing does
            return self.expr.is_not(None) if self.nulls_first else sa.false()
        bound = self.bind(value)
        after = self.expr < bound if self.descending else self.expr > bound
        return sa.or_(after, self.expr.is_(None)) if self.nulls_first is False else after


def _clause(item: object) -> object:
    clause_element = getattr(item, "__clause_element__", None)
    return clause_element() if clause_element is not None else item


def _parse_term(item: object) -> _Term:
    element = _clause(item)
    nulls: bool | None = None
    descending = False
    if isinstance(element, UnaryExpression) and element.modifier in _NULLS:
        nulls = _NULLS[element.modifier]
        element = element.element
    if isinstance(element, UnaryExpression) and element.modifier in _DIRECTIONS:
        descending = _DIRECTIONS[element.modifier]
        element = element.element
    if isinstance(element, UnaryExpression) and (
        element.modifier in _NULLS or element.modifier in _DIRECTIONS
    ):
        raise ConfigurationError(f"write {item} as column.desc().nulls_last(), in that order")
    if not isinstance(element, sa.ColumnElement):
        raise ConfigurationError(f"order_by takes columns or SQL expressions, not {item!r}")
    if nulls is None and isinstance(element, sa.Column) and element.nullable:
        raise ConfigurationError(
            f"{element} is nullable: say where its NULLs go, e.g. "
            f"{element.key}.desc().nulls_last() (keyset pages need a total order)"
        )
    return _Term(element, descending, nulls)


def _primary_key(statement: AnySelect) -> list[sa.ColumnElement[Any]]:
    """The primary key of the statement's first entity, or of its only table."""
    descriptions = statement.column_descriptions
    entity = descriptions[0].get("entity") if descriptions else None
    if entity is not None:
        mapper = sa.inspect(entity).mapper
        keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
        return [getattr(entity, key).__clause_element__() for key in keys]
    froms = statement.get_final_froms()
    primary_key = getattr(froms[0], "primary_key", None) if len(froms) == 1 else None
    if not primary_key:
        raise ConfigurationError(
            "cannot tell which columns identify a row of this query: pass tiebreaker="
        )
    return list(primary_key)


def _terms(
    statement: AnySelect,
    order_by: Sequence[OrderTerm],
    tiebreaker: Sequence[OrderTerm] | None,
) -> list[_Term]:
    if not isinstance(order_by, (list, tuple)):
        raise ConfigurationError("order_by is a list of columns or expressions")
    terms = [_parse_term(item) for item in order_by]
    descending = terms[-1].descending if terms else False
    unique = [_clause(c) for c in tiebreaker] if tiebreaker is not None else _primary_key(statement)
    for column in unique:
        if not isinstance(column, sa.ColumnElement):
            raise ConfigurationError(f"tiebreaker takes columns, not {column!r}")
        if not any(t.expr.compare(column) for t in terms):
            # the tie-break follows the last term's direction, so one index serves both
            terms.append(_Term(column, descending, None))
    return terms


class _Keyset:
    """One page's plan: the statement to run and how to turn its rows into a :class:`Page`."""

    def __init__(
        self,
        statement: AnySelect,
        order_by: Sequence[OrderTerm],
        *,
        after: str | None,
        before: str | None,
        limit: int,
        tiebreaker: Sequence[OrderTerm] | None,
        codec: CursorCodec,
    ) -> None:
        if not isinstance(statement, sa.Select):
            raise ConfigurationError(f"paginate takes a select(), not {type(statement).__name__}")
        if (
            getattr(statement, "_order_by_clauses", ())
            or getattr(statement, "_limit_clause", None) is not None
            or getattr(statement, "_offset_clause", None) is not None
        ):
            raise ConfigurationError(
                "give the ordering as order_by= and the page size as limit=, not on the select"
            )
        if type(limit) is not int or limit < 1:
            raise ConfigurationError(f"limit must be a positive int, not {limit!r}")
        if after is not None and before is not None:
            raise ConfigurationError("pass after= or before=, not both")
        self.terms = _terms(statement, order_by, tiebreaker)
        self.ordering = fingerprint(";".join(term.describe() for term in self.terms))
        self.codec = codec
        self.limit = limit
        self.statement = statement
        self.after = after
        self.backward = before is not None
        cursor = after if after is not None else before
        self.position = (
            None if cursor is None else codec.decode(cursor, self.ordering, len(self.terms))
        )

    def query(self) -> AnySelect:
        """The statement for this page: keys selected, filtered past the cursor, limited."""
        terms = [t.reverse() for t in self.terms] if self.backward else self.terms
        keys = [term.expr.label(_KEY_LABEL.format(i)) for i, term in enumerate(terms)]
        query = self.statement.add_columns(*keys)
        if self.position is not None:
            query = query.where(_beyond(terms, self.position))
        return query.order_by(*(term.order() for term in terms)).limit(self.limit + 1)

    def page(self, result: sa.Result[Any]) -> Page[Any]:
        """The page from the rows ``query()`` returned."""
        if self._one_entity() and not isinstance(result, sa.CursorResult):
            result = result.unique()  # joined eager loads of collections repeat the entity
        width = len(result.keys()) - len(self.terms)
        if width == 1:
            rows = result.all()
            items: list[Any] = [row[0] for row in rows[: self.limit]]
        else:  # rows without our key columns: filter a frozen copy of the result
            frozen = result.freeze()
            rows = frozen().all()
            items = list(frozen().columns(*range(width)).all()[: self.limit])
        more = len(rows) > self.limit
        positions = [tuple(row[width:]) for row in rows[: self.limit]]
        if self.backward:
            positions.reverse()
            items.reverse()
            has_next, has_previous = True, more
        else:
            has_next, has_previous = more, self.position is not None
        first = positions[0] if positions else self.position
        last = positions[-1] if positions else self.position
        return Page(
            items=items,
            next_cursor=self._cursor(last) if has_next and last is not None else None,
            previous_cursor=self._cursor(first) if has_previous and first is not None else None,
            has_next=has_next,
            has_previous=has_previous,
        )

    def _one_entity(self) -> bool:
        descriptions = self.statement.column_descriptions
        if len(descriptions) != 1:
            return False
        entity = descriptions[0].get("entity")
        return entity is not None and descriptions[0].get("expr") is entity

    def _cursor(self, values: Sequence[object]) -> str:
        for term, value in zip(self.terms, values, strict=True):
            if value is None and term.nulls_first is None:
                raise ConfigurationError(
                    f"{term.expr} produced NULL: order by it with .nulls_first() or "
                    ".nulls_last() so NULLs have a place"
                )
        return self.codec.encode(self.ordering, values)


def _beyond(terms: Sequence[_Term], values: Sequence[object]) -> sa.ColumnElement[bool]:
    """Rows strictly after the position ``values`` in the order ``terms``.

    One row-value comparison, ``(a, b) > (:a, :b)``, when every term goes the same way and
    none is NULL (an index range scan on PostgreSQL and SQLite); otherwise the comparison
    expanded into ``a > :a OR (a = :a AND b > :b) …``, with NULLs placed as declared.
    """
    if (
        len({t.descending for t in terms}) == 1
        and all(t.nulls_first is None for t in terms)
        and all(v is not None for v in values)
    ):
        left = sa.tuple_(*(t.expr for t in terms))
        right = sa.tuple_(*(t.bind(v) for t, v in zip(terms, values, strict=True)))
        return left < right if terms[0].descending else left > right
    branches = [
        sa.and_(
            *(t.equal(v) for t, v in zip(terms[:i], values[:i], strict=True)),
            terms[i].beyond(values[i]),
        )
        for i in range(len(terms))
    ]
    expanded = sa.or_(*branches)
    head, value = terms[0], values[0]
    if head.nulls_first is None and value is not None:  # lets an index on the head range-scan
        bound = head.bind(value)
        return sa.and_(head.expr <= bound if head.descending else head.expr >= bound, expanded)
    return expanded


@sql_unavailable
def paginate(
    session: Session | sa.Connection,
    statement: AnySelect,
    *,
    order_by: Sequence[OrderTerm],
    after: str | None = None,
    before: str | None = None,
    limit: int = 50,
    secret: str | bytes | None = None,
    max_age: float | timedelta | None = None,
    tiebreaker: Sequence[OrderTerm] | None = None,
    clock: Clock | None = None,
) -> Page[Any]:
    """One page of ``statement``, by keyset: stable while rows are inserted and deleted.

    The primary key (or ``tiebreaker``) is appended to ``order_by`` when it is not already
    there, so the order is total and no two rows share a position; it follows the last term's
    direction, so an index on ``(columns..., id)`` serves the query forwards and backwards.

    Args:
        session: a ``Session`` or ``Connection``.
        statement: the ``select()`` to page through, without ``ORDER BY``/``LIMIT``/``OFFSET``.
        order_by: the ordering: columns or expressions, ``.desc()`` for descending; a nullable
            column needs ``.nulls_first()`` or ``.nulls_last()``.
        after: a ``next_cursor``: the page after that position.
        before: a ``previous_cursor``: the page before that position.
        limit: the page size.
        secret: the key cursors are signed with (at least 16 bytes); ``None`` reads
            ``HARDENING_PAGINATION_SECRET``.
        max_age: refuse cursors older than this (``None``: any age).
        tiebreaker: the columns that identify a row, when the statement has no single entity or
            table to take the primary key from.
        clock: the clock that stamps and ages cursors.

    Returns:
        The page, with the cursors to its neighbours.

    Raises:
        InvalidCursor: the cursor is malformed, altered, made for another ordering or expired.
        ConfigurationError: no secret, a bad ``limit``, a nullable column without a NULLs
            position, or a statement that already orders or limits itself.
        BackendUnavailable: the database could not be reached or timed out (errors of the
            statement itself, such as a missing table, propagate unchanged).
    """
    codec = CursorCodec(secret, max_age=max_age, clock=clock)
    plan = _Keyset(
        statement,
        order_by,
        after=after,
        before=before,
        limit=limit,
        tiebreaker=tiebreaker,
        codec=codec,
    )
    return plan.page(session.execute(plan.query()))


@sql_unavailable
async def paginate_async(
    session: AsyncSession | AsyncConnection,
    statement: AnySelect,
    *,
    order_by: Sequence[OrderTerm],
    after: str | None = None,
    before: str | None = None,
    limit: int = 50,
    secret: str | bytes | None = None,
    max_age: float | timedelta | None = None,
    tiebreaker: Sequence[OrderTerm] | None = None,
    clock: Clock | None = None,
) -> Page[Any]:
    """The asyncio twin of :func:`paginate`, for ``AsyncSession`` / ``AsyncConnection``.

    Args:
        session: an ``AsyncSession`` or ``AsyncConnection``.
        statement: the ``select()`` to page through.
        order_by: the ordering.
        after: a ``next_cursor``.
        before: a ``previous_cursor``.
        limit: the page size.
        secret: the key cursors are signed with.
        max_age: refuse cursors older than this.
        tiebreaker: the columns that identify a row.
        clock: the clock that stamps and ages cursors.

    Returns:
        The page.

    Raises:
        InvalidCursor: the cursor is malformed, altered, made for another ordering or expired.
        ConfigurationError: bad options.
        BackendUnavailable: the database could not be reached or timed out.
    """
    codec = CursorCodec(secret, max_age=max_age, clock=clock)
    plan = _Keyset(
        statement,
        order_by,
        after=after,
        before=before,
        limit=limit,
        tiebreaker=tiebreaker,
        codec=codec,
    )
    return plan.page(await session.execute(plan.query()))
