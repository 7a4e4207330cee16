"""The sign-in configuration: providers, roles, session lifetime, the admin credential; bad files in one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.cli import main
from controller.errors import StartupError
from controller.signin.config import Grant, load_config

GOOD = """
admin_credential = false
[signin]
session_lifetime = "4h"
[[signin.provider]]
name = "corp"
issuer = "https://login.example.com/realms/ops/"
client_id = "outpost"
client_secret = "s3cret"
[signin.roles]
ops-admins = ["admin"]
acme = ["admin:acme", "auditor"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    return path


def test_a_good_configuration_is_read(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, GOOD))
    assert settings.admin_credential is False and settings.session_lifetime == 4 * 3600
    provider = settings.providers[0]
    assert (provider.name, provider.issuer, provider.client_secret) == ("corp", "https://login.example.com/realms/ops",
                                                                        "s3cret")
    assert "s3cret" not in repr(provider)
    assert settings.grants_of(["acme", "other"]) == (Grant("admin", "acme"), Grant("auditor"))


@pytest.mark.parametrize(("change", "sentence"), [
    (('issuer = "https://login.example.com/realms/ops/"', 'issuer = "http://login.example.com"'),
     "issuer 'http://login.example.com' must be an https:// URL (an issuer is never plain HTTP)."),
    (('ops-admins = ["admin"]', 'ops-admins = ["root"]'),
     "[signin.roles] ops-admins: 'root' is not a role; use one of admin, operator, approver, auditor, "
     "optionally with :TENANT (admin:acme)."),
    (('session_lifetime = "4h"', 'session_lifetime = "3d"'),
     "[signin] session_lifetime must be between 300 and 86400 seconds, not 259200."),
    (('client_id = "outpost"', 'client_ids = "outpost"'), "unknown setting 'client_ids'"),
    (("[[signin.provider]]", "[[signin.providers]]"), "unknown setting 'providers'"),
])
def test_a_bad_configuration_is_refused_in_one_sentence(tmp_path: Path, change: tuple[str, str], sentence: str) -> None:
    with pytest.raises(StartupError) as refused:
        load_config(write(tmp_path, GOOD.replace(*change)))
    assert sentence in str(refused.value) and "\n" not in str(refused.value)


def test_turning_the_admin_credential_off_without_a_provider_is_refused(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "admin_credential = false\n")
    assert main(["serve", "--data", str(tmp_path / "data"), "--config", str(path)]) != 0
    assert "needs at least one [[signin.provider]]" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
