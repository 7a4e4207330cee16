"""A controller killed with SIGKILL while it redeems tokens and issues certificates loses nothing it answered for.

A real ``outpost-controller serve`` on one data directory, restarted after
every kill. Between starts, concurrent clients create identities (each with
a token), redeem the token with a new key and renew with that key, as fast
as the controller answers; the kill comes after a random delay, with
requests in flight. Every answer a client got goes into a ledger, and after
every restart the whole ledger is checked against the store:

* the store opens (the controller starts) and passes SQLite's integrity check;
* the CA certificate and key are byte for byte the ones from the first start;
* every identity whose creation was answered exists, with its token;
* every token whose redemption returned a certificate is consumed, for that key,
  and its identity is enrolled with that key; every certificate returned is recorded;
* every request cut off by the kill (no answer) succeeds when retried with the
  same token and key: the token is still usable, or was consumed for that key.

Some kills instead land in start-up, between spawn and ready.
"""

from __future__ import annotations

import asyncio
import random
import signal
import ssl
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca import public_key_sha256
from tests.controller.harness import make_csr
from tests.e2e.crash_harness import ControllerStore, Tally, crash_seed, in_parallel, kill_counts, token_jti
from tests.e2e.harness import Controller, Process, admin_token_in, controller_argv

#: The quick suite's share of kills with requests in flight.
QUICK_KILLS = 10
#: Clients at once: more than the controller's one event loop serves at a
#: time, so redemptions and issuances queue and are cut off at every stage.
CLIENTS = 8
#: The kill comes up to this long after the clients start. Each client
#: completes a create, redeem and renew in a few tens of milliseconds.
TRAFFIC_SECONDS = 0.3
#: This share of the kills lands in start-up instead (spawn to ready).
STARTUP_KILL_SHARE = 0.1
#: Bounds the run whatever happens: kills asked for times this many starts.
MAX_STARTS_PER_KILL = 3
#: No single request waits longer; a controller that was killed refuses at once.
REQUEST_TIMEOUT = 20.0


@dataclass
class Enrolled:
    jti: str
    key_sha256: str
    serials: list[str]


@dataclass
class Ledger:
    """What the controller answered, across every start."""

    tokens: dict[str, str] = field(default_factory=dict)  # identity name -> token
    enrolled: dict[str, Enrolled] = field(default_factory=dict)
    #: Requests cut off by a kill: (name, token, key) to redeem, or (name, key) to renew.
    unanswered_redemptions: list[tuple[str, str, ec.EllipticCurvePrivateKey]] = field(default_factory=list)
    unanswered_renewals: list[tuple[str, ec.EllipticCurvePrivateKey]] = field(default_factory=list)
    next_name: int = 0

    def new_name(self) -> str:
        self.next_name += 1
        return f"gw-{self.next_name}"


class Cut(Exception):
    """The controller went away under a request."""


class Traffic:
    """CLIENTS concurrent clients against one start of the controller."""

    def __init__(self, url: str, data_dir: Path, ledger: Ledger) -> None:
        self.url = url
        self.ledger = ledger
        self.admin = {"Authorization": f"Bearer {admin_token_in(data_dir)}"}
        self.tls = ssl.create_default_context(cafile=str(data_dir / "ca" / "ca.pem"))
        self.in_flight = 0
        self.stopped = False

    async def post(self, session: aiohttp.ClientSession, path: str, body: dict, admin: bool = False) -> dict:
        """One request; its JSON answer, Cut when the controller is gone, AssertionError on a refusal."""
        if self.stopped:
            raise Cut()
        self.in_flight += 1
        try:
            async with session.post(self.url + path, json=body, headers=self.admin if admin else {}) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            raise Cut() from None
        finally:
            self.in_flight -= 1
        assert status in (200, 201), f"{path} answered {status}: {answer}"
        return answer

    async def client(self, session: aiohttp.ClientSession) -> None:
        while not self.stopped:
            name = self.ledger.new_name()
            try:
                token = (await self.post(session, "/api/v1/identities", {"name": name}, admin=True))["token"]
            except Cut:
                return  # the identity may or may not exist: nobody was told it does
            self.ledger.tokens[name] = token
            await self.redeem_and_renew(session, name, token, ec.generate_private_key(ec.SECP256R1()))

    async def redeem_and_renew(self, session: aiohttp.ClientSession, name: str, token: str,
                               key: ec.EllipticCurvePrivateKey) -> None:
        try:
            answer = await self.post(session, "/v1/enroll", {"token": token, "csr": make_csr(key, name)})
        except Cut:
            self.ledger.unanswered_redemptions.append((name, token, key))
            return
        self.ledger.enrolled[name] = Enrolled(token_jti(token), public_key_sha256(key.public_key()),
                                              [serial_of(answer)])
        await self.renew(session, name, key)

    async def renew(self, session: aiohttp.ClientSession, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        try:
            answer = await self.post(session, "/v1/renew", {"csr": make_csr(key, name)})
        except Cut:
            self.ledger.unanswered_renewals.append((name, key))
            return
        self.ledger.enrolled[name].serials.append(serial_of(answer))

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls),
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))

    async def run_until_killed(self, controller: Process, delay: float) -> bool:
        """Clients run; SIGKILL after ``delay``; True when requests were in flight at the kill."""
        async with self.session() as session:
            clients = [asyncio.ensure_future(self.client(session)) for _ in range(CLIENTS)]
            await asyncio.sleep(delay)
            in_flight = self.in_flight > 0
            controller.proc.send_signal(signal.SIGKILL)
            self.stopped = True
            await asyncio.gather(*clients)
        controller.proc.wait(REQUEST_TIMEOUT)
        controller.stop()
        return in_flight

    async def retry_unanswered(self) -> list[str]:
        """Every cut-off request again, with the same token and key; faults when one is refused."""
        redemptions, self.ledger.unanswered_redemptions = self.ledger.unanswered_redemptions, []
        renewals, self.ledger.unanswered_renewals = self.ledger.unanswered_renewals, []
        faults = []
        async with self.session() as session:
            for name, token, key in redemptions:
                try:
                    await self.redeem_and_renew(session, name, token, key)
                except AssertionError as refused:
                    faults.append(f"{name}: redeeming again after a cut-off redemption was refused: {refused}")
            for name, key in renewals:
                try:
                    await self.renew(session, name, key)
                except AssertionError as refused:
                    faults.append(f"{name}: renewing again after a cut-off renewal was refused: {refused}")
        if self.ledger.unanswered_redemptions or self.ledger.unanswered_renewals:
            faults.append("a retry was cut off although the controller was not killed")
        return faults


def serial_of(answer: dict) -> str:
    return format(x509.load_pem_x509_certificate(answer["certificate"].encode()).serial_number, "x")


def ledger_faults(store: ControllerStore, ledger: Ledger) -> list[str]:
    """What the store lost of what the controller answered."""
    faults = []
    integrity = store.integrity()
    if integrity != "ok":
        faults.append(f"the store fails its integrity check: {integrity}")
    identities = {row["name"]: row for row in store.all("identities")}
    tokens = {row["jti"]: row for row in store.all("tokens")}
    certificates = {row["serial"]: row for row in store.all("certificates")}
    for name, token in ledger.tokens.items():
        if name not in identities or token_jti(token) not in tokens:
            faults.append(f"{name}: its creation was answered, but the identity or its token is gone")
    for name, enrolled in ledger.enrolled.items():
        token, identity = tokens.get(enrolled.jti), identities.get(name)
        if token is None or token["used_at"] is None or token["used_key_sha256"] != enrolled.key_sha256:
            faults.append(f"{name}: its token returned a certificate but is not consumed for that key")
        if identity is None or identity["status"] != "enrolled" or identity["key_sha256"] != enrolled.key_sha256:
            faults.append(f"{name}: told it is enrolled, but the store does not hold it enrolled with its key")
        for serial in enrolled.serials:
            if serial not in certificates or certificates[serial]["key_sha256"] != enrolled.key_sha256:
                faults.append(f"{name}: certificate {serial} was returned but is not recorded")
    return faults


def ca_files(data_dir: Path) -> tuple[bytes, bytes]:
    return (data_dir / "ca" / "ca.pem").read_bytes(), (data_dir / "ca" / "ca.key").read_bytes()


def kill_loop(data: Path, wanted: int, rng: random.Random, tally: Tally) -> None:
    """Start, check, drive traffic, kill: until ``wanted`` kills with requests in flight."""
    ledger = Ledger()
    starts: list[float] = []
    first = Controller(data)
    first.process.stop()
    ca = ca_files(data)
    store = ControllerStore(data / "store.sqlite3")
    for _ in range(wanted * MAX_STARTS_PER_KILL):
        if tally.kills >= wanted or tally.faults:
            break
        tally.iterations += 1
        if starts and rng.random() < STARTUP_KILL_SHARE:
            process = Process(controller_argv(data))
            time.sleep(rng.uniform(0.0, statistics.median(starts)))
            process.proc.send_signal(signal.SIGKILL)
            process.stop()
            tally.count("kills in start-up")
            continue
        started = time.monotonic()
        controller = Controller(data)  # the store opens and the CA loads, or this raises
        starts.append(time.monotonic() - started)
        if ca_files(data) != ca:
            tally.faults.append(f"{data.name}: the CA certificate or key changed")
        traffic = Traffic(controller.url, data, ledger)
        # Retrying first only adds to the ledger: one look at the store covers both.
        tally.faults += asyncio.run(traffic.retry_unanswered())
        tally.faults += ledger_faults(store, ledger)
        in_flight = asyncio.run(traffic.run_until_killed(controller.process, rng.uniform(0.0, TRAFFIC_SECONDS)))
        tally.kills += in_flight
        tally.count("kills with requests in flight" if in_flight else "kills between requests")

    last = Controller(data)
    try:
        tally.faults += asyncio.run(Traffic(last.url, data, ledger).retry_unanswered())
        tally.faults += ledger_faults(store, ledger)
    finally:
        last.process.stop()
    if ca_files(data) != ca:
        tally.faults.append(f"{data.name}: the CA certificate or key changed")
    tally.outcomes["identities answered"] = len(ledger.tokens)
    tally.outcomes["certificates answered"] = sum(len(e.serials) for e in ledger.enrolled.values())
    tally.outcomes[f"median start ms, {data.name}"] = round(1000 * statistics.median(starts))


@pytest.mark.parametrize("kills", kill_counts(QUICK_KILLS))
def test_a_controller_killed_while_issuing_loses_no_identity_token_or_certificate_it_answered_for(
        tmp_path: Path, kills: int) -> None:
    # One controller and data directory per worker: a start takes a core for a third of a second.
    def loop(worker: int, wanted: int, rng: random.Random, tally: Tally) -> None:
        kill_loop(tmp_path / f"controller-{worker}", wanted, rng, tally)

    tally = in_parallel(kills, crash_seed(), loop)
    print(tally.report())
    assert tally.faults == [], tally.report()
    assert tally.kills >= kills, tally.report()
