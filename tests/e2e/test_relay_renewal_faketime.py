"""A real ``--role relay`` process through its own renewal, against a real controller process: its clock (alone)
jumps to the renewal point under libfaketime, it renews over HTTPS like any day, presents the new certificate on a
gateway's tunnel (RELAY_CERT), which stays, and serves new handshakes with it; the link from another relay and the
dial it carries survive the renewal.

The relay's certificate lives at least 300 s (the command line's floor) and renews at two thirds of that, so the
test moves the relay's wall clock instead of waiting: libfaketime reads the offset from a file (re-read every
second), set to the renewal point and back to none once the relay renewed. The monotonic clock is left alone
(the relay's timers run on it; libfaketime 0.9.10 also breaks ``time.sleep`` when it fakes it).
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.relay_node import renewal_due
from shared.trust import cert_not_after
from tests.e2e.clock_harness import LIBFAKETIME
from tests.e2e.cross_relay_harness import RelayProcess, RoleController, audit_events, echoes, two_relays
from tests.e2e.harness import EchoServer, Process, python_env, read_status, round_trip, wait_until

pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="faketime is not installed (scripts/setup installs it)")

#: The shortest relay certificate the controller's command line issues (controller/cli.py MIN_CERT_LIFETIME).
RELAY_LIFE = 300
#: libfaketime re-reads the clock file this often (seconds): a jump reaches the relay within it.
CLOCK_FILE_CACHE = 1
#: Seconds past the renewal point the relay's clock jumps to: inside the next turn of its loop (1 s), far
#: from the drain point of its links (3/4 of the life, 25 s later).
PAST_DUE = 1
#: The relay renews within this long of its clock jumping: the file's cache, a turn of its loop, one HTTPS
#: exchange with the controller, on a loaded machine.
RENEWED_WITHIN = 20.0
#: Seconds a held dial waits for its echo.
ECHO_TIMEOUT = 20.0


class SkewedRelay(RelayProcess):
    """A relay process whose wall clock is the real one plus the offset written in ``clock`` (libfaketime)."""

    def __init__(self, controller: RoleController, tmp_path: Path, name: str) -> None:
        self.clock = tmp_path / f"relay-{name}.faketime"
        self.clock.write_text("+0\n")
        super().__init__(controller, tmp_path, name)

    def start(self, *extra: str) -> Process:
        assert LIBFAKETIME is not None
        env = {**python_env(), "LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(self.clock),
               "FAKETIME_CACHE_DURATION": str(CLOCK_FILE_CACHE), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        process = Process(self.argv(*extra), env=env)
        process.wait_for_line("ready on https://")
        return process

    def skew(self, seconds: int) -> None:
        self.clock.write_text(f"{seconds:+d}\n")

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.data / "tls" / "server.pem").read_bytes())

    def served_certificate(self) -> x509.Certificate:
        """The certificate a new TLS handshake with the relay sees."""
        tls = ssl.create_default_context(cadata=(self.data / "ca" / "ca.pem").read_text())
        tls.check_hostname = False
        with socket.create_connection(("127.0.0.1", self.port), timeout=ECHO_TIMEOUT) as raw, \
                tls.wrap_socket(raw) as conn:
            der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_relay_renews_for_real_its_gateway_keeps_the_tunnel_and_a_link_keeps_its_dial(
        tmp_path: Path, echo_server: EchoServer) -> None:
    controller = RoleController(tmp_path / "controller", "controller", 0, "--relay-cert-lifetime", str(RELAY_LIFE))
    with two_relays(tmp_path, controller, relay_b_kind=SkewedRelay) as pair:
        relay_b = pair.relay_b
        assert isinstance(relay_b, SkewedRelay)
        port = pair.plc_across(tmp_path, echo_server.port)
        held = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
        pair.held.append(held)
        assert echoes(held, b"1")
        assert len(audit_events(controller, "link_connected")) == 1

        old = relay_b.certificate()
        assert relay_b.served_certificate() == old
        due = renewal_due(old.public_bytes(serialization.Encoding.DER))
        assert due - time.time() > RELAY_LIFE / 2, "the relay renewed before its clock moved"
        relay_b.skew(math.ceil(due - time.time()) + PAST_DUE)
        try:
            wait_until(lambda: relay_b.certificate() != old, timeout=RENEWED_WITHIN, interval=0.2,
                       what="relay rb renewing its certificate")
        finally:
            relay_b.skew(0)  # its clock back: the renewed certificate is due again only in 200 s
        new = relay_b.certificate()
        assert cert_not_after(new) > cert_not_after(old) and spki(new) == spki(old)  # the same key, renewed
        renewed = [e for e in audit_events(controller, "relay_renewed") if e["relay"] == "rb"]
        assert [e["serial"] for e in renewed] == [format(new.serial_number, "x")]

        # New handshakes see the renewed certificate; the gateway's tunnel took it in-band and stayed.
        wait_until(lambda: relay_b.served_certificate() == new, what="rb serving the renewed certificate")
        site_agent = pair.agents[0]
        serial = format(new.serial_number, "x")
        wait_until(lambda: any(f"renewed its certificate (serial {serial}); the tunnel stays" in line
                               for line in site_agent.lines), what="site taking the pushed certificate")
        assert sum("tunnel up to" in line for line in site_agent.lines) == 1
        assert read_status(pair.states["site"]).get("state") == "connected"

        # The link from relay A carried its dial through the renewal and takes new ones: still one link.
        assert echoes(held, b"2")
        assert round_trip(port, b"after the renewal", timeout=ECHO_TIMEOUT) == b"after the renewal"
        assert len(audit_events(controller, "link_connected")) == 1
        assert audit_events(controller, "link_closed") == []
