"""Reconciliation with Anthropic's bill, against a local fake of the Usage and Cost Analytics API.

Anthropic's side is fed to the fake from figures the tests work out themselves — by hand, or straight from the stored
events table (not through the rollup or the comparison) — plus deliberate differences.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitor import simulate
from monitor.clock import system_clock
from monitor.config import ConfigError, load_settings
from monitor.ingest.files import ingest_files
from monitor.reconcile.compare import row_json
from monitor.reconcile.fetcher import AnalyticsError
from monitor.reconcile.runner import Reconciler
from monitor.service import Daemon, open_store
from tests.conftest import FakeClock, jsonl, run_cli, write_config
from tests.fake_analytics import BETA, COST_PATH, USAGE_PATH, FakeAnalytics, Row
from tests.test_postgres import pg_config

pytest_plugins = ["tests.pg"]

ADMIN_KEY = "sk-ant-admin01-Zq7vTESTONLYnotarealkey0123456789"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PICO = Decimal(10) ** 12


@pytest.fixture
def fake() -> Iterator[FakeAnalytics]:
    server = FakeAnalytics(ADMIN_KEY)
    yield server
    server.close()


def config_for(tmp_path: Path, base_url: str, extra: str = "", api_keys: str = "") -> Path:
    keys = f", api_keys: {api_keys}" if api_keys else ""
    return write_config(
        tmp_path,
        f"sources: []\nhttp: {{listen: '127.0.0.1:0'}}\nthrottle: {{snapshot_file: {tmp_path}/throttle.json}}\n"
        f"reconcile: {{base_url: '{base_url}'{keys}}}\n{extra}",
    )


def ev(request_id: str, ts: str, model: str = "claude-haiku-4-5", status: int | None = None, **usage: Any) -> Any:
    out: dict[str, Any] = {"request_id": request_id, "timestamp": ts, "model": model, "usage": usage}
    if status is not None:
        out["status"] = status
    return out


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def reconcile_tables(db: Path) -> tuple[list[Any], list[Any]]:
    connection = sqlite3.connect(db)
    try:
        figures = connection.execute("SELECT * FROM reconcile_figures ORDER BY day, model, service_tier").fetchall()
        fetches = connection.execute("SELECT * FROM reconcile_fetches ORDER BY id").fetchall()
    finally:
        connection.close()
    return figures, fetches


# --- exact: a day where our events equal Anthropic's --------------------------------------------------------------


def test_a_day_that_matches_shows_drift_exactly_zero(tmp_path: Path, fake: FakeAnalytics) -> None:
    # claude-haiku-4-5: $1/M input, $5/M output, $0.10/M cache read. By hand:
    #   r1: 1,000 input + 200 output          = $0.001 + $0.001           = $0.002
    #   r2: 3 input + 7 output + 11 cache read = $0.000003 + $0.000035 + $0.0000011 = $0.0000391
    #   r3: failed (status 529): no usage, not billed, not ours either.
    # Total $0.0020391 = 0.20391 cents, 2 requests.
    path = jsonl(
        tmp_path / "u.jsonl",
        ev("r1", "2026-11-20T10:00:00Z", input_tokens=1000, output_tokens=200),
        ev("r2", "2026-11-20T23:59:59Z", "claude-haiku-4-5-20251001", input_tokens=3, output_tokens=7,
           cache_read_input_tokens=11),
        ev("r3", "2026-11-20T12:00:00Z", status=529, input_tokens=0, output_tokens=0),
    )  # fmt: skip
    fake.rows = [
        Row(date(2026, 11, 20), "claude-haiku-4-5-20251001", "standard", Decimal("0.20391"), 2,
            uncached_input_tokens=1003, output_tokens=207, cache_read_input_tokens=11),
    ]  # fmt: skip
    loaded = load_settings(config_for(tmp_path, fake.url), environ={})
    clock = FakeClock(NOW)
    store = open_store(loaded, clock=clock)
    try:
        ingest_files([path], store.parser, store.ingestor)
        reconciler = Reconciler(store.engine, store.prices, loaded.settings.reconcile, clock, ADMIN_KEY)
        reconciler.fetch(date(2026, 11, 20), date(2026, 11, 21))
        (row,) = reconciler.compare(date(2026, 11, 20), date(2026, 11, 21))
    finally:
        store.close()
    shown = row_json(row)
    assert shown["anthropic_usd"] == "0.0020391"
    assert shown["ours_usd"] == "0.0020391"
    assert shown["drift_usd"] == "0"
    assert shown["drift_ratio"] == 0
    assert shown["model"] == "claude-haiku-4-5"  # Anthropic's dated id, through the price table's aliases
    assert (shown["anthropic_requests"], shown["our_requests"], shown["missing_requests"]) == (2, 2, 0)
    assert shown["token_drift"] == dict.fromkeys(
        ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "web_search_requests"), 0
    )
    assert shown["settled"] is True and shown["finding"] is False


def test_on_postgres_a_refetch_replaces_and_a_match_is_exactly_zero(
    tmp_path: Path, fake: FakeAnalytics, pg_url: str
) -> None:
    # Two haiku-4-5 requests on 20 Nov: 2 x 1,000,000 output tokens at $5/M = $10.00 = 1000 cents; one batch call of
    # 1,000,000 output tokens at half price = $2.50. Anthropic first reports the standard row 1 cent short, then
    # (settled late) exactly.
    path = jsonl(
        tmp_path / "u.jsonl",
        ev("p1", "2026-11-20T01:00:00Z", output_tokens=1_000_000),
        ev("p2", "2026-11-20T22:00:00Z", output_tokens=1_000_000),
        ev("p3", "2026-11-20T02:00:00Z", output_tokens=1_000_000, service_tier="batch"),
    )
    fake.rows = [
        Row(date(2026, 11, 20), "claude-haiku-4-5", "standard", Decimal("999"), 2, output_tokens=2_000_000),
        Row(date(2026, 11, 20), "claude-haiku-4-5", "batch", Decimal("250"), 1, output_tokens=1_000_000),
    ]
    loaded = load_settings(pg_config(tmp_path, pg_url, f"sources: []\nreconcile: {{base_url: '{fake.url}'}}\n"))
    clock = FakeClock(NOW)
    store = open_store(loaded, clock=clock)
    try:
        ingest_files([path], store.parser, store.ingestor)
        reconciler = Reconciler(store.engine, store.prices, loaded.settings.reconcile, clock, ADMIN_KEY)
        day = (date(2026, 11, 20), date(2026, 11, 21))
        reconciler.fetch(*day)
        first = {r.service_tier: row_json(r) for r in reconciler.compare(*day)}
        assert (first["standard"]["drift_usd"], first["standard"]["finding"]) == ("-0.01", True)
        fake.rows[0].list_amount_cents = Decimal("1000")
        reconciler.fetch(*day)
        second = {r.service_tier: row_json(r) for r in reconciler.compare(*day)}
        assert {tier: (r["anthropic_usd"], r["ours_usd"], r["drift_usd"]) for tier, r in second.items()} == {
            "standard": ("10", "10", "0"),
            "batch": ("2.5", "2.5", "0"),
        }
        assert not any(r["finding"] for r in second.values())
    finally:
        store.close()


# --- the wire: pages, the 429 retry, the beta header and the key ------------------------------------------------


def test_three_pages_a_429_retried_and_refetching_replaces_the_days(tmp_path: Path, fake: FakeAnalytics) -> None:
    days = [date(2026, 11, d) for d in range(10, 17)]  # 7 days x 1 row: 3 pages of 3, 3 and 1
    fake.rows = [Row(d, "claude-opus-4-5", "standard", Decimal(f"{d.day}.0000000001"), d.day) for d in days]
    fake.page_size = 3
    fake.fail_next(429)
    loaded = load_settings(config_for(tmp_path, fake.url), environ={})
    clock = FakeClock(NOW)
    store = open_store(loaded, clock=clock)
    try:
        reconciler = Reconciler(store.engine, store.prices, loaded.settings.reconcile, clock, ADMIN_KEY)
        assert reconciler.fetch(days[0], days[-1] + timedelta(days=1)) == 7
        cost = fake.seen(COST_PATH)
        assert len(cost) == 4  # the 429, then three pages
        assert [s.query.get("page") for s in cost] == [None, None, ["page_3"], ["page_6"]]
        assert [s.query.get("page") for s in fake.seen(USAGE_PATH)] == [None, ["page_3"], ["page_6"]]
        for seen in fake.requests:
            assert BETA in seen.headers["anthropic-beta"]
            assert seen.headers["authorization"] == f"Bearer {ADMIN_KEY}"
            assert seen.query["group_by[]"] == ["model", "service_tier"]
            assert seen.query["products[]"] == ["messages_api", "message_batches_api"]
        figures, fetches = reconcile_tables(tmp_path / "monitor.db")
        assert [(f[0], f[1], f[3]) for f in figures] == [
            (d.isoformat(), "claude-opus-4-5", f"{d.day}.0000000001") for d in days
        ]
        assert len(fetches) == 1

        # Anthropic's figures settle late: a second fetch replaces the days, never adds to them; a day that is gone
        # from Anthropic's report is emptied.
        fake.rows = [Row(days[0], "claude-opus-4-5", "standard", Decimal("99.5"), 99)]
        clock.advance(hours=6)
        assert reconciler.fetch(days[0], days[2]) == 1
        figures, fetches = reconcile_tables(tmp_path / "monitor.db")
        assert [(f[0], f[3], f[6]) for f in figures[:2]] == [
            ("2026-11-10", "99.5", 99),
            ("2026-11-12", "12.0000000001", 12),  # outside the refetched range: kept
        ]
        assert len(figures) == 6 and len(fetches) == 2
    finally:
        store.close()


@pytest.mark.slow
def test_a_refused_key_and_an_unreachable_api_are_exit_4_and_write_nothing(tmp_path: Path, fake: FakeAnalytics) -> None:
    day = system_clock().date() - timedelta(days=3)
    fake.rows = [Row(day, "claude-haiku-4-5", "standard", Decimal("1.5"), 3)]
    config = config_for(tmp_path, fake.url)
    first = run_cli("reconcile", "--config", str(config), "--format", "json", env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY})
    before = reconcile_tables(tmp_path / "monitor.db")
    assert len(before[0]) == 1 and len(before[1]) == 1

    refused = run_cli(
        "reconcile", "--config", str(config), env={"ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-wrong"}, check=False
    )
    assert refused.returncode == 4, refused.stderr
    assert "401" in refused.stderr and "refused" in refused.stderr and "nothing was written" in refused.stderr
    assert "sk-ant-admin01-wrong" not in refused.stderr

    down = config_for(tmp_path, f"http://127.0.0.1:{unused_port()}")
    gone = run_cli("reconcile", "--config", str(down), env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY}, check=False)
    assert gone.returncode == 4, gone.stderr
    assert "cannot reach Anthropic's analytics API" in gone.stderr and "reconcile.base_url" in gone.stderr
    assert ADMIN_KEY not in gone.stderr + gone.stdout

    fake.rows = [Row(day, "claude-haiku-4-5", "standard", Decimal("2"), 4)]
    fake.page_size = 1
    fake.rows.append(Row(day + timedelta(days=1), "claude-haiku-4-5", "standard", Decimal("2"), 4))
    fake.fail_next(500)
    fake.fail_next(500)
    fake.fail_next(500)  # the first request and both SDK retries: the fetch fails after reading nothing whole
    failing = run_cli("reconcile", "--config", str(config), env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY}, check=False)
    assert failing.returncode == 4, failing.stderr
    assert reconcile_tables(tmp_path / "monitor.db") == before  # nothing half-written
    assert first.json()["days"][0]["anthropic_usd"] == "0.015"

    missing = run_cli("reconcile", "--config", str(config), check=False)
    assert missing.returncode == 2 and "$ANTHROPIC_ADMIN_KEY is not set" in missing.stderr


def test_a_failure_on_a_later_page_writes_nothing(tmp_path: Path, fake: FakeAnalytics) -> None:
    days = [date(2026, 11, d) for d in range(1, 7)]
    fake.rows = [Row(d, "claude-haiku-4-5", "standard", Decimal(1), 1) for d in days]
    loaded = load_settings(config_for(tmp_path, fake.url), environ={})
    store = open_store(loaded, clock=FakeClock(NOW))
    try:
        reconciler = Reconciler(store.engine, store.prices, loaded.settings.reconcile, FakeClock(NOW), ADMIN_KEY)
        reconciler.fetch(days[0], days[-1] + timedelta(days=1))
        before = reconcile_tables(tmp_path / "monitor.db")
        fake.rows = [Row(d, "claude-haiku-4-5", "standard", Decimal(2), 2) for d in days]
        fake.page_size = 2
        real = fake._arrived

        def fail_third(seen: Any, authenticated: bool) -> int | None:
            real(seen, authenticated)
            return 400 if seen.query.get("page") == ["page_4"] else None  # the cost report's third page

        fake._arrived = fail_third  # type: ignore[method-assign]
        with pytest.raises(AnalyticsError, match="400"):
            reconciler.fetch(days[0], days[-1] + timedelta(days=1))
        assert reconcile_tables(tmp_path / "monitor.db") == before
    finally:
        store.close()


# --- per mapped API key ------------------------------------------------------------------------------------------

KEYS = "{apikey_01Lingo: {project: lingo}, apikey_01Chat: {project: chat}}"


def on_project(request_id: str, project: str | None, **usage: Any) -> Any:
    event = ev(request_id, "2026-11-20T09:00:00Z", **usage)
    if project is not None:
        event["attributes"] = {"project": project}
    return event


@pytest.mark.slow
def test_mapped_keys_are_compared_per_project_and_unmapped_keys_on_their_own(
    tmp_path: Path, fake: FakeAnalytics
) -> None:
    # Our events on 20 Nov, claude-haiku-4-5 ($1/M input, $5/M output), by project:
    #   lingo: 1,000,000 output = $5.00;  chat: 1,000,000 input = $1.00;
    #   tools (a project no key maps): 1,000,000 input = $1.00;  no project: 1,000 input = $0.001.
    path = jsonl(
        tmp_path / "u.jsonl",
        on_project("l1", "lingo", output_tokens=1_000_000),
        on_project("c1", "chat", input_tokens=1_000_000),
        on_project("t1", "tools", input_tokens=1_000_000),
        on_project("n1", None, input_tokens=1_000),
    )
    day = date(2026, 11, 20)
    fake.rows = [
        # lingo's key: exactly ours.
        Row(day, "claude-haiku-4-5", "standard", Decimal("500"), 1, output_tokens=1_000_000,
            api_key_id="apikey_01Lingo"),
        # chat's key: 0.6% more than ours ($1.006), a price we would have wrong for chat's traffic alone.
        Row(day, "claude-haiku-4-5", "standard", Decimal("100.6"), 1, uncached_input_tokens=1_000_000,
            api_key_id="apikey_01Chat"),
        # Keys nobody mapped: tools' key (exactly our tools + no-project events: $1.001, 2 requests), a key whose
        # 5 requests we never logged (5 x 1,000 input = $0.005), and usage no key authenticated (2 x 1,000 input).
        Row(day, "claude-haiku-4-5", "standard", Decimal("100.1"), 2, uncached_input_tokens=1_001_000,
            api_key_id="apikey_01Tools"),
        Row(day, "claude-haiku-4-5", "standard", Decimal("0.5"), 5, uncached_input_tokens=5_000,
            api_key_id="apikey_01Ghost"),
        Row(day, "claude-haiku-4-5", "standard", Decimal("0.2"), 2, uncached_input_tokens=2_000, api_key_id=None),
    ]  # fmt: skip
    config = config_for(tmp_path, fake.url, api_keys=KEYS)
    loaded = load_settings(config, environ={})
    assert loaded.settings.reconcile.api_keys == {
        "apikey_01Lingo": {"project": "lingo"},
        "apikey_01Chat": {"project": "chat"},
    }
    clock = FakeClock(NOW)
    store = open_store(loaded, clock=clock)
    try:
        ingest_files([path], store.parser, store.ingestor)
        reconciler = Reconciler(store.engine, store.prices, loaded.settings.reconcile, clock, ADMIN_KEY)
        reconciler.fetch(day, day + timedelta(days=1))
        rows = [row_json(r) for r in reconciler.compare(day, day + timedelta(days=1))]
    finally:
        store.close()

    for seen in fake.requests:
        assert seen.query["group_by[]"] == ["model", "service_tier", "api_key_id"]
    connection = sqlite3.connect(tmp_path / "monitor.db")
    stored = connection.execute("SELECT api_key_id, list_amount_cents FROM reconcile_figures ORDER BY 1").fetchall()
    connection.close()
    assert stored == [  # Anthropic's figures are kept per key id as reported: a mapping edit applies to them too
        ("", "0.2"),
        ("apikey_01Chat", "100.6"),
        ("apikey_01Ghost", "0.5"),
        ("apikey_01Lingo", "500"),
        ("apikey_01Tools", "100.1"),
    ]

    shown = [
        (r["attributes"], r["unmapped"], r["anthropic_usd"], r["ours_usd"], r["drift_usd"],
         r["anthropic_requests"], r["our_requests"], r["missing_requests"], r["finding"])
        for r in rows
    ]  # fmt: skip
    assert shown == [
        ({"project": "chat"}, False, "1.006", "1", "0.006", 1, 1, 0, True),
        ({"project": "lingo"}, False, "5", "5", "0", 1, 1, 0, False),
        # $1.001 + $0.005 + $0.002 against our $1.001; 9 requests against our 2.
        ({}, True, "1.008", "1.001", "0.007", 9, 2, 7, True),
    ]
    assert rows[2]["unmapped_api_key_ids"] == ["(no API key)", "apikey_01Ghost", "apikey_01Tools"]
    assert rows[0]["unmapped_api_key_ids"] == [] and rows[0]["token_drift"]["input"] == 0
    assert rows[2]["token_drift"]["input"] == 7_000

    # The CLI's table names each group.
    table = run_cli(
        "reconcile", "--config", str(config), "--since", "2026-11-20", "--until", "2026-11-21",
        env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY},
    ).stdout  # fmt: skip
    lines = {line.split()[3]: line for line in table.splitlines() if line.startswith("2026-11-20")}
    assert set(lines) == {"project=chat", "project=lingo", "unmapped"}
    assert "FINDING" in lines["project=chat"] and "FINDING" not in lines["project=lingo"]
    assert "unmapped ((no API key), apikey_01Ghost, apikey_01Tools)" in lines["unmapped"]
    assert "2 finding(s)" in table


def test_a_day_fetched_before_keys_were_mapped_is_compared_whole(tmp_path: Path, fake: FakeAnalytics) -> None:
    # One lingo call on 20 Nov: 1,000,000 output tokens at $5/M = $5.00. Anthropic's rows for two keys sum to it.
    path = jsonl(tmp_path / "u.jsonl", on_project("l1", "lingo", output_tokens=1_000_000))
    day = date(2026, 11, 20)
    fake.rows = [
        Row(day, "claude-haiku-4-5", "standard", Decimal("300"), 1, api_key_id="apikey_01Lingo"),
        Row(day, "claude-haiku-4-5", "standard", Decimal("200"), 0, api_key_id="apikey_01Chat"),
    ]
    whole = load_settings(config_for(tmp_path, fake.url), environ={})
    mapped = whole.settings.reconcile.model_copy(update={"api_keys": {"apikey_01Lingo": {"project": "lingo"}}})
    clock = FakeClock(NOW)
    store = open_store(whole, clock=clock)
    try:
        ingest_files([path], store.parser, store.ingestor)
        Reconciler(store.engine, store.prices, whole.settings.reconcile, clock, ADMIN_KEY).fetch(
            day, day + timedelta(1)
        )
        assert "api_key_id" not in fake.requests[0].query["group_by[]"]
        (row,) = Reconciler(store.engine, store.prices, mapped, clock, ADMIN_KEY).compare(day, day + timedelta(1))
    finally:
        store.close()
    # The key split is unknown for a day fetched whole: one row for the whole day, no attributes.
    assert (row_json(row)["attributes"], row_json(row)["drift_usd"], row_json(row)["finding"]) == (None, "0", False)


@pytest.mark.slow
def test_check_config_explains_reconcile_without_the_key(tmp_path: Path) -> None:
    config = config_for(tmp_path, "https://analytics.example.test", api_keys=KEYS)
    text = run_cli("check-config", "--config", str(config), env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY}).stdout
    assert (
        "reconcile: Anthropic's usage and cost reports (Messages API and Message Batches API only) from "
        "https://analytics.example.test, every 6h by the leader, each run re-fetching the last 7 UTC day(s); a day is "
        "settled 26h after it ends" in text
    )
    assert "drifts more than 0.1% from Anthropic's list-price figure" in text
    assert "reconcile admin key: from $ANTHROPIC_ADMIN_KEY (set: the leader fetches on schedule)" in text
    assert "compared per UTC day, model, tier and project:" in text
    assert "  - apikey_01Lingo: project=lingo\n  - apikey_01Chat: project=chat\n" in text
    assert "every other key, and usage no key authenticated: one unmapped row" in text

    unset = run_cli("check-config", "--config", str(config), "--format", "json", env={"ANTHROPIC_ADMIN_KEY": ""})
    assert unset.json()["reconcile"] == {
        "base_url": "https://analytics.example.test",
        "products": ["messages_api", "message_batches_api"],
        "group_by": ["model", "service_tier", "api_key_id"],
        "every": "6h",
        "lookback_days": 7,
        "settle_hours": 26,
        "tolerance": "0.001",
        "admin_key_env": "ANTHROPIC_ADMIN_KEY",
        "admin_key_set": False,
        "compared_by": ["project"],
        "api_keys": {"apikey_01Lingo": {"project": "lingo"}, "apikey_01Chat": {"project": "chat"}},
    }
    as_set = run_cli(
        "check-config", "--config", str(config), "--format", "json", env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY}
    )
    assert as_set.json()["reconcile"]["admin_key_set"] is True
    assert ADMIN_KEY not in text + as_set.stdout + as_set.stderr

    plain = config_for(tmp_path, "https://api.anthropic.com")
    text = run_cli("check-config", "--config", str(plain), env={"ANTHROPIC_ADMIN_KEY": ""}).stdout
    assert "reconcile admin key: from $ANTHROPIC_ADMIN_KEY (NOT SET: nothing is fetched on schedule" in text
    assert "reconcile by API key: no key mapped (reconcile.api_keys); compared per UTC day, model and tier" in text


# --- 31 days of traffic, the CLI, and what it names ----------------------------------------------------------------

HAIKU, SONNET, OPUS = "claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"
ANTHROPIC_NAME = {HAIKU: "claude-haiku-4-5-20251001", SONNET: "claude-sonnet-4-5-20250929"}  # dated ids, as reported


def anthropic_rows_from_events(db: Path) -> dict[tuple[date, str, str], Row]:
    """What Anthropic would report for the stored events, summed straight from the events table: successful calls
    only, by UTC day, model and service tier."""
    rows: dict[tuple[date, str, str], Row] = {}
    sums: dict[tuple[date, str, str], list[int]] = defaultdict(lambda: [0] * 8)
    connection = sqlite3.connect(db)
    query = (
        "SELECT ts, model, batch, service_tier, status, cost_pico, input_tokens, output_tokens, cache_read_tokens,"
        " cache_write_5m_tokens, cache_write_1h_tokens, web_search_requests FROM events"
    )
    for ts, model, batch, tier, status, cost, *tokens in connection.execute(query):
        if status is not None and status >= 400:
            continue
        assert cost is not None, model  # the simulation only calls models the price table knows
        kind = "batch" if batch or tier == "batch" else ("priority" if tier == "priority" else "standard")
        entry = sums[(date.fromisoformat(ts[:10]), model, kind)]
        entry[0] += 1
        entry[1] += cost
        for i, count in enumerate(tokens, start=2):
            entry[i] += count
    connection.close()
    for (day, model, kind), (n, cost, inp, out, read, w5, w1, web) in sums.items():
        rows[(day, model, kind)] = Row(
            day, ANTHROPIC_NAME.get(model, model), kind, Decimal(cost) / PICO * 100, n,
            uncached_input_tokens=inp, output_tokens=out, cache_read_input_tokens=read,
            ephemeral_5m_input_tokens=w5, ephemeral_1h_input_tokens=w1, web_search_requests=web,
        )  # fmt: skip
    return rows


@pytest.mark.slow
def test_thirty_one_days_name_exactly_the_two_findings(tmp_path: Path, fake: FakeAnalytics) -> None:
    now = system_clock()  # the CLI runs on the real clock: the traffic ends now
    today = now.date()
    start = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=30)
    lines = simulate.generate_events(count=31 * 160, start=start, end=now - timedelta(seconds=1), seed=7, users=500)
    files = simulate.write_files(lines, tmp_path / "usage")
    config = config_for(tmp_path, fake.url)
    store = open_store(load_settings(config, environ={}))
    try:
        result, failed = ingest_files(files, store.parser, store.ingestor)
    finally:
        store.close()
    assert not failed and result.accepted == 31 * 160

    rows = anthropic_rows_from_events(tmp_path / "monitor.db")
    price_day, missing_day, young_day = today - timedelta(days=10), today - timedelta(days=5), today - timedelta(days=1)
    # 1. A price we have wrong: Anthropic bills Haiku 0.5% more on one day (standard tier).
    wrong = rows[(price_day, HAIKU, "standard")]
    ours_wrong_usd = wrong.list_amount_cents / 100
    wrong.list_amount_cents *= Decimal("1.005")
    # 2. 37 requests we never logged, on Sonnet: 37 x (1,000 input at $3/M = $0.003) = $0.111 = 11.1 cents.
    unlogged = rows[(missing_day, SONNET, "standard")]
    assert unlogged.requests is not None
    unlogged.requests += 37
    unlogged.uncached_input_tokens += 37_000
    unlogged.list_amount_cents += Decimal("11.1")
    # 3. Yesterday is not settled (26 h): a large difference there is shown, never a finding.
    young = rows[(young_day, HAIKU, "standard")]
    young.list_amount_cents *= 3
    fake.rows = list(rows.values())

    run = run_cli(
        "reconcile", "--config", str(config), "--since", (today - timedelta(days=30)).isoformat(),
        "--until", (today + timedelta(days=1)).isoformat(), "--format", "json",
        env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    doc = run.json()
    assert set(doc) == {"days", "findings"}
    by_key = {(d["date"], d["model"], d["service_tier"]): d for d in doc["days"]}
    assert len(by_key) == len(rows) == len(doc["days"])
    findings = [d for d in doc["days"] if d["finding"]]
    print(json.dumps({"findings": findings, "young": [d for d in doc["days"] if d["date"] == young_day.isoformat()]}))
    assert doc["findings"] == 2
    assert [(d["date"], d["model"]) for d in findings] == [
        (price_day.isoformat(), HAIKU),
        (missing_day.isoformat(), SONNET),
    ]

    price = by_key[(price_day.isoformat(), HAIKU, "standard")]
    assert Decimal(price["drift_usd"]) == ours_wrong_usd * Decimal("0.005")
    assert Decimal(price["anthropic_usd"]) - Decimal(price["ours_usd"]) == Decimal(price["drift_usd"])
    assert price["drift_ratio"] == pytest.approx(0.005 / 1.005, rel=1e-9)
    assert price["missing_requests"] == 0 and price["settled"] is True

    gap = by_key[(missing_day.isoformat(), SONNET, "standard")]
    assert gap["missing_requests"] == 37
    assert gap["anthropic_requests"] - gap["our_requests"] == 37
    assert gap["drift_usd"] == "0.111"
    assert gap["token_drift"]["input"] == 37_000 and gap["token_drift"]["output"] == 0

    yesterday = by_key[(young_day.isoformat(), HAIKU, "standard")]
    assert yesterday["settled"] is False and yesterday["finding"] is False
    assert Decimal(yesterday["drift_usd"]) == 2 * Decimal(yesterday["ours_usd"]) > 0

    rest = [d for key, d in by_key.items() if key[0] not in (price_day.isoformat(), young_day.isoformat())
            and key != (missing_day.isoformat(), SONNET, "standard")]  # fmt: skip
    assert rest and all(d["drift_usd"] == "0" and d["missing_requests"] == 0 for d in rest)
    assert any(d["service_tier"] == "batch" for d in rest)  # the nightly batch job is compared on its own rows

    table = run_cli("reconcile", "--config", str(config), env={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY})
    # The default range is the last 7 days (reconcile.lookback_days): of the two, only the Sonnet day is in it.
    assert table.stdout.count("FINDING") == 1 and "1 finding(s)" in table.stdout
    assert "unsettled" in table.stdout


# --- the daemon: the scheduled job, the gauges, and the key kept out of everything --------------------------------


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.mark.slow
def test_daemon_job_gauges_and_the_key_kept_secret(
    tmp_path: Path, fake: FakeAnalytics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock(NOW)
    # Haiku on 24 Nov (settled at NOW: its end is 36 h old): ours 1,000,000 output tokens = $5.00; Anthropic bills
    # $5.02 (0.4% more, past the 0.1% tolerance) and 2 requests where we logged 1. 25 Nov ended 12 h ago: unsettled.
    path = jsonl(
        tmp_path / "u.jsonl",
        ev("a", "2026-11-24T08:00:00Z", output_tokens=1_000_000),
        ev("b", "2026-11-25T08:00:00Z", output_tokens=1_000_000),
    )
    fake.rows = [
        Row(date(2026, 11, 24), "claude-haiku-4-5", "standard", Decimal("502"), 2),
        Row(date(2026, 11, 25), "claude-haiku-4-5", "standard", Decimal("900"), 9),
    ]
    config = config_for(tmp_path, fake.url, "dimensions: [api_key, project]\nmetrics: {labels: [project]}\n")
    environ = {"ANTHROPIC_ADMIN_KEY": ADMIN_KEY}
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ=environ)
    try:
        ingest_files([path], daemon.store.parser, daemon.ingestor)
        daemon.start()
        job = daemon.scheduler.get_job("reconcile")
        assert job is not None and job.trigger.interval == timedelta(hours=6)
        before = scrape(daemon)
        assert ("claude_reconcile_last_success_timestamp_seconds", ()) not in before

        daemon.reconcile()  # what the scheduler runs every reconcile.every (the clock is moved, never waited on)
        metrics = scrape(daemon)
        assert metrics["claude_reconcile_last_success_timestamp_seconds", ()] == NOW.timestamp()
        assert metrics["claude_reconcile_day_timestamp_seconds", ()] == datetime(2026, 11, 24, tzinfo=UTC).timestamp()
        # (5.02 - 5.00) / 5.02
        assert metrics["claude_reconcile_drift_ratio", (("model", "claude-haiku-4-5"),)] == pytest.approx(
            0.02 / 5.02, rel=1e-12
        )
        assert metrics["claude_reconcile_unlogged_requests", (("model", "claude-haiku-4-5"),)] == 1
        assert metrics["claude_reconcile_tolerance_ratio", ()] == 0.001
        assert metrics["claude_reconcile_interval_seconds", ()] == 6 * 3600
        assert metrics["claude_reconcile_enabled", ()] == 1

        # Anthropic away at the next run: the stored figures and the last success stay as they were.
        fake.close()
        clock.advance(hours=6)
        daemon.reconcile()
        assert scrape(daemon)["claude_reconcile_last_success_timestamp_seconds", ()] == NOW.timestamp()
        assert "task reconcile failed: AnalyticsError: cannot reach" in caplog.text

        host, port = daemon.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            exposition = response.read()
    finally:
        daemon.stop()
    assert b"claude_reconcile_drift_ratio" in exposition
    secret = ADMIN_KEY.encode()
    assert secret not in exposition
    assert ADMIN_KEY not in caplog.text
    for db_file in tmp_path.glob("monitor.db*"):
        assert secret not in db_file.read_bytes(), db_file.name


def test_only_the_leader_fetches(tmp_path: Path, fake: FakeAnalytics, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(tmp_path, fake.url)
    daemon = Daemon(load_settings(config, environ={}), clock=FakeClock(NOW), environ={"ANTHROPIC_ADMIN_KEY": ADMIN_KEY})
    monkeypatch.setattr(daemon.leadership, "is_leader", lambda: False)
    try:
        daemon.reconcile()
        assert fake.requests == []
        assert reconcile_tables(tmp_path / "monitor.db") == ([], [])
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


@pytest.mark.slow
def test_no_admin_key_no_job(tmp_path: Path) -> None:
    config = config_for(tmp_path, "http://127.0.0.1:9")
    daemon = Daemon(load_settings(config, environ={}), clock=FakeClock(NOW), environ={})
    try:
        daemon.start()
        assert daemon.scheduler.get_job("reconcile") is None
        assert daemon.scheduler.get_job("reconcile_metrics") is not None
        metrics = scrape(daemon)
        assert metrics["claude_reconcile_enabled", ()] == 0
        assert not any(name.startswith("claude_reconcile_drift") for name, _ in metrics)
    finally:
        daemon.stop()


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("reconcile:\n  every: 1m\n", 3, "reconcile.every: '1m' is shorter than 5m"),
        ("reconcile:\n  tolerance: 2\n", 3, "reconcile.tolerance"),
        ("reconcile:\n  base_url: api.anthropic.com\n", 3, "is not an http(s) URL with a host"),
        ("reconcile:\n  lookback_days: 40\n", 3, "reconcile.lookback_days"),
        ("reconcile:\n  admin_key_env: 'sk-ant-admin01-abc'\n", 3, "reconcile.admin_key_env"),
        (
            "reconcile:\n  api_keys:\n    apikey_01A: {project: x}\n    apikey_01B: {user: ann}\n",
            5,
            "reconcile.api_keys.apikey_01B.user: 'user' is not one of metrics.labels ['project', 'environment']: our "
            "daily figures are kept by metric label only",
        ),
        (
            "reconcile:\n  api_keys:\n    sk-ant-api03-secret: {project: x}\n",
            4,
            "reconcile.api_keys.<entry>: not an Anthropic API key id",
        ),
        (
            "reconcile:\n  api_keys:\n    apikey_01A: {project: x}\n    apikey_01B: {project: y, environment: prod}\n",
            5,
            "reconcile.api_keys.apikey_01B: maps environment, project where apikey_01A maps project: every key must "
            "map the same attributes",
        ),
        ("reconcile:\n  api_keys:\n    apikey_01A: {}\n", 4, "reconcile.api_keys.apikey_01A: maps to no attribute"),
        ("reconcile:\n  api_keys:\n    apikey_01A: {project: 7}\n", 4, "reconcile.api_keys.apikey_01A.project"),
    ],
)
def test_reconcile_config_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, expected: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert f"{path}:{line}: " in str(caught.value)
    assert expected in str(caught.value)
    assert "sk-ant-api03-secret" not in str(caught.value)  # a key pasted as an id is never echoed
