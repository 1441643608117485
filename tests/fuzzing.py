"""Hypothesis strategies shared by the property-based tests: JSON-ish values, near-valid usage events, bodies."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

DIMENSIONS = ["api_key", "project", "user", "feature", "environment"]
# Something shaped like an Anthropic key, so the redaction rules are exercised by the generated input too.
KEYLIKE = st.from_regex(r"sk-ant-[A-Za-z0-9_\-]{1,40}", fullmatch=True)

# JSON scalars, strings with the odd key, surrogate escape or control character among them.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    KEYLIKE,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
# What Python's json module also produces and accepts (NaN, Infinity), and numbers past every limit.
odd_numbers = st.one_of(
    st.floats(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 0.5, 1e308, 10_000_000, 10_000_001, 2**63, -(2**63)]),
)

timestamps = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    st.from_regex(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?", fullmatch=True),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-02-30T10:00:00Z",
            "2026-11-24T25:61:61Z",
            "2026-11-24T10:15:02.123Z",
        ]
    ),
    json_values,
)
token_counts = st.one_of(st.integers(min_value=0, max_value=10_000_000), odd_numbers, json_values)


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes any JSON value: most events get deep into validation before failing."""
    return st.one_of(valid, valid, valid, json_values)


usage_objects = st.fixed_dictionaries(
    {},
    optional={
        "input_tokens": token_counts,
        "output_tokens": token_counts,
        "cache_creation_input_tokens": token_counts,
        "cache_read_input_tokens": token_counts,
        "cache_creation": _maybe(
            st.fixed_dictionaries(
                {}, optional={"ephemeral_5m_input_tokens": token_counts, "ephemeral_1h_input_tokens": token_counts}
            )
        ),
        "server_tool_use": _maybe(
            st.fixed_dictionaries(
                {}, optional={"web_search_requests": token_counts, "web_fetch_requests": token_counts}
            )
        ),
        "service_tier": _maybe(st.sampled_from(["standard", "priority", "batch"]) | st.text(max_size=40)),
        "speed": _maybe(st.sampled_from(["standard", "fast"]) | st.text(max_size=40)),
        "inference_geo": _maybe(st.sampled_from(["us", "global", "not_available"]) | st.text(max_size=40)),
    },
)
attribute_maps = st.dictionaries(
    st.sampled_from(DIMENSIONS) | st.text(max_size=12),
    st.one_of(st.text(max_size=200), KEYLIKE, json_values),
    max_size=6,
)
models = st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-5-20250929", "claude-opus-4-5"]) | st.text(max_size=300)
events = st.fixed_dictionaries(
    {
        "request_id": _maybe(st.text(min_size=1, max_size=300) | KEYLIKE),
        "timestamp": timestamps,
        "model": _maybe(models),
        "usage": _maybe(usage_objects),
    },
    optional={
        "attributes": _maybe(attribute_maps),
        "batch": _maybe(st.booleans()),
        "status": _maybe(st.integers(min_value=-5, max_value=1200)),
        "latency_ms": _maybe(st.floats(min_value=0, allow_nan=False, allow_infinity=False)),
        "lease": json_values,
    },
)


def dumps(value: Any) -> str:
    """JSON text as a client would send it (NaN and Infinity included, as Python writes them)."""
    return json.dumps(value)


# One line of a JSONL file or NDJSON body: an event (valid or nearly), any JSON value, or any text.
lines = st.one_of(events.map(dumps), json_values.map(dumps), st.text(max_size=200))
