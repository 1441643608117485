"""The `claude-monitor` command line: JSON on stdout for scripts, progress and errors on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from monitor import report as report_mod
from monitor.budgets.engine import DefinitionChange, state_json
from monitor.budgets.windows import Calendar, calendar_window
from monitor.clock import system_clock
from monitor.config import ConfigError, LoadedSettings, load_settings
from monitor.explain import explain, reconcile_explained
from monitor.ingest.ahead import PARSE_AHEAD_MIN_BYTES, ParseAhead, parse_processes
from monitor.ingest.files import ingest_files, settle_for_bulk
from monitor.ingest.parse import EventParser
from monitor.ingest.pipeline import Ingestor
from monitor.pricing import format_usd
from monitor.redaction import Redactor, database_url, webhook_url
from monitor.service import Store, build_price_table, open_store, preparer_for
from monitor.store.db import SchemaNotCurrent
from monitor.store.models import budget_definitions, events
from monitor.wire import iso_z, scope_text

log = logging.getLogger("monitor")


class UsageError(Exception):
    """A command-line argument that cannot be used."""


def _settings(args: argparse.Namespace) -> LoadedSettings:
    loaded = load_settings(Path(args.config) if args.config else None)
    redact: Redactor | None = getattr(args, "redact", None)
    if redact is not None:
        redact.add_settings(loaded.settings)  # from here on, logs and errors hide this config's secrets
    return loaded


def _parse_when(text: str, zone: ZoneInfo, flag: str) -> datetime:
    """RFC 3339, or a bare date meaning its midnight in the configured timezone."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=zone).astimezone(UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: not a date (2026-11-01) or RFC 3339 time (2026-11-01T00:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and explain it; say what it would change against the stored budget definitions."""
    loaded = _settings(args)
    prices = build_price_table(loaded)
    changes, note = _stored_definition_changes(loaded)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "ok": True,
                    "path": str(loaded.path) if loaded.path else None,
                    "env_overrides": list(loaded.env_overrides),
                    "settings": _shown_settings(loaded),
                    "reconcile": reconcile_explained(loaded.settings.reconcile),
                    "budget_definitions": {
                        "compared": changes is not None,
                        "note": note,
                        "changes": [change.as_dict() for change in changes or []],
                    },
                },
                indent=2,
            )
        )
    else:
        sys.stdout.write(explain(loaded, prices))
        sys.stdout.write(_definitions_text(changes, note))
        print("config OK")
    return 0


def _stored_definition_changes(loaded: LoadedSettings) -> tuple[list[DefinitionChange] | None, str]:
    """How the config's budgets differ from the database's, read without writing; None and why when it cannot tell.

    A database that is missing, behind or unreachable is no error here: check-config checks the config.
    """
    shown = database_url(loaded.settings.database_url)
    try:
        store = open_store(loaded, migrate=False)
    except SchemaNotCurrent as exc:
        return None, f"not compared with the stored budget definitions: {exc}"
    except SQLAlchemyError as exc:
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None, f"not compared with the stored budget definitions: {shown} did not answer ({reason})"
    try:
        return store.budgets.pending_definition_changes(), f"compared with the budget definitions stored in {shown}"
    except SQLAlchemyError as exc:
        return None, f"not compared with the stored budget definitions: {shown}: {exc.__class__.__name__}"
    finally:
        store.close()


def _definitions_text(changes: list[DefinitionChange] | None, note: str) -> str:
    """check-config's paragraph on the stored budget definitions."""
    lines = ["", "Budget definitions", f"  {note}"]
    if changes is not None and not changes:
        lines.append("  no change: the database counts exactly these budgets")
    for change in changes or []:
        since = iso_z(change.since)
        if change.change == "new":
            lines.append(f"  new budget {change.budget}: on the next serve start the leader will count it from {since}")
        elif change.change == "changed":
            lines.append(
                f"  changed budget {change.budget} (match, per, window or bucket): on the next serve start the leader "
                f"will recount it from {since}"
            )
        else:
            lines.append(
                f"  removed budget {change.budget}: on the next serve start the leader would drop its counts "
                f"({change.rows:,} budget_usage rows)"
            )
    if changes:
        lines.append("  (no command but serve's leader, or an explicit `ingest --recount`, applies these)")
    return "\n".join(lines) + "\n"


def _shown_settings(loaded: LoadedSettings) -> dict[str, object]:
    """The settings as JSON, with the database password and the webhook paths hidden."""
    shown = loaded.settings.model_dump(mode="json")
    shown["database_url"] = database_url(loaded.settings.database_url)
    for hook in shown["alerts"]["webhooks"]:
        hook["url"] = webhook_url(hook["url"])
    return shown


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the schema to head."""
    store = open_store(_settings(args))
    store.close()
    print(f"schema at head: {database_url(store.settings.database_url)}", file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """One-shot backfill of JSONL files; budget state is rewritten only with --recount."""
    loaded = _settings(args)
    paths = [Path(p) for p in args.files]
    ahead: ParseAhead | None = None
    if _parse_ahead(args.parse_process, paths):
        # Started first: their interpreters start while this one opens and migrates the store.
        readable = [path for path in paths if path.exists()]
        parser = EventParser(loaded.settings.dimensions, system_clock)
        ahead = ParseAhead(readable, parser, preparer_for(loaded), args.batch_size) if readable else None
    try:
        return _ingest(args, loaded, paths, ahead)
    finally:
        if ahead is not None:
            ahead.close()


def _ingest(args: argparse.Namespace, loaded: LoadedSettings, paths: list[Path], ahead: ParseAhead | None) -> int:
    store = open_store(loaded)
    try:
        changes = store.budgets.pending_definition_changes()
        if changes and args.recount:
            for change in changes:
                print(f"--recount: {change.describe()}", file=sys.stderr)
            store.budgets.apply_definitions()
        elif changes and _nothing_counted(store):
            store.budgets.apply_definitions()  # a new database: recording the definitions rewrites nothing
        elif changes:
            print(_definitions_refusal(store, changes), file=sys.stderr)
            return 2
        settle_for_bulk()
        result, failed = ingest_files(
            paths,
            store.parser,
            # A one-shot backfill: no proxy reads this process's flags; the daemon's next evaluation counts it all.
            Ingestor(store.writer),
            batch_size=args.batch_size,
            on_error=lambda message: print(f"error: {message}", file=sys.stderr),
            parse_ahead=ahead if ahead is not None else False,
        )
    finally:
        store.close()
    summary = {**result.as_dict(), "attributes_dropped": result.attributes_dropped}
    if args.format == "json":
        print(json.dumps(summary))
    else:
        print(
            f"accepted {result.accepted:,}  duplicates {result.duplicates:,}  rejected {result.rejected:,}  "
            f"unpriced {result.unpriced:,}  (attribute values dropped: {result.attributes_dropped:,})"
        )
        if result.rejected:
            print("rejected lines are in the dead_letters table with their reason and raw text")
    return 1 if failed else 0


def _parse_ahead(asked: bool | None, paths: list[Path]) -> bool:
    """Whether `ingest` runs parse processes: as asked, else when the files are big enough to repay starting them
    and there is a core to run them on."""
    if asked is not None:
        return asked
    size = 0
    for path in paths:
        try:
            size += path.stat().st_size
        except OSError:
            continue  # ingest_files says which files it cannot read
    return size >= PARSE_AHEAD_MIN_BYTES and parse_processes() > 1


def _nothing_counted(store: Store) -> bool:
    """True for a database that holds no events and no budget definitions yet."""
    with store.engine.connect() as connection:
        has_events = connection.execute(select(events.c.request_id).limit(1)).first() is not None
        has_definitions = connection.execute(select(budget_definitions.c.budget).limit(1)).first() is not None
    return not has_events and not has_definitions


def _definitions_refusal(store: Store, changes: list[DefinitionChange]) -> str:
    """Why a command will not run with a config whose budgets differ from the database's, and what to do."""
    listed = "".join(f"\n  {change.describe()}" for change in changes)
    return (
        f"claude-monitor: the config's budgets differ from the definitions stored in "
        f"{database_url(store.settings.database_url)}, whose counts the running daemon uses:{listed}\n"
        "nothing was ingested. Use the config the daemon runs with; or change the daemon's config and restart it "
        "(its leader applies the new definitions); or rerun with --recount to rewrite these budgets' counts now."
    )


def cmd_report(args: argparse.Namespace) -> int:
    """The spend table."""
    loaded = _settings(args)
    settings = loaded.settings
    allowed = ["model", *settings.dimensions]
    by = [key.strip() for key in args.by.split(",") if key.strip()] if args.by else []
    for key in by:
        if key not in allowed:
            raise UsageError(f"--by {key!r}: not a dimension; choose from {', '.join(allowed)}")
    zone = settings.zone
    window = args.window or ("all" if args.since or args.until else "month")
    since = until = None
    if window != "all":
        since, until = calendar_window(cast(Calendar, window), system_clock(), zone)
    if args.since:
        since = _parse_when(args.since, zone, "--since")
    if args.until:
        until = _parse_when(args.until, zone, "--until")
    if since and until and since >= until:
        raise UsageError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    store = open_store(loaded, migrate=False)
    try:
        built = report_mod.build_report(store.engine, since=since, until=until, by=by)
    finally:
        store.close()
    if args.format == "json":
        print(report_mod.to_json(built))
    elif args.format == "csv":
        sys.stdout.write(report_mod.to_csv(built))
    else:
        sys.stdout.write(report_mod.to_table(built, settings.timezone))
    return 0


def _cents(amount: str) -> str:
    return f"{Decimal(amount).quantize(Decimal('0.01'), ROUND_HALF_EVEN):,}"


def cmd_budgets(args: argparse.Namespace) -> int:
    """Every budget: spend, limit, utilization, forecast, window end, throttled — evaluated from the store now.

    Reads only. Budgets the config defines differently from the database are left out, with a warning: their stored
    counts were made for another definition.
    """
    store = open_store(_settings(args), migrate=False)
    try:
        changes = store.budgets.pending_definition_changes()
        store.budgets.evaluate()
        now = system_clock()
        flags = store.budgets.throttle.flags
        differ = {change.budget for change in changes}
        rows = [state_json(s, flags, now) for s in store.budgets.states() if s.budget.name not in differ]
    finally:
        store.close()
    for change in changes:
        print(f"claude-monitor: warning: {change.describe()}; not shown", file=sys.stderr)
    if changes:
        print(
            "claude-monitor: warning: this config's budgets differ from the database's (above); the running "
            "daemon's view is at GET /v1/budgets, and `claude-monitor check-config` explains the difference",
            file=sys.stderr,
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["budget", "scope", "window", "spend USD", "limit", "used", "forecast USD", "window end", "throttled"]
    body = []
    for row in rows:
        limit = f"${_cents(row['limit_usd'])}" if row["limit_usd"] is not None else f"{row['limit']:,} {row['measure']}"
        body.append(
            [
                row["budget"],
                scope_text(row["scope"], ","),
                row["window"],
                _cents(row["spend_usd"]),
                limit,
                f"{row['utilization']:.1%}",
                _cents(row["forecast_usd"]),
                row["window_end"],
                "yes" if row["throttled"] else "no",
            ]
        )
    if not body:
        print("no budgets configured (see `budgets:` in the config)")
        return 0
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    for line in [headers, *body]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The daemon: runs until SIGTERM or SIGINT, then drains and exits 0."""
    from monitor.http.server import settle_heap
    from monitor.service import Daemon
    from monitor.signals import StopSignals

    loaded = _settings(args)
    logging.getLogger("monitor").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    daemon = Daemon(loaded)
    signals = StopSignals()
    daemon.start()
    settle_heap()
    host, port = daemon.address
    print(
        f"claude-monitor serving on http://{host}:{port} (config: {loaded.path or 'built-in defaults'})",
        file=sys.stderr,
        flush=True,
    )
    log.info("%s received: draining", signals.wait())
    daemon.stop()
    log.info("stopped cleanly")
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    """The reference Claude proxy: runs until SIGTERM or SIGINT, then exits 0."""
    from monitor.http.proxy import run_proxy

    loaded = _settings(args)
    logging.getLogger("monitor").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return run_proxy(loaded, build_price_table(loaded))


def cmd_simulate(args: argparse.Namespace) -> int:
    """Synthetic traffic of a language-learning app, to files."""
    from monitor import simulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.explain and not args.admit:
        raise UsageError("--explain tells what admission refused: it needs --live --admit URL")
    if args.admit and not args.live:
        raise UsageError("--admit URL: only live traffic can ask the daemon before each call; add --live")
    if args.live and args.admit:
        return _simulate_admitted(args, out / "usage-live.jsonl")
    if args.live:
        import time

        count = simulate.run_live(
            rate=args.rate,
            duration_s=args.duration,
            out_path=out / "usage-live.jsonl",
            seed=args.seed,
            clock=system_clock,
            sleep=time.sleep,
            users=args.users,
        )
        print(json.dumps({"events": count, "files": [str(out / "usage-live.jsonl")]}))
        return 0
    count = args.count if args.count is not None else int(args.rate * args.duration)
    end = _parse_when(args.end, ZoneInfo("UTC"), "--end") if args.end else system_clock()
    start = end - timedelta(seconds=args.duration)
    lines = simulate.generate_events(
        count=count,
        start=start,
        end=end,
        seed=args.seed,
        users=args.users,
        duplicate_fraction=args.duplicates,
        bad_fraction=args.bad,
    )
    paths = simulate.write_files(lines, out, lines_per_file=args.lines_per_file)
    print(json.dumps({"events": count, "files": [str(p) for p in paths]}))
    return 0


def _simulate_admitted(args: argparse.Namespace, out_path: Path) -> int:
    """Live traffic whose every call asks the daemon at --admit first; its outcome, or with --explain, in words."""
    import time

    from monitor import simulate
    from monitor.client import MonitorClient, MonitorError

    loaded = _settings(args)
    settings = loaded.settings
    token_env = settings.http.ingest_token_env
    token = os.environ.get(token_env)
    if not token:
        raise UsageError(f"--admit: ${token_env} (http.ingest_token_env) must hold the daemon's ingest token")
    explained = [b for b in settings.budgets if b.per and b.limit_usd is not None and b.throttle_at is not None]
    if args.explain and not explained:
        raise UsageError("--explain: the config has no per: budget in dollars with throttle_at to explain")
    try:
        client = MonitorClient(args.admit, token=token, background=False)
    except (MonitorError, OSError) as exc:
        raise UsageError(f"--admit {args.admit}: {exc}") from None
    try:
        outcome = simulate.run_admitted(
            rate=args.rate,
            duration_s=args.duration,
            out_path=out_path,
            client=client,
            seed=args.seed,
            clock=system_clock,
            sleep=time.sleep,
            users=args.users,
        )
    finally:
        client.close()
    if not args.explain:
        print(json.dumps({**outcome.to_json(), "files": [str(out_path)]}))
        return 0
    store = open_store(loaded, migrate=False)
    try:
        # The daemon's tailer reads the admitted calls' lines a moment after they are written: wait until the
        # store holds them all, so the spend below is the whole live phase.
        deadline = time.monotonic() + args.wait
        while True:
            stored = report_mod.build_report(store.engine, since=outcome.started, until=None, by=[])
            have = sum(row.counts["requests"] for row in stored.rows)
            if have >= outcome.admitted:
                break
            if time.monotonic() > deadline:
                print(
                    f"claude-monitor: the store holds {have} of the {outcome.admitted} admitted live calls after "
                    f"--wait {args.wait:g} s (is the daemon tailing {out_path}?)",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
        for budget in explained:
            rows = simulate.refused_learners(outcome, budget, store.engine, settings.zone)
            sys.stdout.write(simulate.explain_live(outcome, budget, rows, args.duration))
    finally:
        store.close()
    return 0


def _utc_day(text: str, flag: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: not a UTC date (YYYY-MM-DD, e.g. 2026-11-01)") from None


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Fetch Anthropic's daily figures for the range, store them, and compare them with ours (exit 4: Anthropic
    unreachable or the key refused; nothing is written then)."""
    from monitor.reconcile.compare import to_json, to_table
    from monitor.reconcile.fetcher import EARLIEST, AnalyticsError
    from monitor.reconcile.runner import NoAdminKey, Reconciler

    loaded = _settings(args)
    config = loaded.settings.reconcile
    key = os.environ.get(config.admin_key_env) or None
    if key is None:
        raise ConfigError(str(NoAdminKey(config.admin_key_env)))
    args.redact.add_secret(key, "sk-ant-…(reconcile admin key)")
    store = open_store(loaded)
    try:
        reconciler = Reconciler(store.engine, store.prices, config, system_clock, key)
        first, end = reconciler.default_range()
        if args.since:
            first = _utc_day(args.since, "--since")
        if args.until:
            end = _utc_day(args.until, "--until")
        if first < EARLIEST:
            raise UsageError(f"--since {first}: Anthropic's usage and cost reports start at {EARLIEST}")
        if first >= end:
            raise UsageError(f"--since {first} is not before --until {end} (the --until day is not included)")
        try:
            reconciler.fetch(first, end)
        except AnalyticsError as exc:
            print(f"claude-monitor: {args.redact(str(exc))}; nothing was written", file=sys.stderr)
            return 4
        rows = reconciler.compare(first, end)
    finally:
        store.close()
    sys.stdout.write(to_json(rows) + "\n" if args.format == "json" else to_table(rows))
    return 0


def cmd_prices(args: argparse.Namespace) -> int:
    """The price table (name, aliases, rates by date, modifiers, source); with --check, the models Anthropic's Models
    API lists that it cannot price (exit 1 when any, 4 when the API cannot be reached)."""
    from monitor.pricing import builtin_models
    from monitor.pricing.listing import listing, to_table
    from monitor.reconcile.models import ModelsApiError, ModelsClient, check

    loaded = _settings(args)
    prices = build_price_table(loaded)
    if not args.check:
        document = listing(prices, builtin_models()[1], loaded.settings.pricing.models)
        sys.stdout.write(json.dumps(document, indent=2) + "\n" if args.format == "json" else to_table(document))
        return 0
    config = loaded.settings.pricing.check
    key = os.environ.get(config.api_key_env) or None
    if key is None:
        raise ConfigError(
            f"prices --check needs an Anthropic API key in ${config.api_key_env} (pricing.check.api_key_env)"
        )
    args.redact.add_secret(key, "sk-ant-…(pricing.check key)")
    client = ModelsClient(key, config.base_url)
    try:
        listed = check(prices, client.list())
    except ModelsApiError as exc:
        print(f"claude-monitor: {args.redact(str(exc))}", file=sys.stderr)
        return 4
    finally:
        client.close()
    missing = [model for model in listed if not model.priced]
    if args.format == "json":
        document = {
            "version": prices.version,
            "listed": len(listed),
            "missing": [model.as_dict() for model in missing],
            "models": [model.as_dict() for model in listed],
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"{len(listed)} models listed by Anthropic's Models API; price table {prices.version}")
        for model in listed:
            if model.priced:
                print(f"  priced   {model.id} ({model.lifecycle}) as {model.priced_as}")
            else:
                hint = f"; closest known spelling: {model.nearest}" if model.nearest else ""
                print(
                    f"  MISSING  {model.id} ({model.lifecycle}): tried {', '.join(model.tried)}{hint}; add it under "
                    "pricing.models (see docs/pricing.md, Overrides) or upgrade claude-monitor"
                )
    return 1 if missing else 0


def cmd_reprice(args: argparse.Namespace) -> int:
    """Price the stored events that were unpriced and that the table can price now, once each."""
    from monitor.store.reprice import Repricer

    loaded = _settings(args)
    store = open_store(loaded)
    try:
        settings = store.settings
        result = Repricer(
            store.engine,
            store.prices,
            budgets=store.budgets.index,
            zone=settings.zone,
            metric_labels=settings.metrics.labels,
        ).run()
    finally:
        store.close()
    models = {
        name: {"events": count, "cost_usd": format_usd(cost)} for name, (count, cost) in sorted(result.by_model.items())
    }
    if args.format == "json":
        document = {
            "repriced": result.repriced,
            "cost_usd": format_usd(result.cost_pico),
            "models": models,
            "unpriced_left": result.unpriced_left,
        }
        print(json.dumps(document))
    else:
        print(f"repriced {result.repriced} events: ${format_usd(result.cost_pico)}")
        for name, row in models.items():
            print(f"  {name}: {row['events']} events, ${row['cost_usd']}")
        print(f"{result.unpriced_left} events still have no price")
    return 0


def _parser() -> argparse.ArgumentParser:
    def options(default: Any) -> argparse.ArgumentParser:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument(
            "--config",
            metavar="PATH",
            default=default,
            help="config file (default ./claude-monitor.yaml if present, else built-in defaults)",
        )
        common.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug detail to stderr")
        return common

    # The options go before or after the command. A command's parser leaves them out of the result unless given
    # there: its own defaults would otherwise overwrite what was given before the command.
    parser = argparse.ArgumentParser(
        prog="claude-monitor",
        parents=[options(None)],
        description="Watches what Claude API traffic costs and keeps it inside budgets.",
    )
    common = options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", parents=[common], help="validate and explain the config")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("migrate", parents=[common], help="bring the database schema to head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("ingest", parents=[common], help="one-shot backfill of JSONL usage files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--batch-size", type=int, default=5000, help="events per transaction (default 5000)")
    p.add_argument(
        "--recount",
        action="store_true",
        help="when the config's budgets differ from the database's: delete and recount the new or changed budgets "
        "from the stored events and drop the counts of budgets not in the config (listed before it starts); "
        "without it such a config is refused with exit 2",
    )
    parse = p.add_mutually_exclusive_group()
    parse.add_argument(
        "--parse-process",
        dest="parse_process",
        action="store_true",
        default=None,
        help="read, parse, price and tally in parse processes while this one writes (the default for files of "
        f"{PARSE_AHEAD_MIN_BYTES // 2**20} MiB and more on a machine with more than one core)",
    )
    parse.add_argument(
        "--no-parse-process",
        dest="parse_process",
        action="store_false",
        help="do everything in this process (the default for smaller files or one core)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("report", parents=[common], help="spend by dimension and model")
    p.add_argument(
        "--window",
        choices=["day", "week", "month", "all"],
        help="calendar window containing now, in the configured timezone (default month, "
        "or all when --since/--until are given)",
    )
    p.add_argument("--since", help="start, inclusive: RFC 3339 or YYYY-MM-DD (midnight in the configured timezone)")
    p.add_argument("--until", help="end, exclusive: RFC 3339 or YYYY-MM-DD")
    p.add_argument("--by", default="", help="comma-separated dimensions and/or model, e.g. project,model")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", parents=[common], help="the daemon: tail sources, HTTP API, budgets, metrics")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("proxy", parents=[common], help="the reference Claude proxy: check, forward, record usage")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("budgets", parents=[common], help="every budget: spend, limit, forecast, throttled")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_budgets)

    p = sub.add_parser(
        "reconcile", parents=[common], help="our cost per UTC day and model against Anthropic's usage and cost reports"
    )
    p.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: lookback_days back, today included)")
    p.add_argument("--until", help="the UTC day after the last one, YYYY-MM-DD (default: tomorrow, so today is in)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("prices", parents=[common], help="the price table; --check: models it cannot price")
    p.add_argument(
        "--check",
        action="store_true",
        help="ask Anthropic's Models API which models the account can call and list those the table cannot price "
        "(exit 1 when any, 4 when the API cannot be reached)",
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_prices)

    p = sub.add_parser(
        "reprice", parents=[common], help="price stored unpriced events whose model the table now knows (once each)"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_reprice)

    p = sub.add_parser("simulate", parents=[common], help="write realistic synthetic usage to JSONL files")
    p.add_argument("--rate", type=float, default=1.0, help="events per second of simulated time (default 1)")
    p.add_argument(
        "--duration",
        type=float,
        default=86400.0,
        help="seconds of simulated traffic, ending now (default 86400: one day)",
    )
    p.add_argument("--out", default="./usage", help="directory for the files (default ./usage)")
    p.add_argument("--count", type=int, help="exact number of events (instead of rate x duration)")
    p.add_argument("--end", help="end of the simulated period (RFC 3339; default now)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=20_000, help="distinct learners (default 20000)")
    p.add_argument("--duplicates", type=float, default=0.0, help="fraction of events sent twice")
    p.add_argument("--bad", type=float, default=0.0, help="fraction of bad lines")
    p.add_argument("--lines-per-file", type=int, default=0, help="split output files (default one file)")
    p.add_argument(
        "--live",
        action="store_true",
        help="append events stamped now to OUT/usage-live.jsonl at --rate for --duration seconds",
    )
    p.add_argument(
        "--admit",
        metavar="URL",
        help="with --live: each call asks the daemon at URL (POST /v1/admit, ingest token) first; refused calls "
        "are not made",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="with --admit: once the daemon has stored the admitted calls, tell per learner what was refused and "
        "spent, instead of the JSON outcome",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="with --explain: seconds to wait for the daemon to store the admitted calls (default 60)",
    )
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `claude-monitor` and `python -m monitor`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact = args.redact = Redactor()
    redact.install(logging.getLogger())
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"claude-monitor: {redact(str(exc))}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"claude-monitor: {redact(str(exc))}", file=sys.stderr)
        return 2
    except SchemaNotCurrent as exc:
        print(f"claude-monitor: {redact(str(exc))}", file=sys.stderr)
        return 3
    except SQLAlchemyError as exc:
        print(
            f"claude-monitor: database error: {exc.__class__.__name__}: {redact(str(exc).splitlines()[0])}",
            file=sys.stderr,
        )
        return 3
    except BrokenPipeError:  # `claude-monitor … | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("claude-monitor: interrupted; every committed batch is kept", file=sys.stderr)
        return 130
