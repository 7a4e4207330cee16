"""What each dashboard page shows: the same reads as the management API's, rendered as HTML.

Every function here reads the store, so it runs in a worker thread
(``API_POOL``); whatever lives on the event loop (this process's tunnels,
its presence book) is taken on the loop first and handed in.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from controller.audit_chain import Verification
from controller.audit_query import AuditFilter, audit_page, event_json
from controller.connections import IDS_PER_QUERY, connection_record, connections_page
from controller.dashboard.render import ago, cell_json, esc, facts, link, options, table, when
from controller.errors import bad_request
from controller.fleet import PRESENCE_STATES, OwnView, fleet
from controller.names import check_name
from controller.policy_model import Policy
from controller.registry import Identity
from controller.store import Store

#: Rows of the fleet table on one page: 10,000 rows of HTML would take the
#: browser longer to lay out than the server to build; sorting and filtering
#: work on the whole fleet, then one page of it is shown.
FLEET_PAGE_ROWS = 500
#: Connections and audit events on one page, and on a gateway's page.
EVENTS_PAGE_ROWS = 100
GATEWAY_RECENT_ROWS = 20
#: Served dials read to find a gateway's (the audit names the dialer, not the gateway, in its
#: indexed column): the newest this many, so a busy trail costs one bounded index range.
SERVED_WINDOW = 5_000
FLEET_SORTS = {"name": "Name", "tenant": "Tenant", "presence": "Presence", "last_seen": "Last seen",
               "rtt_ms": "RTT (ms)", "link_profile": "Link", "agent_version": "Version",
               "cert_not_after": "Certificate expiry", "next_renewal": "Next renewal", "key_backend": "Key backend"}
FLEET_PARAMETERS = frozenset({"presence", "tenant", "q", "key_backend", "link", "sort", "order", "page"})
KEY_BACKENDS = ("tpm", "software")
DECISION_EVENTS = ("dial_allowed", "dial_denied", "bind_allowed", "bind_denied")
#: The longest name filter a form may send: an identity name is shorter.
MAX_QUERY_TEXT = 128


def given(query: Mapping[str, str]) -> dict[str, str]:
    """The parameters a GET form filled in (a form sends the empty ones too)."""
    return {k: v for k, v in query.items() if v != ""}


@dataclasses.dataclass(frozen=True)
class FleetView:
    presence: str = ""
    tenant: str = ""
    q: str = ""
    key_backend: str = ""
    link: str = ""
    sort: str = "name"
    order: str = "asc"
    page: int = 1

    def query(self, **change: str) -> dict[str, str]:
        """This view's query string parameters with ``change`` applied (defaults left out, for short links)."""
        values = {k: str(v) for k, v in dataclasses.asdict(self).items()} | change
        return {k: v for k, v in values.items() if v and not (k == "page" and v == "1")}


def fleet_view(query: Mapping[str, str]) -> FleetView:
    """The fleet page's filters and sort; a 400 with one sentence for what it does not know."""
    params = given(query)
    unknown = sorted(set(params) - FLEET_PARAMETERS)
    if unknown:
        raise bad_request("invalid_parameter", f"Unknown parameter {unknown[0][:40]!r}; the fleet page takes "
                          f"{', '.join(sorted(FLEET_PARAMETERS))}.")
    presence = params.get("presence", "")
    if presence and presence not in PRESENCE_STATES:
        raise bad_request("invalid_presence", f"Unknown presence {presence[:40]!r}; use one of "
                          f"{', '.join(PRESENCE_STATES)}.")
    backend = params.get("key_backend", "")
    if backend and backend not in KEY_BACKENDS:
        raise bad_request("invalid_key_backend", f"Unknown key backend {backend[:40]!r}; use tpm or software.")
    sort = params.get("sort", "name")
    if sort not in FLEET_SORTS:
        raise bad_request("invalid_sort", f"The fleet cannot be sorted by {sort[:40]!r}; use one of "
                          f"{', '.join(FLEET_SORTS)}.")
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise bad_request("invalid_order", "The order must be asc or desc.")
    page = params.get("page", "1")
    if not page.isdigit() or not 1 <= int(page) <= 100_000:
        raise bad_request("invalid_page", "The page must be a whole number from 1.")
    text = params.get("q", "")
    if len(text) > MAX_QUERY_TEXT:
        raise bad_request("invalid_q", f"The name filter is at most {MAX_QUERY_TEXT} characters.")
    tenant = check_name(params["tenant"], "tenant") if "tenant" in params else ""
    return FleetView(presence, tenant, text, backend, params.get("link", "")[:MAX_QUERY_TEXT], sort, order, int(page))


def _sorted(entries: list[dict[str, Any]], view: FleetView) -> list[dict[str, Any]]:
    """Sorted by the view's column; entries without a value go last in either order."""
    def key(entry: dict[str, Any]) -> Any:
        value = entry.get(view.sort)
        if view.sort == "presence":
            return PRESENCE_STATES.index(value)
        return value if not isinstance(value, str) else value.lower()

    known = [e for e in entries if e.get(view.sort) is not None]
    unknown = [e for e in entries if e.get(view.sort) is None]
    known.sort(key=lambda e: (key(e), e["tenant"], e["name"]), reverse=view.order == "desc")
    unknown.sort(key=lambda e: (e["tenant"], e["name"]))
    return known + unknown


def fleet_page(store: Store, identities: list[Identity], own: OwnView, view: FleetView) -> str:
    now = time.time()
    entries = fleet(store, identities, own, now=now)
    text = view.q.lower()
    kept = [e for e in entries
            if (not view.presence or e["presence"] == view.presence)
            and (not view.tenant or e["tenant"] == view.tenant)
            and (not text or text in e["name"].lower())
            and (not view.key_backend or e["key_backend"] == view.key_backend)
            and (not view.link or e["link_profile"] == view.link)]
    ordered = _sorted(kept, view)
    start = (view.page - 1) * FLEET_PAGE_ROWS
    shown = ordered[start:start + FLEET_PAGE_ROWS]
    counts = Counter(e["presence"] for e in entries)
    summary = " · ".join(f'<span id="count-{state}">{counts.get(state, 0)} {state}</span>' for state in PRESENCE_STATES)
    form = ('<form method="get" action="/ui/fleet" id="filters">'
            f'<label>Name <input name="q" id="filter-q" value="{esc(view.q)}" maxlength="{MAX_QUERY_TEXT}"></label>'
            f'<label>Presence {options("presence", PRESENCE_STATES, view.presence, id_="filter-presence")}</label>'
            f'<label>Tenant <input name="tenant" id="filter-tenant" value="{esc(view.tenant)}"></label>'
            f'<label>Key backend {options("key_backend", KEY_BACKENDS, view.key_backend, id_="filter-backend")}'
            f'</label><label>Link <input name="link" id="filter-link" value="{esc(view.link)}"></label>'
            f'<input type="hidden" name="sort" value="{esc(view.sort)}">'
            f'<input type="hidden" name="order" value="{esc(view.order)}">'
            '<button type="submit" id="apply">Filter</button></form>')
    headers = []
    for column, title in FLEET_SORTS.items():
        order = "desc" if view.sort == column and view.order == "asc" else "asc"
        mark = (" ▲" if view.order == "asc" else " ▼") if view.sort == column else ""
        headers.append(link("/ui/fleet", title + mark, view.query(sort=column, order=order, page="1"),
                            id=f"sort-{column}"))
    rows = [(link(f"/ui/gateway/{e['tenant']}/{e['name']}", e["name"]), esc(e["tenant"]),
             f'<span class="presence {esc(e["presence"])}">{esc(e["presence"])}</span>',
             f'<span title="{esc(when(e["last_seen"]))}">{esc(ago(e["last_seen"], now))}</span>',
             esc("" if e["rtt_ms"] is None else f'{e["rtt_ms"]:.0f}' if isinstance(e["rtt_ms"], int | float)
                 else e["rtt_ms"]),
             esc(e["link_profile"]), esc(e["agent_version"]), esc(when(e["cert_not_after"])),
             esc(when(e["next_renewal"])), esc(e["key_backend"]))
            for e in shown]
    pages = max(1, -(-len(ordered) // FLEET_PAGE_ROWS))
    pager = f'<p id="shown">{len(shown)} of {len(ordered)} shown (of {len(entries)} identities), page {view.page} of {pages}'
    if view.page > 1:
        pager += " " + link("/ui/fleet", "previous", view.query(page=str(view.page - 1)), id="previous")
    if view.page < pages:
        pager += " " + link("/ui/fleet", "next", view.query(page=str(view.page + 1)), id="next")
    return (f'<p id="summary">{summary}</p>{form}{pager}</p>'
            + table(headers, rows, id_="fleet", raw_headers=True))


def _connection_rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(esc(when(r["requested_at"])), esc(r["id"]), _identity_link(r["identity"]), esc(r["service"]),
             f'<span class="outcome {esc(r["outcome"])}">{esc(r["outcome"])}</span>', esc(r["policy"]),
             esc(r["reason"]), _identity_link(r["gateway"]), esc(r["bytes_up"]), esc(r["bytes_down"]),
             esc(r["duration_s"])) for r in records]


CONNECTION_HEADERS = ("Requested", "Connection", "Identity", "Service", "Outcome", "Policy", "Reason", "Gateway",
                      "Bytes up", "Bytes down", "Duration (s)")
EVENT_HEADERS = ("#", "Time", "Event", "Fields")


def _identity_link(label: object) -> str:
    if not isinstance(label, str) or "/" not in label:
        return esc(label)
    return link(f"/ui/gateway/{label}", label)


def _event_rows(events: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(esc(e["id"]), esc(when(e["time"])), esc(e["event"]), cell_json(e["fields"])) for e in reversed(events)]


def connections_body(store: Store, where: AuditFilter) -> str:
    page = connections_page(store, where)
    older = ""
    if page["next_before"] is not None:
        older = link("/ui/connections", "older", {"before": str(page["next_before"]),
                                                   **({"denied": "true"} if where.denied else {})}, id="older")
    toggle = link("/ui/connections", "all", id="show-all") if where.denied else \
        link("/ui/connections", "denied only", {"denied": "true"}, id="show-denied")
    return (f"<p>{toggle} {older}</p>"
            + table(CONNECTION_HEADERS, _connection_rows(page["connections"]), id_="connections"))


def audit_body(store: Store, where: AuditFilter, verification: Verification) -> str:
    page = audit_page(store, where)
    state = "verified" if verification.ok else "broken"
    older = link("/ui/audit", "older", {"before": str(page["next_before"])}, id="older") \
        if page["next_before"] is not None else ""
    return (f'<p id="verification" class="{state}">Hash chain of the newest {verification.checked} events: '
            f'<strong>{"verified" if verification.ok else "BROKEN"}</strong> — {esc(verification.summary())}. '
            "<code>outpostctl audit verify</code> checks the whole trail.</p>"
            f"<p>{older}</p>" + table(EVENT_HEADERS, _event_rows(page["events"]), id_="audit"))


def gateway_body(store: Store, identity: Identity, own: OwnView, tunnels: list[dict[str, object]]) -> str:
    now = time.time()
    [entry] = fleet(store, [identity], own, now=now)
    labels = {"last_seen": "last seen", "connected_since": "connected since", "cert_not_after": "certificate expiry",
              "next_renewal": "next renewal", "report_at": "reported at", "created_at": "created",
              "enrolled_at": "enrolled"}
    shown = [(labels.get(k, k.replace("_", " ")), when(v) if k in labels else
              (", ".join(v) if isinstance(v, list) else v)) for k, v in entry.items()]
    connections = connections_page(store, AuditFilter(identity=identity.label, limit=GATEWAY_RECENT_ROWS))
    events = audit_page(store, AuditFilter(identity=identity.label, limit=GATEWAY_RECENT_ROWS))
    tunnel_rows = [(esc(when(t["connected_since"])), esc(t["remote"]),
                    esc(", ".join(str(b) for b in t["bound"]) if isinstance(t["bound"], list) else t["bound"]),
                    esc(t["bytes_in"]), esc(t["bytes_out"])) for t in tunnels]
    return ("<h3>Report</h3>" + facts(shown, id_="report")
            + "<h3>Tunnels on this controller process</h3>"
            + table(("Connected since", "Remote", "Bound services", "Bytes in", "Bytes out"), tunnel_rows,
                    id_="tunnels")
            + "<h3>Recent connections it served</h3>"
            + table(CONNECTION_HEADERS, _connection_rows(served_by(store, identity.label)), id_="served")
            + "<h3>Recent connections it made</h3>"
            + table(CONNECTION_HEADERS, _connection_rows(connections["connections"]), id_="connections")
            + "<h3>Recent audit events naming it</h3>"
            + table(EVENT_HEADERS, _event_rows(events["events"]), id_="audit"))


def served_by(store: Store, label: str, limit: int = GATEWAY_RECENT_ROWS) -> list[dict[str, Any]]:
    """The newest dials ``label`` served as the gateway, among the newest ``SERVED_WINDOW`` served anywhere."""
    rows = store.query("SELECT id, time, event, fields FROM audit WHERE event = 'dial_served' ORDER BY id DESC "
                       "LIMIT ?", (SERVED_WINDOW,))
    mine = [event for event in (event_json(row) for row in rows)
            if event["fields"].get("gateway") == label and event["fields"].get("correlation")][:limit]
    ids = [str(event["fields"]["correlation"]) for event in mine]
    stories: dict[str, list[dict[str, Any]]] = {cid: [] for cid in ids}
    for start in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[start:start + IDS_PER_QUERY]
        for row in store.query("SELECT id, time, event, fields FROM audit WHERE correlation IN "
                               f"({', '.join('?' for _ in chunk)}) ORDER BY id", tuple(chunk)):
            event = event_json(row)
            stories[event["fields"]["correlation"]].append(event)
    return [connection_record(cid, stories[cid], event["id"]) for cid, event in zip(ids, mine, strict=True)]


def policies_body(policies: list[Policy]) -> str:
    """Every policy with the decisions it made and when it last allowed one (the policy engine's counters)."""
    rows = [(esc(p.id), esc(p.kind), esc(p.tenant), esc(", ".join(s.text(p.tenant) for s in p.identities)),
             esc(", ".join(s.text(p.tenant) for s in p.services)), esc(when(p.created_at)),
             f'<span class="decisions">{p.decisions}</span>',
             esc(when(p.last_allowed_at)) if p.last_allowed_at is not None else "never") for p in policies]
    return table(("Policy", "Kind", "Tenant", "Identities", "Services", "Created", "Decisions", "Last allowed"),
                 rows, id_="policies")
