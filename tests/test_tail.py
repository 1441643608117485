"""The file tailer: appends, restarts, unfinished lines, rotation, copytruncate, crashes — each line counted once.

Expectations are checked with plain SQL on the database file, not through the code under test.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event

from monitor.config import SourceConfig
from monitor.ingest.files import MAX_LINE_BYTES
from monitor.ingest.pipeline import Ingestor
from monitor.ingest.tail import Tailer
from monitor.ingest.watch import Watcher, follow
from monitor.ingest.writer import BatchResult, Item, Offset, Writer
from monitor.service import Store
from tests.conftest import FakeClock, event

LABEL = "app-logs"


def line(request_id: str, **usage: Any) -> str:
    return json.dumps(event(request_id, input_tokens=10, output_tokens=5, **usage)) + "\n"


def append(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with path.open("ab") as out:
        out.write(data)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    directory = tmp_path / "usage"
    directory.mkdir()
    return directory


@pytest.fixture
def db(tmp_path: Path, store: Store) -> Iterator[sqlite3.Connection]:
    """A separate, plain sqlite3 connection to the store's database file, for assertions."""
    connection = sqlite3.connect(tmp_path / "monitor.db")
    yield connection
    connection.close()


def source(logs: Path, pattern: str = "*.jsonl") -> SourceConfig:
    return SourceConfig(path=str(logs / pattern), name=LABEL)


def tailer(store: Store, clock: FakeClock, src: SourceConfig, writer: Writer | None = None, **kwargs: Any) -> Tailer:
    ingestor = store.ingestor if writer is None else Ingestor(writer, store.budgets)
    return Tailer(src, store.parser, ingestor, store.engine, clock, **kwargs)


def request_ids(db: sqlite3.Connection) -> list[str]:
    return sorted(row[0] for row in db.execute("SELECT request_id FROM events"))


def count(db: sqlite3.Connection, table: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def offsets(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
    return sorted(db.execute('SELECT source, path, "offset" FROM source_offsets').fetchall())


def duplicate_counter(db: sqlite3.Connection) -> int:
    rows = db.execute("SELECT labels, value FROM counters WHERE name = 'ingest_events'").fetchall()
    return sum(value for labels, value in rows if json.loads(labels).get("outcome") == "duplicate")


class FlakyWriter(Writer):
    """The real writer, except that chosen calls raise before touching the database."""

    def __init__(self, store: Store, clock: FakeClock, fail_on: set[int]) -> None:
        super().__init__(store.engine, store.prices, clock)
        self.fail_on = fail_on
        self.calls = 0

    def write(self, items: Sequence[Item], source: str, offsets: Sequence[Offset] = ()) -> BatchResult:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("simulated crash")
        return super().write(items, source, offsets)


def test_appends_are_followed(store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + line("r2"))
    tail = tailer(store, clock, source(logs))

    assert tail.poll().accepted == 2
    assert tail.poll().accepted == 0
    append(path, line("r3"))
    assert tail.poll().accepted == 1

    assert request_ids(db) == ["r1", "r2", "r3"]
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]
    assert {row[0] for row in db.execute("SELECT source FROM events")} == {LABEL}


def test_restart_recounts_nothing(store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + line("r2") + "\n")
    tailer(store, clock, source(logs)).poll()

    again = tailer(store, clock, source(logs))
    result = again.poll()
    assert (result.accepted, result.duplicates, result.rejected) == (0, 0, 0)
    append(path, line("r3"))
    result = again.poll()
    assert (result.accepted, result.duplicates) == (1, 0)

    assert request_ids(db) == ["r1", "r2", "r3"]
    assert duplicate_counter(db) == 0


def test_restart_after_a_short_file_grew_past_its_hashed_prefix(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r0"))
    assert path.stat().st_size < 1024  # identified by fewer than 1024 bytes
    first = tailer(store, clock, source(logs))
    first.poll()
    append(path, "".join(line(f"r{i}") for i in range(1, 30)))
    assert path.stat().st_size > 2048
    assert first.poll().accepted == 29

    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (0, 0)
    append(path, line("r30"))
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (1, 0)
    assert count(db, "events") == 31
    assert count(db, "source_offsets") == 1


def test_half_written_line_waits_for_its_end(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    whole, half = line("r1"), line("r2")
    append(path, whole + half[:25])
    tail = tailer(store, clock, source(logs))

    assert tail.poll().accepted == 1
    assert tail.poll().accepted == 0  # still unfinished: not read, not rejected
    assert offsets(db) == [(LABEL, str(path), len(whole))]
    # A restart in the middle does not change that.
    assert tailer(store, clock, source(logs)).poll().rejected == 0

    append(path, half[25:])
    result = tail.poll()
    assert (result.accepted, result.rejected) == (1, 0)
    assert request_ids(db) == ["r1", "r2"]
    assert count(db, "dead_letters") == 0
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]


def test_file_with_only_an_unfinished_first_line_is_left_alone(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    text = line("r1")
    append(path, text[:10])
    tail = tailer(store, clock, source(logs))
    assert tail.poll().accepted == 0
    append(path, text[10:])
    assert tail.poll().accepted == 1
    assert count(db, "dead_letters") == 0


def test_unfinished_over_long_line_is_rejected_once_complete(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + "x" * (MAX_LINE_BYTES + 100))
    tail = tailer(store, clock, source(logs))

    assert tail.poll().rejected == 0
    assert count(db, "dead_letters") == 0
    append(path, "y" * 10 + "\n" + line("r2"))
    result = tail.poll()
    assert (result.accepted, result.rejected) == (1, 1)
    letters = db.execute("SELECT source, location, reason FROM dead_letters").fetchall()
    assert len(letters) == 1
    assert letters[0][:2] == (LABEL, f"{path}:2")
    assert f"{MAX_LINE_BYTES + 110:,} bytes" in letters[0][2]
    assert request_ids(db) == ["r1", "r2"]


def test_rotation_by_rename_reads_both_files_once(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + line("r2"))
    tail = tailer(store, clock, source(logs))
    tail.poll()
    append(path, line("r3"))  # written just before the rotation, not read yet
    path.rename(logs / "a.1.jsonl")
    append(path, line("r4") + line("r5"))

    result = tail.poll()
    assert (result.accepted, result.duplicates) == (3, 0)
    assert request_ids(db) == ["r1", "r2", "r3", "r4", "r5"]
    assert offsets(db) == sorted(
        [
            (LABEL, str(logs / "a.1.jsonl"), (logs / "a.1.jsonl").stat().st_size),
            (LABEL, str(path), path.stat().st_size),
        ]
    )
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (0, 0)


def test_rotation_while_stopped(store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1"))
    tailer(store, clock, source(logs)).poll()
    append(path, line("r2"))
    path.rename(logs / "a.1.jsonl")
    append(path, line("r3"))

    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (2, 0)
    assert request_ids(db) == ["r1", "r2", "r3"]


def test_rotation_out_of_the_glob(store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1"))
    tail = tailer(store, clock, source(logs))
    tail.poll()
    path.rename(logs / "a.jsonl.1")  # no longer matched: what it holds past the checkpoint is not followed
    append(path, line("r2"))
    assert tail.poll().accepted == 1
    assert request_ids(db) == ["r1", "r2"]


@pytest.mark.parametrize("new_lines", [1, 8], ids=["shorter", "longer"])
def test_copytruncate_is_read_from_the_start(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection, new_lines: int
) -> None:
    path = logs / "a.jsonl"
    append(path, "".join(line(f"old{i}") for i in range(4)))
    tail = tailer(store, clock, source(logs))
    tail.poll()
    inode = path.stat().st_ino
    with path.open("r+b") as stream:  # what logrotate's copytruncate leaves: same inode, new content
        stream.truncate(0)
        stream.write("".join(line(f"new{i}") for i in range(new_lines)).encode())
    assert path.stat().st_ino == inode

    result = tail.poll()
    assert (result.accepted, result.duplicates) == (new_lines, 0)
    assert count(db, "events") == 4 + new_lines
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]  # the stale checkpoint is gone
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (0, 0)


def test_a_new_file_matching_the_glob_is_picked_up(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    tail = tailer(store, clock, source(logs))
    assert tail.poll().accepted == 0
    append(logs / "a.jsonl", line("r1"))
    append(logs / "ignored.txt", line("r9"))
    assert tail.poll().accepted == 1
    append(logs / "b.jsonl", line("r2"))
    assert tail.poll().accepted == 1
    assert request_ids(db) == ["r1", "r2"]


def test_relative_glob_is_relative_to_the_working_directory(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(logs.parent)
    append(logs / "a.jsonl", line("r1") + "not json\n")
    tail = tailer(store, clock, SourceConfig(path="usage/*.jsonl", name=LABEL))
    assert tail.poll().accepted == 1
    assert db.execute("SELECT location FROM dead_letters").fetchall() == [(f"{logs / 'a.jsonl'}:2",)]


def test_crash_between_batches_loses_and_duplicates_nothing(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    lines = [line(f"r{i}") for i in range(5)]
    append(path, "".join(lines))
    flaky = FlakyWriter(store, clock, fail_on={2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        tailer(store, clock, source(logs), writer=flaky, batch_size=2).poll()
    assert request_ids(db) == ["r0", "r1"]
    assert offsets(db) == [(LABEL, str(path), len(lines[0]) + len(lines[1]))]

    result = tailer(store, clock, source(logs), batch_size=2).poll()
    assert (result.accepted, result.duplicates) == (3, 0)
    assert request_ids(db) == [f"r{i}" for i in range(5)]
    assert duplicate_counter(db) == 0


def test_failed_poll_is_resumed_by_the_same_tailer(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, "".join(line(f"r{i}") for i in range(5)))
    tail = tailer(store, clock, source(logs), writer=FlakyWriter(store, clock, fail_on={2}), batch_size=2)
    with pytest.raises(RuntimeError):
        tail.poll()
    result = tail.poll()
    assert (result.accepted, result.duplicates) == (3, 0)
    assert count(db, "events") == 5
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]


def test_checkpoint_is_in_the_same_transaction_as_the_events(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + line("r2"))

    def fail_on_checkpoint(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "source_offsets" in statement and statement.lstrip().upper().startswith("INSERT"):
            raise RuntimeError("checkpoint write failed")

    tail = tailer(store, clock, source(logs))
    sa_event.listen(store.engine, "before_cursor_execute", fail_on_checkpoint)
    try:
        with pytest.raises(RuntimeError, match="checkpoint write failed"):
            tail.poll()
    finally:
        sa_event.remove(store.engine, "before_cursor_execute", fail_on_checkpoint)
    # The events were inserted before the checkpoint in the same transaction: rolled back with it.
    assert count(db, "events") == 0
    assert offsets(db) == []

    assert tail.poll().accepted == 2
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]


def test_bad_lines_are_dead_lettered_with_the_source_label_and_line(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1") + "not json\n" + "\n" + line("r2") + '{"request_id": "r3"}\n')
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.rejected) == (2, 2)

    # After a restart, line numbers still count from the start of the file.
    append(path, line("r4") + "[1, 2]\n")
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.rejected) == (1, 1)

    letters = db.execute("SELECT source, location, raw FROM dead_letters ORDER BY id").fetchall()
    assert letters == [
        (LABEL, f"{path}:2", "not json"),
        (LABEL, f"{path}:5", '{"request_id": "r3"}'),
        (LABEL, f"{path}:7", "[1, 2]"),
    ]
    assert request_ids(db) == ["r1", "r2", "r4"]


def test_blank_lines_alone_advance_the_checkpoint(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1"))
    batches: list[BatchResult] = []
    tail = tailer(store, clock, source(logs), on_batch=batches.append)
    tail.poll()
    append(path, "\n\r\n  \n")
    result = tail.poll()
    assert (result.accepted, result.rejected) == (0, 0)
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]
    assert len(batches) == 2
    tail.poll()  # nothing new: no write at all
    assert len(batches) == 2


def test_on_batch_is_called_after_each_committed_batch(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    append(logs / "a.jsonl", "".join(line(f"a{i}") for i in range(3)))
    append(logs / "b.jsonl", "".join(line(f"b{i}") for i in range(4)))
    seen: list[tuple[int, int]] = []

    def on_batch(result: BatchResult) -> None:
        # Called after the commit: a separate connection already sees the batch.
        seen.append((result.accepted, count(db, "events")))

    total = tailer(store, clock, source(logs), batch_size=3, on_batch=on_batch).poll()
    assert seen == [(3, 3), (3, 6), (1, 7)]
    assert total.accepted == 7


def test_lag_seconds(store: Store, clock: FakeClock, logs: Path) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1"))
    written = clock.now - timedelta(seconds=300)
    os.utime(path, (written.timestamp(), written.timestamp()))
    tail = tailer(store, clock, source(logs))

    assert tail.lag_seconds() == pytest.approx(300)  # not read yet: as old as the file's last write
    tail.poll()
    assert tail.lag_seconds() == 0
    append(path, line("r2")[:20])
    clock.advance(seconds=30)
    assert tail.lag_seconds() == 0  # an unfinished line is not lag
    append(path, line("r2")[20:])
    clock.advance(seconds=30)
    # Unread since the poll that read everything (60 s ago), whatever the file's mtime says.
    assert tail.lag_seconds() == pytest.approx(60)
    tail.poll()
    assert tail.lag_seconds() == 0

    # A new tailer (a restart) knows nothing but the checkpoint and the mtime.
    append(path, line("r3"))
    written = clock.now - timedelta(seconds=45)
    os.utime(path, (written.timestamp(), written.timestamp()))
    restarted = tailer(store, clock, source(logs))
    assert restarted.lag_seconds() == pytest.approx(45)
    restarted.poll()
    assert restarted.lag_seconds() == 0


def test_an_unreadable_file_is_skipped_and_the_others_read(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    (logs / "gone.jsonl").symlink_to(logs / "missing")  # vanished between glob and open
    (logs / "dir.jsonl").mkdir()
    append(logs / "b.jsonl", line("r1"))
    tail = tailer(store, clock, source(logs))
    with caplog.at_level(logging.WARNING, logger="monitor.ingest.tail"):
        assert tail.poll().accepted == 1
    assert any("gone.jsonl" in message for message in caplog.messages)
    assert tail.lag_seconds() == 0
    assert request_ids(db) == ["r1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_skipped(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    locked = logs / "a.jsonl"
    append(locked, line("r1"))
    locked.chmod(0)
    append(logs / "b.jsonl", line("r2"))
    tail = tailer(store, clock, source(logs))
    assert tail.poll().accepted == 1
    locked.chmod(0o644)
    assert tail.poll().accepted == 1
    assert request_ids(db) == ["r1", "r2"]


def test_two_names_of_one_file_are_read_once(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    append(path, line("r1"))
    (logs / "current.jsonl").symlink_to(path)
    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (1, 0)
    assert count(db, "source_offsets") == 1


def test_a_file_cut_shorter_than_its_checkpoint_is_read_again(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    lines = [line(f"r{i}") for i in range(12)]
    append(path, "".join(lines))
    tail = tailer(store, clock, source(logs))
    tail.poll()
    kept = "".join(lines[:8])
    assert len(kept) > 1024  # the first 1024 bytes, which identify the file, are unchanged
    with path.open("r+b") as stream:
        stream.truncate(len(kept))
    append(path, line("r12"))

    result = tail.poll()
    assert (result.accepted, result.duplicates) == (1, 8)
    assert count(db, "events") == 13
    assert offsets(db) == [(LABEL, str(path), path.stat().st_size)]


def test_file_id_is_device_inode_and_prefix_hash(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    short, long = logs / "short.jsonl", logs / "long.jsonl"
    append(short, line("s1"))
    append(long, "".join(line(f"l{i}") for i in range(10)))
    short_bytes = short.read_bytes()
    tailer(store, clock, source(logs)).poll()
    append(short, line("s2"))  # growing does not change an id

    def expected(path: Path, prefix: bytes, suffix: str = "") -> str:
        info = path.stat()
        return f"{info.st_dev}:{info.st_ino}:{hashlib.sha256(prefix).hexdigest()[:16]}{suffix}"

    assert sorted(row[0] for row in db.execute("SELECT file_id FROM source_offsets")) == sorted(
        [expected(long, long.read_bytes()[:1024]), expected(short, short_bytes, f":{len(short_bytes)}")]
    )


def test_checkpoint_of_a_renumbered_device_is_found_by_path_and_content(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    path = logs / "a.jsonl"
    first = line("r1")
    append(path, first + line("r2"))
    content = path.read_bytes()
    info = path.stat()
    # A checkpoint written before a reboot gave the file system another device number.
    stale_id = f"{info.st_dev + 7}:{info.st_ino}:{hashlib.sha256(content).hexdigest()[:16]}:{len(content)}"
    db.execute(
        'INSERT INTO source_offsets (source, file_id, path, "offset", updated_at) VALUES (?, ?, ?, ?, ?)',
        (LABEL, stale_id, str(path), len(first), "2026-11-25 00:00:00"),
    )
    db.commit()

    result = tailer(store, clock, source(logs)).poll()
    assert (result.accepted, result.duplicates) == (1, 0)
    assert request_ids(db) == ["r2"]
    rows = db.execute('SELECT file_id, "offset" FROM source_offsets').fetchall()
    assert rows == [(stale_id.replace(str(info.st_dev + 7), str(info.st_dev), 1), len(content))]


def test_tailer_names_its_source(store: Store, clock: FakeClock, logs: Path) -> None:
    src = source(logs)
    tail = tailer(store, clock, src)
    assert tail.source is src
    assert tail.label == LABEL
    tail.close()
    with pytest.raises(RuntimeError, match="closed"):
        tail.poll()


class OpenCounter:
    """Counts every open of a file under `root` by this process (os.open and the built-in open)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.paths: list[str] = []
        root_text = str(root)
        real_os_open, real_open = os.open, builtins.open

        def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
            if str(path).startswith(root_text):
                self.paths.append(str(path))
            return real_os_open(path, *args, **kwargs)

        def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | os.PathLike) and str(file).startswith(root_text):
                self.paths.append(str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)


def test_idle_poll_opens_no_fully_read_file_and_still_sees_every_change(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [logs / f"app-{n:03d}.jsonl" for n in range(300)]
    for n, path in enumerate(files):
        path.write_text(line(f"f{n}-1"))
    half = logs / "half.jsonl"
    half.write_text(line("h-1") + line("h-2")[:20])  # its last line is not finished yet
    t = tailer(store, clock, source(logs))
    assert t.poll().accepted == 301

    opens = OpenCounter(monkeypatch, logs)
    assert t.poll().accepted == 0
    assert t.poll().accepted == 0
    assert t.lag_seconds() == 0
    assert opens.paths == []  # nothing changed: not one file opened, however many polls

    append(files[0], line("f0-2"))  # growth
    files[1].write_text(line("f1-2"))  # copytruncate: truncated, then written again, as long as before
    files[2].rename(logs / "app-002.jsonl.1")  # rotation: the old file moves away, a new one takes its name
    (logs / "app-002.jsonl").write_text(line("f2-new"))
    append(half, line("h-2")[20:])  # the unfinished line is finished
    result = t.poll()
    assert result.accepted == 4, result
    assert sorted(set(opens.paths)) == sorted(
        str(p) for p in [files[0], files[1], files[2], half]
    )  # the rotated file is new at its name; its renamed predecessor is no file of this glob
    assert {"f0-2", "f1-2", "f2-new", "h-2"} <= set(request_ids(db))
    assert count(db, "events") == 305

    opens.paths.clear()
    assert t.poll().accepted == 0
    assert opens.paths == []


# -- file events ---------------------------------------------------------------------------------------------------

POLL_NEVER_S = 60.0  # far beyond every wait below: a line read in time was read because of a file event
WAKE_TIMEOUT_S = 5.0


class Following:
    """A tailer run by `follow` in a thread with a watcher, polling only every POLL_NEVER_S."""

    def __init__(self, follower: Tailer, batches: queue.Queue[BatchResult]) -> None:
        self.watcher = Watcher.open([follower.pattern])
        if self.watcher is None:
            pytest.skip("no inotify here")
        self.batches = batches  # filled by the tailer's on_batch
        self.polls = 0
        self.polled = threading.Event()
        self._stop = threading.Event()

        def poll() -> None:
            follower.poll()
            self.polls += 1
            self.polled.set()

        self._thread = threading.Thread(target=follow, args=(poll, self.watcher, self._stop, POLL_NEVER_S), daemon=True)
        self._thread.start()
        assert self.polled.wait(WAKE_TIMEOUT_S), "the first poll did not run"

    def next_batch(self) -> BatchResult:
        """The next committed batch, which must come long before the poll interval is up."""
        return self.batches.get(timeout=WAKE_TIMEOUT_S)

    def stop(self) -> None:
        assert self.watcher is not None
        self._stop.set()
        self.watcher.wake()
        self._thread.join(WAKE_TIMEOUT_S)
        assert not self._thread.is_alive(), "stop did not end the wait"
        self.watcher.close()


def test_an_append_is_read_on_its_file_event_without_waiting_for_the_poll(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    """Appends, a rotation, and a file in a directory created after the start, each read on its own event."""
    live = logs / "live.jsonl"
    append(live, line("before"))
    batches: queue.Queue[BatchResult] = queue.Queue()
    follower = tailer(store, clock, source(logs, "**/*.jsonl"), on_batch=batches.put)
    following = Following(follower, batches)
    try:
        assert following.next_batch().accepted == 1  # the first poll reads what was there
        append(live, line("appended"))
        assert following.next_batch().accepted == 1
        live.rename(logs / "live.1.jsonl")
        append(live, line("after-rotation"))
        assert following.next_batch().accepted == 1
        (logs / "later").mkdir()
        append(logs / "later" / "new.jsonl", line("in-a-new-directory"))
        assert following.next_batch().accepted == 1
        append(logs / "notes.txt", "not matched by the glob\n")
        assert batches.empty()
    finally:
        following.stop()
    assert request_ids(db) == ["after-rotation", "appended", "before", "in-a-new-directory"]
    assert following.polls < 10  # woken by the events, not spinning


def test_without_file_events_the_poll_still_reads(
    store: Store, clock: FakeClock, logs: Path, db: sqlite3.Connection
) -> None:
    """No watcher (no inotify, or it could not start): `follow` polls every interval, and stops when asked."""
    follower = tailer(store, clock, source(logs))
    stop = threading.Event()
    polls: queue.Queue[int] = queue.Queue()

    def poll() -> None:
        polls.put(follower.poll().accepted)

    thread = threading.Thread(target=follow, args=(poll, None, stop, 0.01), daemon=True)
    thread.start()
    polls.get(timeout=WAKE_TIMEOUT_S)
    append(logs / "live.jsonl", line("polled"))
    while polls.get(timeout=WAKE_TIMEOUT_S) == 0:
        pass
    stop.set()
    thread.join(WAKE_TIMEOUT_S)
    assert not thread.is_alive()
    assert request_ids(db) == ["polled"]


def test_watched_directories_follow_the_glob(tmp_path: Path) -> None:
    """A flat glob watches its directory; a `**` glob every directory below; a missing base once it exists."""
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    flat = Watcher.open([str(tmp_path / "a" / "*.jsonl")])
    deep = Watcher.open([str(tmp_path / "a" / "**" / "*.jsonl")])
    one_down = Watcher.open([str(tmp_path / "a" / "*" / "*.jsonl")])
    missing = Watcher.open([str(tmp_path / "later" / "*.jsonl")])
    watchers = [flat, deep, one_down, missing]
    if None in watchers:
        pytest.skip("no inotify here")
    try:
        assert [w.watched for w in watchers if w] == [1, 3, 2, 0]
        assert missing is not None
        assert not missing.wait(0.01)
        (tmp_path / "later").mkdir()
        assert missing.wait(WAKE_TIMEOUT_S)  # files put in it before it was watched raised no event
        assert missing.watched == 1
    finally:
        for w in watchers:
            if w is not None:
                w.close()
