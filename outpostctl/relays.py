"""``outpostctl relay add``, ``list``, ``retire`` and ``revoke``: relays as processes of their own (docs/deployment.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outpostctl import render
from outpostctl.client import ManagementClient
from outpostctl.errors import TokenFileError
from outpostctl.tokenfile import check_token_target, write_token_file

PROG = "outpostctl"


def add_commands(top: Any, leaf: Any) -> None:
    relay = top.add_parser("relay", help="relays: the tunnel endpoints gateways connect to").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    sub = leaf(relay, "add", relay_add, "add a relay and write its one-time enrollment token")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--address", required=True, metavar="HOST:PORT",
                     help="where gateways reach the relay (its certificate names HOST)")
    sub.add_argument("--token-out", dest="token_file", required=True, metavar="FILE",
                     help="where to write the relay's one-time token (mode 0600)")
    sub.add_argument("--force", action="store_true", help="replace FILE if it exists")
    leaf(relay, "list", relay_list, "list relays with their address, tunnels and health", json_flag=True)
    sub = leaf(relay, "retire", relay_retire, "retire a relay: refused from now on, its tunnels close")
    sub.add_argument("name", metavar="NAME")
    sub = leaf(relay, "revoke", relay_revoke, "revoke a relay's key (a machine lost or broken into): refused from "
               "now on, its tunnels and its links to other relays close")
    sub.add_argument("name", metavar="NAME")


def relay_add(args: argparse.Namespace, client: ManagementClient) -> int:
    target = check_token_target(Path(args.token_file), force=args.force)
    answer = client.request("POST", "/relays", {"name": args.name, "address": args.address})
    try:
        path = write_token_file(target, str(answer.get("token", "")), force=args.force)
    except TokenFileError as error:
        raise TokenFileError(f"{error.message}. The controller made the token but it was not saved; run "
                             f"{PROG} relay add {args.name} --address {args.address} again for a new one") from None
    print(render.key_values([("relay", args.name), ("address", args.address), ("token file", str(path))]))
    print()
    print(f"On the relay's machine, with the controller's --store:\n"
          f"  outpost-controller serve --role relay --data DIR --listen 0.0.0.0:PORT --store STORE "
          f"--enroll-token {path.name}\n"
          "The token enrolls one relay, once, within a day; treat the file like a password until then.")
    return 0


def _age(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:g} s ago"


def relay_list(args: argparse.Namespace, client: ManagementClient) -> int:
    relays = client.request("GET", "/relays").get("relays", [])
    if args.json:
        print(render.machine_json({"relays": relays}))
    elif not relays:
        print(f"no relays of their own (a controller in role all is its own relay); add one with: {PROG} relay add "
              "NAME --address HOST:PORT --token-out FILE")
    else:
        print(render.table(("NAME", "ADDRESS", "STATUS", "HEALTH", "TUNNELS", "HEARTBEAT"), [
            (str(r.get("name")), str(r.get("address")), str(r.get("status")), str(r.get("health")),
             str(r.get("tunnels")), _age(r.get("heartbeat_age_s"))) for r in relays]))
    return 0


def relay_retire(args: argparse.Namespace, client: ManagementClient) -> int:
    client.request("POST", f"/relays/{args.name}/retire")
    print(f"relay {args.name} is retired: it stops within a few seconds and closes its tunnels; its gateways move to the "
          "other relays.")
    return 0


def relay_revoke(args: argparse.Namespace, client: ManagementClient) -> int:
    client.request("POST", f"/relays/{args.name}/revoke")
    print(f"relay {args.name} is revoked: its certificate opens nothing any more, it stops within a few seconds and "
          "the other relays close its links; its gateways move to the other relays. To use the machine again, "
          f"add it anew ({PROG} relay add) and enroll a fresh data directory.")
    return 0
