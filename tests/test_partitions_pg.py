"""PostgreSQL's events table: month partitions, request_id exactly once across months, retention by partition, and
the migration of an existing unpartitioned table with its rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from monitor.config import load_settings
from monitor.service import Daemon
from monitor.store.partitions import PartitionWindow, drop_expired_events, insert_new_events, prepare_partitions
from tests.conftest import FakeClock, run_cli
from tests.serve_harness import Serve
from tests.test_migrations import alembic
from tests.test_postgres import pg_config

# Starts PostgreSQL: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def rows(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows `query` returns, over a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query), params)]
    finally:
        engine.dispose()


def run(url: str, statement: str) -> None:
    """Run one statement and commit it."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def partitions(url: str) -> dict[str, int]:
    """Each partition of events and how many rows it holds."""
    names = [
        name
        for (name,) in rows(
            url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass",
        )
    ]
    return {name: rows(url, f"SELECT count(*) FROM {name}")[0][0] for name in sorted(names)}


def event(request_id: str, when: datetime, output_tokens: int = 1000, user: str = "u1") -> dict[str, Any]:
    return {
        "request_id": request_id,
        "timestamp": when.isoformat(),
        "model": "claude-haiku-4-5",
        "usage": {"output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user},
    }


def open_daemon(pg_url: str, directory: Path, schedule: str = "{retention_days: 30}", store: str = "{}") -> Daemon:
    """A daemon on `pg_url` at NOW (not started), with this `schedule:` and `store:`."""
    config = pg_config(
        directory,
        pg_url,
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {directory / 'throttle.json'}}}\n"
        f"schedule: {schedule}\nstore: {store}\n"
        "budgets:\n  - {name: monthly, window: month, limit_usd: 100}\n",
    )
    daemon = Daemon(load_settings(config, environ={}), clock=FakeClock(NOW), environ={})
    daemon.budgets.sync_definitions()
    return daemon


def close_daemon(daemon: Daemon) -> None:
    """Release what an unstarted daemon holds."""
    daemon.server.stop()  # never started: closes the listening socket
    daemon.leadership.release()
    daemon.admission.close()  # on PostgreSQL admission state has a connection pool of its own
    daemon.store.close()


@pytest.fixture
def daemon(pg_url: str, tmp_path: Path) -> Iterator[Daemon]:
    daemon = open_daemon(pg_url, tmp_path)
    try:
        yield daemon
    finally:
        close_daemon(daemon)


@pytest.fixture
def long_daemon(pg_url: str, tmp_path: Path) -> Iterator[Daemon]:
    """Raw events kept 1,100 days: at NOW every month from December 2023 on may get a partition."""
    daemon = open_daemon(pg_url, tmp_path, "{retention_days: 1100}")
    try:
        yield daemon
    finally:
        close_daemon(daemon)


def write(daemon: Daemon, *items: dict[str, Any]) -> tuple[int, int]:
    """Write one batch; (accepted, duplicates)."""
    result = daemon.store.writer.write([("t", daemon.store.parser.parse_object(item)) for item in items], "t")
    return result.accepted, result.duplicates


def test_a_request_id_is_stored_once_whatever_month_its_timestamps_are_in(daemon: Daemon, pg_url: str) -> None:
    october, november = datetime(2026, 10, 31, 23, 59, tzinfo=UTC), datetime(2026, 11, 1, 0, 1, tzinfo=UTC)
    assert write(daemon, event("a", october)) == (1, 0)
    # The same id again, its timestamp in the next month (another partition): a duplicate, in another batch ...
    assert write(daemon, event("a", november)) == (0, 1)
    # ... and within one batch, the first one kept.
    assert write(daemon, event("b", november), event("b", october)) == (1, 1)
    assert rows(pg_url, "SELECT request_id, ts FROM events ORDER BY request_id") == [
        ("a", october.replace(tzinfo=None)),
        ("b", november.replace(tzinfo=None)),
    ]
    assert rows(pg_url, "SELECT request_id, ts FROM event_ids ORDER BY request_id") == [
        ("a", october.replace(tzinfo=None)),
        ("b", november.replace(tzinfo=None)),
    ]
    assert partitions(pg_url)["events_p202610"] == 1 and partitions(pg_url)["events_p202611"] == 1
    # Rows handed to the COPY path with one id twice: stored once, the first row, and reported new once.
    now = NOW
    base = {
        "received_at": now,
        "source": "t",
        "model_id": "m",
        "model": "m",
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_5m_tokens": 0,
        "cache_write_1h_tokens": 0,
        "web_search_requests": 0,
        "web_fetch_requests": 0,
        "batch": False,
        "long_prompt": False,
        "service_tier": None,
        "speed": None,
        "inference_geo": None,
        "status": None,
        "latency_ms": None,
        "attributes": {},
        "cost_pico": None,
        "price_version": None,
    }
    with daemon.store.engine.begin() as connection:
        new = insert_new_events(
            connection,
            [
                {**base, "request_id": "c", "ts": october, "output_tokens": 1},
                {**base, "request_id": "c", "ts": november, "output_tokens": 2},
                {**base, "request_id": "a", "ts": november, "output_tokens": 3},
            ],
        )
    assert new == {"c"}
    assert rows(pg_url, "SELECT output_tokens, ts FROM events WHERE request_id = 'c'") == [
        (1, october.replace(tzinfo=None))
    ]


def test_a_month_without_a_partition_never_fails_an_insert(long_daemon: Daemon, pg_url: str) -> None:
    daemon = long_daemon
    march_2024 = datetime(2024, 3, 5, 8, tzinfo=UTC)
    # A backfill: the writer gives March 2024 its partition before the batch.
    assert write(daemon, event("old-1", march_2024), event("old-2", march_2024 + timedelta(days=1))) == (2, 0)
    found = partitions(pg_url)
    assert found["events_p202403"] == 2 and found["events_default"] == 0
    # The month is dropped behind the writer's back (retention of another replica) with its ids ...
    assert drop_expired_events(daemon.store.engine, datetime(2024, 4, 1, tzinfo=UTC)) == ["events_p202403"]
    assert rows(pg_url, "SELECT count(*) FROM event_ids") == [(0,)]
    # ... so its next March row goes to the default partition: stored, not refused.
    assert write(daemon, event("old-3", march_2024)) == (1, 0)
    assert partitions(pg_url)["events_default"] == 1
    # Retention deletes the default partition's rows before the cutoff one by one, with their ids.
    assert drop_expired_events(daemon.store.engine, datetime(2024, 4, 1, tzinfo=UTC)) == []
    assert partitions(pg_url)["events_default"] == 0
    assert rows(pg_url, "SELECT count(*) FROM event_ids") == [(0,)]
    assert write(daemon, event("old-4", march_2024)) == (1, 0)
    # The partition job: this month and the next two, and March 2024 again, its row moved out of the default one.
    created = prepare_partitions(daemon.store.engine, NOW, PartitionWindow(retention_days=1100))
    # (The migration made the server clock's month and the next one already: today's date decides which of
    # November, December and January the job had to create.)
    assert "events_p202403" in created
    assert set(created) <= {"events_p202403", "events_p202611", "events_p202612", "events_p202701"}
    found = partitions(pg_url)
    assert found["events_p202403"] == 1 and found["events_default"] == 0
    assert {"events_p202611", "events_p202612", "events_p202701"} <= set(found)
    assert prepare_partitions(daemon.store.engine, NOW, PartitionWindow(retention_days=1100)) == []  # idempotent
    assert write(daemon, event("old-4", march_2024)) == (0, 1)  # still exactly once after the move


def report(config: Path, since: str, until: str) -> dict[str, Any]:
    """`claude-monitor report` of [since, until) as JSON."""
    out = run_cli("report", "--config", str(config), "--since", since, "--until", until, "--format", "json")
    return dict(json.loads(out.stdout))


def test_retention_drops_whole_old_months_and_their_ids_and_keeps_rollups_and_reports(
    daemon: Daemon, pg_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "claude-monitor.yaml"
    # now 2026-11-26 12:00 UTC, retention 30 days: the cutoff is 2026-10-27 12:00.
    stored = {
        "sep": datetime(2026, 9, 10, 9, tzinfo=UTC),  # September ends before the cutoff: its partition goes
        "oct-early": datetime(2026, 10, 5, 9, tzinfo=UTC),  # before the cutoff, but October ends after it: kept
        "oct-late": datetime(2026, 10, 30, 9, tzinfo=UTC),
        "nov": datetime(2026, 11, 20, 9, tzinfo=UTC),
    }
    clock = daemon.clock
    assert isinstance(clock, FakeClock)
    for request_id, when in stored.items():
        clock.now = when + timedelta(minutes=5)  # each stored as it happened
        assert write(daemon, event(request_id, when)) == (1, 0)
    clock.now = NOW
    # A backfill older than retention: its month gets no partition, the row waits in the default one.
    assert write(daemon, event("2024", datetime(2024, 5, 1, tzinfo=UTC))) == (1, 0)
    found = partitions(pg_url)
    assert {"events_p202609", "events_p202610", "events_p202611"} <= set(found) and "events_p202405" not in found
    assert found["events_default"] == 1
    rollup = "SELECT * FROM usage_rollup WHERE bucket_start >= '2026-01-01' ORDER BY bucket_start"
    usage_rows = (
        "SELECT budget, scope, bucket_start, requests, cost_pico FROM budget_usage "
        "WHERE bucket_start >= '2026-10-01' ORDER BY bucket_start"
    )
    before_rollup = rows(pg_url, rollup)
    before_usage = rows(pg_url, usage_rows)
    september = report(config, "2026-09-01", "2026-10-01")
    # 1,000 output tokens of claude-haiku-4-5 at $5 per million: $0.005 per event.
    assert Decimal(september["total_usd"]) == Decimal("0.005")

    daemon.retention()

    found = partitions(pg_url)
    assert "events_p202405" not in found and "events_p202609" not in found
    assert found["events_p202610"] == 2 and found["events_p202611"] == 1 and found["events_default"] == 0
    expected = ["nov", "oct-early", "oct-late"]
    assert [r[0] for r in rows(pg_url, "SELECT request_id FROM events ORDER BY request_id")] == expected
    assert [r[0] for r in rows(pg_url, "SELECT request_id FROM event_ids ORDER BY request_id")] == expected
    # The rollup keeps every bucket of its own 400 days (the 2024 one is older); the month budget keeps October and
    # November.
    assert [r[0].month for r in before_rollup] == [9, 10, 10, 11]
    assert rows(pg_url, rollup) == before_rollup
    after_usage = rows(pg_url, usage_rows)
    assert after_usage == before_usage
    # October: oct-early + oct-late = 2 x 1,000 output tokens = 2 x $0.005; November: nov = $0.005.
    assert [(r[2].month, r[3], r[-1]) for r in after_usage] == [(10, 2, 10_000_000_000), (11, 1, 5_000_000_000)]
    assert report(config, "2026-09-01", "2026-10-01") == september  # September now read from the rollup alone
    # A September event sent again after its month is gone is new again, as on SQLite after its row is deleted.
    assert write(daemon, event("sep", stored["sep"])) == (1, 0)


# Raw events kept 400 days: at NOW (2026-11-26 12:00) the cutoff is 2025-10-22 12:00 (365 days back is
# 2025-11-26, 35 more 2025-10-22), so months from October 2025 to January 2027 (two ahead) may get a partition.
SPREAD = {
    "y1000": datetime(1000, 1, 1, tzinfo=UTC),
    "y1999": datetime(1999, 12, 31, 23, tzinfo=UTC),
    "y2020": datetime(2020, 5, 10, tzinfo=UTC),
    "sep-2025": datetime(2025, 9, 30, 12, tzinfo=UTC),  # the month before the window
    "oct-before": datetime(2025, 10, 20, tzinfo=UTC),  # in the window's first month, before the cutoff
    "oct-after": datetime(2025, 10, 25, tzinfo=UTC),  # after it
    **{
        f"m{year}{month:02d}": datetime(year, month, 10, tzinfo=UTC)
        for year, month in [(2025, 11), (2025, 12), *((2026, m) for m in range(1, 12))]
    },
}
WINDOW_MONTHS = [f"events_p2025{m}" for m in ("10", "11", "12")] + [f"events_p2026{m:02d}" for m in range(1, 12)]


def months_up_to_november_2026(found: dict[str, int]) -> dict[str, int]:
    """The month partitions of `found` up to November 2026: the migration and the job also make the months of the
    server's real clock (December 2026 on), which these tests do not choose."""
    return {name: rows for name, rows in found.items() if name != "events_default" and name <= "events_p202611"}


def test_a_batch_spread_over_many_months_creates_partitions_only_in_the_window_a_few_at_a_time(
    pg_url: str, tmp_path: Path
) -> None:
    daemon = open_daemon(pg_url, tmp_path, "{retention_days: 400}", "{max_new_partitions_per_batch: 4}")
    try:
        assert months_up_to_november_2026(partitions(pg_url)) == {}
        batch = [event(request_id, when) for request_id, when in SPREAD.items()]
        assert write(daemon, *batch) == (19, 0)
        # 14 of its months are in the window and none has a partition: the newest four get one.
        found = partitions(pg_url)
        assert months_up_to_november_2026(found) == dict.fromkeys(
            ["events_p202608", "events_p202609", "events_p202610", "events_p202611"], 1
        )
        assert found["events_default"] == 19 - 4
        # The same events again: all duplicates (exactly once whichever partition holds them), and the next four
        # months get theirs, their rows moved out of the default partition.
        assert write(daemon, *batch) == (0, 19)
        found = partitions(pg_url)
        assert months_up_to_november_2026(found) == dict.fromkeys([f"events_p2026{m:02d}" for m in range(4, 12)], 1)
        assert found["events_default"] == 19 - 8
        assert rows(pg_url, "SELECT count(*), count(DISTINCT request_id) FROM events") == [(19, 19)]
        assert rows(pg_url, "SELECT count(*) FROM event_ids") == [(19,)]
        # Reported whichever partition holds them: claude-haiku-4-5 has rates from 2025-10-01 on, so the four events
        # before are unpriced and the other 15 cost 1,000 output tokens at $5 per million, $0.005 each.
        config = tmp_path / "claude-monitor.yaml"
        (total,) = report(config, "1000-01-01", "2026-12-01")["rows"]
        assert (total["requests"], total["unpriced_requests"], Decimal(total["cost_usd"])) == (19, 4, Decimal("0.075"))
    finally:
        close_daemon(daemon)


def test_retention_deletes_default_partition_rows_by_time_and_the_job_moves_the_windows_months(
    pg_url: str, tmp_path: Path
) -> None:
    # No partition made by a batch: every row lands in the default partition.
    daemon = open_daemon(pg_url, tmp_path, "{retention_days: 400}", "{max_new_partitions_per_batch: 0}")
    try:
        assert write(daemon, *(event(request_id, when) for request_id, when in SPREAD.items())) == (19, 0)
        assert months_up_to_november_2026(partitions(pg_url)) == {}
        assert partitions(pg_url)["events_default"] == 19

        daemon.retention()

        # Before the cutoff: y1000, y1999, y2020, sep-2025 and oct-before, deleted with their ids. The rest are in
        # the window: each month gets its partition and its row, and none older than October 2025 is made.
        found = partitions(pg_url)
        assert months_up_to_november_2026(found) == dict.fromkeys(WINDOW_MONTHS, 1)
        assert found["events_default"] == 0
        kept = sorted(set(SPREAD) - {"y1000", "y1999", "y2020", "sep-2025", "oct-before"})
        assert [r[0] for r in rows(pg_url, "SELECT request_id FROM events ORDER BY request_id")] == kept
        assert [r[0] for r in rows(pg_url, "SELECT request_id FROM event_ids ORDER BY request_id")] == kept
        # A deleted event sent again is new again; one still stored stays a duplicate.
        assert write(daemon, event("y1000", SPREAD["y1000"]), event("oct-after", SPREAD["oct-after"])) == (1, 1)
    finally:
        close_daemon(daemon)


# A model priced at every date, so that events of any month cost the same: $5 per million output tokens, 1,000
# output tokens an event, $0.005 each.
SERVE_CONFIG = """\
sources: []
http: {{listen: "127.0.0.1:0"}}
throttle: {{snapshot_file: throttle.json}}
schedule: {{retention_days: {retention_days}}}
store: {{max_new_partitions_per_batch: 3}}
pricing:
  models:
    house-model:
      rates:
        - {{since: 0001-01-01, input: 1, output: 5, cache_write_5m: 1.25, cache_write_1h: 2, cache_read: 0.10}}
"""


def house_event(request_id: str, when: datetime) -> dict[str, Any]:
    return {**event(request_id, when), "model": "house-model"}


def months_back(month: datetime, count: int) -> datetime:
    """The first of the month `count` months before `month` (itself the first of a month)."""
    index = month.year * 12 + month.month - 1 - count
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def test_one_body_over_2000_months_makes_three_partitions_and_stores_every_event_once(
    pg_url: str, tmp_path: Path
) -> None:
    config = pg_config(tmp_path, pg_url, SERVE_CONFIG.format(retention_days=400))
    daemon = Serve(config, tmp_path)
    try:
        before = partitions(pg_url)
        # The first of this month and of each of the 1,999 before it (back to the 1860s): all valid, none in the
        # future. The window goes back to the month 400 days ago (13 or 14 months), this month's partition exists
        # (the migration made it), so the newest three before it are made and the rest wait in the default one.
        this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        months = [months_back(this_month, back) for back in range(2000)]
        answer = daemon.post_usage([house_event(f"r{back:04d}", when) for back, when in enumerate(months)])
        assert answer.status == 202, answer.body
        assert (answer.json()["accepted"], answer.json()["duplicates"], answer.json()["rejected"]) == (2000, 0, [])
        after = partitions(pg_url)
        made = sorted(set(after) - set(before))
        assert made == sorted(f"events_p{m.year:04d}{m.month:02d}" for m in months[1:4])
        assert len(after) == len(before) + 3  # rows of pg_inherits: three more, not 2,000
        assert after["events_default"] == 2000 - 4
        assert rows(pg_url, "SELECT count(*), count(DISTINCT request_id) FROM events") == [(2000, 2000)]
        assert rows(pg_url, "SELECT count(*) FROM event_ids") == [(2000,)]
        assert rows(pg_url, "SELECT sum(cost_pico) FROM events") == [(2000 * 5_000_000_000,)]
        # The same body again: every event a duplicate, whichever partition holds it; three more months made.
        again = daemon.post_usage([house_event(f"r{back:04d}", when) for back, when in enumerate(months)])
        assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 2000)
        assert len(partitions(pg_url)) == len(before) + 6
        assert rows(pg_url, "SELECT count(*) FROM events") == [(2000,)]
        # Reported in full: 2,000 x $0.005.
        since, until = months[-1].date().isoformat(), months_back(this_month, -1).date().isoformat()
        (total,) = report(config, since, until)["rows"]
        assert (total["requests"], Decimal(total["cost_usd"])) == (2000, Decimal("10"))
    finally:
        daemon.stop()


def test_a_backfill_of_2024_lands_in_its_months_three_a_batch_and_is_reported(pg_url: str, tmp_path: Path) -> None:
    # Raw events kept ten years: every month of 2024 is in the window.
    config = pg_config(tmp_path, pg_url, SERVE_CONFIG.format(retention_days=3650))
    daemon = Serve(config, tmp_path)
    try:
        # Four bodies of the year's logs, ten events a month each (the 5th, 10th, ... 50th hour of the month).
        for body in range(4):
            sent = [
                house_event(f"b{body}-{month:02d}-{n}", datetime(2024, month, 1, tzinfo=UTC) + timedelta(hours=5 * n))
                for month in range(1, 13)
                for n in range(1, 11)
            ]
            answer = daemon.post_usage(sent)
            assert (answer.json()["accepted"], answer.json()["rejected"]) == (120, []), answer.body
            found = partitions(pg_url)
            # Each body makes the three newest months still without a partition (and moves their rows there).
            made = [f"events_p2024{month:02d}" for month in range(10 - 3 * body, 13)]
            assert sorted(name for name in found if name.startswith("events_p2024")) == made
            assert all(found[name] == 10 * (body + 1) for name in made)
            assert found["events_default"] == 10 * (body + 1) * (12 - len(made))
        assert rows(pg_url, "SELECT count(*) FROM events") == [(480,)]
        # 480 x $0.005; March alone 40 x $0.005.
        assert Decimal(report(config, "2024-01-01", "2025-01-01")["total_usd"]) == Decimal("2.4")
        assert Decimal(report(config, "2024-03-01", "2024-04-01")["total_usd"]) == Decimal("0.2")
    finally:
        daemon.stop()


def test_migration_partitions_an_existing_events_table_with_its_rows(pg_url: str, tmp_path: Path) -> None:
    assert alembic("upgrade", "0010", url=pg_url).returncode == 0
    engine = create_engine(pg_url)
    columns = (
        "request_id, ts, received_at, source, model_id, model, input_tokens, output_tokens, cache_read_tokens, "
        "cache_write_5m_tokens, cache_write_1h_tokens, web_search_requests, web_fetch_requests, batch, long_prompt, "
        "attributes, cost_pico"
    )
    try:
        with engine.begin() as connection:
            for request_id, ts in (("r1", "2026-08-31 23:59:59"), ("r2", "2026-09-01 00:00:00"), ("r3", "2025-01-15")):
                connection.execute(
                    text(
                        f"INSERT INTO events ({columns}) VALUES (:id, :ts, :ts, 's', 'm', 'm', 1, 2, 0, 0, 0, 0, 0, "
                        "false, false, '{}', 7)"
                    ),
                    {"id": request_id, "ts": ts},
                )
            # An index some other migration added: carried over as defined, partial as it is.
            connection.execute(text("CREATE INDEX ix_events_other ON events (source) WHERE cost_pico IS NULL"))
    finally:
        engine.dispose()
    before = rows(pg_url, "SELECT id, request_id, ts, cost_pico FROM events ORDER BY id")
    upgrade = alembic("upgrade", "head", url=pg_url)
    assert upgrade.returncode == 0, upgrade.stderr
    assert rows(pg_url, "SELECT id, request_id, ts, cost_pico FROM events ORDER BY id") == before
    found = partitions(pg_url)
    # One partition per month from January 2025 (the oldest row) on; August and September 2026 hold a row each.
    assert found["events_p202501"] == 1 and found["events_p202608"] == 1 and found["events_p202609"] == 1
    assert found["events_p202502"] == 0 and found["events_default"] == 0
    assert rows(pg_url, "SELECT request_id FROM event_ids ORDER BY request_id") == [("r1",), ("r2",), ("r3",)]
    indexes = "SELECT indexdef FROM pg_indexes WHERE tablename = 'events' ORDER BY indexname"
    assert [r[0] for r in rows(pg_url, indexes)] == [
        "CREATE INDEX ix_events_model_ts ON ONLY public.events USING btree (model, ts)",
        "CREATE INDEX ix_events_other ON ONLY public.events USING btree (source) WHERE (cost_pico IS NULL)",
        "CREATE INDEX ix_events_ts ON ONLY public.events USING btree (ts)",
        # Added by the migration after this one, on the partitioned table.
        "CREATE INDEX ix_events_unpriced_model_id ON ONLY public.events USING btree (model_id)"
        " WHERE (cost_pico IS NULL)",
        "CREATE UNIQUE INDEX pk_events ON ONLY public.events USING btree (id, ts)",
    ]
    run(pg_url, "DROP INDEX ix_events_other")  # the metadata does not know it: alembic check would say so
    check = alembic("check", url=pg_url)
    assert check.returncode == 0, check.stdout + check.stderr
    run(pg_url, "CREATE INDEX ix_events_other ON events (source) WHERE cost_pico IS NULL")
    # The id sequence goes on where it was, and a stored request_id stays stored once.
    config = pg_config(tmp_path, pg_url)
    lines = tmp_path / "more.jsonl"
    lines.write_text(
        json.dumps(event("r2", datetime(2026, 9, 1, tzinfo=UTC)))
        + "\n"
        + json.dumps(event("r4", datetime(2026, 9, 2, tzinfo=UTC)))
        + "\n",
        encoding="utf-8",
    )
    out = run_cli("ingest", str(lines), "--config", str(config), "--format", "json")
    summary = json.loads(out.stdout)
    assert (summary["accepted"], summary["duplicates"], summary["rejected"]) == (1, 1, 0)
    assert rows(pg_url, "SELECT id FROM events WHERE request_id = 'r4'") == [(before[-1][0] + 1,)]
    # And back: one unpartitioned table with all four rows and its unique request_id.
    assert alembic("downgrade", "0010", url=pg_url).returncode == 0
    assert rows(pg_url, "SELECT count(*) FROM events") == [(4,)]
    assert rows(pg_url, "SELECT count(*) FROM pg_inherits") == [(0,)]
    assert rows(pg_url, "SELECT conname FROM pg_constraint WHERE conname = 'uq_events_request_id'") == [
        ("uq_events_request_id",)
    ]
    assert [r[0] for r in rows(pg_url, indexes)] == [
        "CREATE INDEX ix_events_model_ts ON public.events USING btree (model, ts)",
        "CREATE INDEX ix_events_other ON public.events USING btree (source) WHERE (cost_pico IS NULL)",
        "CREATE INDEX ix_events_ts ON public.events USING btree (ts)",
        "CREATE UNIQUE INDEX pk_events ON public.events USING btree (id)",
        "CREATE UNIQUE INDEX uq_events_request_id ON public.events USING btree (request_id)",
    ]
