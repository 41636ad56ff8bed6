"""The public JSON Patch test suite (json-patch/json-patch-tests) passes through apply_patch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hardening import PatchError, apply_patch

DATA = Path(__file__).parent / "data"

# Records added upstream after json-patch-test-suite 1.1.0 (the vendored release).
LATER_RECORDS: list[dict[str, object]] = [
    {
        "comment": "missing from location to copy",
        "doc": {"foo": 1},
        "patch": [{"op": "copy", "from": "/bar", "path": "/foo"}],
        "error": "missing 'from' location",
    },
    {
        "comment": "missing from location to move",
        "doc": {"foo": 1},
        "patch": [{"op": "move", "from": "/bar", "path": "/foo"}],
        "error": "missing 'from' location",
    },
    {
        "comment": "Removing deep nonexistent path",
        "doc": {"foo": "bar"},
        "patch": [{"op": "remove", "path": "/missing1/missing2"}],
        "error": "removing a nonexistent field should fail",
    },
    {
        "comment": "test copy object then change destination",
        "doc": {"foo": {"bar": {"baz": [{"boo": "net"}]}}},
        "patch": [
            {"op": "copy", "from": "/foo", "path": "/bak"},
            {"op": "replace", "path": "/bak/bar/baz/0/boo", "value": "qux"},
        ],
        "expected": {
            "foo": {"bar": {"baz": [{"boo": "net"}]}},
            "bak": {"bar": {"baz": [{"boo": "qux"}]}},
        },
    },
    {
        "comment": "test copy object then change source",
        "doc": {"foo": {"bar": {"baz": [{"boo": "net"}]}}},
        "patch": [
            {"op": "copy", "from": "/foo", "path": "/bak"},
            {"op": "replace", "path": "/foo/bar/baz/0/boo", "value": "qux"},
        ],
        "expected": {
            "foo": {"bar": {"baz": [{"boo": "qux"}]}},
            "bak": {"bar": {"baz": [{"boo": "net"}]}},
        },
    },
]


def _records() -> list[pytest.ParameterSet]:
    cases = []
    for name in ("tests.json", "spec_tests.json"):
        records = json.loads((DATA / name).read_text(encoding="utf-8"))
        for number, record in enumerate(records):
            marks = (
                [pytest.mark.skip(reason="disabled in the suite")] if record.get("disabled") else []
            )
            if "doc" not in record or "patch" not in record:
                marks = [pytest.mark.skip(reason="a comment-only record")]
            label = f"{name.removesuffix('.json')}-{number}"
            cases.append(pytest.param(record, id=label, marks=marks))
    for number, record in enumerate(LATER_RECORDS):
        cases.append(pytest.param(record, id=f"upstream-{number}"))
    return cases


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


@pytest.mark.parametrize("record", _records())
def test_record(record: dict[str, object]) -> None:
    """An ``expected`` record gives that document; an ``error`` record raises a PatchError."""
    doc = record["doc"]
    before = copy.deepcopy(doc)
    if "error" in record:
        with pytest.raises(PatchError):
            apply_patch(doc, record["patch"])
    else:
        result = apply_patch(doc, record["patch"])
        if "expected" in record:
            assert _canonical(result) == _canonical(record["expected"])
    assert _canonical(doc) == _canonical(before)  # the input is never changed


@pytest.mark.parametrize("record", _records())
def test_record_in_place(record: dict[str, object]) -> None:
    """In place, a failing record leaves the document exactly as it was (atomicity)."""
    doc = copy.deepcopy(record["doc"])
    if "error" in record:
        with pytest.raises(PatchError):
            apply_patch(doc, record["patch"], in_place=True)
        assert _canonical(doc) == _canonical(record["doc"])
    elif "expected" in record:
        result = apply_patch(doc, record["patch"], in_place=True)
        assert _canonical(result) == _canonical(record["expected"])


@pytest.mark.parametrize("record", _records())
def test_record_shared(record: dict[str, object]) -> None:
    """Copy on write (``share=True``): the same outcome, and the input never changed."""
    doc = record["doc"]
    before = copy.deepcopy(doc)
    if "error" in record:
        with pytest.raises(PatchError):
            apply_patch(doc, record["patch"], share=True)
    else:
        result = apply_patch(doc, record["patch"], share=True)
        if "expected" in record:
            assert _canonical(result) == _canonical(record["expected"])
    assert _canonical(doc) == _canonical(before)


def test_suite_size() -> None:
    """The vendored files hold the records the README says (nothing silently dropped)."""
    counts = {
        name: len(json.loads((DATA / name).read_text(encoding="utf-8")))
        for name in ("tests.json", "spec_tests.json")
    }
    assert counts == {"tests.json": 78, "spec_tests.json": 17}
