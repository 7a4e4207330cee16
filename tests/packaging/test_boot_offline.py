"""A gateway that boots enrolled but cannot reach its controller stays up, says why, and is not restarted.

Enrolled inside the root filesystem against a controller on the host, which
is then stopped: its port is closed, as for a gateway whose network is not
there yet. A drop-in shortens the start timeout so the test waits well past
it in seconds, not minutes; everything else is the packaged unit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from boot_harness import add_dropin, boot, enroll_in_rootfs, wait_for_agent_status
from host_controller import host_controller

pytestmark = pytest.mark.slow

# Stands in for the unit's 180 s: an agent that were not ready by then would
# be killed and, RestartSec=10s later, started again.
SHORT_START_TIMEOUT_SECONDS = 8
# Past the shortened start timeout and the restart delay: a second process
# would be running by then.
WATCH_SECONDS = SHORT_START_TIMEOUT_SECONDS + 12
# The agent fails its first connection to a closed loopback port in seconds.
OFFLINE_WAIT_SECONDS = 30


def test_an_enrolled_gateway_without_its_controller_stays_one_process_past_the_start_timeout_and_says_offline(
    gateway_rootfs: Path, tmp_path: Path
) -> None:
    with host_controller(tmp_path / "controller") as controller:
        token = tmp_path / "gw1.token"
        controller.outpostctl("identity", "create", "gw1", "--token-out", str(token))
        enrolled = enroll_in_rootfs(gateway_rootfs, token.read_text())
        port = controller.port
    assert enrolled.startswith("enrolled as spiffe://"), enrolled
    add_dropin(gateway_rootfs, "outpost-agent.service", "short-start",
               f"[Service]\nTimeoutStartSec={SHORT_START_TIMEOUT_SECONDS}s\n")
    probe = f"""
        out=/run/outpost-test
        {wait_for_agent_status("offline: ", OFFLINE_WAIT_SECONDS)}
        systemctl show -P MainPID outpost-agent > $out/pid-first
        sleep {WATCH_SECONDS}
        systemctl show -P MainPID outpost-agent > $out/pid-later
        journalctl -b -u outpost-agent --no-pager -o cat > $out/agent-log
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out, report.diagnosis()
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), report.diagnosis()
    assert agent["NRestarts"] == "0", report.diagnosis()
    first, later = report.text("pid-first").strip(), report.text("pid-later").strip()
    assert first not in ("", "0") and first == later, report.diagnosis()
    status = agent["StatusText"]
    assert status.startswith(f"offline: cannot reach the relay at wss://127.0.0.1:{port}/"), report.diagnosis()
    assert "; trying again in " in status, status
    assert report.text("is-system-running").strip() == "running", report.diagnosis()
    assert "Failed with result" not in report.text("agent-log"), report.text("agent-log")
