"""DocumentHistory on PostgreSQL through the fault-injecting proxy (``tests/faultproxy.py``).

A save is one transaction: an outage anywhere in it -- before it starts, between its
statements, at its commit -- raises BackendUnavailable and leaves the previous version whole
(no head row without its patch, no gap in ``versions()``). Under concurrent saves through a blip
every document stays exactly the sum of the saves that were stored, and a pool far smaller than
the crowd of savers makes them wait instead of failing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from hardening import BackendUnavailable, ConflictError, DocumentHistory
from hardening.blocks.history import HistoryBase
from tests.blocks.proxied import dump_rows, engine_opener
from tests.concurrency import outcome_within
from tests.faultproxy import (
    CONNECT_TIMEOUT,
    SLACK,
    UNBOUNDED_PG_REPLY,
    FaultProxy,
    wait_until,
)

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def open_engine(
    pg_schema: str, postgres_url: str, postgres_proxy: FaultProxy
) -> Iterator[Callable[..., sa.Engine]]:
    """Open engines on the test's schema through the proxy, with the history's tables."""
    yield from engine_opener(HistoryBase.metadata, pg_schema, postgres_url, postgres_proxy)


def _rows(engine: sa.Engine) -> str:
    """Every row of the history's tables, to compare before and after."""
    return dump_rows(engine, HistoryBase.metadata)


def _append(value: object) -> list[dict[str, object]]:
    return [{"op": "add", "path": "/items/-", "value": value}]


def _two_versions(history: DocumentHistory) -> None:
    history.create("doc", {"items": []})
    assert history.save("doc", _append("a"), base_version=1) == 2


def _assert_whole(history: DocumentHistory, items: list[object]) -> None:
    """The document is at version 1 + len(items), and every version rebuilds without a gap."""
    head = history.load("doc")
    assert (head.version, head.content) == (1 + len(items), {"items": items})
    assert history.versions("doc") == list(range(1, head.version + 1))
    for version in range(1, head.version):
        assert history.load("doc", version).content == {"items": items[: version - 1]}


# --- one save, one outage ---------------------------------------------------------------------


def test_a_save_during_a_cut_writes_nothing(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """A save while the database is cut: BackendUnavailable, bounded; version 2 stays whole."""
    engine = open_engine()
    history = DocumentHistory(engine)
    _two_versions(history)
    before = _rows(engine)
    postgres_proxy.cut()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        history.save("doc", _append("b"), base_version=2)
    assert time.monotonic() - started < CONNECT_TIMEOUT
    assert caught.value.backend == "sql"
    postgres_proxy.restore()
    assert _rows(engine) == before
    _assert_whole(history, ["a"])
    assert history.save("doc", _append("b"), base_version=2) == 3


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("patch", id="between-statements"),
        pytest.param("commit", id="at-commit"),
    ],
)
def test_a_cut_inside_a_save_rolls_all_of_it_back(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy, moment: str
) -> None:
    """Cut after the head row moved (before its patch row), or just before COMMIT: all undone."""
    engine = open_engine()
    history = DocumentHistory(engine)
    _two_versions(history)
    before = _rows(engine)

    def cut_before_patch_row(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO hardening_document_patches"):
            postgres_proxy.cut()

    def cut_before_commit(conn: Any) -> None:
        postgres_proxy.cut()

    hooks: dict[str, tuple[str, Callable[..., None]]] = {
        "patch": ("before_cursor_execute", cut_before_patch_row),
        "commit": ("commit", cut_before_commit),
    }
    event, hook = hooks[moment]
    sa.event.listen(engine, event, hook)
    with pytest.raises(BackendUnavailable):
        history.save("doc", _append("b"), base_version=2)
    assert postgres_proxy.mode == "cut"  # the outage struck where it was meant to
    sa.event.remove(engine, event, hook)
    postgres_proxy.restore()
    assert _rows(engine) == before
    _assert_whole(history, ["a"])
    assert history.save("doc", _append("b"), base_version=2) == 3


def test_a_save_to_a_silent_server_gives_up_within_the_connect_timeout(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """A server that accepts and never answers: a save on a new connection gives up in time."""
    engine = open_engine()
    history = DocumentHistory(engine)
    _two_versions(history)
    engine.dispose()
    postgres_proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        history.save("doc", _append("b"), base_version=2)
    assert time.monotonic() - started < CONNECT_TIMEOUT + SLACK
    postgres_proxy.restore()
    _assert_whole(history, ["a"])


@pytest.mark.xfail(strict=True, reason=UNBOUNDED_PG_REPLY)
def test_a_save_on_a_pooled_connection_to_a_silent_server_gives_up_in_time(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """A server that goes silent under an open connection: the save still gives up in time."""
    engine = open_engine()
    history = DocumentHistory(engine)
    _two_versions(history)  # leaves an established connection in the pool
    postgres_proxy.blackhole()
    outcome = outcome_within(
        lambda: history.save("doc", _append("b"), base_version=2),
        CONNECT_TIMEOUT + SLACK,
        release=postgres_proxy.restore,  # resets the blackholed connection: frees the saver
    )
    assert isinstance(outcome, BackendUnavailable)


# --- many saves ---------------------------------------------------------------------------------


class Editor:
    """Appends numbers to one document; after an outage, learns which of its saves landed.

    A save that raised BackendUnavailable may still have committed (the reply to COMMIT was
    lost): the editor reloads the document to find out, so it always knows its exact content.
    """

    def __init__(self, history: DocumentHistory, doc_id: str) -> None:
        self.history = history
        self.doc_id = doc_id
        self.items: list[object] = []
        self.acknowledged = 0  # saves that returned
        self.unavailable = 0  # saves that raised BackendUnavailable
        self.landed_anyway = 0  # ...and had been committed all the same
        self.unexpected: list[BaseException] = []

    def save_one(self, value: int) -> None:
        try:
            version = self.history.save(
                self.doc_id, _append(value), base_version=1 + len(self.items)
            )
        except (BackendUnavailable, ConflictError) as exc:
            self.unavailable += isinstance(exc, BackendUnavailable)
            self._resync(value)
        except BaseException as exc:
            self.unexpected.append(exc)
            raise
        else:
            assert version == 2 + len(self.items)
            self.items.append(value)
            self.acknowledged += 1

    def _resync(self, value: int) -> None:
        loaded: list[Any] = []

        def load() -> bool:
            try:
                loaded.append(self.history.load(self.doc_id))
            except BackendUnavailable:
                return False
            return True

        assert wait_until(load, timeout=30)
        content = loaded[0].content
        assert isinstance(content, dict)
        if content["items"] == [*self.items, value]:
            self.items.append(value)
            self.landed_anyway += 1
        else:
            assert content["items"] == self.items


def test_concurrent_saves_through_a_blip_stay_exact(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """20 editors saving through a 0.3 s blip: each document is exactly its stored saves."""
    engine = open_engine(pool_size=20)
    history = DocumentHistory(engine)
    editors = [Editor(history, f"doc-{n}") for n in range(20)]
    for editor in editors:
        history.create(editor.doc_id, {"items": []})
    stop = threading.Event()

    def edit(editor: Editor) -> None:
        value = 0
        while not stop.is_set():
            editor.save_one(value)
            value += 1

    threads = [threading.Thread(target=edit, args=(editor,)) for editor in editors]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: all(e.acknowledged >= 3 for e in editors), timeout=10)
        postgres_proxy.blip(0.3)
        assert postgres_proxy.wait_blip(timeout=10)
        restored = time.monotonic()
        after = [e.acknowledged for e in editors]
        assert wait_until(
            lambda: all(e.acknowledged > n for e, n in zip(editors, after, strict=True)),
            timeout=30,
        )
        resumed = time.monotonic() - restored
        assert wait_until(
            lambda: all(e.acknowledged >= n + 3 for e, n in zip(editors, after, strict=True)),
            timeout=30,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert [e.unexpected for e in editors] == [[]] * 20
    assert sum(e.unavailable for e in editors) > 0, "the blip was not seen"
    for editor in editors:
        head = history.load(editor.doc_id)
        assert head.content == {"items": editor.items}
        assert head.version == 1 + editor.acknowledged + editor.landed_anyway
        assert editor.landed_anyway <= editor.unavailable
        assert history.versions(editor.doc_id) == list(range(1, head.version + 1))
    landed = sum(e.landed_anyway for e in editors)
    failed = sum(e.unavailable for e in editors)
    print(f"\n{landed} of {failed} failed saves had committed; all 20 editors saved again")
    print(f"{resumed * 1000:.0f} ms after the database came back")


def test_100_savers_wait_for_a_pool_of_2(
    open_engine: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """100 threads saving through 2 connections (no overflow): all 100 saves stored."""
    engine = open_engine(pool_size=2, max_overflow=0, pool_timeout=30)
    history = DocumentHistory(engine)
    for n in range(100):
        history.create(f"doc-{n}", {"items": []})
    postgres_proxy.latency(0.002)  # each save holds its connection a while: the pool is contended
    barrier = threading.Barrier(100)
    versions: list[int] = []
    errors: list[BaseException] = []

    def save(n: int) -> None:
        barrier.wait()
        try:
            versions.append(history.save(f"doc-{n}", _append(n), base_version=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert versions == [2] * 100
    assert postgres_proxy.connections_accepted <= 2
    assert [history.load(f"doc-{n}").content for n in range(100)] == [
        {"items": [n]} for n in range(100)
    ]
