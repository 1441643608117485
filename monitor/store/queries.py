"""Statements shared by the write and read paths, written once for SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect


def insert_ignoring_conflicts(table: Table, dialect: Dialect, key: str) -> Any:
    """INSERT … ON CONFLICT (key) DO NOTHING for the engine's dialect."""
    if dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])
    raise NotImplementedError(f"database {dialect.name!r} is not supported; use SQLite or PostgreSQL")
