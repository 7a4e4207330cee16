"""End to end on a booted gateway: token on the boot partition, enrollment, a dial from the host.

A controller runs on the host's loopback; the container shares the host's
network, so the token's https://127.0.0.1:PORT reaches it. The gateway binds
an echo service that listens only inside the container's probe; the host
reaches it through ``outpostctl connect``, i.e. through the tunnel.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from boot_harness import boot, place_boot_token, wait_for_agent_status
from host_controller import PROCESS_TIMEOUT_SECONDS, REPO, HostController, free_port, host_controller, python

# Enrollment plus the first tunnel on loopback take seconds; this bounds the
# waits inside the container and on the host.
ENROLL_WAIT_SECONDS = 60
DIAL_ATTEMPTS = 60
DIAL_INTERVAL_SECONDS = 1.0


pytestmark = pytest.mark.slow


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[HostController]:
    with host_controller(tmp_path / "controller") as running:
        yield running


def test_token_on_boot_partition_enrolls_and_a_host_dial_reaches_a_service_inside(
    gateway_rootfs: Path, controller: HostController, tmp_path: Path
) -> None:
    ctl = controller.ctl_config
    echo_port, dial_port = free_port(), free_port()
    token = tmp_path / "gw1.token"
    controller.outpostctl("identity", "create", "gw1", "--token-out", str(token))
    controller.outpostctl("service", "create", "echo")
    controller.outpostctl("policy", "create", "--kind", "bind", "--identities", "gw1", "--services", "echo")
    controller.outpostctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "echo")
    boot_token = place_boot_token(gateway_rootfs, token.read_text())
    (gateway_rootfs / "etc/outpost/agent.toml").write_text(
        f'[[bind]]\nservice = "echo"\ntarget = "127.0.0.1:{echo_port}"\n'
    )
    probe = f"""
        python3 -c 'import socket; s=socket.create_server(("127.0.0.1", {echo_port})); c,_=s.accept(); c.sendall(c.recv(64))' &
        {wait_for_agent_status("connected", ENROLL_WAIT_SECONDS)}
        ls /var/lib/outpost-agent > /run/outpost-test/state-listing
        systemctl show -P StatusText outpost-agent > /run/outpost-test/agent-status-line
        outpost-agent status > /run/outpost-test/agent-status 2>&1 || true
        # Hold the container up while the host dials in.
        i=0; while [ ! -e /run/outpost-test/dialed ] && [ $i -lt {ENROLL_WAIT_SECONDS} ]; do sleep 1; i=$((i+1)); done
    """
    shared = tmp_path / "shared"
    reply: list[bytes] = []

    def dial() -> None:
        connect = subprocess.Popen(python("outpostctl", "--config", str(ctl), "connect", "echo",
                                          "--listen", f"127.0.0.1:{dial_port}"), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(DIAL_ATTEMPTS):
                try:
                    with socket.create_connection(("127.0.0.1", dial_port), timeout=DIAL_INTERVAL_SECONDS) as sock:
                        sock.sendall(b"through the tunnel\n")
                        answer = sock.recv(64)
                    # Empty: the dial listener is up but the gateway is not
                    # enrolled or connected yet, so the stream was refused.
                    if answer:
                        reply.append(answer)
                        return
                except OSError:
                    pass
                time.sleep(DIAL_INTERVAL_SECONDS)
        finally:
            connect.terminate()
            connect.wait(timeout=PROCESS_TIMEOUT_SECONDS)
            shared.mkdir(parents=True, exist_ok=True)
            (shared / "dialed").touch()

    dialer = threading.Thread(target=dial)
    dialer.start()
    report = boot(gateway_rootfs, shared, probe)
    dialer.join(timeout=DIAL_ATTEMPTS * DIAL_INTERVAL_SECONDS + PROCESS_TIMEOUT_SECONDS)
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), report.diagnosis()
    assert agent["NRestarts"] == "0", report.diagnosis()
    listing = report.text("state-listing").split()
    assert "identity.json" in listing and "enroll.token" not in listing, report.diagnosis()
    assert not boot_token.exists()
    assert report.text("agent-status-line").startswith("connected to wss://127.0.0.1:"), report.diagnosis()
    assert "tunnel:      connected" in report.text("agent-status"), report.text("agent-status")
    assert reply == [b"through the tunnel\n"], report.diagnosis()
