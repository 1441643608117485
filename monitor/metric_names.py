"""Names of the stored counters (the write path adds to them, the collector renders them) and histogram buckets.

Both sides import these, so a misspelt counter is an import error instead of a metric that silently stays at 0.
"""

from __future__ import annotations

# Rows of the counters table, by `name`; each renders as the metric family after it.
REQUESTS = "requests"  # claude_requests_total
COST_PICO = "cost_pico"  # claude_cost_usd_total (pico-dollars stored, USD shown)
TOKENS = "tokens"  # claude_tokens_total
REQUEST_ERRORS = "request_errors"  # claude_request_errors_total
LATENCY_COUNT = "latency_count"  # claude_request_duration_seconds: events that reported a latency
LATENCY_SUM_US = "latency_sum_us"  # claude_request_duration_seconds_sum, in microseconds
LATENCY_BUCKET = "latency_bucket"  # claude_request_duration_seconds_bucket, per bucket (not cumulative)
INGEST_EVENTS = "ingest_events"  # claude_monitor_ingest_events_total
ATTRIBUTES_DROPPED = "attributes_dropped"  # claude_monitor_attributes_dropped_total
UNPRICED_EVENTS = "unpriced_events"  # claude_monitor_unpriced_events_total
REPRICED_EVENTS = "repriced_events"  # claude_monitor_repriced_events_total
LATE_EVENTS = "late_events"  # claude_monitor_late_events_total
USAGE_COUNTERS = frozenset({REQUESTS, COST_PICO, TOKENS})  # the counters labelled by `metrics.labels`
UNPRICED_LABEL = "model"  # the gated label of claude_monitor_unpriced_events_total (never a dimension's name)

# claude_request_duration_seconds buckets (seconds), and their `le` label values as stored.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_LE = (*map(repr, LATENCY_BUCKETS), "+Inf")
# claude_monitor_job_duration_seconds buckets (seconds): scheduled jobs, from a quick evaluation to a slow backfill.
JOB_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# claude_proxy_upstream_latency_seconds buckets (seconds): a streamed answer can run for minutes.
PROXY_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
