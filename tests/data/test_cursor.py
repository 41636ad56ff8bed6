"""Cursor encoding and signatures, without a database."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import ConfigurationError, FakeClock, InvalidCursor
from hardening.data._cursor import CursorCodec, fingerprint
from tests.data.conftest import SECRET

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
    st.binary(),
)


@given(st.lists(values, max_size=6))
def test_every_value_comes_back_exactly(key: list[object]) -> None:
    """What goes into a cursor comes out equal and of the same type."""
    codec = CursorCodec(SECRET)
    decoded = codec.decode(codec.encode("order", key), "order", len(key))
    assert decoded == key
    assert [type(v) for v in decoded] == [type(v) for v in key]


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2012, 3, 30, 2, 0, tzinfo=ZoneInfo("Israel")),  # in a DST gap
        dt.datetime(2021, 11, 7, 1, 30, tzinfo=ZoneInfo("America/New_York"), fold=1),  # fold
        dt.datetime(2021, 11, 7, 1, 30, tzinfo=ZoneInfo("America/New_York")),
    ],
)
def test_named_zones_keep_their_zone_and_fold(value: dt.datetime) -> None:
    """A datetime in a named zone comes back in that zone with its fold: an offset would not
    compare equal in a DST gap or fold (found by the property above)."""
    codec = CursorCodec(SECRET)
    (decoded,) = codec.decode(codec.encode("order", [value]), "order", 1)
    assert decoded == value
    assert (decoded.tzinfo, decoded.fold) == (value.tzinfo, value.fold)


def test_cursors_are_url_safe_and_unpadded() -> None:
    """Only base64url characters, no '=' padding."""
    cursor = CursorCodec(SECRET).encode("o", ["é", b"\xff\xfe", 2**70])
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_infinite_floats_are_tagged() -> None:
    """Non-finite floats survive (JSON cannot carry them)."""
    codec = CursorCodec(SECRET)
    out = codec.decode(codec.encode("o", [math.inf, -math.inf]), "o", 2)
    assert out == [math.inf, -math.inf]


def test_unsupported_values_are_configuration_errors() -> None:
    """A value a cursor cannot carry is a programming error, reported when encoding."""
    with pytest.raises(ConfigurationError, match="list"):
        CursorCodec(SECRET).encode("o", [[1, 2]])


def _signed(codec: CursorCodec, body: object) -> str:
    """A cursor signed with the right secret around an arbitrary payload."""
    payload = json.dumps(body).encode()
    return base64.urlsafe_b64encode(codec._tag(payload) + payload).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not a list", "malformed"),
        ([2, "o", 0, []], "malformed"),  # a future format
        ([1, "o", 0, [{"dt": "yesterday"}]], "malformed"),
        ([1, "o", 0, [{"zz": "1"}]], "malformed"),
        ([1, "o", 0, [{"n": "1", "u": "2"}]], "malformed"),
        ([1, "o", 0, [[1]]], "malformed"),
        ([1, "o", 0, [{"n": "x"}]], "malformed"),
        ([1, "other", 0, [1]], "ordering"),
        ([1, "o", 0, [1, 2]], "ordering"),
    ],
)
def test_signed_but_unusable_payloads(body: object, reason: str) -> None:
    """Even a correctly signed cursor must carry a known format for this ordering."""
    codec = CursorCodec(SECRET)
    with pytest.raises(InvalidCursor) as info:
        codec.decode(_signed(codec, body), "o", 1)
    assert info.value.reason == reason


def test_expiry_uses_the_clock() -> None:
    """max_age is measured on the clock's wall time."""
    clock = FakeClock(1_000.0)
    cursor = CursorCodec(SECRET, clock=clock).encode("o", [1])
    codec = CursorCodec(SECRET, max_age=dt.timedelta(seconds=30), clock=clock)
    clock.advance(30)
    assert codec.decode(cursor, "o", 1) == [1]
    clock.advance(1)
    with pytest.raises(InvalidCursor, match="expired"):
        codec.decode(cursor, "o", 1)


def test_secrets_are_required_and_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """No secret, or one under 16 bytes, is refused; the environment variable is a source."""
    monkeypatch.delenv("HARDENING_PAGINATION_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match="HARDENING_PAGINATION_SECRET"):
        CursorCodec(None)
    with pytest.raises(ConfigurationError, match="16 bytes"):
        CursorCodec(b"short")
    monkeypatch.setenv("HARDENING_PAGINATION_SECRET", SECRET)
    assert CursorCodec(None).decode(CursorCodec(SECRET).encode("o", [1]), "o", 1) == [1]


def test_fingerprints_differ_per_ordering() -> None:
    """Two descriptions, two fingerprints; the same one, the same."""
    assert fingerprint("a ASC") == fingerprint("a ASC") != fingerprint("a DESC")


def test_types_do_not_collide() -> None:
    """A string that looks like a date stays a string; a date stays a date."""
    codec = CursorCodec(SECRET)
    key = ["2026-01-01", dt.date(2026, 1, 1), Decimal("1.10"), "1.10", uuid.UUID(int=5)]
    assert codec.decode(codec.encode("o", key), "o", 5) == key
