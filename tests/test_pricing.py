"""Hand-priced requests: each expected dollar amount is worked out by hand from the list prices, never by the code.

Each case parses a usage event dict with the real `EventParser` (so the reading of `usage` is covered too) and
prices it with the real shipped table. Rates are USD per million tokens ("/M"); web search is $10 per 1,000.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from anthropic.types import Usage

from monitor.config import ModelPricing
from monitor.ingest.parse import Event, EventParser
from monitor.pricing import Price, PriceTable, load_price_table, usd
from tests.conftest import FakeClock

DIMENSIONS = ("api_key", "project", "user", "feature", "environment")
WHEN = "2026-11-24T10:15:02.123Z"  # docs/events.md's example event's timestamp; every shipped model has a rate by then

# docs/events.md's example usage event, word for word (on claude-haiku-4-5: in 1, out 5, 5m 1.25, 1h 2, read 0.10 /M).
EXAMPLE_EVENT: dict[str, Any] = {
    "request_id": "req_011CUabc",
    "timestamp": "2026-11-24T10:15:02.123Z",
    "model": "claude-haiku-4-5-20251001",
    "usage": {
        "input_tokens": 1200,
        "output_tokens": 350,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 4096,
        "cache_creation": {"ephemeral_5m_input_tokens": 2048, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": {"web_search_requests": 1},
        "service_tier": "standard",
    },
    "attributes": {
        "api_key": "lingo-prod",
        "project": "lingo",
        "user": "u-123",
        "feature": "grammar-check",
        "environment": "prod",
    },
    "batch": False,
    "status": 200,
    "latency_ms": 812,
}

# One of every token component, 1,000 tokens each, as the 5m/1h split detail says.
EVERY_TOKEN_KIND: dict[str, Any] = {
    "input_tokens": 1000,
    "output_tokens": 1000,
    "cache_creation_input_tokens": 2000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 1000},
    "cache_read_input_tokens": 1000,
}

PriceFn = Callable[..., Price]


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


@pytest.fixture
def parser(clock: FakeClock) -> EventParser:
    return EventParser(DIMENSIONS, clock)


@pytest.fixture
def parse(parser: EventParser) -> Callable[[dict[str, Any]], Event]:
    """Parse one event dict, failing the test if it is rejected."""

    def parse_one(obj: dict[str, Any]) -> Event:
        parsed = parser.parse_object(obj)
        assert isinstance(parsed, Event), parsed
        return parsed

    return parse_one


@pytest.fixture
def price(parse: Callable[[dict[str, Any]], Event], table: PriceTable) -> PriceFn:
    """Price an event built from `model`, `usage` and any other top-level fields, by the shipped table or `table`."""

    def price_one(
        model: str,
        usage: dict[str, Any],
        *,
        timestamp: str = WHEN,
        with_table: PriceTable | None = None,
        **fields: Any,
    ) -> Price:
        obj = {"request_id": "req_hand", "timestamp": timestamp, "model": model, "usage": usage, **fields}
        return (with_table or table).price(parse(obj))

    return price_one


def dollars(price: Price) -> Decimal:
    """The exact USD of a priced event (no arithmetic: pico-dollars shifted 12 places)."""
    assert price.cost_pico is not None, f"{price.model} is unpriced"
    return usd(price.cost_pico)


def override(**entry: Any) -> ModelPricing:
    return ModelPricing.model_validate(entry)


# --- each component alone, claude-haiku-4-5 ------------------------------------------------------------------------

COMPONENTS = [
    pytest.param(
        {"input_tokens": 1200, "output_tokens": 0},
        Decimal("0.0012"),  # 1200 in x $1/M
        id="input",
    ),
    pytest.param(
        {"input_tokens": 0, "output_tokens": 350},
        Decimal("0.00175"),  # 350 out x $5/M
        id="output",
    ),
    pytest.param(
        {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 2048,
            "cache_creation": {"ephemeral_5m_input_tokens": 2048, "ephemeral_1h_input_tokens": 0},
        },
        Decimal("0.00256"),  # 2048 5m writes x $1.25/M = 2560/10^6
        id="cache-write-5m",
    ),
    pytest.param(
        {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 2048,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2048},
        },
        Decimal("0.004096"),  # 2048 1h writes x $2/M = 4096/10^6
        id="cache-write-1h",
    ),
    pytest.param(
        {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 4096},
        Decimal("0.0004096"),  # 4096 reads x $0.10/M = 409.6/10^6 (not the $1/M input price)
        id="cache-read",
    ),
    pytest.param(
        {"input_tokens": 0, "output_tokens": 0, "server_tool_use": {"web_search_requests": 1}},
        Decimal("0.01"),  # 1 search x $10/1000
        id="web-search",
    ),
]


@pytest.mark.parametrize(("usage", "expected"), COMPONENTS)
def test_each_component_alone_on_haiku_4_5(price: PriceFn, usage: dict[str, Any], expected: Decimal) -> None:
    result = price("claude-haiku-4-5", usage)
    assert dollars(result) == expected
    assert result.model == "claude-haiku-4-5"
    assert result.price_version is not None and "2025-10-01" in result.price_version
    assert result.long_prompt is False


def test_spec_example_event_in_full(parse: Callable[[dict[str, Any]], Event], table: PriceTable) -> None:
    result = table.price(parse(EXAMPLE_EVENT))
    # 1200 in x $1/M + 350 out x $5/M + 2048 5m x $1.25/M + 4096 read x $0.10/M + 1 search x $10/1000
    # = 0.0012 + 0.00175 + 0.00256 + 0.0004096 + 0.01
    assert dollars(result) == Decimal("0.0159196")
    assert result.cost_pico == 15_919_600_000
    assert result.model == "claude-haiku-4-5"  # the price-table name, not the dated id the event carried
    assert result.price_version is not None and "2025-10-01" in result.price_version


def test_sdk_model_dump_with_null_fields(price: PriceFn) -> None:
    # What `message.usage.model_dump()` really writes: every absent part is null, cache_creation detail included.
    usage = Usage(input_tokens=1200, output_tokens=350, cache_creation_input_tokens=2048).model_dump()
    assert usage["cache_creation"] is None and usage["cache_read_input_tokens"] is None
    assert usage["server_tool_use"] is None and usage["speed"] is None and usage["inference_geo"] is None
    # 1200 in x $1/M + 350 out x $5/M + 2048 5m (no detail) x $1.25/M = 0.0012 + 0.00175 + 0.00256
    assert dollars(price("claude-haiku-4-5", usage)) == Decimal("0.00551")


def test_null_token_fields_count_as_zero(price: PriceFn) -> None:
    usage = {
        "input_tokens": 500,
        "output_tokens": None,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
        "cache_creation": None,
        "server_tool_use": {"web_search_requests": None, "web_fetch_requests": None},
        "service_tier": None,
        "speed": None,
        "inference_geo": None,
    }
    assert dollars(price("claude-haiku-4-5", usage)) == Decimal("0.0005")  # 500 in x $1/M


# --- batch ---------------------------------------------------------------------------------------------------------

BATCH_MARKERS = [
    pytest.param({"batch": True}, {}, id="batch-true"),
    pytest.param({}, {"service_tier": "batch"}, id="service-tier-batch"),
    pytest.param({"batch": False}, {"service_tier": "batch"}, id="service-tier-batch-with-batch-false"),
    pytest.param({"batch": True}, {"service_tier": "batch"}, id="both"),
]


@pytest.mark.parametrize(("fields", "tier"), BATCH_MARKERS)
def test_batch_halves_every_token_price_but_not_web_search(
    price: PriceFn, fields: dict[str, Any], tier: dict[str, Any]
) -> None:
    usage = {**EVERY_TOKEN_KIND, "server_tool_use": {"web_search_requests": 2}, **tier}
    result = price("claude-haiku-4-5", usage, **fields)
    # batch rates: in 0.50, out 2.50, 5m 0.625, 1h 1.00, read 0.05 /M; 1,000 tokens of each:
    # 0.0005 + 0.0025 + 0.000625 + 0.001 + 0.00005 = 0.004675; + 2 searches x $10/1000 (full price) = 0.02
    assert dollars(result) == Decimal("0.024675")


@pytest.mark.parametrize(("fields", "tier"), BATCH_MARKERS)
def test_batch_spec_example(
    parse: Callable[[dict[str, Any]], Event], table: PriceTable, fields: Any, tier: Any
) -> None:
    obj = {**EXAMPLE_EVENT, **fields, "usage": {**EXAMPLE_EVENT["usage"], **tier}}
    # 1200 x $0.50/M + 350 x $2.50/M + 2048 x $0.625/M + 4096 x $0.05/M + 1 search x $10/1000
    # = 0.0006 + 0.000875 + 0.00128 + 0.0002048 + 0.01
    assert dollars(table.price(parse(obj))) == Decimal("0.0129598")


def test_batch_web_search_alone_is_full_price(price: PriceFn) -> None:
    usage = {"input_tokens": 0, "output_tokens": 0, "server_tool_use": {"web_search_requests": 3}}
    assert dollars(price("claude-haiku-4-5", usage, batch=True)) == Decimal("0.03")  # 3 x $10/1000, no discount


# --- cache writes: 1 h vs 5 min, and absent detail -----------------------------------------------------------------


def test_one_hour_and_five_minute_writes_are_priced_differently(price: PriceFn) -> None:
    def writes(five: int, hour: int) -> dict[str, Any]:
        detail = {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour}
        return {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": five + hour,
            "cache_creation": detail,
        }

    five_minute = price("claude-haiku-4-5", writes(10_000, 0))
    one_hour = price("claude-haiku-4-5", writes(0, 10_000))
    both = price("claude-haiku-4-5", writes(10_000, 10_000))
    assert dollars(five_minute) == Decimal("0.0125")  # 10,000 x $1.25/M
    assert dollars(one_hour) == Decimal("0.02")  # 10,000 x $2/M
    assert dollars(both) == Decimal("0.0325")  # 0.0125 + 0.02


@pytest.mark.parametrize(
    "detail",
    [
        pytest.param({"cache_creation": None}, id="null"),
        pytest.param({}, id="missing"),
        pytest.param(
            {"cache_creation": {"ephemeral_5m_input_tokens": None, "ephemeral_1h_input_tokens": None}},
            id="null-fields",
        ),
    ],
)
def test_absent_cache_creation_detail_means_five_minute_writes(price: PriceFn, detail: dict[str, Any]) -> None:
    usage = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 10_000, **detail}
    assert dollars(price("claude-haiku-4-5", usage)) == Decimal("0.0125")  # 10,000 x $1.25/M (5m), not $2/M (1h)


# --- long prompt ---------------------------------------------------------------------------------------------------


def _prompt(input_tokens: int, five: int, hour: int, read: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output,
        "cache_creation_input_tokens": five + hour,
        "cache_creation": {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour},
        "cache_read_input_tokens": read,
    }


LONG_PROMPTS = [
    # claude-sonnet-4-5: standard 3 / 15 / 3.75 / 6 / 0.30, over 200k 6 / 22.50 / 7.50 / 12 / 0.60 (in/out/5m/1h/read)
    pytest.param(
        "claude-sonnet-4-5",
        _prompt(50_000, 50_000, 50_000, 50_000, output=1000),
        # prompt 50k + 50k + 50k + 50k = 200,000 exactly: standard rates
        # 50k x 3/M + 50k x 3.75/M + 50k x 6/M + 50k x 0.30/M + 1000 out x 15/M
        # = 0.15 + 0.1875 + 0.3 + 0.015 + 0.015
        Decimal("0.6675"),
        False,
        id="sonnet-4-5-exactly-200000",
    ),
    pytest.param(
        "claude-sonnet-4-5-20250929",
        _prompt(50_001, 50_000, 50_000, 50_000, output=1000),
        # prompt 200,001: long rates on every token, output included
        # 50,001 x 6/M + 50k x 7.50/M + 50k x 12/M + 50k x 0.60/M + 1000 out x 22.50/M
        # = 0.300006 + 0.375 + 0.6 + 0.03 + 0.0225
        Decimal("1.327506"),
        True,
        id="sonnet-4-5-200001",
    ),
    pytest.param(
        "claude-sonnet-4-5",
        _prompt(1000, 0, 0, 199_000, output=500),
        # prompt 1000 + 199,000 reads = 200,000: standard
        # 1000 x 3/M + 199,000 x 0.30/M + 500 x 15/M = 0.003 + 0.0597 + 0.0075
        Decimal("0.0702"),
        False,
        id="sonnet-4-5-reads-reach-200000",
    ),
    pytest.param(
        "claude-sonnet-4-5",
        _prompt(1000, 0, 0, 199_001, output=500),
        # prompt 1000 + 199,001 reads = 200,001: long only because of the cache reads
        # 1000 x 6/M + 199,001 x 0.60/M + 500 x 22.50/M = 0.006 + 0.1194006 + 0.01125
        Decimal("0.1366506"),
        True,
        id="sonnet-4-5-reads-cross-200000",
    ),
    pytest.param(
        "claude-sonnet-4-5",
        _prompt(200_000, 0, 0, 0, output=64_000),
        # output is not part of the prompt: 200,000 in is still standard
        # 200,000 x 3/M + 64,000 x 15/M = 0.6 + 0.96
        Decimal("1.56"),
        False,
        id="sonnet-4-5-output-not-in-prompt",
    ),
    # claude-haiku-5-5: standard 0.10 / 0.50 / 0.125 / 0.20 / 0.01, over 100k 0.50 / 2.50 / 0.625 / 1.00 / 0.05
    pytest.param(
        "claude-haiku-5-5",
        _prompt(40_000, 20_000, 20_000, 20_000, output=2000),
        # prompt 40k + 20k + 20k + 20k = 100,000 exactly: standard
        # 40k x 0.10/M + 20k x 0.125/M + 20k x 0.20/M + 20k x 0.01/M + 2000 x 0.50/M
        # = 0.004 + 0.0025 + 0.004 + 0.0002 + 0.001
        Decimal("0.0117"),
        False,
        id="haiku-5-5-exactly-100000",
    ),
    pytest.param(
        "claude-haiku-5-5",
        _prompt(40_001, 20_000, 20_000, 20_000, output=2000),
        # prompt 100,001: long
        # 40,001 x 0.50/M + 20k x 0.625/M + 20k x 1.00/M + 20k x 0.05/M + 2000 x 2.50/M
        # = 0.0200005 + 0.0125 + 0.02 + 0.001 + 0.005
        Decimal("0.0585005"),
        True,
        id="haiku-5-5-100001",
    ),
]


@pytest.mark.parametrize(("model", "usage", "expected", "long_prompt"), LONG_PROMPTS)
def test_long_prompt(price: PriceFn, model: str, usage: dict[str, Any], expected: Decimal, long_prompt: bool) -> None:
    result = price(model, usage)
    assert dollars(result) == expected
    assert result.long_prompt is long_prompt
    assert result.model == model.removesuffix("-20250929")


# --- price changes -------------------------------------------------------------------------------------------------

# claude-sonnet-5-5: in 2, out 10 /M; cache read 0.20 /M, then 0.10 /M from 2026-10-07 (UTC).
SONNET_5_5_USAGE = {"input_tokens": 1000, "output_tokens": 100, "cache_read_input_tokens": 500_000}
BEFORE_CUT = Decimal("0.103")  # 1000 x 2/M + 100 x 10/M + 500k x 0.20/M = 0.002 + 0.001 + 0.1
AFTER_CUT = Decimal("0.053")  # 1000 x 2/M + 100 x 10/M + 500k x 0.10/M = 0.002 + 0.001 + 0.05


@pytest.mark.parametrize(
    ("timestamp", "expected", "since"),
    [
        pytest.param("2026-10-06T23:59:59Z", BEFORE_CUT, "2026-01-01", id="last-second-before"),
        pytest.param("2026-10-07T00:00:00Z", AFTER_CUT, "2026-10-07", id="first-second-after"),
        # local date 2026-10-07, UTC 2026-10-06T23:30Z: still the old price
        pytest.param("2026-10-07T01:30:00+02:00", BEFORE_CUT, "2026-01-01", id="plus-0200-local-date-after"),
        # local date 2026-10-06, UTC 2026-10-07T00:30Z: already the new price
        pytest.param("2026-10-06T22:30:00-02:00", AFTER_CUT, "2026-10-07", id="minus-0200-local-date-before"),
        pytest.param("2026-10-07T00:00:00", AFTER_CUT, "2026-10-07", id="naive-is-utc"),
        pytest.param(WHEN, AFTER_CUT, "2026-10-07", id="well-after"),
    ],
)
def test_price_change_applies_by_utc_date(price: PriceFn, timestamp: str, expected: Decimal, since: str) -> None:
    result = price("claude-sonnet-5-5", SONNET_5_5_USAGE, timestamp=timestamp)
    assert dollars(result) == expected
    assert result.model == "claude-sonnet-5-5"
    assert result.price_version is not None and since in result.price_version


def test_config_override_adds_a_second_dated_rate(price: PriceFn) -> None:
    table = load_price_table(
        {
            "claude-haiku-4-5": override(
                aliases=["claude-haiku-4-5-20251001"],
                rates=[
                    {
                        "since": "2025-10-01",
                        "input": "1",
                        "output": "5",
                        "cache_write_5m": "1.25",
                        "cache_write_1h": "2",
                        "cache_read": "0.10",
                    },
                    {
                        "since": "2026-06-01",
                        "input": "0.80",
                        "output": "4",
                        "cache_write_5m": "1",
                        "cache_write_1h": "1.60",
                        "cache_read": "0.08",
                    },
                ],
            )
        }
    )
    usage = {"input_tokens": 1000, "output_tokens": 1000}
    before = price("claude-haiku-4-5", usage, timestamp="2026-05-31T23:59:59Z", with_table=table)
    after = price("claude-haiku-4-5-20251001", usage, timestamp="2026-06-01T00:00:00Z", with_table=table)
    assert dollars(before) == Decimal("0.006")  # 1000 x 1/M + 1000 x 5/M = 0.001 + 0.005
    assert dollars(after) == Decimal("0.0048")  # 1000 x 0.80/M + 1000 x 4/M = 0.0008 + 0.004
    assert before.price_version is not None and "2025-10-01" in before.price_version
    assert after.price_version is not None and "2026-06-01" in after.price_version
    assert before.price_version.startswith("config-") and after.model == "claude-haiku-4-5"
    assert table.version.endswith("+config")


def test_event_before_a_models_first_rate_is_unpriced(price: PriceFn) -> None:
    # claude-haiku-5-5 is priced from 2026-10-07: an event dated earlier has no rate, so no cost (not $0).
    result = price("claude-haiku-5-5", {"input_tokens": 1000, "output_tokens": 100}, timestamp="2026-10-06T12:00:00Z")
    assert result.cost_pico is None
    assert result.model == "claude-haiku-5-5"
    assert result.price_version is None


# --- model ids -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "name", "usage", "expected"),
    [
        pytest.param(
            ("claude-haiku-4-5", "claude-haiku-4-5-20251001"),
            "claude-haiku-4-5",
            EXAMPLE_EVENT["usage"],
            Decimal("0.0159196"),  # 0.0012 + 0.00175 + 0.00256 + 0.0004096 + 0.01 (see the example event)
            id="haiku-4-5",
        ),
        pytest.param(
            ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
            "claude-sonnet-4-5",
            {"input_tokens": 1200, "output_tokens": 350},
            Decimal("0.00885"),  # 1200 x 3/M + 350 x 15/M = 0.0036 + 0.00525
            id="sonnet-4-5",
        ),
    ],
)
def test_alias_and_dated_id_are_one_model(
    price: PriceFn, ids: tuple[str, str], name: str, usage: dict[str, Any], expected: Decimal
) -> None:
    alias, dated = (price(model_id, usage) for model_id in ids)
    assert alias.model == dated.model == name
    assert dollars(alias) == dollars(dated) == expected
    assert alias.price_version == dated.price_version


def test_unknown_model_is_unpriced_not_free(price: PriceFn) -> None:
    result = price("claude-mystery-9-20270101", {"input_tokens": 1200, "output_tokens": 350})
    assert result.cost_pico is None
    assert result.cost_pico != 0
    assert result.model == "claude-mystery-9-20270101"
    assert result.price_version is None


# --- modifiers -----------------------------------------------------------------------------------------------------

# claude-opus-4-6: in 5, out 25, 5m 6.25, 1h 10, read 0.50 /M; fast x6, us x1.1. EVERY_TOKEN_KIND = 1,000 of each,
# so at standard rates it costs 0.005 + 0.025 + 0.00625 + 0.01 + 0.0005 = 0.04675.
MODIFIERS = [
    pytest.param(
        "claude-opus-4-6",
        {},
        {},
        Decimal("0.04675"),  # 0.005 + 0.025 + 0.00625 + 0.01 + 0.0005
        id="opus-4-6-standard",
    ),
    pytest.param(
        "claude-opus-4-6",
        {"speed": "fast"},
        {},
        # fast rates 30 / 150 / 37.50 / 60 / 3 /M: 0.03 + 0.15 + 0.0375 + 0.06 + 0.003
        Decimal("0.2805"),
        id="opus-4-6-fast",
    ),
    pytest.param(
        "claude-opus-4-6",
        {"speed": "standard"},
        {},
        Decimal("0.04675"),  # an explicit standard speed is standard
        id="opus-4-6-speed-standard",
    ),
    pytest.param(
        "claude-opus-4-6",
        {"inference_geo": "us"},
        {},
        # US-only rates 5.50 / 27.50 / 6.875 / 11 / 0.55 /M: 0.0055 + 0.0275 + 0.006875 + 0.011 + 0.00055
        Decimal("0.051425"),
        id="opus-4-6-us",
    ),
    pytest.param(
        "claude-opus-4-6",
        {"inference_geo": "global"},
        {},
        Decimal("0.04675"),  # no multiplier for global routing
        id="opus-4-6-global",
    ),
    pytest.param(
        "claude-opus-4-6",
        {"speed": "fast", "inference_geo": "us"},
        {"batch": True},
        # x6 x1.1 x0.5 = x3.3: 16.50 / 82.50 / 20.625 / 33 / 1.65 /M
        # 0.0165 + 0.0825 + 0.020625 + 0.033 + 0.00165
        Decimal("0.154275"),
        id="opus-4-6-fast-us-batch",
    ),
    pytest.param(
        "claude-opus-4-8",
        {"speed": "fast"},
        {},
        # Opus 4.8 fast x2: 10 / 50 / 12.50 / 20 / 1 /M: 0.01 + 0.05 + 0.0125 + 0.02 + 0.001
        Decimal("0.0935"),
        id="opus-4-8-fast",
    ),
    pytest.param(
        "claude-haiku-4-5",
        {"speed": "fast"},
        {},
        # no fast mode: standard 1 / 5 / 1.25 / 2 / 0.10 /M: 0.001 + 0.005 + 0.00125 + 0.002 + 0.0001
        Decimal("0.00935"),
        id="haiku-4-5-fast-is-standard",
    ),
    pytest.param(
        "claude-haiku-4-5",
        {"inference_geo": "us"},
        {},
        Decimal("0.00935"),  # Haiku 4.5 predates 4.6: no US-only multiplier; same sum as above
        id="haiku-4-5-us-is-standard",
    ),
]


@pytest.mark.parametrize(("model", "modifiers", "fields", "expected"), MODIFIERS)
def test_modifiers(
    price: PriceFn, model: str, modifiers: dict[str, Any], fields: dict[str, Any], expected: Decimal
) -> None:
    result = price(model, {**EVERY_TOKEN_KIND, **modifiers}, **fields)
    assert dollars(result) == expected
    assert result.model == model


def test_modifiers_stack_with_long_prompt(price: PriceFn) -> None:
    usage = {"input_tokens": 100_001, "output_tokens": 1000, "inference_geo": "us"}
    result = price("claude-haiku-5-5", usage, batch=True)
    # haiku-5-5 long rates x0.5 batch x1.1 US = x0.55: in 0.50 -> 0.275 /M, out 2.50 -> 1.375 /M
    # 100,001 x 0.275/M + 1000 x 1.375/M = 0.027500275 + 0.001375
    assert dollars(result) == Decimal("0.028875275")
    assert result.long_prompt is True


def test_batch_cache_writes_below_a_micro_dollar_stay_exact(price: PriceFn) -> None:
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 7,
        "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 0},
        "cache_read_input_tokens": 3,
    }
    result = price("claude-haiku-5-5", usage, batch=True)
    # batch 5m write 0.125 x 0.5 = $0.0625/M, read 0.01 x 0.5 = $0.005/M
    # 7 x 0.0625/M + 3 x 0.005/M = 0.0000004375 + 0.000000015 (fractions of a micro-dollar, kept whole in pico)
    assert dollars(result) == Decimal("0.0000004525")
    assert result.cost_pico == 452_500
    one = price(
        "claude-haiku-5-5",
        {**usage, "cache_creation_input_tokens": 1, "cache_creation": None, "cache_read_input_tokens": 0},
        batch=True,
    )
    assert dollars(one) == Decimal("0.0000000625")  # 1 x $0.0625/M: half of 0.125 micro-dollars
    assert one.cost_pico == 62_500


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        pytest.param({"web_fetch_requests": 5}, Decimal("0.001"), id="fetch-only"),  # 1000 in x $1/M; fetches free
        pytest.param(
            {"web_search_requests": 1, "web_fetch_requests": 3},
            Decimal("0.011"),  # 1000 in x $1/M + 1 search x $10/1000 = 0.001 + 0.01
            id="fetch-and-search",
        ),
    ],
)
def test_web_fetch_has_no_fee(price: PriceFn, tools: dict[str, int], expected: Decimal) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 0, "server_tool_use": tools}
    assert dollars(price("claude-haiku-4-5", usage)) == expected


# --- config overrides ----------------------------------------------------------------------------------------------


def test_config_override_replaces_a_shipped_models_rates(
    parse: Callable[[dict[str, Any]], Event], price: PriceFn
) -> None:
    table = load_price_table(
        {
            "claude-haiku-4-5": override(
                aliases=["claude-haiku-4-5-20251001"],
                rates=[
                    {
                        "since": "2025-10-01",
                        "input": "2",
                        "output": "8",
                        "cache_write_5m": "2.5",
                        "cache_write_1h": "4",
                        "cache_read": "0.2",
                        "web_search_per_1k": "5",
                    }
                ],
            )
        }
    )
    result = table.price(parse(EXAMPLE_EVENT))
    # 1200 x 2/M + 350 x 8/M + 2048 x 2.50/M + 4096 x 0.20/M + 1 search x $5/1000
    # = 0.0024 + 0.0028 + 0.00512 + 0.0008192 + 0.005
    assert dollars(result) == Decimal("0.0161392")
    assert result.model == "claude-haiku-4-5"
    assert result.price_version is not None and result.price_version.startswith("config-")
    assert "2025-10-01" in result.price_version
    # Other models keep the shipped rates: 1200 x 3/M + 350 x 15/M = 0.0036 + 0.00525
    sonnet = price("claude-sonnet-4-5", {"input_tokens": 1200, "output_tokens": 350}, with_table=table)
    assert dollars(sonnet) == Decimal("0.00885")
    assert sonnet.price_version is not None and sonnet.price_version.startswith("builtin-")


def test_config_override_of_rates_keeps_the_shipped_aliases(parse: Callable[[dict[str, Any]], Event]) -> None:
    rate = {
        "since": "2025-10-01",
        "input": "2",
        "output": "8",
        "cache_write_5m": "2.5",
        "cache_write_1h": "4",
        "cache_read": "0.2",
    }
    table = load_price_table({"claude-haiku-4-5": override(rates=[rate])})
    # EXAMPLE_EVENT carries the dated id claude-haiku-4-5-20251001; the override names no aliases.
    result = table.price(parse(EXAMPLE_EVENT))
    assert result.model == "claude-haiku-4-5"
    # 1200 x 2/M + 350 x 8/M + 2048 x 2.50/M + 4096 x 0.20/M + 1 search x $10/1000
    assert dollars(result) == Decimal("0.0211392")


def test_config_override_takes_over_an_alias(price: PriceFn) -> None:
    table = load_price_table(
        {
            "acme-haiku-pinned": override(
                aliases=["claude-haiku-4-5-20251001"],
                rates=[
                    {
                        "since": "2025-10-01",
                        "input": "0.5",
                        "output": "2.5",
                        "cache_write_5m": "0.625",
                        "cache_write_1h": "1",
                        "cache_read": "0.05",
                    }
                ],
            )
        }
    )
    usage = {"input_tokens": 1200, "output_tokens": 350}
    pinned = price("claude-haiku-4-5-20251001", usage, with_table=table)
    shipped = price("claude-haiku-4-5", usage, with_table=table)
    assert pinned.model == "acme-haiku-pinned"
    assert dollars(pinned) == Decimal("0.001475")  # 1200 x 0.50/M + 350 x 2.50/M = 0.0006 + 0.000875
    assert shipped.model == "claude-haiku-4-5"
    assert dollars(shipped) == Decimal("0.00295")  # 1200 x 1/M + 350 x 5/M = 0.0012 + 0.00175
    assert table.resolve("claude-haiku-4-5-20251001") == "acme-haiku-pinned"
    assert "claude-haiku-4-5-20251001" not in table.aliases("claude-haiku-4-5")


def test_config_alias_may_not_name_a_shipped_model() -> None:
    entry = override(
        aliases=["claude-haiku-4-5"],
        rates=[
            {
                "since": "2025-10-01",
                "input": "1",
                "output": "5",
                "cache_write_5m": "1.25",
                "cache_write_1h": "2",
                "cache_read": "0.1",
            }
        ],
    )
    with pytest.raises(ValueError, match="claude-haiku-4-5"):
        load_price_table({"acme-haiku": entry})


# --- exactness -----------------------------------------------------------------------------------------------------


def test_many_tiny_requests_sum_exactly(parse: Callable[[dict[str, Any]], Event], table: PriceTable) -> None:
    usage = {"input_tokens": 3, "output_tokens": 7, "cache_read_input_tokens": 1}
    prices = [
        table.price(parse({"request_id": f"req_{n}", "timestamp": WHEN, "model": "claude-haiku-4-5", "usage": usage}))
        for n in range(1000)
    ]
    # one request: 3 x 1/M + 7 x 5/M + 1 x 0.10/M = 0.000003 + 0.000035 + 0.0000001 = 0.0000381
    assert {dollars(p) for p in prices} == {Decimal("0.0000381")}
    # 1,000 of them: 0.0381, to the pico-dollar, summed as integers or as Decimals
    total_pico = 0
    for p in prices:
        assert p.cost_pico is not None
        total_pico += p.cost_pico
    assert usd(total_pico) == Decimal("0.0381")
    assert sum((dollars(p) for p in prices), Decimal(0)) == Decimal("0.0381")


def test_mixed_requests_sum_exactly(parse: Callable[[dict[str, Any]], Event], table: PriceTable) -> None:
    # 300 x the example event (0.0159196 each) + 700 x 1 cache read on haiku-4-5 ($0.10/M = 0.0000001 each)
    # = 4.77588 + 0.00007
    spec = [table.price(parse({**EXAMPLE_EVENT, "request_id": f"req_s{n}"})) for n in range(300)]
    reads = [
        table.price(
            parse(
                {
                    "request_id": f"req_r{n}",
                    "timestamp": WHEN,
                    "model": "claude-haiku-4-5",
                    "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 1},
                }
            )
        )
        for n in range(700)
    ]
    assert sum((dollars(p) for p in spec + reads), Decimal(0)) == Decimal("4.77595")


# --- models added in table 2026.12.02 ------------------------------------------------------------------------------

# One event of each kind of token: 1,000,000 input, 200,000 output, 100,000 5-minute writes, 50,000 1-hour writes,
# 400,000 cache reads (so each component shows up in the sum at its own rate).
ADDED_USAGE: dict[str, Any] = {
    "input_tokens": 1_000_000,
    "output_tokens": 200_000,
    "cache_creation_input_tokens": 150_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 100_000, "ephemeral_1h_input_tokens": 50_000},
    "cache_read_input_tokens": 400_000,
}

ADDED_MODELS = [
    pytest.param(
        "claude-sonnet-4-6",
        "claude-sonnet-4-6",
        # in 3, out 15, 5m 3.75, 1h 6, read 0.30 /M:
        # 1.0 x 3 + 0.2 x 15 + 0.1 x 3.75 + 0.05 x 6 + 0.4 x 0.30 = 3 + 3 + 0.375 + 0.3 + 0.12 = 6.795
        Decimal("6.795"),
        id="sonnet-4-6",
    ),
    pytest.param(
        "claude-3-7-sonnet-20250219",
        "claude-3-7-sonnet-20250219",
        Decimal("6.795"),  # the same rates as Sonnet 4.6: 3 + 3 + 0.375 + 0.3 + 0.12
        id="3-7-sonnet-dated",
    ),
    pytest.param(
        "claude-3-7-sonnet-latest",
        "claude-3-7-sonnet-20250219",
        Decimal("6.795"),  # the alias is the same model
        id="3-7-sonnet-alias",
    ),
    pytest.param(
        "claude-3-opus-20240229",
        "claude-3-opus-20240229",
        # in 15, out 75, 5m 18.75, 1h 30, read 1.50 /M:
        # 1.0 x 15 + 0.2 x 75 + 0.1 x 18.75 + 0.05 x 30 + 0.4 x 1.50 = 15 + 15 + 1.875 + 1.5 + 0.6 = 33.975
        Decimal("33.975"),
        id="3-opus-dated",
    ),
    pytest.param(
        "claude-3-opus-latest",
        "claude-3-opus-20240229",
        Decimal("33.975"),  # 15 + 15 + 1.875 + 1.5 + 0.6
        id="3-opus-alias",
    ),
    pytest.param(
        "claude-mythos-5",
        "claude-mythos-5",
        # in 10, out 50, 5m 12.50, 1h 20, read 1 /M:
        # 1.0 x 10 + 0.2 x 50 + 0.1 x 12.50 + 0.05 x 20 + 0.4 x 1 = 10 + 10 + 1.25 + 1 + 0.4 = 22.65
        Decimal("22.65"),
        id="mythos-5",
    ),
]


@pytest.mark.parametrize(("model_id", "name", "expected"), ADDED_MODELS)
def test_added_models_by_hand(price: PriceFn, model_id: str, name: str, expected: Decimal) -> None:
    result = price(model_id, ADDED_USAGE)
    assert result.model == name  # reports and metric labels name the table entry, never "unpriced"
    assert dollars(result) == expected


def test_mythos_5_is_its_own_model_at_fable_5_prices(price: PriceFn) -> None:
    mythos = price("claude-mythos-5", ADDED_USAGE)
    fable = price("claude-fable-5", ADDED_USAGE)
    assert (mythos.model, fable.model) == ("claude-mythos-5", "claude-fable-5")
    assert mythos.price_version != fable.price_version
    assert dollars(mythos) == dollars(fable) == Decimal("22.65")  # 10 + 10 + 1.25 + 1 + 0.4, as above


ADDED_MODIFIERS = [
    pytest.param(
        "claude-sonnet-4-6",
        {"inference_geo": "us"},
        # US-only inference x1.1 on 4.6 and later: 6.795 x 1.1 = 3.3 + 3.3 + 0.4125 + 0.33 + 0.132 = 7.4745
        Decimal("7.4745"),
        id="sonnet-4-6-us",
    ),
    pytest.param(
        "claude-sonnet-4-6",
        {"speed": "fast"},
        Decimal("6.795"),  # no fast mode on Sonnet: standard rates
        id="sonnet-4-6-fast-is-standard",
    ),
    pytest.param(
        "claude-sonnet-4-6",
        {"input_tokens": 900_000},
        # a 1,450,000-token prompt (900k + 100k + 50k + 400k): no long-prompt tier on Sonnet 4.6, same rates:
        # 0.9 x 3 + 3 + 0.375 + 0.3 + 0.12 = 2.7 + 3 + 0.375 + 0.3 + 0.12 = 6.495
        Decimal("6.495"),
        id="sonnet-4-6-no-long-prompt-tier",
    ),
    pytest.param(
        "claude-mythos-5",
        {"inference_geo": "us"},
        # 22.65 x 1.1: 11 + 11 + 1.375 + 1.1 + 0.44 = 24.915
        Decimal("24.915"),
        id="mythos-5-us",
    ),
    pytest.param(
        "claude-3-opus-20240229",
        {"inference_geo": "us", "speed": "fast"},
        Decimal("33.975"),  # older than 4.6 and no fast mode: list rates
        id="3-opus-no-modifiers",
    ),
    pytest.param(
        "claude-3-7-sonnet-20250219",
        {"inference_geo": "us"},
        Decimal("6.795"),  # older than 4.6: no US-only multiplier
        id="3-7-sonnet-no-geo",
    ),
]


@pytest.mark.parametrize(("model_id", "change", "expected"), ADDED_MODIFIERS)
def test_added_models_modifiers(price: PriceFn, model_id: str, change: dict[str, Any], expected: Decimal) -> None:
    assert dollars(price(model_id, {**ADDED_USAGE, **change})) == expected


def test_added_models_batch_halves(price: PriceFn) -> None:
    # Batch: every token price x 0.5: 6.795 / 2 = 1.5 + 1.5 + 0.1875 + 0.15 + 0.06 = 3.3975
    assert dollars(price("claude-sonnet-4-6", ADDED_USAGE, batch=True)) == Decimal("3.3975")


def test_added_models_carry_their_source(table: PriceTable) -> None:
    from monitor.pricing import builtin_models

    _, models = builtin_models()
    for name in ("claude-sonnet-4-6", "claude-3-7-sonnet-20250219", "claude-3-opus-20240229", "claude-mythos-5"):
        source = models[name].source
        assert source is not None and "platform.claude.com" in source and "checked 2026-12-02" in source
