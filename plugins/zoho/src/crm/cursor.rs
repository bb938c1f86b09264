//! The opaque change-feed cursor: where each module's sync stands, as JSON.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{ConnectorError, ConnectorResult, Cursor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::CURSOR_KIND;

/// The opaque cursor: where each module's sync stands.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct CursorState {
    kind: String,
    /// Index of the module the current round is at.
    pub(super) pos: usize,
    pub(super) modules: Vec<ModuleState>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct ModuleState {
    pub(super) module: String,
    /// `If-Modified-Since` of the current pass; `None` = full sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) since: Option<DateTime<Utc>>,
    /// Within a pass: restart point when pages could not go further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) query_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) pass_started: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) per_page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) page_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) max_seen: Option<DateTime<Utc>>,
    /// Delivered record id → `Modified_Time` (unix s) and a fingerprint of what was
    /// delivered (an edit within the same second still differs); kept near the watermark.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) seen: BTreeMap<String, (i64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) deleted_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) deleted_seen: BTreeMap<String, i64>,
}

impl ModuleState {
    fn new(module: &str) -> Self {
        Self {
            module: module.to_owned(),
            ..Self::default()
        }
    }

    /// The watermark the next pass would get if this one ended now.
    fn floor(&self, overlap: chrono::Duration) -> Option<DateTime<Utc>> {
        let started = self.pass_started?;
        let next = self.max_seen.map_or(started, |m| m.min(started)) - overlap;
        Some(self.since.map_or(next, |s| s.max(next)))
    }

    /// Forget delivered records that the next pass cannot return again.
    pub(super) fn prune_seen(&mut self, overlap: chrono::Duration) {
        if let Some(floor) = self.floor(overlap) {
            let floor = floor.timestamp();
            self.seen.retain(|_, (ts, _)| *ts >= floor);
        }
    }

    pub(super) fn finish_pass(&mut self, started: DateTime<Utc>, overlap: chrono::Duration) {
        self.pass_started = Some(started);
        let next = if self.max_seen.is_none() && self.since.is_some() {
            self.since // nothing changed: keep the watermark
        } else {
            self.floor(overlap)
        };
        self.prune_seen(overlap);
        self.since = next;
        self.query_since = None;
        self.pass_started = None;
        self.per_page = None;
        self.page = None;
        self.page_token = None;
        self.max_seen = None;
    }
}

impl CursorState {
    pub(super) fn decode(cursor: Option<&Cursor>, modules: &[String]) -> ConnectorResult<Self> {
        let mut state = match cursor {
            None => Self::default(),
            Some(c) => {
                let value: Value =
                    serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                        message: format!("not a Zoho CRM cursor: {e}"),
                    })?;
                if value.get("kind").and_then(Value::as_str) == Some(CURSOR_KIND) {
                    serde_json::from_value(value).map_err(|e| ConnectorError::InvalidInput {
                        message: format!("not a Zoho CRM cursor: {e}"),
                    })?
                } else {
                    tracing::warn!(
                        "stored CRM cursor belongs to another connector kind; starting a full Zoho CRM sync"
                    );
                    Self::default()
                }
            }
        };
        state.kind = CURSOR_KIND.to_owned();
        let same = state.modules.len() == modules.len()
            && state
                .modules
                .iter()
                .zip(modules)
                .all(|(s, m)| &s.module == m);
        if !same {
            let mut old: HashMap<String, ModuleState> = state
                .modules
                .drain(..)
                .map(|m| (m.module.clone(), m))
                .collect();
            state.modules = modules
                .iter()
                .map(|m| old.remove(m).unwrap_or_else(|| ModuleState::new(m)))
                .collect();
            state.pos = 0;
        }
        Ok(state)
    }

    pub(super) fn encode(&self) -> Cursor {
        // Serialising plain maps and strings cannot fail; an empty cursor would only mean a
        // full sync, never a lost change.
        Cursor(serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cursor_from_another_connector_starts_afresh() {
        let modules = vec!["Contacts".to_owned()];
        let s = CursorState::decode(Some(&Cursor(r#"{"rows":{}}"#.into())), &modules).unwrap();
        assert_eq!(s.modules.len(), 1);
        assert!(s.modules[0].since.is_none());
        assert!(CursorState::decode(Some(&Cursor("nope".into())), &modules).is_err());
    }
}
