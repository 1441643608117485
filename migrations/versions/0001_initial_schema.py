"""Initial schema: priced usage events and the dead-letter table.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create events and dead_letters."""
    op.create_table(
        "events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=False, comment="the request's own timestamp (UTC)"),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False, comment="the model id as the event carried it"),
        sa.Column("model", sa.String(255), nullable=False, comment="price-table name; the id as sent when unknown"),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_5m_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False),
        sa.Column("web_search_requests", sa.Integer(), nullable=False),
        sa.Column("web_fetch_requests", sa.Integer(), nullable=False),
        sa.Column("batch", sa.Boolean(), nullable=False),
        sa.Column("long_prompt", sa.Boolean(), nullable=False),
        sa.Column("service_tier", sa.String(32), nullable=True),
        sa.Column("speed", sa.String(32), nullable=True),
        sa.Column("inference_geo", sa.String(32), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column(
            "cost_pico",
            sa.BigInteger(),
            nullable=True,
            comment="cost in 10^-12 USD; NULL = unpriced (unknown model)",
        ),
        sa.Column(
            "price_version",
            sa.String(128),
            nullable=True,
            comment="the rates used: table version, model and since date",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("request_id", name=op.f("uq_events_request_id")),
    )
    op.create_index("ix_events_ts", "events", ["ts"])
    op.create_index("ix_events_model_ts", "events", ["model", "ts"])
    op.create_table(
        "dead_letters",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("location", sa.String(1024), nullable=False, comment="file:line, or the HTTP body index"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "raw",
            sa.Text(),
            nullable=False,
            comment="the rejected text, Anthropic keys replaced by fingerprints",
        ),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column(
            "fingerprint",
            sa.String(64),
            nullable=False,
            comment="sha256 of source, location and raw: the same bad line read twice is kept once",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_dead_letters_fingerprint")),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])


def downgrade() -> None:
    """Drop everything this revision created."""
    op.drop_table("dead_letters")
    op.drop_table("events")
