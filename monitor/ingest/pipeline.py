"""The one way in for usage events: write a batch, then bring up to date what reads committed batches, in order.

Every source — the HTTP API, the tailers, the ingest worker's hand-off, the `ingest` command — submits here, so none
has to remember what must follow a commit: the budgets' fast path (throttle flags), then admission (the scopes' new
window totals, and the leases the events settle). Both are done before `submit` returns, so the flag a batch sets
is up before its sender hears back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from monitor.budgets.counters import Usage
from monitor.ingest.writer import Batch, BatchResult, Item, Offset, Prepared, Preparer, Writer

if TYPE_CHECKING:
    from monitor.budgets.admission import Admission
    from monitor.budgets.engine import BudgetEngine
    from monitor.ingest.worker import Written

Settle = tuple[str, str | None, int]  # (request id, lease, prompt tokens) of a stored or duplicate event


class Sink(Protocol):
    """What writes batches: the `Writer`, or the ingest worker that runs one."""

    def write(self, items: Sequence[Item], source: str, offsets: Sequence[Offset] = ()) -> BatchResult:
        """One batch in one transaction."""
        ...

    def write_group(self, batches: Sequence[Batch], source: str, offsets: Sequence[Offset] = ()) -> list[BatchResult]:
        """Several batches in one transaction; one result each."""
        ...


class Ingestor:
    """Writes through `sink`, then updates `budgets` and `admission` (either may be None: nothing reads them)."""

    def __init__(self, sink: Sink, budgets: BudgetEngine | None = None, admission: Admission | None = None) -> None:
        self.sink = sink
        self.budgets = budgets
        self.admission = admission

    def submit(self, items: Sequence[Item], source: str, offsets: Sequence[Offset] = ()) -> BatchResult:
        """Write one batch (with the file offsets it reaches) and apply what follows its commit."""
        result = self.sink.write(items, source, offsets)
        self.committed(result.touched, result.settles)
        return result

    def submit_group(self, batches: Sequence[Batch], source: str, offsets: Sequence[Offset] = ()) -> list[BatchResult]:
        """Write several batches in one transaction and apply what follows its commit; one result per batch."""
        results = self.sink.write_group(batches, source, offsets)
        if results:  # `touched` is the transaction's, the same in every result
            self.committed(results[0].touched, [settle for result in results for settle in result.settles])
        return results

    def preparer(self) -> Preparer:
        """What prepares batches for `submit_prepared` (in a parse process) as the writer is configured now."""
        return self._writer().preparer()

    def submit_prepared(self, prepared: Prepared, source: str, where: str) -> BatchResult:
        """Write one prepared batch of the file `where` names and apply what follows its commit."""
        result = self._writer().write_prepared(prepared, source, where)
        self.committed(result.touched, result.settles)
        return result

    def _writer(self) -> Writer:
        sink = self.sink
        if not isinstance(sink, Writer):
            raise TypeError(f"prepared batches are written by a Writer, and this ingestor writes through {sink!r}")
        return sink

    def submit_bodies(self, bodies: Sequence[tuple[bytes, str]], max_events: int, group_events: int) -> Written:
        """Have the ingest worker (the sink) parse and write HTTP bodies ((body, remote) each), then apply what
        follows each transaction it committed, in commit order."""
        from monitor.ingest.worker import IngestProcess

        sink = self.sink
        if not isinstance(sink, IngestProcess):
            raise TypeError(f"bodies are parsed in the ingest worker, and this ingestor writes through {sink!r}")
        written = sink.bodies(bodies, max_events, group_events)
        for touched, settles in written.groups:
            self.committed(touched, settles)
        return written

    def committed(self, touched: dict[tuple[str, str], Usage], settles: Sequence[Settle]) -> None:
        """After a committed transaction: flags first (the fast path), then admission's spend and leases."""
        if self.budgets is not None:
            self.budgets.on_batch(touched)
        if self.admission is not None:
            self.admission.on_batch(touched, settles)
