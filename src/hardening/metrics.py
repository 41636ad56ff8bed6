"""Prometheus metrics: a registry per app, named families, timers, a cardinality guard, /metrics.

:class:`Metrics` wraps a ``prometheus_client`` :class:`~prometheus_client.CollectorRegistry`
(a fresh one per instance, so apps and tests never share state). Families are created with
idempotent get-or-create calls (:meth:`Metrics.counter`, :meth:`Metrics.gauge`,
:meth:`Metrics.histogram`) that return guarded wrappers: ``.labels(...)`` folds label values
beyond ``max_label_values`` into :data:`OVERFLOW_LABEL_VALUE` and caches the bound child, so a
hot path pays one dict lookup instead of ``prometheus_client``'s label resolution.

The other primitives report into built-in families through fixed methods
(:meth:`Metrics.http_request`, :meth:`Metrics.rate_limit_decision`, :meth:`Metrics.lock_conflict`,
:meth:`Metrics.patch_applied`, :meth:`Metrics.queue_depth`, :meth:`Metrics.job_finished`,
:meth:`Metrics.cache_request`...).
The HTTP families keep their OpenTelemetry semantic-convention names, hardening's own families
are called ``hardening_*`` and an application's families get the ``namespace`` prefix.

Multiprocess servers (gunicorn, ``uvicorn --workers``) are supported through
``PROMETHEUS_MULTIPROC_DIR``; see :func:`wipe_multiprocess_dir` and
:func:`gunicorn_child_exit`.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import itertools
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar, cast

from hardening._imports import require
from hardening.errors import ConfigurationError

require("prometheus_client", extra="prometheus", feature="hardening.Metrics")

from prometheus_client import (  # noqa: E402 - after the check that names the extra
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    values,
)
from prometheus_client import multiprocess as _multiprocess  # noqa: E402
from prometheus_client.exposition import choose_encoder  # noqa: E402

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import ParamSpec, Self

    from hardening._clock import Clock

    _P = ParamSpec("_P")

__all__ = [
    "OTHER_HTTP_METHOD",
    "OVERFLOW_LABEL_VALUE",
    "UNMATCHED_ROUTE",
    "GuardedCounter",
    "GuardedGauge",
    "GuardedHistogram",
    "HistogramTimer",
    "HttpRequestTimer",
    "Metrics",
    "gunicorn_child_exit",
    "mark_process_dead",
    "wipe_multiprocess_dir",
]

OTHER_HTTP_METHOD = "_OTHER"
"""The ``http_request_method`` value of every non-standard method (OpenTelemetry's rule)."""

UNMATCHED_ROUTE = "_unmatched"
"""The one ``http_route`` value shared by requests that matched no route (404s, scanners)."""

OVERFLOW_LABEL_VALUE = "_overflow"
"""The label value that replaces new values once a label has ``max_label_values`` of them."""

_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
"""The methods reported as themselves; any other becomes :data:`OTHER_HTTP_METHOD`."""

# The OpenTelemetry advisory buckets for http.server.request.duration (seconds).
_HTTP_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
_JOB_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_OPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
_BYTES_BUCKETS = tuple(float(4**n * 256) for n in range(9))  # 256 B .. 16 MiB
_BLOCKS_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)

_RATE_LIMIT_OUTCOMES = frozenset({"allowed", "denied", "blocked", "error"})
_CACHE_RESULTS = frozenset({"hit", "miss"})
_CACHE_LOAD_OUTCOMES = frozenset({"loaded", "refreshed", "error"})
_METHOD_LABEL = "http_request_method"
# A hard ceiling on each family's child cache, on top of the per-label guard.
_CACHE_LIMIT = 10_000
_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
    "livemostrecent",
]  # fmt: skip

_C = TypeVar("_C", Counter, Gauge, Histogram)
_F = TypeVar("_F", "GuardedCounter", "GuardedGauge", "GuardedHistogram")
_R = TypeVar("_R")


@dataclass(frozen=True)
class _Shape:
    """What must match for a second registration to return the same family."""

    kind: str
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str | None = None
    max_label_values: int | None = None

    def describe(self) -> str:
        parts = [f"labels={list(self.labelnames)}"]
        if self.buckets is not None:
            parts.append(f"buckets={list(self.buckets)}")
        if self.multiprocess_mode is not None:
            parts.append(f"multiprocess_mode={self.multiprocess_mode!r}")
        parts.append(f"max_label_values={self.max_label_values}")
        return f"a {self.kind} with {', '.join(parts)}"


class _GuardedFamily(Generic[_C]):
    """A metric family whose label values are capped per label and whose children are cached."""

    __slots__ = (
        "_cache",
        "_lock",
        "_metric",
        "_on_overflow",
        "_seen",
        "labelnames",
        "name",
        "shape",
    )

    def __init__(
        self,
        metric: _C,
        name: str,
        shape: _Shape,
        on_overflow: Callable[[str, str], None] | None,
    ) -> None:
        self._metric: _C = metric
        self.name = name
        self.shape = shape
        self.labelnames = shape.labelnames
        self._on_overflow = on_overflow
        self._seen: list[set[str]] = [set() for _ in shape.labelnames]
        self._cache: dict[tuple[object, ...], _C] = {}
        self._lock = threading.Lock()

    def labels(self, *values: object, **labelvalues: object) -> _C:
        """Return the child for these label values, capped by the cardinality guard.

        Each label keeps at most ``max_label_values`` distinct values; a new value beyond that
        is replaced by :data:`OVERFLOW_LABEL_VALUE` and counted in
        ``hardening_metrics_label_overflow_total``. A label called ``http_request_method``
        reports non-standard methods as :data:`OTHER_HTTP_METHOD`.

        Args:
            *values: the label values in the order of ``labelnames`` (converted with ``str``).
            **labelvalues: or the label values by name (not both).

        Returns:
            The bound ``prometheus_client`` child (``.inc()``, ``.set()``, ``.observe()``...).

        Raises:
            ConfigurationError: if the labels do not match the family's ``labelnames``.
        """
        if labelvalues:
            values = self._by_name(values, labelvalues)
        try:
            child = self._cache.get(values)
        except TypeError:  # an unhashable value; _resolve converts it with str()
            child = None
        if child is None:
            child = self._resolve(values)[0]
        return child

    def _by_name(
        self, values: tuple[object, ...], labelvalues: Mapping[str, object]
    ) -> tuple[object, ...]:
        if values:
            raise ConfigurationError(
                f"{self.name}: pass label values by position or by name, not both"
            )
        if set(labelvalues) != set(self.labelnames):
            raise ConfigurationError(
                f"{self.name} has labels {list(self.labelnames)}, got {sorted(labelvalues)}"
            )
        return tuple([labelvalues[name] for name in self.labelnames])

    def _resolve(self, values: tuple[object, ...]) -> tuple[_C, bool]:
        """Guard, bind and cache a label tuple; return the child and whether it was kept as is."""
        if len(values) != len(self.labelnames):
            raise ConfigurationError(
                f"{self.name} has labels {list(self.labelnames)}, got {len(values)} value(s)"
            )
        strs = tuple([v if type(v) is str else str(v) for v in values])
        child = self._cache.get(strs)
        if child is not None:
            return child, True
        overflowed: list[str] = []
        with self._lock:
            guarded = list(strs)
            cap = self.shape.max_label_values  # None only for the overflow counter itself
            for index, value in enumerate(strs):
                if self.labelnames[index] == _METHOD_LABEL and value not in _HTTP_METHODS:
                    value = guarded[index] = OTHER_HTTP_METHOD
                seen = self._seen[index]
                if value in seen or value == OVERFLOW_LABEL_VALUE:
                    continue
                if cap is not None and len(seen) >= cap:
                    guarded[index] = OVERFLOW_LABEL_VALUE
                    overflowed.append(self.labelnames[index])
                else:
                    seen.add(value)
            child = self._metric.labels(*guarded)
            exact = tuple(guarded) == strs
            if exact and len(self._cache) < _CACHE_LIMIT:
                self._cache[strs] = child
        if overflowed and self._on_overflow is not None:
            for label in overflowed:
                self._on_overflow(self.name, label)
        return child, exact

    def _unlabelled(self) -> _C:
        if self.labelnames:
            raise ConfigurationError(
                f"{self.name} has labels {list(self.labelnames)}; call .labels(...) first"
            )
        return self._metric

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, labelnames={list(self.labelnames)})"


class GuardedCounter(_GuardedFamily[Counter]):
    """A counter family from :meth:`Metrics.counter`, with the cardinality guard on its labels.

    Attributes:
        name: the full metric name (with the namespace prefix).
        labelnames: the label names, in order.
    """

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Increase an unlabelled counter.

        Args:
            amount: how much to add; never negative.

        Raises:
            ConfigurationError: if the counter has labels (use ``.labels(...).inc()``).
            ValueError: if ``amount`` is negative.
        """
        self._unlabelled().inc(amount)


class GuardedGauge(_GuardedFamily[Gauge]):
    """A gauge family from :meth:`Metrics.gauge`, with the cardinality guard on its labels.

    Attributes:
        name: the full metric name (with the namespace prefix).
        labelnames: the label names, in order.
    """

    __slots__ = ()

    def set(self, value: float) -> None:
        """Set an unlabelled gauge.

        Args:
            value: the new value.

        Raises:
            ConfigurationError: if the gauge has labels (use ``.labels(...).set()``).
        """
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Increase an unlabelled gauge.

        Args:
            amount: how much to add (may be negative).

        Raises:
            ConfigurationError: if the gauge has labels (use ``.labels(...).inc()``).
            RuntimeError: if the gauge's ``multiprocess_mode`` is a ``mostrecent`` one.
        """
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Decrease an unlabelled gauge.

        Args:
            amount: how much to subtract.

        Raises:
            ConfigurationError: if the gauge has labels (use ``.labels(...).dec()``).
            RuntimeError: if the gauge's ``multiprocess_mode`` is a ``mostrecent`` one.
        """
        self._unlabelled().dec(amount)


class GuardedHistogram(_GuardedFamily[Histogram]):
    """A histogram family from :meth:`Metrics.histogram`, with the cardinality guard.

    Attributes:
        name: the full metric name (with the namespace prefix).
        labelnames: the label names, in order.
    """

    __slots__ = ("_now",)

    def __init__(
        self,
        metric: Histogram,
        name: str,
        shape: _Shape,
        on_overflow: Callable[[str, str], None] | None,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(metric, name, shape, on_overflow)
        self._now = now

    def observe(self, amount: float, exemplar: Mapping[str, str] | None = None) -> None:
        """Record one observation in an unlabelled histogram.

        Args:
            amount: the observed value (seconds, bytes, a count...).
            exemplar: labels of an exemplar (e.g. ``{"trace_id": ...}``), shown in OpenMetrics.

        Raises:
            ConfigurationError: if the histogram has labels (use ``.labels(...).observe()``).
        """
        self._unlabelled().observe(amount, None if exemplar is None else dict(exemplar))

    def time(self, **labels: str) -> HistogramTimer:
        """Return a timer recording into this histogram (context manager and decorator).

        Args:
            **labels: a value for every label except ``error_type``, which the timer fills
                in (``""`` on success, the exception's class name on failure) when the
                histogram declares it.

        Returns:
            A :class:`HistogramTimer`.

        Raises:
            ConfigurationError: if a label is missing or unknown.
        """
        names = set(self.labelnames)
        error_label = "error_type" in names and "error_type" not in labels
        expected = names - {"error_type"} if error_label else names
        if set(labels) != expected:
            raise ConfigurationError(
                f"{self.name} needs labels {sorted(expected)}, got {sorted(labels)}"
            )
        return HistogramTimer(self, dict(labels), error_label=error_label, now=self._now)


class HistogramTimer:
    """Times a block or each call of a function into a histogram, with ``time.perf_counter``.

    Made by :meth:`Metrics.timer` or :meth:`GuardedHistogram.time`. Use it as a context manager
    (``with`` or ``async with``) or as a decorator on sync and async functions. The duration is
    recorded when the block or call ends, also when it raises; if the histogram declares an
    ``error_type`` label that was not given, it is ``""`` on success and the exception's class
    name otherwise (``asyncio.CancelledError`` included).

    Attributes:
        duration: the seconds measured by the last completed block or call, or ``None``.
    """

    __slots__ = ("_error_label", "_family", "_labels", "_now", "_start", "duration")

    def __init__(
        self,
        family: GuardedHistogram,
        labels: dict[str, str],
        *,
        error_label: bool,
        now: Callable[[], float],
    ) -> None:
        self._family = family
        self._labels = labels
        self._error_label = error_label
        self._now = now
        self._start = 0.0
        self.duration: float | None = None

    def __enter__(self) -> Self:
        self._start = self._now()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._record(self._now() - self._start, exc_type)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate a function (sync or async) so that every call is timed.

        Args:
            func: the function to time.

        Returns:
            A wrapper with the same signature.
        """
        now = self._now
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_async(*args: _P.args, **kwargs: _P.kwargs) -> object:
                start = now()
                error: type[BaseException] | None = None
                try:
                    return await func(*args, **kwargs)
                except BaseException as exc:
                    error = type(exc)
                    raise
                finally:
                    self._record(now() - start, error)

            return cast("Callable[_P, _R]", timed_async)

        @functools.wraps(func)
        def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            start = now()
            error: type[BaseException] | None = None
            try:
                return func(*args, **kwargs)
            except BaseException as exc:
                error = type(exc)
                raise
            finally:
                self._record(now() - start, error)

        return timed

    def _record(self, seconds: float, error: type[BaseException] | None) -> None:
        labels = self._labels
        if self._error_label:
            labels = {**labels, "error_type": "" if error is None else error.__qualname__}
        if labels:
            self._family.labels(**labels).observe(seconds)
        else:
            self._family.observe(seconds)
        self.duration = seconds


class HttpRequestTimer:
    """One HTTP request in flight, from :meth:`Metrics.track_http_request`.

    It has already counted the request in ``http_server_active_requests``;
    :meth:`finish` takes it out again and records the duration in
    ``http_server_request_duration_seconds``. Adapters call ``finish`` in a ``finally`` block;
    a second call does nothing, so a request is never counted twice.

    Attributes:
        duration: the request's duration in seconds once finished, else ``None``.
    """

    __slots__ = ("_active", "_method", "_metrics", "_start", "duration")

    def __init__(self, metrics: Metrics, method: str, active: Gauge, start: float) -> None:
        self._metrics = metrics
        self._method = method
        self._active = active
        self._start = start
        self.duration: float | None = None

    def finish(
        self,
        status: int,
        route: str | None = None,
        error_type: str | None = None,
        *,
        exemplar: Mapping[str, str] | None = None,
    ) -> float:
        """Record the finished request (once) and return its duration.

        Args:
            status: the response status (500 when the app raised before responding, 499 when
                the client went away first).
            route: the matched route template, e.g. ``"/pages/{page_id}"``; ``None`` when no
                route matched (reported as :data:`UNMATCHED_ROUTE`).
            error_type: the exception class name when the app raised; ``None`` otherwise
                (a 5xx status then reports the status code, as OpenTelemetry does).
            exemplar: exemplar labels (e.g. ``{"trace_id": ...}``), shown in OpenMetrics.

        Returns:
            The request's duration in seconds (the first call's, on a repeated call).
        """
        if self.duration is not None:
            return self.duration
        duration = self.duration = self._metrics._now() - self._start
        self._active.dec()
        self._metrics.http_request(
            self._method, route, status, duration, error_type, exemplar=exemplar
        )
        return duration


@dataclass(frozen=True)
class _Builtin:
    """A family the primitives report into: its fixed name, help, labels and shape."""

    kind: Literal["counter", "gauge", "histogram"]
    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: GaugeMode = "livesum"


_HTTP_DURATION = _Builtin(
    "histogram",
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests.",
    ("http_request_method", "http_route", "http_response_status_code", "error_type"),
    _HTTP_DURATION_BUCKETS,
)
_HTTP_ACTIVE = _Builtin(
    "gauge",
    "http_server_active_requests",
    "Number of active HTTP server requests.",
    ("http_request_method",),
)
_RATE_LIMIT = _Builtin(
    "counter",
    "hardening_rate_limit_decisions_total",
    "Rate-limit decisions by limiter and outcome (allowed, denied, blocked, error).",
    ("limiter", "outcome"),
)
_LOCK_CONFLICTS = _Builtin(
    "counter",
    "hardening_lock_conflicts_total",
    "Optimistic-lock saves refused because another version was current.",
    ("entity",),
)
_PATCH_OPS = _Builtin(
    "histogram", "hardening_patch_operations", "Operations per applied patch.", (), _OPS_BUCKETS
)
_PATCH_SIZE = _Builtin(
    "histogram",
    "hardening_patch_size_bytes",
    "Size of applied patches in bytes.",
    (),
    _BYTES_BUCKETS,
)
_DOCUMENT_BLOCKS = _Builtin(
    "histogram",
    "hardening_document_blocks",
    "Blocks per document after an applied patch.",
    (),
    _BLOCKS_BUCKETS,
)
# Queue gauges hold one shared quantity (read from the queue backend), which any worker
# process may report: the latest report is the truth, so "livemostrecent" rather than a sum.
_QUEUE_DEPTH = _Builtin(
    "gauge",
    "hardening_queue_depth",
    "Jobs in a queue by state.",
    ("queue", "state"),
    multiprocess_mode="livemostrecent",
)
_QUEUE_OLDEST_AGE = _Builtin(
    "gauge",
    "hardening_queue_oldest_job_age_seconds",
    "Age of the oldest job waiting in a queue.",
    ("queue",),
    multiprocess_mode="livemostrecent",
)
_JOB_DURATION = _Builtin(
    "histogram",
    "hardening_job_duration_seconds",
    "Duration of job runs by queue and outcome.",
    ("queue", "outcome"),
    _JOB_DURATION_BUCKETS,
)
_JOBS = _Builtin(
    "counter",
    "hardening_jobs_total",
    "Finished job runs by queue and outcome.",
    ("queue", "outcome"),
)
_JOBS_DEAD = _Builtin(
    "counter",
    "hardening_jobs_dead_lettered_total",
    "Jobs moved to the dead-letter state after their last attempt.",
    ("queue",),
)
_CACHE_REQUESTS = _Builtin(
    "counter",
    "hardening_cache_requests_total",
    "Cache reads by cache and result (hit, miss); the hit ratio is hits over all.",
    ("cache", "result"),
)
_CACHE_LOADS = _Builtin(
    "counter",
    "hardening_cache_loads_total",
    "Cache loader runs by cache and outcome (loaded, refreshed early, error).",
    ("cache", "outcome"),
)
_CACHE_LOAD_DURATION = _Builtin(
    "histogram",
    "hardening_cache_load_duration_seconds",
    "Duration of cache loader runs.",
    ("cache",),
    _HTTP_DURATION_BUCKETS,
)
_CACHE_STAMPEDES = _Builtin(
    "counter",
    "hardening_cache_stampedes_avoided_total",
    "Cache callers that got another caller's load instead of running the loader.",
    ("cache",),
)
_CACHE_ERRORS = _Builtin(
    "counter",
    "hardening_cache_errors_total",
    "Cache storage operations that failed or were skipped while it was failing.",
    ("cache", "operation"),
)
_OVERFLOW = _Builtin(
    "counter",
    "hardening_metrics_label_overflow_total",
    "Label values folded into '_overflow' by the cardinality guard, by metric and label.",
    ("metric", "label"),
)


class Metrics:
    """A Prometheus registry for one application, with the families hardening reports into.

    Args:
        namespace: prefix of the application's own metric names (``"app"`` makes
            ``counter("save_errors_total", ...)`` into ``app_save_errors_total``). The
            built-in families ignore it: the HTTP ones keep their OpenTelemetry names
            (``http_server_*``), hardening's own are ``hardening_*``.
        registry: the ``prometheus_client`` registry to register into; by default a new one
            per instance (never the process-global ``REGISTRY`` unless it is passed).
        max_label_values: the cardinality guard: at most this many distinct values per label
            of each family; further values are folded into :data:`OVERFLOW_LABEL_VALUE`.
        multiprocess: render the metrics of every process sharing ``PROMETHEUS_MULTIPROC_DIR``
            (gunicorn, ``uvicorn --workers``). ``None`` turns it on when that variable is set.
        clock: the clock timers read (its ``monotonic()``); ``time.perf_counter`` by default.

    Raises:
        ConfigurationError: for a bad namespace or ``max_label_values``, or when multiprocess
            mode is asked for but ``PROMETHEUS_MULTIPROC_DIR`` is unset, not a directory, or was
            set only after ``prometheus_client`` had been imported.

    Every method is thread-safe. :meth:`render` may run in a worker thread (the adapters render
    off the event loop) while other threads and the event loop keep recording.
    """

    def __init__(
        self,
        namespace: str = "",
        *,
        registry: CollectorRegistry | None = None,
        max_label_values: int = 100,
        multiprocess: bool | None = None,
        clock: Clock | None = None,
    ) -> None:
        if namespace and not _NAME_RE.match(namespace):
            raise ConfigurationError(
                f"namespace {namespace!r} is not a valid metric name prefix "
                "(letters, digits and underscores, not starting with a digit)"
            )
        self._namespace = namespace
        self._registry = CollectorRegistry() if registry is None else registry
        self._max_label_values = _check_cap(max_label_values)
        self._multiprocess_dir = _multiprocess_dir() if _wants_multiprocess(multiprocess) else None
        self._now: Callable[[], float] = time.perf_counter if clock is None else clock.monotonic
        self._families: dict[str, GuardedCounter | GuardedGauge | GuardedHistogram] = {}
        self._builtins: dict[str, GuardedCounter | GuardedGauge | GuardedHistogram] = {}
        self._lock = threading.RLock()
        self._exposition = self._registry
        if self._multiprocess_dir is not None:
            self._exposition = CollectorRegistry()
            _multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                self._exposition, path=self._multiprocess_dir
            )
        # Hot-path caches of bound children, keyed by the caller's raw arguments.
        self._http_children: dict[tuple[str, str | None, int, str | None], Histogram] = {}
        self._active_children: dict[str, Gauge] = {}

    @property
    def namespace(self) -> str:
        """The prefix of the application's metric names (``""`` for none)."""
        return self._namespace

    @property
    def registry(self) -> CollectorRegistry:
        """The ``prometheus_client`` registry the families are registered in."""
        return self._registry

    @property
    def multiprocess(self) -> bool:
        """Whether :meth:`render` aggregates every process of ``PROMETHEUS_MULTIPROC_DIR``."""
        return self._multiprocess_dir is not None

    @property
    def max_label_values(self) -> int:
        """The default cap on distinct values per label."""
        return self._max_label_values

    def __repr__(self) -> str:
        return (
            f"Metrics(namespace={self._namespace!r}, multiprocess={self.multiprocess}, "
            f"families={len(self._families)})"
        )

    # --- the application's own families -----------------------------------------------

    def counter(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_label_values: int | None = None,
    ) -> GuardedCounter:
        """Get or create a counter.

        Args:
            name: the name without the namespace; ``_total`` is added if missing.
            help: what it counts (the ``# HELP`` line).
            labelnames: the label names.
            max_label_values: this family's cap on distinct values per label (default: the
                instance's).

        Returns:
            The same :class:`GuardedCounter` for every call with the same name and shape.

        Raises:
            ConfigurationError: for an invalid name, help or label, or if the name is taken by
                a family of another kind, labels or cap.
        """
        shape = _Shape(
            "counter", self._labelnames(labelnames), None, None, self._cap(max_label_values)
        )
        return self._get_or_create(GuardedCounter, self._full_name(name), help, shape)

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        multiprocess_mode: GaugeMode = "livesum",
        max_label_values: int | None = None,
    ) -> GuardedGauge:
        """Get or create a gauge.

        Args:
            name: the name without the namespace.
            help: what it measures (the ``# HELP`` line).
            labelnames: the label names.
            multiprocess_mode: how processes' values combine in multiprocess mode:
                ``"livesum"`` (default) for per-process parts such as requests in flight,
                ``"livemostrecent"`` for one shared quantity (a queue's depth read from the
                database) that any process may report. ``"mostrecent"`` modes forbid
                ``inc``/``dec``.
            max_label_values: this family's cap on distinct values per label.

        Returns:
            The same :class:`GuardedGauge` for every call with the same name and shape.

        Raises:
            ConfigurationError: for an invalid name, help, label or mode, or if the name is
                taken by a family of another shape.
        """
        if multiprocess_mode not in Gauge._MULTIPROC_MODES:
            raise ConfigurationError(f"unknown gauge multiprocess_mode {multiprocess_mode!r}")
        shape = _Shape(
            "gauge",
            self._labelnames(labelnames),
            None,
            multiprocess_mode,
            self._cap(max_label_values),
        )
        return self._get_or_create(GuardedGauge, self._full_name(name), help, shape)

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = _HTTP_DURATION_BUCKETS,
        max_label_values: int | None = None,
    ) -> GuardedHistogram:
        """Get or create a histogram.

        Args:
            name: the name without the namespace (end it in the unit: ``_seconds``, ``_bytes``).
            help: what it measures (the ``# HELP`` line).
            labelnames: the label names (not ``le``).
            buckets: the upper bounds, increasing; ``+Inf`` is implied. The default suits
                latencies in seconds (the OpenTelemetry HTTP buckets, 5 ms to 10 s).
            max_label_values: this family's cap on distinct values per label.

        Returns:
            The same :class:`GuardedHistogram` for every call with the same name and shape.

        Raises:
            ConfigurationError: for an invalid name, help, label or buckets, or if the name is
                taken by a family of another shape.
        """
        shape = _Shape(
            "histogram",
            self._labelnames(labelnames, histogram=True),
            _buckets(buckets),
            None,
            self._cap(max_label_values),
        )
        return self._get_or_create(GuardedHistogram, self._full_name(name), help, shape)

    def timer(self, name: str, /, **labels: str) -> HistogramTimer:
        """Return a timer for a histogram registered with :meth:`histogram`.

        Args:
            name: the histogram's name as given to :meth:`histogram` (without the namespace).
            **labels: a value for every label except ``error_type``, which the timer fills in.

        Returns:
            A :class:`HistogramTimer`: a context manager (``with``/``async with``) and a
            decorator for sync and async functions.

        Raises:
            ConfigurationError: if no histogram has that name, or a label is missing or unknown.
        """
        family = self._families.get(self._full_name(name))
        if not isinstance(family, GuardedHistogram):
            raise ConfigurationError(
                f"no histogram {self._full_name(name)!r}: "
                "register it with metrics.histogram() first"
            )
        return family.time(**labels)

    # --- built-in families: HTTP ----------------------------------------------------------

    def http_request(
        self,
        method: str,
        route: str | None,
        status: int,
        duration: float,
        error_type: str | None = None,
        *,
        exemplar: Mapping[str, str] | None = None,
    ) -> None:
        """Record one finished HTTP request in ``http_server_request_duration_seconds``.

        The histogram's ``_count`` is the request counter; there is no separate one.

        Args:
            method: the request method; non-standard ones are reported as ``_OTHER``.
            route: the matched route template; ``None`` (or ``""``) for no match, reported as
                :data:`UNMATCHED_ROUTE`. Never pass the raw path.
            status: the response status code.
            duration: seconds from receiving the request to the end of the response.
            error_type: the exception class name when the app raised. ``None`` reports ``""``
                (the same as an absent label in PromQL), or the status code for a 5xx.
            exemplar: exemplar labels (e.g. ``{"trace_id": ...}``), shown in OpenMetrics.
        """
        child = self._http_children.get((method, route, status, error_type))
        if child is None:
            child = self._http_child(method, route, status, error_type)
        if exemplar is None:
            child.observe(duration)
        else:
            child.observe(duration, dict(exemplar))

    def _http_child(
        self, method: str, route: str | None, status: int, error_type: str | None
    ) -> Histogram:
        family = self._builtin(GuardedHistogram, _HTTP_DURATION)
        error = (str(status) if status >= 500 else "") if error_type is None else error_type
        child, exact = family._resolve((method, route or UNMATCHED_ROUTE, str(status), error))
        if exact and len(self._http_children) < _CACHE_LIMIT:
            self._http_children[(method, route, status, error_type)] = child
        return child

    def http_request_started(self, method: str) -> None:
        """Count a request in ``http_server_active_requests{http_request_method}``.

        Args:
            method: the request method (non-standard ones count as ``_OTHER``).
        """
        child = self._active_children.get(method)
        if child is None:
            child = self._active_child(method)
        child.inc()

    def http_request_finished(self, method: str) -> None:
        """Take a request started with :meth:`http_request_started` out of the active gauge.

        Args:
            method: the same method as given to :meth:`http_request_started`.
        """
        child = self._active_children.get(method)
        if child is None:
            child = self._active_child(method)
        child.dec()

    def _active_child(self, method: str) -> Gauge:
        child, exact = self._builtin(GuardedGauge, _HTTP_ACTIVE)._resolve((method,))
        if exact:
            self._active_children[method] = child
        return child

    def track_http_request(self, method: str) -> HttpRequestTimer:
        """Start observing one HTTP request: the helper the ASGI and WSGI adapters share.

        Counts the request as active and starts its clock; call
        :meth:`HttpRequestTimer.finish` when the response is complete (in a ``finally``).

        Args:
            method: the request method.

        Returns:
            The request's :class:`HttpRequestTimer`.
        """
        child = self._active_children.get(method)
        if child is None:
            child = self._active_child(method)
        child.inc()
        return HttpRequestTimer(self, method, child, self._now())

    # --- built-in families: the other primitives -------------------------------------------

    def rate_limit_decision(self, limiter: str, outcome: str) -> None:
        """Count one decision in ``hardening_rate_limit_decisions_total{limiter,outcome}``.

        Args:
            limiter: the limiter's name (a handful per app, not a key or a client).
            outcome: ``"allowed"``, ``"denied"``, ``"blocked"`` or ``"error"``.

        Raises:
            ConfigurationError: for another outcome.
        """
        if outcome not in _RATE_LIMIT_OUTCOMES:
            raise ConfigurationError(
                f"rate-limit outcome must be one of {sorted(_RATE_LIMIT_OUTCOMES)}, not {outcome!r}"
            )
        self._builtin(GuardedCounter, _RATE_LIMIT).labels(limiter, outcome).inc()

    def lock_conflict(self, entity: str) -> None:
        """Count one refused save in ``hardening_lock_conflicts_total{entity}``.

        Args:
            entity: the kind of thing (table or model name), never its key.
        """
        self._builtin(GuardedCounter, _LOCK_CONFLICTS).labels(entity).inc()

    def patch_applied(self, ops: int, size_bytes: int, blocks: int | None = None) -> None:
        """Record an applied patch in ``hardening_patch_operations``, ``_patch_size_bytes``...

        Args:
            ops: the number of operations in the patch.
            size_bytes: the patch's encoded size.
            blocks: the number of blocks in the document afterwards, when known
                (``hardening_document_blocks``).
        """
        self._builtin(GuardedHistogram, _PATCH_OPS).observe(ops)
        self._builtin(GuardedHistogram, _PATCH_SIZE).observe(size_bytes)
        if blocks is not None:
            self._builtin(GuardedHistogram, _DOCUMENT_BLOCKS).observe(blocks)

    def queue_depth(self, queue: str, state: str, value: float) -> None:
        """Set ``hardening_queue_depth{queue,state}`` (multiprocess mode: latest report wins).

        Args:
            queue: the queue's name.
            state: the jobs' state, e.g. ``"waiting"``, ``"delayed"``, ``"running"``,
                ``"retrying"``, ``"dead"``.
            value: how many jobs are in that state.
        """
        self._builtin(GuardedGauge, _QUEUE_DEPTH).labels(queue, state).set(value)

    def queue_oldest_age(self, queue: str, seconds: float) -> None:
        """Set ``hardening_queue_oldest_job_age_seconds{queue}``.

        Args:
            queue: the queue's name.
            seconds: the age of the oldest job waiting to run (0 when none waits).
        """
        self._builtin(GuardedGauge, _QUEUE_OLDEST_AGE).labels(queue).set(seconds)

    def job_finished(self, queue: str, outcome: str, duration: float) -> None:
        """Record a job run in ``hardening_job_duration_seconds`` and ``hardening_jobs_total``.

        Args:
            queue: the queue's name.
            outcome: how the run ended, e.g. ``"completed"``, ``"failed"``, ``"dead"``, ``"lost"``.
            duration: the run's duration in seconds.
        """
        self._builtin(GuardedHistogram, _JOB_DURATION).labels(queue, outcome).observe(duration)
        self._builtin(GuardedCounter, _JOBS).labels(queue, outcome).inc()

    def job_dead_lettered(self, queue: str) -> None:
        """Count a job moved to the dead letters in ``hardening_jobs_dead_lettered_total``.

        Args:
            queue: the queue's name.
        """
        self._builtin(GuardedCounter, _JOBS_DEAD).labels(queue).inc()

    def cache_request(self, cache: str, result: str, count: int = 1) -> None:
        """Count cache reads in ``hardening_cache_requests_total{cache,result}``.

        Args:
            cache: the cache's name.
            result: ``"hit"`` or ``"miss"``.
            count: how many reads (a ``get_many`` counts each key).

        Raises:
            ConfigurationError: for another result.
        """
        if result not in _CACHE_RESULTS:
            raise ConfigurationError(f"cache result must be 'hit' or 'miss', not {result!r}")
        self._builtin(GuardedCounter, _CACHE_REQUESTS).labels(cache, result).inc(count)

    def cache_load(self, cache: str, outcome: str, duration: float) -> None:
        """Record a loader run in ``hardening_cache_loads_total`` and its duration histogram.

        Args:
            cache: the cache's name.
            outcome: ``"loaded"`` (a miss), ``"refreshed"`` (early, before expiry) or
                ``"error"`` (the loader raised).
            duration: the run's duration in seconds
                (``hardening_cache_load_duration_seconds{cache}``).

        Raises:
            ConfigurationError: for another outcome.
        """
        if outcome not in _CACHE_LOAD_OUTCOMES:
            raise ConfigurationError(
                f"cache load outcome must be one of {sorted(_CACHE_LOAD_OUTCOMES)}, not {outcome!r}"
            )
        self._builtin(GuardedCounter, _CACHE_LOADS).labels(cache, outcome).inc()
        self._builtin(GuardedHistogram, _CACHE_LOAD_DURATION).labels(cache).observe(duration)

    def cache_stampede_avoided(self, cache: str) -> None:
        """Count a caller served by another's load in ``hardening_cache_stampedes_avoided_total``.

        Args:
            cache: the cache's name.
        """
        self._builtin(GuardedCounter, _CACHE_STAMPEDES).labels(cache).inc()

    def cache_error(self, cache: str, operation: str) -> None:
        """Count a failed (or skipped) storage call in ``hardening_cache_errors_total``.

        Args:
            cache: the cache's name.
            operation: ``"get"``, ``"set"``, ``"delete"``, ``"invalidate"`` or ``"lock"``.
        """
        self._builtin(GuardedCounter, _CACHE_ERRORS).labels(cache, operation).inc()

    # --- exposition ------------------------------------------------------------------------

    def render(self, accept_header: str | None = None) -> tuple[bytes, str]:
        """Render every family for a scrape, in the format the ``Accept`` header asks for.

        OpenMetrics (with exemplars) when the scraper accepts ``application/openmetrics-text``,
        otherwise the Prometheus text format. Safe to call from any thread; it does CPU work
        (about 0.2 ms per labelled histogram series), so async servers should call it in a
        worker thread.

        Args:
            accept_header: the scrape request's ``Accept`` header.

        Returns:
            ``(body, content_type)``; the content type is always set.
        """
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self._exposition), content_type

    def render_response(
        self, accept_header: str | None = None, accept_encoding: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """Render for a ``/metrics`` response, gzip-compressed when the scraper accepts it.

        Args:
            accept_header: the scrape request's ``Accept`` header.
            accept_encoding: its ``Accept-Encoding`` header.

        Returns:
            ``(body, headers)`` with ``Content-Type``, ``Content-Length``, ``Vary`` and, when
            compressed, ``Content-Encoding: gzip``.
        """
        body, content_type = self.render(accept_header)
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if _accepts_gzip(accept_encoding or ""):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(body))
        return body, headers

    # --- registration ----------------------------------------------------------------------

    def _full_name(self, name: str) -> str:
        full = f"{self._namespace}_{name}" if self._namespace else name
        if not isinstance(name, str) or not _NAME_RE.match(full):
            raise ConfigurationError(
                f"metric name {full!r} is invalid: use letters, digits and underscores, "
                "not starting with a digit"
            )
        return full

    def _labelnames(self, labelnames: Sequence[str], *, histogram: bool = False) -> tuple[str, ...]:
        if isinstance(labelnames, str):
            raise ConfigurationError(f"labelnames must be a sequence of names, not {labelnames!r}")
        names = tuple(labelnames)
        for label in names:
            if not isinstance(label, str) or not _NAME_RE.match(label) or label.startswith("__"):
                raise ConfigurationError(
                    f"label name {label!r} is invalid: use letters, digits and underscores, "
                    "not starting with a digit or '__'"
                )
            if histogram and label == "le":
                raise ConfigurationError("a histogram cannot have a label called 'le'")
        if len(set(names)) != len(names):
            raise ConfigurationError(f"duplicate label names in {list(names)}")
        return names

    def _get_or_create(self, cls: type[_F], full_name: str, help: str, shape: _Shape) -> _F:
        # prometheus_client names a counter without "_total" (and adds it when exposing).
        key = full_name.removesuffix("_total") if shape.kind == "counter" else full_name
        with self._lock:
            family = self._families.get(key)
            if family is not None:
                if not isinstance(family, cls) or family.shape != shape:
                    raise ConfigurationError(
                        f"metric {full_name!r} is already registered as "
                        f"{family.shape.describe()}; cannot register it as {shape.describe()}"
                    )
                return family
            if not isinstance(help, str) or not help.strip():
                raise ConfigurationError(f"metric {full_name!r} needs a help text")
            if shape.kind != "counter" and full_name.endswith("_total"):
                raise ConfigurationError(
                    f"metric {full_name!r}: only counters end in '_total' (Prometheus naming)"
                )
            metric = _create_metric(full_name, help, shape, self._registry)
            # The overflow counter's labels are family and label names, bounded by the code.
            on_overflow = None if key == _OVERFLOW_KEY else self._overflowed
            new = cls(metric, full_name, shape, on_overflow)  # type: ignore[arg-type]
            if isinstance(new, GuardedHistogram):
                new._now = self._now
            self._families[key] = new
            return new

    def _cap(self, max_label_values: int | None) -> int:
        if max_label_values is None:
            return self._max_label_values
        return _check_cap(max_label_values)

    def _builtin(self, cls: type[_F], spec: _Builtin) -> _F:
        family = self._builtins.get(spec.name)
        if isinstance(family, cls):
            return family
        shape = _Shape(
            spec.kind,
            spec.labelnames,
            spec.buckets,
            spec.multiprocess_mode if spec.kind == "gauge" else None,
            None if spec is _OVERFLOW else self._max_label_values,
        )
        family = self._builtins[spec.name] = self._get_or_create(cls, spec.name, spec.help, shape)
        return family

    def _overflowed(self, metric: str, label: str) -> None:
        self._builtin(GuardedCounter, _OVERFLOW).labels(metric, label).inc()


_OVERFLOW_KEY = _OVERFLOW.name.removesuffix("_total")


def _check_cap(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"max_label_values must be an int of at least 1, not {value!r}")
    return value


def _buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    try:
        bounds = [float(b) for b in buckets]
    except (TypeError, ValueError):
        raise ConfigurationError(f"buckets must be numbers, not {buckets!r}") from None
    if bounds and bounds[-1] == math.inf:
        bounds.pop()  # prometheus_client adds +Inf itself
    if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds):
        raise ConfigurationError(f"buckets must be finite numbers, at least one: {buckets!r}")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ConfigurationError(f"buckets must be strictly increasing: {buckets!r}")
    return tuple(bounds)


def _create_metric(
    name: str, help: str, shape: _Shape, registry: CollectorRegistry
) -> Counter | Gauge | Histogram:
    try:
        if shape.kind == "counter":
            return Counter(name, help, shape.labelnames, registry=registry)
        if shape.kind == "gauge":
            mode = cast("GaugeMode", shape.multiprocess_mode)
            return Gauge(name, help, shape.labelnames, registry=registry, multiprocess_mode=mode)
        buckets = shape.buckets or _HTTP_DURATION_BUCKETS
        return Histogram(name, help, shape.labelnames, registry=registry, buckets=buckets)
    except ValueError as exc:  # e.g. its series collide with another family's in the registry
        raise ConfigurationError(f"cannot register metric {name!r}: {exc}") from exc


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if coding.lower() not in ("gzip", "*"):
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


# --- multiprocess mode ---------------------------------------------------------------------

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _wants_multiprocess(multiprocess: bool | None) -> bool:
    if multiprocess is None:
        return bool(os.environ.get(_ENV))
    return multiprocess


def _multiprocess_dir() -> str:
    path = os.environ.get(_ENV)
    if not path:
        raise ConfigurationError(f"multiprocess metrics need {_ENV} set to a directory")
    if not os.path.isdir(path):
        raise ConfigurationError(f"{_ENV}={path!r} is not a directory; create it at start-up")
    # prometheus_client picks per-process files or in-memory values once, at import.
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise ConfigurationError(
            f"{_ENV} was set after prometheus_client was imported, so this process keeps its "
            "metrics in memory; set it in the server's environment before it starts"
        )
    return path


def _directory(path: str | os.PathLike[str] | None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(_ENV)
    if not env:
        raise ConfigurationError(f"no directory given and {_ENV} is not set")
    return Path(env)


def wipe_multiprocess_dir(path: str | os.PathLike[str] | None = None) -> int:
    """Empty the multiprocess directory before the server starts its workers.

    Files left by an earlier run would otherwise be added to the new run's counters. Call it
    once in the parent process, before any worker starts (gunicorn's ``on_starting`` hook),
    never while workers run. The directory is created if it is missing.

    Args:
        path: the directory; ``PROMETHEUS_MULTIPROC_DIR`` by default.

    Returns:
        How many metric files (``*.db``) were removed.

    Raises:
        ConfigurationError: if no path is given and ``PROMETHEUS_MULTIPROC_DIR`` is unset.
    """
    directory = _directory(path)
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for file in directory.glob("*.db"):
        file.unlink(missing_ok=True)
        removed += 1
    return removed


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a dead worker's ``live*`` gauge files, so its in-flight values stop counting.

    Counters and histograms of the dead worker stay (they must never go backwards).

    Args:
        pid: the worker's process id.
        path: the multiprocess directory; ``PROMETHEUS_MULTIPROC_DIR`` by default.

    Raises:
        ConfigurationError: if no path is given and ``PROMETHEUS_MULTIPROC_DIR`` is unset.
    """
    _multiprocess.mark_process_dead(pid, str(_directory(path)))  # type: ignore[no-untyped-call]


class _Worker(Protocol):
    pid: int


def gunicorn_child_exit(server: object, worker: _Worker) -> None:
    """Gunicorn ``child_exit`` hook: :func:`mark_process_dead` for the worker that exited.

    Use it in a gunicorn config file: ``child_exit = gunicorn_child_exit``. Does nothing when
    ``PROMETHEUS_MULTIPROC_DIR`` is unset (multiprocess metrics are off).

    Args:
        server: gunicorn's arbiter (unused).
        worker: the worker that exited; its ``pid`` is used.
    """
    if os.environ.get(_ENV):
        mark_process_dead(worker.pid)
