"""The schema: usage events priced at ingest, and the dead-letter table of rejected input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
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


events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("request_id", String(255), nullable=False, unique=True),
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
# same transaction as the events it counts, so evaluation reads scopes, never the events table.
budget_usage = Table(
    "budget_usage",
    metadata,
    Column("budget", String(128), primary_key=True),
    Column("scope", String(1024), primary_key=True, comment="canonical JSON of the scope's dimensions"),
    Column("bucket_start", UTCDateTime(), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("input", BigInteger, nullable=False),
    Column("output", BigInteger, nullable=False),
    Column("cache_read", BigInteger, nullable=False),
    Column("cache_write_5m", BigInteger, nullable=False),
    Column("cache_write_1h", BigInteger, nullable=False),
    Column("cost_pico", BigInteger, nullable=False),
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
