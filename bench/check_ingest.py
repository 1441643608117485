"""Benchmark: GET /v1/check latency at a fixed rate while events are POSTed, next to the same with no ingest.

A real `serve` on SQLite (a `per: user` daily budget and a budget over all traffic, never reached). Checks come from
`hey` (`-q` per worker, keep-alive workers) for a caller under budget; ingest from bench/ingest_load.py, a separate
process POSTing `--batch` events per request, open loop, at `--events` events/s. Each daemon is measured twice in
one run: checks alone, then checks while ingest runs (hey starts a second after the poster and stops before it).
Printed per phase: check p50/p99/max and the rate hey achieved, the ingest events/s accepted and its answer p50/p99,
the daemon's CPU and its peak RSS (with its children: an ingest worker process counts). With `--baseline REV` the
daemon of that commit runs the same phases first (a temporary git worktree on PYTHONPATH, its own fresh store).
First, when nginx is installed, the same hey at the same rate against nginx answering 204 on the same path: the
latency this host, its kernel and hey itself add to any answer (the floor under the daemon's figures).

    .venv/bin/python bench/check_ingest.py [--rate 1000] [--events 2000] [--batch 10] [--duration 15]
        [--connections 8] [--baseline REV] [--workdir .bench-check-ingest]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worktree import REPO, baseline_worktree, describe_current, imported_from

LOAD = Path(__file__).with_name("ingest_load.py")
CHECK_PATH = "/v1/check?project=load&user=l-7&model=claude-haiku-4-5"


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += tree_pids(int(child))
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB, summed over a process and its descendants."""
    now = peak = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{p}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            now += int(fields["VmRSS"].split()[0]) / 1024
            peak += int(fields["VmHWM"].split()[0]) / 1024
    return now, peak


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def start(work: Path, tree: Path | None) -> Any:
    """A ready daemon of `tree` (None: this checkout) on a fresh SQLite store."""
    from tests.serve_harness import Serve

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{work / 'monitor.db'}\n"
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {work / 'throttle.json'}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: load}, per: user, window: day, limit_usd: 100000}\n"
        "  - {name: all-monthly, window: month, limit_usd: 10000000}\n",
        encoding="utf-8",
    )
    return Serve(config, work, {"PYTHONPATH": str(tree)} if tree is not None else {})


def hey(url: str, rate: float, duration: float, connections: int) -> subprocess.Popen[str]:
    """hey on the check route: `connections` keep-alive workers at rate/connections each."""
    return subprocess.Popen(
        ["hey", "-z", f"{duration:g}s", "-q", f"{rate / connections:g}", "-c", str(connections), "-o", "csv", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def hey_latencies(proc: subprocess.Popen[str], timeout: float) -> tuple[list[float], dict[str, int]]:
    """hey's per-request latencies (ms, ascending) and status counts."""
    out, err = proc.communicate(timeout=timeout)
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        raise SystemExit(f"hey measured nothing: {err.strip()[:500]}")
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status-code"]] = statuses.get(row["status-code"], 0) + 1
    return sorted(float(row["response-time"]) * 1000 for row in rows), statuses


def phase(serve: Any, args: argparse.Namespace, ingest: bool) -> dict[str, Any]:
    """One measured phase: hey alone, or hey while the poster runs."""
    from tests.serve_harness import TOKEN

    host, port = serve.url.removeprefix("http://").split(":")
    pid = serve.proc.pid
    hey_latencies(hey(serve.url + CHECK_PATH, args.rate, 1, args.connections), 60)  # warm-up
    poster = None
    if ingest:
        poster = subprocess.Popen(
            [sys.executable, str(LOAD), host, port, str(args.events), str(args.duration + 2), str(args.batch), TOKEN],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # the poster builds its bodies and reaches its rate before checks are measured
    cpu0, wall0 = tree_cpu(pid), time.perf_counter()
    checks = hey(serve.url + CHECK_PATH, args.rate, args.duration, args.connections)
    latencies, statuses = hey_latencies(checks, args.duration * 3 + 60)
    wall = time.perf_counter() - wall0
    result: dict[str, Any] = {
        "checks": latencies,
        "statuses": statuses,
        "check_rate": len(latencies) / args.duration,
        "cpu": (tree_cpu(pid) - cpu0) / wall,
    }
    if poster is not None:
        load = json.loads(poster.communicate(timeout=args.duration * 3 + 120)[0])
        result["load"] = load
    result["rss"] = rss_mb(pid)
    return result


def report(name: str, result: dict[str, Any]) -> None:
    checks = result["checks"]
    p50, p99, top = (percentile(checks, q) for q in (0.5, 0.99, 1.0))
    line = (
        f"{name:28} check p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {top:7.1f} ms  {result['check_rate']:6.0f} req/s  "
        f"{result['statuses']}"
    )
    print(line)
    load = result.get("load")
    if load is not None:
        ms = sorted(load["ms"])
        print(
            f"{'':28} ingest {load['accepted'] / load['wall_s']:6.0f} events/s accepted ({load['posts']:,} POSTs, "
            f"answer p50 {percentile(ms, 0.5):.1f} ms p99 {percentile(ms, 0.99):.1f} ms, {load['statuses']}; "
            f"poster CPU {load['cpu_s'] / load['wall_s']:.0%})"
        )
    now, peak = result["rss"]
    print(f"{'':28} daemon CPU {result['cpu']:.0%} of a core; RSS {now:.0f} MB (peak {peak:.0f} MB)", flush=True)


def floor(args: argparse.Namespace, work: Path) -> None:
    """hey at the same rate against nginx answering 204 (skipped, saying so, where nginx is not installed)."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if binary is None:
        print("host floor: nginx is not installed (apt-get install -y nginx); skipped", flush=True)
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (work / "nginx.conf").write_text(
        f"worker_processes 1;\npid {work / 'nginx.pid'};\nerror_log {work / 'error.log'};\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; server {{ listen 127.0.0.1:{port}; location / {{ return 204; }} }} }}\n",
        encoding="utf-8",
    )
    server = subprocess.Popen([binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"nginx did not start: {(work / 'error.log').read_text()[:500]}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}{CHECK_PATH}"
        hey_latencies(hey(url, args.rate, 1, args.connections), 60)  # warm-up
        checks = hey(url, args.rate, args.duration, args.connections)
        latencies, statuses = hey_latencies(checks, args.duration * 3 + 60)
        p50, p99, top = (percentile(latencies, q) for q in (0.5, 0.99, 1.0))
        print(
            f"{'host floor (nginx 204)':28} check p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {top:7.1f} ms  "
            f"{len(latencies) / args.duration:6.0f} req/s  {statuses}",
            flush=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(label: str, args: argparse.Namespace, work: Path, tree: Path | None) -> dict[str, dict[str, Any]]:
    print(f"== {label}", flush=True)
    started = time.perf_counter()
    serve = start(work, tree)
    print(f"ready in {time.perf_counter() - started:.2f} s (start of the process to /readyz 200)", flush=True)
    try:
        quiet = phase(serve, args, ingest=False)
        report("no ingest", quiet)
        busy = phase(serve, args, ingest=True)
        report(f"ingest {args.events:g} events/s", busy)
    finally:
        serve.stop()
    return {"quiet": quiet, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="checks per second (hey, all workers)")
    parser.add_argument("--events", type=float, default=2000, help="events per second POSTed")
    parser.add_argument("--batch", type=int, default=10, help="events per POST")
    parser.add_argument("--duration", type=float, default=15, help="seconds of measured checks per phase")
    parser.add_argument("--connections", type=int, default=8, help="hey workers")
    parser.add_argument("--baseline", default="none", help="also the daemon of this commit, first (e.g. main)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-check-ingest")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install -y hey")
    sys.path.insert(0, str(REPO))
    print(
        f"check_ingest: GET /v1/check at {args.rate:g} req/s (hey, {args.connections} workers) "
        f"for {args.duration:g} s, "
        f"alone and while {args.events:g} events/s are POSTed ({args.batch} per POST); {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    floor(args, args.workdir / "floor")
    with contextlib.ExitStack() as stack:
        if args.baseline != "none":
            commit, tree = stack.enter_context(baseline_worktree(args.baseline))
            args.workdir.mkdir(parents=True, exist_ok=True)
            print(f"baseline daemon imports {imported_from(tree, args.workdir)}")
            run(f"baseline {commit} ({args.baseline})", args, args.workdir / "baseline", tree)
        run(f"current {describe_current()}", args, args.workdir / "current", None)


if __name__ == "__main__":
    main()
