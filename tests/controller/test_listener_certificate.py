"""The listener's certificate is renewed while the controller runs, and no tunnel drops for it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path

from cryptography import x509

from controller.settings import LISTENER_CERT_RENEW_FRACTION
from shared.trust import cert_not_after
from tests.controller.harness import Running, run, running_controller
from tests.controller.relay.relay_harness import KeyOf, connect, enrolled
from tests.controller.relay.test_relay_decisions import dial_refusal

#: Seconds of life for the listener's certificate in this test: renewed after
#: two thirds of it (4 s), so the first one expires during the test.
SHORT_LIFETIME = 6
#: Bound on the whole scenario: two lifetimes and the tunnels' setup, on a loaded machine.
SCENARIO_TIMEOUT = 60.0


async def presented_certificate(ctl: Running) -> x509.Certificate:
    port = int(ctl.url.rsplit(":", 1)[1])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctl.client_tls, server_hostname="localhost"), 10)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


def test_the_listener_certificate_is_renewed_while_running_and_a_tunnel_stays_up_across_it(
        tmp_path: Path, loop_name: str) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", listener_cert_lifetime=SHORT_LIFETIME) as ctl:
            first = await presented_certificate(ctl)
            gateway = await enrolled(ctl, "gw-a")
            async with connect(ctl, gateway) as (tunnel, _):
                # Watch new handshakes until past the first certificate's expiry (bounded by the scenario).
                expiry = cert_not_after(first)
                renewed_at = None
                while (now := dt.datetime.now(dt.UTC)) < expiry + dt.timedelta(seconds=1):
                    current = await presented_certificate(ctl)
                    if renewed_at is None and current.serial_number != first.serial_number:
                        renewed_at = now
                    await asyncio.sleep(0.25)
                # Renewed well before expiry: at the named fraction of its life, not at the last moment.
                assert renewed_at is not None, "the listener's certificate was never renewed"
                left = SHORT_LIFETIME * (1 - LISTENER_CERT_RENEW_FRACTION)
                assert (expiry - renewed_at).total_seconds() > left / 2
                current = await presented_certificate(ctl)
                assert cert_not_after(current) > dt.datetime.now(dt.UTC)
                # The tunnel from before the renewal still carries a round trip through the relay ...
                assert not tunnel.conn.closed
                await dial_refusal(tunnel, "no-such-service")
                # ... and a new one authenticates against the renewed certificate.
                async with connect(ctl, gateway) as (second, _):
                    await dial_refusal(second, "no-such-service")
            on_disk = x509.load_pem_x509_certificate((tmp_path / "ctl" / "tls" / "server.pem").read_bytes())
            assert cert_not_after(on_disk) >= cert_not_after(current)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT), loop_name)


class RenewsWhileSigning(KeyOf):
    """A key store whose signature of the relay's challenge comes after the listener certificate was renewed."""

    def __init__(self, key, server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(key)
        self.server, self.loop = server, loop

    def sign(self, data: bytes) -> bytes:  # runs in a worker thread (AgentSession.on_challenge)
        issued = self.server.issue_certificate()
        asyncio.run_coroutine_threadsafe(self._use(issued), self.loop).result(10)
        return super().sign(data)

    async def _use(self, issued) -> None:
        self.server.use_certificate(*issued)


def test_a_tunnel_whose_handshake_came_just_before_a_renewal_still_authenticates(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            gateway = await enrolled(ctl, "gw-a")
            before = ctl.context.server_certificate_der
            racing = dataclasses.replace(
                gateway, keystore=RenewsWhileSigning(gateway.keystore._key, ctl.server, asyncio.get_running_loop()))
            async with connect(ctl, racing) as (tunnel, _):
                assert ctl.context.server_certificate_der != before  # the AUTH came after the swap
                await dial_refusal(tunnel, "no-such-service")

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_the_listener_sends_no_session_ticket_after_its_handshake(tmp_path: Path) -> None:
    """No client resumes: the tickets would be paid for on every one of a fleet's handshakes for nothing."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            port = int(ctl.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctl.client_tls, server_hostname="localhost"), 10)
            # An HTTP answer comes after whatever the server sent once the handshake ended: tickets included.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 ")
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
            assert not ssl_object.session.has_ticket
            writer.close()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
