"""The fault-injecting TCP proxy (tests/faultproxy.py), against the real Redis and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faultproxy import FaultProxy, wait_until

pytestmark = pytest.mark.timeout(60)

RedisFactory = Callable[..., redis.Redis]


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    """Make redis-py clients that fail fast (no retries, short timeouts); closed afterwards."""
    clients: list[redis.Redis] = []

    def make(proxy: FaultProxy, *, timeout: float = 2.0) -> redis.Redis:
        client = redis.Redis(
            host=proxy.host,
            port=proxy.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()


def raw_connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    """A plain TCP connection to the proxy (the caller closes it)."""
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def test_ping_through_proxy(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """A PING through the proxy reaches the real Redis and its answer comes back."""
    assert redis_factory(redis_proxy).ping() is True
    assert redis_proxy.connections_accepted == 1
    assert redis_proxy.open_connections == 1


def test_data_round_trips_intact(
    redis_proxy: FaultProxy,
    redis_factory: RedisFactory,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A value larger than any socket buffer is forwarded byte for byte, both ways."""
    value = os.urandom(4 * 1024 * 1024)
    client = redis_factory(redis_proxy, timeout=10.0)
    client.set(f"{redis_prefix}big", value)
    assert client.get(f"{redis_prefix}big") == value


def test_latency_delays_every_chunk(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """With latency(0.2), a PING round trip (one chunk each way) takes at least 0.4 s."""
    client = redis_factory(redis_proxy)
    client.ping()  # connected before the latency starts
    redis_proxy.latency(0.2)
    started = time.monotonic()
    assert client.ping() is True
    assert time.monotonic() - started >= 0.4


def test_latency_keeps_order(
    redis_proxy: FaultProxy,
    redis_factory: RedisFactory,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """Delayed chunks are delivered in order: a pipeline's replies match its commands."""
    client = redis_factory(redis_proxy)
    redis_proxy.latency(0.05)
    key = f"{redis_prefix}counter"
    for _ in range(5):
        client.incr(key)  # one small chunk per command, each delayed on its own
    pipe = client.pipeline(transaction=False)
    for _ in range(20):
        pipe.incr(key)
    assert pipe.execute() == list(range(6, 26))


def test_latency_rejects_negative(redis_proxy: FaultProxy) -> None:
    """latency() refuses a negative delay."""
    with pytest.raises(ValueError, match="latency"):
        redis_proxy.latency(-1)


def test_cut_fails_commands_on_open_connections(
    redis_proxy: FaultProxy, redis_factory: RedisFactory
) -> None:
    """After cut(), a command on an already open connection raises redis.ConnectionError."""
    client = redis_factory(redis_proxy)
    client.ping()
    redis_proxy.cut()
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_cut_resets_open_connections(redis_proxy: FaultProxy) -> None:
    """cut() resets (RST) every open connection at once and forgets it."""
    with raw_connect(redis_proxy) as sock:
        assert wait_until(lambda: redis_proxy.open_connections == 1)
        redis_proxy.cut()
        assert redis_proxy.open_connections == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_cut_resets_a_connection_just_made(redis_proxy: FaultProxy) -> None:
    """cut() right after a connect resets that connection too, wherever it was in accept()."""
    with raw_connect(redis_proxy) as sock:
        redis_proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_cut_refuses_new_connections(redis_proxy: FaultProxy) -> None:
    """After cut(), connecting to the proxy's port is refused."""
    redis_proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        raw_connect(redis_proxy).close()


def test_cut_refuses_new_redis_clients(
    redis_proxy: FaultProxy, redis_factory: RedisFactory
) -> None:
    """After cut(), a fresh redis-py client fails with redis.ConnectionError."""
    redis_proxy.cut()
    with pytest.raises(redis.ConnectionError):
        redis_factory(redis_proxy).ping()


def test_restore_after_cut(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """After cut() then restore(), the same client's next command succeeds on the same port."""
    client = redis_factory(redis_proxy)
    client.ping()
    port = redis_proxy.port
    redis_proxy.cut()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_proxy.restore()
    assert redis_proxy.port == port
    assert client.ping() is True


def test_restore_clears_latency(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """restore() turns latency off."""
    redis_proxy.latency(30)
    redis_proxy.restore()
    assert redis_factory(redis_proxy, timeout=5.0).ping() is True


def test_blackhole_times_out_open_connections(
    redis_proxy: FaultProxy, redis_factory: RedisFactory
) -> None:
    """After blackhole(), a command on an open connection raises redis.TimeoutError."""
    client = redis_factory(redis_proxy, timeout=0.3)
    client.ping()
    redis_proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        client.ping()


def test_blackhole_accepts_but_never_answers(redis_proxy: FaultProxy) -> None:
    """After blackhole(), a new connection is accepted, but nothing ever comes back."""
    redis_proxy.blackhole()
    with raw_connect(redis_proxy, timeout=0.3) as sock:
        assert wait_until(lambda: redis_proxy.connections_accepted == 1)
        sock.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1)
    assert redis_proxy.mode == "blackhole"


def test_blackhole_new_redis_client_times_out(
    redis_proxy: FaultProxy, redis_factory: RedisFactory
) -> None:
    """After blackhole(), a fresh redis-py client connects, then times out."""
    redis_proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        redis_factory(redis_proxy, timeout=0.3).ping()


def test_restore_resets_blackholed_connections(redis_proxy: FaultProxy) -> None:
    """restore() resets the connections that were blackholed, so their clients reconnect."""
    redis_proxy.blackhole()
    with raw_connect(redis_proxy) as sock:
        assert wait_until(lambda: redis_proxy.open_connections == 1)
        redis_proxy.restore()
        assert redis_proxy.open_connections == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_restore_after_blackhole(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """After blackhole() then restore(), the same client's next command succeeds."""
    client = redis_factory(redis_proxy, timeout=0.3)
    client.ping()
    redis_proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    redis_proxy.restore()
    assert client.ping() is True


def test_blip_refuses_then_recovers(redis_proxy: FaultProxy, redis_factory: RedisFactory) -> None:
    """blip(0.2) is an outage from the moment it returns, and it ends by itself."""
    client = redis_factory(redis_proxy)
    client.ping()
    done = redis_proxy.blip(0.2)
    with pytest.raises(ConnectionRefusedError):
        raw_connect(redis_proxy).close()
    assert done.wait(10)
    assert redis_proxy.wait_blip(0)
    assert redis_proxy.mode == "normal"
    assert client.ping() is True  # on a new connection: the old one was reset


def test_blip_is_superseded_by_cut(redis_proxy: FaultProxy) -> None:
    """A cut() during a blip cancels the blip's restore (and ends its wait)."""
    done = redis_proxy.blip(0.2)
    redis_proxy.cut()
    assert done.is_set()
    time.sleep(0.4)
    assert redis_proxy.mode == "cut"
    with pytest.raises(ConnectionRefusedError):
        raw_connect(redis_proxy).close()


def test_unreachable_target_resets_clients(fault_proxy: Callable[[str, int], FaultProxy]) -> None:
    """When the target refuses, the proxy resets the client's connection."""
    with socket.socket() as spare:  # bound, never listening: connects to it are refused
        spare.bind(("127.0.0.1", 0))
        proxy = fault_proxy("127.0.0.1", spare.getsockname()[1])
        # the reset can arrive before the client's connect() has even returned
        with pytest.raises(ConnectionResetError), raw_connect(proxy) as sock:
            sock.recv(1)
    assert wait_until(lambda: proxy.open_connections == 0)


def test_fifty_concurrent_connections(redis_proxy: FaultProxy) -> None:
    """Fifty clients, each on its own connection, all talk through the proxy at once."""
    barrier = threading.Barrier(50, timeout=10)

    def talk(i: int) -> bytes:
        client = redis.Redis(
            host=redis_proxy.host, port=redis_proxy.port, socket_timeout=5, socket_connect_timeout=5
        )
        try:
            client.ping()
            barrier.wait()  # every connection is open at the same time
            reply = client.echo(f"client {i}")
            assert isinstance(reply, bytes)
            return reply
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(talk, range(50)))
    assert replies == [f"client {i}".encode() for i in range(50)]
    assert redis_proxy.connections_accepted == 50


@pytest.mark.anyio
async def test_usable_from_async_code(redis_proxy: FaultProxy) -> None:
    """The proxy's methods work from async tests: they never need the caller's event loop."""
    client = redis.asyncio.Redis(
        host=redis_proxy.host,
        port=redis_proxy.port,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    try:
        assert await client.ping() is True
        redis_proxy.cut()
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        redis_proxy.restore()
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_postgres_query_through_proxy(postgres_url: str, postgres_proxy: FaultProxy) -> None:
    """A PostgreSQL query through the proxy (SQLAlchemy + psycopg) works."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        postgres_proxy.postgres_url(postgres_url), connect_args={"connect_timeout": 2}
    )
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 41 + 1")).scalar() == 42
    finally:
        engine.dispose()
    assert postgres_proxy.connections_accepted >= 1


def test_postgres_open_connection_fails_after_cut(
    postgres_url: str, postgres_proxy: FaultProxy
) -> None:
    """After cut(), a query on an open PostgreSQL connection raises OperationalError."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        postgres_proxy.postgres_url(postgres_url), connect_args={"connect_timeout": 2}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            postgres_proxy.cut()
            with pytest.raises(sa.exc.OperationalError):
                conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def test_postgres_new_connection_fails_after_cut(
    postgres_url: str, postgres_proxy: FaultProxy
) -> None:
    """After cut(), connecting to PostgreSQL through the proxy raises OperationalError."""
    import sqlalchemy as sa

    postgres_proxy.cut()
    engine = sa.create_engine(
        postgres_proxy.postgres_url(postgres_url), connect_args={"connect_timeout": 2}
    )
    try:
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass
    finally:
        engine.dispose()


def test_urls() -> None:
    """The proxy's address helpers point at its own loopback port."""
    with FaultProxy("127.0.0.1", 9) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}"
        assert proxy.redis_url(3) == f"redis://127.0.0.1:{proxy.port}/3"
        assert (
            proxy.postgres_url("postgresql+psycopg://u:p%40ss@db.example:5432/test")
            == f"postgresql+psycopg://u:p%40ss@127.0.0.1:{proxy.port}/test"
        )


def _open_sockets() -> set[str]:
    """The sockets this process has open (``socket:[inode]``)."""
    fds = Path("/proc/self/fd")
    links = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # the listing's own fd is gone already
            links.add(os.readlink(fd))
    return {link for link in links if link.startswith("socket:")}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_close_leaves_no_sockets_or_threads(redis_url: str, redis_factory: RedisFactory) -> None:
    """close() resets every connection, closes every socket and ends the proxy's thread."""
    target = urlsplit(redis_url)
    before = _open_sockets()
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
    client = redis_factory(proxy)
    client.ping()
    proxy.close()
    client.close()
    assert not proxy._thread.is_alive()
    assert proxy._thread not in threading.enumerate()
    assert _open_sockets() <= before
    with pytest.raises(ConnectionRefusedError):
        raw_connect(proxy).close()


def test_close_with_blackholed_connections(redis_proxy: FaultProxy) -> None:
    """close() does not hang on blackholed connections (with bytes in flight both ways)."""
    redis_proxy.blackhole()
    socks = [raw_connect(redis_proxy) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"PING\r\n" * 1000)
        assert wait_until(lambda: redis_proxy.open_connections == 5)
        redis_proxy.close()
        assert not redis_proxy._thread.is_alive()
    finally:
        for sock in socks:
            sock.close()


def test_closed_proxy_refuses_faults(redis_proxy: FaultProxy) -> None:
    """Once closed, the proxy says so instead of hanging; close() is idempotent."""
    redis_proxy.close()
    redis_proxy.close()
    with pytest.raises(RuntimeError, match="closed"):
        redis_proxy.cut()
