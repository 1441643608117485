"""Composition root: builds the store, pricing, budgets and — for `serve` — the whole daemon from settings."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry, Gauge, Histogram
from sqlalchemy import Engine, delete, make_url, text

from monitor.alerts.notifier import Notifier
from monitor.budgets import BudgetIndex, compile_budgets
from monitor.budgets.admission import Admission, MemoryBounds
from monitor.budgets.engine import BudgetEngine, DefinitionChange
from monitor.budgets.limits import compile_limits
from monitor.budgets.shared_admission import SharedAdmission
from monitor.budgets.throttle import ThrottleState
from monitor.clock import Clock, system_clock
from monitor.config import ConfigError, HostPort, LoadedSettings, Settings, admission_in_database
from monitor.http.api import HTTP_SOURCE, Api, ApiApp
from monitor.http.server import BindError, HttpServer, ServerLimits
from monitor.ingest.parse import EventParser
from monitor.ingest.pipeline import Ingestor
from monitor.ingest.tally import Tallier
from monitor.ingest.watch import Watcher, follow
from monitor.ingest.worker import IngestProcess
from monitor.ingest.writer import Preparer, Writer
from monitor.leader import Leadership
from monitor.metric_names import JOB_DURATION_BUCKETS
from monitor.metrics import (
    AdmissionCollector,
    DefinitionsCollector,
    IngestQueueCollector,
    LeaderCollector,
    MonitorCollector,
    PriceCheckCollector,
    ReconcileCollector,
    SnapshotErrorsCollector,
    SourcesCollector,
    WindowCollector,
)
from monitor.pricing import PriceTable, load_price_table
from monitor.reconcile.models import ModelsApiError, ModelsClient, check
from monitor.reconcile.runner import Reconciler
from monitor.redaction import database_url
from monitor.store.db import create_db_engine, require_current_schema, schema_is_current, upgrade
from monitor.store.leases import settler_for
from monitor.store.models import budget_usage, dead_letters, events, usage_rollup
from monitor.store.partitions import drop_expired_events, partition_window, prepare_partitions
from monitor.store.reprice import Repricer

log = logging.getLogger(__name__)
TAIL_INTERVAL_S = 0.2
DELIVER_EVERY_S = 5


def build_price_table(loaded: LoadedSettings) -> PriceTable:
    """The shipped table with the config's overrides (checked against it when the config was loaded)."""
    return load_price_table(loaded.settings.pricing.models)


@dataclass
class Store:
    """An open, migrated store with the pieces that write to it and the budgets it counts toward."""

    settings: Settings
    engine: Engine
    prices: PriceTable
    parser: EventParser
    writer: Writer
    budgets: BudgetEngine
    ingestor: Ingestor  # writes through `writer`, then updates `budgets`' flags
    closing: list[Callable[[], None]] = field(default_factory=list)  # run first by close (e.g. stop a worker)

    def close(self) -> None:
        """Release every connection (a worker process's too)."""
        for close in self.closing:
            close()
        self.engine.dispose()


def open_store(
    loaded: LoadedSettings, clock: Clock = system_clock, migrate: bool = True, snapshot_file: Path | None = None
) -> Store:
    """Connect, bring the schema to head, and build the parse, price, write and budget path.

    With `migrate=False` nothing is written on opening: a missing database, or a schema not at head, raises
    SchemaNotCurrent (the read-only commands refuse rather than migrate).
    """
    settings = loaded.settings
    prices = build_price_table(loaded)
    if migrate:
        engine = create_db_engine(settings.database_url)
        upgrade(engine)
    else:
        engine = create_db_engine(settings.database_url, make_directory=False)
        try:
            require_current_schema(engine, database_url(settings.database_url))
        except BaseException:
            engine.dispose()
            raise
    parser = EventParser(settings.dimensions, clock)
    budgets = BudgetEngine(
        engine, compile_budgets(settings.budgets, prices), settings.zone, clock, ThrottleState(snapshot_file)
    )
    writer = Writer(
        engine,
        prices,
        clock,
        budgets=budgets.index,
        zone=settings.zone,
        metric_labels=settings.metrics.labels,
        max_values_per_label=settings.metrics.max_values_per_label,
        max_unpriced_models=settings.metrics.max_unpriced_models,
        partitions=partition_window(settings),
    )
    # A usage event settles its lease wherever it is stored (serve, its ingest worker, or ingest).
    writer.settle_leases = settler_for(settings)
    return Store(settings, engine, prices, parser, writer, budgets, Ingestor(writer, budgets))


def preparer_for(loaded: LoadedSettings) -> Preparer:
    """What prepares batches (in parse processes) exactly as `open_store(loaded)`'s writer writes them, made from
    the settings alone: the parse processes can start before the store is opened."""
    settings = loaded.settings
    prices = build_price_table(loaded)
    index = BudgetIndex(compile_budgets(settings.budgets, prices))
    tallier = Tallier(prices, settings.metrics.labels, index, settings.zone)
    dialect = make_url(settings.database_url).get_backend_name()
    return Preparer(prices, tallier, dialect, settler_for(settings) is not None)


def http_limits(settings: Settings) -> ServerLimits:
    """The HTTP server's bounds from the `http:` settings."""
    http = settings.http
    return ServerLimits(
        backlog=http.backlog,
        header_timeout=http.header_timeout.seconds,
        keepalive_timeout=http.keepalive_timeout.seconds,
        max_connections=http.max_connections,
        max_body_bytes=http.max_body_bytes,
    )


class Jobs:
    """Runs the scheduled tasks and keeps their Prometheus duration and last-success metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "claude_monitor_job_last_success_timestamp_seconds",
            "When each scheduled task last succeeded.",
            ["task"],
            registry=registry,
        )
        self.duration = Histogram(
            "claude_monitor_job_duration_seconds",
            "How long each scheduled task ran.",
            ["task"],
            registry=registry,
            buckets=JOB_DURATION_BUCKETS,
        )
        self.interval = Gauge(
            "claude_monitor_job_interval_seconds",
            "How often each scheduled task runs: its freshness is judged against this.",
            ["task"],
            registry=registry,
        )
        self.failures: dict[str, str] = {}
        self.succeeded_at: dict[str, float] = {}

    def every(self, task: str, seconds: float) -> None:
        """Record a task's schedule."""
        self.interval.labels(task).set(seconds)

    def run(self, task: str, job: Callable[[], Any]) -> bool:
        """Run one task now; a failure is logged and kept, never raised into the scheduler."""
        started = time.perf_counter()
        try:
            job()
        except Exception as exc:
            self.failures[task] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.error("task %s failed: %s", task, self.failures[task])
            return False
        finally:
            self.duration.labels(task).observe(time.perf_counter() - started)
        self.failures.pop(task, None)
        self.succeeded_at[task] = time.time()
        self.last_success.labels(task).set(self.succeeded_at[task])
        return True


def _kinds(changes: list[DefinitionChange]) -> list[tuple[str, str]]:
    return [(change.budget, change.change) for change in changes]


class Daemon:
    """`serve`: HTTP API, source tailers and scheduled jobs over one store."""

    def __init__(
        self,
        loaded: LoadedSettings,
        clock: Clock = system_clock,
        environ: dict[str, str] | None = None,
        *,
        tail_interval: float = TAIL_INTERVAL_S,
    ) -> None:
        from monitor.ingest.tail import Tailer

        env = os.environ if environ is None else environ
        self.settings = settings = loaded.settings
        self.clock = clock
        self.store = open_store(loaded, clock, snapshot_file=Path(settings.throttle.snapshot_file))
        self.budgets = self.store.budgets
        self.mismatched: list[DefinitionChange] = []  # how this replica's budgets differ from the stored ones
        self.registry = CollectorRegistry(auto_describe=True)
        self.tail_interval = tail_interval  # the poll's period; file events wake the tailers sooner
        self.tail_watcher: Watcher | None = None
        # Ingest parses, prices and writes in a worker process: checks and admits, decided on this interpreter's
        # event loop, do not wait for that CPU work. Tailed batches are written there too.
        self.ingest_process = IngestProcess(settings, clock) if settings.http.ingest_process else None
        if self.ingest_process is not None:  # evaluations read every scope there too: 100,000 of them take a while
            self.budgets.reader = self.ingest_process.read_budgets
            self.store.closing.append(self.ingest_process.close)
        self.collector = MonitorCollector(
            self.store.engine, self.budgets, settings.metrics.labels, self._lag, clock, models=self.store.prices.models
        )
        self.registry.register(self.collector)
        self.windows = WindowCollector(
            self.store.engine, settings.zone, settings.metrics.labels, self.store.prices.label, clock
        )
        self.registry.register(self.windows)
        self.registry.register(SnapshotErrorsCollector(self.budgets.throttle))
        sqlite = self.store.engine.dialect.name == "sqlite"
        admission_args = (
            compile_limits(settings.limits, self.store.prices),
            self.budgets.index,
            self.store.prices,
            self.store.parser,
            self.store.engine,
            settings.zone,
            clock,
            settings.admission.lease_ttl.delta,
            settings.admission.max_open_leases,
        )
        if admission_in_database(settings):  # replicas share leases through the database (the writer settles them)
            self.admission: Admission = SharedAdmission(*admission_args)
            self.store.closing.append(self.admission.close)  # its own pool closes with the store
        else:
            self.admission = Admission(
                *admission_args,
                # SQLite: every batch goes through this process, so the spend it keeps is exact. Replicas on
                # PostgreSQL ingest elsewhere too: spend is read again once it is an evaluation period old.
                spend_max_age=None if sqlite else settings.schedule.evaluate_every.delta,
                bounds=MemoryBounds(
                    settings.admission.max_buckets,
                    settings.admission.max_spend_scopes,
                    settings.admission.max_settled_remembered,
                ),
            )
        # Every source writes through this one: flags and admission follow each committed batch.
        self.ingestor = Ingestor(self.ingest_process or self.store.writer, self.budgets, self.admission)
        self.tailers = [
            Tailer(source, self.store.parser, self.ingestor, self.store.engine, clock) for source in settings.sources
        ]
        self.registry.register(AdmissionCollector(self.admission))
        self.registry.register(DefinitionsCollector(lambda: self.mismatched))
        self.jobs = Jobs(self.registry)
        self.every = settings.schedule.evaluate_every.delta
        self.reconciler = Reconciler(
            self.store.engine,
            self.store.prices,
            settings.reconcile,
            clock,
            env.get(settings.reconcile.admin_key_env) or None,
        )
        self.reconcile_every = settings.reconcile.every.delta
        self.reconcile_metrics = ReconcileCollector(
            self.reconciler, self.store.prices.label, self.reconcile_every.total_seconds()
        )
        self.registry.register(self.reconcile_metrics)
        # Which models the account can call against what the table prices: run by the leader when a key is set.
        self.price_check_key = env.get(settings.pricing.check.api_key_env) or None
        self.price_check_every = settings.pricing.check.every.delta
        self.price_table_missing: int | None = None  # as of the last check this replica ran
        self.registry.register(PriceCheckCollector(lambda: self.price_table_missing))
        http = settings.http
        token = env.get(http.ingest_token_env) or None
        if token is None:
            log.warning("$%s is not set: POST /v1/usage answers 401 until it is", http.ingest_token_env)
        served = [(tailer.source.label, tailer.source.type) for tailer in self.tailers]
        self.registry.register(SourcesCollector(served + ([(HTTP_SOURCE, "http")] if token else [])))
        read_token = env.get(http.read_token_env) or None if http.read_token_env else None
        if http.read_token_env and read_token is None:
            log.warning(
                "http.read_token_env is %s but $%s is empty: /v1/check, /v1/throttle and /v1/budgets are open",
                http.read_token_env,
                http.read_token_env,
            )
        self.api = Api(
            parser=self.store.parser,
            ingestor=self.ingestor,
            budgets=self.budgets,
            prices=self.store.prices,
            dimensions=settings.dimensions,
            token=token,
            token_env=http.ingest_token_env,
            max_body_bytes=http.max_body_bytes,
            registry=self.registry,
            clock=clock,
            readiness=self.readiness,
            max_events_per_request=http.max_events_per_request,
            group_commit_max_events=http.group_commit_max_events,
            check_require=http.check_require,
            read_token=read_token,
            read_token_env=http.read_token_env,
            admission=self.admission,
        )
        # SQLite serialises writers: one ingest thread (each of its transactions holding every request that waited
        # meanwhile) instead of several spinning on the file lock.
        limits = http_limits(settings)
        self.app = ApiApp(
            self.api,
            ingest_workers=1 if sqlite else 4,
            body_timeout=limits.header_timeout,  # a body that stalls is held no longer than headers may be
            worker=self.ingest_process,
        )
        self.registry.register(IngestQueueCollector(lambda: self.app.ingest_queue))
        self.server = self._listen(self.app, "listen", http.listen)
        self.ops_app: ApiApp | None = None
        self.ops_server: HttpServer | None = None
        if http.metrics_listen:
            self.ops_app = ApiApp(self.api, ops_only=True)
            try:
                self.ops_server = self._listen(self.ops_app, "metrics_listen", http.metrics_listen)
            except ConfigError:
                self.server.stop()
                raise
        self.notifier = Notifier(
            self.store.engine,
            settings.alerts.webhooks,
            self.budgets.budgets,
            settings.zone,
            generator_url="http://{}:{}/v1/budgets".format(*self.address),
            digest_every=settings.alerts.digest_every.delta,
        )
        self.leadership = Leadership(self.store.engine)
        self.registry.register(LeaderCollector(lambda: self.leadership.leading))
        self.scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"misfire_grace_time": 60, "coalesce": True, "max_instances": 1}
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._heads_ok = True

    def _listen(self, app: ApiApp, key: str, listen: HostPort) -> HttpServer:
        try:
            return HttpServer(app, listen.host, listen.port, http_limits(self.settings), key)
        except BindError as exc:
            self.store.close()
            raise ConfigError(
                f"http.{key} {listen}: cannot listen there: {str(exc).rpartition(': ')[2]} "
                f"(another claude-monitor running? choose another port)"
            ) from None

    @property
    def address(self) -> tuple[str, int]:
        """Where the HTTP API listens (the port is real even when configured as 0)."""
        return self.server.address

    # --- jobs ------------------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """The scheduled evaluation: recount from the store, refresh metrics, rewrite the snapshot."""
        # Every replica asks at every evaluation: a follower takes over within one period of the leader's death, and
        # the leader gauge is never older than that.
        leading = self.leadership.is_leader()
        # Leases not renewed return their slots even when no call comes to notice. State in memory is this replica's
        # own: it sweeps it. State in the database is shared: the leader sweeps it, once, not every replica (an
        # admit never counts an expired hold, so a sweep that waits for the next leader frees nothing late).
        if leading or not self.admission.in_database:
            self.admission.sweep()
        try:
            self.definitions()
            self.budgets.evaluate(self.admission)
            self.collector.refresh()
            self.windows.refresh()
        except Exception:
            self.budgets.failing = True
            raise
        self.budgets.failing = False
        self.jobs.run("notify", self._notify)

    def definitions(self) -> None:
        """Apply the config's budget definitions if they differ from the stored ones — on the leader only.

        Another replica whose config differs touches nothing: it lists the differences (/readyz, a metric) and does
        not count its events toward the budgets it disagrees on, whose counts the leader keeps.
        """
        changes = self.budgets.pending_definition_changes()
        if changes and self.leadership.is_leader():
            for change in changes:
                log.warning("applying the configured budgets: %s", change.describe())
            self.budgets.apply_definitions()
            changes = []
        elif changes and _kinds(changes) != _kinds(self.mismatched):
            log.warning(
                "this replica's config differs from the budget definitions in the database; the leader's stand and "
                "this replica does not count toward these budgets: %s",
                "; ".join(change.describe() for change in changes),
            )
        if _kinds(changes) != _kinds(self.mismatched):
            skip = {change.budget for change in changes}
            index = BudgetIndex([b for b in self.budgets.budgets if b.name not in skip])
            self.store.writer.set_budgets(index)
            if self.ingest_process is not None:
                self.ingest_process.set_budgets(index)
        self.mismatched = changes

    def _notify(self) -> None:
        last = self.budgets.last
        if self.notifier.enabled and last is not None and self.leadership.is_leader():
            self.notifier.evaluate(self.budgets.states(), last.at)

    def deliver(self) -> None:
        """The delivery job (leader only): send due notices; receivers that are down wait for their backoff."""
        if self.leadership.is_leader():
            self.notifier.deliver(self.clock())

    def retention(self) -> None:
        """Drop raw events and dead letters past retention, budget buckets no window can reach, and rollup buckets
        past their own, longer retention (leader only)."""
        if not self.leadership.is_leader():
            return
        now = self.clock()
        cutoff = now - timedelta(days=self.settings.schedule.retention_days)
        longest = max([timedelta(days=32), *(b.window.span for b in self.budgets.budgets if b.window.span)])
        # Keep the window before the current one too: the notifier reads its final spend when it resolves.
        keep_buckets_from = now - 2 * longest
        if self.store.engine.dialect.name == "postgresql":  # whole months go; then next months are made ready
            drop_expired_events(self.store.engine, cutoff)
            prepare_partitions(self.store.engine, now, partition_window(self.settings))
        with self.store.engine.begin() as connection:
            if self.store.engine.dialect.name != "postgresql":
                connection.execute(delete(events).where(events.c.ts < cutoff))
            connection.execute(delete(dead_letters).where(dead_letters.c.received_at < cutoff))
            connection.execute(delete(budget_usage).where(budget_usage.c.bucket_start < keep_buckets_from))
            rollup_cutoff = now - timedelta(days=self.settings.schedule.rollup_retention_days)
            connection.execute(delete(usage_rollup).where(usage_rollup.c.bucket_start < rollup_cutoff))

    def reconcile(self) -> None:
        """The reconcile job (leader only): fetch Anthropic's figures for the lookback window, store and compare them.
        A failure (Anthropic away, key refused) is logged and leaves the stored figures as they were; the metrics'
        last-success time then ages, which is what the alert watches. It does not make this replica unready."""
        if not self.leadership.is_leader():
            return
        try:
            self.reconciler.run()
        except Exception as exc:
            log.error(
                "task reconcile failed: %s: %s", exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else ""
            )
        self.reconcile_metrics.refresh()

    def reprice(self) -> None:
        """Price the stored unpriced events whose model the table now knows (leader only; each event once, whoever
        runs it). At start, before the first evaluation, so budgets and metrics include that spend from then on."""
        if not self.leadership.is_leader():
            return
        try:
            result = Repricer(
                self.store.engine,
                self.store.prices,
                budgets=self.budgets.index,
                zone=self.settings.zone,
                metric_labels=self.settings.metrics.labels,
            ).run()
        except Exception as exc:
            log.error("re-pricing failed: %s: %s", exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
            return
        if result.repriced:
            log.warning(
                "priced %d stored events the price table did not know before (%s)",
                result.repriced,
                ", ".join(f"{name}: {count}" for name, (count, _) in sorted(result.by_model.items())),
            )

    def price_check(self) -> None:
        """The price-check job (leader only): ask Anthropic's Models API which models the account can call and count
        those the table cannot price. A failure is logged and keeps the last count."""
        if self.price_check_key is None:
            return
        if not self.leadership.is_leader():
            self.price_table_missing = None  # the leader's count is the one exported: no stale one from a former leader
            return
        client = ModelsClient(self.price_check_key, self.settings.pricing.check.base_url)
        try:
            listed = check(self.store.prices, client.list())
        except ModelsApiError as exc:
            log.error("task price_check failed: %s", exc)
            return
        finally:
            client.close()
        missing = [model for model in listed if not model.priced]
        self.price_table_missing = len(missing)
        if missing:
            log.warning(
                "the price table cannot price %d model(s) the account can call: %s; add them under pricing.models "
                "or upgrade claude-monitor (`claude-monitor prices --check` lists them)",
                len(missing),
                ", ".join(model.id for model in missing),
            )

    def tail_once(self) -> None:
        """Poll every source once; one failing source does not hold up the others."""
        failed = []
        for tailer in self.tailers:
            try:
                tailer.poll()
            except Exception as exc:
                failed.append(f"{tailer.label}: {exc.__class__.__name__}: {exc}")
        if failed:
            raise RuntimeError("; ".join(failed))

    def _lag(self) -> dict[str, float]:
        return {tailer.source.label: tailer.lag_seconds() for tailer in self.tailers}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = database reachable, schema at head, first evaluation done, jobs fresh."""
        problems = []
        try:
            with self.store.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"database unreachable: {exc.__class__.__name__}")
        if not self._heads_ok:
            problems.append("schema is not at the migrations' head")
        last = self.budgets.last
        if last is None:
            problems.append("first evaluation not done")
        else:
            age = (self.clock() - last.at).total_seconds()
            if age > max(3 * self.every.total_seconds(), 30):
                problems.append(f"last successful evaluation was {age:.0f} s ago")
        for task, failure in self.jobs.failures.items():
            problems.append(f"task {task} failing: {failure}")
        # Not a problem for readiness: the replica answers from the leader's counts; listed for the operator.
        differs = [change.describe() for change in self.mismatched]
        return not problems, {"problems": problems, "budget_definitions_differ": differs}

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Apply changed budget definitions (leader), evaluate once, then start HTTP, the tailers and the schedule."""
        if self.ingest_process is not None:
            self.ingest_process.start()  # it imports and opens the store meanwhile
        self._heads_ok = schema_is_current(self.store.engine)
        self.jobs.every("evaluate", self.every.total_seconds())
        self.jobs.every("notify", self.every.total_seconds())  # runs after each evaluation
        self.jobs.every("retention", 3600)
        if self.notifier.enabled:
            self.jobs.every("deliver", DELIVER_EVERY_S)
        if self.tailers:
            self.jobs.every("tail", self.tail_interval)
        self.reprice()  # events of models the table did not know before: priced before the first evaluation
        self.jobs.run("evaluate", self.evaluate)  # the leader applies changed budget definitions first
        self.scheduler.add_job(
            self.jobs.run,
            "interval",
            args=["evaluate", self.evaluate],
            seconds=self.every.total_seconds(),
            id="evaluate",
        )
        self.scheduler.add_job(self.jobs.run, "interval", args=["retention", self.retention], hours=1, id="retention")
        # Every replica renders the reconcile gauges from the database; only the leader fetches, when it has the key.
        self.jobs.run("reconcile_metrics", self.reconcile_metrics.refresh)
        self.scheduler.add_job(
            self.jobs.run,
            "interval",
            args=["reconcile_metrics", self.reconcile_metrics.refresh],
            minutes=1,
            id="reconcile_metrics",
        )
        if self.reconciler.enabled:
            self.scheduler.add_job(
                self.reconcile,
                "interval",
                seconds=self.reconcile_every.total_seconds(),
                id="reconcile",
                next_run_time=datetime.now(UTC) + timedelta(minutes=1),  # the first run soon after start, off its path
            )
        if self.price_check_key is not None:
            self.scheduler.add_job(
                self.price_check,
                "interval",
                seconds=self.price_check_every.total_seconds(),
                id="price_check",
                # Soon after start (the first evaluation has asked for leadership by then), off its path.
                next_run_time=datetime.now(UTC) + timedelta(seconds=5),
            )
        if self.notifier.enabled:
            self.scheduler.add_job(
                self.jobs.run, "interval", args=["deliver", self.deliver], seconds=DELIVER_EVERY_S, id="deliver"
            )
        self.scheduler.start()
        self.server.start()
        if self.ops_server is not None:
            self.ops_server.start()
            log.info("metrics and health on http://%s:%d", *self.ops_server.address)
        if self.tailers:
            self.tail_watcher = Watcher.open([tailer.pattern for tailer in self.tailers])
            self._spawn("tail", self._tail_loop)
        log.info("serving on http://%s:%d", *self.address)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _tail_loop(self) -> None:
        follow(lambda: self.jobs.run("tail", self.tail_once), self.tail_watcher, self._stop, self.tail_interval)

    def stop(self) -> None:
        """Drain: stop accepting, let in-flight batches finish, write the snapshot, close the store."""
        self._stop.set()
        if self.tail_watcher is not None:
            self.tail_watcher.wake()
        self.api.draining = True  # an ingest request that has not started yet gets 503
        # No new connections; idle ones close; requests in flight finish (their batches commit).
        if not self.server.stop(drain_timeout=30):
            log.warning("requests still in flight after 30 s; stopping anyway")
        self.app.close()
        if self.ops_server is not None and self.ops_app is not None:
            self.ops_server.stop(drain_timeout=5)
            self.ops_app.close()
        for thread in self._threads:
            thread.join(timeout=30)
        self.scheduler.shutdown(wait=True)
        for tailer in self.tailers:
            tailer.close()
        if self.ingest_process is not None:
            self.ingest_process.close()
        if self.tail_watcher is not None:
            self.tail_watcher.close()
        try:
            self.budgets.throttle.write_snapshot(self.clock())
        finally:
            self.leadership.release()
            self.admission.close()
            self.store.close()
