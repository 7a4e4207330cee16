"""``apt purge`` on a booted system that ran both packages leaves what Debian expects, and nothing else.

Gone: the state directories (keys, certificates, the store), /etc/outpost
with the files the packages' own programs leave there (a used token, the
copy of this controller's outpostctl.toml), /etc/default/outpost-controller,
the units and their enablement links. Kept: the system users (Debian leaves
them, so a reused id never inherits files left elsewhere), and an
outpostctl.toml for some other controller, which is the operator's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from boot_harness import DEBS_IN_CONTAINER, boot, controller_listens_on
from host_controller import free_port

pytestmark = pytest.mark.slow

PACKAGES = "outpost-agent outpost-controller"
LEFT_OVER = (
    "/var/lib/outpost-agent /var/lib/outpost-controller /etc/outpost /etc/default/outpost-controller "
    "/lib/systemd/system/outpost-agent.service /lib/systemd/system/outpost-controller.service "
    "/etc/systemd/system/multi-user.target.wants/outpost-agent.service"
)
OTHER_CONTROLLER = 'url = "https://ops.example.net:8443"\nca = "/home/ops/outpost-ca.pem"\ntoken = "elsewhere"\n'


def test_purge_removes_state_config_and_units_keeps_the_users_and_another_controllers_outpostctl_config(
    gateway_rootfs: Path, tmp_path: Path
) -> None:
    controller_listens_on(gateway_rootfs, free_port())
    (gateway_rootfs / "root/other-outpostctl.toml").write_text(OTHER_CONTROLLER)
    probe = f"""
        out=/run/outpost-test
        export DEBIAN_FRONTEND=noninteractive
        timeout 60 systemctl start outpost-controller
        # As README tells an operator: outpostctl's host-wide config, a copy of the controller's.
        cp /var/lib/outpost-controller/data/outpostctl.toml /etc/outpost/outpostctl.toml
        # What "outpost-agent enroll --token /etc/outpost/enroll.token" run as root leaves.
        echo used > /etc/outpost/enroll.token.used
        systemctl is-active outpost-agent outpost-controller > $out/active-before || true
        apt-get purge -y {PACKAGES} > $out/purge.log 2>&1
        for path in {LEFT_OVER}; do [ -e $path ] && echo $path; done > $out/left-over || true
        systemctl list-unit-files --no-legend 'outpost-agent*' 'outpost-controller*' > $out/unit-files || true
        pgrep -u outpost-agent,outpost-controller > $out/processes || true
        getent passwd outpost-agent outpost-controller | cut -d: -f1 > $out/users
        dpkg-query -W -f='${{db:Status-Abbrev}}\\n' {PACKAGES} > $out/dpkg-status 2>&1 || true

        # Again, with outpostctl pointed at another controller: that file is the operator's.
        cd {DEBS_IN_CONTAINER} && apt-get install -y ./outpost-*.deb > $out/reinstall.log 2>&1
        cp /root/other-outpostctl.toml /etc/outpost/outpostctl.toml
        apt-get purge -y {PACKAGES} > $out/purge-again.log 2>&1
        ls -A /etc/outpost > $out/etc-outpost-again
        cp /etc/outpost/outpostctl.toml $out/kept-outpostctl.toml
    """
    report = boot(gateway_rootfs, tmp_path / "shared", probe)
    assert not report.timed_out and report.text("probe.rc").strip() == "0", report.diagnosis()
    assert report.text("active-before").split() == ["active", "active"], report.diagnosis()
    assert report.text("left-over") == "", report.text("left-over") + report.text("purge.log")
    assert report.text("unit-files") == "", report.text("unit-files")
    assert report.text("processes") == "", report.text("processes")
    assert report.text("users").split() == ["outpost-agent", "outpost-controller"]
    assert "not empty so not removed" not in report.text("purge.log"), report.text("purge.log")
    # Purged, not merely removed ("rc"): dpkg knows nothing of them any more.
    for package in PACKAGES.split():
        assert f"no packages found matching {package}" in report.text("dpkg-status"), report.text("dpkg-status")
    assert report.text("etc-outpost-again").split() == ["outpostctl.toml"], report.text("purge-again.log")
    assert report.text("kept-outpostctl.toml") == OTHER_CONTROLLER
