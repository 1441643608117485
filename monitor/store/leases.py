"""Admission state in PostgreSQL: per-scope locks, token buckets, what leases hold, and settling them on ingest.

Every statement here runs inside a transaction the caller holds. Admits that touch a scope take a transaction-scoped
advisory lock on a stable 64-bit hash of it, all of a call's scopes in ascending key order, so two admits of the same
scope on any replicas run one after the other and no two admits can wait for each other in a cycle. A statement that
reads after the locks are granted sees every admit that went before it (read committed: each statement's snapshot is
taken when it starts).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    func,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import DBAPIError

from monitor.budgets.counters import USAGE_FIELDS, Usage
from monitor.config import Settings, admission_in_database
from monitor.store.models import (
    admission_buckets,
    admission_holds,
    admission_leases,
    admission_refunds,
    event_ids,
)

# The leader and label locks are single bigint keys too; a scope hashing onto one of them moves aside.
_RESERVED_KEYS = frozenset({0x636C6D6C6162656C})


def lock_key(kind: str, name: str, scope: str) -> int:
    """The advisory lock key of one limit or budget scope: a stable signed 64-bit hash."""
    digest = hashlib.blake2b(f"{kind}\x00{name}\x00{scope}".encode(), digest_size=8, person=b"clm-admit").digest()
    key = int.from_bytes(digest, "big", signed=True)
    return key ^ 1 if key in _RESERVED_KEYS else key


_LOCK = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k"


def _driver(connection: Connection) -> Any:
    """The psycopg connection under a SQLAlchemy one: its pipeline mode sends several statements in one round trip."""
    return connection.connection.driver_connection


@contextmanager
def _pipeline(connection: Connection) -> Iterator[Any]:
    """psycopg's pipeline on the connection; its errors raised as SQLAlchemy's (a broken connection invalidated, so
    the pool replaces it), as statements sent through SQLAlchemy would be."""
    driver = _driver(connection)
    error = connection.dialect.loaded_dbapi.Error
    try:
        with driver.pipeline():
            yield driver
    except error as exc:
        if driver.closed or getattr(driver, "broken", False):
            connection.invalidate()
        raise DBAPIError.instance(None, None, exc, error) from None


def _psycopg(statement: str) -> str:
    """A statement with :name parameters in psycopg's %(name)s style (casts written :: are left alone)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement.replace("%", "%%"))


def lock_scopes(connection: Connection, keys: Iterable[int]) -> None:
    """Wait for, then hold until the transaction ends, the advisory lock of every key, in ascending order."""
    ordered = sorted(set(keys))
    if ordered:
        connection.execute(text(_LOCK), {"keys": ordered})


@dataclass
class Bucket:
    """A stored token bucket: its level at `at`, refunds folded in (a level above capacity reads as full)."""

    level: float
    at: datetime


@dataclass
class ScopeCounts:
    """One snapshot of the scopes a call counts toward: slots held, reservations, window spend, token buckets with
    the refunds waiting for them folded in (and those refunds' ids, deleted when the admit is stored)."""

    slots: dict[tuple[str, str], int] = field(default_factory=dict)
    reserved: dict[tuple[str, str], int] = field(default_factory=dict)
    spend: dict[tuple[str, str], Usage] = field(default_factory=dict)
    buckets: dict[tuple[str, str, str], Bucket] = field(default_factory=dict)
    refunds: list[int] = field(default_factory=list)
    # (limit, scope) -> refunds waiting for an input-token bucket the sweep deleted (it was full): they apply to a
    # full bucket (only a call that used more than its estimate lowers it).
    orphaned: dict[tuple[str, str], int] = field(default_factory=dict)


_SUMS = ", ".join(f"sum(u.{name})" for name in USAGE_FIELDS)
_ZEROS = ", ".join(["0"] * (len(USAGE_FIELDS) - 1))
# One statement whatever the call counts toward (the scopes come as arrays), so it is parsed and planned once per
# connection (psycopg prepares it). Each row: part, name, scope, 7 numbers, kind, level, at.
_COUNT = f"""
    SELECT 'slot', h.name, h.scope, count(*), {_ZEROS}, NULL, NULL::float8, NULL::timestamp
    FROM admission_holds h
    JOIN unnest(CAST(:slot_names AS text[]), CAST(:slot_scopes AS text[])) AS k(name, scope)
        ON h.name = k.name AND h.scope = k.scope
    WHERE h.kind = 'slot' AND h.expires_at > :now
    GROUP BY h.name, h.scope
    UNION ALL
    SELECT 'budget', h.name, h.scope, sum(h.amount), {_ZEROS}, NULL, NULL, NULL
    FROM admission_holds h
    JOIN unnest(CAST(:budget_names AS text[]), CAST(:budget_scopes AS text[])) AS k(name, scope)
        ON h.name = k.name AND h.scope = k.scope
    WHERE h.kind = 'budget' AND h.expires_at > :now
    GROUP BY h.name, h.scope
    UNION ALL
    SELECT 'spend', u.budget, u.scope, {_SUMS}, NULL, NULL, NULL
    FROM budget_usage u
    JOIN unnest(CAST(:budget_names AS text[]), CAST(:budget_scopes AS text[]), CAST(:firsts AS timestamp[]),
                CAST(:ends AS timestamp[])) AS w(name, scope, first, last)
        ON u.budget = w.name AND u.period = TIMESTAMP '1970-01-01' AND u.scope = w.scope  -- every row's, here
       AND u.bucket_start >= w.first
       AND (w.last IS NULL OR u.bucket_start < w.last)
    GROUP BY u.budget, u.scope
    UNION ALL
    SELECT 'bucket', b.name, b.scope, {_ZEROS}, 0, b.kind, b.level, b.updated_at
    FROM admission_buckets b
    JOIN unnest(CAST(:bucket_names AS text[]), CAST(:bucket_scopes AS text[]), CAST(:bucket_kinds AS text[]))
        AS k(name, scope, kind) ON b.name = k.name AND b.scope = k.scope AND b.kind = k.kind
    UNION ALL
    SELECT 'refund', r.name, r.scope, r.id, r.amount, {", ".join(["0"] * (len(USAGE_FIELDS) - 2))}, NULL, NULL, NULL
    FROM admission_refunds r
    JOIN unnest(CAST(:refund_names AS text[]), CAST(:refund_scopes AS text[])) AS k(name, scope)
        ON r.name = k.name AND r.scope = k.scope
    """
_COUNT_PSYCOPG = _psycopg(_COUNT)
_LOCK_PSYCOPG = _psycopg(_LOCK)
_NUMBERS = len(USAGE_FIELDS)


def lock_and_count(
    connection: Connection,
    keys: Iterable[int],
    now: datetime,
    slots: Sequence[tuple[str, str]],
    budgets: Sequence[tuple[str, str, datetime, datetime | None]],
    buckets: Sequence[tuple[str, str, str]] = (),
    refunded: Sequence[tuple[str, str]] = (),
) -> ScopeCounts:
    """Slots held per (limit, scope), reserved per (budget, scope), window totals per (budget, scope) from
    `budget_usage` (first bucket, end), the stored (limit, scope, kind) buckets and the refunds waiting for the
    `refunded` (limit, scope)s' input-token buckets — in one statement, so that spend and reservations come from one
    snapshot: a usage event committed meanwhile moves its call from reserved to spent at once, never counted in both
    or neither. The locks of `keys` are taken first (ascending) and held until the transaction ends; the read starts
    once they are granted, so it sees every admit that held them before. Lock and read go in one round trip
    (pipelined with the transaction's BEGIN). Buckets are written only under their scope's lock."""
    counts = ScopeCounts()
    ordered = sorted(set(keys))
    if not (slots or budgets or buckets or refunded):
        lock_scopes(connection, ordered)
        return counts
    parameters = {
        "now": _naive(now),
        "slot_names": [name for name, _ in slots],
        "slot_scopes": [scope for _, scope in slots],
        "budget_names": [b[0] for b in budgets],
        "budget_scopes": [b[1] for b in budgets],
        "firsts": [_naive(b[2]) for b in budgets],
        "ends": [None if b[3] is None else _naive(b[3]) for b in budgets],
        "bucket_names": [b[0] for b in buckets],
        "bucket_scopes": [b[1] for b in buckets],
        "bucket_kinds": [b[2] for b in buckets],
        "refund_names": [r[0] for r in refunded],
        "refund_scopes": [r[1] for r in refunded],
    }
    with _pipeline(connection) as driver:
        if ordered:
            driver.execute(_LOCK_PSYCOPG, {"keys": ordered})
        cursor = driver.execute(_COUNT_PSYCOPG, parameters)
    waiting: list[tuple[str, str, int]] = []
    for row in cursor.fetchall():
        part, name, scope = row[0], row[1], row[2]
        values = [int(v or 0) for v in row[3 : 3 + _NUMBERS]]
        if part == "slot":
            counts.slots[name, scope] = values[0]
        elif part == "budget":
            counts.reserved[name, scope] = values[0]
        elif part == "spend":
            counts.spend[name, scope] = Usage(*values)
        elif part == "bucket":
            at = row[5 + _NUMBERS].replace(tzinfo=UTC)  # stored without zone: a UTC instant
            counts.buckets[name, scope, row[3 + _NUMBERS]] = Bucket(float(row[4 + _NUMBERS]), at)
        else:
            counts.refunds.append(values[0])
            waiting.append((name, scope, values[1]))
    for name, scope, amount in waiting:
        bucket = counts.buckets.get((name, scope, "itpm"))
        if bucket is not None:
            bucket.level += amount
        else:  # no row: the sweep deleted it, full
            counts.orphaned[name, scope] = counts.orphaned.get((name, scope), 0) + amount
    return counts


_ADMIT = _psycopg(
    """
    WITH lease AS (
        INSERT INTO admission_leases (id, created_at, expires_at, model_id, batch, estimated_input, reserved_pico)
        VALUES (:id, :created_at, :expires_at, :model_id, :batch, :estimated_input, :reserved_pico)
    ), holds AS (
        INSERT INTO admission_holds (lease, kind, name, scope, amount, expires_at)
        SELECT :id, h.kind, h.name, h.scope, h.amount, :expires_at FROM unnest(
            CAST(:hold_kinds AS text[]), CAST(:hold_names AS text[]), CAST(:hold_scopes AS text[]),
            CAST(:hold_amounts AS bigint[])) AS h(kind, name, scope, amount)
    ), buckets AS (
        INSERT INTO admission_buckets (name, scope, kind, level, updated_at)
        SELECT b.name, b.scope, b.kind, b.level, b.at FROM unnest(
            CAST(:bucket_names AS text[]), CAST(:bucket_scopes AS text[]), CAST(:bucket_kinds AS text[]),
            CAST(:bucket_levels AS float8[]), CAST(:bucket_ats AS timestamp[])) AS b(name, scope, kind, level, at)
        ON CONFLICT (name, scope, kind) DO UPDATE SET level = excluded.level, updated_at = excluded.updated_at
    ), refunds AS (
        DELETE FROM admission_refunds WHERE id = ANY(CAST(:refunds AS bigint[]))
    )
    SELECT 1
    """
)


def insert_lease_and_commit(
    connection: Connection,
    lease: Mapping[str, Any],
    holds: Sequence[tuple[str, str, str, int]],
    buckets: Mapping[tuple[str, str, str], Bucket],
    refunds: Sequence[int] = (),
) -> None:
    """Store an admitted lease, what it holds (kind, name, scope, amount), the buckets it took from, drop the
    refunds folded into them, and commit (which frees the scopes' locks): one statement and COMMIT, one round trip."""
    ordered = sorted(buckets.items())
    with _pipeline(connection) as driver:
        driver.execute(
            _ADMIT,
            {
                **lease,
                "created_at": _naive(lease["created_at"]),
                "expires_at": _naive(lease["expires_at"]),
                "hold_kinds": [h[0] for h in holds],
                "hold_names": [h[1] for h in holds],
                "hold_scopes": [h[2] for h in holds],
                "hold_amounts": [h[3] for h in holds],
                "bucket_names": [key[0] for key, _ in ordered],
                "bucket_scopes": [key[1] for key, _ in ordered],
                "bucket_kinds": [key[2] for key, _ in ordered],
                "bucket_levels": [float(bucket.level) for _, bucket in ordered],
                "bucket_ats": [_naive(bucket.at) for _, bucket in ordered],
                "refunds": list(refunds),
            },
        )
        driver.commit()


@dataclass
class HeldLease:
    """A lease as a release finds it (locked), with what it holds and whether the request id's event is stored."""

    model_id: str
    batch: bool
    expires_at: datetime
    released: bool
    ended: str | None
    holds: list[tuple[str, str, str, int]]  # (kind, name, scope, amount)
    event_stored: bool


def lease_for_release(connection: Connection, lease: str, request_id: str | None) -> HeldLease | None:
    """The lease locked until the transaction ends, what it holds, and whether a usage event with `request_id` is
    stored: one statement. None when unknown."""
    leases, holds = admission_leases.c, admission_holds.c
    stored: Any = (
        select(event_ids.c.request_id).where(event_ids.c.request_id == request_id).exists()
        if request_id is not None
        else literal(False)
    )
    rows = connection.execute(
        select(leases.model_id, leases.batch, leases.expires_at, leases.released_at, leases.ended,
               holds.kind, holds.name, holds.scope, holds.amount, stored)
        .select_from(admission_leases.outerjoin(admission_holds, holds.lease == leases.id))
        .where(leases.id == lease)
        .with_for_update(of=admission_leases)
    ).all()  # fmt: skip
    if not rows:
        return None
    first = rows[0]
    held = [(r.kind, r.name, r.scope, int(r.amount)) for r in rows if r.kind is not None]
    return HeldLease(
        first.model_id, first.batch, first.expires_at, first.released_at is not None, first.ended, held, bool(first[9])
    )


def lease_row(connection: Connection, lease: str) -> Any:
    """The lease's row; None when unknown."""
    return connection.execute(select(admission_leases).where(admission_leases.c.id == lease)).first()


_RELEASE = _psycopg(
    """
    WITH gone AS (
        DELETE FROM admission_holds
        WHERE lease = :lease AND NOT (kind = 'budget' AND name = ANY(CAST(:kept_names AS text[])))
    ), kept AS (
        UPDATE admission_holds h SET amount = k.amount, expires_at = :expires_at
        FROM unnest(CAST(:kept_names AS text[]), CAST(:kept_amounts AS bigint[])) AS k(name, amount)
        WHERE h.lease = :lease AND h.kind = 'budget' AND h.name = k.name
    ), refunds AS (
        INSERT INTO admission_refunds (name, scope, amount, created_at)
        SELECT r.name, r.scope, r.amount, :now FROM unnest(
            CAST(:refund_names AS text[]), CAST(:refund_scopes AS text[]), CAST(:refund_amounts AS bigint[]))
            AS r(name, scope, amount)
    )
    UPDATE admission_leases SET released_at = :now, request_id = :request_id, expires_at = :expires_at,
        ended = :ended, ended_at = :ended_at
    WHERE id = :lease
    """
)


def finish_release(
    connection: Connection,
    lease: str,
    *,
    now: datetime,
    kept: Mapping[str, int] | None = None,
    refunds: Sequence[tuple[str, str, int]] = (),
    request_id: str | None = None,
    expires_at: datetime,
    ended: str | None,
    ended_at: datetime | None = None,
) -> None:
    """One statement: drop every hold but the budget holds in `kept` (budget -> the call's actual usage, held until
    `expires_at`), queue input-token `refunds` (limit, scope, tokens), mark the lease released (and `ended`, when
    nothing is kept), and commit: one round trip."""
    kept = kept or {}
    refunds = [refund for refund in refunds if refund[2]]
    with _pipeline(connection) as driver:
        driver.execute(
            _RELEASE,
            {
                "lease": lease,
                "now": _naive(now),
                "expires_at": _naive(expires_at),
                "kept_names": list(kept),
                "kept_amounts": list(kept.values()),
                "refund_names": [r[0] for r in refunds],
                "refund_scopes": [r[1] for r in refunds],
                "refund_amounts": [r[2] for r in refunds],
                "request_id": request_id,
                "ended": ended,
                "ended_at": None if ended is None else _naive(ended_at or now),
            },
        )
        driver.commit()


_RENEW = text(
    """
    WITH renewed AS (
        UPDATE admission_leases SET expires_at = :expires_at
        WHERE id = :lease AND ended IS NULL AND released_at IS NULL AND expires_at > :now
        RETURNING id
    ), holds AS (
        UPDATE admission_holds SET expires_at = :expires_at WHERE lease IN (SELECT id FROM renewed)
    )
    SELECT count(*) FROM renewed
    """
)


def renew_lease(connection: Connection, lease: str, now: datetime, expires_at: datetime) -> bool:
    """Push an open, unreleased, unexpired lease's expiry (and its holds') to `expires_at`; False when it cannot."""
    found = connection.execute(_RENEW, {"lease": lease, "now": _naive(now), "expires_at": _naive(expires_at)}).scalar()
    return bool(found)


_SETTLE = text(
    """
    WITH settled AS (
        UPDATE admission_leases SET ended = 'usage event', ended_at = :now
        WHERE (id = ANY(CAST(:leases AS text[])) OR request_id = ANY(CAST(:requests AS text[])))
          AND ended IS NULL AND expires_at > :now
        RETURNING id, request_id, released_at IS NULL AS running
    ), gone AS (
        DELETE FROM admission_holds h USING settled s WHERE h.lease = s.id
        RETURNING h.lease, h.kind, h.name, h.scope, h.amount
    )
    INSERT INTO admission_refunds (name, scope, amount, created_at)
    SELECT g.name, g.scope, g.amount - coalesce(bl.prompt, br.prompt), :now
    FROM gone g
    JOIN settled s ON s.id = g.lease
    LEFT JOIN unnest(CAST(:leases AS text[]), CAST(:lease_prompts AS bigint[])) AS bl(id, prompt) ON bl.id = s.id
    LEFT JOIN unnest(CAST(:requests AS text[]), CAST(:request_prompts AS bigint[])) AS br(id, prompt)
        ON br.id = s.request_id
    WHERE g.kind = 'itpm' AND s.running AND g.amount <> coalesce(bl.prompt, br.prompt, g.amount)
    """
)


def settle_on_store(connection: Connection, settles: Sequence[tuple[str, str | None, int]], now: datetime) -> None:
    """In the transaction that stores a batch: end every open lease an event of it names (its `lease` field, or the
    request id a release named), in one statement. Slots and reservations go with the commit that adds the spend;
    input tokens a running call did not use wait in admission_refunds for their bucket's next admit."""
    if not settles:
        return
    by_lease: dict[str, int] = {}
    by_request: dict[str, int] = {}
    for request_id, lease, prompt in settles:
        by_request[request_id] = prompt
        if lease is not None:
            by_lease[lease] = prompt
    connection.execute(
        _SETTLE,
        {
            "now": _naive(now),
            "leases": list(by_lease),
            "lease_prompts": list(by_lease.values()),
            "requests": list(by_request),
            "request_prompts": list(by_request.values()),
        },
    )


SettleHook = Callable[[Connection, Sequence[tuple[str, str | None, int]], datetime], None]


def settler_for(settings: Settings) -> SettleHook | None:
    """What the write path calls to settle leases, wherever it runs (serve, its ingest worker, `ingest`): only when
    admission state is in the database and a lease can hold something (a limit, or a budget that throttles)."""
    holding = bool(settings.limits) or any(budget.throttle_at is not None for budget in settings.budgets)
    return settle_on_store if admission_in_database(settings) and holding else None


_FOLD = text(
    """
    WITH gone AS (
        DELETE FROM admission_refunds WHERE (name, scope) IN (SELECT * FROM unnest(
            CAST(:names AS text[]), CAST(:scopes AS text[])))
        RETURNING name, scope, amount
    ), sums AS (
        SELECT name, scope, sum(amount) AS delta FROM gone GROUP BY name, scope
    )
    UPDATE admission_buckets b SET level = b.level + sums.delta
    FROM sums WHERE b.name = sums.name AND b.scope = sums.scope AND b.kind = 'itpm'
    """
)


def old_refund_scopes(connection: Connection, before: datetime, most: int = 1000) -> list[tuple[str, str]]:
    """(limit, scope) of input-token buckets with refunds waiting since before `before`."""
    refunds = admission_refunds.c
    rows = connection.execute(
        select(refunds.name, refunds.scope).where(refunds.created_at < before).distinct().limit(most)
    )
    return [(name, scope) for name, scope in rows]


def fold_refunds(connection: Connection, scopes: Sequence[tuple[str, str]]) -> None:
    """Give the waiting refunds of these (limit, scope)s back to their buckets (their locks held)."""
    if scopes:
        connection.execute(_FOLD, {"names": [n for n, _ in scopes], "scopes": [s for _, s in scopes]})


def bucket_chunk(connection: Connection, after: tuple[str, str, str] | None, most: int) -> list[Any]:
    """Up to `most` stored buckets after the key `after`, in key order: name, scope, kind, level, updated_at, and
    whether refunds wait for it."""
    buckets, refunds = admission_buckets.c, admission_refunds.c
    waiting = (
        select(refunds.id)
        .where(buckets.kind == "itpm", refunds.name == buckets.name, refunds.scope == buckets.scope)
        .exists()
    )
    query = select(buckets.name, buckets.scope, buckets.kind, buckets.level, buckets.updated_at, waiting)
    if after is not None:
        query = query.where(tuple_(buckets.name, buckets.scope, buckets.kind) > tuple_(*after))
    return list(connection.execute(query.order_by(buckets.name, buckets.scope, buckets.kind).limit(most)))


_DROP_BUCKETS = text(
    """
    DELETE FROM admission_buckets b
    USING unnest(CAST(:names AS text[]), CAST(:scopes AS text[]), CAST(:kinds AS text[]), CAST(:levels AS float8[]),
                 CAST(:ats AS timestamp[])) AS d(name, scope, kind, level, at)
    WHERE b.name = d.name AND b.scope = d.scope AND b.kind = d.kind AND b.level = d.level AND b.updated_at = d.at
      AND NOT (b.kind = 'itpm' AND EXISTS (
          SELECT 1 FROM admission_refunds r WHERE r.name = b.name AND r.scope = b.scope))
    """
)


def drop_buckets(connection: Connection, full: Sequence[tuple[str, str, str, float, datetime]]) -> int:
    """Delete these (limit, scope, kind, level, updated_at) buckets, each only if it is still as read and no refund
    waits for it (an admit that took from it meanwhile, under its scope's lock, keeps it); the number deleted."""
    if not full:
        return 0
    deleted = connection.execute(
        _DROP_BUCKETS,
        {
            "names": [row[0] for row in full],
            "scopes": [row[1] for row in full],
            "kinds": [row[2] for row in full],
            "levels": [float(row[3]) for row in full],
            "ats": [_naive(row[4]) for row in full],
        },
    ).rowcount
    return int(deleted or 0)


def expire_and_forget(connection: Connection, now: datetime, forget_before: datetime) -> int:
    """End leases past their expiry ('expired'), drop holds that no longer count, and delete leases that ended
    before `forget_before`; the number that expired now."""
    leases = admission_leases.c
    expired = connection.execute(
        update(admission_leases)
        .where(leases.ended.is_(None), leases.expires_at <= now)
        .values(ended="expired", ended_at=leases.expires_at)
    ).rowcount
    connection.execute(delete(admission_holds).where(admission_holds.c.expires_at <= now))
    connection.execute(delete(admission_leases).where(leases.ended.is_not(None), leases.ended_at < forget_before))
    return int(expired or 0)


_RACED = text(
    """
    WITH ended AS (
        UPDATE admission_leases l SET ended = 'usage event', ended_at = :now
        WHERE l.ended IS NULL AND l.request_id IS NOT NULL
          AND EXISTS (SELECT 1 FROM event_ids e WHERE e.request_id = l.request_id)
        RETURNING l.id
    )
    DELETE FROM admission_holds WHERE lease IN (SELECT id FROM ended)
    """
)


def end_released_with_events(connection: Connection, now: datetime) -> None:
    """End released leases whose named request id's usage event is stored (an event that raced the release)."""
    connection.execute(_RACED, {"now": _naive(now)})


@dataclass
class HeldTotals:
    """What unexpired holds add up to now, for /metrics."""

    slots: dict[str, int]  # limit -> calls in flight
    reserved: dict[tuple[str, str], int]  # (budget, scope) -> reserved
    open_leases: int


def held_totals(connection: Connection, now: datetime) -> HeldTotals:
    """Slots per limit, reservations per budget scope, and open leases: what every replica reads the same."""
    holds = admission_holds.c
    slots: dict[str, int] = {}
    reserved: dict[tuple[str, str], int] = {}
    rows = connection.execute(
        select(holds.kind, holds.name, holds.scope, func.count(), func.sum(holds.amount))
        .where(holds.kind.in_(("slot", "budget")), holds.expires_at > now)
        .group_by(holds.kind, holds.name, holds.scope)
    )
    for kind, name, scope, count, amount in rows:
        if kind == "slot":
            slots[name] = slots.get(name, 0) + int(count)
        else:
            reserved[name, scope] = int(amount or 0)
    leases = admission_leases.c
    open_leases = connection.execute(
        select(func.count()).where(leases.ended.is_(None), leases.expires_at > now)
    ).scalar()
    return HeldTotals(slots, reserved, int(open_leases or 0))


def reserved_now(connection: Connection, budget: str, scope: str, now: datetime) -> int:
    """What unexpired holds reserve against one budget scope."""
    holds = admission_holds.c
    total = connection.execute(
        select(func.sum(holds.amount)).where(
            holds.kind == "budget", holds.name == budget, holds.scope == scope, holds.expires_at > now
        )
    ).scalar()
    return int(total or 0)


def _naive(moment: datetime) -> datetime:
    """A UTC instant as the UTCDateTime columns store it (text statements bypass the column type)."""
    return moment.astimezone(UTC).replace(tzinfo=None)
