"""Order keys: strings that sort blocks, so that an insert or a move writes one row.

A key is a base-62 fraction (digits ``0-9A-Za-z``, in ASCII order, so keys compare bytewise:
``COLLATE "C"`` on PostgreSQL, SQLite's default ``BINARY``) that never ends in ``0``. Between
any two keys there is another (:func:`key_between`), so an insert or a move never renumbers its
neighbours. Repeated inserts at one spot lengthen keys by one digit every few inserts; a key
longer than :data:`MAX_KEY` makes the caller re-space a window of neighbours
(:func:`keys_between`), which keeps every key short at an amortised cost of a few rows.
"""

from __future__ import annotations

__all__ = ["KEY_LIMIT", "MAX_KEY", "key_between", "keys_between"]

DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {digit: i for i, digit in enumerate(DIGITS)}
_BASE = len(DIGITS)

MAX_KEY = 24
"""A new key longer than this makes the store re-space a window of neighbouring keys."""

KEY_LIMIT = 64
"""The key column's width: re-spacing keeps keys far below it."""


def key_between(low: str | None, high: str | None) -> str:
    """A key strictly between ``low`` and ``high`` (``None``: no bound on that side).

    Raises:
        ValueError: ``low >= high``, or a key is empty or ends in ``0``.
    """
    lo = "" if low is None else low
    for key in (low, high):
        if key is not None and (not key or key[-1] == DIGITS[0]):
            raise ValueError(f"{key!r} is not an order key")
    if high is not None and lo >= high:
        raise ValueError(f"{low!r} is not below {high!r}")
    return _midpoint(lo, high)


def _midpoint(low: str, high: str | None) -> str:
    """The midpoint algorithm of fractional indexing (after David Greenspan / rocicorp)."""
    prefix = ""
    while True:
        if high is not None:  # drop the common prefix, reading a missing digit of low as 0
            n = 0
            while n < len(high) and (low[n] if n < len(low) else DIGITS[0]) == high[n]:
                n += 1
            if n:
                prefix += high[:n]
                low, high = low[n:], high[n:]
        digit_low = _INDEX[low[0]] if low else 0
        digit_high = _INDEX[high[0]] if high else _BASE
        if digit_high - digit_low > 1:
            return prefix + DIGITS[(digit_low + digit_high + 1) // 2]
        if high is not None and len(high) > 1:  # consecutive digits: high's first one fits
            return prefix + high[0]
        prefix += DIGITS[digit_low]
        low, high = low[1:], None


def keys_between(low: str | None, high: str | None, count: int) -> list[str]:
    """``count`` ascending keys strictly between ``low`` and ``high``, as short as possible.

    Halving recursively keeps them about ``log62(count)`` digits longer than the bounds'
    common prefix.
    """
    if count <= 0:
        return []
    middle = key_between(low, high)
    if count == 1:
        return [middle]
    left = (count - 1) // 2
    return [
        *keys_between(low, middle, left),
        middle,
        *keys_between(middle, high, count - 1 - left),
    ]
