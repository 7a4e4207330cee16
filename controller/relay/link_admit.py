"""The relay end of a link from another relay: who may open one, and what it may do on it.

Another relay (A) reaches a service bound here (B) over one tunnel of the
same protocol, authenticated by A's relay certificate: the same signed
challenge naming this relay's certificate. Admitted only when the
certificate is a relay's (``spiffe://DOMAIN/_relay/NAME``, issued by our CA,
in date), the ``relays`` table holds NAME as active with that key (a
re-enrollment replaced any other; a renewal keeps it), and the signature verifies. On the link, A may only open streams to
services bound here, naming the gateway (``TENANT/SERVICE[:PORT]@GATEWAY``)
and carrying the dialer's identity and the dial's correlation id
(``DIALER_URI#CORRELATION``): A decided the dial by policy and recorded it;
this relay records serving it under the same correlation id. A BIND is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.ca import public_key_sha256, relay_uri
from controller.relay.admit import MAX_CHAIN_LENGTH, AdmissionRefused, has_usage, signed_our_challenge, spiffe_uri
from controller.relays import ACTIVE, BOX_PREFIX
from shared.protocol import ErrorCode
from shared.trust import cert_not_after, cert_not_before, verify_leaf_issued_by

if TYPE_CHECKING:
    from controller.context import ControllerContext

#: The AUTH field by which a relay says it opens a link, not a gateway's tunnel.
LINK_FIELD = "link"
#: Separates the dialer's identity URI from the dial's correlation id in a link stream's peer field
#: (a SPIFFE ID has no fragment, so it never holds one).
CORRELATION_MARK = "#"


@dataclass(frozen=True)
class LinkPeer:
    """A relay admitted on a link: its name, and the certificate and key admission saw."""

    name: str
    serial: str
    key_sha256: str
    #: Unix time the admitted certificate ends: the link closes then (controller/relay/link_trust.py).
    not_after: float


def relay_name_of(context: ControllerContext, leaf: x509.Certificate) -> str | None:
    """NAME when the leaf names a relay of this trust domain (``_relay/NAME``), else None."""
    uri = spiffe_uri(leaf)
    prefix = relay_uri(context.settings.trust_domain, "")
    return uri[len(prefix):] if uri is not None and uri.startswith(prefix) and len(uri) > len(prefix) else None


def leaf_of(chain_pem: tuple[str, ...] | list[str]) -> x509.Certificate | None:
    if not chain_pem or len(chain_pem) > MAX_CHAIN_LENGTH:
        return None
    try:
        return x509.load_pem_x509_certificate(chain_pem[0].encode())
    except (ValueError, TypeError):
        return None


def admit_link(context: ControllerContext, chain_pem: tuple[str, ...] | list[str], signature: bytes, nonce: bytes,
               now: dt.datetime) -> LinkPeer:
    """The relay a valid link AUTH proves to be, or AdmissionRefused saying why not (a worker thread)."""
    leaf = leaf_of(chain_pem)
    if leaf is None:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "a relay link's AUTH must carry the relay's certificate")
    if not verify_leaf_issued_by(leaf, context.ca.certificate):
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate was not issued by this controller's CA")
    name = relay_name_of(context, leaf)
    if name is None:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "a gateway's certificate cannot open a relay link; only a "
                               "relay's certificate (outpostctl relay add) can")
    if not cert_not_before(leaf) <= now <= cert_not_after(leaf):
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, f"the certificate of relay {name} is not valid now; the relay "
                               "must renew it")
    if not has_usage(leaf, ExtendedKeyUsageOID.SERVER_AUTH):
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the certificate is not a relay's certificate")
    row = context.store.query_one("SELECT status, key_sha256 FROM relays WHERE name = ?", (name,))
    if row is None or row["status"] != ACTIVE:
        status = "unknown" if row is None else str(row["status"])
        raise AdmissionRefused(ErrorCode.REVOKED, f"relay {name} is {status}; it may open no relay link")
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key_sha256(public_key) != row["key_sha256"]:
        raise AdmissionRefused(ErrorCode.REVOKED, f"this certificate's key is not the key of relay {name}")
    serial = format(leaf.serial_number, "x")
    if not signed_our_challenge(context, public_key, signature, nonce):
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "the challenge signature does not verify with the certificate's key")
    return LinkPeer(name, serial, str(row["key_sha256"]), cert_not_after(leaf).timestamp())


def linked_relay(context: ControllerContext, relay: str, peer_der: bytes) -> LinkPeer:
    """Relay A's check of the relay ``relay`` it opened a link to, by the certificate its handshake presented
    (issued by our CA and in date, as TLS checked): relay ``relay``'s own, active, with the key the store lists
    for it; AdmissionRefused saying why not (a worker thread).

    TLS alone would take any relay certificate of the CA for the address, and a key the relay no longer has
    (it was enrolled again: a re-key) until that certificate ends; no dial goes to either.
    """
    try:
        leaf = x509.load_der_x509_certificate(peer_der)
    except ValueError:
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, "it presented no readable certificate") from None
    name = relay_name_of(context, leaf)
    # A box (role all) serves its listener's certificate, the controller's own, free of the relay URI
    # (controller/box_relay.py): it holds the CA key, so there is no key of its to be replaced; its row must be active.
    box = relay.startswith(BOX_PREFIX) and name is None
    if name != relay and not box:
        said = "a gateway's" if name is None else f"relay {name}'s"
        raise AdmissionRefused(ErrorCode.AUTH_FAILED, f"it presented {said} certificate, not relay {relay}'s")
    row = context.store.query_one("SELECT status, key_sha256 FROM relays WHERE name = ?", (relay,))
    if row is None or row["status"] != ACTIVE:
        status = "unknown" if row is None else str(row["status"])
        raise AdmissionRefused(ErrorCode.REVOKED, f"relay {relay} is {status}; no dial goes to it")
    public_key = leaf.public_key()
    if not box and (not isinstance(public_key, ec.EllipticCurvePublicKey)
                    or public_key_sha256(public_key) != row["key_sha256"]):
        raise AdmissionRefused(ErrorCode.REVOKED, f"its certificate's key is not the key of relay {relay} (it was "
                               "enrolled again with another key); no dial goes over it")
    return LinkPeer(relay, format(leaf.serial_number, "x"), str(row["key_sha256"]), cert_not_after(leaf).timestamp())


def still_admitted(context: ControllerContext, peer: LinkPeer) -> str | None:
    """None while ``peer`` is the active relay with the key it was admitted with, else why not (a worker thread)."""
    return why_not_admitted(context, [peer])[0]


def why_not_admitted(context: ControllerContext, peers: Sequence[LinkPeer]) -> list[str | None]:
    """``still_admitted`` for each of ``peers``, from one read of the store (a worker thread).

    One read for all: every link is checked every ``LINK_RECHECK_INTERVAL``, and the relays
    table holds one row per relay, a few dozen at most, so reading it whole costs less than a
    query per link. By key, not by the certificate's serial: a renewal (every two thirds of a
    certificate's life) keeps the key and must not cut the dials on its links.
    """
    if not peers:
        return []
    rows = {row["name"]: row for row in context.store.query("SELECT name, status, key_sha256 FROM relays")}
    reasons: list[str | None] = []
    for peer in peers:
        row = rows.get(peer.name)
        if row is None or row["status"] != ACTIVE:
            reasons.append(f"relay {peer.name} is {'removed' if row is None else row['status']}")
        elif row["key_sha256"] != peer.key_sha256:
            reasons.append(f"relay {peer.name} was enrolled again with another key")
        else:
            reasons.append(None)
    return reasons


def split_peer(peer: str | None) -> tuple[str, str] | None:
    """(dialer URI, correlation id) of a link stream's peer field, or None when it is not one."""
    uri, mark, correlation = (peer or "").partition(CORRELATION_MARK)
    if not mark or not uri.startswith("spiffe://") or not correlation:
        return None
    return uri, correlation
