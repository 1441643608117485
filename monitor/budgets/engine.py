"""Budget evaluation: full passes over budget_usage on a schedule, and the fast path after each ingested batch."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from monitor.budgets import Budget, BudgetIndex, ScopeState, evaluate_scope
from monitor.budgets.counters import USAGE_FIELDS, Usage
from monitor.budgets.throttle import Flag, ThrottleState, flag_from_state
from monitor.pricing import format_usd
from monitor.store.models import budget_definitions, budget_usage, events
from monitor.store.queries import USAGE_KEY, scope_buckets, upsert_adding, usage_period, window_totals
from monitor.wire import iso_z, scope_key

log = logging.getLogger(__name__)
TOP_SCOPES = 10  # of a `per:` budget, the biggest spenders are always shown, whatever their utilization
ChangeKind = Literal["new", "changed", "removed"]


@dataclass(frozen=True)
class DefinitionChange:
    """One budget whose configured definition differs from the one its stored counts were made for."""

    budget: str
    change: ChangeKind
    since: datetime | None = None  # new or changed: where a recount would start
    rows: int = 0  # removed: the budget_usage rows applying the config would delete

    def describe(self) -> str:
        """What applying the config would do to this budget, in one sentence."""
        if self.change == "removed":
            return f"budget {self.budget} is stored but not configured: applying would drop its {self.rows:,} rows"
        verb = "count it" if self.change == "new" else "recount it"
        when = iso_z(self.since) if self.since is not None else "its window start"
        return f"budget {self.budget} is {self.change}: applying would {verb} from the stored events since {when}"

    def as_dict(self) -> dict[str, Any]:
        """The change as JSON."""
        return {
            "budget": self.budget,
            "change": self.change,
            "since": iso_z(self.since) if self.since is not None else None,
            "rows": self.rows if self.change == "removed" else None,
        }


def stored_definitions(connection: Connection) -> dict[str, str]:
    """Budget name -> the definition digest its budget_usage rows were counted for."""
    query = select(budget_definitions.c.budget, budget_definitions.c.definition)
    return {name: definition for name, definition in connection.execute(query)}


@dataclass(frozen=True)
class BudgetSummary:
    """One budget after an evaluation: the scopes worth showing, and how many there are in all.

    Immutable, like the `summaries` mapping that holds it: the fast path publishes a new summary rather than
    changing one, so a scrape or /v1/budgets can iterate `states` while ingest and evaluations go on.
    """

    budget: Budget
    states: Mapping[str, ScopeState] = field(default_factory=lambda: MappingProxyType({}))
    scopes_total: int = 0
    scopes_throttled: int = 0


@dataclass(frozen=True)
class EvaluationStats:
    """When the last full evaluation ran, how long it took, and what it saw."""

    at: datetime
    seconds: float
    budgets: int
    scopes: int
    flags: int


@dataclass(frozen=True)
class Ceiling:
    """What one evaluation proved about a `per:` budget's quiet scopes: every scope not in `hot` had at most
    `amount` in the window whose first bucket was `first` (`hot`: the scopes at or over the lowest threshold)."""

    first: datetime
    hot: frozenset[str]
    amount: int


class CeilingListener(Protocol):
    """Told each evaluation's ceilings, to decide quiet scopes without reading them (admission)."""

    def spend_mark(self) -> int:
        """A mark taken before the evaluation reads: batches reported after it may be missing from the read."""
        ...

    def on_ceilings(self, mark: int, ceilings: Mapping[str, Ceiling]) -> None:
        """The ceilings of every `per:` budget with throttle_at, read after `mark`."""
        ...


@dataclass(frozen=True)
class BudgetRead:
    """One budget as an evaluation read it: the states worth showing (every scope at or over its lowest threshold —
    all of a plain budget's — then the biggest quiet ones), which of them are those `hot` ones, how many scopes it
    has, and the ceiling of its quiet scopes (a `per:` budget with throttle_at; None otherwise)."""

    states: dict[str, ScopeState]
    hot: frozenset[str]
    scopes_total: int
    ceiling: Ceiling | None


def read_budgets(connection: Connection, budgets: Sequence[Budget], now: datetime, zone: ZoneInfo) -> list[BudgetRead]:
    """Each budget's window totals at `now`, read and judged: the heavy part of an evaluation, with no engine state
    (so it can run in another process)."""
    out = []
    for budget in budgets:
        states: dict[str, ScopeState] = {}
        first, last = budget.bucket_range(now, zone)
        lowest = budget.thresholds[0] if budget.thresholds else None
        candidates: list[tuple[int, str, Usage]] = []
        hot_keys: set[str] = set()
        quiet_most = scopes_total = 0
        for key, usage in window_totals(connection, budget.name, first, last):
            scopes_total += 1
            amount = budget.amount(usage)
            if budget.per is None or (lowest is not None and budget.over(amount, lowest)):
                hot_keys.add(key)
                states[key] = _read_state(connection, budget, key, usage, now, zone)
                continue
            quiet_most = max(quiet_most, amount)
            candidates.append((amount, key, usage))
            if len(candidates) > 4 * TOP_SCOPES:
                candidates.sort(key=lambda c: -c[0])
                del candidates[TOP_SCOPES:]
        candidates.sort(key=lambda c: -c[0])
        for _amount, key, usage in candidates[:TOP_SCOPES]:
            states[key] = evaluate_scope(budget, json.loads(key), usage, now, zone)
        if budget.per is None and not states:  # no usage yet in this window: show it at zero
            key = scope_key(dict(budget.match))
            states[key] = evaluate_scope(budget, dict(budget.match), Usage(), now, zone)
        ceiling = None
        if budget.per is not None and budget.throttle_at is not None:
            ceiling = Ceiling(first, frozenset(hot_keys), quiet_most)
        out.append(BudgetRead(states, frozenset(hot_keys), scopes_total, ceiling))
    return out


def _read_state(
    connection: Connection, budget: Budget, key: str, usage: Usage, now: datetime, zone: ZoneInfo
) -> ScopeState:
    buckets = None
    if (
        budget.bucket is not None
        and budget.throttle_at is not None
        and budget.over(budget.amount(usage), budget.throttle_at)
    ):
        buckets = scope_buckets(connection, budget.name, key, budget.first_bucket(now, zone))
    return evaluate_scope(budget, json.loads(key), usage, now, zone, buckets)


class BudgetEngine:
    """Keeps budget states and throttle flags current from the store; thread-safe."""

    def __init__(
        self,
        engine: Engine,
        budgets: Sequence[Budget],
        zone: ZoneInfo,
        clock: Callable[[], datetime],
        throttle: ThrottleState,
    ) -> None:
        self._engine = engine
        self.budgets = list(budgets)
        self._by_name = {b.name: b for b in self.budgets}
        self.index = BudgetIndex(self.budgets)
        self._zone = zone
        self._clock = clock
        self.throttle = throttle
        throttle.set_index(self.index)
        self._lock = threading.Lock()
        self.summaries: Mapping[str, BudgetSummary] = MappingProxyType({b.name: BudgetSummary(b) for b in self.budgets})
        self._batches = 0  # fast-path updates so far
        self._batch_states: dict[tuple[str, str], tuple[int, ScopeState]] = {}  # newest fast-path state per scope
        self._calendar_windows: dict[str, tuple[datetime, datetime]] = {}  # the fast path's, per calendar budget
        self.last: EvaluationStats | None = None
        self.failing = False  # the last evaluation could not reach the store: answers come from older state
        # Where an evaluation's reads run, when not here (the daemon's ingest worker process): `read_budgets` there.
        self.reader: Callable[[Sequence[Budget], datetime], list[BudgetRead]] | None = None

    # --- keeping budget_usage true to the configured budgets ---------------------------------------------------

    def pending_definition_changes(self) -> list[DefinitionChange]:
        """How the configured budgets differ from the definitions budget_usage was counted for; reads only."""
        now = self._clock()
        with self._engine.connect() as connection:
            stored = stored_definitions(connection)
            changes = []
            for budget in self.budgets:
                if stored.get(budget.name) != budget.definition:
                    kind: ChangeKind = "changed" if budget.name in stored else "new"
                    changes.append(DefinitionChange(budget.name, kind, budget.first_bucket(now, self._zone)))
            for name in sorted(set(stored) - set(self._by_name)):
                rows = connection.execute(
                    select(func.count()).select_from(budget_usage).where(budget_usage.c.budget == name)
                ).scalar_one()
                changes.append(DefinitionChange(name, "removed", rows=int(rows)))
        return changes

    def apply_definitions(self) -> list[str]:
        """Recount every budget that is new or whose match, per or window changed; forget removed ones.

        This rewrites budget state that every replica reads: the daemon's leader runs it at start (and whenever it
        finds the stored definitions differ from its config), and `ingest --recount` on request; nothing else does.
        """
        now = self._clock()
        recounted = []
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            stored = stored_definitions(connection)
            for name in set(stored) - set(self._by_name):
                connection.execute(delete(budget_usage).where(budget_usage.c.budget == name))
                connection.execute(delete(budget_definitions).where(budget_definitions.c.budget == name))
                log.info("budget %s is no longer configured: its counts are dropped", name)
            add = upsert_adding(budget_usage, connection.dialect, USAGE_KEY, USAGE_FIELDS)
            for budget in self.budgets:
                if stored.get(budget.name) == budget.definition:
                    continue
                since = budget.first_bucket(now, self._zone)
                connection.execute(delete(budget_usage).where(budget_usage.c.budget == budget.name))
                deltas = self._recount(connection, budget, since)
                rows = [
                    {
                        "budget": budget.name,
                        "period": usage_period(budget.bucket is not None, bucket, connection.dialect.name),
                        "scope": key,
                        "bucket_start": bucket,
                        **dict(zip(USAGE_FIELDS, usage.as_tuple(), strict=True)),
                    }
                    for (key, bucket), usage in deltas.items()
                ]
                for start in range(0, len(rows), 5000):
                    connection.execute(add, rows[start : start + 5000])
                connection.execute(delete(budget_definitions).where(budget_definitions.c.budget == budget.name))
                connection.execute(
                    budget_definitions.insert().values(
                        budget=budget.name, definition=budget.definition, counted_since=since, updated_at=now
                    )
                )
                recounted.append(budget.name)
                log.info("budget %s: counted %d scope buckets from %s", budget.name, len(rows), since.isoformat())
        return recounted

    sync_definitions = apply_definitions  # the name it had before reading and applying were separate

    def _recount(self, connection: Connection, budget: Budget, since: datetime) -> dict[tuple[str, datetime], Usage]:
        query = select(
            events.c.ts,
            events.c.model,
            events.c.attributes,
            events.c.input_tokens,
            events.c.output_tokens,
            events.c.cache_read_tokens,
            events.c.cache_write_5m_tokens,
            events.c.cache_write_1h_tokens,
            events.c.cost_pico,
        ).where(events.c.ts >= since)
        deltas: dict[tuple[str, datetime], Usage] = {}
        for ts, model, attributes, *counts in connection.execute(query.execution_options(yield_per=5000)):
            scope = budget.scope_of(model, attributes or {})
            if scope is None:
                continue
            key = (scope_key(scope), budget.bucket_of(ts, self._zone))
            usage = deltas.get(key)
            if usage is None:
                usage = deltas[key] = Usage()
            usage.add(Usage(1, *(int(c or 0) for c in counts)))
        return deltas

    # --- full evaluation -------------------------------------------------------------------------------------

    def evaluate(self, listener: CeilingListener | None = None) -> EvaluationStats:
        """Recompute every budget's scopes from budget_usage, replace the flags, rewrite the snapshot; tell
        `listener` the ceiling of each `per:` budget's scopes under its lowest threshold."""
        started = time.perf_counter()
        now = self._clock()
        mark = listener.spend_mark() if listener is not None else 0
        ceilings: dict[str, Ceiling] = {}
        shown: dict[str, tuple[dict[str, ScopeState], int, int]] = {}  # budget -> states, scopes, throttled
        flags: dict[tuple[str, str], Flag] = {}
        with self._lock:
            batches_from = self._batches
        current = self.throttle.flags
        read_from = self.throttle.generation  # before the first read: later fast-path flags survive the replace
        scopes = 0
        if self.reader is not None:
            reads = self.reader(self.budgets, now)
        else:
            with self._engine.connect() as connection:
                reads = read_budgets(connection, self.budgets, now, self._zone)
        for budget, read in zip(self.budgets, reads, strict=True):
            scopes_throttled = 0
            for key, state in read.states.items():
                if key in read.hot and state.throttled:  # quiet scopes are under every threshold: never flagged
                    scopes_throttled += 1
                    old = current.get((budget.name, key))
                    flags[budget.name, key] = flag_from_state(state, old.since if old else now)
            scopes += read.scopes_total
            shown[budget.name] = (dict(read.states), read.scopes_total, scopes_throttled)
            if read.ceiling is not None:
                ceilings[budget.name] = read.ceiling
        with self._lock:
            # States the fast path computed after this evaluation began to read are newer than what it read.
            later = {k: st for k, (n, st) in self._batch_states.items() if n > batches_from}
            self._batch_states = {k: (n, st) for k, (n, st) in self._batch_states.items() if n > batches_from}
            for (name, key), state in later.items():
                if name in shown and _shown(shown[name][0], key, state):
                    shown[name][0][key] = state
            self.summaries = MappingProxyType(
                {
                    budget.name: BudgetSummary(budget, MappingProxyType(states), total, throttled)
                    for budget in self.budgets
                    for states, total, throttled in [shown[budget.name]]
                }
            )
        self.throttle.replace(flags, now, read_from)
        self.throttle.write_snapshot(now)
        if listener is not None:
            listener.on_ceilings(mark, ceilings)
        self.last = EvaluationStats(now, time.perf_counter() - started, len(self.budgets), scopes, len(flags))
        return self.last

    # --- the fast path ---------------------------------------------------------------------------------------

    def on_batch(self, touched: dict[tuple[str, str], Usage]) -> bool:
        """Update the scopes a committed batch added to; flag any that crossed throttle_at. True if flags changed."""
        if not touched:
            return False
        now = self._clock()
        set_flags: dict[tuple[str, str], Flag] = {}
        current = self.throttle.flags
        updated: list[tuple[str, str, ScopeState]] = []
        windows: dict[str, tuple[datetime, datetime]] = {}  # every scope of a budget shares its window at `now`
        batch_states = self._batch_states
        for (name, key), usage in touched.items():
            budget = self._by_name.get(name)
            if budget is None:
                continue
            buckets = None
            if (
                budget.bucket is not None
                and budget.throttle_at is not None
                and budget.over(budget.amount(usage), budget.throttle_at)
            ):
                try:
                    with self._engine.connect() as connection:
                        buckets = scope_buckets(connection, name, key, budget.first_bucket(now, self._zone))
                except SQLAlchemyError as exc:
                    # The batch is committed and its sender waits for the answer: flag now, as if all of the
                    # scope's usage had just happened (the latest it can free); the next evaluation corrects it.
                    log.warning(
                        "budget %s: cannot read the buckets of scope %s (%s); its flag holds a whole window "
                        "until the next evaluation",
                        name,
                        key,
                        exc.__class__.__name__,
                    )
                    buckets = [(budget.bucket_of(now, self._zone), usage)]
            window = windows.get(name)
            if window is None:
                window = windows[name] = self._window(budget, now)
            # A scope the fast path has seen since the last evaluation keeps its parsed key (states never change it).
            seen = batch_states.get((name, key))
            scope = seen[1].scope if seen is not None else json.loads(key)
            state = evaluate_scope(budget, scope, usage, now, self._zone, buckets, window)
            updated.append((name, key, state))
            if state.throttled:
                old = current.get((name, key))
                set_flags[name, key] = flag_from_state(state, old.since if old else now)
        with self._lock:
            # Copy on write: readers holding the old summaries go on iterating them undisturbed.
            self._batches += 1
            fresh: dict[str, dict[str, ScopeState]] = {}
            for name, key, state in updated:
                self._batch_states[name, key] = (self._batches, state)
                summary = self.summaries.get(name)
                if summary is None or not _shown(summary.states, key, state):
                    continue
                if name not in fresh:
                    fresh[name] = dict(summary.states)
                fresh[name][key] = state
            if fresh:
                summaries = dict(self.summaries)
                for name, states in fresh.items():
                    summaries[name] = replace(summaries[name], states=MappingProxyType(states))
                self.summaries = MappingProxyType(summaries)
        changed = self.throttle.update(set_flags, set(), now) if set_flags else False
        if changed:
            self.throttle.write_snapshot(now)
        return changed

    def _window(self, budget: Budget, now: datetime) -> tuple[datetime, datetime]:
        """`budget.window_at(now)`; a calendar window is worked out once and reused while `now` is inside it."""
        if budget.bucket is not None:
            return budget.window_at(now, self._zone)
        known = self._calendar_windows.get(budget.name)
        if known is not None and known[0] <= now < known[1]:
            return known
        window = self._calendar_windows[budget.name] = budget.window_at(now, self._zone)
        return window

    def states(self) -> list[ScopeState]:
        """Every shown scope of every budget, in config order then by utilization."""
        out = []
        for summary in self.summaries.values():  # an immutable snapshot: no lock needed to iterate it
            out.extend(sorted(summary.states.values(), key=lambda s: (-s.utilization, scope_key(s.scope))))
        return out


def _shown(states: Mapping[str, ScopeState], key: str, state: ScopeState) -> bool:
    """Whether a scope belongs among a summary's shown states: every scope of a plain budget, and of a `per:` budget
    those already shown or at its lowest threshold."""
    budget = state.budget
    if budget.per is None or key in states:
        return True
    thresholds = budget.thresholds
    return bool(thresholds) and budget.over(state.amount, thresholds[0])


def state_json(state: ScopeState, flags: Mapping[tuple[str, str], Flag], now: datetime) -> dict[str, Any]:
    """One row of `budgets --format json` and GET /v1/budgets, plus the budget's own unit."""
    budget = state.budget
    flag = flags.get((budget.name, scope_key(state.scope)))
    usd = budget.measure == "usd"
    return {
        "budget": budget.name,
        "scope": state.scope,
        "window": str(budget.window),
        "window_start": iso_z(state.window_start),
        "window_end": iso_z(state.window_end),
        "spend_usd": format_usd(state.usage.cost_pico),
        "limit_usd": format_usd(budget.limit) if usd else None,
        "utilization": round(state.utilization, 6),
        "forecast_usd": format_usd(state.forecast_cost_pico // 10**6 * 10**6),  # an estimate: micro-dollars
        "throttled": flag is not None and flag.active(now),
        "until": iso_z(flag.until) if flag is not None else None,
        "measure": budget.measure,
        "amount": state.amount,
        "limit": budget.limit,
        "forecast": state.forecast_amount,
        "requests": state.usage.requests,
        "evaluated_at": iso_z(state.evaluated_at),
    }
