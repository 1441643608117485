"""The event-time rollup: what a batch adds to it, what the migration fills it with, what reads it (report, the
day/month gauges), the late-events counter, and that retention keeps it. Dollars and rows are worked out by hand."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, delete, text

from monitor.config import ConfigError, load_settings
from monitor.report import build_report
from monitor.service import Daemon, Store, open_store
from monitor.store.models import events
from monitor.store.rollup import utc_days
from tests.conftest import FakeClock, jsonl, run_cli, write_config
from tests.serve_harness import Serve, sum_metric
from tests.test_migrations import alembic
from tests.test_postgres import pg_config

pytest_plugins = ["tests.pg"]

PICO = 10**12
KATHMANDU = "timezone: Asia/Kathmandu\n"  # UTC+05:45: its midnight is a quarter past the UTC hour
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # 17:45 on 26 Nov in Kathmandu
LINGO = {"project": "lingo", "environment": "prod"}
LABS = {"project": "labs"}


def ev(request_id: str, ts: str, model: str = "claude-haiku-4-5", attributes: Any = None, **fields: Any) -> Any:
    """An event: `usage` holds token counts and usage fields; batch and status go top-level."""
    event: dict[str, Any] = {"request_id": request_id, "timestamp": ts, "model": model, "usage": {}}
    for key, value in fields.items():
        if key in ("batch", "status"):
            event[key] = value
        else:
            event["usage"][key] = value
    if attributes:
        event["attributes"] = attributes
    return event


# Received at NOW. Kathmandu's 26 Nov runs 25 Nov 18:15 UTC .. 26 Nov 18:15 UTC.
MIXED = [
    # 25 Nov 23:59:59 in Kathmandu: yesterday there. 1M input x $1/M = $1.00.
    ev("a1", "2026-11-25T18:14:59Z", attributes=LINGO, input_tokens=1_000_000),
    # Kathmandu midnight, by a dated alias: 1M output x $5/M = $5.00.
    ev("a2", "2026-11-25T18:15:00Z", "claude-haiku-4-5-20251001", LINGO, output_tokens=1_000_000),
    # batch=true: half price, 1M output = $2.50.
    ev("a3", "2026-11-25T18:20:00Z", attributes=LINGO, batch=True, output_tokens=1_000_000),
    # service_tier batch counts as batch: 1M cache reads x $0.10/M x 1/2 = $0.05.
    ev("a4", "2026-11-25T18:29:59Z", attributes=LINGO, service_tier="batch", cache_read_input_tokens=1_000_000),
    # A failed call still billed: sonnet 100k input x $3/M = $0.30.
    ev("a5", "2026-11-26T11:50:00Z", "claude-sonnet-4-5", LABS, status=529, input_tokens=100_000),
    # Priority tier at sonnet's rates: 10k output x $15/M = $0.15.
    ev(
        "a6",
        "2026-11-26T11:46:00Z",
        "claude-sonnet-4-5",
        LABS,
        status=200,
        service_tier="priority",
        output_tokens=10_000,
    ),
    # Unknown model: unpriced.
    ev("a7", "2026-11-26T11:52:00Z", "claude-invented-9", LINGO, input_tokens=500),
    # Two days old, no attributes: 200k output x $5/M = $1.00 + 3 searches x $10/1k = $1.03.
    ev("a8", "2026-11-24T09:00:00Z", output_tokens=200_000, server_tool_use={"web_search_requests": 3}),
]

COLUMNS = (
    "requests, input, output, cache_read, cache_write_5m, cache_write_1h, web_search_requests, cost_pico, "
    "unpriced_requests"
)
NONE = '{"environment":null,"project":null}'
LINGO_JSON = '{"environment":"prod","project":"lingo"}'
LABS_JSON = '{"environment":null,"project":"labs"}'
# (bucket, model, tier, status class, labels) -> requests, input, output, read, 5m, 1h, searches, pico-USD, unpriced
EXPECTED = {
    ("2026-11-25 18:00:00", "claude-haiku-4-5", "standard", "ok", LINGO_JSON): (
        1, 1_000_000, 0, 0, 0, 0, 0, 1 * PICO, 0
    ),
    ("2026-11-25 18:15:00", "claude-haiku-4-5", "standard", "ok", LINGO_JSON): (
        1, 0, 1_000_000, 0, 0, 0, 0, 5 * PICO, 0
    ),
    ("2026-11-25 18:15:00", "claude-haiku-4-5", "batch", "ok", LINGO_JSON): (
        2, 0, 1_000_000, 1_000_000, 0, 0, 0, 2_550_000_000_000, 0
    ),
    ("2026-11-26 11:45:00", "claude-sonnet-4-5", "standard", "error", LABS_JSON): (
        1, 100_000, 0, 0, 0, 0, 0, 300_000_000_000, 0
    ),
    ("2026-11-26 11:45:00", "claude-sonnet-4-5", "priority", "ok", LABS_JSON): (
        1, 0, 10_000, 0, 0, 0, 0, 150_000_000_000, 0
    ),
    ("2026-11-26 11:45:00", "claude-invented-9", "standard", "ok", LINGO_JSON): (1, 500, 0, 0, 0, 0, 0, 0, 1),
    ("2026-11-24 09:00:00", "claude-haiku-4-5", "standard", "ok", NONE): (
        1, 0, 200_000, 0, 0, 0, 3, 1_030_000_000_000, 0
    ),
}  # fmt: skip
# Ingested at NOW: a1..a4 17h30m..17h45m late, a5..a7 8..14 min late, a8 2 days 3 h late.
EXPECTED_LATE = {"5m-1h": 3, "1h-1d": 4, ">1d": 1}


def write_mixed(store: Store) -> None:
    items = [("t", store.parser.parse_object(e)) for e in MIXED]
    result = store.writer.write([*items, items[1]], "test")  # a2 twice in one batch
    assert (result.accepted, result.duplicates) == (8, 1)
    again = store.writer.write(items[:2], "test")  # and again later: nothing counted twice
    assert (again.accepted, again.duplicates) == (0, 2)


def read_rollup(url: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(f"SELECT bucket_start, model, service_tier, status_class, labels, {COLUMNS} FROM usage_rollup")
            ).all()
            late = connection.execute(text("SELECT labels, value FROM counters WHERE name = 'late_events'")).all()
    finally:
        engine.dispose()
    found: dict[tuple[str, ...], tuple[int, ...]] = {
        (str(row[0])[:19], *row[1:5]): tuple(int(v) for v in row[5:]) for row in rows
    }
    found["late",] = tuple(sorted((json.loads(labels)["lateness"], int(value)) for labels, value in late))
    return found


def expected_with_late() -> dict[tuple[str, ...], Any]:
    return {**EXPECTED, ("late",): tuple(sorted(EXPECTED_LATE.items()))}


@pytest.fixture
def kathmandu(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(load_settings(write_config(tmp_path, KATHMANDU), environ={}), clock=FakeClock(NOW))
    yield opened
    opened.close()


def test_a_batch_adds_exactly_its_new_events_to_their_buckets(kathmandu: Store, tmp_path: Path) -> None:
    write_mixed(kathmandu)
    found = read_rollup(f"sqlite:///{tmp_path / 'monitor.db'}")
    assert found.pop(("late",)) == tuple(sorted(EXPECTED_LATE.items()))
    assert found == EXPECTED


def test_utc_days_by_model_and_tier_leave_failed_calls_out(kathmandu: Store) -> None:
    write_mixed(kathmandu)
    with kathmandu.engine.connect() as connection:
        days = utc_days(connection, date(2026, 11, 24), date(2026, 11, 27))
    found = {
        key: (c.requests, c.input, c.output, c.cache_read, c.web_search_requests, c.cost_pico)
        for key, c in days.items()
    }
    assert found == {
        (date(2026, 11, 24), "claude-haiku-4-5", "standard"): (1, 0, 200_000, 0, 3, 1_030_000_000_000),  # a8
        (date(2026, 11, 25), "claude-haiku-4-5", "standard"): (2, 1_000_000, 1_000_000, 0, 0, 6 * PICO),  # a1, a2
        (date(2026, 11, 25), "claude-haiku-4-5", "batch"): (2, 0, 1_000_000, 1_000_000, 0, 2_550_000_000_000),
        (date(2026, 11, 26), "claude-sonnet-4-5", "priority"): (1, 0, 10_000, 0, 0, 150_000_000_000),  # a6; a5 failed
        (date(2026, 11, 26), "claude-invented-9", "standard"): (1, 500, 0, 0, 0, 0),
    }


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_the_migration_fills_the_rollup_from_stored_events_exactly(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'monitor.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(load_settings(pg_config(tmp_path, url, KATHMANDU), environ={}), clock=FakeClock(NOW))
    try:
        write_mixed(store)
    finally:
        store.close()
    assert read_rollup(url) == expected_with_late()
    # Back to the schema before the rollup (the events stay), then up again: the migration refills it.
    assert alembic("downgrade", "0004", url=url).returncode == 0
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 8
            assert connection.execute(text("SELECT count(*) FROM counters WHERE name = 'late_events'")).scalar() == 0
    finally:
        engine.dispose()
    upgrade = alembic("upgrade", "head", url=url)
    assert upgrade.returncode == 0, upgrade.stderr
    assert read_rollup(url) == expected_with_late()
    check = alembic("check", url=url)
    assert check.returncode == 0, check.stdout + check.stderr


def report_of(store: Store, since: datetime | None, until: datetime | None, by: list[str]) -> Any:
    report = build_report(store.engine, since=since, until=until, by=by)
    rows = {tuple(row.keys.values()): (row.counts["requests"], row.cost_pico) for row in report.rows}
    return report.read_from, rows, report.total_pico


def test_report_reads_whole_buckets_from_the_rollup_and_edges_from_events(kathmandu: Store) -> None:
    write_mixed(kathmandu)
    day = (datetime(2026, 11, 25, 18, 15, tzinfo=UTC), datetime(2026, 11, 26, 18, 15, tzinfo=UTC))
    # Kathmandu's 26 Nov: a2..a7 = $5 + $2.55 + $0.30 + $0.15 + unpriced.
    assert report_of(kathmandu, *day, ["project"]) == (
        "rollup",
        {("lingo",): (4, 7_550_000_000_000), ("labs",): (2, 450_000_000_000)},
        8 * PICO,
    )
    # From 18:20 (inside a bucket): a3 and a4 come from the events, 18:30 on from the rollup: $2.55 + $0.45.
    source, rows, total = report_of(kathmandu, datetime(2026, 11, 25, 18, 20, tzinfo=UTC), None, ["model"])
    assert (source, total) == ("rollup", 3 * PICO)
    assert rows[("claude-haiku-4-5",)] == (2, 2_550_000_000_000)
    # user is no metric label: the events answer.
    assert report_of(kathmandu, *day, ["user"])[0] == "events"
    # Raw events past retention: whole buckets still add up.
    with kathmandu.engine.begin() as connection:
        connection.execute(delete(events))
    assert report_of(kathmandu, None, None, ["model"]) == (
        "rollup",
        {
            ("claude-haiku-4-5",): (5, 9_580_000_000_000),  # $1 + $5 + $2.55 + $1.03
            ("claude-sonnet-4-5",): (2, 450_000_000_000),
            ("claude-invented-9",): (1, 0),
        },
        10_030_000_000_000,
    )


def test_values_past_the_label_cap_are_reported_from_the_events(tmp_path: Path) -> None:
    config = write_config(tmp_path, "metrics: {max_values_per_label: 1}\n")
    store = open_store(load_settings(config, environ={}), clock=FakeClock(NOW))
    try:
        items = [
            ev("b1", "2026-11-26T10:00:00Z", attributes={"project": "lingo"}, output_tokens=100_000),  # $0.50
            ev("b2", "2026-11-26T10:01:00Z", attributes={"project": "labs"}, output_tokens=200_000),  # $1.00
        ]
        store.writer.write([("t", store.parser.parse_object(e)) for e in items], "test")
        since = datetime(2026, 11, 26, tzinfo=UTC)
        assert report_of(store, since, None, ["project"]) == (
            "events",
            {("labs",): (1, PICO), ("lingo",): (1, 500_000_000_000)},
            1_500_000_000_000,
        )
        assert report_of(store, since, None, ["model"])[0] == "rollup"
    finally:
        store.close()


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_window_gauges_count_by_event_time_and_backfills_show_as_late(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    config = write_config(
        tmp_path,
        KATHMANDU + f'http: {{listen: "127.0.0.1:0"}}\nsources: []\nthrottle: {{snapshot_file: {tmp_path}/t}}\n',
    )
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={})
    try:
        write_mixed(daemon.store)
        daemon.evaluate()
        metrics = scrape(daemon)
        # Kathmandu's 26 Nov: $8.00 in 6 requests; November there: + a1 $1 + a8 $1.03.
        assert sum_metric(metrics, "claude_spend_window_usd", window="day") == pytest.approx(8.00, abs=1e-9)
        assert sum_metric(metrics, "claude_spend_window_usd", window="month") == pytest.approx(10.03, abs=1e-9)
        assert sum_metric(metrics, "claude_requests_window", window="day") == 6
        assert sum_metric(metrics, "claude_requests_window", window="month") == 8
        day_haiku = {"window": "day", "model": "claude-haiku-4-5", "project": "lingo", "environment": "prod"}
        assert sum_metric(metrics, "claude_spend_window_usd", **day_haiku) == pytest.approx(7.55, abs=1e-9)
        assert sum_metric(metrics, "claude_tokens_window", type="output", **day_haiku) == 2_000_000
        assert sum_metric(metrics, "claude_tokens_window", type="cache_read", **day_haiku) == 1_000_000
        assert sum_metric(metrics, "claude_requests_window", window="day", model="unpriced") == 1
        for lateness, count in EXPECTED_LATE.items():
            assert metrics["claude_monitor_late_events_total", (("lateness", lateness),)] == count

        # A backfill of five events two days old: late, and not today's.
        clock.advance(minutes=1)
        backfill = [ev(f"old{i}", "2026-11-24T12:00:00Z", attributes=LINGO, output_tokens=1_000_000) for i in range(5)]
        daemon.store.writer.write([("t", daemon.store.parser.parse_object(e)) for e in backfill], "backfill")
        daemon.evaluate()
        after = scrape(daemon)
        assert after["claude_monitor_late_events_total", (("lateness", ">1d"),)] == 1 + 5
        assert sum_metric(after, "claude_spend_window_usd", window="day") == pytest.approx(8.00, abs=1e-9)
        assert sum_metric(after, "claude_requests_window", window="day") == 6
        assert sum_metric(after, "claude_spend_window_usd", window="month") == pytest.approx(35.03, abs=1e-9)
        # The counters, by ingest time, took all five at once.
        assert sum_metric(after, "claude_cost_usd_total") - sum_metric(metrics, "claude_cost_usd_total") == (
            pytest.approx(25.0, abs=1e-9)
        )

        # The next Kathmandu day: the day's series stay on at zero; November keeps everything.
        clock.advance(days=1)
        daemon.evaluate()
        later = scrape(daemon)
        assert sum_metric(later, "claude_spend_window_usd", window="day") == 0
        assert sum_metric(later, "claude_spend_window_usd", window="day", model="claude-haiku-4-5") == 0
        assert ("claude_spend_window_usd", tuple(sorted({**day_haiku}.items()))) in later
        assert sum_metric(later, "claude_spend_window_usd", window="month") == pytest.approx(35.03, abs=1e-9)
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


def test_the_last_whole_hour_gauge_holds_four_complete_buckets_by_event_time(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    config = write_config(
        tmp_path,
        KATHMANDU
        + f'http: {{listen: "127.0.0.1:0"}}\nsources: [{{path: "{tmp_path}/usage/*.jsonl", name: app-logs}}]\n'
        + f"throttle: {{snapshot_file: {tmp_path}/t}}\n",
    )
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": "t"})
    try:
        write_mixed(daemon.store)
        daemon.evaluate()
        metrics = scrape(daemon)
        # 12:00 UTC: the hour is 11:00-12:00, a5 $0.30 + a6 $0.15 + a7 unpriced; a8 (two days old) stays on at 0.
        assert sum_metric(metrics, "claude_spend_window_usd", window="1h") == pytest.approx(0.45, abs=1e-9)
        assert sum_metric(metrics, "claude_requests_window", window="1h") == 3
        assert sum_metric(metrics, "claude_spend_window_usd", window="1h", project="labs") == pytest.approx(0.45)
        no_labels = {"window": "1h", "model": "claude-haiku-4-5", "project": "", "environment": ""}
        assert metrics["claude_spend_window_usd", tuple(sorted(no_labels.items()))] == 0
        # The sources this process serves: its tailer and POST /v1/usage (an ingest token is set); not "test".
        sources = {labels for name, labels in metrics if name == "claude_monitor_source_info"}
        assert sources == {(("kind", "jsonl"), ("source", "app-logs")), (("kind", "http"), ("source", "http"))}

        # A request at 12:05 is in the current bucket: not in the hour until 12:15, when 11:00-11:15 has left it.
        clock.advance(minutes=14)
        late = ev("n1", "2026-11-26T12:05:00Z", attributes=LINGO, output_tokens=200_000)  # $1.00
        daemon.store.writer.write([("t", daemon.store.parser.parse_object(late))], "test")
        daemon.evaluate()
        assert sum_metric(scrape(daemon), "claude_spend_window_usd", window="1h") == pytest.approx(0.45, abs=1e-9)
        clock.advance(minutes=1)
        daemon.evaluate()
        assert sum_metric(scrape(daemon), "claude_spend_window_usd", window="1h") == pytest.approx(1.45, abs=1e-9)
        # A backfill stamped two hours ago is late, not this hour's.
        old = ev("n2", "2026-11-26T10:20:00Z", attributes=LINGO, output_tokens=2_000_000)  # $10.00
        daemon.store.writer.write([("t", daemon.store.parser.parse_object(old))], "backfill")
        daemon.evaluate()
        assert sum_metric(scrape(daemon), "claude_spend_window_usd", window="1h") == pytest.approx(1.45, abs=1e-9)
        clock.advance(hours=1)
        daemon.evaluate()
        later = scrape(daemon)
        assert sum_metric(later, "claude_spend_window_usd", window="1h") == 0
        assert ("claude_spend_window_usd", tuple(sorted(no_labels.items()))) in later
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


def test_retention_drops_raw_events_and_keeps_the_rollup(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    config = write_config(
        tmp_path,
        f'http: {{listen: "127.0.0.1:0"}}\nsources: []\nthrottle: {{snapshot_file: {tmp_path}/t}}\n'
        "schedule: {retention_days: 30}\n",
    )
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={})
    try:
        items = [
            ev(f"{days}d", (NOW - timedelta(days=days)).isoformat(), output_tokens=1_000_000)  # $5 each
            for days in (10, 45, 80, 399, 401)
        ]
        daemon.store.writer.write([("t", daemon.store.parser.parse_object(e)) for e in items], "test")
        daemon.retention()
        database = sqlite3.connect(tmp_path / "monitor.db")
        assert {row[0] for row in database.execute("SELECT request_id FROM events")} == {"10d"}
        # The rollup keeps 400 days (schedule.rollup_retention_days): 401 days ago goes.
        buckets = sorted(row[0][:10] for row in database.execute("SELECT bucket_start FROM usage_rollup"))
        assert buckets == ["2025-10-23", "2026-09-07", "2026-10-12", "2026-11-16"]
        report = build_report(daemon.store.engine, since=None, until=None, by=["model"])
        assert (report.read_from, report.total_pico) == ("rollup", 20 * PICO)
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


@pytest.mark.slow
def test_report_day_equals_the_day_gauge_of_a_real_serve_to_the_cent(tmp_path: Path) -> None:
    zone = ZoneInfo("Asia/Kathmandu")
    now = datetime.now(UTC)
    day_start = datetime.combine(now.astimezone(zone).date(), time(0), tzinfo=zone).astimezone(UTC)
    recent = max(now - timedelta(minutes=1), day_start + timedelta(seconds=2))

    def at(moment: datetime) -> str:
        return moment.isoformat().replace("+00:00", "Z")

    usage = jsonl(
        tmp_path / "u.jsonl",
        ev("s1", at(day_start + timedelta(seconds=1)), attributes=LINGO, output_tokens=1_000_000),  # $5
        ev("s2", at(day_start - timedelta(seconds=1)), attributes=LINGO, input_tokens=1_000_000),  # yesterday
        ev("s3", at(recent), "claude-sonnet-4-5", LABS, status=500, input_tokens=123_457),  # $0.370371
        ev("s4", at(day_start + timedelta(minutes=1)), batch=True, input_tokens=333_333),  # $0.1666665
        ev("s5", at(now - timedelta(days=2)), attributes=LINGO, output_tokens=1_000_000),  # a backfill
    )
    config = write_config(
        tmp_path, KATHMANDU + 'sources: []\nhttp: {listen: "127.0.0.1:0"}\nthrottle: {snapshot_file: throttle.json}\n'
    )
    run_cli("ingest", str(usage), "--config", str(config))
    serves = [Serve(config, tmp_path), Serve(config, tmp_path)]  # two replicas of one database
    try:
        report = run_cli("report", "--window", "day", "--format", "json", "--config", str(config)).json()
        scrapes = [serve.metrics() for serve in serves]
    finally:
        for serve in serves:
            serve.stop(signal.SIGTERM)
    if datetime.now(UTC).astimezone(zone).date() != now.astimezone(zone).date():
        pytest.skip("Kathmandu's day changed while the test ran")
    assert report["since"] == at(day_start)
    assert Decimal(report["total_usd"]) == Decimal("5.5370375")
    for metrics in scrapes:
        day = sum_metric(metrics, "claude_spend_window_usd", window="day")
        assert Decimal(str(round(day, 2))) == Decimal(report["total_usd"]).quantize(Decimal("0.01")) == Decimal("5.54")
        assert day == pytest.approx(5.5370375, abs=1e-9)
        assert sum_metric(metrics, "claude_requests_window", window="day") == 3
        assert metrics["claude_monitor_late_events_total", (("lateness", ">1d"),)] == 1
    windows = [{k: v for k, v in m.items() if k[0].endswith("_window") or "_window_" in k[0]} for m in scrapes]
    assert windows[0] and windows[0] == windows[1]


def test_the_rollup_must_outlive_a_month(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), environ={}).settings
    assert settings.schedule.rollup_retention_days == 400
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, "schedule:\n  rollup_retention_days: 20\n"), environ={})
    assert ":3: schedule.rollup_retention_days:" in str(caught.value)
    assert "greater than or equal to 32" in str(caught.value)
