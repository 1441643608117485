"""Admission over the daemon's HTTP API: leases, rates, concurrency, caps, budget reservations, expiry, exactness.

A real daemon (`Daemon`, as `serve` builds it) listens on a loopback port; its clock is a FakeClock the tests move,
so a lease's expiry needs no sleep. Dollars are worked out by hand from the shipped price table:
claude-haiku-4-5 is $1 per million input tokens and $5 per million output tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from monitor.config import load_settings
from monitor.http.estimate import IMAGE_ALLOWANCE, TOOLS_ALLOWANCE, input_token_bound
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.serve_harness import TOKEN, Response, request

# Each test starts a daemon with its ingest worker process: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
HAIKU = "claude-haiku-4-5"
CONFIG = """\
http: {listen: "127.0.0.1:0"}
sources: []
admission: {lease_ttl: 60s}
budgets:
  - {name: lingo-daily, match: {project: lingo}, window: day, limit_usd: 1.00, throttle_at: 1.0}
  - {name: lingo-watch, match: {project: lingo}, window: day, limit_usd: 0.01, alert_at: [0.5]}
limits:
  - {name: per-user, match: {project: lingo}, per: user, concurrent: 2}
  - {name: rate, match: {project: rated}, per: user, requests_per_minute: 20}
  - {name: tokens, match: {project: rated}, input_tokens_per_minute: 100000, input_tokens_burst: 50000}
  - {name: guard, match: {project: lingo}, max_tokens: 8000, max_input_tokens: 50000, max_request_usd: 0.05}
"""


class Api:
    """The daemon and its URL, with helpers for the admission routes."""

    def __init__(self, daemon: Daemon, clock: FakeClock) -> None:
        self.daemon = daemon
        self.clock = clock
        self.url = "http://{}:{}".format(*daemon.address)

    def post(self, path: str, body: Any, token: str = TOKEN) -> Response:
        headers = {**AUTH, "Authorization": f"Bearer {token}"}
        return request(self.url + path, "POST", json.dumps(body).encode(), headers)

    def admit(self, user: str = "u-1", project: str = "lingo", **fields: Any) -> Response:
        body = {
            "attributes": {"project": project, "user": user},
            "model": HAIKU,
            "max_tokens": 6_000,
            "estimated_input_tokens": 10_000,  # worst case: $0.01 + 6,000 x $5/M = $0.04
            **fields,
        }
        return self.post("/v1/admit", body)

    def release(self, lease: str, request_id: str | None, usage: dict[str, int] | None) -> Response:
        return self.post("/v1/release", {"lease": lease, "request_id": request_id, "usage": usage})

    def usage(self, request_id: str, output_tokens: int, lease: str | None = None, user: str = "u-1") -> Response:
        event = {
            "request_id": request_id,
            "timestamp": self.clock.now.isoformat(),
            "model": HAIKU,
            "usage": {"input_tokens": 0, "output_tokens": output_tokens},
            "attributes": {"project": "lingo", "user": user},
            "lease": lease,
        }
        return self.post("/v1/usage", event)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(request(self.url + "/metrics").body.decode()):
            for sample in family.samples:
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def spend(self, budget: str) -> str:
        rows = request(self.url + "/v1/budgets").json()
        return next(row["spend_usd"] for row in rows if row["budget"] == budget)


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


def test_admit_needs_the_ingest_token_and_a_well_formed_body(api: Api) -> None:
    assert api.post("/v1/admit", {"model": HAIKU}, token="wrong").status == 401
    bad = api.post("/v1/admit", {"model": HAIKU, "max_tokens": -1, "estimated_input_tokens": 5})
    assert bad.status == 400 and "max_tokens: -1" in bad.json()["error"]
    assert api.post("/v1/admit", {"max_tokens": 1, "estimated_input_tokens": 1}).status == 400


def test_a_lease_names_its_worst_case_and_expiry(api: Api) -> None:
    answer = api.admit()
    assert answer.status == 200
    body = answer.json()
    assert body["lease"].startswith("lease_")
    assert body["reserved_usd"] == "0.040000"  # 10,000 x $1/M + 6,000 x $5/M
    assert body["expires_at"] == "2026-11-26T12:01:00Z"  # lease_ttl 60s
    assert body["renew_every_s"] == 20


def test_concurrency_two_in_flight_then_a_release_frees_a_slot(api: Api) -> None:
    first, second = api.admit(), api.admit()
    assert (first.status, second.status) == (200, 200)
    third = api.admit()
    assert third.status == 429
    assert third.json()["refused_by"] == {"kind": "concurrency", "name": "per-user"}
    assert third.headers["retry-after"] == "1"
    assert api.admit(user="u-2").status == 200  # another user has slots of their own
    released = api.release(first.json()["lease"], "req_1", {"input_tokens": 10, "output_tokens": 10})
    assert released.status == 200 and released.json()["settled_by"] == "release"
    assert api.admit().status == 200
    metrics = api.metrics()
    assert metrics["claude_admission_total", (("limit", "per-user"), ("outcome", "concurrency"))] == 1
    assert metrics["claude_admission_total", (("limit", "per-user"), ("outcome", "admitted"))] == 4
    assert metrics["claude_admission_inflight", (("limit", "per-user"),)] == 3


def test_caps_refuse_with_400_naming_the_cap_and_the_value(api: Api) -> None:
    over = api.admit(max_tokens=64_000)
    assert over.status == 400 and "retry-after" not in over.headers
    assert over.json()["refused_by"] == {"kind": "cap", "name": "guard"}
    assert "max_tokens 64,000 is over the cap of 8,000" in over.json()["message"]
    big = api.admit(estimated_input_tokens=60_000)
    assert "estimated at up to 60,000 tokens, over the cap of 50,000" in big.json()["message"]
    # 50,000 x $1/M + 8,000 x $5/M = $0.09 > $0.05
    costly = api.admit(estimated_input_tokens=50_000, max_tokens=8_000)
    assert costly.status == 400
    assert "could cost up to $0.090000" in costly.json()["message"]
    assert "cap of $0.050000 (max_request_usd)" in costly.json()["message"]
    assert api.metrics()["claude_admission_total", (("limit", "guard"), ("outcome", "too_large"))] == 3


def test_requests_per_minute_admits_the_burst_then_refills_on_the_clock(api: Api) -> None:
    answers = [api.admit(project="rated", estimated_input_tokens=10) for _ in range(30)]
    assert [a.status for a in answers].count(200) == 20
    refused = [a for a in answers if a.status == 429]
    assert len(refused) == 10
    assert all(a.json()["refused_by"] == {"kind": "rate", "name": "rate"} for a in refused)
    assert refused[0].headers["retry-after"] == "3"  # 20 a minute: one request every 3 s
    api.clock.advance(seconds=3)
    assert api.admit(project="rated", estimated_input_tokens=10).status == 200
    assert api.admit(project="rated", estimated_input_tokens=10).status == 429


def test_input_tokens_bucket_is_corrected_by_the_usage_that_lands(api: Api) -> None:
    # A 50,000-token bucket: one estimate of 40,000 leaves 10,000; the call used 1,000, so 39,000 come back.
    first = api.admit(project="rated", user="a", estimated_input_tokens=40_000)
    assert first.status == 200
    refused = api.admit(project="rated", user="b", estimated_input_tokens=30_000)
    assert refused.status == 429 and refused.json()["refused_by"]["name"] == "tokens"
    assert refused.headers["retry-after"] == "12"  # 20,000 missing at 100,000 a minute
    api.release(first.json()["lease"], "req_t", {"input_tokens": 1_000, "output_tokens": 5})
    assert api.admit(project="rated", user="b", estimated_input_tokens=30_000).status == 200


def test_budget_reserves_worst_cases_and_settles_at_the_real_cost_once(api: Api) -> None:
    assert api.usage("spent", 180_000).status == 202  # $0.90 of the $1.00 day: $0.10 left
    first, second = api.admit(user="a"), api.admit(user="b")
    assert (first.status, second.status) == (200, 200)
    third = api.admit(user="c")
    assert third.status == 429
    assert third.json()["refused_by"] == {"kind": "budget", "name": "lingo-daily"}
    assert "spent $0.900000 + $0.080000 reserved" in third.json()["message"]
    assert third.headers["retry-after"] == "1"  # calls in flight hold the room
    reserved = ("claude_budget_reserved_usd", (("budget", "lingo-daily"), ("scope", "project=lingo")))
    assert api.metrics()[reserved] == pytest.approx(0.08, abs=1e-12)
    # Reservations are not spend.
    assert api.spend("lingo-daily") == "0.900000"

    # The first call ends: 1,000 output tokens = $0.005; its real cost replaces its worst case.
    lease = first.json()["lease"]
    released = api.release(lease, "req_a", {"input_tokens": 0, "output_tokens": 1_000})
    assert released.json() == {"lease": lease, "settled_by": "release", "cost_usd": "0.005000"}
    assert api.metrics()[reserved] == pytest.approx(0.045, abs=1e-12)  # $0.005 held until its event lands
    assert api.spend("lingo-daily") == "0.900000"
    assert api.admit(user="c").status == 200  # 0.90 + 0.005 + 0.04 + 0.04 <= 1.00
    assert api.metrics()[reserved] == pytest.approx(0.085, abs=1e-12)

    # Its usage event lands: counted once, as spend; the hold it left is gone.
    assert api.usage("req_a", 1_000, lease=lease, user="a").status == 202
    assert api.spend("lingo-daily") == "0.905000"
    assert api.metrics()[reserved] == pytest.approx(0.08, abs=1e-12)
    again = api.release(lease, "req_a", {"input_tokens": 0, "output_tokens": 1_000})
    assert again.status == 200 and again.json()["settled_by"] == "usage event"
    assert api.admit(user="d").status == 429  # 0.905 + 0.08 + 0.04 > 1.00


def test_a_usage_event_first_settles_the_lease_and_release_is_then_a_no_op(api: Api) -> None:
    lease = api.admit().json()["lease"]
    assert api.usage("req_e", 2_000, lease=lease).status == 202  # $0.01
    reserved = ("claude_budget_reserved_usd", (("budget", "lingo-daily"), ("scope", "project=lingo")))
    metrics = api.metrics()
    assert metrics[reserved] == 0
    assert metrics["claude_admission_inflight", (("limit", "per-user"),)] == 0
    assert api.release(lease, "req_e", {"output_tokens": 2_000}).json()["settled_by"] == "usage event"
    assert api.spend("lingo-daily") == "0.010000"
    assert api.post(f"/v1/admit/{lease}/renew", {}).status == 404


def test_a_lease_not_renewed_expires_on_the_moved_clock_and_its_slot_returns(api: Api) -> None:
    first, second = api.admit().json()["lease"], api.admit().json()["lease"]
    assert api.admit().status == 429
    api.clock.advance(seconds=40)
    renewed = api.post(f"/v1/admit/{second}/renew", {})
    assert renewed.status == 200 and renewed.json()["expires_at"] == "2026-11-26T12:01:40Z"
    api.clock.advance(seconds=20)  # the first is 60 s old and never renewed: gone; the second holds on
    assert api.admit().status == 200
    assert api.admit().status == 429
    gone = api.post(f"/v1/admit/{first}/renew", {})
    assert gone.status == 404 and "it has ended (expired)" in gone.json()["error"]
    assert api.release(first, None, None).json()["settled_by"] == "expired"


def test_alert_only_budgets_never_refuse(api: Api) -> None:
    # lingo-watch ($0.01, alert only) is far exceeded by one worst case of $0.04; only lingo-daily reserves.
    assert api.admit().status == 200
    assert ("claude_budget_reserved_usd", (("budget", "lingo-watch"), ("scope", "project=lingo"))) not in api.metrics()


def test_bytes_bound_the_input_tokens_from_above() -> None:
    text = "héllo wörld " * 100  # 1,400 UTF-8 bytes; no tokenizer makes more tokens than bytes of it
    bound = input_token_bound({"messages": [{"role": "user", "content": text}]})
    assert bound >= len(text.encode())
    with_tools = input_token_bound(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "t", "input_schema": {}}]}
    )
    assert with_tools >= TOOLS_ALLOWANCE
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    with_image = input_token_bound({"messages": [{"role": "user", "content": [image]}]})
    assert with_image >= IMAGE_ALLOWANCE


def test_the_python_client_admits_renews_and_releases(api: Api) -> None:
    from monitor.client import AdmissionRefused, MonitorClient

    body = {"model": HAIKU, "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 1_000}]}
    with MonitorClient(api.url, token=TOKEN, background=False) as client:
        lease = client.admit(model=HAIKU, max_tokens=100, request=body, project="lingo", user="u-9")
        assert lease.renew_every == 20
        # At least the 1,000 bytes of content at $1/M, plus 100 output tokens at $5/M: over $0.0015.
        assert float(lease.reserved_usd) > 0.0015
        client.admit(model=HAIKU, max_tokens=100, request=body, project="lingo", user="u-9")
        with pytest.raises(AdmissionRefused) as refused:
            client.admit(model=HAIKU, max_tokens=100, request=body, project="lingo", user="u-9")
        assert (refused.value.status, refused.value.kind, refused.value.name) == (429, "concurrency", "per-user")
        with pytest.raises(AdmissionRefused) as capped:
            client.admit(model=HAIKU, max_tokens=9_000, estimated_input_tokens=10, project="lingo", user="u-8")
        assert (capped.value.status, capped.value.kind) == (400, "cap")
        api.clock.advance(seconds=30)
        assert client.renew(lease) == datetime(2026, 11, 26, 12, 1, 30, tzinfo=UTC)
        answer = client.release(lease, request_id="req_c", usage={"input_tokens": 300, "output_tokens": 50})
        assert answer["settled_by"] == "release" and answer["cost_usd"] == "0.000550"  # 300 x $1/M + 50 x $5/M
        assert client.renew(lease) is None
        assert client.release(lease)["settled_by"] == "release"
        assert client.release("lease_never")["settled_by"] == "unknown"


QUIET_CONFIG = """\
http: {listen: "127.0.0.1:0"}
sources: []
budgets:
  - {name: per-user, match: {project: lingo}, per: user, window: day, limit_usd: 0.1, alert_at: [0.5], throttle_at: 1}
"""


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[Api, list[str]]]:
    """A daemon started on a store where users already spent today (none of them seen by its admission), and the
    budget-spend reads its admission makes (statements on its read pool naming budget_usage)."""
    clock = FakeClock(NOW)
    config = write_config(tmp_path, QUIET_CONFIG + f"throttle: {{snapshot_file: {tmp_path}/t.json}}\n")
    settings = load_settings(config, environ={})
    first = Daemon(settings, clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    first.start()
    try:
        writer = Api(first, clock)
        # Output at $5 per million: 2,000 tokens = $0.01, 9,000 = $0.045 (just under the alert at $0.05),
        # 14,000 = $0.07 (over it).
        for user, output in (("quiet", 2_000), ("edge", 9_000), ("hot", 14_000)):
            assert writer.usage(f"seed-{user}", output, user=user).status == 202
    finally:
        first.stop()
    daemon = Daemon(settings, clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    reads: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.current_thread().name.startswith("api-read") and "budget_usage" in statement:
            reads.append(statement)

    event.listen(daemon.store.engine, "before_cursor_execute", on_execute)
    daemon.start()  # evaluates once before serving: the quiet scopes' ceiling is $0.045
    try:
        yield Api(daemon, clock), reads
    finally:
        daemon.stop()


def _admit(api: Api, user: str, output: int) -> Response:
    body = {"attributes": {"project": "lingo", "user": user}, "model": HAIKU, "max_tokens": output,
            "estimated_input_tokens": 10_000}  # fmt: skip
    return api.post("/v1/admit", body)


def test_a_scope_under_the_lowest_threshold_is_admitted_without_a_read_when_the_ceiling_fits(
    seeded: tuple[Api, list[str]],
) -> None:
    api, reads = seeded
    # Worst case $0.01 + 6,000 x $5/M = $0.04; the ceiling $0.045 + $0.04 = $0.085 fits $0.10.
    assert _admit(api, "quiet", 6_000).status == 200
    assert _admit(api, "never-seen", 6_000).status == 200
    assert reads == []


def test_a_scope_just_under_the_threshold_whose_worst_case_would_overflow_is_read_and_refused(
    seeded: tuple[Api, list[str]],
) -> None:
    api, reads = seeded
    # Worst case $0.01 + 10,000 x $5/M = $0.06: the ceiling $0.045 + $0.06 passes $0.10, so the spend is read.
    refused = _admit(api, "edge", 10_000)
    assert refused.status == 429, refused.body
    assert refused.json()["refused_by"] == {"kind": "budget", "name": "per-user"}
    assert "spent $0.045000" in refused.json()["message"]
    assert len(reads) == 1
    # The same worst case for a user who spent $0.01: read too, and $0.01 + $0.06 fits.
    assert _admit(api, "quiet", 10_000).status == 200
    assert len(reads) == 2
    # A scope over the lowest threshold at the evaluation is always read.
    assert _admit(api, "hot", 100).status == 200
    assert len(reads) == 3


def test_spend_added_after_the_evaluation_is_never_hidden_by_the_ceiling(seeded: tuple[Api, list[str]]) -> None:
    api, reads = seeded
    # `quiet` spends $0.08 more ($0.09 in all): the batch reports its new total, which replaces the ceiling.
    assert api.usage("more", 16_000, user="quiet").status == 202
    refused = _admit(api, "quiet", 6_000)  # $0.09 + $0.04 passes $0.10
    assert refused.status == 429 and "spent $0.090000" in refused.json()["message"]
    assert reads == []  # the batch's total is exact: nothing to read
