//! The change feed's paging: one page of a module's pass, and the module's deleted records.

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    ChangePage, ConnectorError, ConnectorResult, CrmRecord, InvalidRecord, RecordRef,
};
use reqwest::Method;
use serde_json::Value;

use super::cursor::ModuleState;
use super::http::{CallError, Reply, Request};
use super::{DISCRETE_PAGE_LIMIT, MAX_PER_PAGE, ZohoCrm};

impl ZohoCrm {
    /// One page of `m`'s current pass; updates `m` and fills `page`. Returns whether the pass
    /// of this module is complete.
    pub(super) async fn next_page(
        &self,
        m: &mut ModuleState,
        per_page: u32,
        page: &mut ChangePage,
    ) -> ConnectorResult<bool> {
        let mut query: Vec<(&str, String)> = vec![
            ("fields", self.settings.fields_param.clone()),
            ("sort_by", "Modified_Time".into()),
            ("sort_order", "asc".into()),
            ("per_page", per_page.to_string()),
        ];
        let page_no = m.page.unwrap_or(1);
        match &m.page_token {
            Some(token) => query.push(("page_token", token.clone())),
            None => query.push(("page", page_no.to_string())),
        }
        let path = format!("/{}", m.module);
        let reply = self
            .call(Request {
                method: Method::GET,
                path: &path,
                query,
                if_modified_since: m.query_since.or(m.since),
                body: None,
            })
            .await;
        let value = match reply {
            Ok(Reply::Empty) => return Ok(true),
            Ok(Reply::Json(_, v)) => v,
            Err(CallError::Api { env, .. })
                if m.page_token.is_some()
                    && matches!(
                        env.code.as_str(),
                        "EXPIRED_VALUE" | "TOKEN_BOUND_DATA_MISMATCH" | "INVALID_DATA"
                    ) =>
            {
                // The page token expired (about 24 h) or no longer fits: go on from the latest
                // change seen; what was delivered is recognised and not repeated.
                tracing::warn!(module = %m.module, code = %env.code, "Zoho CRM page token no longer valid; resuming from the latest change seen");
                m.page_token = None;
                m.page = None;
                m.query_since = m.max_seen.or(m.query_since);
                return Ok(false);
            }
            Err(e) => return Err(self.crm_error(e, &m.module)),
        };
        let Some(data) = value.get("data").and_then(Value::as_array) else {
            return Err(ConnectorError::transient(format!(
                "Zoho CRM listed {} without a `data` array",
                m.module
            )));
        };
        let info = value.get("info");
        let more = info
            .and_then(|i| i.get("more_records"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let next_token = info
            .and_then(|i| i.get("next_page_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        for (index, item) in data.iter().enumerate() {
            let (id, ts, parsed) = self.parse_record(&m.module, index, item);
            if let Some(ts) = ts {
                let t = DateTime::from_timestamp(ts, 0);
                m.max_seen = m.max_seen.max(t);
            }
            if let (Some(id), Some(ts)) = (&id, ts) {
                let fp = fingerprint(&parsed);
                if m.seen.get(id) == Some(&(ts, fp)) {
                    continue; // already delivered (overlap of two passes)
                }
                m.seen.insert(id.clone(), (ts, fp));
                let opted_out = parsed.as_ref().is_ok_and(|r| r.opted_out);
                if self.is_echo(&m.module, id, Some(ts), opted_out) {
                    tracing::debug!(record = %format!("{}/{id}", m.module), "own write-back seen again; not CRM input");
                    continue;
                }
            }
            match parsed {
                Ok(rec) => page.records.push(rec),
                Err(bad) => page.invalid.push(bad),
            }
        }
        m.prune_seen(self.settings.overlap);
        if !more {
            return Ok(true);
        }
        if let Some(token) = next_token {
            m.page_token = Some(token);
            m.page = None;
        } else if (page_no + 1) * per_page <= DISCRETE_PAGE_LIMIT && m.page_token.is_none() {
            m.page = Some(page_no + 1);
        } else {
            // No token and `page` cannot reach further: restart from the latest change seen.
            m.page_token = None;
            m.page = None;
            m.query_since = m.max_seen.or(m.query_since);
        }
        Ok(false)
    }

    /// Records deleted in `m.module` since the deletion watermark (up to 2,000 per call).
    pub(super) async fn deleted(
        &self,
        m: &mut ModuleState,
        out: &mut Vec<RecordRef>,
    ) -> ConnectorResult<()> {
        let path = format!("/{}/deleted", m.module);
        let mut max_seen = m.deleted_since;
        for page_no in 1..=(DISCRETE_PAGE_LIMIT / MAX_PER_PAGE) {
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: &path,
                    query: vec![
                        ("type", "all".into()),
                        ("page", page_no.to_string()),
                        ("per_page", MAX_PER_PAGE.to_string()),
                    ],
                    if_modified_since: m.deleted_since,
                    body: None,
                })
                .await
                .map_err(|e| self.crm_error(e, &m.module))?;
            let Reply::Json(_, value) = reply else { break };
            let data = value
                .get("data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in &data {
                let Some(id) = item.get("id").and_then(|v| match v {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }) else {
                    continue;
                };
                let at = item
                    .get("deleted_time")
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
                let ts = at.map(|t| t.timestamp()).unwrap_or(0);
                if m.deleted_seen.get(&id) == Some(&ts) {
                    continue;
                }
                m.deleted_seen.insert(id.clone(), ts);
                max_seen = max_seen.max(at);
                out.push(RecordRef {
                    module: m.module.clone(),
                    id,
                });
            }
            let more = value
                .get("info")
                .and_then(|i| i.get("more_records"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if !more {
                break;
            }
        }
        // Next time from the latest deletion seen (inclusive), minus the overlap.
        if let Some(latest) = max_seen {
            let next = latest - self.settings.overlap;
            m.deleted_since = Some(m.deleted_since.map_or(next, |d| d.max(next)));
        }
        if let Some(floor) = m.deleted_since {
            let floor = floor.timestamp();
            m.deleted_seen.retain(|_, ts| *ts >= floor);
        }
        Ok(())
    }
}

/// A stable (FNV-1a) digest of what a record says to the engine.
fn fingerprint(parsed: &Result<CrmRecord, InvalidRecord>) -> u64 {
    let text = match parsed {
        Ok(r) => serde_json::to_string(&(
            &r.email,
            &r.language,
            r.opted_out,
            &r.asserted_lists,
            &r.fields,
        ))
        .unwrap_or_default(),
        Err(bad) => bad.reason.clone(),
    };
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
