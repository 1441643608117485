"""The shipped Prometheus alert rules: promtool accepts and passes them, and they hold together with the daemon.

Checks that every alert is documented (severity, summary, description, runbook_url, `for:`), that its runbook
section exists, that every metric it reads is one the daemon exports, and that the unit tests (alerts_test.yaml,
alerts_test_week.yaml) cover it both firing and not firing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.budgets.admission import AdmissionStats
from monitor.metrics import (
    AdmissionCollector,
    MonitorCollector,
    PriceCheckCollector,
    ReconcileCollector,
    SourcesCollector,
    WindowCollector,
)
from monitor.service import Jobs

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "dashboards" / "prometheus"
RULES = PROM_DIR / "alerts.yaml"
# The unit tests: the week-long cases in a file of their own, evaluated every 5 minutes instead of every minute.
RULE_TESTS = (PROM_DIR / "alerts_test.yaml", PROM_DIR / "alerts_test_week.yaml")
RUNBOOK = REPO / "dashboards" / "RUNBOOK.md"

# Metrics that are not the daemon's but that the rules may read: Prometheus's own per-target `up`.
PROMETHEUS_METRICS = {"up"}
# PromQL words that look like metric names: operators, aggregations, modifiers.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "atan2", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "inf", "nan",
}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool from the rules' directory, so `rule_files` in the test file resolve."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (scripts/test installs it: Debian package prometheus)")
    return subprocess.run(["promtool", *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=300)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yaml."""
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def alert_names() -> list[str]:
    return sorted({rule["alert"] for rule in alert_rules()})


def rule_tests() -> list[dict[str, Any]]:
    """Every alert_rule_test case of the unit test files."""
    return [case for test in _unit_tests() for case in test.get("alert_rule_test") or []]


def _unit_tests() -> list[dict[str, Any]]:
    """Every test group of the unit test files."""
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexer's view: enough for the expressions shipped here)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call is None and name.lower() not in PROMQL_WORDS:
            names.add(name)
    return names


def exported_metrics() -> set[str]:
    """Every sample name the daemon's /metrics can carry: its collector's families and the scheduled-task metrics."""
    collector = MonitorCollector(
        engine=cast(Any, None),  # describe() reads neither the database nor the budgets
        budgets=cast(Any, None),
        metric_labels=["project", "environment"],
        lag=dict,
        clock=lambda: datetime.now(UTC),
    )
    reconcile = ReconcileCollector(cast(Any, None), str, 21600.0)  # describe() reads nothing either
    windows = WindowCollector(
        engine=cast(Any, None),
        zone=ZoneInfo("UTC"),
        metric_labels=["project"],
        model_label=str,
        clock=lambda: datetime.now(UTC),
    )
    names = set()
    families = [
        *collector.describe(),
        *reconcile.describe(),
        *windows.describe(),
        *SourcesCollector([]).collect(),
        *PriceCheckCollector(lambda: 0).collect(),
    ]
    for family in families:
        names |= set(sample_names(family.name, family.type))
    registry = CollectorRegistry()
    jobs = Jobs(registry)
    jobs.run("evaluate", lambda: None)  # so each labelled family has samples to name
    jobs.every("evaluate", 15)
    names |= {sample.name for family in registry.collect() for sample in family.samples}
    # Admission's families, from its collector over state with one decision of each kind (no store needed).
    outcomes = {("a-limit", outcome): 1 for outcome in AdmissionCollector.OUTCOMES}
    state = SimpleNamespace(
        stats=lambda: AdmissionStats(outcomes, {"a-limit": 1}, {}, 1), limits=[], reserving_budgets=[]
    )
    names |= {sample.name for family in AdmissionCollector(cast(Any, state)).collect() for sample in family.samples}
    names.add("claude_budget_reserved_usd")  # a series per reserving budget: none in this empty state
    return names


def sample_names(name: str, kind: str) -> Iterator[str]:
    """The sample names of a family the way the text exposition writes them."""
    if kind == "counter":
        yield f"{name}_total"
    elif kind == "histogram":
        yield from (f"{name}_bucket", f"{name}_count", f"{name}_sum")
    else:
        yield name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    """Anchors of RUNBOOK.md's headings (lines in fenced code blocks are not headings)."""
    anchors = set()
    fenced = False
    for line in RUNBOOK.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.+?)\s*#*$", line)):
            anchors.add(github_anchor(match.group(1)))
    return anchors


# --- promtool ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_promtool_unit_tests() -> None:
    done = promtool("test", "rules", *(path.name for path in RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


# --- what every alert carries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: f"{rule['alert']}-{rule['labels']['severity']}")
def test_alert_is_documented(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in {"warning", "critical"}
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{rule['alert']}: no {key}"
    assert annotations["runbook_url"] == f"dashboards/RUNBOOK.md#{rule['alert'].lower()}"
    assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "")), f"{rule['alert']}: no `for:` to stop flapping"


def test_every_runbook_url_has_its_section() -> None:
    anchors = runbook_anchors()
    missing = {
        rule["alert"]: rule["annotations"]["runbook_url"]
        for rule in alert_rules()
        if rule["annotations"]["runbook_url"].partition("#")[2] not in anchors
    }
    assert not missing, f"RUNBOOK.md has no heading for {missing}"


def test_metric_names_match_the_parser() -> None:
    expr = (
        'sum without (model) (increase(claude_cost_usd_total{project="a b"}[1h] offset 1d)) > 3 * '
        "(a_metric and on (instance, job) b:recorded) unless time() - max by (task) (c_metric) > bool 1e3"
    )
    assert metric_names(expr) == {"claude_cost_usd_total", "a_metric", "b:recorded", "c_metric"}


def test_rules_read_only_metrics_the_daemon_exports() -> None:
    exported = exported_metrics() | PROMETHEUS_METRICS
    assert {"claude_cost_usd_total", "claude_monitor_job_duration_seconds_count"} <= exported
    unknown = {}
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        # Annotations query the daemon's gauges too: {{ with printf "claude_budget_spend_usd{…}" … | query }}.
        for text in rule["annotations"].values():
            used |= set(re.findall(r'printf\s+"([a-zA-Z_:][\w:]*)\{', text))
        if used - exported:
            unknown[rule["alert"]] = sorted(used - exported)
    assert not unknown, f"metrics the daemon does not export: {unknown}"


def test_rule_tests_feed_only_metrics_the_daemon_exports() -> None:
    exported = exported_metrics() | PROMETHEUS_METRICS
    fed = {series["series"].partition("{")[0].strip() for test in _unit_tests() for series in test["input_series"]}
    assert fed <= exported, f"the unit tests feed series the daemon never exports: {sorted(fed - exported)}"


# --- coverage by the unit tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", alert_names())
def test_alert_has_firing_and_quiet_cases(name: str) -> None:
    cases = [case for case in rule_tests() if case["alertname"] == name]
    firing = [case for case in cases if case.get("exp_alerts")]
    quiet = [case for case in cases if not case.get("exp_alerts")]
    assert firing, f"alerts_test.yaml never expects {name} to fire"
    assert quiet, f"alerts_test.yaml never expects {name} to stay quiet"
    severities = {rule["labels"]["severity"] for rule in alert_rules() if rule["alert"] == name}
    expected = {alert["exp_labels"].get("severity") for case in firing for alert in case["exp_alerts"]}
    assert severities <= expected, f"{name}: no firing case for severity {sorted(severities - expected)}"


def test_rule_tests_name_existing_alerts() -> None:
    stray = {case["alertname"] for case in rule_tests()} - set(alert_names())
    assert not stray, f"alerts_test.yaml tests alerts that alerts.yaml does not have: {sorted(stray)}"
