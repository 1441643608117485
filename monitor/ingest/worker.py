"""Ingest in a process of its own: HTTP bodies are parsed, priced and written there (tailed batches written there
too, and an evaluation's reads of every scope's window total done there), so the daemon's interpreter, which decides
checks and admits on its event loop, never waits on that CPU work.

The daemon keeps the answering: it hands a group of request bodies to the worker, gets back each request's answer
and what each written transaction touched (budget window totals, leases its events settle), applies those to its
flags and admission, and only then answers the requests — the same order as when it wrote them itself. The
worker's clock is the daemon's: every call carries the daemon's `now` (unless that is the system clock's).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from monitor.budgets import Budget, BudgetIndex, compile_budgets
from monitor.budgets.counters import Usage
from monitor.budgets.engine import BudgetRead, read_budgets
from monitor.clock import Clock, system_clock
from monitor.config import Settings
from monitor.ingest.writer import Batch, BatchResult, Item, LetterCap, Offset, Writer

log = logging.getLogger(__name__)
WORKER_NICE = 10  # the worker's scheduling priority below the daemon's (Linux nice increment)

Touched = dict[tuple[str, str], Usage]
Settle = tuple[str, str | None, int]


class IngestProcessFailed(Exception):
    """The worker process could not do the call (it died, or raised); nothing it was asked is known to be stored."""


class StorageUnavailable(SQLAlchemyError):
    """The worker's write failed on the store (the message is the database error's first line)."""


@dataclass
class Written:
    """What the worker did with one call's request bodies.

    `answers` holds, per body, its answer (`None`: a write of it raised, `failures` says why); `groups` each
    committed transaction's (touched window totals, settled leases), in commit order; `results` per body the
    counts of a body that was written (None otherwise; its touched totals and settles are in `groups`).
    """

    answers: list[Any] = field(default_factory=list)
    groups: list[tuple[Touched, list[Settle]]] = field(default_factory=list)
    results: list[BatchResult | None] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)


class _NowClock:
    """The worker's clock: the daemon's `now` set at each call, or (None) the system clock's, read as it goes."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return system_clock() if self.now is None else self.now


class IngestProcess:
    """The daemon's handle on its ingest worker: started on first use (or `start`), one call at a time.

    Quacks like a `Writer` for the tailers (`write`, `write_group`, `set_budgets`); `bodies` is the HTTP path. A
    worker that died is started again by the next call; the call it died in raises IngestProcessFailed.
    """

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._budget_names: list[str] | None = None  # the budgets written toward, when not all configured ones

    @property
    def pid(self) -> int | None:
        """The worker's process id, once started."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the worker now (it imports and opens the store while the daemon goes on starting)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            return self._connection
        self._discard()
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(theirs, self._settings), name="claude-monitor-ingest", daemon=True
        )
        process.start()
        theirs.close()
        self._process, self._connection = process, ours
        if self._budget_names is not None:  # a worker started again counts toward the same budgets
            ours.send(("budgets", None, self._budget_names))
            ours.recv()
        return ours

    def _discard(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            self._process.join(0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._process = self._connection = None

    def _call(self, kind: str, payload: Any) -> Any:
        with self._lock:
            try:
                connection = self._ensure()
                # A daemon on the system clock lets the worker read its own: each transaction then has its time.
                now = None if self._clock is system_clock else self._clock()
                connection.send((kind, now, payload))
                status, value = connection.recv()  # EOFError as soon as the worker dies: its end of the pipe closes
            except (EOFError, OSError) as exc:
                self._discard()
                raise IngestProcessFailed(f"the ingest worker process ended during a call ({exc!s:.200})") from None
        if status == "storage":
            raise StorageUnavailable(value)
        if status == "error":
            raise IngestProcessFailed(f"the ingest worker process failed: {value}")
        return value

    def bodies(self, requests: Sequence[tuple[bytes, str]], max_events: int, group_events: int) -> Written:
        """Parse, price and write HTTP ingest bodies ((body, remote address) each): transactions of at most
        `group_events` events, in arrival order, a body of more than `max_events` refused with 413."""
        result: Written = self._call("bodies", (list(requests), max_events, group_events))
        return result

    def write(
        self, items: Sequence[Item], source: str, offsets: Sequence[Offset] = (), cap: LetterCap | None = None
    ) -> BatchResult:
        """As `Writer.write`, in the worker."""
        return self.write_group([Batch(items, cap)], source, offsets)[0]

    def write_group(self, batches: Sequence[Batch], source: str, offsets: Sequence[Offset] = ()) -> list[BatchResult]:
        """As `Writer.write_group`, in the worker."""
        results: list[BatchResult] = self._call(
            "write", ([Batch(list(b.items), b.cap) for b in batches], source, list(offsets))
        )
        return results

    def read_budgets(self, budgets: Sequence[Budget], now: datetime) -> list[BudgetRead]:
        """An evaluation's reads (`read_budgets`) at `now`, in the worker: the daemon's interpreter only applies
        what they found."""
        reads: list[BudgetRead] = self._call("evaluate", ([budget.name for budget in budgets], now))
        return reads

    def set_budgets(self, budgets: BudgetIndex) -> None:
        """Count toward these budgets (of the configured ones) from the next batch on."""
        names = [budget.name for budget in budgets.budgets]
        self._budget_names = names  # first: a worker restarted by this very call starts with them
        self._call("budgets", names)

    def close(self) -> None:
        """Stop the worker (after the last call has returned)."""
        with self._lock:
            if self._connection is not None and self._process is not None and self._process.is_alive():
                try:
                    self._connection.send(("stop", self._clock(), None))
                    self._process.join(10)
                except (OSError, EOFError):
                    pass
            self._discard()


# --- in the worker process ------------------------------------------------------------------------------------------


def _worker_main(connection: Connection, settings: Settings) -> None:
    """The worker: build the parse, price and write path over the store, then serve calls until told to stop."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the daemon, which stops its worker in turn
    # When both want a core, the daemon answering checks and admits gets it first; idle cores are the worker's.
    os.nice(WORKER_NICE)
    worker = _Worker(settings)
    from monitor.ingest.files import settle_for_bulk

    settle_for_bulk()  # it parses and writes every ingested event: the collector would otherwise cost it a fifth
    while True:
        try:
            kind, now, payload = connection.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        if kind == "stop":
            worker.engine.dispose()  # its database sessions end now, not whenever the process is reaped
            return
        worker.clock.now = now
        try:
            reply: tuple[str, Any] = ("ok", worker.handle(kind, payload))
        except SQLAlchemyError as exc:
            reply = ("storage", str(exc).splitlines()[0])
        except Exception as exc:
            log.exception("ingest worker: %s failed", kind)
            reply = ("error", f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        connection.send(reply)


class _Worker:
    def __init__(self, settings: Settings) -> None:
        from monitor.ingest.parse import EventParser
        from monitor.pricing import load_price_table
        from monitor.store.db import create_db_engine
        from monitor.store.leases import settler_for
        from monitor.store.partitions import partition_window

        self.clock = _NowClock()
        prices = load_price_table(settings.pricing.models)  # checked when the daemon started
        self.budgets = compile_budgets(settings.budgets, prices)
        self.parser = EventParser(settings.dimensions, self.clock)
        self.zone = settings.zone
        self.engine = create_db_engine(settings.database_url, make_directory=False)
        self.writer = Writer(
            self.engine,
            prices,
            self.clock,
            budgets=BudgetIndex(self.budgets),
            zone=settings.zone,
            metric_labels=settings.metrics.labels,
            max_values_per_label=settings.metrics.max_values_per_label,
            max_unpriced_models=settings.metrics.max_unpriced_models,
            partitions=partition_window(settings),
        )
        self.writer.settle_leases = settler_for(settings)  # a usage event settles its lease in its own transaction

    def handle(self, kind: str, payload: Any) -> Any:
        if kind == "write":
            batches, source, offsets = payload
            return self.writer.write_group(batches, source, offsets)
        if kind == "budgets":
            keep = set(payload)
            self.writer.set_budgets(BudgetIndex([b for b in self.budgets if b.name in keep]))
            return None
        if kind == "bodies":
            return self.bodies(*payload)
        if kind == "evaluate":
            names, now = payload
            by_name = {budget.name: budget for budget in self.budgets}
            with self.engine.connect() as connection:
                return read_budgets(connection, [by_name[name] for name in names], now, self.zone)
        raise ValueError(f"unknown call {kind!r}")

    def bodies(self, requests: list[tuple[bytes, str]], max_events: int, group_events: int) -> Written:
        from monitor.http.api import HTTP_SOURCE, IngestRequest, prepare_body

        out = Written(answers=[None] * len(requests), results=[None] * len(requests))
        pending: list[tuple[int, IngestRequest]] = []
        for index, (body, remote) in enumerate(requests):
            prepared = prepare_body(body, remote, self.parser, max_events)
            if isinstance(prepared, IngestRequest):
                pending.append((index, prepared))
            else:
                out.answers[index] = prepared
        # Transactions of at most `group_events` events, in arrival order; a larger request goes alone.
        group: list[tuple[int, IngestRequest]] = []
        size = 0
        for entry in pending:
            if group and size + entry[1].size > group_events:
                self._write(group, out, HTTP_SOURCE)
                group, size = [], 0
            group.append(entry)
            size += entry[1].size
        if group:
            self._write(group, out, HTTP_SOURCE)
        return out

    def _write(self, group: list[tuple[int, Any]], out: Written, source: str) -> None:
        """One transaction for `group`; should it fail for a reason other than storage, each request alone."""
        try:
            results = self.writer.write_group([request.batch for _, request in group], source)
        except SQLAlchemyError as exc:
            log.error("ingest failed, storage unavailable: %s", str(exc).splitlines()[0])
            for index, request in group:
                out.answers[index] = request.storage_unavailable()
            return
        except Exception as exc:
            if len(group) > 1:
                log.exception("ingest of %d requests in one transaction failed; writing them one by one", len(group))
                for entry in group:
                    self._write([entry], out, source)
                return
            log.exception("ingest of one request failed")
            out.failures[group[0][0]] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return
        if results:
            out.groups.append((results[0].touched, [s for result in results for s in result.settles]))
        for (index, request), result in zip(group, results, strict=True):
            out.answers[index] = request.answer(result)
            if request.refused is None:  # its touched totals and settles travel once, in `groups`
                out.results[index] = replace(result, touched={}, settles=[], rejections=[])
