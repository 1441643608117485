"""Schema under Alembic: upgrade to head from the repo root, no drift between models and migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_config

pytest_plugins = ["tests.pg"]

# Runs the command line in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow


def alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLAUDE_MONITOR_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_upgrade_head_then_check_reports_no_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade = alembic("upgrade", "head", url=url)
    assert upgrade.returncode == 0, upgrade.stderr
    check = alembic("check", url=url)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for step in (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head")):
        result = alembic(*step, url=url)
        assert result.returncode == 0, result.stderr
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "x.db").execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"events", "dead_letters", "alembic_version"} <= tables


def test_migrate_command_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run_cli("migrate", "--config", str(config))
    run_cli("migrate", "--config", str(config))
    connection = sqlite3.connect(tmp_path / "monitor.db")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    heads = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    scripts = sorted(p.name for p in (REPO / "migrations" / "versions").glob("0*.py"))
    assert len(heads) == 1 and scripts[-1].startswith(heads[0])


PERIODS_CONFIG = """\
timezone: UTC
budgets:
  - {name: daily, match: {project: lingo}, per: user, window: day, limit_usd: 1, throttle_at: 1.0}
  - {name: hourly, match: {project: lingo}, per: user, window: 'rolling:1h', limit_usd: 1, throttle_at: 1.0}
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'monitor.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_budget_usage_stored_before_periods_is_read_added_to_and_merged_back(tmp_path: Path, database_url: str) -> None:
    """Rows written before budget_usage had periods (keyed budget, scope, bucket) keep counting after the upgrade:
    read in every window total, added to by new events under the new key, and summed back on a downgrade."""
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, text

    from monitor.budgets import compile_budgets
    from monitor.config import load_settings
    from monitor.ingest.parse import EventParser
    from monitor.service import build_price_table, open_store
    from monitor.store.queries import scope_buckets, scope_totals

    config = tmp_path / "claude-monitor.yaml"
    config.write_text(f"database_url: {database_url}\n{PERIODS_CONFIG}", encoding="utf-8")
    sqlite = database_url.startswith("sqlite")

    def stamp(value: str) -> object:  # a naive UTC time as each database stores the models' datetimes
        return f"{value}.000000" if sqlite else datetime.fromisoformat(value)

    def shown(value: object) -> str:
        return str(value)[:19]

    def rows(sql: str) -> list[tuple[object, ...]]:
        engine = create_engine(database_url)
        try:
            with engine.connect() as connection:
                return sorted(tuple(row) for row in connection.execute(text(sql)))
        finally:
            engine.dispose()

    assert alembic("upgrade", "0013", url=database_url).returncode == 0
    loaded = load_settings(config, environ={})
    definitions = {b.name: b.definition for b in compile_budgets(loaded.settings.budgets, build_price_table(loaded))}
    now = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
    key = '{"project":"lingo","user":"u-1"}'
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:  # as the build before periods wrote them: $0.40 each, one request
            for name, bucket in (("daily", "2026-11-26 00:00:00"), ("hourly", "2026-11-26 12:10:00")):
                connection.execute(
                    text("INSERT INTO budget_usage VALUES (:name, :key, :bucket, 1, 0, 80000, 0, 0, 0, 400000000000)"),
                    {"name": name, "key": key, "bucket": stamp(bucket)},
                )
                connection.execute(
                    text("INSERT INTO budget_definitions VALUES (:name, :definition, :since, :since)"),
                    {"name": name, "definition": definitions[name], "since": stamp("2026-11-01 00:00:00")},
                )
    finally:
        engine.dispose()
    upgraded = alembic("upgrade", "head", url=database_url)
    assert upgraded.returncode == 0, upgraded.stderr

    store = open_store(loaded, clock=lambda: now)
    try:
        assert store.budgets.apply_definitions() == []  # counted already: nothing recounted, nothing dropped
        line = (
            '{"request_id": "r-1", "timestamp": "2026-11-26T12:20:00Z", "model": "claude-haiku-4-5", '
            '"usage": {"input_tokens": 0, "output_tokens": 120000}, "attributes": {"project": "lingo", "user": "u-1"}}'
        )
        parser = EventParser(loaded.settings.dimensions, lambda: now)
        # 120,000 output tokens at $5 per million: $0.60, on top of the $0.40 stored before: $1.00, the limit.
        result = store.writer.write([("x:1", parser.parse_line(line, now))], "test")
        assert {name: usage.cost_pico for (name, _), usage in result.touched.items()} == {
            "daily": 1_000_000_000_000,
            "hourly": 1_000_000_000_000,
        }
        assert store.budgets.on_batch(result.touched)  # both throttle: the stored rows count
        store.budgets.evaluate()
        spend = {name: summary.states[key].usage.cost_pico for name, summary in store.budgets.summaries.items()}
        assert spend == {"daily": 1_000_000_000_000, "hourly": 1_000_000_000_000}, spend
        assert {name for name, _ in store.budgets.throttle.flags} == {"daily", "hourly"}
        with store.engine.connect() as connection:
            day = datetime(2026, 11, 26, tzinfo=UTC)
            assert scope_totals(connection, "daily", [key], day, datetime(2026, 11, 27, tzinfo=UTC))[key].requests == 2
            first = datetime(2026, 11, 26, 11, 30, tzinfo=UTC)
            buckets = [(b.strftime("%H:%M"), u.requests) for b, u in scope_buckets(connection, "hourly", key, first)]
            assert buckets == [("12:10", 1), ("12:20", 1)]
    finally:
        store.close()
    # On SQLite the calendar budget's new row went in under its window's start, next to the one stored before; on
    # PostgreSQL every row is under 1970-01-01, so it added to the stored one.
    periods = [
        (name, shown(period), shown(bucket), requests)
        for name, period, bucket, requests in rows("SELECT budget, period, bucket_start, requests FROM budget_usage")
    ]
    daily = (
        [
            ("daily", "1970-01-01 00:00:00", "2026-11-26 00:00:00", 1),
            ("daily", "2026-11-26 00:00:00", "2026-11-26 00:00:00", 1),
        ]
        if sqlite
        else [("daily", "1970-01-01 00:00:00", "2026-11-26 00:00:00", 2)]
    )
    assert periods == [
        *daily,
        ("hourly", "1970-01-01 00:00:00", "2026-11-26 12:10:00", 1),
        ("hourly", "1970-01-01 00:00:00", "2026-11-26 12:20:00", 1),
    ]
    downgraded = alembic("downgrade", "0013", url=database_url)
    assert downgraded.returncode == 0, downgraded.stderr
    merged = [
        (name, shown(bucket), *figures)
        for name, bucket, *figures in rows("SELECT budget, bucket_start, requests, output, cost_pico FROM budget_usage")
    ]
    assert merged == [
        ("daily", "2026-11-26 00:00:00", 2, 200000, 1_000_000_000_000),
        ("hourly", "2026-11-26 12:10:00", 1, 80000, 400_000_000_000),
        ("hourly", "2026-11-26 12:20:00", 1, 120000, 600_000_000_000),
    ]
