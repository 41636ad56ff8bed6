"""Pagination cursors: typed values in compact JSON, HMAC-SHA256 signed, base64url; no I/O.

A cursor is ``base64url(tag || payload)`` without padding, where ``payload`` is the JSON list
``[format, ordering fingerprint, issued at, [key values]]`` and ``tag`` the first 16 bytes of
``HMAC-SHA256(secret, domain || payload)``. Values JSON cannot carry exactly (datetimes, dates,
times, decimals, UUIDs, bytes, non-finite floats) travel as one-key objects naming their type,
so a cursor gives back the very values it was made from.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import uuid
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from hardening._clock import SystemClock, to_seconds
from hardening.errors import ConfigurationError, InvalidCursor

if TYPE_CHECKING:
    from datetime import timedelta

    from hardening._clock import Clock

__all__ = ["SECRET_ENV", "CursorCodec", "fingerprint"]

SECRET_ENV = "HARDENING_PAGINATION_SECRET"
"""The environment variable read when no ``secret=`` is given."""

_FORMAT = 1
_DOMAIN = b"hardening.cursor.v1\x00"
_TAG_BYTES = 16
_MIN_SECRET_BYTES = 16
_MAX_CURSOR_CHARS = 4096


def fingerprint(spec: str) -> str:
    """A short, stable digest of an ordering's description, stored in its cursors."""
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _encode_value(value: object) -> object:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, dt.datetime):  # before date: a datetime is a date
        zone = value.tzinfo
        if isinstance(zone, ZoneInfo) and zone.key:
            # a named zone, kept by name (and the fold): a fixed offset would not compare
            # equal to a time in a DST gap or fold of that zone
            return {"dz": [value.replace(tzinfo=None, fold=0).isoformat(), zone.key, value.fold]}
        return {"dt": value.isoformat()}
    if isinstance(value, dt.date):
        return {"d": value.isoformat()}
    if isinstance(value, dt.time):
        return {"t": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"td": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, Decimal):
        return {"n": str(value)}
    if isinstance(value, uuid.UUID):
        return {"u": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b": base64.urlsafe_b64encode(bytes(value)).decode()}
    raise ConfigurationError(
        f"cannot put a {type(value).__name__} in a pagination cursor: order by columns of "
        "numbers, strings, dates, times, decimals, UUIDs or bytes"
    )


def _decode_value(value: object) -> object:
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise ValueError("a list is not a key value")
        return value
    if len(value) != 1:
        raise ValueError("a tagged value has exactly one key")
    ((tag, text),) = value.items()
    if tag == "td":
        days, seconds, micros = text
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if tag == "dz":
        local, key, fold = text
        if not isinstance(local, str) or not isinstance(key, str) or fold not in (0, 1):
            raise ValueError("a zoned datetime is [local time, zone, fold]")
        return dt.datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(key), fold=fold)
    if not isinstance(text, str):
        raise ValueError("tagged values are strings")
    if tag == "f":
        return float(text)
    if tag == "dt":
        return dt.datetime.fromisoformat(text)
    if tag == "d":
        return dt.date.fromisoformat(text)
    if tag == "t":
        return dt.time.fromisoformat(text)
    if tag == "n":
        return Decimal(text)
    if tag == "u":
        return uuid.UUID(text)
    if tag == "b":
        return base64.urlsafe_b64decode(text.encode())
    raise ValueError(f"unknown value tag {tag!r}")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


class CursorCodec:
    """Signs and verifies cursors for one secret; optionally refuses cursors older than a limit.

    Args:
        secret: the signing key, at least 16 bytes (a ``str`` is UTF-8 encoded); ``None`` reads
            the ``HARDENING_PAGINATION_SECRET`` environment variable.
        max_age: refuse cursors issued longer ago than this (seconds or ``timedelta``);
            ``None`` accepts any age.
        clock: the clock whose wall time (``time()``) stamps and ages cursors.

    Raises:
        ConfigurationError: no secret, or a secret shorter than 16 bytes.
    """

    __slots__ = ("_clock", "_key", "_max_age")

    def __init__(
        self,
        secret: str | bytes | None,
        *,
        max_age: float | timedelta | None = None,
        clock: Clock | None = None,
    ) -> None:
        if secret is None:
            secret = os.environ.get(SECRET_ENV)
            if not secret:
                raise ConfigurationError(
                    f"pagination cursors are signed: pass secret= or set {SECRET_ENV} "
                    "(the same value in every process that serves the same API)"
                )
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) < _MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"a pagination secret needs at least {_MIN_SECRET_BYTES} bytes, got {len(key)}"
            )
        self._key = key
        self._max_age = None if max_age is None else to_seconds(max_age, name="max_age")
        self._clock = clock or SystemClock()

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + payload, hashlib.sha256).digest()[:_TAG_BYTES]

    def encode(self, ordering: str, values: Sequence[object]) -> str:
        """The cursor for a position (the key values of one row) in ``ordering``.

        Args:
            ordering: the ordering's fingerprint (see :func:`fingerprint`).
            values: the row's order-key values, in order.

        Returns:
            The URL-safe cursor.

        Raises:
            ConfigurationError: a value of a type a cursor cannot carry.
        """
        body = [_FORMAT, ordering, int(self._clock.time()), [_encode_value(v) for v in values]]
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()
        return _b64encode(self._tag(payload) + payload)

    def decode(self, cursor: object, ordering: str, width: int) -> list[object]:
        """The key values a cursor carries, once its signature, ordering and age check out.

        Args:
            cursor: the cursor as received (any type: it comes from a client).
            ordering: the fingerprint of the ordering it must have been made for.
            width: how many key values that ordering has.

        Returns:
            The key values.

        Raises:
            InvalidCursor: malformed (``reason="malformed"``), not signed with this secret
                (``"signature"``), made for another ordering (``"ordering"``) or too old
                (``"expired"``).
        """
        if not isinstance(cursor, str) or not 0 < len(cursor) <= _MAX_CURSOR_CHARS:
            raise InvalidCursor("malformed")
        try:
            raw = _b64decode(cursor)
        except (ValueError, binascii.Error):
            raise InvalidCursor("malformed") from None
        tag, payload = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        if len(tag) != _TAG_BYTES or not hmac.compare_digest(tag, self._tag(payload)):
            raise InvalidCursor("signature")
        # Signed by us from here on: a failure below is a bug or an old format, not an attack.
        try:
            version, made_for, issued, encoded = json.loads(payload)
            if version != _FORMAT or not isinstance(encoded, list):
                raise ValueError("unknown cursor format")
            values = [_decode_value(v) for v in encoded]
        except (ValueError, TypeError, InvalidOperation):
            raise InvalidCursor("malformed") from None
        if made_for != ordering or len(values) != width:
            raise InvalidCursor("ordering")
        if self._max_age is not None and self._clock.time() - issued > self._max_age:
            raise InvalidCursor("expired")
        return values
