"""What each ``outpostctl`` command does with the management API, and what it prints.

Handlers take the parsed arguments and a client, print to stdout and return
the exit code; errors are raised as ``OutpostError`` for ``cli.main`` to print.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.durations import format_relative
from outpostctl import render
from outpostctl.client import JsonObject, ManagementClient
from outpostctl.errors import ApiError, OutpostError, TokenFileError
from outpostctl.tokenfile import check_token_target, write_token_file

PROG = "outpostctl"
#: The tenant a command means when it is given no --tenant (the controller's default).
DEFAULT_TENANT = "default"

Handler = Callable[[argparse.Namespace, ManagementClient], int]


def tenant_flag(tenant: object) -> str:
    """`` --tenant T`` to repeat a command for ``tenant``, or "" for the default tenant."""
    return f" --tenant {tenant}" if tenant not in (None, "", DEFAULT_TENANT) else ""


def tenants_holding(name: str, tenant: str, found: list[JsonObject]) -> list[str]:
    """The tenants other than ``tenant`` where ``found`` (identities or services) has one named ``name``."""
    return sorted({str(o.get("tenant")) for o in found if o.get("name") == name and o.get("tenant") != tenant})


def exists_in(name: str, tenants: list[str]) -> str:
    """``acme/gw-b1 exists`` or ``acme/gw-b1 and beta/gw-b1 exist``."""
    return " and ".join(f"{t}/{name}" for t in tenants) + (" exists" if len(tenants) == 1 else " exist")


def names_an_identity(handler: Handler) -> Handler:
    """A command naming one identity: when it is unknown in its tenant, say where that name does exist."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace, client: ManagementClient) -> int:
        try:
            return handler(args, client)
        except ApiError as error:
            if error.code != "identity_unknown":
                raise
            tenants = tenants_holding(args.name, args.tenant or DEFAULT_TENANT, client.list_identities())
            if not tenants:
                raise
            flag = " or ".join(f"--tenant {t}" for t in tenants)
            raise ApiError(f"{str(error).rstrip('.')}; {exists_in(args.name, tenants)}: add {flag}",
                           code=error.code, status=error.status) from None

    return wrapped


# -- identities ------------------------------------------------------------


def identity_create(args: argparse.Namespace, client: ManagementClient) -> int:
    # Checked first: a token the controller issued but we could not store would
    # leave an identity nobody can enroll.
    check_token_target(args.token_out, force=args.force)
    answer = client.create_identity(args.name, args.roles, args.tenant, args.ttl)
    identity = answer.get("identity", {})
    path = _store_token(args, answer)
    print(render.key_values([
        ("identity", str(identity.get("uri") or args.name)),
        ("tenant", str(identity.get("tenant") or args.tenant)),
        ("roles", render.format_value(identity.get("roles", args.roles))),
        ("token file", str(path)),
        ("token expires", _expiry(answer.get("token_expires"))),
    ]))
    print()
    print(_technician_note(args.name, path))
    return 0


@names_an_identity
def identity_token(args: argparse.Namespace, client: ManagementClient) -> int:
    check_token_target(args.token_out, force=args.force)
    answer = client.issue_token(args.name, args.ttl, args.tenant)
    path = _store_token(args, answer)
    print(render.key_values([
        ("identity", args.name),
        ("token file", str(path)),
        ("token expires", _expiry(answer.get("token_expires"))),
    ]))
    print()
    print(_technician_note(args.name, path))
    print(_replaces_note(args.name, answer.get("identity", {}).get("key_sha256")))
    return 0


def _replaces_note(name: str, current_key: Any) -> str:
    # One identity, one key: a new token retires the older ones, and its use retires the enrolled device.
    note = f"This token replaces every unused token issued earlier for {name}; those no longer enroll anything."
    if isinstance(current_key, str) and current_key:
        note += (
            f"\n{name} is enrolled now (key sha256 {current_key[:16]}...). Once this token is used, the key it\n"
            "enrolls is the identity's only key: the device enrolled now loses its tunnels within seconds\n"
            "and can no longer renew."
        )
    return note


def _store_token(args: argparse.Namespace, answer: JsonObject) -> Path:
    token = answer.get("token")
    if not isinstance(token, str) or not token:
        raise OutpostError("the controller answered without an enrollment token; see its log")
    tenant = tenant_flag(args.tenant)
    try:
        return write_token_file(args.token_out, token, force=args.force)
    except TokenFileError as error:
        raise TokenFileError(
            f"{error.message}. The controller issued the token but it was not saved; get a new one with "
            f"{PROG} identity token {args.name}{tenant} --token-out FILE"
        ) from None


def _expiry(unix_time: Any) -> str:
    if not isinstance(unix_time, (int, float)) or isinstance(unix_time, bool):
        return render.format_time(unix_time)
    remaining = unix_time - time.time()
    when = format_relative(remaining) if remaining > 0 else "already expired: check this machine's clock"
    return f"{render.format_time(unix_time)} ({when})"


def _technician_note(name: str, path: Path) -> str:
    return (
        f"Give {path.name} to the field technician for the gateway {name}. They copy it onto the\n"
        "gateway (a USB stick, or the boot partition of a Raspberry Pi's SD card) and run there\n"
        f"  outpost-agent enroll --token /path/to/{path.name}\n"
        "The token enrolls one gateway, once, before it expires; treat the file like a password until then."
    )


def identity_list(args: argparse.Namespace, client: ManagementClient) -> int:
    identities = client.list_identities(args.tenant)
    if args.json:
        print(render.machine_json({"identities": identities}))
    elif not identities:
        print(f"no identities yet; create one with: {PROG} identity create NAME --token-out FILE")
    else:
        print(render.table(
            ["NAME", "TENANT", "STATUS", "ROLES", "ENROLLED", "CERT EXPIRES"],
            ([str(i.get("name")), render.format_value(i.get("tenant")), render.format_value(i.get("status")),
              render.format_value(i.get("roles")), render.format_time(i.get("enrolled_at")),
              render.format_time(i.get("cert_not_after"))] for i in identities),
        ))
    return 0


@names_an_identity
def identity_show(args: argparse.Namespace, client: ManagementClient) -> int:
    _print_identity(client.get_identity(args.name, args.tenant), as_json=args.json)
    return 0


@names_an_identity
def identity_revoke(args: argparse.Namespace, client: ManagementClient) -> int:
    identity = client.revoke_identity(args.name, args.tenant)
    if args.json:
        print(render.machine_json(identity))
    else:
        print(f"revoked {identity.get('uri') or args.name}: its tunnels close and it can no longer enroll or renew")
    return 0


@names_an_identity
def identity_disable(args: argparse.Namespace, client: ManagementClient) -> int:
    identity = client.disable_identity(args.name, args.tenant)
    if args.json:
        print(render.machine_json(identity))
    else:
        tenant = tenant_flag(identity.get("tenant", args.tenant))
        print(f"disabled {identity.get('uri') or args.name}: its tunnels close and it cannot renew "
              f"until '{PROG} identity enable {args.name}{tenant}'")
    return 0


@names_an_identity
def identity_enable(args: argparse.Namespace, client: ManagementClient) -> int:
    identity = client.enable_identity(args.name, args.tenant)
    if args.json:
        print(render.machine_json(identity))
    else:
        print(f"enabled {identity.get('uri') or args.name}: status {identity.get('status')}")
    return 0


def _print_identity(identity: JsonObject, *, as_json: bool) -> None:
    if as_json:
        print(render.machine_json(identity))
        return
    times = {"created_at", "enrolled_at", "cert_not_after"}
    order = ["name", "tenant", "uri", "status", "roles", "created_at", "enrolled_at", "cert_not_after"]
    keys = order + sorted(k for k in identity if k not in order)
    print(render.key_values([
        (key.replace("_", " "), render.format_time(identity.get(key)) if key in times else render.format_value(identity.get(key)))
        for key in keys
    ]))


# -- services and policies -------------------------------------------------


def service_create(args: argparse.Namespace, client: ManagementClient) -> int:
    service = client.create_service(args.name, args.roles, args.tenant, getattr(args, "choose", "one"),
                                    getattr(args, "ports", None))
    if args.json:
        print(render.machine_json(service))
    else:
        print(f"created service {service.get('name', args.name)} in tenant {service.get('tenant', args.tenant)}; "
              f"let identities reach it with: {PROG} policy create --kind dial --identities SEL --services {args.name}")
    return 0


def service_list(args: argparse.Namespace, client: ManagementClient) -> int:
    services = client.list_services(args.tenant)
    if args.json:
        print(render.machine_json({"services": services}))
    elif not services:
        print(f"no services yet; create one with: {PROG} service create NAME")
    else:
        print(render.table(
            ["NAME", "TENANT", "ROLES"],
            ([str(s.get("name")), render.format_value(s.get("tenant")), render.format_value(s.get("roles"))] for s in services),
        ))
    return 0


# -- audit and status ------------------------------------------------------

#: Keys of an audit event that are not details: TIME and EVENT have columns,
#: ``fields`` is spread out as key=value, the row id means nothing to a reader.
_AUDIT_OWN_KEYS = {"time", "event", "fields", "id"}
#: Detail fields holding unix times, shown as UTC dates: these names, and every name ending in one of
#: _AUDIT_TIME_SUFFIXES (``previous_not_after``, ``expires_at``...).
_AUDIT_TIME_FIELDS = {"expires", "not_after", "not_before", "connected_since", "until", "since", "time"}
_AUDIT_TIME_SUFFIXES = ("_at", "_after", "_before", "_until", "_since", "_time", "_expires")


def audit_rows(events: list[JsonObject]) -> list[list[str]]:
    """The audit view's rows: the time in UTC, the event, then its details as sorted key=value pairs."""
    rows = []
    for event in events:
        fields = event.get("fields")
        details = dict(fields) if isinstance(fields, dict) else {}
        details.update((k, v) for k, v in event.items() if k not in _AUDIT_OWN_KEYS)
        rows.append([render.format_audit_time(event.get("time")), render.format_value(event.get("event")),
                     " ".join(f"{k}={_audit_detail(k, v)}" for k, v in sorted(details.items()))])
    return rows


def _audit_detail(key: str, value: Any) -> str:
    if key in _AUDIT_TIME_FIELDS or key.endswith(_AUDIT_TIME_SUFFIXES):
        if value == 0 and not isinstance(value, bool):
            return render.MISSING  # "none yet" (a first certificate's previous_not_after), not 1970
        return render.format_time_compact(value)
    return render.format_value(value)


def status(args: argparse.Namespace, client: ManagementClient) -> int:
    status = client.status()
    tunnels = status.get("tunnels", [])
    if args.json:
        print(render.machine_json(status))
    elif not tunnels:
        print(f"controller {client.url} is up; no gateway tunnels are connected")
    else:
        print(f"controller {client.url} is up; {len(tunnels)} tunnel(s) connected")
        print(render.table(
            ["IDENTITY", "FROM", "CONNECTED SINCE", "BYTES IN", "BYTES OUT", "BOUND"],
            ([_tunnel_identity(t), render.format_value(t.get("remote") or t.get("relay")),
              render.format_time(t.get("connected_since")), render.format_value(t.get("bytes_in")),
              render.format_value(t.get("bytes_out")), render.format_value(t.get("bound"))] for t in tunnels),
        ))
    return 0


def _tunnel_identity(tunnel: JsonObject) -> str:
    # tenant/name is what operators type; the URI is the fallback.
    if tunnel.get("tenant") and tunnel.get("name"):
        return f"{tunnel['tenant']}/{tunnel['name']}"
    return render.format_value(tunnel.get("identity"))


def whoami(args: argparse.Namespace, client: ManagementClient) -> int:
    """Who the controller takes this shell for: a person and their roles, or the admin credential."""
    me = client.request("GET", "/signin/whoami")
    if args.json:
        print(render.machine_json(me))
    elif me.get("kind") == "person":
        grants = ", ".join(me.get("grants") or []) or "no role"
        print(f"{me['identity']} ({grants}); session until {render.format_time(me.get('expires_at'))}")
    else:
        print("the admin credential (break-glass): every action is on record as the admin's")
    return 0
