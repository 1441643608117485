"""Config: strict schema, errors that name file, line, key and reason, env overrides, check-config."""

from __future__ import annotations

import pickle
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from monitor.config import ConfigError, load_settings, parse_duration, parse_window
from tests.conftest import run_cli, write_config

FULL = """\
timezone: Europe/Berlin
dimensions: [api_key, project, user, feature, environment]
sources:
  - {type: jsonl, path: "./usage/*.jsonl"}
http: {listen: "127.0.0.1:9464", ingest_token_env: CLAUDE_MONITOR_INGEST_TOKEN, max_body_bytes: 16777216}
metrics: {labels: [project, environment]}
schedule: {evaluate_every: 15s, retention_days: 90}
throttle: {snapshot_file: ./throttle.json}
alerts: {webhooks: [{url: "https://hooks.example/x", kind: slack}]}
pricing:
  models:
    claude-haiku-9:
      aliases: [claude-haiku-9-20270101]
      rates:
        - since: 2027-01-01
          input: 0.10
          output: 0.50
          cache_write_5m: 0.125
          cache_write_1h: 0.20
          cache_read: 0.01
budgets:
  - name: lingo-monthly
    match: {project: lingo}
    window: month
    limit_usd: 500
    alert_at: [0.5, 0.8, 1.0]
    throttle_at: 1.0
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 0.50
    throttle_at: 1.0
  - name: opus-output-hourly
    match: {model: claude-opus-4-5}
    window: rolling:1h
    limit_tokens: {output: 2000000}
    throttle_at: 1.0
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ=environ or {})


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def test_spec_example_loads_with_exact_decimals(tmp_path: Path) -> None:
    settings = load(tmp_path, FULL).settings
    assert settings.timezone == "Europe/Berlin"
    assert [b.name for b in settings.budgets] == ["lingo-monthly", "per-user-daily", "opus-output-hourly"]
    assert settings.budgets[1].limit_usd == Decimal("0.50")
    rate = settings.pricing.models["claude-haiku-9"].rates[0]
    assert rate.cache_write_5m == Decimal("0.125") and isinstance(rate.cache_read, Decimal)
    assert str(settings.budgets[2].parsed_window) == "rolling:1h"


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_settings(environ={})
    assert loaded.path is None
    assert loaded.settings.database_url == "sqlite:///./claude-monitor.db"
    assert loaded.settings.dimensions == ["api_key", "project", "user", "feature", "environment"]


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.yaml", environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("databse_url: x\n", ["c.yaml:1", "databse_url", "unknown key"]),
        (
            "budgets:\n  - name: a\n    window: weekly\n    limit_usd: 1\n",
            ["c.yaml:3", "budgets[0].window", "'weekly' is not a window"],
        ),
        (
            "budgets:\n  - name: a\n    limit_usd: 1\n    limit_requests: 3\n",
            ["budgets[0]", "exactly one of limit_usd"],
        ),
        ("budgets:\n  - name: a\n    limit_usd: -1\n", ["c.yaml:3", "budgets[0].limit_usd", "greater than 0"]),
        (
            "budgets:\n  - name: a\n    limit_usd: 1\n    match: {plan: pro}\n",
            ["budgets[0] (a).match", "'plan' is not 'model' or one of dimensions"],
        ),
        ("budgets:\n  - name: a\n    limit_usd: 1\n    per: team\n", ["budgets[0] (a).per", "'team'"]),
        ("budgets:\n  - {name: a, limit_usd: 1}\n  - {name: a, limit_usd: 2}\n", ["budgets[1] (a)", "used by another"]),
        ("timezone: Mars/Olympus\n", ["c.yaml:1", "timezone", "not an IANA timezone"]),
        ("schedule: {evaluate_every: fast}\n", ["schedule.evaluate_every", "not a duration"]),
        ("schedule:\n  partitions_ahead_months: 25\n", ["c.yaml:2", "schedule.partitions_ahead_months", "less than"]),
        (
            "store:\n  max_new_partitions_per_batch: -1\n",
            ["c.yaml:2", "store.max_new_partitions_per_batch", "greater than or equal to 0"],
        ),
        ("alerts: {webhooks: [{url: 'not a url', kind: slack}]}\n", ["alerts.webhooks[0].url", "http(s) URL"]),
        ("alerts: {webhooks: [{url: 'https://x', kind: pager}]}\n", ["alerts.webhooks[0].kind"]),
        ("metrics: {labels: [user_tier]}\n", ["metrics.labels", "'user_tier' is not one of dimensions"]),
        (
            "timezone: UTC\nmetrics:\n  labels: [project, user, api_key]\n",
            ["c.yaml:3", "metrics.labels", "'user', 'api_key': one value per user", "high_cardinality: [user"],
        ),
        (
            "metrics:\n  allow_high_cardinality: [user]\n  labels: [project, user, api_key]\n",
            ["c.yaml:3", "metrics.labels", "'api_key': one value per user or key"],
        ),
        ("alerts: {digest_every: soon}\n", ["c.yaml:1", "alerts.digest_every", "not a duration"]),
        ("pricing: {models: {m: {rates: []}}}\n", ["pricing.models.m.rates", "at least 1"]),
        (
            "pricing: {models: {m: {rates: [{since: 2026-01-01, input: 1}]}}}\n",
            ["pricing.models.m.rates[0].output", "required key is missing"],
        ),
        ("http: {listen: 9464}\n", ["http.listen"]),
        ("- just\n- a list\n", ["c.yaml", "top level must be a mapping"]),
        ("budgets: [\n", ["c.yaml:2", "not valid YAML"]),
    ],
    ids=[
        "unknown-key",
        "bad-window",
        "two-limits",
        "negative-limit",
        "match-unknown-dim",
        "per-unknown-dim",
        "duplicate-name",
        "timezone",
        "duration",
        "partitions-ahead",
        "new-partitions-per-batch",
        "webhook-url",
        "webhook-kind",
        "metric-label",
        "metric-label-per-user",
        "metric-label-per-key",
        "digest-every",
        "no-rates",
        "missing-rate",
        "listen",
        "not-mapping",
        "yaml-syntax",
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = error_of(tmp_path, text)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_a_per_user_metric_label_is_accepted_when_the_operator_says_so(tmp_path: Path) -> None:
    loaded = load(tmp_path, "metrics: {allow_high_cardinality: [user], labels: [project, user]}\n")
    assert loaded.settings.metrics.labels == ["project", "user"]
    assert loaded.settings.alerts.digest_every == "1h"


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    message = error_of(tmp_path, "timezone: Nowhere/X\nschedule: {retention_days: 0}\nbogus: 1\n")
    assert "timezone" in message and "retention_days" in message and "bogus" in message


def test_env_overrides_top_level_scalars(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        "timezone: UTC\n",
        environ={"CLAUDE_MONITOR_TIMEZONE": "Asia/Tokyo", "CLAUDE_MONITOR_DATABASE_URL": "sqlite:///other.db"},
    )
    assert loaded.settings.timezone == "Asia/Tokyo"
    assert loaded.settings.database_url == "sqlite:///other.db"
    assert set(loaded.env_overrides) == {"CLAUDE_MONITOR_TIMEZONE", "CLAUDE_MONITOR_DATABASE_URL"}


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLAUDE_MONITOR_TIMEZONE"):
        load(tmp_path, "", environ={"CLAUDE_MONITOR_TIMEZONE": "Nowhere/X"})


def test_durations_and_windows() -> None:
    assert parse_duration("15s").total_seconds() == 15
    assert parse_duration("500ms").total_seconds() == 0.5
    assert parse_duration("2h").total_seconds() == 7200
    assert parse_window("rolling:30m").span is not None and parse_window("rolling:30m").span.total_seconds() == 1800
    for bad in ("rolling:0h", "rolling:1w", "daily", "rolling:"):
        with pytest.raises(ValueError):
            parse_window(bad)


@pytest.mark.slow
def test_check_config_explains_what_it_loaded(tmp_path: Path) -> None:
    path = write_config(tmp_path, FULL)
    run = run_cli("check-config", "--config", str(path))
    out = run.stdout
    assert f"config: {path}" in out
    assert "timezone: Europe/Berlin" in out
    assert "per-user-daily: each user of project=lingo, $0.50 per day (Europe/Berlin); throttle at 100%" in out
    assert "lingo-monthly: project=lingo, $500 per month (Europe/Berlin); alert at 50%, 80%, 100%" in out
    assert "opus-output-hourly: model=claude-opus-4-5, 2,000,000 output tokens over a 1h rolling window" in out
    assert "from config: claude-haiku-9" in out
    assert out.rstrip().endswith("config OK")


@pytest.mark.slow
@pytest.mark.parametrize("before", [True, False], ids=["before the command", "after the command"])
def test_config_and_verbose_are_honoured_before_or_after_the_command(tmp_path: Path, before: bool) -> None:
    database = tmp_path / "chosen.db"
    path = write_config(tmp_path, f"database_url: sqlite:///{database}\n")
    options = ["--config", str(path), "-v"]
    run = run_cli(*options, "migrate", cwd=tmp_path) if before else run_cli("migrate", *options, cwd=tmp_path)
    assert f"schema at head: sqlite:///{database}" in run.stderr
    assert database.exists()
    assert "DEBUG" in run.stderr  # -v took effect


@pytest.mark.slow
def test_check_config_fails_with_exit_2_and_a_clear_message(tmp_path: Path) -> None:
    path = write_config(tmp_path, "budgets:\n  - name: x\n    window: fortnight\n    limit_usd: 1\n")
    run = run_cli("check-config", "--config", str(path), check=False)
    assert run.returncode == 2
    assert f"{path}:4: budgets[0].window: 'fortnight' is not a window" in run.stderr
    assert run.stdout == ""


@pytest.mark.slow
def test_pricing_alias_conflict_with_shipped_model_is_a_config_error(tmp_path: Path) -> None:
    text = (
        "pricing:\n  models:\n    my-model:\n      aliases: [claude-haiku-4-5]\n      rates:\n"
        "        - {since: 2026-01-01, input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}\n"
    )
    run = run_cli("check-config", "--config", str(write_config(tmp_path, text)), check=False)
    assert run.returncode == 2
    assert "my-model" in run.stderr and "claude-haiku-4-5" in run.stderr


RATES = "{since: 2026-01-01, input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}"
KEY_SHA256 = "ab" * 32
# Line numbers below count the database_url line write_config puts first.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('proxy:\n  listen: "localhost"\n', ":3: proxy.listen: 'localhost' is not HOST:PORT"),
        ("proxy:\n  upstream: api.anthropic.com\n", ":3: proxy.upstream: 'api.anthropic.com' is not an http(s) URL"),
        (
            "proxy:\n  upstream: 'https://api.anthropic.com/?beta=1'\n",
            ":3: proxy.upstream: 'https://api.anthropic.com/?beta=1' is not an http(s) URL",
        ),
        (
            "proxy:\n  monitor_url: 'ftp://127.0.0.1:9464'\n",
            ":3: proxy.monitor_url: 'ftp://127.0.0.1:9464' is not the daemon's http(s) URL",
        ),
        (
            "alerts:\n  webhooks:\n    - kind: alertmanager\n      url: 'http://am:9093/'\n",
            ":5: alerts.webhooks[0].url: 'http://am:9093/': its path is not Alertmanager's alerts API (/api/v2/alerts)",
        ),
        (
            f"pricing:\n  models:\n    my-model:\n      aliases: [claude-haiku-4-5]\n      rates: [{RATES}]\n",
            ":5: pricing.models.my-model.aliases: 'claude-haiku-4-5' is a model of the shipped table",
        ),
        (
            f"pricing:\n  models:\n    unpriced:\n      rates: [{RATES}]\n",
            ":4: pricing.models.unpriced: 'unpriced' is the metric label of unknown models",
        ),
        (
            f"pricing:\n  models:\n    a:\n      aliases: [x]\n      rates: [{RATES}]\n"
            f"    b:\n      aliases: [y, x]\n      rates: [{RATES}]\n",
            ":8: pricing.models.b.aliases: 'x' is also an alias of a",
        ),
        (
            f"proxy:\n  clients:\n    - name: app\n      key_sha256: {KEY_SHA256}\n      attributes: {{team: core}}\n",
            ":6: proxy.clients[0].attributes.team: 'team' is not one of dimensions",
        ),
        (
            "reconcile:\n  api_keys:\n    apikey_01X: {user_tier: pro}\n",
            ":4: reconcile.api_keys.apikey_01X.user_tier: 'user_tier' is not one of metrics.labels",
        ),
        (
            "admission:\n  state: database\n",
            ":3: admission.state: 'database' keeps admission state in PostgreSQL",
        ),
        (
            "dimensions: [project]\nmetrics:\n  labels:\n    - project\n    - user_tier\n",
            ":6: metrics.labels: 'user_tier' is not one of dimensions ['project']",
        ),
        (
            "http:\n  check_require: [model, team]\n",
            ":3: http.check_require: 'team' is not 'model' or one of dimensions",
        ),
        (
            "limits:\n  - {name: a, concurrent: 1}\n  - {name: a, concurrent: 2}\n",
            ":4: limits[1] (a): the name is used by another limit",
        ),
    ],
    ids=[
        "proxy-listen",
        "proxy-upstream",
        "proxy-upstream-query",
        "proxy-monitor-url",
        "alertmanager-path",
        "alias-of-a-shipped-model",
        "unpriced-name",
        "alias-of-two-models",
        "proxy-client-dimension",
        "reconcile-key-label",
        "admission-state",
        "metric-label-dimension",
        "check-require",
        "duplicate-limit",
    ],
)
def test_check_config_names_the_line_and_key_of_every_cross_check(tmp_path: Path, text: str, expected: str) -> None:
    path = write_config(tmp_path, text)
    run = run_cli("check-config", "--config", str(path), check=False)
    assert run.returncode == 2
    assert f"{path}{expected}" in run.stderr, run.stderr


def test_check_config_reports_every_cross_check_problem_at_once(tmp_path: Path) -> None:
    text = (
        "admission:\n"  # 2
        "  state: database\n"  # 3
        "budgets:\n"  # 4
        "  - name: a\n"  # 5
        "    limit_usd: 1\n"  # 6
        "    match: {plan: pro}\n"  # 7
        "proxy:\n"  # 8
        "  clients:\n"  # 9
        "    - name: app\n"  # 10
        f"      key_sha256: {KEY_SHA256}\n"  # 11
        "      require: [team]\n"  # 12
        "      attributes: {team: core}\n"  # 13
    )
    path = write_config(tmp_path, text)
    run = run_cli("check-config", "--config", str(path), check=False)
    assert run.returncode == 2
    for part in (
        f"{path}:7: budgets[0] (a).match: 'plan' is not 'model' or one of dimensions",
        f"{path}:13: proxy.clients[0].attributes.team: 'team' is not one of dimensions",
        f"{path}:12: proxy.clients[0].require[0]: 'team' is not one of dimensions",
        f"{path}:3: admission.state: 'database'",
    ):
        assert part in run.stderr, run.stderr


def test_durations_windows_and_addresses_are_parsed_once_when_loaded(tmp_path: Path) -> None:
    text = (
        "http: {listen: '[::1]:0', header_timeout: 500ms, metrics_listen: '0.0.0.0:9465'}\n"
        "schedule: {evaluate_every: 2m}\n"
        "admission: {lease_ttl: 90s}\n"
        "proxy: {listen: '127.0.0.1:8089', count_tokens_timeout: 3s}\n"
        "budgets:\n  - {name: a, window: 'rolling:2h', limit_usd: 1}\n"
    )
    settings = load(tmp_path, text).settings
    assert (settings.http.listen.host, settings.http.listen.port) == ("::1", 0)
    assert settings.http.metrics_listen is not None and settings.http.metrics_listen.port == 9465
    assert settings.http.header_timeout.seconds == 0.5
    assert settings.http.keepalive_timeout.delta == timedelta(seconds=30)  # the default, parsed too
    assert settings.schedule.evaluate_every.delta == timedelta(minutes=2)
    assert settings.admission.lease_ttl.delta == timedelta(seconds=90)
    assert (settings.proxy.listen.host, settings.proxy.listen.port) == ("127.0.0.1", 8089)
    assert settings.proxy.count_tokens_timeout.seconds == 3
    assert settings.budgets[0].parsed_window.span == timedelta(hours=2)
    # As written wherever they are shown; the ingest worker gets them pickled, parsed values and all.
    assert settings.model_dump(mode="json")["http"]["header_timeout"] == "500ms"
    assert settings.budgets[0].window == "rolling:2h"
    again = pickle.loads(pickle.dumps(settings))
    assert again == settings and again.schedule.evaluate_every.delta == timedelta(minutes=2)
    assert again.http.listen.port == 0
