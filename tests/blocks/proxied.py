"""Shared by the histories' fault tests: engines through the fault proxy, and table dumps."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from tests.faultproxy import CONNECT_TIMEOUT, FaultProxy


def engine_opener(
    metadata: sa.MetaData, pg_schema: str, postgres_url: str, postgres_proxy: FaultProxy
) -> Iterator[Callable[..., sa.Engine]]:
    """Yield a function opening engines on the test's schema through the proxy, with
    ``metadata``'s tables created; afterwards restore the proxy and dispose of them all."""
    engines: list[sa.Engine] = []

    def open_(**pool: Any) -> sa.Engine:
        engine = sa.create_engine(
            postgres_proxy.postgres_url(postgres_url),
            connect_args={
                "options": f"-csearch_path={pg_schema}",
                "connect_timeout": CONNECT_TIMEOUT,
            },
            **pool,
        )
        engines.append(engine)
        metadata.create_all(engine)
        return engine

    try:
        yield open_
    finally:
        postgres_proxy.restore()
        for engine in engines:
            engine.dispose()


def dump_rows(engine: sa.Engine, metadata: sa.MetaData) -> str:
    """Every row of ``metadata``'s tables, to compare before and after."""
    dump = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            dump[table.name] = [[str(value) for value in row] for row in rows]
    return json.dumps(dump, sort_keys=True)
