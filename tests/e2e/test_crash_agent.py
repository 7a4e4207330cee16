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
brings up a tunnel.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from cryptography import x509

from agent.identity.state import StateDir
from agent.identity.trust import ca_fingerprint
from tests.e2e.crash_harness import (
    ControllerStore,
    WORKERS,
    ManagementClient,
    Tally,
    agent_argv,
    identity_faults,
    in_parallel,
    kill_counts,
    run_and_kill,
    run_agent,
    stored_key_sha256,
    timed_runs,
    token_jti,
    crash_seed,
)
from tests.e2e.harness import Controller
from tests.e2e.test_walking_skeleton import start_agent

#: The quick suite's share: enough to cross every phase a few times in seconds.
QUICK_KILLS = 12
#: Whole runs timed before the kills, to spread the kill delays over one run.
MEASURED_RUNS = 3
#: Killed runs that exited first are not kills; the loop stops after this many
#: iterations per kill asked for, whatever happened.
MAX_ITERATIONS_PER_KILL = 3
#: Every this many iterations a whole renewal runs and must succeed.
FULL_RENEWAL_EVERY = 10
#: What a state directory may hold; anything else is debris a crash left.
STATE_FILES = frozenset({"key.pem", "ca.pem", "cert.pem", "identity.json", "status.json", "relays.json"})
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


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


def ca_fingerprint_of(controller: Controller) -> str:
    return ca_fingerprint(x509.load_pem_x509_certificate((controller.data / "ca" / "ca.pem").read_bytes()))


@pytest.mark.parametrize("kills", kill_counts(QUICK_KILLS))
def test_an_agent_killed_while_enrolling_is_enrolled_or_enrolls_again_with_the_same_token(
        controller: Controller, tmp_path: Path, kills: int) -> None:
    management = ManagementClient(controller.url, controller.data)
    store = ControllerStore(controller.data / "store.sqlite3")
    fingerprint = ca_fingerprint_of(controller)

    def new_gateway(name: str) -> tuple[Path, Path, str]:
        token = management.create_identity(name)
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(token)
        return token_file, tmp_path / f"{name}-state", token_jti(token)

    def enroll_args(token_file: Path, state: Path) -> list[str]:
        return ["enroll", "--token", str(token_file), "--state", str(state), "--keystore", "software"]

    def loop(worker: int, wanted: int, rng: random.Random, tally: Tally) -> None:
        def measured_run(run: int) -> tuple[list[str], Path]:
            token_file, state, _ = new_gateway(f"measure-{worker}-{run}")
            return agent_argv(*enroll_args(token_file, state)), state

        # Timed here, beside the other worker, so the delays match the load the kills see.
        timing = timed_runs(measured_run, MEASURED_RUNS)
        for iteration in range(wanted * MAX_ITERATIONS_PER_KILL):
            if tally.kills >= wanted:
                return
            name = f"gw-{worker}-{iteration}"
            token_file, state, jti = new_gateway(name)
            # Half the kills anywhere in the run; half from the moment the state directory
            # appears (key, exchange, writes: the last few percent of a run that is mostly start-up).
            start = 0.0 if iteration % 2 == 0 else timing.appeared
            outcome = run_and_kill(agent_argv(*enroll_args(token_file, state)), rng.uniform(start, timing.whole))
            tally.iterations += 1
            tally.kills += outcome.killed
            where = f"{name} (killed after {outcome.delay:.3f} s)"
            if outcome.failed_on_its_own:
                tally.faults.append(f"{where}: enroll failed by itself ({outcome.returncode}): {outcome.stderr}")
                continue
            if StateDir(state).is_enrolled():
                tally.count("enrolled")
            else:
                redeemed = store.token(jti)
                key = stored_key_sha256(state)
                if redeemed is not None and redeemed["used_at"] is not None:
                    tally.count("not enrolled, token consumed by the controller")
                    if redeemed["used_key_sha256"] != key:
                        tally.faults.append(f"{where}: the token was consumed for a key the gateway does not hold")
                else:
                    tally.count("not enrolled, key kept" if key else "not enrolled, no key yet")
                again = run_agent(*enroll_args(token_file, state))
                if again.returncode != 0:
                    tally.faults.append(f"{where}: enrolling again with the same token failed: {again.stderr.strip()}")
                    continue
            tally.faults += [f"{where}: {fault}" for fault in identity_faults(state, fingerprint)]
            held = store.identity(name)
            if held is None or held["status"] != "enrolled" or held["key_sha256"] != stored_key_sha256(state):
                tally.faults.append(f"{where}: the controller does not hold the gateway's key as {name}'s")
            tally.faults += debris(state, tally)
            if iteration % FULL_RENEWAL_EVERY == 0:
                renewed = run_agent("renew", "--state", str(state))
                if renewed.returncode != 0:
                    tally.faults.append(f"{where}: renewal after recovery failed: {renewed.stderr.strip()}")

    tally = in_parallel(kills, crash_seed(), loop)
    print(tally.report())
    assert tally.faults == [], tally.report()
    assert tally.kills >= kills, tally.report()

    # A gateway that went through a kill brings up a tunnel with what it stored.
    agent = start_agent(tmp_path, "gw-0-0", tmp_path / "gw-0-0-state")
    agent.stop()


@pytest.mark.parametrize("kills", kill_counts(QUICK_KILLS))
def test_an_agent_killed_while_renewing_keeps_a_working_certificate_old_or_new(
        controller: Controller, tmp_path: Path, kills: int) -> None:
    management = ManagementClient(controller.url, controller.data)
    fingerprint = ca_fingerprint_of(controller)
    states = []
    for worker in range(WORKERS):
        token_file = tmp_path / f"gw-{worker}.token"
        token_file.write_text(management.create_identity(f"gw-{worker}"))
        states.append(tmp_path / f"gw-{worker}-state")
        enrolled = run_agent("enroll", "--token", str(token_file), "--state", str(states[-1]), "--keystore", "software")
        assert enrolled.returncode == 0, enrolled.stderr

    def loop(worker: int, wanted: int, rng: random.Random, tally: Tally) -> None:
        state = states[worker]
        full_run = timed_runs(lambda run: (agent_argv("renew", "--state", str(state)), state), MEASURED_RUNS).whole
        for iteration in range(wanted * MAX_ITERATIONS_PER_KILL):
            if tally.kills >= wanted:
                return
            before = StateDir(state).load().certificate().serial_number
            outcome = run_and_kill(agent_argv("renew", "--state", str(state)), rng.uniform(0.0, full_run))
            tally.iterations += 1
            tally.kills += outcome.killed
            where = f"gw-{worker} iteration {iteration} (killed after {outcome.delay:.3f} s)"
            if outcome.failed_on_its_own:
                tally.faults.append(f"{where}: renew failed by itself ({outcome.returncode}): {outcome.stderr}")
            faults = identity_faults(state, fingerprint)
            tally.faults += [f"{where}: {fault}" for fault in faults]
            if faults:
                continue
            after = StateDir(state).load().certificate().serial_number
            tally.count("old certificate kept" if after == before else "new certificate stored")
            tally.faults += debris(state, tally)
            if iteration % FULL_RENEWAL_EVERY == 0:
                renewed = run_agent("renew", "--state", str(state))
                if renewed.returncode != 0:
                    tally.faults.append(f"{where}: the next whole renewal failed: {renewed.stderr.strip()}")
                elif StateDir(state).load().certificate().serial_number == after:
                    tally.faults.append(f"{where}: a whole renewal did not store a new certificate")

    tally = in_parallel(kills, crash_seed(), loop)
    print(tally.report())
    assert tally.faults == [], tally.report()
    assert tally.kills >= kills, tally.report()

    agent = start_agent(tmp_path, "gw-0", states[0])
    agent.stop()
