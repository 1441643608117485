"""The retention job: raw events and dead letters past `retention_days` go; budget buckets a window still needs stay."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from monitor.config import load_settings
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config


def test_retention_drops_old_rows_and_keeps_what_windows_need(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 11, 26, 12, tzinfo=UTC))
    config = write_config(
        tmp_path,
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {tmp_path / 'throttle.json'}}}\n"
        "schedule: {retention_days: 30}\n"
        "budgets:\n  - {name: m, window: month, limit_usd: 100}\n",
    )
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={})
    try:
        daemon.budgets.sync_definitions()
        lines = []
        for request_id, age_days in (("10d", 10), ("29d", 29), ("45d", 45), ("80d", 80)):
            when = clock.now - timedelta(days=age_days)
            lines.append(
                (
                    "t",
                    daemon.store.parser.parse_object(
                        {
                            "request_id": request_id,
                            "timestamp": when.isoformat(),
                            "model": "claude-haiku-4-5",
                            "usage": {"output_tokens": 1000},
                        }
                    ),
                )
            )
        lines.append(("t", daemon.store.parser.parse_line("not json")))
        daemon.store.writer.write(lines, "test")
        database = sqlite3.connect(tmp_path / "monitor.db")
        daemon.retention()
        # Raw events younger than 30 days stay: 16 Nov and 28 Oct; 12 Oct and 7 Sep go.
        assert {row[0] for row in database.execute("SELECT request_id FROM events")} == {"10d", "29d"}
        # Month buckets (UTC) on or after now - 2 x 32 days = 23 Sep stay: Oct and Nov; Sep goes.
        buckets = sorted(row[0][:10] for row in database.execute("SELECT bucket_start FROM budget_usage"))
        assert buckets == ["2026-10-01", "2026-11-01"]
        assert database.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 1
        clock.advance(days=31)  # the dead letter is 31 days old now
        daemon.retention()
        assert database.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()
