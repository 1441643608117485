"""The proxy holds against hostile or careless clients, over real sockets: framing, body limit, slow headers,
clients that leave mid-stream, and hundreds of concurrent streams.

The proxy runs with `max_body_bytes` 1 MiB and `header_timeout` 1 s, in front of the local fake Anthropic, with a
real `serve` recording usage.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_harness import ASK, CLIENT_KEY, HAIKU, PROXY_KEY, ProxyProcess, proxy_config, stored_row
from tests.serve_harness import Serve, read_until_closed, wait_until

# Starts proxy and `serve` processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

MAX_BODY = 1024 * 1024
BOUNDS = f"  max_body_bytes: {MAX_BODY}\n  header_timeout: 1s\n  keepalive_timeout: 3s\n"
SERVE_CONFIG = """\
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
"""


@dataclass
class Door:
    fake: FakeAnthropic
    serve: Serve
    proxy: ProxyProcess
    directory: Path

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy.port

    def status(self, name: str) -> int:
        """A /proc/<pid>/status figure of the proxy (VmRSS in KiB, Threads)."""
        for line in Path(f"/proc/{self.proxy.proc.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {name} in /proc/{self.proxy.proc.pid}/status")


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    fake = FakeAnthropic(PROXY_KEY)
    serve = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    try:
        proxy = ProxyProcess(proxy_config(tmp_path, fake.url, serve.url, extra=BOUNDS), tmp_path)
    except BaseException:
        serve.stop(signal.SIGKILL)
        fake.close()
        raise
    yield Door(fake, serve, proxy, tmp_path)
    proxy.stop(signal.SIGKILL)
    serve.stop(signal.SIGKILL)
    fake.close()


def post_head(door: Door, extra: str) -> socket.socket:
    sock = socket.create_connection(door.address)
    sock.sendall(
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {CLIENT_KEY}\r\nX-App-User: u-raw\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n".encode()
    )
    return sock


@pytest.mark.parametrize("chunk", [b"-1\r\n", b"zz\r\n{}\r\n0\r\n\r\n"], ids=["negative", "not-hex"])
def test_a_malformed_chunk_size_is_400_and_the_connection_closes(door: Door, chunk: bytes) -> None:
    with post_head(door, "Transfer-Encoding: chunked\r\n") as sock:
        sock.sendall(chunk)
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert door.fake.requests == []


def test_a_chunked_body_past_the_limit_is_413_and_memory_stays_flat(door: Door) -> None:
    before = door.status("VmRSS")
    with post_head(door, "Transfer-Encoding: chunked\r\n") as sock:
        sock.sendall(b"3E800000\r\n")  # one chunk of 1000 MiB is announced ...
        piece = b"x" * 65536
        sent = 0
        try:
            while sent <= MAX_BODY:  # ... and sent until just past the body limit
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before the last piece
        received, _ = read_until_closed(sock, timeout=10)
    grown = door.status("VmRSS") - before
    print(f"\nproxy RSS {before / 1024:.1f} MiB before, +{grown / 1024:.1f} MiB after a 1000 MiB chunk cut at 1 MiB")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    error = json.loads(body)["error"]
    assert error["type"] == "request_too_large" and "1,048,576 bytes" in error["message"]
    assert grown < 16 * 1024  # KiB: the rest of the announced 1000 MiB is never read
    assert door.fake.requests == []

    # Announced too large in Content-Length: refused before a byte of the body is sent.
    with post_head(door, f"Content-Length: {MAX_BODY + 1}\r\n") as sock:
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in received


def test_connections_that_never_finish_their_headers_are_closed_after_header_timeout(door: Door) -> None:
    silent = [socket.create_connection(door.address) for _ in range(250)]
    partial = [socket.create_connection(door.address) for _ in range(250)]
    for sock in partial:
        sock.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {CLIENT_KEY}\r\nX-App-".encode())
    try:
        for sock in silent + partial:
            received, _ = read_until_closed(sock, timeout=15)  # header_timeout is 1 s: closed long before
            assert received == b""  # closed without an answer
    finally:
        for sock in silent + partial:
            sock.close()
    assert door.fake.requests == []


def stream_request(user: str, max_tokens: int = 20) -> bytes:
    body = json.dumps({"model": HAIKU, "max_tokens": max_tokens, "stream": True, "messages": ASK}).encode()
    return (
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {CLIENT_KEY}\r\nX-App-User: {user}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_a_client_that_leaves_mid_stream_has_what_it_saw_recorded(door: Door) -> None:
    door.fake.hold = threading.Event()
    with socket.create_connection(door.address) as sock:
        sock.sendall(stream_request("u-gone", max_tokens=300))
        sock.settimeout(10)
        received = b""
        while b"event: ping" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    # The client is gone while Anthropic holds the rest of the stream: the proxy records without waiting for it.
    request_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in received.split(b"\r\n\r\n")[0].split(b"\r\n")
        if line.lower().startswith(b"request-id:")
    )
    row = wait_until(lambda: stored_row(door.directory, request_id), timeout=5)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, 100, 1)  # message_start's usage
    assert "the client went away mid-stream" in door.proxy.output()
    door.fake.hold.set()
    # The proxy closed its stream from Anthropic too: the rest of the generation found no reader.
    wait_until(lambda: request_id in door.fake.cut, timeout=5)
    assert request_id not in door.fake.streams


def test_500_concurrent_streams_pass_through_on_a_handful_of_threads(door: Door) -> None:
    count = 500
    door.fake.hold = threading.Event()  # every stream sends its first events, then waits
    door.fake.hold_timeout = 120
    host, port = door.address
    threads_before, rss_before = door.status("Threads"), door.status("VmRSS")

    async def one(number: int, all_started: asyncio.Event, started: list[int]) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(stream_request(f"u-{number}"))
        received = b""
        while b"event: ping" not in received:
            chunk = await reader.read(65536)
            assert chunk, received
            received += chunk
        started.append(number)
        if len(started) == count:
            all_started.set()
        received += await reader.read()  # to the end: the proxy closes after the last chunk (Connection: close)
        writer.close()
        return received

    async def run() -> tuple[list[bytes], float, int, int]:
        all_started = asyncio.Event()
        started: list[int] = []
        began = time.monotonic()
        tasks = [asyncio.create_task(one(n, all_started, started)) for n in range(count)]
        await asyncio.wait_for(all_started.wait(), timeout=60)
        took = time.monotonic() - began
        threads, rss = door.status("Threads"), door.status("VmRSS")  # all 500 streams open in the proxy
        assert door.fake.hold is not None
        door.fake.hold.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=60), took, threads, rss

    answers, took, threads, rss = asyncio.run(run())
    print(
        f"\n{count} concurrent streams open after {took:.1f} s; proxy threads {threads_before} -> {threads}, "
        f"RSS {rss_before / 1024:.1f} -> {rss / 1024:.1f} MiB ({(rss - rss_before) / count:.0f} KiB a stream)"
    )
    assert threads - threads_before < 40  # no thread per stream: the record and check pools at most
    for answer in answers:
        head, _, _ = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert answer.count(b"event: message_stop") == 1 and answer.endswith(b"0\r\n\r\n")
    assert len(door.fake.seen("/v1/messages")) == count
