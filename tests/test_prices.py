"""The price table keeps up: `prices` lists it, `prices --check` asks Anthropic's Models API (a local fake speaking
its wire format) which models it cannot price, the daemon runs that check and exports the count, and events stored
while their model had no price are priced once it has one — through the rollup, budgets and counters, once.

Every dollar figure is worked out by hand in a comment beside it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.event import listen as event_listen

from monitor.config import load_settings
from monitor.ingest.files import ingest_files
from monitor.service import Daemon, open_store
from monitor.store.models import usage_rollup
from monitor.store.reprice import Repricer
from tests.conftest import FakeClock, jsonl, run_cli
from tests.fake_models import MODELS_PATH, FakeModels

# Runs the command line in processes and daemons with their worker: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

API_KEY = "sk-ant-api03-PricesTESTONLYnotarealkey0123456789abcdef"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # a Thursday

# What the fake account can call: newest first, as the API lists them. Every id here is in the shipped table, as an
# entry's name or one of its aliases.
PRICED = [
    ("claude-fable-5-1", "Claude Fable 5.1", "active"),
    ("claude-mythos-5", "Claude Mythos 5", "active"),
    ("claude-opus-5-5", "Claude Opus 5.5", "active"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "active"),
    ("claude-haiku-5-5-20261007", "Claude Haiku 5.5", "active"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "deprecated"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "active"),
    ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "deprecated"),
]


@pytest.fixture
def models() -> Iterator[FakeModels]:
    server = FakeModels(API_KEY)
    yield server
    server.close()


def write(path: Path, db: Path, text: str) -> Path:
    path.write_text(f"database_url: sqlite:///{db}\nsources: []\n{text}", encoding="utf-8")
    return path


def check_config(tmp_path: Path, base_url: str) -> Path:
    return write(tmp_path / "check.yaml", tmp_path / "monitor.db", f"pricing: {{check: {{base_url: '{base_url}'}}}}\n")


# --- prices: the table as it is ------------------------------------------------------------------------------------


def test_prices_lists_names_aliases_dated_rates_modifiers_and_source(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        tmp_path / "monitor.db",
        "pricing:\n  models:\n    claude-nova-6:\n      aliases: [claude-nova-6-20261101]\n"
        "      source: our contract, 2026-11-01\n      rates:\n"
        "        - {since: 2026-11-01, input: 2, output: 10, cache_write_5m: 2.5, cache_write_1h: 4,"
        " cache_read: 0.2}\n",
    )
    document = run_cli("prices", "--config", str(config), "--format", "json").json()
    assert document["version"] == "2026.12.02+config"
    by_name = {model["name"]: model for model in document["models"]}
    assert by_name["claude-3-opus-20240229"] == {
        "name": "claude-3-opus-20240229",
        "aliases": ["claude-3-opus-latest"],
        "origin": "shipped",
        "source": "https://platform.claude.com/docs/en/about-claude/pricing, checked 2026-12-02",
        "rates": [
            {
                "since": "2024-02-29",
                "input": "15",
                "output": "75",
                "cache_write_5m": "18.75",
                "cache_write_1h": "30",
                "cache_read": "1.5",
                "web_search_per_1k": "10",
                "modifiers": {},
            }
        ],
    }
    assert by_name["claude-sonnet-4-6"]["rates"][0]["modifiers"] == {"geo_multipliers": {"us": "1.1"}}
    assert by_name["claude-opus-4-8"]["rates"][0]["modifiers"] == {
        "fast_multiplier": "2",
        "geo_multipliers": {"us": "1.1"},
    }
    assert [r["since"] for r in by_name["claude-sonnet-5-5"]["rates"]] == ["2026-01-01", "2026-10-07"]
    assert by_name["claude-sonnet-4-5"]["rates"][0]["modifiers"]["long_prompt"]["threshold_tokens"] == 200000
    assert by_name["claude-mythos-5"]["aliases"] == [] and by_name["claude-mythos-5"]["rates"][0]["cache_read"] == "1"
    assert (
        by_name["claude-nova-6"]["origin"] == "config"
        and by_name["claude-nova-6"]["source"] == "our contract, 2026-11-01"
    )

    table = run_cli("prices", "--config", str(config)).stdout
    assert "claude-3-7-sonnet-20250219: aliases claude-3-7-sonnet-latest; source: https://platform.claude.com" in table
    line = next(row for row in table.splitlines() if row.startswith("claude-opus-4-6 "))
    assert line.split() == [
        "claude-opus-4-6",
        "2026-01-01",
        "5",
        "25",
        "6.25",
        "10",
        "0.5",
        "fast",
        "x6,",
        "us",
        "x1.1",
    ]


# --- prices --check: against the Models API ---------------------------------------------------------------------


def test_check_reports_a_listed_model_the_table_misses_with_the_ids_it_tried(
    tmp_path: Path, models: FakeModels
) -> None:
    # Two unknown models among the priced ones, three to a page: the client follows has_more / last_id.
    models.models = [
        ("claude-nova-6-20261120", "Claude Nova 6", "active"),
        *PRICED[:4],
        ("claude-haiku-4.5", "A misspelt id", "active"),
        *PRICED[4:],
    ]
    models.page_size = 3
    run = run_cli(
        "prices", "--check", "--config", str(check_config(tmp_path, models.url)), "--format", "json",
        env={"ANTHROPIC_API_KEY": API_KEY}, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    document = run.json()
    assert document["listed"] == 10
    assert document["missing"] == [
        {
            "id": "claude-nova-6-20261120",
            "display_name": "Claude Nova 6",
            "lifecycle": "active",
            "priced_as": None,
            "tried": ["claude-nova-6-20261120", "claude-nova-6"],  # the id, then without its date
            "nearest": document["missing"][0]["nearest"],  # a spelling hint only
        },
        {
            "id": "claude-haiku-4.5",
            "display_name": "A misspelt id",
            "lifecycle": "active",
            "priced_as": None,
            "tried": ["claude-haiku-4.5"],
            "nearest": "claude-haiku-4-5",
        },
    ]
    priced = {m["id"]: m["priced_as"] for m in document["models"] if m["priced_as"]}
    assert priced["claude-haiku-5-5-20261007"] == "claude-haiku-5-5"  # a dated id, by its alias
    assert priced["claude-mythos-5"] == "claude-mythos-5"
    assert priced["claude-3-7-sonnet-20250219"] == "claude-3-7-sonnet-20250219"
    # Four pages of 3, 3, 3 and 1, each asked for after the last id of the one before.
    seen = [s for s in models.requests if s.path == MODELS_PATH]
    assert [s.query.get("after_id") for s in seen] == [
        None,
        ["claude-mythos-5"],  # page 1: nova-6, fable-5-1, mythos-5
        ["claude-haiku-4.5"],  # page 2: opus-5-5, sonnet-5-5, haiku-4.5
        ["claude-haiku-4-5-20251001"],  # page 3: haiku-5-5, sonnet-4-6, haiku-4-5; page 4: 3-7-sonnet, has_more false
    ]
    for request in seen:
        assert request.headers.get("authorization") == f"Bearer {API_KEY}"

    text = run_cli(
        "prices", "--check", "--config", str(check_config(tmp_path, models.url)),
        env={"ANTHROPIC_API_KEY": API_KEY}, check=False,
    )  # fmt: skip
    assert text.returncode == 1
    assert "MISSING  claude-nova-6-20261120 (active): tried claude-nova-6-20261120, claude-nova-6" in text.stdout
    assert "pricing.models" in text.stdout
    for out in (run.stdout, run.stderr, text.stdout, text.stderr):
        assert API_KEY not in out


def test_check_exits_0_when_every_listed_model_is_priced(tmp_path: Path, models: FakeModels) -> None:
    models.models = list(PRICED)
    models.page_size = 5
    run = run_cli(
        "prices", "--check", "--config", str(check_config(tmp_path, models.url)), "--format", "json",
        env={"ANTHROPIC_API_KEY": API_KEY},
    )  # fmt: skip
    document = run.json()
    assert (run.returncode, document["listed"], document["missing"]) == (0, 8, [])
    assert [s.query.get("after_id") for s in models.requests] == [None, ["claude-haiku-5-5-20261007"]]
    assert API_KEY not in run.stdout + run.stderr


def test_check_exits_4_when_the_api_is_unreachable_or_refuses_the_key(tmp_path: Path, models: FakeModels) -> None:
    models.models = list(PRICED)
    refused = run_cli(
        "prices", "--check", "--config", str(check_config(tmp_path, models.url)),
        env={"ANTHROPIC_API_KEY": "sk-ant-api03-wrong-key-000000"}, check=False,
    )  # fmt: skip
    assert refused.returncode == 4
    assert "answered 401" in refused.stderr and "the key was refused" in refused.stderr
    assert "sk-ant-api03-wrong-key-000000" not in refused.stdout + refused.stderr
    url = models.url
    models.close()  # nothing listens there any more
    gone = run_cli(
        "prices", "--check", "--config", str(check_config(tmp_path, url)),
        env={"ANTHROPIC_API_KEY": API_KEY}, check=False,
    )  # fmt: skip
    assert gone.returncode == 4, gone.stderr
    assert "cannot reach Anthropic's Models API" in gone.stderr
    assert API_KEY not in gone.stdout + gone.stderr
    no_key = run_cli("prices", "--check", "--config", str(check_config(tmp_path, url)), check=False)
    assert no_key.returncode == 2 and "$ANTHROPIC_API_KEY" in no_key.stderr


# --- the daemon's scheduled check ---------------------------------------------------------------------------------


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def daemon_config(tmp_path: Path, extra: str = "") -> Path:
    return write(
        tmp_path / "serve.yaml",
        tmp_path / "monitor.db",
        f"http: {{listen: '127.0.0.1:0'}}\nthrottle: {{snapshot_file: {tmp_path}/throttle.json}}\n{extra}",
    )


def test_daemon_checks_on_its_schedule_and_exports_the_missing_count(
    tmp_path: Path, models: FakeModels, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    models.models = [("claude-nova-6", "Claude Nova 6", "active"), *PRICED]
    models.page_size = 4
    config = daemon_config(tmp_path, f"pricing: {{check: {{base_url: '{models.url}', every: 12h}}}}\n")
    daemon = Daemon(load_settings(config, environ={}), clock=FakeClock(NOW), environ={"ANTHROPIC_API_KEY": API_KEY})
    try:
        daemon.start()
        job = daemon.scheduler.get_job("price_check")
        assert job is not None and job.trigger.interval == timedelta(hours=12)
        assert ("claude_monitor_price_table_missing_models", ()) not in scrape(daemon)  # no check run yet
        daemon.price_check()  # what the scheduler runs every pricing.check.every
        assert scrape(daemon)["claude_monitor_price_table_missing_models", ()] == 1
        assert "cannot price 1 model(s) the account can call: claude-nova-6" in caplog.text
        models.models = list(PRICED)
        daemon.price_check()
        assert scrape(daemon)["claude_monitor_price_table_missing_models", ()] == 0
        models.close()  # Anthropic away: logged, the last count stays
        daemon.price_check()
        assert scrape(daemon)["claude_monitor_price_table_missing_models", ()] == 0
        assert "task price_check failed: cannot reach Anthropic's Models API" in caplog.text
    finally:
        daemon.stop()
    assert API_KEY not in caplog.text


def test_daemon_without_a_key_schedules_no_check(tmp_path: Path) -> None:
    daemon = Daemon(load_settings(daemon_config(tmp_path), environ={}), clock=FakeClock(NOW), environ={})
    try:
        daemon.start()
        assert daemon.scheduler.get_job("price_check") is None
        assert ("claude_monitor_price_table_missing_models", ()) not in scrape(daemon)
    finally:
        daemon.stop()


def test_a_follower_does_not_check(tmp_path: Path, models: FakeModels, monkeypatch: pytest.MonkeyPatch) -> None:
    models.models = [("claude-nova-6", "Claude Nova 6", "active")]
    config = daemon_config(tmp_path, f"pricing: {{check: {{base_url: '{models.url}'}}}}\n")
    daemon = Daemon(load_settings(config, environ={}), clock=FakeClock(NOW), environ={"ANTHROPIC_API_KEY": API_KEY})
    monkeypatch.setattr(daemon.leadership, "is_leader", lambda: False)
    try:
        daemon.price_check()
        assert models.requests == [] and daemon.price_table_missing is None
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


# --- re-pricing stored unpriced events -------------------------------------------------------------------------------

# claude-nova-6 is unknown to the shipped table; the second config prices it (USD per million tokens):
# in 2, out 10, 5m write 2.5, 1h write 4, read 0.2, from 2026-11-01, and knows its dated id as an alias.
NOVA = (
    "pricing:\n  models:\n    claude-nova-6:\n      aliases: [claude-nova-6-20261101]\n      rates:\n"
    "        - {since: 2026-11-01, input: 2, output: 10, cache_write_5m: 2.5, cache_write_1h: 4, cache_read: 0.2}\n"
)
BUDGETS = (
    "dimensions: [project, user]\nmetrics: {labels: [project]}\nbudgets:\n"
    "  - {name: lingo-week, match: {project: lingo}, window: 'rolling:7d', limit_usd: 100}\n"
    "  - {name: by-model, per: model, window: 'rolling:7d', limit_usd: 50}\n"
)


def usage_events(day: datetime) -> list[dict[str, Any]]:
    """Three claude-nova-6 events (two by its dated id), one Haiku 4.5 event, one of a model no config prices."""
    at = [(day + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ") for h in range(5)]
    lingo = {"project": "lingo", "user": "u-1"}
    return [
        {
            "request_id": "nova-1",
            "timestamp": at[0],
            "model": "claude-nova-6-20261101",
            "attributes": lingo,
            "usage": {
                "input_tokens": 100_000,
                "output_tokens": 20_000,
                "cache_creation_input_tokens": 15_000,
                "cache_creation": {"ephemeral_5m_input_tokens": 10_000, "ephemeral_1h_input_tokens": 5_000},
                "cache_read_input_tokens": 40_000,
            },
        },
        {
            "request_id": "nova-2",
            "timestamp": at[1],
            "model": "claude-nova-6-20261101",
            "attributes": lingo,
            "usage": {"input_tokens": 0, "output_tokens": 100_000},
        },
        {
            "request_id": "nova-3",
            "timestamp": at[2],
            "model": "claude-nova-6",
            "attributes": {"project": "other", "user": "u-2"},
            "usage": {"input_tokens": 1_000_000, "output_tokens": 0},
        },
        {
            "request_id": "haiku-1",
            "timestamp": at[3],
            "model": "claude-haiku-4-5",
            "attributes": lingo,
            "usage": {"input_tokens": 0, "output_tokens": 1_000_000},
        },
        {
            "request_id": "mystery-1",
            "timestamp": at[4],
            "model": "claude-mystery-1",
            "attributes": lingo,
            "usage": {"input_tokens": 1_000, "output_tokens": 0},
        },
    ]


# Hand-computed costs at the claude-nova-6 rates above:
#   nova-1: 0.1 M x 2 + 0.02 M x 10 + 0.01 M x 2.5 + 0.005 M x 4 + 0.04 M x 0.2
#         = 0.2 + 0.2 + 0.025 + 0.02 + 0.008 = 0.453
#   nova-2: 0.1 M output x 10 = 1.0
#   nova-3: 1 M input x 2 = 2.0
#   claude-nova-6 in all: 0.453 + 1.0 + 2.0 = 3.453; of it project lingo 0.453 + 1.0 = 1.453, project other 2.0
#   haiku-1 (Haiku 4.5, out 5 /M): 1 M x 5 = 5.0, priced at ingest
NOVA_USD = Decimal("3.453")


def report(config: Path, since: str, until: str) -> dict[str, Any]:
    run = run_cli(
        "report", "--config", str(config), "--since", since, "--until", until, "--by", "model", "--format", "json"
    )
    result: dict[str, Any] = run.json()
    return result


def budgets(config: Path) -> dict[tuple[str, str], str]:
    rows = run_cli("budgets", "--config", str(config), "--format", "json").json()
    return {(row["budget"], json.dumps(row["scope"], sort_keys=True)): row["spend_usd"] for row in rows}


def test_reprice_command_prices_stored_unpriced_events_once(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    before_config = write(tmp_path / "before.yaml", db, BUDGETS)
    after_config = write(tmp_path / "after.yaml", db, BUDGETS + NOVA)
    # Stamped two days ago, inside the budgets' rolling 7-day windows whatever day the test runs on (`budgets` reads
    # the real clock).
    day = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    since, until = day.strftime("%Y-%m-%d"), (day + timedelta(days=1)).strftime("%Y-%m-%d")
    events_file = jsonl(tmp_path / "usage.jsonl", *usage_events(day))
    ingested = run_cli("ingest", "--config", str(before_config), str(events_file), "--format", "json").json()
    assert (ingested["accepted"], ingested["unpriced"]) == (5, 4)

    before = report(before_config, since, until)
    rows = {row["model"]: row for row in before["rows"]}
    assert before["total_usd"] == "5.000000"  # Haiku's 5.0 only
    assert (rows["claude-nova-6-20261101"]["unpriced_requests"], rows["claude-nova-6"]["unpriced_requests"]) == (2, 1)
    assert rows["claude-nova-6"]["cost_usd"] == "0.000000"

    first = run_cli("reprice", "--config", str(after_config), "--format", "json").json()
    assert first == {
        "repriced": 3,
        "cost_usd": "3.453000",  # 0.453 + 1.0 + 2.0
        "models": {"claude-nova-6": {"events": 3, "cost_usd": "3.453000"}},
        "unpriced_left": 1,  # claude-mystery-1: nothing prices it
    }
    after = report(after_config, since, until)
    rows = {row["model"]: row for row in after["rows"]}
    assert after["total_usd"] == "8.453000"  # 5.0 + 3.453
    nova = rows["claude-nova-6"]
    assert (nova["requests"], nova["unpriced_requests"], nova["cost_usd"]) == (3, 0, "3.453000")
    # Tokens moved with the requests: 100,000 + 0 + 1,000,000 input; 20,000 + 100,000 output.
    assert (nova["input_tokens"], nova["output_tokens"], nova["cache_read_tokens"]) == (1_100_000, 120_000, 40_000)
    assert "claude-nova-6-20261101" not in rows  # its emptied unpriced rows are gone
    assert rows["claude-mystery-1"]["unpriced_requests"] == 1

    spend = budgets(after_config)
    assert spend["lingo-week", '{"project": "lingo"}'] == "6.453000"  # 5.0 + 0.453 + 1.0
    assert spend["by-model", '{"model": "claude-nova-6"}'] == "3.453000"  # the dated id's scope moved here
    assert spend.get(("by-model", '{"model": "claude-nova-6-20261101"}'), "0.000000") == "0.000000"

    second = run_cli("reprice", "--config", str(after_config), "--format", "json").json()
    assert second == {"repriced": 0, "cost_usd": "0.000000", "models": {}, "unpriced_left": 1}
    assert report(after_config, since, until) == after  # nothing counted twice

    connection = sqlite3.connect(db)
    try:
        stored = dict(connection.execute("SELECT request_id, cost_pico FROM events WHERE model = 'claude-nova-6'"))
        versions = {v for (v,) in connection.execute("SELECT price_version FROM events WHERE model = 'claude-nova-6'")}
    finally:
        connection.close()
    # In pico-dollars (10^-12 USD): 0.453, 1.0 and 2.0 USD.
    assert stored == {"nova-1": 453_000_000_000, "nova-2": 1_000_000_000_000, "nova-3": 2_000_000_000_000}
    assert len(versions) == 1 and next(iter(versions)).endswith(":claude-nova-6@2026-11-01")


def test_the_daemon_reprices_at_start_through_budgets_and_metrics_once(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    day = datetime(2026, 11, 24, tzinfo=UTC)  # this month and this week at NOW
    events_file = jsonl(tmp_path / "usage.jsonl", *usage_events(day))
    serve = "http: {listen: '127.0.0.1:0'}\nthrottle: {snapshot_file: " + str(tmp_path / "throttle.json") + "}\n"
    before_config = write(tmp_path / "before.yaml", tmp_path / "monitor.db", serve + BUDGETS)
    after_config = write(tmp_path / "after.yaml", tmp_path / "monitor.db", serve + BUDGETS + NOVA)

    def run_daemon(config: Path, ingest: bool = False) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={})
        try:
            if ingest:
                ingest_files([events_file], daemon.store.parser, daemon.ingestor)
            daemon.start()
            return scrape(daemon)
        finally:
            daemon.stop()

    def cost(model: str, project: str) -> float | None:
        return metrics.get(("claude_cost_usd_total", (("model", model), ("project", project))))

    metrics = before = run_daemon(before_config, ingest=True)
    assert cost("claude-haiku-4-5", "lingo") == 5.0
    assert cost("claude-nova-6", "lingo") is None and cost("claude-nova-6", "other") is None
    assert before["claude_requests_total", (("model", "unpriced"), ("project", "lingo"))] == 3  # nova-1, -2, mystery
    assert before["claude_budget_spend_usd", (("budget", "lingo-week"), ("scope", "project=lingo"))] == 5.0
    assert before["claude_monitor_unpriced_events_total", (("model", "claude-nova-6-20261101"),)] == 2

    metrics = after = run_daemon(after_config)  # the table now prices claude-nova-6: the leader re-prices at start
    assert cost("claude-nova-6", "lingo") == pytest.approx(1.453, abs=1e-12)  # 0.453 + 1.0
    assert cost("claude-nova-6", "other") == 2.0
    assert cost("claude-haiku-4-5", "lingo") == 5.0
    assert after["claude_monitor_repriced_events_total", (("model", "claude-nova-6"),)] == 3
    # 5.0 + 0.453 + 1.0: the first evaluation after start already holds the re-priced spend.
    assert after["claude_budget_spend_usd", (("budget", "lingo-week"), ("scope", "project=lingo"))] == pytest.approx(
        6.453, abs=1e-12
    )
    # Counters never go down: the requests and unpriced events stay where they were counted.
    assert after["claude_requests_total", (("model", "unpriced"), ("project", "lingo"))] == 3
    assert after["claude_monitor_unpriced_events_total", (("model", "claude-nova-6-20261101"),)] == 2

    metrics = again = run_daemon(after_config)  # a restart: nothing left to re-price, nothing counted twice
    assert {k: v for k, v in again.items() if "cost" in k[0] or "repriced" in k[0] or "spend" in k[0]} == {
        k: v for k, v in after.items() if "cost" in k[0] or "repriced" in k[0] or "spend" in k[0]
    }
    assert cost("claude-nova-6", "lingo") == pytest.approx(1.453, abs=1e-12)


def test_on_postgres_two_passes_at_once_price_each_event_once_under_capped_labels(tmp_path: Path, pg_url: str) -> None:
    # One project value admitted (lingo, the first seen): project "other" is counted under __other__, and the pass
    # must take nova-3 from that row, not from one it was never in.
    capped = BUDGETS.replace("metrics: {labels: [project]}", "metrics: {labels: [project], max_values_per_label: 1}")
    before = (
        write(tmp_path / "before.yaml", tmp_path / "unused.db", capped)
        .read_text()
        .replace(f"sqlite:///{tmp_path / 'unused.db'}", pg_url)
    )
    (tmp_path / "before.yaml").write_text(before)
    (tmp_path / "after.yaml").write_text(before + NOVA)
    clock = FakeClock(NOW)
    store = open_store(load_settings(tmp_path / "before.yaml", environ={}), clock=clock)
    try:
        ingest_files([jsonl(tmp_path / "u.jsonl", *usage_events(datetime(2026, 11, 24, tzinfo=UTC)))],
                     store.parser, store.ingestor)  # fmt: skip
    finally:
        store.close()
    store = open_store(load_settings(tmp_path / "after.yaml", environ={}), clock=clock)
    try:
        settings = store.settings

        def repricer() -> Repricer:
            return Repricer(
                store.engine, store.prices, budgets=store.budgets.index, zone=settings.zone,
                metric_labels=settings.metrics.labels, batch_size=1,
            )  # fmt: skip

        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(repricer().run())) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(results) == 2
        assert sorted(r.repriced for r in results) in ([0, 3], [1, 2])  # however they interleave: 3 in all
        assert sum(r.cost_pico for r in results) == 3_453_000_000_000  # 0.453 + 1.0 + 2.0 USD in pico-dollars
        with store.engine.connect() as connection:
            rows: dict[tuple[str, str], tuple[int, ...]] = {}
            for row in connection.execute(select(usage_rollup)):  # summed over the 15-minute buckets
                counts = (row.requests, row.input, row.output, row.cost_pico, row.unpriced_requests)
                was = rows.get((row.model, row.labels), (0,) * 5)
                rows[row.model, row.labels] = tuple(a + b for a, b in zip(was, counts, strict=True))
    finally:
        store.close()
    assert rows == {
        # nova-1 + nova-2: in 100,000 + 0, out 20,000 + 100,000; 0.453 + 1.0 USD
        ("claude-nova-6", '{"project":"lingo"}'): (2, 100_000, 120_000, 1_453_000_000_000, 0),
        # nova-3, counted under __other__ (the cap): in 1,000,000; 2.0 USD
        ("claude-nova-6", '{"project":"__other__"}'): (1, 1_000_000, 0, 2_000_000_000_000, 0),
        ("claude-haiku-4-5", '{"project":"lingo"}'): (1, 0, 1_000_000, 5_000_000_000_000, 0),  # out 1 M x 5
        ("claude-mystery-1", '{"project":"lingo"}'): (1, 1_000, 0, 0, 1),  # still unpriced
    }


def test_reprice_reads_only_events_it_can_price_and_the_label_gate_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "monitor.db"
    before = write(tmp_path / "before.yaml", db, "metrics: {labels: [project]}\n")
    after = write(tmp_path / "after.yaml", db, "metrics: {labels: [project]}\n" + NOVA)

    def event(request_id: str, model: str, day: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "timestamp": f"{day}T10:00:00Z",
            "model": model,
            "attributes": {"project": "lingo"},
            "usage": {"input_tokens": 0, "output_tokens": 100_000},
        }

    backlog = [event(f"mystery-{n}", "claude-mystery-1", "2026-11-24") for n in range(40)]  # nothing prices it
    early = [event(f"early-{n}", "claude-nova-6", "2026-10-30") for n in range(3)]  # before its first rate, 11-01
    nova = [event(f"nova-{n}", "claude-nova-6", "2026-11-24") for n in range(5)]
    store = open_store(load_settings(before, environ={}), clock=FakeClock(NOW))
    try:
        ingest_files([jsonl(tmp_path / "u.jsonl", *backlog[:20], *early, *nova, *backlog[20:])],
                     store.parser, store.ingestor)  # fmt: skip
    finally:
        store.close()

    store = open_store(load_settings(after, environ={}), clock=FakeClock(NOW))
    statements: list[tuple[str, Any]] = []
    handed: list[list[str]] = []
    batch_of = Repricer._batch_of

    def spy(self: Repricer, connection: Any, rows: Any, *args: Any) -> None:
        handed.append([row.request_id for row in rows])
        batch_of(self, connection, rows, *args)

    monkeypatch.setattr(Repricer, "_batch_of", spy)
    try:
        event_listen(store.engine, "before_cursor_execute", lambda *a: statements.append((a[2], a[3])))
        repricer = Repricer(store.engine, store.prices, metric_labels=["project"], batch_size=2)
        result = repricer.run()
        batches = [(sql, params) for sql, params in statements if "FROM events" in sql and "ORDER BY" in sql]
        gate_reads = [sql for sql, _params in statements if "FROM label_values" in sql]
        with store.engine.connect() as connection:
            plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + batches[0][0],
                                                                              batches[0][1]))  # fmt: skip
        first_handed = list(handed)
        statements.clear()
        handed.clear()
        again = repricer.run()
    finally:
        store.close()

    # Five events of $1 (100,000 output tokens at $10 per million); the 40 unknown and the 3 early ones stay unpriced.
    assert (result.repriced, result.cost_pico, result.unpriced_left) == (5, 5_000_000_000_000, 43)
    # Batches of 2, 2 and 1, then one empty read: each event read once, none that cannot be priced.
    assert first_handed == [["nova-0", "nova-1"], ["nova-2", "nova-3"], ["nova-4"]]
    assert len(batches) == 4
    assert all("claude-mystery-1" not in repr(params) for _sql, params in batches)
    assert "ix_events_unpriced_model_id" in plan  # one model's unpriced rows, found on the partial index
    assert len(gate_reads) == 1  # once for the pass, not once a batch ("lingo" and the model id are admitted)
    assert (again.repriced, again.unpriced_left) == (0, 43) and handed == []
    assert len([sql for sql, _params in statements if "FROM events" in sql and "ORDER BY" in sql]) == 1
