"""The memory storage: bounded LRU by entries and bytes, expiry on a fake clock, exact indexes."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import Cache, ConfigurationError, FakeClock, MemoryCacheStorage
from hardening.cache.storage import Write


def test_lru_bound_holds_under_a_flood() -> None:
    """100,000 distinct keys into a 1,000-entry cache: never more than 1,000 kept, the most
    recent ones, and the indexes shrink with them."""
    storage = MemoryCacheStorage(max_entries=1000)
    cache = Cache(storage)
    for i in range(100_000):
        cache.set(f"flood:{i}", i, tags=[f"t{i % 7}"])
    assert len(storage) == 1000
    assert cache.get("flood:99999") == 99999
    assert cache.get("flood:0") is None
    assert sum(len(members) for members in storage._indexes.values()) <= 1000 * 2
    assert cache.invalidate_tags([f"t{i}" for i in range(7)]) == 1000
    assert len(storage) == 0
    assert not storage._indexes


def test_reads_keep_entries_alive() -> None:
    """The least recently *used* entry goes first, not the oldest written."""
    cache = Cache(max_entries=3)
    for key in "abc":
        cache.set(key, key)
    cache.get("a")
    cache.set("d", "d")
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}


def test_byte_bound() -> None:
    """max_bytes evicts least recently used values until the stored bytes fit."""
    storage = MemoryCacheStorage(max_bytes=1000)
    cache = Cache(storage, jitter=0)
    for i in range(50):
        cache.set(f"k{i}", "x" * 80)  # ~100 bytes with the envelope
    assert storage.size_bytes <= 1000
    assert 5 <= len(storage) <= 10
    storage.set_many("b:", [Write("huge", b"x" * 2000, 1000)])
    assert storage.get("b:", "huge") is None  # larger than the whole budget: not kept


def test_expiry_follows_the_clock() -> None:
    """Values expire exactly at their TTL on the injected clock."""
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, default_ttl=10)
    cache.set("k", 1, tags=["t"])
    clock.advance(9.999)
    assert cache.get("k") == 1
    clock.advance(0.001)
    assert cache.get("k") is None
    assert cache.invalidate_tags("t") == 0


def test_jitter_spreads_expiry() -> None:
    """With the default 10% jitter, keys set together expire over the last tenth of the TTL."""
    clock = FakeClock()
    cache = Cache(clock=clock, default_ttl=100)
    for i in range(200):
        cache.set(f"k{i}", i)
    clock.advance(89.99)  # TTLs are whole milliseconds in [90 s, 100 s]: 90.000 can be drawn
    keys = [f"k{i}" for i in range(200)]
    assert len(cache.get_many(keys)) == 200
    clock.advance(5.01)
    assert 40 < len(cache.get_many(keys)) < 160
    clock.advance(5.0)
    assert cache.get_many(keys) == {}


def test_bounds_are_validated() -> None:
    """Bounds are positive integers."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError):
            MemoryCacheStorage(max_entries=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        MemoryCacheStorage(max_bytes=0)


def test_thread_safety_under_contention() -> None:
    """8 threads writing, reading and invalidating never corrupt the bound or the indexes."""
    storage = MemoryCacheStorage(max_entries=100)
    cache = Cache(storage)

    def work(n: int) -> None:
        for i in range(2000):
            cache.set(f"k:{n}:{i % 300}", i, tags=[f"t{i % 5}"])
            cache.get(f"k:{n}:{(i * 7) % 300}")
            if i % 250 == 0:
                cache.invalidate_tags(f"t{i % 5}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(storage) <= 100
    indexed = set().union(*storage._indexes.values()) if storage._indexes else set()
    assert indexed <= set(storage._data)


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["set", "get", "delete", "tag"]), st.integers(0, 40)),
        max_size=300,
    ),
    bound=st.integers(1, 20),
)
def test_lru_never_exceeds_its_bound(ops: list[tuple[str, int]], bound: int) -> None:
    """Whatever the sequence of operations, the entry count stays within the bound and the
    indexes list exactly the stored keys."""
    storage = MemoryCacheStorage(max_entries=bound)
    cache = Cache(storage)
    for op, n in ops:
        if op == "set":
            cache.set(f"k:{n}", n, tags=[f"t{n % 3}"])
        elif op == "get":
            cache.get(f"k:{n}")
        elif op == "delete":
            cache.delete(f"k:{n}")
        else:
            cache.invalidate_tags(f"t{n % 3}")
        assert len(storage) <= bound
    indexed = set().union(*storage._indexes.values()) if storage._indexes else set()
    assert indexed <= set(storage._data)
