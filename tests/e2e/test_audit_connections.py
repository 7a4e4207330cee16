"""Connection records end to end: real controller and agent processes, a real dial through the relay.

One dial carries bytes and closes; another is allowed and then fails at the
gateway (nothing listens behind its bind). ``outpostctl connections`` and
``outpostctl audit --correlation`` tell each one's story, and the chain verifies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e.harness import Controller, EchoServer, free_port, round_trip, wait_until
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent

PAYLOAD_BYTES = 200_000
#: The relay writes a dial's last events in a worker thread after the stream ended.
RECORD_WAIT = 15.0


def connections(controller: Controller, *args: str) -> list[dict]:
    return json.loads(controller.ctl("connections", "--json", *args).stdout)["connections"]


def settled(controller: Controller, outcome: str) -> dict:
    """The newest connection once it reached ``outcome`` (bounded wait)."""
    def newest() -> dict | None:
        found = connections(controller, "--identity", "central", "--limit", "1")
        return found[0] if found and found[0]["outcome"] == outcome else None
    return wait_until(newest, timeout=RECORD_WAIT, interval=0.3, what=f"a connection {outcome}")


def test_a_dial_that_carries_bytes_and_one_that_fails_at_the_gateway_are_recorded(
        controller: Controller, echo_server: EchoServer, tmp_path: Path) -> None:
    for service in ("telemetry", "historian"):
        controller.ctl("service", "create", service)
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", service)
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", service)
    host_state = enroll_gateway(controller, tmp_path, "site-a")
    dial_state = enroll_gateway(controller, tmp_path, "central")
    telemetry, historian = free_port(), free_port()
    host = start_agent(tmp_path, "site-a", host_state, binds={"telemetry": echo_server.port, "historian": free_port()})
    dialer = start_agent(tmp_path, "central", dial_state, dials={"telemetry": telemetry, "historian": historian})
    try:
        payload = os.urandom(PAYLOAD_BYTES)
        assert round_trip(telemetry, payload) == payload
        closed = settled(controller, "closed")
        assert (closed["identity"], closed["service"], closed["gateway"]) == (
            "default/central", "default/telemetry", "default/site-a")
        assert closed["bytes_up"] == closed["bytes_down"] == PAYLOAD_BYTES
        assert closed["policy"] is not None and closed["duration_s"] >= 0 and closed["closed_by"] in ("dialer", "gateway")
        assert round_trip(historian, b"anyone there?") == b""
        failed = settled(controller, "failed")
        assert failed["service"] == "default/historian" and failed["policy"] is not None
        assert failed["reason"], failed
        story = json.loads(controller.ctl("audit", "--correlation", failed["id"], "--json").stdout)["events"]
        assert [e["event"] for e in story] == ["dial_requested", "dial_allowed", "dial_failed"]
        shown = controller.ctl("connections", "--service", "telemetry").stdout
        assert closed["id"] in shown and failed["id"] not in shown
        assert controller.ctl("audit", "verify").stdout.startswith("the chain is whole: ")
    finally:
        dialer.stop()
        host.stop()
