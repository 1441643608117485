"""Reconciliation with Anthropic's bill: Anthropic's daily figures per model and service tier, and the fetches.

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create reconcile_figures and reconcile_fetches."""
    op.create_table(
        "reconcile_figures",
        sa.Column("day", sa.Date(), nullable=False, comment="UTC day"),
        sa.Column("model", sa.String(255), nullable=False, comment="price-table name; Anthropic's name when unknown"),
        sa.Column("service_tier", sa.String(16), nullable=False, comment="standard | priority | batch"),
        sa.Column(
            "list_amount_cents", sa.String(64), nullable=False, comment="list price (pre-discount), decimal cents"
        ),
        sa.Column("amount_cents", sa.String(64), nullable=False, comment="after discounts, decimal cents"),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=True, comment="NULL when Anthropic did not count them"),
        sa.Column("input", sa.BigInteger(), nullable=False, comment="uncached input tokens"),
        sa.Column("output", sa.BigInteger(), nullable=False),
        sa.Column("cache_read", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_5m", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_1h", sa.BigInteger(), nullable=False),
        sa.Column("web_search_requests", sa.BigInteger(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model", "service_tier", name=op.f("pk_reconcile_figures")),
    )
    op.create_table(
        "reconcile_fetches",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("fetched_at", sa.DateTime(), nullable=False),
        sa.Column("first_day", sa.Date(), nullable=False, comment="first UTC day replaced"),
        sa.Column("end_day", sa.Date(), nullable=False, comment="the day after the last one replaced"),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column(
            "data_refreshed_at",
            sa.DateTime(),
            nullable=True,
            comment="when Anthropic last refreshed the report, as it said",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_fetches")),
    )
    op.create_index("ix_reconcile_fetches_fetched_at", "reconcile_fetches", ["fetched_at"])


def downgrade() -> None:
    """Drop what this revision created."""
    op.drop_index("ix_reconcile_fetches_fetched_at", table_name="reconcile_fetches")
    op.drop_table("reconcile_fetches")
    op.drop_table("reconcile_figures")
