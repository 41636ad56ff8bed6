"""BlockHistory specifics on SQLite and real PostgreSQL: the cost of a save follows the edit,
order keys, windows, deferred snapshots, id guards, hostile input, and the same pages and
versions as DocumentHistory for random edit sequences (hypothesis).

The behaviour both storages share (conflicts, compaction, races...) is tested on both in
``test_history.py``.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening import (
    DocumentHistory,
    InvalidPatch,
    MalformedBody,
    NotFoundError,
    PatchApplyError,
    PatchError,
    PatchLimitExceeded,
    PatchLimits,
    PatchTestFailed,
    SnapshotPolicy,
    diff,
    diff_blocks,
)
from hardening.blocks._blockrows import block_rows, block_snapshots
from hardening.blocks._order import MAX_KEY, key_between, keys_between
from hardening.blocks.blockhistory import BlockHistory
from hardening.blocks.history import HistoryBase
from tests.sqlcount import Statements


def _page(n: int, prefix: str = "b") -> list[dict[str, object]]:
    return [{"id": f"{prefix}{i}", "type": "p", "content": f"text {i}"} for i in range(n)]


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    BlockHistory.metadata.create_all(sql_engine)
    HistoryBase.metadata.create_all(sql_engine)
    return sql_engine


@pytest.fixture
def history(engine: sa.Engine) -> BlockHistory:
    return BlockHistory(engine, limits=PatchLimits(max_array_length=20_000))


def _keys(engine: sa.Engine, doc_id: str) -> list[tuple[str, str]]:
    r = block_rows.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(r.position, r.block_id).where(r.document_id == doc_id).order_by(r.position)
        )
        return [(row.position, row.block_id) for row in rows]


# --- order keys -------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=300))
def test_keys_stay_ordered_whatever_the_insert_order(spots: list[int]) -> None:
    """Inserting at arbitrary places always finds a key strictly between the neighbours."""
    keys: list[str] = []
    for spot in spots:
        at = spot % (len(keys) + 1)
        low = keys[at - 1] if at else None
        high = keys[at] if at < len(keys) else None
        key = key_between(low, high)
        assert low is None or low < key
        assert high is None or key < high
        assert not key.endswith("0")
        keys.insert(at, key)
    assert keys == sorted(keys)


def test_evenly_spaced_keys_are_short() -> None:
    """10,000 keys at creation are 3 characters; bounds are respected."""
    keys = keys_between(None, None, 10_000)
    assert keys == sorted(set(keys))
    assert max(map(len, keys)) == 3
    inner = keys_between("A", "B", 100)
    assert inner == sorted(inner)
    assert all("A" < key < "B" for key in inner)
    with pytest.raises(ValueError, match="not below"):
        key_between("B", "A")
    with pytest.raises(ValueError, match="not an order key"):
        key_between("A0", None)


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
def test_inserts_at_one_spot_keep_keys_short(engine: sa.Engine, history: BlockHistory) -> None:
    """500 inserts at the top, then 500 in one middle gap: keys stay within MAX_KEY, the page
    in order, and no save rewrites more than a window of rows."""
    history.create("p", _page(50))
    version = 1
    for i in range(500):
        patch = [{"op": "add", "path": "/0", "value": {"id": f"t{i}", "type": "p"}}]
        version = history.save("p", patch, base_version=version)
    for i in range(500):
        patch = [{"op": "add", "path": "/525", "value": {"id": f"m{i}", "type": "p"}}]
        version = history.save("p", patch, base_version=version)
    keys = _keys(engine, "p")
    assert max(len(key) for key, _ in keys) <= MAX_KEY
    content = history.load("p").content
    assert isinstance(content, list)
    expected = [f"t{i}" for i in reversed(range(500))] + [f"b{i}" for i in range(25)]
    expected += [f"m{i}" for i in reversed(range(500))] + [f"b{i}" for i in range(25, 50)]
    assert [block["id"] for block in content] == expected
    assert [block_id for _, block_id in keys] == expected


# --- the cost follows the edit ------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        [
            {"op": "test", "path": "/{i}/id", "value": "b{i}"},
            {"op": "replace", "path": "/{i}/content", "value": "x"},
        ],
        [{"op": "add", "path": "/0", "value": {"id": "new", "type": "p"}}],
        [
            {"op": "test", "path": "/{i}/id", "value": "b{i}"},
            {"op": "move", "from": "/{i}", "path": "/0"},
        ],
        [{"op": "test", "path": "/{i}/id", "value": "b{i}"}, {"op": "remove", "path": "/{i}"}],
    ],
    ids=["edit-field", "insert-top", "move-top", "remove"],
)
def test_a_save_runs_the_same_statements_on_any_page_size(
    engine: sa.Engine, history: BlockHistory, edit: list[dict[str, object]]
) -> None:
    """The same guarded edit near the end of a 20-block and a 5,000-block page runs the same
    statements, and writes one block row (the head and the patch row aside)."""
    counts = []
    for size in (20, 5_000):
        doc = f"p{size}"
        history.create(doc, _page(size))
        i = size - 3
        patch = json.loads(json.dumps(edit).replace("{i}", str(i)))
        with Statements(engine) as statements:
            history.save(doc, patch, base_version=1)
        counts.append(statements.seen)
        assert _keys(engine, doc) == sorted(_keys(engine, doc))
    assert counts[0] == counts[1]
    writes = [s for s in counts[0] if s.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))]
    block_writes = [s for s in writes if "hardening_block_rows" in s]
    assert len(block_writes) == 1


# --- windows --------------------------------------------------------------------------------


def test_windows_page_through_the_blocks(history: BlockHistory) -> None:
    """Keyset windows and offset windows give the page in order, with its version and size."""
    history.create("p", _page(250))
    history.save("p", [{"op": "remove", "path": "/10"}], base_version=1)
    seen: list[object] = []
    after = None
    while True:
        window = history.load_blocks("p", limit=100, after=after)
        assert (window.version, window.total) == (2, 249)
        seen += [block["id"] for block in window.blocks]
        after = window.next_after
        if after is None:
            break
    assert seen == [f"b{i}" for i in range(250) if i != 10]
    middle = history.load_blocks("p", offset=200, limit=10)
    assert [b["id"] for b in middle.blocks] == [f"b{i}" for i in range(201, 211)]
    past = history.load_blocks("p", offset=1_000)
    assert (past.blocks, past.next_after, past.version) == ([], None, 2)


@pytest.mark.parametrize("cursor", ["", "0", "A0", "x" * 65, "é", "A/B", 5])
def test_bad_cursors_are_a_400(history: BlockHistory, cursor: object) -> None:
    history.create("p", _page(3))
    with pytest.raises(MalformedBody):
        history.load_blocks("p", after=cursor)  # type: ignore[arg-type]


# --- snapshots off the request path ------------------------------------------------------


def test_snapshots_are_written_by_snapshot_not_by_save(engine: sa.Engine) -> None:
    """A due snapshot is reported, not written; versions rebuild exactly either way."""
    history = BlockHistory(engine, snapshots=SnapshotPolicy(every=3, replay_ratio=None))
    history.create("p", _page(5))
    pages = {1: _page(5)}
    version, dues = 1, []
    for step in range(2, 9):
        page = copy.deepcopy(pages[version])
        page[step % 5]["content"] = f"v{step}"
        done = history.apply(
            "p", diff_blocks(pages[version], page, guards=True), base_version=version
        )
        version = done.version
        pages[version] = page
        dues.append(done.snapshot_due)
    assert dues == [False, False, True, True, True, True, True]  # nobody took the snapshot
    with engine.connect() as conn:
        snapshots = conn.execute(sa.select(block_snapshots.c.version)).scalars().all()
    assert snapshots == [1]
    for v, page in pages.items():
        assert history.load("p", v).content == page
    assert history.snapshot("p") == 8
    assert history.snapshot("p") is None  # not due any more
    assert history.snapshot("p", force=True) is None  # nothing since
    for v, page in pages.items():
        assert history.load("p", v).content == page


# --- page rules and hostile input ---------------------------------------------------------


def test_id_guards_name_their_block(history: BlockHistory) -> None:
    """A guard addresses its block by id; a guard naming no block fails the patch."""
    history.create("p", _page(5))
    patch = [
        {"op": "test", "path": "/3/id", "value": "b3"},
        {"op": "replace", "path": "/3/content", "value": "three"},
    ]
    history.save("p", patch, base_version=1)
    assert history.load("p").content[3] == {"id": "b3", "type": "p", "content": "three"}  # type: ignore[index]
    with pytest.raises(PatchTestFailed):
        history.save("p", [{"op": "test", "path": "/0/id", "value": "nope"}], base_version=2)


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ([{"op": "add", "path": "/0", "value": {"id": "b1"}}], PatchApplyError),
        ([{"op": "add", "path": "/0", "value": "not a block"}], PatchApplyError),
        ([{"op": "add", "path": "/0", "value": {"id": 7}}], PatchApplyError),
        ([{"op": "add", "path": "/0", "value": {"id": "x" * 256}}], PatchApplyError),
        ([{"op": "replace", "path": "/0/id", "value": "b2"}], PatchApplyError),
        ([{"op": "remove", "path": "/0/id"}], PatchApplyError),
        ([{"op": "copy", "from": "/0", "path": "/1"}], PatchApplyError),
        ([{"op": "replace", "path": "", "value": {"no": "blocks"}}], PatchApplyError),
        ([{"op": "remove", "path": "/9"}], PatchApplyError),
        ([{"op": "add", "path": "/0/x", "value": "\ud800"}], InvalidPatch),
        (
            [
                {"op": "add", "path": "/-", "value": {"id": "{b}"}},
                {"op": "test", "path": "/0/content", "value": "zz"},
            ],
            PatchTestFailed,
        ),
        (
            [
                {"op": "add", "path": "/-", "value": {"id": "n1"}},
                {"op": "add", "path": "/-", "value": {"id": "n2"}},
            ],
            PatchLimitExceeded,
        ),
    ],
)
def test_refused_patches_write_nothing(
    engine: sa.Engine, patch: list[dict[str, object]], error: type[PatchError]
) -> None:
    """Patches that would break a block, hostile strings, or the block limit: a typed error,
    and no row changed, in our own transaction and inside a caller's."""
    history = BlockHistory(engine, limits=PatchLimits(max_array_length=4))
    history.create("p", _page(3))

    def rows() -> str:
        with engine.connect() as conn:
            return json.dumps(
                [
                    [str(v) for v in row]
                    for table in BlockHistory.metadata.sorted_tables
                    for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
                ]
            )

    before = rows()
    with pytest.raises(error):
        history.save("p", patch, base_version=1)
    assert rows() == before
    with engine.connect() as conn, conn.begin(), pytest.raises(error):  # the caller commits
        history.save("p", patch, base_version=1, session=conn)
    assert rows() == before


def test_braces_separators_and_unicode_ids(history: BlockHistory) -> None:
    """Ids are data: braces, slashes, tildes, NUL-free unicode; paths escape them as needed."""
    blocks = [{"id": i, "t": i} for i in ("{a}", "b/c", "~d", "é😀", "e f")]
    history.create("p", blocks)
    patch = diff_blocks(blocks, [blocks[4], *blocks[:4]], guards=True)
    history.save("p", patch, base_version=1)
    assert [b["id"] for b in history.load("p").content] == ["e f", "{a}", "b/c", "~d", "é😀"]  # type: ignore[index,union-attr]


def test_apply_says_what_changed(history: BlockHistory) -> None:
    """``changed`` and ``removed`` name the blocks an indexer must revisit."""
    history.create("p", _page(4))
    done = history.apply(
        "p",
        [
            {"op": "replace", "path": "/0/content", "value": "x"},
            {"op": "move", "from": "/3", "path": "/1"},
            {"op": "remove", "path": "/2"},
            {"op": "add", "path": "/-", "value": {"id": "n"}},
        ],
        base_version=1,
    )
    assert (done.version, done.changed, done.removed) == (2, {"b0", "n"}, {"b1"})


# --- the same pages as DocumentHistory --------------------------------------------------------


def _edits(rng: random.Random, page: list[dict[str, object]], step: int) -> list[dict[str, object]]:
    new = copy.deepcopy(page)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.3 or not new:
            new.insert(rng.randint(0, len(new)), {"id": f"n{step}-{rng.random()}", "c": ""})
        elif roll < 0.45:
            new.pop(rng.randrange(len(new)))
        elif roll < 0.65:
            new.insert(rng.randint(0, len(new) - 1), new.pop(rng.randrange(len(new))))
        else:
            block = rng.choice(new)
            block["c"] = f"{block.get('c', '')}{step}"[-8:]
            if rng.random() < 0.2:
                block["extra"] = [step, {"k": step}]
    return new


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), guards=st.booleans(), wrapped=st.booleans())
def test_same_pages_and_versions_as_document_history(
    engine: sa.Engine, seed: int, guards: bool, wrapped: bool
) -> None:
    """Random sequences of edits (inserts, removes, moves, field edits; guarded or not; the
    page an array or under "blocks"): both storages give the same head after every save and
    the same rebuilt versions."""
    rng = random.Random(seed)
    doc_id = f"d{seed}-{guards}-{wrapped}"
    policy = SnapshotPolicy(every=rng.randint(2, 6), replay_ratio=None)
    blocks_store = BlockHistory(engine, snapshots=policy)
    document_store = DocumentHistory(engine, snapshots=policy)
    page = _page(rng.randint(0, 12))
    wrap = (lambda b: {"title": "t", "blocks": b}) if wrapped else (lambda b: b)
    saved = {1: wrap(page)}
    for store in (blocks_store, document_store):
        store.create(doc_id, wrap(page))
    for version in range(2, 14):
        new = _edits(rng, page, version)
        old_doc, new_doc = wrap(page), wrap(new)
        patch = diff(old_doc, new_doc, guards=guards)
        done = blocks_store.apply(doc_id, patch, base_version=version - 1)
        if done.snapshot_due and rng.random() < 0.5:
            blocks_store.snapshot(doc_id)
        assert document_store.save(doc_id, patch, base_version=version - 1) == version
        assert blocks_store.load(doc_id).content == document_store.load(doc_id).content == new_doc
        page, saved[version] = new, new_doc
    for version, content in saved.items():
        assert blocks_store.load(doc_id, version).content == content
        assert document_store.load(doc_id, version).content == content


@pytest.fixture
def pg_block_engine(pg_engine: sa.Engine) -> sa.Engine:
    BlockHistory.metadata.create_all(pg_engine)
    return pg_engine


def test_order_keys_sort_bytewise_on_postgres(pg_block_engine: sa.Engine) -> None:
    """Keys differing only in case sort by byte ("Z" < "a"), whatever the database's locale."""
    history = BlockHistory(pg_block_engine)
    history.create("p", _page(3))
    for i in range(70):  # enough inserts between two keys to use every digit class
        history.save(
            "p", [{"op": "add", "path": "/1", "value": {"id": f"n{i}"}}], base_version=i + 1
        )
    ids = [b["id"] for b in history.load("p").content]  # type: ignore[union-attr]
    assert ids == ["b0", *[f"n{i}" for i in reversed(range(70))], "b1", "b2"]


def test_check_block_sees_only_the_blocks_written(engine: sa.Engine) -> None:
    """The block check runs on every block of a new page, then only on the blocks a save
    writes; what it raises refuses the save and writes nothing."""
    seen: list[object] = []

    def check(block: dict[str, object]) -> None:
        seen.append(block["id"])
        if block.get("type") == "bad":
            raise PatchApplyError("bad type")

    history = BlockHistory(engine, check_block=check)
    history.create("p", _page(50))
    assert seen == [f"b{i}" for i in range(50)]
    seen.clear()
    patch = [
        {"op": "test", "path": "/40/id", "value": "b40"},
        {"op": "replace", "path": "/40/content", "value": "x"},
        {"op": "move", "from": "/3", "path": "/0"},
        {"op": "add", "path": "/1", "value": {"id": "n", "type": "p"}},
    ]
    assert history.save("p", patch, base_version=1) == 2
    assert seen == ["b40", "n"]  # a move writes no content: nothing to check
    with pytest.raises(PatchApplyError, match="bad type"):
        history.save("p", [{"op": "replace", "path": "/5/type", "value": "bad"}], base_version=2)
    assert history.load("p").version == 2


def test_find_blocks_reads_only_the_named_blocks(engine: sa.Engine, history: BlockHistory) -> None:
    """``find_blocks`` answers the head's version and the named blocks it still holds."""
    history.create("p", _page(1_000))
    history.save("p", [{"op": "remove", "path": "/7"}], base_version=1)
    with Statements(engine) as statements:
        version, found = history.find_blocks("p", ["b3", "b7", "b999", "missing"])
    assert version == 2
    assert sorted(found) == ["b3", "b999"]
    assert found["b3"] == {"id": "b3", "type": "p", "content": "text 3"}
    assert len(statements.seen) == 1


@pytest.mark.parametrize("meta", [None, {}, {"title": "T", "n": [1, {"x": None}]}])
def test_load_json_is_the_page_as_stored(engine: sa.Engine, meta: dict[str, object] | None) -> None:
    """``load_json`` gives the head's version and text that parses to what ``load`` gives,
    for an array page and for a page under "blocks" beside other members."""
    history = BlockHistory(engine)
    blocks = [{"id": "a", "t": "é😀"}, {"id": "b", "t": 'NUL \x00, quote ", bracket ]'}]
    history.create("p", blocks if meta is None else {**meta, "blocks": blocks})
    where = "" if meta is None else "/blocks"
    move = {"op": "move", "from": f"{where}/1", "path": f"{where}/0"}
    history.save("p", [move], base_version=1)
    version, text = history.load_json("p")
    assert version == 2
    assert json.loads(text) == history.load("p").content
    history.create("empty", [] if meta is None else {**meta, "blocks": []})
    assert json.loads(history.load_json("empty")[1]) == history.load("empty").content


def test_patches_since_give_the_saves_or_nothing(history: BlockHistory) -> None:
    """The patches since a version, in order; none past the head, none once compacted or
    when more than ``limit`` saves happened: the caller reloads the page."""
    history.create("p", _page(3))
    patches = [[{"op": "replace", "path": f"/{i}/content", "value": str(i)}] for i in range(3)]
    for version, patch in enumerate(patches, start=1):
        history.save("p", patch, base_version=version)
    assert history.patches_since("p", 1) == patches
    assert history.patches_since("p", 3) == patches[2:]
    assert history.patches_since("p", 4) == []
    for version, options in ((5, {}), (0, {}), (1, {"limit": 2})):
        with pytest.raises(NotFoundError):
            history.patches_since("p", version, **options)  # type: ignore[arg-type]
    history.compact("p", keep=2)
    with pytest.raises(NotFoundError):
        history.patches_since("p", 2)
    assert history.patches_since("p", 3) == patches[2:]
