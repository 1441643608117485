"""The throttle state under concurrency and failure: the snapshot file's mode, a snapshot that cannot be written,
a fast-path flag racing a full evaluation, and readers of the budget states while evaluations replace them."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from monitor import evaluation
from monitor.config import load_settings
from monitor.service import Store, open_store
from monitor.throttle import ThrottleState
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
    with caplog.at_level(logging.INFO, logger="monitor.throttle"):
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
        real_window_totals = evaluation.window_totals

        def read_then_wait_for_the_batch(*args: Any) -> list[Any]:
            rows = list(real_window_totals(*args))  # the evaluation's read, finished before the batch commits
            read_done.set()
            assert batch_done.wait(30), "the test never released the evaluation"
            return rows

        monkeypatch.setattr(evaluation, "window_totals", read_then_wait_for_the_batch)
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
            result = store.writer.write([("test", store.parser.parse_object(crossing_event("r1", clock.now)))], "t")
            assert result.accepted == 1
            store.budgets.on_batch(result.touched)  # as ingest does, after the commit
            assert checked(store, clock.now) == "lingo-daily"
        finally:
            batch_done.set()
            worker.join(30)
        assert not worker.is_alive() and not failures, failures

        # The evaluation read the store before the batch: its flag set lacks the scope, yet the flag holds.
        assert checked(store, clock.now) == "lingo-daily"
        assert [f["budget"] for f in json.loads(snapshot.read_text())["flags"]] == ["lingo-daily"]

        monkeypatch.setattr(evaluation, "window_totals", real_window_totals)
        clock.advance(seconds=15)
        store.budgets.evaluate()  # one that sees the batch keeps the flag on its own account
        assert checked(store, clock.now) == "lingo-daily"
    finally:
        store.close()


def test_an_evaluation_still_clears_flags_the_fast_path_set_before_it_read(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(load_settings(write_config(tmp_path, DAILY), environ={}), clock=clock)
    try:
        store.budgets.sync_definitions()
        result = store.writer.write([("test", store.parser.parse_object(crossing_event("r1", clock.now)))], "t")
        store.budgets.on_batch(result.touched)
        assert checked(store, clock.now) == "lingo-daily"
        clock.advance(days=1)  # a new day: the scope is under its limit again
        store.budgets.evaluate()
        assert checked(store, clock.now) is None
        assert store.budgets.throttle.flags == {}
    finally:
        store.close()
