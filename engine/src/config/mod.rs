//! `config.toml`: parsed strictly (unknown keys are errors naming the key and line), with
//! secrets optionally taken from environment variables (`"${NAME}"`), relative paths resolved
//! against the config file's directory, and human durations (`"30s"`, `"14d"`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use optinsync_plugin_api::SettingsError;
use serde::Deserialize;

mod check;
mod duration;
pub mod sending;

pub use duration::HumanDuration;
pub use sending::{KindPlan, SendingConfig, SendingHours, SoftBounces, StopRules};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: `{key}` refers to environment variable `{var}`, which is not set")]
    MissingEnv {
        path: PathBuf,
        key: String,
        var: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub server: ServerConfig,
    pub tokens: TokenConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    pub sender: SenderConfig,
    #[serde(default)]
    pub templates: TemplatesConfig,
    pub connectors: ConnectorsConfig,
    pub lists: Vec<ListConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[console]`: the operator console at `/console`; absent = off (404).
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// `[retention]`: how long proof and unconfirmed signups are kept ([`crate::retention`]).
    #[serde(default)]
    pub retention: RetentionConfig,
    /// `[signup]`: the website signup endpoint (`/signup/{list}`).
    #[serde(default)]
    pub signup: SignupConfig,
    /// `[metrics]`: how often `run` refreshes the gauges it reads from the store, the ledger
    /// and the campaigns tool.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[signup]`: who may post signups from a browser, and the limits against abuse.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupConfig {
    /// Sites whose pages may post signups (`https://www.example.org`): the CORS allow-list of
    /// the JSON variant, and the `Origin`s a form post is accepted from besides the public
    /// URL's own (the hosted page). Empty: only the hosted page and clients that send no
    /// `Origin`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Signups one client (an IPv4 address or an IPv6 /64) may post per hour.
    #[serde(default = "default_signups_per_client")]
    pub per_client_per_hour: u32,
    /// Signups for one address per hour; more are answered alike and do nothing.
    #[serde(default = "default_signups_per_address")]
    pub per_address_per_hour: u32,
    /// Every answer to a signup takes at least this long, so its timing says nothing about
    /// the address (the work differs a little between a new and a known address).
    #[serde(default = "default_answer_floor")]
    pub answer_floor: HumanDuration,
}

fn default_signups_per_client() -> u32 {
    20
}
fn default_signups_per_address() -> u32 {
    3
}
fn default_answer_floor() -> HumanDuration {
    HumanDuration(Duration::from_millis(250))
}

impl Default for SignupConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            per_client_per_hour: default_signups_per_client(),
            per_address_per_hour: default_signups_per_address(),
            answer_floor: default_answer_floor(),
        }
    }
}

/// `[admin]`: the admin JSON API (`/admin/...`, served by the web layer).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token the admin API requires; unset = the admin API is off (404). At least 32
    /// characters; may be `"${VAR}"`.
    #[serde(default)]
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// `[console]`: the operator console (`/console`, served by the web layer). Present = on.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Argon2 hash (PHC string, `$argon2id$...`) of the operator password; unset = the
    /// password is the admin token (`[admin] token`, then required). May be `"${VAR}"`.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// How long a login lasts (the session cookie's expiry).
    #[serde(default = "default_session_ttl")]
    pub session_ttl: HumanDuration,
}

fn default_session_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(8 * 3600))
}

impl std::fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleConfig")
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| REDACTED),
            )
            .field("session_ttl", &self.session_ttl)
            .finish()
    }
}

/// What `Debug` prints instead of a secret (config structs end up in logs and panics).
pub const REDACTED: &str = "<redacted>";

/// `postgres://user:password@host/db` → `postgres://user:<redacted>@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}{tail}"),
        None => url.to_owned(),
    }
}

/// Connector setting names whose values are secrets (matched case-insensitively, by part).
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "password",
        "token",
        "passwd",
        "private",
        "credential",
        "api_key",
        "apikey",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn redact_table(t: &toml::Table) -> toml::Table {
    t.iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::Table(inner) => toml::Value::Table(redact_table(inner)),
                _ if is_secret_key(k) => toml::Value::String(REDACTED.into()),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (relative to the config file) or `postgres://...`; may be `"${VAR}"`.
    pub url: String,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://var/optinsync.db".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Base URL that links in mails point to.
    #[serde(default = "default_public_url")]
    pub public_url: String,
    /// Reverse proxies whose `X-Forwarded-For` is believed; from anyone else the header is
    /// ignored and the peer address is the client address.
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Requests per minute one client IP may make to the confirm/unsubscribe pages.
    #[serde(default = "default_rate_limit")]
    pub rate_limit_per_minute: u32,
    /// Largest request body accepted by the public pages, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Requests per second all clients together may make to the confirm/unsubscribe pages
    /// (each renders a page and reads the store; a crowd of addresses is not one client).
    #[serde(default = "default_global_rate_limit")]
    pub global_rate_limit_per_second: u32,
    /// Webhook calls per minute one client (IPv4 address or IPv6 /64) may make.
    #[serde(default = "default_webhook_rate_limit")]
    pub webhook_rate_limit_per_minute: u32,
    /// Connections served at once; more wait in the kernel's queue (a reverse proxy in front
    /// is still what an internet-facing deployment needs).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A client must send a request's headers within this time, and a request's body within
    /// it again; an idle keep-alive connection is closed after it.
    #[serde(default = "default_client_timeout")]
    pub client_timeout: HumanDuration,
}

fn default_global_rate_limit() -> u32 {
    2_000
}
fn default_webhook_rate_limit() -> u32 {
    1_200
}
fn default_max_connections() -> usize {
    1_024
}
fn default_client_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_rate_limit() -> u32 {
    60
}
fn default_max_body() -> usize {
    16 * 1024
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_public_url() -> String {
    "http://127.0.0.1:8080".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            public_url: default_public_url(),
            trusted_proxies: Vec::new(),
            rate_limit_per_minute: default_rate_limit(),
            max_body_bytes: default_max_body(),
            global_rate_limit_per_second: default_global_rate_limit(),
            webhook_rate_limit_per_minute: default_webhook_rate_limit(),
            max_connections: default_max_connections(),
            client_timeout: default_client_timeout(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// HMAC key for links; at least 32 characters; may be `"${VAR}"`.
    pub secret: String,
    #[serde(default = "default_key_id")]
    pub key_id: String,
    /// Older keys still accepted for links already sent (rotation).
    #[serde(default)]
    pub previous: Vec<PreviousKey>,
    #[serde(default = "default_confirm_ttl")]
    pub confirm_ttl: HumanDuration,
}

impl TokenConfig {
    /// The keys this section configures: the current one and every `[[tokens.previous]]`.
    pub fn keys(&self) -> crate::tokens::TokenKeys {
        let keys = |unsubscribe_only: bool| {
            self.previous
                .iter()
                .filter(|k| k.unsubscribe_only == unsubscribe_only)
                .map(|k| (k.key_id.clone(), k.secret.as_bytes().to_vec()))
                .collect()
        };
        crate::tokens::TokenKeys::new(&self.key_id, self.secret.as_bytes(), keys(false))
            .with_unsubscribe_only(keys(true))
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    pub key_id: String,
    pub secret: String,
    /// Retired for everything but verifying unsubscribe links already mailed (which never
    /// expire): confirmation links signed with it are refused.
    #[serde(default)]
    pub unsubscribe_only: bool,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("secret", &REDACTED)
            .field("key_id", &self.key_id)
            .field("previous", &self.previous)
            .field("confirm_ttl", &self.confirm_ttl)
            .finish()
    }
}

impl std::fmt::Debug for PreviousKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviousKey")
            .field("key_id", &self.key_id)
            .field("secret", &REDACTED)
            .field("unsubscribe_only", &self.unsubscribe_only)
            .finish()
    }
}

/// The token secret shipped in the demo `config.toml` (and so known to everyone).
pub const DEMO_TOKEN_SECRET: &str = "demo-only-secret-change-me-0123456789abcdef";

/// The host of an `http(s)://host[:port]/...` URL, without brackets around an IPv6 address.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// `true` for `localhost`, `127.0.0.0/8` and `::1`: a URL only this machine can open.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn default_key_id() -> String {
    "k1".into()
}
fn default_confirm_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 86_400))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Directory of rule scripts (`*.rhai`, each with `fn decide(contact, consent, ctx)`) and
    /// their table tests (`*.tests.toml`); watched for changes while the daemon runs.
    pub dir: PathBuf,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("rules"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Outbox attempts before a row becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// First outbox retry delay; doubles per attempt, ±20 % jitter, capped at `retry_cap`.
    #[serde(default = "default_retry_base")]
    pub retry_base: HumanDuration,
    #[serde(default = "default_retry_cap")]
    pub retry_cap: HumanDuration,
    /// Consecutive transient failures of one connector that open its circuit.
    #[serde(default = "default_circuit_threshold")]
    pub circuit_threshold: u32,
    /// How long an open circuit pauses its connector before one probe is let through.
    #[serde(default = "default_circuit_cooldown")]
    pub circuit_cooldown: HumanDuration,
    /// After SIGTERM, how long running work may take before the daemon exits anyway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
}

fn default_retry_base() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_retry_cap() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_circuit_threshold() -> u32 {
    5
}
fn default_circuit_cooldown() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_page_size() -> usize {
    200
}
fn default_max_attempts() -> i32 {
    10
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            poll_interval: default_poll(),
            page_size: default_page_size(),
            max_attempts: default_max_attempts(),
            retry_base: default_retry_base(),
            retry_cap: default_retry_cap(),
            circuit_threshold: default_circuit_threshold(),
            circuit_cooldown: default_circuit_cooldown(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

/// Who asks for consent: shown in every mail and page (LSSI/GDPR: identify the sender).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    pub organisation: String,
    /// Transactional sender for DOI mails, e.g. `"Example <confirm@example.org>"`.
    pub from: String,
    pub postal_address: String,
    /// The sender of the newsletter itself (set in the campaigns tool). Recorded so the
    /// start-up check can refuse a DOI sender equal to it: confirmation requests and
    /// marketing must come from distinct senders (Google: separate transactional mail).
    #[serde(default)]
    pub newsletter_from: Option<String>,
    /// Mailbox for the `mailto:` in `List-Unsubscribe` (e.g. `unsubscribe@example.org`).
    #[serde(default)]
    pub unsubscribe_mailbox: Option<String>,
}

/// `[templates]`: mail and page templates (see `templates/` and the README).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Directory with one sub-directory per language; unset = the built-in set.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorsConfig {
    pub crm: ConnectorSection,
    pub campaigns: ConnectorSection,
    pub mail: ConnectorSection,
}

impl ConnectorsConfig {
    /// The `[connectors.ROLE]` section of a role.
    pub fn section(&self, role: optinsync_plugin_api::Role) -> &ConnectorSection {
        use optinsync_plugin_api::Role;
        match role {
            Role::Crm => &self.crm,
            Role::Campaigns => &self.campaigns,
            Role::Mail => &self.mail,
        }
    }
}

/// `kind` picks the connector; the other keys are its settings, checked by the connector.
#[derive(Clone, Deserialize)]
pub struct ConnectorSection {
    pub kind: String,
    #[serde(flatten)]
    pub settings: toml::Table,
}

impl std::fmt::Debug for ConnectorSection {
    /// Settings named like secrets (`client_secret`, `refresh_token`, `password`, ...) print
    /// as `<redacted>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorSection")
            .field("kind", &self.kind)
            .field("settings", &redact_table(&self.settings))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListConfig {
    /// Stable id (`[a-z0-9_-]`), used in the ledger and in links.
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Name of the list in the Campaigns tool; defaults to `id`.
    #[serde(default)]
    pub campaigns_list: Option<String>,
    #[serde(default = "default_language")]
    pub default_language: String,
    #[serde(default = "default_reminder_after")]
    pub reminder_after: HumanDuration,
    #[serde(default = "default_pending_expiry")]
    pub pending_expiry: HumanDuration,
    #[serde(default = "default_max_reminders")]
    pub max_reminders: u32,
    /// Who runs the double opt-in: `"optinsync"` (default: optinsync's own mail and
    /// confirmation page, the full proof) or `"campaigns"` (the campaigns tool's own
    /// confirmation on a signup-form list; optinsync records it as weaker evidence).
    #[serde(default)]
    pub doi: DoiMode,
    #[serde(default = "default_inactivity")]
    pub inactivity: HumanDuration,
    #[serde(default = "default_grace")]
    pub revalidation_grace: HumanDuration,
    /// `[lists.sending]`: the list's sending plan, stop rules and soft-bounce threshold.
    #[serde(default)]
    pub sending: SendingConfig,
}

fn default_language() -> String {
    "en".into()
}
fn default_reminder_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(3 * 86_400))
}
fn default_pending_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(14 * 86_400))
}
fn default_max_reminders() -> u32 {
    1
}
fn default_inactivity() -> HumanDuration {
    HumanDuration(Duration::from_secs(365 * 86_400))
}
fn default_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 86_400))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DoiMode {
    #[default]
    Optinsync,
    Campaigns,
}

impl ListConfig {
    pub fn campaigns_list(&self) -> &str {
        self.campaigns_list.as_deref().unwrap_or(&self.id)
    }
}

/// A parsed, validated config with what is needed to report errors in it later.
#[derive(Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The mail and page templates, loaded and checked with the configuration.
    pub templates: std::sync::Arc<crate::templates::Templates>,
    pub path: PathBuf,
    pub base_dir: PathBuf,
    pub source: String,
}

impl std::fmt::Debug for LoadedConfig {
    /// The source text may hold secrets written inline; it is not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedConfig")
            .field("config", &self.config)
            .field("path", &self.path)
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

impl LoadedConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(&source, path)
    }

    pub fn from_str(source: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(source).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(source, s.start))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base_dir = if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir
        };
        let at = check::Place {
            path,
            base_dir: &base_dir,
        };
        // Section by section (`check.rs`), then the checks that span sections.
        check::store(&mut config.store, &at)?;
        check::tokens(&mut config.tokens, &at)?;
        check::admin(&mut config.admin, &at)?;
        check::console(&mut config.console, &config.admin, &at)?;
        check::rules(&mut config.rules, &at);
        check::connectors(&mut config.connectors, &at)?;
        check::lists(&config.lists, &at)?;
        check::server(&mut config.server, &at)?;
        check::signup(&mut config.signup, &at)?;
        check::sender(&config.sender, &at)?;
        check::demo_secret_and_key_ids(&config, &at)?;
        let templates = check::templates(&mut config.templates, &at)?;
        Ok(Self {
            templates: std::sync::Arc::new(templates),
            config,
            path: path.to_owned(),
            base_dir,
            source: source.to_owned(),
        })
    }

    pub fn list(&self, id: &str) -> Option<&ListConfig> {
        self.config.lists.iter().find(|l| l.id == id)
    }

    /// Turn a connector's complaint about its settings into an error with the line of the
    /// offending key ([`SettingsError::key`], dotted for nested tables), found in the
    /// `[connectors.NAME]` section of the source or one of its sub-tables; the section's own
    /// line when the key is not written there (a missing key).
    pub fn connector_error(&self, section: &str, error: &SettingsError) -> ConfigError {
        let message = format!("connectors.{section}: {error}");
        let (table, leaf) = match error
            .key
            .as_deref()
            .map(|k| k.rsplit_once('.').unwrap_or(("", k)))
        {
            Some((parent, leaf)) => (
                if parent.is_empty() {
                    format!("connectors.{section}")
                } else {
                    format!("connectors.{section}.{parent}")
                },
                Some(leaf),
            ),
            None => (format!("connectors.{section}"), None),
        };
        let header = format!("[connectors.{section}]");
        let wanted = format!("[{table}]");
        let mut in_table = false;
        let mut section_line = 0;
        for (i, line) in self.source.lines().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                in_table = t == wanted;
                if t == header {
                    section_line = i + 1;
                }
                continue;
            }
            if in_table
                && let Some(k) = leaf
                && t.split('=').next().map(|k| k.trim().trim_matches('"')) == Some(k)
            {
                return ConfigError::Parse {
                    path: self.path.clone(),
                    line: i + 1,
                    column: 1,
                    message,
                };
            }
        }
        ConfigError::Parse {
            path: self.path.clone(),
            line: section_line,
            column: 1,
            message,
        }
    }
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count() + 1)
        .unwrap_or(1);
    (line, column)
}

/// `[retention]`. Both periods unset (the default) = keep everything; the job does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long the proof of a consent stays after it ended (withdrawn, bounced, complained,
    /// or lapsed after having been confirmed), e.g. `"3y"`.
    #[serde(default)]
    pub withdrawn_proof: Option<HumanDuration>,
    /// How long the data of a signup that was never confirmed (asserted, pending, lapsed
    /// unconfirmed) stays, e.g. `"30d"`.
    #[serde(default)]
    pub unconfirmed: Option<HumanDuration>,
    /// How often `optinsync run` applies the periods (default `"1d"`).
    #[serde(default = "default_every")]
    pub every: HumanDuration,
}

fn default_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(86_400))
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            withdrawn_proof: None,
            unconfirmed: None,
            every: default_every(),
        }
    }
}

/// `[metrics]`: the intervals of the daemon's gauge refresh (`/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Consent counts per list, outbox backlog, ledger head (default `"30s"`). The consent
    /// count scans the consents table: about 0.8 s on a reader at a million consents (SQLite).
    #[serde(default = "default_refresh")]
    pub refresh_interval: HumanDuration,
    /// Drift against the campaigns tool's member listing: pages of vendor calls (default
    /// `"1h"`).
    #[serde(default = "default_drift")]
    pub drift_interval: HumanDuration,
    /// A full hash-chain verification of the ledger (default `"6h"`).
    #[serde(default = "default_verify")]
    pub ledger_verify_interval: HumanDuration,
}

fn default_refresh() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

fn default_drift() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(3_600))
}

fn default_verify() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(6 * 3_600))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            refresh_interval: default_refresh(),
            drift_interval: default_drift(),
            ledger_verify_interval: default_verify(),
        }
    }
}

impl RetentionConfig {
    pub fn enabled(&self) -> bool {
        self.withdrawn_proof.is_some() || self.unconfirmed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tokens]
secret = "0123456789abcdef0123456789abcdef"

[sender]
organisation = "Example"
from = "Example <confirm@example.org>"
postal_address = "1 Main St"

[connectors.crm]
kind = "csv"
path = "c.csv"

[connectors.campaigns]
kind = "jsonl"
path = "l.jsonl"

[connectors.mail]
kind = "eml"
dir = "mail"

[[lists]]
id = "news"
name = "News"
reminder_after = "30s"
"#;

    /// F1: the published demo secret is refused unless links stay on loopback and mail is
    /// written to files; then it is the local demo, and accepted.
    #[test]
    fn f1_demo_secret_refused_outside_the_local_demo() {
        let demo = MINIMAL.replace(
            "secret = \"0123456789abcdef0123456789abcdef\"",
            &format!("secret = \"{DEMO_TOKEN_SECRET}\""),
        );
        let path = Path::new("/etc/o/config.toml");
        assert!(LoadedConfig::from_str(&demo, path).is_ok(), "local demo");
        let public = demo.replace(
            "[tokens]",
            "[server]\npublic_url = \"https://news.example.org\"\n\n[tokens]",
        );
        let smtp = demo.replace(
            "kind = \"eml\"\ndir = \"mail\"",
            "kind = \"smtp\"\nhost = \"127.0.0.1\"",
        );
        let previous = MINIMAL.replace(
            "[tokens]\n",
            &format!(
                "[server]\npublic_url = \"https://news.example.org\"\n\n[tokens]\nprevious = [{{ key_id = \"k0\", secret = \"{DEMO_TOKEN_SECRET}\" }}]\n"
            ),
        );
        for (name, text, key) in [
            ("public URL", &public, "tokens.secret"),
            ("SMTP", &smtp, "tokens.secret"),
            ("previous key", &previous, "tokens.previous[0].secret"),
        ] {
            match LoadedConfig::from_str(text, path) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key, "{name}");
                    assert!(
                        message.contains("published demo value"),
                        "{name}: {message}"
                    );
                }
                other => panic!("{name}: demo secret accepted: {other:?}"),
            }
        }
        assert!(is_loopback_host(url_host("http://[::1]:8080/x")));
        assert!(is_loopback_host(url_host("http://localhost")));
        assert!(!is_loopback_host(url_host("http://127.example.org")));
    }

    #[test]
    fn duplicate_or_malformed_key_ids_refused() {
        let path = Path::new("/etc/o/config.toml");
        let dup = MINIMAL.replace(
            "[tokens]\n",
            "[tokens]\nprevious = [{ key_id = \"k1\", secret = \"another-secret-another-secret-0123\" }]\n",
        );
        assert!(matches!(
            LoadedConfig::from_str(&dup, path),
            Err(ConfigError::Invalid { key, .. }) if key == "tokens.previous[0].key_id"
        ));
        let pipe = MINIMAL.replace("[tokens]\n", "[tokens]\nkey_id = \"k|1\"\n");
        assert!(matches!(
            LoadedConfig::from_str(&pipe, path),
            Err(ConfigError::Invalid { key, .. }) if key == "tokens.key_id"
        ));
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = LoadedConfig::from_str(MINIMAL, Path::new("/etc/o/config.toml")).expect("valid");
        assert_eq!(c.config.store.url, "sqlite:///etc/o/var/optinsync.db");
        assert_eq!(c.config.lists[0].reminder_after.secs(), 30);
        assert_eq!(c.config.lists[0].max_reminders, 1);
        assert_eq!(
            c.config
                .connectors
                .crm
                .settings
                .get("path")
                .and_then(|v| v.as_str()),
            Some("c.csv")
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let src = MINIMAL.replace("name = \"News\"", "name = \"News\"\nremindr_after = \"1d\"");
        let err = LoadedConfig::from_str(&src, Path::new("config.toml")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("remindr_after"), "{msg}");
        assert!(msg.starts_with("config.toml:"), "{msg}");
        match err {
            ConfigError::Parse { line, .. } => assert!(line > 20, "line {line}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn secret_from_env_and_missing_env() {
        let src = MINIMAL.replace(
            "\"0123456789abcdef0123456789abcdef\"",
            "\"${OPTINSYNC_TEST_UNSET_VAR}\"",
        );
        let err = LoadedConfig::from_str(&src, Path::new("c.toml")).expect_err("unset env");
        assert!(err.to_string().contains("OPTINSYNC_TEST_UNSET_VAR"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            HumanDuration::parse("14d").map(|d| d.secs()),
            Ok(14 * 86_400)
        );
        assert!(HumanDuration::parse("3 fortnights").is_err());
        // Regression (fuzzing): overflow in the unit multiplication, and durations too long
        // to add to a date.
        assert!(HumanDuration::parse("99999999999999999w").is_err());
        assert!(HumanDuration::parse("18446744073709551615s").is_err());
        assert!(HumanDuration::parse("100000000d").is_err());
        assert_eq!(
            HumanDuration::parse("1000w").map(|d| d.secs()),
            Ok(1000 * 7 * 86_400)
        );
        assert!(HumanDuration::parse("").is_err());
    }

    #[test]
    fn debug_never_prints_secrets() {
        let src = MINIMAL
            .replace(
                "path = \"c.csv\"",
                "path = \"c.csv\"\nclient_secret = \"zoho-client-secret-value\"\nrefresh_token = \"1000.refresh.token\"\n[connectors.crm.webhook]\ntoken = \"channel-token-value\"",
            )
            .replace(
                "dir = \"mail\"",
                "dir = \"mail\"\npassword = \"smtp-password-value\"",
            )
            .replace(
                "[tokens]",
                "[admin]\ntoken = \"admin-token-admin-token-admin-token\"\n\n[store]\nurl = \"postgres://app:db-password-value@127.0.0.1/o\"\n\n[tokens]\nprevious = [{ key_id = \"k0\", secret = \"previous-secret-value\" }]",
            );
        let c = LoadedConfig::from_str(&src, Path::new("c.toml")).expect("valid");
        let printed = format!("{c:?} {:?}", c.config);
        for secret in [
            "0123456789abcdef0123456789abcdef",
            "zoho-client-secret-value",
            "1000.refresh.token",
            "channel-token-value",
            "smtp-password-value",
            "admin-token-admin-token-admin-token",
            "db-password-value",
            "previous-secret-value",
        ] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(printed.contains(REDACTED));
        // What is not secret still shows.
        assert!(printed.contains("c.csv") && printed.contains("app:") && printed.contains("k0"));
    }

    #[test]
    fn redact_url_keeps_what_is_not_secret() {
        assert_eq!(
            redact_url("postgres://u:p@h:5432/db?x=1"),
            "postgres://u:<redacted>@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://var/o.db"), "sqlite://var/o.db");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn short_admin_token_refused() {
        let src = MINIMAL.replace("[tokens]", "[admin]\ntoken = \"short\"\n\n[tokens]");
        let err = LoadedConfig::from_str(&src, Path::new("c.toml")).expect_err("short token");
        assert!(err.to_string().contains("admin.token"), "{err}");
    }

    #[test]
    fn short_secret_refused() {
        let src = MINIMAL.replace("0123456789abcdef0123456789abcdef", "short");
        assert!(LoadedConfig::from_str(&src, Path::new("c.toml")).is_err());
    }

    #[test]
    fn connector_error_points_at_key_line() {
        let src = MINIMAL.replace("path = \"c.csv\"", "path = \"c.csv\"\npth = \"x\"");
        let c = LoadedConfig::from_str(&src, Path::new("c.toml")).expect("valid at this level");
        let e = c.connector_error(
            "crm",
            &SettingsError {
                key: Some("pth".into()),
                message: "unknown field `pth`, expected `path`".into(),
            },
        );
        let line = src
            .lines()
            .position(|l| l.starts_with("pth"))
            .map(|i| i + 1);
        match e {
            ConfigError::Parse { line: l, .. } => assert_eq!(Some(l), line),
            other => panic!("unexpected {other:?}"),
        }
    }
}
