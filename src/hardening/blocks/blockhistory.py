"""``BlockHistory``: block pages stored one row per block, so a save costs the size of the edit.

``DocumentHistory`` keeps a document's head as one JSON value: every save reads, patches and
rewrites all of it, so a one-field edit of a 10,000-block page moves megabytes. Here a page
(a JSON array of blocks: objects with a unique string id) is kept as rows
(``_blockrows.py``): the head row with the version, one row per block with an order key, and
the history as in ``DocumentHistory``: a patch row per version, snapshots by the
:class:`~hardening.SnapshotPolicy`.

A save bumps the head row's version (the optimistic lock, which also orders concurrent saves of
one page), applies the patch to the rows it names (``_pages.py``: index paths are resolved in
SQL, id guards by id) and writes the patch row, in one transaction. A snapshot that falls due
is **not** written by the save, which would cost O(page) in the request: the save says so
(:attr:`BlockSave.snapshot_due`) and :meth:`BlockHistory.snapshot` writes it, from a queue job
say. Until then older versions are rebuilt from an earlier snapshot and more patches, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from hardening._imports import require

require("sqlalchemy", extra="sqlalchemy", feature="hardening.BlockHistory")

import sqlalchemy as sa  # noqa: E402 - after the check that names the extra
from sqlalchemy.orm import Session  # noqa: E402

from hardening._sql import sql_unavailable  # noqa: E402
from hardening.blocks import _integrity  # noqa: E402
from hardening.blocks._blockrows import (  # noqa: E402
    BlockBase,
    BlockDocument,
    Executor,
    RowsPage,
    block_patches,
    block_rows,
    block_snapshots,
    dump_json,
    page_tables,
    rows_for,
)
from hardening.blocks._blockrows import heads as _heads  # noqa: E402
from hardening.blocks._chain import content_digest, link  # noqa: E402
from hardening.blocks._docrows import (  # noqa: E402
    aborted,
    check_base,
    check_id,
    check_version,
    exists,
    not_found,
)
from hardening.blocks._integrity import HistoryReport  # noqa: E402
from hardening.blocks._json import storable  # noqa: E402
from hardening.blocks._order import DIGITS, KEY_LIMIT  # noqa: E402
from hardening.blocks._pages import Block, ListPage, apply_to_page, join_document  # noqa: E402
from hardening.blocks.history import (  # noqa: E402
    ConflictPolicy,
    DocumentVersion,
    _HistoryBase,
    _SyncDriver,
)
from hardening.blocks.patch import (  # noqa: E402
    DEFAULT_LIMITS,
    PatchLimits,
    _checked,
    _Op,
    patch_size,
)
from hardening.blocks.policy import SnapshotPolicy, compaction_floor  # noqa: E402
from hardening.blocks.rebase import TEXT_FIELDS, merge_patch  # noqa: E402
from hardening.errors import (  # noqa: E402
    ConfigurationError,
    ConflictError,
    HistoryCorrupted,
    MalformedBody,
    NotFoundError,
)
from hardening.locking import update_versioned  # noqa: E402

if TYPE_CHECKING:
    from hardening.metrics import Metrics

__all__ = ["BlockHistory", "BlockSave", "BlockWindow"]


@dataclass(frozen=True)
class BlockSave:
    """What one save did.

    Attributes:
        version: the new version.
        changed: ids of the blocks added or whose content changed (moves change no content).
        removed: ids of the blocks removed.
        snapshot_due: the snapshot policy wants one: call :meth:`BlockHistory.snapshot` off the
            request path (a queue job); until then the save has not paid for it.
    """

    version: int
    changed: frozenset[str]
    removed: frozenset[str]
    snapshot_due: bool


@dataclass(frozen=True)
class BlockWindow:
    """Some of a page's blocks, as :meth:`BlockHistory.load_blocks` reads them.

    Attributes:
        doc_id: the document's id.
        version: the page's version when read (its ``ETag``).
        total: how many blocks the page holds.
        blocks: the blocks of the window, in order.
        next_after: the cursor of the next window (pass it as ``after``); ``None`` at the end.
        meta: the document's members beside its blocks (``None``: it is the array itself).
    """

    doc_id: str
    version: int
    total: int
    blocks: list[Block]
    next_after: str | None
    meta: dict[str, object] | None = None


@dataclass(frozen=True)
class _Head:
    version: int
    block_count: int
    blocks_bytes: int
    snapshot_bytes: int
    patches_since: int
    patch_bytes_since: int
    meta: str | None
    digest: str | None

    def members(self) -> dict[str, object] | None:
        return None if self.meta is None else dict(json.loads(self.meta))


def _select_head(doc_id: str) -> sa.Select[Any]:
    h = _heads.c
    return sa.select(
        h.version,
        h.block_count,
        h.blocks_bytes,
        h.snapshot_bytes,
        h.patches_since_snapshot,
        h.patch_bytes_since_snapshot,
        h.meta,
        h.digest,
    ).where(h.id == doc_id)


def _head(db: Executor, doc_id: str, *, lock: bool = False) -> _Head:
    """The head row; ``lock``: held (``FOR UPDATE``) until the transaction ends."""
    query = _select_head(doc_id)
    row = db.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise not_found(doc_id)
    return _Head(*row)


def _check_cursor(after: object) -> str:
    if (
        not isinstance(after, str)
        or not 1 <= len(after) <= KEY_LIMIT
        or after[-1] == DIGITS[0]
        or any(c not in DIGITS for c in after)
    ):
        raise MalformedBody("after: not a block cursor")
    return after


class BlockHistory(_SyncDriver, _HistoryBase):
    """Versioned block pages edited by JSON Patch, a row per block: saves cost the edit's size.

    The same API and conflict policies as :class:`~hardening.DocumentHistory` (``create``,
    ``save``, ``load``, ``versions``, ``compact``), for documents that are a JSON array of
    blocks (objects with a unique string ``id_key``), plus :meth:`apply` (a save that says
    which blocks changed), :meth:`load_blocks` (a window of a page) and :meth:`snapshot`.

    Patches follow RFC 6902 as ``apply_patch`` does, with two rules of a page: every element
    stays a block (else :class:`~hardening.PatchApplyError`), and an id guard (``test`` of
    ``/<i>/<id_key>``, as ``diff_blocks(..., guards=True)`` writes them) names its block: the
    operations after it address that block wherever it stands, without reading the page up to
    index ``<i>``. Unguarded indexes cost a read of the page up to them (an index scan).

    Args:
        engine: the engine to open a transaction on for each call without ``session=``.
        snapshots: when a snapshot is due (default ``SnapshotPolicy()``).
        conflict: ``"reject"``, ``"rebase"`` or ``"last-write-wins"``, as in
            ``DocumentHistory``. A merge reads the whole base and head pages (rare: only a save
            behind the head pays it).
        limits: the bounds patches and pages respect (``max_array_length``: blocks per page).
        id_key: the member holding each block's id.
        blocks_key: in a document that is an object, the member holding its blocks (the
            other members are stored beside, in the head row).
        metrics: a registry for ``patch_applied`` and conflicts.
        retries: with a merging policy (or ``base_version=None``), how often a save that
            lost the race re-merges; and how often a transaction of its own that the database
            aborted as a lost race is run again (as in ``DocumentHistory``).
        check_block: called with every block ``create`` or a save writes, before it is
            stored: your schema of a block (raise a :class:`~hardening.PatchError` or a
            :class:`~hardening.MalformedBody` to refuse; nothing is written). Only the blocks a
            save changes are checked, so its cost follows the edit too.
        text_fields: members whose strings a merge combines as text (``()``: none).
        delete_wins: a deletion drops concurrent edits inside the deleted block.

    Raises:
        ConfigurationError: an unknown conflict policy or a negative ``retries``.
    """

    metadata: ClassVar[sa.MetaData] = BlockBase.metadata
    """The four tables, for ``create_all`` or your migrations."""

    def __init__(
        self,
        engine: sa.Engine | None = None,
        *,
        snapshots: SnapshotPolicy | None = None,
        conflict: ConflictPolicy = "reject",
        limits: PatchLimits | None = DEFAULT_LIMITS,
        id_key: str = "id",
        blocks_key: str = "blocks",
        metrics: Metrics | None = None,
        retries: int = 3,
        check_block: Callable[[Block], None] | None = None,
        text_fields: Collection[str] = TEXT_FIELDS,
        delete_wins: bool = False,
    ) -> None:
        self.check_block = check_block
        if not isinstance(blocks_key, str) or not blocks_key:
            raise ConfigurationError("blocks_key must be a non-empty string")
        self.blocks_key = blocks_key
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
        self._tables = page_tables(self.id_key, blocks_key)

    @sql_unavailable
    def create_schema(self, engine: sa.Engine | None = None) -> None:
        """Create the four tables if they do not exist (tests, prototypes; else migrations).

        Tables that exist get the columns added since (the digests), as ``NULL`` in old rows.

        Raises:
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        BlockBase.metadata.create_all(self._engine(engine))

    @sql_unavailable
    def create(self, doc_id: str, content: object, *, session: Executor | None = None) -> int:
        """Store a new page at version 1, with its first snapshot.

        Args:
            doc_id: the page's id (1 to 255 characters).
            content: a JSON array of blocks (objects with a unique string id), or an object
                holding one under ``blocks_key`` (its other members are kept beside).
            session: run in this ``Session``/``Connection``'s transaction (not committed).

        Returns:
            ``1``.

        Raises:
            ConflictError: a page with this id exists.
            InvalidPatch: ``content`` is not JSON (or holds lone surrogates).
            PatchApplyError: ``content`` is not a block document (blocks with unique ids).
            PatchLimitExceeded: ``content`` exceeds ``limits``.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        size = len(self._new_document(doc_id, content))
        page = ListPage([], self.id_key)
        checked = _checked([{"op": "replace", "path": "", "value": content}], self.limits)[1]
        meta: dict[str, object] | None = {} if isinstance(content, dict) else None
        changes = apply_to_page(
            page,
            checked,
            id_key=self.id_key,
            limits=self.limits,
            meta=meta,
            blocks_key=self.blocks_key,
            check=self.check_block,
        )
        text = dump_json(content)
        payload = text.encode()
        chain = link(None, 1, payload)
        rows, total = rows_for(doc_id, page.items, self.id_key)

        def insert(db: Executor) -> int:
            if db.execute(sa.select(_heads.c.version).where(_heads.c.id == doc_id)).first():
                raise exists(doc_id)
            try:
                db.execute(
                    sa.insert(_heads).values(
                        id=doc_id,
                        version=1,
                        block_count=len(page.items),
                        blocks_bytes=total,
                        snapshot_bytes=size,
                        patches_since_snapshot=0,
                        patch_bytes_since_snapshot=0,
                        meta=None if changes.meta is None else dump_json(changes.meta),
                        digest=chain,
                    )
                )
            except sa.exc.IntegrityError as exc:  # created concurrently
                raise exists(doc_id) from exc
            if rows:
                db.execute(sa.insert(block_rows), rows)
            db.execute(_insert_snapshot(doc_id, 1, text, chain))
            return 1

        return self._run(session, insert, doc_id=doc_id, base_version=None)

    def save(
        self,
        doc_id: str,
        patch: object,
        *,
        base_version: int | None,
        session: Executor | None = None,
    ) -> int:
        """Apply a patch written against ``base_version``; return the new version.

        See :meth:`apply`, which also says what changed.
        """
        return self.apply(doc_id, patch, base_version=base_version, session=session).version

    @sql_unavailable
    def apply(
        self,
        doc_id: str,
        patch: object,
        *,
        base_version: int | None,
        session: Executor | None = None,
    ) -> BlockSave:
        """Apply a patch written against ``base_version``, touching only the rows it names.

        In one transaction (a savepoint inside ``session``'s): bump the head's version with
        :func:`~hardening.update_versioned` (a concurrent save can never be lost), apply the
        patch to the block rows, update the head's counts and write the patch row. A refused
        patch writes nothing. ``base_version=None`` applies the patch to the head as it is,
        atomically (the head row read locked), as :meth:`DocumentHistory.save` does; a
        transaction the database aborts as a lost race is run again, or raised as a
        ``ConflictError`` in ``session``, as there.

        Args:
            doc_id: the page's id.
            patch: the JSON Patch, as received (validated here).
            base_version: the version it was written against (``If-Match``), or ``None``:
                the head.
            session: run in this ``Session``/``Connection``'s transaction (not committed).

        Returns:
            The new version, the blocks changed and removed, and whether a snapshot is due.

        Raises:
            NotFoundError: no such page (404).
            ConflictError: ``base_version`` is not the head's under ``"reject"``, or no longer
                kept, or the race for the head was lost ``retries`` times, or the database
                aborted the transaction as a lost race (409).
            PatchConflict: the patch clashes with a concurrent edit (``"rebase"``; 409).
            PatchError: the patch is invalid, too large or does not apply (422/413/409).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        check_base(base_version)
        incoming = _checked(patch, self.limits)[1]  # validated and parsed once
        done, operations, size, total = self._run(
            session,
            lambda db: self._apply_in(db, doc_id, incoming, base_version),
            doc_id=doc_id,
            base_version=base_version,
            unit=self._apply_unit,
        )
        if self.metrics is not None:  # once committed
            self.metrics.patch_applied(operations, size, total)
        return done

    def _apply_in(
        self, db: Executor, doc_id: str, incoming: list[_Op], base_version: int | None
    ) -> tuple[BlockSave, int, int, int]:
        """One attempt at a save in ``db``'s transaction.

        Returns:
            What it did, and for the metrics: the operations and bytes stored, the blocks.
        """
        raw = [op.raw for op in incoming]
        attempt = 0
        while True:
            head = _head(db, doc_id, lock=base_version is None)
            merging = base_version is not None and base_version != head.version
            if (
                base_version is not None
                and merging
                and (self.conflict == "reject" or not 1 <= base_version < head.version)
            ):
                raise self._stale(doc_id, head.version, base_version)
            try:
                version = update_versioned(
                    db, BlockDocument, doc_id, head.version, {}, metrics=self.metrics
                )
                break
            except ConflictError as exc:
                if aborted(exc) or not self._retry(attempt, base_version):
                    raise
                attempt += 1
        page = self._rows(db, doc_id, head)
        stored = raw
        if base_version is not None and merging:  # the head is ours now: merge against it
            try:
                base = self._rebuild(db, doc_id, base_version)[0]
            except NotFoundError:  # compacted away: nothing to merge against
                raise self._stale(doc_id, head.version, base_version) from None
            _, stored = merge_patch(
                raw,
                base=base,
                head=join_document(page.blocks(), head.members(), self.blocks_key),
                id_key=self.id_key,
                limits=self.limits,
                prefer_patch=self.conflict == "last-write-wins",
                text_fields=self.text_fields,
                delete_wins=self.delete_wins,
            )
        ops = _checked(stored, None, trusted=True)[1] if merging else incoming
        changes = apply_to_page(
            page,
            ops,
            id_key=self.id_key,
            limits=self.limits,
            meta=head.members(),
            blocks_key=self.blocks_key,
            check=self.check_block,
        )
        size = patch_size(stored)
        patches = head.patches_since + 1
        patch_bytes = head.patch_bytes_since + size
        counts: dict[str, object] = {
            "block_count": page.total,
            "blocks_bytes": page.blocks_bytes,
            "patches_since_snapshot": patches,
            "patch_bytes_since_snapshot": patch_bytes,
        }
        if changes.meta_changed:
            counts["meta"] = None if changes.meta is None else dump_json(changes.meta)
        text = dump_json(stored)
        counts["digest"] = digest = link(head.digest, version, text.encode())
        db.execute(sa.update(_heads).where(_heads.c.id == doc_id).values(counts))
        db.execute(
            sa.insert(block_patches).values(
                document_id=doc_id,
                version=version,
                patch=text,
                operations=len(stored),
                size_bytes=size,
                digest=digest,
            )
        )
        due = self.snapshots.due(
            patches=patches, patch_bytes=patch_bytes, snapshot_bytes=head.snapshot_bytes
        )
        done = BlockSave(version, frozenset(changes.changed), frozenset(changes.removed), due)
        return done, len(stored), size, page.total

    @sql_unavailable
    def load(
        self, doc_id: str, version: int | None = None, *, session: Executor | None = None
    ) -> DocumentVersion:
        """The head page (one consistent read), or any kept version rebuilt.

        Raises:
            NotFoundError: no such page, or that version is not (or no longer) kept.
            HistoryCorrupted: a row the rebuild needs is missing, garbage, or does not match
                its digest (500; never a 404 or 422 for damaged stored data).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        if version is not None and type(version) is not int:
            raise ConfigurationError(f"version must be an int, not {version!r}")
        with self._transaction(session) as db:
            if version is not None:
                head_version = db.execute(
                    sa.select(_heads.c.version).where(_heads.c.id == doc_id)
                ).scalar_one_or_none()
                if version != head_version:
                    check_version(doc_id, version, head_version)
                    content = self._rebuild(db, doc_id, version)[0]
                    return DocumentVersion(doc_id, version, content)
            window = self._window(db, doc_id, offset=0, after=None, limit=None)
            content = join_document(window.blocks, window.meta, self.blocks_key)
            return DocumentVersion(doc_id, window.version, content)

    @sql_unavailable
    def patches_since(
        self, doc_id: str, version: int, *, limit: int = 100, session: Executor | None = None
    ) -> list[list[dict[str, object]]]:
        """The stored patches that took the page from ``version`` to its head, in order.

        A client holding version ``version`` applies them to its copy instead of fetching the
        whole page (its cost follows the edits, not the page): after a 412, say. The head is
        ``version + len(patches)``.

        Raises:
            NotFoundError: no such page; or the patches cannot all be given (``version`` is
                past the head or compacted away, or more than ``limit`` saves happened since):
                fetch the page instead.
            HistoryCorrupted: a patch row since ``version`` is missing, garbage, or does not
                match its digest (500).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        if type(version) is not int or type(limit) is not int or limit < 1:
            raise ConfigurationError("version and limit must be ints (limit >= 1)")
        with self._transaction(session) as db:
            steps = _integrity.patches_since(self._tables, doc_id, version, limit)
            return _integrity.run(db, steps)

    @sql_unavailable
    def load_json(self, doc_id: str, *, session: Executor | None = None) -> tuple[int, str]:
        """The head's version and its content as compact JSON text, in one consistent read.

        The text is assembled from the blocks as stored, never parsed or re-encoded: for an
        HTTP response it saves decoding and encoding every block of the page.

        Raises:
            NotFoundError: no such page.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        h, r = _heads.c, block_rows.c
        version = sa.select(h.version).where(h.id == doc_id).scalar_subquery()
        meta = sa.select(h.meta).where(h.id == doc_id).scalar_subquery()
        query = (
            sa.select(version.label("v"), meta.label("m"), r.content)
            .where(r.document_id == doc_id)
            .order_by(r.position)
        )
        with self._transaction(session) as db:
            rows = db.execute(query).all()
            if rows:
                page_version, members = rows[0].v, rows[0].m
            else:
                head = _head(db, doc_id)
                page_version, members = head.version, head.meta
        blocks = "[" + ",".join(row.content for row in rows) + "]"
        if members is None:
            return page_version, blocks
        key = dump_json(self.blocks_key)
        inner = members[1:-1]
        return page_version, "{" + inner + ("," if inner else "") + key + ":" + blocks + "}"

    @sql_unavailable
    def load_blocks(
        self,
        doc_id: str,
        *,
        offset: int = 0,
        limit: int = 100,
        after: str | None = None,
        session: Executor | None = None,
    ) -> BlockWindow:
        """A window of the head page: ``limit`` blocks from ``offset``, or after a cursor.

        One statement reads the window with the page's version and block count, so they
        agree. ``after`` (a window's ``next_after``) pages by key, at a cost independent of
        how far into the page the window is; ``offset`` reads the page up to it.

        Raises:
            NotFoundError: no such page.
            MalformedBody: ``after`` is not a cursor this store made (400).
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        if type(offset) is not int or offset < 0 or type(limit) is not int or limit < 1:
            raise ConfigurationError("offset must be an int >= 0 and limit an int >= 1")
        cursor = None if after is None else _check_cursor(after)
        with self._transaction(session) as db:
            return self._window(db, doc_id, offset=offset, after=cursor, limit=limit)

    @sql_unavailable
    def find_blocks(
        self, doc_id: str, block_ids: Iterable[str], *, session: Executor | None = None
    ) -> tuple[int, dict[str, Block]]:
        """The head's version and the blocks with these ids that it holds (one statement).

        For work that follows a save's :attr:`BlockSave.changed` (re-indexing those blocks):
        an id the page no longer holds is simply absent from the answer.

        Raises:
            NotFoundError: no such page.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        # an id no block can have (a lone surrogate, a NUL) is absent, not a database error
        wanted = sorted({b for b in block_ids if isinstance(b, str) and storable(b)})
        h, r = _heads.c, block_rows.c
        with self._transaction(session) as db:
            version = sa.select(h.version).where(h.id == doc_id).scalar_subquery()
            rows = db.execute(
                sa.select(version.label("v"), r.block_id, r.content).where(
                    r.document_id == doc_id, r.block_id.in_(wanted)
                )
            ).all()
            page_version = rows[0].v if rows else _head(db, doc_id).version
            return page_version, {row.block_id: json.loads(row.content) for row in rows}

    def _window(
        self, db: Executor, doc_id: str, *, offset: int, after: str | None, limit: int | None
    ) -> BlockWindow:
        h, r = _heads.c, block_rows.c
        version = sa.select(h.version).where(h.id == doc_id).scalar_subquery()
        count = sa.select(h.block_count).where(h.id == doc_id).scalar_subquery()
        meta = sa.select(h.meta).where(h.id == doc_id).scalar_subquery()
        query = (
            sa.select(version.label("v"), count.label("n"), meta.label("m"), r.position, r.content)
            .where(r.document_id == doc_id)
            .order_by(r.position)
        )
        if after is not None:
            query = query.where(r.position > after)
        elif offset:
            query = query.offset(offset)
        if limit is not None:
            query = query.limit(limit + 1)
        rows = db.execute(query).all()
        if rows:
            page_version, total, members = rows[0].v, rows[0].n, rows[0].m
        else:  # an empty page, or past its end
            head = _head(db, doc_id)
            page_version, total, members = head.version, head.block_count, head.meta
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        return BlockWindow(
            doc_id,
            page_version,
            total,
            [json.loads(row.content) for row in rows],
            rows[-1].position if more else None,
            None if members is None else json.loads(members),
        )

    @sql_unavailable
    def snapshot(
        self, doc_id: str, *, force: bool = False, session: Executor | None = None
    ) -> int | None:
        """Write the head's snapshot if the policy says one is due (or ``force``).

        Reads the whole page once, holding the head row so that no save slips in between
        (saves of this page wait meanwhile; other pages are not affected). Meant to run off the
        request path: a queue job enqueued when a save returned ``snapshot_due``.

        Returns:
            The version snapshotted, or ``None`` when none was due.

        Raises:
            NotFoundError: no such page.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        with self._transaction(session) as db:
            row = db.execute(_select_head(doc_id).with_for_update()).first()
            if row is None:
                raise not_found(doc_id)
            head = _Head(*row)
            due = self.snapshots.due(
                patches=head.patches_since,
                patch_bytes=head.patch_bytes_since,
                snapshot_bytes=head.snapshot_bytes,
            )
            if not (force or due) or head.patches_since == 0:
                return None
            page = self._rows(db, doc_id, head)
            text = dump_json(join_document(page.blocks(), head.members(), self.blocks_key))
            db.execute(_insert_snapshot(doc_id, head.version, text, head.digest))
            db.execute(
                sa.update(_heads)
                .where(_heads.c.id == doc_id)
                .values(
                    snapshot_bytes=len(text.encode()),
                    patches_since_snapshot=0,
                    patch_bytes_since_snapshot=0,
                )
            )
            return head.version

    @sql_unavailable
    def versions(self, doc_id: str, *, session: Executor | None = None) -> list[int]:
        """The versions ``load`` can give, oldest first (see ``DocumentHistory.versions``).

        The head, and every older version whose patch rows from its nearest snapshot are all
        stored: a listed version is never "not found".

        Raises:
            NotFoundError: no such page.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        with self._transaction(session) as db:
            return _integrity.run(db, _integrity.versions(self._tables, doc_id))

    @sql_unavailable
    def verify(self, doc_id: str, *, session: Executor | None = None) -> HistoryReport:
        """Check every kept version of a page: rows, checksum chain, snapshots, head.

        As ``DocumentHistory.verify``: the history is replayed from the oldest snapshot a
        page of patch rows at a time, and the head's block rows are compared with the replay.

        Returns:
            The report: ``ok``, how many versions were checked, the first problem found.

        Raises:
            NotFoundError: no such page.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        with self._transaction(session) as db:
            return _integrity.run(db, _integrity.verify(self._tables, doc_id))

    @sql_unavailable
    def compact(self, doc_id: str, *, keep: int, session: Executor | None = None) -> int:
        """Drop old patches and snapshots, keeping the ``keep`` latest versions rebuildable.

        Returns:
            The oldest version still rebuildable.

        Raises:
            NotFoundError: no such page.
            ConfigurationError: ``keep`` is not a positive int.
            HistoryCorrupted: the rows up to the new oldest version are damaged.
            BackendUnavailable: the database could not be reached or timed out (503).
        """
        doc_id = check_id(doc_id)
        with self._transaction(session) as db:
            head = _head(db, doc_id)
            oldest = self._oldest(db, doc_id, head.version)
            floor = compaction_floor(head=head.version, oldest=oldest, keep=keep)
            if floor == oldest:
                return floor
            s, p = block_snapshots.c, block_patches.c
            kept = db.execute(
                sa.select(s.version).where(s.document_id == doc_id, s.version == floor)
            ).first()
            if kept is None:
                content, chain = self._rebuild(db, doc_id, floor)
                db.execute(_insert_snapshot(doc_id, floor, dump_json(content), chain))
            db.execute(sa.delete(block_snapshots).where(s.document_id == doc_id, s.version < floor))
            db.execute(sa.delete(block_patches).where(p.document_id == doc_id, p.version <= floor))
            return floor

    # --- internals -------------------------------------------------------------------------

    def _rows(self, db: Executor, doc_id: str, head: _Head) -> RowsPage:
        """The page's rows, as the head row counts them."""
        return RowsPage(
            db, doc_id, count=head.block_count, blocks_bytes=head.blocks_bytes, id_key=self.id_key
        )

    def _oldest(self, db: Executor, doc_id: str, head: int) -> int:
        s = block_snapshots.c
        oldest = db.execute(
            sa.select(sa.func.min(s.version)).where(s.document_id == doc_id)
        ).scalar_one()
        if oldest is None:
            raise HistoryCorrupted(doc_id, head, "no snapshot is stored")
        return int(oldest)

    def _rebuild(self, db: Executor, doc_id: str, version: int) -> tuple[object, str | None]:
        """The page at ``version`` and the chain's link there (its snapshot, then patches)."""
        return _integrity.run(db, _integrity.rebuild(self._tables, doc_id, version))

    @contextmanager
    def _apply_unit(self, session: Executor | None) -> Iterator[Executor]:
        """A save's transaction: our own, or a savepoint inside the caller's."""
        with self._transaction(session) as outer, self._savepoint(outer, session) as db:
            yield db

    @contextmanager
    def _savepoint(self, db: Executor, session: Executor | None) -> Iterator[Executor]:
        """Inside a caller's transaction, a savepoint: a refused patch leaves nothing behind."""
        if session is None:  # our own transaction rolls back whole
            yield db
            return
        conn = db.connection() if isinstance(db, Session) else db
        raw = conn.connection.dbapi_connection
        if conn.dialect.name == "sqlite" and not getattr(raw, "in_transaction", True):
            # pysqlite opens its transaction lazily, at the first write: a SAVEPOINT before
            # it would be the outermost, and its RELEASE would commit the caller's work. Take
            # the write lock now (waiting for it): a save reads, then writes, and a deferred
            # transaction whose snapshot went stale could only fail ("database is locked")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        with db.begin_nested():
            yield db


def _insert_snapshot(doc_id: str, version: int, text: str, chain: str | None) -> sa.Insert:
    """A snapshot row: ``text`` is the page's compact JSON, ``chain`` the link at ``version``."""
    payload = text.encode()
    return sa.insert(block_snapshots).values(
        document_id=doc_id,
        version=version,
        content=text,
        size_bytes=len(payload),
        digest=chain,
        content_digest=content_digest(payload),
    )
