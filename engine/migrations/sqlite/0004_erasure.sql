-- GDPR erasure: events hash a digest of their evidence, so erasure can replace the evidence
-- text by a marker and the chain still verifies. Older rows (digest NULL) hash the text.
ALTER TABLE ledger ADD COLUMN evidence_sha256 TEXT;

-- The one change ever allowed on a ledger row: erasure redacting a digest-covered evidence.
DROP TRIGGER ledger_no_update;
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
WHEN NOT (
    NEW.evidence = '{"erased":true}' AND OLD.evidence_sha256 IS NOT NULL
    AND NEW.evidence_sha256 IS OLD.evidence_sha256
    AND NEW.seq = OLD.seq AND NEW.event_id = OLD.event_id AND NEW.at = OLD.at
    AND NEW.contact_id = OLD.contact_id AND NEW.list_id = OLD.list_id AND NEW.kind = OLD.kind
    AND NEW.from_state = OLD.from_state AND NEW.to_state = OLD.to_state AND NEW.source = OLD.source
    AND NEW.prev_hash = OLD.prev_hash AND NEW.hash = OLD.hash
)
BEGIN SELECT RAISE(ABORT, 'ledger is append-only (only erasure may redact evidence)'); END;
