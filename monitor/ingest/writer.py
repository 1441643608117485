"""The one write path every source shares: price, dedup on request_id, dead-letter, count toward budgets, metrics
and the event-time rollup, and remember how far a file was read — all in one transaction per batch."""

from __future__ import annotations

import hashlib
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import Connection, Engine

from monitor.budgets import BudgetIndex
from monitor.budgets.counters import USAGE_FIELDS, Usage
from monitor.ingest.parse import Event, Rejected
from monitor.ingest.tally import Tallier, Tally
from monitor.metric_names import (
    ATTRIBUTES_DROPPED,
    COST_PICO,
    INGEST_EVENTS,
    LATE_EVENTS,
    LATENCY_BUCKET,
    LATENCY_COUNT,
    LATENCY_LE,
    LATENCY_SUM_US,
    REQUEST_ERRORS,
    REQUESTS,
    TOKENS,
    UNPRICED_EVENTS,
    UNPRICED_LABEL,
)
from monitor.pricing import Price, PriceTable
from monitor.store.bulk_pg import BulkUpsert
from monitor.store.labels import OTHER, LabelGate
from monitor.store.models import (
    USAGE_EPOCH,
    budget_usage,
    counters,
    dead_letters,
    events,
    source_offsets,
    usage_rollup,
)
from monitor.store.partitions import MonthPartitions, PartitionWindow, insert_new_events
from monitor.store.queries import (
    USAGE_KEY,
    insert_ignoring_conflicts,
    scope_totals,
    upsert_adding,
    upsert_replacing,
)
from monitor.store.rollup import (
    LATENESS,
    ROLLUP_FIELDS,
    RollupCounts,
    RollupKey,
    add_counts,
    rollup_rows,
)
from monitor.store.sqlite_events import EVENT_COLUMNS, add_rows, sqlite_datetime
from monitor.store.sqlite_events import insert_new_events as insert_new_sqlite_events
from monitor.wire import TOKEN_TYPES
from monitor.wire import scope_key as labels_key

DEFAULT_MAX_VALUES_PER_LABEL = 200
DEFAULT_MAX_UNPRICED_MODELS = 50
_LABEL_KEY_CACHE = 4096  # (model, label values) entries; values are capped already, this bounds memory


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ROLLUP_KEYS = ("bucket_start", "model", "service_tier", "status_class", "labels")
_RollupTuple = tuple[datetime, str, str, str, str]  # RollupKey's fields in order


@dataclass(frozen=True, slots=True)
class _LabelKeys:
    """The counter label keys of one (model, metric label values): computed once, not per event."""

    base: str
    model: str
    tokens: tuple[str, ...]
    latency: tuple[str, ...]


@dataclass
class BatchResult:
    """What one batch (or a whole run, when added up) did."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unpriced: int = 0
    attributes_dropped: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    # Budget scopes the batch added to, with their window totals after it: (budget, scope key) -> usage.
    touched: dict[tuple[str, str], Usage] = field(default_factory=dict)
    # Every stored or duplicate event of the batch: (request_id, lease, prompt tokens), for admission to settle.
    settles: list[tuple[str, str | None, int]] = field(default_factory=list)

    def add(self, other: BatchResult, keep_rejections: bool = False) -> None:
        """Add another result's counts to this one."""
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.unpriced += other.unpriced
        self.attributes_dropped += other.attributes_dropped
        if keep_rejections:
            self.rejections.extend(other.rejections)
        self.touched.update(other.touched)
        self.settles.extend(other.settles)

    def as_dict(self) -> dict[str, int]:
        """The summary `ingest --format json` prints."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "unpriced": self.unpriced,
        }


Item = tuple[str, Event | Rejected]  # (location, parsed)


@dataclass(frozen=True)
class LetterCap:
    """At most `limit` dead letters from one batch; the rest become one summary letter at `location` keeping
    `raw` (e.g. the request body's first bytes). Every rejection is still counted."""

    limit: int
    location: str
    raw: str


@dataclass(frozen=True)
class Batch:
    """One batch of a group written in one transaction (e.g. one HTTP request's events), with its letter cap."""

    items: Sequence[Item]
    cap: LetterCap | None = None


@dataclass(frozen=True)
class Offset:
    """How far a tailed file has been read: stored with the events read up to there."""

    file_id: str
    path: str
    offset: int


@dataclass
class Prepared:
    """One batch of a file made ready to write away from the store (in a parse process): its new-looking events as
    rows to insert (in request_id order), its rejected lines, and the tally of those rows, right as it is when
    every row turns out new; the writer works out what it must when some were stored already."""

    rows: list[Any]  # SQLite: tuples as its DBAPI takes them; otherwise dicts of column values
    rejections: list[tuple[int, Rejected]]  # (line number, rejection)
    repeats: int  # events whose request_id an earlier line of the batch carries
    tally: Tally
    dropped: dict[str, int]  # request_id -> attribute values dropped, for the few events that had some
    settles: list[tuple[str, str | None, int]]  # for admission to settle (only when the writer settles leases)


class Preparer:
    """Prepares batches as a writer with the same configuration would write them; picklable, so a parse process
    can hold one."""

    def __init__(
        self,
        prices: PriceTable,
        tallier: Tallier,
        dialect: str,
        settles: bool,
    ) -> None:
        self._prices = prices
        self._tallier = tallier
        self._sqlite = dialect == "sqlite"
        self._settles = settles

    def prepare(self, lines: Sequence[tuple[int, Event | Rejected]], source: str, received: datetime) -> Prepared:
        """Price and shape one batch's lines (received at `received`)."""
        rows: list[Any] = []
        rejections: list[tuple[int, Rejected]] = []
        fresh: list[tuple[Event, Price]] = []
        seen: set[str] = set()
        dropped: dict[str, int] = {}
        settles: list[tuple[str, str | None, int]] = []
        repeats = 0
        price_of = self._prices.price
        stamp = sqlite_datetime(received) if self._sqlite else None
        for number, item in lines:
            if isinstance(item, Rejected):
                rejections.append((number, item))
                continue
            if item.request_id in seen:
                repeats += 1
                continue
            seen.add(item.request_id)
            price = price_of(item)
            fresh.append((item, price))
            rows.append(_event_row(self._prices, item, price, source, received, stamp))
            if item.attributes_dropped:
                dropped[item.request_id] = item.attributes_dropped
            if self._settles:
                prompt = item.input_tokens + item.cache_write_5m_tokens + item.cache_write_1h_tokens
                settles.append((item.request_id, item.lease, prompt))
        rows.sort(key=_request_id_of_tuple if self._sqlite else _request_id_of_dict)
        return Prepared(rows, rejections, repeats, self._tallier.tally(fresh), dropped, settles)


def _rebuilt(row: Any, sqlite: bool, dropped: dict[str, int]) -> tuple[Event, Price]:
    """The event and price a prepared row was made from, as far as a tally reads them."""
    if sqlite:
        values = dict(zip(EVENT_COLUMNS, row, strict=True))
        values["ts"] = datetime.fromisoformat(values["ts"]).replace(tzinfo=UTC)
        values["attributes"] = orjson.loads(values["attributes"])
    else:
        values = row
    event = Event(
        values["request_id"],
        values["ts"],
        values["model_id"],
        values["input_tokens"],
        values["output_tokens"],
        values["cache_read_tokens"],
        values["cache_write_5m_tokens"],
        values["cache_write_1h_tokens"],
        values["web_search_requests"],
        values["web_fetch_requests"],
        bool(values["batch"]),
        values["service_tier"],
        values["speed"],
        values["inference_geo"],
        values["status"],
        values["latency_ms"],
        values["attributes"],
        dropped.get(values["request_id"], 0),
    )
    return event, Price(values["model"], values["cost_pico"], values["price_version"], bool(values["long_prompt"]))


class Writer:
    """Writes parsed batches to the store in one transaction each."""

    def __init__(
        self,
        engine: Engine,
        prices: PriceTable,
        clock: Callable[[], datetime],
        *,
        budgets: BudgetIndex | None = None,
        zone: ZoneInfo | None = None,
        metric_labels: Sequence[str] = (),
        max_values_per_label: int = DEFAULT_MAX_VALUES_PER_LABEL,
        max_unpriced_models: int = DEFAULT_MAX_UNPRICED_MODELS,
        partitions: PartitionWindow | None = None,
    ) -> None:
        self._engine = engine
        self._prices = prices
        self._clock = clock
        self._budgets = budgets or BudgetIndex([])
        self._zone = zone or ZoneInfo("UTC")
        self._metric_labels = tuple(metric_labels)
        self._tallier = Tallier(prices, self._metric_labels, self._budgets, self._zone)
        self._label_cache: dict[tuple[str, tuple[str, ...]], _LabelKeys] = {}
        self.labels = LabelGate(
            {**dict.fromkeys(self._metric_labels, max_values_per_label), UNPRICED_LABEL: max_unpriced_models}
        )
        dialect = engine.dialect
        self._sqlite = dialect.name == "sqlite"  # events go in as plain tuples through the DBAPI's executemany
        # PostgreSQL: COPY into a staging table, the request_ids claimed in event_ids (events is partitioned).
        self._copy_events = dialect.name == "postgresql"
        self._partitions = MonthPartitions(engine, partitions or PartitionWindow()) if self._copy_events else None
        self._insert = insert_ignoring_conflicts(events, dialect, "request_id").returning(events.c.request_id)
        self._insert_letter = insert_ignoring_conflicts(dead_letters, dialect, "fingerprint")
        self._add_usage = upsert_adding(budget_usage, dialect, USAGE_KEY, USAGE_FIELDS)
        self._add_counter = upsert_adding(counters, dialect, ("name", "labels"), ("value",))
        self._add_rollup = upsert_adding(usage_rollup, dialect, ROLLUP_KEYS, ROLLUP_FIELDS)
        if self._copy_events:  # one statement per upsert, the rows sent as arrays
            self._add_usage = BulkUpsert(budget_usage, USAGE_KEY, USAGE_FIELDS, adding=True)
            self._add_counter = BulkUpsert(counters, ("name", "labels"), ("value",), adding=True)
            self._add_rollup = BulkUpsert(usage_rollup, ROLLUP_KEYS, ROLLUP_FIELDS, adding=True)
        self._set_offset = upsert_replacing(
            source_offsets, dialect, ("source", "file_id"), ("path", "offset", "updated_at")
        )
        # Admission state in the database: settles the leases a batch's events name, in the batch's transaction.
        self.settle_leases: Callable[[Connection, list[tuple[str, str | None, int]], datetime], None] | None = None

    def _label_keys(self, model: str, label_values: tuple[str, ...]) -> _LabelKeys:
        cached = self._label_cache.get((model, label_values))
        if cached is None:
            if len(self._label_cache) >= _LABEL_KEY_CACHE:
                self._label_cache.clear()
            labels = {"model": model, **dict(zip(self._metric_labels, label_values, strict=True))}
            cached = _LabelKeys(
                labels_key(labels),
                labels_key({"model": model}),
                tuple(labels_key({**labels, "type": kind}) for kind in TOKEN_TYPES),
                tuple(labels_key({"model": model, "le": le}) for le in LATENCY_LE),
            )
            self._label_cache[model, label_values] = cached
        return cached

    @staticmethod
    def _upsert(connection: Connection, statement: Any, rows: Sequence[dict[str, Any]]) -> None:
        if isinstance(statement, BulkUpsert):
            statement.execute(connection, rows)
        else:
            connection.execute(statement, rows)

    def set_budgets(self, budgets: BudgetIndex) -> None:
        """Count toward these budgets from the next batch on."""
        self._budgets = budgets
        self._tallier.budgets = budgets

    def write(
        self, items: Sequence[Item], source: str, offsets: Sequence[Offset] = (), cap: LetterCap | None = None
    ) -> BatchResult:
        """Store a batch: new events priced, duplicates skipped, rejections dead-lettered; all or nothing."""
        return self.write_group([Batch(items, cap)], source, offsets)[0]

    def write_group(self, batches: Sequence[Batch], source: str, offsets: Sequence[Offset] = ()) -> list[BatchResult]:
        """Store several batches in one transaction (all or nothing); one result per batch, in order.

        Each result is what that batch would have got written alone right after the ones before it: a request_id
        that an earlier batch of the group carries too is a duplicate in the later one. `touched` is the group's
        (the window totals after all of it), the same in every result.
        """
        now = self._clock()
        results = [BatchResult() for _ in batches]
        rows: list[Any] = []  # SQLite: tuples as its DBAPI takes them; otherwise dicts of column values
        letters: list[dict[str, Any]] = []
        fresh: list[tuple[Event, Price, int]] = []  # (event, its price, index of its batch)
        seen: set[str] = set()
        for index, (batch, result) in enumerate(zip(batches, results, strict=True)):
            own_letters = self._sort_batch(batch, result, source, now, seen, rows, fresh, index)
            result.rejected = len(own_letters)
            letters.extend(_capped(own_letters, batch.cap, source, now))
        # Every writer takes request_ids in one order: two PostgreSQL transactions inserting overlapping events in
        # opposite orders would otherwise each wait for a key the other holds (a deadlock). Dead letters keep their
        # arrival order (their ids are the order they are read back in).
        rows.sort(key=_request_id_of_tuple if self._sqlite else _request_id_of_dict)
        if self._partitions is not None and rows:
            self._partitions.ensure((row["ts"] for row in rows), now)
        admitted: dict[str, frozenset[str]] = {}
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            inserted = self._insert_new(connection, rows)
            if letters:
                connection.execute(self._insert_letter, letters)
            new: list[tuple[Event, Price]] = []
            for event, price, index in fresh:
                result = results[index]
                prompt = event.input_tokens + event.cache_write_5m_tokens + event.cache_write_1h_tokens
                result.settles.append((event.request_id, event.lease, prompt))  # stored or duplicate: both settle
                if event.request_id in inserted:
                    new.append((event, price))
                    result.accepted += 1
                    if price.cost_pico is None:
                        result.unpriced += 1
                    result.attributes_dropped += event.attributes_dropped
                else:  # already stored by an earlier batch (or another writer)
                    result.duplicates += 1
            total = BatchResult()
            for result in results:
                total.add(result)
            if self.settle_leases is not None:
                self.settle_leases(connection, total.settles, now)
            admitted, touched = self._apply(connection, self._tallier.tally(new), total, source, now)
            if offsets:
                connection.execute(
                    self._set_offset,
                    [
                        {"source": source, "file_id": o.file_id, "path": o.path, "offset": o.offset, "updated_at": now}
                        for o in sorted(offsets, key=lambda o: o.file_id)
                    ],
                )
        if admitted:
            self.labels.publish(admitted)  # committed: other batches of this process may now use them
        for result in results:
            result.touched = touched
        return results

    def _insert_new(self, connection: Connection, rows: list[Any]) -> set[str]:
        """Insert the rows whose request_id is not stored yet; the request_ids that were new."""
        if not rows:
            return set()
        if self._sqlite:
            return insert_new_sqlite_events(connection, rows)
        if self._copy_events:
            return insert_new_events(connection, rows)
        return set(connection.execute(self._insert, rows).scalars())

    def preparer(self) -> Preparer:
        """What prepares batches for `write_prepared` as this writer is configured now."""
        return Preparer(self._prices, self._tallier, self._engine.dialect.name, self.settle_leases is not None)

    def write_prepared(self, prepared: Prepared, source: str, where: str) -> BatchResult:
        """Store a prepared batch of the file `where` names (see `Prepared`); all or nothing. The result is the one
        `write` gives for the same lines."""
        now = self._clock()
        result = BatchResult(duplicates=prepared.repeats)
        letters = []
        for number, rejected in prepared.rejections:
            location = f"{where}:{number}"
            letters.append(_letter(now, source, location[:1024], rejected.reason, rejected.raw, rejected.request_id))
            result.rejections.append((location, rejected.reason))
        result.rejected = len(letters)
        rows = prepared.rows
        if self._partitions is not None and rows:
            self._partitions.ensure((row["ts"] for row in rows), now)
        admitted: dict[str, frozenset[str]] = {}
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            inserted = self._insert_new(connection, rows)
            if letters:
                connection.execute(self._insert_letter, letters)
            tally = prepared.tally
            if len(inserted) != len(rows):  # some were stored already: tally only the new ones
                sqlite = self._sqlite
                key = _request_id_of_tuple if sqlite else _request_id_of_dict
                tally = self._tallier.tally(
                    _rebuilt(row, sqlite, prepared.dropped) for row in rows if key(row) in inserted
                )
            result.accepted = tally.accepted
            result.unpriced = tally.unpriced
            result.attributes_dropped = tally.attributes_dropped
            result.duplicates += len(rows) - len(inserted)
            result.settles = prepared.settles
            if self.settle_leases is not None:
                self.settle_leases(connection, result.settles, now)
            admitted, result.touched = self._apply(connection, tally, result, source, now)
        if admitted:
            self.labels.publish(admitted)
        return result

    def _sort_batch(
        self,
        batch: Batch,
        result: BatchResult,
        source: str,
        now: datetime,
        seen: set[str],
        rows: list[Any],
        fresh: list[tuple[Event, Price, int]],
        index: int,
    ) -> list[dict[str, Any]]:
        """Price one batch's new events into `rows`/`fresh`, count its repeats; its dead letters."""
        letters: list[dict[str, Any]] = []
        stamp = sqlite_datetime(now) if self._sqlite else None
        for location, item in batch.items:
            if isinstance(item, Rejected):
                letters.append(_letter(now, source, location[:1024], item.reason, item.raw, item.request_id))
                result.rejections.append((location, item.reason))
                continue
            if item.request_id in seen:
                result.duplicates += 1
                continue
            seen.add(item.request_id)
            price = self._prices.price(item)
            fresh.append((item, price, index))
            rows.append(_event_row(self._prices, item, price, source, now, stamp))
        return letters

    def _apply(
        self, connection: Connection, tally: Tally, result: BatchResult, source: str, now: datetime
    ) -> tuple[dict[str, frozenset[str]], dict[tuple[str, str], Usage]]:
        """Add a tally of the batch's new events (and `result`'s outcome counts) to the counters, the rollup and the
        budget buckets; return the admitted label sets to publish once committed, and the budget scopes the batch
        added to in their window in force now, with their totals after it."""
        values: dict[tuple[str, str], int] = defaultdict(int)
        for outcome, count in (
            ("accepted", result.accepted),
            ("duplicate", result.duplicates),
            ("rejected", result.rejected),
        ):
            if count:
                values[INGEST_EVENTS, labels_key({"source": source, "outcome": outcome})] += count
        if result.attributes_dropped:
            values[ATTRIBUTES_DROPPED, labels_key({"source": source})] += result.attributes_dropped
        # Labels are bounded here, as the counter is written: the model label is a price-table name or `unpriced`,
        # every other label an admitted value or `__other__`. Spend is kept whole; only its labels are capped.
        decided, unpriced_as, admitted = self._decide_labels(connection, tally, now)
        # Summed per capped label set first: two raw sets may become one.
        sums: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for (model, raw), row in tally.sums.items():
            add_counts(sums, (model, decided[raw]), row)
        for (model, label_values), row in sums.items():
            keys = self._label_keys(model, label_values)
            values[REQUESTS, keys.base] += row[0]
            if row[7]:
                values[COST_PICO, keys.base] += row[1]
            for token_key, count in zip(keys.tokens, row[2:7], strict=True):
                if count:
                    values[TOKENS, token_key] += count
            if row[8]:
                values[LATENCY_COUNT, keys.model] += row[8]
                values[LATENCY_SUM_US, keys.model] += row[9]
                for bucket_key, count in zip(keys.latency, row[10:], strict=True):
                    if count:
                        values[LATENCY_BUCKET, bucket_key] += count
        for model, count in tally.unpriced_models.items():
            values[UNPRICED_EVENTS, labels_key({"model": unpriced_as[model]})] += count
        for (model, status), count in tally.errors.items():
            values[REQUEST_ERRORS, labels_key({"model": model, "status": str(status)})] += count
        for late, count in tally.late_counts(now, LATENESS).items():
            values[LATE_EVENTS, labels_key({"lateness": late})] += count
        if values and self._sqlite:
            ordered = [(name, key, value) for (name, key), value in sorted(values.items())]
            add_rows(connection, counters, ("name", "labels"), ("value",), ordered)
        elif values:
            self._upsert(
                connection,
                self._add_counter,
                [{"name": name, "labels": key, "value": value} for (name, key), value in sorted(values.items())],
            )
        self._add_to_rollup(connection, tally, decided, unpriced_as)
        return admitted, self._add_to_budgets(connection, tally, now)

    def _decide_labels(
        self, connection: Connection, tally: Tally, now: datetime
    ) -> tuple[dict[tuple[str, ...], tuple[str, ...]], dict[str, str], dict[str, frozenset[str]]]:
        """Each raw label set of the tally as capped, each unpriced model as its label, and the sets this
        transaction admitted (to publish once it commits; empty when the cache decided all)."""
        gate = self.labels
        names = self._metric_labels
        distinct = list(dict.fromkeys(raw for _, raw in tally.sums))  # in order of first appearance: slots go in order
        wanted: dict[str, dict[str, None]] = defaultdict(dict)
        for raw in distinct:
            for name, value in zip(names, raw, strict=True):
                if gate.cached(name, value) is None:
                    wanted[name][value] = None
        for model in tally.unpriced_models:
            if gate.cached(UNPRICED_LABEL, model) is None:
                wanted[UNPRICED_LABEL][model] = None
        admitted = gate.admit(connection, wanted, now) if wanted else {}

        def decide(label: str, value: str) -> str:
            if value in admitted.get(label, ()):
                return value  # admitted by this transaction (or seen in the table by it)
            known = gate.cached(label, value)
            return OTHER if known is None else known  # None: asked for a slot above and refused

        decided = {raw: tuple(decide(name, value) for name, value in zip(names, raw, strict=True)) for raw in distinct}
        unpriced_as = {model: decide(UNPRICED_LABEL, model) for model in tally.unpriced_models}
        return decided, unpriced_as, admitted

    def _add_to_rollup(
        self,
        connection: Connection,
        tally: Tally,
        decided: dict[tuple[str, ...], tuple[str, ...]],
        unpriced_as: dict[str, str],
    ) -> None:
        """Add the tally's rollup sums to their event-time buckets, with the counters' bounded labels: a price-table
        name as it is, an unknown id as its unpriced-model slot allows (the id, or __other__), label values of
        attributes the event lacks as None."""
        if not tally.rollup:
            return
        names = self._metric_labels
        label_json: dict[tuple[tuple[str, ...], tuple[bool, ...]], str] = {}
        deltas: dict[_RollupTuple, list[int]] = {}
        for (bucket, model, tier, status, raw, present, unknown), row in tally.rollup.items():
            label_values = decided[raw]
            labels = label_json.get((label_values, present))
            if labels is None:
                labels = label_json[label_values, present] = labels_key(
                    {
                        name: value if has else None
                        for name, value, has in zip(names, label_values, present, strict=True)
                    }
                )
            add_counts(deltas, (bucket, unpriced_as[model] if unknown else model, tier, status, labels), row)
        if self._sqlite:
            rows = [
                (sqlite_datetime(bucket), model, tier, status, labels, *row)
                for (bucket, model, tier, status, labels), row in sorted(deltas.items())
            ]
            add_rows(connection, usage_rollup, ROLLUP_KEYS, ROLLUP_FIELDS, rows)
        else:
            self._upsert(
                connection,
                self._add_rollup,
                rollup_rows({RollupKey(*key): RollupCounts(*row) for key, row in deltas.items()}),
            )

    def _add_to_budgets(self, connection: Connection, tally: Tally, now: datetime) -> dict[tuple[str, str], Usage]:
        deltas = tally.budgets
        if not deltas:
            return {}
        # Which scopes' window in force now the batch added to: decided once per row, not once per event.
        known = {budget.name: budget for budget in self._budgets.budgets}
        zone = self._zone
        named = {name for name, _, _ in deltas}
        ranges = {name: known[name].bucket_range(now, zone) for name in named if name in known}
        touched: dict[str, set[str]] = defaultdict(set)
        for name, key, bucket in deltas:
            span = ranges.get(name)
            if span is None:
                continue
            first, end = span
            if bucket >= first and (end is None or bucket < end):
                touched[name].add(key)
        # Shared rows are upserted in key order (counters too): concurrent batches (tailer and HTTP, replicas on
        # PostgreSQL) then lock them in one order and cannot deadlock each other. SQLite's rows are sorted as the
        # text they are stored as: comparing aware datetimes costs several times more.
        if self._sqlite:  # a calendar window's rows under its start, a rolling window's under the epoch: usage_period
            rolling = {name for name in named if (budget := known.get(name)) is None or budget.bucket is not None}
            texts = {bucket: sqlite_datetime(bucket) for bucket in {bucket for _, _, bucket in deltas}}
            epoch = sqlite_datetime(USAGE_EPOCH)
            rows = [
                (name, epoch if name in rolling else texts[bucket], key, texts[bucket], *usage)
                for (name, key, bucket), usage in deltas.items()
            ]
            rows.sort()
            add_rows(connection, budget_usage, USAGE_KEY, USAGE_FIELDS, rows)
        else:
            keyed = sorted(
                ((name, USAGE_EPOCH, key, bucket), usage)  # see usage_period
                for (name, key, bucket), usage in deltas.items()
            )
            self._upsert(
                connection,
                self._add_usage,
                [
                    {**dict(zip(USAGE_KEY, row_key, strict=True)), **dict(zip(USAGE_FIELDS, usage, strict=True))}
                    for row_key, usage in keyed
                ],
            )
        totals: dict[tuple[str, str], Usage] = {}
        for name, keys in touched.items():
            for key, usage in scope_totals(connection, name, keys, *ranges[name]).items():
                totals[name, key] = usage
        return totals


def _letter(now: datetime, source: str, location: str, reason: str, raw: str, request_id: str | None) -> dict[str, Any]:
    return {
        "received_at": now,
        "source": source,
        "location": location,
        "reason": reason,
        "raw": raw,
        "request_id": request_id,
        "fingerprint": _fingerprint(source, location, raw),
    }


def _capped(letters: list[dict[str, Any]], cap: LetterCap | None, source: str, now: datetime) -> list[dict[str, Any]]:
    """A batch's dead letters, at most `cap.limit` of them and then one summary letter."""
    if cap is None or len(letters) <= cap.limit:
        return letters
    more = len(letters) - cap.limit
    reason = (
        f"{more:,} more rejected lines in this batch were not dead-lettered one by one (the first "
        f"{cap.limit:,} were; all {len(letters):,} are counted); raw holds the start of the batch"
    )
    return [*letters[: cap.limit], _letter(now, source, cap.location[:1024], reason, cap.raw, None)]


def _fingerprint(source: str, location: str, raw: str) -> str:
    return hashlib.sha256(f"{source}\x00{location}\x00{raw}".encode()).hexdigest()


def _event_row(
    prices: PriceTable, event: Event, price: Price, source: str, received: datetime, stamp: str | None
) -> Any:
    """A priced event's `events` row: a tuple as SQLite's driver takes it (`stamp`: `received` as SQLite's text),
    or, without a stamp, a dict of column values."""
    modifiers = prices.modifiers(event.speed, event.inference_geo)
    if stamp is not None:
        return _sqlite_row(event, price, stamp, source, modifiers)
    return _row(event, price, received, source, modifiers)


def _row(
    event: Event, price: Price, now: datetime, source: str, modifiers: tuple[str | None, str | None]
) -> dict[str, Any]:
    speed, geo = modifiers  # as the price table knows them: the stored values are bounded too
    return {
        "request_id": event.request_id,
        "ts": event.timestamp,
        "received_at": now,
        "source": source,
        "model_id": event.model_id,
        "model": price.model,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_5m_tokens": event.cache_write_5m_tokens,
        "cache_write_1h_tokens": event.cache_write_1h_tokens,
        "web_search_requests": event.web_search_requests,
        "web_fetch_requests": event.web_fetch_requests,
        "batch": event.batch,
        "long_prompt": price.long_prompt,
        "service_tier": event.service_tier,
        "speed": speed,
        "inference_geo": geo,
        "status": event.status,
        "latency_ms": event.latency_ms,
        "attributes": event.attributes or {},
        "cost_pico": price.cost_pico,
        "price_version": price.price_version,
    }


def _sqlite_row(
    event: Event, price: Price, received: str, source: str, modifiers: tuple[str | None, str | None]
) -> tuple[Any, ...]:
    """`_row` as a tuple in the column order of `insert_new_events`, values as SQLite stores them."""
    speed, geo = modifiers
    return (
        event.request_id,
        sqlite_datetime(event.timestamp),
        received,
        source,
        event.model_id,
        price.model,
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_5m_tokens,
        event.cache_write_1h_tokens,
        event.web_search_requests,
        event.web_fetch_requests,
        event.batch,
        price.long_prompt,
        event.service_tier,
        speed,
        geo,
        event.status,
        event.latency_ms,
        orjson.dumps(event.attributes or {}).decode(),  # compact JSON: the same value to every JSON reader
        price.cost_pico,
        price.price_version,
    )


# The request_id of a row as SQLite takes it, or as a dict of column values: item getters sort in C.
_request_id_of_tuple = operator.itemgetter(0)
_request_id_of_dict = operator.itemgetter("request_id")
