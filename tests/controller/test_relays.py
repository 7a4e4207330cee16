"""Relays as processes of their own: the token, the relay's certificate, who may present which certificate."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca import not_after_of, not_before_of, public_key_sha256, relay_uri
from controller.errors import StartupError
from controller.relay.admit import AdmissionRefused, admit
from controller.relay.link_admit import linked_relay, still_admitted
from controller.relays import REPLACED, SPREAD_BAND, read_token, relay_loads, spread
from controller.relays_api import relay_book
from controller.settings import DEFAULT_RELAY_CERT_LIFETIME
from shared.tunnel.auth import sign_challenge
from tests.controller.harness import make_csr, make_key, run, running_controller


def test_every_agent_gets_the_least_loaded_relays_first_in_an_order_of_its_own() -> None:
    loads = [("wss://a/v1/tunnel", 10), ("wss://b/v1/tunnel", 12), ("wss://c/v1/tunnel", 10 + SPREAD_BAND + 1)]
    firsts = {spread(loads, f"spiffe://d/default/gw-{n}")[0] for n in range(50)}
    assert firsts == {"wss://a/v1/tunnel", "wss://b/v1/tunnel"}  # a burst spreads over the equally loaded
    for n in range(20):
        order = spread(loads, f"spiffe://d/default/gw-{n}")
        assert sorted(order) == sorted(url for url, _ in loads) and order[-1] == "wss://c/v1/tunnel"
        assert order == spread(loads, f"spiffe://d/default/gw-{n}")  # the same agent, the same order
    assert spread([], "x") == []
    assert relay_loads([("wss://r/v1/tunnel", 5)], ("wss://self/v1/tunnel", 2)) == [
        ("wss://self/v1/tunnel", 2), ("wss://r/v1/tunnel", 5)]


def _signature(key: ec.EllipticCurvePrivateKey, nonce: bytes, server_der: bytes) -> bytes:
    return sign_challenge(lambda message: key.sign(message, ec.ECDSA(hashes.SHA256())), nonce,
                          hashlib.sha256(server_der).digest())


def test_a_relay_enrolls_once_and_its_certificate_never_acts_as_a_gateway(tmp_path: Path) -> None:
    async def scenario() -> None:
        # role controller: no relay of its own (a box is one, tests/controller/test_box_relay.py)
        async with running_controller(tmp_path / "c", role="controller") as running:
            status, added = await running.call("POST", "/api/v1/relays", {"name": "r1", "address": "127.0.0.1:9443"})
            assert status == 201, added
            token = read_token(added["token"])
            assert token["relay"] == "r1" and token["ca_sha256"] == running.context.ca.fingerprint
            key = make_key()
            body = {"relay": "r1", "secret": token["secret"], "csr": make_csr(key, "r1")}
            status, enrolled = await running.call("POST", "/v1/relays/enroll", body, admin=False)
            assert status == 200, enrolled
            assert len(enrolled["audit_key"]) > 40
            cert = x509.load_pem_x509_certificate(enrolled["certificate"].encode())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
                relay_uri(running.context.settings.trust_domain, "r1")]
            assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
            # Short-lived: a revoked relay is trusted by gateways (which pin the CA) until this ends.
            life = not_after_of(cert) - not_before_of(cert)
            assert life.total_seconds() == pytest.approx(DEFAULT_RELAY_CERT_LIFETIME, abs=600)
            assert DEFAULT_RELAY_CERT_LIFETIME < running.context.settings.cert_lifetime
            # The token works once: a replay with another key is refused and changes nothing.
            again = {**body, "csr": make_csr(make_key(), "r1")}
            status, refused = await running.call("POST", "/v1/relays/enroll", again, admin=False)
            assert status == 403 and refused["error"] == "relay_token_invalid"
            # A relay's certificate presented on a tunnel, as a gateway would: refused like a stranger's.
            nonce = b"n" * 32
            server_der = running.context.server_certificate_der
            with pytest.raises(AdmissionRefused, match="not a client certificate"):
                admit(running.context, [enrolled["certificate"]], _signature(key, nonce, server_der), nonce,
                      dt.datetime.now(dt.UTC))
            # The relay renews by its key; a gateway's key is not a relay's.
            status, renewed = await running.call("POST", "/v1/relays/renew", {"csr": make_csr(key, "r1")}, admin=False)
            assert status == 200 and "audit_key" not in renewed
            created = await running.create_identity("gw")
            gateway_key = make_key()
            status, _ = await running.enroll(created["token"], gateway_key, "gw")
            assert status == 200
            status, refused = await running.call("POST", "/v1/relays/renew", {"csr": make_csr(gateway_key, "gw")},
                                                 admin=False)
            assert status == 403 and refused["error"] == "relay_refused"
            # Enrolled, not started yet: named anyway while no relay is live (an empty list strands agents).
            url = "wss://127.0.0.1:9443/v1/tunnel"
            assert relay_book(running.context).live() == [(url, 0)]
            relay_book(running.context).heartbeat("r1", 3, 0.0)
            assert relay_book(running.context).live() == [(url, 3)]
            status, listed = await running.call("GET", "/api/v1/relays")
            assert [(r["name"], r["status"], r["health"], r["tunnels"]) for r in listed["relays"]] == [
                ("r1", "active", "live", 3)]
            # Retired: renewal refused from now on.
            status, _ = await running.call("POST", "/api/v1/relays/r1/retire")
            assert status == 200
            status, refused = await running.call("POST", "/v1/relays/renew", {"csr": make_csr(key, "r1")}, admin=False)
            assert status == 403 and refused["error"] == "relay_refused"
            events = [e["event"] for e in running.context.audit.recent()]
            for event in ("relay_added", "relay_enrolled", "relay_renewed", "relay_refused", "relay_retired"):
                assert event in events

    run(scenario())


def test_bad_relay_input_is_refused_in_one_sentence(tmp_path: Path) -> None:
    async def scenario() -> None:
        # role controller: no relay of its own (a box is one, tests/controller/test_box_relay.py)
        async with running_controller(tmp_path / "c", role="controller") as running:
            for body, code in [({"name": "R 1", "address": "h:1"}, "invalid_name"),
                               ({"name": "r1", "address": "no-port"}, "invalid_address"),
                               ({"name": "r1", "address": "h:99999"}, "invalid_address")]:
                status, refused = await running.call("POST", "/api/v1/relays", body)
                assert status == 400 and refused["error"] == code, refused
            status, refused = await running.call("POST", "/v1/relays/enroll", {"relay": "nobody", "secret": "x",
                                                                               "csr": make_csr(make_key())}, admin=False)
            assert status == 403 and "outpostctl relay add" in refused["message"]
            status, _ = await running.call("POST", "/api/v1/relays/nobody/retire")
            assert status == 404
            assert running.context.store.query("SELECT * FROM relays") == []

    run(scenario())


def test_a_relay_token_file_that_is_not_one_is_named_so() -> None:
    with pytest.raises(ValueError, match="not a relay enrollment token"):
        read_token("eyJhbGciOiJFUzI1NiJ9.e30.sig")  # a gateway's token


def test_the_ca_of_a_relay_process_signs_nothing(tmp_path: Path) -> None:
    from controller.ca import CertificateAuthority

    ca = CertificateAuthority.create()
    ca.save(tmp_path / "ca.pem", tmp_path / "ca.key")
    public = CertificateAuthority.public_only(tmp_path / "ca.pem")
    assert public.fingerprint == ca.fingerprint
    key = make_key().public_key()
    with pytest.raises(ValueError, match="holds no CA key"):
        public.issue(key, "gw", "default", 60)


def test_a_relay_renews_its_certificate_by_its_key_and_a_retired_one_stops(tmp_path: Path) -> None:
    import asyncio

    from controller import relay_node
    from controller.relays import make_token
    from controller.settings import Settings

    async def scenario() -> None:
        # role controller: no relay of its own (a box is one, tests/controller/test_box_relay.py)
        async with running_controller(tmp_path / "c", role="controller") as running:
            status, added = await running.call("POST", "/api/v1/relays", {"name": "r1", "address": "127.0.0.1:9443"})
            assert status == 201
            token_file = tmp_path / "r1.token"
            token_file.write_text(added["token"])
            settings = Settings(data_dir=tmp_path / "relay", store_file=running.context.settings.store_path,
                                role="relay", enroll_token=token_file)
            identity = await asyncio.to_thread(relay_node.enroll, settings, token_file)
            assert identity.controllers == (running.url,)
            first = settings.server_cert_path.read_bytes()
            renewed = await asyncio.to_thread(relay_node.renew, settings, identity)
            assert settings.server_cert_path.read_bytes() != first
            # The same key (compared by its digest: cryptography 38's keys have no ==).
            assert public_key_sha256(renewed.public_key()) == public_key_sha256(  # type: ignore[arg-type]
                x509.load_pem_x509_certificate(first).public_key())
            # A token naming another CA is refused before anything is written.
            other = tmp_path / "other.token"
            body = read_token(added["token"])
            other.write_text(make_token(running.url, "sha256:" + "0" * 64, "r2", body["secret"]))
            with pytest.raises(StartupError, match="not the one the token names"):
                await asyncio.to_thread(relay_node.enroll, Settings(data_dir=tmp_path / "r2"), other)
            assert not (tmp_path / "r2").exists()
            # Running: the heartbeat sees the retirement and says so; the loop ends.
            context, _ = relay_node.open_relay(settings)
            try:
                told: list[str] = []
                task = asyncio.ensure_future(relay_node.run_relay_node(context, identity, lambda: 0, lambda c: None,
                                                                       told.append))
                await asyncio.sleep(0.3)
                assert relay_book(running.context).all_relays()[0]["health"] == "live"
                status, _ = await running.call("POST", "/api/v1/relays/r1/retire")
                await asyncio.wait_for(task, 15)
                assert told == ["relay r1 is retired"]
            finally:
                context.close()
            with pytest.raises(StartupError, match="Relay r1 was retired"):
                relay_node.open_relay(settings)

    run(scenario())


@pytest.mark.parametrize(("argv", "says"), [
    (["--role", "relay"], "--role relay needs the controller's store"),
    (["--role", "relay", "--store", "/nonexistent/store.sqlite3"], "is not a URL, nor an existing SQLite store file"),
    (["--role", "relay", "--api-listen", "127.0.0.1:0", "--store", "postgresql://x@localhost/x"],
     "--role relay serves no management API"),
    (["--role", "controller", "--enroll-token", "t"], "--enroll-token is for --role relay"),
    (["--role", "router"], "invalid choice"),
])
def test_a_role_given_what_it_cannot_use_is_refused_in_one_line_and_nothing_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    from controller.cli import main
    from shared.errors import EXIT_USAGE

    code = main(["serve", "--data", str(tmp_path / "relay"), "--listen", "127.0.0.1:0", *argv])
    error = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and says in error and "\n" not in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_relay_without_a_token_or_an_enrolled_data_directory_says_how_to_enroll(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli import main

    store = tmp_path / "store.sqlite3"
    store.write_bytes(b"")
    code = main(["serve", "--role", "relay", "--data", str(tmp_path / "relay"), "--listen", "127.0.0.1:0",
                 "--store", str(store)])
    error = capsys.readouterr().err.strip()
    assert code != 0 and "holds no enrolled relay; start it once with --enroll-token FILE" in error, error
    assert not (tmp_path / "relay").exists()


def test_a_dialing_relay_links_only_to_the_relay_it_named_on_the_key_the_store_lists_for_it(tmp_path: Path) -> None:
    """TLS takes any in-date relay certificate of the CA; a re-keyed relay's old one, or another relay's, is
    refused before any dial goes over the link (controller/relay/link_admit.py ``linked_relay``)."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "c", role="controller") as running:
            context = running.context

            async def enroll(name: str) -> bytes:
                status, added = await running.call("POST", "/api/v1/relays", {"name": name,
                                                                              "address": "127.0.0.1:9443"})
                assert status == 201, added
                body = {"relay": name, "secret": read_token(added["token"])["secret"],
                        "csr": make_csr(make_key(), name)}
                status, enrolled = await running.call("POST", "/v1/relays/enroll", body, admin=False)
                assert status == 200, enrolled
                cert = x509.load_pem_x509_certificate(enrolled["certificate"].encode())
                return cert.public_bytes(serialization.Encoding.DER)

            old, other = await enroll("r1"), await enroll("r2")
            peer = linked_relay(context, "r1", old)
            assert peer.name == "r1" and still_admitted(context, peer) is None
            with pytest.raises(AdmissionRefused, match="presented relay r2's certificate, not relay r1's"):
                linked_relay(context, "r1", other)
            # Re-keyed: retired, added and enrolled again with another key.
            status, _ = await running.call("POST", "/api/v1/relays/r1/retire")
            assert status == 200
            with pytest.raises(AdmissionRefused, match="relay r1 is retired; no dial goes to it"):
                linked_relay(context, "r1", old)
            new = await enroll("r1")
            assert linked_relay(context, "r1", new).key_sha256 != peer.key_sha256
            with pytest.raises(AdmissionRefused, match="its certificate's key is not the key of relay r1"):
                linked_relay(context, "r1", old)
            # A link opened before the re-key is closed by the dialing end's recheck.
            assert still_admitted(context, peer) == "relay r1 was enrolled again with another key"
            # A process still running on the old key hears it at its next heartbeat, which is not written.
            book = relay_book(context)
            assert book.heartbeat("r1", 7, 0.0, peer.key_sha256) == REPLACED
            assert [r["tunnels"] for r in book.all_relays() if r["name"] == "r1"] != [7]
            assert book.heartbeat("r1", 1, 0.0, linked_relay(context, "r1", new).key_sha256) == "active"
            assert [r["tunnels"] for r in book.all_relays() if r["name"] == "r1"] == [1]

    run(scenario())
