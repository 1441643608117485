"""Shared fixtures: a real SQLite file per test, a movable clock, and the real command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.service import Store, open_store

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the throwaway PostgreSQL (tests/pg.py) is slow whatever its module says: starting the
    server takes seconds, and the fast lane (`-m "not slow"`) must never pay for it."""
    for item in items:
        if "postgres" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))


def write_config(directory: Path, text: str = "") -> Path:
    """A config file whose database is a SQLite file in `directory`, plus `text`."""
    path = directory / "claude-monitor.yaml"
    path.write_text(f"database_url: sqlite:///{directory / 'monitor.db'}\n{text}", encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    """An open, migrated SQLite store in a temp file, its clock the `clock` fixture."""
    loaded = load_settings(write_config(tmp_path), environ={})
    opened = open_store(loaded, clock=clock)
    yield opened
    opened.close()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True) -> Run:
    """Run `python -m monitor ARGS` as a real process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_MONITOR_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "monitor", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"claude-monitor {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return Run(proc.returncode, proc.stdout, proc.stderr)


def event(
    request_id: str = "req_1", *, timestamp: str = "2026-11-24T10:15:02Z", model: str = "claude-haiku-4-5", **usage: Any
) -> dict[str, Any]:
    """A usage event with the given usage fields."""
    return {"request_id": request_id, "timestamp": timestamp, "model": model, "usage": usage}


def jsonl(path: Path, *events: Any) -> Path:
    """Write events (dicts, or raw strings as-is) one per line."""
    with path.open("w", encoding="utf-8") as out:
        for item in events:
            out.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path
