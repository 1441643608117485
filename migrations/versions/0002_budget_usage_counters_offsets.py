"""Budget usage by scope and window bucket, metric counters, and tailer offsets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create budget_usage, budget_definitions, counters and source_offsets."""
    op.create_table(
        "budget_usage",
        sa.Column("budget", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
        sa.Column("bucket_start", sa.DateTime(), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False)
            for name in ("requests", "input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "cost_pico")
        ),
        sa.PrimaryKeyConstraint("budget", "scope", "bucket_start", name=op.f("pk_budget_usage")),
    )
    op.create_index("ix_budget_usage_budget_bucket_start", "budget_usage", ["budget", "bucket_start"])
    op.create_table(
        "budget_definitions",
        sa.Column("budget", sa.String(128), nullable=False),
        sa.Column("definition", sa.String(64), nullable=False),
        sa.Column("counted_since", sa.DateTime(), nullable=False, comment="events from here on are in budget_usage"),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("budget", name=op.f("pk_budget_definitions")),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("labels", sa.String(1024), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", "labels", name=op.f("pk_counters")),
    )
    op.create_table(
        "source_offsets",
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("file_id", sa.String(128), nullable=False, comment="device:inode:hash of the first bytes"),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False, comment="byte after the last complete line read"),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("source", "file_id", name=op.f("pk_source_offsets")),
    )


def downgrade() -> None:
    """Drop what this revision created."""
    op.drop_table("source_offsets")
    op.drop_table("counters")
    op.drop_table("budget_definitions")
    op.drop_index("ix_budget_usage_budget_bucket_start", table_name="budget_usage")
    op.drop_table("budget_usage")
