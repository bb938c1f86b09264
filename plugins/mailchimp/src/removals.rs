//! Own removals: the members optinsync itself unsubscribed, so that the status poll and the
//! webhook do not take that for the person's own unsubscribe; kept in memory, in the exported
//! state and, when the engine hands them over, in its shared marks.

use std::collections::{BTreeMap, BTreeSet};

use optinsync_plugin_api::{ConnectorError, ConnectorResult};
use serde::{Deserialize, Serialize};

use crate::Mailchimp;

/// The state kept across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    v: u32,
    own_removals: BTreeMap<String, Vec<String>>,
}

impl Mailchimp {
    pub(crate) async fn mark_own_removal(&self, audience: &str, hash: &str) -> ConnectorResult<()> {
        self.lock_removals()
            .entry(audience.to_owned())
            .or_default()
            .insert(hash.to_owned());
        if let Some(marks) = &self.marks {
            marks.mark(&Self::removals_set(audience), hash).await?;
        }
        Ok(())
    }

    pub(crate) async fn forget_own_removals(&self, audience: &str, hashes: &[String]) {
        if hashes.is_empty() {
            return;
        }
        if let Some(set) = self.lock_removals().get_mut(audience) {
            for h in hashes {
                set.remove(h);
            }
        }
        if let Some(marks) = &self.marks
            && let Err(e) = marks.unmark(&Self::removals_set(audience), hashes).await
        {
            tracing::debug!(error = %e, "shared own-removal marks not cleared");
        }
    }

    pub(crate) async fn own_removals(&self, audience: &str) -> ConnectorResult<BTreeSet<String>> {
        let mut own = self
            .lock_removals()
            .get(audience)
            .cloned()
            .unwrap_or_default();
        if let Some(marks) = &self.marks {
            own.extend(marks.marked(&Self::removals_set(audience)).await?);
        }
        Ok(own)
    }
}

impl Mailchimp {
    /// The state [`Connector::export_state`] hands the engine: the own removals the status
    /// poll must not echo.
    pub fn saved_state(&self) -> Option<String> {
        let own_removals = self
            .lock_removals()
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k.clone(), s.iter().cloned().collect()))
            .collect();
        serde_json::to_string(&SavedState { v: 1, own_removals }).ok()
    }

    /// Take back state from an earlier [`Connector::export_state`].
    pub fn import_state(&self, state: &str) -> ConnectorResult<()> {
        let saved: SavedState =
            serde_json::from_str(state).map_err(|e| ConnectorError::InvalidInput {
                message: format!("saved Mailchimp state is unreadable: {e}"),
            })?;
        if saved.v != 1 {
            return Err(ConnectorError::InvalidInput {
                message: format!("saved Mailchimp state has version {}, expected 1", saved.v),
            });
        }
        let mut removals = self.lock_removals();
        for (k, v) in saved.own_removals {
            removals.entry(k).or_default().extend(v);
        }
        Ok(())
    }
}
