//! Local connectors for trying optinsync with no outside service.
//!
//! Each connector stands in for a real system with plain files, so the whole double-opt-in
//! flow can be run (and inspected) on one machine:
//!
//! * [`CsvCrm`] — a CSV file plays the CRM ([`optinsync_plugin_api::CrmConnector`]);
//!   its webhook can require a shared secret header ([`WEBHOOK_SECRET_HEADER`]).
//!   Changes are found by row content, write-backs are appended to a JSONL file; the CSV
//!   itself is never modified.
//! * [`JsonlList`] — a JSONL file plays the Campaigns tool's lists
//!   ([`optinsync_plugin_api::CampaignsConnector`]); a second JSONL file lets a user simulate
//!   unsubscribes, bounces and complaints made inside that tool.
//! * [`EmlDir`] — a folder of RFC 5322 `.eml` files plays the mail transport
//!   ([`optinsync_plugin_api::MailTransport`]); open them with any mail client.
//!
//! The daemon builds them through [`factories`] (kinds `csv`, `jsonl`, `eml`); tests and tools
//! may use `from_config(settings, base_dir)`, where `settings` is the connector's TOML table.
//! Relative paths are resolved against `base_dir` (the directory of the configuration file).
//! Unknown keys are rejected so typos do not pass silently.

mod csv_crm;
mod eml_dir;
mod factories;
mod fsutil;
mod jsonl_list;

pub use csv_crm::{CsvCrm, CsvCrmConfig, WEBHOOK_SECRET_HEADER, WebhookSecret};
pub use eml_dir::{EmlDir, EmlDirConfig};
pub use factories::factories;
pub use jsonl_list::{JsonlList, JsonlListConfig};
use optinsync_plugin_api::SettingsError;

/// Deserialize a connector's settings table; the error names the key.
fn parse_settings<T: serde::de::DeserializeOwned>(
    settings: toml::Table,
) -> Result<T, SettingsError> {
    optinsync_plugin_api::Settings::from_serialize(&settings)?.parse()
}

/// What is wrong with a JSON text, without quoting any of it (serde's messages quote the
/// offending value, which may be an address or a forged log line).
pub(crate) fn json_error(err: &serde_json::Error) -> String {
    let category = match err.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "unexpected value or type",
        serde_json::error::Category::Eof => "unexpected end of input",
    };
    format!("{category} at line {} column {}", err.line(), err.column())
}
