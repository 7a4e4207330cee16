"""``outpostctl policy create|list|update|delete``: who may dial or bind what, for how long.

Times and durations go to the controller as written (``--until
2026-12-31T18:00:00Z``, ``--for 8h``): it parses them, so a bad one is
refused in the same sentence whatever client sent it.
"""

from __future__ import annotations

import argparse
from typing import Any

from outpostctl import render
from outpostctl.client import ManagementClient


def _expiry_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(args, "until", None) is not None:
        fields["until"] = args.until
    if getattr(args, "lifetime", None) is not None:
        fields["for"] = args.lifetime
    if getattr(args, "no_expiry", False):
        fields["no_expiry"] = True
    return fields


def _ends(policy: dict[str, Any]) -> str:
    expires_at = policy.get("expires_at")
    if expires_at is None:
        return "never"
    return ("expired " if policy.get("expired") else "") + render.format_time_compact(expires_at)


def policy_create(args: argparse.Namespace, client: ManagementClient) -> int:
    body = {"kind": args.kind, "identities": args.identities, "services": args.services, "tenant": args.tenant,
            **_expiry_fields(args)}
    policy = client.request("POST", "/policies", body)
    if args.json:
        print(render.machine_json(policy))
    else:
        until = "" if policy.get("expires_at") is None else f", until {_ends(policy)}"
        print(f"created policy {policy.get('id', '')}: {','.join(args.identities)} may {args.kind} "
              f"{','.join(args.services)} (tenant {policy.get('tenant', args.tenant)}{until})")
    return 0


def policy_list(args: argparse.Namespace, client: ManagementClient) -> int:
    policies = client.list_policies()
    if args.json:
        print(render.machine_json({"policies": policies}))
    elif not policies:
        print("no policies yet: nothing may dial or bind anything (deny by default)")
    else:
        print(render.table(
            ["ID", "VERSION", "TENANT", "KIND", "IDENTITIES", "SERVICES", "EXPIRES", "DECISIONS", "LAST ALLOWED"],
            ([render.format_value(p.get("id")), render.format_value(p.get("version")),
              render.format_value(p.get("tenant")), render.format_value(p.get("kind")),
              render.format_value(p.get("identities")), render.format_value(p.get("services")), _ends(p),
              render.format_value(p.get("decisions")), render.format_time_compact(p.get("last_allowed_at")),
              ] for p in policies),
        ))
    return 0


def policy_update(args: argparse.Namespace, client: ManagementClient) -> int:
    body: dict[str, Any] = _expiry_fields(args)
    for key in ("kind", "identities", "services"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.expected_version is not None:
        body["expected_version"] = args.expected_version
    policy = client.request("PATCH", f"/policies/{args.id}", body)
    if args.json:
        print(render.machine_json(policy))
    else:
        print(f"updated policy {policy.get('id')} to version {policy.get('version')}: "
              f"{render.format_value(policy.get('identities'))} may {policy.get('kind')} "
              f"{render.format_value(policy.get('services'))}, expires {_ends(policy)}")
    return 0


def policy_delete(args: argparse.Namespace, client: ManagementClient) -> int:
    policy = client.request("DELETE", f"/policies/{args.id}")
    if args.json:
        print(render.machine_json(policy))
    else:
        print(f"deleted policy {policy.get('id')}; the connections only it allowed are closed")
    return 0


def add_commands(policy: Any, leaf: Any, selectors: Any, default_tenant: str) -> None:
    """``policy create|list|update|delete`` under the ``policy`` subparsers."""
    sub = leaf(policy, "create", policy_create, "allow identities to dial or bind services", json_flag=True)
    sub.add_argument("--kind", choices=["dial", "bind"], required=True)
    sub.add_argument("--identities", type=selectors, required=True, metavar="SEL[,SEL...]",
                     help="NAME, role:ROLE, TENANT/NAME or role:TENANT/ROLE")
    sub.add_argument("--services", type=selectors, required=True, metavar="SEL[,SEL...]",
                     help="NAME, role:ROLE, TENANT/NAME or role:TENANT/ROLE")
    sub.add_argument("--tenant", default=default_tenant, help=f"the policy's tenant (default {default_tenant})")
    _expiry_arguments(sub, update=False)
    leaf(policy, "list", policy_list, "list policies, their decisions and when each last allowed one",
         json_flag=True)
    sub = leaf(policy, "update", policy_update, "make a new version of policy ID (what is not given stays)",
               json_flag=True)
    sub.add_argument("id", metavar="ID", help="the policy's id (policy list)")
    sub.add_argument("--kind", choices=["dial", "bind"], default=None)
    sub.add_argument("--identities", type=selectors, default=None, metavar="SEL[,SEL...]")
    sub.add_argument("--services", type=selectors, default=None, metavar="SEL[,SEL...]")
    sub.add_argument("--expected-version", type=int, default=None, metavar="N",
                     help="refuse the update if someone else updated the policy since version N")
    _expiry_arguments(sub, update=True)
    sub = leaf(policy, "delete", policy_delete, "remove policy ID; the connections only it allowed are closed",
               json_flag=True)
    sub.add_argument("id", metavar="ID", help="the policy's id (policy list)")


def _expiry_arguments(sub: argparse.ArgumentParser, *, update: bool) -> None:
    ends = sub.add_mutually_exclusive_group()
    ends.add_argument("--until", default=None, metavar="TIME",
                      help="the policy ends at TIME (ISO 8601, e.g. 2026-12-31T18:00:00Z; UTC when no offset)")
    ends.add_argument("--for", dest="lifetime", default=None, metavar="DURATION",
                      help="the policy ends DURATION from now (30m, 8h, 7d)")
    if update:
        ends.add_argument("--no-expiry", action="store_true", help="the policy no longer ends")
