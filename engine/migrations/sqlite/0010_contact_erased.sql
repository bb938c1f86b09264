-- An erased contact is marked by a flag instead of an `erased:` prefix on its address. Its
-- email column keeps the keyed hash of the address: still unique (one per erased address), and
-- never an address (no `@`), so no lookup by address can find it.
ALTER TABLE contacts ADD COLUMN erased INTEGER NOT NULL DEFAULT 0;
UPDATE contacts SET erased = 1, email = substr(email, 8) WHERE substr(email, 1, 7) = 'erased:';
