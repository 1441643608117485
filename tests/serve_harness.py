"""A real `claude-monitor serve` process on a free loopback port, and a tiny HTTP client for tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN = "test-ingest-token"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> Response:
    """One HTTP request; any status comes back as a Response (no exception for 4xx/5xx)."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


class Serve:
    """`python -m monitor serve --config PATH` as a child process."""

    def __init__(self, config: Path, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
        full_env["CLAUDE_MONITOR_INGEST_TOKEN"] = TOKEN
        full_env.update(env or {})
        self.log = cwd / "serve.log"
        self._log_file = self.log.open("ab")
        self._log_start = self._log_file.tell()  # a restart appends: look only at this process's lines
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "serve", "--config", str(config)],
            cwd=cwd,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self.url = self._wait_for_address()
            self.wait_ready()
        except BaseException:
            self.proc.kill()  # never leave a daemon behind a failed start
            self.proc.wait()
            self._log_file.close()
            raise

    def _wait_for_address(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"serving on (http://[\d.]+:\d+)", self.output())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"serve did not start:\n{self.log.read_text()}")

    def output(self) -> str:
        """What this process has logged so far."""
        with self.log.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if request(self.url + "/readyz").status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"serve never became ready: {request(self.url + '/readyz').body!r}")

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return request(self.url + path, headers=headers)

    def post_usage(
        self,
        body: bytes | str | list[Any] | dict[str, Any],
        token: str | None = TOKEN,
        content_type: str = "application/json",
    ) -> Response:
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return request(self.url + "/v1/usage", "POST", data, headers)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Parsed /metrics: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(self.get("/metrics").body.decode()):
            for sample in family.samples:
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self._log_file.close()
        return self.proc.returncode


def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll an observable condition (a tailer's effect); fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")


def sum_metric(metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails on timeout."""
    sock.settimeout(timeout)
    started = time.monotonic()
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"server kept the connection open for {timeout} s; got {received[:200]!r}") from None
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started
