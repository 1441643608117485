"""PostgreSQL upserts of many rows in one statement: each column sent as one array, the rows made by unnest().

psycopg 3 runs an executemany as a pipeline of one statement per row, and SQLAlchemy's multi-row VALUES leave
ON CONFLICT DO UPDATE out; one `INSERT … SELECT * FROM unnest(…) ON CONFLICT … DO UPDATE` per batch sends a dozen
parameters whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql

from monitor.store.models import UTCDateTime

_DIALECT = postgresql.dialect()


class BulkUpsert:
    """INSERT … ON CONFLICT (keys) DO UPDATE of `values`: added to the stored ones (`adding`) or replacing them."""

    def __init__(self, table: Table, keys: Sequence[str], values: Sequence[str], *, adding: bool) -> None:
        self._names = [*keys, *values]
        columns = [table.c[name] for name in self._names]
        self._utc = [isinstance(column.type, UTCDateTime) for column in columns]
        arrays = ", ".join(f"%b::{column.type.compile(dialect=_DIALECT)}[]" for column in columns)
        updates = ", ".join(
            f'"{name}" = {table.name}."{name}" + EXCLUDED."{name}"' if adding else f'"{name}" = EXCLUDED."{name}"'
            for name in values
        )
        self._sql = (
            f"INSERT INTO {table.name} ({', '.join(f'{chr(34)}{name}{chr(34)}' for name in self._names)}) "
            f"SELECT * FROM unnest({arrays}) "
            f"ON CONFLICT ({', '.join(f'{chr(34)}{name}{chr(34)}' for name in keys)}) DO UPDATE SET {updates}"
        )

    def execute(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert `rows` (each key once: a statement cannot update a row twice), in their order: callers sort them so
        concurrent batches lock shared rows in one order."""
        if not rows:
            return
        arrays = []
        for name, utc in zip(self._names, self._utc, strict=True):
            column = [row[name] for row in rows]
            if utc:  # a batch's rows share few distinct instants (bucket starts): each converted once
                naive: dict[datetime, datetime] = {}
                column = [naive.get(value) or naive.setdefault(value, _naive_utc(value)) for value in column]
            arrays.append(column)
        connection.exec_driver_sql(self._sql, tuple(arrays))


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)
