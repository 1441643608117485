"""Property-based tests of the event parser: any input is an accepted event or a rejection with a reason, fast.

Never an exception (one would stop a tailed file at that line, or leave an ingest request unanswered), and every
accepted event within the documented bounds, whatever the bytes.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from monitor.ingest.parse import Event, EventParser, Rejected
from tests.fuzzing import DIMENSIONS, dumps, events, json_values, lines

# Fuzzes the parser at length: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
# A parse is microseconds; half a second is an unmistakable hang (a regex gone quadratic, a runaway loop) even on a
# busy machine, and the deadline replaces any sleep or timer in the test.
FAST = settings(deadline=timedelta(milliseconds=500), max_examples=200, suppress_health_check=[HealthCheck.too_slow])
# A key as sent: "sk-ant-" followed by key characters. Redacted text has "sk-ant-…" + a hash instead.
RAW_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]")

# Text as the tail and ingest paths can hand it over: any Unicode, lone surrogates (from "\ud83d" escapes) too.
any_text = st.text(st.characters(codec=None) | st.characters(categories=["Cs"]), max_size=300)
escaped_surrogates = st.lists(
    st.sampled_from(['"\\ud83d"', '"\\udc00x"', '{"request_id": "\\ud800"}', '"sk-ant\\u002dabc"']), max_size=3
).map(lambda parts: "[" + ", ".join(parts) + "]")


def parser() -> EventParser:
    return EventParser(DIMENSIONS, lambda: NOW)


def check(result: Any) -> None:
    """The parser's contract for one result."""
    assert isinstance(result, Event | Rejected), result
    if isinstance(result, Rejected):
        assert isinstance(result.reason, str) and result.reason.strip(), result
        assert isinstance(result.raw, str), result
        assert not RAW_KEY.search(result.reason), result.reason
        assert not RAW_KEY.search(result.raw), result.raw
        return
    assert result.request_id.strip() and len(result.request_id) <= 255
    assert result.model_id.strip() and len(result.model_id) <= 255
    assert result.timestamp.tzinfo is not None and result.timestamp.utcoffset() == timedelta(0)
    assert result.timestamp <= NOW + timedelta(hours=24)
    counts = (
        result.input_tokens,
        result.output_tokens,
        result.cache_read_tokens,
        result.cache_write_5m_tokens,
        result.cache_write_1h_tokens,
        result.web_search_requests,
        result.web_fetch_requests,
    )
    for count in counts:
        assert type(count) is int and 0 <= count <= 10_000_000, counts
    assert isinstance(result.batch, bool)
    assert result.status is None or (type(result.status) is int and 0 <= result.status <= 999)
    assert result.latency_ms is None or result.latency_ms >= 0
    for text in (result.request_id, result.model_id, result.service_tier, result.speed, result.inference_geo):
        assert text is None or not RAW_KEY.search(text), text
    for key, value in (result.attributes or {}).items():
        assert key in DIMENSIONS
        assert isinstance(value, str) and len(value) <= 128
        assert not RAW_KEY.search(value), value
        value.encode("utf-8")  # storable: no lone surrogate


@FAST
@given(any_text | escaped_surrogates | lines)
def test_any_line_is_an_event_or_a_rejection(line: str) -> None:
    check(parser().parse_line(line))


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_decoded_as_the_readers_do(data: bytes) -> None:
    for text in (data.decode("utf-8", "replace"), data.decode("latin-1")):
        check(parser().parse_line(text))


@FAST
@given(json_values)
def test_any_json_value_is_an_event_or_a_rejection(value: Any) -> None:
    check(parser().parse_object(value))
    check(parser().parse_line(json.dumps(value)))


@FAST
@given(events)
@example(  # out of datetime's range once turned to UTC
    {"request_id": "r", "timestamp": "0001-01-01T00:00:00+01:00", "model": "claude-haiku-4-5", "usage": {}}
)
@example({"request_id": "r", "timestamp": "9999-12-31T23:59:59-01:00", "model": "claude-haiku-4-5", "usage": {}})
def test_near_valid_events_are_accepted_within_bounds_or_rejected(obj: dict[str, Any]) -> None:
    check(parser().parse_object(obj))
    check(parser().parse_line(dumps(obj)))


@settings(deadline=timedelta(seconds=2), max_examples=20)
@given(st.integers(min_value=1, max_value=100_000), st.sampled_from(["[", '{"a": ', '[{"usage": ']))
def test_deep_nesting_is_rejected_not_raised(depth: int, opener: str) -> None:
    check(parser().parse_line(opener * depth))
    check(parser().parse_line(opener * depth + "1" + ("]" if opener.startswith("[") else "}") * depth))


@FAST
@given(st.text(max_size=20), st.integers(min_value=1000, max_value=20_000))
def test_long_lines_stay_fast(piece: str, times: int) -> None:
    check(parser().parse_line((piece or "x") * times))
    check(parser().parse_object({"request_id": "r", "timestamp": "2026-11-24T10:00:00Z", "model": "m",
                                 "usage": {}, "attributes": {"user": (piece or "x") * times}}))  # fmt: skip
