"""Who may open a link between relays, and what it may do: each refusal one sentence, one audit row, nothing bound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controller.audit import IDENTITY_REFUSALS_PER_MINUTE
from controller.relay import link_client
from controller.relay.link_client import LinkFailed, LinkSession, link_tls_context, open_link
from shared.protocol import ErrorCode
from shared.tunnel.channel import ChannelReset
from tests.e2e.cross_relay_harness import (
    RelayProcess,
    RoleController,
    audit_events,
    enroll_gateway,
    store_rows,
)
from tests.e2e.harness import wait_until

#: Each link attempt of these tests ends within this long.
ATTEMPT_TIMEOUT = 20.0
#: OPENs a flooding link sends, in batches below the protocol's MAX_STREAMS a relay allows at once.
FLOOD_OPENS = 400
FLOOD_BATCH = 100


def link_from(credentials: Path, key: Path, relay: RelayProcess, ca: Path) -> LinkSession:
    """A link to ``relay`` with the certificate and key given."""
    async def attempt() -> LinkSession:
        session, _task = await open_link(relay.name, relay.address, link_tls_context(ca.read_text()),
                                         credentials.read_text(), key.read_bytes(), "t-test")
        return session
    return asyncio.run(asyncio.wait_for(attempt(), ATTEMPT_TIMEOUT))


def refusal(credentials: Path, key: Path, relay: RelayProcess, ca: Path) -> str:
    with pytest.raises(LinkFailed) as failed:
        link_from(credentials, key, relay, ca)
    return failed.value.reason


def refused_rows(controller: RoleController, reason: str) -> list[dict]:
    return [e for e in audit_events(controller, "tunnel_refused") if reason in e["reason"]]


def test_only_an_active_relay_opens_a_link_and_only_to_dial_services_bound_there(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    controller = RoleController(tmp_path / "controller", "controller")
    relays: list[RelayProcess] = []
    try:
        relay_b = RelayProcess(controller, tmp_path, "rb")
        relay_a = RelayProcess(controller, tmp_path, "ra")
        relays += [relay_b, relay_a]
        ca = controller.data / "ca" / "ca.pem"
        a_cert, a_key = relay_a.data / "tls" / "server.pem", relay_a.data / "tls" / "server.key"
        gateway = enroll_gateway(controller, tmp_path, "site-a")

        # A gateway's certificate on the link.
        reason = refusal(gateway / "cert.pem", gateway / "key.pem", relay_b, ca)
        assert "a gateway's certificate cannot open a relay link" in reason, reason
        wait_until(lambda: len(refused_rows(controller, "cannot open a relay link")) == 1, what="its audit row")

        # A relay's certificate as a gateway (no link in its AUTH).
        with monkeypatch.context() as patch:
            patch.setattr(link_client, "LINK_FIELD", "not-a-link")
            reason = refusal(a_cert, a_key, relay_b, ca)
        assert "a relay's certificate cannot act as a gateway" in reason, reason
        wait_until(lambda: len(refused_rows(controller, "cannot act as a gateway")) == 1, what="its audit row")

        # An active relay: its link may not BIND, nor open a service not bound at B.
        budget_opened = time.monotonic()  # before ra's first link_refused: its budget refills from then on
        async def misuse() -> str:
            session, task = await open_link("rb", relay_b.address, link_tls_context(ca.read_text()),
                                            a_cert.read_text(), a_key.read_bytes(), "t-test")
            try:
                session.conn.send_report({"identity": "spiffe://outpost.local/default/site-a"})  # ignored
                session.conn.send_bind(["telemetry"])
                await session.flush()
                stream = session.open_stream("default/telemetry@site-a", peer="spiffe://outpost.local/default/x#c-1")
                await session.flush()
                with pytest.raises(ChannelReset) as reset:
                    await asyncio.wait_for(stream.wait_accepted(), ATTEMPT_TIMEOUT)
                return reset.value.reason
            finally:
                await session.close()
                await asyncio.gather(task, return_exceptions=True)
        assert asyncio.run(misuse()) == "service default/telemetry is not bound by gateway site-a at relay rb"
        wait_until(lambda: len(audit_events(controller, "link_refused")) == 2, what="two link_refused rows")
        reasons = sorted(e["reason"] for e in audit_events(controller, "link_refused"))
        assert reasons[0].startswith("a relay link may not bind services"), reasons

        # A flood of OPENs on a link: each refused, the rows within the linking relay's budget, the link kept.
        async def flood() -> tuple[int, bool]:
            session, task = await open_link("rb", relay_b.address, link_tls_context(ca.read_text()),
                                            a_cert.read_text(), a_key.read_bytes(), "t-test")
            refused = 0
            try:
                for batch in range(FLOOD_OPENS // FLOOD_BATCH):
                    streams = [session.open_stream(f"default/nothing-{batch}-{i}@gw",
                                                   peer=f"spiffe://outpost.local/default/x#c-{batch}-{i}")
                               for i in range(FLOOD_BATCH)]
                    await session.flush()
                    for stream in streams:
                        with pytest.raises(ChannelReset):
                            await asyncio.wait_for(stream.wait_accepted(), ATTEMPT_TIMEOUT)
                        refused += 1
                return refused, session.close_reason is None
            finally:
                await session.close()
                await asyncio.gather(task, return_exceptions=True)
        assert asyncio.run(flood()) == (FLOOD_OPENS, True)
        # The flood's OPENs are far more than the budget, so its whole burst is recorded: wait for all of it,
        # then for any row past it a broken budget would still be writing.
        wait_until(lambda: len(audit_events(controller, "link_refused")) >= IDENTITY_REFUSALS_PER_MINUTE,
                   what="the budget's burst of link_refused rows")
        time.sleep(1.0)
        rows = audit_events(controller, "link_refused")
        # The bucket refills while a slow machine floods: its refill since ra's first refusal is allowed too.
        refilled = (time.monotonic() - budget_opened) * IDENTITY_REFUSALS_PER_MINUTE / 60
        assert len(rows) <= IDENTITY_REFUSALS_PER_MINUTE + refilled, (len(rows), refilled)
        assert not store_rows(controller, "SELECT * FROM relay_services WHERE relay = 'rb'")
        assert not audit_events(controller, "report_refused")

        # A revoked relay: the link it holds closes, its own process stops (its gateway tunnels with it), it is
        # refused on the link and as a relay of its own when it comes back.
        async def revoked_while_linked() -> tuple[ErrorCode | None, str]:
            session, task = await open_link("rb", relay_b.address, link_tls_context(ca.read_text()),
                                            a_cert.read_text(), a_key.read_bytes(), "t-test")
            await asyncio.to_thread(controller.ctl, "relay", "revoke", "ra")
            await asyncio.wait_for(session.closed.wait(), ATTEMPT_TIMEOUT)
            await asyncio.gather(task, return_exceptions=True)
            code, reason, _ = session.close_reason or (None, "", False)
            return code, reason
        code, reason = asyncio.run(revoked_while_linked())
        assert code is ErrorCode.REVOKED and reason == "relay ra is revoked", (code, reason)
        relay_a.process.proc.wait(30)
        assert "relay ra is revoked" in relay_a.process.output
        exit_code, output = relay_a.try_start()
        assert exit_code != 0 and "Relay ra was revoked at the controller" in output, output
        reason = refusal(a_cert, a_key, relay_b, ca)
        assert reason.endswith("relay ra is revoked; it may open no relay link"), reason
        wait_until(lambda: len(refused_rows(controller, "relay ra is revoked")) == 1, what="its audit row")
        assert [e["relay"] for e in audit_events(controller, "relay_revoked")] == ["ra"]
        assert any(e["peer"] == "ra" and e["reason"] == "relay ra is revoked"
                   for e in audit_events(controller, "link_closed"))

        # A retired relay: refused on the link the same way.
        relay_c = RelayProcess(controller, tmp_path, "rc")
        relays.append(relay_c)
        controller.ctl("relay", "retire", "rc")
        relay_c.process.proc.wait(30)
        reason = refusal(relay_c.data / "tls" / "server.pem", relay_c.data / "tls" / "server.key", relay_b, ca)
        assert reason.endswith("relay rc is retired; it may open no relay link"), reason
    finally:
        for relay in relays:
            relay.process.stop()
        controller.process.stop()
