"""Admission's memory bounds (`admission.max_buckets`, `max_spend_scopes`, `max_settled_remembered`) holding over
the daemon's HTTP API, and what admission does past each.

A real daemon (`Daemon`, as `serve` builds it) on a loopback port with bounds of 10, its clock a FakeClock the tests
move. What is kept is read from `claude_admission_memory_entries{kind}` on its /metrics. Dollars by hand from the
shipped price table: claude-haiku-4-5 is $1 per million input tokens and $5 per million output tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import load_settings
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.serve_harness import TOKEN, Response, request

# Each test starts a daemon with its ingest worker process: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
HAIKU = "claude-haiku-4-5"
BOUND = 10
CONFIG = f"""\
http: {{listen: "127.0.0.1:0"}}
sources: []
admission: {{lease_ttl: 10m, max_buckets: {BOUND}, max_spend_scopes: {BOUND}, max_settled_remembered: {BOUND}}}
budgets:
  - {{name: per-user-day, match: {{project: wallet}}, per: user, window: day, limit_usd: 0.10, throttle_at: 1.0}}
  - {{name: free-day, match: {{project: free}}, window: day, limit_usd: 100, throttle_at: 1.0}}
limits:
  - {{name: one-a-second, match: {{project: rated}}, per: user, requests_per_minute: 60, burst: 1}}
"""
FREE_RESERVED = ("claude_budget_reserved_usd", (("budget", "free-day"), ("scope", "project=free")))


class Api:
    """The daemon and its URL, with helpers for the admission routes."""

    def __init__(self, daemon: Daemon, clock: FakeClock) -> None:
        self.daemon = daemon
        self.clock = clock
        self.url = "http://{}:{}".format(*daemon.address)

    def post(self, path: str, body: Any) -> Response:
        return request(self.url + path, "POST", json.dumps(body).encode(), AUTH)

    def admit(self, user: str, project: str, max_tokens: int = 6_000) -> Response:
        body = {
            "attributes": {"project": project, "user": user},
            "model": HAIKU,
            "max_tokens": max_tokens,
            "estimated_input_tokens": 10_000,  # with max_tokens 6,000: $0.01 + $0.03 = $0.04 at worst
        }
        return self.post("/v1/admit", body)

    def usage(self, request_id: str, user: str, project: str, output_tokens: int, lease: str | None = None) -> Any:
        return {
            "request_id": request_id,
            "timestamp": self.clock.now.isoformat(),
            "model": HAIKU,
            "usage": {"input_tokens": 0, "output_tokens": output_tokens},
            "attributes": {"project": project, "user": user},
            **({"lease": lease} if lease is not None else {}),
        }

    def record(self, *events: Any) -> None:
        answer = self.post("/v1/usage", list(events))
        assert answer.status == 202 and answer.json()["accepted"] == len(events), answer.body

    def release(self, lease: str, request_id: str, output_tokens: int) -> Response:
        usage = {"input_tokens": 0, "output_tokens": output_tokens}
        return self.post("/v1/release", {"lease": lease, "request_id": request_id, "usage": usage})

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(request(self.url + "/metrics").body.decode()):
            for sample in family.samples:
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def kept(self, kind: str) -> float:
        return self.metrics()["claude_admission_memory_entries", (("kind", kind),)]

    def spend(self, budget: str, user: str | None = None) -> str:
        rows = request(self.url + "/v1/budgets").json()
        return next(r["spend_usd"] for r in rows if r["budget"] == budget and r["scope"].get("user") == user)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    clock = FakeClock(NOW)
    config = write_config(tmp_path, CONFIG + f"throttle: {{snapshot_file: {tmp_path}/t.json}}\n")
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    daemon.start()
    try:
        yield Api(daemon, clock)
    finally:
        daemon.stop()


def test_full_buckets_are_dropped_past_max_buckets_and_come_back_as_new_ones(api: Api) -> None:
    # One request a second, bursts of 1: a second after its call a user's bucket is full again.
    for number in range(50):
        assert api.admit(f"u-{number}", "rated").status == 200
        assert api.kept("buckets") <= BOUND
        api.clock.advance(seconds=1)
    assert api.metrics()["claude_admission_buckets_forgiven_total", ()] == 0  # only full ones went

    # u-0's bucket was dropped long ago: it acts exactly as a user never seen, one call and then 1 s to wait.
    for user in ("u-0", "u-never-seen"):
        assert api.admit(user, "rated").status == 200
        again = api.admit(user, "rated")
        assert again.status == 429 and again.json()["refused_by"] == {"kind": "rate", "name": "one-a-second"}
        assert again.headers["retry-after"] == "1"


def test_past_max_buckets_with_none_full_the_oldest_are_forgiven_and_memory_stays_bounded(api: Api) -> None:
    # 50 users in one instant: no bucket refills. Each sweep past 10 buckets goes back to 9 (a tenth below), so
    # sweeps at the 11th, 13th, ..., 49th bucket drop 2 each: 20 x 2 = 40 dropped, 10 kept (u-40 .. u-49).
    for number in range(50):
        assert api.admit(f"u-{number}", "rated").status == 200
        assert api.kept("buckets") <= BOUND
    assert api.kept("buckets") == 10
    assert api.metrics()["claude_admission_buckets_forgiven_total", ()] == 40
    assert api.admit("u-49", "rated").status == 429  # a kept bucket still holds its scope to the rate
    assert api.admit("u-0", "rated").status == 200  # a forgiven one starts again on a full bucket


def test_spend_past_max_spend_scopes_is_read_again_and_still_exact(api: Api) -> None:
    # u-0 spends 18,000 output tokens x $5/M = $0.09 of its $0.10 day; 49 more users $0.01 (2,000 tokens) each.
    api.record(api.usage("spent-0", "u-0", "wallet", 18_000))
    api.record(*(api.usage(f"spent-{n}", f"u-{n}", "wallet", 2_000) for n in range(1, 50)))
    assert api.kept("spend_scopes") <= BOUND
    # u-0's spend was dropped from memory; read again, it still refuses: $0.09 + $0.04 worst case > $0.10.
    refused = api.admit("u-0", "wallet")
    assert refused.status == 429 and refused.json()["refused_by"] == {"kind": "budget", "name": "per-user-day"}
    assert "spent $0.090000" in refused.json()["message"]
    assert api.admit("u-1", "wallet").status == 200  # $0.01 + $0.04 <= $0.10
    assert api.kept("spend_scopes") <= BOUND


def test_settled_leases_past_max_settled_remembered_are_forgotten_oldest_first_and_counted_once(api: Api) -> None:
    leases = []
    for number in range(50):
        lease = api.admit(f"u-{number}", "free").json()["lease"]
        api.record(api.usage(f"req-{number}", f"u-{number}", "free", 2_000, lease=lease))  # $0.01 each
        leases.append(lease)
        assert api.kept("settled_leases") <= BOUND and api.kept("stored_requests") <= BOUND
    # The second of usage event and release, for a recent lease: a no-op that says how it ended.
    recent = api.release(leases[-1], "req-49", 2_000)
    assert recent.status == 200 and recent.json() == {"lease": leases[-1], "settled_by": "usage event"}
    forgotten = api.release(leases[0], "req-0", 2_000)
    assert forgotten.status == 404 and "forgotten" in forgotten.json()["error"]
    assert api.spend("free-day") == "0.500000"  # 50 x $0.01: neither release added or held anything
    assert api.metrics()[FREE_RESERVED] == 0

    # Release first, then the usage event: the event settles what the release held, once.
    lease = api.admit("u-late", "free").json()["lease"]
    assert api.release(lease, "req-late", 2_000).json()["settled_by"] == "release"
    assert api.metrics()[FREE_RESERVED] == pytest.approx(0.01)  # the real cost, held until its event lands
    api.record(api.usage("req-late", "u-late", "free", 2_000, lease=lease))
    assert api.metrics()[FREE_RESERVED] == 0
    assert api.spend("free-day") == "0.510000"
    assert api.release(lease, "req-late", 2_000).json()["settled_by"] == "usage event"
    assert api.kept("settled_leases") <= BOUND and api.kept("stored_requests") <= BOUND
