"""The example monitoring setup (``examples/monitoring/``) is valid and names real metrics.

* ``promtool`` (when on PATH) checks the Prometheus config and the rule files, and runs the
  rules' unit tests (``alerts_test.yml``): the alerts fire over their thresholds and not under.
* Every metric an alert, a recording rule or a dashboard panel reads is exported by the library:
  a real :class:`hardening.Metrics` reports into each built-in family once, its exposition is
  parsed, and the sample names must include each name the expressions use. A renamed family or
  a misspelt ``_bucket``/``_total`` fails here instead of leaving a silent dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hardening import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
RULE_FILES = ("recording.yml", "alerts.yml")
DASHBOARD = MONITORING / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Series Prometheus makes itself, not the library.
PROMETHEUS_SERIES = frozenset({"up"})

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH: install Prometheus (e.g. apt-get install prometheus) "
    "to check the config and run the rules' unit tests",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60, check=False
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


# --- metric names in PromQL ------------------------------------------------------------------

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# A name not glued to a number, a variable or a dot, and not a function call.
_NAME = re.compile(r"(?<![\w.:$])[a-zA-Z_:][\w:]*(?![\w:]|\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions, keywords out)."""
    expr = _STRING.sub('""', expr)  # first: strings may hold braces ("/pages/{page_id}")
    expr = _MATCHERS.sub("", expr)
    expr = _RANGE.sub("", expr)
    expr = _LABEL_LIST.sub("", expr)
    return {name for name in _NAME.findall(expr) if name.lower() not in _KEYWORDS}


def test_metric_names_parser() -> None:
    """The extraction the checks below rely on (so they cannot pass by finding nothing)."""
    expr = """
        histogram_quantile(0.95, sum by (le, job) (rate(
          http_server_request_duration_seconds_bucket{http_route="/pages/{page_id}", le!="1e3"}[5m]
        ))) > 2e-1
        and on (job) group_left (instance) max without (pid) (up offset 5m) > bool 0
        or sum(rate(hardening_jobs_total{queue=~"$queue"}[$__rate_interval])) * 1
        unless job:http_server_request_errors:ratio_rate5m{job='x'} > Inf
    """
    assert metric_names(expr) == {
        "http_server_request_duration_seconds_bucket",
        "up",
        "hardening_jobs_total",
        "job:http_server_request_errors:ratio_rate5m",
    }


@cache
def library_sample_names() -> frozenset[str]:
    """Every sample name a registry exposes once each built-in family has been reported into."""
    metrics = Metrics(multiprocess=False)
    metrics.http_request("PATCH", "/pages/{page_id}", 200, 0.05)
    metrics.http_request_started("PATCH")
    metrics.rate_limit_decision("api", "denied")
    metrics.lock_conflict("Page")
    metrics.patch_applied(ops=3, size_bytes=420, blocks=57)
    metrics.queue_depth("index", "waiting", 3)
    metrics.queue_oldest_age("index", 1.5)
    metrics.job_finished("index", "completed", 0.2)
    metrics.job_dead_lettered("index")
    probe = metrics.counter("probe_total", "Overflows on purpose.", ["value"], max_label_values=1)
    probe.labels("a").inc()
    probe.labels("b").inc()  # folded into _overflow: hardening_metrics_label_overflow_total
    body, _ = metrics.render()
    return frozenset(
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    )


def test_library_exports_the_families_the_examples_use() -> None:
    """The probe registry exports what the examples are written against (guards the probe)."""
    names = library_sample_names()
    for family in (
        "http_server_request_duration_seconds",
        "hardening_job_duration_seconds",
        "hardening_patch_size_bytes",
    ):
        assert {f"{family}_bucket", f"{family}_count", f"{family}_sum"} <= names
    assert {
        "http_server_active_requests",
        "hardening_rate_limit_decisions_total",
        "hardening_lock_conflicts_total",
        "hardening_queue_depth",
        "hardening_queue_oldest_job_age_seconds",
        "hardening_jobs_total",
        "hardening_jobs_dead_lettered_total",
        "hardening_metrics_label_overflow_total",
    } <= names


# --- the rule files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip(
        "yaml",
        reason="PyYAML is not installed (not a hardening dependency); "
        "promtool still checks the rule files when it is on PATH",
    )
    found: list[dict[str, Any]] = []
    for name in RULE_FILES:
        document = yaml.safe_load((MONITORING / name).read_text(encoding="utf-8"))
        for group in document["groups"]:
            found.extend(group["rules"])
    return found


def test_rules_are_complete(rules: list[dict[str, Any]]) -> None:
    """Every rule has an expression; every alert a severity, a summary and a description."""
    alerts = [rule for rule in rules if "alert" in rule]
    records = [rule for rule in rules if "record" in rule]
    assert len(alerts) >= 7
    assert len(records) >= 3
    assert len({rule["alert"] for rule in alerts}) == len(alerts), "duplicate alert names"
    for rule in rules:
        assert str(rule.get("expr", "")).strip(), rule
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    for rule in records:
        assert rule["record"].count(":") == 2, f"not level:metric:operations: {rule['record']}"


def test_rule_metrics_exist_in_the_library(rules: list[dict[str, Any]]) -> None:
    """Each metric the rules read is exported by the library or recorded by a rule."""
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    assert used, "no metric names found in the rules"
    unknown = used - library_sample_names() - recorded - PROMETHEUS_SERIES
    assert not unknown, f"metrics used by the rules but not exported: {sorted(unknown)}"


def test_alerts_cover_the_reference_thresholds(rules: list[dict[str, Any]]) -> None:
    """The reference services' alerts are all there (their behaviour is in alerts_test.yml)."""
    names = {rule["alert"] for rule in rules if "alert" in rule}
    assert {
        "QueueBacklogHigh",
        "PagesSaveLatencyHigh",
        "PagesHighErrorRate",
        "QueueJobsDeadLettered",
        "QueueDeadLettersPresent",
        "RateLimitRejectionsSpike",
        "QueueOldestJobTooOld",
        "MetricsLabelOverflow",
    } <= names


@needs_promtool
def test_promtool_check_rules() -> None:
    assert_ok(promtool("check", "rules", *RULE_FILES))


@needs_promtool
def test_promtool_check_config() -> None:
    """The scrape config is valid and the rule files it names exist and parse."""
    assert_ok(promtool("check", "config", "prometheus.yml"))


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    """alerts_test.yml: the alerts fire over their thresholds, not under them."""
    assert_ok(promtool("test", "rules", "alerts_test.yml"))


# --- the Grafana dashboard -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def data_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The panels that query (rows only group them), including panels inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in data_panels(dashboard) for target in panel["targets"]]


def test_dashboard_is_an_importable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"]
    assert dashboard["uid"]
    assert [(i["name"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "prometheus")
    ]
    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [panel["id"] for row in dashboard["panels"] for panel in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]


def test_every_dashboard_panel_queries_prometheus(dashboard: dict[str, Any]) -> None:
    panels = list(data_panels(dashboard))
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])


def test_dashboard_metrics_exist_in_the_library(dashboard: dict[str, Any]) -> None:
    """Each metric a panel or a template variable reads is exported by the library."""
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs(dashboard)))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(<selector>, <label>): only the selector names a metric
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert selector, variable["name"]
            used |= metric_names(selector[1])
    unknown = used - library_sample_names()
    assert not unknown, f"metrics used by the dashboard but not exported: {sorted(unknown)}"


def test_dashboard_shows_every_built_in_family(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs(dashboard)))
    families = {
        re.sub(r"_(bucket|count|sum)$", "", name) for name in used if not name.endswith("_created")
    }
    assert {
        "http_server_request_duration_seconds",
        "http_server_active_requests",
        "hardening_rate_limit_decisions_total",
        "hardening_lock_conflicts_total",
        "hardening_patch_operations",
        "hardening_patch_size_bytes",
        "hardening_document_blocks",
        "hardening_queue_depth",
        "hardening_queue_oldest_job_age_seconds",
        "hardening_job_duration_seconds",
        "hardening_jobs_total",
        "hardening_jobs_dead_lettered_total",
        "hardening_metrics_label_overflow_total",
    } <= families


@needs_promtool
def test_dashboard_exprs_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each panel query parses, once Grafana's variables are replaced by what Grafana sends."""
    rules = []
    for number, expr in enumerate(dashboard_exprs(dashboard)):
        promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        promql = promql.replace("$queue", ".*")
        assert "$" not in promql, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_{number}:expr", "expr": promql})
    rules_file = tmp_path / "dashboard-rules.yml"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(rules_file)))
