"""Tenants as an operator meets them: a name in the wrong tenant says where it is, the commands an
outpostctl sentence suggests carry their --tenant, and connect refuses a service that does not exist
before it listens."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.outpostctl.harness import Ctl, RunningController, run_outpostctl, subprocess_env
from tests.outpostctl.test_ctl_errors import one_sentence


def audit_events(ctl: Ctl) -> list[dict]:
    return json.loads(ctl.ok("audit", "--json", "--limit", "1000").out)["events"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_identity_missing_in_the_default_tenant_names_the_tenant_that_has_it(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-b1", "--tenant", "acme", "--token-out", str(tmp_path / "b1.token"))
    for command in (["identity", "show", "gw-b1"], ["identity", "disable", "gw-b1"],
                    ["identity", "token", "gw-b1", "--token-out", str(tmp_path / "again.token")]):
        result = ctl(*command)
        assert result.code != 0
        assert one_sentence(result.err) == ("outpostctl: There is no identity default/gw-b1; check the name and "
                                            "tenant; acme/gw-b1 exists: add --tenant acme")
    assert not (tmp_path / "again.token").exists()
    assert json.loads(ctl.ok("identity", "show", "gw-b1", "--tenant", "acme", "--json").out)["status"] == "created"


def test_a_name_in_no_tenant_at_all_keeps_the_controllers_sentence(ctl: Ctl) -> None:
    result = ctl("identity", "show", "gw-nowhere")
    assert one_sentence(result.err) == "outpostctl: There is no identity default/gw-nowhere; check the name and tenant."


def test_disable_prints_the_enable_command_with_its_tenant(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-b2", "--tenant", "acme", "--token-out", str(tmp_path / "b2.token"))
    printed = ctl.ok("identity", "disable", "gw-b2", "--tenant", "acme").out
    suggested = printed.split("'")[1]
    assert suggested == "outpostctl identity enable gw-b2 --tenant acme"
    ctl.ok(*suggested.split()[1:])
    assert json.loads(ctl.ok("identity", "show", "gw-b2", "--tenant", "acme", "--json").out)["status"] == "created"
    ctl.ok("identity", "create", "gw-b3", "--token-out", str(tmp_path / "b3.token"))
    assert ctl.ok("identity", "disable", "gw-b3").out.split("'")[1] == "outpostctl identity enable gw-b3"


def test_a_policy_of_default_naming_an_acme_service_is_refused_with_the_command_that_works(ctl: Ctl) -> None:
    ctl.ok("service", "create", "scada", "--tenant", "acme")
    before = json.loads(ctl.ok("policy", "list", "--json").out)["policies"]
    result = ctl("policy", "create", "--kind", "dial", "--identities", "operator", "--services", "acme/scada")
    assert result.code != 0
    assert one_sentence(result.err) == (
        "outpostctl: A policy of tenant default cannot open acme/scada: only a policy of tenant acme opens its "
        "services; create it there: outpostctl policy create --tenant acme --kind dial --identities default/operator "
        "--services scada")
    assert json.loads(ctl.ok("policy", "list", "--json").out)["policies"] == before


def connect(controller: RunningController, service: str, port: int):
    env = subprocess_env(OUTPOSTCTL_CONFIG=str(controller.config_path))
    return run_outpostctl("connect", service, "--listen", f"127.0.0.1:{port}", env=env)


def test_connect_to_a_service_that_does_not_exist_refuses_at_once_and_never_listens(
    ctl: Ctl, controller: RunningController
) -> None:
    issued_before = sum(e["event"] == "session_issued" for e in audit_events(ctl))
    port = free_port()
    result = connect(controller, "nosuch", port)
    assert result.code != 0
    assert one_sentence(result.err) == (
        "outpostctl: there is no service default/nosuch, so nothing would answer on the local port; "
        "see outpostctl service list, or create it with outpostctl service create nosuch")
    assert "listening" not in result.out
    assert sum(e["event"] == "session_issued" for e in audit_events(ctl)) == issued_before
    with socket.socket() as probe:  # the port is free: nothing ever bound it
        probe.bind(("127.0.0.1", port))


def test_connect_names_the_tenant_that_has_the_service(ctl: Ctl, controller: RunningController) -> None:
    ctl.ok("service", "create", "historian-x", "--tenant", "acme")
    result = connect(controller, "historian-x", free_port())
    assert one_sentence(result.err) == (
        "outpostctl: there is no service default/historian-x, so nothing would answer on the local port; "
        "acme/historian-x exists: connect to it by its full name, TENANT/historian-x")
    result = connect(controller, "acme/Bad", free_port())
    assert one_sentence(result.err) == ("outpostctl: 'acme/Bad' is not a service name; write NAME, TENANT/NAME or "
                                        "NAME@GATEWAY (lowercase letters, digits and '-'), for example acme/scada or "
                                        "modbus@gw-0042")


def test_connect_as_an_identity_of_another_tenant_is_named_tenant_slash_name(
    ctl: Ctl, controller: RunningController, tmp_path: Path
) -> None:
    ctl.ok("identity", "create", "ops-acme", "--tenant", "acme", "--token-out", str(tmp_path / "o.token"))
    ctl.ok("service", "create", "scada-2", "--tenant", "acme")
    env = subprocess_env(OUTPOSTCTL_CONFIG=str(controller.config_path))
    result = run_outpostctl("connect", "acme/scada-2", "--as", "ops-acme", "--listen", f"127.0.0.1:{free_port()}",
                            env=env)
    assert one_sentence(result.err) == ("outpostctl: There is no identity default/ops-acme; check the name and "
                                        "tenant; acme/ops-acme exists: use --as acme/ops-acme")
    result = run_outpostctl("connect", "scada-2", "--as", "x/y/z", "--listen", f"127.0.0.1:{free_port()}", env=env)
    assert one_sentence(result.err).startswith("outpostctl: --as 'x/y/z' is not an identity; write NAME or TENANT/NAME")
