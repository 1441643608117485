"""A partial index of the events stored without a price, by model id: re-pricing finds them without a scan.

Revision ID: 0013
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPRICED = sa.text("cost_pico IS NULL")


def upgrade() -> None:
    """Index events.model_id where cost_pico is NULL (few rows: only events of models the table did not know)."""
    op.create_index(
        "ix_events_unpriced_model_id", "events", ["model_id"], sqlite_where=UNPRICED, postgresql_where=UNPRICED
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_index("ix_events_unpriced_model_id", table_name="events")
