"""Certificate rotation under a running agent: renewed on schedule, handed to new tunnels, streams kept.

The controller issues five-minute certificates (``--cert-lifetime 300``, its
documented minimum); with notBefore backdated five minutes the agent renews
40 to 160 s after it enrolled. A stream opened through the tunnel before the
renewal keeps working after it on the same tunnel; the next tunnel (after a
controller restart) presents the new certificate, as the audit shows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.enrollment.enroll import enroll_async
from agent.errors import TunnelRefused
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.tls_trust import pinned_ssl_context
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel
from shared.trust import cert_not_after
from tests.controller.harness import run, running_controller
from tests.e2e.clock_harness import (
    FAKE_CLOCKS,
    LIBFAKETIME,
    ControllerProcess,
    agent_argv,
    faketime_env,
    silent_ntp_server,
    write_agent_config,
)
from tests.e2e.harness import EchoServer, Process, free_port, read_status, wait_until

#: The controller's minimum (controller/cli.py MIN_CERT_LIFETIME).
CERT_LIFETIME = 300
#: The first renewal comes at most 160 s after enrollment (see the module docstring); slack for a loaded machine.
RENEWAL_TIMEOUT = 240.0
#: Between checks that the open stream still echoes while waiting for the renewal.
STREAM_CHECK_INTERVAL = 5.0
CONNECT_TIMEOUT = 60.0
#: One echo over loopback through the relay.
ECHO_TIMEOUT = 10.0
#: A certificate that expires while the test watches its tunnel, and how long past expiry it watches.
SHORT_LIFETIME = 3.0
PAST_EXPIRY = 1.5
SOFTWARE = KeyStoreSettings(backend="software")


def serial_of(state: Path) -> str:
    return format(x509.load_pem_x509_certificate((state / "cert.pem").read_bytes()).serial_number, "x")


def audit_events(controller: ControllerProcess, event: str) -> list[dict]:
    events = json.loads(controller.ctl("audit", "--json").stdout)["events"]
    return [e["fields"] for e in events if e["event"] == event]


def echo(stream: socket.socket, payload: bytes) -> bytes:
    stream.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = stream.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


@pytest.mark.slow
@pytest.mark.parametrize("clock", ["real clock", "1970"])
def test_a_renewed_certificate_goes_to_the_next_tunnel_while_the_current_tunnel_keeps_its_streams(
        tmp_path: Path, echo_server: EchoServer, clock: str) -> None:
    if clock != "real clock" and LIBFAKETIME is None:
        pytest.skip("faketime is not installed (scripts/setup installs it)")
    faked = FAKE_CLOCKS.get(clock)
    port = free_port()
    data = tmp_path / "controller"
    controller = ControllerProcess(data, port, "--cert-lifetime", str(CERT_LIFETIME))
    agent = connect = None
    try:
        controller.ctl("service", "create", "modbus")
        controller.ctl("policy", "create", "--kind", "bind", "--identities", "gw-rot", "--services", "modbus")
        controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "modbus")
        token = tmp_path / "gw-rot.token"
        controller.ctl("identity", "create", "gw-rot", "--token-out", str(token))
        config = write_agent_config(tmp_path, ntp=silent_ntp_server(), token=token, binds={"modbus": echo_server.port})
        state = tmp_path / "state"
        agent = Process(agent_argv("run", "--config", str(config)), env=faketime_env(faked))
        wait_until(lambda: read_status(state).get("state") == "connected", timeout=CONNECT_TIMEOUT,
                   what="the agent connected")
        first = read_status(state)
        enrolled_serial = serial_of(state)

        listen = free_port()
        connect = controller.ctl_process("connect", "modbus", "--listen", f"127.0.0.1:{listen}")
        connect.wait_for_line("listening")
        with socket.create_connection(("127.0.0.1", listen), timeout=ECHO_TIMEOUT) as stream:
            assert echo(stream, b"before the renewal") == b"before the renewal"
            deadline = time.monotonic() + RENEWAL_TIMEOUT
            checks = 0
            while serial_of(state) == enrolled_serial:
                assert time.monotonic() < deadline, f"no renewal within {RENEWAL_TIMEOUT} s:\n{agent.output}"
                time.sleep(STREAM_CHECK_INTERVAL)
                checks += 1
                payload = f"waiting {checks}".encode()
                assert echo(stream, payload) == payload
            renewed_serial = serial_of(state)
            wait_until(lambda: read_status(state).get("cert_not_after", 0) > first["cert_not_after"],
                       what="status shows the renewed certificate")
            payload = os.urandom(200_000)
            assert echo(stream, payload) == payload, "the stream opened before the renewal still works after it"

        after = read_status(state)
        assert after["state"] == "connected" and after["reconnects"] == 0
        assert after["connected_since"] == first["connected_since"], "the tunnel was not replaced"
        assert after["renewal_error"] is None and after["next_renewal"] > time.time()
        assert [e["serial"] for e in audit_events(controller, "renewal")] == [renewed_serial]
        assert [e["serial"] for e in audit_events(controller, "tunnel_connected") if "gw-rot" in e["identity"]] \
            == [enrolled_serial]

        # A new tunnel: the relay goes away and comes back at the same address.
        connect.stop()
        controller.stop()
        controller = ControllerProcess(data, port, "--cert-lifetime", str(CERT_LIFETIME))
        wait_until(lambda: read_status(state).get("state") == "connected"
                   and read_status(state).get("connected_since", 0) > first["connected_since"],
                   timeout=CONNECT_TIMEOUT, what="the agent reconnected")
        opened = [e["serial"] for e in audit_events(controller, "tunnel_connected") if "gw-rot" in e["identity"]]
        assert opened == [enrolled_serial, renewed_serial], "the new tunnel presents the renewed certificate"
    finally:
        if connect is not None:
            connect.stop()
        if agent is not None:
            assert agent.stop() == 0, agent.output
        controller.stop()


def test_the_relay_keeps_a_live_tunnel_past_its_certificates_expiry_and_refuses_that_certificate_afterwards(
        tmp_path: Path) -> None:
    """The documented decision (docs/architecture.md): expiry gates new tunnels; revoke and disable end live ones."""

    async def scenario() -> tuple[bool, str]:
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-expiring")
            token = tmp_path / "gw.token"
            token.write_text(created["token"] + "\n")
            identity = await enroll_async(token, tmp_path / "state", SOFTWARE)
            keystore = open_keystore(tmp_path / "state", SOFTWARE)
            # A certificate about to expire, for the enrolled key and identity.
            short = ctl.context.ca.issue(keystore.public_key(), identity.name, identity.tenant,
                                         dt.timedelta(seconds=SHORT_LIFETIME))
            pem = short.public_bytes(serialization.Encoding.PEM).decode()
            credentials = TunnelCredentials(identity.uri, [pem], identity.ca_pem, keystore)
            context = pinned_ssl_context(identity.ca_pem)
            try:
                async with aiohttp.ClientSession() as http:
                    session, task = await open_tunnel(http, identity.relays[0], credentials, context, TunnelOptions())
                    await asyncio.sleep(max(0.0, cert_not_after(short).timestamp() - time.time()) + PAST_EXPIRY)
                    _, status = await ctl.call("GET", "/api/v1/status")
                    alive = not session.conn.closed and any(t["name"] == "gw-expiring" for t in status["tunnels"])
                    try:
                        await open_tunnel(http, identity.relays[0], credentials, context, TunnelOptions())
                        refused = ""
                    except TunnelRefused as error:
                        refused = str(error)
                    await session.close()
                    await task
            finally:
                keystore.close()
            return alive, refused

    alive, refused = run(scenario())
    assert alive, "the live tunnel outlives its certificate"
    assert "the certificate expired at" in refused and "the agent must renew it" in refused
