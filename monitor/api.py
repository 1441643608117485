"""The HTTP API (SPEC §6): ingest, throttle checks for proxies, budgets, metrics and health, on one threaded server."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from monitor.evaluation import BudgetEngine, state_json
from monitor.events import EventParser, Rejected, redact
from monitor.ingest.writer import BatchResult, Item, Writer
from monitor.pricing import PriceTable, format_usd
from monitor.throttle import iso

log = logging.getLogger(__name__)
HTTP_SOURCE = "http"
RAW_KEEP = 64 * 1024


@dataclass
class Reply:
    """A response: status, JSON (or raw) body, extra headers."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


def json_reply(status: int, document: Any, headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON response."""
    return Reply(status, json.dumps(document).encode() + b"\n", "application/json", headers)


class Api:
    """What each route does, independent of the HTTP plumbing."""

    def __init__(
        self,
        *,
        parser: EventParser,
        writer: Writer,
        budgets: BudgetEngine,
        prices: PriceTable,
        dimensions: list[str],
        token: str | None,
        token_env: str,
        max_body_bytes: int,
        registry: CollectorRegistry,
        clock: Callable[[], datetime],
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        on_ingest: Callable[[BatchResult], None] = lambda result: None,
    ) -> None:
        self.parser = parser
        self.writer = writer
        self.budgets = budgets
        self.prices = prices
        self.dimensions = dimensions
        self._token = token.encode() if token else None
        self._token_env = token_env
        self.max_body_bytes = max_body_bytes
        self.registry = registry
        self.clock = clock
        self.readiness = readiness
        self.on_ingest = on_ingest
        self.draining = False
        self._boot = uuid.uuid4().hex[:8]
        self._inflight = 0
        self._idle = threading.Condition()

    def drain(self, timeout: float = 30.0) -> bool:
        """Refuse new requests and wait for ingest batches in flight to commit; True when none is left."""
        self.draining = True
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    # --- POST /v1/usage ---------------------------------------------------------------------------------------

    def authorized(self, header: str | None) -> Reply | None:
        """None when the Bearer token is right; else the 401 to send."""
        if self._token is None:
            return json_reply(
                401,
                {"error": f"ingest is disabled: the daemon has no token (set ${self._token_env})"},
                {"WWW-Authenticate": 'Bearer realm="claude-monitor"'},
            )
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            return json_reply(
                401, {"error": "missing or wrong Bearer token"}, {"WWW-Authenticate": 'Bearer realm="claude-monitor"'}
            )
        return None

    def ingest(self, body: bytes, remote: str) -> Reply:
        """Ingest one event, a JSON array, or NDJSON; answer only after the batch is committed."""
        with self._idle:
            if self.draining:
                return json_reply(503, {"error": "shutting down; retry against another replica"}, {"Retry-After": "5"})
            self._inflight += 1
        try:
            return self._ingest(body, remote)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _ingest(self, body: bytes, remote: str) -> Reply:
        request = uuid.uuid4().hex[:12]
        where = f"POST /v1/usage {request} from {remote}"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._whole_body_rejected(
                body.decode("utf-8", "replace"), f"body is not UTF-8 (byte {exc.start})", where
            )
        items = self._items(text, where)
        if items is None:
            return self._whole_body_rejected(text, "body is neither JSON nor NDJSON", where)
        try:
            result = self.writer.write(items, HTTP_SOURCE)
        except SQLAlchemyError as exc:
            log.error("ingest failed, storage unavailable: %s", str(exc).splitlines()[0])
            return json_reply(503, {"error": "storage unavailable; nothing was stored, retry"}, {"Retry-After": "5"})
        self.budgets.on_batch(result.touched)  # flags flip before the answer returns
        self.on_ingest(result)
        rejected = [
            {"index": int(location.rsplit("#", 1)[1]), "error": reason} for location, reason in result.rejections
        ]
        return json_reply(202, {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected})

    def _items(self, text: str, where: str) -> list[Item] | None:
        try:
            document = json.loads(text)
        except RecursionError:
            return None
        except ValueError:
            document = _NOT_JSON
        if document is not _NOT_JSON:
            elements = document if isinstance(document, list) else [document]
            return [(f"{where} #{i}", self.parser.parse_object(element)) for i, element in enumerate(elements)]
        items: list[Item] = []
        parsed_any = False
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            item = self.parser.parse_line(line)
            parsed_any = parsed_any or not (isinstance(item, Rejected) and item.reason.startswith("not JSON"))
            items.append((f"{where} #{i}", item))
        return items if parsed_any else None

    def _whole_body_rejected(self, text: str, reason: str, where: str) -> Reply:
        raw = redact(text[:RAW_KEEP])
        try:
            self.writer.write([(f"{where} #0", Rejected(reason, raw))], HTTP_SOURCE)
        except SQLAlchemyError:
            return json_reply(503, {"error": "storage unavailable; retry"}, {"Retry-After": "5"})
        return json_reply(400, {"error": reason, "dead_lettered": True})

    # --- GET /v1/check ---------------------------------------------------------------------------------------

    def check(self, query: Mapping[str, str], headers: Mapping[str, str]) -> Reply:
        """204 allowed, or 429 with Retry-After and the budget that stops the caller."""
        attributes: dict[str, str] = {}
        lowered = {key.lower(): value for key, value in headers.items()}
        for name in self.dimensions:
            value = (
                query.get(name)
                or lowered.get(f"x-monitor-{name.replace('_', '-')}")
                or lowered.get(f"x-monitor-{name}")
            )
            if value:
                attributes[name] = value
        model_id = query.get("model") or lowered.get("x-monitor-model")
        model = (self.prices.resolve(model_id) or model_id) if model_id else None
        now = self.clock()
        staleness = self._staleness(now)
        decision = self.budgets.throttle.decide(model, attributes, now)
        if decision is None:
            return Reply(204, b"", "text/plain", staleness)
        flag = decision.flag
        body = {
            "budget": flag.budget,
            "scope": flag.scope,
            "spend_usd": format_usd(flag.spend_pico),
            "limit_usd": None if flag.limit_pico is None else format_usd(flag.limit_pico),
            "until": iso(flag.until),
            "utilization": round(flag.utilization, 4),
            "measure": flag.measure,
            "amount": flag.amount,
            "limit": flag.limit,
            "budgets": [f.budget for f in decision.flags],
        }
        headers_out = {"Retry-After": str(decision.retry_after(now)), "X-Monitor-Budget": flag.budget, **staleness}
        deny = query.get("deny_status")
        status = int(deny) if deny in ("401", "403") else 429  # nginx auth_request understands only 401/403
        return json_reply(status, body, headers_out)

    def _staleness(self, now: datetime) -> dict[str, str]:
        last = self.budgets.last
        if last is None:
            return {"X-Monitor-State-Age": "-1"}
        age = max((now - last.at).total_seconds(), 0.0)
        out = {"X-Monitor-State-Age": f"{age:.1f}"}
        if self.budgets.failing:
            out["X-Monitor-Stale"] = "storage unavailable; answering from the last known state"
        return out

    # --- the rest ----------------------------------------------------------------------------------------------

    def throttle(self, if_none_match: str | None) -> Reply:
        """Every active flag, with an ETag."""
        state = self.budgets.throttle
        etag = f'"{self._boot}-{state.version}"'  # versions restart with the process: the boot id tells them apart
        if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
            return Reply(304, b"", "application/json", {"ETag": etag})
        return json_reply(200, state.snapshot(self.clock()), {"ETag": etag, "Cache-Control": "no-cache"})

    def budgets_json(self) -> Reply:
        """As `budgets --format json`."""
        throttled = self.budgets.throttle.flags
        now = self.clock()
        rows = [state_json(state, throttled, now) for state in self.budgets.states()]
        return json_reply(200, rows)

    def metrics(self) -> Reply:
        """Prometheus text exposition."""
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def ready(self) -> Reply:
        """200 when ready, else 503 with what is missing."""
        ok, detail = self.readiness()
        return json_reply(200 if ok else 503, {"ready": ok, **detail})


_NOT_JSON = object()


def make_handler(api: Api) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `api`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "claude-monitor"
        # Headers and body go out in two writes: without TCP_NODELAY the body waits ~40 ms for a delayed ACK.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in (reply.headers or {}).items():
                self.send_header(name, value)
            if reply.status not in (204, 304):
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if reply.status not in (204, 304) and self.command != "HEAD":
                self.wfile.write(reply.body)

        def _route(self) -> str:
            return urlsplit(self.path).path.rstrip("/") or "/"

        def _query(self) -> dict[str, str]:
            return dict(parse_qsl(urlsplit(self.path).query))

        def _check(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= 1024 * 1024:  # ext_authz may forward a body; it is not needed
                self.rfile.read(length)
            elif length:
                self.close_connection = True
            self._send(api.check(self._query(), dict(self.headers.items())))

        def do_GET(self) -> None:
            route = self._route()
            if route == "/v1/check" or route.startswith("/v1/check/"):  # Envoy appends the original path
                self._check()
            elif route == "/v1/throttle":
                self._send(api.throttle(self.headers.get("If-None-Match")))
            elif route == "/v1/budgets":
                self._send(api.budgets_json())
            elif route == "/metrics":
                self._send(api.metrics())
            elif route == "/healthz":
                self._send(json_reply(200, {"status": "ok"}))
            elif route == "/readyz":
                self._send(api.ready())
            else:
                self._send(json_reply(404, {"error": f"no route {route}"}))

        do_HEAD = do_GET

        def do_POST(self) -> None:
            route = self._route()
            if route == "/v1/check" or route.startswith("/v1/check/"):
                self._check()
                return
            if route != "/v1/usage":
                self.close_connection = True
                self._send(json_reply(404, {"error": f"no route POST {route}"}))
                return
            denied = api.authorized(self.headers.get("Authorization"))
            length_header = self.headers.get("Content-Length")
            if denied is not None or length_header is None or not length_header.isdigit():
                if denied is not None and length_header and length_header.isdigit() and int(length_header) <= 65536:
                    self.rfile.read(int(length_header))  # a small body is drained so the client reads the 401
                self.close_connection = True  # the connection cannot be reused
                self._send(denied or json_reply(411, {"error": "Content-Length is required"}))
                return
            length = int(length_header)
            if length > api.max_body_bytes:
                self.close_connection = True
                self._send(
                    json_reply(413, {"error": f"body of {length:,} bytes is over the limit of {api.max_body_bytes:,}"})
                )
                return
            body = self.rfile.read(length)
            self._send(api.ingest(body, self.client_address[0]))

    return Handler


class ApiServer(ThreadingHTTPServer):
    """The threaded HTTP server; request threads are daemons so a stuck client never blocks shutdown."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


def status_phrase(status: int) -> str:
    """The reason phrase of an HTTP status."""
    return HTTPStatus(status).phrase
