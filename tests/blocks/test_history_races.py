"""Histories without false conflicts and without 500s: saves with no base version (``If-Match:
*``) apply to the head atomically, and a transaction the database aborts as a lost race
(REPEATABLE READ, SERIALIZABLE, deadlocks) is run again, on SQLite and real PostgreSQL.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hardening import (
    AsyncDocumentHistory,
    BlockHistory,
    ConfigurationError,
    ConflictError,
    DocumentHistory,
    Metrics,
    NotFoundError,
    PatchApplyError,
    PatchTestFailed,
    retry_on_conflict,
)
from hardening.blocks.history import HistoryBase
from tests.concurrency import in_threads

BLOCKS: list[dict[str, object]] = [{"id": "b0", "type": "p", "text": "x"}]
STRICT = ["REPEATABLE READ", "SERIALIZABLE"]


def _add(block_id: str) -> list[dict[str, object]]:
    return [{"op": "add", "path": "/-", "value": {"id": block_id, "type": "p", "text": ""}}]


def _make(kind: str, engine: sa.Engine | None, **options: Any) -> DocumentHistory:
    if kind == "blocks":
        return BlockHistory(engine, **options)  # type: ignore[return-value]
    return DocumentHistory(engine, **options)


def _schema(engine: sa.Engine) -> None:
    BlockHistory.metadata.create_all(engine)
    HistoryBase.metadata.create_all(engine)


def _chained(history: DocumentHistory, doc_id: str = "p") -> None:
    """Every save, rerun or applied to the locked head, extended the checksum chain."""
    report = history.verify(doc_id)
    assert (report.problem, report.unchained, report.checked) == (None, 0, report.head)


def _ids(history: DocumentHistory, doc_id: str = "p") -> list[str]:
    content = history.load(doc_id).content
    assert isinstance(content, list)
    return [block["id"] for block in content]


@pytest.fixture(params=["document", "blocks"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which storage: a JSON head (DocumentHistory) or a row per block (BlockHistory)."""
    return str(request.param)


# --- base_version=None: apply to the head ---------------------------------------------------


@pytest.mark.parametrize("conflict", ["reject", "rebase"])
def test_save_without_base_applies_to_the_head(
    sql_engine: sa.Engine, kind: str, conflict: Any
) -> None:
    """``base_version=None`` applies to whatever the head is: no 409 under ``"reject"``, no
    rebase, and still a new version with its patch kept."""
    _schema(sql_engine)
    history = _make(kind, sql_engine, conflict=conflict)
    history.create("p", BLOCKS)
    assert history.save("p", _add("b1"), base_version=1) == 2
    assert history.save("p", _add("b2"), base_version=None) == 3
    assert _ids(history) == ["b0", "b1", "b2"]
    assert history.versions("p") == [1, 2, 3]
    assert [b["id"] for b in history.load("p", 2).content] == ["b0", "b1"]  # type: ignore[attr-defined]
    _chained(history)


def test_save_without_base_is_checked_against_the_head(sql_engine: sa.Engine, kind: str) -> None:
    """A patch that does not apply to the head is refused, guards included; nothing written."""
    _schema(sql_engine)
    history = _make(kind, sql_engine)
    history.create("p", BLOCKS)
    with pytest.raises(PatchApplyError):
        history.save("p", [{"op": "remove", "path": "/5"}], base_version=None)
    with pytest.raises(PatchTestFailed):
        history.save("p", [{"op": "test", "path": "/0/id", "value": "zz"}], base_version=None)
    with pytest.raises(NotFoundError):
        history.save("nope", _add("b1"), base_version=None)
    assert history.versions("p") == [1]


def test_block_apply_without_base_says_what_changed(sql_engine: sa.Engine) -> None:
    """``BlockHistory.apply(base_version=None)`` reports the new version and changed blocks."""
    _schema(sql_engine)
    history = BlockHistory(sql_engine)
    history.create("p", BLOCKS)
    done = history.apply("p", _add("b1"), base_version=None)
    assert (done.version, done.changed, done.removed) == (2, frozenset({"b1"}), frozenset())


@pytest.mark.parametrize("base", [1.0, "1", True])
def test_base_version_must_be_an_int_or_none(sql_engine: sa.Engine, kind: str, base: Any) -> None:
    """Anything else is still a configuration error (a bug in the caller)."""
    _schema(sql_engine)
    history = _make(kind, sql_engine)
    history.create("p", BLOCKS)
    with pytest.raises(ConfigurationError):
        history.save("p", _add("b1"), base_version=base)


def test_saves_without_base_never_conflict_on_postgres(pg_engine: sa.Engine, kind: str) -> None:
    """4 threads x 5 head saves with ``retries=0``: the head row is locked for each save, so
    none loses a race (without the lock, READ COMMITTED would give 409s) and all 20 land."""
    _schema(pg_engine)
    history = _make(kind, pg_engine, retries=0)
    history.create("p", BLOCKS)
    names = itertools.count()
    lock = threading.Lock()

    def editor() -> None:
        for _ in range(5):
            with lock:
                block_id = f"n{next(names)}"
            history.save("p", _add(block_id), base_version=None)

    in_threads(4, editor)
    assert history.versions("p")[-1] == 21
    assert sorted(_ids(history)[1:]) == sorted(f"n{i}" for i in range(20))
    _chained(history)


# --- lost races at REPEATABLE READ / SERIALIZABLE (real PostgreSQL) -------------------------


@pytest.fixture
def strict_engine(
    request: pytest.FixtureRequest, postgres_url: str, pg_schema: str
) -> Iterator[sa.Engine]:
    """A PostgreSQL engine on the test's schema whose transactions run at the given level."""
    level = getattr(request, "param", "REPEATABLE READ")
    engine = sa.create_engine(
        postgres_url,
        connect_args={"options": f"-csearch_path={pg_schema}"},
        isolation_level=level,
        pool_size=10,
    )
    yield engine
    engine.dispose()


def _interfere_once(engine: sa.Engine, action: Callable[[], object]) -> None:
    """Run ``action`` (a concurrent, committed save) just before the first UPDATE on ``engine``:
    after the transaction took its snapshot and read the head, before it writes."""
    done: list[bool] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not done and statement.lstrip().upper().startswith("UPDATE"):
            done.append(True)
            action()

    sa.event.listen(engine, "before_cursor_execute", before)


@pytest.mark.parametrize("strict_engine", STRICT, indirect=True)
def test_lost_race_is_rerun_and_rebased(
    pg_engine: sa.Engine, strict_engine: sa.Engine, kind: str
) -> None:
    """Under ``"rebase"`` a save whose UPDATE the server refuses (40001) is run again in a new
    transaction, which sees the concurrent save and merges onto it: no 500, no 409."""
    _schema(pg_engine)
    metrics = Metrics()
    history = _make(kind, strict_engine, conflict="rebase", metrics=metrics)
    other = _make(kind, pg_engine)
    history.create("p", BLOCKS)
    _interfere_once(strict_engine, lambda: other.save("p", _add("theirs"), base_version=1))
    assert history.save("p", _add("mine"), base_version=1) == 3
    assert sorted(_ids(history)) == ["b0", "mine", "theirs"]  # merged, in rebase order
    _chained(history)
    counted = sum(  # the lost race is counted as a conflict (of the head row's model)
        metrics.registry.get_sample_value("hardening_lock_conflicts_total", {"entity": e}) or 0
        for e in ("Document", "BlockDocument")
    )
    assert counted >= 1


def test_lost_race_rerun_under_reject_reports_the_real_version(
    pg_engine: sa.Engine, strict_engine: sa.Engine, kind: str
) -> None:
    """Under ``"reject"`` the rerun finds the base stale: a 409 naming the current version."""
    _schema(pg_engine)
    history = _make(kind, strict_engine)
    history.create("p", BLOCKS)
    other = _make(kind, pg_engine)
    _interfere_once(strict_engine, lambda: other.save("p", _add("theirs"), base_version=1))
    with pytest.raises(ConflictError) as info:
        history.save("p", _add("mine"), base_version=1)
    assert (info.value.expected_version, info.value.current_version) == (1, 2)
    assert _ids(history) == ["b0", "theirs"]


def test_lost_race_without_reruns_is_a_conflict(
    pg_engine: sa.Engine, strict_engine: sa.Engine, kind: str
) -> None:
    """With ``retries=0`` the lost race is raised as a ConflictError (from the 40001)."""
    _schema(pg_engine)
    history = _make(kind, strict_engine, conflict="rebase", retries=0)
    history.create("p", BLOCKS)
    other = _make(kind, pg_engine)
    _interfere_once(strict_engine, lambda: other.save("p", _add("theirs"), base_version=1))
    with pytest.raises(ConflictError) as info:
        history.save("p", _add("mine"), base_version=1)
    assert getattr(info.value.__cause__, "orig", None).sqlstate == "40001"  # type: ignore[union-attr]


def test_lost_race_in_a_callers_transaction(
    pg_engine: sa.Engine, strict_engine: sa.Engine, kind: str
) -> None:
    """In the caller's transaction the race is a ConflictError (theirs to roll back); run in
    ``retry_on_conflict``, the caller's next attempt lands."""
    _schema(pg_engine)
    history = _make(kind, strict_engine, conflict="rebase")
    history.create("p", BLOCKS)
    other = _make(kind, pg_engine)
    _interfere_once(strict_engine, lambda: other.save("p", _add("theirs"), base_version=1))
    attempts: list[int] = []

    @retry_on_conflict(attempts=3, sleep=lambda _: None)
    def save() -> int:
        attempts.append(1)
        with strict_engine.begin() as conn:
            return history.save("p", _add("mine"), base_version=1, session=conn)

    assert save() == 3
    assert len(attempts) == 2
    assert sorted(_ids(history)) == ["b0", "mine", "theirs"]  # merged, in rebase order
    _chained(history)


@pytest.mark.parametrize("strict_engine", STRICT, indirect=True)
def test_concurrent_saves_at_strict_isolation_never_500(
    strict_engine: sa.Engine, pg_engine: sa.Engine, kind: str
) -> None:
    """4 threads x 4 saves, half with a base and half without, at REPEATABLE READ or
    SERIALIZABLE: every save lands or is a ConflictError; never a raw OperationalError."""
    _schema(pg_engine)
    history = _make(kind, strict_engine, conflict="rebase", retries=30)
    history.create("p", BLOCKS)
    names = itertools.count()
    lock = threading.Lock()

    def editor() -> tuple[int, int]:
        saved = conflicts = 0
        for step in range(4):
            with lock:
                block_id = f"n{next(names)}"
            base = None if step % 2 else history.load("p").version
            try:
                history.save("p", _add(block_id), base_version=base)
            except ConflictError:
                conflicts += 1
            else:
                saved += 1
        return saved, conflicts

    outcomes = in_threads(4, editor)
    saved = sum(s for s, _ in outcomes)
    assert saved + sum(c for _, c in outcomes) == 16
    assert history.versions("p")[-1] == 1 + saved
    assert len(_ids(history)) == 1 + saved
    _chained(history)


@pytest.mark.anyio
async def test_async_history_reruns_a_lost_race_and_saves_to_the_head(
    pg_engine: sa.Engine, postgres_url: str, pg_schema: str
) -> None:
    """AsyncDocumentHistory: a 40001 is rerun and rebased; ``base_version=None`` applies."""
    engine = create_async_engine(
        postgres_url,
        connect_args={"options": f"-csearch_path={pg_schema}"},
        isolation_level="REPEATABLE READ",
    )
    try:
        history = AsyncDocumentHistory(engine, conflict="rebase")
        await history.create_schema()
        await history.create("p", BLOCKS)
        other = DocumentHistory(pg_engine)
        _interfere_once(engine.sync_engine, lambda: other.save("p", _add("theirs"), base_version=1))
        assert await history.save("p", _add("mine"), base_version=1) == 3
        assert await history.save("p", _add("last"), base_version=None) == 4
        content = (await history.load("p")).content
        ids = [b["id"] for b in content]  # type: ignore[attr-defined]
        assert (sorted(ids[:3]), ids[3]) == (["b0", "mine", "theirs"], "last")
        report = await history.verify("p")
        assert (report.problem, report.unchained, report.checked) == (None, 0, 4)
    finally:
        await engine.dispose()
