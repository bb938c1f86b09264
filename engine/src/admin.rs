//! The admin JSON API, behind a bearer token (`[admin] token`; unset = no admin routes, 404).
//!
//! * `GET /admin/status` — what `optinsync status --json` prints.
//! * `GET /admin/contacts/{email}` — what `optinsync contact show EMAIL --json` prints
//!   (the address percent-encoded in the path; it is normalised like on the command line).
//!
//! * `POST /admin/erase` with `{"email": "..."}` — what `optinsync erase EMAIL` does (the
//!   address in the body, not the path, so it stays out of access logs); answers the report.
//!   The removals and CRM opt-outs it queues are delivered by the daemon's outbox at once.
//!
//! The token is compared in constant time over SHA-256 digests of both sides, so neither
//! its content nor its length leaks through timing. A refused call is logged without the
//! path (it may hold an address) and answered `401` with `WWW-Authenticate: Bearer`.
//! Answers carry `Cache-Control: no-store`. Erasure is the one call that changes anything.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::LoadedConfig;
use crate::consent::Consent;
use crate::email;
use crate::engine::Engine;
use crate::ledger::LedgerEvent;
use crate::store::{ConsentSummary, Contact, OutboxCounts};

/// The admin routes, or none when no admin token is configured.
pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let Some(token) = engine.config.config.admin.token.as_deref() else {
        return Router::new();
    };
    let expected: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/contacts/{email}", get(contact))
        .route("/admin/erase", post(erase))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            require_bearer(expected, req, next)
        }))
}

/// `true` if the `Authorization` header is `Bearer <token>` with the configured token.
pub fn bearer_matches(expected_digest: &[u8; 32], authorization: Option<&HeaderValue>) -> bool {
    let given = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .unwrap_or_default();
    let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    // An empty token never matches, even though its digest is compared like any other.
    bool::from(digest.ct_eq(expected_digest)) && !given.is_empty()
}

async fn require_bearer(expected: [u8; 32], req: Request, next: Next) -> Response {
    if !bearer_matches(&expected, req.headers().get(header::AUTHORIZATION)) {
        tracing::warn!("admin API: call without a valid bearer token refused");
        let mut resp = (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"optinsync admin\""),
        );
        return no_store(resp);
    }
    no_store(next.run(req).await)
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value:#}\n"),
    )
        .into_response()
}

fn failure(status: StatusCode, message: &'static str) -> Response {
    (status, json!({ "error": message }).to_string()).into_response()
}

async fn status(State(engine): State<Arc<Engine>>) -> Response {
    let summary = match engine.store.consent_summary().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "admin API: reading consent failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    let outbox = match engine.store.outbox_counts().await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "admin API: reading the outbox failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    let settled = settled_by(&engine.config, &summary, Utc::now());
    json_response(&status_json(&summary, &outbox, &settled))
}

async fn contact(State(engine): State<Arc<Engine>>, Path(raw): Path<String>) -> Response {
    let Ok(address) = email::normalise(&raw) else {
        return failure(StatusCode::BAD_REQUEST, "not an email address");
    };
    let contact = match engine.store.contact_by_email(&address).await {
        Ok(Some(c)) => c,
        Ok(None) => return failure(StatusCode::NOT_FOUND, "no such contact"),
        Err(e) => {
            tracing::error!(error = %e, "admin API: contact lookup failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    let read = async {
        let consents = engine.store.consents_of_contact(&contact.id).await?;
        let events = engine.store.events_of_contact(&contact.id).await?;
        Ok::<_, crate::store::StoreError>((consents, events))
    };
    match read.await {
        Ok((consents, events)) => json_response(&contact_json(&contact, &consents, &events)),
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "admin API: reading the contact failed");
            failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseRequest {
    email: String,
}

async fn erase(State(engine): State<Arc<Engine>>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<EraseRequest>(&body) else {
        return failure(StatusCode::BAD_REQUEST, "expected {\"email\": \"...\"}");
    };
    let Ok(address) = email::normalise(&req.email) else {
        return failure(StatusCode::BAD_REQUEST, "not an email address");
    };
    let contact = match engine.store.contact_by_email(&address).await {
        Ok(Some(c)) => c,
        Ok(None) => return failure(StatusCode::NOT_FOUND, "no such contact"),
        Err(e) => {
            tracing::error!(error = %e, "admin API: contact lookup failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    match engine
        .erase_as(
            &contact,
            "admin",
            "erasure requested (GDPR Art. 17) through the admin API",
        )
        .await
    {
        Ok(report) => json_response(&json!({
            "erased": true,
            "contact_id": contact.id,
            "lists": report.lists,
            "redacted_events": report.store.redacted_events,
            "legacy_events": report.store.legacy_events,
            "scrubbed_outbox_rows": report.store.scrubbed_outbox_rows,
            "note": "removals from the campaigns lists and CRM opt-outs are queued with legal priority; the address stays only as a keyed hash on the suppression list",
        })),
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "admin API: erasure failed");
            failure(StatusCode::SERVICE_UNAVAILABLE, "erasure failed; retry")
        }
    }
}

/// The JSON of `contact show --json` and `GET /admin/contacts/{email}`.
pub fn contact_json(
    contact: &Contact,
    consents: &[(String, Consent)],
    events: &[LedgerEvent],
) -> Value {
    json!({
        "contact": contact,
        "consents": consents.iter().map(|(list, c)| json!({ "list": list, "consent": c })).collect::<Vec<_>>(),
        "events": events.iter().map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["evidence"] = serde_json::from_str(&e.evidence).unwrap_or_default();
            v
        }).collect::<Vec<_>>(),
    })
}

/// When each list's open signups settle: pending ones at the end of their list's pending
/// window, asserted ones (about to be asked) a window from now, revalidating ones at the end
/// of the grace period.
pub fn settled_by(
    config: &LoadedConfig,
    summary: &[ConsentSummary],
    now: DateTime<Utc>,
) -> BTreeMap<String, DateTime<Utc>> {
    let mut forecast = BTreeMap::new();
    for row in summary {
        let Some(list) = config.list(&row.list_id) else {
            continue;
        };
        let window = chrono::Duration::seconds(list.pending_expiry.secs());
        let end = match row.state.as_str() {
            "pending" => Some(row.newest_since + window),
            "asserted" => Some(now + window),
            "revalidating" => {
                Some(row.newest_since + chrono::Duration::seconds(list.revalidation_grace.secs()))
            }
            _ => None,
        };
        if let Some(end) = end {
            let e = forecast.entry(row.list_id.clone()).or_insert(end);
            *e = (*e).max(end);
        }
    }
    forecast
}

/// The JSON of `status --json` and `GET /admin/status`.
pub fn status_json(
    summary: &[ConsentSummary],
    outbox: &OutboxCounts,
    settled_by: &BTreeMap<String, DateTime<Utc>>,
) -> Value {
    json!({ "consent": summary, "outbox": outbox, "settled_by": settled_by })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let expected: [u8; 32] = Sha256::digest(b"the-admin-token").into();
        let ok = HeaderValue::from_static("Bearer the-admin-token");
        assert!(bearer_matches(&expected, Some(&ok)));
        let lower = HeaderValue::from_static("bearer   the-admin-token ");
        assert!(bearer_matches(&expected, Some(&lower)));
        for bad in [
            "Bearer the-admin-toke",
            "Bearer the-admin-token2",
            "Basic the-admin-token",
            "the-admin-token",
            "Bearer ",
            "",
        ] {
            let v = HeaderValue::from_str(bad).expect("header");
            assert!(!bearer_matches(&expected, Some(&v)), "{bad:?} accepted");
        }
        assert!(!bearer_matches(&expected, None));
        let empty: [u8; 32] = Sha256::digest(b"").into();
        let v = HeaderValue::from_static("Bearer ");
        assert!(!bearer_matches(&empty, Some(&v)), "empty token accepted");
    }
}
