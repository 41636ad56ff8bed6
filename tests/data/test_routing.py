"""Replica routing on real databases: each statement runs on the engine it belongs to."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hardening import (
    ConfigurationError,
    FakeClock,
    ReplicaRouter,
    RoutedSession,
    async_routed_sessionmaker,
    routed_sessionmaker,
    routed_sessionmaker_from_env,
)
from hardening.data.routing import is_read
from tests.conftest import free_port
from tests.data.conftest import Recorder, StreamingPair

Record = Callable[[sa.Engine], Recorder]


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


_notes = Note.__table__


def _seed(primary: sa.Engine, replica: sa.Engine) -> None:
    """The same row on both, with a body saying where it was read from."""
    for engine, body in ((primary, "primary"), (replica, "replica")):
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Note), [{"id": 1, "body": body}])


@pytest.fixture
def pair(db_pair: tuple[sa.Engine, sa.Engine]) -> tuple[sa.Engine, sa.Engine]:
    _seed(*db_pair)
    return db_pair


def _body(session: Any) -> str:
    return str(session.scalars(sa.select(Note.body).where(Note.id == 1)).one())


def test_reads_go_to_the_replica_and_writes_to_the_primary(
    pair: tuple[sa.Engine, sa.Engine], record: Record
) -> None:
    """A SELECT runs on the replica; an INSERT on the primary."""
    primary, replica = pair
    on_primary, on_replica = record(primary), record(replica)
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory() as session:
        assert _body(session) == "replica"
    with factory() as session, session.begin():
        session.execute(sa.insert(Note).values(id=2, body="new"))
    assert on_replica.kinds() == ["SELECT"]
    assert on_primary.kinds() == ["INSERT"]


def test_reads_after_a_write_in_the_transaction_go_to_the_primary(
    pair: tuple[sa.Engine, sa.Engine], record: Record
) -> None:
    """Once a transaction wrote, its reads see the primary (its own uncommitted write)."""
    primary, replica = pair
    on_replica = record(replica)
    factory = routed_sessionmaker(primary, [replica], sticky_for=0, clock=FakeClock())
    with factory() as session:
        assert _body(session) == "replica"
        session.execute(sa.update(Note).values(body="edited"))
        assert _body(session) == "edited"
        session.rollback()
        assert _body(session) == "replica"  # a new transaction, nothing written
    assert on_replica.kinds() == ["SELECT", "SELECT"]


def test_flushes_and_autoflushed_reads_go_to_the_primary(
    pair: tuple[sa.Engine, sa.Engine], record: Record
) -> None:
    """ORM flushes write to the primary, and the query that triggered them reads it too."""
    primary, replica = pair
    on_primary, on_replica = record(primary), record(replica)
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory() as session:
        session.add(Note(id=3, body="added"))
        assert session.scalars(sa.select(Note.body).where(Note.id == 3)).one() == "added"
        session.rollback()
    assert on_primary.kinds() == ["INSERT", "SELECT"]
    assert on_replica.kinds() == []


@pytest.mark.parametrize(
    ("statement", "where"),
    [
        (sa.select(Note.body), "replica"),
        (sa.select(Note.body).with_for_update(), "primary"),
        (sa.select(Note.body).execution_options(hardening_primary=True), "primary"),
        (sa.text("SELECT body FROM notes"), "primary"),
        (sa.text("SELECT body FROM notes").execution_options(hardening_read=True), "replica"),
        (sa.union(sa.select(_notes.c.body), sa.select(_notes.c.body)), "replica"),
        # SQLAlchemy hands get_bind no statement for an ORM-enabled UNION: primary, to be safe
        (sa.union(sa.select(Note.body), sa.select(Note.body)), "primary"),
    ],
    ids=[
        "select",
        "for-update",
        "marked-primary",
        "text",
        "text-marked-read",
        "core-union",
        "orm-union",
    ],
)
def test_each_kind_of_statement_runs_where_it_belongs(
    pair: tuple[sa.Engine, sa.Engine], statement: Any, where: str
) -> None:
    """Locking reads, marked reads and raw text go where the rules say."""
    primary, replica = pair
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory() as session:
        assert session.execute(statement).scalars().first() == where


def test_data_modifying_cte_is_a_write() -> None:
    """A SELECT carrying an INSERT … RETURNING in a CTE is not a read."""
    inserted = sa.insert(Note).values(id=9, body="x").returning(Note.id).cte("inserted")
    assert not is_read(sa.select(inserted.c.id))
    assert is_read(sa.select(Note.id))
    assert not is_read(sa.insert(Note))
    assert not is_read(sa.text("DELETE FROM notes"))


def test_a_transaction_reads_one_replica_throughout(db_pair: tuple[sa.Engine, sa.Engine]) -> None:
    """Two replicas take turns per transaction, never within one."""
    primary, replica = db_pair
    other = sa.create_engine(replica.url, connect_args=_connect_args(replica))
    _seed(primary, replica)
    try:
        factory = routed_sessionmaker(primary, [replica, other], clock=FakeClock())
        used = []
        for _ in range(4):
            with factory() as session:
                session.execute(sa.select(Note.id))
                session.execute(sa.select(Note.body))
                used.append(session.get_bind(clause=sa.select(Note.id)))
        assert used == [replica, other, replica, other]
    finally:
        other.dispose()


def _connect_args(engine: sa.Engine) -> dict[str, Any]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        return {"options": f"-csearch_path={schema}"}
    return {}


def test_a_write_sticks_the_session_to_the_primary_for_sticky_for(
    pair: tuple[sa.Engine, sa.Engine],
) -> None:
    """After a committed write, the session reads its own writes until sticky_for passes."""
    primary, replica = pair
    clock = FakeClock()
    factory = routed_sessionmaker(primary, [replica], sticky_for=2.0, clock=clock)
    with factory() as session:
        session.execute(sa.update(Note).values(body="written"))
        session.commit()
        assert _body(session) == "written"
        session.commit()
        clock.advance(1.9)
        assert _body(session) == "written"
        session.commit()
        clock.advance(0.2)
        assert _body(session) == "replica"
    with factory() as other:
        assert _body(other) == "replica"  # no sticky_key: only the writing session sticks


def test_sticky_key_shares_read_your_writes_across_sessions(
    pair: tuple[sa.Engine, sa.Engine],
) -> None:
    """A user's later sessions read the primary within sticky_for; other users do not."""
    primary, replica = pair
    clock = FakeClock()
    factory = routed_sessionmaker(primary, [replica], sticky_for=5, clock=clock)
    with factory(sticky_key="ana") as session, session.begin():
        session.execute(sa.update(Note).values(body="ana's"))
    with factory(sticky_key="ana") as session:
        assert _body(session) == "ana's"
    with factory(sticky_key="bob") as session:
        assert _body(session) == "replica"
    clock.advance(5)
    with factory(sticky_key="ana") as session:
        assert _body(session) == "replica"


def test_a_rolled_back_write_does_not_stick(pair: tuple[sa.Engine, sa.Engine]) -> None:
    """Nothing was committed, so there is nothing to read back from the primary."""
    primary, replica = pair
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory(sticky_key="ana") as session:
        session.execute(sa.update(Note).values(body="dropped"))
        session.rollback()
        assert _body(session) == "replica"
    assert not factory.kw["router"].is_sticky("ana")


def test_primary_only_sessions_never_read_a_replica(pair: tuple[sa.Engine, sa.Engine]) -> None:
    """primary_only=True is for read-modify-write code that must not read stale rows."""
    primary, replica = pair
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory(primary_only=True) as session:
        assert _body(session) == "primary"


def test_without_replicas_everything_goes_to_the_primary(
    sql_engine: sa.Engine, record: Record
) -> None:
    """No replica configured: the factory is a plain sessionmaker on the primary."""
    Base.metadata.create_all(sql_engine)
    on_primary = record(sql_engine)
    factory = routed_sessionmaker(sql_engine)
    with factory() as session, session.begin():
        session.add(Note(id=1, body="only"))
        session.flush()
        assert _body(session) == "only"
    assert on_primary.kinds() == ["INSERT", "SELECT"]


def _dead_engine() -> sa.Engine:
    """An engine whose server is not there (nothing listens on the port)."""
    return sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test",
        connect_args={"connect_timeout": 2},
    )


def test_a_replica_that_cannot_connect_is_skipped_and_retried_after_backoff(
    pair: tuple[sa.Engine, sa.Engine],
) -> None:
    """Reads never fail because a replica is down; it is probed again after its backoff."""
    primary, replica = pair
    dead = _dead_engine()
    attempts = []
    sa.event.listen(dead, "do_connect", lambda *args: attempts.append(1))
    clock = FakeClock()
    factory = routed_sessionmaker(primary, [dead, replica], backoff=1.0, clock=clock)
    router: ReplicaRouter = factory.kw["router"]
    for _ in range(4):
        with factory() as session:
            assert _body(session) == "replica"
    assert len(attempts) == 1
    assert router.healthy_replicas() == [replica]
    clock.advance(1.0)
    with factory() as session:
        assert _body(session) == "replica"
    assert len(attempts) == 2  # probed again, failed again: now down for 2 s
    clock.advance(1.5)
    assert router.healthy_replicas() == [replica]
    clock.advance(0.5)
    assert router.healthy_replicas() == [dead, replica]
    dead.dispose()


def test_all_replicas_down_falls_back_to_the_primary(pair: tuple[sa.Engine, sa.Engine]) -> None:
    """With every replica down, reads go to the primary."""
    primary, _ = pair
    dead = _dead_engine()
    factory = routed_sessionmaker(primary, [dead], clock=FakeClock())
    with factory() as session:
        assert _body(session) == "primary"
    dead.dispose()


def test_a_replica_whose_pool_stays_exhausted_is_skipped(
    sqlite_engine: sa.Engine, tmp_path: Any
) -> None:
    """A replica whose pool timed out (every connection checked out) is marked down, skipped."""
    replica = sa.create_engine(
        f"sqlite:///{tmp_path / 'busy.db'}",
        poolclass=sa.QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    _seed(sqlite_engine, replica)
    factory = routed_sessionmaker(sqlite_engine, [replica], clock=FakeClock())
    with replica.connect(), factory() as session:  # holds the replica's only connection
        assert _body(session) == "primary"
    assert factory.kw["router"].healthy_replicas() == []
    replica.dispose()


@pytest.mark.postgres
def test_a_replica_that_drops_connections_is_marked_down(
    postgres_url: str,
    replica_schema: str,
    replica_database_url: str,
    pg_engine: sa.Engine,
) -> None:
    """A disconnect during a read marks that replica down (the read itself fails)."""
    replica = sa.create_engine(
        replica_database_url, connect_args={"options": f"-csearch_path={replica_schema}"}
    )
    _seed(pg_engine, replica)
    factory = routed_sessionmaker(pg_engine, [replica], clock=FakeClock())
    with factory() as session:
        read = sa.text("SELECT pg_backend_pid()").execution_options(hardening_read=True)
        pid = session.execute(read).scalar_one()
        with pg_engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa.exc.OperationalError):
            session.execute(sa.select(Note.body))
    assert factory.kw["router"].healthy_replicas() == []
    with factory() as session:
        assert _body(session) == "primary"
    replica.dispose()


def test_from_env(tmp_path: Any) -> None:
    """DATABASE_URL alone routes everything to it; DATABASE_READ_REPLICA_URL adds a replica."""
    primary_url = f"sqlite:///{tmp_path / 'p.db'}"
    replica_url = f"sqlite:///{tmp_path / 'r.db'}"
    factory = routed_sessionmaker_from_env({"DATABASE_URL": primary_url}, engine_options={})
    router: ReplicaRouter = factory.kw["router"]
    assert (str(router.primary.url), router.replicas) == (primary_url, ())
    factory = routed_sessionmaker_from_env(
        {"DATABASE_URL": primary_url, "DATABASE_READ_REPLICA_URL": replica_url}
    )
    router = factory.kw["router"]
    assert [str(r.url) for r in router.replicas] == [replica_url]
    assert router.primary.pool._pre_ping  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        routed_sessionmaker_from_env({})


def test_bad_options_are_configuration_errors(sqlite_engine: sa.Engine) -> None:
    """Negative durations, non-engines and max_lag on SQLite are refused up front."""
    with pytest.raises(ConfigurationError):
        routed_sessionmaker(sqlite_engine, sticky_for=-1)
    with pytest.raises(ConfigurationError):
        routed_sessionmaker(sqlite_engine, ["sqlite://"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        routed_sessionmaker(sqlite_engine, [sqlite_engine], max_lag=1)
    with pytest.raises(ConfigurationError):
        RoutedSession()


def test_sticky_keys_are_bounded() -> None:
    """The router forgets the oldest sticky keys beyond max_sticky_keys, and expired ones."""
    clock = FakeClock()
    router = ReplicaRouter(
        sa.create_engine("sqlite://"), sticky_for=10, clock=clock, max_sticky_keys=3
    )
    for user in range(5):
        router.stick(user)
        clock.advance(1)
    assert [router.is_sticky(user) for user in range(5)] == [False, False, True, True, True]
    clock.advance(8)
    router.stick("late")
    assert [router.is_sticky(user) for user in (2, 3, 4, "late")] == [False, False, True, True]


# --- asyncio -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_sessions_route_the_same_way(
    pg_async_engine: AsyncEngine, replica_schema: str, replica_database_url: str, record: Record
) -> None:
    """AsyncSession runs a RoutedSession inside: same rules, same stickiness."""
    replica = create_async_engine(
        replica_database_url, connect_args={"options": f"-csearch_path={replica_schema}"}
    )
    try:
        for engine, body in ((pg_async_engine, "primary"), (replica, "replica")):
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await conn.execute(sa.insert(Note).values(id=1, body=body))
        on_primary = record(pg_async_engine.sync_engine)
        clock = FakeClock()
        factory = async_routed_sessionmaker(pg_async_engine, [replica], sticky_for=1, clock=clock)
        async with factory() as session:
            assert await session.scalar(sa.select(Note.body)) == "replica"
        async with factory(sticky_key=7) as session, session.begin():
            session.add(Note(id=2, body="async"))
        async with factory(sticky_key=7) as session:
            assert await session.scalar(sa.select(Note.body).where(Note.id == 2)) == "async"
        clock.advance(1)
        async with factory(sticky_key=7) as session:
            assert await session.scalar(sa.select(Note.body).where(Note.id == 2)) is None
        assert on_primary.kinds() == ["INSERT", "SELECT"]
    finally:
        await replica.dispose()


@pytest.mark.anyio
async def test_async_dead_replica_is_skipped(pg_async_engine: AsyncEngine) -> None:
    """Connecting to a dead replica inside the async bridge fails over, too."""
    async with pg_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(sa.insert(Note).values(id=1, body="primary"))
    dead = create_async_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test",
        connect_args={"connect_timeout": 2},
    )
    factory = async_routed_sessionmaker(pg_async_engine, [dead], clock=FakeClock())
    async with factory() as session:
        assert await session.scalar(sa.select(Note.body)) == "primary"
    await dead.dispose()


# --- a real streaming replica ---------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.postgres
def test_streaming_replica_read_your_writes(streaming_replica: StreamingPair) -> None:
    """On a real hot standby: replicated reads, stickiness over replay lag, max_lag."""
    primary = sa.create_engine(streaming_replica.primary_url)
    standby = sa.create_engine(streaming_replica.standby_url)
    try:
        with primary.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS notes"))
        Base.metadata.create_all(primary)
        clock = FakeClock()
        factory = routed_sessionmaker(primary, [standby], sticky_for=5, clock=clock)
        with factory(sticky_key="ana") as session, session.begin():
            session.add(Note(id=1, body="replicated"))
        _wait_until(lambda: _standby_has(standby, 1))

        with standby.connect() as conn:  # hold replay: the standby now lags
            conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
            conn.commit()
        with factory(sticky_key="ana") as session, session.begin():
            session.add(Note(id=2, body="lagging"))
        with factory(sticky_key="ana") as session:
            assert session.get(Note, 2) is not None  # sticky: read from the primary
        with factory(sticky_key="bob") as session:
            assert session.get(Note, 1) is not None  # the standby answers...
            assert session.get(Note, 2) is None  # ...without the write it has not replayed
            assert session.get_bind(clause=sa.select(Note)) is standby

        # the lag is only visible once the standby has received the WAL it is not replaying
        _wait_until(lambda: _received_ahead(standby))
        lag_aware = routed_sessionmaker(primary, [standby], max_lag=0.0, clock=FakeClock())
        with lag_aware() as session:
            assert session.get(Note, 2) is not None  # the lagging standby is skipped
        with standby.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
            conn.commit()
        _wait_until(lambda: _standby_has(standby, 2))
    finally:
        with primary.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS notes"))
        standby.dispose()
        primary.dispose()


def _received_ahead(standby: sa.Engine) -> bool:
    with standby.connect() as conn:
        query = sa.text("SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()")
        return bool(conn.execute(query).scalar_one())


def _standby_has(standby: sa.Engine, note_id: int) -> bool:
    query = sa.select(sa.func.count()).select_from(Note).where(Note.id == note_id)
    try:
        with standby.connect() as conn:
            return bool(conn.execute(query).scalar_one())
    except sa.exc.ProgrammingError:  # the CREATE TABLE itself is not replayed yet
        return False


def test_the_other_data_helpers_follow_the_routing(
    pair: tuple[sa.Engine, sa.Engine], record: Record
) -> None:
    """paginate reads a replica; insert_batches writes to the primary, then reads stick."""
    from hardening import insert_batches, paginate

    primary, replica = pair
    on_primary, on_replica = record(primary), record(replica)
    factory = routed_sessionmaker(primary, [replica], clock=FakeClock())
    with factory() as session:
        page = paginate(session, sa.select(Note), order_by=[Note.id], secret="s" * 32)
        assert [n.body for n in page.items] == ["replica"]
    with factory() as session:
        report = insert_batches(session, Note, [{"id": 2, "body": "batched"}])
        session.commit()
        assert report.inserted == 1
        assert _body(session) == "primary"  # the session wrote: it reads its writes
    assert on_replica.kinds() == ["SELECT"]
    assert on_primary.kinds()[-1] == "SELECT"  # the read; COPY bypasses the cursor events
    with primary.connect() as conn:
        assert conn.execute(sa.select(Note.body).where(Note.id == 2)).scalar() == "batched"
