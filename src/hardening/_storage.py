"""How a primitive turns its ``storage=`` argument into a storage (rate limiter, cache).

The argument is ``"memory://"``, a Redis URL, a redis-py client, or an object implementing the
primitive's storage protocol; a sync driver needs a blocking client and a sync storage, an
async driver the asyncio ones.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from hardening._redis import client_from_url, is_async_client, is_redis_url, pool_warning
from hardening.errors import ConfigurationError

__all__ = ["resolve_storage", "warn_about_pool"]

logger = logging.getLogger("hardening")


def warn_about_pool(client: object, owner: str) -> None:
    """Log once per client when its pool would fail callers at once instead of waiting."""
    if getattr(client, "_hardening_pool_checked", False):
        return
    warning = pool_warning(client)
    if warning is not None:
        logger.warning("%s: %s", owner, warning)
    with contextlib.suppress(AttributeError):  # __slots__: warn again next time, harmless
        client._hardening_pool_checked = True  # type: ignore[attr-defined]


def resolve_storage(
    storage: object,
    *,
    owner: str,
    is_async: bool,
    kind: str,
    memory: Callable[[], object],
    memory_type: type,
    redis: Callable[[Any, bool], object],
    protocol: type,
    method: str,
) -> Any:
    """The storage a driver uses for ``storage``.

    Args:
        storage: what the user gave.
        owner: the driver's class name, for messages.
        is_async: whether the driver is the asyncio one.
        kind: the primitive's name in messages, e.g. ``"rate-limit"``.
        memory: builds the in-process storage for ``"memory://"``.
        memory_type: the in-process storage's class (taken as given; it serves both drivers).
        redis: builds the Redis storage for this driver from ``(client, owns_client)``.
        protocol: the storage protocol this driver needs (runtime-checkable).
        method: a method whose sync- or async-ness tells which driver a storage is for.

    Returns:
        The storage.

    Raises:
        ConfigurationError: an unsupported URL, a client of the other kind, or not a storage.
    """
    if isinstance(storage, str):
        if storage == "memory://":
            return memory()
        if is_redis_url(storage):
            return redis(client_from_url(storage, asyncio=is_async), True)
        raise ConfigurationError(f"unsupported {kind} storage URL {storage!r}")
    if isinstance(storage, memory_type):
        return storage
    if hasattr(storage, "register_script"):  # a redis-py client
        if is_async_client(storage) != is_async:
            client = "redis.asyncio" if is_async else "blocking redis"
            raise ConfigurationError(f"{owner} needs a {client} client")
        warn_about_pool(storage, owner)
        return redis(storage, False)
    if isinstance(storage, protocol) and (
        inspect.iscoroutinefunction(getattr(storage, method)) == is_async
    ):
        return storage
    raise ConfigurationError(f"not a {kind} storage for {owner}: {storage!r}")
