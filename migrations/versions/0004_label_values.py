"""Metric label values admitted per label, capped: the first values seen keep their series, the rest are __other__.

Counters written before this revision may already carry many values. So that no existing series moves when the cap
starts to apply, the values they carry are admitted here, the busiest first, up to the default caps (200 per
dimension label, 50 unpriced model ids); counters of values left out are rendered as `__other__` from now on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_MAX_VALUES_PER_LABEL = 200
DEFAULT_MAX_UNPRICED_MODELS = 50
OTHER = "__other__"


def upgrade() -> None:
    """Create label_values and admit the values existing counters carry."""
    table = op.create_table(
        "label_values",
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column(
            "slot",
            sa.Integer(),
            nullable=False,
            comment="admission order from 0; always below the label's cap",
        ),
        sa.Column("admitted_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("label", "value", name=op.f("pk_label_values")),
        sa.UniqueConstraint("label", "slot", name=op.f("uq_label_values_label")),
    )
    counters = sa.table(
        "counters", sa.column("name", sa.String), sa.column("labels", sa.String), sa.column("value", sa.BigInteger)
    )
    seen: dict[str, Counter[str]] = {}
    rows = op.get_bind().execute(
        sa.select(counters.c.name, counters.c.labels, counters.c.value).where(
            counters.c.name.in_(["requests", "unpriced_events"])
        )
    )
    for name, labels, value in rows:
        for key, text in json.loads(labels).items():
            if name == "unpriced_events" and key == "model":
                seen.setdefault("model", Counter())[text] += int(value)
            elif name == "requests" and key != "model":
                seen.setdefault(key, Counter())[text] += int(value)
    now = datetime.now(UTC).replace(tzinfo=None)
    admitted = []
    for label, counts in sorted(seen.items()):
        cap = DEFAULT_MAX_UNPRICED_MODELS if label == "model" else DEFAULT_MAX_VALUES_PER_LABEL
        ranked = sorted((v for v in counts if v not in ("", OTHER)), key=lambda v: (-counts[v], v))
        admitted += [
            {"label": label, "value": value, "slot": slot, "admitted_at": now}
            for slot, value in enumerate(ranked[:cap])
        ]
    if admitted:
        op.bulk_insert(table, admitted)


def downgrade() -> None:
    """Drop what this revision created."""
    op.drop_table("label_values")
