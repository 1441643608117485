"""Spend reports over the store: totals by any dimension and model, in table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import Engine, case, func, select

from monitor.pricing import format_usd, usd
from monitor.store.models import events

COUNT_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
)


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

    @property
    def total_pico(self) -> int:
        """Total cost of the priced events."""
        return sum(row.cost_pico for row in self.rows)


def build_report(engine: Engine, *, since: datetime | None, until: datetime | None, by: Sequence[str]) -> Report:
    """Sum requests, tokens and cost over the window, grouped by `by` (dimensions and/or 'model')."""
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
    rows: list[ReportRow] = []
    with engine.connect() as connection:
        for record in connection.execute(query):
            values = list(record)
            keys = dict(zip(by, values[: len(by)], strict=True))
            numbers = values[len(by) :]
            if numbers[0] == 0:
                continue  # an empty window without GROUP BY still returns one row
            counts = {name: int(value or 0) for name, value in zip(COUNT_COLUMNS, numbers[:7], strict=True)}
            rows.append(ReportRow(keys, counts, int(numbers[7] or 0), int(numbers[8] or 0)))
    rows.sort(key=lambda row: (-row.cost_pico, -row.counts["requests"], [str(v) for v in row.keys.values()]))
    return Report(since, until, tuple(by), rows)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _row_dict(report: Report, row: ReportRow) -> dict[str, Any]:
    return {
        **row.keys,
        **row.counts,
        "cost_usd": format_usd(row.cost_pico),
        "unpriced_requests": row.unpriced_requests,
    }


def to_json(report: Report) -> str:
    """SPEC §5 JSON: since, until, total_usd and rows; money as decimal strings."""
    document = {
        "since": _iso(report.since),
        "until": _iso(report.until),
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

    since = _iso(report.since) or "the beginning"
    until = _iso(report.until) or "now"
    out = [f"Spend from {since} to {until} (calendar windows in {zone_name})", render(headers)]
    out += [render(line) for line in body]
    out.append(render(footer))
    return "\n".join(out) + "\n"
