"""Databases for the data-access tests: a second real database as a replica, a real streaming
replica where the machine can start one, and a recorder of the statements each engine ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RUN_ID, free_port, unique_name

SECRET = "test-pagination-secret-0123456789"
PG_BIN = Path(os.environ.get("HARDENING_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Recorder:
    """The SQL statements one engine sent, recorded by ``before_cursor_execute``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        first = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if first not in ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN"):
            self.statements.append(statement)

    def kinds(self) -> list[str]:
        """The first word of each statement: ``["SELECT", "INSERT", ...]``."""
        return [s.lstrip().split(None, 1)[0].upper() for s in self.statements]

    def clear(self) -> None:
        self.statements.clear()

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)


@pytest.fixture
def record() -> Iterator[Callable[[sa.Engine], Recorder]]:
    """Start recording an engine's statements; listeners are removed after the test."""
    recorders: list[Recorder] = []

    def start(engine: sa.Engine) -> Recorder:
        recorder = Recorder(engine)
        recorders.append(recorder)
        return recorder

    yield start
    for recorder in recorders:
        recorder.close()


# --- a second database on the test server, standing in for a replica ----------------------


@pytest.fixture(scope="session")
def replica_database_url() -> Iterator[str]:
    """A database of this test session's own on the PostgreSQL server, dropped at the end."""
    from tests.conftest import POSTGRES_URL, _postgres_problem, service_unavailable

    problem = _postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    name = f"hardening_replica_{RUN_ID}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def replica_schema(replica_database_url: str, pg_schema: str) -> Iterator[str]:
    """The test's schema name, created in the replica database too (dropped afterwards)."""
    admin = sa.create_engine(replica_database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{pg_schema}"'))
    try:
        yield pg_schema
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{pg_schema}" CASCADE'))
        admin.dispose()


def _pg_engine(url: str, schema: str) -> sa.Engine:
    return sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """(primary, replica): two SQLite files, or two real PostgreSQL databases."""
    if request.param == "sqlite":
        primary = sa.create_engine(f"sqlite:///{tmp_path / 'primary.db'}")
        replica = sa.create_engine(f"sqlite:///{tmp_path / 'replica.db'}")
    else:
        request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("replica_schema")
        primary = request.getfixturevalue("pg_engine")
        replica = _pg_engine(request.getfixturevalue("replica_database_url"), schema)
    try:
        yield primary, replica
    finally:
        replica.dispose()
        primary.dispose()


# --- a real streaming replica (PostgreSQL 15 binaries, started by the test session) --------


class StreamingPair:
    """A primary and a hot standby streaming from it, on loopback ports of their own."""

    def __init__(self, workdir: Path, run_as: list[str]) -> None:
        self.workdir = workdir
        self.run_as = run_as
        self.primary_port = free_port()
        self.standby_port = free_port()

    def url(self, port: int) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary_port)

    @property
    def standby_url(self) -> str:
        return self.url(self.standby_port)

    def _run(self, binary: str, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(PG_BIN / binary), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def _options(self, port: int, *extra: str) -> str:
        common = f"-p {port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        return " ".join([common, *extra])

    def start(self) -> None:
        primary, standby = self.workdir / "primary", self.workdir / "standby"
        self._run("initdb", "-D", str(primary), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(primary),
            "-l",
            str(self.workdir / "primary.log"),
            "-w",
            "-o",
            self._options(self.primary_port, "-c wal_level=replica", "-c max_wal_senders=4"),
            "start",
        )
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary_port),
            "-U",
            "postgres",
            "-D",
            str(standby),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(standby),
            "-l",
            str(self.workdir / "standby.log"),
            "-w",
            "-o",
            self._options(self.standby_port, "-c hot_standby=on"),
            "start",
        )
        engine = sa.create_engine(self.primary_url)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                    if conn.execute(sa.text(query)).scalar_one():
                        return
                time.sleep(0.05)
            raise RuntimeError("the standby never started streaming")
        finally:
            engine.dispose()

    def stop(self) -> None:
        for name in ("standby", "primary"):
            data = self.workdir / name
            if (data / "postmaster.pid").exists():
                subprocess.run(
                    [
                        *self.run_as,
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(data),
                        "-m",
                        "immediate",
                        "stop",
                    ],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )


def _streaming_problem() -> tuple[str | None, list[str]]:
    """Why no streaming replica can be started here (or None), and how to run the binaries."""
    missing = [b for b in ("initdb", "pg_ctl", "pg_basebackup") if not (PG_BIN / b).exists()]
    if missing:
        return f"PostgreSQL binaries {missing} not in {PG_BIN} (set HARDENING_PG_BIN)", []
    if os.geteuid() != 0:
        return None, []
    # postgres refuses to run as root: run the binaries as the postgres user, if we may
    runuser = shutil.which("runuser")
    if runuser is None:
        return "running as root without runuser", []
    probe = subprocess.run(
        [runuser, "-u", "postgres", "--", "true"], capture_output=True, timeout=10, check=False
    )
    if probe.returncode != 0:
        return "running as root and cannot run commands as the postgres user", []
    return None, [runuser, "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def streaming_replica() -> Iterator[StreamingPair]:
    """A real primary + hot standby pair, started once per test session (about a second)."""
    problem, run_as = _streaming_problem()
    if problem:
        pytest.skip(f"no streaming replica: {problem}")
    workdir = Path(tempfile.mkdtemp(prefix=f"hardening-pg-{unique_name('r')}-"))
    if run_as:
        shutil.chown(workdir, user="postgres")
    pair = StreamingPair(workdir, run_as)
    try:
        pair.start()
    except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
        pair.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"no streaming replica: could not start one ({exc})")
    try:
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(workdir, ignore_errors=True)
