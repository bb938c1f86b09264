//! Builds connectors by `kind` from `config.toml`. Connectors are compiled in; adding one
//! means adding a match arm here (ARCHITECTURE.md, code map).

use std::sync::Arc;

use optinsync_engine::config::{ConfigError, ConnectorSection, LoadedConfig};
use optinsync_engine::engine::Connectors;
use optinsync_plugin_api::{
    CampaignsConnector, CrmConnector, MailTransport, QuotaLedger, SharedMarks,
};
use optinsync_plugin_files::{CsvCrm, EmlDir, JsonlList};
use optinsync_plugin_zoho::{ZohoCampaigns, ZohoCrm};

pub const CRM_KINDS: &[&str] = &["csv", "zoho-crm"];
pub const CAMPAIGNS_KINDS: &[&str] = &["jsonl", "zoho-campaigns"];
pub const MAIL_KINDS: &[&str] = &["eml", "smtp"];

fn unknown(config: &LoadedConfig, section: &str, kind: &str, known: &[&str]) -> ConfigError {
    config.connector_error(
        section,
        &format!(
            "unknown connector kind `{kind}`; this build knows: {}",
            known.join(", ")
        ),
    )
}

/// `shared`: state shared with the other instances on the same database — vendor quota
/// budgets and connector bookkeeping sets (`None`: each instance keeps its own).
pub fn build(
    config: &LoadedConfig,
    shared: Option<(Arc<dyn QuotaLedger>, Arc<dyn SharedMarks>)>,
) -> Result<Connectors, ConfigError> {
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
        "zoho-crm" => Arc::new(
            ZohoCrm::from_config(settings(&c.crm), base)
                .map_err(|e| config.connector_error("crm", &e.to_string()))?,
        ),
        other => return Err(unknown(config, "crm", other, CRM_KINDS)),
    };
    let campaigns: Arc<dyn CampaignsConnector> = match c.campaigns.kind.as_str() {
        "jsonl" => Arc::new(
            JsonlList::from_config(settings(&c.campaigns), base).map_err(wrap("campaigns"))?,
        ),
        "zoho-campaigns" => {
            let zoho = ZohoCampaigns::from_config(settings(&c.campaigns), base)
                .map_err(|e| config.connector_error("campaigns", &e.to_string()))?;
            Arc::new(match shared {
                Some((ledger, marks)) => zoho.with_quota_ledger(ledger).with_shared_marks(marks),
                None => zoho,
            })
        }
        other => return Err(unknown(config, "campaigns", other, CAMPAIGNS_KINDS)),
    };
    let mail: Arc<dyn MailTransport> = match c.mail.kind.as_str() {
        "eml" => Arc::new(EmlDir::from_config(settings(&c.mail), base).map_err(wrap("mail"))?),
        "smtp" => Arc::new(
            optinsync_plugin_smtp::SmtpTransport::from_config(settings(&c.mail), base)
                .map_err(|e| config.connector_error("mail", &e.to_string()))?,
        ),
        other => return Err(unknown(config, "mail", other, MAIL_KINDS)),
    };
    Ok(Connectors {
        crm,
        campaigns,
        mail,
    })
}
