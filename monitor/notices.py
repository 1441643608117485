"""What a budget notice says, and how each kind of receiver (generic, Slack, Alertmanager) wants it said."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from monitor.budgets import scope_key
from monitor.pricing import format_usd
from monitor.throttle import iso

# The names of the shipped Prometheus rules (dashboards/prometheus/alerts.yaml): one runbook, one set of routes.
_ALERTNAMES = {
    "threshold": "ClaudeBudgetThresholdCrossed",
    "forecast": "ClaudeBudgetForecastOverrun",
    "throttle": "ClaudeBudgetThrottleActive",
}


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
        )

    @property
    def calendar(self) -> bool:
        """A calendar window (day, week, month); a rolling window's notice records the span ending when it fired."""
        return self.window_end > self.fired_at


# --- payloads ------------------------------------------------------------------------------------------------


def _forecast_usd(pico: int) -> str:
    return format_usd(pico // 10**6 * 10**6)  # an estimate: micro-dollars, as in `budgets --format json`


def generic_payload(notice: Notice, now: datetime) -> dict[str, Any]:
    """Kind `generic`: exactly the object of SPEC §4."""
    return {
        "kind": notice.kind,
        "status": notice.status,
        "budget": notice.budget,
        "scope": notice.scope,
        "threshold": float(notice.threshold),
        "spend_usd": format_usd(notice.spend_pico),
        "limit_usd": format_usd(notice.limit_amount) if notice.measure == "usd" else None,
        "forecast_usd": _forecast_usd(notice.forecast_pico),
        "window_start": iso(notice.window_start),
        "window_end": iso(notice.window_end),
        "sent_at": iso(now),
    }


def _percent(value: Decimal) -> str:
    return f"{fraction_text(value * 100)}%"


def _unit(measure: str) -> str:
    return "requests" if measure == "requests" else f"{measure} tokens"


def _scope_text(scope: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(scope.items())) or "all traffic"


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


def headline(notice: Notice) -> str:
    """One line saying what happened, for Slack text and Alertmanager's summary."""
    where = f"budget {notice.budget} ({_scope_text(notice.scope)})"
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
    if not notice.calendar:
        why = "its rolling window is back under it"
    elif notice.resolved_at is not None and notice.resolved_at < notice.window_end:
        why = "the budget is no longer configured"
    else:
        why = "the window ended"
    return f"Resolved: {where} {was} — {why}"


def description(notice: Notice, zone: ZoneInfo) -> str:
    """The facts in one paragraph."""
    spent, limit, forecast = _facts(notice)
    end = notice.window_end.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
    text = f"Spent {spent} of {limit}; threshold {_percent(notice.threshold)}"
    if notice.calendar:
        text += f"; forecast {forecast} by the window's end at {end} ({iso(notice.window_end)})"
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
    fields = [
        _mrkdwn(f"*Budget*\n{notice.budget}"),
        _mrkdwn(f"*Scope*\n{_escape(_scope_text(notice.scope))}"),
        _mrkdwn(f"*Spend*\n{spent}"),
        _mrkdwn(f"*Limit*\n{limit}"),
        _mrkdwn(f"*Threshold*\n{_percent(notice.threshold)}"),
        _mrkdwn(f"*Forecast*\n{forecast}"),
        _mrkdwn(f"*Window ends*\n{end} ({iso(notice.window_end)})"),
        _mrkdwn(f"*Status*\n{notice.status}"),
    ]
    return {
        "text": f"{icon} {title}",
        "blocks": [
            {"type": "section", "text": _mrkdwn(f"{icon} *{title}*")},
            {"type": "section", "fields": fields},
            {
                "type": "context",
                "elements": [_mrkdwn(f"claude-monitor · {notice.kind} notice · sent {iso(now)}")],
            },
        ],
    }


def alertmanager_payload(notice: Notice, zone: ZoneInfo, generator_url: str) -> list[dict[str, Any]]:
    """Kind `alertmanager`: the body of POST /api/v2/alerts, one alert; `endsAt` in the past resolves it."""
    alert: dict[str, Any] = {
        "labels": {
            "alertname": _ALERTNAMES[notice.kind],
            "budget": notice.budget,
            "scope": scope_key(notice.scope),
            "kind": notice.kind,
            "threshold": fraction_text(notice.threshold),
            "severity": "critical" if notice.kind == "throttle" or notice.threshold >= 1 else "warning",
        },
        "annotations": {"summary": headline(notice), "description": description(notice, zone)},
        "startsAt": iso(notice.fired_at),
        "generatorURL": generator_url,
    }
    if notice.status == "resolved":
        assert notice.resolved_at is not None
        ends = min(notice.window_end, notice.resolved_at) if notice.calendar else notice.resolved_at
        alert["endsAt"] = iso(ends)
    elif notice.calendar:
        # Sent once, so Alertmanager must not time it out after its resolve_timeout: it holds until the window ends.
        alert["endsAt"] = iso(notice.window_end)
    return [alert]
