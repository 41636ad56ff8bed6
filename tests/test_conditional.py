"""If-None-Match (RFC 9110 §13.1.2) beside If-Match: weak comparison, ``*``, lists of entity
tags; 304 for GET/HEAD, 412 for other methods; hostile headers only ever give a typed 412."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hardening
from hardening import (
    ConfigurationError,
    PreconditionFailed,
    check_if_match,
    check_if_none_match,
    etag_for,
    if_match_version,
    locking,
)


def test_absent_or_blank_header_proceeds() -> None:
    """No header is no condition, whatever the method and resource."""
    for header in (None, "", "   "):
        assert check_if_none_match(header, 3) is False
        assert check_if_none_match(header, None, method="PUT") is False


@pytest.mark.parametrize(
    "header", ['"v3"', 'W/"v3"', '"v1", W/"v3"', ' "x" ,"v3" ', '"a,b", "v3"', "*"]
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "get", "head"])
def test_get_matching_tag_is_not_modified(header: str, method: str) -> None:
    """A listed tag equal by weak comparison (or ``*``): GET/HEAD answer 304."""
    assert check_if_none_match(header, 3, method=method) is True


@pytest.mark.parametrize("header", ['"v2"', 'W/"v4"', '"v33"', '"V3"', ' "v30"'])
def test_other_tags_proceed(header: str) -> None:
    """No listed tag equals the current one: the request proceeds (200, or the write)."""
    assert check_if_none_match(header, 3) is False
    assert check_if_none_match(header, 3, method="PATCH") is False


def test_create_if_absent() -> None:
    """``If-None-Match: *`` on a write: proceeds when there is no resource, 412 when there is."""
    assert check_if_none_match("*", None, method="PUT") is False
    with pytest.raises(PreconditionFailed) as info:
        check_if_none_match("*", 1, method="PUT")
    failed = info.value
    assert (failed.http_status, failed.reason, failed.header) == (412, "exists", "If-None-Match")
    assert failed.current_etag == '"v1"'
    assert failed.details() == {
        "if_match": "*",
        "current_etag": '"v1"',
        "reason": "exists",
        "header": "If-None-Match",
    }


def test_write_with_matching_tag_fails() -> None:
    """A write naming the current tag in If-None-Match is refused (412, ``unchanged``)."""
    with pytest.raises(PreconditionFailed) as info:
        check_if_none_match('W/"v7"', 7, method="POST")
    assert (info.value.reason, info.value.current_etag) == ("unchanged", '"v7"')


def test_missing_resource_matches_no_tag() -> None:
    """A resource that does not exist has no tag: a GET proceeds (to its 404)."""
    assert check_if_none_match('"v1"', None) is False
    assert check_if_none_match("*", None) is False


@pytest.mark.parametrize(
    "header",
    [
        "v3",
        '"v3',
        'W/"v3',
        '"v3" "v4"',
        ",",
        " , ,",
        'w/"v3"',
        'W/ "v3"',
        '"v\x003"',
        '"v\u20ac"',
        '"' + "x" * 9000 + '"',
        "**",
        '*, "v3"',
    ],
)
def test_malformed_header_is_a_typed_412(header: str) -> None:
    """Malformed headers are PreconditionFailed(reason="malformed"), whether or not the
    resource exists and whatever the method."""
    for current in (3, None):
        for method in ("GET", "PUT"):
            with pytest.raises(PreconditionFailed) as info:
                check_if_none_match(header, current, method=method)
            assert (info.value.reason, info.value.header) == ("malformed", "If-None-Match")
            assert len(info.value.if_match) <= 9000


def test_bad_current_version_is_a_configuration_error() -> None:
    """The server's own version must be a non-negative int: a bug, not a client error."""
    with pytest.raises(ConfigurationError):
        check_if_none_match('"v1"', -1)


def test_if_match_errors_name_their_header() -> None:
    """If-Match's own errors keep ``header="If-Match"`` (the default)."""
    with pytest.raises(PreconditionFailed) as info:
        check_if_match('"v1"', 2)
    assert info.value.header == "If-Match"


def test_exported_and_documented() -> None:
    """The helper is public API, beside check_if_match, with a docstring."""
    assert "check_if_none_match" in hardening.__all__
    assert locking.check_if_none_match is check_if_none_match
    assert check_if_none_match.__doc__


def test_if_match_star_is_none() -> None:
    """``If-Match: *`` names no version: ``None``, which the histories read as "the head"."""
    assert if_match_version("*") is None
    assert if_match_version(" * ") is None


# --- property tests ----------------------------------------------------------------------

ETAGC = st.sampled_from([chr(c) for c in range(0x21, 0x7F) if c != 0x22] + ["\x80", "\xff"])
OPAQUE = st.one_of(st.text(ETAGC, max_size=6), st.integers(0, 12).map(lambda n: f"v{n}"))
TAG = st.tuples(st.booleans(), OPAQUE)
OWS = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def header_lists(draw: st.DrawFn) -> tuple[str, list[tuple[bool, str]]]:
    """A well-formed list of entity tags, with optional whitespace, and the tags it lists."""
    tags = draw(st.lists(TAG, min_size=1, max_size=5))
    parts = [
        draw(OWS) + ('W/"' if weak else '"') + opaque + '"' + draw(OWS) for weak, opaque in tags
    ]
    return ",".join(parts), tags


@settings(max_examples=400, deadline=None)
@given(listed=header_lists(), current=st.integers(0, 12))
def test_lists_match_by_weak_comparison(
    listed: tuple[str, list[tuple[bool, str]]], current: int
) -> None:
    """Any well-formed list: 304 iff some opaque tag is ``v<current>``, W/ or not; a write
    with such a list is 412 ``unchanged``."""
    header, tags = listed
    expected = any(opaque == f"v{current}" for _, opaque in tags)
    assert check_if_none_match(header, current) is expected
    if expected:
        with pytest.raises(PreconditionFailed):
            check_if_none_match(header, current, method="DELETE")
    else:
        assert check_if_none_match(header, current, method="DELETE") is False


@settings(max_examples=500, deadline=None)
@given(
    header=st.text(max_size=40) | st.text(st.sampled_from('W/"v1*, \t\x00é'), max_size=20),
    current=st.none() | st.integers(0, 5),
    method=st.sampled_from(["GET", "HEAD", "PUT", "POST"]),
)
def test_any_header_gives_a_bool_or_a_412(header: str, current: int | None, method: str) -> None:
    """Whatever a client sends: True, False, or PreconditionFailed; never anything else."""
    failed: PreconditionFailed | None = None
    result = None
    try:
        result = check_if_none_match(header, current, method=method)
    except PreconditionFailed as exc:
        failed = exc
    if failed is not None:
        assert (failed.http_status, failed.header) == (412, "If-None-Match")
    else:
        assert isinstance(result, bool)
        assert not result or method in ("GET", "HEAD")
        assert not result or current is not None


def test_etag_for_round_trips_through_both_headers() -> None:
    """What ``etag_for`` makes, both helpers accept."""
    tag = etag_for(12)
    check_if_match(tag, 12)
    assert check_if_none_match(tag, 12) is True
    assert if_match_version(tag) == 12
