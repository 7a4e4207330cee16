"""Relays as processes of their own: added by an operator, enrolled with a key of their own, alive by heartbeat.

``outpostctl relay add NAME --address HOST:PORT`` makes a row and a one-time
token (only its SHA-256 is kept); ``outpost-controller serve --role relay
--enroll-token FILE`` redeems it with a CSR for a key it made itself and gets a
certificate for its address (controller/relay_node.py). It renews by proving
that key again, the way a gateway does. A running relay writes a heartbeat
with its tunnel count; the live ones are the relay list agents get, the
least loaded first. Retiring a relay refuses its renewals and tells the
running process to close its tunnels and stop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from controller.audit import AuditLog
from controller.ca import CertificateAuthority, public_key_sha256
from controller.enrollment import parse_csr_key
from controller.errors import ControllerError, bad_request, conflict, not_found
from controller.names import check_name
from controller.store import Row, Store

if TYPE_CHECKING:
    from controller.context import ControllerContext

#: A relay is installed by ops within a working day of being added; a token
#: lying around longer is more likely a leak than a pending install.
RELAY_TOKEN_TTL = 24 * 3600.0
#: A running relay writes its heartbeat this often: the tunnel count in
#: ``relay list`` is at most this old, and it costs one row write per relay.
RELAY_HEARTBEAT_INTERVAL = 5.0
#: A controller reads the live relays this often for the lists it hands out:
#: one small query a second, so a relay that just started is named at once.
RELAY_LIST_REFRESH = 1.0
#: A relay whose heartbeat is older than this (three missed beats) is left out
#: of the relay list agents get and shows as "stale"; agents already on it
#: fail over by themselves, this only keeps new agents from trying it first.
RELAY_STALE_AFTER = 3 * RELAY_HEARTBEAT_INTERVAL
#: ``HOST:PORT`` with a DNS name or an IP literal ([...] for IPv6): what goes in the certificate and the URL.
ADDRESS_PATTERN = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")
TOKEN_KIND = "outpost-relay-token"
ACTIVE, PENDING, RETIRED = "active", "pending", "retired"
#: A relay whose key is no longer trusted (a machine lost or broken into): refused like a retired one, and
#: recorded as such. Its current certificate opens no link, renews nothing, and its process stops.
REVOKED = "revoked"
#: What a relay process hears when its name was retired, added and enrolled again with another key while
#: it ran (a re-key done faster than its heartbeat noticed the retirement): it stops as a retired one does.
REPLACED = "enrolled again with another key"
#: Starts the relay name of a controller in role all (controller/box_relay.py); no name an operator gives
#: (controller/names.py) starts with it, so the two never collide.
BOX_PREFIX = "_"
#: Relays this many tunnels apart count as equally loaded (``spread``): a
#: heartbeat's count is up to RELAY_HEARTBEAT_INTERVAL old, and a burst of
#: reconnects moves it by hundreds in that time; what matters is not
#: piling a whole burst onto one relay.
SPREAD_BAND = 50


def check_address(value: object) -> tuple[str, int]:
    """(host, port) of a relay's public ``HOST:PORT``, or a 400 saying the form."""
    match = ADDRESS_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise bad_request("invalid_address", f"The relay address {value!r} is not HOST:PORT (for example "
                                             "relay-eu.example.net:443 or [2001:db8::1]:443).")
    host = match.group(1)
    return (host[1:-1] if host.startswith("[") else host.lower()), int(match.group(2))


def relay_url(address: str) -> str:
    """The tunnel URL agents dial for a relay at ``address``."""
    return f"wss://{address}/v1/tunnel"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RelayIssued:
    name: str
    address: str
    certificate_pem: str
    not_after: float


def make_token(controller_url: str, ca_fingerprint: str, name: str, secret: str) -> str:
    """The token file's content: where to enroll, which CA to pin, who to be, and the secret."""
    body = {"kind": TOKEN_KIND, "controller": controller_url, "ca_sha256": ca_fingerprint, "relay": name,
            "secret": secret}
    return base64.urlsafe_b64encode(json.dumps(body, sort_keys=True).encode()).decode().rstrip("=")


def read_token(text: str) -> dict[str, str]:
    """The fields of a relay token, or ValueError saying it is not one."""
    try:
        raw = text.strip()
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("is not a relay enrollment token (outpostctl relay add writes one)") from None
    fields = ("controller", "ca_sha256", "relay", "secret")
    if not isinstance(body, dict) or body.get("kind") != TOKEN_KIND or not all(
            isinstance(body.get(key), str) for key in fields):
        raise ValueError("is not a relay enrollment token (outpostctl relay add writes one)")
    return {key: str(body[key]) for key in fields}


class RelayBook:
    """The relays in the store: add, enroll, renew, heartbeat, retire, list."""

    def __init__(self, store: Store, ca: CertificateAuthority, audit: AuditLog, cert_lifetime: int) -> None:
        self.store = store
        self.ca = ca
        self.audit = audit
        self.cert_lifetime = cert_lifetime

    def add(self, name: object, address: object, controller_url: str) -> str:
        """A relay row and its one-time token; adding a relay not yet enrolled again replaces its token."""
        name = check_name(name, "relay")
        host, port = check_address(address)
        address_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self.store.transaction() as db:
            row = db.query_one("SELECT status FROM relays WHERE name = ?", (name,))
            if row is not None and row["status"] == ACTIVE:
                raise conflict("relay_exists", f"Relay {name} is enrolled; retire it first "
                                               f"(outpostctl relay retire {name}) or choose another name.")
            db.execute("DELETE FROM relays WHERE name = ?", (name,))
            db.execute("INSERT INTO relays (name, address, status, token_sha256, token_expires_at, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (name, address_text, PENDING, _sha256(secret), now + RELAY_TOKEN_TTL, now))
            self.audit.record_in(db, "relay_added", relay=name, address=address_text)
        return make_token(controller_url, self.ca.fingerprint, name, secret)

    def enroll(self, name: object, secret: object, csr_pem: object, remote: str | None = None) -> RelayIssued:
        """The token's secret and a CSR to the relay's certificate; the token works once."""
        public_key = parse_csr_key(csr_pem)
        refused = ControllerError("relay_token_invalid", "This relay token is unknown, used, expired or retired; "
                                  "make a new one with outpostctl relay add.", 403)
        if not isinstance(name, str) or not isinstance(secret, str):
            raise refused
        with self.store.transaction() as db:
            row = db.query_one("SELECT * FROM relays WHERE name = ?", (name,))
            valid = (row is not None and row["status"] == PENDING and row["token_sha256"] is not None
                     and secrets.compare_digest(row["token_sha256"], _sha256(secret))
                     and row["token_expires_at"] >= time.time())
            if row is not None and valid:
                issued = self._issue(db, row, public_key)
                self.audit.record_in(db, "relay_enrolled", relay=name, serial=issued[1], remote=remote)
                return issued[0]
        # Anyone may knock: the refusal goes through the audit log's budget for the unauthenticated.
        self.audit.record_anonymous("relay_refused", relay=name[:64], reason="token", remote=remote)
        raise refused

    def renew(self, csr_pem: object, remote: str | None = None) -> RelayIssued:
        """A new certificate for an enrolled, not retired relay's own key (proved by the CSR's signature)."""
        public_key = parse_csr_key(csr_pem)
        key = public_key_sha256(public_key)
        with self.store.transaction() as db:
            row = db.query_one("SELECT * FROM relays WHERE key_sha256 = ?", (key,))
            if row is not None and row["status"] == ACTIVE:
                issued = self._issue(db, row, public_key)
                self.audit.record_in(db, "relay_renewed", relay=row["name"], serial=issued[1], remote=remote)
                return issued[0]
        self.audit.record_anonymous("relay_refused", relay=row["name"] if row else None, reason="renewal",
                                    remote=remote)
        raise ControllerError("relay_refused", "This key is not the key of an enrolled relay (a gateway's key, or "
                              "a retired relay's); enroll the relay with a new token.", 403)

    def _issue(self, db: Any, row: Row, public_key: Any) -> tuple[RelayIssued, str]:
        host, _ = check_address(row["address"])
        cert = self.ca.issue_relay(public_key, row["name"], host, self.cert_lifetime)
        not_after = time.time() + self.cert_lifetime
        serial = format(cert.serial_number, "x")
        db.execute("UPDATE relays SET status = ?, token_sha256 = NULL, key_sha256 = ?, serial = ?, not_after = ?, "
                   "enrolled_at = COALESCE(enrolled_at, ?) WHERE name = ?",
                   (ACTIVE, public_key_sha256(public_key), serial, not_after, time.time(), row["name"]))
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return RelayIssued(row["name"], row["address"], pem, not_after), serial

    def retire(self, name: object, status: str = RETIRED) -> None:
        """The relay is refused from now on (``RETIRED`` or ``REVOKED``); its running process closes its tunnels
        and stops, and the relays it linked to close its links (controller/relay/peering.py)."""
        if isinstance(name, str) and name.startswith(BOX_PREFIX):
            raise conflict("relay_is_controller", f"Relay {name[:80]} is a controller in role all, the relays' "
                                                  "own CA: it cannot be retired or revoked; stop that process "
                                                  "instead.")
        name = check_name(name, "relay")
        with self.store.transaction() as db:
            row = db.query_one("SELECT serial FROM relays WHERE name = ?", (name,))
            if db.execute("UPDATE relays SET status = ?, token_sha256 = NULL WHERE name = ?",
                          (status, name)).rowcount == 0:
                raise not_found("unknown_relay", f"There is no relay {name}; see outpostctl relay list.")
            if status == REVOKED:
                self.audit.record_in(db, "relay_revoked", relay=name, serial=row["serial"] if row else None)
            else:
                self.audit.record_in(db, "relay_retired", relay=name)

    def heartbeat(self, name: str, tunnels: int, started_at: float, key_sha256: str | None = None) -> str | None:
        """Record that relay ``name`` runs with ``tunnels``; its status, or None when it is gone from the store.

        With ``key_sha256`` (the process's own key), a relay enrolled again with another key since this
        process started is ``REPLACED``, and its heartbeat is not written: the name is the new key's.
        """
        with self.store.transaction() as db:
            row = db.query_one("SELECT status, key_sha256 FROM relays WHERE name = ?", (name,))
            if row is None:
                return None
            if key_sha256 is not None and row["key_sha256"] != key_sha256:
                return REPLACED
            db.execute("UPDATE relays SET heartbeat_at = ?, tunnels = ?, started_at = ? WHERE name = ? AND status = ?",
                       (time.time(), tunnels, started_at, name, ACTIVE))
        return str(row["status"])

    def all_relays(self) -> list[dict[str, Any]]:
        now = time.time()
        rows = self.store.query("SELECT name, address, status, tunnels, heartbeat_at, started_at, not_after, "
                                "serial FROM relays ORDER BY name")
        result = []
        for row in rows:
            beat = row["heartbeat_at"]
            age = None if beat is None else max(0.0, now - beat)
            health = (row["status"] if row["status"] != ACTIVE else
                      "never started" if age is None else "live" if age <= RELAY_STALE_AFTER else "stale")
            result.append({"name": row["name"], "address": row["address"], "url": relay_url(row["address"]),
                           "status": row["status"], "health": health, "tunnels": row["tunnels"],
                           "heartbeat_age_s": None if age is None else round(age, 1),
                           "started_at": row["started_at"], "not_after": row["not_after"], "serial": row["serial"]})
        return result

    def live(self) -> list[tuple[str, int]]:
        """(URL, tunnels) of every enrolled relay with a fresh heartbeat, the least loaded first.

        When none has one (every relay restarting, or one enrolled a moment
        ago that has not beaten yet), every enrolled relay: an agent with a
        list to try comes back by itself, one with an empty list cannot run.
        """
        rows = self.store.query("SELECT address, tunnels FROM relays WHERE status = ? AND heartbeat_at >= ? "
                                "ORDER BY tunnels, name", (ACTIVE, time.time() - RELAY_STALE_AFTER))
        if not rows:
            rows = self.store.query("SELECT address, tunnels FROM relays WHERE status = ? "
                                    "ORDER BY heartbeat_at DESC, name", (ACTIVE,))
        return [(relay_url(row["address"]), int(row["tunnels"])) for row in rows]


def relay_loads(live: list[tuple[str, int]], own: tuple[str, int] | None) -> list[tuple[str, int]]:
    """The live relays and this process itself (``--role all``) with their tunnels, the least loaded first."""
    entries = list(live)
    if own is not None and all(url != own[0] for url, _ in entries):
        entries.append(own)
    return sorted(entries, key=lambda entry: entry[1])


def spread(loads: list[tuple[str, int]], key: str) -> list[str]:
    """The relay list for one agent: the least loaded relays first, in an order of its own.

    Relays within ``SPREAD_BAND`` tunnels of the least loaded count as equal;
    each agent gets them rotated by a hash of its identity, so a fleet
    enrolling or reconnecting at once spreads evenly instead of all taking
    the one relay that was least loaded at the last heartbeat. The more
    loaded follow, the least loaded first. An agent tries its list in order
    and moves to the next relay when one cannot be reached (agent/tunnel/relays.py).
    """
    if not loads:
        return []
    least = min(tunnels for _, tunnels in loads)
    near = [url for url, tunnels in loads if tunnels <= least + SPREAD_BAND]
    start = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(near)
    return near[start:] + near[:start] + [url for url, _ in loads if url not in near]


def relays_for(context: ControllerContext, key: str) -> list[str]:
    """What to tell the agent ``key`` (its identity URI) in its enrollment, renewal and AUTH_OK."""
    loads = context.relay_loads
    if not loads and not context.settings.serves_tunnels:
        # A controller that carries no tunnels and knows of no relay yet (its list refreshes every
        # RELAY_LIST_REFRESH) asks the store now: a gateway enrolled with no relay could not run.
        loads = relay_loads(RelayBook(context.store, context.ca, context.audit, context.settings.relay_cert_lifetime)
                            .live(), None)
    return spread(loads, key) or list(context.relay_urls)
