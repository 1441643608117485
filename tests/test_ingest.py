"""One-shot ingest: idempotent, exact to the pico-dollar against an independent price list, bounded batches."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from monitor import simulate
from tests.conftest import event, jsonl, run_cli

# Runs the command line in processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

# USD per million tokens, copied by hand from Anthropic's published list prices, not from the code under test:
# (input, output, 5-minute write, 1-hour write, cache read); Sonnet 4.5 over 200k prompt tokens bills LONG.
LIST = {
    "claude-haiku-4-5": ("1", "5", "1.25", "2", "0.10"),
    "claude-sonnet-4-5": ("3", "15", "3.75", "6", "0.30"),
    "claude-opus-4-5": ("5", "25", "6.25", "10", "0.50"),
    "claude-3-5-haiku": ("0.80", "4", "1", "1.60", "0.08"),
}
LONG = {"claude-sonnet-4-5": ("6", "22.50", "7.50", "12", "0.60")}
ALIASES = {
    "claude-haiku-4-5-20251001": "claude-haiku-4-5",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5",
    "claude-opus-4-5-20251101": "claude-opus-4-5",
    "claude-3-5-haiku-20241022": "claude-3-5-haiku",
}


def reference_cost(line: dict[str, Any]) -> tuple[str, Decimal]:
    """The cost of one simulated event, from the list above (a second, independent implementation)."""
    model = ALIASES.get(line["model"], line["model"])
    usage = line["usage"]
    tokens_in = usage.get("input_tokens") or 0
    out = usage.get("output_tokens") or 0
    read = usage.get("cache_read_input_tokens") or 0
    created = usage.get("cache_creation_input_tokens") or 0
    detail = usage.get("cache_creation") or {}
    one_hour = detail.get("ephemeral_1h_input_tokens") or 0
    five_min = created - one_hour
    searches = (usage.get("server_tool_use") or {}).get("web_search_requests") or 0
    rates = LIST[model]
    if model in LONG and tokens_in + created + read > 200_000:
        rates = LONG[model]
    per_m = [Decimal(r) for r in rates]
    if line.get("batch") or usage.get("service_tier") == "batch":
        per_m = [r / 2 for r in per_m]
    tokens = tokens_in * per_m[0] + out * per_m[1] + five_min * per_m[2] + one_hour * per_m[3] + read * per_m[4]
    return model, tokens / 1_000_000 + Decimal(searches) * Decimal("0.01")


def simulated_file(path: Path, count: int, **kwargs: Any) -> Path:
    lines = simulate.generate_events(
        count=count, start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 11, 8, tzinfo=UTC), seed=7, **kwargs
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.slow
def test_report_total_equals_sum_of_priced_events_on_100k(tmp_path: Path, config_path: Path) -> None:
    usage = simulated_file(tmp_path / "usage.jsonl", 100_000)
    expected_total = Decimal(0)
    expected_by_model: dict[str, Decimal] = {}
    expected_events: dict[str, Decimal] = {}
    for text in usage.read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        model, cost = reference_cost(line)
        expected_total += cost
        expected_by_model[model] = expected_by_model.get(model, Decimal(0)) + cost
        expected_events[line["request_id"]] = cost

    summary = run_cli("ingest", str(usage), "--format", "json", "--config", str(config_path)).json()
    assert summary == {"accepted": 100_000, "duplicates": 0, "rejected": 0, "unpriced": 0, "attributes_dropped": 0}

    report = run_cli(
        "report", "--window", "all", "--by", "model", "--format", "json", "--config", str(config_path)
    ).json()
    assert Decimal(report["total_usd"]) == expected_total  # exact, not merely to the micro-dollar
    assert {row["model"]: Decimal(row["cost_usd"]) for row in report["rows"]} == expected_by_model
    assert sum(row["requests"] for row in report["rows"]) == 100_000

    stored = sqlite3.connect(tmp_path / "monitor.db").execute("SELECT request_id, cost_pico FROM events").fetchall()
    assert len(stored) == 100_000
    mismatched = [rid for rid, pico in stored if Decimal(pico) / 10**12 != expected_events[rid]]
    assert mismatched == []


def test_same_file_twice_adds_nothing_and_reports_identically(tmp_path: Path, config_path: Path) -> None:
    usage = simulated_file(tmp_path / "usage.jsonl", 3_000, duplicate_fraction=0.02, bad_fraction=0.01)
    args = ("--config", str(config_path))
    first = run_cli("ingest", str(usage), "--format", "json", *args).json()
    report_args = ("report", "--window", "all", "--by", "model,project,user,feature", "--format", "json", *args)
    before = run_cli(*report_args).stdout
    database = tmp_path / "monitor.db"
    counts = [
        sqlite3.connect(database).execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "dead_letters")
    ]
    second = run_cli("ingest", str(usage), "--format", "json", *args).json()
    assert run_cli(*report_args).stdout == before
    assert [
        sqlite3.connect(database).execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "dead_letters")
    ] == counts
    assert first["accepted"] > 2_900 and first["duplicates"] > 0 and first["rejected"] > 0
    assert second["accepted"] == 0
    assert second["duplicates"] == first["accepted"] + first["duplicates"]
    assert second["rejected"] == first["rejected"]
    assert counts == [first["accepted"], first["rejected"]]


def test_duplicate_across_files_and_within_a_batch_counted_once(tmp_path: Path, config_path: Path) -> None:
    one = event("req_a", input_tokens=1000)
    a = jsonl(tmp_path / "a.jsonl", one, one, event("req_b", output_tokens=1000))
    b = jsonl(tmp_path / "b.jsonl", event("req_b", output_tokens=1000), event("req_c", input_tokens=1))
    summary = run_cli("ingest", str(a), str(b), "--format", "json", "--config", str(config_path)).json()
    assert summary == {"accepted": 3, "duplicates": 2, "rejected": 0, "unpriced": 0, "attributes_dropped": 0}
    report = run_cli("report", "--window", "all", "--format", "json", "--config", str(config_path)).json()
    # 1000 in x $1/M + 1000 out x $5/M + 1 in x $1/M
    assert report["total_usd"] == "0.006001"


def test_small_batches_commit_everything(tmp_path: Path, config_path: Path) -> None:
    usage = simulated_file(tmp_path / "usage.jsonl", 1_001)
    summary = run_cli(
        "ingest", str(usage), "--batch-size", "100", "--format", "json", "--config", str(config_path)
    ).json()
    assert summary["accepted"] == 1_001


def test_unknown_model_is_stored_unpriced_and_reported_apart(tmp_path: Path, config_path: Path) -> None:
    usage = jsonl(
        tmp_path / "u.jsonl",
        event("r1", model="claude-mystery-9", input_tokens=5000),
        event("r2", input_tokens=1_000_000),
    )
    summary = run_cli("ingest", str(usage), "--format", "json", "--config", str(config_path)).json()
    assert summary["accepted"] == 2 and summary["unpriced"] == 1
    report = run_cli(
        "report", "--window", "all", "--by", "model", "--format", "json", "--config", str(config_path)
    ).json()
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["claude-mystery-9"]["requests"] == 1
    assert rows["claude-mystery-9"]["input_tokens"] == 5000
    assert rows["claude-mystery-9"]["unpriced_requests"] == 1
    assert rows["claude-mystery-9"]["cost_usd"] == "0.000000"
    assert report["total_usd"] == "1.000000"
    stored = (
        sqlite3.connect(tmp_path / "monitor.db")
        .execute("SELECT cost_pico, price_version FROM events WHERE request_id = 'r1'")
        .fetchone()
    )
    assert stored == (None, None)


def test_missing_file_is_reported_and_the_others_still_ingested(tmp_path: Path, config_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", event("r1", input_tokens=10))
    run = run_cli(
        "ingest",
        str(tmp_path / "missing.jsonl"),
        str(good),
        "--format",
        "json",
        "--config",
        str(config_path),
        check=False,
    )
    assert run.returncode == 1
    assert "missing.jsonl" in run.stderr
    assert run.json()["accepted"] == 1
