"""Spend reports over the store (the event-time rollup where it can answer): totals by any dimension and model, in
table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import Connection, Engine, case, func, select

from monitor.pricing import format_usd, usd
from monitor.store.labels import OTHER
from monitor.store.models import events
from monitor.store.rollup import (
    BUCKET,
    ROLLUP_FIELDS,
    add_counts,
    bucket_of,
    is_bucket_edge,
    totals_by_model_and_labels,
)
from monitor.wire import TOKEN_TYPES, iso_z

COUNT_COLUMNS = ("requests", *(f"{kind}_tokens" for kind in TOKEN_TYPES), "web_search_requests")


@dataclass(frozen=True)
class ReportRow:
    """One group of a report."""

    keys: dict[str, str | None]
    counts: dict[str, int]
    cost_pico: int
    unpriced_requests: int


@dataclass(frozen=True)
class Report:
    """A spend report over [since, until); None = unbounded."""

    since: datetime | None
    until: datetime | None
    by: tuple[str, ...]
    rows: list[ReportRow]
    read_from: str = "events"  # "rollup" when whole buckets came from usage_rollup (edges from events)

    @property
    def total_pico(self) -> int:
        """Total cost of the priced events."""
        return sum(row.cost_pico for row in self.rows)


Key = tuple[str | None, ...]
# Per group: the COUNT_COLUMNS, then cost (pico-USD), then unpriced requests.
Groups = dict[Key, list[int]]


def build_report(engine: Engine, *, since: datetime | None, until: datetime | None, by: Sequence[str]) -> Report:
    """Sum requests, tokens and cost over the window, grouped by `by` (dimensions and/or 'model').

    Whole 15-minute buckets are read from the event-time rollup when it holds every `by` key (model and the metric
    labels) without lumping any of their values into `__other__`; a part-bucket at either edge, and any other
    grouping, is read from the raw events."""
    with engine.connect() as connection:
        groups = _from_rollup(connection, since, until, by)
        read_from = "rollup"
        if groups is None:
            groups = _from_events(connection, since, until, by)
            read_from = "events"
    rows = [
        ReportRow(
            dict(zip(by, key, strict=True)),
            dict(zip(COUNT_COLUMNS, numbers[:7], strict=True)),
            numbers[7],
            numbers[8],
        )
        for key, numbers in groups.items()
        if numbers[0]
    ]
    rows.sort(key=lambda row: (-row.cost_pico, -row.counts["requests"], [str(v) for v in row.keys.values()]))
    return Report(since, until, tuple(by), rows, read_from)


def _merge(into: Groups, more: Groups) -> None:
    for key, numbers in more.items():
        add_counts(into, key, numbers)


def _from_rollup(
    connection: Connection, since: datetime | None, until: datetime | None, by: Sequence[str]
) -> Groups | None:
    """The report from whole rollup buckets plus the raw events of part-buckets at the edges; None when the rollup
    cannot answer it exactly."""
    first = since if since is None or is_bucket_edge(since) else bucket_of(since) + BUCKET
    last = until if until is None or is_bucket_edge(until) else bucket_of(until)
    if first is not None and last is not None and first >= last:
        return None  # inside one or two buckets: the raw events are all there is to read
    groups: Groups = {}
    for model, text, counts in totals_by_model_and_labels(connection, first, last):
        labels = json.loads(text)
        key: list[str | None] = []
        for name in by:
            if name == "model":
                value: str | None = model
            elif name in labels:
                value = labels[name]
            else:
                return None  # counted before this dimension was a metric label
            if value == OTHER:
                return None  # values past the label's cap are lumped together here; the events tell them apart
            key.append(value)
        numbers = [getattr(counts, name) for name in ROLLUP_FIELDS]
        _merge(groups, {tuple(key): numbers})
    if since is not None and first != since:
        _merge(groups, _from_events(connection, since, first, by))
    if until is not None and last != until:
        _merge(groups, _from_events(connection, last, until, by))
    return groups


def _from_events(connection: Connection, since: datetime | None, until: datetime | None, by: Sequence[str]) -> Groups:
    """The report from the raw events of [since, until)."""
    group = [events.c.model if key == "model" else events.c.attributes[key].as_string() for key in by]
    labelled = [column.label(f"k{i}") for i, column in enumerate(group)]
    query = select(
        *labelled,
        func.count().label("requests"),
        func.sum(events.c.input_tokens),
        func.sum(events.c.output_tokens),
        func.sum(events.c.cache_read_tokens),
        func.sum(events.c.cache_write_5m_tokens),
        func.sum(events.c.cache_write_1h_tokens),
        func.sum(events.c.web_search_requests),
        func.sum(events.c.cost_pico),
        func.sum(case((events.c.cost_pico.is_(None), 1), else_=0)),
    )
    if since is not None:
        query = query.where(events.c.ts >= since)
    if until is not None:
        query = query.where(events.c.ts < until)
    if group:
        query = query.group_by(*group)
    groups: Groups = {}
    for record in connection.execute(query):
        values = list(record)
        numbers = [int(value or 0) for value in values[len(by) :]]
        if numbers[0] == 0:
            continue  # an empty window without GROUP BY still returns one row
        _merge(groups, {tuple(values[: len(by)]): numbers})
    return groups


def _row_dict(report: Report, row: ReportRow) -> dict[str, Any]:
    return {
        **row.keys,
        **row.counts,
        "cost_usd": format_usd(row.cost_pico),
        "unpriced_requests": row.unpriced_requests,
    }


def to_json(report: Report) -> str:
    """`report --format json`: since, until, total_usd and rows; money as decimal strings."""
    document = {
        "since": iso_z(report.since),
        "until": iso_z(report.until),
        "total_usd": format_usd(report.total_pico),
        "rows": [_row_dict(report, row) for row in report.rows],
    }
    return json.dumps(document, indent=2)


def to_csv(report: Report) -> str:
    """One header line, one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.by, *COUNT_COLUMNS, "cost_usd", "unpriced_requests"])
    for row in report.rows:
        values = _row_dict(report, row)
        writer.writerow(
            ["" if values[k] is None else values[k] for k in (*report.by, *COUNT_COLUMNS)]
            + [values["cost_usd"], row.unpriced_requests]
        )
    return out.getvalue()


def _usd6(pico: int) -> str:
    return str(usd(pico).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN))


def to_table(report: Report, zone_name: str) -> str:
    """An aligned table for people, with a total line; cost rounded to the micro-dollar."""
    headers = [
        *report.by,
        "requests",
        "input",
        "output",
        "cache read",
        "write 5m",
        "write 1h",
        "searches",
        "cost USD",
    ]
    body: list[list[str]] = []
    for row in report.rows:
        cost = _usd6(row.cost_pico)
        if row.unpriced_requests:
            cost += f" (+{row.unpriced_requests:,} unpriced)"
        body.append(
            [("-" if v is None else v) for v in row.keys.values()]
            + [f"{row.counts[c]:,}" for c in COUNT_COLUMNS]
            + [cost]
        )
    totals = [sum(row.counts[c] for row in report.rows) for c in COUNT_COLUMNS]
    unpriced = sum(row.unpriced_requests for row in report.rows)
    total_cost = _usd6(report.total_pico) + (f" (+{unpriced:,} unpriced)" if unpriced else "")
    footer = ["TOTAL"] + [""] * (len(report.by) - 1) if report.by else []
    footer = footer + [f"{t:,}" for t in totals] + [total_cost]
    if not report.by:
        body = []  # the total line is the whole report
    widths = [max(len(line[i]) for line in [headers, *body, footer]) for i in range(len(headers))]
    numeric_from = len(report.by)

    def render(line: list[str]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i < numeric_from else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ).rstrip()

    since = iso_z(report.since) or "the beginning"
    until = iso_z(report.until) or "now"
    out = [f"Spend from {since} to {until} (calendar windows in {zone_name})", render(headers)]
    out += [render(line) for line in body]
    out.append(render(footer))
    return "\n".join(out) + "\n"
