"""Open-loop load for bench/admit_bench.py: admit+release pairs (or GET /v1/check) at a fixed rate, in its own process.

One asyncio loop (uvloop when installed) with prebuilt request bytes and a minimal HTTP/1.1 reader, so the generator
costs a small part of a core at thousands of requests a second; it reports its own CPU next to the latencies. Each
pair is due at start + i/rate and takes an idle keep-alive connection (opening another when all are busy, up to
`--max-connections`); admit latency runs from the due time, so a stall of the daemon or of this process is not hidden
by the requests it delays. The release is sent as soon as the admit answers; its latency runs from its own send.

Prints one JSON document: {"admit": [ms...], "release": [ms...], "statuses": {...}, "cpu_s", "wall_s", "completed",
"connections"}. Usage: python bench/admit_load.py HOST PORT RATE DURATION MODE USERS_FILE [MAX_CONNECTIONS]
(MODE: pairs | check).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

TOKEN = "bench-token"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read one response (Content-Length bodies only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def ask(self, request: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(10):
            return await self._ask(request)

    async def _ask(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        body = await self.reader.readexactly(length) if length else b""
        return status, body


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run(host: str, port: int, rate: float, duration: float, mode: str, users: list[str], most: int) -> dict:
    total = int(rate * duration)
    admit_ms: list[float] = []
    release_ms: list[float] = []
    statuses: dict[str, int] = {}
    idle: list[Connection] = []
    opened = 0

    async def connect() -> Connection:
        nonlocal opened
        opened += 1
        reader, writer = await asyncio.open_connection(host, port)
        return Connection(reader, writer)

    for _ in range(min(16, most)):
        idle.append(await connect())
    free = asyncio.Condition()

    async def take() -> Connection:
        if idle:
            return idle.pop()
        if opened < most:
            return await connect()
        async with free:
            await free.wait_for(lambda: bool(idle))
            return idle.pop()

    async def give(conn: Connection) -> None:
        idle.append(conn)
        if opened >= most:
            async with free:
                free.notify()

    def count(status: int | str) -> None:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    async def one(i: int, due: float) -> None:
        nonlocal opened
        user = users[i % len(users)]
        conn = await take()
        try:
            if mode == "check":
                query = f"project=lingo&user={user}&model=claude-haiku-4-5"
                status, _ = await conn.ask(f"GET /v1/check?{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                admit_ms.append((time.perf_counter() - due) * 1000)
                count(status)
                await give(conn)
                return
            body = (
                b'{"attributes":{"project":"lingo","user":"' + user.encode() + b'"},"model":"claude-haiku-4-5",'
                b'"max_tokens":500,"estimated_input_tokens":2000}'
            )
            status, answer = await conn.ask(_post("/v1/admit", body))
            t1 = time.perf_counter()
            admit_ms.append((t1 - due) * 1000)
            if status != 200:
                count(status)
                await give(conn)
                return
            lease = json.loads(answer)["lease"]
            body = (
                b'{"lease":"' + lease.encode() + b'","request_id":null,'
                b'"usage":{"input_tokens":900,"output_tokens":200}}'
            )
            status, _ = await conn.ask(_post("/v1/release", body))
            release_ms.append((time.perf_counter() - t1) * 1000)
            count(status)
        except Exception as exc:  # a broken connection is dropped, the error counted
            count(type(exc).__name__)
            opened -= 1
            conn.writer.close()
            return
        await give(conn)

    loop = asyncio.get_running_loop()
    tasks = set()
    cpu0 = _cpu()
    start = time.perf_counter() + 0.1
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    wall = time.perf_counter() - start
    return {
        "admit": admit_ms,
        "release": release_ms,
        "statuses": statuses,
        "cpu_s": _cpu() - cpu0,
        "wall_s": wall,
        "completed": len(admit_ms),
        "connections": opened,
    }


def main() -> None:
    host, port, rate, duration, mode, users_file = sys.argv[1:7]
    most = int(sys.argv[7]) if len(sys.argv) > 7 else 256
    with open(users_file, encoding="utf-8") as f:
        users = f.read().split()
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(host, int(port), float(rate), float(duration), mode, users, most))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
