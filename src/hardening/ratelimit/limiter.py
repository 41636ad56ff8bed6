"""``RateLimiter`` and ``AsyncRateLimiter``: one configuration and decision logic, two drivers."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

from typing_extensions import Self

from hardening._clock import Clock, SystemClock, to_seconds
from hardening._health import Breaker, is_backend_failure
from hardening._redis import check_key_prefix, escape_prefix_part, redis_key
from hardening._storage import resolve_storage
from hardening.errors import BackendUnavailable, ConfigurationError
from hardening.ratelimit.policy import (
    STRATEGIES,
    HitRequest,
    HitResult,
    LimitsSpec,
    RateLimit,
    RateLimitDecision,
    RateLimitState,
    Strategy,
    TierSpec,
    parse_limits,
    parse_tiers,
)
from hardening.ratelimit.storage import (
    AsyncRateLimitStorage,
    AsyncRedisRateLimitStorage,
    MemoryRateLimitStorage,
    RateLimitStorage,
    RedisRateLimitStorage,
)

if TYPE_CHECKING:
    from hardening.metrics import Metrics

__all__ = ["AsyncRateLimiter", "BackendErrorMode", "RateLimiter"]

logger = logging.getLogger("hardening.ratelimit")

BackendErrorMode = Literal["allow", "deny", "local"]
P = ParamSpec("P")
R = TypeVar("R")
KeyArg = str | Callable[..., str]

_BLOCK_CACHE_MAX = 10_000
_REQUEST_CACHE_MAX = 4_096


class _LimiterBase:
    """Everything but I/O: configuration, keys, tiers, blocks, fallbacks, metrics."""

    _is_async = False

    def __init__(
        self,
        limits: LimitsSpec,
        *,
        storage: object = "memory://",
        strategy: Strategy = "sliding-window-counter",
        block_for: float | timedelta | None = None,
        on_backend_error: BackendErrorMode = "allow",
        key_prefix: str = "hardening",
        clock: Clock | None = None,
        tiers: Mapping[str, TierSpec] | None = None,
        metrics: Metrics | None = None,
        name: str = "default",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"unknown strategy {strategy!r}; one of {list(STRATEGIES)}")
        if on_backend_error not in ("allow", "deny", "local"):
            raise ConfigurationError(
                f"on_backend_error must be 'allow', 'deny' or 'local', not {on_backend_error!r}"
            )
        self.limits: tuple[RateLimit, ...] = parse_limits(limits)
        self._tier_specs: dict[str, TierSpec] = dict(tiers or {})
        self.tiers: dict[str, tuple[RateLimit, ...] | None] = parse_tiers(tiers, self.limits)
        self.strategy: Strategy = strategy
        self._code = STRATEGIES[strategy]
        self.block_for = 0.0 if block_for is None else to_seconds(block_for, name="block_for")
        self.on_backend_error: BackendErrorMode = on_backend_error
        self.key_prefix = check_key_prefix(key_prefix)
        self._rl_prefix = f"{key_prefix}:rl"
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        self.name = name
        self._storage = self._make_storage(storage)
        self._owns_storage = True
        self._health = Breaker(self.clock)
        self._fresh_state()

    def _fresh_state(self) -> None:
        """The per-limits state: in-process fallback counters, block cache, windows."""
        self._local = MemoryRateLimitStorage(clock=self.clock)
        self._requests: dict[tuple[str, int, str | None, bool], HitRequest] = {}
        self._blocked: dict[str, float] = {}  # storage key -> monotonic time the block ends
        self._blocked_lock = threading.Lock()
        windows = {limit.window for limit in self.limits}
        for tier_limits in self.tiers.values():
            windows.update(limit.window for limit in tier_limits or ())
        self._windows = frozenset(windows)

    def with_limits(self, limits: LimitsSpec, *, name: str) -> Self:
        """A limiter with other limits that shares this one's storage and settings.

        Used for per-route rules: the strategy, ``block_for``, ``on_backend_error``, clock,
        metrics and the storage (one Redis client, one backoff state) are shared; counters are
        not, because the new limiter's keys carry ``name`` in their prefix. Tiers defined as
        multipliers or as unlimited carry over; tiers with explicit limits do not (they were
        written for the other limits) and get the new base limits.

        Args:
            limits: the new limits, as for the constructor.
            name: the new limiter's name in metrics and in its key prefix.

        Returns:
            The new limiter. Closing it does nothing: close the limiter that owns the storage.

        Raises:
            ConfigurationError: ``limits`` is invalid.
        """
        clone = copy.copy(self)
        clone.limits = parse_limits(limits)
        clone._tier_specs = {
            tier: spec
            for tier, spec in self._tier_specs.items()
            if spec is None or spec == "unlimited" or isinstance(spec, (int, float))
        }
        clone.tiers = parse_tiers(clone._tier_specs, clone.limits)
        clone.name = name
        clone.key_prefix = f"{self.key_prefix}:{escape_prefix_part(name)}"
        clone._rl_prefix = f"{clone.key_prefix}:rl"
        clone._owns_storage = False
        clone._fresh_state()
        return clone

    def _make_storage(self, storage: object) -> Any:
        is_async = self._is_async
        return resolve_storage(
            storage,
            owner=type(self).__name__,
            is_async=is_async,
            kind="rate-limit",
            memory=lambda: MemoryRateLimitStorage(clock=self.clock),
            memory_type=MemoryRateLimitStorage,
            redis=lambda client, owns: (
                AsyncRedisRateLimitStorage if is_async else RedisRateLimitStorage
            )(client, owns_client=owns),
            protocol=AsyncRateLimitStorage if is_async else RateLimitStorage,
            method="hit",
        )

    # --- requests ----------------------------------------------------------------------

    def storage_key(self, key: str) -> str:
        """The storage key of ``key``: prefixed, hash-tagged for Redis Cluster, size-bounded.

        Args:
            key: the principal (a user id, an IP, ``"global"``...).

        Returns:
            ``<prefix>:rl:{<tag>}`` where the tag is ``key`` escaped by the shared key
            builder: braces, ``%`` and non-printable or non-ASCII characters are
            percent-encoded and keys over 200 characters replaced by their SHA-256, so no key
            can move another's hash slot, collide with it, or fail to encode.

        Raises:
            ConfigurationError: ``key`` is not a string.
        """
        if not isinstance(key, str):
            raise ConfigurationError(f"rate-limit key must be a string, not {type(key).__name__}")
        return redis_key(self._rl_prefix, key)

    def limits_for(self, tier: str | None) -> tuple[RateLimit, ...] | None:
        """The limits that apply to ``tier`` (``None``: unlimited). Unknown tiers get the base."""
        if tier is None:
            return self.limits
        return self.tiers.get(tier, self.limits)

    def _request(self, key: str, cost: int, tier: str | None, peek: bool) -> HitRequest | None:
        # the same principals come back on every request: build their (immutable) request once
        cache_key = (key, cost, tier, peek)
        cached = self._requests.get(cache_key)
        if cached is not None and type(key) is str and type(cost) is int:
            return cached
        request = self._new_request(key, cost, tier, peek)
        if request is not None:
            if len(self._requests) >= _REQUEST_CACHE_MAX:
                self._requests.clear()
            self._requests[cache_key] = request
        return request

    def _new_request(self, key: str, cost: int, tier: str | None, peek: bool) -> HitRequest | None:
        if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
            raise ConfigurationError(f"cost must be a positive integer, not {cost!r}")
        limits = self.limits_for(tier)
        if limits is None:
            return None
        return HitRequest(
            key=self.storage_key(key),
            limits=limits,
            strategy=self._code,
            cost=cost,
            block_for=self.block_for,
            peek=peek,
        )

    def _begin(
        self, key: str, cost: int, tier: str | None, peek: bool
    ) -> tuple[HitRequest, RateLimitDecision | int]:
        """Everything before the storage call: the request, and a decision or a ticket.

        The decision is one made without I/O; otherwise the breaker's ticket for the call.
        Such decisions: an unlimited tier, a key blocked in process, or an open breaker.
        """
        request = self._request(key, cost, tier, peek)
        if request is None:
            return HitRequest(key, (), self._code), self._unlimited(key)
        cached = self._cached_block(key, request)
        if cached is not None:
            return request, cached
        ticket = self._health.admit()
        if ticket is None:
            return request, self._fallback(key, request)
        return request, ticket

    # --- outcomes ----------------------------------------------------------------------

    def _cached_block(self, key: str, request: HitRequest) -> RateLimitDecision | None:
        if not self._blocked:
            return None
        until = self._blocked.get(request.key)
        if until is None:
            return None
        left = until - self.clock.monotonic()
        if left <= 0:
            with self._blocked_lock:
                self._blocked.pop(request.key, None)
            return None
        states = tuple(RateLimitState(limit, 0, left, left) for limit in request.limits)
        result = HitResult(False, states, self.clock.time(), blocked_for=left)
        decision = RateLimitDecision.from_result(key, result)
        return self._report(decision, request)

    def _remember_block(self, request: HitRequest, seconds: float) -> None:
        now = self.clock.monotonic()
        with self._blocked_lock:
            if len(self._blocked) >= _BLOCK_CACHE_MAX:
                for stale in [k for k, until in self._blocked.items() if until <= now]:
                    del self._blocked[stale]
                if len(self._blocked) >= _BLOCK_CACHE_MAX:
                    self._blocked.clear()  # a flood of blocked keys: the store still knows
            self._blocked[request.key] = now + seconds

    def _finish(self, key: str, request: HitRequest, result: HitResult) -> RateLimitDecision:
        decision = RateLimitDecision.from_result(key, result)
        if decision.blocked and not request.peek:
            # until then every hit is refused anyway: answer it here without a round trip
            self._remember_block(request, decision.retry_after or result.blocked_for)
        return self._report(decision, request)

    def _report(self, decision: RateLimitDecision, request: HitRequest) -> RateLimitDecision:
        if self.metrics is not None and not request.peek:
            if decision.error:
                outcome = "error"
            elif decision.blocked:
                outcome = "blocked"
            else:
                outcome = "allowed" if decision.allowed else "denied"
            self.metrics.rate_limit_decision(self.name, outcome)
        return decision

    def _failed(
        self, key: str, request: HitRequest, ticket: int, exc: Exception
    ) -> RateLimitDecision:
        """A storage call failed: open the breaker if the backend did; answer by policy."""
        if is_backend_failure(exc):
            if self._health.failed(ticket):
                logger.warning(
                    "rate-limit storage failed; on_backend_error=%r until it answers again",
                    self.on_backend_error,
                    exc_info=exc,
                )
        else:  # this request's own keys or arguments: it alone fails
            self._health.abandon(ticket)
            logger.warning(
                "rate-limit storage refused the hit for one key (%s: %s); "
                "on_backend_error=%r for this request only",
                type(exc).__name__,
                exc,
                self.on_backend_error,
            )
        return self._fallback(key, request)

    def _backend_ok(self) -> None:
        if self._health.succeeded():
            logger.warning("rate-limit storage answers again")

    def _fallback(self, key: str, request: HitRequest) -> RateLimitDecision:
        mode = self.on_backend_error
        now = self.clock.time()
        if mode == "local":
            decision = RateLimitDecision.from_result(key, self._local.hit(request))
        else:
            limit = min(request.limits, key=lambda limit: limit.window)
            denied = mode == "deny"
            decision = RateLimitDecision(
                allowed=not denied,
                limit=limit.amount,
                remaining=0 if denied else limit.amount,
                reset_after=limit.window,
                retry_after=self._health.retry_in() if denied else None,
                key=key,
                timestamp=now,
            )
        return self._report(dataclasses.replace(decision, error=True), request)

    def _forget_locally(self, key: str) -> str:
        skey = self.storage_key(key)
        with self._blocked_lock:
            self._blocked.pop(skey, None)
        self._local.reset(skey, self._code, self._windows)
        return skey

    def _unlimited(self, key: str) -> RateLimitDecision:
        return RateLimitDecision.unlimited(key, self.clock.time())

    def _key_of(self, key: KeyArg, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return key(*args, **kwargs) if callable(key) else key

    def __repr__(self) -> str:
        limits = ";".join(str(limit) for limit in self.limits)
        return f"{type(self).__name__}({limits!r}, strategy={self.strategy!r}, name={self.name!r})"


class RateLimiter(_LimiterBase):
    """A blocking rate limiter: sliding windows, tiers, blocking, bypass-friendly keys.

    Args:
        limits: ``"30/minute"``, ``"30/minute;500/hour"``, a list of those, or parsed ``limits``
            items. Several limits on one key are checked all-or-nothing: a denied hour limit
            does not consume the minute limit.
        storage: ``"memory://"`` (default), a ``redis://``, ``rediss://``, ``redis+cluster://``
            or ``redis+sentinel://`` URL, a ``redis.Redis`` / ``RedisCluster`` client, or a
            :class:`~hardening.ratelimit.RateLimitStorage`.
        strategy: ``"sliding-window-counter"`` (default; O(1) state, weighted estimate),
            ``"moving-window"`` (exact log: never more than N in any window) or
            ``"fixed-window"``.
        block_for: seconds (or a timedelta) a key stays blocked once it exceeds a limit.
            Blocked keys are also remembered in process, so they cost no round trip.
        on_backend_error: when the storage fails: ``"allow"`` (fail open, the default),
            ``"deny"`` (fail closed; the adapters answer 503 with ``Retry-After``, not 429) or
            ``"local"`` (an in-process limiter until the storage answers again). After a
            backend failure the shared breaker sends one probe per window (0.5 s doubling to
            30 s per failed probe); a busy connection pool makes callers wait (it is not a
            failure), and an error caused by one key alone fails only that hit. Never raises.
        key_prefix: prefix of every storage key.
        clock: the clock for the memory storage and the block cache.
        tiers: tier name to a multiplier of ``limits``, explicit limits, or ``None`` /
            ``"unlimited"``. Counters are kept per window, so a tier change keeps them.
        metrics: a :class:`~hardening.Metrics` registry to count decisions into.
        name: the limiter's label in metrics.

    Raises:
        ConfigurationError: a limit, tier, strategy or storage is invalid.
    """

    def hit(self, key: str, *, cost: int = 1, tier: str | None = None) -> RateLimitDecision:
        """Check ``key`` and, when every limit allows it, charge ``cost``.

        Args:
            key: the principal to limit.
            cost: units this call costs (a positive integer).
            tier: the principal's tier; ``None`` for the base limits.

        Returns:
            The decision; never raises for storage failures (see ``on_backend_error``).

        Raises:
            ConfigurationError: ``key`` is not a string or ``cost`` is not a positive integer.
        """
        return self._check(key, cost, tier, peek=False)

    def peek(self, key: str, tier: str | None = None) -> RateLimitDecision:
        """Return what a hit of cost 1 would decide now, without charging anything.

        Args:
            key: the principal.
            tier: its tier.

        Returns:
            The decision.
        """
        return self._check(key, 1, tier, peek=True)

    def _check(self, key: str, cost: int, tier: str | None, *, peek: bool) -> RateLimitDecision:
        request, ticket = self._begin(key, cost, tier, peek)
        if not isinstance(ticket, int):
            return ticket
        storage: RateLimitStorage = self._storage
        try:
            result = storage.hit(request)
        except Exception as exc:  # any storage failure is handled by on_backend_error
            return self._failed(key, request, ticket, exc)
        except BaseException:
            self._health.abandon(ticket)
            raise
        self._backend_ok()
        return self._finish(key, request, result)

    def reset(self, key: str) -> None:
        """Forget ``key``'s counters and any block, in the storage and in this process.

        Args:
            key: the principal.

        Raises:
            BackendUnavailable: the storage failed; a reset is an operator action that must
                not silently do nothing.
        """
        skey = self._forget_locally(key)
        storage: RateLimitStorage = self._storage
        try:
            storage.reset(skey, self._code, self._windows)
        except Exception as exc:
            raise BackendUnavailable("rate-limit storage", str(exc)) from exc

    def close(self) -> None:
        """Close the Redis client if the limiter built it from a URL (idempotent)."""
        close = getattr(self._storage, "close", None)
        if close is not None and self._owns_storage:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def limit(
        self, key: KeyArg, *, cost: int = 1, tier: str | None = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a sync or async function so each call is rate limited.

        Args:
            key: a fixed key, or a callable given the function's arguments that returns one.
            cost: units each call costs.
            tier: the tier to apply.

        Returns:
            The decorator. A denied call raises :class:`~hardening.RateLimitExceeded` carrying
            the decision, ``retry_after`` and the headers; a call denied because the storage
            failed (``on_backend_error="deny"``) raises :class:`~hardening.BackendUnavailable`
            (HTTP 503) with the breaker's ``retry_after``.
        """

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(func):
                afunc = cast(Callable[P, Awaitable[Any]], func)

                @functools.wraps(func)
                async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                    decision = self.hit(self._key_of(key, args, kwargs), cost=cost, tier=tier)
                    if not decision.allowed:
                        raise decision.refusal()
                    return await afunc(*args, **kwargs)

                return cast(Callable[P, R], async_wrapper)

            @functools.wraps(func)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                decision = self.hit(self._key_of(key, args, kwargs), cost=cost, tier=tier)
                if not decision.allowed:
                    raise decision.refusal()
                return func(*args, **kwargs)

            return wrapper

        return decorate


class AsyncRateLimiter(_LimiterBase):
    """The asyncio twin of :class:`RateLimiter`: same options, same decisions, awaitable I/O.

    It never blocks the event loop: Redis is reached through ``redis.asyncio``; the memory
    storage only computes. Takes the same arguments as :class:`RateLimiter`, with
    ``redis.asyncio`` clients in place of blocking ones.
    """

    _is_async = True

    async def hit(self, key: str, *, cost: int = 1, tier: str | None = None) -> RateLimitDecision:
        """Check ``key`` and, when every limit allows it, charge ``cost``.

        Args:
            key: the principal to limit.
            cost: units this call costs (a positive integer).
            tier: the principal's tier; ``None`` for the base limits.

        Returns:
            The decision; never raises for storage failures (see ``on_backend_error``).

        Raises:
            ConfigurationError: ``key`` is not a string or ``cost`` is not a positive integer.
        """
        return await self._check(key, cost, tier, peek=False)

    async def peek(self, key: str, tier: str | None = None) -> RateLimitDecision:
        """Return what a hit of cost 1 would decide now, without charging anything.

        Args:
            key: the principal.
            tier: its tier.

        Returns:
            The decision.
        """
        return await self._check(key, 1, tier, peek=True)

    async def _check(
        self, key: str, cost: int, tier: str | None, *, peek: bool
    ) -> RateLimitDecision:
        request, ticket = self._begin(key, cost, tier, peek)
        if not isinstance(ticket, int):
            return ticket
        storage = self._storage
        try:
            if isinstance(storage, MemoryRateLimitStorage):
                result = storage.hit(request)
            else:
                result = await cast(AsyncRateLimitStorage, storage).hit(request)
        except Exception as exc:  # any storage failure is handled by on_backend_error
            return self._failed(key, request, ticket, exc)
        except BaseException:  # cancelled: no answer either way
            self._health.abandon(ticket)
            raise
        self._backend_ok()
        return self._finish(key, request, result)

    async def reset(self, key: str) -> None:
        """Forget ``key``'s counters and any block, in the storage and in this process.

        Args:
            key: the principal.

        Raises:
            BackendUnavailable: the storage failed.
        """
        skey = self._forget_locally(key)
        storage = self._storage
        try:
            if isinstance(storage, MemoryRateLimitStorage):
                storage.reset(skey, self._code, self._windows)
            else:
                await cast(AsyncRateLimitStorage, storage).reset(skey, self._code, self._windows)
        except Exception as exc:
            raise BackendUnavailable("rate-limit storage", str(exc)) from exc

    async def aclose(self) -> None:
        """Close the Redis client if the limiter built it from a URL (idempotent)."""
        aclose = getattr(self._storage, "aclose", None)
        if aclose is not None and self._owns_storage:
            await aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def limit(
        self, key: KeyArg, *, cost: int = 1, tier: str | None = None
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Decorate an ``async def`` function so each call is rate limited.

        Args:
            key: a fixed key, or a callable given the function's arguments that returns one.
            cost: units each call costs.
            tier: the tier to apply.

        Returns:
            The decorator. A denied call raises :class:`~hardening.RateLimitExceeded` (or
            :class:`~hardening.BackendUnavailable` when denied because the storage failed).

        Raises:
            ConfigurationError: when applied to a plain (non-async) function.
        """

        def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(
                    "AsyncRateLimiter.limit decorates async functions; use RateLimiter for sync"
                )

            @functools.wraps(func)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                decision = await self.hit(self._key_of(key, args, kwargs), cost=cost, tier=tier)
                if not decision.allowed:
                    raise decision.refusal()
                return await func(*args, **kwargs)

            return wrapper

        return decorate
