//! Reading what Mailchimp sends: webhook bodies (form-encoded, PHP-style `data[…]` keys) and
//! member listings. Pure functions over outside input: they never panic (fuzzed in
//! `fuzz/fuzz_targets/webhook_mailchimp.rs`).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

/// One webhook delivery, decoded. Keys and values are both percent-decoded (Mailchimp encodes
/// the brackets of `data[email]` too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookForm {
    /// `subscribe`, `unsubscribe`, `profile`, `upemail`, `cleaned`, `campaign`.
    pub kind: String,
    /// `fired_at` (`YYYY-MM-DD HH:MM:SS`, UTC), if it parses.
    pub fired_at: Option<DateTime<Utc>>,
    /// `data[list_id]`: the audience id.
    pub list_id: String,
    /// `data[email]` (for `upemail`: empty).
    pub email: String,
    /// `data[action]` of `unsubscribe`: `unsub` or `delete`.
    pub action: String,
    /// `data[reason]`: `manual`/`abuse` (unsubscribe), `hard`/`abuse` (cleaned).
    pub reason: String,
    /// `data[old_email]` / `data[new_email]` of `upemail`.
    pub old_email: String,
    pub new_email: String,
    /// `data[ip_opt]`, when sent.
    pub ip_opt: String,
}

/// Why a body is not a Mailchimp webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAWebhook(pub &'static str);

impl std::fmt::Display for NotAWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Decode a webhook body. Refused: no `type`, no `data[list_id]`, a type other than the six
/// Mailchimp sends, or (for the member events) no address.
pub fn parse_webhook_form(body: &str) -> Result<WebhookForm, NotAWebhook> {
    let mut form = WebhookForm::default();
    let mut fired_at = String::new();
    for (k, v) in form_urlencoded::parse(body.as_bytes()) {
        let v = v.trim().to_owned();
        match k.as_ref() {
            "type" => form.kind = v,
            "fired_at" => fired_at = v,
            "data[list_id]" => form.list_id = v,
            "data[email]" => form.email = v,
            "data[action]" => form.action = v,
            "data[reason]" => form.reason = v,
            "data[old_email]" => form.old_email = v,
            "data[new_email]" => form.new_email = v,
            "data[ip_opt]" => form.ip_opt = v,
            _ => {}
        }
    }
    if form.kind.is_empty() {
        return Err(NotAWebhook("no `type`"));
    }
    if !matches!(
        form.kind.as_str(),
        "subscribe" | "unsubscribe" | "profile" | "upemail" | "cleaned" | "campaign"
    ) {
        return Err(NotAWebhook("unknown `type`"));
    }
    if form.list_id.is_empty() {
        return Err(NotAWebhook("no `data[list_id]`"));
    }
    let needs_email = matches!(
        form.kind.as_str(),
        "subscribe" | "unsubscribe" | "profile" | "cleaned"
    );
    if needs_email && !form.email.contains('@') {
        return Err(NotAWebhook("no address in `data[email]`"));
    }
    if form.kind == "upemail" && !form.old_email.contains('@') {
        return Err(NotAWebhook("no address in `data[old_email]`"));
    }
    form.fired_at = NaiveDateTime::parse_from_str(&fired_at, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc());
    Ok(form)
}

/// One member of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRow {
    /// The subscriber hash.
    pub id: String,
    pub email: String,
    pub status: String,
    pub last_changed: Option<DateTime<Utc>>,
    pub timestamp_opt: Option<DateTime<Utc>>,
    pub ip_opt: String,
    pub unsubscribe_reason: String,
    pub merge_fields: BTreeMap<String, Value>,
}

/// One page of `GET /lists/{id}/members`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembersAnswer {
    pub members: Vec<MemberRow>,
    pub total_items: Option<u64>,
}

/// A Mailchimp time (`2024-05-01T10:05:12+00:00`; `""` is none).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|t| t.and_utc())
        })
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// Read a member (`GET …/members/{hash}` or one item of a listing); `None` without an address.
pub fn member_row(v: &Value) -> Option<MemberRow> {
    let email = text(v, "email_address").trim().to_owned();
    if !email.contains('@') {
        return None;
    }
    let merge_fields = match v.get("merge_fields") {
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => BTreeMap::new(),
    };
    Some(MemberRow {
        id: text(v, "id").to_lowercase(),
        email,
        status: text(v, "status"),
        last_changed: parse_time(&text(v, "last_changed")),
        timestamp_opt: parse_time(&text(v, "timestamp_opt")),
        ip_opt: text(v, "ip_opt"),
        unsubscribe_reason: text(v, "unsubscribe_reason"),
        merge_fields,
    })
}

/// Read a members answer; members without an address are left out. Refused: not JSON, or no
/// `members` array.
pub fn parse_members_answer(body: &[u8]) -> Result<MembersAnswer, &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    members_answer(&v)
}

pub(crate) fn members_answer(v: &Value) -> Result<MembersAnswer, &'static str> {
    let Some(Value::Array(items)) = v.get("members") else {
        return Err("no `members` array");
    };
    Ok(MembersAnswer {
        members: items.iter().filter_map(member_row).collect(),
        total_items: v.get("total_items").and_then(Value::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_keys_and_values_are_decoded() {
        let body = "type=unsubscribe&fired_at=2024-05-03+08%3A00%3A00&data%5Baction%5D=unsub\
                    &data%5Breason%5D=abuse&data%5Blist_id%5D=a1b2&data%5Bemail%5D=jane%40example.com";
        let f = parse_webhook_form(body).expect("parses");
        assert_eq!(f.kind, "unsubscribe");
        assert_eq!(f.email, "jane@example.com");
        assert_eq!(f.reason, "abuse");
        assert_eq!(f.list_id, "a1b2");
        assert!(f.fired_at.is_some());
        // Unencoded brackets read the same.
        let plain = "type=cleaned&data[list_id]=a1b2&data[email]=x%40y.org&data[reason]=hard";
        assert_eq!(parse_webhook_form(plain).expect("parses").email, "x@y.org");
    }

    #[test]
    fn bodies_that_are_not_deliveries_are_refused() {
        for bad in [
            "",
            "type=",
            "type=sneaky&data[list_id]=a&data[email]=a@b.c",
            "type=unsubscribe&data[email]=a@b.c",
            "type=unsubscribe&data[list_id]=a",
            "type=upemail&data[list_id]=a",
            "%FF%FE=1",
        ] {
            assert!(parse_webhook_form(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn members_answers_are_read_leniently_inside_and_strictly_outside() {
        let body = br#"{"members":[{"id":"AB","email_address":"a@b.org","status":"unsubscribed",
            "last_changed":"2024-05-01T10:05:12+00:00","timestamp_opt":""},{"id":"x"}],"total_items":2}"#;
        let a = parse_members_answer(body).expect("reads");
        assert_eq!(a.members.len(), 1);
        assert_eq!(a.members[0].id, "ab");
        assert!(a.members[0].last_changed.is_some() && a.members[0].timestamp_opt.is_none());
        assert_eq!(a.total_items, Some(2));
        assert!(parse_members_answer(b"<html>").is_err());
        assert!(parse_members_answer(b"{}").is_err());
    }
}
