"""History integrity on both storages, SQLite and real PostgreSQL: the checksum chain, damaged
rows reported as ``HistoryCorrupted`` (500, never a 404 or 422), ``versions()`` that lists only
what ``load`` gives, ``verify()``, the upgrade of a database made before the digest columns, and
a save whose cost does not grow with the history.

Damage is made the way it happens: rows changed, deleted or overwritten behind the library's
back, with plain SQL.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import sqlalchemy as sa

from hardening import (
    BlockHistory,
    DocumentHistory,
    HistoryCorrupted,
    HistoryReport,
    NotFoundError,
    PatchError,
    SnapshotPolicy,
)
from hardening.blocks.blockhistory import BlockSave
from hardening.blocks.history import HistoryBase
from tests.sqlcount import Statements

# snapshots at versions 1, 6, 11, ... (every 5 patches), whatever the sizes
EVERY_5 = SnapshotPolicy(every=5, replay_ratio=None)
PAGE: dict[str, object] = {
    "title": "Plan",
    "blocks": [{"id": f"b{i}", "type": "p", "text": f"t{i}"} for i in range(4)],
}
_NAMES = {
    "document": ("hardening_document_patches", "hardening_document_snapshots"),
    "blocks": ("hardening_block_patches", "hardening_block_snapshots"),
}


class _Blocks(BlockHistory):
    """BlockHistory writing each due snapshot right after the save (as a job would)."""

    def apply(self, doc_id: str, patch: object, **options: Any) -> BlockSave:  # type: ignore[override]
        done = super().apply(doc_id, patch, **options)
        if done.snapshot_due:
            self.snapshot(doc_id, session=options.get("session"))
        return done


@pytest.fixture(params=["document", "blocks"])
def storage(request: pytest.FixtureRequest) -> str:
    """Which history the test runs on."""
    return str(request.param)


def _metadata(storage: str) -> sa.MetaData:
    return BlockHistory.metadata if storage == "blocks" else HistoryBase.metadata


@pytest.fixture
def engine(sql_engine: sa.Engine, storage: str) -> sa.Engine:
    """Each SQL backend with the storage's tables."""
    _metadata(storage).create_all(sql_engine)
    return sql_engine


def _history(storage: str, engine: sa.Engine, **options: Any) -> Any:
    kind = _Blocks if storage == "blocks" else DocumentHistory
    return kind(engine, snapshots=options.pop("snapshots", EVERY_5), **options)


def _edit(n: int, block: int = 0) -> list[dict[str, object]]:
    return [{"op": "replace", "path": f"/blocks/{block}/text", "value": f"v{n}"}]


def _saved(
    storage: str, engine: sa.Engine, versions: int, **options: Any
) -> tuple[Any, list[object]]:
    """A history of ``versions`` versions of "doc"; its contents, by version (from 1)."""
    history = _history(storage, engine, **options)
    history.create("doc", PAGE)
    contents = [history.load("doc").content]
    for version in range(1, versions):
        history.save("doc", _edit(version, version % 4), base_version=version)
        contents.append(history.load("doc").content)
    return history, contents


def _table(storage: str, kind: str) -> sa.Table:
    patches, snapshots = _NAMES[storage]
    return _metadata(storage).tables[patches if kind == "patch" else snapshots]


def _read(engine: sa.Engine, storage: str, kind: str, version: int) -> Any:
    """The stored value of a patch or snapshot row, parsed."""
    table = _table(storage, kind)
    column = table.c.patch if kind == "patch" else table.c.content
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(column).where(table.c.document_id == "doc", table.c.version == version)
        ).scalar_one()
    return json.loads(value) if isinstance(value, str) else value


def _write(engine: sa.Engine, storage: str, kind: str, version: int, text: str) -> None:
    """Overwrite a patch or snapshot row's JSON with ``text``, as it is (digests untouched)."""
    table = _table(storage, kind)
    column = "patch" if kind == "patch" else "content"
    value = "CAST(:text AS json)" if isinstance(table.c[column].type, sa.JSON) else ":text"
    if engine.dialect.name == "sqlite":
        value = ":text"  # SQLite stores JSON as text
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {table.name} SET {column} = {value} "
                "WHERE document_id = 'doc' AND version = :version"
            ),
            {"text": text, "version": version},
        )


def _tamper(engine: sa.Engine, storage: str, kind: str, version: int, change: Any) -> None:
    """Change a row's value with ``change`` (value -> value), keeping it valid JSON."""
    value = change(_read(engine, storage, kind, version))
    _write(engine, storage, kind, version, json.dumps(value, separators=(",", ":")))


def _delete(engine: sa.Engine, storage: str, kind: str, version: int) -> None:
    table = _table(storage, kind)
    with engine.begin() as conn:
        conn.execute(
            sa.delete(table).where(table.c.document_id == "doc", table.c.version == version)
        )


def _corrupted(history: Any, version: int) -> HistoryCorrupted:
    with pytest.raises(HistoryCorrupted) as raised:
        history.load("doc", version)
    assert not isinstance(raised.value, (NotFoundError, PatchError))
    assert raised.value.http_status == 500
    assert raised.value.details() == {"doc_id": "doc", "version": raised.value.version}
    return raised.value


# --- a sound history -------------------------------------------------------------------------


def test_verify_walks_a_sound_history(engine: sa.Engine, storage: str) -> None:
    """Every version checks out, before and after compaction; no row is unchained."""
    history, contents = _saved(storage, engine, 14)
    report = history.verify("doc")
    assert isinstance(report, HistoryReport)
    assert (report.ok, report.head, report.checked, report.unchained) == (True, 14, 14, 0)
    assert history.versions("doc") == list(range(1, 15))
    assert history.compact("doc", keep=5) == 10
    assert history.verify("doc") == HistoryReport("doc", 14, 5, 0, None)
    assert [history.load("doc", v).content for v in range(10, 15)] == contents[9:]


def test_every_row_carries_its_digests(engine: sa.Engine, storage: str) -> None:
    """Patch rows carry a 64-hex-digit link, snapshots a link and a content digest."""
    _saved(storage, engine, 7)
    with engine.connect() as conn:
        patches = conn.execute(sa.select(_table(storage, "patch").c.digest)).scalars().all()
        snapshots = conn.execute(
            sa.select(
                _table(storage, "snapshot").c.digest, _table(storage, "snapshot").c.content_digest
            )
        ).all()
    assert len(patches) == 6
    assert len(snapshots) == 2
    for digest in [*patches, *(d for row in snapshots for d in row)]:
        assert isinstance(digest, str)
        assert len(digest) == 64
        int(digest, 16)


def test_the_chain_is_the_documented_formula(engine: sa.Engine, storage: str) -> None:
    """Stored digests are sha256("<previous>:<version>:" + compact JSON), "" before version 1:
    a storage format, pinned here."""
    history = _history(storage, engine)
    history.create("doc", PAGE)
    history.save("doc", _edit(1), base_version=1)

    def compact(value: object) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    first = hashlib.sha256(b":1:" + compact(PAGE)).hexdigest()
    second = hashlib.sha256(f"{first}:2:".encode() + compact(_edit(1))).hexdigest()
    snapshots, patches = _table(storage, "snapshot"), _table(storage, "patch")
    with engine.connect() as conn:
        snapshot = conn.execute(sa.select(snapshots.c.digest, snapshots.c.content_digest)).one()
        patch = conn.execute(sa.select(patches.c.digest)).scalar_one()
    assert tuple(snapshot) == (first, hashlib.sha256(compact(PAGE)).hexdigest())
    assert patch == second


# --- damage ---------------------------------------------------------------------------------


def test_a_tampered_patch_that_still_applies_is_found(engine: sa.Engine, storage: str) -> None:
    """A patch row changed so that it still applies: a load through it raises
    HistoryCorrupted instead of replaying to wrong content, and verify names the version."""
    history, contents = _saved(storage, engine, 9)

    def other_text(patch: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{**patch[0], "value": "TAMPERED"}]

    _tamper(engine, storage, "patch", 3, other_text)
    for version in (3, 4, 5):  # replayed from the snapshot at 1
        assert "digest" in _corrupted(history, version).reason
    assert history.load("doc", 2).content == contents[1]
    assert history.load("doc", 7).content == contents[6]  # from the snapshot at 6
    assert history.load("doc").content == contents[8]  # the head row, read directly
    report = history.verify("doc")
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.version, report.checked) == (3, 2)


def test_a_deleted_patch_row_is_corruption_not_not_found(engine: sa.Engine, storage: str) -> None:
    """A middle patch row deleted: versions() leaves out what cannot be rebuilt, every listed
    version loads, the others inside the kept range raise HistoryCorrupted, never a 404."""
    history, contents = _saved(storage, engine, 13)
    _delete(engine, storage, "patch", 4)
    listed = history.versions("doc")
    assert listed == [1, 2, 3, *range(6, 14)]  # 4 and 5 need row 4; 6 has a snapshot
    for version in listed:
        assert history.load("doc", version).content == contents[version - 1]
    for version in (4, 5):
        problem = _corrupted(history, version)
        assert (problem.version, problem.reason) == (4, "its patch row is missing")
    report = history.verify("doc")
    assert report.problem is not None
    assert (report.problem.version, report.checked) == (4, 3)
    with pytest.raises(NotFoundError):
        history.load("doc", 14)  # past the head: still simply not found


@pytest.mark.parametrize("garbage", ["not-json", "not-a-patch", "does-not-apply"])
def test_garbage_in_a_patch_row_is_a_500_not_a_422(
    engine: sa.Engine, storage: str, garbage: str
) -> None:
    """A patch row that does not parse, is no JSON Patch, or does not apply raises
    HistoryCorrupted (the server's data), not a PatchError (the client's)."""
    history, _ = _saved(storage, engine, 5)
    if garbage == "not-json":
        if engine.dialect.name == "postgresql" and storage == "document":
            pytest.skip("PostgreSQL's json column refuses text that is not JSON")
        _write(engine, storage, "patch", 3, "{not json")
    else:
        text = (
            '{"op": "replace"}' if garbage == "not-a-patch" else '[{"op": "remove", "path": "/x"}]'
        )
        _write(engine, storage, "patch", 3, text)
        table = _table(storage, "patch")
        with engine.begin() as conn:  # unchained (no digest): only the replay can tell
            conn.execute(sa.update(table).where(table.c.version == 3).values(digest=None))
    problem = _corrupted(history, 4)
    assert problem.version == 3
    expected = {
        "not-json": "does not parse",
        "not-a-patch": "not a JSON Patch",
        "does-not-apply": "does not apply",
    }[garbage]
    assert expected in problem.reason
    report = history.verify("doc")
    assert report.problem is not None
    assert expected in report.problem.reason


def test_a_tampered_snapshot_is_found(engine: sa.Engine, storage: str) -> None:
    """A snapshot changed: its content digest fails on load; changed with a matching content
    digest, verify still finds that it differs from the replayed patches."""
    history, contents = _saved(storage, engine, 9)

    def retitled(content: dict[str, object]) -> dict[str, object]:
        return {**content, "title": "TAMPERED"}

    _tamper(engine, storage, "snapshot", 6, retitled)
    for version in (6, 7):
        assert "content digest" in _corrupted(history, version).reason
    assert history.load("doc", 5).content == contents[4]
    report = history.verify("doc")
    assert report.problem is not None
    assert report.problem.version == 6

    from hardening.blocks._chain import canonical, content_digest

    forged = _read(engine, storage, "snapshot", 6)
    table = _table(storage, "snapshot")
    with engine.begin() as conn:  # a forger who also rewrote the content digest
        conn.execute(
            sa.update(table)
            .where(table.c.version == 6)
            .values(content_digest=content_digest(canonical(forged)))
        )
    assert history.load("doc", 6).content["title"] == "TAMPERED"  # a load cannot tell
    report = history.verify("doc")
    assert report.problem is not None
    assert (report.problem.version, report.problem.reason) == (
        6,
        "its snapshot differs from the replayed patches",
    )


def test_a_changed_head_is_found_by_verify(engine: sa.Engine, storage: str) -> None:
    """A head that is not where the patches lead is reported at the head's version."""
    history, _ = _saved(storage, engine, 4)
    if storage == "document":
        table = HistoryBase.metadata.tables["hardening_documents"]
        with engine.begin() as conn:
            conn.execute(sa.update(table).values(content={**PAGE, "title": "TAMPERED"}))
    else:
        table = BlockHistory.metadata.tables["hardening_block_rows"]
        with engine.begin() as conn:
            conn.execute(sa.delete(table).where(table.c.block_id == "b2"))
    report = history.verify("doc")
    assert report.problem is not None
    assert (report.problem.version, report.checked) == (4, 4)
    assert report.problem.reason == "the head differs from the replayed history"


def test_a_stale_save_against_a_damaged_base_is_a_500(engine: sa.Engine, storage: str) -> None:
    """A rebase needs the base version: damaged, the save fails with HistoryCorrupted, not a
    conflict the client would retry forever."""
    history, _ = _saved(storage, engine, 4, conflict="rebase")
    _tamper(engine, storage, "patch", 2, lambda patch: [{**patch[0], "value": "x"}])
    with pytest.raises(HistoryCorrupted):
        history.save("doc", _edit(9, 3), base_version=2)
    assert history.load("doc").version == 4


@pytest.mark.parametrize("call", ["load 9", "load 7", "verify"])
def test_a_compaction_during_a_read_is_not_damage(
    pg_engine: sa.Engine, storage: str, call: str
) -> None:
    """A compaction committed between a read's snapshot and patch statements removes rows it
    expected: the load or verify starts again from the new oldest snapshot (or the version is
    simply gone), it does not report damage."""
    _metadata(storage).create_all(pg_engine)
    history, contents = _saved(storage, pg_engine, 13)
    patches = f"FROM {_NAMES[storage][0]}"
    compacted: list[int] = []

    def compact_first(*args: Any) -> None:
        if patches in str(args[2]) and not compacted:
            compacted.append(0)  # the compaction's own reads pass
            compacted[0] = _history(storage, pg_engine).compact("doc", keep=5)

    sa.event.listen(pg_engine, "before_cursor_execute", compact_first)
    try:
        if call == "load 9":
            assert history.load("doc", 9).content == contents[8]
        elif call == "load 7":
            with pytest.raises(NotFoundError):
                history.load("doc", 7)
        else:
            assert history.verify("doc") == HistoryReport("doc", 13, 5, 0, None)
    finally:
        sa.event.remove(pg_engine, "before_cursor_execute", compact_first)
    assert compacted == [9]


# --- BlockHistory.patches_since -----------------------------------------------------------------


def test_patches_since_checks_the_chain(sql_engine: sa.Engine) -> None:
    """The patches a client catches up with are checked: altered, garbage or missing rows
    raise HistoryCorrupted; a compacted version is still simply not found."""
    BlockHistory.metadata.create_all(sql_engine)
    history, _ = _saved("blocks", sql_engine, 8)
    assert history.compact("doc", keep=6) == 3
    with pytest.raises(NotFoundError):
        history.patches_since("doc", 1)
    assert len(history.patches_since("doc", 3)) == 5  # anchored on the snapshot at 3
    _tamper(sql_engine, "blocks", "patch", 5, lambda patch: [{**patch[0], "value": "x"}])
    with pytest.raises(HistoryCorrupted) as raised:
        history.patches_since("doc", 3)
    assert raised.value.version == 5
    assert len(history.patches_since("doc", 5)) == 3  # from 5 on, the chain holds
    _delete(sql_engine, "blocks", "patch", 7)
    with pytest.raises(HistoryCorrupted) as raised:
        history.patches_since("doc", 5)
    assert (raised.value.version, raised.value.reason) == (7, "its patch row is missing")
    _write(sql_engine, "blocks", "patch", 8, "{not json")
    with pytest.raises(HistoryCorrupted) as raised:
        history.patches_since("doc", 7)
    assert raised.value.version == 8


# --- a database made before the digests ---------------------------------------------------------


@pytest.mark.parametrize("upgrade", ["create_schema", "create_all"])
def test_a_database_without_digest_columns_is_upgraded(
    engine: sa.Engine, storage: str, upgrade: str
) -> None:
    """Tables made before the digest columns get them from create_schema (or create_all):
    the old rows are accepted as unchained, new saves are chained, damage to them is found."""
    history, contents = _saved(storage, engine, 8)
    quote = engine.dialect.identifier_preparer.quote
    with engine.begin() as conn:  # back to the tables as an older release made them
        for table in _metadata(storage).sorted_tables:
            for column in table.columns:
                if column.name in ("digest", "content_digest"):
                    conn.execute(
                        sa.text(f"ALTER TABLE {table.name} DROP COLUMN {quote(column.name)}")
                    )
    if upgrade == "create_schema":
        history.create_schema()
    else:
        _metadata(storage).create_all(engine)
    assert [history.load("doc", v).content for v in range(1, 9)] == contents
    assert history.versions("doc") == list(range(1, 9))
    report = history.verify("doc")
    assert (report.ok, report.checked, report.unchained) == (True, 8, 9)  # 7 patches, 2 snapshots
    for version in range(8, 12):
        history.save("doc", _edit(version), base_version=version)
    report = history.verify("doc")
    assert (report.ok, report.checked, report.unchained) == (True, 12, 9)
    _tamper(engine, storage, "patch", 10, lambda patch: [{**patch[0], "value": "x"}])
    assert _corrupted(history, 10).version == 10
    _metadata(storage).create_all(engine)  # again: nothing left to add


# --- the cost of a save -----------------------------------------------------------------------


def test_a_save_costs_the_same_at_version_3_and_300(engine: sa.Engine, storage: str) -> None:
    """Chaining reads no earlier row: a save at version 300 runs exactly the statements of a
    save at version 3."""
    kind = BlockHistory if storage == "blocks" else DocumentHistory
    history = kind(engine, snapshots=SnapshotPolicy(every=None, replay_ratio=None))
    history.create("doc", PAGE)
    seen = {}
    for version in range(1, 301):
        if version in (3, 300):
            with Statements(engine) as statements:
                history.save("doc", _edit(version), base_version=version)
            seen[version] = statements.seen
        else:
            history.save("doc", _edit(version), base_version=version)
    assert seen[3] == seen[300]
    history_rows = [f"FROM {name}" for names in _NAMES.values() for name in names]
    assert not [s for s in seen[3] if any(name in s for name in history_rows)]


# --- asyncio --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_verify_and_damage(pg_async_engine: Any) -> None:
    """AsyncDocumentHistory chains its saves, verifies, and raises HistoryCorrupted alike."""
    from hardening import AsyncDocumentHistory

    history = AsyncDocumentHistory(pg_async_engine, snapshots=EVERY_5)
    await history.create_schema()
    await history.create("doc", PAGE)
    for version in range(1, 8):
        await history.save("doc", _edit(version), base_version=version)
    assert (await history.verify("doc")).ok
    table = HistoryBase.metadata.tables["hardening_document_patches"]
    async with pg_async_engine.begin() as conn:
        await conn.execute(sa.delete(table).where(table.c.version == 3))
    assert await history.versions("doc") == [1, 2, 6, 7, 8]
    with pytest.raises(HistoryCorrupted):
        await history.load("doc", 4)
    report = await history.verify("doc")
    assert report.problem is not None
    assert report.problem.version == 3
