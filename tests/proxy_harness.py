"""The proxy under test: its config, a real `claude-monitor proxy` child process, and helpers to read what it did."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
from anthropic.types import MessageParam

from tests.fake_anthropic import FakeAnthropic
from tests.serve_harness import TOKEN, Serve

PROXY_KEY = "sk-ant-api03-the-proxy-side-secret-0123456789abcdef"
CLIENT_KEY = "sk-ant-api03-a-client-side-key-that-must-not-travel"
KEY_ENV = "TEST_PROXY_ANTHROPIC_KEY"
HAIKU = "claude-haiku-4-5-20251001"
ASK: list[MessageParam] = [{"role": "user", "content": "Ist der Satz richtig: 'Ich habe gegangen'?"}]

# The application's trusted backend: it may say which project, user and feature a call is for.
BACKEND_CLIENT = f"""\
    - name: app-backend
      key_sha256: "{hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}"
      identity: {{headers: {{X-App-User: user, X-App-Project: project, X-App-Feature: feature}}}}
"""


def proxy_config(
    directory: Path, upstream: str, monitor_url: str, clients: str = BACKEND_CLIENT, extra: str = ""
) -> Path:
    path = directory / "proxy.yaml"
    path.write_text(
        f"""\
throttle: {{snapshot_file: throttle.json}}
proxy:
  listen: "127.0.0.1:0"
  upstream: "{upstream}"
  api_key_env: {KEY_ENV}
  monitor_url: "{monitor_url}"
  fail_mode: open
{extra}  clients:
{clients}""",
        encoding="utf-8",
    )
    return path


class ProxyProcess:
    """`python -m monitor proxy --config PATH -v` as a child process, its log in a file."""

    def __init__(self, config: Path, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_MONITOR_", "ANTHROPIC_"))}
        full_env.update({KEY_ENV: PROXY_KEY, "CLAUDE_MONITOR_INGEST_TOKEN": TOKEN, **(env or {})})
        self.log = cwd / "proxy.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "proxy", "--config", str(config), "-v"],
            cwd=cwd,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not (found := re.search(r"listening on (http://[\d.]+:(\d+))", self.output())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"proxy did not start:\n{self.output()}")
            time.sleep(0.05)
        self.url, self.port = found.group(1), int(found.group(2))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self._log_file.close()
        return self.proc.returncode


@dataclass
class Stack:
    fake: FakeAnthropic
    serve: Serve
    proxy: ProxyProcess
    directory: Path

    def sdk(self, user: str, project: str = "lingo", **options: Any) -> anthropic.Anthropic:
        """The real SDK, pointed at the proxy, with a key of its own and the app's identity headers."""
        return sdk(self.proxy.url, user, project, **options)

    def row(self, request_id: str) -> dict[str, Any] | None:
        return stored_row(self.directory, request_id)


def sdk(url: str, user: str, project: str = "lingo", **options: Any) -> anthropic.Anthropic:
    headers = {"X-App-User": user, "X-App-Project": project, "X-App-Feature": "grammar-check"}
    return anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, default_headers=headers, **options)


def stored_row(directory: Path, request_id: str) -> dict[str, Any] | None:
    database = sqlite3.connect(directory / "monitor.db")
    database.row_factory = sqlite3.Row
    try:
        row = database.execute("SELECT * FROM events WHERE request_id = ?", (request_id,)).fetchone()
    finally:
        database.close()
    return None if row is None else dict(row)


def tokens(row: Mapping[str, Any]) -> tuple[int, ...]:
    names = ("input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens")
    return (*(row[name] for name in names), row["web_search_requests"])


def read_until(response: http.client.HTTPResponse, marker: bytes) -> bytes:
    """What a streamed answer sent up to and including `marker`; fails if the stream ends first."""
    received = b""
    while marker not in received:
        chunk = response.read1(65536)
        assert chunk, f"the stream ended before {marker!r}: {received!r}"
        received += chunk
    return received


def within(seconds: float, call: Callable[[], object]) -> object:
    """What `call` returned or raised, failing the test if it takes longer than `seconds`."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"the call did not return within {seconds} s"
    return outcome[0]
