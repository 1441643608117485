"""Follow the JSONL files of one source: rotation-, truncation- and restart-safe, each line counted exactly once.

File identity. A file is known by `file_id`:
- `"{st_dev}:{st_ino}:{h}"` where `h` is sha256 of its first 1024 bytes (hex, first 16 characters), or
- `"{st_dev}:{st_ino}:{h}:{n}"` when the file held only n < 1024 bytes when it was first seen: `h` then covers those
  n bytes, and n is kept in the id so the same prefix can be hashed again however much the file has grown since.
An id is fixed when the file is first seen and never changes while the file grows, so its `source_offsets` row is
updated in place. A file gets an id only once it holds a complete line or 1024 bytes, so `h` covers at least the
whole first line (with its unique `request_id`): a file holding only the start of its first line is not read yet.

Which checkpoint belongs to a file on disk: the one with the same device and inode whose prefix still hashes the
same and whose offset is not past the end of the file. Failing that (a device number can change across a reboot
or a remount), one stored under the same path whose prefix hashes the same. Otherwise the file is new and is read
from byte 0. Consequences:
- rotation by rename: the renamed file keeps its inode and prefix, so it is still recognised, under its new name,
  and its remaining complete lines are read if the glob still matches it. If it was renamed to a name the glob does
  not match (or deleted), lines appended to it after the last poll are not read by the tailer (`claude-monitor
  ingest FILE` backfills them; dedup on request_id keeps that safe). The new file at the path is read from 0.
- copytruncate (truncated, then written again, same inode): the file is now shorter than the checkpoint, or its
  first bytes differ, so it is read from 0 under a new id. The stale row is deleted once the new one is committed.

Checkpoints (`source_offsets`: offset = the byte after the last complete line consumed) are written by
`Writer.write` in the same transaction as the events of that batch, so the database never holds events without
their checkpoint or the reverse; they are loaded on the first poll, so a restart re-reads nothing.

Only lines ending in "\\n" are consumed: an unfinished last line (or an unfinished over-long one) is left for a
later poll. Lines are split, size-limited and decoded by `files.read_lines`, as in the one-shot ingest.

Locations are `"{absolute path}:{line number}"`, counted from the start of the file. After a restart the number of
lines before the checkpoint is not stored, so it is counted (a sequential read of the file up to the checkpoint)
the first time the file has a new line, once per file per process; files with nothing new are never rescanned.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, BinaryIO, cast

from sqlalchemy import Engine, delete, select

from monitor.config import SourceConfig
from monitor.ingest.files import read_lines
from monitor.ingest.parse import EventParser, Rejected
from monitor.ingest.pipeline import Ingestor
from monitor.ingest.writer import BatchResult, Item, Offset
from monitor.store.models import source_offsets

log = logging.getLogger(__name__)

PREFIX_BYTES = 1024
_SCAN_CHUNK = 1024 * 1024
_READ_BUFFER = 64 * 1024
_MAX_PATH = 1024  # source_offsets.path

Key = tuple[int, int]  # (st_dev, st_ino)
Signature = tuple[int, int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)


def _signature(info: os.stat_result) -> Signature:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _digest(prefix: bytes) -> str:
    return hashlib.sha256(prefix).hexdigest()[:16]


def _same_file(digest: str, prefix_len: int, offset: int, prefix: bytes, size: int) -> bool:
    # A followed file only grows: shorter than what was read, or other first bytes, is other content.
    return size >= offset and len(prefix) >= prefix_len and _digest(prefix[:prefix_len]) == digest


def make_file_id(device: int, inode: int, prefix: bytes) -> str:
    """The id of a file whose first bytes (up to PREFIX_BYTES of them) are `prefix`."""
    base = f"{device}:{inode}:{_digest(prefix)}"
    return base if len(prefix) == PREFIX_BYTES else f"{base}:{len(prefix)}"


@dataclass(frozen=True)
class _Stored:
    """A checkpoint as stored: which file (device, inode, prefix hash and length) and how far it was read."""

    file_id: str
    key: Key
    digest: str
    prefix_len: int
    path: str
    offset: int
    updated_at: datetime | None

    @classmethod
    def parse(cls, file_id: str, path: str, offset: int, updated_at: datetime | None) -> _Stored | None:
        """Read back a `file_id` written by `make_file_id`; None if it is not one."""
        parts = file_id.split(":")
        if len(parts) == 3:
            parts.append(str(PREFIX_BYTES))
        if len(parts) != 4 or not all(parts[i].isdigit() for i in (0, 1, 3)):
            return None
        return cls(file_id, (int(parts[0]), int(parts[1])), parts[2], int(parts[3]), path, offset, updated_at)

    def matches(self, prefix: bytes, size: int) -> bool:
        """True when a file with these first bytes and this size can be the one this checkpoint was written for."""
        return _same_file(self.digest, self.prefix_len, self.offset, prefix, size)


@dataclass(eq=False)
class _File:
    """A followed file: its identity and what is committed for it."""

    file_id: str
    key: Key
    digest: str
    prefix_len: int
    path: str
    offset: int  # committed: the byte after the last complete line consumed
    lines: int | None  # committed: complete lines before `offset`; None = not counted yet (after a restart)
    caught_up_at: datetime | None = None  # start of the last poll after which nothing complete was left unread
    supersedes: list[str] = field(default_factory=list)  # stale ids to delete once this one is committed

    def matches(self, prefix: bytes, size: int) -> bool:
        """True when the file at this (device, inode) still holds the content it was followed for."""
        return _same_file(self.digest, self.prefix_len, self.offset, prefix, size)


@dataclass
class _Pending:
    """Progress on one file read but not committed yet."""

    file: _File
    offset: int
    lines: int | None
    caught_up_at: datetime | None = None


class _CompleteLines:
    """The bytes of a file from `start` up to its last "\\n", for `read_lines`: an unfinished last line reads as EOF."""

    def __init__(self, stream: IO[bytes], start: int) -> None:
        self._stream = stream
        self.position = start  # after the last byte handed out
        self.line_end = start  # after the last complete line handed out
        self.lines = 0  # complete lines handed out
        self.unfinished = False  # stopped before a line with no "\n" yet
        self.error: OSError | None = None

    def readline(self, limit: int = -1) -> bytes:
        if self.unfinished or self.error is not None:
            return b""
        try:
            chunk = self._stream.readline(limit)
        except OSError as exc:
            self.error = exc
            self.unfinished = self.position != self.line_end
            return b""
        if chunk.endswith(b"\n"):
            self.position += len(chunk)
            self.line_end = self.position
            self.lines += 1
            return chunk
        if chunk and 0 <= limit == len(chunk):
            self.position += len(chunk)  # a piece of a line longer than `limit`: read_lines asks for the rest
            return chunk
        if chunk or self.position != self.line_end:
            self.unfinished = True  # end of file inside a line: the writer has not finished it
        return b""


def _count_lines(fd: int, end: int) -> int:
    """Newlines in the first `end` bytes of a file, read in bounded chunks."""
    count = 0
    position = 0
    while position < end:
        chunk = os.pread(fd, min(_SCAN_CHUNK, end - position), position)
        if not chunk:
            break
        count += chunk.count(b"\n")
        position += len(chunk)
    return count


def _has_complete_line(fd: int, start: int, size: int) -> bool:
    """True when a "\\n" follows `start` in the file."""
    position = start
    while position < size:
        chunk = os.pread(fd, min(_SCAN_CHUNK, size - position), position)
        if not chunk:
            return False
        if b"\n" in chunk:
            return True
        position += len(chunk)
    return False


def _open(path: str) -> tuple[int, os.stat_result] | None:
    """Open a regular file for reading (never blocking on a FIFO); None for anything else."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return fd, info
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class Tailer:
    """Follows the JSONL files matching one source's glob into the store, checkpointing each batch with its events.

    `poll()` and `close()` belong to one thread; `lag_seconds()` may be called from another while a poll runs.
    """

    def __init__(
        self,
        source: SourceConfig,
        parser: EventParser,
        ingestor: Ingestor,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        batch_size: int = 5000,
        on_batch: Callable[[BatchResult], None] = lambda result: None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._source = source
        self._label = source.label
        self._pattern = os.path.expanduser(source.path)
        self._parser = parser
        self._ingestor = ingestor
        self._engine = engine
        self._clock = clock
        self._batch_size = batch_size
        self._on_batch = on_batch
        self._active: dict[Key, _File] = {}
        self._stored: dict[Key, list[_Stored]] | None = None  # checkpoints loaded at start, not matched yet
        self._stale: dict[Key, list[str]] = {}  # ids of content gone from a (device, inode), rows to delete
        self._items: list[Item] = []
        self._pending: dict[str, _Pending] = {}
        self._failing: dict[str, str] = {}  # path -> why it could not be read in the last poll
        # path -> stat signature of a file read to its end, all of it committed: unchanged, it is not opened again
        self._done: dict[str, Signature] = {}
        self._done_this_poll: dict[str, Signature] = {}  # read to the end in this poll, committed at its end
        self._load_lock = threading.Lock()
        self._closed = False

    @property
    def source(self) -> SourceConfig:
        """The source this tailer follows."""
        return self._source

    @property
    def pattern(self) -> str:
        """The glob this tailer reads, `~` expanded."""
        return self._pattern

    @property
    def label(self) -> str:
        """The source's label: `source` in the events, dead-letter and checkpoint tables."""
        return self._label

    def poll(self) -> BatchResult:
        """Read every complete new line of every matching file now; return what was written (summed).

        A file that cannot be read is logged and skipped. A failed write raises: the batches committed before it
        stay, the rest is read again by the next poll. An exception from `on_batch` also propagates, after its
        batch is committed.
        """
        if self._closed:
            raise RuntimeError(f"tailer of {self._label} is closed")
        self._load()
        started = self._clock()
        total = BatchResult()
        self._items, self._pending = [], {}
        seen: set[Key] = set()
        failing, self._failing = self._failing, {}
        done, self._done, self._done_this_poll = self._done, {}, {}
        for path in self._paths():
            self._poll_path(path, seen, started, total, failing, done)
        self._flush(total)
        self._done.update(self._done_this_poll)  # only now is everything read from them committed
        return total

    def lag_seconds(self) -> float:
        """How far behind the source is: age of the oldest file with unread complete bytes, else 0.

        A file's age is measured from the start of the last poll after which this tailer had read all of it (the
        unread bytes were written since), or from its mtime when it has not been read up to its end yet by this
        process. So a tailer whose polls fail shows a growing lag even while the file keeps being appended to.
        """
        self._load()
        now = self._clock()
        worst = 0.0
        done = self._done
        for path in self._paths():
            try:
                if done and done.get(os.path.abspath(path)) == _signature(os.stat(path)):
                    continue  # read to its end and unchanged since
                opened = _open(path)
                if opened is None:
                    continue
                fd, info = opened
                try:
                    since = self._unread_since(fd, info, os.path.abspath(path))
                finally:
                    os.close(fd)
            except OSError:
                continue  # poll() logs it
            if since is not None:
                worst = max(worst, (now - since).total_seconds())
        return worst

    def close(self) -> None:
        """Forget the followed files; the checkpoints stay in the store for the next tailer."""
        self._closed = True
        self._active.clear()
        self._items, self._pending = [], {}

    # -- reading -----------------------------------------------------------------------------------------------

    def _paths(self) -> list[str]:
        return sorted(glob.glob(self._pattern, recursive=True))

    def _skip(self, path: str, exc: OSError, failing: dict[str, str]) -> None:
        """Log a file that cannot be read: a warning the first time, then quietly while it stays that way."""
        reason = str(exc.strerror or exc)
        level = logging.DEBUG if failing.get(path) == reason else logging.WARNING
        log.log(level, "source %s: skipping %s this poll: %s; the other files go on", self._label, path, reason)
        self._failing[path] = reason

    def _poll_path(
        self,
        path: str,
        seen: set[Key],
        started: datetime,
        total: BatchResult,
        failing: dict[str, str],
        done: dict[str, Signature],
    ) -> None:
        absolute = os.path.abspath(path)
        try:
            known = done.get(absolute)
            if known is not None:
                # A file read to its end whose size, times and inode are unchanged has nothing new: not opening it
                # keeps an idle poll over thousands of finished files cheap. Growth, truncation, a rewrite and a
                # rotation (another inode at the path) all change the signature.
                now = _signature(os.stat(path))
                if now == known:
                    self._done[absolute] = known
                    seen.add((now[0], now[1]))
                    return
            opened = _open(path)
        except OSError as exc:
            self._skip(absolute, exc, failing)
            return
        if opened is None:
            return
        fd, info = opened
        try:
            stream = os.fdopen(fd, "rb", buffering=_READ_BUFFER)
        except BaseException:
            os.close(fd)
            raise
        with stream:
            key = (info.st_dev, info.st_ino)
            if key in seen:  # another name (hard link, symlink) of a file already read in this poll
                return
            seen.add(key)
            try:
                prefix = os.pread(fd, PREFIX_BYTES, 0)
                followed = self._identify(key, prefix, info.st_size, absolute)
                if followed is None:
                    return
                stream.seek(followed.offset)
            except OSError as exc:
                self._skip(absolute, exc, failing)
                return
            if self._read(stream, followed, started, total):
                self._done_this_poll[absolute] = _signature(info)

    def _identify(self, key: Key, prefix: bytes, size: int, path: str) -> _File | None:
        """The followed file this is, with its checkpoint; None while it has no complete line to identify it by."""
        followed = self._active.get(key)
        if followed is not None:
            if followed.matches(prefix, size):
                followed.path = path
                return followed
            log.info("source %s: %s was truncated or rewritten; reading it from the start", self._label, path)
            del self._active[key]
            self._stale.setdefault(key, []).extend([followed.file_id, *followed.supersedes])
        if len(prefix) < PREFIX_BYTES and b"\n" not in prefix:
            return None  # only the start of a first line so far: too little to tell this file from another
        assert self._stored is not None
        candidates = self._stored.pop(key, [])
        matching = [c for c in candidates if c.matches(prefix, size)]
        supersedes = self._stale.pop(key, [])
        if matching:
            # Two can match only after an in-place rewrite that kept the first bytes: the newest checkpoint wins.
            best = max(matching, key=_recency)
            supersedes += [c.file_id for c in candidates if c is not best]
            followed = _File(best.file_id, key, best.digest, best.prefix_len, path, best.offset, None)
        else:
            supersedes += [c.file_id for c in candidates]  # their content is gone from this inode
            moved = self._stored_by_path(path, prefix, size, pop=True)
            file_id = make_file_id(key[0], key[1], prefix)
            if moved is not None:  # same path and content, another device number: a remount or a reboot
                supersedes.append(moved.file_id)
                followed = _File(file_id, key, _digest(prefix), len(prefix), path, moved.offset, None)
            else:
                log.info("source %s: following new file %s", self._label, path)
                followed = _File(file_id, key, _digest(prefix), len(prefix), path, 0, 0)
        followed.supersedes = [stale for stale in supersedes if stale != followed.file_id]
        self._active[key] = followed
        return followed

    def _stored_by_path(self, path: str, prefix: bytes, size: int, *, pop: bool) -> _Stored | None:
        assert self._stored is not None
        path = path[:_MAX_PATH]
        for key, rows in list(self._stored.items()):
            for row in rows:
                if row.path == path and row.matches(prefix, size):
                    if pop:
                        rows.remove(row)
                        if not rows:
                            del self._stored[key]
                    return row
        return None

    def _read(self, stream: IO[bytes], followed: _File, started: datetime, total: BatchResult) -> bool:
        """Queue every complete line after the file's checkpoint, committing each full batch; True if it read
        every complete line there was (as of the `fstat` taken before the read)."""
        view = _CompleteLines(stream, followed.offset)
        base = followed.lines
        numbered: Iterator[tuple[int, str | Rejected]] = read_lines(cast(BinaryIO, view))  # it only calls readline
        for number, text in numbered:
            if view.unfinished:
                break  # an over-long line whose end is not written yet: not rejected before it is complete
            if base is None:
                try:
                    base = _count_lines(stream.fileno(), followed.offset)
                except OSError as exc:
                    log.warning("source %s: cannot count the lines of %s: %s", self._label, followed.path, exc)
                    return False
            item = text if isinstance(text, Rejected) else self._parser.parse_line(text)
            self._items.append((f"{followed.path}:{base + number}", item))
            self._pending[followed.file_id] = _Pending(followed, view.line_end, base + view.lines)
            if len(self._items) >= self._batch_size:
                self._flush(total)
        if view.error is not None:
            log.warning(
                "source %s: read of %s stopped at byte %d: %s; retrying on the next poll",
                self._label,
                followed.path,
                view.line_end,
                view.error,
            )
        caught_up = started if view.error is None else None
        pending = self._pending.get(followed.file_id)
        if pending is not None or view.line_end != followed.offset:
            # Blank lines after the last item are progress too: the checkpoint moves past them.
            lines = None if base is None else base + view.lines
            self._pending[followed.file_id] = _Pending(followed, view.line_end, lines, caught_up)
        elif caught_up is not None:
            followed.caught_up_at = caught_up
        return view.error is None

    def _flush(self, total: BatchResult) -> None:
        """Commit the queued lines with their files' checkpoints, in one transaction."""
        items, pending = self._items, self._pending
        self._items, self._pending = [], {}
        if not items and not pending:
            return
        offsets = [Offset(p.file.file_id, p.file.path[:_MAX_PATH], p.offset) for p in pending.values()]
        result = self._ingestor.submit(items, self._label, offsets)
        retired: list[str] = []
        for p in pending.values():
            p.file.offset, p.file.lines = p.offset, p.lines
            if p.caught_up_at is not None:
                p.file.caught_up_at = p.caught_up_at
            retired += p.file.supersedes
        total.add(result)
        if retired:
            self._retire(retired)
            for p in pending.values():
                p.file.supersedes = []
        self._on_batch(result)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _load(self) -> None:
        """Load this source's checkpoints, once."""
        if self._stored is not None:
            return
        with self._load_lock:
            if self._stored is not None:
                return
            t = source_offsets.c
            query = select(t.file_id, t.path, t.offset, t.updated_at).where(t.source == self._label)
            with self._engine.connect() as connection:
                rows = connection.execute(query).all()
            stored: dict[Key, list[_Stored]] = {}
            for file_id, path, offset, updated_at in rows:
                parsed = _Stored.parse(file_id, path, offset, updated_at)
                if parsed is None:
                    log.warning("source %s: ignoring checkpoint with unreadable file id %r", self._label, file_id)
                    continue
                stored.setdefault(parsed.key, []).append(parsed)
            self._stored = stored

    def _retire(self, file_ids: list[str]) -> None:
        """Delete checkpoints of content that is gone (rewritten in place), now that the new one is committed."""
        t = source_offsets.c
        with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection, connection.begin():
            connection.execute(delete(source_offsets).where(t.source == self._label, t.file_id.in_(file_ids)))

    def _unread_since(self, fd: int, info: os.stat_result, path: str) -> datetime | None:
        """When a file's unread complete bytes started to wait, or None when it has none (no side effects)."""
        key = (info.st_dev, info.st_ino)
        prefix = os.pread(fd, PREFIX_BYTES, 0)
        offset, since = 0, None
        followed = self._active.get(key)
        if followed is not None and followed.matches(prefix, info.st_size):
            offset, since = followed.offset, followed.caught_up_at
        else:
            stored = self._stored or {}
            matching = [c for c in stored.get(key, []) if c.matches(prefix, info.st_size)]
            if matching:
                offset = max(matching, key=_recency).offset
            elif (moved := self._stored_by_path(path, prefix, info.st_size, pop=False)) is not None:
                offset = moved.offset
        if not _has_complete_line(fd, offset, info.st_size):
            return None
        if since is None:
            since = datetime.fromtimestamp(info.st_mtime, tz=UTC)
        return since


def _recency(row: _Stored) -> tuple[float, int, int]:
    return (row.updated_at.timestamp() if row.updated_at else 0.0, row.prefix_len, row.offset)
