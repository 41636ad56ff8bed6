"""The cache's decisions, without I/O: keys, TTLs, jitter, the stored envelope, early refresh.

Everything here is shared by :class:`~hardening.Cache` and :class:`~hardening.AsyncCache` and by
every storage. Nothing reads a clock: times are passed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, runtime_checkable

from hardening._clock import to_seconds
from hardening._redis import redis_key
from hardening.errors import ConfigurationError

__all__ = [
    "DEFAULT_TTL_PROFILES",
    "TTL",
    "CacheStats",
    "JSONSerializer",
    "KeyScheme",
    "PickleSerializer",
    "Serializer",
    "jittered",
    "pack",
    "refresh_due",
    "resolve_ttl",
    "unpack",
]

TTL: TypeAlias = float | timedelta | str
"""A time to live: seconds, a ``timedelta``, or the name of a TTL profile (``"project"``)."""

DEFAULT_TTL_PROFILES: Mapping[str, float] = MappingProxyType(
    {"project": 300.0, "block": 60.0, "session": 3600.0, "theme": 86400.0}
)
"""The TTL profiles every cache knows unless given ``profiles=``: project 5 min, block 1 min,
session 1 h, theme 24 h. Extend them with ``profiles={**DEFAULT_TTL_PROFILES, "user": 600}``."""

_MAX_ID_CHARS = 200  # longer keys are hashed: bounded Redis key size whatever the input
_READABLE = re.compile(r"[^A-Za-z0-9:._/@=+-]")
_NAME = re.compile(r"[A-Za-z0-9_.:/-]*\Z")  # prefixes and namespaces: no braces (hash tags)
_VERSION = b"h1"


# --- serializers -----------------------------------------------------------------------------


@runtime_checkable
class Serializer(Protocol):
    """How values become bytes and back. Must raise on values it cannot encode."""

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode bytes made by :meth:`dumps`."""
        ...


class JSONSerializer:
    """Compact UTF-8 JSON: the default, safe to read from a shared Redis.

    Values come back as JSON gives them: tuples as lists, dict keys as strings. ``NaN`` and
    infinities are refused (they are not JSON).
    """

    __slots__ = ("_decode", "_encode")

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode
        self._decode = json.JSONDecoder().decode

    def dumps(self, value: Any) -> bytes:
        """Encode ``value`` as compact JSON.

        Args:
            value: a JSON-encodable value.

        Returns:
            UTF-8 bytes.

        Raises:
            TypeError: a value JSON cannot encode.
            ValueError: ``NaN`` or an infinity, or a circular reference.
        """
        return self._encode(value).encode()

    def loads(self, data: bytes) -> Any:
        """Decode JSON made by :meth:`dumps`.

        Args:
            data: UTF-8 JSON.

        Returns:
            The value.
        """
        return self._decode(data.decode())

    def __repr__(self) -> str:
        return "JSONSerializer()"


class PickleSerializer:
    """Pickle, for values JSON cannot carry. Opt-in only, and only for a store you alone write.

    Unpickling runs code chosen by whoever wrote the bytes: anyone who can write to the Redis
    the cache reads (another service, a compromised host, an open port) can then run code in
    your process. Use it with the in-process ``memory://`` storage, or a Redis no one else
    writes to.

    Args:
        protocol: the pickle protocol.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        """Pickle ``value``."""
        return pickle.dumps(value, self.protocol)

    def loads(self, data: bytes) -> Any:
        """Unpickle ``data`` (see the class warning)."""
        return pickle.loads(data)  # opt-in, documented above

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"


# --- TTLs ------------------------------------------------------------------------------------


def check_profiles(profiles: Mapping[str, float | timedelta] | None) -> dict[str, float]:
    """Validate TTL profiles: names to positive durations.

    Args:
        profiles: the profiles, or ``None`` for :data:`DEFAULT_TTL_PROFILES`.

    Returns:
        Name to seconds.

    Raises:
        ConfigurationError: a name is not a string or a duration is not positive.
    """
    if profiles is None:
        return dict(DEFAULT_TTL_PROFILES)
    checked: dict[str, float] = {}
    for name, value in profiles.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"TTL profile names are non-empty strings, not {name!r}")
        checked[name] = to_seconds(value, name=f"TTL profile {name!r}", allow_zero=False)
    return checked


def resolve_ttl(ttl: TTL, profiles: Mapping[str, float]) -> float:
    """Seconds for ``ttl``: a duration, or a profile's.

    Args:
        ttl: seconds, a ``timedelta`` or a profile name.
        profiles: the known profiles.

    Returns:
        Positive seconds.

    Raises:
        ConfigurationError: an unknown profile, or a duration that is not positive.
    """
    if isinstance(ttl, str):
        seconds = profiles.get(ttl)
        if seconds is None:
            raise ConfigurationError(f"unknown TTL profile {ttl!r}; known: {sorted(profiles)}")
        return seconds
    return to_seconds(ttl, name="ttl", allow_zero=False)


def jittered(seconds: float, jitter: float, rand: float) -> float:
    """Shorten a TTL by up to ``jitter`` of itself, so keys set together expire apart.

    Args:
        seconds: the TTL.
        jitter: the largest fraction taken off (0 keeps TTLs exact).
        rand: a uniform draw in ``[0, 1)``.

    Returns:
        A TTL in ``(seconds * (1 - jitter), seconds]``.
    """
    return seconds * (1.0 - jitter * rand)


def refresh_due(now_ms: int, expires_ms: int, delta_ms: int, beta: float, rand: float) -> bool:
    """XFetch: whether this read should recompute a value before it expires.

    Vattani, Chierichetti and Lowenstein, "Optimal Probabilistic Cache Stampede Prevention"
    (VLDB 2015): recompute when ``now - delta * beta * ln(rand) >= expiry``. The chance rises
    as expiry nears, faster for values that take long to compute (``delta``), so one reader
    usually refreshes a hot key shortly before it would expire and nobody waits.

    Args:
        now_ms: the reader's time, in ms since the epoch.
        expires_ms: when the value expires, in ms since the epoch.
        delta_ms: how long the value took to compute, in ms (0: never early).
        beta: > 1 refreshes earlier, < 1 later; 0 disables early refresh.
        rand: a uniform draw in ``(0, 1]``.

    Returns:
        Whether to refresh now.
    """
    if delta_ms <= 0 or beta <= 0:
        return False
    return now_ms - delta_ms * beta * math.log(rand) >= expires_ms


# --- keys ------------------------------------------------------------------------------------


def encode_id(text: str) -> str:
    """A storage-safe id for a key, tag or prefix.

    Printable ASCII of at most 200 characters without ``#`` is kept as is; anything else
    becomes a readable part (safe characters of its start) ``#`` its SHA-256. An unhashed id
    never contains ``#``, so no key can be crafted to collide with another's hashed id.
    """
    if len(text) <= _MAX_ID_CHARS and text.isascii() and text.isprintable() and "#" not in text:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{_READABLE.sub('', text[:64])[:48]}#{digest}"


MAX_TAGS = 256
"""The most tags one value may carry."""


class KeyScheme:
    """Storage names of one cache: ``<prefix>:c:{<namespace>}:<kind>:<id>``.

    Kinds: ``k`` values, ``t`` tag indexes, ``p`` prefix indexes, ``g`` a key's tags,
    ``l`` stampede locks. The ``{namespace}`` hash tag puts every name of a namespace in one
    Redis Cluster slot, so one script can reach a key, its tags and its prefixes.

    Args:
        key_prefix: the first part of every name.
        namespace: the cache's namespace (``""`` is the namespace ``default``).
        max_prefix_depth: how many ``:``-separated prefixes of a key are indexed.

    Raises:
        ConfigurationError: a prefix or namespace with characters other than letters, digits
            and ``_.:/-``, or a depth below 0.
    """

    __slots__ = ("base", "key_prefix", "max_prefix_depth", "namespace")

    def __init__(self, key_prefix: str, namespace: str, max_prefix_depth: int) -> None:
        for name, value in (("key_prefix", key_prefix), ("namespace", namespace)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise ConfigurationError(
                    f"{name} may hold letters, digits and '_.:/-' only, not {value!r}"
                )
        if not isinstance(max_prefix_depth, int) or max_prefix_depth < 0:
            raise ConfigurationError(f"max_prefix_depth must be >= 0, not {max_prefix_depth!r}")
        self.key_prefix = key_prefix
        self.namespace = namespace
        self.max_prefix_depth = max_prefix_depth
        self.base = redis_key(f"{key_prefix}:c", namespace or "default") + ":"

    def key_id(self, key: str) -> str:
        """The id of a cache key (see :func:`encode_id`).

        Raises:
            ConfigurationError: ``key`` is not a string.
        """
        if type(key) is not str:
            if not isinstance(key, str):
                raise ConfigurationError(f"cache keys are strings, not {type(key).__name__}")
            key = str(key)
        return encode_id(key)

    def value_name(self, key_id: str) -> str:
        """The storage name of a value."""
        return self.base + "k:" + key_id

    def tag_ids(self, tags: object) -> tuple[str, ...]:
        """The ids of ``tags`` (a string or an iterable of strings), without repeats.

        Raises:
            ConfigurationError: a tag is not a non-empty string, or more than
                :data:`MAX_TAGS` tags (each is an index a write updates in one atomic step).
        """
        if tags is None:
            return ()
        listed = [tags] if isinstance(tags, str) else list(tags)  # type: ignore[call-overload]
        if len(listed) > MAX_TAGS:
            raise ConfigurationError(f"at most {MAX_TAGS} tags per value, not {len(listed)}")
        for tag in listed:
            if not isinstance(tag, str) or not tag:
                raise ConfigurationError(f"tags are non-empty strings, not {tag!r}")
        return tuple(dict.fromkeys(encode_id(tag) for tag in listed))

    def prefix_ids(self, key: str) -> tuple[str, ...]:
        """The ids of the indexed prefixes of ``key``: up to ``max_prefix_depth`` of them.

        ``"project:42:blocks"`` has the prefixes ``"project:"`` and ``"project:42:"``.
        """
        found: list[str] = []
        position = key.find(":")
        while position >= 0 and len(found) < self.max_prefix_depth:
            found.append(encode_id(key[: position + 1]))
            position = key.find(":", position + 1)
        return tuple(found)

    def prefix_id(self, prefix: str) -> str:
        """The index id of a prefix given to ``invalidate_prefix``.

        Raises:
            ConfigurationError: the prefix does not end in ``:`` or is deeper than indexed.
        """
        if not isinstance(prefix, str) or not prefix.endswith(":"):
            raise ConfigurationError(
                f"invalidate_prefix takes a prefix ending in ':' (\"project:42:\"), not {prefix!r}"
            )
        if prefix.count(":") > self.max_prefix_depth:
            raise ConfigurationError(
                f"prefix {prefix[:100]!r} has more than max_prefix_depth="
                f"{self.max_prefix_depth} parts; only that many are indexed"
            )
        return encode_id(prefix)


# --- the stored envelope -----------------------------------------------------------------------


def pack(expires_ms: int, delta_ms: int, payload: bytes) -> bytes:
    """The stored form of a value: ``b"h1:<expires_ms>:<delta_ms>:" + payload``.

    ``expires_ms`` (the writer's clock) and ``delta_ms`` (the load's duration) drive early
    refresh; expiry itself is the store's (Redis ``PX``).
    """
    return b"h1:%d:%d:" % (expires_ms, delta_ms) + payload


def unpack(raw: bytes) -> tuple[int, int, bytes] | None:
    """Parse :func:`pack`'s bytes into ``(expires_ms, delta_ms, payload)``.

    Returns:
        The parts, or ``None`` for bytes another writer (or version) left: read as a miss.
    """
    parts = raw.split(b":", 3)
    if len(parts) != 4 or parts[0] != _VERSION:
        return None
    try:
        return int(parts[1]), int(parts[2]), parts[3]
    except ValueError:
        return None


# --- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What one cache object counted in this process (Prometheus aggregates across workers).

    Attributes:
        hits: reads that found a value.
        misses: reads that found none (including reads skipped while the backend is down).
        loads: loader runs that succeeded (misses and early refreshes).
        load_errors: loader runs that raised.
        refreshes: loads started early by XFetch, before the value expired.
        stampedes_avoided: callers that got another caller's load instead of loading.
        errors: backend operations that failed or were skipped while it was failing.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    refreshes: int = 0
    stampedes_avoided: int = 0
    errors: int = 0

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``; 0.0 before any read."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
