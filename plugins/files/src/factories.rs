//! The file connectors' factories, by the `kind` a config section names.

use std::sync::Arc;

use async_trait::async_trait;
use optinsync_plugin_api::{BuildContext, Built, ConnectorFactory, Role, Settings, SettingsError};

use crate::{CsvCrm, EmlDir, JsonlList};

/// `kind = "csv"`, `"jsonl"`, `"eml"`.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    vec![Arc::new(Csv), Arc::new(Jsonl), Arc::new(Eml)]
}

struct Csv;
struct Jsonl;
struct Eml;

#[async_trait]
impl ConnectorFactory for Csv {
    fn kind(&self) -> &'static str {
        "csv"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Crm]
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        Ok(Built::Crm(Arc::new(CsvCrm::new(
            settings.parse()?,
            &ctx.base_dir,
        )?)))
    }
}

#[async_trait]
impl ConnectorFactory for Jsonl {
    fn kind(&self) -> &'static str {
        "jsonl"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Campaigns]
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        Ok(Built::Campaigns(Arc::new(JsonlList::new(
            &settings.parse()?,
            &ctx.base_dir,
        )?)))
    }
}

#[async_trait]
impl ConnectorFactory for Eml {
    fn kind(&self) -> &'static str {
        "eml"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Mail]
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        Ok(Built::Mail(Arc::new(EmlDir::new(
            &settings.parse()?,
            &ctx.base_dir,
        )?)))
    }
}
