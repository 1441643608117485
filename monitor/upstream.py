"""The proxy's side of Anthropic's API: pooled upstream connections, and usage read from SSE as it passes."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any

from monitor.httppool import ConnectionPool

UPSTREAM_TIMEOUT = 600.0  # a long non-streaming answer can take minutes
_EOL = re.compile(rb"\r\n|\r|\n")
_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0}


class SseUsage:
    """Follows server-sent events as they pass: model and usage from message_start, the last message_delta's usage."""

    def __init__(self) -> None:
        self._pending = b""
        self._event: str | None = None
        self._data: list[bytes] = []
        self.model: str | None = None
        self.error_type: str | None = None
        self._start: dict[str, Any] | None = None
        self._delta: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream, cut anywhere."""
        data = self._pending + chunk
        position = 0
        for match in _EOL.finditer(data):
            if match.group() == b"\r" and match.end() == len(data):
                break  # maybe the first half of a CRLF: wait for the next chunk
            self._line(data[position : match.start()])
            position = match.end()
        self._pending = data[position:]

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"data":
            self._data.append(value)

    def _dispatch(self) -> None:
        event, data = self._event, self._data
        self._event, self._data = None, []
        if not data or event not in (None, "message_start", "message_delta", "error"):
            return  # content deltas are most of a stream: not parsed
        try:
            document = json.loads(b"\n".join(data))
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        kind = document.get("type")
        if kind == "message_start" and isinstance(message := document.get("message"), dict):
            model = message.get("model")
            self.model = model if isinstance(model, str) else None
            usage = message.get("usage")
            self._start = dict(usage) if isinstance(usage, dict) else {}
        elif kind == "message_delta" and isinstance(usage := document.get("usage"), dict):
            self._delta = usage
        elif kind == "error":
            error = document.get("error")
            found = error.get("type") if isinstance(error, dict) else None
            self.error_type = found if isinstance(found, str) else "api_error"

    @property
    def usage(self) -> dict[str, Any]:
        """message_start's usage overlaid by the non-null fields of the last message_delta's (cumulative counts)."""
        usage = dict(self._start or _ZERO_USAGE)
        usage.update({key: value for key, value in (self._delta or {}).items() if value is not None})
        return usage


class Upstream:
    """Keep-alive connections to Anthropic (or a stand-in), each carrying the proxy's own key."""

    def __init__(self, url: str, api_key: str, timeout: float = UPSTREAM_TIMEOUT) -> None:
        self._pool = ConnectionPool(url, timeout, max_idle=16)
        self._key = api_key

    def send(
        self, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST and read the status line and headers; OSError / HTTPException when Anthropic cannot be reached."""
        for attempt in range(2):
            connection, reused = self._pool.acquire()
            try:
                connection.putrequest("POST", self._pool.base_path + path, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.putheader("Accept-Encoding", "identity")
                connection.putheader("x-api-key", self._key)
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                return connection, connection.getresponse()
            except (ConnectionError, http.client.BadStatusLine):
                connection.close()
                if reused and attempt == 0:
                    continue  # an idle connection the other side had closed: the request never arrived
                raise
            except BaseException:
                connection.close()
                raise
        raise AssertionError("unreachable")

    def release(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep a connection whose response was read to its end; close any other."""
        self._pool.release(connection, response)

    def close(self) -> None:
        """Close the idle connections."""
        self._pool.close()
