//! `[connectors.campaigns]` with `kind = "zoho-campaigns"`, parsed strictly.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Who sends the confirmation mail for a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoiMode {
    /// optinsync sends the confirmation mail and keeps the proof; the Campaigns list must have
    /// its signup form **off** (private), so Zoho adds confirmed contacts without a second mail.
    #[default]
    Optinsync,
    /// Zoho sends its own confirmation: the Campaigns list must have its signup form **on**
    /// (public); `listsubscribe` makes the contact pending until they click Zoho's mail.
    Zoho,
}

impl DoiMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optinsync => "optinsync",
            Self::Zoho => "zoho",
        }
    }
}

/// `[connectors.campaigns.lists.NAME]`: one optinsync list on one Campaigns mailing list.
/// `NAME` is the list's `campaigns_list` setting in `[[lists]]` (default: its `id`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMapping {
    /// The Campaigns `listkey` (Contacts → Manage lists → list → "List key", or
    /// `getmailinglists`).
    pub listkey: String,
    #[serde(default)]
    pub doi: DoiMode,
}

/// `[connectors.campaigns]` with `kind = "zoho-campaigns"`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoCampaignsConfig {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// `com`, `eu`, `in`, `com.au`, `jp`, `com.cn`; picks the accounts server and the
    /// Campaigns host unless `accounts_url` / `campaigns_url` are set.
    #[serde(default = "default_dc")]
    pub data_centre: String,
    /// Accounts server, e.g. `https://accounts.zoho.eu` (overrides `data_centre`).
    #[serde(default)]
    pub accounts_url: Option<String>,
    /// Campaigns host, full URL, e.g. `https://campaigns.zoho.eu`. Default: from
    /// `data_centre` (`https://campaigns.zoho.com`).
    #[serde(default)]
    pub campaigns_url: Option<String>,
    /// optinsync list → Campaigns list.
    pub lists: BTreeMap<String, ListMapping>,
    /// Campaigns field (display name, e.g. `"First Name"`) → contact field it is filled from
    /// (a CRM field name as the CRM connector reports it, e.g. `"First_Name"`).
    /// `Contact Email` is always sent.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, String>,
    /// Campaigns field that receives the contact's language (`en`, `es`, ...); none by default.
    #[serde(default)]
    pub language_field: Option<String>,
    /// `source` shown in Campaigns for contacts optinsync adds.
    #[serde(default = "default_source")]
    pub source: String,
    /// How often `getlistsubscribers` is read for unsubscribes and bounces (its quota is 500
    /// calls per 5 minutes for the whole org).
    #[serde(default = "default_status_interval")]
    pub status_interval: String,
    /// Subscribers per `getlistsubscribers` page.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Longest a call waits in-process for its quota; a longer wait is handed back to the
    /// engine as a retry at the time the quota allows (stay under the outbox lease, 5 min).
    #[serde(default = "default_max_wait")]
    pub max_wait: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Calls in flight at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// Override the documented quotas, per endpoint: `listsubscribe = ["500/1m", "12500/1h"]`.
    /// Only lower them (e.g. when another tool uses the same org's quota).
    #[serde(default)]
    pub limits: BTreeMap<String, Vec<String>>,
    /// In-body codes that mean "this API is locked" (the lock-out answer is not documented;
    /// HTTP 429 and messages saying "locked" are recognised too).
    #[serde(default = "default_lock_codes")]
    pub lock_codes: Vec<String>,
    /// Tests only: multiply every quota window and lock by this (e.g. `0.01`: a minute lasts
    /// 0.6 s), to run quota scenarios against a fake in seconds. Must be in (0, 1].
    #[serde(default = "default_scale")]
    pub time_scale: f64,
}

fn default_dc() -> String {
    "com".into()
}
fn default_fields() -> BTreeMap<String, String> {
    [("First Name", "First_Name"), ("Last Name", "Last_Name")]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}
fn default_source() -> String {
    "optinsync".into()
}
fn default_status_interval() -> String {
    "5m".into()
}
fn default_page_size() -> u32 {
    200
}
fn default_max_wait() -> String {
    "2m".into()
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_concurrency() -> usize {
    4
}
fn default_lock_codes() -> Vec<String> {
    vec!["429".into()]
}
fn default_scale() -> f64 {
    1.0
}

impl std::fmt::Debug for ZohoCampaignsConfig {
    /// Secrets print as `<redacted>`; the rest is abridged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZohoCampaignsConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &crate::config::REDACTED)
            .field("refresh_token", &crate::config::REDACTED)
            .field("data_centre", &self.data_centre)
            .field("accounts_url", &self.accounts_url)
            .field("campaigns_url", &self.campaigns_url)
            .field("lists", &self.lists)
            .finish_non_exhaustive()
    }
}
