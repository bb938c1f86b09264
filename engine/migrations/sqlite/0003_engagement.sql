-- Last sign of engagement (open/click reported by the campaigns tool) per (contact, list),
-- for the inactivity rule. Not consent: kept apart from the ledger.
CREATE TABLE engagement (
    contact_id TEXT NOT NULL REFERENCES contacts(id),
    list_id    TEXT NOT NULL,
    last_at    TEXT NOT NULL,
    PRIMARY KEY (contact_id, list_id)
);
