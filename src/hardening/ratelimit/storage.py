"""Rate-limit storages: where counters live. One small protocol, sync and async.

``MemoryRateLimitStorage`` runs the policy functions in process (the embedded default, bounded:
expired keys are reclaimed as time passes). ``RedisRateLimitStorage`` and
``AsyncRedisRateLimitStorage`` run one Lua script (``lua/hit.lua``, one ``EVALSHA``) per hit,
whatever the number of limits, with Redis' own clock.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from hardening._clock import SystemClock
from hardening._redis import read_lua
from hardening.ratelimit.policy import (
    CounterState,
    HitRequest,
    HitResult,
    RateLimit,
    RateLimitState,
    counter_commit,
    counter_hit,
    moving_window_hit,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from hardening._clock import Clock

__all__ = [
    "AsyncRateLimitStorage",
    "AsyncRedisRateLimitStorage",
    "MemoryRateLimitStorage",
    "RateLimitStorage",
    "RedisRateLimitStorage",
    "state_key",
]


def state_key(key: str, strategy: str, window: float) -> str:
    """The storage key of one limit's state: ``<key>:<strategy>:<window in ms>``."""
    return f"{key}:{strategy}:{round(window * 1000)}"


def block_key(key: str) -> str:
    """The storage key marking a blocked principal."""
    return f"{key}:block"


@runtime_checkable
class RateLimitStorage(Protocol):
    """A blocking storage for rate-limit state."""

    def hit(self, request: HitRequest) -> HitResult:
        """Check every limit of ``request.key`` together and charge them all or none."""
        ...

    def reset(self, key: str, strategy: str, windows: Iterable[float]) -> None:
        """Forget every counter and any block of ``key``."""
        ...


@runtime_checkable
class AsyncRateLimitStorage(Protocol):
    """An asyncio storage for rate-limit state; same semantics as :class:`RateLimitStorage`."""

    async def hit(self, request: HitRequest) -> HitResult:
        """Check every limit of ``request.key`` together and charge them all or none."""
        ...

    async def reset(self, key: str, strategy: str, windows: Iterable[float]) -> None:
        """Forget every counter and any block of ``key``."""
        ...


# --- memory ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    blocked_until: float = 0.0
    expires_at: float = 0.0
    counters: dict[tuple[str, float], CounterState] = field(default_factory=dict)
    logs: dict[float, deque[float]] = field(default_factory=dict)


class MemoryRateLimitStorage:
    """In-process storage: exact, thread-safe, and bounded.

    Each key is forgotten once its longest window (twice that for counters, which weigh the
    previous window) and any block have passed; reclaiming is incremental, a few expired keys
    per call, so memory follows the number of *active* keys and no timer thread is needed.
    Not shared between processes: use Redis for several workers or hosts.

    Args:
        clock: the clock to decide by (a :class:`~hardening.FakeClock` in tests).
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._expiry: list[tuple[float, str]] = []  # one (expires_at, key) per live key

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, request: HitRequest) -> HitResult:
        """Check every limit of ``request.key`` together and charge them all or none.

        Args:
            request: what to check.

        Returns:
            The verdict and each limit's state.
        """
        now = self._clock.time()
        with self._lock:
            self._reclaim(now)
            entry = self._entries.get(request.key)
            created = entry is None
            if entry is None:
                entry = self._entries[request.key] = _Entry()
            if entry.blocked_until > now:
                left = entry.blocked_until - now
                states = tuple(RateLimitState(limit, 0, left, left) for limit in request.limits)
                return HitResult(False, states, now, blocked_for=left)
            result = self._evaluate(entry, request, now)
            longest = max(limit.window for limit in request.limits)
            entry.expires_at = max(entry.expires_at, now + 2 * longest, entry.blocked_until)
            if created:
                heapq.heappush(self._expiry, (entry.expires_at, request.key))
            return result

    def _evaluate(self, entry: _Entry, request: HitRequest, now: float) -> HitResult:
        cost, strategy = request.cost, request.strategy
        if len(request.limits) == 1 and strategy != "mw" and not request.peek:
            # the common case, without the all-or-nothing bookkeeping for several limits
            (limit,) = request.limits
            counters = entry.counters
            counter = counters.get((strategy, limit.window))
            if counter is None:
                counter = counters[(strategy, limit.window)] = CounterState()
            ok, state = counter_hit(counter, limit, now, cost, sliding=strategy == "swc")
            if ok:
                counter_commit(counter, cost)
                return HitResult(True, (state,), now)
            if request.block_for > 0:
                entry.blocked_until = now + request.block_for
                return HitResult(False, (state,), now, blocked_for=request.block_for)
            return HitResult(False, (state,), now)
        verdicts = []
        if strategy == "mw":
            for limit in request.limits:
                log = entry.logs.setdefault(limit.window, deque())
                verdicts.append(moving_window_hit(log, limit, now, cost))
        else:
            for limit in request.limits:
                counter = entry.counters.setdefault((strategy, limit.window), CounterState())
                verdicts.append(counter_hit(counter, limit, now, cost, sliding=strategy == "swc"))
        allowed = all(ok for ok, _ in verdicts)
        if allowed and not request.peek:
            states = tuple(state for _, state in verdicts)
        else:  # nothing is charged: limits that would allow show what is left *now*
            states = tuple(
                dataclasses.replace(state, remaining=state.remaining + cost) if ok else state
                for ok, state in verdicts
            )
        if request.peek:
            return HitResult(allowed, states, now)
        if allowed:
            for limit in request.limits:
                if strategy == "mw":
                    entry.logs[limit.window].extend([now] * cost)
                else:
                    counter_commit(entry.counters[(strategy, limit.window)], cost)
            return HitResult(True, states, now)
        if request.block_for > 0:
            entry.blocked_until = now + request.block_for
            return HitResult(False, states, now, blocked_for=request.block_for)
        return HitResult(False, states, now)

    def _reclaim(self, now: float, budget: int = 8) -> None:
        expiry = self._expiry
        while budget and expiry and expiry[0][0] <= now:
            budget -= 1
            _, key = heapq.heappop(expiry)
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.expires_at <= now:
                del self._entries[key]
            else:  # touched since it was scheduled: look again when it really expires
                heapq.heappush(expiry, (entry.expires_at, key))

    def reset(self, key: str, strategy: str, windows: Iterable[float]) -> None:
        """Forget every counter and any block of ``key``."""
        with self._lock:
            self._entries.pop(key, None)


# --- Redis -------------------------------------------------------------------------------


def _script_call(
    request: HitRequest,
) -> tuple[list[str], list[str | int | float]]:
    keys = [block_key(request.key)]
    args: list[str | int | float] = [
        request.strategy,
        request.cost,
        round(request.block_for * 1000),
        "1" if request.peek else "0",
    ]
    for limit in request.limits:
        keys.append(state_key(request.key, request.strategy, limit.window))
        args.extend((limit.amount, round(limit.window * 1000)))
    return keys, args


def _parse_reply(limits: tuple[RateLimit, ...], reply: Sequence[int]) -> HitResult:
    values = [int(v) for v in reply]
    states = []
    for i, limit in enumerate(limits):
        remaining, reset_ms, retry_ms = values[4 + 3 * i : 7 + 3 * i]
        retry = retry_ms / 1000 if retry_ms >= 0 else None
        states.append(RateLimitState(limit, remaining, reset_ms / 1000, retry))
    return HitResult(
        allowed=values[0] == 1,
        states=tuple(states),
        now=values[2] / 1000,
        blocked_for=values[3] / 1000 if values[1] else 0.0,
    )


def _all_keys(key: str, strategy: str, windows: Iterable[float]) -> list[str]:
    return [block_key(key), *(state_key(key, strategy, w) for w in sorted(set(windows)))]


class RedisRateLimitStorage:
    """Redis (or Redis Cluster, or a Sentinel master) storage: one ``EVALSHA`` per hit.

    Every key of one principal carries the same hash tag (the limiter wraps it in ``{}``), so
    on a cluster one script reaches all of them in one slot.

    Args:
        client: a ``redis.Redis``, ``redis.cluster.RedisCluster`` or Sentinel master client.
        owns_client: close the client in :meth:`close` (true when built from a URL).
    """

    def __init__(self, client: Any, *, owns_client: bool = False) -> None:
        self.client = client
        self.owns_client = owns_client
        self._script = client.register_script(read_lua("hardening.ratelimit", "hit.lua"))

    def close(self) -> None:
        """Close the client if this storage created it."""
        if self.owns_client:
            self.client.close()

    def hit(self, request: HitRequest) -> HitResult:
        """Run the hit script; see :class:`RateLimitStorage`."""
        keys, args = _script_call(request)
        return _parse_reply(request.limits, self._script(keys=keys, args=args))

    def reset(self, key: str, strategy: str, windows: Iterable[float]) -> None:
        """Delete every counter and any block of ``key``."""
        self.client.delete(*_all_keys(key, strategy, windows))


class AsyncRedisRateLimitStorage:
    """The asyncio twin of :class:`RedisRateLimitStorage`: same script and keys, never blocks.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` client.
        owns_client: close the client in :meth:`aclose` (true when built from a URL).
    """

    def __init__(self, client: Any, *, owns_client: bool = False) -> None:
        self.client = client
        self.owns_client = owns_client
        self._script = client.register_script(read_lua("hardening.ratelimit", "hit.lua"))

    async def aclose(self) -> None:
        """Close the client if this storage created it."""
        if self.owns_client:
            await self.client.aclose()

    async def hit(self, request: HitRequest) -> HitResult:
        """Run the hit script; see :class:`RateLimitStorage`."""
        keys, args = _script_call(request)
        return _parse_reply(request.limits, await self._script(keys=keys, args=args))

    async def reset(self, key: str, strategy: str, windows: Iterable[float]) -> None:
        """Delete every counter and any block of ``key``."""
        await self.client.delete(*_all_keys(key, strategy, windows))
