"""Property-based tests of `POST /v1/usage` on a real `serve`: any body gets a clear answer, never a 5xx or a hang.

One daemon for the module, reused by every example (its database grows with dead letters as it would in life).
Assertions are on behaviour — status class, a JSON answer, counts that add up, the daemon still healthy — not on the
wording of any message.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import write_config
from tests.fuzzing import dumps, events, json_values, lines
from tests.serve_harness import TOKEN, Response, Serve, request, wait_until

# The strategies are large; hypothesis warns when it renders them, which says nothing about the server.
# Fuzzes a `serve` process at length: in the slow lane (`scripts/test -m slow`).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Generating overly large repr")]

MAX_BODY = 4096
CLIENT_TIMEOUT = 15.0  # seconds: an answer slower than this is a hang
# Every example is a real HTTP round trip (a commit for most): few examples, no deadline (the client timeout is it).
ROUND_TRIPS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONFIG = f"""\
http: {{listen: "127.0.0.1:0", max_body_bytes: {MAX_BODY}}}
throttle: {{snapshot_file: throttle.json}}
schedule: {{evaluate_every: 60s}}
sources: [{{type: jsonl, path: "usage/*.jsonl", name: fuzz-tail}}]
budgets:
  - {{name: per-user-daily, per: user, window: day, limit_usd: 0.01, throttle_at: 1.0}}
  - {{name: everything-monthly, window: month, limit_usd: 1000, alert_at: [0.5]}}
"""

any_text = st.text(st.characters(codec=None) | st.characters(categories=["Cs"]), max_size=400)
bodies = st.one_of(
    st.binary(max_size=MAX_BODY),
    any_text.map(lambda text: text.encode("utf-8", "surrogatepass")),  # lone surrogates: not UTF-8
    json_values.map(lambda value: dumps(value).encode()),
    events.map(lambda event: dumps(event).encode()),
    st.lists(events | json_values, max_size=20).map(lambda items: dumps(items).encode()),
    st.lists(lines, max_size=20).map(lambda parts: "\n".join(parts).encode("utf-8", "surrogatepass")),
).filter(lambda body: len(body) <= MAX_BODY)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    directory = tmp_path_factory.mktemp("fuzz-ingest")
    (directory / "usage").mkdir()
    daemon = Serve(write_config(directory, CONFIG), directory)
    yield daemon
    assert daemon.stop() == 0


def post(serve: Serve, body: bytes) -> Response:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        return request(serve.url + "/v1/usage", "POST", body, headers, timeout=CLIENT_TIMEOUT)
    except OSError as exc:  # a timeout, or the connection closed without an answer
        raise AssertionError(f"no answer to a {len(body)}-byte body: {exc!r}\n{serve.output()[-3000:]}") from exc


def assert_healthy(serve: Serve) -> None:
    assert request(serve.url + "/healthz", timeout=CLIENT_TIMEOUT).status == 200


def elements(body: bytes) -> list[Any] | None:
    """The elements of a JSON array body, as the server will see them; None when the body is anything else."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, list) else None


@ROUND_TRIPS
@given(bodies)
def test_any_body_gets_202_400_or_413_with_a_json_answer(serve: Serve, body: bytes) -> None:
    answer = post(serve, body)
    assert answer.status in (202, 400, 413), (answer.status, answer.body[:500], serve.output()[-3000:])
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    document = answer.json()
    assert isinstance(document, dict)
    if answer.status == 202:
        rejected = document["rejected"]
        total_rejected = document.get("rejected_total", len(rejected))
        assert document["accepted"] >= 0 and document["duplicates"] >= 0 and len(rejected) <= total_rejected
        items = elements(body)
        if items is not None:  # every element of an array is accounted for, exactly once
            assert document["accepted"] + document["duplicates"] + total_rejected == len(items), document
            assert all(0 <= r["index"] < len(items) and r["error"] for r in rejected), rejected
    assert_healthy(serve)


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=MAX_BODY + 1, max_value=2**62))
def test_a_body_over_the_limit_is_413_from_its_headers(serve: Serve, length: int) -> None:
    host, port = serve.url.removeprefix("http://").split(":")
    with closing(socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT)) as sock:
        sock.sendall(
            f"POST /v1/usage HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        sock.sendall(b"[" * 100)  # the start of a body that is never finished: the answer must not wait for it
        head = sock.makefile("rb").readline()
    assert head.split()[1:2] == [b"413"], head
    assert_healthy(serve)


def test_a_tailed_line_the_parser_once_raised_on_does_not_stop_the_file(serve: Serve) -> None:
    """Out of datetime's range once in UTC: a dead letter, and the lines after it are read."""
    tailed = Path(serve.log).parent / "usage" / "app.jsonl"
    good = {"request_id": "after-the-bad-line", "timestamp": "2026-01-05T10:00:00Z", "model": "claude-haiku-4-5",
            "usage": {"input_tokens": 10, "output_tokens": 1}}  # fmt: skip
    bad = {**good, "request_id": "out-of-range", "timestamp": "0001-01-01T00:00:00+01:00"}
    tailed.write_text(json.dumps(bad) + "\n" + json.dumps(good) + "\n", encoding="utf-8")

    def stored() -> bool:
        with closing(sqlite3.connect(Path(serve.log).parent / "monitor.db")) as database:
            found = database.execute("SELECT 1 FROM events WHERE request_id = 'after-the-bad-line'").fetchone()
            return found is not None

    wait_until(stored, timeout=20)
    assert "OverflowError" not in serve.output()
    assert serve.get("/readyz").status == 200
