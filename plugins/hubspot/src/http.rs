//! One HubSpot API call: the bearer token (a static token, or OAuth access tokens refreshed by
//! their lifetime), HubSpot's rate limits kept locally, and how HubSpot's answers map to
//! [`ConnectorError`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use optinsync_core::untrusted::Escaped;
use optinsync_plugin_api::{ConnectorError, FailureScope, QuotaLedger, QuotaSlot, QuotaWindow};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::SETTING_PREFIX;

/// A sliding-window limiter: at most `max` calls per `window`; callers wait for a slot. With
/// a shared [`QuotaLedger`] (several instances on one store) the window is counted there, for
/// every instance together.
#[derive(Debug)]
pub(crate) struct Limiter {
    max: usize,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
    shared: Option<(Arc<dyn QuotaLedger>, String)>,
}

impl Limiter {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        Self {
            max: (max as usize).max(1),
            window,
            sent: Mutex::new(VecDeque::new()),
            shared: None,
        }
    }

    /// Count in `ledger` under `key` instead of in memory.
    pub(crate) fn share(&mut self, ledger: Arc<dyn QuotaLedger>, key: String) {
        self.shared = Some((ledger, key));
    }

    fn window(&self) -> QuotaWindow {
        QuotaWindow {
            limit: u32::try_from(self.max).unwrap_or(u32::MAX),
            length_ms: i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Every instance pauses this limit until `wait` has passed (HubSpot answered 429).
    pub(crate) async fn pause(&self, wait: Duration) {
        if let Some((ledger, key)) = &self.shared {
            let until = chrono::Utc::now().timestamp_millis()
                + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
            if let Err(e) = ledger.lock(key, until).await {
                tracing::debug!(error = %e, "shared HubSpot rate limit not locked");
            }
        }
    }

    pub(crate) async fn acquire(&self) {
        if let Some((ledger, key)) = &self.shared {
            let windows = [self.window()];
            loop {
                let now = chrono::Utc::now().timestamp_millis();
                match ledger.take(key, &windows, now).await {
                    Ok(QuotaSlot::Go(_)) => return,
                    Ok(QuotaSlot::Wait(d) | QuotaSlot::Locked(d)) => {
                        tokio::time::sleep(d.max(Duration::from_millis(5))).await;
                    }
                    Err(e) => {
                        // The store is unreachable: count here (this instance only).
                        tracing::debug!(error = %e, "shared HubSpot rate limit unavailable; counting locally");
                        break;
                    }
                }
            }
        }
        loop {
            let wait = {
                let mut sent = self.sent.lock().await;
                let now = Instant::now();
                while sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    sent.pop_front();
                }
                if sent.len() < self.max {
                    sent.push_back(now);
                    return;
                }
                sent.front()
                    .map(|t| self.window.saturating_sub(now.duration_since(*t)))
                    .unwrap_or(self.window)
            };
            tokio::time::sleep(wait + Duration::from_millis(5)).await;
        }
    }
}

/// How the connector authenticates.
pub(crate) enum Auth {
    /// A private-app token or service key.
    Static(String),
    OAuth(OAuth),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Auth::Static(<redacted>)"),
            Self::OAuth(o) => f
                .debug_struct("Auth::OAuth")
                .field("client_id", &o.client_id)
                .finish_non_exhaustive(),
        }
    }
}

/// The OAuth refresh-token grant. HubSpot may hand out a new refresh token with each access
/// token; the newest is kept (in memory only).
pub(crate) struct OAuth {
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) state: Mutex<OAuthState>,
}

pub(crate) struct OAuthState {
    pub(crate) refresh_token: String,
    pub(crate) access: Option<(String, Instant)>,
}

/// A failed call before it is mapped for the engine.
#[derive(Debug)]
pub(crate) enum CallError {
    Connector(ConnectorError),
    /// HubSpot answered with an error envelope.
    Api {
        status: StatusCode,
        category: String,
        message: String,
        body: Value,
    },
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}

impl CallError {
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Connector(_) => None,
        }
    }
}

/// The API client.
#[derive(Debug)]
pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) auth: Auth,
    pub(crate) burst: Limiter,
    pub(crate) search: Limiter,
}

/// The setting that holds the credential (named in configuration errors).
pub(crate) fn credential_setting(auth: &Auth) -> String {
    match auth {
        Auth::Static(_) => format!("{SETTING_PREFIX}.token"),
        Auth::OAuth(_) => format!("{SETTING_PREFIX}.refresh_token"),
    }
}

/// Anything with `@` in it is left out of vendor messages we log or report.
pub(crate) fn redact(text: &str) -> String {
    let mut out: String = text
        .split(' ')
        .map(|w| if w.contains('@') { "<address>" } else { w })
        .collect::<Vec<_>>()
        .join(" ");
    if out.len() > 300 {
        let mut cut = 300;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    Escaped(out).to_string()
}

impl Api {
    /// One call; `search` counts it against the search limit too.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        search: bool,
    ) -> Result<(StatusCode, Value), CallError> {
        let mut refreshed = false;
        loop {
            if search {
                self.search.acquire().await;
            }
            self.burst.acquire().await;
            let token = self.token().await?;
            let url = format!("{}{path}", self.base);
            let mut builder = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&token)
                .query(query);
            if let Some(b) = body {
                builder = builder.json(b);
            }
            let endpoint = endpoint_label(path);
            let response = builder.send().await.map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                // Without the URL: it may hold an address (communication preferences).
                ConnectorError::transient(format!(
                    "HubSpot {method} {endpoint} {what}: {}",
                    error_chain(&e.without_url())
                ))
            })?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let text = response.text().await.map_err(|e| {
                ConnectorError::transient(format!(
                    "reading HubSpot's answer to {method} {endpoint} failed: {e}"
                ))
            })?;
            if status == StatusCode::NO_CONTENT || (status.is_success() && text.trim().is_empty()) {
                return Ok((status, Value::Null));
            }
            let parsed: Result<Value, _> = serde_json::from_str(&text);
            if status == StatusCode::TOO_MANY_REQUESTS {
                let v = parsed.unwrap_or(Value::Null);
                let policy = v
                    .get("policyName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let message = v.get("message").and_then(Value::as_str).unwrap_or_default();
                // `Retry-After` is documented for workflow webhooks only (in milliseconds
                // there); read as seconds, a value beyond an hour is not believed unless the
                // daily limit was hit.
                let wait = match retry_after {
                    Some(w) if policy == "DAILY" || w <= Duration::from_secs(3600) => w,
                    _ => policy_wait(&policy, message),
                };
                tracing::warn!(policy = %Escaped(&policy), endpoint, wait_secs = wait.as_secs(), "HubSpot rate limit (429)");
                if search && policy != "DAILY" && policy != "TEN_SECONDLY_ROLLING" {
                    self.search.pause(wait).await;
                } else {
                    self.burst.pause(wait).await;
                }
                return Err(ConnectorError::Transient {
                    message: format!(
                        "HubSpot rate limit (HTTP 429 {}): {}",
                        Escaped(&policy),
                        redact(message)
                    ),
                    retry_after: Some(wait),
                    scope: FailureScope::Service,
                }
                .into());
            }
            if status.is_server_error() || status.as_u16() == 477 || status.as_u16() == 423 {
                // 423: the record is locked by a concurrent write (wait ≥ 2 s); 477: a
                // migration is in progress.
                let record = status.as_u16() == 423;
                tracing::warn!(
                    status = status.as_u16(),
                    endpoint,
                    "HubSpot is temporarily unavailable"
                );
                return Err(ConnectorError::Transient {
                    message: format!("HubSpot answered HTTP {status} to {method} {endpoint}"),
                    retry_after: retry_after.or(record.then_some(Duration::from_secs(2))),
                    scope: if record {
                        FailureScope::Record
                    } else {
                        FailureScope::Service
                    },
                }
                .into());
            }
            let value = match parsed {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(
                        status = status.as_u16(),
                        endpoint,
                        "HubSpot answered with a body that is not JSON"
                    );
                    return Err(ConnectorError::transient(format!(
                        "HubSpot answered HTTP {status} to {method} {endpoint} with a body that is not JSON: {e}"
                    ))
                    .into());
                }
            };
            if status.is_success() {
                return Ok((status, value));
            }
            let category = value
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("UNKNOWN")
                .to_owned();
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && let Auth::OAuth(o) = &self.auth
            {
                tracing::debug!(category = %Escaped(&category), "HubSpot refused the access token; refreshing it");
                o.state.lock().await.access = None;
                refreshed = true;
                continue;
            }
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            tracing::warn!(status = status.as_u16(), category = %Escaped(&category), endpoint, "HubSpot error");
            tracing::debug!(message = %Escaped(&message), "HubSpot error message");
            return Err(CallError::Api {
                status,
                category,
                message,
                body: value,
            });
        }
    }

    /// The bearer token to send.
    async fn token(&self) -> Result<String, ConnectorError> {
        let o = match &self.auth {
            Auth::Static(t) => return Ok(t.clone()),
            Auth::OAuth(o) => o,
        };
        let mut state = o.state.lock().await;
        if let Some((token, until)) = &state.access
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        self.burst.acquire().await;
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", o.client_id.as_str()),
            ("client_secret", o.client_secret.as_str()),
            ("refresh_token", state.refresh_token.as_str()),
        ];
        let response = self
            .http
            .post(format!("{}/oauth/v1/token", self.base))
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                ConnectorError::transient(format!(
                    "HubSpot token request failed: {}",
                    error_chain(&e.without_url())
                ))
            })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            ConnectorError::transient(format!("reading HubSpot's token answer failed: {e}"))
        })?;
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(ConnectorError::transient(format!(
                "HubSpot token endpoint answered HTTP {status}"
            )));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            ConnectorError::transient(format!(
                "HubSpot token endpoint answered HTTP {status} with a body that is not JSON: {e}"
            ))
        })?;
        if !status.is_success() {
            let code = value
                .get("status")
                .or_else(|| value.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("UNKNOWN");
            let setting = match code {
                "BAD_CLIENT_ID" => "client_id",
                "BAD_CLIENT_SECRET" => "client_secret",
                _ => "refresh_token",
            };
            return Err(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.{setting}"),
                message: format!(
                    "HubSpot refused the OAuth refresh (HTTP {status} {}): {}",
                    Escaped(code),
                    redact(
                        value
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                    )
                ),
            });
        }
        let Some(access) = value.get("access_token").and_then(Value::as_str) else {
            return Err(ConnectorError::transient(
                "HubSpot's token answer has no access_token",
            ));
        };
        let ttl = value
            .get("expires_in")
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(1800);
        // Refresh by lifetime (HubSpot: a 401 is not a reliable signal): 5 minutes early, or
        // at half the lifetime when that is shorter.
        let margin = (ttl / 2).min(300);
        let until = Instant::now() + Duration::from_secs(ttl.saturating_sub(margin).max(1));
        if let Some(rotated) = value.get("refresh_token").and_then(Value::as_str)
            && !rotated.is_empty()
        {
            state.refresh_token = rotated.to_owned();
        }
        state.access = Some((access.to_owned(), until));
        tracing::debug!(expires_in = ttl, "HubSpot access token refreshed");
        Ok(access.to_owned())
    }

    /// A failed call as the engine should see it; `what` names the operation.
    pub(crate) fn error(&self, e: CallError, what: &str) -> ConnectorError {
        let (status, category, message, body) = match e {
            CallError::Connector(c) => return c,
            CallError::Api {
                status,
                category,
                message,
                body,
            } => (status, category, message, body),
        };
        let text = format!(
            "HubSpot {what}: HTTP {} {}: {}",
            status.as_u16(),
            Escaped(&category),
            redact(&message)
        );
        match status {
            StatusCode::UNAUTHORIZED => ConnectorError::Config {
                setting: credential_setting(&self.auth),
                message: format!("{text}; the token is not valid for this account"),
            },
            StatusCode::FORBIDDEN => {
                let scopes: Vec<String> = body
                    .get("errors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.get("context"))
                    .filter_map(|c| {
                        c.get("requiredGranularScopes")
                            .or_else(|| c.get("requiredScopes"))
                    })
                    .filter_map(Value::as_array)
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|s| Escaped(s).to_string())
                    .collect();
                ConnectorError::Config {
                    setting: credential_setting(&self.auth),
                    message: if scopes.is_empty() {
                        format!("{text}; grant the app the scopes listed in the README")
                    } else {
                        format!(
                            "{text}; the app lacks a scope: grant {} (README \"HubSpot CRM\")",
                            scopes.join(" or ")
                        )
                    },
                }
            }
            _ => ConnectorError::permanent(text),
        }
    }
}

/// `METHOD path` without ids or addresses, for logs.
fn endpoint_label(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.contains('@') || (!seg.is_empty() && seg.chars().all(|c| c.is_ascii_digit())) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// How long a 429 without `Retry-After` means to wait, by HubSpot's policy name.
fn policy_wait(policy: &str, message: &str) -> Duration {
    match policy {
        "DAILY" => Duration::from_secs(3600),
        "SECONDLY" => Duration::from_secs(1),
        "TEN_SECONDLY_ROLLING" => Duration::from_secs(10),
        _ if message.contains("secondly") => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    }
}

fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// An error and its sources on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_left_out_of_vendor_messages() {
        assert_eq!(
            redact("Email ann@example.org is already subscribed"),
            "Email <address> is already subscribed"
        );
        assert_eq!(
            endpoint_label("/communication-preferences/v3/status/email/a@b.org"),
            "/communication-preferences/v3/status/email/{id}"
        );
        assert_eq!(
            endpoint_label("/crm/v3/objects/contacts/123"),
            "/crm/v3/objects/contacts/{id}"
        );
    }
}
