"""The reference proxy in this process, in front of a fake Anthropic and the daemon (also in this process).

The fast lane's proxy test: no subprocess. The daemon is `Daemon` with `http.ingest_process: false`; the proxy is
`Proxy` as `claude-monitor proxy` builds it; both listen on loopback ports. The proxy stamps events with the real
time, so the daemon's clock starts at the real time too (and is not moved).
"""

from __future__ import annotations

import gc
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import pytest

from monitor.client import MonitorClient
from monitor.config import load_settings
from monitor.http.proxy import Proxy, proxy_settings
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_harness import ASK, KEY_ENV, PROXY_KEY, proxy_config, sdk
from tests.serve_harness import TOKEN

# Haiku: $1/M input, $1.25/M 5-minute cache writes, $2/M 1-hour cache writes, $0.10/M cache reads, $5/M output.
# The fake bills 100 input, 100 + 200 cache-write, 400 cache-read tokens and max_tokens as output, so a call of
# max_tokens 50 costs $0.0001 + $0.000125 + $0.0004 + $0.00004 + $0.00025 = $0.000915: over the $0.0005 day. The
# proxy admits it first: its worst case (input bounded by the bytes of the request, plus 50 x $5/M) is less.
DAEMON_CONFIG = """\
http: {listen: "127.0.0.1:0", ingest_process: false}
schedule: {evaluate_every: 1h}
sources: []
budgets:
  - {name: lingo-day, match: {project: lingo}, window: day, limit_usd: 0.0005, throttle_at: 1.0}
"""


class Stack:
    """The fake upstream, the in-process daemon and the in-process proxy."""

    def __init__(self, fake: FakeAnthropic, daemon: Daemon, proxy: Proxy, database: Path) -> None:
        self.fake = fake
        self.daemon = daemon
        self.proxy = proxy
        self.database = database
        self.url = "http://{}:{}".format(*proxy.address)

    def row(self, request_id: str) -> tuple[int, int, str] | None:
        """(status, cost_pico, attributes) of a stored event."""
        with sqlite3.connect(self.database) as connection:
            found = connection.execute(
                "SELECT status, cost_pico, attributes FROM events WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if found is None else (int(found[0]), int(found[1]), str(found[2]))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    fake = FakeAnthropic(PROXY_KEY)
    daemon_dir = tmp_path / "daemon"
    daemon_dir.mkdir()
    config = write_config(daemon_dir, DAEMON_CONFIG + f"throttle: {{snapshot_file: {daemon_dir / 't.json'}}}\n")
    clock = FakeClock(datetime.now(UTC))
    daemon = Daemon(load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    daemon.start()
    proxy = None
    try:
        url = "http://{}:{}".format(*daemon.address)
        loaded = load_settings(proxy_config(tmp_path, fake.url, url), environ={})
        settings = proxy_settings(loaded, {KEY_ENV: PROXY_KEY})
        monitor = MonitorClient(url, token=TOKEN, background=False)
        proxy = Proxy(settings, monitor, daemon.store.prices)
        proxy.start()
        yield Stack(fake, daemon, proxy, daemon_dir / "monitor.db")
    finally:
        if proxy is not None:
            proxy.stop(timeout=5)
        daemon.stop()
        fake.close()
        gc.unfreeze()  # Daemon.start froze what it had built; let this test's daemon be collected


def test_a_call_passes_through_is_recorded_and_the_next_is_refused_without_reaching_anthropic(stack: Stack) -> None:
    client = sdk(stack.url, "u-1", max_retries=0)
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=ASK)
    assert message.content[0].type == "text"
    request_id = message._request_id
    assert request_id is not None
    seen = stack.fake.seen("/v1/messages")
    assert len(seen) == 1 and seen[0].headers["x-api-key"] == PROXY_KEY  # the proxy's key, not the client's
    row = stack.row(request_id)  # recorded before the answer came back
    assert row is not None and row[:2] == (200, 915_000_000)
    assert json.loads(row[2]) == {"user": "u-1", "project": "lingo", "feature": "grammar-check"}

    # Its $0.000915 crossed the $0.0005 day: the next call of the project is refused at the proxy.
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=ASK)
    assert refused.value.status_code == 429
    assert "lingo-day" in str(refused.value)
    assert len(stack.fake.seen("/v1/messages")) == 1  # Anthropic was not called again
