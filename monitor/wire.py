"""Wire formats and small helpers every layer shares: standard library only, so the proxy client can import it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import overload

PICO_PER_USD = 10**12  # money is integer pico-dollars (10^-12 USD) everywhere
# The token counts of a usage event, in the order the store's columns, counters and reports list them.
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# What Anthropic's usage report counts per row: the token counts and the web searches.
BILLED_COUNTS = (*TOKEN_TYPES, "web_search_requests")
# A scope with no attribute (a budget or limit over all traffic); also the `scope` label value of such a budget.
EMPTY_SCOPE = "all"


@overload
def iso_z(moment: datetime, timespec: str = ...) -> str: ...
@overload
def iso_z(moment: None, timespec: str = ...) -> None: ...
@overload
def iso_z(moment: datetime | None, timespec: str = ...) -> str | None: ...
def iso_z(moment: datetime | None, timespec: str = "auto") -> str | None:
    """RFC 3339 in UTC with a Z (None stays None); a naive datetime is taken as UTC, as in usage events."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def scope_key(values: Mapping[str, str | None]) -> str:
    """The canonical JSON of a scope or a label set: its identity in the store, the API and the snapshot."""
    return json.dumps(dict(sorted(values.items())), separators=(",", ":"), ensure_ascii=False)


def scope_text(scope: Mapping[str, str], sep: str = ", ") -> str:
    """A scope for people: 'environment=prod, project=lingo' (sorted by name), or EMPTY_SCOPE."""
    return sep.join(f"{key}={value}" for key, value in sorted(scope.items())) or EMPTY_SCOPE
