"""The daemon's HTTP API as an ASGI app: ingest, throttle checks for proxies, budgets, metrics and health.

`Api` decides what each route answers, with no HTTP plumbing; `ApiApp` routes ASGI requests to it. Database work
(ingest, budgets, readiness, metrics) runs on worker threads, never on the event loop; a check is decided in memory
on the loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from monitor.budgets.admission import (
    Admission,
    AdmissionAway,
    Admitted,
    BadAdmit,
    NeedsRead,
    Refused,
    Unavailable,
    parse_admit,
)
from monitor.budgets.engine import BudgetEngine, state_json
from monitor.http.server import (
    BadLength,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Response,
    Scope,
    Send,
    content_length,
    error_response,
    header,
    headers_of,
    json_response,
    off_loop,
    read_body,
)
from monitor.ingest.body import NotJsonNorNdjson, TooManyEvents, split_body
from monitor.ingest.group import GroupCommit
from monitor.ingest.parse import EventParser, Rejected, redact
from monitor.ingest.pipeline import Ingestor
from monitor.ingest.worker import IngestProcess, IngestProcessFailed, StorageUnavailable
from monitor.ingest.writer import Batch, BatchResult, LetterCap
from monitor.pricing import PriceTable, format_usd
from monitor.wire import iso_z

log = logging.getLogger(__name__)
HTTP_SOURCE = "http"
RAW_KEEP = 64 * 1024  # characters of a refused body kept in its dead letter
MAX_REJECTIONS_LISTED = 100  # rejected lines itemised in a 202 answer; `rejected_total` has the full count
MAX_DEAD_LETTERS = 1000  # dead letters written per request; past it one summary letter
CHECK_BODY_KEEP_ALIVE = 64 * 1024  # a check with a larger (or chunked) body closes its connection after answering
OPS_ROUTES = ("/metrics", "/healthz", "/readyz")  # open even with a read token
BEARER = {"WWW-Authenticate": 'Bearer realm="claude-monitor"'}
MAX_ADMIT_BODY = 64 * 1024  # an admit, release or renew body is a few hundred bytes
T = TypeVar("T")


def _bearer_matches(header_value: str | None, token: bytes) -> bool:
    scheme, _, given = (header_value or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


@dataclass(frozen=True)
class IngestRequest:
    """One ingest request, parsed and waiting to be written (perhaps in one transaction with others).

    `refused` is set for a body that is not JSON nor NDJSON at all: its one dead letter is written, and it is
    answered 400 with that reason.
    """

    batch: Batch
    refused: str | None = None

    @property
    def size(self) -> int:
        """Its events (and dead letters), as counted against a group's cap."""
        return len(self.batch.items)

    def answer(self, result: BatchResult) -> Response:
        """Its answer once written: 202 with what became of its own events, or 400 for a refused body."""
        if self.refused is not None:
            return json_response(400, {"error": self.refused, "dead_lettered": True})
        rejected = [
            {"index": int(location.rsplit("#", 1)[1]), "error": reason}
            for location, reason in result.rejections[:MAX_REJECTIONS_LISTED]
        ]
        answer: dict[str, Any] = {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected}
        if result.rejected:
            answer["rejected_total"] = result.rejected
        return json_response(202, answer)

    def storage_unavailable(self) -> Response:
        """Its 503 when the write failed."""
        if self.refused is not None:
            return error_response(503, "storage unavailable; retry", {"Retry-After": "5"})
        return error_response(503, "storage unavailable; nothing was stored, retry", {"Retry-After": "5"})


def _whole_body_rejected(text: str, reason: str, where: str) -> IngestRequest:
    return IngestRequest(Batch([(f"{where} #0", Rejected(reason, redact(text[:RAW_KEEP])))]), refused=reason)


def prepare_body(body: bytes, remote: str, parser: EventParser, max_events: int) -> Response | IngestRequest:
    """Parse an ingest body into what is to be written, or the answer when nothing is to be written."""
    request = uuid.uuid4().hex[:12]
    where = f"POST /v1/usage {request} from {remote}"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _whole_body_rejected(body.decode("utf-8", "replace"), f"body is not UTF-8 (byte {exc.start})", where)
    try:
        items = split_body(text, parser, where, max_events)
    except TooManyEvents as exc:
        return error_response(
            413,
            f"{exc}; the limit is http.max_events_per_request = {exc.limit:,}: send smaller batches "
            "(nothing was stored)",
        )
    except NotJsonNorNdjson as exc:
        return _whole_body_rejected(text, str(exc), where)
    cap = LetterCap(MAX_DEAD_LETTERS, f"{where} (the rest)", redact(text[:RAW_KEEP]))
    return IngestRequest(Batch(items, cap))


class Api:
    """What each route does, independent of the HTTP plumbing."""

    def __init__(
        self,
        *,
        parser: EventParser,
        ingestor: Ingestor,
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
        max_events_per_request: int = 10_000,
        group_commit_max_events: int = 10_000,
        check_require: Sequence[str] = (),
        read_token: str | None = None,
        read_token_env: str | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.admission = admission
        self.parser = parser
        self.ingestor = ingestor
        self.budgets = budgets
        self.prices = prices
        self.dimensions = dimensions
        self._token = token.encode() if token else None
        self._token_env = token_env
        self.max_body_bytes = max_body_bytes
        self.max_events_per_request = max_events_per_request
        self.group_commit_max_events = group_commit_max_events
        self.check_require = tuple(check_require)
        self._read_token = read_token.encode() if read_token else None
        self._read_token_env = read_token_env
        self.registry = registry
        self.clock = clock
        self.readiness = readiness
        self.on_ingest = on_ingest
        self.draining = False
        self._boot = uuid.uuid4().hex[:8]

    # --- authentication -----------------------------------------------------------------------------------------

    def authorized(self, header_value: str | None) -> Response | None:
        """None when the ingest Bearer token is right; else the 401 to send."""
        if self._token is None:
            return error_response(401, f"ingest is disabled: the daemon has no token (set ${self._token_env})", BEARER)
        if not _bearer_matches(header_value, self._token):
            return error_response(401, "missing or wrong Bearer token", BEARER)
        return None

    def read_authorized(self, header_value: str | None) -> Response | None:
        """None when reads are open or the read token is right; else the 401 to send."""
        if self._read_token is None or _bearer_matches(header_value, self._read_token):
            return None
        return error_response(
            401, f"missing or wrong Bearer token: this route needs the read token (${self._read_token_env})", BEARER
        )

    # --- POST /v1/usage -----------------------------------------------------------------------------------------

    def ingest(self, body: bytes, remote: str) -> Response:
        """Ingest one event, a JSON array, or NDJSON; answer only after the batch is committed."""
        prepared = self.prepare(body, remote)
        return prepared if isinstance(prepared, Response) else self.commit([prepared])[0]

    def prepare(self, body: bytes, remote: str) -> Response | IngestRequest:
        """Parse an ingest body into what `commit` writes, or the answer when nothing is to be written."""
        if self.draining:
            return self.draining_response()
        return prepare_body(body, remote, self.parser, self.max_events_per_request)

    def commit(self, requests: Sequence[IngestRequest]) -> list[Response]:
        """Write prepared requests in one transaction (the ingestor flips throttle flags and settles leases), then
        each request's own answer.

        Should the group fail for a reason other than storage, each request is written alone, so that one
        request's failure is its own.
        """
        try:
            results = self.ingestor.submit_group([request.batch for request in requests], HTTP_SOURCE)
        except SQLAlchemyError as exc:
            log.error("ingest failed, storage unavailable: %s", str(exc).splitlines()[0])
            return [request.storage_unavailable() for request in requests]
        except Exception:
            if len(requests) == 1:
                raise
            log.exception("ingest of %d requests in one transaction failed; writing them one by one", len(requests))
            return [self.commit([request])[0] for request in requests]
        for request, result in zip(requests, results, strict=True):
            if request.refused is None:
                self.on_ingest(result)
        return [request.answer(result) for request, result in zip(requests, results, strict=True)]

    def commit_in(self, bodies: Sequence[tuple[bytes, str]]) -> list[Response]:
        """Have the ingest worker parse and write request bodies ((body, remote) each) — the ingestor flips throttle
        flags and settles leases for each transaction it committed — then each request's own answer."""
        try:
            written = self.ingestor.submit_bodies(bodies, self.max_events_per_request, self.group_commit_max_events)
        except (IngestProcessFailed, StorageUnavailable) as exc:
            log.error("ingest failed: %s", exc)
            return [error_response(503, "ingest unavailable; retry", {"Retry-After": "1"})] * len(bodies)
        for result in written.results:
            if result is not None:
                self.on_ingest(result)
        for index, why in written.failures.items():
            log.error("ingest of request %d of a group failed in the ingest worker: %s", index, why)
        return [
            answer if answer is not None else error_response(500, "ingest failed; see the daemon's log")
            for answer in written.answers
        ]

    def draining_response(self) -> Response:
        """503 while the daemon shuts down."""
        return error_response(503, "shutting down; retry against another replica", {"Retry-After": "5"})

    # --- GET /v1/check ------------------------------------------------------------------------------------------

    def check(self, query: Mapping[str, str], headers: Mapping[str, str], headers_only: bool = False) -> Response:
        """204 allowed, or 429 with Retry-After and the budget that stops the caller.

        Identity comes from X-Monitor-<Dimension> headers, and from query arguments too unless `headers_only` (the
        Envoy form, whose query string is the caller's own). `headers` must have lower-case names.
        """
        args: Mapping[str, str] = {} if headers_only else query
        attributes: dict[str, str] = {}
        for name in self.dimensions:
            value = (
                args.get(name) or headers.get(f"x-monitor-{name.replace('_', '-')}") or headers.get(f"x-monitor-{name}")
            )
            if value:
                attributes[name] = value
        model_id = args.get("model") or headers.get("x-monitor-model")
        missing = [name for name in self.check_require if not (model_id if name == "model" else attributes.get(name))]
        if missing:
            how = ", ".join(f"X-Monitor-{name.replace('_', '-').title()}" for name in missing)
            return error_response(
                400,
                f"check without {', '.join(missing)} (required by http.check_require): send {how}"
                + ("" if headers_only else " or the query argument"),
            )
        model = (self.prices.resolve(model_id) or model_id) if model_id else None
        now = self.clock()
        staleness = self._staleness(now)
        decision = self.budgets.throttle.decide(model, attributes, now)
        if decision is None:
            return Response(204, b"", None, staleness)
        flag = decision.flag
        body = {**flag.as_json(), "budgets": [f.budget for f in decision.flags]}  # the flag as the snapshot writes it
        headers_out = {"Retry-After": str(decision.retry_after(now)), "X-Monitor-Budget": flag.budget, **staleness}
        deny = args.get("deny_status")
        status = int(deny) if deny in ("401", "403") else 429  # nginx auth_request understands only 401/403
        return json_response(status, body, headers_out)

    def _staleness(self, now: datetime) -> dict[str, str]:
        last = self.budgets.last
        if last is None:
            return {"X-Monitor-State-Age": "-1"}
        age = max((now - last.at).total_seconds(), 0.0)
        out = {"X-Monitor-State-Age": f"{age:.1f}"}
        if self.budgets.failing:
            out["X-Monitor-Stale"] = "storage unavailable; answering from the last known state"
        return out

    # --- POST /v1/admit, /v1/release, /v1/admit/<lease>/renew -----------------------------------------------------

    def admit_answer(self, outcome: Admitted | Refused | Unavailable) -> Response:
        """200 with the lease, 429/400 with what refused, or 503."""
        if isinstance(outcome, Admitted):
            return json_response(
                200,
                {
                    "lease": outcome.lease,
                    "reserved_usd": format_usd(outcome.reserved_pico),
                    "expires_at": iso_z(outcome.expires_at),
                    "renew_every_s": self._renew_every(),
                },
            )
        if isinstance(outcome, Unavailable):
            return error_response(503, outcome.message, {"Retry-After": str(outcome.retry_after)})
        body = {
            "refused_by": {"kind": outcome.kind, "name": outcome.name},
            "retry_after": outcome.retry_after,
            "message": outcome.message,
        }
        headers = {"Retry-After": str(outcome.retry_after)} if outcome.status == 429 else None
        return json_response(outcome.status, body, headers)

    def _renew_every(self) -> int:
        assert self.admission is not None
        return max(1, int(self.admission.lease_ttl.total_seconds() // 3))

    def release(self, body: Any) -> Response:
        """Settle a lease with the call's usage; the second of release and usage event is a no-op."""
        assert self.admission is not None
        if not isinstance(body, dict) or not isinstance(body.get("lease"), str):
            return error_response(400, "lease: required, the id POST /v1/admit returned")
        request_id = body.get("request_id")
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 255):
            return error_response(400, "request_id: must be the upstream request id (a string) or null")
        lease = body["lease"]
        try:
            how, cost = self.admission.release(lease, request_id, body.get("usage"))
        except BadAdmit as exc:
            return error_response(400, f"usage: {exc}; the lease is still open")
        except AdmissionAway as exc:
            return error_response(503, exc.message, {"Retry-After": str(exc.retry_after)})
        if how == "unknown":
            return error_response(
                404,
                f"lease {lease[:80]!r} is unknown here (never admitted, or ended so long ago it is forgotten); "
                "nothing to release",
            )
        answer: dict[str, Any] = {"lease": lease, "settled_by": how}
        if cost is not None:
            answer["cost_usd"] = format_usd(cost)
        return json_response(200, answer)

    def renew(self, lease: str) -> Response:
        """Keep a running call's lease: 200 with the new expiry, 404 when it has ended."""
        assert self.admission is not None
        try:
            expires = self.admission.renew(lease)
            how = self.admission.settled_how(lease) if expires is None else None
        except AdmissionAway as exc:
            return error_response(503, exc.message, {"Retry-After": str(exc.retry_after)})
        if expires is None:
            why = f"it has ended ({how})" if how else "it is unknown here"
            return error_response(
                404,
                f"lease {lease[:80]!r} cannot be renewed: {why}; the running call may finish, admit the next one",
            )
        return json_response(200, {"lease": lease, "expires_at": iso_z(expires), "renew_every_s": self._renew_every()})

    # --- the rest -----------------------------------------------------------------------------------------------

    def throttle(self, if_none_match: str | None) -> Response:
        """Every active flag, with an ETag."""
        state = self.budgets.throttle
        etag = f'"{self._boot}-{state.version}"'  # versions restart with the process: the boot id tells them apart
        if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
            return Response(304, b"", None, {"ETag": etag})
        return json_response(200, state.snapshot(self.clock()), {"ETag": etag, "Cache-Control": "no-cache"})

    def budgets_json(self) -> Response:
        """As `budgets --format json`."""
        throttled = self.budgets.throttle.flags
        now = self.clock()
        rows = [state_json(state, throttled, now) for state in self.budgets.states()]
        return json_response(200, rows)

    def metrics(self) -> Response:
        """Prometheus text exposition."""
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def ready(self) -> Response:
        """200 when ready, else 503 with what is missing."""
        ok, detail = self.readiness()
        return json_response(200 if ok else 503, {"ready": ok, **detail})


class ApiApp:
    """The ASGI app over `Api`: routing, body limits, and which work goes to which worker threads.

    A request body that pauses for `body_timeout` seconds is answered 408. With a `worker` process, ingest bodies
    waiting while it is busy go to it together, and it parses, prices and writes them there (in transactions of at
    most `api.group_commit_max_events` events); otherwise an ingest body is parsed on `parse_workers` threads, then
    written by group commit: requests that wait while a write is in progress go
    together in the next transaction (at most `api.group_commit_max_events` events), on `ingest_workers` threads
    (1 suits SQLite, whose writes serialise anyway: that many transactions at once). Budgets, metrics and readiness
    run on a small pool of their own, so a slow scrape never holds up ingest or checks. With `ops_only` it serves
    just /metrics, /healthz and /readyz (for a listener of their own).
    """

    def __init__(
        self,
        api: Api,
        ingest_workers: int = 1,
        read_workers: int = 2,
        ops_only: bool = False,
        body_timeout: float | None = 10.0,
        parse_workers: int = 2,
        worker: IngestProcess | None = None,
    ) -> None:
        self.api = api
        self.worker = worker
        self.ops_only = ops_only
        self.body_timeout = body_timeout  # seconds a request body may pause before 408
        self._parse_pool = ThreadPoolExecutor(parse_workers, thread_name_prefix="ingest-parse")
        self._ingest_pool = ThreadPoolExecutor(ingest_workers, thread_name_prefix="ingest")
        self._read_pool = ThreadPoolExecutor(read_workers, thread_name_prefix="api-read")
        self._group: GroupCommit[Any, Response]
        if worker is not None:  # bodies go to the worker whole; it splits them into transactions by their events
            self._group = GroupCommit(
                api.commit_in,
                lambda body: 1,
                api.group_commit_max_events,
                self._ingest_pool,
                1,
            )
        else:
            self._group = GroupCommit(
                api.commit, lambda request: request.size, api.group_commit_max_events, self._ingest_pool, ingest_workers
            )

    @property
    def ingest_queue(self) -> tuple[int, int]:
        """Ingest requests (waiting for the writer, in the transactions being written)."""
        return self._group.waiting, self._group.writing

    def close(self) -> None:
        """Wait for work in progress and stop the worker threads (after the server has drained)."""
        self._parse_pool.shutdown(wait=True)
        self._ingest_pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            response = await self._route(scope, receive)
        except ClientDisconnected:
            return
        await response.send(send)

    async def _route(self, scope: Scope, receive: Receive) -> Response:
        api = self.api
        method = scope["method"]
        path = scope["path"].rstrip("/") or "/"
        if self.ops_only and path not in OPS_ROUTES:
            return error_response(404, f"no route {path} here: this listener serves {', '.join(OPS_ROUTES)}")
        if path == "/v1/check" or path.startswith("/v1/check/"):  # Envoy appends the original path
            if method not in ("GET", "HEAD", "POST"):
                return _method_not_allowed(method, path, "GET, HEAD, POST")
            return self._check(scope, envoy=path != "/v1/check")
        if path == "/v1/usage":
            if method != "POST":
                return _method_not_allowed(method, path, "POST")
            return await self._ingest(scope, receive)
        if api.admission is not None and (path in ("/v1/admit", "/v1/release") or path.startswith("/v1/admit/")):
            if method != "POST":
                return _method_not_allowed(method, path, "POST")
            return await self._admission(scope, receive, path)
        if method not in ("GET", "HEAD"):
            return error_response(404, f"no route {method} {path}", close=True)
        if path in ("/v1/throttle", "/v1/budgets"):
            denied = api.read_authorized(header(scope, "authorization"))
            if denied is not None:
                return denied
            if path == "/v1/throttle":
                return api.throttle(header(scope, "if-none-match"))
            return await off_loop(self._read_pool, api.budgets_json)
        if path == "/metrics":
            return await off_loop(self._read_pool, api.metrics)
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            return await off_loop(self._read_pool, api.ready)
        return error_response(404, f"no route {path}")

    def answer_now(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Response | None:
        """A GET or HEAD check without a body, answered by the server as its headers arrive (on the event loop, no
        request cycle): the decision is in memory, and a proxy asks one before every call. Anything else (None) is
        served through `__call__`, a check too when it has a body, a POST or an escaped path."""
        if self.ops_only or (method != b"GET" and method != b"HEAD"):
            return None
        path, _, query = target.partition(b"#")[0].partition(b"?")
        path = path.rstrip(b"/")
        if path != b"/v1/check" and not path.startswith(b"/v1/check/"):
            return None  # also an absolute-form target or an escaped path: the usual way decides those
        for name, value in headers:
            if (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding":
                return None
        return self._check({"headers": headers, "query_string": query}, envoy=path != b"/v1/check")

    def _check(self, scope: Scope, envoy: bool) -> Response:
        headers = headers_of(scope)
        # ext_authz may forward the caller's body; it is not needed. uvicorn discards an unread body after the
        # answer; a large or chunked one is not worth reading: the connection closes instead.
        try:
            length = content_length(scope)
        except BadLength:
            length = None
        close = (length is None and "transfer-encoding" in headers) or (length or 0) > CHECK_BODY_KEEP_ALIVE
        response = self.api.read_authorized(headers.get("authorization"))
        if response is None:
            query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
            response = self.api.check(query, headers, headers_only=envoy)
        if close:
            response = replace(response, close=True)
        return response

    async def _admission(self, scope: Scope, receive: Receive, path: str) -> Response:
        api = self.api
        admission = api.admission
        assert admission is not None
        denied = api.authorized(header(scope, "authorization"))
        if denied is not None:
            return denied
        try:
            length = content_length(scope)
        except BadLength as exc:
            return error_response(400, str(exc), close=True)
        if length is not None and length > MAX_ADMIT_BODY:
            return error_response(413, f"body of {length:,} bytes; {path} takes at most {MAX_ADMIT_BODY:,}", close=True)
        try:
            raw = await read_body(receive, MAX_ADMIT_BODY, self.body_timeout)
        except BodyTimeout as exc:
            return error_response(408, f"{exc}; send the whole body promptly", close=True)
        except BodyTooLarge as exc:
            return error_response(413, f"{exc}; {path} takes at most {MAX_ADMIT_BODY:,} bytes", close=True)
        if path.startswith("/v1/admit/"):
            lease, _, action = path.removeprefix("/v1/admit/").partition("/")
            if action != "renew" or not lease:
                return error_response(404, f"no route {path}: renew a lease with POST /v1/admit/<lease>/renew")
            if admission.in_database:  # a transaction: off the loop
                return await off_loop(self._read_pool, lambda: api.renew(lease))
            return api.renew(lease)
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as exc:
            return error_response(400, f"body is not JSON: {exc}")
        if path == "/v1/release":
            if admission.in_database:
                return await off_loop(self._read_pool, lambda: api.release(body))
            return api.release(body)
        try:
            request = parse_admit(body, api.dimensions)
        except BadAdmit as exc:
            return error_response(400, f"POST /v1/admit: {exc}")
        outcome = admission.admit(request)  # in memory, on the loop
        if isinstance(outcome, NeedsRead):  # a scope not seen yet: one indexed read, off the loop
            outcome = await off_loop(self._read_pool, lambda: admission.admit(request, read=True))
        assert not isinstance(outcome, NeedsRead)
        return api.admit_answer(outcome)

    async def _ingest(self, scope: Scope, receive: Receive) -> Response:
        api = self.api
        try:
            length = content_length(scope)
        except BadLength as exc:
            return error_response(400, str(exc), close=True)
        chunked = "chunked" in (header(scope, "transfer-encoding") or "").lower()
        denied = api.authorized(header(scope, "authorization"))
        if denied is not None:
            # A small body is already in uvicorn's buffer and is discarded; a large one is not worth receiving.
            keep = length is not None and length <= CHECK_BODY_KEEP_ALIVE
            return denied if keep else replace(denied, close=True)
        if length is None and not chunked:
            return error_response(411, "Content-Length (or Transfer-Encoding: chunked) is required", close=True)
        if length is not None and length > api.max_body_bytes:
            return error_response(
                413,
                f"body of {length:,} bytes is over the limit of {api.max_body_bytes:,} (http.max_body_bytes): "
                "send smaller batches",
                close=True,
            )
        if api.draining:
            return replace(api.draining_response(), close=True)
        try:
            body = await read_body(receive, api.max_body_bytes, self.body_timeout)
        except BodyTimeout as exc:
            return error_response(408, f"{exc}; nothing was stored, send the whole body promptly", close=True)
        except BodyTooLarge as exc:
            return error_response(
                413, f"{exc} (http.max_body_bytes); send smaller batches (nothing was stored)", close=True
            )
        remote = (scope.get("client") or ("?", 0))[0]
        if self.worker is not None:
            return await self._group.submit((body, remote))
        prepared = await off_loop(self._parse_pool, lambda: api.prepare(body, remote))
        if isinstance(prepared, Response):
            return prepared
        return await self._group.submit(prepared)


def _method_not_allowed(method: str, path: str, allowed: str) -> Response:
    return error_response(405, f"{path} does not take {method}; use {allowed}", {"Allow": allowed})
