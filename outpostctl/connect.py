"""``outpostctl connect SERVICE --listen HOST:PORT``: a remote service as a local port.

The operator acts as an identity (``operator`` unless ``--as`` says another):
a key is made in memory, the controller issues a short-lived certificate for
it over the management API, and a tunnel opens like any agent's. Policies
apply to that identity exactly as to a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization

from agent.errors import ConfigError
from agent.identity.csr import build_csr
from agent.identity.ephemeral import EphemeralKeyStore
from agent.services.forward import DialListener
from agent.tunnel.client import TunnelCredentials, TunnelOptions
from agent.tunnel.supervisor import TunnelSupervisor, serve_agent
from outpostctl.client import ManagementClient
from outpostctl.commands import DEFAULT_TENANT, PROG, exists_in, tenants_holding
from outpostctl.config import CtlConfig
from outpostctl.errors import ApiError

#: A service name: one DNS label, as the controller's names are (controller.names).
SERVICE_LABEL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT; for example --listen 127.0.0.1:5020")
    return host.strip("[]"), int(port)


def check_service(client: ManagementClient, service: str, tenant: str = DEFAULT_TENANT) -> None:
    """Refuse a service the controller does not know, before anything listens or a certificate is issued.

    ``service`` is ``NAME`` (the dialing identity's tenant) or ``TENANT/NAME``,
    optionally aimed at one gateway: ``NAME@GATEWAY``.
    """
    target, mark, gateway = service.partition("@")
    target = re.sub(r":\d{1,5}$", "", target)  # SERVICE:PORT names one of the service's declared ports
    owner, _, name = target.rpartition("/")
    owner = owner or tenant
    if not (SERVICE_LABEL.fullmatch(owner) and SERVICE_LABEL.fullmatch(name)) or (
            mark and not SERVICE_LABEL.fullmatch(gateway)):
        raise ConfigError(f"{service!r} is not a service name; write NAME, TENANT/NAME or NAME@GATEWAY "
                          "(lowercase letters, digits and '-'), for example acme/scada or modbus@gw-0042")
    known = client.list_services(owner)
    if any(s.get("name") == name for s in known):
        return
    tenants = tenants_holding(name, owner, client.list_services())
    hint = f"; {exists_in(name, tenants)}: connect to it by its full name, TENANT/{name}" if tenants else (
        f"; see {PROG} service list, or create it with {PROG} service create {name}"
        + (f" --tenant {owner}" if owner != DEFAULT_TENANT else ""))
    raise ApiError(f"there is no service {owner}/{name}, so nothing would answer on the local port{hint}",
                   code="service_unknown", status=404)


def check_policy(client: ManagementClient, tenant: str, identity: str, service: str) -> None:
    """Refuse a dial no policy allows, before anything listens or a certificate is issued.

    The answer is the relay's own (``policy explain`` runs the function the
    relay decides with), asked for a session certificate as connect holds.
    """
    query = {"identity": f"{tenant}/{identity}", "service": service, "kind": "dial", "session": "true"}
    try:
        answer = client.request("GET", "/policies/explain?" + urlencode(query))
    except ApiError as error:
        # A missing identity is named better by the session request (it knows the other tenants); a
        # controller from before explain existed leaves the decision to its relay, as before.
        if error.code in ("identity_unknown", "not_found"):
            return
        raise
    decision = answer.get("decisions", {}).get("dial", {})
    if decision.get("allowed"):
        return
    reason = str(decision.get("reason") or "no policy allows this dial")
    hint = ""
    if decision.get("blocked") is None:
        owner, _, name = str(answer.get("service") or f"{tenant}/{service}").partition("/")
        who = identity if owner == tenant else f"{tenant}/{identity}"
        where = "" if owner == DEFAULT_TENANT else f"--tenant {owner} "
        hint = (f"; an admin opens it with: {PROG} policy create {where}--kind dial --identities {who} "
                f"--services {name}")
    raise ApiError(f"{reason}, so the local port would refuse every connection{hint}", code="dial_denied",
                   status=403)


def parse_identity(value: str) -> tuple[str, str]:
    """(tenant, name) of ``--as NAME`` or ``--as TENANT/NAME``."""
    tenant, _, name = value.rpartition("/")
    tenant = tenant or DEFAULT_TENANT
    if not (SERVICE_LABEL.fullmatch(tenant) and SERVICE_LABEL.fullmatch(name)):
        raise ConfigError(f"--as {value!r} is not an identity; write NAME or TENANT/NAME "
                          "(lowercase letters, digits and '-'), for example --as acme/ops")
    return tenant, name


def session_credentials(client: ManagementClient, identity: str,
                        tenant: str = DEFAULT_TENANT) -> tuple[TunnelCredentials, list[str]]:
    """A fresh in-memory key and a short-lived certificate for ``tenant/identity``."""
    keystore = EphemeralKeyStore()
    keystore.create()
    csr = build_csr(keystore, identity).public_bytes(serialization.Encoding.PEM).decode()
    try:
        issued = client.session_certificate(identity, csr, None if tenant == DEFAULT_TENANT else tenant)
    except ApiError as error:
        if error.code != "identity_unknown":
            raise
        tenants = tenants_holding(identity, tenant, client.list_identities())
        if not tenants:
            raise
        use = " or ".join(f"--as {t}/{identity}" for t in tenants)
        raise ApiError(f"{str(error).rstrip('.')}; {exists_in(identity, tenants)}: use {use}",
                       code=error.code, status=error.status) from None
    credentials = TunnelCredentials(uri=issued["identity"], chain_pem=[issued["certificate"]],
                                    ca_pem=issued["ca"], keystore=keystore)
    return credentials, list(issued["relays"])


async def serve(supervisor: TunnelSupervisor, dial: DialListener) -> None:
    """Listen once the tunnel is up, so the first local connection already has a path."""
    tunnel = asyncio.ensure_future(serve_agent(supervisor, []))
    connected = asyncio.ensure_future(supervisor.connected.wait())
    await asyncio.wait({tunnel, connected}, return_when=asyncio.FIRST_COMPLETED)
    connected.cancel()
    if tunnel.done():
        await tunnel
        return
    await dial.start()
    print(f"outpostctl: listening on {dial.host}:{dial.port} for {dial.service} "
          f"(as {supervisor.credentials.uri}); Ctrl-C to stop", flush=True)
    try:
        await tunnel
    finally:
        await dial.close()


def run(args: argparse.Namespace, config: CtlConfig) -> int:
    host, port = parse_listen(args.listen)
    tenant, name = parse_identity(args.as_identity)
    client = ManagementClient(config)
    check_service(client, args.service, tenant)
    check_policy(client, tenant, name, args.service)
    logging.basicConfig(level=logging.WARNING, format="outpostctl: %(message)s", stream=sys.stdout)
    credentials, relays = session_credentials(client, name, tenant)
    supervisor = TunnelSupervisor(relays, credentials, TunnelOptions())
    dial = DialListener(args.service, host, port, supervisor.current_session)
    try:
        asyncio.run(serve(supervisor, dial))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick a free port") from None
    return 0
