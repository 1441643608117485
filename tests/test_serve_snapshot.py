"""A real `serve` whose throttle snapshot file cannot be written: ingest, checks, readiness and metrics go on."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.serve_harness import Serve, sum_metric

# Starts `serve` processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

CONFIG = """\
http: {{listen: "127.0.0.1:0"}}
sources: []
throttle: {{snapshot_file: {snapshot}}}
schedule: {{evaluate_every: 60s}}
budgets:
  - name: lingo-daily
    match: {{project: lingo}}
    window: day
    limit_usd: 0.50
    throttle_at: 1.0
"""


def under_a_regular_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the snapshot's directory should be\n")
    return blocker / "throttle.json"


def a_directory_in_its_place(tmp_path: Path) -> Path:
    path = tmp_path / "throttle.json"
    (path / "something").mkdir(parents=True)  # a non-empty directory: no rename can replace it
    return path


@pytest.mark.parametrize("unwritable", [under_a_regular_file, a_directory_in_its_place])
def test_unwritable_snapshot_breaks_nothing(tmp_path: Path, unwritable: Callable[[Path], Path]) -> None:
    snapshot = unwritable(tmp_path)
    serve = Serve(write_config(tmp_path, CONFIG.format(snapshot=snapshot)), tmp_path)  # waits for /readyz 200
    try:
        assert serve.get("/v1/check?project=lingo").status == 204
        # 100,000 output tokens of claude-haiku-4-5 at $5 per million = $0.50: the daily limit, reached.
        crossing = {
            "request_id": "req_crossing",
            "timestamp": datetime.now(UTC).isoformat(),
            "model": "claude-haiku-4-5",
            "usage": {"input_tokens": 0, "output_tokens": 100_000},
            "attributes": {"project": "lingo"},
        }
        answer = serve.post_usage(crossing)
        assert answer.status == 202, answer.body
        assert answer.json()["accepted"] == 1

        check = serve.get("/v1/check?project=lingo")
        assert check.status == 429, check.body
        assert check.json()["budget"] == "lingo-daily"
        assert serve.get("/v1/check?project=other").status == 204

        ready = serve.get("/readyz")
        assert ready.status == 200, ready.body
        # The evaluation at start and the fast path each tried to write the file.
        assert sum_metric(serve.metrics(), "claude_monitor_snapshot_errors_total") >= 2
        log = serve.output()
        assert log.count("cannot write it") == 1, log  # rate-limited: one line, not one per write
        assert "Traceback" not in log
    finally:
        assert serve.stop(signal.SIGTERM) == 0  # the final snapshot write at shutdown fails quietly too
