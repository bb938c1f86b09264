//! Contacts, consents, ledger events and suppressions out of result rows, whichever library
//! fetched them: sqlx's rows (both backends, [`super::sql`]) and rusqlite's (the SQLite reads
//! of a link request, [`super::sqlite`]). One reader per type and one text per query, so the
//! two read paths cannot read differently.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};

use super::codec::{parse_json, parse_state};
use super::{Contact, StoreError, StoreResult, Suppressed};
use crate::consent::Consent;
use crate::ledger::LedgerEvent;

pub(crate) const CONTACT_COLS: &str =
    "id, email, erased, language, fields, crm_records, created_at, updated_at";
pub(crate) const CONSENT_COLS: &str = "list_id, state, since, signup_token, doi_mails, reminders_sent, confirmed_at, confirmed_token, last_seq";

pub(crate) const LEDGER_COLS: &str = "seq, event_id, at, contact_id, list_id, kind, from_state, to_state, source, evidence, evidence_sha256, prev_hash, hash";

/// A contact's ledger events, oldest first (`$1` the contact id).
pub(crate) static EVENTS_OF_CONTACT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {LEDGER_COLS} FROM ledger WHERE contact_id = $1 ORDER BY seq")
});

/// A contact's events on one list that changed its state or recorded a mail, oldest first
/// (`$1` the contact id, `$2` the list): what a link's binding and a consent's proof look
/// for, without the evidence-only events (a link fetched, a note) around them.
pub(crate) static CONSENT_EVENTS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {LEDGER_COLS} FROM ledger WHERE contact_id = $1 AND list_id = $2 \
         AND (from_state <> to_state OR kind LIKE '%\\_mail\\_sent' ESCAPE '\\') ORDER BY seq"
    )
});

/// A page of contacts in id order: those after `$1` (`''` for the first page), at most `$2`.
pub(crate) static CONTACTS_PAGE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {CONTACT_COLS} FROM contacts WHERE id > $1 ORDER BY id LIMIT $2")
});

/// The consents of `n` contacts (`$1` .. `$n`), with their `contact_id`, in no particular
/// order.
pub(crate) fn consents_of_contacts_sql(n: usize) -> String {
    let marks: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "SELECT contact_id, {CONSENT_COLS} FROM consents WHERE contact_id IN ({})",
        marks.join(", ")
    )
}

/// The suppression rows of `n` address hashes (`$1` .. `$n`), in no particular order.
pub(crate) fn suppressions_of_sql(n: usize) -> String {
    let marks: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "SELECT address_hash, reason, at FROM suppressions WHERE address_hash IN ({})",
        marks.join(", ")
    )
}

/// The link look-up: a contact (`$1`) and its consent on one list (`$2`), in one read. The two
/// column lists share no name, so they need no table prefix and each row reader finds its own.
pub static CONTACT_WITH_CONSENT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {CONTACT_COLS}, {CONSENT_COLS} FROM contacts c \
         LEFT JOIN consents s ON s.contact_id = c.id AND s.list_id = $2 WHERE c.id = $1"
    )
});

/// Typed column access by name; a value of the wrong type or a missing column is an error.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> StoreResult<String>;
    fn text_opt(&self, col: &str) -> StoreResult<Option<String>>;
    fn int32(&self, col: &str) -> StoreResult<i32>;
    fn int64(&self, col: &str) -> StoreResult<i64>;
    fn flag(&self, col: &str) -> StoreResult<bool>;
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, col: &str) -> StoreResult<String> {
        Ok(self.get(col)?)
    }
    fn text_opt(&self, col: &str) -> StoreResult<Option<String>> {
        Ok(self.get(col)?)
    }
    fn int32(&self, col: &str) -> StoreResult<i32> {
        Ok(self.get(col)?)
    }
    fn int64(&self, col: &str) -> StoreResult<i64> {
        Ok(self.get(col)?)
    }
    fn flag(&self, col: &str) -> StoreResult<bool> {
        Ok(self.get(col)?)
    }
}

pub(crate) fn parse_time(table: &'static str, s: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt {
            table,
            detail: format!("bad timestamp `{s}`: {e}"),
        })
}

/// A contact's CRM records, stored as a JSON array of `Module/id` texts; parsed here, once, so
/// nothing after the store splits them again.
pub(crate) fn parse_records(text: &str) -> StoreResult<Vec<optinsync_plugin_api::RecordRef>> {
    let texts: Vec<String> = parse_json("contacts", text)?;
    texts
        .iter()
        .map(|t| {
            t.parse().map_err(
                |e: optinsync_plugin_api::InvalidRecordRef| StoreError::Corrupt {
                    table: "contacts",
                    detail: e.to_string(),
                },
            )
        })
        .collect()
}

/// A row holding [`CONTACT_COLS`].
pub(crate) fn contact_from(row: &impl Columns) -> StoreResult<Contact> {
    Ok(Contact {
        id: row.text("id")?,
        email: row.text("email")?,
        erased: row.flag("erased")?,
        language: row.text_opt("language")?,
        fields: parse_json("contacts", &row.text("fields")?)?,
        crm_records: parse_records(&row.text("crm_records")?)?,
        created_at: parse_time("contacts", &row.text("created_at")?)?,
        updated_at: parse_time("contacts", &row.text("updated_at")?)?,
    })
}

/// A row holding [`CONSENT_COLS`]: the list and the consent on it.
pub(crate) fn consent_from(row: &impl Columns) -> StoreResult<(String, Consent)> {
    let consent = Consent {
        state: parse_state("consents", &row.text("state")?)?,
        since: parse_time("consents", &row.text("since")?)?,
        signup_token: row.text_opt("signup_token")?,
        doi_mails: u32::try_from(row.int32("doi_mails")?).unwrap_or(0),
        reminders_sent: u32::try_from(row.int32("reminders_sent")?).unwrap_or(0),
        confirmed_at: row
            .text_opt("confirmed_at")?
            .map(|s| parse_time("consents", &s))
            .transpose()?,
        confirmed_token: row.text_opt("confirmed_token")?,
        last_seq: Some(row.int64("last_seq")?),
    };
    Ok((row.text("list_id")?, consent))
}

/// A row of [`CONTACT_WITH_CONSENT_SQL`]: no consent when the outer join found none.
pub(crate) fn contact_with_consent_from(
    row: &impl Columns,
) -> StoreResult<(Contact, Option<Consent>)> {
    let contact = contact_from(row)?;
    let consent = match row.text_opt("list_id")? {
        Some(_) => Some(consent_from(row)?.1),
        None => None,
    };
    Ok((contact, consent))
}

/// A row holding [`LEDGER_COLS`].
pub(crate) fn event_from(row: &impl Columns) -> StoreResult<LedgerEvent> {
    Ok(LedgerEvent {
        seq: row.int64("seq")?,
        event_id: row.text("event_id")?,
        at: row.text("at")?,
        contact_id: row.text("contact_id")?,
        list_id: row.text("list_id")?,
        kind: row.text("kind")?,
        from_state: row.text("from_state")?,
        to_state: row.text("to_state")?,
        source: row.text("source")?,
        evidence: row.text("evidence")?,
        evidence_sha256: row.text_opt("evidence_sha256")?,
        prev_hash: row.text("prev_hash")?,
        hash: row.text("hash")?,
    })
}

/// A row of the suppression list.
pub(crate) fn suppressed_from(row: &impl Columns) -> StoreResult<Suppressed> {
    Ok(Suppressed {
        address_hash: row.text("address_hash")?,
        reason: row.text("reason")?,
        at: parse_time("suppressions", &row.text("at")?)?,
    })
}
