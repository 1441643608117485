"""A local stand-in for api.anthropic.com speaking its wire format: Messages (JSON and SSE), count_tokens, errors.

The only fake in the tests (Anthropic's servers cannot run here). It checks `x-api-key`, answers with a
`request-id` header, bills `max_tokens` output tokens plus fixed cache usage, and keeps every request it saw and
the raw bytes of every stream it sent, so a test can compare what came through the proxy.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from anthropic.types import message_count_tokens_params
from anthropic.types.beta import message_count_tokens_params as beta_count_tokens_params

from tests.fake_server import AnthropicHandler, LoopbackServer

INPUT_TOKENS = 100
CACHE_5M, CACHE_1H, CACHE_READ = 100, 200, 400
COUNT_TOKENS_ANSWER = 17
STREAM_TEXT = ["Der Satz ", "ist richtig."]
HELD_AFTER = 3  # events sent before a held stream waits for `hold`
# The body fields count_tokens takes, as the SDK types them; like the API, the fake refuses others (max_tokens...).
COUNT_TOKENS_FIELDS = (
    set(message_count_tokens_params.MessageCountTokensParams.__annotations__)
    | set(beta_count_tokens_params.MessageCountTokensParams.__annotations__)
) - {"betas"}  # a header, not a body field


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Failure:
    """The next answer: an error status with Anthropic's error body."""

    status: int
    error_type: str = "api_error"


def usage(output_tokens: int) -> dict[str, Any]:
    """The usage object of a complete answer."""
    return {
        "input_tokens": INPUT_TOKENS,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": CACHE_5M + CACHE_1H,
        "cache_read_input_tokens": CACHE_READ,
        "cache_creation": {"ephemeral_5m_input_tokens": CACHE_5M, "ephemeral_1h_input_tokens": CACHE_1H},
        "server_tool_use": None,
        "service_tier": "standard",
    }


def stream_events(model: str, message_id: str, output_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """The events of a streamed answer, in Anthropic's order."""
    return [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage(1),
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        *[
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            )
            for t in STREAM_TEXT
        ],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "input_tokens": INPUT_TOKENS,
                    "cache_creation_input_tokens": CACHE_5M + CACHE_1H,
                    "cache_read_input_tokens": CACHE_READ,
                    "output_tokens": output_tokens,
                    "server_tool_use": {"web_search_requests": 1},
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


class FakeAnthropic(LoopbackServer):
    """The server, on a free loopback port, in a background thread."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Seen] = []
        self.streams: dict[str, bytes] = {}  # request-id -> the raw SSE bytes sent
        self.cut: list[str] = []  # request-ids of streams whose reader went away before the end
        self.hold: threading.Event | None = None  # when set to an Event, streams pause until it is set
        self.dropping = False  # when True, every request's connection is closed without an answer
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._count = 0
        self.hold_timeout = 10.0  # how long a held stream waits for `hold` at most
        self.waiting: dict[str, threading.Event] = {}  # request-id -> its own hold, for each held stream
        self.output_tokens: int | None = None  # when set, every answer bills this many output tokens, not max_tokens
        self.count_answer = COUNT_TOKENS_ANSWER  # what count_tokens says
        self.count_hold: threading.Event | None = None  # when set to an Event, count_tokens answers once it is set
        self.count_padding = 0  # bytes of padding count_tokens' answer carries besides its count (Content-Length set)
        self.count_endless = False  # when True, count_tokens answers a chunked body that never ends
        super().__init__(_handler(self), backlog=1024)  # hundreds of the proxy's connections may arrive at once

    def fail_next(self, status: int, error_type: str = "api_error") -> None:
        """Answer the next request with this error."""
        with self._lock:
            self._failures.append(Failure(status, error_type))

    def finish(self, request_id: str) -> None:
        """Let one held stream go on to its end (the others stay held)."""
        with self._lock:
            self.waiting[request_id].set()

    def held(self) -> list[str]:
        """Request ids of the streams waiting at the hold now, in arrival order."""
        with self._lock:
            return [rid for rid, own in self.waiting.items() if not own.is_set()]

    def billed(self, request: dict[str, Any]) -> int:
        return self.output_tokens if self.output_tokens is not None else int(request["max_tokens"])

    def seen(self, path: str) -> list[Seen]:
        """The requests that arrived for `path` (query string ignored)."""
        with self._lock:
            return [seen for seen in self.requests if seen.path.partition("?")[0] == path]

    def _arrived(self, seen: Seen) -> tuple[str, Failure | None]:
        with self._lock:
            self.requests.append(seen)
            self._count += 1
            failure = (
                self._failures.pop(0) if self._failures and seen.headers.get("x-api-key") == self.api_key else None
            )
            return f"req_fake_{self._count:04d}", failure

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        super().close()


def _handler(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(AnthropicHandler):
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {name.lower(): value for name, value in self.headers.items()}
            request_id, failure = fake._arrived(Seen("POST", self.path, headers, body))
            if headers.get("x-api-key") != fake.api_key:
                self._error(401, "authentication_error", "invalid x-api-key", request_id)
                return
            if fake.dropping:
                self.close_connection = True  # the connection ends without an answer
                return
            if failure is not None:
                self._error(failure.status, failure.error_type, "Internal server error", request_id)
                return
            path = self.path.partition("?")[0]
            request = json.loads(body)
            if path == "/v1/messages/count_tokens":
                extra = sorted(set(request) - COUNT_TOKENS_FIELDS)
                if extra:
                    self._error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted", request_id)
                    return
                if fake.count_hold is not None:
                    fake.count_hold.wait(fake.hold_timeout)
                if fake.count_endless:
                    self._endless(request_id)
                    return
                padding = {"padding": "x" * fake.count_padding} if fake.count_padding else {}
                self._json(200, {"input_tokens": fake.count_answer, **padding}, request_id)
            elif path == "/v1/messages" and request.get("stream"):
                self._stream(request, request_id)
            elif path == "/v1/messages":
                self._json(200, self._message(request, request_id), request_id)
            else:
                self._error(404, "not_found_error", f"{path} not found", request_id)

        def _endless(self, request_id: str) -> None:
            """A 200 whose chunked JSON body goes on until the reader leaves (at most 1 GiB, should it never)."""
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("request-id", request_id)
            self.end_headers()
            chunk = b'{"input_tokens": 17, "padding": "' + b"x" * 65_536
            try:
                for _ in range(16_384):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    chunk = b"x" * 65_536
            except OSError:  # the reader closed the connection
                pass
            self.close_connection = True

        def _message(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
            return {
                "id": "msg_" + request_id,
                "type": "message",
                "role": "assistant",
                "model": request["model"],
                "content": [{"type": "text", "text": "".join(STREAM_TEXT)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": usage(fake.billed(request)),
            }

        def _stream(self, request: dict[str, Any], request_id: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("request-id", request_id)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            hold = fake.hold
            own = threading.Event()
            sent = b""
            for number, (name, data) in enumerate(
                stream_events(request["model"], "msg_" + request_id, fake.billed(request))
            ):
                if number == HELD_AFTER and hold is not None:
                    with fake._lock:
                        fake.waiting[request_id] = own
                    deadline = time.monotonic() + fake.hold_timeout
                    while not (hold.is_set() or own.wait(0.02)) and time.monotonic() < deadline:
                        pass
                    own.set()
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                try:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                except OSError:  # the reader closed the stream: Anthropic would stop generating
                    with fake._lock:
                        fake.cut.append(request_id)
                    self.close_connection = True
                    return
                sent += chunk
            with fake._lock:  # before the last chunk, so a reader that saw the end finds it
                fake.streams[request_id] = sent
            self.wfile.write(b"0\r\n\r\n")

        def do_GET(self) -> None:
            request_id, _failure = fake._arrived(Seen("GET", self.path, dict(self.headers.items()), b""))
            self._error(404, "not_found_error", f"{self.path} not found", request_id)

    return Handler
