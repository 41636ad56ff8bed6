"""hardening.metrics: registration, guarded families, timers, built-in families, rendering."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from hardening import (
    OTHER_HTTP_METHOD,
    OVERFLOW_LABEL_VALUE,
    UNMATCHED_ROUTE,
    ConfigurationError,
    FakeClock,
    Metrics,
    gunicorn_child_exit,
    mark_process_dead,
    wipe_multiprocess_dir,
)
from tests.conftest import gunicorn_options

TESTS = Path(__file__).resolve().parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
HTTP = "http_server_request_duration_seconds"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The current value of one sample, or ``None`` when it does not exist."""
    return metrics.registry.get_sample_value(name, labels)


def http_labels(method: str, route: str, status: str, error_type: str = "") -> dict[str, str]:
    return {
        "http_request_method": method,
        "http_route": route,
        "http_response_status_code": status,
        "error_type": error_type,
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("app")


@pytest.fixture
def populated() -> Metrics:
    """A registry where every built-in family and each kind of app family has data."""
    m = Metrics("app")
    m.counter("save_errors_total", "Failed page saves.", ["error_type"]).labels("Conflict").inc()
    m.gauge("indexing_queue_depth", "Jobs waiting for indexing.").set(3)
    m.histogram("save_duration_seconds", "Page save time.").observe(0.2)
    m.http_request("GET", "/pages/{page_id}", 200, 0.012, exemplar={"trace_id": "abc123"})
    m.http_request("POST", None, 404, 0.002)
    m.track_http_request("PATCH").finish(500, "/pages/{page_id}", "RuntimeError")
    m.rate_limit_decision("api", "allowed")
    m.rate_limit_decision("api", "denied")
    m.lock_conflict("Page")
    m.patch_applied(ops=4, size_bytes=900, blocks=120)
    m.queue_depth("indexing", "ready", 7)
    m.queue_oldest_age("indexing", 12.5)
    m.job_finished("indexing", "succeeded", 0.4)
    m.job_dead_lettered("indexing")
    m.counter("tiny_total", "A capped counter.", ["key"], max_label_values=1).labels("a").inc()
    m.counter("tiny_total", "A capped counter.", ["key"], max_label_values=1).labels("b").inc()
    return m


# --- registration ---------------------------------------------------------------------------


def test_namespace_prefixes_app_metrics(metrics: Metrics) -> None:
    """``Metrics(namespace="app").counter("save_errors_total")`` is ``app_save_errors_total``."""
    metrics.counter("save_errors_total", "Failed saves.").inc()
    assert value(metrics, "app_save_errors_total") == 1


def test_no_namespace_keeps_the_name() -> None:
    """Without a namespace the name is used as given."""
    m = Metrics()
    m.gauge("indexing_queue_depth", "Depth.").set(2)
    assert value(m, "indexing_queue_depth") == 2


def test_same_name_and_shape_returns_same_family(metrics: Metrics) -> None:
    """Registration is idempotent: the second call returns the first family."""
    first = metrics.histogram("save_seconds", "Saves.", ["workspace_id"])
    assert metrics.histogram("save_seconds", "Saves.", ("workspace_id",)) is first


def test_counter_with_and_without_total_is_one_family(metrics: Metrics) -> None:
    """``x`` and ``x_total`` name the same counter (prometheus_client adds the suffix)."""
    assert metrics.counter("saves", "Saves.") is metrics.counter("saves_total", "Saves.")


def test_other_kind_under_same_name_raises(metrics: Metrics) -> None:
    """A name registered as a counter cannot come back as a gauge."""
    metrics.counter("jobs", "Jobs.")
    with pytest.raises(ConfigurationError, match="already registered as a counter"):
        metrics.gauge("jobs", "Jobs.")


def test_other_labels_under_same_name_raise(metrics: Metrics) -> None:
    """Same name with other label names is a shape conflict."""
    metrics.counter("saves_total", "Saves.", ["a"])
    with pytest.raises(ConfigurationError, match="labels"):
        metrics.counter("saves_total", "Saves.", ["b"])


def test_other_buckets_under_same_name_raise(metrics: Metrics) -> None:
    """Same histogram name with other buckets is a shape conflict."""
    metrics.histogram("size_bytes", "Sizes.", buckets=[1, 10])
    with pytest.raises(ConfigurationError, match="buckets"):
        metrics.histogram("size_bytes", "Sizes.", buckets=[1, 100])


def test_other_cap_under_same_name_raises(metrics: Metrics) -> None:
    """Same name with another ``max_label_values`` is a shape conflict."""
    metrics.counter("saves_total", "Saves.", ["a"], max_label_values=5)
    with pytest.raises(ConfigurationError, match="max_label_values"):
        metrics.counter("saves_total", "Saves.", ["a"])


def test_default_cap_equals_explicit_default(metrics: Metrics) -> None:
    """Passing the instance's cap explicitly is the same shape as omitting it."""
    first = metrics.counter("saves_total", "Saves.", ["a"])
    assert metrics.counter("saves_total", "Saves.", ["a"], max_label_values=100) is first


@pytest.mark.parametrize("name", ["1abc", "a-b", "a.b", "a b", "é", ""])
def test_invalid_metric_name_raises(name: str) -> None:
    """Names follow the Prometheus rule ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    with pytest.raises(ConfigurationError, match="metric name"):
        Metrics().counter(name, "Help.")


@pytest.mark.parametrize("label", ["__reserved", "1a", "a-b", "a.b", ""])
def test_invalid_label_name_raises(metrics: Metrics, label: str) -> None:
    """Label names follow the Prometheus rule and may not start with ``__``."""
    with pytest.raises(ConfigurationError, match="label name"):
        metrics.counter("c_total", "Help.", [label])


def test_histogram_label_le_raises(metrics: Metrics) -> None:
    """``le`` is the bucket label of a histogram and cannot be declared."""
    with pytest.raises(ConfigurationError, match="'le'"):
        metrics.histogram("h_seconds", "Help.", ["le"])


def test_duplicate_label_names_raise(metrics: Metrics) -> None:
    """A label name may appear once."""
    with pytest.raises(ConfigurationError, match="duplicate"):
        metrics.counter("c_total", "Help.", ["a", "a"])


def test_labelnames_as_a_string_raises(metrics: Metrics) -> None:
    """A bare string is not taken as a sequence of one-letter labels."""
    with pytest.raises(ConfigurationError, match="sequence"):
        metrics.counter("c_total", "Help.", "workspace_id")


def test_empty_help_raises(metrics: Metrics) -> None:
    """Every family needs a HELP text."""
    with pytest.raises(ConfigurationError, match="help"):
        metrics.counter("c_total", " ")


def test_total_suffix_on_a_gauge_raises(metrics: Metrics) -> None:
    """Only counters end in ``_total``."""
    with pytest.raises(ConfigurationError, match="_total"):
        metrics.gauge("queue_total", "Help.")


def test_colliding_series_raise(metrics: Metrics) -> None:
    """A counter whose series collide with a histogram's ``_count`` is refused clearly."""
    metrics.histogram("save_seconds", "Saves.")
    with pytest.raises(ConfigurationError, match="cannot register"):
        metrics.gauge("save_seconds_count", "Collides.")


@pytest.mark.parametrize("buckets", [[], [2.0, 1.0], [1.0, 1.0], [math.nan], ["x"]])
def test_bad_buckets_raise(metrics: Metrics, buckets: list[float]) -> None:
    """Buckets are finite, strictly increasing numbers, at least one."""
    with pytest.raises(ConfigurationError, match="buckets"):
        metrics.histogram("h_seconds", "Help.", buckets=buckets)


def test_trailing_inf_bucket_is_accepted(metrics: Metrics) -> None:
    """A trailing ``+Inf`` is allowed and means the same as leaving it out."""
    first = metrics.histogram("h_seconds", "Help.", buckets=[1.0, math.inf])
    assert metrics.histogram("h_seconds", "Help.", buckets=[1.0]) is first


@pytest.mark.parametrize("cap", [0, -1, True, 1.5])
def test_bad_max_label_values_raises(cap: int) -> None:
    """The cap is an int of at least 1."""
    with pytest.raises(ConfigurationError, match="max_label_values"):
        Metrics(max_label_values=cap)


def test_invalid_namespace_raises() -> None:
    """The namespace must itself be a valid name prefix."""
    with pytest.raises(ConfigurationError, match="namespace"):
        Metrics("my-app")


def test_unknown_gauge_mode_raises(metrics: Metrics) -> None:
    """Only prometheus_client's multiprocess modes are accepted."""
    with pytest.raises(ConfigurationError, match="multiprocess_mode"):
        metrics.gauge("g", "Help.", multiprocess_mode="average")  # type: ignore[arg-type]


def test_instances_have_separate_registries() -> None:
    """Two instances never share series (each has its own registry)."""
    a, b = Metrics(), Metrics()
    a.counter("c_total", "Help.").inc()
    b.counter("c_total", "Help.")
    assert a.registry is not b.registry
    assert value(b, "c_total") == 0


def test_given_registry_is_used() -> None:
    """A registry passed in receives the families."""
    registry = CollectorRegistry()
    Metrics(registry=registry).counter("c_total", "Help.").inc()
    assert registry.get_sample_value("c_total") == 1


# --- guarded families -------------------------------------------------------------------------


def test_labels_by_name_and_by_position_are_the_same_child(metrics: Metrics) -> None:
    """``labels("w", "ok")`` and ``labels(workspace_id="w", status="ok")`` are one series."""
    family = metrics.counter("saves_total", "Saves.", ["workspace_id", "status"])
    assert family.labels("w", "ok") is family.labels(status="ok", workspace_id="w")


def test_non_string_label_values_are_converted(metrics: Metrics) -> None:
    """Label values go through ``str`` like prometheus_client does (and ``True`` != ``1``)."""
    family = metrics.counter("c_total", "Help.", ["v"])
    family.labels(1).inc()
    family.labels(True).inc()
    family.labels("1").inc()
    assert value(metrics, "app_c_total", v="1") == 2
    assert value(metrics, "app_c_total", v="True") == 1


def test_wrong_label_count_raises(metrics: Metrics) -> None:
    """Every label needs a value."""
    with pytest.raises(ConfigurationError, match="labels"):
        metrics.counter("c_total", "Help.", ["a", "b"]).labels("x")


def test_wrong_label_names_raise(metrics: Metrics) -> None:
    """Label names given by keyword must be exactly the declared ones."""
    with pytest.raises(ConfigurationError, match="labels"):
        metrics.counter("c_total", "Help.", ["a"]).labels(b="x")


def test_positional_and_keyword_labels_together_raise(metrics: Metrics) -> None:
    """Label values come either by position or by name."""
    with pytest.raises(ConfigurationError, match="not both"):
        metrics.counter("c_total", "Help.", ["a", "b"]).labels("x", b="y")


def test_unlabelled_use_of_a_labelled_family_raises(metrics: Metrics) -> None:
    """``.inc()`` on a labelled counter says to call ``.labels()`` first."""
    with pytest.raises(ConfigurationError, match=r"\.labels"):
        metrics.counter("c_total", "Help.", ["a"]).inc()


def test_counter_increments_per_error_type(metrics: Metrics) -> None:
    """Each error type has its own series, incremented once per failure."""
    errors = metrics.counter("save_errors_total", "Failed saves.", ["error_type"])
    for error in ["ConflictError", "ConflictError", "PatchError", "Timeout", "ConflictError"]:
        errors.labels(error).inc()
    assert value(metrics, "app_save_errors_total", error_type="ConflictError") == 3
    assert value(metrics, "app_save_errors_total", error_type="PatchError") == 1
    assert value(metrics, "app_save_errors_total", error_type="Timeout") == 1


def test_gauge_tracks_live_values(metrics: Metrics) -> None:
    """A gauge reads back the current value after each set/inc/dec."""
    depth = metrics.gauge("queue_depth", "Depth.")
    depth.set(10)
    assert value(metrics, "app_queue_depth") == 10
    depth.inc(5)
    assert value(metrics, "app_queue_depth") == 15
    depth.dec(12)
    assert value(metrics, "app_queue_depth") == 3


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    raise AssertionError("rank beyond +Inf")  # pragma: no cover


def _bucket_of(x: float, bounds: list[float]) -> float:
    return next(upper for upper in bounds if x <= upper)


def test_histogram_buckets_capture_p50_p95_p99(metrics: Metrics) -> None:
    """Quantiles estimated from the exposed buckets land in the true quantiles' buckets."""
    latency = metrics.histogram("save_duration_seconds", "Save time.")
    fast = [0.010 + 0.040 * i / 899 for i in range(900)]
    mid = [0.100 + 0.300 * i / 79 for i in range(80)]
    slow = [1.0 + (i + 1) / 20 for i in range(20)]
    observed = sorted(fast + mid + slow)
    for x in observed:
        latency.observe(x)
    (family,) = [
        f
        for f in text_string_to_metric_families(metrics.render()[0].decode())
        if f.name == "app_save_duration_seconds"
    ]
    buckets = [
        (float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")
    ]
    bounds = [upper for upper, _ in buckets]
    for q, expected_bucket in [(0.50, 0.05), (0.95, 0.5), (0.99, 2.5)]:
        true = observed[math.ceil(q * len(observed)) - 1]
        estimate = _bucket_quantile(buckets, q)
        assert _bucket_of(true, bounds) == _bucket_of(estimate, bounds) == expected_bucket


# --- timers -----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_timer_as_context_manager_records_the_duration(clock: FakeClock) -> None:
    """``with metrics.timer(...)`` observes the block's duration once."""
    m = Metrics(clock=clock)
    m.histogram("save_seconds", "Saves.", ["workspace_id"])
    with m.timer("save_seconds", workspace_id="w1") as timer:
        clock.advance(0.3)
    assert timer.duration == pytest.approx(0.3)
    assert value(m, "save_seconds_sum", workspace_id="w1") == pytest.approx(0.3)
    assert value(m, "save_seconds_count", workspace_id="w1") == 1


def _fail_after(clock: FakeClock, seconds: float, error: Exception) -> None:
    clock.advance(seconds)
    raise error


def test_timer_records_on_exception_with_error_type(clock: FakeClock) -> None:
    """A block that raises is still recorded, its ``error_type`` the exception's class name."""
    m = Metrics(clock=clock)
    m.histogram("save_seconds", "Saves.", ["error_type"])
    with pytest.raises(KeyError), m.timer("save_seconds"):
        _fail_after(clock, 0.1, KeyError("x"))
    with m.timer("save_seconds"):
        clock.advance(0.2)
    assert value(m, "save_seconds_sum", error_type="KeyError") == pytest.approx(0.1)
    assert value(m, "save_seconds_sum", error_type="") == pytest.approx(0.2)


def test_timer_without_error_label_records_on_exception(clock: FakeClock) -> None:
    """A histogram with no ``error_type`` label still records a failed block."""
    m = Metrics(clock=clock)
    m.histogram("save_seconds", "Saves.")
    with pytest.raises(ValueError, match="boom"), m.timer("save_seconds"):
        _fail_after(clock, 0.4, ValueError("boom"))
    assert value(m, "save_seconds_sum") == pytest.approx(0.4)


def test_timer_decorates_a_sync_function(clock: FakeClock) -> None:
    """Each call of a decorated function is one observation; its result is returned."""
    m = Metrics(clock=clock)
    m.histogram("work_seconds", "Work.", ["kind"])

    @m.timer("work_seconds", kind="sync")
    def work(x: int) -> int:
        clock.advance(0.25)
        return x * 2

    assert work(2) + work(3) == 10
    assert work.__name__ == "work"
    assert value(m, "work_seconds_count", kind="sync") == 2
    assert value(m, "work_seconds_sum", kind="sync") == pytest.approx(0.5)


@pytest.mark.anyio
async def test_timer_decorates_an_async_function(clock: FakeClock) -> None:
    """A decorated coroutine function is timed from call to completion, errors included."""
    m = Metrics(clock=clock)
    m.histogram("work_seconds", "Work.", ["error_type"])

    @m.timer("work_seconds")
    async def work(fail: bool) -> str:
        clock.advance(0.5)
        if fail:
            raise TimeoutError
        return "done"

    assert await work(False) == "done"
    with pytest.raises(TimeoutError):
        await work(True)
    assert value(m, "work_seconds_sum", error_type="") == pytest.approx(0.5)
    assert value(m, "work_seconds_sum", error_type="TimeoutError") == pytest.approx(0.5)


@pytest.mark.anyio
async def test_timer_as_async_context_manager(clock: FakeClock) -> None:
    """``async with metrics.timer(...)`` works like ``with``."""
    m = Metrics(clock=clock)
    m.histogram("work_seconds", "Work.")
    async with m.timer("work_seconds"):
        clock.advance(0.75)
    assert value(m, "work_seconds_sum") == pytest.approx(0.75)


def test_timer_of_a_histogram_object(clock: FakeClock) -> None:
    """``histogram.time(...)`` is the same timer without looking the name up."""
    m = Metrics("app", clock=clock)
    with m.histogram("save_seconds", "Saves.").time():
        clock.advance(1.0)
    assert value(m, "app_save_seconds_sum") == pytest.approx(1.0)


def test_timer_needs_a_registered_histogram(metrics: Metrics) -> None:
    """Timing into an unknown (or non-histogram) name is a configuration error."""
    metrics.counter("save_seconds", "Not a histogram.")
    with pytest.raises(ConfigurationError, match="no histogram"):
        metrics.timer("save_seconds")


def test_timer_missing_label_raises(metrics: Metrics) -> None:
    """Every label but ``error_type`` needs a value when the timer is made."""
    metrics.histogram("save_seconds", "Saves.", ["workspace_id", "error_type"])
    with pytest.raises(ConfigurationError, match="workspace_id"):
        metrics.timer("save_seconds")


# --- cardinality guard ------------------------------------------------------------------------


def test_guard_folds_values_beyond_the_cap(metrics: Metrics) -> None:
    """Past ``max_label_values`` distinct values, new values become ``_overflow``."""
    family = metrics.counter("hits_total", "Hits.", ["user"], max_label_values=3)
    for user in ["a", "b", "c", "d", "e", "a"]:
        family.labels(user).inc()
    assert value(metrics, "app_hits_total", user="a") == 2
    assert value(metrics, "app_hits_total", user="d") is None
    assert value(metrics, "app_hits_total", user=OVERFLOW_LABEL_VALUE) == 2


def test_guard_counts_overflow_by_metric_and_label(metrics: Metrics) -> None:
    """Each folded value increments ``hardening_metrics_label_overflow_total{metric,label}``."""
    family = metrics.counter("hits_total", "Hits.", ["user", "plan"], max_label_values=1)
    family.labels("a", "free").inc()
    family.labels("b", "free").inc()
    family.labels("c", "pro").inc()
    overflow = "hardening_metrics_label_overflow_total"
    assert value(metrics, overflow, metric="app_hits_total", label="user") == 2
    assert value(metrics, overflow, metric="app_hits_total", label="plan") == 1


def test_guard_caps_each_label_separately(metrics: Metrics) -> None:
    """The cap is per label: a full label does not fold another label's values."""
    family = metrics.counter("hits_total", "Hits.", ["user", "plan"], max_label_values=2)
    for user in ["a", "b", "c"]:
        family.labels(user, "free").inc()
    assert value(metrics, "app_hits_total", user=OVERFLOW_LABEL_VALUE, plan="free") == 1


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(min_value=1, max_value=6),
    stream=st.lists(
        st.tuples(st.text(max_size=3), st.sampled_from(["GET", "x", "y", "z", "_overflow"])),
        max_size=120,
    ),
)
def test_guard_never_exceeds_cap_plus_overflow(cap: int, stream: list[tuple[str, str]]) -> None:
    """For any label stream, each label shows at most ``cap`` values plus ``_overflow``."""
    m = Metrics(max_label_values=cap)
    family = m.counter("events_total", "Events.", ["a", "b"])
    for a, b in stream:
        family.labels(a, b).inc()
    samples = [
        s
        for f in text_string_to_metric_families(m.render()[0].decode())
        if f.name == "events"
        for s in f.samples
        if s.name == "events_total"
    ]
    for label in ("a", "b"):
        seen = {s.labels[label] for s in samples}
        assert len(seen - {OVERFLOW_LABEL_VALUE}) <= cap
    assert sum(s.value for s in samples) == len(stream)


def test_guard_memory_stays_bounded_under_exploding_labels() -> None:
    """Ten thousand distinct routes and methods keep caches and series at the cap."""
    m = Metrics(max_label_values=20)
    for i in range(10_000):
        m.http_request(f"M{i}", f"/raw/{i}", 200, 0.001)
    family = m._builtins[HTTP]
    assert len(m._http_children) == 0
    assert len(family._cache) <= 20
    assert all(len(seen) <= 20 for seen in family._seen)
    assert value(m, f"{HTTP}_count", **http_labels("_OTHER", "_overflow", "200")) == 9_980


@pytest.mark.parametrize("method", ["FOO", "get", "PROPFIND", ""])
def test_non_standard_http_method_becomes_other(metrics: Metrics, method: str) -> None:
    """Methods outside the nine standard ones (case-sensitive) are reported as ``_OTHER``."""
    metrics.http_request(method, "/x", 200, 0.01)
    assert value(metrics, f"{HTTP}_count", **http_labels(OTHER_HTTP_METHOD, "/x", "200")) == 1


def test_method_label_of_app_families_is_normalised(metrics: Metrics) -> None:
    """Any family's ``http_request_method`` label gets the same ``_OTHER`` rule."""
    family = metrics.counter("calls_total", "Calls.", ["http_request_method"])
    family.labels("BREW").inc()
    assert value(metrics, "app_calls_total", http_request_method=OTHER_HTTP_METHOD) == 1


def test_unmatched_routes_share_one_value(metrics: Metrics) -> None:
    """``None`` and ``""`` routes are reported as ``UNMATCHED_ROUTE``."""
    metrics.http_request("GET", None, 404, 0.001)
    metrics.http_request("GET", "", 404, 0.001)
    assert value(metrics, f"{HTTP}_count", **http_labels("GET", UNMATCHED_ROUTE, "404")) == 2


# --- built-in families ------------------------------------------------------------------------


def test_http_request_observes_the_otel_histogram(metrics: Metrics) -> None:
    """``http_request`` records into the OTel-named histogram, not namespaced."""
    metrics.http_request("GET", "/pages/{id}", 200, 0.02)
    labels = http_labels("GET", "/pages/{id}", "200")
    assert value(metrics, f"{HTTP}_sum", **labels) == pytest.approx(0.02)
    assert value(metrics, f"{HTTP}_bucket", le="0.025", **labels) == 1
    assert value(metrics, f"{HTTP}_bucket", le="0.01", **labels) == 0


def test_http_request_count_is_the_request_counter(metrics: Metrics) -> None:
    """The histogram's ``_count`` counts requests: one observation per request."""
    for _ in range(3):
        metrics.http_request("POST", "/pages", 201, 0.01)
    assert value(metrics, f"{HTTP}_count", **http_labels("POST", "/pages", "201")) == 3


def test_http_5xx_without_exception_reports_status_as_error_type(metrics: Metrics) -> None:
    """A 5xx with no exception gets ``error_type`` = the status code, as OTel specifies."""
    metrics.http_request("GET", "/x", 503, 0.01)
    assert value(metrics, f"{HTTP}_count", **http_labels("GET", "/x", "503", "503")) == 1


def test_http_exception_reports_its_error_type(metrics: Metrics) -> None:
    """A given ``error_type`` is used as is."""
    metrics.http_request("GET", "/x", 500, 0.01, "ConnectionError")
    labels = http_labels("GET", "/x", "500", "ConnectionError")
    assert value(metrics, f"{HTTP}_count", **labels) == 1


def test_track_http_request_counts_active_then_records(clock: FakeClock) -> None:
    """The tracker counts the request as active until ``finish``, which records it."""
    m = Metrics(clock=clock)
    request = m.track_http_request("GET")
    assert value(m, "http_server_active_requests", http_request_method="GET") == 1
    clock.advance(0.05)
    assert request.finish(200, "/items/{id}") == pytest.approx(0.05)
    assert value(m, "http_server_active_requests", http_request_method="GET") == 0
    assert value(m, f"{HTTP}_sum", **http_labels("GET", "/items/{id}", "200")) == pytest.approx(
        0.05
    )


def test_finishing_a_request_twice_records_once(metrics: Metrics) -> None:
    """A second ``finish`` (e.g. in a ``finally``) neither records nor decrements again."""
    request = metrics.track_http_request("GET")
    first = request.finish(200, "/x")
    assert request.finish(500, "/x") == first
    assert value(metrics, f"{HTTP}_count", **http_labels("GET", "/x", "200")) == 1
    assert value(metrics, "http_server_active_requests", http_request_method="GET") == 0


def test_active_requests_gauge_follows_started_and_finished(metrics: Metrics) -> None:
    """``http_request_started``/``_finished`` move ``http_server_active_requests``."""
    metrics.http_request_started("GET")
    metrics.http_request_started("GET")
    metrics.http_request_started("WEIRD")
    metrics.http_request_finished("GET")
    assert value(metrics, "http_server_active_requests", http_request_method="GET") == 1
    assert value(metrics, "http_server_active_requests", http_request_method="_OTHER") == 1


def test_rate_limit_decisions_are_counted(metrics: Metrics) -> None:
    """``rate_limit_decision`` counts by limiter and outcome."""
    for outcome in ["allowed", "allowed", "denied", "blocked", "error"]:
        metrics.rate_limit_decision("api", outcome)
    name = "hardening_rate_limit_decisions_total"
    assert value(metrics, name, limiter="api", outcome="allowed") == 2
    assert value(metrics, name, limiter="api", outcome="error") == 1


def test_unknown_rate_limit_outcome_raises(metrics: Metrics) -> None:
    """The outcome is one of a closed set."""
    with pytest.raises(ConfigurationError, match="outcome"):
        metrics.rate_limit_decision("api", "exceeded")


def test_lock_conflicts_are_counted(metrics: Metrics) -> None:
    """``lock_conflict`` counts by entity."""
    metrics.lock_conflict("Page")
    metrics.lock_conflict("Page")
    assert value(metrics, "hardening_lock_conflicts_total", entity="Page") == 2


def test_patch_applied_observes_three_histograms(metrics: Metrics) -> None:
    """Ops, size and document blocks each get one observation."""
    metrics.patch_applied(ops=3, size_bytes=700, blocks=1000)
    metrics.patch_applied(ops=1, size_bytes=100)
    assert value(metrics, "hardening_patch_operations_count") == 2
    assert value(metrics, "hardening_patch_size_bytes_sum") == 800
    assert value(metrics, "hardening_document_blocks_bucket", le="1000.0") == 1
    assert value(metrics, "hardening_document_blocks_count") == 1


def test_queue_families_report_depth_age_and_jobs(metrics: Metrics) -> None:
    """Queue depth and age are gauges; finished and dead-lettered jobs are counted."""
    metrics.queue_depth("indexing", "ready", 5)
    metrics.queue_depth("indexing", "ready", 2)
    metrics.queue_oldest_age("indexing", 30.0)
    metrics.job_finished("indexing", "succeeded", 1.5)
    metrics.job_finished("indexing", "failed", 0.5)
    metrics.job_dead_lettered("indexing")
    assert value(metrics, "hardening_queue_depth", queue="indexing", state="ready") == 2
    assert value(metrics, "hardening_queue_oldest_job_age_seconds", queue="indexing") == 30
    assert value(metrics, "hardening_jobs_total", queue="indexing", outcome="failed") == 1
    assert value(
        metrics, "hardening_job_duration_seconds_sum", queue="indexing", outcome="succeeded"
    ) == pytest.approx(1.5)
    assert value(metrics, "hardening_jobs_dead_lettered_total", queue="indexing") == 1


def test_builtin_name_taken_with_another_shape_raises() -> None:
    """An app family squatting a built-in name with another shape fails on first report."""
    m = Metrics()
    m.counter("hardening_lock_conflicts_total", "Mine.", ["table"])
    with pytest.raises(ConfigurationError, match="already registered"):
        m.lock_conflict("Page")


# --- rendering --------------------------------------------------------------------------------


def test_render_defaults_to_prometheus_text(populated: Metrics) -> None:
    """Without an OpenMetrics ``Accept``, the body is the Prometheus text format."""
    body, content_type = populated.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in body


def test_render_negotiates_openmetrics(populated: Metrics) -> None:
    """An OpenMetrics ``Accept`` gets OpenMetrics, with its content type."""
    body, content_type = populated.render(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


def test_text_exposition_parses_back_with_help_and_type(populated: Metrics) -> None:
    """Every family in the text format parses back and has HELP and TYPE lines."""
    text = populated.render()[0].decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 14
    for family in families:
        assert f"# HELP {family.name}" in text
        assert f"# TYPE {family.name}" in text
        assert family.documentation
        assert family.type != "unknown"


def test_openmetrics_exposition_parses_back(populated: Metrics) -> None:
    """The OpenMetrics output parses with the strict OpenMetrics parser, HELP on each family."""
    families = list(openmetrics_families(populated.render(OPENMETRICS)[0].decode()))
    names = {f.name for f in families}
    assert {HTTP, "hardening_queue_depth", "app_save_errors", "app_tiny"} <= names
    assert all(f.documentation and f.type != "unknown" for f in families)


def test_openmetrics_carries_exemplars(populated: Metrics) -> None:
    """An exemplar given to ``http_request`` shows up in OpenMetrics."""
    (family,) = [
        f for f in openmetrics_families(populated.render(OPENMETRICS)[0].decode()) if f.name == HTTP
    ]
    exemplars = [s.exemplar for s in family.samples if s.exemplar is not None]
    assert [e.labels for e in exemplars] == [{"trace_id": "abc123"}]


def test_render_response_gzips_when_accepted(populated: Metrics) -> None:
    """``Accept-Encoding: gzip`` compresses, with ``Content-Encoding`` and the right length."""
    body, headers = populated.render_response(None, "br, gzip;q=0.8")
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Length"] == str(len(body))
    assert gzip.decompress(body) == populated.render()[0]


@pytest.mark.parametrize("encoding", [None, "", "identity", "gzip;q=0", "br"])
def test_render_response_plain_otherwise(populated: Metrics, encoding: str | None) -> None:
    """No gzip unless accepted with a non-zero quality; Content-Type is always set."""
    body, headers = populated.render_response("text/plain", encoding)
    assert "Content-Encoding" not in headers
    assert headers["Content-Type"].startswith("text/plain")
    assert body == populated.render()[0]


def test_render_from_threads_while_recording() -> None:
    """Rendering in worker threads while others record loses nothing and never fails."""
    m = Metrics()
    stop = threading.Event()

    def record(n: int) -> None:
        for i in range(2000):
            m.http_request("GET", f"/r{i % 7}", 200, 0.001 * n)

    def render() -> int:
        renders = 0
        while not stop.is_set() or renders == 0:
            m.render_response(OPENMETRICS, "gzip")
            renders += 1
        return renders

    with ThreadPoolExecutor(6) as pool:
        renders = [pool.submit(render) for _ in range(2)]
        list(pool.map(record, range(4)))
        stop.set()
        assert all(r.result(timeout=30) > 0 for r in renders)
    total = sum(
        value(m, f"{HTTP}_count", **http_labels("GET", f"/r{i}", "200")) or 0 for i in range(7)
    )
    assert total == 8000


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_no_problem(populated: Metrics) -> None:
    """``promtool check metrics`` reports nothing on our text output."""
    body = populated.render("text/plain")[0]
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


# --- multiprocess -----------------------------------------------------------------------------


def test_multiprocess_without_the_directory_variable_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``multiprocess=True`` needs ``PROMETHEUS_MULTIPROC_DIR``."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(multiprocess=True)


def test_multiprocess_directory_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A variable pointing nowhere is reported."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="not a directory"):
        Metrics()


def test_multiprocess_variable_set_after_import_is_detected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Auto-detection refuses a variable set after prometheus_client chose in-memory values."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="before it starts"):
        Metrics()


def test_multiprocess_false_ignores_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``multiprocess=False`` renders this process only, whatever the environment says."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert not Metrics(multiprocess=False).multiprocess


def test_wipe_multiprocess_dir_removes_only_metric_files(tmp_path: Path) -> None:
    """Start-up wipe deletes ``*.db`` files, keeps others, and creates a missing directory."""
    (tmp_path / "counter_1.db").write_bytes(b"")
    (tmp_path / "gauge_livesum_2.db").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("keep")
    assert wipe_multiprocess_dir(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert wipe_multiprocess_dir(tmp_path / "new") == 0
    assert (tmp_path / "new").is_dir()


def test_wipe_without_a_directory_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no path and no variable there is nothing to wipe."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR"):
        wipe_multiprocess_dir()


def test_mark_process_dead_drops_only_live_gauges(tmp_path: Path) -> None:
    """A dead worker's ``live*`` gauge files go; its counters stay (they never go backwards)."""
    for name in ["gauge_livesum_7.db", "gauge_livemostrecent_7.db", "counter_7.db"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "gauge_livesum_8.db").write_bytes(b"")
    mark_process_dead(7, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_7.db", "gauge_livesum_8.db"]


def test_gunicorn_child_exit_does_nothing_without_multiprocess(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hook is harmless when multiprocess metrics are off."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    class Worker:
        pid = 12345

    gunicorn_child_exit(object(), Worker())


GUNICORN_CONF = """
from hardening.metrics import gunicorn_child_exit, wipe_multiprocess_dir

child_exit = gunicorn_child_exit


def on_starting(server):
    wipe_multiprocess_dir()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Two real gunicorn workers serving tests/metrics_gunicorn_app.py in multiprocess mode."""
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("gunicorn needs a POSIX system")
    pytest.importorskip("gunicorn")
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_424242.db").write_bytes(b"stale")  # on_starting must wipe it
    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text(GUNICORN_CONF)
    port = _free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    log = (tmp_path / "gunicorn.log").open("wb")
    command = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
    command += ["-c", str(conf), "--pythonpath", str(TESTS), *gunicorn_options()]
    command += ["metrics_gunicorn_app:app"]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _get(f"{url}/metrics") is not None, "gunicorn to serve")
        yield url, directory
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            server.kill()
            server.wait(timeout=15)
        log.close()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = _get(f"{url}/metrics").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


@pytest.mark.slow
def test_multiprocess_counts_sum_over_two_gunicorn_workers(gunicorn: tuple[str, Path]) -> None:
    """Hits served by two gunicorn workers sum correctly on a scrape, and survive a dead one."""
    url, directory = gunicorn
    assert not (directory / "counter_424242.db").exists()
    pids: set[str] = set()
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):  # bounded: almost always one batch is enough
            pids.update(body.decode() for body in pool.map(_get, [f"{url}/hit"] * 40))
            sent += 40
            if len(pids) == 2:
                break
    assert len(pids) == 2, "both workers should have served requests"
    samples = _scrape(url)
    assert samples[("test_app_hits_total", ())] == sent
    route = tuple(sorted(http_labels("GET", "/hit", "200").items()))
    assert samples[(f"{HTTP}_count", route)] == sent
    assert samples[("http_server_active_requests", (("http_request_method", "GET"),))] == 0

    victim = next(iter(pids))
    os.kill(int(victim), signal.SIGKILL)  # gunicorn's master runs child_exit, then respawns
    _wait_for(lambda: not (directory / f"gauge_livesum_{victim}.db").exists(), "child_exit")
    assert _scrape(url)[("test_app_hits_total", ())] == sent
