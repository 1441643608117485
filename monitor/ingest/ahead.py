"""Reading and parsing in a second process while the first one writes: a one-shot ingest on two cores.

The parse process reads each file, parses its lines and sends them on in the batches the writer will commit (the
same batches, so every result is the one a single process gets); the writer rebuilds them and writes. At most
`AHEAD_BATCHES` batches wait between the two, so memory stays bounded whatever the files hold.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from monitor.ingest.parse import Event, EventParser, Rejected

AHEAD_BATCHES = 4
assert Event._fields[:2] == ("request_id", "timestamp")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_POLL_S = 1.0  # how often a waiting writer checks that the parse process is still alive


@dataclass(frozen=True)
class Parsed:
    """One batch of one file: (line number, event or rejection) in file order, and the offset read up to."""

    path_index: int
    lines: list[tuple[int, Event | Rejected]]
    offset: int | None  # None: the file cannot tell its position (a pipe)


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


Message = Parsed | FileDone | FileFailed


def _pack(item: Event | Rejected) -> tuple[Any, ...]:
    """A parsed line as plain values, cheap to pickle: the Event's fields (its UTC timestamp as whole microseconds
    since the epoch), or a Rejected's."""
    if isinstance(item, Event):
        return (item[0], (item.timestamp - _EPOCH) // _MICROSECOND, *item[2:])
    return (None, item.reason, item.raw, item.request_id)


def _unpack(packed: tuple[Any, ...]) -> Event | Rejected:
    if packed[0] is None:
        return Rejected(packed[1], packed[2], packed[3])
    return Event(packed[0], _EPOCH + timedelta(microseconds=packed[1]), *packed[2:])


def _parse_files(
    paths: Sequence[str],
    dimensions: Sequence[str],
    clock: Callable[[], datetime],
    batch_size: int,
    out: Any,
) -> None:
    """The parse process: every file's lines, parsed, in batches of `batch_size` lines; then None."""
    from monitor.ingest.files import READ_BUFFER_BYTES, read_lines, settle_for_bulk  # files imports this module

    parser = EventParser(dimensions, clock)
    settle_for_bulk()
    lines_seen = 0
    for index, name in enumerate(paths):
        batch: list[tuple[int, tuple[Any, ...]]] = []
        try:
            with Path(name).open("rb", buffering=READ_BUFFER_BYTES) as stream:
                seekable = stream.seekable()
                for number, text in read_lines(stream):
                    item = text if isinstance(text, Rejected) else parser.parse_line(text)
                    batch.append((number, _pack(item)))
                    lines_seen += 1
                    if len(batch) >= batch_size:
                        out.put(("parsed", index, batch, stream.tell() if seekable else None))
                        batch = []
                if batch:
                    out.put(("parsed", index, batch, None))
        except OSError as exc:
            out.put(("failed", index, lines_seen, str(exc)))
            continue
        out.put(("done", index))
    out.put(None)


class ParseAhead:
    """Runs the parse process over `paths` and yields its messages in order; stops it when closed early."""

    def __init__(self, paths: Sequence[Path], parser: EventParser, batch_size: int) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the writer's connections
        self._queue: Any = context.Queue(maxsize=AHEAD_BATCHES)
        self._process = context.Process(
            target=_parse_files,
            args=([str(p) for p in paths], parser.dimensions, parser.clock, batch_size, self._queue),
            name="claude-monitor-parse",
            daemon=True,
        )
        self._process.start()

    def messages(self) -> Iterator[Message]:
        """Each batch, file end and file failure, in the order the files were read."""
        while True:
            try:
                message = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(
                        f"the parse process ended without finishing (exit code {self._process.exitcode})"
                    ) from None
                continue
            if message is None:
                return
            kind = message[0]
            if kind == "parsed":
                _, index, batch, offset = message
                yield Parsed(index, [(number, _unpack(packed)) for number, packed in batch], offset)
            elif kind == "done":
                yield FileDone(message[1])
            else:
                yield FileFailed(message[1], message[2], message[3])

    def close(self) -> None:
        """Stop the parse process (at once if it is still reading) and release the queue."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._queue.close()
        self._queue.cancel_join_thread()
