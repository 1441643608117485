"""The daemon's own notifier: budget notices once per window, kept in the database, delivered to webhooks."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, delete, insert, select, update

from monitor import __version__
from monitor.alerts.digests import Digest, digests_from_states, final_digests, fire_digest, insert_notice, update_digest
from monitor.alerts.payloads import Notice, alertmanager_payload, fraction_text, generic_payload, slack_payload
from monitor.budgets import Budget, ScopeState, forecast_settle
from monitor.budgets.counters import USAGE_FIELDS, Usage
from monitor.config import WebhookConfig
from monitor.store.models import alert_deliveries, alert_notices, budget_usage
from monitor.wire import scope_key

log = logging.getLogger(__name__)

MAX_NOTICES_PER_EVALUATION = 100  # a stampede of per-user crossings must not flood a channel: the rest wait a run
FIRST_RETRY = timedelta(seconds=5)
MAX_RETRY = timedelta(minutes=10)
GIVE_UP_AFTER = timedelta(hours=24)  # a receiver down for a day: the notice is logged as failed
REQUEST_TIMEOUT_S = 5.0
DIGEST_EVERY = timedelta(hours=1)  # alerts.digest_every's default
DELIVERIES_PER_RUN = 500
RUN_SECONDS = 20.0  # one delivery run never holds the job (and a draining stop) longer than this
KEEP_RESOLVED = timedelta(days=90)
_KIND_ORDER = {"throttle": 0, "threshold": 1, "forecast": 2}
_N = alert_notices.c
_D = alert_deliveries.c


@dataclass(frozen=True)
class Webhook:
    """A configured receiver: where it is in the config, its kind, URL, and the digest that names it in the store."""

    index: int
    kind: str
    url: str

    @property
    def id(self) -> str:
        """Digest of kind and URL: the store never holds the URL (a Slack webhook URL is a secret)."""
        return hashlib.sha256(f"{self.kind} {self.url}".encode()).hexdigest()[:32]

    @property
    def label(self) -> str:
        """How logs name it: config key, kind and host, never the path or credentials."""
        return f"alerts.webhooks[{self.index}] ({self.kind}, {urlsplit(self.url).hostname})"


def webhook_receivers(webhooks: Sequence[WebhookConfig]) -> list[Webhook]:
    """The configured webhooks as receivers (each URL was checked when the config was loaded)."""
    return [Webhook(i, hook.kind, hook.url) for i, hook in enumerate(webhooks)]


# --- the notifier --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotifyResult:
    """What one evaluation queued: new firing notices, resolved ones, and those left for the next run."""

    fired: int = 0
    resolved: int = 0
    deferred: int = 0
    updated: int = 0  # aggregated notices of `per:` budgets sent again with more scopes


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery run did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    superseded: int = 0


@dataclass(frozen=True)
class _Outcome:
    state: str  # sent | retry | failed
    error: str | None = None
    retry_after: float | None = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A POST redirected would arrive as a GET without its body: report the 3xx instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def wanted_notices(state: ScopeState, now: datetime) -> list[tuple[str, Decimal]]:
    """(kind, threshold) of every notice a scope state of a budget without `per:` calls for at `now`: the highest
    alert_at reached (a lower one's notice is superseded by it), throttled, and forecast over the limit."""
    budget = state.budget
    amount = state.amount
    crossed = [t for t in budget.alert_at if budget.over(amount, t)]
    out = [("threshold", max(crossed))] if crossed else []
    if budget.throttle_at is not None and state.throttled:
        out.append(("throttle", budget.throttle_at))
    if budget.bucket is None:  # a rolling window never ends: there is nothing to forecast it to
        forecast = state.forecast_cost_pico if budget.measure == "usd" else state.forecast_amount
        # A window's first hours say little about its end: no notice before its average is a forecast.
        settle = forecast_settle(state.window_start, state.window_end)
        if forecast > budget.limit and amount < budget.limit and now - state.window_start >= settle:
            out.append(("forecast", Decimal(1)))
    return out


class Notifier:
    """Turns budget states into notices (once per window, across restarts) and delivers them with retries."""

    def __init__(
        self,
        engine: Engine,
        webhooks: Sequence[WebhookConfig],
        budgets: Sequence[Budget],
        zone: ZoneInfo,
        *,
        generator_url: str = "http://127.0.0.1:9464/v1/budgets",
        max_per_evaluation: int = MAX_NOTICES_PER_EVALUATION,
        timeout: float = REQUEST_TIMEOUT_S,
        digest_every: timedelta = DIGEST_EVERY,
    ) -> None:
        self.webhooks = webhook_receivers(webhooks)
        self._engine = engine
        self._budgets = {b.name: b for b in budgets}
        self._zone = zone
        self._generator_url = generator_url
        self._max = max_per_evaluation
        self._timeout = timeout
        self._digest_every = digest_every
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._user_agent = f"claude-monitor/{__version__}"

    @property
    def enabled(self) -> bool:
        """Any webhook configured."""
        return bool(self.webhooks)

    # --- what to notify --------------------------------------------------------------------------------------

    def evaluate(self, states: Iterable[ScopeState], now: datetime) -> NotifyResult:
        """Queue a notice for each new crossing (one aggregated notice per threshold for a `per:` budget), a resolved
        notice for each firing one whose window is over or that a higher threshold supersedes, and digest updates."""
        if not self.enabled:
            return NotifyResult()
        current = {n: b.window_at(now, self._zone)[0] for n, b in self._budgets.items() if b.bucket is None}
        wanted: dict[tuple[str, str, str, str], tuple[ScopeState, str, Decimal]] = {}
        by_scope: dict[tuple[str, str], ScopeState] = {}
        kept = []
        for state in states:
            name = state.budget.name
            if name not in self._budgets or (name in current and state.window_start != current[name]):
                continue  # evaluated before a reset, or a budget no longer configured
            kept.append(state)
            key = scope_key(state.scope)
            by_scope[name, key] = state
            if state.budget.per is not None:
                continue  # aggregated below, never one notice per scope
            for kind, threshold in wanted_notices(state, now):
                wanted[name, key, kind, fraction_text(threshold)] = (state, kind, threshold)
        digests = digests_from_states(kept, self._budgets)
        highest = {(n, k, kind): t for (n, k, kind, _), (_, _, t) in wanted.items() if kind == "threshold"}
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            present: set[tuple[str, str, str, str]] = set()
            stale = []
            aggregated = []
            for row in connection.execute(
                select(
                    _N.id,
                    _N.budget,
                    _N.scope,
                    _N.window_start,
                    _N.window_end,
                    _N.kind,
                    _N.threshold,
                    _N.fired_at,
                    _N.per,
                    _N.scopes_over,
                    _N.updated_at,
                ).where(_N.status == "firing")
            ):
                if row.per is not None:
                    aggregated.append(row)
                    continue
                slot = (row.budget, row.scope, row.kind, row.threshold)
                budget = self._budgets.get(row.budget)
                higher = highest.get((row.budget, row.scope, row.kind))
                if higher is not None and higher > Decimal(row.threshold):
                    stale.append(row)  # superseded by a higher threshold of the same scope
                    continue
                if budget is not None and budget.bucket is None:
                    if row.window_start >= current[row.budget]:
                        present.add(slot)
                        continue
                elif budget is not None and slot in wanted:
                    present.add(slot)
                    continue
                stale.append(row)
            stale.sort(key=lambda row: (row.fired_at, row.id))
            new = sorted(
                (slot for slot in wanted if slot not in present),
                key=lambda s: (_KIND_ORDER[s[2]], -wanted[s][2], -wanted[s][0].utilization, s),
            )
            deferred = max(0, len(stale) + len(new) - self._max)
            stale = stale[: self._max]
            new = new[: self._max - len(stale)]
            resolved = self._resolve(connection, stale, by_scope, highest, now)
            fired = 0
            for slot in new:
                state, kind, threshold = wanted[slot]
                fired += self._fire(connection, state, kind, threshold, now)
            digest_fired, updated, digest_resolved = self._sync_digests(connection, aggregated, digests, current, now)
            fired += digest_fired
            resolved += digest_resolved
            connection.execute(
                delete(alert_notices).where(_N.status == "resolved", _N.resolved_at < now - KEEP_RESOLVED)
            )
        if deferred:
            log.warning(
                "alerts: %d notices queued, %d deferred to the next evaluation (at most %d per evaluation)",
                fired + resolved,
                deferred,
                self._max,
            )
        elif fired or resolved or updated:
            log.info("alerts: %d firing, %d updated and %d resolved notices queued", fired, updated, resolved)
        return NotifyResult(fired, resolved, deferred, updated)

    def _sync_digests(
        self,
        connection: Connection,
        rows: Sequence[Any],
        digests: Mapping[tuple[str, str, str], Digest],
        current: Mapping[str, datetime],
        now: datetime,
    ) -> tuple[int, int, int]:
        """(fired, updated, resolved) aggregated notices of `per:` budgets."""
        hooks = [hook.id for hook in self.webhooks]
        present: set[tuple[str, str, str]] = set()
        updated = 0
        ending = []
        for row in rows:
            key = (row.budget, row.kind, row.threshold)
            budget = self._budgets.get(row.budget)
            digest = digests.get(key)
            live = budget is not None and budget.per is not None and key not in present
            if live and budget is not None and budget.bucket is None:
                live = row.window_start >= current[row.budget]
            elif live:
                live = digest is not None  # rolling: over while any scope is
            if not live:
                ending.append(row)
                continue
            present.add(key)
            if digest is not None:
                updated += update_digest(
                    connection, row, digest, now, self._digest_every, self._sent_to(connection, row.id)
                )
        fired = sum(fire_digest(connection, d, now, hooks) for key, d in digests.items() if key not in present)
        finals: dict[tuple[str, datetime], dict[str, Digest]] = {}
        for row in ending:
            budget = self._budgets.get(row.budget)
            facts: dict[str, Any] = {}
            if budget is not None and budget.per is not None and budget.bucket is None:
                window = (row.budget, row.window_start)
                if window not in finals:  # what the ended window came to
                    finals[window] = final_digests(connection, budget, row.window_start, row.window_end)
                final = finals[window].get(f"{row.kind} {row.threshold}")
                if final is not None:
                    facts = {"scopes_over": final.scopes_over, "top": final.top_text()}
            connection.execute(
                update(alert_notices)
                .where(_N.id == row.id, _N.status == "firing")
                .values(status="resolved", resolved_at=now, **facts)
            )
        self._queue_resolved(connection, [row.id for row in ending], now)
        return fired, updated, len(ending)

    def _sent_to(self, connection: Connection, notice_id: int) -> list[str]:
        """The current webhooks that received a notice's firing message."""
        sent = connection.execute(
            select(_D.webhook).where(_D.notice_id == notice_id, _D.status == "firing", _D.state == "sent")
        ).scalars()
        current = {hook.id for hook in self.webhooks}
        return [webhook for webhook in sent if webhook in current]

    def _fire(self, connection: Connection, state: ScopeState, kind: str, threshold: Decimal, now: datetime) -> int:
        budget = state.budget
        notice_id = insert_notice(
            connection,
            {
                "budget": budget.name,
                "scope": scope_key(state.scope),
                "window_start": state.window_start,
                "kind": kind,
                "threshold": fraction_text(threshold),
                "window_end": state.window_end,
                "status": "firing",
                "measure": budget.measure,
                "limit_amount": budget.limit,
                "amount": state.amount,
                "spend_pico": state.usage.cost_pico,
                "forecast_amount": state.forecast_amount,
                "forecast_pico": state.forecast_cost_pico,
                "fired_at": now,
            },
        )
        if notice_id is None:
            return 0
        connection.execute(
            insert(alert_deliveries),
            [
                {
                    "notice_id": notice_id,
                    "status": "firing",
                    "webhook": hook.id,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for hook in self.webhooks
            ],
        )
        return 1

    def _resolve(
        self,
        connection: Connection,
        rows: Sequence[Any],
        by_scope: Mapping[tuple[str, str], ScopeState],
        highest: Mapping[tuple[str, str, str], Decimal],
        now: datetime,
    ) -> int:
        """Mark notices resolved with the facts last known, and queue a resolved message wherever one fired."""
        if not rows:
            return 0
        finals = self._final_usage(connection, rows)
        for row in rows:
            facts: dict[str, Any] = {}
            higher = highest.get((row.budget, row.scope, row.kind))
            if higher is not None and higher > Decimal(row.threshold):
                facts["superseded_by"] = fraction_text(higher)
            state = by_scope.get((row.budget, row.scope))
            final = finals.get((row.budget, row.scope, row.window_start))
            if final is not None:  # a calendar window that ended: what it came to
                amount, cost = final
                facts |= {"amount": amount, "spend_pico": cost, "forecast_amount": amount, "forecast_pico": cost}
            elif state is not None and self._budgets[row.budget].bucket is not None:
                facts |= {
                    "amount": state.amount,
                    "spend_pico": state.usage.cost_pico,
                    "forecast_amount": state.forecast_amount,
                    "forecast_pico": state.forecast_cost_pico,
                }
            connection.execute(
                update(alert_notices)
                .where(_N.id == row.id, _N.status == "firing")
                .values(status="resolved", resolved_at=now, **facts)
            )
        self._queue_resolved(connection, [row.id for row in rows], now)
        return len(rows)

    def _queue_resolved(self, connection: Connection, ids: Sequence[int], now: datetime) -> None:
        """Queue a resolved message for each notice wherever its firing message went (or is still going)."""
        if not ids:
            return
        current = {hook.id for hook in self.webhooks}
        fired_to = connection.execute(
            select(_D.notice_id, _D.webhook).where(
                _D.notice_id.in_(ids), _D.status == "firing", _D.state.in_(("sent", "pending"))
            )
        ).all()
        queued = [
            {
                "notice_id": notice_id,
                "status": "resolved",
                "webhook": webhook,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for notice_id, webhook in fired_to
            if webhook in current
        ]
        if queued:
            connection.execute(insert(alert_deliveries), queued)

    def _final_usage(
        self, connection: Connection, rows: Sequence[Any]
    ) -> dict[tuple[str, str, datetime], tuple[int, int]]:
        """(amount, cost) each ended calendar window came to, from budget_usage (a calendar window is one bucket)."""
        wanted: dict[tuple[str, datetime], list[str]] = {}
        for row in rows:
            budget = self._budgets.get(row.budget)
            if budget is not None and budget.bucket is None:
                wanted.setdefault((row.budget, row.window_start), []).append(row.scope)
        out: dict[tuple[str, str, datetime], tuple[int, int]] = {}
        columns = [budget_usage.c[name] for name in USAGE_FIELDS]
        for (name, start), scopes in wanted.items():
            budget = self._budgets[name]
            for i in range(0, len(scopes), 500):
                query = select(budget_usage.c.scope, *columns).where(
                    budget_usage.c.budget == name,
                    budget_usage.c.bucket_start == start,
                    budget_usage.c.scope.in_(scopes[i : i + 500]),
                )
                for scope, *values in connection.execute(query):
                    usage = Usage(*(int(value) for value in values))
                    out[name, scope, start] = (budget.amount(usage), usage.cost_pico)
        return out

    # --- delivery --------------------------------------------------------------------------------------------

    def deliver(self, now: datetime) -> DeliveryResult:
        """Send each due (notice, webhook) message once; a receiver that is down is retried later with backoff."""
        if not self.enabled:
            return DeliveryResult()
        hooks = {hook.id: hook for hook in self.webhooks}
        query = (
            select(
                _D.id.label("delivery_id"),
                _D.status.label("message"),
                _D.webhook,
                _D.attempts,
                _D.created_at.label("queued_at"),
                *alert_notices.c,
            )
            .join(alert_notices, _N.id == _D.notice_id)
            .where(_D.state == "pending", _D.next_attempt_at <= now, _D.webhook.in_(list(hooks)))
            .order_by(_D.next_attempt_at, _D.id)
            .limit(DELIVERIES_PER_RUN)
        )
        with self._engine.connect() as connection:
            rows = connection.execute(query).all()
        counts = {"sent": 0, "retry": 0, "failed": 0, "superseded": 0}
        down: set[str] = set()  # a receiver that failed this run is not tried again until the next
        started = time.monotonic()
        for row in rows:
            if time.monotonic() - started > RUN_SECONDS:
                break
            hook = hooks[row.webhook]
            if hook.id in down:
                continue
            notice = Notice.from_row(row)
            if self._superseded(row, notice):
                counts["superseded"] += 1
                continue
            outcome = self._post(hook, self.payload(hook, notice, now))
            state = self._record(row, notice, hook, outcome, now)
            counts[state] += 1
            if state == "retry":
                down.add(hook.id)
        return DeliveryResult(counts["sent"], counts["retry"], counts["failed"], counts["superseded"])

    def payload(self, hook: Webhook, notice: Notice, now: datetime) -> Any:
        """The JSON body a webhook of this kind receives for a notice."""
        if hook.kind == "slack":
            return slack_payload(notice, now, self._zone)
        if hook.kind == "alertmanager":
            return alertmanager_payload(notice, self._zone, self._generator_url)
        return generic_payload(notice, now)

    def _superseded(self, row: Any, notice: Notice) -> bool:
        """A firing message not yet out when its notice resolved, and the resolved message that would follow it."""
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            if row.message in ("firing", "update") and notice.status == "resolved":
                connection.execute(update(alert_deliveries).where(_D.id == row.delivery_id).values(state="superseded"))
                return True
            if row.message in ("resolved", "update"):
                # An update follows a firing message that went out; one still pending carries the new facts itself.
                firing = connection.execute(
                    select(_D.id, _D.state).where(
                        _D.notice_id == notice.id, _D.status == "firing", _D.webhook == row.webhook
                    )
                ).first()
                if firing is None or firing.state != "sent":
                    ids = [row.delivery_id] + ([firing.id] if firing is not None and firing.state == "pending" else [])
                    connection.execute(update(alert_deliveries).where(_D.id.in_(ids)).values(state="superseded"))
                    return True
        return False

    def _post(self, hook: Webhook, payload: Any) -> _Outcome:
        request = urllib.request.Request(
            hook.url,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": self._user_agent},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                response.read(65536)
            return _Outcome("sent")
        except urllib.error.HTTPError as err:
            body = _error_body(err)
            error = f"HTTP {err.code}{f': {body}' if body else ''}"
            if err.code in (408, 429) or err.code >= 500:
                return _Outcome("retry", error, _retry_after(err.headers.get("Retry-After")))
            return _Outcome("failed", error)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS: the receiver is down
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return _Outcome(
                "retry", f"{type(reason).__name__}: {reason}" if isinstance(reason, Exception) else str(reason)
            )

    def _record(self, row: Any, notice: Notice, hook: Webhook, outcome: _Outcome, now: datetime) -> str:
        attempts = row.attempts + 1
        what = f"{notice.status} {notice.kind} notice {notice.budget} {scope_key(notice.scope)}"
        values: dict[str, Any] = {"attempts": attempts, "last_error": outcome.error}
        state = outcome.state
        if state == "retry" and now - row.queued_at >= GIVE_UP_AFTER:
            state = "failed"
            values["last_error"] = f"gave up after {attempts} attempts over {now - row.queued_at}: {outcome.error}"
        if state == "sent":
            values.update(state="sent", sent_at=now)
            log.info("alerts: %s delivered to %s", what, hook.label)
        elif state == "failed":
            values.update(state="failed")
            log.error("alerts: %s not delivered to %s, not retried: %s", what, hook.label, values["last_error"])
        else:
            delay = backoff(attempts, outcome.retry_after)
            values["next_attempt_at"] = now + delay
            log.warning(
                "alerts: %s not delivered to %s (%s); attempt %d, next in %ds",
                what,
                hook.label,
                outcome.error,
                attempts,
                delay.total_seconds(),
            )
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            connection.execute(update(alert_deliveries).where(_D.id == row.delivery_id).values(**values))
            column = {"firing": "first_sent_at", "resolved": "resolved_sent_at"}.get(row.message)
            if state == "sent" and column is not None:
                connection.execute(
                    update(alert_notices).where(_N.id == notice.id, _N[column].is_(None)).values({column: now})
                )
        return state


def backoff(attempts: int, retry_after: float | None = None) -> timedelta:
    """Wait after `attempts` failed tries: 5 s doubling to 10 minutes, longer when the receiver asks (up to 10 min)."""
    delay = min(FIRST_RETRY * 2 ** min(attempts - 1, 20), MAX_RETRY)
    if retry_after is not None:
        delay = min(max(delay, timedelta(seconds=retry_after)), MAX_RETRY)
    return delay


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the backoff applies


def _error_body(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read(2048)
    except (OSError, http.client.HTTPException):
        return ""
    return " ".join(raw.decode("utf-8", errors="replace").split())[:500]
