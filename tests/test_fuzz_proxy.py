"""Property-based tests of the proxy's request framing, over raw sockets to a real `claude-monitor proxy` process.

Hypothesis writes the bytes of `POST /v1/messages` requests: Content-Length right, short, long, malformed, repeated
or absurd; chunked bodies cut anywhere, with chunk sizes in any case, with leading zeros, extensions and trailers, or
negative, signed, `0x`-prefixed, non-hex, wrong or absurd; both headers at once, or neither; the whole request cut
short. Whatever arrives, the proxy answers 2xx/4xx or closes the connection, never with a 5xx and never by hanging,
and serves the next client. A request whose framing is malformed, over any sane limit or incomplete is never
forwarded (nothing reaches Anthropic, nothing is billed) and never answered 2xx; a well-framed complete one is
answered 200. The assertions are on statuses and on what reached the fake Anthropic, not on any error text: the
server's own framing rejections may take any shape. `FUZZ_PROXY_EXAMPLES=1000` runs more examples than the default.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fake_anthropic import FakeAnthropic

PROXY_KEY = "sk-ant-api03-fuzz-proxy-side-secret-0123456789"
CLIENT_KEY = "fuzz-client-key-0123456789abcdef"
CLIENT_TIMEOUT = 15.0  # seconds without an answer or a close: a hang
ABSURD = 10**15  # bytes: over any body limit a proxy can have
ROUND_TRIPS = settings(
    max_examples=int(os.environ.get("FUZZ_PROXY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Fuzzes a proxy process at length: in the slow lane (`scripts/test -m slow`).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Generating overly large repr")]


# --- the proxy under test ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_yaml(upstream: str, port: int, monitor_port: int, clients: bool) -> str:
    """The proxy's config: fail open against a daemon that is not there, so only the proxy itself is exercised."""
    text = f"""\
throttle: {{snapshot_file: throttle.json}}
proxy:
  listen: "127.0.0.1:{port}"
  upstream: "{upstream}"
  api_key_env: FUZZ_PROXY_ANTHROPIC_KEY
  monitor_url: "http://127.0.0.1:{monitor_port}"
  fail_mode: open
"""
    if clients:  # callers authenticate with a proxy key of their own
        text += "  clients:\n    - {name: fuzz, key_env: FUZZ_PROXY_CLIENT_KEY, attributes: {project: fuzz}}\n"
    return text


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def start_proxy(directory: Path, upstream: str) -> Proxy:
    """`python -m monitor proxy`, configured with `clients:` where the proxy knows that key, else without."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_MONITOR_", "ANTHROPIC_"))}
    env.update({"FUZZ_PROXY_ANTHROPIC_KEY": PROXY_KEY, "FUZZ_PROXY_CLIENT_KEY": CLIENT_KEY})
    monitor_port = free_port()  # nothing listens there
    for clients in (True, False):
        port = free_port()
        config = directory / "proxy.yaml"
        config.write_text(proxy_yaml(upstream, port, monitor_port, clients), encoding="utf-8")
        log = directory / f"proxy-{'clients' if clients else 'plain'}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "monitor", "proxy", "--config", str(config)],
                cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return Proxy(proc, port, log)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the proxy did not start:\n{log.read_text(errors='replace')}")
    raise AssertionError(f"the proxy refused both configs:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeAnthropic, Proxy]]:
    directory = tmp_path_factory.mktemp("fuzz-proxy")
    fake = FakeAnthropic(PROXY_KEY)
    try:
        proxy = start_proxy(directory, fake.url)
        try:
            yield fake, proxy
        finally:
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
                proxy.proc.wait(30)
    finally:
        fake.close()


# --- requests as bytes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One request's bytes and what a correct server must make of them."""

    data: bytes
    kind: str  # "valid": well framed | "malformed" | "absurd": over any limit | "truncated" | "other": unspecified
    complete: bool  # the server can tell where the request ends without waiting for more bytes or the EOF
    marker: str  # in the body's text, to find the request upstream
    why: str  # for a failing example's report


def body_of(marker: str, text: str, max_tokens: int) -> bytes:
    message = {"role": "user", "content": f"{marker} {text}"}
    return json.dumps({"model": "claude-haiku-4-5", "max_tokens": max_tokens, "messages": [message]}).encode()


def head(extra: list[tuple[str, str]]) -> bytes:
    lines = ["POST /v1/messages HTTP/1.1", "Host: 127.0.0.1", f"x-api-key: {CLIENT_KEY}",
             "anthropic-version: 2023-06-01", "Content-Type: application/json"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@st.composite
def content_length_requests(draw: st.DrawFn, body: bytes) -> tuple[bytes, str, bool, str]:
    n = len(body)
    choice = draw(st.sampled_from(["exact", "short", "long", "malformed", "repeated", "absurd", "none"]))
    if choice == "exact":
        return head([("Content-Length", str(n))]) + body, "valid", True, "exact Content-Length"
    if choice == "short":  # the rest of the body is read as the next request, which never completes
        k = draw(st.integers(min_value=1, max_value=n))
        return head([("Content-Length", str(n - k))]) + body, "other", False, f"Content-Length {k} short"
    if choice == "long":
        k = draw(st.integers(min_value=1, max_value=10_000))
        return head([("Content-Length", str(n + k))]) + body, "truncated", False, f"Content-Length {k} long"
    if choice == "malformed":
        value = draw(
            st.sampled_from(
                ["-1", f"-{n}", "-0", f"+{n}", f"0x{n:x}", f"{n}.0", "1e3", "abc", "", f"{n}abc", f"{n}, {n + 1}"]
                + ([f"{n // 10}_{n % 10}"] if n >= 10 else [])
            )
        )
        return head([("Content-Length", value)]) + body, "malformed", False, f"Content-Length {value!r}"
    if choice == "repeated":
        other = draw(st.integers(min_value=0, max_value=n + 100).filter(lambda m: m != n))
        first, second = draw(st.permutations([str(n), str(other)]))
        wire = head([("Content-Length", first), ("Content-Length", second)]) + body
        return wire, "malformed", False, f"Content-Length {first} and {second}"
    if choice == "absurd":
        value = draw(st.sampled_from([str(ABSURD), "9" * 30]))
        return head([("Content-Length", value)]) + body, "absurd", False, f"Content-Length {value}"
    return head([]) + body, "other", False, "no Content-Length nor Transfer-Encoding"  # body read as a request


@st.composite
def chunked_requests(draw: st.DrawFn, body: bytes) -> tuple[bytes, str, bool, str]:
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=len(body) - 1), max_size=6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    kind, complete, why = "valid", True, []
    te = draw(st.sampled_from(["chunked", "Chunked", "CHUNKED"]))
    headers = [("Transfer-Encoding", te)]
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # both: chunked wins or the request is refused
        headers.append(("Content-Length", str(draw(st.integers(min_value=0, max_value=len(body) + 50)))))
        kind, complete, why = "other", False, ["Content-Length too"]
    # Which chunk (the last-chunk "0" included, index len(pieces)) gets a bad size line, and how.
    spoiled = draw(st.none() | st.integers(min_value=0, max_value=len(pieces)))
    spoil = draw(st.sampled_from(["malformed", "wrong", "absurd", "no-crlf"]))
    out = [head(headers)]
    for i, piece in enumerate([*pieces, b""]):
        size = draw(st.sampled_from(["{:x}", "{:X}", "0{:x}", "000{:x}"])).format(len(piece))
        if draw(st.integers(min_value=0, max_value=7)) == 0:
            size += draw(st.sampled_from([";ext", ";name=value"]))
        tail = b"\r\n"
        if i == spoiled:
            why.append(f"chunk {i}: {spoil}")
            if spoil == "malformed":
                n = len(piece)
                bad = [f"-{n:x}", "-1", f"+{n:x}", f"0x{n:x}", "", " ", f"{n:x}g", "zz", f"1_{n:x}"]
                size = draw(st.sampled_from(bad))
                kind, complete = "malformed", False
            elif spoil == "wrong":
                size = f"{len(piece) + draw(st.integers(min_value=1, max_value=300)):x}"
                kind, complete = ("other" if kind == "valid" else kind), False
            elif spoil == "absurd":
                size = draw(st.sampled_from([f"{ABSURD:x}", "f" * 15]))
                kind, complete = ("absurd" if kind != "malformed" else kind), False
            elif piece:  # no CRLF after the chunk's data
                tail = b""
                kind, complete = "malformed", False
        if i == len(pieces):
            trailer = draw(st.sampled_from([b"", b"X-Fuzz-Trailer: 1\r\n"])) if i != spoiled else b""
            out.append(size.encode() + b"\r\n" + trailer + b"\r\n")
        else:
            out.append(size.encode() + b"\r\n" + piece + tail)
    if draw(st.booleans()) and kind == "valid":  # no last chunk: the body never ends
        out.pop()
        kind, complete = "truncated", False
        why.append("no last chunk")
    return b"".join(out), kind, complete, f"Transfer-Encoding {te}; " + "; ".join(why)


@st.composite
def requests(draw: st.DrawFn) -> Wire:
    marker = f"fuzz-{uuid.uuid4().hex}"
    body = body_of(marker, draw(st.text(max_size=60)), draw(st.integers(min_value=1, max_value=64)))
    framing = content_length_requests(body) if draw(st.booleans()) else chunked_requests(body)
    data, kind, complete, why = draw(framing)
    if draw(st.integers(min_value=0, max_value=5)) == 0:  # the client stops sending part-way, anywhere
        cut = draw(st.integers(min_value=1, max_value=len(data) - 1))
        data = data[:cut]
        kind = kind if kind in ("malformed", "absurd") else "truncated"
        complete = False
        why += f"; cut after {cut} of {len(data)} bytes"
    return Wire(data, kind, complete, marker, why)


# --- the client side ---------------------------------------------------------------------------------------------


class _Reader:
    """Lets http.client parse several answers from one buffered reader (which it must not close after each)."""

    def __init__(self, reader: io.BufferedReader) -> None:
        self.reader = reader

    def makefile(self, *args: Any, **kwargs: Any) -> _Reader:
        return self

    def readline(self, limit: int = -1) -> bytes:
        return self.reader.readline(limit)

    def read(self, size: int = -1) -> bytes:
        return self.reader.read(size)

    def read1(self, size: int = -1) -> bytes:
        return self.reader.read1(size)

    def readinto(self, buffer: Any) -> int:
        return self.reader.readinto(buffer)

    def peek(self, size: int = 0) -> bytes:
        return self.reader.peek(size)

    def close(self) -> None:
        pass


def exchange(port: int, wire: Wire) -> list[int]:
    """Send the bytes; the statuses of every answer until the proxy closes (or, for a complete request, answers).

    An incomplete request is followed by the end of what the client sends (a half-close): a correct server then
    answers or closes. A client timeout (a hang) raises.
    """
    statuses: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        try:
            sock.sendall(wire.data)
            if not wire.complete:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy answered and closed before taking everything: read that answer
        reader = sock.makefile("rb")
        while True:
            response = http.client.HTTPResponse(_Reader(reader))  # type: ignore[arg-type]
            try:
                response.begin()
                response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead):
                return statuses  # closed (a cut answer after its status line counts as closed too)
            except http.client.BadStatusLine:
                # The stdlib server answers a request line it cannot parse in HTTP/0.9 form (a body, no status
                # line), then closes: the server's own rejection, in its own format.
                return statuses
            except TimeoutError as exc:
                raise AssertionError(f"no answer and no close within {CLIENT_TIMEOUT} s, after {statuses}") from exc
            statuses.append(response.status)
            if wire.complete or response.will_close:
                return statuses
            if not select.select([sock], [], [], CLIENT_TIMEOUT)[0]:
                raise AssertionError(f"the connection stayed open {CLIENT_TIMEOUT} s after the client's EOF")


def still_serves(port: int) -> int:
    """The status a plain, well-formed call gets on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        body = body_of("fuzz-check", "still there?", 8)
        connection.request("POST", "/v1/messages", body, {"x-api-key": CLIENT_KEY, "Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@ROUND_TRIPS
@given(requests())
def test_any_framing_is_answered_or_closed_never_5xx_and_only_sound_requests_go_upstream(
    stack: tuple[FakeAnthropic, Proxy], wire: Wire
) -> None:
    fake, proxy = stack
    event(wire.kind)
    statuses = exchange(proxy.port, wire)
    report = f"{wire.why} ({wire.kind}): answers {statuses}\n{wire.data[:400]!r}"
    assert all(100 <= status < 500 for status in statuses), report
    forwarded = [seen for seen in fake.requests if wire.marker.encode() in seen.body]
    if wire.kind in ("malformed", "absurd", "truncated"):
        assert not forwarded, "forwarded upstream: " + report
        assert not any(200 <= status < 300 for status in statuses), report
    if wire.kind == "valid":
        assert statuses[:1] == [200] and len(forwarded) == 1, report
    assert proxy.proc.poll() is None, report
    assert still_serves(proxy.port) == 200, report
