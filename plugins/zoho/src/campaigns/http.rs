//! One Zoho Campaigns API call (within quota, token refresh, locks) and how its in-body errors map.

use std::time::Duration;

use optinsync_plugin_api::{ConnectorError, FailureScope};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;

use super::{Api, SETTING_PREFIX, ZohoCampaigns, code_of, str_of};

/// Pause after an HTTP 429 that names no wait and does not say "locked".
const THROTTLE_PAUSE: Duration = Duration::from_secs(5);

/// In-body "retry after sometime" codes that, answered to a call about one address
/// (`listsubscribe`, `listunsubscribe`), concern that address on that list: Zoho answered, so
/// the service is alive (Zoho's subscribe and unsubscribe pages, and its error-code catalogue).
const RECORD_RETRY_CODES: [&str; 3] = ["2001", "2101", "2103"];

/// A failed call: Zoho's in-body error, or already a connector error.
#[derive(Debug)]
pub(super) enum CallError {
    Api { code: String, message: String },
    Connector(ConnectorError),
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}

impl ZohoCampaigns {
    /// One call, within quota, with one token refresh on `1007`/`401`. Parameters go in the
    /// query string for reads and in a form body for writes (addresses stay out of URLs).
    pub(super) async fn call(
        &self,
        api: Api,
        params: &[(&str, String)],
    ) -> Result<Value, CallError> {
        let _permit =
            self.gate.acquire().await.map_err(|_| {
                ConnectorError::transient("Zoho Campaigns connector is shutting down")
            })?;
        let mut refreshed = false;
        loop {
            let token = self.oauth.token().await?;
            let sent = self.slot(api).await?;
            let url = format!("{}{}", self.settings.base_url, api.path());
            let mut all: Vec<(&str, &str)> = vec![("resfmt", "JSON")];
            all.extend(params.iter().map(|(k, v)| (*k, v.as_str())));
            let builder = self
                .http
                .request(api.method(), &url)
                .header(header::AUTHORIZATION, token.header());
            let builder = if api.method() == Method::GET {
                builder.query(&all)
            } else {
                builder.form(&all)
            };
            let response = builder.send().await;
            self.settle(api, sent).await;
            let response = response.map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                ConnectorError::transient(format!(
                    "Zoho Campaigns `{}` {what}: {}",
                    api.name(),
                    crate::error_chain(&e)
                ))
            })?;
            let status = response.status();
            let retry_after = crate::retry_after(response.headers());
            let body = response.bytes().await.map_err(|e| {
                ConnectorError::transient(format!(
                    "reading Zoho Campaigns' answer to `{}` failed: {e}",
                    api.name()
                ))
            })?;
            if status == StatusCode::TOO_MANY_REQUESTS {
                // Zoho's lock-out says "locked"; any other 429 (a gateway's throttle, with or
                // without `Retry-After`) pauses the endpoint briefly, not for a 30-minute lock
                // that would also hold back the unsubscribe/bounce poll.
                let says_locked = String::from_utf8_lossy(&body)
                    .to_lowercase()
                    .contains("locked");
                let retry_after = if says_locked {
                    retry_after
                } else {
                    Some(retry_after.unwrap_or(THROTTLE_PAUSE))
                };
                let rest = self.mark_locked(api, retry_after).await;
                tracing::warn!(
                    endpoint = api.name(),
                    pause_secs = rest.as_secs(),
                    "Zoho Campaigns answered 429; endpoint paused"
                );
                return Err(ConnectorError::Transient {
                    message: format!("Zoho Campaigns `{}` answered HTTP 429", api.name()),
                    retry_after: Some(rest),
                    scope: FailureScope::Service,
                }
                .into());
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                self.oauth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if !status.is_success() {
                tracing::warn!(
                    endpoint = api.name(),
                    status = status.as_u16(),
                    "Zoho Campaigns HTTP error"
                );
                return Err(ConnectorError::Transient {
                    message: format!("Zoho Campaigns `{}` answered HTTP {status}", api.name()),
                    retry_after,
                    scope: FailureScope::Service,
                }
                .into());
            }
            let value: Value = serde_json::from_slice(&body).map_err(|e| {
                tracing::warn!(endpoint = api.name(), "Zoho Campaigns answered with a body that is not JSON");
                ConnectorError::transient(format!(
                    "Zoho Campaigns answered `{}` with a body that is not JSON (is resfmt=JSON honoured?): {e}",
                    api.name()
                ))
            })?;
            let code = code_of(&value);
            let ok_status = value
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("success"));
            let error_status = value
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("error"));
            if !error_status && (ok_status || code == "0" || code == "200") {
                return Ok(value);
            }
            let message = str_of(&value, "message");
            if self.settings.lock_codes.contains(&code) || message.to_lowercase().contains("locked")
            {
                let rest = self.mark_locked(api, retry_after).await;
                tracing::warn!(endpoint = api.name(), code = %code, pause_secs = rest.as_secs(), "Zoho Campaigns locked the endpoint; paused until the lock ends");
                return Err(ConnectorError::Transient {
                    message: format!(
                        "Zoho Campaigns locked `{}` (code {code}: {message})",
                        api.name()
                    ),
                    retry_after: Some(rest),
                    scope: FailureScope::Service,
                }
                .into());
            }
            if matches!(code.as_str(), "1007" | "401") && !refreshed {
                tracing::debug!(code = %code, "Zoho Campaigns refused the access token; refreshing it");
                self.oauth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if code.is_empty() && message.is_empty() {
                return Err(ConnectorError::transient(format!(
                    "Zoho Campaigns answered `{}` with JSON that has neither a success status nor an error code",
                    api.name()
                ))
                .into());
            }
            return Err(CallError::Api { code, message });
        }
    }

    /// Map an in-body error of a call concerning `list` (its optinsync name).
    pub(super) fn api_error(
        &self,
        api: Api,
        list: &str,
        code: &str,
        message: &str,
    ) -> ConnectorError {
        let what = format!("Zoho Campaigns `{}` error {code}: {message}", api.name());
        match code {
            // Invalid / group address: will never succeed.
            "2004" | "2005" | "1001" => ConnectorError::rejected(what),
            // The list key is wrong, the list is gone, or the token may not use it.
            "2501" | "2102" | "2002" | "2202" | "2206" | "2707" | "2701" | "2704" | "2706" => {
                self.list_config_error(list, &what)
            }
            "1007" | "401" => ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.refresh_token"),
                message: format!(
                    "{what} (the token was refused twice: check its scopes, ZohoCampaigns.contact.ALL)"
                ),
            },
            "901" | "902" => ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.refresh_token"),
                message: format!(
                    "{what} (the Zoho Campaigns account is not active for this token)"
                ),
            },
            "914" | "2302" => ConnectorError::Permanent { message: what },
            // "Please retry after sometime" about this address: this record retries with
            // backoff; the service answered, so no other record waits for it.
            c if api.concerns_one_address() && RECORD_RETRY_CODES.contains(&c) => {
                tracing::debug!(
                    endpoint = api.name(),
                    code,
                    "Zoho Campaigns error about one address; that record will retry"
                );
                ConnectorError::record_transient(what)
            }
            // Other "please retry after sometime" and anything unknown: retried with backoff,
            // and counted as a service failure (cautious: it may concern every call).
            _ => {
                tracing::warn!(
                    endpoint = api.name(),
                    code,
                    "Zoho Campaigns error; will retry"
                );
                ConnectorError::transient(what)
            }
        }
    }

    fn list_config_error(&self, list: &str, what: &str) -> ConnectorError {
        ConnectorError::Config {
            setting: format!("{SETTING_PREFIX}.lists.{list}.listkey"),
            message: format!("{what} (check the listkey of list `{list}`)"),
        }
    }
}
