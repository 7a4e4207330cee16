"""``outpostctl policy explain``: whether a dial or bind would be allowed, and which policies decide it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.outpostctl.harness import Ctl


def explain(ctl: Ctl, *args: str) -> dict:
    return json.loads(ctl.ok("policy", "explain", *args, "--json").out)


def test_explain_names_the_deciding_policy_and_every_other_that_takes_part(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "ex-op", "--role", "ex-operator", "--token-out", str(tmp_path / "o.token"))
    ctl.ok("service", "create", "ex-modbus", "--role", "ex-plc")
    first = json.loads(ctl.ok("policy", "create", "--kind", "dial", "--identities", "role:ex-operator",
                              "--services", "role:ex-plc", "--json").out)["id"]
    second = json.loads(ctl.ok("policy", "create", "--kind", "dial", "--identities", "ex-op",
                               "--services", "ex-modbus", "--json").out)["id"]
    answer = explain(ctl, "ex-op", "ex-modbus")
    dial, bind = answer["decisions"]["dial"], answer["decisions"]["bind"]
    assert dial["allowed"] and dial["policy"] == first and dial["allowing"] == [first, second]
    assert dial["reason"] == f"allowed by policy {first}"
    assert not bind["allowed"] and bind["reason"] == ("no policy allows identity default/ex-op to bind service "
                                                      "default/ex-modbus")
    assert {p["id"] for p in answer["policies"]} == {first, second}
    text = ctl.ok("policy", "explain", "ex-op", "ex-modbus").out.splitlines()
    assert text[0] == f"dial default/ex-op -> default/ex-modbus: allowed: allowed by policy {first}"
    assert text[1].startswith(f"  policy {first} decides: tenant default, dial role:ex-operator -> role:ex-plc")
    assert text[2].startswith(f"  policy {second} also allows")
    assert text[3].startswith("bind default/ex-op -> default/ex-modbus: denied: no policy allows")
    session = explain(ctl, "ex-op", "ex-modbus", "--kind", "bind", "--session")
    assert list(session["decisions"]) == ["bind"] and "session certificate" in session["decisions"]["bind"]["blocked"]


def test_explain_a_cross_tenant_policy_that_opens_nothing(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "ex-x", "--tenant", "ex-north", "--token-out", str(tmp_path / "x.token"))
    ctl.ok("service", "create", "ex-hist", "--tenant", "ex-south")
    ctl.ok("service", "create", "ex-hist", "--tenant", "ex-north")
    policy = json.loads(ctl.ok("policy", "create", "--kind", "dial", "--tenant", "ex-north", "--identities", "ex-x",
                               "--services", "ex-hist", "--json").out)["id"]
    dial = explain(ctl, "ex-north/ex-x", "ex-south/ex-hist", "--kind", "dial")["decisions"]["dial"]
    assert not dial["allowed"] and dial["foreign"] == [] and "no policy allows" in dial["reason"]
    dial = explain(ctl, "ex-north/ex-x", "ex-hist", "--kind", "dial")["decisions"]["dial"]  # its own tenant
    assert dial["allowed"] and dial["policy"] == policy


def test_explain_unknown_names_and_bad_values_are_one_sentence(ctl: Ctl) -> None:
    missing = explain(ctl, "operator", "ex-nothing-here")["decisions"]["dial"]
    assert not missing["allowed"] and missing["reason"] == "no service named default/ex-nothing-here"
    result = ctl("policy", "explain", "ex-nobody", "ex-modbus")
    assert result.code != 0 and "There is no identity default/ex-nobody" in result.err
    assert len(result.err.strip().splitlines()) == 1
    result = ctl("policy", "explain", "operator", "ex-modbus", "--kind", "connect")
    assert result.code != 0 and "invalid choice: 'connect'" in result.err
    result = ctl("policy", "explain", "operator", "Bad Name")
    assert result.code != 0 and len(result.err.strip().splitlines()) == 1
