"""Which RFC 6902 operations turn one JSON document into another: blocks are matched by id.

A block list is an array of objects carrying an id (``{"id": "b7", "type": ..., ...}``). The
differ matches blocks **by id**, never by position or content, so that:

- an insert is one ``add`` and a delete one ``remove``, wherever they happen;
- a reorder is the fewest ``move`` operations: every matched block outside one longest
  increasing subsequence of the old order moves, once;
- an edited block gets fine-grained ``replace``/``add``/``remove`` operations inside it, and a
  block that moved *and* changed keeps its identity (a ``move`` plus those inner operations).

Items without a usable id (not an object, no id, an id that is not a string or an integer)
are matched by content instead; an unmatched id-less item and an unmatched id-less item in the
same gap between matched items are paired and diffed in place (the positional fallback). When
an id occurs several times in a list, its n-th occurrence in the old list is matched with its
n-th occurrence in the new one. Whichever way items are matched, the operations are exact:
applying them to ``old`` gives ``new``.

Operations come in a fixed order per array: ``remove`` (from the last index down), ``move``,
``add`` (from the first index up). Edits inside a matched item come after them at its final
index, or before them all at its old index when that index is shorter to write.
"""

from __future__ import annotations

import json
import marshal
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from hardening.blocks._json import escape, same

__all__ = ["diff", "diff_blocks", "longest_increasing_subsequence"]

Operation = dict[str, object]


@dataclass(frozen=True)
class _Content:
    """The match key of an item without an id: its type and canonical JSON text."""

    kind: str
    text: object


@dataclass(frozen=True)
class _Nth:
    """The match key of the n-th (n >= 1) occurrence of a key already seen in the same list."""

    key: object
    n: int


def diff_blocks(
    old: Sequence[object], new: Sequence[object], *, id_key: str = "id", guards: bool = False
) -> list[Operation]:
    """The RFC 6902 operations that turn the block list ``old`` into ``new``, matching by id.

    Any JSON Patch implementation applies the result (``jsonpatch.apply_patch(old, ops) ==
    new``). Blocks are matched by ``block[id_key]``; see the module documentation for the
    operations produced and the fallback for blocks without ids or with duplicate ids. Values
    in the operations are ``new``'s own objects, not copies.

    Args:
        old: the block list before.
        new: the block list after.
        id_key: the member holding each block's id.
        guards: precede every operation that addresses an existing block by index with a
            ``test`` of that block's id (of its whole value for a block without an id), so
            the patch fails with ``PatchTestFailed`` on a document where that index holds
            another block, instead of changing the wrong one.

    Returns:
        The operations, as a list of JSON objects.

    Raises:
        TypeError: ``old`` or ``new`` is not a list, or holds something that is not JSON.
    """
    if isinstance(old, (str, bytes)) or not isinstance(old, Sequence):
        raise TypeError(f"diff_blocks() needs two lists, not {type(old).__name__}")
    if isinstance(new, (str, bytes)) or not isinstance(new, Sequence):
        raise TypeError(f"diff_blocks() needs two lists, not {type(new).__name__}")
    differ = _Differ(id_key, guards)
    differ.array(list(old), list(new), "")
    return differ.ops


def diff(old: object, new: object, *, id_key: str = "id", guards: bool = False) -> list[Operation]:
    """The RFC 6902 operations that turn any JSON document ``old`` into ``new``.

    Objects are compared member by member, scalars replaced, and every array diffed as
    :func:`diff_blocks` does (by id where items have ids, by content otherwise), at any depth:
    a page ``{"title": ..., "blocks": [...]}`` gets the same block-aware operations under
    ``/blocks``. A change of type (an object becoming an array...) is one ``replace``.

    Args:
        old: the document before.
        new: the document after.
        id_key: the member holding each block's id.
        guards: add id guards, as :func:`diff_blocks` does.

    Returns:
        The operations, as a list of JSON objects.

    Raises:
        TypeError: a document holds an object member name that is not a string.
    """
    differ = _Differ(id_key, guards)
    differ.value(old, new, "")
    return differ.ops


def longest_increasing_subsequence(values: Sequence[int]) -> list[bool]:
    """Mark one longest strictly increasing subsequence of ``values`` (O(n log n)).

    Args:
        values: distinct integers.

    Returns:
        For each position, whether it belongs to the subsequence.
    """
    marks = [False] * len(values)
    if all(values[i] < values[i + 1] for i in range(len(values) - 1)):
        return [True] * len(values)
    tails: list[int] = []  # smallest tail value of an increasing run of each length
    tail_at: list[int] = []  # ... and its position
    previous = [-1] * len(values)
    for position, value in enumerate(values):
        if tails and value > tails[-1]:  # the common case in a mostly ordered list
            previous[position] = tail_at[-1]
            tails.append(value)
            tail_at.append(position)
            continue
        length = bisect_left(tails, value)
        if length == len(tails):
            tails.append(value)
            tail_at.append(position)
        else:
            tails[length] = value
            tail_at[length] = position
        previous[position] = tail_at[length - 1] if length else -1
    position = tail_at[-1] if tail_at else -1
    while position >= 0:
        marks[position] = True
        position = previous[position]
    return marks


class _Fenwick:
    """Prefix counts over slots, for the current index of an item while moves are made."""

    def __init__(self, occupied: list[int]) -> None:
        tree = [0, *occupied]
        size = len(occupied)
        for i in range(1, size + 1):
            parent = i + (i & -i)
            if parent <= size:
                tree[parent] += tree[i]
        self.tree = tree

    def add(self, slot: int, delta: int) -> None:
        tree = self.tree
        i = slot + 1
        while i < len(tree):
            tree[i] += delta
            i += i & -i

    def before(self, slot: int) -> int:
        """How many occupied slots come before ``slot``."""
        tree = self.tree
        total = 0
        i = slot
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


class _Differ:
    def __init__(self, id_key: str, guards: bool) -> None:
        self.id_key = id_key
        self.id_token = "/" + escape(id_key)
        self.guards = guards
        self.ops: list[Operation] = []

    def value(self, old: object, new: object, path: str) -> None:
        if same(old, new):
            return
        if isinstance(old, dict) and isinstance(new, dict):
            self.members(old, new, path)
        elif isinstance(old, list) and isinstance(new, list):
            self.array(old, new, path)
        else:
            self.ops.append({"op": "replace", "path": path, "value": new})

    def members(self, old: dict[object, object], new: dict[object, object], path: str) -> None:
        ops = self.ops
        for key, before in old.items():
            where = f"{path}/{_token(key)}"
            after = new.get(key, _ABSENT)
            if after is _ABSENT:
                ops.append({"op": "remove", "path": where})
            elif not same(before, after):
                self.value(before, after, where)
        for key, after in new.items():
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{_token(key)}", "value": after})

    def guard(self, path: str, item: object) -> None:
        """``test`` that ``path`` holds ``item`` (by its id when it has one)."""
        if not self.guards:
            return
        ident = item.get(self.id_key) if isinstance(item, dict) else None
        if type(ident) is str or type(ident) is int:
            self.ops.append({"op": "test", "path": path + self.id_token, "value": ident})
        else:
            self.ops.append({"op": "test", "path": path, "value": item})

    def array(self, old: list[object], new: list[object], path: str) -> None:
        start, end = shared_ends(old, new)
        if not start and not end:
            self.whole_array(old, new, path)
            return
        # the items both lists hold as the very same objects at both ends are unchanged: diff
        # the middle only (what the edits touch), then shift its indices past the start
        inner = _Differ(self.id_key, self.guards)
        inner.whole_array(old[start : len(old) - end], new[start : len(new) - end], path)
        self.ops += _shifted(inner.ops, path, start) if start else inner.ops

    def whole_array(self, old: list[object], new: list[object], path: str) -> None:
        """The operations for a list, matching every item."""
        old_keys, old_anonymous, old_repeated = match_keys(old, self.id_key)
        new_keys, new_anonymous, new_repeated = match_keys(new, self.id_key)
        if not (old_repeated or new_repeated or True in old_anonymous or True in new_anonymous):
            self.keyed(old, new, path, old_keys, old_anonymous, new_keys, new_anonymous)
            return
        # items matched by content, or an id twice: matching by key may cost more than
        # matching whole items by content, or than a positional diff (an edit of one of two
        # equal items, a duplicated id), so write all three and keep the smallest
        keyed, by_content, positional = (_Differ(self.id_key, self.guards) for _ in range(3))
        keyed.keyed(old, new, path, old_keys, old_anonymous, new_keys, new_anonymous)
        old_content, new_content = _content_keys(old), _content_keys(new)
        every_old, every_new = [True] * len(old), [True] * len(new)
        by_content.keyed(old, new, path, old_content, every_old, new_content, every_new)
        positional.positional(old, new, path)
        candidates: list[list[Operation]] = [keyed.ops, by_content.ops, positional.ops]
        best: list[Operation] = min(candidates, key=_size)  # the first if tied
        self.ops += best

    def positional(self, old: list[object], new: list[object], path: str) -> None:
        """Align the items by content (``difflib``, as ``jsonpatch.make_patch`` does).

        Changed items are paired in place; the rest are removed and added.
        """
        matcher = SequenceMatcher(
            None, [_content_key(item) for item in old], [_content_key(item) for item in new],
            autojunk=False,
        )  # fmt: skip
        ops = self.ops
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                continue  # the list now matches ``new`` up to j1: indices below are new ones
            paired = min(i2 - i1, j2 - j1)
            for k in range(paired):
                self.edit(old[i1 + k], new[j1 + k], f"{path}/{j1 + k}")
            for i in range(i1 + paired, i2):
                self.guard(f"{path}/{j1 + paired}", old[i])
                ops.append({"op": "remove", "path": f"{path}/{j1 + paired}"})
            for j in range(j1 + paired, j2):
                ops.append({"op": "add", "path": f"{path}/{j}", "value": new[j]})

    def keyed(
        self,
        old: list[object],
        new: list[object],
        path: str,
        old_keys: list[object],
        old_anonymous: list[bool],
        new_keys: list[object],
        new_anonymous: list[bool],
    ) -> None:
        """Match the items by key (id, or content for id-less ones): removes, moves, adds."""
        ops = self.ops
        if old_keys == new_keys:  # the same items in the same order: edits only
            match = placed = kept = list(range(len(old)))
            moving: set[int] = set()
        else:
            new_index = {key: j for j, key in enumerate(new_keys)}
            match = [new_index.get(key, -1) for key in old_keys]  # old index -> new index
            placed = [-1] * len(new)  # new index -> old index of the item that ends up there
            kept = []  # old indices of matched items
            for i, j in enumerate(match):
                if j >= 0:
                    placed[j] = i
                    kept.append(i)
            lis = longest_increasing_subsequence([match[i] for i in kept])
            moving = {i for i, stays in zip(kept, lis, strict=True) if not stays}
            if True in old_anonymous and True in new_anonymous:
                self.pair_anonymous(match, placed, moving, old_anonymous, new_anonymous, kept)

        edits = _changed(old, new, placed)
        late = [j for j in edits if len(str(j)) <= len(str(placed[j]))]
        for j in edits:  # an edit whose old index is shorter to write goes first, there
            if len(str(j)) > len(str(placed[j])):
                self.edit(old[placed[j]], new[j], f"{path}/{placed[j]}")
        for i in range(len(old) - 1, -1, -1):
            if match[i] < 0:
                self.guard(f"{path}/{i}", old[i])
                ops.append({"op": "remove", "path": f"{path}/{i}"})
        if moving:
            self.moves(old, placed, kept, moving, path)
        for j, i in enumerate(placed):
            if i < 0:
                ops.append({"op": "add", "path": f"{path}/{j}", "value": new[j]})
        for j in late:
            self.edit(old[placed[j]], new[j], f"{path}/{j}")

    def edit(self, before: object, after: object, path: str) -> None:
        """The operations inside one matched item, preceded by its guard."""
        self.guard(path, before)
        self.value(before, after, path)

    def pair_anonymous(
        self,
        match: list[int],
        placed: list[int],
        moving: set[int],
        old_anonymous: list[bool],
        new_anonymous: list[bool],
        kept: list[int],
    ) -> None:
        """Pair unmatched id-less items lying in the same gap between staying items.

        They become one in-place edit instead of a ``remove`` and an ``add``: the positional
        fallback, for items whose content changed and that have no id to be matched by.
        """
        anchors_old = [i for i in kept if i not in moving]
        anchors_new = [match[i] for i in anchors_old]
        unmatched_new: dict[int, list[int]] = {}
        for j, anonymous in enumerate(new_anonymous):
            if anonymous and placed[j] < 0:
                unmatched_new.setdefault(bisect_left(anchors_new, j), []).append(j)
        taken: dict[int, int] = {}
        for i, anonymous in enumerate(old_anonymous):
            if not anonymous or match[i] >= 0:
                continue
            gap = bisect_left(anchors_old, i)
            candidates = unmatched_new.get(gap, [])
            if taken.get(gap, 0) < len(candidates):
                j = candidates[taken.get(gap, 0)]
                taken[gap] = taken.get(gap, 0) + 1
                match[i], placed[j] = j, i
                kept.insert(bisect_left(kept, i), i)

    def moves(
        self,
        old: list[object],
        placed: list[int],
        kept: list[int],
        moving: set[int],
        path: str,
    ) -> None:
        """The fewest ``move`` operations putting the surviving items in their new order.

        Items outside the longest increasing subsequence are moved in their new order, each to
        just after the staying item that precedes it there (and after the items already moved
        behind that one). The indices each move sees are counted, not simulated: one Fenwick
        tree over the survivors' old positions counts those still in place, another counts
        the items landed after each staying item (O(log n) per move).
        """
        in_place = _Fenwick([1] * len(kept))  # survivors not yet moved, by old position
        landed = _Fenwick([0] * len(kept))  # moved items landed after the survivor there
        landed_after: dict[int, int] = {}
        landed_front = 0  # moved items landed before every staying item
        anchor = -1
        ops = self.ops
        for i in placed:
            if i < 0:
                continue
            if i not in moving:
                anchor = i
                continue
            position = bisect_left(kept, i)
            source = in_place.before(position) + landed_front + landed.before(position)
            in_place.add(position, -1)
            if anchor < 0:
                target = landed_front
                landed_front += 1
            else:
                at = bisect_left(kept, anchor)
                target = (
                    in_place.before(at + 1)
                    + landed_front
                    + landed.before(at)
                    + landed_after.get(anchor, 0)
                )
                landed.add(at, 1)
                landed_after[anchor] = landed_after.get(anchor, 0) + 1
            self.guard(f"{path}/{source}", old[i])
            ops.append({"op": "move", "from": f"{path}/{source}", "path": f"{path}/{target}"})


_ABSENT = object()


def _changed(old: list[object], new: list[object], placed: list[int]) -> list[int]:
    """The new indices whose item differs from the old item placed there.

    The hot loop of a large diff, so ``same`` is inlined for the common case: two objects
    that ``==`` calls equal are confirmed type-exact by their ``marshal`` bytes.
    """
    dumps = marshal.dumps
    changed = []
    for j, i in enumerate(placed):
        if i < 0:
            continue
        before, after = old[i], new[j]
        if before is after:
            continue
        if before != after:
            changed.append(j)
        elif type(before) is dict and type(after) is dict:
            try:
                if dumps(before, 2) != dumps(after, 2) and not same(before, after):
                    changed.append(j)
            except ValueError:
                if not same(before, after):
                    changed.append(j)
        elif not same(before, after):
            changed.append(j)
    return changed


def _token(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"JSON object member names are strings, not {type(key).__name__}")
    return escape(key)


def match_keys(items: Sequence[object], id_key: str) -> tuple[list[object], list[bool], bool]:
    """Each item's match key, unique in the list; whether it has no id; whether a key repeats.

    An item's key is its id (a string or an integer under ``id_key``); an item without one is
    keyed by its content (type and canonical JSON), so equal items match across versions. The
    n-th repeat of a key already seen (a duplicated id, or equal id-less items) is keyed
    ``_Nth(key, n)``. The differ and rebase match list items this same way.
    """
    ids = [item.get(id_key) if type(item) is dict else None for item in items]
    if all(type(ident) is str for ident in ids) and len(set(ids)) == len(ids):
        return ids, [False] * len(ids), False  # the common case: unique string ids
    keys: list[object] = []
    anonymous: list[bool] = []
    seen: dict[object, int] = {}
    repeated = False
    for item in items:
        ident = item.get(id_key) if isinstance(item, dict) else None
        if type(ident) is str or type(ident) is int:
            key: object = ident
            anonymous.append(False)
        else:
            key = _content_key(item)
            anonymous.append(True)
        count = seen.get(key, 0)
        seen[key] = count + 1
        if count:
            repeated = True
            key = _Nth(key, count)
        keys.append(key)
    return keys, anonymous, repeated


def shared_ends(
    first: list[object], second: list[object], third: list[object] | None = None
) -> tuple[int, int]:
    """How many leading and trailing items the lists hold as the very same objects.

    In all of them: the differ compares two versions of a list, rebase three.
    """
    other = second if third is None else third
    shortest = min(len(first), len(second), len(other))
    start = 0
    while start < shortest and first[start] is second[start] and first[start] is other[start]:
        start += 1
    end = 0
    room = shortest - start
    while end < room and first[-1 - end] is second[-1 - end] and first[-1 - end] is other[-1 - end]:
        end += 1
    return start, end


def _shifted(ops: list[Operation], path: str, offset: int) -> list[Operation]:
    """``ops`` on a sublist starting at ``offset``, re-addressed to the whole list at ``path``."""
    cut = len(path) + 1
    for op in ops:
        for member in ("path", "from"):
            pointer = op.get(member)
            if isinstance(pointer, str):
                index, slash, rest = pointer[cut:].partition("/")
                op[member] = f"{path}/{int(index) + offset}{slash}{rest}"
    return ops


def _content_keys(items: list[object]) -> list[object]:
    """Every item keyed by its content (ids ignored), repeats as ``_Nth``."""
    keys: list[object] = []
    seen: dict[object, int] = {}
    for item in items:
        key = _content_key(item)
        count = seen.get(key, 0)
        seen[key] = count + 1
        keys.append(key if count == 0 else _Nth(key, count))
    return keys


def _size(ops: list[Operation]) -> int:
    return len(json.dumps(ops, separators=(",", ":"), ensure_ascii=False, default=str))


def _content_key(item: object) -> object:
    """A hashable key equal for two items exactly when they are the same JSON."""
    if isinstance(item, (dict, list)):
        try:
            return _Content("json", json.dumps(item, sort_keys=True, separators=(",", ":")))
        except (TypeError, ValueError, RecursionError):
            return _Content("object", id(item))  # not JSON: matches only itself
    if type(item) is float:
        return _Content("float", repr(item))  # 0.0 and -0.0 are equal, their JSON is not
    return _Content(type(item).__name__, item)
