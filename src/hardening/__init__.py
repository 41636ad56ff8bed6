"""hardening: production-hardening primitives for Python services.

Everything a user needs is importable from here. Primitives whose optional dependencies may be
missing are loaded on first access, so ``import hardening`` works with no extras installed and
touching a feature whose extra is missing raises an ``ImportError`` naming the
``pip install 'hardening[...]'`` that fixes it.
"""

import importlib as _importlib
import importlib.metadata as _metadata
import typing as _typing

from hardening._clock import Clock, FakeClock, SystemClock
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    ConflictError,
    HardeningError,
    InvalidPatch,
    JobRejected,
    LeaseLost,
    NotFoundError,
    PatchApplyError,
    PatchConflict,
    PatchError,
    PatchLimitExceeded,
    PatchTestFailed,
    PreconditionError,
    PreconditionFailed,
    PreconditionRequired,
    QueueError,
    RateLimitExceeded,
    UnsupportedMediaType,
)

if _typing.TYPE_CHECKING:
    from hardening._backoff import (
        Backoff,
    )
    from hardening.locking import (
        ConflictEvents,
        Versioned,
        VersionedSession,
        check_if_match,
        conflict_events,
        etag_for,
        if_match_version,
        on_conflict,
        retry_on_conflict,
        update_versioned,
        update_versioned_async,
    )
    from hardening.metrics import (
        OTHER_HTTP_METHOD,
        OVERFLOW_LABEL_VALUE,
        UNMATCHED_ROUTE,
        GuardedCounter,
        GuardedGauge,
        GuardedHistogram,
        HistogramTimer,
        HttpRequestTimer,
        Metrics,
        gunicorn_child_exit,
        mark_process_dead,
        wipe_multiprocess_dir,
    )
    from hardening.ratelimit import (
        AsyncRateLimiter,
        AsyncRateLimitStorage,
        AsyncRedisRateLimitStorage,
        BackendErrorMode,
        KeyFunc,
        MemoryRateLimitStorage,
        RateLimit,
        RateLimitDecision,
        RateLimiter,
        RateLimitState,
        RateLimitStorage,
        RedisRateLimitStorage,
        RequestInfo,
        TrustedProxies,
        client_ip,
        first_key,
        global_key,
        ip_key,
        joined_key,
        user_key,
    )

try:
    __version__ = _metadata.version("hardening")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Public name -> private module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {
    "Backoff": "hardening._backoff",
    "ConflictEvents": "hardening.locking",
    "Versioned": "hardening.locking",
    "VersionedSession": "hardening.locking",
    "check_if_match": "hardening.locking",
    "conflict_events": "hardening.locking",
    "etag_for": "hardening.locking",
    "if_match_version": "hardening.locking",
    "on_conflict": "hardening.locking",
    "retry_on_conflict": "hardening.locking",
    "update_versioned": "hardening.locking",
    "update_versioned_async": "hardening.locking",
    "AsyncRateLimitStorage": "hardening.ratelimit",
    "AsyncRateLimiter": "hardening.ratelimit",
    "AsyncRedisRateLimitStorage": "hardening.ratelimit",
    "BackendErrorMode": "hardening.ratelimit",
    "KeyFunc": "hardening.ratelimit",
    "MemoryRateLimitStorage": "hardening.ratelimit",
    "RateLimit": "hardening.ratelimit",
    "RateLimitDecision": "hardening.ratelimit",
    "RateLimitState": "hardening.ratelimit",
    "RateLimitStorage": "hardening.ratelimit",
    "RateLimiter": "hardening.ratelimit",
    "RedisRateLimitStorage": "hardening.ratelimit",
    "RequestInfo": "hardening.ratelimit",
    "TrustedProxies": "hardening.ratelimit",
    "client_ip": "hardening.ratelimit",
    "first_key": "hardening.ratelimit",
    "global_key": "hardening.ratelimit",
    "ip_key": "hardening.ratelimit",
    "joined_key": "hardening.ratelimit",
    "user_key": "hardening.ratelimit",
    "GuardedCounter": "hardening.metrics",
    "GuardedGauge": "hardening.metrics",
    "GuardedHistogram": "hardening.metrics",
    "HistogramTimer": "hardening.metrics",
    "HttpRequestTimer": "hardening.metrics",
    "Metrics": "hardening.metrics",
    "OTHER_HTTP_METHOD": "hardening.metrics",
    "OVERFLOW_LABEL_VALUE": "hardening.metrics",
    "UNMATCHED_ROUTE": "hardening.metrics",
    "gunicorn_child_exit": "hardening.metrics",
    "mark_process_dead": "hardening.metrics",
    "wipe_multiprocess_dir": "hardening.metrics",
}

# Plain sorted() order (tests/test_public_api.py), not ruff's isort-style order.
__all__ = [  # noqa: RUF022
    "AsyncRateLimitStorage",
    "AsyncRateLimiter",
    "AsyncRedisRateLimitStorage",
    "BackendErrorMode",
    "BackendUnavailable",
    "Backoff",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "ConflictEvents",
    "FakeClock",
    "GuardedCounter",
    "GuardedGauge",
    "GuardedHistogram",
    "HardeningError",
    "HistogramTimer",
    "HttpRequestTimer",
    "InvalidPatch",
    "JobRejected",
    "KeyFunc",
    "LeaseLost",
    "MemoryRateLimitStorage",
    "Metrics",
    "NotFoundError",
    "OTHER_HTTP_METHOD",
    "OVERFLOW_LABEL_VALUE",
    "PatchApplyError",
    "PatchConflict",
    "PatchError",
    "PatchLimitExceeded",
    "PatchTestFailed",
    "PreconditionError",
    "PreconditionFailed",
    "PreconditionRequired",
    "QueueError",
    "RateLimit",
    "RateLimitDecision",
    "RateLimitExceeded",
    "RateLimitState",
    "RateLimitStorage",
    "RateLimiter",
    "RedisRateLimitStorage",
    "RequestInfo",
    "SystemClock",
    "TrustedProxies",
    "UNMATCHED_ROUTE",
    "UnsupportedMediaType",
    "Versioned",
    "VersionedSession",
    "__version__",
    "check_if_match",
    "client_ip",
    "conflict_events",
    "etag_for",
    "first_key",
    "global_key",
    "gunicorn_child_exit",
    "if_match_version",
    "ip_key",
    "joined_key",
    "mark_process_dead",
    "on_conflict",
    "retry_on_conflict",
    "update_versioned",
    "update_versioned_async",
    "user_key",
    "wipe_multiprocess_dir",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hardening' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
