//! Drift between the ledger and the campaigns tool: who is on a list without consent, who
//! confirmed but is missing from it, and the removals still waiting in the outbox. The one
//! computation behind the `optinsync_drift_*` gauges and the operator console.
//!
//! A member whose removal (or a confirmed contact whose subscribe) is still pending in the
//! outbox is not drift: the outbox will deliver it, and its age is what
//! `pending_removals` / `oldest_pending_removal` report. Only what nothing will fix counts.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use optinsync_plugin_api::Cursor;
use serde::Serialize;

use crate::config::ListConfig;
use crate::consent::ConsentState;
use crate::email;
use crate::engine::{Engine, EngineResult};
use crate::store::{ListConsent, PendingListWork};

/// Drift of one list at `computed_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListDrift {
    pub list_id: String,
    /// Members the campaigns tool listed.
    pub members: u64,
    /// Listed members with no consent that allows them there and no removal pending: the
    /// alarm (should be 0).
    pub on_list_without_consent: u64,
    /// Contacts whose consent allows them on the list, absent from it, with no subscribe
    /// pending.
    pub confirmed_missing: u64,
    /// Removals from this list waiting in the outbox.
    pub pending_removals: u64,
    /// When the oldest of them was queued.
    pub oldest_pending_removal: Option<DateTime<Utc>>,
    pub computed_at: DateTime<Utc>,
}

/// A consent state that puts (or keeps) a person on the campaigns list.
pub fn allows_membership(state: ConsentState) -> bool {
    matches!(state, ConsentState::Confirmed | ConsentState::Revalidating)
}

/// Compare the member listing (addresses as the tool gave them) with the ledger's consents and
/// the pending outbox work of one list. Pure: the numbers of [`ListDrift`].
pub fn compare(
    list_id: &str,
    members: &[String],
    consents: &[ListConsent],
    pending: &[PendingListWork],
    computed_at: DateTime<Utc>,
) -> ListDrift {
    let by_address: BTreeMap<&str, &ListConsent> =
        consents.iter().map(|c| (c.email.as_str(), c)).collect();
    let removing: BTreeSet<&str> = pending
        .iter()
        .filter(|p| p.removal)
        .map(|p| p.contact_id.as_str())
        .collect();
    let removing_addresses: BTreeSet<String> = pending
        .iter()
        .filter(|p| p.removal)
        .filter_map(|p| p.email.as_deref())
        .filter_map(|e| email::normalise(e).ok())
        .collect();
    let subscribing: BTreeSet<&str> = pending
        .iter()
        .filter(|p| !p.removal)
        .map(|p| p.contact_id.as_str())
        .collect();

    let mut listed = BTreeSet::new();
    let mut on_list_without_consent = 0;
    for raw in members {
        // An address we cannot read cannot have consent here.
        let Ok(address) = email::normalise(raw) else {
            on_list_without_consent += 1;
            continue;
        };
        let allowed = match by_address.get(address.as_str()) {
            Some(c) => allows_membership(c.state) || removing.contains(c.contact_id.as_str()),
            None => false,
        };
        if !allowed && !removing_addresses.contains(&address) {
            on_list_without_consent += 1;
        }
        listed.insert(address);
    }
    let confirmed_missing = consents
        .iter()
        .filter(|c| allows_membership(c.state))
        .filter(|c| !listed.contains(&c.email) && !subscribing.contains(c.contact_id.as_str()))
        .count() as u64;
    let removals: Vec<&PendingListWork> = pending.iter().filter(|p| p.removal).collect();
    ListDrift {
        list_id: list_id.to_owned(),
        members: members.len() as u64,
        on_list_without_consent,
        confirmed_missing,
        pending_removals: removals.len() as u64,
        oldest_pending_removal: removals.iter().map(|p| p.created_at).min(),
        computed_at,
    }
}

impl Engine {
    /// Drift of one list: reads every page of the campaigns tool's member listing (vendor
    /// calls: run it at a modest interval), the list's consents and its pending campaigns work.
    pub async fn drift(&self, list: &ListConfig) -> EngineResult<ListDrift> {
        // The outbox first: a removal delivered between the two reads then shows as done in
        // the listing, never as drift.
        let pending = self.store.pending_list_work(&list.id).await?;
        let mut members = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = self.member_page(list, cursor.as_ref()).await?;
            members.extend(page.members.into_iter().map(|m| m.email));
            if !page.has_more {
                break;
            }
            cursor = page.next_cursor;
        }
        let consents = self.store.list_consents(&list.id).await?;
        Ok(compare(&list.id, &members, &consents, &pending, Utc::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent(id: &str, email: &str, state: ConsentState) -> ListConsent {
        ListConsent {
            contact_id: id.into(),
            email: email.into(),
            state,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn counts_each_kind_of_drift_once() {
        let consents = [
            consent("c1", "ana@example.org", ConsentState::Confirmed),
            consent("c2", "bo@example.org", ConsentState::Withdrawn),
            consent("c3", "cy@example.org", ConsentState::Withdrawn),
            consent("c4", "di@example.org", ConsentState::Confirmed),
            consent("c5", "ed@example.org", ConsentState::Confirmed),
        ];
        let pending = [
            // c3's removal is on its way: not drift, but counted as pending.
            PendingListWork {
                contact_id: "c3".into(),
                removal: true,
                email: Some("cy@example.org".into()),
                created_at: at("2026-01-02T00:00:00Z"),
            },
            // An erased contact's removal carries the address itself.
            PendingListWork {
                contact_id: "gone".into(),
                removal: true,
                email: Some("fe@example.org".into()),
                created_at: at("2026-01-01T00:00:00Z"),
            },
            // c5 is being subscribed.
            PendingListWork {
                contact_id: "c5".into(),
                removal: false,
                email: None,
                created_at: at("2026-01-03T00:00:00Z"),
            },
        ];
        let members: Vec<String> = [
            "Ana@Example.org", // confirmed (spelled differently)
            "bo@example.org",  // withdrawn, nothing pending: drift
            "cy@example.org",  // removal pending
            "fe@example.org",  // erased, removal pending
            "zz@example.org",  // unknown to the ledger: drift
            "not an address",  // unreadable: drift
        ]
        .map(str::to_owned)
        .to_vec();
        let d = compare(
            "news",
            &members,
            &consents,
            &pending,
            at("2026-01-04T00:00:00Z"),
        );
        assert_eq!(d.members, 6);
        assert_eq!(d.on_list_without_consent, 3);
        // c4 is confirmed and missing; c5 is missing but its subscribe is pending.
        assert_eq!(d.confirmed_missing, 1);
        assert_eq!(d.pending_removals, 2);
        assert_eq!(d.oldest_pending_removal, Some(at("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn an_agreeing_list_has_no_drift() {
        let consents = [consent("c1", "ana@example.org", ConsentState::Revalidating)];
        let d = compare(
            "news",
            &["ana@example.org".to_owned()],
            &consents,
            &[],
            Utc::now(),
        );
        assert_eq!(
            (
                d.on_list_without_consent,
                d.confirmed_missing,
                d.pending_removals
            ),
            (0, 0, 0)
        );
        assert_eq!(d.oldest_pending_removal, None);
    }
}
