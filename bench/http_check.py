"""Benchmark: GET /v1/check at a fixed request rate from `hey`, this checkout next to a baseline commit, same run.

What runs: for each server, a fresh `serve` (its own SQLite file, the same config: 40 budgets — a per-user daily one,
per-project, per-model, per-feature — and 2,000 events of the last hour posted before the load, 8 users of them
over their daily limit, so /v1/check matches scopes, finds flags and writes 429 bodies). Then `hey` (Debian package
`hey`; Go, so the load generator does not share the server's interpreter) sends GET /v1/check at a fixed rate for
the duration over keep-alive connections: seven eighths of the workers ask for users under budget (204), one eighth
for a throttled user (429 with its JSON body). A one-second warm-up at the same rate comes first and is not counted.

The baseline is a git worktree of `--baseline REV` (default HEAD~1) in a temp directory, run with this checkout's
interpreter and `PYTHONPATH` pointing at the worktree (nothing is installed; the process prints which `monitor` it
imported). Runs alternate, baseline then current, `--rounds` times, so drift on a shared machine hits both.

    .venv/bin/python bench/http_check.py [--baseline HEAD~1] [--rate 2000] [--duration 30] [--connections 8]
                                         [--rounds 2] [--workdir .bench]

Reading it: one row per run — p50/p99/max of the latency hey measured per request (connect excluded after the
first: keep-alive; hey writes each latency to 0.1 ms), `req/s` the answers per second actually achieved (it should
equal `--rate`: below it, the server could not keep up, or hey's workers were held by slow answers — hey paces each
worker on a ticker, so a stalled answer delays that worker's next request instead of being queued behind it), the
answers by status, and the server's CPU (its CPU seconds / wall seconds; 2 cores = 200%). The last rows pool every
run of each server and give current/baseline ratios: below 1.00 is faster. Background load on a shared machine
moves p99 and max the most; trust differences that hold in every round.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worktree import REPO, baseline_worktree, describe_current, imported_from

USERS = 200
HOT_USERS = 8
PROJECTS = ["lingo", "atlas", "quill", "orbit"]
FEATURES = ["grammar-check", "translate", "chat", "summary"]
ALLOWED_PATH = "/v1/check?project=lingo&user=u-0042&feature=grammar-check&api_key=key-3&model=claude-haiku-4-5"
THROTTLED_PATH = "/v1/check?project=lingo&user=hot-1&feature=chat&api_key=key-1&model=claude-haiku-4-5"


# --- the servers ---------------------------------------------------------------------------------------------------


def budgets() -> list[dict[str, Any]]:
    """40 budgets of the kinds a team configures."""
    out: list[dict[str, Any]] = [
        {"name": "per-user-daily", "match": {"project": "lingo"}, "per": "user", "window": "day",
         "limit_usd": "0.50", "alert_at": ["0.8"], "throttle_at": "1.0"},
        {"name": "opus-output-hourly", "match": {"model": "claude-opus-4-5"}, "window": "rolling:1h",
         "limit_tokens": {"output": 50_000_000}, "throttle_at": "1.0"},
    ]  # fmt: skip
    for project in PROJECTS:
        for window, limit in (("day", "200"), ("week", "1000"), ("month", "4000"), ("rolling:1h", "50")):
            name = f"{project}-{window.replace(':', '-')}"
            out.append({"name": name, "match": {"project": project}, "window": window, "limit_usd": limit,
                        "alert_at": ["0.5", "0.8"], "throttle_at": "1.0"})  # fmt: skip
    for feature in FEATURES:
        for window in ("day", "rolling:30m"):
            out.append({"name": f"{feature}-{window.replace(':', '-')}", "match": {"feature": feature},
                        "window": window, "limit_requests": 1_000_000, "throttle_at": "1.0"})  # fmt: skip
    for model in ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"):
        for window in ("day", "month"):
            out.append({"name": f"{model}-{window}", "match": {"model": model}, "window": window,
                        "limit_tokens": {"total": 10_000_000_000}, "alert_at": ["0.9"]})  # fmt: skip
    for key in range(8):
        out.append({"name": f"key-{key}-month", "match": {"api_key": f"key-{key}"}, "window": "month",
                    "limit_usd": "3000", "alert_at": ["0.8"]})  # fmt: skip
    return out[:40]


def write_config(work: Path) -> Path:
    import yaml

    config = {
        "database_url": f"sqlite:///{work / 'monitor.db'}",
        "http": {"listen": "127.0.0.1:0"},
        "throttle": {"snapshot_file": str(work / "throttle.json")},
        "schedule": {"evaluate_every": "15s"},
        "budgets": budgets(),
    }
    path = work / "claude-monitor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def seed_events(now: datetime) -> list[dict[str, Any]]:
    """2,000 ordinary events of the last hour, and one event per hot user that takes it over $0.50 today."""
    events = []
    for i in range(2000):
        user = i * 7 % USERS
        events.append({
            "request_id": f"seed-{i:05d}",
            "timestamp": (now - timedelta(seconds=1 + i * 1.7)).isoformat().replace("+00:00", "Z"),
            "model": ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5")[i % 3],
            "usage": {"input_tokens": 200 + i % 500, "output_tokens": 50 + i % 300, "cache_read_input_tokens": 1024},
            "attributes": {"project": PROJECTS[i % len(PROJECTS)], "user": f"u-{user:04d}",
                           "feature": FEATURES[i % len(FEATURES)], "api_key": f"key-{i % 8}"},
        })  # fmt: skip
    for h in range(HOT_USERS):  # 200,000 output tokens of Haiku 4.5 at $5/M = $1
        events.append({
            "request_id": f"hot-{h}", "timestamp": now.isoformat().replace("+00:00", "Z"), "model": "claude-haiku-4-5",
            "usage": {"input_tokens": 10, "output_tokens": 200_000},
            "attributes": {"project": "lingo", "user": f"hot-{h}", "feature": "chat", "api_key": f"key-{h % 8}"},
        })  # fmt: skip
    return events


@dataclass
class Server:
    name: str
    pythonpath: Path  # the source tree whose `monitor` runs


def start(server: Server, work: Path) -> Any:
    """A seeded, ready `serve` of `server`'s code in a fresh directory."""
    from tests.serve_harness import TOKEN, Serve, request

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"PYTHONPATH": str(server.pythonpath)}
    imported_from(server.pythonpath, work)
    serve = Serve(write_config(work), work, env)
    events = seed_events(datetime.now(UTC))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for first in range(0, len(events), 500):
        answer = request(serve.url + "/v1/usage", "POST", json.dumps(events[first : first + 500]).encode(), headers)
        if answer.status != 202:
            serve.stop()
            raise SystemExit(f"{server.name}: seeding answered {answer.status}: {answer.body[:300]!r}")
    allowed, throttled = request(serve.url + ALLOWED_PATH).status, request(serve.url + THROTTLED_PATH).status
    if (allowed, throttled) != (204, 429):
        serve.stop()
        raise SystemExit(f"{server.name}: the checks answer {allowed} and {throttled}, not 204 and 429")
    return serve


# --- the load ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, ascending
    statuses: Counter[str] = field(default_factory=Counter)
    achieved: float = 0.0
    cpu: float = 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hey(url: str, rate: float, duration: float, connections: int) -> list[subprocess.Popen[str]]:
    """Two hey processes at once: connections-1 workers on a caller under budget, one on a throttled caller."""
    per_worker = rate / connections
    return [
        subprocess.Popen(
            ["hey", "-z", f"{duration}s", "-q", f"{per_worker:g}", "-c", str(workers), "-o", "csv", url + path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path, workers in ((ALLOWED_PATH, connections - 1), (THROTTLED_PATH, 1))
    ]


def measure(name: str, serve: Any, rate: float, duration: float, connections: int) -> Run:
    """Warm up for a second, then the measured run; hey's per-request CSV gives every latency."""
    for proc in hey(serve.url, rate, 1, connections):
        proc.communicate(timeout=60)
    run = Run(name)
    cpu_before, started = cpu_seconds(serve.proc.pid), time.perf_counter()
    outputs = [proc.communicate(timeout=duration * 3 + 60) for proc in hey(serve.url, rate, duration, connections)]
    wall = time.perf_counter() - started
    run.cpu = (cpu_seconds(serve.proc.pid) - cpu_before) / wall
    for out, err in outputs:
        rows = list(csv.DictReader(io.StringIO(out)))
        if not rows:
            raise SystemExit(f"hey measured nothing against {name}: {err.strip()[:500]}")
        run.latencies += [float(row["response-time"]) for row in rows]
        run.statuses.update(row["status-code"] for row in rows)
    run.latencies.sort()
    run.achieved = len(run.latencies) / duration
    return run


# --- the report ----------------------------------------------------------------------------------------------------


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))]


def row(name: str, run: Run) -> str:
    p50, p99, top = (percentile(run.latencies, q) * 1000 for q in (0.5, 0.99, 1.0))
    answers = ", ".join(f"{status}: {count:,}" for status, count in sorted(run.statuses.items()))
    return f"{name:34} {p50:8.2f} {p99:8.2f} {top:8.1f} {run.achieved:8.0f} {run.cpu:6.0%}  {answers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1", help="commit to compare with ('none': this checkout only)")
    parser.add_argument("--rate", type=float, default=2000.0, help="requests per second, all workers together")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured load per run")
    parser.add_argument("--connections", type=int, default=8, help="hey workers, one keep-alive connection each")
    parser.add_argument("--rounds", type=int, default=2, help="baseline-then-current pairs")
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install -y hey")
    if args.connections < 2:
        raise SystemExit("--connections must be at least 2 (one worker asks for a throttled caller)")
    sys.path.insert(0, str(REPO))
    work = Path(args.workdir).resolve() / "http_check"
    servers = [Server(f"current {describe_current()}", REPO)]
    with ExitStack() as stack:
        if args.baseline != "none":
            commit, tree = stack.enter_context(baseline_worktree(args.baseline))
            servers.insert(0, Server(f"baseline {commit} ({args.baseline})", tree))
        print(
            f"http_check: GET /v1/check at {args.rate:g} req/s for {args.duration:g} s per run, hey with "
            f"{args.connections} keep-alive workers ({args.connections - 1} on a caller under budget, 1 on a "
            f"throttled one); {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
            flush=True,
        )
        runs: list[Run] = []
        for round_number in range(1, args.rounds + 1):
            for server in servers:
                print(f"[http_check] round {round_number}: {server.name} ...", file=sys.stderr, flush=True)
                serve = start(server, work / server.name.split()[0])
                try:
                    runs.append(measure(server.name, serve, args.rate, args.duration, args.connections))
                    runs[-1].name += f" #{round_number}"
                finally:
                    serve.stop()

    print(f"{'server':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>8} {'CPU':>6}  answers")
    for run in runs:
        print(row(run.name, run))
    pooled = {}
    for server in servers:
        mine = [run for run in runs if run.name.startswith(server.name)]
        total = Run(f"{server.name.split()[0]}, all runs")
        for run in mine:
            total.latencies += run.latencies
            total.statuses.update(run.statuses)
        total.latencies.sort()
        total.achieved = sum(run.achieved for run in mine) / len(mine)
        total.cpu = sum(run.cpu for run in mine) / len(mine)
        pooled[server.name.split()[0]] = total
        print(row(total.name, total))
    if "baseline" in pooled:
        base, cur = pooled["baseline"].latencies, pooled["current"].latencies
        quantiles = (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        ratios = (f"{name} {percentile(cur, q) / percentile(base, q):.2f}x" for name, q in quantiles)
        print("current / baseline: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
