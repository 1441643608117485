"""The one write path every source shares: price, dedup on request_id, dead-letter, commit per batch."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from monitor.events import Event, Rejected
from monitor.pricing import PriceTable
from monitor.store.models import dead_letters, events
from monitor.store.queries import insert_ignoring_conflicts


@dataclass
class BatchResult:
    """What one batch (or a whole run, when added up) did."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unpriced: int = 0
    attributes_dropped: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)

    def add(self, other: BatchResult, keep_rejections: bool = False) -> None:
        """Add another result's counts to this one."""
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.unpriced += other.unpriced
        self.attributes_dropped += other.attributes_dropped
        if keep_rejections:
            self.rejections.extend(other.rejections)

    def as_dict(self) -> dict[str, int]:
        """The SPEC §5 summary."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "unpriced": self.unpriced,
        }


Item = tuple[str, Event | Rejected]  # (location, parsed)


class Writer:
    """Writes parsed batches to the store in one transaction each."""

    def __init__(self, engine: Engine, prices: PriceTable, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._prices = prices
        self._clock = clock
        self._insert = insert_ignoring_conflicts(events, engine.dialect, "request_id").returning(events.c.request_id)
        self._insert_letter = insert_ignoring_conflicts(dead_letters, engine.dialect, "fingerprint")

    def write(self, items: Sequence[Item], source: str) -> BatchResult:
        """Store a batch: new events priced, duplicates skipped, rejections dead-lettered; all or nothing."""
        result = BatchResult()
        now = self._clock()
        rows: list[dict[str, Any]] = []
        letters: list[dict[str, Any]] = []
        seen: set[str] = set()
        unpriced: set[str] = set()
        dropped: dict[str, int] = {}
        for location, item in items:
            if isinstance(item, Rejected):
                letters.append(
                    {
                        "received_at": now,
                        "source": source,
                        "location": location[:1024],
                        "reason": item.reason,
                        "raw": item.raw,
                        "request_id": item.request_id,
                        "fingerprint": _fingerprint(source, location, item.raw),
                    }
                )
                result.rejections.append((location, item.reason))
                continue
            if item.request_id in seen:
                result.duplicates += 1
                continue
            seen.add(item.request_id)
            if item.attributes_dropped:
                dropped[item.request_id] = item.attributes_dropped
            price = self._prices.price(item)
            if price.cost_pico is None:
                unpriced.add(item.request_id)
            rows.append(_row(item, price.model, price.cost_pico, price.price_version, price.long_prompt, now, source))
        result.rejected = len(letters)
        with (
            self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as connection,
            connection.begin(),
        ):
            inserted: set[str] = set()
            if rows:
                inserted = set(connection.execute(self._insert, rows).scalars())
            if letters:
                connection.execute(self._insert_letter, letters)
        result.accepted = len(inserted)
        result.duplicates += len(rows) - len(inserted)
        result.unpriced = len(unpriced & inserted)
        result.attributes_dropped = sum(count for rid, count in dropped.items() if rid in inserted)
        return result


def _fingerprint(source: str, location: str, raw: str) -> str:
    return hashlib.sha256(f"{source}\x00{location}\x00{raw}".encode()).hexdigest()


def _row(
    event: Event,
    model: str,
    cost: int | None,
    version: str | None,
    long_prompt: bool,
    now: datetime,
    source: str,
) -> dict[str, Any]:
    return {
        "request_id": event.request_id,
        "ts": event.timestamp,
        "received_at": now,
        "source": source,
        "model_id": event.model_id,
        "model": model,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_5m_tokens": event.cache_write_5m_tokens,
        "cache_write_1h_tokens": event.cache_write_1h_tokens,
        "web_search_requests": event.web_search_requests,
        "web_fetch_requests": event.web_fetch_requests,
        "batch": event.batch,
        "long_prompt": long_prompt,
        "service_tier": event.service_tier,
        "speed": event.speed,
        "inference_geo": event.inference_geo,
        "status": event.status,
        "latency_ms": event.latency_ms,
        "attributes": event.attributes or {},
        "cost_pico": cost,
        "price_version": version,
    }
