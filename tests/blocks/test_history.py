"""DocumentHistory and BlockHistory on SQLite and real PostgreSQL: saves, rebuilds, snapshots,
conflicts, races.

Every synchronous test runs on both storages (the ``storage`` fixture): the whole-document
head and the row-per-block one must behave alike. ``BlockHistory`` leaves due snapshots to
``snapshot()`` (a queue job in a service); the tests' ``_Blocks`` calls it right after each
save, so that both storages keep the same snapshots.
"""

from __future__ import annotations

import copy
import json
import random
import threading

import pytest
import sqlalchemy as sa

from hardening import (
    ConfigurationError,
    ConflictError,
    DocumentHistory,
    InvalidPatch,
    Metrics,
    NotFoundError,
    PatchConflict,
    PatchError,
    PatchLimits,
    SnapshotPolicy,
    apply_patch,
    diff,
)
from hardening.blocks.blockhistory import BlockHistory, BlockSave
from hardening.blocks.history import HistoryBase

_STORAGE = ["document"]


class _Blocks(BlockHistory):
    """BlockHistory writing each due snapshot right after the save (as a job would)."""

    def apply(self, doc_id: str, patch: object, **options: object) -> BlockSave:  # type: ignore[override]
        done = super().apply(doc_id, patch, **options)  # type: ignore[arg-type]
        if done.snapshot_due:
            self.snapshot(doc_id, session=options.get("session"))  # type: ignore[arg-type]
        return done


@pytest.fixture(params=["document", "blocks"])
def storage(request: pytest.FixtureRequest) -> str:
    """Which history class the test's ``_history`` builds."""
    _STORAGE[0] = request.param
    return str(request.param)


def _metadata() -> sa.MetaData:
    return BlockHistory.metadata if _STORAGE[0] == "blocks" else HistoryBase.metadata


PAGE: dict[str, object] = {
    "title": "Plan",
    "blocks": [{"id": f"b{i}", "type": "p", "text": f"t{i}"} for i in range(4)],
}


@pytest.fixture
def engine(sql_engine: sa.Engine, storage: str) -> sa.Engine:
    """Each SQL backend with the history tables of each storage created."""
    _metadata().create_all(sql_engine)
    return sql_engine


def _history(engine: sa.Engine | None, **options: object) -> DocumentHistory:
    if _STORAGE[0] == "blocks":
        return _Blocks(engine, **options)  # type: ignore[arg-type,return-value]
    return DocumentHistory(engine, **options)  # type: ignore[arg-type]


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _rows(engine: sa.Engine) -> str:
    """Every row of the storage's tables, to compare before and after."""
    dump = {}
    with engine.connect() as conn:
        for table in _metadata().sorted_tables:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            dump[table.name] = [[str(value) for value in row] for row in rows]
    return json.dumps(dump, sort_keys=True)


def _snapshots(engine: sa.Engine, doc_id: str) -> list[int]:
    name = (
        "hardening_block_snapshots" if _STORAGE[0] == "blocks" else "hardening_document_snapshots"
    )
    table = _metadata().tables[name]
    with engine.connect() as conn:
        query = sa.select(table.c.version).where(table.c.document_id == doc_id)
        return sorted(conn.execute(query).scalars())


def _random_edit(doc: dict[str, object], rng: random.Random, step: int) -> dict[str, object]:
    doc = copy.deepcopy(doc)
    blocks = doc["blocks"]
    assert isinstance(blocks, list)
    roll = rng.random()
    if roll < 0.25 or not blocks:
        blocks.insert(rng.randint(0, len(blocks)), {"id": f"n{step}", "type": "p", "text": ""})
    elif roll < 0.4:
        blocks.pop(rng.randrange(len(blocks)))
    elif roll < 0.55:
        blocks.insert(rng.randint(0, len(blocks) - 1), blocks.pop(rng.randrange(len(blocks))))
    elif roll < 0.95:
        rng.choice(blocks)["text"] = "é" * rng.randint(0, 3) + str(step)
    else:
        doc["title"] = f"v{step}"
    return doc


def test_every_version_rebuilds_as_saved(engine: sa.Engine) -> None:
    """40 random saves: each version loads back exactly as it was, from snapshot + patches."""
    history = _history(engine, snapshots=SnapshotPolicy(every=7, replay_ratio=None))
    assert history.create("page", PAGE) == 1
    saved = {1: copy.deepcopy(PAGE)}
    rng = random.Random(6)
    for version in range(2, 42):
        new = _random_edit(saved[version - 1], rng, version)
        patch = diff(saved[version - 1], new, guards=rng.random() < 0.5)
        assert history.save("page", patch, base_version=version - 1) == version
        saved[version] = new
    assert history.versions("page") == list(range(1, 42))
    for version, content in saved.items():
        loaded = history.load("page", version)
        assert (loaded.version, _canonical(loaded.content)) == (version, _canonical(content))
    head = history.load("page")
    assert (head.doc_id, head.version, _canonical(head.content)) == (
        "page",
        41,
        _canonical(saved[41]),
    )


def test_snapshots_every_n(engine: sa.Engine) -> None:
    """``every=3``: version 1 and then every third save are snapshots."""
    history = _history(engine, snapshots=SnapshotPolicy(every=3, replay_ratio=None))
    history.create("d", {"n": 0, "blocks": []})
    for version in range(1, 11):
        history.save("d", [{"op": "replace", "path": "/n", "value": version}], base_version=version)
    assert _snapshots(engine, "d") == [1, 4, 7, 10]


def test_snapshots_by_bytes(engine: sa.Engine) -> None:
    """``max_patch_bytes``: a snapshot once the patches since the last one reach the size."""
    history = _history(
        engine, snapshots=SnapshotPolicy(every=None, max_patch_bytes=150, replay_ratio=None)
    )
    history.create("d", {"n": "", "blocks": []})
    for version in range(1, 7):  # each patch is about 60 bytes
        history.save(
            "d", [{"op": "replace", "path": "/n", "value": "x" * 10}], base_version=version
        )
    assert _snapshots(engine, "d") == [1, 4, 7]


def _size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_snapshots_by_replay_cost(engine: sa.Engine) -> None:
    """``replay_ratio``: a snapshot once the patches since the last weigh as much as it."""
    history = _history(engine, snapshots=SnapshotPolicy(every=None))
    content: dict[str, object] = {"text": "x" * 200, "blocks": []}
    history.create("d", content)
    expected, snapshot, pending = [1], _size(content), 0
    for version in range(1, 16):
        patch = [{"op": "add", "path": f"/k{version}", "value": 1}]
        history.save("d", patch, base_version=version)
        content[f"k{version}"] = 1
        pending += _size(patch)
        if pending >= snapshot:
            expected.append(version + 1)
            snapshot, pending = _size(content), 0
    assert _snapshots(engine, "d") == expected
    assert len(expected) == 3  # about every 6th save with these sizes


def test_reject_stale_saves(engine: sa.Engine) -> None:
    """The default policy refuses a patch based on an old version, writing nothing."""
    metrics = Metrics("test")
    history = _history(engine, metrics=metrics)
    history.create("page", PAGE)
    history.save("page", [{"op": "replace", "path": "/title", "value": "A"}], base_version=1)
    before = _rows(engine)
    with pytest.raises(ConflictError) as caught:
        history.save(
            "page", [{"op": "replace", "path": "/blocks/0/text", "value": "B"}], base_version=1
        )
    assert (caught.value.expected_version, caught.value.current_version) == (1, 2)
    assert _rows(engine) == before
    assert (
        metrics.registry.get_sample_value("hardening_lock_conflicts_total", {"entity": "Document"})
        == 1
    )


def test_future_base_version_is_a_conflict(engine: sa.Engine) -> None:
    """A base version the document never had is a conflict, whatever the policy."""
    history = _history(engine, conflict="rebase")
    history.create("page", PAGE)
    for base in (0, 2, -1):
        with pytest.raises(ConflictError):
            history.save("page", [], base_version=base)


def test_rebase_stale_saves(engine: sa.Engine) -> None:
    """With ``rebase`` a stale patch to another block is merged; the stored patch applies."""
    history = _history(engine, conflict="rebase")
    history.create("page", PAGE)
    history.save(
        "page", [{"op": "add", "path": "/blocks/0", "value": {"id": "new"}}], base_version=1
    )
    assert (
        history.save(
            "page", [{"op": "replace", "path": "/blocks/2/text", "value": "mine"}], base_version=1
        )
        == 3
    )
    content = history.load("page").content
    assert content["blocks"][3] == {"id": "b2", "type": "p", "text": "mine"}  # type: ignore[index]
    assert _canonical(history.load("page", 3).content) == _canonical(
        content
    )  # rebuilt from patches


def test_rebase_true_conflict(engine: sa.Engine) -> None:
    """With ``rebase`` a clash on one field is a PatchConflict; nothing is written."""
    history = _history(engine, conflict="rebase")
    history.create("page", PAGE)
    history.save(
        "page", [{"op": "replace", "path": "/blocks/1/text", "value": "A"}], base_version=1
    )
    before = _rows(engine)
    with pytest.raises(PatchConflict) as caught:
        history.save(
            "page", [{"op": "replace", "path": "/blocks/1/text", "value": "B"}], base_version=1
        )
    assert (caught.value.block_id, caught.value.field) == ("b1", "/text")
    assert _rows(engine) == before


def test_rebase_merges_edits_of_one_text(engine: sa.Engine) -> None:
    """Two users edit different parts of one block's text: both land, in the stored history."""
    history = _history(engine, conflict="rebase")
    page = {"blocks": [{"id": "a", "type": "p", "text": "First part. Second part."}]}
    history.create("page", page)
    history.save(
        "page", [{"op": "replace", "path": "/blocks/0/text", "value": "First bit. Second part."}],
        base_version=1,
    )  # fmt: skip
    mine = [{"op": "replace", "path": "/blocks/0/text", "value": "First part. Second bit."}]
    assert history.save("page", mine, base_version=1) == 3
    expected = {"blocks": [{"id": "a", "type": "p", "text": "First bit. Second bit."}]}
    assert history.load("page").content == expected
    assert history.load("page", 3).content == expected  # rebuilt from the stored patches
    assert history.verify("page").ok


def test_delete_wins(engine: sa.Engine) -> None:
    """``delete_wins``: a stale edit of a block deleted meanwhile is dropped, not a conflict."""
    for delete_wins in (False, True):
        history = _history(engine, conflict="rebase", delete_wins=delete_wins)
        doc = f"page-{delete_wins}"
        history.create(doc, PAGE)
        history.save(doc, [{"op": "remove", "path": "/blocks/2"}], base_version=1)
        edit = [{"op": "replace", "path": "/blocks/2/text", "value": "edited"}]
        if not delete_wins:
            with pytest.raises(PatchConflict):
                history.save(doc, edit, base_version=1)
            continue
        assert history.save(doc, edit, base_version=1) == 3
        blocks = history.load(doc).content["blocks"]  # type: ignore[index]
        assert [block["id"] for block in blocks] == ["b0", "b1", "b3"]


def test_last_write_wins(engine: sa.Engine) -> None:
    """With ``last-write-wins`` the incoming patch wins the clash, other edits are kept."""
    history = _history(engine, conflict="last-write-wins")
    history.create("page", PAGE)
    history.save(
        "page",
        [
            {"op": "replace", "path": "/blocks/1/text", "value": "A"},
            {"op": "replace", "path": "/title", "value": "A"},
        ],
        base_version=1,
    )
    history.save(
        "page", [{"op": "replace", "path": "/blocks/1/text", "value": "B"}], base_version=1
    )
    content = history.load("page").content
    assert content["title"] == "A"  # type: ignore[index]
    assert content["blocks"][1]["text"] == "B"  # type: ignore[index]


def test_rebase_needs_the_base_version(engine: sa.Engine) -> None:
    """A base version compacted away cannot be merged against: a conflict."""
    history = _history(engine, conflict="rebase")
    history.create("page", PAGE)
    for version in range(1, 5):
        history.save(
            "page",
            [{"op": "replace", "path": "/title", "value": str(version)}],
            base_version=version,
        )
    history.compact("page", keep=2)
    with pytest.raises(ConflictError):
        history.save(
            "page", [{"op": "replace", "path": "/blocks/0/text", "value": "x"}], base_version=2
        )


@pytest.mark.parametrize(
    "patch",
    [
        {"op": "add"},
        [{"op": "add", "path": "/x", "value": float("nan")}],
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/title", "value": "no"}],
        [{"op": "add", "path": "/x", "value": "y" * 2000}],
        [{"op": "remove", "path": "/blocks/01"}],
    ],
)
def test_refused_patches_change_nothing(engine: sa.Engine, patch: object) -> None:
    """A refused patch raises a PatchError and leaves every row as it was."""
    history = _history(engine, limits=PatchLimits(max_string_length=1000))
    history.create("page", PAGE)
    before = _rows(engine)
    with pytest.raises(PatchError):
        history.save("page", patch, base_version=1)
    assert _rows(engine) == before


def test_missing_document(engine: sa.Engine) -> None:
    """Saving, loading, listing or compacting a document that does not exist is a 404."""
    history = _history(engine)
    with pytest.raises(NotFoundError):
        history.save("nope", [], base_version=1)
    with pytest.raises(NotFoundError):
        history.load("nope")
    with pytest.raises(NotFoundError):
        history.load("nope", 1)
    with pytest.raises(NotFoundError):
        history.versions("nope")
    with pytest.raises(NotFoundError):
        history.compact("nope", keep=1)


def test_versions_out_of_range(engine: sa.Engine) -> None:
    """Versions past the head or below 1 do not exist."""
    history = _history(engine)
    history.create("d", {"blocks": []})
    for version in (0, 2, -5, 10**12, 2**63, 10**30):  # huge ones: no allocation, no DB error
        with pytest.raises(NotFoundError):
            history.load("d", version)


@pytest.mark.parametrize("doc_id", ["\x00", "a\x00b", "x" * 256, ""])
def test_impossible_ids_are_not_found(engine: sa.Engine, doc_id: str) -> None:
    """Ids from URLs that no document can have (NUL, which PostgreSQL cannot store; too long;
    empty) are a 404, never a database error."""
    history = _history(engine)
    with pytest.raises(NotFoundError):
        history.load(doc_id)
    with pytest.raises(NotFoundError):
        history.save(doc_id, [], base_version=1)
    with pytest.raises(NotFoundError):
        history.versions(doc_id)


def test_create_twice_is_a_conflict(engine: sa.Engine) -> None:
    """An id can be created once."""
    history = _history(engine)
    history.create("d", {"blocks": []})
    with pytest.raises(ConflictError):
        history.create("d", {"other": 1, "blocks": []})
    assert history.load("d").content == {"blocks": []}


def test_create_checks_the_content(engine: sa.Engine) -> None:
    """Content must be JSON within the limits; ids are 1 to 255 characters."""
    history = _history(engine, limits=PatchLimits(max_depth=3))
    with pytest.raises(InvalidPatch):
        history.create("d", {"x": float("inf")})
    with pytest.raises(PatchError):
        history.create("d", [[[["deep"]]]])
    for bad in ("", "x" * 256):
        with pytest.raises(ConfigurationError):
            history.create(bad, {})
    assert _rows(engine).count('documents": []') == 1


def test_compact(engine: sa.Engine) -> None:
    """Compaction keeps the last ``keep`` versions rebuildable, and only those."""
    history = _history(engine, snapshots=SnapshotPolicy(every=4, replay_ratio=None))
    history.create("d", {"n": 0, "blocks": []})
    for version in range(1, 12):
        history.save("d", [{"op": "replace", "path": "/n", "value": version}], base_version=version)
    assert history.compact("d", keep=5) == 8
    assert history.versions("d") == [8, 9, 10, 11, 12]
    assert [history.load("d", v).content for v in range(8, 13)] == [
        {"n": n, "blocks": []} for n in range(7, 12)
    ]
    with pytest.raises(NotFoundError):
        history.load("d", 7)
    assert _snapshots(engine, "d") == [8, 9]
    assert history.compact("d", keep=5) == 8  # nothing more to drop
    assert history.compact("d", keep=100) == 8
    with pytest.raises(ConfigurationError):
        history.compact("d", keep=0)


def test_unicode_and_nul_round_trip(engine: sa.Engine) -> None:
    """Non-ASCII text and NUL characters survive both databases' JSON columns."""
    history = _history(engine, snapshots=SnapshotPolicy(every=2))
    history.create("d", {"t": "é", "blocks": []})
    history.save("d", [{"op": "replace", "path": "/t", "value": "a\x00b😀"}], base_version=1)
    history.save("d", [{"op": "add", "path": "/n", "value": 1.0}], base_version=2)
    assert _canonical(history.load("d", 2).content) == _canonical({"t": "a\x00b😀", "blocks": []})
    assert _canonical(history.load("d").content) == _canonical(
        {"t": "a\x00b😀", "n": 1.0, "blocks": []}
    )


def test_inside_the_callers_transaction(engine: sa.Engine) -> None:
    """With ``session=`` nothing is committed: the caller's rollback undoes the save."""
    history = _history(None)  # no engine: every call brings its session
    with engine.connect() as conn:
        with conn.begin():
            history.create("d", {"n": 0, "blocks": []}, session=conn)
        transaction = conn.begin()
        history.save(
            "d", [{"op": "replace", "path": "/n", "value": 1}], base_version=1, session=conn
        )
        assert history.load("d", session=conn).version == 2
        transaction.rollback()
        assert history.load("d", session=conn).content == {"n": 0, "blocks": []}
    with pytest.raises(ConfigurationError):
        history.load("d")


def test_orm_session(engine: sa.Engine) -> None:
    """An ORM ``Session`` works like a connection."""
    from sqlalchemy.orm import Session

    history = _history(None)
    with Session(engine) as session, session.begin():
        history.create("d", {"n": 0, "blocks": []}, session=session)
        history.save(
            "d", [{"op": "replace", "path": "/n", "value": 1}], base_version=1, session=session
        )
    assert _history(engine).load("d").content == {"n": 1, "blocks": []}


def test_metrics(engine: sa.Engine) -> None:
    """Each save observes its operations, bytes and the document's block count."""
    metrics = Metrics("test")
    history = _history(engine, metrics=metrics)
    history.create("page", PAGE)
    history.save(
        "page",
        [{"op": "remove", "path": "/blocks/0"}, {"op": "remove", "path": "/blocks/0"}],
        base_version=1,
    )
    sample = metrics.registry.get_sample_value
    assert sample("hardening_patch_operations_sum", {}) == 2
    assert sample("hardening_document_blocks_sum", {}) == 2
    assert sample("hardening_patch_size_bytes_count", {}) == 1


@pytest.mark.parametrize("options", [{"conflict": "merge"}, {"retries": -1}, {"retries": True}])
@pytest.mark.parametrize("kind", [DocumentHistory, BlockHistory])
def test_options_are_checked(kind: type[DocumentHistory], options: dict[str, object]) -> None:
    """An unknown policy or a bad retry count is refused at construction."""
    with pytest.raises(ConfigurationError):
        kind(**options)  # type: ignore[arg-type]


# --- concurrency on real PostgreSQL ------------------------------------------------------


@pytest.fixture
def pg_history_engine(pg_engine: sa.Engine, storage: str) -> sa.Engine:
    """PostgreSQL with the history tables of each storage."""
    _metadata().create_all(pg_engine)
    return pg_engine


def _race(workers: int, save: object) -> list[BaseException]:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        barrier.wait()
        try:
            save(worker)  # type: ignore[operator]
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_rebased_saves_lose_nothing(pg_history_engine: sa.Engine) -> None:
    """12 writers, all based on version 1, each edit their own block: all 12 edits land."""
    history = _history(pg_history_engine, conflict="rebase", retries=20)
    blocks = [{"id": f"b{i}", "text": ""} for i in range(12)]
    history.create("page", {"blocks": blocks})

    def save(worker: int) -> None:
        patch = [{"op": "replace", "path": f"/blocks/{worker}/text", "value": f"w{worker}"}]
        history.save("page", patch, base_version=1)

    assert _race(12, save) == []
    head = history.load("page")
    assert head.version == 13
    assert [block["text"] for block in head.content["blocks"]] == [f"w{i}" for i in range(12)]  # type: ignore[index]
    rebuilt = [history.load("page", v).content for v in range(1, 14)]
    assert rebuilt[-1] == head.content


def test_concurrent_rejected_saves_retry_without_loss(pg_history_engine: sa.Engine) -> None:
    """With ``reject``, writers that re-read and retry on ConflictError all get their add in."""
    history = _history(pg_history_engine)
    history.create("list", {"blocks": []})

    def save(worker: int) -> None:
        for _ in range(200):
            head = history.load("list")
            new = copy.deepcopy(head.content)
            new["blocks"].append({"id": f"w{worker}"})  # type: ignore[index]
            try:
                history.save("list", diff(head.content, new), base_version=head.version)
                return
            except ConflictError:
                continue
        raise AssertionError("never won the race")

    assert _race(8, save) == []
    head = history.load("list")
    assert head.version == 9
    assert sorted(block["id"] for block in head.content["blocks"]) == [f"w{i}" for i in range(8)]  # type: ignore[index]
    for version in range(1, 10):
        assert len(history.load("list", version).content["blocks"]) == version - 1  # type: ignore[index]


def test_apply_patch_result_matches_history(engine: sa.Engine) -> None:
    """What ``save`` stores is what ``apply_patch`` computes."""
    history = _history(engine)
    history.create("page", PAGE)
    patch = [{"op": "move", "from": "/blocks/3", "path": "/blocks/0"}]
    history.save("page", patch, base_version=1)
    assert history.load("page").content == apply_patch(PAGE, patch)


# --- the asyncio driver (PostgreSQL through psycopg's async API) --------------------------


@pytest.mark.anyio
async def test_async_history(pg_async_engine: object) -> None:
    """The async driver saves, merges, rebuilds, lists and compacts like the sync one."""
    from hardening import AsyncDocumentHistory

    history = AsyncDocumentHistory(
        pg_async_engine,  # type: ignore[arg-type]
        conflict="rebase",
        snapshots=SnapshotPolicy(every=2),
    )
    await history.create_schema()
    assert await history.create("page", PAGE) == 1
    with pytest.raises(ConflictError):
        await history.create("page", PAGE)
    await history.save(
        "page", [{"op": "add", "path": "/blocks/0", "value": {"id": "n"}}], base_version=1
    )
    await history.save(
        "page", [{"op": "replace", "path": "/blocks/0/text", "value": "x"}], base_version=1
    )
    head = await history.load("page")
    assert head.version == 3
    assert head.content["blocks"][1]["text"] == "x"  # type: ignore[index]
    assert (await history.load("page", 2)).content["blocks"][0] == {"id": "n"}  # type: ignore[index]
    assert await history.versions("page") == [1, 2, 3]
    assert await history.compact("page", keep=2) == 2
    assert await history.versions("page") == [2, 3]
    with pytest.raises(NotFoundError):
        await history.load("page", 1)
    with pytest.raises(PatchConflict):
        await history.save(
            "page", [{"op": "replace", "path": "/blocks/1/text", "value": "y"}], base_version=2
        )


@pytest.mark.anyio
async def test_async_concurrent_saves(pg_async_engine: object) -> None:
    """Concurrent async saves from one stale base all land (rebase policy)."""
    import asyncio

    from hardening import AsyncDocumentHistory

    history = AsyncDocumentHistory(pg_async_engine, conflict="rebase", retries=20)  # type: ignore[arg-type]
    await history.create_schema()
    await history.create("page", {"blocks": [{"id": f"b{i}", "text": ""} for i in range(6)]})
    await asyncio.gather(
        *(
            history.save(
                "page",
                [{"op": "replace", "path": f"/blocks/{i}/text", "value": f"w{i}"}],
                base_version=1,
            )
            for i in range(6)
        )
    )
    head = await history.load("page")
    assert head.version == 7
    assert [block["text"] for block in head.content["blocks"]] == [f"w{i}" for i in range(6)]  # type: ignore[index]
