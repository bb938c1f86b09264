//! The CSV change feed: the cursor (a hash of every row handed out) and one page of changed rows.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use optinsync_plugin_api::{ChangePage, ConnectorError, ConnectorResult, Cursor, RecordRef};
use serde::{Deserialize, Serialize};

use super::parse::{ParsedRow, RowKey, Snapshot};
use crate::json_error;

/// What the cursor remembers: the hash of every row already handed out.
///
/// Rows with a usable id are keyed by that id (so an edit is seen as a change of that
/// record, and a vanished id as a deletion). Rows without one (missing id, duplicate id)
/// can only be recognised by content, so they are kept in a separate set: that way they are
/// reported once and never mistaken for deleted records.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CursorState {
    #[serde(default)]
    rows: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    unkeyed: BTreeSet<String>,
}

impl CursorState {
    pub(super) fn decode(cursor: &Cursor) -> ConnectorResult<Self> {
        serde_json::from_str(&cursor.0).map_err(|err| ConnectorError::InvalidInput {
            message: format!("not a CSV CRM cursor: {}", json_error(&err)),
        })
    }

    fn encode(&self) -> Cursor {
        // Serialising string maps cannot fail; fall back to an empty cursor rather than panic.
        Cursor(serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()))
    }

    fn has_seen(&self, row: &ParsedRow) -> bool {
        match &row.key {
            RowKey::Id(id) => self.rows.get(id) == Some(&row.hash),
            RowKey::Unkeyed => self.unkeyed.contains(&row.hash),
        }
    }

    fn record(&mut self, row: &ParsedRow) {
        match &row.key {
            RowKey::Id(id) => {
                self.rows.insert(id.clone(), row.hash.clone());
            }
            RowKey::Unkeyed => {
                self.unkeyed.insert(row.hash.clone());
            }
        }
    }
}

/// Compare the file with the cursor and build one page of at most `limit` changed rows.
pub(super) fn diff(
    module: &str,
    previous: &CursorState,
    snapshot: Snapshot,
    limit: usize,
) -> ChangePage {
    // A zero limit would never make progress; treat it as one.
    let limit = limit.max(1);
    let mut next = previous.clone();
    let deleted = apply_deletions(module, &mut next, &snapshot);

    let mut changed = snapshot
        .rows
        .into_iter()
        .filter(|row| !previous.has_seen(row));
    let mut records = Vec::new();
    let mut invalid = Vec::new();
    for row in changed.by_ref().take(limit) {
        next.record(&row);
        match row.outcome {
            Ok(record) => records.push(record),
            Err(bad) => invalid.push(bad),
        }
    }
    let has_more = changed.next().is_some();
    ChangePage {
        records,
        invalid,
        deleted,
        next_cursor: Some(next.encode()),
        has_more,
    }
}

/// Drop from `next` every id no longer in the file and return those ids as deletions.
fn apply_deletions(module: &str, next: &mut CursorState, snapshot: &Snapshot) -> Vec<RecordRef> {
    let mut present_ids = HashSet::new();
    let mut present_unkeyed = HashSet::new();
    for row in &snapshot.rows {
        match &row.key {
            RowKey::Id(id) => present_ids.insert(id.as_str()),
            RowKey::Unkeyed => present_unkeyed.insert(row.hash.as_str()),
        };
    }
    let gone: Vec<String> = next
        .rows
        .keys()
        .filter(|id| !present_ids.contains(id.as_str()))
        .cloned()
        .collect();
    for id in &gone {
        next.rows.remove(id);
    }
    // Unkeyed rows were never records, so their disappearance is not a deletion.
    next.unkeyed
        .retain(|hash| present_unkeyed.contains(hash.as_str()));
    gone.into_iter()
        .map(|id| RecordRef {
            module: module.to_owned(),
            id,
        })
        .collect()
}
