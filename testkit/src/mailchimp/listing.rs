//! `GET /lists/{id}/members`: filters, sorting, paging, and the churn mode.
//!
//! * Archived members are listed only with `status=archived` (stricter: a client that wants
//!   them must ask).
//! * `since_last_changed` and `before_last_changed` are strict (`>`/`<`); stricter: the
//!   documentation says "after" and does not say whether it is inclusive, and timestamps have
//!   whole seconds, so a client must overlap its cursor and de-duplicate on `id`.
//! * Times are ISO 8601 with an offset; a `+` must be percent-encoded (`%2B`), an unencoded
//!   one decodes to a space and the value is refused with 400.
//! * `unsubscribed_since` needs `status=unsubscribed` (400 otherwise) and compares with
//!   `last_changed` (the fake keeps no separate unsubscribe time).
//! * `sort_field` is `timestamp_opt`, `timestamp_signup` or `last_changed`; `sort_dir`
//!   defaults to `DESC` (stricter: the default is not documented, a client must send it);
//!   ties keep creation order; without `sort_field`, creation order.
//! * `count` defaults to 10; above 1000 it is refused with 400 (stricter: what Mailchimp does
//!   is not documented) unless [`super::CountOverMax::Clamp`].
//! * Churn mode ([`super::MailchimpState::churn`]) moves random members after each answer.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::errors::ApiError;
use super::members::member_json;
use super::{CountOverMax, MailchimpState, Member, Status, iso};

fn query_time(q: &HashMap<String, String>, key: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => DateTime::parse_from_rfc3339(v.trim())
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| ApiError::field(key, "This value is not a valid ISO 8601 date.")),
    }
}

/// `count` and `offset` of a listing (`count` default 10, at most 1000).
pub(super) fn paging(
    s: &MailchimpState,
    q: &HashMap<String, String>,
    note: &mut String,
) -> Result<(usize, usize), ApiError> {
    let count = match q.get("count") {
        None => 10,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| ApiError::field("count", "This value should be a number."))?,
    };
    let count = if count > 1000 {
        match s.options.count_over_max {
            CountOverMax::Refuse => {
                return Err(ApiError::field(
                    "count",
                    "This value should be 1000 or less.",
                ));
            }
            CountOverMax::Clamp => {
                *note = format!("count {count} clamped to 1000");
                1000
            }
        }
    } else {
        count
    };
    let offset = match q.get("offset") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| ApiError::field("offset", "This value should be a number."))?,
    };
    Ok((count, offset))
}

/// `GET /lists/{id}/members`.
pub(super) fn list_members(
    s: &MailchimpState,
    list_id: &str,
    q: &HashMap<String, String>,
    note: &mut String,
) -> Result<Value, ApiError> {
    let list = s.lists.get(list_id).ok_or_else(ApiError::not_found)?;
    let (count, offset) = paging(s, q, note)?;
    let status = match q.get("status") {
        None => None,
        Some(v) => Some(Status::parse(v.trim()).ok_or_else(|| {
            ApiError::field(
                "status",
                "Value must be one of: subscribed, unsubscribed, cleaned, pending, transactional, archived.",
            )
        })?),
    };
    let since = query_time(q, "since_last_changed")?;
    let before = query_time(q, "before_last_changed")?;
    let unsub_since = query_time(q, "unsubscribed_since")?;
    if unsub_since.is_some() && status != Some(Status::Unsubscribed) {
        return Err(ApiError::invalid(
            "unsubscribed_since can only be used with status=unsubscribed.",
        ));
    }
    let sort_field = q.get("sort_field").map(|v| v.trim().to_owned());
    if sort_field
        .as_deref()
        .is_some_and(|f| !matches!(f, "timestamp_opt" | "timestamp_signup" | "last_changed"))
    {
        return Err(ApiError::field(
            "sort_field",
            "Value must be one of: timestamp_opt, timestamp_signup, last_changed.",
        ));
    }
    let desc = match q.get("sort_dir").map(|v| v.trim()) {
        None | Some("DESC") => true,
        Some("ASC") => false,
        Some(_) => {
            return Err(ApiError::field(
                "sort_dir",
                "Value must be one of: ASC, DESC.",
            ));
        }
    };
    let mut matching: Vec<&Member> = list
        .members
        .values()
        .filter(|m| match status {
            Some(st) => m.status == st,
            None => m.status != Status::Archived,
        })
        .filter(|m| since.is_none_or(|t| m.last_changed > t))
        .filter(|m| before.is_none_or(|t| m.last_changed < t))
        .filter(|m| unsub_since.is_none_or(|t| m.last_changed > t))
        .collect();
    matching.sort_by_key(|m| m.seq);
    if let Some(field) = sort_field {
        let key = |m: &Member| -> String {
            match field.as_str() {
                "timestamp_opt" => m.timestamp_opt.clone(),
                "timestamp_signup" => m.timestamp_signup.clone(),
                _ => iso(m.last_changed),
            }
        };
        // Stable: ties keep creation order in both directions.
        matching.sort_by(|a, b| {
            let o = key(a).cmp(&key(b));
            if desc { o.reverse() } else { o }
        });
    }
    let total = matching.len();
    let members: Vec<Value> = matching
        .into_iter()
        .skip(offset)
        .take(count)
        .map(|m| member_json(list, m))
        .collect();
    Ok(json!({"members": members, "list_id": list.id, "total_items": total, "_links": []}))
}

/// Churn mode: move `last_changed` of up to `n` random listed members to now (as if they
/// changed while a client pages).
pub(super) fn churn(s: &mut MailchimpState, list_id: &str, n: usize) {
    use rand::seq::SliceRandom as _;
    let now = s.now();
    let Some(list) = s.lists.get_mut(list_id) else {
        return;
    };
    let mut hashes: Vec<String> = list
        .members
        .values()
        .filter(|m| m.status != Status::Archived)
        .map(|m| m.id.clone())
        .collect();
    hashes.shuffle(&mut rand::thread_rng());
    for h in hashes.into_iter().take(n) {
        if let Some(m) = list.members.get_mut(&h) {
            m.last_changed = now;
        }
    }
}
