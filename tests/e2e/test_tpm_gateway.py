"""A gateway whose device key lives in a (software) TPM, end to end.

swtpm runs in socket mode with no resource manager, as the harshest stand-in
for a real chip: enrollment signs its CSR inside it, every tunnel login signs
the relay's challenge inside it, and nothing private is ever on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.agent.identity.swtpm_harness import SWTPM, Swtpm
from tests.e2e.harness import Controller, EchoServer, Process, free_port, python_env, read_status, round_trip, wait_until

pytestmark = pytest.mark.skipif(SWTPM is None, reason="swtpm is not installed (scripts/setup installs it)")
# How long a refused start may take: one TPM round trip and a clear exit, no retry loop.
PROMPT_EXIT = 15.0


def agent_config(path: Path, state: Path, tcti: str, echo_port: int) -> Path:
    path.write_text(
        f'state_dir = "{state}"\n\n[keystore]\nbackend = "tpm"\ntcti = "{tcti}"\n\n'
        f'[[bind]]\nservice = "plc"\ntarget = "127.0.0.1:{echo_port}"\n'
    )
    return path


def loads_as_private_key(data: bytes) -> bool:
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            loader(data, password=None)
            return True
        except (ValueError, TypeError):
            continue
    return False


def test_a_tpm_gateway_enrolls_tunnels_and_keeps_no_key_on_disk(controller: Controller, echo_server: EchoServer,
                                                              tpm: Swtpm, tmp_path: Path) -> None:
    controller.ctl("service", "create", "plc")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-tpm", "--services", "plc")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "plc")
    token = tmp_path / "gw-tpm.token"
    controller.ctl("identity", "create", "gw-tpm", "--token-out", str(token))
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", state, tpm.tcti, echo_server.port)

    enrolled = subprocess.run([sys.executable, "-m", "agent", "enroll", "--token", str(token), "--config", str(config)],
                              capture_output=True, text=True, timeout=60, env=python_env())
    assert enrolled.returncode == 0, enrolled.stderr
    assert "key in tpm" in enrolled.stdout
    files = sorted(p.name for p in state.iterdir())
    assert "key.tpm.json" in files and "key.pem" not in files
    assert not any(loads_as_private_key(p.read_bytes()) for p in state.iterdir() if p.is_file())

    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", what="TPM agent connected")
        port = free_port()
        connect = controller.ctl_process("connect", "plc", "--listen", f"127.0.0.1:{port}")
        try:
            connect.wait_for_line("listening")
            payload = os.urandom(100_000)
            assert round_trip(port, payload) == payload
        finally:
            connect.stop()
        status = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, env=python_env())
        assert "tpm" in status.stdout
    finally:
        agent.stop()


def test_a_cleared_tpm_means_reenroll_with_a_distinct_exit_and_no_retry(controller: Controller, tpm: Swtpm,
                                                                        tmp_path: Path) -> None:
    token = tmp_path / "gw-lost.token"
    controller.ctl("identity", "create", "gw-lost", "--token-out", str(token))
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", state, tpm.tcti, free_port())
    enrolled = subprocess.run([sys.executable, "-m", "agent", "enroll", "--token", str(token), "--config", str(config)],
                              capture_output=True, text=True, timeout=60, env=python_env())
    assert enrolled.returncode == 0, enrolled.stderr
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}

    tpm.clear()
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=PROMPT_EXIT, env=python_env())
    assert run.returncode == 78, run.stderr
    assert "device key lost" in run.stderr and "re-enroll" in run.stderr
    assert len([l for l in run.stderr.splitlines() if "device key lost" in l]) == 1
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name != "status.json"} == before
