"""The framework-free adapter pieces: path patterns, bodies, problem+json, the rate-limit plan."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardening import FakeClock
from hardening.adapters import (
    PROBLEM_JSON,
    PathMatcher,
    RateLimitRule,
    error_response,
    parse_content_length,
    parse_json_body,
    parse_patch_body,
    problem_response,
)
from hardening.adapters._http import compile_path
from hardening.adapters.asgi import RateLimitMiddleware
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    ConflictError,
    HardeningError,
    InvalidPatch,
    MalformedBody,
    PatchConflict,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimitExceeded,
    UnsupportedMediaType,
)
from hardening.ratelimit import AsyncRateLimiter, RequestInfo, user_key

JSON = "application/json"
PATCH = "application/json-patch+json"


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never called: plans only
    raise AssertionError("the app is not called by these tests")


def _body(response: tuple[int, list[tuple[str, str]], bytes]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response[2])
    return body


def _headers(response: tuple[int, list[tuple[str, str]], bytes]) -> dict[str, str]:
    return dict(response[1])


# --- path patterns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/pages/*", "/pages/1", True),
        ("/pages/*", "/pages/abc-def", True),
        ("/pages/*", "/pages/1/blocks", False),
        ("/pages/*/blocks", "/pages/7/blocks", True),
        ("/pages/*/blocks", "/pages/7/8/blocks", False),
        ("/static/**", "/static/css/site/main.css", True),
        ("/static/**", "/static/", True),
        ("/static/**", "/staticfile", False),
        ("/a/**/z", "/a/b/c/d/z", True),
    ],
)
def test_star_is_one_segment_double_star_any(pattern: str, path: str, matches: bool) -> None:
    """``*`` stays within one path segment; ``**`` crosses segments."""
    assert bool(compile_path(pattern).match(path)) is matches


@pytest.mark.parametrize(
    "pattern", ["/pages/{id}", "/pages/{id:int}", "/pages/<int:id>", "/pages/<id>"]
)
def test_route_parameters_match_one_non_empty_segment(pattern: str) -> None:
    """Starlette and Flask style parameters match exactly one non-empty segment."""
    regex = compile_path(pattern)
    assert regex.match("/pages/42")
    assert regex.match("/pages/not-a-number")  # converters are not enforced, only shape
    assert not regex.match("/pages/")
    assert not regex.match("/pages/4/2")


@pytest.mark.parametrize(
    ("pattern", "other"),
    [
        ("/file.json", "/fileXjson"),
        ("/a+b", "/aab"),
        ("/(x)", "/x"),
        ("/a|b", "/a"),
        ("/price$", "/price"),
        ("/q?x", "/qx"),
        ("/[ab]", "/a"),
    ],
)
def test_regex_metacharacters_are_literal(pattern: str, other: str) -> None:
    """Everything but the pattern tokens is literal: dots and regex syntax match themselves."""
    regex = compile_path(pattern)
    assert regex.match(pattern)
    assert not regex.match(other)


def test_patterns_match_the_whole_path() -> None:
    """A pattern is anchored at both ends: a prefix or a longer path does not match."""
    regex = compile_path("/healthz")
    assert regex.match("/healthz")
    assert not regex.match("/healthzz")
    assert not regex.match("/healthz/")
    assert not regex.match("/x/healthz")


@pytest.mark.parametrize("pattern", ["pages/*", "", "*", "**", "{id}", " /pages"])
def test_pattern_must_start_with_slash(pattern: str) -> None:
    """A pattern that does not start with '/' is a configuration error."""
    with pytest.raises(ConfigurationError, match="must start with '/'"):
        compile_path(pattern)


def test_path_matcher_literals_and_patterns() -> None:
    """A matcher holds literal paths and patterns; both are matched in full."""
    matcher = PathMatcher(["/healthz", "/metrics/**", "/pages/{id}"])
    assert matcher
    assert matcher.matches("/healthz")
    assert matcher.matches("/metrics/")
    assert matcher.matches("/metrics/a/b")
    assert matcher.matches("/pages/1")
    assert not matcher.matches("/pages/1/2")
    assert not matcher.matches("/healthz/x")


def test_path_matcher_takes_a_single_string() -> None:
    """A lone string is one pattern, not a sequence of one-character patterns."""
    matcher = PathMatcher("/healthz")
    assert matcher.matches("/healthz")
    assert not matcher.matches("/")


def test_empty_path_matcher_is_false() -> None:
    """An empty matcher is falsy (the middleware skips it) and matches nothing."""
    matcher = PathMatcher()
    assert not matcher
    assert not matcher.matches("/")


def test_path_matcher_validates_literal_paths() -> None:
    """A literal path is validated like a pattern."""
    with pytest.raises(ConfigurationError):
        PathMatcher(["healthz"])


_SEGMENT = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_characters="/*{}<>", exclude_categories=("Cs", "Cc")
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_literal_paths_match_themselves(segments: list[str]) -> None:
    """Any path without pattern tokens compiles to a regex matching exactly itself."""
    path = "/" + "/".join(segments)
    regex = compile_path(path)
    assert regex.match(path)
    assert not regex.match(path + "x")
    assert PathMatcher([path]).matches(path)


# --- Content-Length -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5),
        (b"5", 5),
        ("0", 0),
        (" 5 ", 5),
        ("5, 5", 5),
        ("5,5,5", 5),
        ("9" * 19, int("9" * 19)),
        ("007", 7),
        (None, None),
    ],
)
def test_content_length_valid(value: str | bytes | None, expected: int | None) -> None:
    """Decimal lengths parse; equal repeated values (joined by commas) are one length."""
    assert parse_content_length(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "5, 6",
        "5,",
        "-1",
        "+5",
        "",
        " ",
        "5 5",
        "0x10",
        "1e3",
        "5.0",
        "1" * 30,
        "9" * 20,
        "\uff15",  # fullwidth digit five: str.isdigit() says yes
        "\u0663",  # Arabic-Indic digit three
        "\u00b2",  # superscript two
        "1\u00a0",  # a digit and a no-break space
        b"\xff",
        b"5\x00",
    ],
)
def test_content_length_refused(value: str | bytes) -> None:
    """Conflicting, signed, non-decimal, non-ASCII and absurdly long values are refused."""
    with pytest.raises(MalformedBody):
        parse_content_length(value)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40)))
def test_content_length_only_raises_malformed_body(value: str | bytes) -> None:
    """For any input the parser returns a non-negative int or raises MalformedBody."""
    try:
        length = parse_content_length(value)
    except MalformedBody:
        return
    assert isinstance(length, int)
    assert length >= 0


# --- JSON bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [JSON, "application/json; charset=utf-8", "Application/JSON", " application/json ;q=1"],
)
def test_json_body_parses(content_type: str) -> None:
    """A JSON body with the JSON media type (any parameters, any case) parses."""
    assert parse_json_body(b'{"title": "x", "n": [1, 2.5]}', content_type) == {
        "title": "x",
        "n": [1, 2.5],
    }


def test_json_body_accepts_text() -> None:
    """An already decoded body is accepted as well."""
    assert parse_json_body('["\u00e9"]', JSON) == ["\u00e9"]


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/jsonx", PATCH])
def test_json_body_wrong_media_type_is_415(content_type: str | None) -> None:
    """Another (or no) media type is 415, naming the accepted ones."""
    with pytest.raises(UnsupportedMediaType) as info:
        parse_json_body(b"{}", content_type)
    assert info.value.accept_patch == (JSON,)


def test_json_body_any_media_type_when_none() -> None:
    """``media_types=None`` accepts any content type."""
    assert parse_json_body(b"[1]", "text/plain", media_types=None) == [1]


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe{}",
        b'{"a": "\xc3"}',
        b"",
        b"   \n\t",
        b"{",
        b"{'a': 1}",
        b"NaN",
        b"[Infinity]",
        b'{"x": -Infinity}',
        b"[1, 2,]",
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
    ],
)
def test_json_body_malformed_is_400(body: bytes) -> None:
    """Bodies that are not UTF-8 JSON (NaN and Infinity included) are MalformedBody."""
    with pytest.raises(MalformedBody):
        parse_json_body(body, JSON)


@pytest.mark.parametrize("body", [b"1e999", b"[-1e400]", b'{"x": 1E+309}'])
def test_json_body_out_of_range_float_is_400(body: bytes) -> None:
    """A number too large for a float is refused, not turned into infinity."""
    with pytest.raises(MalformedBody):
        parse_json_body(body, JSON)


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000]
)
def test_json_body_deep_nesting_is_400_not_recursion_error(body: bytes) -> None:
    """100,000 levels of nesting is MalformedBody, never a RecursionError (a 500)."""
    with pytest.raises(MalformedBody):
        parse_json_body(body, JSON)


def test_json_body_huge_integer_is_400() -> None:
    """A 5,000-digit integer (over the interpreter's conversion limit) is MalformedBody."""
    with pytest.raises(MalformedBody):
        parse_json_body(b"[" + b"7" * 5000 + b"]", JSON)


def test_malformed_body_does_not_echo_the_body() -> None:
    """The error says what is wrong without quoting the body."""
    with pytest.raises(MalformedBody) as info:
        parse_json_body(b'{"password": "hunter2"', JSON)
    assert "hunter2" not in str(info.value)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from([JSON, None, "text/plain", "application/json; charset=latin-1", PATCH]),
)
def test_json_body_only_raises_its_errors(body: bytes, content_type: str | None) -> None:
    """For any bytes, parsing returns a value or raises MalformedBody / UnsupportedMediaType."""
    with contextlib.suppress(MalformedBody, UnsupportedMediaType):
        parse_json_body(body, content_type)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}":,0123456789.eE+-tfnaul ', max_size=200))
def test_json_body_only_raises_its_errors_near_json(text: str) -> None:
    """Near-JSON text (brackets, numbers, literals) never raises anything but MalformedBody."""
    with contextlib.suppress(MalformedBody):
        parse_json_body(text.encode(), JSON)


# --- JSON Patch bodies --------------------------------------------------------------------


def test_patch_body_parses_operations() -> None:
    """A JSON Patch body is its list of operations."""
    ops = [{"op": "replace", "path": "/title", "value": "x"}]
    assert parse_patch_body(json.dumps(ops).encode(), PATCH) == ops
    assert parse_patch_body(json.dumps(ops), f"{PATCH}; charset=utf-8") == ops


@pytest.mark.parametrize("content_type", [JSON, None, "application/merge-patch+json"])
def test_patch_body_wrong_media_type_names_accept_patch(content_type: str | None) -> None:
    """A patch in another media type is 415 with the JSON Patch type to put in Accept-Patch."""
    with pytest.raises(UnsupportedMediaType) as info:
        parse_patch_body(b"[]", content_type)
    assert info.value.accept_patch == (PATCH,)
    status, headers, _ = error_response(info.value)
    assert status == 415
    assert dict(headers)["accept-patch"] == PATCH


@pytest.mark.parametrize("body", [b"{}", b'{"op": "add"}', b'"ops"', b"1", b"null"])
def test_patch_body_not_an_array_is_400(body: bytes) -> None:
    """A JSON Patch must be an array; any other JSON value is MalformedBody."""
    with pytest.raises(MalformedBody, match="array"):
        parse_patch_body(body, PATCH)


def test_patch_body_malformed_json_is_400() -> None:
    """A patch body that is not JSON is MalformedBody."""
    with pytest.raises(MalformedBody):
        parse_patch_body(b"[{]", PATCH)


# --- problem+json -------------------------------------------------------------------------


def test_problem_response_shape() -> None:
    """A problem response has the RFC 9457 members, its media type and a correct length."""
    response = problem_response(404, "Not found", "page 3 does not exist")
    status, _, body = response
    assert status == 404
    assert _headers(response)["content-type"] == PROBLEM_JSON
    assert _headers(response)["content-length"] == str(len(body))
    assert _body(response) == {
        "type": "about:blank",
        "title": "Not found",
        "status": 404,
        "detail": "page 3 does not exist",
    }


def test_problem_response_without_detail() -> None:
    """No detail, no ``detail`` member."""
    assert "detail" not in _body(problem_response(400, "Bad request"))


def test_problem_response_extra_members_cannot_override_core() -> None:
    """Extension members are added but cannot replace ``status``, ``title`` or ``type``."""
    body = _body(
        problem_response(
            409, "Conflict", extra={"status": 200, "title": "fine", "type": "x", "version": 4}
        )
    )
    assert (body["status"], body["title"], body["type"]) == (409, "Conflict", "about:blank")
    assert body["version"] == 4


def test_problem_response_unencodable_and_huge_members() -> None:
    """Non-JSON values become short text; values over the size cap are left out."""
    body = _body(
        problem_response(
            400,
            "Bad",
            extra={
                "nan": float("nan"),
                "obj": {1, 2},
                "huge": "x" * 5000,
                "huge_list": list(range(2000)),
                "ok": [1, 2],
            },
        )
    )
    assert body["nan"] == "nan"
    assert isinstance(body["obj"], str)
    assert "huge" not in body
    assert "huge_list" not in body
    assert body["ok"] == [1, 2]


def test_problem_response_extra_headers() -> None:
    """Given headers are sent after the content headers."""
    response = problem_response(405, "Method not allowed", headers=[("allow", "GET")])
    assert response[1][-1] == ("allow", "GET")


def test_error_response_conflict_carries_versions() -> None:
    """A ConflictError is 409 with the entity, key and both versions."""
    response = error_response(ConflictError("page", 7, expected_version=3, current_version=5))
    assert response[0] == 409
    assert _headers(response)["content-type"] == PROBLEM_JSON
    body = _body(response)
    assert body["status"] == 409
    assert body["title"] == "Edit conflict"
    assert (body["expected_version"], body["current_version"]) == (3, 5)
    assert (body["entity"], body["key"]) == ("page", 7)
    assert "expected version 3" in body["detail"]


def test_error_response_patch_error_carries_op_index() -> None:
    """A patch error is 422 with the failing operation's index and the operation."""
    op = {"op": "move", "from": "/a", "path": "/a/b"}
    body = _body(error_response(InvalidPatch("cannot move into itself", op_index=2, op=op)))
    assert body["status"] == 422
    assert body["op_index"] == 2
    assert body["op"] == op
    assert body["reason"] == "cannot move into itself"


def test_error_response_huge_op_is_left_out() -> None:
    """A huge echoed operation is left out of the body; its index stays."""
    op = {"op": "add", "path": "/x", "value": "v" * 100_000}
    response = error_response(PatchConflict("clash", op_index=0, op=op, block_id="b1"))
    body = _body(response)
    assert response[0] == 409
    assert "op" not in body
    assert body["op_index"] == 0
    assert body["block_id"] == "b1"
    assert len(response[2]) < 2000


def test_error_response_rate_limit_from_a_decision_carries_headers() -> None:
    """A denial from a limiter brings its Retry-After and rate-limit headers."""
    import asyncio

    async def deny() -> RateLimitExceeded:
        limiter = AsyncRateLimiter("1/minute", clock=FakeClock())
        await limiter.hit("k")
        return (await limiter.hit("k")).exceeded()

    response = error_response(asyncio.run(deny()))
    headers = _headers(response)
    assert response[0] == 429
    assert int(headers["retry-after"]) >= 60
    assert headers["x-ratelimit-limit"] == "1"
    assert headers["x-ratelimit-remaining"] == "0"
    assert "x-ratelimit-reset" in headers
    assert "ratelimit" in headers
    assert "ratelimit-policy" in headers
    assert _body(response)["limit"] == "1/60s"


@pytest.mark.parametrize(
    ("retry_after", "header"), [(2.2, "3"), (0.0, "1"), (0.4, "1"), (60, "60")]
)
def test_error_response_rate_limit_without_headers_gets_retry_after(
    retry_after: float, header: str
) -> None:
    """A bare RateLimitExceeded still gets Retry-After: whole seconds, at least 1."""
    headers = _headers(error_response(RateLimitExceeded("k", retry_after)))
    assert headers["retry-after"] == header


def test_error_response_rate_limit_keeps_its_retry_after() -> None:
    """A Retry-After the error already carries is sent once, unchanged."""
    response = error_response(RateLimitExceeded("k", 9.0, headers={"Retry-After": "12"}))
    assert [value for name, value in response[1] if name == "retry-after"] == ["12"]


def test_error_response_unsupported_media_type_accept_patch() -> None:
    """415 carries Accept-Patch listing every accepted type."""
    exc = UnsupportedMediaType("text/plain", (PATCH, "application/merge-patch+json"))
    response = error_response(exc)
    assert response[0] == 415
    assert _headers(response)["accept-patch"] == f"{PATCH}, application/merge-patch+json"
    assert _body(response)["media_type"] == "text/plain"


@pytest.mark.parametrize(
    "exc",
    [
        BackendUnavailable("redis", "connection to secret-db.internal:6379 refused"),
        ConfigurationError("secret-db.internal password=hunter2"),
        HardeningError("secret-db.internal"),
    ],
)
def test_error_response_5xx_hides_the_message(exc: HardeningError) -> None:
    """Server errors show their title as the detail, never the message (hosts, internals)."""
    response = error_response(exc)
    body = _body(response)
    assert response[0] >= 500
    assert body["detail"] == body["title"]
    assert b"secret-db" not in response[2]
    assert b"hunter2" not in response[2]


def test_error_response_4xx_shows_the_message() -> None:
    """Client errors explain themselves in the detail."""
    body = _body(error_response(PreconditionFailed('"v1"', '"v2"')))
    assert body["status"] == 412
    assert "If-Match" in body["detail"]
    assert body["current_etag"] == '"v2"'


def test_error_response_payload_too_large() -> None:
    """413 names the limit, not how much was sent."""
    body = _body(error_response(PayloadTooLarge(100, 10**9)))
    assert body["status"] == 413
    assert body["max_bytes"] == 100
    assert "received" not in body


# --- the rate-limit plan (as the middleware builds it) --------------------------------------


def _plan(limiter: Any = "10/minute", **options: Any) -> Any:
    return RateLimitMiddleware(_app, limiter, **options).plan


def test_plan_string_limiter_builds_a_memory_limiter() -> None:
    """A limits string builds an in-memory AsyncRateLimiter."""
    plan = _plan("3/minute")
    assert isinstance(plan.limiter, AsyncRateLimiter)
    assert [str(limit) for limit in plan.limiter.limits] == ["3/60s"]


def test_plan_rules_first_then_main_limiter() -> None:
    """A request gets every matching rule's hit, then the main limiter's."""
    plan = _plan(rules={"PATCH /pages/*": "2/minute", "* /pages/**": "50/minute"})
    request = RequestInfo(method="PATCH", path="/pages/1", client="198.51.100.1")
    hits = plan.checks(request)
    assert len(hits) == 3
    assert hits[-1][0] is plan.limiter
    assert [hit[1] for hit in hits] == ["ip:198.51.100.1"] * 3
    assert plan.checks(RequestInfo(method="GET", path="/pages/1"))[0][0] is hits[1][0]
    assert len(plan.checks(RequestInfo(method="GET", path="/other"))) == 1


@pytest.mark.parametrize(
    ("pattern", "method", "applies"),
    [
        ("PATCH /pages/*", "PATCH", True),
        ("PATCH /pages/*", "GET", False),
        ("patch /pages/*", "PATCH", True),
        ("GET,POST /pages/*", "POST", True),
        ("GET, POST /pages/*", "DELETE", False),
        ("* /pages/*", "DELETE", True),
        ("/pages/*", "OPTIONS", True),
    ],
)
def test_plan_rule_methods(pattern: str, method: str, applies: bool) -> None:
    """A rule's methods are optional, comma separated, case-insensitive; ``*`` is any."""
    plan = _plan(None, rules={pattern: "1/minute"})
    assert bool(plan.checks(RequestInfo(method=method, path="/pages/9"))) is applies


def test_plan_rule_limiters_are_derived_with_own_names() -> None:
    """A rule given a limits string derives a limiter named after the rule."""
    main = AsyncRateLimiter("10/minute", clock=FakeClock(), key_prefix="app")
    plan = _plan(main, rules=[RateLimitRule("PATCH /pages/*", "2/minute", name="page-edits")])
    limiter = plan.rules[0].limiter
    assert limiter is not main
    assert limiter.name == "page-edits"
    assert limiter.key_prefix == "app:page-edits"
    assert limiter.clock is main.clock


def test_plan_rule_with_its_own_limiter_and_key() -> None:
    """A rule may bring its own limiter and key function."""
    own = AsyncRateLimiter("1/minute", clock=FakeClock())
    rule = RateLimitRule("POST /comments", own, key=user_key(lambda r: r.headers.get("x-user")))
    plan = _plan(None, rules=[rule])
    (hit,) = plan.checks(RequestInfo("POST", "/comments", "192.0.2.1", {"x-user": "ann"}))
    assert hit[0] is own
    assert hit[1] == "user:ann"
    (anonymous,) = plan.checks(RequestInfo("POST", "/comments", "192.0.2.1", {}))
    assert anonymous[1] == "ip:192.0.2.1"


def test_plan_key_none_falls_back_to_ip() -> None:
    """A key function giving None (anonymous) falls back to the client IP."""
    plan = _plan(key=lambda request: None)
    assert plan.checks(RequestInfo(client="192.0.2.5"))[0][1] == "ip:192.0.2.5"


def test_plan_cost_and_tier_functions() -> None:
    """Cost and tier may be functions of the request; rules may override them."""
    plan = _plan(
        cost=lambda r: 5 if r.method == "POST" else 1,
        tier=lambda r: r.headers.get("x-tier"),
        rules=[RateLimitRule("/upload", "10/minute", cost=3, tier="pro")],
    )
    post = RequestInfo("POST", "/upload", "192.0.2.1", {"x-tier": "free"})
    rule_hit, main_hit = plan.checks(post)
    assert (rule_hit[2], rule_hit[3]) == (3, "pro")
    assert (main_hit[2], main_hit[3]) == (5, "free")


@pytest.mark.parametrize(
    "options",
    [
        {"cost": 0},
        {"cost": -1},
        {"cost": True},
        {"cost": 1.5},
        {"tier": 3},
        {"bypass": "short-token"},
        {"bypass": 12345},
        {"rules": ["PATCH /x"]},
        {"rules": {"PATCH x/*": "1/minute"}},
        {"rules": {"/x": "not a limit"}},
        {"exempt_paths": ["healthz"]},
        {"trusted_proxies": ["not-an-ip"]},
    ],
)
def test_plan_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    """Invalid options fail when the middleware is built, not per request."""
    with pytest.raises(ConfigurationError):
        _plan(**options)


def test_plan_bypass_token_compare() -> None:
    """The bypass token passes in its header or as a bearer token, and only exactly."""
    token = "0123456789abcdef-admin"
    plan = _plan(bypass=token)
    assert plan.token_bypasses(token, None)
    assert plan.token_bypasses(f"  {token} ", None)
    assert plan.token_bypasses(None, f"Bearer {token}")
    assert plan.token_bypasses(None, f"bearer {token}")
    assert not plan.token_bypasses(token[:-1], None)
    assert not plan.token_bypasses(None, f"Basic {token}")
    assert not plan.token_bypasses(None, None)
    assert not plan.token_bypasses("", "")


def test_plan_bypass_token_must_be_long() -> None:
    """A bypass token under 16 characters is refused; 16 is enough."""
    with pytest.raises(ConfigurationError, match="16"):
        _plan(bypass="x" * 15)
    assert _plan(bypass="x" * 16).bypass_token == b"x" * 16
