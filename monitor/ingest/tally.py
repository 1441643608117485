"""What a batch of new events adds up to — counters, the event-time rollup, budget buckets — before anything is
read from or written to the store.

A tally depends only on the events, their prices and the configuration (price table, metric labels, budgets, time
zone), never on the database or the clock: the writer makes one from the events its insert found new, and a parse
process can make one ahead, over a whole batch, for the writer to use as it is when every event of the batch turns
out new (the writer then does per batch what it otherwise does per event). What does depend on the store or the
clock is left to the writer: which label values may become series (`LabelGate`), how late an event is, which
budget windows are in force now.

Label values are kept as the events carry them (uncapped): a batch has thousands of events but a few dozen label
sets, and the writer caps each set once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from monitor.budgets import Budget, BudgetIndex
from monitor.ingest.parse import Event
from monitor.metric_names import LATENCY_BUCKETS
from monitor.pricing import UNPRICED, Price, PriceTable
from monitor.store.rollup import ROLLUP_FIELDS, bucket_of

_QUARTER_HOUR_S = 900

# One `sums` row: requests, cost, the five token counts, priced requests, latency count and sum (µs), then one
# count per latency bucket.
SUM_FIELDS = 10 + len(LATENCY_BUCKETS) + 1
# A rollup key: (bucket start, price-table name or model id, service tier, status class, label values as the events
# carry them, which of the metric-label attributes the events have, whether the model is one the table does not
# know and is unpriced — its model id then becomes whatever the unpriced-model label slots allow).
RollupDraft = tuple[datetime, str, str, str, tuple[str, ...], tuple[bool, ...], bool]
BudgetDelta = tuple[str, str, datetime]  # (budget name, scope key, bucket start)


def _bucket_grain(budget: Budget) -> tuple[str | int, int]:
    """(what else decides the bucket, seconds per index step) of a budget's bucket of an instant."""
    if budget.bucket is None:
        return budget.window.kind, _QUARTER_HOUR_S
    size = int(budget.bucket.total_seconds())
    return size, size


class Tally:
    """The sums of a set of new events (see the module's description)."""

    __slots__ = (
        "accepted",
        "attributes_dropped",
        "budgets",
        "errors",
        "rollup",
        "stamps",
        "sums",
        "unpriced",
        "unpriced_models",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.unpriced = 0  # events with no cost (a model the table does not know, or no rate for their date)
        self.attributes_dropped = 0
        # (model label, label values) -> SUM_FIELDS counts
        self.sums: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self.unpriced_models: dict[str, int] = {}  # price-table name or model id of an unpriced event -> events
        self.errors: dict[tuple[str, int], int] = {}  # (model label, status outside 2xx) -> events
        self.stamps: list[float] = []  # every event's time, seconds since the epoch, ascending once finished
        self.rollup: dict[RollupDraft, list[int]] = {}  # -> ROLLUP_FIELDS counts
        self.budgets: dict[BudgetDelta, list[int]] = {}  # -> USAGE_FIELDS counts

    def late_counts(self, now: datetime, classes: Sequence[tuple[timedelta, str]]) -> dict[str, int]:
        """Events per lateness class at `now`: each counted in the last class whose lower bound it reaches
        (`classes` ascending); the stamps must be sorted (`Tallier.tally` sorts them)."""
        counts: dict[str, int] = {}
        stamps = self.stamps
        above = 0  # events already counted in a later class
        for lower, name in reversed(classes):
            reached = bisect.bisect_right(stamps, (now - lower).timestamp())
            if reached - above:
                counts[name] = reached - above
            above = reached
        return counts


class Tallier:
    """Makes tallies under one configuration."""

    def __init__(
        self,
        prices: PriceTable,
        metric_labels: Sequence[str],
        budgets: BudgetIndex,
        zone: ZoneInfo,
    ) -> None:
        self.prices = prices
        self.metric_labels = tuple(metric_labels)
        self.budgets = budgets
        self.zone = zone

    def tally(self, new: Iterable[tuple[Event, Price]]) -> Tally:
        """The sums of these events (each one new: stored by the batch that tallies it)."""
        out = Tally()
        names = self.metric_labels
        label_of = self.prices.label
        sums = out.sums
        errors = out.errors
        unpriced_models = out.unpriced_models
        rollup = out.rollup
        stamps = out.stamps
        deltas = out.budgets
        memberships = self.budgets.touched_keys if self.budgets.budgets else None
        zone = self.zone
        # A budget's bucket of an event depends only on the event's whole seconds since the epoch through its
        # quarter hour (calendar windows: every zone's midnight is on the quarter hour) or its rolling bucket: each
        # (window kind or bucket size, index) is worked out once, in one cache per grain.
        plans: dict[str, tuple[int, dict[int, datetime]]] = {}
        grains: dict[str | int, dict[int, datetime]] = {}
        quarters: dict[float, datetime] = {}
        buckets = LATENCY_BUCKETS
        model_labels: dict[str, str] = {}
        no_values: tuple[str, ...] = ()
        no_present: tuple[bool, ...] = ()
        accepted = unpriced_count = dropped = 0
        for event, price in new:
            accepted += 1
            dropped += event.attributes_dropped
            cost = price.cost_pico
            model = model_labels.get(price.model)
            if model is None:
                model = model_labels[price.model] = label_of(price.model)
            attributes = event.attributes or {}
            values = tuple([attributes.get(name, "") for name in names]) if names else no_values
            row = sums.get((model, values))
            if row is None:
                row = sums[model, values] = [0] * SUM_FIELDS
            row[0] += 1
            if cost is not None:
                row[1] += cost
                row[7] += 1
            else:
                unpriced_count += 1
                unpriced_models[price.model] = unpriced_models.get(price.model, 0) + 1
            row[2] += event.input_tokens
            row[3] += event.output_tokens
            row[4] += event.cache_read_tokens
            row[5] += event.cache_write_5m_tokens
            row[6] += event.cache_write_1h_tokens
            latency = event.latency_ms
            if latency is not None:
                row[8] += 1
                row[9] += round(latency * 1000)
                row[10 + bisect.bisect_left(buckets, latency / 1000)] += 1
            status = event.status
            if status is not None and not 200 <= status < 300:
                errors[model, status] = errors.get((model, status), 0) + 1
            stamp = event.timestamp.timestamp()
            stamps.append(stamp)
            quarter = stamp // _QUARTER_HOUR_S
            bucket = quarters.get(quarter)
            if bucket is None:
                bucket = quarters[quarter] = bucket_of(event.timestamp)
            tier = event.service_tier  # the tier as `rollup.service_tier` decides it, without a call per event
            key = (
                bucket,
                price.model,
                "batch" if event.batch or tier == "batch" else "priority" if tier == "priority" else "standard",
                "error" if status is not None and status >= 400 else "ok",
                values,
                tuple([name in attributes for name in names]) if names else no_present,
                cost is None and model == UNPRICED,
            )
            sums_row = rollup.get(key)
            if sums_row is None:
                sums_row = rollup[key] = [0] * len(ROLLUP_FIELDS)
            sums_row[0] += 1
            sums_row[1] += event.input_tokens
            sums_row[2] += event.output_tokens
            sums_row[3] += event.cache_read_tokens
            sums_row[4] += event.cache_write_5m_tokens
            sums_row[5] += event.cache_write_1h_tokens
            sums_row[6] += event.web_search_requests
            if cost is None:
                sums_row[8] += 1
            else:
                sums_row[7] += cost
            if memberships is None:
                continue
            seconds = int(stamp)  # an aware datetime's timestamp() is its seconds since the epoch
            for budget, scope in memberships(price.model, attributes):
                name = budget.name
                plan = plans.get(name)
                if plan is None:
                    grain, step = _bucket_grain(budget)
                    plan = plans[name] = (step, grains.setdefault(grain, {}))
                step, cache = plan
                index = seconds // step
                start = cache.get(index)
                if start is None:
                    start = cache[index] = budget.bucket_of(event.timestamp, zone)
                delta_key = (name, scope, start)
                usage = deltas.get(delta_key)
                if usage is None:
                    deltas[delta_key] = [
                        1,
                        event.input_tokens,
                        event.output_tokens,
                        event.cache_read_tokens,
                        event.cache_write_5m_tokens,
                        event.cache_write_1h_tokens,
                        cost or 0,
                    ]
                else:
                    usage[0] += 1
                    usage[1] += event.input_tokens
                    usage[2] += event.output_tokens
                    usage[3] += event.cache_read_tokens
                    usage[4] += event.cache_write_5m_tokens
                    usage[5] += event.cache_write_1h_tokens
                    usage[6] += cost or 0
        out.accepted = accepted
        out.unpriced = unpriced_count
        out.attributes_dropped = dropped
        stamps.sort()
        return out
