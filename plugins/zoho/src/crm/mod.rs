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
//!
//! # Parts
//!
//! `http` makes one API call and maps Zoho's errors; `feed` pages through a module and its
//! deletions, and `cursor` says where each module stands; `records` turns Zoho's JSON into
//! records; `writeback` writes consent back and recognises its echo; `webhook` keeps the
//! notification channel and checks callbacks; `connector` is the [`CrmConnector`] impl that
//! puts them together. This file holds the settings, the state and the construction.
//!
//! [`CrmConnector`]: optinsync_plugin_api::CrmConnector
//! [`CrmConnector::changes`]: optinsync_plugin_api::CrmConnector::changes
//! [`ChangePage::deleted`]: optinsync_plugin_api::ChangePage::deleted
//! [`ChangePage::invalid`]: optinsync_plugin_api::ChangePage::invalid
//! [`ConnectorError::Transient`]: optinsync_plugin_api::ConnectorError::Transient
//! [`ConnectorError::Config`]: optinsync_plugin_api::ConnectorError::Config

mod connector;
mod cursor;
mod feed;
mod http;
mod records;
mod upsert;
mod webhook;
mod writeback;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Semaphore};

use crate::config::{
    self, AssertRule, OAuthSettings, SettingsError, WriteBackConfig, ZohoCrmConfig, check_url,
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
    /// Where website signups are created (`signup_module`); none: not at all.
    signup_module: Option<String>,
}

/// When the notification channel must be renewed.
#[derive(Debug, Clone, Copy)]
struct Channel {
    renew_at: tokio::time::Instant,
}

/// A [`CrmConnector`](optinsync_plugin_api::CrmConnector) for Zoho CRM. See the module docs
/// for the change feed.
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
    pub fn from_config(settings: toml::Table, _base_dir: &Path) -> Result<Self, SettingsError> {
        Self::new(parse_settings(settings)?)
    }

    /// Build from already-parsed settings.
    pub fn new(c: ZohoCrmConfig) -> Result<Self, SettingsError> {
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
    ) -> Result<Self, SettingsError> {
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
        let named = c.modules.iter().map(|m| ("modules", m));
        for (setting, m) in named.chain(c.signup_module.iter().map(|m| ("signup_module", m))) {
            if m.is_empty() || !m.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return Err(invalid(
                    setting,
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
            signup_module: c.signup_module,
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
}

/// Zoho's date-time form: ISO 8601 with an explicit offset.
pub fn zoho_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A connector with a typical mapping (language, a field, two asserted lists), for the
    /// unit tests of every part.
    pub(super) fn crm(extra: &str) -> ZohoCrm {
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
}
