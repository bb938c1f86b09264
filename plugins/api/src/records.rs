//! What a CRM connector exchanges with the engine: records, pages of its change feed, and the
//! consent written back.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ConsentState;

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

/// A person who signed up on the organisation's website, for the CRM to create (or update,
/// matched by address) with the consent as it stands ([`crate::CrmConnector::upsert_contact`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewContact {
    /// Idempotency key: the same for every attempt (the outbox row's key).
    pub key: String,
    pub email: String,
    /// As the person gave it (cleaned of control characters).
    pub name: Option<String>,
    pub language: Option<String>,
    /// The optinsync list the signup was for.
    pub list: String,
    /// Consent state on that list when the write is made (`pending`, later `confirmed`).
    pub state: ConsentState,
    pub at: DateTime<Utc>,
}

/// Consent written back to the CRM after each consent change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentWriteBack {
    /// Idempotency key: the same for every attempt of this write-back (the outbox row's key).
    pub key: String,
    pub records: Vec<RecordRef>,
    pub email: String,
    pub list: String,
    /// Consent state after the change.
    pub state: ConsentState,
    /// Whether the CRM's marketing opt-out flag must be set.
    pub opt_out: bool,
    pub at: DateTime<Utc>,
    /// Ledger event sequence number the write-back reflects (for idempotency and audit).
    pub ledger_seq: i64,
}
