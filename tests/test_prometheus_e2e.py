"""The shipped dashboards and alert rules against a real Prometheus scraping a real `serve` fed simulated traffic:
every expression parses, every dashboard query returns data, and every metric and label it names is exported."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor import simulate
from tests.conftest import REPO, run_cli, write_config
from tests.fake_analytics import FakeAnalytics, Row
from tests.fake_models import FakeModels
from tests.serve_harness import TOKEN, Serve, request, wait_until

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (scripts/test installs it)"),
    pytest.mark.slow,
]

GRAFANA = REPO / "dashboards" / "grafana"
ALERTS = REPO / "dashboards" / "prometheus" / "alerts.yaml"
SCRAPES = 6  # samples per series before querying: enough for rate() over a 1m window

# Small limits so that, with a few hours of simulated traffic, learners and the project are throttled and the
# project crosses its alert thresholds; the rolling budget stays under its limit (a 0 next to the 1s).
MODELS_KEY = "sk-ant-api03-e2e-models"
CONFIG = """\
timezone: UTC
http: {listen: "127.0.0.1:0"}
sources: [{type: jsonl, path: "usage/*.jsonl", name: app-logs}]
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 1s}
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.02
    alert_at: [0.5]
    throttle_at: 1.0
  - name: lingo-monthly
    match: {project: lingo}
    window: month
    limit_usd: 0.50
    alert_at: [0.5, 0.8]
    throttle_at: 1.0
  - name: sonnet-rolling
    match: {model: claude-sonnet-4-5}
    window: rolling:2h
    limit_usd: 1000
    alert_at: [0.9]
    throttle_at: 1.0
limits:
  - {name: e2e-one-at-once, match: {project: e2e-admit}, per: user, concurrent: 1}
"""

# What Grafana substitutes before a query reaches Prometheus, made concrete.
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {
    "bool", "and", "or", "unless", "offset", "inf", "nan",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}  # fmt: skip
TARGET_LABELS = {"instance", "job"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Expr:
    """Metric names and label names a PromQL expression refers to."""

    metrics: dict[str, set[str]] = field(default_factory=dict)  # name -> label names in its matchers
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring/group_* clauses


def _skip_string(text: str, i: int) -> int:
    quote = text[i]
    i += 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" and quote != "`" else 1
    return i + 1


def _close(text: str, i: int, opening: str, closing: str) -> int:
    """Index after the bracket closing the one at i, strings skipped."""
    depth = 0
    while i < len(text):
        if text[i] in "\"'`":
            i = _skip_string(text, i)
            continue
        depth += text[i] == opening
        depth -= text[i] == closing
        i += 1
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced {opening} in {text!r}")


def parse_names(expr: str) -> Expr:
    """Scan PromQL for metric names (identifiers that are not functions or keywords) and the labels it names."""
    out = Expr()
    i, n = 0, len(expr)
    last_metric: str | None = None
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            end = _close(expr, i, "{", "}")
            body = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr[i + 1 : end - 1])
            labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
            if last_metric is not None:
                out.metrics[last_metric] |= labels
            else:  # {__name__="..."} selector
                name = re.search(r'__name__\s*=\s*"([^"]+)"', expr[i:end])
                assert name, f"a selector without a metric name in {expr!r}"
                out.metrics.setdefault(name.group(1), set()).update(labels - {"__name__"})
            i, last_metric = end, None
        elif c == "[":
            i, last_metric = _close(expr, i, "[", "]"), None
        elif c.isdigit() or (c == "." and expr[i + 1 : i + 2].isdigit()):
            while i < n and (expr[i].isalnum() or expr[i] in "._"):
                i += 1  # a number or a duration (5m, 1e3)
        elif c.isalpha() or c in "_:":
            start = i
            while i < n and (expr[i].isalnum() or expr[i] in "_:"):
                i += 1
            word = expr[start:i]
            j = i
            while j < n and expr[j].isspace():
                j += 1
            last_metric = None
            if word in GROUPING and j < n and expr[j] == "(":
                end = _close(expr, j, "(", ")")
                out.grouping |= set(re.findall(r"[a-zA-Z_]\w*", expr[j + 1 : end - 1]))
                i = end
            elif (j < n and expr[j] == "(") or word in KEYWORDS:
                pass  # a function, an aggregation or an operator
            else:
                out.metrics.setdefault(word, set())
                last_metric = word
        else:
            if not c.isspace():
                last_metric = None
            i += 1
    return out


def test_parse_names_finds_metrics_and_labels() -> None:
    found = parse_names(
        'histogram_quantile(0.95, sum by (task, le) (rate(a_bucket{instance=~"x}",b!="1"}[5m]))) '
        '/ on () group_left () sum(b_total offset 1h) and up == 1 or vector(0) * -1e3 + {__name__="c",d="e"}'
    )
    assert found.metrics == {"a_bucket": {"instance", "b"}, "b_total": set(), "up": set(), "c": {"d"}}
    assert found.grouping == {"task", "le"}


@dataclass
class Stack:
    serve: Serve
    prometheus: str
    instance: str
    exported: dict[str, set[str]]  # sample name -> label names, from the daemon's /metrics


def _prom(stack_url: str, path: str, **params: str) -> dict[str, Any]:
    answer = request(f"{stack_url}{path}?{urllib.parse.urlencode(params)}", timeout=10)
    body: dict[str, Any] = json.loads(answer.body)
    return body


def _exported(serve: Serve) -> dict[str, set[str]]:
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {"up": set()}
    for family in text_string_to_metric_families(serve.get("/metrics").body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


class _Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    (tmp / "usage").mkdir()
    now = datetime.now(UTC)
    # A backfill log the tailer reads at start, with duplicates and spoiled lines among three hours of traffic.
    backfill = simulate.generate_events(
        count=800, start=now - timedelta(hours=3), end=now, seed=11, duplicate_fraction=0.02, bad_fraction=0.02
    )
    simulate.write_files(backfill, tmp / "usage", prefix="backfill")
    # Anthropic's figures for a settled day three days ago, stored by `reconcile` before the daemon starts: the
    # reconcile gauges (read from the database) then have a day to show. We logged nothing that day.
    analytics = FakeAnalytics("sk-ant-admin01-e2e")
    # The latest settled day (26 h) is two days ago from 02:00 UTC on, three days ago before: give both a row.
    analytics.rows = [
        Row(now.date() - timedelta(days=days), "claude-haiku-4-5", "standard", Decimal("100"), 5) for days in (2, 3)
    ]
    # The Models API lists one model, which the table prices: the leader's price check exports 0 missing.
    models = FakeModels(MODELS_KEY, [("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "active")])
    checked = f"pricing: {{check: {{api_key_env: E2E_MODELS_KEY, base_url: '{models.url}'}}}}\n"
    config = write_config(tmp, CONFIG + f"reconcile: {{base_url: '{analytics.url}'}}\n" + checked)
    try:
        run_cli("reconcile", "--config", str(config), env={"ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-e2e"})
    finally:
        analytics.close()
    serve = Serve(config, tmp, env={"E2E_MODELS_KEY": MODELS_KEY})
    stop = threading.Event()
    prometheus: subprocess.Popen[bytes] | None = None
    live: threading.Thread | None = None
    try:
        lines = list(
            simulate.generate_events(
                count=1200, start=now - timedelta(hours=3), end=now, seed=12, duplicate_fraction=0.02, bad_fraction=0.01
            )
        )
        for batch in range(0, len(lines), 300):
            answer = serve.post_usage("\n".join(lines[batch : batch + 300]), content_type="application/x-ndjson")
            assert answer.status == 202, answer.body
        # A model missing from the price table, and an attribute that is not a dimension.
        odd = {
            "request_id": "req-unpriced-1",
            "timestamp": now.isoformat(),
            "model": "claude-nonexistent-9",
            "usage": {"input_tokens": 10, "output_tokens": 10},
            "attributes": {"project": "lingo", "colour": "red"},
        }
        assert serve.post_usage(odd).json()["accepted"] == 1
        # Admission: one call holds the user's slot (its lease stays open), the next is refused.
        admit = {"attributes": {"project": "e2e-admit", "user": "u-1"}, "model": "claude-haiku-4-5"}
        admit |= {"max_tokens": 100, "estimated_input_tokens": 100}
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        answers = [request(serve.url + "/v1/admit", "POST", json.dumps(admit).encode(), auth) for _ in range(2)]
        assert [answer.status for answer in answers] == [200, 429]

        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Stopped

        def run_live() -> None:
            # Traffic while Prometheus scrapes, so rate() sees counters move.
            with contextlib.suppress(_Stopped):
                simulate.run_live(
                    rate=20,
                    duration_s=120,
                    out_path=tmp / "usage" / "live.jsonl",
                    seed=13,
                    clock=lambda: datetime.now(UTC),
                    sleep=sleep,
                )

        live = threading.Thread(target=run_live, daemon=True)
        live.start()

        def throttled() -> bool:
            metrics = serve.metrics()
            active = metrics.get(("claude_throttle_active", (("budget", "lingo-monthly"), ("scope", "project=lingo"))))
            backfilled = sum(
                v
                for (name, labels), v in metrics.items()
                if name == "claude_monitor_ingest_events_total" and ("source", "app-logs") in labels
            )
            return active == 1 and backfilled >= 800

        wait_until(throttled, timeout=30, interval=0.2)
        # The first price check runs a few seconds after start; its gauge is then exported.
        missing = ("claude_monitor_price_table_missing_models", ())
        wait_until(lambda: serve.metrics().get(missing) == 0, timeout=30, interval=0.2)

        port = free_port()
        instance = serve.url.removeprefix("http://")
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "claude-monitor", "static_configs": [{"targets": [instance]}]}],
        }
        if ALERTS.exists():
            config["rule_files"] = [str(ALERTS)]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        def scraped() -> bool:
            if prometheus is not None and prometheus.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
            try:
                result = _prom(url, "/api/v1/query", query='count_over_time(up{job="claude-monitor"}[1m])')
            except (OSError, ValueError):  # not listening yet, or still starting (plain-text 503)
                return False
            values = [float(r["value"][1]) for r in result.get("data", {}).get("result", [])]
            return bool(values) and values[0] >= SCRAPES

        wait_until(scraped, timeout=40, interval=0.25)
        up = _prom(url, "/api/v1/query", query='up{job="claude-monitor"}')["data"]["result"]
        assert [r["value"][1] for r in up] == ["1"], up
        yield Stack(serve, url, instance, _exported(serve))
    finally:
        models.close()
        stop.set()
        if live is not None:
            live.join(10)
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        serve.stop(signal.SIGKILL)


def substitute(expr: str, instance: str) -> str:
    """The query Grafana would send with every filter at All and this replica picked."""
    for name, value in GRAFANA_RANGES.items():
        expr = expr.replace(name, value)
    expr = re.sub(r'(instance=~?)"\$\{?instance\}?"', rf'\1"{instance}"', expr)
    expr = re.sub(r'(\w+)=~"\$\{?\w+\}?"', r'\1=~".*"', expr)
    assert "$" not in expr, f"a template variable is left in {expr!r}"
    return expr


def _check_names(expr: str, exported: dict[str, set[str]], allowed_names: Collection[str] = ()) -> list[str]:
    """Problems with the metric and label names an expression uses."""
    problems = []
    found = parse_names(expr)
    known: set[str] = set(TARGET_LABELS)
    for metric, labels in found.metrics.items():
        if metric in allowed_names:
            continue
        if metric not in exported:
            problems.append(f"metric {metric} is not exported by serve")
            continue
        known |= exported[metric]
        unknown = labels - exported[metric] - TARGET_LABELS
        if unknown:
            problems.append(f"{metric} has no label(s) {sorted(unknown)}")
    unknown = found.grouping - known
    if unknown and not set(found.metrics).intersection(allowed_names):
        problems.append(f"grouping by label(s) {sorted(unknown)} that none of its metrics has")
    return problems


def _dashboard_targets() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    from tests.test_dashboards import all_panels

    for path in sorted(GRAFANA.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in all_panels(board["panels"]):
            for target in panel.get("targets", []):
                yield path.name, panel, target


def test_every_dashboard_query_parses_returns_data_and_names_exported_metrics(stack: Stack) -> None:
    problems: list[str] = []
    checked = 0
    for board, panel, target in _dashboard_targets():
        where = f"{board} / {panel['title']} / {target['refId']}"
        expr = substitute(target["expr"], stack.instance)
        problems += [f"{where}: {p}" for p in _check_names(expr, stack.exported)]
        answer = _prom(stack.prometheus, "/api/v1/query", query=expr)
        checked += 1
        if answer.get("status") != "success":
            problems.append(f"{where}: {answer.get('error')} in {expr}")
            continue
        result = answer["data"]["result"]
        if not result:
            problems.append(f"{where}: no data for {expr}")
            continue
        # A legend naming a label the result lacks renders as an empty string in Grafana.
        legend = target.get("legendFormat", "")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if any(label not in series["metric"] for series in result):
                problems.append(f"{where}: legend {legend!r} names {label!r}, missing from {result[0]['metric']}")
    assert checked >= 40
    assert not problems, "\n".join(problems)
    print(f"{checked} dashboard expressions checked against Prometheus")


def test_every_template_variable_lists_values(stack: Stack) -> None:
    checked = 0
    for path in sorted(GRAFANA.glob("*.json")):
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, (path.name, var["name"])
            selector = substitute(match.group(1), stack.instance)
            assert not _check_names(selector, stack.exported), (path.name, var["name"])
            answer = _prom(stack.prometheus, f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
            assert answer["status"] == "success" and answer["data"], (path.name, var["name"], answer)
            checked += 1
    assert checked >= 4


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document.get("groups", []) for rule in group.get("rules", [])]


@pytest.mark.skipif(not ALERTS.exists(), reason="dashboards/prometheus/alerts.yaml is not there yet")
def test_every_alert_rule_parses_and_names_exported_metrics(stack: Stack) -> None:
    rules = _rules()
    assert rules
    recorded = {rule["record"] for rule in rules if "record" in rule}
    problems = []
    for rule in rules:
        where = rule.get("alert") or rule.get("record")
        answer = _prom(stack.prometheus, "/api/v1/query", query=rule["expr"])
        if answer.get("status") != "success":
            problems.append(f"{where}: {answer.get('error')}")
        problems += [f"{where}: {p}" for p in _check_names(rule["expr"], stack.exported, recorded | {"ALERTS"})]
    # Prometheus loaded the file (it refuses to start on a bad one) and evaluates the rules without error.
    loaded = _prom(stack.prometheus, "/api/v1/rules")["data"]["groups"]
    assert sum(len(group["rules"]) for group in loaded) == len(rules)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [r for g in _prom(stack.prometheus, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        if all(r.get("health") != "unknown" for r in states):
            break
        time.sleep(0.25)
    problems += [f"{r['name']}: {r.get('lastError')}" for r in states if r.get("health") == "err"]
    assert not problems, "\n".join(problems)
    print(f"{len(rules)} alert rule expressions checked against Prometheus")
