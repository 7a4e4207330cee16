"""``outpostctl identity list`` and ``identity show``: the fleet with presence, health and its agents' reports.

Filters go to the controller (``GET /api/v1/fleet``), which refuses what it
cannot read; what the command line can check itself (a duration, a presence
word) it checks first, so a typo costs no request and says what to write.
"""

from __future__ import annotations

import argparse
import re
from typing import Any
from urllib.parse import quote, urlencode

from outpostctl import render
from outpostctl.client import JsonObject, ManagementClient

PROG = "outpostctl"
#: Seconds of each unit a duration may carry (``--expiring 7d``).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
#: The longest ``--expiring`` (ten years, as the controller's own bound): past it every certificate matches.
MAX_DURATION = 10 * 365 * 86400
#: Columns of ``identity list``, and the fleet field each shows.
LIST_COLUMNS = ("NAME", "TENANT", "STATUS", "PRESENCE", "LAST SEEN", "RTT", "LINK", "VERSION", "CERT EXPIRES", "NEXT RENEWAL")


def duration(text: str) -> float:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` (a bare number is seconds) as seconds; argparse's type."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write a number and a unit (s, m, h, d, w), "
                                         "such as 24h, 7d or 30m")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if seconds > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than ten years; every certificate expires sooner")
    return seconds


#: The presence states the controller knows (controller/fleet.py PRESENCE_STATES).
PRESENCE_STATES = ("online", "overdue", "offline", "never")


def presence_states(text: str) -> list[str]:
    """``online,overdue``: argparse's type for ``--presence``."""
    states = [part.strip() for part in text.split(",")]
    wrong = next((state for state in states if state not in PRESENCE_STATES), None)
    if wrong is not None:
        raise argparse.ArgumentTypeError(f"{wrong!r} is not a presence: use one or more of "
                                         f"{', '.join(PRESENCE_STATES)}, separated by commas")
    return states


def add_filters(sub: argparse.ArgumentParser) -> None:
    """``identity list``'s filters (``--tenant`` is the command's own)."""
    sub.add_argument("--offline", action="store_true", help="only identities not connected (offline or never)")
    sub.add_argument("--overdue", action="store_true",
                     help="only connected identities silent for two keepalive intervals")
    sub.add_argument("--expiring", type=duration, metavar="DURATION",
                     help="only certificates expiring within DURATION (such as 24h or 7d), or expired")
    sub.add_argument("--presence", type=presence_states, default=[], metavar="STATE[,STATE...]",
                     help=f"only these presence states ({', '.join(PRESENCE_STATES)})")
    sub.add_argument("--role", default=None, help="only identities with this role")


def fleet_query(args: argparse.Namespace) -> dict[str, str]:
    query: dict[str, str] = {}
    presence = [state for flag, states in (("offline", ("offline", "never")), ("overdue", ("overdue",)))
                if getattr(args, flag) for state in states] + list(args.presence)
    presence = list(dict.fromkeys(presence))
    if presence:
        query["presence"] = ",".join(presence)
    if args.expiring is not None:
        query["expiring_within"] = f"{args.expiring:g}"
    if args.tenant is not None:
        query["tenant"] = args.tenant
    if args.role is not None:
        query["role"] = args.role
    return query


def ago(now: float, then: Any) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, or the date beyond a day; ``-`` when never."""
    if not isinstance(then, (int, float)) or isinstance(then, bool):
        return render.MISSING
    age = max(0.0, now - then)
    if age < 60:
        return f"{age:.0f} s ago"
    if age < 3600:
        return f"{age // 60:.0f} min ago"
    if age < 86400:
        return f"{age // 3600:.0f} h ago"
    return render.format_time(then)


def _rtt(value: Any) -> str:
    return render.MISSING if value is None else f"{value:.0f} ms"


def identity_list(args: argparse.Namespace, client: ManagementClient) -> int:
    query = fleet_query(args)
    answer = client.request("GET", "/fleet" + ("?" + urlencode(query) if query else ""))
    identities: list[JsonObject] = list(answer.get("identities", []))
    now = float(answer.get("now") or 0.0)
    if args.json:
        print(render.machine_json({"identities": identities}))
    elif not identities:
        print("no identities match" if query else f"no identities yet; create one with: {PROG} identity create NAME "
              "--token-out FILE")
    else:
        print(render.table(LIST_COLUMNS, (
            [str(i.get("name")), render.format_value(i.get("tenant")), render.format_value(i.get("status")),
             render.format_value(i.get("presence")),
             ago(now, i.get("last_seen")), _rtt(i.get("rtt_ms")), render.format_value(i.get("link_profile")),
             render.format_value(i.get("agent_version")), render.format_time(i.get("cert_not_after")),
             render.format_time(i.get("next_renewal"))]
            for i in identities)))
    return 0


def identity_show(args: argparse.Namespace, client: ManagementClient) -> int:
    tenant = "" if args.tenant is None else "?" + urlencode({"tenant": args.tenant})
    entry = client.request("GET", f"/fleet/{quote(args.name, safe='').replace('.', '%2E')}{tenant}")
    if args.json:
        print(render.machine_json(entry))
        return 0
    now = float(entry.get("now") or 0.0)
    offset = entry.get("clock_offset_s")
    print(render.key_values([
        ("name", render.format_value(entry.get("name"))),
        ("tenant", render.format_value(entry.get("tenant"))),
        ("uri", render.format_value(entry.get("uri"))),
        ("status", render.format_value(entry.get("status"))),
        ("roles", render.format_value(entry.get("roles"))),
        ("created at", render.format_time(entry.get("created_at"))),
        ("enrolled at", render.format_time(entry.get("enrolled_at"))),
        ("key sha256", render.format_value(entry.get("key_sha256"))),
        ("presence", render.format_value(entry.get("presence"))),
        ("connected since", render.format_time(entry.get("connected_since"))),
        ("last seen", f"{ago(now, entry.get('last_seen'))}" + (
            f" ({render.format_time(entry.get('last_seen'))})" if entry.get("last_seen") is not None else "")),
        ("relay", render.format_value(entry.get("relay"))),
        ("remote address", render.format_value(entry.get("remote"))),
        ("agent version", render.format_value(entry.get("agent_version"))),
        ("os / arch", f"{render.format_value(entry.get('os'))} / {render.format_value(entry.get('arch'))}"),
        ("link profile", render.format_value(entry.get("link_profile"))),
        ("keepalive", render.MISSING if entry.get("keepalive_s") is None else f"{entry['keepalive_s']:g} s"),
        ("round trip", _rtt(entry.get("rtt_ms"))),
        ("clock offset", render.MISSING if offset is None
         else f"{offset:+.3f} s ({render.format_value(entry.get('clock_source'))})"),
        ("key backend", render.format_value(entry.get("key_backend"))),
        ("cert expires", render.format_time(entry.get("cert_not_after"))),
        ("next renewal", render.format_time(entry.get("next_renewal"))),
        ("last renewal error", render.format_value(entry.get("renewal_error"))),
        ("reported", ago(now, entry.get("report_at"))),
    ]))
    return 0


def policy_explain(args: argparse.Namespace, client: ManagementClient) -> int:
    """Whether a dial or bind would be allowed, and which policies decide it (exit 0: the answer was given)."""
    query = {"identity": args.identity, "service": args.service}
    if args.kind is not None:
        query["kind"] = args.kind
    if args.session:
        query["session"] = "true"
    answer = client.request("GET", "/policies/explain?" + urlencode(query))
    if args.json:
        print(render.machine_json(answer))
        return 0
    policies = {p.get("id"): p for p in answer.get("policies", [])}
    for kind, decision in answer.get("decisions", {}).items():
        verdict = "allowed" if decision.get("allowed") else "denied"
        print(f"{kind} {answer.get('identity')} -> {answer.get('service')}: {verdict}: {decision.get('reason')}")
        for label, ids in (("decides", decision.get("allowing", [])[:1]),
                           ("also allows", decision.get("allowing", [])[1:]),
                           ("names it, opens nothing (another tenant)", decision.get("foreign", []))):
            for pid in ids:
                policy = policies.get(pid, {})
                print(f"  policy {pid} {label}: tenant {policy.get('tenant')}, {policy.get('kind')} "
                      f"{render.format_value(policy.get('identities'))} -> {render.format_value(policy.get('services'))}")
    return 0
