"""The schema: usage events priced at ingest, and the dead-letter table of rejected input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import DateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC instant: stored without zone (same text on SQLite, same timestamp on PostgreSQL), read back UTC-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


# Which databases a table or constraint exists on, when not all: `info={DIALECTS: (...)}`. Schema comparison
# (migrations/env.py) skips an object on the others, and so does DDL emitted from this metadata (`ddl_if`).
DIALECTS = "dialects"


def exists_on(item: Any, dialect: str) -> bool:
    """Whether a metadata table, constraint or index exists on `dialect` (see DIALECTS)."""
    wanted = getattr(item, "info", {}).get(DIALECTS)
    return wanted is None or dialect in wanted


# One row per stored usage event. On PostgreSQL the table is partitioned by month of `ts` (declarative
# partitioning, a DEFAULT partition for months without their own; see monitor/store/partitions.py) and its primary
# key is (id, ts), as a partitioned table's unique keys must hold the partition key: the unique request_id is then
# kept in `event_ids`. SQLite keeps one table with the unique key on request_id.
events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(255), nullable=False),
    Column("ts", UTCDateTime(), nullable=False, comment="the request's own timestamp (UTC)"),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("source", String(255), nullable=False),
    Column("model_id", String(255), nullable=False, comment="the model id as the event carried it"),
    Column("model", String(255), nullable=False, comment="price-table name; the id as sent when unknown"),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cache_read_tokens", BigInteger, nullable=False),
    Column("cache_write_5m_tokens", BigInteger, nullable=False),
    Column("cache_write_1h_tokens", BigInteger, nullable=False),
    Column("web_search_requests", Integer, nullable=False),
    Column("web_fetch_requests", Integer, nullable=False),
    Column("batch", Boolean, nullable=False),
    Column("long_prompt", Boolean, nullable=False),
    Column("service_tier", String(32)),
    Column("speed", String(32)),
    Column("inference_geo", String(32)),
    Column("status", Integer),
    Column("latency_ms", Float),
    Column("attributes", JSON, nullable=False),
    Column("cost_pico", BigInteger, comment="cost in 10^-12 USD; NULL = unpriced (unknown model)"),
    Column("price_version", String(128), comment="the rates used: table version, model and since date"),
    Index("ix_events_ts", "ts"),
    Index("ix_events_model_ts", "model", "ts"),
    # Only the events of models the table did not know when they arrived: re-pricing reads them by model id.
    Index(
        "ix_events_unpriced_model_id",
        "model_id",
        sqlite_where=text("cost_pico IS NULL"),
        postgresql_where=text("cost_pico IS NULL"),
    ),
    UniqueConstraint("request_id", info={DIALECTS: ("sqlite",)}).ddl_if(dialect="sqlite"),
    postgresql_partition_by="RANGE (ts)",
)

# PostgreSQL only: the request_ids of the stored events, one row each, unpartitioned so its primary key makes a
# request_id stored once whatever month its timestamp is in. A batch claims its ids here (INSERT … ON CONFLICT DO
# NOTHING RETURNING) and stores the events of the ids it claimed; retention deletes the ids of the events it drops.
event_ids = Table(
    "event_ids",
    metadata,
    Column("request_id", String(255), primary_key=True),
    Column("ts", UTCDateTime(), nullable=False, comment="the stored event's timestamp: which partition holds it"),
    info={DIALECTS: ("postgresql",)},
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("source", String(255), nullable=False),
    Column("location", String(1024), nullable=False, comment="file:line, or the HTTP body index"),
    Column("reason", Text, nullable=False),
    Column("raw", Text, nullable=False, comment="the rejected text, Anthropic keys replaced by fingerprints"),
    Column("request_id", String(255)),
    Column(
        "fingerprint",
        String(64),
        nullable=False,
        unique=True,
        comment="sha256 of source, location and raw: the same bad line read twice is kept once",
    ),
    Index("ix_dead_letters_received_at", "received_at"),
)

# Spend per budget scope per window bucket (a calendar window's start, or a rolling bucket), maintained in the
# same transaction as the events it counts, so evaluation reads scopes, never the events table. Keyed (budget,
# period, scope, bucket_start). On SQLite a calendar budget's period is its window's start, so the rows of the
# windows in force lie together and a batch's upserts land on few pages (keyed by scope first, a batch touching
# thousands of users dirtied a page per user); a rolling budget's period is USAGE_EPOCH, its rows by scope, each
# scope's buckets together. On PostgreSQL every row's period is USAGE_EPOCH (measured faster there; see
# queries.usage_period), as is every row stored before periods existed: reads ask for every period a window's
# rows may have (queries.usage_periods).
USAGE_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
budget_usage = Table(
    "budget_usage",
    metadata,
    Column("budget", String(128), nullable=False),
    Column("scope", String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
    Column("bucket_start", UTCDateTime(), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("input", BigInteger, nullable=False),
    Column("output", BigInteger, nullable=False),
    Column("cache_read", BigInteger, nullable=False),
    Column("cache_write_5m", BigInteger, nullable=False),
    Column("cache_write_1h", BigInteger, nullable=False),
    Column("cost_pico", BigInteger, nullable=False),
    Column(
        "period",
        UTCDateTime(),
        nullable=False,
        comment="on SQLite a calendar window's start (= bucket_start); otherwise 1970-01-01",
    ),
    PrimaryKeyConstraint("budget", "period", "scope", "bucket_start"),
    Index("ix_budget_usage_budget_bucket_start", "budget", "bucket_start"),
)

# What each budget's counted rows were built for: a changed definition (match, per, window) is recounted.
budget_definitions = Table(
    "budget_definitions",
    metadata,
    Column("budget", String(128), primary_key=True),
    Column("definition", String(64), nullable=False),
    Column("counted_since", UTCDateTime(), nullable=False, comment="events from here on are in budget_usage"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Monotonic counters behind the Prometheus metrics, kept in the database so they survive restarts and agree
# across replicas; `labels` is canonical JSON.
counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("labels", String(1024), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# The values admitted into each metric label: a `metrics.labels` dimension, or `model` for the ids of models the
# price table does not know (claude_monitor_unpriced_events_total). The first values seen take the slots, up to the
# configured cap; a value is never removed, so a series never moves, and every replica reads the same list. Slots
# number the admissions from 0 and are unique per label: two writers can never both take the last one.
label_values = Table(
    "label_values",
    metadata,
    Column("label", String(64), primary_key=True),
    Column("value", String(255), primary_key=True),
    Column("slot", Integer, nullable=False, comment="admission order from 0; always below the label's cap"),
    Column("admitted_at", UTCDateTime(), nullable=False),
    UniqueConstraint("label", "slot"),
)

# Usage by event time, kept past raw-event retention: one row per 15-minute UTC bucket (every zone's day and month
# begin on a quarter hour), model, service tier, status class and the `metrics.labels` values, so a day or a month
# in any timezone is a sum of whole buckets. Maintained in the same transaction as the events it counts. `model` is
# the price-table name, or for an unknown model the id as sent while it has an unpriced-model slot (else
# `__other__`); `labels` is canonical JSON of each metric label's value as admitted (`__other__` past the cap, null
# when the event had no such attribute), so a bucket holds a bounded number of rows.
usage_rollup = Table(
    "usage_rollup",
    metadata,
    Column("bucket_start", UTCDateTime(), primary_key=True, comment="UTC start of the 15-minute bucket"),
    Column("model", String(255), primary_key=True),
    Column("service_tier", String(16), primary_key=True, comment="standard | priority | batch"),
    Column("status_class", String(8), primary_key=True, comment="ok (no status or < 400) | error (>= 400)"),
    Column("labels", String(1024), primary_key=True, comment="canonical JSON of the metric label values"),
    Column("requests", BigInteger, nullable=False),
    Column("input", BigInteger, nullable=False),
    Column("output", BigInteger, nullable=False),
    Column("cache_read", BigInteger, nullable=False),
    Column("cache_write_5m", BigInteger, nullable=False),
    Column("cache_write_1h", BigInteger, nullable=False),
    Column("web_search_requests", BigInteger, nullable=False),
    Column("cost_pico", BigInteger, nullable=False, comment="10^-12 USD of the priced requests"),
    Column("unpriced_requests", BigInteger, nullable=False),
)

# Where each tailed file was read up to, written in the same transaction as the events read from it.
source_offsets = Table(
    "source_offsets",
    metadata,
    Column("source", String(255), primary_key=True),
    Column("file_id", String(128), primary_key=True, comment="device:inode:hash of the first bytes"),
    Column("path", String(1024), nullable=False),
    Column("offset", BigInteger, nullable=False, comment="byte after the last complete line read"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# The daemon's own notifier. One row per notice: a budget scope crossing one of its thresholds (or forecast to
# pass its limit, or throttled) in one window. The unique key is what makes a notice go out once per window, also
# across restarts; `status` turns from firing to resolved when the window resets. The facts are those last known.
alert_notices = Table(
    "alert_notices",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("budget", String(128), nullable=False),
    Column("scope", String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
    Column("window_start", UTCDateTime(), nullable=False, comment="for a rolling window: when the episode began"),
    Column("kind", String(16), nullable=False, comment="threshold | forecast | throttle"),
    Column("threshold", String(32), nullable=False, comment="fraction of the limit as decimal text; 1 for forecast"),
    Column("window_end", UTCDateTime(), nullable=False),
    Column("status", String(16), nullable=False, comment="firing | resolved"),
    Column("measure", String(16), nullable=False, comment="usd, requests or a token type"),
    Column("limit_amount", BigInteger, nullable=False, comment="the limit in the measure's unit (pico-USD for usd)"),
    Column("amount", BigInteger, nullable=False, comment="spent in the measure's unit"),
    Column("spend_pico", BigInteger, nullable=False),
    Column("forecast_amount", BigInteger, nullable=False),
    Column("forecast_pico", BigInteger, nullable=False),
    Column("fired_at", UTCDateTime(), nullable=False),
    Column("first_sent_at", UTCDateTime(), comment="first delivery of the firing notice to any webhook"),
    Column("resolved_at", UTCDateTime()),
    Column("resolved_sent_at", UTCDateTime(), comment="first delivery of the resolved notice to any webhook"),
    Column("per", String(64), comment="a per: budget's dimension: an aggregated notice"),
    Column("scopes_over", Integer, comment="aggregated: scopes at or over the threshold"),
    Column("top", Text, comment="aggregated: JSON list of the biggest scopes"),
    Column("updated_at", UTCDateTime(), comment="aggregated: facts last sent as an update"),
    Column("superseded_by", String(32), comment="the higher threshold that resolved it"),
    UniqueConstraint("budget", "scope", "window_start", "kind", "threshold"),
    Index("ix_alert_notices_status_resolved_at", "status", "resolved_at"),
)

# Delivery of each notice's firing and resolved messages to each webhook, retried independently with backoff.
alert_deliveries = Table(
    "alert_deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("notice_id", Id, ForeignKey("alert_notices.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(16), nullable=False, comment="the message: firing | resolved"),
    Column("webhook", String(64), nullable=False, comment="digest of kind and URL (a webhook URL is a secret)"),
    Column("state", String(16), nullable=False, comment="pending | sent | failed | superseded"),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("last_error", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime()),
    UniqueConstraint("notice_id", "status", "webhook"),
    Index("ix_alert_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
)

# Anthropic's own figures (Usage and Cost Analytics API) per UTC day, model (its price-table name when the table
# knows it) and service tier, API products only. A fetch replaces every day of its range in one transaction.
reconcile_figures = Table(
    "reconcile_figures",
    metadata,
    Column("day", Date(), primary_key=True, comment="UTC day"),
    Column("model", String(255), primary_key=True, comment="price-table name; Anthropic's name when unknown"),
    Column("service_tier", String(16), primary_key=True, comment="standard | priority | batch"),
    Column(
        "api_key_id",
        String(255),
        primary_key=True,
        comment="Anthropic's API key id (apikey_…); '' no key; '*' not grouped by key",
    ),
    Column("list_amount_cents", String(64), nullable=False, comment="list price (pre-discount), decimal cents"),
    Column("amount_cents", String(64), nullable=False, comment="after discounts, decimal cents"),
    Column("currency", String(8), nullable=False),
    Column("requests", BigInteger, comment="NULL when Anthropic did not count them"),
    Column("input", BigInteger, nullable=False, comment="uncached input tokens"),
    Column("output", BigInteger, nullable=False),
    Column("cache_read", BigInteger, nullable=False),
    Column("cache_write_5m", BigInteger, nullable=False),
    Column("cache_write_1h", BigInteger, nullable=False),
    Column("web_search_requests", BigInteger, nullable=False),
    Column("fetched_at", UTCDateTime(), nullable=False),
)

# Each successful fetch: the UTC days it replaced. The newest one is claude_reconcile_last_success_timestamp_seconds.
reconcile_fetches = Table(
    "reconcile_fetches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("fetched_at", UTCDateTime(), nullable=False),
    Column("first_day", Date(), nullable=False, comment="first UTC day replaced"),
    Column("end_day", Date(), nullable=False, comment="the day after the last one replaced"),
    Column("rows", Integer, nullable=False),
    Column("data_refreshed_at", UTCDateTime(), comment="when Anthropic last refreshed the report, as it said"),
    Index("ix_reconcile_fetches_fetched_at", "fetched_at"),
)

# Admission state shared by replicas (admission.state: database). A lease is one admitted call; what it holds is in
# admission_holds, one row per limit or budget it counts toward, so a scope's calls in flight and reservations are an
# indexed sum over its unexpired holds. A lease ends once (`ended`), and is deleted by the sweep a while later.
admission_leases = Table(
    "admission_leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, comment="admit or last renewal + lease_ttl"),
    Column("model_id", String(255), nullable=False, comment="as the call asked, to price a release's usage"),
    Column("batch", Boolean, nullable=False),
    Column("estimated_input", BigInteger, nullable=False, comment="input tokens taken from input-token buckets"),
    Column("reserved_pico", BigInteger, nullable=False, comment="the worst case admit answered"),
    Column("request_id", String(255), comment="named by POST /v1/release: its usage event settles the lease"),
    Column("released_at", UTCDateTime(), comment="slots returned; budget holds are the call's actual usage"),
    Column("ended", String(16), comment="usage event | release | expired; NULL while it holds something"),
    Column("ended_at", UTCDateTime()),
    Index("ix_admission_leases_request_id", "request_id"),
    Index("ix_admission_leases_expires_at", "expires_at"),
)

admission_holds = Table(
    "admission_holds",
    metadata,
    Column("lease", String(64), ForeignKey("admission_leases.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(8), primary_key=True, comment="slot | budget | itpm (input tokens taken from a bucket)"),
    Column("name", String(128), primary_key=True, comment="the limit or budget"),
    Column("scope", String(1024), nullable=False, comment="canonical JSON of the scope's dimensions"),
    Column("amount", BigInteger, nullable=False, comment="1 | in the budget's measure (pico-USD) | input tokens"),
    Column("expires_at", UTCDateTime(), nullable=False, comment="the lease's, so sums need no join"),
    Index("ix_admission_holds_name_scope", "name", "scope", "kind", "expires_at"),
)

# Token buckets of requests_per_minute (kind rpm) and input_tokens_per_minute (itpm): the level at updated_at. A level
# above the bucket's capacity reads as full.
admission_buckets = Table(
    "admission_buckets",
    metadata,
    Column("name", String(128), primary_key=True, comment="the limit"),
    Column("scope", String(1024), primary_key=True),
    Column("kind", String(8), primary_key=True, comment="rpm | itpm"),
    Column("level", Float(53), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Input tokens a settled call did not use, to be given back to its bucket by the next admit that locks the bucket's
# scope (or the sweep): a writer storing the usage event only inserts here, so it never waits for admission.
admission_refunds = Table(
    "admission_refunds",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("scope", String(1024), nullable=False),
    Column("amount", BigInteger, nullable=False, comment="estimated minus actual input tokens (may be negative)"),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_admission_refunds_name_scope", "name", "scope"),
)
