"""Group commit: concurrent ingest requests written in one transaction, each still answered for itself.

The unit tests drive `GroupCommit` with a write function held on an event, so which requests share a call is
decided by the test, not by timing. The end-to-end tests run a real `serve` over HTTP: one holds SQLite's write
lock from the test (so the daemon's writer is provably busy while the other requests queue), the other posts from
many threads at once with overlapping request ids.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from monitor.ingest.group import GroupCommit
from tests.conftest import write_config
from tests.serve_harness import TOKEN, Serve, sum_metric, wait_until

# --- GroupCommit on its own --------------------------------------------------------------------------------------


def test_requests_waiting_for_a_busy_writer_go_together_up_to_the_cap() -> None:
    calls: list[list[int]] = []
    first_started = threading.Event()
    release = threading.Event()

    def write(requests: Sequence[int]) -> list[str]:
        calls.append(list(requests))
        first_started.set()
        release.wait()
        return [f"answer {r}" for r in requests]

    async def scenario() -> list[str]:
        with ThreadPoolExecutor(1) as pool:
            group: GroupCommit[int, str] = GroupCommit(write, size=lambda r: r, max_size=7, executor=pool)
            first = group.enqueue(1)
            await asyncio.get_running_loop().run_in_executor(None, first_started.wait)
            assert (group.waiting, group.writing) == (0, 1)
            rest = [group.enqueue(size) for size in (2, 3, 4, 9, 1)]
            assert (group.waiting, group.writing) == (5, 1)
            release.set()
            answers = await asyncio.gather(first, *rest)
            assert (group.waiting, group.writing) == (0, 0)
            return list(answers)

    answers = asyncio.run(scenario())
    # 2+3 fit in 7, 4 would not; 4 alone (4+9 > 7); 9 is over the cap and goes alone; then 1.
    assert calls == [[1], [2, 3], [4], [9], [1]]
    assert answers == ["answer 1", "answer 2", "answer 3", "answer 4", "answer 9", "answer 1"]


def test_a_failed_write_is_the_failure_of_every_request_in_it_and_of_no_other() -> None:
    release = threading.Event()
    started = threading.Event()

    def write(requests: Sequence[str]) -> list[str]:
        started.set()
        release.wait()
        if "poison" in requests:
            raise RuntimeError("storage said no")
        return [r.upper() for r in requests]

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            group: GroupCommit[str, str] = GroupCommit(write, size=lambda r: 1, max_size=10, executor=pool)
            first = group.enqueue("a")
            await asyncio.get_running_loop().run_in_executor(None, started.wait)
            together = [group.enqueue(r) for r in ("b", "poison")]
            release.set()
            out: list[object] = list(await asyncio.gather(first, *together, return_exceptions=True))
            out.append(await group.submit("c"))  # the writer goes on after a failed call
            return out

    first, b, poison, c = asyncio.run(scenario())
    assert first == "A" and c == "C"
    assert isinstance(b, RuntimeError) and isinstance(poison, RuntimeError)


# --- a real serve ------------------------------------------------------------------------------------------------

CONFIG = """\
http: {{listen: "127.0.0.1:0", max_events_per_request: 5, group_commit_max_events: {cap}}}
throttle: {{snapshot_file: throttle.json}}
schedule: {{evaluate_every: 1h}}
budgets:
  - {{name: per-user-daily, match: {{project: lingo}}, per: user, window: day, limit_usd: 0.50, throttle_at: 1.0}}
  - {{name: lingo-daily, match: {{project: lingo}}, window: day, limit_usd: 1000000}}
"""


def event(request_id: str, user: str, output_tokens: int) -> dict[str, Any]:
    """claude-haiku-4-5 at $5 per million output tokens: 1,000 tokens are $0.005, 100,000 are $0.50."""
    return {
        "request_id": request_id,
        "timestamp": datetime.now(UTC).isoformat(),
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user},
    }


def post(url: str, body: bytes) -> tuple[int, Any]:
    """POST /v1/usage on a connection of its own; (status, JSON answer)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(
            "POST", "/v1/usage", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def check(url: str, user: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", f"/v1/check?project=lingo&user={user}&model=claude-haiku-4-5")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def ingested(database: Path) -> dict[str, int]:
    """The stored counters behind claude_monitor_ingest_events_total{source="http"}, by outcome."""
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT labels, value FROM counters WHERE name = 'ingest_events'").fetchall()
    return {json.loads(labels)["outcome"]: int(value) for labels, value in rows if '"http"' in labels}


def queue(serve: Serve) -> tuple[float, float]:
    metrics = serve.metrics()
    return (
        sum_metric(metrics, "claude_monitor_ingest_requests", state="waiting"),
        sum_metric(metrics, "claude_monitor_ingest_requests", state="writing"),
    )


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Serve]:
    cap = getattr(request, "param", 10_000)
    daemon = Serve(write_config(tmp_path, CONFIG.format(cap=cap)), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


@pytest.mark.slow
def test_requests_queued_behind_a_write_share_one_transaction_and_keep_their_own_answers(
    serve: Serve, tmp_path: Path
) -> None:
    database = tmp_path / "monitor.db"
    lock = sqlite3.connect(database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the daemon's writer now waits for this transaction
    answers: dict[str, tuple[int, Any]] = {}
    checked_after_other: list[int] = []
    bodies = {
        "plug": json.dumps(event("plug-1", "u-9", 1000)).encode(),
        # u-1 spends $0.50 of $0.50: its flag must be up before ANY answer of its transaction returns
        "crossing": json.dumps(event("cross-1", "u-1", 100_000)).encode(),
        "other": json.dumps(event("other-1", "u-2", 1000)).encode(),
        # the same request_id in two requests of one transaction: stored once
        "dup-a": json.dumps([event("shared-1", "u-3", 1000), event("a-2", "u-3", 1000)]).encode(),
        "dup-b": json.dumps([event("b-1", "u-4", 1000), event("shared-1", "u-4", 1000)]).encode(),
        # its own rejection at its own index 1
        "mixed": json.dumps([event("m-1", "u-5", 1000), {"request_id": "m-2"}, event("m-3", "u-5", 1000)]).encode(),
        # a body that is no JSON at all: its own 400, nobody else's
        "garbage": b"\x00this is not json\x00",
    }

    def send(name: str) -> None:
        answers[name] = post(serve.url, bodies[name])
        if name == "other":
            checked_after_other.append(check(serve.url, "u-1"))

    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            plug = pool.submit(send, "plug")
            wait_until(lambda: queue(serve) == (0, 1))  # the plug is in the writer, blocked on our lock
            rest = [pool.submit(send, name) for name in bodies if name != "plug"]
            wait_until(lambda: queue(serve) == (len(rest), 1))
            lock.execute("COMMIT")
            for future in [plug, *rest]:
                future.result()
    finally:
        lock.close()

    assert answers["plug"] == (202, {"accepted": 1, "duplicates": 0, "rejected": []})
    assert answers["crossing"] == (202, {"accepted": 1, "duplicates": 0, "rejected": []})
    assert answers["other"] == (202, {"accepted": 1, "duplicates": 0, "rejected": []})
    assert checked_after_other == [429]  # u-1 was already stopped when u-2's answer came back
    assert check(serve.url, "u-2") == 204
    dup_a, dup_b = answers["dup-a"], answers["dup-b"]
    assert dup_a[0] == dup_b[0] == 202
    assert dup_a[1]["accepted"] + dup_b[1]["accepted"] == 3  # shared-1 once, a-2, b-1
    assert dup_a[1]["duplicates"] + dup_b[1]["duplicates"] == 1
    assert dup_a[1]["accepted"] + dup_a[1]["duplicates"] == 2 and dup_b[1]["accepted"] + dup_b[1]["duplicates"] == 2
    status, mixed = answers["mixed"]
    assert status == 202 and mixed["accepted"] == 2 and mixed["duplicates"] == 0
    assert [r["index"] for r in mixed["rejected"]] == [1] and mixed["rejected_total"] == 1
    status, garbage = answers["garbage"]
    assert status == 400 and garbage["dead_lettered"] is True

    with sqlite3.connect(database) as db:
        received = dict(db.execute("SELECT request_id, received_at FROM events").fetchall())
        letters = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    grouped = ["cross-1", "other-1", "shared-1", "a-2", "b-1", "m-1", "m-3"]
    assert sorted(received) == sorted(["plug-1", *grouped])
    assert len({received[rid] for rid in grouped}) == 1  # one transaction wrote them all
    assert letters == 2  # mixed's line 1 and the garbage body
    assert ingested(database) == {"accepted": 8, "duplicate": 1, "rejected": 2}


@pytest.mark.parametrize("serve", [3], indirect=True)
@pytest.mark.slow
def test_the_group_cap_splits_a_queue_and_the_event_limit_stays_per_request(serve: Serve, tmp_path: Path) -> None:
    # group_commit_max_events 3, max_events_per_request 5: a request of 5 is taken (alone), one of 6 is not.
    assert post(serve.url, json.dumps([event(f"six-{i}", "u-1", 1) for i in range(6)]).encode())[0] == 413
    database = tmp_path / "monitor.db"
    lock = sqlite3.connect(database, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    sizes = {"plug": 1, "two": 2, "one": 1, "five": 5, "three": 3}
    answers: dict[str, tuple[int, Any]] = {}

    def send(name: str) -> None:
        body = [event(f"{name}-{i}", "u-1", 1) for i in range(sizes[name])]
        answers[name] = post(serve.url, json.dumps(body).encode())

    try:
        with ThreadPoolExecutor(len(sizes)) as pool:
            plug = pool.submit(send, "plug")
            wait_until(lambda: queue(serve) == (0, 1))
            # queued one at a time, so the order is known: two, one, five, three
            rest = []
            for n, name in enumerate(["two", "one", "five", "three"], start=1):
                rest.append(pool.submit(send, name))
                wait_until(lambda n=n: queue(serve) == (n, 1))
            lock.execute("COMMIT")
            for future in [plug, *rest]:
                future.result()
    finally:
        lock.close()
    for name, size in sizes.items():
        assert answers[name] == (202, {"accepted": size, "duplicates": 0, "rejected": []})
    with sqlite3.connect(database) as db:
        received = dict(db.execute("SELECT request_id, received_at FROM events").fetchall())
    transaction = {name: {received[f"{name}-{i}"] for i in range(size)} for name, size in sizes.items()}
    assert all(len(times) == 1 for times in transaction.values())
    # two + one = 3 fit the cap together; five is over it and goes alone; three alone.
    assert transaction["two"] == transaction["one"]
    assert len({*transaction["plug"], *transaction["two"], *transaction["five"], *transaction["three"]}) == 4


@pytest.mark.slow
def test_many_concurrent_posters_with_overlapping_ids_store_each_event_exactly_once(
    serve: Serve, tmp_path: Path
) -> None:
    posters, requests_each, pool_size = 8, 15, 40
    # Poster p sends ids in its own rotation of one shared pool of 40, 4 ids a request (plus one line the
    # parser refuses, always at index 2 of its own request); every id is sent 8 * 15 * 4 / 40 = 12 times.
    ids = [f"shared-{i:02d}" for i in range(pool_size)]

    def poster(p: int) -> list[tuple[int, Any]]:
        out = []
        for r in range(requests_each):
            start = (p * 5 + r * 4) % pool_size
            mine = [ids[(start + k) % pool_size] for k in range(4)]
            body = [event(mine[0], "u-1", 1000), event(mine[1], "u-1", 1000), {"no": "request_id"}]
            body += [event(mine[2], "u-1", 1000), event(mine[3], "u-1", 1000)]
            out.append(post(serve.url, json.dumps(body).encode()))
        return out

    with ThreadPoolExecutor(posters) as pool:
        answers = [answer for each in pool.map(poster, range(posters)) for answer in each]
    assert len(answers) == posters * requests_each
    assert all(status == 202 for status, _ in answers)
    assert all(a["accepted"] + a["duplicates"] == 4 for _, a in answers)
    assert all([r["index"] for r in a["rejected"]] == [2] for _, a in answers)
    assert sum(a["accepted"] for _, a in answers) == pool_size
    assert sum(a["duplicates"] for _, a in answers) == posters * requests_each * 4 - pool_size
    budgets = {row["budget"]: row for row in serve.get("/v1/budgets").json()}
    assert budgets["lingo-daily"]["spend_usd"] == "0.200000"  # 40 events x $0.005, each once
    total = posters * requests_each
    assert ingested(tmp_path / "monitor.db") == {"accepted": 40, "duplicate": total * 4 - 40, "rejected": total}
    with sqlite3.connect(tmp_path / "monitor.db") as db:
        assert db.execute("SELECT count(*), count(DISTINCT request_id) FROM events").fetchone() == (40, 40)
