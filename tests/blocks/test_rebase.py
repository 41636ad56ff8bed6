"""rebase: concurrent edits merge by block id and field, converge, and clash only for real."""

from __future__ import annotations

import copy
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import (
    PatchApplyError,
    PatchConflict,
    PatchTestFailed,
    apply_patch,
    diff,
    diff_blocks,
    rebase,
)
from hardening.blocks.rebase import merge_patch

BASE: dict[str, object] = {
    "title": "Plan",
    "blocks": [{"id": f"b{i}", "text": f"t{i}", "style": "p"} for i in range(5)],
}


def _edit(change: object) -> tuple[dict[str, object], list[dict[str, object]]]:
    """A copy of BASE changed by ``change(doc)``, and the patch that does it."""
    doc = copy.deepcopy(BASE)
    change(doc)  # type: ignore[operator]
    return doc, diff(BASE, doc)


def _merge(mine: list[dict[str, object]], theirs: list[dict[str, object]]) -> object:
    """Apply ``theirs`` then ``mine`` rebased onto it."""
    head = apply_patch(BASE, theirs)
    return apply_patch(head, rebase(mine, base=BASE, head_patches=[theirs]))


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def test_edits_to_different_blocks_merge() -> None:
    """Theirs inserts a block at the top; mine, by old indices, edits block 3: both survive."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, {"id": "new", "text": "n"}))
    _, mine = _edit(lambda doc: doc["blocks"][3].update(text="mine"))
    assert mine == [{"op": "replace", "path": "/blocks/3/text", "value": "mine"}]
    rebased = rebase(mine, base=BASE, head_patches=[theirs])
    assert rebased == [{"op": "replace", "path": "/blocks/4/text", "value": "mine"}]
    merged = _merge(mine, theirs)
    assert [block["id"] for block in merged["blocks"]] == ["new", "b0", "b1", "b2", "b3", "b4"]
    assert merged["blocks"][4]["text"] == "mine"


def test_different_fields_of_one_block_merge() -> None:
    """Two edits to different fields of the same block both land."""
    _, theirs = _edit(lambda doc: doc["blocks"][2].update(style="h1"))
    _, mine = _edit(lambda doc: doc["blocks"][2].update(text="new text"))
    assert _merge(mine, theirs)["blocks"][2] == {"id": "b2", "text": "new text", "style": "h1"}


def test_edit_follows_a_moved_block() -> None:
    """An edit to a block the other side moved lands on that block, wherever it went."""
    _, theirs = _edit(lambda doc: doc["blocks"].append(doc["blocks"].pop(0)))
    _, mine = _edit(lambda doc: doc["blocks"][0].update(text="mine"))
    merged = _merge(mine, theirs)
    assert merged["blocks"][-1] == {"id": "b0", "text": "mine", "style": "p"}


def test_same_field_conflicts() -> None:
    """Both changed the same field of the same block: a conflict naming block and field."""
    _, theirs = _edit(lambda doc: doc["blocks"][1].update(text="theirs"))
    _, mine = _edit(lambda doc: doc["blocks"][1].update(text="mine"))
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=BASE, head_patches=[theirs])
    error = caught.value
    assert (error.block_id, error.field, error.op_index, error.http_status) == (
        "b1",
        "/text",
        0,
        409,
    )
    assert error.op == mine[0]


def test_same_change_is_no_conflict() -> None:
    """Both made the very same change: nothing to resolve."""
    _, theirs = _edit(lambda doc: doc["blocks"][1].update(text="same"))
    assert _merge(theirs, theirs) == apply_patch(BASE, theirs)


def test_edit_of_a_deleted_block_conflicts() -> None:
    """Editing a block the other side deleted (and deleting one it edited) is a conflict."""
    _, deleted = _edit(lambda doc: doc["blocks"].pop(2))
    _, edited = _edit(lambda doc: doc["blocks"][2].update(style="quote"))
    for mine, theirs in ((edited, deleted), (deleted, edited)):
        with pytest.raises(PatchConflict) as caught:
            rebase(mine, base=BASE, head_patches=[theirs])
        assert (caught.value.block_id, caught.value.field) == ("b2", "/style")


def test_deleting_twice_is_no_conflict() -> None:
    """Both deleted the same block: it is gone once."""
    _, theirs = _edit(lambda doc: doc["blocks"].pop(2))
    assert [block["id"] for block in _merge(theirs, theirs)["blocks"]] == ["b0", "b1", "b3", "b4"]


def test_delete_wins_over_a_move() -> None:
    """A block moved by one side and deleted by the other is deleted, without a conflict."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, doc["blocks"].pop(3)))
    _, mine = _edit(lambda doc: doc["blocks"].pop(3))
    assert "b3" not in [block["id"] for block in _merge(mine, theirs)["blocks"]]


def test_both_moving_one_block_conflicts() -> None:
    """Both moved the same block: a conflict on its position (no field)."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, doc["blocks"].pop(3)))
    _, mine = _edit(lambda doc: doc["blocks"].insert(1, doc["blocks"].pop(3)))
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=BASE, head_patches=[theirs])
    assert (caught.value.block_id, caught.value.field) == ("b3", None)


def test_both_adding_one_id_conflicts() -> None:
    """Two new blocks with the same id cannot both exist."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, {"id": "x", "text": "a"}))
    _, mine = _edit(lambda doc: doc["blocks"].append({"id": "x", "text": "b"}))
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=BASE, head_patches=[theirs])
    assert caught.value.block_id == "x"


def test_fields_outside_blocks() -> None:
    """Outside blocks a conflict names the member's pointer and no block."""
    _, theirs = _edit(lambda doc: doc.update(title="theirs"))
    _, mine = _edit(lambda doc: doc.update(title="mine"))
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=BASE, head_patches=[theirs])
    assert (caught.value.block_id, caught.value.field) == (None, "/title")


def test_arrays_without_ids_merge_by_content() -> None:
    """Items without ids are matched by content, as the differ matches them: both adds land."""
    base = {"tags": ["a", "b"]}
    theirs = [{"op": "add", "path": "/tags/0", "value": "x"}]
    mine = [{"op": "add", "path": "/tags/-", "value": "y"}]
    head = apply_patch(base, theirs)
    assert apply_patch(head, rebase(mine, base=base, head_patches=[theirs])) == {
        "tags": ["x", "a", "b", "y"]
    }


def test_one_id_less_block_does_not_stop_merging() -> None:
    """A divider without an id in the list: edits elsewhere still merge block by block."""
    base = [{"id": "a", "text": "A"}, {"type": "divider"}, {"id": "b", "text": "B"}]
    theirs = [{"op": "replace", "path": "/0/text", "value": "A2"}]
    mine = [{"op": "add", "path": "/2", "value": {"id": "n", "text": "N"}}]
    head = apply_patch(base, theirs)
    merged = apply_patch(head, rebase(mine, base=base, head_patches=[theirs]))
    assert merged == [
        {"id": "a", "text": "A2"},
        {"type": "divider"},
        {"id": "n", "text": "N"},
        {"id": "b", "text": "B"},
    ]


def test_equal_id_less_items_added_by_both_are_both_kept() -> None:
    """Two dividers added concurrently are two dividers: items without ids have no identity."""
    base = [{"id": "a"}, {"id": "b"}]
    theirs = [{"op": "add", "path": "/1", "value": {"type": "divider"}}]
    mine = [{"op": "add", "path": "/2", "value": {"type": "divider"}}]
    head = apply_patch(base, theirs)
    merged = apply_patch(head, rebase(mine, base=base, head_patches=[theirs]))
    assert merged == [{"id": "a"}, {"type": "divider"}, {"id": "b"}, {"type": "divider"}]


def test_a_duplicated_id_still_conflicts() -> None:
    """Two blocks with one id: which is which is unknown, so a change by both conflicts."""
    base = {"blocks": [{"id": "x", "v": 1}, {"id": "x", "v": 2}]}
    theirs = [{"op": "replace", "path": "/blocks/0/v", "value": 3}]
    mine = [{"op": "replace", "path": "/blocks/1/v", "value": 4}]
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=base, head_patches=[theirs])
    assert caught.value.field == "/blocks"


def test_both_moving_one_block_to_one_place_agrees() -> None:
    """Both made the same move: agreement, the block moved once."""
    _, moved = _edit(lambda doc: doc["blocks"].insert(0, doc["blocks"].pop(3)))
    merged = _merge(moved, moved)
    assert [block["id"] for block in merged["blocks"]] == ["b3", "b0", "b1", "b2", "b4"]

    def move_and_edit(doc: dict[str, list[dict[str, object]]]) -> None:
        doc["blocks"].insert(0, doc["blocks"].pop(3))
        doc["blocks"][2]["text"] = "x"  # b1

    expected, mine = _edit(move_and_edit)
    assert _merge(mine, moved) == expected  # the same move, plus an edit elsewhere


def test_both_adding_the_same_block_agrees() -> None:
    """A client retrying a save that already landed: the block is added once, no conflict."""
    _, added = _edit(lambda doc: doc["blocks"].insert(2, {"id": "x", "text": "a"}))
    merged = _merge(added, added)
    assert [block["id"] for block in merged["blocks"]] == ["b0", "b1", "x", "b2", "b3", "b4"]

    def add_two(doc: dict[str, list[dict[str, object]]]) -> None:
        doc["blocks"][2:2] = [{"id": "x", "text": "a"}, {"id": "y"}]

    _, more = _edit(add_two)
    merged = _merge(more, added)  # the retried block, and one more after it
    assert [block["id"] for block in merged["blocks"]] == ["b0", "b1", "x", "y", "b2", "b3", "b4"]


def test_both_adding_one_block_in_different_places_conflicts() -> None:
    """The same new block at two places: a position conflict."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, {"id": "x"}))
    _, mine = _edit(lambda doc: doc["blocks"].append({"id": "x"}))
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=BASE, head_patches=[theirs])
    assert (caught.value.block_id, caught.value.field) == ("x", None)


def test_delete_wins_drops_concurrent_edits() -> None:
    """``delete_wins``: a deleted block stays deleted, whichever side deleted it."""
    _, deleted = _edit(lambda doc: doc["blocks"].pop(2))
    _, edited = _edit(lambda doc: doc["blocks"][2].update(style="quote", text="new"))
    for mine, theirs in ((edited, deleted), (deleted, edited)):
        head = apply_patch(BASE, theirs)
        ops = rebase(mine, base=BASE, head_patches=[theirs], delete_wins=True)
        merged = apply_patch(head, ops)
        assert [block["id"] for block in merged["blocks"]] == ["b0", "b1", "b3", "b4"]


def test_inserts_in_one_gap_are_ordered_by_id() -> None:
    """Both inserted after the same block: the run with the smaller first id goes first."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(1, {"id": "z"}))
    _, mine = _edit(lambda doc: doc["blocks"].insert(1, {"id": "a"}))
    for first, second in ((mine, theirs), (theirs, mine)):
        ids = [block["id"] for block in _merge(first, second)["blocks"]]
        assert ids == ["b0", "a", "z", "b1", "b2", "b3", "b4"]


def test_incoming_patch_is_checked_against_its_base() -> None:
    """The incoming patch applies to the version it was written for, guards included."""
    _, theirs = _edit(lambda doc: doc["blocks"].insert(0, {"id": "new"}))
    new = copy.deepcopy(BASE)
    new["blocks"][3]["text"] = "guarded"
    guarded = diff(BASE, new, guards=True)
    assert _merge(guarded, theirs)["blocks"][4]["text"] == "guarded"
    with pytest.raises(PatchTestFailed):
        rebase(
            [{"op": "test", "path": "/title", "value": "other"}], base=BASE, head_patches=[theirs]
        )
    with pytest.raises(PatchApplyError):
        rebase([{"op": "remove", "path": "/nope"}], base=BASE, head_patches=[theirs])


def test_several_head_patches() -> None:
    """Head may be several versions ahead."""
    _, first = _edit(lambda doc: doc["blocks"].insert(0, {"id": "n1"}))
    second = [{"op": "add", "path": "/blocks/0", "value": {"id": "n2"}}]
    _, mine = _edit(lambda doc: doc["blocks"][0].update(text="mine"))
    head = apply_patch(apply_patch(BASE, first), second)
    merged = apply_patch(head, rebase(mine, base=BASE, head_patches=[first, second]))
    assert merged["blocks"][2] == {"id": "b0", "text": "mine", "style": "p"}


def test_prefer_patch_resolves_every_conflict_for_the_patch() -> None:
    """Last-write-wins: where both changed something, the incoming patch's version stays."""
    head, _ = _edit(lambda doc: (doc["blocks"][1].update(text="theirs"), doc["blocks"].pop(4)))
    _, mine = _edit(
        lambda doc: (doc["blocks"][1].update(text="mine"), doc["blocks"][4].update(text="kept"))
    )
    merged, ops = merge_patch(mine, base=BASE, head=head, prefer_patch=True)
    assert merged["blocks"][1]["text"] == "mine"
    assert merged["blocks"][-1] == {"id": "b4", "text": "kept", "style": "p"}
    assert apply_patch(head, ops) == merged


# --- convergence -------------------------------------------------------------------------


def _random_edit(doc: dict[str, object], side: str, rng: random.Random) -> dict[str, object]:
    doc = copy.deepcopy(doc)
    blocks = doc["blocks"]
    assert isinstance(blocks, list)
    for step in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.2 and blocks:
            blocks.pop(rng.randrange(len(blocks)))
        elif roll < 0.4:
            blocks.insert(rng.randint(0, len(blocks)), {"id": f"{side}{step}", "text": "new"})
        elif roll < 0.6 and blocks:
            blocks.insert(rng.randint(0, len(blocks) - 1), blocks.pop(rng.randrange(len(blocks))))
        elif roll < 0.9 and blocks:
            rng.choice(blocks)[rng.choice(["text", "style"])] = f"{side}{step}"
        else:
            doc["title"] = f"{side}{step}"
    return doc


def _converges(base: dict[str, object], a: dict[str, object], b: dict[str, object]) -> bool:
    """Both orders of applying two concurrent edits agree, or both refuse; True if merged."""
    patch_a, patch_b = diff(base, a), diff(base, b)
    outcomes = []
    for first, second, head in ((patch_a, patch_b, a), (patch_b, patch_a, b)):
        try:
            outcomes.append(apply_patch(head, rebase(second, base=base, head_patches=[first])))
        except PatchConflict:
            outcomes.append(None)
    assert (outcomes[0] is None) == (outcomes[1] is None)
    if outcomes[0] is None:
        return False
    assert _canonical(outcomes[0]) == _canonical(outcomes[1])
    return True


def test_convergence_fuzz() -> None:
    """3,000 seeded pairs of concurrent edits converge whichever is saved first."""
    rng = random.Random(6)
    merged = 0
    for _ in range(3000):
        base = {
            "title": "t",
            "blocks": [
                {"id": f"b{i}", "text": "x", "style": "p"} for i in range(rng.randint(0, 7))
            ],
        }
        merged += _converges(base, _random_edit(base, "a", rng), _random_edit(base, "b", rng))
    assert merged > 1500  # most random pairs do not clash


SIDE = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "move", "edit"]), st.integers(0, 9), st.integers(0, 9)
    ),
    max_size=4,
)


def _apply_script(
    base: list[dict[str, object]], script: list[tuple[str, int, int]], side: str
) -> list[dict[str, object]]:
    blocks = copy.deepcopy(base)
    for step, (action, i, j) in enumerate(script):
        if action == "insert" or not blocks:
            blocks.insert(i % (len(blocks) + 1), {"id": f"{side}{step}", "v": 0})
        elif action == "delete":
            blocks.pop(i % len(blocks))
        elif action == "move":
            item = blocks.pop(i % len(blocks))
            blocks.insert(j % (len(blocks) + 1), item)
        else:
            blocks[i % len(blocks)]["v"] = f"{side}{step}"
    return blocks


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 8), script_a=SIDE, script_b=SIDE)
def test_convergence(
    size: int, script_a: list[tuple[str, int, int]], script_b: list[tuple[str, int, int]]
) -> None:
    """Two concurrent edit scripts on a block list converge (or both orders conflict)."""
    base = [{"id": i, "v": 0} for i in range(size)]
    a, b = _apply_script(base, script_a, "a"), _apply_script(base, script_b, "b")
    patch_a, patch_b = diff_blocks(base, a), diff_blocks(base, b)
    results = []
    for first, second, head in ((patch_a, patch_b, a), (patch_b, patch_a, b)):
        try:
            results.append(apply_patch(head, rebase(second, base=base, head_patches=[first])))
        except PatchConflict:
            results.append(None)
    assert results[0] == results[1]


MIXED_SIDE = st.lists(
    st.tuples(
        st.sampled_from(["insert", "divider", "delete", "move", "edit"]),
        st.integers(0, 9),
        st.integers(0, 9),
    ),
    max_size=4,
)


def _apply_mixed(
    base: list[dict[str, object]], script: list[tuple[str, int, int]], side: str
) -> list[dict[str, object]]:
    """Like ``_apply_script``, with id-less dividers among the blocks (never edited)."""
    blocks = copy.deepcopy(base)
    for step, (action, i, j) in enumerate(script):
        ids = [k for k, block in enumerate(blocks) if "id" in block]
        if action == "divider":
            blocks.insert(i % (len(blocks) + 1), {"type": "divider"})
        elif action == "insert" or not blocks:
            blocks.insert(i % (len(blocks) + 1), {"id": f"{side}{step}", "v": 0})
        elif action == "delete":
            blocks.pop(i % len(blocks))
        elif action == "move":
            item = blocks.pop(i % len(blocks))
            blocks.insert(j % (len(blocks) + 1), item)
        elif ids:
            blocks[ids[i % len(ids)]]["v"] = f"{side}{step}"
    return blocks


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 6), dividers=st.integers(0, 2), a=MIXED_SIDE, b=MIXED_SIDE)
def test_convergence_with_id_less_items(
    size: int,
    dividers: int,
    a: list[tuple[str, int, int]],
    b: list[tuple[str, int, int]],
) -> None:
    """Lists holding id-less items merge, and converge whichever side is saved first."""
    base: list[dict[str, object]] = [{"id": i, "v": 0} for i in range(size)]
    for k in range(dividers):
        base.insert(k * 2 % (len(base) + 1), {"type": "divider"})
    side_a, side_b = _apply_mixed(base, a, "a"), _apply_mixed(base, b, "b")
    patch_a, patch_b = diff_blocks(base, side_a), diff_blocks(base, side_b)
    results = []
    for first, second, head in ((patch_a, patch_b, side_a), (patch_b, patch_a, side_b)):
        try:
            results.append(apply_patch(head, rebase(second, base=base, head_patches=[first])))
        except PatchConflict:
            results.append(None)
    assert results[0] == results[1]
    if not a or not b or results[0] is None:
        return
    merged = results[0]
    for block in [*side_a, *side_b]:  # every block either side added is in the merge
        if "id" in block and isinstance(block["id"], str):
            assert block["id"] in [item.get("id") for item in merged]


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 12), script_a=SIDE, script_b=SIDE)
def test_setting_aside_shared_ends_changes_nothing(
    size: int, script_a: list[tuple[str, int, int]], script_b: list[tuple[str, int, int]]
) -> None:
    """Merging only the middle between the ends all three lists share gives the same list (or
    the same conflict) as merging every item."""
    from hardening.blocks.rebase import _Conflict, _Merger

    base = [{"id": i, "v": 0} for i in range(size)]
    sides = []
    for script, name in ((script_a, "a"), (script_b, "b")):
        edited = _apply_script(base, script, name)
        # copy on write, as rebase builds them: untouched blocks are base's own objects
        sides.append(apply_patch(base, diff_blocks(base, edited), share=True))
    merger = _Merger("id", False, frozenset(), False)
    outcomes = []
    for merge in (merger.array, merger.whole_array):
        try:
            outcomes.append(merge(base, sides[0], sides[1], ()))
        except _Conflict as conflict:
            outcomes.append(conflict.reason)
    assert outcomes[0] == outcomes[1]
