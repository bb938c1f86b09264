//! `POST /lists/{id}`: the synchronous batch subscribe/unsubscribe (≤ 500 members,
//! per-member `errors[]`).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::errors::ApiError;
use super::members::{Mode, write};
use super::webhooks::Rendered;
use super::{MailchimpState, subscriber_hash};

/// `POST /lists/{id}`: batch subscribe/unsubscribe.
pub(super) fn batch(
    s: &mut MailchimpState,
    list_id: &str,
    body: &Map<String, Value>,
    skip_merge_validation: bool,
    skip_duplicate_check: bool,
) -> Result<(Value, Vec<Rendered>), ApiError> {
    if !s.lists.contains_key(list_id) {
        return Err(ApiError::not_found());
    }
    let Some(Value::Array(items)) = body.get("members") else {
        return Err(ApiError::field(
            "members",
            "This value should not be blank.",
        ));
    };
    if items.len() > 500 {
        return Err(ApiError::field(
            "members",
            "Up to 500 members may be added or updated with each API call.",
        ));
    }
    let update_existing = match body.get("update_existing") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::field(
                "update_existing",
                "Schema describes boolean.",
            ));
        }
    };
    let mut new_members = Vec::new();
    let mut updated_members = Vec::new();
    let mut errors = Vec::new();
    let mut events = Vec::new();
    let mut seen = BTreeSet::new();
    for item in items {
        let email = item
            .get("email_address")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_owned();
        let error = |e: ApiError| {
            let (field, message) = e.errors.first().cloned().unwrap_or_default();
            json!({"email_address": email, "error": e.detail, "error_code": e.batch_code,
                   "field": field, "field_message": message})
        };
        if !email.is_empty() && !seen.insert(subscriber_hash(&email)) {
            if !skip_duplicate_check {
                errors.push(error(ApiError::invalid(&format!(
                    "{email} appears more than once in this request."
                ))));
            }
            continue;
        }
        let Value::Object(obj) = item else {
            errors.push(error(ApiError::invalid("Each member must be an object.")));
            continue;
        };
        match write(
            s,
            list_id,
            None,
            obj,
            Mode::Batch { update_existing },
            skip_merge_validation,
        ) {
            Ok(w) => {
                events.extend(w.events);
                if w.created {
                    new_members.push(w.member);
                } else {
                    updated_members.push(w.member);
                }
            }
            Err(e) => errors.push(error(e)),
        }
    }
    let answer = json!({
        "new_members": new_members, "updated_members": updated_members, "errors": errors,
        "total_created": new_members.len(), "total_updated": updated_members.len(),
        "error_count": errors.len(), "_links": []
    });
    Ok((answer, events))
}
