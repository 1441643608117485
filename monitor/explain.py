"""`check-config`: the loaded configuration told back in words, so a reader can see what will happen."""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from monitor.config import (
    BudgetConfig,
    LimitConfig,
    LoadedSettings,
    ProxyClientConfig,
    ProxyConfig,
    ReconcileConfig,
    admission_in_database,
)
from monitor.pricing import PriceTable
from monitor.redaction import database_url, webhook_url
from monitor.wire import scope_text


def _who(match: Mapping[str, str], per: str | None) -> str:
    """Whom a budget or limit counts: its scope, or each value of `per` within it."""
    scope = scope_text(match)
    return f"each {per} of {scope}" if per else scope


def _limit(budget: BudgetConfig) -> str:
    if budget.limit_usd is not None:
        return f"${budget.limit_usd}"
    if budget.limit_tokens:
        kind, amount = next(iter(budget.limit_tokens.items()))
        return f"{amount:,} {kind} tokens"
    return f"{budget.limit_requests:,} requests"


def _enforces(limit: LimitConfig) -> list[str]:
    parts = []
    if limit.requests_per_minute is not None:
        burst = limit.burst or limit.requests_per_minute
        parts.append(f"{limit.requests_per_minute:,} requests a minute (bursts of up to {burst:,})")
    if limit.input_tokens_per_minute is not None:
        burst = limit.input_tokens_burst or limit.input_tokens_per_minute
        parts.append(
            f"{limit.input_tokens_per_minute:,} input tokens a minute, estimated at admission "
            f"(bursts of up to {burst:,})"
        )
    if limit.concurrent is not None:
        parts.append(f"{limit.concurrent:,} calls in flight at once")
    if limit.max_tokens is not None:
        parts.append(f"max_tokens at most {limit.max_tokens:,} (a call asking more is refused 400)")
    if limit.max_input_tokens is not None:
        parts.append(f"estimated input at most {limit.max_input_tokens:,} tokens")
    if limit.max_request_usd is not None:
        parts.append(f"worst-case cost of one call at most ${limit.max_request_usd}")
    return parts


def _percent(fraction: Decimal) -> str:
    return f"{(fraction * 100).normalize():f}%"


def _proxy(proxy: ProxyConfig, environ: Mapping[str, str]) -> list[str]:
    """The proxy's clients in words: how each authenticates (never its key), what is fixed, what it may assert."""
    unpriced = "passed" if proxy.allow_unpriced_models else "refused 400"
    lines = [
        f"proxy: listen {proxy.listen}, upstream {proxy.upstream}, fail_mode {proxy.fail_mode}; "
        f"models the price table does not know are {unpriced}; bodies up to {proxy.max_body_bytes:,} bytes",
        "proxy admits each call on "
        + (
            f"Anthropic's count of its input (count_tokens, waited for up to {proxy.count_tokens_timeout}, else the "
            "byte bound)"
            if proxy.count_tokens
            else "an upper bound of its input from the request's bytes (proxy.count_tokens: false)"
        ),
    ]
    if not proxy.clients:
        lines.append("proxy clients: none (every call to the proxy is refused 401)")
        return lines
    lines.append("proxy clients (a call without one of their keys is refused 401):")
    lines += [f"  - {_client(client, environ)}" for client in proxy.clients]
    return lines


def _client(client: ProxyClientConfig, environ: Mapping[str, str]) -> str:
    if client.key_env is not None:
        state = "set" if environ.get(client.key_env, "").strip() else "NOT SET: the proxy will not start"
        key = f"key from ${client.key_env} ({state})"
    else:
        assert client.key_sha256 is not None
        key = f"key with sha256 {client.key_sha256[:8]}…"
    parts = [f"{client.name}: {key}"]
    fixed = ", ".join(f"{k}={v}" for k, v in client.attributes.items())
    parts.append(f"sets {fixed}" if fixed else "sets no attribute")
    asserted = ", ".join(f"{dimension} from {header}" for header, dimension in client.identity.headers.items())
    parts.append(f"may assert {asserted}" if asserted else "asserts nothing (identity headers are ignored)")
    if client.require:
        parts.append(f"a call without {', '.join(client.require)} is refused 400")
    return "; ".join(parts)


def reconcile_explained(config: ReconcileConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What reconcile will do, as data (check-config --format json): whether the admin key is set, never its value."""
    dimensions = sorted(next(iter(config.api_keys.values()), {}))
    return {
        "base_url": config.base_url,
        "products": ["messages_api", "message_batches_api"],
        "group_by": ["model", "service_tier", *(["api_key_id"] if config.api_keys else [])],
        "every": config.every,
        "lookback_days": config.lookback_days,
        "settle_hours": config.settle_hours,
        "tolerance": f"{config.tolerance.normalize():f}",
        "admin_key_env": config.admin_key_env,
        "admin_key_set": bool(environ.get(config.admin_key_env, "").strip()),
        "compared_by": dimensions,
        "api_keys": {key_id: dict(attributes) for key_id, attributes in config.api_keys.items()},
    }


def _reconcile(config: ReconcileConfig, environ: Mapping[str, str]) -> list[str]:
    """The reconcile section in words."""
    shown = reconcile_explained(config, environ)
    key = (
        "set: the leader fetches on schedule"
        if shown["admin_key_set"]
        else "NOT SET: nothing is fetched on schedule and `claude-monitor reconcile` refuses to run"
    )
    lines = [
        f"reconcile: Anthropic's usage and cost reports (Messages API and Message Batches API only) from "
        f"{config.base_url}, every {config.every} by the leader, each run re-fetching the last {config.lookback_days} "
        f"UTC day(s); a day is settled {config.settle_hours}h after it ends (younger days are shown, never alerted "
        f"on); a finding is a settled day whose cost drifts more than {_percent(config.tolerance)} from Anthropic's "
        "list-price figure, or with requests we never logged",
        f"reconcile admin key: from ${config.admin_key_env} ({key})",
    ]
    if not config.api_keys:
        lines.append("reconcile by API key: no key mapped (reconcile.api_keys); compared per UTC day, model and tier")
        return lines
    by = ", ".join(shown["compared_by"])
    lines.append(
        f"reconcile by API key: reports grouped by api_key_id too; compared per UTC day, model, tier and {by}:"
    )
    for key_id, attributes in config.api_keys.items():
        lines.append(f"  - {key_id}: {', '.join(f'{name}={value}' for name, value in attributes.items())}")
    lines.append(
        f"  - every other key, and usage no key authenticated: one unmapped row, against our traffic whose {by} "
        "matches no key above"
    )
    return lines


def explain(loaded: LoadedSettings, prices: PriceTable, environ: Mapping[str, str] = os.environ) -> str:
    """A plain-text account of every setting that matters."""
    s = loaded.settings
    lines = [f"config: {loaded.path or 'none found; built-in defaults'}"]
    if loaded.env_overrides:
        lines.append(f"environment overrides: {', '.join(loaded.env_overrides)}")
    lines += [
        f"database: {database_url(s.database_url)}",
        f"timezone: {s.timezone} (calendar windows: day, Monday-first week, month)",
        f"dimensions kept from event attributes: {', '.join(s.dimensions)}; other keys are dropped and counted",
        f"metric labels: model, {', '.join(s.metrics.labels)}" if s.metrics.labels else "metric labels: model",
        "sources:" if s.sources else "sources: none (HTTP ingest only)",
    ]
    lines += [f"  - tail {src.path} (as {src.label})" for src in s.sources]
    lines += [
        f"http: listen {s.http.listen}; ingest token from ${s.http.ingest_token_env}; "
        f"bodies up to {s.http.max_body_bytes:,} bytes",
        f"schedule: evaluate every {s.schedule.evaluate_every}; keep raw events {s.schedule.retention_days} days, "
        f"the event-time rollup {s.schedule.rollup_retention_days} days",
        f"throttle snapshot: {s.throttle.snapshot_file}",
    ]
    if s.alerts.webhooks:
        lines.append("notifier webhooks:")
        lines += [f"  - {hook.kind}: {webhook_url(hook.url)}" for hook in s.alerts.webhooks]
    else:
        lines.append("notifier webhooks: none (use the shipped Prometheus alert rules)")
    overridden = sorted(s.pricing.models)
    lines.append(
        f"price table: version {prices.version}, {len(prices.models)} models"
        + (f"; from config: {', '.join(overridden)}" if overridden else "")
    )
    if not s.budgets:
        lines.append("budgets: none")
    else:
        lines.append("budgets:")
    for b in s.budgets:
        who = _who(b.match, b.per)
        limit = _limit(b)
        window = b.parsed_window
        period = f"per {window.kind} ({s.timezone})"
        if window.kind == "rolling":
            period = f"over a {str(window).removeprefix('rolling:')} rolling window"
        parts = [f"  - {b.name}: {who}, {limit} {period}"]
        if b.alert_at:
            parts.append("alert at " + ", ".join(_percent(fraction) for fraction in b.alert_at))
        parts.append(f"throttle at {_percent(b.throttle_at)}" if b.throttle_at is not None else "alert only")
        lines.append("; ".join(parts))
    if not s.limits:
        lines.append("admission limits: none (POST /v1/admit still reserves against budgets that throttle)")
    else:
        lines.append("admission limits (checked by POST /v1/admit before a call starts):")
    for entry in s.limits:
        who = _who(entry.match, entry.per)
        lines.append(f"  - {entry.name}: {who}: " + "; ".join(_enforces(entry)))
    ttl = s.admission.lease_ttl.delta
    shared = admission_in_database(s)
    lines.append(
        f"admission leases: expire {s.admission.lease_ttl} after admit or their last renewal "
        f"(running calls renew every {int(ttl.total_seconds() // 3)}s); "
        + (
            f"kept in the database: every replica shares them (admission.state: {s.admission.state})"
            if shared
            else f"kept in this daemon's memory, at most {s.admission.max_open_leases:,} open"
        )
    )
    lines.append(
        f"admission memory: at most {s.admission.max_buckets:,} rate buckets, "
        f"{s.admission.max_spend_scopes:,} budget scopes' spend, {s.admission.max_settled_remembered:,} ended leases "
        "remembered"
    )
    throttling = [b.name for b in s.budgets if b.throttle_at is not None]
    if throttling:
        lines.append(
            "admission reserves each call's worst case against: "
            + ", ".join(throttling)
            + " (spend + open reservations + the call must stay within limit x throttle_at)"
        )
    lines += _proxy(s.proxy, environ)
    lines += _reconcile(s.reconcile, environ)
    return "\n".join(lines) + "\n"
