"""Admission whose state lives in PostgreSQL, so every replica admits from the same leases, slots, buckets and
reservations, and a replica's restart forgets nothing (admission.state: database).

The decision is the in-memory admission's: the same plan (worst case, limit scopes, budget amounts), caps decided
before any I/O, the same refusal kinds, wording and Retry-After. What differs is where the counts come from: one
short transaction per admit locks the call's scopes (advisory locks, ascending), reads its buckets, the slots held and
the reservations of unexpired leases and the scopes' window spend in one snapshot, and stores the lease and what it
holds. A usage event settles its lease in the transaction that stores it, on whichever replica it lands.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError

from monitor.budgets import BudgetIndex
from monitor.budgets.admission import (
    Admission,
    AdmissionAway,
    AdmissionStats,
    AdmitRequest,
    Admitted,
    BadAdmit,
    NeedsRead,
    Refused,
    Unavailable,
    _Decision,
    _usage_of,
    concurrency_refusal,
    rate_refusal,
)
from monitor.budgets.counters import Usage
from monitor.budgets.engine import Ceiling
from monitor.budgets.limits import Limit, TokenBucket
from monitor.ingest.parse import EventParser, Rejected
from monitor.pricing import PriceTable
from monitor.store import leases as store

log = logging.getLogger(__name__)
SWEEP_CHUNK = 1000  # stored buckets the sweep reads per transaction
SWEEP_CHUNKS = 20  # transactions of buckets per sweep: the next sweep goes on from where this one stopped


def _warn_away(action: str, exc: SQLAlchemyError) -> None:
    """One warning line, no traceback: the database being away is an outage the operator sees, not a bug."""
    log.warning(
        "admission: %s cannot read or store the shared admission state (%s: %s)",
        action,
        exc.__class__.__name__,
        str(exc).splitlines()[0] if str(exc) else "",
    )


def _rate_terms(limit: Limit, request: AdmitRequest) -> tuple[tuple[str, int, int | None, int, str], ...]:
    """(bucket kind, amount this call takes, per minute, capacity, what it counts) of the limit's two buckets."""
    return (
        ("rpm", 1, limit.requests_per_minute, limit.burst, "requests"),
        ("itpm", request.estimated_input_tokens, limit.input_tokens_per_minute, limit.input_tokens_burst,
         "input tokens"),
    )  # fmt: skip


class SharedAdmission(Admission):
    """Leases, slots, token buckets and reservations in the database; the same answers as `Admission`."""

    in_database = True

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
    ) -> None:
        super().__init__(limits, budgets, prices, parser, engine, zone, clock, lease_ttl, max_open_leases)
        # A pool of its own, without a ping on every checkout (a round trip per admit): a connection the database
        # dropped fails one admit with 503, and the pool is renewed.
        # A scope's lock is never waited on for long (a replica stalled mid-admit would otherwise hold every admit of
        # that scope, and a read-pool thread each): past 2 s the admit answers 503 and the proxy's fail_mode decides.
        self._engine = create_engine(
            engine.url,
            pool_size=8,
            max_overflow=8,
            connect_args={"options": "-c lock_timeout=2000 -c idle_in_transaction_session_timeout=10000"},
        )
        self._last_totals = store.HeldTotals({}, {}, 0)
        self.sweep_chunk = SWEEP_CHUNK
        self._bucket_cursor: tuple[str, str, str] | None = None  # where the last sweep stopped reading buckets

    # --- admit -----------------------------------------------------------------------------------------------

    def admit(self, request: AdmitRequest, read: bool = False) -> Admitted | Refused | Unavailable | NeedsRead:
        """Caps in memory; everything else in one transaction, so `NeedsRead` unless `read` (off the event loop)."""
        now = self._clock()
        decision, refused = self._plan(request, now)
        if refused is not None:
            return self._count(refused, decision)
        if not read:
            return NeedsRead()
        try:
            with self._engine.connect() as connection:
                transaction = connection.begin()
                outcome = self._decide(connection, request, decision, now)
                if isinstance(outcome, Admitted):
                    transaction.commit()
                else:
                    transaction.rollback()  # nothing taken
        except SQLAlchemyError as exc:  # the store is away: the proxy's fail_mode decides
            _warn_away("admit", exc)
            return Unavailable("storage unavailable: admission state cannot be read; retry", 5)
        if isinstance(outcome, Refused):
            return self._count(outcome, decision)
        with self._lock:
            for limit, _key, _scope in decision.limits:
                self._outcomes[limit.name, "admitted"] += 1
        return outcome

    def _decide(
        self, connection: Connection, request: AdmitRequest, decision: _Decision, now: datetime
    ) -> Admitted | Refused:
        locks = [store.lock_key("budget", budget.name, key) for budget, key, _amount in decision.budgets]
        bucket_keys: list[tuple[str, str, str]] = []
        refunded: list[tuple[str, str]] = []
        slots: list[tuple[str, str]] = []
        for limit, key, _scope in decision.limits:
            stateful = limit.concurrent is not None
            if limit.concurrent is not None:
                slots.append((limit.name, key))
            for kind, _amount, per_minute, _capacity, _what in _rate_terms(limit, request):
                if per_minute is not None:
                    stateful = True
                    bucket_keys.append((limit.name, key, kind))
                    if kind == "itpm":
                        refunded.append((limit.name, key))
            if stateful:
                locks.append(store.lock_key("limit", limit.name, key))
        windows = []
        for budget, key, _amount in decision.budgets:
            first, end = budget.bucket_range(now, self._zone)
            windows.append((budget.name, key, first, end))
        counts = store.lock_and_count(connection, locks, now, slots, windows, bucket_keys, refunded)
        buckets = counts.buckets

        for limit, key, scope in decision.limits:
            if limit.concurrent is not None and counts.slots.get((limit.name, key), 0) >= limit.concurrent:
                return concurrency_refusal(limit, scope)
        taken: dict[tuple[str, str, str], store.Bucket] = {}
        for limit, key, scope in decision.limits:
            for kind, amount, per_minute, capacity, what in _rate_terms(limit, request):
                if per_minute is None:
                    continue
                stored = buckets.get((limit.name, key, kind))
                # A level above capacity (refunds folded in) reads as full, as a bucket clamped on each refund would.
                if stored is None:  # never taken from, or deleted full by the sweep (refunds may wait for it)
                    owed = min(0, counts.orphaned.get((limit.name, key), 0)) if kind == "itpm" else 0
                    bucket = TokenBucket(float(capacity) + owed, now)
                else:
                    bucket = TokenBucket(min(float(capacity), stored.level), stored.at)
                bucket.refill(now, per_minute, capacity)
                wait = bucket.wait(amount, per_minute, capacity)
                if wait:
                    return rate_refusal(limit, scope, what, wait)
                taken[limit.name, key, kind] = store.Bucket(bucket.level - amount, bucket.at)
        for budget, key, amount in decision.budgets:
            spend = budget.amount(counts.spend.get((budget.name, key), Usage()))
            reserved = counts.reserved.get((budget.name, key), 0)
            allowed = budget.limit * budget.throttle_at if budget.throttle_at is not None else Decimal(budget.limit)
            if Decimal(spend + reserved + amount) > allowed:
                return self._budget_refusal(budget, key, spend, reserved, amount, allowed, now)

        lease = "lease_" + secrets.token_urlsafe(16)
        expires = now + self.lease_ttl
        holds: list[tuple[str, str, str, int]] = []
        for limit, key, _scope in decision.limits:
            if limit.concurrent is not None:
                holds.append(("slot", limit.name, key, 1))
            if limit.input_tokens_per_minute is not None:
                holds.append(("itpm", limit.name, key, request.estimated_input_tokens))
        reserved_pico = 0
        for budget, key, amount in decision.budgets:
            holds.append(("budget", budget.name, key, amount))
            if budget.measure == "usd":
                reserved_pico = amount  # the call's worst case, the same for every budget in dollars
        row = {
            "id": lease,
            "created_at": now,
            "expires_at": expires,
            "model_id": request.model_id,
            "batch": request.batch,
            "estimated_input": request.estimated_input_tokens,
            "reserved_pico": reserved_pico,
        }
        store.insert_lease_and_commit(connection, row, holds, taken, counts.refunds)
        return Admitted(lease, reserved_pico, expires)

    # --- renew, release, settle, expire ------------------------------------------------------------------------

    def renew(self, lease_id: str) -> datetime | None:
        """Push an open lease's expiry to now + lease_ttl; None when it is unknown, expired or settled."""
        now = self._clock()
        expires = now + self.lease_ttl
        try:
            with self._engine.begin() as connection:
                return expires if store.renew_lease(connection, lease_id, now, expires) else None
        except SQLAlchemyError as exc:
            _warn_away("renew", exc)
            raise AdmissionAway("storage unavailable: the lease cannot be renewed now; retry", 5) from None

    def settled_how(self, lease_id: str) -> str | None:
        """How a lease ended ('usage event', 'release', 'expired'), or None when it is open or unknown."""
        now = self._clock()
        try:
            with self._engine.connect() as connection:
                row = store.lease_row(connection, lease_id)
        except SQLAlchemyError as exc:
            _warn_away("renew", exc)
            raise AdmissionAway("storage unavailable: the lease cannot be read now; retry", 5) from None
        if row is None:
            return None
        if row.ended is not None:
            return str(row.ended)
        if row.expires_at <= now:
            return "expired"
        return "release" if row.released_at is not None else None

    def release(self, lease_id: str, request_id: str | None, usage: Any) -> tuple[str, int | None]:
        """Settle a lease with the call's actual usage, on any replica: ('released', cost) or how it had already
        ended. Slots and input tokens return at once; the actual usage stays reserved until the usage event lands."""
        try:
            return self._release(lease_id, request_id, usage)
        except SQLAlchemyError as exc:  # nothing was stored: the proxy retries, or the lease expires
            _warn_away("release", exc)
            raise AdmissionAway("storage unavailable: nothing was released; retry", 5) from None

    def _release(self, lease_id: str, request_id: str | None, usage: Any) -> tuple[str, int | None]:
        now = self._clock()
        with self._engine.connect() as connection, connection.begin():
            held = store.lease_for_release(connection, lease_id, request_id)
            if held is None:
                return "unknown", None
            if held.ended is not None:
                return held.ended, None
            if held.expires_at <= now:
                store.finish_release(
                    connection, lease_id, now=now, expires_at=held.expires_at, ended="expired", ended_at=held.expires_at
                )
                return "expired", None
            if held.released:
                return "release", None
            actual: Usage | None = None
            cost: int | None = None
            if usage is not None:
                parsed = self._parser.parse_object(
                    {
                        "request_id": request_id or lease_id,
                        "timestamp": now.isoformat(),
                        "model": held.model_id,
                        "usage": usage,
                        "batch": held.batch,
                    }
                )
                if isinstance(parsed, Rejected):
                    raise BadAdmit(parsed.reason)
                cost = self._prices.price(parsed).cost_pico
                actual = _usage_of(parsed, cost or 0)
            if held.event_stored:
                # This call's usage event is already stored (it named no lease): nothing is left to hold.
                store.finish_release(connection, lease_id, now=now, expires_at=now, ended="usage event")
                return "usage event", None
            refunds: list[tuple[str, str, int]] = []
            kept: dict[str, int] = {}
            if actual is not None:
                prompt = actual.input + actual.cache_write_5m + actual.cache_write_1h
                for kind, name, scope, amount in held.holds:
                    budget = self._budgets.get(name) if kind == "budget" else None
                    if kind == "itpm":
                        refunds.append((name, scope, amount - prompt))
                    elif budget is not None and budget.amount(actual):
                        kept[name] = budget.amount(actual)
            # The event should follow within lease_ttl; else the hold ends with the lease.
            store.finish_release(
                connection,
                lease_id,
                now=now,
                kept=kept,
                refunds=refunds,
                request_id=request_id,
                expires_at=now + self.lease_ttl if kept else now,
                ended=None if kept else "release",
            )
            return "release", cost

    def on_batch(
        self, touched: Mapping[tuple[str, str], Usage], settles: Sequence[tuple[str, str | None, int]]
    ) -> None:
        """Nothing to do: the batch's transaction settled its leases, and spend is read from the store."""

    def sweep(self) -> int:
        """Mark leases past their time expired, end released leases whose event raced the release, give old
        input-token refunds back to their buckets, delete leases ended more than lease_ttl ago and buckets back at
        their burst (a new bucket is full too, so nothing changes)."""
        now = self._clock()
        try:
            with self._engine.begin() as connection:
                expired = store.expire_and_forget(connection, now, now - self.lease_ttl)
                store.end_released_with_events(connection, now)
            with self._engine.begin() as connection:
                scopes = store.old_refund_scopes(connection, now - self.lease_ttl)
                if scopes:
                    store.lock_scopes(connection, [store.lock_key("limit", name, scope) for name, scope in scopes])
                    store.fold_refunds(connection, scopes)
            self._drop_full_buckets(now)
        except SQLAlchemyError as exc:  # expired holds stop counting by themselves; the next sweep deletes them
            log.warning("admission: sweep skipped, the database is away (%s)", exc.__class__.__name__)
            return 0
        if expired:
            log.info("admission: %d lease(s) expired unrenewed; their slots and reservations returned", expired)
        return expired

    def _drop_full_buckets(self, now: datetime) -> int:
        """Delete the stored buckets that are full by `now` — their level refilled since their last update at their
        limit's rate, as the memory state decides — and those of limits or kinds no longer configured; `sweep_chunk`
        buckets read per transaction, at most SWEEP_CHUNKS transactions a sweep (the next goes on from there). A
        bucket refunds wait for stays until they are folded into it."""
        rates: dict[tuple[str, str], tuple[int | None, int]] = {}
        for limit in self.limits:
            rates[limit.name, "rpm"] = (limit.requests_per_minute, limit.burst)
            rates[limit.name, "itpm"] = (limit.input_tokens_per_minute, limit.input_tokens_burst)
        dropped = 0
        for _chunk in range(SWEEP_CHUNKS):
            after = self._bucket_cursor
            with self._engine.begin() as connection:
                rows = store.bucket_chunk(connection, after, self.sweep_chunk)
                full = []
                for name, scope, kind, level, at, waiting in rows:
                    per_minute, capacity = rates.get((name, kind), (None, 0))
                    if waiting:
                        continue
                    # Read as an admit reads it: a level above capacity is full; then refilled to now.
                    if per_minute is None or (
                        TokenBucket(min(float(capacity), level), at).refill(now, per_minute, capacity) >= capacity
                    ):
                        full.append((name, scope, kind, level, at))
                dropped += store.drop_buckets(connection, full)
            if len(rows) < self.sweep_chunk:
                self._bucket_cursor = None  # the end: the next sweep starts again from the first
                break
            self._bucket_cursor = (rows[-1][0], rows[-1][1], rows[-1][2])
        return dropped

    def spend_mark(self) -> int:
        """Ceilings are not used: spend is read in every admit's transaction."""
        return 0

    def on_ceilings(self, mark: int, ceilings: Mapping[str, Ceiling]) -> None:
        """Ceilings are not used: spend is read in every admit's transaction."""

    def close(self) -> None:
        """Close the pool's connections."""
        self._engine.dispose()

    # --- observing ----------------------------------------------------------------------------------------------

    def reserved(self, budget: str, key: str) -> int:
        """What unexpired leases hold against one budget scope, in the budget's measure."""
        with self._engine.connect() as connection:
            return store.reserved_now(connection, budget, key, self._clock())

    def stats(self) -> AdmissionStats:
        """Outcomes decided by this replica; calls in flight, reservations and open leases as the database has
        them, the same whichever replica is asked."""
        try:
            with self._engine.connect() as connection:
                totals = store.held_totals(connection, self._clock())
            self._last_totals = totals
        except SQLAlchemyError:  # the database is away: the last figures read (readiness says it is away)
            totals = self._last_totals
        reserving = {b.name for b in self.reserving_budgets}
        with self._lock:
            outcomes = dict(self._outcomes)
        return AdmissionStats(
            outcomes,
            {limit.name: totals.slots.get(limit.name, 0) for limit in self.limits},
            {slot: pico for slot, pico in totals.reserved.items() if slot[0] in reserving},
            totals.open_leases,
        )
