"""Usage counts that budgets measure and the store keeps per budget scope: plain integers, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.wire import TOKEN_TYPES

USAGE_FIELDS = ("requests", *TOKEN_TYPES, "cost_pico")


@dataclass(slots=True)
class Usage:
    """Counts that budgets measure: requests, tokens by type and cost (pico-dollars; unpriced events add 0)."""

    requests: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cost_pico: int = 0

    def add(self, other: Usage) -> None:
        """Add another usage to this one."""
        self.requests += other.requests
        self.input += other.input
        self.output += other.output
        self.cache_read += other.cache_read
        self.cache_write_5m += other.cache_write_5m
        self.cache_write_1h += other.cache_write_1h
        self.cost_pico += other.cost_pico

    def as_tuple(self) -> tuple[int, ...]:
        """The counts in USAGE_FIELDS order."""
        return (
            self.requests,
            self.input,
            self.output,
            self.cache_read,
            self.cache_write_5m,
            self.cache_write_1h,
            self.cost_pico,
        )
