"""``outpost-agent doctor``: what field technicians get wrong, each with how to fix it.

Checks, in order: the config file, the state directory, enrollment (identity
or token file), the key store (TPM), the certificate (judged by the
controller's time when it could be measured), DNS for the controller and
relays, the HTTPS proxy when one carries them, outbound TCP and TLS to them
with the pinned CA, and the clock against the controller's ``GET /v1/time``
or, when the controller is out of reach, against the configured NTP servers
(``[clock] ntp_servers``), measured by the agent's own code (agent.clock).
The network checks (agent.doctor.network) take the agent's own proxy
decision and TLS check, so the doctor sees the path the agent uses. Every
check ends in one sentence; a failed one says what to do.

Like the CLI, this is an edge: it reads the config file, the state directory
and the token file itself; the environment (HTTPS_PROXY) comes from the CLI.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from agent.config import AgentConfig, with_environment_proxy
from agent.config_file import load_config
from agent.doctor.network import (
    CLOCK_FAIL_SECONDS,
    CLOCK_WARN_SECONDS,
    Endpoint,
    check_dns,
    check_network,
    check_tls,
    clock_verdict,
    endpoints,
)
from agent.doctor.result import FAIL, OK, SKIP, WARN, Check
from agent.durations import format_relative
from agent.enrollment.field import BOOT_TOKEN, ETC_TOKEN, find_token, load_refusals, token_paths
from agent.enrollment.token import EnrollmentToken, parse_unverified, read_token_file
from agent.errors import OutpostError
from agent.identity.state import EnrolledIdentity, StateDir
from shared.trust import cert_not_after, cert_not_before
from shared.utc import format_utc as _utc

#: The agent renews well before expiry (by about half the lifetime); with
#: less than this fraction left, renewal is not happening.
CERT_WARN_FRACTION = 0.25
#: The controller's default recovery grace period (its --recovery-grace). A gateway cannot
#: know the setting of its controller, so the advice names the default and says so.
DEFAULT_RECOVERY_GRACE_DAYS = 30


def diagnose(config_path: Path, env: Mapping[str, str] | None = None) -> list[Check]:
    """Run every check against the config file at ``config_path``, with ``env``'s HTTPS_PROXY and NO_PROXY."""
    checks: list[Check] = []
    config_check, config = check_config(config_path, env or {})
    checks.append(config_check)
    checks.append(check_state_dir(config.state_dir))
    enrollment_check, identity, token = check_enrollment(config)
    checks.append(enrollment_check)
    checks.append(check_keystore(config, identity))
    network, trusted = asyncio.run(check_network(identity, token, config.clock, config.proxy))
    # Judged after the network checks: by the controller's time where they could measure it.
    checks.append(check_certificate(identity, trusted.now(), trusted.measured))
    checks.extend(network)
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when nothing needs attention (every check ok or not applicable), else 1."""
    return 0 if all(c.status in (OK, SKIP) for c in checks) else 1


def format_text(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{c.status:<5} {c.name:<{width}}  {c.message}" for c in checks)


def format_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}, indent=2)


def check_config(path: Path, env: Mapping[str, str]) -> tuple[Check, AgentConfig]:
    try:
        config = load_config(path)
    except OutpostError as error:
        return Check("config", FAIL, f"{error} (the checks below use the defaults)"), AgentConfig()
    try:
        return Check("config", OK, f"{path} is valid"), with_environment_proxy(config, env)
    except OutpostError as error:
        return Check("config", FAIL, f"{error} (the checks below go without that proxy)"), config


def check_state_dir(state_dir: Path) -> Check:
    if not state_dir.is_dir():
        return Check("state", FAIL, f"the state directory {state_dir} does not exist; reinstall outpost-agent, "
                                    "or create it owned by the agent's user with mode 0700")
    try:
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-"):
            pass
    except OSError as error:
        return Check("state", FAIL, f"the state directory {state_dir} is not writable by this user "
                                    f"({error.strerror or error}); run the doctor as the agent's user "
                                    f"(sudo -u outpost-agent) or give the directory back: chown outpost-agent: {state_dir}")
    return Check("state", OK, f"the state directory {state_dir} is writable")


def check_enrollment(config: AgentConfig) -> tuple[Check, EnrolledIdentity | None, EnrollmentToken | None]:
    state = StateDir(config.state_dir)
    if state.is_enrolled():
        try:
            identity = state.load()
        except OutpostError as error:
            return Check("enrollment", FAIL, str(error)), None, None
        return Check("enrollment", OK, f"enrolled as {identity.uri}"), identity, None
    found = find_token(token_paths(config))
    if found is None:
        return Check("enrollment", FAIL, f"not enrolled, and no token file in {', '.join(map(str, token_paths(config)))}; "
                                         f"copy the token file from central ops to {BOOT_TOKEN} or {ETC_TOKEN}"), None, None
    refused = load_refusals(config.state_dir).get(found.digest)
    if refused is not None:
        return Check("enrollment", FAIL, f"the token file {found.path} was refused: {refused}"), None, None
    try:
        token = parse_unverified(read_token_file(found.path))
    except OutpostError as error:
        return Check("enrollment", FAIL, f"the token file {found.path} is unusable: {error}"), None, None
    if token.exp <= time.time():
        return Check("enrollment", FAIL, f"the token file {found.path} expired on {_utc(token.exp)}; "
                                         "ask central ops for a new one (or fix this gateway's clock if that date is ahead)"), None, token
    return Check("enrollment", OK, f"not enrolled yet; token file found at {found.path} "
                                   f"for {token.sub}, the agent enrolls from it"), None, token


def check_keystore(config: AgentConfig, identity: EnrolledIdentity | None) -> Check:
    settings = config.keystore
    held = identity.key_backend if identity is not None else None
    if settings.backend == "software" or held == "software":
        return Check("key store", OK, "the device key is kept in software" +
                     (" (as enrolled)" if held == "software" else ", as configured"))
    try:
        from agent.identity import tpm
    except (ImportError, OSError):
        tpm = None  # type: ignore[assignment]  # the backend is optional
    if tpm is None:
        reason = "the tpm2-pytss library is not installed"
    else:
        reason = tpm.unusable_reason(settings.tcti)
    if reason is None:
        return Check("key store", OK, f"the TPM at {settings.tcti} answers and supports P-256")
    if held == "tpm" or settings.backend == "tpm":
        return Check("key store", FAIL, f"{reason}, but this gateway needs its TPM; "
                                        "enable the TPM (Debian: apt install python3-tpm2-pytss) or fix keystore.tcti")
    return Check("key store", WARN, f"{reason}, so the device key is kept in software; enable a TPM before enrolling "
                                    'for a hardware-held key, or set keystore.backend = "software" to accept that')


#: What a gateway past the grace period does, as the end of a sentence.
NEW_TOKEN_ADVICE = ("ask central ops for a new token, stop outpost-agent, remove the state directory and place "
                    "the token")


def check_certificate(identity: EnrolledIdentity | None, now: float, measured: bool = False) -> Check:
    """The stored certificate at ``now``: the controller's time when ``measured``, else this gateway's clock."""
    if identity is None:
        return Check("certificate", SKIP, "no certificate until enrolled")
    not_before = cert_not_before(identity.certificate()).timestamp()
    not_after = cert_not_after(identity.certificate()).timestamp()
    if now < not_before:
        if measured:
            return Check("certificate", FAIL, f"the certificate is valid only from {_utc(not_before)}, after the "
                                              f"controller's time ({_utc(now)}): the controller's clock was ahead when "
                                              "it issued it; ask central ops to check the controller's clock")
        return Check("certificate", FAIL, f"the certificate is valid only from {_utc(not_before)}, after this gateway's "
                                          f"clock ({_utc(now)}); set the clock and check NTP (see the clock check)")
    if now >= not_after:
        return Check("certificate", FAIL, _expired_advice(not_after, now, measured))
    if not_after - now < CERT_WARN_FRACTION * (not_after - not_before):
        return Check("certificate", WARN, f"the certificate expires on {_utc(not_after)} "
                                          f"({format_relative(not_after - now)}); the agent renews it while "
                                          "connected, so check the connection checks below")
    return Check("certificate", OK, f"the certificate is valid until {_utc(not_after)} ({format_relative(not_after - now)})")


def _expired_advice(not_after: float, now: float, measured: bool) -> str:
    """What an expired certificate means for this gateway: recovery within the grace period, else a new token."""
    grace_end = not_after + DEFAULT_RECOVERY_GRACE_DAYS * 86400
    grace = f"the controller's grace period ({DEFAULT_RECOVERY_GRACE_DAYS} days after expiry by default"
    if not measured:
        return (f"the certificate expired on {_utc(not_after)} by this gateway's clock ({_utc(now)}), which could not "
                "be checked against the controller; if the clock is right, the agent recovers it with its enrolled key "
                f"at its next start once it reaches the controller, within {grace}, until {_utc(grace_end)}); past "
                f"that, {NEW_TOKEN_ADVICE}; if the clock is wrong, set it (see the clock check)")
    if now < grace_end:
        return (f"the certificate expired on {_utc(not_after)} (by the controller's time); the agent recovers it with "
                "its enrolled key, no new token needed, at its next start (systemctl restart outpost-agent) or its "
                f"next renewal attempt, within {grace}, until {_utc(grace_end)}); past that, {NEW_TOKEN_ADVICE}")
    return (f"the certificate expired on {_utc(not_after)} (by the controller's time), more than "
            f"{DEFAULT_RECOVERY_GRACE_DAYS} days ago: past {grace}), so the controller refuses to recover it "
            f"unless it was given a longer --recovery-grace; {NEW_TOKEN_ADVICE}")


def main(config_path: Path, as_json: bool, env: Mapping[str, str] | None = None) -> int:
    """``outpost-agent doctor``: print every check, return the exit code."""
    checks = diagnose(config_path, env)
    print(format_json(checks) if as_json else format_text(checks))
    return exit_code(checks)


__all__ = ["CLOCK_FAIL_SECONDS", "CLOCK_WARN_SECONDS", "FAIL", "OK", "SKIP", "WARN", "Check", "Endpoint", "check_certificate",
           "check_dns", "check_tls", "clock_verdict", "diagnose", "endpoints", "exit_code", "main"]
