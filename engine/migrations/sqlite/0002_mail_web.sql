-- Snapshots of everything a person was shown (rendered mails and pages), keyed by the
-- content hash the ledger's evidence names. Immutable, like the ledger.
CREATE TABLE snapshots (
    hash              TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    language          TEXT NOT NULL,
    template_version  TEXT NOT NULL,
    content           TEXT NOT NULL,
    created_at        TEXT NOT NULL
);

CREATE TRIGGER snapshots_no_update BEFORE UPDATE ON snapshots
BEGIN SELECT RAISE(ABORT, 'snapshots are immutable'); END;
CREATE TRIGGER snapshots_no_delete BEFORE DELETE ON snapshots
BEGIN SELECT RAISE(ABORT, 'snapshots are immutable'); END;
