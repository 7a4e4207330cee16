"""``outpostctl connect`` asks the policy before it listens: a dial no policy allows is refused at once.

The answer is the relay's own (``policy explain``), so a refused connect
never opens a local port that would refuse every connection, and never gets
a session certificate.
"""

from __future__ import annotations

import socket
import sys

from tests.e2e.harness import Process
from tests.outpostctl.harness import ROOT, Ctl, RunningController, subprocess_env
from tests.outpostctl.test_ctl_errors import one_sentence
from tests.outpostctl.test_ctl_tenants import audit_events, connect, free_port

#: Seconds connect may take to say it listens (a tunnel to the relay first).
LISTEN_TIMEOUT = 30


def issued(ctl: Ctl) -> int:
    return sum(e["event"] == "session_issued" for e in audit_events(ctl))


def test_a_dial_no_policy_allows_is_refused_with_the_policy_sentence_before_anything_listens(
        ctl: Ctl, controller: RunningController) -> None:
    ctl.ok("service", "create", "historian")
    before, port = issued(ctl), free_port()
    result = connect(controller, "historian", port)
    assert result.code != 0 and "listening" not in result.out
    assert one_sentence(result.err) == (
        "outpostctl: no policy allows identity default/operator to dial service default/historian, so the local "
        "port would refuse every connection; an admin opens it with: outpostctl policy create --kind dial "
        "--identities operator --services historian")
    assert issued(ctl) == before
    with socket.socket() as probe:  # nothing ever bound the port
        probe.bind(("127.0.0.1", port))


def test_a_policy_of_the_wrong_tenant_and_a_disabled_identity_are_named(
        ctl: Ctl, controller: RunningController) -> None:
    ctl.ok("service", "create", "scada", "--tenant", "acme")
    ctl.ok("policy", "create", "--kind", "dial", "--identities", "default/operator", "--services", "role:none")
    result = connect(controller, "acme/scada", free_port())
    assert one_sentence(result.err).startswith(
        "outpostctl: no policy allows identity default/operator to dial service acme/scada, so the local port "
        "would refuse every connection; an admin opens it with: outpostctl policy create --tenant acme --kind dial "
        "--identities default/operator --services scada")
    ctl.ok("identity", "disable", "operator")
    result = connect(controller, "acme/scada", free_port())
    try:
        assert one_sentence(result.err) == ("outpostctl: identity default/operator is disabled, so the local port "
                                            "would refuse every connection")
    finally:
        ctl.ok("identity", "enable", "operator")  # the controller serves the module's other tests


def test_an_allowed_dial_goes_on_to_listen(ctl: Ctl, controller: RunningController) -> None:
    ctl.ok("service", "create", "modbus")
    ctl.ok("policy", "create", "--kind", "dial", "--identities", "operator", "--services", "modbus")
    env = subprocess_env(OUTPOSTCTL_CONFIG=str(controller.config_path))
    process = Process([sys.executable, "-m", "outpostctl", "connect", "modbus", "--listen", "127.0.0.1:0"], env=env,
                      cwd=ROOT)
    try:
        assert "listening on 127.0.0.1:" in process.wait_for_line("outpostctl: listening", LISTEN_TIMEOUT)
    finally:
        process.stop()


