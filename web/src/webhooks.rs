//! `GET`/`POST /webhooks/{connector}`: change notifications from outside systems.
//!
//! The connector verifies the call ([`optinsync_plugin_api::Connector::webhook`],
//! e.g. Zoho's echoed channel token or the CSV connector's optional `X-Webhook-Secret`
//! header, compared in constant time) and names the records that
//! changed; each is fetched, ingested like a polled change and decided at once, so a CRM edit
//! leads to its DOI mail within a second instead of at the next poll. Polling stays the source
//! of truth: a lost callback only delays a change.
//!
//! * `GET` and `POST /webhooks/{name}`, `name` being the connector's (its role: `crm`,
//!   `campaigns`, `mail`); a connector that takes no webhooks is 404. The connector sees the
//!   whole call ([`optinsync_plugin_api::WebhookRequest`]: method, path, raw query, headers,
//!   body, client address), so a vendor's signature over any of them can be checked.
//! * A CRM connector names records to fetch; a campaigns connector hands status events
//!   (unsubscribes, bounces) that are applied like polled ones.
//! * A forged or malformed call (`InvalidInput`) gets 400 and changes nothing.
//! * Bodies are limited to [`MAX_BODY`]; each client (IPv4 address or IPv6 /64) to
//!   `server.webhook_rate_limit_per_minute` calls, then `429` with `Retry-After`.
//! * Record ids and connector messages are untrusted: they are logged through
//!   [`optinsync_engine::untrusted::Escaped`], so they cannot forge a log line.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use optinsync_engine::work::ConnectorRole;
use optinsync_plugin_api::{Connector, ConnectorError, HttpMethod, WebhookEvent, WebhookRequest};

use crate::links::{rate_key, request_client};
use optinsync_engine::engine::Engine;
use optinsync_engine::untrusted::Escaped;

/// Largest webhook body accepted.
pub const MAX_BODY: usize = 256 * 1024;
/// Most records one callback may name.
pub const MAX_IDS: usize = 200;

pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let server = &engine.settings().server;
    let per_minute =
        NonZeroU32::new(server.webhook_rate_limit_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    let limit = Arc::new(WebhookLimit {
        limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
        trusted: crate::links::trusted_proxies(server).into(),
    });
    let trusted = Arc::clone(&limit.trusted);
    Router::new()
        .route("/webhooks/{connector}", get(webhook).post(webhook))
        .route_layer(middleware::from_fn_with_state(limit, rate_limit))
        .layer(Extension(TrustedProxies(trusted)))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// Per-client limit on webhook calls: a vendor retries a `429`, and polling stays the source
/// of truth, so nothing is lost by answering one.
struct WebhookLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    trusted: Arc<[IpAddr]>,
}

/// `server.trusted_proxies`, canonical, computed once for the limit and the handler.
#[derive(Clone)]
struct TrustedProxies(Arc<[IpAddr]>);

async fn rate_limit(State(limit): State<Arc<WebhookLimit>>, req: Request, next: Next) -> Response {
    let client = rate_key(request_client(&req, &limit.trusted));
    if limit.limiter.len() > 10_000 {
        limit.limiter.retain_recent();
    }
    if limit.limiter.check_key(&client).is_err() {
        metrics::counter!("optinsync_http_rate_limited_total", "limit" => "webhook").increment(1);
        let mut resp = text(StatusCode::TOO_MANY_REQUESTS, "too many webhook calls\n");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    next.run(req).await
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (status, body).into_response()
}

/// The connector a webhook path names, if it takes webhooks.
fn webhook_connector(engine: &Engine, name: &str) -> Option<(ConnectorRole, Arc<dyn Connector>)> {
    let c = engine.connectors();
    let (role, connector): (ConnectorRole, Arc<dyn Connector>) = match name {
        "crm" => (ConnectorRole::Crm, c.crm.clone()),
        "campaigns" => (ConnectorRole::Campaigns, c.campaigns.clone()),
        "mail" => (ConnectorRole::Mail, c.mail.clone()),
        _ => return None,
    };
    connector.accepts_webhooks().then_some((role, connector))
}

/// Every webhook call, counted by connector role and by what became of it (`refused`: the
/// connector rejected the call, e.g. a bad signature).
async fn webhook(
    state: State<Arc<Engine>>,
    Path(connector): Path<String>,
    proxies: Extension<TrustedProxies>,
    req: Request,
) -> Response {
    // Bounded labels: a role name or `unknown`, never the path as sent.
    let label = match connector.as_str() {
        "crm" => "crm",
        "campaigns" => "campaigns",
        "mail" => "mail",
        _ => "unknown",
    };
    let resp = handle_webhook(state, connector, proxies, req).await;
    let result = match resp.status() {
        s if s.is_success() => "handled",
        StatusCode::NOT_FOUND => "unknown_connector",
        s if s.is_client_error() => "refused",
        _ => "failed",
    };
    metrics::counter!("optinsync_webhook_calls_total", "connector" => label, "result" => result)
        .increment(1);
    resp
}

async fn handle_webhook(
    State(engine): State<Arc<Engine>>,
    connector: String,
    Extension(TrustedProxies(trusted)): Extension<TrustedProxies>,
    req: Request,
) -> Response {
    let Some((role, target)) = webhook_connector(&engine, &connector) else {
        return text(StatusCode::NOT_FOUND, "unknown webhook connector\n");
    };
    let method = match *req.method() {
        Method::GET => HttpMethod::Get,
        Method::POST => HttpMethod::Post,
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
    };
    let peer = request_client(&req, &trusted);
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "webhook body too large\n");
    };
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return text(StatusCode::BAD_REQUEST, "webhook body is not UTF-8\n");
    };
    let request = WebhookRequest {
        method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
        peer: (!peer.is_unspecified()).then_some(peer),
    };
    let records = match target.webhook(&request).await {
        Ok(WebhookEvent::Ignored) => return text(StatusCode::OK, "ignored\n"),
        Ok(WebhookEvent::Changed { records }) if role == ConnectorRole::Crm => records,
        Ok(WebhookEvent::Status { list, events }) if role == ConnectorRole::Campaigns => {
            return status_events(&engine, &connector, &list, &events).await;
        }
        Ok(other) => {
            tracing::error!(connector = %connector, event = ?other, "webhook: the connector answered with work its role cannot have; ignored");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "connector error\n");
        }
        Err(ConnectorError::InvalidInput { message }) => {
            tracing::warn!(connector = %connector, reason = %Escaped(&message), "webhook refused");
            return text(StatusCode::BAD_REQUEST, "webhook refused\n");
        }
        Err(e) => {
            tracing::warn!(connector = %connector, error = %Escaped(&e), "webhook could not be read");
            return text(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    if records.len() > MAX_IDS {
        tracing::warn!(
            count = records.len(),
            "webhook names too many records; refused"
        );
        return text(StatusCode::PAYLOAD_TOO_LARGE, "too many records\n");
    }
    let mut failed = false;
    for record in &records {
        let rec = match engine.connectors().crm.fetch(record).await {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                tracing::info!(record = %Escaped(record), "webhook: record no longer exists; consent kept");
                continue;
            }
            Err(ConnectorError::InvalidInput { message }) => {
                tracing::warn!(record = %Escaped(record), reason = %Escaped(&message), "webhook: CRM record skipped");
                continue;
            }
            Err(e) => {
                tracing::warn!(record = %Escaped(record), error = %Escaped(&e), "webhook: fetching the record failed; the next poll will read it");
                failed = true;
                continue;
            }
        };
        // Ingesting runs the rules for the contact too: an assertion queues its DOI mail.
        if let Err(e) = engine.ingest_record(&rec).await {
            tracing::error!(record = %Escaped(record), error = %Escaped(&e), "webhook: ingesting the record failed");
            failed = true;
        }
    }
    tracing::info!(connector = %connector, records = records.len(), "webhook handled");
    if failed {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "partly handled; try again later\n",
        )
    } else {
        text(StatusCode::OK, "ok\n")
    }
}

/// A campaigns webhook's status events, applied like polled ones.
async fn status_events(
    engine: &Engine,
    connector: &str,
    list: &str,
    events: &[optinsync_plugin_api::StatusEvent],
) -> Response {
    if events.len() > MAX_IDS {
        tracing::warn!(
            count = events.len(),
            "webhook names too many events; refused"
        );
        return text(StatusCode::PAYLOAD_TOO_LARGE, "too many events\n");
    }
    match engine.campaigns_webhook(list, events).await {
        Ok(Some(changes)) => {
            tracing::info!(connector = %connector, events = events.len(), changes, "webhook handled");
            text(StatusCode::OK, "ok\n")
        }
        Ok(None) => {
            tracing::warn!(connector = %connector, list = %Escaped(list), "webhook for a campaigns list no configured list maps to; ignored");
            text(StatusCode::OK, "ignored\n")
        }
        Err(e) => {
            tracing::error!(connector = %connector, error = %Escaped(&e), "webhook: applying the status events failed");
            text(StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}
