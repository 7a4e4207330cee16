"""The one box (``serve --role all``) and relays added later are one fleet: dials cross between them both ways."""

from __future__ import annotations

import asyncio
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.relay import link_client
from controller.relay.link_client import link_tls_context, open_link
from shared.protocol import ErrorCode
from tests.controller.postgres_harness import postgres, postgres_url  # noqa: F401
from tests.e2e.cross_relay_harness import (
    RelayProcess,
    RoleController,
    StoreRelay,
    audit_events,
    enroll_gateway,
    hosted,
    start_agent_on,
)
from tests.e2e.harness import EchoServer, free_port, round_trip, wait_until
from tests.e2e.test_cross_relay_refusals import ATTEMPT_TIMEOUT, refusal, refused_rows


@dataclass(frozen=True)
class BoxAsRelay:
    """The box where the agent helpers want a relay: its address and tunnel URL."""

    address: str
    url: str
    name: str


def box_relay(box: RoleController) -> BoxAsRelay:
    address = box.url[len("https://"):].rstrip("/")
    return BoxAsRelay(address, f"wss://{address}/v1/tunnel", "_" + address.replace(".", "-").replace(":", "-"))


def relays_listed(box: RoleController) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(box.ctl("relay", "list", "--json").stdout)["relays"]}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None: the box's SQLite file, which the relay shares (one machine); else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_a_box_and_a_relay_added_later_dial_each_other_both_ways(tmp_path: Path, echo_server: EchoServer,
                                                                 store_url: str | None) -> None:
    box = RoleController(tmp_path / "box", "all", 0, *(("--store", store_url) if store_url else ()))
    box.store_location = store_url or box.data / "store.sqlite3"  # type: ignore[attr-defined]
    own = box_relay(box)
    relay: RelayProcess | None = None
    agents = []
    try:
        relay = StoreRelay(box, tmp_path, "rr", store_url)
        for service, binder, dialer in (("plc", "g1", "g2"), ("hmi", "g2", "g1")):
            box.ctl("service", "create", service)
            box.ctl("policy", "create", "--kind", "bind", "--identities", binder, "--services", service)
            box.ctl("policy", "create", "--kind", "dial", "--identities", dialer, "--services", service)
        g1, g2 = enroll_gateway(box, tmp_path, "g1"), enroll_gateway(box, tmp_path, "g2")
        to_hmi, to_plc = free_port(), free_port()
        agents.append(start_agent_on(tmp_path, "g1", g1, own, binds={"plc": echo_server.port},  # type: ignore[arg-type]
                                     dials={"hmi": to_hmi}))
        agents.append(start_agent_on(tmp_path, "g2", g2, relay, binds={"hmi": echo_server.port},
                                     dials={"plc": to_plc}))
        wait_until(lambda: hosted(box, "rr", "hmi"), what="the relay publishing hmi")
        wait_until(lambda: hosted(box, own.name, "plc"), what="the box publishing plc")

        assert round_trip(to_plc, b"relay to box") == b"relay to box"  # G2 on the relay dials G1 on the box
        assert round_trip(to_hmi, b"box to relay") == b"box to relay"  # G1 on the box dials G2 on the relay

        listed = relays_listed(box)
        assert listed[own.name]["health"] == "live" and listed[own.name]["address"] == own.address
        # Each end writes its link's audit row from a queue, a moment after the link is up.
        wait_until(lambda: len(audit_events(box, "link_connected")) >= 2, what="both links' rows")
        connected = audit_events(box, "link_connected")
        assert {(e["relay"], e["peer"]) for e in connected} == {(own.name, "rr"), ("rr", own.name)}
        wait_until(lambda: len([e for e in audit_events(box, "dial_served") if e.get("link")]) == 2,
                   what="the two dials served across the link")
        served = {(e["relay"], e["link"]) for e in audit_events(box, "dial_served") if e.get("link")}
        assert served == {(own.name, "rr"), ("rr", own.name)}
    finally:
        for agent in agents:
            agent.stop()
        if relay is not None:
            relay.process.stop()
        box.process.stop()


def test_the_box_admits_links_only_from_active_relays_and_cannot_be_retired(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    box = RoleController(tmp_path / "box", "all")
    own = box_relay(box)
    relay: RelayProcess | None = None
    try:
        relay = RelayProcess(box, tmp_path, "ra")
        ca = box.data / "ca" / "ca.pem"
        a_cert, a_key = relay.data / "tls" / "server.pem", relay.data / "tls" / "server.key"
        gateway = enroll_gateway(box, tmp_path, "site-a")
        assert stat.S_IMODE((box.data / "tls" / "relay.key").stat().st_mode) == 0o600

        # A gateway's certificate on a link to the box.
        reason = refusal(gateway / "cert.pem", gateway / "key.pem", own, ca)  # type: ignore[arg-type]
        assert "a gateway's certificate cannot open a relay link" in reason, reason
        wait_until(lambda: len(refused_rows(box, "cannot open a relay link")) == 1, what="its audit row")

        # A relay's certificate acting as a gateway at the box.
        with monkeypatch.context() as patch:
            patch.setattr(link_client, "LINK_FIELD", "not-a-link")
            reason = refusal(a_cert, a_key, own, ca)  # type: ignore[arg-type]
        assert "a relay's certificate cannot act as a gateway" in reason, reason

        # An active relay's link is admitted; revoked, the box closes it and refuses the next one.
        async def revoked_while_linked() -> tuple[ErrorCode | None, str]:
            session, task = await open_link(own.name, own.address, link_tls_context(ca.read_text()),
                                            a_cert.read_text(), a_key.read_bytes(), "t-test")
            await asyncio.to_thread(box.ctl, "relay", "revoke", "ra")
            await asyncio.wait_for(session.closed.wait(), ATTEMPT_TIMEOUT)
            await asyncio.gather(task, return_exceptions=True)
            code, reason, _ = session.close_reason or (None, "", False)
            return code, reason
        code, reason = asyncio.run(revoked_while_linked())
        assert code is ErrorCode.REVOKED and reason == "relay ra is revoked", (code, reason)
        reason = refusal(a_cert, a_key, own, ca)  # type: ignore[arg-type]
        assert reason.endswith("relay ra is revoked; it may open no relay link"), reason
        connected = [e for e in audit_events(box, "link_connected") if e["relay"] == own.name]
        closed = [e for e in audit_events(box, "link_closed") if e["relay"] == own.name]
        assert [e["peer"] for e in connected] == ["ra"] and [e["peer"] for e in closed] == ["ra"]

        # The box is the relays' CA: it cannot be retired or revoked, and stays live.
        for verb in ("retire", "revoke"):
            result = box.ctl("relay", verb, own.name, check=False)
            assert result.returncode != 0 and "cannot be retired or revoked; stop that process" in result.stderr
        assert relays_listed(box)[own.name]["status"] == "active"
    finally:
        if relay is not None:
            relay.process.stop()
        box.process.stop()
