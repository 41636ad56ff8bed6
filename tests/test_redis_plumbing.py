"""The shared Redis plumbing: the one key builder and clients with bounded, waiting pools."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from hardening import ConfigurationError
from hardening._redis import (
    check_key_prefix,
    client_from_url,
    escape_prefix_part,
    hash_tag,
    pool_warning,
    redis_key,
)
from tests.concurrency import in_threads


def _slot_tag(key: str) -> str:
    """What Redis Cluster hashes for ``key`` (its hash-tag rules)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@given(st.text())
def test_hash_tag_is_safe_for_any_text(part: str) -> None:
    """Any text (braces, surrogates, controls) gives a non-empty, brace-free ASCII tag."""
    tag = hash_tag(part)
    assert tag
    assert "{" not in tag
    assert "}" not in tag
    assert tag.isascii()
    assert tag.isprintable()
    assert len(tag) <= 200 + 2


@given(st.text(), st.text())
def test_hash_tag_never_collides(a: str, b: str) -> None:
    """Two different parts never share a tag."""
    if a != b:
        assert hash_tag(a) != hash_tag(b)


@given(st.text(), st.sampled_from(["block", "swc:60000", "job:"]))
def test_every_key_of_a_tag_hashes_to_that_tag(part: str, suffix: str) -> None:
    """Whatever the part, Redis hashes exactly its escaped tag: one slot per part."""
    key = redis_key("hardening:rl", part, suffix)
    assert _slot_tag(key) == hash_tag(part)
    assert _slot_tag(redis_key("hardening:rl", part)) == hash_tag(part)


@pytest.mark.parametrize(
    ("part", "tag"),
    [
        ("user:42", "user:42"),
        ("}a", "%7Da"),
        ("{", "%7B"),
        ("{}", "%7B%7D"),
        ("", "%"),
        ("100%", "100%25"),
        ("a b", "a%20b"),
        ("\ud800", "%ED%A0%80"),
        ("é", "%C3%A9"),
    ],
)
def test_hash_tag_escapes(part: str, tag: str) -> None:
    """Known escapes: braces, percent, spaces, non-ASCII and lone surrogates."""
    assert hash_tag(part) == tag


def test_long_parts_are_hashed() -> None:
    """A 10 KB part becomes a fixed-size digest that no escape can produce."""
    tag = hash_tag("x" * 10_000)
    assert tag.startswith("%H")
    assert len(tag) == 66
    assert hash_tag("x" * 10_001) != tag


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "a b", "é", 3])
def test_bad_prefixes_are_refused(prefix: object) -> None:
    """A prefix that could move hash slots (or is empty) is a configuration error."""
    with pytest.raises(ConfigurationError):
        check_key_prefix(prefix)


def test_prefix_parts_are_escaped_losslessly() -> None:
    """Route names become prefix parts without two names meeting."""
    assert escape_prefix_part("PATCH /pages/*") == "PATCH%20/pages/*"
    assert escape_prefix_part("GET /a b") != escape_prefix_part("GET /a_b")
    assert escape_prefix_part("100%") == "100%25"


def test_url_clients_have_blocking_pools(redis_url: str) -> None:
    """A client from a URL waits for a connection instead of raising."""
    client = client_from_url(redis_url, max_connections=7, pool_timeout=3)
    try:
        pool = client.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.timeout == 3
        assert pool_warning(client) is None
    finally:
        client.close()


def test_query_string_sets_the_pool(redis_url: str) -> None:
    """``?max_connections=`` and ``?pool_timeout=`` in the URL size the pool."""
    client = client_from_url(f"{redis_url}?max_connections=3&pool_timeout=0.5")
    try:
        assert client.connection_pool.max_connections == 3
        assert client.connection_pool.timeout == 0.5
        assert client.ping()
    finally:
        client.close()


@pytest.mark.parametrize("options", [{"max_connections": 0}, {"pool_timeout": -1}])
def test_bad_pool_options(redis_url: str, options: dict[str, float]) -> None:
    """Nonsense pool sizes and timeouts are configuration errors."""
    with pytest.raises(ConfigurationError):
        client_from_url(redis_url, **options)


def test_default_clients_get_a_warning() -> None:
    """redis-py's own default pool raises when full: hardening says so."""
    client = redis.Redis()
    assert pool_warning(client) is not None
    assert "MaxConnectionsError" in (pool_warning(client) or "")


def test_threads_beyond_the_pool_wait(redis_url: str) -> None:
    """100 threads on a pool of 4: every command succeeds, none raises."""
    client = client_from_url(redis_url, max_connections=4, pool_timeout=30)
    try:
        results = in_threads(100, lambda: [client.ping() for _ in range(5)])
    finally:
        client.close()
    assert results == [[True] * 5] * 100


def test_a_pool_full_for_its_whole_timeout_fails(redis_url: str) -> None:
    """A caller that waited ``pool_timeout`` in vain gets a ConnectionError."""
    client = client_from_url(redis_url, max_connections=1, pool_timeout=0.2)
    try:
        held = client.connection_pool.get_connection()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.connection_pool.release(held)
        assert client.ping()
    finally:
        client.close()


@pytest.mark.anyio
async def test_async_callers_beyond_the_pool_wait(redis_url: str) -> None:
    """400 concurrent asyncio commands on a pool of 10: all succeed."""
    client = client_from_url(redis_url, asyncio=True, max_connections=10, pool_timeout=30)
    try:
        results = await asyncio.gather(*(client.ping() for _ in range(400)))
        assert all(results)
        assert isinstance(client.connection_pool, redis.asyncio.BlockingConnectionPool)
    finally:
        await client.aclose()


def test_cluster_clients_wait_too(redis_cluster_url: str) -> None:
    """A blocking cluster client: 60 threads on a gate of 2 all succeed."""
    client = client_from_url(redis_cluster_url, max_connections=2, pool_timeout=30)
    try:
        results = in_threads(60, lambda: [client.get(f"hardening-test:gate:{i}") for i in range(5)])
        assert pool_warning(client) is None
    finally:
        client.close()
    assert results == [[None] * 5] * 60


@pytest.mark.anyio
async def test_async_cluster_clients_wait_instead_of_raising(redis_cluster_url: str) -> None:
    """redis-py's asyncio cluster raises past max_connections; ours waits at the gate."""
    client = client_from_url(redis_cluster_url, asyncio=True, max_connections=3, pool_timeout=30)
    try:
        keys = [f"hardening-test:gate:{i}" for i in range(300)]
        results = await asyncio.gather(*(client.get(key) for key in keys))
        assert results == [None] * 300
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_async_gate_times_out_without_leaking(redis_cluster_url: str) -> None:
    """A caller that waited its whole pool_timeout fails; the slot count is intact after."""
    client = client_from_url(redis_cluster_url, asyncio=True, max_connections=1, pool_timeout=0.2)
    gate = client._hardening_gate
    try:
        await client.ping()
        await gate.__aenter__()  # hold the only slot
        with pytest.raises(redis.ConnectionError):
            await client.get("hardening-test:gate:x")
        await gate.__aexit__(None, None, None)
        assert await client.get("hardening-test:gate:x") is None
        assert gate._slots._value == 1
    finally:
        await client.aclose()
