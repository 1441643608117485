"""The notifier against a real HTTP receiver on loopback: once per window, across restarts, retries with backoff,
resolved at the window's reset in the configured timezone, only the highest threshold crossed, one aggregated
notice per threshold for a `per:` budget, the receivers' payloads, and a bad URL failing `serve`."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from monitor.alerts.notifier import Notice, Notifier, backoff, slack_payload, webhook_receivers
from monitor.config import ConfigError, WebhookConfig, load_settings
from monitor.service import Store, open_store
from monitor.store.models import alert_deliveries, alert_notices
from tests.conftest import FakeClock, run_cli
from tests.serve_harness import TOKEN, Serve, request, wait_until

pytest_plugins = ["tests.pg"]

DAILY = """\
budgets:
  - name: lingo-daily
    match: {project: lingo}
    window: day
    limit_usd: 10
    alert_at: [0.5, 0.8]
    throttle_at: 1.0
"""
PER_USER = """\
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    alert_at: [0.5]
    throttle_at: 1.0
"""
# haiku-4-5 output tokens cost $5 per million: 200,000 tokens = $1.
TOKENS_PER_USD = 200_000
_ids = itertools.count()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    status: int


class Receiver:
    """A webhook receiver: a stdlib HTTP server on loopback that records each POST and answers `status`."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.answer = b"ok"
        self.answer_headers: dict[str, str] = {}
        self.port = 0
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        """Listen (again, on the same port after a stop)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.status
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), json.loads(raw), status))
                self.send_response(status)
                for name, value in receiver.answer_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(receiver.answer)))
                self.end_headers()
                self.wfile.write(receiver.answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: connections are refused until start()."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accepted(self, path: str | None = None) -> list[Any]:
        """Bodies answered 2xx (on `path`), in arrival order."""
        with self._lock:
            return [r.body for r in self.requests if r.status < 300 and (path is None or r.path == path)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def evening() -> FakeClock:
    return FakeClock(datetime(2026, 11, 26, 20, 0, tzinfo=UTC))  # 21:00 in Berlin: 21 h of the day gone, 3 h left


@dataclass
class Monitor:
    """A store and a notifier on one database, as the daemon builds them."""

    store: Store
    notifier: Notifier
    clock: FakeClock

    def cycle(self) -> None:
        """One scheduled round: full evaluation, the notifier after it, then the delivery job."""
        self.store.budgets.evaluate()
        self.notifier.evaluate(self.store.budgets.states(), self.clock.now)
        self.notifier.deliver(self.clock.now)

    def spend(self, usd: Decimal | str, user: str = "u-1", count: int = 1, **attributes: str) -> None:
        """`count` events of `usd` each, stamped now, through the real write path and the fast path."""
        events = [
            {
                "request_id": f"r-{next(_ids)}",
                "timestamp": self.clock.now.isoformat(),
                "model": "claude-haiku-4-5",
                "usage": {"output_tokens": int(Decimal(usd) * TOKENS_PER_USD)},
                "attributes": {"project": "lingo", "user": f"{user}-{i}" if count > 1 else user, **attributes},
            }
            for i in range(count)
        ]
        result = self.store.ingestor.submit([("test", self.store.parser.parse_object(e)) for e in events], "test")
        assert result.accepted == count

    def deliveries(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as connection:
            query = select(alert_deliveries, alert_notices.c.kind, alert_notices.c.threshold).join(alert_notices)
            return [dict(row._mapping) for row in connection.execute(query.order_by(alert_deliveries.c.id))]

    def close(self) -> None:
        self.store.close()


def open_monitor(
    directory: Path,
    clock: FakeClock,
    hooks: list[tuple[str, str]],
    budgets: str = DAILY,
    timezone: str = "Europe/Berlin",
    database_url: str | None = None,
) -> Monitor:
    """A config with these webhooks (url, kind) and budgets, opened as `serve` opens it."""
    url = database_url or f"sqlite:///{directory / 'monitor.db'}"
    webhooks = ", ".join(f'{{url: "{u}", kind: {k}}}' for u, k in hooks)
    path = directory / "claude-monitor.yaml"
    path.write_text(
        f"database_url: {url}\ntimezone: {timezone}\nalerts: {{webhooks: [{webhooks}]}}\n{budgets}", encoding="utf-8"
    )
    loaded = load_settings(path, environ={})
    store = open_store(loaded, clock=clock, snapshot_file=directory / "throttle.json")
    store.budgets.sync_definitions()
    settings = loaded.settings
    notifier = Notifier(
        store.engine,
        settings.alerts.webhooks,
        store.budgets.budgets,
        settings.zone,
        digest_every=settings.alerts.digest_every.delta,
    )
    return Monitor(store, notifier, clock)


@pytest.fixture
def monitor(tmp_path: Path, evening: FakeClock, receiver: Receiver) -> Iterator[Monitor]:
    opened = open_monitor(tmp_path, evening, [(receiver.url + "/hook", "generic")])
    yield opened
    opened.close()


# --- once per threshold per window ---------------------------------------------------------------------------


def test_one_notice_per_window_for_the_highest_threshold_however_often_evaluated(
    monitor: Monitor, receiver: Receiver
) -> None:
    monitor.spend("8.5")  # 85% of $10: past 0.5 and 0.8 at once: only 0.8 notifies
    for _ in range(5):
        monitor.cycle()
        monitor.clock.advance(seconds=15)
    bodies = sorted(receiver.accepted(), key=lambda b: b["threshold"])
    assert [(b["kind"], b["threshold"]) for b in bodies] == [("threshold", 0.8)]
    # Forecast by hand: $8.5 in the 21 h since Berlin's midnight (23:00 UTC), 3 h to go: 8.5 + 8.5 x 3/21.
    assert bodies[0] == {
        "kind": "threshold",
        "status": "firing",
        "budget": "lingo-daily",
        "scope": {"project": "lingo"},
        "threshold": 0.8,
        "spend_usd": "8.500000",
        "limit_usd": "10.000000",
        "forecast_usd": "9.714285",
        "window_start": "2026-11-25T23:00:00Z",
        "window_end": "2026-11-26T23:00:00Z",
        "sent_at": "2026-11-26T20:00:00Z",
    }
    assert all(r.headers["Content-Type"] == "application/json" and r.path == "/hook" for r in receiver.requests)

    monitor.spend("1.5")  # $10: the limit, so throttled too
    for _ in range(5):
        monitor.cycle()
        monitor.clock.advance(seconds=15)
    bodies = receiver.accepted()
    assert [(b["kind"], b["threshold"]) for b in bodies[1:]] == [("throttle", 1.0)]
    assert bodies[1]["spend_usd"] == "10.000000" and bodies[1]["sent_at"] == "2026-11-26T20:01:15Z"
    assert len(receiver.requests) == 2


def test_a_higher_threshold_supersedes_the_lower_ones_notice(
    tmp_path: Path, evening: FakeClock, receiver: Receiver
) -> None:
    hooks = [(receiver.url + "/hook", "generic"), (receiver.url + "/api/v2/alerts", "alertmanager")]
    monitor = open_monitor(tmp_path, evening, hooks)
    try:
        monitor.spend("6")  # 60%: 0.5
        monitor.cycle()
        evening.advance(minutes=10)
        monitor.spend("2.5")  # 85%: 0.8 fires, and 0.5 is resolved rather than left firing to the window's end
        monitor.cycle()
        for _ in range(3):
            evening.advance(seconds=15)
            monitor.cycle()
    finally:
        monitor.close()
    generic = [(b["threshold"], b["status"]) for b in receiver.accepted("/hook")]
    assert generic == [(0.5, "firing"), (0.5, "resolved"), (0.8, "firing")]
    superseded = receiver.accepted("/hook")[1]
    assert superseded["spend_usd"] == "8.500000" and superseded["sent_at"] == "2026-11-26T20:10:00Z"
    alerts = [alert for body in receiver.accepted("/api/v2/alerts") for alert in body]
    assert [(a["labels"]["threshold"], a["endsAt"]) for a in alerts] == [
        ("0.5", "2026-11-26T23:00:00Z"),  # held to the window's end ...
        ("0.5", "2026-11-26T20:10:00Z"),  # ... until superseded: Alertmanager drops it now
        ("0.8", "2026-11-26T23:00:00Z"),
    ]
    assert alerts[1]["annotations"]["summary"].endswith("— superseded by its 80% notice")


def test_no_notice_repeated_after_a_restart_and_a_pending_one_survives_it(
    tmp_path: Path, evening: FakeClock, receiver: Receiver
) -> None:
    hooks = [(receiver.url + "/hook", "generic")]
    first = open_monitor(tmp_path, evening, hooks)
    first.spend("6")
    first.cycle()
    assert [b["threshold"] for b in receiver.accepted()] == [0.5]
    receiver.status = 503
    first.spend("4")  # the limit: 0.8 supersedes 0.5, and a throttle notice; the receiver refuses them for now
    first.cycle()
    # 0.5's resolution goes first and is refused; the others are not tried against a receiver that just failed.
    assert [(r.status, r.body["status"], r.body["threshold"]) for r in receiver.requests] == [
        (200, "firing", 0.5),
        (503, "resolved", 0.5),
    ]
    first.close()

    receiver.status = 200
    evening.advance(seconds=5)
    second = open_monitor(tmp_path, evening, hooks)  # a new process on the same database file
    try:
        for _ in range(4):
            second.cycle()
            evening.advance(seconds=15)
        kinds = sorted((b["kind"], b["threshold"], b["status"]) for b in receiver.accepted())
        assert kinds == [
            ("threshold", 0.5, "firing"),
            ("threshold", 0.5, "resolved"),
            ("threshold", 0.8, "firing"),
            ("throttle", 1.0, "firing"),
        ]
        assert len(receiver.requests) == 5
    finally:
        second.close()


# --- delivery and retries ----------------------------------------------------------------------------------------


def test_a_receiver_that_is_down_is_retried_with_backoff_until_it_is_back(monitor: Monitor, receiver: Receiver) -> None:
    receiver.status = 503
    monitor.spend("6")  # 60%: the 0.5 threshold only
    start = monitor.clock.now
    monitor.cycle()
    assert [r.status for r in receiver.requests] == [503]
    (delivery,) = monitor.deliveries()
    assert delivery["state"] == "pending" and delivery["attempts"] == 1
    assert delivery["next_attempt_at"] == start + timedelta(seconds=5)
    assert delivery["last_error"].startswith("HTTP 503")

    for _ in range(3):  # evaluations go on, and never send or wait on the receiver
        monitor.store.budgets.evaluate()
        monitor.notifier.evaluate(monitor.store.budgets.states(), monitor.clock.now)
    monitor.clock.advance(seconds=4)
    monitor.notifier.deliver(monitor.clock.now)
    assert len(receiver.requests) == 1  # still backing off
    monitor.clock.advance(seconds=1)
    monitor.notifier.deliver(monitor.clock.now)
    assert len(receiver.requests) == 2
    assert monitor.deliveries()[0]["next_attempt_at"] == start + timedelta(seconds=5 + 10)

    receiver.stop()  # connection refused now
    monitor.clock.advance(seconds=10)
    monitor.notifier.deliver(monitor.clock.now)
    (delivery,) = monitor.deliveries()
    assert delivery["attempts"] == 3 and "Connection refused" in delivery["last_error"]
    assert delivery["next_attempt_at"] == monitor.clock.now + timedelta(seconds=20)

    receiver.status = 200
    receiver.start()
    monitor.clock.advance(seconds=19)
    monitor.cycle()
    assert receiver.accepted() == []
    monitor.clock.advance(seconds=1)
    monitor.cycle()
    (body,) = receiver.accepted()
    assert body["threshold"] == 0.5 and body["sent_at"] == "2026-11-26T20:00:35Z"
    (delivery,) = monitor.deliveries()
    assert (delivery["state"], delivery["attempts"], delivery["last_error"]) == ("sent", 4, None)
    with monitor.store.engine.connect() as connection:
        sent_at = connection.execute(select(alert_notices.c.first_sent_at)).scalar()
    assert sent_at == monitor.clock.now
    monitor.clock.advance(minutes=30)
    monitor.cycle()
    assert len(receiver.accepted()) == 1


def test_each_webhook_is_delivered_on_its_own_a_4xx_is_final_and_429_waits_for_retry_after(
    tmp_path: Path, evening: FakeClock, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    other = Receiver()
    monitor = open_monitor(tmp_path, evening, [(receiver.url + "/a", "generic"), (other.url + "/b", "generic")])
    try:
        receiver.status, receiver.answer = 400, b'{"error": "no such channel"}'
        other.status, other.answer_headers = 429, {"Retry-After": "120"}
        caplog.set_level(logging.WARNING, logger="monitor.alerts.notifier")
        monitor.spend("6")
        monitor.cycle()
        states = {d["webhook"]: d for d in monitor.deliveries()}
        assert sorted((d["state"], d["attempts"]) for d in states.values()) == [("failed", 1), ("pending", 1)]
        assert 'HTTP 400: {"error": "no such channel"}' in caplog.text and "alerts.webhooks[0]" in caplog.text
        assert "/a" not in caplog.text.replace("/api", "")  # the URL's path can be a secret: logs name the key
        retrying = next(d for d in states.values() if d["state"] == "pending")
        assert retrying["next_attempt_at"] == evening.now + timedelta(seconds=120)

        other.status = 200
        evening.advance(seconds=119)
        monitor.cycle()
        assert other.accepted() == []
        evening.advance(seconds=1)
        monitor.cycle()
        assert [b["threshold"] for b in other.accepted()] == [0.5]
        evening.advance(hours=1)
        monitor.cycle()
        assert len(receiver.requests) == 1 and len(other.requests) == 2  # the 400 was never retried
    finally:
        monitor.close()
        other.stop()


def test_backoff_doubles_from_5_seconds_to_a_10_minute_cap() -> None:
    assert [backoff(n).total_seconds() for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff(1, retry_after=120) == timedelta(seconds=120)
    assert backoff(1, retry_after=86400) == timedelta(minutes=10)


# --- windows --------------------------------------------------------------------------------------------------


def test_resolved_notices_when_the_day_ends_in_new_york_not_at_utc_midnight(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock(datetime(2026, 11, 26, 23, 30, tzinfo=UTC))  # 18:30 in New York (UTC-5)
    monitor = open_monitor(
        tmp_path, clock, [(receiver.url + "/hook", "generic")], DAILY + PER_USER, timezone="America/New_York"
    )
    try:
        monitor.spend("6")  # lingo-daily at 60%; u-1's own day at 1200%
        monitor.cycle()
        fired = receiver.accepted()
        assert sorted((b["budget"], b["kind"], b["threshold"]) for b in fired) == [
            ("lingo-daily", "threshold", 0.5),
            ("per-user-daily", "threshold", 0.5),
            ("per-user-daily", "throttle", 1.0),
        ]
        assert {b["window_end"] for b in fired} == {"2026-11-27T05:00:00Z"}  # New York's midnight

        clock.now = datetime(2026, 11, 27, 0, 30, tzinfo=UTC)  # a new day in UTC, still 26 Nov in New York
        monitor.cycle()
        assert len(receiver.requests) == 3

        clock.now = datetime(2026, 11, 27, 5, 0, 15, tzinfo=UTC)  # 00:00:15 on 27 Nov in New York
        for _ in range(3):
            monitor.cycle()
            clock.advance(seconds=15)
        resolved = receiver.accepted()[3:]
        assert len(resolved) == 3 and {b["status"] for b in resolved} == {"resolved"}
        assert sorted((b["budget"], b["kind"], b["threshold"]) for b in resolved) == sorted(
            (b["budget"], b["kind"], b["threshold"]) for b in fired
        )
        users = next(b for b in resolved if b["kind"] == "throttle")
        assert users == {
            "kind": "throttle",
            "status": "resolved",
            "budget": "per-user-daily",
            "per": "user",
            "threshold": 1.0,
            "scopes_over": 1,
            # what the ended window came to, though u-1 has not spent today
            "top": [{"scope": {"project": "lingo", "user": "u-1"}, "spend_usd": "6.000000", "limit_usd": "0.500000"}],
            "window_start": "2026-11-26T05:00:00Z",
            "window_end": "2026-11-27T05:00:00Z",
            "sent_at": "2026-11-27T05:00:15Z",
        }

        clock.advance(minutes=10)  # the new day: the same crossings notify again, once, for this window
        monitor.spend("6")
        for _ in range(3):
            monitor.cycle()
            clock.advance(seconds=15)
        again = receiver.accepted()[6:]
        assert sorted((b["budget"], b["kind"], b["status"]) for b in again) == [
            ("lingo-daily", "threshold", "firing"),
            ("per-user-daily", "threshold", "firing"),
            ("per-user-daily", "throttle", "firing"),
        ]  # and no forecast: ten minutes into a day say too little about its end
        assert {b["window_start"] for b in again} == {"2026-11-27T05:00:00Z"}
    finally:
        monitor.close()


LEARNERS = """\
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    alert_at: [0.5, 0.8]
    throttle_at: 1.0
"""


def test_fifty_learners_crossing_a_per_user_budget_make_one_aggregated_notice_per_threshold(
    tmp_path: Path, evening: FakeClock, receiver: Receiver
) -> None:
    hooks = [
        (receiver.url + "/hook", "generic"),
        (receiver.url + "/slack", "slack"),
        (receiver.url + "/api/v2/alerts", "alertmanager"),
    ]
    monitor = open_monitor(tmp_path, evening, hooks, LEARNERS)
    # learner-i spends $0.26 + $0.005 i of a $0.50 day: all 50 past 50 %, learners 28-49 past 80 % ($0.40),
    # learners 48 and 49 at their limit ($0.50, $0.505): throttled.
    spend = {i: Decimal("0.26") + Decimal("0.005") * i for i in range(50)}
    try:
        for batch in range(5):  # ten learners every 15 s
            for i in range(batch * 10, batch * 10 + 10):
                monitor.spend(spend[i], user=f"learner-{i}")
            monitor.cycle()
            evening.advance(seconds=15)
        first = [(b["kind"], b["threshold"], b["scopes_over"]) for b in receiver.accepted("/hook")]
        # 0.5 when the first ten crossed; 0.8 when learners 28-29 did; throttle when 48-49 did. Nothing per learner.
        assert first == [("threshold", 0.5, 10), ("threshold", 0.8, 2), ("throttle", 1.0, 2)]

        for _ in range(4):  # more crossed, but the last notices went out minutes ago
            monitor.cycle()
            evening.advance(minutes=15)
        assert len(receiver.accepted("/hook")) == 3
        evening.now = datetime(2026, 11, 26, 21, 1, tzinfo=UTC)  # an hour after the last: one update each
        for _ in range(3):
            monitor.cycle()
            evening.advance(seconds=15)
        updates = receiver.accepted("/hook")[3:]
        assert [(b["kind"], b["threshold"], b["scopes_over"]) for b in updates] == [
            ("threshold", 0.5, 50),
            ("threshold", 0.8, 22),
        ]  # the throttled count did not grow: no update
        top = [
            {"scope": {"project": "lingo", "user": f"learner-{i}"}, "limit_usd": "0.500000"} for i in range(49, 44, -1)
        ]
        for entry, usd in zip(top, ("0.505000", "0.500000", "0.495000", "0.490000", "0.485000"), strict=True):
            entry["spend_usd"] = usd
        assert updates[0] == {
            "kind": "threshold",
            "status": "firing",
            "budget": "per-user-daily",
            "per": "user",
            "threshold": 0.5,
            "scopes_over": 50,
            "top": top,
            "window_start": "2026-11-25T23:00:00Z",
            "window_end": "2026-11-26T23:00:00Z",
            "sent_at": "2026-11-26T21:01:00Z",
        }

        evening.now = datetime(2026, 11, 26, 23, 0, 10, tzinfo=UTC)  # midnight in Berlin: the day is over
        monitor.cycle()
    finally:
        monitor.close()
    resolved = receiver.accepted("/hook")[5:]
    assert sorted((b["status"], b["kind"], b["threshold"], b["scopes_over"]) for b in resolved) == [
        ("resolved", "threshold", 0.5, 50),
        ("resolved", "threshold", 0.8, 22),
        ("resolved", "throttle", 1.0, 2),
    ]
    assert len(receiver.accepted("/hook")) == 8  # not 50 + 22 + 2 notices, each resolved

    alerts = [alert for body in receiver.accepted("/api/v2/alerts") for alert in body]
    assert len(alerts) == 8
    assert {alert["labels"]["severity"] for alert in alerts} == {"info", "warning"}  # never critical: no page
    assert {tuple(sorted(alert["labels"].items())) for alert in alerts} == {
        (("alertname", "ClaudeBudgetScopesOverThreshold"), ("budget", "per-user-daily"), ("kind", "threshold"),
         ("per", "user"), ("severity", "info"), ("threshold", "0.5")),
        (("alertname", "ClaudeBudgetScopesOverThreshold"), ("budget", "per-user-daily"), ("kind", "threshold"),
         ("per", "user"), ("severity", "info"), ("threshold", "0.8")),
        (("alertname", "ClaudeBudgetScopesThrottled"), ("budget", "per-user-daily"), ("kind", "throttle"),
         ("per", "user"), ("severity", "warning"), ("threshold", "1")),
    }  # fmt: skip
    assert not any("learner" in value for alert in alerts for value in alert["labels"].values())
    update = next(a for a in alerts if a["labels"]["threshold"] == "0.5" and "50 user" in a["annotations"]["summary"])
    assert update["annotations"]["summary"] == "Budget per-user-daily: 50 user scopes reached 50% of their own limit"
    assert "project=lingo, user=learner-49: $0.505000" in update["annotations"]["description"]

    slack = receiver.accepted("/slack")
    assert len(slack) == 8
    assert slack[3]["text"] == ":warning: Budget per-user-daily: 50 user scopes reached 50% of their own limit"
    fields = "\n".join(field["text"] for field in slack[3]["blocks"][1]["fields"])
    for fact in ("per-user-daily", "*Scopes over*\n50", "$0.500000", "user=learner-49: $0.505000", "50%"):
        assert fact in fields, fact


# --- payloads ---------------------------------------------------------------------------------------------------


def test_slack_and_alertmanager_payloads_firing_then_resolved(
    tmp_path: Path, evening: FakeClock, receiver: Receiver
) -> None:
    hooks = [(receiver.url + "/slack", "slack"), (receiver.url + "/api/v2/alerts", "alertmanager")]
    monitor = open_monitor(tmp_path, evening, hooks)
    try:
        monitor.spend("6")
        monitor.cycle()
        evening.now = datetime(2026, 11, 26, 23, 0, 10, tzinfo=UTC)  # 00:00:10 in Berlin: the day is over
        monitor.cycle()
    finally:
        monitor.close()

    firing, resolved = receiver.accepted("/slack")
    assert set(firing) == {"text", "blocks"} and isinstance(firing["text"], str)
    assert "lingo-daily" in firing["text"] and "50%" in firing["text"]
    assert [block["type"] for block in firing["blocks"]] == ["section", "section", "context"]
    fields = "\n".join(field["text"] for field in firing["blocks"][1]["fields"])
    for fact in ("lingo-daily", "project=lingo", "$6.000000", "$10.000000", "50%", "2026-11-27 00:00 CET", "firing"):
        assert fact in fields, fact
    assert resolved["text"].startswith(":white_check_mark: Resolved: budget lingo-daily")
    assert "the window ended" in resolved["text"]
    assert "resolved" in "\n".join(field["text"] for field in resolved["blocks"][1]["fields"])

    am_firing, am_resolved = receiver.accepted("/api/v2/alerts")
    assert isinstance(am_firing, list) and len(am_firing) == 1
    (alert,) = am_firing
    assert set(alert) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
    assert alert["labels"] == {
        "alertname": "ClaudeBudgetThresholdCrossed",
        "budget": "lingo-daily",
        "scope": '{"project":"lingo"}',
        "kind": "threshold",
        "threshold": "0.5",
        "severity": "warning",
    }
    assert set(alert["annotations"]) == {"summary", "description"}
    assert "$6.000000 of $10.000000" in alert["annotations"]["description"]
    assert alert["startsAt"] == "2026-11-26T20:00:00Z"
    assert alert["endsAt"] == "2026-11-26T23:00:00Z"  # sent once: it holds until the window ends
    assert alert["generatorURL"].startswith("http")
    (ended,) = am_resolved
    assert ended["labels"] == alert["labels"] and ended["startsAt"] == alert["startsAt"]
    assert ended["endsAt"] == "2026-11-26T23:00:00Z"
    assert ended["annotations"]["summary"].startswith("Resolved:")


def test_slack_text_cannot_be_made_to_mention_a_channel_by_a_scope_value() -> None:
    moment = datetime(2026, 11, 26, 20, tzinfo=UTC)
    notice = Notice(
        1, "per-user", {"user": "<!channel> & co"}, "threshold", Decimal("0.5"), "firing", moment, moment,
        "usd", 10**12, 6 * 10**11, 6 * 10**11, 6 * 10**11, 6 * 10**11, moment, None,
    )  # fmt: skip
    text = json.dumps(slack_payload(notice, moment, ZoneInfo("UTC")))
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on a free loopback port (Debian package prometheus-alertmanager); its base URL."""
    if ALERTMANAGER is None:
        pytest.skip("Alertmanager is not installed (Debian package prometheus-alertmanager)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "alertmanager.yml"
    config.write_text('route: {receiver: "null"}\nreceivers: [{name: "null"}]\n', encoding="utf-8")
    log = (tmp_path / "alertmanager.log").open("wb")
    process = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(port) and request(url + "/-/ready").status == 200)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _up(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def late_in_the_day(now: datetime) -> str:
    """A fixed-offset zone (Etc/GMT+N is UTC-N) where `now` is between 15:00 and 22:59."""
    for offset in range(-14, 13):
        if 15 <= (now.hour - offset) % 24 <= 22:
            return f"Etc/GMT{offset:+d}"
    raise AssertionError("every hour has a zone where it is afternoon")


@pytest.mark.slow
def test_a_real_alertmanager_holds_the_alert_while_firing_and_drops_it_when_resolved(
    tmp_path: Path, alertmanager: str
) -> None:
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))  # Alertmanager judges endsAt by its own clock
    hooks = [(alertmanager + "/api/v2/alerts", "alertmanager")]
    # A zone where it is late in the day now: $6 spent over 15 hours or more forecasts at most
    # 6 + 6 x 9/15 = $9.60 by midnight, under the $10 limit, so the threshold is the one notice at any hour of the run.
    zone = late_in_the_day(clock.now)
    monitor = open_monitor(tmp_path, clock, hooks, DAILY, timezone=zone)
    try:
        monitor.spend("6")
        monitor.cycle()
        assert [d["state"] for d in monitor.deliveries()] == ["sent"]
    finally:
        monitor.close()
    (alert,) = request(alertmanager + "/api/v2/alerts").json()
    assert alert["status"]["state"] == "active"
    assert alert["labels"] == {
        "alertname": "ClaudeBudgetThresholdCrossed",
        "budget": "lingo-daily",
        "scope": '{"project":"lingo"}',
        "kind": "threshold",
        "threshold": "0.5",
        "severity": "warning",
    }
    local = clock.now.astimezone(ZoneInfo(zone))
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0).astimezone(UTC)
    assert alert["endsAt"].startswith(midnight.strftime("%Y-%m-%dT%H:%M:%S"))  # the window's end, not resolve_timeout

    # The budget is removed from the config: its notices resolve now (not ahead of Alertmanager's clock).
    clock.now = datetime.now(UTC).replace(microsecond=0)
    renamed = DAILY.replace("lingo-daily", "lingo-day").replace("limit_usd: 10", "limit_usd: 100")  # at 6%
    monitor = open_monitor(tmp_path, clock, hooks, renamed, timezone=zone)
    try:
        monitor.cycle()
        assert [(d["status"], d["state"]) for d in monitor.deliveries()] == [("firing", "sent"), ("resolved", "sent")]
    finally:
        monitor.close()
    assert request(alertmanager + "/api/v2/alerts").json() == []


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://am:9093/api/v2/alerts", "https://am.example/prefix/api/v2/alerts", "http://127.0.0.1:1/api/v2/alerts"],
)
def test_alertmanager_urls_that_name_the_alerts_api_are_accepted(url: str) -> None:
    (hook,) = webhook_receivers([WebhookConfig(url=url, kind="alertmanager")])
    assert hook.url == url


@pytest.mark.parametrize("url", ["http://am:9093/", "http://am:9093/api/v1/alerts", "http://am:9093/api/v2/alerts/"])
def test_an_alertmanager_url_that_is_not_the_alerts_api_is_a_config_error(url: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "alerts:\n"
        "  webhooks:\n"
        "    - {url: 'https://hooks.example/x', kind: slack}\n"
        "    - kind: alertmanager\n"
        f"      url: '{url}'\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config, environ={})
    assert f"{config}:5: alerts.webhooks[1].url:" in str(error.value) and "/api/v2/alerts" in str(error.value)


@pytest.mark.slow
def test_serve_with_a_bad_alertmanager_url_fails_before_touching_anything(tmp_path: Path) -> None:
    config = tmp_path / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{tmp_path / 'monitor.db'}\n"
        "http: {listen: '127.0.0.1:0'}\n"
        f"throttle: {{snapshot_file: {tmp_path / 'throttle.json'}}}\n"
        "alerts: {webhooks: [{url: 'http://am-user:s3cret@127.0.0.1:9093/', kind: alertmanager}]}\n",
        encoding="utf-8",
    )
    run = run_cli("serve", "--config", str(config), cwd=tmp_path, check=False)
    assert run.returncode == 2
    assert f"{config}:4: alerts.webhooks[0].url:" in run.stderr and "not Alertmanager's alerts API" in run.stderr
    assert "s3cret" not in run.stderr
    assert not (tmp_path / "monitor.db").exists() and not (tmp_path / "throttle.json").exists()


# --- the daemon -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_notifies_a_crossing_through_its_scheduled_jobs(tmp_path: Path, receiver: Receiver) -> None:
    config = tmp_path / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{tmp_path / 'monitor.db'}\n"
        "http: {listen: '127.0.0.1:0'}\n"
        "schedule: {evaluate_every: 1s}\n"
        f"alerts: {{webhooks: [{{url: '{receiver.url}/hook', kind: generic}}]}}\n"
        "budgets:\n"
        "  - {name: lingo-daily, match: {project: lingo}, window: day, limit_usd: 10, alert_at: [0.5]}\n",
        encoding="utf-8",
    )
    serve = Serve(config, tmp_path)
    try:
        event = {
            "request_id": "req-1",
            "timestamp": datetime.now(UTC).isoformat(),
            "model": "claude-haiku-4-5",
            "usage": {"output_tokens": 6 * TOKENS_PER_USD},
            "attributes": {"project": "lingo"},
        }
        assert serve.post_usage(event, token=TOKEN).status == 202
        notices = wait_until(lambda: [b for b in receiver.accepted() if b["kind"] == "threshold"], timeout=30)
        assert [(n["budget"], n["threshold"], n["spend_usd"]) for n in notices] == [("lingo-daily", 0.5, "6.000000")]
    finally:
        assert serve.stop() == 0
    assert len([b for b in receiver.accepted() if b["kind"] == "threshold"]) == 1


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


def test_once_per_window_across_restarts_on_postgres(
    pg_url: str, tmp_path: Path, evening: FakeClock, receiver: Receiver
) -> None:
    hooks = [(receiver.url + "/hook", "generic")]
    for _ in range(2):  # the second pass is a restart on the same database
        monitor = open_monitor(tmp_path, evening, hooks, database_url=pg_url)
        try:
            if not receiver.requests:
                monitor.spend("8.5")
            for _ in range(3):
                monitor.cycle()
                evening.advance(seconds=15)
        finally:
            monitor.close()
    assert [b["threshold"] for b in receiver.accepted()] == [0.8]  # the highest crossed, once
    assert len(receiver.requests) == 1
