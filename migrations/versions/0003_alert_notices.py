"""The notifier's state: notices sent once per budget scope, window, kind and threshold, and their deliveries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create alert_notices and alert_deliveries."""
    op.create_table(
        "alert_notices",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("budget", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
        sa.Column(
            "window_start", sa.DateTime(), nullable=False, comment="for a rolling window: when the episode began"
        ),
        sa.Column("kind", sa.String(16), nullable=False, comment="threshold | forecast | throttle"),
        sa.Column(
            "threshold",
            sa.String(32),
            nullable=False,
            comment="fraction of the limit as decimal text; 1 for forecast",
        ),
        sa.Column("window_end", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="firing | resolved"),
        sa.Column("measure", sa.String(16), nullable=False, comment="usd, requests or a token type"),
        sa.Column(
            "limit_amount",
            sa.BigInteger(),
            nullable=False,
            comment="the limit in the measure's unit (pico-USD for usd)",
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False, comment="spent in the measure's unit"),
        sa.Column("spend_pico", sa.BigInteger(), nullable=False),
        sa.Column("forecast_amount", sa.BigInteger(), nullable=False),
        sa.Column("forecast_pico", sa.BigInteger(), nullable=False),
        sa.Column("fired_at", sa.DateTime(), nullable=False),
        sa.Column(
            "first_sent_at",
            sa.DateTime(),
            nullable=True,
            comment="first delivery of the firing notice to any webhook",
        ),
        sa.Column("resolved_at", sa.DateTime(), nullable=True),
        sa.Column(
            "resolved_sent_at",
            sa.DateTime(),
            nullable=True,
            comment="first delivery of the resolved notice to any webhook",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_notices")),
        sa.UniqueConstraint(
            "budget", "scope", "window_start", "kind", "threshold", name=op.f("uq_alert_notices_budget")
        ),
    )
    op.create_index("ix_alert_notices_status_resolved_at", "alert_notices", ["status", "resolved_at"])
    op.create_table(
        "alert_deliveries",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("notice_id", _ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="the message: firing | resolved"),
        sa.Column(
            "webhook",
            sa.String(64),
            nullable=False,
            comment="digest of kind and URL (a webhook URL is a secret)",
        ),
        sa.Column("state", sa.String(16), nullable=False, comment="pending | sent | failed | superseded"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["notice_id"],
            ["alert_notices.id"],
            name=op.f("fk_alert_deliveries_notice_id_alert_notices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_deliveries")),
        sa.UniqueConstraint("notice_id", "status", "webhook", name=op.f("uq_alert_deliveries_notice_id")),
    )
    op.create_index("ix_alert_deliveries_state_next_attempt_at", "alert_deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    """Drop what this revision created."""
    op.drop_index("ix_alert_deliveries_state_next_attempt_at", table_name="alert_deliveries")
    op.drop_table("alert_deliveries")
    op.drop_index("ix_alert_notices_status_resolved_at", table_name="alert_notices")
    op.drop_table("alert_notices")
