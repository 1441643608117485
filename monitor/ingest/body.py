"""An HTTP ingest body — one JSON event, a JSON array, or NDJSON — split into parsed items, counting the elements
before parsing them so an oversized batch is refused without being built."""

from __future__ import annotations

import json
import re
from typing import Any

from monitor.ingest.parse import EventParser, Rejected
from monitor.ingest.writer import Item

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's own whitespace
_NON_BLANK_LINE = re.compile(r"\S[^\n]*")
_DECODER = json.JSONDecoder()


class TooManyEvents(Exception):
    """The body holds more than `limit` events."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} events in one request")
        self.limit = limit


class NotJsonNorNdjson(Exception):
    """Not one element of the body could be read as JSON."""


def split_body(text: str, parser: EventParser, where: str, limit: int) -> list[Item]:
    """Parse a body into (location, Event | Rejected) items, located as ``"{where} #{index}"``.

    Raises TooManyEvents past `limit` elements (before parsing any of them into events) and NotJsonNorNdjson when
    the body is neither a JSON value nor NDJSON with at least one JSON line.
    """
    try:
        elements = _json_elements(text, limit)
    except (ValueError, RecursionError):
        elements = None
    if elements is not None:
        return [(f"{where} #{i}", parser.parse_object(element)) for i, element in enumerate(elements)]
    if text.count("\n") >= limit:  # may be over: count non-blank lines without building them all
        for count, _ in enumerate(_NON_BLANK_LINE.finditer(text), start=1):
            if count > limit:
                raise TooManyEvents(limit)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > limit:
        raise TooManyEvents(limit)
    items: list[Item] = []
    parsed_any = False
    for i, line in enumerate(lines):
        item = parser.parse_line(line)
        parsed_any = parsed_any or not (isinstance(item, Rejected) and item.reason.startswith("not JSON"))
        items.append((f"{where} #{i}", item))
    if not parsed_any:
        raise NotJsonNorNdjson("body is neither JSON nor NDJSON")
    return items


def _json_elements(text: str, limit: int) -> list[Any]:
    """The body's elements when it is one JSON value (an array's elements, else the value itself).

    An array is decoded one element at a time so that a body of a million tiny elements stops at `limit` + 1.
    Raises ValueError (or RecursionError) when the text is not one JSON value.
    """
    start = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("[", start):
        return [json.loads(text)]
    end = len(text)
    i = _WHITESPACE.match(text, start + 1).end()  # type: ignore[union-attr]
    elements: list[Any] = []
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            value, i = _DECODER.raw_decode(text, i)
            elements.append(value)
            if len(elements) > limit:
                raise TooManyEvents(limit)
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if text.startswith(",", i):
                i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            elif text.startswith("]", i):
                i += 1
                break
            else:
                raise ValueError(f"expected ',' or ']' at character {i}")
    if _WHITESPACE.match(text, i).end() != end:  # type: ignore[union-attr]
        raise ValueError(f"extra data at character {i}")
    return elements
