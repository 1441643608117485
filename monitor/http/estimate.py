"""An upper bound on a Messages API request's input tokens, from its bytes. Standard library only: proxies import it.

Why bytes never undercount text: Claude's tokenizer is a byte-level BPE, so every token stands for at least one
byte of the UTF-8 text it encodes, and a text of N bytes is at most N tokens. The bound counts the UTF-8 bytes of
the JSON encoding of `system`, `messages`, `tools` and `tool_choice`; the quotes, keys and braces that JSON adds
outweigh the few tokens per turn the API adds for roles. It is not a tokenizer: real counts are usually 3-4 times
lower, which is the price of never letting a call through on an estimate that was too small.

What bytes cannot show gets an allowance of its own:
- tools: the system prompt the API adds when tools are given (a few hundred tokens) - `TOOLS_ALLOWANCE`;
- images: an image costs up to a few thousand tokens whatever its encoded size, and one given by URL or file id
  has no bytes in the request at all - `IMAGE_ALLOWANCE` per image block, on top of its bytes;
- documents given by URL or file id (their pages are not in the request) - `DOCUMENT_REFERENCE_ALLOWANCE` each.
Not bounded in advance: tokens that server tools (web search, web fetch, code execution) add while the call runs, and
PDF pages smaller than about 3,000 bytes each; usage corrects the reservation when it lands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

REQUEST_OVERHEAD = 16  # the turn markers around the whole prompt
TOOLS_ALLOWANCE = 1_000  # the tool-use system prompt the API adds when `tools` is given
IMAGE_ALLOWANCE = 5_000  # the most one image costs, at the highest resolution any model takes
DOCUMENT_REFERENCE_ALLOWANCE = 300_000  # a document by URL or file id: up to 100 pages at 3,000 tokens a page
COUNTED_KEYS = ("system", "messages", "tools", "tool_choice")


def _blocks(value: Any) -> Iterator[Mapping[str, Any]]:
    """Every content block (a mapping with a `type`) anywhere in a value, tool results' content included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if isinstance(item.get("type"), str):
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def input_token_bound(request: Mapping[str, Any]) -> int:
    """At least as many input tokens as `request` (a Messages API body) can be billed for, before any call."""
    total = REQUEST_OVERHEAD
    for key in COUNTED_KEYS:
        if key in request:
            text = json.dumps(request[key], ensure_ascii=False, separators=(",", ":"), default=str)
            total += len(text.encode("utf-8", "surrogatepass"))
    if request.get("tools"):
        total += TOOLS_ALLOWANCE
    for block in _blocks([request.get("system"), request.get("messages")]):
        kind = block["type"]
        if kind == "image":
            total += IMAGE_ALLOWANCE
        elif kind == "document":
            source = block.get("source")
            if not isinstance(source, Mapping) or source.get("type") not in ("base64", "text", "content"):
                total += DOCUMENT_REFERENCE_ALLOWANCE
    return total
