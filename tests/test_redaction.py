"""No secret printed: the real command line and a real `serve` never show a database password or a webhook's path."""

from __future__ import annotations

import io
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from monitor.redaction import Redactor
from tests.conftest import run_cli
from tests.serve_harness import Serve

# Runs the command line and `serve` in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

if TYPE_CHECKING:  # imported by pytest as a plugin, so that its assertions are rewritten too
    from tests.pg import PostgresServer

pytest_plugins = ["tests.pg"]

PASSWORD = "Tr0ub4dor-and-3"
SLACK_SECRET = "T0001/B0002/XyZsecretToken42"
GENERIC_SECRET = "hook-path-token-77"
WEBHOOKS = f"""\
alerts:
  webhooks:
    - {{url: "https://hooks.slack.com/services/{SLACK_SECRET}", kind: slack}}
    - {{url: "https://alerts.example:8443/{GENERIC_SECRET}?sig={GENERIC_SECRET}", kind: generic}}
"""
SECRETS = [PASSWORD, SLACK_SECRET, "XyZsecretToken42", GENERIC_SECRET]


def leaked(*outputs: str) -> list[str]:
    text = "".join(outputs)
    return [secret for secret in SECRETS if secret in text]


def config(tmp_path: Path, database_url: str, extra: str = WEBHOOKS) -> Path:
    path = tmp_path / "claude-monitor.yaml"
    path.write_text(f'database_url: "{database_url}"\nsources: []\n{extra}', encoding="utf-8")
    return path


def test_check_config_hides_the_database_password_and_webhook_paths(tmp_path: Path) -> None:
    path = config(tmp_path, f"postgresql+psycopg://monitor:{PASSWORD}@db.internal:5432/monitor")
    text = run_cli("check-config", "--config", str(path))
    assert leaked(text.stdout, text.stderr) == []
    assert "database: postgresql+psycopg://monitor:***@db.internal:5432/monitor" in text.stdout
    assert "slack: https://hooks.slack.com/***" in text.stdout
    assert "generic: https://alerts.example:8443/***" in text.stdout

    as_json = run_cli("check-config", "--config", str(path), "--format", "json")
    assert leaked(as_json.stdout, as_json.stderr) == []
    settings = as_json.json()["settings"]
    assert settings["database_url"] == "postgresql+psycopg://monitor:***@db.internal:5432/monitor"
    assert [hook["url"] for hook in settings["alerts"]["webhooks"]] == [
        "https://hooks.slack.com/***",
        "https://alerts.example:8443/***",
    ]


def test_config_errors_do_not_echo_secret_values(tmp_path: Path) -> None:
    bad_scheme = config(tmp_path, f"mysql://monitor:{PASSWORD}@db.internal/monitor", "")
    run = run_cli("check-config", "--config", str(bad_scheme), check=False)
    assert run.returncode == 2
    assert leaked(run.stdout, run.stderr) == []
    assert "database_url" in run.stderr and "mysql://monitor:***@db.internal/monitor" in run.stderr

    from_env = run_cli(
        "check-config",
        "--config",
        str(config(tmp_path, "sqlite:///monitor.db", "")),
        env={"CLAUDE_MONITOR_DATABASE_URL": f"oracle://monitor:{PASSWORD}@db.internal/monitor"},
        check=False,
    )
    assert from_env.returncode == 2
    assert leaked(from_env.stdout, from_env.stderr) == []
    assert "CLAUDE_MONITOR_DATABASE_URL" in from_env.stderr

    no_scheme = config(
        tmp_path,
        "sqlite:///monitor.db",
        f'alerts: {{webhooks: [{{url: "hooks.slack.com/services/{SLACK_SECRET}"}}]}}\n',
    )
    run = run_cli("check-config", "--config", str(no_scheme), check=False)
    assert run.returncode == 2
    assert leaked(run.stdout, run.stderr) == []
    assert "alerts.webhooks[0].url" in run.stderr and "https://host/path" in run.stderr

    wrong_api = config(
        tmp_path,
        "sqlite:///monitor.db",
        f'alerts: {{webhooks: [{{url: "https://am.internal:9093/{GENERIC_SECRET}/api/v1/alerts", '
        "kind: alertmanager}]}\n",
    )
    run = run_cli("check-config", "--config", str(wrong_api), check=False)
    assert run.returncode == 2
    assert leaked(run.stdout, run.stderr) == []
    assert "https://am.internal:9093/api/v2/alerts" in run.stderr  # what to write instead


def test_migrate_and_a_database_error_hide_the_password(tmp_path: Path) -> None:
    # Nothing listens on port 1: the connection fails, and the error names the server, not the password.
    path = config(tmp_path, f"postgresql+psycopg://monitor:{PASSWORD}@127.0.0.1:1/monitor?connect_timeout=5")
    run = run_cli("migrate", "--config", str(path), "-v", check=False)
    assert run.returncode == 3, run.stderr
    assert "database error" in run.stderr
    assert leaked(run.stdout, run.stderr) == []


def test_migrate_and_serve_on_postgres_never_print_the_password(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database("redact")  # loopback is trusted: any password is accepted, and must not show
    with_password = url.replace("postgresql+psycopg://monitor@", f"postgresql+psycopg://monitor:{PASSWORD}@")
    assert PASSWORD in with_password
    path = config(tmp_path, with_password, WEBHOOKS + 'http: {listen: "127.0.0.1:0"}\n')
    migrated = run_cli("migrate", "--config", str(path), "-v")
    assert leaked(migrated.stdout, migrated.stderr) == []
    assert f"schema at head: {with_password.replace(PASSWORD, '***')}" in migrated.stderr

    serve = Serve(path, tmp_path)
    try:
        assert serve.get("/readyz").status == 200
    finally:
        serve.stop(signal.SIGTERM)
    assert leaked(serve.log.read_text()) == []


def test_log_lines_and_tracebacks_are_redacted(tmp_path: Path) -> None:
    from monitor.config import load_settings

    loaded = load_settings(config(tmp_path, f"postgresql+psycopg://monitor:{PASSWORD}@db.internal/monitor"), environ={})
    redact = Redactor()
    redact.add_settings(loaded.settings)
    stream = io.StringIO()
    logger = logging.getLogger("test-redaction")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        redact.install(logger)
        logger.error("cannot reach %s", loaded.settings.database_url)
        logger.warning("posting to %s failed", loaded.settings.alerts.webhooks[0].url)
        try:
            raise RuntimeError(f"upstream said no to https://user:{PASSWORD}@proxy.internal/x?password={PASSWORD}")
        except RuntimeError:
            logger.exception("delivery failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert leaked(text) == []
    assert "ERROR cannot reach postgresql+psycopg://monitor:***@db.internal/monitor" in text
    assert "WARNING posting to https://hooks.slack.com/*** failed" in text
    assert "https://user:***@proxy.internal/x?password=***" in text  # any URL's password, known or not
