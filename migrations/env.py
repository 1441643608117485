"""Alembic environment: runs migrations on the connection given, or on the configured database."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from monitor.config import load_settings
from monitor.store.db import create_db_engine
from monitor.store.models import exists_on, metadata
from monitor.store.partitions import partition_tables

config = context.config


def _url() -> str:
    import os

    url = config.get_main_option("sqlalchemy.url")
    return url or os.environ.get("CLAUDE_MONITOR_DATABASE_URL") or load_settings().settings.database_url


def _run(connection: Connection) -> None:
    dialect = connection.dialect.name
    # A partition (PostgreSQL's events_pYYYYMM, events_default) is storage of its parent table, which the metadata
    # describes; the metadata's objects that exist on one database only (models.DIALECTS) are compared there only.
    partitions = set(partition_tables(connection)) if dialect == "postgresql" else set()

    def include_name(name: str | None, type_: str, _parents: Any) -> bool:
        return not (type_ == "table" and name in partitions)

    def include_object(item: Any, _name: str | None, _type: str, reflected: bool, _compare_to: Any) -> bool:
        return reflected or exists_on(item, dialect)

    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=dialect == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
        include_name=include_name,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL for the configured database without connecting."""
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the given connection, or connect to the configured database."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_db_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
