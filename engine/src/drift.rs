//! Drift between the ledger and a campaigns list: who is on the list without a confirmation
//! (the compliance alarm), who is confirmed but missing from it, and the removals not yet
//! carried out (unsubscribes have legal deadlines). [`compare`] is pure over the ledger's
//! consents, the connector's member listing and the outbox; [`Engine::drift`] gathers them.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use optinsync_plugin_api::Cursor;
use serde::Serialize;

use crate::config::ListConfig;
use crate::consent::ConsentState;
use crate::email;
use crate::engine::{Engine, EngineResult};
use crate::store::OutboxDepth;

/// One comparison of a list, as the operator console shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriftReport {
    pub list_id: String,
    pub computed_at: DateTime<Utc>,
    /// Members the campaigns tool listed.
    pub members: u64,
    /// On the campaigns list without a standing confirmation in the ledger, with the state the
    /// ledger has (`none` for an address it does not know).
    pub unconfirmed_on_list: Vec<(String, String)>,
    /// Confirmed in the ledger, not on the campaigns list.
    pub confirmed_missing: Vec<String>,
    /// Removals queued or dead, not yet carried out.
    pub pending_removals: i64,
    /// When the oldest of them was queued.
    pub oldest_removal: Option<DateTime<Utc>>,
}

/// Whether a person in this state may be on the campaigns list (a re-permission request
/// keeps a confirmed person on it until its grace ends).
fn may_be_on_list(state: ConsentState) -> bool {
    matches!(state, ConsentState::Confirmed | ConsentState::Revalidating)
}

/// Compare the ledger's `consents` of a list (normalised address, state) with the
/// campaigns tool's `members` (addresses as listed) and the outbox's unfinished rows.
pub fn compare(
    list_id: &str,
    consents: &[(String, ConsentState)],
    members: &[String],
    outbox: &[OutboxDepth],
    now: DateTime<Utc>,
) -> DriftReport {
    let ledger: BTreeMap<&str, ConsentState> =
        consents.iter().map(|(a, s)| (a.as_str(), *s)).collect();
    // The tool's spelling may differ from ours (case, Unicode form): compare canonical forms.
    let listed: BTreeSet<String> = members
        .iter()
        .map(|m| email::normalise(m).unwrap_or_else(|_| m.clone()))
        .collect();
    let unconfirmed_on_list = listed
        .iter()
        .filter_map(|a| match ledger.get(a.as_str()) {
            Some(s) if may_be_on_list(*s) => None,
            Some(s) => Some((a.clone(), s.as_str().to_owned())),
            None => Some((a.clone(), "none".to_owned())),
        })
        .collect();
    let confirmed_missing = ledger
        .iter()
        .filter(|(a, s)| **s == ConsentState::Confirmed && !listed.contains(**a))
        .map(|(a, _)| (*a).to_owned())
        .collect();
    let removals = outbox
        .iter()
        .filter(|d| d.list_id == list_id && d.kind == "campaigns_remove");
    DriftReport {
        list_id: list_id.to_owned(),
        computed_at: now,
        members: listed.len() as u64,
        unconfirmed_on_list,
        confirmed_missing,
        pending_removals: removals.clone().map(|d| d.count).sum(),
        oldest_removal: removals.map(|d| d.oldest).min(),
    }
}

impl Engine {
    /// Read the whole campaigns list of `list` (every page of the connector's member
    /// listing) and compare it with the ledger. Fails if the connector cannot list members.
    pub async fn drift(&self, list: &ListConfig) -> EngineResult<DriftReport> {
        let mut members = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = self.members_page(list, cursor.as_ref()).await?;
            members.extend(page.members.into_iter().map(|m| m.email));
            if !page.has_more || page.next_cursor.is_none() {
                break;
            }
            cursor = page.next_cursor;
        }
        let consents = self.store.list_consents(&list.id).await?;
        let outbox = self.store.outbox_depth().await?;
        Ok(compare(&list.id, &consents, &members, &outbox, Utc::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removal(list: &str, count: i64, oldest: &str) -> OutboxDepth {
        OutboxDepth {
            list_id: list.into(),
            kind: "campaigns_remove".into(),
            status: "pending".into(),
            count,
            oldest: oldest.parse().expect("time"),
        }
    }

    #[test]
    fn finds_each_kind_of_drift() {
        let consents = vec![
            ("ok@example.org".to_owned(), ConsentState::Confirmed),
            ("gone@example.org".to_owned(), ConsentState::Withdrawn),
            ("missing@example.org".to_owned(), ConsentState::Confirmed),
            ("asking@example.org".to_owned(), ConsentState::Revalidating),
        ];
        let members = vec![
            "OK@Example.org".to_owned(),
            "gone@example.org".to_owned(),
            "stranger@example.org".to_owned(),
            "asking@example.org".to_owned(),
        ];
        let outbox = vec![
            removal("news", 2, "2026-01-02T00:00:00Z"),
            removal("news", 1, "2026-01-01T00:00:00Z"),
            removal("other", 5, "2025-01-01T00:00:00Z"),
        ];
        let r = compare("news", &consents, &members, &outbox, Utc::now());
        assert_eq!(r.members, 4);
        assert_eq!(
            r.unconfirmed_on_list,
            vec![
                ("gone@example.org".to_owned(), "withdrawn".to_owned()),
                ("stranger@example.org".to_owned(), "none".to_owned()),
            ]
        );
        assert_eq!(r.confirmed_missing, vec!["missing@example.org".to_owned()]);
        assert_eq!(r.pending_removals, 3);
        assert_eq!(
            r.oldest_removal,
            Some("2026-01-01T00:00:00Z".parse().expect("time"))
        );
    }
}
