"""Admission: a lease holds rate tokens, concurrency slots and a call's worst-case cost before the call starts.

The daemon owns these counts so every proxy shares them. They live in memory; budget spend comes from the store
(window totals that each committed batch reports, or one indexed read for a scope not seen yet). A scope not seen
yet needs no read when the last evaluation's ceiling settles it: every scope under a budget's lowest threshold then
had at most the ceiling, and every batch since is reported here, so ceiling + reserved + this call within the
allowance admits exactly as the true spend would; only a call that might not fit reads. A reservation changes what
is allowed, never what is reported: spend is only ever what usage events say.

A lease ends one of three ways, and only once: its usage event is stored (the event's `lease` field, or the
request id `POST /v1/release` named), `POST /v1/release` (which returns the slot at once and keeps the call's actual
cost reserved until its event lands), or expiry `lease_ttl` after admit or the last renewal.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from monitor.budgets import Budget, BudgetIndex
from monitor.budgets.counters import Usage
from monitor.budgets.engine import Ceiling
from monitor.budgets.limits import Limit, TokenBucket, scope_key_of, worst_case_pico
from monitor.ingest.parse import Event, EventParser, Rejected
from monitor.pricing import PriceTable, format_usd
from monitor.store.queries import scope_totals
from monitor.wire import scope_text

log = logging.getLogger(__name__)
MAX_TOKENS = 10_000_000
MAX_ESTIMATED_INPUT = 100_000_000  # a 32 MB request at one token per byte, with room for allowances
Kind = Literal["rate", "concurrency", "budget", "cap"]
OUTCOME = {"rate": "rate_limited", "concurrency": "concurrency", "budget": "budget", "cap": "too_large"}


class BadAdmit(ValueError):
    """An admit, release or renew body the daemon cannot use; the message says which field and why."""


class AdmissionAway(Exception):
    """A release or renew cannot reach the admission state (its database is away): 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class MemoryBounds:
    """What admission keeps in memory at most (the `admission:` keys of the same names); past a bound the entries
    worth least go first, and each goes a tenth below its bound so the sweep is not redone on every call."""

    buckets: int = 200_000  # token buckets: full ones go first (no different from new ones), then the nearest full
    spend_scopes: int = 200_000  # budget scopes' window spend: the least recently set go (read again when needed)
    settled_remembered: int = 100_000  # ended leases and stored request ids: the oldest are forgotten

    @staticmethod
    def excess(size: int, bound: int) -> int:
        """How many entries to drop from `size` to be a tenth below `bound` (0 while within it)."""
        return size - MemoryBounds.below(bound) if size > bound else 0

    @staticmethod
    def below(bound: int) -> int:
        """Where a sweep past `bound` stops: a tenth below it."""
        return bound - bound // 10


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """What POST /v1/admit asks: who, which model, and how large the call can be."""

    attributes: dict[str, str]
    model_id: str
    max_tokens: int
    estimated_input_tokens: int
    batch: bool = False
    speed: str | None = None
    inference_geo: str | None = None


def _whole(body: Mapping[str, Any], key: str, high: int, required: bool = True) -> int:
    value = body.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadAdmit(f"{key}: {json.dumps(value)[:40]} is not a whole number")
    if not 0 <= value <= high:
        raise BadAdmit(f"{key}: {value} is outside 0..{high:,}")
    return value


def _label(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > 32):
        raise BadAdmit(f"{key}: must be a string of at most 32 characters or null")
    return value


def parse_admit(body: Any, dimensions: Sequence[str]) -> AdmitRequest:
    """The admit body: `attributes` (dimensions kept, other keys ignored), `model`, `max_tokens`,
    `estimated_input_tokens`, and optional `batch`, `speed`, `inference_geo`."""
    if not isinstance(body, Mapping):
        raise BadAdmit("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 255:
        raise BadAdmit("model: required, a model id of at most 255 characters")
    raw = body.get("attributes") or {}
    if not isinstance(raw, Mapping):
        raise BadAdmit("attributes: must be an object of strings")
    wanted = set(dimensions)
    attributes = {k: str(v)[:128] for k, v in raw.items() if k in wanted and isinstance(v, str | int | float)}
    batch = body.get("batch")
    if batch is not None and not isinstance(batch, bool):
        raise BadAdmit(f"batch: must be true, false or null, not {json.dumps(batch)[:40]}")
    return AdmitRequest(
        attributes,
        model,
        _whole(body, "max_tokens", MAX_TOKENS),
        _whole(body, "estimated_input_tokens", MAX_ESTIMATED_INPUT),
        bool(batch),
        _label(body, "speed"),
        _label(body, "inference_geo"),
    )


@dataclass(frozen=True, slots=True)
class Admitted:
    """A lease: the call may start."""

    lease: str
    reserved_pico: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Refused:
    """The call may not start: which kind of limit said no, its name, when to retry, and why in words."""

    kind: Kind
    name: str
    retry_after: int
    message: str

    @property
    def status(self) -> int:
        """400 for a per-call cap (retrying the same call cannot help), else 429."""
        return 400 if self.kind == "cap" else 429


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Admission cannot decide now (storage away, too many open leases): 503 with Retry-After."""

    message: str
    retry_after: int


@dataclass(frozen=True, slots=True)
class NeedsRead:
    """The decision needs window spend of scopes not in memory: admit again with `read=True` off the event loop."""


@dataclass
class _Lease:
    id: str
    expires_at: datetime
    estimated_input: int
    model_id: str
    batch: bool
    slots: list[tuple[str, str]]  # (limit, scope key) concurrency slots held
    itpm: list[tuple[Limit, str]]  # input-token buckets taken from, corrected when usage lands
    reserved: dict[tuple[str, str], int]  # (budget, scope key) -> amount in the budget's measure
    reserved_pico: int
    released: bool = False  # slots returned; `reserved` now holds the call's actual usage until its event lands
    request_id: str | None = None


@dataclass(frozen=True)
class AdmissionStats:
    """Counts for /metrics."""

    outcomes: dict[tuple[str, str], int]  # (limit or budget, outcome) -> count
    inflight: dict[str, int]  # limit -> calls in flight (all scopes)
    reserved_pico: dict[tuple[str, str], int]  # (budget, scope key) of budgets without per: -> reserved
    open_leases: int
    memory: dict[str, int] = field(default_factory=dict)  # what is kept, by kind (buckets, spend_scopes, ...)
    buckets_forgiven: int = 0  # buckets dropped before they were full (their scopes' use forgotten)


@dataclass
class _Spend:
    amount: int
    first_bucket: datetime
    read_at: datetime


@dataclass
class _Decision:
    """What one admit found, before anything is taken."""

    model: str
    worst_pico: int | None
    limits: list[tuple[Limit, str, dict[str, str]]]
    budgets: list[tuple[Budget, str, int]] = field(default_factory=list)  # (budget, scope key, this call's amount)
    read: dict[tuple[str, str], int] = field(default_factory=dict)  # exact spend seen or read for this call


class Admission:
    """Leases, token buckets, concurrency slots and budget reservations; thread-safe, decided in memory."""

    in_database = False  # True where the state is in the database: every admit, release and renew does I/O

    def __init__(
        self,
        limits: Sequence[Limit],
        budgets: BudgetIndex,
        prices: PriceTable,
        parser: EventParser,
        engine: Engine,
        zone: ZoneInfo,
        clock: Callable[[], datetime],
        lease_ttl: timedelta,
        max_open_leases: int = 100_000,
        spend_max_age: timedelta | None = None,
        bounds: MemoryBounds | None = None,
    ) -> None:
        self.limits = list(limits)
        self._index = budgets
        self._budgets = {b.name: b for b in budgets.budgets}
        self._prices = prices
        self._parser = parser
        self._engine = engine
        self._zone = zone
        self._clock = clock
        self.lease_ttl = lease_ttl
        self.max_open_leases = max_open_leases
        self.bounds = bounds or MemoryBounds()
        # None: every batch of this store goes through this process (SQLite), so the cached totals stay exact.
        self._spend_max_age = spend_max_age
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._by_request: dict[str, str] = {}  # request id named by a release -> lease id
        self._expiry: list[tuple[datetime, str]] = []  # heap; stale entries skipped
        self._settled: dict[str, str] = {}  # lease id -> how it ended (bounded, oldest forgotten first)
        self._inflight: dict[tuple[str, str], int] = {}
        self._inflight_by_limit: dict[str, int] = defaultdict(int)
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self._forgiven = 0  # buckets dropped before they were full
        self._reserved: dict[tuple[str, str], int] = {}
        self._reserved_pico: dict[tuple[str, str], int] = {}
        self._spend: dict[tuple[str, str], _Spend] = {}
        self._outcomes: dict[tuple[str, str], int] = defaultdict(int)
        self._recent_requests: dict[str, None] = {}  # request ids of recently stored events (bounded)
        self._firsts: dict[str, tuple[int, datetime]] = {}  # budget -> (epoch minute, first bucket then)
        self._batches = 0  # batches reported so far
        self._touched: dict[tuple[str, str], int] = {}  # (budget, key) -> the last batch that added to it
        self._ceilings: Mapping[str, Ceiling] = {}
        self._ceilings_from = 0  # the mark of the evaluation they came from

    # --- admit -----------------------------------------------------------------------------------------------

    def admit(self, request: AdmitRequest, read: bool = False) -> Admitted | Refused | Unavailable | NeedsRead:
        """Decide one call. In memory unless a matching budget scope's spend is unknown: then `NeedsRead`, or with
        `read=True` one indexed read per budget (call that off the event loop)."""
        now = self._clock()
        decision, refused = self._plan(request, now)
        if refused is not None:
            return self._count(refused, decision)
        missing = self._missing_spend(decision, now, ceilings=not read)
        if missing:
            if not read:
                return NeedsRead()
            try:
                decision.read = self._read_spend(missing, now)
            except Exception as exc:  # the store is away: the proxy's fail_mode decides
                log.warning("admission: cannot read budget spend (%s)", exc.__class__.__name__)
                return Unavailable(
                    f"storage unavailable: cannot read the spend of budget {missing[0][0].name!r}; retry", 5
                )
        with self._lock:
            self._expire(now)
            if len(self._leases) >= self.max_open_leases:
                return Unavailable(
                    f"{len(self._leases):,} leases are open, the most admission.max_open_leases allows; "
                    "release leases when calls end, or raise the bound",
                    1,
                )
            checked = self._check(request, decision, now)
            if isinstance(checked, NeedsRead):
                return checked  # a ceiling could not settle it (never after a read: every slot is in decision.read)
            if checked is not None:
                return self._count(checked, decision, locked=True)
            return self._take(request, decision, now)

    def _plan(self, request: AdmitRequest, now: datetime) -> tuple[_Decision, Refused | None]:
        """What a call would take — its worst case, the limit scopes and budget amounts — or the per-call cap that
        refuses it; decided from the request and config alone."""
        model = self._prices.resolve(request.model_id) or request.model_id
        worst = worst_case_pico(
            self._prices,
            request.model_id,
            request.estimated_input_tokens,
            request.max_tokens,
            batch=request.batch,
            speed=request.speed,
            geo=request.inference_geo,
            now=now,
        )
        decision = _Decision(model, worst, [])
        for limit in self.limits:
            scope = limit.scope_of(model, request.attributes)
            if scope is not None:
                decision.limits.append((limit, scope_key_of(limit, model, request.attributes) or "", scope))
        refused = self._caps(request, decision)
        if refused is not None:
            return decision, refused
        for budget, key in self._index.touched_keys(model, request.attributes):
            if budget.throttle_at is None:
                continue  # alert-only budgets never refuse
            amount = _amount(budget, request, worst)
            if amount is None:
                message = (
                    f"model {request.model_id!r} has no price in the price table: budget {budget.name!r} cannot "
                    "hold a call it cannot price; use a priced model or add it under pricing.models"
                )
                return decision, Refused("cap", budget.name, 0, message)
            decision.budgets.append((budget, key, amount))
        return decision, None

    def _caps(self, request: AdmitRequest, decision: _Decision) -> Refused | None:
        for limit, _key, _scope in decision.limits:
            if limit.max_tokens is not None and request.max_tokens > limit.max_tokens:
                return Refused(
                    "cap",
                    limit.name,
                    0,
                    f"max_tokens {request.max_tokens:,} is over the cap of {limit.max_tokens:,} set by limit "
                    f"{limit.name!r}; ask for at most {limit.max_tokens:,}",
                )
            if limit.max_input_tokens is not None and request.estimated_input_tokens > limit.max_input_tokens:
                return Refused(
                    "cap",
                    limit.name,
                    0,
                    f"the input is estimated at up to {request.estimated_input_tokens:,} tokens, over the cap of "
                    f"{limit.max_input_tokens:,} (max_input_tokens) set by limit {limit.name!r}; send a shorter "
                    "prompt",
                )
            if limit.max_request_pico is not None:
                if decision.worst_pico is None:
                    return Refused(
                        "cap",
                        limit.name,
                        0,
                        f"model {request.model_id!r} has no price, so limit {limit.name!r} (max_request_usd) cannot "
                        "bound its cost; use a priced model",
                    )
                if decision.worst_pico > limit.max_request_pico:
                    return Refused(
                        "cap",
                        limit.name,
                        0,
                        f"this call could cost up to ${format_usd(decision.worst_pico)} "
                        f"({request.estimated_input_tokens:,} input tokens estimated + max_tokens "
                        f"{request.max_tokens:,} on {decision.model}), over the cap of "
                        f"${format_usd(limit.max_request_pico)} (max_request_usd) set by limit {limit.name!r}; "
                        "lower max_tokens or shorten the prompt",
                    )
        return None

    def _missing_spend(self, decision: _Decision, now: datetime, ceilings: bool) -> list[tuple[Budget, str]]:
        """Scopes whose spend is neither in memory nor (with `ceilings`) bounded by the last evaluation."""
        missing = []
        for budget, key, _amount in decision.budgets:
            known = self._known_spend(budget, key, now)
            if known is not None:
                decision.read[budget.name, key] = known
            elif not ceilings or self._ceiling(budget, key, now) is None:
                missing.append((budget, key))
        return missing

    def _ceiling(self, budget: Budget, key: str, now: datetime) -> int | None:
        """An upper bound of the scope's window spend from the last evaluation, when one holds: the scope was under
        the budget's lowest threshold then, and no batch has added to it since that evaluation began to read. A
        calendar window must be the one evaluated (an event stamped ahead may count in the next); a rolling window
        has no end, so moving on only drops buckets."""
        ceiling = self._ceilings.get(budget.name)
        if ceiling is None or key in ceiling.hot or (budget.name, key) in self._touched:
            return None
        first = self._first_bucket(budget, now)
        if first != ceiling.first if budget.bucket is None else first < ceiling.first:
            return None
        return ceiling.amount

    def spend_mark(self) -> int:
        """The batches reported so far: an evaluation takes this before it reads."""
        with self._lock:
            return self._batches

    def on_ceilings(self, mark: int, ceilings: Mapping[str, Ceiling]) -> None:
        """An evaluation that began to read after batch `mark`: its ceilings stand for every scope no batch has
        added to since. Replicas ingest elsewhere too (spend_max_age set): there no ceiling is exact, so none is
        kept."""
        with self._lock:
            if self._spend_max_age is not None or mark < self._ceilings_from:
                return
            self._ceilings = dict(ceilings)
            self._ceilings_from = mark
            self._touched = {slot: n for slot, n in self._touched.items() if n > mark}

    def _first_bucket(self, budget: Budget, now: datetime) -> datetime:
        """The budget's first counted bucket at `now`. Windows start on whole minutes (local midnights fall on
        quarter hours, rolling spans and buckets are whole minutes), so it is computed once a minute."""
        minute = int(now.timestamp()) // 60
        cached = self._firsts.get(budget.name)
        if cached is None or cached[0] != minute:
            cached = self._firsts[budget.name] = (minute, budget.bucket_range(now, self._zone)[0])
        return cached[1]

    def _known_spend(self, budget: Budget, key: str, now: datetime) -> int | None:
        entry = self._spend.get((budget.name, key))
        if entry is None or entry.first_bucket != self._first_bucket(budget, now):
            return None
        if self._spend_max_age is not None and now - entry.read_at > self._spend_max_age:
            return None
        return entry.amount

    def _read_spend(self, missing: list[tuple[Budget, str]], now: datetime) -> dict[tuple[str, str], int]:
        """One indexed read per budget of the scopes' window totals; a total a batch reported meanwhile wins."""
        found: dict[tuple[str, str], _Spend] = {}
        grouped: dict[str, list[str]] = defaultdict(list)
        for budget, key in missing:
            grouped[budget.name].append(key)
        with self._engine.connect() as connection:
            for name, keys in grouped.items():
                budget = self._budgets[name]
                first, end = budget.bucket_range(now, self._zone)
                totals = scope_totals(connection, name, keys, first, end)
                for key in keys:
                    found[name, key] = _Spend(budget.amount(totals.get(key, Usage())), first, now)
        with self._lock:
            for slot, entry in found.items():
                current = self._spend.get(slot)
                if current is None or current.first_bucket != entry.first_bucket or self._spend_max_age is not None:
                    self._remember_spend(slot, entry)
        return {slot: entry.amount for slot, entry in found.items()}

    def _remember_spend(self, slot: tuple[str, str], entry: _Spend) -> None:
        self._spend.pop(slot, None)
        self._spend[slot] = entry  # most recently set last: the oldest go first when the cache is full
        if excess := MemoryBounds.excess(len(self._spend), self.bounds.spend_scopes):
            for old in list(itertools.islice(self._spend, excess)):
                del self._spend[old]

    def _check(self, request: AdmitRequest, decision: _Decision, now: datetime) -> Refused | NeedsRead | None:
        for limit, key, scope in decision.limits:
            if limit.concurrent is not None and self._inflight.get((limit.name, key), 0) >= limit.concurrent:
                return concurrency_refusal(limit, scope)
        for limit, key, scope in decision.limits:
            for kind, amount, per_minute, capacity, what in (
                ("rpm", 1, limit.requests_per_minute, limit.burst, "requests"),
                ("itpm", request.estimated_input_tokens, limit.input_tokens_per_minute, limit.input_tokens_burst,
                 "input tokens"),
            ):  # fmt: skip
                if per_minute is None:
                    continue
                bucket = self._buckets.get((limit.name, key, kind))
                if bucket is None:
                    continue  # a new bucket is full
                bucket.refill(now, per_minute, capacity)
                wait = bucket.wait(amount, per_minute, capacity)
                if wait:
                    return rate_refusal(limit, scope, what, wait)
        for budget, key, amount in decision.budgets:
            spend = self._known_spend(budget, key, now)
            if spend is None:  # seen or read for this call and dropped from the cache since: that figure stands
                spend = decision.read.get((budget.name, key))
            exact = spend is not None
            if spend is None:
                spend = self._ceiling(budget, key, now)
                if spend is None:
                    return NeedsRead()  # a batch added to the scope since it was looked at: read it
            reserved = self._reserved.get((budget.name, key), 0)
            allowed = budget.limit * budget.throttle_at if budget.throttle_at is not None else Decimal(budget.limit)
            if Decimal(spend + reserved + amount) <= allowed:
                continue
            if not exact:
                return NeedsRead()  # the ceiling leaves no room; the true spend may: read it
            return self._budget_refusal(budget, key, spend, reserved, amount, allowed, now)
        return None

    def _budget_refusal(
        self, budget: Budget, key: str, spend: int, reserved: int, amount: int, allowed: Decimal, now: datetime
    ) -> Refused:
        scope = scope_text(json.loads(key))
        if Decimal(spend + amount) > allowed:
            # Spend alone leaves no room: only the window moving on can make some.
            if budget.bucket is None:
                retry = math.ceil((budget.window_at(now, self._zone)[1] - now).total_seconds())
            else:
                retry = int(budget.bucket.total_seconds())
        else:
            retry = 1  # calls in flight hold the room; they may settle any moment
        if budget.measure == "usd":
            money = (
                f"spent ${format_usd(spend)} + ${format_usd(reserved)} reserved by calls in flight + this call's "
                f"worst case ${format_usd(amount)} would pass ${format_usd(int(allowed))} (limit "
                f"${format_usd(budget.limit)} x throttle_at {budget.throttle_at})"
            )
        else:
            money = (
                f"used {spend:,} + {reserved:,} reserved by calls in flight + {amount:,} for this call would pass "
                f"{int(allowed):,} {budget.measure} (limit {budget.limit:,} x throttle_at {budget.throttle_at})"
            )
        return Refused("budget", budget.name, max(retry, 1), f"budget {budget.name!r} for {scope}: {money}")

    def _take(self, request: AdmitRequest, decision: _Decision, now: datetime) -> Admitted:
        lease = _Lease(
            "lease_" + secrets.token_urlsafe(16),
            now + self.lease_ttl,
            request.estimated_input_tokens,
            request.model_id,
            request.batch,
            [],
            [],
            {},
            0,
        )
        for limit, key, _scope in decision.limits:
            self._outcomes[limit.name, "admitted"] += 1
            if limit.concurrent is not None:
                self._inflight[limit.name, key] = self._inflight.get((limit.name, key), 0) + 1
                self._inflight_by_limit[limit.name] += 1
                lease.slots.append((limit.name, key))
            for kind, amount, per_minute, capacity in (
                ("rpm", 1, limit.requests_per_minute, limit.burst),
                ("itpm", request.estimated_input_tokens, limit.input_tokens_per_minute, limit.input_tokens_burst),
            ):
                if per_minute is None:
                    continue
                bucket = self._buckets.get((limit.name, key, kind))
                if bucket is None:
                    bucket = self._buckets[limit.name, key, kind] = TokenBucket(float(capacity), now)
                bucket.level -= amount
                if kind == "itpm":
                    lease.itpm.append((limit, key))
        for budget, key, amount in decision.budgets:
            lease.reserved[budget.name, key] = amount
            self._reserved[budget.name, key] = self._reserved.get((budget.name, key), 0) + amount
            if budget.measure == "usd":
                lease.reserved_pico = amount  # the call's worst case, the same for every budget in dollars
                if budget.per is None:
                    self._reserved_pico[budget.name, key] = self._reserved_pico.get((budget.name, key), 0) + amount
        self._leases[lease.id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease.id))
        if len(self._buckets) > self.bounds.buckets:
            self._drop_buckets(now)
        return Admitted(lease.id, lease.reserved_pico, lease.expires_at)

    def _count(self, refused: Refused, decision: _Decision, locked: bool = False) -> Refused:
        if locked:
            self._outcomes[refused.name, OUTCOME[refused.kind]] += 1
        else:
            with self._lock:
                self._outcomes[refused.name, OUTCOME[refused.kind]] += 1
        return refused

    def _drop_buckets(self, now: datetime) -> None:
        """Back to a tenth below max_buckets: full buckets go (a new one is full too, so nothing changes); if that
        is not enough, those nearest to full go next, which forgives their scopes what they had used."""
        by_name = {limit.name: limit for limit in self.limits}
        filling: list[tuple[float, tuple[str, str, str]]] = []  # (seconds until full, slot)
        for slot, bucket in list(self._buckets.items()):
            limit = by_name.get(slot[0])
            per_minute, capacity = (None, 0) if limit is None else (
                (limit.requests_per_minute, limit.burst)
                if slot[2] == "rpm"
                else (limit.input_tokens_per_minute, limit.input_tokens_burst)
            )  # fmt: skip
            if per_minute is None or bucket.refill(now, per_minute, capacity) >= capacity:
                del self._buckets[slot]
            else:
                filling.append(((capacity - bucket.level) * 60 / per_minute, slot))
        excess = len(self._buckets) - MemoryBounds.below(self.bounds.buckets)
        if excess <= 0:
            return
        # Ties (buckets as far from full) go oldest first: nsmallest keeps the order of the dict, insertion order.
        dropped = heapq.nsmallest(excess, filling, key=lambda entry: entry[0])
        for _seconds, slot in dropped:
            del self._buckets[slot]
        self._forgiven += excess
        log.warning(
            "admission: %d token buckets were dropped before they were full, to stay within admission.max_buckets "
            "(%d): their scopes start again on full buckets, forgiven up to %.0f s of refill; raise the bound if "
            "this recurs",
            excess,
            self.bounds.buckets,
            dropped[-1][0],
        )

    # --- renew, release, settle, expire ------------------------------------------------------------------------

    def renew(self, lease_id: str) -> datetime | None:
        """Push an open lease's expiry to now + lease_ttl; None when it is unknown, expired or settled."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            lease = self._leases.get(lease_id)
            if lease is None or lease.released:
                return None
            lease.expires_at = now + self.lease_ttl
            heapq.heappush(self._expiry, (lease.expires_at, lease.id))
            return lease.expires_at

    def settled_how(self, lease_id: str) -> str | None:
        """How a recently ended lease ended ('usage event', 'release', 'expired'), if remembered."""
        with self._lock:
            return self._settled.get(lease_id)

    def release(self, lease_id: str, request_id: str | None, usage: Any) -> tuple[str, int | None]:
        """Settle a lease with the call's actual usage: ('released', cost) or how it had already ended, (None when
        unknown). The slot returns at once; the actual usage stays reserved until the call's usage event lands."""
        now = self._clock()
        actual: Usage | None = None
        cost: int | None = None
        with self._lock:
            lease = self._leases.get(lease_id)
            model_id = lease.model_id if lease is not None else None
            batch = lease.batch if lease is not None else False
        if model_id is not None and usage is not None:
            parsed = self._parser.parse_object(
                {
                    "request_id": request_id or lease_id,
                    "timestamp": now.isoformat(),
                    "model": model_id,
                    "usage": usage,
                    "batch": batch,
                },
                raw="",  # only the reason is used when it is refused: no copy of the body to redact
            )
            if isinstance(parsed, Rejected):
                raise BadAdmit(parsed.reason)
            price = self._prices.price(parsed)
            cost = price.cost_pico
            actual = _usage_of(parsed, cost or 0)
        with self._lock:
            self._expire(now)
            lease = self._leases.get(lease_id)
            if lease is None:
                return self._settled.get(lease_id, "unknown"), None
            if lease.released:
                return "release", None
            if request_id is not None and request_id in self._recent_requests:
                # This call's usage event is already stored (it named no lease): nothing is left to hold.
                self._close(lease, "usage event", None)
                return "usage event", None
            self._free_slots(lease, actual.input + actual.cache_write_5m + actual.cache_write_1h if actual else None)
            keep: dict[tuple[str, str], int] = {}
            for (name, key), amount in lease.reserved.items():
                budget = self._budgets.get(name)
                now_amount = budget.amount(actual) if budget is not None and actual is not None else 0
                self._adjust_reserved(name, key, now_amount - amount)
                if now_amount:
                    keep[name, key] = now_amount
            lease.reserved = keep
            lease.released = True
            if not keep:
                self._forget(lease, "release")
                return "release", cost
            lease.request_id = request_id
            if request_id is not None:
                self._by_request[request_id] = lease.id
            lease.expires_at = now + self.lease_ttl  # the event should follow within this; else the hold ends
            heapq.heappush(self._expiry, (lease.expires_at, lease.id))
            return "release", cost

    def on_batch(
        self, touched: Mapping[tuple[str, str], Usage], settles: Sequence[tuple[str, str | None, int]]
    ) -> None:
        """After a committed batch: take its scopes' new window totals (`touched`), then settle the leases its events
        name (`settles`: request id, lease, prompt tokens of every stored or duplicate event)."""
        if not touched and not settles:
            return
        now = self._clock()
        with self._lock:
            self._batches += 1
            firsts: dict[str, datetime] = {}
            for (name, key), usage in touched.items():
                budget = self._budgets.get(name)
                if budget is None or budget.throttle_at is None:
                    continue
                self._touched[name, key] = self._batches
                first = firsts.get(name)
                if first is None:
                    first = firsts[name] = budget.bucket_range(now, self._zone)[0]
                self._remember_spend((name, key), _Spend(budget.amount(usage), first, now))
            if len(self._touched) > self.bounds.spend_scopes:
                # No evaluation has caught up for a while: drop the ceilings rather than remember without bound.
                self._touched.clear()
                self._ceilings = {}
                self._ceilings_from = self._batches
            recent = self._recent_requests
            for request_id, _lease, _prompt in settles:
                recent[request_id] = None
            if excess := MemoryBounds.excess(len(recent), self.bounds.settled_remembered):
                for old in list(itertools.islice(recent, excess)):
                    del recent[old]
            if not self._leases:
                return
            for request_id, lease_id, prompt in settles:
                found = self._leases.get(lease_id) if lease_id is not None else None
                if found is None:
                    other = self._by_request.get(request_id)
                    found = self._leases.get(other) if other is not None else None
                if found is not None:
                    self._close(found, "usage event", prompt)

    def sweep(self) -> int:
        """Expire leases past their time (also done on every admit); the number expired."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: datetime) -> int:
        expired = 0
        while self._expiry and self._expiry[0][0] <= now:
            at, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires_at != at:
                continue  # settled, or renewed (a later entry stands for it)
            if not lease.released:
                log.info("admission: lease %s expired unrenewed; its slot and reservation return", lease_id)
            self._close(lease, "expired", None)
            expired += 1
        return expired

    def _close(self, lease: _Lease, how: str, prompt: int | None) -> None:
        if not lease.released:
            self._free_slots(lease, prompt)
        for (name, key), amount in lease.reserved.items():
            self._adjust_reserved(name, key, -amount)
        lease.reserved = {}
        self._forget(lease, how)

    def _forget(self, lease: _Lease, how: str) -> None:
        self._leases.pop(lease.id, None)
        if lease.request_id is not None and self._by_request.get(lease.request_id) == lease.id:
            del self._by_request[lease.request_id]
        self._settled[lease.id] = how
        if excess := MemoryBounds.excess(len(self._settled), self.bounds.settled_remembered):
            for old in list(itertools.islice(self._settled, excess)):
                del self._settled[old]

    def _free_slots(self, lease: _Lease, prompt: int | None) -> None:
        for slot in lease.slots:
            left = self._inflight.get(slot, 0) - 1
            if left > 0:
                self._inflight[slot] = left
            else:
                self._inflight.pop(slot, None)
            self._inflight_by_limit[slot[0]] -= 1
        lease.slots = []
        if prompt is not None:  # the estimate was taken from the input-token buckets: give back what was not used
            for limit, key in lease.itpm:
                bucket = self._buckets.get((limit.name, key, "itpm"))
                if bucket is not None:
                    bucket.level = min(float(limit.input_tokens_burst), bucket.level + lease.estimated_input - prompt)
        lease.itpm = []

    def _adjust_reserved(self, name: str, key: str, delta: int) -> None:
        if not delta:
            return
        left = self._reserved.get((name, key), 0) + delta
        if left > 0:
            self._reserved[name, key] = left
        else:
            self._reserved.pop((name, key), None)
        budget = self._budgets.get(name)
        if budget is not None and budget.per is None and budget.measure == "usd":
            pico = self._reserved_pico.get((name, key), 0) + delta
            if pico > 0:
                self._reserved_pico[name, key] = pico
            else:
                self._reserved_pico.pop((name, key), None)

    def close(self) -> None:
        """Release what admission holds outside memory (nothing here)."""

    # --- observing ----------------------------------------------------------------------------------------------

    @property
    def reserving_budgets(self) -> list[Budget]:
        """Budgets in dollars, without per:, that admission reserves against (they have throttle_at)."""
        return [b for b in self._budgets.values() if b.per is None and b.measure == "usd" and b.throttle_at is not None]

    def reserved(self, budget: str, key: str) -> int:
        """What open leases hold against one budget scope, in the budget's measure."""
        with self._lock:
            return self._reserved.get((budget, key), 0)

    def stats(self) -> AdmissionStats:
        """Counts for /metrics."""
        with self._lock:
            self._expire(self._clock())
            return AdmissionStats(
                dict(self._outcomes),
                {limit.name: self._inflight_by_limit.get(limit.name, 0) for limit in self.limits},
                dict(self._reserved_pico),
                len(self._leases),
                {
                    "buckets": len(self._buckets),
                    "spend_scopes": len(self._spend),
                    "settled_leases": len(self._settled),
                    "stored_requests": len(self._recent_requests),
                },
                self._forgiven,
            )


def concurrency_refusal(limit: Limit, scope: Mapping[str, str]) -> Refused:
    """The answer when the scope already has `concurrent` calls in flight."""
    assert limit.concurrent is not None
    return Refused(
        "concurrency",
        limit.name,
        1,
        f"{scope_text(scope)} already has {limit.concurrent:,} calls in flight, the most limit "
        f"{limit.name!r} allows (concurrent); retry when one ends",
    )


def rate_refusal(limit: Limit, scope: Mapping[str, str], what: str, wait: int) -> Refused:
    """The answer when the scope's bucket of `what` ("requests" or "input tokens") is short for `wait` seconds."""
    per_minute, capacity = (
        (limit.requests_per_minute, limit.burst)
        if what == "requests"
        else (limit.input_tokens_per_minute, limit.input_tokens_burst)
    )
    return Refused(
        "rate",
        limit.name,
        wait,
        f"{scope_text(scope)} is over limit {limit.name!r}: {per_minute:,} {what} a minute "
        f"(bursts of up to {capacity:,}); retry in {wait} s",
    )


def _amount(budget: Budget, request: AdmitRequest, worst: int | None) -> int | None:
    """This call's worst case in the budget's measure; None when the budget counts dollars and the model has none."""
    if budget.measure == "usd":
        return worst
    if budget.measure == "requests":
        return 1
    if budget.measure == "input":
        return request.estimated_input_tokens
    if budget.measure == "output":
        return request.max_tokens
    if budget.measure == "total":
        return request.estimated_input_tokens + request.max_tokens
    return 0  # cache reads and writes cannot be known before the call


def _usage_of(event: Event, cost: int) -> Usage:
    return Usage(
        1,
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_5m_tokens,
        event.cache_write_1h_tokens,
        cost,
    )
