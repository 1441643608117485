"""Benchmark: `claude-monitor ingest` of N simulated events into PostgreSQL, next to a raw psycopg COPY baseline.

A throwaway PostgreSQL server (initdb into a temp dir, a free loopback port, fsync off, as the tests start one)
with a fresh database per run. The baseline reads the same JSONL file, decodes each line and COPYs the same columns,
one transaction per batch of the same size, with plain psycopg into a table of the same shape as claude-monitor's
`events` (partitioned by month of ts, the same primary key, indexes and partitions): no validation, no pricing, no
dedup, no counters. A second baseline COPYs into the shape before partitioning (one table, unique request_id) for
the cost of the layout itself. claude-monitor runs with 0 budgets and with 1,000 (bench/serve_bench.py's
`budget_list`, which matches the generated events' projects, API keys, features and models). Every run is a fresh
process, one after the other, in the same run of this script; each prints events/s and its peak resident memory
(the kernel's rusage of that process; the server's memory is not in it), and the CPU seconds the server spent on
it (from /proc: the postmaster, its live and its exited children). Usage:

    .venv/bin/python bench/ingest_postgres.py [--events 1000000] [--budgets 0,1000] [--workdir .bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
START, END = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)  # two month partitions
USERS = 100_000

BASELINE = r'''
import json, sys, psycopg
path, url, batch_size, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
con = psycopg.connect(url)
columns = ("request_id, ts, received_at, source, model_id, model, input_tokens, output_tokens, cache_read_tokens, "
           "cache_write_5m_tokens, cache_write_1h_tokens, web_search_requests, web_fetch_requests, batch, long_prompt, "
           "service_tier, speed, inference_geo, status, latency_ms, attributes, cost_pico, price_version")
con.execute("""CREATE TABLE events (id BIGSERIAL NOT NULL, request_id VARCHAR(255) NOT NULL,
  ts TIMESTAMP NOT NULL, received_at TIMESTAMP NOT NULL, source VARCHAR(255) NOT NULL, model_id VARCHAR(255) NOT NULL,
  model VARCHAR(255) NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
  cache_read_tokens BIGINT NOT NULL, cache_write_5m_tokens BIGINT NOT NULL, cache_write_1h_tokens BIGINT NOT NULL,
  web_search_requests INTEGER NOT NULL, web_fetch_requests INTEGER NOT NULL, batch BOOLEAN NOT NULL,
  long_prompt BOOLEAN NOT NULL, service_tier VARCHAR(32), speed VARCHAR(32), inference_geo VARCHAR(32),
  status INTEGER, latency_ms FLOAT, attributes JSON NOT NULL, cost_pico BIGINT, price_version VARCHAR(128))"""
  + (" PARTITION BY RANGE (ts)" if shape == "partitioned" else ""))
if shape == "partitioned":
    con.execute("ALTER TABLE events ADD PRIMARY KEY (id, ts)")
    con.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    for month, end in (("2026-10-01", "2026-11-01"), ("2026-11-01", "2026-12-01")):
        con.execute(f"CREATE TABLE events_p{month[:7].replace('-', '')} PARTITION OF events "
                    f"FOR VALUES FROM ('{month}') TO ('{end}')")
else:
    con.execute("ALTER TABLE events ADD PRIMARY KEY (id)")
    con.execute("ALTER TABLE events ADD UNIQUE (request_id)")
con.execute("CREATE INDEX ix_events_ts ON events (ts)")
con.execute("CREATE INDEX ix_events_model_ts ON events (model, ts)")
con.commit()
rows, n = [], 0
def flush():
    with con.cursor() as cur, cur.copy(f"COPY events ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    con.commit(); rows.clear()
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


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a process; return wall seconds, its own peak RSS in bytes (from wait4) and its stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed with exit code {proc.returncode}")
    return elapsed, usage.ru_maxrss * 1024, out


def server_cpu_seconds(data: Path) -> float:
    """CPU seconds the PostgreSQL server has used so far: the postmaster's own and its reaped children's (backends
    that exited), plus its live children's (checkpointer, writers, open sessions)."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    own = fields(postmaster)  # after the command name: state is [0], utime [11], stime [12], cutime [13], cstime [14]
    total = sum(int(value) for value in own[11:15])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = fields(int(entry.name))
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                total += int(stat[11]) + int(stat[12])
    return total / tick


def settled_cpu(server: Any, database: str) -> float:
    """The server's CPU seconds once the benchmarked process's session has ended (its backend's CPU is counted
    when the postmaster reaps it)."""
    deadline = time.monotonic() + 10
    while server.sessions(database) and time.monotonic() < deadline:
        time.sleep(0.05)
    return server_cpu_seconds(server.data)


def main() -> None:
    """Generate the file, start a server, run the baselines then claude-monitor, print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--budgets", default="0,1000", help="comma-separated budget counts, one claude-monitor run each"
    )
    parser.add_argument("--workdir", default=".bench")
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    work = Path(args.workdir).resolve() / "ingest_postgres"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    from serve_bench import budget_list, events_between

    from tests.pg import PostgresServer, find_bin_dir, unavailable_reason

    usage = work / "usage.jsonl"
    t0 = time.perf_counter()
    with usage.open("w", encoding="utf-8") as out:
        for line in events_between(args.events, START, END, USERS, 11, "pg"):
            out.write(line + "\n")
    print(
        f"generated {args.events:,} events ({usage.stat().st_size / 2**20:,.0f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    reason = unavailable_reason()
    bin_dir = find_bin_dir()
    if reason is not None or bin_dir is None:
        raise SystemExit(f"no PostgreSQL server can be started here: {reason}")
    server = PostgresServer(bin_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its server (finally)
    results: list[tuple[str, float, int, float]] = []
    try:
        server.start()
        for shape, name in (
            ("partitioned", "raw psycopg COPY, same partitioned shape (baseline)"),
            ("unpartitioned", "raw psycopg COPY, one table, unique request_id"),
        ):
            url = server.create_database("baseline").replace("postgresql+psycopg://", "postgresql://")
            cpu = server_cpu_seconds(server.data)
            seconds, rss, out = run_measured(
                [sys.executable, "-c", BASELINE, str(usage), url, str(args.batch_size), shape]
            )
            assert int(out) == args.events
            results.append((name, seconds, rss, settled_cpu(server, url.rsplit("/", 1)[1]) - cpu))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
        for count in (int(part) for part in args.budgets.split(",")):
            config = work / f"claude-monitor-{count}.yaml"
            database_url = server.create_database("monitor")
            text = {"database_url": database_url, "budgets": budget_list(count)}
            config.write_text(yaml.safe_dump(text, sort_keys=False), encoding="utf-8")
            base, batch = [sys.executable, "-m", "monitor"], str(args.batch_size)
            subprocess.run([*base, "migrate", "--config", str(config)], env=env, check=True, capture_output=True)
            cpu = settled_cpu(server, database_url.rsplit("/", 1)[1])
            seconds, rss, out = run_measured(
                [*base, "ingest", str(usage), "--format", "json", "--config", str(config), "--batch-size", batch],
                env=env,
            )
            summary = json.loads(out)
            assert summary["accepted"] == args.events, summary
            cpu = settled_cpu(server, database_url.rsplit("/", 1)[1]) - cpu
            results.append((f"claude-monitor ingest, {count:,} budgets", seconds, rss, cpu))
    finally:
        server.destroy()

    print(f"ingest of {args.events:,} simulated events into PostgreSQL (batches of {args.batch_size:,})")
    print(f"{'':52} {'events/s':>10} {'seconds':>9} {'peak RSS MiB':>13} {'server CPU s':>13}")
    for name, seconds, rss, cpu in results:
        print(f"{name:52} {args.events / seconds:10,.0f} {seconds:9.1f} {rss / 2**20:13.1f} {cpu:13.1f}")
    _, base_s, base_rss, base_cpu = results[0]
    for name, seconds, rss, cpu in results[1:]:
        print(
            f"{name} / baseline: {base_s / seconds:.2f}x the rate, {rss / base_rss:.2f}x the peak memory, "
            f"{cpu / base_cpu:.2f}x the server CPU"
        )


if __name__ == "__main__":
    main()
