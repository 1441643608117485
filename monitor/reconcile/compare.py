"""Anthropic's figures against ours, per UTC day, model and service tier: drift, missing requests, findings.

Pure: the caller reads both sides (ours from the event-time rollup, failed calls left out) and gives `now`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from monitor.pricing import usd
from monitor.reconcile.fetcher import FigureKey, Figures
from monitor.store.rollup import RollupCounts

CENTS_PER_USD = Decimal(100)
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "web_search_requests")


def money(amount: Decimal) -> str:
    """Exact USD as a plain decimal string with no trailing zeros ('0', '12.5', '-0.000123')."""
    if amount == 0:
        return "0"
    return f"{amount.normalize():f}"


def is_settled(day: date, now: datetime, settle_hours: int) -> bool:
    """A day is settled once its end (UTC midnight after it) is more than `settle_hours` old."""
    end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    return now - end > timedelta(hours=settle_hours)


def last_settled_day(now: datetime, settle_hours: int) -> date:
    """The latest settled UTC day at `now`."""
    day = (now - timedelta(hours=settle_hours)).astimezone(UTC).date() - timedelta(days=1)
    return day if is_settled(day, now, settle_hours) else day - timedelta(days=1)


@dataclass(frozen=True)
class DayRow:
    """One UTC day, model and service tier, both sides."""

    day: date
    model: str
    service_tier: str
    anthropic_usd: Decimal  # list price, pre-discount
    anthropic_discounted_usd: Decimal  # what is invoiced before credits: shown, not compared
    ours_usd: Decimal
    anthropic_requests: int | None
    our_requests: int
    anthropic_tokens: Mapping[str, int]
    our_tokens: Mapping[str, int]
    unpriced_requests: int
    settled: bool
    tolerance: Decimal

    @property
    def drift_usd(self) -> Decimal:
        """Anthropic's list-price figure minus ours: positive when Anthropic bills more than we counted."""
        return self.anthropic_usd - self.ours_usd

    @property
    def drift_ratio(self) -> Decimal | None:
        """Drift as a fraction of Anthropic's figure; None when Anthropic's figure is 0."""
        return None if self.anthropic_usd == 0 else self.drift_usd / self.anthropic_usd

    @property
    def missing_requests(self) -> int | None:
        """Requests Anthropic counted and we never logged; None when Anthropic did not count requests."""
        return None if self.anthropic_requests is None else max(self.anthropic_requests - self.our_requests, 0)

    @property
    def finding(self) -> bool:
        """Settled, and the cost drifts beyond tolerance of Anthropic's figure or requests are missing."""
        if not self.settled:
            return False
        beyond = abs(self.drift_usd) > self.tolerance * self.anthropic_usd
        return beyond or (self.missing_requests or 0) > 0

    def token_drift(self) -> dict[str, int]:
        """Anthropic's count minus ours, by token type (and web searches): which price component is off."""
        return {kind: self.anthropic_tokens[kind] - self.our_tokens[kind] for kind in TOKEN_TYPES}


def compare(
    anthropic: Mapping[FigureKey, Figures],
    ours: Mapping[FigureKey, RollupCounts],
    days: Iterable[date],
    now: datetime,
    settle_hours: int,
    tolerance: Decimal,
) -> list[DayRow]:
    """One row per (day, model, tier) either side has on the given days (the days Anthropic's figures cover)."""
    wanted = set(days)
    keys = sorted({key for key in (*anthropic, *ours) if key[0] in wanted})
    rows = []
    for key in keys:
        theirs = anthropic.get(key, Figures())
        mine = ours.get(key, RollupCounts())
        day, model, tier = key
        rows.append(
            DayRow(
                day=day,
                model=model,
                service_tier=tier,
                anthropic_usd=theirs.list_amount_cents / CENTS_PER_USD,
                anthropic_discounted_usd=theirs.amount_cents / CENTS_PER_USD,
                ours_usd=usd(mine.cost_pico),
                anthropic_requests=theirs.requests,
                our_requests=mine.requests,
                anthropic_tokens={kind: getattr(theirs, kind) for kind in TOKEN_TYPES},
                our_tokens={kind: getattr(mine, kind) for kind in TOKEN_TYPES},
                unpriced_requests=mine.unpriced_requests,
                settled=is_settled(day, now, settle_hours),
                tolerance=tolerance,
            )
        )
    return rows


def row_json(row: DayRow) -> dict[str, Any]:
    """One row of `reconcile --format json`."""
    ratio = row.drift_ratio
    return {
        "date": row.day.isoformat(),
        "model": row.model,
        "service_tier": row.service_tier,
        "anthropic_usd": money(row.anthropic_usd),
        "anthropic_discounted_usd": money(row.anthropic_discounted_usd),
        "ours_usd": money(row.ours_usd),
        "drift_usd": money(row.drift_usd),
        "drift_ratio": None if ratio is None else float(ratio),
        "anthropic_requests": row.anthropic_requests,
        "our_requests": row.our_requests,
        "missing_requests": row.missing_requests,
        "unpriced_requests": row.unpriced_requests,
        "token_drift": row.token_drift(),
        "settled": row.settled,
        "finding": row.finding,
    }


def to_json(rows: list[DayRow]) -> str:
    """The JSON document: every row and the number of findings."""
    return json.dumps({"days": [row_json(r) for r in rows], "findings": sum(r.finding for r in rows)}, indent=2)


def to_table(rows: list[DayRow]) -> str:
    """A text table, findings marked, with a closing line that counts them."""
    headers = ["date", "model", "tier", "Anthropic USD", "ours USD", "drift USD", "drift", "requests", "missing", ""]
    body = []
    for row in rows:
        ratio = row.drift_ratio
        body.append(
            [
                row.day.isoformat(),
                row.model,
                row.service_tier,
                money(row.anthropic_usd),
                money(row.ours_usd),
                money(row.drift_usd),
                "n/a" if ratio is None else f"{ratio * 100:.3f}%",
                f"{'-' if row.anthropic_requests is None else row.anthropic_requests}/{row.our_requests}",
                "-" if row.missing_requests is None else str(row.missing_requests),
                "FINDING" if row.finding else ("" if row.settled else "unsettled"),
            ]
        )
    if not body:
        return "no figures from Anthropic for these days yet\n"
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *body]
    ]
    findings = sum(r.finding for r in rows)
    lines.append(f"{findings} finding(s); requests are Anthropic's/ours; unsettled days are shown, never alerted on")
    return "\n".join(lines) + "\n"
