"""Who may call the proxy, and as whom: keys, fixed attributes, asserted headers, over a real proxy and `serve`.

Two clients. `backend` (the app's trusted server) has project `fixed` set by the proxy and may assert the user and
the feature; every call must name a user. `nightly` (a batch job, its key in the environment) has project
`nightly` and user `nightly-job` both fixed and may assert only the feature. Budgets count requests, so the
expectations need no prices: each user may make 1 request a day, project `fixed` 3.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import yaml

from tests.conftest import run_cli, write_config
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_harness import ASK, CLIENT_KEY, HAIKU, ProxyProcess, proxy_config, stored_row
from tests.serve_harness import Serve, request

# Starts proxy and `serve` processes: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

NIGHTLY_KEY = "sk-ant-api03-the-nightly-jobs-own-proxy-key-0000"
NIGHTLY_ENV = "TEST_PROXY_NIGHTLY_KEY"
STRANGER_KEY = "sk-ant-api03-a-key-no-client-of-this-proxy-has"
SECRET_IN_HEADER = "sk-ant-api03-pasted-into-a-feature-header-by-mistake"

CLIENTS = f"""\
    - name: backend
      key_sha256: "{hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}"
      attributes: {{project: fixed, environment: prod}}
      identity: {{headers: {{X-App-User: user, X-App-Feature: feature}}}}
      require: [user]
    - name: nightly
      key_env: {NIGHTLY_ENV}
      attributes: {{project: nightly, user: nightly-job}}
      identity: {{headers: {{X-App-Feature: feature}}}}
"""

SERVE_CONFIG = """\
http: {listen: "127.0.0.1:0"}
throttle: {snapshot_file: throttle.json}
schedule: {evaluate_every: 60s}
sources: [{type: jsonl, path: proxy-spool.jsonl, name: proxy-spool}]
budgets:
  - name: one-per-user
    per: user
    window: day
    limit_requests: 1
    throttle_at: 1.0
  - name: fixed-project
    match: {project: fixed}
    window: day
    limit_requests: 3
    throttle_at: 1.0
"""


def call(url: str, key: str, headers: dict[str, str], model: str = HAIKU) -> anthropic.types.Message:
    client = anthropic.Anthropic(base_url=url, api_key=key, default_headers=headers, max_retries=0)
    return client.messages.create(model=model, max_tokens=5, messages=ASK)


def refused(url: str, key: str, headers: dict[str, str], model: str = HAIKU) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as caught:
        call(url, key, headers, model)
    return caught.value


def error_of(error: anthropic.APIStatusError) -> dict[str, str]:
    assert isinstance(error.body, dict) and error.body["type"] == "error", error.body
    found = error.body["error"]
    assert isinstance(found, dict)
    return found


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic("sk-ant-api03-the-proxy-side-secret-0123456789abcdef")
    yield server
    server.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    daemon = Serve(write_config(tmp_path, SERVE_CONFIG), tmp_path)
    yield daemon
    daemon.stop(signal.SIGKILL)


def start_proxy(directory: Path, fake: FakeAnthropic, monitor_url: str, extra: str = "") -> ProxyProcess:
    config = proxy_config(directory, fake.url, monitor_url, clients=CLIENTS, extra=extra)
    return ProxyProcess(config, directory, env={NIGHTLY_ENV: NIGHTLY_KEY})


def test_no_header_edit_changes_what_a_client_may_not_assert(tmp_path: Path, fake: FakeAnthropic, serve: Serve) -> None:
    proxy = start_proxy(tmp_path, fake, serve.url)
    try:
        url = proxy.url
        # backend may assert the user: a throttled user is refused, another user is another user.
        first = call(url, CLIENT_KEY, {"X-App-User": "u-1"})
        assert error_of(refused(url, CLIENT_KEY, {"X-App-User": "u-1"}))["type"] == "rate_limit_error"
        call(url, CLIENT_KEY, {"X-App-User": "u-2"})

        # nightly may not: its user is fixed, so neither another X-App-User nor none gets round its limit.
        call(url, NIGHTLY_KEY, {"X-App-Feature": "digest"})
        for headers in ({"X-App-User": "someone-else"}, {}, {"X-App-User": "x", "X-App-Project": "fixed"}):
            error = refused(url, NIGHTLY_KEY, headers)
            assert error.status_code == 429
            assert error_of(error)["message"].startswith("one-per-user exceeded for user=nightly-job")

        # backend sends X-App-Project: the proxy's fixed project is what counts, the header is not forwarded.
        third = call(url, CLIENT_KEY, {"X-App-User": "u-3", "X-App-Project": "other"})
        assert third._request_id is not None
        row = stored_row(tmp_path, third._request_id)
        assert row is not None
        assert json.loads(row["attributes"]) == {"project": "fixed", "environment": "prod", "user": "u-3"}
        # Three requests: project `fixed` is spent, whatever project header comes or does not come.
        for headers in ({"X-App-User": "u-4"}, {"X-App-User": "u-4", "X-App-Project": "other"}):
            error = refused(url, CLIENT_KEY, headers)
            assert error.status_code == 429
            assert error_of(error)["message"].startswith("fixed-project exceeded for project=fixed")

        # A call that names no user is refused, not counted as nobody's.
        missing = refused(url, CLIENT_KEY, {"X-App-Feature": "grammar-check"})
        assert missing.status_code == 400 and error_of(missing)["type"] == "invalid_request_error"
        assert "user (header X-App-User)" in error_of(missing)["message"]

        forwarded = fake.seen("/v1/messages")
        assert len(forwarded) == 4  # u-1, u-2, nightly, u-3: nothing refused reached Anthropic
        assert not any(name.startswith("x-app-") for seen in forwarded for name in seen.headers)
        assert first._request_id is not None and stored_row(tmp_path, first._request_id) is not None
    finally:
        proxy.stop(signal.SIGKILL)


def test_an_unknown_or_missing_key_is_401_and_nothing_is_forwarded(
    tmp_path: Path, fake: FakeAnthropic, serve: Serve
) -> None:
    proxy = start_proxy(tmp_path, fake, serve.url)
    try:
        client = anthropic.Anthropic(base_url=proxy.url, api_key=STRANGER_KEY, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            client.messages.create(model=HAIKU, max_tokens=5, messages=ASK, extra_headers={"X-App-User": "u"})
        assert error_of(caught.value)["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.count_tokens(model=HAIKU, messages=ASK)
        body = json.dumps({"model": HAIKU, "max_tokens": 5, "messages": ASK})
        for headers in ({}, {"Authorization": "Basic " + CLIENT_KEY}, {"x-api-key": ""}):
            answer = request(proxy.url + "/v1/messages", "POST", body.encode(), {"X-App-User": "u", **headers})
            assert answer.status == 401 and answer.json()["error"]["type"] == "authentication_error"
        assert fake.requests == []
        log = proxy.output()
        assert STRANGER_KEY not in log and "401" in log
    finally:
        proxy.stop(signal.SIGKILL)


def test_an_unknown_model_is_refused_with_the_nearest_known_name(
    tmp_path: Path, fake: FakeAnthropic, serve: Serve
) -> None:
    proxy = start_proxy(tmp_path, fake, serve.url)
    try:
        error = refused(proxy.url, CLIENT_KEY, {"X-App-User": "u-m"}, model="claude-haiku-4.5")
        assert error.status_code == 400 and error_of(error)["type"] == "invalid_request_error"
        message = error_of(error)["message"]
        assert "'claude-haiku-4.5'" in message and "did you mean 'claude-haiku-4-5'" in message
        assert fake.requests == []
    finally:
        proxy.stop(signal.SIGKILL)

    (tmp_path / "proxy.log").unlink()
    allowing = start_proxy(tmp_path, fake, serve.url, extra="  allow_unpriced_models: true\n")
    try:
        message = call(allowing.url, CLIENT_KEY, {"X-App-User": "u-m"}, model="claude-haiku-4.5")
        assert message._request_id is not None
        row = stored_row(tmp_path, message._request_id)
        assert row is not None and row["model_id"] == "claude-haiku-4.5" and row["cost_pico"] is None
    finally:
        allowing.stop(signal.SIGKILL)


def test_keys_never_reach_upstream_logs_or_spool_and_identity_values_are_redacted(
    tmp_path: Path, fake: FakeAnthropic
) -> None:
    with socket.socket() as probe:  # the daemon is away: events go to the spool file
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    proxy = start_proxy(tmp_path, fake, closed)
    try:
        call(proxy.url, CLIENT_KEY, {"X-App-User": "u-s", "X-App-Feature": SECRET_IN_HEADER})
        call(proxy.url, NIGHTLY_KEY, {"X-App-Feature": SECRET_IN_HEADER})
        client = anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
        fake.fail_next(500)
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(model=HAIKU, max_tokens=5, messages=ASK, extra_headers={"X-App-User": "u-s"})
    finally:
        assert proxy.stop() == 0
    spool = (tmp_path / "proxy-spool.jsonl").read_text()
    log = proxy.output()
    upstream = json.dumps([seen.headers for seen in fake.requests])
    assert len(spool.splitlines()) == 3 and len(fake.requests) == 3
    for secret in (CLIENT_KEY, NIGHTLY_KEY, SECRET_IN_HEADER):
        assert secret not in spool and secret not in log and secret not in upstream
    features = [json.loads(line)["attributes"].get("feature") for line in spool.splitlines()]
    fingerprint = "sk-ant-…" + hashlib.sha256(SECRET_IN_HEADER.encode()).hexdigest()[:8]
    assert features == [fingerprint, fingerprint, None]


def test_the_former_identity_key_is_refused_with_its_clients_equivalent(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("proxy:\n  identity: {headers: {X-App-User: user, X-Team: project}}\n", encoding="utf-8")
    for command in ("check-config", "proxy"):
        run = run_cli(command, "--config", str(config), check=False, env={"ANTHROPIC_API_KEY": "sk-ant-x"})
        assert run.returncode == 2, run.stderr
        assert f"{config}:2: proxy.identity: no longer read" in run.stderr
        # The entry it shows is YAML that loads as a client with the same headers.
        shown = run.stderr[run.stderr.index("proxy:\n") :].split("\n    Better")[0]
        entry = yaml.safe_load(shown)["proxy"]["clients"][0]
        assert entry["identity"] == {"headers": {"X-App-User": "user", "X-Team": "project"}}
        assert "sha256" in entry["key_sha256"]


def test_check_config_explains_clients_without_their_keys(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", clients=CLIENTS)
    run = run_cli("check-config", "--config", str(config), env={NIGHTLY_ENV: NIGHTLY_KEY})
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    assert (
        f"  - backend: key with sha256 {digest[:8]}…; sets project=fixed, environment=prod; may assert user from "
        "X-App-User, feature from X-App-Feature; a call without user is refused 400"
    ) in run.stdout
    assert f"  - nightly: key from ${NIGHTLY_ENV} (set); sets project=nightly, user=nightly-job" in run.stdout
    assert CLIENT_KEY not in run.stdout and NIGHTLY_KEY not in run.stdout and digest not in run.stdout

    config.write_text(config.read_text() + "    - name: typo\n      key_sha256: abc\n", encoding="utf-8")
    bad = run_cli("check-config", "--config", str(config), check=False)
    lines = config.read_text().splitlines()
    assert bad.returncode == 2
    assert f"{config}:{lines.index('      key_sha256: abc') + 1}: proxy.clients[2].key_sha256:" in bad.stderr


def test_the_shipped_proxy_example_is_a_valid_config() -> None:
    example = Path(__file__).parent.parent / "examples" / "proxy.yaml"
    run = run_cli("check-config", "--config", str(example), env={"NIGHTLY_PROXY_KEY": "k"})
    assert "  - lingo-backend: key with sha256 00000000…" in run.stdout
    assert "  - nightly-digest: key from $NIGHTLY_PROXY_KEY (set)" in run.stdout


def test_the_proxy_reads_a_daemon_that_requires_its_read_token(tmp_path: Path, fake: FakeAnthropic) -> None:
    read = {"TEST_READ_TOKEN": "a-read-token-for-checks"}
    daemon = Serve(
        write_config(tmp_path, SERVE_CONFIG.replace("http: {", "http: {read_token_env: TEST_READ_TOKEN, ")),
        tmp_path,
        env=read,
    )
    config = proxy_config(tmp_path, fake.url, daemon.url, clients=CLIENTS, extra="  read_token_env: TEST_READ_TOKEN\n")
    proxy = ProxyProcess(config, tmp_path, env={NIGHTLY_ENV: NIGHTLY_KEY, **read})
    try:
        call(proxy.url, CLIENT_KEY, {"X-App-User": "u-r"})
        assert refused(proxy.url, CLIENT_KEY, {"X-App-User": "u-r"}).status_code == 429
    finally:
        proxy.stop(signal.SIGKILL)
        daemon.stop(signal.SIGKILL)
    assert "unavailable" not in proxy.output()  # the daemon's state came with the token, not the snapshot file
