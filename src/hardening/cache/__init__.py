"""Caching: get-or-set with stampede protection, TTL profiles, tags, prefixes, batch ops.

``Cache`` / ``AsyncCache`` (drivers, ``cache.py``) share their logic (``_base.py``) and the pure
policy in ``policy.py`` (keys, TTLs, jitter, the stored envelope, early refresh, serializers);
values live in a storage from ``memory.py`` (bounded LRU) or ``redis.py`` (Lua scripts from
``lua/``), behind the protocols in ``storage.py``. ``http.py`` holds the framework-free part of
the ASGI and WSGI response-cache middleware.
"""

from hardening.cache._base import CacheErrorMode
from hardening.cache.cache import AsyncCache, Cache
from hardening.cache.memory import MemoryCacheStorage
from hardening.cache.policy import (
    DEFAULT_TTL_PROFILES,
    TTL,
    CacheStats,
    JSONSerializer,
    PickleSerializer,
    Serializer,
)
from hardening.cache.redis import AsyncRedisCacheStorage, RedisCacheStorage
from hardening.cache.storage import AsyncCacheStorage, CacheStorage, IndexKind, Write

__all__ = [
    "DEFAULT_TTL_PROFILES",
    "TTL",
    "AsyncCache",
    "AsyncCacheStorage",
    "AsyncRedisCacheStorage",
    "Cache",
    "CacheErrorMode",
    "CacheStats",
    "CacheStorage",
    "IndexKind",
    "JSONSerializer",
    "MemoryCacheStorage",
    "PickleSerializer",
    "RedisCacheStorage",
    "Serializer",
    "Write",
]
