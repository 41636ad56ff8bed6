"""The pure policy: keys, TTLs, jitter, the envelope, XFetch and the serializers."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import DEFAULT_TTL_PROFILES, ConfigurationError, JSONSerializer, PickleSerializer
from hardening.cache.policy import (
    KeyScheme,
    check_profiles,
    encode_id,
    jittered,
    pack,
    refresh_due,
    resolve_ttl,
    unpack,
)


def test_default_profiles_are_the_reference_kinds() -> None:
    """project 5 min, block 1 min, session 1 h, theme 24 h."""
    assert dict(DEFAULT_TTL_PROFILES) == {
        "project": 300.0,
        "block": 60.0,
        "session": 3600.0,
        "theme": 86400.0,
    }
    with pytest.raises(TypeError):
        DEFAULT_TTL_PROFILES["project"] = 1  # type: ignore[index]


def test_resolve_ttl_accepts_seconds_timedelta_and_profiles() -> None:
    """Every TTL spelling resolves to seconds; bad ones are configuration errors."""
    profiles = check_profiles({"user": timedelta(minutes=10)})
    assert resolve_ttl(1.5, profiles) == 1.5
    assert resolve_ttl(timedelta(hours=1), profiles) == 3600.0
    assert resolve_ttl("user", profiles) == 600.0
    for bad in (0, -1, float("nan"), "nope", True):
        with pytest.raises(ConfigurationError):
            resolve_ttl(bad, profiles)
    with pytest.raises(ConfigurationError):
        check_profiles({"zero": 0})


@given(seconds=st.floats(0.001, 1e6), jitter=st.floats(0, 0.99), rand=st.floats(0, 0.999999))
def test_jitter_only_shortens_and_by_at_most_its_fraction(
    seconds: float, jitter: float, rand: float
) -> None:
    """A jittered TTL lies in (ttl * (1 - jitter), ttl]."""
    ttl = jittered(seconds, jitter, rand)
    assert seconds * (1 - jitter) <= ttl <= seconds


def test_envelope_round_trip_and_foreign_bytes() -> None:
    """pack/unpack round-trip, payload colons included; other bytes read as a miss."""
    raw = pack(1_700_000_000_123, 45, b'{"a":"x:y"}')
    assert raw.startswith(b"h1:1700000000123:45:")
    assert unpack(raw) == (1_700_000_000_123, 45, b'{"a":"x:y"}')
    for foreign in (b"", b"plain", b"h2:1:2:x", b"h1:x:2:y", b"h1:1:2"):
        assert unpack(foreign) is None


def test_xfetch_never_refreshes_without_a_measured_load() -> None:
    """delta 0 (a plain set) or beta 0 never refreshes early, even at the last millisecond."""
    assert not refresh_due(999, 1000, 0, 1.0, 1e-12)
    assert not refresh_due(999, 1000, 500, 0.0, 1e-12)
    assert refresh_due(1000, 1000, 500, 1.0, 1.0)  # at expiry it always is


def test_xfetch_probability_rises_towards_expiry() -> None:
    """With delta 100 ms: rarely due 1 s before expiry, usually due 10 ms before."""
    rng = random.Random(7)

    def share(left_ms: int) -> float:
        due = [refresh_due(0, left_ms, 100, 1.0, 1.0 - rng.random()) for _ in range(10_000)]
        return sum(due) / len(due)

    far, near = share(1000), share(10)
    assert far < 0.001  # P = exp(-10)
    assert near > 0.85  # P = exp(-0.1)
    assert math.isclose(share(100), math.exp(-1), abs_tol=0.03)


def test_key_ids_keep_plain_keys_and_hash_the_rest() -> None:
    """Printable ASCII keys stay readable; long, binary or '#' keys are hashed with a readable
    start; the two forms never collide."""
    assert encode_id("project:42:blocks") == "project:42:blocks"
    long_id = encode_id("page:" + "x" * 300)
    assert long_id.startswith("page:xxx")
    assert len(long_id) < 120
    assert "#" in encode_id("a#b")
    assert encode_id("a#b") != "a#b"
    assert encode_id("é") != encode_id("e")
    assert encode_id("\x00") != encode_id("")


@given(st.text(max_size=400))
def test_key_ids_are_bounded_and_injective_on_samples(key: str) -> None:
    """Every id is at most 200 printable characters; hashing is deterministic."""
    key_id = encode_id(key)
    assert len(key_id) <= 200
    assert key_id.isprintable()
    assert encode_id(key) == key_id
    if "#" in key_id:
        assert key_id != key


def test_scheme_names_share_the_namespace_hash_tag() -> None:
    """Every storage name carries {namespace}; the empty namespace is {default}."""
    assert KeyScheme("app", "pages", 3).value_name("k") == "app:c:{pages}:k:k"
    assert KeyScheme("app", "", 3).base == "app:c:{default}:"
    for bad in ("a{b", "a}b", "sp ace"):
        with pytest.raises(ConfigurationError):
            KeyScheme("app", bad, 3)
        with pytest.raises(ConfigurationError):
            KeyScheme(bad, "ns", 3)


def test_prefixes_are_bounded_by_depth() -> None:
    """project:42:blocks:7 is indexed under its first max_prefix_depth prefixes."""
    scheme = KeyScheme("app", "ns", 2)
    assert scheme.prefix_ids("project:42:blocks:7") == ("project:", "project:42:")
    assert scheme.prefix_ids("plain") == ()
    assert KeyScheme("app", "ns", 0).prefix_ids("a:b") == ()


def test_json_serializer_is_compact_utf8_and_strict() -> None:
    """Compact separators, UTF-8 text, no NaN."""
    json = JSONSerializer()
    assert json.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert json.loads(b'{"a":[1,"\xc3\xa9"]}') == {"a": [1, "é"]}
    with pytest.raises(ValueError, match="not JSON compliant"):
        json.dumps(float("inf"))


def test_pickle_serializer_round_trips_python_objects() -> None:
    """The opt-in pickle serializer keeps tuples and sets."""
    pickle = PickleSerializer()
    assert pickle.loads(pickle.dumps({"t": (1, 2), "s": {3}})) == {"t": (1, 2), "s": {3}}
