"""The stunnel chain: the same shape as the tunnel (two TLS hops, a relay that re-encrypts), built in C.

client -> stunnel client process (plain in, TLS out) -> TLS -> stunnel middle
process (TLS in, plain to its own second service on a loopback port, TLS out)
-> TLS -> stunnel server process (TLS in, plain out) -> service.

Three processes of Debian's ``stunnel4``, as the tunnel has three (dialer
agent, relay, binder agent). Every TLS hop is TLS 1.3 with the tunnel's
cipher suite and mutual authentication against a CA this module makes: each
side presents its own certificate, the accepting side requires and verifies
the peer's chain, the connecting side verifies the chain and the peer's name
(``verifyChain``, ``requireCert``, ``checkHost``). Every socket has
TCP_NODELAY (``socket = l:`` / ``r:``). Everything listens on 127.0.0.1.

The middle's decrypted bytes cross one extra loopback TCP connection between
its two services (stunnel cannot join a server service to a client service
inside one process); that costs the chain a little, never the tunnel.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.bench.bench_setup import _free_port, _listening, cpu_seconds

STUNNEL_PATH = ("client -> stunnel client -> TLS -> stunnel middle (decrypts, re-encrypts) -> TLS -> "
                "stunnel server -> service")
#: The program; OUTPOST_BENCH_STUNNEL names another (the smoke test names a missing one).
STUNNEL = os.environ.get("OUTPOST_BENCH_STUNNEL") or shutil.which("stunnel4") or "/usr/bin/stunnel4"
# The tunnel's TLS 1.3 suite (OpenSSL's first choice on this CPU), so both paths encrypt alike.
STUNNEL_CIPHER = "TLS_AES_256_GCM_SHA384"
# stunnel binds its ports within a fraction of a second; this much means it failed.
STUNNEL_START_TIMEOUT = 20.0
# Stopping: SIGTERM, then this long before SIGKILL.
STUNNEL_STOP_TIMEOUT = 10.0
# The benchmark's certificates outlive any run by far and expire on their own.
CERT_LIFETIME = datetime.timedelta(days=2)
# Errors and warnings (refused certificates) only: per-connection notices would cost the chain CPU.
STUNNEL_LOG_LEVEL = 4
CLIENT, MIDDLE, SERVER = "stunnel-client", "stunnel-middle", "stunnel-server"
#: After the program's path, what the benchmarks say (JSON field and stderr line) when the chain cannot run.
MISSING_LINE = "the stunnel chain is not measured (scripts/setup installs stunnel4)"


def unavailable() -> str | None:
    """Why this machine cannot run the stunnel chain, or None."""
    if not os.access(STUNNEL, os.X_OK):
        return f"stunnel4 not found at {STUNNEL}: {MISSING_LINE}"
    return None


def version() -> str | None:
    """stunnel's version line, e.g. ``stunnel 5.68 on x86_64-pc-linux-gnu platform``."""
    if unavailable():
        return None
    result = subprocess.run([STUNNEL, "-version"], capture_output=True, text=True, timeout=STUNNEL_START_TIMEOUT)
    for line in (result.stderr + result.stdout).splitlines():
        if line.startswith("stunnel "):
            return line.strip()
    return None


# -- certificates --------------------------------------------------------------------
def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(directory: Path, names: tuple[str, ...] = (CLIENT, MIDDLE, SERVER)) -> dict[str, tuple[Path, Path]]:
    """A CA (``ca.pem``) and, per name, a certificate and 0600 key it issued; ECDSA P-256 as Outpost's."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("outpost bench CA")).issuer_name(_name("outpost bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + CERT_LIFETIME)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    issued: dict[str, tuple[Path, Path]] = {}
    for common in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + CERT_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(common)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{common}.pem", directory / f"{common}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        issued[common] = (cert_path, key_path)
    return issued


# -- the chain -----------------------------------------------------------------------
class StunnelChain:
    """Three stunnel processes carrying each of ``targets`` (name -> service port) through two TLS hops."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        self.workdir = workdir / "stunnel"
        self.targets = targets
        self.processes: dict[str, subprocess.Popen] = {}
        #: service name -> the client process's plain port for it
        self.ports: dict[str, int] = {}
        #: service name -> the middle's TLS port for it (the tests knock on it)
        self.middle_ports: dict[str, int] = {}

    def start(self) -> StunnelChain:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.workdir.mkdir(mode=0o700)
        certs = make_pki(self.workdir)
        ca = self.workdir / "ca.pem"
        client: list[str] = []
        middle: list[str] = []
        server: list[str] = []
        for service, target in self.targets.items():
            plain, to_middle, inside_middle, to_server = (_free_port() for _ in range(4))
            self.ports[service], self.middle_ports[service] = plain, to_middle
            client += _service(f"{service}", plain, to_middle, certs[CLIENT], ca, connects_tls_to=MIDDLE)
            middle += _service(f"{service}-in", to_middle, inside_middle, certs[MIDDLE], ca, accepts_tls=True)
            middle += _service(f"{service}-out", inside_middle, to_server, certs[MIDDLE], ca, connects_tls_to=SERVER)
            server += _service(f"{service}", to_server, target, certs[SERVER], ca, accepts_tls=True)
        # Start from the far end, so each hop's next one is already listening.
        for name, sections in ((SERVER, server), (MIDDLE, middle), (CLIENT, client)):
            self.processes[name] = self._launch(name, sections)
        for name, process in self.processes.items():
            listens = {CLIENT: self.ports.values(), MIDDLE: self.middle_ports.values()}.get(name, [])
            for port in listens:
                self._wait_listening(name, process, port)
        return self

    def _launch(self, name: str, sections: list[str]) -> subprocess.Popen:
        config = self.workdir / f"{name}.conf"
        config.write_text("\n".join(["foreground = yes", "pid =", "syslog = no", f"debug = {STUNNEL_LOG_LEVEL}",
                                     "", *sections, ""]))
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            return subprocess.Popen([STUNNEL, str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _wait_listening(self, name: str, process: subprocess.Popen, port: int) -> None:
        deadline = time.monotonic() + STUNNEL_START_TIMEOUT
        while not _listening(port):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}: {self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {STUNNEL_START_TIMEOUT} s: "
                                   f"{self.log(name)}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        """The last of a process's own log, for error messages."""
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    @property
    def pids(self) -> dict[str, int]:
        """Process name (``stunnel-client``, ``stunnel-middle``, ``stunnel-server``) -> pid."""
        return {name: process.pid for name, process in self.processes.items()}

    def cpu(self) -> dict[str, float]:
        """utime+stime seconds of each of the three processes (all their threads)."""
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(STUNNEL_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STUNNEL_STOP_TIMEOUT)


def _service(name: str, accept: int, connect: int, cert: tuple[Path, Path], ca: Path, *,
             accepts_tls: bool = False, connects_tls_to: str | None = None) -> list[str]:
    """One stunnel service section: TLS on the accepting side (server) or on the connecting side (client)."""
    lines = [f"[{name}]", f"accept = 127.0.0.1:{accept}", f"connect = 127.0.0.1:{connect}",
             f"cert = {cert[0]}", f"key = {cert[1]}", f"CAfile = {ca}", "verifyChain = yes",
             "sslVersionMin = TLSv1.3", f"ciphersuites = {STUNNEL_CIPHER}",
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
    if accepts_tls:
        lines += ["requireCert = yes"]
    else:
        assert connects_tls_to is not None
        lines += ["client = yes", f"checkHost = {connects_tls_to}"]
    return lines + [""]


@contextlib.contextmanager
def stunnel_chain(targets: dict[str, int]) -> Iterator[tuple[StunnelChain | None, str | None]]:
    """The running chain and None, or None and why it cannot run (also said once on stderr)."""
    why = unavailable()
    if why:
        print(f"bench: {why}", file=sys.stderr)
        yield None, why
        return
    with tempfile.TemporaryDirectory(prefix="outpost-bench-stunnel-") as tmp:
        chain = StunnelChain(Path(tmp), targets)
        try:
            chain.start()
            yield chain, None
        finally:
            chain.stop()


def stunnel_fields(chain: StunnelChain | None, why: str | None) -> dict:
    """What every benchmark's JSON says about the chain, measured or not."""
    return {
        "stunnel_available": chain is not None,
        "stunnel_skipped": why,
        "stunnel_version": version() if chain is not None else None,
        "stunnel_cipher": STUNNEL_CIPHER if chain is not None else None,
    }
