"""An agent killed with SIGKILL at any moment of enrollment or renewal never bricks its identity.

Real ``outpost-agent enroll`` and ``outpost-agent renew`` processes against a
real controller, each killed after a delay drawn uniformly over the time a
whole run takes (measured first, in the same run), so kills land in start-up,
key creation, the exchange with the controller and the writes alike. A run
of enroll is mostly interpreter start-up (the state directory appears after
about 85% of it), so every second enrollment kill is drawn from the part
after the state directory appears instead.

After every kill the state directory is judged as a starting agent finds it:

* enrolled, and the identity is usable (it loads, the certificate chains to
  the CA the token pinned, certifies the stored key, which signs a challenge
  that verifies; the controller holds that key as the identity's), or
* cleanly not enrolled, and enrolling again with the same token file works
  (the controller redeems a consumed token again for the same key).

After a kill during renewal the certificate stored is the old one or the new
one, and it works. Every tenth iteration a whole renewal proves the
controller still accepts the key; at the end a killed-and-recovered gateway
brings up a tunnel. The same runs with the key in a TPM (swtpm with no
resource manager, where a killed process's TPM objects are never flushed).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from agent.identity.select import KeyStoreSettings
from agent.identity.state import StateDir
from shared.trust import ca_fingerprint
from tests.agent.identity.swtpm_harness import SWTPM, Swtpm
from tests.e2e.crash_harness import (
    SOFTWARE_KEYS,
    ControllerStore,
    ManagementClient,
    Tally,
    agent_argv,
    crash_seed,
    identity_faults,
    in_parallel,
    kill_counts,
    last_line,
    run_agent,
    run_and_kill,
    stored_key_sha256,
    timed_runs,
    token_jti,
)
from tests.e2e.harness import Controller
from tests.e2e.test_walking_skeleton import start_agent

#: The quick suite's share: enough to cross every phase a few times in seconds.
QUICK_KILLS = 12
#: With the key in swtpm: one process at a time talks to it, and a run takes twice as long.
TPM_QUICK_KILLS = 4
TPM_STRESS_KILLS = 40
#: Whole runs timed before the kills, to spread the kill delays over one run.
MEASURED_RUNS = 3
#: Killed runs that exited first are not kills; the loop stops after this many
#: iterations per kill asked for, whatever happened.
MAX_ITERATIONS_PER_KILL = 3
#: Every this many iterations a whole renewal runs and must succeed.
FULL_RENEWAL_EVERY = 10
#: What a state directory may hold; anything else is debris a crash left.
STATE_FILES = frozenset({"key.pem", "key.tpm.json", "ca.pem", "cert.pem", "identity.json", "status.json",
                         "relays.json"})
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")

Loop = Callable[[int, int, random.Random, Tally], None]


@dataclass(frozen=True)
class Gateway:
    name: str
    token_file: Path
    state: Path
    config: Path
    jti: str


class Fleet:
    """Gateways of one controller: an identity and token file each, a config naming state and key store."""

    def __init__(self, controller: Controller, workdir: Path, keys: KeyStoreSettings) -> None:
        self.management = ManagementClient(controller.url, controller.data)
        self.store = ControllerStore(controller.data / "store.sqlite3")
        ca_pem = (controller.data / "ca" / "ca.pem").read_bytes()
        self.fingerprint = ca_fingerprint(x509.load_pem_x509_certificate(ca_pem))
        self.workdir = workdir
        self.keys = keys

    def new(self, name: str) -> Gateway:
        token = self.management.create_identity(name)
        gateway = Gateway(name, self.workdir / f"{name}.token", self.workdir / f"{name}-state",
                          self.workdir / f"{name}.toml", token_jti(token))
        gateway.token_file.write_text(token)
        gateway.config.write_text(f'state_dir = "{gateway.state}"\n\n[keystore]\nbackend = "{self.keys.backend}"\n'
                                  f'tcti = "{self.keys.tcti}"\n')
        return gateway

    def enrolled(self, name: str) -> Gateway:
        gateway = self.new(name)
        result = run_agent(*self.enroll_args(gateway))
        assert result.returncode == 0, result.stderr
        return gateway

    @staticmethod
    def enroll_args(gateway: Gateway) -> list[str]:
        return ["enroll", "--token", str(gateway.token_file), "--config", str(gateway.config)]

    @staticmethod
    def renew_args(gateway: Gateway) -> list[str]:
        return ["renew", "--config", str(gateway.config)]

    def faults(self, gateway: Gateway) -> list[str]:
        return identity_faults(gateway.state, self.fingerprint, self.keys)

    def renewal_faults(self, gateway: Gateway, where: str) -> list[str]:
        """A whole renewal must succeed and store a new certificate."""
        before = StateDir(gateway.state).load().certificate().serial_number
        renewed = run_agent(*self.renew_args(gateway))
        if renewed.returncode != 0:
            return [f"{where}: a whole renewal failed: {last_line(renewed.stderr)}"]
        if StateDir(gateway.state).load().certificate().serial_number == before:
            return [f"{where}: a whole renewal did not store a new certificate"]
        return []


def debris(state: Path, tally: Tally) -> list[str]:
    """Files a crash left that no agent would write; temporaries are counted, not faults."""
    if not state.is_dir():
        return []
    unknown = []
    for name in os.listdir(state):
        if TEMPORARY.match(name):
            tally.count("leftover temporaries")
        elif name not in STATE_FILES:
            unknown.append(name)
    return [f"{state.name}: unexpected file {name}" for name in unknown]


def enrollment_kills(fleet: Fleet) -> Loop:
    def loop(worker: int, wanted: int, rng: random.Random, tally: Tally) -> None:
        def measured_run(run: int) -> tuple[list[str], Path]:
            gateway = fleet.new(f"measure-{worker}-{run}")
            return agent_argv(*fleet.enroll_args(gateway)), gateway.state

        # Timed here, beside the other worker, so the delays match the load the kills see.
        timing = timed_runs(measured_run, MEASURED_RUNS)
        whole = timing.whole
        for iteration in range(wanted * MAX_ITERATIONS_PER_KILL):
            if tally.kills >= wanted:
                return
            gateway = fleet.new(f"gw-{worker}-{iteration}")
            # Half the kills anywhere in the run; half from the moment the state directory
            # appears (key, exchange, writes: the last few percent of a run that is mostly start-up).
            start = 0.0 if iteration % 2 == 0 else min(timing.appeared, whole)
            outcome = run_and_kill(agent_argv(*fleet.enroll_args(gateway)), rng.uniform(start, whole))
            whole = outcome.shortened(whole)
            tally.iterations += 1
            tally.kills += outcome.killed
            where = f"{gateway.name} (killed after {outcome.delay:.3f} s)"
            if outcome.failed_on_its_own:
                tally.faults.append(f"{where}: enroll failed by itself: {last_line(outcome.stderr)}")
                continue
            if StateDir(gateway.state).is_enrolled():
                tally.count("enrolled")
            else:
                tally.faults += recovery_faults(fleet, gateway, where, tally)
                if tally.faults:
                    continue
            tally.faults += [f"{where}: {fault}" for fault in fleet.faults(gateway)]
            held = fleet.store.identity(gateway.name)
            key = stored_key_sha256(gateway.state, fleet.keys)
            if held is None or held["status"] != "enrolled" or held["key_sha256"] != key:
                tally.faults.append(f"{where}: the controller does not hold the gateway's key as its identity's")
            tally.faults += debris(gateway.state, tally)
            if iteration % FULL_RENEWAL_EVERY == 0:
                tally.faults += fleet.renewal_faults(gateway, where)

    return loop


def recovery_faults(fleet: Fleet, gateway: Gateway, where: str, tally: Tally) -> list[str]:
    """Not enrolled after a kill: the token must still enroll this gateway."""
    redeemed = fleet.store.token(gateway.jti)
    key = stored_key_sha256(gateway.state, fleet.keys)
    faults = []
    if redeemed is not None and redeemed["used_at"] is not None:
        tally.count("not enrolled, token consumed by the controller")
        if redeemed["used_key_sha256"] != key:
            faults.append(f"{where}: the token was consumed for a key the gateway does not hold")
    else:
        tally.count("not enrolled, key kept" if key else "not enrolled, no key yet")
    again = run_agent(*fleet.enroll_args(gateway))
    if again.returncode != 0:
        faults.append(f"{where}: enrolling again with the same token failed: {last_line(again.stderr)}")
    return faults


def renewal_kills(fleet: Fleet, gateways: list[Gateway]) -> Loop:
    def loop(worker: int, wanted: int, rng: random.Random, tally: Tally) -> None:
        gateway = gateways[worker]
        argv = agent_argv(*fleet.renew_args(gateway))
        full_run = timed_runs(lambda run: (argv, gateway.state), MEASURED_RUNS).whole
        for iteration in range(wanted * MAX_ITERATIONS_PER_KILL):
            if tally.kills >= wanted:
                return
            before = StateDir(gateway.state).load().certificate().serial_number
            outcome = run_and_kill(argv, rng.uniform(0.0, full_run))
            full_run = outcome.shortened(full_run)
            tally.iterations += 1
            tally.kills += outcome.killed
            where = f"{gateway.name} iteration {iteration} (killed after {outcome.delay:.3f} s)"
            if outcome.failed_on_its_own:
                tally.faults.append(f"{where}: renew failed by itself: {last_line(outcome.stderr)}")
            faults = fleet.faults(gateway)
            tally.faults += [f"{where}: {fault}" for fault in faults]
            if faults:
                continue
            after = StateDir(gateway.state).load().certificate().serial_number
            tally.count("old certificate kept" if after == before else "new certificate stored")
            tally.faults += debris(gateway.state, tally)
            if iteration % FULL_RENEWAL_EVERY == 0:
                tally.faults += fleet.renewal_faults(gateway, where)

    return loop


def checked(tally: Tally, kills: int) -> Tally:
    print(tally.report())
    assert tally.faults == [], tally.report()
    assert tally.kills >= kills, tally.report()
    return tally


@pytest.mark.parametrize("kills", kill_counts(QUICK_KILLS))
def test_an_agent_killed_while_enrolling_is_enrolled_or_enrolls_again_with_the_same_token(
        controller: Controller, tmp_path: Path, kills: int) -> None:
    fleet = Fleet(controller, tmp_path, SOFTWARE_KEYS)

    checked(in_parallel(kills, crash_seed(), enrollment_kills(fleet)), kills)

    # A gateway that went through a kill brings up a tunnel with what it stored.
    start_agent(tmp_path, "gw-0-0", tmp_path / "gw-0-0-state").stop()


@pytest.mark.parametrize("kills", kill_counts(QUICK_KILLS))
def test_an_agent_killed_while_renewing_keeps_a_working_certificate_old_or_new(
        controller: Controller, tmp_path: Path, kills: int) -> None:
    fleet = Fleet(controller, tmp_path, SOFTWARE_KEYS)
    gateways = [fleet.enrolled(f"gw-{worker}") for worker in range(2)]

    checked(in_parallel(kills, crash_seed(), renewal_kills(fleet, gateways), workers=len(gateways)), kills)

    start_agent(tmp_path, "gw-0", gateways[0].state).stop()


@pytest.mark.skipif(SWTPM is None, reason="swtpm is not installed (scripts/setup installs it)")
@pytest.mark.parametrize("kills", [pytest.param(TPM_QUICK_KILLS, id="quick"),
                                   pytest.param(TPM_STRESS_KILLS, id="stress", marks=pytest.mark.slow)])
def test_a_tpm_gateway_killed_while_enrolling_or_renewing_keeps_a_usable_key(
        controller: Controller, tpm: Swtpm, tmp_path: Path, kills: int) -> None:
    fleet = Fleet(controller, tmp_path, KeyStoreSettings(backend="tpm", tcti=tpm.tcti))
    seed = crash_seed()

    checked(in_parallel(kills, seed, enrollment_kills(fleet), workers=1), kills)
    checked(in_parallel(kills, seed, renewal_kills(fleet, [fleet.enrolled("gw-renewing")]), workers=1), kills)
