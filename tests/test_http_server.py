"""The shared server layer on its own: a real HttpServer on a loopback port — drain, bind errors, body limits."""

from __future__ import annotations

import asyncio
import http.client
import json
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
    Scope,
    Send,
    ServerLimits,
    _OneWrite,
    error_response,
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
