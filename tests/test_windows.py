"""Calendar windows in the configured timezone, DST included; expected instants written by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from monitor.budgets.windows import calendar_window

BERLIN = ZoneInfo("Europe/Berlin")
UTC_ = ZoneInfo("UTC")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kind", "now", "zone", "start", "end"),
    [
        # 23:30 UTC on 24 Nov is already 00:30 on 25 Nov in Berlin (UTC+1).
        ("day", utc(2026, 11, 24, 23, 30), BERLIN, utc(2026, 11, 24, 23), utc(2026, 11, 25, 23)),
        ("day", utc(2026, 11, 24, 22, 59), BERLIN, utc(2026, 11, 23, 23), utc(2026, 11, 24, 23)),
        # Berlin springs forward on 29 Mar 2026: that day is 23 hours long.
        ("day", utc(2026, 3, 29, 12), BERLIN, utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
        # ...and falls back on 25 Oct 2026: 25 hours.
        ("day", utc(2026, 10, 25, 12), BERLIN, utc(2026, 10, 24, 22), utc(2026, 10, 25, 23)),
        # Month rollover: 30 Nov 23:30 UTC is 1 Dec in Berlin.
        ("month", utc(2026, 11, 30, 23, 30), BERLIN, utc(2026, 11, 30, 23), utc(2026, 12, 31, 23)),
        ("month", utc(2026, 11, 30, 22, 30), BERLIN, utc(2026, 10, 31, 23), utc(2026, 11, 30, 23)),
        # October 2026 in Berlin spans the DST change: starts at UTC+2, ends at UTC+1.
        ("month", utc(2026, 10, 15), BERLIN, utc(2026, 9, 30, 22), utc(2026, 10, 31, 23)),
        ("month", utc(2026, 12, 31, 23, 59), UTC_, utc(2026, 12, 1), utc(2027, 1, 1)),
        # ISO week: Thursday 26 Nov 2026 belongs to the week starting Monday 23 Nov.
        ("week", utc(2026, 11, 26, 12), UTC_, utc(2026, 11, 23), utc(2026, 11, 30)),
        ("week", utc(2026, 11, 22, 23, 30), BERLIN, utc(2026, 11, 22, 23), utc(2026, 11, 29, 23)),
    ],
)
def test_calendar_window(kind: str, now: datetime, zone: ZoneInfo, start: datetime, end: datetime) -> None:
    assert calendar_window(kind, now, zone) == (start, end)  # type: ignore[arg-type]


def test_day_in_a_zone_whose_midnight_is_skipped() -> None:
    # Santiago springs forward at 00:00 local on 6 Sep 2026: the day starts at 01:00 local (04:00 UTC).
    start, end = calendar_window("day", utc(2026, 9, 6, 12), ZoneInfo("America/Santiago"))
    assert start == utc(2026, 9, 6, 4)
    assert end == utc(2026, 9, 7, 3)


@pytest.mark.parametrize(
    "zone", ["Asia/Kathmandu", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns", "Europe/Berlin"]
)
def test_budget_buckets_agree_with_calendar_windows_in_odd_offset_zones(zone: str) -> None:
    # Budgets cache a window's start per quarter hour; that is only right if every local midnight falls on the
    # quarter-hour grid. Check minute by minute around midnights (and Lord Howe's 30-minute DST shift).
    from datetime import timedelta

    from monitor.budgets import compile_budgets
    from monitor.config import BudgetConfig
    from monitor.pricing import load_price_table

    tz = ZoneInfo(zone)
    prices = load_price_table()
    for kind in ("day", "week", "month"):
        (budget,) = compile_budgets([BudgetConfig(name="b", window=kind, limit_usd=1)], prices)
        for day in (
            datetime(2026, 4, 5, tzinfo=tz),
            datetime(2026, 10, 4, tzinfo=tz),
            datetime(2026, 12, 1, tzinfo=tz),
        ):
            for minute in range(-90, 90, 7):
                moment = (day + timedelta(minutes=minute)).astimezone(UTC)
                assert budget.bucket_of(moment, tz) == calendar_window(kind, moment, tz)[0], (kind, moment)  # type: ignore[arg-type]
