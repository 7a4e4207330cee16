"""A relay process (``serve --role relay``): enrolled by token, no CA key, alive by heartbeat, renewed by its key.

The first start redeems the ``--enroll-token`` (controller/relays.py): it
fetches the CA over TLS without trust, keeps it only if its fingerprint is the
token's, makes its own key and asks the controller for a certificate over TLS
pinned to that CA. The data directory then holds ``ca/ca.pem`` (no key),
``tls/server.pem`` and ``tls/server.key`` (the relay's certificate is its
listener's), ``audit.key`` (the relay appends its tunnels' events to the one
chain) and, written last, ``relay.json``: the relay is enrolled when it exists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.audit import AuditLog
from controller.audit_chain import KEY_FILE, load_or_create_key
from controller.blocking import RELAY_POOL
from controller.ca import (
    CertificateAuthority,
    certificate_fingerprint,
    not_after_of,
    not_before_of,
    public_key_sha256,
)
from controller.context import ControllerContext
from controller.enrollment import Enrollment
from controller.errors import ControllerError, StartupError
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.relays import ACTIVE, RELAY_HEARTBEAT_INTERVAL, RELAY_LIST_REFRESH, RelayBook, read_token, relay_url
from controller.renewal import Renewal
from controller.settings import Settings
from controller.store import Store
from controller.tokens import TokenAuthority
from shared.cert_schedule import issued_at
from shared.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

RELAY_FILE = "relay.json"
#: The relay renews once this fraction of its certificate's life has passed,
#: as agents do: a third of the life left to retry a controller that is down.
RENEW_FRACTION = 2 / 3
#: A failed renewal is tried again this often (a controller restarting, a
#: network blip), and no renewal follows another sooner: one relay, one request a minute.
RENEW_RETRY_SECONDS = 60.0
#: Seconds for one HTTP exchange with the controller; a slower one is down.
CONTROLLER_TIMEOUT = 15.0
#: The controller's answers are a certificate and a CA: a few KiB.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class RelayIdentity:
    """What ``relay.json`` says: this relay's name, its public address, the controllers it renews at."""

    name: str
    address: str
    controllers: tuple[str, ...]


def _http(url: str, tls: ssl.SSLContext, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=CONTROLLER_TIMEOUT, context=tls) as answer:
            return bytes(answer.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read(MAX_ANSWER_BYTES)).get("message", "")
        except ValueError:
            message = ""
        raise StartupError(f"The controller at {url} refused: {message or error.reason}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as error:
        reason = getattr(error, "reason", error)
        raise StartupError(f"Cannot reach the controller at {url} ({reason}); check the address and the "
                           "network, then start the relay again.") from None


def pinned(ca_pem: str) -> ssl.SSLContext:
    tls = ssl.create_default_context(cadata=ca_pem)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    return tls


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def enroll(settings: Settings, token_path: Path) -> RelayIdentity:
    """Redeem a relay token into ``settings.data_dir``; one sentence for each way it can fail."""
    try:
        token = read_token(token_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise StartupError(f"--enroll-token {token_path}: {error.strerror}; give the file outpostctl relay add "
                           "wrote.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise StartupError(f"--enroll-token {token_path} {error}.") from None
    controller = token["controller"].rstrip("/")
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE  # only to fetch the CA, which the token's fingerprint then judges
    ca_pem = _http(controller + "/v1/ca", unverified).decode("ascii", "replace")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem.encode())
    except ValueError:
        raise StartupError(f"The controller at {controller} sent no CA certificate; check the token's URL.") from None
    if certificate_fingerprint(ca_cert) != token["ca_sha256"]:
        raise StartupError(f"The CA at {controller} is not the one the token names; this is not your controller "
                           "(or the token is from another one). Nothing was written.")
    key = ec.generate_private_key(ec.SECP256R1())
    answer = json.loads(_http(controller + "/v1/relays/enroll", pinned(ca_pem),
                              {"relay": token["relay"], "secret": token["secret"], "csr": _csr(key, token["relay"])}))
    certificate = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
    data = settings.data_dir
    ensure_private_dir(data)
    ensure_private_dir(settings.ca_cert_path.parent)
    ensure_private_dir(settings.server_cert_path.parent)
    atomic_write(settings.ca_cert_path, ca_pem.encode(), mode=0o644)
    atomic_write(settings.server_key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    atomic_write(settings.server_cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(data / KEY_FILE, base64.b64decode(answer["audit_key"]), mode=0o600)
    identity = RelayIdentity(str(answer["relay"]), str(answer["address"]), (controller,))
    atomic_write(data / RELAY_FILE, json.dumps({"name": identity.name, "address": identity.address,
                                                "controllers": list(identity.controllers)}).encode(), mode=0o644)
    log.info("enrolled as relay %s at %s (serial %x)", identity.name, identity.address, certificate.serial_number)
    return identity


def load_identity(data_dir: Path) -> RelayIdentity | None:
    try:
        record = json.loads((data_dir / RELAY_FILE).read_text(encoding="utf-8"))
        return RelayIdentity(str(record["name"]), str(record["address"]), tuple(map(str, record["controllers"])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise StartupError(f"{data_dir / RELAY_FILE} is unreadable; remove the data directory and enroll the relay "
                           "again with a new token (outpostctl relay add).") from None


def key_of(certificate: x509.Certificate) -> str:
    """How the store names the key of a relay certificate (``relays.key_sha256``)."""
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise StartupError("The relay's certificate holds no EC key; enroll the relay again with a new token.")
    return public_key_sha256(key)


def open_relay(settings: Settings) -> tuple[ControllerContext, RelayIdentity]:
    """The relay's context: the CA's certificate only, its own certificate, the shared store."""
    identity = load_identity(settings.data_dir)
    if identity is None:
        if settings.enroll_token is None:
            raise StartupError(f"{settings.data_dir} holds no enrolled relay; start it once with --enroll-token FILE "
                               "(outpostctl relay add NAME --address HOST:PORT writes one).")
        identity = enroll(settings, settings.enroll_token)
    ca = CertificateAuthority.public_only(settings.ca_cert_path, settings.trust_domain)
    server_cert = x509.load_pem_x509_certificate(settings.server_cert_path.read_bytes())
    store = Store(settings.store_location)
    try:
        row = store.query_one("SELECT value FROM meta WHERE key = 'ca_fingerprint'")
        if row is None or row["value"] != ca.fingerprint:
            raise StartupError(f"The store {store.describe()} is not the store of the controller this relay enrolled "
                               "with; give the relay that controller's --store.")
        status = store.query_one("SELECT status, key_sha256 FROM relays WHERE name = ?", (identity.name,))
        if status is None or status["status"] != ACTIVE:
            said = "removed" if status is None else status["status"]
            raise StartupError(f"Relay {identity.name} was {said} at the controller; it carries no "
                               "tunnels. Add it again (outpostctl relay add) and enroll a fresh data directory.")
        if status["key_sha256"] != key_of(server_cert):
            # Re-keyed: the name was retired, added and enrolled again from another data directory.
            raise StartupError(f"Relay {identity.name} was enrolled again with another key; the key in "
                               f"{settings.data_dir} is no longer trusted. Start the relay from the data directory "
                               "it was enrolled into, or remove this one.")
    except BaseException:
        store.close()
        raise
    audit = AuditLog(store, chain_key=load_or_create_key(settings.data_dir))
    registry = Registry(store, audit, settings.trust_domain)
    tokens = TokenAuthority(ca, audit, settings.base_url)
    context = ControllerContext(
        settings=settings, store=store, ca=ca, registry=registry, policy=PolicyEngine(store, audit), audit=audit,
        tokens=tokens,
        enrollment=Enrollment(store, ca, registry, tokens, audit, settings.cert_lifetime, settings.session_lifetime),
        renewal=Renewal(store, ca, registry, audit, settings.cert_lifetime, settings.recovery_grace),
        server_certificate_der=server_cert.public_bytes(serialization.Encoding.DER),
        relay_urls=[relay_url(identity.address)],
    )
    return context, identity


def renew(settings: Settings, identity: RelayIdentity) -> x509.Certificate:
    """A new certificate for the relay's key from the first controller that answers; written before it is used."""
    key = serialization.load_pem_private_key(settings.server_key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    tls = pinned(settings.ca_cert_path.read_text(encoding="ascii"))
    last: StartupError | None = None
    for controller in identity.controllers:
        try:
            answer = json.loads(_http(controller + "/v1/relays/renew", tls, {"csr": _csr(key, identity.name)}))
        except StartupError as error:
            last = error
            continue
        certificate = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        atomic_write(settings.server_cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return certificate
    raise last or StartupError("The relay knows no controller to renew at.")


def renewal_due(certificate_der: bytes) -> float:
    """Unix time at which the relay's certificate is due for renewal."""
    cert = x509.load_der_x509_certificate(certificate_der)
    end = not_after_of(cert).timestamp()
    # The life counts from issuance, not from the CA's backdated start: counted from that start, a
    # certificate of 300 s (five minutes backdated) came due at a third of its life, before issuance
    # for a shorter one, and links and agents drain by the life from issuance (shared/cert_schedule.py).
    start = issued_at(not_before_of(cert).timestamp(), end)
    return start + (end - start) * RENEW_FRACTION


async def run_relay_node(context: ControllerContext, identity: RelayIdentity, tunnels: Callable[[], int],
                         use_certificate: Callable[[x509.Certificate], None],
                         retired: Callable[[str], None]) -> None:
    """Heartbeat, relay list and renewal, until the relay is retired (then ``retired`` is told why)."""
    book = RelayBook(context.store, context.ca, context.audit, context.settings.relay_cert_lifetime)
    # Renewals keep the key: the one the store must still list for this relay's name.
    own_key = key_of(x509.load_der_x509_certificate(context.server_certificate_der))
    started = time.time()
    next_renewal = renewal_due(context.server_certificate_der)
    last_beat = 0.0
    while True:
        status: str | None = ACTIVE
        try:
            if time.monotonic() - last_beat >= RELAY_HEARTBEAT_INTERVAL:
                status = await RELAY_POOL.run(book.heartbeat, identity.name, tunnels(), started, own_key)
                last_beat = time.monotonic()
            # The list AUTH_OK hands out replaces the agent's: it names a relay that just started at once.
            live = await RELAY_POOL.run(book.live)
        except ControllerError as error:  # the store away, the workers busy: tunnels carry on
            log.warning("relay heartbeat not written (%s); trying again", error.message)
            live = []
        if status != ACTIVE:
            retired(f"relay {identity.name} is {status or 'no longer in the store'}")
            return
        if live:
            context.relay_loads = live
            context.relay_urls[:] = [url for url, _ in live]
        if time.time() >= next_renewal:
            try:
                certificate = await asyncio.to_thread(renew, context.settings, identity)
                use_certificate(certificate)
                # Never sooner than a retry: a clock running ahead of the controller's (the new certificate
                # due at once by this clock) must not make a renewal a second.
                next_renewal = max(renewal_due(certificate.public_bytes(serialization.Encoding.DER)),
                                   time.time() + RENEW_RETRY_SECONDS)
            except StartupError as error:
                log.error("renewing the relay's certificate failed (%s); trying again in %g s", error,
                          RENEW_RETRY_SECONDS)
                next_renewal = time.time() + RENEW_RETRY_SECONDS
        await asyncio.sleep(RELAY_LIST_REFRESH)

