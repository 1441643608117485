"""One reconciliation: fetch Anthropic's figures for a range of UTC days, store them, compare them with ours."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Engine

from monitor.clock import Clock
from monitor.config import ReconcileConfig
from monitor.pricing import PriceTable
from monitor.reconcile import store
from monitor.reconcile.compare import DayRow, attributes_text, compare, last_settled_day
from monitor.reconcile.fetcher import EARLIEST, AnalyticsClient, Fetched
from monitor.store.rollup import utc_days_by_labels

log = logging.getLogger(__name__)


class NoAdminKey(Exception):
    """The environment variable named by reconcile.admin_key_env is not set."""

    def __init__(self, variable: str) -> None:
        super().__init__(
            f"${variable} is not set: put an Admin API key (sk-ant-admin…) or a key with read:analytics there "
            "(reconcile.admin_key_env names the variable)"
        )


@dataclass(frozen=True)
class Snapshot:
    """The last settled day that was fetched, its rows, and when the newest fetch succeeded."""

    day: date | None
    rows: tuple[DayRow, ...]
    last_success: datetime | None


class Reconciler:
    """Fetches, stores and compares; the admin key is held here and handed only to the SDK client."""

    def __init__(
        self,
        engine: Engine,
        prices: PriceTable,
        config: ReconcileConfig,
        clock: Clock,
        admin_key: str | None,
        client_factory: Callable[..., AnalyticsClient] = AnalyticsClient,
    ) -> None:
        self._engine = engine
        self._prices = prices
        self.config = config
        self._clock = clock
        self._admin_key = admin_key
        self._client_factory = client_factory

    @property
    def enabled(self) -> bool:
        """True when the admin key is in the environment: fetching is possible."""
        return self._admin_key is not None

    def default_range(self) -> tuple[date, date]:
        """The last `lookback_days` UTC days, today included: [first, end)."""
        today = self._clock().date()
        return max(today - timedelta(days=self.config.lookback_days - 1), EARLIEST), today + timedelta(days=1)

    def fetch(self, first: date, end: date) -> int:
        """Read Anthropic's figures for [first, end) (every page, every 31-day span), then replace those days in one
        transaction. Raises AnalyticsError (nothing written) when Anthropic cannot be reached or refuses the key."""
        if self._admin_key is None:
            raise NoAdminKey(self.config.admin_key_env)
        client = self._client_factory(
            self._admin_key, self.config.base_url, self._prices, by_api_key=bool(self.config.api_keys)
        )
        try:
            fetched: Fetched = client.fetch(first, end)
        finally:
            client.close()
        written = store.replace(self._engine, fetched, self._clock())
        log.info(
            "reconcile: stored Anthropic's figures for %s to %s (%d rows)", first, end - timedelta(days=1), written
        )
        return written

    def compare(self, first: date, end: date) -> list[DayRow]:
        """Our figures against Anthropic's stored ones, for the days of [first, end) some fetch covered."""
        with self._engine.connect() as connection:
            theirs = store.read(connection, first, end)
            covered = store.coverage(connection, first, end)
            ours = utc_days_by_labels(connection, first, end)
        config = self.config
        return compare(theirs, ours, covered, self._clock(), config.settle_hours, config.tolerance, config.api_keys)

    def run(self) -> list[DayRow]:
        """The scheduled run: fetch the lookback window, then compare it."""
        first, end = self.default_range()
        self.fetch(first, end)
        rows = self.compare(first, end)
        findings = [r for r in rows if r.finding]
        if findings:
            log.warning(
                "reconcile: %d finding(s): %s",
                len(findings),
                "; ".join(
                    f"{r.day} {r.model} {r.service_tier}{' ' + attributes_text(r) if r.attributes is not None else ''} "
                    f"drift ${r.drift_usd} missing {r.missing_requests}"
                    for r in findings[:10]
                ),
            )
        return rows

    def snapshot(self) -> Snapshot:
        """What the metrics show: the latest settled day a fetch covered, compared; read from the database only."""
        now = self._clock()
        with self._engine.connect() as connection:
            day = store.last_fetched_day(
                connection, last_settled_day(now, self.config.settle_hours) + timedelta(days=1)
            )
            last = store.last_success(connection)
        if day is None:
            return Snapshot(None, (), last)
        return Snapshot(day, tuple(self.compare(day, day + timedelta(days=1))), last)
