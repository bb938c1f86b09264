//! The commands behind the CLI. Start-up goes through [`boot`], the same path for every
//! command, so `run`, `sync --once` and the inspection commands see the same configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use optinsync_engine::config::LoadedConfig;
use optinsync_engine::connectors::{self, SharedServices};
use optinsync_engine::email;
use optinsync_engine::engine::{Engine, StoreReads, saved_connector_state};
use optinsync_engine::rules::RuleSet;
use optinsync_engine::store::{self, Store};

use crate::{Failure, registry};

mod campaign;
mod connector;
mod daemon;
mod inspect;
mod outbox;
mod rules;
mod suppression;

pub use campaign::{campaign_plan, campaign_report, campaign_resume};
pub use connector::connector_check;
pub use daemon::{run, sync_once};
pub use inspect::{contact_show, erase, import_existing, ledger_verify, migrate, status};
pub use outbox::{outbox_drop, outbox_failed, outbox_retry};
pub use rules::{rules_check, rules_simulate};
pub use suppression::{suppression_lift, suppression_list, suppression_show};

pub(crate) fn load_config(path: &Path) -> Result<LoadedConfig, Failure> {
    LoadedConfig::load(path).map_err(|e| Failure::Config(e.into()))
}

pub(crate) async fn open_store(config: &LoadedConfig) -> Result<Arc<dyn Store>, Failure> {
    let store = store::open(&config.config.store.url)
        .await
        .context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    Ok(store)
}

/// Config, store, rules, connectors: everything a command that acts needs.
pub(crate) async fn boot(path: &Path) -> Result<Arc<Engine>, Failure> {
    let config = load_config(path)?;
    let rules =
        RuleSet::load_checked(&config.config.rules.dir).map_err(|e| Failure::Config(e.into()))?;
    // On PostgreSQL several instances share the vendors' quotas (and the connectors' own
    // bookkeeping) through the store; SQLite has one instance per file (`instance_lock`),
    // which keeps them in memory.
    let quota = optinsync_engine::quota::SharedQuota::new();
    let shared = !config.config.store.url.starts_with("sqlite://");
    let services = if shared {
        SharedServices {
            quota: Some(Arc::clone(&quota) as Arc<dyn optinsync_plugin_api::QuotaLedger>),
            marks: Some(Arc::clone(&quota) as Arc<dyn optinsync_plugin_api::SharedMarks>),
        }
    } else {
        SharedServices::default()
    };
    let store = open_store(&config).await?;
    quota.attach(Arc::clone(&store));
    // What each connector exported before the last stop (quota budgets survive restarts: a
    // restart must not reset a vendor's rate limits).
    let mut states = std::collections::HashMap::new();
    for role in optinsync_plugin_api::Role::ALL {
        let state = saved_connector_state(store.as_ref(), role)
            .await
            .context("reading saved connector state")?;
        states.insert(role, state);
    }
    let connectors = connectors::build(&config, &registry::factories(), &services, |role| {
        states.remove(&role).flatten()
    })
    .await
    .map_err(|e| Failure::Config(e.into()))?;
    let engine = Arc::new(Engine::new(Arc::new(config), store, connectors, rules));
    // A key that signed mailed (never-expiring) unsubscribe links must stay configured.
    use optinsync_engine::signing_keys::SigningKeysError;
    match engine.check_signing_keys().await {
        Ok(()) => {}
        Err(e @ (SigningKeysError::Dropped { .. } | SigningKeysError::Corrupt(_))) => {
            return Err(Failure::Config(anyhow::anyhow!("{}: {e}", path.display())));
        }
        Err(e) => {
            return Err(Failure::Runtime(
                anyhow::Error::new(e).context("checking the token keys"),
            ));
        }
    }
    engine
        .canonicalise_stored_addresses()
        .await
        .context("canonicalising stored addresses")?;
    Ok(engine)
}

/// Vector-style start-up healthchecks: report, and refuse to start on a broken connector.
async fn healthchecks(engine: &Engine) -> Result<(), Failure> {
    let c = &engine.connectors();
    let checks = [
        ("crm", retry_transient("crm", || c.crm.health()).await),
        (
            "campaigns",
            retry_transient("campaigns", || c.campaigns.health()).await,
        ),
        ("mail", retry_transient("mail", || c.mail.health()).await),
    ];
    for (name, result) in checks {
        match result {
            Ok(h) if h.ok => {
                tracing::info!(connector = name, detail = %h.detail, "healthcheck passed")
            }
            Ok(h) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{name} connector is unhealthy: {}",
                    h.detail
                )));
            }
            // A setting to fix (e.g. a refused refresh token) is a configuration error: exit 2.
            Err(e @ optinsync_plugin_api::ConnectorError::Config { .. }) => {
                return Err(Failure::Config(anyhow::anyhow!("{name} connector: {e}")));
            }
            Err(e) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{name} connector healthcheck failed: {e}"
                )));
            }
        }
    }
    Ok(())
}

/// A healthcheck that fails transiently (timeout, 5xx, 429) is asked again, 5 times over about
/// 8 s, before start-up gives up: a vendor's hiccup should not stop the daemon from starting.
async fn retry_transient<F, Fut>(
    name: &str,
    mut check: F,
) -> optinsync_plugin_api::ConnectorResult<optinsync_plugin_api::Health>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
            Output = optinsync_plugin_api::ConnectorResult<optinsync_plugin_api::Health>,
        >,
{
    let mut wait = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match check().await {
            Err(optinsync_plugin_api::ConnectorError::Transient { message, .. }) if attempt < 5 => {
                tracing::warn!(connector = name, attempt, error = %message, "healthcheck failed transiently; asking again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn worker_id() -> String {
    format!("{}-{}", std::process::id(), &uuid_short())
}

/// This machine's name, to tell this host's outbox claims from other hosts'.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

fn uuid_short() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

/// `since <time>[, confirmed <time>]` for one consent, as the inspection commands print it.
fn since_text(c: &optinsync_engine::consent::Consent) -> String {
    let confirmed = c
        .confirmed_at
        .map(|t| format!(", confirmed {}", t.to_rfc3339()))
        .unwrap_or_default();
    format!("since {}{confirmed}", c.since.to_rfc3339())
}

/// Normalise `raw_email` (not an address: a usage error) and find its contact.
pub(crate) async fn find_contact(
    store: StoreReads<'_>,
    raw_email: &str,
) -> Result<optinsync_engine::store::Contact, Failure> {
    let address = email::normalise(raw_email)
        .map_err(|e| Failure::Config(anyhow::anyhow!("`{raw_email}`: {e}")))?;
    store
        .contact_by_email(&address)
        .await
        .context("looking up the contact")?
        .ok_or_else(|| Failure::Runtime(anyhow::anyhow!("no contact with address {address}")))
}
