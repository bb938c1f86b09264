//! Persistence: the [`Store`] trait and its SQLite (embedded default) and PostgreSQL
//! (several daemons on one database) implementations.
//!
//! The trait is coarse on purpose: every method is one transaction, so "ledger event + consent
//! projection + outbox rows" can only be written together ([`Store::commit`]).

mod postgres;
mod rows;
mod sql;
mod sqlite;
pub mod windows;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::RecordRef;
use serde::{Deserialize, Serialize};

use crate::consent::Consent;
use crate::ledger::{LedgerEvent, NewEvent};
pub use crate::work::{OutboxWork, StoredWork};

pub use self::postgres::PostgresStore;
/// The link look-up's SQL (the bench measures it through sqlx beside the store's own path).
pub use self::rows::CONTACT_WITH_CONSENT_SQL;
pub use self::sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at `{url}`: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("store URL `{0}` is not supported: use `sqlite://PATH` or `postgres://...`")]
    UnsupportedUrl(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The SQLite reads of a link request, made through SQLite's C API rather than sqlx
    /// (`store/sqlite.rs`).
    #[error("database error (SQLite direct read): {0}")]
    DirectRead(#[from] rusqlite::Error),
    /// Another writer changed this consent since it was read; reload and decide again.
    #[error("consent of contact {contact_id} on list {list_id} changed concurrently")]
    Conflict { contact_id: String, list_id: String },
    #[error("corrupt row in `{table}`: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// The SQLite store's page-reader thread is gone (it panicked on a read).
    #[error("the SQLite store's page reader stopped (a read panicked; see the log above)")]
    PageReaderStopped,
    /// SQLite could not empty its WAL after an erasure (readers held it the whole time): the
    /// old pages may still be in the WAL file until the next checkpoint copies them over.
    #[error(
        "the SQLite WAL could not be emptied after an erasure within {seconds} s (readers kept it busy); run the erasure again or restart the daemon"
    )]
    WalBusy { seconds: u64 },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A contact, keyed by normalised email address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub id: String,
    /// The normalised address; once [`Contact::erased`], the keyed hash of the address it had
    /// (unique, and never an address).
    pub email: String,
    /// GDPR erasure forgot this contact's address, fields and records ([`Store::erase_contact`]);
    /// only its consent events and the hash stay.
    #[serde(default)]
    pub erased: bool,
    pub language: Option<String>,
    pub fields: BTreeMap<String, serde_json::Value>,
    /// CRM records that carry this address; stored and shown as `Module/id`.
    #[serde(with = "optinsync_plugin_api::record_ref_text")]
    pub crm_records: Vec<RecordRef>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a CRM record says about a contact.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactUpsert {
    pub email: String,
    pub language: Option<String>,
    pub fields: BTreeMap<String, serde_json::Value>,
    pub crm_record: Option<RecordRef>,
}

/// Priority of outbox work: removals and opt-outs have legal deadlines (invariant: removals
/// go first).
pub const PRIORITY_LEGAL: i32 = 0;
pub const PRIORITY_NORMAL: i32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOutbox {
    /// Stored as the row's `kind` and `payload` ([`OutboxWork::to_stored`]).
    pub work: OutboxWork,
    pub priority: i32,
    /// A second row with the same key is ignored (idempotent enqueue).
    pub idempotency_key: String,
    pub contact_id: String,
    pub list_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxItem {
    pub id: i64,
    /// Read from the row's `kind` and `payload`; shown (and serialised) as those.
    #[serde(flatten)]
    pub work: StoredWork,
    pub priority: i32,
    pub idempotency_key: String,
    pub contact_id: String,
    pub list_id: String,
    pub attempts: i32,
    pub status: String,
    pub last_error: Option<String>,
    pub event_seq: Option<i64>,
}

impl OutboxItem {
    /// The stored `kind` (also of a row whose work is unreadable).
    pub fn kind(&self) -> &str {
        self.work.kind()
    }
}

/// One claimed outbox row's end, as [`Store::finish_outbox_batch`] records it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxFinish {
    pub id: i64,
    /// The worker that claimed the row; a row whose claim moved on is left alone.
    pub worker: String,
    pub finish: Finish,
}

/// How a claimed outbox row ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// Delivered; `event` (e.g. `mail_sent` with its Message-ID) is appended in the same
    /// transaction.
    Done {
        event: Option<Box<NewEvent>>,
        note: Option<String>,
    },
    /// Temporary failure: try again at `at`.
    Retry { at: DateTime<Utc>, error: String },
    /// Permanent failure: kept as a dead letter with the reason.
    Dead { error: String },
    /// Not attempted (the connector's circuit is open, or shutdown): hand the row back for
    /// `at` without counting the attempt and without touching its last error.
    Postpone { at: DateTime<Utc> },
}

/// One atomic change of one (contact, list) consent.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub contact_id: String,
    pub list_id: String,
    /// `last_seq` of the consent that was read; the commit fails with `Conflict` otherwise.
    pub expected_seq: Option<i64>,
    pub consent: Consent,
    pub event: NewEvent,
    pub outbox: Vec<NewOutbox>,
    /// Add this address hash to the global suppression list.
    pub suppress: Option<Suppression>,
    /// Take these address hashes off the suppression list (an erased person's own signup,
    /// confirmed: the event says so).
    pub lift: Vec<String>,
    /// The mail this commit queues was let through by the list's sending plan: counted
    /// against the plan's caps in the same transaction ([`crate::waves`]).
    pub paced: Option<PacedSend>,
}

/// One mail a sending plan let through: counted under the day's total and, if the plan caps
/// the recipient's domain, under that domain's bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacedSend {
    pub mail_kind: crate::consent::MailKind,
    /// The plan day (whole plan days since the Unix epoch).
    pub day: i64,
    /// The domain bucket (`gmail.com`, `default`, ...), when the plan caps domains.
    pub bucket: Option<String>,
}

/// The bucket of a day's total in `wave_counts`.
pub const WAVE_TOTAL: &str = "*";

/// Mails a sending plan let through on one day, per kind and bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveCount {
    pub mail_kind: String,
    /// [`WAVE_TOTAL`] or a domain bucket.
    pub bucket: String,
    pub admitted: i64,
}

/// What became of a list's mails over some slots: the stop rules' figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailOutcomes {
    pub sent: i64,
    pub hard: i64,
    pub soft: i64,
    pub policy: i64,
    pub complaints: i64,
}

impl MailOutcomes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
    pub fn add(&mut self, o: &MailOutcomes) {
        self.sent += o.sent;
        self.hard += o.hard;
        self.soft += o.soft;
        self.policy += o.policy;
        self.complaints += o.complaints;
    }
}

/// Ledger events of one list grouped by kind and states: the campaign report's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventSummary {
    pub kind: String,
    pub from_state: String,
    pub to_state: String,
    pub events: i64,
    pub contacts: i64,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

/// One commit of a [`Store::commit_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchCommit {
    pub commit: Commit,
    /// Built on the outcome of the previous commit of the same (contact, list) in this batch,
    /// so its `expected_seq` is not checked: it is written if, and only if, that one is.
    pub follows: bool,
    /// `commit.event` but for its place in the chain, computed by [`BatchCommit::new`]: by
    /// the planner or the request that made it, not by the store's one writer (measured: the
    /// evidence JSON and its digest were ~0.6 s of a 100k-contact sync's ~3 s of commits).
    unsealed: crate::ledger::Unsealed,
}

impl BatchCommit {
    pub fn new(commit: Commit, follows: bool) -> Self {
        let unsealed = commit.event.unsealed();
        Self {
            commit,
            follows,
            unsealed,
        }
    }

    /// The commit's event, to be sealed at the chain's head.
    pub fn unsealed(&self) -> &crate::ledger::Unsealed {
        &self.unsealed
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    pub address_hash: String,
    pub reason: String,
}

/// A row of the suppression list: a keyed address hash, why, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suppressed {
    pub address_hash: String,
    /// The event kind that suppressed it (`bounced`, `erased`, `suppressed`, ...).
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A rendered mail or page exactly as shown, stored under its content hash (the hash the
/// ledger's evidence names). Written once, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub hash: String,
    /// `mail:doi`, `mail:reminder`, `page:confirm`, ...
    pub kind: String,
    pub language: String,
    /// Hash of the template set it was rendered from.
    pub template_version: String,
    /// The rendering: JSON `{"subject","text","html"}` for mails, the HTML for pages.
    pub content: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Erasure {
    pub contact_found: bool,
    pub redacted_events: u64,
    /// Events sealed before evidence digests existed: their evidence cannot be redacted
    /// without breaking the chain, so it stays.
    pub legacy_events: u64,
    pub scrubbed_outbox_rows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentSummary {
    pub list_id: String,
    pub state: String,
    pub count: i64,
    pub oldest_since: DateTime<Utc>,
    pub newest_since: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub done: i64,
    pub dead: i64,
}

/// A count per list and UTC day (`YYYY-MM-DD`) of one kind (a ledger event kind, or a
/// consent state): the operator console's charts and histograms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCount {
    pub list_id: String,
    pub day: String,
    pub kind: String,
    pub count: i64,
}

/// Distinct contacts per list that ever reached a consent state (the console's funnel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateReach {
    pub list_id: String,
    pub state: String,
    pub contacts: i64,
}

/// Outbox rows per list, kind and status, with the oldest row's creation time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxDepth {
    pub list_id: String,
    pub kind: String,
    pub status: String,
    pub count: i64,
    pub oldest: DateTime<Utc>,
}

/// A job lease ([`Store::try_lease`]) as stored: who holds it until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub until: DateTime<Utc>,
}

/// One endpoint's shared quota as stored ([`Store::quota_take`]): calls counted now in each
/// window it was taken under, and the vendor's lock-out end if one runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaUse {
    pub key: String,
    /// `(window length in ms, calls counted in it now)`, shortest window first.
    pub windows: Vec<(i64, u32)>,
    /// Epoch ms; only while it lies ahead.
    pub locked_until: Option<i64>,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Apply this backend's migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Insert or update the contact with this (normalised) email; merges CRM record ids.
    async fn upsert_contact(&self, c: &ContactUpsert, now: DateTime<Utc>) -> StoreResult<Contact>;
    /// [`Store::upsert_contact`] for a whole page in one transaction; the result is aligned
    /// with `batch` (records that share an address get the same contact, merged in order).
    async fn upsert_contacts(
        &self,
        batch: &[ContactUpsert],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Contact>>;
    async fn contact_by_email(&self, email: &str) -> StoreResult<Option<Contact>>;
    /// The erased contact whose address had this keyed hash ([`Store::erase_contact`]).
    async fn erased_contact_by_hash(&self, address_hash: &str) -> StoreResult<Option<Contact>>;
    /// Store this contact under another (normalised) address, unless another contact has it
    /// (`false`). For re-spelling addresses stored before canonicalisation; nothing else
    /// changes (`updated_at` included).
    async fn rename_contact(&self, contact_id: &str, email: &str) -> StoreResult<bool>;
    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>>;
    /// Contacts ordered by id, after `after` (paging for decision passes).
    async fn contacts_page(&self, after: Option<&str>, limit: i64) -> StoreResult<Vec<Contact>>;
    /// [`Store::contacts_page`] without the contacts created or changed at or after
    /// `updated_before` (those a pull just decided).
    async fn contacts_page_before(
        &self,
        after: Option<&str>,
        limit: i64,
        updated_before: DateTime<Utc>,
    ) -> StoreResult<Vec<Contact>>;

    /// These contacts, those that exist, in no particular order (batch read).
    async fn contacts_by_ids(&self, ids: &[String]) -> StoreResult<Vec<Contact>>;

    /// Consent of one pair; `None` if no event was ever recorded.
    async fn consent(&self, contact_id: &str, list_id: &str) -> StoreResult<Option<Consent>>;
    /// A contact and its consent to one list (`None` if it has none), as of one moment: a
    /// link's page needs both, and the backends read them in one query.
    async fn contact_with_consent(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Option<(Contact, Option<Consent>)>> {
        let Some(contact) = self.contact_by_id(contact_id).await? else {
            return Ok(None);
        };
        let consent = self.consent(contact_id, list_id).await?;
        Ok(Some((contact, consent)))
    }
    async fn consents_of_contact(&self, contact_id: &str) -> StoreResult<Vec<(String, Consent)>>;
    /// Every consent of these contacts as `(contact_id, list_id, consent)` (batch read).
    async fn consents_of_contacts(
        &self,
        contact_ids: &[String],
    ) -> StoreResult<Vec<(String, String, Consent)>>;
    /// Last engagement per `(contact_id, list_id)` of these contacts (batch read).
    async fn engagements_of_contacts(
        &self,
        contact_ids: &[String],
    ) -> StoreResult<Vec<(String, String, DateTime<Utc>)>>;
    /// Which of these address hashes are suppressed (batch read).
    async fn suppressed_among(&self, address_hashes: &[String]) -> StoreResult<Vec<String>>;

    /// Ledger event + consent projection + outbox rows + suppression, in one transaction.
    async fn commit(&self, c: &Commit) -> StoreResult<LedgerEvent>;
    /// Many commits in one transaction (bulk sync, rules passes, group commit of web
    /// requests): one lock, one chain read, multi-row inserts. Each commit is checked like
    /// [`Store::commit`]; one whose consent changed concurrently is left out (`None` at its
    /// index; so is every later commit that `follows` it) and the rest are written.
    async fn commit_batch(&self, commits: &[BatchCommit]) -> StoreResult<Vec<Option<LedgerEvent>>>;
    /// Append an event that changes no state (e.g. evidence of a fetched link).
    async fn append_event(&self, e: &NewEvent) -> StoreResult<LedgerEvent>;

    /// [`Store::append_event`] for many events, in order, in one transaction.
    async fn append_events(&self, events: &[NewEvent]) -> StoreResult<Vec<LedgerEvent>>;
    /// Append an event that changes no consent with the outbox rows it causes, in one
    /// transaction (a mail the person asked for that is not a consent change).
    async fn append_with_outbox(
        &self,
        event: &NewEvent,
        outbox: &[NewOutbox],
    ) -> StoreResult<LedgerEvent>;
    async fn events_of_contact(&self, contact_id: &str) -> StoreResult<Vec<LedgerEvent>>;
    /// A contact's events on `list_id` that changed its state or recorded a mail
    /// (`*_mail_sent`), oldest first: [`Store::events_of_contact`] of that list without the
    /// events that only add evidence.
    async fn consent_events(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Vec<LedgerEvent>>;
    /// Ledger events with `seq > after`, in order, at most `limit`.
    async fn ledger_page(&self, after: i64, limit: i64) -> StoreResult<Vec<LedgerEvent>>;

    /// Claim due outbox rows (legal priority first) for `lease_until`; safe across instances.
    async fn claim_outbox(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxItem>>;
    /// [`Store::claim_outbox`] for rows of these kinds only (a delivery lane: one connector's
    /// work, so a slow connector does not hold up another's).
    async fn claim_outbox_kinds(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
        kinds: &[&str],
    ) -> StoreResult<Vec<OutboxItem>>;
    async fn finish_outbox(
        &self,
        id: i64,
        worker: &str,
        finish: &Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// [`Store::finish_outbox`] for several rows in one transaction (one fsync).
    async fn finish_outbox_batch(
        &self,
        rows: &[OutboxFinish],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        for r in rows {
            self.finish_outbox(r.id, &r.worker, &r.finish, now).await?;
        }
        Ok(())
    }
    /// Free the claims of pending rows held by workers whose id starts with `prefix`, except
    /// `current`: a restarted instance takes back what its crashed predecessor (same prefix)
    /// had claimed, instead of waiting for the lease; its named leases (see [`Store::try_lease`])
    /// lapse at once too. Returns how many outbox rows were freed.
    async fn release_claims(&self, prefix: &str, current: &str) -> StoreResult<u64>;
    async fn outbox_counts(&self) -> StoreResult<OutboxCounts>;
    async fn outbox_dead(&self) -> StoreResult<Vec<OutboxItem>>;
    /// GDPR erasure of one contact: redact the evidence of its ledger events, mark it erased
    /// with `address_hash` in place of its address and clear its fields, scrub finished outbox
    /// payloads.
    /// The consent events themselves (and the chain) stay. Call [`Store::after_erasure`] after
    /// (once for a batch of erasures).
    async fn erase_contact(
        &self,
        contact_id: &str,
        address_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Erasure>;
    /// After an erased contact's data left the rows (erasure itself, or the delivery of the
    /// removal that still carried its address): make sure no older copy stays in the backend's
    /// files (SQLite: checkpoint and truncate the WAL; PostgreSQL: nothing, see SECURITY.md).
    async fn after_erasure(&self) -> StoreResult<()>;
    /// Put a dead letter back in the queue with fresh attempts; `false` if `id` is not dead.
    async fn retry_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Give up on a dead letter for good (kept as `dropped` for the record); `false` if `id`
    /// is not dead.
    async fn drop_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool>;

    /// Take or renew the lease `name` for `holder` until `until`; `false` while another holder's
    /// lease runs (it lapses at its `until`, so a dead holder is replaced).
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;
    async fn cursor(&self, name: &str) -> StoreResult<Option<String>>;

    /// What a list's sending plans let through on plan day `day` ([`Commit::paced`]).
    async fn wave_counts(&self, list_id: &str, day: i64) -> StoreResult<Vec<WaveCount>>;
    /// The first plan day a list's plan let a mail of each kind through: `(kind, day)`.
    async fn wave_first_days(&self, list_id: &str) -> StoreResult<Vec<(String, i64)>>;
    /// Add to a list's mail outcomes per slot: `(list_id, slot, outcomes)`.
    async fn add_mail_outcomes(&self, rows: &[(String, i64, MailOutcomes)]) -> StoreResult<()>;
    /// Make a list's held wave mails (pending `mail` rows marked `wave`) due at `now`: a
    /// resume lets them go at once. Returns how many.
    async fn release_waves(&self, list_id: &str, now: DateTime<Utc>) -> StoreResult<u64>;
    /// A list's mail outcomes summed over the slots from `from_slot` on.
    async fn mail_outcomes(&self, list_id: &str, from_slot: i64) -> StoreResult<MailOutcomes>;
    /// A list's ledger events grouped by kind, from and to state (a full read of the ledger:
    /// for reports, not for hot paths).
    async fn list_event_summary(&self, list_id: &str) -> StoreResult<Vec<EventSummary>>;
    async fn set_cursor(&self, name: &str, value: &str, now: DateTime<Utc>) -> StoreResult<()>;

    async fn is_suppressed(&self, address_hash: &str) -> StoreResult<bool>;
    /// The suppression-list rows of these hashes (an address's spellings under every key).
    async fn suppressions_of(&self, address_hashes: &[String]) -> StoreResult<Vec<Suppressed>>;
    /// The whole suppression list, oldest first.
    async fn suppressions(&self) -> StoreResult<Vec<Suppressed>>;
    /// Take these hashes off the suppression list and append `events` (which record why),
    /// in one transaction; returns how many rows went.
    async fn lift_suppressions(
        &self,
        address_hashes: &[String],
        events: &[NewEvent],
    ) -> StoreResult<u64>;

    /// Whether any of these hashes (one address under several keys) is suppressed.
    async fn is_any_suppressed(&self, address_hashes: &[String]) -> StoreResult<bool> {
        for h in address_hashes {
            if self.is_suppressed(h).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Store a snapshot; a second one with the same hash is ignored (content-addressed).
    async fn put_snapshot(&self, s: &Snapshot) -> StoreResult<()>;
    /// [`Store::put_snapshot`] for several in one transaction (one fsync).
    async fn put_snapshots(&self, snaps: &[Snapshot]) -> StoreResult<()> {
        for s in snaps {
            self.put_snapshot(s).await?;
        }
        Ok(())
    }
    async fn snapshot(&self, hash: &str) -> StoreResult<Option<Snapshot>>;

    /// Remember an open/click; keeps the latest time.
    async fn record_engagement(
        &self,
        contact_id: &str,
        list_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    async fn last_engagement(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Option<DateTime<Utc>>>;

    /// Contacts per (list, state) with the oldest and newest `since`, for `optinsync status`.
    async fn consent_summary(&self) -> StoreResult<Vec<ConsentSummary>>;

    /// Ledger events per list, UTC day and kind at or after `since` (console charts).
    async fn events_per_day(&self, since: DateTime<Utc>) -> StoreResult<Vec<DayCount>>;
    /// Distinct contacts per list that ever entered each state, from the ledger.
    async fn states_reached(&self) -> StoreResult<Vec<StateReach>>;
    /// Consents in `state` per list and UTC day of their `since` (the age histogram).
    async fn consents_per_day(&self, state: &str) -> StoreResult<Vec<DayCount>>;
    /// Unfinished (`pending`, `dead`) outbox rows per list, kind and status.
    async fn outbox_depth(&self) -> StoreResult<Vec<OutboxDepth>>;
    /// Every job lease, expired ones included.
    async fn leases(&self) -> StoreResult<Vec<Lease>>;
    /// `(address, state)` of every consent on `list_id` (erased contacts left out): the
    /// ledger's side of a drift comparison with the campaigns list.
    async fn list_consents(
        &self,
        list_id: &str,
    ) -> StoreResult<Vec<(String, crate::consent::ConsentState)>>;
    /// The newest ledger event's `seq` (0 for an empty ledger).
    async fn ledger_head(&self) -> StoreResult<i64>;
    /// The addresses pending removals from `list_id` will take off the campaigns list (the
    /// row's own address where it carries one, as an erased contact's does; else the
    /// contact's), as stored.
    async fn pending_removal_addresses(&self, list_id: &str) -> StoreResult<Vec<String>>;

    /// Shared vendor quotas ([`crate::quota`]): count one call of `key` in every window if
    /// each has room and the key is not locked. One transaction, serialised per key, so
    /// instances sharing the database share one budget.
    async fn quota_take(
        &self,
        key: &str,
        windows: &[optinsync_plugin_api::QuotaWindow],
        now_ms: i64,
    ) -> StoreResult<optinsync_plugin_api::QuotaSlot>;
    /// Move the call counted at `sent_ms` to `done_ms` (when its answer arrived).
    async fn quota_settle(
        &self,
        key: &str,
        windows: &[optinsync_plugin_api::QuotaWindow],
        sent_ms: i64,
        done_ms: i64,
    ) -> StoreResult<()>;
    /// The vendor locked `key`: no instance calls it before `until_ms`.
    async fn quota_lock(&self, key: &str, until_ms: i64) -> StoreResult<()>;
    /// Calls counted now per window, and the lock end if `key` is locked.
    async fn quota_usage(
        &self,
        key: &str,
        windows: &[optinsync_plugin_api::QuotaWindow],
        now_ms: i64,
    ) -> StoreResult<(Vec<u32>, Option<i64>)>;
    /// Every shared quota key with its use now ([`QuotaUse`]): the operator console.
    async fn quota_overview(&self, now_ms: i64) -> StoreResult<Vec<QuotaUse>>;
    /// Shared connector sets ([`crate::quota`]): add a member (idempotent).
    async fn mark_add(&self, set: &str, member: &str) -> StoreResult<()>;
    async fn mark_remove(&self, set: &str, members: &[String]) -> StoreResult<()>;
    async fn marks(&self, set: &str) -> StoreResult<Vec<String>>;
}

/// Open the store named by `url` (`sqlite://path` or `postgres://...`).
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(SqliteStore::open(path).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

/// Helpers shared by both backends for decoding rows kept as text/JSON.
pub(crate) mod codec {
    use super::*;
    use crate::consent::ConsentState;

    pub fn parse_state(table: &'static str, s: &str) -> StoreResult<ConsentState> {
        s.parse()
            .map_err(|e: crate::consent::UnknownState| StoreError::Corrupt {
                table,
                detail: e.to_string(),
            })
    }

    pub fn parse_json<T: serde::de::DeserializeOwned>(
        table: &'static str,
        s: &str,
    ) -> StoreResult<T> {
        serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
            table,
            detail: e.to_string(),
        })
    }

    pub fn to_json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
    }
}
