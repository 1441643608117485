"""What the stand-ins for Anthropic's APIs share: a loopback HTTP server on a thread, answers in Anthropic's shape."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackServer:
    """A threaded HTTP server on a free loopback port, serving in a background thread until `close()`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], backlog: int = 5) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.request_queue_size = backlog  # read by server_activate: the listen() backlog
        try:
            self.server.server_bind()
            self.server.server_activate()
        except BaseException:
            self.server.server_close()
            raise
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL, `http://127.0.0.1:<port>`."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()


class AnthropicHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log, JSON answers with a `request-id` header and errors in Anthropic's shape."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test's output is its assertions, not an access log

    def _json(self, status: int, document: Any, request_id: str, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self, status: int, kind: str, message: str, request_id: str, headers: dict[str, str] | None = None
    ) -> None:
        self._json(status, {"type": "error", "error": {"type": kind, "message": message}}, request_id, headers)
