//! `[connectors.crm]` with `kind = "hubspot"`: parsed strictly (`deny_unknown_fields`), checked
//! at construction with errors naming the key. Secrets arrive already resolved: the engine's
//! config loader replaces `"${VAR}"` strings before the connector sees them.

use std::collections::BTreeMap;

use optinsync_plugin_api::SettingsError;
use serde::Deserialize;

/// What `Debug` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// `legalBasis` values HubSpot's communication-preferences API accepts.
pub const LEGAL_BASES: &[&str] = &[
    "CONSENT_WITH_NOTICE",
    "LEGITIMATE_INTEREST_CLIENT",
    "LEGITIMATE_INTEREST_OTHER",
    "LEGITIMATE_INTEREST_PQL",
    "NON_GDPR",
    "PERFORMANCE_OF_CONTRACT",
    "PROCESS_AND_STORE",
];

/// The connector's settings table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpotConfig {
    /// A private-app (static auth) token or account service key: `Bearer` as given.
    #[serde(default)]
    pub token: Option<String>,
    /// OAuth app credentials and a refresh token (instead of `token`).
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// API base URL (overridable for a local fake).
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// List id → property (`"newsletter_optin"`) or `{ property, value }` meaning "this person
    /// asked for this list" (consent asserted, not proven).
    #[serde(default)]
    pub asserts: BTreeMap<String, AssertRule>,
    /// Other properties read and handed to the rules as `contact.fields`.
    #[serde(default)]
    pub fields: Vec<String>,
    /// A property holding a language tag (`en`, `es`, ...).
    #[serde(default)]
    pub language_property: Option<String>,
    /// The "unsubscribed from all email" property.
    #[serde(default = "default_opt_out_property")]
    pub opt_out_property: String,
    /// An opt-out of the subscription type of any list in `write_back.lists` (the
    /// `hs_email_optout_<id>` property) counts as an opt-out too.
    #[serde(default = "default_true")]
    pub opt_out_subscriptions: bool,
    /// How far each incremental pass reaches back before the latest change seen (search
    /// index lag and clock skew).
    #[serde(default = "default_overlap")]
    pub overlap: String,
    /// Records per list or search call (1 to 100: HubSpot's list endpoint takes at most 100,
    /// and search 100 or 200 depending on the version of its documentation).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Timeout of one HTTP call.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Requests per rolling 10 seconds (HubSpot's lowest tier: 100).
    #[serde(default = "default_requests_per_10s")]
    pub requests_per_10s: u32,
    /// Search requests per second (HubSpot: 4 in older docs, 5 in newer).
    #[serde(default = "default_searches_per_second")]
    pub searches_per_second: u32,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    #[serde(default)]
    pub write_back: WriteBackConfig,
}

impl std::fmt::Debug for HubSpotConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSpotConfig")
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| REDACTED),
            )
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| REDACTED),
            )
            .field("api_url", &self.api_url)
            .field("webhook", &self.webhook)
            .field("write_back", &self.write_back)
            .finish_non_exhaustive()
    }
}

/// What makes the CRM assert that a person asked for a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AssertRule {
    /// A property whose truthy value (`true`, `yes`, `1`) asserts it (a single checkbox).
    Property(String),
    /// A property and the value it must have (an enumeration, or one of a multiple
    /// checkbox's `;`-separated values).
    Value(AssertValue),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertValue {
    pub property: String,
    pub value: String,
}

impl AssertRule {
    pub fn property(&self) -> &str {
        match self {
            Self::Property(p) => p,
            Self::Value(v) => &v.property,
        }
    }
}

/// `[connectors.crm.webhook]`: HubSpot app webhooks, verified with the v3 signature.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The app's client secret (HubSpot signs deliveries with it).
    pub client_secret: String,
    /// The target URL as configured in the HubSpot app, e.g.
    /// `https://consent.example.org/webhooks/crm` (HubSpot signs the full URI it called).
    pub url: String,
    /// Deliveries whose `X-HubSpot-Request-Timestamp` is older than this are refused.
    #[serde(default = "default_max_age")]
    pub max_age: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("client_secret", &REDACTED)
            .field("url", &self.url)
            .field("max_age", &self.max_age)
            .finish()
    }
}

/// `[connectors.crm.write_back]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBackConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Also unsubscribe the address from all email when the engine says the opt-out flag
    /// must be set (final in HubSpot).
    #[serde(default)]
    pub unsubscribe_all: bool,
    /// optinsync list id → what is written for it.
    #[serde(default)]
    pub lists: BTreeMap<String, ListWriteBack>,
}

impl Default for WriteBackConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            unsubscribe_all: false,
            lists: BTreeMap::new(),
        }
    }
}

/// `[connectors.crm.write_back.lists.<list>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListWriteBack {
    /// The HubSpot subscription type id (Settings > Marketing > Email > Subscription types, or
    /// `GET /communication-preferences/v3/definitions`).
    #[serde(default)]
    pub subscription_id: Option<IdValue>,
    /// `legalBasis` of every status change.
    #[serde(default = "default_legal_basis")]
    pub legal_basis: String,
    /// A contact property that receives the consent state (`confirmed`, `withdrawn`, ...).
    #[serde(default)]
    pub consent_property: Option<String>,
}

/// An id written as a TOML integer or string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdValue {
    Number(u64),
    Text(String),
}

impl IdValue {
    pub fn as_digits(&self) -> Option<String> {
        match self {
            Self::Number(n) => Some(n.to_string()),
            Self::Text(t) => {
                let t = t.trim();
                (!t.is_empty() && t.chars().all(|c| c.is_ascii_digit())).then(|| t.to_owned())
            }
        }
    }
}

fn default_api_url() -> String {
    "https://api.hubapi.com".into()
}
fn default_opt_out_property() -> String {
    "hs_email_optout".into()
}
fn default_true() -> bool {
    true
}
fn default_overlap() -> String {
    "2m".into()
}
fn default_page_size() -> u32 {
    100
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_requests_per_10s() -> u32 {
    100
}
fn default_searches_per_second() -> u32 {
    4
}
fn default_max_age() -> String {
    "5m".into()
}
fn default_legal_basis() -> String {
    "CONSENT_WITH_NOTICE".into()
}

pub(crate) fn invalid(setting: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::invalid(setting.to_owned(), message.into())
}

/// An `http://` or `https://` URL without a trailing slash.
pub(crate) fn check_url(setting: &str, url: &str) -> Result<String, SettingsError> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 9 {
        return Err(invalid(
            setting,
            format!(
                "`{url}` must be a full URL starting with https:// (or http:// for a local test server)"
            ),
        ));
    }
    Ok(url.to_owned())
}

/// Every connector reads durations the same way.
pub use optinsync_plugin_api::parse_duration;

/// A HubSpot property's internal name: lower-case letters, digits and `_`.
pub(crate) fn check_property(setting: &str, name: &str) -> Result<(), SettingsError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            setting,
            format!(
                "`{name}` is not a property's internal name (lower-case letters, digits and _; Settings > Properties > the property > internal name)"
            ),
        ))
    }
}
