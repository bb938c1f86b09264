-- Named leases: one instance at a time runs the sync pass (CRM and campaigns polling,
-- the rules pass); another takes over when the holder stops renewing.
CREATE TABLE leases (
    name   TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  TEXT NOT NULL
);
