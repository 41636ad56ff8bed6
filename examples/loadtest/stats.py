"""Percentiles and summaries of latency samples (seconds in, milliseconds out)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float | None:
    """The nearest-rank ``q``-th percentile (0-100), or ``None`` without values."""
    if not values:
        return None
    ordered = values if presorted else sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def to_ms(seconds: float | None) -> float | None:
    """``seconds`` in milliseconds, rounded to 0.01 ms (``None`` stays ``None``)."""
    return None if seconds is None else round(seconds * 1000.0, 2)


def ms(seconds: float | None) -> str:
    """``seconds`` as ``"123ms"`` for the progress line, ``"-"`` for ``None``."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """``n``, p50, p95, p99 and max (ms) of latencies in seconds."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": to_ms(percentile(ordered, 50, presorted=True)),
        "p95": to_ms(percentile(ordered, 95, presorted=True)),
        "p99": to_ms(percentile(ordered, 99, presorted=True)),
        "max": to_ms(ordered[-1] if ordered else None),
    }


def lag_summary(lags: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max (ms) of event-loop lag samples in seconds."""
    ordered = sorted(lags)
    return {
        "p50": to_ms(percentile(ordered, 50, presorted=True)),
        "p99": to_ms(percentile(ordered, 99, presorted=True)),
        "max": to_ms(ordered[-1] if ordered else None),
    }


def count_5xx(statuses: dict[int, int]) -> int:
    """Responses answered with a 5xx status."""
    return sum(n for status, n in statuses.items() if status >= 500)
