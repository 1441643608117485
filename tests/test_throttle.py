"""The throttle state under concurrency and failure: the snapshot file's mode, a snapshot that cannot be written,
a fast-path flag racing a full evaluation, and readers of the budget states while evaluations replace them."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from monitor.throttle import ThrottleState


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
