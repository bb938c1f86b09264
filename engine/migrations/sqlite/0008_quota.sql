-- Shared vendor quota budgets (QuotaLedger): several instances take their calls from one
-- budget per endpoint. `quota_keys` holds one row per endpoint (the row every take locks,
-- and Zoho's lock-out end); `quota_buckets` the calls per window bucket (sliding windows of
-- 60 buckets). Times are epoch milliseconds.
CREATE TABLE quota_keys (
    key          TEXT PRIMARY KEY,
    locked_until INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE quota_buckets (
    key       TEXT NOT NULL,
    length_ms INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    used      INTEGER NOT NULL,
    PRIMARY KEY (key, length_ms, bucket)
);
-- Small named sets connectors share across instances (SharedMarks), e.g. the addresses
-- optinsync removed from a Zoho Campaigns list itself (not to be read back as unsubscribes).
CREATE TABLE shared_marks (
    set_name TEXT NOT NULL,
    member   TEXT NOT NULL,
    PRIMARY KEY (set_name, member)
);
