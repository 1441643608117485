"""One-shot ingest of JSONL files: streamed in bounded memory, committed in batches, bad lines dead-lettered."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from monitor.ingest.ahead import FileFailed, ParseAhead, Ready
from monitor.ingest.parse import EventParser, Rejected, redact
from monitor.ingest.pipeline import Ingestor
from monitor.ingest.writer import BatchResult, Item

MAX_LINE_BYTES = 1024 * 1024
RAW_KEEP_BYTES = 64 * 1024
# Lines are read from a 1 MiB buffer: with the default 8 KiB one, reading costs several times as much per line.
READ_BUFFER_BYTES = 1 << 20
# Objects allocated between young collections of a bulk-ingesting process (Python's default is 700).
BULK_GC_THRESHOLD = 50_000


def settle_for_bulk() -> None:
    """Call once a process that ingests in bulk has started: what start-up allocated leaves the collector's reach,
    and young collections run a seventieth as often.

    Ingest allocates several objects per event and reference counting frees nearly all of them at once; with the
    defaults the collector still runs every 700 allocations, and each full collection walks the whole start-up
    heap and every cached key: measured, a fifth of a one-shot ingest's CPU. Cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(BULK_GC_THRESHOLD, 20, 20)


def read_lines(
    stream: BinaryIO, max_bytes: int = MAX_LINE_BYTES, skip: list[bool] | None = None
) -> Iterator[tuple[int, str | Rejected]]:
    """Yield (line number, text) of each non-blank line; a line over max_bytes or not UTF-8 comes as Rejected.

    While `skip[0]` is true the lines are only counted, each (over-long or not) yielded as "" without decoding it:
    a reader that handles every other batch reads the same lines as one that handles them all."""
    number = 0
    while True:
        chunk = stream.readline(max_bytes + 2)  # room for the line ending
        if not chunk:
            return
        number += 1
        if skip is not None and skip[0] and len(chunk) <= max_bytes:  # shorter than the limit, ending or not
            if chunk.strip():
                yield number, ""
            continue
        if len(chunk.rstrip(b"\r\n")) > max_bytes:
            head, size = chunk[:RAW_KEEP_BYTES], len(chunk.rstrip(b"\r\n"))
            while not chunk.endswith(b"\n"):  # skip the rest of the over-long line without holding it
                chunk = stream.readline(max_bytes)
                if not chunk:
                    break
                size += len(chunk.rstrip(b"\r\n"))
            raw = redact(head.decode("utf-8", errors="replace"))
            yield (
                number,
                Rejected(
                    f"line is {size:,} bytes long; the limit is {max_bytes:,} "
                    f"(raw text kept: the first {RAW_KEEP_BYTES:,} bytes)",
                    raw,
                ),
            )
            continue
        chunk = chunk.rstrip(b"\r\n")
        if not chunk.strip():
            continue
        try:
            yield number, chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                number,
                Rejected(f"not valid UTF-8 at byte {exc.start}", redact(chunk.decode("utf-8", "replace"))),
            )


class Progress:
    """A one-line progress bar on a terminal; silent when stderr is not one."""

    def __init__(self, total_bytes: int, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._total = max(total_bytes, 1)
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, done_bytes: int, events: int, force: bool = False) -> None:
        """Redraw at most ten times a second."""
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        fraction = min(done_bytes / self._total, 1.0)
        bar = "#" * int(fraction * 30)
        rate = events / max(now - self._started, 1e-9)
        self._stream.write(f"\r[{bar:<30}] {fraction:6.1%}  {events:,} lines  {rate:,.0f}/s ")
        self._stream.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()


def ingest_files(
    paths: list[Path],
    parser: EventParser,
    ingestor: Ingestor,
    *,
    batch_size: int = 5000,
    progress: Callable[[int], Progress] = Progress,
    on_error: Callable[[str], None] = lambda message: None,
    parse_ahead: bool | ParseAhead = False,
    parse_processes: int | None = None,
) -> tuple[BatchResult, list[str]]:
    """Ingest every file; return the summed result and the files that could not be read.

    With `parse_ahead` parse processes (`parse_processes` of them, by default one per core up to two) read,
    parse, price and tally while this one writes: the same batches, the same results. `parse_ahead` may be a
    ParseAhead already started (before the store was opened) over `paths`; it is closed before this returns."""
    total = BatchResult()
    failed: list[str] = []
    sizes = {}
    for path in paths:
        try:
            sizes[path] = path.stat().st_size
        except OSError as exc:
            on_error(f"{path}: cannot read: {exc.strerror}")
            failed.append(str(path))
    bar = progress(sum(sizes.values()))
    started = parse_ahead if isinstance(parse_ahead, ParseAhead) else None
    if started is not None and (started.paths != list(sizes) or started.batch_size != batch_size):
        started.close()  # a file appeared or went since it started: start again over the files there are
        started = None
    if parse_ahead and sizes:
        ahead = started or ParseAhead(list(sizes), parser, ingestor.preparer(), batch_size, parse_processes)
        _ingest_ahead(sizes, ingestor, ahead, bar, total, failed, on_error)
        bar.finish()
        return total, failed
    if started is not None:
        started.close()
    done_before = 0
    lines_seen = 0
    for path in sizes:
        # The absolute path names the source, so the same file under another spelling is recognised.
        absolute = path.resolve()
        source = f"file:{absolute}"
        batch: list[Item] = []
        try:
            with path.open("rb", buffering=READ_BUFFER_BYTES) as stream:
                seekable = stream.seekable()  # a named pipe or /dev/stdin has no position to show progress by
                now = parser.clock()  # read once a batch: it bounds how far ahead a timestamp may be
                for number, text in read_lines(stream):
                    item = text if isinstance(text, Rejected) else parser.parse_line(text, now)
                    batch.append((f"{absolute}:{number}", item))
                    lines_seen += 1
                    if len(batch) >= batch_size:
                        total.add(_counted(ingestor.submit(batch, source)))
                        batch = []
                        now = parser.clock()
                        if seekable:
                            bar.update(done_before + stream.tell(), lines_seen)
                if batch:
                    total.add(_counted(ingestor.submit(batch, source)))
        except OSError as exc:
            on_error(f"{path}: read failed after {lines_seen:,} lines: {exc}")
            failed.append(str(path))
        done_before += sizes[path]
        bar.update(done_before, lines_seen, force=True)
    bar.finish()
    return total, failed


def _counted(result: BatchResult) -> BatchResult:
    """A batch's counts without its per-event settles (no lease is held by a one-shot ingest): the run's summary
    stays the same size however many lines the files hold."""
    result.settles.clear()
    return result


def _ingest_ahead(
    sizes: dict[Path, int],
    ingestor: Ingestor,
    ahead: ParseAhead,
    bar: Progress,
    total: BatchResult,
    failed: list[str],
    on_error: Callable[[str], None],
) -> None:
    """`ingest_files`' loop with the reading, parsing, pricing and tallying in `ahead`'s parse processes."""
    paths = list(sizes)
    absolute = [path.resolve() for path in paths]
    done_before = 0
    lines_seen = 0
    try:
        for message in ahead.messages():
            path = paths[message.path_index]
            if isinstance(message, Ready):
                where = absolute[message.path_index]
                result = ingestor.submit_prepared(message.prepared, f"file:{where}", str(where))
                total.add(_counted(result))
                lines_seen += result.accepted + result.duplicates + result.rejected
                if message.offset is not None:
                    bar.update(done_before + message.offset, lines_seen)
                continue
            if isinstance(message, FileFailed):
                on_error(f"{path}: read failed after {message.lines_seen:,} lines: {message.error}")
                failed.append(str(path))
            done_before += sizes[path]
            bar.update(done_before, lines_seen, force=True)
    finally:
        ahead.close()
