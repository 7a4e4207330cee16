"""Killing real processes with SIGKILL at random moments, and judging what they left.

A kill is only a kill when the process was still running when the signal
went out; ``run_and_kill`` says which it was. ``identity_faults`` is the
cheap check run after every kill of an agent: what a starting agent would
load, and whether the key and certificate it finds still make an identity.
``ControllerStore`` reads the controller's store from the outside, as a
second process would.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import OutpostError
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.state import StateDir
from controller.ca import public_key_sha256
from shared.trust import ca_fingerprint, cert_not_after, cert_not_before, verify_leaf_issued_by
from tests.e2e.harness import admin_token_in, python_env

SOFTWARE_KEYS = KeyStoreSettings(backend="software")
#: A killed process is reaped at once; one that ignores SIGKILL does not exist,
#: so this only bounds a wait that should take microseconds.
REAP_TIMEOUT = 10.0
#: A full run of one agent command on a loaded CI machine, at most.
COMMAND_TIMEOUT = 60.0
#: The issue asks for at least 200 kills in a run CI executes.
STRESS_KILLS = 200
#: The CI machine has two cores: one kill loop per core.
WORKERS = 2


@dataclass(frozen=True)
class KillOutcome:
    """What became of one process sent SIGKILL after ``delay`` seconds."""

    delay: float
    killed: bool
    returncode: int
    stderr: str
    elapsed: float

    @property
    def failed_on_its_own(self) -> bool:
        """It exited before the kill, and not successfully: a fault in itself."""
        return not self.killed and self.returncode != 0

    def shortened(self, whole: float) -> float:
        """The window to draw the next delay from: a run that finished before its kill
        shows that runs got faster than when ``whole`` was measured (the load went down)."""
        return min(whole, self.elapsed) if self.returncode == 0 and not self.killed else whole


def kill_counts(quick: int) -> list:
    """pytest parameters: ``quick`` kills in the quick suite, STRESS_KILLS in the slow run."""
    return [pytest.param(quick, id="quick"),
            pytest.param(STRESS_KILLS, id="stress", marks=pytest.mark.slow)]


@dataclass
class Tally:
    """What the kills did, for the failure message and the log."""

    seed: int
    kills: int = 0
    iterations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def merge(self, other: Tally) -> None:
        self.kills += other.kills
        self.iterations += other.iterations
        self.faults += other.faults
        for outcome, number in other.outcomes.items():
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + number

    def report(self) -> str:
        return json.dumps({"seed": self.seed, "kills": self.kills, "iterations": self.iterations,
                           "outcomes": self.outcomes,
                           "faults": self.faults[:20]}, sort_keys=True)


def crash_seed() -> int:
    # OUTPOST_CRASH_SEED replays a failing run's kill delays.
    return int(os.environ.get("OUTPOST_CRASH_SEED") or random.SystemRandom().randrange(2**32))


def in_parallel(kills: int, seed: int, loop: Callable[[int, int, random.Random, Tally], None],
                workers: int = WORKERS) -> Tally:
    """Run ``loop(worker, kills_wanted, rng, tally)`` on ``workers`` threads; the merged tally."""
    total = Tally(seed)
    shares = [kills // workers + (1 if w < kills % workers else 0) for w in range(workers)]
    tallies = [Tally(seed) for _ in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(loop, w, shares[w], random.Random(seed * workers + w), tallies[w])
                   for w in range(workers)]
        for future in futures:
            future.result()
    for tally in tallies:
        total.merge(tally)
    return total


def last_line(output: str) -> str:
    """The agent's own one-line error, without the TSS's log lines before it."""
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run_and_kill(argv: Sequence[str], delay: float, env: dict | None = None) -> KillOutcome:
    """Start ``argv``, SIGKILL it after ``delay`` seconds unless it has already exited."""
    started = time.monotonic()
    process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env or python_env())
    try:
        process.wait(delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    elapsed = time.monotonic() - started
    _, stderr = process.communicate(timeout=REAP_TIMEOUT)
    killed = process.returncode == -signal.SIGKILL
    return KillOutcome(delay, killed, process.returncode, stderr.decode(errors="replace").strip(), elapsed)


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_argv(*args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          env=python_env())


@dataclass(frozen=True)
class Timing:
    """Median times of whole runs: until exit, and until ``watched`` first appeared."""

    whole: float
    appeared: float


#: How often ``timed_runs`` looks for the watched path: fine enough to place a
#: window of a few milliseconds, cheap enough not to slow the run it watches.
WATCH_INTERVAL = 0.0005


def timed_runs(argv_for: Callable[[int], tuple[list[str], Path]], runs: int) -> Timing:
    """Time ``runs`` whole runs of ``argv_for(i)`` = (argv, path to watch); each must succeed."""
    wholes, appearances = [], []
    for run in range(runs):
        argv, watched = argv_for(run)
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=python_env())
        appeared = None
        deadline = started + COMMAND_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if appeared is None and watched.exists():
                appeared = time.monotonic() - started
            time.sleep(WATCH_INTERVAL)
        _, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
        assert process.returncode == 0, stderr.decode(errors="replace")
        wholes.append(time.monotonic() - started)
        appearances.append(wholes[-1] if appeared is None else appeared)
    return Timing(statistics.median(wholes), statistics.median(appearances))


def identity_faults(state: Path, ca_fingerprint_expected: str, keys: KeyStoreSettings = SOFTWARE_KEYS,
                    now: float | None = None) -> list[str]:
    """Why the enrolled state in ``state`` is not a usable identity (empty: it is usable).

    Usable means: it loads as a starting agent loads it, the certificate
    chains to the pinned CA (the one the token named) and is valid now, it
    certifies the stored key, and the key signs a fresh challenge that
    verifies against the certificate (what the relay asks of every tunnel).
    """
    now = time.time() if now is None else now
    try:
        identity = StateDir(state).load()
    except OutpostError as error:
        return [f"enrolled state does not load: {error}"]
    faults = []
    cert, ca_cert = identity.certificate(), identity.ca_certificate()
    if ca_fingerprint(ca_cert) != ca_fingerprint_expected:
        faults.append("the stored CA is not the controller's CA")
    if not verify_leaf_issued_by(cert, ca_cert):
        faults.append("the stored certificate is not issued by the stored CA")
    if not cert_not_before(cert).timestamp() <= now < cert_not_after(cert).timestamp():
        faults.append("the stored certificate is not valid now")
    keystore = open_keystore(state, keys)
    try:
        if public_key_sha256(keystore.public_key()) != public_key_sha256(cert.public_key()):
            faults.append("the stored certificate is for another key than the stored key")
        challenge = os.urandom(32)
        try:
            cert.public_key().verify(keystore.sign(challenge), challenge, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            faults.append("the stored key's signature does not verify against the stored certificate")
    except OutpostError as error:
        faults.append(f"the stored key cannot be used: {error}")
    finally:
        keystore.close()
    return faults


def stored_key_sha256(state: Path, keys: KeyStoreSettings = SOFTWARE_KEYS) -> str | None:
    """SHA-256 of the device key left in ``state``, or None when there is none (or it is unreadable)."""
    keystore = open_keystore(state, keys)
    try:
        return public_key_sha256(keystore.public_key()) if keystore.exists() else None
    except OutpostError:
        return None
    finally:
        keystore.close()


def token_jti(token: str) -> str:
    payload = token.strip().split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


class ManagementClient:
    """The controller's management API over its own TLS (urllib: one short request each)."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.admin_token = admin_token_in(data_dir)
        self.tls = ssl.create_default_context(cafile=str(data_dir / "ca" / "ca.pem"))

    def create_identity(self, name: str, roles: Sequence[str] = ()) -> str:
        """Create ``name``; its enrollment token."""
        body = json.dumps({"name": name, "roles": list(roles)}).encode()
        request = urllib.request.Request(
            self.url + "/api/v1/identities", data=body, method="POST",
            headers={"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.tls, timeout=COMMAND_TIMEOUT) as response:
            return json.loads(response.read())["token"]


class ControllerStore:
    """Rows of the controller's store, read through a separate connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, sql: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        connection = sqlite3.connect(str(self.path), timeout=30.0)
        connection.row_factory = sqlite3.Row
        try:
            return list(connection.execute(sql, parameters))
        finally:
            connection.close()

    def token(self, jti: str) -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM tokens WHERE jti = ?", (jti,))
        return rows[0] if rows else None

    def identity(self, name: str, tenant: str = "default") -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM identities WHERE tenant = ? AND name = ?", (tenant, name))
        return rows[0] if rows else None

    def all(self, table: str) -> list[sqlite3.Row]:
        return self._rows(f"SELECT * FROM {table}")

    def integrity(self) -> str:
        return self._rows("PRAGMA integrity_check")[0][0]


def load_certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())
