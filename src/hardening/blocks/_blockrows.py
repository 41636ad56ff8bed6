"""The SQL side of ``BlockHistory``: its four tables and a page read and written as rows.

Patch and snapshot rows carry the checksum chain of ``_chain.py`` (``digest``; snapshots
also ``content_digest``), the head row the head's link; :func:`page_tables` tells the
integrity steps (``_integrity.py``) how to read and replay them.

``RowsPage`` is the :class:`~hardening.blocks._pages.PageRows` the patch applier drives on a
save: index paths become ``ORDER BY position OFFSET i`` reads, an insert or a move computes one
order key between its neighbours (``_order.py``), content changes write one row each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hardening.blocks._chain import PageReplay, Replay
from hardening.blocks._integrity import Rows, Tables, add_missing_columns, digest_column
from hardening.blocks._order import KEY_LIMIT, MAX_KEY, key_between, keys_between
from hardening.blocks._pages import Block, join_document
from hardening.errors import HistoryCorrupted, InvalidPatch
from hardening.locking import Versioned

__all__ = [
    "BlockBase",
    "BlockDocument",
    "RowsPage",
    "block_patches",
    "block_rows",
    "block_snapshots",
    "dump_json",
    "heads",
    "page_tables",
    "rows_for",
]

Executor = Session | sa.Connection
_WINDOW = 16  # neighbours on each side re-spaced first when a key grows past MAX_KEY


class BlockBase(DeclarativeBase):
    """The declarative base of ``BlockHistory``'s tables; its ``metadata`` holds all four."""

    metadata = sa.MetaData()


class BlockDocument(Versioned, BlockBase):
    """The head row of a block page: its version, size and snapshot bookkeeping."""

    __tablename__ = "hardening_block_documents"

    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    block_count: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    blocks_bytes: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    snapshot_bytes: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    patches_since_snapshot: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    patch_bytes_since_snapshot: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    # the members beside the blocks (JSON), or NULL when the document is the array itself
    meta: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    # the chain's link at ``version`` (NULL: saved before the chain existed)
    digest: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)


def _child(name: str, *columns: Any) -> sa.Table:
    return sa.Table(
        name,
        BlockBase.metadata,
        sa.Column(
            "document_id",
            sa.String(255),
            sa.ForeignKey("hardening_block_documents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        *columns,
    )


# order keys compare bytewise: PostgreSQL's "C" collation (SQLite's default is already binary)
_ORDER_KEY = sa.String(KEY_LIMIT).with_variant(sa.String(KEY_LIMIT, collation="C"), "postgresql")
block_rows = _child(
    "hardening_block_rows",
    sa.Column("block_id", sa.String(255), primary_key=True),
    sa.Column("position", _ORDER_KEY, nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
)
sa.Index("hardening_block_rows_order_idx", block_rows.c.document_id, block_rows.c.position)
block_patches = _child(
    "hardening_block_patches",
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("patch", sa.Text, nullable=False),
    sa.Column("operations", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    digest_column(),
)
block_snapshots = _child(
    "hardening_block_snapshots",
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    digest_column(),
    digest_column("content_digest"),
)
heads: sa.Table = BlockDocument.__table__  # type: ignore[assignment]
# ``create_all`` (and so ``create_schema``) adds the columns an older database lacks
sa.event.listen(BlockBase.metadata, "after_create", add_missing_columns)


def page_tables(id_key: str, blocks_key: str) -> Tables:
    """The tables and the page replay the integrity steps use, for these options."""

    def start(content: object) -> Replay:
        return PageReplay(content, id_key=id_key, blocks_key=blocks_key)

    def head_content(
        doc_id: str,
    ) -> tuple[sa.Select[Any], Callable[[Rows], tuple[int, object]]]:
        h, r = heads.c, block_rows.c
        query = (
            sa.select(h.version, h.meta, r.content)
            .select_from(heads.outerjoin(block_rows, r.document_id == h.id))
            .where(h.id == doc_id)
            .order_by(r.position)
        )

        def read(rows: Rows) -> tuple[int, object]:
            if not rows:  # deleted meanwhile: nothing to compare
                return 0, None
            try:
                blocks = [json.loads(row.content) for row in rows if row.content is not None]
                meta = None if rows[0].meta is None else json.loads(rows[0].meta)
            except (ValueError, RecursionError) as exc:
                raise HistoryCorrupted(
                    doc_id, rows[0].version, "its head rows are not JSON"
                ) from exc
            return rows[0].version, join_document(blocks, meta, blocks_key)

        return query, read

    return Tables(heads, block_patches, block_snapshots, start, True, head_content)


def dump_json(value: object) -> str:
    """Compact JSON text, refusing what the database could not store (lone surrogates)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPatch("strings must be valid Unicode (no lone surrogates)") from None
    return text


def _size(text: str) -> int:
    return len(text.encode())


class RowsPage:
    """The page as rows, read and written statement by statement in one transaction."""

    def __init__(
        self, db: Executor, doc_id: str, *, count: int, blocks_bytes: int, id_key: str
    ) -> None:
        self.db = db
        self.doc_id = doc_id
        self.id_key = id_key
        self.total = count
        self.blocks_bytes = blocks_bytes  # the sum of the blocks' sizes
        self.cache: dict[str, tuple[Block, int]] = {}  # id -> (block, stored size)
        self.absent: set[str] = set()

    # --- reads -----------------------------------------------------------------------------

    def _ordered(self) -> sa.Select[Any]:
        r = block_rows.c
        return sa.select(r.block_id, r.position).where(r.document_id == self.doc_id)

    def count(self) -> int:
        return self.total

    def id_at(self, index: int) -> str:
        r = block_rows.c
        row = self.db.execute(self._ordered().order_by(r.position).offset(index).limit(1)).first()
        if row is None:
            raise LookupError(index)
        return str(row.block_id)

    def block(self, block_id: str) -> Block | None:
        if block_id in self.cache:
            return self.cache[block_id][0]
        if block_id in self.absent:
            return None
        r = block_rows.c
        row = self.db.execute(
            sa.select(r.content, r.size_bytes).where(
                r.document_id == self.doc_id, r.block_id == block_id
            )
        ).first()
        if row is None:
            self.absent.add(block_id)
            return None
        block: Block = json.loads(row.content)
        self.cache[block_id] = (block, row.size_bytes)
        return block

    def _position(self, block_id: str) -> str:
        r = block_rows.c
        return str(
            self.db.execute(
                sa.select(r.position).where(r.document_id == self.doc_id, r.block_id == block_id)
            ).scalar_one()
        )

    def _neighbours(self, index: int, without: str | None = None) -> tuple[str | None, str | None]:
        """The keys around a new block at ``index`` (of the page without ``without``)."""
        r = block_rows.c
        query = self._ordered().order_by(r.position)
        if without is not None:
            query = query.where(r.block_id != without)
        if index == 0:
            keys = [row.position for row in self.db.execute(query.limit(1))]
            return None, (keys[0] if keys else None)
        keys = [row.position for row in self.db.execute(query.offset(index - 1).limit(2))]
        return keys[0], (keys[1] if len(keys) > 1 else None)

    # --- writes ----------------------------------------------------------------------------

    def _key(self, index: int, without: str | None = None) -> str:
        low, high = self._neighbours(index, without)
        key = key_between(low, high)
        if len(key) > MAX_KEY:
            key = self._respace(low, high, without)
        return key

    def _respace(self, low: str | None, high: str | None, without: str | None) -> str:
        """Re-space a window of keys around the gap (``low``, ``high``); the gap's new key.

        The window doubles until its keys come out short, or it spans the page: an
        amortised few rows per insert, however often one spot is hit.
        """
        r = block_rows.c
        width = _WINDOW
        while True:
            query = self._ordered()
            if without is not None:
                query = query.where(r.block_id != without)
            before = (
                []
                if low is None
                else list(
                    self.db.execute(
                        query.where(r.position <= low).order_by(r.position.desc()).limit(width + 1)
                    )
                )
            )
            after = (
                []
                if high is None
                else list(
                    self.db.execute(
                        query.where(r.position >= high).order_by(r.position).limit(width + 1)
                    )
                )
            )
            outer_low = before[width].position if len(before) > width else None
            outer_high = after[width].position if len(after) > width else None
            inside = [row.block_id for row in reversed(before[:width])]
            gap = len(inside)
            inside += [row.block_id for row in after[:width]]
            keys = keys_between(outer_low, outer_high, len(inside) + 1)
            spans_page = outer_low is None and outer_high is None
            if spans_page or max(map(len, keys)) <= MAX_KEY // 2:
                break
            width *= 2
        new_keys = keys[:gap] + keys[gap + 1 :]
        if inside:
            self.db.execute(
                sa.update(block_rows)
                .where(
                    block_rows.c.document_id == self.doc_id,
                    block_rows.c.block_id == sa.bindparam("b_id"),
                )
                .values(position=sa.bindparam("b_position")),
                [{"b_id": b, "b_position": k} for b, k in zip(inside, new_keys, strict=True)],
            )
        return keys[gap]

    def insert(self, index: int, block: Block) -> None:
        text = dump_json(block)
        block_id = str(block[self.id_key])
        self.db.execute(
            sa.insert(block_rows).values(
                document_id=self.doc_id,
                block_id=block_id,
                position=self._key(index),
                content=text,
                size_bytes=_size(text),
            )
        )
        self.total += 1
        self.blocks_bytes += _size(text)
        self.cache[block_id] = (json.loads(text), _size(text))
        self.absent.discard(block_id)

    def delete(self, block_id: str) -> Block:
        block = self.block(block_id)
        if block is None:
            raise LookupError(block_id)
        size = self.cache.pop(block_id)[1]
        r = block_rows.c
        self.db.execute(
            sa.delete(block_rows).where(r.document_id == self.doc_id, r.block_id == block_id)
        )
        self.absent.add(block_id)
        self.total -= 1
        self.blocks_bytes -= size
        return block

    def move(self, block_id: str, index: int) -> None:
        r = block_rows.c
        self.db.execute(
            sa.update(block_rows)
            .where(r.document_id == self.doc_id, r.block_id == block_id)
            .values(position=self._key(index, without=block_id))
        )

    def put(self, block_id: str, block: Block) -> None:
        text = dump_json(block)
        old = self.cache.get(block_id)
        if old is None:
            self.block(block_id)
            old = self.cache[block_id]
        new_id = str(block[self.id_key])
        r = block_rows.c
        self.db.execute(
            sa.update(block_rows)
            .where(r.document_id == self.doc_id, r.block_id == block_id)
            .values(block_id=new_id, content=text, size_bytes=_size(text))
        )
        self.blocks_bytes += _size(text) - old[1]
        del self.cache[block_id]
        if new_id != block_id:
            self.absent.add(block_id)
            self.absent.discard(new_id)
        self.cache[new_id] = (block, _size(text))

    def blocks(self) -> list[Block]:
        r = block_rows.c
        rows = self.db.execute(
            sa.select(r.content).where(r.document_id == self.doc_id).order_by(r.position)
        )
        return [json.loads(row.content) for row in rows]

    def replace_all(self, blocks: list[Block]) -> list[str]:
        r = block_rows.c
        old = [
            str(row.block_id)
            for row in self.db.execute(
                sa.delete(block_rows).where(r.document_id == self.doc_id).returning(r.block_id)
            )
        ]
        self.cache.clear()
        self.absent = set(old)
        rows, self.blocks_bytes = rows_for(self.doc_id, blocks, self.id_key)
        if rows:
            self.db.execute(sa.insert(block_rows), rows)
        self.total = len(blocks)
        self.absent.difference_update(str(b[self.id_key]) for b in blocks)
        return old


def rows_for(
    doc_id: str, blocks: Sequence[Block], id_key: str
) -> tuple[list[dict[str, object]], int]:
    """A whole page's rows (evenly spaced keys) and the blocks' total size."""
    keys = keys_between(None, None, len(blocks))
    rows: list[dict[str, object]] = []
    total = 0
    for key, block in zip(keys, blocks, strict=True):
        text = dump_json(block)
        size = _size(text)
        total += size
        rows.append(
            {
                "document_id": doc_id,
                "block_id": str(block[id_key]),
                "position": key,
                "content": text,
                "size_bytes": size,
            }
        )
    return rows, total
