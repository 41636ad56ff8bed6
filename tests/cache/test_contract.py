"""Cache guarantees, each a test on every storage: memory, real Redis, real Redis Cluster."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening import ConfigurationError, Metrics, ValueTooLarge
from tests.cache.conftest import Harness, wait_for_misses


def _expire(harness: Harness, seconds: float) -> None:
    """Let ``seconds`` pass for the storage: advance the fake clock, or wait on Redis."""
    if harness.clock is not None:
        harness.clock.advance(seconds)
    else:
        time.sleep(seconds)


def test_set_get_delete(harness: Harness) -> None:
    """A stored value reads back; a deleted one misses; get's default marks a miss."""
    cache = harness.make()
    cache.set("user:1", {"name": "ana", "tags": ["a", "b"]})
    assert cache.get("user:1") == {"name": "ana", "tags": ["a", "b"]}
    assert cache.delete("user:1") is True
    assert cache.delete("user:1") is False
    assert cache.get("user:1", "none") == "none"


def test_none_is_a_value(harness: Harness) -> None:
    """A stored ``None`` is a hit: get_or_set does not reload it."""
    cache = harness.make()
    runs: list[int] = []
    assert cache.get_or_set("k", lambda: runs.append(1)) is None
    assert cache.get_or_set("k", lambda: runs.append(1)) is None
    assert runs == [1]
    assert cache.get("k", "default") is None


def test_ttl_expiry(harness: Harness) -> None:
    """A value is there until its TTL passes, then gone."""
    cache = harness.make()
    cache.set("k", 1, ttl=0.2)
    assert cache.get("k") == 1
    _expire(harness, 0.3)
    assert cache.get("k") is None


def test_ttl_profiles(harness: Harness) -> None:
    """A profile name sets the TTL: the session profile outlives the block profile."""
    cache = harness.make(profiles={"block": 0.2, "session": 60})
    cache.set("a", 1, ttl="block")
    cache.set("b", 2, ttl="session")
    _expire(harness, 0.3)
    assert cache.get_many(["a", "b"]) == {"b": 2}
    with pytest.raises(ConfigurationError, match="unknown TTL profile"):
        cache.set("c", 3, ttl="nope")


def test_get_many_and_set_many(harness: Harness) -> None:
    """set_many stores all; get_many returns the hits only, keyed as asked."""
    cache = harness.make()
    cache.set_many({"p:1": 1, "p:2": [2], "p:3": {"three": 3}}, tags=["batch"])
    assert cache.get_many(["p:1", "p:2", "p:3", "p:4"]) == {
        "p:1": 1,
        "p:2": [2],
        "p:3": {"three": 3},
    }
    assert cache.get_many([]) == {}
    assert cache.invalidate_tags("batch") == 3


def test_tag_invalidation_removes_exactly_the_tagged_keys(harness: Harness) -> None:
    """Invalidating project:42 removes every key tagged with it and nothing else."""
    cache = harness.make()
    for i in range(10):
        cache.set(f"block:{i}", i, tags=["project:42"] if i % 2 else ["project:7"])
    cache.set("theme:dark", "d", tags=["theme"])
    cache.set("both", "b", tags=["project:42", "theme"])
    assert cache.invalidate_tags(["project:42"]) == 6
    left = cache.get_many([f"block:{i}" for i in range(10)] + ["theme:dark", "both"])
    assert sorted(left) == [f"block:{i}" for i in range(0, 10, 2)] + ["theme:dark"]
    assert cache.invalidate_tags("project:42") == 0


def test_retagged_key_leaves_its_old_tag(harness: Harness) -> None:
    """A key re-set without a tag is no longer invalidated by that tag."""
    cache = harness.make()
    cache.set("k", 1, tags=["old"])
    cache.set("k", 2, tags=["new"])
    assert cache.invalidate_tags("old") == 0
    assert cache.get("k") == 2
    assert cache.invalidate_tags("new") == 1


def test_deleted_key_leaves_its_tags(harness: Harness) -> None:
    """A deleted then re-set (untagged) key is not hit by its former tag."""
    cache = harness.make()
    cache.set("k", 1, tags=["t"])
    cache.delete("k")
    cache.set("k", 2)
    assert cache.invalidate_tags("t") == 0
    assert cache.get("k") == 2


def test_prefix_invalidation(harness: Harness) -> None:
    """invalidate_prefix deletes exactly the keys under the prefix, at each indexed depth."""
    cache = harness.make()
    cache.set_many({"project:42:blocks": 1, "project:42:meta": 2, "project:4:blocks": 3})
    cache.set("project:42", 4)  # not under "project:42:"
    cache.set("session:1", 5)
    assert cache.invalidate_prefix("project:42:") == 2
    left = cache.get_many(["project:42", "project:4:blocks", "session:1"])
    assert set(left) == {"project:42", "project:4:blocks", "session:1"}
    assert cache.invalidate_prefix("project:") == 2
    assert cache.get("session:1") == 5


def test_prefix_must_end_with_colon_and_be_indexed(harness: Harness) -> None:
    """Prefixes are ``:``-bounded and no deeper than max_prefix_depth."""
    cache = harness.make(max_prefix_depth=2)
    with pytest.raises(ConfigurationError, match="ending in ':'"):
        cache.invalidate_prefix("project")
    with pytest.raises(ConfigurationError, match="max_prefix_depth"):
        cache.invalidate_prefix("a:b:c:")
    cache.set("a:b:c:d", 1)
    assert cache.invalidate_prefix("a:b:") == 1


def test_namespaces_are_separate(harness: Harness) -> None:
    """Two namespaces never see each other's keys, tags or prefixes."""
    one = harness.make(namespace="one")
    two = harness.make(namespace="two")
    one.set("k:1", "one", tags=["t"])
    two.set("k:1", "two", tags=["t"])
    assert one.invalidate_tags("t") == 1
    assert two.get("k:1") == "two"
    assert one.invalidate_prefix("k:") == 0
    assert two.invalidate_prefix("k:") == 1


@pytest.mark.parametrize(
    "key",
    [
        "*",
        "project:*:[a-z]?",
        "{braces}",
        "a}b{c",
        "",
        " spaces and\ttabs ",
        "\x00\x01binary\xff\ud800",
        "unicode:é中文",
        "x" * 10_000,
        "hash#looking#3" + "0" * 64,
        "line\nbreak",
    ],
)
def test_hostile_keys(harness: Harness, key: str) -> None:
    """Globs, braces, binary, huge and empty keys are stored, read and deleted as themselves."""
    cache = harness.make()
    cache.set(key, "mine", tags=[key or "empty"])
    cache.set(key + "!", "other")
    assert cache.get(key) == "mine"
    assert cache.get_many([key, key + "!"]) == {key: "mine", key + "!": "other"}
    assert cache.invalidate_tags(key or "empty") == 1
    assert cache.get(key) is None
    assert cache.get(key + "!") == "other"


def test_hashed_keys_cannot_be_forged(harness: Harness) -> None:
    """A key spelled like another key's hashed storage id does not reach its value."""
    cache = harness.make()
    long_key = "k" * 300
    cache.set(long_key, "real")
    forged = cache.scheme.key_id(long_key)  # "kkk...#<sha256>"
    assert cache.get(forged) is None
    cache.set(forged, "forged")
    assert cache.get(long_key) == "real"


def test_non_string_key_is_refused(harness: Harness) -> None:
    """Keys are strings: anything else is a configuration error, not a silent str()."""
    cache = harness.make()
    with pytest.raises(ConfigurationError):
        cache.get(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        cache.set("k", 1, tags=[None])  # type: ignore[list-item]


def test_value_too_large_is_a_clear_error(harness: Harness) -> None:
    """A value over max_value_bytes raises ValueTooLarge with the sizes; nothing is stored."""
    cache = harness.make(max_value_bytes=100)
    with pytest.raises(ValueTooLarge) as info:
        cache.set("big", "x" * 200)
    assert (info.value.size, info.value.max_bytes) == (202, 100)
    assert info.value.key == "big"
    with pytest.raises(ValueTooLarge):
        cache.get_or_set("big", lambda: "x" * 200)
    assert cache.get("big") is None


def test_unserializable_value_is_a_cache_error(harness: Harness) -> None:
    """JSON refuses sets and NaN with a CacheError naming the key."""
    from hardening import CacheError

    cache = harness.make()
    with pytest.raises(CacheError, match="'k'"):
        cache.set("k", {1, 2})
    with pytest.raises(CacheError):
        cache.set("k", float("nan"))


def test_get_or_set_loads_once_then_hits(harness: Harness) -> None:
    """The loader runs on the miss only; later calls are hits."""
    cache = harness.make()
    runs: list[int] = []

    def load() -> dict[str, int]:
        runs.append(1)
        return {"n": len(runs)}

    assert [cache.get_or_set("k", load) for _ in range(5)] == [{"n": 1}] * 5
    assert runs == [1]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads) == (4, 1, 1)
    assert stats.hit_ratio == 0.8


def test_loader_error_caches_nothing(harness: Harness) -> None:
    """A loader that raises propagates its error and leaves the key empty."""
    cache = harness.make()

    def fail() -> int:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError, match="db down"):
        cache.get_or_set("k", fail)
    assert cache.get("k") is None
    assert cache.get_or_set("k", lambda: 7) == 7
    assert cache.stats().load_errors == 1


def test_hundred_threads_one_load(harness: Harness) -> None:
    """100 concurrent misses on one key run the loader once; 99 callers are counted."""
    metrics = Metrics()
    cache = harness.make(metrics=metrics, name="pages")
    runs: list[int] = []
    started = threading.Barrier(100)
    gate = threading.Event()

    def load() -> list[int]:
        runs.append(1)
        gate.wait(5)
        return [1, 2, 3]

    results: list[Any] = []

    def call() -> None:
        started.wait()
        results.append(cache.get_or_set("hot", load))

    threads = [threading.Thread(target=call) for _ in range(100)]
    for thread in threads:
        thread.start()
    wait_for_misses(cache, 100)  # the 99 others find the load in flight
    gate.set()
    for thread in threads:
        thread.join(10)
    assert runs == [1]
    assert results == [[1, 2, 3]] * 100
    assert len({id(r) for r in results}) == 100  # each waiter got its own copy
    sample = metrics.registry.get_sample_value
    assert sample("hardening_cache_stampedes_avoided_total", {"cache": "pages"}) == 99
    assert sample("hardening_cache_loads_total", {"cache": "pages", "outcome": "loaded"}) == 1


def test_loader_error_reaches_every_waiter(harness: Harness) -> None:
    """When the one load fails, every thread waiting for it gets the error; nothing is cached."""
    cache = harness.make()
    gate = threading.Event()
    errors: list[BaseException] = []

    def fail() -> int:
        gate.wait(5)
        raise ValueError("bad row")

    def call() -> None:
        try:
            cache.get_or_set("k", fail)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for thread in threads:
        thread.start()
    wait_for_misses(cache, 10)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 10
    assert cache.stats().load_errors == 1
    assert cache.get("k") is None


def test_hit_ratio_from_prometheus_counters(harness: Harness) -> None:
    """requests_total{result} gives the hit ratio; get_many counts each key."""
    metrics = Metrics()
    cache = harness.make(metrics=metrics, name="api")
    cache.set("a", 1)
    cache.get_many(["a", "b", "c"])
    for _ in range(7):
        cache.get_or_set("a", lambda: 0)

    def requests(result: str) -> float:
        value = metrics.registry.get_sample_value(
            "hardening_cache_requests_total", {"cache": "api", "result": result}
        )
        return value or 0.0

    assert (requests("hit"), requests("miss")) == (8, 2)
    body, _ = metrics.render()
    assert b'hardening_cache_requests_total{cache="api",result="hit"} 8.0' in body


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.text(max_size=300), value=json_values)
def test_round_trip_property(harness: Harness, key: str, value: Any) -> None:
    """Any JSON value set under any string key reads back equal."""
    cache = harness.made[0] if harness.made else harness.make()
    cache.set(key, value)
    assert cache.get(key, default=KeyError) == value
