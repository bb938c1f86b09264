//! Zoho CRM as optinsync's CRM (CRM API v8; README.md, "Zoho CRM").
//!
//! # Change feed
//!
//! One *round* walks every configured module; one call of [`CrmConnector::changes`] fetches
//! one page of one module, so the engine commits page by page and the opaque cursor (JSON)
//! always names where to go on: per module the `If-Modified-Since` watermark of the pass, the
//! next `page` or `page_token`, and what was already delivered near the watermark.
//!
//! * Records come sorted by `Modified_Time` ascending. Pages follow `info.next_page_token`
//!   whenever Zoho gives one, so a module is never capped at the 2,000 records that `page`
//!   alone can reach (the bug of Airbyte's connector). Without a token, past page
//!   `2000 / per_page` the query restarts from the latest `Modified_Time` seen.
//! * A pass's watermark for the next pass is `min(latest Modified_Time seen, pass start) -
//!   overlap`: an edit made while a pass runs (or a few seconds of clock skew) is read by the
//!   next pass. Records re-read inside the overlap are recognised by `(id, Modified_Time)` and
//!   not delivered twice.
//! * `204`/`304` mean "nothing new". After each incremental pass of a module, its `/deleted`
//!   list is read and reported in [`ChangePage::deleted`].
//! * A malformed record (no id, wrong JSON types) goes to [`ChangePage::invalid`] with its
//!   id; the rest of the page goes on.
//! * Records that optinsync itself just wrote back are recognised by the `Modified_Time` of
//!   the write and not reported as CRM input (no sync loop).
//!
//! # Errors
//!
//! 429 → [`ConnectorError::Transient`] with `Retry-After` when given; 5xx and timeouts →
//! transient; `INVALID_TOKEN` → one token refresh and retry; scope, permission and module
//! errors → [`ConnectorError::Config`] naming the setting. Zoho's envelope (`code`,
//! `message`, `details`) is logged with its code.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    ChangePage, ConnectorError, ConnectorResult, ConsentWriteBack, CrmConnector, CrmRecord, Cursor,
    FailureScope, Health, InvalidRecord, Limits, RecordRef, WebhookEvent,
};
use reqwest::{Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::{Mutex, Semaphore};

use crate::config::{
    self, AssertRule, ConfigError, OAuthSettings, WriteBackConfig, ZohoCrmConfig, check_url,
    invalid, parse_duration, parse_settings,
};
use crate::oauth::{AccessToken, ZohoOAuth};

/// Zoho's limits (its API-limits and pagination pages).
pub const MAX_PER_PAGE: u32 = 200;
pub const DISCRETE_PAGE_LIMIT: u32 = 2000;
pub const MAX_FIELDS: usize = 50;
pub const MAX_UPDATE_BATCH: usize = 100;
const SETTING_PREFIX: &str = "connectors.crm";
const CURSOR_KIND: &str = "zoho-crm";

#[derive(Clone)]
struct Webhook {
    token: String,
    notify_url: String,
    channel_id: u64,
    ttl: Duration,
    register: bool,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("token", &crate::config::REDACTED)
            .field("notify_url", &self.notify_url)
            .field("channel_id", &self.channel_id)
            .field("ttl", &self.ttl)
            .field("register", &self.register)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Settings {
    api_url: Option<String>,
    default_api_url: String,
    modules: Vec<String>,
    email_field: String,
    language_field: Option<String>,
    opt_out_field: String,
    fields: Vec<String>,
    asserts: BTreeMap<String, AssertRule>,
    /// Comma-separated `fields` parameter of list calls.
    fields_param: String,
    overlap: chrono::Duration,
    per_page: u32,
    webhook: Option<Webhook>,
    write_back: WriteBackConfig,
}

/// When the notification channel must be renewed.
#[derive(Debug, Clone, Copy)]
struct Channel {
    renew_at: tokio::time::Instant,
}

/// A [`CrmConnector`] for Zoho CRM. See the module docs for the change feed.
#[derive(Debug)]
pub struct ZohoCrm {
    settings: Settings,
    http: reqwest::Client,
    oauth: Arc<ZohoOAuth>,
    /// Zoho counts concurrent calls per app; stay under the configured limit.
    gate: Semaphore,
    /// `Module/id` → `Modified_Time` (unix seconds) of optinsync's own last write, and
    /// whether that write set the opt-out flag.
    echoes: std::sync::Mutex<HashMap<String, (i64, bool)>>,
    channel: Mutex<Option<Channel>>,
    /// Last `X-API-CREDITS-REMAINING` seen; -1 while Zoho has not sent it.
    credits: AtomicI64,
}

impl ZohoCrm {
    /// Build from the connector's TOML table (`base_dir` is unused: no local paths).
    pub fn from_config(settings: toml::Table, _base_dir: &Path) -> Result<Self, ConfigError> {
        Self::new(parse_settings(settings)?)
    }

    /// Build from already-parsed settings.
    pub fn new(c: ZohoCrmConfig) -> Result<Self, ConfigError> {
        let oauth = OAuthSettings::new(
            &c.client_id,
            &c.client_secret,
            &c.refresh_token,
            &c.data_centre,
            c.accounts_url.as_deref(),
            SETTING_PREFIX,
        )?;
        let http = crate::config::http_client(&c.timeout)?;
        Self::with_oauth(c, http.clone(), Arc::new(ZohoOAuth::new(http, oauth)))
    }

    /// Build with an OAuth client shared with other Zoho connectors (one refresh token, one
    /// request budget).
    pub fn with_oauth(
        c: ZohoCrmConfig,
        http: reqwest::Client,
        oauth: Arc<ZohoOAuth>,
    ) -> Result<Self, ConfigError> {
        let api_url = c
            .api_url
            .as_deref()
            .map(|u| check_url("api_url", u))
            .transpose()?;
        let default_api_url = config::api_url_for(&c.data_centre)
            .unwrap_or_else(|| "https://www.zohoapis.com".to_owned());
        if c.modules.is_empty() {
            return Err(invalid(
                "modules",
                "name at least one module, e.g. [\"Contacts\"]",
            ));
        }
        for m in &c.modules {
            if m.is_empty() || !m.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return Err(invalid(
                    "modules",
                    format!("`{m}` is not a module API name (letters, digits, _)"),
                ));
            }
        }
        for (setting, value) in [
            ("email_field", &c.email_field),
            ("opt_out_field", &c.opt_out_field),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(setting, "must not be empty"));
            }
        }
        let mut wanted: Vec<String> = vec!["id".into(), "Modified_Time".into()];
        let mut add = |f: &str| {
            if !wanted.iter().any(|w| w == f) {
                wanted.push(f.to_owned());
            }
        };
        add(&c.email_field);
        add(&c.opt_out_field);
        if let Some(l) = &c.language_field {
            add(l);
        }
        for rule in c.asserts.values() {
            add(rule.field());
        }
        for f in &c.fields {
            add(f);
        }
        // `id` is always returned; Zoho counts the rest against its limit of 50.
        if wanted.len() - 1 > MAX_FIELDS {
            return Err(invalid(
                "fields",
                format!(
                    "Zoho returns at most {MAX_FIELDS} fields per call; the mapping needs {}",
                    wanted.len() - 1
                ),
            ));
        }
        let overlap = parse_duration("overlap", &c.overlap)?;
        if !(1..=MAX_PER_PAGE).contains(&c.per_page) {
            return Err(invalid("per_page", format!("must be 1 to {MAX_PER_PAGE}")));
        }
        if c.max_concurrency == 0 {
            return Err(invalid("max_concurrency", "must be at least 1"));
        }
        let webhook = match c.webhook {
            None => None,
            Some(w) => {
                if w.token.is_empty() || w.token.len() > 50 {
                    return Err(invalid(
                        "webhook.token",
                        "must be 1 to 50 characters (Zoho echoes it in every callback)",
                    ));
                }
                let ttl = parse_duration("webhook.channel_ttl", &w.channel_ttl)?;
                if ttl < Duration::from_secs(120) {
                    return Err(invalid("webhook.channel_ttl", "must be at least 2m"));
                }
                Some(Webhook {
                    token: w.token,
                    notify_url: check_url("webhook.notify_url", &w.notify_url)?,
                    channel_id: w.channel_id,
                    ttl,
                    register: w.register,
                })
            }
        };
        let settings = Settings {
            api_url,
            default_api_url,
            fields_param: wanted.join(","),
            modules: c.modules,
            email_field: c.email_field,
            language_field: c.language_field,
            opt_out_field: c.opt_out_field,
            fields: c.fields,
            asserts: c.asserts,
            overlap: chrono::Duration::from_std(overlap)
                .map_err(|_| invalid("overlap", "is too long"))?,
            per_page: c.per_page,
            webhook,
            write_back: c.write_back,
        };
        Ok(Self {
            settings,
            http,
            oauth,
            gate: Semaphore::new(c.max_concurrency),
            echoes: std::sync::Mutex::new(HashMap::new()),
            channel: Mutex::new(None),
            credits: AtomicI64::new(-1),
        })
    }

    /// The OAuth client, to share with a Zoho Campaigns connector.
    pub fn oauth(&self) -> &Arc<ZohoOAuth> {
        &self.oauth
    }

    /// API credits left in Zoho's rolling 24 h window, once Zoho reports them (it sends the
    /// header after half the credits are used).
    pub fn credits_remaining(&self) -> Option<i64> {
        let c = self.credits.load(Ordering::Relaxed);
        (c >= 0).then_some(c)
    }

    fn setting(key: &str) -> String {
        format!("{SETTING_PREFIX}.{key}")
    }

    fn api_base(&self, token: &AccessToken) -> String {
        self.settings
            .api_url
            .clone()
            .or_else(|| token.api_domain.clone())
            .unwrap_or_else(|| self.settings.default_api_url.clone())
    }

    // -----------------------------------------------------------------------------------------
    // HTTP
    // -----------------------------------------------------------------------------------------

    /// One API call under `/crm/v8`, with one token refresh on `INVALID_TOKEN`.
    async fn call(&self, req: Request<'_>) -> Result<Reply, CallError> {
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
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
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

    // -----------------------------------------------------------------------------------------
    // Records
    // -----------------------------------------------------------------------------------------

    /// Turn one item of `data` into a record, or say why it cannot be one: its id, its
    /// `Modified_Time` (unix seconds) and the record. Public only for fuzzing.
    #[doc(hidden)]
    pub fn parse_record(
        &self,
        module: &str,
        index: usize,
        item: &Value,
    ) -> (
        Option<String>,
        Option<i64>,
        Result<CrmRecord, InvalidRecord>,
    ) {
        let s = &self.settings;
        let Some(obj) = item.as_object() else {
            return (
                None,
                None,
                Err(InvalidRecord {
                    location: format!("{module} (item {index} of the page)"),
                    reason: format!("not a JSON object but {}", type_name(item)),
                }),
            );
        };
        let id = match obj.get("id") {
            Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_owned(),
            Some(Value::Number(n)) if n.is_u64() => n.to_string(),
            other => {
                return (
                    None,
                    None,
                    Err(InvalidRecord {
                        location: format!("{module} (item {index} of the page)"),
                        reason: match other {
                            None | Some(Value::Null) => "missing id".into(),
                            Some(v) => format!("id is {}, expected text", type_name(v)),
                        },
                    }),
                );
            }
        };
        let location = format!("{module}/{id}");
        let bad = |reason: String| InvalidRecord {
            location: location.clone(),
            reason,
        };
        let modified_at = match obj.get("Modified_Time") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) => DateTime::parse_from_rfc3339(t.trim())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| bad(format!("Modified_Time `{t}` is not an ISO 8601 date-time"))),
            Some(v) => Err(bad(format!(
                "Modified_Time is {}, expected text",
                type_name(v)
            ))),
        };
        let modified_at = match modified_at {
            Ok(t) => t,
            Err(e) => return (Some(id), None, Err(e)),
        };
        let ts = modified_at.map(|t| t.timestamp());
        let result = (|| {
            let email = match obj.get(&s.email_field) {
                None | Some(Value::Null) => None,
                Some(Value::String(e)) => Some(e.trim().to_owned()).filter(|e| !e.is_empty()),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected text",
                        s.email_field,
                        type_name(v)
                    )));
                }
            };
            let Some(email) = email else {
                return Err(bad(format!("no email address (field `{}`)", s.email_field)));
            };
            let opted_out = match obj.get(&s.opt_out_field) {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(t)) => is_truthy(t),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected true or false",
                        s.opt_out_field,
                        type_name(v)
                    )));
                }
            };
            let language = match s.language_field.as_ref().and_then(|f| obj.get(f)) {
                None | Some(Value::Null) => None,
                Some(Value::String(l)) => Some(l.trim().to_owned()).filter(|l| !l.is_empty()),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected text",
                        s.language_field.as_deref().unwrap_or_default(),
                        type_name(v)
                    )));
                }
            };
            let asserted_lists = s
                .asserts
                .iter()
                .filter(|(_, rule)| asserts(rule, obj.get(rule.field())))
                .map(|(list, _)| list.clone())
                .collect();
            let mut fields = BTreeMap::new();
            let mapped = s
                .fields
                .iter()
                .chain(s.language_field.iter())
                .chain(std::iter::once(&s.opt_out_field))
                .chain(s.asserts.values().map(|r| match r {
                    AssertRule::Field(f) => f,
                    AssertRule::Value(v) => &v.field,
                }));
            for name in mapped {
                // The address itself never goes to the rules (they see only its domain).
                if *name == s.email_field {
                    continue;
                }
                if let Some(v) = obj.get(name.as_str()) {
                    fields.insert(name.clone(), v.clone());
                }
            }
            Ok(CrmRecord {
                record: RecordRef {
                    module: module.to_owned(),
                    id: id.clone(),
                },
                email: Some(email),
                language,
                opted_out,
                asserted_lists,
                fields,
                modified_at,
            })
        })();
        (Some(id), ts, result)
    }

    /// Was `(module, id)` at `ts` written by optinsync itself? Forgets the write once a later
    /// version of the record shows up. Modified_Time has whole seconds, so a person's edit
    /// in the same second as the write-back looks the same; an opt-out is therefore never
    /// taken for an echo unless optinsync wrote that opt-out (withdrawal wins).
    fn is_echo(&self, module: &str, id: &str, ts: Option<i64>, opted_out: bool) -> bool {
        let Some(ts) = ts else { return false };
        let key = format!("{module}/{id}");
        let mut echoes = match self.echoes.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        match echoes.get(&key).copied() {
            Some((written, wrote_opt_out)) if written == ts => wrote_opt_out || !opted_out,
            Some((written, _)) if written < ts => {
                echoes.remove(&key);
                false
            }
            _ => false,
        }
    }

    fn remember_echo(&self, module: &str, id: &str, ts: i64, opt_out: bool) {
        let mut echoes = match self.echoes.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Bounded: write-backs far outnumbering polls would only cost a re-read, never a loop.
        if echoes.len() >= 100_000 {
            echoes.clear();
        }
        echoes.insert(format!("{module}/{id}"), (ts, opt_out));
    }

    // -----------------------------------------------------------------------------------------
    // Change feed
    // -----------------------------------------------------------------------------------------

    /// One page of `m`'s current pass; updates `m` and fills `page`. Returns whether the pass
    /// of this module is complete.
    async fn next_page(
        &self,
        m: &mut ModuleState,
        per_page: u32,
        page: &mut ChangePage,
    ) -> ConnectorResult<bool> {
        let mut query: Vec<(&str, String)> = vec![
            ("fields", self.settings.fields_param.clone()),
            ("sort_by", "Modified_Time".into()),
            ("sort_order", "asc".into()),
            ("per_page", per_page.to_string()),
        ];
        let page_no = m.page.unwrap_or(1);
        match &m.page_token {
            Some(token) => query.push(("page_token", token.clone())),
            None => query.push(("page", page_no.to_string())),
        }
        let path = format!("/{}", m.module);
        let reply = self
            .call(Request {
                method: Method::GET,
                path: &path,
                query,
                if_modified_since: m.query_since.or(m.since),
                body: None,
            })
            .await;
        let value = match reply {
            Ok(Reply::Empty) => return Ok(true),
            Ok(Reply::Json(_, v)) => v,
            Err(CallError::Api { env, .. })
                if m.page_token.is_some()
                    && matches!(
                        env.code.as_str(),
                        "EXPIRED_VALUE" | "TOKEN_BOUND_DATA_MISMATCH" | "INVALID_DATA"
                    ) =>
            {
                // The page token expired (about 24 h) or no longer fits: go on from the latest
                // change seen; what was delivered is recognised and not repeated.
                tracing::warn!(module = %m.module, code = %env.code, "Zoho CRM page token no longer valid; resuming from the latest change seen");
                m.page_token = None;
                m.page = None;
                m.query_since = m.max_seen.or(m.query_since);
                return Ok(false);
            }
            Err(e) => return Err(self.crm_error(e, &m.module)),
        };
        let Some(data) = value.get("data").and_then(Value::as_array) else {
            return Err(ConnectorError::transient(format!(
                "Zoho CRM listed {} without a `data` array",
                m.module
            )));
        };
        let info = value.get("info");
        let more = info
            .and_then(|i| i.get("more_records"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let next_token = info
            .and_then(|i| i.get("next_page_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        for (index, item) in data.iter().enumerate() {
            let (id, ts, parsed) = self.parse_record(&m.module, index, item);
            if let Some(ts) = ts {
                let t = DateTime::from_timestamp(ts, 0);
                m.max_seen = m.max_seen.max(t);
            }
            if let (Some(id), Some(ts)) = (&id, ts) {
                let fp = fingerprint(&parsed);
                if m.seen.get(id) == Some(&(ts, fp)) {
                    continue; // already delivered (overlap of two passes)
                }
                m.seen.insert(id.clone(), (ts, fp));
                let opted_out = parsed.as_ref().is_ok_and(|r| r.opted_out);
                if self.is_echo(&m.module, id, Some(ts), opted_out) {
                    tracing::debug!(record = %format!("{}/{id}", m.module), "own write-back seen again; not CRM input");
                    continue;
                }
            }
            match parsed {
                Ok(rec) => page.records.push(rec),
                Err(bad) => page.invalid.push(bad),
            }
        }
        m.prune_seen(self.settings.overlap);
        if !more {
            return Ok(true);
        }
        if let Some(token) = next_token {
            m.page_token = Some(token);
            m.page = None;
        } else if (page_no + 1) * per_page <= DISCRETE_PAGE_LIMIT && m.page_token.is_none() {
            m.page = Some(page_no + 1);
        } else {
            // No token and `page` cannot reach further: restart from the latest change seen.
            m.page_token = None;
            m.page = None;
            m.query_since = m.max_seen.or(m.query_since);
        }
        Ok(false)
    }

    /// Records deleted in `m.module` since the deletion watermark (up to 2,000 per call).
    async fn deleted(&self, m: &mut ModuleState, out: &mut Vec<RecordRef>) -> ConnectorResult<()> {
        let path = format!("/{}/deleted", m.module);
        let mut max_seen = m.deleted_since;
        for page_no in 1..=(DISCRETE_PAGE_LIMIT / MAX_PER_PAGE) {
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: &path,
                    query: vec![
                        ("type", "all".into()),
                        ("page", page_no.to_string()),
                        ("per_page", MAX_PER_PAGE.to_string()),
                    ],
                    if_modified_since: m.deleted_since,
                    body: None,
                })
                .await
                .map_err(|e| self.crm_error(e, &m.module))?;
            let Reply::Json(_, value) = reply else { break };
            let data = value
                .get("data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in &data {
                let Some(id) = item.get("id").and_then(|v| match v {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }) else {
                    continue;
                };
                let at = item
                    .get("deleted_time")
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
                let ts = at.map(|t| t.timestamp()).unwrap_or(0);
                if m.deleted_seen.get(&id) == Some(&ts) {
                    continue;
                }
                m.deleted_seen.insert(id.clone(), ts);
                max_seen = max_seen.max(at);
                out.push(RecordRef {
                    module: m.module.clone(),
                    id,
                });
            }
            let more = value
                .get("info")
                .and_then(|i| i.get("more_records"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if !more {
                break;
            }
        }
        // Next time from the latest deletion seen (inclusive), minus the overlap.
        if let Some(latest) = max_seen {
            let next = latest - self.settings.overlap;
            m.deleted_since = Some(m.deleted_since.map_or(next, |d| d.max(next)));
        }
        if let Some(floor) = m.deleted_since {
            let floor = floor.timestamp();
            m.deleted_seen.retain(|_, ts| *ts >= floor);
        }
        Ok(())
    }

    /// A failed call as the engine should see it.
    /// Before the first sync: does every mapped field exist in every module? A typo in a field
    /// name would otherwise read as "nobody asked for anything". Needs the
    /// `ZohoCRM.settings.fields.READ` scope; without it the check is skipped and said so.
    async fn check_fields(&self) -> ConnectorResult<String> {
        let mapped: Vec<&str> = self
            .settings
            .fields_param
            .split(',')
            .filter(|f| *f != "id")
            .collect();
        for module in &self.settings.modules {
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: "/settings/fields",
                    query: vec![("module", module.clone())],
                    if_modified_since: None,
                    body: None,
                })
                .await;
            let names: std::collections::HashSet<String> = match reply {
                Ok(Reply::Json(_, v)) => v
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| {
                                f.get("api_name").and_then(Value::as_str).map(str::to_owned)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Ok(Reply::Empty) | Err(_) => {
                    return Ok("field names not checked (grant ZohoCRM.settings.fields.READ to check them)".into());
                }
            };
            if names.is_empty() {
                return Ok("field names not checked (empty field metadata)".into());
            }
            let missing: Vec<&str> = mapped
                .iter()
                .copied()
                .filter(|f| !names.contains(*f))
                .collect();
            if !missing.is_empty() {
                return Err(ConnectorError::Config {
                    setting: "connectors.crm (email_field, opt_out_field, language_field, fields, asserts)".into(),
                    message: format!(
                        "module {module} has no field named {}; use the field's API name (Setup > Developer Hub > APIs > API names)",
                        missing.join(", ")
                    ),
                });
            }
        }
        Ok(format!("{} mapped fields present", mapped.len()))
    }

    fn crm_error(&self, e: CallError, module: &str) -> ConnectorError {
        match e {
            CallError::Connector(c) => c,
            CallError::Api { status, env } => api_error(status, &env, module),
        }
    }

    /// Register or renew the notification channel when due.
    async fn maintain_channel(&self, w: &Webhook) -> ConnectorResult<()> {
        let mut channel = self.channel.lock().await;
        let now = tokio::time::Instant::now();
        if channel.is_some_and(|c| now < c.renew_at) {
            return Ok(());
        }
        let ttl = chrono::Duration::from_std(w.ttl).unwrap_or(chrono::Duration::days(1));
        let expiry = Utc::now() + ttl;
        let body = json!({ "watch": [{
            "channel_id": w.channel_id,
            "events": self.settings.modules.iter().map(|m| format!("{m}.all")).collect::<Vec<_>>(),
            "channel_expiry": zoho_time(expiry),
            "token": w.token,
            "notify_url": w.notify_url,
        }]});
        // A channel this process has not registered yet may still exist from before: POST,
        // and PUT if Zoho refuses; a known one is renewed with PUT, and re-created if gone.
        let order = if channel.is_some() {
            [Method::PUT, Method::POST]
        } else {
            [Method::POST, Method::PUT]
        };
        let mut last_error = None;
        for method in order {
            let reply = self
                .call(Request {
                    method: method.clone(),
                    path: "/actions/watch",
                    query: vec![],
                    if_modified_since: None,
                    body: Some(&body),
                })
                .await;
            let outcome = match reply {
                Ok(Reply::Json(_, v)) => {
                    let item = v.get("watch").and_then(|w| w.get(0));
                    let code = item
                        .and_then(|i| i.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if code == "SUCCESS" {
                        Ok(())
                    } else {
                        Err(ConnectorError::permanent(format!(
                            "Zoho CRM refused the notification channel: {}",
                            item.map(Value::to_string).unwrap_or_default()
                        )))
                    }
                }
                Ok(Reply::Empty) => Err(ConnectorError::permanent(
                    "Zoho CRM answered the channel registration with no content",
                )),
                Err(e) => Err(self.crm_error(e, "actions/watch")),
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(channel_id = w.channel_id, expiry = %zoho_time(expiry), method = %method, "Zoho CRM notification channel registered");
                    *channel = Some(Channel {
                        renew_at: now + w.ttl / 2,
                    });
                    return Ok(());
                }
                Err(e @ ConnectorError::Transient { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| ConnectorError::permanent("notification channel not registered")))
    }

    /// The fields written for one record.
    fn write_back_item(&self, id: &str, consent: &ConsentWriteBack) -> Option<Value> {
        let wb = &self.settings.write_back;
        let mut item = serde_json::Map::new();
        if consent.opt_out {
            let field = wb
                .opt_out_field
                .clone()
                .unwrap_or_else(|| self.settings.opt_out_field.clone());
            item.insert(field, Value::Bool(true));
        }
        if wb.gdpr {
            let confirmed = consent.state == "confirmed";
            let date = consent.at.format("%Y-%m-%d").to_string();
            let mut gdpr = serde_json::Map::new();
            let basis = if confirmed {
                Some(wb.basis_confirmed.clone())
            } else {
                wb.basis_withdrawn.clone()
            };
            if let Some(basis) = basis {
                gdpr.insert(wb.basis_field.clone(), Value::String(basis));
            }
            gdpr.insert(
                wb.contact_through_email_field.clone(),
                Value::Bool(confirmed),
            );
            if confirmed {
                gdpr.insert(wb.consent_date_field.clone(), Value::String(date.clone()));
            }
            gdpr.insert(
                wb.consent_remarks_field.clone(),
                Value::String(remarks(&consent.state, &date, &consent.list)),
            );
            item.insert(wb.consent_field.clone(), Value::Object(gdpr));
        }
        if item.is_empty() {
            return None;
        }
        item.insert("id".into(), Value::String(id.to_owned()));
        Some(Value::Object(item))
    }
}

/// `Consent_Remarks`: a short human-readable reason.
fn remarks(state: &str, date: &str, list: &str) -> String {
    let what = match state {
        "confirmed" => "DOI confirmed".to_owned(),
        "withdrawn" => "Unsubscribed".to_owned(),
        "lapsed" => "Consent lapsed (not confirmed in time)".to_owned(),
        "bounced" => "Address bounced".to_owned(),
        "complained" => "Spam complaint".to_owned(),
        "erased" => "Erased on request".to_owned(),
        other => format!("Consent {other}"),
    };
    format!("{what} {date} via optinsync (list {list})")
}

#[async_trait]
impl CrmConnector for ZohoCrm {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        let mut state = CursorState::decode(cursor, &self.settings.modules)?;
        if state.pos >= state.modules.len() {
            state.pos = 0; // a new round
        }
        let mut page = ChangePage {
            records: Vec::new(),
            invalid: Vec::new(),
            deleted: Vec::new(),
            next_cursor: None,
            has_more: false,
        };
        let now = Utc::now();
        let pos = state.pos;
        let Some(m) = state.modules.get_mut(pos) else {
            return Err(ConnectorError::Config {
                setting: Self::setting("modules"),
                message: "no module to sync".into(),
            });
        };
        let per_page = *m.per_page.get_or_insert_with(|| {
            u32::try_from(limit.max(1))
                .unwrap_or(MAX_PER_PAGE)
                .min(self.settings.per_page)
        });
        let started = *m.pass_started.get_or_insert(now);
        let done = self.next_page(m, per_page, &mut page).await?;
        if done {
            let first_pass = m.since.is_none();
            if first_pass {
                // Deletions before the first full sync concern no known record.
                m.deleted_since = Some(started - self.settings.overlap);
            } else {
                self.deleted(m, &mut page.deleted).await?;
            }
            m.finish_pass(started, self.settings.overlap);
            state.pos += 1;
        }
        page.has_more = state.pos < state.modules.len();
        page.next_cursor = Some(state.encode());
        Ok(page)
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        if !self.settings.modules.contains(&record.module) {
            return Ok(None);
        }
        if record.id.is_empty() || !record.id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConnectorError::InvalidInput {
                message: format!("`{}` is not a Zoho record id", record.id),
            });
        }
        let path = format!("/{}/{}", record.module, record.id);
        let reply = self
            .call(Request {
                method: Method::GET,
                path: &path,
                query: vec![],
                if_modified_since: None,
                body: None,
            })
            .await;
        let value = match reply {
            Ok(Reply::Empty) => return Ok(None),
            Ok(Reply::Json(_, v)) => v,
            Err(CallError::Api { status, env })
                if status == StatusCode::NOT_FOUND
                    || (status == StatusCode::BAD_REQUEST && env.code == "INVALID_DATA") =>
            {
                return Ok(None);
            }
            Err(e) => return Err(self.crm_error(e, &record.module)),
        };
        let Some(item) = value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
        else {
            return Ok(None);
        };
        match self.parse_record(&record.module, 0, item).2 {
            Ok(rec) => Ok(Some(rec)),
            Err(bad) => Err(ConnectorError::InvalidInput {
                message: format!("{}: {}", bad.location, bad.reason),
            }),
        }
    }

    fn parse_webhook(
        &self,
        _headers: &[(String, String)],
        body: &[u8],
    ) -> ConnectorResult<WebhookEvent> {
        let Some(w) = &self.settings.webhook else {
            return Err(ConnectorError::InvalidInput {
                message: "Zoho CRM webhooks are not configured ([connectors.crm.webhook])".into(),
            });
        };
        let parsed: Notification =
            serde_json::from_slice(body).map_err(|e| ConnectorError::InvalidInput {
                message: format!("not a Zoho CRM notification: {e}"),
            })?;
        let given = parsed.token.unwrap_or_default();
        if !webhook_token_matches(&w.token, &given) {
            return Err(ConnectorError::InvalidInput {
                message: "Zoho CRM notification with a wrong channel token; refused".into(),
            });
        }
        let channel = match &parsed.channel_id {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.trim().to_owned(),
            _ => String::new(),
        };
        if channel != w.channel_id.to_string() {
            return Err(ConnectorError::InvalidInput {
                message: format!("Zoho CRM notification for unknown channel `{channel}`"),
            });
        }
        let Some(module) = self
            .settings
            .modules
            .iter()
            .find(|m| parsed.module.as_deref() == Some(m.as_str()))
        else {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "Zoho CRM notification for module `{}`, which is not synced",
                    parsed.module.unwrap_or_default()
                ),
            });
        };
        let mut records = Vec::with_capacity(parsed.ids.len());
        for id in &parsed.ids {
            let id = match id {
                Value::String(s) => s.trim().to_owned(),
                Value::Number(n) if n.is_u64() => n.to_string(),
                _ => String::new(),
            };
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ConnectorError::InvalidInput {
                    message: "Zoho CRM notification with an invalid record id".into(),
                });
            }
            records.push(RecordRef {
                module: module.clone(),
                id,
            });
        }
        // Deletions are read from `/deleted` by the poll; a deleted record cannot be fetched.
        if parsed.operation.as_deref() == Some("delete") || records.is_empty() {
            return Ok(WebhookEvent::Ignored);
        }
        Ok(WebhookEvent::Changed(records))
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        if !self.settings.write_back.enabled {
            return Ok(());
        }
        let mut by_module: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for r in &consent.records {
            if let Some(item) = self.write_back_item(&r.id, consent) {
                by_module.entry(r.module.as_str()).or_default().push(item);
            }
        }
        let mut failures = Vec::new();
        let mut transient = false;
        for (module, items) in by_module {
            let path = format!("/{module}");
            for batch in items.chunks(MAX_UPDATE_BATCH) {
                let body = json!({ "data": batch, "trigger": [] });
                let reply = self
                    .call(Request {
                        method: Method::PUT,
                        path: &path,
                        query: vec![],
                        if_modified_since: None,
                        body: Some(&body),
                    })
                    .await
                    .map_err(|e| self.crm_error(e, module))?;
                let Reply::Json(status, value) = reply else {
                    return Err(ConnectorError::transient(format!(
                        "Zoho CRM answered the update of {module} with no content"
                    )));
                };
                let results = value
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (i, sent) in batch.iter().enumerate() {
                    let id = sent.get("id").and_then(Value::as_str).unwrap_or_default();
                    let result = results.get(i);
                    let code = result
                        .and_then(|r| r.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or("NO_RESULT");
                    if code == "SUCCESS" {
                        let modified = result
                            .and_then(|r| r.get("details"))
                            .and_then(|d| d.get("Modified_Time"))
                            .and_then(Value::as_str)
                            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
                        if let Some(t) = modified {
                            self.remember_echo(module, id, t.timestamp(), consent.opt_out);
                        }
                        tracing::info!(record = %format!("{module}/{id}"), list = %consent.list, state = %consent.state, opt_out = consent.opt_out, "consent written back to Zoho CRM");
                        continue;
                    }
                    let env = result.map(Envelope::of).unwrap_or_default();
                    tracing::warn!(record = %format!("{module}/{id}"), code = %env.code, status = status.as_u16(), details = %env.details, "Zoho CRM refused the consent write-back for a record");
                    if matches!(code, "INTERNAL_ERROR" | "NO_RESULT" | "TOO_MANY_REQUESTS") {
                        transient = true;
                    }
                    failures.push(format!("{module}/{id}: {code} {}", env.message));
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let message = format!("Zoho CRM write-back failed for {}", failures.join("; "));
        Err(if transient {
            ConnectorError::transient(message)
        } else {
            ConnectorError::permanent(message)
        })
    }

    async fn health(&self) -> ConnectorResult<Health> {
        let token = self.oauth.token().await?;
        let mut readable = Vec::new();
        for module in &self.settings.modules {
            let path = format!("/{module}");
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: &path,
                    query: vec![
                        ("fields", self.settings.fields_param.clone()),
                        ("per_page", "1".into()),
                    ],
                    if_modified_since: None,
                    body: None,
                })
                .await;
            match reply.map_err(|e| self.crm_error(e, module)) {
                Ok(_) => readable.push(module.as_str()),
                Err(e @ ConnectorError::Config { .. }) => return Err(e),
                Err(e) => {
                    return Ok(Health {
                        ok: false,
                        detail: format!("Zoho CRM module {module}: {e}"),
                    });
                }
            }
        }
        let fields = self.check_fields().await?;
        Ok(Health {
            ok: true,
            detail: format!(
                "Zoho CRM at {}: token ok, modules {} readable, {fields}",
                self.api_base(&token),
                readable.join(", ")
            ),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_batch: MAX_UPDATE_BATCH,
            calls_per_minute: None,
        }
    }

    async fn maintain(&self) -> ConnectorResult<()> {
        match &self.settings.webhook {
            Some(w) if w.register => self.maintain_channel(w).await,
            _ => Ok(()),
        }
    }
}

/// Zoho's error envelope: `{"code", "details", "message", "status"}`.
#[derive(Debug, Default, Clone)]
struct Envelope {
    code: String,
    message: String,
    details: Value,
}

impl Envelope {
    fn of(v: &Value) -> Self {
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

/// A notification callback (Zoho's notification API); unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct Notification {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    channel_id: Option<Value>,
    #[serde(default)]
    module: Option<String>,
    #[serde(default)]
    ids: Vec<Value>,
    #[serde(default)]
    operation: Option<String>,
}

struct Request<'a> {
    method: Method,
    path: &'a str,
    query: Vec<(&'a str, String)>,
    if_modified_since: Option<DateTime<Utc>>,
    body: Option<&'a Value>,
}

enum Reply {
    Empty,
    Json(StatusCode, Value),
}

#[derive(Debug)]
enum CallError {
    Connector(ConnectorError),
    Api { status: StatusCode, env: Envelope },
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Cursor
// ---------------------------------------------------------------------------------------------

/// The opaque cursor: where each module's sync stands.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct CursorState {
    kind: String,
    /// Index of the module the current round is at.
    pos: usize,
    modules: Vec<ModuleState>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct ModuleState {
    module: String,
    /// `If-Modified-Since` of the current pass; `None` = full sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
    /// Within a pass: restart point when pages could not go further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass_started: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_seen: Option<DateTime<Utc>>,
    /// Delivered record id → `Modified_Time` (unix s) and a fingerprint of what was
    /// delivered (an edit within the same second still differs); kept near the watermark.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    seen: BTreeMap<String, (i64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    deleted_seen: BTreeMap<String, i64>,
}

impl ModuleState {
    fn new(module: &str) -> Self {
        Self {
            module: module.to_owned(),
            ..Self::default()
        }
    }

    /// The watermark the next pass would get if this one ended now.
    fn floor(&self, overlap: chrono::Duration) -> Option<DateTime<Utc>> {
        let started = self.pass_started?;
        let next = self.max_seen.map_or(started, |m| m.min(started)) - overlap;
        Some(self.since.map_or(next, |s| s.max(next)))
    }

    /// Forget delivered records that the next pass cannot return again.
    fn prune_seen(&mut self, overlap: chrono::Duration) {
        if let Some(floor) = self.floor(overlap) {
            let floor = floor.timestamp();
            self.seen.retain(|_, (ts, _)| *ts >= floor);
        }
    }

    fn finish_pass(&mut self, started: DateTime<Utc>, overlap: chrono::Duration) {
        self.pass_started = Some(started);
        let next = if self.max_seen.is_none() && self.since.is_some() {
            self.since // nothing changed: keep the watermark
        } else {
            self.floor(overlap)
        };
        self.prune_seen(overlap);
        self.since = next;
        self.query_since = None;
        self.pass_started = None;
        self.per_page = None;
        self.page = None;
        self.page_token = None;
        self.max_seen = None;
    }
}

impl CursorState {
    fn decode(cursor: Option<&Cursor>, modules: &[String]) -> ConnectorResult<Self> {
        let mut state = match cursor {
            None => Self::default(),
            Some(c) => {
                let value: Value =
                    serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                        message: format!("not a Zoho CRM cursor: {e}"),
                    })?;
                if value.get("kind").and_then(Value::as_str) == Some(CURSOR_KIND) {
                    serde_json::from_value(value).map_err(|e| ConnectorError::InvalidInput {
                        message: format!("not a Zoho CRM cursor: {e}"),
                    })?
                } else {
                    tracing::warn!(
                        "stored CRM cursor belongs to another connector kind; starting a full Zoho CRM sync"
                    );
                    Self::default()
                }
            }
        };
        state.kind = CURSOR_KIND.to_owned();
        let same = state.modules.len() == modules.len()
            && state
                .modules
                .iter()
                .zip(modules)
                .all(|(s, m)| &s.module == m);
        if !same {
            let mut old: HashMap<String, ModuleState> = state
                .modules
                .drain(..)
                .map(|m| (m.module.clone(), m))
                .collect();
            state.modules = modules
                .iter()
                .map(|m| old.remove(m).unwrap_or_else(|| ModuleState::new(m)))
                .collect();
            state.pos = 0;
        }
        Ok(state)
    }

    fn encode(&self) -> Cursor {
        // Serialising plain maps and strings cannot fail; an empty cursor would only mean a
        // full sync, never a lost change.
        Cursor(serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A stable (FNV-1a) digest of what a record says to the engine.
fn fingerprint(parsed: &Result<CrmRecord, InvalidRecord>) -> u64 {
    let text = match parsed {
        Ok(r) => serde_json::to_string(&(
            &r.email,
            &r.language,
            r.opted_out,
            &r.asserted_lists,
            &r.fields,
        ))
        .unwrap_or_default(),
        Err(bad) => bad.reason.clone(),
    };
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Zoho's date-time form: ISO 8601 with an explicit offset.
pub fn zoho_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// CRM exports spell booleans many ways; an unknown spelling counts as false.
fn is_truthy(value: &str) -> bool {
    let value = value.trim();
    ["true", "yes", "y", "1", "x"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
}

fn asserts(rule: &AssertRule, value: Option<&Value>) -> bool {
    match (rule, value) {
        (_, None | Some(Value::Null)) => false,
        (AssertRule::Field(_), Some(Value::Bool(b))) => *b,
        (AssertRule::Field(_), Some(Value::String(s))) => is_truthy(s),
        (AssertRule::Field(_), Some(Value::Number(n))) => n.as_f64().is_some_and(|n| n != 0.0),
        (AssertRule::Field(_), Some(_)) => false,
        (AssertRule::Value(want), Some(Value::String(s))) => s.trim() == want.value,
        (AssertRule::Value(want), Some(Value::Array(items))) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| s.trim() == want.value)),
        (AssertRule::Value(want), Some(Value::Bool(b))) => b.to_string() == want.value,
        (AssertRule::Value(want), Some(Value::Number(n))) => n.to_string() == want.value,
        (AssertRule::Value(_), Some(_)) => false,
    }
}

/// Whether a notification's channel token is the configured one, in time independent of
/// where or whether they differ and of the given token's length: subtle's slice `ct_eq`
/// returns early on a length mismatch (security review F13), so fixed-size SHA-256 digests
/// are compared instead, as the admin API's bearer check does. An empty token never matches.
fn webhook_token_matches(expected: &str, given: &str) -> bool {
    let expected: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    bool::from(digest.ct_eq(&expected)) && !given.is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn f13_webhook_token_compare_is_length_independent() {
        let expected = "s3cr3t-channel-token";
        assert!(webhook_token_matches(expected, expected));
        for wrong in [
            "",
            "s3cr3t",                        // a prefix (shorter)
            "s3cr3t-channel-toke",           // one character short
            "s3cr3t-channel-token-and-more", // longer, with the right token as its prefix
            "s3cr3t-channel-tokem",          // same length, last character differs
            "S3cr3t-channel-token",          // same length, first character differs
        ] {
            assert!(
                !webhook_token_matches(expected, wrong),
                "`{wrong}` must not match"
            );
        }
        // The parser refuses a wrong-length token the same way as a wrong token.
        let crm = crm(
            "[webhook]\nnotify_url = \"https://example.org/webhooks/crm\"\ntoken = \"s3cr3t-channel-token\"\nchannel_id = 1",
        );
        let body = |token: &str| {
            json!({"channel_id": 1, "token": token, "module": "Contacts",
                "ids": ["41"], "operation": "update"})
            .to_string()
        };
        assert!(matches!(
            crm.parse_webhook(&[], body(expected).as_bytes()),
            Ok(WebhookEvent::Changed(ids)) if ids.len() == 1
        ));
        for token in ["s3cr3t", "s3cr3t-channel-token-and-more"] {
            let err = crm.parse_webhook(&[], body(token).as_bytes()).unwrap_err();
            assert!(
                matches!(&err, ConnectorError::InvalidInput { message } if message.contains("wrong channel token")),
                "{token}: {err:?}"
            );
        }
    }

    fn crm(extra: &str) -> ZohoCrm {
        let settings: toml::Table = toml::from_str(&format!(
            "client_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n\
             accounts_url = \"http://127.0.0.1:9\"\napi_url = \"http://127.0.0.1:9\"\n\
             language_field = \"Language\"\nfields = [\"First_Name\"]\n{extra}\n\
             [asserts]\nnewsletter = \"Newsletter\"\nevents = {{ field = \"Interests\", value = \"Events\" }}\n"
        ))
        .unwrap();
        ZohoCrm::from_config(settings, Path::new(".")).unwrap()
    }

    #[test]
    fn record_mapping() {
        let crm = crm("");
        let item = json!({"id": "41", "Email": " Ann@Example.com ", "Language": "es",
            "Email_Opt_Out": false, "Newsletter": true, "Interests": ["Sports", "Events"],
            "First_Name": "Ann", "Modified_Time": "2026-11-27T10:00:00+02:00"});
        let (id, ts, rec) = crm.parse_record("Contacts", 0, &item);
        let rec = rec.unwrap();
        assert_eq!(id.as_deref(), Some("41"));
        assert_eq!(ts, Some(1_795_766_400));
        assert_eq!(rec.email.as_deref(), Some("Ann@Example.com"));
        assert_eq!(rec.language.as_deref(), Some("es"));
        assert_eq!(rec.asserted_lists, ["events", "newsletter"]);
        assert!(
            !rec.fields.contains_key("Email"),
            "no raw address for the rules"
        );
        assert_eq!(rec.fields["First_Name"], json!("Ann"));
    }

    #[test]
    fn malformed_records_are_invalid_with_their_id() {
        let crm = crm("");
        let cases = [
            (json!({"Email": "a@example.com"}), "missing id"),
            (json!({"id": true}), "id is a boolean"),
            (json!({"id": "1", "Email": 7}), "field `Email` is a number"),
            (
                json!({"id": "2", "Email": "a@x.org", "Email_Opt_Out": [1]}),
                "expected true or false",
            ),
            (
                json!({"id": "3", "Email": "a@x.org", "Modified_Time": "yesterday"}),
                "ISO 8601",
            ),
            (json!({"id": "4", "Email": null}), "no email address"),
            (json!("just text"), "not a JSON object"),
        ];
        for (item, reason) in cases {
            let (_, _, got) = crm.parse_record("Leads", 3, &item);
            let bad = got.unwrap_err();
            assert!(bad.reason.contains(reason), "{item}: {}", bad.reason);
            if let Some(id) = item.get("id").and_then(Value::as_str) {
                assert_eq!(bad.location, format!("Leads/{id}"));
            }
        }
    }

    #[test]
    fn unknown_setting_is_named() {
        let settings: toml::Table = toml::from_str(
            "client_id = \"a\"\nclient_secret = \"b\"\nrefresh_token = \"c\"\nmodles = []",
        )
        .unwrap();
        let err = ZohoCrm::from_config(settings, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("unknown field `modles`"), "{err}");
    }

    #[test]
    fn data_centre_picks_accounts_server() {
        let settings: toml::Table = toml::from_str(
            "client_id = \"a\"\nclient_secret = \"b\"\nrefresh_token = \"c\"\ndata_centre = \"eu\"",
        )
        .unwrap();
        let crm = ZohoCrm::from_config(settings, Path::new(".")).unwrap();
        assert_eq!(
            crm.oauth.settings().token_url,
            "https://accounts.zoho.eu/oauth/v2/token"
        );
        let settings: toml::Table = toml::from_str(
            "client_id = \"a\"\nclient_secret = \"b\"\nrefresh_token = \"c\"\ndata_centre = \"mars\"",
        )
        .unwrap();
        let err = ZohoCrm::from_config(settings, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("data_centre"), "{err}");
    }

    #[test]
    fn write_back_fields() {
        let zoho = crm("");
        let wb = ConsentWriteBack {
            records: vec![],
            email: "a@example.com".into(),
            list: "newsletter".into(),
            state: "confirmed".into(),
            opt_out: false,
            at: DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            ledger_seq: 1,
        };
        let item = zoho.write_back_item("7", &wb).unwrap();
        assert_eq!(
            item,
            json!({"id": "7", "Data_Processing_Basis_Details": {
                "Data_Processing_Basis": "Obtained", "Contact_Through_Email": true,
                "Consent_Date": "2026-11-27",
                "Consent_Remarks": "DOI confirmed 2026-11-27 via optinsync (list newsletter)"}})
        );
        let out = ConsentWriteBack {
            state: "withdrawn".into(),
            opt_out: true,
            ..wb
        };
        let item = zoho.write_back_item("7", &out).unwrap();
        assert_eq!(item["Email_Opt_Out"], json!(true));
        assert_eq!(
            item["Data_Processing_Basis_Details"]["Contact_Through_Email"],
            json!(false)
        );
        let plain = crm("[write_back]\ngdpr = false");
        let confirmed = ConsentWriteBack {
            state: "confirmed".into(),
            opt_out: false,
            ..out
        };
        assert_eq!(plain.write_back_item("7", &confirmed), None);
    }

    #[test]
    fn cursor_from_another_connector_starts_afresh() {
        let modules = vec!["Contacts".to_owned()];
        let s = CursorState::decode(Some(&Cursor(r#"{"rows":{}}"#.into())), &modules).unwrap();
        assert_eq!(s.modules.len(), 1);
        assert!(s.modules[0].since.is_none());
        assert!(CursorState::decode(Some(&Cursor("nope".into())), &modules).is_err());
    }
}
