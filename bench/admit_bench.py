"""Benchmark: POST /v1/admit + POST /v1/release pairs at a fixed rate, next to GET /v1/check in the same run.

A real `serve` on SQLite with a `per: user` daily budget that throttles, a budget over all traffic, and a
`per: user` limit (concurrent + requests_per_minute); 100,000 users already have spend today (100,000 events through
the real write path before the daemon starts). A separate load process sends, open loop, one pair (admit, then
release with usage) every 1/rate s on keep-alive connections; latency runs from the due time, so a stall is not
hidden by the requests it delays. Phases, each its own load process:

1. `cold`: each pair for a user not admitted before (the daemon reads that user's spend once: one indexed read).
2. `warm`: users drawn from 1,000 already admitted (decided in memory).
3. `check`: GET /v1/check for the same users at the same rate.

Usage: .venv/bin/python bench/admit_bench.py [--rate 1000] [--duration 10] [--users 100000] [--workdir .bench-admit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"

LOAD = r"""
import http.client, json, sys, threading, time
host, port, rate, duration, connections, mode, users_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
with open(users_file, encoding="utf-8") as f:
    users = f.read().split()
total = int(rate * duration)
auth = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}
results = [None] * total
conns = [http.client.HTTPConnection(host, port, timeout=5) for _ in range(connections)]
for conn in conns:
    conn.request("GET", "/healthz")
    conn.getresponse().read()
start = time.perf_counter() + 0.2

def pair(conn, user):
    body = json.dumps({"attributes": {"project": "lingo", "user": user}, "model": "claude-haiku-4-5",
                       "max_tokens": 500, "estimated_input_tokens": 2000}).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/admit", body, auth)
    response = conn.getresponse()
    answer = response.read()
    t1 = time.perf_counter()
    if response.status != 200:
        return t1 - t0, None, response.status
    lease = json.loads(answer)["lease"]
    body = json.dumps({"lease": lease, "request_id": None, "usage": {"input_tokens": 900, "output_tokens": 200}})
    conn.request("POST", "/v1/release", body.encode(), auth)
    response = conn.getresponse()
    response.read()
    return t1 - t0, time.perf_counter() - t1, response.status

def check(conn, user):
    t0 = time.perf_counter()
    conn.request("GET", f"/v1/check?project=lingo&user={user}&model=claude-haiku-4-5")
    response = conn.getresponse()
    response.read()
    return time.perf_counter() - t0, None, response.status

def worker(k):
    conn = conns[k]
    for i in range(k, total, connections):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        late = time.perf_counter() - due
        try:
            first, second, status = (pair if mode != "check" else check)(conn, users[i % len(users)])
            results[i] = (late + first, second, status)
        except Exception as exc:
            results[i] = (None, None, type(exc).__name__)

threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
for t in threads: t.start()
for t in threads: t.join()
json.dump(results, sys.stdout)
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _seed(workdir: Path, config: Path, users: int) -> None:
    """One event per user today through the real write path: every user's scope has spend to read."""
    sys.path.insert(0, str(REPO))
    from monitor.config import load_settings
    from monitor.service import open_store

    store = open_store(load_settings(config, environ={}))
    now = datetime.now(UTC).isoformat()
    try:
        for start in range(0, users, 10_000):
            items = []
            for n in range(start, min(users, start + 10_000)):
                event = {
                    "request_id": f"seed-{n}",
                    "timestamp": now,
                    "model": "claude-haiku-4-5",
                    "usage": {"input_tokens": 1000, "output_tokens": 100},
                    "attributes": {"project": "lingo", "user": f"u{n}"},
                }
                items.append((f"seed#{n}", store.parser.parse_object(event)))
            store.writer.write(items, "seed")
    finally:
        store.close()


def _serve(workdir: Path, config: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
    env["CLAUDE_MONITOR_INGEST_TOKEN"] = TOKEN
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--config", str(config)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"serving on (http://[\d.]+:\d+)", (workdir / "serve.log").read_text(errors="replace"))
        if match:
            url = match.group(1)
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return proc, url
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"serve did not start:\n{(workdir / 'serve.log').read_text()}")


def _load(url: str, rate: float, duration: float, mode: str, users_file: Path) -> list[list[object]]:
    host, port = url.removeprefix("http://").split(":")
    out = subprocess.run(
        [sys.executable, "-c", LOAD, host, port, str(rate), str(duration), "16", mode, str(users_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _report(name: str, results: list[list[object]]) -> None:
    first = [r[0] * 1000 for r in results if isinstance(r[0], float)]
    second = [r[1] * 1000 for r in results if isinstance(r[1], float)]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    label = "check" if name == "check" else f"{name} admit"
    print(
        f"{label:>12}: n={len(first):,} p50={_percentile(first, 0.5):.2f} ms p99={_percentile(first, 0.99):.2f} ms "
        f"max={max(first, default=float('nan')):.2f} ms statuses={statuses}"
    )
    if second:
        print(
            f"{name + ' release':>12}: n={len(second):,} p50={_percentile(second, 0.5):.2f} ms "
            f"p99={_percentile(second, 0.99):.2f} ms max={max(second):.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-admit")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    config = args.workdir / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{args.workdir / 'monitor.db'}\n"
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {args.workdir / 'throttle.json'}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: lingo}, per: user, window: day, limit_usd: 5, throttle_at: 1.0}\n"
        "  - {name: lingo-monthly, match: {project: lingo}, window: month, limit_usd: 1000000, throttle_at: 1.0}\n"
        "limits:\n"
        "  - {name: per-user, match: {project: lingo}, per: user, concurrent: 4, requests_per_minute: 600}\n",
        encoding="utf-8",
    )
    started = time.perf_counter()
    _seed(args.workdir, config, args.users)
    print(f"seeded {args.users:,} users' spend in {time.perf_counter() - started:.1f} s")
    proc, url = _serve(args.workdir, config)
    try:
        count = int(args.rate * args.duration)
        cold = args.workdir / "cold.txt"
        cold.write_text("\n".join(f"u{n}" for n in range(min(count, args.users))), encoding="utf-8")
        warm = args.workdir / "warm.txt"
        warm.write_text("\n".join(f"u{n}" for n in range(1000)), encoding="utf-8")
        print(f"{args.rate:.0f} pairs/s for {args.duration:.0f} s each, 16 keep-alive connections, open loop")
        _report("cold", _load(url, args.rate, args.duration, "pairs", cold))
        _report("warm", _load(url, args.rate, args.duration, "pairs", warm))
        _report("check", _load(url, args.rate, args.duration, "check", warm))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
