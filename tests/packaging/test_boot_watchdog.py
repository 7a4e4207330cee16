"""Under a real systemd the agent and the controller feed their watchdogs, and the agent's journal has its fields.

Both run in one booted container: the controller listens on loopback, the
agent enrolls from a token ``outpostctl`` made inside and connects. Drop-ins
shorten both watchdogs to a few seconds, and the test runs past several of
them. A sanity leg shows the shortened watchdog does kill a service that
never pings, so surviving it means being fed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from boot_harness import add_dropin, boot, controller_listens_on
from host_controller import free_port

pytestmark = pytest.mark.slow

WATCHDOG_SECONDS = 3
# Several watchdog periods: a process that stopped pinging would be killed.
WATCH_SECONDS = 4 * WATCHDOG_SECONDS
# Controller start, enrollment and the first tunnel on loopback take seconds.
CONNECT_WAIT_SECONDS = 60
# No --config: outpostctl finds the packaged controller's own file (as root).
CTL = "outpostctl"


def journal_entries(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_agent_and_controller_feed_a_short_watchdog_and_the_agent_journals_its_events(
    gateway_rootfs: Path, tmp_path: Path
) -> None:
    port = free_port()
    controller_listens_on(gateway_rootfs, port)
    for unit in ("outpost-agent.service", "outpost-controller.service"):
        add_dropin(gateway_rootfs, unit, "short-watchdog", f"[Service]\nWatchdogSec={WATCHDOG_SECONDS}s\n")
    probe = f"""
        out=/run/outpost-test
        connected() {{ systemctl show -P StatusText outpost-agent | grep -q '^connected to '; }}
        wait_connected() {{
            i=0; until connected || [ $i -ge {CONNECT_WAIT_SECONDS} ]; do sleep 1; i=$((i + 1)); done
        }}
        # Sanity: a notify service that never pings its {WATCHDOG_SECONDS} s watchdog is killed for it.
        systemd-run --unit=starved -p Type=notify -p WatchdogSec={WATCHDOG_SECONDS}s -p Restart=no \\
            python3 -c 'import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a = os.environ["NOTIFY_SOCKET"]
s.connect("\\0" + a[1:] if a.startswith("@") else a); s.sendall(b"READY=1"); time.sleep(120)'
        timeout 60 systemctl start outpost-controller
        {CTL} identity create gw1 --token-out /etc/outpost/enroll.token > /dev/null
        # The unit's root step takes the token into the state directory at start.
        systemctl restart outpost-agent
        wait_connected
        # A tunnel drop and a reconnect: the relay goes away and comes back.
        systemctl restart outpost-controller
        sleep 1
        wait_connected
        # A replayed token: the controller logs the refusal through its journal handler.
        {CTL} identity create gw2 --token-out /var/tmp/gw2.token > /dev/null
        # enroll retires the token it used; the copy replays it.
        cp /var/tmp/gw2.token /var/tmp/gw2-copy.token
        outpost-agent enroll --token /var/tmp/gw2.token --state /var/tmp/gw2-a --keystore software > /dev/null
        ! outpost-agent enroll --token /var/tmp/gw2-copy.token --state /var/tmp/gw2-b --keystore software 2> $out/replayed
        systemctl show -P WatchdogTimestampMonotonic outpost-agent outpost-controller > $out/watchdog-first
        sleep {WATCH_SECONDS}
        systemctl show -P WatchdogTimestampMonotonic outpost-agent outpost-controller > $out/watchdog-later
        systemctl show starved -p ActiveState,Result > $out/starved.show
        systemctl show outpost-controller -p MainPID,NRestarts > $out/controller-late.show
        journalctl -b -u outpost-agent -o json --no-pager > $out/agent-journal.json
        journalctl -b -u outpost-controller -o json --no-pager > $out/controller-journal.json
        journalctl -b OUTPOST_EVENT=connected -o cat --no-pager > $out/connected-events
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out, report.diagnosis()

    starved = dict(line.split("=", 1) for line in report.text("starved.show").splitlines() if "=" in line)
    assert starved == {"ActiveState": "failed", "Result": "watchdog"}, report.diagnosis()
    for unit in ("outpost-agent", "outpost-controller"):
        shown = report.show(unit)
        assert (shown["ActiveState"], shown["SubState"], shown["NRestarts"]) == ("active", "running", "0"), (
            unit, report.diagnosis())
    assert report.show("outpost-agent")["StatusText"].startswith("connected to wss://127.0.0.1:"), report.diagnosis()
    first = report.text("watchdog-first").split()
    later = report.text("watchdog-later").split()
    assert len(first) == len(later) == 2, report.diagnosis()
    for before, after in zip(first, later, strict=True):
        assert 0 < int(before) < int(after), report.diagnosis()

    agent = journal_entries(report.text("agent-journal.json"))
    events = [(e["OUTPOST_EVENT"], e.get("OUTPOST_IDENTITY"), e.get("OUTPOST_RELAY")) for e in agent if "OUTPOST_EVENT" in e]
    identity = next((who for event, who, _ in events if event == "enrolled"), None)
    assert identity is not None and identity.endswith("/gw1"), events
    relay = f"wss://127.0.0.1:{port}/v1/tunnel"
    assert [e for e in events if e[0] != "enrolled"][:3] == [
        ("connected", identity, relay), ("disconnected", identity, relay), ("connected", identity, relay),
    ], events
    assert report.text("connected-events").count("tunnel up to") == 2, report.text("connected-events")
    assert all(e.get("SYSLOG_IDENTIFIER") == "outpost-agent" for e in agent if "OUTPOST_EVENT" in e)
    assert "already used" in report.text("replayed"), report.diagnosis()
    controller = journal_entries(report.text("controller-journal.json"))
    # Through the journal handler: a record with its logger and priority, not a line of stderr.
    refusals = [e for e in controller if e.get("MESSAGE", "").startswith("enrollment refused")]
    assert [(e.get("SYSLOG_IDENTIFIER"), e.get("LOGGER"), e.get("PRIORITY"), e.get("_TRANSPORT")) for e in refusals] == [
        ("outpost-controller", "controller.enrollment", "4", "journal")], report.text("controller-journal.json")[-3000:]
