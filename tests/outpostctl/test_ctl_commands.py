"""Every outpostctl command against a real controller: what it does and what it prints."""

from __future__ import annotations

import json
import math
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from outpostctl.cli import build_parser, connect_identity
from tests.outpostctl.harness import (
    CLI_TIMEOUT_SECONDS,
    Ctl,
    RunningController,
    run_outpostctl,
    stop_process,
    subprocess_env,
)


def token_claims(path: Path) -> dict:
    return jwt.decode(path.read_text().strip(), options={"verify_signature": False})


def identity_json(ctl: Ctl, name: str, *extra: str) -> dict:
    return json.loads(ctl.ok("identity", "show", name, "--json", *extra).out)


def test_identity_create_writes_a_0600_token_and_tells_what_to_do_with_it(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "gw-create.token"
    result = ctl.ok("identity", "create", "gw-create", "--token-out", str(token_file))
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    claims = token_claims(token_file)
    assert claims["sub"] == "gw-create" and claims["tnt"] == "default"
    assert "spiffe://" in result.out and "/default/gw-create" in result.out
    assert str(token_file) in result.out
    assert "token expires:" in result.out and "UTC" in result.out
    assert "outpost-agent enroll --token" in result.out and "field technician" in result.out
    assert token_file.read_text().strip() not in result.out, "the token itself is never printed"
    assert identity_json(ctl, "gw-create")["status"] == "created"


def test_identity_create_takes_roles_tenant_and_token_lifetime(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "t.token"
    ctl.ok("identity", "create", "gw-roles", "--role", "plc", "--role", "camera", "--tenant", "acme",
           "--ttl", "3600", "--token-out", str(token_file))
    claims = token_claims(token_file)
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["tnt"] == "acme"
    identity = identity_json(ctl, "gw-roles", "--tenant", "acme")
    assert sorted(identity["roles"]) == ["camera", "plc"]
    assert identity["tenant"] == "acme"


def test_a_token_expiry_reads_as_a_span_not_fractions_of_hours(ctl: Ctl, tmp_path: Path) -> None:
    started = time.time()
    short = ctl.ok("identity", "create", "gw-span-1", "--ttl", "60", "--token-out", str(tmp_path / "s1.token")).out
    took = time.time() - started
    line = next(line for line in short.splitlines() if line.startswith("token expires:"))
    # The expiry is a whole second at most one before the command began, and is read when it ends:
    # 60 s less the command's own time (a stalled commit, a slow start), never another unit.
    found = re.search(r"\(in (\d+) s\)$", line)
    assert found, line
    assert 60 - math.ceil(took) - 1 <= int(found.group(1)) <= 60, (line, took)
    week = ctl.ok("identity", "create", "gw-span-2", "--ttl", str(7 * 86400), "--token-out", str(tmp_path / "s2.token")).out
    assert "(in 7 days)" in week


def test_identity_list_shows_an_aligned_table_and_json(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-list", "--token-out", str(tmp_path / "l.token"))
    table = ctl.ok("identity", "list").out.splitlines()
    assert table[0].split()[:3] == ["NAME", "TENANT", "STATUS"]
    row = next(line for line in table if line.startswith("gw-list "))
    assert row.index("default") == table[0].index("TENANT"), "columns line up under their headers"
    listed = json.loads(ctl.ok("identity", "list", "--json").out)["identities"]
    assert "gw-list" in {i["name"] for i in listed}


def test_identity_list_filters_by_tenant(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-other-tenant", "--tenant", "north", "--token-out", str(tmp_path / "n.token"))
    names = {i["name"] for i in json.loads(ctl.ok("identity", "list", "--tenant", "north", "--json").out)["identities"]}
    assert names == {"gw-other-tenant"}


def test_identity_show_prints_one_field_per_line(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-show", "--role", "plc", "--token-out", str(tmp_path / "s.token"))
    lines = ctl.ok("identity", "show", "gw-show").out.splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert fields["name"] == "gw-show"
    assert fields["status"] == "created"
    assert fields["roles"] == "plc"
    assert fields["enrolled at"] == "-"
    assert fields["created at"].endswith("UTC")


def test_identity_token_issues_a_new_token_file(ctl: Ctl, tmp_path: Path) -> None:
    first, second = tmp_path / "first.token", tmp_path / "second.token"
    ctl.ok("identity", "create", "gw-retoken", "--token-out", str(first))
    result = ctl.ok("identity", "token", "gw-retoken", "--token-out", str(second), "--ttl", "600")
    assert token_claims(second)["sub"] == "gw-retoken"
    assert token_claims(second)["jti"] != token_claims(first)["jti"]
    assert token_claims(second)["exp"] - token_claims(second)["iat"] == 600
    assert stat.S_IMODE(second.stat().st_mode) == 0o600
    assert str(second) in result.out
    # One identity, one key: the operator is told what the new token retires (no device yet, so no more).
    assert "replaces every unused token issued earlier for gw-retoken" in result.out
    assert "loses its tunnels" not in result.out


def test_identity_revoke_marks_it_revoked(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-revoke", "--token-out", str(tmp_path / "r.token"))
    result = ctl.ok("identity", "revoke", "gw-revoke")
    assert "revoked" in result.out and "gw-revoke" in result.out
    assert identity_json(ctl, "gw-revoke")["status"] == "revoked"


def test_service_create_and_list(ctl: Ctl) -> None:
    created = ctl.ok("service", "create", "modbus", "--role", "plc")
    assert "created service modbus" in created.out
    table = ctl.ok("service", "list").out.splitlines()
    assert table[0].split() == ["NAME", "TENANT", "ROLES"]
    assert any(line.split() == ["modbus", "default", "plc"] for line in table[1:])
    services = json.loads(ctl.ok("service", "list", "--json").out)["services"]
    assert {"name": "modbus", "tenant": "default", "roles": ["plc"]}.items() <= next(
        s for s in services if s["name"] == "modbus").items()


def test_policy_create_and_list(ctl: Ctl) -> None:
    ctl.ok("service", "create", "historian")
    created = json.loads(ctl.ok("policy", "create", "--kind", "dial", "--identities", "operator,role:ops",
                                "--services", "historian", "--json").out)
    assert created["kind"] == "dial"
    assert created["identities"] == ["operator", "role:ops"]
    listed = json.loads(ctl.ok("policy", "list", "--json").out)["policies"]
    assert created["id"] in {p["id"] for p in listed}
    table = ctl.ok("policy", "list").out
    assert table.splitlines()[0].split() == ["ID", "VERSION", "TENANT", "KIND", "IDENTITIES", "SERVICES", "EXPIRES",
                                             "DECISIONS", "LAST", "ALLOWED"]
    assert "operator,role:ops" in table


def test_policy_update_delete_and_expiry(ctl: Ctl) -> None:
    ctl.ok("service", "create", "scada")
    created = json.loads(ctl.ok("policy", "create", "--kind", "dial", "--identities", "operator",
                                "--services", "scada", "--for", "8h", "--json").out)
    assert created["expires_at"] == pytest.approx(time.time() + 8 * 3600, abs=60)
    pid = str(created["id"])
    updated = ctl.ok("policy", "update", pid, "--identities", "operator,role:ops", "--no-expiry").out
    assert updated.startswith(f"updated policy {pid} to version 2: operator,role:ops may dial scada, expires never")
    row = next(line.split() for line in ctl.ok("policy", "list").out.splitlines() if line.split()[0] == pid)
    assert row[1] == "2" and row[6:8] == ["never", "0"]
    for args, sentence in (
        (("policy", "update", pid, "--for", "soon"), "'soon' is not a duration; write a number and a unit"),
        (("policy", "update", pid, "--until", "2001-01-01T00:00:00Z"), "2001-01-01T00:00:00Z is in the past"),
        (("policy", "update", pid, "--identities", "x", "--expected-version", "1"), "is at version 2 now, not 1"),
        (("policy", "delete", "4242"), "There is no policy 4242; outpostctl policy list shows them."),
        (("policy", "delete", "x1"), "'x1' is not a policy id"),
    ):
        result = ctl(*args)
        assert result.code != 0 and sentence in result.err and len(result.err.strip().splitlines()) == 1, result.err
    listed = json.loads(ctl.ok("policy", "list", "--json").out)["policies"]
    assert next(p for p in listed if str(p["id"]) == pid)["version"] == 2  # nothing changed
    audit = json.loads(ctl.ok("audit", "--json", "--limit", "5").out)["events"]
    assert [e["event"] for e in audit].count("policy_refused") == 5
    assert ctl.ok("policy", "delete", pid).out.startswith(f"deleted policy {pid}")
    assert pid not in {str(p["id"]) for p in json.loads(ctl.ok("policy", "list", "--json").out)["policies"]}


def test_audit_shows_the_newest_events_last(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-audit", "--token-out", str(tmp_path / "a.token"))
    events = json.loads(ctl.ok("audit", "--json", "--limit", "5").out)["events"]
    assert 1 <= len(events) <= 5
    assert any(e["event"] == "identity_created" for e in events)
    assert len(json.loads(ctl.ok("audit", "--json", "--limit", "1").out)["events"]) == 1
    table = ctl.ok("audit").out.splitlines()
    assert table[0].split() == ["TIME", "EVENT", "DETAILS"]
    assert any("token_created" in line or "identity_created" in line for line in table[1:])


def test_status_says_the_controller_is_up_and_lists_tunnels(ctl: Ctl, controller: RunningController) -> None:
    assert json.loads(ctl.ok("status", "--json").out)["tunnels"] == []
    assert ctl.ok("status").out.strip() == f"controller {controller.url} is up; no gateway tunnels are connected"


def test_python_dash_m_outpostctl_with_the_data_dir(controller: RunningController) -> None:
    result = run_outpostctl("--data", str(controller.data), "identity", "list", "--json")
    assert result.code == 0, result.err
    assert isinstance(json.loads(result.out)["identities"], list)
    after_command = run_outpostctl("service", "list", "--data", str(controller.data))
    assert after_command.code == 0, after_command.err
    assert after_command.out.startswith(("NAME", "no services"))


def test_the_environment_variable_points_python_dash_m_at_the_controller(controller: RunningController) -> None:
    result = run_outpostctl("status", env=subprocess_env(OUTPOSTCTL_CONFIG=str(controller.config_path)))
    assert result.code == 0, result.err
    assert controller.url in result.out


def test_connect_parses_with_the_operator_identity_by_default() -> None:
    args = build_parser().parse_args(["connect", "historian", "--listen", "127.0.0.1:15000"])
    assert (args.command, args.service, args.listen, args.as_identity) == ("connect", "historian", "127.0.0.1:15000", None)
    # Without --as: the signed-in person, else the shared operator identity.
    assert connect_identity(None, None) == "operator"
    assert connect_identity(None, {"tenant": "default", "name": "oscar"}) == "default/oscar"
    assert connect_identity("ops-1", {"tenant": "default", "name": "oscar"}) == "ops-1"
    args = build_parser().parse_args(["connect", "historian", "--listen", "127.0.0.1:15000", "--as", "ops-1"])
    assert args.as_identity == "ops-1"


def test_quickstart_parses_once_and_dir() -> None:
    args = build_parser().parse_args(["quickstart", "--once", "--dir", "/tmp/qs"])
    assert (args.command, args.once, args.dir) == ("quickstart", True, Path("/tmp/qs"))


#: An agent starts, reads its state and dials the relay in about a second;
#: the rest is room for a slow CI machine.
TUNNEL_WAIT_SECONDS = 30.0


def test_status_lists_a_connected_gateways_tunnel(ctl: Ctl, controller: RunningController, tmp_path: Path) -> None:
    token_file, state = tmp_path / "gw-status.token", tmp_path / "gw-status-state"
    ctl.ok("identity", "create", "gw-status", "--token-out", str(token_file))
    enrolled = subprocess.run([sys.executable, "-m", "agent", "enroll", "--token", str(token_file), "--state",
                               str(state), "--keystore", "software"], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_SECONDS, env=subprocess_env(), cwd=tmp_path)
    assert enrolled.returncode == 0, enrolled.stderr
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n\n[keystore]\nbackend = "software"\n')
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + TUNNEL_WAIT_SECONDS
        tunnels: list = []
        while time.monotonic() < deadline and agent.poll() is None:
            tunnels = [t for t in json.loads(ctl.ok("status", "--json").out)["tunnels"] if t.get("name") == "gw-status"]
            if tunnels:
                break
            time.sleep(0.2)
        assert tunnels, f"gw-status never showed as connected (agent exit code {agent.poll()})"
        lines = ctl.ok("status").out.splitlines()
        assert lines[0] == f"controller {controller.url} is up; 1 tunnel(s) connected"
        assert lines[1].split()[:2] == ["IDENTITY", "FROM"]
        row = next(line for line in lines[2:] if line.startswith("default/gw-status "))
        assert "UTC" in row
    finally:
        stop_process(agent)


def test_the_audit_view_shows_utc_times_and_json_keeps_unix_times(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-audit-time", "--token-out", str(tmp_path / "t.token"))
    events = json.loads(ctl.ok("audit", "--json", "--limit", "3").out)["events"]
    assert all(isinstance(e["time"], (int, float)) for e in events)
    rows = ctl.ok("audit", "--limit", "3").out.splitlines()[1:]
    assert rows and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  \S", row) for row in rows), rows
    token_row = next(row for row in rows if "token_created" in row)
    assert re.search(r" expires=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", token_row), token_row


def test_audit_details_holding_times_read_as_dates_whatever_their_name() -> None:
    from outpostctl.commands import audit_rows

    [row] = audit_rows([{"id": 7, "time": 1796544000.5, "event": "renewal", "fields": {
        "identity": "default/gw-1", "not_after": 1796630400, "previous_not_after": 1796544000, "serial": "ab"}}])
    assert row == ["2026-12-06 08:00:00Z", "renewal", "identity=default/gw-1 not_after=2026-12-07T08:00:00Z "
                   "previous_not_after=2026-12-06T08:00:00Z serial=ab"]
    [first] = audit_rows([{"time": 1796544000, "event": "renewal", "fields": {"previous_not_after": 0}}])
    assert first[2] == "previous_not_after=-"
