"""The input a call is admitted on, counted by Anthropic's `POST /v1/messages/count_tokens` (`proxy.count_tokens`).

The byte bound (monitor.http.estimate) never undercounts but is loose: usually 3-4 times the real count for English,
3 bytes a character of CJK text, every byte of a base64 image or PDF (an image costs a few thousand tokens). A
loose estimate refuses calls that fit `max_input_tokens`, `max_request_usd` or a tight budget, and holds more than
needed while a call runs. When the option is on, the proxy asks upstream for the count first (count_tokens is
free: one more round trip per call, through the same client, with the proxy's key and the caller's `anthropic-*`
headers) and admits on it. An error answer, a timeout (`proxy.count_tokens_timeout`) or an answer without a count
falls back to the byte bound: without Anthropic's word, no call is admitted on less than the bound. So does an
answer longer than `proxy.count_tokens_max_answer_bytes` (a count is a few dozen bytes; what is longer is not read
past the bound). Each outcome is counted: `claude_proxy_count_tokens_total{outcome="ok"|"fallback"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2

from monitor.http.estimate import input_token_bound
from monitor.metrics import ProxyMetrics

log = logging.getLogger(__name__)

COUNT_TOKENS = "/v1/messages/count_tokens"
# The fields of a Messages API body that count_tokens takes (it refuses the others, e.g. max_tokens or stream):
# everything that makes up the prompt.
COUNTED_FIELDS = (
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "cache_control",
    "output_config",
    "output_format",
    "mcp_servers",
    "context_management",
)
MOST_TOKENS = 100_000_000  # what the daemon takes as an estimate; a larger count is not believed
MAX_ANSWER_BYTES = 64 * 1024  # proxy.count_tokens_max_answer_bytes' default


class InputCounter:
    """Counts a call's input tokens upstream before it is admitted; the byte bound when upstream cannot say."""

    def __init__(
        self,
        upstream: httpx2.AsyncClient,
        timeout: float,
        metrics: ProxyMetrics,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.metrics = metrics
        self.max_answer_bytes = max_answer_bytes

    async def estimate(self, request: Mapping[str, Any], query: str, headers: Sequence[tuple[str, str]]) -> int:
        """The input tokens to admit `request` (a Messages API body) on: upstream's count, else the byte bound.
        `query` is the call's query string (the SDK's `?beta=true`), `headers` those that go upstream."""
        try:
            async with asyncio.timeout(self.timeout):
                counted = await self._count(request, query, headers)
        except (TimeoutError, httpx2.TimeoutException):  # the whole exchange, or one of its steps
            why = f"no answer within {self.timeout:g} s (proxy.count_tokens_timeout)"
        except Exception as exc:  # an unreachable upstream or anything else: the bound needs no one
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if isinstance(counted, int):
                self.metrics.count_tokens.labels("ok").inc()
                return counted
            why = counted
        bound = input_token_bound(request)
        self.metrics.count_tokens.labels("fallback").inc()
        log.warning("count_tokens: %s; admitting on the byte bound (%d input tokens) instead", why, bound)
        return bound

    async def _count(self, request: Mapping[str, Any], query: str, headers: Sequence[tuple[str, str]]) -> int | str:
        """Upstream's count, or why there is none."""
        body = json.dumps({key: request[key] for key in COUNTED_FIELDS if key in request}).encode()
        started = time.monotonic()
        outgoing = self.upstream.build_request(
            "POST",
            COUNT_TOKENS + (f"?{query}" if query else ""),
            content=body,
            headers=[*((k, v) for k, v in headers if k != "content-type"), ("content-type", "application/json")],
            timeout=httpx2.Timeout(self.timeout),
        )
        response = await self.upstream.send(outgoing, stream=True)
        try:
            self.metrics.upstream_latency.labels("count_tokens").observe(time.monotonic() - started)
            data = await read_at_most(response, self.max_answer_bytes)
        finally:
            await response.aclose()  # an answer cut short: its connection is closed, not reused
        if data is None:
            return (
                f"Anthropic's answer ({response.status_code}) is longer than {self.max_answer_bytes:,} bytes "
                "(proxy.count_tokens_max_answer_bytes); not read further"
            )
        text = data.decode("utf-8", "replace")
        if response.status_code != 200:
            return f"Anthropic answered {response.status_code} {text[:200]!r}"
        try:
            answer = json.loads(data)
        except ValueError:
            return "Anthropic's answer is not JSON"
        tokens = answer.get("input_tokens") if isinstance(answer, dict) else None
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= MOST_TOKENS:
            return f"Anthropic's answer has no input_tokens count: {text[:200]!r}"
        return tokens


async def read_at_most(response: httpx2.Response, limit: int, *, raw: bool = False) -> bytes | None:
    """An upstream answer's body, or None once it passes `limit` bytes (declared or sent): nothing more is read.
    `raw` keeps the body as sent (content-encoding and all), for passing it on."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw() if raw else response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
