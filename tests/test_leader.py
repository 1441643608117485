"""Leader election on PostgreSQL: one replica holds the advisory lock; another takes over when it lets go."""

from __future__ import annotations

from sqlalchemy import create_engine

from monitor.leader import Leadership
from monitor.store.db import create_db_engine

pytest_plugins = ["tests.pg"]


def test_one_leader_at_a_time_and_takeover(pg_url: str) -> None:
    first_engine, second_engine = create_db_engine(pg_url), create_db_engine(pg_url)
    first, second = Leadership(first_engine), Leadership(second_engine)
    try:
        assert first.is_leader() is True
        assert second.is_leader() is False
        assert first.is_leader() is True  # asking again keeps it
        first.release()
        assert second.is_leader() is True
        assert first.is_leader() is False
    finally:
        first.release()
        second.release()
        first_engine.dispose()
        second_engine.dispose()


def test_a_dead_leaders_lock_frees(pg_url: str) -> None:
    first_engine, second_engine = create_db_engine(pg_url), create_db_engine(pg_url)
    first, second = Leadership(first_engine), Leadership(second_engine)
    try:
        assert first.is_leader()
        first_engine.dispose()  # the process dies: its sessions end
        first._connection.invalidate()  # type: ignore[union-attr]  # the dedicated session too
        assert second.is_leader() is True
    finally:
        second.release()
        second_engine.dispose()


def test_sqlite_always_leads(tmp_path: object) -> None:
    engine = create_engine("sqlite://")
    assert Leadership(engine).is_leader() is True
