//! Webhook delivery as HubSpot's webhooks and request-validation pages describe it: a
//! `POST` to the target URL with a JSON **array** of events, `Content-Type:
//! application/json`, and
//!
//! * `X-HubSpot-Signature-v3`: base64 of HMAC-SHA256, keyed with the app's client secret, over
//!   `method + uri + body + timestamp` (UTF-8), where `uri` is the full target URL with the
//!   documented percent-escapes (`%3A` `%2F` `%3F` `%40` `%21` `%24` `%27` `%28` `%29` `%2A`
//!   `%2C` `%3B`) decoded;
//! * `X-HubSpot-Request-Timestamp`: epoch milliseconds;
//! * `X-HubSpot-Signature` with `X-HubSpot-Signature-Version: v1` (hex SHA-256 of
//!   `secret + body`) or `v2` (hex SHA-256 of `secret + method + uri + body`).
//!
//! Retries: on a timeout, a connection failure or any status but 400, 401, 403, 404 and 405,
//! up to 10 more attempts with exponential backoff (`webhook_retry_base` × 2^n ×
//! `time_scale`; a 429's `Retry-After`, read as seconds, is waited out if longer); each
//! attempt carries its `attemptNumber` and a fresh timestamp and signature.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{Shared, lock};
use super::{APP_ID, PORTAL_ID, now_ms};

/// The legacy signature sent alongside v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacySignature {
    V1,
    V2,
}

/// One event to deliver; the fake fills in `eventId`, `occurredAt`, `portalId`, `appId` and
/// `attemptNumber` unless set.
#[derive(Debug, Clone)]
pub struct WebhookEvent {
    pub subscription_type: String,
    pub object_id: u64,
    pub property_name: Option<String>,
    pub property_value: Option<String>,
    pub change_source: String,
    pub change_flag: Option<String>,
    pub subscription_id: u64,
    pub event_id: Option<u64>,
    pub occurred_at: Option<i64>,
}

impl WebhookEvent {
    fn new(subscription_type: &str, object_id: u64, subscription_id: u64) -> Self {
        WebhookEvent {
            subscription_type: subscription_type.into(),
            object_id,
            property_name: None,
            property_value: None,
            change_source: "CRM".into(),
            change_flag: None,
            subscription_id,
            event_id: None,
            occurred_at: None,
        }
    }

    /// `contact.creation`.
    pub fn creation(object_id: u64) -> Self {
        let mut e = Self::new("contact.creation", object_id, 1001);
        e.change_flag = Some("NEW".into());
        e
    }

    /// `contact.propertyChange` with the new value.
    pub fn property_change(object_id: u64, name: &str, value: &str) -> Self {
        let mut e = Self::new("contact.propertyChange", object_id, 1002);
        e.property_name = Some(name.into());
        e.property_value = Some(value.into());
        e
    }

    /// `contact.deletion`.
    pub fn deletion(object_id: u64) -> Self {
        Self::new("contact.deletion", object_id, 1003)
    }

    /// `contact.privacyDeletion` (GDPR delete).
    pub fn privacy_deletion(object_id: u64) -> Self {
        Self::new("contact.privacyDeletion", object_id, 1004)
    }

    /// A fixed `eventId` (to redeliver a duplicate).
    pub fn with_event_id(mut self, id: u64) -> Self {
        self.event_id = Some(id);
        self
    }

    /// A fixed `occurredAt` (epoch ms; to deliver out of order).
    pub fn occurred_at(mut self, ms: i64) -> Self {
        self.occurred_at = Some(ms);
        self
    }

    fn to_json(&self, event_id: u64, occurred_at: i64, attempt: u32) -> Value {
        let mut v = json!({
            "eventId": event_id, "subscriptionId": self.subscription_id, "portalId": PORTAL_ID,
            "appId": APP_ID, "occurredAt": occurred_at, "subscriptionType": self.subscription_type,
            "attemptNumber": attempt, "objectId": self.object_id, "changeSource": self.change_source,
        });
        if let Some(p) = &self.property_name {
            v["propertyName"] = json!(p);
        }
        if let Some(p) = &self.property_value {
            v["propertyValue"] = json!(p);
        }
        if let Some(f) = &self.change_flag {
            v["changeFlag"] = json!(f);
        }
        v
    }
}

/// One delivery attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `attemptNumber` (0 for the first).
    pub attempt: u32,
    pub url: String,
    pub body: String,
    pub timestamp: i64,
    pub signature_v3: String,
    /// The receiver's status; `None` on a timeout or connection failure (`error`).
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// The URI as signed: the documented percent-escapes decoded.
pub fn signing_uri(url: &str) -> String {
    const ESCAPES: &[(&str, &str)] = &[
        ("%3A", ":"),
        ("%2F", "/"),
        ("%3F", "?"),
        ("%40", "@"),
        ("%21", "!"),
        ("%24", "$"),
        ("%27", "'"),
        ("%28", "("),
        ("%29", ")"),
        ("%2A", "*"),
        ("%2C", ","),
        ("%3B", ";"),
    ];
    let mut out = url.to_owned();
    for (from, to) in ESCAPES {
        out = out.replace(from, to).replace(&from.to_lowercase(), to);
    }
    out
}

/// `X-HubSpot-Signature-v3`: base64(HMAC-SHA256(secret, method + uri + body + timestamp)).
pub fn signature_v3(
    secret: &str,
    method: &str,
    uri: &str,
    body: &str,
    timestamp_ms: i64,
) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(format!("{method}{}{body}{timestamp_ms}", signing_uri(uri)).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// v1: hex(SHA-256(secret + body)).
pub fn signature_v1(secret: &str, body: &str) -> String {
    hex::encode(Sha256::digest(format!("{secret}{body}").as_bytes()))
}

/// v2: hex(SHA-256(secret + method + uri + body)).
pub fn signature_v2(secret: &str, method: &str, uri: &str, body: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{secret}{method}{uri}{body}").as_bytes(),
    ))
}

const NO_RETRY: &[u16] = &[400, 401, 403, 404, 405];

/// Deliver `events` in batches, with retries; every attempt is returned (and kept in
/// `deliveries`).
pub(crate) async fn deliver(
    state: Shared,
    events: Vec<WebhookEvent>,
    timestamp_override: Option<i64>,
) -> Result<Vec<Delivery>, String> {
    let (url, secret, legacy, timeout, retries, base, batch_size, scale, numbered) = {
        let mut s = lock(&state);
        let url = s
            .webhook_target
            .clone()
            .ok_or("no webhook target URL set (set_webhook_target)")?;
        let now = now_ms().timestamp_millis();
        let mut numbered = Vec::new();
        for e in events {
            let id = match e.event_id {
                Some(id) => id,
                None => {
                    s.next_event_id += 1;
                    s.next_event_id
                }
            };
            let at = e.occurred_at.unwrap_or(now);
            numbered.push((e, id, at));
        }
        (
            url,
            s.client_secret.clone(),
            s.legacy_signature,
            s.webhook_timeout,
            s.webhook_max_retries,
            s.webhook_retry_base,
            s.webhook_batch_size.max(1),
            s.time_scale.max(0.0),
            numbered,
        )
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in numbered.chunks(batch_size) {
        for attempt in 0..=retries {
            let body: Vec<Value> = batch
                .iter()
                .map(|(e, id, at)| e.to_json(*id, *at, attempt))
                .collect();
            let body = Value::Array(body).to_string();
            let ts = timestamp_override.unwrap_or_else(|| now_ms().timestamp_millis());
            let v3 = signature_v3(&secret, "POST", &url, &body, ts);
            let (legacy_sig, legacy_version) = match legacy {
                LegacySignature::V1 => (signature_v1(&secret, &body), "v1"),
                LegacySignature::V2 => (signature_v2(&secret, "POST", &url, &body), "v2"),
            };
            let result = client
                .post(&url)
                .header("Content-Type", "application/json")
                .header(
                    "User-Agent",
                    "HubSpot Connect 2.0 (http://dev.hubspot.com/)",
                )
                .header("X-HubSpot-Signature-v3", &v3)
                .header("X-HubSpot-Request-Timestamp", ts.to_string())
                .header("X-HubSpot-Signature", legacy_sig)
                .header("X-HubSpot-Signature-Version", legacy_version)
                .body(body.clone())
                .send()
                .await;
            let (status, error, retry_after) = match result {
                Ok(r) => {
                    let retry_after = r
                        .headers()
                        .get("Retry-After")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    (Some(r.status().as_u16()), None, retry_after)
                }
                Err(e) => (None, Some(e.to_string()), None),
            };
            let d = Delivery {
                attempt,
                url: url.clone(),
                body,
                timestamp: ts,
                signature_v3: v3,
                status,
                error,
            };
            lock(&state).deliveries.push(d.clone());
            out.push(d);
            let done = status.is_some_and(|c| (200..300).contains(&c) || NO_RETRY.contains(&c));
            if done || attempt == retries {
                break;
            }
            let mut wait = base.saturating_mul(1 << attempt.min(16)).mul_f64(scale);
            if let Some(secs) = retry_after {
                wait = wait.max(Duration::from_secs(secs).mul_f64(scale));
            }
            tokio::time::sleep(wait).await;
        }
    }
    Ok(out)
}
