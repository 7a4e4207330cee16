"""A gateway whose device key lives in a (software) TPM, end to end.

swtpm runs in socket mode with no resource manager, as the harshest stand-in
for a real chip: enrollment signs its CSR inside it, every tunnel login signs
the relay's challenge inside it, renewal signs its CSR inside it, and nothing
private is ever on disk. swtpm logs every command it receives, so the tests
count what reached the chip: a lost key or a refused authorization is asked
once, never in a loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import EXIT_IDENTITY_LOST, EXIT_TPM_AUTH_REFUSED
from tests.agent.identity.swtpm_harness import (
    CC_CREATE_PRIMARY,
    CC_LOAD,
    CC_SIGN,
    SWTPM,
    Swtpm,
    closed_port,
    counted_swtpm,  # noqa: F401  (a fixture)
    started_swtpm,
)
from tests.e2e.harness import (
    Controller,
    EchoServer,
    Process,
    free_port,
    python_env,
    read_status,
    round_trip,
    wait_until,
)

pytestmark = pytest.mark.skipif(SWTPM is None, reason="swtpm is not installed (scripts/setup installs it)")
tss = pytest.importorskip("agent.identity.tss", reason="the TPM backend needs tpm2-pytss")

from agent.identity.tpm_errors import LOST_SENTENCE  # noqa: E402

# How long a refused start may take: one TPM round trip and a clear exit, no retry loop.
PROMPT_EXIT = 15.0
# From the controller's restart to the agent's exit: the controller starts in a
# few seconds, the agent's reconnect waits at most RECONNECT_MAX, one TLS login.
LOST_WHILE_RUNNING_EXIT = 45.0
# The agent's reconnect waits in these tests: short, so that an agent that
# retried a lost key would hammer the TPM many times within the test.
RECONNECT_INITIAL = 0.2
RECONNECT_MAX = 1.0
# Marks of the TPM library in a process's memory map: the tpm2-pytss extension
# module and the TSS libraries it links.
TPM_LIBRARY_MARKS = ("tpm2_pytss", "libtss2")
# The sentence a refused TPM authorization ends with: what to do about it.
AUTH_SENTENCE_END = "it does not retry, as wrong passwords count toward the TPM's lockout"


def agent_config(path: Path, state: Path, tcti: str, echo_port: int, backend: str = "tpm") -> Path:
    path.write_text(
        f'state_dir = "{state}"\n\n[keystore]\nbackend = "{backend}"\ntcti = "{tcti}"\n\n'
        f"[link]\nreconnect_initial = {RECONNECT_INITIAL}\nreconnect_max = {RECONNECT_MAX}\n\n"
        f'[[bind]]\nservice = "plc"\ntarget = "127.0.0.1:{echo_port}"\n'
    )
    return path


def agent_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, env=python_env())


def enrolled_gateway(controller: Controller, tmp_path: Path, name: str, tcti: str, echo_port: int,
                     backend: str = "tpm") -> tuple[Path, Path]:
    """A gateway enrolled through ``outpost-agent enroll``: its state directory and config file."""
    token = tmp_path / f"{name}.token"
    controller.ctl("identity", "create", name, "--token-out", str(token))
    state = tmp_path / f"{name}-state"
    config = agent_config(tmp_path / f"{name}.toml", state, tcti, echo_port, backend)
    enrolled = agent_cli("enroll", "--token", str(token), "--config", str(config))
    assert enrolled.returncode == 0, enrolled.stderr
    assert f"key in {backend}" in enrolled.stdout
    return state, config


def allow_plc(controller: Controller, *identities: str) -> None:
    controller.ctl("service", "create", "plc")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", ",".join(identities), "--services", "plc")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "role:operator", "--services", "plc")


def dial_plc(controller: Controller) -> None:
    """100 kB through the gateway's bound service and back, as an operator would."""
    port = free_port()
    connect = controller.ctl_process("connect", "plc", "--listen", f"127.0.0.1:{port}")
    try:
        connect.wait_for_line("listening")
        payload = os.urandom(100_000)
        assert round_trip(port, payload) == payload
    finally:
        connect.stop()


def restart_controller(controller: Controller) -> None:
    """Stop the controller (every tunnel drops) and start it again on the same address and data."""
    port = controller.url.rsplit(":", 1)[1].split("/")[0]
    controller.process.stop()
    controller.process = Process([sys.executable, "-m", "controller.cli", "serve", "--data", str(controller.data),
                                  "--listen", f"127.0.0.1:{port}"])
    controller.process.wait_for_line("ready on https://")


def loads_as_private_key(data: bytes) -> bool:
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            loader(data, password=None)
            return True
        except (ValueError, TypeError):
            continue
    return False


def assert_no_private_key(state: Path) -> None:
    files = sorted(p.name for p in state.iterdir())
    assert "key.tpm.json" in files and "key.pem" not in files
    assert not any(loads_as_private_key(p.read_bytes()) for p in state.iterdir() if p.is_file())


def mapped_files(pid: int) -> str:
    """The files mapped into a running process (its libraries and extension modules)."""
    return Path(f"/proc/{pid}/maps").read_text()


def state_files(state: Path) -> dict[str, bytes]:
    """What a failure must not change (status.json is the agent's live report, rewritten by design)."""
    return {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name != "status.json"}


def tpm_key(state: Path, tcti: str):  # type: ignore[no-untyped-def]
    from agent.identity.tpm import TpmKeyStore

    return TpmKeyStore(state, tcti)


def test_a_tpm_gateway_enrolls_tunnels_and_keeps_no_key_on_disk(controller: Controller, echo_server: EchoServer,
                                                              counted_swtpm: Swtpm, tmp_path: Path) -> None:
    allow_plc(controller, "gw-tpm")
    state, config = enrolled_gateway(controller, tmp_path, "gw-tpm", counted_swtpm.tcti, echo_server.port)
    assert_no_private_key(state)
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", what="TPM agent connected")
        dial_plc(controller)
        status = agent_cli("status", "--config", str(config))
        assert status.returncode == 0, status.stderr
        assert "key:         tpm" in status.stdout.splitlines()
        # The TPM library is really what signs here (the software backend's test below relies on this mark).
        assert any(mark in mapped_files(agent.proc.pid) for mark in TPM_LIBRARY_MARKS)
    finally:
        agent.stop()


def test_a_tpm_gateway_renews_with_its_tpm_key_and_tunnels_on_the_new_certificate(
        controller: Controller, echo_server: EchoServer, counted_swtpm: Swtpm, tmp_path: Path) -> None:
    allow_plc(controller, "gw-renew")
    state, config = enrolled_gateway(controller, tmp_path, "gw-renew", counted_swtpm.tcti, echo_server.port)
    enrolled_cert = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    signs_before = counted_swtpm.commands().count(CC_SIGN)

    renewed = agent_cli("renew", "--config", str(config))
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.startswith("certificate renewed; valid until ")
    assert counted_swtpm.commands().count(CC_SIGN) == signs_before + 1  # the renewal CSR was signed inside the TPM

    cert = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    assert cert.serial_number != enrolled_cert.serial_number
    ca = x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key = tpm_key(state, counted_swtpm.tcti)
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        key.public_key().public_bytes(serialization.Encoding.DER, spki)
    cert.public_key().verify(key.sign(b"proof of possession"), b"proof of possession", ec.ECDSA(hashes.SHA256()))
    assert_no_private_key(state)

    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", what="renewed TPM agent connected")
        dial_plc(controller)
    finally:
        agent.stop()
    assert x509.load_pem_x509_certificate((state / "cert.pem").read_bytes()).serial_number == cert.serial_number


def set_owner_password(chip: Swtpm) -> None:
    """Someone sets an owner password the agent does not know (a technician's provisioning script)."""
    esapi = chip.esapi()
    try:
        esapi.hierarchy_change_auth(tss.ESYS_TR.OWNER, b"set-by-someone-else")
    finally:
        esapi.close()


def damage_key_blob(chip: Swtpm, state: Path) -> None:
    path = state / "key.tpm.json"
    path.write_bytes(path.read_bytes()[:-40])


# What happens to the TPM or the key file, the exit code, the sentence the
# agent ends with, and how many CreatePrimary commands that costs the TPM.
LOSSES: dict[str, tuple[Callable[[Swtpm, Path], None], int, str, int]] = {
    "cleared": (lambda chip, state: chip.clear(), EXIT_IDENTITY_LOST, LOST_SENTENCE, 1),
    "replaced": (lambda chip, state: chip.replace(), EXIT_IDENTITY_LOST, LOST_SENTENCE, 1),
    "owner-password": (lambda chip, state: set_owner_password(chip), EXIT_TPM_AUTH_REFUSED, AUTH_SENTENCE_END, 1),
}
AT_START = {**LOSSES, "corrupt-key-blob": (damage_key_blob, EXIT_IDENTITY_LOST, LOST_SENTENCE, 0)}


def assert_ended_once(output: str, sentence: str) -> None:
    """The agent's last word is the one sentence, said once: no retry said it again."""
    said = [line for line in output.splitlines() if sentence in line]
    assert len(said) == 1, output
    assert said[0].startswith("outpost-agent: ") and said[0].endswith(sentence)


@pytest.mark.parametrize("loss", sorted(AT_START))
def test_a_lost_key_or_refused_authorization_at_start_ends_the_agent_with_its_own_exit_code(
        module_controller: Controller, counted_swtpm: Swtpm, tmp_path: Path, loss: str) -> None:
    damage, exit_code, sentence, create_primaries = AT_START[loss]
    state, config = enrolled_gateway(module_controller, tmp_path, f"gw-{loss}", counted_swtpm.tcti, free_port())
    damage(counted_swtpm, state)
    before = state_files(state)
    mark = len(counted_swtpm.commands())

    run = agent_cli("run", "--config", str(config), timeout=PROMPT_EXIT)
    assert run.returncode == exit_code, run.stderr
    assert_ended_once(run.stderr, sentence)
    asked = counted_swtpm.commands()[mark:]
    assert asked.count(CC_CREATE_PRIMARY) == create_primaries and CC_SIGN not in asked, [hex(c) for c in asked]
    assert state_files(state) == before


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_tpm_that_loses_the_key_while_the_agent_runs_ends_it_at_the_next_login_and_asks_no_more(
        controller: Controller, echo_server: EchoServer, counted_swtpm: Swtpm, tmp_path: Path, loss: str) -> None:
    damage, exit_code, sentence, create_primaries = LOSSES[loss]
    state, config = enrolled_gateway(controller, tmp_path, f"gw-run-{loss}", counted_swtpm.tcti, echo_server.port)
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", what="TPM agent connected")
        damage(counted_swtpm, state)
        before = state_files(state)
        mark = len(counted_swtpm.commands())
        restart_controller(controller)  # the tunnel drops; the next login needs a new signature
        started = time.monotonic()
        returncode = agent.proc.wait(LOST_WHILE_RUNNING_EXIT)
        took = time.monotonic() - started
    finally:
        agent.stop()
    assert returncode == exit_code, agent.output
    assert took < LOST_WHILE_RUNNING_EXIT
    assert_ended_once(agent.output, sentence)
    asked = counted_swtpm.commands()[mark:]
    assert asked.count(CC_CREATE_PRIMARY) == create_primaries, [hex(c) for c in asked]
    assert CC_LOAD not in asked and CC_SIGN not in asked, [hex(c) for c in asked]
    status = read_status(state)
    assert status["state"] == "stopped" and sentence in status["last_error"]
    assert state_files(state) == before


def test_a_tpm_in_lockout_keeps_the_agent_waiting_one_try_per_login_until_it_unlocks(
        controller: Controller, echo_server: EchoServer, counted_swtpm: Swtpm, tmp_path: Path) -> None:
    # Lockout reaches the agent only through a DA-protected storage key someone
    # provisioned at 0x81000001 (the agent's own keys are noDA).
    from agent.identity.tpm_objects import PERSISTENT_SRK_HANDLE, srk_template

    template = srk_template()
    template.publicArea.objectAttributes &= ~tss.TPMA_OBJECT.NODA
    esapi = counted_swtpm.esapi()
    try:
        handle, _, _, _, _ = esapi.create_primary(tss.TPM2B_SENSITIVE_CREATE(), template, tss.ESYS_TR.OWNER)
        esapi.evict_control(tss.ESYS_TR.OWNER, handle, PERSISTENT_SRK_HANDLE)
        esapi.flush_context(handle)
    finally:
        esapi.close()
    allow_plc(controller, "gw-locked")
    state, config = enrolled_gateway(controller, tmp_path, "gw-locked", counted_swtpm.tcti, echo_server.port)
    esapi = counted_swtpm.esapi()
    try:
        esapi.dictionary_attack_parameters(0, 1000, 1000)  # no tries left: lockout
        mark = len(counted_swtpm.commands())
        agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
        try:
            wait_until(lambda: agent.output.count("dictionary-attack lockout") >= 3, timeout=LOST_WHILE_RUNNING_EXIT,
                       what="three tries while locked out")
            assert agent.proc.poll() is None, agent.output  # still running: it waits, it does not exit
            tries = agent.output.count("dictionary-attack lockout")
            assert counted_swtpm.commands()[mark:].count(CC_LOAD) == tries  # one load per try, no busy loop
            esapi.dictionary_attack_parameters(3, 1000, 1000)
            esapi.dictionary_attack_lock_reset()
            wait_until(lambda: read_status(state).get("state") == "connected", timeout=LOST_WHILE_RUNNING_EXIT,
                       what="connected once the TPM unlocked")
            dial_plc(controller)
        finally:
            agent.stop()
    finally:
        esapi.close()


def test_an_unfinished_enrollment_whose_tpm_was_cleared_since_enrolls_with_a_new_key(
        module_controller: Controller, counted_swtpm: Swtpm, tmp_path: Path) -> None:
    token = tmp_path / "gw-retry.token"
    module_controller.ctl("identity", "create", "gw-retry", "--token-out", str(token))
    state = tmp_path / "gw-retry-state"
    state.mkdir(mode=0o700)
    tpm_key(state, counted_swtpm.tcti).create()  # an earlier attempt made the key, then the power went
    left = (state / "key.tpm.json").read_bytes()
    counted_swtpm.clear()
    config = agent_config(tmp_path / "gw-retry.toml", state, counted_swtpm.tcti, free_port())
    enrolled = agent_cli("enroll", "--token", str(token), "--config", str(config))
    assert enrolled.returncode == 0, enrolled.stderr
    assert (state / "key.tpm.json").read_bytes() != left
    key = tpm_key(state, counted_swtpm.tcti)
    cert = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    cert.public_key().verify(key.sign(b"the new key"), b"the new key", ec.ECDSA(hashes.SHA256()))


def remove_owner_password(chip: Swtpm) -> None:
    esapi = chip.esapi()
    try:
        esapi.tr_set_auth(tss.ESYS_TR.OWNER, b"set-by-someone-else")
        esapi.hierarchy_change_auth(tss.ESYS_TR.OWNER, b"")
    finally:
        esapi.close()


def test_field_enrollment_on_a_tpm_that_refuses_authorization_ends_the_agent_and_keeps_the_token_for_a_restart(
        module_controller: Controller, echo_server: EchoServer, counted_swtpm: Swtpm, tmp_path: Path) -> None:
    token = tmp_path / "boot" / "outpost-enroll.token"
    token.parent.mkdir()
    module_controller.ctl("identity", "create", "gw-field", "--token-out", str(token))
    state = tmp_path / "gw-field-state"
    config = agent_config(tmp_path / "gw-field.toml", state, counted_swtpm.tcti, echo_server.port)
    config.write_text(config.read_text() + f'\n[enrollment]\ntoken_paths = ["{token}"]\n')
    set_owner_password(counted_swtpm)

    refused = agent_cli("run", "--config", str(config), timeout=PROMPT_EXIT)
    assert refused.returncode == EXIT_TPM_AUTH_REFUSED, refused.stderr
    assert_ended_once(refused.stderr, AUTH_SENTENCE_END)
    assert token.exists() and not (state / "enroll-refused.json").exists()

    remove_owner_password(counted_swtpm)  # what the sentence asks for; then a restart
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", what="field-enrolled TPM agent connected")
    finally:
        agent.stop()
    assert_no_private_key(state)


def test_enroll_requiring_a_tpm_where_there_is_none_creates_nothing_and_keeps_the_token_usable(
        module_controller: Controller, tmp_path: Path) -> None:
    token = tmp_path / "gw-none.token"
    module_controller.ctl("identity", "create", "gw-none", "--token-out", str(token))
    token_text = token.read_text()
    state = tmp_path / "gw-none-state"
    absent = f"swtpm:host=127.0.0.1,port={closed_port()}"
    config = agent_config(tmp_path / "gw-none.toml", state, absent, free_port(), backend="auto")

    refused = agent_cli("enroll", "--token", str(token), "--config", str(config), "--keystore", "tpm")
    assert refused.returncode == 64, refused.stderr  # configuration: no TPM where the config requires one
    assert refused.stderr == (
        f'outpost-agent: no TPM found at {absent}; set keystore.backend = "software" or fix keystore.tcti\n'
    )
    assert not state.exists()
    assert token.read_text() == token_text
    # Nothing was consumed: the same token enrolls once the choice is fixed.
    software = agent_cli("enroll", "--token", str(token), "--config", str(config), "--keystore", "software")
    assert software.returncode == 0, software.stderr


@pytest.mark.parametrize("command", ["run", "enroll", "renew"])
def test_a_tcti_that_does_not_parse_is_one_line_at_config_load_and_creates_nothing(tmp_path: Path,
                                                                                   command: str) -> None:
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", state, "swtpm@127.0.0.1", free_port())
    extra = ["--token", str(tmp_path / "no.token")] if command == "enroll" else []
    result = agent_cli(command, "--config", str(config), *extra, timeout=PROMPT_EXIT)
    assert result.returncode == 64, result.stderr
    assert result.stderr == (
        f"outpost-agent: {config}: keystore.tcti 'swtpm@127.0.0.1' is not a TCTI string the agent understands; "
        "use for example 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'\n"
    )
    assert not state.exists()


def test_an_agent_running_with_the_software_key_never_loads_the_tpm_library(
        controller: Controller, echo_server: EchoServer, tmp_path: Path) -> None:
    allow_plc(controller, "gw-soft")
    # A TPM answers at the configured TCTI, so only the backend choice keeps the library out.
    chip = started_swtpm(tmp_path / "swtpm")
    try:
        state, config = enrolled_gateway(controller, tmp_path, "gw-soft", chip.tcti, echo_server.port,
                                         backend="software")
        agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
        try:
            wait_until(lambda: read_status(state).get("state") == "connected", what="software agent connected")
            dial_plc(controller)
            maps = mapped_files(agent.proc.pid)
        finally:
            agent.stop()
    finally:
        chip.stop()
    assert "libssl" in maps  # the map is the agent's own, with the libraries it loaded
    assert not [line for line in maps.splitlines() if any(mark in line for mark in TPM_LIBRARY_MARKS)]
