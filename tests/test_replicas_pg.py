"""Three `serve` replicas on one PostgreSQL: overlapping POSTs and tailed files into all three at once are stored
once and priced exactly; one replica leads; a budget's notice goes out once; SIGKILL the leader and another takes
over within seconds, runs the leader's jobs, and sends no notice twice."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.serve_harness import Serve, sum_metric, wait_until
from tests.test_postgres import pg_config, scalar

# Starts PostgreSQL and `serve` replicas: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

REPLICAS = 3
EVENTS = 600  # every third a Sonnet call, the rest Haiku
# By hand, from the published rates per million tokens: Sonnet 4.5 $3 in / $15 out, Haiku 4.5 $1 in / $5 out.
SONNET_USD = Decimal(1000 * 3 + 200 * 15) / 1_000_000  # $0.006
HAIKU_USD = Decimal(1000 * 1 + 200 * 5) / 1_000_000  # $0.002
FIRST_USD = Decimal("2.00")  # 200 × $0.006 + 400 × $0.002
LATER = 100  # Sonnet calls sent after the failover
LATER_USD = Decimal("0.60")  # 100 × $0.006
LIMIT_USD = Decimal("3.00")  # $2.00 crosses 0.5 only; $2.60 crosses 0.8
FAILOVER_S = 10

CONFIG = """\
timezone: UTC
http: {{listen: "127.0.0.1:0"}}
sources: [{{type: jsonl, path: "usage/*.jsonl", name: app-logs}}]
throttle: {{snapshot_file: throttle.json}}
schedule: {{evaluate_every: 1s}}
alerts:
  webhooks: [{{url: "{hook}", kind: generic}}]
budgets:
  - name: lingo-hourly
    match: {{project: lingo}}
    window: rolling:1h
    limit_usd: 3.00
    alert_at: [0.5, 0.8]
"""


class Receiver:
    """A webhook receiver on a real loopback port: keeps every notice POSTed to it, with when it came."""

    def __init__(self) -> None:
        self.notices: list[tuple[float, dict[str, Any]]] = []
        lock = threading.Lock()
        notices = self.notices

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    notices.append((time.time(), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def thresholds(self) -> list[tuple[str, str, float]]:
        return sorted((n["status"], n["kind"], n["threshold"]) for _, n in self.notices)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def event(n: int, now: datetime) -> dict[str, Any]:
    """The n-th call: a Sonnet call when n is a multiple of 3, else Haiku; 1,000 tokens in, 200 out."""
    return {
        "request_id": f"req-{n:05d}",
        "timestamp": (now - timedelta(seconds=n % 120)).isoformat(),
        "model": "claude-sonnet-4-5" if n % 3 == 0 else "claude-haiku-4-5",
        "usage": {"input_tokens": 1000, "output_tokens": 200},
        "attributes": {"project": "lingo", "environment": "prod"},
    }


def leaders(replicas: list[Serve]) -> list[float]:
    return [sum_metric(r.metrics(), "claude_monitor_leader") for r in replicas]


def last_success(replica: Serve, task: str) -> float:
    return sum_metric(replica.metrics(), "claude_monitor_job_last_success_timestamp_seconds", task=task)


def feed(replica: Serve, directory: Path, posted: list[dict[str, Any]], tailed: list[dict[str, Any]]) -> list[str]:
    """POST `posted` in batches while appending `tailed` to two JSONL files the replica tails; the errors."""
    errors: list[str] = []

    def post() -> None:
        for start in range(0, len(posted), 40):
            answer = replica.post_usage(posted[start : start + 40])
            if answer.status != 202:
                errors.append(f"{answer.status} {answer.body[:200]!r}")

    def tail() -> None:
        for start in range(0, len(tailed), 25):
            name = directory / "usage" / f"app-{start // 25 % 2}.jsonl"
            with name.open("a", encoding="utf-8") as file:
                file.write("".join(json.dumps(doc) + "\n" for doc in tailed[start : start + 25]))

    threads = [threading.Thread(target=post), threading.Thread(target=tail)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def report(config: Path, cwd: Path, since: datetime) -> dict[str, Any]:
    command = ["report", "--config", str(config), "--since", since.isoformat(), "--format", "json"]
    done = subprocess.run(
        [sys.executable, "-m", "monitor", *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def settle(replicas: list[Serve], requests: int, usd: Decimal) -> None:
    """Wait until every replica's counters show `requests` calls and `usd` dollars."""

    def done() -> bool:
        for replica in replicas:
            scraped = replica.metrics()
            if sum_metric(scraped, "claude_requests_total") != requests:
                return False
            if round(Decimal(str(sum_metric(scraped, "claude_cost_usd_total"))), 9) != usd:
                return False
        return True

    wait_until(done, timeout=60, interval=0.2)


def test_three_replicas_count_once_lead_once_notify_once_and_fail_over(
    pg_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    configs = []
    for i in range(REPLICAS):
        (tmp_path / f"r{i}" / "usage").mkdir(parents=True)
        configs.append(pg_config(tmp_path / f"r{i}", pg_url, CONFIG.format(hook=receiver.url)))
    replicas: list[Serve] = []
    try:
        for i in range(REPLICAS):  # one after the other: the first migrates the empty database
            replicas.append(Serve(configs[i], tmp_path / f"r{i}"))
        since = datetime.now(UTC) - timedelta(hours=1)
        now = datetime.now(UTC)
        docs = [event(n, now) for n in range(EVENTS)]
        assert sum((SONNET_USD if n % 3 == 0 else HAIKU_USD for n in range(EVENTS)), Decimal(0)) == FIRST_USD
        rng = random.Random(11)
        plans = []
        for i in range(REPLICAS):
            # Each replica tails two thirds of the calls and is POSTed half of them: every call reaches two or more
            # replicas, many by both paths, in an order of their own.
            tailed = [d for n, d in enumerate(docs) if (n + i) % 3 != 0]
            posted = [d for n, d in enumerate(docs) if (n + i) % 2 == 0]
            rng.shuffle(tailed)
            rng.shuffle(posted)
            plans.append((posted, tailed))
        errors: list[list[str]] = [[] for _ in range(REPLICAS)]
        threads = [
            threading.Thread(
                target=lambda i=i: errors[i].extend(feed(replicas[i], tmp_path / f"r{i}", *plans[i])),
            )
            for i in range(REPLICAS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert errors == [[]] * REPLICAS

        # Totals exact, in every replica's counters and in `report`; each request_id stored once.
        settle(replicas, EVENTS, FIRST_USD)
        reported = report(configs[0], tmp_path / "r0", since)
        assert Decimal(reported["total_usd"]) == FIRST_USD
        assert sum(row["requests"] for row in reported["rows"]) == EVENTS
        assert scalar(pg_url, "SELECT count(*) FROM events") == EVENTS
        assert scalar(pg_url, "SELECT count(DISTINCT request_id) FROM events") == EVENTS

        # Exactly one leader, and it is the one session holding the advisory lock.
        wait_until(lambda: sorted(leaders(replicas)) == [0.0, 0.0, 1.0], timeout=10)
        assert scalar(pg_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == 1

        # $2.00 of $3.00 crosses alert_at 0.5: one notice, though three replicas evaluate it.
        wait_until(lambda: receiver.notices, timeout=30, interval=0.1)
        first_at = receiver.notices[0][0]
        # Every replica's delivery job has run since: a replica that would send it again has had its chance.
        wait_until(lambda: all(last_success(r, "deliver") > first_at for r in replicas), timeout=30, interval=0.2)
        assert receiver.thresholds() == [("firing", "threshold", 0.5)]

        # SIGKILL the leader: another replica leads within FAILOVER_S.
        (old,) = (r for r, lead in zip(replicas, leaders(replicas), strict=True) if lead == 1.0)
        survivors = [r for r in replicas if r is not old]
        killed_at = time.monotonic()
        old.stop(signal.SIGKILL)
        wait_until(lambda: 1.0 in leaders(survivors), timeout=FAILOVER_S, interval=0.02)
        failover = time.monotonic() - killed_at
        print(f"\nfailover: a new leader's gauge read 1 {failover:.2f} s after the SIGKILL")
        assert sorted(leaders(survivors)) == [0.0, 1.0]
        (new,) = (r for r, lead in zip(survivors, leaders(survivors), strict=True) if lead == 1.0)

        # Its jobs run: its delivery job succeeds again, and a new crossing (0.8, after $0.60 more) is sent by it.
        took_over = time.time()
        wait_until(lambda: last_success(new, "deliver") > took_over, timeout=15, interval=0.2)
        later = [event(EVENTS + n * 3, datetime.now(UTC)) for n in range(LATER)]  # multiples of 3: Sonnet
        assert LATER * SONNET_USD == LATER_USD
        halves = [later[: LATER // 2 + 10], later[LATER // 2 - 10 :]]  # overlapping, one per survivor
        for survivor, half in zip(survivors, halves, strict=True):
            assert survivor.post_usage(half).status == 202
        settle(survivors, EVENTS + LATER, FIRST_USD + LATER_USD)
        # 0.8 supersedes 0.5: its firing message and 0.5's resolved one, each once; 0.5's firing is not sent again.
        wait_until(lambda: len(receiver.notices) >= 3, timeout=30, interval=0.1)
        last_at = max(at for at, _ in receiver.notices)
        wait_until(lambda: all(last_success(r, "deliver") > last_at for r in survivors), timeout=30, interval=0.2)
        assert receiver.thresholds() == [
            ("firing", "threshold", 0.5),
            ("firing", "threshold", 0.8),
            ("resolved", "threshold", 0.5),
        ]
        assert Decimal(report(configs[1], tmp_path / "r1", since)["total_usd"]) == FIRST_USD + LATER_USD
        assert scalar(pg_url, "SELECT count(DISTINCT request_id) FROM events") == EVENTS + LATER
        assert scalar(pg_url, "SELECT count(*) FROM events") == EVENTS + LATER
        assert failover < FAILOVER_S
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)
