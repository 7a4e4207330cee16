"""The controller in role all as a relay among relays: its own relay certificate, its row, its heartbeat."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller import box_relay
from controller.box_relay import BoxRelay, refresh
from controller.ca import public_key_sha256, relay_uri
from controller.relays import RELAY_STALE_AFTER, check_address
from controller.relays_api import relay_book
from controller.settings import Settings
from tests.controller.harness import run, running_controller


def _rows(context: object, name: str) -> list[dict]:
    rows = context.store.query("SELECT * FROM relays WHERE name = ?", (name,))  # type: ignore[attr-defined]
    return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]


def test_the_box_is_an_active_live_relay_with_a_certificate_of_its_own(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            context = running.context
            box = box_relay.box_relay(context)
            assert box.name == "_127-0-0-1-" + str(running.server.port)
            assert box.address == f"127.0.0.1:{running.server.port}"
            listed = {r["name"]: r for r in relay_book(context).all_relays()}
            assert listed[box.name]["status"] == "active" and listed[box.name]["health"] == "live"
            assert stat.S_IMODE(box.key_path.stat().st_mode) == 0o600
            cert = x509.load_pem_x509_certificate(box.cert_path.read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
                relay_uri(context.settings.trust_domain, box.name)]
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
            # The listener's certificate, which gateways see, names no relay.
            listener = x509.load_der_x509_certificate(context.server_certificate_der)
            listener_sans = listener.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert not listener_sans.get_values_for_type(x509.UniformResourceIdentifier)

            # Not yet due: the same certificate; due: a new one for the same key, its serial in the row.
            refresh(context, box, False)
            assert box.cert_path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)
            monkeypatch.setattr(box_relay, "REISSUE_FRACTION", 0.0)
            refresh(context, box, True)
            renewed = x509.load_pem_x509_certificate(box.cert_path.read_bytes())
            assert renewed.serial_number != cert.serial_number
            assert _rows(context, box.name)[0]["serial"] == format(renewed.serial_number, "x")
            assert public_key_sha256(renewed.public_key()) == public_key_sha256(  # type: ignore[arg-type]
                cert.public_key()) == _rows(context, box.name)[0]["key_sha256"]

            # The box can be neither retired nor revoked: it is the relays' CA.
            for verb in ("retire", "revoke"):
                status, answer = await running.call("POST", f"/api/v1/relays/{box.name}/{verb}")
                assert status == 409 and "cannot be retired or revoked; stop that process" in answer["message"]
            assert _rows(context, box.name)[0]["status"] == "active"

    run(scenario())


def test_a_box_moved_to_another_address_leaves_no_stale_row_and_a_second_box_keeps_its_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            context = running.context
            box = box_relay.box_relay(context)
            key = _rows(context, box.name)[0]["key_sha256"]
            old = time.time() - 2 * RELAY_STALE_AFTER
            with context.store.transaction() as db:
                for name, beat in (("_earlier-8443", old), ("_beside-8444", time.time())):
                    db.execute("INSERT INTO relays (name, address, status, key_sha256, created_at, heartbeat_at) "
                               "VALUES (?, ?, 'active', ?, ?, ?)", (name, "127.0.0.1:1", key, old, beat))
                    db.execute("INSERT INTO relay_services (tenant, service, relay, gateway, updated_at) "
                               "VALUES ('default', 'plc', ?, 'default/gw', ?)", (name, old))
            refresh(context, BoxRelay(box.name, box.address, box.cert_path, box.key_path), False)
            assert not _rows(context, "_earlier-8443")
            assert not context.store.query("SELECT 1 FROM relay_services WHERE relay = '_earlier-8443'")
            assert _rows(context, "_beside-8444")  # beating: another box on this data directory

    run(scenario())


def test_the_box_is_named_by_its_advertised_address_https_port_when_it_names_none(tmp_path: Path) -> None:
    for advertised, name, address in (("https://Ops.Example.net", "_ops-example-net-443", "ops.example.net:443"),
                                      ("https://ops.example.net:8443/", "_ops-example-net-8443",
                                       "ops.example.net:8443"),
                                      ("https://[2001:db8::1]:8443", "_2001-db8-1-8443", "[2001:db8::1]:8443")):
        context = SimpleNamespace(settings=Settings(data_dir=tmp_path, advertise_url=advertised))
        box = box_relay.box_relay(context)  # type: ignore[arg-type]
        assert (box.name, box.address.lower()) == (name, address), advertised
        assert check_address(box.address)
        assert box.key_path == tmp_path / "tls" / "relay.key"
