"""The store's schema: its tables on both engines, what was added to them since, and its version.

The schema grows in one obvious step per change, on both engines:
- a table or an index: append its ``CREATE ... IF NOT EXISTS`` to ``SCHEMA``;
- a column of an existing table: append it to ``ADDED_COLUMNS`` (an index on it to ``ADDED_INDEXES``);
- a table nobody may rewrite: add it to ``APPEND_ONLY_TABLES``;
- rows to rewrite once: a function in ``MIGRATIONS`` (controller/store.py) under the new version;
and raise ``SCHEMA_VERSION`` by one (tests/controller/test_store_schema.py
checks that it was). Every open applies what is missing and records the
version; a controller refuses a store of a newer version before writing
anything, in one sentence (``StoreTooNew``).
"""

from __future__ import annotations

import sqlite3

#: The schema this code reads and writes; raise it with every change to SCHEMA,
#: ADDED_COLUMNS, APPEND_ONLY_TABLES or MIGRATIONS (see above).
SCHEMA_VERSION = 7

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    enrolled_at REAL,
    cert_not_after REAL,
    key_sha256 TEXT,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_key_sha256 TEXT,
    -- Set when a newer token of the identity was created (this one unused) or
    -- redeemed: the token enrolls nothing any more (controller/tokens.py).
    superseded_at REAL,
    superseded_by TEXT,
    -- The token's iss: the URL this controller minted it under.
    issuer TEXT
);
CREATE TABLE IF NOT EXISTS services (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS policies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    identities TEXT NOT NULL,
    services TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    purpose TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    key_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    fields TEXT NOT NULL
);
-- Every status change (revoked, disabled, enabled) and every change of an
-- identity's key (status 'rekeyed'), in order: each controller process polls
-- it by seq (the primary key index) to close tunnels it holds.
CREATE TABLE IF NOT EXISTS status_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    time REAL NOT NULL
);
-- Renewal looks an identity up by the SHA-256 of its enrolled key, and a key
-- no identity holds up among the certificates (whose key was it?): indexed,
-- because anyone may send such a request.
CREATE INDEX IF NOT EXISTS identities_by_key ON identities (key_sha256);
CREATE INDEX IF NOT EXISTS certificates_by_key ON certificates (key_sha256);
-- A new token, and every redemption, supersedes the identity's other tokens.
CREATE INDEX IF NOT EXISTS tokens_by_identity ON tokens (tenant, name);
-- Presence (controller/presence.py): each controller process writes the rows
-- of its own tunnels, keyed by its relay id, in batches; readers merge them.
CREATE TABLE IF NOT EXISTS presence (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    relay TEXT NOT NULL,
    online INTEGER NOT NULL,
    connected_since REAL,
    last_seen REAL NOT NULL,
    remote TEXT,
    keepalive_s REAL,
    report TEXT,
    report_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, name, relay)
);
-- One heartbeat row per controller process: rows of a process whose heartbeat stopped read as offline.
CREATE TABLE IF NOT EXISTS presence_relays (
    relay TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- People who signed in through an identity provider (controller/signin/): the
-- identity (tenant, name) of kind person; (provider, subject) says who they are.
CREATE TABLE IF NOT EXISTS people (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    subject TEXT NOT NULL,
    display_name TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at REAL NOT NULL,
    signed_in_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
-- Just-in-time grants (controller/grants.py): a person's request, an approver's
-- answer, and the policy an approval created; one correlation id for its whole story.
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    requester TEXT NOT NULL,
    service TEXT NOT NULL,
    duration REAL NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    correlation TEXT NOT NULL,
    requested_at REAL NOT NULL,
    pending_until REAL NOT NULL,
    decided_by TEXT,
    decided_at REAL,
    policy_id INTEGER
);
CREATE INDEX IF NOT EXISTS grants_by_status ON grants (status, pending_until);
CREATE UNIQUE INDEX IF NOT EXISTS people_by_subject ON people (provider, subject);
-- A person's session: only the SHA-256 of the bearer is kept.
CREATE TABLE IF NOT EXISTS person_sessions (
    token_sha256 TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL
);
-- ID tokens and nonces already used to sign in, until they expire: none is accepted twice.
CREATE TABLE IF NOT EXISTS signin_seen (
    digest TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
-- Relays (controller/relays.py): added by an operator with a one-time token
-- (only its SHA-256 kept), enrolled with a key of their own, then each
-- running relay's heartbeat, public address and tunnel count.
CREATE TABLE IF NOT EXISTS relays (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    status TEXT NOT NULL,
    token_sha256 TEXT,
    token_expires_at REAL,
    key_sha256 TEXT,
    serial TEXT,
    not_after REAL,
    created_at REAL NOT NULL,
    enrolled_at REAL,
    started_at REAL,
    heartbeat_at REAL,
    tunnels INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS relays_by_key ON relays (key_sha256);
-- Which relay hosts which service (controller/relay/directory.py): each relay
-- writes the services its tunnels bind, with the gateway binding each, in
-- batches; a relay whose heartbeat is stale is ignored by readers.
CREATE TABLE IF NOT EXISTS relay_services (
    tenant TEXT NOT NULL,
    service TEXT NOT NULL,
    relay TEXT NOT NULL,
    gateway TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, service, relay, gateway)
);
CREATE INDEX IF NOT EXISTS relay_services_by_relay ON relay_services (relay);
"""

#: Columns added after a store could first have been created; ``CREATE TABLE IF
#: NOT EXISTS`` leaves an older table as it is, so each is added when missing.
ADDED_COLUMNS = (
    ("tokens", "superseded_at", "REAL"),
    ("tokens", "superseded_by", "TEXT"),
    ("tokens", "issuer", "TEXT"),
    # An audit event's correlation id, and the identity and service it names,
    # copied from its fields so the audit and connection filters use an index.
    ("audit", "correlation", "TEXT"),
    ("audit", "identity", "TEXT"),
    ("audit", "service", "TEXT"),
    # The event's link in the keyed hash chain (controller/audit_chain.py); NULL on rows from before it.
    ("audit", "mac", "TEXT"),
    # Policies are edited in place (version counts the edits), may expire, and
    # keep their own decision counters, written in batches (controller/policy_counters.py).
    ("policies", "version", "INTEGER"),
    ("policies", "updated_at", "REAL"),
    ("policies", "expires_at", "REAL"),
    ("policies", "expiry_recorded_at", "REAL"),
    ("policies", "decisions", "INTEGER"),
    ("policies", "last_allowed_at", "REAL"),
    # How a dial of a service bound by several gateways picks one: NULL, refuse
    # with the choices (dial SERVICE@GATEWAY); 'any', the latest bound (controller/aiming.py).
    ("services", "choose", "TEXT"),
    # The ports a service declares (a JSON list; NULL: none), each dialed as SERVICE:PORT.
    ("services", "ports", "TEXT"),
    # The correlation id of the grant a policy was created for (controller/grants.py): its dials and expiry share it.
    ("policies", "correlation", "TEXT"),
    # SHA-256 of an issued certificate's DER: a relay recognises the very certificate its CA issued
    # by its bytes, without verifying the CA's signature again (controller/relay/admit_cache.py).
    # NULL on rows from before it: those certificates are verified as before.
    ("certificates", "der_sha256", "TEXT"),
)
#: Indexes on ADDED_COLUMNS: created once the columns exist.
ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_by_correlation ON audit (correlation)",
    "CREATE INDEX IF NOT EXISTS audit_by_identity ON audit (identity, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_service ON audit (service, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_event ON audit (event, id)",
)

#: Tables no process, not even this one, may update, delete from or empty:
#: history is never rewritten. Each engine enforces it with its own triggers.
APPEND_ONLY_TABLES = ("audit",)


def split_statements(script: str) -> list[str]:
    """Complete SQL statements of ``script``, comment lines left out (a trigger holds ';' inside BEGIN...END)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
