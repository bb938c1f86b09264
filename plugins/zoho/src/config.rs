//! Settings of the Zoho connectors, parsed strictly (`deny_unknown_fields`) from the
//! connector's `config.toml` table. Secrets arrive already resolved: the engine replaces
//! `"${VAR}"` strings before the connector sees them.

use std::collections::BTreeMap;
use std::time::Duration;

pub use optinsync_plugin_api::SettingsError;
use serde::Deserialize;

pub(crate) fn invalid(setting: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::invalid(setting.to_owned(), message.into())
}

/// The Zoho data centres and their hosts (Zoho's OAuth documentation, "multi-DC").
pub const DATA_CENTRES: &[&str] = &["com", "eu", "in", "com.au", "jp", "ca", "sa", "com.cn"];

/// Accounts server of a data centre.
pub fn accounts_url_for(dc: &str) -> Option<String> {
    match dc {
        "ca" => Some("https://accounts.zohocloud.ca".to_owned()),
        dc if DATA_CENTRES.contains(&dc) => Some(format!("https://accounts.zoho.{dc}")),
        _ => None,
    }
}

/// Default CRM API domain of a data centre (used only when the token response has none).
pub fn api_url_for(dc: &str) -> Option<String> {
    DATA_CENTRES
        .contains(&dc)
        .then(|| format!("https://www.zohoapis.{dc}"))
}

/// OAuth settings shared by every Zoho connector (self-client refresh-token grant).
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Full URL of the token endpoint, e.g. `https://accounts.zoho.eu/oauth/v2/token`.
    pub token_url: String,
    /// Prefix of the setting names used in error messages, e.g. `connectors.crm`.
    pub setting_prefix: String,
}

/// What `Debug` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for OAuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSettings")
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("refresh_token", &REDACTED)
            .field("token_url", &self.token_url)
            .field("setting_prefix", &self.setting_prefix)
            .finish()
    }
}

impl OAuthSettings {
    /// Build from the usual keys, checking them; `setting_prefix` names the section.
    pub fn new(
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
        data_centre: &str,
        accounts_url: Option<&str>,
        setting_prefix: &str,
    ) -> Result<Self, SettingsError> {
        for (setting, value) in [
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("refresh_token", refresh_token),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(setting, "must not be empty"));
            }
        }
        let accounts = match accounts_url {
            Some(url) => check_url("accounts_url", url)?,
            None => accounts_url_for(data_centre).ok_or_else(|| {
                invalid(
                    "data_centre",
                    format!(
                        "unknown data centre `{data_centre}`; expected one of {} (or set accounts_url)",
                        DATA_CENTRES.join(", ")
                    ),
                )
            })?,
        };
        Ok(Self {
            client_id: client_id.trim().to_owned(),
            client_secret: client_secret.trim().to_owned(),
            refresh_token: refresh_token.trim().to_owned(),
            token_url: format!("{accounts}/oauth/v2/token"),
            setting_prefix: setting_prefix.to_owned(),
        })
    }

    /// `connectors.crm.refresh_token` for `refresh_token`.
    pub fn setting(&self, key: &str) -> String {
        format!("{}.{key}", self.setting_prefix)
    }
}

/// An `http://` or `https://` URL without a trailing slash.
pub(crate) fn check_url(setting: &str, url: &str) -> Result<String, SettingsError> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(invalid(
            setting,
            format!(
                "`{url}` must be a full URL starting with https:// (or http:// for a local test server)"
            ),
        ));
    }
    Ok(url.to_owned())
}

/// `"60s"`, `"10m"`, `"3h"`, `"1d"`, `"2w"`; a bare number is seconds.
/// The HTTP client of a Zoho connector, from its `timeout` setting (one call's limit).
pub(crate) fn http_client(timeout_setting: &str) -> Result<reqwest::Client, SettingsError> {
    let timeout = parse_duration("timeout", timeout_setting)?;
    if timeout.is_zero() {
        return Err(invalid("timeout", "must be more than 0s"));
    }
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("optinsync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| invalid("timeout", format!("cannot build the HTTP client: {e}")))
}

/// Every connector reads durations the same way.
pub use optinsync_plugin_api::parse_duration;

/// What makes the CRM *assert* that a person asked for a list (mirrors the CSV connector's
/// `asserts`): either a field name whose truthy value asserts it (`true`, `"yes"`, ...), or a
/// field and the value it must have (a multi-select picklist must contain it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AssertRule {
    Field(String),
    Value(AssertValue),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertValue {
    pub field: String,
    pub value: String,
}

impl AssertRule {
    pub fn field(&self) -> &str {
        match self {
            Self::Field(f) => f,
            Self::Value(v) => &v.field,
        }
    }
}

/// `[connectors.crm]` with `kind = "zoho-crm"`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoCrmConfig {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// `com`, `eu`, `in`, `com.au`, `jp`, `ca`, `sa` or `com.cn`; ignored when `accounts_url`
    /// is set.
    #[serde(default = "default_dc")]
    pub data_centre: String,
    /// Accounts server, e.g. `https://accounts.zoho.eu` (overrides `data_centre`).
    #[serde(default)]
    pub accounts_url: Option<String>,
    /// CRM API domain, e.g. `https://www.zohoapis.eu`. Default: the `api_domain` of the token
    /// response (the authoritative host for the org).
    #[serde(default)]
    pub api_url: Option<String>,
    /// Modules to sync (API names).
    #[serde(default = "default_modules")]
    pub modules: Vec<String>,
    #[serde(default = "default_email_field")]
    pub email_field: String,
    /// Field holding a language tag (`en`, `es`, ...); none by default.
    #[serde(default)]
    pub language_field: Option<String>,
    #[serde(default = "default_opt_out_field")]
    pub opt_out_field: String,
    /// Other fields read and handed to the rules as `contact.fields`.
    #[serde(default)]
    pub fields: Vec<String>,
    /// List id → field (or `{ field, value }`) meaning "this person asked for this list".
    #[serde(default)]
    pub asserts: BTreeMap<String, AssertRule>,
    /// How far each incremental pass reaches back before the last change seen, so that no
    /// edit falls between two passes (clock skew, edits during a pass).
    #[serde(default = "default_overlap")]
    pub overlap: String,
    /// Records per list call (Zoho's maximum is 200).
    #[serde(default = "default_per_page")]
    pub per_page: u32,
    /// Timeout of one HTTP call.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Calls in flight at once (Zoho's per-app concurrency limit is 5 to 25 by edition).
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    #[serde(default)]
    pub write_back: WriteBackConfig,
    /// Module in which people who sign up on the website are created (`upsert` by address,
    /// with the consent fields), e.g. `"Contacts"`. Unset: they live in optinsync only.
    #[serde(default)]
    pub signup_module: Option<String>,
}

impl std::fmt::Debug for ZohoCrmConfig {
    /// Secrets print as `<redacted>`; the rest is abridged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZohoCrmConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("refresh_token", &REDACTED)
            .field("data_centre", &self.data_centre)
            .field("accounts_url", &self.accounts_url)
            .field("api_url", &self.api_url)
            .field("modules", &self.modules)
            .field("webhook", &self.webhook)
            .field("write_back", &self.write_back)
            .finish_non_exhaustive()
    }
}

/// `[connectors.crm.webhook]`: a Notification API channel (`/actions/watch`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Secret echoed by Zoho in every callback (at most 50 characters).
    pub token: String,
    /// Where Zoho posts callbacks: optinsync's `{public_url}/webhooks/crm`.
    pub notify_url: String,
    /// A number of your choice identifying the channel.
    pub channel_id: u64,
    /// Channel lifetime asked for at each (re)registration; renewed when half has passed.
    #[serde(default = "default_channel_ttl")]
    pub channel_ttl: String,
    /// Register and renew the channel from the daemon (`false`: manage it yourself).
    #[serde(default = "default_true")]
    pub register: bool,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("token", &REDACTED)
            .field("notify_url", &self.notify_url)
            .field("channel_id", &self.channel_id)
            .field("channel_ttl", &self.channel_ttl)
            .field("register", &self.register)
            .finish()
    }
}

/// `[connectors.crm.write_back]`: what optinsync writes into the CRM after a consent change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBackConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Boolean field set to `true` when the person opted out (default: `opt_out_field`).
    /// optinsync never clears it: an opt-out made in the CRM always wins.
    #[serde(default)]
    pub opt_out_field: Option<String>,
    /// Write the GDPR consent sub-record (orgs without GDPR compliance mode: `false`).
    #[serde(default = "default_true")]
    pub gdpr: bool,
    #[serde(default = "default_consent_field")]
    pub consent_field: String,
    #[serde(default = "default_basis_field")]
    pub basis_field: String,
    /// `Data_Processing_Basis` written on a DOI confirmation.
    #[serde(default = "default_basis_confirmed")]
    pub basis_confirmed: String,
    /// `Data_Processing_Basis` written when consent ends; unset leaves the basis as it is.
    #[serde(default)]
    pub basis_withdrawn: Option<String>,
    #[serde(default = "default_contact_through_email_field")]
    pub contact_through_email_field: String,
    #[serde(default = "default_consent_date_field")]
    pub consent_date_field: String,
    #[serde(default = "default_consent_remarks_field")]
    pub consent_remarks_field: String,
}

impl Default for WriteBackConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            opt_out_field: None,
            gdpr: true,
            consent_field: default_consent_field(),
            basis_field: default_basis_field(),
            basis_confirmed: default_basis_confirmed(),
            basis_withdrawn: None,
            contact_through_email_field: default_contact_through_email_field(),
            consent_date_field: default_consent_date_field(),
            consent_remarks_field: default_consent_remarks_field(),
        }
    }
}

fn default_dc() -> String {
    "com".into()
}
fn default_modules() -> Vec<String> {
    vec!["Contacts".into(), "Leads".into()]
}
fn default_email_field() -> String {
    "Email".into()
}
fn default_opt_out_field() -> String {
    "Email_Opt_Out".into()
}
fn default_overlap() -> String {
    "60s".into()
}
fn default_per_page() -> u32 {
    200
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_concurrency() -> usize {
    5
}
fn default_channel_ttl() -> String {
    "1d".into()
}
fn default_true() -> bool {
    true
}
fn default_consent_field() -> String {
    "Data_Processing_Basis_Details".into()
}
fn default_basis_field() -> String {
    "Data_Processing_Basis".into()
}
fn default_basis_confirmed() -> String {
    "Obtained".into()
}
fn default_contact_through_email_field() -> String {
    "Contact_Through_Email".into()
}
fn default_consent_date_field() -> String {
    "Consent_Date".into()
}
fn default_consent_remarks_field() -> String {
    "Consent_Remarks".into()
}

/// Deserialize a connector's settings table, keeping serde's message on failure.
pub(crate) fn parse_settings<T: serde::de::DeserializeOwned>(
    settings: toml::Table,
) -> Result<T, SettingsError> {
    optinsync_plugin_api::Settings::from_serialize(&settings)?.parse()
}
