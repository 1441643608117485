"""`report`: grouping by dimensions and model, windows in the configured timezone, JSON / CSV / table shapes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests.conftest import event, jsonl, run_cli, write_config

# Runs the command line in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow


def attrs(e: dict, **kv: str) -> dict:  # type: ignore[type-arg]
    e["attributes"] = kv
    return e


def setup(tmp_path: Path) -> Path:
    config = write_config(tmp_path, "timezone: Europe/Berlin\n")
    usage = jsonl(
        tmp_path / "u.jsonl",
        # 24 Nov 22:30 UTC = 23:30 in Berlin (still the 24th); 23:30 UTC = 00:30 on the 25th in Berlin.
        attrs(event("r1", timestamp="2026-11-24T22:30:00Z", input_tokens=1_000_000), project="lingo", user="u1"),
        attrs(event("r2", timestamp="2026-11-24T23:30:00Z", output_tokens=1_000_000), project="lingo", user="u2"),
        attrs(
            event("r3", timestamp="2026-11-25T10:00:00Z", model="claude-sonnet-4-5-20250929", input_tokens=100_000),
            project="labs",
            user="u1",
        ),
        attrs(
            event(
                "r4",
                timestamp="2026-11-25T11:00:00Z",
                model="claude-haiku-4-5-20251001",
                cache_read_input_tokens=1_000_000,
            ),
            project="lingo",
            user="u1",
        ),
        event("r5", timestamp="2026-11-25T12:00:00Z", model="claude-haiku-4-5", output_tokens=200_000),
    )
    run_cli("ingest", str(usage), "--config", str(config))
    return config


def test_by_project_and_model_names_models_by_table_name(tmp_path: Path) -> None:
    config = setup(tmp_path)
    report = run_cli(
        "report", "--window", "all", "--by", "project,model", "--format", "json", "--config", str(config)
    ).json()
    rows = {(row["project"], row["model"]): row for row in report["rows"]}
    # Hand totals: r1 $1 (1M in x $1), r2 $5 (1M out x $5), r4 $0.10 (1M read x $0.10): lingo haiku $6.10;
    # r3 $0.30 (100k in x $3/M, sonnet, under its 200k long-prompt threshold); r5 $1 (200k out x $5) with no project.
    assert set(rows) == {("lingo", "claude-haiku-4-5"), ("labs", "claude-sonnet-4-5"), (None, "claude-haiku-4-5")}
    assert rows["lingo", "claude-haiku-4-5"]["cost_usd"] == "6.100000"
    assert rows["lingo", "claude-haiku-4-5"]["requests"] == 3
    assert rows["lingo", "claude-haiku-4-5"]["cache_read_tokens"] == 1_000_000
    assert rows["labs", "claude-sonnet-4-5"]["cost_usd"] == "0.300000"
    assert rows[None, "claude-haiku-4-5"]["cost_usd"] == "1.000000"
    assert report["total_usd"] == "7.400000"
    assert [row["cost_usd"] for row in report["rows"]] == ["6.100000", "1.000000", "0.300000"]  # costliest first


def test_calendar_day_in_the_configured_timezone(tmp_path: Path) -> None:
    config = setup(tmp_path)
    # The Berlin day of 25 Nov runs 24 Nov 23:00 UTC .. 25 Nov 23:00 UTC: r2..r5, not r1.
    report = run_cli(
        "report", "--since", "2026-11-25", "--until", "2026-11-26", "--format", "json", "--config", str(config)
    ).json()
    assert report["since"] == "2026-11-24T23:00:00Z"
    assert report["until"] == "2026-11-25T23:00:00Z"
    assert report["total_usd"] == "6.400000"  # $5 + $0.30 + $0.10 + $1
    assert report["rows"][0]["requests"] == 4


def test_by_user_and_csv(tmp_path: Path) -> None:
    config = setup(tmp_path)
    out = run_cli("report", "--window", "all", "--by", "user", "--format", "csv", "--config", str(config)).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["user"] for row in rows] == ["u2", "u1", ""]
    assert rows[0]["cost_usd"] == "5.000000"
    assert rows[1]["cost_usd"] == "1.400000"  # r1 $1 + r3 $0.30 + r4 $0.10
    assert rows[1]["requests"] == "3"


def test_table_has_a_total_line(tmp_path: Path) -> None:
    config = setup(tmp_path)
    out = run_cli("report", "--window", "all", "--by", "model", "--config", str(config)).stdout
    lines = out.splitlines()
    assert "Europe/Berlin" in lines[0]
    assert lines[-1].split()[0] == "TOTAL" and lines[-1].endswith("7.400000")


def test_unknown_by_key_is_a_clear_error(tmp_path: Path) -> None:
    config = setup(tmp_path)
    run = run_cli("report", "--by", "team", "--config", str(config), check=False)
    assert run.returncode == 2
    assert "--by 'team': not a dimension; choose from model, api_key, project, user, feature, environment" in run.stderr


def test_empty_window_reports_zero(tmp_path: Path) -> None:
    config = setup(tmp_path)
    report = run_cli(
        "report", "--since", "2020-01-01", "--until", "2020-02-01", "--format", "json", "--config", str(config)
    ).json()
    assert report["total_usd"] == "0.000000" and report["rows"] == []
