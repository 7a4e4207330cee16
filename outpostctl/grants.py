"""``outpostctl grant request|list|approve|deny``: just-in-time access, asked for by a person, answered by another."""

from __future__ import annotations

import argparse
from typing import Any

from outpostctl import render
from outpostctl.client import ManagementClient


def grant_request(args: argparse.Namespace, client: ManagementClient) -> int:
    grant = client.request("POST", "/grants", {"service": args.service, "for": args.lifetime, "reason": args.reason})
    if args.json:
        print(render.machine_json(grant))
    else:
        print(f"requested grant {grant.get('id')} for {args.service} ({args.lifetime}); an approver answers it with "
              f"outpostctl grant approve {grant.get('id')} before {render.format_time_compact(grant.get('pending_until'))}")
    return 0


def grant_list(args: argparse.Namespace, client: ManagementClient) -> int:
    grants: list[Any] = list(client.request("GET", "/grants").get("grants", []))
    if args.json:
        print(render.machine_json({"grants": grants}))
    elif not grants:
        print("no grants")
    else:
        print(render.table(
            ["ID", "STATUS", "REQUESTER", "SERVICE", "FOR", "REASON", "DECIDED BY", "POLICY"],
            ([render.format_value(g.get("id")), render.format_value(g.get("status")),
              render.format_value(g.get("requester")), f"{g.get('tenant')}/{g.get('service')}",
              f"{int(g.get('for_s') or 0)}s", render.format_value(g.get("reason")),
              render.format_value(g.get("decided_by")), render.format_value(g.get("policy"))] for g in grants),
        ))
    return 0


def _answer(args: argparse.Namespace, client: ManagementClient, action: str) -> int:
    grant = client.request("POST", f"/grants/{args.id}/{action}")
    if args.json:
        print(render.machine_json(grant))
    elif action == "approve":
        print(f"approved grant {grant.get('id')}: {grant.get('requester')} may dial {grant.get('tenant')}/"
              f"{grant.get('service')} for {int(grant.get('for_s') or 0)}s (policy {grant.get('policy')})")
    else:
        print(f"denied grant {grant.get('id')}")
    return 0


def grant_approve(args: argparse.Namespace, client: ManagementClient) -> int:
    return _answer(args, client, "approve")


def grant_deny(args: argparse.Namespace, client: ManagementClient) -> int:
    return _answer(args, client, "deny")


def add_commands(top: Any, leaf: Any) -> None:
    grant = top.add_parser("grant", help="just-in-time access: request, list, approve, deny").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    sub = leaf(grant, "request", grant_request, "ask to dial SERVICE[@GATEWAY] for a while", json_flag=True)
    sub.add_argument("service", metavar="SERVICE[@GATEWAY]", help="NAME, TENANT/NAME, or NAME@GATEWAY")
    sub.add_argument("--for", dest="lifetime", required=True, metavar="DURATION", help="how long (30m, 1h; at most 24h)")
    sub.add_argument("--reason", required=True, help="why: the approver and the audit read it")
    leaf(grant, "list", grant_list, "grants you asked for, and those you may answer", json_flag=True)
    for name, handler, text in (("approve", grant_approve, "approve grant ID (not your own)"),
                                ("deny", grant_deny, "deny grant ID")):
        sub = leaf(grant, name, handler, text, json_flag=True)
        sub.add_argument("id", metavar="ID")
