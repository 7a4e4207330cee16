"""The .debs installed by apt into a Debian 12 root filesystem, booted with systemd as PID 1.

Slow: the first run builds a root filesystem with debootstrap (cached under
/var/tmp/outpost-rootfs-cache); each boot then takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from boot_harness import boot, controller_listens_on, place_boot_token, run_in_rootfs
from host_controller import free_port

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
STATE = "var/lib/outpost-agent"
# The agent refuses a malformed token within a second of its start.
SETTLE_SECONDS = 40
# Longer than a couple of the agent's 5 s polls for a new token file.
REFUSED_WATCH_SECONDS = 12


def test_apt_installs_both_packages_with_debians_python_libraries(installed_rootfs: Path) -> None:
    result = run_in_rootfs(installed_rootfs, """
        dpkg-query -W -f='${Package} ${Status}\\n' outpost-agent outpost-controller python3-aiohttp \
            python3-cryptography python3-jwt python3-ntplib python3-systemd python3-tpm2-pytss
        stat -c '%n %a %U:%G' /var/lib/outpost-agent /var/lib/outpost-controller
        getent group tss >/dev/null && echo tss-group
        systemctl is-enabled outpost-agent || true
        systemctl is-enabled outpost-controller || true
        outpost-agent --help >/dev/null && echo agent-launcher-ok
        outpostctl --help >/dev/null && echo outpostctl-launcher-ok
        ls /usr/lib/outpost-agent/agent/__pycache__ | grep -c cpython-311
    """, check=True)
    lines = result.stdout.splitlines()
    for package in ("outpost-agent", "outpost-controller", "python3-aiohttp", "python3-cryptography",
                    "python3-jwt", "python3-ntplib", "python3-systemd", "python3-tpm2-pytss"):
        assert f"{package} install ok installed" in lines
    assert "/var/lib/outpost-agent 700 outpost-agent:outpost-agent" in lines
    assert "/var/lib/outpost-controller 700 outpost-controller:outpost-controller" in lines
    assert "tss-group" in lines
    # The agent is enabled (it waits for a token); the controller waits for its operator.
    assert lines[lines.index("tss-group") + 1: lines.index("tss-group") + 3] == ["enabled", "disabled"]
    assert "agent-launcher-ok" in lines and "outpostctl-launcher-ok" in lines
    assert int(lines[-1]) > 0, "py3compile did not byte-compile the agent"


def test_unenrolled_gateway_boots_clean_with_the_agent_waiting_and_the_controller_ready(
    gateway_rootfs: Path, tmp_path: Path
) -> None:
    port = free_port()
    controller_listens_on(gateway_rootfs, port)
    # "systemctl start" returns once the Type=notify unit reported READY=1.
    probe = """
        timeout 60 systemctl start outpost-controller
        ls /var/lib/outpost-controller/data > /run/outpost-test/controller-data
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out and report.returncode == 0, report.diagnosis()
    assert report.text("is-system-running").strip() == "running", report.diagnosis()
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), report.diagnosis()
    assert agent["StatusText"] == (
        "waiting for enrollment: no token file in /var/lib/outpost-agent/enroll.token, /etc/outpost/enroll.token, "
        "/boot/firmware/outpost-enroll.token; copy the token file from central ops to one of them"
    ), report.diagnosis()
    controller = report.show("outpost-controller")
    assert (controller["ActiveState"], controller["SubState"]) == ("active", "running"), report.diagnosis()
    assert controller["StatusText"] == f"serving on port {port}"
    assert "outpostctl.toml" in report.text("controller-data"), report.diagnosis()
    assert report.text("failed").strip() == ""


def test_agent_sandbox_runs_debians_python_stack_and_reports_ready(gateway_rootfs: Path, tmp_path: Path) -> None:
    probe_dir = gateway_rootfs / "usr/local/lib/outpost-test"
    probe_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "sandbox_probe.py", probe_dir / "sandbox_probe.py")
    dropin = gateway_rootfs / "etc/systemd/system/outpost-agent.service.d"
    dropin.mkdir(parents=True)
    # The real unit, hardening and all, with only the command swapped.
    (dropin / "probe.conf").write_text(
        "[Unit]\nConditionPathExists=\n[Service]\nExecStartPre=\nExecStart=\n"
        "ExecStart=/usr/bin/python3 -I /usr/local/lib/outpost-test/sandbox_probe.py\n"
    )
    probe = """
        cp /var/lib/outpost-agent/sandbox-probe.json /run/outpost-test/ || true
        journalctl -b -t outpost-agent -o json --no-pager > /run/outpost-test/agent-journal.json
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out, report.diagnosis()
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), report.diagnosis()
    found = json.loads(report.text("sandbox-probe.json") or "null")
    assert found is not None, report.diagnosis()
    assert found["user"] != 0
    assert found["tpm2_pytss"] == "importable"
    assert found["loopback_echo"] == "outpost\n"
    assert found["under_systemd"] is True
    assert found["watchdog_interval"] == 30.0
    assert found["writable"] == {
        "/etc/outpost-probe": False, "/usr/lib/outpost-agent/probe": False,
        "/var/lib/outpost-agent/probe": True, "/tmp/probe": True,
    }
    assert found["home_visible"] is False
    journal = [json.loads(line) for line in report.text("agent-journal.json").splitlines() if line.strip()]
    assert any(entry.get("MESSAGE") == "sandbox probe done" and entry.get("LOGGER") == "outpost.probe"
               for entry in journal), report.diagnosis()


def test_a_refused_boot_token_stays_the_agent_says_why_and_waits_without_restarting(
    gateway_rootfs: Path, tmp_path: Path
) -> None:
    place_boot_token(gateway_rootfs, "this.is-not.a-token\n")
    probe = f"""
        i=0
        until [ -e /{STATE}/enroll-refused.json ] || [ $i -ge {SETTLE_SECONDS} ]; do sleep 1; i=$((i + 1)); done
        # Several of the agent's polls, to show it does not try the same file again.
        sleep {REFUSED_WATCH_SECONDS}
        stat -c '%n %a %U' /{STATE}/enroll.token > /run/outpost-test/kept || true
        ls -A /boot/firmware /{STATE} > /run/outpost-test/listing
        journalctl -b -u outpost-agent --no-pager -o cat > /run/outpost-test/agent-log
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out, report.diagnosis()
    sentence = "the token file is not an Outpost enrollment token; check the file or ask central ops for a new one"
    agent = report.show("outpost-agent")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), report.diagnosis()
    assert agent["StatusText"] == f"waiting for enrollment: {sentence}", report.diagnosis()
    assert agent["NRestarts"] == "0", report.diagnosis()
    assert report.text("kept").strip() == f"/{STATE}/enroll.token 600 outpost-agent", report.diagnosis()
    listing = report.text("listing")
    assert "outpost-enroll.token" not in listing and "identity.json" not in listing, listing
    log = report.text("agent-log")
    assert "outpost-agent: moved the enrollment token" in log, log
    refusals = [line for line in log.splitlines() if line.startswith("could not enroll from")]
    assert refusals == [f"could not enroll from /{STATE}/enroll.token: {sentence}"], log
