"""The events table on PostgreSQL: month partitions, the request_id table, the COPY write path and retention.

`events` is partitioned by RANGE (ts), one partition per UTC month (`events_pYYYYMM`) and a DEFAULT partition
(`events_default`) that takes any row no month partition covers (a backfill of old logs, a month the job has not
created yet), so an insert never fails for want of a partition. Months get a partition only inside a window (from
the retention cutoff's month to `partitions_ahead_months` ahead) and a batch creates at most a few: timestamps are
outside input, and one body spread over thousands of months must not become thousands of tables. Rows outside the
window stay in the default partition until retention deletes them; see docs/SCALING.md.

PostgreSQL only allows a unique key on a partitioned table if it contains the partition key, so exactly-once on
request_id lives in the unpartitioned `event_ids` table: a batch claims its ids with `INSERT INTO event_ids … ON
CONFLICT DO NOTHING RETURNING`, then COPYs the rows of only the ids it claimed into `events`, whatever month their
timestamps fall in.

Lock order, which every writer of these tables follows so none can deadlock another: `event_ids` first, then `events`
(and its partitions). Retention takes `event_ids` in SHARE ROW EXCLUSIVE mode before it drops a partition; the
partition job takes `events` in SHARE UPDATE EXCLUSIVE mode before it locks the default partition.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, Engine

from monitor.store.models import events

if TYPE_CHECKING:
    from monitor.config import Settings

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "events_default"
_MONTH_NAME = re.compile(r"^events_p(\d{4})(\d{2})$")
# Serializes the partition job across replicas (it runs on the leader, but a replica losing leadership mid-run and
# the new leader may overlap for a moment). Any constant of our own: "cmpart" as ASCII.
_ADVISORY_KEY = 0x636D70617274

# Every column but the surrogate id, in the table's order: the COPY and the INSERT … SELECT name the same list.
COLUMNS = tuple(column.name for column in events.columns if column.name != "id")
_COLUMN_LIST = ", ".join(f'"{name}"' for name in COLUMNS)
_VALUES = operator.itemgetter(*COLUMNS)
_TS, _RECEIVED_AT, _ATTRIBUTES = (COLUMNS.index(name) for name in ("ts", "received_at", "attributes"))
# The first statement of a batch claims its ids, in request_id order, the order every writer takes them in (two
# batches with overlapping ids cannot deadlock); the second copies the rows of the ids claimed straight into
# `events` (PostgreSQL routes each to its partition).
_CLAIM = (
    "INSERT INTO event_ids (request_id, ts) "
    "SELECT * FROM unnest(%s::varchar[], %s::timestamp[]) AS claimed (request_id, ts) ORDER BY request_id "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
_COPY = f"COPY events ({_COLUMN_LIST}) FROM STDIN"


def partition_name(month: date) -> str:
    """The partition holding the UTC month that starts on `month`."""
    return f"events_p{month.year:04d}{month.month:02d}"


def month_start(moment: datetime | date) -> date:
    """The first day of the (UTC) month of `moment`."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def next_month(month: date) -> date:
    """The first day of the month after `month`."""
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class PartitionWindow:
    """Which months may get a partition, and how many a batch may create."""

    retention_days: int = 90
    months_ahead: int = 2
    max_new_per_batch: int = 4

    def months(self, now: datetime) -> tuple[date, date]:
        """The first and last month (inclusive) that may get a partition at `now`: from the month of the retention
        cutoff (older rows are deleted at the next retention run) to `months_ahead` after this one."""
        try:
            first = month_start(now - timedelta(days=self.retention_days))
        except OverflowError:  # retention longer than the calendar goes back
            first = date.min
        last = month_start(now)
        for _ in range(self.months_ahead):
            last = next_month(last)
        return first, last


def _year_month(moment: datetime) -> tuple[int, int]:
    utc = moment.astimezone(UTC)
    return utc.year, utc.month


def partition_window(settings: Settings) -> PartitionWindow:
    """The partition window these settings configure."""
    return PartitionWindow(
        retention_days=settings.schedule.retention_days,
        months_ahead=settings.schedule.partitions_ahead_months,
        max_new_per_batch=settings.store.max_new_partitions_per_batch,
    )


def insert_new_events(connection: Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Store the rows whose request_id no event has yet (exactly once, across months and concurrent writers);
    return those request_ids. Rows are `events` rows as the writer builds them (UTC-aware datetimes, a dict of
    attributes); a request_id repeated within `rows` is stored once (its first row)."""
    if not rows:
        return set()
    unique: dict[str, list[Any]] = {}
    received: dict[datetime, datetime] = {}  # a batch's rows share their received_at: converted once
    for row in rows:
        if row["request_id"] not in unique:
            values = list(_VALUES(row))
            ts = values[_TS]
            values[_TS] = ts.replace(tzinfo=None) if ts.tzinfo is UTC else _naive_utc(ts)
            at = values[_RECEIVED_AT]
            naive = received.get(at)
            if naive is None:
                naive = received[at] = _naive_utc(at)
            values[_RECEIVED_AT] = naive
            values[_ATTRIBUTES] = orjson.dumps(values[_ATTRIBUTES]).decode()  # compact, as SQLite stores it
            unique[row["request_id"]] = values
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(_CLAIM, (list(unique), [values[_TS] for values in unique.values()]))
        claimed = {row[0] for row in cursor.fetchall()}
        if claimed:
            with cursor.copy(_COPY) as copy:
                for request_id, values in unique.items():
                    if request_id in claimed:
                        copy.write_row(values)
        return claimed
    finally:
        cursor.close()


def month_partitions(connection: Connection) -> dict[date, str]:
    """The month partitions of `events` that exist: first day of the month -> table name."""
    names = connection.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass"
    ).scalars()
    found = {}
    for name in names:
        match = _MONTH_NAME.match(name)
        if match:
            found[date(int(match[1]), int(match[2]), 1)] = name
    return found


def ensure_month(connection: Connection, month: date) -> bool:
    """Give `month` its own partition unless it has one, moving its rows out of the default partition first (a
    partition cannot be attached while the default one holds rows of its range). True when it was created."""
    name = partition_name(month)
    if connection.exec_driver_sql("SELECT to_regclass(%(name)s)", {"name": name}).scalar() is not None:
        return False
    start, end = month.isoformat(), next_month(month).isoformat()
    # events first (SHARE UPDATE EXCLUSIVE lets writers on), then the default partition, where writers' rows of
    # this month could otherwise arrive between the move and the attach.
    connection.exec_driver_sql("LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE")
    connection.exec_driver_sql(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")
    connection.exec_driver_sql(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)")
    connection.exec_driver_sql(
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= %(start)s AND ts < %(end)s RETURNING *) "
        f"INSERT INTO {name} SELECT * FROM moved",
        {"start": start, "end": end},
    )
    # DDL takes no bind parameters: the bounds are dates formatted here, never outside input.
    connection.exec_driver_sql(f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{start}') TO ('{end}')")
    return True


class MonthPartitions:
    """The months a writer has seen a partition for; a batch with another month inside the window gets its
    partition first, in a transaction of its own (so a backfill of old logs fills month partitions, not the default
    one), at most `max_new_per_batch` of them, the newest first; the batch's other rows go to the default partition
    and a later batch, or the partition job, gives their months a partition and moves them there."""

    def __init__(self, engine: Engine, window: PartitionWindow) -> None:
        self._engine = engine
        self._window = window
        self._known: set[tuple[int, int]] | None = None

    def ensure(self, timestamps: Iterable[datetime], now: datetime) -> list[str]:
        """Create partitions missing for these UTC timestamps, within the window at `now`; return those created. A
        month dropped since it was seen is not noticed: its rows go to the default partition, and the next
        partition job moves them."""
        wanted = {(moment.year, moment.month) if moment.tzinfo is UTC else _year_month(moment) for moment in timestamps}
        if self._known is None:
            with self._engine.connect() as connection:
                self._known = {(month.year, month.month) for month in month_partitions(connection)}
        missing = wanted - self._known
        if not missing:
            return []
        first, last = self._window.months(now)
        low, high = (first.year, first.month), (last.year, last.month)
        chosen = sorted((month for month in missing if low <= month <= high), reverse=True)
        chosen = chosen[: self._window.max_new_per_batch]
        if not chosen:
            return []
        created = []
        with self._engine.begin() as connection:
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%(key)s)", {"key": _ADVISORY_KEY})
            for year, month in sorted(chosen):
                if ensure_month(connection, date(year, month, 1)):
                    created.append(partition_name(date(year, month, 1)))
        self._known.update(chosen)
        return created


def prepare_partitions(engine: Engine, now: datetime, window: PartitionWindow) -> list[str]:
    """The partition job: a partition for this month and the next `months_ahead`, and for every month of the window
    with rows in the default partition (which moves them there). Rows of months outside the window stay where they
    are (retention deletes them once past its cutoff). Returns the partitions it created."""
    created = []
    first, last = window.months(now)
    with engine.begin() as connection:
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%(key)s)", {"key": _ADVISORY_KEY})
        wanted = {month_start(now)}
        for _ in range(window.months_ahead):
            wanted.add(next_month(max(wanted)))
        wanted.update(
            month_start(moment.replace(tzinfo=UTC))
            for moment in connection.exec_driver_sql(
                f"SELECT DISTINCT date_trunc('month', ts) FROM {DEFAULT_PARTITION} "
                "WHERE ts >= %(first)s AND ts < %(end)s",
                {"first": first, "end": next_month(last)},
            ).scalars()
        )
        for month in sorted(wanted):
            if ensure_month(connection, month):
                created.append(partition_name(month))
        left = connection.exec_driver_sql(f"SELECT count(*) FROM {DEFAULT_PARTITION}").scalar()
    if left:
        log.warning(
            "%s holds %d events of months outside the partition window %s..%s (timestamps older than retention, or "
            "past the months ahead): retention deletes those older than its cutoff",
            DEFAULT_PARTITION,
            left,
            first.strftime("%Y-%m"),
            last.strftime("%Y-%m"),
        )
    return created


def drop_expired_events(engine: Engine, cutoff: datetime) -> list[str]:
    """Retention of raw events: drop every month partition wholly before `cutoff` (a month partly after it is kept
    until its last day is past), delete the default partition's rows before it, and the ids of all of them from
    `event_ids`, in one transaction. Returns the partitions dropped."""
    dropped = []
    with engine.begin() as connection:
        # Wait for batches in flight and hold new ones at their first step (event_ids): no writer then holds
        # events while waiting for event_ids, which dropping a partition (a lock on events) would deadlock with.
        connection.exec_driver_sql("LOCK TABLE event_ids IN SHARE ROW EXCLUSIVE MODE")
        for month, name in sorted(month_partitions(connection).items()):
            if datetime.combine(next_month(month), datetime.min.time(), UTC) > cutoff:
                continue
            connection.exec_driver_sql(f"DELETE FROM event_ids i USING {name} p WHERE i.request_id = p.request_id")
            connection.exec_driver_sql(f"DROP TABLE {name}")
            dropped.append(name)
        connection.exec_driver_sql(
            f"WITH gone AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts < %(cutoff)s RETURNING request_id) "
            "DELETE FROM event_ids WHERE request_id IN (SELECT request_id FROM gone)",
            {"cutoff": _naive_utc(cutoff)},
        )
    return dropped


def partition_tables(connection: Connection) -> Iterable[str]:
    """Every table that is a partition of another (schema comparison leaves them to their parent's description)."""
    return connection.exec_driver_sql("SELECT relname FROM pg_class WHERE relispartition AND relkind = 'r'").scalars()
