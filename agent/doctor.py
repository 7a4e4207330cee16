"""``outpost-agent doctor``: what field technicians get wrong, each with how to fix it.

Checks, in order: the config file, the state directory, enrollment (identity
or token file), the key store (TPM), the certificate, DNS for the controller
and relays, outbound TCP and TLS to them with the pinned CA, and the clock
against the controller's ``GET /v1/time`` or, when the controller is out of
reach, against the configured NTP servers (``[clock] ntp_servers``), measured
by the agent's own code (agent.clock). Every check ends in one sentence; a
failed one says what to do. Network checks send nothing beyond the TLS
handshake, the time requests and one NTP packet per server, and every one of
them is bounded in time.

Like the CLI, this is an edge: it reads the config file, the state directory
and the token file itself.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.clock.controller_time import fetch_controller_time
from agent.clock.ntp import query_servers
from agent.clock.trusted import OffsetSample, TrustedClock, combine
from agent.config import AgentConfig, ClockSettings, load_config
from agent.enrollment.field import BOOT_TOKEN, ETC_TOKEN, find_token, load_refusals, token_paths
from agent.enrollment.token import EnrollmentToken, parse_unverified, read_token_file
from agent.errors import ClockError, OutpostError
from agent.identity.state import EnrolledIdentity, StateDir
from agent.identity.pinned_tls import LOCAL_TIME, PinnedTLS, TimeSource
from agent.identity.trust import cert_not_after, cert_not_before, describe_network_error, fetch_pinned_ca

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: A resolver slower than this makes every reconnect slow; report it as failing.
DNS_TIMEOUT = 5.0
#: TCP and TLS handshakes take a few round trips: seconds even over satellite.
CONNECT_TIMEOUT = 10.0
#: Clock offsets: NTP keeps a gateway well within the first; beyond the
#: second, tokens and certificates are judged wrongly (the enrollment's own
#: tolerance, agent.enrollment.field.CLOCK_TOLERANCE, is the same).
CLOCK_WARN_SECONDS = 30.0
CLOCK_FAIL_SECONDS = 300.0
#: The agent renews well before expiry (by about half the lifetime); with
#: less than this fraction left, renewal is not happening.
CERT_WARN_FRACTION = 0.25
DEFAULT_HTTPS_PORT = 443


@dataclass(frozen=True)
class Check:
    """One result line: ``status`` is ok, warn, fail or skip (not applicable)."""

    name: str
    status: str
    message: str


@dataclass(frozen=True)
class Endpoint:
    """A host and port the gateway must reach, and what it is to the agent."""

    host: str
    port: int
    role: str


def diagnose(config_path: Path) -> list[Check]:
    """Run every check against the config file at ``config_path``."""
    checks: list[Check] = []
    config_check, config = check_config(config_path)
    checks.append(config_check)
    checks.append(check_state_dir(config.state_dir))
    enrollment_check, identity, token = check_enrollment(config)
    checks.append(enrollment_check)
    checks.append(check_keystore(config, identity))
    checks.append(check_certificate(identity, time.time()))
    checks.extend(asyncio.run(check_network(identity, token, config.clock)))
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when nothing needs attention (every check ok or not applicable), else 1."""
    return 0 if all(c.status in (OK, SKIP) for c in checks) else 1


def format_text(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{c.status:<5} {c.name:<{width}}  {c.message}" for c in checks)


def format_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}, indent=2)


def check_config(path: Path) -> tuple[Check, AgentConfig]:
    try:
        return Check("config", OK, f"{path} is valid"), load_config(path)
    except OutpostError as error:
        return Check("config", FAIL, f"{error} (the checks below use the defaults)"), AgentConfig()


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
        tpm = None
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


def check_certificate(identity: EnrolledIdentity | None, now: float) -> Check:
    if identity is None:
        return Check("certificate", SKIP, "no certificate until enrolled")
    not_before = cert_not_before(identity.certificate()).timestamp()
    not_after = cert_not_after(identity.certificate()).timestamp()
    if now < not_before:
        return Check("certificate", FAIL, f"the certificate is valid only from {_utc(not_before)}, after this gateway's "
                                          f"clock ({_utc(now)}); set the clock and check NTP (see the clock check)")
    if now >= not_after:
        return Check("certificate", FAIL, f"the certificate expired on {_utc(not_after)}; the agent recovers it with "
                                          "its enrolled key once it reaches the controller, within the controller's "
                                          "grace period (30 days by default); past that (if the clock is right), ask "
                                          "central ops for a new token, stop outpost-agent, remove the state "
                                          "directory and place the token")
    if not_after - now < CERT_WARN_FRACTION * (not_after - not_before):
        return Check("certificate", WARN, f"the certificate expires on {_utc(not_after)}; the agent renews it while "
                                          "connected, so check the connection checks below")
    return Check("certificate", OK, f"the certificate is valid until {_utc(not_after)}")


def clock_verdict(offset: float, reference: str = "the controller's") -> tuple[str, str]:
    """Status and sentence for a local clock ``offset`` seconds behind (+) or ahead (-) of ``reference``."""
    side = "behind" if offset > 0 else "ahead of"
    found = f"this gateway's clock is {abs(offset):.1f} s {side} {reference}"
    if abs(offset) <= CLOCK_WARN_SECONDS:
        return OK, found
    if abs(offset) <= CLOCK_FAIL_SECONDS:
        return WARN, f"{found}; check that NTP works (systemd-timesyncd, outbound UDP port 123)"
    return FAIL, (f"{found}: the agent judges certificates and tokens by the measured time meanwhile, "
                  "but logs, and every other program here, read the wrong time; set the time "
                  "(timedatectl set-time) and make sure NTP can get out (outbound UDP port 123)")


def endpoints(identity: EnrolledIdentity | None, token: EnrollmentToken | None) -> list[Endpoint]:
    """The controller and relays, each host:port once (a relay often is the controller)."""
    urls: list[tuple[str, str]] = []
    if identity is not None:
        urls.append((identity.controller_url, "controller"))
        urls.extend((relay, "relay") for relay in identity.relays)
    elif token is not None:
        urls.append((token.controller_url, "controller"))
    found: dict[tuple[str, int], Endpoint] = {}
    for url, role in urls:
        parts = urlsplit(url)
        if not parts.hostname:
            continue
        key = (parts.hostname, parts.port or DEFAULT_HTTPS_PORT)
        if key in found:
            if role not in found[key].role:
                found[key] = Endpoint(key[0], key[1], f"{found[key].role} and {role}")
        else:
            found[key] = Endpoint(key[0], key[1], role)
    return list(found.values())


async def check_network(identity: EnrolledIdentity | None, token: EnrollmentToken | None,
                        clock: ClockSettings = ClockSettings()) -> list[Check]:
    targets = endpoints(identity, token)
    if not targets:
        return [Check("network", SKIP, "no controller to check until enrolled or a token file is in place"),
                await check_clock(None, clock)]
    checks: list[Check] = []
    resolved: dict[str, bool] = {}
    for target in targets:
        if target.host not in resolved:
            check = await check_dns(target.host)
            resolved[target.host] = check.status == OK
            checks.append(check)
    ca_pem = identity.ca_pem if identity is not None else None
    if ca_pem is None and token is not None and resolved.get(targets[0].host):
        try:
            ca_cert = await fetch_pinned_ca(token.controller_url, token.ca)
        except OutpostError as error:
            checks.append(Check("pinned CA", FAIL, str(error)))
        else:
            from cryptography.hazmat.primitives import serialization

            ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
            checks.append(Check("pinned CA", OK, f"the controller's CA matches the token's fingerprint {token.ca[:19]}…"))
    controller = identity.controller_url if identity is not None else token.controller_url if token else None
    # The agent judges certificates by the controller's time, so the doctor does too (and says how far off the clock is).
    asked = controller and ca_pem and resolved.get(targets[0].host)
    measured = await measure_controller_time(controller, ca_pem) if asked else None
    trusted = TrustedClock()
    if isinstance(measured, OffsetSample):
        trusted.adopt(combine(None, measured))
    for target in targets:
        if not resolved[target.host]:
            checks.append(Check(f"{target.host}:{target.port}", SKIP, f"the {target.role} cannot be reached without DNS"))
            continue
        if ca_pem is None:
            checks.append(Check(f"{target.host}:{target.port}", SKIP, "no pinned CA to check TLS with"))
            continue
        checks.append(await check_tls(target, ca_pem, trusted))
    checks.append(await check_clock(measured, clock))
    return checks


async def check_dns(host: str) -> Check:
    name = f"dns {host}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return Check(name, OK, f"{host} is an IP address; no DNS needed")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), DNS_TIMEOUT)
    except asyncio.TimeoutError:
        return Check(name, FAIL, f"resolving {host} took over {DNS_TIMEOUT:.0f} s; check the DNS server this gateway "
                                 "uses (/etc/resolv.conf, DHCP) and that outbound DNS (port 53) is open")
    except OSError as error:
        return Check(name, FAIL, f"{host} does not resolve ({_gai_reason(error)}); check the DNS server this gateway "
                                 "uses (/etc/resolv.conf, DHCP) and the spelling of the name")
    addresses = sorted({info[4][0] for info in infos})
    return Check(name, OK, f"{host} resolves to {', '.join(addresses[:4])}")


async def check_tls(target: Endpoint, ca_pem: str, trusted: TimeSource = LOCAL_TIME) -> Check:
    """Outbound TCP to the target, then a TLS handshake that must chain to the pinned CA (dates by ``trusted``)."""
    name = f"{target.host}:{target.port}"
    where = f"the {target.role} at {target.host}:{target.port}"
    tls = PinnedTLS(ca_pem, trusted)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=tls.context(), server_hostname=target.host),
            CONNECT_TIMEOUT,
        )
    except ssl.SSLCertVerificationError:
        return Check(name, FAIL, f"{where} presents a certificate not issued by the pinned CA; a TLS-inspecting "
                                 f"proxy or firewall is in between: exempt {target.host} from inspection")
    except asyncio.TimeoutError:
        return Check(name, FAIL, f"no answer from {where} within {CONNECT_TIMEOUT:.0f} s; allow outbound TCP port "
                                 f"{target.port} to {target.host} in the site's firewall")
    except (OSError, ssl.SSLError) as error:
        return Check(name, FAIL, f"cannot connect to {where} ({describe_network_error(error)}); allow outbound TCP "
                                 f"port {target.port} to {target.host} in the site's firewall")
    try:
        tls.check(writer.get_extra_info("ssl_object"), where)
    except OutpostError as error:
        return Check(name, FAIL, str(error))
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass  # the handshake is what was checked
    return Check(name, OK, f"outbound TCP and TLS to {where} work, and its certificate chains to the pinned CA")


async def measure_controller_time(controller_url: str, ca_pem: str) -> OffsetSample | OutpostError:
    """The controller's time over the pinned channel (agent.clock.controller_time), or why not."""
    try:
        return await fetch_controller_time(controller_url, ca_pem)
    except OutpostError as error:
        return error


async def check_clock(measured: OffsetSample | OutpostError | None, settings: ClockSettings) -> Check:
    """The clock against the controller's time (``measured``; None: out of reach), else against the
    configured NTP servers, both measured as the agent itself measures."""
    unasked = "could not ask the controller for the time (see the checks above)"
    if isinstance(measured, OffsetSample):
        return Check("clock", *clock_verdict(measured.offset))
    if isinstance(measured, ClockError):  # it answered, with a time its own certificates prove wrong
        return Check("clock", FAIL, str(measured))
    servers = settings.ntp_servers
    if not servers:
        return Check("clock", SKIP, f"{unasked}, and no NTP server is configured; set [clock] ntp_servers "
                                    "(for example [\"pool.ntp.org\"]) to check the clock without the controller")
    sample = await query_servers(servers, settings.ntp_timeout)
    if sample is None:
        return Check("clock", WARN, f"{unasked}, and no NTP server gave a usable answer ({', '.join(servers)}); the clock is "
                                    "unchecked: allow outbound UDP port 123 to them, or reach the controller")
    return Check("clock", *clock_verdict(sample.offset, f"NTP ({sample.origin})"))


def _gai_reason(error: OSError) -> str:
    text = error.strerror or str(error)
    return text[0].lower() + text[1:] if text else type(error).__name__


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main(config_path: Path, as_json: bool) -> int:
    """``outpost-agent doctor``: print every check, return the exit code."""
    checks = diagnose(config_path)
    print(format_json(checks) if as_json else format_text(checks))
    return exit_code(checks)


__all__ = ["Check", "diagnose", "exit_code", "main", "clock_verdict", "check_certificate", "check_tls", "endpoints"]
