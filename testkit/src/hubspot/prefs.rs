//! Communication preferences: email subscription status, keyed by email address, per
//! subscription type, with a portal-wide "unsubscribed from all".
//!
//! v3: `GET /communication-preferences/v3/definitions`, `GET .../status/email/{email}`,
//! `POST .../subscribe` and `.../unsubscribe`. HubSpot's v3 guide says subscribe "will not
//! allow you to resubscribe contacts who have opted out"; the fake refuses it with 400
//! `VALIDATION_ERROR` (the body is not documented; the text is the fake's own).
//!
//! v4 (and the date-based `/communication-preferences/{YYYY-MM}/...`): `GET|POST
//! statuses/{email}` (`channel=EMAIL` required), `GET|POST statuses/{email}/unsubscribe-all`,
//! `GET definitions`; v4 may re-subscribe an address that opted out
//! (`setStatusSuccessReason: RESUBSCRIBE_OCCURRED`), a repeat is `NO_STATUS_CHANGE`.
//!
//! Stricter readings: the portal is GDPR-enabled by default, so `legalBasis` and
//! `legalBasisExplanation` are mandatory (400 when missing or empty, on v3 and v4); v3
//! refuses an address that opted out of the type **or** of all email; a v3 subscribe of an
//! address already subscribed, or an unsubscribe of one already opted out, is refused (400).
//! A status change also sets `hs_email_optout_{subscriptionId}` (and `hs_email_optout` for
//! "unsubscribe from all") on the contact with that email, bumping its `lastmodifieddate`
//! (inferred).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::http::{Query, Reply, error};
use super::{HubSpotState, now_ms, render_time};

/// The documented `legalBasis` values.
pub const LEGAL_BASES: &[&str] = &[
    "CONSENT_WITH_NOTICE",
    "LEGITIMATE_INTEREST_CLIENT",
    "LEGITIMATE_INTEREST_OTHER",
    "LEGITIMATE_INTEREST_PQL",
    "NON_GDPR",
    "PERFORMANCE_OF_CONTRACT",
    "PROCESS_AND_STORE",
];

/// One subscription type.
#[derive(Debug, Clone)]
pub struct SubscriptionDefinition {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub is_active: bool,
    pub is_default: bool,
}

pub(crate) fn default_definitions() -> Vec<SubscriptionDefinition> {
    vec![
        SubscriptionDefinition {
            id: 7,
            name: "Marketing Information".into(),
            description: "Marketing offers and updates.".into(),
            is_active: true,
            is_default: true,
        },
        SubscriptionDefinition {
            id: 9,
            name: "Newsletter".into(),
            description: "The monthly newsletter.".into(),
            is_active: true,
            is_default: false,
        },
    ]
}

/// An address's status for one subscription type.
#[derive(Debug, Clone)]
pub struct TypeStatus {
    pub subscribed: bool,
    /// It unsubscribed (as opposed to never having subscribed).
    pub opted_out: bool,
    pub legal_basis: Option<String>,
    pub legal_basis_explanation: Option<String>,
    pub source: String,
    pub timestamp: DateTime<Utc>,
}

/// Everything known about one address.
#[derive(Debug, Clone, Default)]
pub struct EmailPrefs {
    pub types: BTreeMap<u64, TypeStatus>,
    /// Unsubscribed from all email (portal-wide).
    pub opted_out_all: bool,
    pub opted_out_all_at: Option<DateTime<Utc>>,
}

fn key(email: &str) -> String {
    email.trim().to_lowercase()
}

fn valid_email(e: &str) -> bool {
    e.split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !e.contains(char::is_whitespace))
}

fn bad(msg: &str) -> Reply {
    error(400, "VALIDATION_ERROR", msg)
}

/// Set a property on the contact with this email, if any (bumps `lastmodifieddate`).
fn touch_contact(s: &mut HubSpotState, email: &str, name: &str, value: &str) {
    if let Some(id) = s.id_by_email(email) {
        super::contacts::edit(s, id, &json!({ name: value }), now_ms());
    }
}

/// The v3 `{"recipient", "subscriptionStatuses"}` for an address.
pub(crate) fn v3_status(s: &HubSpotState, email: &str) -> Value {
    let p = s.prefs.get(&key(email));
    let statuses: Vec<Value> = s
        .definitions
        .iter()
        .filter(|d| d.is_active)
        .map(|d| {
            let t = p.and_then(|p| p.types.get(&d.id));
            v3_one(d, t, p.is_some_and(|p| p.opted_out_all))
        })
        .collect();
    json!({"recipient": key(email), "subscriptionStatuses": statuses})
}

fn v3_one(d: &SubscriptionDefinition, t: Option<&TypeStatus>, all_out: bool) -> Value {
    let subscribed = !all_out && t.is_some_and(|t| t.subscribed);
    json!({
        "id": d.id.to_string(), "name": d.name, "description": d.description,
        "status": if subscribed { "SUBSCRIBED" } else { "NOT_SUBSCRIBED" },
        "sourceOfStatus": if all_out { "PORTAL_WIDE_STATUS" } else { "SUBSCRIPTION_STATUS" },
        "brandId": null, "preferenceGroupName": null,
        "legalBasis": t.and_then(|t| t.legal_basis.clone()),
        "legalBasisExplanation": t.and_then(|t| t.legal_basis_explanation.clone()),
    })
}

pub(crate) fn v3_definitions(s: &HubSpotState) -> Reply {
    let defs: Vec<Value> = s
        .definitions
        .iter()
        .map(|d| {
            json!({"id": d.id.to_string(), "name": d.name, "description": d.description,
                   "purpose": "Marketing", "communicationMethod": "Email", "isActive": d.is_active,
                   "isDefault": d.is_default, "isInternal": false, "businessUnitId": 0,
                   "createdAt": "2020-01-01T00:00:00.000Z", "updatedAt": "2020-01-01T00:00:00.000Z",
                   "subscriptionTranslations": []})
        })
        .collect();
    Reply::ok(json!({ "subscriptionDefinitions": defs }))
}

/// `legalBasis` / `legalBasisExplanation` of a request: validated, mandatory when the portal
/// is GDPR-enabled.
fn legal_basis(s: &HubSpotState, body: &Value) -> Result<(Option<String>, Option<String>), Reply> {
    let basis = body
        .get("legalBasis")
        .and_then(Value::as_str)
        .filter(|b| !b.is_empty());
    let explanation = body
        .get("legalBasisExplanation")
        .and_then(Value::as_str)
        .filter(|e| !e.trim().is_empty());
    if let Some(b) = basis
        && !LEGAL_BASES.contains(&b)
    {
        return Err(bad(&format!(
            "Invalid legalBasis {b}; must be one of {LEGAL_BASES:?}"
        )));
    }
    if s.gdpr_enabled && basis.is_none() {
        return Err(bad(
            "legalBasis is required: this portal has GDPR features enabled",
        ));
    }
    if s.gdpr_enabled && explanation.is_none() {
        return Err(bad(
            "legalBasisExplanation is required: this portal has GDPR features enabled",
        ));
    }
    Ok((basis.map(str::to_owned), explanation.map(str::to_owned)))
}

fn subscription_id(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(t) => t.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// `POST /communication-preferences/v3/subscribe` (or `unsubscribe`).
pub(crate) fn v3_change(s: &mut HubSpotState, body: &Value, subscribe: bool) -> Reply {
    let missing: Vec<&str> = ["emailAddress", "subscriptionId"]
        .into_iter()
        .filter(|k| body.get(*k).is_none_or(Value::is_null))
        .collect();
    if !missing.is_empty() {
        // The text HubSpot answers for a body without them (quoted in a HubSpot SDK issue).
        return bad(&format!(
            "Invalid input JSON on line 1, column 2: Cannot build PublicUpdateSubscriptionStatusRequest, some of required attributes are not set [{}]",
            missing.join(", ")
        ));
    }
    let Some(email) = body
        .get("emailAddress")
        .and_then(Value::as_str)
        .map(key)
        .filter(|e| valid_email(e))
    else {
        return bad("emailAddress is missing or not a valid email address");
    };
    let Some(sub_id) = subscription_id(body.get("subscriptionId")) else {
        return bad(
            "subscriptionId is required (this API cannot change a brand-wide or portal-wide status)",
        );
    };
    let Some(def) = s
        .definitions
        .iter()
        .find(|d| d.id == sub_id && d.is_active)
        .cloned()
    else {
        return bad(&format!("Subscription {sub_id} does not exist"));
    };
    let (basis, explanation) = match legal_basis(s, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let p = s.prefs.entry(email.clone()).or_default();
    let current = p.types.get(&sub_id).cloned();
    if subscribe {
        if p.opted_out_all || current.as_ref().is_some_and(|t| t.opted_out) {
            return bad(&format!(
                "{email} has opted out of email and cannot be resubscribed through this API"
            ));
        }
        if current.as_ref().is_some_and(|t| t.subscribed) {
            return bad(&format!(
                "Email {email} is already subscribed to subscription {sub_id}"
            ));
        }
    } else if p.opted_out_all || current.as_ref().is_some_and(|t| t.opted_out) {
        return bad(&format!(
            "Email {email} is already unsubscribed from subscription {sub_id}"
        ));
    }
    let status = TypeStatus {
        subscribed: subscribe,
        opted_out: !subscribe,
        legal_basis: basis,
        legal_basis_explanation: explanation,
        source: "API".into(),
        timestamp: now_ms(),
    };
    p.types.insert(sub_id, status.clone());
    touch_contact(
        s,
        &email,
        &format!("hs_email_optout_{sub_id}"),
        if subscribe { "false" } else { "true" },
    );
    Reply::ok(v3_one(&def, Some(&status), false))
}

/// Unsubscribe `email` from all email (portal-wide).
pub(crate) fn opt_out_of_all(s: &mut HubSpotState, email: &str, source: &str) {
    let email = key(email);
    let now = now_ms();
    let ids: Vec<u64> = s.definitions.iter().map(|d| d.id).collect();
    let p = s.prefs.entry(email.clone()).or_default();
    p.opted_out_all = true;
    p.opted_out_all_at = Some(now);
    for id in ids {
        let t = p.types.entry(id).or_insert_with(|| TypeStatus {
            subscribed: false,
            opted_out: true,
            legal_basis: None,
            legal_basis_explanation: None,
            source: source.to_owned(),
            timestamp: now,
        });
        t.subscribed = false;
        t.opted_out = true;
        t.source = source.to_owned();
        t.timestamp = now;
    }
    touch_contact(s, &email, "hs_email_optout", "true");
}

fn channel_ok(q: &Query, body: Option<&Value>) -> Result<(), Reply> {
    let channel = q
        .get("channel")
        .or_else(|| body.and_then(|b| b.get("channel")).and_then(Value::as_str));
    match channel {
        Some("EMAIL") => Ok(()),
        other => Err(bad(&format!(
            "channel must be EMAIL (got {})",
            other.unwrap_or("nothing")
        ))),
    }
}

fn v4_one(email: &str, d: &SubscriptionDefinition, p: Option<&EmailPrefs>) -> Value {
    let t = p.and_then(|p| p.types.get(&d.id));
    let status = match t {
        Some(t) if t.subscribed => "SUBSCRIBED",
        Some(_) => "UNSUBSCRIBED",
        None if p.is_some_and(|p| p.opted_out_all) => "UNSUBSCRIBED",
        None => "NOT_SPECIFIED",
    };
    json!({"subscriberIdString": email, "subscriptionId": d.id, "channel": "EMAIL", "status": status,
           "source": t.map(|t| t.source.clone()), "timestamp": t.map(|t| render_time(t.timestamp)),
           "legalBasis": t.and_then(|t| t.legal_basis.clone()),
           "legalBasisExplanation": t.and_then(|t| t.legal_basis_explanation.clone()),
           "businessUnitId": 0, "subscriptionName": d.name})
}

fn action(results: Vec<Value>) -> Value {
    let now = render_time(now_ms());
    json!({"status": "COMPLETE", "results": results, "errors": [], "numErrors": 0,
           "requestedAt": now, "startedAt": now, "completedAt": now, "links": {}})
}

pub(crate) fn v4_definitions(s: &HubSpotState) -> Reply {
    let defs: Vec<Value> = s
        .definitions
        .iter()
        .map(|d| {
            json!({"id": d.id, "name": d.name, "description": d.description, "purpose": "Marketing",
                   "communicationMethod": "Email", "isActive": d.is_active, "isDefault": d.is_default,
                   "isInternal": false, "businessUnitId": 0,
                   "createdAt": "2020-01-01T00:00:00.000Z", "updatedAt": "2020-01-01T00:00:00.000Z"})
        })
        .collect();
    Reply::ok(action(defs))
}

pub(crate) fn v4_status(s: &HubSpotState, email: &str, q: &Query) -> Reply {
    if let Err(r) = channel_ok(q, None) {
        return r;
    }
    let email = key(email);
    let p = s.prefs.get(&email);
    let results: Vec<Value> = s
        .definitions
        .iter()
        .filter(|d| d.is_active)
        .map(|d| v4_one(&email, d, p))
        .collect();
    Reply::ok(action(results))
}

/// `POST /communication-preferences/v4/statuses/{email}`.
pub(crate) fn v4_set_status(s: &mut HubSpotState, email: &str, body: &Value) -> Reply {
    if let Err(r) = channel_ok(&Query::default(), Some(body)) {
        return r;
    }
    let email = key(email);
    if !valid_email(&email) {
        return bad(&format!("{email} is not a valid email address"));
    }
    let Some(sub_id) = subscription_id(body.get("subscriptionId")) else {
        return bad("subscriptionId is required");
    };
    let Some(def) = s.definitions.iter().find(|d| d.id == sub_id).cloned() else {
        return bad(&format!("Subscription {sub_id} does not exist"));
    };
    let subscribe = match body.get("statusState").and_then(Value::as_str) {
        Some("SUBSCRIBED") => true,
        Some("UNSUBSCRIBED") => false,
        other => {
            return bad(&format!(
                "statusState must be SUBSCRIBED or UNSUBSCRIBED (got {other:?})"
            ));
        }
    };
    let (basis, explanation) = match legal_basis(s, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let p = s.prefs.entry(email.clone()).or_default();
    let current = p.types.get(&sub_id).cloned();
    let was_subscribed = !p.opted_out_all && current.as_ref().is_some_and(|t| t.subscribed);
    let was_out = p.opted_out_all || current.as_ref().is_some_and(|t| t.opted_out);
    let reason = if subscribe == was_subscribed && (subscribe || was_out) {
        "NO_STATUS_CHANGE"
    } else if subscribe && was_out {
        "RESUBSCRIBE_OCCURRED"
    } else {
        "REQUESTED_CHANGE_OCCURRED"
    };
    if reason != "NO_STATUS_CHANGE" {
        if subscribe {
            p.opted_out_all = false;
            p.opted_out_all_at = None;
        }
        p.types.insert(
            sub_id,
            TypeStatus {
                subscribed: subscribe,
                opted_out: !subscribe,
                legal_basis: basis,
                legal_basis_explanation: explanation,
                source: "API".into(),
                timestamp: now_ms(),
            },
        );
        touch_contact(
            s,
            &email,
            &format!("hs_email_optout_{sub_id}"),
            if subscribe { "false" } else { "true" },
        );
        if subscribe && reason == "RESUBSCRIBE_OCCURRED" {
            touch_contact(s, &email, "hs_email_optout", "false");
        }
    }
    let mut out = v4_one(&email, &def, s.prefs.get(&email));
    out["setStatusSuccessReason"] = json!(reason);
    Reply::ok(out)
}

fn wide(email: &str, p: Option<&EmailPrefs>) -> Vec<Value> {
    match p {
        Some(p) if p.opted_out_all => vec![json!({
            "subscriberIdString": email, "wideStatusType": "PORTAL_WIDE", "status": "UNSUBSCRIBED",
            "channel": "EMAIL", "businessUnitId": 0,
            "timestamp": p.opted_out_all_at.map(render_time)})],
        _ => Vec::new(),
    }
}

pub(crate) fn v4_unsubscribe_all_read(s: &HubSpotState, email: &str, q: &Query) -> Reply {
    if let Err(r) = channel_ok(q, None) {
        return r;
    }
    let email = key(email);
    Reply::ok(action(wide(&email, s.prefs.get(&email))))
}

/// `POST .../statuses/{email}/unsubscribe-all?channel=EMAIL[&verbose=true]`.
pub(crate) fn v4_unsubscribe_all(s: &mut HubSpotState, email: &str, q: &Query) -> Reply {
    if let Err(r) = channel_ok(q, None) {
        return r;
    }
    let email = key(email);
    if !valid_email(&email) {
        return bad(&format!("{email} is not a valid email address"));
    }
    opt_out_of_all(s, &email, "API");
    let results = if q.get("verbose") == Some("true") {
        let p = s.prefs.get(&email);
        s.definitions
            .iter()
            .map(|d| {
                let mut v = v4_one(&email, d, p);
                v["setStatusSuccessReason"] = json!("UNSUBSCRIBE_FROM_ALL_OCCURRED");
                v
            })
            .collect()
    } else {
        Vec::new()
    };
    Reply::ok(action(results))
}
