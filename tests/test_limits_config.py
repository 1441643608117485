"""`limits:` and `admission:` in the config: defaults, errors with file:line, and what check-config says."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from monitor.config import ConfigError, load_settings, parse_duration
from tests.conftest import run_cli

LIMITS = """\
budgets:
  - {name: lingo-daily, match: {project: lingo}, window: day, limit_usd: 5, throttle_at: 1.0}
limits:
  - name: per-user-rate
    match: {project: lingo}
    per: user
    requests_per_minute: 20
    input_tokens_per_minute: 200000
    concurrent: 2
  - name: high-token-guard
    match: {project: lingo}
    max_tokens: 4096
    max_input_tokens: 50000
    max_request_usd: 0.25
  - name: bursty
    requests_per_minute: 60
    burst: 5
admission: {lease_ttl: 90s}
"""


def error_of(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    return str(info.value)


def test_limits_load_exactly(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(LIMITS, encoding="utf-8")
    settings = load_settings(path, environ={}).settings
    rate, guard, bursty = settings.limits
    assert (rate.per, rate.requests_per_minute, rate.burst, rate.concurrent) == ("user", 20, None, 2)
    assert guard.max_request_usd == Decimal("0.25") and isinstance(guard.max_request_usd, Decimal)
    assert bursty.burst == 5
    assert parse_duration(settings.admission.lease_ttl) == timedelta(seconds=90)


def test_admission_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("", encoding="utf-8")
    settings = load_settings(path, environ={}).settings
    assert settings.limits == []
    assert parse_duration(settings.admission.lease_ttl) == timedelta(minutes=10)
    assert settings.admission.max_open_leases == 100_000
    bounds = settings.admission
    assert (bounds.max_buckets, bounds.max_spend_scopes, bounds.max_settled_remembered) == (200_000, 200_000, 100_000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("limits:\n  - name: a\n    match: {project: x}\n", ["c.yaml:2", "limits[0]", "enforces nothing"]),
        ("limits:\n  - name: a\n    burst: 5\n    concurrent: 1\n", ["c.yaml:2", "give requests_per_minute"]),
        ("limits:\n  - name: a\n    concurrent: 0\n", ["c.yaml:3", "limits[0].concurrent", "greater than 0"]),
        ("limits:\n  - name: a\n    max_request_usd: -0.5\n", ["c.yaml:3", "limits[0].max_request_usd"]),
        ("limits:\n  - name: a\n    rpm: 5\n", ["c.yaml:3", "limits[0].rpm", "unknown key"]),
        (
            "limits:\n  - name: a\n    concurrent: 1\n    match: {plan: pro}\n",
            ["c.yaml:4: limits[0] (a).match", "'plan' is not 'model' or one of dimensions"],
        ),
        ("limits:\n  - name: a\n    concurrent: 1\n    per: team\n", ["c.yaml:4: limits[0] (a).per", "'team'"]),
        (
            "limits:\n  - {name: a, concurrent: 1}\n  - {name: a, concurrent: 2}\n",
            ["c.yaml:3: limits[1] (a)", "used by another limit"],
        ),
        (
            "limits:\n  - name: a\n    concurrent: 1\n    match: {user: x}\n    per: user\n",
            ["c.yaml:5: limits[0] (a).per", "also fixed by match"],
        ),
        ("admission: {lease_ttl: 1s}\n", ["c.yaml:1", "admission.lease_ttl", "too short"]),
        ("admission: {lease_ttl: soon}\n", ["admission.lease_ttl", "not a duration"]),
        ("admission:\n  max_buckets: 0\n", ["c.yaml:2", "admission.max_buckets", "greater than 0"]),
        ("admission:\n  lease_ttl: 1m\n  max_spend_scopes: -5\n", ["c.yaml:3", "admission.max_spend_scopes"]),
        ("admission: {max_settled_remembered: lots}\n", ["c.yaml:1", "admission.max_settled_remembered"]),
        (
            "proxy:\n  count_tokens: true\n  count_tokens_timeout: 2m\n",
            ["c.yaml:3", "proxy.count_tokens_timeout", "too long", "60s or less"],
        ),
        ("proxy: {count_tokens_timeout: soon}\n", ["c.yaml:1", "proxy.count_tokens_timeout", "not a duration"]),
        ("proxy:\n  count_tokens: sometimes\n", ["c.yaml:2", "proxy.count_tokens"]),
    ],
    ids=[
        "nothing",
        "burst-alone",
        "zero-concurrent",
        "negative-usd",
        "unknown-key",
        "match-unknown-dim",
        "per-unknown-dim",
        "duplicate-name",
        "per-in-match",
        "short-ttl",
        "bad-ttl",
        "zero-buckets",
        "negative-spend-scopes",
        "settled-not-a-number",
        "count-timeout-too-long",
        "count-timeout-not-a-duration",
        "count-tokens-not-a-boolean",
    ],
)
def test_bad_limits_name_file_line_key_and_reason(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = error_of(tmp_path, text)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.slow
def test_proxy_count_tokens_defaults_off_and_check_config_says_what_calls_are_admitted_on(tmp_path: Path) -> None:
    path = tmp_path / "claude-monitor.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'm.db'}\n", encoding="utf-8")
    proxy = load_settings(path, environ={}).settings.proxy
    assert (proxy.count_tokens, parse_duration(proxy.count_tokens_timeout)) == (False, timedelta(seconds=2))
    out = run_cli("check-config", "--config", str(path)).stdout
    assert "proxy admits each call on an upper bound of its input from the request's bytes" in out
    path.write_text(path.read_text() + "proxy: {count_tokens: true, count_tokens_timeout: 500ms}\n", encoding="utf-8")
    out = run_cli("check-config", "--config", str(path)).stdout
    assert "proxy admits each call on Anthropic's count of its input (count_tokens, waited for up to 500ms" in out


def test_budget_cross_check_errors_now_carry_their_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "budgets:\n  - name: a\n    limit_usd: 1\n    match: {plan: pro}\n")
    assert "c.yaml:4: budgets[0] (a).match: 'plan'" in message


@pytest.mark.slow
def test_check_config_explains_limits(tmp_path: Path) -> None:
    path = tmp_path / "claude-monitor.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'm.db'}\n{LIMITS}", encoding="utf-8")
    out = run_cli("check-config", "--config", str(path)).stdout
    assert (
        "  - per-user-rate: each user of project=lingo: 20 requests a minute (bursts of up to 20); "
        "200,000 input tokens a minute, estimated at admission (bursts of up to 200,000); 2 calls in flight at once"
    ) in out
    assert (
        "  - high-token-guard: project=lingo: max_tokens at most 4,096 (a call asking more is refused 400); "
        "estimated input at most 50,000 tokens; worst-case cost of one call at most $0.25"
    ) in out
    assert "  - bursty: all: 60 requests a minute (bursts of up to 5)" in out
    assert "admission leases: expire 90s after admit or their last renewal (running calls renew every 30s)" in out
    memory = "admission memory: at most 200,000 rate buckets, 200,000 budget scopes' spend, 100,000 ended leases"
    assert memory + " remembered" in out
    assert "admission reserves each call's worst case against: lingo-daily" in out
