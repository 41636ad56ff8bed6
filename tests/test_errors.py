"""The error tree: data carried as attributes, built-in bases, one HTTP status each."""

from __future__ import annotations

import pickle

import pytest

from hardening import errors
from hardening.errors import (
    BackendUnavailable,
    CacheError,
    ConfigurationError,
    ConflictError,
    HardeningError,
    HistoryCorrupted,
    InvalidCursor,
    InvalidPatch,
    JobRejected,
    LeaseLost,
    MalformedBody,
    NotFoundError,
    PatchApplyError,
    PatchConflict,
    PatchError,
    PatchLimitExceeded,
    PatchTestFailed,
    PayloadTooLarge,
    PreconditionFailed,
    PreconditionRequired,
    RateLimitExceeded,
    RowRejected,
    UnsupportedMediaType,
    ValueTooLarge,
)


def test_conflict_error_carries_versions() -> None:
    """A conflict names the entity, key and both versions."""
    exc = ConflictError("Page", 42, expected_version=3, current_version=5)
    assert (exc.entity, exc.key, exc.expected_version, exc.current_version) == ("Page", 42, 3, 5)
    assert "expected version 3" in str(exc)
    assert exc.details() == {
        "entity": "Page",
        "key": 42,
        "expected_version": 3,
        "current_version": 5,
    }
    assert exc.http_status == 409


def test_rate_limit_exceeded_carries_retry_after_and_headers() -> None:
    """A denied call carries when to retry and the headers to send."""
    exc = RateLimitExceeded("user:1", 12.5, limit="30/minute", headers={"Retry-After": "13"})
    assert exc.retry_after == 12.5
    assert exc.headers == {"Retry-After": "13"}
    assert exc.details() == {"retry_after": 12.5, "limit": "30/minute"}
    assert exc.http_status == 429


def test_patch_errors_carry_op_and_index() -> None:
    """Patch errors say which operation failed and why."""
    op = {"op": "remove", "path": "/9"}
    exc = PatchApplyError("path does not exist", op_index=2, op=op)
    assert (exc.op_index, exc.op, exc.reason) == (2, op, "path does not exist")
    assert str(exc).startswith("operation 2:")
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConfigurationError("x"), 500),
        (BackendUnavailable("redis", "timeout"), 503),
        (RateLimitExceeded("k", 1.0), 429),
        (NotFoundError("Page", 1), 404),
        (ConflictError("Page", 1, expected_version=1, current_version=2), 409),
        (PreconditionFailed('"1"', '"2"'), 412),
        (PreconditionRequired(), 428),
        (UnsupportedMediaType("text/plain"), 415),
        (MalformedBody("not JSON"), 400),
        (PayloadTooLarge(1024, 4096), 413),
        (InvalidPatch("bad op"), 422),
        (PatchLimitExceeded("too many", limit="max_ops", value=5, maximum=4), 413),
        (PatchApplyError("missing"), 422),
        (PatchTestFailed("guard"), 409),
        (PatchConflict("both edit", block_id="b1", field="/content"), 409),
        (JobRejected("not JSON", queue="q"), 422),
        (LeaseLost("j1", queue="q"), 409),
        (InvalidCursor("signature"), 400),
        (RowRejected(3, "duplicate key"), 422),
        (CacheError("k", "not JSON"), 500),
        (ValueTooLarge("k", 2048, 1024), 500),
        (HistoryCorrupted("page-1", 7, "its patch row is missing"), 500),
    ],
)
def test_each_error_has_one_http_status(exc: HardeningError, status: int) -> None:
    """Every error maps to exactly one HTTP status and a title."""
    assert exc.http_status == status
    assert exc.title
    assert isinstance(exc.details(), dict)


def test_builtin_bases_are_natural() -> None:
    """Errors subclass the built-in a caller would already catch."""
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(BackendUnavailable, ConnectionError)
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(PatchError, ValueError)
    assert issubclass(PatchLimitExceeded, InvalidPatch)
    assert issubclass(PatchTestFailed, PatchApplyError)
    assert issubclass(ValueTooLarge, CacheError)
    assert issubclass(ValueTooLarge, ValueError)


def test_value_too_large_carries_sizes() -> None:
    """A refused cache value names its key, size and the limit; the client sees sizes only."""
    exc = ValueTooLarge("page:1", 2_000_000, 1_048_576)
    assert (exc.key, exc.size, exc.max_bytes) == ("page:1", 2_000_000, 1_048_576)
    assert "max_value_bytes=1048576" in str(exc)
    assert exc.details() == {"size": 2_000_000, "max_bytes": 1_048_576}


def test_history_corrupted_is_the_servers_fault() -> None:
    """Damaged stored history: a 500 carrying the document and version, never a client error;
    the client is shown which version, not the reason."""
    exc = HistoryCorrupted("page-1", 7, "its patch row does not match its chain digest")
    assert (exc.doc_id, exc.version, exc.reason) == (
        "page-1",
        7,
        "its patch row does not match its chain digest",
    )
    assert not isinstance(exc, (NotFoundError, PatchError, LookupError, ValueError))
    assert exc.details() == {"doc_id": "page-1", "version": 7}
    assert "version 7" in str(exc)


def test_details_are_declared_attributes() -> None:
    """``details()`` only names attributes each error really sets."""
    exc = PatchConflict("clash", block_id="b", field="/content", op_index=0, op={"op": "x"})
    assert exc.details() == {
        "op_index": 0,
        "op": {"op": "x"},
        "reason": "clash",
        "block_id": "b",
        "field": "/content",
    }


def test_tree_is_drawn_in_docstring() -> None:
    """The module docstring draws every exported error."""
    assert errors.__doc__ is not None
    for name in errors.__all__:
        assert name in errors.__doc__, name


def test_errors_pickle_with_their_data() -> None:
    """Errors survive pickling (process pools, queues) with every attribute."""
    for exc in (
        NotFoundError("Page", 3),
        ConflictError("Page", 1, expected_version=1, current_version=2),
        PatchLimitExceeded("too many", limit="max_ops", value=5, maximum=4, op_index=1),
        RateLimitExceeded("k", 2.0, headers={"Retry-After": "2"}),
        ValueTooLarge("k", 10, 5),
        HistoryCorrupted("page-1", 7, "its patch row is missing"),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc)
        assert again.details() == exc.details()
        assert str(again) == str(exc)
