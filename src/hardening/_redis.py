"""Redis clients from URLs and Lua scripts shipped as package data, shared by every backend.

Schemes: ``redis://`` and ``rediss://`` (TLS) for one server, ``redis+cluster://host:port[,host:
port...]`` for Redis Cluster and ``redis+sentinel://[:password@]host:port[,host:port...]/service
[/db]`` for Sentinel. Query parameters (``?socket_timeout=0.5``) are passed to redis-py as for
``redis.from_url``. We build redis-py clients ourselves, sync and asyncio alike, because our
primitives run their own Lua scripts on the raw client; ``limits``' storage wrappers hide it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from hardening._imports import require
from hardening.errors import ConfigurationError

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["DEFAULT_TIMEOUTS", "client_from_url", "is_async_client", "is_redis_url", "read_lua"]

REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel")

# A limiter or queue must never hang a request on a dead Redis: fail fast, then fall back.
DEFAULT_TIMEOUTS: dict[str, float] = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}


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


def _options(query: str, options: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(DEFAULT_TIMEOUTS)
    for name, value in parse_qsl(query):
        merged[name] = float(value) if name.endswith("timeout") else value
    merged.update(options)
    return merged


def client_from_url(url: str, *, asyncio: bool = False, **options: Any) -> Any:
    """Build a redis-py client (``redis.Redis``, ``RedisCluster`` or a Sentinel master).

    Args:
        url: a ``redis://``, ``rediss://``, ``redis+cluster://`` or ``redis+sentinel://`` URL.
        asyncio: build the ``redis.asyncio`` flavour instead of the blocking one.
        **options: extra keyword arguments for the client (they override the URL's).

    Returns:
        The client. Connections are made lazily (Cluster discovers its nodes on first use in
        asyncio, at construction when blocking).

    Raises:
        ConfigurationError: the URL is not a Redis URL or is malformed.
        ImportError: redis-py is not installed (names ``pip install 'hardening[redis]'``).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(f"not a Redis URL: {url!r} (schemes: {', '.join(REDIS_SCHEMES)})")
    redis = _redis_module(asyncio)
    kwargs = _options(parts.query, options)
    if scheme in ("redis", "rediss"):
        return redis.Redis.from_url(url, **kwargs)
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
        return cluster.RedisCluster(startup_nodes=nodes, **kwargs)
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
    return sentinel.master_for(path[0])


def is_async_client(client: object) -> bool:
    """Return whether ``client`` is a ``redis.asyncio`` client (plain or cluster)."""
    return type(client).__module__.startswith("redis.asyncio")


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
