"""The network half of ``outpost-agent doctor``: DNS, the HTTPS proxy, TCP and TLS to the controller and
relays, and the clock against the controller's time or NTP (agent.doctor.checks runs them).

Every connection takes the agent's own proxy decision (agent.proxy) and its
pinned, trusted-time TLS check (agent.identity.pinned_tls), so what passes
here is the path the agent itself uses. Nothing is sent beyond one
``GET /v1/ca`` (the public CA certificate) per address, the time requests and
one NTP packet per server; every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from agent.clock.controller_time import fetch_controller_time
from agent.clock.ntp import query_servers
from agent.clock.settings import ClockSettings
from agent.clock.trusted import OffsetSample, TrustedClock, combine
from agent.doctor.result import FAIL, OK, SKIP, WARN, Check
from agent.durations import format_duration
from agent.enrollment.token import EnrollmentToken
from agent.errors import ClockError, OutpostError, ProxyFailed
from agent.identity.pinned_tls import (
    LOCAL_TIME,
    MAX_CA_RESPONSE,
    PinnedTLS,
    TimeSource,
    fetch_pinned_ca,
    proxy_failure,
)
from agent.identity.state import EnrolledIdentity
from agent.identity.tls_trust import describe_network_error
from agent.proxy import DIRECT, PROXY_VARIABLES, ProxySettings

#: A resolver slower than this makes every reconnect slow; report it as failing.
DNS_TIMEOUT = 5.0
#: TCP and TLS handshakes take a few round trips: seconds even over satellite.
CONNECT_TIMEOUT = 10.0
#: Clock offsets: NTP keeps a gateway well within the first; beyond the
#: second, tokens and certificates are judged wrongly (the enrollment's own
#: tolerance, agent.enrollment.field.CLOCK_TOLERANCE, is the same).
CLOCK_WARN_SECONDS = 30.0
CLOCK_FAIL_SECONDS = 300.0
DEFAULT_HTTPS_PORT = 443


@dataclass(frozen=True)
class Endpoint:
    """A host and port the gateway must reach, and what it is to the agent."""

    host: str
    port: int
    role: str

    @property
    def url(self) -> str:
        """The address as the agent's requests name it (what the proxy decision is made on)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def clock_verdict(offset: float, reference: str = "the controller's") -> tuple[str, str]:
    """Status and sentence for a local clock ``offset`` seconds behind (+) or ahead (-) of ``reference``."""
    side = "behind" if offset > 0 else "ahead of"
    found = f"this gateway's clock is {format_duration(offset)} {side} {reference}"
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
                        clock: ClockSettings = ClockSettings(),
                        proxy: ProxySettings = DIRECT) -> tuple[list[Check], TrustedClock]:
    """DNS, the proxy, TCP and TLS to every address, and the clock; with the trusted time measured on the way."""
    trusted = TrustedClock()
    targets = endpoints(identity, token)
    if not targets:
        return [Check("network", SKIP, "no controller to check until enrolled or a token file is in place"),
                await check_clock(None, clock)], trusted
    checks: list[Check] = []
    resolved: dict[str, bool] = {}
    for target in targets:
        if target.host not in resolved:
            check = await check_name(target, proxy)
            resolved[target.host] = check.status in (OK, SKIP)
            checks.append(check)
    refusals: list[ProxyFailed] = []
    ca_pem = identity.ca_pem if identity is not None else None
    if ca_pem is None and token is not None and resolved.get(targets[0].host):
        try:
            ca_cert = await fetch_pinned_ca(token.controller_url, token.ca, proxy)
        except OutpostError as error:
            checks.append(Check("pinned CA", FAIL, str(error)))
            if isinstance(error, ProxyFailed):
                refusals.append(error)
        else:
            from cryptography.hazmat.primitives import serialization

            ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
            checks.append(Check("pinned CA", OK, f"the controller's CA matches the token's fingerprint {token.ca[:19]}…"))
    controller = identity.controller_url if identity is not None else token.controller_url if token else None
    # The agent judges certificates by the controller's time, so the doctor does too (and says how far off the clock is).
    measured = (await measure_controller_time(controller, ca_pem, proxy)
                if controller and ca_pem and resolved.get(targets[0].host) else None)
    if isinstance(measured, OffsetSample):
        trusted.adopt(combine(None, measured))
    elif isinstance(measured, ProxyFailed):
        refusals.append(measured)
    connections: list[Check] = []
    for target in targets:
        if not resolved[target.host]:
            connections.append(Check(f"{target.host}:{target.port}", SKIP,
                                     f"the {target.role} cannot be reached without DNS"))
        elif ca_pem is None:
            connections.append(Check(f"{target.host}:{target.port}", SKIP, "no pinned CA to check TLS with"))
        else:
            outcome = await probe_tls(target, ca_pem, trusted, proxy)
            if isinstance(outcome, ProxyFailed):
                refusals.append(outcome)
                outcome = Check(f"{target.host}:{target.port}", SKIP,
                                "not checked: the proxy did not carry the connection (see the proxy check)")
            connections.append(outcome)
    checks.extend(check_proxy(targets, proxy, refusals))
    checks.extend(connections)
    checks.append(await check_clock(measured, clock))
    return checks, trusted


async def check_name(target: Endpoint, proxy: ProxySettings) -> Check:
    """DNS for ``target``, unless the proxy carries it: then the proxy resolves the name, not this gateway."""
    route = proxy.route(target.url)
    if route is not None and not _is_address(target.host):
        return Check(f"dns {target.host}", SKIP, f"{target.host} is reached through the proxy {route.url}, "
                                                 "which resolves the name itself")
    return await check_dns(target.host)


def check_proxy(targets: list[Endpoint], proxy: ProxySettings, refusals: list[ProxyFailed]) -> list[Check]:
    """One line for the proxy, when it carries any target: whether it did, and where it was set."""
    carried = [t for t in targets if proxy.route(t.url) is not None]
    if not carried:
        return []
    route = proxy.route(carried[0].url)
    assert route is not None
    name = f"proxy {urlsplit(route.url).netloc}"
    if refusals:
        return [Check(name, FAIL, str(refusals[0]))]
    where = ", ".join(f"{t.host}:{t.port}" for t in carried)
    sentence = f"the proxy {route.url} (set in {route.source}) carries the connections to {where}"
    if route.source in PROXY_VARIABLES:
        sentence += (f"; {route.source} is this shell's: outpost-agent under systemd sees it only if its unit sets it, "
                     "so set [link] proxy in the config file for the service")
    return [Check(name, OK, sentence)]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def check_dns(host: str) -> Check:
    name = f"dns {host}"
    if _is_address(host):
        return Check(name, OK, f"{host} is an IP address; no DNS needed")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), DNS_TIMEOUT)
    except TimeoutError:
        return Check(name, FAIL, f"resolving {host} took over {DNS_TIMEOUT:.0f} s; check the DNS server this gateway "
                                 "uses (/etc/resolv.conf, DHCP) and that outbound DNS (port 53) is open")
    except OSError as error:
        return Check(name, FAIL, f"{host} does not resolve ({_gai_reason(error)}); check the DNS server this gateway "
                                 "uses (/etc/resolv.conf, DHCP) and the spelling of the name")
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check(name, OK, f"{host} resolves to {', '.join(addresses[:4])}")


async def check_tls(target: Endpoint, ca_pem: str, trusted: TimeSource = LOCAL_TIME,
                    proxy: ProxySettings = DIRECT) -> Check:
    """``probe_tls`` as one line, a proxy's refusal included."""
    outcome = await probe_tls(target, ca_pem, trusted, proxy)
    return Check(f"{target.host}:{target.port}", FAIL, str(outcome)) if isinstance(outcome, ProxyFailed) else outcome


async def probe_tls(target: Endpoint, ca_pem: str, trusted: TimeSource = LOCAL_TIME,
                    proxy: ProxySettings = DIRECT) -> Check | ProxyFailed:
    """TCP (through the proxy where the agent's would go), TLS that must chain to the pinned CA (dates by
    ``trusted``) and one small request; ProxyFailed when the proxy could not be reached or refused."""
    name = f"{target.host}:{target.port}"
    where = f"the {target.role} at {name}"
    url = target.url + "/v1/ca"
    route = proxy.route(url)
    via = f" through the proxy {route.url}" if route else f" directly ({target.host} is in no_proxy)" if proxy.url else ""
    firewall = (f"ask whoever runs the proxy {route.url} whether it can reach {name}" if route else
                f"allow outbound TCP port {target.port} to {target.host} in the site's firewall")
    tls = PinnedTLS(ca_pem, trusted, proxy)
    try:
        async with tls.session(CONNECT_TIMEOUT) as http:
            await tls.fetch(http, "GET", url, MAX_CA_RESPONSE, where)
    except OutpostError as error:  # the certificate, judged by trusted time
        return Check(name, FAIL, str(error))
    except (TimeoutError, aiohttp.ClientError, OSError) as error:
        failure = proxy_failure(error, route, where)
        if failure is not None:
            return failure
        if isinstance(error, aiohttp.ClientConnectorCertificateError):
            return Check(name, FAIL, f"{where} presents a certificate not issued by the pinned CA; a TLS-inspecting "
                                     f"proxy or firewall is in between: exempt {target.host} from inspection")
        if isinstance(error, asyncio.TimeoutError):
            return Check(name, FAIL, f"no answer from {where}{via} within {CONNECT_TIMEOUT:.0f} s; {firewall}")
        return Check(name, FAIL, f"cannot connect to {where}{via} ({describe_network_error(error)}); {firewall}")
    return Check(name, OK, f"outbound TCP and TLS to {where} work{via}, and its certificate chains to the pinned CA")


async def measure_controller_time(controller_url: str, ca_pem: str,
                                  proxy: ProxySettings = DIRECT) -> OffsetSample | OutpostError:
    """The controller's time over the pinned channel (agent.clock.controller_time), or why not."""
    try:
        return await fetch_controller_time(controller_url, ca_pem, proxy=proxy)
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
