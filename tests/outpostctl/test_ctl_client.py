"""The management client's sentences for answers the real controller should never give.

A small TLS server on loopback plays a broken or stuck controller: one that
answers with HTML, one whose certificate names another host, one that never
answers at all.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outpostctl.client import ManagementClient
from outpostctl.config import CtlConfig
from outpostctl.errors import ApiError, ControllerUnreachable, CredentialRefused, TrustError

#: Short enough to keep the suite quick, long enough for loopback TLS.
TEST_TIMEOUT_SECONDS = 1.0


def issue(folder: Path, host_names: list[x509.GeneralName]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``host_names``: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(host_names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class Answer(BaseHTTPRequestHandler):
    status = 502
    body = b"<html>Bad Gateway</html>"
    content_type = "text/html"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_tls(folder: Path, handler: type[BaseHTTPRequestHandler],
              names: list[x509.GeneralName]) -> tuple[ThreadingHTTPServer, Path]:
    ca, cert, key = issue(folder, names)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, ca


@pytest.fixture
def stopping() -> Iterator[list[ThreadingHTTPServer]]:
    servers: list[ThreadingHTTPServer] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def client_for(port: int, ca: Path, host: str = "127.0.0.1") -> ManagementClient:
    config = CtlConfig(url=f"https://{host}:{port}", ca_path=ca, token="t", source=Path("/x/outpostctl.toml"))
    return ManagementClient(config, timeout=TEST_TIMEOUT_SECONDS)


LOOPBACK = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def test_an_error_without_json_says_the_status_and_where_to_look(tmp_path: Path, stopping: list) -> None:
    server, ca = serve_tls(tmp_path, Answer, LOOPBACK)
    stopping.append(server)
    with pytest.raises(ApiError) as caught:
        client_for(server.server_address[1], ca).list_identities()
    assert caught.value.status == 502
    assert str(caught.value) == (
        f"the controller at https://127.0.0.1:{server.server_address[1]} answered HTTP 502 without an explanation; see its log"
    )


def test_the_controllers_error_message_is_carried_as_is(tmp_path: Path, stopping: list) -> None:
    class Refusal(Answer):
        status = 409
        content_type = "application/json"
        body = b'{"error": "identity_exists", "message": "There is already an identity default/gw-1."}'

    server, ca = serve_tls(tmp_path, Refusal, LOOPBACK)
    stopping.append(server)
    with pytest.raises(ApiError) as caught:
        client_for(server.server_address[1], ca).create_service("gw-1", [], "default")
    assert (caught.value.code, caught.value.status, str(caught.value)) == (
        "identity_exists", 409, "There is already an identity default/gw-1.")


def test_a_401_names_the_config_file(tmp_path: Path, stopping: list) -> None:
    class Unauthorized(Answer):
        status = 401
        content_type = "application/json"
        body = b'{"error": "unauthorized", "message": "This request needs the admin token."}'

    server, ca = serve_tls(tmp_path, Unauthorized, LOOPBACK)
    stopping.append(server)
    with pytest.raises(CredentialRefused, match=r"refused the admin token in /x/outpostctl.toml \(HTTP 401\)"):
        client_for(server.server_address[1], ca).status()


def test_a_certificate_for_another_host_is_named_as_such(tmp_path: Path, stopping: list) -> None:
    server, ca = serve_tls(tmp_path, Answer, [x509.DNSName("controller.elsewhere.example")])
    stopping.append(server)
    with pytest.raises(TrustError, match="does not name the host in https://127.0.0.1:"):
        client_for(server.server_address[1], ca).status()


def test_a_controller_that_never_answers_times_out_with_a_sentence(tmp_path: Path) -> None:
    ca, _, _ = issue(tmp_path, LOOPBACK)
    with socket.socket() as silent:
        # Accepts connections (the kernel's backlog) but never speaks TLS.
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.monotonic()
        with pytest.raises(ControllerUnreachable, match=r"no answer within 1 seconds; is it running"):
            client_for(silent.getsockname()[1], ca).status()
        assert time.monotonic() - started < TEST_TIMEOUT_SECONDS * 5
