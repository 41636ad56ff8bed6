"""``DocumentHistory``: a document's head, its patches and snapshots in SQL; any version rebuilt.

Three tables (in :attr:`DocumentHistory.metadata`, for your migrations; ``_docrows.py``): the
head row (content, version, snapshot bookkeeping), a patch row per version and snapshots.
Every patch and snapshot row carries a link of a checksum chain, the head row the head's link
(``_chain.py``): a rebuild checks the rows it reads, :meth:`DocumentHistory.verify` all of
them (``_integrity.py``, shared with ``BlockHistory``).

A save is one transaction: read the head, apply (or merge) the patch in memory, one
``update_versioned`` on the head row, one patch row, a snapshot row when the policy says so.
``DocumentHistory`` and ``AsyncDocumentHistory`` share all of that but the I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

from hardening._imports import require
from hardening._sql import sql_unavailable
from hardening.blocks._json import storable
from hardening.blocks.patch import (
    DEFAULT_LIMITS,
    PatchLimits,
    _Checker,
    apply_patch,
    patch_size,
    validate_patch,
)
from hardening.blocks.policy import SnapshotPolicy, compaction_floor
from hardening.blocks.rebase import TEXT_FIELDS, merge_patch
from hardening.errors import ConfigurationError, ConflictError, NotFoundError

require("sqlalchemy", extra="sqlalchemy", feature="hardening.DocumentHistory")

import sqlalchemy as sa  # noqa: E402 - after the check that names the extra
from sqlalchemy.orm import Session  # noqa: E402

from hardening.blocks import _docrows as rows  # noqa: E402
from hardening.blocks import _integrity  # noqa: E402
from hardening.blocks._chain import canonical, link  # noqa: E402
from hardening.blocks._docrows import Document, HistoryBase  # noqa: E402 - re-exported
from hardening.blocks._integrity import HistoryReport  # noqa: E402
from hardening.locking import _report, update_versioned, update_versioned_async  # noqa: E402

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
    "HistoryReport",
]

T = TypeVar("T")
ConflictPolicy = Literal["reject", "rebase", "last-write-wins"]
Executor = Session | sa.Connection
_CONFLICT_POLICIES = ("reject", "rebase", "last-write-wins")


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
class _Save:
    """What one save writes: the head row's new values, the patch row, maybe a snapshot."""

    content: object
    stored: list[dict[str, object]]
    size: int
    values: dict[str, object]
    digest: str
    snapshot: bytes | None  # the snapshot's compact JSON, when one is due

    @property
    def row(self) -> tuple[list[dict[str, object]], int, str]:
        """The patch row's values: the patch, its size, its chain digest."""
        return self.stored, self.size, self.digest


def _block_count(content: object) -> int | None:
    if isinstance(content, list):
        return len(content)
    if isinstance(content, dict) and isinstance(content.get("blocks"), list):
        return len(content["blocks"])
    return None


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
        text_fields: Collection[str] = TEXT_FIELDS,
        delete_wins: bool = False,
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
        self.text_fields = tuple(text_fields)
        self.delete_wins = delete_wins

    def _new_document(self, doc_id: str, content: object) -> bytes:
        """Check a new document's id and content; return the content's compact JSON."""
        if not isinstance(doc_id, str) or not 1 <= len(doc_id) <= 255 or not storable(doc_id):
            raise ConfigurationError(
                "a document id is a string of 1 to 255 characters (valid Unicode, no NUL)"
            )
        limits = self.limits and dataclasses.replace(self.limits, max_bytes=2**62)
        _Checker(limits).value(content, 0, None, None)  # a document may outweigh a patch
        return rows.json_bytes(content)

    def _incoming(self, patch: object, base_version: int | None) -> list[dict[str, object]]:
        rows.check_base(base_version)
        return validate_patch(patch, limits=self.limits)

    def _needs_base(self, doc_id: str, head: rows.Head, base_version: int | None) -> bool:
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

    def _plan(self, head: rows.Head, ops: list[dict[str, object]], base: object) -> _Save:
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
                text_fields=self.text_fields,
                delete_wins=self.delete_wins,
            )
        size = patch_size(stored)
        digest = link(head.digest, head.version + 1, canonical(stored))  # the version it makes
        patches = head.patches_since + 1
        patch_bytes = head.patch_bytes_since + size
        if self.snapshots.due(
            patches=patches, patch_bytes=patch_bytes, snapshot_bytes=head.snapshot_bytes
        ):
            snapshot = rows.json_bytes(content)
            values: dict[str, object] = {
                "content": content,
                "snapshot_bytes": len(snapshot),
                "patches_since_snapshot": 0,
                "patch_bytes_since_snapshot": 0,
                "digest": digest,
            }
            return _Save(content, stored, size, values, digest, snapshot)
        values = {
            "content": content,
            "patches_since_snapshot": patches,
            "patch_bytes_since_snapshot": patch_bytes,
            "digest": digest,
        }
        return _Save(content, stored, size, values, digest, None)

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
                rows.rerun_or_raise(
                    exc,
                    mine=session is None,
                    attempt=attempt,
                    retries=self.retries,
                    doc_id=doc_id,
                    base_version=base_version,
                    metrics=self.metrics,
                )
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
        text_fields: members whose strings a merge combines as text (edits of different parts
            both land; see :func:`~hardening.rebase`); ``()`` for none.
        delete_wins: when merging, a block deleted on one side stays deleted and the other
            side's edits inside it are dropped, instead of a ``PatchConflict``.

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
        text_fields: Collection[str] = TEXT_FIELDS,
        delete_wins: bool = False,
    ) -> None:
        super().__init__(
            snapshots=snapshots,
            conflict=conflict,
            limits=limits,
            id_key=id_key,
            metrics=metrics,
            retries=retries,
            text_fields=text_fields,
            delete_wins=delete_wins,
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
        payload = self._new_document(doc_id, content)

        def insert(db: Executor) -> int:
            if db.execute(rows.select_version(doc_id)).first() is not None:
                raise rows.exists(doc_id)
            try:
                db.execute(rows.insert_document(doc_id, content, payload))
            except sa.exc.IntegrityError as exc:  # created concurrently
                raise rows.exists(doc_id) from exc
            db.execute(rows.insert_snapshot(doc_id, 1, content, payload, link(None, 1, payload)))
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
        doc_id = rows.check_id(doc_id)
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
            row = db.execute(rows.select_head(doc_id, lock=base_version is None)).first()
            head = rows.head(row, doc_id)
            base = _NO_BASE
            if base_version is not None and self._needs_base(doc_id, head, base_version):
                try:
                    base = rows.rebuild(db, doc_id, base_version)[0]
                except NotFoundError:  # compacted away: nothing to merge against
                    raise self._stale(doc_id, head.version, base_version) from None
            save = self._plan(head, ops, base)
            try:
                version = update_versioned(
                    db, Document, doc_id, head.version, save.values, metrics=self.metrics
                )
                break
            except ConflictError as exc:
                if rows.aborted(exc) or not self._retry(attempt, base_version):
                    raise
                attempt += 1
        db.execute(rows.insert_patch(doc_id, version, *save.row))
        if save.snapshot is not None:
            db.execute(
                rows.insert_snapshot(doc_id, version, save.content, save.snapshot, save.digest)
            )
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
            HistoryCorrupted: a row the rebuild needs is missing, garbage, or does not match
                its digest (500; never a 404 or 422 for damaged stored data).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        if version is not None and type(version) is not int:
            raise ConfigurationError(f"version must be an int, not {version!r}")
        with self._transaction(session) as db:
            if version is not None:
                head_version = db.execute(rows.select_version(doc_id)).scalar_one_or_none()
                if version != head_version:
                    rows.check_version(doc_id, version, head_version)
                    return DocumentVersion(doc_id, version, rows.rebuild(db, doc_id, version)[0])
            head = rows.head(db.execute(rows.select_head(doc_id)).first(), doc_id)
            return DocumentVersion(doc_id, head.version, head.content)

    @sql_unavailable
    def versions(self, doc_id: str, *, session: Executor | None = None) -> list[int]:
        """The versions ``load`` can give, oldest first: none of them is "not found".

        The head, and every older version whose patch rows, from its nearest snapshot up to
        it, are all stored. A version missing from a run of kept ones lost a row: ``load``
        raises :class:`~hardening.HistoryCorrupted` for it and :meth:`verify` reports it.
        Reads the versions' numbers (an index scan), not their rows.

        Args:
            doc_id: the document's id.
            session: run in this ``Session``/``Connection``'s transaction.

        Returns:
            The versions, from the oldest kept one to the head.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        with self._transaction(session) as db:
            return _integrity.run(db, _integrity.versions(rows.TABLES, doc_id))

    @sql_unavailable
    def verify(self, doc_id: str, *, session: Executor | None = None) -> HistoryReport:
        """Check every kept version of a document: its rows, the checksum chain, the head.

        Replays the history from the oldest snapshot, checking that every patch row is
        there, parses, applies and matches its chain digest, that every snapshot matches its
        digests and the replay, and that the head is where the replay ends. Rows are read a
        page at a time: memory holds the document, one snapshot and one page of patches. Rows
        written before the chain existed are accepted (counted as ``unchained``).

        Args:
            doc_id: the document's id.
            session: run in this ``Session``/``Connection``'s transaction.

        Returns:
            The report: ``ok``, how many versions were checked, the first problem found.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        with self._transaction(session) as db:
            return _integrity.run(db, _integrity.verify(rows.TABLES, doc_id))

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
            HistoryCorrupted: the rows up to the new oldest version are damaged.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        with self._transaction(session) as db:
            head = db.execute(rows.select_version(doc_id)).scalar_one_or_none()
            if head is None:
                raise rows.not_found(doc_id)
            oldest = rows.kept(doc_id, head, db.execute(rows.select_oldest(doc_id)).scalar_one())
            floor = compaction_floor(head=head, oldest=oldest, keep=keep)
            if floor == oldest:
                return floor
            if db.execute(rows.select_snapshot_at(doc_id, floor)).first() is None:
                content, chain = rows.rebuild(db, doc_id, floor)
                db.execute(rows.insert_snapshot(doc_id, floor, content, canonical(content), chain))
            for statement in rows.compaction(doc_id, floor):
                db.execute(statement)
            return floor


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
        text_fields: members whose strings a merge combines as text.
        delete_wins: a deletion drops concurrent edits inside the deleted block.

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
        text_fields: Collection[str] = TEXT_FIELDS,
        delete_wins: bool = False,
    ) -> None:
        super().__init__(
            snapshots=snapshots,
            conflict=conflict,
            limits=limits,
            id_key=id_key,
            metrics=metrics,
            retries=retries,
            text_fields=text_fields,
            delete_wins=delete_wins,
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
        payload = self._new_document(doc_id, content)
        chain = link(None, 1, payload)

        async def insert(db: AsyncSession | AsyncConnection) -> int:
            if (await db.execute(rows.select_version(doc_id))).first() is not None:
                raise rows.exists(doc_id)
            try:
                await db.execute(rows.insert_document(doc_id, content, payload))
            except sa.exc.IntegrityError as exc:
                raise rows.exists(doc_id) from exc
            await db.execute(rows.insert_snapshot(doc_id, 1, content, payload, chain))
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
        doc_id = rows.check_id(doc_id)
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
                rows.rerun_or_raise(
                    exc,
                    mine=session is None,
                    attempt=attempt,
                    retries=self.retries,
                    doc_id=doc_id,
                    base_version=base_version,
                    metrics=self.metrics,
                )
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
            row = (await db.execute(rows.select_head(doc_id, lock=base_version is None))).first()
            head = rows.head(row, doc_id)
            base = _NO_BASE
            if base_version is not None and self._needs_base(doc_id, head, base_version):
                try:
                    base = (await rows.rebuild_async(db, doc_id, base_version))[0]
                except NotFoundError:
                    raise self._stale(doc_id, head.version, base_version) from None
            save = self._plan(head, ops, base)
            try:
                version = await update_versioned_async(
                    db, Document, doc_id, head.version, save.values, metrics=self.metrics
                )
                break
            except ConflictError as exc:
                if rows.aborted(exc) or not self._retry(attempt, base_version):
                    raise
                attempt += 1
        await db.execute(rows.insert_patch(doc_id, version, *save.row))
        if save.snapshot is not None:
            await db.execute(
                rows.insert_snapshot(doc_id, version, save.content, save.snapshot, save.digest)
            )
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
            HistoryCorrupted: a row the rebuild needs is damaged (500).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        if version is not None and type(version) is not int:
            raise ConfigurationError(f"version must be an int, not {version!r}")
        async with self._transaction(session) as db:
            if version is not None:
                head_version = (await db.execute(rows.select_version(doc_id))).scalar_one_or_none()
                if version != head_version:
                    rows.check_version(doc_id, version, head_version)
                    content = (await rows.rebuild_async(db, doc_id, version))[0]
                    return DocumentVersion(doc_id, version, content)
            head = rows.head((await db.execute(rows.select_head(doc_id))).first(), doc_id)
            return DocumentVersion(doc_id, head.version, head.content)

    @sql_unavailable
    async def versions(
        self, doc_id: str, *, session: AsyncSession | AsyncConnection | None = None
    ) -> list[int]:
        """The versions ``load`` can give, oldest first (see :meth:`DocumentHistory.versions`).

        Args:
            doc_id: the document's id.
            session: run in this transaction.

        Returns:
            The versions, from the oldest kept one to the head.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        async with self._transaction(session) as db:
            return await _integrity.run_async(db, _integrity.versions(rows.TABLES, doc_id))

    @sql_unavailable
    async def verify(
        self, doc_id: str, *, session: AsyncSession | AsyncConnection | None = None
    ) -> HistoryReport:
        """Check every kept version of a document (see :meth:`DocumentHistory.verify`).

        Args:
            doc_id: the document's id.
            session: run in this transaction.

        Returns:
            The report: ``ok``, how many versions were checked, the first problem found.

        Raises:
            NotFoundError: no such document.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        async with self._transaction(session) as db:
            return await _integrity.run_async(db, _integrity.verify(rows.TABLES, doc_id))

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
            HistoryCorrupted: the rows up to the new oldest version are damaged.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = rows.check_id(doc_id)
        async with self._transaction(session) as db:
            head = (await db.execute(rows.select_version(doc_id))).scalar_one_or_none()
            if head is None:
                raise rows.not_found(doc_id)
            oldest = rows.kept(
                doc_id, head, (await db.execute(rows.select_oldest(doc_id))).scalar_one()
            )
            floor = compaction_floor(head=head, oldest=oldest, keep=keep)
            if floor == oldest:
                return floor
            if (await db.execute(rows.select_snapshot_at(doc_id, floor))).first() is None:
                content, chain = await rows.rebuild_async(db, doc_id, floor)
                payload = canonical(content)
                await db.execute(rows.insert_snapshot(doc_id, floor, content, payload, chain))
            for statement in rows.compaction(doc_id, floor):
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
