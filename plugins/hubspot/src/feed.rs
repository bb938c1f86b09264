//! The change feed: the full scan by the list endpoint, then incremental passes by search
//! (see the crate docs), and the opaque cursor that says where they stand.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use optinsync_plugin_api::{ChangePage, ConnectorError, ConnectorResult, Cursor};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::records::Parsed;
use crate::{HubSpotCrm, MAX_PAGE};

const CURSOR_KIND: &str = "hubspot";
const CURSOR_VERSION: u32 = 1;
const LIST_PATH: &str = "/crm/v3/objects/contacts";
const SEARCH_PATH: &str = "/crm/v3/objects/contacts/search";
/// Queries one `changes` call may make before it answers (a tie pass may start mid-call).
const MAX_QUERIES_PER_CALL: usize = 3;

/// The cursor (version 1).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct CursorState {
    kind: String,
    v: u32,
    /// The full scan in progress (before the first incremental pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scan: Option<Scan>,
    /// Where the next incremental pass starts (`lastmodifieddate >=`, epoch ms); `None`
    /// until the full scan is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
    /// Delivered records near the watermark: `lastmodifieddate` ms → contact ids (written
    /// compactly, see [`compact`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "compact")]
    seen: BTreeMap<i64, BTreeSet<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scan {
    /// Our clock when the scan began (epoch ms).
    started: i64,
    /// HubSpot's opaque paging cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pass {
    started: i64,
    /// Every record with `lastmodifieddate <= done_through` was read in this pass.
    done_through: i64,
    /// Reading the records of one timestamp by id: `(timestamp, last id read)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tie: Option<(i64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_seen: Option<i64>,
}

impl CursorState {
    fn decode(cursor: Option<&Cursor>) -> ConnectorResult<Self> {
        let Some(c) = cursor else {
            return Ok(Self::fresh());
        };
        let value: Value =
            serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                message: format!("not a HubSpot cursor: {e}"),
            })?;
        if value.get("kind").and_then(Value::as_str) != Some(CURSOR_KIND) {
            tracing::warn!(
                "stored CRM cursor belongs to another connector kind; starting a full HubSpot scan"
            );
            return Ok(Self::fresh());
        }
        if value.get("v").and_then(Value::as_u64) != Some(u64::from(CURSOR_VERSION)) {
            tracing::warn!("stored HubSpot cursor has another version; starting a full scan");
            return Ok(Self::fresh());
        }
        serde_json::from_value(value).map_err(|e| ConnectorError::InvalidInput {
            message: format!("not a HubSpot cursor: {e}"),
        })
    }

    fn fresh() -> Self {
        Self {
            kind: CURSOR_KIND.into(),
            v: CURSOR_VERSION,
            ..Self::default()
        }
    }

    fn encode(&self) -> Cursor {
        // Plain maps and strings always serialise; an empty cursor would only mean a full
        // scan, never a lost change.
        Cursor(serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()))
    }

    fn was_seen(&self, ts: i64, id: u64) -> bool {
        self.seen.get(&ts).is_some_and(|ids| ids.contains(&id))
    }

    fn mark_seen(&mut self, ts: i64, id: u64) {
        self.seen.entry(ts).or_default().insert(id);
    }

    fn prune_seen(&mut self, floor: i64) {
        self.seen = self.seen.split_off(&floor);
    }
}

impl HubSpotCrm {
    pub(crate) async fn next_changes(
        &self,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> ConnectorResult<ChangePage> {
        let mut state = CursorState::decode(cursor)?;
        let limit = u32::try_from(limit.max(1))
            .unwrap_or(MAX_PAGE)
            .min(self.settings.page_size)
            .min(MAX_PAGE);
        let mut page = ChangePage {
            records: Vec::new(),
            invalid: Vec::new(),
            deleted: Vec::new(),
            next_cursor: None,
            has_more: false,
        };
        page.has_more = match state.since {
            None => self.scan_page(&mut state, limit, &mut page).await?,
            Some(_) => self.search_page(&mut state, limit, &mut page).await?,
        };
        page.next_cursor = Some(state.encode());
        Ok(page)
    }

    /// Deliver one parsed contact unless it was delivered before or is optinsync's own echo.
    fn deliver(&self, state: &mut CursorState, p: Parsed, page: &mut ChangePage) {
        if let (Some(id), Some(ts)) = (p.id, p.modified_ms) {
            if state.was_seen(ts, id) {
                return;
            }
            state.mark_seen(ts, id);
            let opted_out = p.record.as_ref().is_ok_and(|r| r.opted_out);
            if self.is_echo(id, ts, opted_out) {
                tracing::debug!(contact = id, "own write-back seen again; not CRM input");
                return;
            }
        }
        match p.record {
            Ok(r) => page.records.push(r),
            Err(bad) => page.invalid.push(bad),
        }
    }

    /// One page of the full scan; whether more follow.
    async fn scan_page(
        &self,
        state: &mut CursorState,
        limit: u32,
        page: &mut ChangePage,
    ) -> ConnectorResult<bool> {
        let now = Utc::now().timestamp_millis();
        let scan = state.scan.get_or_insert(Scan {
            started: now,
            after: None,
        });
        let started = scan.started;
        let mut query = vec![
            ("limit", limit.to_string()),
            ("properties", self.settings.properties.join(",")),
            ("archived", "false".to_owned()),
        ];
        if let Some(after) = &scan.after {
            query.push(("after", after.clone()));
        }
        let had_after = scan.after.is_some();
        let (_, value) = match self
            .api
            .call(Method::GET, LIST_PATH, &query, None, false)
            .await
        {
            Ok(v) => v,
            Err(e) if had_after && e.status() == Some(reqwest::StatusCode::BAD_REQUEST) => {
                // HubSpot no longer takes the stored paging cursor: scan again from the start
                // (records already delivered come again; the engine takes them as unchanged).
                tracing::warn!(
                    "HubSpot refused the stored paging cursor; the full scan starts again"
                );
                state.scan = None;
                return Ok(true);
            }
            Err(e) => return Err(self.api.error(e, "contact list")),
        };
        let Some(results) = value.get("results").and_then(Value::as_array) else {
            return Err(ConnectorError::transient(
                "HubSpot listed contacts without a `results` array",
            ));
        };
        let floor = started.saturating_sub(self.settings.overlap_ms);
        for item in results {
            let p = self.parse_contact(item);
            // Only what the first incremental pass can read again needs remembering.
            if let (Some(id), Some(ts)) = (p.id, p.modified_ms)
                && ts < floor
            {
                let opted_out = p.record.as_ref().is_ok_and(|r| r.opted_out);
                if self.is_echo(id, ts, opted_out) {
                    continue;
                }
                match p.record {
                    Ok(r) => page.records.push(r),
                    Err(bad) => page.invalid.push(bad),
                }
                continue;
            }
            self.deliver(state, p, page);
        }
        let next = value
            .get("paging")
            .and_then(|p| p.get("next"))
            .and_then(|n| n.get("after"))
            .and_then(|a| match a {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        match next {
            Some(after) => {
                if let Some(scan) = state.scan.as_mut() {
                    scan.after = Some(after);
                }
                Ok(true)
            }
            None => {
                state.scan = None;
                state.since = Some(floor);
                state.prune_seen(floor);
                tracing::info!(
                    "HubSpot full scan complete; incremental sync by search from now on"
                );
                Ok(false)
            }
        }
    }

    /// One page of an incremental pass; whether the pass goes on.
    async fn search_page(
        &self,
        state: &mut CursorState,
        limit: u32,
        page: &mut ChangePage,
    ) -> ConnectorResult<bool> {
        let since = state.since.unwrap_or(0);
        let now = Utc::now().timestamp_millis();
        let mut pass = state.pass.take().unwrap_or(Pass {
            started: now,
            done_through: since.saturating_sub(1),
            tie: None,
            max_seen: None,
        });
        let mut finished = false;
        for _ in 0..MAX_QUERIES_PER_CALL {
            if let Some((ts, last_id)) = pass.tie {
                let body = json!({
                    "filterGroups": [{"filters": [
                        // A range of one millisecond rather than EQ: a date-time compared
                        // as a number, whatever EQ means for dates in a version of the API.
                        {"propertyName": "lastmodifieddate", "operator": "GTE", "value": ts.to_string()},
                        {"propertyName": "lastmodifieddate", "operator": "LTE", "value": ts.to_string()},
                        {"propertyName": "hs_object_id", "operator": "GT", "value": last_id.to_string()},
                    ]}],
                    "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                    "properties": self.settings.properties,
                    "limit": limit,
                });
                let results = self.search(&body).await;
                let results = match results {
                    Ok(r) => r,
                    Err(e) => {
                        state.pass = Some(pass);
                        return Err(e);
                    }
                };
                let mut last = last_id;
                let full = results.len() >= limit as usize;
                for item in &results {
                    let p = self.parse_contact(item);
                    if let Some(id) = p.id {
                        last = last.max(id);
                    }
                    pass.max_seen = pass.max_seen.max(Some(ts));
                    self.deliver(state, p, page);
                }
                if full && last > last_id {
                    pass.tie = Some((ts, last));
                } else {
                    pass.tie = None;
                    pass.done_through = ts;
                }
                break;
            }
            let body = json!({
                "filterGroups": [{"filters": [
                    {"propertyName": "lastmodifieddate", "operator": "GT", "value": pass.done_through.to_string()},
                ]}],
                "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
                "properties": self.settings.properties,
                "limit": limit,
            });
            let results = match self.search(&body).await {
                Ok(r) => r,
                Err(e) => {
                    state.pass = Some(pass);
                    return Err(e);
                }
            };
            let parsed: Vec<Parsed> = results.iter().map(|i| self.parse_contact(i)).collect();
            let stamps: Vec<i64> = parsed.iter().filter_map(|p| p.modified_ms).collect();
            if results.len() < limit as usize {
                // Everything searchable now was returned.
                for p in parsed {
                    self.deliver(state, p, page);
                }
                pass.max_seen = pass.max_seen.max(stamps.iter().copied().max());
                finished = true;
                break;
            }
            let (Some(&lowest), Some(&last)) = (stamps.iter().min(), stamps.iter().max()) else {
                // A full page without a single readable timestamp cannot move the position.
                for p in parsed {
                    self.deliver(state, p, page);
                }
                finished = true;
                break;
            };
            if lowest == last {
                // The whole page shares one timestamp: read that timestamp by id.
                pass.tie = Some((last, 0));
                continue;
            }
            // Records at the last timestamp may go on past this page: they are read again
            // at the start of the next one.
            let mut through = pass.done_through;
            for p in parsed {
                match p.modified_ms {
                    Some(ts) if ts == last => {}
                    ts => {
                        if let Some(ts) = ts {
                            through = through.max(ts);
                        }
                        self.deliver(state, p, page);
                    }
                }
            }
            pass.done_through = through;
            pass.max_seen = pass.max_seen.max(Some(through));
            break;
        }
        // Forget what neither this pass nor the next one can read again.
        let floor_next = pass
            .max_seen
            .map_or(pass.started, |m| m.min(pass.started))
            .saturating_sub(self.settings.overlap_ms);
        if finished {
            let next = match pass.max_seen {
                Some(_) => floor_next.max(since),
                None => since,
            };
            state.since = Some(next);
            state.prune_seen(next);
            state.pass = None;
            Ok(false)
        } else {
            state.prune_seen(floor_next.min(pass.done_through.saturating_add(1)));
            state.pass = Some(pass);
            Ok(true)
        }
    }

    async fn search(&self, body: &Value) -> ConnectorResult<Vec<Value>> {
        let (_, value) = self
            .api
            .call(Method::POST, SEARCH_PATH, &[], Some(body), true)
            .await
            .map_err(|e| self.api.error(e, "contact search"))?;
        match value.get("results").and_then(Value::as_array) {
            Some(r) => Ok(r.clone()),
            None => Err(ConnectorError::transient(
                "HubSpot answered a search without a `results` array",
            )),
        }
    }
}

/// The seen set as one string: `ts:ids;dts:ids;...` with each timestamp after the first as
/// the difference to the one before, and ids as ranges (`100001-112000,112005`) — a bulk
/// import of thousands of contacts in one millisecond is a few characters.
mod compact {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Write as _;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn encode(seen: &BTreeMap<i64, BTreeSet<u64>>) -> String {
        let mut out = String::new();
        let mut prev: Option<i64> = None;
        for (ts, ids) in seen {
            if !out.is_empty() {
                out.push(';');
            }
            let _ = write!(out, "{}:", prev.map_or(*ts, |p| ts - p));
            prev = Some(*ts);
            let mut iter = ids.iter().copied().peekable();
            let mut first = true;
            while let Some(start) = iter.next() {
                let mut end = start;
                while iter.peek() == Some(&(end + 1)) {
                    end += 1;
                    iter.next();
                }
                if !first {
                    out.push(',');
                }
                first = false;
                if end == start {
                    let _ = write!(out, "{start}");
                } else {
                    let _ = write!(out, "{start}-{end}");
                }
            }
        }
        out
    }

    pub(super) fn decode(text: &str) -> Option<BTreeMap<i64, BTreeSet<u64>>> {
        let mut seen = BTreeMap::new();
        let mut prev: Option<i64> = None;
        for entry in text.split(';').filter(|e| !e.is_empty()) {
            let (ts, ids) = entry.split_once(':')?;
            let ts: i64 = ts.parse().ok()?;
            let ts = match prev {
                Some(p) => p.checked_add(ts)?,
                None => ts,
            };
            prev = Some(ts);
            let set: &mut BTreeSet<u64> = seen.entry(ts).or_default();
            for part in ids.split(',').filter(|p| !p.is_empty()) {
                match part.split_once('-') {
                    Some((a, b)) => {
                        let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                        // A range no pass could have produced is a corrupt cursor.
                        if b < a || b - a > 10_000_000 {
                            return None;
                        }
                        set.extend(a..=b);
                    }
                    None => {
                        set.insert(part.parse().ok()?);
                    }
                }
            }
        }
        Some(seen)
    }

    pub(super) fn serialize<S: Serializer>(
        seen: &BTreeMap<i64, BTreeSet<u64>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(seen))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<i64, BTreeSet<u64>>, D::Error> {
        let text = String::deserialize(d)?;
        decode(&text).ok_or_else(|| D::Error::custom("malformed `seen` in a HubSpot cursor"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn foreign_or_old_cursors_start_afresh() {
        let s = CursorState::decode(Some(&Cursor(r#"{"kind":"zoho-crm"}"#.into()))).unwrap();
        assert!(s.since.is_none() && s.scan.is_none());
        let s = CursorState::decode(Some(&Cursor(
            r#"{"kind":"hubspot","v":0,"since":5}"#.into(),
        )))
        .unwrap();
        assert!(s.since.is_none());
        assert!(CursorState::decode(Some(&Cursor("nope".into()))).is_err());
        let mut s = CursorState::fresh();
        s.since = Some(7);
        s.mark_seen(7, 1);
        s.mark_seen(9, 2);
        let again = CursorState::decode(Some(&s.encode())).unwrap();
        assert!(again.was_seen(7, 1) && again.was_seen(9, 2) && !again.was_seen(9, 1));
        let mut pruned = again.clone();
        pruned.prune_seen(8);
        assert!(!pruned.was_seen(7, 1) && pruned.was_seen(9, 2));
    }

    #[test]
    fn the_seen_set_is_compact() {
        let mut seen: BTreeMap<i64, BTreeSet<u64>> = BTreeMap::new();
        seen.entry(1_733_480_000_000)
            .or_default()
            .extend(100_001..=112_000);
        seen.entry(1_733_480_000_000).or_default().insert(112_005);
        seen.entry(1_733_480_000_007).or_default().insert(5);
        let text = compact::encode(&seen);
        assert_eq!(text, "1733480000000:100001-112000,112005;7:5");
        assert_eq!(compact::decode(&text).unwrap(), seen);
        assert_eq!(compact::decode("").unwrap(), BTreeMap::new());
        for bad in [
            "x",
            "1:a",
            "1:5-3",
            "1:0-99999999999",
            "9223372036854775807:1;1:1",
        ] {
            assert!(compact::decode(bad).is_none(), "{bad}");
        }
    }
}
