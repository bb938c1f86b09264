//! The admin JSON API, behind a bearer token (`[admin] token`; unset = no admin routes, 404).
//!
//! * `GET /admin/status` — what `optinsync status --json` prints.
//! * `POST /admin/contacts/lookup` with `{"email": "..."}` — what `optinsync contact show
//!   EMAIL --json` prints. `GET /admin/contacts/{email}` answers the same, but puts the address
//!   in a URL, which proxies' access logs keep: prefer the POST.
//! * `POST /admin/erase` with `{"email": "..."}` — what `optinsync erase EMAIL` does (the
//!   address in the body, not the path, so it stays out of access logs); answers the report.
//!   The removals and CRM opt-outs it queues are delivered by the daemon's outbox at once.
//!
//! The token is compared in constant time over SHA-256 digests of both sides, so neither
//! its content nor its length leaks through timing. A refused call is answered `401` with
//! `WWW-Authenticate: Bearer`, counted in `optinsync_admin_refused_total`, and logged at most
//! once a minute (with the number refused since), never with its path (it may hold an
//! address). A client (IPv6: its /64) refused [`FAILURES_PER_MINUTE`] times in a minute gets
//! `429` for the rest of that minute, token or not. The bearer check wraps only the admin
//! routes (`route_layer`): any other path is the router's plain `404`, so scanners neither
//! fingerprint the API nor flood the log. Answers carry `Cache-Control: no-store`; errors are
//! JSON with the JSON content type. Erasure is the one call that changes anything.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::links::{rate_key, request_client, trusted_proxies};
use optinsync_engine::config::LoadedConfig;
use optinsync_engine::consent::Consent;
use optinsync_engine::email;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::{EventSource, LedgerEvent};
use optinsync_engine::store::{ConsentSummary, Contact, OutboxCounts};

/// Refused calls a client may make in a minute before it gets `429` for the rest of it.
pub const FAILURES_PER_MINUTE: u32 = 20;

/// The admin routes, or none when no admin token is configured.
pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let Some(token) = engine.settings().admin.token.as_deref() else {
        return Router::new();
    };
    let guard = Arc::new(AdminGuard {
        expected: Sha256::digest(token.as_bytes()).into(),
        trusted: trusted_proxies(&engine.settings().server),
        failures: FailureWindow::new(Duration::from_secs(60), FAILURES_PER_MINUTE),
        warn: SampledWarn::new(Duration::from_secs(60)),
    });
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/contacts/lookup", post(contact_lookup))
        .route("/admin/contacts/{email}", get(contact))
        .route("/admin/erase", post(erase))
        // `route_layer`: the guard runs for these routes only, not for the fallback (`layer`
        // would turn every unknown path of the whole server into a 401).
        .route_layer(middleware::from_fn(move |req: Request, next: Next| {
            require_bearer(Arc::clone(&guard), req, next)
        }))
}

#[derive(Debug)]
struct AdminGuard {
    expected: [u8; 32],
    trusted: Vec<IpAddr>,
    failures: FailureWindow,
    warn: SampledWarn,
}

/// Per-client counts of failures in fixed windows: a client over `limit` in the current
/// window is blocked until the window ends. Bounded: past 10,000 clients the map is cleared.
#[derive(Debug)]
pub struct FailureWindow {
    window: Duration,
    limit: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureWindow {
    pub fn new(window: Duration, limit: u32) -> Self {
        Self {
            window,
            limit,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `true` while `key` has used up its failures in the current window.
    pub fn blocked(&self, key: IpAddr) -> bool {
        let Ok(seen) = self.seen.lock() else {
            return false;
        };
        seen.get(&key)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= self.limit)
    }

    /// Count one failure of `key`.
    pub fn record(&self, key: IpAddr) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() > 10_000 {
            seen.retain(|_, (start, _)| start.elapsed() < self.window);
            if seen.len() > 10_000 {
                seen.clear();
            }
        }
        let entry = seen.entry(key).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// A WARN line written at most once per `every`, saying how many were folded into it.
#[derive(Debug)]
pub struct SampledWarn {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl SampledWarn {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Count one occurrence; `Some(n)` when a line is due now, `n` occurrences since the last.
    pub fn due(&self) -> Option<u64> {
        let mut st = self.state.lock().ok()?;
        st.1 += 1;
        match st.0 {
            Some(last) if last.elapsed() < self.every => None,
            _ => {
                let n = st.1;
                *st = (Some(Instant::now()), 0);
                Some(n)
            }
        }
    }
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

async fn require_bearer(guard: Arc<AdminGuard>, req: Request, next: Next) -> Response {
    let client = rate_key(request_client(&req, &guard.trusted));
    if guard.failures.blocked(client) {
        metrics::counter!("optinsync_admin_refused_total", "reason" => "throttled").increment(1);
        let mut resp = failure(
            StatusCode::TOO_MANY_REQUESTS,
            "too many refused calls; wait a minute",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return no_store(resp);
    }
    if !bearer_matches(&guard.expected, req.headers().get(header::AUTHORIZATION)) {
        guard.failures.record(client);
        metrics::counter!("optinsync_admin_refused_total", "reason" => "bad_token").increment(1);
        if let Some(n) = guard.warn.due() {
            tracing::warn!(
                refused = n,
                "admin API: calls without a valid bearer token refused (one line a minute at most; optinsync_admin_refused_total counts all)"
            );
        }
        let mut resp = failure(StatusCode::UNAUTHORIZED, "bearer token required");
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
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{}\n", json!({ "error": message })),
    )
        .into_response()
}

async fn status(State(engine): State<Arc<Engine>>) -> Response {
    let summary = match engine.reads().consent_summary().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "admin API: reading consent failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    let outbox = match engine.reads().outbox_counts().await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "admin API: reading the outbox failed");
            return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
        }
    };
    let settled = settled_by(engine.config(), &summary, Utc::now());
    let mut waves = BTreeMap::new();
    for list in engine.lists() {
        match engine.wave_state(&list.id).await {
            Ok(w) => {
                waves.insert(list.id.clone(), w);
            }
            Err(e) => {
                tracing::error!(error = %e, "admin API: reading the waves failed");
                return failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
            }
        }
    }
    json_response(&status_json(&summary, &outbox, &settled, &waves))
}

/// The body of the calls that name a person: the address stays out of URLs and access logs.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressRequest {
    email: String,
}

async fn contact_lookup(State(engine): State<Arc<Engine>>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<AddressRequest>(&body) else {
        return failure(StatusCode::BAD_REQUEST, "expected {\"email\": \"...\"}");
    };
    contact_by_address(&engine, &req.email).await
}

async fn contact(State(engine): State<Arc<Engine>>, Path(raw): Path<String>) -> Response {
    contact_by_address(&engine, &raw).await
}

/// The contact an address names; `Err` is the answer when it names none.
async fn find_contact(engine: &Engine, raw: &str) -> Result<Contact, Response> {
    let Ok(address) = email::normalise(raw) else {
        return Err(failure(StatusCode::BAD_REQUEST, "not an email address"));
    };
    match engine.reads().contact_by_email(&address).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(failure(StatusCode::NOT_FOUND, "no such contact")),
        Err(e) => {
            tracing::error!(error = %e, "admin API: contact lookup failed");
            Err(failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable",
            ))
        }
    }
}

async fn contact_by_address(engine: &Engine, raw: &str) -> Response {
    let contact = match find_contact(engine, raw).await {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let read = async {
        let consents = engine.reads().consents_of_contact(&contact.id).await?;
        let events = engine.reads().events_of_contact(&contact.id).await?;
        Ok::<_, optinsync_engine::store::StoreError>((consents, events))
    };
    match read.await {
        Ok((consents, events)) => json_response(&contact_json(&contact, &consents, &events)),
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "admin API: reading the contact failed");
            failure(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

async fn erase(State(engine): State<Arc<Engine>>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<AddressRequest>(&body) else {
        return failure(StatusCode::BAD_REQUEST, "expected {\"email\": \"...\"}");
    };
    let contact = match find_contact(&engine, &req.email).await {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    match engine
        .erase_as(
            &contact,
            EventSource::Admin,
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

/// One line of a contact's history as `contact show` prints it (and the console shows it):
/// the event, then its evidence fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TimelineEntry {
    pub seq: i64,
    pub line: String,
    pub fields: Vec<(&'static str, String)>,
}

/// A contact's history, oldest first, in `contact show`'s words.
pub fn timeline(events: &[LedgerEvent]) -> Vec<TimelineEntry> {
    events
        .iter()
        .map(|e| {
            let ev = e.evidence();
            let rule = ev.rule_file.map(|f| {
                format!(
                    "{f} sha256:{}",
                    ev.rule_hash
                        .as_deref()
                        .map(|h| &h[..h.len().min(16)])
                        .unwrap_or("?")
                )
            });
            let fields = [
                ("reason", ev.reason),
                ("rule", rule),
                ("crm record", ev.crm_record),
                ("token", ev.token_id),
                ("message-id", ev.message_id),
                ("content sha256", ev.content_hash),
                ("mail content sha256", ev.mail_content_hash),
                ("method", ev.method),
                ("ip", ev.ip),
                ("user agent", ev.user_agent),
                ("detail", ev.detail),
            ];
            TimelineEntry {
                seq: e.seq,
                line: format!(
                    "#{:<5} {}  {:<12} {} -> {}  {} (by {})",
                    e.seq, e.at, e.list_id, e.from_state, e.to_state, e.kind, e.source
                ),
                fields: fields
                    .into_iter()
                    .filter_map(|(name, v)| v.map(|v| (name, v)))
                    .collect(),
            }
        })
        .collect()
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
    waves: &BTreeMap<String, optinsync_engine::waves::WaveState>,
) -> Value {
    json!({ "consent": summary, "outbox": outbox, "settled_by": settled_by, "waves": waves })
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
