//! `[connectors.campaigns]` with `kind = "mailchimp"`, parsed strictly.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The concurrency Mailchimp allows per API key ("10 simultaneous connections"): the default
/// and the hard cap of `max_concurrency`.
pub const MAX_CONNECTIONS: usize = 10;

/// Who sends the confirmation mail for a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoiMode {
    /// optinsync sends the confirmation mail and keeps the proof; confirmed people are put on
    /// the audience as `subscribed`. Such a list never gets `pending` from optinsync.
    #[default]
    Optinsync,
    /// Mailchimp sends its own confirmation: `request_doi` puts the person `pending`; the
    /// confirmation read back is weaker evidence. Such a list never gets `subscribed` from
    /// optinsync.
    Mailchimp,
}

impl DoiMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optinsync => "optinsync",
            Self::Mailchimp => "mailchimp",
        }
    }
}

/// `[connectors.campaigns.lists.NAME]`: one optinsync list on one Mailchimp audience.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMapping {
    /// The audience id (Audience → Settings → "Audience name and defaults" → Audience ID).
    pub audience: String,
    #[serde(default)]
    pub doi: DoiMode,
    /// Merge tag (`FNAME`) → contact field it is filled from (`First_Name`).
    #[serde(default)]
    pub merge_fields: BTreeMap<String, String>,
    /// A GDPR marketing permission id of the audience to enable for everyone optinsync puts on
    /// it (only for audiences with GDPR fields).
    #[serde(default)]
    pub marketing_permission: Option<String>,
}

/// `[connectors.campaigns.webhook]`: Mailchimp's audience webhook pointing at the daemon.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The daemon's public `/webhooks/campaigns` URL (`?secret=…` is appended).
    pub url: String,
    /// Sent as the `secret` query parameter and checked on every call (Mailchimp's audience
    /// webhooks are not signed).
    pub secret: String,
    /// Register the webhook on every mapped audience at start-up (`maintain`), if missing.
    #[serde(default)]
    pub register: bool,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("register", &self.register)
            .finish()
    }
}

/// `[connectors.campaigns]` with `kind = "mailchimp"`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailchimpConfig {
    /// The API key, with its data-centre suffix (`…-us6`).
    pub api_key: String,
    /// The API root; default `https://<dc>.api.mailchimp.com/3.0` from the key's suffix.
    #[serde(default)]
    pub api_url: Option<String>,
    /// optinsync list → Mailchimp audience.
    pub lists: BTreeMap<String, ListMapping>,
    #[serde(default)]
    pub webhook: Option<WebhookSettings>,
    /// How often unsubscribes, bounces (and, for `doi = "mailchimp"`, confirmations) are read.
    #[serde(default = "default_status_interval")]
    pub status_interval: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Requests in flight at once (Mailchimp allows 10 per key, shared with every other
    /// integration using the key).
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// Members per listing page (at most 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// How long to wait after Mailchimp answers 429 (it names no wait).
    #[serde(default = "default_throttle_wait")]
    pub throttle_wait: String,
    /// What a GDPR erasure does to the member: `unsubscribe` (the default: the address stays
    /// in the audience as unsubscribed, so no later import can re-add it) or
    /// `delete_permanently` (Mailchimp's `delete-permanent`: the member's data is gone, and
    /// Mailchimp refuses to add the address again through the API — only the person's own
    /// signup form can).
    #[serde(default)]
    pub erasure: Erasure,
}

/// [`MailchimpConfig::erasure`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Erasure {
    #[default]
    Unsubscribe,
    DeletePermanently,
}

impl std::fmt::Debug for MailchimpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailchimpConfig")
            .field("api_key", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("lists", &self.lists)
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

fn default_status_interval() -> String {
    "5m".into()
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_concurrency() -> usize {
    MAX_CONNECTIONS
}
fn default_page_size() -> u32 {
    1000
}
fn default_throttle_wait() -> String {
    "2s".into()
}

/// Every connector reads durations the same way.
pub use optinsync_plugin_api::parse_duration;

/// The data centre of an API key (`us6` of `…-us6`).
pub fn data_centre(api_key: &str) -> Option<&str> {
    let (_, dc) = api_key.trim().rsplit_once('-')?;
    (!dc.is_empty() && dc.chars().all(|c| c.is_ascii_alphanumeric())).then_some(dc)
}
