//! List members: the upsert, the status rules, validation, archive and permanent delete.
//!
//! Status rules (what an API write may do to an existing member):
//!
//! | from → to | answer |
//! |---|---|
//! | none → any, by `PUT` | created with `status_if_new` (stricter: `status_if_new` is required for a new member even when `status` is sent) |
//! | exists, by `POST …/members` | 400 `Member Exists` (stricter: also for an archived member) |
//! | `subscribed` → `unsubscribed` | allowed; the member is unsubscribed "by the API" |
//! | `unsubscribed`/`cleaned` → `subscribed` | 400 `Member In Compliance State` (stricter: for every unsubscribe, the API's own included, unless [`super::MailchimpOptions::resubscribe_after_api_unsubscribe`]) |
//! | any → `subscribed` for an address on the compliance list | 400 `Member In Compliance State` (`pending` is allowed: the recovery path Mailchimp's own e-commerce plugin uses) |
//! | `unsubscribed`/`cleaned` → `pending` | allowed, sends a confirmation mail |
//! | any → `pending` | a confirmation mail each time (stricter: also when the member already is pending and `status: pending` is sent again) |
//! | `pending` → `subscribed` | allowed (bypasses the confirmation) |
//! | any → `archived` through `status` | 400 `Invalid Resource` (read-only value) |
//! | `subscribed`/`unsubscribed`/`transactional` → archived, by `DELETE` | 204 |
//! | `pending`/`cleaned`/`archived` → archived, by `DELETE` | 405 "This list member cannot be removed. …" |
//! | archived → any, by `PUT`/`PATCH` with a status | re-added with the rules above applied to the status it had before archiving |
//! | permanently deleted → anything | 400 `Forgotten Email Not Subscribed`; `GET` answers 404 |
//!
//! Validation: an address that does not contain a single `@` ("An email address must contain a
//! single @."), or is not an address ("Please provide a valid email address."), or looks fake
//! ("… looks fake or invalid, please enter a real email address."); a body address whose hash
//! is not the path's hash (stricter: refused, Mailchimp does not document it; the body is the
//! fake's own: `errors[0].field = "email_address"`); merge fields: an unknown tag (stricter:
//! refused), a `number` field that is not a number ("Please enter a number"), a required field
//! missing on create or emptied ("Please enter a value") unless `skip_merge_validation=true`
//! — all as 400 `Invalid Resource` "Your merge fields were invalid." with `errors[]`; an unknown
//! marketing permission id, an `email_type` other than `html`/`text`, an IP that does not parse,
//! a timestamp that does not parse: 400 `Invalid Resource` with the field in `errors[]`.
//!
//! Timestamps: `last_changed` moves on every write that changes the member; `ip_signup`,
//! `timestamp_signup`, `ip_opt`, `timestamp_opt` hold what the client sent and stay `""`
//! otherwise (stricter: the fake never fills opt-in evidence for an API `subscribed`; only
//! [`super::FakeMailchimp::confirm`] fills `ip_opt`/`timestamp_opt`, as Mailchimp does on the
//! click).
//!
//! Bodies: keys the fake does not model (`tags`, `interests`, …) are ignored. A `PATCH` whose
//! `email_address` differs from the path's address is refused like any hash mismatch: changing
//! an address over the API is not reproduced (the person's own change is, see
//! [`super::FakeMailchimp::change_email`]). The per-address signup throttle
//! ([`super::MailchimpOptions::signup_throttle`]) counts writes that move an address to
//! `subscribed` or `pending`.
//!
//! Webhook events of API writes (source `api`): `subscribe` when a member becomes
//! `subscribed`, `unsubscribe` (`action=unsub`) when it becomes `unsubscribed`, `cleaned` when
//! it becomes `cleaned`, `unsubscribe` with `action=delete` on archive, `profile` when an
//! existing member changes without a status change; none for `pending` (the confirmation click
//! fires `subscribe`, source `user`) and none for a permanent delete.

use std::time::Instant;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};

use super::errors::ApiError;
use super::webhooks::{Rendered, WebhookEvent, render};
use super::{FakeList, MailchimpState, Member, Source, Status, iso, subscriber_hash};

/// How a member is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Put,
    Patch,
    Post,
    Batch { update_existing: bool },
}

/// The result of a member write.
#[derive(Debug)]
pub(super) struct Written {
    pub member: Value,
    pub created: bool,
    pub events: Vec<Rendered>,
}

/// The hash a path slot names: an address, a subscriber hash or a `contact_id`.
pub(super) fn resolve(list: &FakeList, slot: &str) -> String {
    if slot.contains('@') {
        return subscriber_hash(slot);
    }
    let lower = slot.to_lowercase();
    if lower.len() == 32 && list.members.contains_key(&lower) {
        return lower;
    }
    list.members
        .values()
        .find(|m| m.contact_id == slot)
        .map(|m| m.id.clone())
        .unwrap_or(lower)
}

pub(super) fn member_json(list: &FakeList, m: &Member) -> Value {
    let mut merges: Map<String, Value> = list
        .merge_fields
        .iter()
        .map(|f| (f.tag.clone(), json!("")))
        .collect();
    for (k, v) in &m.merge_fields {
        merges.insert(k.clone(), v.clone());
    }
    let text = |k: &str| merges.get(k).and_then(Value::as_str).unwrap_or_default();
    let full_name = format!("{} {}", text("FNAME"), text("LNAME"))
        .trim()
        .to_owned();
    let mut v = json!({
        "id": m.id, "email_address": m.email_address, "unique_email_id": m.unique_email_id,
        "contact_id": m.contact_id, "full_name": full_name, "web_id": m.web_id,
        "email_type": m.email_type, "status": m.status.as_str(),
        "unsubscribe_reason": m.unsubscribe_reason, "consents_to_one_to_one_messaging": true,
        "merge_fields": merges, "interests": {}, "stats": {"avg_open_rate": 0, "avg_click_rate": 0},
        "ip_signup": m.ip_signup, "timestamp_signup": m.timestamp_signup, "ip_opt": m.ip_opt,
        "timestamp_opt": m.timestamp_opt, "member_rating": 2, "last_changed": iso(m.last_changed),
        "language": m.language, "vip": m.vip, "email_client": "",
        "location": {"latitude": 0, "longitude": 0, "gmtoff": 0, "dstoff": 0, "country_code": "",
                     "timezone": "", "region": ""},
        "last_note": {"note_id": 0, "created_at": "", "created_by": "", "note": ""},
        "source": m.source, "tags_count": 0, "tags": [], "list_id": list.id, "_links": []
    });
    if !list.permissions.is_empty()
        && let Value::Object(o) = &mut v
    {
        let perms: Vec<Value> = list
            .permissions
            .iter()
            .map(|p| {
                json!({"marketing_permission_id": p.id, "text": p.text,
                       "enabled": m.marketing_permissions.get(&p.id).copied().unwrap_or(false)})
            })
            .collect();
        o.insert("marketing_permissions".into(), Value::Array(perms));
    }
    v
}

/// Syntax and "looks fake" checks of an address.
fn check_address(s: &MailchimpState, email: &str) -> Result<(), ApiError> {
    if email.matches('@').count() != 1 {
        return Err(ApiError::invalid(
            "An email address must contain a single @.",
        ));
    }
    let (local, domain) = email.split_once('@').unwrap_or_default();
    let labels_ok = domain
        .split('.')
        .all(|l| !l.is_empty() && l.chars().all(|c| c.is_alphanumeric() || c == '-'));
    if local.is_empty()
        || !domain.contains('.')
        || !labels_ok
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
    {
        return Err(ApiError::invalid("Please provide a valid email address."));
    }
    let lower = email.to_lowercase();
    let local_lower = local.to_lowercase();
    if s.fake_looking.contains(&lower) || s.fake_looking_locals.contains(&local_lower) {
        return Err(ApiError::invalid(&format!(
            "{email} looks fake or invalid, please enter a real email address."
        )));
    }
    Ok(())
}

fn request_status(body: &Map<String, Value>, field: &str) -> Result<Option<Status>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => match Status::parse(v) {
            Some(st) if st != Status::Archived => Ok(Some(st)),
            _ => Err(ApiError::field(
                field,
                "Value must be one of: subscribed, unsubscribed, cleaned, pending, transactional.",
            )),
        },
        Some(_) => Err(ApiError::field(field, "Schema describes string.")),
    }
}

fn parse_time(v: &str) -> Option<String> {
    if v.is_empty() {
        return Some(String::new());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(iso(t.with_timezone(&Utc)));
    }
    NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| iso(t.and_utc()))
}

fn string_field(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(ApiError::field(field, "Schema describes string.")),
    }
}

fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

/// Write one member (PUT, PATCH, POST or one batch item). Nothing changes on an error.
pub(super) fn write(
    s: &mut MailchimpState,
    list_id: &str,
    slot: Option<&str>,
    body: &Map<String, Value>,
    mode: Mode,
    skip_merge_validation: bool,
) -> Result<Written, ApiError> {
    let now = s.now();
    let Some(list) = s.lists.get(list_id) else {
        return Err(ApiError::not_found());
    };
    let path_hash = slot.map(|x| resolve(list, x));
    let email = match (string_field(body, "email_address")?, mode) {
        (Some(e), _) if !e.is_empty() => e,
        (_, Mode::Patch) => match path_hash.as_ref().and_then(|h| list.members.get(h)) {
            Some(m) => m.email_address.clone(),
            None => return Err(ApiError::not_found()),
        },
        _ => {
            return Err(ApiError::field(
                "email_address",
                "This value should not be blank.",
            ));
        }
    };
    check_address(s, &email)?;
    let hash = subscriber_hash(&email);
    if path_hash.as_ref().is_some_and(|h| *h != hash) {
        return Err(ApiError::field(
            "email_address",
            "The email address does not match the subscriber hash in the URL.",
        ));
    }
    if list.forgotten.contains(&hash) {
        return Err(ApiError::new(
            400,
            "Forgotten Email Not Subscribed",
            &format!(
                "{email} was permanently deleted and cannot be re-imported. The contact must re-subscribe to get back on the list."
            ),
        ));
    }
    let existing = list.members.get(&hash).cloned();
    match (mode, &existing) {
        (Mode::Post, Some(_)) => {
            return Err(ApiError::new(
                400,
                "Member Exists",
                &format!(
                    "{email} is already a list member. Use PUT to insert or update list members."
                ),
            ));
        }
        (
            Mode::Batch {
                update_existing: false,
            },
            Some(_),
        ) => {
            let mut e = ApiError::new(
                400,
                "Member Exists",
                &format!(
                    "{email} is already a list member, do you want to update? please provide update_existing:true in the request body"
                ),
            );
            e.batch_code = "ERROR_CONTACT_EXISTS";
            return Err(e);
        }
        (Mode::Patch, None) => return Err(ApiError::not_found()),
        _ => {}
    }
    let status = request_status(body, "status")?;
    let status_if_new = request_status(body, "status_if_new")?;
    let target = match &existing {
        None => match mode {
            Mode::Put => Some(status_if_new.ok_or_else(|| {
                ApiError::field("status_if_new", "This value should not be blank.")
            })?),
            _ => Some(
                status
                    .ok_or_else(|| ApiError::field("status", "This value should not be blank."))?,
            ),
        },
        Some(m) if m.status == Status::Archived && mode == Mode::Put => status.or(status_if_new),
        Some(_) => status,
    };
    // The status the rules look at: an archived member's status before archiving.
    let from = existing.as_ref().map(|m| match m.status {
        Status::Archived => m.archived_from.unwrap_or(Status::Subscribed),
        st => st,
    });
    let lower = email.to_lowercase();
    if target == Some(Status::Subscribed) && from != Some(Status::Subscribed) {
        let by = existing.as_ref().and_then(|m| m.unsubscribed_by);
        let blocked = s.compliance.contains(&lower)
            || match from {
                Some(Status::Unsubscribed) => {
                    !(by == Some(Source::Api) && s.options.resubscribe_after_api_unsubscribe)
                }
                Some(Status::Cleaned) => true,
                _ => false,
            };
        if blocked {
            return Err(ApiError::new(
                400,
                "Member In Compliance State",
                &format!(
                    "{email} is in a compliance state due to unsubscribe, bounce, or compliance review and cannot be subscribed."
                ),
            ));
        }
    }
    let current = existing.as_ref().map(|m| m.status);
    let signup = matches!(target, Some(Status::Subscribed | Status::Pending)) && current != target;
    if signup && let Some((limit, window)) = s.options.signup_throttle {
        let window = s.options.scaled(window);
        let recent = s
            .signups
            .get(&lower)
            .map_or(0, |q| q.iter().filter(|t| t.elapsed() < window).count());
        if recent >= limit as usize {
            return Err(ApiError::invalid(&format!(
                "{email} has signed up to a lot of lists very recently; we're not allowing more signups for now"
            )));
        }
    }

    // Merge fields.
    let merges = match body.get("merge_fields") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::field("merge_fields", "Schema describes object.")),
    };
    let mut errors = Vec::new();
    let mut canonical = Vec::new();
    for (tag, v) in &merges {
        match list
            .merge_fields
            .iter()
            .find(|f| f.tag.eq_ignore_ascii_case(tag))
        {
            None => errors.push((tag.clone(), "This merge field does not exist.".to_owned())),
            Some(f) => {
                let number_ok = v.is_number()
                    || v.as_str()
                        .is_some_and(|t| t.trim().is_empty() || t.trim().parse::<f64>().is_ok());
                if f.kind == "number" && !number_ok {
                    errors.push((f.tag.clone(), "Please enter a number".into()));
                } else if f.required && is_blank(v) && !skip_merge_validation {
                    errors.push((f.tag.clone(), "Please enter a value".into()));
                } else if !v.is_string() && !v.is_number() && !v.is_null() {
                    errors.push((f.tag.clone(), "Schema describes string.".into()));
                } else {
                    canonical.push((f.tag.clone(), v.clone()));
                }
            }
        }
    }
    if existing.is_none() && !skip_merge_validation {
        for f in list.merge_fields.iter().filter(|f| f.required) {
            if !merges.keys().any(|k| k.eq_ignore_ascii_case(&f.tag)) {
                errors.push((f.tag.clone(), "Please enter a value".into()));
            }
        }
    }
    if !errors.is_empty() {
        let mut e = ApiError::invalid("Your merge fields were invalid.");
        e.errors = errors;
        return Err(e);
    }

    // Marketing permissions.
    let mut perms = Vec::new();
    match body.get("marketing_permissions") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let id = item.get("marketing_permission_id").and_then(Value::as_str);
                let enabled = item.get("enabled").and_then(Value::as_bool);
                match (id, enabled) {
                    (Some(id), Some(on)) if list.permissions.iter().any(|p| p.id == id) => {
                        perms.push((id.to_owned(), on));
                    }
                    (Some(id), Some(_)) => {
                        return Err(ApiError::field(
                            "marketing_permissions",
                            &format!("Invalid marketing permission id: {id}"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::field(
                            "marketing_permissions",
                            "Each item needs marketing_permission_id (string) and enabled (boolean).",
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::field(
                "marketing_permissions",
                "Schema describes array.",
            ));
        }
    }

    // Plain fields.
    let email_type = string_field(body, "email_type")?;
    if email_type
        .as_deref()
        .is_some_and(|t| t != "html" && t != "text")
    {
        return Err(ApiError::field(
            "email_type",
            "Value must be one of: html, text.",
        ));
    }
    let mut ips = Vec::new();
    for f in ["ip_signup", "ip_opt"] {
        if let Some(ip) = string_field(body, f)? {
            if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
                return Err(ApiError::field(f, "This value is not a valid IP address."));
            }
            ips.push((f, ip));
        }
    }
    let mut times = Vec::new();
    for f in ["timestamp_signup", "timestamp_opt"] {
        if let Some(t) = string_field(body, f)? {
            let Some(t) = parse_time(&t) else {
                return Err(ApiError::field(
                    f,
                    "This value is not a valid date (ISO 8601, or YYYY-MM-DD HH:MM:SS).",
                ));
            };
            times.push((f, t));
        }
    }
    let language = string_field(body, "language")?;
    let vip = match body.get("vip") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(ApiError::field("vip", "Schema describes boolean.")),
    };

    // Apply.
    let created = existing.is_none();
    let perm_ids: Vec<String> = list.permissions.iter().map(|p| p.id.clone()).collect();
    let seq = if created { s.next_seq() } else { 0 };
    let mut m = existing.clone().unwrap_or_else(|| Member {
        id: hash.clone(),
        email_address: email.clone(),
        unique_email_id: MailchimpState::hex(10),
        contact_id: MailchimpState::hex(32),
        web_id: MailchimpState::web_id(),
        email_type: "html".into(),
        status: Status::Pending,
        archived_from: None,
        unsubscribed_by: None,
        unsubscribe_reason: String::new(),
        merge_fields: Default::default(),
        language: String::new(),
        vip: false,
        marketing_permissions: perm_ids.iter().map(|p| (p.clone(), false)).collect(),
        ip_signup: String::new(),
        timestamp_signup: String::new(),
        ip_opt: String::new(),
        timestamp_opt: String::new(),
        last_changed: now,
        source: "API - Generic".into(),
        seq,
    });
    m.email_address = email.clone();
    let mut mail = false;
    if let Some(t) = target {
        mail = t == Status::Pending;
        if t == Status::Unsubscribed && m.status != Status::Unsubscribed {
            m.unsubscribed_by = Some(Source::Api);
        }
        m.status = t;
        m.archived_from = None;
    }
    for (tag, v) in canonical {
        m.merge_fields.insert(tag, v);
    }
    for (id, on) in perms {
        m.marketing_permissions.insert(id, on);
    }
    if let Some(t) = email_type {
        m.email_type = t;
    }
    for (f, ip) in ips {
        match f {
            "ip_signup" => m.ip_signup = ip,
            _ => m.ip_opt = ip,
        }
    }
    for (f, t) in times {
        match f {
            "timestamp_signup" => m.timestamp_signup = t,
            _ => m.timestamp_opt = t,
        }
    }
    if let Some(l) = language {
        m.language = l;
    }
    if let Some(v) = vip {
        m.vip = v;
    }
    let changed = existing.as_ref() != Some(&m);
    if changed {
        m.last_changed = now;
    }
    if signup {
        s.signups
            .entry(lower)
            .or_default()
            .push_back(Instant::now());
    }
    let Some(list) = s.lists.get_mut(list_id) else {
        return Err(ApiError::not_found());
    };
    if mail {
        list.confirmation_mails.push(email.clone());
    }
    list.members.insert(hash.clone(), m.clone());
    let member = member_json(list, &m);

    // Webhook events (source `api`).
    let status_changed = existing.as_ref().map(|e| e.status) != Some(m.status);
    let mut events = Vec::new();
    let event = if status_changed && m.status == Status::Subscribed {
        Some(WebhookEvent::Subscribe {
            email: email.clone(),
        })
    } else if status_changed && m.status == Status::Unsubscribed {
        Some(WebhookEvent::Unsubscribe {
            email: email.clone(),
            action: "unsub".into(),
            reason: "manual".into(),
            campaign_id: None,
        })
    } else if status_changed && m.status == Status::Cleaned {
        Some(WebhookEvent::Cleaned {
            email: email.clone(),
            reason: "hard".into(),
            campaign_id: None,
        })
    } else if !created && !status_changed && changed {
        Some(WebhookEvent::Profile {
            email: email.clone(),
        })
    } else {
        None
    };
    if let Some(e) = event.and_then(|e| render(s, list_id, &e, Some(Source::Api))) {
        events.push(e);
    }
    Ok(Written {
        member,
        created,
        events,
    })
}

/// `DELETE …/members/{hash}`: archive.
pub(super) fn archive(
    s: &mut MailchimpState,
    list_id: &str,
    slot: &str,
) -> Result<Vec<Rendered>, ApiError> {
    let now = s.now();
    let list = s.lists.get_mut(list_id).ok_or_else(ApiError::not_found)?;
    let hash = resolve(list, slot);
    let m = list
        .members
        .get_mut(&hash)
        .ok_or_else(ApiError::not_found)?;
    if matches!(
        m.status,
        Status::Pending | Status::Cleaned | Status::Archived
    ) {
        return Err(ApiError::new(
            405,
            "Method Not Allowed",
            "This list member cannot be removed. Can not archive a contact that is bounced, pending or archived",
        ));
    }
    m.archived_from = Some(m.status);
    m.status = Status::Archived;
    m.last_changed = now;
    let email = m.email_address.clone();
    let event = WebhookEvent::Unsubscribe {
        email,
        action: "delete".into(),
        reason: "manual".into(),
        campaign_id: None,
    };
    Ok(render(s, list_id, &event, Some(Source::Api))
        .into_iter()
        .collect())
}

/// `POST …/members/{hash}/actions/delete-permanent`.
pub(super) fn delete_permanent(
    s: &mut MailchimpState,
    list_id: &str,
    slot: &str,
) -> Result<(), ApiError> {
    let list = s.lists.get_mut(list_id).ok_or_else(ApiError::not_found)?;
    let hash = resolve(list, slot);
    list.members.remove(&hash).ok_or_else(ApiError::not_found)?;
    list.forgotten.insert(hash);
    Ok(())
}

/// The person clicks Mailchimp's confirmation mail: `pending` → `subscribed` with `ip_opt`
/// and `timestamp_opt` filled and `last_changed` moved; the `subscribe` event (source
/// `user`). None when the member is not pending.
pub(super) fn confirm(
    s: &mut MailchimpState,
    list_id: &str,
    slot: &str,
    ip: &str,
) -> Option<Rendered> {
    let now = s.now();
    let list = s.lists.get_mut(list_id)?;
    let hash = resolve(list, slot);
    let m = list.members.get_mut(&hash)?;
    if m.status != Status::Pending {
        return None;
    }
    m.status = Status::Subscribed;
    m.ip_opt = ip.to_owned();
    m.timestamp_opt = iso(now);
    m.last_changed = now;
    let email = m.email_address.clone();
    render(
        s,
        list_id,
        &WebhookEvent::Subscribe { email },
        Some(Source::User),
    )
}

/// `GET …/members/{hash}`.
pub(super) fn get(s: &MailchimpState, list_id: &str, slot: &str) -> Result<Value, ApiError> {
    let list = s.lists.get(list_id).ok_or_else(ApiError::not_found)?;
    let hash = resolve(list, slot);
    let m = list.members.get(&hash).ok_or_else(ApiError::not_found)?;
    Ok(member_json(list, m))
}
