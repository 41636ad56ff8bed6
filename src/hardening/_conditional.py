"""HTTP conditional requests on versioned resources: ``ETag``, ``If-Match``, ``If-None-Match``.

Pure functions over header values and version numbers (RFC 9110 §8.8.3, §13.1.1, §13.1.2;
RFC 6585 §3), with no I/O and no SQLAlchemy: a version ``n`` is the strong entity tag
``"vn"``. The headers come from clients, so every parse is bounded (8 KiB) and anything
malformed is a :class:`~hardening.PreconditionFailed` with ``reason="malformed"`` (412), never
an unexpected exception. Re-exported by :mod:`hardening.locking` and :mod:`hardening`.
"""

from __future__ import annotations

import re

from hardening.errors import ConfigurationError, PreconditionFailed, PreconditionRequired

__all__ = ["check_if_match", "check_if_none_match", "etag_for", "if_match_version"]

# entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE (RFC 9110 §8.8.3)
_ETAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*')
_OUR_TAG = re.compile(r"v(0|[1-9][0-9]{0,17})")
_MAX_HEADER = 8192
_SAFE_METHODS = frozenset({"GET", "HEAD"})

Tags = list[tuple[bool, str]]
"""(weak, opaque-tag) pairs, as listed in a header."""


def etag_for(version: int) -> str:
    """The strong entity tag of a version, e.g. ``'"v3"'``.

    Args:
        version: the row's version.

    Returns:
        The quoted tag, ready for an ``ETag`` header.

    Raises:
        ConfigurationError: ``version`` is not a non-negative integer.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigurationError(f"a version is a non-negative integer, not {version!r}")
    return f'"v{version}"'


def _parse_tags(header: str, name: str) -> Tags | None:
    """Return ``None`` for ``*``, else the listed (weak, opaque-tag) pairs.

    Raises:
        PreconditionFailed: ``reason="malformed"``: over 8 KiB, empty, or a member that is not
            an entity tag (unquoted, unterminated, a character outside ``etagc``).
    """
    if len(header) > _MAX_HEADER:
        raise PreconditionFailed(header[:64] + "...", reason="malformed", header=name)
    if header.strip() == "*":
        return None
    tags: Tags = []
    for part in _split_tags(header):
        match = _ETAG.fullmatch(part)
        if match is None:
            raise PreconditionFailed(header, reason="malformed", header=name)
        tags.append((match.group(1) is not None, match.group(2)))
    if not tags:
        raise PreconditionFailed(header, reason="malformed", header=name)
    return tags


def _split_tags(header: str) -> list[str]:
    # commas may appear inside quotes: split only outside them
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _opaque(version: int) -> str:
    return etag_for(version)[1:-1]


def check_if_match(header: str | None, current_version: int, *, required: bool = False) -> None:
    """Enforce ``If-Match`` against the current version (RFC 9110 §13.1.1).

    ``*`` matches (the resource exists); otherwise one of the listed entity tags must equal
    :func:`etag_for` of ``current_version`` by strong comparison (weak tags never match).

    Args:
        header: the ``If-Match`` value, or ``None`` when absent.
        current_version: the resource's current version.
        required: whether a missing header is an error (RFC 6585 428).

    Raises:
        PreconditionRequired: the header is missing and ``required`` (HTTP 428).
        PreconditionFailed: the header is malformed (``reason="malformed"``) or matches no
            current tag (``reason="stale"``) (HTTP 412).
    """
    if header is None or header.strip() == "":
        if required:
            raise PreconditionRequired("If-Match")
        return
    tags = _parse_tags(header, "If-Match")
    if tags is None:
        return
    current = _opaque(current_version)
    if not any(not weak and tag == current for weak, tag in tags):
        raise PreconditionFailed(header, etag_for(current_version), reason="stale")


def if_match_version(header: str | None, *, required: bool = True) -> int | None:
    """The version an ``If-Match`` header names, to use as a save's base version.

    ``None`` means "no particular version": pass it on as ``base_version=None``, which the
    histories (:meth:`~hardening.DocumentHistory.save`, :meth:`~hardening.BlockHistory.apply`)
    read as "apply to the head as it is, atomically".

    Args:
        header: the ``If-Match`` value, or ``None``.
        required: raise :class:`~hardening.PreconditionRequired` when it is missing.

    Returns:
        The version; ``None`` for ``*`` (any current version) or, when not ``required``, for
        a missing header (an unconditional request).

    Raises:
        PreconditionRequired: missing and required.
        PreconditionFailed: malformed, weak, several tags, or not a tag made by
            :func:`etag_for`.
    """
    if header is None or header.strip() == "":
        if required:
            raise PreconditionRequired("If-Match")
        return None
    tags = _parse_tags(header, "If-Match")
    if tags is None:
        return None
    if len(tags) != 1 or tags[0][0] or not _OUR_TAG.fullmatch(tags[0][1]):
        raise PreconditionFailed(header, reason="malformed")
    return int(tags[0][1][1:])


def check_if_none_match(
    header: str | None, current_version: int | None, *, method: str = "GET"
) -> bool:
    """Evaluate ``If-None-Match`` against the current version (RFC 9110 §13.1.2).

    The condition fails when the header is ``*`` and the resource exists, or when one of the
    listed entity tags equals :func:`etag_for` of ``current_version`` by *weak* comparison
    (``W/"v3"`` and ``"v3"`` both match version 3). A failed condition on ``GET``/``HEAD``
    means the client's copy is current: answer 304 Not Modified (with the ``ETag``). On any
    other method it is an error: ``If-None-Match: *`` on a ``PUT`` or ``POST`` is how a client
    asks "create it only if it does not exist yet".

    Args:
        header: the ``If-None-Match`` value, or ``None`` when absent.
        current_version: the resource's current version, or ``None`` when it does not exist.
        method: the request method (any case).

    Returns:
        ``True`` when a ``GET``/``HEAD`` should be answered 304 Not Modified; ``False`` when
        the request proceeds (no header, no match, or no resource).

    Raises:
        PreconditionFailed: (HTTP 412, ``header="If-None-Match"``) the header is malformed
            (``reason="malformed"``, whatever the method), or, on a method other than
            ``GET``/``HEAD``, the resource exists and the header is ``*``
            (``reason="exists"``) or lists its current tag (``reason="unchanged"``).
    """
    if header is None or header.strip() == "":
        return False
    tags = _parse_tags(header, "If-None-Match")
    if current_version is None:
        return False
    current = _opaque(current_version)
    if tags is not None and not any(tag == current for _, tag in tags):
        return False
    if method.upper() in _SAFE_METHODS:
        return True
    raise PreconditionFailed(
        header,
        etag_for(current_version),
        reason="exists" if tags is None else "unchanged",
        header="If-None-Match",
    )
