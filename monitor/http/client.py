"""What a proxy imports: throttle decisions from a local copy of the daemon's state, and usage recording.

Standard library only (the `anthropic` types are used for annotations), so a proxy can import it without the
daemon's database stack. Typical use in the route that holds the Anthropic key::

    monitor = MonitorClient("http://127.0.0.1:9464", token=..., snapshot_file="/var/lib/claude-monitor/throttle.json")
    verdict = monitor.check(model="claude-haiku-4-5", project="lingo", user=user_id)
    if not verdict.allowed:
        return 429, {"Retry-After": str(verdict.retry_after)}, verdict.reason
    message = anthropic_client.messages.create(...)
    monitor.record_message(message, attributes={"project": "lingo", "user": user_id})
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from monitor import __version__
from monitor.http.estimate import input_token_bound
from monitor.http.pool import ConnectionPool
from monitor.wire import iso_z, scope_text

if TYPE_CHECKING:
    from anthropic.types import Message, RawMessageStreamEvent

log = logging.getLogger(__name__)

Source = Literal["daemon", "snapshot", "none"]

_MAX_IDLE_CONNECTIONS = 8
_RETRY_AFTER_WITHOUT_UNTIL = 3600  # what the daemon's /v1/check answers for a flag with no end


class MonitorError(Exception):
    """The daemon refused or could not take a request: `status` is its HTTP status (None when it was unreachable)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: int | None = None, body: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body


class AdmissionRefused(MonitorError):
    """POST /v1/admit said no: `kind` (rate, concurrency, budget or cap), the limit or budget `name` that refused,
    `retry_after` seconds, and `status` 429 (or 400 for a cap, which no retry of the same call passes)."""

    def __init__(self, message: str, *, status: int, kind: str, name: str, retry_after: int, body: Any) -> None:
        super().__init__(message, status=status, retry_after=retry_after, body=body)
        self.kind = kind
        self.name = name


@dataclass(frozen=True)
class Lease:
    """An admitted call's lease: pass `id` to `release()` when the call ends (and as the usage event's `lease`), and
    `renew()` it every `renew_every` seconds while a long call runs."""

    id: str
    reserved_usd: str
    expires_at: datetime | None
    renew_every: float


@dataclass(frozen=True)
class Verdict:
    """The answer of `MonitorClient.check`.

    `budget`, `scope`, `retry_after` and `until` describe the flag that stops the caller (the one that holds
    longest); `reason` is a sentence fit for a log line or the message of a 429; `stale` is True when neither the
    daemon's state nor the snapshot file was fresh enough and `fail_mode` decided; `source` is where the decision
    came from.
    """

    allowed: bool
    budget: str | None
    scope: dict[str, str] | None
    retry_after: int | None
    until: datetime | None
    reason: str
    stale: bool
    source: Source


@dataclass(frozen=True)
class ClientStats:
    """What the client knows about its copy of the throttle state, for a proxy's own logs and metrics."""

    version: int | None  # the daemon's state version of the local copy (None before the first answer)
    age_seconds: float | None  # since the daemon last answered (None: never)
    fetches: int  # GET /v1/throttle answered 200 (a new copy)
    not_modified: int  # answered 304 (the copy was still current)
    failures: int  # unreachable, timed out, or an unusable answer
    last_error: str | None


@dataclass(frozen=True)
class _Flag:
    budget: str
    scope: dict[str, str]
    until: datetime | None
    until_ts: float | None
    detail: Mapping[str, Any]

    def applies(self, caller: Mapping[str, str], now: float) -> bool:
        if self.until_ts is not None and now >= self.until_ts:
            return False
        return all(caller.get(key) == value for key, value in self.scope.items())

    def reason(self) -> str:
        text = f"{self.budget} exceeded for {scope_text(self.scope)}"
        spend, limit = self.detail.get("spend_usd"), self.detail.get("limit_usd")
        if spend is not None and limit is not None:
            text += f": ${spend} of ${limit}"
        elif self.detail.get("limit") is not None and self.detail.get("measure") not in (None, "usd"):
            text += f": {self.detail.get('amount')} {self.detail['measure']} of {self.detail['limit']}"
        if self.until is not None:
            text += f" (until {iso_z(self.until, 'milliseconds')})"
        return text


@dataclass(frozen=True)
class _State:
    """One copy of the throttle state: from the daemon (`obtained` = when it last answered) or the snapshot file."""

    version: int | None
    generated_at: datetime | None
    flags: tuple[_Flag, ...]
    etag: str | None
    obtained: float
    # scope keys -> scope values -> flags, so a check looks up a few groups instead of scanning every user's flag
    index: Mapping[tuple[str, ...], Mapping[tuple[str, ...], tuple[_Flag, ...]]] = field(default_factory=dict)

    def applicable(self, caller: Mapping[str, str], now: float) -> list[_Flag]:
        """The flags in force at `now` whose every scope key/value the caller has."""
        found: list[_Flag] = []
        for keys, by_values in self.index.items():
            if all(key in caller for key in keys):
                group = by_values.get(tuple(caller[key] for key in keys), ())
                found.extend(flag for flag in group if flag.applies(caller, now))
        return found


class MonitorClient:
    """Decides locally whether a caller may call Claude, and records each call's usage with the daemon."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        read_token: str | None = None,
        snapshot_file: str | Path | None = None,
        refresh_interval: float = 1.0,
        max_staleness: float = 30.0,
        fail_mode: Literal["open", "closed"] = "open",
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        """Connect to the daemon at `url` (its HTTP API root) and fetch the throttle state once.

        `token` is the ingest Bearer token (needed by the record* methods); `read_token` the daemon's read token
        (`http.read_token_env`), sent with GET /v1/throttle when the daemon requires one. `snapshot_file` is the
        daemon's `throttle.snapshot_file`, read when the daemon's state is older than `max_staleness` seconds; its
        `generated_at` must be younger than that too, else `fail_mode` decides. The daemon rewrites the snapshot at
        every evaluation, so keep `max_staleness` above the daemon's `evaluate_every` (default 15 s) plus a few
        seconds. `clock` gives epoch seconds. With
        `background`, a daemon thread refreshes the state every `refresh_interval` seconds until `close()`.
        """
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', not {fail_mode!r}")
        for name, value in (("refresh_interval", refresh_interval), ("max_staleness", max_staleness)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.url = url.rstrip("/")
        self.snapshot_file = Path(snapshot_file) if snapshot_file is not None else None
        self.refresh_interval = refresh_interval
        self.max_staleness = max_staleness
        self.fail_mode = fail_mode
        self.timeout = timeout
        self.clock = clock
        self._http = _Connections(url, token, timeout)
        self._read_headers = {"Authorization": f"Bearer {read_token}"} if read_token else {}
        self._state: _State | None = None  # replaced whole, so check() reads it without a lock
        self._refresh_lock = threading.Lock()
        self._refreshes_started = 0  # refreshes begun so far (under the lock)
        self._fresh_from = 0  # the number of the last refresh that succeeded
        self._fetches = self._not_modified = self._failures = 0
        self._last_error: str | None = None
        self._snapshot_lock = threading.Lock()
        self._snapshot_key: tuple[int, int, int] | None = None
        self._snapshot: _State | None = None
        self._snapshot_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()
        if background:
            self._thread = threading.Thread(target=self._run, name="claude-monitor-client", daemon=True)
            self._thread.start()

    # --- decisions ---------------------------------------------------------------------------------------------

    def check(self, *, model: str | None = None, **attributes: str) -> Verdict:
        """Whether a caller with these attributes may make a request now; decided locally, without network I/O.

        A flag applies when every key/value of its scope equals the caller's: pass the dimensions the daemon
        knows (project, user, …) and `model` as the daemon names it (the price-table name, e.g.
        `claude-haiku-4-5`, not a dated id or alias: nothing is resolved here).
        """
        now = self.clock()
        state, source, why = self._usable_state(now)
        return self._verdict(state, source, why, _caller(model, attributes), now)

    def check_in_memory(self, *, model: str | None = None, **attributes: str) -> Verdict | None:
        """As `check`, from the daemon's state held in memory only: None when that copy is older than
        max_staleness (then call `check`, which may read the snapshot file). Never blocks: fit for an event loop."""
        now = self.clock()
        state = self._state
        if state is None or (age := max(now - state.obtained, 0.0)) > self.max_staleness:
            return None
        return self._verdict(state, "daemon", f"daemon state {age:.1f} s old", _caller(model, attributes), now)

    def _verdict(
        self, state: _State | None, source: Source, why: str, caller: Mapping[str, str], now: float
    ) -> Verdict:
        if state is None:
            if self.fail_mode == "open":
                return Verdict(True, None, None, None, None, f"{why}; allowing (fail_mode open)", True, "none")
            retry = max(1, math.ceil(self.refresh_interval))
            return Verdict(False, None, None, retry, None, f"{why}; denying (fail_mode closed)", True, "none")
        applicable = state.applicable(caller, now)
        if not applicable:
            return Verdict(True, None, None, None, None, f"no throttle flag applies ({why})", False, source)
        flag = max(applicable, key=lambda f: (f.until_ts is None, f.until_ts or 0.0))
        retry = _RETRY_AFTER_WITHOUT_UNTIL if flag.until_ts is None else max(1, math.ceil(flag.until_ts - now))
        return Verdict(False, flag.budget, dict(flag.scope), retry, flag.until, flag.reason(), False, source)

    def _usable_state(self, now: float) -> tuple[_State | None, Source, str]:
        state = self._state
        if state is not None and (age := max(now - state.obtained, 0.0)) <= self.max_staleness:
            return state, "daemon", f"daemon state {age:.1f} s old"
        if state is None:
            daemon_why = f"daemon {self.url} has not answered ({self._last_error or 'no attempt yet'})"
        else:
            daemon_why = (
                f"daemon {self.url} last answered {now - state.obtained:.1f} s ago, over max_staleness "
                f"{self.max_staleness:g} s ({self._last_error or 'not refreshed since'})"
            )
        snapshot, snapshot_why = self._fresh_snapshot(now)
        if snapshot is not None:
            return snapshot, "snapshot", f"{daemon_why}; {snapshot_why}"
        return None, "none", f"throttle state unavailable: {daemon_why}; {snapshot_why}"

    def _fresh_snapshot(self, now: float) -> tuple[_State | None, str]:
        """The snapshot file's state if younger than max_staleness; else None and why not."""
        if self.snapshot_file is None:
            return None, "no snapshot_file configured"
        snapshot, error = self._read_snapshot()
        if snapshot is None:
            return None, f"snapshot file {self.snapshot_file} unusable: {error}"
        age = max(now - snapshot.obtained, 0.0)  # obtained = its generated_at; clamp a little clock skew
        if age < self.max_staleness:
            return snapshot, f"snapshot file {self.snapshot_file} is {age:.1f} s old"
        return (
            None,
            f"snapshot file {self.snapshot_file} is {age:.1f} s old, over max_staleness {self.max_staleness:g} s",
        )

    def _read_snapshot(self) -> tuple[_State | None, str | None]:
        """The snapshot file, parsed again only when it changed (the daemon replaces it by rename)."""
        assert self.snapshot_file is not None
        with self._snapshot_lock:
            try:
                info = os.stat(self.snapshot_file)
            except OSError as exc:
                return None, exc.strerror or type(exc).__name__
            key = (info.st_ino, info.st_mtime_ns, info.st_size)
            if key != self._snapshot_key:
                self._snapshot_key = key
                try:
                    document = json.loads(Path(self.snapshot_file).read_bytes())
                    generated = _parse_time(_field(document, "generated_at", str))
                    if generated is None:
                        raise ValueError("generated_at is missing")
                    self._snapshot = _parse_state(document, etag=None, obtained=generated.timestamp())
                    self._snapshot_error = None
                except (OSError, ValueError) as exc:
                    self._snapshot, self._snapshot_error = None, str(exc)
            return self._snapshot, self._snapshot_error

    # --- the daemon's state ------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """One GET /v1/throttle (with If-None-Match); True when the daemon answered, so the local copy is current.

        On False the copy keeps aging; once it is older than max_staleness, check() falls back to the snapshot
        file and then to fail_mode.
        """
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_since(self, mark: int) -> bool:
        """Make sure a refresh begun after `mark` (a value of `_refreshes_started`) has succeeded: one that did
        while this thread waited for the lock will do; else refresh now."""
        with self._refresh_lock:
            if self._fresh_from > mark:
                return True
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        self._refreshes_started += 1
        started = self._refreshes_started
        current = self._state
        headers = {"Accept": "application/json", **self._read_headers}
        if current is not None and current.etag:
            headers["If-None-Match"] = current.etag
        sent = self.clock()  # the answer is at least this new
        try:
            status, answer_headers, body = self._http.request("GET", "/v1/throttle", headers=headers)
            if status == 304 and current is not None:
                self._state = replace(current, obtained=sent)
                self._not_modified += 1
            elif status == 200:
                self._state = _parse_state(json.loads(body), etag=answer_headers.get("etag"), obtained=sent)
                self._fetches += 1
            else:
                raise ValueError(f"GET /v1/throttle answered HTTP {status}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._failures += 1
            error = _describe(exc)
            if self._last_error is None:
                log.warning("claude-monitor daemon %s unavailable: %s; deciding from the local copy", self.url, error)
            else:
                log.debug("claude-monitor daemon %s still unavailable: %s", self.url, error)
            self._last_error = error
            if current is not None and current.etag is not None:
                # A restarted daemon counts versions from scratch: the next answer must be a full one.
                self._state = replace(current, etag=None)
            return False
        if self._last_error is not None:
            log.info("claude-monitor daemon %s answers again", self.url)
            self._last_error = None
        self._fresh_from = started
        return True

    @property
    def stats(self) -> ClientStats:
        """The local copy's version and age, and how refreshes went."""
        state = self._state
        return ClientStats(
            version=None if state is None else state.version,
            age_seconds=None if state is None else max(self.clock() - state.obtained, 0.0),
            fetches=self._fetches,
            not_modified=self._not_modified,
            failures=self._failures,
            last_error=self._last_error,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh()
            except Exception:  # the thread must outlive any surprise: try again next interval
                log.exception("claude-monitor throttle refresh failed; retrying in %g s", self.refresh_interval)

    def close(self) -> None:
        """Stop the background refresh (waiting for the thread to end) and close idle connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._http.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- recording ---------------------------------------------------------------------------------------------

    def record(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """POST one usage event; the 202 JSON. Then refresh, so the next check sees a budget this call crossed.

        Raises MonitorError when the daemon answers 4xx/5xx or cannot be reached. Resending the same event is
        safe: the daemon counts a request_id once.
        """
        # A NaN or infinity is not JSON: refused here (ValueError) instead of sent.
        status, headers, answer = self._post("/v1/usage", json.dumps(event, allow_nan=False).encode())
        if not 200 <= status < 300:
            raise self._error("/v1/usage", status, headers, answer)
        if not isinstance(answer, dict):
            raise MonitorError(f"POST {self.url}/v1/usage answered {status} with a body that is not a JSON object")
        for rejected in answer.get("rejected") or ():
            log.warning("claude-monitor rejected event %s: %s", event.get("request_id"), rejected.get("error"))
        # The daemon flips throttle flags before its answer: a refresh begun after the answer sees a budget this
        # event crossed. Concurrent records share one such refresh instead of queueing one each.
        self._refresh_since(self._refreshes_started)
        return answer

    def record_message(
        self,
        message: Message,
        *,
        attributes: Mapping[str, str],
        request_id: str | None = None,
        latency_ms: float | None = None,
        batch: bool = False,
        timestamp: datetime | None = None,
        lease: str | None = None,
    ) -> dict[str, Any]:
        """Record a Messages API response; request_id defaults to `message._request_id` (the request-id header).
        `lease` (from `admit()`) settles the call's reservation if `release()` has not."""
        request_id = request_id or getattr(message, "_request_id", None)
        if not request_id:
            raise ValueError(
                "the message has no _request_id (the request-id response header): pass request_id= explicitly"
            )
        usage = message.usage.model_dump(mode="json")
        return self.record(
            self._event(request_id, message.model, usage, attributes, 200, latency_ms, batch, timestamp, lease)
        )

    def record_stream(
        self,
        events: Iterable[RawMessageStreamEvent | Mapping[str, Any]],
        *,
        attributes: Mapping[str, str],
        request_id: str | None = None,
        latency_ms: float | None = None,
        lease: str | None = None,
    ) -> dict[str, Any]:
        """Record a streamed response from its raw events (SDK objects, or the SSE `data` objects as dicts).

        Usage is message_start's, overlaid by the non-null fields of the last message_delta's usage (cumulative
        counts; it carries no cache_creation, service_tier or speed, so those stay from message_start).
        request_id defaults to the SDK stream's request-id header when `events` is an SDK Stream.
        """
        model: str | None = None
        usage: dict[str, Any] | None = None
        last_delta: Mapping[str, Any] | None = None
        for event in events:
            kind = event.get("type") if isinstance(event, Mapping) else getattr(event, "type", None)
            if kind == "message_start":
                message = _as_dict(event).get("message") or {}
                model, usage = message.get("model"), dict(message.get("usage") or {})
            elif kind == "message_delta":
                last_delta = _as_dict(event).get("usage") or {}
        if usage is None or not isinstance(model, str):
            raise ValueError("the stream has no message_start event with a model: there is no usage to record")
        if last_delta:
            usage.update({key: value for key, value in last_delta.items() if value is not None})
        request_id = request_id or _stream_request_id(events)
        if not request_id:
            raise ValueError("no request_id: pass the request-id response header as request_id=")
        return self.record(self._event(request_id, model, usage, attributes, 200, latency_ms, False, None, lease))

    def record_failure(
        self,
        *,
        model: str,
        status: int,
        attributes: Mapping[str, str],
        request_id: str | None = None,
        lease: str | None = None,
    ) -> dict[str, Any]:
        """Record a failed call (429, 529, 500 …) with zero usage; pass Anthropic's request-id when it sent one.

        Without one, a unique id is made up, so recording the same failure twice counts it twice.
        """
        request_id = request_id or f"failed-{uuid.uuid4().hex}"
        usage = {"input_tokens": 0, "output_tokens": 0}
        return self.record(self._event(request_id, model, usage, attributes, status, None, False, None, lease))

    def _event(
        self,
        request_id: str,
        model: str,
        usage: Mapping[str, Any],
        attributes: Mapping[str, str],
        status: int,
        latency_ms: float | None,
        batch: bool,
        timestamp: datetime | None,
        lease: str | None = None,
    ) -> dict[str, Any]:
        when = timestamp if timestamp is not None else datetime.fromtimestamp(self.clock(), UTC)
        event: dict[str, Any] = {
            "request_id": request_id,
            "timestamp": iso_z(when, "milliseconds"),
            "model": model,
            "usage": dict(usage),
            "attributes": dict(attributes),
            "batch": batch,
            "status": status,
        }
        if latency_ms is not None:
            event["latency_ms"] = latency_ms
        if lease is not None:
            event["lease"] = lease
        return event

    # --- admission ---------------------------------------------------------------------------------------------

    def admit(
        self,
        *,
        model: str,
        max_tokens: int,
        request: Mapping[str, Any] | None = None,
        estimated_input_tokens: int | None = None,
        batch: bool = False,
        speed: str | None = None,
        inference_geo: str | None = None,
        **attributes: str,
    ) -> Lease:
        """Ask the daemon to admit one call before sending it; the Lease, or AdmissionRefused.

        Give the Messages API body as `request` (its input is bounded from its bytes, see `monitor.http.estimate`) or
        your own `estimated_input_tokens`, which must never be below what the call is billed for. Raises
        MonitorError (status None) when the daemon cannot be reached: your fail-open or fail-closed policy decides.
        """
        if estimated_input_tokens is None:
            if request is None:
                raise ValueError("pass request= (the Messages API body) or estimated_input_tokens=")
            estimated_input_tokens = input_token_bound(request)
        body = {
            "attributes": dict(attributes),
            "model": model,
            "max_tokens": max_tokens,
            "estimated_input_tokens": estimated_input_tokens,
            "batch": batch,
            "speed": speed,
            "inference_geo": inference_geo,
        }
        status, headers, answer = self._post("/v1/admit", body)
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("lease"), str):
            return Lease(
                answer["lease"],
                str(answer.get("reserved_usd")),
                _parse_time(answer.get("expires_at")),
                float(answer.get("renew_every_s") or 1),
            )
        refused = answer.get("refused_by") if isinstance(answer, dict) else None
        if status in (400, 429) and isinstance(refused, dict):
            assert isinstance(answer, dict)
            raise AdmissionRefused(
                str(answer.get("message")),
                status=status,
                kind=str(refused.get("kind")),
                name=str(refused.get("name")),
                retry_after=int(answer.get("retry_after") or 0),
                body=answer,
            )
        raise self._error("/v1/admit", status, headers, answer)

    def release(
        self, lease: Lease | str, *, request_id: str | None = None, usage: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Return a lease when its call ends, with the upstream request id and `usage` (the Messages API usage
        object; None for a call that failed without any). Settling twice is harmless: the second is a no-op.
        A lease the daemon no longer knows (expired long ago) answers {"settled_by": "unknown"}."""
        lease_id = lease.id if isinstance(lease, Lease) else lease
        body = {"lease": lease_id, "request_id": request_id, "usage": dict(usage) if usage is not None else None}
        status, headers, answer = self._post("/v1/release", body)
        if status == 200 and isinstance(answer, dict):
            return answer
        if status == 404:
            return {"lease": lease_id, "settled_by": "unknown"}
        raise self._error("/v1/release", status, headers, answer)

    def renew(self, lease: Lease | str) -> datetime | None:
        """Keep a running call's lease; its new expiry, or None when it has already ended (the call may finish)."""
        lease_id = lease.id if isinstance(lease, Lease) else lease
        status, headers, answer = self._post(f"/v1/admit/{lease_id}/renew", {})
        if status == 200 and isinstance(answer, dict):
            return _parse_time(answer.get("expires_at"))
        if status == 404:
            return None
        raise self._error("/v1/admit/<lease>/renew", status, headers, answer)

    def _post(self, path: str, body: Mapping[str, Any] | bytes) -> tuple[int, dict[str, str], Any]:
        encoded = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            status, headers, data = self._http.request(
                "POST", path, body=encoded, headers={"Content-Type": "application/json"}
            )
        except (OSError, http.client.HTTPException) as exc:
            raise MonitorError(f"POST {self.url}{path} failed: {_describe(exc)}") from exc
        return status, headers, _json_or_text(data)

    def _error(self, path: str, status: int, headers: Mapping[str, str], answer: Any) -> MonitorError:
        error = answer.get("error") if isinstance(answer, dict) else answer
        retry = headers.get("retry-after")
        return MonitorError(
            f"POST {self.url}{path} answered HTTP {status}: {error}",
            status=status,
            retry_after=int(retry) if retry and retry.isdigit() else None,
            body=answer,
        )


class _Connections:
    """Requests to the daemon over a pool of keep-alive connections, with the client's own headers."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        try:
            self._pool = ConnectionPool(url, timeout, max_idle=_MAX_IDLE_CONNECTIONS)
        except ValueError:
            raise ValueError(f"monitor url must be http://host:port or https://…, not {url!r}") from None
        self._headers = {"User-Agent": f"claude-monitor-client/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def request(
        self, method: str, path: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body); OSError / HTTPException when the daemon cannot be reached."""
        all_headers = {**self._headers, **(headers or {})}
        for attempt in range(2):
            connection, reused = self._pool.acquire()
            try:
                connection.request(method, self._pool.base_path + path, body=body, headers=all_headers)
                response = connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.BadStatusLine):
                connection.close()
                # An idle keep-alive connection the daemon closed: retry once on a new one. Safe for POST too,
                # since the daemon counts a request_id once.
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            answer_headers = {name.lower(): value for name, value in response.getheaders()}
            self._pool.release(connection, response)
            return response.status, answer_headers, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.close()


def _parse_state(document: Any, *, etag: str | None, obtained: float) -> _State:
    """A throttle-state document (the snapshot file, or GET /v1/throttle); ValueError when it is not one."""
    if not isinstance(document, dict):
        raise ValueError("throttle state is not a JSON object")
    version = document.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ValueError(f"throttle state version {version!r} is not an integer")
    raw_flags = _field(document, "flags", list)
    flags = []
    for i, raw in enumerate(raw_flags or ()):
        if not isinstance(raw, dict):
            raise ValueError(f"flags[{i}] is not an object")
        if raw.get("action", "block") != "block":
            continue  # only "block" stops a caller
        scope = _field(raw, "scope", dict) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in scope.items()):
            raise ValueError(f"flags[{i}].scope must map strings to strings")
        until = _parse_time(_field(raw, "until", str))
        budget = _field(raw, "budget", str)
        if not budget:
            raise ValueError(f"flags[{i}] has no budget")
        flags.append(_Flag(budget, scope, until, None if until is None else until.timestamp(), raw))
    generated = _parse_time(_field(document, "generated_at", str))
    index: dict[tuple[str, ...], dict[tuple[str, ...], list[_Flag]]] = {}
    for flag in flags:
        keys = tuple(sorted(flag.scope))
        index.setdefault(keys, {}).setdefault(tuple(flag.scope[key] for key in keys), []).append(flag)
    frozen = {keys: {values: tuple(group) for values, group in by.items()} for keys, by in index.items()}
    return _State(version, generated, tuple(flags), etag, obtained, frozen)


def _caller(model: str | None, attributes: Mapping[str, str]) -> dict[str, str]:
    caller = dict(attributes)
    if model is not None:
        caller["model"] = model
    return caller


def _field(document: Mapping[str, Any], key: str, kind: type) -> Any:
    value = document.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{key} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    moment = datetime.fromisoformat(text)  # ValueError on a bad one; 3.11 reads the trailing Z
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _as_dict(event: Any) -> dict[str, Any]:
    if isinstance(event, Mapping):
        return dict(event)
    dump = getattr(event, "model_dump", None)
    if dump is None:
        raise TypeError(f"not a stream event: {type(event).__name__}")
    result: dict[str, Any] = dump(mode="json")
    return result


def _stream_request_id(events: object) -> str | None:
    """The request-id header of an SDK Stream / MessageStream, if that is what `events` is."""
    found = getattr(events, "request_id", None)
    if isinstance(found, str) and found:
        return found
    headers = getattr(getattr(events, "response", None), "headers", None)
    value = headers.get("request-id") if headers is not None else None
    return value if isinstance(value, str) and value else None


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace").strip()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
