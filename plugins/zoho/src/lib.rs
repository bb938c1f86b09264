//! Zoho connectors for optinsync: Zoho CRM and Zoho Campaigns, sharing one OAuth client.
//!
//! * [`ZohoCrm`] ([`crm`]) — Zoho CRM as the [`optinsync_plugin_api::CrmConnector`]:
//!   incremental sync of the configured modules (default Contacts and Leads) by
//!   `Modified_Time` with `page_token` pagination past 2,000 records, deleted records,
//!   Notification API webhooks, and consent write-back.
//! * [`ZohoCampaigns`] ([`campaigns`]) — Zoho Campaigns as the
//!   [`optinsync_plugin_api::CampaignsConnector`]: subscribe and remove on mapped lists, each
//!   with its DOI mode (optinsync or Zoho sends the confirmation), unsubscribes and bounces
//!   read back, and per-endpoint call budgets that keep clear of Zoho's 30-minute lock,
//!   optionally shared by several instances through a [`optinsync_plugin_api::QuotaLedger`].
//! * [`ZohoOAuth`] ([`oauth`]) — the OAuth client (self-client refresh-token grant); handed to
//!   both connectors (`with_oauth`), it keeps one refresh token within Zoho's limit of token
//!   requests.
//! * [`config`] — the CRM connector's settings and what both connectors share (data centres,
//!   OAuth settings, durations); the Campaigns settings are in [`campaigns::config`].
//!
//! The daemon builds them through [`factories`] (kinds `zoho-crm`, `zoho-campaigns`); the
//! campaigns factory hands the connector the shared quota ledger and marks and its saved state
//! from the build context. Tests build them with `from_config(settings, base_dir)` from a
//! `config.toml` table. Unknown keys are rejected so typos do not pass silently. Every endpoint is
//! configurable (`accounts_url`, and `api_url` or `campaigns_url`), so the connectors run
//! against local fakes (`optinsync_testkit::zoho`, `optinsync_testkit::zoho_campaigns`).

pub mod campaigns;
pub mod config;
pub mod crm;
mod factories;
pub mod oauth;

pub use campaigns::ZohoCampaigns;
pub use config::ZohoCrmConfig;
pub use crm::ZohoCrm;
pub use factories::factories;
pub use oauth::ZohoOAuth;

/// A `Retry-After` given in seconds (Zoho does not send the HTTP-date form).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
}

/// An error and its sources on one line (reqwest hides the useful part in `source()`).
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
