"""The throttle state under concurrency and failure: the snapshot file's mode, a snapshot that cannot be written,
a fast-path flag racing a full evaluation, and readers of the budget states while evaluations replace them."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

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
