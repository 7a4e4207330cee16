"""``outpost-controller backup`` / ``restore``: whole copies, and one sentence with nothing written for bad input."""

from __future__ import annotations

import resource
import signal
import sqlite3
from pathlib import Path

import pytest

from controller.audit_chain import KEY_FILE, rows_of, verify
from controller.bootstrap import open_data_dir
from controller.cli import main
from controller.settings import Settings
from controller.store import Store
from controller.store_schema import SCHEMA_VERSION


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "controller"
    context = open_data_dir(Settings(data_dir=data, listen_port=8443))
    with context.store.transaction() as db:
        context.registry.create_identity_in(db, "default", "gw", ("gateway",))
    context.close()
    return data


def test_a_backup_restores_into_a_data_directory_with_every_row_and_the_same_ca(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "backup", str(tmp_path / "b"), "--data", str(data))
    assert code == 0 and "its SQLite store" in out
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "b" / "outpostctl.toml").exists()  # the admin token's plaintext stays with the operator
    code, out, _ = cli(capsys, "restore", str(tmp_path / "b"), "--data", str(tmp_path / "restored"))
    assert code == 0 and "restored" in out
    assert (tmp_path / "restored" / "ca" / "ca.key").read_bytes() == (data / "ca" / "ca.key").read_bytes()
    store = Store(tmp_path / "restored" / "store.sqlite3")
    try:
        assert [row["name"] for row in store.query("SELECT name FROM identities ORDER BY name")] == ["gw", "operator"]
        # The restored trail verifies, with the key that came with it, and goes on as one chain.
        key = (tmp_path / "restored" / KEY_FILE).read_bytes()
        assert key == (data / KEY_FILE).read_bytes()
        assert (tmp_path / "restored" / KEY_FILE).stat().st_mode & 0o777 == 0o600
        report = verify(rows_of(store), key)
        assert report.ok and report.chain_start == 1 and report.checked >= 1, report
    finally:
        store.close()


def test_bad_input_is_refused_in_one_sentence_and_nothing_is_written(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").mkdir()
    code, _, error = cli(capsys, "backup", str(tmp_path / "taken"), "--data", str(data))
    assert code != 0 and "already exists" in error and list((tmp_path / "taken").iterdir()) == []
    code, _, error = cli(capsys, "backup", str(tmp_path / "b"), "--data", str(tmp_path / "nothing"))
    assert code != 0 and "is not a controller data directory" in error and not (tmp_path / "b").exists()
    code, _, error = cli(capsys, "restore", str(tmp_path / "taken"), "--data", str(tmp_path / "new"))
    assert code != 0 and "is not a backup" in error and not (tmp_path / "new").exists()
    assert cli(capsys, "backup", str(tmp_path / "b"), "--data", str(data))[0] == 0
    before = sorted(p.name for p in data.iterdir())
    code, _, error = cli(capsys, "restore", str(tmp_path / "b"), "--data", str(data))
    assert code != 0 and "is not empty" in error and sorted(p.name for p in data.iterdir()) == before
    for message in (error,):
        assert "\n" not in message
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_backup_of_a_newer_schema_is_not_restored(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "backup", str(tmp_path / "b"), "--data", str(data))[0] == 0
    connection = sqlite3.connect(str(tmp_path / "b" / "store.sqlite3"))
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.commit()
    connection.close()
    code, _, error = cli(capsys, "restore", str(tmp_path / "b"), "--data", str(tmp_path / "restored"))
    assert code == 65 and "upgrade outpost-controller" in error
    assert not (tmp_path / "restored").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


#: A file limit below what the CA directory holds, so copying it fails part-way with EFBIG.
FILE_SIZE_LIMIT = 16 * 1024


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_write_failing_half_way_is_one_sentence_and_leaves_nothing(
    command: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "backup", str(tmp_path / "b"), "--data", str(data))[0] == 0
    source, target = (data, tmp_path / "b2") if command == "backup" else (tmp_path / "b", tmp_path / "restored")
    (source / "ca" / "padding").write_bytes(b"x" * 4 * FILE_SIZE_LIMIT)
    # Running as root, a permission cannot make the copy fail; the file size limit can (EFBIG, not a signal).
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, old_limit[1]))
    try:
        code, _, error = cli(capsys, command, str(source) if command == "restore" else str(target),
                             "--data", str(target) if command == "restore" else str(source))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert code != 0 and error.startswith("Cannot ") and "File too large" in error and "\n" not in error, error
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
