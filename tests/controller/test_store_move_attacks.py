"""A password in store-move's --to (or serve's --store) is never printed, whatever goes wrong.

Real PostgreSQL (tests/controller/postgres_harness.py) and real processes holding the SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from controller.store_postgres_sql import safe_url  # noqa: E402
from tests.controller.test_store_move import cli, data, tables_in  # noqa: E402, F401

PASSWORD = "Pw-9f3e"


@pytest.mark.parametrize("to", [
    f"outpost:{PASSWORD}@localhost/outpost",  # the scheme forgotten: not a URL at all
    f"postgresql://outpost:{PASSWORD}%zz@localhost/outpost",  # libpq quotes the token it cannot decode
    f"postgresql://outpost:{PASSWORD}?x@/outpost?host=/nonexistent-socket-dir",  # '?' is allowed in libpq's password
    f"postgresql://outpost:{PASSWORD}#x@/outpost?host=/nonexistent-socket-dir",
    f"postgresql://outpost@/outpost?host=/nonexistent-socket-dir&password={PASSWORD}",
])
def test_a_password_in_to_is_never_printed(data: Path, to: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", to)
    assert code in (64, 69) and len(err.splitlines()) == 1, err
    assert PASSWORD not in out + err, err


def test_a_password_in_to_is_not_printed_after_a_move(data: Path, postgres_url: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"ALTER ROLE outpost PASSWORD '{PASSWORD}?x'")
    # The harness lets the user in without a password; the URL carries one all the same, as ops would write it.
    to = postgres_url.replace("postgresql://outpost@", f"postgresql://outpost:{PASSWORD}%3Fx@")
    code, out, err = cli(capsys, "store-move", "--data", str(data), "--to", to)
    assert code == 0, err
    assert PASSWORD not in out + err and "outpost:***@" in out


def test_safe_url_masks_a_password_holding_what_libpq_allows_there() -> None:
    # libpq ends the user part at the first '@' before any '/': '?' and '#' belong to the password.
    assert safe_url("postgresql://o:a?b#c@db/x") == "postgresql://o:***@db/x"
    assert safe_url("postgresql://db:5432/x?a=b:c") == "postgresql://db:5432/x?a=b:c"


def test_a_password_in_a_serve_store_written_without_its_scheme_is_not_printed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "serve", "--data", str(tmp_path / "box"), "--listen", "127.0.0.1:0",
                         "--store", f"outpost:{PASSWORD}@db.example/outpost")
    assert code == 64 and "is not a URL, nor an existing SQLite store file" in err and len(err.splitlines()) == 1, err
    assert PASSWORD not in out + err
    assert not (tmp_path / "box").exists()
