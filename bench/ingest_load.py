"""Open-loop ingest load for bench/check_ingest.py: POST /v1/usage at a fixed rate of events, in its own process.

One asyncio loop with prebuilt request bytes (every event a distinct request_id) and a minimal HTTP/1.1 reader. A
POST of `batch` events is due every batch/rate s and takes an idle keep-alive connection (opening another when all
are busy, up to 64). Prints one JSON document: {"posts", "accepted", "statuses", "ms": [...], "wall_s", "cpu_s"}.

Usage: python bench/ingest_load.py HOST PORT EVENTS_PER_S DURATION BATCH TOKEN
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import uuid
from datetime import UTC, datetime

MAX_CONNECTIONS = 64


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _bodies(count: int, batch: int) -> list[bytes]:
    """`count` POST bodies of `batch` events each: users spread over 500, models over three, today's time."""
    prefix = uuid.uuid4().hex[:10]
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    models = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5")
    out = []
    for post in range(count):
        events = []
        for k in range(batch):
            n = post * batch + k
            events.append({
                "request_id": f"load-{prefix}-{n}", "timestamp": now, "model": models[n % 3],
                "usage": {"input_tokens": 300 + n % 700, "output_tokens": 40 + n % 400, "cache_read_input_tokens": 512},
                "latency_ms": 800 + n % 900, "status": 200,
                "attributes": {"project": "load", "user": f"l-{n % 500}", "feature": "chat"},
            })  # fmt: skip
        out.append(json.dumps(events if batch > 1 else events[0]).encode())
    return out


async def run(host: str, port: int, rate: float, duration: float, batch: int, token: str) -> dict:
    posts = max(1, int(rate * duration / batch))
    bodies = _bodies(posts, batch)
    head = (
        f"POST /v1/usage HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
    )
    requests = [(head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    ms: list[float] = []
    statuses: dict[str, int] = {}
    accepted = 0

    async def one(request: bytes, due: float) -> None:
        nonlocal opened, accepted
        if idle:
            reader, writer = idle.pop()
        elif opened < MAX_CONNECTIONS:
            opened += 1
            reader, writer = await asyncio.open_connection(host, port)
        else:
            statuses["skipped"] = statuses.get("skipped", 0) + 1
            return
        try:
            writer.write(request)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in answer.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
        except Exception as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            opened -= 1
            writer.close()
            return
        ms.append((time.perf_counter() - due) * 1000)
        status = answer[9:12].decode()
        statuses[status] = statuses.get(status, 0) + 1
        if status == "202":
            accepted += json.loads(body)["accepted"]
        idle.append((reader, writer))

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    cpu0 = _cpu()
    start = time.perf_counter() + 0.05
    for i, request in enumerate(requests):
        due = start + i * batch / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = loop.create_task(one(request, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    wall = time.perf_counter() - start
    return {"posts": len(ms), "accepted": accepted, "statuses": statuses, "ms": ms, "wall_s": wall,
            "cpu_s": _cpu() - cpu0}  # fmt: skip


def main() -> None:
    host, port, rate, duration, batch, token = sys.argv[1:7]
    result = asyncio.run(run(host, int(port), float(rate), float(duration), int(batch), token))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
