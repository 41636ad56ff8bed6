"""Rate-limit policy: pure code, no I/O and no clock reads.

What a limit is, how tiers change it, how each strategy counts, what a decision is and which
HTTP headers describe it. The memory storage runs these functions directly; the Redis Lua script
(``lua/hit.lua``) mirrors them line for line, and one contract test suite holds both to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

from hardening.errors import BackendUnavailable, ConfigurationError, RateLimitExceeded

if TYPE_CHECKING:
    from collections import deque

    from limits import RateLimitItem

__all__ = [
    "STRATEGIES",
    "CounterState",
    "HitRequest",
    "HitResult",
    "LimitsSpec",
    "RateLimit",
    "RateLimitDecision",
    "RateLimitState",
    "Strategy",
    "TierSpec",
    "counter_hit",
    "moving_window_hit",
    "parse_limits",
    "parse_tiers",
]

Strategy = Literal["sliding-window-counter", "moving-window", "fixed-window"]
STRATEGIES: dict[str, str] = {
    "sliding-window-counter": "swc",
    "moving-window": "mw",
    "fixed-window": "fw",
}
# Type aliases as strings: ``limits`` is an optional dependency, imported for type checking only.
LimitsSpec: TypeAlias = (
    "str | RateLimitItem | RateLimit | Sequence[str | RateLimitItem | RateLimit]"
)
TierSpec: TypeAlias = "float | LimitsSpec | None"
UNLIMITED = "unlimited"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One limit: at most ``amount`` units of cost per ``window`` seconds.

    Attributes:
        amount: the quota per window.
        window: the window's length in seconds.
    """

    amount: int
    window: float

    def __post_init__(self) -> None:
        if self.amount < 1 or not (self.window > 0 and math.isfinite(self.window)):
            raise ConfigurationError(f"a limit needs amount >= 1 and window > 0, got {self}")

    @property
    def name(self) -> str:
        """The policy name used in ``RateLimit-Policy``, e.g. ``"30-per-60s"``."""
        return f"{self.amount}-per-{self.window:g}s"

    def scaled(self, factor: float) -> RateLimit:
        """Return this limit with its amount multiplied by ``factor`` (at least 1)."""
        return RateLimit(max(1, math.floor(self.amount * factor)), self.window)

    def __str__(self) -> str:
        return f"{self.amount}/{self.window:g}s"


def _parse_one(item: str | RateLimitItem | RateLimit) -> list[RateLimit]:
    if isinstance(item, RateLimit):
        return [item]
    if isinstance(item, str):
        from hardening._imports import require

        limits = require("limits", extra="ratelimit", feature="parsing rate-limit strings")
        try:
            parsed = limits.parse_many(item)
        except ValueError as exc:
            raise ConfigurationError(f"cannot parse rate limit {item!r}: {exc}") from exc
        return [RateLimit(int(p.amount), float(p.get_expiry())) for p in parsed]
    if hasattr(item, "amount") and hasattr(item, "get_expiry"):  # a limits.RateLimitItem
        return [RateLimit(int(item.amount), float(item.get_expiry()))]
    raise ConfigurationError(f"not a rate limit: {item!r}")


def parse_limits(spec: LimitsSpec) -> tuple[RateLimit, ...]:
    """Parse limits given in ``limits``' notation, as ``limits`` items, or as :class:`RateLimit`.

    Args:
        spec: ``"30/minute"``, ``"30/minute;500/hour"``, a list of those, parsed
            ``limits.RateLimitItem`` objects or :class:`RateLimit` objects.

    Returns:
        The limits, sorted by window (shortest first), one per window.

    Raises:
        ConfigurationError: the spec is empty, malformed, or names one window twice.
    """
    items: Sequence[str | RateLimitItem | RateLimit]
    items = [spec] if isinstance(spec, (str, RateLimit)) or hasattr(spec, "get_expiry") else spec  # type: ignore[list-item]
    result: list[RateLimit] = []
    for item in items:
        result.extend(_parse_one(item))
    if not result:
        raise ConfigurationError(f"no rate limit given: {spec!r}")
    windows = [limit.window for limit in result]
    if len(set(windows)) != len(windows):
        raise ConfigurationError(f"two limits share one window in {spec!r}")
    return tuple(sorted(result, key=lambda limit: limit.window))


def parse_tiers(
    tiers: Mapping[str, TierSpec] | None, base: tuple[RateLimit, ...]
) -> dict[str, tuple[RateLimit, ...] | None]:
    """Resolve tier definitions against the base limits.

    A tier is a multiplier of the base limits (``2.5``), explicit limits (``"50/hour"``), or
    unlimited (``None`` or ``"unlimited"``). Multiplied tiers keep the base windows, so counters
    (keyed by window, never by amount) survive a change of tier.

    Args:
        tiers: tier name to definition.
        base: the limiter's base limits.

    Returns:
        Tier name to its limits, or ``None`` for unlimited.

    Raises:
        ConfigurationError: a definition is malformed or a multiplier is not positive.
    """
    resolved: dict[str, tuple[RateLimit, ...] | None] = {}
    for name, spec in (tiers or {}).items():
        if spec is None or spec == UNLIMITED:
            resolved[name] = None
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            if not (spec > 0 and math.isfinite(spec)):
                raise ConfigurationError(f"tier {name!r}: multiplier must be > 0, got {spec}")
            resolved[name] = tuple(limit.scaled(spec) for limit in base)
        else:
            resolved[name] = parse_limits(spec)  # type: ignore[arg-type]
    return resolved


# --- accounting --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """Where one limit stands after a hit.

    Attributes:
        limit: the limit.
        remaining: whole units of quota left.
        reset_after: seconds until the window rolls over (counters) or the oldest hit leaves
            it (moving window).
        retry_after: for a limit that refused the hit, seconds until the same hit would pass;
            ``None`` for a limit that allowed it.
    """

    limit: RateLimit
    remaining: int
    reset_after: float
    retry_after: float | None = None


@dataclass(slots=True)
class CounterState:
    """A fixed- or sliding-window counter: the current window's index and two counts."""

    index: int = 0
    current: float = 0.0
    previous: float = 0.0


# Tolerance on counts: a weighted count computed at the advertised retry time must pass.
_EPS = 1e-6


def _ceil_ms(seconds: float) -> float:
    # Redis decides in whole milliseconds; round the same way so both backends agree.
    return math.ceil(round(seconds * 1000, 6)) / 1000


def counter_hit(
    state: CounterState, limit: RateLimit, now: float, cost: int, *, sliding: bool
) -> tuple[bool, RateLimitState]:
    """Evaluate a fixed- or sliding-window counter and roll ``state`` forward to ``now``.

    The sliding counter weighs the previous window's count by the part of it still inside the
    sliding window (Cloudflare's estimate); the fixed window ignores it. ``state`` is updated in
    place to the current window but **not** charged: the caller commits with
    :func:`counter_commit` only when every limit of the key allows the hit.

    Args:
        state: the stored counter, rolled forward in place.
        limit: the limit to check.
        now: the current time in seconds.
        cost: the units this hit costs.
        sliding: sliding-window counter if true, fixed window if false.

    Returns:
        Whether the limit allows the hit, and the limit's state as if it were committed.
    """
    window = limit.window
    index = math.floor(now / window)
    if state.index == index - 1:
        state.previous, state.current = state.current, 0.0
    elif state.index != index:
        state.previous = state.current = 0.0
    state.index = index
    elapsed = now - index * window
    weight = 1 - elapsed / window if sliding else 0.0
    used = state.previous * weight + state.current
    reset_after = _ceil_ms(window - elapsed)
    amount = limit.amount
    if used + cost <= amount + _EPS:
        return True, RateLimitState(limit, math.floor(amount - used - cost + _EPS), reset_after)
    if cost > amount:
        retry = window  # can never pass; point at one window so clients back off
    elif state.previous > 0 and sliding and state.current + cost <= amount:
        # passes once the previous window's weight has decayed far enough
        retry = window * (1 - (amount - state.current - cost) / state.previous) - elapsed
    elif sliding and state.current > 0:
        # next window: current becomes previous and must decay too
        retry = (window - elapsed) + window * (1 - (amount - cost) / state.current)
    else:
        retry = window - elapsed
    remaining = max(0, math.floor(amount - used + _EPS))
    return False, RateLimitState(limit, remaining, reset_after, _ceil_ms(max(retry, 0.001)))


def counter_commit(state: CounterState, cost: int) -> None:
    """Charge ``cost`` to a counter already rolled forward by :func:`counter_hit`."""
    state.current += cost


def moving_window_hit(
    log: deque[float], limit: RateLimit, now: float, cost: int
) -> tuple[bool, RateLimitState]:
    """Evaluate an exact sliding log: never more than ``amount`` units in any window.

    Entries at or before ``now - window`` are dropped from ``log`` (oldest first, one entry per
    unit of cost). The hit is **not** recorded; the caller appends ``cost`` copies of ``now``
    when every limit allows it.

    Args:
        log: the timestamps of admitted units, oldest first; pruned in place.
        limit: the limit to check.
        now: the current time in seconds.
        cost: the units this hit costs.

    Returns:
        Whether the limit allows the hit, and the limit's state as if it were recorded.
    """
    window = limit.window
    horizon = now - window
    while log and log[0] <= horizon:
        log.popleft()
    count = len(log)
    amount = limit.amount
    reset_after = _ceil_ms((log[0] if log else now) + window - now)
    if count + cost <= amount:
        return True, RateLimitState(limit, amount - count - cost, reset_after)
    retry = window if cost > amount else log[count + cost - amount - 1] + window - now
    return False, RateLimitState(limit, max(0, amount - count), reset_after, _ceil_ms(retry))


# --- storage exchange --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HitRequest:
    """What a limiter asks of a storage: check (and unless ``peek``, charge) one key.

    Attributes:
        key: the storage key of the principal, already prefixed and hash-tagged.
        limits: the limits to check together, all-or-nothing.
        strategy: the short strategy code (``"swc"``, ``"mw"``, ``"fw"``).
        cost: units to charge.
        block_for: seconds to block the key after a refused hit (0 for none).
        peek: check only; charge nothing and never start a block.
    """

    key: str
    limits: tuple[RateLimit, ...]
    strategy: str
    cost: int = 1
    block_for: float = 0.0
    peek: bool = False


@dataclass(frozen=True, slots=True)
class HitResult:
    """What a storage answers: the verdict and every limit's state, read at one instant.

    Attributes:
        allowed: every limit allowed the hit (and it was charged, unless peeking).
        states: one state per requested limit, in request order.
        now: the storage's clock (epoch seconds) when it decided.
        blocked_for: seconds the key stays blocked (0 when not blocked).
    """

    allowed: bool
    states: tuple[RateLimitState, ...]
    now: float
    blocked_for: float = 0.0


# --- decision ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The answer to one rate-limit check. Immutable.

    Attributes:
        allowed: whether the call may proceed.
        limit: the quota of the binding limit (the one with the least left), or ``None`` when
            the key is unlimited.
        remaining: units left in the binding limit.
        reset_after: seconds until the binding limit's window resets.
        retry_after: when denied, seconds until a retry can pass; ``None`` when allowed.
        blocked: the key is blocked for abusing its limit (``block_for``).
        key: the key that was checked (as given, before prefixing).
        states: every limit's state.
        timestamp: the deciding clock's time (epoch seconds).
        error: the backend failed and the decision comes from ``on_backend_error``.
    """

    allowed: bool
    limit: int | None
    remaining: int
    reset_after: float
    retry_after: float | None = None
    blocked: bool = False
    key: str = ""
    states: tuple[RateLimitState, ...] = field(default=(), repr=False)
    timestamp: float = 0.0
    error: bool = False

    @classmethod
    def from_result(cls, key: str, result: HitResult) -> RateLimitDecision:
        """Summarise a storage result: the binding limit is the one that leaves least."""
        states = result.states
        if result.blocked_for > 0:
            # the block may end before the limit itself would let the hit through
            retry = max([result.blocked_for, *(s.retry_after or 0.0 for s in states)])
            return cls(
                allowed=False,
                limit=states[0].limit.amount if states else None,
                remaining=0,
                reset_after=result.blocked_for,
                retry_after=retry,
                blocked=True,
                key=key,
                states=states,
                timestamp=result.now,
            )
        if result.allowed:
            binding = (
                states[0]
                if len(states) == 1
                else min(states, key=lambda s: (s.remaining, -s.reset_after))
            )
            retry_after = None
        else:
            refused = [s for s in states if s.retry_after is not None]
            binding = max(refused, key=lambda s: s.retry_after or 0.0)
            retry_after = binding.retry_after
        return cls(
            allowed=result.allowed,
            limit=binding.limit.amount,
            remaining=binding.remaining,
            reset_after=binding.reset_after,
            retry_after=retry_after,
            key=key,
            states=states,
            timestamp=result.now,
        )

    @classmethod
    def unlimited(cls, key: str, now: float) -> RateLimitDecision:
        """A decision for a key whose tier has no limit."""
        return cls(allowed=True, limit=None, remaining=0, reset_after=0.0, key=key, timestamp=now)

    def exceeded(self) -> RateLimitExceeded:
        """The error a denied call raises.

        Returns:
            A :class:`~hardening.RateLimitExceeded` with the binding limit (``"30/60s"``),
            ``retry_after``, the headers and this decision.
        """
        refused = [state for state in self.states if state.retry_after is not None]
        binding = max(refused, key=lambda state: state.retry_after or 0.0) if refused else None
        return RateLimitExceeded(
            self.key,
            self.retry_after or 0.0,
            limit=str(binding.limit) if binding else str(self.limit or ""),
            headers=self.headers(),
            decision=self,
        )

    def refusal(self) -> RateLimitExceeded | BackendUnavailable:
        """The error a refused call raises: over its limit (429) or the store is down (503).

        Returns:
            :meth:`exceeded` for a real denial; for a denial made because the storage failed
            (``on_backend_error="deny"``), a :class:`~hardening.BackendUnavailable` whose
            ``retry_after`` is the breaker's window: the client is not over its limit, the
            limiter could not tell.
        """
        if self.error and not self.allowed and not self.states:
            return BackendUnavailable(
                "rate-limit storage",
                "cannot check the limit; denied by on_backend_error='deny'",
                retry_after=self.retry_after,
            )
        return self.exceeded()

    def headers(self) -> dict[str, str]:
        """The HTTP headers describing this decision.

        ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (epoch
        seconds, as GitHub and Flask-Limiter send it) for the binding limit; the IETF draft
        fields ``RateLimit-Policy`` (every limit: quota ``q`` and window ``w``) and
        ``RateLimit`` (every limit: remaining ``r`` and seconds to reset ``t``); and, when
        denied, ``Retry-After`` in whole seconds, never earlier than any ``t`` it advertises.

        Returns:
            Header name to value. Empty for unlimited keys; a decision made without the
            storage (``error``) sends only ``Retry-After`` when it denies, except in ``"local"``
            mode, whose in-process counts are real and described in full.
        """
        retry = math.ceil(self.retry_after) if self.retry_after is not None else None
        if self.limit is None or (self.error and not self.states):
            return {"Retry-After": str(max(retry, 1))} if retry is not None else {}
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.timestamp + self.reset_after)),
        }
        if self.states:
            policies, current = [], []
            for state in self.states:
                name = state.limit.name
                policies.append(f'"{name}";q={state.limit.amount};w={state.limit.window:g}')
                seconds = math.ceil(state.reset_after)
                if retry is not None:
                    seconds = min(seconds, retry)
                remaining = 0 if self.blocked else state.remaining
                current.append(f'"{name}";r={remaining};t={seconds}')
            headers["RateLimit-Policy"] = ", ".join(policies)
            headers["RateLimit"] = ", ".join(current)
        if retry is not None:
            headers["Retry-After"] = str(max(retry, 1))
        return headers
