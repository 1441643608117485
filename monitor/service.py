"""Composition root: builds the store, the price table and the write path from settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from monitor.clock import Clock, system_clock
from monitor.config import ConfigError, LoadedSettings, Settings
from monitor.events import EventParser
from monitor.ingest.writer import Writer
from monitor.pricing import PriceTable, load_price_table
from monitor.store.db import create_db_engine, upgrade


def build_price_table(loaded: LoadedSettings) -> PriceTable:
    """The shipped table with the config's overrides; a conflict is a config error naming the file."""
    try:
        return load_price_table(loaded.settings.pricing.models)
    except ValueError as exc:
        where = loaded.path or "built-in defaults"
        raise ConfigError(f"invalid configuration:\n  {where}: {exc}") from None


@dataclass
class Store:
    """An open, migrated store with the pieces that write to it."""

    settings: Settings
    engine: Engine
    prices: PriceTable
    parser: EventParser
    writer: Writer

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()


def open_store(loaded: LoadedSettings, clock: Clock = system_clock, migrate: bool = True) -> Store:
    """Connect, bring the schema to head, and build the parse, price and write path."""
    settings = loaded.settings
    prices = build_price_table(loaded)
    engine = create_db_engine(settings.database_url)
    if migrate:
        upgrade(engine)
    parser = EventParser(settings.dimensions, clock)
    return Store(settings, engine, prices, parser, Writer(engine, prices, clock))
