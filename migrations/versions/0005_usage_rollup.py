"""The event-time rollup: usage per 15-minute UTC bucket, model, service tier, status class and metric labels.

Filled here from the events already stored, exactly (integer sums in one pass over the table). The metric label
values are those of the labels `label_values` holds (the metric labels configured so far): an admitted value as it
is, any other value `__other__`, an absent attribute null. The model is the events' own `model` (a price-table
name, or the id as sent for an unknown model). Also counts the stored events that were ingested late (5 minutes or
more after their timestamp) into claude_monitor_late_events_total, as the write path does from now on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OTHER = "__other__"
FREE_VALUES = ("", OTHER)
UNPRICED_LABEL = "model"  # label_values' label of unpriced model ids, not a dimension
FIELDS = (
    "requests",
    "input",
    "output",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "web_search_requests",
    "cost_pico",
    "unpriced_requests",
)
LATENESS = ((timedelta(minutes=5), "5m-1h"), (timedelta(hours=1), "1h-1d"), (timedelta(days=1), ">1d"))
CHUNK = 5000


def _bucket(ts: datetime) -> datetime:
    return ts.replace(minute=ts.minute - ts.minute % 15, second=0, microsecond=0)


def _tier(batch: bool, tier: str | None) -> str:
    if batch or tier == "batch":
        return "batch"
    return "priority" if tier == "priority" else "standard"


def _late(received: datetime, ts: datetime) -> str | None:
    found = None
    for lower, name in LATENESS:
        if received - ts >= lower:
            found = name
    return found


def upgrade() -> None:
    """Create usage_rollup and fill it (and the late-events counter) from the stored events."""
    rollup = op.create_table(
        "usage_rollup",
        sa.Column("bucket_start", sa.DateTime(), nullable=False, comment="UTC start of the 15-minute bucket"),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("service_tier", sa.String(16), nullable=False, comment="standard | priority | batch"),
        sa.Column("status_class", sa.String(8), nullable=False, comment="ok (no status or < 400) | error (>= 400)"),
        sa.Column("labels", sa.String(1024), nullable=False, comment="canonical JSON of the metric label values"),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("input", sa.BigInteger(), nullable=False),
        sa.Column("output", sa.BigInteger(), nullable=False),
        sa.Column("cache_read", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_5m", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_1h", sa.BigInteger(), nullable=False),
        sa.Column("web_search_requests", sa.BigInteger(), nullable=False),
        sa.Column("cost_pico", sa.BigInteger(), nullable=False, comment="10^-12 USD of the priced requests"),
        sa.Column("unpriced_requests", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "bucket_start", "model", "service_tier", "status_class", "labels", name=op.f("pk_usage_rollup")
        ),
    )
    bind = op.get_bind()
    label_values = sa.table("label_values", sa.column("label", sa.String), sa.column("value", sa.String))
    admitted: dict[str, set[str]] = defaultdict(set)
    for label, value in bind.execute(sa.select(label_values.c.label, label_values.c.value)):
        if label != UNPRICED_LABEL:
            admitted[label].add(value)
    names = sorted(admitted)
    events = sa.table(
        "events",
        sa.column("ts", sa.DateTime),
        sa.column("received_at", sa.DateTime),
        sa.column("model", sa.String),
        sa.column("input_tokens", sa.BigInteger),
        sa.column("output_tokens", sa.BigInteger),
        sa.column("cache_read_tokens", sa.BigInteger),
        sa.column("cache_write_5m_tokens", sa.BigInteger),
        sa.column("cache_write_1h_tokens", sa.BigInteger),
        sa.column("web_search_requests", sa.Integer),
        sa.column("batch", sa.Boolean),
        sa.column("service_tier", sa.String),
        sa.column("status", sa.Integer),
        sa.column("attributes", sa.JSON),
        sa.column("cost_pico", sa.BigInteger),
    )
    query = sa.select(
        events.c.ts,
        events.c.received_at,
        events.c.model,
        events.c.batch,
        events.c.service_tier,
        events.c.status,
        events.c.attributes,
        events.c.cost_pico,
        events.c.input_tokens,
        events.c.output_tokens,
        events.c.cache_read_tokens,
        events.c.cache_write_5m_tokens,
        events.c.cache_write_1h_tokens,
        events.c.web_search_requests,
    )
    sums: dict[tuple[datetime, str, str, str, str], list[int]] = {}
    late: dict[str, int] = defaultdict(int)
    label_keys: dict[str, str] = {}  # attributes JSON -> labels JSON: few distinct label sets, many events
    for ts, received, model, batch, tier, status, attributes, cost, *counts in bind.execute(
        query.execution_options(yield_per=CHUNK)
    ):
        attributes = attributes or {}
        text = json.dumps(attributes, sort_keys=True)
        labels = label_keys.get(text)
        if labels is None:
            values: dict[str, str | None] = {}
            for name in names:
                value = attributes.get(name)
                if value is not None and value not in FREE_VALUES and value not in admitted[name]:
                    value = OTHER
                values[name] = value
            labels = label_keys[text] = json.dumps(values, separators=(",", ":"), ensure_ascii=False)
            if len(label_keys) > 100_000:
                label_keys.clear()
        key = (
            _bucket(ts),
            model,
            _tier(bool(batch), tier),
            "error" if status is not None and status >= 400 else "ok",
            labels,
        )
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0] * len(FIELDS)
        row[0] += 1
        for i, count in enumerate(counts, start=1):
            row[i] += int(count or 0)
        if cost is None:
            row[8] += 1
        else:
            row[7] += int(cost)
        lateness = _late(received, ts)
        if lateness is not None:
            late[lateness] += 1
    rows = [
        {
            "bucket_start": bucket,
            "model": model,
            "service_tier": tier,
            "status_class": status_class,
            "labels": labels,
            **dict(zip(FIELDS, values, strict=True)),
        }
        for (bucket, model, tier, status_class, labels), values in sorted(sums.items())
    ]
    for start in range(0, len(rows), CHUNK):
        op.bulk_insert(rollup, rows[start : start + CHUNK])
    counters = sa.table(
        "counters", sa.column("name", sa.String), sa.column("labels", sa.String), sa.column("value", sa.BigInteger)
    )
    if late:
        bind.execute(sa.delete(counters).where(counters.c.name == "late_events"))
        bind.execute(
            counters.insert(),
            [
                {"name": "late_events", "labels": json.dumps({"lateness": name}, separators=(",", ":")), "value": n}
                for name, n in sorted(late.items())
            ],
        )


def downgrade() -> None:
    """Drop what this revision created."""
    counters = sa.table("counters", sa.column("name", sa.String))
    op.get_bind().execute(sa.delete(counters).where(counters.c.name == "late_events"))
    op.drop_table("usage_rollup")
