"""The shared server layer on its own: a real HttpServer on a loopback port — drain, bind errors, body limits."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from monitor.config import ConfigError, load_settings
from monitor.http.server import (
    BindError,
    BodyTooLarge,
    HttpServer,
    Receive,
    Response,
    Scope,
    Send,
    ServerLimits,
    _OneWrite,
    error_response,
    headers_of,
    json_response,
    read_body,
)
from tests.conftest import write_config
from tests.serve_harness import wait_until


class GatedApp:
    """Answers /slow only once released; everything else at once. Reads bodies up to 1,000 bytes."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.waiter = ThreadPoolExecutor(4)  # not the loop's default executor, which the loop waits for on close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            self.entered.set()
            await asyncio.get_running_loop().run_in_executor(self.waiter, self.release.wait)
        try:
            body = await read_body(receive, 1000)
        except BodyTooLarge as exc:
            await error_response(413, str(exc), close=True).send(send)
            return
        await json_response(200, {"path": scope["path"], "bytes": len(body)}).send(send)


@pytest.fixture
def gated() -> Iterator[tuple[HttpServer, GatedApp]]:
    app = GatedApp()
    server = HttpServer(app, "127.0.0.1", 0, ServerLimits(header_timeout=5, keepalive_timeout=5), "test")
    server.start()
    yield server, app
    app.release.set()
    server.stop(drain_timeout=1)
    app.waiter.shutdown()


def get(server: HttpServer, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_stop_lets_a_request_in_flight_finish_and_refuses_new_connections(
    gated: tuple[HttpServer, GatedApp],
) -> None:
    server, app = gated
    assert get(server, "/fast")[0] == 200
    answers: list[tuple[int, bytes]] = []
    in_flight = threading.Thread(target=lambda: answers.append(get(server, "/slow")))
    in_flight.start()
    assert app.entered.wait(10)
    drained: list[bool] = []
    stopping = threading.Thread(target=lambda: drained.append(server.stop(drain_timeout=30)))
    stopping.start()

    def refused() -> bool:
        try:
            socket.create_connection(server.address, timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused, timeout=5)  # the listening socket closes within uvicorn's 0.1 s tick
    assert stopping.is_alive()  # still waiting for /slow
    app.release.set()
    in_flight.join(10)
    stopping.join(10)
    assert answers and answers[0][0] == 200
    assert drained == [True]


def test_stop_reports_requests_cut_off_by_the_drain_timeout(gated: tuple[HttpServer, GatedApp]) -> None:
    server, app = gated
    threading.Thread(target=lambda: get(server, "/slow"), daemon=True).start()
    assert app.entered.wait(10)
    started = time.monotonic()
    assert server.stop(drain_timeout=0.3) is False
    assert time.monotonic() - started < 20  # gives up at its drain timeout; the request is held for good


def test_a_port_in_use_is_a_bind_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use"):
            HttpServer(GatedApp(), "127.0.0.1", port, ServerLimits(), "test")


def test_read_body_counts_a_chunked_body_against_the_limit(gated: tuple[HttpServer, GatedApp]) -> None:
    server, _ = gated
    for size, status in ((1000, 200), (1001, 413)):
        connection = http.client.HTTPConnection(*server.address, timeout=10)
        connection.request("POST", "/echo", body=iter([b"x" * 500, b"y" * (size - 500)]), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == status, response.read()
        connection.close()


@pytest.mark.parametrize(
    "http_block, message",
    [
        ("{check_require: [team]}", "http.check_require: 'team' is not 'model' or one of dimensions"),
        ("{header_timeout: soon}", "'soon' is not a duration"),
        ('{metrics_listen: "9465"}', "'9465' is not HOST:PORT"),
        ("{max_events_per_request: 0}", "max_events_per_request"),
    ],
)
def test_http_bounds_are_checked_in_the_config(tmp_path: Path, http_block: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write_config(tmp_path, f"http: {http_block}\n"), environ={})


class RecordingTransport:
    """Stands in for the socket's transport under the server's write coalescing: records each write and close."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_a_response_header_block_leaves_with_its_body_in_one_write() -> None:
    loop = asyncio.new_event_loop()
    try:
        raw = RecordingTransport()
        out = _OneWrite(raw, loop)  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"
        out.write(head)
        assert raw.writes == []  # held for the body
        out.write(b"ok\n")
        assert raw.writes == [head + b"ok\n"]  # one send for the whole response

        # A header block whose body does not follow in the same turn (a stream's first chunk comes later) still
        # leaves on the loop's next turn, before anything written after it.
        out.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        loop.run_until_complete(asyncio.sleep(0))
        assert raw.writes[-1] == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        out.write(b"5\r\nhello\r\n")
        assert raw.writes[-1] == b"5\r\nhello\r\n" and len(raw.writes) == 3

        # A close sends what is held first; anything else passes through to the real transport.
        out.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
        out.close()
        assert raw.writes[-1] == b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n" and raw.closed
        assert out.get_extra_info("peername") == "info:peername"

        # An abort drops a held header block: the connection is gone.
        again = RecordingTransport()
        cut = _OneWrite(again, loop)  # type: ignore[arg-type]
        cut.write(head)
        cut.abort()
        loop.run_until_complete(asyncio.sleep(0))
        assert again.writes == [] and again.aborted
    finally:
        loop.close()


def test_keep_alive_answers_arrive_whole_through_the_coalescing_transport(
    gated: tuple[HttpServer, GatedApp],
) -> None:
    server, _app = gated
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(3):  # one connection, several answers: each complete, none stuck behind a held header block
            connection.request("GET", "/fast")
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read()) == {"path": "/fast", "bytes": 0}
    finally:
        connection.close()


class AnsweringApp:
    """Answers /now (GET or HEAD, no body) at once through `answer_now`; /slow only once released; through
    `__call__`, every request gets the very answer `answer_now` would give, so the two ways can be compared."""

    def __init__(self) -> None:
        self.called: list[str] = []  # paths served through __call__
        self.release = threading.Event()
        self.waiter = ThreadPoolExecutor(2)

    @staticmethod
    def respond(method: str, target: str, headers: dict[str, str]) -> Response:
        path, _, query = target.partition("?")
        if query == "empty":
            return Response(204, headers={"X-Why": "nothing to say"})
        if query == "bye":
            return json_response(200, {"bye": True}, close=True)
        return json_response(200, {"path": path, "method": method, "user": headers.get("x-user")}, {"Retry-After": "7"})

    def answer_now(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Response | None:
        named = {name.decode(): value.decode() for name, value in headers}
        if not target.startswith(b"/now") or method not in (b"GET", b"HEAD") or "content-length" in named:
            return None
        return self.respond(method.decode(), target.decode(), named)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called.append(scope["path"])
        if scope["path"] == "/slow":
            await asyncio.get_running_loop().run_in_executor(self.waiter, self.release.wait)
        await read_body(receive, 1000)
        target = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        await self.respond(scope["method"], target, headers_of(scope)).send(send)


class CalledOnly:
    """The same app without `answer_now`: every request through `__call__`."""

    def __init__(self, app: AnsweringApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _serve(app: object) -> HttpServer:
    server = HttpServer(app, "127.0.0.1", 0, ServerLimits(header_timeout=5, keepalive_timeout=5), "test")  # type: ignore[arg-type]
    server.start()
    return server


def _exchange(address: tuple[str, int], raw: bytes, answers: int = 1) -> bytes:
    """Send raw request bytes on a new connection; what comes back until `answers` whole answers arrived or the
    server closed the connection."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw)
        got = b""
        while True:
            complete = _answers(got)
            if len(complete) >= answers:
                return got
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk


def _answers(data: bytes) -> list[bytes]:
    """The complete answers (headers and Content-Length body) at the start of `data`; HEAD answers are not told
    apart, so callers give HEAD only as a connection's last request."""
    out = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


def _receive_answers(sock: socket.socket, count: int, got: bytes = b"") -> bytes:
    """Read from `sock` until `got` and what follows hold `count` whole answers."""
    while len(_answers(got)) < count:
        got += sock.recv(65536)
    return got


def _undated(data: bytes) -> bytes:
    return re.sub(rb"date: [^\r]*\r\n", b"", data)


REQUESTS = {
    "json": b"GET /now?x=1 HTTP/1.1\r\nHost: t\r\nX-User: u-1\r\n\r\n",
    "no content": b"GET /now?empty HTTP/1.1\r\nHost: t\r\n\r\n",
    "app closes": b"GET /now?bye HTTP/1.1\r\nHost: t\r\n\r\n",
    "client closes": b"GET /now HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "http/1.0": b"GET /now HTTP/1.0\r\n\r\n",
    "head": b"HEAD /now?x=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "trailing slash": b"GET /now/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_an_answer_given_at_once_is_on_the_wire_what_the_request_cycle_sends(name: str) -> None:
    app = AnsweringApp()
    at_once, called = _serve(app), _serve(CalledOnly(app))
    try:
        fast = _exchange(at_once.address, REQUESTS[name])
        assert app.called == []  # answered from the headers: no request cycle
        usual = _exchange(called.address, REQUESTS[name])
        assert app.called, "the app without answer_now serves it through __call__"
        assert fast.startswith(b"HTTP/1.1 ") and _undated(fast) == _undated(usual)
        assert b"date: " in fast and b"server: " not in fast.lower().replace(b"server: claude", b"")
    finally:
        at_once.stop(5)
        called.stop(5)


def test_answers_at_once_keep_their_order_behind_a_request_in_progress_and_keep_the_connection() -> None:
    app = AnsweringApp()
    server = _serve(app)
    try:
        with socket.create_connection(server.address, timeout=10) as sock:
            # One write, three requests: the slow one first; the two after it must not overtake it.
            sock.sendall(
                b"GET /now?a HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /now?b HTTP/1.1\r\nHost: t\r\nX-User: u-2\r\n\r\n"
            )
            got = _receive_answers(sock, 1)
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # /slow holds its answer, and /now?b waits behind it
                while True:
                    got += sock.recv(65536)
            assert len(_answers(got)) == 1
            app.release.set()
            sock.settimeout(10)
            got = _receive_answers(sock, 3, got)
            first, slow, last = (json.loads(a.partition(b"\r\n\r\n")[2]) for a in _answers(got))
            assert (
                first["path"] == "/now"
                and slow["path"] == "/slow"
                and last
                == {
                    "path": "/now",
                    "method": "GET",
                    "user": "u-2",
                }
            )
            assert app.called == ["/slow", "/now"]  # the one behind /slow went the usual way, in order
            # The connection goes on: the next request is answered at once again.
            sock.sendall(b"GET /now?c HTTP/1.1\r\nHost: t\r\n\r\n")
            more = _receive_answers(sock, 1)
            assert b'"path": "/now"' in more and app.called == ["/slow", "/now"]
    finally:
        app.release.set()
        server.stop(5)


def test_a_request_the_app_does_not_answer_at_once_is_served_as_usual_on_the_same_connection() -> None:
    app = AnsweringApp()
    server = _serve(app)
    try:
        with socket.create_connection(server.address, timeout=10) as sock:
            methods = []
            for raw in (
                b"GET /now HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",  # a body: not answered at once
                b"POST /now HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",  # a POST: neither
                b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n",  # this one is, on the same connection
            ):
                sock.sendall(raw)
                (answer,) = _answers(_receive_answers(sock, 1))
                assert answer.split(b" ", 2)[1] == b"200"
                methods.append(json.loads(answer.partition(b"\r\n\r\n")[2])["method"])
        assert methods == ["GET", "POST", "GET"]
        assert app.called == ["/now", "/now"]
    finally:
        server.stop(5)
