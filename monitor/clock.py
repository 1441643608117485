"""The one source of 'now': injected everywhere so tests move time instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The current UTC time, timezone-aware."""
    return datetime.now(UTC)
