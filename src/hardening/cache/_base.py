"""Everything :class:`~hardening.Cache` and :class:`~hardening.AsyncCache` share but I/O.

Configuration, storage construction, encoding values into writes and reads back into values,
early-refresh decisions, backend-failure handling, counting, and the ``cached`` decorator's
keys. The drivers in ``cache.py`` only call the storage and coordinate callers.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from hardening._clock import Clock, SystemClock, to_seconds
from hardening._health import Breaker, is_backend_failure
from hardening._storage import resolve_storage
from hardening.cache.memory import MemoryCacheStorage
from hardening.cache.policy import (
    TTL,
    CacheStats,
    JSONSerializer,
    KeyScheme,
    Serializer,
    check_profiles,
    jittered,
    pack,
    refresh_due,
    resolve_ttl,
    unpack,
)
from hardening.cache.redis import AsyncRedisCacheStorage, RedisCacheStorage
from hardening.cache.storage import AsyncCacheStorage, CacheStorage, Write
from hardening.errors import BackendUnavailable, CacheError, ConfigurationError, ValueTooLarge

if TYPE_CHECKING:
    from hardening.metrics import Metrics

__all__ = ["MISSING", "CacheErrorMode", "KeySpec", "TagsSpec", "check_specs"]

logger = logging.getLogger("hardening.cache")

CacheErrorMode = Literal["miss", "raise"]
KeySpec = str | Callable[..., str] | None
TagsSpec = Iterable[str] | Callable[..., Iterable[str]] | None


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""Marks "no value" where ``None`` is a value."""


class _Counts:
    __slots__ = ("errors", "hits", "load_errors", "loads", "misses", "refreshes", "stampedes")

    def __init__(self) -> None:
        self.hits = self.misses = self.loads = self.load_errors = 0
        self.refreshes = self.stampedes = self.errors = 0


def _poll_delays(total: float) -> tuple[float, ...]:
    """Waits between polls for another process's value: 2 ms doubling to 50 ms.

    ``total`` seconds in all, on a fixed schedule, so a fake clock cannot make it endless.
    """
    delays: list[float] = []
    delay, spent = 0.002, 0.0
    while spent < total:
        step = min(delay, total - spent)
        delays.append(step)
        spent += step
        delay = min(delay * 2, 0.05)
    return tuple(delays)


class _CacheBase:
    """Configuration and the logic both drivers share."""

    _is_async = False

    def __init__(
        self,
        storage: object = "memory://",
        *,
        namespace: str = "",
        default_ttl: TTL = 300.0,
        serializer: Serializer | None = None,
        metrics: Metrics | None = None,
        profiles: Mapping[str, float | timedelta] | None = None,
        jitter: float = 0.1,
        early_refresh: float = 1.0,
        lock_timeout: float | timedelta = 5.0,
        max_value_bytes: int = 1024 * 1024,
        max_entries: int = 10_000,
        max_bytes: int | None = None,
        max_prefix_depth: int = 3,
        on_backend_error: CacheErrorMode = "miss",
        key_prefix: str = "hardening",
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        if on_backend_error not in ("miss", "raise"):
            raise ConfigurationError(
                f"on_backend_error must be 'miss' or 'raise', not {on_backend_error!r}"
            )
        if not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise ConfigurationError(f"jitter must be a fraction in [0, 1), not {jitter!r}")
        if not isinstance(early_refresh, (int, float)) or not 0 <= early_refresh <= 100:
            raise ConfigurationError(f"early_refresh must be in [0, 100], not {early_refresh!r}")
        if not isinstance(max_value_bytes, int) or max_value_bytes < 1:
            raise ConfigurationError(f"max_value_bytes must be >= 1, not {max_value_bytes!r}")
        if serializer is not None and not isinstance(serializer, Serializer):
            raise ConfigurationError(f"not a serializer (dumps/loads): {serializer!r}")
        self.scheme = KeyScheme(key_prefix, namespace, max_prefix_depth)
        self.base = self.scheme.base
        self.namespace = namespace
        self.name = name or namespace or "default"
        self.profiles: dict[str, float] = check_profiles(profiles)
        self.default_ttl = resolve_ttl(default_ttl, self.profiles)
        self.serializer: Serializer = serializer or JSONSerializer()
        self.metrics = metrics
        self.jitter = float(jitter)
        self.early_refresh = float(early_refresh)
        self.lock_timeout = to_seconds(lock_timeout, name="lock_timeout", allow_zero=False)
        self.max_value_bytes = max_value_bytes
        self.on_backend_error: CacheErrorMode = on_backend_error
        self.clock: Clock = clock or SystemClock()
        self._lock_ms = max(1, math.ceil(self.lock_timeout * 1000))
        self._poll = _poll_delays(self.lock_timeout)
        self._rng = random.Random()
        self._counts = _Counts()
        self._health = Breaker(self.clock)
        self._storage: Any = self._make_storage(storage, max_entries, max_bytes)
        self._owns_storage = isinstance(storage, str)
        # the memory storage computes only: the async driver calls it without awaiting
        self._sync_storage = isinstance(self._storage, MemoryCacheStorage)
        self._shared = bool(getattr(self._storage, "shared", False))
        self._init_driver()

    def _init_driver(self) -> None:
        """The driver's own state (its single-flight table)."""

    def _make_storage(self, storage: object, max_entries: int, max_bytes: int | None) -> Any:
        is_async = self._is_async
        return resolve_storage(
            storage,
            owner=type(self).__name__,
            is_async=is_async,
            kind="cache",
            memory=lambda: MemoryCacheStorage(
                max_entries=max_entries, max_bytes=max_bytes, clock=self.clock
            ),
            memory_type=MemoryCacheStorage,
            redis=lambda client, owns: (AsyncRedisCacheStorage if is_async else RedisCacheStorage)(
                client, owns_client=owns
            ),
            protocol=AsyncCacheStorage if is_async else CacheStorage,
            method="get",
        )

    def __repr__(self) -> str:
        storage = type(self._storage).__name__
        return f"{type(self).__name__}(storage={storage}, namespace={self.namespace!r})"

    # --- encoding --------------------------------------------------------------------------

    def _ttl_ms(self, ttl: TTL | None) -> int:
        seconds = self.default_ttl if ttl is None else resolve_ttl(ttl, self.profiles)
        if self.jitter:
            seconds = jittered(seconds, self.jitter, self._rng.random())
        return max(1, round(seconds * 1000))

    def _dumps(self, key: str, value: Any) -> bytes:
        try:
            payload = self.serializer.dumps(value)
        except (TypeError, ValueError, RecursionError) as exc:
            reason = f"{type(self.serializer).__name__} cannot encode it: {exc}"
            raise CacheError(key, reason) from exc
        if len(payload) > self.max_value_bytes:
            raise ValueTooLarge(key, len(payload), self.max_value_bytes)
        return payload

    def _encode(
        self, key: str, key_id: str, value: Any, ttl: TTL | None, tags: object, delta_ms: int = 0
    ) -> tuple[Write, bytes]:
        """A write for ``value`` and its serialized payload."""
        payload = self._dumps(key, value)
        ttl_ms = self._ttl_ms(ttl)
        expires_ms = int(self.clock.time() * 1000) + ttl_ms
        write = Write(
            key_id,
            pack(expires_ms, delta_ms, payload),
            ttl_ms,
            self.scheme.tag_ids(tags),
            self.scheme.prefix_ids(key),
        )
        return write, payload

    def _decode(self, raw: bytes | None) -> tuple[Any, bool]:
        """``(value, refresh_due)`` of stored bytes; ``(MISSING, False)`` for none or bad."""
        if raw is None:
            return MISSING, False
        parts = unpack(raw)
        if parts is None:
            return MISSING, False
        expires_ms, delta_ms, payload = parts
        try:
            value = self.serializer.loads(payload)
        except Exception:  # bytes another serializer wrote: a miss, and the next write fixes it
            logger.debug("cache value not decodable by %r", self.serializer, exc_info=True)
            return MISSING, False
        if not delta_ms or not self.early_refresh:
            return value, False
        now_ms = int(self.clock.time() * 1000)
        rand = 1.0 - self._rng.random()
        return value, refresh_due(now_ms, expires_ms, delta_ms, self.early_refresh, rand)

    def _remembered(self, key_id: str) -> tuple[Any, bool]:
        """``_decode`` for ``memory://``: the entry's value decoded once, then shared."""
        entry = self._storage.entry(self.base, key_id)
        if entry is None:
            return MISSING, False
        memo = entry.memo
        if memo is None or memo[0] is not self.serializer:
            parts = unpack(entry.value)
            if parts is None:
                return MISSING, False
            expires_ms, delta_ms, payload = parts
            try:
                value = self.serializer.loads(payload)
            except Exception:
                logger.debug("cache value not decodable by %r", self.serializer, exc_info=True)
                return MISSING, False
            memo = entry.memo = (self.serializer, expires_ms, delta_ms, value)
        if not memo[2] or not self.early_refresh:
            return memo[3], False
        now_ms = int(self.clock.time() * 1000)
        rand = 1.0 - self._rng.random()
        return memo[3], refresh_due(now_ms, memo[1], memo[2], self.early_refresh, rand)

    def _copy(self, value: Any, payload: bytes | None) -> Any:
        """A caller's own copy of a value another caller loaded."""
        return value if payload is None else self.serializer.loads(payload)

    # --- counting ----------------------------------------------------------------------------

    def _hit(self) -> None:
        self._counts.hits += 1
        if self.metrics is not None:
            self.metrics.cache_request(self.name, "hit")

    def _miss(self, count: int = 1) -> None:
        self._counts.misses += count
        if self.metrics is not None:
            self.metrics.cache_request(self.name, "miss", count)

    def _hits(self, count: int) -> None:
        self._counts.hits += count
        if self.metrics is not None and count:
            self.metrics.cache_request(self.name, "hit", count)

    def _loaded(self, outcome: str, seconds: float) -> None:
        if outcome == "error":
            self._counts.load_errors += 1
        else:
            self._counts.loads += 1
            if outcome == "refreshed":
                self._counts.refreshes += 1
        if self.metrics is not None:
            self.metrics.cache_load(self.name, outcome, seconds)

    def _avoided(self) -> None:
        self._counts.stampedes += 1
        if self.metrics is not None:
            self.metrics.cache_stampede_avoided(self.name)

    def stats(self) -> CacheStats:
        """What this cache object counted in this process.

        Returns:
            A snapshot; its ``hit_ratio`` is ``hits / (hits + misses)``. Across workers, use
            the Prometheus counters instead (see the docs' PromQL).
        """
        c = self._counts
        return CacheStats(
            c.hits, c.misses, c.loads, c.load_errors, c.refreshes, c.stampedes, c.errors
        )

    # --- backend failures ------------------------------------------------------------------

    def _usable(self, operation: str) -> int | None:
        """The breaker's ticket to call the storage now, or ``None`` (counted as an error).

        In ``"raise"`` mode every call goes to the storage (the caller handles failures).
        """
        ticket = self._health.admit()
        if ticket is not None or self.on_backend_error == "raise":
            return ticket if ticket is not None else 0
        self._error(operation)
        return None

    def _error(self, operation: str) -> None:
        self._counts.errors += 1
        if self.metrics is not None:
            self.metrics.cache_error(self.name, operation)

    def _failed(self, operation: str, exc: Exception, ticket: int | None = None) -> None:
        """Count a failed storage call; raise it in ``"raise"`` mode, else log it.

        A backend failure opens the shared breaker (logged once); a failure of this call's
        own data (a key of the wrong type in Redis, a script error) fails the call alone.
        """
        self._error(operation)
        backend = is_backend_failure(exc)
        if not backend:
            self._health.abandon(ticket)
        if self.on_backend_error == "raise":
            if backend:
                self._health.failed(ticket)
            raise BackendUnavailable("cache storage", f"{operation}: {exc}") from exc
        if not backend:
            logger.warning(
                "cache storage refused %s for this call (%s: %s); the cache stays in use",
                operation,
                type(exc).__name__,
                exc,
            )
        elif self._health.failed(ticket):
            logger.warning(
                "cache storage failed on %s; reads miss and writes are skipped until it "
                "answers again",
                operation,
                exc_info=exc,
            )

    def _ok(self) -> None:
        if self._health.succeeded():
            logger.warning("cache storage answers again")

    # --- the decorator's keys ------------------------------------------------------------

    def _call_key(
        self,
        func: Callable[..., Any],
        key: KeySpec,
        signature: inspect.Signature | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> str:
        if key is None:
            arguments = json.dumps(
                [args, kwargs], sort_keys=True, default=repr, separators=(",", ":")
            )
            return f"{func.__module__}.{func.__qualname__}:{arguments}"
        if callable(key):
            return key(*args, **kwargs)
        return key.format(**_arguments(signature, args, kwargs))

    def _call_tags(
        self,
        tags: TagsSpec,
        signature: inspect.Signature | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Iterable[str] | None:
        if tags is None:
            return None
        if callable(tags):
            return tags(*args, **kwargs)
        arguments = _arguments(signature, args, kwargs)
        return [tag.format(**arguments) for tag in tags]


def _arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    if signature is None:
        return dict(kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def check_specs(key: KeySpec, tags: TagsSpec) -> None:
    """Validate the ``cached`` decorator's ``key`` and ``tags`` at decoration time."""
    if key is not None and not isinstance(key, str) and not callable(key):
        raise ConfigurationError(f"key must be a format string or a callable, not {key!r}")
    if isinstance(tags, str):
        raise ConfigurationError(f"tags must be a list of strings or a callable, not {tags!r}")
