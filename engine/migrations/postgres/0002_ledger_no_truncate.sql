-- Row-level triggers do not fire on TRUNCATE; without this an emptied ledger would verify.
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
