"""Aggregated notices of `per:` budgets (how many scopes, the top few, when last updated) and superseded notices.

A `per:` budget no longer raises one notice per scope: one notice per threshold names how many scopes crossed and
the biggest spenders, and is updated at most once per `alerts.digest_every`. A lower threshold's notice is
resolved when a higher one of the same scope fires, and says which.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the digest and supersession columns to alert_notices."""
    with op.batch_alter_table("alert_notices") as batch:
        batch.add_column(sa.Column("per", sa.String(64), comment="a per: budget's dimension: an aggregated notice"))
        batch.add_column(sa.Column("scopes_over", sa.Integer(), comment="aggregated: scopes at or over the threshold"))
        batch.add_column(sa.Column("top", sa.Text(), comment="aggregated: JSON list of the biggest scopes"))
        batch.add_column(sa.Column("updated_at", sa.DateTime(), comment="aggregated: facts last sent as an update"))
        batch.add_column(sa.Column("superseded_by", sa.String(32), comment="the higher threshold that resolved it"))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("alert_notices") as batch:
        for name in ("superseded_by", "updated_at", "top", "scopes_over", "per"):
            batch.drop_column(name)
