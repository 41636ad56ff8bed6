"""Shared fixtures: real Redis, real PostgreSQL and SQLite, each isolated per test and cleaned up.

Services come from ``HARDENING_REDIS_URL`` and ``HARDENING_POSTGRES_URL`` (defaulting to the local
services on 127.0.0.1). When a service cannot be reached, tests that need it are skipped with the
reason -- unless ``HARDENING_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where they fail instead.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.faultproxy import FaultProxy

REDIS_URL = os.environ.get("HARDENING_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "HARDENING_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("HARDENING_REQUIRE_SERVICES") == "1"

# One id per test session: every key and schema this run creates carries it.
RUN_ID = f"{os.getpid()}{secrets.token_hex(3)}"
_counter = itertools.count()

_REDIS_FIXTURES = {"redis_url", "redis_client", "async_redis_client"}
_POSTGRES_FIXTURES = {"postgres_url", "pg_engine", "pg_async_engine"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a real service, so ``-m "not redis"`` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
        if names & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)


def service_unavailable(service: str, reason: str) -> None:
    """Skip the test (or fail it when services are required) because ``service`` is down."""
    message = f"{service} is unreachable ({reason})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and HARDENING_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"{message}; start it (../shared/services.sh) or set its HARDENING_*_URL")


@cache
def _redis_problem() -> str | None:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        return f"redis-py not installed: {exc}"
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:  # any failure means "not usable", the reason is reported
        return f"{REDIS_URL}: {exc}"
    return None


@cache
def _postgres_problem() -> str | None:
    try:
        import sqlalchemy as sa
    except ImportError as exc:  # pragma: no cover
        return f"SQLAlchemy not installed: {exc}"
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"{POSTGRES_URL}: {exc}"
    return None


def unique_name(kind: str) -> str:
    """Return a name unique to this test run and call, e.g. ``ht_1234ab_7``."""
    return f"{kind}_{RUN_ID}_{next(_counter)}"


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (the event loop every supported ASGI server uses)."""
    return "asyncio"


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """The URL of a real, reachable Redis."""
    problem = _redis_problem()
    if problem:
        service_unavailable("Redis", problem)
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test; every key under it is deleted after the test."""
    return f"hardening-test:{unique_name('t')}:"


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A real synchronous Redis client; keys under ``redis_prefix`` are removed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        _delete_prefixed(client, redis_prefix)
        client.close()


@pytest.fixture
async def async_redis_client(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[redis.asyncio.Redis]:
    """A real asyncio Redis client; keys under ``redis_prefix`` are removed afterwards."""
    import redis
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
        sync = redis.Redis.from_url(redis_url)
        _delete_prefixed(sync, redis_prefix)
        sync.close()


# --- throwaway redis-server processes (fault injection, cluster) ----------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, cluster: bool = False) -> int:
    """A TCP port on loopback that was free a moment ago.

    Args:
        cluster: also keep ``port + 10000`` free (a cluster node's bus port), so stay low.
    """
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not cluster:
            return port
        port = 20000 + port % 30000
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port found")


def gunicorn_options() -> list[str]:
    """``--no-control-socket`` where gunicorn has one (newer versions open a control socket at
    one fixed path in $HOME, which concurrent servers would fight over)."""
    from gunicorn.config import KNOWN_SETTINGS

    options = {cli for setting in KNOWN_SETTINGS for cli in (setting.cli or ())}
    return ["--no-control-socket"] if "--no-control-socket" in options else []


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not start within {timeout}s")


class RedisServer:
    """A redis-server process of the test's own on a spare loopback port; stop/start at will."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port(cluster="--cluster-enabled" in extra)
        self.workdir = workdir
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) the server on its port and wait until it accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash, not a shutdown)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def _redis_server_binary() -> None:
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server binary", "not on PATH")


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start throwaway redis-server processes; every one is killed after the test."""
    _redis_server_binary()
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", *extra).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-node Redis Cluster on loopback ports, started for this test session."""
    _redis_server_binary()
    if shutil.which("redis-cli") is None:
        service_unavailable("redis-cli binary", "not on PATH")
    base = tmp_path_factory.mktemp("cluster")
    nodes = [
        RedisServer(
            base / f"n{i}",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(base / f"n{i}.conf"),
            "--cluster-node-timeout",
            "2000",
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = subprocess.run(
                ["redis-cli", "-p", str(nodes[0].port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the test Redis Cluster never reached cluster_state:ok")
        yield "redis+cluster://" + ",".join(addresses)
    finally:
        for node in nodes:
            node.kill()


# --- SQL ---------------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> str:
    """The SQLAlchemy URL of a real, reachable PostgreSQL."""
    problem = _postgres_problem()
    if problem:
        service_unavailable("PostgreSQL", problem)
    return POSTGRES_URL


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped with everything in it afterwards."""
    import sqlalchemy as sa

    schema = unique_name("ht")
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_engine(postgres_url: str, pg_schema: str) -> Iterator[Engine]:
    """A real PostgreSQL engine whose ``search_path`` is this test's own schema."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        postgres_url, connect_args={"options": f"-csearch_path={pg_schema}"}, pool_size=20
    )
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
async def pg_async_engine(postgres_url: str, pg_schema: str) -> AsyncIterator[AsyncEngine]:
    """A real async (psycopg) PostgreSQL engine on this test's own schema."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        postgres_url, connect_args={"options": f"-csearch_path={pg_schema}"}
    )
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite engine on a file of this test's own (so several connections share it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'test.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_engine(request: pytest.FixtureRequest) -> Engine:
    """Each SQL backend in turn: SQLite, then real PostgreSQL."""
    name = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    engine: Engine = request.getfixturevalue(name)
    return engine


# --- fault injection on the network (tests/faultproxy.py) -----------------------------------


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str, int], FaultProxy]]:
    """Start fault-injecting TCP proxies (``fault_proxy(host, port)``); all closed afterwards.

    The test fails if a proxy's event loop reported an unexpected error (a bug in the proxy).
    """
    from tests.faultproxy import FaultProxy

    proxies: list[FaultProxy] = []

    def start(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port)
        proxies.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in proxies:
            proxy.close()
    errors = [error for proxy in proxies for error in proxy.errors]
    assert not errors, f"a FaultProxy's event loop reported errors: {errors}"


@pytest.fixture
def redis_proxy(redis_url: str, fault_proxy: Callable[[str, int], FaultProxy]) -> FaultProxy:
    """A :class:`~tests.faultproxy.FaultProxy` in front of the real Redis (``redis_url``).

    Connect through ``redis_proxy.redis_url()``; keys written there land in the real Redis.
    """
    from urllib.parse import urlsplit

    url = urlsplit(redis_url)
    if url.scheme != "redis" or not url.hostname:
        pytest.skip(f"redis_proxy needs a plain TCP redis:// URL, not {redis_url}")
    return fault_proxy(url.hostname, url.port or 6379)


@pytest.fixture
def postgres_proxy(postgres_url: str, fault_proxy: Callable[[str, int], FaultProxy]) -> FaultProxy:
    """A :class:`~tests.faultproxy.FaultProxy` in front of the real PostgreSQL (``postgres_url``).

    Connect through ``postgres_proxy.postgres_url(postgres_url)``.
    """
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    if not url.host or "," in url.host:
        pytest.skip(f"postgres_proxy needs a single TCP host in the URL, not {postgres_url}")
    return fault_proxy(url.host, url.port or 5432)
