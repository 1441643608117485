"""Benchmark: POST /v1/admit + POST /v1/release pairs at a fixed rate, next to GET /v1/check in the same run.

A real `serve` on SQLite with a `per: user` daily budget that throttles, a budget over all traffic, and a
`per: user` limit (concurrent + requests_per_minute); 100,000 users already have spend today (100,000 events through
the real write path before the daemon starts). A separate load process (bench/admit_load.py: one asyncio
loop, prebuilt requests) sends, open loop, one pair (admit, then release with usage) every 1/rate s on keep-alive
connections; admit latency runs from the due time, so a stall is not hidden by the requests it delays. Each phase
prints p50/p99/max, the rate achieved, and the CPU seconds the daemon and the generator used (a generator near a
whole core would be measuring itself). Phases, each its own load process:

1. `cold`: each pair for a user not admitted before (the daemon reads that user's spend once: one indexed read).
2. `warm`: users drawn from 1,000 already admitted (decided in memory).
3. `check`: GET /v1/check for the same users at the same rate.

With `--baseline REV` the daemon of that commit runs the same phases first (a temporary git worktree on PYTHONPATH,
its own fresh store), then this checkout's.

Usage: .venv/bin/python bench/admit_bench.py [--rate 1000] [--duration 10] [--users 100000] [--baseline REV]
       [--workdir .bench-admit]
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any

from worktree import REPO, baseline_worktree, describe_current, imported_from

TOKEN = "bench-token"

LOAD = Path(__file__).with_name("admit_load.py")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _seed(workdir: Path, config: Path, users: int, tree: Path | None) -> None:
    """One event per user today through the real write path of the daemon under test (`ingest` of that code, so
    its own schema): every user's scope has spend to read."""
    now = datetime.now(UTC).isoformat()
    seed = workdir / "seed.jsonl"
    with seed.open("w", encoding="utf-8") as out:
        for n in range(users):
            event = {
                "request_id": f"seed-{n}",
                "timestamp": now,
                "model": "claude-haiku-4-5",
                "usage": {"input_tokens": 1000, "output_tokens": 100},
                "attributes": {"project": "lingo", "user": f"u{n}"},
            }
            out.write(json.dumps(event) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
    env["PYTHONPATH"] = str(tree or REPO)
    subprocess.run(
        [sys.executable, "-m", "monitor", "ingest", "--config", str(config), str(seed)],
        env=env,
        cwd=workdir,  # `-m` puts the working directory first on the path: not this checkout's `monitor`
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _serve(workdir: Path, config: Path, tree: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
    env["CLAUDE_MONITOR_INGEST_TOKEN"] = TOKEN
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(url: str, rate: float, duration: float, mode: str, users_file: Path, server: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    before = _cpu_seconds(server)
    out = subprocess.run(
        [sys.executable, str(LOAD), host, port, str(rate), str(duration), mode, str(users_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result["server_cpu_s"] = _cpu_seconds(server) - before
    return result


def _line(label: str, values: list[float]) -> str:
    return (
        f"{label:>13}: n={len(values):,} p50={_percentile(values, 0.5):.2f} ms p99={_percentile(values, 0.99):.2f} ms "
        f"max={max(values, default=float('nan')):.2f} ms"
    )


def _report(name: str, result: dict[str, Any]) -> None:
    label = "check" if name == "check" else f"{name} admit"
    print(_line(label, result["admit"]) + f" statuses={result['statuses']}")
    if result["release"]:
        print(_line(f"{name} release", result["release"]))
    wall = result["wall_s"]
    print(
        f"{'':>13}  achieved {result['completed'] / wall:,.0f}/s over {wall:.1f} s; CPU: daemon "
        f"{result['server_cpu_s']:.1f} s ({result['server_cpu_s'] / wall:.0%} of a core), generator "
        f"{result['cpu_s']:.1f} s ({result['cpu_s'] / wall:.0%}); {result['connections']} connections"
    )


def _run(label: str, args: argparse.Namespace, workdir: Path, tree: Path | None) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = workdir / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{workdir / 'monitor.db'}\n"
        'http: {listen: "127.0.0.1:0"}\nsources: []\n'
        f"throttle: {{snapshot_file: {workdir / 'throttle.json'}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: lingo}, per: user, window: day, limit_usd: 5, throttle_at: 1.0}\n"
        "  - {name: lingo-monthly, match: {project: lingo}, window: month, limit_usd: 1000000, throttle_at: 1.0}\n"
        "limits:\n"
        "  - {name: per-user, match: {project: lingo}, per: user, concurrent: 4, requests_per_minute: 600}\n",
        encoding="utf-8",
    )
    print(f"== {label}")
    started = time.perf_counter()
    _seed(workdir, config, args.users, tree)
    print(f"seeded {args.users:,} users' spend in {time.perf_counter() - started:.1f} s")
    proc, url = _serve(workdir, config, tree)
    try:
        count = int(args.rate * args.duration)
        cold = workdir / "cold.txt"
        cold.write_text("\n".join(f"u{n}" for n in range(min(count, args.users))), encoding="utf-8")
        warm = workdir / "warm.txt"
        warm.write_text("\n".join(f"u{n}" for n in range(1000)), encoding="utf-8")
        print(f"{args.rate:.0f} pairs/s for {args.duration:.0f} s each, open loop, keep-alive connections")
        _report("cold", _load(url, args.rate, args.duration, "pairs", cold, proc.pid))
        _report("warm", _load(url, args.rate, args.duration, "pairs", warm, proc.pid))
        _report("check", _load(url, args.rate, args.duration, "check", warm, proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--baseline", default="none", help="also the daemon of this commit, first (e.g. main)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-admit")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with contextlib.ExitStack() as stack:
        if args.baseline != "none":
            commit, tree = stack.enter_context(baseline_worktree(args.baseline))
            args.workdir.mkdir(parents=True, exist_ok=True)
            print(f"baseline daemon imports {imported_from(tree, args.workdir)}")
            _run(f"baseline {commit} ({args.baseline})", args, args.workdir / "baseline", tree)
        _run(f"current {describe_current()}", args, args.workdir / "current", None)


if __name__ == "__main__":
    main()
