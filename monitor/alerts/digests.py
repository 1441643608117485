"""Aggregated notices of `per:` budgets: per threshold, how many scopes crossed it and the biggest spenders.

A `per:` budget (one scope per user, say) never raises a notice per scope: one notice per threshold (and one for
throttled scopes) is sent when the first scope crosses, updated at most once per `alerts.digest_every` while more
cross, and resolved when the window resets (a rolling window: when no scope is over any more).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, insert, update
from sqlalchemy.dialects import postgresql, sqlite

from monitor.budgets import Budget, ScopeState
from monitor.store.models import alert_deliveries, alert_notices
from monitor.store.queries import window_totals
from monitor.wire import scope_key

TOP_SCOPES = 5  # the biggest scopes a notice names
_N = alert_notices.c
_D = alert_deliveries.c


@dataclass(frozen=True)
class TopScope:
    """One of the biggest scopes over a threshold: its dimensions, amount in the budget's unit, and cost."""

    scope: dict[str, str]
    amount: int
    spend_pico: int

    def as_json(self) -> dict[str, Any]:
        """As stored in alert_notices.top."""
        return {"scope": self.scope, "amount": self.amount, "spend_pico": self.spend_pico}


@dataclass(frozen=True)
class Digest:
    """A `per:` budget at one threshold (kind threshold) or at its throttle_at (kind throttle)."""

    budget: Budget
    kind: str
    threshold: Decimal
    scopes_over: int
    top: tuple[TopScope, ...]
    window_start: datetime
    window_end: datetime

    @property
    def key(self) -> tuple[str, str, str]:
        """(budget, kind, threshold text): what identifies its notice within a window."""
        return self.budget.name, self.kind, format(self.threshold.normalize(), "f")

    def top_text(self) -> str:
        """The top scopes as stored: a JSON list."""
        return json.dumps([t.as_json() for t in self.top], separators=(",", ":"), ensure_ascii=False)


def aggregate_scope(budget: Budget) -> str:
    """The scope column of a budget's aggregated notices: its fixed `match` (a per-scope key always has more)."""
    return scope_key(dict(budget.match))


def _top(budget: Budget, over: Sequence[tuple[dict[str, str], int, int]]) -> tuple[TopScope, ...]:
    ranked = sorted(over, key=lambda item: (-item[1], scope_key(item[0])))
    return tuple(TopScope(scope, amount, cost) for scope, amount, cost in ranked[:TOP_SCOPES])


def digest_thresholds(budget: Budget) -> list[tuple[str, Decimal]]:
    """(kind, fraction) of every aggregated notice a `per:` budget can raise."""
    out = [("threshold", t) for t in budget.alert_at]
    if budget.throttle_at is not None:
        out.append(("throttle", budget.throttle_at))
    return out


def digests_of(
    budget: Budget, scopes: Iterable[tuple[dict[str, str], int, int]], window: tuple[datetime, datetime]
) -> list[Digest]:
    """The digests of one `per:` budget from (scope, amount, cost) of its scopes: those with a scope over."""
    rows = list(scopes)
    out = []
    for kind, fraction in digest_thresholds(budget):
        over = [row for row in rows if budget.over(row[1], fraction)]
        if over:
            out.append(Digest(budget, kind, fraction, len(over), _top(budget, over), *window))
    return out


def digests_from_states(
    states: Iterable[ScopeState], budgets: Mapping[str, Budget]
) -> dict[tuple[str, str, str], Digest]:
    """Every digest the evaluated scopes of `per:` budgets call for (shown scopes include all those over a
    threshold, so the counts are whole)."""
    by_budget: dict[str, list[ScopeState]] = {}
    for state in states:
        if state.budget.per is not None and state.budget.name in budgets:
            by_budget.setdefault(state.budget.name, []).append(state)
    out: dict[tuple[str, str, str], Digest] = {}
    for name, found in by_budget.items():
        budget = budgets[name]
        window = (found[0].window_start, found[0].window_end)
        if budget.bucket is not None:  # rolling: every scope's window ends now
            window = (min(s.window_start for s in found), max(s.window_end for s in found))
        for digest in digests_of(budget, ((s.scope, s.amount, s.usage.cost_pico) for s in found), window):
            out[digest.key] = digest
    return out


def final_digests(connection: Connection, budget: Budget, start: datetime, end: datetime) -> dict[str, Digest]:
    """What an ended calendar window of a `per:` budget came to, by (kind, threshold text), from budget_usage."""
    scopes = [
        (json.loads(key), budget.amount(usage), usage.cost_pico)
        for key, usage in window_totals(connection, budget.name, start, end)
    ]
    return {f"{d.kind} {d.key[2]}": d for d in digests_of(budget, scopes, (start, end))}


def insert_notice(connection: Connection, values: dict[str, Any]) -> int | None:
    """Insert a notice unless its key exists (another replica, or a budget re-added mid-window); its id or None."""
    module: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        module.insert(alert_notices)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["budget", "scope", "window_start", "kind", "threshold"])
        .returning(_N.id)
    )
    return connection.execute(statement).scalar()


def queue_deliveries(
    connection: Connection, notice_id: int, message: str, webhooks: Sequence[str], now: datetime
) -> None:
    """A pending delivery of a notice's `message` (firing, update, resolved) to each webhook; an update replaces
    the previous update's delivery, sent or not, so a receiver gets the latest facts once."""
    for webhook in webhooks:
        values = {"state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now, "last_error": None}
        done = connection.execute(
            update(alert_deliveries)
            .where(_D.notice_id == notice_id, _D.status == message, _D.webhook == webhook)
            .values(sent_at=None, **values)
        )
        if not done.rowcount:
            connection.execute(
                insert(alert_deliveries).values(notice_id=notice_id, status=message, webhook=webhook, **values)
            )


def fire_digest(connection: Connection, digest: Digest, now: datetime, webhooks: Sequence[str]) -> int:
    """Store a new aggregated notice and queue its firing message; 1 if it was new."""
    budget = digest.budget
    notice_id = insert_notice(
        connection,
        {
            "budget": budget.name,
            "scope": aggregate_scope(budget),
            "window_start": digest.window_start,
            "kind": digest.kind,
            "threshold": digest.key[2],
            "window_end": digest.window_end,
            "status": "firing",
            "measure": budget.measure,
            "limit_amount": budget.limit,
            "amount": 0,
            "spend_pico": 0,
            "forecast_amount": 0,
            "forecast_pico": 0,
            "fired_at": now,
            "per": budget.per,
            "scopes_over": digest.scopes_over,
            "top": digest.top_text(),
            "updated_at": now,
        },
    )
    if notice_id is None:
        return 0
    queue_deliveries(connection, notice_id, "firing", webhooks, now)
    return 1


def update_digest(
    connection: Connection, row: Any, digest: Digest, now: datetime, every: timedelta, sent_to: Sequence[str]
) -> int:
    """Send the new facts of a firing aggregated notice when more scopes crossed and the last were sent at least
    `every` ago; receivers whose firing message is not out yet get the new facts with it. 1 if updated."""
    if digest.scopes_over <= (row.scopes_over or 0) or now - (row.updated_at or row.fired_at) < every:
        return 0
    connection.execute(
        update(alert_notices)
        .where(_N.id == row.id)
        .values(scopes_over=digest.scopes_over, top=digest.top_text(), updated_at=now)
    )
    queue_deliveries(connection, row.id, "update", sent_to, now)
    return 1
