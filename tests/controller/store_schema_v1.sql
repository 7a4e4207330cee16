
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
-- The audit log is append-only: no process, not even this one, rewrites history.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

