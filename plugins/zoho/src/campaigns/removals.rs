//! Own removals: addresses optinsync unsubscribed itself, so the status poll does not echo them.

use std::collections::{BTreeMap, BTreeSet};

use super::{ZohoCampaigns, address_key};

impl ZohoCampaigns {
    /// The shared set of a list's own removals.
    pub(super) fn removals_set(listkey: &str) -> String {
        format!("zoho-campaigns:own-removals:{listkey}")
    }

    pub(super) fn lock_removals(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.own_removals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing was unsubscribed after all, so the status poll has nothing to recognise.
    pub(super) async fn forget_own_removal(&self, listkey: &str, email: &str) {
        if let Some(set) = self.lock_removals().get_mut(listkey) {
            set.remove(&address_key(email));
        }
        if let Some(marks) = &self.marks
            && let Err(e) = marks
                .unmark(&Self::removals_set(listkey), &[address_key(email)])
                .await
        {
            tracing::debug!(error = %e, "shared own-removal mark not cleared");
        }
    }
}
