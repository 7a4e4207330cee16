"""Controllers and relays as separate processes: a relay of its own carries the tunnels, holds no CA key,
registers itself, is refused once retired; gateways learn the relays from the controller.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from shared.protocol import TUNNEL_ALPN
from tests.e2e.harness import (
    Controller,
    EchoServer,
    free_port,
    python_env,
    read_status,
    round_trip,
    run_cli,
    wait_until,
)
from tests.e2e.relay_harness import RelayProcess, RoleController
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent


def relays_listed(controller: Controller) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(controller.ctl("relay", "list", "--json").stdout)["relays"]}


def http_status(url: str, ca: Path, method: str = "GET") -> int:
    tls = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, context=tls, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_relay_of_its_own_carries_the_tunnels_with_no_ca_key_and_stops_once_retired(
        tmp_path: Path, echo_server: EchoServer) -> None:
    controller = RoleController(tmp_path / "controller", "controller")
    relay = None
    agents = []
    try:
        relay = RelayProcess(controller, tmp_path, "r1")
        assert "as relay r1" in relay.process.wait_for_line("ready on")
        # No CA key on the relay; its own key and the audit chain's key owner-only.
        assert (relay.data / "ca" / "ca.pem").is_file() and not (relay.data / "ca" / "ca.key").exists()
        for secret in (relay.data / "tls" / "server.key", relay.data / "audit.key"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        wait_until(lambda: relays_listed(controller)["r1"]["health"] == "live", what="r1's heartbeat")
        table = controller.ctl("relay", "list").stdout.splitlines()
        assert table[0].split() == ["NAME", "ADDRESS", "STATUS", "HEALTH", "TUNNELS", "HEARTBEAT"]
        assert table[1].split()[:4] == ["r1", relay.address, "active", "live"]

        controller.ctl("service", "create", "telemetry")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", "telemetry")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", "telemetry")
        host_state = enroll_gateway(controller, tmp_path, "site-a")
        dial_state = enroll_gateway(controller, tmp_path, "central")
        # The controller names the relay, not itself: it carries no tunnels.
        assert json.loads((host_state / "identity.json").read_text())["relays"] == [relay.url]
        port = free_port()
        agents.append(start_agent(tmp_path, "site-a", host_state, binds={"telemetry": echo_server.port}))
        agents.append(start_agent(tmp_path, "central", dial_state, dials={"telemetry": port}))
        assert read_status(host_state)["relay"] == read_status(dial_state)["relay"] == relay.url
        payload = os.urandom(200_000)
        assert round_trip(port, payload) == payload
        wait_until(lambda: relays_listed(controller)["r1"]["tunnels"] == 2, what="r1's tunnel count")

        ca = controller.data / "ca" / "ca.pem"
        assert http_status(controller.url + "/v1/tunnel", ca) == 404  # --role controller: no tunnels
        # ... on the TLS transport neither: the controller does not offer the tunnel's ALPN; the relay does.
        assert negotiated_alpn(controller.url, ca) is None
        assert negotiated_alpn(relay.url, ca) == TUNNEL_ALPN
        assert read_status(dial_state)["transport"] == "tls"
        relay_base = "https://" + relay.address
        assert http_status(relay_base + "/api/v1/status", ca) == 404  # a relay serves no management API
        assert http_status(relay_base + "/v1/enroll", ca, "POST") == 404  # nor enrollment: it cannot sign

        # A revocation at the controller closes the tunnel the relay process holds (the store's poll).
        controller.ctl("identity", "revoke", "central")
        wait_until(lambda: "revoked" in (read_status(dial_state).get("last_error") or ""), timeout=10,
                   what="central's tunnel closed as revoked by the relay")
        assert read_status(host_state)["state"] == "connected"

        # Retired: the relay closes its tunnels and stops; a restart is refused in one sentence.
        controller.ctl("relay", "retire", "r1")
        relay.process.proc.wait(30)
        assert "relay r1 is retired" in relay.process.output
        wait_until(lambda: read_status(host_state)["state"] != "connected", what="the tunnel closed")
        code, output = relay.try_start()
        assert code != 0 and "Relay r1 was retired" in output, output
        assert relays_listed(controller)["r1"]["status"] == "retired"
    finally:
        for agent in agents:
            agent.stop()
        if relay is not None:
            relay.process.stop()
        controller.process.stop()


def test_a_relay_token_works_once(tmp_path: Path) -> None:
    controller = RoleController(tmp_path / "controller", "controller")
    relay = None
    try:
        relay = RelayProcess(controller, tmp_path, "r1")
        # The same token on another machine (another data directory) after the relay redeemed it.
        argv = relay.argv("--enroll-token", str(tmp_path / "relay-r1.token"))
        argv[argv.index("--data") + 1] = str(tmp_path / "thief")
        argv[argv.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
        result = run_cli("controller.cli", *argv[3:], env=python_env(), timeout=60)
        assert result.returncode != 0
        assert "This relay token is unknown, used, expired or retired" in result.stderr, result.stderr
        assert not (tmp_path / "thief" / "relay.json").exists()
        assert list(relays_listed(controller)) == ["r1"]
    finally:
        if relay is not None:
            relay.process.stop()
        controller.process.stop()


def negotiated_alpn(url: str, ca: Path) -> str | None:
    """The ALPN protocol a server picks for a client offering only the tunnel's."""
    parsed = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.set_alpn_protocols([TUNNEL_ALPN])
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        return tls.selected_alpn_protocol()
