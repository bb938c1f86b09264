-- GDPR erasure: events hash a digest of their evidence, so erasure can replace the evidence
-- text by a marker and the chain still verifies. Older rows (digest NULL) hash the text.
ALTER TABLE ledger ADD COLUMN evidence_sha256 TEXT;

-- The one change ever allowed on a ledger row: erasure redacting a digest-covered evidence.
-- Everything else (other updates, deletes, TRUNCATE) is refused.
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND NEW.evidence = '{"erased":true}' AND OLD.evidence_sha256 IS NOT NULL
       AND NEW.evidence_sha256 IS NOT DISTINCT FROM OLD.evidence_sha256
       AND (NEW.seq, NEW.event_id, NEW.at, NEW.contact_id, NEW.list_id, NEW.kind,
            NEW.from_state, NEW.to_state, NEW.source, NEW.prev_hash, NEW.hash)
           IS NOT DISTINCT FROM
           (OLD.seq, OLD.event_id, OLD.at, OLD.contact_id, OLD.list_id, OLD.kind,
            OLD.from_state, OLD.to_state, OLD.source, OLD.prev_hash, OLD.hash)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'ledger is append-only (only erasure may redact evidence)';
END;
$$;
