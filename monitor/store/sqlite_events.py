"""SQLite's bulk insert of events: one DBAPI executemany of plain tuples, new rows told apart without RETURNING.

The rows hold what the ORM would store (UTC datetimes as its `YYYY-MM-DD HH:MM:SS.ffffff` text, booleans as 0/1,
JSON as text: compact, which every JSON reader decodes to the same value), so readers see the same values whichever
path wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table

# Column order of an event row tuple (the `events` table's columns but its id).
EVENT_COLUMNS = (
    "request_id",
    "ts",
    "received_at",
    "source",
    "model_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
    "web_fetch_requests",
    "batch",
    "long_prompt",
    "service_tier",
    "speed",
    "inference_geo",
    "status",
    "latency_ms",
    "attributes",
    "cost_pico",
    "price_version",
)
_INSERT = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
# SQLite gives a new row the largest rowid + 1 unless that one is the largest possible, when it picks a free one
# at random: below this bound, the rows a transaction (holding the write lock) inserted are those above the largest
# id it saw before inserting.
_ROWID_SAFE = 2**62


def sqlite_datetime(moment: datetime) -> str:
    """A UTC-aware datetime as the text SQLite stores for it (what the ORM writes for a UTC column)."""
    if moment.tzinfo is not UTC:  # parsed timestamps are UTC already: converting one again costs a third
        moment = moment.astimezone(UTC)
    return moment.isoformat(" ", "microseconds")[:26]


def insert_new_events(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> set[str]:
    """Insert rows (as `sqlite_event_row` makes them, request_ids distinct) unless their request_id is stored;
    return the request_ids that were new. Runs inside the caller's write transaction (it holds the write lock)."""
    if not rows:
        return set()
    before = connection.exec_driver_sql("SELECT max(id) FROM events").scalar() or 0
    if before >= _ROWID_SAFE:
        return _insert_looking_up(connection, rows)
    written = connection.exec_driver_sql(_INSERT, list(rows)).rowcount
    if written == len(rows):
        return {row[0] for row in rows}
    if written == 0:
        return set()
    return set(connection.exec_driver_sql("SELECT request_id FROM events WHERE id > ?", (before,)).scalars())


def _insert_looking_up(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> set[str]:
    """The same, learning which request_ids are stored by looking them up first (one index probe per row)."""
    ids = [row[0] for row in rows]
    stored: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT request_id FROM events WHERE request_id IN ({marks})"
        stored.update(connection.exec_driver_sql(query, tuple(chunk)).scalars())
    connection.exec_driver_sql(_INSERT, list(rows))
    return set(ids) - stored


def add_rows(
    connection: Connection, table: Table, keys: Sequence[str], values: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """INSERT … ON CONFLICT (keys) DO UPDATE SET v = v + excluded.v for each value column, rows as plain tuples
    (keys then values, datetimes as `sqlite_datetime` text) through one executemany."""
    columns = [*keys, *values]
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
        + ", ".join(f"{name} = {table.name}.{name} + excluded.{name}" for name in values)
    )
    connection.exec_driver_sql(sql, list(rows))
