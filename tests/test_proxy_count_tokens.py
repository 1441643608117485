"""`proxy.count_tokens`: the proxy admits a call on Anthropic's count of its input instead of the byte bound.

Through the real `anthropic` SDK (no retries) -> `claude-monitor proxy` (a child process) -> the local fake
Anthropic, whose count_tokens answers `fake.count_answer`, refuses fields it does not take, and can be held past the
proxy's timeout. The daemon runs in this process (as `serve` builds it) with one cap, `max_input_tokens: 1000` on
project lingo, and a $0.001 budget on project wallet.

The byte bound of CJK_ASK, by hand: 400 characters of 3 UTF-8 bytes = 1,200 bytes, plus the 30 bytes of JSON
around them (`[{"role":"user","content":""}]`) and the 16 of the request's overhead = 1,246 tokens, over the cap;
the fake's count (17) is under it. The worst case of CJK_ASK with max_tokens 5 on claude-haiku-4-5 ($1/M input,
$5/M output): on the bound 1,246 x $1/M + 5 x $5/M = $0.001271, over the wallet's $0.001; on the count
17 x $1/M + 5 x $5/M = $0.000042, under it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from anthropic.types import MessageParam

from monitor.config import load_settings
from monitor.service import Daemon
from tests.conftest import write_config
from tests.fake_anthropic import COUNT_TOKENS_ANSWER, FakeAnthropic
from tests.proxy_harness import HAIKU, PROXY_KEY, ProxyProcess, proxy_config, sdk, within
from tests.serve_harness import TOKEN, request
from tests.test_proxy_admission import parse_metrics

pytestmark = pytest.mark.slow

DAEMON_CONFIG = """\
http: {listen: "127.0.0.1:0"}
sources: []
limits:
  - {name: input-guard, match: {project: lingo}, max_input_tokens: 1000}
budgets:
  - {name: wallet-day, match: {project: wallet}, window: day, limit_usd: 0.001, throttle_at: 1.0}
"""
CJK_ASK: list[MessageParam] = [{"role": "user", "content": "字" * 400}]
CJK_BOUND = 1_246
SLOW = "1s"  # the timeout of the proxy the fake keeps waiting; the others wait up to 10 s for a loaded machine
COUNT_TOKENS = "/v1/messages/count_tokens"


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic(PROXY_KEY)
    yield server
    server.close()


@pytest.fixture
def daemon_url(tmp_path: Path) -> Iterator[str]:
    config = write_config(tmp_path, DAEMON_CONFIG + f"throttle: {{snapshot_file: {tmp_path}/daemon-throttle.json}}\n")
    daemon = Daemon(load_settings(config, environ={}), environ={"CLAUDE_MONITOR_INGEST_TOKEN": TOKEN})
    daemon.start()
    yield "http://{}:{}".format(*daemon.address)
    daemon.stop()


def start_proxy(tmp_path: Path, fake: FakeAnthropic, daemon_url: str, extra: str) -> ProxyProcess:
    home = tmp_path / "proxy"
    home.mkdir()
    return ProxyProcess(proxy_config(home, fake.url, daemon_url, extra=extra), home)


@pytest.fixture
def counting(tmp_path: Path, fake: FakeAnthropic, daemon_url: str) -> Iterator[ProxyProcess]:
    proxy = start_proxy(tmp_path, fake, daemon_url, "  count_tokens: true\n  count_tokens_timeout: 10s\n")
    yield proxy
    proxy.stop(signal.SIGKILL)


@pytest.fixture
def impatient(tmp_path: Path, fake: FakeAnthropic, daemon_url: str) -> Iterator[ProxyProcess]:
    proxy = start_proxy(tmp_path, fake, daemon_url, f"  count_tokens: true\n  count_tokens_timeout: {SLOW}\n")
    yield proxy
    proxy.stop(signal.SIGKILL)


@pytest.fixture
def bounding(tmp_path: Path, fake: FakeAnthropic, daemon_url: str) -> Iterator[ProxyProcess]:
    proxy = start_proxy(tmp_path, fake, daemon_url, "")
    yield proxy
    proxy.stop(signal.SIGKILL)


def counts(proxy: ProxyProcess) -> tuple[float, float]:
    """The proxy's count_tokens outcomes: (ok, fallback)."""
    metrics = parse_metrics(request(proxy.url + "/metrics").body.decode())
    name = "claude_proxy_count_tokens_total"
    return metrics[name, (("outcome", "ok"),)], metrics[name, (("outcome", "fallback"),)]


def client(proxy: ProxyProcess, project: str = "lingo") -> anthropic.Anthropic:
    return sdk(proxy.url, "u-1", project, max_retries=0)


def test_counted_input_under_the_cap_is_admitted_where_the_byte_bound_would_be_refused(
    counting: ProxyProcess, fake: FakeAnthropic
) -> None:
    answer = client(counting).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert answer.usage.output_tokens == 5
    assert [seen.path for seen in fake.requests] == [COUNT_TOKENS, "/v1/messages"]  # counted first
    counted = fake.requests[0]
    assert counted.json() == {"model": HAIKU, "messages": CJK_ASK}  # the prompt only: no max_tokens
    assert counted.headers["x-api-key"] == PROXY_KEY and "anthropic-version" in counted.headers
    assert counts(counting) == (1, 0)
    # The worst case is priced on the count too: $0.000042 fits the wallet's $0.001.
    assert client(counting, "wallet").messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert counts(counting) == (2, 0)

    # The count is what admission sees, larger ones too: 5,000 counted is over the cap, whatever the bytes say.
    fake.count_answer = 5_000
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(counting).messages.create(model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "Hallo?"}])
    assert isinstance(caught.value.body, dict)
    assert "estimated at up to 5,000 tokens, over the cap of 1,000" in caught.value.body["error"]["message"]
    assert len(fake.seen("/v1/messages")) == 2  # the refused call never went upstream
    assert counts(counting) == (3, 0)
    assert COUNT_TOKENS_ANSWER < 1_000 < CJK_BOUND


def test_count_tokens_failing_or_slow_falls_back_to_the_byte_bound(
    impatient: ProxyProcess, fake: FakeAnthropic
) -> None:
    fake.fail_next(529, "overloaded_error")
    with pytest.raises(anthropic.BadRequestError) as failed:
        client(impatient).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert isinstance(failed.value.body, dict)
    assert f"estimated at up to {CJK_BOUND:,} tokens, over the cap of 1,000" in failed.value.body["error"]["message"]
    assert counts(impatient) == (0, 1)
    assert "count_tokens: Anthropic answered 529" in impatient.output()

    fake.count_hold = threading.Event()  # count_tokens answers only when the test lets it: never within 1 s
    try:
        slow = within(10, lambda: client(impatient).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK))
    finally:
        fake.count_hold.set()
    assert isinstance(slow, anthropic.BadRequestError) and isinstance(slow.body, dict)
    assert f"estimated at up to {CJK_BOUND:,} tokens" in slow.body["error"]["message"]
    assert counts(impatient) == (0, 2)
    assert "count_tokens: no answer within 1 s (proxy.count_tokens_timeout)" in impatient.output()
    assert fake.seen("/v1/messages") == []  # neither call went upstream


def test_a_huge_or_endless_count_tokens_answer_is_not_read_past_the_bound_and_falls_back(
    counting: ProxyProcess, fake: FakeAnthropic
) -> None:
    # A count of 17 carried in a 1 MiB answer: past proxy.count_tokens_max_answer_bytes (64 KiB by default), so
    # not believed: the call is admitted on the byte bound, which is over the cap.
    fake.count_padding = 1024 * 1024
    with pytest.raises(anthropic.BadRequestError) as huge:
        client(counting).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert isinstance(huge.value.body, dict)
    assert f"estimated at up to {CJK_BOUND:,} tokens, over the cap of 1,000" in huge.value.body["error"]["message"]
    assert counts(counting) == (0, 1)
    assert "longer than 65,536 bytes (proxy.count_tokens_max_answer_bytes)" in counting.output()

    # An answer that never ends: the proxy stops reading at the bound, long before its 10 s timeout would.
    fake.count_padding, fake.count_endless = 0, True
    with pytest.raises(anthropic.BadRequestError) as endless:
        client(counting).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert isinstance(endless.value.body, dict)
    assert f"estimated at up to {CJK_BOUND:,} tokens" in endless.value.body["error"]["message"]
    assert counts(counting) == (0, 2)
    assert counting.output().count("longer than 65,536 bytes") == 2
    assert "no answer within" not in counting.output()
    assert fake.seen("/v1/messages") == []  # neither call went upstream

    fake.count_endless = False  # a count of ordinary size is believed again
    assert client(counting).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert counts(counting) == (1, 2)


def test_without_the_option_no_count_tokens_call_goes_upstream(bounding: ProxyProcess, fake: FakeAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(bounding).messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert isinstance(caught.value.body, dict)
    assert f"estimated at up to {CJK_BOUND:,} tokens" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.RateLimitError) as budget:  # on the bound, $0.001271 would pass the $0.001
        client(bounding, "wallet").messages.create(model=HAIKU, max_tokens=5, messages=CJK_ASK)
    assert isinstance(budget.value.body, dict) and "worst case $0.001271" in budget.value.body["error"]["message"]
    assert client(bounding).messages.create(model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert [seen.path for seen in fake.requests] == ["/v1/messages"]
    assert counts(bounding) == (0, 0)


@pytest.fixture
def small_answers(tmp_path: Path, fake: FakeAnthropic, daemon_url: str) -> Iterator[ProxyProcess]:
    proxy = start_proxy(tmp_path, fake, daemon_url, "  max_answer_bytes: 4096\n")
    yield proxy
    proxy.stop(signal.SIGKILL)


def test_an_answer_sent_whole_is_not_read_past_proxy_max_answer_bytes(
    small_answers: ProxyProcess, fake: FakeAnthropic
) -> None:
    # The count_tokens route passes Anthropic's answer on whole: one of 8 KiB, or one that never ends, is cut at the
    # 4,096 bytes allowed and answered 502; an ordinary one passes.
    for padding, endless in ((8192, False), (0, True)):
        fake.count_padding, fake.count_endless = padding, endless
        with pytest.raises(anthropic.InternalServerError) as cut:
            client(small_answers).messages.count_tokens(model=HAIKU, messages=CJK_ASK)
        assert cut.value.status_code == 502
        assert isinstance(cut.value.body, dict)
        assert "longer than 4,096 bytes (proxy.max_answer_bytes)" in cut.value.body["error"]["message"]
    fake.count_padding, fake.count_endless = 0, False
    counted = client(small_answers).messages.count_tokens(model=HAIKU, messages=CJK_ASK)
    assert counted.input_tokens == COUNT_TOKENS_ANSWER
    assert [seen.path for seen in fake.requests] == [COUNT_TOKENS] * 3
