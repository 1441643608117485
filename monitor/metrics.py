"""Prometheus metrics, computed from the database so they survive restarts and agree across replicas.

A scrape never scans events: the counters table (one row per label set, kept by the write path) is read at most
once a second, and a scrape while the database is away renders the last snapshot it read.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from monitor.budgets.admission import Admission
from monitor.budgets.engine import BudgetEngine, DefinitionChange
from monitor.budgets.throttle import ThrottleState
from monitor.budgets.windows import calendar_window
from monitor.metric_names import (
    ATTRIBUTES_DROPPED,
    COST_PICO,
    INGEST_EVENTS,
    LATE_EVENTS,
    LATENCY_BUCKET,
    LATENCY_LE,
    LATENCY_SUM_US,
    PROXY_LATENCY_BUCKETS,
    REPRICED_EVENTS,
    REQUEST_ERRORS,
    REQUESTS,
    TOKENS,
    UNPRICED_EVENTS,
    UNPRICED_LABEL,
    USAGE_COUNTERS,
)
from monitor.pricing import UNPRICED
from monitor.reconcile.runner import Reconciler, Snapshot
from monitor.store.labels import FREE_VALUES, OTHER, read_admitted
from monitor.store.models import counters
from monitor.store.rollup import BUCKET, RollupCounts, bucket_of, window_totals
from monitor.wire import PICO_PER_USD, TOKEN_TYPES, scope_key, scope_text

log = logging.getLogger(__name__)


def _fraction(value: Decimal) -> str:
    return f"{value.normalize():f}"


class MonitorCollector(Collector):
    """Renders counters, budget gauges and ingest lag from prepared state."""

    def __init__(
        self,
        engine: Engine,
        budgets: BudgetEngine,
        metric_labels: Sequence[str],
        lag: Callable[[], dict[str, float]],
        clock: Callable[[], datetime],
        models: Collection[str] | None = None,
    ) -> None:
        self._engine = engine
        # Price-table names: any other `model` value (rows written before labels were capped) renders `unpriced`.
        self._models = None if models is None else frozenset(models)
        self._budgets = budgets
        self._labels = list(metric_labels)
        self._lag = lag
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, list[tuple[dict[str, str], int]]] = {}
        self.refreshed_at: datetime | None = None

    def refresh_if_older(self, seconds: float) -> None:
        """Refresh unless the snapshot is younger than `seconds`; keep the old one if the database is away."""
        taken = self.refreshed_at
        if taken is not None and (self._clock() - taken).total_seconds() < seconds:
            return
        try:
            self.refresh()
        except SQLAlchemyError as exc:
            log.warning("metrics: counters unavailable, serving the snapshot of %s: %s", taken, exc.__class__.__name__)

    def refresh(self) -> None:
        """Read every counter from the database into the snapshot, its labels bounded as the write path bounds them."""
        rows: dict[str, dict[tuple[tuple[str, str], ...], int]] = defaultdict(lambda: defaultdict(int))
        with self._engine.connect() as connection:
            admitted = read_admitted(connection)
            for name, labels, value in connection.execute(select(counters.c.name, counters.c.labels, counters.c.value)):
                bounded = self._bound(name, json.loads(labels), admitted)
                rows[name][tuple(sorted(bounded.items()))] += int(value)
        snapshot = {name: [(dict(key), value) for key, value in found.items()] for name, found in rows.items()}
        with self._lock:
            self._counters = snapshot
            self.refreshed_at = self._clock()

    def _bound(self, name: str, labels: dict[str, str], admitted: dict[str, frozenset[str]]) -> dict[str, str]:
        """Counters are written with bounded labels already; this keeps rows written before that bounded too."""
        if name == UNPRICED_EVENTS:
            value = labels.get("model", "")
            if value not in FREE_VALUES and value not in admitted.get(UNPRICED_LABEL, ()):
                labels["model"] = OTHER
            return labels
        model = labels.get("model")
        if model is not None and self._models is not None and model != UNPRICED and model not in self._models:
            labels["model"] = UNPRICED
        if name in USAGE_COUNTERS:
            for key in self._labels:
                value = labels.get(key, "")
                if value not in FREE_VALUES and value not in admitted.get(key, ()):
                    labels[key] = OTHER
        return labels

    def _project(self, name: str, keys: Sequence[str]) -> dict[tuple[str, ...], int]:
        """Sum a counter's rows onto the label names in use now (rows written under older settings included)."""
        out: dict[tuple[str, ...], int] = defaultdict(int)
        for labels, value in self._counters.get(name, []):
            out[tuple(labels.get(key, "") for key in keys)] += value
        return out

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports (so registration does not query the database)."""
        yield from self._families(describe_only=True)

    def collect(self) -> Iterator[Metric]:
        """Every family with its samples."""
        self.refresh_if_older(1.0)
        yield from self._families(describe_only=False)

    def _families(self, describe_only: bool) -> Iterator[Metric]:
        usage_keys = ["model", *self._labels]
        cost = CounterMetricFamily(
            "claude_cost_usd", "Cost of accepted requests in USD (priced at ingest).", labels=usage_keys
        )
        tokens = CounterMetricFamily(
            "claude_tokens", "Tokens of accepted requests by type.", labels=["model", "type", *self._labels]
        )
        requests = CounterMetricFamily("claude_requests", "Accepted requests.", labels=usage_keys)
        errors = CounterMetricFamily(
            "claude_request_errors", "Requests that failed, by HTTP status.", labels=["model", "status"]
        )
        duration = HistogramMetricFamily(
            "claude_request_duration_seconds", "Request latency from latency_ms.", labels=["model"]
        )
        ingest = CounterMetricFamily(
            "claude_monitor_ingest_events", "Ingested lines and events by outcome.", labels=["source", "outcome"]
        )
        unpriced = CounterMetricFamily(
            "claude_monitor_unpriced_events", "Accepted events with no price.", labels=["model"]
        )
        repriced = CounterMetricFamily(
            "claude_monitor_repriced_events",
            "Events stored unpriced and priced later, once the price table knew their model, by price-table name.",
            labels=["model"],
        )
        late = CounterMetricFamily(
            "claude_monitor_late_events",
            "Accepted events ingested 5 minutes or more after their timestamp (a backfill or a catch-up), by how late.",
            labels=["lateness"],
        )
        dropped = CounterMetricFamily(
            "claude_monitor_attributes_dropped",
            "Attribute values dropped (not a configured dimension, or not a scalar).",
            labels=["source"],
        )
        lag = GaugeMetricFamily(
            "claude_monitor_ingest_lag_seconds",
            "Age of the oldest complete line not yet ingested, by source.",
            labels=["source"],
        )
        gauges = {
            "limit": GaugeMetricFamily("claude_budget_limit_usd", "Budget limit in USD.", labels=["budget", "scope"]),
            "spend": GaugeMetricFamily(
                "claude_budget_spend_usd", "Spend in the budget's current window.", labels=["budget", "scope"]
            ),
            "util": GaugeMetricFamily(
                "claude_budget_utilization_ratio", "Amount / limit in the budget's unit.", labels=["budget", "scope"]
            ),
            "forecast": GaugeMetricFamily(
                "claude_budget_forecast_usd", "Forecast spend at the window's end.", labels=["budget", "scope"]
            ),
            "end": GaugeMetricFamily(
                "claude_budget_window_end_timestamp_seconds", "End of the current window.", labels=["budget", "scope"]
            ),
            "throttle": GaugeMetricFamily(
                "claude_throttle_active", "1 while the scope is throttled.", labels=["budget", "scope"]
            ),
        }
        throttled = GaugeMetricFamily(
            "claude_budget_scopes_throttled", "Throttled scopes of each budget.", labels=["budget"]
        )
        scopes = GaugeMetricFamily(
            "claude_budget_scopes", "Scopes with usage in the current window.", labels=["budget"]
        )
        age = GaugeMetricFamily(
            "claude_monitor_state_age_seconds", "Seconds since the last successful budget evaluation."
        )
        threshold = GaugeMetricFamily(
            "claude_budget_alert_threshold_ratio",
            "Each configured alert_at and throttle_at fraction of a budget.",
            labels=["budget", "threshold", "kind"],
        )
        crossed = GaugeMetricFamily(
            "claude_budget_threshold_crossed",
            "1 when the scope's utilization has reached the threshold.",
            labels=["budget", "scope", "threshold"],
        )
        over = GaugeMetricFamily(
            "claude_budget_scopes_over_threshold",
            "Scopes of each budget at or over each threshold.",
            labels=["budget", "threshold"],
        )
        families: list[Metric] = [
            cost,
            tokens,
            requests,
            errors,
            duration,
            ingest,
            unpriced,
            repriced,
            late,
            dropped,
            lag,
            *gauges.values(),
            throttled,
            scopes,
            age,
            threshold,
            crossed,
            over,
        ]
        if describe_only:
            yield from families
            return
        with self._lock:
            for values, value in self._project(COST_PICO, usage_keys).items():
                cost.add_metric(list(values), value / PICO_PER_USD)
            for values, value in self._project(TOKENS, ["model", "type", *self._labels]).items():
                tokens.add_metric(list(values), value)
            for values, value in self._project(REQUESTS, usage_keys).items():
                requests.add_metric(list(values), value)
            for values, value in self._project(REQUEST_ERRORS, ["model", "status"]).items():
                errors.add_metric(list(values), value)
            for values, value in self._project(INGEST_EVENTS, ["source", "outcome"]).items():
                ingest.add_metric(list(values), value)
            for values, value in self._project(UNPRICED_EVENTS, ["model"]).items():
                unpriced.add_metric(list(values), value)
            for values, value in self._project(REPRICED_EVENTS, ["model"]).items():
                repriced.add_metric(list(values), value)
            for values, value in self._project(LATE_EVENTS, ["lateness"]).items():
                late.add_metric(list(values), value)
            for values, value in self._project(ATTRIBUTES_DROPPED, ["source"]).items():
                dropped.add_metric(list(values), value)
            self._histogram(duration)
        for source, seconds in sorted(self._lag().items()):
            lag.add_metric([source], seconds)
        flags = self._budgets.throttle.flags
        now = self._clock()
        active: dict[str, int] = defaultdict(int)
        for (name, _key), flag in flags.items():
            active[name] += flag.active(now)
        for name, summary in self._budgets.summaries.items():
            budget = summary.budget
            throttled.add_metric([name], active.get(name, 0))
            scopes.add_metric([name], summary.scopes_total)
            for fraction in budget.thresholds:
                kinds = [
                    k
                    for k, hit in (("alert", fraction in budget.alert_at), ("throttle", fraction == budget.throttle_at))
                    if hit
                ]
                text = _fraction(fraction)
                threshold.add_metric([name, text, "+".join(kinds)], float(fraction))
                # Shown scopes include every scope at or over the lowest threshold, so these counts are whole.
                over.add_metric(
                    [name, text], sum(1 for st in summary.states.values() if budget.over(st.amount, fraction))
                )
                if budget.per is None:
                    for st in summary.states.values():
                        crossed.add_metric(
                            [name, scope_text(st.scope, ","), text], 1.0 if budget.over(st.amount, fraction) else 0.0
                        )
            if budget.per is not None:
                continue  # per-user values never become labels
            for key, state in summary.states.items():
                label = [name, scope_text(state.scope, ",")]
                if summary.budget.measure == "usd":
                    gauges["limit"].add_metric(label, summary.budget.limit / PICO_PER_USD)
                gauges["spend"].add_metric(label, state.usage.cost_pico / PICO_PER_USD)
                gauges["util"].add_metric(label, state.utilization)
                gauges["forecast"].add_metric(label, state.forecast_cost_pico / PICO_PER_USD)
                gauges["end"].add_metric(label, state.window_end.timestamp())
                scope_flag = flags.get((name, key))
                gauges["throttle"].add_metric(label, 1.0 if scope_flag is not None and scope_flag.active(now) else 0.0)
        last = self._budgets.last
        if last is not None:
            age.add_metric([], max((now - last.at).total_seconds(), 0.0))
        yield from families

    def _histogram(self, family: HistogramMetricFamily) -> None:
        bounds = LATENCY_LE
        per_model: dict[str, dict[str, int]] = defaultdict(dict)
        for labels, value in self._counters.get(LATENCY_BUCKET, []):
            per_model[labels.get("model", "")][labels.get("le", "+Inf")] = value
        sums = {labels.get("model", ""): value for labels, value in self._counters.get(LATENCY_SUM_US, [])}
        for model, counts in sorted(per_model.items()):
            running = 0
            buckets = []
            for bound in bounds:
                running += counts.get(bound, 0)
                buckets.append((bound, float(running)))
            family.add_metric([model], buckets, sums.get(model, 0) / 1e6)


# The last whole hour by event time: the four complete 15-minute buckets before the current one. Whole buckets
# only, so the value holds still for 15 minutes and is the same on every replica; a label set seen in the week
# before stays on at 0, so a rule comparing an hour with the same hour of the previous 7 days has its baseline.
HOUR_BUCKETS = 4
HOUR_SERIES_KEPT = timedelta(days=8)


class WindowCollector(Collector):
    """Event-time gauges: spend, requests and tokens of the current calendar day and month in the configured
    timezone, and of the last whole hour, by model and metric labels, summed from the rollup by the evaluate job
    (never at scrape time). Every replica reads the same rows, so every replica renders the same numbers."""

    def __init__(
        self,
        engine: Engine,
        zone: ZoneInfo,
        metric_labels: Sequence[str],
        model_label: Callable[[str], str],
        clock: Callable[[], datetime],
    ) -> None:
        self._engine = engine
        self._zone = zone
        self._labels = list(metric_labels)
        self._model_label = model_label
        self._clock = clock
        # (window, model label, metric label values) -> counts; replaced whole, never mutated.
        self._totals: dict[tuple[str, str, tuple[str, ...]], RollupCounts] = {}

    def refresh(self) -> None:
        """Sum this day's, this month's and the last whole hour's buckets (by event time) into a new snapshot."""
        now = self._clock()
        day = calendar_window("day", now, self._zone)
        month = calendar_window("month", now, self._zone)
        hour_end = bucket_of(now)
        hour = (hour_end - HOUR_BUCKETS * BUCKET, hour_end)
        totals: dict[tuple[str, str, tuple[str, ...]], RollupCounts] = {}
        with self._engine.connect() as connection:
            for in_day, model, text, counts in window_totals(connection, month, day):
                key = self._key(model, text)
                for window in ("day", "month") if in_day else ("month",):
                    totals.setdefault((window, *key), RollupCounts()).add(counts)
                # A series seen this month stays on through the month, at 0 for a day without usage.
                totals.setdefault(("day", *key), RollupCounts())
            for in_hour, model, text, counts in window_totals(connection, (hour[0] - HOUR_SERIES_KEPT, hour[1]), hour):
                found = totals.setdefault(("1h", *self._key(model, text)), RollupCounts())
                if in_hour:
                    found.add(counts)
        self._totals = totals

    def _key(self, model: str, text: str) -> tuple[str, tuple[str, ...]]:
        labels = json.loads(text)
        return self._model_label(model), tuple(labels.get(name) or "" for name in self._labels)

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports."""
        yield from self._families({})

    def collect(self) -> Iterator[Metric]:
        """The families with the last snapshot's samples."""
        yield from self._families(self._totals)

    def _families(self, totals: dict[tuple[str, str, tuple[str, ...]], RollupCounts]) -> Iterator[Metric]:
        keys = ["window", "model", *self._labels]
        windows = (
            "the current calendar day or month of the configured timezone (window day, month), or in the last "
            "whole hour (window 1h: the four complete 15-minute buckets before the current one)"
        )
        spend = GaugeMetricFamily(
            "claude_spend_window_usd", f"Spend (USD) of requests stamped in {windows}.", labels=keys
        )
        requests = GaugeMetricFamily("claude_requests_window", f"Requests stamped in {windows}.", labels=keys)
        tokens = GaugeMetricFamily(
            "claude_tokens_window",
            f"Tokens by type of requests stamped in {windows}.",
            labels=["window", "model", "type", *self._labels],
        )
        for (window, model, values), counts in sorted(totals.items()):
            spend.add_metric([window, model, *values], counts.cost_pico / PICO_PER_USD)
            requests.add_metric([window, model, *values], counts.requests)
            for kind in TOKEN_TYPES:
                tokens.add_metric([window, model, kind, *values], getattr(counts, kind))
        yield from (spend, requests, tokens)


class SourcesCollector(Collector):
    """`claude_monitor_source_info{source,kind}`: the ingest sources this process serves — its tailed files
    (kind jsonl) and POST /v1/usage (kind http, while an ingest token is set). A one-shot `ingest` of a file is not
    one: its counters stay in the database, but nothing expects more events from it."""

    def __init__(self, sources: Sequence[tuple[str, str]]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        """One series at 1 per (source, kind)."""
        family = GaugeMetricFamily(
            "claude_monitor_source_info",
            "1 for each ingest source this process serves: configured tailers (jsonl) and POST /v1/usage (http).",
            labels=["source", "kind"],
        )
        for source, kind in self._sources:
            family.add_metric([source, kind], 1.0)
        yield family


class SnapshotErrorsCollector(Collector):
    """`claude_monitor_snapshot_errors_total`: failed writes of the throttle snapshot file by this process."""

    def __init__(self, throttle: ThrottleState) -> None:
        self._throttle = throttle

    def collect(self) -> Iterator[Metric]:
        """The one counter, read from the throttle state at scrape time."""
        family = CounterMetricFamily(
            "claude_monitor_snapshot_errors",
            "Throttle snapshot file writes that failed (checks go on from memory; proxies reading the file see "
            "an older state).",
        )
        family.add_metric([], float(self._throttle.snapshot_errors))
        yield family


class AdmissionCollector(Collector):
    """Admission outcomes, calls in flight per limit, and what open leases reserve against budgets without per:.

    Outcomes are this process's own decisions; the gauges come from where the leases are: this process's memory, or
    the database when admission state lives there (then every replica reports the same).
    """

    OUTCOMES = ("admitted", "rate_limited", "concurrency", "too_large", "budget")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        """Read at scrape time from the admission state (in memory: a lock held for a copy; in the database: one
        grouped read of the unexpired holds)."""
        stats = self._admission.stats()
        total = CounterMetricFamily(
            "claude_admission",
            "Admission decisions: per limit (or budget) that decided, by outcome; an admitted call counts once "
            "under every limit it matched.",
            labels=["limit", "outcome"],
        )
        for limit in self._admission.limits:
            total.add_metric([limit.name, "admitted"], float(stats.outcomes.get((limit.name, "admitted"), 0)))
        for (name, outcome), value in sorted(stats.outcomes.items()):
            if outcome != "admitted":
                total.add_metric([name, outcome], float(value))
        yield total
        inflight = GaugeMetricFamily(
            "claude_admission_inflight",
            "Calls holding a concurrency slot of the limit (all its scopes).",
            labels=["limit"],
        )
        for name, value in sorted(stats.inflight.items()):
            inflight.add_metric([name], float(value))
        yield inflight
        reserved = GaugeMetricFamily(
            "claude_budget_reserved_usd",
            "Worst-case cost that calls in flight reserve against a budget (budgets without per:); never spend.",
            labels=["budget", "scope"],
        )
        shown = {(budget.name, scope_key(dict(budget.match))): 0 for budget in self._admission.reserving_budgets}
        for (budget_name, key), pico in sorted({**shown, **stats.reserved_pico}.items()):
            reserved.add_metric([budget_name, scope_text(json.loads(key), ",")], pico / PICO_PER_USD)
        yield reserved
        leases = GaugeMetricFamily("claude_admission_open_leases", "Leases open now (admitted, not yet settled).")
        leases.add_metric([], float(stats.open_leases))
        yield leases
        memory = GaugeMetricFamily(
            "claude_admission_memory_entries",
            "What admission keeps in memory, by kind (buckets, spend_scopes, settled_leases, stored_requests); each "
            "is bounded by its admission.max_* key.",
            labels=["kind"],
        )
        for kind, value in sorted(stats.memory.items()):
            memory.add_metric([kind], float(value))
        yield memory
        forgiven = CounterMetricFamily(
            "claude_admission_buckets_forgiven",
            "Token buckets dropped before they were full to stay within admission.max_buckets (their scopes start "
            "again on full buckets).",
        )
        forgiven.add_metric([], float(stats.buckets_forgiven))
        yield forgiven


class DefinitionsCollector(Collector):
    """`claude_monitor_budget_definitions_mismatched` and `claude_monitor_budget_definition_mismatch{budget,change}`:
    budgets this replica's config defines differently from the database, which it therefore leaves alone."""

    def __init__(self, mismatched: Callable[[], Sequence[DefinitionChange]]) -> None:
        self._mismatched = mismatched

    def collect(self) -> Iterator[Metric]:
        """The count (0 when the config agrees) and one series per differing budget, at scrape time."""
        changes = list(self._mismatched())
        count = GaugeMetricFamily(
            "claude_monitor_budget_definitions_mismatched",
            "Budgets whose definition in this replica's config differs from the one stored in the database "
            "(new, changed or removed); only the leader applies definitions, so this replica leaves them alone.",
        )
        count.add_metric([], float(len(changes)))
        yield count
        each = GaugeMetricFamily(
            "claude_monitor_budget_definition_mismatch",
            "1 for each budget this replica's config defines differently from the database, by how it differs.",
            labels=["budget", "change"],
        )
        for change in changes:
            each.add_metric([change.budget, change.change], 1.0)
        yield each


class PriceCheckCollector(Collector):
    """claude_monitor_price_table_missing_models: how many models Anthropic's Models API lists that the price table
    cannot price, as of the last check this replica ran (no sample before one has)."""

    def __init__(self, missing: Callable[[], int | None]) -> None:
        self._missing = missing

    def collect(self) -> Iterator[Metric]:
        """The gauge, from the last check's result."""
        family = GaugeMetricFamily(
            "claude_monitor_price_table_missing_models",
            "Models the account can call (Models API) that the price table cannot price, at the last check.",
        )
        missing = self._missing()
        if missing is not None:
            family.add_metric([], missing)
        yield family


class LeaderCollector(Collector):
    """`claude_monitor_leader`: 1 on the replica that runs the leader-only jobs, 0 on the others."""

    def __init__(self, leading: Callable[[], bool]) -> None:
        self._leading = leading

    def collect(self) -> Iterator[Metric]:
        """This replica's last known leadership, read at scrape time (asked again at every evaluation)."""
        family = GaugeMetricFamily(
            "claude_monitor_leader",
            "1 while this replica holds leadership and runs notifications, retention and reconcile; 0 otherwise. "
            "Summed over replicas it is 1.",
        )
        family.add_metric([], 1.0 if self._leading() else 0.0)
        yield family


class IngestQueueCollector(Collector):
    """`claude_monitor_ingest_requests{state}`: HTTP ingest requests of this process waiting for the writer and in
    the transactions being written (group commit puts every waiting request in the next transaction)."""

    def __init__(self, queue: Callable[[], tuple[int, int]]) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        """The two values, read at scrape time."""
        waiting, writing = self._queue()
        family = GaugeMetricFamily(
            "claude_monitor_ingest_requests",
            "POST /v1/usage requests parsed and waiting for the writer (state=waiting) or in the transactions "
            "being written now (state=writing).",
            labels=["state"],
        )
        family.add_metric(["waiting"], float(waiting))
        family.add_metric(["writing"], float(writing))
        yield family


class ReconcileCollector(Collector):
    """Reconciliation gauges for the latest settled UTC day a fetch covered, from the database (every replica renders
    the same), refreshed by a scheduled job, never at scrape time."""

    def __init__(self, reconciler: Reconciler, model_label: Callable[[str], str], interval_seconds: float) -> None:
        self._reconciler = reconciler
        self._model_label = model_label
        self._interval = interval_seconds
        self.snapshot: Snapshot | None = None

    def refresh(self) -> None:
        """Read the latest settled day's comparison and the newest fetch's time into a new snapshot."""
        self.snapshot = self._reconciler.snapshot()

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports."""
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        """The families with the last snapshot's samples."""
        yield from self._families(self.snapshot)

    def _families(self, snapshot: Snapshot | None) -> Iterator[Metric]:
        drift = GaugeMetricFamily(
            "claude_reconcile_drift_ratio",
            "(Anthropic's list-price cost - ours) / Anthropic's, by model, on the latest settled UTC day reconciled.",
            labels=["model"],
        )
        unlogged = GaugeMetricFamily(
            "claude_reconcile_unlogged_requests",
            "Requests Anthropic counted that we never logged, by model, on the latest settled UTC day reconciled.",
            labels=["model"],
        )
        day = GaugeMetricFamily(
            "claude_reconcile_day_timestamp_seconds", "Start (UTC) of the day the reconcile gauges describe."
        )
        last = GaugeMetricFamily(
            "claude_reconcile_last_success_timestamp_seconds",
            "When Anthropic's figures were last fetched and stored (any replica).",
        )
        tolerance = GaugeMetricFamily(
            "claude_reconcile_tolerance_ratio", "reconcile.tolerance: a drift above it on a settled day is a finding."
        )
        interval = GaugeMetricFamily("claude_reconcile_interval_seconds", "reconcile.every: how often it runs.")
        enabled = GaugeMetricFamily(
            "claude_reconcile_enabled", "1 when this replica has the admin key: it fetches whenever it leads."
        )
        families: list[Metric] = [drift, unlogged, day, last, tolerance, interval, enabled]
        if snapshot is not None:
            enabled.add_metric([], 1.0 if self._reconciler.enabled else 0.0)
            tolerance.add_metric([], float(self._reconciler.config.tolerance))
            interval.add_metric([], self._interval)
            if snapshot.last_success is not None:
                last.add_metric([], snapshot.last_success.timestamp())
            if snapshot.day is not None:
                day.add_metric([], datetime(*snapshot.day.timetuple()[:3], tzinfo=UTC).timestamp())
            theirs: dict[str, Decimal] = defaultdict(Decimal)
            drifts: dict[str, Decimal] = defaultdict(Decimal)
            missing: dict[str, int] = defaultdict(int)
            for row in snapshot.rows:
                model = self._model_label(row.model)
                theirs[model] += row.anthropic_usd
                drifts[model] += row.drift_usd
                missing[model] += row.missing_requests or 0
            for model in sorted(missing):
                if theirs[model] != 0:
                    drift.add_metric([model], float(drifts[model] / theirs[model]))
                elif drifts[model] != 0:
                    drift.add_metric([model], float("-inf") if drifts[model] < 0 else float("inf"))
                else:
                    drift.add_metric([model], 0.0)
                unlogged.add_metric([model], missing[model])
        yield from families


PROXY_ADMISSION_OUTCOMES = ("admitted", "rate_limited", "concurrency", "too_large", "budget", "unavailable")


class ProxyMetrics:
    """The reference proxy's own metrics, on a registry of its own (served at the proxy's `/metrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.admission = Counter(
            "claude_proxy_admission",
            "POST /v1/messages calls by what admission said: admitted, rate_limited, concurrency, too_large, "
            "budget, or unavailable (the daemon could not answer; fail_mode decided).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in PROXY_ADMISSION_OUTCOMES:
            self.admission.labels(outcome)
        self.fail_mode = Counter(
            "claude_proxy_fail_mode_decisions",
            "Calls that proxy.fail_mode decided because the daemon could not (stage: check or admit; decision: "
            "allowed or denied).",
            ["stage", "decision"],
            registry=self.registry,
        )
        for stage in ("check", "admit"):
            for decision in ("allowed", "denied"):
                self.fail_mode.labels(stage, decision)
        self.renewals = Counter(
            "claude_proxy_lease_renewals",
            "Lease renewals of running calls: renewed, ended (the daemon no longer held the lease), failed.",
            ["result"],
            registry=self.registry,
        )
        for result in ("renewed", "ended", "failed"):
            self.renewals.labels(result)
        self.leases = Gauge(
            "claude_proxy_leases_held",
            "Admission leases held by calls running through this proxy now.",
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "claude_proxy_upstream_latency_seconds",
            "Time from sending a call to Anthropic to its response headers, by route (messages, count_tokens).",
            ["route"],
            buckets=PROXY_LATENCY_BUCKETS,
            registry=self.registry,
        )
        for route in ("messages", "count_tokens"):
            self.upstream_latency.labels(route)
        self.count_tokens = Counter(
            "claude_proxy_count_tokens",
            "Calls whose input was counted upstream before admission (proxy.count_tokens): ok, or fallback (no "
            "count in time: admitted on the byte bound).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("ok", "fallback"):
            self.count_tokens.labels(outcome)

    def render(self) -> bytes:
        """The text exposition of every proxy metric."""
        return generate_latest(self.registry)
