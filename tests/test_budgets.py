"""Budgets against a real SQLite store with a moved clock: scopes, windows in a timezone, rolling windows,
the fast path that flags before the ingest call returns, and evaluation that reads rollups, not events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from monitor.config import load_settings
from monitor.service import Store, open_store
from monitor.store.models import events
from monitor.store.queries import window_totals
from tests.conftest import FakeClock, write_config

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
    alert_at: [0.5, 0.8]
    throttle_at: 1.0
  - name: opus-output-hourly
    match: {model: claude-opus-4-5}
    window: rolling:1h
    limit_tokens: {output: 1000}
    throttle_at: 1.0
  - name: requests-weekly
    match: {feature: translate}
    window: week
    limit_requests: 3
    throttle_at: 1.0
"""


def open_with(tmp_path: Path, clock: FakeClock, text: str = BUDGETS) -> Store:
    return open_store(
        load_settings(write_config(tmp_path, text), environ={}), clock=clock, snapshot_file=tmp_path / "throttle.json"
    )


@pytest.fixture
def budget_store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    store = open_with(tmp_path, clock)
    store.budgets.sync_definitions()
    store.budgets.evaluate()
    yield store
    store.close()


counter = iter(range(1_000_000))


def send(store: Store, when: datetime, *, model: str = "claude-haiku-4-5", **usage_and_attrs: Any) -> None:
    """Ingest one event through the real write path, then the fast path, as the HTTP API does."""
    attrs = {k: v for k, v in usage_and_attrs.items() if k in ("project", "user", "feature")}
    usage = {k: v for k, v in usage_and_attrs.items() if k not in attrs}
    event = {
        "request_id": f"r{next(counter)}",
        "timestamp": when.isoformat(),
        "model": model,
        "usage": usage,
        "attributes": attrs,
    }
    result = store.ingestor.submit([("test", store.parser.parse_object(event))], "test")
    assert result.accepted == 1


def blocked(store: Store, now: datetime, model: str = "claude-haiku-4-5", **attrs: str) -> str | None:
    decision = store.budgets.throttle.decide(model, attrs, now)
    return None if decision is None else decision.flag.budget


def test_per_user_daily_throttles_one_user_not_another(budget_store: Store, clock: FakeClock) -> None:
    now = clock.now  # 2026-11-26 12:00 UTC
    # 100,000 output tokens of haiku-4-5 at $5/M = $0.50: exactly the limit, so u-1 is throttled (>= 1.0).
    send(budget_store, now, output_tokens=100_000, project="lingo", user="u-1")
    send(budget_store, now, output_tokens=99_999, project="lingo", user="u-2")  # $0.499995: under
    assert blocked(budget_store, now, project="lingo", user="u-1") == "per-user-daily"
    assert blocked(budget_store, now, project="lingo", user="u-2") is None
    assert blocked(budget_store, now, project="other", user="u-1") is None  # the budget matches project lingo
    decision = budget_store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": "u-1"}, now)
    assert decision is not None
    # Berlin's day of 26 Nov ends at 23:00 UTC: 11 h after 12:00 UTC.
    assert decision.flag.until == datetime(2026, 11, 26, 23, tzinfo=UTC)
    assert decision.retry_after(now) == 11 * 3600


def test_flag_survives_a_full_evaluation_and_the_snapshot_file_names_it(
    budget_store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    send(budget_store, clock.now, output_tokens=200_000, project="lingo", user="u-9")  # $1.00
    budget_store.budgets.evaluate()
    assert blocked(budget_store, clock.now, project="lingo", user="u-9") == "per-user-daily"
    import json

    snapshot = json.loads((tmp_path / "throttle.json").read_text())
    assert [(f["budget"], f["scope"]) for f in snapshot["flags"]] == [
        ("per-user-daily", {"project": "lingo", "user": "u-9"})
    ]
    assert snapshot["flags"][0]["utilization"] == 2.0
    assert snapshot["flags"][0]["until"] == "2026-11-26T23:00:00Z"


def test_day_rolls_over_at_berlin_midnight(budget_store: Store, clock: FakeClock) -> None:
    clock.now = datetime(2026, 11, 26, 22, 59, tzinfo=UTC)  # 23:59 in Berlin
    send(budget_store, clock.now, output_tokens=100_000, project="lingo", user="u-1")
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") == "per-user-daily"
    clock.advance(minutes=1)  # 00:00 on 27 Nov in Berlin: a new day, before any evaluation
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") is None
    budget_store.budgets.evaluate()
    assert budget_store.budgets.throttle.flags == {}
    # The new day starts from zero: $0.25 more does not throttle.
    send(budget_store, clock.now, output_tokens=50_000, project="lingo", user="u-1")
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") is None


def test_month_rolls_over_in_the_configured_timezone(budget_store: Store, clock: FakeClock) -> None:
    clock.now = datetime(2026, 11, 30, 22, 30, tzinfo=UTC)  # 23:30 on 30 Nov in Berlin
    # 20M output tokens x $5/M = $100 across many users: the monthly budget's limit.
    for i in range(4):
        send(budget_store, clock.now, output_tokens=5_000_000, project="lingo", user=f"m-{i}")
    assert blocked(budget_store, clock.now, project="lingo", user="fresh") == "lingo-monthly"
    clock.advance(minutes=30)  # 23:00 UTC = 00:00 on 1 Dec in Berlin
    assert blocked(budget_store, clock.now, project="lingo", user="fresh") is None


def test_dst_day_is_23_hours_long(tmp_path: Path) -> None:
    # Berlin springs forward on 29 Mar 2026: that day is 28 Mar 23:00 UTC .. 29 Mar 22:00 UTC.
    clock = FakeClock(datetime(2026, 3, 29, 21, 30, tzinfo=UTC))  # 23:30 local (UTC+2)
    store = open_with(tmp_path, clock)
    try:
        store.budgets.sync_definitions()
        send(store, clock.now, output_tokens=100_000, project="lingo", user="u-1")
        decision = store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": "u-1"}, clock.now)
        assert decision is not None and decision.flag.until == datetime(2026, 3, 29, 22, tzinfo=UTC)
        # An event at 22:30 UTC on 28 Mar (23:30 local, UTC+1) belongs to the day before: it does not count.
        send(store, datetime(2026, 3, 28, 22, 30, tzinfo=UTC), output_tokens=100_000, project="lingo", user="u-2")
        send(store, datetime(2026, 3, 28, 23, 0, tzinfo=UTC), output_tokens=50_000, project="lingo", user="u-2")
        assert store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": "u-2"}, clock.now) is None
        clock.advance(minutes=30)  # 22:00 UTC: 00:00 on 30 Mar local
        assert store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo", "user": "u-1"}, clock.now) is None
    finally:
        store.close()


def test_rolling_window_slides_out(budget_store: Store, clock: FakeClock) -> None:
    t0 = datetime(2026, 11, 26, 12, 0, 30, tzinfo=UTC)
    clock.now = t0
    send(budget_store, t0, model="claude-opus-4-5-20251101", output_tokens=600)  # alias resolves to the budget's model
    clock.now = t0 + timedelta(minutes=20)
    send(budget_store, clock.now, model="claude-opus-4-5", output_tokens=400)  # 1,000 output tokens in the hour
    assert blocked(budget_store, clock.now, model="claude-opus-4-5") == "opus-output-hourly"
    assert blocked(budget_store, clock.now, model="claude-haiku-4-5") is None
    decision = budget_store.budgets.throttle.decide("claude-opus-4-5", {}, clock.now)
    assert decision is not None
    # The 600 tokens sit in the 12:00 minute bucket; they leave the hour at 13:01, and 400 < 1,000 remain.
    assert decision.flag.until == datetime(2026, 11, 26, 13, 1, tzinfo=UTC)
    assert decision.retry_after(clock.now) == 41 * 60 - 30
    clock.now = datetime(2026, 11, 26, 13, 0, 59, tzinfo=UTC)
    budget_store.budgets.evaluate()
    assert blocked(budget_store, clock.now, model="claude-opus-4-5") == "opus-output-hourly"
    clock.now = datetime(2026, 11, 26, 13, 1, tzinfo=UTC)
    assert blocked(budget_store, clock.now, model="claude-opus-4-5") is None  # freed before any evaluation
    budget_store.budgets.evaluate()
    state = {s.budget.name: s for s in budget_store.budgets.states()}["opus-output-hourly"]
    assert state.amount == 400 and not state.throttled


def test_request_limit_over_an_iso_week(budget_store: Store, clock: FakeClock) -> None:
    for _ in range(3):
        send(budget_store, clock.now, input_tokens=1, feature="translate")
    assert blocked(budget_store, clock.now, feature="translate") == "requests-weekly"
    decision = budget_store.budgets.throttle.decide("claude-haiku-4-5", {"feature": "translate"}, clock.now)
    assert decision is not None
    # Thursday 26 Nov: the Berlin week ends Monday 30 Nov 00:00 local = 29 Nov 23:00 UTC.
    assert decision.flag.until == datetime(2026, 11, 29, 23, tzinfo=UTC)


def test_evaluation_reads_rollups_not_the_events_table(budget_store: Store, clock: FakeClock) -> None:
    send(budget_store, clock.now, output_tokens=100_000, project="lingo", user="u-1")
    send(budget_store, clock.now, output_tokens=10_000, project="lingo", user="u-2")
    with budget_store.engine.begin() as connection:
        connection.execute(delete(events))
        assert connection.execute(select(func.count()).select_from(events)).scalar() == 0
    budget_store.budgets.evaluate()
    states = {(s.budget.name, s.scope.get("user")): s for s in budget_store.budgets.states()}
    assert states["per-user-daily", "u-1"].usage.cost_pico == 500_000_000_000  # $0.50
    assert states["lingo-monthly", None].usage.cost_pico == 550_000_000_000  # $0.55
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") == "per-user-daily"


def test_an_evaluations_reads_share_one_snapshot(budget_store: Store, clock: FakeClock) -> None:
    """Budgets read one after another in one evaluation see the same committed state, whatever commits between."""
    send(budget_store, clock.now, output_tokens=100_000, project="lingo", user="u-1")
    since = datetime(2000, 1, 1, tzinfo=UTC)
    with budget_store.engine.connect() as reading:
        before = dict(window_totals(reading, "lingo-monthly", since))
        send(budget_store, clock.now, output_tokens=100_000, project="lingo", user="u-1")  # another connection
        during = dict(window_totals(reading, "lingo-monthly", since))
    with budget_store.engine.connect() as fresh:
        after = dict(window_totals(fresh, "lingo-monthly", since))
    assert [usage.output for usage in before.values()] == [100_000]
    assert during == before
    assert [usage.output for usage in after.values()] == [200_000]


def test_new_budget_is_counted_from_events_already_stored(tmp_path: Path, clock: FakeClock) -> None:
    store = open_with(tmp_path, clock, "timezone: UTC\n")
    send(store, clock.now - timedelta(hours=1), output_tokens=300_000, project="lingo", user="u-1")  # $1.50
    send(store, clock.now - timedelta(days=1), output_tokens=300_000, project="lingo", user="u-1")  # yesterday
    store.close()
    store = open_with(
        tmp_path,
        clock,
        "timezone: UTC\nbudgets:\n  - {name: d, match: {project: lingo}, "
        "window: day, limit_usd: 2, throttle_at: 0.75}\n",
    )
    try:
        assert store.budgets.sync_definitions() == ["d"]
        assert store.budgets.sync_definitions() == []  # unchanged: nothing recounted
        store.budgets.evaluate()
        (state,) = store.budgets.states()
        assert state.usage.cost_pico == 1_500_000_000_000 and state.throttled  # $1.50 >= 0.75 x $2
    finally:
        store.close()


def test_forecast_is_the_window_average_held_to_its_end(tmp_path: Path) -> None:
    # At 05:00 UTC on 26 Nov, $10 has been spent this month (Berlin time).
    clock = FakeClock(datetime(2026, 11, 26, 5, tzinfo=UTC))
    store = open_with(tmp_path, clock)
    try:
        store.budgets.sync_definitions()
        send(store, clock.now - timedelta(hours=1), output_tokens=2_000_000, project="lingo", user="big")
        store.budgets.evaluate()
        monthly = {s.budget.name: s for s in store.budgets.states()}["lingo-monthly"]
        # Month so far: 1 Nov 00:00 local = 31 Oct 23:00 UTC .. 26 Nov 05:00 UTC = 606 h; rest of the month:
        # 26 Nov 05:00 UTC .. 30 Nov 23:00 UTC = 114 h. The window's average, $10 / 606 h, for 114 h.
        expected = Decimal(10) + Decimal(10) * 114 / 606
        assert abs(Decimal(monthly.forecast_cost_pico) / 10**12 - expected) < Decimal("0.000001")
        # An hour later with $5 more: still the window's average ($15 / 607 h), not the last hour's $5/h.
        clock.advance(hours=1)
        send(store, clock.now - timedelta(minutes=1), output_tokens=1_000_000, project="lingo", user="big")
        store.budgets.evaluate()
        monthly = {s.budget.name: s for s in store.budgets.states()}["lingo-monthly"]
        expected = Decimal(15) + Decimal(15) * 113 / 607
        assert abs(Decimal(monthly.forecast_cost_pico) / 10**12 - expected) < Decimal("0.000001")
    finally:
        store.close()


def test_a_young_window_is_averaged_over_a_day_at_least(tmp_path: Path) -> None:
    # 1 Dec 01:00 in Berlin (00:00 UTC): one hour into the month, $10 spent. Averaged over one hour the month would
    # end at $7,210; averaged over the first day it ends at $10 + $10 x 743 h / 24 h.
    clock = FakeClock(datetime(2026, 12, 1, 0, tzinfo=UTC))
    store = open_with(tmp_path, clock)
    try:
        store.budgets.sync_definitions()
        send(store, clock.now - timedelta(minutes=30), output_tokens=2_000_000, project="lingo", user="big")
        store.budgets.evaluate()
        monthly = {s.budget.name: s for s in store.budgets.states()}["lingo-monthly"]
        expected = Decimal(10) + Decimal(10) * 743 / 24
        assert abs(Decimal(monthly.forecast_cost_pico) / 10**12 - expected) < Decimal("0.000001")
    finally:
        store.close()


@pytest.mark.slow
def test_budgets_command_json_shape(tmp_path: Path) -> None:
    from tests.conftest import jsonl, run_cli

    now = datetime.now(UTC)
    config = write_config(
        tmp_path,
        "budgets:\n  - {name: all-daily, window: day, limit_usd: 10, alert_at: [0.5]}\n"
        "  - {name: u, per: user, window: day, limit_usd: 1, throttle_at: 1.0}\n",
    )
    usage = jsonl(
        tmp_path / "u.jsonl",
        {
            "request_id": "a",
            "timestamp": now.isoformat(),
            "model": "claude-haiku-4-5",
            "usage": {"output_tokens": 400_000},
            "attributes": {"user": "u-1"},
        },
    )  # $2.00
    run_cli("ingest", str(usage), "--config", str(config))
    rows = run_cli("budgets", "--format", "json", "--config", str(config)).json()
    by = {(row["budget"], row["scope"].get("user")): row for row in rows}
    daily = by["all-daily", None]
    assert daily["scope"] == {} and daily["spend_usd"] == "2.000000" and daily["limit_usd"] == "10.000000"
    assert daily["utilization"] == 0.2 and daily["throttled"] is False
    assert set(daily) >= {
        "budget",
        "scope",
        "window_start",
        "window_end",
        "spend_usd",
        "limit_usd",
        "utilization",
        "forecast_usd",
        "throttled",
    }
    assert by["u", "u-1"]["throttled"] is True and by["u", "u-1"]["utilization"] == 2.0
    table = run_cli("budgets", "--config", str(config)).stdout
    assert "all-daily" in table and "u=" not in table and "user=u-1" in table


def test_an_event_stamped_in_tomorrows_window_counts_tomorrow(budget_store: Store, clock: FakeClock) -> None:
    # Clock skew lets an event be up to 24 h ahead. At 12:00 UTC on 26 Nov (13:00 Berlin), one stamped 23:30 UTC
    # belongs to Berlin's 27 Nov: it must not throttle u-1 today.
    send(budget_store, clock.now + timedelta(hours=11, minutes=30), output_tokens=100_000, project="lingo", user="u-1")
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") is None
    budget_store.budgets.evaluate()
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") is None
    clock.now = datetime(2026, 11, 26, 23, 0, tzinfo=UTC)  # Berlin's 27 Nov begins: now it counts
    budget_store.budgets.evaluate()
    assert blocked(budget_store, clock.now, project="lingo", user="u-1") == "per-user-daily"
