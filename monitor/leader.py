"""Which replica runs the jobs with side effects (retention, notifications).

Every replica ingests, evaluates (its own flags for /v1/check) and serves metrics. Deleting old rows and sending
notices must happen once: on PostgreSQL the replica holding a session advisory lock — on a connection of its own,
never returned to the pool — is the leader; if it dies, its connection closes, the lock frees, and the next replica
to ask takes over. SQLite is one process: it always leads.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)
LOCK_KEY = 0x636C6D6F6E6974  # "clmonit": one lock per database


class Leadership:
    """Asks, cheaply and as often as needed, whether this process leads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._single = engine.dialect.name != "postgresql"
        self._connection: Connection | None = None
        self._held = False
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        """True when this process should run the leader-only jobs now."""
        if self._single:
            return True
        with self._lock:
            try:
                if self._connection is None:
                    self._connection = self._engine.connect()
                if self._held:
                    self._connection.execute(text("SELECT 1"))  # the lock lives as long as this session
                else:
                    self._held = bool(self._connection.execute(select(func.pg_try_advisory_lock(LOCK_KEY))).scalar())
                    self._connection.commit()
                    if self._held:
                        log.info("this replica now runs the leader-only jobs")
            except SQLAlchemyError as exc:
                log.warning("leadership unknown (%s): not leading until the database answers", exc.__class__.__name__)
                self._drop()
            return self._held

    @property
    def leading(self) -> bool:
        """The last answer of `is_leader`, without asking the database (for the leader gauge at scrape time)."""
        return self._held

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.invalidate()
                self._connection.close()
            except SQLAlchemyError:
                pass
        self._connection = None
        self._held = False

    def release(self) -> None:
        """Give up leadership (at shutdown)."""
        with self._lock:
            if self._connection is not None and self._held:
                try:
                    self._connection.execute(select(func.pg_advisory_unlock(LOCK_KEY)))
                    self._connection.commit()
                except SQLAlchemyError:
                    pass
            if self._connection is not None:
                self._connection.close()
            self._connection = None
            self._held = False
