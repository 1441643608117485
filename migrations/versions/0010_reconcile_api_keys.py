"""Anthropic's figures per API key id too, so reconcile can compare them per mapped attributes (reconcile.api_keys).

Figures stored before are not grouped by key: they keep '*'.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMMENT = "Anthropic's API key id (apikey_…); '' no key; '*' not grouped by key"


def upgrade() -> None:
    """Add reconcile_figures.api_key_id ('*' for the rows there) and make it part of the primary key."""
    with op.batch_alter_table("reconcile_figures") as batch:
        batch.add_column(sa.Column("api_key_id", sa.String(255), nullable=False, server_default="*", comment=COMMENT))
    with op.batch_alter_table("reconcile_figures") as batch:
        batch.alter_column("api_key_id", existing_type=sa.String(255), server_default=None, existing_comment=COMMENT)
        batch.drop_constraint("pk_reconcile_figures", type_="primary")
        batch.create_primary_key("pk_reconcile_figures", ["day", "model", "service_tier", "api_key_id"])


def downgrade() -> None:
    """Back to one row per day, model and tier. Figures grouped by key are dropped with the fetches that covered them
    (those days read as never fetched; `claude-monitor reconcile --since` fetches them again)."""
    op.execute(
        "DELETE FROM reconcile_fetches WHERE EXISTS (SELECT 1 FROM reconcile_figures f WHERE f.api_key_id <> '*' "
        "AND f.day >= reconcile_fetches.first_day AND f.day < reconcile_fetches.end_day)"
    )
    op.execute("DELETE FROM reconcile_figures WHERE api_key_id <> '*'")
    with op.batch_alter_table("reconcile_figures") as batch:
        batch.drop_constraint("pk_reconcile_figures", type_="primary")
        batch.create_primary_key("pk_reconcile_figures", ["day", "model", "service_tier"])
        batch.drop_column("api_key_id")
