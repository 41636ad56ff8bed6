"""Three-way text merge (``hardening.blocks._text``) and rebase merging concurrent text edits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import PatchConflict, apply_patch, rebase
from hardening.blocks._text import FINE_LIMIT, merge_text, regions

BASE_TEXT = st.text(alphabet="abc ", min_size=2, max_size=40)


def test_edits_of_different_parts_merge() -> None:
    """Two edits of one paragraph in different words: both land."""
    base = "The quick brown fox jumps over the lazy dog."
    head = "The quick red fox jumps over the lazy dog."
    mine = "The quick brown fox jumps over the sleepy dog."
    assert merge_text(base, head, mine) == "The quick red fox jumps over the sleepy dog."


def test_overlapping_edits_conflict() -> None:
    """Both changed the same word: no merge."""
    assert merge_text("one two three", "one 2 three", "one TWO three") is None


def test_inserts_at_one_point_conflict() -> None:
    """Two insertions at the same place: their order is undefined, so it is a conflict."""
    assert merge_text("ab", "aXb", "aYb") is None


def test_the_same_edit_twice_counts_once() -> None:
    """The same change made on both sides is one change."""
    assert merge_text("hello world", "hello big world", "hello big world!") == "hello big world!"


def test_an_insertion_at_the_end_of_a_replacement_merges() -> None:
    """Replacing ``[i, j)`` and inserting at ``j`` are in a defined order."""
    assert merge_text("abcd", "aXd", "abYcd") is None  # inside the replaced range: conflict
    assert merge_text("abcd", "aXd", "abcYd") == "aXYd"  # at its end: after it
    assert merge_text("abcd", "aXcd", "abYcd") == "aXYcd"


def test_long_middles_are_one_region() -> None:
    """Past ``FINE_LIMIT`` the changed middle is one region (bounded cost)."""
    base = "x" * (FINE_LIMIT + 10)
    edited = "y" + base[1:-1] + "y"
    assert regions(base, edited) == [(0, len(base), edited)]


@st.composite
def _disjoint_edits(draw: st.DrawFn) -> tuple[str, str, str, str]:
    """A base text, two edits of parts at least one character apart, and both applied."""
    base = draw(BASE_TEXT)
    cuts = sorted(draw(st.lists(st.integers(0, len(base)), min_size=4, max_size=4)))
    a1, a2, b1, b2 = cuts
    if b1 <= a2:  # keep a character between the two parts
        b1 = a2 + 1
        b2 = max(b1, b2)
    if b2 > len(base):
        a1, a2, b1, b2 = 0, 0, min(1, len(base)), len(base)
    text_a = draw(st.text(alphabet="XYZ", min_size=1, max_size=5))
    text_b = draw(st.text(alphabet="PQR", min_size=1, max_size=5))
    head = base[:a1] + text_a + base[a2:]
    mine = base[:b1] + text_b + base[b2:]
    both = base[:a1] + text_a + base[a2:b1] + text_b + base[b2:]
    return base, head, mine, both


@settings(max_examples=400, deadline=None)
@given(_disjoint_edits())
def test_edits_that_do_not_overlap_both_survive(edits: tuple[str, str, str, str]) -> None:
    """Edits of parts a character apart merge into the text with both."""
    base, head, mine, both = edits
    assert merge_text(base, head, mine) == both
    assert merge_text(base, mine, head) == both


@settings(max_examples=400, deadline=None)
@given(base=BASE_TEXT, head=BASE_TEXT, mine=BASE_TEXT)
def test_the_merge_does_not_depend_on_who_saved_first(base: str, head: str, mine: str) -> None:
    """Any three texts: the same outcome in either order (merged text, or a conflict)."""
    assert merge_text(base, head, mine) == merge_text(base, mine, head)


@settings(max_examples=300, deadline=None)
@given(base=BASE_TEXT, head=BASE_TEXT, mine=BASE_TEXT)
def test_a_merge_keeps_each_sides_edit(base: str, head: str, mine: str) -> None:
    """When it merges: with only one side's edit, the merge is that side's text."""
    merged = merge_text(base, head, mine)
    if merged is not None and head == base:
        assert merged == mine
    assert merge_text(base, base, mine) == mine
    assert merge_text(base, head, head) == head


# --- rebase of documents ---------------------------------------------------------------------


def _blocks(text: str) -> list[dict[str, object]]:
    return [{"id": "a", "type": "p", "content": text}, {"id": "b", "type": "h", "content": "T"}]


def test_rebase_merges_edits_of_one_text_field() -> None:
    """Two users edit different sentences of one block: the rebase merges them."""
    base = _blocks("First sentence. Second sentence.")
    theirs = [{"op": "replace", "path": "/0/content", "value": "First line. Second sentence."}]
    mine = [{"op": "replace", "path": "/0/content", "value": "First sentence. Second line."}]
    head = apply_patch(base, theirs)
    merged = apply_patch(head, rebase(mine, base=base, head_patches=[theirs]))
    assert merged[0]["content"] == "First line. Second line."


def test_rebase_text_conflict_names_the_field() -> None:
    """Overlapping edits of the text: a conflict on that block and field."""
    base = _blocks("abc")
    theirs = [{"op": "replace", "path": "/0/content", "value": "aXc"}]
    mine = [{"op": "replace", "path": "/0/content", "value": "aYc"}]
    with pytest.raises(PatchConflict) as caught:
        rebase(mine, base=base, head_patches=[theirs])
    assert (caught.value.block_id, caught.value.field) == ("a", "/content")


def test_only_text_fields_merge_as_text() -> None:
    """``type`` is not a text field: two different changes of it conflict, never mix."""
    base = [{"id": "a", "type": "todo"}]
    theirs = [{"op": "replace", "path": "/0/type", "value": "done"}]
    mine = [{"op": "replace", "path": "/0/type", "value": "todos"}]
    with pytest.raises(PatchConflict):
        rebase(mine, base=base, head_patches=[theirs])
    base_text = _blocks("one two")
    theirs = [{"op": "replace", "path": "/0/content", "value": "1 two"}]
    mine = [{"op": "replace", "path": "/0/content", "value": "one 2"}]
    with pytest.raises(PatchConflict):
        rebase(mine, base=base_text, head_patches=[theirs], text_fields=())


@settings(max_examples=200, deadline=None)
@given(_disjoint_edits())
def test_rebase_converges_on_text(edits: tuple[str, str, str, str]) -> None:
    """Whichever of two non-overlapping text edits is saved first, the page is the same."""
    base_text, head_text, mine_text, both = edits
    base = _blocks(base_text)
    patch_a = [{"op": "replace", "path": "/0/content", "value": head_text}]
    patch_b = [{"op": "replace", "path": "/0/content", "value": mine_text}]
    results = []
    for first, second in ((patch_a, patch_b), (patch_b, patch_a)):
        head = apply_patch(base, first)
        results.append(apply_patch(head, rebase(second, base=base, head_patches=[first])))
    assert results[0] == results[1]
    assert results[0][0]["content"] == both
