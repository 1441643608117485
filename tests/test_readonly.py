"""Commands that read never write: budgets, report and check-config against a live daemon's database; ingest with a
config whose budgets differ from the stored ones refuses; only the leader applies budget definitions."""

from __future__ import annotations

import re
import signal
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from monitor.budgets.engine import DefinitionChange
from monitor.config import load_settings
from monitor.service import Daemon, open_store
from monitor.store.db import alembic_config, create_db_engine
from tests.conftest import FakeClock, jsonl, run_cli, write_config
from tests.serve_harness import Serve

# Runs the command line in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

# Budget A counts all of project lingo; budget B only its chat feature and throttles at its limit.
BUDGET_A = "  - {name: a-lingo, match: {project: lingo}, window: rolling:7d, limit_usd: 1000}\n"
BUDGET_B = (
    "  - {name: b-chat, match: {project: lingo, feature: chat}, window: rolling:7d, limit_usd: 1, throttle_at: 1.0}\n"
)
DAEMON = 'timezone: UTC\nhttp: {listen: "127.0.0.1:0"}\nsources: []\nschedule: {evaluate_every: 60s}\nbudgets:\n'


def usage(request_id: str, feature: str, output_tokens: int, when: datetime | None = None) -> dict[str, Any]:
    """haiku-4-5 output tokens of project lingo: $5 per million."""
    return {
        "request_id": request_id,
        "timestamp": (when or datetime.now(UTC)).isoformat(),
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "feature": feature, "user": "u-1"},
    }


def dump(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a SQLite file, read over a read-only connection."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(connection.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in sorted(tables)}
    finally:
        connection.close()


def budget_row(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (row,) = [row for row in rows if row["budget"] == name]
    return row


@pytest.fixture
def serve_ab(tmp_path: Path) -> Iterator[Serve]:
    daemon = Serve(write_config(tmp_path, DAEMON + BUDGET_A + BUDGET_B), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


def test_cli_with_a_config_lacking_a_budget_leaves_the_live_daemons_budget_alone(
    serve_ab: Serve, tmp_path: Path
) -> None:
    # $1.50 of chat (300,000 x $5/M) and $0.50 of drills (100,000 x $5/M): A $2.00, B $1.50 over its $1 limit.
    assert serve_ab.post_usage([usage("chat-1", "chat", 300_000), usage("drill-1", "drill", 100_000)]).status == 202
    before = serve_ab.get("/v1/budgets").json()
    b_before = budget_row(before, "b-chat")
    assert b_before["spend_usd"] == "1.500000" and b_before["throttled"] is True
    assert budget_row(before, "a-lingo")["spend_usd"] == "2.000000"
    assert serve_ab.get("/v1/check?project=lingo&feature=chat").status == 429
    database = tmp_path / "monitor.db"
    stored = dump(database)
    assert [row[0] for row in stored["budget_definitions"]] == ["a-lingo", "b-chat"]

    lacking_b = tmp_path / "ops"
    lacking_b.mkdir()
    config = lacking_b / "claude-monitor.yaml"
    config.write_text(f"database_url: sqlite:///{database}\ntimezone: UTC\nbudgets:\n{BUDGET_A}", encoding="utf-8")

    shown = run_cli("budgets", "--format", "json", "--config", str(config))
    assert shown.returncode == 0
    assert [(row["budget"], row["spend_usd"]) for row in shown.json()] == [("a-lingo", "2.000000")]
    assert "b-chat is stored but not configured" in shown.stderr and "/v1/budgets" in shown.stderr
    assert dump(database) == stored  # not a row added, changed or deleted

    backfill = jsonl(tmp_path / "backfill.jsonl", usage("chat-2", "chat", 100_000))
    refused = run_cli("ingest", str(backfill), "--config", str(config), check=False)
    assert refused.returncode == 2
    assert "b-chat is stored but not configured" in refused.stderr
    assert "nothing was ingested" in refused.stderr and "--recount" in refused.stderr
    assert refused.stdout == ""
    assert dump(database) == stored  # the event was not stored either

    after = serve_ab.get("/v1/budgets").json()
    b_after = budget_row(after, "b-chat")
    for key in ("spend_usd", "utilization", "throttled", "until", "limit_usd", "requests"):
        assert b_after[key] == b_before[key], key
    assert serve_ab.get("/v1/check?project=lingo&feature=chat").status == 429
    # The daemon's next batch adds to B's stored counts, which are intact: $1.50 + 20,000 x $5/M = $1.60.
    assert serve_ab.post_usage(usage("chat-3", "chat", 20_000)).status == 202
    assert budget_row(serve_ab.get("/v1/budgets").json(), "b-chat")["spend_usd"] == "1.600000"


def migrated_to(database: Path, revision: str) -> str:
    """A SQLite database at an older schema revision; its URL."""
    url = f"sqlite:///{database}"
    engine = create_db_engine(url)
    try:
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()
    return url


def test_read_only_commands_refuse_a_schema_behind_head_without_migrating(tmp_path: Path) -> None:
    database = tmp_path / "monitor.db"
    migrated_to(database, "0003")
    config = write_config(tmp_path, "budgets:\n" + BUDGET_A)
    before = dump(database)
    for args in (("budgets",), ("report", "--window", "all")):
        run = run_cli(*args, "--config", str(config), check=False)
        assert run.returncode == 3, run.stderr
        assert "schema revision 0003" in run.stderr and "run `claude-monitor migrate`" in run.stderr
        assert "does not migrate" in run.stderr
        assert run.stdout == ""
    assert dump(database) == before
    assert dump(database)["alembic_version"] == [("0003",)]
    checked = run_cli("check-config", "--config", str(config))  # never fails for the database
    assert "not compared with the stored budget definitions" in checked.stdout and "0003" in checked.stdout
    assert dump(database) == before


def test_read_only_commands_do_not_create_a_missing_database(tmp_path: Path) -> None:
    config = tmp_path / "claude-monitor.yaml"
    config.write_text(f"database_url: sqlite:///{tmp_path / 'data' / 'monitor.db'}\nbudgets:\n{BUDGET_A}")
    for args in (("budgets",), ("report",)):
        run = run_cli(*args, "--config", str(config), check=False)
        assert run.returncode == 3
        assert "no database at sqlite:///" in run.stderr and "claude-monitor migrate" in run.stderr
    checked = run_cli("check-config", "--format", "json", "--config", str(config)).json()
    assert checked["budget_definitions"]["compared"] is False
    assert "no database at" in checked["budget_definitions"]["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claude-monitor.yaml"]  # not even its directory


# --- what a config would change --------------------------------------------------------------------------------


def counted(tmp_path: Path, clock: FakeClock, budgets: str) -> Path:
    """A SQLite store in `tmp_path` whose definitions are `budgets`', with one chat event of today counted."""
    config = write_config(tmp_path, "timezone: UTC\nbudgets:\n" + budgets)
    store = open_store(load_settings(config, environ={}), clock=clock)
    try:
        store.budgets.apply_definitions()
        result = store.writer.write([("t", store.parser.parse_object(usage("c", "chat", 1000, clock.now)))], "t")
        assert result.accepted == 1
    finally:
        store.close()
    return config


NEW_CONFIG = (
    "timezone: UTC\nbudgets:\n"
    "  - {name: a-lingo, match: {project: lingo}, window: month, limit_usd: 1000}\n"  # window changed
    "  - {name: c-drill, match: {project: lingo, feature: drill}, window: day, limit_usd: 5}\n"  # new
)  # b-chat removed


def test_pending_changes_name_each_budget_and_where_a_recount_starts(tmp_path: Path, clock: FakeClock) -> None:
    counted(tmp_path, clock, BUDGET_A + BUDGET_B)
    config = write_config(tmp_path, NEW_CONFIG)
    store = open_store(load_settings(config, environ={}), clock=clock, migrate=False)
    try:
        changes = store.budgets.pending_definition_changes()
    finally:
        store.close()
    # clock: 2026-11-26 12:00 UTC; a month window starts 1 Nov, a day window at midnight.
    assert changes == [
        DefinitionChange("a-lingo", "changed", datetime(2026, 11, 1, tzinfo=UTC)),
        DefinitionChange("c-drill", "new", datetime(2026, 11, 26, tzinfo=UTC)),
        DefinitionChange("b-chat", "removed", rows=1),
    ]
    assert dump(tmp_path / "monitor.db")["budget_definitions"][1][0] == "b-chat"  # still stored


def test_check_config_says_what_the_next_serve_start_would_change(tmp_path: Path, clock: FakeClock) -> None:
    counted(tmp_path, clock, BUDGET_A + BUDGET_B)
    config = write_config(tmp_path, NEW_CONFIG)
    before = dump(tmp_path / "monitor.db")
    run = run_cli("check-config", "--config", str(config))
    assert run.returncode == 0
    month = datetime.now(UTC).strftime("%Y-%m-01T00:00:00Z")
    out = run.stdout
    assert (
        f"changed budget a-lingo (match, per, window or bucket): on the next serve start the leader will "
        f"recount it from {month}" in out
    )
    assert re.search(
        r"new budget c-drill: on the next serve start the leader will count it from \d{4}-\d\d-\d\dT00:00:00Z", out
    )
    assert (
        "removed budget b-chat: on the next serve start the leader would drop its counts (1 budget_usage rows)" in out
    )
    assert out.rstrip().endswith("config OK")
    as_json = run_cli("check-config", "--format", "json", "--config", str(config)).json()
    changes = {c["budget"]: c for c in as_json["budget_definitions"]["changes"]}
    assert as_json["budget_definitions"]["compared"] is True
    assert changes["a-lingo"] == {"budget": "a-lingo", "change": "changed", "since": month, "rows": None}
    assert changes["b-chat"] == {"budget": "b-chat", "change": "removed", "since": None, "rows": 1}
    assert changes["c-drill"]["change"] == "new"
    assert dump(tmp_path / "monitor.db") == before

    same = run_cli(
        "check-config", "--config", str(write_config(tmp_path, "timezone: UTC\nbudgets:\n" + BUDGET_A + BUDGET_B))
    )
    assert "no change: the database counts exactly these budgets" in same.stdout


def test_ingest_recount_says_what_it_rewrites_and_does_it(tmp_path: Path, clock: FakeClock) -> None:
    counted(tmp_path, clock, BUDGET_A + BUDGET_B)
    lacking_b = write_config(tmp_path, "timezone: UTC\nbudgets:\n" + BUDGET_A)
    backfill = jsonl(tmp_path / "backfill.jsonl", usage("d", "drill", 1000))
    run = run_cli("ingest", str(backfill), "--recount", "--format", "json", "--config", str(lacking_b))
    assert "--recount: budget b-chat is stored but not configured: applying would drop its 1 rows" in run.stderr
    assert run.json()["accepted"] == 1
    rows = dump(tmp_path / "monitor.db")
    assert [row[0] for row in rows["budget_definitions"]] == ["a-lingo"]
    assert {row[0] for row in rows["budget_usage"]} == {"a-lingo"}


# --- only the leader applies definitions -------------------------------------------------------------------------


def metrics_of(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


BUDGET_C = "  - {name: c-drill, match: {project: lingo, feature: drill}, window: day, limit_usd: 5}\n"


def daemon_on(config: Path, clock: FakeClock) -> Daemon:
    """A daemon in this process, not started: the test runs its evaluation by hand."""
    return Daemon(load_settings(config, environ={}), clock=clock, environ={})


def close(daemon: Daemon) -> None:
    daemon.server.stop()  # never started: closes the listening socket
    daemon.leadership.release()
    daemon.store.close()


def rows_by_budget(url: str) -> dict[str, tuple[int, int]]:
    """budget -> (usage rows, summed cost_pico), and the stored definitions, read over a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            usage_rows = connection.execute(
                text("SELECT budget, count(*), sum(cost_pico) FROM budget_usage GROUP BY budget")
            ).all()
            defined = connection.execute(text("SELECT budget FROM budget_definitions")).scalars().all()
    finally:
        engine.dispose()
    return {name: (int(n), int(cost)) for name, n, cost in usage_rows} | {f"defined:{d}": (0, 0) for d in defined}


def pg_daemon_config(directory: Path, url: str, budgets: str) -> Path:
    throttle = f"throttle: {{snapshot_file: {directory / 'throttle.json'}}}\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "claude-monitor.yaml"
    body = DAEMON.replace("budgets:\n", throttle + "budgets:\n") + budgets
    path.write_text(f"database_url: {url}\n{body}", encoding="utf-8")
    return path


def test_only_the_leader_applies_definitions_and_a_new_leader_does(pg_url: str, tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 11, 26, 12, tzinfo=UTC))
    hour_ago = clock.now - timedelta(hours=1)
    first = daemon_on(pg_daemon_config(tmp_path / "first", pg_url, BUDGET_A + BUDGET_B), clock)
    second = daemon_on(pg_daemon_config(tmp_path / "second", pg_url, BUDGET_A + BUDGET_C), clock)
    try:
        first.evaluate()  # the first replica to ask leads: it records A and B
        # $1.50 of chat and $0.50 of drills (x $5/M output): A $2.00, B $1.50.
        batch = [
            ("t", first.store.parser.parse_object(usage(r, f, n, hour_ago)))
            for r, f, n in (("chat-1", "chat", 300_000), ("drill-1", "drill", 100_000))
        ]
        assert first.store.writer.write(batch, "t").accepted == 2
        stored = rows_by_budget(pg_url)
        assert stored == {
            "a-lingo": (1, 2_000_000_000_000),
            "b-chat": (1, 1_500_000_000_000),
            "defined:a-lingo": (0, 0),
            "defined:b-chat": (0, 0),
        }

        second.evaluate()  # not the leader; its config lacks B and adds C
        assert [(c.budget, c.change) for c in second.mismatched] == [("c-drill", "new"), ("b-chat", "removed")]
        ready, detail = second.readiness()
        assert ready is True  # it answers from the leader's counts: listed, not a failure
        assert detail["budget_definitions_differ"] == [
            "budget c-drill is new: applying would count it from the stored events since 2026-11-26T00:00:00Z",
            "budget b-chat is stored but not configured: applying would drop its 1 rows",
        ]
        metrics = metrics_of(second)
        assert metrics["claude_monitor_budget_definitions_mismatched", ()] == 2
        assert metrics["claude_monitor_budget_definition_mismatch", (("budget", "b-chat"), ("change", "removed"))] == 1
        assert metrics["claude_monitor_budget_definition_mismatch", (("budget", "c-drill"), ("change", "new"))] == 1
        assert metrics_of(first)["claude_monitor_budget_definitions_mismatched", ()] == 0
        assert rows_by_budget(pg_url) == stored  # touched nothing

        # What it ingests counts toward the budgets it agrees on (A), not toward C: $1.00 of drills.
        drill = second.store.parser.parse_object(usage("drill-2", "drill", 200_000, hour_ago))
        assert second.store.writer.write([("t", drill)], "t").accepted == 1
        after = rows_by_budget(pg_url)
        assert after["a-lingo"] == (1, 3_000_000_000_000) and "c-drill" not in after

        first.leadership.release()  # the leader goes away
        second.evaluate()  # the new leader applies its definitions: C counted from the stored events, B dropped
        assert second.mismatched == []
        applied = rows_by_budget(pg_url)
        assert applied == {
            "a-lingo": (1, 3_000_000_000_000),
            "c-drill": (1, 1_500_000_000_000),
            "defined:a-lingo": (0, 0),
            "defined:c-drill": (0, 0),
        }
        state = {s.budget.name: s for s in second.budgets.states()}["c-drill"]
        assert state.usage.cost_pico == 1_500_000_000_000 and state.usage.requests == 2
        assert second.readiness()[1]["budget_definitions_differ"] == []
        assert metrics_of(second)["claude_monitor_budget_definitions_mismatched", ()] == 0

        first.evaluate()  # the old leader, no longer leading, now differs from the database and leaves it alone
        assert [(c.budget, c.change) for c in first.mismatched] == [("b-chat", "new"), ("c-drill", "removed")]
        assert rows_by_budget(pg_url) == applied
    finally:
        close(first)
        close(second)


def test_a_replica_that_does_not_lead_leaves_a_changed_budget_alone_on_sqlite(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted(tmp_path, clock, BUDGET_A + BUDGET_B)
    before = dump(tmp_path / "monitor.db")
    changed_b = BUDGET_B.replace("feature: chat", "feature: drill")
    daemon = daemon_on(write_config(tmp_path, DAEMON + BUDGET_A + changed_b), clock)
    monkeypatch.setattr(daemon.leadership, "is_leader", lambda: False)
    try:
        daemon.evaluate()
        assert [(c.budget, c.change) for c in daemon.mismatched] == [("b-chat", "changed")]
        assert dump(tmp_path / "monitor.db") == before
        drill = daemon.store.parser.parse_object(usage("drill-1", "drill", 1000, clock.now))
        assert daemon.store.writer.write([("t", drill)], "t").accepted == 1
        b_rows = [row for row in dump(tmp_path / "monitor.db")["budget_usage"] if row[0] == "b-chat"]
        assert b_rows == [row for row in before["budget_usage"] if row[0] == "b-chat"]  # not counted under B
    finally:
        close(daemon)


def test_runbook_confirm_steps_only_read_and_ask_the_daemon_for_budgets() -> None:
    runbook = (Path(__file__).resolve().parents[1] / "dashboards" / "RUNBOOK.md").read_text(encoding="utf-8")
    confirms = [s.partition("**Confirm.**")[2].partition("**Do.**")[0] for s in runbook.split("\n## ")[1:]]
    assert len([c for c in confirms if c]) >= 10
    for confirm in confirms:
        for block in re.findall(r"```sh\n(.*?)```", confirm, re.S):
            commands = set(re.findall(r"claude-monitor ([a-z][a-z-]*)", block))
            # budget state from the daemon: /v1/budgets; `prices` reads the config (and, with --check, Anthropic's
            # model list), never the database
            assert commands <= {"report", "check-config", "prices"}, block
            if "budget" in block and "$MON/v1/" not in block:
                raise AssertionError(f"a budget confirm step that does not ask the daemon:\n{block}")
