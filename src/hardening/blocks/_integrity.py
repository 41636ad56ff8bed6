"""History integrity: rebuild, list and verify a document's versions, checking the chain.

The checks themselves are in ``_chain.py``. Here they meet SQL, once for every history class:
each operation is a generator of *steps* that yields the statements it needs and receives their
rows, so ``DocumentHistory``, ``AsyncDocumentHistory`` and ``BlockHistory`` share all of it and
only run the statements (:func:`run`, :func:`run_async`). :class:`Tables` says which tables and
which replay a storage uses.

Also here: :func:`add_missing_columns`, which ``create_all`` (and so ``create_schema``) runs on
tables that already existed, so a database created before the digest columns gets them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from hardening._sql import sql_unavailable
from hardening.blocks._chain import MISSING_ROW, Replay, Stored, Walk
from hardening.errors import HistoryCorrupted, NotFoundError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "HistoryReport",
    "Tables",
    "add_missing_columns",
    "digest_column",
    "document_ids",
    "patches_since",
    "rebuild",
    "run",
    "run_async",
    "text_of",
    "verify",
    "versions",
]

T = TypeVar("T")
Rows = Sequence[Any]
Steps = Generator[sa.Executable, Rows, T]
_PAGE = 200  # patch rows per statement while verifying: memory stays bounded
_ATTEMPTS = 3  # walks restarted when a compaction moved the history's start meanwhile


@dataclass(frozen=True)
class HistoryReport:
    """What :meth:`DocumentHistory.verify` (or ``BlockHistory.verify``) found.

    Attributes:
        doc_id: the document's id.
        head: the head's version when the walk began.
        checked: how many versions were checked and found sound, from the oldest kept one
            (all of them, from the oldest to ``head``, when :attr:`ok`).
        unchained: rows without a digest (written before the chain existed): accepted as they
            are, but their content cannot be checked against the chain.
        problem: the first damage found, the error a ``load`` of that version raises
            (``None``: none).
    """

    doc_id: str
    head: int
    checked: int
    unchained: int
    problem: HistoryCorrupted | None

    @property
    def ok(self) -> bool:
        """Whether every kept version checked out."""
        return self.problem is None


@dataclass(frozen=True)
class Tables:
    """A storage's history tables and how its stored documents replay.

    Attributes:
        heads: the head rows (``id``, ``version``, ``digest``).
        patches: the patch rows (``document_id``, ``version``, ``patch``, ``digest``).
        snapshots: the snapshot rows (``content``, ``digest``, ``content_digest`` too).
        start: the replay of a snapshot's content.
        exact: the JSON columns are text holding the compact JSON the digests cover.
        head_content: the statement reading the head's version and content for ``verify``,
            and the function turning its rows into ``(version, content)``.
    """

    heads: sa.Table
    patches: sa.Table
    snapshots: sa.Table
    start: Callable[[object], Replay]
    exact: bool
    head_content: Callable[[str], tuple[sa.Select[Any], Callable[[Rows], tuple[int, object]]]]

    def walk(self, doc_id: str) -> Walk:
        """A new walk over this storage's rows."""
        return Walk(doc_id, self.start, exact=self.exact)


def digest_column(name: str = "digest") -> sa.Column[Any]:
    """A nullable hex digest column (rows written before the chain have none)."""
    return sa.Column(name, sa.String(64), nullable=True)


def text_of(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A JSON column read as its stored text (the walk parses it, and refuses garbage)."""
    return column if isinstance(column.type, sa.Text) else sa.cast(column, sa.Text)


# --- statements ----------------------------------------------------------------------------


def _head(t: Tables, doc_id: str) -> sa.Select[Any]:
    return sa.select(t.heads.c.version, t.heads.c.digest).where(t.heads.c.id == doc_id)


def _oldest(t: Tables, doc_id: str) -> sa.Select[Any]:
    s = t.snapshots.c
    return sa.select(sa.func.min(s.version)).where(s.document_id == doc_id)


def _snapshot(t: Tables, doc_id: str, version: int, *, nearest: bool) -> sa.Select[Any]:
    """The snapshot at ``version`` (or the nearest one below it)."""
    s = t.snapshots.c
    columns = (s.version, text_of(s.content).label("text"), s.digest, s.content_digest)
    query = sa.select(*columns).where(s.document_id == doc_id)
    if not nearest:
        return query.where(s.version == version)
    return query.where(s.version <= version).order_by(s.version.desc()).limit(1)


def _patches(t: Tables, doc_id: str, after: int, upto: int) -> sa.Select[Any]:
    p = t.patches.c
    return (
        sa.select(p.version, text_of(p.patch).label("text"), p.digest)
        .where(p.document_id == doc_id, p.version > after, p.version <= upto)
        .order_by(p.version)
    )


def _snapshot_versions(t: Tables, doc_id: str, after: int, upto: int) -> sa.Select[Any]:
    s = t.snapshots.c
    return (
        sa.select(s.version)
        .where(s.document_id == doc_id, s.version > after, s.version <= upto)
        .order_by(s.version)
    )


def _single(rows: Rows) -> Any:
    return rows[0][0] if rows else None


# --- the steps ------------------------------------------------------------------------------


def rebuild(t: Tables, doc_id: str, version: int) -> Steps[tuple[object, str | None]]:
    """The content at ``version`` and the chain's link there, from its nearest snapshot.

    The caller has checked that ``version`` is below the head. Rows missing inside the kept
    range are damage (:class:`~hardening.HistoryCorrupted`), unless a compaction running
    meanwhile removed them: then the rebuild starts again from the new oldest snapshot.

    Raises:
        NotFoundError: ``version`` is older than the oldest kept one.
        HistoryCorrupted: a row is missing, does not parse or apply, or fails its digest.
    """
    attempt = 1
    while True:
        found = yield _snapshot(t, doc_id, version, nearest=True)
        if not found:
            if _single((yield _oldest(t, doc_id))) is None:
                raise HistoryCorrupted(doc_id, version, "no snapshot is stored")
            raise NotFoundError("DocumentVersion", (doc_id, version))  # compacted
        walk = t.walk(doc_id)
        walk.begin(Stored.of(found[0]))
        if walk.version == version:
            return walk.content(), walk.link
        rows = yield _patches(t, doc_id, walk.version, version)
        try:
            for row in rows:
                walk.patch(Stored.of(row))
            if walk.version != version:
                raise walk.fail(walk.version + 1, MISSING_ROW)
            return walk.content(), walk.link
        except HistoryCorrupted as problem:
            if problem.reason != MISSING_ROW or attempt == _ATTEMPTS:
                raise
            if _single((yield _oldest(t, doc_id))) == found[0].version:
                raise
            attempt += 1  # a compaction moved the start meanwhile: start again


def versions(t: Tables, doc_id: str) -> Steps[list[int]]:
    """The versions ``load`` can give: the head, and every older one whose rows are all there.

    A version is listed when every patch row from its nearest snapshot up to it exists, so a
    listed version never answers "not found". Rows that are there but damaged are found by
    ``load`` and ``verify``, not here: this reads version numbers only.

    Raises:
        NotFoundError: no such document.
    """
    head = _single((yield _head(t, doc_id)))
    if head is None:
        raise NotFoundError("Document", doc_id)
    snapshots = [row[0] for row in (yield _snapshot_versions(t, doc_id, 0, head))]
    if not snapshots:
        return [head]
    p = t.patches.c
    present = {
        row[0]
        for row in (
            yield sa.select(p.version).where(
                p.document_id == doc_id, p.version > snapshots[0], p.version <= head
            )
        )
    }
    kept = set(snapshots)
    listed: list[int] = []
    whole = False
    for version in range(snapshots[0], head):
        whole = version in kept or (whole and version in present)
        if whole:
            listed.append(version)
    listed.append(head)
    return listed


def verify(t: Tables, doc_id: str) -> Steps[HistoryReport]:
    """Walk the whole kept history: every row parsed, chained, replayed, and the head compared.

    Patch rows are read a page at a time and snapshots one at a time: memory holds the
    document being replayed, one snapshot and one page of patches.

    Raises:
        NotFoundError: no such document.
    """
    found = yield _head(t, doc_id)
    if not found:
        raise NotFoundError("Document", doc_id)
    head, head_digest = found[0].version, found[0].digest
    attempt = 1
    while True:
        oldest = _single((yield _oldest(t, doc_id)))
        walk = t.walk(doc_id)
        try:
            if oldest is None:
                raise walk.fail(head, "no snapshot is stored")
            yield from _walk(t, walk, doc_id, oldest, head)
            statement, read = t.head_content(doc_id)
            version, content = read((yield statement))
            if version == head:  # else saved meanwhile: the chain up to ``head`` is checked
                walk.head(head, head_digest, content)
            return HistoryReport(doc_id, head, walk.checked, walk.unchained, None)
        except HistoryCorrupted as problem:
            if problem.reason != MISSING_ROW or attempt == _ATTEMPTS:
                return HistoryReport(doc_id, head, walk.checked, walk.unchained, problem)
            if _single((yield _oldest(t, doc_id))) == oldest:
                return HistoryReport(doc_id, head, walk.checked, walk.unchained, problem)
            attempt += 1  # a compaction moved the start meanwhile: start again


def _walk(t: Tables, walk: Walk, doc_id: str, oldest: int, head: int) -> Steps[None]:
    start = yield _snapshot(t, doc_id, oldest, nearest=False)
    if not start:
        raise walk.fail(oldest, "its snapshot is missing")
    walk.begin(Stored.of(start[0]))
    while walk.version < head:
        after, upto = walk.version, min(walk.version + _PAGE, head)
        rows = yield _patches(t, doc_id, after, upto)
        snapshots = {row[0] for row in (yield _snapshot_versions(t, doc_id, after, upto))}
        for row in rows:
            walk.patch(Stored.of(row))
            if walk.version in snapshots:
                snapshot = yield _snapshot(t, doc_id, walk.version, nearest=False)
                if snapshot:  # else compacted meanwhile: nothing to compare
                    walk.snapshot(Stored.of(snapshot[0]))
        if walk.version != upto:
            raise walk.fail(walk.version + 1, MISSING_ROW)


def patches_since(
    t: Tables, doc_id: str, version: int, limit: int
) -> Steps[list[list[dict[str, object]]]]:
    """The stored patches from ``version`` to the head, parsed and checked against the chain.

    Raises:
        NotFoundError: no such document; or ``version`` is past the head, compacted away, or
            more than ``limit`` saves behind.
        HistoryCorrupted: a row inside the kept range is missing, garbage, or fails its digest.
    """
    h, p, s = t.heads.c, t.patches.c, t.snapshots.c
    head = sa.select(h.version).where(h.id == doc_id).scalar_subquery()
    anchor = sa.func.coalesce(
        sa.select(p.digest).where(p.document_id == doc_id, p.version == version).scalar_subquery(),
        sa.select(s.digest).where(s.document_id == doc_id, s.version == version).scalar_subquery(),
    )
    text = text_of(p.patch).label("text")
    rows = yield (
        sa.select(head.label("v"), anchor.label("anchor"), p.version, text, p.digest)
        .where(p.document_id == doc_id, p.version > version)
        .order_by(p.version)
        .limit(limit + 1)
    )
    if rows:
        head_version = rows[0].v
    else:
        head_version = _single((yield _head(t, doc_id)))
        if head_version is None:
            raise NotFoundError("Document", doc_id)
    if version > head_version or len(rows) > limit or head_version - version > limit:
        raise NotFoundError("DocumentVersion", (doc_id, version))  # past the head, or too many
    walk = t.walk(doc_id)
    walk.version, walk.link = version, rows[0].anchor if rows else None
    patches: list[list[dict[str, object]]] = []
    try:
        for row in rows:
            patches.append(_chained(walk, Stored.of(row)))
        if walk.version != head_version:
            raise walk.fail(walk.version + 1, MISSING_ROW)
    except HistoryCorrupted as problem:
        if problem.reason != MISSING_ROW:
            raise
        oldest = _single((yield _oldest(t, doc_id)))
        if oldest is not None and version >= oldest:
            raise
        raise NotFoundError("DocumentVersion", (doc_id, version)) from None  # compacted
    return patches


def _chained(walk: Walk, row: Stored) -> list[dict[str, object]]:
    """A patch row parsed and checked against the chain, without replaying it."""
    value = walk.check(row)
    if not isinstance(value, list):
        raise walk.fail(row.version, "its patch row is not a JSON Patch")
    return value


# --- running the steps ----------------------------------------------------------------------


def run(db: Session | sa.Connection, steps: Steps[T]) -> T:
    """Run steps on a blocking ``Session`` or ``Connection``."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send(db.execute(statement).all())
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(db: AsyncSession | AsyncConnection, steps: Steps[T]) -> T:
    """Run steps on an ``AsyncSession`` or ``AsyncConnection``."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send((await db.execute(statement)).all())
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def document_ids(engine: sa.Engine, heads: sa.Table, *, page: int = 500) -> Iterator[str]:
    """Every document id in ``heads``, in order, a page (one short transaction) at a time.

    Raises:
        BackendUnavailable: the database could not be reached or timed out.
    """
    after: str | None = None
    while True:
        ids = _id_page(engine, heads, after, page)
        yield from ids
        if len(ids) < page:
            return
        after = ids[-1]


@sql_unavailable
def _id_page(engine: sa.Engine, heads: sa.Table, after: str | None, page: int) -> list[str]:
    query = sa.select(heads.c.id).order_by(heads.c.id).limit(page)
    if after is not None:
        query = query.where(heads.c.id > after)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


# --- schema ---------------------------------------------------------------------------------


def add_missing_columns(metadata: sa.MetaData, connection: sa.Connection, **kw: Any) -> None:
    """Add the nullable columns an existing table lacks (``create_all``'s ``after_create``).

    ``create_all`` creates missing tables but never changes an existing one: a database made
    before the digest columns would fail every statement naming them. Only nullable columns
    are added (rows written before keep ``NULL``: unchained).
    """
    created = set(kw.get("tables") or ())
    inspector = sa.inspect(connection)
    dialect = connection.dialect
    quote = dialect.identifier_preparer
    guard = " IF NOT EXISTS" if dialect.name == "postgresql" else ""  # concurrent upgrades
    for table in metadata.sorted_tables:
        if table in created or not inspector.has_table(table.name, schema=table.schema):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=dialect)
                connection.execute(
                    sa.text(
                        f"ALTER TABLE {quote.format_table(table)} ADD COLUMN{guard} "
                        f"{quote.quote(column.name)} {kind}"
                    )
                )
