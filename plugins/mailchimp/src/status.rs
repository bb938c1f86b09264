//! The status poll (unsubscribes, bounces and, for `doi = "mailchimp"` lists, confirmations)
//! with its per-second cursor, and the member listing for `campaign import-existing`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, Cursor, MemberPage, StatusEvent, StatusKind, StatusPage,
    Subscriber,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::connector::iso;
use crate::parse::{MemberRow, members_answer};
use crate::{DoiMode, ListMapping, Mailchimp};

/// Pages one `status_events` call reads at most per status before it answers `has_more`.
const PAGES_PER_POLL: usize = 20;
/// Fields a status read asks for.
const STATUS_FIELDS: &str = "members.id,members.email_address,members.status,members.last_changed,members.timestamp_opt,members.ip_opt,members.unsubscribe_reason,total_items";

/// The status cursor (versioned, opaque to the engine).
#[derive(Debug, Default, Serialize, Deserialize)]
struct StatusCursor {
    v: u32,
    /// status → where its stream stands.
    streams: BTreeMap<String, Stream>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Stream {
    /// The latest `last_changed` seen (unix seconds).
    t: i64,
    /// Member ids seen with exactly `t`.
    seen: BTreeSet<String>,
}

impl Mailchimp {
    /// One status stream (`unsubscribed`, `cleaned`, `subscribed`) from its cursor position.
    async fn read_stream(
        &self,
        list: &str,
        m: &ListMapping,
        status: &str,
        from: Option<&Stream>,
        mut on_row: impl FnMut(&MemberRow, Option<&Stream>),
    ) -> ConnectorResult<(Stream, bool)> {
        let mut stream = from.cloned().unwrap_or_default();
        let started = from.is_some();
        let count = self.page_size as usize;
        let mut offset = 0usize;
        for _ in 0..PAGES_PER_POLL {
            let mut q = vec![
                ("status", status.to_owned()),
                ("sort_field", "last_changed".to_owned()),
                ("sort_dir", "ASC".to_owned()),
                ("count", count.to_string()),
                ("offset", offset.to_string()),
                ("fields", STATUS_FIELDS.to_owned()),
            ];
            if started || stream.t > 0 {
                let since = DateTime::from_timestamp(stream.t - 1, 0).unwrap_or_default();
                q.push(("since_last_changed", iso(since)));
            }
            let answer = self
                .call(
                    Method::GET,
                    &format!("/lists/{}/members", m.audience),
                    &q,
                    None,
                )
                .await
                .map_err(|e| self.item_error(list, m, e))?;
            let page = members_answer(&answer).map_err(|why| {
                ConnectorError::transient(format!(
                    "Mailchimp's member listing is unreadable: {why}"
                ))
            })?;
            let n = page.members.len();
            let mut fresh = 0usize;
            for row in &page.members {
                let Some(lc) = row.last_changed else { continue };
                let t = lc.timestamp();
                if t < stream.t || (t == stream.t && stream.seen.contains(&row.id)) {
                    continue;
                }
                on_row(row, from);
                fresh += 1;
                if t > stream.t {
                    stream.t = t;
                    stream.seen.clear();
                }
                stream.seen.insert(row.id.clone());
            }
            if n < count {
                return Ok((stream, false));
            }
            // Ask again from the newest second seen and skip what was seen at it: a member
            // that changes during the walk moves to the end instead of shifting the pages.
            // Ties within a second keep creation order, so a member moving into the newest
            // second may sort before ones seen there: page on within that second (`offset`)
            // only while a full page brings nothing new.
            offset = if fresh > 0 { 0 } else { offset + count };
        }
        Ok((stream, true))
    }

    /// `status_events`: see the crate docs ("Status poll").
    pub(crate) async fn poll_status(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        let m = self.mapping(list)?;
        let previous: StatusCursor = match cursor {
            None => StatusCursor::default(),
            Some(c) => serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                message: format!(
                    "the stored Mailchimp status cursor of `{list}` is unreadable: {e}"
                ),
            })?,
        };
        if cursor.is_some() && previous.v != 1 {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "the stored Mailchimp status cursor of `{list}` has version {}, expected 1",
                    previous.v
                ),
            });
        }
        let own = self.own_removals(&m.audience).await?;
        let mut consumed = Vec::new();
        let mut events = Vec::new();
        let mut next = StatusCursor {
            v: 1,
            streams: BTreeMap::new(),
        };
        let mut has_more = false;
        let mut statuses = vec![
            ("unsubscribed", StatusKind::Unsubscribed),
            ("cleaned", StatusKind::Bounced),
        ];
        if m.doi == DoiMode::Mailchimp {
            statuses.push(("subscribed", StatusKind::Confirmed));
        }
        for (status, kind) in statuses {
            let from = previous.streams.get(status);
            let (stream, more) = self
                .read_stream(list, m, status, from, |row, from| {
                    let at = row.last_changed.unwrap_or_else(Utc::now);
                    match kind {
                        StatusKind::Unsubscribed if own.contains(&row.id) => {
                            consumed.push(row.id.clone());
                        }
                        StatusKind::Confirmed => {
                            // A confirmation since the last read (a profile change of a long
                            // confirmed member moves `last_changed`, not `timestamp_opt`).
                            let Some(opt) = row.timestamp_opt else { return };
                            if from.is_some_and(|f| opt.timestamp() < f.t - 1) {
                                return;
                            }
                            events.push(StatusEvent {
                                email: row.email.clone(),
                                kind,
                                at: opt,
                                detail: Some(format!(
                                    "Mailchimp reports the member confirmed Mailchimp's own opt-in mail (ip_opt {})",
                                    row.ip_opt.escape_debug()
                                )),
                                bounce: None,
                            });
                        }
                        _ => events.push(StatusEvent {
                            email: row.email.clone(),
                            kind,
                            at,
                            detail: Some(format!(
                                "Mailchimp audience {} reports status `{status}`",
                                m.audience
                            )),
                            // `cleaned`: a lasting refusal of the address.
                            bounce: (kind == StatusKind::Bounced)
                                .then_some(optinsync_plugin_api::BounceClass::Hard),
                        }),
                    }
                })
                .await?;
            has_more |= more;
            next.streams.insert(status.to_owned(), stream);
        }
        if !consumed.is_empty() {
            self.forget_own_removals(&m.audience, &consumed).await;
        }
        if !events.is_empty() {
            tracing::info!(
                list,
                events = events.len(),
                "Mailchimp reported unsubscribes/bounces/confirmations"
            );
        }
        let text = serde_json::to_string(&next).map_err(|e| {
            ConnectorError::permanent(format!("cannot write the status cursor: {e}"))
        })?;
        Ok(StatusPage {
            events,
            next_cursor: Some(Cursor(text)),
            has_more,
        })
    }

    /// Subscribed members, `page_size` a page, by `count`/`offset` (the cursor is the offset).
    pub(crate) async fn members_page(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let m = self.mapping(list)?;
        let offset: usize = match cursor {
            None => 0,
            Some(c) => {
                c.0.trim()
                    .parse()
                    .map_err(|_| ConnectorError::InvalidInput {
                        message: "the Mailchimp member cursor is not an offset".into(),
                    })?
            }
        };
        let fields = "members.id,members.email_address,members.status,members.language,members.merge_fields,total_items";
        let q = [
            ("status", "subscribed".to_owned()),
            ("count", self.page_size.to_string()),
            ("offset", offset.to_string()),
            ("fields", fields.to_owned()),
        ];
        let answer = self
            .call(
                Method::GET,
                &format!("/lists/{}/members", m.audience),
                &q,
                None,
            )
            .await
            .map_err(|e| self.item_error(list, m, e))?;
        let n = answer
            .get("members")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let language: Vec<Option<String>> = answer
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| {
                v.get("email_address")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.contains('@'))
            })
            .map(|v| {
                v.get("language")
                    .and_then(Value::as_str)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
            })
            .collect();
        let page = members_answer(&answer).map_err(|why| {
            ConnectorError::transient(format!("Mailchimp's member listing is unreadable: {why}"))
        })?;
        let total = page.total_items.unwrap_or(0) as usize;
        let members = page
            .members
            .into_iter()
            .zip(language)
            .map(|(row, language)| {
                let fields = m
                    .merge_fields
                    .iter()
                    .filter_map(|(tag, field)| {
                        let v = row.merge_fields.get(tag)?;
                        (!v.is_null() && v.as_str() != Some("")).then(|| (field.clone(), v.clone()))
                    })
                    .collect();
                Subscriber {
                    email: row.email,
                    language,
                    fields,
                    proof: None,
                }
            })
            .collect();
        let next = offset + n;
        Ok(MemberPage {
            members,
            next_cursor: Some(Cursor(next.to_string())),
            has_more: n > 0 && next < total,
        })
    }
}
