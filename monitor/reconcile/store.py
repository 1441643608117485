"""Anthropic's figures in the database: a fetch replaces its days in one transaction; readers take days back."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, Engine, delete, func, insert, select

from monitor.reconcile.fetcher import Fetched, FigureKey, Figures
from monitor.store.models import reconcile_fetches, reconcile_figures
from monitor.wire import BILLED_COUNTS


def replace(engine: Engine, fetched: Fetched, now: datetime) -> int:
    """Replace every day of the fetch's range with its figures (a day Anthropic reports nothing for is emptied) and
    record the fetch, all in one transaction: a failure leaves the previous figures whole. Returns the rows written."""
    rows = [
        {
            "day": day,
            "model": model,
            "service_tier": tier,
            "api_key_id": key_id,
            "list_amount_cents": _text(figures.list_amount_cents),
            "amount_cents": _text(figures.amount_cents),
            "currency": figures.currency,
            "requests": figures.requests,
            **{name: getattr(figures, name) for name in BILLED_COUNTS},
            "fetched_at": now,
        }
        for (day, model, tier, key_id), figures in sorted(fetched.figures.items())
        if fetched.first <= day < fetched.end
    ]
    # SQLite: take the write lock up front, so the delete and the inserts cannot meet a writer half-way.
    with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as connection:
        connection.execute(
            delete(reconcile_figures).where(
                reconcile_figures.c.day >= fetched.first, reconcile_figures.c.day < fetched.end
            )
        )
        if rows:
            connection.execute(insert(reconcile_figures), rows)
        connection.execute(
            insert(reconcile_fetches).values(
                fetched_at=now,
                first_day=fetched.first,
                end_day=fetched.end,
                rows=len(rows),
                data_refreshed_at=fetched.data_refreshed_at,
            )
        )
    return len(rows)


def _text(amount: Decimal) -> str:
    return f"{amount:f}"


def read(connection: Connection, first: date, end: date) -> dict[FigureKey, Figures]:
    """The stored figures of the days in [first, end)."""
    query = select(reconcile_figures).where(reconcile_figures.c.day >= first, reconcile_figures.c.day < end)
    out: dict[FigureKey, Figures] = {}
    for row in connection.execute(query).mappings():
        out[(row["day"], row["model"], row["service_tier"], row["api_key_id"])] = Figures(
            list_amount_cents=Decimal(row["list_amount_cents"]),
            amount_cents=Decimal(row["amount_cents"]),
            currency=row["currency"],
            usage_requests=row["requests"],
            **{name: int(row[name]) for name in BILLED_COUNTS},
        )
    return out


def coverage(connection: Connection, first: date, end: date) -> frozenset[date]:
    """Which days of [first, end) some successful fetch covered."""
    days: set[date] = set()
    query = select(reconcile_fetches.c.first_day, reconcile_fetches.c.end_day).where(
        reconcile_fetches.c.first_day < end, reconcile_fetches.c.end_day > first
    )
    for start, stop in connection.execute(query):
        day = max(start, first)
        while day < min(stop, end):
            days.add(day)
            day += timedelta(days=1)
    return frozenset(days)


def last_success(connection: Connection) -> datetime | None:
    """When the newest successful fetch was stored (any range, any replica)."""
    moment: datetime | None = connection.execute(select(func.max(reconcile_fetches.c.fetched_at))).scalar()
    return moment


def last_fetched_day(connection: Connection, until: date) -> date | None:
    """The latest day before `until` that a fetch covered."""
    latest = None
    query = select(reconcile_fetches.c.first_day, reconcile_fetches.c.end_day).where(
        reconcile_fetches.c.first_day < until
    )
    for start, stop in connection.execute(query):
        candidate = min(stop, until) - timedelta(days=1)
        if candidate >= start and (latest is None or candidate > latest):
            latest = candidate
    return latest
