"""A policy's end holds across controller processes: two ``outpost-controller serve`` share one store.

A gateway binds through process B and an operator's ``outpostctl connect``
dials through B; the dial policy is deleted through process A (B learns it
from the store's status changes), or simply expires (every process times
it): either way the live connection B carries is closed within 2 s.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from outpostctl.quickstart import listening_port
from tests.e2e.harness import Controller, EchoServer, Process, python_env, wait_until
from tests.e2e.serve_process import ServeProcess, bind_published
from tests.e2e.test_lifecycle_revocation import ctl_via, second, start_gateway  # noqa: F401 (fixture)

#: The issue's promise: the connections a policy allowed close within this of its end, on every process.
CLOSE_DEADLINE = 2.0
#: How long the expiring policy lives: enough to start a connect and exchange data on a loaded machine.
LIFETIME_S = 12


def open_connection(port: int) -> socket.socket:
    """A live TCP connection through the dial, proven by one echo."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def seconds_until_closed(s: socket.socket, limit: float) -> float:
    """How long until the connection ends (EOF or reset), up to ``limit`` + 3 s."""
    started = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - started < limit + 3.0:
        try:
            if s.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return float("inf")


def test_a_policy_deleted_in_one_process_or_expiring_closes_the_dial_another_carries(
        controller: Controller, second: ServeProcess, echo_server: EchoServer, tmp_path: Path) -> None:  # noqa: F811
    a_config = tmp_path / "ctl-a.toml"
    second.ctl("service", "create", "modbus")
    second.ctl("policy", "create", "--kind", "bind", "--identities", "role:gateway", "--services", "modbus")
    _, agent, _ = start_gateway(second, tmp_path, "gw-pol", echo_server)
    # The operator's tunnel may take either process (both are relays of the store): the dial reaches the
    # gateway on B from either once B published its bind.
    wait_until(lambda: bind_published(controller.data / "store.sqlite3", "modbus"), what="gw-pol's bind published")
    env = python_env()
    env["OUTPOSTCTL_CONFIG"] = str(second.ctl_config)
    # connect asks whether a policy allows the dial before it listens: the first one exists by then.
    created = json.loads(ctl_via(a_config, "policy", "create", "--kind", "dial", "--identities", "operator",
                                 "--services", "modbus", "--json").stdout)
    connect = Process([sys.executable, "-m", "outpostctl", "connect", "modbus", "--listen", "127.0.0.1:0"], env=env)
    try:
        port = listening_port(connect.wait_for_line("listening"))
        live = open_connection(port)
        # The dial is decided, and kept under its policy, where the operator's tunnel is: delete it through
        # the other process.
        on_b = any(t["name"] == "operator" for t in second.tunnels())
        ctl_via(a_config if on_b else second.ctl_config, "policy", "delete", str(created["id"]))
        elapsed = seconds_until_closed(live, CLOSE_DEADLINE)
        assert elapsed <= CLOSE_DEADLINE, f"dial still open {elapsed:.2f} s after the policy's delete elsewhere"
        live.close()
        expiring = json.loads(ctl_via(a_config, "policy", "create", "--kind", "dial", "--identities", "operator",
                                      "--services", "modbus", "--for", f"{LIFETIME_S}s", "--json").stdout)
        live = open_connection(port)
        remaining = expiring["expires_at"] - time.time()
        assert remaining > 0, "the machine is too slow for this test's lifetime"
        elapsed = seconds_until_closed(live, remaining + CLOSE_DEADLINE)
        assert elapsed <= remaining + CLOSE_DEADLINE, f"dial still open {elapsed - remaining:.2f} s after expiry"
        assert elapsed >= remaining - 0.5, "the dial closed before its policy expired"
        live.close()
        events = json.loads(ctl_via(a_config, "audit", "--json", "--limit", "200").stdout)["events"]
        reasons = [e["fields"].get("reason", "") for e in events if e["event"] == "dial_closed"]
        assert any(r.startswith(f"policy {created['id']} was deleted") for r in reasons), reasons
        assert any(r.startswith(f"policy {expiring['id']} expired at") for r in reasons), reasons
    finally:
        connect.stop()
        agent.stop()
