//! `POST .../contacts/batch/{read,update,upsert,create,archive}`: at most
//! [`super::HubSpotState::batch_max`] inputs (100; more → 400); `status: "COMPLETE"`; 200 when
//! every input succeeded, 207 with `numErrors` and `errors[]` (`category`, `context.ids`)
//! otherwise.
//!
//! Stricter or inferred readings: an input whose properties fail validation refuses the whole
//! batch (400, nothing written) while unknown ids are reported per item (207); the same record
//! twice in one update/upsert → 400 "Duplicate IDs"; a batch create is all-or-nothing (409 on
//! a duplicate email) unless every input carries an `objectWriteTraceId`, as HubSpot's
//! error-handling page describes; batch archive answers 204 whatever the ids.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::contacts::{
    apply, archive, archived_param, conflict, create_one, email_of, names, render_written, resolve,
};
use super::http::{Query, Reply, error};
use super::properties::{valid_email, validate, validation_error};
use super::{HubSpotState, now_ms, render_time};

fn batch_envelope(results: Vec<Value>, errors: Vec<Value>, ok_status: u16) -> Reply {
    let now = render_time(now_ms());
    let mut body = json!({"status": "COMPLETE", "results": results, "requestedAt": now,
                          "startedAt": now, "completedAt": now, "links": {}});
    let status = if errors.is_empty() {
        ok_status
    } else {
        body["numErrors"] = json!(errors.len());
        body["errors"] = Value::Array(errors);
        207
    };
    Reply::new(status, body)
}

fn not_found_item(ids: &[String]) -> Value {
    json!({"status": "error", "category": "OBJECT_NOT_FOUND",
           "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
           "context": {"ids": ids}, "errors": [], "links": {}})
}

fn input_id(input: &Value) -> Option<String> {
    match input.get("id") {
        Some(Value::String(t)) => Some(t.clone()),
        _ => None,
    }
}

/// `POST .../contacts/batch/{read,update,upsert,create,archive}`.
pub(crate) fn batch(s: &mut HubSpotState, kind: &str, q: &Query, body: &Value) -> Reply {
    let Some(inputs) = body.get("inputs").and_then(Value::as_array) else {
        return error(400, "VALIDATION_ERROR", "inputs is required");
    };
    if inputs.len() > s.batch_max {
        return error(
            400,
            "VALIDATION_ERROR",
            &format!(
                "Batch input has {} inputs; at most {} are allowed",
                inputs.len(),
                s.batch_max
            ),
        );
    }
    let default_id_property = body.get("idProperty").and_then(Value::as_str);
    if kind != "create" && inputs.iter().any(|i| input_id(i).is_none()) {
        return error(
            400,
            "VALIDATION_ERROR",
            "every input needs an id (a string)",
        );
    }
    match kind {
        "read" => {
            let archived = archived_param(q);
            let props = names(body.get("properties"));
            let history = names(body.get("propertiesWithHistory")).filter(|h| !h.is_empty());
            let mut results = Vec::new();
            let mut missing = Vec::new();
            let mut seen = HashSet::new();
            for input in inputs {
                let id = input_id(input).unwrap_or_default();
                let found = match resolve(s, &id, default_id_property) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                match found
                    .and_then(|n| s.contacts.get(&n))
                    .filter(|c| c.archived == archived)
                {
                    Some(c) if seen.insert(c.id) => results.push(c.render(
                        &c.properties,
                        props.as_deref().filter(|p| !p.is_empty()),
                        history.as_deref(),
                        Some(&s.properties),
                    )),
                    Some(_) => {}
                    None => missing.push(id),
                }
            }
            let errors = if missing.is_empty() {
                vec![]
            } else {
                vec![not_found_item(&missing)]
            };
            batch_envelope(results, errors, 200)
        }
        "update" | "upsert" => {
            let mut planned = Vec::new();
            for input in inputs {
                let changes = match validate(s, input.get("properties")) {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let id = input_id(input).unwrap_or_default();
                let id_property = input
                    .get("idProperty")
                    .and_then(Value::as_str)
                    .or(default_id_property);
                let found = match resolve(s, &id, id_property) {
                    Ok(f) => f.filter(|n| s.contacts.get(n).is_some_and(|c| !c.archived)),
                    Err(r) => return r,
                };
                planned.push((id, id_property.map(str::to_owned), found, changes));
            }
            let mut seen = HashSet::new();
            let dups: Vec<String> =
                planned
                    .iter()
                    .filter(|(id, _, found, _)| {
                        !seen.insert(found.map_or_else(
                            || format!("new:{}", id.to_lowercase()),
                            |n| n.to_string(),
                        ))
                    })
                    .map(|(id, ..)| id.clone())
                    .collect();
            if !dups.is_empty() {
                return error(
                    400,
                    "VALIDATION_ERROR",
                    &format!("Duplicate IDs found in batch input: {dups:?}. IDs must be unique"),
                );
            }
            let now = now_ms();
            let mut results = Vec::new();
            let mut missing = Vec::new();
            let mut errors = Vec::new();
            for (id, id_property, found, mut changes) in planned {
                let target = match found {
                    Some(n) => {
                        if let Some(other) = email_of(&changes)
                            .and_then(|e| s.id_by_email(&e))
                            .filter(|o| *o != n)
                        {
                            errors.push(json!({"status": "error", "category": "CONFLICT",
                                "message": format!("Contact already exists. Existing ID: {other}"),
                                "context": {"ids": [id]}, "errors": [], "links": {}}));
                            continue;
                        }
                        apply(s, n, &changes, now, "API");
                        (n, false)
                    }
                    None if kind == "upsert" && id_property.as_deref() == Some("email") => {
                        if !valid_email(&id) {
                            return validation_error(&[(
                                "email".into(),
                                "INVALID_EMAIL".into(),
                                format!("Email address {id} is invalid"),
                            )]);
                        }
                        changes.retain(|(k, _)| k != "email");
                        changes.push(("email".into(), id.to_lowercase()));
                        (create_one(s, &changes, now), true)
                    }
                    None => {
                        missing.push(id);
                        continue;
                    }
                };
                let mut v = render_written(s, target.0);
                if kind == "upsert" {
                    v["new"] = json!(target.1);
                }
                results.push(v);
            }
            if !missing.is_empty() {
                errors.push(not_found_item(&missing));
            }
            batch_envelope(results, errors, 200)
        }
        "create" => {
            let mut planned = Vec::new();
            for input in inputs {
                match validate(s, input.get("properties")) {
                    Ok(c) => planned.push((
                        input
                            .get("objectWriteTraceId")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        c,
                    )),
                    Err(r) => return r,
                }
            }
            let traced = planned.iter().all(|(t, _)| t.is_some());
            let mut emails = HashSet::new();
            let mut conflicts = Vec::new();
            for (i, (_, c)) in planned.iter().enumerate() {
                if let Some(e) = email_of(c) {
                    if let Some(existing) = s.id_by_email(&e) {
                        conflicts.push((i, existing));
                    } else if !emails.insert(e) {
                        conflicts.push((i, 0));
                    }
                }
            }
            if !traced && let Some((_, existing)) = conflicts.first() {
                return conflict(*existing);
            }
            let now = now_ms();
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for (i, (trace, changes)) in planned.iter().enumerate() {
                if let Some((_, existing)) = conflicts.iter().find(|(j, _)| *j == i) {
                    errors.push(json!({"status": "error", "category": "CONFLICT",
                        "message": format!("Contact already exists. Existing ID: {existing}"),
                        "context": {"objectWriteTraceId": [trace]}, "errors": [], "links": {}}));
                    continue;
                }
                let id = create_one(s, changes, now);
                let mut v = render_written(s, id);
                v["objectWriteTraceId"] = json!(trace);
                results.push(v);
            }
            batch_envelope(results, errors, 201)
        }
        "archive" => {
            let now = now_ms();
            for input in inputs {
                let id = input_id(input).unwrap_or_default();
                if let Ok(Some(n)) = resolve(s, &id, None) {
                    archive(s, n, now);
                }
            }
            Reply::new(204, Value::Null)
        }
        _ => error(404, "OBJECT_NOT_FOUND", "unknown batch operation"),
    }
}
