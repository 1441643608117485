"""Hostile clients against a real `serve` over real sockets: every attack meets a bound, and the daemon stays up."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.serve_harness import TOKEN, Serve, read_until_closed, request, wait_until

# Starts `serve` processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

MAX_BODY = 4_000_000
CONFIG = f"""\
http:
  listen: "127.0.0.1:0"
  max_body_bytes: {MAX_BODY}
  header_timeout: 1s
  keepalive_timeout: 3s
  max_events_per_request: 30000
  check_require: [project]
sources: []
throttle: {{snapshot_file: throttle.json}}
schedule: {{evaluate_every: 60s}}
budgets:
  - name: per-user-daily
    match: {{project: lingo}}
    per: user
    window: day
    limit_usd: 0.50
    throttle_at: 1.0
"""


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One serve for the module, with u-1 of project lingo over its daily budget."""
    directory = tmp_path_factory.mktemp("door")
    daemon = Serve(write_config(directory, CONFIG), directory)
    # 100,000 output tokens x $5 per million (Haiku 4.5) = $0.50 = the limit.
    answer = daemon.post_usage(
        {
            "request_id": "over-1",
            "timestamp": datetime.now(UTC).isoformat(),
            "model": "claude-haiku-4-5",
            "usage": {"input_tokens": 0, "output_tokens": 100_000},
            "attributes": {"project": "lingo", "user": "u-1"},
        }
    )
    assert answer.status == 202, answer.body
    yield daemon
    assert daemon.stop(signal.SIGTERM) == 0


def address(serve: Serve) -> tuple[str, int]:
    host, port = serve.url.removeprefix("http://").split(":")
    return host, int(port)


def rss_kib(serve: Serve) -> int:
    for line in Path(f"/proc/{serve.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def rows(serve: Serve, table: str) -> int:
    database = sqlite3.connect(serve.log.parent / "monitor.db")
    try:
        return int(database.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        database.close()


def rejected_count(serve: Serve) -> int:
    """The stored counter behind claude_monitor_ingest_events_total{source="http", outcome="rejected"}."""
    database = sqlite3.connect(serve.log.parent / "monitor.db")
    try:
        found = database.execute(
            "SELECT value FROM counters WHERE name = 'ingest_events' AND labels = ?",
            ['{"outcome":"rejected","source":"http"}'],
        ).fetchone()
        return int(found[0]) if found else 0
    finally:
        database.close()


def read_one_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One response with a Content-Length body (or none), leaving the connection open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def post_raw(serve: Serve, head_extra: str) -> socket.socket:
    sock = socket.create_connection(address(serve))
    sock.sendall(f"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{head_extra}\r\n".encode())
    return sock


# --- connections ---------------------------------------------------------------------------------------------------


def test_500_simultaneous_new_connections_are_all_answered(door: Serve) -> None:
    host, port = address(door)

    async def one() -> tuple[int, float]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /v1/check?project=lingo&user=u-2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status_line = await reader.readline()
        await reader.read()
        writer.close()
        return int(status_line.split()[1]), time.monotonic() - started

    async def all_at_once() -> list[tuple[int, float]]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(500))), timeout=60)

    results = asyncio.run(all_at_once())
    statuses = [status for status, _ in results]
    latencies = sorted(latency for _, latency in results)
    print(
        f"\n500 simultaneous connections: {statuses.count(204)} x 204, {statuses.count(503)} x 503; "
        f"latency p50 {latencies[249] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert set(statuses) <= {204, 503}
    assert statuses.count(204) >= 450  # the cap is 1000: nearly all are served, none stalls


def test_connections_that_never_finish_their_headers_are_closed_after_header_timeout(door: Serve) -> None:
    silent = [socket.create_connection(address(door)) for _ in range(250)]
    partial = [socket.create_connection(address(door)) for _ in range(250)]
    for sock in partial:
        sock.sendall(b"GET /v1/check?project=lingo HTTP/1.1\r\nHost: x\r\nX-Monitor-")
    try:
        for sock in silent + partial:
            received, _ = read_until_closed(sock, timeout=15)  # header_timeout is 1 s: closed long before
            assert received == b""  # closed without an answer
    finally:
        for sock in silent + partial:
            sock.close()
    assert request(door.url + "/healthz").status == 200


def test_a_keep_alive_connection_that_stalls_in_its_second_request_is_closed(door: Serve) -> None:
    with socket.create_connection(address(door)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHos")  # the keep-alive timeout (3 s) no longer applies
        received, _ = read_until_closed(sock, timeout=15)
        assert received == b""  # closed by the 1 s header timeout, not held for good


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(door: Serve) -> None:
    with socket.create_connection(address(door)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one_response(sock).startswith(b"HTTP/1.1 200")
        received, waited = read_until_closed(sock, timeout=15)
        assert received == b"" and waited > 2  # keepalive_timeout is 3 s: the 1 s header timeout is not armed


# --- framing and body limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, body",
    [
        pytest.param("Transfer-Encoding: chunked\r\n", b"-1\r\n", id="negative-chunk-size"),
        pytest.param("Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n", id="chunk-size-not-hex"),
        pytest.param("Content-Length: 12abc\r\n", b"{}", id="content-length-not-a-number"),
        pytest.param("Content-Length: 2\r\nContent-Length: 3\r\n", b"{}", id="two-content-lengths"),
    ],
)
def test_malformed_framing_is_400_and_the_connection_closes(door: Serve, head: str, body: bytes) -> None:
    events, letters = rows(door, "events"), rows(door, "dead_letters")
    with post_raw(door, head) as sock:
        sock.sendall(body)
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert (rows(door, "events"), rows(door, "dead_letters")) == (events, letters)


def test_a_chunk_over_the_body_limit_is_413_and_memory_stays_flat(door: Serve) -> None:
    before = rss_kib(door)
    with post_raw(door, "Transfer-Encoding: chunked\r\n") as sock:
        sock.sendall(b"3E800000\r\n")  # one chunk of 1000 MiB is announced ...
        piece = b"x" * 65536
        sent = 0
        while sent <= MAX_BODY:  # ... and sent until just past the body limit
            sock.sendall(piece[: MAX_BODY + 1 - sent] if MAX_BODY + 1 - sent < len(piece) else piece)
            sent += min(len(piece), MAX_BODY + 1 - sent)
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 413 ")
    assert b"4,000,000 bytes" in received
    grown = rss_kib(door) - before
    print(f"\nRSS growth after a 1000 MiB chunk cut at {MAX_BODY:,} bytes: {grown / 1024:.1f} MiB")
    assert grown < 64 * 1024  # the rest of the announced 1000 MiB is never read


def test_a_body_that_stops_arriving_is_408_after_header_timeout(door: Serve) -> None:
    with post_raw(door, "Content-Length: 100\r\n") as sock:
        sock.sendall(b'[{"request_id": ')  # 16 bytes, then nothing
        received, _ = read_until_closed(sock, timeout=15)  # the body may pause as long as headers may take: 1 s
    assert received.startswith(b"HTTP/1.1 408 ") and b"16 bytes received" in received


def test_an_oversized_content_length_is_413_before_the_body_is_sent(door: Serve) -> None:
    with post_raw(door, f"Content-Length: {1000 * 1024 * 1024}\r\n") as sock:
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 413 ") and b"1,048,576,000 bytes" in received


# --- ingest bounds -------------------------------------------------------------------------------------------------


def test_a_million_empty_objects_are_refused_before_anything_is_stored(door: Serve) -> None:
    body = b"[" + b",".join([b"{}"] * 1_000_000) + b"]"  # 3 MB, under the body limit
    events, letters, before = rows(door, "events"), rows(door, "dead_letters"), rss_kib(door)
    started = time.monotonic()
    answer = door.post_usage(body)
    took = time.monotonic() - started
    assert answer.status == 413
    assert "30,000" in answer.json()["error"] and "nothing was stored" in answer.json()["error"]
    assert (rows(door, "events"), rows(door, "dead_letters")) == (events, letters)
    grown = rss_kib(door) - before
    print(f"\n1M-element body: 413 in {took * 1000:.0f} ms, RSS growth {grown / 1024:.1f} MiB")
    assert grown < 64 * 1024
    ndjson = b"{}\n" * 1_000_000
    assert door.post_usage(ndjson, content_type="application/x-ndjson").status == 413
    assert (rows(door, "events"), rows(door, "dead_letters")) == (events, letters)


def test_20k_bad_events_are_counted_with_bounded_answer_and_dead_letters(door: Serve) -> None:
    bad = [{"request_id": f"bad-{i}", "model": "claude-haiku-4-5"} for i in range(20_000)]  # no timestamp
    letters = rows(door, "dead_letters")
    rejected_before = rejected_count(door)
    answer = door.post_usage(bad)
    assert answer.status == 202
    document = answer.json()
    assert document["accepted"] == 0 and document["rejected_total"] == 20_000
    assert len(document["rejected"]) == 100
    assert [r["index"] for r in document["rejected"]] == list(range(100))
    assert len(answer.body) < 20_000
    assert rows(door, "dead_letters") - letters == 1_001  # 1,000 one by one, plus one summary
    database = sqlite3.connect(door.log.parent / "monitor.db")
    reason, raw = database.execute("SELECT reason, raw FROM dead_letters ORDER BY id DESC LIMIT 1").fetchone()
    database.close()
    assert "19,000 more rejected" in reason
    assert raw.startswith('[{"request_id": "bad-0"')
    assert rejected_count(door) - rejected_before == 20_000  # counted, never silent


# --- checks --------------------------------------------------------------------------------------------------------


def test_the_envoy_form_takes_identity_from_headers_only(door: Serve) -> None:
    # The query string of /v1/check/<path> is the caller's own: it must not change who is checked.
    throttled = {"X-Monitor-Project": "lingo", "X-Monitor-User": "u-1"}
    assert door.get("/v1/check/v1/messages?user=nobody&project=other", throttled).status == 429
    assert door.get("/v1/check/v1/messages?user=u-1&project=lingo", {"X-Monitor-Project": "lingo"}).status == 204
    # The plain form (nginx builds its query itself) still reads query arguments.
    assert door.get("/v1/check?project=lingo&user=u-1").status == 429


def test_check_require_refuses_a_check_without_the_dimension(door: Serve) -> None:
    plain = door.get("/v1/check?user=u-1")
    assert plain.status == 400 and "project" in plain.json()["error"]
    envoy = door.get("/v1/check/v1/messages?project=lingo", {"X-Monitor-User": "u-1"})
    assert envoy.status == 400 and "X-Monitor-Project" in envoy.json()["error"]


READ_CONFIG = """\
http:
  listen: "127.0.0.1:0"
  read_token_env: MONITOR_READ_TOKEN
  max_connections: 20
  metrics_listen: "127.0.0.1:0"
sources: []
throttle: {snapshot_file: throttle.json}
"""


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Serve]:
    daemon = Serve(write_config(tmp_path, READ_CONFIG), tmp_path, env={"MONITOR_READ_TOKEN": "read-secret"})
    yield daemon
    daemon.stop(signal.SIGKILL)


def test_the_read_token_guards_checks_budgets_and_throttle_only(guarded: Serve) -> None:
    for path, ok in (("/v1/check?user=a", 204), ("/v1/budgets", 200), ("/v1/throttle", 200)):
        assert guarded.get(path).status == 401, path
        assert guarded.get(path, {"Authorization": "Bearer wrong"}).status == 401, path
        assert guarded.get(path, {"Authorization": f"Bearer {TOKEN}"}).status == 401, path  # not the ingest token
        assert guarded.get(path, {"Authorization": "Bearer read-secret"}).status == ok, path
    for path in ("/metrics", "/healthz", "/readyz"):
        assert guarded.get(path).status == 200, path


def test_metrics_listen_serves_metrics_and_health_only(guarded: Serve) -> None:
    found = re.search(r"metrics and health on (http://[\d.]+:\d+)", guarded.output())
    assert found, guarded.output()
    ops = found.group(1)
    for path in ("/metrics", "/healthz", "/readyz"):
        assert request(ops + path).status == 200, path
    assert request(ops + "/v1/budgets", headers={"Authorization": "Bearer read-secret"}).status == 404
    assert request(ops + "/v1/usage", "POST", b"{}", {"Authorization": f"Bearer {TOKEN}"}).status == 404
    assert request(ops + "/v1/check?user=a", headers={"Authorization": "Bearer read-secret"}).status == 404


def test_past_max_connections_a_new_request_gets_503_at_once(guarded: Serve) -> None:
    held = [socket.create_connection(address(guarded)) for _ in range(20)]
    try:
        wait_until(lambda: guarded.get("/healthz").status == 503, timeout=5)
        assert guarded.get("/healthz").status == 503  # answered, not queued behind the held connections
        # A check too, though checks are answered as their headers arrive, without a request cycle.
        assert guarded.get("/v1/check?user=a", {"Authorization": "Bearer read-secret"}).status == 503
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: guarded.get("/healthz").status == 200, timeout=5)
