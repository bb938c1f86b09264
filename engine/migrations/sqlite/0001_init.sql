-- optinsync schema, SQLite. Timestamps are RFC 3339 UTC text with microseconds (sortable).
CREATE TABLE contacts (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    language    TEXT,
    fields      TEXT NOT NULL,
    crm_records TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- Projection of the ledger: current consent per (contact, list). Rebuildable from `ledger`.
CREATE TABLE consents (
    contact_id      TEXT NOT NULL REFERENCES contacts(id),
    list_id         TEXT NOT NULL,
    state           TEXT NOT NULL,
    since           TEXT NOT NULL,
    signup_token    TEXT,
    doi_mails       INTEGER NOT NULL,
    reminders_sent  INTEGER NOT NULL,
    confirmed_at    TEXT,
    confirmed_token TEXT,
    last_seq        INTEGER NOT NULL,
    PRIMARY KEY (contact_id, list_id)
);

CREATE TABLE ledger (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    at         TEXT NOT NULL,
    contact_id TEXT NOT NULL,
    list_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    source     TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX ledger_by_contact ON ledger (contact_id, seq);

-- Append-only: the database itself refuses edits; the hash chain detects them if someone
-- drops these triggers first.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    contact_id      TEXT NOT NULL,
    list_id         TEXT NOT NULL,
    payload         TEXT NOT NULL,
    event_seq       INTEGER,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    claimed_by      TEXT,
    claimed_until   TEXT,
    last_error      TEXT,
    note            TEXT,
    created_at      TEXT NOT NULL,
    done_at         TEXT
);
CREATE INDEX outbox_due ON outbox (status, priority, next_attempt_at);

CREATE TABLE cursors (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE suppressions (
    address_hash TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    at           TEXT NOT NULL
);
