"""Replica routing with the network failing under it (``tests/faultproxy.py``).

The replica is a second database on the test server, reached through the fault-injecting
proxy (its own streaming standby would be no different to the router, and a proxy in front of
it is what breaks); the primary is reached directly, or through a proxy of its own when it is
the one to fail. Health and backoff run on a fake clock, so the assertions are exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hardening import BackendUnavailable, FakeClock, ReplicaRouter, insert_batches
from hardening.data.routing import async_routed_sessionmaker, routed_sessionmaker
from tests.concurrency import outcome_within
from tests.faultproxy import CONNECT_TIMEOUT, SLACK, UNBOUNDED_PG_REPLY, FaultProxy

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def _seed(engine: sa.Engine, body: str) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Note), [{"id": 1, "body": body}])


def _connect_args(schema: str) -> dict[str, Any]:
    return {"options": f"-csearch_path={schema}", "connect_timeout": CONNECT_TIMEOUT}


@pytest.fixture
def replica_url(
    replica_schema: str, replica_database_url: str, postgres_proxy: FaultProxy
) -> Iterator[str]:
    """The replica database's URL through ``postgres_proxy``, seeded with a note "replica"."""
    url = postgres_proxy.postgres_url(replica_database_url)
    seeding = sa.create_engine(url, connect_args=_connect_args(replica_schema))
    _seed(seeding, "replica")
    seeding.dispose()
    yield url
    postgres_proxy.restore()


@pytest.fixture
def open_replica(replica_url: str, replica_schema: str) -> Iterator[Callable[..., sa.Engine]]:
    """Open engines on the replica through the proxy; all disposed afterwards."""
    engines: list[sa.Engine] = []

    def open_(**options: Any) -> sa.Engine:
        engine = sa.create_engine(
            replica_url, connect_args=_connect_args(replica_schema), **options
        )
        engines.append(engine)
        return engine

    yield open_
    for engine in engines:
        engine.dispose()


@pytest.fixture
def primary(pg_engine: sa.Engine) -> sa.Engine:
    """The primary, reached directly, seeded with a note "primary"."""
    _seed(pg_engine, "primary")
    return pg_engine


def _connects(engine: sa.Engine) -> list[int]:
    """A list that grows by one per connection ``engine`` opens (or tries to)."""
    attempts: list[int] = []
    sa.event.listen(engine, "do_connect", lambda *args: attempts.append(1))
    return attempts


def _read(factory: Any) -> str:
    with factory() as session:
        return str(session.scalars(sa.select(Note.body).where(Note.id == 1)).one())


@pytest.mark.parametrize("pre_ping", [False, True], ids=["plain-pool", "pool-pre-ping"])
def test_a_cut_replica_fails_over_to_the_primary_and_back(
    primary: sa.Engine,
    open_replica: Callable[..., sa.Engine],
    postgres_proxy: FaultProxy,
    pre_ping: bool,
) -> None:
    """Replica cut: reads go to the primary, no error; probed after its backoff; used again."""
    replica = open_replica(pool_pre_ping=pre_ping)
    clock = FakeClock()
    factory = routed_sessionmaker(primary, [replica], backoff=1.0, clock=clock)
    router: ReplicaRouter = factory.kw["router"]
    assert _read(factory) == "replica"  # its pool now holds a connection the cut will break
    postgres_proxy.cut()
    attempts = _connects(replica)
    assert [_read(factory) for _ in range(5)] == ["primary"] * 5
    assert len(attempts) == 1  # one attempt to reconnect, then skipped for its backoff
    assert router.healthy_replicas() == []
    clock.advance(1.0)
    assert _read(factory) == "primary"  # the probe failed: skipped for 2 s now
    assert len(attempts) == 2
    postgres_proxy.restore()
    clock.advance(1.5)
    assert _read(factory) == "primary"
    assert len(attempts) == 2
    clock.advance(0.5)
    assert [_read(factory) for _ in range(3)] == ["replica"] * 3
    assert router.healthy_replicas() == [replica]


def test_reads_stay_answered_while_the_replica_is_silent(
    primary: sa.Engine, open_replica: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """A replica that accepts and never answers: one read per backoff waits the connect timeout."""
    replica = open_replica()
    clock = FakeClock()
    factory = routed_sessionmaker(primary, [replica], backoff=1.0, clock=clock)
    postgres_proxy.blackhole()
    attempts = _connects(replica)
    started = time.monotonic()
    assert _read(factory) == "primary"
    assert time.monotonic() - started < CONNECT_TIMEOUT + SLACK
    started = time.monotonic()
    assert [_read(factory) for _ in range(5)] == ["primary"] * 5
    assert len(attempts) == 1  # skipped for its backoff: nobody else waited
    clock.advance(1.0)
    reads: list[tuple[str, float]] = []
    lock = threading.Lock()

    def read() -> None:
        began = time.monotonic()
        body = _read(factory)
        with lock:
            reads.append((body, time.monotonic() - began))

    threads = [threading.Thread(target=read) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [body for body, _ in reads] == ["primary"] * 10
    assert len(attempts) == 2  # one probe; the nine others went straight to the primary
    assert sum(took >= CONNECT_TIMEOUT for _, took in reads) == 1
    postgres_proxy.restore()
    clock.advance(2.0)
    assert _read(factory) == "replica"


@pytest.mark.xfail(strict=True, reason=UNBOUNDED_PG_REPLY)
def test_a_read_on_a_pooled_connection_to_a_silent_replica_is_answered_in_time(
    primary: sa.Engine, open_replica: Callable[..., sa.Engine], postgres_proxy: FaultProxy
) -> None:
    """A replica that goes silent under an open connection: the read is still answered."""
    replica = open_replica()
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    assert _read(factory) == "replica"  # leaves an established connection in the pool
    postgres_proxy.blackhole()
    body = outcome_within(
        lambda: _read(factory),
        CONNECT_TIMEOUT + SLACK,
        release=postgres_proxy.restore,  # resets the blackholed connection: frees the reader
    )
    assert body == "primary"


@pytest.mark.anyio
async def test_async_reads_fail_over_from_a_cut_replica(
    pg_async_engine: Any, replica_url: str, replica_schema: str, postgres_proxy: FaultProxy
) -> None:
    """The asyncio sessions fail over the same way: no error, the primary answers."""
    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(Note).values(id=1, body="primary"))
    replica = create_async_engine(replica_url, connect_args=_connect_args(replica_schema))
    try:
        factory = async_routed_sessionmaker(pg_async_engine, [replica], clock=FakeClock())
        async with factory() as session:
            assert await session.scalar(sa.select(Note.body)) == "replica"
        postgres_proxy.cut()
        for _ in range(3):
            async with factory() as session:
                assert await session.scalar(sa.select(Note.body)) == "primary"
    finally:
        await replica.dispose()


def test_a_cut_primary_fails_writes_and_leaves_reads_on_the_replica(
    pg_schema: str,
    postgres_url: str,
    open_replica: Callable[..., sa.Engine],
    fault_proxy: Callable[[str, int], FaultProxy],
    postgres_proxy: FaultProxy,
) -> None:
    """Primary cut: reads still answered by the replica; a write raises, per who executes it.

    Your own statement raises SQLAlchemy's ``OperationalError`` (the router only picks the
    engine: it runs nothing); the library's helpers (``insert_batches`` here) raise
    BackendUnavailable, which the adapters answer with 503.
    """
    primary_proxy = fault_proxy(postgres_proxy.target_host, postgres_proxy.target_port)
    primary = sa.create_engine(
        primary_proxy.postgres_url(postgres_url), connect_args=_connect_args(pg_schema)
    )
    try:
        _seed(primary, "primary")
        factory = routed_sessionmaker(primary, [open_replica()], clock=FakeClock())
        primary_proxy.cut()
        assert _read(factory) == "replica"
        with factory() as session, pytest.raises(sa.exc.OperationalError):
            session.execute(sa.insert(Note).values(id=2, body="mine"))
        with factory() as session, pytest.raises(BackendUnavailable) as caught:
            insert_batches(session, Note, [{"id": 3, "body": "batched"}])
        assert caught.value.backend == "sql"
        primary_proxy.restore()
        with factory() as session, session.begin():
            session.execute(sa.insert(Note).values(id=2, body="mine"))
        with primary.connect() as conn:
            assert conn.execute(sa.select(Note.body).order_by(Note.id)).scalars().all() == [
                "primary",
                "mine",
            ]
    finally:
        primary.dispose()
