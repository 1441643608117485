"""The bulk write path: new rows told apart exactly without RETURNING, integer rates cached across a price change,
the fast decoder's refusals decided by json, and ingest from a named pipe."""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from monitor.config import ModelPricing, load_settings
from monitor.ingest.ahead import _context
from monitor.ingest.files import ingest_files
from monitor.ingest.parse import Event, EventParser, Rejected
from monitor.ingest.writer import BatchResult, Item
from monitor.pricing import load_price_table, usd
from monitor.service import Store, open_store
from tests.conftest import FakeClock, event, run_cli, write_config


def items(store: Store, *request_ids: str) -> list[Item]:
    """One haiku event per id: 1,000 input and 100 output tokens, i.e. $0.001 + $0.0005 = $0.0015 each."""
    parsed = []
    for number, request_id in enumerate(request_ids):
        line = json.dumps(event(request_id, input_tokens=1000, output_tokens=100))
        parsed.append((f"batch:{number}", store.parser.parse_line(line)))
    return parsed


def table_rows(store: Store, query: str) -> list[tuple[Any, ...]]:
    assert store.engine.url.database is not None
    with sqlite3.connect(store.engine.url.database) as db:
        return db.execute(query).fetchall()


def check_duplicates_told_apart(store: Store) -> None:
    first = store.writer.write(items(store, "a", "b", "c"), "test")
    assert (first.accepted, first.duplicates) == (3, 0)
    # b and a are stored already, the second d repeats the first one of this batch: d and e are new.
    second = store.writer.write(items(store, "b", "d", "d", "e", "a"), "test")
    assert (second.accepted, second.duplicates) == (2, 3)
    assert [
        row[0] for row in table_rows(store, "SELECT request_id FROM events WHERE request_id != 'old' ORDER BY 1")
    ] == [
        "a",
        "b",
        "c",
        "d",
        "e",
    ]
    # Only new events are counted: 5 requests, 5 x 1,500,000,000 pico-dollars ($0.0015 each).
    [(requests, cost)] = table_rows(store, "SELECT sum(requests), sum(cost_pico) FROM usage_rollup")
    assert (requests, cost) == (5, 5 * 1_500_000_000)
    counted = dict(table_rows(store, "SELECT name, sum(value) FROM counters GROUP BY name"))
    assert counted["requests"] == 5
    assert counted["cost_pico"] == 7_500_000_000
    assert counted["ingest_events"] == 3 + 2 + 3  # accepted 3, then accepted 2 and 3 duplicates


def test_new_rows_exact_with_duplicates_in_the_batch_and_stored(store: Store) -> None:
    check_duplicates_told_apart(store)


def test_new_rows_exact_when_row_ids_are_near_the_largest(store: Store) -> None:
    # A row holding the largest id SQLite allows: new rows then get free ids at random (some below the largest
    # seen), so only looking new rows up by request_id tells them apart.
    with store.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO events (id, request_id, ts, received_at, source, model_id, model, input_tokens, "
            "output_tokens, cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, web_search_requests, "
            "web_fetch_requests, batch, long_prompt, attributes) VALUES (?, 'old', '2026-11-01 00:00:00.000000', "
            "'2026-11-01 00:00:00.000000', 'test', 'm', 'm', 0, 0, 0, 0, 0, 0, 0, 0, 0, '{}')",
            (2**63 - 1,),
        )
    check_duplicates_told_apart(store)
    rows = table_rows(store, "SELECT count(*) FROM events WHERE request_id != 'old'")
    assert rows == [(5,)]


def test_stored_row_reads_back_as_written(store: Store) -> None:
    line = {
        **event("x", timestamp="2026-11-24T10:15:02.5+02:00", input_tokens=7, output_tokens=3),
        "attributes": {"project": "lingo", "user": "ü-1"},
        "batch": True,
        "status": 529,
        "latency_ms": 12.5,
    }
    store.writer.write([("l:1", store.parser.parse_line(json.dumps(line)))], "test")
    [row] = table_rows(
        store,
        "SELECT ts, received_at, batch, status, latency_ms, attributes, cost_pico, price_version FROM events",
    )
    ts, received, batch, status, latency, attributes, cost, version = row
    assert ts == "2026-11-24 08:15:02.500000"  # the instant in UTC, the ORM's text form
    assert received == "2026-11-26 12:00:00.000000"  # the clock fixture's now
    assert (batch, status, latency) == (1, 529, 12.5)
    assert json.loads(attributes) == {"project": "lingo", "user": "ü-1"}
    # Batch halves haiku's $1/M input and $5/M output: 7 x 0.5 + 3 x 2.5 = 11 micro-dollars.
    assert cost == 11_000_000
    assert version is not None and "claude-haiku-4-5" in version


def test_integer_rates_cached_across_a_price_change_and_rounded_half_even(clock: FakeClock) -> None:
    table = load_price_table(
        {
            "tiny": ModelPricing.model_validate(
                {
                    "rates": [
                        # $0.000003 per million tokens = 3 pico-dollars a token (output 10x that)
                        {
                            "since": "2026-01-01",
                            "input": "0.000003",
                            "output": "0.00003",
                            "cache_write_5m": "0",
                            "cache_write_1h": "0",
                            "cache_read": "0",
                        },
                        # from June: 5 pico-dollars a token
                        {
                            "since": "2026-06-01",
                            "input": "0.000005",
                            "output": "0.00005",
                            "cache_write_5m": "0",
                            "cache_write_1h": "0",
                            "cache_read": "0",
                        },
                    ]
                }
            )
        }
    )
    parser = EventParser((), clock)

    def cost(timestamp: str, tokens: int, batch: bool = False) -> int | None:
        obj = {**event("r", timestamp=timestamp, model="tiny", input_tokens=tokens), "batch": batch}
        parsed = parser.parse_object(obj)
        assert isinstance(parsed, Event)
        return table.price(parsed).cost_pico

    # Alternating dates and modifiers, so each answer comes from a cached entry made for another event.
    assert cost("2026-05-31T23:59:59Z", 1) == 3
    assert cost("2026-06-01T00:00:00Z", 1) == 5
    assert cost("2026-05-31T23:59:59Z", 3) == 9
    # Batch halves: 1.5 pico-dollars a token before June, 2.5 after; ties go to the even pico-dollar.
    assert cost("2026-05-31T12:00:00Z", 1, batch=True) == 2  # 1.5 -> 2
    assert cost("2026-05-31T12:00:00Z", 3, batch=True) == 4  # 4.5 -> 4
    assert cost("2026-06-01T12:00:00Z", 1, batch=True) == 2  # 2.5 -> 2
    assert cost("2026-06-01T12:00:00Z", 3, batch=True) == 8  # 7.5 -> 8
    assert cost("2026-06-01T12:00:00Z", 2, batch=True) == 5  # 5.0 exactly
    assert cost("2026-06-01T00:00:00Z", 7) == 35
    assert usd(35) == Decimal("3.5E-11")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param(
            '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", '
            '"usage": {"input_tokens": 123456789012345678901234567890}}',
            "usage.input_tokens: 123456789012345678901234567890 is over the limit of 10,000,000",
            id="past-64-bits",
        ),
        pytest.param(
            '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {"input_tokens": NaN}}',
            "usage.input_tokens: nan is not a finite number",
            id="nan",
        ),
        pytest.param(
            '{"request_id": "r\\ud800", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}}',
            "request_id: contains an unpaired surrogate escape; not valid Unicode",
            id="lone-surrogate",
        ),
        pytest.param('{"request_id": "r", }', "not JSON: Expecting property name enclosed in double quotes", id="bad"),
    ],
)
def test_what_the_fast_decoder_refuses_is_decided_as_before(clock: FakeClock, line: str, reason: str) -> None:
    parsed = EventParser((), clock).parse_line(line)
    assert isinstance(parsed, Rejected)
    assert parsed.reason.startswith(reason), parsed.reason


def ingest_pipe(store: Store, tmp_path: Path, events: int, **options: Any) -> BatchResult:
    """Ingest a named pipe that a thread writes `events` haiku events (1,000 input and 100 output tokens each,
    $0.0015) and one line that is not JSON into."""
    pipe = tmp_path / "usage.pipe"
    os.mkfifo(pipe)
    lines = [json.dumps(event(f"p{i}", input_tokens=1000, output_tokens=100)) for i in range(events)]

    def feed() -> None:
        with pipe.open("w", encoding="utf-8") as out:
            out.write("\n".join([*lines, "not json"]) + "\n")

    feeder = threading.Thread(target=feed)
    feeder.start()
    result, failed = ingest_files([pipe], store.parser, store.ingestor, **options)
    feeder.join()
    assert failed == []
    return result


def test_ingest_reads_a_named_pipe(store: Store, tmp_path: Path) -> None:
    result = ingest_pipe(store, tmp_path, 7, batch_size=3)
    assert (result.accepted, result.rejected) == (7, 1)
    assert table_rows(store, "SELECT count(*), sum(cost_pico) FROM events") == [(7, 7 * 1_500_000_000)]


@pytest.mark.slow
def test_a_named_pipe_is_read_by_one_parse_process(store: Store, tmp_path: Path) -> None:
    """A pipe can be read once: asked for parse processes, ingest still reads every line of it, once."""
    result = ingest_pipe(store, tmp_path, 25, batch_size=4, parse_ahead=True)
    assert (result.accepted, result.duplicates, result.rejected) == (25, 0, 1)
    assert table_rows(store, "SELECT count(*), sum(cost_pico) FROM events") == [(25, 25 * 1_500_000_000)]


def test_an_attribute_number_past_64_bits_keeps_its_digits(clock: FakeClock) -> None:
    line = (
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}, '
        '"attributes": {"project": 18446744073709551616, "user": 1.5}}'
    )
    parsed = EventParser(("project", "user"), clock).parse_line(line)
    assert isinstance(parsed, Event)
    assert parsed.attributes == {"project": "18446744073709551616", "user": "1.5"}


@pytest.mark.slow
def test_a_parse_process_gives_the_same_results(tmp_path: Path, clock: FakeClock) -> None:
    lines = [json.dumps(event(f"q{i % 9}", input_tokens=1000, output_tokens=100)) for i in range(12)]
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join([*lines[:6], "not json", "", *lines[6:]]) + "\n", encoding="utf-8")
    second = tmp_path / "second.jsonl"
    second.write_text(lines[0] + "\n" + json.dumps(event("r1", input_tokens=10)) + "\n", encoding="utf-8")
    outcomes = []
    for parse_ahead in (False, True):
        directory = tmp_path / f"ahead-{parse_ahead}"
        directory.mkdir()
        store = open_store(load_settings(write_config(directory), environ={}), clock=clock)
        try:
            errors: list[str] = []
            result, failed = ingest_files(
                [first, tmp_path / "missing.jsonl", second],
                store.parser,
                store.ingestor,
                batch_size=4,
                on_error=errors.append,
                parse_ahead=parse_ahead,
            )
            rows = table_rows(store, "SELECT request_id, source, cost_pico, ts FROM events ORDER BY id")
            letters = table_rows(store, "SELECT location, reason FROM dead_letters")
        finally:
            store.close()
        outcomes.append((result.as_dict(), failed, errors, rows, letters))
    assert outcomes[0] == outcomes[1]
    summary, failed, errors, rows, letters = outcomes[1]
    # 12 lines over 9 ids in the first file (3 repeats), a bad line; the second file repeats q0 and adds r1.
    assert summary == {"accepted": 10, "duplicates": 4, "rejected": 1, "unpriced": 0}
    assert failed == [str(tmp_path / "missing.jsonl")]
    assert len(errors) == 1 and "missing.jsonl: cannot read" in errors[0]
    assert letters == [(f"{first.resolve()}:7", letters[0][1])]
    assert rows[-1] == ("r1", f"file:{second.resolve()}", 10_000_000, "2026-11-24 10:15:02.000000")  # 10 x $1/M


PREPARED_CONFIG = (
    "metrics: {labels: [project], max_values_per_label: 2, max_unpriced_models: 1}\n"
    "budgets:\n"
    "  - {name: all-monthly, match: {}, window: month, limit_usd: 100}\n"
    "  - {name: user-daily, match: {project: p1}, per: user, window: day, limit_usd: 10}\n"
    "  - {name: key-hourly, match: {}, per: api_key, window: 'rolling:1h', limit_requests: 1000}\n"
)


def _mixed_lines() -> list[str]:
    """Every kind of line a batch may hold: priced and unknown models, statuses, latencies, label values past the
    cap, attributes dropped, repeats within and across batches, late and current timestamps, rejected lines."""
    lines = []
    for i in range(60):
        day = 24 - (i % 4)  # the clock is 2026-11-26 12:00Z: events 2 to 5 days late, and today's below
        body = event(
            f"m{i % 50}",  # ids 0-9 come twice
            timestamp=f"2026-11-{day:02d}T{i % 24:02d}:{i % 60:02d}:07.{i:06d}Z",
            model=("claude-haiku-4-5", "claude-sonnet-4-5", f"unknown-{i % 3}")[i % 3],
            input_tokens=1000 + i,
            output_tokens=10 * i,
            cache_read_input_tokens=i % 5,
            cache_creation={"ephemeral_5m_input_tokens": i % 7, "ephemeral_1h_input_tokens": i % 2},
        )
        body["status"] = (200, 429, 500, None)[i % 4]
        if i % 5:
            body["latency_ms"] = 37.5 * i
        body["attributes"] = {"project": f"p{i % 4}", "user": f"u{i % 6}", "api_key": f"k{i % 2}"}
        if i % 9 == 0:
            body["attributes"]["not_a_dimension"] = "dropped"
        lines.append(json.dumps(body))
    for i in range(6):
        lines.append(json.dumps(event(f"now{i}", timestamp=f"2026-11-26T11:{50 + i}:00Z", input_tokens=5)))
    lines.insert(17, "not json")
    lines.insert(33, '{"request_id": "no-timestamp", "model": "m", "usage": {}}')
    return lines


def test_parse_processes_are_copies_only_while_no_other_thread_runs() -> None:
    """A copy of a process with a second thread could inherit a lock that thread holds, never to be released."""
    assert _context().get_start_method() == "fork"
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert _context().get_start_method() == "spawn"
    finally:
        release.set()
        other.join()


class _Finalized:
    """In a reference cycle with itself: only a collection finalizes it, and it records which process did."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.me = self

    def __del__(self) -> None:
        with self.record.open("a", encoding="utf-8") as out:
            out.write(f"{os.getpid()}\n")


def test_a_copied_parse_process_never_finalizes_what_the_ingesting_process_holds(store: Store, tmp_path: Path) -> None:
    """A database connection left in a reference cycle when the parse processes are forked must not be closed from
    a copy (its goodbye would end the ingesting process's session too): a copy's collector (each collects as it
    starts) never finalizes what it inherited."""
    assert threading.active_count() == 1  # the parse processes are copies (forked)
    record = tmp_path / "finalized"
    usage = tmp_path / "usage.jsonl"
    usage.write_text("".join(json.dumps(event(f"r{i}", input_tokens=1)) + "\n" for i in range(20)), encoding="utf-8")
    gc.disable()  # the cycle stays uncollected here until the parse processes run
    try:
        _Finalized(record)
        result, failed = ingest_files(
            [usage], store.parser, store.ingestor, batch_size=5, parse_ahead=True, parse_processes=2
        )
    finally:
        gc.enable()
    gc.collect()
    assert (result.accepted, failed) == (20, [])
    assert record.read_text(encoding="utf-8").split() == [str(os.getpid())]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2], ids=["copied processes", "fresh interpreters"])
@pytest.mark.parametrize("processes", [1, 2])
def test_parse_processes_store_exactly_what_one_process_stores(tmp_path: Path, processes: int, threads: int) -> None:
    """Batches prepared in parse processes (priced, tallied ahead) against the same lines written in one process:
    every table the write path fills is the same, rows already stored included (their batches are tallied again).
    With a second thread running, the parse processes start as fresh interpreters instead of copies."""
    release = threading.Event()
    if threads == 2:
        other = threading.Thread(target=release.wait, daemon=True)
        other.start()
    try:
        _store_exactly_what_one_process_stores(tmp_path, processes)
    finally:
        release.set()


def _store_exactly_what_one_process_stores(tmp_path: Path, processes: int) -> None:
    seed = [json.dumps(event(f"m{i}", input_tokens=1)) for i in (3, 12, 41)]  # stored before: duplicates later
    lines = _mixed_lines()
    usage = tmp_path / "usage.jsonl"
    encoded = [line.encode() for line in lines]
    # A line past the 1 MiB limit and one that is not UTF-8, in batches of either parse process; blank lines.
    encoded[40:40] = [b'{"request_id": "' + b"x" * (1024 * 1024 + 10) + b'"}', b"", b"  "]
    encoded[50:50] = [b'{"request_id": "\xff\xfe"}']
    usage.write_bytes(b"\n".join(encoded) + b"\n")
    first = tmp_path / "seed.jsonl"
    first.write_text("\n".join(seed) + "\n", encoding="utf-8")
    tables = {
        "events": "SELECT request_id, ts, source, model_id, model, input_tokens, output_tokens, cache_read_tokens, "
        "cache_write_5m_tokens, cache_write_1h_tokens, batch, long_prompt, status, latency_ms, attributes, "
        "cost_pico, price_version FROM events ORDER BY request_id",
        "counters": "SELECT name, labels, value FROM counters ORDER BY name, labels",
        "rollup": "SELECT * FROM usage_rollup ORDER BY bucket_start, model, service_tier, status_class, labels",
        "budgets": "SELECT * FROM budget_usage ORDER BY budget, scope, bucket_start",
        "letters": "SELECT location, reason FROM dead_letters ORDER BY id",
    }
    outcomes = []
    for ahead in (False, True):
        directory = tmp_path / f"ahead-{ahead}"
        directory.mkdir()
        clock = FakeClock(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))
        store = open_store(load_settings(write_config(directory, PREPARED_CONFIG), environ={}), clock=clock)
        try:
            ingest_files([first], store.parser, store.ingestor, batch_size=7)
            result, failed = ingest_files(
                [usage], store.parser, store.ingestor, batch_size=7, parse_ahead=ahead, parse_processes=processes
            )
            found = {name: table_rows(store, query) for name, query in tables.items()}
        finally:
            store.close()
        assert failed == []
        outcomes.append(({**result.as_dict(), "dropped": result.attributes_dropped}, found))
    assert outcomes[1] == outcomes[0]
    summary, found = outcomes[1]
    # 66 events over 56 ids (m0-m9 twice), 3 of them (m3, m12, m41) stored by the seed file; 4 rejected lines;
    # 7 events carry an attribute that is not a dimension (i = 0, 9, ..., 54), one of them (i = 54) a repeat of m4.
    # 20 have an unknown model (i = 2, 5, ..., 59): 4 of them repeats (i = 50, 53, 56, 59), one stored before (m41).
    assert summary == {"accepted": 53, "duplicates": 13, "rejected": 4, "unpriced": 15, "dropped": 6}
    assert len(found["events"]) == 56
    assert {row[0] for row in found["budgets"]} == {"all-monthly", "user-daily", "key-hourly"}
    late = {json.loads(labels)["lateness"]: value for name, labels, value in found["counters"] if name == "late_events"}
    # The seed's 3 (2026-11-24) and the 47 new of the main file are days late; the six of 11:50-11:55, 5-10 minutes.
    assert late == {">1d": 50, "5m-1h": 6}
    other = [labels for name, labels, _ in found["counters"] if name == "requests" and "__other__" in labels]
    assert other  # four projects, two slots: the cap was applied to the tallies


@pytest.mark.slow
def test_the_ingest_command_stores_the_same_with_and_without_parse_processes(tmp_path: Path) -> None:
    """`ingest --parse-process` starts its parse processes before it opens the store, with a preparer made from the
    config alone: what it stores is what `--no-parse-process` stores (a missing file reported the same way)."""
    usage = tmp_path / "usage.jsonl"
    usage.write_text("\n".join(_mixed_lines()) + "\n", encoding="utf-8")
    tables = [
        "SELECT request_id, ts, model, cost_pico, attributes FROM events ORDER BY request_id",
        "SELECT name, labels, value FROM counters ORDER BY name, labels",
        "SELECT * FROM usage_rollup ORDER BY bucket_start, model, service_tier, status_class, labels",
        "SELECT * FROM budget_usage ORDER BY budget, scope, bucket_start",
        "SELECT location, reason FROM dead_letters ORDER BY id",
    ]
    outcomes = []
    for flag in ("--parse-process", "--no-parse-process"):
        directory = tmp_path / flag.strip("-")
        directory.mkdir()
        config = write_config(directory, PREPARED_CONFIG)
        missing = tmp_path / "missing.jsonl"
        run = run_cli(
            "ingest", str(usage), str(missing), "--config", str(config), "--format", "json", "--batch-size", "7",
            flag, check=False,
        )  # fmt: skip
        assert run.returncode == 1, run.stderr  # the missing file
        assert f"{missing}: cannot read" in run.stderr
        with sqlite3.connect(directory / "monitor.db") as db:
            found = [db.execute(query).fetchall() for query in tables]
        # Lateness is measured against the clock of the run: the two runs' counters differ only there.
        found[1] = [row for row in found[1] if row[0] != "late_events"]
        outcomes.append((run.json(), found))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0]["accepted"] == 56 and outcomes[0][0]["rejected"] == 2
