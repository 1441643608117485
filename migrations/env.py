"""Alembic environment: runs migrations on the connection given, or on the configured database."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from monitor.config import load_settings
from monitor.store.db import create_db_engine
from monitor.store.models import metadata

config = context.config


def _url() -> str:
    import os

    url = config.get_main_option("sqlalchemy.url")
    return url or os.environ.get("CLAUDE_MONITOR_DATABASE_URL") or load_settings().settings.database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
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
