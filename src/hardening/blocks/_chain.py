"""The checksum chain of a document's history, and the walk that replays rows and checks them.

Every patch row carries a link of the chain, ``sha256("<previous link>:<version>:" + patch)``
in hex, where the patch is its compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``,
UTF-8) and the previous link is the row before's (``""`` for version 1, whose link covers the
first content instead of a patch). The head row keeps the head's link, so a save computes the
next one from the row it reads anyway: its cost does not grow with the history. A snapshot row
carries the link at its version and the SHA-256 of its content (compact JSON, as above).

Rows written before the chain existed have no digest: they are **unchained**, accepted as they
are (counted by ``verify``), and the chain restarts after them (the next row's link is taken
as given). A damaged row is therefore found unless its digest was erased too.

No I/O here: :class:`Walk` is fed the rows in version order by the storage's steps
(``_integrity.py``) and raises :class:`~hardening.HistoryCorrupted` at the first problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hardening.blocks._json import same
from hardening.blocks._pages import ListPage, apply_to_page, join_document, split_document
from hardening.blocks.patch import _checked, apply_trusted
from hardening.errors import HistoryCorrupted, InvalidPatch, PatchError

__all__ = [
    "MISSING_ROW",
    "DocumentReplay",
    "PageReplay",
    "Replay",
    "Stored",
    "Walk",
    "canonical",
    "content_digest",
    "link",
]

MISSING_ROW = "its patch row is missing"
# what a stored value may raise when replayed: it is damaged, never the caller's fault
_REPLAY_ERRORS = (PatchError, LookupError, TypeError, ValueError, RecursionError)


def canonical(value: object) -> bytes:
    """The bytes a digest covers: compact JSON, member order kept, UTF-8."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def link(previous: str | None, version: int, payload: bytes) -> str:
    """The chain's link at ``version``: what the previous link and this row's bytes hash to."""
    digest = hashlib.sha256(f"{previous or ''}:{version}:".encode("ascii"))
    digest.update(payload)
    return digest.hexdigest()


def content_digest(payload: bytes) -> str:
    """The digest of a snapshot's content (its compact JSON bytes)."""
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Stored:
    """A patch or snapshot row as the walk reads it: its JSON text, as stored, and digests."""

    version: int
    text: str | None
    digest: str | None
    content_digest: str | None = None

    @classmethod
    def of(cls, row: Any) -> Stored:
        """From a row with ``version``, ``text``, ``digest`` (and maybe ``content_digest``)."""
        return cls(row.version, row.text, row.digest, getattr(row, "content_digest", None))


class Replay(Protocol):
    """A document being rebuilt: a snapshot's content, then the stored patches applied."""

    def apply(self, patch: object) -> None:
        """Apply a stored patch (raises what the patcher raises if it does not apply)."""

    def content(self) -> object:
        """The document as it stands."""


class DocumentReplay:
    """A whole JSON document, patched in place (``DocumentHistory``)."""

    def __init__(self, content: object) -> None:
        self.value = content

    def apply(self, patch: object) -> None:
        """Apply a stored patch to the document."""
        self.value = apply_trusted(self.value, patch)

    def content(self) -> object:
        """The document."""
        return self.value


class PageReplay:
    """A block page held as a list, patched with the page's rules (``BlockHistory``).

    Raises:
        ValueError: ``content`` is not a block document.
    """

    def __init__(self, content: object, *, id_key: str, blocks_key: str) -> None:
        parts = split_document(content, blocks_key)
        if parts is None:
            raise ValueError("not a block document")
        self.page = ListPage(parts[0], id_key)
        self.meta = parts[1]
        self.id_key = id_key
        self.blocks_key = blocks_key

    def apply(self, patch: object) -> None:
        """Apply a stored patch to the page."""
        ops = _checked(patch, None, trusted=True)[1]
        changes = apply_to_page(
            self.page,
            ops,
            id_key=self.id_key,
            limits=None,
            meta=self.meta,
            blocks_key=self.blocks_key,
        )
        self.meta = changes.meta

    def content(self) -> object:
        """The page's document: its blocks, or an object holding them."""
        return join_document(self.page.items, self.meta, self.blocks_key)


class Walk:
    """One document's rows fed in version order: parsed, checked against the chain, replayed.

    Args:
        doc_id: the document's id (for the errors).
        start: builds the replay from a snapshot's content (may raise ``ValueError``).
        exact: the stored text is the compact JSON the digests cover (``Text`` columns): hash
            it as it is instead of serialising the parsed value again.
    """

    def __init__(
        self, doc_id: str, start: Callable[[object], Replay], *, exact: bool = False
    ) -> None:
        self.doc_id = doc_id
        self.start = start
        self.exact = exact
        self.version = 0
        self.link: str | None = None
        self.replay: Replay | None = None
        self.checked = 0
        self.unchained = 0

    def fail(self, version: int, reason: str) -> HistoryCorrupted:
        """The error for a damaged row at ``version``."""
        return HistoryCorrupted(self.doc_id, version, reason)

    def begin(self, row: Stored) -> None:
        """Start from a snapshot: check its content, then replay from it."""
        value = self._parse(row, "snapshot")
        needed = row.content_digest is not None or (row.version == 1 and row.digest is not None)
        payload = self._payload(row, value) if needed else b""
        self._check_content(row, payload)
        if row.digest is None:
            self.unchained += 1
        elif row.version == 1 and row.digest != link(None, 1, payload):
            raise self.fail(1, "the first snapshot does not match its chain digest")
        try:
            self.replay = self.start(value)
        except _REPLAY_ERRORS as exc:
            raise self.fail(row.version, f"its snapshot is not a stored document ({exc})") from exc
        self.version = row.version
        self.link = row.digest
        self.checked = 1

    def check(self, row: Stored) -> object:
        """Check the patch row of the next version against the chain; its parsed patch.

        Moves the walk to that version without replaying it (see :meth:`patch`).
        """
        version = self.version + 1
        if row.version != version:
            raise self.fail(version, MISSING_ROW)
        value = self._parse(row, "patch")
        if row.digest is None:
            self.unchained += 1
        elif self.link is not None and row.digest != link(
            self.link, version, self._payload(row, value)
        ):
            raise self.fail(version, "its patch row does not match its chain digest")
        self.version = version
        self.link = row.digest
        return value

    def patch(self, row: Stored) -> None:
        """Check the patch row of the next version, and apply it."""
        value = self.check(row)
        if self.replay is None:  # pragma: no cover - begin() always runs first
            raise self.fail(self.version, "no snapshot to replay from")
        try:
            self.replay.apply(value)
        except InvalidPatch as exc:
            raise self.fail(self.version, f"its patch row is not a JSON Patch ({exc})") from exc
        except _REPLAY_ERRORS as exc:
            raise self.fail(self.version, f"its stored patch does not apply ({exc})") from exc
        self.checked += 1

    def snapshot(self, row: Stored) -> None:
        """Check a snapshot at the current version against the chain and the replay."""
        value = self._parse(row, "snapshot")
        if row.content_digest is not None:
            self._check_content(row, self._payload(row, value))
        if row.digest is None:
            self.unchained += 1
        elif self.link is not None and row.digest != self.link:
            raise self.fail(row.version, "its snapshot does not match the chain digest")
        else:
            self.link = row.digest
        if self.replay is not None and not same(self.replay.content(), value):
            raise self.fail(row.version, "its snapshot differs from the replayed patches")

    def head(self, version: int, digest: str | None, content: object) -> None:
        """Check the head row (read at ``version``) against the chain and the replay."""
        if digest is not None and self.link is not None and digest != self.link:
            raise self.fail(version, "the head row does not match the chain digest")
        if self.replay is not None and not same(self.replay.content(), content):
            raise self.fail(version, "the head differs from the replayed history")

    def content(self) -> object:
        """The document at :attr:`version`."""
        if self.replay is None:  # pragma: no cover - begin() always runs first
            raise self.fail(self.version, "no snapshot to replay from")
        return self.replay.content()

    def _parse(self, row: Stored, what: str) -> object:
        try:
            if row.text is None:
                raise ValueError("NULL")
            return json.loads(row.text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(row.version, f"its {what} row does not parse as JSON") from exc

    def _payload(self, row: Stored, value: object) -> bytes:
        """The bytes a row's digest covers (computed only when there is a digest to check)."""
        if self.exact and row.text is not None:
            return row.text.encode("utf-8", "surrogatepass")
        return canonical(value)

    def _check_content(self, row: Stored, payload: bytes) -> None:
        if row.content_digest is not None and row.content_digest != content_digest(payload):
            raise self.fail(row.version, "its snapshot does not match its content digest")
