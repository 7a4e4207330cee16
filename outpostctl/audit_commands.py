"""``outpostctl audit`` (filters, paging, ``--follow``, ``verify``) and ``outpostctl connections``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from agent.errors import EXIT_DATAERR
from outpostctl import render
from outpostctl.client import JsonObject, ManagementClient
from outpostctl.commands import audit_rows
from outpostctl.errors import ControllerUnreachable, OutpostError
from shared.since import InvalidSince, parse_since


class ChainBroken(OutpostError):
    """``audit verify`` found an edited, deleted, inserted or reordered event."""

    exit_code = EXIT_DATAERR


Handler = Callable[[argparse.Namespace, ManagementClient], int]
DEFAULT_AUDIT_LIMIT = 50
#: How long one ``--follow`` request waits for new events before asking again:
#: well below the controller's bound (controller/audit_api.py, 30 s) and a proxy's idle timeout.
FOLLOW_WAIT_SECONDS = 20
#: ``--follow`` stops after this many requests in a row that failed to reach the controller
#: (a controller restart takes seconds; a SIEM's shipper restarts the command after that).
FOLLOW_MAX_FAILURES = 5
#: Pause after a failed ``--follow`` request before the next one.
FOLLOW_RETRY_SECONDS = 2.0
#: A verification reads the whole trail (a million events in seconds, benchmark
#: tests/bench/audit_verify.py); this leaves room for far larger ones.
VERIFY_TIMEOUT_SECONDS = 600.0


def _since(text: str) -> str:
    """A ``--since`` value the controller will take, sent as given (a duration counts back from the controller's
    clock); argparse turns the ArgumentTypeError into a usage error."""
    try:
        parse_since(text)
    except InvalidSince as error:
        raise argparse.ArgumentTypeError(error.message.rstrip(".")) from None
    return text


def add_filters(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--identity", metavar="NAME", help="only events of this identity (NAME or TENANT/NAME)")
    sub.add_argument("--service", metavar="NAME", help="only events about this service (NAME or TENANT/NAME)")
    sub.add_argument("--since", type=_since, metavar="TIME",
                     help="only since TIME: a duration ago (15m, 2h, 7d), ISO 8601 or a unix time")
    sub.add_argument("--denied", action="store_true", help="only refusals")
    sub.add_argument("--before", type=int, metavar="ID", help="the page older than ID (the cursor a page prints)")


def _query(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    query: dict[str, Any] = {"limit": args.limit}
    for key in ("identity", "service", "since", "before", "correlation"):
        value = getattr(args, key, None)
        if value is not None:
            query[key] = value
    if args.denied:
        query["denied"] = "true"
    query.update(more)
    return query


def audit(args: argparse.Namespace, client: ManagementClient) -> int:
    page = client.request("GET", "/audit?" + urlencode(_query(args)))
    events = list(page.get("events", []))
    if args.follow:
        return _follow(args, client, events, page.get("last_id"))
    if args.json:
        print(render.machine_json(page))
        return 0
    if not events:
        print("no audit events match")
        return 0
    print(render.table(["TIME", "EVENT", "DETAILS"], audit_rows(events)))
    _hint_older(page, "audit")
    return 0


def _print_stream(args: argparse.Namespace, events: list[JsonObject]) -> None:
    for event, row in zip(events, audit_rows(events), strict=True):
        print(json.dumps(event, sort_keys=True) if args.json else "  ".join(row), flush=True)


def _follow(args: argparse.Namespace, client: ManagementClient, events: list[JsonObject], last: Any) -> int:
    """Print the page, then every new event as it is recorded (JSON lines with --json) until interrupted."""
    _print_stream(args, events)
    cursor = int(last) if isinstance(last, int) else 0
    patient = client.with_timeout(FOLLOW_WAIT_SECONDS + client.timeout)
    failures = 0
    while True:
        query = _query(args, after=cursor, wait=FOLLOW_WAIT_SECONDS)
        query.pop("before", None)
        try:
            page = patient.request("GET", "/audit?" + urlencode(query))
        except ControllerUnreachable:
            failures += 1
            if failures >= FOLLOW_MAX_FAILURES:
                raise
            time.sleep(FOLLOW_RETRY_SECONDS)
            continue
        failures = 0
        new = list(page.get("events", []))
        _print_stream(args, new)
        if new:
            cursor = int(new[-1]["id"])


def _hint_older(page: JsonObject, command: str) -> None:
    """Tell a person at a terminal how to see the older page (a script reads ``next_before`` from --json)."""
    if page.get("next_before") is not None and sys.stdout.isatty():
        print(f"older: outpostctl {command} --before {page['next_before']}", file=sys.stderr)


def verify(args: argparse.Namespace, client: ManagementClient) -> int:
    """0 when the chain is whole; EXIT_DATAERR, naming the first bad event, when it is not."""
    query = urlencode([("checkpoint", text) for text in args.checkpoint])
    result = client.with_timeout(VERIFY_TIMEOUT_SECONDS).request("GET", "/audit/verify" + (f"?{query}" if query else ""))
    if args.json:
        print(render.machine_json(result))
    elif result.get("ok"):
        print(result.get("summary"))
    if not result.get("ok"):
        raise ChainBroken(f"the audit trail fails verification at {result.get('summary')}")
    return 0


def connections(args: argparse.Namespace, client: ManagementClient) -> int:
    page = client.request("GET", "/connections?" + urlencode(_query(args)))
    records = list(page.get("connections", []))
    if args.json:
        print(render.machine_json(page))
        return 0
    if not records:
        print("no connections match")
        return 0
    print(render.table(
        ["REQUESTED", "CONNECTION", "IDENTITY", "SERVICE", "OUTCOME", "POLICY", "GATEWAY", "UP", "DOWN", "SECONDS",
         "REASON"],
        [[render.format_audit_time(r.get("requested_at")), str(r.get("id")), render.format_value(r.get("identity")),
          render.format_value(r.get("service")), render.format_value(r.get("outcome")),
          render.format_value(r.get("policy")), render.format_value(r.get("gateway")),
          render.format_value(r.get("bytes_up")), render.format_value(r.get("bytes_down")),
          render.format_value(r.get("duration_s")), render.format_value(r.get("close_reason") or r.get("reason"))]
         for r in records]))
    _hint_older(page, "connections")
    return 0


def add_commands(top: Any, leaf: Callable[..., argparse.ArgumentParser], positive_int: Any) -> None:
    """Register ``audit`` and ``connections`` under ``top``."""
    sub = leaf(top, "audit", audit, "show audit events (newest page; filters, --before, --follow)", json_flag=True)
    sub.add_argument("--limit", type=positive_int, default=DEFAULT_AUDIT_LIMIT, metavar="N",
                     help=f"how many events (default {DEFAULT_AUDIT_LIMIT}; the controller caps it at 1000)")
    add_filters(sub)
    sub.add_argument("--correlation", metavar="ID", help="only the events of one attempt (c-..., t-..., m-...)")
    sub.add_argument("--follow", action="store_true",
                     help="then print new events as they are recorded, until interrupted (JSON lines with --json)")
    verify_sub = sub.add_subparsers(dest="audit_command", metavar="verify", required=False)
    check = leaf(verify_sub, "verify", verify, "check the audit trail's hash chain; names the first bad event",
                 json_flag=True)
    check.add_argument("--checkpoint", action="append", default=[], metavar="ID:MAC",
                       help="a chain head from the controller's log (repeatable): a rewrite since is found")
    sub = leaf(top, "connections", connections,
               "who reached what, when, through which policy, how long, how many bytes", json_flag=True)
    sub.add_argument("--limit", type=positive_int, default=DEFAULT_AUDIT_LIMIT, metavar="N",
                     help=f"how many connections (default {DEFAULT_AUDIT_LIMIT}; at most 1000)")
    add_filters(sub)
