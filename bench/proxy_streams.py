"""Benchmark: 500 concurrent streaming calls through `claude-monitor proxy`, next to the same calls made directly.

What runs, each piece its own process on 127.0.0.1:
- a fake Anthropic (a small asyncio server in this file): answers every POST /v1/messages with a server-sent event
  stream in Anthropic's order that lasts `--stream-seconds` (default 10; a text delta every `--interval` s);
- a real `serve` (the proxy checks every call with it and records every call's usage there);
- the proxy (`claude-monitor proxy --config`), between the load and the fake, failing open;
- the load: another interpreter running an asyncio client that opens `--streams` (default 500) connections at once,
  each sending one `stream: true` POST /v1/messages (`Connection: close`) and reading the stream to its end.
First the load calls the fake directly, then through the proxy of this checkout (and, with `--baseline REV`, through
the proxy of that commit, from a temporary git worktree, run with this interpreter and PYTHONPATH; its `serve` too).

    .venv/bin/python bench/proxy_streams.py [--streams 500] [--stream-seconds 10] [--baseline REV] [--workdir .bench]

Reading it: per path, how many streams ended complete (200 and `message_stop` with the final chunk), time to first
byte (connect included: a short listen backlog shows here as SYN retries of 1 s and more) and total time, p50 and
p99, from each call's own start; and for the proxy its resident memory before the load and at its peak, and its
peak thread count (sampled every 50 ms from /proc/<pid>/status). "added" rows are proxy minus direct: what the
proxy costs a caller. `recorded` counts the calls the daemon stored plus those spooled to proxy-spool.jsonl. A call
that failed counts in the total time at the moment it failed: one cut off by the load's own per-call timeout
(3 x the stream's length + 60 s) caps total p99 at that timeout, and is named in the last column.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worktree import REPO, baseline_worktree, describe_current, imported_from

PROXY_KEY = "sk-ant-bench-proxy-side-key-0123456789"
CLIENT_KEY = "bench-client-key-0123456789abcdef"

FAKE = r"""
import asyncio, itertools, json, sys, uuid
seconds, interval = float(sys.argv[1]), float(sys.argv[2])
ids = itertools.count()
prefix = uuid.uuid4().hex[:8]

def usage(output):
    return {"input_tokens": 100, "output_tokens": output, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "service_tier": "standard"}

async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        while (await reader.readline()).strip():
            pass
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return headers, json.loads(body or b"{}")

async def handle(reader, writer):
    try:
        while True:
            headers, request = await read_request(reader)
            request_id = f"req_bench_{prefix}_{next(ids)}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                         b"Cache-Control: no-cache\r\nrequest-id: " + request_id.encode()
                         + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            def event(name, data):
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            model = request.get("model", "claude-haiku-4-5")
            event("message_start", {"type": "message_start", "message": {
                "id": "msg_" + request_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage(1)}})
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})
            await writer.drain()
            deltas = max(1, round(seconds / interval))
            for i in range(deltas):
                await asyncio.sleep(interval)
                event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": f"word {i} "}})
                await writer.drain()
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                    "stop_sequence": None}, "usage": {"output_tokens": 2 * deltas}})
            event("message_stop", {"type": "message_stop"})
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if headers.get(b"connection") == b"close":
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(f"serving on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

LOAD = r"""
import asyncio, json, sys, time
host, port, streams, key, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
body = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 256, "stream": True,
                   "messages": [{"role": "user", "content": "Ist der Satz richtig?"}]}).encode()

async def one(i, go):
    await go.wait()
    started = time.perf_counter()
    first = None
    data = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"POST /v1/messages HTTP/1.1\r\nHost: {host}:{port}\r\nx-api-key: {key}\r\n"
                f"anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\nX-App-User: u-{i % 50}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
            while chunk := await reader.read(65536):
                if first is None:
                    first = time.perf_counter() - started
                data += chunk
            writer.close()
    except Exception as exc:
        return {"error": type(exc).__name__, "first": first, "total": time.perf_counter() - started}
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none"
    complete = status == "200" and b"message_stop" in data and data.endswith(b"0\r\n\r\n")
    return {"status": status, "complete": complete, "first": first, "total": time.perf_counter() - started}

async def main():
    go = asyncio.Event()
    tasks = [asyncio.create_task(one(i, go)) for i in range(streams)]
    await asyncio.sleep(0.2)
    go.set()
    print(json.dumps(await asyncio.gather(*tasks)))

asyncio.run(main())
"""


# --- processes -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake(stream_seconds: float, interval: float) -> tuple[subprocess.Popen[str], int]:
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE, str(stream_seconds), str(interval)], stdout=subprocess.PIPE, text=True
    )
    assert fake.stdout is not None
    return fake, int(fake.stdout.readline().rsplit(":", 1)[1])


def start_serve(work: Path, pythonpath: Path) -> Any:
    """A real daemon with one per-user budget (large), for the proxy's checks and records."""
    from tests.serve_harness import Serve

    work.mkdir(parents=True, exist_ok=True)
    config = work / "claude-monitor.yaml"
    config.write_text(
        f"database_url: sqlite:///{work / 'monitor.db'}\n"
        'http: {listen: "127.0.0.1:0"}\n'
        f"throttle: {{snapshot_file: {work / 'throttle.json'}}}\n"
        "budgets:\n"
        "  - {name: per-user-daily, match: {project: bench}, per: user, window: day, limit_usd: 1000, "
        "throttle_at: 1.0}\n",
        encoding="utf-8",
    )
    return Serve(config, work, {"PYTHONPATH": str(pythonpath)})


def proxy_yaml(work: Path, port: int, upstream_port: int, monitor_url: str, clients: bool) -> str:
    text = (
        f"throttle: {{snapshot_file: {work / 'throttle.json'}}}\n"
        "proxy:\n"
        f'  listen: "127.0.0.1:{port}"\n'
        f'  upstream: "http://127.0.0.1:{upstream_port}"\n'
        "  api_key_env: BENCH_PROXY_ANTHROPIC_KEY\n"
        f'  monitor_url: "{monitor_url}"\n'
        "  fail_mode: open\n"
    )
    if clients:  # the proxy that authenticates its callers
        return text + (
            "  clients:\n"
            "    - name: bench\n"
            "      key_env: BENCH_PROXY_CLIENT_KEY\n"
            "      attributes: {project: bench}\n"
            "      identity: {headers: {X-App-User: user}}\n"
        )
    return text + "  identity: {headers: {X-App-User: user}}\n"


def start_proxy(
    work: Path, pythonpath: Path, upstream_port: int, monitor_url: str
) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m monitor proxy` of that tree: with `clients:` where it knows the key, else with `identity:`."""
    from tests.serve_harness import TOKEN

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_MONITOR_", "ANTHROPIC_"))}
    env.update({"BENCH_PROXY_ANTHROPIC_KEY": PROXY_KEY, "BENCH_PROXY_CLIENT_KEY": CLIENT_KEY,
                "CLAUDE_MONITOR_INGEST_TOKEN": TOKEN, "PYTHONPATH": str(pythonpath)})  # fmt: skip
    for clients in (True, False):
        port = free_port()
        config = work / "proxy.yaml"
        config.write_text(proxy_yaml(work, port, upstream_port, monitor_url, clients), encoding="utf-8")
        log = (work / "proxy.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "proxy", "--config", str(config)],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            raise SystemExit(f"the proxy did not start:\n{(work / 'proxy.log').read_text(errors='replace')}")
    raise SystemExit(f"the proxy refused both configs:\n{(work / 'proxy.log').read_text(errors='replace')}")


def status_of(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, Threads) of a live process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


class Sampler(threading.Thread):
    """Peak RSS and thread count of a process, sampled every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.before = status_of(pid)
        self.peak_rss, self.peak_threads = self.before
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            try:
                rss, threads = status_of(self.pid)
            except (OSError, KeyError):
                return
            self.peak_rss, self.peak_threads = max(self.peak_rss, rss), max(self.peak_threads, threads)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- measuring -----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    calls: list[dict[str, Any]]
    rss_before_kib: int | None = None
    rss_peak_kib: int | None = None
    threads_before: int | None = None
    threads_peak: int | None = None
    recorded: int | None = None
    notes: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return sorted(call[key] for call in self.calls if call.get(key) is not None)

    @property
    def complete(self) -> int:
        return sum(1 for call in self.calls if call.get("complete"))


def load(port: int, streams: int, stream_seconds: float) -> list[dict[str, Any]]:
    """Run the load process; one result per stream."""
    timeout = stream_seconds * 3 + 60
    out = subprocess.run(
        [sys.executable, "-c", LOAD, "127.0.0.1", str(port), str(streams), CLIENT_KEY, str(timeout)],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout + 60,
    ).stdout
    calls: list[dict[str, Any]] = json.loads(out)
    return calls


def through_proxy(name: str, tree: Path, work: Path, fake_port: int, streams: int, stream_seconds: float) -> Result:
    """A fresh daemon and proxy of `tree`, the load through them, the proxy sampled throughout."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    imported_from(tree, work)
    serve = start_serve(work / "serve", tree)
    proxy = None
    try:
        proxy, port = start_proxy(work, tree, fake_port, serve.url)
        sampler = Sampler(proxy.pid)
        sampler.start()
        try:
            calls = load(port, streams, stream_seconds)
        finally:
            sampler.stop()
        result = Result(name, calls, sampler.before[0], sampler.peak_rss, sampler.before[1], sampler.peak_threads)
        time.sleep(1)  # records still on their way after the last byte
        with sqlite3.connect(work / "serve" / "monitor.db") as database:
            stored = database.execute("SELECT count(*) FROM events").fetchone()[0]
        spool = work / "proxy-spool.jsonl"
        spooled = len(spool.read_text().splitlines()) if spool.exists() else 0
        result.recorded = stored + spooled
        if spooled:
            result.notes.append(f"{spooled} spooled")
        return result
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(60)
            except subprocess.TimeoutExpired:
                proxy.kill()
        serve.stop()


# --- the report ----------------------------------------------------------------------------------------------------


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))]


def figures(result: Result) -> tuple[float, float, float, float]:
    """TTFB p50, p99 (ms) and total p50, p99 (s)."""
    first, total = result.values("first"), result.values("total")
    return (percentile(first, 0.5) * 1000, percentile(first, 0.99) * 1000,
            percentile(total, 0.5), percentile(total, 0.99))  # fmt: skip


def row(result: Result, streams: int) -> str:
    f50, f99, t50, t99 = figures(result)
    memory = (
        f"{result.rss_before_kib / 1024:6.0f} {result.rss_peak_kib / 1024:6.0f} "
        f"{result.threads_before:5d} {result.threads_peak:6d}"
        if result.rss_peak_kib is not None and result.rss_before_kib is not None
        and result.threads_before is not None and result.threads_peak is not None
        else f"{'-':>6} {'-':>6} {'-':>5} {'-':>6}"
    )  # fmt: skip
    recorded = "-" if result.recorded is None else f"{result.recorded}"
    errors: dict[str, int] = {}
    for call in result.calls:
        if not call.get("complete"):
            reason = call.get("error") or f"status {call.get('status')}"
            errors[reason] = errors.get(reason, 0) + 1
    notes = result.notes + [f"{count} x {reason}" for reason, count in sorted(errors.items())]
    return (
        f"{result.name:30} {result.complete:4d}/{streams:<4d} {f50:9.1f} {f99:9.1f} {t50:9.2f} {t99:9.2f} "
        f"{memory} {recorded:>8}  {'; '.join(notes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="how long each upstream stream lasts")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between the fake's text deltas")
    parser.add_argument("--baseline", default="none", help="also through the proxy of this commit (e.g. HEAD~1)")
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * args.streams + 256:  # children inherit it: the proxy holds two sockets per stream
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * args.streams + 256), hard))
    work = Path(args.workdir).resolve() / "proxy_streams"
    print(
        f"proxy_streams: {args.streams} concurrent streaming POST /v1/messages, each stream {args.stream_seconds:g} s "
        f"(a delta every {args.interval:g} s); {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        flush=True,
    )
    fake, fake_port = start_fake(args.stream_seconds, args.interval)
    results: list[Result] = []
    try:
        with ExitStack() as stack:
            trees = [(f"proxy {describe_current()}", REPO)]
            if args.baseline != "none":
                commit, tree = stack.enter_context(baseline_worktree(args.baseline))
                trees.insert(0, (f"proxy {commit} ({args.baseline})", tree))
            print("[proxy_streams] direct to the fake ...", file=sys.stderr, flush=True)
            results.append(Result("direct (fake Anthropic)", load(fake_port, args.streams, args.stream_seconds)))
            for name, tree in trees:
                print(f"[proxy_streams] through {name} ...", file=sys.stderr, flush=True)
                label = "baseline" if tree != REPO else "current"
                results.append(through_proxy(name, tree, work / label, fake_port, args.streams, args.stream_seconds))
    finally:
        fake.terminate()
        fake.wait(10)

    print(
        f"{'path':30} {'complete':>9} {'TTFB p50':>9} {'TTFB p99':>9} {'total p50':>9} {'total p99':>9} "
        f"{'RSS MiB':>13} {'threads':>12} {'recorded':>8}"
    )
    print(f"{'':30} {'':>9} {'ms':>9} {'ms':>9} {'s':>9} {'s':>9} {'before':>6} {'peak':>6} {'before':>5} {'peak':>6}")
    for result in results:
        print(row(result, args.streams))
    direct = figures(results[0])
    for result in results[1:]:
        f50, f99, t50, t99 = (mine - theirs for mine, theirs in zip(figures(result), direct, strict=True))
        grown = ((result.rss_peak_kib or 0) - (result.rss_before_kib or 0)) / 1024
        print(
            f"added by {result.name}: TTFB p50 {f50:+.1f} ms, p99 {f99:+.1f} ms; total p50 {t50 * 1000:+.0f} ms, "
            f"p99 {t99 * 1000:+.0f} ms; the proxy grew by {grown:.0f} MiB and {result.threads_peak} threads at peak"
        )


if __name__ == "__main__":
    main()
