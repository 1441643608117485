"""Synthetic usage events of a language-learning app ("lingo"), for demos, tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.engine import Engine

    from monitor.client import MonitorClient
    from monitor.config import BudgetConfig

_T = TypeVar("_T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000

# Relative request rate per UTC hour: learners in Europe and the Americas, quiet before dawn in Europe.
_HOURLY = (
    0.55, 0.45, 0.35, 0.30, 0.30, 0.35, 0.50, 0.70, 0.85, 0.90, 0.90, 0.95,
    1.00, 1.00, 1.00, 1.05, 1.10, 1.20, 1.35, 1.45, 1.40, 1.20, 0.95, 0.70,
)  # fmt: skip
_WEEKEND = 0.8
# The nightly batch job adds this share of a weekday's requests, all inside 02:00–03:00 UTC.
_BATCH_HOUR = 2
_BATCH_SHARE = 0.04
_BATCH_WEIGHT = sum(_HOURLY) * _BATCH_SHARE / (1 - _BATCH_SHARE)

_FAILURE_P = 0.005
# Failed requests: cumulative share, (HTTP status, least latency ms, latency spread ms).
_FAILURES = ((0.5, (429, 20, 180)), (0.8, (529, 200, 2_800)), (1.0, (500, 300, 9_700)))
_WEB_SEARCH_P = 0.01
_LABS_P = 0.03
_WEB_KEY_P = 0.3
_CACHE_WRITE_5M_P = 0.035
_CACHE_WRITE_1H_P = 0.005
_LONG_PROMPT_THRESHOLD = 200_000
_ZIPF_OFFSET = 10.0  # Zipf–Mandelbrot offset: a heavy head without one user taking most of the traffic
_RESERVOIR = 1_000
_MAX_TOKENS = 10_000_000
# A web search's $0.01 fee as input tokens of the cheapest model the app calls (claude-3-5-haiku, $0.80 per
# million): what a caller adds to its input bound per search the call may run.
_SEARCH_FEE_TOKENS = 12_500

# Cached system prompt size (tokens) of each feature; what a prompt-caching request reads back.
_SYSTEM_PROMPT = {
    "grammar-check": 2_816,
    "translate": 1_942,
    "conversation": 3_488,
    "pronunciation-feedback": 2_250,
    "lesson-gen": 5_120,
    "nightly-lesson-gen": 6_144,
    "vocab-hints": 0,
}


@dataclass(frozen=True, slots=True)
class _Profile:
    """How one model is used by the app: ids it is called by, features, token ranges, speed."""

    share: float
    ids: tuple[tuple[float, str], ...]  # cumulative share, model id as the event carries it
    features: tuple[tuple[float, str], ...]  # cumulative share, feature
    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    cached: bool
    history: int  # most extra cached tokens of a conversation's earlier turns
    long_prompt_p: float
    base_ms: float
    ms_per_output_token: float
    max_tokens: int  # the app's max_tokens for this model: above every output the profile draws


_PROFILES = (
    _Profile(
        share=0.80,
        ids=((0.6, "claude-haiku-4-5"), (1.0, "claude-haiku-4-5-20251001")),
        features=(
            (0.35, "grammar-check"),
            (0.60, "translate"),
            (0.85, "conversation"),
            (1.0, "pronunciation-feedback"),
        ),
        input_tokens=(50, 2_000),
        output_tokens=(50, 800),
        cached=True,
        history=3_000,
        long_prompt_p=0.0,
        base_ms=250.0,
        ms_per_output_token=7.0,
        max_tokens=2_048,
    ),
    _Profile(
        share=0.12,
        ids=((0.6, "claude-sonnet-4-5"), (1.0, "claude-sonnet-4-5-20250929")),
        features=((0.6, "conversation"), (1.0, "lesson-gen")),
        input_tokens=(100, 6_000),
        output_tokens=(100, 2_000),
        cached=True,
        history=20_000,
        long_prompt_p=0.002,
        base_ms=500.0,
        ms_per_output_token=16.0,
        max_tokens=4_096,
    ),
    _Profile(
        share=0.03,
        ids=((0.7, "claude-opus-4-5"), (1.0, "claude-opus-4-5-20251101")),
        features=((1.0, "lesson-gen"),),
        input_tokens=(200, 5_000),
        output_tokens=(300, 3_000),
        cached=True,
        history=0,
        long_prompt_p=0.0,
        base_ms=800.0,
        ms_per_output_token=25.0,
        max_tokens=4_096,
    ),
    _Profile(
        share=0.05,
        ids=((1.0, "claude-3-5-haiku-20241022"),),
        features=((1.0, "vocab-hints"),),
        input_tokens=(50, 1_500),
        output_tokens=(20, 400),
        cached=False,
        history=0,
        long_prompt_p=0.0,
        base_ms=300.0,
        ms_per_output_token=12.0,
        max_tokens=1_024,
    ),
)
_MAX_TOKENS_BY_MODEL = {model: p.max_tokens for p in _PROFILES for _, model in p.ids}
_PROFILE_TABLE = tuple((sum(p.share for p in _PROFILES[: i + 1]), _PROFILES[i]) for i in range(len(_PROFILES)))


def _pick(u: float, table: tuple[tuple[float, _T], ...]) -> _T:
    """Return the entry of a cumulative-share table that u (in [0, 1)) falls in."""
    for bound, value in table:
        if u < bound:
            return value
    return table[-1][1]


def _skewed(u: float, lo: int, hi: int) -> int:
    """Map u in [0, 1) to [lo, hi], most values near lo (token counts have a long right tail)."""
    return lo + int((hi - lo) * u * u)


def _to_ms(moment: datetime) -> int:
    """Whole milliseconds since the epoch at or after `moment` (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return -((-micros) // 1000)


def _density(ms: int) -> float:
    """Relative request rate at the UTC moment `ms`, batch burst included."""
    day, rem = divmod(ms, _DAY_MS)
    hour = rem // _HOUR_MS
    rate = _HOURLY[hour] * (_WEEKEND if (day + 3) % 7 >= 5 else 1.0)
    return rate + _BATCH_WEIGHT if hour == _BATCH_HOUR else rate


def _batch_p(ms: int) -> float:
    """Chance that a request at `ms` belongs to the nightly batch job."""
    if (ms % _DAY_MS) // _HOUR_MS != _BATCH_HOUR:
        return 0.0
    return _BATCH_WEIGHT / _density(ms)


class _Timeline:
    """Places increasing quantiles of the day/week traffic curve over [start_ms, end_ms) at milliseconds."""

    def __init__(self, start_ms: int, end_ms: int) -> None:
        self._end = end_ms
        self.total = 0.0
        seg = start_ms
        while seg < end_ms:  # one UTC hour (or part of one) per step: memory stays constant
            nxt = min((seg // _HOUR_MS + 1) * _HOUR_MS, end_ms)
            self.total += _density(seg) * (nxt - seg) / _HOUR_MS
            seg = nxt
        self._cum = 0.0
        self._start_seg(start_ms)

    def _start_seg(self, seg: int) -> None:
        self._seg = seg
        self._seg_end = min((seg // _HOUR_MS + 1) * _HOUR_MS, self._end)
        self._seg_w = _density(seg) * (self._seg_end - seg) / _HOUR_MS

    def at(self, target: float) -> int:
        """Millisecond where cumulative traffic reaches `target`; targets must not decrease."""
        while target >= self._cum + self._seg_w and self._seg_end < self._end:
            self._cum += self._seg_w
            self._start_seg(self._seg_end)
        frac = (target - self._cum) / self._seg_w
        ms = self._seg + int(frac * (self._seg_end - self._seg))
        return min(max(ms, self._seg), self._seg_end - 1)


class _Stamper:
    """Formats epoch milliseconds as RFC 3339 UTC with milliseconds, caching the date part."""

    def __init__(self) -> None:
        self._day: int | None = None
        self._date = ""

    def __call__(self, ms: int) -> str:
        day, rem = divmod(ms, _DAY_MS)
        if day != self._day:
            d = (_EPOCH + timedelta(days=day)).date()
            self._day, self._date = day, f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
        hour, rem = divmod(rem, _HOUR_MS)
        minute, rem = divmod(rem, 60_000)
        second, milli = divmod(rem, 1000)
        return f"{self._date}T{hour:02d}:{minute:02d}:{second:02d}.{milli:03d}Z"


class _Maker:
    """Builds one usage event (a dict) at a time from a seeded generator."""

    def __init__(self, rng: random.Random, users: int) -> None:
        self._rng = rng
        self._users = users
        self._user_width = max(6, len(str(users)))
        self._zipf_log = math.log((users + _ZIPF_OFFSET) / _ZIPF_OFFSET)
        self.stamp = _Stamper()

    def _user(self) -> str:
        # Inverse CDF of a continuous Zipf–Mandelbrot law (density ∝ 1/(rank + offset)): O(1) per draw.
        x = _ZIPF_OFFSET * math.exp(self._rng.random() * self._zipf_log) - _ZIPF_OFFSET
        rank = min(int(x), self._users - 1) + 1
        return f"u-{rank:0{self._user_width}d}"

    def event(self, ms: int, request_id: str) -> dict[str, Any]:
        """One event at `ms`: model, attributes, usage, status and latency drawn for this app."""
        r = self._rng.random
        batch = r() < _batch_p(ms)
        profile = _pick(r(), _PROFILE_TABLE)
        model = _pick(r(), profile.ids)
        if batch:
            feature, user, api_key, project, environment = (
                "nightly-lesson-gen", "system", "lingo-prod", "lingo", "prod",
            )  # fmt: skip
        else:
            feature = _pick(r(), profile.features)
            user = self._user()
            api_key = "lingo-web" if r() < _WEB_KEY_P else "lingo-prod"
            project, environment = ("lingo-labs", "staging") if r() < _LABS_P else ("lingo", "prod")
        attributes = {
            "api_key": api_key,
            "project": project,
            "user": user,
            "feature": feature,
            "environment": environment,
        }
        if not batch and r() < _FAILURE_P:
            status, least, spread = _pick(r(), _FAILURES)
            usage: dict[str, Any] = _usage(0, 0, None, None, None, None, None)
            latency = least + int(r() * spread)
        else:
            status = 200
            usage, latency = self._usage(profile, feature, batch)
        return {
            "request_id": request_id,
            "timestamp": self.stamp(ms),
            "model": model,
            "usage": usage,
            "attributes": attributes,
            "batch": batch,
            "status": status,
            "latency_ms": latency,
        }

    def _usage(self, profile: _Profile, feature: str, batch: bool) -> tuple[dict[str, Any], int]:
        """Token counts of a successful request and how long it took."""
        r = self._rng.random
        input_tokens = _skewed(r(), *profile.input_tokens)
        output_tokens = _skewed(r(), *profile.output_tokens)
        if batch:
            output_tokens += 400  # a whole lesson per request
        if profile.long_prompt_p and r() < profile.long_prompt_p:
            # A pasted book chapter: the prompt exceeds the long-prompt threshold whatever the cache holds.
            input_tokens = _LONG_PROMPT_THRESHOLD + 1 + int(r() * 40_000)
            output_tokens = 500 + int(r() * 3_500)
        searches = 0
        if not batch and r() < _WEB_SEARCH_P:
            searches = 1 + int(r() * 3)
            input_tokens += searches * (1_500 + int(r() * 4_500))  # search results enter the prompt
        write_5m = write_1h = read = 0
        if profile.cached:
            cached = _SYSTEM_PROMPT[feature]
            if feature == "conversation" and profile.history:
                cached += int(r() * profile.history)
            u = r()
            if u < _CACHE_WRITE_5M_P:
                write_5m = cached
            elif u < _CACHE_WRITE_5M_P + _CACHE_WRITE_1H_P:
                write_1h = cached
            else:
                read = cached
        prompt = input_tokens + write_5m + write_1h + read
        work = profile.base_ms + output_tokens * profile.ms_per_output_token + prompt * 0.01 + searches * 1_500
        jitter = 0.7 + 0.6 * r()
        if r() < 0.01:
            jitter *= 3.0  # the slow tail
        usage = _usage(
            input_tokens,
            output_tokens,
            write_5m + write_1h,
            read,
            (write_1h, write_5m),
            searches,
            "batch" if batch else "standard",
        )
        return usage, int(work * jitter)


def _usage(
    input_tokens: int,
    output_tokens: int,
    cache_write: int | None,
    cache_read: int | None,
    cache_creation: tuple[int, int] | None,
    searches: int | None,
    service_tier: str | None,
) -> dict[str, Any]:
    """A `usage` dict shaped like the anthropic SDK's `Usage.model_dump()`: every field, absent ones null."""
    return {
        "cache_creation": None
        if cache_creation is None
        else {"ephemeral_1h_input_tokens": cache_creation[0], "ephemeral_5m_input_tokens": cache_creation[1]},
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "inference_geo": None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_tokens_details": None,
        "server_tool_use": {"web_fetch_requests": 0, "web_search_requests": searches} if searches else None,
        "service_tier": service_tier,
        "speed": None,
    }


def _bad_line(event: dict[str, Any], kind: int, key_like: str) -> str:
    """Spoil a fresh event in one of the ways the event format says must be dead-lettered."""
    usage = event["usage"]
    if kind == 0:
        text = json.dumps(event)
        return text[: len(text) // 2]  # a torn write: not JSON
    if kind == 1:
        usage["input_tokens"] = -usage["output_tokens"] - 1
    elif kind == 2:
        del event["request_id"]
    elif kind == 3:
        del event["model"]
    elif kind == 4:
        del event["usage"]
    elif kind == 5:
        usage["output_tokens"] += 0.5
    elif kind == 6:
        usage["input_tokens"] = _MAX_TOKENS + 1 + usage["input_tokens"]
    elif kind == 7:
        return json.dumps([event])  # JSON, but not an object
    elif kind == 8:
        usage["input_tokens"] = str(usage["input_tokens"])  # a token count of the wrong type
    elif kind == 9:
        event["timestamp"] = "2999-01-01T00:00:00.000Z"  # far in the future
    else:
        # A log line someone pasted a key into: the daemon must fingerprint it in the dead-letter store.
        return f"request_id={event['request_id']} model={event['model']} api_key={key_like} status=500"
    return json.dumps(event)


_BAD_KINDS = 11


def generate_events(
    *,
    count: int,
    start: datetime,
    end: datetime,
    seed: int = 1,
    users: int = 20_000,
    duplicate_fraction: float = 0.0,
    bad_fraction: float = 0.0,
) -> Iterator[str]:
    """Yield `count` JSONL lines (without newline) with timestamps spread over [start, end) in time order."""
    # Validate here, not in the generator, so bad arguments fail at the call and not at the first next().
    start_ms, end_ms = _to_ms(start), _to_ms(end)
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")
    if end_ms <= start_ms:
        raise ValueError(f"end ({end.isoformat()}) must be at least a millisecond after start ({start.isoformat()})")
    if users < 1:
        raise ValueError(f"users must be 1 or more, got {users}")
    for name, fraction in (("duplicate_fraction", duplicate_fraction), ("bad_fraction", bad_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {fraction}")
    if duplicate_fraction + bad_fraction > 1.0:
        raise ValueError("duplicate_fraction + bad_fraction must not exceed 1")
    return _generate(
        count, start_ms, end_ms, seed, users, round(count * duplicate_fraction), round(count * bad_fraction)
    )


def _generate(
    count: int, start_ms: int, end_ms: int, seed: int, users: int, duplicates: int, bad: int
) -> Iterator[str]:
    """The body of generate_events: exactly `duplicates` repeated and `bad` spoiled lines among `count`."""
    rng = random.Random(seed)
    r = rng.random
    maker = _Maker(rng, users)
    timeline = _Timeline(start_ms, end_ms)
    step = timeline.total / count if count else 0.0
    reservoir: list[str] = []
    fresh = 0
    spoiled = 0
    key_like = "sk-ant-" + "sim01-" + f"{seed:x}".rjust(24, "0")
    for i in range(count):
        # Selection sampling (Knuth's algorithm S): exact counts of each kind, at uniformly random places.
        remaining = count - i
        pick = r() * remaining
        ms = timeline.at((i + r()) * step)
        if pick < bad:
            bad -= 1
            spoiled += 1
            event = maker.event(ms, f"req_sim_{seed}_bad_{spoiled}")
            yield _bad_line(event, int(r() * _BAD_KINDS), key_like)
            continue
        if pick < bad + duplicates and reservoir:
            duplicates -= 1
            yield reservoir[int(r() * len(reservoir))]
            continue
        fresh += 1
        line = json.dumps(maker.event(ms, f"req_sim_{seed}_{fresh}"))
        if duplicates:
            # Algorithm R: a uniform sample of everything emitted so far, in bounded memory.
            if len(reservoir) < _RESERVOIR:
                reservoir.append(line)
            else:
                slot = int(r() * fresh)
                if slot < _RESERVOIR:
                    reservoir[slot] = line
        yield line


def write_files(lines: Iterable[str], out_dir: Path, *, prefix: str = "usage", lines_per_file: int = 0) -> list[Path]:
    """Write lines into out_dir as usage-<n>.jsonl (one file when lines_per_file is 0); return the paths."""
    if lines_per_file < 0:
        raise ValueError(f"lines_per_file must be 0 or more, got {lines_per_file}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    handle = None
    in_file = 0
    try:
        for line in lines:
            if handle is None or (lines_per_file and in_file >= lines_per_file):
                if handle is not None:
                    handle.close()
                path = out_dir / f"{prefix}-{len(paths) + 1:04d}.jsonl"
                handle = path.open("w", encoding="utf-8", newline="\n")
                paths.append(path)
                in_file = 0
            handle.write(line)
            handle.write("\n")
            in_file += 1
    finally:
        if handle is not None:
            handle.close()
    return paths


def _check_live(rate: float, duration_s: float, users: int) -> None:
    """Refuse live-run arguments no run can honour."""
    if rate <= 0:
        raise ValueError(f"rate must be above 0, got {rate}")
    if duration_s < 0:
        raise ValueError(f"duration_s must be 0 or more, got {duration_s}")
    if users < 1:
        raise ValueError(f"users must be 1 or more, got {users}")


def run_live(
    *,
    rate: float,
    duration_s: float,
    out_path: Path,
    seed: int = 1,
    clock: Callable[[], datetime],
    sleep: Callable[[float], None],
    users: int = 20_000,
) -> int:
    """Append clock()-stamped events to out_path, `rate` a second for duration_s (flushed); return count."""
    _check_live(rate, duration_s, users)
    maker = _Maker(random.Random(seed), users)
    begun = clock()
    # The run's start in the request_id keeps two live runs with one seed from posing as duplicates.
    run = _to_ms(begun)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out_path.open("a", encoding="utf-8", newline="\n") as handle:
        while n < rate * duration_s:
            wait = n / rate - (clock() - begun).total_seconds()
            if wait > 0:
                sleep(wait)
            n += 1
            handle.write(json.dumps(maker.event(_to_ms(clock()), f"req_sim_{seed}_{run}_{n}")))
            handle.write("\n")
            handle.flush()
    return n


def admission_request(event: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/admit arguments of the call that produces `event`: a worst case never below its real cost.

    The simulated caller knows its prompt (cached prefix and search results included) and sends its model's fixed
    max_tokens; cached tokens count twice (a 1-hour cache write costs twice the input rate, more than any other
    kind) and each search adds its fee as input tokens, so the admitted worst case covers the call's bill.
    """
    usage = event["usage"]
    cached = (usage["cache_creation_input_tokens"] or 0) + (usage["cache_read_input_tokens"] or 0)
    searches = (usage["server_tool_use"] or {}).get("web_search_requests") or 0
    return {
        "model": event["model"],
        "max_tokens": _MAX_TOKENS_BY_MODEL[event["model"]],
        "estimated_input_tokens": (usage["input_tokens"] or 0) + 2 * cached + searches * _SEARCH_FEE_TOKENS,
        "batch": event["batch"],
        **event["attributes"],
    }


@dataclass(slots=True)
class LiveOutcome:
    """What the daemon answered the admitted live callers: calls made and refused, per learner."""

    started: datetime  # every call of the run is stamped at or after this moment
    calls: int = 0
    admitted: int = 0
    unanswered: int = 0  # the daemon could not be reached or answered 503: the caller gave up on the call
    admitted_by_user: dict[str, int] = field(default_factory=dict)
    refused_by_user: dict[str, dict[str, int]] = field(default_factory=dict)  # user -> refusing limit -> calls

    @property
    def refused(self) -> int:
        """Calls the daemon refused, by any limit."""
        return sum(sum(by.values()) for by in self.refused_by_user.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI prints it)."""
        return {
            "started": self.started.isoformat().replace("+00:00", "Z"),
            "calls": self.calls,
            "admitted": self.admitted,
            "refused": self.refused,
            "unanswered": self.unanswered,
            "admitted_by_user": dict(sorted(self.admitted_by_user.items())),
            "refused_by_user": {user: dict(sorted(by.items())) for user, by in sorted(self.refused_by_user.items())},
        }


def run_admitted(
    *,
    rate: float,
    duration_s: float,
    out_path: Path,
    client: MonitorClient,
    seed: int = 1,
    clock: Callable[[], datetime],
    sleep: Callable[[float], None],
    users: int = 20_000,
    make_event: Callable[[int, str], dict[str, Any]] | None = None,
) -> LiveOutcome:
    """Like run_live, but each simulated call asks the daemon to admit it first: a refused call is never made.

    An admitted call's event carries its lease and is appended to out_path; the lease is then released with the
    call's usage, so the daemon holds the real cost from that moment, before its tailer reads the line.
    `make_event(ms, request_id)` builds each call's event (default: the app's traffic drawn from `seed`).
    """
    from monitor.client import AdmissionRefused, MonitorError

    _check_live(rate, duration_s, users)
    make = make_event or _Maker(random.Random(seed), users).event
    begun = clock()
    run = _to_ms(begun)
    outcome = LiveOutcome(started=begun)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8", newline="\n") as handle:
        while outcome.calls < rate * duration_s:
            wait = outcome.calls / rate - (clock() - begun).total_seconds()
            if wait > 0:
                sleep(wait)
            outcome.calls += 1
            event = make(_to_ms(clock()), f"req_sim_{seed}_{run}_{outcome.calls}")
            user = event["attributes"]["user"]
            try:
                lease = client.admit(**admission_request(event))
            except AdmissionRefused as refused:
                by = outcome.refused_by_user.setdefault(user, {})
                by[refused.name] = by.get(refused.name, 0) + 1
                continue
            except MonitorError:
                outcome.unanswered += 1
                continue
            event["lease"] = lease.id
            handle.write(json.dumps(event))
            handle.write("\n")
            handle.flush()
            outcome.admitted += 1
            outcome.admitted_by_user[user] = outcome.admitted_by_user.get(user, 0) + 1
            # Unreachable now, the daemon still settles the lease: the event written above carries it.
            with contextlib.suppress(MonitorError):
                client.release(lease, request_id=event["request_id"], usage=event["usage"])
    return outcome


@dataclass(frozen=True, slots=True)
class LearnerRow:
    """One learner a per-user dollar budget refused calls of: spend before and after the daemon watched."""

    user: str
    before_pico: int  # spend in the budget's current window stamped before the live run started
    live_pico: int  # spend of the calls the daemon admitted during the live run
    admitted: int  # calls of the live run the budget counts (stored: admitted and made)
    refused: int  # calls of the live run the budget refused


def refused_learners(outcome: LiveOutcome, budget: BudgetConfig, engine: Engine, zone: ZoneInfo) -> list[LearnerRow]:
    """Every learner `budget` refused a call of, with spend read from the store; most spent before first."""
    from monitor.budgets.windows import calendar_window
    from monitor.report import build_report

    window = budget.parsed_window
    if window.kind == "rolling":
        assert window.span is not None
        window_start = outcome.started - window.span
    else:
        window_start, _ = calendar_window(window.kind, outcome.started, zone)
    key = budget.per or "user"
    # Only what the budget counts: the learner's calls its match selects (another project's are not its spend).
    by = [key, *sorted(k for k in budget.match if k != key)]

    def spend(since: datetime, until: datetime | None) -> dict[str | None, tuple[int, int]]:
        """Learner -> (cost, requests) of the calls the budget counts, stamped in [since, until)."""
        out: dict[str | None, tuple[int, int]] = {}
        for row in build_report(engine, since=since, until=until, by=by).rows:
            if all(row.keys[k] == v for k, v in budget.match.items() if k != key):
                cost, requests = out.get(row.keys[key], (0, 0))
                out[row.keys[key]] = (cost + row.cost_pico, requests + row.counts["requests"])
        return out

    before_by = spend(window_start, outcome.started)
    live_by = spend(outcome.started, None)
    rows = [
        LearnerRow(user, before_by.get(user, (0, 0))[0], *live_by.get(user, (0, 0)), refused)
        for user, refusals in outcome.refused_by_user.items()
        if (refused := refusals.get(budget.name, 0))
    ]
    rows.sort(key=lambda row: (-row.before_pico, row.user))
    return rows


def _usd(pico: int) -> str:
    """Pico-dollars as exact dollars: every digit kept, at least cents ($8.4612345, $0.075, $1.50)."""
    dollars, rest = divmod(pico, 10**12)
    cents = f"{rest:012d}".rstrip("0").ljust(2, "0")
    return f"${dollars:,}.{cents}"


def explain_live(
    outcome: LiveOutcome, budget: BudgetConfig, rows: list[LearnerRow], duration_s: float, shown: int = 10
) -> str:
    """The live run told in words: what the budgets table counts, what the throttle did, per learner."""
    assert budget.limit_usd is not None
    cap = int(budget.limit_usd * (budget.throttle_at or 1) * 10**12)
    refused = sum(row.refused for row in rows)
    already_over = [row for row in rows if row.before_pico >= cap]
    reached = [row for row in rows if row.before_pico < cap]
    past = [row.user for row in rows if row.live_pico and row.before_pico + row.live_pico > cap]
    elsewhere = outcome.refused - refused
    others = f" ({elsewhere} more calls were refused by other limits)" if elsewhere else ""
    today = "spend today" if budget.window == "day" else "in window"
    lines = [
        f"== what the throttle did to the live traffic ({budget.name}: {_usd(cap)} per learner per {budget.window})",
        f"{'learner':<10}  {'spent before the daemon watched':>31}  {'live calls admitted':>19}"
        f"  {'refused':>7}  {'live spend':>14}  {today:>14}",
    ]
    # The learners who reached the cap live are the ones whose spend admission held: show them past the top too.
    listed = rows[:shown] + [row for row in rows[shown:] if row.before_pico < cap][:shown]
    for row in listed:
        lines.append(
            f"{row.user:<10}  {_usd(row.before_pico):>31}  {row.admitted:>19}  {row.refused:>7}"
            f"  {_usd(row.live_pico):>14}  {_usd(row.before_pico + row.live_pico):>14}"
        )
    if len(rows) > len(listed):
        rest = [row for row in rows if row not in listed]
        lines.append(
            f"... and {len(rest)} more: {sum(r.refused for r in rest)} calls refused, "
            f"{_usd(sum(r.live_pico for r in rest))} live spend"
        )
    text = (
        f"The budgets table counts every call stamped today, the replayed history included. Those calls were made "
        f"before the daemon watched them, so nothing could refuse them: that is why learners stand at several times "
        f"their {_usd(cap)} cap there. The throttle acts on calls before they are made. In the live phase "
        f"({duration_s:g} s) each of {outcome.calls} simulated calls asked the daemon first (POST /v1/admit); it "
        f"admitted {outcome.admitted} calls and refused {refused} calls by the {_learners(len(rows))} above, whose "
        f"spend plus the call's worst case would have passed {_usd(cap)}{others}. A refused call is never sent and "
        f"costs nothing: the {_learners(len(already_over))} already past the cap spent "
        f"{_usd(sum(row.live_pico for row in already_over))} in the live phase"
    )
    if reached:
        text += (
            f", and the {_learners(len(reached))} who reached it during the live phase spent "
            f"{_usd(sum(row.live_pico for row in reached))} there"
        )
    if past:
        text += f". Live calls took {', '.join(past)} past the cap: the worst case admitted did not cover the call."
    else:
        text += ", none of it past the cap."
    if outcome.unanswered:
        text += f" {outcome.unanswered} calls got no answer from the daemon and were not made."
    return "\n".join([*lines, "", *_wrap(text, 110)]) + "\n"


def _learners(n: int) -> str:
    """'1 learner', '2 learners'."""
    return f"{n} learner" if n == 1 else f"{n} learners"


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, broken between words."""
    import textwrap

    return textwrap.wrap(text, width)
