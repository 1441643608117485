"""One production HTTP server for `serve` and `proxy`: uvicorn on its own event-loop thread, with the bounds it
lacks (a header timeout), the socket bound up front, drain on stop, and the small ASGI helpers both apps share.

An app is a plain ASGI 3 callable ``app(scope, receive, send)``. It may also have ``answer_now(method, target,
headers)``: the server asks it as a request's headers arrive, and writes what it returns at once, on the event loop,
without a request cycle (no task, no ASGI messages: less CPU per answer); None serves the request the
usual way. The daemon answers its throttle checks so. Never while an earlier request on the same connection is still
being answered, so answers keep their order. What the server guarantees, whatever the app does:

- listen backlog ``limits.backlog``; TCP_NODELAY on every accepted connection;
- a connection that has not sent a complete request line and headers within ``limits.header_timeout`` (counted
  from accept, and on a keep-alive connection from the first byte of the next request) is closed;
- an idle keep-alive connection is closed after ``limits.keepalive_timeout``;
- past ``limits.max_connections`` open connections (or requests in progress) a new request is answered 503 at
  once (uvicorn's own plain-text answer), never queued;
- malformed framing (a bad Content-Length or chunk size, a bad request line) is answered 400 by the parser and the
  connection closed (uvicorn's own plain-text answer);
- `stop()` stops accepting, closes idle connections, lets requests in progress finish (up to a timeout) and closes.

Apps enforce ``limits.max_body_bytes`` themselves (their 413 has each app's own shape): check the declared
Content-Length with `content_length()` before reading, then read with `read_body()`, which also counts a chunked
body as it arrives and can time out a body that stops arriving. Our own error answers use one JSON shape,
``{"error": "what happened, what to do"}`` — build them with `error_response()`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

T = TypeVar("T")
SWITCH_INTERVAL_S = 0.001  # longest a computing thread keeps the event loop waiting for the interpreter
# Young objects a server allocates before the collector walks them. Python's 700 collects hundreds of times a
# second under load; each walk is paid by the request in flight, and a walk of 50,000 takes 6-10 ms (measured with
# 1,000 admits/s: the longest pauses, and the admit p99 past 2 ms). 10,000 keeps each walk near a millisecond.
YOUNG_GC_THRESHOLD = 10_000
log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
# What an app may answer at once, on the event loop, from the request line and headers alone: (method, request
# target, headers as lower-case name and value bytes) -> the whole answer, or None to serve the request as usual.
AnswerNow = Callable[[bytes, bytes, list[tuple[bytes, bytes]]], "Response | None"]
Headers = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True)
class ServerLimits:
    """The bounds a server holds against any client; every one has a config key and a default."""

    backlog: int = 2048
    header_timeout: float = 10.0  # seconds to send a complete request line and headers
    keepalive_timeout: float = 30.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1000  # past it: 503 at once
    max_body_bytes: int = 16 * 1024 * 1024  # enforced by the app, with content_length() and read_body()


class BindError(Exception):
    """The listening socket could not be bound: "cannot listen on HOST:PORT: <strerror>"."""


class BodyTooLarge(Exception):
    """A request body went over its limit while being read (`received` is how much had arrived by then)."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(f"request body is over the limit of {limit:,} bytes (more than {received:,} sent)")
        self.limit = limit
        self.received = received


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


class BodyTimeout(Exception):
    """The client sent nothing more of its request body for `idle_timeout` seconds (answer 408 and close)."""


class BadLength(ValueError):
    """A Content-Length header that is not a non-negative integer (the parser normally refuses these first)."""


# --- ASGI helpers ----------------------------------------------------------------------------------------------


def header(scope: Scope, name: str) -> str | None:
    """The first value of a request header (name case-insensitive), or None."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope["headers"]:
        if key == wanted:
            return bytes(value).decode("latin-1")
    return None


def headers_of(scope: Scope) -> dict[str, str]:
    """Request headers as a dict with lower-case names (the first value of a repeated header wins)."""
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        out.setdefault(bytes(key).decode("latin-1").lower(), bytes(value).decode("latin-1"))
    return out


def content_length(scope: Scope) -> int | None:
    """The declared Content-Length, None when absent (chunked or no body); raises BadLength when malformed."""
    value = header(scope, "content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise BadLength(f"Content-Length {value[:40]!r} is not a byte count")
    return int(value)


async def read_body(receive: Receive, limit: int, idle_timeout: float | None = None) -> bytes:
    """The whole request body, counted as it arrives (chunked too); BodyTooLarge past `limit` bytes.

    Raises ClientDisconnected when the client leaves first, and BodyTimeout when `idle_timeout` seconds pass
    without any of the body arriving (a slow body would otherwise hold its connection for ever). After
    BodyTooLarge or BodyTimeout, answer with ``close=True``: the rest of the body is never read.
    """
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except TimeoutError:
            raise BodyTimeout(
                f"no more of the request body arrived for {idle_timeout:g} s ({len(body):,} bytes received)"
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client closed the connection before the body was complete")
        chunk = message.get("body", b"")
        if chunk:
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(limit, len(body))
        if not message.get("more_body", False):
            return bytes(body)


@dataclass(frozen=True)
class Response:
    """A complete response: status, body, content type, extra headers; ``close`` ends the connection after it."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: Mapping[str, str] | None = None
    close: bool = False

    def header_list(self) -> list[tuple[str, str]]:
        """Its headers as sent: the extra ones, the content type (none for 204 and 304), `connection: close`."""
        out = list((self.headers or {}).items())
        if self.content_type and self.status not in (204, 304):
            out.append(("content-type", self.content_type))
        if self.close:
            out.append(("connection", "close"))
        return out

    async def send(self, send: Send) -> None:
        """Write it out."""
        await send_response(send, self.status, self.body, self.header_list())


def json_response(
    status: int, document: Any, headers: Mapping[str, str] | None = None, *, close: bool = False
) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(document).encode() + b"\n", "application/json", headers, close)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, *, close: bool = False
) -> Response:
    """One of our own errors, in the one shape both servers use: ``{"error": message}``."""
    return json_response(status, {"error": message}, headers, close=close)


def _on_the_wire(status: int, body: bytes, headers: Headers) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and the header pairs a whole answer goes out with: lower-case names, Content-Length added, no body
    for 204 and 304."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]
    if status in (204, 304):
        body = b""
    elif not any(name == b"content-length" for name, _ in raw):
        raw.append((b"content-length", str(len(body)).encode()))
    return body, raw


async def send_response(send: Send, status: int, body: bytes, headers: Headers = ()) -> None:
    """Send status, headers and a whole body; Content-Length is added (no body for 204 and 304)."""
    body, raw = _on_the_wire(status, body, headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def encode_response(
    response: Response, default_headers: Iterable[tuple[bytes, bytes]], keep_alive: bool, head: bool
) -> bytes | None:
    """The bytes on the wire of `response`, exactly as `Response.send` through uvicorn writes them (the server's
    default headers first; `connection: close` when the connection ends; no body to a HEAD). None when a header
    value could not go on the wire (uvicorn refuses such a value too)."""
    body, pairs = _on_the_wire(response.status, response.body, response.header_list())
    out = [STATUS_LINE[response.status]]
    for name, value in (*default_headers, *pairs):
        if HEADER_VALUE_RE.search(value):
            return None
        out += (name, b": ", value, b"\r\n")
    if not keep_alive and not response.close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head:
        out.append(body)
    return b"".join(out)


# --- the server --------------------------------------------------------------------------------------------------


class _OneWrite:
    """A transport that sends a response's header block together with the body written right after it.

    uvicorn writes the headers and the body in two calls: two send() system calls and, with TCP_NODELAY, two
    packets the client must both receive. A header block is held until the next write (the body, written in the same
    turn of the event loop) or, failing that, the loop's next turn, so a whole small response leaves in one send.
    Everything else passes through.
    """

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport: Any = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write, or hold a response's header block for the write that follows it."""
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + bytes(data))
            return
        if isinstance(data, bytes) and data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def write_now(self, data: bytes) -> None:
        """Write a whole response at once (after anything held)."""
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def flush(self) -> None:
        """Send a held header block (its body never came in the same turn: a streamed or empty-bodied answer)."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        """Close after sending what is held."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is held and the connection."""
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header timeout and TCP_NODELAY.

    uvicorn arms only a keep-alive timer, after a response; a client that sends nothing, or half a request line,
    holds its connection forever. Here a timer runs from accept, and again from the first byte of each later
    request on a keep-alive connection, until the headers are complete.
    """

    header_timeout: float = 10.0
    answer_now: AnswerNow | None = None  # the app's, when it answers some requests from their headers at once

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_pending = True
        self._answered = False  # the request being parsed was answered at once: its body and end are not the app's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_OneWrite(transport, self.loop))  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body leave in separate writes: without it a body can wait ~40 ms for a delayed ACK.
            # uvloop sets it already; set here too so another event loop cannot lose it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels the keep-alive timer
        between_requests = self.cycle is None or self.cycle.response_complete
        if (
            self._header_timer is None
            and (self._headers_pending or between_requests)
            and not self.transport.is_closing()
        ):
            self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_pending = True

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        self._cancel_header_timer()
        if self.answer_now is not None and self._answer_at_once(self.answer_now):
            return
        super().on_headers_complete()

    def _answer_at_once(self, answer_now: AnswerNow) -> bool:
        """Answer the request whose headers just arrived without an ASGI request cycle (no task, no messages),
        when the app can from its headers alone (a throttle check: decided in memory). Never while an earlier
        request on the connection is still being answered (answers keep their order), for an upgrade, or past the
        connection limit (uvicorn's 503 stands)."""
        if (self.cycle is not None and not self.cycle.response_complete) or self.parser.should_upgrade():
            return False
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        method = self.parser.get_method()
        try:
            response = answer_now(method, self.url, self.headers)
        except Exception:
            log.exception("answering %r at once failed; serving it as usual", self.url[:200])
            return False
        if response is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive() and not response.close
        data = encode_response(response, self.server_state.default_headers, keep_alive, method == b"HEAD")
        if data is None:
            return False
        self._answered = True
        self.transport.write_now(data)  # type: ignore[attr-defined]  # the _OneWrite wrapper
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()  # counts it; arms the keep-alive timer
        return True

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            self._answered = False
            return
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing %s: no complete request headers within %.1f s", self.client, self.header_timeout)
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it is listening and whether the drain finished in time."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()
        self.drained = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()

    async def _wait_tasks_to_complete(self) -> None:
        try:
            await super()._wait_tasks_to_complete()
        except asyncio.CancelledError:  # the drain timeout ran out: requests still in progress get cancelled
            self.drained = False
            raise


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """An ASGI app served by uvicorn on a background thread with its own event loop.

    The socket is bound and listening when the constructor returns (port 0 picks a free port; `address` has the
    real one), so a port in use is a BindError before anything else starts. `start()` begins serving;
    `stop()` drains. Signals stay with the caller: uvicorn installs no handlers off the main thread.
    """

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        limits: ServerLimits,
        name: str,
        on_stop: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """`on_stop`, when given, runs on the server's event loop after the drain (to close what the app opened)."""
        self.limits = limits
        self.name = name
        self._on_stop = on_stop
        self._socket = _bind(host, port, limits.backlog)
        bound = self._socket.getsockname()
        self.address: tuple[str, int] = (str(bound[0]), int(bound[1]))
        answer_now = getattr(app, "answer_now", None)
        protocol = type(
            f"{name.title()}Protocol",
            (_BoundedProtocol,),
            {"header_timeout": limits.header_timeout, "answer_now": staticmethod(answer_now) if answer_now else None},
        )
        self._config = uvicorn.Config(
            app,
            http=protocol,
            interface="asgi3",
            ws="none",  # no WebSocket upgrades: neither app speaks it
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # X-Forwarded-* from a caller is not trusted
            server_header=False,
            headers=[("server", "claude-monitor")],
            # uvicorn counts the connection asking, so allowing N open connections takes a limit of N + 1.
            limit_concurrency=limits.max_connections + 1,
            backlog=limits.backlog,
            timeout_keep_alive=limits.keepalive_timeout,  # type: ignore[arg-type]  # a float works
        )
        self._server = _Server(self._config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve on a background thread; returns once the event loop is accepting."""
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-http", daemon=True)
        self._thread.start()
        while not self._server.listening.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"{self.name}: the HTTP server on {self.address[0]}:{self.address[1]} failed "
                    "to start (see the log above)"
                )

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                try:
                    runner.run(self._server.serve(sockets=[self._socket]))
                finally:
                    if self._on_stop is not None:
                        runner.run(self._on_stop())
        except BaseException:
            log.exception("%s: the HTTP server stopped on an error", self.name)

    def stop(self, drain_timeout: float = 30.0) -> bool:
        """Stop accepting, close idle connections, let requests in progress finish, close.

        True when every request finished within `drain_timeout` seconds; False when some were cut off.
        """
        if self._thread is None:
            self._socket.close()
            return True
        self._config.timeout_graceful_shutdown = drain_timeout  # type: ignore[assignment]  # read at shutdown
        self._server.should_exit = True
        self._thread.join(drain_timeout + 5)
        return self._server.drained and not self._thread.is_alive()


def settle_heap() -> None:
    """Call once a server has started: what start-up allocated (modules, the price table, budget state) leaves the
    garbage collector's reach, and young collections run less often; a busy thread hands the interpreter to the
    event loop within SWITCH_INTERVAL_S.

    A long-lived server otherwise stops every thread for 100–250 ms whenever a full collection walks that
    start-up heap — a pause every check and admit in flight waits out. Reference counting still frees almost
    everything at once; the collector is only for cycles. Likewise a thread that computes (an evaluation over
    100,000 scopes, a scrape) would keep the event loop waiting for the interpreter up to Python's default 5 ms
    each time the loop comes back from the network: every check and admit answered meanwhile pays it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, 20, 20)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def off_loop(pool: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    """Run blocking `work` (database, file or HTTP I/O) on `pool`, so the event loop keeps answering meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(pool, work)
