"""Benchmark: HTTP ingest throughput of a real `serve` on SQLite with K concurrent posters of single events.

Each poster is a process of its own holding one keep-alive connection and sending `POST /v1/usage` with one event
(a distinct request_id) after the previous answer: the shape of many proxies recording one call each. The daemon of
this checkout runs first; with `--baseline REV` the daemon of that commit too (from a temporary git worktree, with
this interpreter and PYTHONPATH), against a fresh database each. Printed per daemon and K: events/s over the whole
run (all posters' 202s / wall time from the first request to the last answer) and the answer time p50/p99.

    .venv/bin/python bench/ingest_http.py [--posters 1,16,64] [--events 3000] [--baseline REV] [--workdir .bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from worktree import REPO, baseline_worktree, describe_current, imported_from

POSTER = r"""
import http.client, json, sys, time, uuid
host, port, count, token, go_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
prefix = uuid.uuid4().hex[:12]
connection = http.client.HTTPConnection(host, port, timeout=120)
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
bodies = [json.dumps({"request_id": f"bench-{prefix}-{i}", "timestamp": "2026-01-05T10:00:00Z",
                      "model": "claude-haiku-4-5", "usage": {"input_tokens": 100, "output_tokens": 20},
                      "attributes": {"project": "bench", "user": f"u-{i % 50}"}}).encode() for i in range(count)]
while time.time() < go_at:
    time.sleep(0.001)
times, accepted, first = [], 0, time.time()
for body in bodies:
    started = time.perf_counter()
    connection.request("POST", "/v1/usage", body, headers)
    response = connection.getresponse()
    answer = response.read()
    times.append(time.perf_counter() - started)
    if response.status == 202:
        accepted += json.loads(answer)["accepted"]
print(json.dumps({"accepted": accepted, "first": first, "last": time.time(), "times": times}))
"""


def serve(work: Path, tree: Path) -> object:
    """A real daemon of `tree` on a fresh SQLite file, with one per-user budget (never reached)."""
    from tests.serve_harness import Serve

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    imported_from(tree, work)
    config = work / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{work / 'monitor.db'}\n"
        'http: {listen: "127.0.0.1:0"}\n'
        f"throttle: {{snapshot_file: {work / 'throttle.json'}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: bench}, per: user, window: day, limit_usd: 1000}\n",
        encoding="utf-8",
    )
    return Serve(config, work, {"PYTHONPATH": str(tree)})


def run(url: str, posters: int, events: int) -> tuple[float, float, float, int]:
    """(events/s, answer p50 ms, p99 ms, accepted) for `events` split over `posters` processes."""
    from tests.serve_harness import TOKEN

    host, port = url.removeprefix("http://").split(":")
    each = max(1, events // posters)
    go_at = time.time() + 1.0 + posters * 0.05  # every poster started and connected before the first request
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", POSTER, host, port, str(each), TOKEN, str(go_at)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(posters)
    ]
    results = [json.loads(proc.communicate(timeout=600)[0]) for proc in procs]
    accepted = sum(r["accepted"] for r in results)
    wall = max(r["last"] for r in results) - min(r["first"] for r in results)
    times = sorted(t for r in results for t in r["times"])
    p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
    return accepted / wall, p50 * 1000, p99 * 1000, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--posters", default="1,16,64", help="comma-separated concurrent poster counts")
    parser.add_argument("--events", type=int, default=3000, help="events per run (split over the posters)")
    parser.add_argument("--baseline", default="none", help="also the daemon of this commit (e.g. HEAD~1)")
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    counts = [int(k) for k in args.posters.split(",")]
    work = Path(args.workdir).resolve() / "ingest_http"
    print(f"ingest_http: {args.events} single-event POST /v1/usage per run, SQLite, posters {counts}", flush=True)
    rows = []
    with ExitStack() as stack:
        trees = [(f"serve {describe_current()}", REPO)]
        if args.baseline != "none":
            commit, tree = stack.enter_context(baseline_worktree(args.baseline))
            trees.insert(0, (f"serve {commit} ({args.baseline})", tree))
        for name, tree in trees:
            for posters in counts:
                print(f"[ingest_http] {name}, {posters} posters ...", file=sys.stderr, flush=True)
                daemon = serve(work / f"{len(rows)}", tree)
                try:
                    rows.append((name, posters, *run(daemon.url, posters, args.events)))  # type: ignore[attr-defined]
                finally:
                    daemon.stop()  # type: ignore[attr-defined]
    print(f"{'daemon':32} {'posters':>7} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'accepted':>8}")
    for name, posters, rate, p50, p99, accepted in rows:
        print(f"{name:32} {posters:7d} {rate:9.0f} {p50:8.2f} {p99:8.2f} {accepted:8d}")


if __name__ == "__main__":
    main()
