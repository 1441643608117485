"""Parse and validate one usage event; every rejection carries a reason that says what and where."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NamedTuple

import msgspec
import orjson

MAX_TOKENS = 10_000_000
MAX_FUTURE = timedelta(hours=24)
MAX_ATTRIBUTE_CHARS = 128
MAX_ID_CHARS = 255
_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
_KEY_PREFIX = "sk-ant-"
MAX_LABEL_CHARS = 32
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:?\d{2})?$")


def _fingerprint(match: re.Match[str]) -> str:
    return "sk-ant-…" + hashlib.sha256(match.group(0).encode()).hexdigest()[:8]


def redact(text: str) -> str:
    """Replace anything that looks like an Anthropic key by a fingerprint (`sk-ant-…` + short hash)."""
    if _KEY_PREFIX not in text:
        return text
    return _KEY.sub(_fingerprint, text)


class Event(NamedTuple):
    """One accepted request's usage, normalized: absent token counts are 0, timestamps UTC-aware.

    A named tuple, not a frozen dataclass: one is made for every line ingested, and a tuple is made in C where a
    frozen dataclass sets each of its fields through a call."""

    request_id: str
    timestamp: datetime
    model_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    batch: bool = False
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    status: int | None = None
    latency_ms: float | None = None
    attributes: dict[str, str] | None = None
    attributes_dropped: int = 0
    lease: str | None = None  # the admission lease the call ran under: its usage settles the reservation


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line or object that cannot be an event: why, and its raw text (keys redacted)."""

    reason: str
    raw: str
    request_id: str | None = None


class _Bad(Exception):
    pass


# orjson reads an integer literal past 64 bits as the nearest float, whose text is not the literal's digits.
_INEXACT_FLOAT = 2.0**63


def _count(container: dict[str, Any], key: str, where: str) -> int:
    value = container.get(key)
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_TOKENS:  # nearly every count: the checks below all pass
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"{where}{key}: {json.dumps(value)[:40]} is not a whole number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(f"{where}{key}: {value!r} is not a finite number")
        if not value.is_integer():
            raise _Bad(f"{where}{key}: {value!r} is fractional; token counts are whole numbers")
        value = int(value)
    if value < 0:
        raise _Bad(f"{where}{key}: {value} is negative")
    if value > MAX_TOKENS:
        raise _Bad(f"{where}{key}: {value} is over the limit of {MAX_TOKENS:,}")
    return value


def _text(value: str, where: str) -> str:
    """A string fit to store: valid Unicode (no lone surrogate from a JSON escape), keys redacted."""
    if not value.isascii():  # ASCII (nearly every value) cannot hold a surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(f"{where}: contains an unpaired surrogate escape; not valid Unicode") from None
    return redact(value)


def _optional_str(container: dict[str, Any], key: str, where: str) -> str | None:
    value = container.get(key)
    if value is None:
        return None
    if type(value) is str and len(value) <= MAX_LABEL_CHARS and value.isascii() and _KEY_PREFIX not in value:
        return value  # nearly every value: every check below passes and redaction leaves it as it is
    if not isinstance(value, str):
        raise _Bad(f"{where}{key}: must be a string or null, not {type(value).__name__}")
    if len(value) > MAX_LABEL_CHARS:
        raise _Bad(f"{where}{key}: is {len(value)} characters long; the limit is {MAX_LABEL_CHARS}")
    return _text(value, f"{where}{key}")


def _required_str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if (
        type(value) is str
        and 0 < len(value) <= MAX_ID_CHARS
        and value.isascii()
        and _KEY_PREFIX not in value
        and not value.isspace()
    ):
        return value  # nearly every id: every check below passes and redaction leaves it as it is
    if key not in obj or obj[key] is None:
        raise _Bad(f"{key}: required field is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{key}: must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"{key}: is empty")
    if len(value) > MAX_ID_CHARS:
        raise _Bad(f"{key}: is {len(value)} characters long; the limit is {MAX_ID_CHARS}")
    return _text(value, key)


def parse_timestamp(value: Any) -> datetime:
    """An RFC 3339 timestamp as UTC-aware datetime; a naive one is taken as UTC."""
    if not isinstance(value, str):
        raise _Bad(f"timestamp: must be an RFC 3339 string, not {type(value).__name__}")
    if not _RFC3339.match(value):
        raise _Bad(f"timestamp: {value[:40]!r} is not an RFC 3339 date-time (e.g. 2026-11-24T10:15:02Z)")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad(f"timestamp: {value[:40]!r} is not an RFC 3339 date-time (e.g. 2026-11-24T10:15:02Z)") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset that takes it out of datetime's range
        raise _Bad(f"timestamp: {value[:40]!r} is out of range once converted to UTC") from None


def _cache_writes(total: int, detail: tuple[int, int] | None) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes from usage.cache_creation_input_tokens and its (5m, 1h) detail. With no
    detail every write is a 5-minute write; the total is the sum of the detail, and where they disagree the larger
    is billed (the extra as 5-minute writes)."""
    if detail is None:
        return total, 0
    five, one = detail
    return max(five, total - one), one


# The shape nearly every line has, decoded straight into typed fields (no dicts made, the types and token ranges
# checked as it decodes). Anything it cannot take — another type, a count out of range, a float where a count goes,
# an escape that is not valid Unicode — goes the general way below, which decides and words every rejection.
_FastCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)] | None


class _FastCache(msgspec.Struct, gc=False):
    ephemeral_5m_input_tokens: _FastCount = None
    ephemeral_1h_input_tokens: _FastCount = None


class _FastTools(msgspec.Struct, gc=False):
    web_search_requests: _FastCount = None
    web_fetch_requests: _FastCount = None


class _FastUsage(msgspec.Struct, gc=False):
    input_tokens: _FastCount = None
    output_tokens: _FastCount = None
    cache_read_input_tokens: _FastCount = None
    cache_creation_input_tokens: _FastCount = None
    cache_creation: _FastCache | None = None
    server_tool_use: _FastTools | None = None
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None


class _FastLine(msgspec.Struct, gc=False):
    request_id: str
    timestamp: str
    model: str
    usage: _FastUsage
    batch: bool | None = None
    status: int | None = None
    latency_ms: float | None = None
    attributes: dict[str, Any] | None = None
    lease: str | None = None


_FAST_LINE = msgspec.json.Decoder(_FastLine)


class EventParser:
    """Turns raw lines or decoded objects into `Event` or `Rejected`, against the configured dimensions."""

    def __init__(self, dimensions: Sequence[str], clock: Callable[[], datetime]) -> None:
        self._dimensions = frozenset(dimensions)
        self._clock = clock

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The attribute keys kept."""
        return tuple(sorted(self._dimensions))

    @property
    def clock(self) -> Callable[[], datetime]:
        """What `now` is (an event more than 24 h past it is refused)."""
        return self._clock

    def parse_line(self, line: str, now: datetime | None = None) -> Event | Rejected:
        """Parse one JSONL line (without its newline); `now` (default: the clock's) bounds how far ahead a
        timestamp may be, and a caller parsing many lines in a row may read the clock once for all of them."""
        raw = redact(line)
        try:
            shaped = _FAST_LINE.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # a ValidationError is a DecodeError; nesting stops it early
            pass
        else:
            event = self._fast(shaped, now)
            if event is not None:
                return event
        return self._general(raw, now)

    def _general(self, raw: str, now: datetime | None) -> Event | Rejected:
        """Any line (redacted): decoded into plain values, then validated field by field."""
        # orjson decodes several times faster, and every value an accepted event keeps the same as json does, but
        # for an integer past 64 bits (a float to orjson). So an event it decodes is kept when valid; a line it
        # refuses (NaN, a lone surrogate escape, deep nesting) or an event found invalid is decided by json, whose
        # decoding and wording of the rejection stay exactly what they were.
        try:
            fast = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            parsed = self._parse_decoded(fast, raw, exact=False, now=now)
            if isinstance(parsed, Event):
                return parsed
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            return Rejected(f"not JSON: {exc}", raw)
        except RecursionError:
            return Rejected("not JSON this daemon accepts: nested too deeply", raw)
        return self._parse_decoded(obj, raw, exact=True, now=now)

    def _fast(self, line: _FastLine, now: datetime | None) -> Event | None:
        """The event a line of the common shape holds, exactly as `_build` makes it; None when any value needs
        more than the common checks (the general way then decides)."""
        # Ids and labels every check of `_required_str` / `_optional_str` passes and redaction leaves as they are.
        request_id, model, usage = line.request_id, line.model, line.usage
        if not (
            0 < len(request_id) <= MAX_ID_CHARS
            and request_id.isascii()
            and _KEY_PREFIX not in request_id
            and not request_id.isspace()
            and 0 < len(model) <= MAX_ID_CHARS
            and model.isascii()
            and _KEY_PREFIX not in model
            and not model.isspace()
        ):
            return None
        tier, speed, geo = usage.service_tier, usage.speed, usage.inference_geo
        for label in (tier, speed, geo):
            if label is not None and (len(label) > MAX_LABEL_CHARS or not label.isascii() or _KEY_PREFIX in label):
                return None
        try:
            timestamp = parse_timestamp(line.timestamp)
        except _Bad:
            return None
        if now is None:
            now = self._clock()
        if timestamp > now + MAX_FUTURE:
            return None
        status = line.status
        if status is not None and not 0 <= status <= 999:
            return None
        latency = line.latency_ms
        if latency is not None and (not math.isfinite(latency) or latency < 0):
            return None
        lease = line.lease
        if lease is not None and not 0 < len(lease) <= MAX_ID_CHARS:
            return None
        try:
            attributes, dropped = self._attributes(line.attributes, exact=True)  # msgspec keeps big integers exact
        except _Bad:
            return None
        detail = usage.cache_creation
        write_5m, write_1h = _cache_writes(
            usage.cache_creation_input_tokens or 0,
            None if detail is None else (detail.ephemeral_5m_input_tokens or 0, detail.ephemeral_1h_input_tokens or 0),
        )
        tools = usage.server_tool_use
        return Event(
            request_id,
            timestamp,
            model,
            usage.input_tokens or 0,
            usage.output_tokens or 0,
            usage.cache_read_input_tokens or 0,
            write_5m,
            write_1h,
            0 if tools is None else tools.web_search_requests or 0,
            0 if tools is None else tools.web_fetch_requests or 0,
            bool(line.batch),
            tier,
            speed,
            geo,
            status,
            latency,
            attributes,
            dropped,
            lease,
        )

    def _parse_decoded(self, obj: Any, raw: str, exact: bool, now: datetime | None = None) -> Event | Rejected:
        if "\\u" in raw and _KEY_PREFIX in json.dumps(obj, ensure_ascii=False):
            # A key spelled with JSON escapes: keep the decoded text, redacted, instead of the raw line.
            raw = redact(json.dumps(obj, ensure_ascii=False))
        return self._validate(obj, raw, exact, now)

    def parse_object(self, obj: Any, raw: str | None = None) -> Event | Rejected:
        """Validate one decoded JSON value; `raw` is the text it came from, if any."""
        if raw is not None:
            return self._validate(obj, raw, exact=True)
        parsed = self._validate(obj, "", exact=True)
        if isinstance(parsed, Rejected):  # the raw text is written out only for a rejection
            return Rejected(parsed.reason, redact(json.dumps(obj, ensure_ascii=False, default=str)), parsed.request_id)
        return parsed

    def _validate(self, obj: Any, raw: str, exact: bool, now: datetime | None = None) -> Event | Rejected:
        """`exact`: numbers were decoded exactly (json); otherwise a float past 64 bits may stand for an integer,
        and a kept value made from one rejects the event so that json decodes it."""
        if not isinstance(obj, dict):
            return Rejected(f"not a JSON object but {_json_type(obj)}", raw)
        request_id: str | None = None
        try:
            request_id = _required_str(obj, "request_id")
            return self._build(obj, request_id, exact, now)
        except _Bad as bad:
            return Rejected(redact(str(bad)), raw, request_id)

    def _build(self, obj: dict[str, Any], request_id: str, exact: bool, now: datetime | None) -> Event:
        if obj.get("timestamp") is None:
            raise _Bad("timestamp: required field is missing")
        timestamp = parse_timestamp(obj["timestamp"])
        if now is None:
            now = self._clock()
        if timestamp > now + MAX_FUTURE:
            raise _Bad(f"timestamp: {obj['timestamp']} is more than 24 h in the future (now {now.isoformat()})")
        model_id = _required_str(obj, "model")
        usage = obj.get("usage")
        if usage is None:
            raise _Bad("usage: required field is missing")
        if not isinstance(usage, dict):
            raise _Bad(f"usage: must be an object, not {_json_type(usage)}")
        input_tokens = _count(usage, "input_tokens", "usage.")
        output_tokens = _count(usage, "output_tokens", "usage.")
        cache_read = _count(usage, "cache_read_input_tokens", "usage.")
        cache_total = _count(usage, "cache_creation_input_tokens", "usage.")
        detail = usage.get("cache_creation")
        if detail is None:
            write_5m, write_1h = _cache_writes(cache_total, None)
        elif isinstance(detail, dict):
            write_1h = _count(detail, "ephemeral_1h_input_tokens", "usage.cache_creation.")
            write_5m = _count(detail, "ephemeral_5m_input_tokens", "usage.cache_creation.")
            write_5m, write_1h = _cache_writes(cache_total, (write_5m, write_1h))
        else:
            raise _Bad(f"usage.cache_creation: must be an object or null, not {_json_type(detail)}")
        tools = usage.get("server_tool_use")
        if tools is None:
            searches = fetches = 0
        elif isinstance(tools, dict):
            searches = _count(tools, "web_search_requests", "usage.server_tool_use.")
            fetches = _count(tools, "web_fetch_requests", "usage.server_tool_use.")
        else:
            raise _Bad(f"usage.server_tool_use: must be an object or null, not {_json_type(tools)}")
        service_tier = _optional_str(usage, "service_tier", "usage.")
        speed = _optional_str(usage, "speed", "usage.")
        geo = _optional_str(usage, "inference_geo", "usage.")
        batch = obj.get("batch")
        if batch is None:
            batch = False
        elif not isinstance(batch, bool):
            raise _Bad(f"batch: must be true, false or null, not {json.dumps(batch)[:40]}")
        status = obj.get("status")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 999):
            raise _Bad(f"status: {json.dumps(status)[:40]} is not an HTTP status code")
        latency = obj.get("latency_ms")
        if latency is not None:
            if (
                isinstance(latency, bool)
                or not isinstance(latency, int | float)
                or not math.isfinite(latency)
                or latency < 0
            ):
                raise _Bad(f"latency_ms: {json.dumps(latency)[:40]} is not a non-negative number")
            latency = float(latency)
        attributes, dropped = self._attributes(obj.get("attributes"), exact)
        lease = obj.get("lease")
        if lease is not None and (not isinstance(lease, str) or not 0 < len(lease) <= MAX_ID_CHARS):
            raise _Bad(f"lease: {json.dumps(lease)[:40]} is not a lease id (a string from POST /v1/admit) or null")
        return Event(
            request_id,
            timestamp,
            model_id,
            input_tokens,
            output_tokens,
            cache_read,
            write_5m,
            write_1h,
            searches,
            fetches,
            batch,
            service_tier,
            speed,
            geo,
            status,
            latency,
            attributes,
            dropped,
            lease,
        )

    def _attributes(self, value: Any, exact: bool) -> tuple[dict[str, str], int]:
        if value is None:
            return {}, 0
        if not isinstance(value, dict):
            raise _Bad(f"attributes: must be an object of strings, not {_json_type(value)}")
        kept: dict[str, str] = {}
        dropped = 0
        for key, item in value.items():
            if key not in self._dimensions:
                dropped += 1
                continue
            if type(item) is str and item.isascii() and _KEY_PREFIX not in item:  # nearly every value
                kept[key] = item[:MAX_ATTRIBUTE_CHARS]
                continue
            if isinstance(item, str):
                try:
                    text = _text(item, key)
                except _Bad:
                    dropped += 1
                    continue
            elif isinstance(item, bool):
                text = "true" if item else "false"
            elif isinstance(item, int | float) and not (isinstance(item, float) and not math.isfinite(item)):
                if not exact and isinstance(item, float) and not -_INEXACT_FLOAT < item < _INEXACT_FLOAT:
                    raise _Bad(f"attributes.{key}: decode again exactly")
                text = str(item)
            else:
                dropped += 1
                continue
            kept[key] = redact(text)[:MAX_ATTRIBUTE_CHARS]
        return kept, dropped


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return "an object"
