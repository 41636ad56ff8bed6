"""Every exception `hardening` raises to its users.

Each error carries the data a caller needs as attributes (never only inside the message), and
has exactly one HTTP meaning, given by its ``http_status`` class attribute, which the ASGI and
WSGI adapters answer with. ``details()`` returns the attributes that are safe to show a client,
ready for an RFC 9457 ``application/problem+json`` body.

The tree::

    HardeningError
    ├── ConfigurationError (ValueError)              bad options given to a primitive   500
    ├── BackendUnavailable (ConnectionError)         a store (Redis, SQL) did not answer 503
    ├── RateLimitExceeded                            a key is over its limit             429
    ├── NotFoundError (LookupError)                  a row, document or job is gone     404
    ├── HistoryCorrupted                             stored history fails its checks     500
    ├── ConflictError                                optimistic-lock version mismatch    409
    ├── PreconditionError                            HTTP conditional request problems
    │   ├── PreconditionFailed                       If-(None-)Match did not hold        412
    │   └── PreconditionRequired                     If-Match missing but required       428
    ├── UnsupportedMediaType                         wrong Content-Type for a patch      415
    ├── MalformedBody (ValueError)                   a request body that does not parse  400
    ├── PayloadTooLarge                              a request body over the size limit  413
    ├── InvalidCursor (ValueError)                   a pagination cursor that is refused 400
    ├── RowRejected (ValueError)                     a batched insert stopped at a row   422
    ├── PatchError (ValueError)                      a JSON Patch was refused            422
    │   ├── InvalidPatch                             malformed: bad op, pointer or type  422
    │   │   └── PatchLimitExceeded                   over a PatchLimits resource bound   413
    │   ├── PatchApplyError                          well-formed, but does not apply     422
    │   │   └── PatchTestFailed                      a ``test`` op (or id guard) failed  409
    │   └── PatchConflict                            concurrent edits clash on a field   409
    ├── QueueError                                   job queue problems
    │   ├── JobRejected (ValueError)                 payload not JSON or too large       422
    │   ├── JobTimedOut (TimeoutError)               an attempt overran its timeout      500
    │   └── LeaseLost                                the worker's claim on a job expired 409
    └── CacheError                                   a value the cache cannot store      500
        └── ValueTooLarge (ValueError)               over the cache's max_value_bytes    500
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BackendUnavailable",
    "CacheError",
    "ConfigurationError",
    "ConflictError",
    "HardeningError",
    "HistoryCorrupted",
    "InvalidCursor",
    "InvalidPatch",
    "JobRejected",
    "JobTimedOut",
    "LeaseLost",
    "MalformedBody",
    "NotFoundError",
    "PatchApplyError",
    "PatchConflict",
    "PatchError",
    "PatchLimitExceeded",
    "PatchTestFailed",
    "PayloadTooLarge",
    "PreconditionError",
    "PreconditionFailed",
    "PreconditionRequired",
    "QueueError",
    "RateLimitExceeded",
    "RowRejected",
    "UnsupportedMediaType",
    "ValueTooLarge",
]

JSONScalar = str | int | float | bool | None


class HardeningError(Exception):
    """Root of every error raised by `hardening`.

    Attributes:
        http_status: the HTTP status the adapters answer with when this error escapes an app.
        title: a short, stable, human-readable summary used as the problem+json ``title``.
    """

    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    _detail_fields: ClassVar[tuple[str, ...]] = ()

    def details(self) -> dict[str, object]:
        """Return the error's data that is safe to show a client (problem+json members).

        Returns:
            A new dict of attribute name to value, for the fields this error class declares.
        """
        return {name: getattr(self, name) for name in self._detail_fields}

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take keyword-only data, which the default (cls(*args)) cannot rebuild.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[HardeningError], args: tuple[object, ...], state: dict[str, object]
) -> HardeningError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ConfigurationError(HardeningError, ValueError):
    """A primitive was given options that cannot work (bad limit string, unknown strategy...)."""

    title = "Configuration error"


class BackendUnavailable(HardeningError, ConnectionError):
    """A storage backend (Redis, a SQL database) failed or did not answer in time.

    Args:
        backend: a short name of the backend, e.g. ``"redis"``, ``"sql"``.
        message: what went wrong.
        retry_after: seconds until the backend is tried again (a circuit breaker's window),
            when known; the adapters send it as ``Retry-After``.

    Attributes:
        backend: the backend's short name.
        retry_after: seconds until the next attempt, or ``None``.
    """

    http_status = 503
    title = "Backend unavailable"
    _detail_fields: ClassVar[tuple[str, ...]] = ("backend",)

    def __init__(
        self, backend: str, message: str = "", *, retry_after: float | None = None
    ) -> None:
        self.backend = backend
        self.retry_after = retry_after
        super().__init__(f"{backend} backend unavailable" + (f": {message}" if message else ""))


class RateLimitExceeded(HardeningError):
    """A rate limit denied a call.

    Args:
        key: the rate-limit key that was denied.
        retry_after: seconds until a retry can succeed.
        limit: the limit that was exceeded, as text (e.g. ``"30/minute"``).
        headers: the HTTP headers describing the decision (``Retry-After``, ``RateLimit``...).
        decision: the full decision object of the limiter, when there is one.

    Attributes:
        key, retry_after, limit, headers, decision: as given.
    """

    http_status = 429
    title = "Too many requests"
    _detail_fields: ClassVar[tuple[str, ...]] = ("retry_after", "limit")

    def __init__(
        self,
        key: str,
        retry_after: float,
        *,
        limit: str = "",
        headers: Mapping[str, str] | None = None,
        decision: object | None = None,
    ) -> None:
        self.key = key
        self.retry_after = retry_after
        self.limit = limit
        self.headers: dict[str, str] = dict(headers or {})
        self.decision = decision
        super().__init__(f"rate limit {limit or ''} exceeded; retry after {retry_after:.3g}s")


class NotFoundError(HardeningError, LookupError):
    """The row, document or job that an operation targets does not exist.

    Args:
        entity: the kind of thing (table or model name).
        key: its primary key.
    """

    http_status = 404
    title = "Not found"
    _detail_fields: ClassVar[tuple[str, ...]] = ("entity", "key")

    def __init__(self, entity: str, key: object) -> None:
        self.entity = entity
        self.key = key
        super().__init__(f"{entity} {key!r} not found")


class HistoryCorrupted(HardeningError):
    """A document's stored history fails its checks: the server's data is damaged (HTTP 500).

    Raised when rebuilding a version meets a patch row missing inside the kept range, a row
    that does not parse or does not apply, or a row or snapshot that does not match its
    checksum. It is never the client's fault (not a 404 or a 422): restore the rows from a
    backup, or compact past the damage. ``hardening history verify`` finds every instance.

    Args:
        doc_id: the document's id.
        version: the version whose row (patch or snapshot) is damaged.
        reason: what is wrong, in words (never the stored data itself).

    Attributes:
        doc_id, version, reason: as given. A client is shown ``doc_id`` and ``version``.
    """

    title = "History corrupted"
    _detail_fields: ClassVar[tuple[str, ...]] = ("doc_id", "version")

    def __init__(self, doc_id: str, version: int, reason: str) -> None:
        self.doc_id = doc_id
        self.version = version
        self.reason = reason
        super().__init__(f"history of {doc_id!r} is corrupted at version {version}: {reason}")


class ConflictError(HardeningError):
    """An optimistic-lock save found another version than the one it was based on.

    Args:
        entity: the kind of thing (table or model name).
        key: its primary key.
        expected_version: the version the caller based its change on.
        current_version: the version in the store now (``None`` if unknown).
    """

    http_status = 409
    title = "Edit conflict"
    _detail_fields: ClassVar[tuple[str, ...]] = (
        "entity",
        "key",
        "expected_version",
        "current_version",
    )

    def __init__(
        self,
        entity: str,
        key: object,
        *,
        expected_version: int | None,
        current_version: int | None,
    ) -> None:
        self.entity = entity
        self.key = key
        self.expected_version = expected_version
        self.current_version = current_version
        super().__init__(
            f"{entity} {key!r} was changed concurrently: expected version "
            f"{expected_version}, current version {current_version}"
        )


class PreconditionError(HardeningError):
    """Base of the HTTP conditional-request errors (RFC 9110 §13, RFC 6585 §3)."""


class PreconditionFailed(PreconditionError):
    """A conditional header's condition does not hold (HTTP 412).

    ``If-Match`` matches no current representation, or ``If-None-Match`` matches the current
    one on a method that changes it, or either header is malformed.

    Args:
        if_match: the header's value as received (``If-Match``'s, or the one ``header`` names).
        current_etag: the current entity tag, when known.
        reason: why it failed (``"stale"``, ``"malformed"``; for ``If-None-Match``
            ``"exists"`` or ``"unchanged"``).
        header: the header that failed.
    """

    http_status = 412
    title = "Precondition failed"
    _detail_fields: ClassVar[tuple[str, ...]] = ("if_match", "current_etag", "reason", "header")

    def __init__(
        self,
        if_match: str,
        current_etag: str | None = None,
        *,
        reason: str = "stale",
        header: str = "If-Match",
    ):
        self.if_match = if_match
        self.current_etag = current_etag
        self.reason = reason
        self.header = header
        super().__init__(f"{header} {if_match!r} failed ({reason}); current ETag {current_etag}")


class PreconditionRequired(PreconditionError):
    """The request must be conditional (carry ``If-Match``) but is not (HTTP 428).

    Args:
        header: the header that is required.
    """

    http_status = 428
    title = "Precondition required"
    _detail_fields: ClassVar[tuple[str, ...]] = ("header",)

    def __init__(self, header: str = "If-Match") -> None:
        self.header = header
        super().__init__(f"this request requires a {header} header")


class UnsupportedMediaType(HardeningError):
    """A patch body came with a media type the server does not accept (HTTP 415).

    Args:
        media_type: the ``Content-Type`` received.
        accept_patch: the media types accepted, for the ``Accept-Patch`` response header.
    """

    http_status = 415
    title = "Unsupported media type"
    _detail_fields: ClassVar[tuple[str, ...]] = ("media_type", "accept_patch")

    def __init__(
        self, media_type: str, accept_patch: tuple[str, ...] = ("application/json-patch+json",)
    ) -> None:
        self.media_type = media_type
        self.accept_patch = accept_patch
        super().__init__(f"unsupported media type {media_type!r}; accepted: {accept_patch}")


class MalformedBody(HardeningError, ValueError):
    """A request body could not be parsed (not JSON, not UTF-8, nested too deep) (HTTP 400).

    Args:
        reason: what is wrong, in words (never the body itself).
    """

    http_status = 400
    title = "Malformed request body"
    _detail_fields: ClassVar[tuple[str, ...]] = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed request body: {reason}")


class PayloadTooLarge(HardeningError):
    """A request body is larger than the configured limit (HTTP 413).

    Args:
        max_bytes: the limit.
        received: the size announced by ``Content-Length`` or read so far, when known.
    """

    http_status = 413
    title = "Payload too large"
    _detail_fields: ClassVar[tuple[str, ...]] = ("max_bytes",)

    def __init__(self, max_bytes: int, received: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.received = received
        super().__init__(f"request body larger than {max_bytes} bytes")


class InvalidCursor(HardeningError, ValueError):
    """A pagination cursor was refused (HTTP 400); ask for the first page again.

    Args:
        reason: ``"malformed"`` (not a cursor), ``"signature"`` (altered, or signed with another
            secret), ``"ordering"`` (made for another ordering) or ``"expired"`` (older than the
            ``max_age`` the query allows).

    Attributes:
        reason: as given.
    """

    http_status = 400
    title = "Invalid cursor"
    _detail_fields: ClassVar[tuple[str, ...]] = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid pagination cursor ({reason})")


class BatchReport(Protocol):
    """What a batched insert did before it stopped (:class:`~hardening.InsertReport` is one).

    Declared here so that this module depends on nothing else in the package.
    """

    @property
    def inserted(self) -> int:
        """Rows written."""

    @property
    def skipped(self) -> int:
        """Rows left out because they conflicted."""

    @property
    def rejected(self) -> Sequence[object]:
        """The rows refused (``RejectedRow``), in input order."""

    @property
    def batches(self) -> int:
        """Batches sent."""

    @property
    def seconds(self) -> float:
        """Wall time taken."""

    @property
    def method(self) -> str:
        """``"copy"``, ``"executemany"`` or ``"copy+executemany"``."""


class RowRejected(HardeningError, ValueError):
    """A batched insert asked to stop on the first bad row met one (``stop_on_error=True``).

    Args:
        index: the row's position in the input, from 0.
        reason: why the validator or the database refused it.
        report: what was done before stopping (with ``transaction="per_batch"``, the earlier
            batches stay committed), an :class:`~hardening.InsertReport`.

    Attributes:
        index, reason, report: as given.
    """

    http_status = 422
    title = "Row rejected"
    _detail_fields: ClassVar[tuple[str, ...]] = ("index", "reason")

    def __init__(self, index: int, reason: str, *, report: BatchReport | None = None) -> None:
        self.index = index
        self.reason = reason
        self.report = report
        super().__init__(f"row {index} rejected: {reason}")


class PatchError(HardeningError, ValueError):
    """A JSON Patch was refused; nothing was changed.

    Args:
        reason: what is wrong, in words.
        op_index: the index of the failing operation in the patch, if one is to blame.
        op: the failing operation itself (as received), if one is to blame.
    """

    http_status = 422
    title = "Invalid patch"
    _detail_fields: ClassVar[tuple[str, ...]] = ("op_index", "op", "reason")

    def __init__(self, reason: str, *, op_index: int | None = None, op: object = None) -> None:
        self.reason = reason
        self.op_index = op_index
        self.op = op
        where = f"operation {op_index}: " if op_index is not None else ""
        super().__init__(f"{where}{reason}")


class InvalidPatch(PatchError):
    """The patch is malformed: not a list of RFC 6902 operations with valid RFC 6901 pointers."""


class PatchLimitExceeded(InvalidPatch):
    """The patch or the document it produces exceeds a configured resource limit.

    Args:
        reason: what is wrong, in words.
        limit: the name of the ``PatchLimits`` field that was exceeded.
        value: the offending size.
        maximum: the configured bound.
        op_index: the failing operation's index, if one is to blame.
        op: the failing operation, if one is to blame.
    """

    http_status = 413
    title = "Patch too large"
    _detail_fields: ClassVar[tuple[str, ...]] = ("op_index", "reason", "limit", "maximum")

    def __init__(
        self,
        reason: str,
        *,
        limit: str,
        value: int,
        maximum: int,
        op_index: int | None = None,
        op: object = None,
    ) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(reason, op_index=op_index, op=op)


class PatchApplyError(PatchError):
    """The patch is well formed but does not apply to this document (missing path...)."""

    title = "Patch does not apply"


class PatchTestFailed(PatchApplyError):
    """A ``test`` operation (for example an id guard) did not hold: the document changed."""

    http_status = 409
    title = "Patch precondition failed"


class PatchConflict(PatchError):
    """Concurrent edits clash: both change the same field of the same block.

    Args:
        reason: what is wrong, in words.
        block_id: the id of the block both edits touch.
        field: the JSON pointer, inside the block, both edits touch.
        op_index: the failing operation's index in the incoming patch.
        op: the failing operation.
    """

    http_status = 409
    title = "Patch conflict"
    _detail_fields: ClassVar[tuple[str, ...]] = ("op_index", "op", "reason", "block_id", "field")

    def __init__(
        self,
        reason: str,
        *,
        block_id: JSONScalar = None,
        field: str | None = None,
        op_index: int | None = None,
        op: object = None,
    ) -> None:
        self.block_id = block_id
        self.field = field
        super().__init__(reason, op_index=op_index, op=op)


class QueueError(HardeningError):
    """Base of the job queue errors."""


class JobRejected(QueueError, ValueError):
    """``enqueue`` refused a job (payload not JSON-serialisable, too large, bad options).

    Args:
        reason: why the job was refused.
        queue: the queue it was meant for.
    """

    http_status = 422
    title = "Job rejected"
    _detail_fields: ClassVar[tuple[str, ...]] = ("queue", "reason")

    def __init__(self, reason: str, *, queue: str = "") -> None:
        self.reason = reason
        self.queue = queue
        super().__init__(f"job rejected by queue {queue!r}: {reason}")


class JobTimedOut(QueueError, TimeoutError):
    """A job's attempt ran longer than its processor's ``timeout``: it failed, and is retried.

    Args:
        job_id: the job's id.
        timeout: the timeout in seconds.
        queue: the job's queue.
    """

    title = "Job timed out"
    _detail_fields: ClassVar[tuple[str, ...]] = ("job_id", "queue", "timeout")

    def __init__(self, job_id: str, timeout: float, *, queue: str = "") -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.queue = queue
        super().__init__(f"job {job_id!r} of queue {queue!r} ran longer than {timeout:g} s")


class LeaseLost(QueueError):
    """A worker tried to finish a job whose lease it no longer holds (another worker may).

    Args:
        job_id: the job's id.
        queue: the job's queue.
    """

    http_status = 409
    title = "Job lease lost"
    _detail_fields: ClassVar[tuple[str, ...]] = ("job_id", "queue")

    def __init__(self, job_id: str, *, queue: str = "") -> None:
        self.job_id = job_id
        self.queue = queue
        super().__init__(f"lease on job {job_id!r} of queue {queue!r} was lost")


class CacheError(HardeningError):
    """The cache was given a value it cannot store (not serializable by its serializer).

    A programming error in the caller, hence HTTP 500. Backend failures are not cache errors:
    they are handled by the cache's ``on_backend_error`` (or raised as
    :class:`BackendUnavailable`).

    Args:
        key: the cache key the value was meant for.
        reason: what is wrong, in words.

    Attributes:
        key, reason: as given.
    """

    title = "Cache error"
    _detail_fields: ClassVar[tuple[str, ...]] = ("reason",)

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"cannot cache {key[:100]!r}: {reason}")


class ValueTooLarge(CacheError, ValueError):
    """A serialized value is larger than the cache's ``max_value_bytes``; nothing was stored.

    Args:
        key: the cache key the value was meant for.
        size: the serialized size in bytes.
        max_bytes: the limit.

    Attributes:
        key, size, max_bytes: as given.
    """

    title = "Cache value too large"
    _detail_fields: ClassVar[tuple[str, ...]] = ("size", "max_bytes")

    def __init__(self, key: str, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        super().__init__(key, f"{size} bytes serialized, over max_value_bytes={max_bytes}")
