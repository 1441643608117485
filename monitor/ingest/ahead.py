"""Parse processes that read, parse, price and tally while the first process writes: a one-shot ingest on every
core.

Each parse process reads every file whole but prepares only its share of the batches (batch k of a file goes to
process k mod n): the batches are the ones a single process makes, so every result is the one it gets. Each
prepared batch (`Prepared`: rows to insert, rejected lines, the tally of its events) waits in its process's queue
until the writer takes the batches in order; at most `AHEAD_BATCHES` wait per process, so memory stays bounded
whatever the files hold.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import queue
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.context import ForkContext, SpawnContext
from pathlib import Path
from typing import Any

from monitor.ingest.parse import Event, EventParser, Rejected
from monitor.ingest.writer import Prepared, Preparer

AHEAD_BATCHES = 4
# Starting a parse process as a fresh interpreter costs about half a second of a core (it imports the write path):
# below some 60,000 events (16 MiB of usage lines) one process finishes first.
PARSE_AHEAD_MIN_BYTES = 16 * 2**20
_POLL_S = 1.0  # how often a waiting writer checks that the parse processes are still alive


def parse_processes() -> int:
    """How many parse processes a one-shot ingest runs: one per core this process may use, at least one, at most
    two (the writer is the next bottleneck past two)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def _context() -> ForkContext | SpawnContext:
    """How parse processes start. A copy of this process (fork) starts at once and shares the imported code; it
    is safe while this process has a single thread (a copied lock held by another thread would never be released)
    and copies no use of a database connection (a parse process never touches one). Otherwise a fresh interpreter,
    which imports the write path first (about half a second of a core)."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _regular(path: Path) -> bool:
    """True for a regular file (each parse process can read it from its start)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True  # each process reports the same failure to read it


@dataclass(frozen=True)
class Ready:
    """One prepared batch of a file, and the offset read up to (None: the file cannot tell, e.g. a pipe)."""

    path_index: int
    prepared: Prepared
    offset: int | None


@dataclass(frozen=True)
class FileDone:
    """Every line of a file has been sent."""

    path_index: int


@dataclass(frozen=True)
class FileFailed:
    """A file could not be read on: what happened, after how many lines of the run."""

    path_index: int
    lines_seen: int
    error: str


Message = Ready | FileDone | FileFailed


def _prepare_files(
    paths: Sequence[str],
    sources: Sequence[str],
    dimensions: Sequence[str],
    clock: Callable[[], datetime],
    batch_size: int,
    preparer: Preparer,
    share: tuple[int, int],
    out: Any,
) -> None:
    """A parse process: its share (k, n) of every file's batches, prepared, in order; each file's end; then None."""
    from monitor.ingest.files import READ_BUFFER_BYTES, read_lines, settle_for_bulk  # files imports this module

    mine, processes = share
    parser = EventParser(dimensions, clock)
    settle_for_bulk()
    lines_seen = 0
    for index, name in enumerate(paths):
        slot = 0
        batch: list[tuple[int, Event | Rejected]] = []
        try:
            with Path(name).open("rb", buffering=READ_BUFFER_BYTES) as stream:
                seekable = stream.seekable()
                filled = 0
                now = clock()  # read once a batch: it bounds how far ahead a timestamp may be
                others = [mine != 0]  # the batch being read is another process's: count its lines, no more
                for number, text in read_lines(stream, skip=others):
                    lines_seen += 1
                    if not others[0]:
                        batch.append((number, text if isinstance(text, Rejected) else parser.parse_line(text, now)))
                    filled += 1
                    if filled >= batch_size:
                        if batch:
                            prepared = preparer.prepare(batch, sources[index], clock())
                            out.put(_packed(("ready", index, prepared, stream.tell() if seekable else None)))
                            batch = []
                        filled = 0
                        slot += 1
                        others[0] = slot % processes != mine
                        now = clock()
                if batch:
                    out.put(_packed(("ready", index, preparer.prepare(batch, sources[index], clock()), None)))
        except OSError as exc:
            out.put(("failed", index, lines_seen, str(exc)))
            continue
        out.put(("done", index))
    out.put(None)


def _packed(message: tuple[Any, ...]) -> bytes:
    """A prepared batch's message, pickled by the thread that made it: the queue's feeder thread then only copies
    bytes, instead of holding the interpreter lock against the parsing for as long as pickling takes."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class ParseAhead:
    """Runs the parse processes over `paths` and yields their messages in file order; stops them when closed."""

    def __init__(
        self,
        paths: Sequence[Path],
        parser: EventParser,
        preparer: Preparer,
        batch_size: int,
        processes: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        context = _context()
        count = processes or parse_processes()
        if not all(_regular(path) for path in paths):
            count = 1  # a pipe (or /dev/stdin) can be read once: one process reads it all
        self.paths = list(paths)
        self._queues: list[Any] = [context.Queue(maxsize=AHEAD_BATCHES) for _ in range(count)]
        sources = [f"file:{path.resolve()}" for path in paths]
        self._processes = [
            context.Process(
                target=_prepare_files,
                args=(
                    [str(p) for p in paths],
                    sources,
                    parser.dimensions,
                    parser.clock,
                    batch_size,
                    preparer,
                    (mine, count),
                    self._queues[mine],
                ),
                name=f"claude-monitor-parse-{mine}",
                daemon=True,
            )
            for mine in range(count)
        ]
        copies = context.get_start_method() == "fork"
        if copies:
            sys.stdout.flush()  # a copy flushes its inherited buffers as it ends: they must be empty
            sys.stderr.flush()
            # Everything this process holds at the fork is frozen, so a copy's garbage collector never finalizes it:
            # a connection to the database left in a reference cycle here must not be closed from a copy (its
            # goodbye would end this process's session too). It also leaves the shared pages unwritten.
            gc.freeze()
        try:
            for process in self._processes:
                process.start()
        finally:
            if copies:
                gc.unfreeze()

    def _get(self, which: int) -> Any:
        while True:
            try:
                message = self._queues[which].get(timeout=_POLL_S)
                return pickle.loads(message) if isinstance(message, bytes) else message
            except queue.Empty:
                process = self._processes[which]
                if not process.is_alive():
                    raise RuntimeError(
                        f"a parse process ended without finishing (exit code {process.exitcode})"
                    ) from None

    def messages(self) -> Iterator[Message]:
        """Each prepared batch, file end and file failure, in the order the files were read."""
        count = len(self._queues)
        for index in range(len(self.paths)):
            slot = 0
            while True:
                message = self._get(slot % count)
                if message[0] == "ready":
                    _, at, prepared, offset = message
                    assert at == index, (at, index)
                    yield Ready(index, prepared, offset)
                    slot += 1
                    continue
                # This file ends here in every process: a failure past it drops what the others read further.
                ends = [message]
                for other in range(count):
                    if other == slot % count:
                        continue
                    while (found := self._get(other))[0] == "ready":
                        pass
                    ends.append(found)
                failure = next((end for end in ends if end[0] == "failed"), None)
                if failure is None:
                    yield FileDone(index)
                else:
                    yield FileFailed(index, failure[2], failure[3])
                break

    def close(self) -> None:
        """Stop the parse processes (at once if they are still reading) and release the queues."""
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process, channel in zip(self._processes, self._queues, strict=True):
            process.join()
            channel.close()
            channel.cancel_join_thread()
