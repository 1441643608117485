"""The typed decoding of the common line shape gives exactly what the general way (decode, then validate field by
field) gives: the same event for every line it takes, and every other line left to the general way."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import simulate
from monitor.ingest.parse import _FAST_LINE, Event, EventParser, redact
from tests.fuzzing import DIMENSIONS, dumps, events, json_values, lines

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PARSER = EventParser(DIMENSIONS[:4], lambda: NOW)  # environment is not kept: an attribute to drop


def general(line: str) -> object:
    return PARSER._general(redact(line), NOW)


# Edge values for any one field: empty, long, blank, key-like, non-ASCII and control text, numbers at and past each
# limit, floats where integers go, the wrong JSON types.
edges = st.one_of(
    st.sampled_from(["", " ", "x" * 32, "x" * 33, "x" * 255, "x" * 256, "\t", "é", "sk-ant-abc", "\u2028"]),
    st.sampled_from([0, -1, 999, 1000, 10_000_000, 10_000_001, 2**63, 2**64 + 1, 5.0, 5.5, -0.0, 1e300, True]),
    json_values,
)
VALID = {
    "request_id": st.sampled_from(["req_1", "r-2", "x" * 255]),
    "timestamp": st.sampled_from(["2026-11-24T10:15:02Z", "2026-11-26T11:59:59.123456+00:00", "2026-11-27T11:59Z"]),
    "model": st.sampled_from(["claude-haiku-4-5", "claude-opus-4-5", "mystery"]),
    "input_tokens": st.integers(0, 10_000_000),
    "output_tokens": st.integers(0, 10_000_000),
    "cache_read_input_tokens": st.integers(0, 10_000_000),
    "cache_creation_input_tokens": st.integers(0, 10_000_000),
    "ephemeral_5m_input_tokens": st.integers(0, 10_000_000),
    "ephemeral_1h_input_tokens": st.integers(0, 10_000_000),
    "web_search_requests": st.integers(0, 100),
    "web_fetch_requests": st.integers(0, 100),
    "service_tier": st.sampled_from(["standard", "priority", "batch", None]),
    "speed": st.sampled_from(["standard", "fast", None]),
    "inference_geo": st.sampled_from(["us", "global", None]),
    "batch": st.sampled_from([True, False, None]),
    "status": st.sampled_from([200, 429, 500, None]),
    "latency_ms": st.sampled_from([0, 12, 37.5, None]),
    "lease": st.sampled_from(["lease-1", None]),
    "attributes": st.dictionaries(st.sampled_from([*DIMENSIONS, "other"]), st.sampled_from(["a", "b", 1]), max_size=4),
}


@st.composite
def near_valid_lines(draw: st.DrawFn) -> str:
    """A valid event but for one or two fields set to an edge value (or left out)."""
    values = {name: draw(strategy) for name, strategy in VALID.items()}
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2)):
        values[name] = draw(st.one_of(edges, st.just(None)))
    usage_keys = ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
    usage = {key: values[key] for key in usage_keys}
    usage["cache_creation"] = {
        "ephemeral_5m_input_tokens": values["ephemeral_5m_input_tokens"],
        "ephemeral_1h_input_tokens": values["ephemeral_1h_input_tokens"],
    }
    usage["server_tool_use"] = {key: values[key] for key in ("web_search_requests", "web_fetch_requests")}
    usage.update({key: values[key] for key in ("service_tier", "speed", "inference_geo")})
    event = {key: values[key] for key in ("request_id", "timestamp", "model")}
    event["usage"] = usage
    event.update({key: values[key] for key in ("batch", "status", "latency_ms", "lease", "attributes")})
    return json.dumps(event)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(near_valid_lines(), lines, events.map(dumps), events.map(lambda event: json.dumps(event, indent=1))))
def test_every_line_parses_as_the_general_way_parses_it(line: str) -> None:
    assert PARSER.parse_line(line, NOW) == general(line)


@pytest.mark.parametrize(
    "line",
    [
        # Values the typed fields refuse and the general way takes: a count written as a float, numbers past 64 bits
        # in attributes, a key in a value, non-ASCII text, a nested attribute, duplicate keys (the last one wins).
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {"input_tokens": 5.0}}',
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}, '
        '"attributes": {"user": 18446744073709551616, "project": 1e300, "feature": {"a": 1}}}',
        '{"request_id": "r sk-ant-api03-abc", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}}',
        '{"request_id": "r\\u00e9", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}}',
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {"speed": "x"}, '
        '"usage": {"input_tokens": 3}}',
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02+05:30", "model": "m", "usage": '
        '{"cache_creation_input_tokens": 9, "cache_creation": {"ephemeral_1h_input_tokens": 4}}, "latency_ms": 7}',
        '{"request_id": "r", "timestamp": "2026-11-28T10:15:02Z", "model": "m", "usage": {}}',  # too far ahead
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}, "status": 1000}',
        '{"request_id": "r", "timestamp": "2026-11-24T10:15:02Z", "model": "m", "usage": {}, "x": '
        + "[" * 70
        + "]" * 70
        + "}",
    ],
)
def test_lines_off_the_common_shape_are_decided_the_general_way(line: str) -> None:
    assert PARSER.parse_line(line, NOW) == general(line)


def test_simulated_lines_take_the_typed_way_and_give_the_same_events() -> None:
    generated = list(
        simulate.generate_events(
            count=2000, start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 11, 26, tzinfo=UTC), seed=5
        )
    )
    for line in generated:
        parsed = PARSER.parse_line(line, NOW)
        assert isinstance(parsed, Event)
        assert parsed == general(line)
    # Every one of them has the common shape: none needed the general way.
    shaped = [PARSER._fast(_FAST_LINE.decode(redact(line)), NOW) for line in generated]
    assert all(isinstance(event, Event) for event in shaped)
