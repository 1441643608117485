"""The throttle state under concurrency and failure: the snapshot file's mode, a snapshot that cannot be written,
a fast-path flag racing a full evaluation, and readers of the budget states while evaluations replace them."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.exc import OperationalError

from monitor.budgets import engine
from monitor.budgets.counters import Usage
from monitor.budgets.engine import state_json
from monitor.budgets.throttle import ThrottleState
from monitor.config import load_settings
from monitor.metrics import MonitorCollector
from monitor.service import Store, open_store
from monitor.wire import scope_key
from tests.conftest import FakeClock, write_config


def test_snapshot_file_is_readable_by_other_users_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "throttle.json"
    state = ThrottleState(path)
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    old_umask = os.umask(0o077)  # a daemon started with a strict umask
    try:
        state.write_snapshot(now)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        state.write_snapshot(now)  # a rewrite replaces the file: the new one has the same mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)
    assert json.loads(path.read_text())["flags"] == []
    assert [p.name for p in path.parent.iterdir()] == ["throttle.json"]  # no temp file left behind


class Ticks:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unwritable_snapshot_is_counted_and_logged_once_a_minute_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the snapshot's directory should be\n")
    ticks = Ticks()
    state = ThrottleState(blocker / "throttle.json", monotonic=ticks)
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    with caplog.at_level(logging.INFO, logger="monitor.budgets.throttle"):
        for _ in range(3):
            assert state.write_snapshot(now) is False
            ticks.now += 10
        assert state.snapshot_errors == 3
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # three failures within a minute: one line
        assert str(blocker / "throttle.json") in errors[0].getMessage()
        assert "throttle.snapshot_file" in errors[0].getMessage()  # what to do

        ticks.now += 60
        assert state.write_snapshot(now) is False
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert "2 more failed writes" in errors[1].getMessage()  # the two quiet ones are not lost

        blocker.unlink()
        blocker.mkdir()
        assert state.write_snapshot(now) is True
        assert state.snapshot_errors == 4  # a counter: it never goes down
        assert any("written again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert json.loads((blocker / "throttle.json").read_text())["flags"] == []


DAILY = """\
budgets:
  - name: lingo-daily
    match: {project: lingo}
    window: day
    limit_usd: 0.50
    throttle_at: 1.0
"""


def crossing_event(request_id: str, when: datetime) -> dict[str, Any]:
    """100,000 output tokens of claude-haiku-4-5 at $5 per million: $0.50, the whole daily limit."""
    return {
        "request_id": request_id,
        "timestamp": when.isoformat(),
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 0, "output_tokens": 100_000},
        "attributes": {"project": "lingo"},
    }


def checked(store: Store, now: datetime) -> str | None:
    """What /v1/check decides for a lingo caller: the budget that stops it, or None."""
    decision = store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo"}, now)
    return None if decision is None else decision.flag.budget


def test_fast_path_flag_set_while_an_evaluation_reads_survives_that_evaluation(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "throttle.json"
    store = open_store(load_settings(write_config(tmp_path, DAILY), environ={}), clock=clock, snapshot_file=snapshot)
    try:
        store.budgets.sync_definitions()
        store.budgets.evaluate()
        assert checked(store, clock.now) is None

        read_done, batch_done = threading.Event(), threading.Event()
        real_window_totals = engine.window_totals

        def read_then_wait_for_the_batch(*args: Any) -> list[Any]:
            rows = list(real_window_totals(*args))  # the evaluation's read, finished before the batch commits
            read_done.set()
            assert batch_done.wait(30), "the test never released the evaluation"
            return rows

        monkeypatch.setattr(engine, "window_totals", read_then_wait_for_the_batch)
        failures: list[BaseException] = []

        def evaluate() -> None:
            try:
                store.budgets.evaluate()
            except BaseException as exc:  # handed to the test thread
                failures.append(exc)

        worker = threading.Thread(target=evaluate)
        worker.start()
        try:
            assert read_done.wait(30), "the evaluation never read"
            result = store.ingestor.submit([("test", store.parser.parse_object(crossing_event("r1", clock.now)))], "t")
            assert result.accepted == 1  # the ingestor took the fast path after the commit
            assert checked(store, clock.now) == "lingo-daily"
        finally:
            batch_done.set()
            worker.join(30)
        assert not worker.is_alive() and not failures, failures

        # The evaluation read the store before the batch: its flag set lacks the scope, yet the flag holds.
        assert checked(store, clock.now) == "lingo-daily"
        assert [f["budget"] for f in json.loads(snapshot.read_text())["flags"]] == ["lingo-daily"]
        # ...and /v1/budgets shows the spend the fast path saw, not the evaluation's older read.
        rows = [state_json(st, store.budgets.throttle.flags, clock.now) for st in store.budgets.states()]
        assert [(r["budget"], r["spend_usd"], r["throttled"]) for r in rows] == [("lingo-daily", "0.500000", True)]

        monkeypatch.setattr(engine, "window_totals", real_window_totals)
        clock.advance(seconds=15)
        store.budgets.evaluate()  # one that sees the batch keeps the flag on its own account
        assert checked(store, clock.now) == "lingo-daily"
    finally:
        store.close()


def test_an_evaluation_still_clears_flags_the_fast_path_set_before_it_read(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(load_settings(write_config(tmp_path, DAILY), environ={}), clock=clock)
    try:
        store.budgets.sync_definitions()
        store.ingestor.submit([("test", store.parser.parse_object(crossing_event("r1", clock.now)))], "t")
        assert checked(store, clock.now) == "lingo-daily"
        clock.advance(days=1)  # a new day: the scope is under its limit again
        store.budgets.evaluate()
        assert checked(store, clock.now) is None
        assert store.budgets.throttle.flags == {}
    finally:
        store.close()


PER_USER = """\
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 1
    alert_at: [0.01]
    throttle_at: 1.0
  - name: lingo-daily
    match: {project: lingo}
    window: day
    limit_usd: 1000
"""


def test_scrapes_and_budget_reads_never_see_states_change_under_them(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(load_settings(write_config(tmp_path, PER_USER), environ={}), clock=clock)
    registry = CollectorRegistry()
    registry.register(MonitorCollector(store.engine, store.budgets, [], dict, clock))
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within a few hundred loops
    try:
        store.budgets.sync_definitions()
        store.budgets.evaluate()
        done = threading.Event()
        failures: list[BaseException] = []

        def read() -> None:
            try:
                for _ in range(5_000):
                    generate_latest(registry)  # a scrape
                    [state_json(st, store.budgets.throttle.flags, clock.now) for st in store.budgets.states()]
                    if done.is_set():
                        return
            except BaseException as exc:  # handed to the test thread
                failures.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for user in range(2_000):
                # $0.02 for one more user: over the 1% alert threshold, so the scope joins the shown states.
                scope = scope_key({"project": "lingo", "user": f"u-{user}"})
                store.budgets.on_batch({("per-user-daily", scope): Usage(requests=1, cost_pico=2 * 10**10)})
                if user % 200 == 199:
                    store.budgets.evaluate()
        finally:
            done.set()
            reader.join(60)
        assert not reader.is_alive()
        assert not failures, failures
    finally:
        sys.setswitchinterval(old_interval)
        store.close()


def test_states_a_reader_holds_do_not_change_when_a_batch_or_an_evaluation_lands(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = open_store(load_settings(write_config(tmp_path, PER_USER), environ={}), clock=clock)
    try:
        store.budgets.sync_definitions()
        store.budgets.evaluate()

        def over_the_alert_threshold(user: str) -> None:
            scope = scope_key({"project": "lingo", "user": user})
            store.budgets.on_batch({("per-user-daily", scope): Usage(requests=1, cost_pico=2 * 10**10)})  # $0.02

        over_the_alert_threshold("u-1")
        held = store.budgets.summaries["per-user-daily"].states
        seen = []
        for scope_state in held.values():  # a scrape in the middle of its loop when a batch lands
            seen.append(scope_state.scope["user"])
            over_the_alert_threshold("u-2")
            store.budgets.evaluate()
        assert seen == ["u-1"]
        assert [st.scope["user"] for st in held.values()] == ["u-1"]  # what a reader holds never changes
    finally:
        store.close()


ROLLING = """\
budgets:
  - name: one-request-an-hour
    match: {project: lingo}
    window: rolling:1h
    limit_requests: 1
    throttle_at: 1.0
"""


def test_fast_path_flags_even_when_it_cannot_read_a_rolling_scopes_buckets(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(load_settings(write_config(tmp_path, ROLLING), environ={}), clock=clock)
    try:
        store.budgets.sync_definitions()
        store.budgets.evaluate()
        result = store.writer.write([("test", store.parser.parse_object(crossing_event("r1", clock.now)))], "t")
        assert result.accepted == 1

        def database_gone(*args: Any) -> list[Any]:
            raise OperationalError("SELECT … FROM budget_usage", None, Exception("server closed the connection"))

        monkeypatch.setattr(engine, "scope_buckets", database_gone)
        assert store.budgets.on_batch(result.touched) is True  # no exception: the ingest answer still goes out
        decision = store.budgets.throttle.decide("claude-haiku-4-5", {"project": "lingo"}, clock.now)
        assert decision is not None and decision.flag.budget == "one-request-an-hour"
        # As if the request had just happened: its 1-minute bucket (12:00) ages out of the hour at 13:01.
        assert decision.flag.until == datetime(2026, 11, 26, 13, 1, tzinfo=UTC)
    finally:
        store.close()


def test_fast_path_moves_to_the_next_local_day_at_midnight_in_the_configured_timezone(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Europe/Berlin is UTC+1 on 26 November: its day of the 26th is 25 Nov 23:00Z to 26 Nov 23:00Z.
    text = "timezone: Europe/Berlin\n" + PER_USER
    store = open_store(load_settings(write_config(tmp_path, text), environ={}), clock=clock)
    try:
        store.budgets.sync_definitions()
        store.budgets.evaluate()
        scope = scope_key({"project": "lingo", "user": "u-1"})
        day_26 = (datetime(2026, 11, 25, 23, tzinfo=UTC), datetime(2026, 11, 26, 23, tzinfo=UTC))
        day_27 = (datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 23, tzinfo=UTC))

        def window_after_a_batch() -> tuple[datetime, datetime]:
            store.budgets.on_batch({("per-user-daily", scope): Usage(requests=1, cost_pico=2 * 10**10)})
            state = store.budgets.summaries["per-user-daily"].states[scope]
            return state.window_start, state.window_end

        clock.now = datetime(2026, 11, 26, 22, 59, 59, tzinfo=UTC)
        assert window_after_a_batch() == day_26
        clock.now = datetime(2026, 11, 26, 23, 0, 0, tzinfo=UTC)  # local midnight: the 27th's window
        assert window_after_a_batch() == day_27
        clock.now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)  # a clock set back: the 26th's window again
        assert window_after_a_batch() == day_26
    finally:
        store.close()
