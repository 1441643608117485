"""The store on a real PostgreSQL server: migrations without drift, idempotent ingest priced exactly as on SQLite,
budgets, replicas writing at once, and a `serve` that rides out a database outage and recovers."""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, func, select, text

from monitor.config import load_settings
from monitor.ingest.parse import Event, Rejected
from monitor.service import Store, open_store
from monitor.store.models import budget_usage, counters, dead_letters, events
from tests.conftest import REPO, FakeClock, event, run_cli, write_config
from tests.serve_harness import Serve, wait_until
from tests.test_ingest import reference_cost, simulated_file
from tests.test_migrations import alembic

# Starts PostgreSQL and `serve`: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

if TYPE_CHECKING:  # imported by pytest as a plugin, so that its assertions are rewritten too
    from tests.pg import PostgresServer

pytest_plugins = ["tests.pg"]

BUDGETS = """\
timezone: Europe/Berlin
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    alert_at: [0.5]
    throttle_at: 1.0
  - name: lingo-monthly
    match: {project: lingo}
    window: month
    limit_usd: 100
    throttle_at: 1.0
"""


def pg_config(directory: Path, url: str, text: str = "") -> Path:
    """A config file in `directory` whose database is `url`, plus `text`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "claude-monitor.yaml"
    path.write_text(f"database_url: {url}\n{text}", encoding="utf-8")
    return path


def scalar(url: str, query: str) -> Any:
    """The one value `query` returns, read over a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(query)).scalar()
    finally:
        engine.dispose()


# --- schema --------------------------------------------------------------------------------------------------------


def test_alembic_upgrade_check_downgrade_on_postgres(pg_url: str) -> None:
    for step in (("upgrade", "head"), ("check",), ("downgrade", "base"), ("upgrade", "head"), ("check",)):
        result = alembic(*step, url=pg_url)
        assert result.returncode == 0, f"alembic {' '.join(step)}:\n{result.stdout}{result.stderr}"
        if step == ("check",):
            assert "No new upgrade operations detected" in result.stdout + result.stderr
    tables = scalar(
        pg_url, "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname='public'"
    )
    # An empty database gets the month partitions of the migration's own month and the next one (it reads the
    # server's clock), besides the default partition.
    months = {name for name in tables.split(",") if re.fullmatch(r"events_p\d{6}", name)}
    assert len(months) == 2
    assert set(tables.split(",")) - months == {
        "admission_buckets",
        "admission_holds",
        "admission_leases",
        "admission_refunds",
        "alembic_version",
        "alert_deliveries",
        "alert_notices",
        "budget_definitions",
        "budget_usage",
        "counters",
        "dead_letters",
        "events",
        "events_default",
        "event_ids",
        "label_values",
        "source_offsets",
        "reconcile_fetches",
        "reconcile_figures",
        "usage_rollup",
    }


def test_migrate_command_is_idempotent_on_postgres(pg_url: str, tmp_path: Path) -> None:
    config = pg_config(tmp_path, pg_url)
    run_cli("migrate", "--config", str(config))
    run_cli("migrate", "--config", str(config))
    heads = scalar(pg_url, "SELECT string_agg(version_num, ',') FROM alembic_version")
    scripts = sorted(p.name for p in (REPO / "migrations" / "versions").glob("0*.py"))
    assert "," not in heads and scripts[-1].startswith(heads)
    check = alembic("check", url=pg_url)
    assert check.returncode == 0, check.stdout + check.stderr


# --- ingest and report -----------------------------------------------------------------------------------------------


def test_ingest_twice_reports_identically_and_exactly_as_on_sqlite(pg_url: str, tmp_path: Path) -> None:
    # 3,000 lines: 60 repeats of earlier lines and 30 spoiled ones (generate_events makes exactly that many).
    usage = simulated_file(tmp_path / "usage.jsonl", 3_000, duplicate_fraction=0.02, bad_fraction=0.01)
    expected = Decimal(0)
    seen: set[str] = set()
    for raw in usage.read_text(encoding="utf-8").splitlines():
        if "_bad_" in raw or '"request_id"' not in raw:  # spoiled lines are named req_sim_<seed>_bad_<n>, or unnamed
            continue
        line = json.loads(raw)
        if line["request_id"] not in seen:
            seen.add(line["request_id"])
            expected += reference_cost(line)[1]
    assert len(seen) == 2_910

    pg = ("--config", str(pg_config(tmp_path / "pg", pg_url)))
    report = ("report", "--window", "all", "--by", "model,project,user,feature", "--format", "json")
    first = run_cli("ingest", str(usage), "--batch-size", "1000", "--format", "json", *pg).json()
    assert first == {"accepted": 2_910, "duplicates": 60, "rejected": 30, "unpriced": 0, "attributes_dropped": 0}
    before = run_cli(*report, *pg).stdout
    second = run_cli("ingest", str(usage), "--batch-size", "1000", "--format", "json", *pg).json()
    assert second == {"accepted": 0, "duplicates": 2_970, "rejected": 30, "unpriced": 0, "attributes_dropped": 0}
    after = run_cli(*report, *pg).stdout
    assert after == before
    assert scalar(pg_url, "SELECT count(*) FROM events") == 2_910
    assert scalar(pg_url, "SELECT count(*) FROM dead_letters") == 30  # the same bad line read twice is kept once

    lite_dir = tmp_path / "sqlite"
    lite_dir.mkdir()
    lite = ("--config", str(write_config(lite_dir)))
    assert run_cli("ingest", str(usage), "--batch-size", "1000", "--format", "json", *lite).json() == first
    on_sqlite = json.loads(run_cli(*report, *lite).stdout)
    on_postgres = json.loads(after)
    assert on_postgres["total_usd"] == on_sqlite["total_usd"]  # string-equal: to the last digit
    assert Decimal(on_postgres["total_usd"]) == expected  # and to the pico-dollar against hand prices
    assert on_postgres == on_sqlite  # every group, every count, in the same order


# --- budgets -------------------------------------------------------------------------------------------------------


def open_pg(url: str, directory: Path, clock: FakeClock, text: str = BUDGETS) -> Store:
    """An open, migrated store on `url` (its config and snapshot file in `directory`), its clock `clock`."""
    return open_store(
        load_settings(pg_config(directory, url, text), environ={}),
        clock=clock,
        snapshot_file=directory / "throttle.json",
    )


@pytest.fixture
def pg_store(pg_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    store = open_pg(pg_url, tmp_path, clock)
    store.budgets.sync_definitions()
    store.budgets.evaluate()
    yield store
    store.close()


def usage_event(request_id: str, when: datetime, user: str, output_tokens: int, **extra: Any) -> dict[str, Any]:
    """An event of project lingo: `output_tokens` of haiku-4-5 (or `model=`), other `extra` as attributes."""
    return {
        "request_id": request_id,
        "timestamp": when.isoformat(),
        "model": extra.pop("model", "claude-haiku-4-5"),
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user, **extra},
    }


def send(store: Store, event: dict[str, Any]) -> None:
    """The HTTP path's order: write the batch, then the fast path."""
    result = store.ingestor.submit([("test", store.parser.parse_object(event))], "test")
    assert result.accepted == 1


def blocked(store: Store, now: datetime, user: str) -> str | None:
    decision = store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": user}, now)
    return None if decision is None else decision.flag.budget


def test_per_user_daily_budget_on_postgres(pg_store: Store, pg_url: str, tmp_path: Path, clock: FakeClock) -> None:
    now = clock.now  # 2026-11-26 12:00 UTC
    # haiku-4-5 output at $5/M: 100,000 tokens = $0.50, exactly the limit; 99,999 = $0.499995, under it.
    send(pg_store, usage_event("r1", now, "u-1", 100_000))
    send(pg_store, usage_event("r2", now - timedelta(hours=1), "u-2", 99_999))
    assert blocked(pg_store, now, "u-1") == "per-user-daily"
    assert blocked(pg_store, now, "u-2") is None
    decision = pg_store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": "u-1"}, now)
    assert decision is not None
    assert decision.flag.until == datetime(2026, 11, 26, 23, tzinfo=UTC)  # Berlin midnight
    fast_flags = dict(pg_store.budgets.throttle.flags)

    pg_store.budgets.evaluate()  # the full pass from budget_usage agrees with the fast path
    assert set(pg_store.budgets.throttle.flags) == set(fast_flags)
    assert blocked(pg_store, now, "u-1") == "per-user-daily" and blocked(pg_store, now, "u-2") is None
    states = {(s.budget.name, s.scope.get("user")): s for s in pg_store.budgets.states()}
    assert states["per-user-daily", "u-1"].usage.cost_pico == 500_000_000_000
    assert states["per-user-daily", "u-2"].usage.cost_pico == 499_995_000_000
    assert states["lingo-monthly", None].usage.cost_pico == 999_995_000_000
    assert states["lingo-monthly", None].usage.requests == 2

    # Another replica over the same database sees the same state without counting anything again.
    replica = open_pg(pg_url, tmp_path / "replica", clock)
    try:
        assert replica.budgets.sync_definitions() == []
        replica.budgets.evaluate()
        assert set(replica.budgets.throttle.flags) == set(fast_flags)
        again = {(s.budget.name, s.scope.get("user")): s.usage for s in replica.budgets.states()}
        assert again == {key: state.usage for key, state in states.items()}
    finally:
        replica.close()


def test_new_budget_is_recounted_from_stored_events_on_postgres(pg_url: str, tmp_path: Path, clock: FakeClock) -> None:
    store = open_pg(pg_url, tmp_path, clock, "timezone: UTC\n")
    try:
        send(store, usage_event("a", clock.now - timedelta(hours=1), "u-1", 300_000))  # $1.50 today
        send(store, usage_event("b", clock.now - timedelta(days=1), "u-1", 300_000))  # yesterday
    finally:
        store.close()
    daily = (
        "timezone: UTC\n"
        "budgets:\n  - {name: d, match: {project: lingo}, window: day, limit_usd: 2, throttle_at: 0.75}\n"
    )
    store = open_pg(pg_url, tmp_path, clock, daily)
    try:
        assert store.budgets.sync_definitions() == ["d"]
        assert store.budgets.sync_definitions() == []
        store.budgets.evaluate()
        (state,) = store.budgets.states()
        assert state.usage.cost_pico == 1_500_000_000_000 and state.throttled  # $1.50 >= 0.75 x $2
    finally:
        store.close()


def test_concurrent_batches_neither_deadlock_nor_count_twice(pg_url: str, tmp_path: Path, clock: FakeClock) -> None:
    # Two stores (two engines: two replicas, or the tailer and the HTTP API of one daemon) write batches at the same
    # moment, from different sources, whose users and models come in opposite orders. Both transactions add to the
    # same budget and counter rows; unless each takes its row locks in one global order, PostgreSQL finds a deadlock
    # (after deadlock_timeout, 1 s) and aborts one of them. (An event both received would serialize the two: the
    # second insert of a request_id waits for the first transaction to end. So each writes events of its own.)
    rounds, size = 60, 6
    models = ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"]
    per_m = {"claude-haiku-4-5": 5, "claude-sonnet-4-5": 15, "claude-opus-4-5": 25}  # output $/M, by hand

    def batch(prefix: str) -> list[dict[str, Any]]:
        return [
            usage_event(f"{prefix}-{i}", clock.now, f"u-{i % 3}", 1_000 + i, model=models[i % 3]) for i in range(size)
        ]

    work = [(batch(f"a{r}"), batch(f"b{r}")[::-1]) for r in range(rounds)]
    total = 2 * rounds * size
    expected_pico = sum(d["usage"]["output_tokens"] * per_m[d["model"]] * 1_000_000 for p in work for b in p for d in b)
    replicas = [open_pg(pg_url, tmp_path / name, clock) for name in ("a", "b")]
    try:
        for replica in replicas:
            replica.budgets.sync_definitions()
        accepted = [0, 0]
        errors: list[str] = []

        def write(n: int, docs: list[dict[str, Any]], ready: threading.Barrier | None = None) -> None:
            store = replicas[n]
            items: list[tuple[str, Event | Rejected]] = [
                (f"#{i}", store.parser.parse_object(doc)) for i, doc in enumerate(docs)
            ]
            if ready is not None:
                ready.wait()
            try:
                accepted[n] += store.writer.write(items, ("app-logs", "http")[n]).accepted
            except Exception as exc:
                errors.append(str(exc).splitlines()[0])

        for pair in work:
            ready = threading.Barrier(2)
            threads = [threading.Thread(target=write, args=(n, pair[n], ready)) for n in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert errors == []
        assert accepted == [total // 2, total // 2]
        for pair in work:  # each replica is sent what the other stored: all duplicates
            write(1, pair[0])
            write(0, pair[1])
        assert errors == [] and accepted == [total // 2, total // 2]

        with replicas[0].engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(events)).scalar() == total
            assert connection.execute(select(func.sum(events.c.cost_pico))).scalar() == expected_pico
            monthly = select(func.sum(budget_usage.c.cost_pico), func.sum(budget_usage.c.requests)).where(
                budget_usage.c.budget == "lingo-monthly"
            )
            assert tuple(connection.execute(monthly).one()) == (expected_pico, total)
            requests = select(func.sum(counters.c.value)).where(counters.c.name == "requests")
            assert connection.execute(requests).scalar() == total
            assert connection.execute(select(func.count()).select_from(dead_letters)).scalar() == 0
    finally:
        for replica in replicas:
            replica.close()


# --- serve through a database outage ---------------------------------------------------------------------------------

SERVE_CONFIG = """\
timezone: UTC
sources: []
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 1s}
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    throttle_at: 1.0
"""


def test_serve_rides_out_a_postgres_outage_and_recovers(private_postgres: PostgresServer, tmp_path: Path) -> None:
    url = private_postgres.create_database("serve")
    daemon = Serve(pg_config(tmp_path, url, SERVE_CONFIG), tmp_path)
    try:
        now = datetime.now(UTC)
        answer = daemon.post_usage(usage_event("before-1", now, "u-1", 100_000))  # $0.50: the limit
        assert answer.status == 202 and answer.json()["accepted"] == 1
        assert daemon.get("/v1/check?project=lingo&user=u-1").status == 429
        assert daemon.get("/v1/check?project=lingo&user=u-2").status == 204

        private_postgres.stop()

        lost = usage_event("during-1", now, "u-2", 10)
        refused = daemon.post_usage(lost)
        assert refused.status == 503, refused.body
        assert int(refused.headers["retry-after"]) > 0
        assert "nothing was stored" in refused.json()["error"]
        # Proxies keep getting answers from the last known state: the flag set before the outage still bites.
        assert daemon.get("/v1/check?project=lingo&user=u-2").status == 204
        assert daemon.get("/v1/check?project=lingo&user=u-1").status == 429
        stale = wait_until(
            lambda: daemon.get("/v1/check?project=lingo&user=u-2").headers.get("x-monitor-stale"), timeout=15
        )
        assert "storage unavailable" in stale
        throttled = daemon.get("/v1/check?project=lingo&user=u-1")
        assert throttled.status == 429 and "x-monitor-stale" in throttled.headers
        ready = daemon.get("/readyz")
        assert ready.status == 503
        assert any("database unreachable" in problem for problem in ready.json()["problems"]), ready.json()
        assert daemon.get("/healthz").status == 200  # alive, only not ready

        private_postgres.start()

        accepted = wait_until(lambda: (r := daemon.post_usage(lost)).status == 202 and r, timeout=15)
        assert accepted.json()["accepted"] == 1  # the 503 really stored nothing
        wait_until(lambda: daemon.get("/readyz").status == 200, timeout=15)
        wait_until(lambda: "x-monitor-stale" not in daemon.get("/v1/check?project=lingo&user=u-2").headers, timeout=15)
        assert daemon.get("/v1/check?project=lingo&user=u-1").status == 429
        assert scalar(url, "SELECT count(*) FROM events") == 2
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.output()


@pytest.mark.slow
def test_parse_processes_store_on_postgres_exactly_what_one_process_stores(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The prepared path on PostgreSQL (rows as COPY takes them, partitions made ahead of them): every table the
    write path fills is the one a single process fills, a batch holding events already stored included."""
    from monitor.ingest.files import ingest_files
    from tests.test_ingest_bulk import PREPARED_CONFIG, _mixed_lines

    usage = tmp_path / "usage.jsonl"
    usage.write_text("\n".join(_mixed_lines()) + "\n", encoding="utf-8")
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps(event(f"m{i}", input_tokens=1)) for i in (3, 12, 41)) + "\n", "utf-8")
    queries = [
        "SELECT request_id, ts, source, model, cost_pico, attributes::text FROM events ORDER BY request_id",
        "SELECT name, labels, value FROM counters ORDER BY name, labels",
        "SELECT * FROM usage_rollup ORDER BY bucket_start, model, service_tier, status_class, labels",
        "SELECT * FROM budget_usage ORDER BY budget, scope, bucket_start",
        "SELECT location, reason FROM dead_letters ORDER BY id",
    ]
    outcomes = []
    for ahead in (False, True):
        url = postgres.create_database()
        clock = FakeClock(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))
        store = open_store(
            load_settings(pg_config(tmp_path / f"ahead-{ahead}", url, PREPARED_CONFIG), environ={}), clock=clock
        )
        try:
            ingest_files([seed], store.parser, store.ingestor, batch_size=7)
            result, failed = ingest_files(
                [usage], store.parser, store.ingestor, batch_size=7, parse_ahead=ahead, parse_processes=2
            )
            with store.engine.connect() as connection:
                found = [connection.execute(text(query)).all() for query in queries]
        finally:
            store.close()
        assert failed == []
        outcomes.append((result.as_dict(), found))
    assert outcomes[1] == outcomes[0]
    assert outcomes[1][0] == {"accepted": 53, "duplicates": 13, "rejected": 2, "unpriced": 15}
