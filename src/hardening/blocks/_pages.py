"""A JSON Patch applied to a block page wherever the page lives: in SQL rows, or in a list.

:class:`~hardening.BlockHistory` stores a page as one row per block and applies a patch by
touching only the rows it names; replaying history applies the same stored patches to a list.
Both run :func:`apply_to_page` over a :class:`PageRows`, so they cannot disagree.

A page is a list of blocks: JSON objects, each with a unique string id (``id_key``). The
operations follow :func:`~hardening.apply_patch` (RFC 6902), with these rules for a page:

- An **id guard**, a ``test`` of ``/<i>/<id_key>`` against a string, names the block: the
  operations that follow address that block by ``<i>`` wherever it stands now, until one adds,
  removes, moves or renames a block. A block with that id must exist (else
  :class:`~hardening.PatchTestFailed`); its index is not re-checked, which would mean reading
  the page up to it. The differ's guards (``diff_blocks(..., guards=True)``) are of this form.
- Unguarded indexes are resolved in the page as it stands, operation by operation.
- Every element stays a block: adding or replacing one that is not an object with a string id,
  or whose id another block has, is refused with :class:`~hardening.PatchApplyError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hardening.blocks._json import copy_json, json_equal
from hardening.blocks.patch import (
    _ADD,
    _COPY,
    _MOVE,
    _REMOVE,
    _REPLACE,
    _TEST,
    PatchLimits,
    _array_index,
    _Checker,
    _depth,
    _Op,
    _Patcher,
)
from hardening.errors import PatchLimitExceeded, PatchTestFailed

__all__ = [
    "ListPage",
    "PageChanges",
    "PageRows",
    "apply_to_page",
    "join_document",
    "split_document",
]

Block = dict[str, object]


class PageRows(Protocol):
    """A page as the applier sees it: blocks by index and by id."""

    def count(self) -> int:
        """How many blocks the page holds."""

    def id_at(self, index: int) -> str:
        """The id of the block at ``index`` (``0 <= index < count()``)."""

    def block(self, block_id: str) -> Block | None:
        """The block with this id (the applier may change it, then :meth:`put` it)."""

    def insert(self, index: int, block: Block) -> None:
        """Insert a new block so that it stands at ``index``."""

    def delete(self, block_id: str) -> Block:
        """Remove a block; return it."""

    def move(self, block_id: str, index: int) -> None:
        """Move a block to ``index`` of the page without it."""

    def put(self, block_id: str, block: Block) -> None:
        """Store ``block`` where the block ``block_id`` stands (its id may differ)."""

    def blocks(self) -> list[Block]:
        """Every block, in order."""

    def replace_all(self, blocks: list[Block]) -> list[str]:
        """Replace every block; return the ids the page held before."""


@dataclass
class PageChanges:
    """What a patch did to a page (for incremental work such as indexing).

    Attributes:
        changed: ids of blocks added or whose content changed (a move changes no content).
        removed: ids of blocks removed (or renamed away).
        meta: the document's members besides the blocks, after the patch (``None``: the
            document is the array itself).
        meta_changed: whether the patch changed ``meta``.
    """

    changed: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    meta: dict[str, object] | None = None
    meta_changed: bool = False

    def wrote(self, block_id: str) -> None:
        self.changed.add(block_id)
        self.removed.discard(block_id)

    def dropped(self, block_id: str) -> None:
        self.removed.add(block_id)
        self.changed.discard(block_id)


def apply_to_page(
    page: PageRows,
    ops: list[_Op],
    *,
    id_key: str,
    limits: PatchLimits | None,
    meta: dict[str, object] | None = None,
    blocks_key: str = "blocks",
    check: Callable[[Block], None] | None = None,
) -> PageChanges:
    """Apply checked operations to a block document, in order; what they changed.

    The document is ``page``'s blocks when ``meta`` is ``None``, else the object ``meta``
    with the blocks as its member ``blocks_key``. ``meta`` is changed in place. ``check`` is
    called with every block written, before it is stored; what it raises refuses the patch.

    On an error the page may be half-changed: the caller rolls its transaction back (SQL) or
    drops its copy (a list).

    Raises:
        PatchApplyError: an operation does not apply, or would break a block.
        PatchTestFailed: a ``test`` (or an id guard) did not hold.
        PatchLimitExceeded: the page would hold more than ``limits.max_array_length`` blocks.
    """
    applier = _Applier(page, id_key, limits, meta, blocks_key, check)
    for op in ops:
        applier.run(op)
    applier.changes.meta = applier.meta
    return applier.changes


_DOCUMENT, _META, _PAGE = range(3)


def split_document(
    content: object, blocks_key: str
) -> tuple[list[Block], dict[str, object] | None] | None:
    """``(blocks, meta)`` of a block document; ``None`` for any other value.

    A block document is an array of blocks, or an object holding one under ``blocks_key``.
    """
    if isinstance(content, list):
        return content, None
    if isinstance(content, dict) and isinstance(content.get(blocks_key), list):
        meta = {k: v for k, v in content.items() if k != blocks_key}
        return content[blocks_key], meta
    return None


def join_document(blocks: list[Block], meta: dict[str, object] | None, blocks_key: str) -> object:
    """The document from its blocks and its other members."""
    return blocks if meta is None else {**meta, blocks_key: blocks}


class _Applier:
    def __init__(
        self,
        page: PageRows,
        id_key: str,
        limits: PatchLimits | None,
        meta: dict[str, object] | None,
        blocks_key: str,
        check: Callable[[Block], None] | None = None,
    ) -> None:
        self.check = check
        self.page = page
        self.id_key = id_key
        self.limits = limits
        self.meta = meta
        self.blocks_key = blocks_key
        self.guards: dict[int, str] = {}
        self.changes = PageChanges()

    def run(self, op: _Op) -> None:
        kind = op.kind
        if kind == _TEST:
            if not self.guard(op) and not json_equal(self.get(op.path, op), op.value):
                raise PatchTestFailed(
                    f"test failed: the value at {op.raw.get('path')!r} is not the expected one",
                    op_index=op.index,
                    op=op.raw,
                )
        elif kind == _ADD:
            self.add(op.path, copy_json(op.value), op)
        elif kind == _REMOVE:
            self.remove(op.path, op)
        elif kind == _REPLACE:
            self.replace(op.path, copy_json(op.value), op)
        elif kind == _MOVE:
            self.move(op.from_ or [], op.path, op)
        elif kind == _COPY:
            value = copy_json(self.get(op.from_ or [], op))
            self.check_depth(value, op.path, op)
            self.add(op.path, value, op)

    # --- the document: its blocks, or an object with other members and the blocks ----------

    def split(self, tokens: list[str]) -> tuple[int, list[str]]:
        """Where a path points: the whole document, a member beside the blocks, the page."""
        if self.meta is None:
            return _PAGE, tokens
        if not tokens:
            return _DOCUMENT, tokens
        if tokens[0] == self.blocks_key:
            return _PAGE, tokens[1:]
        return _META, tokens

    def meta_patcher(self) -> _Patcher:
        self.changes.meta_changed = True
        return _Patcher(self.meta, _Checker(self.limits), undo=False)

    def get(self, tokens: list[str], op: _Op) -> object:
        where, rest = self.split(tokens)
        if where == _DOCUMENT:
            return join_document(self.page.blocks(), self.meta, self.blocks_key)
        if where == _META:
            return _Patcher(self.meta, _Checker(self.limits), undo=False).get(rest, op)
        return self.page_get(rest, op)

    def add(self, tokens: list[str], value: object, op: _Op) -> None:
        where, rest = self.split(tokens)
        if where == _DOCUMENT:
            self.replace_document(value, op)
        elif where == _META:
            self.meta_patcher().add(rest, value, op)
        else:
            self.page_add(rest, value, op)

    def remove(self, tokens: list[str], op: _Op) -> object:
        where, rest = self.split(tokens)
        if where == _DOCUMENT:
            raise op.failed("cannot remove the whole document")
        if where == _META:
            return self.meta_patcher().remove(rest, op)
        if not rest and self.meta is not None:
            raise op.failed(f"a block document keeps its {self.blocks_key!r} array")
        return self.page_remove(rest, op)

    def replace(self, tokens: list[str], value: object, op: _Op) -> None:
        where, rest = self.split(tokens)
        if where == _DOCUMENT:
            self.replace_document(value, op)
        elif where == _META:
            self.meta_patcher().replace(rest, value, op)
        else:
            self.page_replace(rest, value, op)

    def move(self, source: list[str], target: list[str], op: _Op) -> None:
        if source == target:
            self.get(source, op)  # moving a value onto itself changes nothing, if it exists
            return
        from_where, from_rest = self.split(source)
        to_where, to_rest = self.split(target)
        if from_where == to_where == _PAGE and len(from_rest) == 1 and len(to_rest) == 1:
            block_id = self.resolve(from_rest[0], op)  # a block changes place: one row
            index = self.position(to_rest[0], op, self.page.count() - 1)
            self.page.move(block_id, index)
            self.structure_changed()
            return
        value = self.remove(source, op)
        self.check_depth(value, target, op)
        self.add(target, value, op)

    def replace_document(self, value: object, op: _Op) -> None:
        parts = split_document(value, self.blocks_key)
        if parts is None:
            raise op.failed(
                f"a block document is an array of blocks, or an object with one under "
                f"{self.blocks_key!r}"
            )
        blocks, meta = parts
        self.replace_all(blocks, op)
        self.meta = meta
        self.changes.meta_changed = True

    # --- addressing blocks -----------------------------------------------------------------

    def guard(self, op: _Op) -> bool:
        """An id guard: remember which block ``<i>`` names. False for any other test."""
        where, path = self.split(op.path)
        value = op.value
        if where != _PAGE or len(path) != 2 or path[1] != self.id_key:
            return False
        index = _array_index(path[0])
        if index is None or not isinstance(value, str):
            return False
        if self.page.block(value) is None:
            raise PatchTestFailed(
                f"test failed: no block has the id {value!r}", op_index=op.index, op=op.raw
            )
        self.guards[index] = value
        return True

    def resolve(self, token: str, op: _Op) -> str:
        """The id of the existing block ``token`` (an index) names."""
        index = _array_index(token)
        if index is None:
            raise op.failed(f"{token!r} is not an array index")
        guarded = self.guards.get(index)
        if guarded is not None:
            return guarded
        if index >= self.page.count():
            raise op.failed(f"block {token} is past the end of the array")
        return self.page.id_at(index)

    def position(self, token: str, op: _Op, count: int) -> int:
        """Where a new block goes: ``-`` or an index up to ``count``."""
        index = count if token == "-" else _array_index(token)
        if index is None:
            raise op.failed(f"{token!r} is not an array index")
        if index > count:
            raise op.failed(f"block {token} is past the end of the array")
        return index

    def structure_changed(self) -> None:
        self.guards.clear()  # indexes shifted: a guard's index may name another block now

    # --- the page's operations (paths relative to the array) -------------------------------

    def page_get(self, tokens: list[str], op: _Op) -> object:
        if not tokens:
            return self.page.blocks()
        block = self.existing(tokens[0], op)[1]
        if len(tokens) == 1:
            return block
        return _Patcher(block, self.inner_checker(), undo=False).get(tokens[1:], op)

    def page_add(self, tokens: list[str], value: object, op: _Op) -> None:
        if not tokens:
            self.replace_all(value, op)
        elif len(tokens) == 1:
            count = self.page.count()
            index = self.position(tokens[0], op, count)
            block = self.checked_block(value, op, replacing=None)
            limits = self.limits
            if limits is not None and count >= limits.max_array_length:
                raise PatchLimitExceeded(
                    f"the page would exceed {limits.max_array_length} blocks",
                    limit="max_array_length",
                    value=count + 1,
                    maximum=limits.max_array_length,
                    op_index=op.index,
                    op=op.raw,
                )
            if self.check is not None:
                self.check(block)
            self.page.insert(index, block)
            self.structure_changed()
            self.changes.wrote(str(block[self.id_key]))
        else:
            self.inside(tokens, op, lambda patcher, rest: patcher.add(rest, value, op))

    def page_remove(self, tokens: list[str], op: _Op) -> object:
        if not tokens:
            raise op.failed("cannot remove the whole document")
        if len(tokens) == 1:
            block_id = self.resolve(tokens[0], op)
            block = self.page.delete(block_id)
            self.structure_changed()
            self.changes.dropped(block_id)
            return block
        return self.inside(tokens, op, lambda patcher, rest: patcher.remove(rest, op))

    def page_replace(self, tokens: list[str], value: object, op: _Op) -> None:
        if not tokens:
            self.replace_all(value, op)
        elif len(tokens) == 1:
            block_id = self.resolve(tokens[0], op)
            block = self.checked_block(value, op, replacing=block_id)
            self.stored(block_id, block)
        else:
            self.inside(tokens, op, lambda patcher, rest: patcher.replace(rest, value, op))

    def replace_all(self, value: object, op: _Op) -> None:
        if not isinstance(value, list):
            raise op.failed("a page is an array of blocks")
        limits = self.limits
        if limits is not None and len(value) > limits.max_array_length:
            raise PatchLimitExceeded(
                f"the page would exceed {limits.max_array_length} blocks",
                limit="max_array_length",
                value=len(value),
                maximum=limits.max_array_length,
                op_index=op.index,
                op=op.raw,
            )
        seen: set[str] = set()
        for item in value:
            if not isinstance(item, dict) or not _is_id(item.get(self.id_key)):
                raise op.failed(f"a page holds objects with a string {self.id_key!r}")
            block_id = item[self.id_key]
            if block_id in seen:
                raise op.failed(f"two blocks have the id {block_id!r}")
            seen.add(block_id)
        if self.check is not None:
            for item in value:
                self.check(item)
        for gone in self.page.replace_all(value):
            self.changes.dropped(gone)
        for block_id in seen:
            self.changes.wrote(block_id)
        self.structure_changed()

    # --- inside one block ------------------------------------------------------------------

    def existing(self, token: str, op: _Op) -> tuple[str, Block]:
        block_id = self.resolve(token, op)
        block = self.page.block(block_id)
        if block is None:  # a guard names blocks that exist; an index too
            raise op.failed(f"block {token} does not exist")
        return block_id, block

    def inside(self, tokens: list[str], op: _Op, action: _Action) -> object:
        """Run ``action`` on the block ``tokens[0]`` names, at ``tokens[1:]``; store it."""
        block_id, block = self.existing(tokens[0], op)
        result = action(_Patcher(block, self.inner_checker(), undo=False), tokens[1:])
        if block.get(self.id_key) != block_id:
            self.checked_block(block, op, replacing=block_id)
        self.stored(block_id, block)
        return result

    def stored(self, block_id: str, block: Block) -> None:
        if self.check is not None:
            self.check(block)
        self.page.put(block_id, block)
        new_id = str(block[self.id_key])
        if new_id != block_id:  # renamed: the old id is gone, guards may name it
            self.changes.dropped(block_id)
            self.structure_changed()
        self.changes.wrote(new_id)

    def checked_block(self, value: object, op: _Op, *, replacing: str | None) -> Block:
        if not isinstance(value, dict) or not _is_id(value.get(self.id_key)):
            raise op.failed(
                f"a page holds objects with a string {self.id_key!r} of 1 to 255 characters"
            )
        block_id = value[self.id_key]
        if block_id != replacing and self.page.block(block_id) is not None:
            raise op.failed(f"a block with the id {block_id!r} exists already")
        return value

    def inner_checker(self) -> _Checker:
        """Limits inside a block: the levels above it (the page, its member) are used up."""
        limits = self.limits
        if limits is None:
            return _Checker(None, trusted=True)
        above = 1 if self.meta is None else 2
        return _Checker(dataclasses.replace(limits, max_depth=max(1, limits.max_depth - above)))

    def check_depth(self, value: object, target: list[str], op: _Op) -> None:
        limits = self.limits
        if limits is not None and isinstance(value, (dict, list)):
            depth = _depth(value, len(target), limits.max_depth)
            if depth > limits.max_depth:
                raise _Checker(limits).too_deep(depth, op.index, op.raw)


class _Action(Protocol):
    def __call__(self, patcher: _Patcher, rest: list[str]) -> object: ...


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 255


class ListPage:
    """A page held as a list (replaying stored patches, or checking a patch without SQL).

    Args:
        blocks: the page's blocks; changed in place.
        id_key: the member holding each block's id.
    """

    def __init__(self, blocks: list[Block], id_key: str) -> None:
        self.items = blocks
        self.id_key = id_key
        self._where: dict[str, int] | None = None

    def _index(self) -> dict[str, int]:
        if self._where is None:
            self._where = {str(b[self.id_key]): i for i, b in enumerate(self.items)}
        return self._where

    def count(self) -> int:
        return len(self.items)

    def id_at(self, index: int) -> str:
        return str(self.items[index][self.id_key])

    def block(self, block_id: str) -> Block | None:
        where = self._index().get(block_id)
        return None if where is None else self.items[where]

    def insert(self, index: int, block: Block) -> None:
        self.items.insert(index, block)
        self._where = None

    def delete(self, block_id: str) -> Block:
        where = self._index()[block_id]
        self._where = None
        return self.items.pop(where)

    def move(self, block_id: str, index: int) -> None:
        self.insert(index, self.delete(block_id))

    def put(self, block_id: str, block: Block) -> None:
        self.items[self._index()[block_id]] = block
        if block[self.id_key] != block_id:
            self._where = None

    def blocks(self) -> list[Block]:
        return self.items

    def replace_all(self, blocks: list[Block]) -> list[str]:
        old = [str(b[self.id_key]) for b in self.items]
        self.items[:] = blocks
        self._where = None
        return old
