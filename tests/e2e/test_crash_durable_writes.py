"""Enrollment and renewal make every write durable, in the order that makes a crash harmless.

``outpost-agent enroll`` and ``outpost-agent renew`` run for real against a
real controller under strace. SIGKILL cannot show what a power cut loses
(the page cache outlives a killed process); the order of the calls can: each
file flushed before it is renamed into place, its directory flushed after,
the state directory flushed into its parent, the key first and
``identity.json`` (the commit marker) last.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.crash_harness import ManagementClient, agent_argv
from tests.e2e.harness import Controller, python_env
from tests.syscall_trace import durability_faults, renamed_into, traced_run


def traced_agent(*args: str):  # type: ignore[no-untyped-def]
    result, calls = traced_run(agent_argv(*args), env=python_env())
    assert result.returncode == 0, result.stderr
    return calls


def test_enrollment_stores_key_then_certificates_then_identity_each_durably(controller: Controller,
                                                                            tmp_path: Path) -> None:
    token = tmp_path / "gw.token"
    token.write_text(ManagementClient(controller.url, controller.data).create_identity("gw"))
    state = tmp_path / "var" / "outpost-agent"

    calls = traced_agent("enroll", "--token", str(token), "--state", str(state), "--keystore", "software")

    assert renamed_into(calls, state) == ["key.pem", "ca.pem", "cert.pem", "identity.json"]
    assert durability_faults(calls, tmp_path) == []


def test_renewal_replaces_the_certificate_durably_and_touches_nothing_else(controller: Controller,
                                                                         tmp_path: Path) -> None:
    token = tmp_path / "gw.token"
    token.write_text(ManagementClient(controller.url, controller.data).create_identity("gw"))
    state = tmp_path / "state"
    traced_agent("enroll", "--token", str(token), "--state", str(state), "--keystore", "software")
    old_certificate = (state / "cert.pem").read_bytes()

    calls = traced_agent("renew", "--state", str(state))

    assert renamed_into(calls, state) == ["cert.pem"]
    assert durability_faults(calls, state) == []
    assert (state / "cert.pem").read_bytes() != old_certificate
