"""Benchmark: `claude-monitor ingest` of N simulated events into SQLite, next to a plain sqlite3 baseline.

The baseline reads the same JSONL file, decodes each line and `executemany`s the same columns into a table of
the same shape (same unique key and indexes, WAL, same batch size) with plain `sqlite3`: no validation, no
pricing, no ORM. Both run in fresh processes, one after the other, in the same run of this script, and print
events/s and peak resident memory (from the kernel's rusage of each process, and the peak of the sum over the process
and its children, sampled), and claude-monitor's events/s as a fraction of the baseline's. `ingest` runs as a user
runs it: on more than one core and a file this size, with parse processes; `--one-process` adds a run without.
`--budgets N` configures N budgets (a realistic mix, see `budget_config`) that every event is matched against and
counted toward. Usage:

    .venv/bin/python bench/ingest_sqlite.py [--events 1000000] [--budgets 1000] [--one-process] [--workdir .bench]
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
from typing import NamedTuple

BASELINE = r'''
import json, sqlite3, sys
path, db, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL"); con.execute("PRAGMA synchronous=NORMAL")
con.execute("""CREATE TABLE events (id INTEGER PRIMARY KEY, request_id VARCHAR(255) NOT NULL UNIQUE,
  ts DATETIME NOT NULL, received_at DATETIME NOT NULL, source VARCHAR(255) NOT NULL, model_id VARCHAR(255) NOT NULL,
  model VARCHAR(255) NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
  cache_read_tokens BIGINT NOT NULL, cache_write_5m_tokens BIGINT NOT NULL, cache_write_1h_tokens BIGINT NOT NULL,
  web_search_requests INTEGER NOT NULL, web_fetch_requests INTEGER NOT NULL, batch BOOLEAN NOT NULL,
  long_prompt BOOLEAN NOT NULL, service_tier VARCHAR(32), speed VARCHAR(32), inference_geo VARCHAR(32),
  status INTEGER, latency_ms FLOAT, attributes JSON NOT NULL, cost_pico BIGINT, price_version VARCHAR(128))""")
con.execute("CREATE INDEX ix_events_ts ON events (ts)")
con.execute("CREATE INDEX ix_events_model_ts ON events (model, ts)")
sql = ("INSERT INTO events (request_id, ts, received_at, source, model_id, model, input_tokens, output_tokens, "
       "cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, web_search_requests, web_fetch_requests, "
       "batch, long_prompt, service_tier, speed, inference_geo, status, latency_ms, attributes, cost_pico, "
       "price_version) VALUES (" + ",".join("?" * 23) + ") ON CONFLICT (request_id) DO NOTHING")
rows, n = [], 0
def flush():
    con.execute("BEGIN IMMEDIATE"); con.executemany(sql, rows); con.execute("COMMIT"); rows.clear()
with open(path, encoding="utf-8") as f:
    for line in f:
        e = json.loads(line); u = e["usage"]; cc = u.get("cache_creation") or {}; st = u.get("server_tool_use") or {}
        rows.append((e["request_id"], e["timestamp"], e["timestamp"], "bench", e["model"], e["model"],
                     u.get("input_tokens") or 0, u.get("output_tokens") or 0, u.get("cache_read_input_tokens") or 0,
                     cc.get("ephemeral_5m_input_tokens") or 0, cc.get("ephemeral_1h_input_tokens") or 0,
                     st.get("web_search_requests") or 0, st.get("web_fetch_requests") or 0, bool(e.get("batch")),
                     False, u.get("service_tier"), u.get("speed"), u.get("inference_geo"), e.get("status"),
                     e.get("latency_ms"), json.dumps(e.get("attributes") or {}), 0, "bench"))
        n += 1
        if len(rows) >= batch_size:
            flush()
if rows:
    flush()
print(n)
'''


def budget_config(count: int) -> str:
    """YAML for `count` budgets in the mix a large tenant has: traffic-wide, per project, per model, per user of a
    project, per feature, per API key over a rolling hour, and the rest on named heavy users (the simulator's users
    are u-000001 on, the first ones the busiest). Limits are high: nothing throttles, every event is counted."""
    shared = [
        "  - {name: all-monthly, match: {}, window: month, limit_usd: 1000000, alert_at: [0.8], throttle_at: 1.0}",
        "  - {name: lingo-monthly, match: {project: lingo}, window: month, limit_usd: 500000, throttle_at: 1.0}",
        "  - {name: labs-monthly, match: {project: lingo-labs}, window: month, limit_usd: 50000}",
        "  - {name: lingo-user-daily, match: {project: lingo}, per: user, window: day, limit_usd: 1000,"
        " throttle_at: 1.0}",
        "  - {name: labs-user-daily, match: {project: lingo-labs}, per: user, window: day, limit_usd: 1000}",
        "  - {name: feature-monthly, match: {}, per: feature, window: month, limit_tokens: {output: 100000000000}}",
        "  - {name: key-hourly, match: {}, per: api_key, window: 'rolling:1h', limit_requests: 100000000}",
        "  - {name: opus-monthly, match: {model: claude-opus-4-5}, window: month, limit_usd: 100000}",
        "  - {name: sonnet-monthly, match: {model: claude-sonnet-4-5}, window: month, limit_usd: 100000}",
        "  - {name: haiku-weekly, match: {model: claude-haiku-4-5}, window: week, limit_usd: 100000}",
    ]
    lines = ["budgets:", *shared[:count]]
    for i in range(count - len(shared)):
        window = ("day", "month", "rolling:24h")[i % 3]
        limit = "limit_usd: 1000" if i % 2 == 0 else "limit_tokens: {total: 10000000000}"
        lines.append(f"  - {{name: user-{i + 1}, match: {{user: u-{i + 1:06d}}}, window: '{window}', {limit}}}")
    return "\n".join(lines) + "\n" if count else ""


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now (0 for any that is gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/statm", encoding="ascii") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as children:
                    todo.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Measured(NamedTuple):
    """One measured run: wall seconds, peak RSS in bytes (from wait4: the process or a child it waited for), its
    stdout, the CPU seconds (user + system) it and its waited-for children used, and the peak of the RSS of the
    whole process tree together (sampled every 20 ms)."""

    seconds: float
    rss: int
    out: str
    cpu: float
    tree_rss: int


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run a process to its end and measure it (see Measured)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read().decode()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed with exit code {proc.returncode}")
    return Measured(elapsed, usage.ru_maxrss * 1024, out, usage.ru_utime + usage.ru_stime, peak[0])


def main() -> None:
    """Generate the file, run baseline then claude-monitor, print both figures and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workdir", default=".bench")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--budgets", type=int, default=0, help="budgets configured (default 0)")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="also run `ingest --no-parse-process` (everything in one process) in the same run",
    )
    args = parser.parse_args()
    work = Path(args.workdir).resolve() / "ingest_sqlite"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from monitor import simulate

    usage = work / "usage.jsonl"
    t0 = time.perf_counter()
    lines = simulate.generate_events(
        count=args.events, start=datetime(2026, 10, 1, tzinfo=UTC), end=datetime(2026, 11, 1, tzinfo=UTC), seed=11
    )
    with usage.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
    print(
        f"generated {args.events:,} events ({usage.stat().st_size / 2**20:,.0f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    base_s, base_rss, base_out, base_cpu, base_tree = run_measured(
        [sys.executable, "-c", BASELINE, str(usage), str(work / "baseline.db"), str(args.batch_size)]
    )
    assert int(base_out) == args.events

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}

    def ours(name: str, *flags: str) -> tuple[float, int, float, int]:
        config = work / f"{name}.yaml"
        database = work / f"{name}.db"
        config.write_text(f"database_url: sqlite:///{database}\n{budget_config(args.budgets)}", encoding="utf-8")
        seconds, rss, out, cpu, tree = run_measured(
            [
                sys.executable,
                "-m",
                "monitor",
                "ingest",
                str(usage),
                "--format",
                "json",
                "--config",
                str(config),
                "--batch-size",
                str(args.batch_size),
                *flags,
            ],
            env=env,
        )
        summary = json.loads(out)
        assert summary["accepted"] == args.events, summary
        return seconds, rss, cpu, tree

    ours_s, ours_rss, ours_cpu, ours_tree = ours("monitor")
    rows = [
        ("plain sqlite3 executemany (baseline)", args.events / base_s, base_s, base_cpu, base_rss, base_tree),
        ("claude-monitor ingest", args.events / ours_s, ours_s, ours_cpu, ours_rss, ours_tree),
    ]
    if args.one_process:
        one_s, one_rss, one_cpu, one_tree = ours("one-process", "--no-parse-process")
        name = "claude-monitor ingest --no-parse-process"
        rows.append((name, args.events / one_s, one_s, one_cpu, one_rss, one_tree))
    print(
        f"ingest of {args.events:,} simulated events into SQLite (batches of {args.batch_size:,}, "
        f"{args.budgets:,} budgets)"
    )
    print(f"{'':42} {'events/s':>10} {'seconds':>9} {'CPU s':>8} {'peak RSS MiB':>13} {'all processes':>14}")
    for name, rate, seconds, cpu, rss, tree in rows:
        print(f"{name:42} {rate:10,.0f} {seconds:9.1f} {cpu:8.1f} {rss / 2**20:13.1f} {tree / 2**20:14.1f}")
    # On a shared machine the wall-clock ratio moves with what else runs during each phase; the CPU-time ratio
    # (what each needed of the cores) much less. "peak RSS" is the largest single process (the kernel's figure),
    # "all processes" the peak of their sum, sampled: claude-monitor runs parse processes next to its writer.
    print(
        f"claude-monitor / baseline: {base_s / ours_s:.2f}x the events/s, {ours_s / base_s:.2f}x the time, "
        f"{base_cpu / ours_cpu:.2f}x the events per CPU second, {ours_rss / base_rss:.2f}x the peak memory"
        f" ({ours_tree / base_tree:.2f}x for all processes)"
    )


if __name__ == "__main__":
    main()
