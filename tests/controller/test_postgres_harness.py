"""The test harness's PostgreSQL is real, unprivileged and gives every test an empty database of its own."""

from __future__ import annotations

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (python3-psycopg)")

from tests.controller.postgres_harness import PostgresServer  # noqa: E402


def test_the_server_runs_unprivileged_on_a_socket_and_each_test_gets_an_empty_database(
    postgres: PostgresServer, postgres_url: str
) -> None:
    with psycopg.connect(postgres_url) as connection:
        version = connection.execute("SHOW server_version").fetchone()
        tables = connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        listen = connection.execute("SHOW listen_addresses").fetchone()
        fsync = connection.execute("SHOW fsync").fetchone()
    assert version is not None and version[0].startswith("15.")
    assert tables == (0,)
    assert listen == ("",)  # no TCP port at all: only the socket in the temporary directory
    assert fsync == ("off",) and not postgres.durable  # a throwaway cluster: commits reach the kernel, not the disk
    owner = (postgres.data / "PG_VERSION").stat().st_uid
    assert owner != 0


def test_a_second_database_is_another_one(postgres: PostgresServer, postgres_url: str) -> None:
    other = postgres.create_database()
    try:
        assert other != postgres_url
        with psycopg.connect(postgres_url) as connection:
            connection.execute("CREATE TABLE only_here (x INTEGER)")
        with psycopg.connect(other) as connection, pytest.raises(psycopg.errors.UndefinedTable):
            connection.execute("SELECT * FROM only_here")
    finally:
        postgres.drop_database(other)
