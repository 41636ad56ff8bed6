"""apply_patch / validate_patch: RFC 6902 and 6901 semantics, atomicity, limits, hostile input."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import (
    ConfigurationError,
    InvalidPatch,
    PatchApplyError,
    PatchError,
    PatchLimitExceeded,
    PatchLimits,
    PatchTestFailed,
    apply_patch,
    validate_patch,
)

DOC: dict[str, object] = {"a": {"b": [1, 2, 3]}, "c": "x", "": 0, "m~n": 1, "a/b": 2}


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


# --- RFC 6901 pointers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [("", DOC), ("/", 0), ("/m~0n", 1), ("/a~1b", 2), ("/a/b/0", 1), ("/a/b/2", 3)],
)
def test_pointer_resolution(path: str, expected: object) -> None:
    """``""`` is the document, ``/`` the member ``""``, ``~0``/``~1`` decode to ``~`` and ``/``."""
    assert apply_patch(DOC, [{"op": "test", "path": path, "value": expected}]) == DOC


def test_escapes_decode_in_order() -> None:
    """``~01`` is ``~1`` (``~1`` is decoded before ``~0``), not ``/``."""
    doc = {"~1": "tilde-one", "/": "slash"}
    assert apply_patch(doc, [{"op": "test", "path": "/~01", "value": "tilde-one"}]) == doc


@pytest.mark.parametrize("path", ["a", "/~2", "/a~", "/~"])
def test_malformed_pointer_is_invalid(path: str) -> None:
    """A pointer not starting with ``/`` or with a bad escape is refused before applying."""
    with pytest.raises(InvalidPatch, match="JSON Pointer"):
        validate_patch([{"op": "remove", "path": path}])


@pytest.mark.parametrize("token", ["01", "00", "-1", "+1", "1e0", " 1", "\u0661"])
def test_array_index_syntax_is_strict(token: str) -> None:
    """Array indices have no sign, exponent, leading zero or non-ASCII digit (RFC 6901 §4)."""
    with pytest.raises(PatchApplyError, match="not an array index"):
        apply_patch(["a", "b"], [{"op": "replace", "path": f"/{token}", "value": 0}])


def test_leading_zero_is_a_fine_object_key() -> None:
    """On an object ``01`` is just a member name."""
    assert apply_patch({}, [{"op": "add", "path": "/01", "value": 1}]) == {"01": 1}


@pytest.mark.parametrize("op", ["remove", "replace", "test"])
def test_dash_is_only_for_adding(op: str) -> None:
    """``-`` (after the last element) names no existing element."""
    with pytest.raises(PatchApplyError):
        apply_patch([1], [{"op": op, "path": "/-", "value": 1}])


def test_dash_appends() -> None:
    """``add`` to ``-`` appends."""
    assert apply_patch([1], [{"op": "add", "path": "/-", "value": 2}]) == [1, 2]


@pytest.mark.parametrize("index", ["2", "99999999999999999999999999999", "9" * 5000])
def test_index_past_the_end(index: str) -> None:
    """A huge index is simply out of range (no overflow, no int-parsing limit)."""
    with pytest.raises(PatchApplyError, match="past the end"):
        apply_patch([1, 2], [{"op": "replace", "path": f"/{index}", "value": 0}])


def test_add_at_length_appends_but_not_beyond() -> None:
    """``add`` may insert at ``len`` (the end) but not past it."""
    assert apply_patch([1], [{"op": "add", "path": "/1", "value": 2}]) == [1, 2]
    with pytest.raises(PatchApplyError):
        apply_patch([1], [{"op": "add", "path": "/2", "value": 2}])


# --- RFC 6902 operations -----------------------------------------------------------------


def test_add_replaces_an_existing_member() -> None:
    """§4.1: ``add`` on an existing member replaces it."""
    assert apply_patch({"a": 1}, [{"op": "add", "path": "/a", "value": 2}]) == {"a": 2}


def test_replace_needs_the_target() -> None:
    """``replace`` and ``remove`` need an existing target."""
    for op in ("replace", "remove"):
        with pytest.raises(PatchApplyError, match="does not exist"):
            apply_patch({"a": 1}, [{"op": op, "path": "/b", "value": 2}])


def test_cannot_remove_the_whole_document() -> None:
    """There is nothing to hold the document once it is removed."""
    with pytest.raises(PatchApplyError, match="whole document"):
        apply_patch({"a": 1}, [{"op": "remove", "path": ""}])


def test_root_replace_changes_the_type() -> None:
    """Replacing ``""`` may turn an object into an array (the conformance suite asks for it)."""
    assert apply_patch({"a": 1}, [{"op": "replace", "path": "", "value": [1]}]) == [1]


def test_member_of_a_scalar() -> None:
    """A scalar has no members to read, add or remove."""
    for op in ({"op": "add", "path": "/c/d", "value": 1}, {"op": "remove", "path": "/c/d"}):
        with pytest.raises(PatchApplyError, match="scalar"):
            apply_patch(DOC, [op])


def test_move_into_own_child_is_refused() -> None:
    """§4.4: ``from`` must not be a proper prefix of ``path``; known before applying."""
    with pytest.raises(InvalidPatch, match="own children"):
        validate_patch([{"op": "move", "from": "/a", "path": "/a/b/x"}])


def test_move_to_a_sibling_with_a_common_prefix() -> None:
    """``/a`` is not a prefix of ``/ab``: that move is fine."""
    assert apply_patch({"a": 1}, [{"op": "move", "from": "/a", "path": "/ab"}]) == {"ab": 1}


def test_move_within_an_array() -> None:
    """The target index is read after the element was removed."""
    doc = ["a", "b", "c", "d"]
    assert apply_patch(doc, [{"op": "move", "from": "/0", "path": "/3"}]) == ["b", "c", "d", "a"]
    assert apply_patch(doc, [{"op": "move", "from": "/3", "path": "/0"}]) == ["d", "a", "b", "c"]


def test_copy_is_a_deep_copy() -> None:
    """Changing the copy does not change the original."""
    result = apply_patch(
        {"a": {"x": [1]}},
        [{"op": "copy", "from": "/a", "path": "/b"}, {"op": "add", "path": "/b/x/-", "value": 2}],
    )
    assert result == {"a": {"x": [1]}, "b": {"x": [1, 2]}}


@pytest.mark.parametrize(
    ("actual", "value", "passes"),
    [
        (1, 1.0, True),
        (True, 1, False),
        (False, 0, False),
        (0, False, False),
        (None, False, False),
        ("1", 1, False),
        ({"a": 1, "b": [1, {"c": 2}]}, {"b": [1, {"c": 2}], "a": 1}, True),
        ([1, 2], [2, 1], False),
        ({"a": 1}, {"a": 1, "b": None}, False),
    ],
)
def test_test_equality(actual: object, value: object, passes: bool) -> None:
    """§4.6: numbers compare by value, ``true`` is never ``1``, member order is ignored."""
    patch = [{"op": "test", "path": "/v", "value": value}]
    if passes:
        apply_patch({"v": actual}, patch)
    else:
        with pytest.raises(PatchTestFailed):
            apply_patch({"v": actual}, patch)


def test_unknown_members_are_ignored() -> None:
    """§4: members an operation does not define are ignored."""
    assert apply_patch({}, [{"op": "add", "path": "/a", "value": 1, "from": 7, "x": []}]) == {
        "a": 1
    }


# --- atomicity and copies ----------------------------------------------------------------


def test_default_never_touches_the_input() -> None:
    """Without ``in_place`` the input is left as it was, even when the patch applies."""
    doc = copy.deepcopy(DOC)
    result = apply_patch(doc, [{"op": "remove", "path": "/a/b/0"}])
    assert doc == DOC
    assert result["a"] == {"b": [2, 3]}


def test_in_place_failure_undoes_every_change() -> None:
    """In place, operations before the failing one are rolled back, in reverse."""
    doc = copy.deepcopy(DOC)
    patch = [
        {"op": "remove", "path": "/a/b/0"},
        {"op": "add", "path": "/a/b/-", "value": 9},
        {"op": "move", "from": "/c", "path": "/a/c"},
        {"op": "replace", "path": "/", "value": {"deep": [1]}},
        {"op": "copy", "from": "/a", "path": "/z"},
        {"op": "add", "path": "", "value": {"new": "root"}},
        {"op": "test", "path": "/new", "value": "other"},
    ]
    with pytest.raises(PatchTestFailed) as caught:
        apply_patch(doc, patch, in_place=True)
    assert doc == DOC
    assert caught.value.op_index == 6


def test_in_place_success_changes_the_input() -> None:
    """In place, the caller's containers are the result's."""
    doc = {"a": [1]}
    result = apply_patch(doc, [{"op": "add", "path": "/a/-", "value": 2}], in_place=True)
    assert result is doc
    assert doc == {"a": [1, 2]}


def test_share_copies_only_the_changed_path() -> None:
    """``share=True``: the containers on the changed path are new, every other value is the
    input's own object, and the input is unchanged."""
    blocks = [{"id": str(i), "content": {"text": f"t{i}"}} for i in range(1000)]
    doc = {"meta": {"title": "x"}, "blocks": blocks}
    before = copy.deepcopy(doc)
    patch = [
        {"op": "replace", "path": "/blocks/500/content/text", "value": "new"},
        {"op": "move", "from": "/blocks/999", "path": "/blocks/0"},
    ]
    result = apply_patch(doc, patch, share=True)
    assert doc == before
    assert result == apply_patch(doc, patch)
    assert result is not doc
    assert result["blocks"] is not blocks
    assert result["meta"] is doc["meta"]  # untouched: shared
    assert result["blocks"][0] is blocks[999]  # moved, not copied
    assert result["blocks"][2] is blocks[1]
    edited = result["blocks"][501]
    assert edited is not blocks[500]
    assert edited["content"] is not blocks[500]["content"]
    assert sum(a is not b for a, b in zip(result["blocks"][1:], blocks[:999], strict=True)) == 1


def test_share_changes_a_container_once() -> None:
    """Several operations under one container copy it once and see each other's changes."""
    doc = {"a": {"b": [1, 2]}}
    patch = [
        {"op": "add", "path": "/a/b/-", "value": 3},
        {"op": "add", "path": "/a/b/0", "value": 0},
        {"op": "test", "path": "/a/b", "value": [0, 1, 2, 3]},
        {"op": "copy", "from": "/a/b", "path": "/a/c"},
        {"op": "add", "path": "/a/c/-", "value": 4},
    ]
    result = apply_patch(doc, patch, share=True)
    assert doc == {"a": {"b": [1, 2]}}
    assert result == {"a": {"b": [0, 1, 2, 3], "c": [0, 1, 2, 3, 4]}}


def test_share_failure_leaves_the_input() -> None:
    """A failing operation after changes: the input is as it was (nothing to undo)."""
    doc = copy.deepcopy(DOC)
    patch = [
        {"op": "remove", "path": "/a/b/0"},
        {"op": "move", "from": "/c", "path": "/a/c"},
        {"op": "test", "path": "/a/c", "value": "other"},
    ]
    with pytest.raises(PatchTestFailed):
        apply_patch(doc, patch, share=True)
    assert doc == DOC


def test_share_and_in_place_exclude_each_other() -> None:
    """Asking for both is a configuration error, not a guess."""
    with pytest.raises(ConfigurationError):
        apply_patch({}, [], in_place=True, share=True)


def test_values_are_not_shared_with_the_patch() -> None:
    """Changing the result later never changes the patch (which may be stored), nor back."""
    value = {"x": [1]}
    patch = [{"op": "add", "path": "/v", "value": value}]
    result = apply_patch({}, patch)
    result["v"]["x"].append(2)
    assert value == {"x": [1]}
    value["x"].append(3)
    assert result["v"] == {"x": [1, 2]}


# --- malformed patches -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "index"),
    [
        ({"op": "add", "path": "/a", "value": 1}, None),
        ("[]", None),
        (None, None),
        (42, None),
        ([["add", "/a", 1]], 0),
        ([{"path": "/a", "value": 1}], 0),
        ([{"op": "ADD", "path": "/a", "value": 1}], 0),
        ([{"op": 1, "path": "/a", "value": 1}], 0),
        ([{"op": "add", "value": 1}], 0),
        ([{"op": "add", "path": True, "value": 1}], 0),
        ([{"op": "add", "path": 0, "value": 1}], 0),
        ([{"op": "add", "path": ["a"], "value": 1}], 0),
        ([{"op": "test", "path": "/a"}], 0),
        ([{"op": "test", "path": "/a", "value": 1}, {"op": "move", "path": "/b"}], 1),
        ([{"op": "copy", "from": 3, "path": "/b"}], 0),
        ([{"op": "add", "path": "/a", "value": math.nan}], 0),
        ([{"op": "add", "path": "/a", "value": [math.inf]}], 0),
        ([{"op": "add", "path": "/a", "value": {1: "x"}}], 0),
        ([{"op": "add", "path": "/a", "value": {"x": {1, 2}}}], 0),
        ([{"op": "add", "path": "/a", "value": (1, 2)}], 0),
        ([{"op": "add", "path": "/a", "value": b"bytes"}], 0),
    ],
)
def test_malformed_patches_are_invalid(patch: object, index: int | None) -> None:
    """Every malformed patch is an InvalidPatch naming the failing operation, found up front."""
    with pytest.raises(InvalidPatch) as caught:
        validate_patch(patch)
    assert caught.value.op_index == index
    if index is not None:
        assert caught.value.op is patch[index]  # type: ignore[index]
    with pytest.raises(InvalidPatch):
        apply_patch({"a": 1}, patch)


def test_validate_patch_returns_the_operations() -> None:
    """A valid patch comes back as a list of objects."""
    ops = ({"op": "remove", "path": "/a"},)
    assert validate_patch(ops) == [{"op": "remove", "path": "/a"}]


# --- limits ------------------------------------------------------------------------------


def _limit(patch: object, doc: object = None, **limits: int) -> PatchLimitExceeded:
    with pytest.raises(PatchLimitExceeded) as caught:
        apply_patch({} if doc is None else doc, patch, limits=PatchLimits(**limits))
    return caught.value


def test_operation_count_limit() -> None:
    """More operations than ``max_operations`` is refused before any is looked at."""
    error = _limit([{"op": "test", "path": "", "value": 1}] * 11, max_operations=10)
    assert (error.limit, error.value, error.maximum, error.http_status) == (
        "max_operations",
        11,
        10,
        413,
    )


def test_byte_limit() -> None:
    """Many medium strings add up to ``max_bytes``; the failing operation is named."""
    patch = [{"op": "add", "path": f"/k{i}", "value": "x" * 100} for i in range(20)]
    error = _limit(patch, max_bytes=1000)
    assert error.limit == "max_bytes"
    assert error.op_index is not None
    assert 5 <= error.op_index <= 9


def test_string_limit() -> None:
    """A giant string (or member name) is refused by ``max_string_length``."""
    assert _limit(
        [{"op": "add", "path": "/a", "value": "x" * 101}], max_string_length=100
    ).limit == ("max_string_length")
    patch = [{"op": "add", "path": "/a", "value": {"k" * 101: 1}}]
    assert _limit(patch, max_string_length=100).limit == "max_string_length"


def test_huge_numbers_are_bounded() -> None:
    """An integer with more digits than a string may have is refused (json.dumps could not)."""
    assert _limit([{"op": "add", "path": "/a", "value": 10**5000}]).limit == "max_string_length"


def test_array_limit_on_values_and_growth() -> None:
    """Arrays in the patch, and arrays the patch grows, stay under ``max_array_length``."""
    assert _limit([{"op": "add", "path": "/a", "value": [0] * 11}], max_array_length=10).limit == (
        "max_array_length"
    )
    full = {"a": list(range(10))}
    error = _limit([{"op": "add", "path": "/a/-", "value": 1}], full, max_array_length=10)
    assert error.limit == "max_array_length"
    assert full == {"a": list(range(10))}


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_deep_values_fail_without_recursion_error() -> None:
    """A value nested 100,000 deep is refused by ``max_depth``, iteratively."""
    error = _limit([{"op": "add", "path": "/a", "value": _nested(100_000)}])
    assert error.limit == "max_depth"


def test_depth_counts_the_path() -> None:
    """Pointer tokens plus the value's nesting must fit in ``max_depth``."""
    doc = {"a": {"b": {}}}
    apply_patch(
        doc, [{"op": "add", "path": "/a/b/c", "value": [[1]]}], limits=PatchLimits(max_depth=5)
    )
    _limit([{"op": "add", "path": "/a/b/c", "value": [[[1]]]}], doc, max_depth=5)
    _limit([{"op": "test", "path": "/a" * 6, "value": 1}], doc, max_depth=5)


def test_moving_deeper_is_bounded() -> None:
    """``move`` to a deeper place checks the moved value's depth there."""
    doc = {"a": [[1]], "b": {"c": {"d": {}}}}
    _limit([{"op": "move", "from": "/a", "path": "/b/c/d/e"}], doc, max_depth=5)


def test_copies_cannot_amplify() -> None:
    """Each ``copy`` costs the copied value's bytes, so doubling copies hit ``max_bytes``."""
    patch = [{"op": "add", "path": "/a", "value": ["x" * 1000]}] + [
        {"op": "copy", "from": "", "path": f"/c{i}"} for i in range(40)
    ]
    assert _limit(patch, max_bytes=100_000).limit == "max_bytes"


def test_deep_document_copy_is_bounded() -> None:
    """Copying a document nested past the interpreter's limit is refused, not a crash."""
    with pytest.raises(PatchLimitExceeded):
        apply_patch({"a": _nested(50_000)}, [{"op": "add", "path": "/b", "value": 1}])


@pytest.mark.parametrize(
    "limits",
    [
        {"max_operations": 0},
        {"max_bytes": -1},
        {"max_depth": True},
        {"max_depth": 501},
        {"max_array_length": 1.5},
    ],
)
def test_limits_are_validated(limits: dict[str, object]) -> None:
    """Bounds are positive ints (not bools), depth at most 500."""
    with pytest.raises(ConfigurationError):
        PatchLimits(**limits)  # type: ignore[arg-type]


def test_no_limits() -> None:
    """``limits=None`` turns the bounds off but still checks the patch is JSON."""
    apply_patch({}, [{"op": "add", "path": "/a", "value": "x" * 10**6}], limits=None)
    with pytest.raises(InvalidPatch):
        apply_patch({}, [{"op": "add", "path": "/a", "value": math.nan}], limits=None)


# --- property tests ----------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "0", "1", "", "~", "/"])
SCALARS = st.none() | st.integers(-3, 3) | st.sampled_from(["x", "y", ""])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
TOKENS = st.sampled_from(["a", "b", "0", "1", "2", "-", "01", "~0", "~1", "", "10"])
POINTERS = st.lists(TOKENS, max_size=3).map(lambda tokens: "".join("/" + t for t in tokens))
OPS = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]),
        "path": POINTERS,
        "from": POINTERS,
        "value": JSON,
    }
)
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=3)
    | POINTERS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["op", "path", "from", "value"]) | st.text(max_size=2), inner
        )
        | st.tuples(inner)
    ),
    max_leaves=10,
)


@settings(max_examples=250, deadline=None)
@given(doc=JSON, patch=JUNK | st.lists(OPS | JUNK, max_size=4))
def test_hostile_input_raises_only_patch_errors(doc: object, patch: object) -> None:
    """Whatever the input, the result is a document or a PatchError; the input is unchanged."""
    before = copy.deepcopy(doc)
    for in_place in (False, True):
        target = copy.deepcopy(doc)
        try:
            apply_patch(target, patch, in_place=in_place)
        except PatchError:
            assert _canonical(target) == _canonical(before)
    with contextlib.suppress(PatchError):
        apply_patch(doc, patch, share=True)
    assert _canonical(doc) == _canonical(before)


@settings(max_examples=300, deadline=None)
@given(doc=JSON, patch=st.lists(OPS, max_size=4))
def test_agrees_with_jsonpatch(doc: object, patch: list[dict[str, object]]) -> None:
    """On well-formed patches, ours and the reference implementation agree on the outcome."""
    try:
        expected: object = jsonpatch.apply_patch(copy.deepcopy(doc), patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        expected = PatchError
    before = copy.deepcopy(doc)
    try:
        result: object = apply_patch(doc, patch)
    except PatchError:
        result = PatchError
    try:
        shared: object = apply_patch(doc, patch, share=True)
    except PatchError:
        shared = PatchError
    if expected is PatchError or result is PatchError:
        assert result is expected
        assert shared is PatchError
    else:
        assert _canonical(result) == _canonical(expected)
        assert _canonical(shared) == _canonical(expected)
    assert _canonical(doc) == _canonical(before)
