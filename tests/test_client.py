"""monitor.client against a real `serve` process over real HTTP: local decisions, recording, snapshot fallback."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx2
import pytest
from anthropic.types import Message, RawMessageStreamEvent

from monitor.client import MonitorClient, MonitorError
from tests.conftest import REPO, write_config
from tests.serve_harness import TOKEN, Serve, sum_metric, wait_until

# Haiku 4.5 output is $5 per million tokens: 2,000 output tokens = $0.01 = the daily limit of one user.
CONFIG = """\
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.01
    throttle_at: 1.0
"""
HAIKU = "claude-haiku-4-5-20251001"


class Clock:
    """Epoch seconds that a test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    daemon = Serve(write_config(tmp_path, CONFIG), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


@pytest.fixture
def clients() -> Iterator[list[MonitorClient]]:
    """Every client a test makes, closed at teardown."""
    made: list[MonitorClient] = []
    yield made
    for client in made:
        client.close()


def make(clients: list[MonitorClient], url: str, **kwargs: Any) -> MonitorClient:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("background", False)
    client = MonitorClient(url, **kwargs)
    clients.append(client)
    return client


def message(output_tokens: int, request_id: str | None = None, **usage: Any) -> Message:
    """A Messages API response as the SDK builds it from the wire JSON."""
    built = Message.model_validate(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": HAIKU,
            "content": [{"type": "text", "text": "Gut gemacht!"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": output_tokens, **usage},
        }
    )
    if request_id is not None:
        built._request_id = request_id  # what the SDK sets from the request-id header
    return built


def stored(tmp_path: Path, request_id: str) -> dict[str, Any]:
    database = sqlite3.connect(tmp_path / "monitor.db")
    database.row_factory = sqlite3.Row
    row = database.execute("SELECT * FROM events WHERE request_id = ?", (request_id,)).fetchone()
    assert row is not None, f"{request_id} not stored"
    return dict(row)


def next_utc_midnight(now: datetime) -> datetime:
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


@pytest.mark.slow
def test_a_crossing_message_denies_that_user_at_once_and_no_one_else(
    serve: Serve, tmp_path: Path, clients: list[MonitorClient]
) -> None:
    # The background refresh is far away: only the refresh after record_message can make the next check see it.
    client = make(clients, serve.url, background=True, refresh_interval=3600)
    fresh = client.check(model="claude-haiku-4-5", project="lingo", user="u-1")
    assert (fresh.allowed, fresh.stale, fresh.source, fresh.budget) == (True, False, "daemon", None)

    answer = client.record_message(
        message(2_000, "req_msg_1"), attributes={"project": "lingo", "user": "u-1"}, latency_ms=640
    )
    assert answer == {"accepted": 1, "duplicates": 0, "rejected": []}

    denied = client.check(model="claude-haiku-4-5", project="lingo", user="u-1")
    assert not denied.allowed and not denied.stale and denied.source == "daemon"
    assert denied.budget == "per-user-daily"
    assert denied.scope == {"project": "lingo", "user": "u-1"}
    midnight = next_utc_midnight(datetime.now(UTC))
    assert denied.until == midnight
    assert denied.retry_after is not None
    assert 0 < denied.retry_after <= math.ceil((midnight - datetime.now(UTC)).total_seconds()) + 1
    assert denied.reason.startswith("per-user-daily exceeded for project=lingo, user=u-1: $0.010000 of $0.010000")
    assert client.check(model="claude-haiku-4-5", project="lingo", user="u-2").allowed
    assert client.check(project="lingo", user="u-1").allowed is False  # the scope has no model: any model
    assert client.check(user="u-1").allowed  # not project lingo: outside the budget
    assert serve.get("/v1/check?project=lingo&user=u-1").status == 429  # the daemon agrees

    row = stored(tmp_path, "req_msg_1")
    assert (row["model_id"], row["output_tokens"], row["status"], row["latency_ms"], row["batch"]) == (
        HAIKU,
        2_000,
        200,
        640.0,
        0,
    )
    assert json.loads(row["attributes"]) == {"project": "lingo", "user": "u-1"}
    assert abs(datetime.fromisoformat(row["ts"]).replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)

    # Sent again (a retry), it is the same request: counted once.
    assert client.record_message(message(2_000, "req_msg_1"), attributes={"project": "lingo", "user": "u-1"}) == {
        "accepted": 0,
        "duplicates": 1,
        "rejected": [],
    }


@pytest.mark.slow
def test_concurrent_records_each_see_their_own_crossing_in_memory(serve: Serve, clients: list[MonitorClient]) -> None:
    # Sixteen threads of one client record at once, each the event that spends its own user's daily $0.01; the
    # refresh after a record may be shared with other threads, but it must have begun after that record's answer:
    # the thread's next check, from memory, is denied.
    client = make(clients, serve.url, background=True, refresh_interval=3600)
    users = [f"u-{n}" for n in range(16)]
    assert all(client.check_in_memory(project="lingo", user=user) is not None for user in users)

    def one(user: str) -> tuple[bool, bool]:
        before = client.check_in_memory(model="claude-haiku-4-5", project="lingo", user=user)
        client.record_message(message(2_000, f"req_{user}"), attributes={"project": "lingo", "user": user})
        after = client.check_in_memory(model="claude-haiku-4-5", project="lingo", user=user)
        assert before is not None and after is not None
        return before.allowed, after.allowed

    with ThreadPoolExecutor(len(users)) as pool:
        outcomes = list(pool.map(one, users))
    assert outcomes == [(True, False)] * len(users)
    stats = client.stats
    assert 1 <= stats.fetches + stats.not_modified <= 1 + len(users)  # the first fetch, then at most one each


@pytest.mark.slow
def test_check_in_memory_defers_to_check_once_the_daemon_state_is_stale(
    serve: Serve, tmp_path: Path, clients: list[MonitorClient]
) -> None:
    clock = Clock(time.time())
    client = make(clients, serve.url, clock=clock, max_staleness=30, snapshot_file=tmp_path / "throttle.json")
    fresh = client.check_in_memory(project="lingo", user="u-1")
    assert fresh is not None and (fresh.allowed, fresh.source) == (True, "daemon")
    clock.now += 31
    assert client.check_in_memory(project="lingo", user="u-1") is None
    assert client.check(project="lingo", user="u-1").source in ("snapshot", "none")


@pytest.mark.slow
def test_record_message_options_and_its_request_id(serve: Serve, tmp_path: Path, clients: list[MonitorClient]) -> None:
    client = make(clients, serve.url)
    with pytest.raises(ValueError, match="request_id"):
        client.record_message(message(10), attributes={"project": "lingo", "user": "u-3"})
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    client.record_message(
        message(10, service_tier="batch"),
        attributes={"project": "lingo", "user": "u-3"},
        request_id="req_explicit",
        batch=True,
        timestamp=when,
    )
    row = stored(tmp_path, "req_explicit")
    assert (row["batch"], row["service_tier"], row["output_tokens"]) == (1, "batch", 10)
    assert datetime.fromisoformat(row["ts"]) == when.replace(tzinfo=None)


@pytest.mark.slow
def test_refresh_uses_the_etag_and_keeps_the_copy_on_304(serve: Serve, clients: list[MonitorClient]) -> None:
    client = make(clients, serve.url)
    first = client.stats
    assert (first.fetches, first.not_modified, first.failures) == (1, 0, 0)
    assert client.refresh() is True
    assert client.refresh() is True
    after = client.stats
    assert (after.fetches, after.not_modified, after.version) == (1, 2, first.version)

    # Another writer crosses a budget: the version moves, the next refresh is a full answer.
    event = {
        "request_id": "req_other",
        "timestamp": datetime.now(UTC).isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 0, "output_tokens": 2_000},
        "attributes": {"project": "lingo", "user": "u-5"},
    }
    assert serve.post_usage(event).status == 202
    assert client.check(project="lingo", user="u-5").allowed  # not refreshed yet: the local copy decides
    assert client.refresh() is True
    changed = client.stats
    assert changed.fetches == 2 and changed.not_modified == 2
    assert changed.version is not None and first.version is not None and changed.version > first.version
    assert not client.check(project="lingo", user="u-5").allowed


STREAM_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01Stream",
                "type": "message",
                "role": "assistant",
                "model": HAIKU,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 25,
                    "output_tokens": 1,
                    "cache_creation_input_tokens": 3_000,
                    "cache_read_input_tokens": 5_000,
                    "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000},
                    "service_tier": "standard",
                },
            },
        },
    ),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Der Satz ist"}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " richtig."}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 3_000,
                "cache_read_input_tokens": 5_000,
                "output_tokens": 420,
                "server_tool_use": {"web_search_requests": 1},
            },
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def sdk_stream(events: list[tuple[str, dict[str, Any]]], request_id: str) -> anthropic.Stream[Any]:
    """The SDK's own Stream over a server-sent-events body, as Anthropic would send it (no network)."""
    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()
    response = httpx2.Response(
        200,
        headers={"request-id": request_id, "content-type": "text/event-stream"},
        content=body,
        request=httpx2.Request("POST", "https://api.anthropic.com/v1/messages"),
    )
    sdk = anthropic.Anthropic(api_key="test-key-not-used")
    return anthropic.Stream(cast_to=cast(Any, RawMessageStreamEvent), response=response, client=sdk)


@pytest.mark.slow
def test_record_stream_takes_cache_from_message_start_and_output_from_the_last_delta(
    serve: Serve, tmp_path: Path, clients: list[MonitorClient]
) -> None:
    client = make(clients, serve.url)
    stream = sdk_stream(STREAM_EVENTS, "req_stream_1")
    events = list(stream)  # a proxy passes them on as they come, then records
    assert {type(e).__name__ for e in events} >= {"RawMessageStartEvent", "RawMessageDeltaEvent"}
    answer = client.record_stream(events, attributes={"project": "lingo", "user": "u-4"}, request_id="req_stream_1")
    assert answer["accepted"] == 1
    row = stored(tmp_path, "req_stream_1")
    assert row["input_tokens"] == 25
    assert row["output_tokens"] == 420  # the last message_delta, not message_start's 1
    assert (row["cache_read_tokens"], row["cache_write_5m_tokens"], row["cache_write_1h_tokens"]) == (
        5_000,
        1_000,
        2_000,
    )
    assert row["web_search_requests"] == 1
    assert (row["service_tier"], row["status"]) == ("standard", 200)

    # The SDK stream object itself carries the request-id header; SSE data objects as dicts work too, and a
    # delta whose cache fields are null keeps message_start's.
    short = [*STREAM_EVENTS[:-2], ("message_delta", _delta(77)), STREAM_EVENTS[-1]]
    answer = client.record_stream(sdk_stream(short, "req_stream_2"), attributes={"project": "lingo", "user": "u-4"})
    assert answer["accepted"] == 1
    as_dicts = [data for _name, data in short]
    client.record_stream(as_dicts, attributes={"project": "lingo"}, request_id="req_stream_3", latency_ms=1500)
    for request_id in ("req_stream_2", "req_stream_3"):
        row = stored(tmp_path, request_id)
        assert (row["output_tokens"], row["cache_read_tokens"], row["cache_write_1h_tokens"]) == (77, 5_000, 2_000)
        assert row["web_search_requests"] == 0
    assert stored(tmp_path, "req_stream_3")["latency_ms"] == 1500.0

    with pytest.raises(ValueError, match="message_start"):
        client.record_stream([data for _name, data in STREAM_EVENTS[1:]], attributes={}, request_id="req_x")
    with pytest.raises(ValueError, match="request_id"):
        client.record_stream(as_dicts, attributes={})


def _delta(output_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": None,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
            "output_tokens": output_tokens,
        },
    }


@pytest.mark.slow
def test_record_failure_stores_the_status_with_zero_usage(
    serve: Serve, tmp_path: Path, clients: list[MonitorClient]
) -> None:
    client = make(clients, serve.url)
    client.record_failure(model=HAIKU, status=529, attributes={"project": "lingo", "user": "u-6"}, request_id="req_f")
    client.record_failure(model=HAIKU, status=500, attributes={"project": "lingo", "user": "u-6"})
    row = stored(tmp_path, "req_f")
    assert row["status"] == 529
    tokens = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens")
    assert [row[name] for name in tokens] == [0, 0, 0, 0, 0]
    assert row["cost_pico"] == 0
    database = sqlite3.connect(tmp_path / "monitor.db")
    made_up = database.execute("SELECT request_id, status FROM events WHERE status = 500").fetchall()
    assert len(made_up) == 1 and made_up[0][0].startswith("failed-")
    wait_until(lambda: sum_metric(serve.metrics(), "claude_request_errors_total") == 2)
    assert sum_metric(serve.metrics(), "claude_request_errors_total", status="529") == 1


@pytest.mark.slow
def test_record_errors_raise_monitor_error(serve: Serve, clients: list[MonitorClient]) -> None:
    for token in ("wrong-token", None):
        client = make(clients, serve.url, token=token)
        with pytest.raises(MonitorError) as caught:
            client.record_failure(model=HAIKU, status=500, attributes={}, request_id="req_unauthorized")
        assert caught.value.status == 401
        assert "401" in str(caught.value)
    allowed = make(clients, serve.url)
    serve.stop(signal.SIGKILL)
    with pytest.raises(MonitorError) as caught:
        allowed.record_failure(model=HAIKU, status=500, attributes={}, request_id="req_down")
    assert caught.value.status is None


@pytest.mark.slow
def test_daemon_killed_snapshot_then_fail_mode(serve: Serve, tmp_path: Path, clients: list[MonitorClient]) -> None:
    snapshot = tmp_path / "throttle.json"
    # This client last heard from the daemon a minute ago (by its clock), before u-1 crossed the budget.
    clock = Clock(time.time() - 60)
    client = make(clients, serve.url, snapshot_file=snapshot, max_staleness=10, refresh_interval=2.5, clock=clock)
    assert client.check(project="lingo", user="u-1").source == "daemon"
    event = {
        "request_id": "req_cross",
        "timestamp": datetime.now(UTC).isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 0, "output_tokens": 2_000},
        "attributes": {"project": "lingo", "user": "u-1"},
    }
    assert serve.post_usage(event).status == 202  # the daemon rewrites the snapshot as the flag is set
    serve.stop(signal.SIGKILL)
    assert client.refresh() is False

    clock.now = time.time()  # the daemon's copy is 60 s old now; the snapshot a moment
    denied = client.check(model="claude-haiku-4-5", project="lingo", user="u-1")
    assert (denied.allowed, denied.source, denied.stale, denied.budget) == (False, "snapshot", False, "per-user-daily")
    assert denied.scope == {"project": "lingo", "user": "u-1"}
    assert denied.retry_after is not None and denied.retry_after > 0
    other = client.check(model="claude-haiku-4-5", project="lingo", user="u-2")
    assert (other.allowed, other.source) == (True, "snapshot")
    # A proxy started while the daemon is down decides from the snapshot too.
    restarted = make(clients, serve.url, snapshot_file=snapshot)
    assert (restarted.check(project="lingo", user="u-1").source, restarted.stats.failures) == ("snapshot", 1)

    # Past max_staleness of the snapshot as well: the policy decides, and says why.
    generated = datetime.fromisoformat(json.loads(snapshot.read_text())["generated_at"]).timestamp()
    clock.now = generated + 10.5
    opened = client.check(project="lingo", user="u-1")
    assert (opened.allowed, opened.stale, opened.source, opened.budget) == (True, True, "none", None)
    assert "snapshot" in opened.reason and "open" in opened.reason
    closed = make(
        clients,
        serve.url,
        snapshot_file=snapshot,
        max_staleness=10,
        refresh_interval=2.5,
        clock=clock,
        fail_mode="closed",
    )
    verdict = closed.check(project="lingo", user="u-2")
    assert (verdict.allowed, verdict.stale, verdict.source, verdict.retry_after) == (False, True, "none", 3)
    assert "unavailable" in verdict.reason and "closed" in verdict.reason

    snapshot.unlink()  # no snapshot at all
    clock.now = time.time()
    assert closed.check(project="lingo", user="u-2").allowed is False
    assert client.check(project="lingo", user="u-2").stale is True


def test_check_semantics_from_a_snapshot_file(tmp_path: Path, clients: list[MonitorClient]) -> None:
    """Scope matching, expired flags and the longest-holding flag, decided from a hand-written snapshot file."""
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    clock = Clock(now.timestamp())

    def at(seconds: float) -> str:
        return (now + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    snapshot = tmp_path / "throttle.json"
    snapshot.write_text(
        json.dumps(
            {
                "version": 7,
                "generated_at": at(-2),
                "flags": [
                    {
                        "budget": "ended",
                        "scope": {"project": "lingo"},
                        "action": "block",
                        "since": at(-99),
                        "until": at(-1),
                    },
                    {"budget": "short", "scope": {"project": "lingo", "user": "u-9"}, "until": at(30.2)},
                    {"budget": "long", "scope": {"user": "u-9"}, "until": at(7200)},
                    {
                        "budget": "opus",
                        "scope": {"model": "claude-opus-4-5"},
                        "until": at(90),
                        "measure": "output",
                        "amount": 2_100_000,
                        "limit": 2_000_000,
                        "spend_usd": None,
                        "limit_usd": None,
                    },
                ],
            }
        )
    )
    client = make(clients, "http://127.0.0.1:9", snapshot_file=snapshot, clock=clock, max_staleness=3600)  # no daemon
    assert client.check(project="lingo", user="u-1").allowed  # "ended" is over
    both = client.check(project="lingo", user="u-9")
    assert (both.budget, both.retry_after, both.until, both.source) == (
        "long",
        7200,
        now + timedelta(hours=2),
        "snapshot",
    )
    assert client.check(project="lingo", feature="x", user="u-9", model="claude-haiku-4-5").budget == "long"
    opus = client.check(model="claude-opus-4-5", project="lingo", user="u-1")
    assert (opus.budget, opus.retry_after) == ("opus", 90)
    assert "2100000 output of 2000000" in opus.reason
    assert client.check(model="claude-opus-4-5-20251101", user="u-1").allowed  # no alias resolution in the client
    clock.now += 89.5
    assert client.check(model="claude-opus-4-5").retry_after == 1  # rounded up, at least 1
    clock.now += 0.5
    assert client.check(model="claude-opus-4-5").allowed

    snapshot.write_text("{not json")
    clock.now = now.timestamp()
    broken = client.check(project="lingo", user="u-9")
    assert (broken.allowed, broken.stale) == (True, True) and "unusable" in broken.reason


@pytest.mark.slow
def test_background_thread_refreshes_survives_errors_and_stops_on_close(
    serve: Serve, clients: list[MonitorClient]
) -> None:
    client = make(clients, serve.url, background=True, refresh_interval=0.05)
    threads = [t for t in threading.enumerate() if t.name == "claude-monitor-client"]
    assert len(threads) == 1 and threads[0].daemon

    calls: list[str] = []
    real_refresh = client.refresh

    def flaky() -> bool:
        calls.append("call")
        if len(calls) <= 2:
            raise RuntimeError("surprise")
        return real_refresh()

    client.refresh = flaky  # type: ignore[method-assign]
    event = {
        "request_id": "req_bg",
        "timestamp": datetime.now(UTC).isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 0, "output_tokens": 2_000},
        "attributes": {"project": "lingo", "user": "u-7"},
    }
    assert serve.post_usage(event).status == 202
    wait_until(lambda: not client.check(project="lingo", user="u-7").allowed, timeout=10)
    assert len(calls) > 2 and threads[0].is_alive()

    client.close()
    settled = len(calls)
    # Proof that refresh intervals went by after close: a second client on the same 0.05 s interval, started now,
    # refreshes five times from its own thread. A first client still refreshing would have refreshed meanwhile too.
    witness = make(clients, serve.url, background=True, refresh_interval=0.05)
    witnessed: list[str] = []
    witness_refresh = witness.refresh

    def counted() -> bool:
        witnessed.append("call")
        return witness_refresh()

    witness.refresh = counted  # type: ignore[method-assign]
    wait_until(lambda: len(witnessed) >= 5, timeout=30)
    assert len(calls) == settled, f"{len(calls) - settled} refresh(es) after close()"
    assert not threads[0].is_alive()
    assert [t for t in threading.enumerate() if t.name == "claude-monitor-client"] == [witness._thread]
    client.close()  # twice is harmless


@pytest.mark.slow
def test_client_imports_without_the_daemon_stack() -> None:
    code = (
        "import sys, monitor.client\n"
        "heavy = {'sqlalchemy', 'alembic', 'prometheus_client', 'apscheduler', 'yaml', 'pydantic', 'anthropic'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fail_mode"):
        MonitorClient("http://127.0.0.1:9", fail_mode="maybe", background=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_staleness"):
        MonitorClient("http://127.0.0.1:9", max_staleness=0, background=False)
    with pytest.raises(ValueError, match="url"):
        MonitorClient("127.0.0.1:9464", background=False)
