"""A local stand-in for Anthropic's Models API (`GET /v1/models`), in its wire format: newest models first, pages of
`limit` (default 20) linked by `has_more`, `first_id`, `last_id` and the client's `after_id`, the key checked
(`Authorization: Bearer` or `x-api-key`), errors in Anthropic's error shape, and a `request-id` header.

Fed by a test with (id, display name, lifecycle) tuples; keeps every request it saw. Retired models are listed only
when asked for with `lifecycle[]=retired`, as the API does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_server import AnthropicHandler, LoopbackServer

MODELS_PATH = "/v1/models"


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


class FakeModels(LoopbackServer):
    """The server, on a free loopback port, in a background thread."""

    def __init__(self, api_key: str, models: list[tuple[str, str, str]] | None = None) -> None:
        self.api_key = api_key
        self.models = list(models or [])  # (id, display name, lifecycle), newest first
        self.page_size: int | None = None  # overrides the client's `limit`, to force pages
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        super().__init__(_handler(self))


def model_object(model_id: str, name: str, lifecycle: str) -> dict[str, Any]:
    """One ModelInfo as the API sends it."""
    return {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": "2026-06-09T00:00:00Z",
        "lifecycle": lifecycle,
        "deprecated_at": "2026-10-01T00:00:00Z" if lifecycle != "active" else None,
        "retires_at": None,
        "max_input_tokens": 1_000_000,
        "max_tokens": 128_000,
    }


def _handler(fake: FakeModels) -> type[BaseHTTPRequestHandler]:
    class Handler(AnthropicHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            headers = {k.lower(): v for k, v in self.headers.items()}
            with fake._lock:
                fake.requests.append(Seen(parts.path, query, headers))
                request_id = f"req_fake_models_{len(fake.requests):04d}"
            if parts.path != MODELS_PATH:
                self._error(404, "not_found_error", f"no route {parts.path}", request_id)
                return
            bearer = headers.get("authorization", "").removeprefix("Bearer ")
            if fake.api_key not in (bearer, headers.get("x-api-key")):
                self._error(401, "authentication_error", "invalid x-api-key", request_id)
                return
            wanted = set(query.get("lifecycle[]", query.get("lifecycle", []))) or {"active", "deprecated"}
            listed = [m for m in fake.models if m[2] in wanted]
            limit = fake.page_size or int(query.get("limit", ["20"])[0])
            start = 0
            if "after_id" in query:
                ids = [m[0] for m in listed]
                after = query["after_id"][0]
                if after not in ids:
                    self._error(400, "invalid_request_error", f"after_id {after!r} is not a model id", request_id)
                    return
                start = ids.index(after) + 1
            page = listed[start : start + limit]
            self._json(
                200,
                {
                    "data": [model_object(*m) for m in page],
                    "has_more": start + limit < len(listed),
                    "first_id": page[0][0] if page else None,
                    "last_id": page[-1][0] if page else None,
                },
                request_id,
            )

    return Handler
