//! Builds connectors by `kind` from `config.toml`. Connectors are compiled in; adding one
//! means adding a match arm here (DESIGN.md §5).

use std::sync::Arc;

use optinsync_engine::config::{ConfigError, ConnectorSection, LoadedConfig};
use optinsync_engine::engine::Connectors;
use optinsync_plugin_api::{CampaignsConnector, CrmConnector, MailTransport};
use optinsync_plugin_files::{CsvCrm, EmlDir, JsonlList};

pub const CRM_KINDS: &[&str] = &["csv"];
pub const CAMPAIGNS_KINDS: &[&str] = &["jsonl"];
pub const MAIL_KINDS: &[&str] = &["eml"];

fn unknown(config: &LoadedConfig, section: &str, kind: &str, known: &[&str]) -> ConfigError {
    config.connector_error(
        section,
        &format!(
            "unknown connector kind `{kind}`; this build knows: {}",
            known.join(", ")
        ),
    )
}

pub fn build(config: &LoadedConfig) -> Result<Connectors, ConfigError> {
    let c = &config.config.connectors;
    let base = &config.base_dir;
    let wrap = |section: &'static str| {
        move |e: optinsync_plugin_files::ConfigError| {
            config.connector_error(section, &e.to_string())
        }
    };
    let settings = |s: &ConnectorSection| s.settings.clone();

    let crm: Arc<dyn CrmConnector> = match c.crm.kind.as_str() {
        "csv" => Arc::new(CsvCrm::from_config(settings(&c.crm), base).map_err(wrap("crm"))?),
        other => return Err(unknown(config, "crm", other, CRM_KINDS)),
    };
    let campaigns: Arc<dyn CampaignsConnector> = match c.campaigns.kind.as_str() {
        "jsonl" => Arc::new(
            JsonlList::from_config(settings(&c.campaigns), base).map_err(wrap("campaigns"))?,
        ),
        other => return Err(unknown(config, "campaigns", other, CAMPAIGNS_KINDS)),
    };
    let mail: Arc<dyn MailTransport> = match c.mail.kind.as_str() {
        "eml" => Arc::new(EmlDir::from_config(settings(&c.mail), base).map_err(wrap("mail"))?),
        other => return Err(unknown(config, "mail", other, MAIL_KINDS)),
    };
    Ok(Connectors {
        crm,
        campaigns,
        mail,
    })
}
