//! Zoho connectors for optinsync.
//!
//! * [`ZohoCrm`] — Zoho CRM as the [`optinsync_plugin_api::CrmConnector`]: incremental sync
//!   of Contacts and Leads by `Modified_Time` with `page_token` pagination past 2,000 records,
//!   deleted records, Notification API webhooks, and consent write-back.
//! * [`ZohoOAuth`] — the OAuth client (self-client refresh-token grant) shared by the Zoho
//!   connectors, so that one refresh token's request budget is respected.
//!
//! Every connector is built with `from_config(settings, base_dir)` from its `config.toml`
//! table; unknown keys are rejected so typos do not pass silently. Every endpoint is
//! configurable (`accounts_url`, `api_url`), so the connectors run against local fakes
//! (`optinsync_testkit::zoho`).

pub mod campaigns;
pub mod config;
pub mod crm;
pub mod oauth;

pub use campaigns::ZohoCampaigns;
pub use config::{ConfigError, ZohoCrmConfig};
pub use crm::ZohoCrm;
pub use oauth::ZohoOAuth;

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
