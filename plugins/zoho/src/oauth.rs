//! The Zoho OAuth client shared by the Zoho connectors (self-client refresh-token grant).
//!
//! * The access token is cached and refreshed shortly before it expires (60 s, or half its
//!   lifetime when that is shorter) and when the API answers `INVALID_TOKEN`
//!   ([`ZohoOAuth::invalidate`]).
//! * Zoho allows at most 10 token requests per 10 minutes per refresh token and throttles
//!   past that; the limit is enforced here, locally: an 11th request within the window is not
//!   sent and fails as [`ConnectorError::Transient`] with the time to wait.
//! * Zoho reports OAuth errors as HTTP 200 with `{"error": "..."}`: those become
//!   [`ConnectorError::Config`] naming the setting to fix (`connectors.crm.refresh_token`, ...).
//! * `api_domain` from the token response is handed to the caller, which uses it unless an
//!   explicit API URL is configured.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use optinsync_plugin_api::{ConnectorError, ConnectorResult, FailureScope};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::OAuthSettings;

/// Zoho's limit: token requests per refresh token per [`TOKEN_WINDOW`].
pub const MAX_TOKEN_REQUESTS: usize = 10;
pub const TOKEN_WINDOW: Duration = Duration::from_secs(600);
/// Refresh this long before expiry (or at half the lifetime for short-lived tokens).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// After Zoho's "Access Denied" throttling answer, wait at least this long.
const DENIED_BACKOFF: Duration = Duration::from_secs(300);

/// An access token and where to use it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub value: String,
    /// `api_domain` of the token response, e.g. `https://www.zohoapis.eu`.
    pub api_domain: Option<String>,
    /// When to stop using it (already includes the refresh margin).
    pub refresh_at: Instant,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"<redacted>")
            .field("api_domain", &self.api_domain)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl AccessToken {
    /// `Authorization` header value.
    pub fn header(&self) -> String {
        format!("Zoho-oauthtoken {}", self.value)
    }
}

#[derive(Debug, Default)]
struct TokenState {
    current: Option<AccessToken>,
    /// When the token requests of the last [`TOKEN_WINDOW`] were sent.
    sent: VecDeque<Instant>,
    denied_until: Option<Instant>,
}

/// A Zoho OAuth client for one refresh token. Cheap to share behind an `Arc`.
pub struct ZohoOAuth {
    http: reqwest::Client,
    settings: OAuthSettings,
    state: Mutex<TokenState>,
}

impl fmt::Debug for ZohoOAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZohoOAuth")
            .field("token_url", &self.settings.token_url)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// No `Debug`: it holds the access token.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    api_domain: Option<String>,
    expires_in: Option<serde_json::Value>,
    /// Legacy: when present, `expires_in` is in milliseconds (Zoho SDK behaviour).
    expires_in_sec: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
}

fn as_secs(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

impl ZohoOAuth {
    pub fn new(http: reqwest::Client, settings: OAuthSettings) -> Self {
        Self {
            http,
            settings,
            state: Mutex::new(TokenState::default()),
        }
    }

    pub fn settings(&self) -> &OAuthSettings {
        &self.settings
    }

    /// A valid access token: the cached one, or a fresh one from the token endpoint.
    pub async fn token(&self) -> ConnectorResult<AccessToken> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(t) = &state.current
            && now < t.refresh_at
        {
            return Ok(t.clone());
        }
        let token = self.request(&mut state, now).await?;
        state.current = Some(token.clone());
        Ok(token)
    }

    /// The API refused `stale` (`INVALID_TOKEN`): forget it so the next [`Self::token`]
    /// fetches a new one. A token already replaced by another task is left alone.
    pub async fn invalidate(&self, stale: &AccessToken) {
        let mut state = self.state.lock().await;
        if state.current.as_ref().map(|t| &t.value) == Some(&stale.value) {
            state.current = None;
        }
    }

    /// Token requests sent in the current window (for tests and diagnostics).
    pub async fn requests_in_window(&self) -> usize {
        let mut state = self.state.lock().await;
        prune(&mut state.sent, Instant::now());
        state.sent.len()
    }

    async fn request(&self, state: &mut TokenState, now: Instant) -> ConnectorResult<AccessToken> {
        if let Some(until) = state.denied_until
            && now < until
        {
            return Err(ConnectorError::Transient {
                message: "Zoho accounts throttled token requests; waiting before asking again"
                    .into(),
                retry_after: Some(until - now),
                scope: FailureScope::Service,
            });
        }
        prune(&mut state.sent, now);
        if state.sent.len() >= MAX_TOKEN_REQUESTS {
            let wait = state
                .sent
                .front()
                .map(|first| (*first + TOKEN_WINDOW).saturating_duration_since(now))
                .unwrap_or(TOKEN_WINDOW);
            tracing::warn!(
                limit = MAX_TOKEN_REQUESTS,
                wait_secs = wait.as_secs(),
                "Zoho token request limit reached locally; not asking for another token yet"
            );
            return Err(ConnectorError::Transient {
                message: format!(
                    "Zoho allows {MAX_TOKEN_REQUESTS} token requests per 10 minutes; next one in {} s",
                    wait.as_secs()
                ),
                retry_after: Some(wait),
                scope: FailureScope::Service,
            });
        }
        state.sent.push_back(now);
        let s = &self.settings;
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", s.client_id.as_str()),
            ("client_secret", s.client_secret.as_str()),
            ("refresh_token", s.refresh_token.as_str()),
        ];
        let response = self
            .http
            .post(&s.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                ConnectorError::transient(format!(
                    "Zoho token request to {} failed: {}",
                    s.token_url,
                    crate::error_chain(&e)
                ))
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            ConnectorError::transient(format!("reading the Zoho token response failed: {e}"))
        })?;
        let parsed: Result<TokenResponse, _> = serde_json::from_slice(&body);
        if let Ok(TokenResponse {
            error: Some(error),
            error_description,
            ..
        }) = &parsed
        {
            return Err(self.oauth_error(state, status, error, error_description.as_deref()));
        }
        if !status.is_success() {
            // 429 is throttling (retry later), not a setting to fix.
            return Err(if status.is_client_error() && status.as_u16() != 429 {
                ConnectorError::Config {
                    setting: s.setting("accounts_url"),
                    message: format!(
                        "the Zoho token endpoint {} answered HTTP {status}",
                        s.token_url
                    ),
                }
            } else {
                ConnectorError::transient(format!("the Zoho token endpoint answered HTTP {status}"))
            });
        }
        let parsed = parsed.map_err(|e| {
            ConnectorError::transient(format!(
                "the Zoho token endpoint {} did not answer JSON: {e}",
                s.token_url
            ))
        })?;
        let Some(value) = parsed.access_token.filter(|t| !t.is_empty()) else {
            return Err(ConnectorError::transient(
                "the Zoho token response has no access_token",
            ));
        };
        let lifetime = match (&parsed.expires_in_sec, &parsed.expires_in) {
            (Some(sec), _) => as_secs(sec),
            (None, Some(v)) => as_secs(v),
            (None, None) => None,
        }
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(3600));
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            "Zoho access token refreshed"
        );
        Ok(AccessToken {
            value,
            api_domain: parsed
                .api_domain
                .map(|d| d.trim_end_matches('/').to_owned())
                .filter(|d| !d.is_empty()),
            refresh_at: now + lifetime.saturating_sub(margin),
        })
    }

    fn oauth_error(
        &self,
        state: &mut TokenState,
        status: reqwest::StatusCode,
        error: &str,
        description: Option<&str>,
    ) -> ConnectorError {
        let s = &self.settings;
        let config = |key: &str, message: String| ConnectorError::Config {
            setting: s.setting(key),
            message,
        };
        match error {
            "invalid_code" => config(
                "refresh_token",
                "Zoho refused the refresh token (invalid_code): it was revoked, mistyped or belongs to \
                 another data centre; generate a new one from a self-client grant code"
                    .into(),
            ),
            "invalid_client" => config(
                "client_id",
                format!(
                    "Zoho does not know this client (invalid_client); check client_id and that {} is \
                     the accounts server of your data centre",
                    s.token_url
                ),
            ),
            "invalid_client_secret" => config(
                "client_secret",
                "Zoho refused the client secret (invalid_client_secret)".into(),
            ),
            other if other.eq_ignore_ascii_case("access denied") => {
                state.denied_until = Some(Instant::now() + DENIED_BACKOFF);
                ConnectorError::Transient {
                    message: format!(
                        "Zoho accounts throttled token requests (HTTP {status}): {}",
                        description.unwrap_or(other)
                    ),
                    retry_after: Some(DENIED_BACKOFF),
                    scope: FailureScope::Service,
                }
            }
            other => config(
                "refresh_token",
                format!(
                    "Zoho refused the token request ({other}{})",
                    description.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            ),
        }
    }
}

fn prune(sent: &mut VecDeque<Instant>, now: Instant) {
    while sent
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= TOKEN_WINDOW)
    {
        sent.pop_front();
    }
}
