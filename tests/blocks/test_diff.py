"""diff_blocks / diff: exact round trips, identity by id, fewest moves, guards, fallbacks."""

from __future__ import annotations

import copy
import json
import random
from bisect import bisect_left

import jsonpatch
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardening import PatchTestFailed, apply_patch, diff, diff_blocks
from hardening.blocks.diff import _Differ, longest_increasing_subsequence


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _block(ident: object, text: str = "x", **extra: object) -> dict[str, object]:
    return {"id": ident, "type": "paragraph", "content": {"text": text, "marks": []}, **extra}


def _page(n: int) -> list[dict[str, object]]:
    return [_block(f"b{i}", f"text {i}") for i in range(n)]


def _kinds(ops: list[dict[str, object]]) -> list[object]:
    return [op["op"] for op in ops]


def _round_trip(old: object, new: object, ops: list[dict[str, object]]) -> None:
    assert _canonical(apply_patch(old, ops)) == _canonical(new)
    assert jsonpatch.apply_patch(copy.deepcopy(old), ops) == new


# --- the shapes of common edits ----------------------------------------------------------


def test_edit_is_one_fine_grained_replace() -> None:
    """Editing a block's text is one ``replace`` of that field, at the block's index."""
    old = _page(5)
    new = copy.deepcopy(old)
    new[3]["content"]["text"] = "changed"
    assert diff_blocks(old, new) == [
        {"op": "replace", "path": "/3/content/text", "value": "changed"}
    ]


def test_insert_is_one_add() -> None:
    """An insert anywhere is one ``add`` (no cascade of replaces)."""
    old = _page(5)
    new = [_block("new"), *copy.deepcopy(old)]
    assert diff_blocks(old, new) == [{"op": "add", "path": "/0", "value": new[0]}]


def test_delete_is_one_remove() -> None:
    """A delete is one ``remove``."""
    old = _page(5)
    assert diff_blocks(old, old[:2] + old[3:]) == [{"op": "remove", "path": "/2"}]


def test_move_is_one_move() -> None:
    """Moving the last block to the top is one ``move``."""
    old = _page(5)
    assert diff_blocks(old, [old[4], *old[:4]]) == [{"op": "move", "from": "/4", "path": "/0"}]


def test_moved_and_edited_keeps_its_identity() -> None:
    """A block that moved and changed is a ``move`` plus an edit inside it, not remove + add."""
    old = _page(5)
    edited = copy.deepcopy(old[0])
    edited["content"]["text"] = "changed"
    new = [*old[1:], edited]
    ops = diff_blocks(old, new)
    assert ops == [
        {"op": "move", "from": "/0", "path": "/4"},
        {"op": "replace", "path": "/4/content/text", "value": "changed"},
    ]
    _round_trip(old, new, ops)


def test_fine_grained_member_changes() -> None:
    """Members added, removed and changed inside a block each get their own operation."""
    old = [{"id": 1, "a": 1, "b": {"c": [1, 2, 3]}, "gone": True}]
    new = [{"id": 1, "a": 2, "b": {"c": [1, 3]}, "added": None}]
    ops = diff_blocks(old, new)
    assert sorted(_kinds(ops)) == ["add", "remove", "remove", "replace"]
    _round_trip(old, new, ops)


def test_keys_are_escaped() -> None:
    """Member names with ``/`` and ``~`` are escaped in pointers."""
    old = [{"id": 1, "a/b": 1, "m~n": 1}]
    new = [{"id": 1, "a/b": 2, "m~n": 2}]
    assert {op["path"] for op in diff_blocks(old, new)} == {"/0/a~1b", "/0/m~0n"}


@pytest.mark.parametrize(("before", "after"), [(True, 1), (1, True), (1, 1.0), (0, False)])
def test_bool_int_float_are_different(before: object, after: object) -> None:
    """``True``, ``1`` and ``1.0`` are equal in Python but not the same JSON: a replace."""
    ops = diff_blocks([{"id": 1, "v": before}], [{"id": 1, "v": after}])
    assert ops == [{"op": "replace", "path": "/0/v", "value": after}]


@pytest.mark.parametrize(
    ("old", "new"),
    [({"a": 0.0}, {"a": -0.0}), ([0.0], [-0.0]), ({"a": [1, -0.0]}, {"a": [1, 0.0]})],
)
def test_zero_and_negative_zero_differ(old: object, new: object) -> None:
    """``0.0`` and ``-0.0`` are equal numbers but different JSON: a change, replaced exactly."""
    ops = diff(old, new)
    assert len(ops) == 1
    assert ops[0]["op"] == "replace"
    assert json.dumps(apply_patch(old, ops)) == json.dumps(new)


def test_key_order_is_no_change() -> None:
    """The same members in another order are the same block."""
    assert diff_blocks([{"id": 1, "a": 1, "b": 2}], [{"b": 2, "id": 1, "a": 1}]) == []


def test_empty_lists() -> None:
    """From and to empty lists: adds and removes only."""
    _round_trip([], _page(3), diff_blocks([], _page(3)))
    _round_trip(_page(3), [], diff_blocks(_page(3), []))


def test_wrong_arguments() -> None:
    """``diff_blocks`` needs two lists."""
    with pytest.raises(TypeError):
        diff_blocks({"a": 1}, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        diff_blocks([], "abc")


# --- fallbacks ---------------------------------------------------------------------------


def test_id_less_blocks_are_matched_by_content() -> None:
    """Without ids, an insert at the top is still one ``add`` (matched by content)."""
    old = [{"text": f"p{i}"} for i in range(5)]
    new = [{"text": "new"}, *copy.deepcopy(old)]
    assert diff_blocks(old, new) == [{"op": "add", "path": "/0", "value": {"text": "new"}}]


def test_id_less_edit_in_place() -> None:
    """An id-less block edited in place is diffed in place (paired by position in its gap)."""
    old = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    new = [{"text": "a"}, {"text": "B"}, {"text": "c"}]
    assert diff_blocks(old, new) == [{"op": "replace", "path": "/1/text", "value": "B"}]


def test_duplicate_ids_match_by_occurrence() -> None:
    """The n-th block with an id matches the n-th with that id on the other side."""
    old = [_block("dup", "first"), _block("dup", "second"), _block("x")]
    new = [_block("dup", "first"), _block("x"), _block("dup", "second changed")]
    ops = diff_blocks(old, new)
    _round_trip(old, new, ops)
    assert "add" not in _kinds(ops)
    assert "remove" not in _kinds(ops)


@pytest.mark.parametrize("ident", [None, True, 1.5, [1], {"a": 1}])
def test_unusable_ids_fall_back_to_content(ident: object) -> None:
    """Ids that are not strings or integers (booleans included) do not identify blocks."""
    old = [{"id": ident, "t": 1}, _block(1)]
    new = [_block(1), {"id": ident, "t": 2}]
    _round_trip(old, new, diff_blocks(old, new))


def test_a_repeated_id_moved_is_one_move() -> None:
    """Three blocks sharing an id, rotated: one ``move`` (matched by content), not 3 edits."""
    old = [{"id": "b", "t": "aaaaa"}, {"id": "b", "t": "bbb"}, {"id": "b", "t": "bb"}]
    new = [old[2], old[0], old[1]]
    assert diff_blocks(old, new) == [{"op": "move", "from": "/2", "path": "/0"}]


def test_id_less_items_take_the_smallest_matching() -> None:
    """A list of id-less marks: a positional edit where that is shorter than remove + add."""
    old = {"marks": ["b", "i", "u"]}
    new = {"marks": ["b", "s", "u"]}
    assert diff(old, new) == [{"op": "replace", "path": "/marks/1", "value": "s"}]


def _size(ops: list[dict[str, object]]) -> int:
    return len(json.dumps(ops, separators=(",", ":")))


@settings(max_examples=300, deadline=None)
@given(
    old=st.lists(st.fixed_dictionaries({"id": st.sampled_from("ab"), "t": st.sampled_from("xyz")})),
    new=st.lists(st.fixed_dictionaries({"id": st.sampled_from("ab"), "t": st.sampled_from("xyz")})),
)
def test_repeated_ids_never_cost_more_than_a_positional_diff(
    old: list[dict[str, object]], new: list[dict[str, object]]
) -> None:
    """With repeated ids the differ keeps the smallest of its matchings: never larger than
    aligning the items by content with difflib (what ``jsonpatch.make_patch`` does), and every
    candidate is a correct patch."""
    assume(any(len({b["id"] for b in items}) < len(items) for items in (old, new)))
    ops = diff_blocks(old, new)
    assert apply_patch(old, ops) == new
    positional = _Differ("id", guards=False)
    positional.positional(old, new, "")
    assert apply_patch(old, positional.ops) == new
    assert _size(ops) <= _size(positional.ops)


def test_mixed_lists() -> None:
    """Scalars, id-less and id'd items mixed in one list."""
    old = [1, "a", None, _block(1), {"t": 1}, [1, 2], 1]
    new = [_block(1), 1, [1, 2, 3], "b", {"t": 1}, None, 1, 1]
    _round_trip(old, new, diff_blocks(old, new))


def test_string_and_integer_ids_differ() -> None:
    """Id ``1`` and id ``"1"`` are different blocks."""
    old = [{"id": 1, "t": "a"}]
    new = [{"id": "1", "t": "a"}]
    assert _kinds(diff_blocks(old, new)) == ["remove", "add"]


# --- guards ------------------------------------------------------------------------------


def test_guards_test_the_id_before_index_operations() -> None:
    """With guards, every index operation on an existing block is preceded by a ``test``."""
    old = _page(4)
    edited = copy.deepcopy(old[1])
    edited["content"]["text"] = "changed"
    new = [old[3], old[0], edited]
    ops = diff_blocks(old, new, guards=True)
    for position, op in enumerate(ops):
        if op["op"] in ("remove", "move", "replace"):
            guard = ops[position - 1]
            assert guard["op"] == "test"
            assert str(guard["path"]).endswith("/id")
    _round_trip(old, new, ops)


def test_guards_refuse_a_shifted_document() -> None:
    """Applied to a version where the indices mean other blocks, a guarded patch fails."""
    old = _page(4)
    new = copy.deepcopy(old)
    new[2]["content"]["text"] = "changed"
    shifted = [_block("intruder"), *copy.deepcopy(old)]
    unguarded = diff_blocks(old, new)
    assert apply_patch(shifted, unguarded)[2]["id"] == "b1"  # the wrong block was edited
    with pytest.raises(PatchTestFailed):
        apply_patch(shifted, diff_blocks(old, new, guards=True))


def test_guards_on_id_less_blocks_test_the_whole_value() -> None:
    """A block without an id is guarded by its whole value."""
    ops = diff_blocks([{"t": 1}, {"t": 2}], [{"t": 2}], guards=True)
    assert ops == [{"op": "test", "path": "/0", "value": {"t": 1}}, {"op": "remove", "path": "/0"}]


# --- diff() on whole documents -----------------------------------------------------------


def test_diff_of_a_page() -> None:
    """Block lists nested in a document are diffed by id, other members member by member."""
    old = {"title": "T", "meta": {"tags": ["a", "b"]}, "blocks": _page(4)}
    new = copy.deepcopy(old)
    new["title"] = "T2"
    new["meta"]["tags"].insert(1, "c")
    new["blocks"].insert(0, new["blocks"].pop())
    ops = diff(old, new)
    assert {"op": "move", "from": "/blocks/3", "path": "/blocks/0"} in ops
    assert {"op": "add", "path": "/meta/tags/1", "value": "c"} in ops
    _round_trip(old, new, ops)


@pytest.mark.parametrize(("old", "new"), [(1, "1"), ({}, []), ([1], {"0": 1}), (None, 0)])
def test_diff_of_different_types_is_a_replace(old: object, new: object) -> None:
    """A change of type is one ``replace`` (of the root here)."""
    assert diff(old, new) == [{"op": "replace", "path": "", "value": new}]


def test_diff_nested_block_lists() -> None:
    """Children blocks (a block list inside a block) are matched by id too."""
    old = [{"id": 1, "children": [_block("c1"), _block("c2")]}]
    new = [{"id": 1, "children": [_block("c2"), _block("c1")]}]
    ops = diff(old, new)
    assert ops == [{"op": "move", "from": "/0/children/0", "path": "/0/children/1"}]
    _round_trip(old, new, ops)


# --- properties --------------------------------------------------------------------------

IDS = st.sampled_from(["a", "b", "c", "d", "e", "f", 0, 1, 2, 3])
SCALARS = st.sampled_from([None, True, False, 0, 1, 2, 1.0, 1.5, "", "a", "b"])
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["x", "y", "~", "/"]), inner, max_size=3)
    ),
    max_leaves=4,
)
BLOCK = st.fixed_dictionaries({"id": IDS, "content": VALUES})
ITEMS = st.one_of(BLOCK, BLOCK, BLOCK, VALUES)


def _unique_blocks(count: int) -> st.SearchStrategy[list[dict[str, object]]]:
    return st.lists(
        st.fixed_dictionaries({"id": st.integers(0, 50), "v": st.integers(0, 3)}),
        max_size=count,
        unique_by=lambda block: block["id"],
    )


@settings(max_examples=200, deadline=None)
@given(old=st.lists(ITEMS, max_size=8), new=st.lists(ITEMS, max_size=8), guards=st.booleans())
def test_round_trip_any_two_lists(old: list[object], new: list[object], guards: bool) -> None:
    """For any two lists (ids, duplicates, id-less, scalars), the patch turns old into new."""
    _round_trip(old, new, diff_blocks(old, new, guards=guards))


@st.composite
def _edited(draw: st.DrawFn) -> tuple[list[object], list[object]]:
    old = draw(st.lists(ITEMS, max_size=10))
    new = copy.deepcopy(old)
    for _ in range(draw(st.integers(0, 5))):
        action = draw(st.sampled_from(["insert", "delete", "move", "edit"]))
        if action == "insert" or not new:
            new.insert(draw(st.integers(0, len(new))), draw(ITEMS))
        elif action == "delete":
            new.pop(draw(st.integers(0, len(new) - 1)))
        elif action == "move":
            item = new.pop(draw(st.integers(0, len(new) - 1)))
            new.insert(draw(st.integers(0, len(new))), item)
        else:
            position = draw(st.integers(0, len(new) - 1))
            if isinstance(new[position], dict):
                new[position]["content"] = draw(VALUES)
            else:
                new[position] = draw(VALUES)
    return old, new


@settings(max_examples=200, deadline=None)
@given(pair=_edited(), guards=st.booleans())
def test_round_trip_edit_scripts(pair: tuple[list[object], list[object]], guards: bool) -> None:
    """Lists derived by inserts, deletes, moves and edits round-trip exactly."""
    old, new = pair
    _round_trip(old, new, diff_blocks(old, new, guards=guards))


@settings(max_examples=300, deadline=None)
@given(old=VALUES, new=VALUES)
def test_round_trip_any_json(old: object, new: object) -> None:
    """``diff`` round-trips any two JSON values."""
    _round_trip(old, new, diff(old, new))


def _lis_length(values: list[int]) -> int:
    tails: list[int] = []
    for value in values:
        position = bisect_left(tails, value)
        tails[position : position + 1] = [value]
    return len(tails)


@settings(max_examples=300, deadline=None)
@given(old=_unique_blocks(12), new=_unique_blocks(12))
def test_fewest_moves(old: list[dict[str, object]], new: list[dict[str, object]]) -> None:
    """The number of moves is len(kept) - LIS: no identity is ever lost, no move wasted."""
    ops = diff_blocks(old, new)
    position = {block["id"]: j for j, block in enumerate(new)}
    kept = [position[block["id"]] for block in old if block["id"] in position]
    assert _kinds(ops).count("move") == len(kept) - _lis_length(kept)
    assert _kinds(ops).count("remove") == len(old) - len(kept)
    assert _kinds(ops).count("add") == len(new) - len(kept)
    _round_trip(old, new, ops)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 30), unique=True, max_size=20))
def test_longest_increasing_subsequence(values: list[int]) -> None:
    """The marked positions are increasing and as many as the LIS length."""
    marks = longest_increasing_subsequence(values)
    chosen = [value for value, mark in zip(values, marks, strict=True) if mark]
    assert chosen == sorted(chosen)
    assert len(chosen) == _lis_length(values)


def _random_item(rng: random.Random, serial: int) -> object:
    roll = rng.random()
    if roll < 0.1:
        return {"text": rng.choice("abc")}
    if roll < 0.15:
        return rng.choice([1, True, 1.0, "x", None, [1], {}])
    ident: object = f"b{serial}"
    if roll < 0.25:
        ident = rng.choice([serial % 4, f"b{serial % 3}"])  # duplicates, integer ids
    return {
        "id": ident,
        "t": rng.choice("ph"),
        "c": {"x": rng.randint(0, 2), "l": [0] * rng.randint(0, 2)},
    }


def test_round_trip_fuzz() -> None:
    """3,000 seeded random edit scripts on block lists of up to 30 items round-trip exactly."""
    rng = random.Random(6)
    for _ in range(3000):
        old = [_random_item(rng, i) for i in range(rng.randint(0, 30))]
        new = copy.deepcopy(old)
        if rng.random() < 0.3:
            rng.shuffle(new)
        for _ in range(rng.randint(0, 6)):
            roll = rng.random()
            if roll < 0.3 and new:
                new.pop(rng.randrange(len(new)))
            elif roll < 0.55:
                new.insert(rng.randint(0, len(new)), _random_item(rng, rng.randint(0, 40)))
            elif roll < 0.75 and new:
                new.insert(rng.randint(0, len(new) - 1), new.pop(rng.randrange(len(new))))
            elif new:
                item = new[rng.randrange(len(new))]
                if isinstance(item, dict):
                    item["c"] = {"x": rng.choice([1, True, 1.0, "1"])}
        ops = diff_blocks(old, new, guards=rng.random() < 0.5)
        assert _canonical(apply_patch(old, ops)) == _canonical(new)
        assert jsonpatch.apply_patch(old, ops) == new


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(0, 30),
    script=st.lists(
        st.tuples(st.sampled_from(["insert", "delete", "move", "edit"]), st.integers(0, 99)),
        max_size=5,
    ),
    ids=st.booleans(),
)
def test_shared_items_are_set_aside(size: int, script: list[tuple[str, int]], ids: bool) -> None:
    """Lists sharing their untouched items (as ``apply_patch(share=True)`` leaves them): the
    differ diffs only the middle, and the patch is as exact and as short as on copies."""
    old: list[dict[str, object]] = [
        {"id": f"b{i}", "v": i} if ids or i % 3 else {"v": i} for i in range(size)
    ]
    new = list(old)  # the same block objects, as after a copy-on-write edit
    for step, (action, at) in enumerate(script):
        if action == "insert" or not new:
            new.insert(at % (len(new) + 1), {"id": f"n{step}", "v": -step})
        elif action == "delete":
            new.pop(at % len(new))
        elif action == "move":
            new.insert((at * 7) % len(new), new.pop(at % len(new)))
        else:
            index = at % len(new)
            new[index] = {**new[index], "v": f"edited {step}"}
    shared = diff_blocks(old, new)
    copied = diff_blocks(old, copy.deepcopy(new))
    assert apply_patch(old, shared) == new
    assert len(shared) <= len(copied)
