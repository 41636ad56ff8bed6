"""Redis plumbing every primitive shares: clients with bounded pools, keys, Lua scripts.

Schemes: ``redis://`` and ``rediss://`` (TLS) for one server, ``redis+cluster://host:port[,host:
port...]`` for Redis Cluster and ``redis+sentinel://[:password@]host:port[,host:port...]/service
[/db]`` for Sentinel. Query parameters (``?socket_timeout=0.5&max_connections=20``) are passed to
redis-py as for ``redis.from_url``. We build redis-py clients ourselves, sync and asyncio alike,
because our primitives run their own Lua scripts on the raw client.

**Pools are back-pressure, not outages.** Every client built here holds at most
``max_connections`` connections (per node on a cluster) and a caller that finds them all busy
*waits* up to ``pool_timeout`` seconds for one; only a caller that waited in vain gets a
``redis.ConnectionError`` (which the primitives count as a backend failure). redis-py's own
default pool raises ``MaxConnectionsError`` at once instead, which a limiter would read as an
outage. A broken pooled connection is retried once at once (a server restart leaves every
idle connection dead); a timeout is not retried, and there is no retry with back-off, so an
outage is seen within one socket timeout, never after redis-py's ten retries.

**Keys.** :func:`redis_key` builds every key: ``<prefix>:<kind>:{<tag>}[:<rest>...]``, where the
hash tag is :func:`hash_tag` of a user-supplied part: braces, ``%`` and anything but printable
ASCII are percent-encoded (so no input can end the tag early, empty it, or fail to encode) and
a long part is replaced by its SHA-256, so a key's slot and size never depend on hostile input.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from hardening._imports import require
from hardening.errors import ConfigurationError

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_TIMEOUTS",
    "check_key_prefix",
    "client_from_url",
    "escape_prefix_part",
    "hash_tag",
    "is_async_client",
    "is_redis_url",
    "pool_warning",
    "read_lua",
    "redis_key",
]

logger = logging.getLogger("hardening.redis")

REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel")

# A limiter or queue must never hang a request on a dead Redis: fail fast, then fall back.
DEFAULT_TIMEOUTS: dict[str, float] = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
DEFAULT_MAX_CONNECTIONS = 50
"""Connections one client keeps open at most (per node on a cluster)."""
DEFAULT_POOL_TIMEOUT = 5.0
"""Seconds a caller waits for a free pooled connection before that counts as a failure."""

_POOL_OPTIONS = ("max_connections", "pool_timeout")
_MAX_TAG_CHARS = 200


# --- keys ----------------------------------------------------------------------------------


def _escape_char(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"%", "{", "}"}


def hash_tag(part: str) -> str:
    """The content of a hash tag for a user-supplied ``part``: one per part, never empty.

    Printable ASCII other than ``%``, ``{`` and ``}`` is kept; every other character
    (braces, ``%``, spaces, control characters, non-ASCII, lone surrogates) is
    percent-encoded as its UTF-8 bytes, so no part can end a tag early, empty it or fail to
    encode, and two different parts never share an escape. A part longer than 200 characters
    once escaped becomes ``%H`` and its SHA-256 (no escape starts with ``%H``); the empty part
    becomes a lone ``%``.

    Args:
        part: the user-supplied text (a rate-limit key, a queue name...).

    Returns:
        Text that is safe between ``{`` and ``}`` in a Redis key.

    Raises:
        ConfigurationError: ``part`` is not a string.
    """
    if not isinstance(part, str):
        raise ConfigurationError(f"key parts are strings, not {type(part).__name__}")
    if not part:
        return "%"
    if len(part) <= _MAX_TAG_CHARS and all(char in _SAFE for char in part):
        return part
    escaped = "".join(char if char in _SAFE else _escape_char(char) for char in part)
    if len(escaped) <= _MAX_TAG_CHARS:
        return escaped
    return "%H" + hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()


_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/-*%")


def escape_prefix_part(part: str) -> str:
    """``part`` made fit for a key prefix, losslessly: other characters percent-encoded."""
    return "".join(
        char if char in _PREFIX_CHARS and char != "%" else _escape_char(char) for char in part
    )


def check_key_prefix(prefix: object, *, name: str = "key_prefix") -> str:
    """Validate a primitive's key prefix: non-empty, letters, digits and ``_.:/-*%`` only.

    Args:
        prefix: the configured prefix.
        name: the option's name, for the message.

    Returns:
        The prefix.

    Raises:
        ConfigurationError: an empty prefix, or one with other characters than letters,
            digits and ``_.:/-*%`` (a brace would move the keys' hash slot).
    """
    if not isinstance(prefix, str) or not prefix or not set(prefix) <= _PREFIX_CHARS:
        raise ConfigurationError(
            f"{name} must be non-empty and hold letters, digits and '_.:/-*%' only, not {prefix!r}"
        )
    return prefix


def redis_key(prefix: str, tag: str, *rest: str) -> str:
    """The one way a Redis key is built: ``<prefix>:{<hash_tag(tag)>}[:<rest>...]``.

    Every key of one ``tag`` (a rate-limit principal, a queue, a cache namespace) lands in the
    same Redis Cluster slot, so one script can reach all of them. Each primitive's
    ``prefix`` ends in its own kind (``…:rl`` rate limits, ``…:c`` cache, ``…:q`` queues), so
    primitives' keys never meet.

    Args:
        prefix: the validated prefix (:func:`check_key_prefix`) and the primitive's kind.
        tag: the user-supplied part that picks the slot (escaped here).
        *rest: further parts after the tag; they cannot move the slot, so they are taken as
            given (callers pass fixed names or already-encoded ids).

    Returns:
        The key.
    """
    key = f"{prefix}:{{{hash_tag(tag)}}}"
    return ":".join((key, *rest)) if rest else key


# --- clients --------------------------------------------------------------------------------


def is_redis_url(url: str) -> bool:
    """Return whether ``url`` names a Redis deployment this module can connect to."""
    return urlsplit(url).scheme in REDIS_SCHEMES


def _redis_module(asyncio: bool) -> ModuleType:
    feature = "a Redis backend"
    if asyncio:
        require("redis", extra="redis", feature=feature)
        return require("redis.asyncio", extra="redis", feature=feature)
    return require("redis", extra="redis", feature=feature)


def _hosts(netloc: str) -> tuple[str | None, list[tuple[str, int]]]:
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "6379")
        try:
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis host {part!r}") from exc
    return password, hosts


def _options(
    query: str, options: dict[str, Any], is_async: bool
) -> tuple[dict[str, Any], int, float]:
    merged: dict[str, Any] = dict(DEFAULT_TIMEOUTS)
    for name, value in parse_qsl(query):
        if name.endswith("timeout"):
            merged[name] = float(value)
        elif name == "max_connections":
            merged[name] = int(value)
        else:
            merged[name] = value
    merged.update(options)
    size = merged.pop("max_connections", DEFAULT_MAX_CONNECTIONS)
    wait = merged.pop("pool_timeout", DEFAULT_POOL_TIMEOUT)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigurationError(f"max_connections must be a positive integer, not {size!r}")
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 < wait < 3600:
        raise ConfigurationError(f"pool_timeout must be seconds in (0, 3600), not {wait!r}")
    if "retry" not in merged:
        retry = require(
            "redis.asyncio.retry" if is_async else "redis.retry", extra="redis", feature="x"
        )
        backoff = require("redis.backoff", extra="redis", feature="a Redis backend")
        exceptions = require("redis.exceptions", extra="redis", feature="x")
        # a dead pooled connection (after a restart) is worth one immediate retry; a timeout
        # is not: a silent server would cost the socket timeout twice
        merged["retry"] = retry.Retry(
            backoff.NoBackoff(), 1, supported_errors=(exceptions.ConnectionError,)
        )
    return merged, size, float(wait)


class _SyncGate:
    """At most ``size`` commands in flight; a caller waits up to ``timeout`` for a slot."""

    def __init__(self, size: int, timeout: float, error: type[Exception]) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._timeout = timeout
        self._error = error

    def __enter__(self) -> None:
        if not self._slots.acquire(timeout=self._timeout):
            raise self._error("No connection available.")

    def __exit__(self, *exc_info: object) -> None:
        self._slots.release()


class _AsyncGate:
    """The asyncio twin of :class:`_SyncGate` (a permit is never leaked by a timeout)."""

    def __init__(self, size: int, timeout: float, error: type[Exception]) -> None:
        self._slots = asyncio.BoundedSemaphore(size)
        self._timeout = timeout
        self._error = error

    async def __aenter__(self) -> None:
        acquire = asyncio.ensure_future(self._slots.acquire())
        try:
            done, _ = await asyncio.wait((acquire,), timeout=self._timeout)
        except BaseException:  # the caller was cancelled while waiting
            self._abandon(acquire)
            raise
        if not done:
            self._abandon(acquire)
            raise self._error("No connection available.")

    def _abandon(self, acquire: asyncio.Future[Any]) -> None:
        if not acquire.cancel() and not acquire.cancelled() and acquire.exception() is None:
            self._slots.release()  # it was granted just as we gave up: hand it back

    async def __aexit__(self, *exc_info: object) -> None:
        self._slots.release()


@cache
def _gated_class(base: type, is_async: bool) -> type:
    """``base`` (a redis-py client class) whose commands wait for a free slot.

    For the clients whose pools cannot block: Cluster and Sentinel. The gate bounds the
    commands in flight to the pool size, so no node's pool is ever asked for more. It is
    given as ``hardening_gate=`` (a cluster runs commands while it is built) or set after.
    """
    if is_async:

        class AsyncGated(base):  # type: ignore[misc]
            def __init__(self, *args: Any, hardening_gate: Any = None, **kwargs: Any) -> None:
                self._hardening_gate = hardening_gate
                super().__init__(*args, **kwargs)

            async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
                gate = self._hardening_gate
                if gate is None:
                    return await super().execute_command(*args, **kwargs)
                async with gate:
                    return await super().execute_command(*args, **kwargs)

        AsyncGated.__name__ = AsyncGated.__qualname__ = base.__name__
        return AsyncGated

    class SyncGated(base):  # type: ignore[misc]
        def __init__(self, *args: Any, hardening_gate: Any = None, **kwargs: Any) -> None:
            self._hardening_gate = hardening_gate
            super().__init__(*args, **kwargs)

        def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            gate = self._hardening_gate
            if gate is None:
                return super().execute_command(*args, **kwargs)
            with gate:
                return super().execute_command(*args, **kwargs)

    SyncGated.__name__ = SyncGated.__qualname__ = base.__name__
    return SyncGated


def _new_gate(size: int, wait: float, *, is_async: bool, error: type[Exception]) -> Any:
    return (_AsyncGate if is_async else _SyncGate)(size, wait, error)


def client_from_url(url: str, *, asyncio: bool = False, **options: Any) -> Any:
    """Build a redis-py client (``redis.Redis``, ``RedisCluster`` or a Sentinel master).

    Args:
        url: a ``redis://``, ``rediss://``, ``redis+cluster://`` or ``redis+sentinel://`` URL.
        asyncio: build the ``redis.asyncio`` flavour instead of the blocking one.
        **options: extra keyword arguments for the client (they override the URL's), and
            ``max_connections`` (default :data:`DEFAULT_MAX_CONNECTIONS`) and
            ``pool_timeout`` (default :data:`DEFAULT_POOL_TIMEOUT` seconds): the pool size
            and how long a caller waits for a free connection.

    Returns:
        The client. Connections are made lazily (Cluster discovers its nodes on first use in
        asyncio, at construction when blocking).

    Raises:
        ConfigurationError: the URL is not a Redis URL, is malformed, or a pool option is
            invalid.
        ImportError: redis-py is not installed (names ``pip install 'hardening[redis]'``).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(f"not a Redis URL: {url!r} (schemes: {', '.join(REDIS_SCHEMES)})")
    redis = _redis_module(asyncio)
    kwargs, size, wait = _options(parts.query, options, asyncio)
    if scheme in ("redis", "rediss"):
        plain_url = parts._replace(query="").geturl()
        pool = redis.BlockingConnectionPool.from_url(
            plain_url, max_connections=size, timeout=wait, **kwargs
        )
        client = redis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # close() disconnects the pool it came with
        return client
    password, hosts = _hosts(parts.netloc)
    if password:
        kwargs.setdefault("password", password)
    if scheme.endswith("+cluster"):
        cluster = require(
            "redis.asyncio.cluster" if asyncio else "redis.cluster", extra="redis", feature="x"
        )
        nodes = [cluster.ClusterNode(host, port) for host, port in hosts]
        if scheme.startswith("rediss"):
            kwargs.setdefault("ssl", True)
        gate = _new_gate(size, wait, is_async=asyncio, error=redis.ConnectionError)
        gated = _gated_class(cluster.RedisCluster, asyncio)
        return gated(startup_nodes=nodes, max_connections=size, hardening_gate=gate, **kwargs)
    # Sentinel: path is /service_name[/db]
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigurationError(f"sentinel URL needs a service name: {url!r}")
    if len(path) > 1:
        kwargs.setdefault("db", int(path[1]))
    sentinel_module = require(
        "redis.asyncio.sentinel" if asyncio else "redis.sentinel", extra="redis", feature="x"
    )
    sentinel = sentinel_module.Sentinel(hosts, sentinel_kwargs={"password": password}, **kwargs)
    gated = _gated_class(redis.Redis, asyncio)
    # the gate bounds what is in flight; the pool itself must then never refuse
    master = sentinel.master_for(path[0], redis_class=gated, max_connections=2**31 - 1)
    master._hardening_gate = _new_gate(size, wait, is_async=asyncio, error=redis.ConnectionError)
    return master


def pool_warning(client: object) -> str | None:
    """Why ``client``'s pool would fail callers at once when busy, or ``None`` when it waits.

    A client from :func:`client_from_url` waits; a client a user built with redis-py's
    defaults raises ``MaxConnectionsError`` once its pool is full. `hardening` uses such a
    client as given, but that error then fails the call that met it (per the primitive's
    policy) without counting as an outage.

    Args:
        client: a redis-py client.

    Returns:
        A warning to log, or ``None``.
    """
    if getattr(client, "_hardening_gate", None) is not None:
        return None
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # a cluster: per-node pools that raise when full
        return (
            f"{type(client).__name__} raises MaxConnectionsError when a node's pool is full; "
            "build it with hardening's client_from_url (callers wait for a connection)"
        )
    if "Blocking" in type(pool).__name__:
        return None
    size = getattr(pool, "max_connections", None)
    return (
        f"the Redis client's {type(pool).__name__} (max_connections={size}) raises "
        "MaxConnectionsError when full instead of waiting; pass a BlockingConnectionPool "
        "(or a URL) so a busy pool is back-pressure, not a failure"
    )


def is_async_client(client: object) -> bool:
    """Return whether ``client`` is a ``redis.asyncio`` client (plain or cluster)."""
    return any(cls.__module__.startswith("redis.asyncio") for cls in type(client).__mro__)


@cache
def read_lua(package: str, name: str) -> str:
    """Return the text of a Lua script shipped as package data.

    Args:
        package: the package holding the ``lua/`` folder, e.g. ``"hardening.ratelimit"``.
        name: the file name, e.g. ``"hit.lua"``.

    Returns:
        The script's source.
    """
    return resources.files(package).joinpath("lua").joinpath(name).read_text(encoding="utf-8")
