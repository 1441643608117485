"""End to end against a real `serve` process over real HTTP: ingest, throttle, snapshot, metrics, restart."""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from monitor import simulate
from tests.conftest import write_config
from tests.serve_harness import TOKEN, Serve, sum_metric, wait_until
from tests.test_ingest import reference_cost

# Starts `serve` processes: in the slow lane (`scripts/test -m slow`); tests/test_api_inprocess.py covers the
# routes in the fast lane.
pytestmark = pytest.mark.slow

CONFIG = """\
timezone: Europe/Berlin
http: {listen: "127.0.0.1:0", max_body_bytes: 2000000}
sources: [{type: jsonl, path: "usage/*.jsonl", name: app-logs}]
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    alert_at: [0.8]
    throttle_at: 1.0
  - name: lingo-monthly
    match: {project: lingo}
    window: month
    limit_usd: 1000000
"""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    (tmp_path / "usage").mkdir()
    daemon = Serve(write_config(tmp_path, CONFIG), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


def usage_event(request_id: str, user: str, output_tokens: int, when: datetime | None = None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "timestamp": (when or datetime.now(UTC)).isoformat(),
        "model": "claude-haiku-4-5-20251001",
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user},
    }


def test_per_user_budget_throttles_before_the_ingest_answer_returns(serve: Serve, tmp_path: Path) -> None:
    # 100,000 output tokens x $5/M = $0.50 = the daily limit: u-1 is stopped the moment the 202 comes back,
    # although the scheduled evaluation runs only every 60 s.
    answer = serve.post_usage(usage_event("req-u1", "u-1", 100_000))
    assert answer.status == 202 and answer.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    check = serve.get("/v1/check?project=lingo&user=u-1&model=claude-haiku-4-5")
    assert check.status == 429
    body = check.json()
    assert body["budget"] == "per-user-daily"
    assert body["scope"] == {"project": "lingo", "user": "u-1"}
    assert body["spend_usd"] == "0.500000" and body["limit_usd"] == "0.500000"
    assert body["utilization"] == 1.0
    assert body["action"] == "block" and body["budgets"] == ["per-user-daily"]  # the snapshot's flag, and who holds
    until = datetime.fromisoformat(body["until"].replace("Z", "+00:00"))
    assert 0 < int(check.headers["retry-after"]) <= (until - datetime.now(UTC)).total_seconds() + 2
    assert until.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")).time().hour == 0  # Berlin midnight
    # The other learner is not stopped; identity can also come as X-Monitor-<Dimension> headers.
    assert serve.get("/v1/check?project=lingo&user=u-2").status == 204
    assert serve.get("/v1/check", {"X-Monitor-Project": "lingo", "X-Monitor-User": "u-1"}).status == 429
    assert serve.get("/v1/check", {"X-Monitor-Project": "lingo", "X-Monitor-User": "u-2"}).status == 204
    # nginx auth_request only understands 401/403: a proxy may ask for one.
    assert serve.get("/v1/check?project=lingo&user=u-1&deny_status=403").status == 403

    snapshot = json.loads((tmp_path / "throttle.json").read_text())
    assert snapshot["version"] >= 1
    assert [(f["budget"], f["scope"], f["action"]) for f in snapshot["flags"]] == [
        ("per-user-daily", {"project": "lingo", "user": "u-1"}, "block")
    ]

    state = serve.get("/v1/throttle")
    assert state.status == 200 and state.json()["flags"][0]["scope"]["user"] == "u-1"
    assert serve.get("/v1/throttle", {"If-None-Match": state.headers["etag"]}).status == 304

    budgets = {(row["budget"], row["scope"].get("user")): row for row in serve.get("/v1/budgets").json()}
    assert budgets["per-user-daily", "u-1"]["throttled"] is True
    assert budgets["lingo-monthly", None]["spend_usd"] == "0.500000"
    metrics = serve.metrics()
    assert sum_metric(metrics, "claude_budget_scopes_throttled", budget="per-user-daily") == 1
    assert not any("u-1" in str(labels) for (_name, labels) in metrics)  # per-user values never become labels


def test_ingest_authentication_limits_and_bad_bodies(serve: Serve, tmp_path: Path) -> None:
    event = usage_event("req-a", "u-3", 10)
    assert serve.post_usage(event, token=None).status == 401
    assert serve.post_usage(event, token="wrong").status == 401
    # 413 is answered from Content-Length alone: send only the headers of a 2 MB body and read the answer.
    host, port = serve.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/usage")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", "2000001")
    connection.endheaders()
    too_big = connection.getresponse()
    assert too_big.status == 413 and b"2,000,001 bytes" in too_big.read()
    connection.close()
    garbage = serve.post_usage(b"this is not json\nnor this")
    assert garbage.status == 400
    ndjson = "\n".join([json.dumps(usage_event("req-b", "u-3", 10)), "{broken", json.dumps({"request_id": "x"})])
    answer = serve.post_usage(ndjson, content_type="application/x-ndjson")
    assert answer.status == 202
    assert answer.json()["accepted"] == 1
    assert [r["index"] for r in answer.json()["rejected"]] == [1, 2]
    assert "timestamp" in answer.json()["rejected"][1]["error"]
    database = sqlite3.connect(tmp_path / "monitor.db")
    reasons = [row[0] for row in database.execute("SELECT reason FROM dead_letters ORDER BY id")]
    assert reasons[0] == "body is neither JSON nor NDJSON"
    assert len(reasons) == 3
    assert database.execute("SELECT count(*) FROM events").fetchone()[0] == 1


def test_tail_and_post_count_once_metrics_exact_and_restart_counts_nothing_twice(serve: Serve, tmp_path: Path) -> None:
    end = datetime.now(UTC)
    lines = list(simulate.generate_events(count=2_000, start=end - timedelta(hours=2), end=end, seed=5))
    expected = sum((reference_cost(json.loads(line))[1] for line in lines), Decimal(0))
    tailed = tmp_path / "usage" / "app.jsonl"
    tailed.write_text("".join(line + "\n" for line in lines[:1_200]))
    answer = serve.post_usage("\n".join(lines[800:]), content_type="application/x-ndjson")  # 400 overlap the file
    assert answer.status == 202
    wait_until(lambda: sum_metric(serve.metrics(), "claude_requests_total") == 2_000)
    metrics = serve.metrics()
    accepted = sum_metric(metrics, "claude_monitor_ingest_events_total", outcome="accepted")
    duplicates = sum_metric(metrics, "claude_monitor_ingest_events_total", outcome="duplicate")
    assert (accepted, duplicates) == (2_000, 400)
    cost = sum_metric(metrics, "claude_cost_usd_total")
    assert abs(Decimal(repr(cost)) - expected) < Decimal("0.000001")  # to the micro-dollar
    assert sum_metric(metrics, "claude_monitor_ingest_events_total", source="app-logs", outcome="accepted") > 0

    assert serve.stop(signal.SIGTERM) == 0
    assert "stopped cleanly" in serve.output()

    restarted = Serve(write_config(tmp_path, CONFIG), tmp_path)
    try:
        extra = list(simulate.generate_events(count=10, start=end - timedelta(minutes=5), end=end, seed=99))
        with tailed.open("a") as out:
            out.write("".join(line + "\n" for line in extra))
        wait_until(lambda: sum_metric(restarted.metrics(), "claude_requests_total") == 2_010)
        again = restarted.post_usage("\n".join(lines[:100]), content_type="application/x-ndjson")
        assert again.json()["duplicates"] == 100 and again.json()["accepted"] == 0
        metrics = restarted.metrics()
        assert sum_metric(metrics, "claude_requests_total") == 2_010
        extra_cost = sum((reference_cost(json.loads(line))[1] for line in extra), Decimal(0))
        assert abs(Decimal(repr(sum_metric(metrics, "claude_cost_usd_total"))) - expected - extra_cost) < Decimal(
            "0.000001"
        )
        rows = sqlite3.connect(tmp_path / "monitor.db").execute("SELECT count(*) FROM events").fetchone()[0]
        assert rows == 2_010
    finally:
        assert restarted.stop(signal.SIGTERM) == 0


def test_health_and_readiness(serve: Serve) -> None:
    assert serve.get("/healthz").status == 200
    ready = serve.get("/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True
    assert serve.get("/nope").status == 404


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    from tests.conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            f'http: {{listen: "127.0.0.1:{port}"}}\nsources: []\n'
            f"throttle: {{snapshot_file: {tmp_path / 'throttle.json'}}}\n",
        )
        run = run_cli("serve", "--config", str(config), check=False)
    assert run.returncode == 2
    assert f"http.listen 127.0.0.1:{port}: cannot listen there: Address already in use" in run.stderr
    assert "Traceback" not in run.stderr
