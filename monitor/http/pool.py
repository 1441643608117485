"""Keep-alive HTTP connections to one host, one per concurrent request (an HTTPConnection is not thread-safe).

Standard library only: `monitor.http.client` imports it and must stay importable without the daemon's dependencies.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from urllib.parse import urlsplit


class ConnectionPool:
    """Idle connections to reuse, and new ones when none is idle."""

    def __init__(self, url: str, timeout: float, max_idle: int = 8) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://host:port or https://…, not {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self.base_path = parts.path.rstrip("/")
        self._timeout = timeout
        self._max_idle = max_idle
        self._context = ssl.create_default_context() if self._https else None
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []

    def acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it was reused (a reused one may have been closed by the other side)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._context
            ), False
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout), False

    def release(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep a connection whose response was read to its end and may be reused; close any other."""
        if response.will_close or not response.isclosed():
            connection.close()
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
