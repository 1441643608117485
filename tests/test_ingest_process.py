"""The ingest worker process: HTTP bodies and tailed batches are parsed, priced and written there, and an evaluation's
reads done there, on the daemon's clock, with flags flipped before the answer; a worker that dies is replaced;
`http.ingest_process: false` keeps ingest in the daemon's own process.

A real daemon (`Daemon`, as `serve` builds it) on a loopback port with a FakeClock; its worker is a real process.
claude-haiku-4-5 costs $5 per million output tokens: 200,000 output tokens are $1.00.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor.budgets.engine import read_budgets
from monitor.config import load_settings
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.serve_harness import TOKEN, Response, request, wait_until

# Starts ingest worker processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # days from the machine's clock: the worker must not read its own
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CONFIG = """\
http: {{listen: "127.0.0.1:0", ingest_process: {worker}}}
sources: [{{type: jsonl, path: "{logs}/*.jsonl", name: app-logs}}]
throttle: {{snapshot_file: {snapshot}}}
budgets:
  - {{name: per-user-daily, match: {{project: lingo}}, per: user, window: day, limit_usd: 1.00, throttle_at: 1.0}}
"""


def event(request_id: str, user: str, output_tokens: int, at: datetime = NOW) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "timestamp": at.isoformat(),
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user},
    }


def make_daemon(tmp_path: Path, worker: bool) -> Daemon:
    (tmp_path / "logs").mkdir(exist_ok=True)
    text = CONFIG.format(worker=str(worker).lower(), logs=tmp_path / "logs", snapshot=tmp_path / "throttle.json")
    config = write_config(tmp_path, text)
    clock = FakeClock(NOW)
    return Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    started = make_daemon(tmp_path, worker=True)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def post(daemon: Daemon, body: Any) -> Response:
    url = "http://{}:{}/v1/usage".format(*daemon.address)
    return request(url, "POST", json.dumps(body).encode(), AUTH)


def check(daemon: Daemon, user: str) -> int:
    url = "http://{}:{}/v1/check?project=lingo&user={}&model=claude-haiku-4-5".format(*daemon.address, user)
    return request(url).status


def stored(tmp_path: Path) -> dict[str, str]:
    with sqlite3.connect(tmp_path / "monitor.db") as db:
        return dict(db.execute("SELECT request_id, received_at FROM events").fetchall())


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_ingest_is_written_by_another_process_on_the_daemons_clock_and_flags_before_the_answer(
    daemon: Daemon, tmp_path: Path
) -> None:
    # 200,000 output tokens x $5/M = $1.00: u-1 reaches its $1.00 limit with this one event
    answer = post(daemon, [event("r-1", "u-1", 200_000), event("r-2", "u-2", 1000, at=NOW + timedelta(days=2))])
    assert answer.status == 202
    body = answer.json()
    assert body["accepted"] == 1
    # Two days ahead of the daemon's clock is refused; the machine's own clock is days later, where it would pass.
    assert [r["index"] for r in body["rejected"]] == [1] and "in the future" in body["rejected"][0]["error"]
    assert check(daemon, "u-1") == 429  # the flag was up before the 202 came back
    assert check(daemon, "u-2") == 204
    worker = daemon.ingest_process
    assert worker is not None and worker.pid is not None and worker.pid != os.getpid()
    assert stored(tmp_path)["r-1"].startswith("2026-11-26 12:00:00")  # received at the daemon's now


def test_a_killed_worker_is_replaced_and_the_next_ingest_is_stored(daemon: Daemon, tmp_path: Path) -> None:
    assert post(daemon, event("before", "u-3", 10)).status == 202
    worker = daemon.ingest_process
    assert worker is not None and worker.pid is not None
    first = worker.pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: gone(first))
    answer = post(daemon, event("after", "u-3", 10))
    assert answer.status == 202, answer.body
    assert worker.pid is not None and worker.pid != first
    assert set(stored(tmp_path)) == {"before", "after"}


def test_tailed_lines_are_written_by_the_worker(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, worker=True)
    try:
        assert daemon.ingest_process is not None and daemon.ingest_process.pid is None  # not started yet
        line = json.dumps(event("tail-1", "u-4", 200_000))
        (tmp_path / "logs" / "app.jsonl").write_text(line + "\n", encoding="utf-8")
        daemon.tail_once()
        assert daemon.ingest_process.pid is not None  # the tailer's write started it
        assert list(stored(tmp_path)) == ["tail-1"]
        assert ("per-user-daily", '{"project":"lingo","user":"u-4"}') in daemon.budgets.throttle.flags
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()


def test_without_the_worker_ingest_stays_in_the_daemons_process(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, worker=False)
    daemon.start()
    try:
        assert daemon.ingest_process is None
        assert post(daemon, event("r-1", "u-1", 200_000)).status == 202
        assert check(daemon, "u-1") == 429
        assert list(stored(tmp_path)) == ["r-1"]
    finally:
        daemon.stop()


def test_an_evaluation_reads_in_the_worker_what_it_would_read_here(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, worker=True)
    try:
        store = daemon.store
        items = [
            # u-1: 200,000 output tokens x $5/M = $1.00, its whole limit; u-2: 20,000 x $5/M = $0.10
            ("t#0", store.parser.parse_object(event("e-1", "u-1", 200_000))),
            ("t#1", store.parser.parse_object(event("e-2", "u-2", 20_000))),
        ]
        store.writer.write(items, "test")
        assert daemon.ingest_process is not None and daemon.ingest_process.pid is None
        daemon.evaluate()
        assert daemon.ingest_process.pid is not None  # the evaluation's reads started it
        spend = {state.scope["user"]: state.usage.cost_pico for state in daemon.budgets.states()}
        assert spend == {"u-1": 1_000_000_000_000, "u-2": 100_000_000_000}  # $1.00 and $0.10 in pico-dollars
        assert list(daemon.budgets.throttle.flags) == [("per-user-daily", '{"project":"lingo","user":"u-1"}')]
        with store.engine.connect() as connection:
            here = read_budgets(connection, daemon.budgets.budgets, NOW, daemon.settings.zone)
        assert daemon.ingest_process.read_budgets(daemon.budgets.budgets, NOW) == here
    finally:
        daemon.server.stop()  # never started: closes the listening socket
        daemon.store.close()
