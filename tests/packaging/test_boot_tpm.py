"""Debian's tpm2-pytss works inside the agent's sandbox: enrollment and tunnels with the key in a TPM.

The container has no TPM device, so the TPM is swtpm on the host's loopback,
reached with the ``swtpm`` TCTI over TCP (the unit allows AF_INET). What this
proves is the sandbox, not the device path: tpm2-pytss and its cffi bindings
load and run under MemoryDenyWriteExecute=, SystemCallFilter= and
NoNewPrivileges= on Debian 12's python3-tpm2-pytss, creating the key, signing
the CSR and every tunnel challenge inside the TPM. ``DeviceAllow=/dev/tpmrm0``
itself cannot be exercised without a TPM character device here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from boot_harness import boot, place_boot_token, wait_for_agent_status
from host_controller import HostController, host_controller

from tests.agent.identity.swtpm_harness import SWTPM, Swtpm, running_swtpm

pytestmark = [pytest.mark.slow, pytest.mark.skipif(SWTPM is None, reason="swtpm is not installed")]

STATE = "/var/lib/outpost-agent"
# Enrollment and the first tunnel on loopback, signatures in swtpm: seconds.
CONNECT_WAIT_SECONDS = 60


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Swtpm]:
    with running_swtpm(tmp_path / "swtpm") as chip:
        yield chip


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[HostController]:
    with host_controller(tmp_path / "controller") as running:
        yield running


def test_the_sandboxed_agent_enrolls_and_connects_with_its_key_in_a_tpm(
    gateway_rootfs: Path, controller: HostController, tpm: Swtpm, tmp_path: Path
) -> None:
    token = tmp_path / "gw-tpm.token"
    controller.outpostctl("identity", "create", "gw-tpm", "--token-out", str(token))
    place_boot_token(gateway_rootfs, token.read_text())
    (gateway_rootfs / "etc/outpost/agent.toml").write_text(
        f'[keystore]\nbackend = "tpm"\ntcti = "{tpm.tcti}"\n'
    )
    probe = f"""
        out=/run/outpost-test
        {wait_for_agent_status("connected to ", CONNECT_WAIT_SECONDS)}
        outpost-agent status --json > $out/status.json 2>&1 || true
        ls -A {STATE} > $out/state-listing
        journalctl -b -u outpost-agent --no-pager -o cat > $out/agent-log
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out, report.diagnosis()
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"], agent["NRestarts"]) == ("active", "running", "0"), (
        report.diagnosis())
    assert agent["StatusText"].startswith("connected to wss://127.0.0.1:"), report.diagnosis()
    status = json.loads(report.text("status.json") or "null")
    assert status is not None and status["key_backend"] == "tpm", report.text("status.json")
    assert status["tunnel"]["state"] == "connected", status
    log = report.text("agent-log")
    assert f"created the device key in the TPM at {tpm.tcti}" in log, log
    listing = report.text("state-listing").split()
    assert "identity.json" in listing and "key.pem" not in listing, listing
