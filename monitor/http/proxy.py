"""The reference Claude proxy as an ASGI app: holds the Anthropic key, asks the daemon before each call, forwards
through one httpx2 client, records usage.

Clients use the `anthropic` SDK with `base_url` set to the proxy and the proxy key issued to them
(`proxy.clients`, see monitor.http.clients): a call without a known key is answered 401 and nothing is forwarded.
The caller's key is never forwarded, logged or stored; the proxy sends its own (from `$proxy.api_key_env`, never
echoed, logged or stored either). The caller's identity is its client's fixed attributes plus the headers that
client may assert; only the API's own headers go upstream. A model the price table does not know is refused 400
(with the nearest known name) unless `proxy.allow_unpriced_models`.

- `POST /v1/messages`: checked with `monitor.http.client` (the model as the price table names it), forwarded, and its
  answer passed back unchanged — JSON whole, `stream: true` server-sent events byte for byte as they arrive, on
  the event loop (a stream costs a task and its buffers, not a thread). One usage event per upstream call is
  posted when the upstream response ends, before the client sees the end of the response, so the caller's next
  request is checked against it; the post is blocking HTTP, so it runs on a worker thread while the loop goes on.
  A call that failed upstream (4xx/5xx, passed back as Anthropic sent it) is recorded with its status and zero
  usage; one that could not reach Anthropic is answered `502 api_error` and recorded with status 502. A client
  that leaves mid-stream closes the upstream stream (ending the generation and its cost); what was seen is
  recorded.
- `POST /v1/messages/count_tokens`: free, so forwarded, neither checked nor recorded. With `proxy.count_tokens`
  the proxy asks it too, before admitting each `POST /v1/messages` (monitor.http.count).
- Anything else: `404 not_found_error`. Every answer of the proxy's own is in Anthropic's error shape, so the SDK
  raises the matching exception; framing errors (bad Content-Length or chunk size) are the server's plain 400.

Spool: when the daemon cannot take an event (down, timing out, refusing the token), the answer to the client is
not held up; the event is appended to `proxy-spool.jsonl` beside the throttle snapshot file, one usage event a
line. List that file in the daemon's `sources` (`{type: jsonl, path: <snapshot dir>/proxy-spool.jsonl}`) and it
is ingested when the daemon runs again; an event that reached the daemon too is counted once (same request_id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
from prometheus_client import CONTENT_TYPE_LATEST

from monitor.config import ConfigError, LoadedSettings
from monitor.http.admit import FAIL_MODE_HEADER, Denied, Gate
from monitor.http.client import MonitorClient, MonitorError, Verdict
from monitor.http.clients import ProxyClient, ProxyClients, Refused, forwarded
from monitor.http.count import InputCounter, read_at_most
from monitor.http.server import (
    BadLength,
    BindError,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    HttpServer,
    Receive,
    Scope,
    Send,
    ServerLimits,
    content_length,
    headers_of,
    off_loop,
    read_body,
    send_response,
    settle_heap,
)
from monitor.http.sse import SseUsage
from monitor.ingest.parse import redact
from monitor.metrics import ProxyMetrics
from monitor.pricing import PriceTable
from monitor.signals import StopSignals
from monitor.wire import iso_z

log = logging.getLogger(__name__)

T = TypeVar("T")

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
SPOOL_NAME = "proxy-spool.jsonl"
DRAIN_SECONDS = 30.0
# Upstream: a stream or a long answer may take many minutes between its first and last byte, and a quiet stretch
# (extended thinking) must not cut it; connecting is quick or Anthropic is unreachable, and the caller should
# hear 502 at once rather than after its own timeout.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 600.0
WRITE_TIMEOUT = 60.0
POOL_TIMEOUT = 10.0
KEEPALIVE_EXPIRY = 30.0
MAX_IDLE_UPSTREAM = 100
RECORD_WORKERS = 64  # concurrent posts to the daemon (each at most the client's timeout), grouped in its commits
CHECK_WORKERS = 4
SMALL_BODY = 64 * 1024  # an unread body up to this is in uvicorn's buffer: the connection can be kept
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer"}
    | {"trailers", "transfer-encoding", "upgrade"}
)
_NOT_RETURNED = _HOP_BY_HOP | {"content-length", "date", "server"}
_ERROR_STATUS = {  # Anthropic's error types, for an `error` event inside a 200 stream
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0}


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy needs, checked: where it listens, the upstream, the key, its clients, the spool, its bounds."""

    host: str
    port: int
    upstream: str
    api_key: str = field(repr=False)
    clients: ProxyClients
    spool: Path
    allow_unpriced_models: bool = False
    fail_mode: Literal["open", "closed"] = "open"
    count_tokens_timeout: float | None = None  # set: admit on upstream's count of the input (proxy.count_tokens)
    count_tokens_max_answer_bytes: int = 64 * 1024  # a longer count_tokens answer: the byte bound instead
    max_answer_bytes: int = 64 * 1024 * 1024  # a longer answer sent whole: not read on, 502
    limits: ServerLimits = field(default_factory=lambda: ServerLimits(max_body_bytes=64 * 1024 * 1024))


def proxy_settings(loaded: LoadedSettings, environ: Mapping[str, str]) -> ProxySettings:
    """The `proxy:` section made usable; ConfigError naming the file and key when it is not."""
    where = str(loaded.path or "built-in defaults")
    config = loaded.settings.proxy
    key = environ.get(config.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"{where}: proxy.api_key_env: the environment variable {config.api_key_env} is not set; the proxy "
            f"calls Anthropic with that key, so export it (or name another variable in proxy.api_key_env)"
        )
    clients = ProxyClients.from_config(config.clients, environ, where)
    if not clients.clients:
        log.warning("%s: proxy.clients lists no client: every call will be refused 401", where)
    limits = ServerLimits(
        backlog=config.backlog,
        header_timeout=config.header_timeout.seconds,
        keepalive_timeout=config.keepalive_timeout.seconds,
        max_connections=config.max_connections,
        max_body_bytes=config.max_body_bytes,
    )
    return ProxySettings(
        host=config.listen.host,
        port=config.listen.port,
        upstream=config.upstream.rstrip("/"),
        api_key=key,
        clients=clients,
        spool=Path(loaded.settings.throttle.snapshot_file).absolute().parent / SPOOL_NAME,
        allow_unpriced_models=config.allow_unpriced_models,
        fail_mode=config.fail_mode,
        count_tokens_timeout=config.count_tokens_timeout.seconds if config.count_tokens else None,
        count_tokens_max_answer_bytes=config.count_tokens_max_answer_bytes,
        max_answer_bytes=config.max_answer_bytes,
        limits=limits,
    )


def upstream_client(settings: ProxySettings) -> httpx2.AsyncClient:
    """One client for every upstream call, sized for long streams: a connection per client connection at most."""
    return httpx2.AsyncClient(
        base_url=settings.upstream,
        limits=httpx2.Limits(
            max_connections=settings.limits.max_connections,
            max_keepalive_connections=MAX_IDLE_UPSTREAM,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
        timeout=httpx2.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT, write=WRITE_TIMEOUT, pool=POOL_TIMEOUT),
        follow_redirects=False,
        trust_env=False,  # HTTP(S)_PROXY of the environment is not a place to send the Anthropic key through
    )


class Recorder:
    """Posts usage events to the daemon; what it cannot take goes to the spool file, never back to the caller."""

    def __init__(self, monitor: MonitorClient, spool: Path) -> None:
        self.monitor = monitor
        self.spool = spool
        self._lock = threading.Lock()

    def record(self, event: Mapping[str, Any]) -> bool:
        """Post one event (blocking); True when the daemon stored it (or had it), else log and spool it."""
        try:
            answer = self.monitor.record(event)
            return bool(answer.get("accepted") or answer.get("duplicates"))
        except MonitorError as exc:
            log.warning("could not record %s with the daemon (%s); spooled to %s", event["request_id"], exc, self.spool)
        except Exception:
            log.exception("could not record %s with the daemon; spooled to %s", event["request_id"], self.spool)
        line = json.dumps(event, allow_nan=False) + "\n"
        try:
            with self._lock, self.spool.open("a", encoding="utf-8") as spool:
                spool.write(line)
                spool.flush()
                os.fsync(spool.fileno())
        except OSError as exc:
            log.error("could not spool to %s (%s); the event is: %s", self.spool, exc, line.strip())
        return False


@dataclass
class _Call:
    """One POST /v1/messages on its way upstream: who asked, for which model, since when."""

    model: str
    client: str
    attributes: dict[str, str]
    request: dict[str, Any] = field(default_factory=dict, repr=False)  # the Messages API body
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.monotonic)
    lease: str | None = None  # the admission lease it runs under, named in its usage event
    headers: tuple[tuple[str, str], ...] = ()  # the proxy's own, added to the answer passed back
    settled: bool = False  # its usage event (naming the lease) is stored: no release needed
    request_id: str | None = None  # of the usage event recorded, and its usage
    usage: dict[str, Any] | None = None

    @property
    def who(self) -> str:
        return " ".join([f"client={self.client}", *(f"{k}={v}" for k, v in sorted(self.attributes.items()))])

    def event(self, request_id: str, usage: Mapping[str, Any], status: int, model: str | None = None) -> dict[str, Any]:
        """Its usage event, stamped with the time the call was sent."""
        when = iso_z(datetime.fromtimestamp(self.started, UTC), "milliseconds")
        return {
            "request_id": request_id,
            "timestamp": when,
            "model": model or self.model,
            "usage": dict(usage),
            "attributes": dict(self.attributes),
            "batch": False,
            "status": status,
            "latency_ms": round((time.monotonic() - self.clock) * 1000, 1),
            **({"lease": self.lease} if self.lease is not None else {}),
        }

    def access_log(self, status: int, request_id: str) -> None:
        """The access-log line, written before the answer ends (so a reader that saw the end finds it)."""
        elapsed = (time.monotonic() - self.clock) * 1000
        log.info("POST %s %d %s request_id=%s %.0f ms", MESSAGES, status, self.who, request_id, elapsed)


class ProxyApp:
    """The ASGI app: authenticate, route, check, forward, relay, record."""

    def __init__(
        self,
        settings: ProxySettings,
        monitor: MonitorClient,
        prices: PriceTable,
        upstream: httpx2.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.monitor = monitor
        self.prices = prices
        self.upstream = upstream or upstream_client(settings)
        self.recorder = Recorder(monitor, settings.spool)
        # Blocking work off the event loop: posting usage (HTTP to the daemon, or the spool's fsync) and checks
        # that read the snapshot file (the daemon is away). Two pools, so a backlog of posts never delays the
        # check of a new call. The daemon commits concurrent posts together: more at once means fewer commits.
        self._records = ThreadPoolExecutor(RECORD_WORKERS, thread_name_prefix="proxy-record")
        self._checks = ThreadPoolExecutor(CHECK_WORKERS, thread_name_prefix="proxy-check")
        self.metrics = ProxyMetrics()
        self.gate = Gate(monitor, settings.fail_mode, self.metrics)
        timeout = settings.count_tokens_timeout
        self.counter = (
            None
            if timeout is None
            else InputCounter(self.upstream, timeout, self.metrics, settings.count_tokens_max_answer_bytes)
        )

    async def close(self) -> None:
        """Close upstream connections and the worker threads (after the server drained)."""
        await self.upstream.aclose()
        self._records.shutdown(wait=True)
        self._checks.shutdown(wait=True)
        self.gate.close()

    # --- one request -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except ClientDisconnected:
            return

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, route = scope["method"], scope["path"].rstrip("/") or "/"
        headers = headers_of(scope)
        try:
            length = content_length(scope)
        except BadLength as exc:
            await _error(send, 400, "invalid_request_error", str(exc), close=True)
            return
        # An unread body up to SMALL_BODY is discarded by the server after the answer; a larger or chunked one is
        # not worth receiving: the connection closes.
        unread_close = (length is None and "transfer-encoding" in headers) or (length or 0) > SMALL_BODY
        if method in ("GET", "HEAD") and route == "/metrics":  # for Prometheus: counts only, no key needed
            await send_response(send, 200, self.metrics.render(), [("content-type", CONTENT_TYPE_LATEST)])
            return
        try:
            client = self.settings.clients.authenticate(headers)
        except Refused as refused:
            log.info("%s %s %d: %s", method, route, refused.status, refused.message)
            await _error(send, refused.status, refused.kind, refused.message, close=unread_close)
            return
        if method != "POST" or route not in (MESSAGES, COUNT_TOKENS):
            message = f"{method} {route} is not served here: this proxy serves POST {MESSAGES} and {COUNT_TOKENS}"
            await _error(send, 404, "not_found_error", message, close=unread_close)
            return
        limit = self.settings.limits.max_body_bytes
        if length is not None and length > limit:  # answered from the header alone: the body is not read
            await _error(send, 413, "request_too_large", _too_large(length, limit), close=True)
            return
        try:
            body = await read_body(receive, limit, self.settings.limits.header_timeout)
        except BodyTooLarge as exc:
            log.info("%s %s 413 client=%s: %s", method, route, client.name, exc)
            await _error(send, 413, "request_too_large", _too_large(exc.received, limit), close=True)
            return
        except BodyTimeout as exc:
            await _error(send, 408, "invalid_request_error", f"{exc}; send the whole body promptly", close=True)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        path = target.decode("latin-1")
        if route == COUNT_TOKENS:
            await self._count_tokens(send, path, body, headers)
        else:
            await self._messages(receive, send, path, body, client, headers)

    def _forward_headers(self, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        named = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        out = [
            (name, value)
            for name, value in headers.items()
            if forwarded(name) and name not in named and name not in self.settings.clients.identity_headers
        ]
        # identity: the proxy reads usage from the very bytes it passes on
        out += [("accept-encoding", "identity"), ("x-api-key", self.settings.api_key)]
        return out

    async def _open(self, path: str, body: bytes, headers: Mapping[str, str]) -> httpx2.Response:
        request = self.upstream.build_request("POST", path, content=body, headers=self._forward_headers(headers))
        started = time.monotonic()
        response = await self.upstream.send(request, stream=True)
        route = "count_tokens" if path.partition("?")[0].rstrip("/") == COUNT_TOKENS else "messages"
        self.metrics.upstream_latency.labels(route).observe(time.monotonic() - started)
        return response

    async def _count_tokens(self, send: Send, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            response = await self._open(path, body, headers)
            try:
                data = await self._whole(response)
            finally:
                await response.aclose()
        except httpx2.HTTPError as exc:
            log.warning("POST %s: Anthropic could not be reached: %s", COUNT_TOKENS, _describe(exc))
            await _unreachable_answer(send, exc)
            return
        log.info("POST %s %d", COUNT_TOKENS, response.status_code)
        await send_response(send, response.status_code, data, _returned(response))

    async def _messages(
        self,
        receive: Receive,
        send: Send,
        path: str,
        body: bytes,
        client: ProxyClient,
        headers: Mapping[str, str],
    ) -> None:
        try:
            call = self._call(body, client, client.identity(headers))
        except Refused as refused:
            log.info("POST %s %d client=%s: %s", MESSAGES, refused.status, client.name, refused.message)
            await _error(send, refused.status, refused.kind, refused.message)
            return
        model = self.prices.resolve(call.model) or call.model
        dimensions = {key: value for key, value in call.attributes.items() if key != "model"}
        # The daemon's state in memory decides on the loop; only a stale one (the snapshot file) goes to a thread.
        verdict = self.monitor.check_in_memory(model=model, **dimensions)
        if verdict is None:
            verdict = await off_loop(self._checks, lambda: self.monitor.check(model=model, **dimensions))
            if verdict.stale and verdict.source == "none":  # neither the daemon nor the snapshot: fail_mode decided
                decision = "allowed" if verdict.allowed else "denied"
                self.metrics.fail_mode.labels("check", decision).inc()
        if not verdict.allowed:
            await self._throttled(send, verdict, call.who)
            return
        counted = None
        if self.counter is not None:
            query = path.partition("?")[2]
            upstream = [(k, v) for k, v in self._forward_headers(headers) if k != "idempotency-key"]  # not the call
            counted = await self.counter.estimate(call.request, query, upstream)
        admitted = await self.gate.admit(call.request, call.model, dimensions, call.who, counted)
        if isinstance(admitted, Denied):
            await _error(send, admitted.status, admitted.kind, admitted.message, admitted.headers)
            return
        call.lease = admitted.lease.id if admitted.lease is not None else None
        call.headers = admitted.headers
        renewal = self.gate.keep(admitted)
        try:
            await self._forward(receive, send, path, body, call, headers)
        finally:
            await self.gate.end(admitted, renewal, call.settled, call.request_id, call.usage)

    async def _forward(
        self, receive: Receive, send: Send, path: str, body: bytes, call: _Call, headers: Mapping[str, str]
    ) -> None:
        """Send an admitted call upstream and its answer back; record it."""
        try:
            response = await self._open(path, body, headers)
        except httpx2.HTTPError as exc:
            await self._unreachable(send, exc, call)
            return
        request_id = response.headers.get("request-id") or f"proxy-{uuid.uuid4().hex}"
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            await self._stream(receive, send, response, call, request_id)
            return
        try:
            data = await self._whole(response)
        except httpx2.HTTPError as exc:
            await self._unreachable(send, exc, call)
            return
        finally:
            await response.aclose()
        ok = 200 <= response.status_code < 300
        usage, answered = _json_usage(data) if ok else (None, None)
        if usage is None and ok:
            log.warning("%s: Anthropic answered %d without usage; recorded as zero", request_id, response.status_code)
        event = call.event(request_id, usage or _ZERO_USAGE, response.status_code, answered)
        await self._record(call, event)
        call.access_log(response.status_code, request_id)
        await send_response(send, response.status_code, data, [*_returned(response), *call.headers])

    async def _whole(self, response: httpx2.Response) -> bytes:
        """An answer sent whole, as sent; AnswerTooLarge past proxy.max_answer_bytes (nothing more is read)."""
        data = await read_at_most(response, self.settings.max_answer_bytes, raw=True)
        if data is None:
            raise AnswerTooLarge(
                f"Anthropic's answer ({response.status_code}) is longer than {self.settings.max_answer_bytes:,} "
                "bytes (proxy.max_answer_bytes); not read further"
            )
        return data

    async def _stream(
        self, receive: Receive, send: Send, response: httpx2.Response, call: _Call, request_id: str
    ) -> None:
        """Pass the events on as they arrive, following the usage; record before the end of the answer."""
        tracker = SseUsage()
        own = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in call.headers]
        await send({"type": "http.response.start", "status": response.status_code, "headers": _raw(response) + own})

        async def pump() -> None:
            async for chunk in response.aiter_raw():
                tracker.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        pumping = asyncio.create_task(pump())
        # The server does not fail a send to a client that left; a pending receive() tells instead.
        leaving = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait((pumping, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_ok = not leaving.done()
            leaving.cancel()
            if not pumping.done():
                pumping.cancel()  # closing the upstream stream stops the generation, and its cost
            await asyncio.gather(pumping, return_exceptions=True)
            await response.aclose()
        upstream_ok = True
        if client_ok and (error := pumping.exception()) is not None:
            log.warning("%s: the stream from Anthropic broke: %s", request_id, _describe(error))
            upstream_ok = False
        if not client_ok:
            log.info("%s: the client went away mid-stream; closed the stream from Anthropic", request_id)
        status = 200 if upstream_ok else 502
        if tracker.error_type is not None:
            status = _ERROR_STATUS.get(tracker.error_type, 500)
        event = call.event(request_id, tracker.usage, status, tracker.model)
        await self._record(call, event)
        call.access_log(status, request_id)
        if upstream_ok and client_ok:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # else: no final chunk; the server closes the connection and the client sees the stream cut short

    async def _record(self, call: _Call, event: dict[str, Any]) -> None:
        """Post the call's usage event off the loop; an event the daemon stored settles the call's lease."""
        call.request_id, call.usage = event["request_id"], event["usage"]
        call.settled = await off_loop(self._records, lambda: self.recorder.record(event))

    def _call(self, body: bytes, client: ProxyClient, attributes: dict[str, str]) -> _Call:
        """The call a /v1/messages body asks for; Refused 400 without a model, or one the price table lacks."""
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        model = request.get("model") if isinstance(request, dict) else None
        if not isinstance(model, str) or not model:
            raise Refused(400, "invalid_request_error", "the body must be a JSON object with a `model`")
        if self.prices.resolve(model) is None and not self.settings.allow_unpriced_models:
            nearest = self.prices.nearest(model)
            hint = f"; did you mean {nearest!r}?" if nearest else ""
            raise Refused(
                400,
                "invalid_request_error",
                f"model {redact(model)[:200]!r} is not in this proxy's price table, so its cost could not be held "
                f"to a budget{hint} (the operator can add it under pricing.models, or set "
                f"proxy.allow_unpriced_models: true)",
            )
        return _Call(model, client.name, attributes, request)

    async def _throttled(self, send: Send, verdict: Verdict, who: str) -> None:
        log.info("POST %s 429 %s: %s", MESSAGES, who, verdict.reason)
        headers = {"retry-after": str(verdict.retry_after or 1)}
        if verdict.budget is not None:
            # the budget's sentence; when the flag ends is in Retry-After
            message = verdict.reason.rpartition(" (until ")[0] if verdict.until is not None else verdict.reason
            headers["x-should-retry"] = "false"  # a spent budget does not come back in the SDK's retry backoff
        else:  # fail_mode closed without state: the details (daemon address) are for the log, not the caller
            message = "claude-monitor cannot confirm the budget right now (fail_mode closed); retry later"
            headers[FAIL_MODE_HEADER] = "closed"
        await _error(send, 429, "rate_limit_error", message, headers)

    async def _unreachable(self, send: Send, exc: BaseException, call: _Call) -> None:
        request_id = f"proxy-{uuid.uuid4().hex}"
        event = call.event(request_id, _ZERO_USAGE, 502)
        await self._record(call, event)
        log.warning("Anthropic unreachable: %s", _describe(exc))
        call.access_log(502, request_id)
        await _unreachable_answer(send, exc)


class AnswerTooLarge(httpx2.HTTPError):
    """Upstream's whole answer passed proxy.max_answer_bytes: answered 502 like an upstream that failed."""


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _returned(response: httpx2.Response) -> list[tuple[str, str]]:
    return [(name, value) for name, value in response.headers.multi_items() if name.lower() not in _NOT_RETURNED]


def _raw(response: httpx2.Response) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in _returned(response)]


def _too_large(size: int, limit: int) -> str:
    return f"the request body is over {limit:,} bytes ({size:,} sent so far; proxy.max_body_bytes)"


async def _error(
    send: Send,
    status: int,
    kind: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    close: bool = False,
) -> None:
    """An answer in Anthropic's error shape."""
    data = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    out = [*(headers or {}).items(), ("content-type", "application/json")]
    if close:
        out.append(("connection", "close"))
    await send_response(send, status, data, out)


async def _unreachable_answer(send: Send, exc: BaseException) -> None:
    if isinstance(exc, httpx2.PoolTimeout):
        message = "the proxy has no free upstream connection (proxy.max_connections are all busy); retry shortly"
        await _error(send, 529, "overloaded_error", message)
        return
    await _error(send, 502, "api_error", f"the proxy could not reach Anthropic: {_describe(exc)}")


def _json_usage(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The usage object and model of a Messages API JSON answer."""
    try:
        document = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(document, dict):
        return None, None
    usage, model = document.get("usage"), document.get("model")
    return (usage if isinstance(usage, dict) else None), (model if isinstance(model, str) else None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Proxy:
    """The app on the shared HTTP server: start, address, stop with drain."""

    def __init__(self, settings: ProxySettings, monitor: MonitorClient, prices: PriceTable) -> None:
        self.settings = settings
        self.monitor = monitor
        self.app = ProxyApp(settings, monitor, prices)
        try:
            self.server = HttpServer(
                self.app, settings.host, settings.port, settings.limits, "proxy", on_stop=self.app.close
            )
        except BindError as exc:
            raise ConfigError(f"proxy.listen: {exc}") from None

    @property
    def address(self) -> tuple[str, int]:
        """Where the proxy listens (the port is real even when configured as 0)."""
        return self.server.address

    def start(self) -> None:
        """Serve on the server's event-loop thread."""
        self.server.start()

    def stop(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop accepting, let requests in flight (streams too) finish for up to `timeout` s; True if all did."""
        drained = self.server.stop(drain_timeout=timeout)
        self.monitor.close()
        return drained


def run_proxy(loaded: LoadedSettings, prices: PriceTable, environ: Mapping[str, str] = os.environ) -> int:
    """`claude-monitor proxy`: serve until SIGTERM or SIGINT, let requests in flight finish, exit 0."""
    settings = proxy_settings(loaded, environ)
    config = loaded.settings.proxy
    where = loaded.path or "built-in defaults"
    token = environ.get(config.ingest_token_env) or None
    if token is None:
        log.warning(
            "$%s is not set: the daemon will refuse usage events, which go to %s",
            config.ingest_token_env,
            settings.spool,
        )
    read_token = environ.get(config.read_token_env, "").strip() or None if config.read_token_env else None
    if config.read_token_env and read_token is None:
        log.warning(
            "proxy.read_token_env is %s but $%s is empty: a daemon that requires its read token will not share its "
            "throttle state, and checks fall back to the snapshot file",
            config.read_token_env,
            config.read_token_env,
        )
    monitor = MonitorClient(
        config.monitor_url,
        token=token,
        read_token=read_token,
        snapshot_file=loaded.settings.throttle.snapshot_file,
        fail_mode=config.fail_mode,
    )
    try:
        proxy = Proxy(settings, monitor, prices)
    except ConfigError as exc:
        monitor.close()
        raise ConfigError(f"{where}: {exc}") from None
    signals = StopSignals()
    proxy.start()
    settle_heap()
    host, port = proxy.address
    print(
        f"claude-monitor proxy listening on http://{host}:{port}, forwarding to {settings.upstream} "
        f"(daemon {config.monitor_url}, fail_mode {config.fail_mode}; config: {where})",
        file=sys.stderr,
        flush=True,
    )
    log.info("%s received: finishing requests in flight", signals.wait())
    if not proxy.stop():
        log.warning("requests still in flight after %g s were cut off", DRAIN_SECONDS)
    log.info("proxy stopped")
    return 0
