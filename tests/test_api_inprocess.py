"""The HTTP API in this process: the daemon `serve` builds, its HTTP server on a loopback port, a real SQLite file.

No subprocess: `Daemon` is built and started here with `http.ingest_process: false` (ingest is parsed and written on
this process's threads) and a FakeClock the tests move. Requests go over a real socket. Dollars are worked out by
hand from the shipped price table: claude-haiku-4-5 is $1 per million input tokens and $5 per million output tokens.
"""

from __future__ import annotations

import gc
import http.client
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import load_settings
from monitor.http.api import ApiApp
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.serve_harness import TOKEN, Response, request, sum_metric

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HAIKU = "claude-haiku-4-5"
CONFIG = """\
timezone: UTC
http: {listen: "127.0.0.1:0", ingest_process: false, max_body_bytes: 4096, max_events_per_request: 5}
schedule: {evaluate_every: 1h}
sources: []
admission: {lease_ttl: 60s}
budgets:
  - {name: lingo-daily, match: {project: lingo}, window: day, limit_usd: 0.10, throttle_at: 1.0}
  - {name: adm-daily, match: {project: adm}, window: day, limit_usd: 1.00, throttle_at: 1.0}
limits:
  - {name: per-user, match: {project: adm}, per: user, concurrent: 1}
  - {name: guard, match: {project: adm}, max_tokens: 8000}
"""


class Api:
    """The in-process daemon, its URL and its clock, with helpers for the routes."""

    def __init__(self, daemon: Daemon, clock: FakeClock, database: Path) -> None:
        self.daemon = daemon
        self.clock = clock
        self.database = database
        self.url = "http://{}:{}".format(*daemon.address)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return request(self.url + path, headers=headers)

    def post(
        self, path: str, body: bytes, token: str | None = TOKEN, content_type: str = "application/json"
    ) -> Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return request(self.url + path, "POST", body, headers)

    def usage(self, body: Any, **kwargs: Any) -> Response:
        return self.post("/v1/usage", json.dumps(body).encode(), **kwargs)

    def admit(self, user: str, **fields: Any) -> Response:
        body = {
            "attributes": {"project": "adm", "user": user},
            "model": HAIKU,
            "max_tokens": 1_000,
            "estimated_input_tokens": 1_000,  # worst case: 1,000 x $1/M + 1,000 x $5/M = $0.006
            **fields,
        }
        return self.post("/v1/admit", json.dumps(body).encode())

    def release(self, lease: str, request_id: str, usage: dict[str, int]) -> Response:
        body = {"lease": lease, "request_id": request_id, "usage": usage}
        return self.post("/v1/release", json.dumps(body).encode())

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics").body.decode()):
            for sample in family.samples:
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def spend(self, budget: str, **scope: str) -> str:
        rows = self.get("/v1/budgets").json()
        return str(next(row["spend_usd"] for row in rows if row["budget"] == budget and row["scope"] == scope))

    def rows(self, table: str) -> int:
        with sqlite3.connect(self.database) as connection:
            return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def event(
    request_id: str, output_tokens: int, project: str = "lingo", user: str = "u-1", **extra: Any
) -> dict[str, Any]:
    """A haiku call at the fake clock's noon: output_tokens x $5/M."""
    return {
        "request_id": request_id,
        "timestamp": "2026-11-26T11:59:00Z",
        "model": HAIKU,
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": project, "user": user},
        **extra,
    }


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    clock = FakeClock(NOW)
    config = write_config(tmp_path, CONFIG + f"throttle: {{snapshot_file: {tmp_path / 'throttle.json'}}}\n")
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    daemon.start()  # evaluates once at NOW; the next scheduled evaluation is an hour of real time away
    try:
        yield Api(daemon, clock, tmp_path / "monitor.db")
    finally:
        daemon.stop()
        gc.unfreeze()  # start() froze what it had built; let this test's daemon be collected


def test_usage_takes_one_event_an_array_and_ndjson(api: Api) -> None:
    one = api.usage(event("req-1", 1_000))
    assert one.status == 202 and one.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    array = api.usage([event("req-2", 1_000), event("req-3", 1_000)])
    assert array.status == 202 and array.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    ndjson = "\n".join(json.dumps(e) for e in (event("req-3", 1_000), event("req-4", 1_000))) + "\n"
    lines = api.post("/v1/usage", ndjson.encode(), content_type="application/x-ndjson")
    assert lines.status == 202 and lines.json() == {"accepted": 1, "duplicates": 1, "rejected": []}  # req-3 again
    assert api.rows("events") == 4
    # Four events of 1,000 output tokens: 4 x $0.005 = $0.02.
    assert api.spend("lingo-daily", project="lingo") == "0.020000"


def test_bad_bodies_are_refused_saying_what_and_where_and_good_events_are_kept(api: Api) -> None:
    not_utf8 = api.post("/v1/usage", b'{"a": "\xff"}')
    assert not_utf8.status == 400 and not_utf8.json() == {"error": "body is not UTF-8 (byte 7)", "dead_lettered": True}
    garbage = api.post("/v1/usage", b"this is not json\nnor this")
    assert garbage.status == 400 and garbage.json() == {
        "error": "body is neither JSON nor NDJSON",
        "dead_lettered": True,
    }
    no_time = event("req-bad", 1_000)
    del no_time["timestamp"]
    mixed = api.usage([event("req-good", 1_000), no_time])
    assert mixed.status == 202
    answer = mixed.json()
    assert answer["accepted"] == 1 and [r["index"] for r in answer["rejected"]] == [1]
    assert "timestamp" in answer["rejected"][0]["error"]
    assert api.rows("events") == 1
    with sqlite3.connect(api.database) as connection:
        letters = connection.execute("SELECT source, location, reason FROM dead_letters ORDER BY id").fetchall()
    assert [(source, reason.split(":")[0]) for source, _, reason in letters][:2] == [
        ("http", "body is not UTF-8 (byte 7)"),
        ("http", "body is neither JSON nor NDJSON"),
    ]
    assert len(letters) == 3 and all(location.startswith("POST /v1/usage ") for _, location, _ in letters)
    assert letters[2][1].endswith(" #1") and "timestamp" in letters[2][2]  # the rejected event, by its index


def test_oversize_bodies_get_413_naming_the_bound_and_store_nothing(api: Api) -> None:
    big = json.dumps([event(f"req-{i}", 1) for i in range(40)]).encode()  # about 7 KB, over max_body_bytes 4096
    assert len(big) > 4096
    too_big = api.post("/v1/usage", big)
    assert too_big.status == 413
    assert f"body of {len(big):,} bytes is over the limit of 4,096 (http.max_body_bytes)" in too_big.json()["error"]
    six = json.dumps([event(f"req-{i}", 1) for i in range(6)]).encode()  # small, but over max_events_per_request 5
    too_many = api.post("/v1/usage", six)
    assert too_many.status == 413
    assert "more than 5 events in one request" in too_many.json()["error"]
    assert "http.max_events_per_request" in too_many.json()["error"]
    assert api.rows("events") == 0 and api.rows("dead_letters") == 0


def test_usage_without_the_token_is_401(api: Api) -> None:
    missing = api.usage(event("req-1", 1), token=None)
    assert missing.status == 401 and missing.headers["www-authenticate"] == 'Bearer realm="claude-monitor"'
    assert missing.json()["error"] == "missing or wrong Bearer token"
    assert api.usage(event("req-1", 1), token="wrong").status == 401
    assert api.rows("events") == 0


def test_check_allows_then_throttles_as_soon_as_the_ingest_answer_returns(api: Api) -> None:
    lingo = "/v1/check?project=lingo&user=u-1&model=claude-haiku-4-5"
    assert api.get(lingo).status == 204
    assert api.usage(event("req-1", 10_000)).status == 202  # $0.05 of the $0.10 day
    assert api.get(lingo).status == 204
    assert api.usage(event("req-2", 10_000)).status == 202  # $0.10: at the limit, throttle_at 1.0
    # No evaluation has run since start (the clock has not moved): the write path set the flag.
    check = api.get(lingo)
    assert check.status == 429
    body = check.json()
    assert (body["budget"], body["scope"], body["spend_usd"], body["limit_usd"]) == (
        "lingo-daily",
        {"project": "lingo"},
        "0.100000",
        "0.100000",
    )
    assert body["until"] == "2026-11-27T00:00:00Z"  # the UTC day ends
    assert check.headers["retry-after"] == "43200"  # noon to midnight
    assert check.headers["x-monitor-budget"] == "lingo-daily"
    assert api.get("/v1/check", {"X-Monitor-Project": "lingo"}).status == 429  # identity from headers too
    assert api.get("/v1/check?project=other").status == 204


def test_admit_caps_concurrency_and_a_lease_settled_by_its_usage_event_counts_once(api: Api) -> None:
    capped = api.admit("u-1", max_tokens=9_000)
    assert capped.status == 400 and "retry-after" not in capped.headers
    assert capped.json()["refused_by"] == {"kind": "cap", "name": "guard"}
    assert "max_tokens 9,000 is over the cap of 8,000" in capped.json()["message"]

    first = api.admit("u-1")
    assert first.status == 200
    lease = first.json()["lease"]
    assert first.json()["reserved_usd"] == "0.006000"
    assert first.json()["expires_at"] == "2026-11-26T12:01:00Z"  # lease_ttl 60s from noon
    busy = api.admit("u-1")
    assert busy.status == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["refused_by"] == {"kind": "concurrency", "name": "per-user"}

    # The call's usage event names its lease: 2,000 output tokens = $0.01, and the slot is free again.
    assert api.usage(event("req-adm", 2_000, project="adm", lease=lease)).status == 202
    again = api.admit("u-1")
    assert again.status == 200
    released = api.release(lease, "req-adm", {"input_tokens": 0, "output_tokens": 2_000})
    assert released.status == 200 and released.json() == {"lease": lease, "settled_by": "usage event"}
    assert api.spend("adm-daily", project="adm") == "0.010000"  # once, not twice
    assert api.rows("events") == 1
    api.clock.advance(seconds=1)  # the counters behind /metrics are read again once a second old
    metrics = api.metrics()
    assert metrics["claude_admission_inflight", (("limit", "per-user"),)] == 1  # `again` holds the slot
    assert metrics["claude_admission_total", (("limit", "per-user"), ("outcome", "concurrency"))] == 1
    assert sum_metric(metrics, "claude_requests_total", project="adm") == 1


def test_budgets_lists_each_scope_with_its_spend(api: Api) -> None:
    assert api.usage([event("req-1", 4_000), event("req-2", 2_000, project="adm")]).status == 202
    rows = {row["budget"]: row for row in api.get("/v1/budgets").json()}
    # 4,000 x $5/M = $0.02 of $0.10; 2,000 x $5/M = $0.01 of $1.00.
    assert (rows["lingo-daily"]["spend_usd"], rows["lingo-daily"]["limit_usd"]) == ("0.020000", "0.100000")
    assert (rows["adm-daily"]["spend_usd"], rows["adm-daily"]["limit_usd"]) == ("0.010000", "1.000000")
    assert rows["lingo-daily"]["throttled"] is False


def test_metrics_health_and_readiness(api: Api) -> None:
    assert api.usage(event("req-1", 3_000)).status == 202  # $0.015
    api.clock.advance(seconds=1)
    scraped = api.get("/metrics")
    assert scraped.status == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.body.decode()
    for name in (
        "claude_cost_usd_total",
        "claude_tokens_total",
        "claude_requests_total",
        "claude_budget_spend_usd",
        "claude_budget_limit_usd",
        "claude_throttle_active",
        "claude_monitor_ingest_events_total",
        "claude_monitor_job_last_success_timestamp_seconds",
        "claude_admission_total",
    ):
        assert f"\n{name}" in text, name
    metrics = api.metrics()
    assert sum_metric(metrics, "claude_cost_usd_total", model=HAIKU, project="lingo") == pytest.approx(0.015, abs=1e-12)
    assert sum_metric(metrics, "claude_monitor_ingest_events_total", source="http", outcome="accepted") == 1

    assert (api.get("/healthz").status, api.get("/healthz").json()) == (200, {"status": "ok"})
    ready = api.get("/readyz")
    assert ready.status == 200 and ready.json() == {"ready": True, "problems": [], "budget_definitions_differ": []}
    # Unready once the last evaluation (at noon) is older than 3 evaluation periods (3 h); the clock moves, nothing
    # sleeps. It is already 1 s past noon: 1 + 3 h + 1 = 10,802 s.
    api.clock.advance(hours=3, seconds=1)
    stale = api.get("/readyz")
    assert stale.status == 503
    assert stale.json()["problems"] == ["last successful evaluation was 10802 s ago"]
    assert api.get("/nope").status == 404


def test_keep_alive_connection_answers_several_routes(api: Api) -> None:
    host, port = api.daemon.address
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for path, status in (("/healthz", 200), ("/v1/check?project=lingo", 204), ("/v1/budgets", 200)):
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
            assert answer.status == status, path
    finally:
        connection.close()


def test_the_client_sees_at_once_a_budget_its_own_record_crossed(api: Api) -> None:
    from monitor.client import MonitorClient, MonitorError

    def epoch() -> float:
        return api.clock.now.timestamp()

    with MonitorClient(api.url, token=TOKEN, background=False, clock=epoch) as client:
        before = client.check(model=HAIKU, project="lingo", user="u-1")
        assert (before.allowed, before.source, before.stale) == (True, "daemon", False)
        # 20,000 output tokens x $5/M = $0.10, the day's limit: the refresh after the record sees the flag.
        assert client.record(event("req-c", 20_000)) == {"accepted": 1, "duplicates": 0, "rejected": []}
        after = client.check(model=HAIKU, project="lingo", user="u-1")
        assert (after.allowed, after.budget, after.scope, after.retry_after, after.source) == (
            False,
            "lingo-daily",
            {"project": "lingo"},
            43200,  # noon to midnight UTC
            "daemon",
        )
        assert after.until == datetime(2026, 11, 27, tzinfo=UTC)
        assert client.check(model=HAIKU, project="other").allowed
    with MonitorClient(api.url, token="wrong", background=False, clock=epoch) as wrong:
        with pytest.raises(MonitorError) as refused:
            wrong.record(event("req-d", 1))
        assert refused.value.status == 401 and "missing or wrong Bearer token" in str(refused.value)
    assert api.rows("events") == 1


def test_a_get_check_is_answered_at_once_and_says_what_the_request_cycle_says(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET and HEAD checks are answered by the server as their headers arrive (no request cycle); a POST check
    (ext_authz may forward the caller's body) goes through the app's request cycle. Both give the same answer."""
    cycles: list[str] = []
    usual = ApiApp.__call__

    async def counted(self: ApiApp, scope: Any, receive: Any, send: Any) -> None:
        cycles.append(f"{scope['method']} {scope['path']}")
        await usual(self, scope, receive, send)

    monkeypatch.setattr(ApiApp, "__call__", counted)
    lingo = "/v1/check?project=lingo&user=u-1&model=claude-haiku-4-5"

    def both() -> tuple[Response, Response]:
        return api.get(lingo), request(api.url + lingo, "POST", b"{}", {"Content-Type": "application/json"})

    def same(fast: Response, usual: Response) -> None:
        assert (fast.status, fast.body) == (usual.status, usual.body)
        assert {k: v for k, v in fast.headers.items() if k != "date"} == {
            k: v for k, v in usual.headers.items() if k != "date"
        }

    same(*both())
    assert api.usage(event("req-1", 20_000)).status == 202  # $0.10: the day's limit
    throttled = both()
    assert throttled[0].status == 429 and throttled[0].headers["x-monitor-budget"] == "lingo-daily"
    same(*throttled)
    head = request(api.url + lingo, "HEAD")
    assert head.status == 429 and head.body == b"" and head.headers["content-length"] == str(len(throttled[0].body))
    assert api.get("/v1/check/v1/messages", {"X-Monitor-Project": "lingo"}).status == 429  # the Envoy form
    assert [c for c in cycles if "check" in c] == ["POST /v1/check", "POST /v1/check"]
