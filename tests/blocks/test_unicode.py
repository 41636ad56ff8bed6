"""Lone surrogates and other text no database can store: refused as ``InvalidPatch`` (422) by
the validator, never a ``UnicodeEncodeError`` (500) from a history save, on SQLite and real
PostgreSQL.

``json.loads('"\\ud800"')`` returns a lone surrogate, which has no UTF-8 form: every string a
patch or a new document carries (values, member names, pointers, members an operation
ignores) must be encodable before anything is stored.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from hardening import (
    AsyncDocumentHistory,
    BlockHistory,
    ConfigurationError,
    DocumentHistory,
    InvalidPatch,
    NotFoundError,
    PatchError,
    PatchLimits,
    apply_patch,
    validate_patch,
)
from hardening.blocks.history import HistoryBase

BLOCKS: list[dict[str, object]] = [{"id": "b0", "type": "p", "text": "x"}]

HOSTILE = [
    pytest.param([{"op": "add", "path": "/0/t", "value": "\ud800"}], id="value"),
    pytest.param([{"op": "add", "path": "/0/t", "value": "ok \udfff ok"}], id="value-mid"),
    pytest.param([{"op": "add", "path": "/0/t", "value": {"\udc00k": 1}}], id="member-name"),
    pytest.param([{"op": "add", "path": "/0/t", "value": [1, ["\ud83d"]]}], id="nested"),
    pytest.param([{"op": "add", "path": "/0/\ud800", "value": 1}], id="path"),
    pytest.param([{"op": "copy", "from": "/0/\udc00", "path": "/0/t"}], id="from"),
    pytest.param([{"op": "test", "path": "/0/text", "value": "\ud800"}], id="test-value"),
    pytest.param([{"op": "remove", "path": "/0/text", "value": "\ud800"}], id="ignored-value"),
    pytest.param([{"op": "remove", "path": "/0/text", "x\udc00": 1}], id="ignored-name"),
    pytest.param([{"op": "add", "path": "/0/t", "value": 1, "from": "\ud800"}], id="ignored-from"),
]


@pytest.fixture(params=["document", "blocks"])
def history(request: pytest.FixtureRequest, sql_engine: sa.Engine) -> DocumentHistory:
    """Each storage (a JSON head, a row per block) on each SQL backend, page ``p`` at v1."""
    made: DocumentHistory
    if request.param == "blocks":
        made = BlockHistory(sql_engine)  # type: ignore[assignment]
        BlockHistory.metadata.create_all(sql_engine)
    else:
        made = DocumentHistory(sql_engine)
        HistoryBase.metadata.create_all(sql_engine)
    made.create("p", BLOCKS)
    return made


# --- the validator -----------------------------------------------------------------------


@pytest.mark.parametrize("patch", HOSTILE)
def test_validate_patch_refuses_lone_surrogates(patch: list[dict[str, object]]) -> None:
    """A lone surrogate anywhere in a patch is InvalidPatch (422), with limits or without."""
    for limits in (PatchLimits(), None):
        with pytest.raises(InvalidPatch) as info:
            validate_patch(patch, limits=limits)
        assert info.value.op_index == 0
        json.dumps(info.value.details())  # the problem+json body can be written


def test_valid_non_ascii_is_kept_and_counted_in_utf8() -> None:
    """Real non-ASCII text (an astral emoji, accents) passes; its size is its UTF-8 size."""
    doc = apply_patch({}, [{"op": "add", "path": "/é😀", "value": {"ключ": "😀"}}])
    assert doc == {"é😀": {"ключ": "😀"}}
    with pytest.raises(PatchError) as info:  # 4 UTF-8 bytes a character, not 1
        validate_patch(
            [{"op": "add", "path": "/a", "value": "😀" * 300}], limits=PatchLimits(max_bytes=1000)
        )
    assert info.value.reason.startswith("the patch is larger")


def test_ignored_members_are_charged_to_the_byte_limit() -> None:
    """Members an operation ignores are stored with it, so they count against ``max_bytes``."""
    patch = [{"op": "remove", "path": "/a", "note": "x" * 2000}]
    with pytest.raises(PatchError) as info:
        validate_patch(patch, limits=PatchLimits(max_bytes=1000))
    assert info.value.reason.startswith("the patch is larger")
    assert apply_patch({"a": 1}, patch) == {}  # and are still ignored (RFC 6902 §4)


def test_apply_patch_refuses_copying_a_lone_surrogate() -> None:
    """A ``copy`` of a document's unencodable string is refused too (copies are checked)."""
    with pytest.raises(InvalidPatch):
        apply_patch({"a": "\ud800"}, [{"op": "copy", "from": "/a", "path": "/b"}])


# --- the histories, on SQLite and PostgreSQL -----------------------------------------------


@pytest.mark.parametrize("patch", HOSTILE)
def test_save_refuses_lone_surrogates_and_stores_nothing(
    history: DocumentHistory, patch: list[dict[str, object]]
) -> None:
    """``save`` raises InvalidPatch (not UnicodeEncodeError) and the page stays at version 1."""
    with pytest.raises(InvalidPatch):
        history.save("p", patch, base_version=1)
    assert history.versions("p") == [1]
    assert history.load("p").content == BLOCKS


@pytest.mark.parametrize(
    "content",
    [
        pytest.param([{"id": "b0", "text": "\ud800"}], id="value"),
        pytest.param([{"id": "b0", "\udfffx": 1}], id="member-name"),
        pytest.param({"blocks": [], "title": ["\udc00"]}, id="meta"),
    ],
)
def test_create_refuses_lone_surrogates(history: DocumentHistory, content: object) -> None:
    """``create`` raises InvalidPatch for unencodable content and stores no page."""
    with pytest.raises(InvalidPatch):
        history.create("q", content)
    with pytest.raises(NotFoundError):
        history.load("q")


@pytest.mark.parametrize("doc_id", ["\ud800", "a\udc00b", "a\x00b"])
def test_unstorable_ids_are_not_found_or_refused(history: DocumentHistory, doc_id: str) -> None:
    """An id no database can hold is simply not found (404), and cannot be created."""
    with pytest.raises(NotFoundError):
        history.load(doc_id)
    with pytest.raises(NotFoundError):
        history.save(doc_id, [], base_version=1)
    with pytest.raises(ConfigurationError):
        history.create(doc_id, BLOCKS)


def test_find_blocks_skips_unstorable_ids(sql_engine: sa.Engine) -> None:
    """Asking for a block id no block can have finds nothing instead of failing."""
    history = BlockHistory(sql_engine)
    history.create_schema()
    history.create("p", BLOCKS)
    assert history.find_blocks("p", ["\ud800", "b\x00", "b0"]) == (1, {"b0": BLOCKS[0]})


@pytest.mark.anyio
async def test_async_history_refuses_lone_surrogates(pg_async_engine: AsyncEngine) -> None:
    """AsyncDocumentHistory on PostgreSQL: the same InvalidPatch, nothing stored."""
    history = AsyncDocumentHistory(pg_async_engine)
    await history.create_schema()
    await history.create("p", BLOCKS)
    with pytest.raises(InvalidPatch):
        await history.save("p", [{"op": "add", "path": "/0/t", "value": "\ud800"}], base_version=1)
    with pytest.raises(InvalidPatch):
        await history.create("q", {"\ud800": 1})
    assert await history.versions("p") == [1]


# --- property: a surrogate anywhere is a PatchError, and nothing is stored ----------------

CLEAN = st.recursive(
    st.none() | st.integers(-3, 3) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=4,
)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TAINTED = st.tuples(st.text(max_size=3), SURROGATE, st.text(max_size=3)).map("".join)


def _plant(container: Any, key: Any, value: object) -> object:
    if isinstance(container, list):
        container.insert(min(key, len(container)), value)
    else:
        container[key] = value
    return container


# a JSON value holding one tainted string somewhere: as a value or as a member name
TAINTED_JSON = st.recursive(
    TAINTED | st.dictionaries(TAINTED, CLEAN, min_size=1, max_size=1),
    lambda inner: (
        st.builds(_plant, st.lists(CLEAN, max_size=2), st.integers(0, 2), inner)
        | st.builds(
            _plant, st.dictionaries(st.text(max_size=2), CLEAN, max_size=2), st.text(), inner
        )
    ),
    max_leaves=4,
)
TAINTED_PATCH = st.one_of(
    TAINTED_JSON.map(lambda v: [{"op": "add", "path": "/0/t", "value": v}]),
    TAINTED_JSON.map(lambda v: [{"op": "replace", "path": "/0/text", "value": v}]),
    TAINTED_JSON.map(lambda v: [{"op": "add", "path": "/-", "value": {"id": "n", "x": v}}]),
    TAINTED_JSON.map(lambda v: [{"op": "test", "path": "/0/text", "value": v}]),
    TAINTED_JSON.map(lambda v: [{"op": "remove", "path": "/0/text", "note": v}]),
    TAINTED.map(lambda t: [{"op": "add", "path": "/0/" + t, "value": 1}]),
    TAINTED.map(lambda t: [{"op": "move", "from": "/0/" + t, "path": "/0/t"}]),
    TAINTED.map(lambda t: [{"op": "remove", "path": "/0/text", t: 1}]),
).flatmap(
    lambda patch: st.lists(st.just({"op": "test", "path": "/0/id", "value": "b0"}), max_size=1).map(
        lambda guard: guard + patch
    )
)


@settings(max_examples=200, deadline=None)
@given(patch=TAINTED_PATCH)
def test_any_surrogate_is_refused_by_the_validator(patch: list[dict[str, object]]) -> None:
    """Hypothesis: wherever the lone surrogate is, ``validate_patch`` raises InvalidPatch."""
    with pytest.raises(InvalidPatch):
        validate_patch(patch)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(patch=TAINTED_PATCH)
def test_any_surrogate_only_raises_patch_errors_and_stores_nothing(
    history: DocumentHistory, patch: list[dict[str, object]]
) -> None:
    """Hypothesis, on both storages and both databases: only a PatchError, and no new version."""
    with pytest.raises(PatchError):
        history.save("p", patch, base_version=1)
    assert history.versions("p") == [1]
