"""A local stand-in for Anthropic's Usage and Cost Analytics API (beta): the cost and usage reports, in its wire
format — daily buckets grouped by model and service tier (and API key id when asked), amounts as fractional-cent
decimal strings, pages linked by `has_more`/`next_page`, the beta header and the admin key checked, errors in
Anthropic's error shape.

Fed by a test with known figures per UTC day, model, tier and API key; keeps every request it saw. Asked without
`group_by[]=api_key_id`, it sums the keys' rows of a day, model and tier into one, as Anthropic does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_server import AnthropicHandler, LoopbackServer

BETA = "analytics-usage-cost-2026-08-24"
COST_PATH = "/v1/organizations/analytics/cost"
USAGE_PATH = "/v1/organizations/analytics/usage"
REFRESHED_AT = "2026-12-01T23:40:00Z"
COUNTS = (
    "uncached_input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens",
    "web_search_requests",
)


@dataclass
class Row:
    """Anthropic's figures for one UTC day, model, service tier and API key (None: no key authenticated it)."""

    day: date
    model: str
    service_tier: str
    list_amount_cents: Decimal
    requests: int | None
    uncached_input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0
    web_search_requests: int = 0
    discount: Decimal = Decimal("0.9")  # amount = list_amount x discount: shown, never compared
    api_key_id: str | None = None
    summed_amount_cents: Decimal | None = None  # a merged row's amount: the sum of its rows'

    @property
    def amount_cents(self) -> Decimal:
        if self.summed_amount_cents is not None:
            return self.summed_amount_cents
        return self.list_amount_cents * self.discount

    def bounds(self) -> tuple[str, str]:
        start = datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)
        return _rfc3339(start), _rfc3339(start + timedelta(days=1))


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


class FakeAnalytics(LoopbackServer):
    """The server, on a free loopback port, in a background thread."""

    def __init__(self, admin_key: str, rows: list[Row] | None = None, page_size: int | None = None) -> None:
        self.admin_key = admin_key
        self.rows = list(rows or [])
        self.page_size = page_size  # overrides the client's `limit`, to force pages
        self.requests: list[Seen] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        super().__init__(_handler(self))

    def fail_next(self, status: int) -> None:
        """Answer the next authenticated request with this status (429 says retry after 1 s, as Anthropic does)."""
        with self._lock:
            self._failures.append(status)

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if s.path == path]

    def _arrived(self, seen: Seen, authenticated: bool) -> int | None:
        with self._lock:
            self.requests.append(seen)
            return self._failures.pop(0) if self._failures and authenticated else None


def _group(row: Row, by_key: bool) -> dict[str, Any]:
    key = row.api_key_id if by_key else None
    return {"model": row.model, "service_tier": row.service_tier, "api_key_id": key, "workspace_id": None}


def merged(rows: list[Row]) -> Row:
    """The rows of one day, model and tier summed over their keys (requests None only when none counted them)."""
    first = rows[0]
    counted = [r.requests for r in rows if r.requests is not None]
    total = Row(first.day, first.model, first.service_tier, Decimal(0), sum(counted) if counted else None)
    amount = Decimal(0)
    for r in rows:
        total.list_amount_cents += r.list_amount_cents
        amount += r.amount_cents
        for name in COUNTS:
            setattr(total, name, getattr(total, name) + getattr(r, name))
    total.summed_amount_cents = amount
    return total


def cost_item(row: Row, by_key: bool = False) -> dict[str, Any]:
    start, end = row.bounds()
    return {
        "starting_at": start,
        "ending_at": end,
        "group": _group(row, by_key),
        "cost": {
            "amount": f"{row.amount_cents:f}",
            "list_amount": f"{row.list_amount_cents:f}",
            "currency": "USD",
            "requests": row.requests,
        },
    }


def usage_item(row: Row, by_key: bool = False) -> dict[str, Any]:
    start, end = row.bounds()
    tokens = (
        row.uncached_input_tokens
        + row.output_tokens
        + row.cache_read_input_tokens
        + row.ephemeral_5m_input_tokens
        + row.ephemeral_1h_input_tokens
    )
    return {
        "starting_at": start,
        "ending_at": end,
        "group": _group(row, by_key),
        "usage": {
            "uncached_input_tokens": row.uncached_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": row.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": row.ephemeral_1h_input_tokens,
            },
            "cache_read_input_tokens": row.cache_read_input_tokens,
            "output_tokens": row.output_tokens,
            "server_tool_use": {"web_search_requests": row.web_search_requests},
            "requests": row.requests,
            "total_tokens": tokens,
        },
    }


def _handler(fake: FakeAnalytics) -> type[BaseHTTPRequestHandler]:
    class Handler(AnthropicHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            headers = {name.lower(): value for name, value in self.headers.items()}
            bearer = headers.get("authorization", "").removeprefix("Bearer ")
            authenticated = fake.admin_key in (bearer, headers.get("x-api-key"))
            failure = fake._arrived(Seen(parts.path, query, headers), authenticated)
            request_id = f"req_fake_analytics_{len(fake.requests):04d}"
            if parts.path not in (COST_PATH, USAGE_PATH):
                self._error(404, "not_found_error", f"{parts.path} not found", request_id)
                return
            if not authenticated:
                self._error(401, "authentication_error", "invalid x-api-key", request_id)
                return
            if BETA not in [b.strip() for b in headers.get("anthropic-beta", "").split(",")]:
                beta = f"this endpoint is in beta: send anthropic-beta: {BETA}"
                self._error(400, "invalid_request_error", beta, request_id)
                return
            if failure is not None:
                if failure == 429:
                    self._error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                                request_id, {"retry-after": "1"})  # fmt: skip
                else:
                    self._error(failure, "api_error", "Internal server error", request_id)
                return
            problem = self._check(query)
            if problem:
                self._error(400, "invalid_request_error", problem, request_id)
                return
            start, end = _when(query["starting_at"][0]), _when(query["ending_at"][0])
            by_key = "api_key_id" in query.get("group_by[]", [])
            groups: dict[tuple[Any, ...], list[Row]] = {}
            for r in fake.rows:
                if start.date() <= r.day < end.date():
                    key = (r.day, r.model, r.service_tier, (r.api_key_id or "") if by_key else "")
                    groups.setdefault(key, []).append(r)
            rows = [group[0] if len(group) == 1 else merged(group) for _, group in sorted(groups.items())]
            size = fake.page_size or int(query.get("limit", ["20"])[0])
            offset = int(query["page"][0].removeprefix("page_")) if "page" in query else 0
            page = rows[offset : offset + size]
            more = offset + size < len(rows)
            item = cost_item if parts.path == COST_PATH else usage_item
            self._json(
                200,
                {
                    "data": [item(r, by_key) for r in page],
                    "has_more": more,
                    "next_page": f"page_{offset + size}" if more else None,
                    "data_refreshed_at": REFRESHED_AT,
                },
                request_id,
            )

        @staticmethod
        def _check(query: dict[str, list[str]]) -> str | None:
            for name in ("starting_at", "ending_at"):
                if name not in query:
                    return f"{name}: required with time_bucket_width"
            start, end = _when(query["starting_at"][0]), _when(query["ending_at"][0])
            if start < datetime(2026, 1, 1, tzinfo=UTC):
                return "starting_at: must be no earlier than 2026-01-01T00:00:00Z"
            if end - start > timedelta(days=31):
                return "the range may span at most 31 days"
            if query.get("time_bucket_width") != ["1d"]:
                return f"time_bucket_width: expected 1d here, got {query.get('time_bucket_width')}"
            if sorted(query.get("group_by[]", [])) not in (
                ["model", "service_tier"],
                ["api_key_id", "model", "service_tier"],
            ):
                return (
                    "group_by[]: this fake answers model and service_tier (and api_key_id) only, "
                    f"got {query.get('group_by[]')}"
                )
            if sorted(query.get("products[]", [])) != ["message_batches_api", "messages_api"]:
                return f"products[]: expected the two API products, got {query.get('products[]')}"
            limit = int(query.get("limit", ["20"])[0])
            if not 1 <= limit <= 1000:
                return "limit: 1-1000"
            return None

    return Handler
