//! How connectors are built: each connector crate exports [`ConnectorFactory`] values, the
//! binary lists them (one line per crate), and the engine picks the factory whose
//! [`ConnectorFactory::kind`] a `[connectors.ROLE]` section names — no central `match`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    CampaignsConnector, CrmConnector, MailTransport, QuotaLedger, SettingsError, SharedMarks,
};

/// The three places a connector can sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Crm,
    Campaigns,
    Mail,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Crm, Role::Campaigns, Role::Mail];

    /// The config section's name (`[connectors.crm]`) and the connector's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Crm => "crm",
            Role::Campaigns => "campaigns",
            Role::Mail => "mail",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connector's settings: its `[connectors.ROLE]` table without `kind`, as JSON — the same
/// form an out-of-process connector receives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings(serde_json::Map<String, serde_json::Value>);

impl Settings {
    pub fn new(map: serde_json::Map<String, serde_json::Value>) -> Self {
        Self(map)
    }

    /// From any serialisable table (e.g. a `toml::Table`); a value that is not a table is an
    /// error.
    pub fn from_serialize<T: Serialize>(table: &T) -> Result<Self, SettingsError> {
        match serde_json::to_value(table) {
            Ok(serde_json::Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(SettingsError::general("connector settings must be a table")),
            Err(e) => Err(SettingsError::general(e.to_string())),
        }
    }

    pub fn as_map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }

    pub fn into_map(self) -> serde_json::Map<String, serde_json::Value> {
        self.0
    }

    /// Deserialize into the connector's settings type; the error names the key (dotted for
    /// nested tables), also for an unknown or missing key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, SettingsError> {
        let value = serde_json::Value::Object(self.0.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            let parent = (path != "." && !path.is_empty()).then_some(path);
            // serde names a missing field only in its message (the path is the parent's).
            let field = ["unknown field `", "missing field `"]
                .iter()
                .find_map(|p| message.strip_prefix(p))
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            let key = match (parent, field) {
                // An unknown field is already the last segment of the path; a missing one is not.
                (Some(p), Some(f)) if p == f || p.ends_with(&format!(".{f}")) => Some(p),
                (Some(p), Some(f)) => Some(format!("{p}.{f}")),
                (p, f) => p.or(f),
            };
            SettingsError { key, message }
        })
    }
}

/// A duration setting such as `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"1w"` (a bare number is
/// seconds), the one reading every connector shares; the error names `setting`.
pub fn parse_duration(setting: &str, text: &str) -> Result<Duration, SettingsError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        SettingsError::invalid(setting, format!("`{text}` is not a duration like \"60s\""))
    })?;
    let ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        other => {
            return Err(SettingsError::invalid(
                setting,
                format!("unknown unit `{other}` in `{text}` (use ms, s, m, h, d or w)"),
            ));
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// Defaults for a connector's HTTP client, so that every connector identifies itself the same
/// way and none waits forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDefaults {
    pub timeout: Duration,
    pub user_agent: String,
}

/// What the engine hands a factory besides the settings.
#[derive(Clone)]
pub struct BuildContext {
    /// The connector's name: its webhook path (`/webhooks/{name}`), its log field, the key of
    /// its persisted state. Today the role's name.
    pub name: String,
    pub role: Role,
    /// The config file's directory: relative paths in settings are relative to it.
    pub base_dir: PathBuf,
    /// What the connector last returned from [`crate::Connector::export_state`], if anything.
    pub state: Option<String>,
    /// Vendor quota budgets shared by every instance on the database (`None`: one instance,
    /// keep them in memory).
    pub quota: Option<Arc<dyn QuotaLedger>>,
    /// Bookkeeping sets shared by every instance (`None`: keep them in memory).
    pub marks: Option<Arc<dyn SharedMarks>>,
    pub http: HttpDefaults,
}

impl fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildContext")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("base_dir", &self.base_dir)
            .field("state", &self.state.as_ref().map(|s| s.len()))
            .field("shared", &self.quota.is_some())
            .finish()
    }
}

/// A built connector, in its role.
#[derive(Debug, Clone)]
pub enum Built {
    Crm(Arc<dyn CrmConnector>),
    Campaigns(Arc<dyn CampaignsConnector>),
    Mail(Arc<dyn MailTransport>),
}

impl Built {
    pub fn role(&self) -> Role {
        match self {
            Built::Crm(_) => Role::Crm,
            Built::Campaigns(_) => Role::Campaigns,
            Built::Mail(_) => Role::Mail,
        }
    }
}

/// Builds connectors of one `kind`.
#[async_trait]
pub trait ConnectorFactory: Send + Sync {
    /// The `kind = "…"` of `config.toml` this factory builds.
    fn kind(&self) -> &'static str;
    /// The roles it can fill; the engine refuses a section of another role before building.
    fn roles(&self) -> &'static [Role];
    /// Build the connector for `ctx.role`. A start-up check that fails (a process that does
    /// not start, a version that does not match) is a [`SettingsError`] too: the operator
    /// must change the configuration.
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError>;
}
