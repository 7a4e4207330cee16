"""The one box (``serve --role all``) as a relay among relays: its own relay certificate, its row, its heartbeat.

A box that later gets relays of its own (``--role relay``) must stay one
fleet with them: a dial at a relay for a gateway on the box, and the
reverse, goes over a link as between two relays (controller/relay/peering.py).
So the box is a relay like the others in the store: a row in ``relays``
(active, its public address, its relay key's digest, its heartbeat), its
binds in ``relay_services``, and a relay certificate for the links it opens.
It holds the CA key, so it issues that certificate itself, for a key of its
own (``tls/relay.key``, 0600) kept apart from the listener's: the listener's
certificate is what gateways and operators see, and stays free of the relay
URI. Its name is ``_`` and its address (``_ops-example-net-8443``): no
``outpostctl relay add`` can make such a name, so it never collides with a
relay of the operator's, and two boxes on one store differ by their address.
Retiring or revoking the box is refused (it is the controller: stop it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.blocking import RELAY_POOL
from controller.ca import not_after_of, not_before_of, public_key_sha256
from controller.context import ControllerContext
from controller.errors import ControllerError
from controller.relays import ACTIVE, BOX_PREFIX, RELAY_HEARTBEAT_INTERVAL, RELAY_STALE_AFTER, RelayBook, check_address
from shared.fsutil import atomic_write

log = logging.getLogger(__name__)

#: The box's relay key, beside the listener's in ``tls/``, and its certificate, one per name (address): boxes
#: sharing a data directory share the key, each presents a certificate naming itself.
RELAY_KEY_FILE = "relay.key"
RELAY_CERT_FILE = "relay-{name}.pem"
#: The box issues its relay certificate again once this fraction of its life has passed, as relays renew:
#: a link opened later presents a certificate with a third of its life left at least.
REISSUE_FRACTION = 2 / 3
#: The port of an advertised URL that names none.
DEFAULT_HTTPS_PORT = 443
#: Longest relay name: a DNS label, as every name (controller/names.py).
MAX_NAME_LENGTH = 63


@dataclass(frozen=True)
class BoxRelay:
    """Who the box is among the relays: its name, its public address, its relay certificate and key files."""

    name: str
    address: str
    cert_path: Path
    key_path: Path


def box_relay(context: ControllerContext) -> BoxRelay:
    """The box's relay identity, from the URL it advertises (the one its gateways' relay lists name)."""
    settings = context.settings
    address = settings.base_url[len("https://"):].split("/", 1)[0]
    if not re.search(r":[0-9]+$", address):  # --advertise https://HOST means HTTPS's port
        address += f":{DEFAULT_HTTPS_PORT}"
    slug = re.sub(r"[^a-z0-9]+", "-", address.lower()).strip("-")
    tls = settings.server_cert_path.parent
    name = (BOX_PREFIX + slug)[:MAX_NAME_LENGTH]
    return BoxRelay(name, address, tls / RELAY_CERT_FILE.format(name=slug), tls / RELAY_KEY_FILE)


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    except FileNotFoundError:
        pass
    except ValueError:
        log.warning("%s is not a private key; making a new one (the box's links use it from now on)", path)
    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    return key


def _current(path: Path, key: ec.EllipticCurvePrivateKey, context: ControllerContext) -> x509.Certificate | None:
    """The certificate in ``path`` when the CA issued it for ``key`` and it is not yet due again."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    own = cert.public_key()
    if (cert.issuer != context.ca.certificate.subject or not isinstance(own, ec.EllipticCurvePublicKey)
            or public_key_sha256(own) != public_key_sha256(key.public_key())):
        return None
    start, end = not_before_of(cert).timestamp(), not_after_of(cert).timestamp()
    return cert if time.time() < start + (end - start) * REISSUE_FRACTION else None


def ensure_certificate(context: ControllerContext, box: BoxRelay) -> x509.Certificate:
    """The box's relay certificate, issued by its own CA when missing or due, and written (a worker thread)."""
    key = _key(box.key_path)
    cert = _current(box.cert_path, key, context)
    if cert is None:
        host, _ = check_address(box.address)
        cert = context.ca.issue_relay(key.public_key(), box.name, host, context.settings.relay_cert_lifetime)
        atomic_write(box.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert


def register(context: ControllerContext, box: BoxRelay, cert: x509.Certificate) -> None:
    """The box's row: active, its address and relay key; rows of this key under an earlier address,
    no longer beating, go (a box moved to another port). A worker thread.

    No audit row: the key is trusted by the CA that issued it, which is this process; a relay's
    enrollment is recorded because an operator's token let a new machine in.
    """
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    key = public_key_sha256(public_key)
    serial, not_after, now = format(cert.serial_number, "x"), not_after_of(cert).timestamp(), time.time()
    with context.store.transaction() as db:
        row = db.query_one("SELECT status, key_sha256 FROM relays WHERE name = ?", (box.name,))
        if row is None:
            db.execute("INSERT INTO relays (name, address, status, key_sha256, serial, not_after, created_at, "
                       "enrolled_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (box.name, box.address, ACTIVE, key, serial, not_after, now, now, now))
        else:  # beating from now on: the relays find the box's binds at once, not a heartbeat later
            db.execute("UPDATE relays SET address = ?, status = ?, token_sha256 = NULL, key_sha256 = ?, serial = ?, "
                       "not_after = ?, heartbeat_at = ? WHERE name = ?",
                       (box.address, ACTIVE, key, serial, not_after, now, box.name))
        stale = [r["name"] for r in db.query(
            "SELECT name FROM relays WHERE key_sha256 = ? AND name <> ? AND substr(name, 1, 1) = ? "
            "AND (heartbeat_at IS NULL OR heartbeat_at < ?)", (key, box.name, BOX_PREFIX, now - RELAY_STALE_AFTER))]
        for name in stale:
            db.execute("DELETE FROM relay_services WHERE relay = ?", (name,))
            db.execute("DELETE FROM relays WHERE name = ?", (name,))


def refresh(context: ControllerContext, box: BoxRelay, registered: bool) -> None:
    """Certificate and row when not yet registered or the certificate is due (a worker thread)."""
    if not registered or _current(box.cert_path, _key(box.key_path), context) is None:
        register(context, box, ensure_certificate(context, box))


async def run_box_relay(context: ControllerContext, box: BoxRelay, tunnels: Callable[[], int],
                        registered: bool) -> None:
    """Heartbeat with the box's tunnel count, and its relay certificate issued again when due."""
    book = RelayBook(context.store, context.ca, context.audit, context.settings.relay_cert_lifetime)
    started = time.time()
    while True:
        try:
            await RELAY_POOL.run(refresh, context, box, registered)
            registered = True
            status = await RELAY_POOL.run(book.heartbeat, box.name, tunnels(), started)
            # Only a hand-edited store gets here (the box refuses to be retired): it is made active again.
            registered = status == ACTIVE
        except (ControllerError, OSError) as error:  # the store away: tunnels and links carry on
            log.warning("the box's relay heartbeat not written (%s); trying again", error)
        await asyncio.sleep(RELAY_HEARTBEAT_INTERVAL)
