"""When a link between relays stops taking dials and when it ends, by both relays' certificates; and when a relay
renews its own certificate."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.relay.link_trust import link_trust
from controller.relay_node import RENEW_FRACTION, renewal_due
from shared.cert_schedule import BACKDATE, LEAVE_BY, LEAVE_FROM

ISSUED = 1_800_000_000.0


def certificate(name: str, issued: float, life: float) -> x509.Certificate:
    """A relay-like certificate issued at ``issued`` for ``life`` seconds, backdated as the CA does."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(issued - BACKDATE, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(issued + life, dt.UTC))
            .sign(key, hashes.SHA256()))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def test_a_link_drains_by_the_certificate_that_ends_first_and_ends_with_it() -> None:
    theirs, ours = certificate("rb", ISSUED, 600), certificate("ra", ISSUED + 100, 600)
    for draw in (0.0, 0.5, 0.999):
        trust = link_trust("rb", der(theirs), pem(ours), ISSUED + 10, draw)
        assert ISSUED + LEAVE_FROM * 600 <= trust.drain_at <= ISSUED + LEAVE_BY * 600
        assert trust.ends_at == ISSUED + 600
        assert "relay rb" in trust.drain_reason and "relay rb" in trust.end_reason
    # This relay's own certificate ending first drains the link too, and says so.
    trust = link_trust("rb", der(certificate("rb", ISSUED, 6000)), pem(ours), ISSUED + 110, 0.5)
    assert ISSUED + 100 + LEAVE_FROM * 600 <= trust.drain_at <= ISSUED + 100 + LEAVE_BY * 600
    assert trust.ends_at == ISSUED + 700 and "this relay's certificate" in trust.end_reason


def test_links_opened_again_on_certificates_nobody_renewed_drain_later_never_in_a_loop() -> None:
    theirs, ours = certificate("rb", ISSUED, 600), certificate("ra", ISSUED, 6000)
    now = ISSUED + LEAVE_BY * 600 + 1  # past every drain point: the relay could not renew
    first = link_trust("rb", der(theirs), pem(ours), now, 0.0)
    assert first.drain_at == now and first.ends_at == ISSUED + 600
    assert link_trust("rb", der(theirs), pem(ours), now, 0.0, left_before=1).pair == first.pair
    assert link_trust("rb", der(theirs), pem(ours), now, 0.0, left_before=2).drain_at == ISSUED + 600
    renewed = certificate("rb", now, 600)
    assert link_trust("rb", der(renewed), pem(ours), now, 0.0).pair != first.pair


def test_a_relay_renews_at_two_thirds_of_the_life_counted_from_issuance() -> None:
    for life in (60.0, 300.0, 6 * 3600.0):
        cert = certificate("ra", ISSUED, life)
        assert abs(renewal_due(der(cert)) - (ISSUED + RENEW_FRACTION * life)) < 1.0
