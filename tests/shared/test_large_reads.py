"""A TLS read of a small message takes no fresh memory mapping once the process started its loop.

The TLS layer reads into a new 256 KiB ``bytes`` and shrinks it to what
came. Counted in a fresh interpreter (the allocator's state is per process):
each such read that is mmapped touches a new page, so minor page faults per
read tell a mapping from a heap block without tracing system calls.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Small records read one by one: enough that one fault per read stands far above start-up noise.
READS = 300
#: The TLS layers' read size (asyncio's and uvloop's SSL protocols).
TLS_READ = 256 * 1024

CHILD = r"""
import json, resource, ssl, sys
from shared import event_loop

cert, key, settle = sys.argv[1], sys.argv[2], sys.argv[3] == "settle"
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(cert, key)
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.load_verify_locations(cert)
bios = [ssl.MemoryBIO() for _ in range(4)]
server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="localhost")

def pump():
    bios[2].write(bios[1].read())
    bios[0].write(bios[3].read())

for _ in range(10):
    for side in (client, server):
        try:
            side.do_handshake()
        except ssl.SSLWantReadError:
            pass
    pump()
if settle:
    event_loop.settle_large_reads()

def one():
    server.write(b"x" * 64)
    pump()
    assert len(client.read(int(sys.argv[4]))) == 64

for _ in range(20):
    one()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[5])):
    one()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    where = tmp_path_factory.mktemp("tls")
    (where / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (where / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return where / "cert.pem", where / "key.pem"


def faults(certificate: tuple[Path, Path], settle: bool) -> int:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(certificate[0]), str(certificate[1]), "settle" if settle else "as-is",
         str(TLS_READ), str(READS)],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the threshold is glibc's")
def test_a_small_tls_read_after_settling_takes_no_new_page(certificate: tuple[Path, Path]) -> None:
    # Without it each read is a mapping of its own (the count proves the measurement sees them) ...
    unsettled = faults(certificate, settle=False)
    assert unsettled >= READS
    # ... with it, reads reuse the heap.
    assert faults(certificate, settle=True) < READS // 10
