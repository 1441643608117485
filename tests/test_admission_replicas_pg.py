"""Admission shared by replicas on one PostgreSQL (admission.state: auto = database there): three real `serve`
processes admit, release, renew and settle from the same leases, so a limit means the same with one replica or three,
and a restarted replica forgets nothing. Where time must move (rate buckets, expiry), three daemons built as `serve`
builds them share one FakeClock, each with its own engine and HTTP server.

Dollars by hand from the shipped price table: claude-haiku-4-5 is $1 per million input tokens, $5 per million output.
Each admit asks 10,000 input tokens estimated and max_tokens 6,000: worst case $0.01 + $0.03 = $0.04.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, create_engine

from monitor.budgets.shared_admission import SharedAdmission
from monitor.config import ConfigError, admission_in_database, load_settings
from monitor.service import Daemon
from tests.conftest import FakeClock, write_config
from tests.serve_harness import TOKEN, Response, Serve, request, sum_metric, wait_until
from tests.test_postgres import pg_config, scalar

# Starts PostgreSQL and daemons: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

pytest_plugins = ["tests.pg"]

HAIKU = "claude-haiku-4-5"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CONFIG = """\
timezone: UTC
http: {{listen: "127.0.0.1:0"}}
sources: []
throttle: {{snapshot_file: throttle.json}}
admission: {{lease_ttl: 60s}}
budgets:
  - {{name: lingo-daily, match: {{project: lingo}}, window: day, limit_usd: 1.00, throttle_at: 1.0}}
  - {{name: race-daily, match: {{project: race}}, window: day, limit_usd: 0.12, throttle_at: 1.0}}
limits:
  - {{name: per-user, match: {{project: lingo}}, per: user, concurrent: {concurrent}}}
  - {{name: racers, match: {{project: racing}}, per: user, concurrent: 3}}
  - {{name: rate, match: {{project: rated}}, per: user, requests_per_minute: 20}}
  - {{name: tokens, match: {{project: rated}}, input_tokens_per_minute: 100000, input_tokens_burst: 50000}}
"""
RESERVED = ("claude_budget_reserved_usd", (("budget", "lingo-daily"), ("scope", "project=lingo")))


def post(url: str, path: str, body: Any) -> Response:
    return request(url + path, "POST", json.dumps(body).encode(), AUTH)


def admit(url: str, user: str = "u-1", project: str = "lingo", **fields: Any) -> Response:
    body = {
        "attributes": {"project": project, "user": user},
        "model": HAIKU,
        "max_tokens": 6_000,
        "estimated_input_tokens": 10_000,  # worst case $0.01 + 6,000 x $5/M = $0.04
        **fields,
    }
    return post(url, "/v1/admit", body)


def release(url: str, lease: str, request_id: str | None, usage: dict[str, int] | None) -> Response:
    return post(url, "/v1/release", {"lease": lease, "request_id": request_id, "usage": usage})


def usage(url: str, request_id: str, output_tokens: int, lease: str | None = None, user: str = "u-1") -> Response:
    event = {
        "request_id": request_id,
        "timestamp": datetime.now(UTC).isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 0, "output_tokens": output_tokens},
        "attributes": {"project": "lingo", "user": user},
        "lease": lease,
    }
    return post(url, "/v1/usage", event)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(request(url + "/metrics").body.decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def spend(url: str, budget: str) -> str:
    rows = request(url + "/v1/budgets").json()
    return str(next(row["spend_usd"] for row in rows if row["budget"] == budget))


class Replicas:
    """Three `serve` processes on one PostgreSQL database, each with its own directory and config."""

    def __init__(self, pg_url: str, tmp_path: Path, concurrent: int = 2) -> None:
        self.configs = [pg_config(tmp_path / f"r{i}", pg_url, CONFIG.format(concurrent=concurrent)) for i in range(3)]
        self.dirs = [tmp_path / f"r{i}" for i in range(3)]
        self.database = pg_url
        self.serves: list[Serve] = []
        for i in range(3):  # one after the other: the first migrates the empty database
            self.serves.append(Serve(self.configs[i], self.dirs[i]))

    @property
    def urls(self) -> list[str]:
        return [serve.url for serve in self.serves]

    def restart(self, i: int) -> None:
        self.serves[i].stop(signal.SIGTERM)
        self.serves[i] = Serve(self.configs[i], self.dirs[i])

    def stop(self) -> None:
        for serve in self.serves:
            serve.stop()


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[Replicas]:
    started = Replicas(pg_url, tmp_path)
    try:
        yield started
    finally:
        started.stop()


def test_concurrent_two_is_two_across_three_replicas_and_a_release_anywhere_frees_a_slot(replicas: Replicas) -> None:
    urls = replicas.urls
    answers = [admit(urls[n % 3]) for n in range(10)]
    assert [a.status for a in answers].count(200) == 2, [a.body for a in answers]
    refused = [a for a in answers if a.status != 200]
    assert {json.dumps(a.json()["refused_by"]) for a in refused} == {'{"kind": "concurrency", "name": "per-user"}'}
    assert all(a.headers["retry-after"] == "1" for a in refused)
    # Every replica's gauge reads the database: 2 in flight, whichever is scraped.
    assert [sum_metric(metrics(url), "claude_admission_inflight", limit="per-user") for url in urls] == [2, 2, 2]
    admitted_on = [n % 3 for n, a in enumerate(answers) if a.status == 200]
    first = next(a for a in answers if a.status == 200).json()["lease"]
    elsewhere = next(i for i in range(3) if i != admitted_on[0])
    released = release(urls[elsewhere], first, "req_1", {"input_tokens": 10, "output_tokens": 10})
    assert released.status == 200 and released.json()["settled_by"] == "release", released.body
    third = next(i for i in range(3) if i not in (admitted_on[0], elsewhere))
    assert admit(urls[third]).status == 200
    assert admit(urls[elsewhere]).status == 429
    assert [sum_metric(metrics(url), "claude_admission_inflight", limit="per-user") for url in urls] == [2, 2, 2]


def test_a_budget_with_ten_cents_left_admits_two_worst_cases_across_replicas_until_one_settles(
    replicas: Replicas,
) -> None:
    r0, r1, r2 = replicas.urls
    assert usage(r0, "spent", 180_000, user="seed").status == 202  # 180,000 x $5/M = $0.90 of $1.00: $0.10 left
    first, second = admit(r0, user="a"), admit(r1, user="b")
    assert (first.status, second.status) == (200, 200)
    third = admit(r2, user="c")
    assert third.status == 429, third.body
    assert third.json()["refused_by"] == {"kind": "budget", "name": "lingo-daily"}
    assert "spent $0.900000 + $0.080000 reserved" in third.json()["message"]  # 0.90 + 0.08 + 0.04 > 1.00
    assert third.headers["retry-after"] == "1"
    for url in (r0, r1, r2):
        assert metrics(url)[RESERVED] == pytest.approx(0.08, abs=1e-12)
    assert spend(r0, "lingo-daily") == "0.900000"  # reservations are never spend

    # The first call's usage event lands on the third replica: 1,000 output tokens = $0.005, counted once as spend,
    # and its $0.04 hold is gone in the same commit.
    lease = first.json()["lease"]
    assert usage(r2, "req_a", 1_000, lease=lease, user="a").status == 202
    for url in (r0, r1, r2):
        assert metrics(url)[RESERVED] == pytest.approx(0.04, abs=1e-12)
    assert admit(r2, user="c").status == 200  # 0.905 + 0.04 + 0.04 = 0.985 <= 1.00
    assert admit(r1, user="d").status == 429  # 0.905 + 0.08 + 0.04 = 1.025 > 1.00
    assert release(r1, lease, "req_a", None).json()["settled_by"] == "usage event"
    assert spend(r2, "lingo-daily") == "0.905000"


def test_a_release_and_the_usage_event_of_one_lease_count_once_whichever_comes_first(replicas: Replicas) -> None:
    r0, r1, r2 = replicas.urls
    # Release first (on another replica), then the event: the hold is the actual $0.005 until the event lands.
    lease = admit(r0, user="a").json()["lease"]
    released = release(r1, lease, "req_a", {"input_tokens": 0, "output_tokens": 1_000})
    assert released.json() == {"lease": lease, "settled_by": "release", "cost_usd": "0.005000"}
    assert metrics(r2)[RESERVED] == pytest.approx(0.005, abs=1e-12)
    assert usage(r2, "req_a", 1_000, lease=lease, user="a").status == 202
    assert metrics(r0)[RESERVED] == 0
    again = release(r0, lease, "req_a", {"input_tokens": 0, "output_tokens": 1_000})
    assert again.json() == {"lease": lease, "settled_by": "usage event"}  # ended by its event: nothing more

    # The event first (naming the lease), then the release: a no-op that says so.
    lease = admit(r1, user="b").json()["lease"]
    assert usage(r0, "req_b", 2_000, lease=lease, user="b").status == 202  # $0.01
    assert metrics(r2)[RESERVED] == 0
    again = release(r2, lease, "req_b", {"input_tokens": 0, "output_tokens": 2_000})
    assert again.json() == {"lease": lease, "settled_by": "usage event"}
    assert post(r1, f"/v1/admit/{lease}/renew", {}).status == 404

    # A release naming the request id, then an event that names no lease (another proxy's): it settles the hold.
    lease = admit(r2, user="c").json()["lease"]
    assert release(r0, lease, "req_c", {"input_tokens": 0, "output_tokens": 400}).status == 200  # $0.002 held
    assert metrics(r1)[RESERVED] == pytest.approx(0.002, abs=1e-12)
    assert usage(r1, "req_c", 400, user="c").status == 202
    assert metrics(r2)[RESERVED] == 0

    # $0.005 + $0.01 + $0.002 = $0.017, each once: 17,000,000,000 pico-dollars stored.
    assert scalar(replicas.database, "SELECT sum(cost_pico) FROM events") == 17_000_000_000
    assert sum_metric(metrics(r0), "claude_admission_open_leases") == 0


def test_releases_and_usage_events_racing_on_different_replicas_settle_each_lease_once(replicas: Replicas) -> None:
    urls = replicas.urls
    leases = [admit(urls[n % 3], user=f"r{n}").json()["lease"] for n in range(12)]
    start = threading.Barrier(24)
    answers: list[str] = []
    lock = threading.Lock()

    def send_release(n: int) -> None:
        start.wait(30)
        answer = release(urls[n % 3], leases[n], f"req_{n}", {"input_tokens": 0, "output_tokens": 1_000})
        with lock:
            answers.append(answer.json()["settled_by"])

    def send_event(n: int) -> None:
        start.wait(30)
        assert usage(urls[(n + 1) % 3], f"req_{n}", 1_000, lease=leases[n], user=f"r{n}").status == 202

    threads = [threading.Thread(target=f, args=(n,)) for n in range(12) for f in (send_release, send_event)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 12 and set(answers) <= {"release", "usage event"}
    # Each call's $0.005 (1,000 output tokens at $5/M) is spent once; nothing stays reserved or open anywhere.
    assert scalar(replicas.database, "SELECT sum(cost_pico) FROM events") == 12 * 5_000_000_000
    assert scalar(replicas.database, "SELECT count(*) FROM admission_holds") == 0
    for url in urls:
        scraped = metrics(url)
        assert scraped[RESERVED] == 0
        assert sum_metric(scraped, "claude_admission_open_leases") == 0


def test_a_restarted_replica_keeps_every_lease(replicas: Replicas) -> None:
    r0, r1, _ = replicas.urls
    first = admit(r0).json()["lease"]
    assert admit(r1).status == 200
    replicas.restart(0)
    r0 = replicas.urls[0]
    refused = admit(r0)
    assert refused.status == 429 and refused.json()["refused_by"]["kind"] == "concurrency"
    assert metrics(r0)[RESERVED] == pytest.approx(0.08, abs=1e-12)
    renewed = post(r0, f"/v1/admit/{first}/renew", {})
    assert renewed.status == 200, renewed.body
    assert release(r0, first, "req_r", None).json()["settled_by"] == "release"
    assert admit(r0).status == 200


def test_many_threads_on_every_replica_at_once_never_pass_a_limit(pg_url: str, tmp_path: Path) -> None:
    replicas = Replicas(pg_url, tmp_path)
    try:
        urls = replicas.urls
        start = threading.Barrier(36)
        statuses: dict[str, list[int]] = {"racing": [], "race": []}
        lock = threading.Lock()

        def one(n: int, project: str) -> None:
            start.wait(30)
            # racing: one user, concurrent: 3. race: a different user each, $0.12 budget = 3 worst cases of $0.04.
            answer = admit(urls[n % 3], user="same" if project == "racing" else f"u{n}", project=project)
            with lock:
                statuses[project].append(answer.status)

        threads = [threading.Thread(target=one, args=(n, p)) for n in range(18) for p in ("racing", "race")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses["racing"]) == [200] * 3 + [429] * 15
        assert sorted(statuses["race"]) == [200] * 3 + [429] * 15
        assert scalar(pg_url, "SELECT count(*) FROM admission_leases WHERE ended IS NULL") == 6
    finally:
        replicas.stop()


# --- a clock the tests move: three daemons in this process, one FakeClock ----------------------------------------

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def clocked(pg_url: str, tmp_path: Path) -> Iterator[tuple[list[str], FakeClock]]:
    clock = FakeClock(NOW)
    daemons: list[Daemon] = []
    try:
        for i in range(3):
            text = CONFIG.format(concurrent=2).replace("throttle.json", str(tmp_path / f"t{i}.json"))
            config = pg_config(tmp_path / f"d{i}", pg_url, text)
            daemon = Daemon(
                load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN}
            )
            daemon.start()
            daemons.append(daemon)
        yield ["http://{}:{}".format(*d.address) for d in daemons], clock
    finally:
        for daemon in daemons:
            daemon.stop()


def test_requests_per_minute_twenty_is_twenty_across_replicas_then_refills_on_the_clock(
    clocked: tuple[list[str], FakeClock],
) -> None:
    urls, clock = clocked
    answers = [admit(urls[n % 3], project="rated", estimated_input_tokens=10) for n in range(30)]
    assert [a.status for a in answers].count(200) == 20
    refused = [a for a in answers if a.status != 200]
    assert all(a.json()["refused_by"] == {"kind": "rate", "name": "rate"} for a in refused)
    assert refused[0].headers["retry-after"] == "3"  # 20 a minute: one request every 3 s
    clock.advance(seconds=3)
    assert admit(urls[1], project="rated", estimated_input_tokens=10).status == 200
    assert admit(urls[2], project="rated", estimated_input_tokens=10).status == 429


def test_unused_input_tokens_return_to_the_bucket_when_the_usage_event_lands_on_another_replica(
    clocked: tuple[list[str], FakeClock],
) -> None:
    urls, _clock = clocked
    # A 50,000-token bucket: an estimate of 40,000 leaves 10,000; the call used 1,000, so 39,000 come back.
    first = admit(urls[0], project="rated", user="a", estimated_input_tokens=40_000)
    assert first.status == 200
    refused = admit(urls[1], project="rated", user="b", estimated_input_tokens=30_000)
    assert refused.status == 429 and refused.json()["refused_by"]["name"] == "tokens"
    assert refused.headers["retry-after"] == "12"  # 20,000 missing at 100,000 a minute
    event = {
        "request_id": "req_t",
        "timestamp": NOW.isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 1_000, "output_tokens": 5},
        "attributes": {"project": "rated", "user": "a"},
        "lease": first.json()["lease"],
    }
    assert post(urls[2], "/v1/usage", event).status == 202
    assert admit(urls[1], project="rated", user="b", estimated_input_tokens=30_000).status == 200


def test_a_lease_not_renewed_expires_on_the_moved_clock_on_every_replica(
    clocked: tuple[list[str], FakeClock],
) -> None:
    urls, clock = clocked
    first, second = admit(urls[0]).json()["lease"], admit(urls[1]).json()["lease"]
    assert admit(urls[2]).status == 429
    clock.advance(seconds=40)
    renewed = post(urls[2], f"/v1/admit/{second}/renew", {})
    assert renewed.status == 200 and renewed.json()["expires_at"] == "2026-11-26T12:01:40Z"
    clock.advance(seconds=20)  # the first is 60 s old and never renewed: its slot is free everywhere
    assert [sum_metric(metrics(url), "claude_admission_inflight", limit="per-user") for url in urls] == [1, 1, 1]
    assert admit(urls[1]).status == 200
    assert admit(urls[0]).status == 429
    gone = post(urls[1], f"/v1/admit/{first}/renew", {})
    assert gone.status == 404 and "it has ended (expired)" in gone.json()["error"]
    assert release(urls[2], first, None, None).json()["settled_by"] == "expired"


def test_state_database_on_sqlite_is_refused_at_load_with_the_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sources: []\nadmission:\n  lease_ttl: 60s\n  state: database\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(config, environ={})
    message = str(refused.value)
    assert f"{config}:5: admission.state:" in message
    assert "SQLite" in message and "PostgreSQL" in message
    # auto: memory on SQLite, the database on PostgreSQL; memory may be asked for on PostgreSQL.
    assert not admission_in_database(load_settings(write_config(tmp_path, "sources: []\n"), environ={}).settings)
    postgres = pg_config(tmp_path / "pg", "postgresql+psycopg://monitor@127.0.0.1:1/x", "sources: []\n")
    assert admission_in_database(load_settings(postgres, environ={}).settings)
    postgres.write_text(postgres.read_text() + "admission: {state: memory}\n")
    assert not admission_in_database(load_settings(postgres, environ={}).settings)


def test_admission_answers_503_while_postgres_is_away_and_recovers(private_postgres: Any, tmp_path: Path) -> None:
    url = private_postgres.create_database("away")
    text = CONFIG.format(concurrent=2).replace("throttle.json", str(tmp_path / "t.json"))
    clock = FakeClock(NOW)
    daemon = Daemon(
        load_settings(pg_config(tmp_path, url, text), environ={}),
        clock=clock,
        environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN},
    )
    daemon.start()
    try:
        base = "http://{}:{}".format(*daemon.address)
        lease = admit(base).json()["lease"]
        private_postgres.stop()
        away = admit(base)
        assert away.status == 503 and away.headers["retry-after"] == "5", away.body
        assert "storage unavailable" in away.json()["error"]
        private_postgres.start()
        assert wait_until(lambda: admit(base).status == 200, timeout=30)
        assert release(base, lease, None, None).json()["settled_by"] == "release"  # the lease survived the outage
    finally:
        daemon.stop()


def test_release_and_renew_answer_503_with_one_warning_while_postgres_is_away(
    private_postgres: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = private_postgres.create_database("away")
    text = CONFIG.format(concurrent=2).replace("throttle.json", str(tmp_path / "t.json"))
    daemon = Daemon(
        load_settings(pg_config(tmp_path, url, text), environ={}),
        clock=FakeClock(NOW),
        environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN},
    )
    daemon.start()
    try:
        base = "http://{}:{}".format(*daemon.address)
        lease = admit(base).json()["lease"]
        private_postgres.stop()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            released = release(base, lease, "req_away", {"input_tokens": 10, "output_tokens": 5})
            renewed = post(base, f"/v1/admit/{lease}/renew", {})
        for answer in (released, renewed):
            assert answer.status == 503 and answer.headers["retry-after"] == "5", answer.body
            assert set(answer.json()) == {"error"} and "storage unavailable" in answer.json()["error"]
        assert "nothing was released" in released.json()["error"]
        away = [r for r in caplog.records if r.name.startswith("monitor") and r.levelno >= logging.WARNING]
        assert [r.getMessage().split(" cannot ")[0] for r in away if "shared admission state" in r.getMessage()] == [
            "admission: release",
            "admission: renew",
        ]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        private_postgres.start()
        assert wait_until(lambda: post(base, f"/v1/admit/{lease}/renew", {}).status == 200, timeout=30)
        assert release(base, lease, None, None).json()["settled_by"] == "release"  # nothing was lost meanwhile
    finally:
        daemon.stop()


# --- the sweep: the leader's, and what it deletes ---------------------------------------------------------------


@pytest.fixture
def swept(pg_url: str, tmp_path: Path) -> Iterator[tuple[list[Daemon], FakeClock, Engine]]:
    """Three daemons as `clocked` builds them, evaluated only when a test says so (the schedule's period is an hour),
    and an engine of the test's own to look at the tables."""
    clock = FakeClock(NOW)
    daemons: list[Daemon] = []
    engine = create_engine(pg_url)
    try:
        for i in range(3):
            text = CONFIG.format(concurrent=2).replace("throttle.json", str(tmp_path / f"t{i}.json"))
            config = pg_config(tmp_path / f"d{i}", pg_url, text + "schedule: {evaluate_every: 1h}\n")
            daemon = Daemon(
                load_settings(config, environ={}), clock=clock, environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN}
            )
            daemon.start()
            daemons.append(daemon)
        assert [d.leadership.leading for d in daemons] == [True, False, False]  # the first to evaluate leads
        yield daemons, clock, engine
    finally:
        for daemon in daemons:
            if not daemon._stop.is_set():  # a test may have stopped one
                daemon.stop()
        engine.dispose()


def url_of(daemon: Daemon) -> str:
    return "http://{}:{}".format(*daemon.address)


def bucket_rows(engine: Engine) -> list[tuple[str, str, float, datetime]]:
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT name, kind, level, updated_at FROM admission_buckets ORDER BY name, scope, kind"
        ).all()
    return [(name, kind, level, at.replace(tzinfo=UTC)) for name, kind, level, at in rows]


def open_leases(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM admission_leases WHERE ended IS NULL").scalar_one())


def test_the_sweep_deletes_buckets_back_at_burst_and_keeps_one_mid_refill_with_its_tokens(
    swept: tuple[list[Daemon], FakeClock, Engine],
) -> None:
    daemons, clock, engine = swept
    urls = [url_of(d) for d in daemons]
    # Users a-e take one request each from their 20-request buckets (19 left); f takes all 20 (0 left). Each call
    # takes 10 input tokens from the shared 50,000-token bucket: 25 calls leave 49,750.
    for n, user in enumerate("abcde"):
        assert admit(urls[n % 3], user=user, project="rated", estimated_input_tokens=10).status == 200
    assert [admit(urls[n % 3], user="f", project="rated", estimated_input_tokens=10).status for n in range(21)] == [
        200
    ] * 20 + [429]
    assert len(bucket_rows(engine)) == 7  # 6 request buckets, 1 input-token bucket
    cast(SharedAdmission, daemons[0].admission).sweep_chunk = 2  # read in 4 transactions: the chunks join up
    daemons[0].evaluate()  # no time has passed: none is full again
    assert len(bucket_rows(engine)) == 7

    clock.advance(seconds=30)
    for follower in daemons[1:]:
        follower.evaluate()
    assert len(bucket_rows(engine)) == 7  # a follower does not sweep
    daemons[0].evaluate()
    # 30 s at 20 a minute adds 10 requests: a-e are at 29, full (20); f is at 10 of 20, kept as stored (0 at NOW).
    # The input-token bucket gained 50,000 (100,000 a minute): full.
    assert bucket_rows(engine) == [("rate", "rpm", 0.0, NOW)]
    # f has exactly 10 requests: the 11th waits 3 s for the next one. A deleted scope starts full again.
    assert [admit(urls[n % 3], user="f", project="rated", estimated_input_tokens=10).status for n in range(10)] == [
        200
    ] * 10
    refused = admit(urls[1], user="f", project="rated", estimated_input_tokens=10)
    assert refused.status == 429 and refused.headers["retry-after"] == "3"
    assert [admit(urls[2], user="a", project="rated", estimated_input_tokens=10).status for _ in range(20)] == [
        200
    ] * 20


def test_only_the_leader_sweeps_and_the_next_leader_frees_what_expired_after_it_died(
    swept: tuple[list[Daemon], FakeClock, Engine],
) -> None:
    daemons, clock, engine = swept
    urls = [url_of(d) for d in daemons]
    assert admit(urls[1]).status == 200 and admit(urls[2]).status == 200
    assert admit(urls[1]).status == 429  # concurrent: 2
    clock.advance(seconds=61)  # both leases are past their 60 s, unrenewed
    for follower in daemons[1:]:
        follower.evaluate()
    assert open_leases(engine) == 2  # not swept by a follower...
    assert admit(urls[2]).status == 200  # ...yet an expired hold counts nowhere
    daemons[0].evaluate()
    assert open_leases(engine) == 1  # the leader's sweep ended the two expired leases

    daemons[0].stop()  # the leader goes; its lock frees
    clock.advance(seconds=61)
    assert admit(urls[1]).status == 200 and admit(urls[2]).status == 200  # the third lease expired: 2 slots free
    clock.advance(seconds=61)
    daemons[1].evaluate()  # asks for leadership, gets it, sweeps
    assert daemons[1].leadership.leading and not daemons[2].leadership.leading
    assert open_leases(engine) == 0


def test_input_tokens_owed_to_a_bucket_the_sweep_deleted_are_taken_from_a_full_one(
    swept: tuple[list[Daemon], FakeClock, Engine],
) -> None:
    daemons, clock, engine = swept
    urls = [url_of(d) for d in daemons]
    lease = admit(urls[0], project="rated", user="a", estimated_input_tokens=40_000).json()["lease"]  # 10,000 left
    clock.advance(seconds=30)  # +50,000 at 100,000 a minute: full while the call still runs
    daemons[0].evaluate()
    assert bucket_rows(engine) == []
    event = {
        "request_id": "req_over",
        "timestamp": NOW.isoformat(),
        "model": HAIKU,
        "usage": {"input_tokens": 45_000, "output_tokens": 5},  # 5,000 more than estimated
        "attributes": {"project": "rated", "user": "a"},
        "lease": lease,
    }
    assert post(urls[1], "/v1/usage", event).status == 202
    # The 5,000 owed come off the full 50,000: 45,000 are there, not 45,001 (1 token at 100,000 a minute: 1 s).
    refused = admit(urls[2], project="rated", user="b", estimated_input_tokens=45_001)
    assert refused.status == 429 and refused.json()["refused_by"]["name"] == "tokens"
    assert refused.headers["retry-after"] == "1"
    assert admit(urls[2], project="rated", user="b", estimated_input_tokens=45_000).status == 200
