"""Benchmark: peak memory of `claude-monitor ingest` as the event count grows, and budget evaluation time on a store
of N events next to one of N/10.

Three stores, each a fresh SQLite database filled by `claude-monitor ingest` reading a named pipe that a separate
generator process writes simulated events into (no 6 GB file on disk): N/10 events over a month, N/10 events at
N's rate over the month's last days (the same traffic in every current window, a tenth of the history), and N events
over the month. Peak resident memory is the kernel's rusage of the ingest process. Then another process opens each
store with the clock at the month's last hour and times a full evaluation of the budgets (the median of
`--evaluations` runs): evaluation reads the per-scope counters, not the events, so its time follows the
number of scopes with usage in the current windows (printed, with the time per scope) rather than the number of
events stored. Usage:

    .venv/bin/python bench/ingest_scale.py [--events 10000000] [--small 1000000] [--budgets 1000] [--workdir .bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from ingest_sqlite import budget_config, run_measured

REPO = Path(__file__).resolve().parents[1]

GENERATE = r"""
import sys
from datetime import UTC, datetime
from monitor import simulate
count, path, start = int(sys.argv[1]), sys.argv[2], datetime.fromisoformat(sys.argv[3])
lines = simulate.generate_events(count=count, start=start, end=datetime(2026, 11, 1, tzinfo=UTC), seed=11)
with open(path, "w", encoding="utf-8") as out:
    for line in lines:
        out.write(line + "\n")
"""

EVALUATE = r"""
import json, statistics, sys, time
from datetime import UTC, datetime
from pathlib import Path
from monitor.config import load_settings
from monitor.service import open_store
config, runs = Path(sys.argv[1]), int(sys.argv[2])
now = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
store = open_store(load_settings(config), clock=lambda: now, migrate=False)
try:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        stats = store.budgets.evaluate()
        times.append(time.perf_counter() - started)
    scopes = stats.scopes
finally:
    store.close()
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "scopes": scopes}))
"""


MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 11, 1, tzinfo=UTC)


def measure(size: int, budgets: int, work: Path, evaluations: int, start: datetime = MONTH_START) -> dict[str, float]:
    """Ingest `size` events (spread from `start` to the month's end) through a pipe into a fresh database; peak
    RSS, time, evaluation time."""
    work.mkdir(parents=True)
    pipe = work / "usage.jsonl"
    os.mkfifo(pipe)
    config = work / "claude-monitor.yaml"
    config.write_text(f"database_url: sqlite:///{work / 'monitor.db'}\n{budget_config(budgets)}", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
    env["PYTHONPATH"] = str(REPO)
    generator = subprocess.Popen([sys.executable, "-c", GENERATE, str(size), str(pipe), start.isoformat()], env=env)
    failed: list[int] = []
    waiter = threading.Thread(target=lambda: failed.append(generator.wait()))
    waiter.start()
    seconds, rss, out, _, _ = run_measured(
        [sys.executable, "-m", "monitor", "ingest", str(pipe), "--format", "json", "--config", str(config)], env=env
    )
    waiter.join()
    if failed != [0]:
        raise SystemExit(f"the generator failed with exit code {failed}")
    summary = json.loads(out)
    assert summary["accepted"] == size, summary
    evaluated = run_measured([sys.executable, "-c", EVALUATE, str(config), str(evaluations)], env=env).out
    result = json.loads(evaluated)
    db_bytes = sum(f.stat().st_size for f in work.glob("monitor.db*"))
    return {
        "seconds": seconds,
        "rss": rss,
        "evaluation_s": result["median_s"],
        "scopes": result["scopes"],
        "db_bytes": db_bytes,
    }


def main() -> None:
    """Measure both sizes, print the table, the memory goal and the evaluation ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--budgets", type=int, default=1000)
    parser.add_argument("--evaluations", type=int, default=5)
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()
    root = Path(args.workdir).resolve() / "ingest_scale"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    # Three stores: the small and the large count over the whole month (the large one has ten times the traffic:
    # more of the simulated users are active in each window, so more scopes), and the small count at the large
    # one's rate over the month's last days (the same traffic in the windows evaluation reads, a tenth of the
    # history): the first pair shows what more traffic costs, the second what more stored events cost.
    recent = MONTH_END - (MONTH_END - MONTH_START) * (args.small / args.events)
    runs = {
        f"{args.small:,} over the month": (args.small, MONTH_START),
        f"{args.small:,} from {recent:%m-%d %H:%M}": (args.small, recent),
        f"{args.events:,} over the month": (args.events, MONTH_START),
    }
    results = {}
    for index, (name, (size, start)) in enumerate(runs.items()):
        results[name] = measure(size, args.budgets, root / f"run{index}", args.evaluations, start)
        print(
            f"  {name}: ingested in {results[name]['seconds']:,.0f} s ({time.perf_counter() - started:,.0f} s in)",
            file=sys.stderr,
        )
    print(f"ingest through a pipe into SQLite, {args.budgets:,} budgets; evaluation = median of {args.evaluations}")
    print(
        f"{'events':>28} {'events/s':>10} {'peak RSS MiB':>13} {'DB MiB':>8} {'scopes':>8} {'evaluation ms':>14} "
        f"{'us per scope':>13}"
    )
    for name, figures in results.items():
        size = runs[name][0]
        print(
            f"{name:>28} {size / figures['seconds']:10,.0f} {figures['rss'] / 2**20:13.1f} "
            f"{figures['db_bytes'] / 2**20:8,.0f} {figures['scopes']:8,} {figures['evaluation_s'] * 1000:14.1f} "
            f"{figures['evaluation_s'] * 1e6 / max(1, figures['scopes']):13.1f}"
        )
    month, same_rate, large = results.values()
    print(f"peak RSS at {args.events:,} events: {large['rss'] / 2**20:.1f} MiB (goal < 300 MB)")
    for label, small in (("the same month", month), ("the same rate", same_rate)):
        print(
            f"evaluation at {args.events:,} / at {args.small:,} events, {label}: "
            f"{large['evaluation_s'] / small['evaluation_s']:.2f}x (goal <= 1.5x); scopes with usage "
            f"{large['scopes'] / max(1, small['scopes']):.2f}x"
        )
    print("evaluation reads a row per scope and bucket in each window, never the events")


if __name__ == "__main__":
    main()
