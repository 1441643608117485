"""Anthropic's Usage and Cost Analytics API, through the `anthropic` SDK: daily cost and usage per model and tier."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal

from monitor.pricing import PriceTable
from monitor.wire import BILLED_COUNTS

if TYPE_CHECKING:  # the SDK is imported where a client is made: commands that never reconcile start without it
    import anthropic

# Only what the Claude API itself billed: the product surfaces our events come from.
PRODUCTS: list[Literal["messages_api", "message_batches_api"]] = ["messages_api", "message_batches_api"]
GROUP_BY: list[Literal["model", "service_tier", "api_key_id"]] = ["model", "service_tier"]
BY_API_KEY: list[Literal["model", "service_tier", "api_key_id"]] = [*GROUP_BY, "api_key_id"]
ALL_KEYS = "*"  # the figures of every key together: the report was not grouped by key
NO_KEY = ""  # usage no API key authenticated (Anthropic's null api_key_id)
EARLIEST = date(2026, 1, 1)  # the reports start here
MAX_SPAN = timedelta(days=31)  # one request covers at most this much
PAGE_LIMIT = 1000
TIMEOUT_S, CONNECT_TIMEOUT_S = 60.0, 10.0
UNATTRIBUTED = "(no model)"  # a row Anthropic attributes to no model


class AnalyticsError(Exception):
    """Anthropic could not be reached, refused the key, or sent something we cannot read."""


@dataclass
class Figures:
    """Anthropic's figures for one UTC day, model and service tier (cents as exact decimals)."""

    list_amount_cents: Decimal = Decimal(0)
    amount_cents: Decimal = Decimal(0)
    currency: str = "USD"
    cost_requests: int | None = None
    usage_requests: int | None = None
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_search_requests: int = 0

    @property
    def requests(self) -> int | None:
        """Requests as the usage report counts them, else as the cost report does; None when neither does."""
        return self.usage_requests if self.usage_requests is not None else self.cost_requests

    def add(self, other: Figures) -> None:
        """Add another group's figures to these (a requests count is None only when neither side counted)."""
        self.list_amount_cents += other.list_amount_cents
        self.amount_cents += other.amount_cents
        self.cost_requests = _add(self.cost_requests, other.cost_requests)
        self.usage_requests = _add(self.usage_requests, other.usage_requests)
        for name in BILLED_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# (UTC day, model, service tier, API key id): the key id is ALL_KEYS when the report was not grouped by key.
FigureKey = tuple[date, str, str, str]


@dataclass
class Fetched:
    """Everything one fetch read: figures by (day, model, tier, key) over [first, end), and the report's freshness."""

    first: date
    end: date
    figures: dict[FigureKey, Figures] = field(default_factory=dict)
    data_refreshed_at: datetime | None = None


def tier(value: str | None) -> str:
    """Anthropic's service tier as ours: batch, priority (priority and priority_on_demand) or standard."""
    if value == "batch":
        return "batch"
    if value is not None and value.startswith("priority"):
        return "priority"
    return "standard"


def spans(first: date, end: date) -> Iterator[tuple[date, date]]:
    """[first, end) cut into ranges of at most 31 days, as one request may cover."""
    start = first
    while start < end:
        stop = min(end, start + MAX_SPAN)
        yield start, stop
        start = stop


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _cents(value: str, where: str) -> Decimal:
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError):
        raise AnalyticsError(f"{where}: {value!r} is not a decimal amount of cents") from None
    if not amount.is_finite():
        raise AnalyticsError(f"{where}: {value!r} is not a finite amount of cents")
    return amount


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


class AnalyticsClient:
    """Reads the cost and usage reports; the SDK retries 429 and 5xx with backoff and follows `next_page`.

    With `by_api_key` the reports are grouped by API key id too, for reconcile.api_keys.
    """

    def __init__(
        self, admin_key: str, base_url: str, prices: PriceTable, max_retries: int = 2, by_api_key: bool = False
    ) -> None:
        import anthropic

        self._client = anthropic.Anthropic(
            api_key=admin_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=anthropic.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )
        self._base_url = base_url
        self._prices = prices
        self._by_api_key = by_api_key

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def fetch(self, first: date, end: date) -> Fetched:
        """Anthropic's figures for the UTC days in [first, end): all pages of both reports, read before returning."""
        if first < EARLIEST:
            raise ValueError(f"Anthropic's usage and cost reports start at {EARLIEST}; {first} is earlier")
        import anthropic

        fetched = Fetched(first, end)
        try:
            for start, stop in spans(first, end):
                self._cost(fetched, start, stop)
                self._usage(fetched, start, stop)
        except anthropic.APIStatusError as exc:
            raise AnalyticsError(self._refused(exc)) from None
        except anthropic.APIConnectionError as exc:
            raise AnalyticsError(
                f"cannot reach Anthropic's analytics API at {self._base_url} ({exc.__class__.__name__}: {exc}); "
                "check reconcile.base_url and the network, then run `claude-monitor reconcile` again"
            ) from None
        return fetched

    def _refused(self, exc: anthropic.APIStatusError) -> str:
        request_id = exc.response.headers.get("request-id") or "none"
        what = f"Anthropic's analytics API answered {exc.status_code} (request_id {request_id})"
        if exc.status_code in (401, 403):
            return (
                f"{what}: the key was refused; reconcile needs an Admin API key (sk-ant-admin…) or a key with "
                "read:analytics in the environment variable named by reconcile.admin_key_env"
            )
        return f"{what}: {exc.message}"

    def _pages(self, resource: Any, start: date, stop: date) -> Iterable[Any]:
        first_page = resource.list(
            starting_at=_midnight(start),
            ending_at=_midnight(stop),
            time_bucket_width="1d",
            group_by=BY_API_KEY if self._by_api_key else GROUP_BY,
            products=PRODUCTS,
            limit=PAGE_LIMIT,
        )
        return first_page.iter_pages()

    def _key(self, item: Any) -> FigureKey:
        model = item.group.model
        name = UNATTRIBUTED if model is None else (self._prices.resolve(model) or model)
        key_id = (item.group.api_key_id or NO_KEY) if self._by_api_key else ALL_KEYS
        return item.starting_at.astimezone(UTC).date(), name, tier(item.group.service_tier), key_id

    def _cost(self, fetched: Fetched, start: date, stop: date) -> None:
        for page in self._pages(self._client.beta.organization.analytics.cost, start, stop):
            self._refreshed(fetched, page.data_refreshed_at)
            for item in page.data:
                key = self._key(item)
                where = f"cost report, {key[0]} {item.group.model} {item.group.service_tier}"
                if item.cost.currency != "USD":
                    raise AnalyticsError(f"{where}: currency {item.cost.currency!r}; only USD is compared")
                figures = fetched.figures.setdefault(key, Figures())
                figures.list_amount_cents += _cents(item.cost.list_amount, where + " list_amount")
                figures.amount_cents += _cents(item.cost.amount, where + " amount")
                figures.cost_requests = _add(figures.cost_requests, item.cost.requests)

    def _usage(self, fetched: Fetched, start: date, stop: date) -> None:
        for page in self._pages(self._client.beta.organization.analytics.usage, start, stop):
            self._refreshed(fetched, page.data_refreshed_at)
            for item in page.data:
                usage = item.usage
                figures = fetched.figures.setdefault(self._key(item), Figures())
                figures.usage_requests = _add(figures.usage_requests, usage.requests)
                figures.input += usage.uncached_input_tokens
                figures.output += usage.output_tokens
                figures.cache_read += usage.cache_read_input_tokens
                figures.cache_write_5m += usage.cache_creation.ephemeral_5m_input_tokens or 0
                figures.cache_write_1h += usage.cache_creation.ephemeral_1h_input_tokens or 0
                figures.web_search_requests += usage.server_tool_use.web_search_requests

    @staticmethod
    def _refreshed(fetched: Fetched, at: datetime | None) -> None:
        if at is not None and (fetched.data_refreshed_at is None or at < fetched.data_refreshed_at):
            fetched.data_refreshed_at = at  # the oldest refresh time of any page: what the whole fetch can claim
