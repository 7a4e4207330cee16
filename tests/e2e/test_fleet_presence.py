"""Central ops see every gateway: a real agent reports itself, and ``outpostctl identity list`` shows it.

A real controller process, a real ``outpost-agent run`` and ``outpostctl``
on 127.0.0.1: the agent's report travels the real tunnel, the relay keeps
it, and presence outlives the tunnel and the controller's restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared import __version__
from tests.e2e.harness import Controller, read_status, wait_until
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent


def listed(controller: Controller, *filters: str) -> dict[str, dict]:
    result = controller.ctl("identity", "list", "--json", *filters)
    return {entry["name"]: entry for entry in json.loads(result.stdout)["identities"]}


def test_a_real_agents_report_and_presence_through_a_restart(controller: Controller, tmp_path: Path) -> None:
    state = enroll_gateway(controller, tmp_path, "gw-fleet", "gateway")
    controller.ctl("identity", "create", "gw-never", "--token-out", str(tmp_path / "never.token"))
    agent = start_agent(tmp_path, "gw-fleet", state)
    try:
        entry = wait_until(lambda: listed(controller)["gw-fleet"] if listed(controller)["gw-fleet"]["agent_version"]
                           else None, what="the agent's report in identity list")
        assert entry["presence"] == "online" and entry["agent_version"] == __version__
        assert entry["key_backend"] == "software" and entry["link_profile"] == read_status(state)["link"]
        assert entry["clock_source"] == read_status(state)["clock_source"]
        assert entry["cert_not_after"] and entry["next_renewal"] and entry["relay"]
        for field in ("presence", "last_seen", "relay", "agent_version", "rtt_ms", "link_profile", "clock_offset_s",
                      "key_backend", "cert_not_after", "next_renewal"):
            assert field in entry
        assert read_status(state)["reports_sent"] in (1, 2)  # at tunnel up, and once more for the first round trip
        table = controller.ctl("identity", "list").stdout.splitlines()
        assert table[0].split()[:4] == ["NAME", "TENANT", "STATUS", "PRESENCE"]
        row = next(line for line in table if line.startswith("gw-fleet "))
        assert " online " in row and __version__ in row
        shown = controller.ctl("identity", "show", "gw-fleet").stdout
        assert "key backend" in shown and "software" in shown and "presence" in shown
        assert set(listed(controller, "--offline")) == {"gw-never", "operator"}  # operator: created at first start
        assert listed(controller, "--offline")["gw-never"]["presence"] == "never"
        assert set(listed(controller, "--expiring", "7d")) == {"gw-fleet"}  # a 24 h certificate
        assert set(listed(controller, "--role", "gateway")) == {"gw-fleet"}
        assert listed(controller, "--overdue") == {}
        assert set(listed(controller, "--presence", "online,overdue")) == {"gw-fleet"}
    finally:
        agent.stop()
    wait_until(lambda: listed(controller)["gw-fleet"]["presence"] == "offline", what="offline once the agent stopped")
    last_seen = listed(controller)["gw-fleet"]["last_seen"]
    controller.process.stop()
    again = Controller(controller.data)
    try:
        entry = listed(again)["gw-fleet"]
        assert entry["presence"] == "offline" and entry["last_seen"] == last_seen
        assert entry["agent_version"] == __version__
    finally:
        again.process.stop()


def test_bad_filter_values_say_what_to_write_and_exit_non_zero(controller: Controller) -> None:
    for args, words in [
        (("--expiring", "soon"), "'soon' is not a duration: write a number and a unit (s, m, h, d, w)"),
        (("--expiring", "20y"), "is not a duration"),
        (("--expiring", "99999w"), "longer than ten years"),
        (("--tenant", "Not A Tenant"), "tenant"),
        (("--presence", "asleep"), "'asleep' is not a presence: use one or more of online, overdue, offline, never"),
    ]:
        result = controller.ctl("identity", "list", *args, check=False)
        assert result.returncode != 0, args
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = controller.ctl("identity", "show", "nobody-here", check=False)
    assert missing.returncode != 0 and "There is no identity default/nobody-here" in missing.stderr


def test_a_graceful_stop_tells_the_agent_when_to_come_back_and_leaves_it_offline_in_the_store(
        controller: Controller, tmp_path: Path) -> None:
    # The stop ends the process without the interpreter's own teardown (controller/cli.py): what it
    # must leave behind, its log lines, presence rows and audit rows, is checked from outside.
    state = enroll_gateway(controller, tmp_path, "gw-stopped", "gateway")
    agent = start_agent(tmp_path, "gw-stopped", state)
    try:
        wait_until(lambda: listed(controller)["gw-stopped"]["presence"] == "online", what="online")
        assert controller.process.stop() == 0
        wait_until(lambda: "relay shutting down" in (read_status(state).get("last_drop") or ""),
                   what="the agent told why its tunnel ended")
        assert read_status(state)["state"] == "waiting"
    finally:
        agent.stop()
    assert "the relay asked us to come back in" in agent.output
    assert "audit checkpoint " in controller.process.output  # logged last, after the tunnels' rows
    assert not [line for line in controller.process.lines if "Traceback" in line or " ERROR " in line]
    again = Controller(controller.data)
    try:
        assert listed(again)["gw-stopped"]["presence"] == "offline"
        events = json.loads(again.ctl("audit", "--json").stdout)["events"]
        closed = [e["fields"] for e in events if e["event"] == "tunnel_closed"
                  and e["fields"]["identity"] == "default/gw-stopped"]
        assert [(c["closed_by"], c["reason"]) for c in closed] == [("relay", "relay shutting down")]
        assert again.ctl("audit", "verify").stdout.startswith("the chain is whole: ")
    finally:
        again.process.stop()
