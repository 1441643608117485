"""Benchmark: POST /v1/admit + POST /v1/release on PostgreSQL, admission state in the database (1 and 2 replicas)
next to admission in memory, all in the same run.

A throwaway PostgreSQL server (initdb in a temp dir, fsync off, on loopback) and real `serve` processes. Config as
bench/admit_bench.py: a `per: user` daily budget, a budget over all traffic (`lingo-monthly`: one scope every admit
locks, the hot case), and a `per: user` limit (concurrent + requests_per_minute); users already have spend today. Load
comes from bench/admit_load.py in separate processes (one per replica, the rate split evenly), open loop: one pair
(admit, then release with usage) every 1/rate s, admit latency from the due time. Phases, each on a fresh database:

1. `memory`: admission.state: memory, one replica (the baseline: decided in that replica's memory).
2. `database`: admission.state: database, one replica.
3. `database, no global budget`: the same without `lingo-monthly`: what the hot scope's lock costs.
4. `database, 2 replicas`: two `serve` processes on the same database, each sent half of the pairs.

Each phase prints admit and release p50/p99/max, the rate achieved, and the CPU of the daemons, the generators and
PostgreSQL. Usage: .venv/bin/python bench/admit_pg_bench.py [--rate 200] [--duration 10] [--users 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worktree import REPO, describe_current

sys.path.insert(0, str(REPO))

from tests.pg import PostgresServer, find_bin_dir, unavailable_reason

TOKEN = "bench-token"
LOAD = Path(__file__).with_name("admit_load.py")
GLOBAL = "  - {name: lingo-monthly, match: {project: lingo}, window: month, limit_usd: 1000000, throttle_at: 1.0}\n"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _config(workdir: Path, url: str, state: str, hot: bool) -> Path:
    config = workdir / "claude-monitor.yaml"
    config.write_text(
        f"database_url: {url}\n"
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {workdir / 'throttle.json'}}}\n"
        f"admission: {{state: {state}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: lingo}, per: user, window: day, limit_usd: 5, throttle_at: 1.0}\n"
        + (GLOBAL if hot else "")
        + "limits:\n"
        "  - {name: per-user, match: {project: lingo}, per: user, concurrent: 4, requests_per_minute: 600}\n",
        encoding="utf-8",
    )
    return config


def _seed(config: Path, users: int) -> None:
    """One event per user today through the real write path: every user's scope has spend to read."""
    from monitor.config import load_settings
    from monitor.service import open_store

    store = open_store(load_settings(config, environ={}))
    now = datetime.now(UTC).isoformat()
    try:
        for start in range(0, users, 5_000):
            items = []
            for n in range(start, min(users, start + 5_000)):
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
    log_path = workdir / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--config", str(config)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"serving on (http://[\d.]+:\d+)", log_path.read_text(errors="replace"))
        if match:
            url = match.group(1)
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return proc, url
            except OSError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"serve did not start:\n{log_path.read_text()}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu(server: PostgresServer) -> float:
    """CPU of the postmaster's children (the backends and workers): the children's pids from /proc."""
    pid_file = server.data / "postmaster.pid"
    try:
        master = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == master or int(entry.name) == master:
                total += _cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


def _load(urls: list[str], rate: float, duration: float, users_file: Path) -> dict[str, Any]:
    """One admit_load process per replica at rate / replicas each, run at once; their results merged."""
    procs = []
    for url in urls:
        host, port = url.removeprefix("http://").split(":")
        command = [
            sys.executable,
            str(LOAD),
            host,
            port,
            str(rate / len(urls)),
            str(duration),
            "pairs",
            str(users_file),
        ]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    merged: dict[str, Any] = {"admit": [], "release": [], "statuses": {}, "cpu_s": 0.0, "wall_s": 0.0, "completed": 0}
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=duration * 10 + 60)
        except subprocess.TimeoutExpired:  # a generator waiting for answers that never come: say so, stop it
            for other in procs:
                other.kill()
            raise SystemExit("a load generator got no answer for minutes: the daemon is far behind this rate") from None
        if proc.returncode != 0:
            raise SystemExit(f"admit_load.py exited {proc.returncode}")
        result = json.loads(out)
        merged["admit"] += result["admit"]
        merged["release"] += result["release"]
        for status, n in result["statuses"].items():
            merged["statuses"][status] = merged["statuses"].get(status, 0) + n
        merged["cpu_s"] += result["cpu_s"]
        merged["wall_s"] = max(merged["wall_s"], result["wall_s"])
        merged["completed"] += result["completed"]
    return merged


def _line(label: str, values: list[float]) -> str:
    return (
        f"{label:>16}: n={len(values):,} p50={_percentile(values, 0.5):.2f} ms p99={_percentile(values, 0.99):.2f} ms "
        f"max={max(values, default=float('nan')):.2f} ms"
    )


def _phase(
    label: str, server: PostgresServer, workdir: Path, args: argparse.Namespace, state: str, hot: bool, replicas: int
) -> dict[str, float]:
    url = server.create_database("bench")
    dirs = [workdir / f"{label.replace(' ', '-').replace(',', '')}-{i}" for i in range(replicas)]
    for directory in dirs:
        directory.mkdir(parents=True)
    configs = [_config(directory, url, state, hot) for directory in dirs]
    started = time.perf_counter()
    _seed(configs[0], args.users)
    seeded = time.perf_counter() - started
    serves = []
    try:
        for directory, config in zip(dirs, configs, strict=True):
            serves.append(_serve(directory, config))
        users = dirs[0] / "warm.txt"
        users.write_text("\n".join(f"u{n}" for n in range(min(1000, args.users))), encoding="utf-8")
        before = [_cpu_seconds(proc.pid) for proc, _ in serves]
        pg_before = _postgres_cpu(server)
        result = _load([u for _, u in serves], args.rate, args.duration, users)
        daemons = sum(_cpu_seconds(proc.pid) - b for (proc, _), b in zip(serves, before, strict=True))
        pg = _postgres_cpu(server) - pg_before
    finally:
        for proc, _ in serves:
            proc.terminate()
            proc.wait(60)
    wall = result["wall_s"]
    print(f"== {label} (seeded {args.users:,} users in {seeded:.1f} s)")
    print(_line("admit", result["admit"]) + f" statuses={result['statuses']}")
    print(_line("release", result["release"]))
    print(
        f"{'':>16}  achieved {result['completed'] / wall:,.0f} admits/s over {wall:.1f} s; CPU: daemon(s) "
        f"{daemons:.1f} s ({daemons / wall:.0%} of a core), PostgreSQL {pg:.1f} s ({pg / wall:.0%}), generator(s) "
        f"{result['cpu_s']:.1f} s ({result['cpu_s'] / wall:.0%})"
    )
    return {"p50": _percentile(result["admit"], 0.5), "p99": _percentile(result["admit"], 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="admit+release pairs a second, all replicas together")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-admit-pg")
    args = parser.parse_args()
    reason = unavailable_reason()
    bin_dir = find_bin_dir()
    if reason is not None or bin_dir is None:
        raise SystemExit(f"no PostgreSQL to run: {reason}")
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"{describe_current()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(f"{args.rate:.0f} pairs/s for {args.duration:.0f} s each, open loop, users drawn from 1,000")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        memory = _phase("memory", server, args.workdir, args, "memory", True, 1)
        phases = {
            "database": _phase("database", server, args.workdir, args, "database", True, 1),
            "database, no global budget": _phase(
                "database, no global", server, args.workdir, args, "database", False, 1
            ),
            "database, 2 replicas": _phase("database, 2 replicas", server, args.workdir, args, "database", True, 2),
        }
    finally:
        server.destroy()
    print(f"== admit p50 / p99 against memory in this run ({memory['p50']:.2f} / {memory['p99']:.2f} ms)")
    for label, figures in phases.items():
        print(
            f"{label:>28}: p50 {figures['p50']:.2f} ms ({figures['p50'] / memory['p50']:.1f}x), "
            f"p99 {figures['p99']:.2f} ms ({figures['p99'] / memory['p99']:.1f}x)"
        )


if __name__ == "__main__":
    main()
