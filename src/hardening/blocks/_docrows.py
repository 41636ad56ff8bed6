"""The SQL side of ``DocumentHistory``: its three tables and the statements both drivers run.

- ``hardening_documents``: the head row, one per document: ``id``, ``content`` (JSON),
  ``version`` (the :class:`~hardening.Versioned` optimistic-lock column), the bookkeeping the
  :class:`~hardening.SnapshotPolicy` needs (last snapshot's size, patches and bytes since) and
  ``digest``, the checksum chain's link at the head (``_chain.py``).
- ``hardening_document_patches``: ``(document_id, version)`` → the patch that produced that
  version from the one before (JSON), its operation count, size and chain ``digest``.
- ``hardening_document_snapshots``: ``(document_id, version)`` → the full content at that
  version (JSON), its size, the chain's ``digest`` there and its ``content_digest``.

Also the checks and errors both drivers (and ``BlockHistory``) share around those rows: which
ids and versions could exist, and which database errors mean a transaction lost a race.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening._sql import lost_race
from hardening.blocks import _integrity
from hardening.blocks._chain import DocumentReplay, content_digest, link
from hardening.blocks._integrity import Rows, Tables, add_missing_columns, digest_column, text_of
from hardening.blocks._json import storable
from hardening.errors import ConfigurationError, ConflictError, HistoryCorrupted, NotFoundError
from hardening.locking import Versioned, _report

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from hardening.metrics import Metrics

__all__ = [
    "TABLES",
    "Document",
    "Head",
    "HistoryBase",
    "aborted",
    "check_base",
    "check_id",
    "check_version",
    "compaction",
    "documents",
    "exists",
    "head",
    "head_content",
    "insert_document",
    "insert_patch",
    "insert_snapshot",
    "json_bytes",
    "kept",
    "not_found",
    "patches",
    "race_conflict",
    "rebuild",
    "rebuild_async",
    "select_head",
    "select_oldest",
    "select_snapshot_at",
    "select_version",
    "snapshots",
]


class HistoryBase(DeclarativeBase):
    """The declarative base of the history tables; its ``metadata`` holds all three."""

    metadata = sa.MetaData()


class Document(Versioned, HistoryBase):
    """The head row of a document: its current content and version."""

    __tablename__ = "hardening_documents"

    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    content: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    snapshot_bytes: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    patches_since_snapshot: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    patch_bytes_since_snapshot: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    # the chain's link at ``version`` (NULL: saved before the chain existed)
    digest: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)


def _child(name: str, *columns: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        name,
        HistoryBase.metadata,
        sa.Column(
            "document_id",
            sa.String(255),
            sa.ForeignKey("hardening_documents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True),
        *columns,
    )


documents: sa.Table = Document.__table__  # type: ignore[assignment]
patches = _child(
    "hardening_document_patches",
    sa.Column("patch", sa.JSON, nullable=False),
    sa.Column("operations", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    digest_column(),
)
snapshots = _child(
    "hardening_document_snapshots",
    sa.Column("content", sa.JSON, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    digest_column(),
    digest_column("content_digest"),
)
# ``create_all`` (and so ``create_schema``) adds the columns an older database lacks
sa.event.listen(HistoryBase.metadata, "after_create", add_missing_columns)


@dataclass(frozen=True)
class Head:
    """The head row, as read at the start of a save."""

    version: int
    content: object
    snapshot_bytes: int
    patches_since: int
    patch_bytes_since: int
    digest: str | None


def select_version(doc_id: str) -> sa.Select[Any]:
    return sa.select(documents.c.version).where(documents.c.id == doc_id)


def select_head(doc_id: str, *, lock: bool = False) -> sa.Select[Any]:
    """The head row; ``lock``: held (``FOR UPDATE``) until the transaction ends."""
    columns = documents.c
    query = sa.select(
        columns.version,
        columns.content,
        columns.snapshot_bytes,
        columns.patches_since_snapshot,
        columns.patch_bytes_since_snapshot,
        columns.digest,
    ).where(columns.id == doc_id)
    return query.with_for_update() if lock else query


def head(row: Any, doc_id: str) -> Head:
    if row is None:
        raise NotFoundError("Document", doc_id)
    return Head(
        version=row.version,
        content=row.content,
        snapshot_bytes=row.snapshot_bytes,
        patches_since=row.patches_since_snapshot,
        patch_bytes_since=row.patch_bytes_since_snapshot,
        digest=row.digest,
    )


def select_oldest(doc_id: str) -> sa.Select[Any]:
    return sa.select(sa.func.min(snapshots.c.version)).where(snapshots.c.document_id == doc_id)


def select_snapshot_at(doc_id: str, version: int) -> sa.Select[Any]:
    return sa.select(snapshots.c.version).where(
        snapshots.c.document_id == doc_id, snapshots.c.version == version
    )


def insert_document(doc_id: str, content: object, payload: bytes) -> sa.Insert:
    return sa.insert(Document).values(
        id=doc_id,
        content=content,
        version=1,
        snapshot_bytes=len(payload),
        patches_since_snapshot=0,
        patch_bytes_since_snapshot=0,
        digest=link(None, 1, payload),
    )


def insert_snapshot(
    doc_id: str, version: int, content: object, payload: bytes, chain: str | None
) -> sa.Insert:
    """A snapshot row: ``payload`` is the content's compact JSON, ``chain`` the link there."""
    return sa.insert(snapshots).values(
        document_id=doc_id,
        version=version,
        content=content,
        size_bytes=len(payload),
        digest=chain,
        content_digest=content_digest(payload),
    )


def insert_patch(
    doc_id: str, version: int, stored: list[dict[str, object]], size: int, digest: str
) -> sa.Insert:
    return sa.insert(patches).values(
        document_id=doc_id,
        version=version,
        patch=stored,
        operations=len(stored),
        size_bytes=size,
        digest=digest,
    )


def head_content(doc_id: str) -> tuple[sa.Select[Any], Callable[[Rows], tuple[int, object]]]:
    """``verify``'s read of the head: its version and content."""
    columns = documents.c
    query = sa.select(columns.version, text_of(columns.content).label("text"))

    def read(rows: Rows) -> tuple[int, object]:
        if not rows:  # deleted meanwhile: nothing to compare
            return 0, None
        try:
            return rows[0].version, json.loads(rows[0].text)
        except (ValueError, RecursionError) as exc:
            raise HistoryCorrupted(doc_id, rows[0].version, "its head row is not JSON") from exc

    return query.where(columns.id == doc_id), read


TABLES = Tables(
    heads=documents,
    patches=patches,
    snapshots=snapshots,
    start=DocumentReplay,
    exact=False,
    head_content=head_content,
)


def compaction(doc_id: str, floor: int) -> tuple[sa.Delete, sa.Delete]:
    return (
        sa.delete(snapshots).where(snapshots.c.document_id == doc_id, snapshots.c.version < floor),
        sa.delete(patches).where(patches.c.document_id == doc_id, patches.c.version <= floor),
    )


def json_bytes(value: object) -> bytes:
    """A document's compact JSON (its size, and what its digest covers)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# --- ids, versions, lost races, rebuilds (both drivers; ``BlockHistory`` shares the checks) --


def check_id(doc_id: object) -> str:
    """A document id that could exist; else the document is simply not found (404).

    Ids come from URLs: NUL (which PostgreSQL cannot store), a lone surrogate (which no
    database can) or an over-long id must not reach the database as an error.
    """
    if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= 255 or not storable(doc_id):
        raise NotFoundError("Document", doc_id if isinstance(doc_id, str) else repr(doc_id))
    return doc_id


def check_version(doc_id: str, version: int, head_version: int | None) -> None:
    """Refuse versions that cannot exist before touching the store (no huge ranges)."""
    if head_version is None:
        raise not_found(doc_id)
    if not 1 <= version < head_version:
        raise NotFoundError("DocumentVersion", (doc_id, version))


def check_base(base_version: object) -> None:
    if base_version is not None and type(base_version) is not int:
        raise ConfigurationError(f"base_version must be an int or None, not {base_version!r}")


def exists(doc_id: str) -> ConflictError:
    return ConflictError("Document", doc_id, expected_version=None, current_version=None)


def not_found(doc_id: str) -> NotFoundError:
    return NotFoundError("Document", doc_id)


def kept(doc_id: str, head: int, oldest: int | None) -> int:
    """The oldest kept version; a history without any snapshot is damaged."""
    if oldest is None:
        raise HistoryCorrupted(doc_id, head, "no snapshot is stored")
    return oldest


def rebuild(db: Session | sa.Connection, doc_id: str, version: int) -> tuple[object, str | None]:
    """The content at ``version`` and the chain's link there (its snapshot, then patches)."""
    return _integrity.run(db, _integrity.rebuild(TABLES, doc_id, version))


async def rebuild_async(
    db: AsyncSession | AsyncConnection, doc_id: str, version: int
) -> tuple[object, str | None]:
    return await _integrity.run_async(db, _integrity.rebuild(TABLES, doc_id, version))


def aborted(conflict: ConflictError) -> bool:
    """Whether ``conflict`` is a lost race that aborted its transaction (40001, 40P01)."""
    return conflict.__cause__ is not None and lost_race(conflict.__cause__)


def rerun_or_raise(
    exc: Exception,
    *,
    mine: bool,
    attempt: int,
    retries: int,
    doc_id: str,
    base_version: int | None,
    metrics: Metrics | None,
) -> None:
    """Return when the transaction that raised ``exc`` should run again; else raise.

    A lost race (serialization failure, deadlock) in a transaction of the history's own
    (``mine``) is run again while ``attempt < retries``; once they are spent, or in a caller's
    transaction, it is raised as a ``ConflictError``. Anything else is raised as it is.
    """
    conflict = race_conflict(exc, doc_id, base_version, metrics)
    if conflict is None:
        raise exc
    if not mine or attempt >= retries:
        if conflict is exc:
            raise exc
        raise conflict from exc


def race_conflict(
    exc: Exception, doc_id: str, base_version: int | None, metrics: Metrics | None
) -> ConflictError | None:
    """The conflict a serialization failure or deadlock stands for (``None``: not one).

    Raised inside ``update_versioned`` it is already a ``ConflictError`` (from the driver's
    error); raised by another statement or by the commit, it becomes one here.
    """
    if isinstance(exc, ConflictError):
        return exc if aborted(exc) else None
    if not lost_race(exc):
        return None
    error = ConflictError("Document", doc_id, expected_version=base_version, current_version=None)
    return _report(error, metrics, None)
