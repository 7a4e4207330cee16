"""A real OpenID Provider (npm oidc-provider under nodejs) on 127.0.0.1 over TLS, and a person at its pages.

The provider is started from ``tests/oidc/provider.mjs`` with a test CA made
here, so the controller meets an HTTPS issuer exactly as in production. The
signing key is made here too: tests that need an ID token the provider
would never issue (wrong audience, expired, ...) sign it with the very key
the provider publishes.
"""

from __future__ import annotations

import base64
import datetime
import html.parser
import http.cookiejar
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
#: Node starts the provider in well under a second; under the load of a shared CI machine, ten.
START_TIMEOUT = 20.0
#: Every page of the provider answers at once on loopback; this only bounds a hung provider.
PAGE_TIMEOUT = 10.0
#: A login takes four or five pages; a loop that sees more is lost in a redirect cycle.
MAX_PAGES = 12
CLIENT_ID = "outpost"
KID = "test-key-1"

#: The people the provider knows, with the groups the controller maps to roles in the tests.
USERS: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice Admin", "preferred_username": "alice", "groups": ["ops-admins"]},
    "oscar": {"name": "Oscar Operator", "preferred_username": "oscar", "groups": ["ops"]},
    "tina": {"name": "Tina Tenant", "preferred_username": "tina", "groups": ["acme-admins"]},
    "nora": {"name": "Nora Nogroup", "preferred_username": "nora", "groups": ["marketing"]},
    "audrey": {"name": "Audrey Auditor", "preferred_username": "audrey", "groups": ["audit"]},
    "april": {"name": "April Approver", "preferred_username": "april", "groups": ["change-board"]},
}


#: oidc-provider 9 runs on Node 20 and later (Debian 12's own nodejs is 18).
MIN_NODE_MAJOR = 20


def node_missing() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("node") is None:
        return "nodejs is not installed: run scripts/setup"
    version = subprocess.run(["node", "-p", "process.versions.node"], capture_output=True, text=True, timeout=30)
    if int(version.stdout.split(".")[0] or 0) < MIN_NODE_MAJOR:
        return f"node {version.stdout.strip()} is older than {MIN_NODE_MAJOR}, which oidc-provider 9 needs"
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        return "tests/oidc/node_modules is missing: run scripts/setup (npm ci in tests/oidc)"
    return None


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    priv = key.private_numbers()
    pub = priv.public_numbers
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": _b64(pub.n), "e": _b64(pub.e),
            "d": _b64(priv.d), "p": _b64(priv.p), "q": _b64(priv.q), "dp": _b64(priv.dmp1),
            "dq": _b64(priv.dmq1), "qi": _b64(priv.iqmp)}


def make_tls(directory: Path) -> tuple[Path, str, str]:
    """A test CA and a certificate for 127.0.0.1 it issued: (CA file, cert PEM, key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outpost test IdP CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file = directory / "idp-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return ca_file, leaf.public_bytes(serialization.Encoding.PEM).decode(), key_pem


@dataclass
class IdP:
    issuer: str
    ca_file: Path
    signing_key: rsa.RSAPrivateKey
    process: subprocess.Popen[bytes]
    client_id: str = CLIENT_ID
    client_secret: str | None = None
    log: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def sign(self, claims: dict[str, Any], *, kid: str = KID, key: Any = None, alg: str = "RS256") -> str:
        """An ID token the test shapes itself, signed with the provider's own key unless told otherwise."""
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.client_id, "sub": "alice", "iat": now, "exp": now + 600,
                "name": "Alice Admin", "groups": ["ops-admins"]}
        body.update(claims)
        return jwt.encode(body, key or self.signing_key, algorithm=alg, headers={"kid": kid})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_provider(directory: Path, *, client_secret: str | None = None, id_token_ttl: int = 3600) -> IdP:
    ca_file, cert_pem, key_pem = make_tls(directory)
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "authorization_code"],
        "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1/callback"],
        "application_type": "native",
    }
    if client_secret is None:
        client["token_endpoint_auth_method"] = "none"
    else:
        client["client_secret"] = client_secret
        client["token_endpoint_auth_method"] = "client_secret_basic"
    config = {"cert": cert_pem, "key": key_pem, "jwk": rsa_jwk(signing_key, KID), "clients": [client],
              "users": USERS, "id_token_ttl": id_token_ttl}
    config_file = directory / "provider.json"
    fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    env = dict(os.environ, NODE_ENV="test", DEBUG="")
    process = subprocess.Popen(["node", str(HERE / "provider.mjs"), str(config_file)], cwd=HERE, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    log: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            break
        log.append(line)
        if line.startswith("listening "):
            port = int(line.split()[1])
            os.set_blocking(process.stdout.fileno(), False)
            return IdP(f"https://127.0.0.1:{port}", ca_file, signing_key, process,
                                client_secret=client_secret, log=log)
    process.kill()
    process.wait(5)
    raise RuntimeError("the test identity provider did not start: " + "".join(log)[-2000:])


class _Form(html.parser.HTMLParser):
    """The first form of a page: its action, method and fields (inputs and buttons with a name)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method = "get"
        self.fields: dict[str, str] = {}
        self._in_form = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and not self._done and not self._in_form:
            self._in_form = True
            self.action = a.get("action", "")
            self.method = a.get("method", "get").lower()
        elif self._in_form and tag in ("input", "button") and a.get("name"):
            if a.get("type") == "submit" and a["name"] in self.fields:
                return
            self.fields.setdefault(a["name"], a.get("value", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True


def complete_device_login(provider: IdP, verification_uri_complete: str, login: str) -> str:
    """What a person does in a browser: confirm the code, log in, consent. Returns the last page's text."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                         urllib.request.HTTPSHandler(context=provider.ssl_context()))
    url, data = verification_uri_complete, None
    for _ in range(MAX_PAGES):
        with opener.open(urllib.request.Request(url, data=data), timeout=PAGE_TIMEOUT) as response:
            url = response.geturl()
            page = response.read().decode()
        form = _Form()
        form.feed(page)
        if form.action is None:
            return page
        fields = dict(form.fields)
        if "login" in fields:
            fields["login"] = login
            fields["password"] = "any"
        if "abort" in fields:
            del fields["abort"]
        url = urllib.parse.urljoin(url, form.action)
        data = urllib.parse.urlencode(fields).encode()
        if form.method == "get":
            url, data = url + "?" + data.decode(), None
    raise AssertionError(f"the provider's pages did not end after {MAX_PAGES} pages")
