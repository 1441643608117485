"""A throwaway PostgreSQL server for tests (a pytest plugin: `pytest_plugins = ["tests.pg"]`).

initdb into a temp dir, start on a free loopback port with fsync off, create a database per test, stop at the end.
initdb refuses root, so as root every server command runs as the `postgres` user (runuser). Without PostgreSQL
installed the tests that use these fixtures are skipped; scripts/test installs it, so in CI they run.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow

PG_ROOT = Path("/usr/lib/postgresql")
USER = "monitor"  # the cluster's superuser, trusted on loopback: tests connect without a password


def find_bin_dir() -> Path | None:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql, else the one on PATH, else None."""
    installed = [p.parent for p in PG_ROOT.glob("*/bin/initdb")]
    if installed:
        return max(installed, key=lambda bin_dir: _version(bin_dir.parent.name))
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def unavailable_reason() -> str | None:
    """Why no throwaway server can be started here, or None when one can."""
    if find_bin_dir() is None:
        return (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "scripts/test installs the Debian package `postgresql`"
        )
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, and initdb refuses root, but runuser is missing"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and initdb refuses root, but there is no `postgres` user to run it as"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in its own temp dir, on 127.0.0.1 and a port of its own; stop and start at will."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self._as_postgres = os.geteuid() == 0
        self.directory = Path(tempfile.mkdtemp(prefix="claude-monitor-pg-"))
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.log = self.directory / "pg.log"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale", "-N")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        # cwd: runuser keeps the caller's directory, which user postgres may not be allowed to enter.
        result = subprocess.run(command, cwd=self.directory, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n--- {self.log} ---\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        """Start the server (again) on its port and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        """Stop the server now: open sessions are terminated (pg_ctl stop -m fast)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        """True while the postmaster runs."""
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one database on this server."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True)

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{next(self._names)}"
        with self._admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sessions(self, database: str) -> int:
        """How many client sessions are connected to `database`."""
        with self._admin() as admin:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]).fetchone()
        return int(row[0]) if row else 0

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        try:
            if self.data.exists() and self.running:
                self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def new_server() -> PostgresServer:
    """A started throwaway server, or skip the test with the reason there cannot be one."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's shared server. Tests must not stop it; use `private_postgres` for that."""
    server = new_server()
    yield server
    server.destroy()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, free to stop and start."""
    server = new_server()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database on the shared server; at teardown no session may be left connected to it (a leak check)."""
    url = postgres.create_database()
    yield url
    database = url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 5  # a backend exits a moment after its client closes the connection
    while (left := postgres.sessions(database)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == 0, f"{left} session(s) still connected to {database}: a connection was not closed"
