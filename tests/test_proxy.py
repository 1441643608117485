"""`claude-monitor proxy` end to end: the real SDK → the real proxy process → a fake Anthropic; a real `serve` counts.

Haiku 4.5 per million tokens: input $1, output $5, cache write 5 min $1.25, 1 h $2, cache read $0.10, and a web
search $0.01. The fake bills 100 input, 100 + 200 cache-write and 400 cache-read tokens per call, that is
$0.000665, plus `max_tokens` output tokens.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from monitor.http.sse import SseUsage
from tests.conftest import run_cli, write_config
from tests.fake_anthropic import COUNT_TOKENS_ANSWER, FakeAnthropic
from tests.proxy_harness import (
    ASK,
    CLIENT_KEY,
    HAIKU,
    KEY_ENV,
    PROXY_KEY,
    ProxyProcess,
    Stack,
    proxy_config,
    read_until,
    sdk,
    stored_row,
    tokens,
    within,
)
from tests.serve_harness import Serve, wait_until

# Starts proxy and `serve` processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

SERVE_CONFIG = """\
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
sources: [{type: jsonl, path: proxy-spool.jsonl, name: proxy-spool}]
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.01
    throttle_at: 1.0
  - name: tiny-haiku-requests
    match: {project: tiny, model: claude-haiku-4-5}
    window: day
    limit_requests: 1
    throttle_at: 1.0
"""


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic(PROXY_KEY)
    yield server
    server.close()


@pytest.fixture
def stack(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Stack]:
    serve = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    try:
        proxy = ProxyProcess(proxy_config(tmp_path, fake.url, serve.url), tmp_path)
    except BaseException:
        serve.stop(signal.SIGKILL)
        raise
    yield Stack(fake, serve, proxy, tmp_path)
    proxy.stop(signal.SIGKILL)
    serve.stop(signal.SIGKILL)


def test_a_message_passes_through_and_its_usage_is_recorded_before_the_answer(stack: Stack) -> None:
    client = stack.sdk("u-1")
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=50, messages=ASK, extra_headers={"anthropic-beta": "files-api-2025-04-14"}
    )
    assert message.content[0].type == "text" and message.content[0].text == "Der Satz ist richtig."
    assert message.usage.cache_creation is not None and message.usage.cache_creation.ephemeral_1h_input_tokens == 200
    request_id = message._request_id
    assert request_id is not None and request_id.startswith("req_fake_")

    seen = stack.fake.seen("/v1/messages")[-1]
    assert seen.headers["x-api-key"] == PROXY_KEY  # the proxy's own key, not the client's
    assert "authorization" not in seen.headers and CLIENT_KEY not in json.dumps(seen.headers)
    assert seen.headers["anthropic-beta"] == "files-api-2025-04-14" and "anthropic-version" in seen.headers
    assert seen.headers["content-type"] == "application/json"
    assert not any(name.startswith("x-app-") for name in seen.headers)  # identity stays in-house
    assert seen.json()["messages"] == ASK

    # Recorded before the SDK got its answer: no waiting.
    row = stack.row(request_id)
    assert row is not None
    assert (row["model_id"], row["model"], row["status"], row["batch"]) == (
        "claude-haiku-4-5",
        "claude-haiku-4-5",
        200,
        0,
    )
    assert tokens(row) == (100, 50, 100, 200, 400, 0)
    # $0.000665 + 50 x $5/M = $0.000915
    assert row["cost_pico"] == 915_000_000
    assert json.loads(row["attributes"]) == {"user": "u-1", "project": "lingo", "feature": "grammar-check"}
    assert 0 < row["latency_ms"] < 10_000


def test_a_stream_passes_through_byte_for_byte_as_it_arrives(stack: Stack) -> None:
    stack.fake.hold = threading.Event()  # the fake sends three events, then waits
    connection = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=30)
    body = {"model": HAIKU, "max_tokens": 300, "stream": True, "messages": ASK}
    connection.request(
        "POST",
        "/v1/messages",
        body=json.dumps(body),
        headers={
            "Content-Type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-api-key": CLIENT_KEY,
            "X-App-User": "u-raw",
            "X-App-Project": "lingo",
        },
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    received = read_until(response, b"event: ping\n")  # what the fake sent so far arrives while it holds the rest
    assert b"content_block_delta" not in received
    stack.fake.hold.set()
    received += response.read()
    request_id = response.getheader("request-id")
    assert request_id is not None
    assert received == stack.fake.streams[request_id]
    connection.close()

    row = stack.row(request_id)
    assert row is not None
    assert (row["model"], row["status"], row["service_tier"]) == ("claude-haiku-4-5", 200, "standard")
    # cache detail and tier from message_start, cumulative counts and the web search from message_delta
    assert tokens(row) == (100, 300, 100, 200, 400, 1)
    assert json.loads(row["attributes"]) == {"user": "u-raw", "project": "lingo"}

    stack.fake.hold = None
    with stack.sdk("u-sdk").messages.stream(model="claude-haiku-4-5", max_tokens=120, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        sdk_request_id = stream.request_id
    assert text == "Der Satz ist richtig."
    assert final.usage.output_tokens == 120 and final.usage.cache_read_input_tokens == 400
    assert sdk_request_id is not None
    sdk_row = stack.row(sdk_request_id)
    assert sdk_row is not None and tokens(sdk_row) == (100, 120, 100, 200, 400, 1)


def test_over_budget_the_sdk_raises_rate_limit_error_at_once_and_anthropic_is_not_called(stack: Stack) -> None:
    client = stack.sdk("u-9")
    # Admitted on its worst case ($0.000088 of input by the request's bytes + 1,980 x $5/M = $0.009988), it costs
    # more: the cache writes Anthropic bills could not be known before the call. $0.010565 of $0.01 spent.
    client.messages.create(model="claude-haiku-4-5", max_tokens=1_980, messages=ASK)
    upstream_calls = len(stack.fake.seen("/v1/messages"))

    # Without `x-should-retry: false` the SDK would sleep Retry-After (hours) and ask again: give it 20 s.
    error = within(20, lambda: client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=ASK))
    assert isinstance(error, anthropic.RateLimitError), error
    assert error.response.headers["x-should-retry"] == "false"
    assert 0 < int(error.response.headers["retry-after"]) <= 86_400
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert (
        error.body["error"]["message"] == "per-user-daily exceeded for project=lingo, user=u-9: $0.010565 of $0.010000"
    )
    with pytest.raises(anthropic.RateLimitError), client.messages.stream(model=HAIKU, max_tokens=10, messages=ASK) as s:
        s.get_final_message()
    assert len(stack.fake.seen("/v1/messages")) == upstream_calls  # nothing more reached Anthropic
    # The SDK (max_retries 2 by default) did not retry: the proxy answered exactly one 429 per call.
    assert (
        stack.proxy.output().count(
            "POST /v1/messages 429 client=app-backend feature=grammar-check project=lingo user=u-9:"
        )
        == 2
    )
    assert client.messages.count_tokens(model=HAIKU, messages=ASK).input_tokens == COUNT_TOKENS_ANSWER  # not checked

    assert stack.sdk("u-10").messages.create(model=HAIKU, max_tokens=10, messages=ASK).usage.output_tokens == 10

    # The check names the model as the price table does: a budget on claude-haiku-4-5 stops calls that name a
    # dated snapshot of it.
    tiny = stack.sdk("u-t", project="tiny")
    tiny.messages.create(model=HAIKU, max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.RateLimitError) as caught:
        tiny.messages.create(model=HAIKU, max_tokens=5, messages=ASK)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["message"].startswith(
        "tiny-haiku-requests exceeded for model=claude-haiku-4-5, project=tiny"
    )


def test_count_tokens_is_forwarded_and_never_recorded(stack: Stack) -> None:
    counted = stack.sdk("u-2").messages.count_tokens(model="claude-haiku-4-5", messages=ASK)
    assert counted.input_tokens == COUNT_TOKENS_ANSWER
    seen = stack.fake.seen("/v1/messages/count_tokens")
    assert len(seen) == 1 and seen[0].headers["x-api-key"] == PROXY_KEY
    request_id = counted._request_id
    assert request_id is not None and stack.row(request_id) is None
    database = sqlite3.connect(stack.directory / "monitor.db")
    assert database.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)
    database.close()


def test_failed_calls_are_recorded_with_their_status_and_zero_usage(stack: Stack) -> None:
    client = stack.sdk("u-f", max_retries=0)
    stack.fake.fail_next(500)
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=ASK)
    assert caught.value.status_code == 500 and caught.value.request_id is not None
    assert isinstance(caught.value.body, dict) and caught.value.body["error"]["type"] == "api_error"  # as sent
    row = stack.row(caught.value.request_id)
    assert row is not None and row["status"] == 500 and tokens(row) == (0, 0, 0, 0, 0, 0)
    assert json.loads(row["attributes"])["user"] == "u-f"

    stack.fake.dropping = True  # Anthropic unreachable: the proxy answers 502 itself and records that
    with pytest.raises(anthropic.APIStatusError) as dropped:
        client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=ASK)
    stack.fake.dropping = False
    assert dropped.value.status_code == 502
    assert isinstance(dropped.value.body, dict) and dropped.value.body["error"]["type"] == "api_error"
    database = sqlite3.connect(stack.directory / "monitor.db")
    rows = database.execute("SELECT request_id, output_tokens FROM events WHERE status = 502").fetchall()
    database.close()
    assert len(rows) == 1 and rows[0][0].startswith("proxy-") and rows[0][1] == 0

    # Other routes are not forwarded.
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/messages/batches"), ("POST", "/v1/complete")):
        connection = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=30)
        connection.request(method, path, body=b"{}" if method == "POST" else None, headers={"x-api-key": CLIENT_KEY})
        answer = connection.getresponse()
        assert answer.status == 404
        assert json.loads(answer.read())["error"]["type"] == "not_found_error"
        connection.close()
    assert not stack.fake.seen("/v1/models") and not stack.fake.seen("/v1/complete")
    # An over-size body is refused from its Content-Length alone, in the same shape.
    connection = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=30)
    connection.putrequest("POST", "/v1/messages")
    connection.putheader("Content-Length", str(64 * 1024 * 1024 + 1))
    connection.putheader("x-api-key", CLIENT_KEY)
    connection.endheaders()
    too_big = connection.getresponse()
    assert too_big.status == 413 and json.loads(too_big.read())["error"]["type"] == "request_too_large"
    connection.close()


def test_the_client_key_never_travels_and_the_proxy_key_is_never_logged(stack: Stack) -> None:
    # With either header form the client's key is dropped; the fake would answer 401 to anything but the proxy's.
    # (The second request comes with a chunked body.)
    body = json.dumps({"model": HAIKU, "max_tokens": 5, "messages": ASK}).encode()
    for headers, chunked in (({"x-api-key": CLIENT_KEY}, False), ({"Authorization": f"Bearer {CLIENT_KEY}"}, True)):
        connection = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=30)
        connection.request(
            "POST",
            "/v1/messages",
            body=iter([body[:10], body[10:]]) if chunked else body,
            headers={**headers, "X-App-User": "u-k"},
            encode_chunked=chunked,
        )
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
        connection.close()
    stack.fake.fail_next(529, "overloaded_error")
    with pytest.raises(anthropic.APIStatusError):
        stack.sdk("u-k", max_retries=0).messages.create(model=HAIKU, max_tokens=5, messages=ASK)
    assert stack.fake.requests
    for seen in stack.fake.requests:
        assert seen.headers["x-api-key"] == PROXY_KEY and "authorization" not in seen.headers
        assert CLIENT_KEY not in json.dumps(seen.headers)
    log = stack.proxy.output()
    assert "POST /v1/messages 529" in log and PROXY_KEY not in log


def test_with_the_daemon_down_fail_open_passes_and_spools_for_the_daemon_to_tail(
    tmp_path: Path, fake: FakeAnthropic
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    proxy = ProxyProcess(proxy_config(tmp_path, fake.url, closed), tmp_path)
    try:
        message = sdk(proxy.url, "u-d").messages.create(model=HAIKU, max_tokens=40, messages=ASK)
        assert message.usage.output_tokens == 40
        spooled = [json.loads(line) for line in (tmp_path / "proxy-spool.jsonl").read_text().splitlines()]
        assert [event["request_id"] for event in spooled] == [message._request_id]
        assert spooled[0]["usage"]["output_tokens"] == 40 and spooled[0]["status"] == 200
        assert spooled[0]["attributes"] == {"user": "u-d", "project": "lingo", "feature": "grammar-check"}
        assert "spooled to" in proxy.output()

        # SIGTERM while a stream is in flight: the stream ends whole, then the proxy exits 0.
        fake.hold = threading.Event()
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        stream_body = json.dumps({"model": HAIKU, "max_tokens": 7, "stream": True, "messages": ASK})
        connection.request(
            "POST", "/v1/messages", body=stream_body, headers={"X-App-User": "u-d", "x-api-key": CLIENT_KEY}
        )
        response = connection.getresponse()
        received = read_until(response, b"event: ping\n")
        proxy.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM received" in proxy.output())
        assert proxy.proc.poll() is None
        fake.hold.set()
        received += response.read()
        assert received == fake.streams[str(response.getheader("request-id"))]
        connection.close()
    finally:
        assert proxy.stop() == 0
    log = proxy.output()
    assert "proxy stopped" in log and PROXY_KEY not in log
    assert len((tmp_path / "proxy-spool.jsonl").read_text().splitlines()) == 2

    # The daemon, back, tails the spool (it is one of its sources).
    serve = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    try:
        assert message._request_id is not None
        row = wait_until(lambda: stored_row(tmp_path, str(message._request_id)))
        assert tokens(row) == (100, 40, 100, 200, 400, 0)
    finally:
        serve.stop(signal.SIGKILL)


def test_the_proxy_refuses_to_start_without_its_key(tmp_path: Path) -> None:
    run = run_cli(
        "proxy", "--config", str(proxy_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")), check=False
    )
    assert run.returncode == 2
    assert f"the environment variable {KEY_ENV} is not set" in run.stderr and "proxy.yaml" in run.stderr


def test_usage_is_followed_across_any_cut_of_the_event_stream() -> None:
    events = [
        b'event: message_start\r\ndata: {"type": "message_start", "message": {"model": "m", "usage": '
        b'{"input_tokens": 7, "output_tokens": 1, "cache_creation": {"ephemeral_1h_input_tokens": 3}}}}\r\n\r\n',
        b': a comment\r\n\r\nevent: ping\r\ndata: {"type": "ping"}\r\n\r\n',
        b'event: message_delta\r\ndata: {"type": "message_delta", "usage": {"output_tokens": 5}}\r\n\r\n',
        b'event: message_delta\r\ndata: {"type": "message_delta", "usage": {"output_tokens": 9, '
        b'"cache_creation": null}}\r\n\r\n',
        b'event: message_stop\r\ndata: {"type": "message_stop"}\r\n\r\n',
    ]
    raw = b"".join(events)
    for size in (1, 2, 7, len(raw)):
        tracker = SseUsage()
        for start in range(0, len(raw), size):
            tracker.feed(raw[start : start + size])
        assert tracker.model == "m" and tracker.error_type is None
        assert tracker.usage == {
            "input_tokens": 7,
            "output_tokens": 9,
            "cache_creation": {"ephemeral_1h_input_tokens": 3},
        }
    broken = SseUsage()
    broken.feed(b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n')
    assert broken.error_type == "overloaded_error" and broken.usage == {"input_tokens": 0, "output_tokens": 0}
