-- The pending rows of each kind in claim order (`claim_outbox_kinds`: one lane's kinds,
-- legal priority first, then oldest). Without it a lane's claim read every pending row of
-- every kind through `outbox_due` and sorted them: with 98,000 DOI mails queued, 80 ms per
-- mail claim on SQLite, on the store's one writer connection; 0.2 ms with it. Partial, so
-- finished rows (nearly all of a long-lived outbox) cost it nothing.
CREATE INDEX outbox_pending ON outbox (kind, priority, id) WHERE status = 'pending';
