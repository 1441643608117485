"""Budgets: which scope an event counts toward, window buckets, and a scope's state at an instant. Pure, no I/O."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from monitor.budgets.counters import Usage
from monitor.budgets.windows import calendar_window
from monitor.config import BudgetConfig, Window
from monitor.pricing import PriceTable
from monitor.wire import PICO_PER_USD, scope_key

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Rolling windows are kept in buckets: 1 minute, or 1/1440 of the span when that is longer (a 30-day window in
# 30-minute buckets), so a scope never needs more than 1,440 rows. An event leaves the window at the end of its
# bucket plus the span: never earlier than it should, so spend is never under-counted.
_MAX_ROLLING_BUCKETS = 1440
# A forecast projects the window's own average rate (spend so far / time elapsed), which does not swing with the
# time of day the way a recent burn rate does. Until a day (or a tenth of a shorter window) has passed, the
# average is taken over that much time, so a window's first busy minutes do not project a wild overrun.
FORECAST_SETTLE = timedelta(days=1)


Measure = Literal["usd", "requests", "input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "total"]


@dataclass(frozen=True)
class Budget:
    """A configured budget, compiled: limits as integers in the unit it measures (pico-dollars for USD)."""

    name: str
    match: tuple[tuple[str, str], ...]
    per: str | None
    window: Window
    measure: Measure
    limit: int
    alert_at: tuple[Decimal, ...]
    throttle_at: Decimal | None
    bucket: timedelta | None = None  # rolling windows only

    @property
    def definition(self) -> str:
        """A digest of what decides which events count and where: a change means recounting the window."""
        text = json.dumps([self.match, self.per, str(self.window), self.bucket and self.bucket.total_seconds()])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def scope_of(self, model: str, attributes: Mapping[str, str]) -> dict[str, str] | None:
        """The scope an event with this model and attributes counts toward, or None if it does not count."""
        return scope_for(self.match, self.per, model, attributes)

    def amount(self, usage: Usage) -> int:
        """What this budget measures of a usage."""
        if self.measure == "usd":
            return usage.cost_pico
        if self.measure == "requests":
            return usage.requests
        if self.measure == "total":
            return usage.input + usage.output + usage.cache_read + usage.cache_write_5m + usage.cache_write_1h
        return int(getattr(usage, self.measure))

    def bucket_of(self, moment: datetime, zone: ZoneInfo) -> datetime:
        """The bucket an event at `moment` is counted in: its calendar window's start, or a rolling bucket."""
        if self.bucket is None:
            return _calendar_start(self.window.kind, moment, zone)
        size = int(self.bucket.total_seconds())
        seconds = int((moment - _EPOCH).total_seconds())
        return _EPOCH + timedelta(seconds=seconds - seconds % size)

    def window_at(self, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
        """[start, end) of the window in force at `now`; for a rolling window, the span ending now."""
        if self.bucket is None:
            return calendar_window(self.window.kind, now, zone)  # type: ignore[arg-type]
        assert self.window.span is not None
        return now - self.window.span, now

    def first_bucket(self, now: datetime, zone: ZoneInfo) -> datetime:
        """The earliest bucket start that still counts at `now`."""
        return self.bucket_range(now, zone)[0]

    def bucket_range(self, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime | None]:
        """[first, end) of the bucket starts that count at `now`. A calendar window ends where it ends, so an event
        stamped in tomorrow's window (clock skew allows a day ahead) counts tomorrow; a rolling window has no end:
        a bucket ahead of `now` counts at once, which never under-counts."""
        if self.bucket is None:
            return self.window_at(now, zone)
        assert self.window.span is not None
        return self.bucket_of(now - self.window.span, zone), None

    @functools.cached_property  # asked of every scope the fast path updates, and a budget never changes
    def thresholds(self) -> tuple[Decimal, ...]:
        """Every fraction that matters to alerts and throttling, ascending."""
        values = set(self.alert_at)
        if self.throttle_at is not None:
            values.add(self.throttle_at)
        return tuple(sorted(values))

    def over(self, amount: int, fraction: Decimal) -> bool:
        """amount >= fraction x limit, exactly."""
        return Decimal(amount) >= fraction * self.limit


@functools.lru_cache(maxsize=65536)
def _calendar_start_cached(kind: str, quarter_hour: int, zone: ZoneInfo) -> datetime:
    moment = _EPOCH + timedelta(seconds=quarter_hour * 900)
    return calendar_window(kind, moment, zone)[0]  # type: ignore[arg-type]


def _calendar_start(kind: str, moment: datetime, zone: ZoneInfo) -> datetime:
    """Start of the calendar window containing `moment`. Every UTC offset is a whole number of quarter hours, so
    local midnights fall on the quarter-hour grid and the window of a moment is that of its quarter hour."""
    seconds = int((moment - _EPOCH).total_seconds())
    return _calendar_start_cached(kind, seconds // 900, zone)


def scope_for(
    match: tuple[tuple[str, str], ...], per: str | None, model: str, attributes: Mapping[str, str]
) -> dict[str, str] | None:
    """The scope `match` (and one value of `per`) gives a call with this model and attributes; None when it does
    not match, or when `per` names an attribute the call lacks."""
    for key, value in match:
        if (model if key == "model" else attributes.get(key)) != value:
            return None
    scope = dict(match)
    if per is not None:
        per_value = model if per == "model" else attributes.get(per)
        if per_value is None:
            return None
        scope[per] = per_value
    return scope


def resolved_match(match: Mapping[str, str], prices: PriceTable) -> dict[str, str]:
    """A budget's or limit's `match` with its `model` (an alias or dated id) as the price-table name events carry."""
    resolved = dict(match)
    if "model" in resolved:
        resolved["model"] = prices.resolve(resolved["model"]) or resolved["model"]
    return resolved


def compile_budgets(configs: Sequence[BudgetConfig], prices: PriceTable) -> list[Budget]:
    """Budgets from config: limits as integers, a `model` in match resolved to its price-table name."""
    compiled = []
    for config in configs:
        match = resolved_match(config.match, prices)
        window = config.parsed_window
        bucket = None
        if window.kind == "rolling":
            assert window.span is not None
            minutes = max(1, math.ceil(window.span.total_seconds() / 60 / _MAX_ROLLING_BUCKETS))
            bucket = timedelta(minutes=minutes)
        measure: Measure
        if config.limit_usd is not None:
            measure, limit = "usd", int(config.limit_usd * PICO_PER_USD)
        elif config.limit_tokens is not None:
            kind, amount = next(iter(config.limit_tokens.items()))
            measure, limit = kind, amount
        else:
            assert config.limit_requests is not None
            measure, limit = "requests", config.limit_requests
        compiled.append(
            Budget(
                config.name,
                tuple(sorted(match.items())),
                config.per,
                window,
                measure,
                limit,
                tuple(sorted(config.alert_at)),
                config.throttle_at,
                bucket,
            )
        )
    return compiled


class BudgetIndex:
    """Finds the budgets an event counts toward without trying each one: budgets grouped by the keys they match."""

    def __init__(self, budgets: Sequence[Budget]) -> None:
        self.budgets = list(budgets)
        self._fixed_keys: dict[str, str] = {}
        self._per_keys: dict[str, dict[str, str]] = {}
        self._groups: dict[tuple[str, ...], dict[tuple[str, ...], list[Budget]]] = {}
        for budget in self.budgets:
            keys = tuple(key for key, _ in budget.match)
            values = tuple(value for _, value in budget.match)
            self._groups.setdefault(keys, {}).setdefault(values, []).append(budget)
        self._lookups = [(keys, "model" in keys, by_values) for keys, by_values in self._groups.items()]

    def touched_keys(self, model: str, attributes: Mapping[str, str]) -> Iterator[tuple[Budget, str]]:
        """(budget, scope key) for every budget the event counts toward; keys are built once and reused."""
        get = attributes.get
        for keys, by_model, by_values in self._lookups:
            # An absent attribute is None, which no budget matches; `map` builds the tuple without a generator.
            values = (
                tuple([model if key == "model" else get(key) for key in keys]) if by_model else tuple(map(get, keys))
            )
            for budget in by_values.get(values, ()):  # type: ignore[arg-type]
                if budget.per is None:
                    key = self._fixed_keys.get(budget.name)
                    if key is None:
                        key = self._fixed_keys[budget.name] = scope_key(dict(budget.match))
                    yield budget, key
                    continue
                value = model if budget.per == "model" else attributes.get(budget.per)
                if value is None:
                    continue
                cache = self._per_keys.setdefault(budget.name, {})
                key = cache.get(value)
                if key is None:
                    if len(cache) > 200_000:
                        cache.clear()
                    key = cache[value] = scope_key({**dict(budget.match), budget.per: value})
                yield budget, key


@dataclass(frozen=True)
class ScopeState:
    """A budget scope at an instant: spend against limit, forecast, and whether it is throttled until when."""

    budget: Budget
    scope: dict[str, str]
    window_start: datetime
    window_end: datetime
    usage: Usage
    forecast_amount: int
    forecast_cost_pico: int
    until: datetime | None  # when a throttled scope is under its limit again
    evaluated_at: datetime

    @property
    def amount(self) -> int:
        """What the budget measures, spent so far in the window."""
        return self.budget.amount(self.usage)

    @property
    def utilization(self) -> float:
        """amount / limit."""
        return self.amount / self.budget.limit

    @property
    def throttled(self) -> bool:
        """At or over throttle_at."""
        return self.budget.throttle_at is not None and self.budget.over(self.amount, self.budget.throttle_at)

    def crossed(self) -> tuple[Decimal, ...]:
        """The thresholds (alert_at and throttle_at) already reached."""
        return tuple(t for t in self.budget.thresholds if self.budget.over(self.amount, t))


def forecast_settle(start: datetime, end: datetime) -> timedelta:
    """How much of a window must pass before its average is a forecast: a day, or a tenth of a shorter window."""
    return min(FORECAST_SETTLE, (end - start) / 10)


def rolling_until(budget: Budget, buckets: Sequence[tuple[datetime, Usage]], now: datetime) -> datetime | None:
    """When enough of a throttled rolling scope's buckets age out for it to drop below throttle_at."""
    assert budget.bucket is not None and budget.window.span is not None and budget.throttle_at is not None
    remaining = sum(budget.amount(usage) for _, usage in buckets)
    for start, usage in sorted(buckets, key=lambda item: item[0]):
        remaining -= budget.amount(usage)
        if not budget.over(remaining, budget.throttle_at):
            return max(start + budget.bucket + budget.window.span, now)
    return None


def evaluate_scope(
    budget: Budget,
    scope: dict[str, str],
    usage: Usage,
    now: datetime,
    zone: ZoneInfo,
    buckets: Sequence[tuple[datetime, Usage]] | None = None,
    window: tuple[datetime, datetime] | None = None,
) -> ScopeState:
    """The state of one scope from its window's usage (and, for a throttled rolling scope, its buckets); `window`
    is `budget.window_at(now, zone)` when the caller already has it."""
    start, end = budget.window_at(now, zone) if window is None else window
    amount = budget.amount(usage)
    if budget.bucket is None:
        # The window's average rate held to its end: spend / max(elapsed, settle) x time left.
        remaining = max((end - now).total_seconds(), 0.0)
        elapsed = max((now - start).total_seconds(), forecast_settle(start, end).total_seconds(), 1.0)
        forecast = amount + int(amount * remaining / elapsed)
        forecast_cost = usage.cost_pico + int(usage.cost_pico * remaining / elapsed)
    else:  # a rolling window never ends: at its own average rate it holds what it holds now
        forecast, forecast_cost = amount, usage.cost_pico
    until = None
    if budget.throttle_at is not None and budget.over(amount, budget.throttle_at):
        until = end if budget.bucket is None else rolling_until(budget, buckets or [(start, usage)], now)
    return ScopeState(budget, scope, start, end, usage, forecast, forecast_cost, until, now)
