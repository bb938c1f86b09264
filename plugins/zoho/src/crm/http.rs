//! One Zoho CRM API call (token refresh, rate limits, credits) and how its errors map.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{ConnectorError, FailureScope};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;

use super::{ZohoCrm, zoho_time};

impl ZohoCrm {
    /// One API call under `/crm/v8`, with one token refresh on `INVALID_TOKEN`.
    pub(super) async fn call(&self, req: Request<'_>) -> Result<Reply, CallError> {
        let _permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| ConnectorError::transient("Zoho CRM connector is shutting down"))?;
        let mut refreshed = false;
        loop {
            let token = self.oauth.token().await?;
            let url = format!("{}/crm/v8{}", self.api_base(&token), req.path);
            let mut builder = self
                .http
                .request(req.method.clone(), &url)
                .header(header::AUTHORIZATION, token.header())
                .query(&req.query);
            if let Some(since) = req.if_modified_since {
                builder = builder.header(header::IF_MODIFIED_SINCE, zoho_time(since));
            }
            if let Some(body) = req.body {
                builder = builder.json(body);
            }
            let response = builder.send().await.map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                ConnectorError::transient(format!(
                    "Zoho CRM {} {} {what}: {}",
                    req.method,
                    req.path,
                    crate::error_chain(&e)
                ))
            })?;
            let status = response.status();
            if let Some(credits) = response
                .headers()
                .get("X-API-CREDITS-REMAINING")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok())
            {
                self.credits.store(credits, Ordering::Relaxed);
                metrics::gauge!("optinsync_zoho_crm_api_credits_remaining").set(credits as f64);
                tracing::debug!(credits, "Zoho CRM API credits remaining");
            }
            let retry_after = crate::retry_after(response.headers());
            let body = response.bytes().await.map_err(|e| {
                ConnectorError::transient(format!(
                    "reading Zoho CRM's answer to {} {} failed: {e}",
                    req.method, req.path
                ))
            })?;
            if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
                return Ok(Reply::Empty);
            }
            let parsed: Result<Value, _> = serde_json::from_slice(&body);
            if status == StatusCode::TOO_MANY_REQUESTS {
                let env = parsed.as_ref().map(Envelope::of).unwrap_or_default();
                tracing::warn!(code = %env.code, path = req.path, retry_after_secs = retry_after.map(|d| d.as_secs()), "Zoho CRM rate limit (429)");
                return Err(ConnectorError::Transient {
                    message: format!(
                        "Zoho CRM rate limit (HTTP 429 {}): {}",
                        env.code, env.message
                    ),
                    retry_after,
                    scope: FailureScope::Service,
                }
                .into());
            }
            if status.is_server_error() {
                let env = parsed.as_ref().map(Envelope::of).unwrap_or_default();
                tracing::warn!(code = %env.code, status = status.as_u16(), path = req.path, "Zoho CRM server error");
                return Err(ConnectorError::Transient {
                    message: format!("Zoho CRM answered HTTP {status} {}", env.code),
                    retry_after,
                    scope: FailureScope::Service,
                }
                .into());
            }
            let value = parsed.map_err(|e| {
                tracing::warn!(
                    status = status.as_u16(),
                    path = req.path,
                    "Zoho CRM answered with a body that is not JSON"
                );
                ConnectorError::transient(format!(
                    "Zoho CRM answered HTTP {status} to {} {} with a body that is not JSON: {e}",
                    req.method, req.path
                ))
            })?;
            if status.is_success() {
                return Ok(Reply::Json(status, value));
            }
            // A failed multi-record update still carries the per-record results.
            if req.method == Method::PUT && value.get("data").is_some_and(Value::is_array) {
                return Ok(Reply::Json(status, value));
            }
            let env = Envelope::of(&value);
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && matches!(
                    env.code.as_str(),
                    "INVALID_TOKEN" | "INVALID_OAUTHTOKEN" | "AUTHENTICATION_FAILURE"
                )
            {
                tracing::debug!(code = %env.code, "Zoho CRM refused the access token; refreshing it");
                self.oauth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            tracing::warn!(code = %env.code, status = status.as_u16(), path = req.path, message = %env.message, details = %env.details, "Zoho CRM error");
            return Err(CallError::Api { status, env });
        }
    }

    /// A write to `module` (update, upsert) whose answer must carry JSON: its status and body.
    pub(super) async fn write_json(
        &self,
        method: Method,
        path: &str,
        module: &str,
        body: &Value,
    ) -> Result<(StatusCode, Value), ConnectorError> {
        let reply = self
            .call(Request {
                method,
                path,
                query: vec![],
                if_modified_since: None,
                body: Some(body),
            })
            .await
            .map_err(|e| self.crm_error(e, module))?;
        match reply {
            Reply::Json(status, value) => Ok((status, value)),
            _ => Err(ConnectorError::transient(format!(
                "Zoho CRM answered the write to {module} ({path}) with no content"
            ))),
        }
    }

    /// A failed call as the engine should see it.
    pub(super) fn crm_error(&self, e: CallError, module: &str) -> ConnectorError {
        match e {
            CallError::Connector(c) => c,
            CallError::Api { status, env } => api_error(status, &env, module),
        }
    }
}

/// Zoho's error envelope: `{"code", "details", "message", "status"}`.
#[derive(Debug, Default, Clone)]
pub(super) struct Envelope {
    pub(super) code: String,
    pub(super) message: String,
    pub(super) details: Value,
}

impl Envelope {
    pub(super) fn of(v: &Value) -> Self {
        Self {
            code: v
                .get("code")
                .map(|c| match c {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| "UNKNOWN".into()),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            details: v.get("details").cloned().unwrap_or(Value::Null),
        }
    }
}

/// Map an API error to what the engine does with it.
fn api_error(status: StatusCode, env: &Envelope, module: &str) -> ConnectorError {
    let config = |key: &str, message: String| ConnectorError::Config {
        setting: ZohoCrm::setting(key),
        message,
    };
    let text = format!(
        "Zoho CRM {module}: HTTP {} {}: {} {}",
        status.as_u16(),
        env.code,
        env.message,
        if env.details.is_null() {
            String::new()
        } else {
            env.details.to_string()
        }
    );
    match env.code.as_str() {
        "OAUTH_SCOPE_MISMATCH" => config(
            "refresh_token",
            format!(
                "the token lacks a scope ({text}); create the grant with the scopes listed in the README"
            ),
        ),
        "INVALID_TOKEN" | "INVALID_OAUTHTOKEN" | "AUTHENTICATION_FAILURE" => config(
            "refresh_token",
            format!("Zoho CRM refuses freshly issued tokens ({text}); check data_centre / api_url"),
        ),
        "NO_PERMISSION" | "INVALID_MODULE" => config(
            "modules",
            format!("{text}; check the module names and the Zoho user's permissions"),
        ),
        "LIMIT_EXCEEDED" | "REQUIRED_PARAM_MISSING" if module != "actions/watch" => {
            config("fields", text)
        }
        _ if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN => {
            config("refresh_token", text)
        }
        _ if status == StatusCode::NOT_FOUND && env.code == "INVALID_URL_PATTERN" => {
            config("api_url", text)
        }
        _ => ConnectorError::permanent(text),
    }
}

pub(super) struct Request<'a> {
    pub(super) method: Method,
    pub(super) path: &'a str,
    pub(super) query: Vec<(&'a str, String)>,
    pub(super) if_modified_since: Option<DateTime<Utc>>,
    pub(super) body: Option<&'a Value>,
}

pub(super) enum Reply {
    Empty,
    Json(StatusCode, Value),
}

#[derive(Debug)]
pub(super) enum CallError {
    Connector(ConnectorError),
    Api { status: StatusCode, env: Envelope },
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}
