//! The global suppression list as an operator sees it (`optinsync suppression
//! list|show|lift`). Lifting takes an address's hashes off the list and records a
//! `suppression_lifted` event for each of its contacts on each list, in one transaction. It
//! changes no consent and sends nothing: a bounced or withdrawn person still has to sign up
//! and confirm again before anything is mailed.

use chrono::Utc;

use crate::consent::ConsentState;
use crate::engine::{Engine, EngineResult};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::store::{Contact, Suppressed};

/// What [`Engine::lift_suppression`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lift {
    /// Rows taken off the list, and the events that record it.
    Lifted { rows: u64, events: usize },
    /// The address is not suppressed: nothing done.
    NotSuppressed,
    /// No contact (live or erased) carries the address, so there is nothing to record the
    /// lift against: nothing done.
    NoContact,
}

impl Engine {
    /// The whole suppression list (keyed hashes, reasons, times), oldest first.
    pub async fn suppressions(&self) -> EngineResult<Vec<Suppressed>> {
        Ok(self.store.suppressions().await?)
    }

    /// The suppression rows of a (normalised) address, under every configured key.
    pub async fn suppressions_of_address(&self, address: &str) -> EngineResult<Vec<Suppressed>> {
        Ok(self
            .store
            .suppressions_of(&self.tokens.address_hashes(address))
            .await?)
    }

    /// The contacts an address's suppression belongs to: the live one, and erased ones
    /// (kept under the address's hash).
    async fn contacts_of_address(&self, address: &str) -> EngineResult<Vec<Contact>> {
        let mut found = Vec::new();
        if let Some(c) = self.store.contact_by_email(address).await? {
            found.push(c);
        }
        for h in self.tokens.address_hashes(address) {
            if let Some(c) = self.store.erased_contact_by_hash(&h).await?
                && !found.iter().any(|f: &Contact| f.id == c.id)
            {
                found.push(c);
            }
        }
        Ok(found)
    }

    /// Take a (normalised) address off the suppression list, recording `reason` and who did
    /// it (`source`) on each of its contacts and lists.
    pub async fn lift_suppression(
        &self,
        address: &str,
        reason: &str,
        source: EventSource,
    ) -> EngineResult<Lift> {
        let rows = self.suppressions_of_address(address).await?;
        if rows.is_empty() {
            return Ok(Lift::NotSuppressed);
        }
        let contacts = self.contacts_of_address(address).await?;
        if contacts.is_empty() {
            return Ok(Lift::NoContact);
        }
        let was: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
        let detail = format!("suppression lifted (was: {})", was.join(", "));
        let now = Utc::now();
        let mut events = Vec::new();
        for contact in &contacts {
            for list in self.lists() {
                let state = self
                    .store
                    .consent(&contact.id, &list.id)
                    .await?
                    .map_or(ConsentState::None, |c| c.state);
                events.push(NewEvent {
                    event_id: uuid::Uuid::now_v7().to_string(),
                    at: now,
                    contact_id: contact.id.clone(),
                    list_id: list.id.clone(),
                    kind: "suppression_lifted".into(),
                    from_state: state,
                    to_state: state,
                    source,
                    evidence: Evidence {
                        reason: Some(reason.to_owned()),
                        detail: Some(detail.clone()),
                        ..Evidence::default()
                    },
                });
            }
        }
        let hashes: Vec<String> = rows.into_iter().map(|r| r.address_hash).collect();
        let lifted = self.store.lift_suppressions(&hashes, &events).await?;
        tracing::info!(
            contacts = contacts.len(),
            rows = lifted,
            source = source.as_str(),
            "suppression lifted by an operator"
        );
        Ok(Lift::Lifted {
            rows: lifted,
            events: if lifted > 0 { events.len() } else { 0 },
        })
    }
}
