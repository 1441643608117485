"""budget_usage keyed (budget, period, scope, bucket_start): the rows of a calendar window together.

On SQLite a calendar budget's rows get their window's start as their period, so the rows of the windows in force lie
together in the key's order and a batch's upserts land on few pages; keyed by scope first, a batch that touched
thousands of users dirtied a page for each. A rolling budget's rows get 1970-01-01, as does every row on PostgreSQL
(where that measured faster) and every row stored before this revision: reads of a window ask for its start and
1970-01-01 both, so nothing is recounted.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIELDS = ("requests", "input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "cost_pico")
EPOCH_SQLITE = "1970-01-01 00:00:00.000000"  # as SQLite stores the models' datetimes


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _table(name: str, with_period: bool) -> None:
    columns = [
        sa.Column("budget", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
        sa.Column("bucket_start", sa.DateTime(), nullable=False),
        *(sa.Column(field, sa.BigInteger(), nullable=False) for field in FIELDS),
    ]
    key = ["budget", "scope", "bucket_start"]
    if with_period:
        comment = "on SQLite a calendar window's start (= bucket_start); otherwise 1970-01-01"
        columns.append(sa.Column("period", sa.DateTime(), nullable=False, comment=comment))
        key = ["budget", "period", "scope", "bucket_start"]
    op.create_table(name, *columns, sa.PrimaryKeyConstraint(*key, name="pk_budget_usage"))


def upgrade() -> None:
    """Add period (1970-01-01 for every stored row) and key the table by it after the budget."""
    op.drop_index("ix_budget_usage_budget_bucket_start", table_name="budget_usage")
    if _postgresql():  # in place: the column with a constant default costs no rewrite, the key is rebuilt
        op.execute(
            "ALTER TABLE budget_usage ADD COLUMN period TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT '1970-01-01'"
        )
        op.execute("ALTER TABLE budget_usage ALTER COLUMN period DROP DEFAULT")
        op.execute(
            "COMMENT ON COLUMN budget_usage.period IS "
            "'on SQLite a calendar window''s start (= bucket_start); otherwise 1970-01-01'"
        )
        op.execute("ALTER TABLE budget_usage DROP CONSTRAINT pk_budget_usage")
        op.execute(
            "ALTER TABLE budget_usage ADD CONSTRAINT pk_budget_usage PRIMARY KEY (budget, period, scope, bucket_start)"
        )
    else:  # SQLite changes a primary key by copying the table
        op.rename_table("budget_usage", "budget_usage_before_periods")
        _table("budget_usage", with_period=True)
        columns = ", ".join(("budget", "scope", "bucket_start", *FIELDS))
        op.execute(
            f"INSERT INTO budget_usage ({columns}, period) "
            f"SELECT {columns}, '{EPOCH_SQLITE}' FROM budget_usage_before_periods"
        )
        op.drop_table("budget_usage_before_periods")
    op.create_index("ix_budget_usage_budget_bucket_start", "budget_usage", ["budget", "bucket_start"])


def downgrade() -> None:
    """Key by (budget, scope, bucket_start) again; a bucket stored under two periods becomes one row, summed."""
    op.drop_index("ix_budget_usage_budget_bucket_start", table_name="budget_usage")
    if _postgresql():
        op.execute("ALTER TABLE budget_usage RENAME CONSTRAINT pk_budget_usage TO pk_budget_usage_periods")
    op.rename_table("budget_usage", "budget_usage_periods")
    _table("budget_usage", with_period=False)
    columns = ", ".join(("budget", "scope", "bucket_start"))
    sums = ", ".join(f"sum({field})" for field in FIELDS)
    op.execute(
        f"INSERT INTO budget_usage ({columns}, {', '.join(FIELDS)}) "
        f"SELECT {columns}, {sums} FROM budget_usage_periods GROUP BY {columns}"
    )
    op.drop_table("budget_usage_periods")
    op.create_index("ix_budget_usage_budget_bucket_start", "budget_usage", ["budget", "bucket_start"])
