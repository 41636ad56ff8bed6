"""``DocumentHistory``: a document's head, its patches and snapshots in SQL; any version rebuilt.

Three tables (in :attr:`DocumentHistory.metadata`, for your migrations):

- ``hardening_documents``: the head row, one per document: ``id``, ``content`` (JSON),
  ``version`` (the :class:`~hardening.Versioned` optimistic-lock column) and the bookkeeping
  the :class:`SnapshotPolicy` needs (last snapshot's size, patches and bytes since).
- ``hardening_document_patches``: ``(document_id, version)`` → the patch that produced that
  version from the one before (JSON), its operation count and size.
- ``hardening_document_snapshots``: ``(document_id, version)`` → the full content at that
  version (JSON) and its size. Version 1 always has one, until compaction.

A save is one transaction: read the head, apply (or merge) the patch in memory, one
``update_versioned`` on the head row, one patch row, a snapshot row when the policy says so.
``DocumentHistory`` and ``AsyncDocumentHistory`` share all of that but the I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from hardening._imports import require
from hardening._sql import lost_race, sql_unavailable
from hardening.blocks._json import storable
from hardening.blocks.patch import (
    DEFAULT_LIMITS,
    PatchLimits,
    _Checker,
    apply_patch,
    apply_trusted,
    patch_size,
    validate_patch,
)
from hardening.blocks.policy import SnapshotPolicy, compaction_floor
from hardening.blocks.rebase import merge_patch
from hardening.errors import ConfigurationError, ConflictError, NotFoundError

require("sqlalchemy", extra="sqlalchemy", feature="hardening.DocumentHistory")

import sqlalchemy as sa  # noqa: E402 - after the check that names the extra
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

from hardening.locking import (  # noqa: E402
    Versioned,
    _report,
    update_versioned,
    update_versioned_async,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    from hardening.metrics import Metrics

__all__ = [
    "AsyncDocumentHistory",
    "ConflictPolicy",
    "Document",
    "DocumentHistory",
    "DocumentVersion",
    "HistoryBase",
]

T = TypeVar("T")
ConflictPolicy = Literal["reject", "rebase", "last-write-wins"]
Executor = Session | sa.Connection
_CONFLICT_POLICIES = ("reject", "rebase", "last-write-wins")


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


def _child_table(name: str, *columns: sa.Column[Any]) -> sa.Table:
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


_documents = Document.__table__
_patches = _child_table(
    "hardening_document_patches",
    sa.Column("patch", sa.JSON, nullable=False),
    sa.Column("operations", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
)
_snapshots = _child_table(
    "hardening_document_snapshots",
    sa.Column("content", sa.JSON, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class DocumentVersion:
    """One version of a document, as loaded.

    Attributes:
        doc_id: the document's id.
        version: the version (send it as the ``ETag``: :func:`~hardening.etag_for`).
        content: the JSON content at that version (a fresh object, yours to change).
    """

    doc_id: str
    version: int
    content: object


@dataclass(frozen=True)
class _Head:
    """The head row, as read at the start of a save."""

    version: int
    content: object
    snapshot_bytes: int
    patches_since: int
    patch_bytes_since: int


@dataclass(frozen=True)
class _Save:
    """What one save writes: the head row's new values, the patch row, maybe a snapshot."""

    content: object
    stored: list[dict[str, object]]
    size: int
    values: dict[str, object]
    snapshot_bytes: int | None


# --- statements (shared by both drivers) -------------------------------------------------


def _select_version(doc_id: str) -> sa.Select[Any]:
    return sa.select(_documents.c.version).where(_documents.c.id == doc_id)


def _select_head(doc_id: str, *, lock: bool = False) -> sa.Select[Any]:
    """The head row; ``lock``: held (``FOR UPDATE``) until the transaction ends."""
    columns = _documents.c
    query = sa.select(
        columns.version,
        columns.content,
        columns.snapshot_bytes,
        columns.patches_since_snapshot,
        columns.patch_bytes_since_snapshot,
    ).where(columns.id == doc_id)
    return query.with_for_update() if lock else query


def _head(row: Any, doc_id: str) -> _Head:
    if row is None:
        raise NotFoundError("Document", doc_id)
    return _Head(
        version=row.version,
        content=row.content,
        snapshot_bytes=row.snapshot_bytes,
        patches_since=row.patches_since_snapshot,
        patch_bytes_since=row.patch_bytes_since_snapshot,
    )


def _select_snapshot(doc_id: str, version: int) -> sa.Select[Any]:
    """The nearest snapshot at or below ``version``."""
    return (
        sa.select(_snapshots.c.version, _snapshots.c.content)
        .where(_snapshots.c.document_id == doc_id, _snapshots.c.version <= version)
        .order_by(_snapshots.c.version.desc())
        .limit(1)
    )


def _select_patches(doc_id: str, after: int, upto: int) -> sa.Select[Any]:
    return (
        sa.select(_patches.c.version, _patches.c.patch)
        .where(
            _patches.c.document_id == doc_id,
            _patches.c.version > after,
            _patches.c.version <= upto,
        )
        .order_by(_patches.c.version)
    )


def _replay(snapshot: Any, rows: list[Any], doc_id: str, version: int) -> object:
    """The content at ``version`` from its snapshot row and the patch rows after it."""
    content: object = snapshot.content
    expected = range(snapshot.version + 1, version + 1)  # a range object: no allocation
    if len(rows) != len(expected) or any(
        r.version != v for r, v in zip(rows, expected, strict=True)
    ):
        raise NotFoundError("DocumentVersion", (doc_id, version))  # past the head, or compacted
    for row in rows:
        content = apply_trusted(content, row.patch)  # a fresh parse: ours to change in place
    return content


def _select_oldest(doc_id: str) -> sa.Select[Any]:
    return sa.select(sa.func.min(_snapshots.c.version)).where(_snapshots.c.document_id == doc_id)


def _select_snapshot_at(doc_id: str, version: int) -> sa.Select[Any]:
    return sa.select(_snapshots.c.version).where(
        _snapshots.c.document_id == doc_id, _snapshots.c.version == version
    )


def _insert_document(doc_id: str, content: object, size: int) -> sa.Insert:
    return sa.insert(Document).values(
        id=doc_id,
        content=content,
        version=1,
        snapshot_bytes=size,
        patches_since_snapshot=0,
        patch_bytes_since_snapshot=0,
    )


def _insert_snapshot(doc_id: str, version: int, content: object, size: int) -> sa.Insert:
    return sa.insert(_snapshots).values(
        document_id=doc_id, version=version, content=content, size_bytes=size
    )


def _insert_patch(doc_id: str, version: int, save: _Save) -> sa.Insert:
    return sa.insert(_patches).values(
        document_id=doc_id,
        version=version,
        patch=save.stored,
        operations=len(save.stored),
        size_bytes=save.size,
    )


def _compaction(doc_id: str, floor: int) -> tuple[sa.Delete, sa.Delete]:
    return (
        sa.delete(_snapshots).where(
            _snapshots.c.document_id == doc_id, _snapshots.c.version < floor
        ),
        sa.delete(_patches).where(_patches.c.document_id == doc_id, _patches.c.version <= floor),
    )


def _json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _block_count(content: object) -> int | None:
    if isinstance(content, list):
        return len(content)
    if isinstance(content, dict) and isinstance(content.get("blocks"), list):
        return len(content["blocks"])
    return None


def _exists(doc_id: str) -> ConflictError:
    return ConflictError("Document", doc_id, expected_version=None, current_version=None)


def _not_found(doc_id: str) -> NotFoundError:
    return NotFoundError("Document", doc_id)


def _check_version(doc_id: str, version: int, head_version: int | None) -> None:
    """Refuse versions that cannot exist before touching the store (no huge ranges)."""
    if head_version is None:
        raise _not_found(doc_id)
    if not 1 <= version < head_version:
        raise NotFoundError("DocumentVersion", (doc_id, version))


def _check_base(base_version: object) -> None:
    if base_version is not None and type(base_version) is not int:
        raise ConfigurationError(f"base_version must be an int or None, not {base_version!r}")


def _aborted(conflict: ConflictError) -> bool:
    """Whether ``conflict`` is a lost race that aborted its transaction (40001, 40P01)."""
    return conflict.__cause__ is not None and lost_race(conflict.__cause__)


def _race_conflict(
    exc: Exception, doc_id: str, base_version: int | None, metrics: Metrics | None
) -> ConflictError | None:
    """The conflict a serialization failure or deadlock stands for (``None``: not one).

    Raised inside ``update_versioned`` it is already a ``ConflictError`` (from the driver's
    error); raised by another statement or by the commit, it becomes one here.
    """
    if isinstance(exc, ConflictError):
        return exc if _aborted(exc) else None
    if not lost_race(exc):
        return None
    error = ConflictError("Document", doc_id, expected_version=base_version, current_version=None)
    return _report(error, metrics, None)


def _check_id(doc_id: object) -> str:
    """A document id that could exist; else the document is simply not found (404).

    Ids come from URLs: NUL (which PostgreSQL cannot store), a lone surrogate (which no
    database can) or an over-long id must not reach the database as an error.
    """
    if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= 255 or not storable(doc_id):
        raise NotFoundError("Document", doc_id if isinstance(doc_id, str) else repr(doc_id))
    return doc_id


# --- the logic both drivers share --------------------------------------------------------


class _HistoryBase:
    """Everything but I/O: options, checks, the save plan, snapshot bookkeeping, metrics."""

    metadata: ClassVar[sa.MetaData] = HistoryBase.metadata
    """The three tables, for ``create_all`` or your migrations (Alembic autogenerate)."""

    def __init__(
        self,
        *,
        snapshots: SnapshotPolicy | None,
        conflict: ConflictPolicy,
        limits: PatchLimits | None,
        id_key: str,
        metrics: Metrics | None,
        retries: int,
    ) -> None:
        if conflict not in _CONFLICT_POLICIES:
            raise ConfigurationError(f"conflict must be one of {_CONFLICT_POLICIES}")
        if type(retries) is not int or retries < 0:
            raise ConfigurationError("retries must be an int >= 0")
        self.snapshots = snapshots or SnapshotPolicy()
        self.conflict: ConflictPolicy = conflict
        self.limits = limits
        self.id_key = id_key
        self.metrics = metrics
        self.retries = retries

    def _new_document(self, doc_id: str, content: object) -> int:
        """Check a new document's id and content; return the content's size."""
        if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= 255 or not storable(doc_id):
            raise ConfigurationError(
                "a document id is a string of 1 to 255 characters (valid Unicode, no NUL)"
            )
        limits = self.limits and dataclasses.replace(self.limits, max_bytes=2**62)
        _Checker(limits).value(content, 0, None, None)  # a document may outweigh a patch
        return _json_size(content)

    def _incoming(self, patch: object, base_version: int | None) -> list[dict[str, object]]:
        _check_base(base_version)
        return validate_patch(patch, limits=self.limits)

    def _needs_base(self, doc_id: str, head: _Head, base_version: int | None) -> bool:
        """Whether the save must merge against ``base_version`` (else it applies to head)."""
        if base_version is None or base_version == head.version:
            return False
        if self.conflict == "reject" or not 1 <= base_version < head.version:
            raise self._stale(doc_id, head.version, base_version)
        return True

    def _stale(self, doc_id: str, head_version: int, base_version: int) -> ConflictError:
        error = ConflictError(
            "Document", doc_id, expected_version=base_version, current_version=head_version
        )
        return _report(error, self.metrics, None)

    def _plan(self, head: _Head, ops: list[dict[str, object]], base: object) -> _Save:
        """Apply (or merge) the patch and work out everything the save writes."""
        if base is _NO_BASE:
            content: object = apply_patch(head.content, ops, limits=self.limits, in_place=True)
            stored = ops
        else:
            content, stored = merge_patch(
                ops,
                base=base,
                head=head.content,
                id_key=self.id_key,
                limits=self.limits,
                prefer_patch=self.conflict == "last-write-wins",
            )
        size = patch_size(stored)
        patches = head.patches_since + 1
        patch_bytes = head.patch_bytes_since + size
        if self.snapshots.due(
            patches=patches, patch_bytes=patch_bytes, snapshot_bytes=head.snapshot_bytes
        ):
            snapshot_bytes = _json_size(content)
            values: dict[str, object] = {
                "content": content,
                "snapshot_bytes": snapshot_bytes,
                "patches_since_snapshot": 0,
                "patch_bytes_since_snapshot": 0,
            }
            return _Save(content, stored, size, values, snapshot_bytes)
        values = {
            "content": content,
            "patches_since_snapshot": patches,
            "patch_bytes_since_snapshot": patch_bytes,
        }
        return _Save(content, stored, size, values, None)

    def _retry(self, attempt: int, base_version: int | None) -> bool:
        """Whether a save that lost the race for the head row should read it again.

        A save with a base re-merges (merging policies only; ``"reject"`` refuses the stale
        base); one without applies to whatever the head now is.
        """
        return (base_version is None or self.conflict != "reject") and attempt < self.retries

    def _saved(self, save: _Save) -> None:
        if self.metrics is not None:
            self.metrics.patch_applied(len(save.stored), save.size, _block_count(save.content))


_NO_BASE = object()


class _SyncDriver:
    """The blocking histories' engine and transaction plumbing (Document- and BlockHistory)."""

    engine: sa.Engine | None
    retries: int
    metrics: Metrics | None

    def _run(
        self,
        session: Executor | None,
        work: Callable[[Executor], T],
        *,
        doc_id: str,
        base_version: int | None,
        unit: Callable[[Executor | None], AbstractContextManager[Executor]] | None = None,
    ) -> T:
        """``work`` in a transaction; rerun from the start when the transaction loses a race.

        A serialization failure or deadlock (REPEATABLE READ, SERIALIZABLE; raised by any
        statement or by the commit) aborts the transaction: one of our own is run again, up
        to ``retries`` times, and the rerun reads the head anew (a false conflict then simply
        succeeds, a real one is judged by the conflict policy). A caller's transaction is
        theirs to roll back and rerun: the race is raised as a ``ConflictError``.
        """
        attempt = 0
        while True:
            try:
                with (unit or self._transaction)(session) as db:
                    return work(db)
            except Exception as exc:
                conflict = _race_conflict(exc, doc_id, base_version, self.metrics)
                if conflict is None:
                    raise
                if session is not None or attempt >= self.retries:
                    if conflict is exc:
                        raise
                    raise conflict from exc
                attempt += 1

    def _engine(self, engine: sa.Engine | None) -> sa.Engine:
        engine = engine or self.engine
        if engine is None:
            name = type(self).__name__
            raise ConfigurationError(f"{name} has no engine: pass session= (or engine)")
        return engine

    @contextmanager
    def _transaction(self, session: Executor | None) -> Iterator[Executor]:
        """``session`` as it is (the caller commits), or a transaction of our own."""
        if session is not None:
            yield session
            return
        with self._engine(None).begin() as conn:
            yield conn


class DocumentHistory(_SyncDriver, _HistoryBase):
    """Versioned documents edited by JSON Patch, every version kept rebuildable.

    Args:
        engine: the SQLAlchemy engine to open a transaction on for each call that is not
            given ``session=``; may be ``None`` if every call is.
        snapshots: when to store a full snapshot next to the patches (default:
            ``SnapshotPolicy()``, every 10 patches or once they outweigh a snapshot).
        conflict: what ``save`` does when ``base_version`` is behind the head:
            ``"reject"`` raises :class:`~hardening.ConflictError` (409); ``"rebase"`` merges
            the patch into the head (see :func:`~hardening.rebase`) and raises
            :class:`~hardening.PatchConflict` (409) only for a true conflict;
            ``"last-write-wins"`` merges the same way but lets the incoming patch win every
            conflict.
        limits: the bounds incoming patches (and new documents) must respect; ``None`` for
            none.
        id_key: the member holding each block's id.
        metrics: a registry for ``patch_applied`` (operations, bytes, blocks) and conflicts.
        retries: with ``"rebase"`` or ``"last-write-wins"`` (or ``base_version=None``), how
            many times a save that lost the race for the head row re-reads it and merges
            again before raising; and, under every policy, how many times a save in a
            transaction of its own that the database aborted as a lost race (serialization
            failure or deadlock, under ``REPEATABLE READ``/``SERIALIZABLE``) is run again.

    Raises:
        ConfigurationError: an unknown conflict policy or a negative ``retries``.
    """

    def __init__(
        self,
        engine: sa.Engine | None = None,
        *,
        snapshots: SnapshotPolicy | None = None,
        conflict: ConflictPolicy = "reject",
        limits: PatchLimits | None = DEFAULT_LIMITS,
        id_key: str = "id",
        metrics: Metrics | None = None,
        retries: int = 3,
    ) -> None:
        super().__init__(
            snapshots=snapshots,
            conflict=conflict,
            limits=limits,
            id_key=id_key,
            metrics=metrics,
            retries=retries,
        )
        self.engine = engine

    @sql_unavailable
    def create_schema(self, engine: sa.Engine | None = None) -> None:
        """Create the three tables if they do not exist (tests, prototypes; else migrations).

        Args:
            engine: the engine to create them on (default: this history's).

        Raises:
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        HistoryBase.metadata.create_all(self._engine(engine))

    @sql_unavailable
    def create(self, doc_id: str, content: object, *, session: Executor | None = None) -> int:
        """Store a new document at version 1, with its first snapshot.

        Args:
            doc_id: the document's id (1 to 255 characters).
            content: its JSON content, within ``limits`` (depth, strings, arrays).
            session: run in this ``Session``/``Connection``'s transaction (not committed).

        Returns:
            ``1``, the first version.

        Raises:
            ConflictError: a document with this id already exists.
            ConfigurationError: ``doc_id`` is not 1 to 255 characters of valid Unicode without
                NUL.
            InvalidPatch: ``content`` is not JSON (or holds a lone surrogate).
            PatchLimitExceeded: ``content`` exceeds ``limits``.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        size = self._new_document(doc_id, content)

        def insert(db: Executor) -> int:
            if db.execute(_select_version(doc_id)).first() is not None:
                raise _exists(doc_id)
            try:
                db.execute(_insert_document(doc_id, content, size))
            except sa.exc.IntegrityError as exc:  # created concurrently
                raise _exists(doc_id) from exc
            db.execute(_insert_snapshot(doc_id, 1, content, size))
            return 1

        # SERIALIZABLE reports a concurrent create as a serialization failure: the rerun
        # finds the document and says so
        return self._run(session, insert, doc_id=doc_id, base_version=None)

    @sql_unavailable
    def save(
        self,
        doc_id: str,
        patch: object,
        *,
        base_version: int | None,
        session: Executor | None = None,
    ) -> int:
        """Apply a patch written against ``base_version``; return the new version.

        In one transaction: read the head; if ``base_version`` is the head's version apply the
        patch, else follow the ``conflict`` policy; then bump the head row with
        :func:`~hardening.update_versioned` (so a concurrent save can never be lost), write the
        patch row and, when the snapshot policy says so, a snapshot. If the patch is refused
        nothing is written.

        ``base_version=None`` (``If-Match: *``, see :func:`~hardening.if_match_version`)
        applies the patch to the head as it is, under every conflict policy: the head row is
        read locked (``SELECT … FOR UPDATE``), so no other save lands between the read and the
        bump; the patch is checked against the head (its ``test`` operations too), never
        rebased, and the version still goes up by one.

        Under ``REPEATABLE READ`` or ``SERIALIZABLE`` the database may abort the transaction
        as a lost race (a serialization failure, or a deadlock): without ``session`` the save
        runs again in a new transaction (up to ``retries`` times), which judges the head
        anew; in the caller's ``session`` it raises :class:`~hardening.ConflictError` and the
        caller rolls back and retries (:func:`~hardening.retry_on_conflict`).

        Args:
            doc_id: the document's id.
            patch: the JSON Patch, as received (it is validated).
            base_version: the version the patch was written against (from ``If-Match``), or
                ``None`` to apply it to the head.
            session: run in this ``Session``/``Connection``'s transaction (not committed).

        Returns:
            The new version.

        Raises:
            NotFoundError: no such document (404).
            ConflictError: ``base_version`` is not the head's and the policy is ``"reject"``,
                or the base version is no longer kept, or the race for the head row was lost
                ``retries`` times, or the database aborted the transaction as a lost race
                (in ``session``, or ``retries`` times) (409).
            PatchConflict: the patch clashes with a concurrent edit (``"rebase"``; 409).
            PatchError: the patch is invalid, too large or does not apply (422/413/409).
            BackendUnavailable: the database could not be reached or timed out (503). Nothing
                was written, unless the connection broke as the transaction committed: then
                the save may have been stored. Reload before sending the patch again: under
                ``"reject"`` a resend with the old ``base_version`` is refused (409), but a
                merging policy would apply it twice.
        """
        doc_id = _check_id(doc_id)
        ops = self._incoming(patch, base_version)
        version, save = self._run(
            session,
            lambda db: self._save_in(db, doc_id, ops, base_version),
            doc_id=doc_id,
            base_version=base_version,
        )
        self._saved(save)
        return version

    def _save_in(
        self, db: Executor, doc_id: str, ops: list[dict[str, object]], base_version: int | None
    ) -> tuple[int, _Save]:
        """One attempt at a save, in ``db``'s transaction: the new version and what it wrote."""
        attempt = 0
        while True:
            row = db.execute(_select_head(doc_id, lock=base_version is None)).first()
            head = _head(row, doc_id)
            base = _NO_BASE
            if base_version is not None and self._needs_base(doc_id, head, base_version):
                try:
                    base = _rebuild(db, doc_id, base_version)
                except NotFoundError:  # compacted away: nothing to merge against
                    raise self._stale(doc_id, head.version, base_version) from None
            save = self._plan(head, ops, base)
            try:
                version = update_versioned(
                    db, Document, doc_id, head.version, save.values, metrics=self.metrics
                )
                break
            except ConflictError as exc:
                if _aborted(exc) or not self._retry(attempt, base_version):
                    raise
                attempt += 1
        db.execute(_insert_patch(doc_id, version, save))
        if save.snapshot_bytes is not None:
            db.execute(_insert_snapshot(doc_id, version, save.content, save.snapshot_bytes))
        return version, save

    @sql_unavailable
    def load(
        self, doc_id: str, version: int | None = None, *, session: Executor | None = None
    ) -> DocumentVersion:
        """Load the head, or rebuild any kept version from its nearest snapshot and patches.

        Args:
            doc_id: the document's id.
            version: the version to rebuild (default: the head, read directly).
            session: run in this ``Session``/``Connection``'s transaction.

        Returns:
            The version and its content.

        Raises:
            NotFoundError: no such document, or that version is not (or no longer) kept.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        if version is not None and type(version) is not int:
            raise ConfigurationError(f"version must be an int, not {version!r}")
        with self._transaction(session) as db:
            if version is not None:
                head_version = db.execute(_select_version(doc_id)).scalar_one_or_none()
                if version != head_version:
                    _check_version(doc_id, version, head_version)
                    return DocumentVersion(doc_id, version, _rebuild(db, doc_id, version))
            head = _head(db.execute(_select_head(doc_id)).first(), doc_id)
            return DocumentVersion(doc_id, head.version, head.content)

    @sql_unavailable
    def versions(self, doc_id: str, *, session: Executor | None = None) -> list[int]:
        """The versions ``load`` can rebuild, oldest first.

        Args:
            doc_id: the document's id.
            session: run in this ``Session``/``Connection``'s transaction.

        Returns:
            Every version from the oldest kept one to the head.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        with self._transaction(session) as db:
            head = db.execute(_select_version(doc_id)).scalar_one_or_none()
            if head is None:
                raise _not_found(doc_id)
            return list(range(db.execute(_select_oldest(doc_id)).scalar_one(), head + 1))

    @sql_unavailable
    def compact(self, doc_id: str, *, keep: int, session: Executor | None = None) -> int:
        """Drop old patches and snapshots, keeping the ``keep`` latest versions rebuildable.

        A snapshot is written at the new oldest version first if there is none, then every
        snapshot below it and every patch up to it is deleted, in one transaction. Concurrent
        saves are unaffected (they only add newer rows).

        Args:
            doc_id: the document's id.
            keep: how many versions, counting the head, stay rebuildable (at least 1).
            session: run in this ``Session``/``Connection``'s transaction (not committed).

        Returns:
            The oldest version still rebuildable.

        Raises:
            NotFoundError: no such document.
            ConfigurationError: ``keep`` is not a positive int.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        with self._transaction(session) as db:
            head = db.execute(_select_version(doc_id)).scalar_one_or_none()
            if head is None:
                raise _not_found(doc_id)
            oldest = db.execute(_select_oldest(doc_id)).scalar_one()
            floor = compaction_floor(head=head, oldest=oldest, keep=keep)
            if floor == oldest:
                return floor
            if db.execute(_select_snapshot_at(doc_id, floor)).first() is None:
                content = _rebuild(db, doc_id, floor)
                db.execute(_insert_snapshot(doc_id, floor, content, _json_size(content)))
            for statement in _compaction(doc_id, floor):
                db.execute(statement)
            return floor


def _rebuild(db: Executor, doc_id: str, version: int) -> object:
    """The content at ``version``: its nearest snapshot at or below, plus the patches after."""
    snapshot = db.execute(_select_snapshot(doc_id, version)).first()
    if snapshot is None:
        raise NotFoundError("DocumentVersion", (doc_id, version))
    rows = []
    if snapshot.version != version:
        rows = list(db.execute(_select_patches(doc_id, snapshot.version, version)))
    return _replay(snapshot, rows, doc_id, version)


class AsyncDocumentHistory(_HistoryBase):
    """The asyncio twin of :class:`DocumentHistory`, on an ``AsyncEngine``.

    Same tables, options, semantics and errors; every method is a coroutine and ``session=``
    takes an ``AsyncSession`` or ``AsyncConnection``.

    Args:
        engine: the ``AsyncEngine`` for calls not given ``session=``.
        snapshots: when to store a full snapshot.
        conflict: ``"reject"``, ``"rebase"`` or ``"last-write-wins"``.
        limits: the bounds incoming patches must respect.
        id_key: the member holding each block's id.
        metrics: a registry for ``patch_applied`` and conflicts.
        retries: re-reads after losing the race for the head row (merging policies), and
            reruns of a transaction of its own the database aborted as a lost race.

    Raises:
        ConfigurationError: an unknown conflict policy or a negative ``retries``.
    """

    def __init__(
        self,
        engine: AsyncEngine | None = None,
        *,
        snapshots: SnapshotPolicy | None = None,
        conflict: ConflictPolicy = "reject",
        limits: PatchLimits | None = DEFAULT_LIMITS,
        id_key: str = "id",
        metrics: Metrics | None = None,
        retries: int = 3,
    ) -> None:
        super().__init__(
            snapshots=snapshots,
            conflict=conflict,
            limits=limits,
            id_key=id_key,
            metrics=metrics,
            retries=retries,
        )
        self.engine = engine

    @sql_unavailable
    async def create_schema(self, engine: AsyncEngine | None = None) -> None:
        """Create the three tables if they do not exist.

        Args:
            engine: the engine to create them on (default: this history's).

        Raises:
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        async with self._engine(engine).begin() as conn:
            await conn.run_sync(HistoryBase.metadata.create_all)

    @sql_unavailable
    async def create(
        self,
        doc_id: str,
        content: object,
        *,
        session: AsyncSession | AsyncConnection | None = None,
    ) -> int:
        """Store a new document at version 1 (see :meth:`DocumentHistory.create`).

        Args:
            doc_id: the document's id.
            content: its JSON content.
            session: run in this transaction (not committed).

        Returns:
            ``1``.

        Raises:
            ConflictError: a document with this id already exists.
            InvalidPatch: ``content`` is not JSON (or holds a lone surrogate).
            PatchLimitExceeded: ``content`` exceeds ``limits``.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        size = self._new_document(doc_id, content)

        async def insert(db: AsyncSession | AsyncConnection) -> int:
            if (await db.execute(_select_version(doc_id))).first() is not None:
                raise _exists(doc_id)
            try:
                await db.execute(_insert_document(doc_id, content, size))
            except sa.exc.IntegrityError as exc:
                raise _exists(doc_id) from exc
            await db.execute(_insert_snapshot(doc_id, 1, content, size))
            return 1

        return await self._run(session, insert, doc_id=doc_id, base_version=None)

    @sql_unavailable
    async def save(
        self,
        doc_id: str,
        patch: object,
        *,
        base_version: int | None,
        session: AsyncSession | AsyncConnection | None = None,
    ) -> int:
        """Apply a patch written against ``base_version`` (see :meth:`DocumentHistory.save`).

        Args:
            doc_id: the document's id.
            patch: the JSON Patch, as received.
            base_version: the version the patch was written against, or ``None`` to apply
                it to the head (locked).
            session: run in this transaction (not committed).

        Returns:
            The new version.

        Raises:
            NotFoundError: no such document.
            ConflictError: a stale base under ``"reject"``, a base no longer kept, the race
                lost ``retries`` times, or a transaction aborted as a lost race.
            PatchConflict: the patch clashes with a concurrent edit.
            PatchError: the patch is invalid, too large or does not apply.
            BackendUnavailable: the database could not be reached or timed out (503); as
                with :meth:`DocumentHistory.save`, a connection that broke at the commit may
                hide a stored save.
        """
        doc_id = _check_id(doc_id)
        ops = self._incoming(patch, base_version)
        version, save = await self._run(
            session,
            lambda db: self._save_in(db, doc_id, ops, base_version),
            doc_id=doc_id,
            base_version=base_version,
        )
        self._saved(save)
        return version

    async def _run(
        self,
        session: AsyncSession | AsyncConnection | None,
        work: Callable[[AsyncSession | AsyncConnection], Awaitable[T]],
        *,
        doc_id: str,
        base_version: int | None,
    ) -> T:
        """``work`` in a transaction, rerun on a lost race (see ``DocumentHistory._run``)."""
        attempt = 0
        while True:
            try:
                async with self._transaction(session) as db:
                    return await work(db)
            except Exception as exc:
                conflict = _race_conflict(exc, doc_id, base_version, self.metrics)
                if conflict is None:
                    raise
                if session is not None or attempt >= self.retries:
                    if conflict is exc:
                        raise
                    raise conflict from exc
                attempt += 1

    async def _save_in(
        self,
        db: AsyncSession | AsyncConnection,
        doc_id: str,
        ops: list[dict[str, object]],
        base_version: int | None,
    ) -> tuple[int, _Save]:
        attempt = 0
        while True:
            row = (await db.execute(_select_head(doc_id, lock=base_version is None))).first()
            head = _head(row, doc_id)
            base = _NO_BASE
            if base_version is not None and self._needs_base(doc_id, head, base_version):
                try:
                    base = await _rebuild_async(db, doc_id, base_version)
                except NotFoundError:
                    raise self._stale(doc_id, head.version, base_version) from None
            save = self._plan(head, ops, base)
            try:
                version = await update_versioned_async(
                    db, Document, doc_id, head.version, save.values, metrics=self.metrics
                )
                break
            except ConflictError as exc:
                if _aborted(exc) or not self._retry(attempt, base_version):
                    raise
                attempt += 1
        await db.execute(_insert_patch(doc_id, version, save))
        if save.snapshot_bytes is not None:
            await db.execute(_insert_snapshot(doc_id, version, save.content, save.snapshot_bytes))
        return version, save

    @sql_unavailable
    async def load(
        self,
        doc_id: str,
        version: int | None = None,
        *,
        session: AsyncSession | AsyncConnection | None = None,
    ) -> DocumentVersion:
        """Load the head or rebuild a kept version (see :meth:`DocumentHistory.load`).

        Args:
            doc_id: the document's id.
            version: the version to rebuild (default: the head).
            session: run in this transaction.

        Returns:
            The version and its content.

        Raises:
            NotFoundError: no such document, or that version is not kept.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        if version is not None and type(version) is not int:
            raise ConfigurationError(f"version must be an int, not {version!r}")
        async with self._transaction(session) as db:
            if version is not None:
                head_version = (await db.execute(_select_version(doc_id))).scalar_one_or_none()
                if version != head_version:
                    _check_version(doc_id, version, head_version)
                    content = await _rebuild_async(db, doc_id, version)
                    return DocumentVersion(doc_id, version, content)
            head = _head((await db.execute(_select_head(doc_id))).first(), doc_id)
            return DocumentVersion(doc_id, head.version, head.content)

    @sql_unavailable
    async def versions(
        self, doc_id: str, *, session: AsyncSession | AsyncConnection | None = None
    ) -> list[int]:
        """The versions ``load`` can rebuild, oldest first.

        Args:
            doc_id: the document's id.
            session: run in this transaction.

        Returns:
            Every version from the oldest kept one to the head.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        async with self._transaction(session) as db:
            head = (await db.execute(_select_version(doc_id))).scalar_one_or_none()
            if head is None:
                raise _not_found(doc_id)
            oldest = (await db.execute(_select_oldest(doc_id))).scalar_one()
            return list(range(oldest, head + 1))

    @sql_unavailable
    async def compact(
        self,
        doc_id: str,
        *,
        keep: int,
        session: AsyncSession | AsyncConnection | None = None,
    ) -> int:
        """Drop old patches and snapshots (see :meth:`DocumentHistory.compact`).

        Args:
            doc_id: the document's id.
            keep: how many versions, counting the head, stay rebuildable.
            session: run in this transaction (not committed).

        Returns:
            The oldest version still rebuildable.

        Raises:
            NotFoundError: no such document.
            ConfigurationError: ``keep`` is not a positive int.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = _check_id(doc_id)
        async with self._transaction(session) as db:
            head = (await db.execute(_select_version(doc_id))).scalar_one_or_none()
            if head is None:
                raise _not_found(doc_id)
            oldest = (await db.execute(_select_oldest(doc_id))).scalar_one()
            floor = compaction_floor(head=head, oldest=oldest, keep=keep)
            if floor == oldest:
                return floor
            if (await db.execute(_select_snapshot_at(doc_id, floor))).first() is None:
                content = await _rebuild_async(db, doc_id, floor)
                await db.execute(_insert_snapshot(doc_id, floor, content, _json_size(content)))
            for statement in _compaction(doc_id, floor):
                await db.execute(statement)
            return floor

    def _engine(self, engine: AsyncEngine | None) -> AsyncEngine:
        engine = engine or self.engine
        if engine is None:
            raise ConfigurationError("AsyncDocumentHistory has no engine: pass session=")
        return engine

    @asynccontextmanager
    async def _transaction(
        self, session: AsyncSession | AsyncConnection | None
    ) -> AsyncIterator[AsyncSession | AsyncConnection]:
        if session is not None:
            yield session
            return
        async with self._engine(None).begin() as conn:
            yield conn


async def _rebuild_async(db: AsyncSession | AsyncConnection, doc_id: str, version: int) -> object:
    snapshot = (await db.execute(_select_snapshot(doc_id, version))).first()
    if snapshot is None:
        raise NotFoundError("DocumentVersion", (doc_id, version))
    rows = []
    if snapshot.version != version:
        rows = list(await db.execute(_select_patches(doc_id, snapshot.version, version)))
    return _replay(snapshot, rows, doc_id, version)
