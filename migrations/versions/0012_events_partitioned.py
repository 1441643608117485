"""PostgreSQL: `events` partitioned by month of `ts`, and request_id made unique through the `event_ids` table.

The rows there are copied into the partitioned table (one partition per month they cover, plus this month, the next
one and a DEFAULT partition) and their ids into event_ids; ids, the id sequence, column comments and every plain
index (as defined, whichever migration added it) are kept. SQLite is not changed.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_IDS_COMMENT = "the stored event's timestamp: which partition holds it"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _indexes() -> list[tuple[str, str]]:
    """(name, definition) of the plain indexes of `events`, not those behind its constraints: each is recreated on
    the new table as it was, whichever migrations added them."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT c.relname, pg_get_indexdef(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'events'::regclass AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid) "
            "ORDER BY c.relname"
        )
    )
    on_events = " ON events USING "
    return [(name, re.sub(r" ON (ONLY )?\S+ USING ", on_events, definition, count=1)) for name, definition in rows]


def upgrade() -> None:
    """Rebuild events as a partitioned table with its rows; create event_ids with their request_ids."""
    if not _postgresql():
        return
    indexes = _indexes()
    for name, _ in indexes:
        op.execute(f'DROP INDEX "{name}"')
    op.execute("ALTER TABLE events RENAME TO events_unpartitioned")
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT pk_events")
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT uq_events_request_id")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
    op.execute(
        "CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS INCLUDING COMMENTS) PARTITION BY RANGE (ts)"
    )
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
    op.execute("ALTER TABLE events ADD CONSTRAINT pk_events PRIMARY KEY (id, ts)")
    for _, definition in indexes:
        op.execute(definition)
    op.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    # A partition per month from the oldest row's to the month after this one (the partition job keeps it so).
    op.execute(
        """
        DO $$
        DECLARE month timestamp;
        BEGIN
            FOR month IN SELECT generate_series(
                date_trunc('month', least((SELECT min(ts) FROM events_unpartitioned), now() AT TIME ZONE 'UTC')),
                date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month',
                interval '1 month')
            LOOP
                EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                    'events_p' || to_char(month, 'YYYYMM'), month, month + interval '1 month');
            END LOOP;
        END $$
        """
    )
    op.execute("INSERT INTO events SELECT * FROM events_unpartitioned")
    op.create_table(
        "event_ids",
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=False, comment=_IDS_COMMENT),
        sa.PrimaryKeyConstraint("request_id", name="pk_event_ids"),
    )
    op.execute("INSERT INTO event_ids (request_id, ts) SELECT request_id, ts FROM events_unpartitioned")
    op.execute("DROP TABLE events_unpartitioned")


def downgrade() -> None:
    """Back to one events table with a unique request_id; every partition's rows and every index are kept."""
    if not _postgresql():
        return
    indexes = _indexes()
    op.execute("DROP TABLE event_ids")
    for name, _ in indexes:
        op.execute(f'DROP INDEX "{name}"')
    op.execute("ALTER TABLE events RENAME TO events_partitioned")
    op.execute("ALTER TABLE events_partitioned DROP CONSTRAINT pk_events")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
    op.execute("CREATE TABLE events (LIKE events_partitioned INCLUDING DEFAULTS INCLUDING COMMENTS)")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
    op.execute("INSERT INTO events SELECT * FROM events_partitioned")
    op.execute("DROP TABLE events_partitioned")  # and its partitions
    op.execute("ALTER TABLE events ADD CONSTRAINT pk_events PRIMARY KEY (id)")
    op.execute("ALTER TABLE events ADD CONSTRAINT uq_events_request_id UNIQUE (request_id)")
    for _, definition in indexes:
        op.execute(definition)
