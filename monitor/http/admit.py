"""The proxy's side of admission: ask the daemon before a call is forwarded, keep its lease while it runs, settle it.

A call is admitted with `POST /v1/admit` (its identity, model, `max_tokens` and an upper bound of its input tokens
from the request's bytes, or with `proxy.count_tokens` Anthropic's count of them: monitor.http.count). The lease
goes into the call's usage event, which settles it when the daemon stores the event; when the event could not be
stored (the daemon away: it went to the spool), `POST /v1/release` returns the slot instead. While the call
runs, the lease is renewed every `renew_every_s` the daemon named (lease_ttl/3), so a stream longer than lease_ttl
keeps its slot; a proxy that dies stops renewing and its leases expire.

Refusals become answers in Anthropic's error shape: rate and concurrency 429 `rate_limit_error` with Retry-After
(the SDK may retry them), a per-call cap 400 `invalid_request_error` naming the cap and the value asked, a budget
429 with `x-should-retry: false`. When the daemon cannot answer, `proxy.fail_mode` decides: open forwards the call
without a lease, closed answers 429; either way the answer carries `X-Monitor-Fail-Mode` and the proxy's metrics
count it. Every call to the daemon is blocking HTTP, so it runs on a worker pool while the event loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from monitor.http.client import AdmissionRefused, Lease, MonitorClient, MonitorError
from monitor.http.estimate import input_token_bound
from monitor.http.server import off_loop
from monitor.metrics import ProxyMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
FAIL_MODE_HEADER = "x-monitor-fail-mode"
ADMIT_WORKERS = 16  # concurrent admit, renew and release requests to the daemon
MAX_TOKENS = 10_000_000  # what the daemon takes; a larger ask is over any cap (and the API refuses it anyway)
CLOSED_RETRY_AFTER = 5
_ADMIT_PARAMETERS = frozenset(
    {"model", "max_tokens", "request", "estimated_input_tokens", "batch", "speed", "inference_geo"}
)
_OUTCOME = {"rate": "rate_limited", "concurrency": "concurrency", "cap": "too_large", "budget": "budget"}


@dataclass(frozen=True)
class Denied:
    """A call admission stopped: the proxy answers it itself, in Anthropic's error shape."""

    status: int
    kind: str
    message: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Admitted:
    """A call that may go upstream: its lease (None when fail_mode open let it through without one) and the
    headers its answer carries."""

    lease: Lease | None
    headers: tuple[tuple[str, str], ...] = ()


class Gate:
    """Admits calls with the daemon, renews their leases while they run, and releases what their events did not."""

    def __init__(self, monitor: MonitorClient, fail_mode: Literal["open", "closed"], metrics: ProxyMetrics) -> None:
        self.monitor = monitor
        self.fail_mode = fail_mode
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(ADMIT_WORKERS, thread_name_prefix="proxy-admit")

    def close(self) -> None:
        """Stop the worker threads (after the server drained)."""
        self._pool.shutdown(wait=True)

    async def admit(
        self,
        request: Mapping[str, Any],
        model: str,
        attributes: Mapping[str, str],
        who: str,
        input_tokens: int | None = None,
    ) -> Admitted | Denied:
        """Ask the daemon for a lease for this Messages API body; what to do with the call. Its input is
        `input_tokens` when counted (proxy.count_tokens), else bounded from the body's bytes."""
        modifiers = {}
        for key in ("speed", "inference_geo"):  # they change the price: the worst case must know them
            value = request.get(key)
            modifiers[key] = value if isinstance(value, str) and len(value) <= 32 else None
        identity = {key: value for key, value in attributes.items() if key not in _ADMIT_PARAMETERS}

        def ask() -> Lease:
            return self.monitor.admit(
                model=model,
                max_tokens=_max_tokens(request),
                request=None,
                batch=False,  # the Messages API: batches go through /v1/messages/batches, not this route
                estimated_input_tokens=input_token_bound(request) if input_tokens is None else input_tokens,
                speed=modifiers["speed"],
                inference_geo=modifiers["inference_geo"],
                **identity,
            )

        try:
            lease = await off_loop(self._pool, ask)
        except AdmissionRefused as refused:
            return self._refused(refused, who)
        except MonitorError as exc:
            return self._unavailable(exc, who)
        self.metrics.admission.labels("admitted").inc()
        self.metrics.leases.inc()
        return Admitted(lease)

    def _refused(self, refused: AdmissionRefused, who: str) -> Denied:
        self.metrics.admission.labels(_OUTCOME.get(refused.kind, "rate_limited")).inc()
        log.info("POST /v1/messages %d %s: refused by %s %r: %s", refused.status, who, refused.kind, refused.name,
                 refused)  # fmt: skip
        message = str(refused)
        if refused.kind == "cap" or refused.status == 400:
            return Denied(400, "invalid_request_error", message, {})
        headers = {"retry-after": str(max(1, refused.retry_after or 1))}
        if refused.kind == "budget":
            headers["x-should-retry"] = "false"  # room comes back when calls settle or the window moves, not in backoff
        return Denied(429, "rate_limit_error", message, headers)

    def _unavailable(self, exc: MonitorError, who: str) -> Admitted | Denied:
        self.metrics.admission.labels("unavailable").inc()
        if self.fail_mode == "open":
            self.metrics.fail_mode.labels("admit", "allowed").inc()
            log.warning("%s: admission unavailable (%s); forwarding without a lease (fail_mode open)", who, exc)
            return Admitted(None, ((FAIL_MODE_HEADER, "open"),))
        self.metrics.fail_mode.labels("admit", "denied").inc()
        log.warning("%s: admission unavailable (%s); refusing (fail_mode closed)", who, exc)
        retry = exc.retry_after if exc.retry_after else CLOSED_RETRY_AFTER
        return Denied(
            429,
            "rate_limit_error",
            "claude-monitor cannot admit calls right now (fail_mode closed); retry later",
            {"retry-after": str(retry), FAIL_MODE_HEADER: "closed"},
        )

    def keep(self, admitted: Admitted) -> asyncio.Task[None] | None:
        """Renew the lease every `renew_every` seconds until the task is cancelled (when the call ends)."""
        if admitted.lease is None:
            return None
        return asyncio.create_task(self._renew(admitted.lease))

    async def _renew(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(lease.renew_every)
            try:
                expires = await off_loop(self._pool, lambda: self.monitor.renew(lease))
            except MonitorError as exc:  # the next renewal may reach it; the lease lasts lease_ttl meanwhile
                self.metrics.renewals.labels("failed").inc()
                log.warning("could not renew lease %s: %s", lease.id, exc)
                continue
            if expires is None:
                self.metrics.renewals.labels("ended").inc()
                log.warning("lease %s ended while its call still runs (expired?); the call goes on", lease.id)
                return
            self.metrics.renewals.labels("renewed").inc()

    async def end(
        self,
        admitted: Admitted,
        renewal: asyncio.Task[None] | None,
        settled: bool,
        request_id: str | None,
        usage: Mapping[str, Any] | None,
    ) -> None:
        """The call is over: stop renewing; release the lease unless its stored usage event `settled` it."""
        if renewal is not None:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
        lease = admitted.lease
        if lease is None:
            return
        self.metrics.leases.dec()
        if settled:
            return
        try:
            await off_loop(self._pool, lambda: self.monitor.release(lease, request_id=request_id, usage=usage))
        except MonitorError as exc:
            log.warning("could not release lease %s (%s); it returns its slot when it expires", lease.id, exc)


def _max_tokens(request: Mapping[str, Any]) -> int:
    """The call's `max_tokens` for admission; 0 when it is not a whole number (the API refuses such a call)."""
    value = request.get("max_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return min(value, MAX_TOKENS)
