"""The demo's live phase against a real `serve`: admitted callers, the calls refused, the spend the cap held."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from monitor.cli import main
from monitor.client import MonitorClient
from monitor.config import load_settings
from monitor.simulate import (
    LiveOutcome,
    admission_request,
    explain_live,
    generate_events,
    refused_learners,
    run_admitted,
)
from tests.conftest import write_config
from tests.serve_harness import TOKEN, Serve, sum_metric, wait_until

CONFIG = """\
timezone: UTC
http: {listen: "127.0.0.1:0"}
sources: [{type: jsonl, path: "usage/*.jsonl", name: app-logs}]
schedule: {evaluate_every: 60s}
budgets:
  - name: per-user-daily
    match: {project: lingo}
    per: user
    window: day
    limit_usd: 1.00
    throttle_at: 1.0
"""
PICO = 10**12


def event(user: str, input_tokens: int, output_tokens: int, project: str = "lingo") -> dict[str, Any]:
    """A claude-haiku-4-5 call ($1 per million input tokens, $5 per million output tokens), usage in full."""
    return {
        "model": "claude-haiku-4-5",
        "usage": {
            "cache_creation": None,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
            "inference_geo": None,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "output_tokens_details": None,
            "server_tool_use": None,
            "service_tier": "standard",
            "speed": None,
        },
        "attributes": {"project": project, "user": user},
        "batch": False,
        "status": 200,
        "latency_ms": 100,
    }


def earlier_today() -> str:
    """A moment of today (UTC, the config's timezone) before now: when the replayed history happened."""
    now = datetime.now(UTC)
    return max(now - timedelta(seconds=2), now.replace(hour=0, minute=0, second=0, microsecond=0)).isoformat()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    (tmp_path / "usage").mkdir()
    daemon = Serve(write_config(tmp_path, CONFIG), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


def test_the_worst_case_a_simulated_caller_asks_covers_cache_writes_and_searches() -> None:
    call = event("ana", 1_000, 10)
    call["usage"].update(cache_creation_input_tokens=3_000, cache_read_input_tokens=500)
    call["usage"]["server_tool_use"] = {"web_fetch_requests": 0, "web_search_requests": 2}
    # 1,000 input + 2 x (3,000 + 500) cached + 2 searches x 12,500; haiku-4-5's max_tokens in the app is 2,048.
    assert admission_request(call) == {
        "model": "claude-haiku-4-5",
        "max_tokens": 2_048,
        "estimated_input_tokens": 33_000,
        "batch": False,
        "project": "lingo",
        "user": "ana",
    }


def test_live_callers_over_the_cap_are_refused_and_one_reaching_it_is_held_under(serve: Serve, tmp_path: Path) -> None:
    # Today's history, stamped before the daemon watched: ana $1.50 and ben $0.90 in lingo, cy $2.00 in
    # lingo-labs (another project: not what per-user-daily counts).
    stamp = earlier_today()
    history = [{**event("ana", 500_000, 0), "request_id": f"h-ana-{i}", "timestamp": stamp} for i in range(3)] + [
        {**event("ben", 900_000, 0), "request_id": "h-ben", "timestamp": stamp},
        {**event("cy", 2_000_000, 0, project="lingo-labs"), "request_id": "h-cy", "timestamp": stamp},
    ]
    (tmp_path / "usage" / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    wait_until(lambda: sum_metric(serve.metrics(), "claude_requests_total") >= 5)

    # Each live call costs 20,000 x $1/M + 1,000 x $5/M = $0.025; its worst case asked at admission is
    # 20,000 x $1/M + 2,048 x $5/M = $0.03024.
    # ana: $1.50 + $0.03024 > $1 -> refused, twice.
    # ben: $0.90, $0.925, $0.95 (+ $0.03024 <= $1) admitted; at $0.975, + $0.03024 = $1.00524 > $1 -> refused, 3x.
    # cy: $0 in lingo -> admitted.
    script = ["ana", "ben", "ben", "ben", "ben", "ben", "cy", "ana", "ben"]
    calls = iter(script)

    def make(ms: int, request_id: str) -> dict[str, Any]:
        stamped = datetime.fromtimestamp(ms / 1000, UTC).isoformat()
        return {**event(next(calls), 20_000, 1_000), "request_id": request_id, "timestamp": stamped}

    out = tmp_path / "usage" / "usage-live.jsonl"
    with MonitorClient(serve.url, token=TOKEN, background=False) as client:
        outcome = run_admitted(
            rate=len(script),
            duration_s=1,
            out_path=out,
            client=client,
            seed=7,
            clock=lambda: datetime.now(UTC),
            sleep=lambda _: None,
            make_event=make,
        )
    assert (outcome.calls, outcome.admitted, outcome.unanswered) == (9, 4, 0)
    assert outcome.refused_by_user == {"ana": {"per-user-daily": 2}, "ben": {"per-user-daily": 3}}
    assert outcome.admitted_by_user == {"ben": 3, "cy": 1}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["attributes"]["user"] for e in written] == ["ben", "ben", "ben", "cy"]
    assert all(e["lease"] for e in written)
    wait_until(lambda: sum_metric(serve.metrics(), "claude_requests_total") >= 9)

    settings = load_settings(tmp_path / "claude-monitor.yaml").settings
    budget = settings.budgets[0]
    engine = create_engine(settings.database_url)
    try:
        rows = refused_learners(outcome, budget, engine, settings.zone)
    finally:
        engine.dispose()
    assert [(r.user, r.before_pico, r.live_pico, r.admitted, r.refused) for r in rows] == [
        ("ana", 3 * PICO // 2, 0, 0, 2),
        ("ben", 9 * PICO // 10, 3 * PICO // 40, 3, 3),  # 3 x $0.025; today $0.975, under the cap
    ]

    text = explain_live(outcome, budget, rows, duration_s=1)
    lines = text.splitlines()
    assert lines[2].split() == ["ana", "$1.50", "0", "2", "$0.00", "$1.50"]
    assert lines[3].split() == ["ben", "$0.90", "3", "3", "$0.075", "$0.975"]
    flat = " ".join(text.split())
    assert (
        "each of 9 simulated calls asked the daemon first (POST /v1/admit); it admitted 4 calls and refused 5 calls "
        "by the 2 learners above, whose spend plus the call's worst case would have passed $1.00."
    ) in flat
    assert "the 1 learner already past the cap spent $0.00 in the live phase" in flat
    assert "the 1 learner who reached it during the live phase spent $0.075 there, none of it past the cap." in flat


def test_the_outcome_prints_as_json() -> None:
    outcome = LiveOutcome(datetime(2026, 12, 2, 6, 0, tzinfo=UTC), 3, 1, 0, {"ben": 1}, {"ana": {"per-user-daily": 2}})
    assert outcome.to_json() == {
        "started": "2026-12-02T06:00:00Z",
        "calls": 3,
        "admitted": 1,
        "refused": 2,
        "unanswered": 0,
        "admitted_by_user": {"ben": 1},
        "refused_by_user": {"ana": {"per-user-daily": 2}},
    }


def test_the_command_explains_a_live_run_from_the_store(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One learner, u-000001, already at $1.50 of lingo spend today: every lingo call it makes live is refused.
    stamp = earlier_today()
    history = [{**event("u-000001", 500_000, 0), "request_id": f"h-{i}", "timestamp": stamp} for i in range(3)]
    (tmp_path / "usage" / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    wait_until(lambda: sum_metric(serve.metrics(), "claude_requests_total") >= 3)
    monkeypatch.setenv("CLAUDE_MONITOR_INGEST_TOKEN", TOKEN)
    config = str(tmp_path / "claude-monitor.yaml")
    args = ["simulate", "--config", config, "--live", "--admit", serve.url, "--rate", "40", "--duration", "0.5"]
    assert main([*args, "--users", "1", "--seed", "5", "--out", str(tmp_path / "usage"), "--explain"]) == 0
    text = capsys.readouterr().out
    row = next(line.split() for line in text.splitlines() if line.startswith("u-000001"))
    assert row[1] == "$1.50" and row[2] == "0" and int(row[3]) > 0 and row[4:] == ["$0.00", "$1.50"]
    assert "the 1 learner already past the cap spent $0.00 in the live phase" in " ".join(text.split())


def test_explain_and_admit_need_a_live_run(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--config", str(config_path), "--explain"]) == 2
    assert "--explain tells what admission refused: it needs --live --admit URL" in capsys.readouterr().err
    assert main(["simulate", "--config", str(config_path), "--admit", "http://127.0.0.1:9"]) == 2
    assert "--admit URL: only live traffic can ask the daemon before each call; add --live" in capsys.readouterr().err


def test_the_max_tokens_a_simulated_caller_asks_covers_every_output_it_draws() -> None:
    # A week at 2 events a minute: nightly batches (400 more output tokens) and Sonnet's long prompts included.
    start = datetime(2026, 11, 23, tzinfo=UTC)
    lines = generate_events(count=20_160, start=start, end=start + timedelta(days=7), seed=11)
    drawn = [json.loads(line) for line in lines]
    assert any(e["batch"] for e in drawn)
    assert all(e["usage"]["output_tokens"] <= admission_request(e)["max_tokens"] for e in drawn)
