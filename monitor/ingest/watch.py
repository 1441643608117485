"""Wake the tail loop as soon as the kernel reports a change under a followed glob (inotify; Linux only).

A wake-up only brings the next poll forward: the poll stays the one reader, so rotation, truncation, checkpoints
and the skip of unchanged files work as they do without events. Which directories are watched: for each glob, the
directory before its first wildcard and the directories below it down to the depth the glob can match at (every
depth for a `**`). Directories created later are watched when their creation is reported, or, for a glob's own
base, on the first wait after it appears. Where inotify is missing (not Linux, no libc symbol, out of instances)
the tail loop just polls; a directory that cannot be watched (out of watches, no permission) is logged once and
left to the poll, which keeps running at its interval in every case.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import glob
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <sys/inotify.h>
_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_ISDIR = 0x40000000
_WATCH_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class _Root:
    """Where one glob can match: its fixed base directory, how deep below it, and the pattern of a file's name."""

    base: str
    depth: int | None  # directory levels below `base` that can hold a match; None: any (a "**")
    name: str

    @classmethod
    def of(cls, pattern: str) -> _Root:
        """The root of a glob as `glob.glob(pattern, recursive=True)` reads it."""
        parts = os.path.abspath(os.path.expanduser(pattern)).split(os.sep)
        fixed = 1
        while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
            fixed += 1
        base = os.sep.join(parts[:fixed]) or os.sep
        depth = None if any("**" in part for part in parts[fixed:]) else len(parts) - 1 - fixed
        return cls(base, depth, parts[-1])


class _Inotify:
    """The three libc calls, through ctypes."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._init1 = libc.inotify_init1  # AttributeError where libc has no inotify
        self._init1.argtypes, self._init1.restype = [ctypes.c_int], ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes, self._add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int

    def init(self) -> int:
        fd: int = self._init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1")
        return fd

    def add_watch(self, fd: int, path: str) -> int:
        wd: int = self._add(fd, os.fsencode(path), _WATCH_MASK)
        if wd < 0:
            raise _os_error(path)
        return wd


def _os_error(where: str) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, os.strerror(number), where)


class Watcher:
    """Blocks in `wait` until a file event under the globs, `wake()` or the timeout; one waiting thread."""

    def __init__(self, patterns: Sequence[str]) -> None:
        try:
            self._calls = _Inotify()
        except (OSError, AttributeError) as exc:
            raise OSError(f"inotify is not available here: {exc}") from exc
        self._fd = self._calls.init()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._roots = list(dict.fromkeys(_Root.of(pattern) for pattern in patterns))
        self._bases: dict[_Root, int | None] = dict.fromkeys(self._roots)  # the base's watch, None while missing
        self._watches: dict[int, tuple[str, list[tuple[_Root, int]]]] = {}  # wd -> (directory, [(root, level)])
        self._failed: set[str] = set()  # directories already reported as not watchable
        self._lock = threading.Lock()  # `close` may come from another thread than `wait`
        self._closed = False
        self._watch_bases()

    @classmethod
    def open(cls, patterns: Sequence[str]) -> Watcher | None:
        """A watcher over these globs, or None (logged) where inotify cannot be used: then the loop only polls."""
        try:
            return cls(patterns)
        except OSError as exc:
            log.info("tailed files are polled only, without file events: %s", exc)
            return None

    @property
    def watched(self) -> int:
        """How many directories are watched."""
        return len(self._watches)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a change a glob can see (or `wake()`); True if one came."""
        deadline = time.monotonic() + timeout
        if self._watch_bases():
            return True  # a base directory appeared: what is already in it has raised no event
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, _ in self._poller.poll(max(1, int(left * 1000 + 0.999))):
                if fd == self._wake_r:
                    _drain(self._wake_r)
                    return True
                if self._read_events():
                    return True

    def wake(self) -> None:
        """Make a `wait` in another thread return now (or the next one, if none is waiting)."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: wake-ups are pending already
                os.write(self._wake_w, b"!")

    def close(self) -> None:
        """Remove every watch and release the descriptors."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._fd, self._wake_r, self._wake_w):
                os.close(fd)
            self._watches.clear()

    # -- watches -----------------------------------------------------------------------------------------------

    def _watch_bases(self) -> bool:
        """Watch the base directories not watched yet that exist now; True if one was added."""
        added = False
        for root, wd in self._bases.items():
            if wd is None and os.path.isdir(root.base):
                self._bases[root] = self._watch_tree(root, root.base, 0)
                added = added or self._bases[root] is not None
        return added

    def _watch_tree(self, root: _Root, directory: str, level: int) -> int | None:
        """Watch `directory` and the directories below it a match can be in; the directory's watch, or None."""
        try:
            wd = self._calls.add_watch(self._fd, directory)
        except OSError as exc:
            if directory not in self._failed:
                self._failed.add(directory)
                log.warning(
                    "cannot watch %s for file events (%s); changes under it are seen by the poll",
                    directory,
                    exc.strerror or exc,
                )
            return None
        self._failed.discard(directory)
        known = self._watches.get(wd)
        if known is not None and (root, level) in known[1]:
            return wd  # the same directory reached again (a symlink loop, a repeated event)
        if known is None:
            self._watches[wd] = (directory, [(root, level)])
        else:
            self._watches[wd] = (directory, [*known[1], (root, level)])
        if root.depth is None or level < root.depth:
            try:
                with os.scandir(directory) as entries:
                    below = [entry.path for entry in entries if entry.is_dir()]
            except OSError:
                below = []  # gone or unreadable: the poll reports what it cannot read
            for path in below:
                self._watch_tree(root, path, level + 1)
        return wd

    def _read_events(self) -> bool:
        """Read every queued event, following new directories; True if one can change what a glob matches."""
        relevant = False
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                return relevant
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = os.fsdecode(data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0"))
                offset += _EVENT.size + length
                relevant = self._event(wd, mask, name) or relevant

    def _event(self, wd: int, mask: int, name: str) -> bool:
        if mask & _IN_Q_OVERFLOW:
            return True  # events were lost: poll
        if mask & _IN_IGNORED:  # the directory is gone (or unmounted): its base is watched again when it is back
            self._watches.pop(wd, None)
            for root, base_wd in self._bases.items():
                if base_wd == wd:
                    self._bases[root] = None
            return True
        watch = self._watches.get(wd)
        if watch is None:
            return False
        directory, roots = watch
        if mask & _IN_ISDIR:
            if mask & (_IN_CREATE | _IN_MOVED_TO):
                for root, level in roots:
                    if root.depth is None or level < root.depth:
                        self._watch_tree(root, os.path.join(directory, name), level + 1)
            return True
        return not name or any(fnmatch.fnmatch(name, root.name) for root, _ in roots)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def follow(poll: Callable[[], object], watcher: Watcher | None, stop: threading.Event, interval: float) -> None:
    """Until `stop` is set: poll, then wait for a file event, `interval` seconds, or `stop` (with `watcher.wake()`)."""
    while not stop.is_set():
        poll()
        if watcher is None:
            stop.wait(interval)
        else:
            watcher.wait(interval)
