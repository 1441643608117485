"""Usage read from Anthropic's server-sent events as they pass through the proxy, cut anywhere."""

from __future__ import annotations

import json
import re
from typing import Any

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
