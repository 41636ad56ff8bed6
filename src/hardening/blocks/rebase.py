"""Rebase a patch written against an old version onto the current one, by a three-way merge.

A client edits version 5 and sends a patch; meanwhile version 6 was saved. Rather than apply
the patch's index paths to a document whose blocks have shifted, :func:`rebase` applies it to
the version it was written for (``base``), merges that result with the current document
(``head``) block by block and field by field, and returns the operations that turn ``head``
into the merge. Blocks are identified by id throughout, so concurrent edits to other blocks,
or to other fields of the same block, insertions, deletions and moves elsewhere all merge.

Items without an id are matched by content, as the differ matches them (a changed id-less
item is a removal plus an addition), so one divider in a list does not stop the merge.
Identical changes are agreement: the same move, or the same block added by both (a client
retrying a save that already landed). Strings under a text member (``text_fields``, default
``text`` and ``content``) edited by both in different places merge by a three-way text merge.

A true conflict raises :class:`~hardening.PatchConflict` naming the block and the field:

- both sides changed the same field (the same JSON pointer inside a block, or the same member
  outside blocks) to different values, or the same part of a text field;
- one side deleted a block the other changed (unless ``delete_wins``: the deletion stands);
- both moved the same block, or added the same block, to different places;
- both added different blocks with one id, or an id appears twice in a list both changed.

The merge is symmetric: merging A into B gives the same document as merging B into A, so two
concurrent non-conflicting saves converge whichever commits first. Where both sides inserted
or moved blocks into the same gap, the runs are ordered by the first block's id.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import cast

from hardening.blocks._json import MISSING, pointer, same
from hardening.blocks._text import merge_text
from hardening.blocks.diff import (
    _Content,
    _Nth,
    diff,
    longest_increasing_subsequence,
    match_keys,
    shared_ends,
)
from hardening.blocks.patch import (
    DEFAULT_LIMITS,
    PatchLimits,
    _array_index,
    _checked,
    _Patcher,
    apply_patch,
)
from hardening.errors import PatchConflict

__all__ = ["merge_patch", "rebase"]

Operation = dict[str, object]
_START = object()  # the gap before the first block
TEXT_FIELDS = ("text", "content")  # members whose strings rebase merges as text by default


@dataclass(frozen=True)
class _Ref:
    """A block inside a route: addressed by its id, wherever it sits in its list."""

    id: object


Route = tuple[object, ...]  # member names (str) and _Ref blocks, from the document's root


class _Conflict(Exception):
    def __init__(self, route: Route, reason: str, *, position: bool = False) -> None:
        super().__init__(reason)
        self.route = route
        self.reason = reason
        self.position = position


def rebase(
    patch: object,
    *,
    base: object,
    head_patches: Sequence[object],
    id_key: str = "id",
    limits: PatchLimits | None = DEFAULT_LIMITS,
    text_fields: Collection[str] = TEXT_FIELDS,
    delete_wins: bool = False,
) -> list[Operation]:
    """Translate ``patch``, written against ``base``, into operations that apply to head.

    Head is ``base`` with ``head_patches`` applied in order (the versions saved since). The
    result applies to head (with ``apply_patch``) and yields the three-way merge of the two
    lines of edits; see the module documentation for what merges and what conflicts.

    Args:
        patch: the incoming patch, written against ``base``.
        base: the document the patch was written against (not changed).
        head_patches: the patches saved since ``base``, oldest first.
        id_key: the member holding each block's id.
        limits: the bounds the incoming patch must respect.
        text_fields: members whose string values are text: two edits of different parts of
            one are merged (a three-way text merge) instead of conflicting. ``()``: none.
        delete_wins: a block one side deleted stays deleted, and the other side's concurrent
            edits inside it are dropped (ProseMirror and Yjs behave so), instead of a conflict.

    Returns:
        The operations that turn head into the merged document.

    Raises:
        PatchConflict: both lines of edits changed the same field or block (HTTP 409).
        PatchError: the incoming patch is invalid or does not apply to ``base`` (its
            ``InvalidPatch``, ``PatchLimitExceeded``, ``PatchApplyError`` or
            ``PatchTestFailed``).
    """
    head = base  # copied on write: what the saved patches touch, not the whole document
    for saved in head_patches:
        head = apply_patch(head, saved, limits=None, share=True)
    return merge_patch(
        patch,
        base=base,
        head=head,
        id_key=id_key,
        limits=limits,
        text_fields=text_fields,
        delete_wins=delete_wins,
    )[1]


def merge_patch(
    patch: object,
    *,
    base: object,
    head: object,
    id_key: str = "id",
    limits: PatchLimits | None = DEFAULT_LIMITS,
    prefer_patch: bool = False,
    text_fields: Collection[str] = TEXT_FIELDS,
    delete_wins: bool = False,
) -> tuple[object, list[Operation]]:
    """Merge ``patch`` (written against ``base``) into ``head``.

    Args:
        patch: the incoming patch.
        base: the document it was written against.
        head: the current document.
        id_key: the member holding block ids.
        limits: the bounds the incoming patch must respect.
        prefer_patch: resolve conflicts in favour of the patch instead of raising.
        text_fields: members whose strings merge as text (see :func:`rebase`).
        delete_wins: deletions win over concurrent edits inside the deleted block.

    Returns:
        The merged document (sharing values with ``head`` and the patched base) and the
        operations that turn ``head`` into it.

    Raises:
        PatchConflict: a true conflict, unless ``prefer_patch``.
        PatchError: the patch is invalid or does not apply to ``base``.
    """
    mine = apply_patch(base, patch, limits=limits, share=True)
    try:
        merger = _Merger(id_key, prefer_patch, frozenset(text_fields), delete_wins)
        merged = merger.value(base, head, mine, ())
    except _Conflict as conflict:
        raise _patch_conflict(conflict, patch, base, id_key) from None
    return merged, diff(head, merged, id_key=id_key)


class _Merger:
    def __init__(
        self, id_key: str, prefer_mine: bool, text_fields: frozenset[str], delete_wins: bool
    ) -> None:
        self.id_key = id_key
        self.prefer_mine = prefer_mine
        self.text_fields = text_fields
        self.delete_wins = delete_wins

    def value(self, base: object, head: object, mine: object, route: Route) -> object:
        if same(head, mine):
            return head
        if same(head, base):
            return mine
        if same(mine, base):
            return head
        if isinstance(base, dict) and isinstance(head, dict) and isinstance(mine, dict):
            return self.members(base, head, mine, route)
        if isinstance(base, list) and isinstance(head, list) and isinstance(mine, list):
            return self.array(base, head, mine, route)
        if (
            type(base) is str
            and type(head) is str
            and type(mine) is str
            and route
            and route[-1] in self.text_fields
        ):
            merged = merge_text(base, head, mine)
            if merged is not None:
                return merged
            if not self.prefer_mine:
                raise _Conflict(route, "both edits changed the same part of this text")
        if self.prefer_mine:
            return mine
        raise _Conflict(route, "both edits changed this value")

    def members(
        self,
        base: dict[str, object],
        head: dict[str, object],
        mine: dict[str, object],
        route: Route,
    ) -> dict[str, object]:
        merged: dict[str, object] = {}
        for key in [*head, *(key for key in mine if key not in head)]:
            value = self.value(
                base.get(key, MISSING),
                head.get(key, MISSING),
                mine.get(key, MISSING),
                (*route, key),
            )
            if value is not MISSING:
                merged[key] = value
        return merged

    def keys(
        self, base: list[object], head: list[object], mine: list[object]
    ) -> tuple[list[object], list[object], list[object], set[object]] | None:
        """The three lists' match keys, and those of items without ids (``None``: an id twice).

        Blocks are matched by id; items without one by content, as the differ matches them
        (:func:`~hardening.blocks.diff.match_keys`). An id-less item that only one side has
        (new, or changed: a changed id-less item is a removal and an addition) is that side's
        own, so two sides adding equal id-less items keep both.
        """
        keyed = [match_keys(items, self.id_key) for items in (base, head, mine)]
        for keys, anon, repeated in keyed:  # match_keys says when a key repeats at all
            if repeated and any(
                type(key) is _Nth and not a for key, a in zip(keys, anon, strict=True)
            ):
                return None  # a duplicated id: which block is which is unknown
        (base_keys, base_anon, _), (head_keys, head_anon, _), (mine_keys, mine_anon, _) = keyed
        if True not in base_anon and True not in head_anon and True not in mine_anon:
            return base_keys, head_keys, mine_keys, set()  # the common case: ids only
        anonymous: set[object] = set()
        in_base = set(base_keys)
        anonymous.update(key for key, a in zip(base_keys, base_anon, strict=True) if a)
        sides = []
        for side, keys, anon in (("head", head_keys, head_anon), ("mine", mine_keys, mine_anon)):
            own = [
                _Own(side, key) if a and key not in in_base else key
                for key, a in zip(keys, anon, strict=True)
            ]
            anonymous.update(key for key, a in zip(own, anon, strict=True) if a)
            sides.append(own)
        return base_keys, sides[0], sides[1], anonymous

    def array(
        self, base: list[object], head: list[object], mine: list[object], route: Route
    ) -> list[object]:
        """Merge three versions of a list; first, cheaply, set aside the ends all three share.

        Items at the same place in all three lists *as the same objects* (``apply_patch``'s
        ``share=True`` keeps untouched blocks so) are unchanged by both sides and stay in place:
        only the middle is merged, so rebasing one edit onto another on a 10,000-block page
        costs the blocks between the edits, not the page. The ends are trusted only if no id in
        them appears again in a middle (a duplicated id: then the whole list is merged).
        """
        start, end = shared_ends(base, head, mine)
        if start or end:
            middle = (
                base[start : len(base) - end],
                head[start : len(head) - end],
                mine[start : len(mine) - end],
            )
            outer = [*base[:start], *base[len(base) - end :]]
            if not self._ids_meet(outer, middle):
                merged = self.whole_array(*middle, route)
                return [*base[:start], *merged, *base[len(base) - end :]]
        return self.whole_array(base, head, mine, route)

    def _ids_meet(self, outer: list[object], middles: tuple[list[object], ...]) -> bool:
        """Whether an id of an item in ``outer`` is also an id in a middle (or repeats)."""
        id_key = self.id_key
        ids = {
            item.get(id_key) for item in middles[0] + middles[1] + middles[2] if type(item) is dict
        }
        ids.discard(None)
        if not ids:
            return False
        outer_ids = [item.get(id_key) for item in outer if type(item) is dict]
        return len(set(outer_ids)) != len(outer_ids) or not ids.isdisjoint(outer_ids)

    def whole_array(
        self, base: list[object], head: list[object], mine: list[object], route: Route
    ) -> list[object]:
        """Merge three versions of a list item by item (by id, id-less items by content)."""
        keys = self.keys(base, head, mine)
        if keys is None:
            if self.prefer_mine:
                return mine
            raise _Conflict(route, "both edits changed this array, and an id appears twice in it")
        base_ids, head_ids, mine_ids, anonymous = keys
        in_base = {ident: i for i, ident in enumerate(base_ids)}
        in_head = {ident: i for i, ident in enumerate(head_ids)}
        in_mine = {ident: i for i, ident in enumerate(mine_ids)}
        moved_head = _moved(base_ids, in_base, head_ids)
        moved_mine = _moved(base_ids, in_base, mine_ids)
        content: dict[object, object] = {}
        # who decides where a block goes: "head", "mine", or "both" (both put it in one place)
        owner: dict[object, str] = {}
        for ident in base_ids:
            block_route = route if ident in anonymous else (*route, _Ref(ident))
            before = base[in_base[ident]]
            if ident in in_head and ident in in_mine:
                content[ident] = self.value(
                    before, head[in_head[ident]], mine[in_mine[ident]], block_route
                )
                if ident in moved_head and ident in moved_mine:
                    owner[ident] = "both"  # the same place, or a conflict: see _order
                elif ident in moved_mine:
                    owner[ident] = "mine"
                elif ident in moved_head:
                    owner[ident] = "head"
            elif ident in in_head:  # this patch deleted it
                after = head[in_head[ident]]
                if not same(after, before) and not self.prefer_mine and not self.delete_wins:
                    raise _Conflict(
                        block_route + _first_difference(before, after),
                        f"this patch deletes block {ident!r}, which was changed concurrently",
                    )
            elif ident in in_mine:  # deleted concurrently
                after = mine[in_mine[ident]]
                if same(after, before) or self.delete_wins:
                    continue
                if not self.prefer_mine:
                    raise _Conflict(
                        block_route + _first_difference(before, after),
                        f"this patch changes block {ident!r}, which was deleted concurrently",
                    )
                content[ident], owner[ident] = after, "mine"
        for ident in head_ids:
            if ident in in_base:
                continue
            if ident in in_mine:  # both added it: the same block (a retried save), or a clash
                mine_block = mine[in_mine[ident]]
                if not same(head[in_head[ident]], mine_block):
                    if not self.prefer_mine:
                        raise _Conflict(
                            (*route, _Ref(ident)),
                            f"both edits added a block with id {ident!r}, with different content",
                        )
                    content[ident], owner[ident] = mine_block, "mine"
                    continue
                content[ident], owner[ident] = mine_block, "both"
                continue
            content[ident], owner[ident] = head[in_head[ident]], "head"
        for ident in mine_ids:
            if ident not in in_base and ident not in content:
                content[ident], owner[ident] = mine[in_mine[ident]], "mine"
        order = _order(base_ids, head_ids, mine_ids, content, owner, route, self.prefer_mine)
        return [content[ident] for ident in order]


def _moved(base_ids: list[object], in_base: dict[object, int], ids: list[object]) -> set[object]:
    """The base blocks that ``ids`` reordered: those outside a longest in-order run."""
    kept = [ident for ident in ids if ident in in_base]
    stays = longest_increasing_subsequence([in_base[ident] for ident in kept])
    return {ident for ident, stay in zip(kept, stays, strict=True) if not stay}


def _order(
    base_ids: list[object],
    head_ids: list[object],
    mine_ids: list[object],
    content: dict[object, object],
    owner: dict[object, str],
    route: Route,
    prefer_mine: bool,
) -> list[object]:
    """The merged order: unmoved base blocks, and each side's placed blocks in their gaps.

    A block moved or added by one side goes where that side put it, relative to the blocks
    neither side moved (the skeleton). When both sides placed blocks in the same gap, the
    run whose blocks sort first (by id; id-less items by content) goes first: the same
    whichever side is "mine".
    A block both sides placed (both moved it, or both added it) must be in the same gap and in
    the same order among such blocks on both sides: it splits the gap's runs around it.
    Otherwise both moved it to different places: a conflict (``prefer_mine``: mine's place).
    """
    skeleton = [ident for ident in base_ids if ident in content and ident not in owner]
    in_skeleton = set(skeleton)
    runs: dict[str, dict[object, list[object]]] = {"head": {}, "mine": {}}
    for side, ids in (("head", head_ids), ("mine", mine_ids)):
        gap: object = _START
        for ident in ids:
            if ident in in_skeleton:
                gap = ident
            elif owner.get(ident) in (side, "both"):
                runs[side].setdefault(gap, []).append(ident)
    order: list[object] = []
    head_runs, mine_runs = runs["head"], runs["mine"]
    for gap in (_START, *skeleton):
        if gap is not _START:
            order.append(gap)
        theirs, ours = head_runs.get(gap), mine_runs.get(gap)
        if theirs is None and ours is None:
            continue  # the common case: nobody placed a block here
        theirs, ours = theirs or [], ours or []
        agreed, ours_agreed = _agreed(theirs, owner), _agreed(ours, owner)
        if agreed != ours_agreed:
            if not prefer_mine:
                misplaced = _first_mismatch(agreed, ours_agreed)
                anonymous = isinstance(misplaced, (_Content, _Nth, _Own))
                raise _Conflict(
                    route if anonymous else (*route, _Ref(misplaced)),
                    f"both edits put block {misplaced!r} in different places",
                    position=True,
                )
            theirs = [ident for ident in theirs if owner[ident] != "both"]  # mine's place
            agreed = ours_agreed
        order += _interleave(theirs, ours, agreed, owner)
    return order


def _agreed(run: list[object], owner: dict[object, str]) -> list[object]:
    return [ident for ident in run if owner[ident] == "both"]


def _first_mismatch(a: list[object], b: list[object]) -> object:
    """The first block where two different lists differ (or the longer one's next block)."""
    for i, j in zip(a, b, strict=False):
        if i != j:
            return i
    return (a if len(a) > len(b) else b)[min(len(a), len(b))]


def _interleave(
    theirs: list[object], ours: list[object], agreed: list[object], owner: dict[object, str]
) -> list[object]:
    """Two runs of one gap, split at the blocks both placed: each stretch ordered by its ids."""
    order: list[object] = []
    stretches = []
    for run in (theirs, ours):
        parts: list[list[object]] = [[]]
        for ident in run:
            if owner[ident] == "both":
                parts.append([])
            else:
                parts[-1].append(ident)
        parts += [[] for _ in range(len(agreed) + 1 - len(parts))]  # mine's place won: pad
        stretches.append(parts)
    for k, (first, second) in enumerate(zip(*stretches, strict=True)):
        if first and second and [_tie(i) for i in second] < [_tie(i) for i in first]:
            first, second = second, first
        order += first
        order += second
        if k < len(agreed):
            order.append(agreed[k])
    return order


def _tie(ident: object) -> tuple[str, str, int]:
    if isinstance(ident, _Own):  # an id-less item: by its content, whichever side added it
        ident = ident.key
    if type(ident) is _Nth:
        return ("~" + _tie(ident.key)[0], _tie(ident.key)[1], ident.n)
    if type(ident) is _Content:
        return ("~content", repr(ident), 0)
    if isinstance(ident, int):
        return ("int", "", ident)
    return ("str", str(ident), 0)


@dataclass(frozen=True)
class _Own:
    """The key of an id-less item only one side has: that side's own, never matched."""

    side: str
    key: object


def _first_difference(before: object, after: object) -> Route:
    """The route, inside a block, to the first member that differs (``()`` for the block)."""
    route: list[object] = []
    while isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(key for key in after if key not in before)]:
            if not same(before.get(key, MISSING), after.get(key, MISSING)):
                route.append(key)
                before, after = before.get(key, MISSING), after.get(key, MISSING)
                break
        else:
            break
    return tuple(route)


def _patch_conflict(conflict: _Conflict, patch: object, base: object, id_key: str) -> PatchConflict:
    route = conflict.route
    refs = [i for i, part in enumerate(route) if isinstance(part, _Ref)]
    block_id = cast(_Ref, route[refs[-1]]).id if refs else None
    inner = route[refs[-1] + 1 :] if refs else route
    field = None if conflict.position else pointer(str(part) for part in inner)
    op_index = _locate(patch, base, route, id_key)
    op = cast(list[object], patch)[op_index] if op_index is not None else None
    return PatchConflict(
        conflict.reason,
        block_id=cast("str | int | None", block_id),
        field=field,
        op_index=op_index,
        op=op,
    )


def _locate(patch: object, base: object, route: Route, id_key: str) -> int | None:
    """The index of the first operation of ``patch`` that touches ``route`` (best effort)."""
    checker, ops = _checked(patch, None, trusted=True)
    patcher = _Patcher(base, checker, undo=False, share=True)
    for op in ops:
        for tokens in (op.path, op.from_):
            if tokens is None:
                continue
            touched = _route(patcher.root, tokens, id_key, op.value)
            if touched[: len(route)] == route or route[: len(touched)] == touched:
                return op.index
        patcher.run(op)
    return None


def _route(doc: object, tokens: list[str], id_key: str, value: object) -> Route:
    """Where ``tokens`` points in ``doc``, with blocks named by id instead of index."""
    route: list[object] = []
    node = doc
    for depth, token in enumerate(tokens):
        if isinstance(node, dict):
            route.append(token)
            node = node.get(token, MISSING)
            continue
        if not isinstance(node, list):
            break
        position = len(node) if token == "-" else _array_index(token)
        target = node[position] if position is not None and position < len(node) else MISSING
        if depth == len(tokens) - 1 and value is not MISSING:
            target = value  # an add or replace: the block that will be there
        ident = target.get(id_key) if isinstance(target, dict) else None
        if type(ident) is not str and type(ident) is not int:
            break  # an item without an id: the route ends at its array
        route.append(_Ref(ident))
        node = target
    return tuple(route)
