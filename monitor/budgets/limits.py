"""Admission limits compiled from config, token buckets, and a call's worst-case cost. Pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from monitor.budgets import resolved_match, scope_for
from monitor.config import LimitConfig
from monitor.ingest.parse import Event
from monitor.pricing import PriceTable
from monitor.wire import PICO_PER_USD, scope_key


@dataclass(frozen=True)
class Limit:
    """A configured limit, compiled: money in pico-dollars, buckets sized."""

    name: str
    match: tuple[tuple[str, str], ...]
    per: str | None
    requests_per_minute: int | None
    burst: int
    input_tokens_per_minute: int | None
    input_tokens_burst: int
    concurrent: int | None
    max_tokens: int | None
    max_input_tokens: int | None
    max_request_pico: int | None

    def scope_of(self, model: str, attributes: Mapping[str, str]) -> dict[str, str] | None:
        """The scope a call with this model and attributes counts toward, or None if the limit does not apply."""
        return scope_for(self.match, self.per, model, attributes)


def compile_limits(configs: Sequence[LimitConfig], prices: PriceTable) -> list[Limit]:
    """Limits from config; a `model` in match resolved to its price-table name, as budgets do."""
    compiled = []
    for config in configs:
        match = resolved_match(config.match, prices)
        rpm, tpm = config.requests_per_minute, config.input_tokens_per_minute
        compiled.append(
            Limit(
                config.name,
                tuple(sorted(match.items())),
                config.per,
                rpm,
                config.burst or rpm or 0,
                tpm,
                config.input_tokens_burst or tpm or 0,
                config.concurrent,
                config.max_tokens,
                config.max_input_tokens,
                None if config.max_request_usd is None else int(config.max_request_usd * PICO_PER_USD),
            )
        )
    return compiled


class TokenBucket:
    """A bucket of `capacity` tokens refilled at `per_minute` a minute; taking may go below zero (a large call
    admitted on a full bucket pays its debt before the next one)."""

    __slots__ = ("at", "level")

    def __init__(self, level: float, at: datetime) -> None:
        self.level = level
        self.at = at

    def refill(self, now: datetime, per_minute: int, capacity: int) -> float:
        """Add what accrued since the last look (a clock moved back adds nothing); return the level."""
        if now > self.at:
            self.level = min(capacity, self.level + (now - self.at).total_seconds() * per_minute / 60)
            self.at = now
        return self.level

    @staticmethod
    def needed(amount: int, capacity: int) -> float:
        """The level at which `amount` may be taken: all of it, or a full bucket for a call larger than the bucket."""
        return float(min(amount, capacity))

    def wait(self, amount: int, per_minute: int, capacity: int) -> int:
        """Whole seconds until `amount` may be taken."""
        missing = self.needed(amount, capacity) - self.level
        return max(1, math.ceil(missing * 60 / per_minute)) if missing > 0 else 0


def scope_key_of(limit: Limit, model: str, attributes: Mapping[str, str]) -> str | None:
    """The canonical key of the scope a call counts toward under `limit`, or None."""
    scope = limit.scope_of(model, attributes)
    return None if scope is None else scope_key(scope)


def worst_case_pico(
    prices: PriceTable,
    model_id: str,
    input_tokens: int,
    max_tokens: int,
    *,
    batch: bool,
    speed: str | None,
    geo: str | None,
    now: datetime,
) -> int | None:
    """What a call could cost at most: every estimated input token at the input rate and `max_tokens` at the output
    rate, with the batch, speed, geo and long-prompt rules of the price table in force today; None when unpriced."""
    probe = Event(
        "admission-worst-case",
        now,
        model_id,
        input_tokens=input_tokens,
        output_tokens=max_tokens,
        batch=batch,
        speed=speed,
        inference_geo=geo,
    )
    return prices.price(probe).cost_pico
