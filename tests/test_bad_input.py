"""Bad input: every bad line lands in dead_letters with reason, raw text and place; nothing good is lost."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor.ingest.files import ingest_files
from monitor.ingest.writer import BatchResult
from monitor.service import Store
from tests.conftest import FakeClock, event, jsonl, run_cli

MIB = 1024 * 1024
GOOD_BEFORE = event("good-before", input_tokens=100, output_tokens=10)
GOOD_AFTER = event("good-after", input_tokens=200, output_tokens=20)
GOOD_ROWS = [("good-after", 200, 20), ("good-before", 100, 10)]
# Two made-up keys in the shape of a real one; the test searches the database for any 10-character piece of them.
SECRET = "sk-ant-api03-Qm7ZtR2xWv9LpK4nB8cH1dF6gJ3sY5uE0oI-aTqXyVw_NzMbRk2Lp9Hs4DjAA"
OTHER_SECRET = "sk-ant-api03-Hb3Nc8Vx1Mz6Qw2Er5Ty9Ui4Op7As0DfGh-JkLpZx_CvBnMq3Wt8Ye1RuAA"
Alternatives = str | tuple[str, ...]


# ---------------------------------------------------------------- helpers: files, database, assertions


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def lines(*parts: bytes) -> bytes:
    """Each part as one line, newline-terminated."""
    return b"".join(part + b"\n" for part in parts)


def sandwich(path: Path, bad: bytes) -> Path:
    """A good event, the bad line (line 2), another good event."""
    path.write_bytes(dumps(GOOD_BEFORE) + b"\n" + bad + b"\n" + dumps(GOOD_AFTER) + b"\n")
    return path


def with_usage(**changes: Any) -> dict[str, Any]:
    """A valid event `bad-1` whose usage fields are changed."""
    obj = event("bad-1", input_tokens=5, output_tokens=1)
    obj["usage"].update(changes)
    return obj


def with_fields(**changes: Any) -> dict[str, Any]:
    """A valid event `bad-1` whose top-level fields are changed."""
    obj = event("bad-1", input_tokens=5, output_tokens=1)
    obj.update(changes)
    return obj


def without(field: str) -> dict[str, Any]:
    obj = event("bad-1", input_tokens=5, output_tokens=1)
    del obj[field]
    return obj


def padded(request_id: str, size: int) -> bytes:
    """A valid event line of exactly `size` bytes (newline not included)."""
    obj = event(request_id, input_tokens=1)
    obj["pad"] = ""
    base = len(dumps(obj))
    obj["pad"] = "x" * (size - base)
    line = dumps(obj)
    assert len(line) == size
    return line


def query(db: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Plain SQL on the SQLite file, independent of the code under test."""
    with closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql, params)]


def db_of(store: Store) -> Path:
    database = store.engine.url.database
    assert database
    return Path(database)


def letters(db: Path) -> list[dict[str, Any]]:
    return query(db, "SELECT source, location, reason, raw, request_id FROM dead_letters ORDER BY id")


def token_rows(db: Path) -> list[tuple[str, int, int]]:
    rows = query(db, "SELECT request_id, input_tokens, output_tokens FROM events ORDER BY request_id")
    return [(r["request_id"], r["input_tokens"], r["output_tokens"]) for r in rows]


def ingest(store: Store, *paths: Path) -> BatchResult:
    result, failed = ingest_files(list(paths), store.parser, store.ingestor)
    assert failed == []
    return result


def assert_reason(reason: str, words: Sequence[Alternatives]) -> None:
    """Each entry of `words` (or one of its alternatives) is named in the reason, case-insensitively."""
    for word in words:
        options = (word,) if isinstance(word, str) else word
        assert any(option.lower() in reason.lower() for option in options), f"{options} not in reason {reason!r}"


def assert_sandwich(
    store: Store, path: Path, words: Sequence[Alternatives], raw: str | None, request_id: str | None = None
) -> dict[str, Any]:
    """Ingest a sandwich file: line 2 is dead-lettered as described, both good events are stored intact."""
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 1, "unpriced": 0}
    db = db_of(store)
    [letter] = letters(db)
    assert_reason(letter["reason"], words)
    if raw is not None:
        assert letter["raw"] == raw
    assert str(path) in letter["source"]
    assert letter["location"] == f"{path}:2"
    if request_id is not None:
        assert letter["request_id"] == request_id
    assert token_rows(db) == GOOD_ROWS
    return letter


def leaked(secret: str, blob: bytes) -> list[str]:
    """Every 10-character piece of the key after `sk-ant-` that appears in `blob`."""
    body = secret.removeprefix("sk-ant-")
    return [body[i : i + 10] for i in range(len(body) - 9) if body[i : i + 10].encode() in blob]


def database_bytes(db: Path) -> bytes:
    """The database file and its WAL side files, as bytes."""
    return b"".join(part.read_bytes() for part in sorted(db.parent.glob(db.name + "*")))


# ---------------------------------------------------------------- not JSON, not an object


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param('{"request_id": "bad-1", "timestamp": "2026-11-24T10:15:02Z", "mod', id="truncated"),
        pytest.param("hello world", id="text"),
        pytest.param("{'request_id': 'bad-1'}", id="single-quotes"),
        pytest.param('{"request_id": "bad-1",}', id="trailing-comma"),
        pytest.param("}{", id="braces"),
    ],
)
def test_not_json_is_dead_lettered(store: Store, tmp_path: Path, bad: str) -> None:
    path = sandwich(tmp_path / "usage.jsonl", bad.encode())
    assert_sandwich(store, path, ["json"], raw=bad)


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        pytest.param("[1, 2, 3]", "array", id="array"),
        pytest.param(json.dumps([event("in-array", input_tokens=1)]), "array", id="array-of-an-event"),
        pytest.param('"just a string"', "string", id="string"),
        pytest.param("42", "number", id="number"),
        pytest.param("-1.5e3", "number", id="float"),
        pytest.param("true", "boolean", id="boolean"),
        pytest.param("null", "null", id="null"),
    ],
)
def test_json_that_is_not_an_object_is_dead_lettered(store: Store, tmp_path: Path, bad: str, kind: str) -> None:
    path = sandwich(tmp_path / "usage.jsonl", bad.encode())
    assert_sandwich(store, path, ["object", kind], raw=bad)
    assert query(db_of(store), "SELECT count(*) AS n FROM events WHERE request_id = 'in-array'")[0]["n"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-array"),
        pytest.param(
            json.dumps(with_fields(attributes={"project": "@"})).replace('"@"', "[" * 100_000 + "]" * 100_000),
            id="nested-inside-event",
        ),
    ],
)
def test_deeply_nested_json_is_dead_lettered_not_a_crash(store: Store, tmp_path: Path, bad: str) -> None:
    path = sandwich(tmp_path / "usage.jsonl", bad.encode())
    assert_sandwich(store, path, [("json", "object", "nested", "deep")], raw=bad)


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("obj", "words", "request_id"),
    [
        pytest.param(with_fields(request_id=12345), ["request_id", "string"], None, id="request_id-number"),
        pytest.param(with_fields(request_id=["r"]), ["request_id", "string"], None, id="request_id-array"),
        pytest.param(with_fields(usage="lots"), ["usage", "object"], "bad-1", id="usage-string"),
        pytest.param(with_fields(usage=[1, 2]), ["usage", "object"], "bad-1", id="usage-array"),
        pytest.param(with_usage(input_tokens="100"), ["input_tokens", "number"], "bad-1", id="token-string"),
        pytest.param(with_usage(output_tokens=True), ["output_tokens", "number"], "bad-1", id="token-boolean"),
        pytest.param(with_usage(input_tokens={"n": 1}), ["input_tokens"], "bad-1", id="token-object"),
        pytest.param(with_fields(timestamp=1764158400), ["timestamp"], "bad-1", id="timestamp-number"),
        pytest.param(with_fields(attributes=["a", "b"]), ["attributes", "object"], "bad-1", id="attributes-array"),
        pytest.param(with_fields(attributes="project=x"), ["attributes", "object"], "bad-1", id="attributes-string"),
        pytest.param(with_fields(batch="yes"), ["batch"], "bad-1", id="batch-string"),
        pytest.param(with_fields(batch=1), ["batch"], "bad-1", id="batch-number"),
        pytest.param(with_usage(cache_creation=[2048, 0]), ["cache_creation", "object"], "bad-1", id="cache-list"),
        pytest.param(
            with_usage(cache_creation={"ephemeral_1h_input_tokens": "7"}),
            ["ephemeral_1h_input_tokens"],
            "bad-1",
            id="cache-detail-string",
        ),
        pytest.param(with_usage(server_tool_use=[1]), ["server_tool_use"], "bad-1", id="server_tool_use-list"),
        pytest.param(with_usage(service_tier=5), ["service_tier"], "bad-1", id="service_tier-number"),
        pytest.param(with_fields(model=42), ["model", "string"], "bad-1", id="model-number"),
        pytest.param(with_fields(status="200"), ["status"], "bad-1", id="status-string"),
        pytest.param(with_fields(latency_ms="fast"), ["latency_ms"], "bad-1", id="latency-string"),
    ],
)
def test_wrong_type_is_dead_lettered_with_the_field(
    store: Store, tmp_path: Path, obj: dict[str, Any], words: list[str], request_id: str | None
) -> None:
    line = json.dumps(obj)
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    letter = assert_sandwich(store, path, words, raw=line)
    assert letter["request_id"] == request_id


# ---------------------------------------------------------------- token counts: negative, fractional, too large


TOKEN_FIELDS = [
    ("input_tokens", lambda v: with_usage(input_tokens=v)),
    ("output_tokens", lambda v: with_usage(output_tokens=v)),
    ("cache_creation_input_tokens", lambda v: with_usage(cache_creation_input_tokens=v)),
    ("cache_read_input_tokens", lambda v: with_usage(cache_read_input_tokens=v)),
    ("ephemeral_5m_input_tokens", lambda v: with_usage(cache_creation={"ephemeral_5m_input_tokens": v})),
    ("ephemeral_1h_input_tokens", lambda v: with_usage(cache_creation={"ephemeral_1h_input_tokens": v})),
    ("web_search_requests", lambda v: with_usage(server_tool_use={"web_search_requests": v})),
]


@pytest.mark.parametrize(("field", "build"), TOKEN_FIELDS, ids=[f for f, _ in TOKEN_FIELDS])
def test_negative_token_count_is_dead_lettered(store: Store, tmp_path: Path, field: str, build: Any) -> None:
    line = json.dumps(build(-1))
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    assert_sandwich(store, path, [field, "negative"], raw=line, request_id="bad-1")


@pytest.mark.parametrize(("field", "build"), TOKEN_FIELDS, ids=[f for f, _ in TOKEN_FIELDS])
def test_fractional_token_count_is_dead_lettered(store: Store, tmp_path: Path, field: str, build: Any) -> None:
    line = json.dumps(build(1.5))
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    assert_sandwich(store, path, [field, ("fractional", "whole")], raw=line, request_id="bad-1")


@pytest.mark.parametrize(("field", "build"), TOKEN_FIELDS, ids=[f for f, _ in TOKEN_FIELDS])
def test_token_count_over_ten_million_is_dead_lettered(store: Store, tmp_path: Path, field: str, build: Any) -> None:
    line = json.dumps(build(10_000_001))
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    assert_sandwich(store, path, [field, ("limit", "10,000,000", "10000000")], raw=line, request_id="bad-1")


def test_whole_float_and_the_exact_limit_are_accepted(store: Store, tmp_path: Path) -> None:
    whole = event("whole-float", input_tokens=2.0, output_tokens=3.0, cache_read_input_tokens=4.0)
    at_limit = event(
        "at-limit",
        input_tokens=10_000_000,
        output_tokens=10_000_000,
        cache_read_input_tokens=10_000_000,
        cache_creation_input_tokens=10_000_000,
    )
    path = jsonl(tmp_path / "usage.jsonl", GOOD_BEFORE, whole, at_limit, GOOD_AFTER)
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 4, "duplicates": 0, "rejected": 0, "unpriced": 0}
    db = db_of(store)
    assert letters(db) == []
    rows = {
        r["request_id"]: r
        for r in query(
            db, "SELECT request_id, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens FROM events"
        )
    }
    assert set(rows) == {"good-before", "good-after", "whole-float", "at-limit"}
    assert (rows["whole-float"]["input_tokens"], rows["whole-float"]["output_tokens"]) == (2, 3)
    assert rows["whole-float"]["cache_read_tokens"] == 4
    assert all(type(rows["whole-float"][k]) is int for k in ("input_tokens", "output_tokens", "cache_read_tokens"))
    assert rows["at-limit"]["input_tokens"] == 10_000_000
    assert rows["at-limit"]["output_tokens"] == 10_000_000
    assert rows["at-limit"]["cache_read_tokens"] == 10_000_000
    assert rows["at-limit"]["cache_write_5m_tokens"] == 10_000_000


# ---------------------------------------------------------------- timestamps


def test_timestamp_more_than_24h_ahead_of_the_clock_is_dead_lettered(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    limit = clock.now + timedelta(hours=24)
    at_limit = event("at-limit", timestamp=limit.strftime("%Y-%m-%dT%H:%M:%SZ"), input_tokens=1)
    at_limit_naive = event("at-limit-naive", timestamp=limit.strftime("%Y-%m-%dT%H:%M:%S"), input_tokens=1)
    at_limit_offset = event("at-limit-offset", timestamp=limit.astimezone().isoformat(), input_tokens=1)
    over = limit + timedelta(seconds=1)
    too_far = [
        event("over-z", timestamp=over.strftime("%Y-%m-%dT%H:%M:%SZ"), input_tokens=1),
        event("over-naive", timestamp=over.strftime("%Y-%m-%dT%H:%M:%S"), input_tokens=1),
        # 13:00:01+01:00 is 12:00:01Z: the offset must be applied, not ignored.
        event("over-offset", timestamp=(over + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00"), input_tokens=1),
        event("far-future", timestamp="2099-01-01T00:00:00Z", input_tokens=1),
    ]
    lines = [GOOD_BEFORE, at_limit, *too_far, at_limit_naive, at_limit_offset, GOOD_AFTER]
    path = jsonl(tmp_path / "usage.jsonl", *lines)

    result = ingest(store, path)

    assert result.as_dict() == {"accepted": 5, "duplicates": 0, "rejected": 4, "unpriced": 0}
    db = db_of(store)
    stored = {r["request_id"]: r["ts"] for r in query(db, "SELECT request_id, ts FROM events")}
    assert set(stored) == {"good-before", "good-after", "at-limit", "at-limit-naive", "at-limit-offset"}
    dead = letters(db)
    assert [d["location"] for d in dead] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert [d["request_id"] for d in dead] == ["over-z", "over-naive", "over-offset", "far-future"]
    for letter, obj in zip(dead, too_far, strict=True):
        assert_reason(letter["reason"], ["timestamp", "future"])
        assert letter["raw"] == json.dumps(obj)
        assert str(path) in letter["source"]


def test_the_future_limit_follows_the_injected_clock(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    clock.now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    line = event("in-2031", timestamp="2030-06-02T12:00:00Z", input_tokens=1)
    path = sandwich(tmp_path / "usage.jsonl", dumps(line))
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 3, "duplicates": 0, "rejected": 0, "unpriced": 0}
    assert letters(db_of(store)) == []


@pytest.mark.parametrize(
    "timestamp",
    [
        "yesterday",
        "",
        "   ",
        "2026-13-45T10:15:02Z",
        "2026-11-24T25:61:00Z",
        "2026-02-30T10:15:02Z",
        "24/11/2026 10:15:02",
        "2026-11-24T10:15:02Zjunk",
        "not-a-timestamp-but-long-enough",
    ],
)
def test_unparseable_timestamp_is_dead_lettered(store: Store, tmp_path: Path, timestamp: str) -> None:
    line = json.dumps(with_fields(timestamp=timestamp))
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    assert_sandwich(store, path, ["timestamp"], raw=line, request_id="bad-1")


# ---------------------------------------------------------------- required fields


@pytest.mark.parametrize("how", ["missing", "null"])
@pytest.mark.parametrize("field", ["request_id", "model", "usage", "timestamp"])
def test_missing_or_null_required_field_is_dead_lettered(store: Store, tmp_path: Path, field: str, how: str) -> None:
    obj = without(field) if how == "missing" else with_fields(**{field: None})
    line = json.dumps(obj)
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    letter = assert_sandwich(store, path, [field, ("missing", "required")], raw=line)
    assert letter["request_id"] == (None if field == "request_id" else "bad-1")


@pytest.mark.parametrize("field", ["request_id", "model"])
def test_empty_request_id_or_model_is_dead_lettered(store: Store, tmp_path: Path, field: str) -> None:
    line = json.dumps(with_fields(**{field: "  "}))
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    assert_sandwich(store, path, [field], raw=line)


@pytest.mark.parametrize("field", ["request_id", "model"])
def test_lone_surrogate_in_a_string_field_does_not_lose_the_batch(store: Store, tmp_path: Path, field: str) -> None:
    line = json.dumps(with_fields(**{field: "bad-\ud800"}))  # json.dumps writes it as the escape \ud800
    assert "\\ud800" in line
    path = sandwich(tmp_path / "usage.jsonl", line.encode())
    result = ingest(store, path)
    db = db_of(store)
    # Either outcome is fine (rejected with a reason, or stored with a replacement character); a crash is not.
    stored = {r["request_id"] for r in query(db, "SELECT request_id FROM events")}
    assert {"good-before", "good-after"} <= stored
    assert result.accepted + result.rejected == 3
    assert len(stored) + len(letters(db)) == 3


# ---------------------------------------------------------------- bytes: UTF-8, line length, blanks, last line


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b'{"request_id": "bad-1", "model": "caf\xe9"}', id="latin-1"),
        pytest.param(b'{"request_id": "bad-1", "x": "\xff\xfe"}', id="invalid-bytes"),
        pytest.param(b'{"request_id": "bad-1", "x": "\xe2\x82"}', id="truncated-sequence"),
        pytest.param(b"\xed\xa0\x80 surrogate encoded", id="encoded-surrogate"),
    ],
)
def test_line_that_is_not_utf8_is_dead_lettered(store: Store, tmp_path: Path, bad: bytes) -> None:
    path = sandwich(tmp_path / "usage.jsonl", bad)
    letter = assert_sandwich(store, path, ["utf-8"], raw=None)
    # The raw text keeps every readable part of the line; the undecodable bytes are marked, not dropped silently.
    for piece in re.findall(rb"[ -~]{3,}", bad):
        assert piece.decode() in letter["raw"]
    assert "\ufffd" in letter["raw"]


@pytest.mark.parametrize("size", [MIB + 1, 3 * MIB + 17])
def test_line_over_one_mib_is_dead_lettered_and_the_next_line_still_read(
    store: Store, tmp_path: Path, size: int
) -> None:
    long_line = padded("too-long", size)
    path = sandwich(tmp_path / "usage.jsonl", long_line)
    letter = assert_sandwich(store, path, [("limit", "long", "1 mib", "1,048,576")], raw=None)
    assert letter["raw"], "the raw text (at least its start) is kept"
    assert long_line.decode().startswith(letter["raw"])
    assert '"request_id": "too-long"' in letter["raw"]
    assert query(db_of(store), "SELECT count(*) AS n FROM events WHERE request_id = 'too-long'")[0]["n"] == 0


def test_line_of_exactly_one_mib_is_accepted(store: Store, tmp_path: Path) -> None:
    path = sandwich(tmp_path / "usage.jsonl", padded("exactly-1-mib", MIB))
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 3, "duplicates": 0, "rejected": 0, "unpriced": 0}
    assert letters(db_of(store)) == []


def test_over_long_last_line_without_newline_is_dead_lettered(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(dumps(GOOD_BEFORE) + b"\n" + dumps(GOOD_AFTER) + b"\n" + padded("too-long", 2 * MIB))
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 1, "unpriced": 0}
    [letter] = letters(db_of(store))
    assert letter["location"] == f"{path}:3"


def test_blank_lines_are_skipped_not_rejected(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(
        b"\n"
        + dumps(GOOD_BEFORE)
        + b"\n\n   \n\t\n\r\n"
        + b"not json\n"  # line 7: numbering counts the blank lines
        + b" \t \n"
        + dumps(GOOD_AFTER)
        + b"\r\n\n\n"
    )
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 1, "unpriced": 0}
    db = db_of(store)
    [letter] = letters(db)
    assert letter["location"] == f"{path}:7"
    assert letter["raw"] == "not json"
    assert token_rows(db) == GOOD_ROWS


def test_only_blank_lines_is_an_empty_ingest(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b"\n\n  \n\r\n")
    assert ingest(store, path).as_dict() == {"accepted": 0, "duplicates": 0, "rejected": 0, "unpriced": 0}
    assert letters(db_of(store)) == []


@pytest.mark.parametrize("ending", [b"", b"\r"])
def test_final_line_without_newline_is_ingested(store: Store, tmp_path: Path, ending: bytes) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(dumps(GOOD_BEFORE) + b"\n" + dumps(GOOD_AFTER) + ending)
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 0, "unpriced": 0}
    assert token_rows(db_of(store)) == GOOD_ROWS


def test_bad_final_line_without_newline_is_dead_lettered(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(dumps(GOOD_BEFORE) + b"\n" + dumps(GOOD_AFTER) + b"\n" + b'{"request_id": "cut-off"')
    result = ingest(store, path)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 1, "unpriced": 0}
    [letter] = letters(db_of(store))
    assert (letter["location"], letter["raw"]) == (f"{path}:3", '{"request_id": "cut-off"')


# ---------------------------------------------------------------- Anthropic keys


def test_anthropic_keys_are_stored_only_as_fingerprints(store: Store, tmp_path: Path) -> None:
    accepted = event("with-key", input_tokens=1)
    accepted["attributes"] = {
        "api_key": SECRET,
        "user": f"Bearer {OTHER_SECRET}",
        "feature": "x" * 100 + SECRET,  # the key straddles the 128-character cut
    }
    rejected_json = with_usage(output_tokens=-1)
    rejected_json["attributes"] = {"api_key": SECRET}
    path = tmp_path / "usage.jsonl"
    path.write_bytes(
        lines(
            dumps(GOOD_BEFORE),
            dumps(accepted),
            f"curl -H 'x-api-key: {SECRET}' oops".encode(),  # line 3: not JSON
            dumps(rejected_json),  # line 4: negative tokens
            b"\xff\xfe " + SECRET.encode(),  # line 5: not UTF-8
            b'{"request_id": "long", "k": "' + SECRET.encode() + b'", "pad": "' + b"x" * MIB + b'"}',  # 6: too long
            dumps(with_fields(timestamp=SECRET)),  # line 7: the key where the timestamp goes
            dumps(GOOD_AFTER),
        )
    )

    result = ingest(store, path)
    store.close()  # checkpoint the WAL so the file holds everything; the bytes of every side file are read anyway

    assert result.as_dict() == {"accepted": 3, "duplicates": 0, "rejected": 5, "unpriced": 0}
    db = db_of(store)
    [row] = query(db, "SELECT attributes FROM events WHERE request_id = 'with-key'")
    attributes = json.loads(row["attributes"])
    fingerprint = attributes["api_key"]
    assert fingerprint.startswith("sk-ant-…")
    assert fingerprint != SECRET and len(fingerprint) < len(SECRET)
    assert attributes["user"].startswith("Bearer sk-ant-…")
    other_fingerprint = attributes["user"].removeprefix("Bearer ")
    assert other_fingerprint != fingerprint, "different keys get different fingerprints"
    assert attributes["feature"].startswith("x" * 100 + "sk-ant-")
    assert len(attributes["feature"]) <= 128

    dead = letters(db)
    assert [d["location"] for d in dead] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7)]
    for letter in dead:
        assert "sk-ant-…" in letter["raw"], letter["location"]
        assert not leaked(SECRET, letter["raw"].encode()), letter["location"]
        assert not leaked(SECRET, letter["reason"].encode()), letter["location"]
    # The same key gives the same fingerprint wherever it is met, so a leak can be traced without storing the key.
    for letter in dead[:2]:
        assert fingerprint in letter["raw"]
    assert dead[0]["raw"] == f"curl -H 'x-api-key: {fingerprint}' oops"

    blob = database_bytes(db)
    assert SECRET.encode() not in blob and OTHER_SECRET.encode() not in blob
    assert leaked(SECRET, blob) == [] and leaked(OTHER_SECRET, blob) == []


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(with_usage(service_tier=SECRET), id="accepted-service_tier"),
        pytest.param(with_usage(speed=SECRET), id="accepted-speed"),
        pytest.param(with_usage(output_tokens=SECRET), id="rejected-token-count"),
        pytest.param(with_fields(timestamp=SECRET), id="rejected-timestamp"),
    ],
)
def test_json_escaped_key_is_not_stored(store: Store, tmp_path: Path, obj: dict[str, Any]) -> None:
    escaped = json.dumps(obj).replace("sk-ant-", "sk\\u002dant-")
    assert json.loads(escaped) == obj
    path = sandwich(tmp_path / "usage.jsonl", escaped.encode())
    result = ingest(store, path)
    store.close()
    assert result.accepted == 3 or result.rejected == 1
    assert leaked(SECRET, database_bytes(db_of(store))) == []


# ---------------------------------------------------------------- attributes, optional and null fields


def test_attribute_rules_keep_the_event(store: Store, tmp_path: Path) -> None:
    labelled = event("labelled", input_tokens=1)
    labelled["attributes"] = {
        "project": "lingo",
        "team": "growth",  # not a dimension: dropped
        "cost_center": 42,  # not a dimension: dropped
        "user": 12345,
        "environment": True,
        "feature": 1.5,
        "api_key": "k" * 200,
    }
    odd = event("odd-values", input_tokens=1)
    odd["attributes"] = {
        "project": {"name": "lingo"},
        "user": ["u-1"],
        "feature": None,
        "environment": False,
        "api_key": "é" * 129,
    }
    exact = event("exact-128", input_tokens=1)
    exact["attributes"] = {"project": "p" * 128, "user": "u" * 129}
    empty = event("empty-attributes", input_tokens=1)
    empty["attributes"] = {}
    null = event("null-attributes", input_tokens=1)
    null["attributes"] = None
    path = jsonl(tmp_path / "usage.jsonl", GOOD_BEFORE, labelled, odd, exact, empty, null, GOOD_AFTER)

    result = ingest(store, path)

    assert result.as_dict() == {"accepted": 7, "duplicates": 0, "rejected": 0, "unpriced": 0}
    assert result.attributes_dropped == 2 + 3
    db = db_of(store)
    assert letters(db) == []
    stored = {
        r["request_id"]: json.loads(r["attributes"]) for r in query(db, "SELECT request_id, attributes FROM events")
    }
    assert stored["labelled"] == {
        "project": "lingo",
        "user": "12345",
        "environment": "true",
        "feature": "1.5",
        "api_key": "k" * 128,
    }
    assert stored["odd-values"] == {"environment": "false", "api_key": "é" * 128}
    assert stored["exact-128"] == {"project": "p" * 128, "user": "u" * 128}
    assert stored["empty-attributes"] == {} and stored["null-attributes"] == {}
    assert stored["good-before"] == {} and stored["good-after"] == {}


def test_optional_fields_may_be_missing_or_null(store: Store, tmp_path: Path) -> None:
    bare = event("bare", input_tokens=1)
    nulls = {**event("nulls", input_tokens=1), "batch": None, "status": None, "latency_ms": None, "attributes": None}
    full = {**event("full", input_tokens=1), "batch": True, "status": 529, "latency_ms": 812}
    path = jsonl(tmp_path / "usage.jsonl", bare, nulls, full)
    assert ingest(store, path).as_dict() == {"accepted": 3, "duplicates": 0, "rejected": 0, "unpriced": 0}
    db = db_of(store)
    assert letters(db) == []
    rows = {r["request_id"]: r for r in query(db, "SELECT request_id, batch, status, latency_ms FROM events")}
    for request_id in ("bare", "nulls"):
        assert (rows[request_id]["batch"], rows[request_id]["status"], rows[request_id]["latency_ms"]) == (
            0,
            None,
            None,
        )
    assert (rows["full"]["batch"], rows["full"]["status"], rows["full"]["latency_ms"]) == (1, 529, 812.0)


def test_null_token_fields_count_as_zero(store: Store, tmp_path: Path) -> None:
    # What `message.usage.model_dump()` writes when the API leaves parts out.
    dumped = event(
        "model-dump",
        input_tokens=100,
        output_tokens=20,
        cache_creation_input_tokens=None,
        cache_read_input_tokens=None,
        cache_creation=None,
        server_tool_use=None,
        service_tier=None,
    )
    inner_nulls = event(
        "inner-nulls",
        input_tokens=None,
        output_tokens=None,
        cache_creation_input_tokens=None,
        cache_read_input_tokens=None,
        cache_creation={"ephemeral_5m_input_tokens": None, "ephemeral_1h_input_tokens": None},
        server_tool_use={"web_search_requests": None, "web_fetch_requests": None},
    )
    empty = event("empty-usage")
    path = jsonl(tmp_path / "usage.jsonl", dumped, inner_nulls, empty)
    assert ingest(store, path).as_dict() == {"accepted": 3, "duplicates": 0, "rejected": 0, "unpriced": 0}
    db = db_of(store)
    assert letters(db) == []
    columns = (
        "input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
        "web_search_requests, web_fetch_requests"
    )
    rows = {r.pop("request_id"): r for r in query(db, f"SELECT request_id, cost_pico, {columns} FROM events")}
    assert [rows["model-dump"][c.strip()] for c in columns.split(",")] == [100, 20, 0, 0, 0, 0, 0]
    assert [rows["inner-nulls"][c.strip()] for c in columns.split(",")] == [0] * 7
    assert [rows["empty-usage"][c.strip()] for c in columns.split(",")] == [0] * 7
    # Haiku 4.5 by hand: 100 input x $1/M + 20 output x $5/M = $0.0002 = 2 x 10^8 pico-dollars; the nulls add nothing.
    assert rows["model-dump"]["cost_pico"] == 200_000_000
    assert rows["inner-nulls"]["cost_pico"] == 0


# ---------------------------------------------------------------- re-reading a file


def test_same_file_twice_adds_nothing(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(
        lines(
            dumps(GOOD_BEFORE),
            b"not json",
            dumps(with_usage(output_tokens=-1)),
            b"\xff",
            padded("too-long", MIB + 1),
            dumps(GOOD_AFTER),
            dumps(GOOD_BEFORE),  # the same request twice in one file is one request
        )
    )
    first = ingest(store, path)
    assert first.as_dict() == {"accepted": 2, "duplicates": 1, "rejected": 4, "unpriced": 0}
    db = db_of(store)
    letters_before = query(db, "SELECT * FROM dead_letters ORDER BY id")
    events_before = query(db, "SELECT * FROM events ORDER BY id")
    assert len(letters_before) == 4 and len(events_before) == 2

    second = ingest(store, path)

    assert (second.accepted, second.duplicates, second.unpriced) == (0, 3, 0)
    assert query(db, "SELECT * FROM dead_letters ORDER BY id") == letters_before
    assert query(db, "SELECT * FROM events ORDER BY id") == events_before


# ---------------------------------------------------------------- the real command line


@pytest.mark.slow
def test_cli_ingest_of_a_file_with_every_bad_class(tmp_path: Path, config_path: Path) -> None:
    now = datetime.now(UTC)
    stamp = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def good(n: int) -> bytes:
        obj = event(f"good-{n}", timestamp=stamp, input_tokens=1000 * n, output_tokens=n)
        obj["attributes"] = {"project": "lingo", "api_key": SECRET}
        return dumps(obj)

    def bad(**changes: Any) -> bytes:
        obj = event("bad", timestamp=stamp, input_tokens=5, output_tokens=1)
        obj["usage"].update(changes.pop("tokens", {}))
        obj.update(changes)  # a value of ... removes the field
        return dumps({k: v for k, v in obj.items() if v is not ...})

    bad_lines = [
        b"{not json " + SECRET.encode(),
        b"[1, 2, 3]",
        b'"a string"',
        b"42",
        bad(request_id=12345),
        bad(usage="lots"),
        bad(tokens={"input_tokens": "100"}),
        bad(timestamp=1764158400),
        bad(attributes=["a"]),
        bad(batch="yes"),
        bad(tokens={"cache_creation": [1, 2]}),
        bad(tokens={"output_tokens": -1}),
        bad(tokens={"output_tokens": 1.5}),
        bad(tokens={"input_tokens": 10_000_001}),
        bad(timestamp=(now + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")),
        bad(timestamp="yesterday"),
        bad(request_id=...),
        bad(model=...),
        bad(usage=...),
        bad(request_id=None),
        bad(model=None),
        bad(usage=None),
        b'{"request_id": "latin", "model": "caf\xe9"}',
        padded("too-long", MIB + 1),
    ]
    parts: list[bytes] = []
    bad_line_numbers = []
    for n, line in enumerate(bad_lines):
        parts += [good(n), line, *([b"", b"  "] if n % 5 == 0 else [])]  # blank lines now and then
        bad_line_numbers.append(len(parts) - (2 if n % 5 == 0 else 0))
    parts += [good(len(bad_lines)), b""]
    body = lines(*parts) + dumps(event("last", timestamp=stamp, input_tokens=7))  # the last line has no newline
    path = tmp_path / "usage.jsonl"
    path.write_bytes(body)
    good_count = len(bad_lines) + 2

    run = run_cli("ingest", str(path), "--format", "json", "--config", str(config_path))

    summary = run.json()
    assert {k: summary[k] for k in ("accepted", "duplicates", "rejected", "unpriced")} == {
        "accepted": good_count,
        "duplicates": 0,
        "rejected": len(bad_lines),
        "unpriced": 0,
    }
    assert SECRET not in run.stdout + run.stderr
    db = tmp_path / "monitor.db"
    assert query(db, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == len(bad_lines)
    assert query(db, "SELECT count(*) AS n FROM events")[0]["n"] == good_count
    dead = letters(db)
    assert [d["location"] for d in dead] == [f"{path}:{n}" for n in bad_line_numbers]
    assert all(d["raw"] and d["reason"] for d in dead)
    stored = {r["request_id"]: r["input_tokens"] for r in query(db, "SELECT request_id, input_tokens FROM events")}
    assert stored == {**{f"good-{n}": 1000 * n for n in range(len(bad_lines) + 1)}, "last": 7}

    again = run_cli("ingest", str(path), "--format", "json", "--config", str(config_path)).json()
    assert (again["accepted"], again["duplicates"]) == (0, good_count)
    assert query(db, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == len(bad_lines)
    assert query(db, "SELECT count(*) AS n FROM events")[0]["n"] == good_count
    assert leaked(SECRET, database_bytes(db)) == []
