"""What a budget notice says, and how each kind of receiver (generic, Slack, Alertmanager) wants it said."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from monitor.pricing import format_usd
from monitor.wire import iso_z, scope_key, scope_text

# The names of the shipped Prometheus rules (dashboards/prometheus/alerts.yaml): one runbook, one set of routes.
_ALERTNAMES = {
    "threshold": "ClaudeBudgetThresholdCrossed",
    "forecast": "ClaudeBudgetForecastOverrun",
    "throttle": "ClaudeBudgetThrottleActive",
}
_AGGREGATE_ALERTNAMES = {"threshold": "ClaudeBudgetScopesOverThreshold", "throttle": "ClaudeBudgetScopesThrottled"}


def fraction_text(value: Decimal) -> str:
    """A threshold as the store keeps it: '0.8', '1', '1.25'."""
    return format(value.normalize(), "f")


@dataclass(frozen=True)
class Notice:
    """One notice as stored: which budget scope, window, kind and threshold, its status and the facts to tell."""

    id: int
    budget: str
    scope: dict[str, str]
    kind: str
    threshold: Decimal
    status: str
    window_start: datetime
    window_end: datetime
    measure: str
    limit_amount: int
    amount: int
    spend_pico: int
    forecast_amount: int
    forecast_pico: int
    fired_at: datetime
    resolved_at: datetime | None
    per: str | None = None  # set: the aggregated notice of a `per:` budget
    scopes_over: int = 0
    top: tuple[dict[str, Any], ...] = ()  # {"scope", "amount", "spend_pico"}, biggest first
    superseded_by: Decimal | None = None

    @classmethod
    def from_row(cls, row: Any) -> Notice:
        """From an alert_notices row."""
        return cls(
            row.id,
            row.budget,
            json.loads(row.scope),
            row.kind,
            Decimal(row.threshold),
            row.status,
            row.window_start,
            row.window_end,
            row.measure,
            row.limit_amount,
            row.amount,
            row.spend_pico,
            row.forecast_amount,
            row.forecast_pico,
            row.fired_at,
            row.resolved_at,
            row.per,
            row.scopes_over or 0,
            tuple(json.loads(row.top)) if row.top else (),
            Decimal(row.superseded_by) if row.superseded_by else None,
        )

    @property
    def calendar(self) -> bool:
        """A calendar window (day, week, month); a rolling window's notice records the span ending when it fired."""
        return self.window_end > self.fired_at


# --- payloads ------------------------------------------------------------------------------------------------


def _forecast_usd(pico: int) -> str:
    return format_usd(pico // 10**6 * 10**6)  # an estimate: micro-dollars, as in `budgets --format json`


def _limit_usd(notice: Notice) -> str | None:
    return format_usd(notice.limit_amount) if notice.measure == "usd" else None


def generic_payload(notice: Notice, now: datetime) -> dict[str, Any]:
    """Kind `generic`: one scope's notice, or a `per:` budget's aggregated one."""
    if notice.per is not None:
        return {
            "kind": notice.kind,
            "status": notice.status,
            "budget": notice.budget,
            "per": notice.per,
            "threshold": float(notice.threshold),
            "scopes_over": notice.scopes_over,
            "top": [
                {"scope": t["scope"], "spend_usd": format_usd(t["spend_pico"]), "limit_usd": _limit_usd(notice)}
                for t in notice.top
            ],
            "window_start": iso_z(notice.window_start),
            "window_end": iso_z(notice.window_end),
            "sent_at": iso_z(now),
        }
    return {
        "kind": notice.kind,
        "status": notice.status,
        "budget": notice.budget,
        "scope": notice.scope,
        "threshold": float(notice.threshold),
        "spend_usd": format_usd(notice.spend_pico),
        "limit_usd": _limit_usd(notice),
        "forecast_usd": _forecast_usd(notice.forecast_pico),
        "window_start": iso_z(notice.window_start),
        "window_end": iso_z(notice.window_end),
        "sent_at": iso_z(now),
    }


def _percent(value: Decimal) -> str:
    return f"{fraction_text(value * 100)}%"


def _unit(measure: str) -> str:
    return "requests" if measure == "requests" else f"{measure} tokens"


def _facts(notice: Notice) -> tuple[str, str, str]:
    """(spent, limit, forecast) in the budget's own unit; a non-USD budget adds what its usage cost."""
    if notice.measure == "usd":
        return (
            f"${format_usd(notice.spend_pico)}",
            f"${format_usd(notice.limit_amount)}",
            f"${_forecast_usd(notice.forecast_pico)}",
        )
    unit = _unit(notice.measure)
    return (
        f"{notice.amount:,} {unit} (${format_usd(notice.spend_pico)})",
        f"{notice.limit_amount:,} {unit}",
        f"{notice.forecast_amount:,} {unit}",
    )


def _scopes(notice: Notice, count: int) -> str:
    return f"{count} {notice.per} scope{'' if count == 1 else 's'}"


def _aggregate_headline(notice: Notice) -> str:
    percent = _percent(notice.threshold)
    over = _scopes(notice, notice.scopes_over)
    if notice.status == "firing":
        what = "are throttled" if notice.kind == "throttle" else f"reached {percent} of their own limit"
        return f"Budget {notice.budget}: {over} {what}"
    was = f"were throttled at {percent}" if notice.kind == "throttle" else f"reached {percent} of their own limit"
    why = "the window ended" if notice.calendar else "no scope is over it any more"
    if notice.calendar and notice.resolved_at is not None and notice.resolved_at < notice.window_end:
        why = "the budget is no longer configured"
    return f"Resolved: budget {notice.budget}: {over} {was} — {why}"


def top_text(notice: Notice) -> str:
    """The biggest scopes of an aggregated notice, one per line."""
    lines = []
    for entry in notice.top:
        spent = f"${format_usd(entry['spend_pico'])}"
        if notice.measure != "usd":
            spent = f"{entry['amount']:,} {_unit(notice.measure)} ({spent})"
        lines.append(f"{scope_text(entry['scope'])}: {spent}")
    return "\n".join(lines) or "none"


def headline(notice: Notice) -> str:
    """One line saying what happened, for Slack text and Alertmanager's summary."""
    if notice.per is not None:
        return _aggregate_headline(notice)
    where = f"budget {notice.budget} ({scope_text(notice.scope)})"
    percent = _percent(notice.threshold)
    if notice.status == "firing":
        what = {
            "threshold": f"reached {percent} of its limit",
            "forecast": "is forecast to pass its limit before the window ends",
            "throttle": f"is throttled: at {percent} of its limit, its requests are refused",
        }[notice.kind]
        return f"Budget {where.removeprefix('budget ')} {what}"
    was = {
        "threshold": f"reached {percent} of its limit",
        "forecast": "was forecast to pass its limit",
        "throttle": f"was throttled at {percent} of its limit",
    }[notice.kind]
    if notice.superseded_by is not None:
        why = f"superseded by its {_percent(notice.superseded_by)} notice"
    elif not notice.calendar:
        why = "its rolling window is back under it"
    elif notice.resolved_at is not None and notice.resolved_at < notice.window_end:
        why = "the budget is no longer configured"
    else:
        why = "the window ended"
    return f"Resolved: {where} {was} — {why}"


def description(notice: Notice, zone: ZoneInfo) -> str:
    """The facts in one paragraph."""
    if notice.per is not None:
        end = notice.window_end.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
        _, limit, _ = _facts(notice)
        biggest = "; ".join(top_text(notice).splitlines())
        return (
            f"{_scopes(notice, notice.scopes_over)} at or over {_percent(notice.threshold)} of their own limit "
            f"({limit} each) in the window ending {end} ({iso_z(notice.window_end)}). Biggest: {biggest}. "
            "All of them: claude-monitor budgets, or GET /v1/budgets."
        )
    spent, limit, forecast = _facts(notice)
    end = notice.window_end.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
    text = f"Spent {spent} of {limit}; threshold {_percent(notice.threshold)}"
    if notice.calendar:
        text += f"; forecast {forecast} by the window's end at {end} ({iso_z(notice.window_end)})"
    return text + "."


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def _escape(text: str) -> str:
    # Scope values come from callers: keep them from becoming Slack mentions or links.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(notice: Notice, now: datetime, zone: ZoneInfo) -> dict[str, Any]:
    """Kind `slack`: an incoming-webhook message with the same facts as the generic notice."""
    spent, limit, forecast = _facts(notice)
    icon = ":white_check_mark:" if notice.status == "resolved" else ":rotating_light:"
    title = _escape(headline(notice))
    end = notice.window_end.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
    if notice.per is not None:
        icon = ":white_check_mark:" if notice.status == "resolved" else ":warning:"
        title = _escape(headline(notice))
        fields = [
            _mrkdwn(f"*Budget*\n{notice.budget}"),
            _mrkdwn(f"*Per*\n{notice.per}"),
            _mrkdwn(f"*Threshold*\n{_percent(notice.threshold)}"),
            _mrkdwn(f"*Scopes over*\n{notice.scopes_over}"),
            _mrkdwn(f"*Limit (each)*\n{limit}"),
            _mrkdwn(f"*Window ends*\n{end} ({iso_z(notice.window_end)})"),
            _mrkdwn(f"*Biggest*\n{_escape(top_text(notice))}"),
            _mrkdwn(f"*Status*\n{notice.status}"),
        ]
        return _slack_message(icon, title, fields, f"{notice.kind} digest of {notice.per} scopes · sent {iso_z(now)}")
    fields = [
        _mrkdwn(f"*Budget*\n{notice.budget}"),
        _mrkdwn(f"*Scope*\n{_escape(scope_text(notice.scope))}"),
        _mrkdwn(f"*Spend*\n{spent}"),
        _mrkdwn(f"*Limit*\n{limit}"),
        _mrkdwn(f"*Threshold*\n{_percent(notice.threshold)}"),
        _mrkdwn(f"*Forecast*\n{forecast}"),
        _mrkdwn(f"*Window ends*\n{end} ({iso_z(notice.window_end)})"),
        _mrkdwn(f"*Status*\n{notice.status}"),
    ]
    return _slack_message(icon, title, fields, f"{notice.kind} notice · sent {iso_z(now)}")


def _slack_message(icon: str, title: str, fields: list[dict[str, str]], context: str) -> dict[str, Any]:
    """A headline, its fields and a context line, as Slack blocks (with `text` for the notification itself)."""
    return {
        "text": f"{icon} {title}",
        "blocks": [
            {"type": "section", "text": _mrkdwn(f"{icon} *{title}*")},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [_mrkdwn(f"claude-monitor · {context}")]},
        ],
    }


def alertmanager_payload(notice: Notice, zone: ZoneInfo, generator_url: str) -> list[dict[str, Any]]:
    """Kind `alertmanager`: the body of POST /api/v2/alerts, one alert; `endsAt` in the past resolves it."""
    labels: dict[str, str] = {
        "alertname": _ALERTNAMES[notice.kind],
        "budget": notice.budget,
        "scope": scope_key(notice.scope),
        "kind": notice.kind,
        "threshold": fraction_text(notice.threshold),
        "severity": "critical" if notice.kind == "throttle" or notice.threshold >= 1 else "warning",
    }
    if notice.per is not None:
        # Never a page, and never a user in a label: the budget, what it is per, and how far.
        labels = {
            "alertname": _AGGREGATE_ALERTNAMES[notice.kind],
            "budget": notice.budget,
            "per": notice.per,
            "kind": notice.kind,
            "threshold": fraction_text(notice.threshold),
            "severity": "warning" if notice.kind == "throttle" or notice.threshold >= 1 else "info",
        }
    alert: dict[str, Any] = {
        "labels": labels,
        "annotations": {"summary": headline(notice), "description": description(notice, zone)},
        "startsAt": iso_z(notice.fired_at),
        "generatorURL": generator_url,
    }
    if notice.status == "resolved":
        assert notice.resolved_at is not None
        ends = min(notice.window_end, notice.resolved_at) if notice.calendar else notice.resolved_at
        alert["endsAt"] = iso_z(ends)
    elif notice.calendar:
        # Sent once, so Alertmanager must not time it out after its resolve_timeout: it holds until the window ends.
        alert["endsAt"] = iso_z(notice.window_end)
    return [alert]
