"""Two `serve` replicas on one database, one of which never ingests, scraped by a real Prometheus with the shipped
rules: every database-backed panel and rule reads the same whichever replica Prometheus has, and after one dies; a
6-hour catch-up and a 20,000-event `ingest` backfill raise neither ClaudeSpendSpike nor ClaudeMonitorIngestStalled;
"today" on the dashboard is `report --window day` to the cent."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor import simulate
from monitor.store.rollup import bucket_of
from tests.conftest import write_config
from tests.serve_harness import Serve, sum_metric, wait_until
from tests.test_dashboards import PER_PROCESS, database_backed
from tests.test_prometheus_e2e import ALERTS, PROMETHEUS, _dashboard_targets, _prom, _rules, free_port, substitute

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (scripts/test installs it)"),
    pytest.mark.slow,
]

BUDGETS = """\
budgets:
  - name: lingo-monthly
    match: {project: lingo}
    window: month
    limit_usd: 100000
    alert_at: [0.5, 0.8]
    throttle_at: 1.0
"""
# Replica A tails usage/*.jsonl; replica B has no source and is sent nothing: it only reads the shared database.
CONFIG_A = f"""\
timezone: UTC
http: {{listen: "127.0.0.1:0"}}
sources: [{{type: jsonl, path: "usage/*.jsonl", name: app-logs}}]
throttle: {{snapshot_file: throttle.json}}
schedule: {{evaluate_every: 1s}}
{BUDGETS}"""
CONFIG_B = CONFIG_A.replace('sources: [{type: jsonl, path: "usage/*.jsonl", name: app-logs}]', "sources: []")
CATCH_UP = 3_000
BACKFILL = 20_000
SCRAPES = 6
# rate()/increase() extrapolate from each replica's own scrape times, and a counter series born during the
# backfill starts from whatever its first scrape caught: those agree within this, gauges to the cent.
TOLERANCE = 0.10


@dataclass
class Replicas:
    a: Serve
    b: Serve
    prometheus: str
    config: Path
    tmp: Path
    backfill_file: Path
    ingested_at: float  # monotonic time the last batch was seen by both replicas


def _query(url: str, expr: str) -> dict[frozenset[tuple[str, str]], float]:
    """An instant query's result: labels (instance left out) -> value."""
    answer = _prom(url, "/api/v1/query", query=expr)
    assert answer.get("status") == "success", (expr, answer)
    out = {}
    for series in answer["data"]["result"]:
        labels = frozenset((k, v) for k, v in series["metric"].items() if k != "instance")
        out[labels] = float(series["value"][1])
    return out


def _values(url: str, expr: str) -> list[float]:
    """An instant query's values, one per series."""
    answer = _prom(url, "/api/v1/query", query=expr)
    assert answer.get("status") == "success", (expr, answer)
    return [float(series["value"][1]) for series in answer["data"]["result"]]


def _cli(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args, "--config", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _metric_names(replicas: Replicas) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        s.name for f in text_string_to_metric_families(replicas.a.get("/metrics").body.decode()) for s in f.samples
    }
    return sorted(names, key=len, reverse=True)


def only(expr: str, instance: str, names: list[str]) -> str:
    """The expression as if Prometheus scraped this one replica: every selector gets instance="…"."""
    pattern = re.compile(r"(?<![\w:\"])(" + "|".join(map(re.escape, names)) + r")(?![\w:])(\{)?")

    def pin(match: re.Match[str]) -> str:
        return f'{match.group(1)}{{instance="{instance}"' + ("," if match.group(2) else "}")

    return pattern.sub(pin, expr)


def _same(left: dict[Any, float], right: dict[Any, float], exact: bool) -> bool:
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        other = right[key]
        if exact and round(value, 2) != round(other, 2):
            return False
        if not exact and abs(value - other) > TOLERANCE * max(abs(value), abs(other)) + 1e-9:
            return False
    return True


def _exact(expr: str) -> bool:
    """Whether two evaluations must agree to the cent: not for rates (extrapolated from each replica's scrape
    times), time() or a forecast (which moves with the clock of the evaluation that computed it)."""
    return not any(word in expr for word in ("rate(", "increase(", "time()", "forecast"))


def _shared_queries() -> Iterator[tuple[str, str]]:
    """(where, expression) of every panel target and rule that reads database-backed series only."""
    backed = database_backed()
    per_process = PER_PROCESS | {"up", "claude_monitor_source_info"}
    for board, panel, target in _dashboard_targets():
        expr = substitute(target["expr"], "unused")
        names = set(re.findall(r"[a-zA-Z_:][\w:]*", expr))
        if names & backed and not names & per_process and not any(n.startswith("claude_monitor_job") for n in names):
            yield f"{board} / {panel['id']} {panel['title']} / {target['refId']}", expr
    for rule in _rules():
        names = set(re.findall(r"[a-zA-Z_:][\w:]*", rule["expr"]))
        if names & backed and not names & per_process:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    (tmp / "usage").mkdir()
    (tmp / "b").mkdir()
    config = write_config(tmp, CONFIG_A)
    config_b = tmp / "b" / "claude-monitor.yaml"
    config_b.write_text(f"database_url: sqlite:///{tmp / 'monitor.db'}\n{CONFIG_B}")
    a = Serve(config, tmp)
    b: Serve | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        b = Serve(config_b, tmp / "b")
        now = datetime.now(UTC)
        # The jumps, drawn now and written once Prometheus scrapes both replicas: a 6-hour catch-up the tailer finds
        # at once, and a backfill of three days of older events by the real CLI.
        catch_up = list(simulate.generate_events(count=CATCH_UP, start=now - timedelta(hours=6), end=now, seed=22))
        older = list(
            simulate.generate_events(
                count=BACKFILL, start=now - timedelta(days=3), end=now - timedelta(hours=2), seed=23
            )
        )
        # Some traffic before Prometheus starts, so every series exists before the jumps: failed requests are rare
        # (a few in the seed), so one of each model and status the jumps fail with is added. A series born in the
        # middle of a range would be extrapolated from each replica's own first scrape of it.
        seed = list(simulate.generate_events(count=200, start=now - timedelta(minutes=30), end=now, seed=21))
        failed: dict[tuple[str, int], dict[str, Any]] = {}
        for line in (*catch_up, *older):
            event = json.loads(line)
            if event["status"] != 200:
                failed.setdefault((event["model"], event["status"]), event)
        for (model, status), event in sorted(failed.items()):
            seed.append(
                json.dumps(
                    event
                    | {
                        "request_id": f"series-{model}-{status}",
                        "timestamp": (now - timedelta(minutes=15)).isoformat(),
                    }
                )
            )
        seeded = len(seed) + 100  # and the tailed seed below
        assert a.post_usage("\n".join(seed), content_type="application/x-ndjson").status == 202
        tailed = simulate.generate_events(count=100, start=now - timedelta(minutes=30), end=now, seed=24)
        simulate.write_files(tailed, tmp / "usage", prefix="seed")
        wait_until(lambda: sum_metric(a.metrics(), "claude_monitor_ingest_events_total", source="app-logs") == 100)
        port = free_port()
        targets = [s.url.removeprefix("http://") for s in (a, b)]
        prom_config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "claude-monitor", "static_configs": [{"targets": targets}]}],
            "rule_files": [str(ALERTS)],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
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

        def scraped_both() -> bool:
            assert prometheus is not None and prometheus.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                counts = _values(url, 'count_over_time(up{job="claude-monitor"}[1m])')
                up = _values(url, 'up{job="claude-monitor"} == 1')
            except (OSError, ValueError, AssertionError):
                return False
            return len(counts) == len(up) == 2 and min(counts) >= SCRAPES

        wait_until(scraped_both, timeout=60, interval=0.25)

        simulate.write_files(catch_up, tmp / "usage", prefix="catchup")
        (backfill,) = simulate.write_files(older, tmp / "backfill")
        done = _cli(config, tmp, "ingest", str(backfill), "--format", "json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["accepted"] == BACKFILL

        def settled() -> bool:
            # Both replicas have evaluated after the last batch, and Prometheus has their month figure.
            accepted = _values(url, 'sum by (instance) (claude_monitor_ingest_events_total{outcome="accepted"})')
            month = _values(url, 'sum by (instance) (claude_spend_window_usd{window="month"})')
            return (
                accepted == [float(seeded + CATCH_UP + BACKFILL)] * 2
                and len(month) == 2
                and len({round(v, 6) for v in month}) == 1
            )

        wait_until(settled, timeout=90, interval=0.5)
        yield Replicas(a, b, url, config, tmp, backfill, time.monotonic())
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        if b is not None:
            b.stop(signal.SIGKILL)
        a.stop(signal.SIGKILL)


def _compare_replicas(replicas: Replicas) -> list[str]:
    """Queries whose result differs between 'Prometheus scraped only A' and 'only B'."""
    names = _metric_names(replicas)
    ia, ib = (s.url.removeprefix("http://") for s in (replicas.a, replicas.b))
    problems = []
    for where, expr in _shared_queries():
        exact = _exact(expr)
        left = _query(replicas.prometheus, only(expr, ia, names))
        right = _query(replicas.prometheus, only(expr, ib, names))
        if not _same(left, right, exact):
            problems.append(f"{where}: A {sorted(left.items())} B {sorted(right.items())}")
    return problems


def test_catch_up_and_backfill_raise_no_spike_and_leave_no_stalled_source(replicas: Replicas) -> None:
    url = replicas.prometheus
    spike = next(rule for rule in _rules() if rule.get("alert") == "ClaudeSpendSpike")
    stalled = next(rule for rule in _rules() if rule.get("alert") == "ClaudeMonitorIngestStalled")
    # What the spike rule reads now: the last whole hour by event time, equal to `report` over the same buckets.
    hour = 'sum(max without (instance) (claude_spend_window_usd{window="1h"}))'
    end = bucket_of(datetime.now(UTC))
    (read,) = _query(url, hour).values()
    report = _cli(
        replicas.config,
        replicas.tmp,
        "report",
        "--since",
        (end - timedelta(hours=1)).isoformat(),
        "--until",
        end.isoformat(),
        "--format",
        "json",
    )
    assert report.returncode == 0, report.stderr
    if bucket_of(datetime.now(UTC)) == end:  # not across a bucket edge
        assert round(Decimal(str(read)), 2) == round(Decimal(json.loads(report.stdout)["total_usd"]), 2)
    # What it read before: the ingest-time counter took the catch-up and the backfill within the hour.
    (ingest_time,) = _query(url, "sum(max without (instance) (increase(claude_cost_usd_total[1h])))").values()
    assert ingest_time > 5 * read, (ingest_time, read)

    # Stalled, with its 15 minutes cut to 8 s once nothing has been ingested for that long: the tailed source is a
    # candidate (a daemon serves it), the backfilled file is not.
    wait_until(lambda: time.monotonic() - replicas.ingested_at > 10, timeout=15, interval=0.5)
    wait_until(
        lambda: (
            not _query(
                url, 'max without (instance) (increase(claude_monitor_ingest_events_total{outcome="accepted"}[8s])) > 0'
            )
        ),
        timeout=20,
        interval=0.5,
    )
    quick = _query(url, stalled["expr"].replace("[15m]", "[8s]"))
    sources = {dict(labels)["source"] for labels in quick}
    assert "app-logs" in sources, quick
    assert not any(source.startswith("file:") for source in sources), sources
    backfilled = _query(url, f'claude_monitor_ingest_events_total{{source="file:{replicas.backfill_file}"}}')
    assert backfilled and set(backfilled.values()) == {float(BACKFILL)}

    # On the live Prometheus, neither alert is pending or firing, and their expressions are empty.
    assert _query(url, 'ALERTS{alertname=~"ClaudeSpendSpike|ClaudeMonitorIngestStalled"}') == {}
    assert _query(url, spike["expr"]) == {}
    assert _query(url, stalled["expr"]) == {}
    print(
        f"last whole hour by event time ${read:.2f}; increase(claude_cost_usd_total[1h]) ${ingest_time:.2f}; "
        f"stalled candidates with 8 s for 15 m: {sorted(sources)}"
    )


def test_today_on_the_dashboard_is_report_day_to_the_cent(replicas: Replicas) -> None:
    target = next(t for board, panel, t in _dashboard_targets() if panel["title"] == "Spend today")
    (shown,) = _query(replicas.prometheus, substitute(target["expr"], "unused")).values()
    report = _cli(replicas.config, replicas.tmp, "report", "--window", "day", "--format", "json")
    assert report.returncode == 0, report.stderr
    total = Decimal(json.loads(report.stdout)["total_usd"])
    assert round(Decimal(str(shown)), 2) == round(total, 2), (shown, total)
    print(f"Spend today: dashboard ${shown:.2f}, report --window day ${total}")


def test_every_database_backed_panel_and_rule_reads_the_same_from_either_replica(replicas: Replicas) -> None:
    queries = list(_shared_queries())
    assert len(queries) >= 40
    # Rates over 1 m windows that hold part of a jump extrapolate from each replica's own scrape times; once the
    # jumps are a minute old they agree (increase() over the hour within TOLERANCE: some series began mid-range).
    wait_until(lambda: time.monotonic() - replicas.ingested_at > 62, timeout=90, interval=1)
    # A scrape of each replica may straddle the other's 1 s refresh: allow a few seconds for them to agree.
    deadline = time.monotonic() + 10
    while (problems := _compare_replicas(replicas)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not problems, "\n".join(problems)
    print(f"{len(queries)} database-backed panel and rule expressions identical from either replica")


def test_after_one_replica_dies_every_panel_and_rule_reads_the_same(replicas: Replicas) -> None:
    url = replicas.prometheus
    ia = replicas.a.url.removeprefix("http://")
    ib = replicas.b.url.removeprefix("http://")
    names = _metric_names(replicas)
    queries = list(_shared_queries())
    # Two readings a scrape apart: one taken while a replica's evaluation was swapping its state can miss a series.
    first = {where: _query(url, expr) for where, expr in queries}
    time.sleep(1.5)  # one scrape interval, so the second reading is of other scrapes
    before = {where: _query(url, expr) or first[where] for where, expr in queries}
    replicas.b.stop(signal.SIGKILL)
    wait_until(lambda: _query(url, f'up{{instance="{ib}"}} == 0'), timeout=15, interval=0.25)
    deadline = time.monotonic() + 10
    while (problems := _after_death(url, queries, before, ia, names)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not problems, "\n".join(problems)


def _after_death(
    url: str, queries: list[tuple[str, str]], before: dict[str, Any], ia: str, names: list[str]
) -> list[str]:
    problems = []
    for where, expr in queries:
        exact = _exact(expr)
        shown = _query(url, expr)
        if not _same(shown, _query(url, only(expr, ia, names)), exact):
            problems.append(f"{where}: shown {sorted(shown.items())} is not replica A's")
        if exact and not _same(shown, before[where], exact=True):
            problems.append(f"{where}: {sorted(shown.items())} after, {sorted(before[where].items())} before")
    return problems
