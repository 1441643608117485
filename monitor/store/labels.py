"""Bounded metric label values: the first values seen are admitted, up to a cap per label; the rest are `__other__`.

The admitted values live in the database (`label_values`), so every replica renders the same series, and they are
never removed, so a series never shrinks or moves. Each process caches them; the database is asked only about a
value the cache does not hold while the label still has free slots.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime

from sqlalchemy import Connection, select, text

from monitor.store.models import label_values
from monitor.store.queries import insert_ignoring_all_conflicts

OTHER = "__other__"
# Values that never take a slot: "" is an event without the attribute; OTHER already is the overflow series.
FREE_VALUES = frozenset({"", OTHER})
# Transaction-scoped advisory lock that serializes admissions across PostgreSQL writers ("clmlabel").
_PG_LOCK_KEY = 0x636C6D6C6162656C


def read_admitted(connection: Connection, labels: Iterable[str] | None = None) -> dict[str, frozenset[str]]:
    """The admitted values of the given labels (every label when None)."""
    query = select(label_values.c.label, label_values.c.value)
    if labels is not None:
        query = query.where(label_values.c.label.in_(sorted(labels)))
    found: dict[str, set[str]] = {}
    for label, value in connection.execute(query):
        found.setdefault(label, set()).add(value)
    return {label: frozenset(values) for label, values in found.items()}


class LabelGate:
    """Decides the label value a counter is written under, against a sticky, capped list in the database."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        self._caps = dict(caps)
        # Replaced, never mutated, so readers on other threads see one whole set or the next.
        self._admitted: dict[str, frozenset[str]] = dict.fromkeys(self._caps, frozenset())
        self._lock = threading.Lock()

    @property
    def caps(self) -> dict[str, int]:
        """The cap of each gated label."""
        return dict(self._caps)

    def cached(self, label: str, value: str) -> str | None:
        """The value to write when the cache decides it (admitted, or the label is full), else None: ask the DB."""
        if value in FREE_VALUES:
            return value
        admitted = self._admitted[label]
        if value in admitted:
            return value
        if len(admitted) >= self._caps[label]:
            return OTHER
        return None

    def admit(
        self, connection: Connection, wanted: Mapping[str, Iterable[str]], now: datetime
    ) -> dict[str, frozenset[str]]:
        """In the caller's write transaction: admit `wanted` values (in order) while slots last; return every label's
        admitted set as it will be once this transaction commits (pass it to `publish` after the commit)."""
        if connection.dialect.name == "postgresql":
            # Writers admit one at a time (until each commits), so two cannot count the same free slots; the unique
            # slot number guards the cap even so. SQLite writers are serialized by BEGIN IMMEDIATE already.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        labels = sorted(wanted)
        current = read_admitted(connection, labels)
        rows = []
        for label in labels:
            have = current.get(label, frozenset())
            free = self._caps[label] - len(have)
            fresh = [v for v in dict.fromkeys(wanted[label]) if v not in have and v not in FREE_VALUES]
            rows += [
                {"label": label, "value": value, "slot": len(have) + i, "admitted_at": now}
                for i, value in enumerate(fresh[: max(free, 0)])
            ]
        if rows:
            connection.execute(insert_ignoring_all_conflicts(label_values, connection.dialect), rows)
            current = read_admitted(connection, labels)  # what really holds the slots, had anyone raced us
        return {label: current.get(label, frozenset()) for label in labels}

    def publish(self, admitted: Mapping[str, frozenset[str]]) -> None:
        """Cache admitted sets read in a transaction that has committed."""
        with self._lock:
            for label, values in admitted.items():
                if label in self._caps:
                    self._admitted[label] = self._admitted[label] | values

    def size(self) -> int:
        """How many values the cache holds (bounded by the caps)."""
        return sum(len(values) for values in self._admitted.values())
