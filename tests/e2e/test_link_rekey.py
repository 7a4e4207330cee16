"""A relay holding a link with a dial on it gets a new key, with real processes on one store.

Renewal keeps the key: a relay asking to renew with another key is refused, and
the link and its dial carry on. A new key comes only by enrolling the name again
(retire, add, a fresh data directory): the old process stops and the dial it
carried ends with it; the next dial goes over a new link whose handshake meets
the new certificate; the old key opens no link, and the old data directory no
longer starts (docs/deployment.md, "Re-keying a relay").
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller import relay_node
from controller.errors import StartupError
from controller.relay.link_client import LinkFailed, link_tls_context, open_link
from controller.settings import Settings
from shared.fsutil import atomic_write, ensure_private_dir
from shared.trust import cert_not_after
from tests.e2e.cross_relay_harness import (
    RelayProcess,
    RoleController,
    echoes,
    hosted,
    start_agent_on,
    store_rows,
    two_relays,
)
from tests.e2e.harness import EchoServer, free_port, round_trip, wait_until
from tests.e2e.test_link_cert_end import dial_links

#: Seconds a held dial waits for its echo, or for its end once its relay stopped.
ECHO_TIMEOUT = 20.0
#: A link attempt with the old key ends within this long.
ATTEMPT_TIMEOUT = 20.0


def public_key_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def served_certificate(address: str, ca_pem: str) -> x509.Certificate:
    """The certificate a TLS handshake with ``address`` meets now."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=ECHO_TIMEOUT) as raw:
        with link_tls_context(ca_pem).wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def renew_with_another_key(relay: RelayProcess, controller: RoleController, folder: Path) -> None:
    """What a relay process (or a thief of its certificate) does to move its name to a key of its choosing."""
    settings = Settings(data_dir=folder, role="relay")
    ensure_private_dir(folder)
    ensure_private_dir(settings.ca_cert_path.parent)
    ensure_private_dir(settings.server_key_path.parent)
    atomic_write(settings.ca_cert_path, (relay.data / "ca" / "ca.pem").read_bytes(), mode=0o644)
    atomic_write(settings.server_key_path, ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    relay_node.renew(settings, relay_node.RelayIdentity(relay.name, relay.address, (controller.url,)))


def key_of(controller: RoleController, relay: str) -> str:
    [(key,)] = store_rows(controller, "SELECT key_sha256 FROM relays WHERE name = ?", (relay,))
    return str(key)


def test_a_relay_re_keyed_under_a_held_dial_ends_it_cleanly_and_its_old_key_links_no_more(
        tmp_path: Path, echo_server: EchoServer) -> None:
    with two_relays(tmp_path, RoleController(tmp_path / "controller")) as pair:
        controller, relay_b, relay_a = pair.controller, pair.relay_b, pair.relay_a
        port = pair.plc_across(tmp_path, echo_server.port)
        held = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
        pair.held.append(held)
        assert echoes(held, b"1")
        first = wait_until(lambda: dial_links(controller), what="the held dial's row")[0][1]
        ca_pem = (relay_b.data / "ca" / "ca.pem").read_text()
        old_pem = (relay_b.data / "tls" / "server.pem").read_text()
        old_key = (relay_b.data / "tls" / "server.key").read_bytes()
        old = x509.load_pem_x509_certificate(old_pem.encode())
        enrolled_key = key_of(controller, "rb")

        # A renewal is for the relay's own key only: another key is refused, and nothing moves.
        with pytest.raises(StartupError, match="not the key of an enrolled relay"):
            renew_with_another_key(relay_b, controller, tmp_path / "thief")
        assert key_of(controller, "rb") == enrolled_key
        assert echoes(held, b"2")

        # The operator's re-key: the name retired (its process stops, and the dial on its link ends, not hangs) ...
        controller.ctl("relay", "retire", "rb")
        held.settimeout(ECHO_TIMEOUT)
        try:
            assert held.recv(1) == b""
        except ConnectionError:
            pass
        held.close()
        wait_until(lambda: relay_b.process.proc.poll() is not None, what="the retired relay stopping")
        # ... added again, and enrolled from a fresh data directory at the same address: a new key.
        site = pair.agents.pop(0)
        site.stop()
        (tmp_path / "rekeyed").mkdir()
        rekeyed = RelayProcess(controller, tmp_path / "rekeyed", "rb", port=relay_b.port)
        pair.agents.append(rekeyed.process)  # stopped at the end with the agents
        new = x509.load_pem_x509_certificate((rekeyed.data / "tls" / "server.pem").read_bytes())
        assert public_key_der(new) != public_key_der(old) and key_of(controller, "rb") != enrolled_key
        pair.agents.append(start_agent_on(tmp_path, "site-again", pair.states["site"], rekeyed,
                                          binds={"plc": echo_server.port}))
        wait_until(lambda: hosted(controller, "rb", "plc"), what="the re-keyed relay publishing plc")

        # New dials go over a new link, to what now answers at the address: the new certificate and key.
        assert round_trip(port, b"after the re-key", timeout=ECHO_TIMEOUT) == b"after the re-key"
        assert dial_links(controller)[-1][1] != first
        assert public_key_der(served_certificate(rekeyed.address, ca_pem)) == public_key_der(new)
        # The old link is gone long before the old certificate's end: no dial used it after the retirement.
        assert sum(link == first for _, link in dial_links(controller)) == 1
        assert time.time() < cert_not_after(old).timestamp()

        # The old key opens no link, though its certificate is in date ...
        async def link_with_the_old_key() -> str:
            with pytest.raises(LinkFailed) as failed:
                await open_link("ra", relay_a.address, link_tls_context(ca_pem), old_pem, old_key, "t-old-key")
            return failed.value.reason

        reason = asyncio.run(asyncio.wait_for(link_with_the_old_key(), ATTEMPT_TIMEOUT))
        assert "this certificate's key is not the key of relay rb" in reason, reason
        # ... and the old data directory no longer starts as relay rb.
        relay_b.address = f"127.0.0.1:{free_port()}"  # the re-keyed relay holds the old port
        code, output = relay_b.try_start()
        assert code != 0 and "Relay rb was enrolled again with another key" in output, output
        # The re-keyed relay carries on.
        assert round_trip(port, b"still", timeout=ECHO_TIMEOUT) == b"still"
