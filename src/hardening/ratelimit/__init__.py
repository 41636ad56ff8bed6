"""Rate limiting: sliding windows, tiers, blocking, one Redis round trip, sync and async.

``RateLimiter`` / ``AsyncRateLimiter`` (drivers) wire the pure policy in ``policy.py`` to a
storage from ``storage.py`` (memory, or Redis with one Lua script from ``lua/``); ``keys.py``
says who a request is.
"""

from hardening.ratelimit.keys import (
    KeyFunc,
    RequestInfo,
    TrustedProxies,
    client_ip,
    first_key,
    global_key,
    ip_key,
    joined_key,
    user_key,
)
from hardening.ratelimit.limiter import AsyncRateLimiter, BackendErrorMode, RateLimiter
from hardening.ratelimit.policy import RateLimit, RateLimitDecision, RateLimitState, Strategy
from hardening.ratelimit.storage import (
    AsyncRateLimitStorage,
    AsyncRedisRateLimitStorage,
    MemoryRateLimitStorage,
    RateLimitStorage,
    RedisRateLimitStorage,
)

__all__ = [
    "AsyncRateLimitStorage",
    "AsyncRateLimiter",
    "AsyncRedisRateLimitStorage",
    "BackendErrorMode",
    "KeyFunc",
    "MemoryRateLimitStorage",
    "RateLimit",
    "RateLimitDecision",
    "RateLimitState",
    "RateLimitStorage",
    "RateLimiter",
    "RedisRateLimitStorage",
    "RequestInfo",
    "Strategy",
    "TrustedProxies",
    "client_ip",
    "first_key",
    "global_key",
    "ip_key",
    "joined_key",
    "user_key",
]
