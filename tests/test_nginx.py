"""The shipped nginx example (examples/nginx.conf) against a real nginx and a real `serve`: auth_request
lets an allowed caller through and turns a throttled one into 429 with the daemon's Retry-After."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, write_config
from tests.serve_harness import Serve, request, wait_until
from tests.test_serve import CONFIG, usage_event

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
# Starts nginx and `serve`: in the slow lane (`scripts/test -m slow`).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test installs it)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Serve, str]]:
    (tmp_path / "usage").mkdir()
    serve = Serve(write_config(tmp_path, CONFIG), tmp_path)
    front, upstream = free_port(), free_port()
    example = (REPO / "examples" / "nginx.conf").read_text()
    monitor = serve.url.removeprefix("http://")
    conf = (
        example.replace("LISTEN", f"127.0.0.1:{front}")
        .replace("MONITOR", monitor)
        .replace("UPSTREAM", f"127.0.0.1:{upstream}")
    )
    # The stand-in for the Claude route behind nginx, and what a test run needs: foreground, files in tmp.
    conf = conf.replace(
        "http {",
        f"""http {{
    access_log off;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
    server {{ listen 127.0.0.1:{upstream}; location / {{ return 200 "upstream reached\\n"; }} }}""",
        1,
    )
    conf = f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx.log;\n" + conf
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        [str(NGINX), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{front}"
    try:
        wait_until(lambda: _answers(url), timeout=20)
        yield serve, url
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(20)
        serve.stop(signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return request(url + "/", headers={"X-App-User": "probe", "X-App-Project": "lingo"}).status == 200
    except OSError:
        return False


def test_nginx_auth_request_blocks_a_throttled_user_with_429(stack: tuple[Serve, str]) -> None:
    serve, url = stack
    who = {"X-App-Project": "lingo", "X-App-User": "u-1"}
    assert request(url + "/v1/messages", headers=who).status == 200
    assert serve.post_usage(usage_event("req-n1", "u-1", 100_000)).status == 202  # $0.50: the daily limit
    blocked = request(url + "/v1/messages", headers=who)
    assert blocked.status == 429
    assert int(blocked.headers["retry-after"]) > 0
    assert blocked.headers["x-monitor-budget"] == "per-user-daily"
    assert blocked.headers["x-should-retry"] == "false"
    assert blocked.json()["error"]["type"] == "rate_limit_error"
    other = request(url + "/v1/messages", headers={"X-App-Project": "lingo", "X-App-User": "u-2"})
    assert other.status == 200 and other.body == b"upstream reached\n"


def test_nginx_check_ignores_identity_a_caller_puts_in_the_query_or_in_x_monitor_headers(
    stack: tuple[Serve, str],
) -> None:
    serve, url = stack
    who = {"X-App-Project": "lingo", "X-App-User": "u-1"}
    assert serve.post_usage(usage_event("req-q1", "u-1", 100_000)).status == 202  # u-1 is over its daily limit
    assert request(url + "/v1/messages", headers=who).status == 429
    # The caller's query string reaches the auth subrequest unless the example drops it.
    assert request(url + "/v1/messages?user=u-2&project=other", headers=who).status == 429
    # X-Monitor-* headers of the caller's own, the dimensions the example does not set included.
    sneaky = {**who, "X-Monitor-User": "u-2", "X-Monitor-Api-Key": "k", "X-Monitor-Environment": "dev"}
    assert request(url + "/v1/messages", headers=sneaky).status == 429
