"""Anthropic's figures against ours, per UTC day, model and service tier (and mapped attributes, when Anthropic's
API key ids are mapped to ours): drift, missing requests, findings.

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
from monitor.reconcile.fetcher import ALL_KEYS, NO_KEY, FigureKey, Figures
from monitor.store.rollup import RollupCounts
from monitor.wire import BILLED_COUNTS

CENTS_PER_USD = Decimal(100)

# Which of a day's traffic one row compares: (kind, attributes). Kinds sort whole day, mapped, then the rest.
Group = tuple[int, tuple[tuple[str, str], ...]]
WHOLE: Group = (0, ())  # the day was not compared by API key
UNMAPPED: Group = (2, ())  # keys reconcile.api_keys does not map, and our traffic outside every mapped group
OurKey = tuple[date, str, str, str]  # (UTC day, model, service tier, the rollup's labels JSON)


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
    attributes: Mapping[str, str] | None = None  # the mapped attributes; None: the whole day, not compared by key
    unmapped: bool = False  # the keys nobody mapped, against our traffic outside every mapped group
    unmapped_api_key_ids: tuple[str, ...] = ()  # Anthropic's key ids in an unmapped row ('' for no key)

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
        return {kind: self.anthropic_tokens[kind] - self.our_tokens[kind] for kind in BILLED_COUNTS}


def _mapped(attributes: Mapping[str, str]) -> Group:
    return (1, tuple(sorted(attributes.items())))


def compare(
    anthropic: Mapping[FigureKey, Figures],
    ours: Mapping[OurKey, RollupCounts],
    days: Iterable[date],
    now: datetime,
    settle_hours: int,
    tolerance: Decimal,
    api_keys: Mapping[str, Mapping[str, str]] | None = None,
) -> list[DayRow]:
    """One row per (day, model, tier, group) either side has on the given days (the days Anthropic's figures cover).

    With `api_keys`, a day whose figures were fetched by key is compared per mapped attributes: a mapped key's
    figures against our traffic with those label values, every other key's against the rest of ours. A day fetched
    whole, or any day without `api_keys`, is compared whole.
    """
    wanted = set(days)
    api_keys = api_keys or {}
    whole_days = {key[0] for key in anthropic if key[3] == ALL_KEYS}
    mapped = {_mapped(attributes) for attributes in api_keys.values()}
    dimensions = sorted(next(iter(api_keys.values()), {}))

    theirs: dict[tuple[date, str, str, Group], Figures] = {}
    key_ids: dict[tuple[date, str, str, Group], set[str]] = {}
    for (day, model, tier, key_id), figures in anthropic.items():
        if day not in wanted:
            continue
        group = WHOLE
        if api_keys and day not in whole_days:
            group = _mapped(api_keys[key_id]) if key_id in api_keys else UNMAPPED
        theirs.setdefault((day, model, tier, group), Figures()).add(figures)
        if group == UNMAPPED:
            key_ids.setdefault((day, model, tier, group), set()).add(key_id)

    mine: dict[tuple[date, str, str, Group], RollupCounts] = {}
    for (day, model, tier, labels), counts in ours.items():
        if day not in wanted:
            continue
        group = WHOLE
        if api_keys and day not in whole_days:
            values = json.loads(labels) if labels else {}
            found = [values.get(name) for name in dimensions]  # None: no such label on these events
            candidate: Group = (1, tuple((name, str(value)) for name, value in zip(dimensions, found, strict=True)))
            group = candidate if None not in found and candidate in mapped else UNMAPPED
        mine.setdefault((day, model, tier, group), RollupCounts()).add(counts)

    rows = []
    for key in sorted({*theirs, *mine}):
        figures = theirs.get(key, Figures())
        counts = mine.get(key, RollupCounts())
        day, model, tier, (kind, attributes) = key
        rows.append(
            DayRow(
                day=day,
                model=model,
                service_tier=tier,
                anthropic_usd=figures.list_amount_cents / CENTS_PER_USD,
                anthropic_discounted_usd=figures.amount_cents / CENTS_PER_USD,
                ours_usd=usd(counts.cost_pico),
                anthropic_requests=figures.requests,
                our_requests=counts.requests,
                anthropic_tokens={kind: getattr(figures, kind) for kind in BILLED_COUNTS},
                our_tokens={kind: getattr(counts, kind) for kind in BILLED_COUNTS},
                unpriced_requests=counts.unpriced_requests,
                settled=is_settled(day, now, settle_hours),
                tolerance=tolerance,
                attributes=None if (kind, attributes) == WHOLE else dict(attributes),
                unmapped=(kind, attributes) == UNMAPPED,
                unmapped_api_key_ids=tuple(sorted(key_ids.get(key, ()))),
            )
        )
    return rows


def shown_key_id(key_id: str) -> str:
    """An API key id as shown: usage no key authenticated reads '(no API key)'."""
    return "(no API key)" if key_id == NO_KEY else key_id


def attributes_text(row: DayRow) -> str:
    """The row's group as the table shows it: 'project=lingo', 'unmapped (apikey_01…)', or '' for a whole day."""
    if row.unmapped:
        ids = ", ".join(shown_key_id(key_id) for key_id in row.unmapped_api_key_ids)
        return f"unmapped ({ids})" if ids else "unmapped"
    return ", ".join(f"{name}={value}" for name, value in (row.attributes or {}).items())


def row_json(row: DayRow) -> dict[str, Any]:
    """One row of `reconcile --format json`."""
    ratio = row.drift_ratio
    return {
        "date": row.day.isoformat(),
        "model": row.model,
        "service_tier": row.service_tier,
        "attributes": None if row.attributes is None else dict(row.attributes),
        "unmapped": row.unmapped,
        "unmapped_api_key_ids": [shown_key_id(key_id) for key_id in row.unmapped_api_key_ids],
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
    grouped = any(row.attributes is not None for row in rows)
    headers = ["date", "model", "tier", *(["attributes"] if grouped else [])]
    headers += ["Anthropic USD", "ours USD", "drift USD", "drift", "requests", "missing", ""]
    body = []
    for row in rows:
        ratio = row.drift_ratio
        body.append(
            [
                row.day.isoformat(),
                row.model,
                row.service_tier,
                *([attributes_text(row)] if grouped else []),
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
