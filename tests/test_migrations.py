"""Schema under Alembic: upgrade to head from the repo root, no drift between models and migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_config

# Runs the command line in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow


def alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLAUDE_MONITOR_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_upgrade_head_then_check_reports_no_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade = alembic("upgrade", "head", url=url)
    assert upgrade.returncode == 0, upgrade.stderr
    check = alembic("check", url=url)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for step in (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head")):
        result = alembic(*step, url=url)
        assert result.returncode == 0, result.stderr
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "x.db").execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"events", "dead_letters", "alembic_version"} <= tables


def test_migrate_command_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run_cli("migrate", "--config", str(config))
    run_cli("migrate", "--config", str(config))
    connection = sqlite3.connect(tmp_path / "monitor.db")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    heads = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    scripts = sorted(p.name for p in (REPO / "migrations" / "versions").glob("0*.py"))
    assert len(heads) == 1 and scripts[-1].startswith(heads[0])
