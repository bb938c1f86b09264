//! What a campaigns connector exchanges with the engine: subscribers, per-item batch results,
//! status events from inside the tool, member listings.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ConnectorError, ConnectorResult, Cursor};

/// A confirmed contact to put on a Campaigns list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscriber {
    pub email: String,
    pub language: Option<String>,
    pub fields: BTreeMap<String, serde_json::Value>,
    /// The double opt-in this subscription rests on, from the ledger, for a tool that keeps
    /// opt-in evidence of its own (Mailchimp's `timestamp_opt`, `ip_opt`). Set on subscribes;
    /// `None` in member listings and on requests of the tool's own double opt-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<ConsentProof>,
}

/// When (and from where) a person confirmed, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentProof {
    /// When the confirmation was recorded.
    pub confirmed_at: DateTime<Utc>,
    /// The address the confirmation came from (absent for a confirmation the campaigns tool
    /// ran, or evidence purged by retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_ip: Option<String>,
    /// When the confirmation was asked for (the DOI mail went out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
}

/// One write with its idempotency key: the same key for every attempt of this work item (the
/// engine's outbox key), so a connector can recognise a re-sent item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyed<T> {
    pub key: String,
    pub item: T,
}

impl<T> Keyed<T> {
    pub fn new(key: impl Into<String>, item: T) -> Self {
        Self {
            key: key.into(),
            item,
        }
    }
}

/// The answer to a batch call: `Err` when the call as a whole failed (every item gets that
/// error), otherwise one result per item, in the order given. Partial success is normal.
pub type BatchResult = ConnectorResult<Vec<ConnectorResult<()>>>;

/// The same outcome for every one of `n` items (a connector whose vendor call is all or
/// nothing).
pub fn all_items(n: usize, outcome: ConnectorResult<()>) -> BatchResult {
    outcome.map(|()| vec![Ok(()); n])
}

/// Spread a batch answer over its `n` items: a whole-call failure applies to each; a result
/// list of the wrong length is the connector's bug, reported on every item as a temporary
/// failure (nothing is taken as done).
pub fn per_item(n: usize, answer: BatchResult) -> Vec<ConnectorResult<()>> {
    match answer {
        Err(e) => vec![Err(e); n],
        Ok(results) if results.len() == n => results,
        Ok(results) => vec![
            Err(ConnectorError::transient(format!(
                "connector answered {} results for {n} items",
                results.len()
            )));
            n
        ],
    }
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
    /// For [`StatusKind::Bounced`]: the class the tool reported (hard when it says nothing,
    /// as every bounce was taken before classes existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce: Option<crate::BounceClass>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusPage {
    pub events: Vec<StatusEvent>,
    pub next_cursor: Option<Cursor>,
    pub has_more: bool,
}

/// One page of a list's current members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberPage {
    pub members: Vec<Subscriber>,
    pub next_cursor: Option<Cursor>,
    pub has_more: bool,
}
