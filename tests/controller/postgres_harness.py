"""A real PostgreSQL server for the store's tests: Debian's postgresql-15, started in a temporary directory.

``initdb`` refuses to run as root (the tests run as root here and in CI), so
the cluster belongs to an unprivileged user (``nobody``) and the server runs
as that user; it listens on a unix socket in its own directory only (no TCP
port, nothing another test or machine can reach), with ``trust`` for local
connections. One server per test session; every test gets a database of its
own (``PostgresServer.create_database``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

#: Where Debian's postgresql-15 puts initdb and pg_ctl (they are not on PATH).
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
#: The unprivileged user that owns the cluster; exists on every Debian system.
POSTGRES_USER = "nobody"
#: The cluster's superuser name; the tests connect as it.
SUPERUSER = "outpost"
#: initdb writes a few hundred files and pg_ctl waits for the server to accept
#: connections: seconds here, a minute on a loaded CI machine.
START_TIMEOUT_SECONDS = 60
#: A fast shutdown rolls back open transactions and closes connections at once.
STOP_TIMEOUT_SECONDS = 30
#: The tests' servers do not flush to disk: a commit still reaches the kernel before it is answered, so a
#: killed server or client loses nothing a test can see; only a crash of this machine would, and that
#: throws the cluster away anyway. Each test's CREATE DATABASE, schema and DROP take about half the time.
#: Benchmarks keep PostgreSQL's durable defaults (``durable=True``), as a deployment runs it.
NOT_DURABLE_OPTIONS = "-c fsync=off -c full_page_writes=off"


def missing_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (POSTGRES_BIN / tool).exists():
            return f"PostgreSQL 15 is not installed ({POSTGRES_BIN / tool} is missing; scripts/setup installs postgresql-15)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (scripts/setup installs python3-psycopg and the venv's psycopg)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            return f"there is no user {POSTGRES_USER!r} to own the test cluster"
    return None


class PostgresServer:
    """One cluster in a temporary directory, owned and run by an unprivileged user."""

    def __init__(self, durable: bool = True) -> None:
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="outpost-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log = self.root / "postgres.log"
        self._names = itertools.count(1)
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(POSTGRES_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(POSTGRES_BIN / "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        self.start()

    def _run(self, *argv: object) -> None:
        command = [str(part) for part in argv]
        if os.geteuid() == 0:
            command = ["runuser", "-u", POSTGRES_USER, "--", *command]
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}{log[-4000:]}")

    def start(self) -> None:
        options = f"-k {self.socket_dir} -c listen_addresses='' -c max_connections=200"
        if not self.durable:
            options += f" {NOT_DURABLE_OPTIONS}"
        self._run(POSTGRES_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w",
                  "-t", START_TIMEOUT_SECONDS, "-o", options, "start")

    def stop(self) -> None:
        self._run(POSTGRES_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", STOP_TIMEOUT_SECONDS, "stop")

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for ``database`` over the unix socket (``--store`` takes it as it is)."""
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir), safe='')}"

    def admin(self) -> contextlib.AbstractContextManager[object]:
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(durable: bool = True) -> Iterator[PostgresServer]:
    server = PostgresServer(durable)
    try:
        yield server
    finally:
        server.close()


def _server_or_skip() -> Iterator[PostgresServer]:
    """A server for a fixture, or the test skipped saying what is missing to run one."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server(durable=False) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (of the modules that import this fixture)."""
    yield from _server_or_skip()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to stop and start (the session's ``postgres`` is shared)."""
    yield from _server_or_skip()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of the session's server, dropped after the test."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)

