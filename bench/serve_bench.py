"""Benchmark: /v1/check latency under a fixed request rate, time to throttle, and budget evaluation against history.

Three parts, each next to a baseline measured in the same run (all traffic on 127.0.0.1):

1. `--check`: GET /v1/check at a fixed rate (default 500 req/s for 20 s) from a separate load process: keep-alive
   `http.client` connections, open loop (request i is due at start + i/rate whatever happened before it; its
   latency runs from that due time, so a stall is not hidden by the requests it delays). Against a real `serve`
   (a few hundred budgets, a per-user daily one among them, some flags active), and first against the floor: a
   stdlib ThreadingHTTPServer (HTTP/1.1 keep-alive) answering 204 to everything. Each server and each load run is
   a fresh process.
2. `--throttle`: with `evaluate_every: 60s`, how long from the event that crosses a per-user budget to the first
   429 on /v1/check: POSTed to /v1/usage, and appended to a tailed JSONL file. Next to the promise that a hard
   limit bites within 1 s.
3. `--evaluation`: BudgetEngine.evaluate() with 1,000 budgets (one `per: user` daily budget over 100,000 users)
   after the current window's 1,000,000 events went through the real write path, then again after 9,000,000
   history events (60-90 days old, older than every window) were added straight into `events`.

No part given: all three. `--scale 0.1` shrinks event, user, request and repeat counts and the load duration
tenfold for a quick run (the request rate and the number of budgets stay). Usage:

    .venv/bin/python bench/serve_bench.py [--check] [--throttle] [--evaluation] [--scale 1] [--workdir .bench]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# The load process: one thread per keep-alive connection, each with its share of a fixed schedule (request i is
# due at start + i/rate and goes out on connection i % connections), latency measured from the due time.
LOAD = r"""
import http.client, json, sys, threading, time
host, port, rate, duration, connections, paths_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
with open(paths_file, encoding="utf-8") as f:
    paths = f.read().split()
total = int(rate * duration)
results = [None] * total  # [seconds from due time to the whole answer read, status or error name]
conns = [http.client.HTTPConnection(host, port, timeout=5) for _ in range(connections)]
for conn in conns:  # connect and warm up outside the measurement
    conn.request("GET", paths[0])
    conn.getresponse().read()
start = time.perf_counter() + 0.2
deadline = start + duration + max(10.0, duration)  # bounded in time as well as in count

def worker(k):
    conn = conns[k]
    for i in range(k, total, connections):
        due = start + i / rate
        now = time.perf_counter()
        if now >= deadline:
            return
        if due > now:
            time.sleep(due - now)
        try:
            conn.request("GET", paths[i % len(paths)])
            resp = conn.getresponse()
            resp.read()
            results[i] = [time.perf_counter() - due, resp.status]
        except (OSError, http.client.HTTPException) as exc:
            results[i] = [time.perf_counter() - due, type(exc).__name__]
            conn.close()  # the next request reconnects

threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"rate": rate, "results": results}))
"""

# The floor: the least a Python HTTP/1.1 server can do per request on this machine.
FLOOR = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

server = Server(("127.0.0.1", 0), Handler)
print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""

MODELS = (("claude-haiku-4-5", 0.75), ("claude-sonnet-4-5", 0.93), ("claude-opus-4-5", 0.96), ("claude-3-5-haiku", 1))
PROJECTS = 100
API_KEYS = 200
FEATURES = 20
CHECK_BUDGETS = 300
EVAL_BUDGETS = 1000
# Part 3 runs at a fixed instant: its windows do not move during the run, whatever the wall clock says.
EVAL_NOW = datetime(2026, 11, 24, 18, 0, tzinfo=UTC)
HISTORY_DAYS = (60, 90)
TAIL_POLL_S = 0.2  # monitor.service.TAIL_INTERVAL_S: the fallback poll; file events wake the tailer sooner
TAIL_GOAL_S = 0.02  # a tailed line flagged within 20 ms, woken by its file event
PROMISE_S = 1.0  # the promise: a hard limit bites within 1 s of the crossing event being accepted


# --- traffic and budgets ------------------------------------------------------------------------------------------


def project_of(rank: int) -> str:
    """A user's project (a user belongs to one)."""
    return f"proj-{rank % PROJECTS:03d}"


def api_key_of(rank: int) -> str:
    """A user's API key."""
    return f"key-{rank * 7 % API_KEYS:03d}"


def budget_list(count: int) -> list[dict[str, Any]]:
    """`count` budgets: one per-user daily, then per-project, per-API-key, per-feature, per-model and
    per-project-and-feature budgets taken in turn, over day/week/month/rolling windows, in USD, tokens or requests."""
    families: list[list[dict[str, Any]]] = [
        [
            {"name": f"project-{p:03d}-{window.replace(':', '-')}", "match": {"project": f"proj-{p:03d}"},
             "window": window, "limit_usd": limit, "alert_at": ["0.5", "0.8"], "throttle_at": "1.0"}
            for p in range(PROJECTS)
            for window, limit in (("day", "100"), ("month", "2000"), ("rolling:1h", "10"), ("rolling:24h", "120"))
        ],
        [
            {"name": f"api-key-{k:03d}-month", "match": {"api_key": f"key-{k:03d}"}, "window": "month",
             "limit_usd": "1000", "alert_at": ["0.8", "1.0"]}
            for k in range(API_KEYS)
        ],
        [
            {"name": f"feature-{f:02d}-{name}", "match": {"feature": f"feature-{f:02d}"}, "window": window, **limit,
             "alert_at": ["0.9"], "throttle_at": "1.0"}
            for name, window, limit in (
                ("day-output", "day", {"limit_tokens": {"output": 200_000_000}}),
                ("week-requests", "week", {"limit_requests": 5_000_000}),
                ("30m-input", "rolling:30m", {"limit_tokens": {"input": 50_000_000}}),
            )
            for f in range(FEATURES)
        ],
        [
            {"name": f"{model}-{name}", "match": {"model": model}, "window": window, **limit, "throttle_at": "1.0"}
            for name, window, limit in (
                ("day-tokens", "day", {"limit_tokens": {"total": 10_000_000_000}}),
                ("month-usd", "month", {"limit_usd": "1000000"}),
                ("1h-output", "rolling:1h", {"limit_tokens": {"output": 1_000_000_000}}),
            )
            for model, _ in MODELS
        ],
        [
            {"name": f"project-{p:03d}-feature-{f:02d}-7d", "match": {"project": f"proj-{p:03d}",
             "feature": f"feature-{f:02d}"}, "window": "rolling:7d", "limit_requests": 20_000, "throttle_at": "1.0"}
            for f in range(FEATURES)
            for p in range(PROJECTS)
        ],
    ]  # fmt: skip
    out: list[dict[str, Any]] = [
        {"name": "per-user-daily", "per": "user", "window": "day", "limit_usd": "0.50", "alert_at": ["0.8"],
         "throttle_at": "1.0"}
    ]  # fmt: skip
    turn = 0
    while len(out) < count and any(families):
        family = families[turn % len(families)]
        if family:
            out.append(family.pop(0))
        turn += 1
    return out


def write_config(path: Path, database: Path, budgets: int, evaluate_every: str, sources: bool) -> Path:
    """A claude-monitor.yaml for the benchmark."""
    config: dict[str, Any] = {
        "database_url": f"sqlite:///{database}",
        "http": {"listen": "127.0.0.1:0"},
        "sources": [{"type": "jsonl", "path": "usage/*.jsonl", "name": "bench"}] if sources else [],
        "throttle": {"snapshot_file": "throttle.json"},
        "schedule": {"evaluate_every": evaluate_every},
        "budgets": budget_list(budgets),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def event(rng: random.Random, request_id: str, timestamp: str, users: int) -> dict[str, Any]:
    """One usage event: a fifth of the traffic from the heaviest 1% of users, the rest spread over all of them."""
    r = rng.random
    rank = int(r() * max(1, users // 100)) if r() < 0.2 else int(r() * users)
    u = r()
    model = next(name for name, bound in MODELS if u < bound)
    cached = r() < 0.7
    return {
        "request_id": request_id,
        "timestamp": timestamp,
        "model": model,
        "usage": {
            "input_tokens": 50 + int(3000 * r() ** 2),
            "output_tokens": 20 + int(1500 * r() ** 2),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2048 if cached else 0,
            "service_tier": "standard",
        },
        "attributes": {
            "api_key": api_key_of(rank),
            "project": project_of(rank),
            "user": f"u-{rank:06d}",
            "feature": f"feature-{int(r() * FEATURES):02d}",
            "environment": "prod" if r() < 0.9 else "staging",
        },
        "status": 200,
        "latency_ms": 200 + int(r() * 2000),
    }


def stamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def events_between(count: int, start: datetime, end: datetime, users: int, seed: int, prefix: str) -> Iterator[str]:
    """`count` JSONL lines (no newline), timestamps evenly spread over [start, end) in time order."""
    rng = random.Random(seed)
    step = (end - start) / max(count, 1)
    for i in range(count):
        yield json.dumps(event(rng, f"{prefix}_{i}", stamp(start + step * i), users))


# --- measuring ------------------------------------------------------------------------------------------------------


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(url: str, paths: Path, rate: float, duration: float, connections: int, server_pid: int) -> dict[str, Any]:
    """Run the load process against `url`; return its latencies, answers, achieved rate and the server's CPU."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    cpu_before = cpu_seconds(server_pid)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", LOAD, host, port, str(rate), str(duration), str(connections), str(paths)],
        capture_output=True,
        check=True,
        timeout=duration * 3 + 60,
    ).stdout
    wall = time.perf_counter() - started
    cpu = cpu_seconds(server_pid) - cpu_before
    results = json.loads(out)["results"]
    answered = [(i, r) for i, r in enumerate(results) if r is not None and isinstance(r[1], int)]
    by_status: dict[int, list[float]] = {}
    for _, (latency, status) in answered:
        by_status.setdefault(status, []).append(latency)
    last_done = max((i / rate + r[0] for i, r in answered), default=0.0)
    return {
        "latencies": sorted(r[0] for _, r in answered),
        "by_status": {status: sorted(values) for status, values in sorted(by_status.items())},
        "answers": Counter(str(r[1]) for r in results if r is not None),
        "not_sent": sum(1 for r in results if r is None),
        "achieved": len(answered) / last_done if last_done else 0.0,
        "server_cpu": cpu / wall,
    }


class Keepalive:
    """One keep-alive connection to a server, for the time-to-throttle probes."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
        """Send, read the whole answer, return its status."""
        self.conn.request(method, path, body, headers or {})
        response = self.conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def start_serve(work: Path, budgets: int, evaluate_every: str) -> Any:
    """A real `serve` process (as tests/serve_harness.Serve starts it) in `work`, ready."""
    from tests.serve_harness import Serve

    work.mkdir(parents=True, exist_ok=True)
    (work / "usage").mkdir(exist_ok=True)
    config = write_config(work / "claude-monitor.yaml", work / "monitor.db", budgets, evaluate_every, sources=True)
    return Serve(config, work)


def post_usage(client: Keepalive, events: list[dict[str, Any]]) -> int:
    """POST events to /v1/usage; the status."""
    from tests.serve_harness import TOKEN

    body = json.dumps(events).encode()
    return client.request(
        "POST", "/v1/usage", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    )


def crossing_event(
    request_id: str,
    user: str,
    project: str = "bench-ttt",
    model: str = "claude-haiku-4-5",
    output_tokens: int = 100_000,
) -> dict[str, Any]:
    """An event of $0.50 (100,000 output tokens of Haiku 4.5 at $5/M) by default: the per-user daily limit."""
    return {
        "request_id": request_id,
        "timestamp": stamp(datetime.now(UTC)),
        "model": model,
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": project, "user": user},
    }


# --- part 1: /v1/check latency --------------------------------------------------------------------------------------


def part_check(work: Path, rate: float, duration: float, connections: int, seed_events: int) -> None:
    """p50/p90/p99/max of /v1/check at a fixed rate: the stdlib floor, then a real serve."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(5)
    hot_users = [f"hot-{i:03d}" for i in range(50)]
    paths = work / "paths.txt"
    with paths.open("w", encoding="utf-8") as out:
        for _ in range(20_000):
            if rng.random() < 0.1:  # a tenth of the checks are for throttled callers: the 429 path, with its body
                attrs = {"project": "bench-hot", "user": rng.choice(hot_users)}
            else:
                rank = int(rng.random() * 100_000)
                attrs = {
                    "project": project_of(rank),
                    "user": f"u-{rank:06d}",
                    "api_key": api_key_of(rank),
                    "feature": f"feature-{int(rng.random() * FEATURES):02d}",
                }
            model = next(name for name, bound in MODELS if rng.random() < bound)
            out.write("/v1/check?" + "&".join(f"{k}={v}" for k, v in {**attrs, "model": model}.items()) + "\n")

    rows = []
    print(f"[check] floor server, {rate:g} req/s for {duration:g} s ...", file=sys.stderr)
    floor = subprocess.Popen([sys.executable, "-c", FLOOR], stdout=subprocess.PIPE, text=True)
    try:
        assert floor.stdout is not None
        floor_url = floor.stdout.readline().split("serving on ", 1)[1].strip()
        rows.append(("stdlib ThreadingHTTPServer, 204 (floor)", run_load(floor_url, paths, rate, duration,
                                                                           connections, floor.pid)))  # fmt: skip
    finally:
        floor.terminate()
        floor.wait(10)

    print(f"[check] serve: {CHECK_BUDGETS} budgets, seeding {seed_events:,} events and flags ...", file=sys.stderr)
    serve = start_serve(work / "serve", CHECK_BUDGETS, "15s")
    try:
        client = Keepalive(serve.url)
        now = datetime.now(UTC)
        lines = list(events_between(seed_events, now - timedelta(hours=1), now, 100_000, 3, "seed"))
        for start in range(0, len(lines), 2000):
            post_usage(client, [json.loads(line) for line in lines[start : start + 2000]])
        crossing = [crossing_event(f"hot_{u}", u, "bench-hot") for u in hot_users]
        crossing.append(crossing_event("hot_project", "hot-project", "proj-000", "claude-opus-4-5", 4_000_000))  # $100
        post_usage(client, crossing)
        flags = len(json.loads(serve.get("/v1/throttle").body)["flags"])
        client.close()
        print(f"[check] serve, {rate:g} req/s for {duration:g} s ...", file=sys.stderr)
        rows.append(("claude-monitor serve", run_load(serve.url, paths, rate, duration, connections, serve.proc.pid)))
    finally:
        serve.stop()

    print(
        f"GET /v1/check at {rate:g} req/s for {duration:g} s over {connections} keep-alive connections, open loop "
        "(latency from each request's scheduled send time)"
    )
    print(
        f"{'':40} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'achieved/s':>10} "
        f"{'server CPU':>10}  answers"
    )
    for name, r in rows:
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["answers"].items()))
        if r["not_sent"]:
            answers += f", not sent in time: {r['not_sent']:,}"
        print(f"{name:40} {latency_columns(r['latencies'])} {r['achieved']:10.1f} {r['server_cpu']:9.0%}  {answers}")
        if len(r["by_status"]) > 1:
            for status, latencies in r["by_status"].items():
                print(f"{f'  its {status} answers only':40} {latency_columns(latencies)}")
    floor_lat, ours_lat = rows[0][1]["latencies"], rows[1][1]["latencies"]
    if floor_lat and ours_lat:
        print(
            "claude-monitor / floor: "
            + ", ".join(
                f"{name} {percentile(ours_lat, q) / percentile(floor_lat, q):.2f}x"
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            )
        )
    print(
        f"serve: {CHECK_BUDGETS} budgets (per-user daily among them), {flags} flags active, evaluate_every 15s, "
        f"{seed_events:,} events seeded in the last hour; a tenth of the checks are for throttled users (429); "
        f"server CPU = its CPU seconds / wall seconds of the load run (2 cores = 200%); load process on the same cores"
    )


def latency_columns(ordered: list[float]) -> str:
    """p50, p90, p99 and max in milliseconds, aligned with the part 1 header."""
    if not ordered:
        return " ".join(f"{'-':>7}" for _ in range(4))
    p50, p90, p99, top = (percentile(ordered, q) * 1000 for q in (0.5, 0.9, 0.99, 1.0))
    return f"{p50:7.2f} {p90:7.2f} {p99:7.2f} {top:7.1f}"


# --- part 2: time to throttle ---------------------------------------------------------------------------------------


def part_throttle(work: Path, repeats: int) -> None:
    """From the crossing event to the first 429: POSTed, and appended to a tailed JSONL file."""
    shutil.rmtree(work, ignore_errors=True)
    serve = start_serve(work, CHECK_BUDGETS, "60s")
    rng = random.Random(9)
    posted: list[float] = []
    post_rtt: list[float] = []
    tailed: list[float] = []
    misses = Counter[str]()
    try:
        client = Keepalive(serve.url)
        print(f"[throttle] POST /v1/usage x {repeats} ...", file=sys.stderr)
        for i in range(repeats):
            user = f"ttt-post-{i}"
            check = f"/v1/check?project=bench-ttt&user={user}&model=claude-haiku-4-5"
            if client.request("GET", check) != 204:
                misses["throttled before the crossing event"] += 1
            sent = time.perf_counter()
            status = post_usage(client, [crossing_event(f"ttt_post_{i}", user)])
            post_rtt.append(time.perf_counter() - sent)
            if status != 202:
                misses[f"POST answered {status}"] += 1
                continue
            seconds = poll_until_429(client, check, sent, timeout=5.0)
            if seconds is None:
                misses["no 429 within 5 s of the POST"] += 1
            else:
                posted.append(seconds)

        print(f"[throttle] JSONL append x {repeats} ...", file=sys.stderr)
        with (work / "usage" / "live.jsonl").open("a", encoding="utf-8") as log:
            for i in range(repeats):
                user = f"ttt-tail-{i}"
                check = f"/v1/check?project=bench-ttt&user={user}&model=claude-haiku-4-5"
                if client.request("GET", check) != 204:
                    misses["throttled before the crossing line"] += 1
                time.sleep(rng.random() * TAIL_POLL_S)  # land anywhere in the tailer's poll cycle
                sent = time.perf_counter()
                log.write(json.dumps(crossing_event(f"ttt_tail_{i}", user)) + "\n")
                log.flush()
                seconds = poll_until_429(client, check, sent, timeout=10.0)
                if seconds is None:
                    misses["no 429 within 10 s of the append"] += 1
                else:
                    tailed.append(seconds)
        client.close()
    finally:
        serve.stop()

    print("time to throttle: crossing a per-user daily budget ($0.50 in one event), first 429 seen on /v1/check")
    print(f"{'':46} {'runs':>5} {'median ms':>10} {'max ms':>8}")
    for name, values in (
        ("POST /v1/usage sent -> first 429", posted),
        ("JSONL line appended -> first 429 (5 ms polls)", tailed),
    ):
        if values:
            print(f"{name:46} {len(values):5} {statistics.median(values) * 1000:10.1f} {max(values) * 1000:8.1f}")
        else:
            print(f"{name:46} {0:5} {'-':>10} {'-':>8}")
    if post_rtt:
        print(
            "  of which the POST's own round trip (202 after commit): "
            f"median {statistics.median(post_rtt) * 1000:.1f} ms"
        )
    print(
        f"promise: {PROMISE_S * 1000:.0f} ms; evaluate_every: 60 s = 60000 ms; "
        f"tail poll interval: {TAIL_POLL_S * 1000:.0f} ms (the JSONL figure is expected near it if the tailer polls "
        f"only); goal with file events: {TAIL_GOAL_S * 1000:.0f} ms"
    )
    for reason, count in misses.items():
        print(f"  not counted: {count} x {reason}")


def poll_until_429(client: Keepalive, path: str, sent: float, timeout: float) -> float | None:
    """Seconds from `sent` to the first 429 on `path`, polling every 5 ms; None after `timeout`."""
    while time.perf_counter() - sent < timeout:
        if client.request("GET", path) == 429:
            return time.perf_counter() - sent
        time.sleep(0.005)
    return None


# --- part 3: evaluation against history -----------------------------------------------------------------------------


def part_evaluation(work: Path, events: int, history: int, users: int) -> None:
    """evaluate() over the current window's budget_usage, before and after history is added to `events`."""
    from monitor.config import load_settings
    from monitor.service import open_store

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    database = work / "evaluation.db"
    config = write_config(work / "claude-monitor.yaml", database, EVAL_BUDGETS, "15s", sources=False)
    loaded = load_settings(config, environ={})

    def clock() -> datetime:
        return EVAL_NOW

    store = open_store(loaded, clock)
    oldest_window = min(b.first_bucket(EVAL_NOW, store.settings.zone) for b in store.budgets.budgets)
    history_start, history_end = EVAL_NOW - timedelta(days=HISTORY_DAYS[1]), EVAL_NOW - timedelta(days=HISTORY_DAYS[0])
    if history_end >= oldest_window:
        raise SystemExit(f"history must end before the oldest window start {oldest_window.isoformat()}")
    store.budgets.sync_definitions()  # as `serve` does at start: records what budget_usage is counted for

    day_start = EVAL_NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    print(f"[evaluation] ingesting {events:,} events of today through the write path ...", file=sys.stderr)
    started = time.perf_counter()
    batch: list[Any] = []
    accepted = 0
    for i, line in enumerate(events_between(events, day_start, EVAL_NOW, users, 7, "cur")):
        batch.append((f"bench#{i}", store.parser.parse_line(line)))
        if len(batch) == 5000:
            accepted += store.writer.write(batch, "bench").accepted
            batch = []
            if accepted % 100_000 == 0:
                rate = accepted / (time.perf_counter() - started)
                print(f"[evaluation]   {accepted:,} ({rate:,.0f}/s)", file=sys.stderr)
    if batch:
        accepted += store.writer.write(batch, "bench").accepted
    ingest_s = time.perf_counter() - started
    store.close()
    if accepted != events:
        raise SystemExit(f"only {accepted:,} of {events:,} events were accepted")
    print(f"[evaluation] ingested in {ingest_s:.0f} s ({events / ingest_s:,.0f}/s)", file=sys.stderr)

    before = measure_evaluation(loaded, clock, database)

    print(f"[evaluation] adding {history:,} history events with plain sqlite3 ...", file=sys.stderr)
    started = time.perf_counter()
    add_history(database, history, history_start, history_end)
    history_s = time.perf_counter() - started
    print(f"[evaluation] history added in {history_s:.0f} s ({history / history_s:,.0f}/s)", file=sys.stderr)

    after = measure_evaluation(loaded, clock, database)
    sizes = table_sizes(database)

    print(
        f"budget evaluation (BudgetEngine.evaluate, median of 3) with {EVAL_BUDGETS:,} budgets: one per-user daily "
        f"over {users:,} users and {EVAL_BUDGETS - 1} others; SQLite; now fixed at {stamp(EVAL_NOW)}"
    )
    print(
        f"{'':34} {'events stored':>14} {'budget_usage rows':>18} {'scopes':>8} {'flags':>6} "
        f"{'evaluate() s':>13}  runs s"
    )
    for name, m in ((f"current window ({events:,} today)", before), (f"+ {history:,} history", after)):
        print(
            f"{name:34} {m['events']:14,} {m['usage_rows']:18,} {m['scopes']:8,} {m['flags']:6,} "
            f"{m['median']:13.3f}  {', '.join(f'{t:.3f}' for t in m['runs'])}"
        )
    print(
        f"{after['events'] / before['events']:.0f}x the events, {after['median'] / before['median']:.2f}x the "
        "evaluation time"
    )
    print(
        f"table sizes: events {sizes['events'] / 2**20:,.0f} MiB with its indexes ({after['events']:,} rows); "
        f"budget_usage {sizes['budget_usage'] / 2**20:,.0f} MiB with its index ({after['usage_rows']:,} rows)"
    )
    print(
        f"today's events went through open_store(...).writer.write ({events / ingest_s:,.0f} events/s, budget_usage "
        f"kept in the same transactions); the history ({stamp(history_start)[:10]} to {stamp(history_end)[:10]}) "
        f"went straight into `events` with sqlite3 executemany ({history / history_s:,.0f} rows/s) and never into "
        f"budget_usage: it is older than every window (the oldest starts {stamp(oldest_window)}), so evaluation, "
        "which reads budget_usage from each window's first bucket on, must not read it"
    )


def measure_evaluation(loaded: Any, clock: Any, database: Path) -> dict[str, Any]:
    """Open the store afresh and time three evaluations; with the counts they saw."""
    from monitor.service import open_store

    store = open_store(loaded, clock)
    try:
        runs = []
        stats = None
        for _ in range(3):
            started = time.perf_counter()
            stats = store.budgets.evaluate()
            runs.append(time.perf_counter() - started)
        assert stats is not None
    finally:
        store.close()
    with sqlite3.connect(database) as con:
        events = con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        usage_rows = con.execute("SELECT COUNT(*) FROM budget_usage").fetchone()[0]
    con.close()
    return {
        "runs": runs,
        "median": statistics.median(runs),
        "scopes": stats.scopes,
        "flags": stats.flags,
        "events": events,
        "usage_rows": usage_rows,
    }


def add_history(database: Path, count: int, start: datetime, end: datetime) -> None:
    """Insert `count` events over [start, end) into `events` only, copying token, cost and label columns from
    today's real rows (so costs are the prices' own), with fresh request ids and old timestamps."""
    con = sqlite3.connect(database, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA cache_size=-262144")
    columns = (
        "model_id, model, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, "
        "cache_write_1h_tokens, web_search_requests, web_fetch_requests, batch, long_prompt, service_tier, speed, "
        "inference_geo, status, latency_ms, attributes, cost_pico, price_version"
    )
    templates = con.execute(f"SELECT {columns} FROM events ORDER BY random() LIMIT 20000").fetchall()
    sql = (
        f"INSERT INTO events (request_id, ts, received_at, source, {columns}) "
        f"VALUES ({', '.join('?' * (4 + len(templates[0])))})"
    )
    start_us = int(start.timestamp() * 1_000_000)
    step_us = (end - start) / timedelta(microseconds=1) / max(count, 1)
    second, prefix = -1, ""
    chunk = 200_000
    for first in range(0, count, chunk):
        rows = []
        for i in range(first, min(first + chunk, count)):
            us = start_us + int(i * step_us)
            if us // 1_000_000 != second:
                second = us // 1_000_000
                prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
            ts = f"{prefix}.{us % 1_000_000:06d}"  # SQLAlchemy's SQLite DateTime text, as the write path stores it
            rows.append((f"hist_{i:010d}", ts, ts, "history", *templates[i % len(templates)]))
        con.execute("BEGIN IMMEDIATE")
        con.executemany(sql, rows)
        con.execute("COMMIT")
        if (first // chunk) % 10 == 9:
            print(f"[evaluation]   {first + len(rows):,}", file=sys.stderr)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def table_sizes(database: Path) -> dict[str, int]:
    """Bytes of each table with its indexes (dbstat summed per page: its aggregate mode overflows past 2 GiB)."""
    with sqlite3.connect(database) as con:
        owner = dict(con.execute("SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')"))
        sizes: Counter[str] = Counter()
        for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            sizes[owner.get(name, name)] += size
    con.close()
    return dict(sizes)


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    """Run the chosen parts (all by default) and print their figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="part 1: /v1/check latency at a fixed rate")
    parser.add_argument("--throttle", action="store_true", help="part 2: time to throttle")
    parser.add_argument("--evaluation", action="store_true", help="part 3: evaluation time against history")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply counts and the load duration (0.1: quick)")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second of part 1")
    parser.add_argument("--duration", type=float, help="seconds of load in part 1 (default 20 x scale)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections of the load process")
    parser.add_argument("--repeats", type=int, help="crossings per path in part 2 (default 50 x scale, at least 5)")
    parser.add_argument("--events", type=int, help="today's events in part 3 (default 1,000,000 x scale)")
    parser.add_argument("--history", type=int, help="history events added in part 3 (default 9,000,000 x scale)")
    parser.add_argument("--users", type=int, help="users in part 3 (default 100,000 x scale)")
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()
    everything = not (args.check or args.throttle or args.evaluation)
    scale = args.scale
    duration = args.duration if args.duration is not None else 20 * scale
    repeats = args.repeats if args.repeats is not None else max(5, round(50 * scale))
    events = args.events if args.events is not None else round(1_000_000 * scale)
    history = args.history if args.history is not None else round(9_000_000 * scale)
    users = args.users if args.users is not None else round(100_000 * scale)

    sys.path.insert(0, str(REPO))
    work = Path(args.workdir).resolve() / "serve_bench"
    began = time.perf_counter()
    print(
        f"serve_bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"scale {scale:g}"
    )
    if everything or args.check:
        print()
        part_check(work / "check", args.rate, duration, args.connections, round(20_000 * scale))
    if everything or args.throttle:
        print()
        part_throttle(work / "throttle", repeats)
    if everything or args.evaluation:
        print()
        part_evaluation(work / "evaluation", events, history, users)
    print(f"\n(whole run: {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
