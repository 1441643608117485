"""Whatever clients send, /metrics, the admitted label values and the pricing cache stay bounded — and spend is never
lost: invented model ids and attribute values against a real `serve` (SQLite, and two replicas on PostgreSQL),
writers racing on PostgreSQL, 100k distinct speed/geo strings."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from monitor.config import ConfigError, load_settings
from monitor.ingest.parse import Event, Rejected
from monitor.pricing import load_price_table
from monitor.service import Store, open_store
from monitor.store.models import counters, events, label_values
from tests.conftest import FakeClock, write_config
from tests.serve_harness import Serve, wait_until
from tests.test_migrations import alembic
from tests.test_postgres import pg_config, scalar

# Starts `serve` processes and PostgreSQL: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

DEFAULT_CAP = 200  # metrics.max_values_per_label, as documented
DEFAULT_UNPRICED_CAP = 50  # metrics.max_unpriced_models, as documented
ATTACK = 20_000
PER_POST = 5_000

SERVE_CONFIG = """\
timezone: UTC
sources: []
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
"""


@dataclass
class Scrape:
    """One /metrics answer: its size, and its samples as (name, labels) -> the value's text."""

    bytes: int
    lines: int
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], str]

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]

    def values(self, name: str, label: str) -> set[str]:
        return {labels[label] for labels in self.series(name)}

    def total(self, name: str) -> Decimal:
        """The exact sum of a family's samples, read from the exposition text (not through float arithmetic)."""
        return sum((Decimal(v) for (n, _), v in self.samples.items() if n == name), Decimal(0))


def scrape(daemon: Serve) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    answer = daemon.get("/metrics")
    assert answer.status == 200
    text = answer.body.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # repr() is the shortest text of the float: the text the exposition carried, read as an exact decimal.
            samples[sample.name, tuple(sorted(sample.labels.items()))] = repr(sample.value)
    return Scrape(len(answer.body), text.count("\n"), samples)


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def attack_event(n: int, *, model: str, project: str, output_tokens: int) -> dict[str, Any]:
    return {
        "request_id": f"req-{n:06d}",
        "timestamp": datetime.now(UTC).isoformat(),
        "model": model,
        "usage": {"input_tokens": 100, "output_tokens": output_tokens},
        "attributes": {"project": project, "environment": "prod"},
        "status": 200,
        "latency_ms": 250,
    }


def post_all(daemon: Serve, docs: Sequence[dict[str, Any]]) -> None:
    for start in range(0, len(docs), PER_POST):
        chunk = list(docs[start : start + PER_POST])
        answer = daemon.post_usage(chunk)
        assert answer.status == 202, answer.body[:300]
        assert answer.json()["accepted"] == len(chunk)


def settled(daemon: Serve, requests: int) -> Scrape:
    """The scrape once every accepted request shows (a scrape may serve a snapshot up to a second old)."""
    return wait_until(
        lambda: (s := scrape(daemon)).total("claude_requests_total") == requests and s,
        timeout=15,
        interval=0.2,
    )


def haiku_usd(output_tokens: int) -> Decimal:
    """claude-haiku-4-5 at $1/M input and $5/M output, for 100 input tokens: by hand."""
    return (100 * Decimal(1) + output_tokens * Decimal(5)) / 1_000_000


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    yield serve
    serve.stop(signal.SIGKILL)


# --- invented model ids ---------------------------------------------------------------------------------------------


def test_invented_model_ids_leave_metrics_bounded(daemon: Serve) -> None:
    post_all(daemon, [attack_event(0, model="claude-haiku-4-5", project="lingo", output_tokens=1000)])
    before = settled(daemon, 1)
    rss_before = rss_mib(daemon.proc.pid)

    long_id = "claude-invented-" + "x" * 200  # ids up to 255 characters are accepted
    docs = [
        attack_event(n, model=f"{long_id}-{n:05d}", project="lingo", output_tokens=1000) for n in range(1, ATTACK + 1)
    ]
    post_all(daemon, docs)
    after = settled(daemon, ATTACK + 1)
    rss_after = rss_mib(daemon.proc.pid)
    print(
        f"\n{ATTACK} invented models: /metrics {before.lines} -> {after.lines} lines, "
        f"{before.bytes} -> {after.bytes} bytes; serve RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )

    # Every usage family names one price-table model and `unpriced`, nothing else.
    for family in ("claude_requests_total", "claude_tokens_total", "claude_request_duration_seconds_count"):
        assert after.values(family, "model") == {"claude-haiku-4-5", "unpriced"}, family
    # The raw ids: the first max_unpriced_models ids seen, and __other__ for the rest; every event counted.
    unpriced = after.values("claude_monitor_unpriced_events_total", "model")
    assert len(unpriced) == DEFAULT_UNPRICED_CAP + 1
    assert unpriced == {f"{long_id}-{n:05d}" for n in range(1, DEFAULT_UNPRICED_CAP + 1)} | {"__other__"}
    assert after.total("claude_monitor_unpriced_events_total") == ATTACK
    assert after.samples["claude_monitor_unpriced_events_total", (("model", "__other__"),)] == f"{ATTACK - 50}.0"
    # Spend is that of the one priced request; nothing is costed $0 under an invented name.
    assert after.total("claude_cost_usd_total") == haiku_usd(1000)

    # Growth: one unpriced series per admitted id plus __other__, and the `unpriced` model's own series (requests,
    # 2 token types, a histogram of 10 buckets + Inf + sum + count): 16 lines. Each line at most ~330 bytes.
    new_lines = (DEFAULT_UNPRICED_CAP + 1) + 16
    assert after.lines - before.lines <= new_lines
    assert after.bytes - before.bytes <= new_lines * 330
    assert rss_after - rss_before < 100, "serve memory grew with the number of invented models"


# --- invented attribute values --------------------------------------------------------------------------------------


def test_invented_projects_leave_metrics_bounded_and_spend_whole(daemon: Serve, tmp_path: Path) -> None:
    post_all(daemon, [attack_event(0, model="claude-haiku-4-5", project="lingo", output_tokens=1000)])
    before = settled(daemon, 1)
    rss_before = rss_mib(daemon.proc.pid)

    docs = [
        attack_event(n, model="claude-haiku-4-5", project=f"project-{n:05d}", output_tokens=1000 + n % 97)
        for n in range(1, ATTACK + 1)
    ]
    post_all(daemon, docs)
    after = settled(daemon, ATTACK + 1)
    rss_after = rss_mib(daemon.proc.pid)
    print(
        f"\n{ATTACK} invented projects: /metrics {before.lines} -> {after.lines} lines, "
        f"{before.bytes} -> {after.bytes} bytes; serve RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )

    # The first 200 values seen keep their series: lingo, then the first 199 invented ones; the rest is __other__.
    admitted = {"lingo"} | {f"project-{n:05d}" for n in range(1, DEFAULT_CAP)}
    for family in ("claude_requests_total", "claude_cost_usd_total", "claude_tokens_total"):
        assert after.values(family, "project") == admitted | {"__other__"}, family
    assert after.values("claude_requests_total", "environment") == {"prod"}
    other = (("environment", "prod"), ("model", "claude-haiku-4-5"), ("project", "__other__"))
    assert after.samples["claude_requests_total", other] == f"{ATTACK - (DEFAULT_CAP - 1)}.0"

    # Not a cent lost to the cap: the series add up to the hand-computed spend, exactly.
    expected = haiku_usd(1000) + sum((haiku_usd(1000 + n % 97) for n in range(1, ATTACK + 1)), Decimal(0))
    assert after.total("claude_cost_usd_total") == expected
    assert after.total("claude_requests_total") == ATTACK + 1

    # Growth: per admitted value and __other__, one cost, one requests and two token-type series.
    assert after.lines - before.lines <= 4 * (DEFAULT_CAP + 1)
    assert after.bytes - before.bytes <= 4 * (DEFAULT_CAP + 1) * 160
    assert rss_after - rss_before < 100, "serve memory grew with the number of invented projects"

    # The bound holds where the counters are written, not only where they are rendered.
    stored = sqlite3.connect(tmp_path / "monitor.db").execute("SELECT name, labels FROM counters").fetchall()
    assert {json.loads(labels).get("project") for _, labels in stored} - {None} == admitted | {"__other__"}
    assert len(stored) <= 4 * (DEFAULT_CAP + 1) + 20

    # Sticky: an admitted value keeps its series, a late one stays __other__, also after a restart.
    daemon.stop()
    again = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    try:
        post_all(
            again,
            [
                attack_event(ATTACK + 1, model="claude-haiku-4-5", project="project-00005", output_tokens=1000),
                attack_event(ATTACK + 2, model="claude-haiku-4-5", project="project-19999", output_tokens=1000),
            ],
        )
        later = settled(again, ATTACK + 3)
        assert later.values("claude_requests_total", "project") == admitted | {"__other__"}
        five = (("environment", "prod"), ("model", "claude-haiku-4-5"), ("project", "project-00005"))
        assert later.samples["claude_requests_total", five] == "2.0"
        assert later.samples["claude_requests_total", other] == f"{ATTACK - (DEFAULT_CAP - 1) + 1}.0"
    finally:
        again.stop(signal.SIGKILL)


# --- two replicas on PostgreSQL -------------------------------------------------------------------------------------

REPLICA_CONFIG = SERVE_CONFIG + "metrics: {labels: [project, environment], max_values_per_label: 20}\n"


def test_two_replicas_render_the_same_bounded_series(pg_url: str, tmp_path: Path) -> None:
    replicas = [Serve(pg_config(tmp_path / name, pg_url, REPLICA_CONFIG), tmp_path / name) for name in ("a", "b")]
    try:
        # Both replicas get new values at the same moment, round after round, and race for the last slots.
        rounds, size = 10, 40
        errors: list[str] = []

        def post(replica: Serve, docs: list[dict[str, Any]], ready: threading.Barrier) -> None:
            ready.wait()
            answer = replica.post_usage(docs)
            if answer.status != 202 or answer.json()["accepted"] != len(docs):
                errors.append(f"{answer.status} {answer.body[:200]!r}")

        n = 0
        for r in range(rounds):
            work = []
            for side in range(2):
                docs = []
                for _ in range(size):
                    n += 1
                    docs.append(
                        attack_event(n, model="claude-haiku-4-5", project=f"p-{r}-{side}-{n % 7}", output_tokens=10)
                    )
                work.append(docs)
            ready = threading.Barrier(2)
            threads = [threading.Thread(target=post, args=(replicas[i], work[i], ready)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert errors == []

        a, b = (settled(replica, n) for replica in replicas)
        for family in ("claude_requests_total", "claude_cost_usd_total", "claude_tokens_total"):
            assert {tuple(sorted(s.items())) for s in a.series(family)} == {
                tuple(sorted(s.items())) for s in b.series(family)
            }, family
        projects = a.values("claude_requests_total", "project")
        assert len(projects) == 20 + 1 and "__other__" in projects
        counted = ("claude_requests_total", "claude_cost_usd_total", "claude_tokens_total", "claude_monitor_unpriced")
        assert {k: v for k, v in a.samples.items() if k[0].startswith(counted)} == {
            k: v for k, v in b.samples.items() if k[0].startswith(counted)
        }  # the same values too: counters come from the one database
        assert scalar(pg_url, "SELECT count(*) FROM label_values WHERE label = 'project'") == 20
        assert scalar(pg_url, "SELECT max(slot) FROM label_values WHERE label = 'project'") == 19
        print(f"\ntwo replicas: {a.lines} lines, {a.bytes} bytes each; projects {len(projects)}")
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)


# --- writers racing on PostgreSQL, in process -----------------------------------------------------------------------


def open_pg(url: str, directory: Path, clock: FakeClock, text: str) -> Store:
    return open_store(
        load_settings(pg_config(directory, url, text), environ={}), clock=clock, snapshot_file=directory / "t.json"
    )


def usage(request_id: str, when: datetime, output_tokens: int, **attributes: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "timestamp": when.isoformat(),
        "model": attributes.pop("model", "claude-haiku-4-5"),
        "usage": {"input_tokens": 100, "output_tokens": output_tokens},
        "attributes": attributes,
    }


def race(stores: Sequence[Store], batches: Sequence[list[dict[str, Any]]]) -> tuple[list[int], list[str]]:
    """Each store writes its batch at the same moment; (accepted per store, errors)."""
    accepted = [0] * len(stores)
    errors: list[str] = []
    ready = threading.Barrier(len(stores))

    def write(n: int) -> None:
        items: list[tuple[str, Event | Rejected]] = [
            (f"#{i}", stores[n].parser.parse_object(doc)) for i, doc in enumerate(batches[n])
        ]
        ready.wait()
        try:
            accepted[n] = stores[n].writer.write(items, "http").accepted
        except Exception as exc:
            errors.append(str(exc).splitlines()[0])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return accepted, errors


def test_overlapping_request_ids_in_opposite_orders_never_deadlock(
    pg_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    # The same 30 events reach two writers (a retrying proxy, a tailer and the API), one in reverse order. Both insert
    # them in one transaction; unless both take the request_ids in one order, each waits for an id the other holds
    # and PostgreSQL aborts one (deadlock detected).
    stores = [open_pg(pg_url, tmp_path / name, clock, "") for name in ("a", "b")]
    rounds, size = 10, 1000
    try:
        expected = Decimal(0)
        for r in range(rounds):
            docs = [usage(f"r{r:02d}-{i:02d}", clock.now, 1000 + i, project="lingo") for i in range(size)]
            expected += sum((haiku_usd(1000 + i) for i in range(size)), Decimal(0))
            accepted, errors = race(stores, [docs, docs[::-1]])
            assert errors == [], f"round {r}: {errors}"
            assert sum(accepted) == size, f"round {r}: accepted {accepted}"
        with stores[0].engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(events)).scalar() == rounds * size
            cost = connection.execute(select(func.sum(events.c.cost_pico))).scalar()
            assert Decimal(cost) / 10**12 == expected
            requests = select(func.sum(counters.c.value)).where(counters.c.name == "requests")
            assert connection.execute(requests).scalar() == rounds * size
    finally:
        for store in stores:
            store.close()


def test_racing_writers_never_admit_more_than_the_cap(pg_url: str, tmp_path: Path, clock: FakeClock) -> None:
    text = "metrics: {labels: [project], max_values_per_label: 12, max_unpriced_models: 3}\n"
    stores = [open_pg(pg_url, tmp_path / name, clock, text) for name in ("a", "b", "c")]
    try:
        n = 0
        for r in range(8):
            batches = []
            for side in range(3):
                batch = []
                for k in range(3):  # 9 new values and 9 new model ids a round: the race for the last slots
                    n += 1
                    batch.append(usage(f"e{n}", clock.now, 10, project=f"v{r}-{side}-{k}", model=f"m{r}-{side}-{k}"))
                batches.append(batch)
            accepted, errors = race(stores, batches)
            assert errors == [] and accepted == [3, 3, 3]
            with stores[0].engine.connect() as connection:
                count = select(label_values.c.label, func.count()).group_by(label_values.c.label)
                held = dict(connection.execute(count).all())
                assert held.get("project", 0) <= 12 and held.get("model", 0) <= 3
        assert held == {"project": 12, "model": 3}
        with stores[0].engine.connect() as connection:
            admitted = set(connection.execute(select(label_values.c.value).where(label_values.c.label == "project")))
            rows = connection.execute(select(counters.c.name, counters.c.labels)).all()
        written = {
            json.loads(labels)["project"] for name, labels in rows if name in ("requests", "cost_pico", "tokens")
        }
        assert written == {v for (v,) in admitted} | {"__other__"}
        unpriced = {json.loads(labels)["model"] for name, labels in rows if name == "unpriced_events"}
        assert len(unpriced) == 4 and "__other__" in unpriced
    finally:
        for store in stores:
            store.close()


# --- speed and inference_geo ----------------------------------------------------------------------------------------


def test_100k_distinct_speed_and_geo_strings_do_not_grow_the_pricing_cache(store: Store, clock: FakeClock) -> None:
    prices = load_price_table()
    base = usage("x", clock.now, 1000)

    def priced(n: int, **modifiers: str) -> int | None:
        doc = {**base, "request_id": f"m{n}", "usage": {**base["usage"], **modifiers}}
        event = store.parser.parse_object(doc)
        assert isinstance(event, Event)
        return prices.price(event).cost_pico

    one_x = 5_100_000_000  # 100 input at $1/M + 1,000 output at $5/M = $0.0051, in pico-dollars
    assert priced(0) == one_x
    warm = prices.cache_size()
    for n in range(100_000):
        assert priced(n, speed=f"s{n}", inference_geo=f"g{n}") == one_x  # unknown strings price at 1x
    assert prices.cache_size() == warm  # unknown strings share the 1x entry

    # What the table knows still applies, and what is stored is the normalised value.
    opus = {**base, "model": "claude-opus-4-8"}
    fast = store.parser.parse_object({**opus, "usage": {**opus["usage"], "speed": "fast", "inference_geo": "us"}})
    assert isinstance(fast, Event)
    # opus-4-8: $5/M input, $25/M output; fast x2, us x1.1 -> (500 + 25,000) x 2.2 = 56,100 micro-dollars.
    assert prices.price(fast).cost_pico == 56_100_000_000
    assert prices.modifiers("fast", "us") == ("fast", "us")
    assert prices.modifiers("standard", "global") == ("standard", "global")
    assert prices.modifiers("warp", "moon") == ("other", "other")
    assert prices.modifiers(None, None) == (None, None)

    docs = [
        {**base, "request_id": f"w{n}", "usage": {**base["usage"], "speed": f"s{n}", "inference_geo": f"g{n}"}}
        for n in range(50)
    ]
    docs.append({**base, "request_id": "w-fast", "usage": {**base["usage"], "speed": "fast", "inference_geo": "us"}})
    result = store.writer.write([("t", store.parser.parse_object(d)) for d in docs], "test")
    assert result.accepted == 51
    with store.engine.connect() as connection:
        stored = set(connection.execute(select(events.c.speed, events.c.inference_geo).distinct()).all())
    assert stored == {("other", "other"), ("fast", "us")}


# --- configuration --------------------------------------------------------------------------------------------------


def test_label_caps_have_defaults_and_are_validated(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), environ={}).settings
    assert (settings.metrics.max_values_per_label, settings.metrics.max_unpriced_models) == (200, 50)
    bad = write_config(tmp_path, "metrics:\n  max_values_per_label: 0\n  max_unpriced_models: many\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(bad, environ={})
    message = str(caught.value)
    assert ":3: metrics.max_values_per_label:" in message and "greater than or equal to 1" in message
    assert ":4: metrics.max_unpriced_models:" in message


# --- counters written before the cap --------------------------------------------------------------------------------


def test_upgrade_keeps_the_busiest_existing_values_and_renders_the_rest_as_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    assert alembic("upgrade", "0003", url=url).returncode == 0
    legacy = [
        ("requests", {"model": "claude-haiku-4-5", "project": f"p{i:03d}"}, i + 1) for i in range(250)
    ]  # p249 the busiest
    legacy.append(("requests", {"model": "claude-invented-7", "project": "p249"}, 1000))  # a raw unknown id
    legacy += [("unpriced_events", {"model": f"m{i:02d}"}, i + 1) for i in range(60)]
    with sqlite3.connect(tmp_path / "monitor.db") as connection:
        connection.executemany(
            "INSERT INTO counters (name, labels, value) VALUES (?, ?, ?)",
            [(name, json.dumps(labels), value) for name, labels, value in legacy],
        )
    upgrade = alembic("upgrade", "head", url=url)
    assert upgrade.returncode == 0, upgrade.stderr
    with sqlite3.connect(tmp_path / "monitor.db") as connection:
        rows = connection.execute("SELECT label, value, slot FROM label_values").fetchall()
    projects = {value for label, value, _ in rows if label == "project"}
    models = {value for label, value, _ in rows if label == "model"}
    assert projects == {f"p{i:03d}" for i in range(50, 250)}  # the 200 busiest
    assert models == {f"m{i:02d}" for i in range(10, 60)}  # the 50 busiest unpriced ids
    assert sorted(slot for label, _, slot in rows if label == "project") == list(range(200))

    daemon = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    try:
        metrics = settled(daemon, sum(range(1, 251)) + 1000)
        assert metrics.values("claude_requests_total", "project") == projects | {"__other__"}
        assert metrics.values("claude_requests_total", "model") == {"claude-haiku-4-5", "unpriced"}
        other = (("environment", ""), ("model", "claude-haiku-4-5"), ("project", "__other__"))
        assert metrics.samples["claude_requests_total", other] == f"{sum(range(1, 51))}.0"
        assert metrics.values("claude_monitor_unpriced_events_total", "model") == models | {"__other__"}
        assert metrics.total("claude_monitor_unpriced_events_total") == sum(range(1, 61))
    finally:
        daemon.stop(signal.SIGKILL)


def test_a_price_table_model_cannot_be_named_unpriced(tmp_path: Path) -> None:
    text = (
        "pricing:\n  models:\n    unpriced:\n      rates:\n"
        "        - {since: 2026-01-01, input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, cache_read: 1}\n"
    )
    with pytest.raises(ConfigError, match="'unpriced' is the metric label of unknown models"):
        load_settings(write_config(tmp_path, text), environ={})
