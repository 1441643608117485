"""Events stored while their model had no price, priced once the table gives them one — exactly once.

An event the table could not price is stored with no cost and counted as unpriced: in the event-time rollup under
its unpriced-model label, in the budget counters with its tokens and no spend, in `claude_requests_total` and
`claude_tokens_total` under `model="unpriced"`. When the table later knows the model (a new shipped entry after an
upgrade, or a `pricing.models` override), this pass prices each such event at the rates in force on its own UTC date
and moves it, in one transaction per batch with the event's own update:

- the event: its price-table name, cost, price version and long-prompt flag;
- `usage_rollup`: its requests, tokens and web searches leave the unpriced row they were counted in (one unpriced
  request fewer) for the price-table name's row, with the cost;
- `budget_usage`: the cost is added where the event was counted; a budget that matches or splits on `model` moves
  the event to the scope its price-table name gives;
- counters: the cost is added to `claude_cost_usd_total` under the price-table name, and the event to
  `claude_monitor_repriced_events_total`. Request, token and unpriced-event counters keep it where it was counted:
  a Prometheus counter never goes down.

The update is guarded (`cost_pico IS NULL`, rows locked on PostgreSQL): a second run, or a second replica, finds
nothing left and adds nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, bindparam, delete, func, select, tuple_, update

from monitor.budgets import BudgetIndex
from monitor.budgets.counters import USAGE_FIELDS, Usage
from monitor.ingest.parse import Event
from monitor.metric_names import COST_PICO, REPRICED_EVENTS, UNPRICED_LABEL
from monitor.pricing import Price, PriceTable
from monitor.store.labels import FREE_VALUES, OTHER
from monitor.store.models import budget_usage, counters, events, label_values, usage_rollup
from monitor.store.queries import USAGE_KEY, upsert_adding, usage_period
from monitor.store.rollup import ROLLUP_FIELDS, add_counts, bucket_of, service_tier, status_class
from monitor.wire import scope_key

DEFAULT_BATCH = 1000
_ROLLUP_KEY = ("bucket_start", "model", "service_tier", "status_class", "labels")


@dataclass
class RepriceResult:
    """What a pass priced: events and pico-dollars per price-table name, and the events still without a price."""

    by_model: dict[str, list[int]] = field(default_factory=dict)  # name -> [events, cost_pico]
    unpriced_left: int = 0

    @property
    def repriced(self) -> int:
        """Events priced by this pass."""
        return sum(events for events, _ in self.by_model.values())

    @property
    def cost_pico(self) -> int:
        """Their cost, in pico-dollars."""
        return sum(cost for _, cost in self.by_model.values())


class Repricer:
    """Prices the stored unpriced events the table now knows, through the rollup, budget and metric counters."""

    def __init__(
        self,
        engine: Engine,
        prices: PriceTable,
        *,
        budgets: BudgetIndex | None = None,
        zone: ZoneInfo | None = None,
        metric_labels: Sequence[str] = (),
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self._engine = engine
        self._prices = prices
        self._budgets = budgets or BudgetIndex([])
        self._zone = zone or ZoneInfo("UTC")
        self._metric_labels = tuple(metric_labels)
        self._batch = batch_size
        dialect = engine.dialect
        self._dialect = dialect.name  # where a bucket's row is stored (usage_period)
        self._add_counter = upsert_adding(counters, dialect, ("name", "labels"), ("value",))
        self._add_rollup = upsert_adding(usage_rollup, dialect, _ROLLUP_KEY, ROLLUP_FIELDS)
        self._add_usage = upsert_adding(budget_usage, dialect, USAGE_KEY, USAGE_FIELDS)
        # A row the pass emptied (its only requests moved away), or one it made for an event that was never counted
        # there (a budget bucket before the budget was counted, or past retention), is dropped.
        self._drop_rollup = delete(usage_rollup).where(
            *(usage_rollup.c[name] == bindparam(f"k_{name}") for name in _ROLLUP_KEY), usage_rollup.c.requests <= 0
        )
        self._drop_usage = delete(budget_usage).where(
            # Emptied by the move: every figure back to zero. Not a row gone below zero, nor one at zero requests with
            # tokens left: the same bucket stored under the other period (see USAGE_EPOCH) holds the rest.
            *(budget_usage.c[name] == bindparam(f"k_{name}") for name in USAGE_KEY),
            *(budget_usage.c[name] == 0 for name in USAGE_FIELDS),
        )

    def priceable(self, connection: Connection) -> list[str]:
        """The model ids of stored unpriced events that the table can now resolve."""
        query = select(events.c.model_id).where(events.c.cost_pico.is_(None)).distinct()
        return sorted(m for m in connection.execute(query).scalars() if self._prices.resolve(m) is not None)

    def run(self) -> RepriceResult:
        """Price every stored unpriced event the table can price now; batches of `batch_size`, each one transaction.

        One model id at a time, on the partial index of unpriced events, and only from the UTC day of its first
        rate: events the table still cannot price (an unknown model, a date before any rate) are never read, however
        many batches the pass takes. The label gate is read once (values admitted meanwhile are looked up as met)."""
        result = RepriceResult()
        with self._engine.connect() as connection:
            ids = self.priceable(connection)
            gate = _Gate(connection, [*self._metric_labels, UNPRICED_LABEL])
        for model_id in ids:
            name = self._prices.resolve(model_id)
            rates = self._prices.rates(name) if name is not None else []
            if not rates:
                continue
            first = datetime.combine(rates[0].since, time(0), UTC)  # an event's rates are those of its UTC date
            last = 0
            while True:
                with (
                    self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection,
                    connection.begin(),
                ):
                    rows = connection.execute(
                        select(events)
                        .where(
                            events.c.cost_pico.is_(None),
                            events.c.model_id == model_id,
                            events.c.ts >= first,
                            events.c.id > last,
                        )
                        .order_by(events.c.id)
                        .limit(self._batch)
                        .with_for_update(skip_locked=True)  # PostgreSQL: another pass takes other rows meanwhile
                    ).all()
                    if not rows:
                        break
                    last = rows[-1].id
                    self._batch_of(connection, rows, result, gate)
        with self._engine.connect() as connection:
            result.unpriced_left = int(
                connection.execute(
                    select(func.count()).select_from(events).where(events.c.cost_pico.is_(None))
                ).scalar_one()
            )
        return result

    def _batch_of(self, connection: Connection, rows: Sequence[Any], result: RepriceResult, gate: _Gate) -> None:
        """Price one batch of locked rows and move them, in the caller's transaction."""
        priced: list[tuple[Any, Price]] = []
        for row in rows:
            price = self._prices.price(_event(row))
            if price.cost_pico is not None:
                priced.append((row, price))
        if not priced:
            return
        connection.execute(
            update(events)
            .where(events.c.id == bindparam("k_id"), events.c.cost_pico.is_(None))
            .values(
                model=bindparam("v_model"),
                cost_pico=bindparam("v_cost"),
                price_version=bindparam("v_version"),
                long_prompt=bindparam("v_long"),
            ),
            [
                {
                    "k_id": row.id,
                    "v_model": price.model,
                    "v_cost": price.cost_pico,
                    "v_version": price.price_version,
                    "v_long": price.long_prompt,
                }
                for row, price in priced
            ],
        )
        admitted = gate.admitted(
            connection,
            {
                **{name: {(row.attributes or {}).get(name, "") for row, _ in priced} for name in self._metric_labels},
                UNPRICED_LABEL: {row.model_id for row, _ in priced},
            },
        )
        counter_deltas: dict[tuple[str, str], int] = defaultdict(int)
        # Signed deltas: what leaves the row the event was counted in, what the row of its price-table name gains.
        rollup: dict[tuple[Any, ...], list[int]] = {}
        usage_delta: dict[tuple[str, datetime, str, datetime], Usage] = defaultdict(Usage)
        for row, price in priced:
            cost = price.cost_pico or 0
            entry = result.by_model.setdefault(price.model, [0, 0])
            entry[0] += 1
            entry[1] += cost
            attributes: dict[str, str] = row.attributes or {}
            received: datetime = row.received_at
            values = {
                name: _as_counted(attributes.get(name, ""), admitted.get(name, {}), received)
                for name in self._metric_labels
            }
            counter_labels = {"model": price.model, **values}
            counter_deltas[COST_PICO, scope_key(counter_labels)] += cost
            counter_deltas[REPRICED_EVENTS, scope_key({"model": price.model})] += 1
            # The rollup row the event was counted in: the stored name when the table resolved the id then (it had
            # no rate for the event's date), else the unpriced-model label (the id while it had a slot, else
            # __other__). A table name sent as is and dated before its first rate took that label too.
            old_model = (
                row.model
                if row.model != row.model_id
                else _as_counted(row.model_id, admitted.get(UNPRICED_LABEL, {}), received)
            )
            labels = scope_key({name: (values[name] if name in attributes else None) for name in self._metric_labels})
            tier = service_tier(row.batch, row.service_tier)
            klass = status_class(row.status)
            bucket = bucket_of(row.ts)
            counts = [
                1,
                row.input_tokens,
                row.output_tokens,
                row.cache_read_tokens,
                row.cache_write_5m_tokens,
                row.cache_write_1h_tokens,
                row.web_search_requests,
            ]
            add_counts(rollup, (bucket, old_model, tier, klass, labels), [-count for count in counts] + [0, -1])
            add_counts(rollup, (bucket, price.model, tier, klass, labels), [*counts, cost, 0])
            tokens = (
                row.input_tokens,
                row.output_tokens,
                row.cache_read_tokens,
                row.cache_write_5m_tokens,
                row.cache_write_1h_tokens,
            )
            gone = Usage(-1, *(-count for count in tokens))
            by_name = {}
            old_keys: set[tuple[str, str]] = set()
            new_keys: set[tuple[str, str]] = set()
            for model, keys in ((row.model, old_keys), (price.model, new_keys)):
                for budget, key in self._budgets.touched_keys(model, attributes):
                    by_name[budget.name] = budget
                    keys.add((budget.name, key))
            for name, key in sorted(old_keys | new_keys):
                budget = by_name[name]
                bucket = budget.bucket_of(row.ts, self._zone)
                slot = (name, usage_period(budget.bucket is not None, bucket, self._dialect), key, bucket)
                if (name, key) in old_keys and (name, key) in new_keys:
                    usage_delta[slot].add(Usage(cost_pico=cost))  # counted there already: the cost only
                elif (name, key) in old_keys:
                    usage_delta[slot].add(gone)
                else:
                    usage_delta[slot].add(Usage(1, *tokens, cost))
        # Tables in the write path's order (counters, rollup, budget usage).
        connection.execute(
            self._add_counter,
            [{"name": name, "labels": key, "value": value} for (name, key), value in sorted(counter_deltas.items())],
        )
        # One statement per table, its rows in key order: the writer upserts in key order too, so neither waits on
        # a row the other holds while holding one it wants (no deadlock on PostgreSQL).
        rollup_rows = sorted(rollup.items())
        connection.execute(
            self._add_rollup,
            [
                {**dict(zip(_ROLLUP_KEY, key, strict=True)), **dict(zip(ROLLUP_FIELDS, counts, strict=True))}
                for key, counts in rollup_rows
            ],
        )
        emptied = [
            {f"k_{n}": v for n, v in zip(_ROLLUP_KEY, key, strict=True)} for key, counts in rollup_rows if counts[0] < 0
        ]
        if emptied:
            connection.execute(self._drop_rollup, emptied)
        if usage_delta:
            usage_rows = sorted(usage_delta.items())
            connection.execute(
                self._add_usage,
                [
                    {
                        **dict(zip(USAGE_KEY, key, strict=True)),
                        **dict(zip(USAGE_FIELDS, usage.as_tuple(), strict=True)),
                    }
                    for key, usage in usage_rows
                ],
            )
            connection.execute(
                self._drop_usage,
                [{f"k_{n}": v for n, v in zip(USAGE_KEY, key, strict=True)} for key, _ in usage_rows],
            )


class _Gate:
    """The label gate (label -> value -> when it was admitted), read once per pass; a value met that it lacks is
    looked up, since it may have been admitted after the read (values are admitted, never moved)."""

    def __init__(self, connection: Connection, labels: Iterable[str]) -> None:
        self.labels = sorted(set(labels))
        self.known: dict[str, dict[str, datetime]] = {label: {} for label in self.labels}
        query = select(label_values.c.label, label_values.c.value, label_values.c.admitted_at).where(
            label_values.c.label.in_(self.labels)
        )
        for label, value, at in connection.execute(query):
            self.known[label][value] = at

    def admitted(self, connection: Connection, met: Mapping[str, set[str]]) -> dict[str, dict[str, datetime]]:
        """The gate, with the values in `met` (label -> values) it lacked looked up in one statement."""
        missing = [
            (label, value)
            for label, values in met.items()
            for value in sorted(values)
            if value not in FREE_VALUES and value not in self.known[label]
        ]
        if missing:
            query = select(label_values.c.label, label_values.c.value, label_values.c.admitted_at).where(
                tuple_(label_values.c.label, label_values.c.value).in_(missing)
            )
            for label, value, at in connection.execute(query):
                self.known[label][value] = at
        return self.known


def _as_counted(value: str, admitted: Mapping[str, datetime], received: datetime) -> str:
    """The label value an event received at `received` was counted under: the value when it held a slot by then
    (values are admitted as the first event carrying them is written), else __other__."""
    if value in FREE_VALUES:
        return value
    at = admitted.get(value)
    return value if at is not None and at <= received else OTHER


def _event(row: Any) -> Event:
    return Event(
        request_id=row.request_id,
        timestamp=row.ts,
        model_id=row.model_id,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cache_read_tokens=row.cache_read_tokens,
        cache_write_5m_tokens=row.cache_write_5m_tokens,
        cache_write_1h_tokens=row.cache_write_1h_tokens,
        web_search_requests=row.web_search_requests,
        web_fetch_requests=row.web_fetch_requests,
        batch=row.batch,
        service_tier=row.service_tier,
        speed=row.speed,
        inference_geo=row.inference_geo,
        status=row.status,
        attributes=row.attributes,
    )
