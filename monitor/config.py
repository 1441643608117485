"""Configuration: a strict schema for `claude-monitor.yaml`, loaded into frozen settings with clear errors."""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from monitor import redaction
from monitor.yamlio import key_lines, load_yaml

DEFAULT_CONFIG_PATH = Path("claude-monitor.yaml")
ENV_PREFIX = "CLAUDE_MONITOR_"
WINDOW_HELP = "use day, week, month or rolling:<N>m|h|d (e.g. rolling:1h)"
# Dimensions with a value per person or credential: as metric labels, one series each, without bound.
HIGH_CARDINALITY_DIMENSIONS = ("user", "api_key")
ALERTMANAGER_PATH = "/api/v2/alerts"  # Alertmanager's API that takes alerts
_API_KEY_ID = re.compile(r"^apikey_[A-Za-z0-9_-]+$")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_SECONDS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the key and the reason."""


Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One problem a check found: the key it is at (a path under the checked section), why, and how the key is
    shown when not by its path (e.g. with the budget's name)."""

    loc: Loc
    reason: str
    shown: str | None = None


class Problems(ValueError):
    """Every problem a section's checks found, each at its own key: all are reported, each with its line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.shown or _shown_loc(p.loc)}: {p.reason}" for p in problems))
        self.problems = problems


def parse_duration(text: str) -> timedelta:
    """Parse '15s', '500ms', '5m', '1h', '7d' into a timedelta."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration; write a whole number and a unit: ms, s, m, h or d (e.g. 15s)")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return timedelta(seconds=float(seconds))


@dataclass(frozen=True)
class Window:
    """A budget window: a calendar period in the configured timezone, or a rolling span."""

    kind: Literal["day", "week", "month", "rolling"]
    span: timedelta | None = None

    def __str__(self) -> str:
        if self.kind != "rolling":
            return self.kind
        assert self.span is not None
        return f"rolling:{_format_span(self.span)}"


def _format_span(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_window(text: str) -> Window:
    """Parse 'day', 'week', 'month' or 'rolling:<N>m|h|d'."""
    text = text.strip()
    if text in ("day", "week", "month"):
        return Window(text)  # type: ignore[arg-type]
    if text.startswith("rolling:"):
        match = re.match(r"^(\d+)(m|h|d)$", text.removeprefix("rolling:"))
        if match and int(match.group(1)) > 0:
            return Window("rolling", timedelta(seconds=int(match.group(1)) * int(_UNIT_SECONDS[match.group(2)])))
    raise ValueError(f"{text!r} is not a window; {WINDOW_HELP}")


class _ParsedText(str):
    """Config text checked once, when loaded, and kept with what it means: later code reads the parsed value and
    cannot meet a parse error. It is still the text as written (shown and dumped as such)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls,
            core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


class Duration(_ParsedText):
    """A duration as written ('15s', '500ms', '5m', '1h', '7d'); `delta` is its length."""

    delta: timedelta

    def __new__(cls, text: str) -> Duration:
        """Parse `text`; ValueError saying how to write it when it is no duration."""
        delta = parse_duration(text)
        self = super().__new__(cls, text)
        self.delta = delta
        return self

    @property
    def seconds(self) -> float:
        """The length in seconds."""
        return self.delta.total_seconds()


class WindowText(_ParsedText):
    """A budget window as written ('day', 'week', 'month', 'rolling:1h'); `window` is its value."""

    window: Window

    def __new__(cls, text: str) -> WindowText:
        """Parse `text`; ValueError listing the windows when it is none."""
        window = parse_window(text)
        self = super().__new__(cls, text)
        self.window = window
        return self


class HostPort(_ParsedText):
    """Where to listen, as written: HOST:PORT ('127.0.0.1:9464', '[::1]:9464'); `host` has no brackets."""

    host: str
    port: int

    def __new__(cls, text: str) -> HostPort:
        """Split `text`; ValueError when it is not HOST:PORT with a port from 0 to 65535."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
        self = super().__new__(cls, text)
        self.host, self.port = host.strip("[]"), int(port)
        return self


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonNegative = Annotated[Decimal, Field(ge=0)]


class SourceConfig(_Strict):
    """One tailed source."""

    type: Literal["jsonl"] = "jsonl"
    path: str = Field(min_length=1)
    name: str | None = None

    @property
    def label(self) -> str:
        """The source's name in metrics and the dead-letter table."""
        return self.name or f"jsonl:{self.path}"


class HttpConfig(_Strict):
    """The HTTP API."""

    listen: HostPort = HostPort("127.0.0.1:9464")
    ingest_token_env: str = "CLAUDE_MONITOR_INGEST_TOKEN"
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    backlog: int = Field(default=2048, ge=1)
    header_timeout: Duration = Duration("10s")
    keepalive_timeout: Duration = Duration("30s")
    max_connections: int = Field(default=1000, gt=0)
    max_events_per_request: int = Field(default=10_000, gt=0)
    group_commit_max_events: int = Field(default=10_000, gt=0)
    ingest_process: bool = True  # parse, price and write ingest in a worker process, off the checks' interpreter
    check_require: list[str] = []
    read_token_env: str | None = None
    metrics_listen: HostPort | None = None


class MetricsConfig(_Strict):
    """Which dimensions may become Prometheus labels, and how many values each may have."""

    # Listed before `labels`, which is checked against it.
    allow_high_cardinality: list[str] = []
    labels: list[str] = ["project", "environment"]
    # Past these, new values are counted under `__other__` (the first values seen keep their series).
    max_values_per_label: int = Field(default=200, ge=1, le=100_000)
    max_unpriced_models: int = Field(default=50, ge=1, le=100_000)

    @field_validator("labels")
    @classmethod
    def _bounded(cls, value: list[str], info: ValidationInfo) -> list[str]:
        allowed = set(info.data.get("allow_high_cardinality") or ())
        unbounded = [label for label in value if label in HIGH_CARDINALITY_DIMENSIONS and label not in allowed]
        if unbounded:
            names = ", ".join(repr(label) for label in unbounded)
            raise ValueError(
                f"{names}: one value per user or key, so as metric labels one series per person, without "
                "bound (per-user spend is in `budgets` and /v1/budgets, and per: budgets cap it). Remove it, or "
                f"accept the series explicitly with metrics.allow_high_cardinality: [{', '.join(unbounded)}]"
            )
        return value


class ScheduleConfig(_Strict):
    """Scheduled jobs."""

    evaluate_every: Duration = Duration("15s")
    retention_days: int = Field(default=90, ge=1)
    # The event-time rollup outlives raw events; it must at least cover the current month.
    rollup_retention_days: int = Field(default=400, ge=32)
    # PostgreSQL: month partitions of `events` the hourly job keeps created ahead of the current one.
    partitions_ahead_months: int = Field(default=2, ge=1, le=24)


class StoreConfig(_Strict):
    """The store's bounds on what outside input may make it create."""

    # PostgreSQL: month partitions of `events` one batch may create (its other rows wait in the default partition).
    max_new_partitions_per_batch: int = Field(default=4, ge=0, le=120)


class ThrottleConfig(_Strict):
    """Throttle outputs."""

    snapshot_file: str = "./throttle.json"


class WebhookConfig(_Strict):
    """One receiver of the daemon's own notices."""

    url: str
    kind: Literal["slack", "generic", "alertmanager"] = "generic"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme: str | None = None
        host: str | None = None
        try:
            parts = urlsplit(value)
            scheme, host = parts.scheme, parts.hostname
        except ValueError:
            pass
        if scheme not in ("http", "https") or not host:
            # The URL itself is not echoed: a webhook's path is often its secret.
            raise ValueError(
                f"not an http(s) URL with a host (scheme: {scheme or 'none'}, host: {host or 'none'}); "
                "write it as https://host/path"
            )
        return value

    @model_validator(mode="after")
    def _alertmanager_path(self) -> WebhookConfig:
        parts = urlsplit(self.url)
        if self.kind == "alertmanager" and not parts.path.endswith(ALERTMANAGER_PATH):
            base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
            reason = (
                f"{redaction.webhook_url(self.url)!r}: its path is not Alertmanager's alerts API "
                f"({ALERTMANAGER_PATH}); kind alertmanager posts to {base}{ALERTMANAGER_PATH} (give that URL)"
            )
            raise Problems([Problem(("url",), reason)])
        return self


class AlertsConfig(_Strict):
    """The daemon's own notifier."""

    webhooks: list[WebhookConfig] = []
    # A `per:` budget's notice is updated at most this often while more of its scopes cross.
    digest_every: Duration = Duration("1h")  # longer than zero, as every duration


class LongPromptRates(_Strict):
    """Rates billed on every token of a request whose prompt exceeds the threshold."""

    threshold_tokens: int = Field(gt=0)
    input: NonNegative
    output: NonNegative
    cache_write_5m: NonNegative
    cache_write_1h: NonNegative
    cache_read: NonNegative


class RateConfig(_Strict):
    """A model's rates from a date on (USD per million tokens)."""

    since: date
    input: NonNegative
    output: NonNegative
    cache_write_5m: NonNegative
    cache_write_1h: NonNegative
    cache_read: NonNegative
    web_search_per_1k: NonNegative = Decimal(10)
    fast_multiplier: Annotated[Decimal, Field(gt=0)] = Decimal(1)
    geo_multipliers: dict[str, Annotated[Decimal, Field(gt=0)]] = {}
    long_prompt: LongPromptRates | None = None


class ModelPricing(_Strict):
    """One model of the price table."""

    aliases: list[str] = []
    rates: list[RateConfig] = Field(min_length=1)
    source: str | None = None  # where the rates were read, and when they were checked there (shown by `prices`)

    @field_validator("rates")
    @classmethod
    def _dates_unique(cls, rates: list[RateConfig]) -> list[RateConfig]:
        seen = [rate.since for rate in rates]
        if len(set(seen)) != len(seen):
            raise ValueError("two rates take effect on the same `since` date")
        return rates


def _url_parts(value: str) -> SplitResult | None:
    """The parts of an http(s) URL with a host; None for anything else."""
    try:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname:
            parts.port  # noqa: B018  # a port that is no number raises here
            return parts
    except ValueError:
        pass
    return None


def anthropic_base_url(value: str) -> str:
    """An Anthropic API base URL: http(s) with a host (the Models, Analytics and Messages APIs hang under it)."""
    try:
        parts = urlsplit(value)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:
        scheme, host = None, None
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"{value!r} is not an http(s) URL with a host; write it as https://api.anthropic.com")
    return value


AnthropicURL = Annotated[str, AfterValidator(anthropic_base_url)]


class PriceCheckConfig(_Strict):
    """Which models the account can call (Anthropic's Models API) against what the price table can price."""

    # The name of the environment variable holding an Anthropic API key; the key itself never appears in config.
    # The daemon runs the check only when that variable is set.
    api_key_env: str = Field(default="ANTHROPIC_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: AnthropicURL = "https://api.anthropic.com"
    every: Duration = Duration("24h")

    @field_validator("every")
    @classmethod
    def _every(cls, value: Duration) -> Duration:
        if value.delta < timedelta(minutes=5):
            raise ValueError(f"{value!r} is shorter than 5m; the model list changes a few times a year")
        return value


class PricingConfig(_Strict):
    """Entries added to, or replacing, the shipped price table."""

    models: dict[str, ModelPricing] = {}
    check: PriceCheckConfig = PriceCheckConfig()


class BudgetConfig(_Strict):
    """A billing limit over a window."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: dict[str, str] = {}
    per: str | None = None
    window: WindowText = WindowText("month")
    limit_usd: Annotated[Decimal, Field(gt=0)] | None = None
    limit_tokens: (
        dict[
            Literal["input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "total"],
            Annotated[int, Field(gt=0)],
        ]
        | None
    ) = None
    limit_requests: Annotated[int, Field(gt=0)] | None = None
    alert_at: list[Annotated[Decimal, Field(gt=0)]] = []
    throttle_at: Annotated[Decimal, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> BudgetConfig:
        limits = [x for x in (self.limit_usd, self.limit_tokens, self.limit_requests) if x is not None]
        if len(limits) != 1:
            raise ValueError("give exactly one of limit_usd, limit_tokens, limit_requests")
        if self.limit_tokens is not None and len(self.limit_tokens) != 1:
            raise ValueError(
                "limit_tokens takes one token type (input, output, cache_read, cache_write_5m, cache_write_1h or total)"
            )
        return self

    @property
    def parsed_window(self) -> Window:
        """The window as a value."""
        return self.window.window


class LimitConfig(_Strict):
    """Admission limits for the calls a scope may start: rates, calls in flight, and per-call caps."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: dict[str, str] = {}
    per: str | None = None
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    burst: Annotated[int, Field(gt=0)] | None = None
    input_tokens_per_minute: Annotated[int, Field(gt=0)] | None = None
    input_tokens_burst: Annotated[int, Field(gt=0)] | None = None
    concurrent: Annotated[int, Field(gt=0)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    max_input_tokens: Annotated[int, Field(gt=0)] | None = None
    max_request_usd: Annotated[Decimal, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _something_to_enforce(self) -> LimitConfig:
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst sizes the requests_per_minute bucket: give requests_per_minute too")
        if self.input_tokens_burst is not None and self.input_tokens_per_minute is None:
            raise ValueError(
                "input_tokens_burst sizes the input_tokens_per_minute bucket: give input_tokens_per_minute too"
            )
        if all(getattr(self, key) is None for key in LIMIT_KINDS):
            raise ValueError(f"a limit enforces nothing without one of: {', '.join(LIMIT_KINDS)}")
        return self


LIMIT_KINDS = (
    "requests_per_minute",
    "input_tokens_per_minute",
    "concurrent",
    "max_tokens",
    "max_input_tokens",
    "max_request_usd",
)


class AdmissionConfig(_Strict):
    """Leases handed out by POST /v1/admit."""

    # A lease not renewed (or settled) within this returns its slot and reservation.
    lease_ttl: Duration = Duration("10m")
    max_open_leases: int = Field(default=100_000, gt=0)  # past it admit answers 503: memory stays bounded
    # Memory the daemon keeps for admission; past each bound the entries worth least go (docs/admission.md).
    max_buckets: int = Field(default=200_000, gt=0)  # rate-limit token buckets (one per limit, scope and kind)
    max_spend_scopes: int = Field(default=200_000, gt=0)  # budget scopes whose window spend is kept
    max_settled_remembered: int = Field(default=100_000, gt=0)  # ended leases and stored request ids remembered
    # Where leases, slots, buckets and reservations live: `database` (PostgreSQL) so replicas agree and a restart
    # forgets nothing; `memory` in this process; `auto` is database on PostgreSQL and memory on SQLite.
    state: Literal["auto", "memory", "database"] = "auto"

    @field_validator("lease_ttl")
    @classmethod
    def _ttl(cls, value: Duration) -> Duration:
        if value.delta < timedelta(seconds=3):
            raise ValueError(f"{value!r} is too short: a running call renews every lease_ttl/3; use 3s or more")
        return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP token
# Headers that carry the key, the body's framing or the API's own meaning: never an identity header.
_RESERVED_HEADERS = frozenset(
    {"authorization", "x-api-key", "content-type", "content-length", "transfer-encoding", "host", "connection"}
    | {"anthropic-version", "anthropic-beta", "accept", "accept-encoding", "cookie"}
)
MEBIBYTE = 1024 * 1024


class ClientIdentityConfig(_Strict):
    """The request headers a proxy client may use to assert dimensions (header name -> dimension)."""

    headers: dict[str, str] = {}

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for header, dimension in value.items():
            if not _HEADER_NAME.match(header):
                raise ValueError(f"{header!r} is not an HTTP header name")
            if header.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{header!r} carries the API key or the request itself; name another header")
            if header.lower() in seen:
                raise ValueError(f"{header!r} is listed twice (header names are case-insensitive)")
            if dimension == "model":
                raise ValueError(f"{header}: 'model' comes from the request body, not from a header")
            if list(value.values()).count(dimension) > 1:
                raise ValueError(f"two headers set the dimension {dimension!r}; keep one")
            seen[header.lower()] = dimension
        return value


class ProxyClientConfig(_Strict):
    """One caller of the proxy: its key, the attributes the proxy sets for it, what it may assert itself."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    key_sha256: str | None = Field(default=None, repr=False)
    key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    attributes: dict[str, str] = {}
    identity: ClientIdentityConfig = ClientIdentityConfig()
    require: list[str] = []

    @field_validator("key_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"[0-9A-Fa-f]{64}", value.strip()):
            raise ValueError('not a sha256 hex digest (64 hex digits); compute it with: printf %s "$KEY" | sha256sum')
        return value.strip().lower()

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: dict[str, str]) -> dict[str, str]:
        for dimension, fixed in value.items():
            if dimension == "model":
                raise ValueError("'model' comes from the request body; it cannot be fixed per client")
            if not fixed or len(fixed) > 128:
                raise ValueError(f"{dimension}: a fixed value has 1 to 128 characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProxyClientConfig:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError(
                "give exactly one of key_sha256 (the sha256 hex of the key this caller sends) or key_env "
                "(an environment variable holding the key)"
            )
        asserted = set(self.identity.headers.values())
        for header, dimension in self.identity.headers.items():
            if dimension in self.attributes:
                raise ValueError(
                    f"identity.headers.{header}: {dimension!r} is fixed by attributes "
                    f"({dimension}: {self.attributes[dimension]}); a header cannot change it, so drop the header"
                )
        for dimension in self.require:
            if dimension not in asserted and dimension not in self.attributes:
                raise ValueError(
                    f"require: {dimension!r} is neither in attributes nor set by an identity header, so every "
                    f"call would be refused; add a header for it under identity.headers"
                )
        return self


class ProxyConfig(_Strict):
    """The reference Claude proxy."""

    listen: HostPort = HostPort("127.0.0.1:8088")
    upstream: str = "https://api.anthropic.com"
    api_key_env: str = "ANTHROPIC_API_KEY"
    clients: list[ProxyClientConfig] = []
    allow_unpriced_models: bool = False
    monitor_url: str = "http://127.0.0.1:9464"
    ingest_token_env: str = "CLAUDE_MONITOR_INGEST_TOKEN"
    read_token_env: str | None = None  # the daemon's read token, when its http.read_token_env is set
    fail_mode: Literal["open", "closed"] = "open"
    # Admit on Anthropic's count of the input (POST /v1/messages/count_tokens, free) instead of the byte bound;
    # past count_tokens_timeout, or on any error, the byte bound it is.
    count_tokens: bool = False
    count_tokens_timeout: Duration = Duration("2s")
    # A count_tokens answer is a few dozen bytes; past this many it is not read on, and the byte bound it is.
    count_tokens_max_answer_bytes: int = Field(default=64 * 1024, gt=0)
    # Bounds of the proxy's own server; over max_body_bytes a request is refused 413 (Anthropic's own limit
    # is lower, so nothing it would accept is refused here).
    max_body_bytes: int = Field(default=64 * MEBIBYTE, gt=0)
    # An answer Anthropic sends whole (not a stream) is read into memory before it is passed on: past this many
    # bytes it is not read further and the caller gets 502 (a Messages answer is at most a few MiB).
    max_answer_bytes: int = Field(default=64 * MEBIBYTE, gt=0)
    header_timeout: Duration = Duration("10s")
    keepalive_timeout: Duration = Duration("30s")
    max_connections: int = Field(default=1000, gt=0)
    backlog: int = Field(default=2048, gt=0)
    # The former `identity:` key, kept in the schema only to refuse it with its `clients:` equivalent.
    identity: Any = Field(default=None, exclude=True)

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = _url_parts(value)
        if parts is None or parts.query:
            raise ValueError(f"{value!r} is not an http(s) URL (https://api.anthropic.com)")
        return value

    @field_validator("monitor_url")
    @classmethod
    def _monitor_url(cls, value: str) -> str:
        if _url_parts(value) is None:
            raise ValueError(f"{value!r} is not the daemon's http(s) URL (e.g. http://127.0.0.1:9464)")
        return value

    @field_validator("count_tokens_timeout")
    @classmethod
    def _count_timeout(cls, value: Duration) -> Duration:
        if value.delta > timedelta(seconds=60):
            raise ValueError(f"{value!r} is too long: every call waits for it before it is admitted; use 60s or less")
        return value

    @field_validator("identity")
    @classmethod
    def _identity_moved(cls, value: Any) -> Any:
        if value is None:
            return None
        raise ValueError(former_identity_message(value))

    @model_validator(mode="after")
    def _clients(self) -> ProxyConfig:
        names = [client.name for client in self.clients]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"clients: the name {twice[0]!r} is used by two clients; names are unique")
        digests = [client.key_sha256 for client in self.clients if client.key_sha256 is not None]
        if len(set(digests)) != len(digests):
            raise ValueError("clients: two clients have the same key_sha256; each caller has a key of its own")
        return self


def former_identity_message(value: Any) -> str:
    """Why `proxy.identity` is refused, with the `clients:` entry that does what it did."""
    headers = value.get("headers") if isinstance(value, dict) else None
    if not isinstance(headers, dict) or not headers:
        headers = {"X-App-User": "user", "X-App-Project": "project", "X-App-Feature": "feature"}
    entry = {
        "name": "my-backend",
        "key_sha256": '<sha256 hex of the key this caller sends: printf %s "$KEY" | sha256sum>',
        "identity": {"headers": {str(k): str(v) for k, v in headers.items()}},
    }
    text = yaml.safe_dump({"proxy": {"clients": [entry]}}, sort_keys=False, default_flow_style=False, width=200)
    return (
        "no longer read: callers of the proxy now authenticate with a key of their own, and each client "
        "says which headers it may assert. The equivalent entry is:\n"
        + "\n".join("      " + line for line in text.rstrip().splitlines())
        + "\n    Better still, fix what a caller may not choose (attributes: {project: …}) and drop its header."
    )


class ReconcileConfig(_Strict):
    """Reconciliation with Anthropic's Usage and Cost Analytics API."""

    # The name of the environment variable holding the Admin API key; the key itself never appears in config.
    admin_key_env: str = Field(default="ANTHROPIC_ADMIN_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: AnthropicURL = "https://api.anthropic.com"
    every: Duration = Duration("6h")
    lookback_days: int = Field(default=7, ge=1, le=31)
    settle_hours: int = Field(default=26, ge=0, le=24 * 31)
    tolerance: Annotated[Decimal, Field(ge=0, lt=1)] = Decimal("0.001")
    # Anthropic API key id (apikey_…) -> the attributes its traffic carries here: the reports are then grouped by key
    # and compared per mapped attributes. Checked against metrics.labels after loading (the rollup keeps only those).
    api_keys: dict[str, dict[str, str]] = {}

    @field_validator("every")
    @classmethod
    def _every(cls, value: Duration) -> Duration:
        if value.delta < timedelta(minutes=5):
            raise ValueError(f"{value!r} is shorter than 5m; Anthropic refreshes these reports a few times an hour")
        return value


class Settings(_Strict):
    """Everything the daemon and the commands read from configuration."""

    database_url: str = "sqlite:///./claude-monitor.db"
    timezone: str = "UTC"
    dimensions: list[str] = ["api_key", "project", "user", "feature", "environment"]
    sources: list[SourceConfig] = [SourceConfig(path="./usage/*.jsonl")]
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    store: StoreConfig = StoreConfig()
    throttle: ThrottleConfig = ThrottleConfig()
    alerts: AlertsConfig = AlertsConfig()
    pricing: PricingConfig = PricingConfig()
    budgets: list[BudgetConfig] = []
    limits: list[LimitConfig] = []
    admission: AdmissionConfig = AdmissionConfig()
    proxy: ProxyConfig = ProxyConfig()
    reconcile: ReconcileConfig = ReconcileConfig()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA timezone (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError(f"{redaction.database_url(value)!r} is not a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(r"^[a-z][a-z0-9_]{0,62}$", name):
                raise ValueError(f"{name!r} is not a dimension name (lowercase letters, digits, _)")
            if name == "model":
                raise ValueError("'model' is built in; do not list it as a dimension")
        if len(set(value)) != len(value):
            raise ValueError("a dimension is listed twice")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        """Checks across sections, all of them run: every problem is reported at its own key."""
        problems = (
            _dimension_problems(self)
            + _price_override_problems(self)
            + _proxy_client_problems(self)
            + _reconcile_key_problems(self)
            + _admission_problems(self)
        )
        if problems:
            raise Problems(problems)
        return self

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The configured timezone."""
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True)
class LoadedSettings:
    """Settings with where they came from, for `check-config` and error messages."""

    settings: Settings
    path: Path | None
    env_overrides: tuple[str, ...]


def _env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    overrides = {}
    for name, field in Settings.model_fields.items():
        if field.annotation is str:  # top-level scalars only
            env_name = ENV_PREFIX + name.upper()
            if env_name in environ:
                overrides[name] = environ[env_name]
    return overrides


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of a key, else of the nearest enclosing key the file has."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _error_lines(exc: ValidationError, lines: dict[tuple[str | int, ...], int], where: str) -> list[str]:
    messages = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        # Pydantic adds the union member or literal tag to loc; keep only keys present in the file.
        loc = tuple(part for part in loc if not (isinstance(part, str) and part in ("decimal", "constrained-decimal")))
        found = (error.get("ctx") or {}).get("error")
        if isinstance(found, Problems):
            for problem in found.problems:
                at = (*loc, *problem.loc)
                line = _line_of(at, lines)
                position = f"{where}:{line}" if line else where
                messages.append(f"{position}: {problem.shown or _shown_loc(at)}: {problem.reason}")
            continue
        line = _line_of(loc, lines)
        key = _shown_loc(loc) or "(top level)"
        reason = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = "unknown key (check its spelling; docs/configuration.md lists every key)"
        elif error["type"] == "missing":
            reason = "required key is missing"
        position = f"{where}:{line}" if line else where
        messages.append(f"{position}: {key}: {reason}")
    return messages


def _dimension_problems(settings: Settings) -> list[Problem]:
    """Keys that name dimensions the daemon does not keep, and budget or limit names used twice."""
    dims = set(settings.dimensions)
    known = f"is not 'model' or one of dimensions {settings.dimensions}"
    problems: list[Problem] = []
    for i, label in enumerate(settings.metrics.labels):
        if label not in dims:
            reason = f"{label!r} is not one of dimensions {settings.dimensions}"
            problems.append(Problem(("metrics", "labels", i), reason, "metrics.labels"))
    for i, name in enumerate(settings.http.check_require):
        if name not in dims and name != "model":
            problems.append(Problem(("http", "check_require", i), f"{name!r} {known}", "http.check_require"))
    sections: list[tuple[str, str, Sequence[BudgetConfig | LimitConfig]]] = [
        ("budgets", "budget", settings.budgets),
        ("limits", "limit", settings.limits),
    ]
    for section, kind, entries in sections:
        names: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"{section}[{i}] ({entry.name})"
            if entry.name in names:
                problems.append(Problem((section, i, "name"), f"the name is used by another {kind}", where))
            names.add(entry.name)
            for key in entry.match:
                if key not in dims and key != "model":
                    problems.append(Problem((section, i, "match", key), f"{key!r} {known}", f"{where}.match"))
            if entry.per is not None and entry.per not in dims and entry.per != "model":
                problems.append(Problem((section, i, "per"), f"{entry.per!r} {known}", f"{where}.per"))
            if entry.per is not None and entry.per in entry.match:
                problems.append(Problem((section, i, "per"), f"{entry.per!r} is also fixed by match", f"{where}.per"))
    return problems


def _price_override_problems(settings: Settings) -> list[Problem]:
    """pricing.models entries the price table cannot take: a reserved name, an alias of two models, or an alias
    that is a model of the shipped table."""
    from monitor.pricing import builtin_models  # the table's own module reads this schema: imported when used

    shipped = builtin_models()[1] if settings.pricing.models else {}
    problems: list[Problem] = []
    aliases: dict[str, str] = {}
    for model, entry in settings.pricing.models.items():
        at: Loc = ("pricing", "models", model)
        if model == "unpriced" or "unpriced" in entry.aliases:
            reason = "'unpriced' is the metric label of unknown models; rename it"
            problems.append(Problem(at, reason, f"pricing.models.{model}"))
        for j, alias in enumerate(entry.aliases):
            shown = f"pricing.models.{model}.aliases"
            if alias in aliases and aliases[alias] != model:
                problems.append(Problem((*at, "aliases", j), f"{alias!r} is also an alias of {aliases[alias]}", shown))
            if alias in shipped and alias != model:
                reason = f"{alias!r} is a model of the shipped table; override it under its own name instead"
                problems.append(Problem((*at, "aliases", j), reason, shown))
            aliases[alias] = model
    return problems


def _proxy_client_problems(settings: Settings) -> list[Problem]:
    """Proxy clients naming dimensions the daemon does not keep."""
    dims = settings.dimensions
    problems: list[Problem] = []
    for i, client in enumerate(settings.proxy.clients):
        at: tuple[str | int, ...] = ("proxy", "clients", i)
        for dimension in client.attributes:
            if dimension not in dims:
                reason = f"{dimension!r} is not one of dimensions {dims}"
                problems.append(Problem((*at, "attributes", dimension), reason))
        for header, dimension in client.identity.headers.items():
            if dimension not in dims:
                problems.append(
                    Problem((*at, "identity", "headers", header), f"{dimension!r} is not one of dimensions {dims}")
                )
        for j, dimension in enumerate(client.require):
            if dimension not in dims:
                problems.append(Problem((*at, "require", j), f"{dimension!r} is not one of dimensions {dims}"))
    return problems


def _admission_problems(settings: Settings) -> list[Problem]:
    """admission.state: database needs PostgreSQL."""
    if settings.admission.state == "database" and not settings.database_url.startswith("postgresql"):
        reason = (
            "'database' keeps admission state in PostgreSQL so replicas share it, and database_url is SQLite, which "
            "one daemon serves alone: use memory (or auto), or a postgresql+psycopg:// database_url"
        )
        return [Problem(("admission", "state"), reason)]
    return []


def admission_in_database(settings: Settings) -> bool:
    """Whether admission state lives in the database: `database`, or `auto` on PostgreSQL."""
    state = settings.admission.state
    return state == "database" or (state == "auto" and settings.database_url.startswith("postgresql"))


def _shown_loc(loc: tuple[str | int, ...]) -> str:
    """A key path for an error message; a reconcile.api_keys entry that is no key id may be a key: never echoed."""
    if loc[:2] == ("reconcile", "api_keys") and len(loc) > 2 and not _API_KEY_ID.match(str(loc[2])):
        loc = (*loc[:2], "<entry>", *loc[3:])
    return _format_loc(loc)


def _reconcile_key_problems(settings: Settings) -> list[Problem]:
    """reconcile.api_keys entries that cannot be compared."""
    labels = settings.metrics.labels
    problems: list[Problem] = []
    first: tuple[str, tuple[str, ...]] | None = None
    for key_id, attributes in settings.reconcile.api_keys.items():
        at: tuple[str | int, ...] = ("reconcile", "api_keys", key_id)
        if not _API_KEY_ID.match(key_id):
            # Not echoed: a key pasted here by mistake must not reach logs through the error.
            reason = "not an Anthropic API key id; write the id the Console shows (apikey_01…), never the key itself"
            problems.append(Problem(at, reason))
        if not attributes:
            problems.append(Problem(at, "maps to no attribute; give at least one, e.g. {project: lingo}"))
            continue
        for dimension, value in attributes.items():
            if dimension not in labels:
                reason = (
                    f"{dimension!r} is not one of metrics.labels {labels}: our daily figures are kept by metric "
                    "label only, so only a label can be compared; map a label, or add it to metrics.labels"
                )
                problems.append(Problem((*at, dimension), reason))
            elif not value:
                reason = "an empty value matches no traffic; give the value events carry"
                problems.append(Problem((*at, dimension), reason))
        dimensions = tuple(sorted(attributes))
        if first is None:
            first = (key_id, dimensions)
        elif dimensions != first[1]:
            reason = (
                f"maps {', '.join(dimensions)} where {first[0]} maps {', '.join(first[1])}: every key must map the "
                "same attributes, so each of our requests falls in exactly one compared group"
            )
            problems.append(Problem(at, reason))
    return problems


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> LoadedSettings:
    """Load the config file (`path`, else ./claude-monitor.yaml if present, else defaults) and env overrides."""
    env = dict(os.environ if environ is None else environ)
    explicit = path is not None
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path, explicit = Path(env[ENV_PREFIX + "CONFIG"]), True
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    data: Any = {}
    text = ""
    where = "built-in defaults"
    if path is not None:
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
        try:
            data = load_yaml(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (see docs/configuration.md)")
    overrides = _env_overrides(env)
    data = {**data, **overrides}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = key_lines(text)
        for name in overrides:
            lines.pop((name,), None)
        messages = _error_lines(exc, lines, where)
        for name in overrides:
            messages = [m.replace(f": {name}:", f": {name} (from {ENV_PREFIX}{name.upper()}):", 1) for m in messages]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(messages)) from None
    return LoadedSettings(
        settings,
        path if path is not None and path.exists() else None,
        tuple(ENV_PREFIX + name.upper() for name in overrides),
    )
