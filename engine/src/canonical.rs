//! The one-time re-spelling of stored addresses into their canonical form (NFC, UTS-46), so
//! that one mailbox has one contact and one suppression key.

use chrono::Utc;
use serde::Serialize;

use crate::email;
use crate::engine::{DECIDE_PAGE, Engine, EngineResult};

/// What [`Engine::canonicalise_stored_addresses`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Canonicalised {
    /// Contacts now stored under the canonical spelling of their address.
    pub renamed: u64,
    /// Contacts left as they are because another contact already has the canonical spelling
    /// (one mailbox, two contacts: both stay suppressed alike; merge them by hand if needed).
    pub duplicates: u64,
    /// Stored addresses that canonicalisation refuses (e.g. invalid punycode); left as they are.
    pub invalid: u64,
}

/// Cursor-table marker: stored addresses were canonicalised (see [`crate::email`]).
const CANONICAL_ADDRESSES: &str = "migration:canonical-addresses-v1";

impl Engine {
    /// Re-spell contacts stored before address canonicalisation (a punycode domain, an NFD
    /// address) to their canonical form, so the CRM's record for them, in any spelling,
    /// finds them again instead of becoming a new contact that is asked to confirm. Runs
    /// once per store (a marker in the cursor table); the suppression list needs no such
    /// step, as lookups also try the old keys ([`crate::email::spellings`]).
    pub async fn canonicalise_stored_addresses(&self) -> EngineResult<Canonicalised> {
        let mut done = Canonicalised::default();
        if self.store.cursor(CANONICAL_ADDRESSES).await?.is_some() {
            return Ok(done);
        }
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .contacts_page(after.as_deref(), DECIDE_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for contact in &page {
                if contact.erased {
                    continue;
                }
                match email::normalise(&contact.email) {
                    Ok(canonical) if canonical == contact.email => {}
                    Ok(canonical) => {
                        if self.store.rename_contact(&contact.id, &canonical).await? {
                            done.renamed += 1;
                        } else {
                            done.duplicates += 1;
                            tracing::warn!(
                                contact_id = %contact.id,
                                "contact's address is another spelling of another contact's; left as it is"
                            );
                        }
                    }
                    Err(_) => done.invalid += 1,
                }
            }
        }
        self.store
            .set_cursor(CANONICAL_ADDRESSES, "done", Utc::now())
            .await?;
        if done != Canonicalised::default() {
            tracing::info!(
                renamed = done.renamed,
                duplicates = done.duplicates,
                invalid = done.invalid,
                "stored addresses canonicalised"
            );
        }
        Ok(done)
    }
}
