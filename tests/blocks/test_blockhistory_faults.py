"""BlockHistory on PostgreSQL through the fault-injecting proxy (``tests/faultproxy.py``).

A save of a row-per-block page is one transaction of many statements (the head row's version,
the block rows it names, the head's counts, the patch row): an outage anywhere in it -- before
it starts, between its statements, at its commit -- raises BackendUnavailable and leaves every
table as it was. A silent server makes a save fail in time (once the connection is pooled, only
with ``statement_deadline``). Writers appending to one page through a blip end with exactly the
blocks they stored, and a pool far smaller than the crowd of savers makes them wait, or fail
typed once ``pool_timeout`` passes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from hardening import BackendUnavailable, BlockHistory, ConflictError, statement_deadline
from hardening.blocks.history import ConflictPolicy
from tests.blocks.proxied import dump_rows, engine_opener
from tests.concurrency import outcome_within
from tests.faultproxy import CONNECT_TIMEOUT, SLACK, UNBOUNDED_PG_REPLY, FaultProxy, wait_until

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DOC = "page"
# Between a writer's calls. SQLAlchemy's QueuePool is not fair: a thread that returns a
# connection and asks again at once takes it back before a waiter wakes, so 16 callers looping
# without a pause on 2 connections leave 14 of them waiting until pool_timeout.
PAUSE = 0.002


@pytest.fixture
def open_engine(
    pg_schema: str, postgres_url: str, postgres_proxy: FaultProxy
) -> Iterator[Callable[..., sa.Engine]]:
    """Open engines on the test's schema through the proxy, with the history's tables."""
    yield from engine_opener(BlockHistory.metadata, pg_schema, postgres_url, postgres_proxy)


def _rows(engine: sa.Engine) -> str:
    """Every row of the history's tables, to compare before and after."""
    return dump_rows(engine, BlockHistory.metadata)


def _block(block_id: str, text: str = "") -> dict[str, Any]:
    return {"id": block_id, "text": text}


def _append(block: dict[str, Any], where: str = "") -> list[dict[str, Any]]:
    return [{"op": "add", "path": f"{where}/-", "value": block}]


def _doc(blocks: list[dict[str, Any]], wrapped: bool, title: str = "T") -> Any:
    """The page as the array itself, or as an object holding it under "blocks"."""
    return {"title": title, "blocks": blocks} if wrapped else blocks


def _two_versions(history: BlockHistory, wrapped: bool) -> dict[int, Any]:
    """Version 1 (b0..b3), version 2 (b1 edited behind its id guard, "a" appended)."""
    blocks = [_block(f"b{i}", f"t{i}") for i in range(4)]
    where = "/blocks" if wrapped else ""
    assert history.create(DOC, _doc(blocks, wrapped)) == 1
    patch = [
        {"op": "test", "path": f"{where}/1/id", "value": "b1"},
        {"op": "replace", "path": f"{where}/1/text", "value": "edited"},
        *_append(_block("a", "new"), where),
    ]
    assert history.save(DOC, patch, base_version=1) == 2
    second = [blocks[0], _block("b1", "edited"), *blocks[2:], _block("a", "new")]
    return {1: _doc(blocks, wrapped), 2: _doc(second, wrapped)}


def _third(wrapped: bool) -> tuple[list[dict[str, Any]], Any]:
    """A save on version 2 writing every kind of row, and the page it makes (version 3)."""
    where = "/blocks" if wrapped else ""
    patch: list[dict[str, Any]] = [
        {"op": "test", "path": f"{where}/2/id", "value": "b2"},
        {"op": "replace", "path": f"{where}/2/text", "value": "x"},  # UPDATE a block row
        {"op": "remove", "path": f"{where}/0"},  # DELETE one
        {"op": "add", "path": f"{where}/1", "value": _block("c")},  # INSERT one
        {"op": "move", "from": f"{where}/3", "path": f"{where}/0"},  # a new order key
    ]
    if wrapped:
        patch.append({"op": "replace", "path": "/title", "value": "T3"})  # the head row's meta
    third = [_block("b3", "t3"), _block("b1", "edited"), _block("c"), _block("b2", "x")]
    return patch, _doc([*third, _block("a", "new")], wrapped, "T3")


def _assert_whole(history: BlockHistory, pages: dict[int, Any]) -> None:
    """The head is the last page; every version, window and the JSON text agree with it."""
    last = max(pages)
    wrapped = isinstance(pages[last], dict)
    blocks = pages[last]["blocks"] if wrapped else pages[last]
    head = history.load(DOC)
    assert (head.version, head.content) == (last, pages[last])
    assert history.versions(DOC) == list(range(1, last + 1)) == sorted(pages)
    for version, content in pages.items():
        assert history.load(DOC, version).content == content
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        window = history.load_blocks(DOC, limit=2, after=after)
        assert (window.version, window.total) == (last, len(blocks))
        assert window.meta == ({"title": pages[last]["title"]} if wrapped else None)
        seen += window.blocks
        if (after := window.next_after) is None:
            break
    assert seen == blocks
    version, text = history.load_json(DOC)
    assert (version, json.loads(text)) == (last, pages[last])


# --- one save, one outage ---------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["array", "wrapped"])
@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("", id="cut-before-the-save"),
        pytest.param("UPDATE hardening_block_rows", id="before-block-update"),
        pytest.param("DELETE FROM hardening_block_rows", id="before-block-delete"),
        pytest.param("INSERT INTO hardening_block_patches", id="before-patch-row"),
        pytest.param("COMMIT", id="at-commit"),
    ],
)
def test_a_cut_before_or_inside_a_save_writes_nothing(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy, moment: str, wrapped: bool
) -> None:
    """A save while the database is cut, or cut inside the save after the head's version moved
    (before a block row's write, or the patch row), or just before COMMIT: BackendUnavailable
    ("sql"), bounded; every table as before, the page and its versions rebuild exactly, and the
    same save succeeds once the database is back."""
    engine = open_engine()
    history = BlockHistory(engine)
    pages = _two_versions(history, wrapped)
    patch, third = _third(wrapped)
    before = _rows(engine)
    struck: list[str] = []

    def cut(conn: Any, cursor: Any = None, statement: str = "COMMIT", *args: Any) -> None:
        if statement.startswith(moment) and not struck:
            struck.append(statement)
            postgres_proxy.cut()

    event = "commit" if moment == "COMMIT" else "before_cursor_execute"
    sa.event.listen(engine, event, cut)
    if not moment:
        cut(None)  # before the save's first statement
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        history.apply(DOC, patch, base_version=2)
    assert time.monotonic() - started < CONNECT_TIMEOUT
    assert caught.value.backend == "sql"
    sa.event.remove(engine, event, cut)
    assert len(struck) == 1  # the outage struck where it was meant to
    assert postgres_proxy.mode == "cut"
    postgres_proxy.restore()
    assert _rows(engine) == before
    _assert_whole(history, pages)
    done = history.apply(DOC, patch, base_version=2)
    assert (done.version, sorted(done.changed), sorted(done.removed)) == (3, ["b2", "c"], ["b0"])
    _assert_whole(history, {**pages, 3: third})


@pytest.mark.parametrize(
    "connection",
    [
        "new",
        pytest.param("pooled", marks=pytest.mark.xfail(strict=True, reason=UNBOUNDED_PG_REPLY)),
        "pooled-with-deadline",
    ],
)
def test_a_save_to_a_silent_server_gives_up_in_time(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy, connection: str
) -> None:
    """A server that accepts and never answers: a save on a new connection gives up within the
    connect timeout; on a pooled one, with ``statement_deadline`` (without, nothing bounds the
    wait: a strict expected failure, as for DocumentHistory). Nothing is written, and the save
    succeeds after the restore."""
    engine = open_engine()
    if connection == "pooled-with-deadline":
        statement_deadline(engine, 1.0)
    history = BlockHistory(engine)
    pages = _two_versions(history, wrapped=False)  # leaves an established connection pooled
    if connection == "new":
        engine.dispose()
    postgres_proxy.blackhole()
    outcome = outcome_within(
        lambda: history.save(DOC, _append(_block("late")), base_version=2),
        CONNECT_TIMEOUT + SLACK,
        release=postgres_proxy.restore,  # resets the blackholed connections: frees the saver
    )
    assert isinstance(outcome, BackendUnavailable)
    assert outcome.backend == "sql"
    _assert_whole(history, pages)
    assert history.save(DOC, _append(_block("late")), base_version=2) == 3


# --- many saves ---------------------------------------------------------------------------------


class Writer:
    """Appends blocks of its own to the shared page, each until it is stored.

    Before every attempt it reads the head's version and whether its block is there already
    (``find_blocks``, one statement): a save that raised BackendUnavailable may have committed
    all the same (the reply to COMMIT was lost), and is then never saved twice.
    """

    def __init__(self, history: BlockHistory, name: str) -> None:
        self.history = history
        self.name = name
        self.stored: list[str] = []  # block ids, in the order they were stored
        self.acknowledged: dict[str, int] = {}  # block id -> the version its save returned
        self.seen: Counter[str] = Counter()  # unavailable, unreachable, conflict, landed
        self.unexpected: list[BaseException] = []

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.store(f"{self.name}-{len(self.stored)}")
        except BaseException as exc:
            self.unexpected.append(exc)
            raise

    def store(self, block_id: str) -> None:
        failed = False
        while True:
            time.sleep(PAUSE)
            try:
                version, found = self.history.find_blocks(DOC, [block_id])
            except BackendUnavailable:
                self.seen["unreachable"] += 1
                time.sleep(0.01)
                continue
            if block_id in found:
                assert failed, f"{block_id} stored by a save that was never acknowledged"
                self.seen["landed"] += 1
                break
            block = _block(block_id, self.name)
            try:
                done = self.history.save(DOC, _append(block, "/blocks"), base_version=version)
            except ConflictError:
                self.seen["conflict"] += 1
            except BackendUnavailable:
                self.seen["unavailable"] += 1
                failed = True
                time.sleep(0.01)
            else:
                assert done > version
                self.acknowledged[block_id] = done
                break
        self.stored.append(block_id)


@pytest.mark.parametrize("conflict", ["reject", "rebase"])
def test_concurrent_appends_through_a_blip_stay_exact(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy, conflict: ConflictPolicy
) -> None:
    """16 writers and a snapshot job on 2 pooled connections append to one page through a
    0.3 s blip that strikes inside a save: the page holds exactly the stored blocks, once each,
    in every writer's order; versions are contiguous, each adds exactly one block, and every
    version rebuilds to the head's blocks up to it. Under "reject" each save appends to the
    head it read, so version v is the first v - 1 blocks; under "rebase" an append written
    against an older version is merged into the gap after that version's last block (runs in
    one gap are ordered by id, rebase.py), so the blocks are in order but not in version order.
    """
    engine = open_engine(pool_size=2, max_overflow=0, pool_timeout=30)
    history = BlockHistory(engine, conflict=conflict)
    history.create(DOC, {"title": "shared", "blocks": []})
    writers = [Writer(history, f"w{n}") for n in range(16)]
    stop = threading.Event()
    snapshots: list[int | BaseException | None] = []

    def snapshot_job() -> None:  # the queue job a due snapshot asks for, racing the saves
        while not stop.is_set():
            try:
                snapshots.append(history.snapshot(DOC))
            except BaseException as exc:
                snapshots.append(exc)
            time.sleep(0.02)

    armed: list[bool] = []  # the next save to reach its patch row sets off the blip
    lock = threading.Lock()

    def blip_inside_a_save(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO hardening_block_patches"):
            with lock:
                if armed and armed.pop():
                    postgres_proxy.blip(0.3)

    sa.event.listen(engine, "before_cursor_execute", blip_inside_a_save)
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in writers]
    threads.append(threading.Thread(target=snapshot_job))
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: all(len(w.stored) >= 2 for w in writers), timeout=30)
        armed.append(True)
        assert wait_until(lambda: not armed, timeout=10)
        assert postgres_proxy.wait_blip(timeout=10)
        after = [len(w.stored) for w in writers]
        assert wait_until(
            lambda: all(len(w.stored) >= n + 2 for w, n in zip(writers, after, strict=True)),
            timeout=30,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert [w.unexpected for w in writers] == [[]] * 16
    errors = [e for e in snapshots if isinstance(e, BaseException)]
    assert all(isinstance(e, BackendUnavailable) for e in errors), errors
    seen = sum((w.seen for w in writers), Counter())
    assert seen["unavailable"] >= 1  # at least the save the blip struck
    assert seen["landed"] <= seen["unavailable"]
    head = history.load(DOC)
    blocks = head.content["blocks"]  # type: ignore[index]
    ids = [block["id"] for block in blocks]
    assert sorted(ids) == sorted(i for w in writers for i in w.stored)  # each once
    assert blocks == [_block(i, i.split("-")[0]) for i in ids]
    assert head.version == 1 + len(ids)
    assert history.versions(DOC) == list(range(1, head.version + 1))
    added: dict[str, int] = {}  # block id -> the version that added it, from the rebuilds
    previous: list[dict[str, Any]] = []
    for version in range(2, head.version + 1):
        content = history.load(DOC, version).content
        assert isinstance(content, dict)
        assert content["title"] == "shared"
        new = [block for block in content["blocks"] if block not in previous]
        assert len(new) == 1  # one block more, the others as they were, in their order
        assert [block for block in content["blocks"] if block != new[0]] == previous
        added[new[0]["id"]] = version
        assert content["blocks"] == [block for block in blocks if block["id"] in added]
        previous = content["blocks"]
    for writer in writers:
        assert [i for i in ids if i.startswith(f"{writer.name}-")] == writer.stored
        assert {i: added[i] for i in writer.acknowledged} == writer.acknowledged
    if conflict == "reject":  # every save was written against the head: a plain append
        assert [added[i] for i in ids] == list(range(2, head.version + 1))
    window = history.load_blocks(DOC, offset=len(ids) // 2, limit=len(ids))
    middle = (window.version, window.total, window.blocks)
    assert middle == (head.version, len(ids), blocks[len(ids) // 2 :])
    print(f"\n{len(ids)} blocks, {dict(seen)}, {len(errors)} snapshot jobs failed")


@pytest.mark.parametrize(
    ("pool_timeout", "latency"),
    [pytest.param(30, 0.002, id="waiting"), pytest.param(0.05, 0.01, id="timing-out")],
)
def test_40_savers_on_a_pool_of_2(
    open_engine: Callable[..., sa.Engine],
    postgres_proxy: FaultProxy,
    pool_timeout: float,
    latency: float,
) -> None:
    """40 threads saving, each to a page of its own, through 2 connections (no overflow), each
    save holding its connection a while. With pool_timeout=30 they wait: all 40 are stored. With
    0.05 (a save, 8 round trips 10 ms late each way, holds its connection over 0.15 s) a caller
    that waited that long gets BackendUnavailable("sql") from the pool's TimeoutError, never the
    raw sqlalchemy error (``sql_unavailable``), and its page is untouched; retried, it is stored.
    """
    engine = open_engine(pool_size=2, max_overflow=0, pool_timeout=pool_timeout)
    history = BlockHistory(engine)
    for n in range(40):
        history.create(f"p{n}", [])
    postgres_proxy.latency(latency)
    barrier = threading.Barrier(40)
    outcomes: list[int | BaseException] = [0] * 40

    def save(n: int) -> None:
        barrier.wait()
        try:
            outcomes[n] = history.save(f"p{n}", _append(_block(f"x{n}")), base_version=1)
        except BaseException as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=save, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    postgres_proxy.latency(0)
    failed = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
    assert (failed == []) if pool_timeout == 30 else (1 <= len(failed) < 40)
    for n, outcome in enumerate(outcomes):
        if n not in failed:
            assert outcome == 2
            continue
        assert isinstance(outcome, BackendUnavailable), repr(outcome)
        assert outcome.backend == "sql"
        assert isinstance(outcome.__cause__, sa.exc.TimeoutError)
        assert "TimeoutError: QueuePool limit of size 2 overflow 0 reached" in str(outcome)
        assert (history.load(f"p{n}").version, history.load(f"p{n}").content) == (1, [])
        assert history.save(f"p{n}", _append(_block(f"x{n}")), base_version=1) == 2
    assert postgres_proxy.connections_accepted <= 2
    contents = [history.load(f"p{n}").content for n in range(40)]
    assert contents == [[_block(f"x{n}")] for n in range(40)]
