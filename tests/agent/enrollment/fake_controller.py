"""A test double of the controller's gateway API, for the enrollment tests.

The real controller (``controller/``) is the other end of enrollment. This
double implements the endpoints from docs/api.md -- ``GET /v1/ca``, ``GET /v1/time``,
``POST /v1/enroll`` and ``POST /v1/renew`` -- honestly: real TLS on 127.0.0.1 with a certificate
from its CA, real ES256 token verification, one-time ``jti`` consumption with
re-issue for the same key, real certificates signed from the CSR. Its knobs
let a test play a misbehaving or hostile controller (another CA at /v1/ca, a
TLS certificate from another CA, an error answer, a certificate for another
key, an oversized answer), which the real controller cannot be made to do.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.trust import ca_fingerprint

TRUST_DOMAIN = "outpost.test"
# Matches docs/api.md: request bodies above 64 KiB are refused before reading.
MAX_REQUEST_BODY = 64 * 1024
# Generous bounds so a slow CI machine never makes a working test fail.
STARTUP_TIMEOUT = 10.0
LEAF_LIFETIME = datetime.timedelta(hours=24)
BACKDATE = datetime.timedelta(minutes=5)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TestCA:
    """A throwaway certificate authority (ECDSA P-256), as the controller keeps one."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, common_name: str = "Outpost test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _utcnow()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.fingerprint = ca_fingerprint(self.cert)

    def issue(
        self,
        public_key: Any,
        subject: str,
        san: list[x509.GeneralName],
        lifetime: datetime.timedelta = LEAF_LIFETIME,
    ) -> x509.Certificate:
        now = _utcnow()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def token(self, iss: str, *, sub: str = "pump-1", tnt: str = "default", ttl: float = 7 * 86400,
              key: Any = None, **overrides: Any) -> str:
        """An enrollment token as the controller mints it (claims overridable; None drops one)."""
        now = time.time()
        claims: dict[str, Any] = {
            "iss": iss, "aud": "outpost-enroll", "sub": sub, "tnt": tnt,
            "jti": secrets.token_hex(16), "iat": int(now), "exp": int(now + ttl), "ca": self.fingerprint,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": self.fingerprint})


@dataclass
class Behaviour:
    """How the double misbehaves; the defaults are an honest controller."""

    #: The CA served at /v1/ca (None: the real one).
    served_ca: TestCA | None = None
    #: (HTTP status, JSON body) answered to every /v1/enroll.
    refusal: tuple[int, dict[str, Any]] | None = None
    #: Issue the certificate for a fresh key instead of the CSR's.
    certify_other_key: bool = False
    #: Pad the enrollment answer past the agent's bound.
    oversized_answer: bool = False
    relays: list[str] = field(default_factory=list)
    #: Answer /v1/time (with the real clock), as every controller since the clock checks does.
    serves_time: bool = True
    #: How long issued certificates live; a negative lifetime issues one already expired.
    leaf_lifetime: datetime.timedelta = LEAF_LIFETIME


class FakeController:
    """Serves /v1/ca, /v1/time and /v1/enroll over TLS on 127.0.0.1 from a background thread."""

    def __init__(self, workdir: Path, ca: TestCA, tls_ca: TestCA | None = None) -> None:
        self.ca = ca
        self.behaviour = Behaviour()
        self.enroll_requests = 0
        #: jti -> DER SubjectPublicKeyInfo of the key that redeemed it.
        self.consumed: dict[str, bytes] = {}
        #: DER SubjectPublicKeyInfo -> the URI it was enrolled as, for /v1/renew.
        self.enrolled: dict[bytes, str] = {}
        self._ssl = self._server_context(workdir, tls_ca or ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-controller", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> FakeController:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(STARTUP_TIMEOUT)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(STARTUP_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STARTUP_TIMEOUT)
        self._loop.close()

    def token(self, **claims: Any) -> str:
        return self.ca.token(self.url, **claims)

    @staticmethod
    def _server_context(workdir: Path, tls_ca: TestCA) -> ssl.SSLContext:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        cert = tls_ca.issue(key.public_key(), "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        workdir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = workdir / "server.pem", workdir / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context

    async def _start(self) -> None:
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        app.router.add_get("/v1/ca", self._get_ca)
        app.router.add_post("/v1/enroll", self._post_enroll)
        app.router.add_post("/v1/renew", self._post_renew)
        app.router.add_get("/v1/time", self._get_time)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _get_ca(self, request: web.Request) -> web.Response:
        ca = self.behaviour.served_ca or self.ca
        return web.Response(body=ca.pem.encode(), content_type="application/x-pem-file")

    async def _get_time(self, request: web.Request) -> web.Response:
        if not self.behaviour.serves_time:
            raise web.HTTPNotFound()
        return web.json_response({"time": time.time()})

    async def _post_enroll(self, request: web.Request) -> web.Response:
        self.enroll_requests += 1
        if self.behaviour.refusal is not None:
            status, body = self.behaviour.refusal
            return web.json_response(body, status=status)
        try:
            body = await request.json()
            claims = jwt.decode(body["token"], self.ca.key.public_key(), algorithms=["ES256"], audience="outpost-enroll")
            csr = x509.load_pem_x509_csr(body["csr"].encode())
        except jwt.ExpiredSignatureError:
            return _error(400, "token_expired", "This enrollment token has expired; ask central ops for a new one.")
        except jwt.InvalidTokenError:
            return _error(400, "token_signature", "This enrollment token was not issued by this controller.")
        except (ValueError, KeyError, TypeError):
            return _error(400, "csr_invalid", "The certificate request is not valid.")
        if not csr.is_signature_valid:
            return _error(400, "csr_invalid", "The certificate request is not signed by its key.")
        spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if self.consumed.setdefault(claims["jti"], spki) != spki:
            return _error(409, "token_used", "This enrollment token was already used; ask central ops for a new one.")
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key() if self.behaviour.certify_other_key else csr.public_key()
        uri = f"spiffe://{TRUST_DOMAIN}/{claims['tnt']}/{claims['sub']}"
        leaf = self.ca.issue(public_key, claims["sub"], [x509.UniformResourceIdentifier(uri)],
                             self.behaviour.leaf_lifetime)
        self.enrolled[spki] = uri
        answer: dict[str, Any] = {
            "certificate": leaf.public_bytes(serialization.Encoding.PEM).decode(),
            "ca": self.ca.pem,
            "identity": uri,
            "name": claims["sub"],
            "tenant": claims["tnt"],
            "relays": self.behaviour.relays or [f"wss://127.0.0.1:{self.port}/v1/tunnel"],
            "not_after": int(time.time() + LEAF_LIFETIME.total_seconds()),
        }
        if self.behaviour.oversized_answer:
            answer["padding"] = "x" * (128 * 1024)
        return web.json_response(answer)


    async def _post_renew(self, request: web.Request) -> web.Response:
        """Renewal by proof of the enrolled key (the CSR's signature), as docs/api.md describes it."""
        try:
            csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        except (ValueError, KeyError, TypeError):
            return _error(400, "csr_invalid", "The certificate request is not valid.")
        spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        uri = self.enrolled.get(spki)
        if not csr.is_signature_valid or uri is None:
            return _error(403, "renewal_unknown_key", "No identity is enrolled with this gateway's key.")
        leaf = self.ca.issue(csr.public_key(), uri.rsplit("/", 1)[-1], [x509.UniformResourceIdentifier(uri)],
                             self.behaviour.leaf_lifetime)
        return web.json_response({"certificate": leaf.public_bytes(serialization.Encoding.PEM).decode(),
                                  "identity": uri})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def unused_loopback_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
