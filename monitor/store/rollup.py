"""The event-time rollup (`usage_rollup`): its keys, the deltas a batch adds, and the sums its readers take.

Buckets are 15 minutes of UTC: every timezone in use is offset from UTC by a whole quarter hour, so a calendar day
or month in any of them is a run of whole buckets.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, case, func, select

from monitor.store.models import usage_rollup
from monitor.wire import BILLED_COUNTS

K = TypeVar("K", bound=Hashable)
BUCKET = timedelta(minutes=15)
ROLLUP_FIELDS = ("requests", *BILLED_COUNTS, "cost_pico", "unpriced_requests")
# Lateness (ingest time minus event time) of the events counted in claude_monitor_late_events_total: an event is
# late from 5 minutes on; each class is [lower, upper).
LATENESS = (
    (timedelta(minutes=5), "5m-1h"),
    (timedelta(hours=1), "1h-1d"),
    (timedelta(days=1), ">1d"),
)


def bucket_of(moment: datetime) -> datetime:
    """The UTC start of the 15-minute bucket holding `moment` (UTC-aware)."""
    moment = moment.astimezone(UTC)
    return moment.replace(minute=moment.minute - moment.minute % 15, second=0, microsecond=0)


def is_bucket_edge(moment: datetime) -> bool:
    """True when `moment` is the start of a bucket."""
    return bucket_of(moment) == moment


def service_tier(batch: bool, tier: str | None) -> str:
    """standard, priority or batch: a batch request (batch=true or tier batch) is batch, any unknown tier standard."""
    if batch or tier == "batch":
        return "batch"
    return "priority" if tier == "priority" else "standard"


def status_class(status: int | None) -> str:
    """ok for a call with no status or one below 400, error for 400 and up."""
    return "error" if status is not None and status >= 400 else "ok"


@dataclass(frozen=True, order=True, slots=True)
class RollupKey:
    """One row's key."""

    bucket_start: datetime
    model: str
    service_tier: str
    status_class: str
    labels: str


@dataclass(slots=True)
class RollupCounts:
    """One row's counts (pico-dollars for cost)."""

    requests: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_search_requests: int = 0
    cost_pico: int = 0
    unpriced_requests: int = 0

    def add(self, other: RollupCounts) -> None:
        """Add another row's counts to this one."""
        for name in ROLLUP_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        """The counts by column name."""
        return {name: getattr(self, name) for name in ROLLUP_FIELDS}


def add_counts(into: dict[K, list[int]], key: K, counts: Sequence[int]) -> None:
    """Add `counts` to the row of `key`, element by element (a new key gets a copy)."""
    row = into.get(key)
    if row is None:
        into[key] = list(counts)
    else:
        for index, value in enumerate(counts):
            row[index] += value


def rollup_rows(deltas: Mapping[RollupKey, RollupCounts]) -> list[dict[str, Any]]:
    """Upsert parameters in key order: concurrent PostgreSQL writers then lock shared rows in one order."""
    return [
        {
            "bucket_start": key.bucket_start,
            "model": key.model,
            "service_tier": key.service_tier,
            "status_class": key.status_class,
            "labels": key.labels,
            **counts.as_dict(),
        }
        for key, counts in sorted(deltas.items())
    ]


_SUMS = [func.sum(usage_rollup.c[name]) for name in ROLLUP_FIELDS]


def _counts(values: Any) -> RollupCounts:
    return RollupCounts(*(int(value or 0) for value in values))


def totals_by_model_and_labels(
    connection: Connection, since: datetime | None, until: datetime | None
) -> Iterator[tuple[str, str, RollupCounts]]:
    """(model, labels JSON, counts) over the buckets starting in [since, until); None leaves that side open."""
    query = select(usage_rollup.c.model, usage_rollup.c.labels, *_SUMS).group_by(
        usage_rollup.c.model, usage_rollup.c.labels
    )
    if since is not None:
        query = query.where(usage_rollup.c.bucket_start >= since)
    if until is not None:
        query = query.where(usage_rollup.c.bucket_start < until)
    for model, labels, *values in connection.execute(query):
        yield model, labels, _counts(values)


def window_totals(
    connection: Connection, outer: tuple[datetime, datetime], inner: tuple[datetime, datetime]
) -> Iterator[tuple[bool, str, str, RollupCounts]]:
    """(in inner, model, labels JSON, counts) over the outer window, the inner window (within it) apart: one read
    serves a month and the day in it."""
    start, end = inner
    in_inner = case(((usage_rollup.c.bucket_start >= start) & (usage_rollup.c.bucket_start < end), 1), else_=0)
    query = (
        select(in_inner, usage_rollup.c.model, usage_rollup.c.labels, *_SUMS)
        .where(usage_rollup.c.bucket_start >= outer[0], usage_rollup.c.bucket_start < outer[1])
        .group_by(in_inner, usage_rollup.c.model, usage_rollup.c.labels)
    )
    for flag, model, labels, *values in connection.execute(query):
        yield bool(flag), model, labels, _counts(values)


def utc_days(
    connection: Connection, since: date, until: date, status: str | None = "ok"
) -> dict[tuple[date, str, str], RollupCounts]:
    """(UTC day, model, service tier) -> counts for the days in [since, until), of one status class (failed calls
    left out by default; None for both): what Anthropic's daily usage and cost reports compare with."""
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    end = datetime(until.year, until.month, until.day, tzinfo=UTC)
    query = (
        select(usage_rollup.c.bucket_start, usage_rollup.c.model, usage_rollup.c.service_tier, *_SUMS)
        .where(usage_rollup.c.bucket_start >= start, usage_rollup.c.bucket_start < end)
        .group_by(usage_rollup.c.bucket_start, usage_rollup.c.model, usage_rollup.c.service_tier)
    )
    if status is not None:
        query = query.where(usage_rollup.c.status_class == status)
    out: dict[tuple[date, str, str], RollupCounts] = {}
    for bucket, model, tier, *values in connection.execute(query):
        out.setdefault((bucket.date(), model, tier), RollupCounts()).add(_counts(values))
    return out


def utc_days_by_labels(
    connection: Connection, since: date, until: date, status: str | None = "ok"
) -> dict[tuple[date, str, str, str], RollupCounts]:
    """(UTC day, model, service tier, labels JSON) -> counts for the days in [since, until), of one status class:
    `utc_days` kept apart by metric label values, for comparing Anthropic's figures per mapped API key."""
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    end = datetime(until.year, until.month, until.day, tzinfo=UTC)
    columns = (usage_rollup.c.bucket_start, usage_rollup.c.model, usage_rollup.c.service_tier, usage_rollup.c.labels)
    query = (
        select(*columns, *_SUMS)
        .where(usage_rollup.c.bucket_start >= start, usage_rollup.c.bucket_start < end)
        .group_by(*columns)
    )
    if status is not None:
        query = query.where(usage_rollup.c.status_class == status)
    out: dict[tuple[date, str, str, str], RollupCounts] = {}
    for bucket, model, tier, labels, *values in connection.execute(query):
        out.setdefault((bucket.date(), model, tier, labels), RollupCounts()).add(_counts(values))
    return out
