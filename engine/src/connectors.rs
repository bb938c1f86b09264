//! Building the configured connectors from the registered factories.
//!
//! The binary registers a list of [`ConnectorFactory`] values (one line per connector crate,
//! `src/registry.rs`); each `[connectors.ROLE]` section names a `kind`, and the factory of that
//! kind builds the connector with its settings and a [`BuildContext`]. The engine knows no
//! connector by name.
//!
//! Invariants:
//! - A kind is registered once; a section whose kind is unknown, or whose factory cannot fill
//!   that role, is refused before anything is built, naming the kinds this build knows.
//! - A connector's complaint about its settings ([`SettingsError`]) becomes a config error at
//!   the line of the offending key (exit 2).
//! - What a connector exported before the last stop comes back in [`BuildContext::state`].

use std::sync::Arc;
use std::time::Duration;

use optinsync_plugin_api::{
    BuildContext, Built, ConnectorFactory, HttpDefaults, QuotaLedger, Role, Settings,
    SettingsError, SharedMarks,
};

use crate::config::{ConfigError, LoadedConfig};
use crate::engine::Connectors;

/// Services shared by every instance on one database (`None`: each instance keeps its own).
#[derive(Debug, Clone, Default)]
pub struct SharedServices {
    pub quota: Option<Arc<dyn QuotaLedger>>,
    pub marks: Option<Arc<dyn SharedMarks>>,
}

/// How every connector's HTTP client identifies itself, and its default timeout.
pub fn http_defaults() -> HttpDefaults {
    HttpDefaults {
        timeout: Duration::from_secs(30),
        user_agent: concat!("optinsync/", env!("CARGO_PKG_VERSION")).to_owned(),
    }
}

/// The factory for `kind`, or an error naming the kinds this build knows for `role`.
pub fn factory_for<'f>(
    factories: &'f [Arc<dyn ConnectorFactory>],
    config: &LoadedConfig,
    role: Role,
    kind: &str,
) -> Result<&'f Arc<dyn ConnectorFactory>, ConfigError> {
    if let Some(f) = factories
        .iter()
        .find(|f| f.kind() == kind && f.roles().contains(&role))
    {
        return Ok(f);
    }
    let known: Vec<&str> = factories
        .iter()
        .filter(|f| f.roles().contains(&role))
        .map(|f| f.kind())
        .collect();
    let message = match factories.iter().find(|f| f.kind() == kind) {
        Some(f) => format!(
            "connector kind `{kind}` cannot be the {role} connector (it serves: {}); for {role} this build knows: {}",
            f.roles()
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            known.join(", ")
        ),
        None => format!(
            "unknown connector kind `{kind}`; for {role} this build knows: {}",
            known.join(", ")
        ),
    };
    Err(config.connector_error(
        role.as_str(),
        &SettingsError {
            key: Some("kind".into()),
            message,
        },
    ))
}

/// Build the three configured connectors. `states`: what each role's connector exported before
/// the last stop (see [`crate::engine::saved_connector_state`]).
pub async fn build(
    config: &LoadedConfig,
    factories: &[Arc<dyn ConnectorFactory>],
    shared: &SharedServices,
    mut states: impl FnMut(Role) -> Option<String>,
) -> Result<Connectors, ConfigError> {
    let sections = &config.config.connectors;
    // Check every section's kind first: a typo in the last one is reported before the first
    // one starts a process or a network check.
    for role in Role::ALL {
        let section = sections.section(role);
        factory_for(factories, config, role, &section.kind)?;
    }
    let mut crm = None;
    let mut campaigns = None;
    let mut mail = None;
    for role in Role::ALL {
        let section = sections.section(role);
        let factory = factory_for(factories, config, role, &section.kind)?;
        let fail = |e: SettingsError| config.connector_error(role.as_str(), &e);
        let settings = Settings::from_serialize(&section.settings).map_err(fail)?;
        let ctx = BuildContext {
            name: role.as_str().to_owned(),
            role,
            base_dir: config.base_dir.clone(),
            state: states(role),
            quota: shared.quota.clone(),
            marks: shared.marks.clone(),
            http: http_defaults(),
        };
        let built = factory.build(settings, &ctx).await.map_err(fail)?;
        match built {
            Built::Crm(c) if role == Role::Crm => crm = Some(c),
            Built::Campaigns(c) if role == Role::Campaigns => campaigns = Some(c),
            Built::Mail(c) if role == Role::Mail => mail = Some(c),
            other => {
                return Err(fail(SettingsError::invalid(
                    "kind",
                    format!(
                        "connector kind `{}` built a {} connector where a {role} connector was asked for",
                        section.kind,
                        other.role()
                    ),
                )));
            }
        }
    }
    match (crm, campaigns, mail) {
        (Some(crm), Some(campaigns), Some(mail)) => Ok(Connectors {
            crm,
            campaigns,
            mail,
        }),
        // Each role was built above or returned an error.
        _ => Err(config.connector_error(
            "crm",
            &SettingsError::general("a connector role was not built"),
        )),
    }
}
