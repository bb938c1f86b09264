//! Connector traits and the serde wire types they exchange with the optinsync engine.
//!
//! # Boundary
//!
//! This crate holds **types and traits only**: it performs no I/O, opens no sockets or files,
//! and depends on no runtime. Connectors (CRM, Campaigns, mail transport) implement the traits
//! in their own crates, compiled into the binary; the engine drives them. The records,
//! changes, messages, write-backs and [`ConnectorError`] are `serde`, so an out-of-process
//! connector protocol could carry them; no such protocol exists yet.
//!
//! Consent is never decided here. A connector reports what an outside system says
//! (a CRM field, an unsubscribe inside the Campaigns tool); the engine's state machine decides
//! what that means.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// An opaque position in a connector's change feed. Only the connector that produced it may
/// interpret it; the engine stores it and hands it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(pub String);

/// A reference to one record in the CRM (module + id), e.g. `Contacts/4150868000000624001`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordRef {
    pub module: String,
    pub id: String,
}

impl fmt::Display for RecordRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.module, self.id)
    }
}

/// A reference's text form (`Module/id`) names no module or no id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a CRM record reference (`Module/id`): {0:?}")]
pub struct InvalidRecordRef(pub String);

/// The text form, as [`fmt::Display`] writes it: split at the first `/` (a module name holds
/// none; an id may).
impl std::str::FromStr for RecordRef {
    type Err = InvalidRecordRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((module, id)) if !module.is_empty() && !id.is_empty() => Ok(RecordRef {
                module: module.to_owned(),
                id: id.to_owned(),
            }),
            _ => Err(InvalidRecordRef(s.to_owned())),
        }
    }
}

/// Compares with the text form, so a reference can be checked against `"Contacts/1"`.
impl PartialEq<str> for RecordRef {
    fn eq(&self, other: &str) -> bool {
        other
            .split_once('/')
            .is_some_and(|(m, id)| m == self.module && id == self.id)
    }
}

impl PartialEq<&str> for RecordRef {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for RecordRef {
    fn eq(&self, other: &String) -> bool {
        *self == *other.as_str()
    }
}

/// Serde of record references as their text form (`Module/id`), for where the engine stores
/// or shows them (a contact's records, an outbox payload, exports). The wire types above keep
/// the `{module, id}` shape connectors exchange. `#[serde(with = "record_ref_text")]` on a
/// `Vec<RecordRef>`; [`record_ref_text::option`] on an `Option<Vec<RecordRef>>`.
pub mod record_ref_text {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::RecordRef;

    pub fn serialize<S: Serializer>(refs: &[RecordRef], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(refs.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RecordRef>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| t.parse().map_err(D::Error::custom))
            .collect()
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            refs: &Option<Vec<RecordRef>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match refs {
                Some(refs) => super::serialize(refs, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<RecordRef>>, D::Error> {
            Option::<Vec<String>>::deserialize(d)?
                .map(|v| {
                    v.iter()
                        .map(|t| t.parse().map_err(D::Error::custom))
                        .collect()
                })
                .transpose()
        }
    }
}

/// One CRM record as the connector read it. `email` is as given by the CRM (not normalised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrmRecord {
    pub record: RecordRef,
    pub email: Option<String>,
    /// Language tag from the CRM (`en`, `es`, ...), if the mapping names one.
    pub language: Option<String>,
    /// The person explicitly opted out of marketing in the CRM (e.g. `Email_Opt_Out = true`).
    pub opted_out: bool,
    /// Names of the lists the CRM says this person asked for (consent *asserted*, not proven).
    pub asserted_lists: Vec<String>,
    /// Other mapped fields, passed to rules as `contact.fields`.
    pub fields: BTreeMap<String, serde_json::Value>,
    pub modified_at: Option<DateTime<Utc>>,
}

/// A record the connector could not turn into a [`CrmRecord`]; reported and skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidRecord {
    /// Where the record is (CRM id, or file and line for local connectors).
    pub location: String,
    pub reason: String,
}

/// One page of the CRM change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangePage {
    pub records: Vec<CrmRecord>,
    pub invalid: Vec<InvalidRecord>,
    /// Records deleted in the CRM since the cursor.
    pub deleted: Vec<RecordRef>,
    /// Cursor to store once this page is committed; `None` keeps the previous one.
    pub next_cursor: Option<Cursor>,
    /// More pages are available right now.
    pub has_more: bool,
}

/// A webhook call turned into what the engine should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WebhookEvent {
    /// Fetch these records now (incremental fetch of the named ids).
    Changed(Vec<RecordRef>),
    /// A callback the connector recognised but that needs no work (e.g. a channel ping).
    Ignored,
}

/// Consent written back to the CRM after each consent change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentWriteBack {
    pub records: Vec<RecordRef>,
    pub email: String,
    pub list: String,
    /// Consent state name after the change (`confirmed`, `withdrawn`, ...).
    pub state: String,
    /// Whether the CRM's marketing opt-out flag must be set.
    pub opt_out: bool,
    pub at: DateTime<Utc>,
    /// Ledger event sequence number the write-back reflects (for idempotency and audit).
    pub ledger_seq: i64,
}

/// A confirmed contact to put on a Campaigns list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscriber {
    pub email: String,
    pub language: Option<String>,
    pub fields: BTreeMap<String, serde_json::Value>,
}

/// What happened to an address inside the Campaigns tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusKind {
    Unsubscribed,
    Bounced,
    Complained,
    /// Engagement, not consent: feeds the inactivity rule.
    Opened,
    Clicked,
    /// The tool's own double opt-in was confirmed (only for lists whose confirmation the tool
    /// runs; weaker evidence than optinsync's own: no IP, user agent or text snapshot).
    Confirmed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub email: String,
    pub kind: StatusKind,
    pub at: DateTime<Utc>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusPage {
    pub events: Vec<StatusEvent>,
    pub next_cursor: Option<Cursor>,
    pub has_more: bool,
}

/// Last engagement of an address on a list, for the inactivity rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engagement {
    pub email: String,
    pub last_open: Option<DateTime<Utc>>,
    pub last_click: Option<DateTime<Utc>>,
}

/// A fully rendered mail, ready for a transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// Stable key: a transport that can deduplicate must not send the same key twice.
    pub idempotency_key: String,
    /// `Message-ID` without angle brackets, chosen by the engine so it is in the ledger.
    pub message_id: String,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Extra headers, e.g. `List-Unsubscribe`.
    pub headers: Vec<(String, String)>,
}

/// Proof that a transport accepted a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    pub message_id: String,
    /// `true` when the transport recognised the idempotency key and did not send again.
    pub deduplicated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

/// Pacing a connector declares. The engine does not read it yet: the outbox hands a
/// connector one item per call, and a connector that must pace (Zoho Campaigns) paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest batch one call accepts.
    pub max_batch: usize,
    /// Calls per minute; `None` means no limit known.
    pub calls_per_minute: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 100,
            calls_per_minute: None,
        }
    }
}

/// What a temporary failure is about, so the engine can tell one bad record from a dead
/// service: only [`FailureScope::Service`] failures count against a connector's circuit
/// breaker; a [`FailureScope::Record`] failure retries that record alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureScope {
    /// The connection or the service as a whole: a timeout, a refused or broken connection,
    /// an HTTP 5xx or 429, a quota lock-out, an authentication problem. Other calls would
    /// most likely fail the same way. The default, so an unclassified failure stays cautious.
    #[default]
    Service,
    /// This one record only (this address, this list): the service answered, so it is
    /// alive, but not yet with what this record needs. Must never pause other records.
    Record,
}

/// Errors a connector reports. The variant tells the engine what to do with the work item.
///
/// `serde` as `{"kind": "transient", "message": ..., "retry_after_ms": ..., "scope": ...}`
/// (and `permanent`, `rejected`, `config`, `invalid_input`), so a connector outside the
/// process could report one; the wait is in whole milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorError {
    /// Try again later (network, 429, 5xx, or a "retry later" about one record).
    /// `retry_after` when the server said so; `scope` says whether the failure concerns the
    /// whole service or only this record.
    #[error("temporary failure: {message}")]
    Transient {
        message: String,
        #[serde(
            rename = "retry_after_ms",
            default,
            with = "millis",
            skip_serializing_if = "Option::is_none"
        )]
        retry_after: Option<Duration>,
        #[serde(default)]
        scope: FailureScope,
    },
    /// Will never succeed as asked (e.g. invalid address); goes to the dead letters.
    #[error("permanent failure: {message}")]
    Permanent { message: String },
    /// The address was rejected permanently by the receiving side (a hard bounce).
    #[error("address rejected: {message}")]
    Rejected { message: String },
    /// The connector is misconfigured; names the setting to fix.
    #[error("configuration error in `{setting}`: {message}")]
    Config { setting: String, message: String },
    /// A webhook or record that is not acceptable input.
    #[error("invalid input: {message}")]
    InvalidInput { message: String },
}

/// `Option<Duration>` as whole milliseconds on the wire.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

impl ConnectorError {
    /// A temporary failure of the service or the connection ([`FailureScope::Service`]).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
            scope: FailureScope::Service,
        }
    }
    /// A temporary failure of one record only ([`FailureScope::Record`]): retried with
    /// backoff, never counted against the connector's circuit breaker.
    pub fn record_transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
            scope: FailureScope::Record,
        }
    }
    /// The scope of a temporary failure; `None` for every other error (those prove the
    /// service answered, or are not about it).
    pub fn transient_scope(&self) -> Option<FailureScope> {
        match self {
            Self::Transient { scope, .. } => Some(*scope),
            _ => None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }
}

pub type ConnectorResult<T> = Result<T, ConnectorError>;

/// A CRM: the source of contacts and of asserted consent; receives consent write-back.
#[async_trait]
pub trait CrmConnector: Send + Sync + fmt::Debug {
    /// Changes since `cursor` (`None` = from the beginning), at most `limit` records.
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage>;
    /// One record, or `None` if it no longer exists.
    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>>;
    /// Turn a webhook call into work. Forged or unknown callbacks are `InvalidInput`.
    fn parse_webhook(
        &self,
        headers: &[(String, String)],
        body: &[u8],
    ) -> ConnectorResult<WebhookEvent>;
    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()>;
    async fn health(&self) -> ConnectorResult<Health>;
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Periodic upkeep besides the change feed, e.g. registering or renewing a webhook
    /// channel before it expires. The daemon calls it about once per sync pass; it must be
    /// cheap when nothing is due. A failure is logged and polling goes on. Default: nothing.
    async fn maintain(&self) -> ConnectorResult<()> {
        Ok(())
    }
}

/// A campaigns tool: holds the marketing lists; only confirmed contacts go on them.
#[async_trait]
pub trait CampaignsConnector: Send + Sync + fmt::Debug {
    /// Add or update subscribers on `list`. Must be idempotent.
    async fn subscribe(&self, list: &str, subscribers: &[Subscriber]) -> ConnectorResult<()>;
    /// Take addresses off `list`. Must be idempotent.
    async fn remove(&self, list: &str, emails: &[String]) -> ConnectorResult<()>;
    /// Unsubscribes, bounces and complaints that happened inside the tool since `cursor`.
    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage>;
    /// Last open/click per address, where the tool reports it. Not called by the engine yet:
    /// engagement reaches the ledger through [`CampaignsConnector::status_events`] (opens and
    /// clicks as status events) where a connector reports it.
    async fn engagement(&self, list: &str, emails: &[String]) -> ConnectorResult<Vec<Engagement>>;
    async fn health(&self) -> ConnectorResult<Health>;
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Ask the tool to run its own double opt-in for this person on `list` (a list whose
    /// confirmation the tool runs). Must be idempotent. Default: not supported.
    async fn request_doi(&self, list: &str, subscriber: &Subscriber) -> ConnectorResult<()> {
        let _ = (list, subscriber);
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot run a double opt-in".into(),
        })
    }
    /// Current members of `list`, a page at a time (`None` = from the start), for taking an
    /// existing list into the ledger (`optinsync campaign import-existing`). Default: not
    /// supported.
    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let _ = (list, cursor);
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot list members".into(),
        })
    }
    /// Opaque connector state the engine persists and hands back at start-up through
    /// [`Self::import_state`], e.g. how much of each API quota was used and until when an
    /// endpoint is locked, so that a restart does not reset the budgets. Only the connector
    /// interprets it. `None` (the default) means there is nothing to keep.
    fn export_state(&self) -> Option<String> {
        None
    }
    /// Take back state from an earlier [`Self::export_state`] (called once at start-up,
    /// before other calls). State the connector cannot read is an error saying why; the
    /// engine should log it and go on with fresh state. Default: ignore it.
    fn import_state(&self, state: &str) -> ConnectorResult<()> {
        let _ = state;
        Ok(())
    }
}

/// One page of a list's current members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberPage {
    pub members: Vec<Subscriber>,
    pub next_cursor: Option<Cursor>,
    pub has_more: bool,
}

/// A mail transport for DOI, reminder and re-permission mails.
#[async_trait]
pub trait MailTransport: Send + Sync + fmt::Debug {
    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage>;
    async fn health(&self) -> ConnectorResult<Health>;
    fn limits(&self) -> Limits {
        Limits {
            max_batch: 1,
            calls_per_minute: None,
        }
    }
    /// Erasure (GDPR Art. 17): delete every copy this transport keeps of the messages sent
    /// under these idempotency keys ([`OutgoingMessage::idempotency_key`]); keys it never
    /// sent are ignored. Returns how many copies were deleted. Transports that keep no copy
    /// (SMTP hands the message over) keep this default.
    async fn forget(&self, idempotency_keys: &[String]) -> ConnectorResult<u64> {
        let _ = idempotency_keys;
        Ok(0)
    }
}

/// One quota window of a vendor API: at most `limit` calls per `length_ms` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaWindow {
    pub limit: u32,
    pub length_ms: i64,
}

/// What a [`QuotaLedger`] says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSlot {
    /// Send now: the call was counted in every window at this time (epoch ms).
    Go(i64),
    /// A window is full: ask again after this long.
    Wait(Duration),
    /// The vendor locked the endpoint: no call for this long.
    Locked(Duration),
}

/// Quota budgets shared by every instance that calls one vendor account, so that several
/// daemons together stay within the vendor's limits. The engine implements it over its store
/// and hands it to a connector at construction; a connector without one keeps its budgets in
/// memory (one instance).
///
/// Windows slide: each is kept as 60 buckets of `length_ms / 60`, and a bucket counts until it
/// has left the window entirely, so the count is never lower than the vendor's, whatever its
/// window alignment. Times are wall-clock epoch milliseconds: instances need synchronised
/// clocks (as for the store's leases).
#[async_trait]
pub trait QuotaLedger: Send + Sync + fmt::Debug {
    /// Count one call of `key` in every window if each has room and the key is not locked;
    /// atomic across instances.
    async fn take(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<QuotaSlot>;
    /// The call counted at `sent_ms` got its answer at `done_ms`: count it there instead, so a
    /// slow answer cannot make two calls look further apart than the vendor saw them.
    async fn settle(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        sent_ms: i64,
        done_ms: i64,
    ) -> ConnectorResult<()>;
    /// The vendor locked `key` until `until_ms`: every instance pauses it until then.
    async fn lock(&self, key: &str, until_ms: i64) -> ConnectorResult<()>;
    /// Calls counted now, one number per window, and the lock end if locked.
    async fn usage(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<(Vec<u32>, Option<i64>)>;
}

/// Small named sets shared by every instance on one database, for connector bookkeeping that
/// must not depend on which instance did what — e.g. the addresses optinsync itself removed
/// from a campaigns list, so that the status poll (run by whichever instance holds its lease)
/// does not take that removal for the person's own unsubscribe. Implemented by the engine over
/// its store; a connector without one keeps such sets in memory (one instance).
#[async_trait]
pub trait SharedMarks: Send + Sync + fmt::Debug {
    /// Add `member` to `set` (idempotent).
    async fn mark(&self, set: &str, member: &str) -> ConnectorResult<()>;
    /// Take these members out of `set`.
    async fn unmark(&self, set: &str, members: &[String]) -> ConnectorResult<()>;
    /// Every member of `set`.
    async fn marked(&self, set: &str) -> ConnectorResult<Vec<String>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_errors_round_trip_as_tagged_json() {
        let errors = [
            ConnectorError::Transient {
                message: "429".into(),
                retry_after: Some(Duration::from_millis(1500)),
                scope: FailureScope::Record,
            },
            ConnectorError::transient("connection reset"),
            ConnectorError::Permanent {
                message: "no such list".into(),
            },
            ConnectorError::Rejected {
                message: "550 5.1.1".into(),
            },
            ConnectorError::Config {
                setting: "api_key".into(),
                message: "missing".into(),
            },
            ConnectorError::InvalidInput {
                message: "not JSON".into(),
            },
        ];
        for e in errors {
            let json = serde_json::to_string(&e).expect("serialises");
            let back: ConnectorError = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, e, "{json}");
        }
        let json = serde_json::to_value(ConnectorError::Transient {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(2)),
            scope: FailureScope::Service,
        })
        .expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"kind": "transient", "message": "slow down",
                               "retry_after_ms": 2000, "scope": "service"})
        );
    }

    #[test]
    fn a_connector_error_from_outside_is_read_strictly() {
        // Scope and wait may be left out: a service-wide failure without a named wait.
        let e: ConnectorError =
            serde_json::from_str(r#"{"kind": "transient", "message": "x"}"#).expect("parses");
        assert_eq!(e, ConnectorError::transient("x"));
        for bad in [
            r#"{"kind": "fatal", "message": "x"}"#,
            r#"{"kind": "permanent"}"#,
            r#"{"kind": "permanent", "message": "x", "extra": 1}"#,
            r#"{"message": "x"}"#,
        ] {
            assert!(
                serde_json::from_str::<ConnectorError>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn record_refs_parse_their_text_form_once() {
        let r: RecordRef = "Contacts/4150868000000624001".parse().expect("valid");
        assert_eq!(
            (r.module.as_str(), r.id.as_str()),
            ("Contacts", "4150868000000624001")
        );
        assert_eq!(r.to_string(), "Contacts/4150868000000624001");
        // Split at the first `/`, as the string-typed code did: an id may hold one.
        let odd: RecordRef = "Leads/a/b".parse().expect("valid");
        assert_eq!((odd.module.as_str(), odd.id.as_str()), ("Leads", "a/b"));
        assert_eq!(odd.to_string(), "Leads/a/b");
        for bad in ["", "Contacts", "/1", "Contacts/"] {
            assert_eq!(
                bad.parse::<RecordRef>(),
                Err(InvalidRecordRef(bad.to_owned()))
            );
        }
        assert!(r == "Contacts/4150868000000624001" && r != "Contacts/1");
    }

    #[test]
    fn text_serde_keeps_the_stored_strings() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Row {
            #[serde(with = "record_ref_text")]
            records: Vec<RecordRef>,
            #[serde(default, with = "record_ref_text::option")]
            carried: Option<Vec<RecordRef>>,
        }
        let json = serde_json::json!({ "records": ["Contacts/1", "Leads/2"], "carried": null });
        let row: Row = serde_json::from_value(json.clone()).expect("reads");
        assert_eq!(row.records, ["Contacts/1", "Leads/2"]);
        assert_eq!(serde_json::to_value(&row).ok(), Some(json));
        assert!(serde_json::from_value::<Row>(serde_json::json!({ "records": ["nope"] })).is_err());
    }
}
