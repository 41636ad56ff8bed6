"""``statement_deadline``: a silent PostgreSQL under an open connection, bounded on the client.

The fault proxy blackholes the connection after it is pooled: without a deadline the call waits
for ever (the strict xfails in the fault tests say so); with one, it fails with
BackendUnavailable once the deadline passes, and the engine recovers when the server answers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from hardening import BackendUnavailable, ConfigurationError, DocumentHistory, statement_deadline
from hardening.blocks.history import HistoryBase
from hardening.queue.backends.sql import SQLBackend
from tests.concurrency import outcome_within
from tests.faultproxy import FaultProxy

# Backend behaviour under faults and load, not interpreter compatibility: run once, on 3.11
# (tox.ini), like the chaos tests, which keeps the whole tox run well under 15 minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DEADLINE = 1.0
GRACE = 10.0  # the join bound: a call still waiting then has no deadline at all


@pytest.fixture
def engine(pg_schema: str, postgres_url: str, postgres_proxy: FaultProxy) -> Iterator[sa.Engine]:
    """An engine through the proxy, with a deadline on every statement."""
    made = sa.create_engine(
        postgres_proxy.postgres_url(postgres_url),
        connect_args={"options": f"-csearch_path={pg_schema}", "connect_timeout": 2},
    )
    statement_deadline(made, DEADLINE)
    try:
        yield made
    finally:
        postgres_proxy.restore()
        made.dispose()


def test_a_history_save_on_a_silent_pooled_connection_fails_in_time(
    engine: sa.Engine, postgres_proxy: FaultProxy
) -> None:
    """DocumentHistory.save over a blackholed pooled connection: BackendUnavailable, then
    the next save after the restore succeeds."""
    HistoryBase.metadata.create_all(engine)
    history = DocumentHistory(engine)
    history.create("doc", [{"id": "a", "type": "p", "content": "x"}])
    postgres_proxy.blackhole()
    patch = [{"op": "add", "path": "/-", "value": {"id": "b", "type": "p", "content": "y"}}]
    outcome = outcome_within(lambda: history.save("doc", patch, base_version=1), GRACE)
    assert isinstance(outcome, BackendUnavailable)
    postgres_proxy.restore()
    assert history.save("doc", patch, base_version=1) == 2


def test_a_queue_call_on_a_silent_pooled_connection_fails_in_time(
    engine: sa.Engine, postgres_proxy: FaultProxy
) -> None:
    """SQLBackend.stats over a blackholed pooled connection: BackendUnavailable in time."""
    backend = SQLBackend(engine)
    backend.create_schema()
    backend.stats("q")
    postgres_proxy.blackhole()
    outcome = outcome_within(lambda: backend.stats("q"), GRACE)
    assert isinstance(outcome, BackendUnavailable)
    postgres_proxy.restore()
    assert backend.stats("q").waiting == 0


def test_quick_statements_are_never_cut(engine: sa.Engine) -> None:
    """Two thousand quick statements under a deadline: every one answers."""
    with engine.connect() as conn:
        total = sum(conn.execute(sa.text("SELECT 1")).scalar_one() for _ in range(2_000))
    assert total == 2_000


def test_a_slow_statement_past_the_deadline_is_cut(engine: sa.Engine) -> None:
    """A statement slower than the deadline fails (the deadline bounds every statement)."""
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(sa.text("SELECT pg_sleep(5)"))
    with engine.connect() as conn:  # the pool recovered
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


@pytest.mark.parametrize("seconds", [0, -1])
def test_a_deadline_must_be_positive(seconds: float) -> None:
    """Nonsense deadlines are configuration errors."""
    with pytest.raises(ConfigurationError):
        statement_deadline(sa.create_engine("sqlite://"), seconds)


@pytest.mark.anyio
async def test_async_engines_are_bounded_too(
    pg_schema: str, postgres_url: str, postgres_proxy: FaultProxy
) -> None:
    """An AsyncEngine (psycopg async) under a deadline: the silent read fails in time."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        postgres_proxy.postgres_url(postgres_url), connect_args={"connect_timeout": 2}
    )
    statement_deadline(engine, DEADLINE)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
        postgres_proxy.blackhole()
        with pytest.raises(sa.exc.OperationalError):
            async with engine.connect() as conn:
                await asyncio.wait_for(conn.execute(sa.text("SELECT 1")), GRACE)
        postgres_proxy.restore()
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
    finally:
        postgres_proxy.restore()
        await engine.dispose()
