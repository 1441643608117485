"""Engines and schema migration: SQLite (WAL) by default, PostgreSQL in production."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def create_db_engine(url: str, *, make_directory: bool = True, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, and real BEGIN IMMEDIATE write transactions.

    `make_directory` creates a SQLite file's directory; the read-only commands pass False.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if make_directory and database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE can be issued (SQLAlchemy's documented recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock up front: a deferred read-then-write could fail with SQLITE_BUSY mid-batch.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def migrations_dir() -> Path:
    """Where the Alembic scripts are: the repository's migrations/, or the copy installed with the package."""
    repo = Path(__file__).resolve().parents[2] / "migrations"
    if (repo / "env.py").exists():
        return repo
    spec = importlib.util.find_spec("monitor._migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations are not installed with this package")
    return Path(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic config for `url` without alembic.ini."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to head (idempotent)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class SchemaNotCurrent(Exception):
    """The database is missing, or its schema is not the one this version reads, and the command does not migrate."""


def require_current_schema(engine: Engine, shown_url: str) -> None:
    """Refuse (SchemaNotCurrent) unless the database exists and is at the migrations' head; reads only.

    `shown_url` is the database URL as it may appear in a message (without its password).
    """
    file = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if file and file != ":memory:" and not Path(file).expanduser().exists():  # connecting would create it
        raise SchemaNotCurrent(
            f"no database at {shown_url}: this command only reads; "
            "create it with `claude-monitor migrate` (or start `claude-monitor serve`)"
        )
    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    heads = set(script.get_heads())
    if current == heads:
        return
    known = {revision.revision for revision in script.walk_revisions()}
    shown = ", ".join(sorted(current)) or "none (no claude-monitor tables)"
    if current - known:
        raise SchemaNotCurrent(
            f"{shown_url}: schema revision {shown} is newer than this claude-monitor knows "
            f"(its head is {', '.join(sorted(heads))}): upgrade claude-monitor to read it"
        )
    raise SchemaNotCurrent(
        f"{shown_url}: schema revision {shown}, this claude-monitor reads {', '.join(sorted(heads))}; "
        "this command only reads and does not migrate: run `claude-monitor migrate` "
        "(or restart `claude-monitor serve`, which migrates at start)"
    )


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the migrations' head."""
    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(script.get_heads())
