"""What admission may remember between tunnels: parsed certificates and identity rows.

A gateway that reconnects presents the same certificate and names the same
identity; parsing the chain, checking our CA's signature on it and reading
the store again buys nothing. Two bounded caches spare that work:

* certificates, by the digest of the leaf's PEM text: what parsing and our
  CA's signature established (never the challenge signature, which covers a
  fresh nonce each time), and the purpose the store recorded when it issued
  the certificate (it never changes);
* identity rows of enrolled gateways, all read in one query as the relay
  starts (``preload``) and one at a time after that, kept valid by the announcements the
  relay already receives (``Registry.announce_blocked``/``announce_rekeyed``,
  from this process at once and from other processes through the store
  watcher): ``forget`` drops the row before the relay closes the identity's
  tunnels, so no admission can find a revoked or re-keyed identity here
  once its tunnels are told to close. A row read from the store is kept only
  when no announcement arrived while it was read (``generation``).

Only a gateway's identity (a device key, no session certificate) is kept:
people's identities change roles at sign-in without an announcement.

A third table makes a gateway's first admission after a start a lookup: the
store records the SHA-256 of every certificate's DER as it is issued
(``certificates.der_sha256``), and ``preload`` reads those of the certificates
still valid. A leaf whose exact bytes are recorded was signed by our CA (it is
the very certificate the CA issued), so admission skips that ECDSA verification,
and the store read of its purpose. Anything else (a row from before the column,
a certificate issued after the start, a forged one carrying a recorded serial
with other bytes) is verified as before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controller.enrollment import SESSION_PURPOSE
from controller.registry import BLOCKED_STATUSES, Identity, Registry
from controller.store import Store

log = logging.getLogger(__name__)

#: Certificates remembered: twice the 10,000 tunnels one relay process is built to hold, so a
#: whole fleet reconnecting plus the renewed certificates of a day fit; about 1 KiB each (dates,
#: names and the parsed key), 20 MiB at most. The least recently used goes first.
MAX_CERTIFICATES = 20_000
#: Identity rows remembered: the same reasoning (one per gateway of a full relay, twice over), a
#: few hundred bytes each.
MAX_IDENTITIES = 20_000
#: Issued certificates recognised by their DER digest, read once as the relay starts: the same
#: reasoning again (a fleet of a full relay twice over, each with a renewed certificate beside
#: its current one); about 200 bytes each. The latest to expire are kept when there are more.
MAX_RECORDED = 20_000


@dataclass(frozen=True)
class RecordedCertificate:
    """What the store recorded when our CA issued a certificate (``certificates``)."""

    #: A session certificate (``outpostctl connect``): dial only, never bind.
    session: bool


@dataclass(frozen=True)
class CertificateFacts:
    """What a leaf certificate says once our CA's signature on it verified."""

    #: Our CA certificate that verified it (a different CA object means checking again).
    ca: x509.Certificate
    not_before: dt.datetime
    not_after: dt.datetime
    client_auth: bool
    uri: str | None
    public_key: ec.EllipticCurvePublicKey | None
    key_sha256: str
    serial: str
    #: The store's purpose record: True for a session certificate, None until read.
    session_certificate: bool | None = None


def certificate_key(pem: str) -> bytes:
    return hashlib.sha256(pem.encode()).digest()


class AdmissionCache:
    """Bounded caches for admission (controller/relay/admit.py); safe from any thread."""

    def __init__(self, max_certificates: int = MAX_CERTIFICATES, max_identities: int = MAX_IDENTITIES) -> None:
        self._lock = threading.Lock()
        self._certificates: OrderedDict[bytes, CertificateFacts] = OrderedDict()
        self._identities: OrderedDict[str, Identity] = OrderedDict()
        self.max_certificates = max_certificates
        self.max_identities = max_identities
        #: Grows with every announcement; a row read before one is not kept.
        self.generation = 0
        #: DER digest -> what the store recorded, for ``_recorded_ca`` only (never changes once read).
        self._recorded: dict[bytes, RecordedCertificate] = {}
        self._recorded_ca: x509.Certificate | None = None

    def certificate(self, key: bytes, ca: x509.Certificate) -> CertificateFacts | None:
        with self._lock:
            facts = self._certificates.get(key)
            if facts is None or facts.ca is not ca:
                return None
            self._certificates.move_to_end(key)
            return facts

    def remember_certificate(self, key: bytes, facts: CertificateFacts) -> None:
        with self._lock:
            self._certificates[key] = facts
            self._certificates.move_to_end(key)
            while len(self._certificates) > self.max_certificates:
                self._certificates.popitem(last=False)

    def identity(self, uri: str) -> Identity | None:
        with self._lock:
            identity = self._identities.get(uri)
            if identity is not None:
                self._identities.move_to_end(uri)
            return identity

    def remember_identity(self, identity: Identity, generation: int) -> bool:
        """Keep ``identity`` as read when ``generation`` was current; False when an announcement came since."""
        if identity.status in BLOCKED_STATUSES or identity.key_sha256 is None:
            return False
        with self._lock:
            if generation != self.generation:
                return False
            self._identities[identity.uri] = identity
            self._identities.move_to_end(identity.uri)
            while len(self._identities) > self.max_identities:
                self._identities.popitem(last=False)
            return True

    def recorded(self, der: bytes, ca: x509.Certificate) -> RecordedCertificate | None:
        """The store's record of the certificate whose DER is exactly ``der``, when ``ca`` issued it."""
        if ca is not self._recorded_ca:
            return None
        return self._recorded.get(hashlib.sha256(der).digest())

    def preload(self, registry: Registry, store: Store | None = None, ca: x509.Certificate | None = None) -> int:
        """Keep every enrolled gateway from one read of the store (a worker thread, as the relay starts).

        The first admission of each gateway after a start (a whole fleet coming
        back) then reads no identity row of its own; with ``store`` and ``ca``,
        it recognises the certificates still valid by their bytes. A store that
        cannot be read leaves the cache to fill one admission at a time. How
        many identities were kept.
        """
        generation = self.generation
        try:
            identities = registry.list_identities()
            rows = [] if store is None else store.query(
                "SELECT purpose, der_sha256 FROM certificates "
                "WHERE der_sha256 IS NOT NULL AND not_after > ? ORDER BY not_after DESC LIMIT ?",
                (time.time(), MAX_RECORDED))
        except Exception as error:  # the store is down: admissions read it themselves, as before
            log.warning("the admission cache starts empty: %s", error)
            return 0
        recorded = {bytes.fromhex(row["der_sha256"]): RecordedCertificate(
            row["purpose"] == SESSION_PURPOSE) for row in rows}
        if ca is not None:
            with self._lock:
                self._recorded, self._recorded_ca = recorded, ca
        return sum(self.remember_identity(identity, generation) for identity in identities[:self.max_identities])

    def forget(self, uri: str) -> None:
        """An announcement for ``uri`` (revoked, disabled, re-keyed): read it from the store next time."""
        with self._lock:
            self.generation += 1
            self._identities.pop(uri, None)

    @property
    def sizes(self) -> tuple[int, int]:
        """(certificates, identities) held now (recognised certificates: ``recorded_count``)."""
        with self._lock:
            return len(self._certificates), len(self._identities)

    @property
    def recorded_count(self) -> int:
        """Issued certificates recognised by their bytes."""
        return len(self._recorded)
