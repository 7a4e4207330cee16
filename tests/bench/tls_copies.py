"""What the copies around the TLS layer cost per GB, next to the encryption itself, in one process.

The tunnel joins each flush's frames into one ``bytes`` before the TLS write
(a copy of every byte sent), and the TLS layer of a protocol that is not a
``BufferedProtocol`` decrypts each record into a fresh buffer and joins the
records of one read (a copy of every byte received). Here two ``SSLObject``s
over memory BIOs (TLS 1.3, the tunnel's cipher) carry the same bulk flushes
(four 64 KiB DATA frames, each behind its 10-byte header) four ways, rounds
alternating, so that each copy's share is measured without three processes
and a shared machine's noise around it:

* send ``joined``: one ``write`` of the joined flush (the tunnel's way);
* send ``records``: the flush cut at the 16 KiB record boundaries, whole
  records inside one payload passed as views, a join only for a record that
  straddles a header (a quarter of the bytes copied), the same records on
  the wire;
* receive ``copied``: a fresh 256 KiB read per record and a join (uvloop's
  and asyncio's way for the tunnel's reader);
* receive ``buffered``: every record into one reused buffer, then one copy
  out (what a ``BufferedProtocol`` reader would do).

Each figure is the median over the rounds of CPU seconds per GB carried
(the send figures include reading the encrypted bytes out of the BIO, the
receive ones feeding them in). Last line: JSON.

    .venv/bin/python tests/bench/tls_copies.py [--flushes 2000] [--rounds 5]
"""

from __future__ import annotations

import datetime
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from tests.bench.bench_setup import emit, int_arg, machine  # noqa: E402

# The tunnel's bulk flush: four DATA frames of the core's send size (MAX_SEND_PAYLOAD), each behind its header.
FRAME_PAYLOAD = 64 * 1024
FRAMES_PER_FLUSH = 4
HEADER = b"h" * 10
# TLS's largest record payload: OpenSSL cuts every write at this size.
RECORD = 16 * 1024
# What uvloop's and asyncio's TLS layers ask of each SSLObject.read.
READ_SIZE = 256 * 1024
# 2,000 flushes of 256 KiB: half a GB a variant, about half a second each, long against the clock's resolution.
DEFAULT_FLUSHES = 2000
# Five rounds: a median that one descheduled round does not move.
DEFAULT_ROUNDS = 5
# Handshake messages go back and forth a few times at most; the loop is bounded for a broken set-up.
HANDSHAKE_STEPS = 10

Piece = bytes | memoryview


def certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate and key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls-copies")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Pair:
    """A TLS client and server joined by memory BIOs, handshake done."""

    def __init__(self, cert: Path, key: Path) -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_verify_locations(cert)
        self.client_in, self.client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.server_in, self.server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.client_in, self.client_out, server_hostname="tls-copies")
        self.server = server_ctx.wrap_bio(self.server_in, self.server_out, server_side=True)
        for _ in range(HANDSHAKE_STEPS):
            done = True
            for end in (self.client, self.server):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    done = False
            self.server_in.write(self.client_out.read())
            self.client_in.write(self.server_out.read())
            if done:
                break
        else:
            raise SystemExit("the TLS handshake did not finish")
        self.buffer = bytearray(2 * FRAME_PAYLOAD * FRAMES_PER_FLUSH)
        self.view = memoryview(self.buffer)


def record_pieces(parts: list[Piece]) -> list[Piece]:
    """``parts`` cut where TLS cuts their concatenation into records: views where a span lies in one part."""
    out: list[Piece] = []
    pending: list[Piece] = []
    held = 0
    for part in parts:
        size = len(part)
        pos = 0
        if held:
            take = min(RECORD - held, size)
            pending.append(part if take == size else memoryview(part)[:take])
            held += take
            pos = take
            if held < RECORD:
                continue
            out.append(b"".join(pending))
            pending, held = [], 0
        whole = (size - pos) // RECORD * RECORD
        if whole:
            out.append(memoryview(part)[pos:pos + whole])
            pos += whole
        if pos < size:
            pending, held = [memoryview(part)[pos:]], size - pos
    if pending:
        out.append(b"".join(pending))
    return out


def send_joined(pair: Pair, parts: list[Piece]) -> bytes:
    pair.client.write(b"".join(parts))
    return pair.client_out.read()


def send_records(pair: Pair, parts: list[Piece]) -> bytes:
    for piece in record_pieces(parts):
        pair.client.write(piece)
    return pair.client_out.read()


def receive_copied(pair: Pair) -> bytes:
    chunks = []
    while True:
        try:
            chunk = pair.server.read(READ_SIZE)
        except ssl.SSLWantReadError:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def receive_buffered(pair: Pair) -> bytes:
    got = 0
    while True:
        try:
            got += pair.server.read(len(pair.buffer) - got, pair.view[got:])
        except ssl.SSLWantReadError:
            break
    return bytes(pair.view[:got])


def run_round(pair: Pair, parts: list[Piece], flushes: int, send: Callable[[Pair, list[Piece]], bytes],
              receive: Callable[[Pair], bytes]) -> tuple[float, float]:
    """CPU seconds spent sending and receiving ``flushes`` flushes."""
    expected = sum(len(part) for part in parts)
    sending = receiving = 0.0
    clock = time.process_time
    for _ in range(flushes):
        start = clock()
        wire = send(pair, parts)
        middle = clock()
        pair.server_in.write(wire)
        received = receive(pair)
        receiving += clock() - middle
        sending += middle - start
        if len(received) != expected:
            raise SystemExit(f"received {len(received)} bytes of a {expected}-byte flush")
    return sending, receiving


def main() -> None:
    flushes = int_arg("flushes", DEFAULT_FLUSHES)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    payloads = [os.urandom(FRAME_PAYLOAD) for _ in range(FRAMES_PER_FLUSH)]
    parts: list[Piece] = []
    for payload in payloads:
        parts += [HEADER, memoryview(payload)]
    gb = flushes * sum(len(part) for part in parts) / 1e9
    with tempfile.TemporaryDirectory(prefix="tls-copies-") as tmp:
        pair = Pair(*certificate(Path(tmp)))
    cipher = pair.client.cipher()
    send_s: dict[str, list[float]] = {"joined": [], "records": []}
    receive_s: dict[str, list[float]] = {"copied": [], "buffered": []}
    for _ in range(rounds):
        for (send_name, send), (receive_name, receive) in ((("joined", send_joined), ("copied", receive_copied)),
                                                           (("records", send_records), ("buffered", receive_buffered))):
            sent, received = run_round(pair, parts, flushes, send, receive)
            send_s[send_name].append(sent / gb)
            receive_s[receive_name].append(received / gb)

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    emit({
        "benchmark": "tls_copies",
        "flushes": flushes,
        "rounds": rounds,
        "bytes_per_flush": sum(len(part) for part in parts),
        "cipher": cipher[0] if cipher else None,
        "send_cpu_s_per_gb": {name: median(values) for name, values in send_s.items()},
        "receive_cpu_s_per_gb": {name: median(values) for name, values in receive_s.items()},
        "rounds_send_cpu_s_per_gb": {name: [round(v, 3) for v in values] for name, values in send_s.items()},
        "rounds_receive_cpu_s_per_gb": {name: [round(v, 3) for v in values] for name, values in receive_s.items()},
        "measured": "process CPU time around the TLS write (with the BIO read) and the TLS read (with the BIO "
                    "write) of each flush, per GB of frames; one process, no sockets",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
