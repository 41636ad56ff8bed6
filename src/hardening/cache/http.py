"""The framework-free part of the response-cache middleware both adapters share.

Which requests may be answered from the cache and under which key, which responses may be
stored, how a stored response is encoded, its ``ETag`` and conditional ``304``, and which tags
an unsafe request invalidates. Nothing here does I/O: ``hardening.adapters.asgi`` and
``.wsgi`` wire it to ``scope``/``send`` or ``environ``/``start_response``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hardening.cache.policy import TTL, resolve_ttl
from hardening.errors import ConfigurationError

if TYPE_CHECKING:
    from hardening.ratelimit.keys import RequestInfo

__all__ = ["CachedResponse", "ResponseCachePlan", "TagsArg"]

HeaderList = list[tuple[str, str]]
TagsArg = Iterable[str] | Callable[["RequestInfo"], Iterable[str]]
"""Tags: format strings over the path pattern's parameters (``"project:{project_id}"``), or a
function of the request returning tags."""

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOKEN = re.compile(r"\*\*|\*|\{([^{}/:]+)(?::[^{}/]*)?\}|<(?:[^<>/:]+:)?([^<>/:]+)>")
_NO_STORE = re.compile(r"(?:^|,)\s*(?:private|no-store|no-cache)\b", re.IGNORECASE)
# not replayed from the cache: they describe one connection or one response's delivery
_NOT_STORED = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "age", "x-cache"})


def compile_route(pattern: str) -> tuple[re.Pattern[str], frozenset[str]]:
    """Compile a path pattern, capturing its parameters by name.

    ``*`` matches within one segment, ``**`` across segments; ``{name}`` / ``{name:int}``
    (Starlette) and ``<name>`` / ``<int:name>`` (Flask) capture one non-empty segment.

    Returns:
        The regex and the parameter names.

    Raises:
        ConfigurationError: the pattern does not start with ``/`` or repeats a name.
    """
    if not pattern.startswith("/"):
        raise ConfigurationError(f"path pattern must start with '/': {pattern!r}")
    parts: list[str] = []
    names: list[str] = []
    position = 0
    for match in _TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[position : match.start()]))
        name = match.group(1) or match.group(2)
        if name is not None:
            name = name.strip()
            if not name.isidentifier() or name in names:
                raise ConfigurationError(f"bad or repeated parameter {name!r} in {pattern!r}")
            names.append(name)
            parts.append(f"(?P<{name}>[^/]+)")
        else:
            parts.append(".*" if match.group() == "**" else "[^/]*")
        position = match.end()
    parts.append(re.escape(pattern[position:]))
    return re.compile("".join(parts) + r"\Z"), frozenset(names)


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


TagSource = Callable[["RequestInfo"], Iterable[str]] | str


@dataclass(frozen=True)
class _Route:
    methods: frozenset[str] | None
    path: re.Pattern[str]
    tags: tuple[TagSource, ...]  # functions of the request, or format strings over params

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.methods is not None and method not in self.methods:
            return None
        found = self.path.match(path)
        return None if found is None else found.groupdict()

    def tags_for(self, params: Mapping[str, str], request: RequestInfo) -> list[str]:
        found: list[str] = []
        for source in self.tags:
            if isinstance(source, str):
                found.append(source.format(**params))
            else:
                found.extend(source(request))
        return found


def _sources(tags: TagsArg | None, what: str) -> tuple[TagSource, ...]:
    if tags is None:
        return ()
    if callable(tags):
        return (tags,)
    if isinstance(tags, str):
        raise ConfigurationError(f"{what}: tags must be a list or a callable, not {tags!r}")
    return tuple(tags)


def _route(
    pattern: str, tags: tuple[TagSource, ...], *, methods: frozenset[str] | None, what: str
) -> _Route:
    path, params = compile_route(pattern)
    for tag in tags:
        if isinstance(tag, str) and (missing := _fields(tag) - params):
            raise ConfigurationError(
                f"{what}: tag {tag!r} uses {sorted(missing)}, which {pattern!r} does not "
                "capture; give tags per path (paths={pattern: tags}) or use a callable"
            )
    return _Route(methods, path, tags)


def _split_rule(rule: str) -> tuple[frozenset[str] | None, str]:
    method, _, path = rule.strip().rpartition(" ")
    method = method.strip()
    if method in ("", "*"):
        return UNSAFE_METHODS, path
    return frozenset(m.strip().upper() for m in method.split(",") if m.strip()), path


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored response.

    Attributes:
        status: the status code (200).
        headers: the headers to replay, names lower case, ``ETag`` and ``Cache-Control``
            included.
        body: the body.
        etag: the entity tag clients revalidate with.
        stored_at: when it was stored (seconds since the epoch), for ``Age``.
    """

    status: int
    headers: HeaderList
    body: bytes
    etag: str
    stored_at: float

    def to_json(self) -> dict[str, Any]:
        """The JSON-encodable form stored in the cache."""
        return {
            "s": self.status,
            "h": self.headers,
            "b": base64.b64encode(self.body).decode("ascii"),
            "e": self.etag,
            "t": self.stored_at,
        }

    @classmethod
    def from_json(cls, data: object) -> CachedResponse | None:
        """Rebuild a stored response; ``None`` when ``data`` is not one."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                int(data["s"]),
                [(str(name), str(value)) for name, value in data["h"]],
                base64.b64decode(data["b"]),
                str(data["e"]),
                float(data["t"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def etag_of(body: bytes) -> str:
    """A strong entity tag for a body: a 128-bit BLAKE2b digest, quoted."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 §13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


class ResponseCachePlan:
    """What the response-cache middleware caches and invalidates; shared by both adapters.

    Args:
        ttl: how long a response is stored (seconds, ``timedelta`` or a profile name).
        paths: path patterns whose ``GET``/``HEAD`` responses are cached, or a mapping of
            pattern to the tags of its responses.
        tags: tags of every stored response (format strings over the matched pattern's
            parameters, or a function of the request).
        vary: request headers that select different stored responses (lower case).
        private_headers: requests carrying one of these headers are neither answered from
            nor stored in the cache, unless the header is in ``vary`` (then it is part of the
            key: a cache per credential).
        invalidate_on: ``"PUT,PATCH,DELETE /projects/{project_id}/**"`` to the tags such a
            request invalidates when it succeeds (status below 400); methods default to
            POST, PUT, PATCH and DELETE.
        max_body_bytes: larger responses (or ones without ``Content-Length``) are not stored.
        max_age: the ``Cache-Control: max-age`` added when the app set none (seconds);
            ``None`` sends the TTL, 0 sends ``no-cache`` (clients always revalidate, and see
            invalidations at once).
        profiles: the TTL profiles to resolve ``ttl`` with.

    Raises:
        ConfigurationError: a pattern, tag or option is invalid.
    """

    def __init__(
        self,
        *,
        ttl: TTL,
        paths: Iterable[str] | Mapping[str, TagsArg],
        tags: TagsArg | None,
        vary: Iterable[str],
        private_headers: Iterable[str],
        invalidate_on: Mapping[str, TagsArg],
        max_body_bytes: int,
        max_age: float | None,
        profiles: Mapping[str, float],
    ) -> None:
        self.ttl = resolve_ttl(ttl, profiles)
        shared = _sources(tags, "tags")
        if isinstance(paths, str):
            paths = (paths,)
        own: Mapping[str, TagsArg | None] = (
            paths if isinstance(paths, Mapping) else dict.fromkeys(paths)
        )
        self.routes = tuple(
            _route(p, _sources(t, f"paths[{p!r}]") + shared, methods=None, what="tags")
            for p, t in own.items()
        )
        self.vary = tuple(dict.fromkeys(h.lower() for h in vary))
        self.private = tuple(h.lower() for h in private_headers if h.lower() not in self.vary)
        self.invalidations = tuple(
            _route(path, _sources(rule_tags, what), methods=methods, what=what)
            for rule, rule_tags in invalidate_on.items()
            for methods, path in [_split_rule(rule)]
            for what in [f"invalidate_on[{rule!r}]"]
        )
        if not isinstance(max_body_bytes, int) or max_body_bytes < 0:
            raise ConfigurationError(f"max_body_bytes must be >= 0, not {max_body_bytes!r}")
        self.max_body_bytes = max_body_bytes
        age = self.ttl if max_age is None else max_age
        if age < 0:
            raise ConfigurationError(f"max_age must be >= 0, not {max_age!r}")
        self.cache_control = f"max-age={int(age)}" if age >= 1 else "no-cache"

    @classmethod
    def for_cache(cls, cache: Any, **options: Any) -> ResponseCachePlan:
        """A plan for ``cache``: its TTL profiles, and bodies that fit its ``max_value_bytes``.

        Raises:
            ConfigurationError: ``max_body_bytes`` cannot fit the cache's ``max_value_bytes``
                once base64-encoded, or another option is invalid.
        """
        plan = cls(profiles=cache.profiles, **options)
        encoded = 4 * ((plan.max_body_bytes + 2) // 3) + 4096  # base64, headers and framing
        if encoded > cache.max_value_bytes:
            raise ConfigurationError(
                f"max_body_bytes={plan.max_body_bytes} does not fit the cache's "
                f"max_value_bytes={cache.max_value_bytes} (bodies are stored base64-encoded)"
            )
        return plan

    # --- requests --------------------------------------------------------------------------

    def match(self, path: str) -> tuple[_Route, dict[str, str]] | None:
        """The cached route ``path`` falls under, with its parameters."""
        for route in self.routes:
            params = route.match("GET", path)
            if params is not None:
                return route, params
        return None

    def bypass(self, headers: Mapping[str, str]) -> bool:
        """Whether a request carries credentials the key does not separate."""
        return any(name in headers for name in self.private)

    def key(self, path: str, query: str, headers: Mapping[str, str]) -> str:
        """The cache key of a request: path, query and the ``vary`` headers' values."""
        key = f"http:{path}?{query}"
        if self.vary:
            values = "\n".join(headers.get(name, "") for name in self.vary)
            key += (
                "#" + hashlib.blake2b(values.encode("utf-8", "replace"), digest_size=16).hexdigest()
            )
        return key

    def tags(self, route: _Route, params: Mapping[str, str], request: RequestInfo) -> list[str]:
        """The tags of a response stored for ``request``."""
        return route.tags_for(params, request)

    def invalidated(self, method: str, path: str, request: RequestInfo) -> list[str]:
        """The tags an unsafe request invalidates when it succeeds."""
        found: list[str] = []
        for rule in self.invalidations:
            params = rule.match(method, path)
            if params is not None:
                found.extend(rule.tags_for(params, request))
        return found

    # --- responses -------------------------------------------------------------------------

    def storable(self, status: int, headers: Sequence[tuple[str, str]]) -> int | None:
        """The declared body length of a response that may be stored, else ``None``.

        Only 200s with a ``Content-Length`` within ``max_body_bytes``, without
        ``Set-Cookie``, without ``Cache-Control: private|no-store|no-cache``, and whose
        ``Vary`` names only headers in ``vary``.
        """
        if status != 200:
            return None
        length: int | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == "set-cookie":
                return None
            if lower == "cache-control" and _NO_STORE.search(value):
                return None
            if lower == "vary":
                varied = {v.strip().lower() for v in value.split(",") if v.strip()}
                if not varied <= set(self.vary):
                    return None
            if lower == "content-length":
                if not value.strip().isdigit():
                    return None
                length = int(value)
        if length is None or length > self.max_body_bytes:
            return None
        return length

    def store(
        self, status: int, headers: Sequence[tuple[str, str]], body: bytes, now: float
    ) -> CachedResponse:
        """The response to store (and send): ``ETag`` and ``Cache-Control`` added if absent."""
        kept = [(n.lower(), v) for n, v in headers if n.lower() not in _NOT_STORED]
        names = {name for name, _ in kept}
        etag = next((v for n, v in kept if n == "etag"), None)
        if etag is None:
            etag = etag_of(body)
            kept.append(("etag", etag))
        if "cache-control" not in names:
            kept.append(("cache-control", self.cache_control))
        return CachedResponse(status, kept, body, etag, now)

    def replay(
        self, entry: CachedResponse, if_none_match: str | None, now: float, outcome: str
    ) -> tuple[int, HeaderList, bytes]:
        """The response for a request answered from ``entry``: itself, or a ``304``."""
        extra = [("x-cache", outcome)]
        if outcome == "HIT":
            extra.append(("age", str(max(0, int(now - entry.stored_at)))))
        if etag_matches(if_none_match, entry.etag):
            kept = [(n, v) for n, v in entry.headers if n in ("etag", "cache-control", "vary")]
            return 304, kept + extra, b""
        return entry.status, entry.headers + extra, entry.body
