"""The shipped Grafana dashboards and provisioning files: structure a file-provisioned Grafana needs to load them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import yaml

from monitor.metrics import MonitorCollector, WindowCollector
from tests.conftest import REPO
from tests.test_alert_rules import sample_names

GRAFANA = REPO / "dashboards" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Metrics whose series carry the `project` (from metrics.labels) and `model` labels: the overview filters them all.
PROJECT_METRICS = {"claude_cost_usd_total", "claude_tokens_total", "claude_requests_total", "claude_spend_window_usd"}
MODEL_METRICS = PROJECT_METRICS | {
    "claude_request_errors_total",
    "claude_request_duration_seconds_bucket",
    "claude_request_duration_seconds_sum",
    "claude_request_duration_seconds_count",
}


# Series each replica renders from the database, the same whichever replica is scraped; the rest of what the daemon
# exports describes the process itself (ingest lag, state age, scheduled tasks, leases held in memory …).
PER_PROCESS = {"claude_monitor_ingest_lag_seconds", "claude_monitor_state_age_seconds"}
# A database-backed selector, alone or in rate()/increase(), directly under `max without (instance) (`.
MERGED = re.compile(r"max without \(instance\) \((?:(?:rate|increase)\()?$")


def database_backed() -> set[str]:
    """Sample names of the collectors that read the database (MonitorCollector, WindowCollector)."""
    now = datetime.now(UTC)
    counters = MonitorCollector(cast(Any, None), cast(Any, None), [], dict, lambda: now)
    windows = WindowCollector(cast(Any, None), ZoneInfo("UTC"), [], str, lambda: now)
    names = {
        name
        for family in [*counters.describe(), *windows.describe()]
        for name in sample_names(family.name, family.type)
    }
    return names - PER_PROCESS


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return board


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones nested in (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def selectors(expr: str) -> Iterator[tuple[str, str]]:
    """(metric name, matcher text) of each `name{...}` selector."""
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        yield match.group(1), match.group(2)


def test_the_three_dashboards_are_shipped() -> None:
    assert {p.name for p in DASHBOARDS} >= {"claude-overview.json", "claude-budgets.json", "claude-daemon.json"}


def test_uids_and_titles_are_unique_across_dashboards() -> None:
    boards = [load(p) for p in DASHBOARDS]
    uids = [b["uid"] for b in boards]
    titles = [b["title"] for b in boards]
    assert all(isinstance(u, str) and 0 < len(u) <= 40 for u in uids), uids  # Grafana's uid length limit
    assert len(set(uids)) == len(uids), uids
    assert len(set(titles)) == len(titles), titles


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = load(path)
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] <= 42  # the classic schema
    assert board["refresh"] == "30s"
    assert board.get("id") is None  # provisioning assigns ids; a fixed one would clash across Grafana instances
    assert "__inputs" not in board and "${DS_" not in path.read_text()  # export-for-sharing placeholders don't resolve

    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids), f"duplicate panel ids in {path.name}: {sorted(ids)}"

    declared = variables(board)
    assert declared["datasource"]["type"] == "datasource"
    assert declared["datasource"]["query"] == "prometheus"
    for var in declared.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            assert text.startswith("label_values("), (var["name"], text)

    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            assert panel.get("datasource", DATASOURCE) == DATASOURCE
            continue
        where = f"{path.name} panel {panel['id']} ({panel['title']})"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), where
            used.update(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"]))
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
    for var in declared.values():
        if var["type"] == "query":
            used.update(re.findall(r"\$\{?([A-Za-z_]\w*)", var["query"]["query"]))
    undeclared = {name for name in used if not name.startswith("__")} - set(declared)
    assert not undeclared, f"{path.name} uses undeclared variables {undeclared}"


def test_every_panel_merges_database_backed_series_across_replicas() -> None:
    # Every replica exports the same database-backed series: each is read through `max without (instance)`, never
    # pinned to one replica (which may be dead, or one that missed a jump in a counter), so a panel shows the same
    # whichever replica Prometheus scraped. Per-process series (lag, state age, tasks) stay per replica.
    names = database_backed()
    assert {"claude_cost_usd_total", "claude_budget_spend_usd", "claude_spend_window_usd"} <= names
    pattern = re.compile(
        r"(?<![\w:])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?![\w:])"
    )
    checked = 0
    for path in DASHBOARDS:
        board = load(path)
        for panel in all_panels(board["panels"]):
            for target in panel.get("targets", []):
                expr = target["expr"]
                where = (path.name, panel["title"], expr)
                for found in pattern.finditer(expr):
                    assert MERGED.search(expr[: found.start()]), where
                    matchers = re.match(r"\{[^}]*\}", expr[found.end() :])
                    assert matchers is None or "instance" not in matchers.group(0), where
                    checked += 1
        for var in variables(board).values():
            if var["type"] == "query":
                for found in pattern.finditer(var["query"]["query"]):
                    assert "instance" not in var["query"]["query"][found.end() :].partition(",")[0], (path.name, var)
    assert checked >= 50


def test_no_dashboard_pins_a_single_replica() -> None:
    # Per-process panels may be narrowed to replicas, by a multi-value variable defaulting to all of them.
    for path in DASHBOARDS:
        board = load(path)
        text = json.dumps([t["expr"] for p in all_panels(board["panels"]) for t in p.get("targets", [])])
        assert not re.search(r'instance\s*=\s*\\"', text), path.name
        declared = variables(board)
        if "instance" in declared:
            var = declared["instance"]
            assert var["multi"] and var["includeAll"] and var["current"]["value"] == ["$__all"], path.name
        else:
            assert "$instance" not in text and "${instance}" not in text, path.name


def test_multi_value_variables_are_used_with_regex_matchers() -> None:
    # A multi-value or All variable expands to a regex (a|b, .*): with = it would match nothing.
    for path in DASHBOARDS:
        board = load(path)
        multi = [name for name, v in variables(board).items() if v.get("multi") or v.get("includeAll")]
        for panel in all_panels(board["panels"]):
            for target in panel.get("targets", []):
                for name in multi:
                    for op in re.findall(r'(!?=~?)\s*"\$\{?' + name + r"\b", target["expr"]):
                        assert op in ("=~", "!~"), (path.name, panel["title"], target["expr"])


def test_overview_filters_every_usage_expression_by_project_and_model() -> None:
    board = load(GRAFANA / "claude-overview.json")
    declared = variables(board)
    for name in ("project", "model"):
        var = declared[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == ".*"
        assert "label_values(" in var["query"]["query"] and f", {name})" in var["query"]["query"]
    checked = 0
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Errors carry no project label: a ratio against them keeps both sides unfiltered by project.
            project_less_ratio = "claude_request_errors_total" in expr
            for metric, matchers in selectors(expr):
                if metric in MODEL_METRICS:
                    assert 'model=~"$model"' in matchers, (panel["title"], expr)
                    checked += 1
                if metric in PROJECT_METRICS and not project_less_ratio:
                    assert 'project=~"$project"' in matchers, (panel["title"], expr)
    assert checked >= 15


def test_overview_covers_what_ops_asked_for() -> None:
    board = load(GRAFANA / "claude-overview.json")
    panels = {p["title"]: p for p in all_panels(board["panels"])}
    exprs = " ".join(t["expr"] for p in panels.values() for t in p.get("targets", []))
    # Today and this month by event time in the daemon's timezone (not the viewer's), the same from any replica.
    for title, window in (
        ("Spend today", "day"),
        ("Spend this month", "month"),
        ("Spend today by project", "day"),
        ("Spend this month by project", "month"),
    ):
        (target,) = panels[title]["targets"]
        assert f'claude_spend_window_usd{{window="{window}",' in target["expr"], title
        assert "max without (instance)" in target["expr"] and "$instance" not in target["expr"], title
        assert "timeFrom" not in panels[title], title
    assert "sum by (project)" in panels["Spend today by project"]["targets"][0]["expr"]
    for needed in ("claude_budget_forecast_usd", "claude_budget_limit_usd", 'type="cache_read"', "cache_write_1h"):
        assert needed in exprs
    assert any("sum by (model)" in t["expr"] for t in panels["Spend by model ($/h)"]["targets"])
    assert any("sum by (project)" in t["expr"] for t in panels["Spend by project ($/h)"]["targets"])


def test_provisioning_points_grafana_at_the_dashboards_and_a_fixed_prometheus_uid() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "claude-monitor.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")
    # Each dashboard's datasource variable defaults to the provisioned data source.
    for path in DASHBOARDS:
        assert variables(load(path))["datasource"]["current"].get("value") in (None, source["uid"]), path.name
