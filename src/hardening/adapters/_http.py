"""Framework-free HTTP pieces the ASGI and WSGI adapters share.

Errors to RFC 9457 problem+json, request views for key functions, path patterns, the
rate-limit plan (which limiters, keys, costs and tiers apply to a request), ``Content-Length``
parsing, JSON and JSON Patch bodies, bearer-token checks and health-check reports. Nothing here
does I/O; the adapters only wire these to ``scope``/``receive``/``send`` or to ``environ``.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from hardening._sql import unavailable_from
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    HardeningError,
    MalformedBody,
    RateLimitExceeded,
    UnsupportedMediaType,
)
from hardening.ratelimit.keys import KeyFunc, RequestInfo, TrustedProxies, ip_key
from hardening.ratelimit.policy import LimitsSpec, RateLimitDecision

__all__ = [
    "PROBLEM_JSON",
    "HealthReport",
    "PathMatcher",
    "RateLimitRule",
    "answerable",
    "error_response",
    "parse_content_length",
    "parse_json_body",
    "parse_patch_body",
    "problem_response",
]

PROBLEM_JSON = "application/problem+json"
JSON_PATCH = "application/json-patch+json"
HeaderList = list[tuple[str, str]]
L = TypeVar("L")

_MAX_DETAIL_JSON = 1024  # a detail value larger than this (e.g. an echoed op) is left out


# --- problem+json -------------------------------------------------------------------------


def _json_safe(value: object) -> object:
    """``value`` if it encodes as JSON within the size cap, else its short text (or drop)."""
    try:
        text = json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(str(value)[:_MAX_DETAIL_JSON])
        value = json.loads(text)
    return value if len(text) <= _MAX_DETAIL_JSON else None


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    extra: Mapping[str, object] | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> tuple[int, HeaderList, bytes]:
    """An RFC 9457 ``application/problem+json`` response.

    Args:
        status: the HTTP status.
        title: the problem's short, stable summary.
        detail: a human-readable explanation for this occurrence.
        extra: extension members (JSON-encodable values; large ones are left out).
        headers: more response headers.

    Returns:
        ``(status, headers, body)``; headers include ``Content-Type`` and ``Content-Length``.
    """
    problem: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        problem["detail"] = detail
    for name, value in (extra or {}).items():
        if name not in problem and (safe := _json_safe(value)) is not None:
            problem[name] = safe
    body = json.dumps(problem, separators=(",", ":"), default=str).encode()
    response_headers = [
        ("content-type", PROBLEM_JSON),
        ("content-length", str(len(body))),
        *headers,
    ]
    return status, response_headers, body


def answerable(exc: Exception, errors: type[HardeningError]) -> HardeningError | None:
    """The error to answer for ``exc``, or ``None`` to let it propagate.

    An error of type ``errors``; and, where every ``hardening`` error is answered, an outage
    raised by a driver in the app's own code (SQLAlchemy's operational errors, redis-py's
    connection errors and timeouts), as :class:`~hardening.BackendUnavailable`: a store that is
    down is a 503 for the client, not a 500, whichever code happened to meet it.

    Args:
        exc: what the app raised.
        errors: the error type the middleware answers.

    Returns:
        The error to answer with, or ``None``.
    """
    if isinstance(exc, errors):
        return exc
    if errors is not HardeningError:
        return None
    unavailable = unavailable_from(exc)
    if unavailable is not None:
        return unavailable
    names = {cls.__name__ for cls in type(exc).__mro__}
    if type(exc).__module__.startswith("redis") and names & {"ConnectionError", "TimeoutError"}:
        return BackendUnavailable("redis", type(exc).__name__)
    return None


def error_response(exc: HardeningError) -> tuple[int, HeaderList, bytes]:
    """The problem+json response for a ``hardening`` error, with the headers it implies.

    ``RateLimitExceeded`` brings its ``Retry-After`` and rate-limit headers,
    ``BackendUnavailable`` a ``Retry-After`` when it knows its breaker's window,
    ``UnsupportedMediaType`` an ``Accept-Patch``. Server errors (5xx) show their title, not
    their message, which may name hosts or internals.

    Args:
        exc: the error.

    Returns:
        ``(status, headers, body)``.
    """
    status = exc.http_status
    headers: HeaderList = []
    if isinstance(exc, RateLimitExceeded):
        headers.extend((name.lower(), value) for name, value in exc.headers.items())
        if not any(name == "retry-after" for name, _ in headers):
            headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    elif isinstance(exc, BackendUnavailable) and exc.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    elif isinstance(exc, UnsupportedMediaType):
        headers.append(("accept-patch", ", ".join(exc.accept_patch)))
    detail = exc.title if status >= 500 else str(exc)
    return problem_response(status, exc.title, detail, extra=exc.details(), headers=headers)


# --- request views ----------------------------------------------------------------------


class ASGIHeaders(Mapping[str, str]):
    """A read-only ``Mapping`` over an ASGI header list; names lower case, repeats joined.

    Lookups scan the raw list (a few entries) instead of building a dict per request.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        wanted = name.lower().encode("latin-1", "replace")
        values = [value.decode("latin-1") for key, value in self._raw if key.lower() == wanted]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key.decode("latin-1").lower() for key, _ in self._raw))

    def __len__(self) -> int:
        return len({key.lower() for key, _ in self._raw})


class EnvironHeaders(Mapping[str, str]):
    """A read-only ``Mapping`` of header name (lower case) to value over a WSGI environ."""

    __slots__ = ("_environ",)

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._environ = environ

    @staticmethod
    def _key(name: str) -> str:
        key = name.upper().replace("-", "_")
        return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key

    def __getitem__(self, name: str) -> str:
        value = self._environ.get(self._key(name))
        if not isinstance(value, str):
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        for key, value in self._environ.items():
            if not isinstance(value, str):
                continue
            if key.startswith("HTTP_"):
                yield key[5:].replace("_", "-").lower()
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                yield key.replace("_", "-").lower()

    def __len__(self) -> int:
        return sum(1 for _ in self)


def asgi_request_info(scope: Mapping[str, Any]) -> RequestInfo:
    """The :class:`~hardening.RequestInfo` of an ASGI HTTP scope."""
    client = scope.get("client")
    return RequestInfo(
        method=scope.get("method", "GET"),
        path=scope.get("path", "/"),
        client=client[0] if client else None,
        headers=ASGIHeaders(scope.get("headers") or ()),
    )


def wsgi_path(environ: Mapping[str, Any]) -> str:
    """``PATH_INFO`` as the text a client meant: PEP 3333 bytes-as-latin-1, read as UTF-8."""
    raw = environ.get("PATH_INFO") or "/"
    try:
        return str(raw.encode("latin-1").decode("utf-8", "replace"))
    except UnicodeEncodeError:  # a server that already decoded it
        return str(raw)


def wsgi_request_info(environ: Mapping[str, Any]) -> RequestInfo:
    """The :class:`~hardening.RequestInfo` of a WSGI environ."""
    return RequestInfo(
        method=environ.get("REQUEST_METHOD", "GET"),
        path=wsgi_path(environ),
        client=environ.get("REMOTE_ADDR") or None,
        headers=EnvironHeaders(environ),
    )


# --- path patterns ------------------------------------------------------------------------

_PATTERN_TOKEN = re.compile(r"\*\*|\*|\{[^{}/]+\}|<[^<>/]+>")


def compile_path(pattern: str) -> re.Pattern[str]:
    """Compile a path pattern to a regex.

    ``*`` matches within one path segment, ``**`` matches across segments, and route
    parameters in Starlette (``{id}``, ``{id:int}``) or Flask (``<id>``, ``<int:id>``) style
    match one non-empty segment. Everything else is literal.
    """
    if not pattern.startswith("/"):
        raise ConfigurationError(f"path pattern must start with '/': {pattern!r}")
    parts: list[str] = []
    position = 0
    for match in _PATTERN_TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[position : match.start()]))
        token = match.group()
        parts.append(".*" if token == "**" else "[^/]*" if token == "*" else "[^/]+")
        position = match.end()
    parts.append(re.escape(pattern[position:]))
    return re.compile("".join(parts) + r"\Z")


class PathMatcher:
    """A set of path patterns (see :func:`compile_path`); literal paths cost one set lookup."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        if isinstance(patterns, str):
            patterns = (patterns,)
        exact: set[str] = set()
        compiled: list[re.Pattern[str]] = []
        for pattern in patterns:
            if _PATTERN_TOKEN.search(pattern):
                compiled.append(compile_path(pattern))
            else:
                compile_path(pattern)  # the same validation
                exact.add(pattern)
        self._exact = frozenset(exact)
        self._patterns = tuple(compiled)

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def matches(self, path: str) -> bool:
        """Return whether ``path`` matches one of the patterns."""
        if path in self._exact:
            return True
        return any(pattern.match(path) for pattern in self._patterns)


# --- rate-limit plan ----------------------------------------------------------------------

Cost = int | Callable[[RequestInfo], int]
Tier = str | Callable[[RequestInfo], "str | None"] | None


@dataclass(frozen=True)
class RateLimitRule:
    """Extra limits for the requests whose method and path match a pattern.

    Args:
        pattern: ``"PATCH /pages/*"``: optional methods (comma separated, or ``*``) then a path
            pattern (``*`` one segment, ``**`` any, ``{param}`` / ``<param>`` one segment).
        limits: limits such as ``"30/minute"`` (a limiter sharing the middleware limiter's
            storage is derived, with its own counters), or a limiter of its own.
        key: the key function for this rule; defaults to the middleware's ``key``.
        cost: the cost (or a function of the request) for this rule; defaults to the
            middleware's ``cost``.
        tier: the tier (or a function of the request) for this rule; defaults to the
            middleware's ``tier``.
        name: the derived limiter's name in metrics and key prefixes; defaults to ``pattern``.
    """

    pattern: str
    limits: LimitsSpec | object
    key: KeyFunc | None = None
    cost: Cost | None = None
    tier: Tier = None
    name: str | None = None


@dataclass(frozen=True)
class _CompiledRule(Generic[L]):
    methods: frozenset[str] | None
    path: re.Pattern[str]
    limiter: L
    key: KeyFunc
    cost: Callable[[RequestInfo], int]
    tier: Callable[[RequestInfo], str | None]

    def applies(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and bool(self.path.match(path))


def _cost_func(cost: Cost) -> Callable[[RequestInfo], int]:
    if callable(cost):
        return cost
    if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
        raise ConfigurationError(f"cost must be a positive integer or a callable, not {cost!r}")
    return lambda _request: cost


def _tier_func(tier: Tier) -> Callable[[RequestInfo], str | None]:
    if tier is None or isinstance(tier, str):
        return lambda _request: tier
    if callable(tier):
        return tier
    raise ConfigurationError(f"tier must be a string, a callable or None, not {tier!r}")


def _split_rule(pattern: str) -> tuple[frozenset[str] | None, re.Pattern[str]]:
    method, _, path = pattern.strip().rpartition(" ")
    method = method.strip()
    methods = (
        None
        if method in ("", "*")
        else frozenset(m.strip().upper() for m in method.split(",") if m.strip())
    )
    return methods, compile_path(path)


class RateLimitPlan(Generic[L]):
    """Which limiters, keys, costs and tiers apply to a request; shared by both adapters.

    Args:
        limiter: the limiter for every request (or ``None`` for rules only).
        limiter_type: the limiter class the adapter drives (async or blocking).
        key, cost, tier, rules, bypass, bypass_header, exempt_paths, trusted_proxies: as for
            the middleware.
    """

    def __init__(
        self,
        limiter: L | str | None,
        limiter_type: type[L],
        *,
        key: KeyFunc | None,
        cost: Cost,
        tier: Tier,
        rules: Mapping[str, object] | Iterable[RateLimitRule],
        bypass: str | Callable[[RequestInfo], object] | None,
        bypass_header: str,
        exempt_paths: Iterable[str],
        trusted_proxies: TrustedProxies | Iterable[str],
    ) -> None:
        if isinstance(limiter, str):
            limiter = cast(Any, limiter_type)(limiter)
        if limiter is not None and not isinstance(limiter, limiter_type):
            raise ConfigurationError(
                f"this middleware drives a {limiter_type.__name__}, not {type(limiter).__name__}"
            )
        self.limiter: L | None = limiter
        self.fallback_key = ip_key(trusted_proxies)
        self.key: KeyFunc = key or self.fallback_key
        self.cost = _cost_func(cost)
        self.tier = _tier_func(tier)
        self.exempt = PathMatcher(exempt_paths)
        self.bypass_token: bytes | None = None
        self.bypass_func: Callable[[RequestInfo], object] | None = None
        if isinstance(bypass, str):
            if len(bypass) < 16:
                raise ConfigurationError("a bypass token must be at least 16 characters")
            self.bypass_token = bypass.encode()
        elif callable(bypass):
            self.bypass_func = bypass
        elif bypass is not None:
            raise ConfigurationError(f"bypass must be a token, a callable or None: {bypass!r}")
        self.bypass_header = bypass_header.lower()
        self.rules: tuple[_CompiledRule[L], ...] = tuple(
            self._compile(rule, limiter_type) for rule in _rule_list(rules)
        )

    def _compile(self, rule: RateLimitRule, limiter_type: type[L]) -> _CompiledRule[L]:
        methods, path = _split_rule(rule.pattern)
        if isinstance(rule.limits, limiter_type):
            limiter = rule.limits
        elif hasattr(rule.limits, "hit"):  # a limiter of the other kind (async vs blocking)
            raise ConfigurationError(
                f"rule {rule.pattern!r}: this middleware drives a {limiter_type.__name__}, "
                f"not {type(rule.limits).__name__}"
            )
        elif self.limiter is not None:
            derive = getattr(self.limiter, "with_limits")  # noqa: B009 - L is a type variable
            limiter = derive(rule.limits, name=rule.name or rule.pattern)
        else:
            limiter = cast(Any, limiter_type)(rule.limits, name=rule.name or rule.pattern)
        return _CompiledRule(
            methods=methods,
            path=path,
            limiter=limiter,
            key=rule.key or self.key,
            cost=self.cost if rule.cost is None else _cost_func(rule.cost),
            tier=self.tier if rule.tier is None else _tier_func(rule.tier),
        )

    def token_bypasses(self, header: str | None, authorization: str | None) -> bool:
        """Whether the bypass header or an ``Authorization: Bearer`` carries the token.

        Compared with :func:`hmac.compare_digest`: the time taken does not tell how much of a
        guess was right.
        """
        token = self.bypass_token
        if token is None:
            return False
        header_ok = header is not None and hmac.compare_digest(
            header.strip().encode("latin-1", "replace"), token
        )
        return bearer_ok(authorization, token) or header_ok

    def checks(self, request: RequestInfo) -> list[tuple[L, str, int, str | None]]:
        """The hits a request needs: ``(limiter, key, cost, tier)``, rules first."""
        hits: list[tuple[L, str, int, str | None]] = []
        for rule in self.rules:
            if rule.applies(request.method, request.path):
                key = rule.key(request) or self.fallback_key(request) or "unknown"
                hits.append((rule.limiter, key, rule.cost(request), rule.tier(request)))
        if self.limiter is not None:
            key = self.key(request) or self.fallback_key(request) or "unknown"
            hits.append((self.limiter, key, self.cost(request), self.tier(request)))
        return hits


def _rule_list(rules: Mapping[str, object] | Iterable[RateLimitRule]) -> list[RateLimitRule]:
    if isinstance(rules, Mapping):
        return [RateLimitRule(pattern, limits) for pattern, limits in rules.items()]
    listed = list(rules)
    for rule in listed:
        if not isinstance(rule, RateLimitRule):
            raise ConfigurationError(f"rules must be RateLimitRule items, not {rule!r}")
    return listed


def binding_headers(decisions: Sequence[RateLimitDecision]) -> HeaderList:
    """The headers of the decision with the least left, for an allowed response."""
    if len(decisions) == 1:
        tightest = decisions[0]
    else:
        limited = [d for d in decisions if d.limit is not None]
        if not limited:
            return []
        tightest = min(limited, key=lambda d: d.remaining / max(d.limit or 1, 1))
    return [(_LOWER.get(name) or name.lower(), value) for name, value in tightest.headers().items()]


_LOWER = {
    name: name.lower()
    for name in (
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "RateLimit-Policy",
        "RateLimit",
        "Retry-After",
    )
}


# --- bodies -------------------------------------------------------------------------------


def parse_content_length(value: str | bytes | None) -> int | None:
    """Parse a ``Content-Length`` header value (RFC 9110 §8.6).

    Args:
        value: the header value; repeated headers joined with commas are allowed when equal.

    Returns:
        The length, or ``None`` when there is no header.

    Raises:
        MalformedBody: the value is not a non-negative decimal integer (HTTP 400).
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    parts = {part.strip(" \t") for part in text.split(",")}  # OWS only, not any Unicode space
    if len(parts) != 1:
        raise MalformedBody("conflicting Content-Length values")
    (part,) = parts
    if not part or len(part) > 19 or not part.isascii() or not part.isdigit():
        raise MalformedBody("Content-Length is not a non-negative integer")
    return int(part)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_json_body(
    body: bytes | str,
    content_type: str | None = None,
    *,
    media_types: Iterable[str] | None = ("application/json",),
) -> Any:
    """Parse a JSON request body, refusing the wrong media type and malformed text.

    Args:
        body: the raw body.
        content_type: the request's ``Content-Type``; parameters such as ``charset`` ignored.
        media_types: the media types accepted (any ``+json`` suffix type is not implied);
            ``None`` accepts any.

    Returns:
        The parsed value.

    Raises:
        UnsupportedMediaType: the media type is not accepted (HTTP 415).
        MalformedBody: the body is not UTF-8 JSON, nests too deep, or has out-of-range numbers
            (HTTP 400).
    """
    if media_types is not None:
        accepted = tuple(media_types)
        if _media_type(content_type) not in accepted:
            raise UnsupportedMediaType(_media_type(content_type) or "(none)", accepted)
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise MalformedBody("the body is not UTF-8") from None
    if not text.strip():
        raise MalformedBody("the body is empty")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise MalformedBody(
            f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise MalformedBody("JSON nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over sys.int_info's digit limit
        raise MalformedBody(str(exc)) from None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 would otherwise parse to infinity
        raise ValueError("a number is out of range")
    return value


def parse_patch_body(body: bytes | str, content_type: str | None) -> list[Any]:
    """Parse an RFC 6902 ``application/json-patch+json`` body into a list of operations.

    The operations' shape is left to :func:`hardening.validate_patch` / ``apply_patch``, which
    raise :class:`~hardening.InvalidPatch` (422) with the failing operation's index.

    Args:
        body: the raw body.
        content_type: the request's ``Content-Type``.

    Returns:
        The operations.

    Raises:
        UnsupportedMediaType: not ``application/json-patch+json`` (415, with ``Accept-Patch``).
        MalformedBody: not JSON, or not a JSON array (400).
    """
    patch = parse_json_body(body, content_type, media_types=(JSON_PATCH,))
    if not isinstance(patch, list):
        raise MalformedBody("a JSON Patch is a JSON array of operations")
    return patch


# --- route templates ----------------------------------------------------------------------

ROUTE_KEY = "hardening.route"


def asgi_route(scope: Mapping[str, Any], root_path: str) -> str | None:
    """The route template the framework matched, read after the call.

    ``scope["hardening.route"]`` when an app set it, else Starlette/FastAPI's
    ``scope["route"]`` (its ``path_format``, behind any ``Mount`` prefix in ``root_path``).
    """
    explicit = scope.get(ROUTE_KEY)
    if isinstance(explicit, str):
        return explicit
    route = scope.get("route")
    if route is None:
        return None
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    mounted = scope.get("root_path", "")
    if isinstance(mounted, str) and mounted.startswith(root_path) and mounted != root_path:
        prefix = mounted[len(root_path) :]
        own = getattr(route, "path", None)
        if hasattr(route, "routes") and isinstance(own, str) and prefix.endswith(own):
            prefix = prefix[: len(prefix) - len(own)]  # a Mount: its path_format repeats it
        template = prefix + template
    return template


def wsgi_route(environ: Mapping[str, Any]) -> str | None:
    """The route template a WSGI framework matched, read after the call.

    ``environ["hardening.route"]`` when an app set it (Flask: ``record_flask_routes``; Django:
    :class:`hardening.adapters.django.RouteMiddleware`), else the ``url_rule`` of a werkzeug
    request still in ``environ["werkzeug.request"]`` (Flask clears it before returning).
    """
    explicit = environ.get(ROUTE_KEY)
    if isinstance(explicit, str):
        return explicit
    request = environ.get("werkzeug.request")
    rule = getattr(request, "url_rule", None)
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) else None


# --- health -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One health check's outcome."""

    name: str
    ok: bool
    seconds: float
    error: str | None = None


class HealthReport:
    """Turns check results into the ``/healthz`` status and JSON body."""

    @staticmethod
    def response(results: Sequence[CheckResult]) -> tuple[int, HeaderList, bytes]:
        """``200`` when every check passed, else ``503``; the body lists each check."""
        ok = all(result.ok for result in results)
        checks: dict[str, dict[str, object]] = {}
        for result in results:
            entry: dict[str, object] = {
                "status": "ok" if result.ok else "fail",
                "duration_ms": round(result.seconds * 1000, 3),
            }
            if result.error:
                entry["error"] = result.error
            checks[result.name] = entry
        body = json.dumps(
            {"status": "ok" if ok else "fail", "checks": checks}, separators=(",", ":")
        ).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        return (200 if ok else 503), headers, body

    @staticmethod
    def outcome(name: str, value: object, seconds: float) -> CheckResult:
        """A check that returned: ``False`` fails it, anything else passes."""
        if value is False:
            return CheckResult(name, False, seconds, "check returned False")
        return CheckResult(name, True, seconds)

    @staticmethod
    def failure(name: str, exc: BaseException, seconds: float) -> CheckResult:
        """A check that raised or timed out: report the error's type, never its message."""
        error = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        return CheckResult(name, False, seconds, error)


def check_names(checks: Mapping[str, object]) -> dict[str, Callable[[], object]]:
    """Validate a ``health_app`` check mapping."""
    resolved: dict[str, Callable[[], object]] = {}
    for name, check in checks.items():
        if not callable(check):
            raise ConfigurationError(f"health check {name!r} is not callable")
        resolved[str(name)] = check
    return resolved


def bearer_ok(authorization: str | None, token: bytes) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries ``token`` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("latin-1", "replace"), token
    )


UNAUTHORIZED = problem_response(
    401,
    "Unauthorized",
    "a bearer token is required",
    headers=[("www-authenticate", 'Bearer realm="metrics"')],
)


def method_not_allowed(allowed: str) -> tuple[int, HeaderList, bytes]:
    """A 405 problem response naming the allowed methods."""
    return problem_response(
        405, "Method not allowed", f"allowed: {allowed}", headers=[("allow", allowed)]
    )
