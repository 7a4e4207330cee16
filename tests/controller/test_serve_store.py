"""``outpost-controller serve --store``: a store URL that is wrong or unreachable ends in one sentence, nothing created."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.cli import main
from shared.errors import EXIT_UNAVAILABLE, EXIT_USAGE


def serve(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["serve", "--listen", "127.0.0.1:0", *argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("store", "says"), [
    ("postgresql://outpost@[::1/outpost", "is not a PostgreSQL URL"),
    ("postgresql://outpost@localhost/outpost?nosuchoption=1", "is not a PostgreSQL URL"),
    ("mysql://outpost@localhost/outpost", "is not a store this controller knows"),
    ("/var/lib/store.sqlite3", "is not a URL"),
])
def test_a_store_url_that_does_not_parse_is_refused_with_exit_64_and_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store: str, says: str
) -> None:
    data = tmp_path / "controller"
    code, error = serve(capsys, "--data", str(data), "--store", store)
    assert code == EXIT_USAGE
    assert says in error and "\n" not in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("store", [
    "postgresql://outpost:s3cret@127.0.0.1:1/outpost",  # nothing listens on port 1 of loopback
    "postgresql://outpost@/outpost?host=/nonexistent-socket-dir",
])
def test_a_store_that_cannot_be_reached_is_refused_with_exit_69_and_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store: str
) -> None:
    data = tmp_path / "controller"
    code, error = serve(capsys, "--data", str(data), "--store", store)
    assert code == EXIT_UNAVAILABLE, error
    assert error.startswith("Cannot reach the store postgresql://outpost") and "\n" not in error
    assert "s3cret" not in error
    assert list(tmp_path.iterdir()) == []


def test_the_config_file_names_the_store_and_a_flag_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('store = "postgresql://outpost@/outpost?host=/nonexistent-socket-dir"\n')
    code, error = serve(capsys, "--data", str(tmp_path / "a"), "--config", str(config))
    assert code == EXIT_UNAVAILABLE and "nonexistent-socket-dir" in error
    code, error = serve(capsys, "--data", str(tmp_path / "b"), "--config", str(config), "--store", "mysql://x/y")
    assert code == EXIT_USAGE and "mysql://" in error


@pytest.mark.parametrize(("text", "says"), [
    ("store = 5\n", "store must be a string"),
    ("stor = \"postgresql://x/y\"\n", "unknown setting 'stor'"),
    ("store = \n", "is not valid TOML"),
])
def test_a_config_file_that_cannot_be_used_is_refused_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(text)
    code, error = serve(capsys, "--data", str(tmp_path / "controller"), "--config", str(config))
    assert code == EXIT_USAGE and says in error and "\n" not in error
    assert not (tmp_path / "controller").exists()


def test_a_data_directory_on_postgresql_holds_no_sqlite_file_and_a_second_one_with_another_ca_is_refused(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.bootstrap import open_data_dir
    from controller.settings import Settings

    first = open_data_dir(Settings(data_dir=tmp_path / "one", listen_port=1, store_url=postgres_url))
    first.close()
    assert not (tmp_path / "one" / "store.sqlite3").exists()
    again = open_data_dir(Settings(data_dir=tmp_path / "one", listen_port=1, store_url=postgres_url))
    again.close()  # the operator identity created once, the CA claimed once
    code, error = serve(capsys, "--data", str(tmp_path / "two"), "--store", postgres_url)
    assert code != 0 and "belongs to the controller whose CA is" in error
    assert not (tmp_path / "two").exists()
    with pytest.raises(sqlite3.Error):
        sqlite3.connect(f"file:{tmp_path / 'two' / 'store.sqlite3'}?mode=ro", uri=True).execute("SELECT 1")


def test_without_psycopg_a_postgresql_store_is_refused_saying_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.e2e.harness import python_env

    data = tmp_path / "controller"
    script = ("import sys; sys.modules['psycopg'] = None; from controller.cli import main; "
              f"sys.exit(main(['serve', '--data', {str(data)!r}, '--store', 'postgresql://outpost@db/outpost']))")
    result = subprocess.run([sys.executable, "-c", script], env=python_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert "needs psycopg 3: apt install python3-psycopg" in result.stderr and result.stderr.count("\n") == 1
    assert not data.exists()
