"""Admission state in the database (admission.state: database): leases, what they hold, token buckets, refunds.

Created on every store so the schema is one; only PostgreSQL replicas use them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create admission_leases, admission_holds, admission_buckets and admission_refunds."""
    op.create_table(
        "admission_leases",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False, comment="admit or last renewal + lease_ttl"),
        sa.Column("model_id", sa.String(255), nullable=False, comment="as the call asked, to price a release's usage"),
        sa.Column("batch", sa.Boolean(), nullable=False),
        sa.Column(
            "estimated_input", sa.BigInteger(), nullable=False, comment="input tokens taken from input-token buckets"
        ),
        sa.Column("reserved_pico", sa.BigInteger(), nullable=False, comment="the worst case admit answered"),
        sa.Column(
            "request_id",
            sa.String(255),
            nullable=True,
            comment="named by POST /v1/release: its usage event settles the lease",
        ),
        sa.Column(
            "released_at",
            sa.DateTime(),
            nullable=True,
            comment="slots returned; budget holds are the call's actual usage",
        ),
        sa.Column(
            "ended",
            sa.String(16),
            nullable=True,
            comment="usage event | release | expired; NULL while it holds something",
        ),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admission_leases")),
    )
    op.create_index("ix_admission_leases_request_id", "admission_leases", ["request_id"])
    op.create_index("ix_admission_leases_expires_at", "admission_leases", ["expires_at"])
    op.create_table(
        "admission_holds",
        sa.Column("lease", sa.String(64), nullable=False),
        sa.Column(
            "kind", sa.String(8), nullable=False, comment="slot | budget | itpm (input tokens taken from a bucket)"
        ),
        sa.Column("name", sa.String(128), nullable=False, comment="the limit or budget"),
        sa.Column("scope", sa.String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
        sa.Column(
            "amount", sa.BigInteger(), nullable=False, comment="1 | in the budget's measure (pico-USD) | input tokens"
        ),
        sa.Column("expires_at", sa.DateTime(), nullable=False, comment="the lease's, so sums need no join"),
        sa.ForeignKeyConstraint(
            ["lease"],
            ["admission_leases.id"],
            name=op.f("fk_admission_holds_lease_admission_leases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("lease", "kind", "name", name=op.f("pk_admission_holds")),
    )
    op.create_index("ix_admission_holds_name_scope", "admission_holds", ["name", "scope", "kind", "expires_at"])
    op.create_table(
        "admission_buckets",
        sa.Column("name", sa.String(128), nullable=False, comment="the limit"),
        sa.Column("scope", sa.String(1024), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False, comment="rpm | itpm"),
        sa.Column("level", sa.Float(53), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", "scope", "kind", name=op.f("pk_admission_buckets")),
    )
    op.create_table(
        "admission_refunds",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(1024), nullable=False),
        sa.Column(
            "amount",
            sa.BigInteger(),
            nullable=False,
            comment="estimated minus actual input tokens (may be negative)",
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admission_refunds")),
    )
    op.create_index("ix_admission_refunds_name_scope", "admission_refunds", ["name", "scope"])


def downgrade() -> None:
    """Drop what this revision created."""
    op.drop_index("ix_admission_refunds_name_scope", table_name="admission_refunds")
    op.drop_table("admission_refunds")
    op.drop_table("admission_buckets")
    op.drop_index("ix_admission_holds_name_scope", table_name="admission_holds")
    op.drop_table("admission_holds")
    op.drop_index("ix_admission_leases_expires_at", table_name="admission_leases")
    op.drop_index("ix_admission_leases_request_id", table_name="admission_leases")
    op.drop_table("admission_leases")
