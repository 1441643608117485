"""Throttle flags: which budget scopes must stop, the decision for /v1/check, and the snapshot file for proxies."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from monitor.budgets import BudgetIndex, ScopeState
from monitor.pricing import format_usd
from monitor.wire import iso_z

log = logging.getLogger(__name__)
SNAPSHOT_MODE = 0o644  # readable by a proxy that runs as another user; only the daemon writes it
SNAPSHOT_ERROR_LOG_EVERY_S = 60.0  # a failing snapshot is reported at most this often, not once per write


@dataclass(frozen=True)
class Flag:
    """One throttled budget scope."""

    budget: str
    scope: dict[str, str]
    since: datetime
    until: datetime | None
    utilization: float
    spend_pico: int
    limit_pico: int | None
    amount: int
    limit: int
    measure: str

    def as_json(self) -> dict[str, Any]:
        """The snapshot / API form."""
        return {
            "budget": self.budget,
            "scope": self.scope,
            "action": "block",
            "since": iso_z(self.since),
            "until": iso_z(self.until),
            "utilization": round(self.utilization, 4),
            "spend_usd": format_usd(self.spend_pico),
            "limit_usd": None if self.limit_pico is None else format_usd(self.limit_pico),
            "measure": self.measure,
            "amount": self.amount,
            "limit": self.limit,
        }

    def active(self, now: datetime) -> bool:
        """Still in force at `now` (a window that has ended frees its scope even before the next evaluation)."""
        return self.until is None or now < self.until


def flag_from_state(state: ScopeState, since: datetime) -> Flag:
    """A flag for a throttled scope."""
    budget = state.budget
    return Flag(
        budget.name,
        state.scope,
        since,
        state.until,
        state.utilization,
        state.usage.cost_pico,
        budget.limit if budget.measure == "usd" else None,
        state.amount,
        budget.limit,
        budget.measure,
    )


@dataclass(frozen=True)
class Decision:
    """What /v1/check answers for a throttled caller: the flag that holds longest, and every flag that applies."""

    flag: Flag
    flags: tuple[Flag, ...]

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until every applicable flag frees (at least 1)."""
        untils = [f.until for f in self.flags]
        if any(until is None for until in untils):
            return 3600
        latest = max(u for u in untils if u is not None)
        return max(1, int((latest - now).total_seconds() + 0.999))


class ThrottleState:
    """The active flags, replaced as a whole on every change so readers never lock (copy on write)."""

    def __init__(
        self,
        snapshot_file: Path | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        log_every_s: float = SNAPSHOT_ERROR_LOG_EVERY_S,
    ) -> None:
        self._lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._monotonic = monotonic
        self._log_every_s = log_every_s
        self._failing_since_report = 0  # failed writes not reported in a log line yet
        self._reported_at: float | None = None  # when the last failure was logged; None while writes succeed
        self.snapshot_errors = 0  # failed snapshot writes since start (claude_monitor_snapshot_errors_total)
        self._flags: Mapping[tuple[str, str], Flag] = MappingProxyType({})
        self._generation = 0  # counts fast-path updates
        self._set_at: dict[tuple[str, str], int] = {}  # flag -> generation of the fast-path update that last set it
        self._index = BudgetIndex([])
        self.version = 0
        self.generated_at: datetime | None = None
        self.snapshot_file = snapshot_file

    @property
    def flags(self) -> Mapping[tuple[str, str], Flag]:
        """(budget, scope key) -> flag."""
        return self._flags

    def set_index(self, index: BudgetIndex) -> None:
        """The budgets that checks are matched against."""
        self._index = index

    @property
    def generation(self) -> int:
        """Fast-path updates so far: take it before an evaluation reads the store, and give it to `replace`."""
        return self._generation

    def replace(self, flags: dict[tuple[str, str], Flag], now: datetime, read_from: int | None = None) -> bool:
        """Install a whole new flag set (after a full evaluation); True if it differs from the last one.

        `read_from` is the `generation` taken before the evaluation began to read: flags the fast path set after
        that come from batches the evaluation may not have seen, so they are kept (the next evaluation sees those
        batches and decides them). None replaces everything.
        """
        with self._lock:
            merged = dict(flags)
            if read_from is not None:
                for key, generation in self._set_at.items():
                    flag = self._flags.get(key)
                    if generation > read_from and flag is not None:
                        merged[key] = flag
            changed = _keys_and_untils(merged) != _keys_and_untils(self._flags)
            self._flags = MappingProxyType(merged)
            self._set_at = {key: generation for key, generation in self._set_at.items() if key in merged}
            if changed:
                self.version += 1
            self.generated_at = now
        return changed

    def update(self, set_flags: dict[tuple[str, str], Flag], clear: set[tuple[str, str]], now: datetime) -> bool:
        """Set and clear some flags (the ingest fast path); True if anything changed."""
        with self._lock:
            self._generation += 1
            current = dict(self._flags)
            before = _keys_and_untils(current)
            for key in clear:
                current.pop(key, None)
                self._set_at.pop(key, None)
            for key, flag in set_flags.items():
                old = current.get(key)
                current[key] = flag if old is None else _keep_since(flag, old)
                self._set_at[key] = self._generation
            changed = _keys_and_untils(current) != before
            if changed:
                self._flags = MappingProxyType(current)
                self.version += 1
                self.generated_at = now
        return changed

    def decide(self, model: str | None, attributes: Mapping[str, str], now: datetime) -> Decision | None:
        """The throttle decision for a caller: None when allowed."""
        flags = self._flags
        if not flags:
            return None
        applicable = []
        for budget, key in self._index.touched_keys(model or "", attributes):
            flag = flags.get((budget.name, key))
            if flag is not None and flag.active(now):
                applicable.append(flag)
        if not applicable:
            return None
        longest = max(applicable, key=lambda f: (f.until is None, f.until or now, f.utilization))
        return Decision(longest, tuple(applicable))

    def snapshot(self, now: datetime) -> dict[str, Any]:
        """The snapshot document."""
        flags = [f.as_json() for f in self._flags.values() if f.active(now)]
        flags.sort(key=lambda f: (f["budget"], json.dumps(f["scope"], sort_keys=True)))
        return {"version": self.version, "generated_at": iso_z(self.generated_at or now), "flags": flags}

    def write_snapshot(self, now: datetime) -> bool:
        """Rewrite the snapshot file atomically (temp file in the same directory, fsync, rename); False if it failed.

        A failure never propagates: the flags in memory stay authoritative for checks, and ingest and evaluation
        go on. It is counted in `snapshot_errors` and logged, at most once per `log_every_s` while it lasts.
        """
        if self.snapshot_file is None:
            return True
        data = json.dumps(self.snapshot(now), indent=1).encode()
        with self._snapshot_lock:  # concurrent writers (fast path, evaluation) would otherwise race on the count
            try:
                write_atomically(self.snapshot_file, data)
            except OSError as exc:
                self._snapshot_failed(exc)
                return False
            if self._reported_at is not None:
                log.info(
                    "throttle snapshot %s written again (%d failed writes before)",
                    self.snapshot_file,
                    self.snapshot_errors,
                )
                self._reported_at = None
                self._failing_since_report = 0
            return True

    def _snapshot_failed(self, exc: OSError) -> None:
        self.snapshot_errors += 1
        self._failing_since_report += 1
        moment = self._monotonic()
        if self._reported_at is not None and moment - self._reported_at < self._log_every_s:
            return
        more = self._failing_since_report - 1
        log.error(
            "throttle snapshot %s: cannot write it: %s%s. Checks, ingest and evaluation go on from memory, but "
            "proxies reading the file see an older state: make its directory writable by this user, or set "
            "throttle.snapshot_file to a writable path",
            self.snapshot_file,
            exc.strerror or exc,
            f" ({more} more failed writes since the last report)" if more > 0 else "",
        )
        self._reported_at = moment
        self._failing_since_report = 0


def write_atomically(path: Path, data: bytes, mode: int = SNAPSHOT_MODE) -> None:
    """Replace `path` with `data` (file mode `mode`) so readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600: a proxy running as another user must still read the file
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def _keys_and_untils(flags: Mapping[tuple[str, str], Flag]) -> dict[tuple[str, str], datetime | None]:
    return {key: flag.until for key, flag in flags.items()}


def _keep_since(new: Flag, old: Flag) -> Flag:
    if new.since == old.since:
        return new
    return Flag(
        new.budget,
        new.scope,
        old.since,
        new.until,
        new.utilization,
        new.spend_pico,
        new.limit_pico,
        new.amount,
        new.limit,
        new.measure,
    )
