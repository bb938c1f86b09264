//! `optinsync connector check`: the conformance kit (`optinsync_conformance`) over the
//! configured connectors. Builds them as the daemon does, without a store (no saved state, no
//! shared budgets), and prints one line per check.

use std::path::Path;

use optinsync_conformance::{Options, check_campaigns, check_crm, check_mail};
use optinsync_engine::connectors::{self, SharedServices};

use super::load_config;
use crate::{Failure, registry};

pub async fn connector_check(
    path: &Path,
    only: Option<&str>,
    write: bool,
    address: String,
) -> Result<(), Failure> {
    if let Some(name) = only
        && !["crm", "campaigns", "mail"].contains(&name)
    {
        return Err(Failure::Config(anyhow::anyhow!(
            "--connector must be crm, campaigns or mail, not `{name}`"
        )));
    }
    let config = load_config(path)?;
    let built = connectors::build(
        &config,
        &registry::factories(),
        &SharedServices::default(),
        |_| None,
    )
    .await
    .map_err(|e| Failure::Config(e.into()))?;
    let options = Options {
        write,
        address,
        ..Options::default()
    };
    let wants = |name: &str| only.is_none_or(|o| o == name);
    let mut checks = Vec::new();
    if wants("crm") {
        checks.extend(check_crm(built.crm.as_ref(), &options).await);
    }
    if wants("campaigns") {
        match config.config.lists.first() {
            Some(list) => checks.extend(
                check_campaigns(built.campaigns.as_ref(), list.campaigns_list(), &options).await,
            ),
            None => {
                return Err(Failure::Config(anyhow::anyhow!(
                    "the campaigns checks need a configured list"
                )));
            }
        }
    }
    if wants("mail") {
        checks.extend(check_mail(built.mail.as_ref(), &options).await);
    }
    built.crm.shutdown().await;
    built.campaigns.shutdown().await;
    built.mail.shutdown().await;
    let failed = checks
        .iter()
        .filter(|c| matches!(c.outcome, optinsync_conformance::Outcome::Fail(_)))
        .count();
    let skipped = checks
        .iter()
        .filter(|c| matches!(c.outcome, optinsync_conformance::Outcome::Skipped(_)))
        .count();
    for c in &checks {
        println!("{}", c.line());
    }
    println!(
        "{} passed, {failed} failed, {skipped} skipped",
        checks.len() - failed - skipped
    );
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} conformance check(s) failed"
        )));
    }
    Ok(())
}
