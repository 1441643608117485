"""The reference Claude proxy (SPEC §10): holds the Anthropic key, asks the daemon before each call, forwards, records.

Clients use the `anthropic` SDK with `base_url` set to the proxy and any api_key: the client's `Authorization` and
`x-api-key` headers are dropped, and the proxy sends its own key (from `$proxy.api_key_env`, never echoed, logged or
stored). The identity headers of `proxy.identity.headers` name the caller's dimensions; they are not forwarded.

- `POST /v1/messages`: checked with `monitor.client` (the model as the price table names it), forwarded, and its
  answer passed back unchanged — JSON whole, `stream: true` server-sent events byte for byte as they arrive. One
  usage event (SPEC §2) per upstream call is posted when the upstream response ends, before the client sees the
  end of the response, so the caller's next request is checked against it. A call that failed upstream (4xx/5xx,
  passed back as Anthropic sent it) is recorded with its status and zero usage; one that could not reach Anthropic
  is answered `502 api_error` and recorded with status 502.
- `POST /v1/messages/count_tokens`: free, so forwarded, neither checked nor recorded.
- Anything else: `404 not_found_error`.

Spool: when the daemon cannot take an event (down, timing out, refusing the token), the answer to the client is
not held up; the event is appended to `proxy-spool.jsonl` beside the throttle snapshot file, one SPEC §2 line each.
List that file in the daemon's `sources` (`{type: jsonl, path: <snapshot dir>/proxy-spool.jsonl}`) and it is
ingested when the daemon runs again; an event that reached the daemon too is counted once (same request_id).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message as Headers
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from monitor import __version__
from monitor.client import MonitorClient, MonitorError, Verdict
from monitor.config import ConfigError, LoadedSettings
from monitor.pricing import PriceTable
from monitor.signals import StopSignals
from monitor.upstream import SseUsage, Upstream

log = logging.getLogger(__name__)

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
SPOOL_NAME = "proxy-spool.jsonl"
MAX_BODY_BYTES = 64 * 1024 * 1024  # above Anthropic's own request limit, so it answers over-size requests itself
DRAIN_SECONDS = 30.0
MAX_ATTRIBUTE_CHARS = 128  # what the daemon keeps of a value (SPEC §2): check with the same value
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer"}
    | {"trailers", "transfer-encoding", "upgrade"}
)
# Accept-Encoding is replaced by identity: the proxy reads usage from the body it passes on unchanged.
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "expect", "authorization", "x-api-key", "accept-encoding"}
_NOT_RETURNED = _HOP_BY_HOP | {"content-length"}
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
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy needs, checked: where it listens, the upstream, the key, identity headers, the spool file."""

    host: str
    port: int
    upstream: str
    api_key: str = field(repr=False)
    identity: Mapping[str, str]  # lower-cased header name -> dimension
    spool: Path


def proxy_settings(loaded: LoadedSettings, environ: Mapping[str, str]) -> ProxySettings:
    """The `proxy:` section made usable; ConfigError naming the file and key when it is not."""
    where = loaded.path or "built-in defaults"
    config = loaded.settings.proxy
    host, sep, port = config.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: proxy.listen {config.listen!r} is not HOST:PORT (e.g. 127.0.0.1:8088)")
    parts = urlsplit(config.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(
            f"{where}: proxy.upstream {config.upstream!r} is not an http(s) URL (https://api.anthropic.com)"
        )
    key = environ.get(config.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"{where}: proxy.api_key_env: the environment variable {config.api_key_env} is not set; the proxy "
            f"calls Anthropic with that key, so export it (or name another variable in proxy.api_key_env)"
        )
    identity = {header.lower(): dimension for header, dimension in config.identity.headers.items()}
    spool = Path(loaded.settings.throttle.snapshot_file).absolute().parent / SPOOL_NAME
    return ProxySettings(host.strip("[]"), int(port), config.upstream.rstrip("/"), key, identity, spool)


class Recorder:
    """Posts usage events to the daemon; what it cannot take goes to the spool file, never back to the caller."""

    def __init__(self, monitor: MonitorClient, spool: Path) -> None:
        self.monitor = monitor
        self.spool = spool
        self._lock = threading.Lock()

    def record(self, event: Mapping[str, Any]) -> None:
        """Post one event; on any failure log it and append it to the spool."""
        try:
            self.monitor.record(event)
            return
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


@dataclass
class _Call:
    """One POST /v1/messages on its way upstream: who asked, for which model, since when."""

    model: str
    attributes: dict[str, str]
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.monotonic)

    @property
    def who(self) -> str:
        return " ".join(f"{key}={value}" for key, value in sorted(self.attributes.items())) or "anonymous"

    def event(self, request_id: str, usage: Mapping[str, Any], status: int, model: str | None = None) -> dict[str, Any]:
        """Its SPEC §2 usage event, stamped with the time the call was sent."""
        when = datetime.fromtimestamp(self.started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "request_id": request_id,
            "timestamp": when,
            "model": model or self.model,
            "usage": dict(usage),
            "attributes": dict(self.attributes),
            "batch": False,
            "status": status,
            "latency_ms": round(self.elapsed_ms, 1),
        }

    @property
    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.clock) * 1000

    def access_log(self, status: int, request_id: str) -> None:
        """The access-log line, written before the answer ends (so a reader that saw the end finds it)."""
        log.info("POST %s %d %s request_id=%s %.0f ms", MESSAGES, status, self.who, request_id, self.elapsed_ms)


class Proxy:
    """The HTTP server and what each request does."""

    def __init__(
        self, settings: ProxySettings, monitor: MonitorClient, prices: PriceTable, upstream: Upstream | None = None
    ) -> None:
        self.settings = settings
        self.monitor = monitor
        self.prices = prices
        self.upstream = upstream or Upstream(settings.upstream, settings.api_key)
        self.recorder = Recorder(monitor, settings.spool)
        self.draining = False
        self._inflight = 0
        self._idle = threading.Condition()
        try:
            self.server = ProxyServer((settings.host, settings.port), make_handler(self))
        except OSError as exc:
            raise ConfigError(
                f"proxy.listen {settings.host}:{settings.port}: cannot listen there: {exc.strerror}"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where the proxy listens (the port is real even when configured as 0)."""
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="claude-monitor-proxy", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop accepting, let requests in flight (streams too) finish for up to `timeout` s; True if all did."""
        self.draining = True
        self.server.shutdown()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            drained = self._inflight == 0
        self.server.server_close()
        self.upstream.close()
        self.monitor.close()
        return drained

    # --- one request -----------------------------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Route one request."""
        with self._idle:
            self._inflight += 1
        try:
            self._handle(handler)
        finally:
            if self.draining:
                handler.close_connection = True
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        if body is None:
            return
        route = h.path.partition("?")[0].rstrip("/")
        if h.command == "POST" and route == MESSAGES:
            self._messages(h, body)
        elif h.command == "POST" and route == COUNT_TOKENS:
            self._count_tokens(h, body)
        else:
            _error(
                h,
                404,
                "not_found_error",
                f"{h.command} {route or '/'} is not served here: this proxy serves POST {MESSAGES} and {COUNT_TOKENS}",
            )

    def _identity(self, headers: Headers) -> dict[str, str]:
        found = {}
        for header, dimension in self.settings.identity.items():
            value = (headers.get(header) or "").strip()
            if value:
                found[dimension] = value[:MAX_ATTRIBUTE_CHARS]
        return found

    def _forward_headers(self, headers: Headers) -> list[tuple[str, str]]:
        named = {token.strip().lower() for value in headers.get_all("Connection", []) for token in value.split(",")}
        return [
            (name, value)
            for name, value in headers.items()
            if (low := name.lower()) not in _NOT_FORWARDED and low not in named and low not in self.settings.identity
        ]

    def _count_tokens(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        connection: http.client.HTTPConnection | None = None
        try:
            connection, response = self.upstream.send(h.path, body, self._forward_headers(h.headers))
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            if connection is not None:
                connection.close()
            log.warning("POST %s: Anthropic could not be reached: %s", COUNT_TOKENS, _describe(exc))
            _error(h, 502, "api_error", f"the proxy could not reach Anthropic: {_describe(exc)}")
            return
        self.upstream.release(connection, response)
        log.info("POST %s %d", COUNT_TOKENS, response.status)
        _relay(h, response, data)

    def _messages(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        attributes = self._identity(h.headers)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        model = request.get("model") if isinstance(request, dict) else None
        call = _Call(model if isinstance(model, str) else "", attributes)
        if not call.model:
            log.info("POST %s 400 %s: no model in the body", MESSAGES, call.who)
            _error(h, 400, "invalid_request_error", "the body must be a JSON object with a `model`")
            return
        verdict = self.monitor.check(
            model=self.prices.resolve(call.model) or call.model,
            **{key: value for key, value in attributes.items() if key != "model"},
        )
        if not verdict.allowed:
            self._throttled(h, verdict, call.who)
            return
        try:
            connection, response = self.upstream.send(h.path, body, self._forward_headers(h.headers))
        except (OSError, http.client.HTTPException) as exc:
            self._unreachable(h, exc, call)
            return
        request_id = response.getheader("request-id") or f"proxy-{uuid.uuid4().hex}"
        if response.status == 200 and (response.getheader("content-type") or "").startswith("text/event-stream"):
            self._stream(h, connection, response, call, request_id)
            return
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            self._unreachable(h, exc, call)
            return
        self.upstream.release(connection, response)
        usage, answered = _json_usage(data) if 200 <= response.status < 300 else (None, None)
        if usage is None and 200 <= response.status < 300:
            log.warning("%s: Anthropic answered %d without usage; recorded as zero", request_id, response.status)
        self.recorder.record(call.event(request_id, usage or _ZERO_USAGE, response.status, answered))
        call.access_log(response.status, request_id)
        _relay(h, response, data)

    def _stream(
        self,
        h: BaseHTTPRequestHandler,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        call: _Call,
        request_id: str,
    ) -> None:
        """Pass the events on as they arrive (chunked), following the usage; record before the final chunk."""
        h.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _NOT_RETURNED:
                h.send_header(name, value)
        h.send_header("Transfer-Encoding", "chunked")
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        tracker = SseUsage()
        client_ok = upstream_ok = True
        while True:
            try:
                chunk = response.read1(65536)
            except (OSError, http.client.HTTPException) as exc:
                log.warning("%s: the stream from Anthropic broke: %s", request_id, _describe(exc))
                upstream_ok = False
                break
            if not chunk:
                break
            tracker.feed(chunk)
            try:
                h.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            except OSError:
                # Closing the upstream stream stops the generation, and its cost; usage so far is recorded.
                log.info("%s: the client went away mid-stream; closing the stream from Anthropic", request_id)
                client_ok = False
                break
        if upstream_ok and client_ok:
            self.upstream.release(connection, response)
        else:
            connection.close()
        status = 200 if upstream_ok else 502
        if tracker.error_type is not None:
            status = _ERROR_STATUS.get(tracker.error_type, 500)
        self.recorder.record(call.event(request_id, tracker.usage, status, tracker.model))
        call.access_log(status, request_id)
        if upstream_ok and client_ok:
            try:
                h.wfile.write(b"0\r\n\r\n")
            except OSError:
                h.close_connection = True
        else:
            h.close_connection = True  # no final chunk: the client sees the stream cut short

    def _throttled(self, h: BaseHTTPRequestHandler, verdict: Verdict, who: str) -> None:
        log.info("POST %s 429 %s: %s", MESSAGES, who, verdict.reason)
        headers = {"Retry-After": str(verdict.retry_after or 1)}
        if verdict.budget is not None:
            # SPEC §10's sentence; when the flag ends is in Retry-After
            message = verdict.reason.rpartition(" (until ")[0] if verdict.until is not None else verdict.reason
            headers["x-should-retry"] = "false"  # a spent budget does not come back in the SDK's retry backoff
        else:  # fail_mode closed without state: the details (daemon address) are for the log, not the caller
            message = "claude-monitor cannot confirm the budget right now (fail_mode closed); retry later"
        _error(h, 429, "rate_limit_error", message, headers)

    def _unreachable(self, h: BaseHTTPRequestHandler, exc: BaseException, call: _Call) -> None:
        request_id = f"proxy-{uuid.uuid4().hex}"
        self.recorder.record(call.event(request_id, _ZERO_USAGE, 502))
        log.warning("Anthropic unreachable: %s", _describe(exc))
        call.access_log(502, request_id)
        _error(h, 502, "api_error", f"the proxy could not reach Anthropic: {_describe(exc)}")


class ProxyServer(ThreadingHTTPServer):
    """One thread per connection; they do not hold up exit (stop() waits for requests in flight)."""

    daemon_threads = True
    allow_reuse_address = True


def make_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `proxy`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"claude-monitor-proxy/{__version__}"
        disable_nagle_algorithm = True  # streamed events must not wait for a delayed ACK

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def do_POST(self) -> None:
            proxy.handle(self)

        do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_POST

    return Handler


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    """The request body (Content-Length or chunked); None after answering a body that cannot be read."""
    try:
        body = _read_chunked(h) if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower() else None
        if body is None:
            values = {value.strip() for value in h.headers.get_all("Content-Length") or ["0"]}
            text = values.pop()
            if values or not (text.isascii() and text.isdigit()):  # no sign, no "0x", no "1_0", one value
                raise ValueError(text)
            length = int(text)
            if length > MAX_BODY_BYTES:
                raise OverflowError(length)  # answered from the header alone: the body is not read
            body = h.rfile.read(length)
            if len(body) != length:
                raise ValueError(len(body))  # the client stopped part-way: not a request to forward
        return body
    except ValueError:
        h.close_connection = True
        _error(h, 400, "invalid_request_error", "the request body's length or chunked framing is malformed")
    except OverflowError:
        h.close_connection = True
        _error(h, 413, "request_too_large", f"the request body is over {MAX_BODY_BYTES:,} bytes")
    return None


def _read_chunked(h: BaseHTTPRequestHandler) -> bytes:
    """A chunked request body; ValueError on bad framing, OverflowError over MAX_BODY_BYTES."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = h.rfile.readline(1024)
        size_text = line.split(b";")[0].strip()
        if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):  # int() would take "-1", "0x5"
            raise ValueError(line[:40])
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > MAX_BODY_BYTES:
            raise OverflowError(total)
        parts.append(h.rfile.read(size))
        if len(parts[-1]) != size or h.rfile.readline(1024) not in (b"\r\n", b"\n"):
            raise ValueError(size)  # cut short, or the chunk is longer than its size line says
    while (line := h.rfile.readline(1024)).strip():
        pass  # trailers
    if not line.endswith(b"\n"):
        raise ValueError("no end of the chunked body")
    return b"".join(parts)


def _relay(h: BaseHTTPRequestHandler, response: http.client.HTTPResponse, data: bytes) -> None:
    """Answer with the upstream's status, headers and whole body."""
    h.send_response_only(response.status, response.reason)
    for name, value in response.getheaders():
        if name.lower() not in _NOT_RETURNED:
            h.send_header(name, value)
    h.send_header("Content-Length", str(len(data)))
    if h.close_connection:
        h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(data)


def _error(
    h: BaseHTTPRequestHandler, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> None:
    """An answer in Anthropic's error shape."""
    data = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    h.send_response(status)
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    if h.close_connection:
        h.send_header("Connection", "close")
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(data)


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
    try:
        monitor = MonitorClient(
            config.monitor_url,
            token=token,
            snapshot_file=loaded.settings.throttle.snapshot_file,
            fail_mode=config.fail_mode,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: proxy.monitor_url: {exc}") from None
    try:
        proxy = Proxy(settings, monitor, prices)
    except OSError as exc:
        monitor.close()
        raise ConfigError(f"{where}: proxy.listen {config.listen!r}: cannot listen there: {exc.strerror}") from None
    signals = StopSignals()
    proxy.start()
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
