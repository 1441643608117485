"""Tests of the synthetic traffic generator: shape, mix, timing, fault injection and file output."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Usage

from monitor.simulate import generate_events, run_live, write_files

MONDAY = datetime(2026, 11, 23, tzinfo=UTC)
WEEK_LATER = MONDAY + timedelta(days=7)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
USAGE_FIELDS = {
    "cache_creation",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "inference_geo",
    "input_tokens",
    "output_tokens",
    "output_tokens_details",
    "server_tool_use",
    "service_tier",
    "speed",
}
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
FAMILIES = {
    "claude-haiku-4-5": "haiku-4-5",
    "claude-haiku-4-5-20251001": "haiku-4-5",
    "claude-sonnet-4-5": "sonnet-4-5",
    "claude-sonnet-4-5-20250929": "sonnet-4-5",
    "claude-opus-4-5": "opus-4-5",
    "claude-opus-4-5-20251101": "opus-4-5",
    "claude-3-5-haiku-20241022": "3-5-haiku",
}


def parse_time(text: str) -> datetime:
    """RFC 3339 with a Z suffix, as usage events write it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def prompt_size(usage: dict[str, Any]) -> int:
    """Input + cache writes + cache reads (the prompt size), nulls as 0."""
    return sum(usage[k] or 0 for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))


def count_ok(value: Any) -> bool:
    """A token count the event format accepts: absent/null, or a whole number from 0 to 10,000,000."""
    if value is None:
        return True
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000_000


def spec_problem(line: str, now: datetime) -> str | None:
    """Why the event format rejects this line (None: a valid usage event); from docs/events.md's rules, not the code."""
    try:
        event = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(event, dict):
        return "not an object"
    for key in ("request_id", "timestamp", "model", "usage"):
        if event.get(key) is None:
            return f"no {key}"
    if not isinstance(event["request_id"], str) or not isinstance(event["model"], str):
        return "wrong type"
    usage = event["usage"]
    if not isinstance(usage, dict):
        return "usage not an object"
    try:
        stamp = parse_time(event["timestamp"])
    except (TypeError, ValueError):
        return "bad timestamp"
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    if stamp > now + timedelta(hours=24):
        return "timestamp in the future"
    if not all(count_ok(usage.get(k)) for k in TOKEN_FIELDS):
        return "bad token count"
    for part in ("cache_creation", "server_tool_use"):
        detail = usage.get(part)
        if detail is not None and not all(count_ok(v) for v in detail.values()):
            return f"bad {part}"
    return None


def events(**kwargs: Any) -> list[dict[str, Any]]:
    """Generate and parse, failing on any line that is not JSON."""
    return [json.loads(line) for line in generate_events(**kwargs)]


@pytest.fixture(scope="module")
def week() -> list[dict[str, Any]]:
    """A week of traffic, Monday to Monday."""
    return events(count=50_000, start=MONDAY, end=WEEK_LATER, seed=7)


def share(items: list[dict[str, Any]], test: Any) -> float:
    return sum(1 for item in items if test(item)) / len(items)


def test_same_seed_same_lines_other_seed_other_lines() -> None:
    def run(seed: int) -> list[str]:
        return list(
            generate_events(
                count=3_000, start=MONDAY, end=WEEK_LATER, seed=seed, duplicate_fraction=0.05, bad_fraction=0.05
            )
        )

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("count", [0, 1, 2, 999, 12_345])
def test_yields_exactly_count_lines(count: int) -> None:
    assert sum(1 for _ in generate_events(count=count, start=MONDAY, end=WEEK_LATER)) == count


@pytest.mark.parametrize(
    ("start", "end", "count"),
    [
        (MONDAY, WEEK_LATER, 20_000),
        (MONDAY, MONDAY + timedelta(seconds=1), 5_000),  # more events than milliseconds
        # odd edges: mid-millisecond start, across the batch hour and a day boundary
        (datetime(2026, 11, 24, 1, 59, 59, 500_250, tzinfo=UTC), datetime(2026, 11, 24, 2, 0, 1, tzinfo=UTC), 700),
        (datetime(2026, 11, 24, 23, 30, tzinfo=UTC), datetime(2026, 11, 25, 0, 30, tzinfo=UTC), 2_000),
    ],
)
def test_timestamps_in_order_and_inside_the_range(start: datetime, end: datetime, count: int) -> None:
    stamps = [e["timestamp"] for e in events(count=count, start=start, end=end)]
    assert all(TIMESTAMP.match(s) for s in stamps)
    times = [parse_time(s) for s in stamps]
    assert times == sorted(times)
    assert start <= times[0]
    assert times[-1] < end


def test_naive_datetimes_mean_utc() -> None:
    naive = list(generate_events(count=500, start=datetime(2026, 11, 23), end=datetime(2026, 11, 24)))
    aware = list(generate_events(count=500, start=MONDAY, end=MONDAY + timedelta(days=1)))
    assert naive == aware


def test_traffic_is_spread_over_the_whole_range(week: list[dict[str, Any]]) -> None:
    per_day = Counter(e["timestamp"][:10] for e in week)
    assert len(per_day) == 7
    assert all(0.08 < n / len(week) < 0.20 for n in per_day.values())
    per_hour = Counter(e["timestamp"][11:13] for e in week if not e["batch"])
    assert len(per_hour) == 24
    assert per_hour["19"] > 2 * per_hour["04"]  # evening peak, night trough


def test_every_line_is_a_spec_event(week: list[dict[str, Any]]) -> None:
    ids = [e["request_id"] for e in week]
    assert len(set(ids)) == len(ids)
    assert ids[:3] == ["req_sim_7_1", "req_sim_7_2", "req_sim_7_3"]
    for event in week:
        assert spec_problem(json.dumps(event), WEEK_LATER) is None, event
        assert list(event) == [
            "request_id",
            "timestamp",
            "model",
            "usage",
            "attributes",
            "batch",
            "status",
            "latency_ms",
        ]
        usage = event["usage"]
        assert set(usage) == USAGE_FIELDS
        for key in ("input_tokens", "output_tokens"):
            assert isinstance(usage[key], int)
            assert usage[key] >= 0
        if usage["cache_creation"] is not None:
            detail = usage["cache_creation"]
            assert usage["cache_creation_input_tokens"] == (
                detail["ephemeral_5m_input_tokens"] + detail["ephemeral_1h_input_tokens"]
            )
        assert set(event["attributes"]) == {"api_key", "project", "user", "feature", "environment"}
        assert all(isinstance(v, str) for v in event["attributes"].values())
        assert isinstance(event["batch"], bool)
        assert isinstance(event["latency_ms"], int)
        assert event["latency_ms"] > 0


def test_usage_is_what_the_sdk_dumps(week: list[dict[str, Any]]) -> None:
    for event in week[:2_000]:
        usage = event["usage"]
        dumped = Usage.model_validate(usage).model_dump()
        assert {k: dumped[k] for k in usage} == usage


def test_model_mix(week: list[dict[str, Any]]) -> None:
    sample = week[:20_000]
    assert {e["model"] for e in sample} == set(FAMILIES)  # aliases and dated ids both appear
    families = Counter(FAMILIES[e["model"]] for e in sample)
    assert 0.77 < families["haiku-4-5"] / len(sample) < 0.83
    assert 0.10 < families["sonnet-4-5"] / len(sample) < 0.14
    assert 0.02 < families["opus-4-5"] / len(sample) < 0.04
    assert 0.03 < families["3-5-haiku"] / len(sample) < 0.07


def test_batch_jobs_run_between_two_and_three_each_night(week: list[dict[str, Any]]) -> None:
    batch = [e for e in week if e["batch"]]
    assert 0.02 < len(batch) / len(week) < 0.07
    assert {e["timestamp"][11:13] for e in batch} == {"02"}
    assert len({e["timestamp"][:10] for e in batch}) == 7  # every night
    assert {e["attributes"]["feature"] for e in batch} == {"nightly-lesson-gen"}
    assert {e["attributes"]["user"] for e in batch} == {"system"}
    assert all(e["usage"]["service_tier"] == "batch" for e in batch)
    assert all(e["usage"]["service_tier"] != "batch" for e in week if not e["batch"])
    # a burst: the 02:00 hour carries several times an ordinary night hour
    assert sum(1 for e in week if e["timestamp"][11:13] == "02") > 3 * sum(
        1 for e in week if e["timestamp"][11:13] == "03"
    )


def test_haiku_reads_a_cached_system_prompt(week: list[dict[str, Any]]) -> None:
    haiku = [
        e["usage"]
        for e in week
        if FAMILIES[e["model"]] == "haiku-4-5" and e["status"] == 200 and e["usage"]["server_tool_use"] is None
    ]
    assert share(haiku, lambda u: 1_000 <= u["cache_read_input_tokens"] <= 10_000) > 0.9
    writes_5m = share(haiku, lambda u: u["cache_creation"]["ephemeral_5m_input_tokens"] > 0)
    writes_1h = share(haiku, lambda u: u["cache_creation"]["ephemeral_1h_input_tokens"] > 0)
    assert 0.01 < writes_5m < 0.08
    assert 0 < writes_1h < writes_5m
    assert all(50 <= u["input_tokens"] <= 2_000 for u in haiku if u["service_tier"] == "standard")
    assert all(50 <= u["output_tokens"] <= 800 for u in haiku if u["service_tier"] == "standard")


def test_users_have_a_long_tail(week: list[dict[str, Any]]) -> None:
    users = Counter(e["attributes"]["user"] for e in week if not e["batch"])
    assert all(re.fullmatch(r"u-\d{6}", u) for u in users)
    assert all(1 <= int(u[2:]) <= 20_000 for u in users)
    assert len(users) > 10_000  # the tail
    top = sum(n for _, n in users.most_common(200))  # 1% of the user base
    assert top / users.total() > 0.1  # the head
    assert users.most_common(1)[0][1] / users.total() < 0.05  # no single user dominates


def test_users_parameter_bounds_the_ids() -> None:
    users = {e["attributes"]["user"] for e in events(count=5_000, start=MONDAY, end=WEEK_LATER, users=40)}
    assert users - {"system"} <= {f"u-{n:06d}" for n in range(1, 41)}
    assert len(users - {"system"}) > 30


def test_other_attributes(week: list[dict[str, Any]]) -> None:
    attrs = [e["attributes"] for e in week]
    assert {a["api_key"] for a in attrs} == {"lingo-prod", "lingo-web"}
    assert {(a["project"], a["environment"]) for a in attrs} == {("lingo", "prod"), ("lingo-labs", "staging")}
    assert 0.01 < share(attrs, lambda a: a["project"] == "lingo-labs") < 0.06
    features = {a["feature"] for a in attrs}
    assert {"grammar-check", "conversation", "translate", "lesson-gen", "pronunciation-feedback"} <= features


def test_failed_requests_have_zero_usage(week: list[dict[str, Any]]) -> None:
    failed = [e for e in week if e["status"] != 200]
    assert 0.002 < len(failed) / len(week) < 0.01
    assert {e["status"] for e in failed} == {429, 529, 500}
    for event in failed:
        assert prompt_size(event["usage"]) == 0
        assert event["usage"]["output_tokens"] == 0


def test_web_search_and_long_prompts(week: list[dict[str, Any]]) -> None:
    searches = [e["usage"]["server_tool_use"]["web_search_requests"] for e in week if e["usage"]["server_tool_use"]]
    assert 0.005 < len(searches) / len(week) < 0.015
    assert set(searches) == {1, 2, 3}
    long = [e for e in week if prompt_size(e["usage"]) > 200_000]
    sonnet = [e for e in week if FAMILIES[e["model"]] == "sonnet-4-5"]
    assert {FAMILIES[e["model"]] for e in long} == {"sonnet-4-5"}
    assert 0.0005 < len(long) / len(sonnet) < 0.005


@pytest.mark.parametrize(("fraction", "count"), [(0.05, 10_000), (0.5, 1_000), (0.001, 5_000)])
def test_duplicates_repeat_earlier_lines_verbatim(fraction: float, count: int) -> None:
    lines = list(generate_events(count=count, start=MONDAY, end=WEEK_LATER, seed=11, duplicate_fraction=fraction))
    first: dict[str, str] = {}
    repeats = 0
    for line in lines:
        event = json.loads(line)
        if event["request_id"] in first:
            assert first[event["request_id"]] == line
            repeats += 1
        else:
            first[event["request_id"]] = line
    assert repeats == round(count * fraction)
    originals = [parse_time(json.loads(line)["timestamp"]) for line in first.values()]
    assert originals == sorted(originals)


@pytest.mark.parametrize(("fraction", "count"), [(0.03, 10_000), (0.3, 1_000)])
def test_bad_lines_are_bad_and_counted(fraction: float, count: int) -> None:
    lines = list(generate_events(count=count, start=MONDAY, end=WEEK_LATER, seed=5, bad_fraction=fraction))
    problems = [p for p in (spec_problem(line, WEEK_LATER) for line in lines) if p is not None]
    assert len(problems) == round(count * fraction)
    assert len(set(problems)) >= 6  # a variety of faults, not one
    good_ids = [json.loads(line)["request_id"] for line in lines if spec_problem(line, WEEK_LATER) is None]
    assert len(set(good_ids)) == len(good_ids)
    assert all(line and "\n" not in line for line in lines)


def test_no_faults_by_default() -> None:
    lines = list(generate_events(count=5_000, start=MONDAY, end=WEEK_LATER, seed=5))
    assert all(spec_problem(line, WEEK_LATER) is None for line in lines)
    assert len({json.loads(line)["request_id"] for line in lines}) == len(lines)


def test_duplicates_and_bad_lines_together() -> None:
    lines = list(
        generate_events(count=2_000, start=MONDAY, end=WEEK_LATER, seed=9, duplicate_fraction=0.1, bad_fraction=0.2)
    )
    bad = [line for line in lines if spec_problem(line, WEEK_LATER) is not None]
    good = Counter(json.loads(line)["request_id"] for line in lines if spec_problem(line, WEEK_LATER) is None)
    assert len(bad) == 400
    assert sum(good.values()) - len(good) == 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": -1},
        {"end": MONDAY},
        {"end": MONDAY - timedelta(days=1)},
        {"users": 0},
        {"duplicate_fraction": -0.1},
        {"bad_fraction": 1.5},
        {"duplicate_fraction": 0.6, "bad_fraction": 0.6},
    ],
)
def test_bad_arguments_fail_at_the_call(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"count": 10, "start": MONDAY, "end": WEEK_LATER} | kwargs
    with pytest.raises(ValueError):
        generate_events(**args)


def test_streams_without_building_the_whole_run() -> None:
    # A trillion-event run yields its first lines at once: nothing is built up front.
    head = list(itertools.islice(generate_events(count=10**12, start=MONDAY, end=WEEK_LATER), 1_000))
    assert len(head) == 1_000


def test_write_files_splits_in_order(tmp_path: Path) -> None:
    lines = list(generate_events(count=2_500, start=MONDAY, end=WEEK_LATER))
    out = tmp_path / "new" / "dir"
    paths = write_files(lines, out, lines_per_file=1_000)
    assert [p.name for p in paths] == ["usage-0001.jsonl", "usage-0002.jsonl", "usage-0003.jsonl"]
    assert sorted(out.iterdir()) == paths
    texts = [p.read_text(encoding="utf-8") for p in paths]
    assert [t.count("\n") for t in texts] == [1_000, 1_000, 500]
    assert all(t.endswith("\n") for t in texts)
    assert "".join(texts).splitlines() == lines


def test_write_files_one_file_by_default(tmp_path: Path) -> None:
    lines = [json.dumps({"n": n}) for n in range(10)]
    paths = write_files(iter(lines), tmp_path, prefix="demo")
    assert paths == [tmp_path / "demo-0001.jsonl"]
    assert paths[0].read_text(encoding="utf-8") == "".join(line + "\n" for line in lines)


def test_write_files_exact_multiple_and_empty(tmp_path: Path) -> None:
    paths = write_files([str(n) for n in range(6)], tmp_path / "a", lines_per_file=3)
    assert [p.read_text(encoding="utf-8") for p in paths] == ["0\n1\n2\n", "3\n4\n5\n"]
    assert write_files([], tmp_path / "b") == []
    with pytest.raises(ValueError):
        write_files(["x"], tmp_path / "c", lines_per_file=-1)


class FakeTime:
    """A clock that only moves when slept on, and notes what the output file held at each sleep."""

    def __init__(self, start: datetime, watch: Path) -> None:
        self.now = start
        self.watch = watch
        self.slept = 0.0
        self.seen: list[str] = []

    def clock(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.seen.append(self.watch.read_text(encoding="utf-8"))
        self.slept += seconds
        self.now += timedelta(seconds=seconds)


def test_run_live_paces_stamps_and_flushes(tmp_path: Path) -> None:
    out = tmp_path / "live" / "usage.jsonl"
    fake = FakeTime(datetime(2026, 11, 24, 9, 0, tzinfo=UTC), out)
    written = run_live(rate=20, duration_s=3, out_path=out, clock=fake.clock, sleep=fake.sleep)
    assert written == 60
    assert fake.slept == pytest.approx(3 - 1 / 20)
    # each line was on disk, whole, before the pause that followed it
    assert [text.count("\n") for text in fake.seen] == list(range(1, 60))
    assert all(text.endswith("\n") for text in fake.seen)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    assert all(spec_problem(line, fake.now) is None for line in lines)
    stamps = [parse_time(json.loads(line)["timestamp"]) for line in lines]
    assert stamps == [datetime(2026, 11, 24, 9, 0, tzinfo=UTC) + timedelta(milliseconds=50 * n) for n in range(60)]


def test_run_live_appends_and_never_reuses_request_ids(tmp_path: Path) -> None:
    out = tmp_path / "usage.jsonl"
    fake = FakeTime(datetime(2026, 11, 24, 2, 30, tzinfo=UTC), out)
    out.write_text("", encoding="utf-8")
    assert run_live(rate=100, duration_s=1, out_path=out, clock=fake.clock, sleep=fake.sleep) == 100
    assert run_live(rate=100, duration_s=1, out_path=out, clock=fake.clock, sleep=fake.sleep) == 100
    ids = [json.loads(line)["request_id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(ids) == 200
    assert len(set(ids)) == 200


def test_run_live_zero_duration_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "usage.jsonl"
    fake = FakeTime(MONDAY, out)
    assert run_live(rate=5, duration_s=0, out_path=out, clock=fake.clock, sleep=fake.sleep) == 0
    with pytest.raises(ValueError):
        run_live(rate=0, duration_s=1, out_path=out, clock=fake.clock, sleep=fake.sleep)
