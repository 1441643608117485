"""Admission through the real proxy: the `anthropic` SDK (no retries) -> `claude-monitor proxy` -> the local fake
Anthropic, with the daemon's leases, rates, slots and reservations deciding before anything goes upstream.

The daemon runs in this process (as `serve` builds it) on a loopback port, its clock a FakeClock the tests move: a
lease expires when the clock passes its time, never by waiting. The proxies are real child processes (one can be
killed with SIGKILL). Streams are held open at the fake until a test lets one finish, so "in flight" and "ended" are
events the tests order, not durations. Tests marked `proxies` run through one proxy and again split across two
that share one daemon.

Dollars by hand, from the shipped price table: claude-haiku-4-5 costs $1/M input, $5/M output, $1.25/M 5-minute
cache writes, $2/M 1-hour writes, $0.10/M cache reads. The fake bills 100 input tokens, 100 + 200 cache writes and
400 cache reads ($0.000665) plus its output tokens, and a stream one web search ($0.01).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import load_settings
from monitor.report import build_report
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_harness import HAIKU, PROXY_KEY, ProxyProcess, proxy_config, sdk
from tests.serve_harness import TOKEN, request, wait_until

pytestmark = pytest.mark.slow

DAEMON_CONFIG = """\
http: {listen: "127.0.0.1:0"}
sources: []
admission: {lease_ttl: 3s}
budgets:
  - {name: wallet, match: {project: wallet}, window: day, limit_usd: 0.10, throttle_at: 1.0}
limits:
  - {name: two-at-once, match: {project: lingo}, per: user, concurrent: 2}
  - {name: one-at-once, match: {project: solo}, per: user, concurrent: 1}
  - {name: per-user-rate, match: {project: rated}, per: user, requests_per_minute: 20}
  - {name: high-token-guard, match: {project: lingo}, max_tokens: 4096}
"""
# 54 bytes of text: the request's input bound is 16 + the 30 bytes of JSON around it + 54 = 100 tokens, so with
# max_tokens 7,980 a call's worst case is 100 x $1/M + 7,980 x $5/M = $0.04 exactly.
WALLET_ASK: list[MessageParam] = [{"role": "user", "content": "x" * 54}]
WALLET_MAX_TOKENS = 7_980
SHORT: list[MessageParam] = [{"role": "user", "content": "Hallo?"}]


@dataclass
class Stack:
    fake: FakeAnthropic
    clock: FakeClock
    daemon: Daemon
    proxies: list[ProxyProcess]
    directory: Path

    @property
    def daemon_url(self) -> str:
        return "http://{}:{}".format(*self.daemon.address)

    def sdk(self, user: str, project: str, via: int = 0) -> anthropic.Anthropic:
        """The real SDK through proxy `via` (modulo the proxies running), never retrying."""
        return sdk(self.proxies[via % len(self.proxies)].url, user, project, max_retries=0)

    def daemon_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_metrics(request(self.daemon_url + "/metrics").body.decode())

    def proxy_metric(self, name: str, via: int = 0, **labels: str) -> float:
        metrics = parse_metrics(request(self.proxies[via].url + "/metrics").body.decode())
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def start_stack(tmp_path: Path, fake: FakeAnthropic, proxies: int) -> Stack:
    clock = FakeClock(datetime.now(UTC))  # the proxies stamp events with the real time: the same day's window
    config = write_config(tmp_path, DAEMON_CONFIG + f"throttle: {{snapshot_file: {tmp_path}/daemon-throttle.json}}\n")
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    daemon.start()
    stack = Stack(fake, clock, daemon, [], tmp_path)
    try:
        for number in range(proxies):
            home = tmp_path / f"proxy-{number}"
            home.mkdir()
            stack.proxies.append(ProxyProcess(proxy_config(home, fake.url, stack.daemon_url), home))
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    for proxy in stack.proxies:
        proxy.stop(signal.SIGKILL)
    stack.daemon.stop()


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic(PROXY_KEY)
    server.hold = threading.Event()  # every stream waits at the fake until a test lets it end
    server.hold_timeout = 120.0
    yield server
    server.close()


@pytest.fixture(params=[1, 2], ids=["one-proxy", "two-proxies"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, fake: FakeAnthropic) -> Iterator[Stack]:
    built = start_stack(tmp_path, fake, request.param)
    yield built
    stop_stack(built)


@pytest.fixture
def pair(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Stack]:
    built = start_stack(tmp_path, fake, 2)
    yield built
    stop_stack(built)


def held_stream(exits: contextlib.ExitStack, client: anthropic.Anthropic, **options: Any) -> Any:
    """Open a stream (its headers arrived: the call was admitted and is at the fake); raises what the proxy said."""
    options = {"model": HAIKU, "max_tokens": 50, "messages": SHORT, **options}
    return exits.enter_context(client.messages.stream(**options))


def finish(stack: Stack, stream: Any) -> anthropic.types.Message:
    """Let one held stream end at the fake and read it to its end, as the caller would."""
    stack.fake.finish(stream.response.headers["request-id"])
    message: anthropic.types.Message = stream.get_final_message()
    return message


def test_concurrent_two_ten_streams_two_through_eight_429_until_one_ends(stack: Stack) -> None:
    with contextlib.ExitStack() as exits:
        admitted, refused = [], []
        for number in range(10):
            try:
                admitted.append(held_stream(exits, stack.sdk("u-c", "lingo", via=number)))
            except anthropic.RateLimitError as exc:
                refused.append(exc)
        assert len(admitted) == 2 and len(refused) == 8
        for error in refused:
            assert error.status_code == 429 and isinstance(error.body, dict)
            assert error.body["error"]["type"] == "rate_limit_error"
            assert (
                "two-at-once" in error.body["error"]["message"]
                and "2 calls in flight" in error.body["error"]["message"]
            )
            assert error.response.headers["retry-after"] == "1"
            assert "x-should-retry" not in error.response.headers  # the SDK may retry these
        assert len(stack.fake.seen("/v1/messages")) == 2  # the refused never went upstream
        assert stack.sdk("u-other", "lingo").messages.create(model=HAIKU, max_tokens=5, messages=SHORT)  # own slots

        # One ends (as the caller sees it): its slot is free by then, and only one.
        assert finish(stack, admitted[0]).usage.output_tokens == 50
        third = held_stream(exits, stack.sdk("u-c", "lingo", via=1))
        with pytest.raises(anthropic.RateLimitError):
            held_stream(exits, stack.sdk("u-c", "lingo"))
        finish(stack, admitted[1])
        finish(stack, third)

    metrics = stack.daemon_metrics()
    assert metrics["claude_admission_total", (("limit", "two-at-once"), ("outcome", "concurrency"))] == 9
    assert metrics["claude_admission_total", (("limit", "two-at-once"), ("outcome", "admitted"))] == 4
    assert metrics["claude_admission_inflight", (("limit", "two-at-once"),)] == 0
    assert metrics["claude_admission_open_leases", ()] == 0
    proxies = range(len(stack.proxies))
    assert sum(stack.proxy_metric("claude_proxy_admission_total", i, outcome="concurrency") for i in proxies) == 9
    assert sum(stack.proxy_metric("claude_proxy_admission_total", i, outcome="admitted") for i in proxies) == 4


def test_a_stream_longer_than_lease_ttl_keeps_its_slot_by_renewing(pair: Stack) -> None:
    stack = pair
    with contextlib.ExitStack() as exits:
        running = held_stream(exits, stack.sdk("u-r", "solo"))
        renewed = 0.0
        for _ in range(3):  # 3 x 2 s on the daemon's clock: twice lease_ttl since the admit
            stack.clock.advance(seconds=2)
            # Two renewals after the move: the second was sent after it, so the lease now ends 3 s from here.
            renewed = wait_until(
                lambda base=renewed: (
                    value
                    if (value := stack.proxy_metric("claude_proxy_lease_renewals_total", result="renewed")) >= base + 2
                    else None
                ),
                timeout=30,
            )
        with pytest.raises(anthropic.RateLimitError) as caught:
            held_stream(exits, stack.sdk("u-r", "solo", via=1))  # the slot is still held, 6 s after the admit
        assert isinstance(caught.value.body, dict) and "one-at-once" in caught.value.body["error"]["message"]
        assert finish(stack, running).stop_reason == "end_turn"
        assert stack.sdk("u-r", "solo", via=1).messages.create(model=HAIKU, max_tokens=5, messages=SHORT)
    assert stack.proxy_metric("claude_proxy_lease_renewals_total", result="ended") == 0


def test_thirty_calls_at_once_under_twenty_a_minute_admit_exactly_twenty(stack: Stack) -> None:
    before = len(stack.fake.seen("/v1/messages"))

    def call(number: int) -> object:
        try:
            return stack.sdk("u-rate", "rated", via=number).messages.create(model=HAIKU, max_tokens=5, messages=SHORT)
        except anthropic.RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(call, range(30)))  # the daemon's clock does not move: all within one instant
    refused = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
    assert len(refused) == 10 and len(outcomes) - len(refused) == 20
    for error in refused:
        assert int(error.response.headers["retry-after"]) == 3  # one request's worth of a 20-a-minute bucket
        assert "x-should-retry" not in error.response.headers
        assert isinstance(error.body, dict) and "per-user-rate" in error.body["error"]["message"]
    assert len(stack.fake.seen("/v1/messages")) - before == 20
    stack.clock.advance(seconds=3)  # the bucket refills one request
    assert stack.sdk("u-rate", "rated").messages.create(model=HAIKU, max_tokens=5, messages=SHORT)


def test_max_tokens_over_the_cap_is_400_before_any_upstream_call(pair: Stack) -> None:
    stack = pair
    with pytest.raises(anthropic.BadRequestError) as caught, contextlib.ExitStack() as exits:
        held_stream(exits, stack.sdk("u-big", "lingo"), max_tokens=64_000)  # so large a call must stream
    error = caught.value
    assert error.status_code == 400 and isinstance(error.body, dict)
    assert error.body["error"]["type"] == "invalid_request_error"
    message = error.body["error"]["message"]
    assert "max_tokens 64,000" in message and "cap of 4,096" in message and "high-token-guard" in message
    assert "retry-after" not in error.response.headers
    assert stack.fake.requests == []  # the fake saw nothing at all
    assert stack.proxy_metric("claude_proxy_admission_total", outcome="too_large") == 1


def test_budget_reserves_worst_cases_and_settles_at_the_real_cost_once(stack: Stack) -> None:
    # Each call really costs $0.000665 + 100 output tokens x $5/M + one web search ($10 per 1,000) = $0.011165.
    stack.fake.output_tokens = 100
    wallet = {"max_tokens": WALLET_MAX_TOKENS, "messages": WALLET_ASK}
    with contextlib.ExitStack() as exits:
        first = held_stream(exits, stack.sdk("u-1", "wallet", via=0), **wallet)
        second = held_stream(exits, stack.sdk("u-2", "wallet", via=1), **wallet)
        reserved = ("claude_budget_reserved_usd", (("budget", "wallet"), ("scope", "project=wallet")))
        assert stack.daemon_metrics()[reserved] == pytest.approx(0.08)
        with pytest.raises(anthropic.RateLimitError) as caught:  # $0 + $0.08 reserved + $0.04 > $0.10
            held_stream(exits, stack.sdk("u-3", "wallet"), **wallet)
        error = caught.value
        assert error.response.headers["x-should-retry"] == "false"  # as for a spent budget
        assert int(error.response.headers["retry-after"]) >= 1
        assert isinstance(error.body, dict) and "budget 'wallet'" in error.body["error"]["message"]
        assert "$0.040000" in error.body["error"]["message"]
        assert len(stack.fake.seen("/v1/messages")) == 2

        assert spend(stack) == Decimal("0")  # reservations are never spend
        finish(stack, first)
        assert spend(stack) == Decimal("0.011165")  # settled at its real cost, not its worst case
        third = held_stream(exits, stack.sdk("u-3", "wallet", via=1), **wallet)  # $0.011165 + $0.08 <= $0.10
        assert stack.daemon_metrics()[reserved] == pytest.approx(0.08)
        finish(stack, second)
        finish(stack, third)

    # Three calls, each stored once and counted once: by the budget, the report and the metrics alike.
    assert spend(stack) == Decimal("0.033495")
    total = build_report(stack.daemon.store.engine, since=None, until=None, by=["project"]).total_pico
    assert total == 33_495_000_000
    stack.clock.advance(seconds=1)  # the metrics read their counters at most once a (daemon clock) second
    metrics = stack.daemon_metrics()
    cost = sum(v for (name, _labels), v in metrics.items() if name == "claude_cost_usd_total")
    assert cost == pytest.approx(0.033495)
    assert metrics[reserved] == 0 and metrics["claude_admission_open_leases", ()] == 0
    ids = [stream.response.headers["request-id"] for stream in (first, second, third)]
    database = sqlite3.connect(stack.directory / "monitor.db")
    try:
        rows = database.execute("SELECT request_id, output_tokens FROM events ORDER BY request_id").fetchall()
    finally:
        database.close()
    assert rows == [(request_id, 100) for request_id in sorted(ids)]


def spend(stack: Stack) -> Decimal:
    rows = request(stack.daemon_url + "/v1/budgets").json()
    return Decimal(next(row["spend_usd"] for row in rows if row["budget"] == "wallet"))


def test_a_proxy_killed_mid_stream_leaks_its_slot_only_until_lease_ttl(pair: Stack) -> None:
    stack = pair
    first = stack.sdk("u-k", "solo", via=0).messages.stream(model=HAIKU, max_tokens=50, messages=SHORT)
    stream = first.__enter__()
    request_id = stream.response.headers["request-id"]
    wait_until(lambda: request_id in stack.fake.held())
    stack.proxies[0].stop(signal.SIGKILL)  # no release, no usage event, no more renewals

    survivor = stack.sdk("u-k", "solo", via=1)
    with pytest.raises(anthropic.RateLimitError):
        survivor.messages.create(model=HAIKU, max_tokens=5, messages=SHORT)  # the dead proxy's lease holds
    stack.clock.advance(seconds=2)
    with pytest.raises(anthropic.RateLimitError):
        survivor.messages.create(model=HAIKU, max_tokens=5, messages=SHORT)  # within lease_ttl still
    stack.clock.advance(seconds=1)  # lease_ttl (3 s) since its last renewal at the latest
    assert survivor.messages.create(model=HAIKU, max_tokens=5, messages=SHORT).usage.output_tokens == 5
    assert stack.daemon_metrics()["claude_admission_open_leases", ()] == 0
    with contextlib.suppress(Exception):
        first.__exit__(None, None, None)


def test_daemon_unreachable_fail_mode_decides_and_says_so(tmp_path: Path, fake: FakeAnthropic) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for mode in ("open", "closed"):
        home = tmp_path / mode
        home.mkdir()
        config = proxy_config(home, fake.url, away)
        config.write_text(config.read_text().replace("fail_mode: open", f"fail_mode: {mode}"))
        proxy = ProxyProcess(config, home)
        try:
            client = sdk(proxy.url, "u-f", "lingo", max_retries=0)
            if mode == "open":
                raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=5, messages=SHORT)
                assert raw.status_code == 200 and raw.headers["x-monitor-fail-mode"] == "open"
                metrics = parse_metrics(request(proxy.url + "/metrics").body.decode())
                assert metrics["claude_proxy_fail_mode_decisions_total", (("decision", "allowed"), ("stage", "admit"))]
                assert metrics["claude_proxy_admission_total", (("outcome", "unavailable"),)] == 1
            else:
                with pytest.raises(anthropic.RateLimitError) as caught:
                    client.messages.create(model=HAIKU, max_tokens=5, messages=SHORT)
                assert caught.value.response.headers["x-monitor-fail-mode"] == "closed"
                metrics = parse_metrics(request(proxy.url + "/metrics").body.decode())
                assert sum(v for (n, ls), v in metrics.items() if n == "claude_proxy_fail_mode_decisions_total" and
                           ("decision", "denied") in ls) == 1  # fmt: skip
        finally:
            proxy.stop(signal.SIGKILL)
    assert len(fake.seen("/v1/messages")) == 1  # closed forwarded nothing


def test_a_client_that_leaves_mid_stream_or_an_upstream_failure_returns_the_slot(pair: Stack) -> None:
    stack = pair
    client = stack.sdk("u-d", "solo")
    with contextlib.ExitStack() as exits:
        stream = held_stream(exits, client)
        request_id = stream.response.headers["request-id"]
        wait_until(lambda: request_id in stack.fake.held())
        stream.close()  # the caller goes away; the proxy closes the stream from Anthropic and records what it saw
    # Observed, not timed: the daemon settles the lease when the proxy's usage event lands.
    wait_until(lambda: stack.daemon_metrics()["claude_admission_open_leases", ()] == 0)
    stack.fake.fail_next(500)
    with pytest.raises(anthropic.InternalServerError):
        stack.sdk("u-d", "solo", via=1).messages.create(model=HAIKU, max_tokens=5, messages=SHORT)
    assert stack.daemon_metrics()["claude_admission_open_leases", ()] == 0  # recorded (status 500) before the answer
    assert stack.sdk("u-d", "solo", via=1).messages.create(model=HAIKU, max_tokens=5, messages=SHORT)
    assert stack.daemon_metrics()["claude_admission_total", (("limit", "one-at-once"), ("outcome", "admitted"))] == 3
