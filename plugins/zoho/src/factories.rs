//! The Zoho connectors' factories, by the `kind` a config section names.

use std::sync::Arc;

use async_trait::async_trait;
use optinsync_plugin_api::{BuildContext, Built, ConnectorFactory, Role, Settings, SettingsError};

use crate::{ZohoCampaigns, ZohoCrm};

/// `kind = "zoho-crm"` and `"zoho-campaigns"`.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    vec![Arc::new(Crm), Arc::new(Campaigns)]
}

struct Crm;
struct Campaigns;

#[async_trait]
impl ConnectorFactory for Crm {
    fn kind(&self) -> &'static str {
        "zoho-crm"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Crm]
    }
    async fn build(&self, settings: Settings, _ctx: &BuildContext) -> Result<Built, SettingsError> {
        Ok(Built::Crm(Arc::new(ZohoCrm::new(settings.parse()?)?)))
    }
}

#[async_trait]
impl ConnectorFactory for Campaigns {
    fn kind(&self) -> &'static str {
        "zoho-campaigns"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Campaigns]
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        let mut zoho = ZohoCampaigns::new(settings.parse()?)?;
        if let Some(quota) = &ctx.quota {
            zoho = zoho.with_quota_ledger(Arc::clone(quota));
        }
        if let Some(marks) = &ctx.marks {
            zoho = zoho.with_shared_marks(Arc::clone(marks));
        }
        // Budgets survive restarts: a restart must not reset Zoho's rate limits. Unreadable
        // state is dropped: fresh budgets are safe, just slower to learn.
        if let Some(state) = &ctx.state
            && let Err(e) = zoho.import_state(state)
        {
            tracing::warn!(error = %e, "Zoho Campaigns state not restored; starting with fresh budgets");
        }
        Ok(Built::Campaigns(Arc::new(zoho)))
    }
}
