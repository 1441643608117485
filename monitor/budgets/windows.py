"""Calendar windows in a timezone: where the day, week or month containing an instant starts and ends."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Calendar = Literal["day", "week", "month"]


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    # Midnight may not exist (a DST gap at 00:00): zoneinfo then maps it forward, which is the day's first instant.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def calendar_window(kind: Calendar, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the calendar day, ISO week (Monday first) or month containing `now` in `zone`."""
    local = now.astimezone(zone).date()
    if kind == "day":
        first, after = local, local + timedelta(days=1)
    elif kind == "week":
        first = local - timedelta(days=local.weekday())
        after = first + timedelta(days=7)
    elif kind == "month":
        first = local.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"{kind!r} is not a calendar window")
    return _local_midnight(first, zone), _local_midnight(after, zone)
