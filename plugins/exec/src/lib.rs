//! `kind = "exec"`: a connector in any language, run as a child process that speaks the
//! connector protocol (`docs/connector-protocol.md`, types in `optinsync-connector-protocol`)
//! on its stdin and stdout.
//!
//! Invariants:
//! - The first start happens in `build`: a process that cannot start, a version or role
//!   mismatch, a `configure` error or silence past `startup_timeout` is a [`SettingsError`]
//!   naming `command` (or `settings.SETTING` for a connector's `config` error), so the daemon
//!   exits 2 instead of running with a connector that never worked.
//! - After that, a dead or misbehaving process only costs time: calls in flight fail as
//!   `transient` (the outbox re-sends them with their keys), and the next call restarts it
//!   after a backoff (1 s, 2 s, … 60 s), re-running `hello` and `configure` with the state it
//!   last exported.
//! - Nothing the connector sends is trusted: answers are paired by id, results are checked
//!   against the method's shape, stderr is escaped and cut before it reaches the log.
//! - A method whose capability was not declared is never called; the API default answers.

mod process;
mod settings;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use optinsync_connector_protocol::{
    BatchResults, CONFIGURE_ID, Capability, ChangesParams, ConfigureParams, ConfigureResult, Empty,
    ExportStateResult, FIRST_CALL_ID, FetchParams, FetchResult, ForgetParams, ForgetResult,
    HELLO_ID, HelloParams, HelloResult, ListMembersParams, Method, PROTOCOL_VERSION, RemoveItem,
    RemoveParams, RequestDoiParams, StatusEventsParams, SubscribeItem, SubscribeParams, result_as,
};
use optinsync_core::untrusted::Escaped;
use optinsync_plugin_api::{
    BatchResult, BuildContext, Built, CampaignsConnector, ChangePage, Connector, ConnectorError,
    ConnectorFactory, ConnectorResult, ConsentWriteBack, CrmConnector, CrmRecord, Cursor, Health,
    Keyed, MailTransport, MemberPage, OutgoingMessage, RecordRef, Role, SentMessage, Settings,
    SettingsError, StatusPage, Subscriber, WebhookEvent, WebhookRequest, per_item,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::process::{Label, Process, command_text};
use crate::settings::{ExecSettings, duration_text};

/// The longest wait between two restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A process that ran this long before it died starts the backoff over at 1 s.
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);
/// What a process gets after `shutdown` to exit by itself.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `kind = "exec"`, for every role.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    vec![Arc::new(ExecFactory)]
}

struct ExecFactory;

#[async_trait]
impl ConnectorFactory for ExecFactory {
    fn kind(&self) -> &'static str {
        "exec"
    }
    fn roles(&self) -> &'static [Role] {
        &Role::ALL
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        let connector = Arc::new(ExecConnector::start(&settings, ctx).await?);
        Ok(match ctx.role {
            Role::Crm => Built::Crm(connector),
            Role::Campaigns => Built::Campaigns(connector),
            Role::Mail => Built::Mail(connector),
        })
    }
}

/// What `hello` and `configure` said; replaced at each restart.
#[derive(Debug, Clone)]
struct Limits {
    capabilities: Vec<Capability>,
    max_batch: usize,
    status_interval: Option<Duration>,
}

enum Slot {
    Up(Arc<Process>),
    /// Dead; the next start is due at `retry_at`.
    Down {
        retry_at: Instant,
        reason: String,
    },
    Stopped,
}

struct Supervision {
    slot: Slot,
    /// Restarts since the last healthy run: the exponent of the backoff.
    failures: u32,
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF)
}

/// A failed start, as the setting to blame and a message for the operator.
struct StartError {
    key: String,
    message: String,
}

/// One configured exec connector: its process, restarted when needed.
pub struct ExecConnector {
    name: Arc<str>,
    role: Role,
    base_dir: PathBuf,
    config: ExecSettings,
    limits: Mutex<Limits>,
    /// The state last exported (`ctx.state` until the first export): what a restart gets.
    state: Mutex<Option<String>>,
    supervision: tokio::sync::Mutex<Supervision>,
}

impl fmt::Debug for ExecConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the settings: they hold credentials.
        f.debug_struct("ExecConnector")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("command", &self.config.command)
            .finish_non_exhaustive()
    }
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExecConnector {
    /// Parse the settings and start the process (`hello` + `configure`).
    pub async fn start(settings: &Settings, ctx: &BuildContext) -> Result<Self, SettingsError> {
        let config = ExecSettings::parse(settings)?;
        let connector = Self {
            name: ctx.name.as_str().into(),
            role: ctx.role,
            // The protocol promises an absolute `base_dir`; the config's may be relative (`.`).
            base_dir: std::path::absolute(&ctx.base_dir).unwrap_or_else(|_| ctx.base_dir.clone()),
            config,
            limits: Mutex::new(Limits {
                capabilities: Vec::new(),
                max_batch: 1,
                status_interval: None,
            }),
            state: Mutex::new(ctx.state.clone()),
            supervision: tokio::sync::Mutex::new(Supervision {
                slot: Slot::Stopped,
                failures: 0,
            }),
        };
        let process = connector
            .launch()
            .await
            .map_err(|e| SettingsError::invalid(e.key, e.message))?;
        connector.supervision.lock().await.slot = Slot::Up(Arc::new(process));
        Ok(connector)
    }

    fn has(&self, capability: Capability) -> bool {
        guard(&self.limits).capabilities.contains(&capability)
    }

    fn start_error(&self, key: impl Into<String>, detail: impl fmt::Display) -> StartError {
        StartError {
            key: key.into(),
            message: format!(
                "connector `{}` (command `{}`) did not start: {detail}",
                self.name,
                command_text(&self.config.command)
            ),
        }
    }

    /// Spawn the process and run the handshake within `startup_timeout`.
    async fn launch(&self) -> Result<Process, StartError> {
        let label = Label {
            name: self.name.clone(),
        };
        let process = Process::spawn(label, &self.config.command, &self.base_dir, FIRST_CALL_ID)
            .map_err(|e| {
                self.start_error(
                    "command",
                    format!(
                        "cannot run `{}` in {}: {e}",
                        self.config.command[0],
                        self.base_dir.display()
                    ),
                )
            })?;
        let limit = self.config.startup_timeout;
        match tokio::time::timeout(limit, self.handshake(&process)).await {
            Ok(Ok(limits)) => {
                *guard(&self.limits) = limits;
                Ok(process)
            }
            Ok(Err(e)) => {
                process.kill();
                Err(e)
            }
            Err(_) => {
                process.kill();
                Err(self.start_error(
                    "command",
                    format!(
                        "no answer to hello and configure within startup_timeout ({}); optinsync speaks protocol version {PROTOCOL_VERSION}",
                        duration_text(limit)
                    ),
                ))
            }
        }
    }

    async fn handshake(&self, process: &Process) -> Result<Limits, StartError> {
        let offered = vec![PROTOCOL_VERSION];
        let hello = HelloParams {
            protocol_versions: offered.clone(),
            engine: concat!("optinsync ", env!("CARGO_PKG_VERSION")).to_owned(),
            role: self.role,
            name: self.name.to_string(),
        };
        let versions = format!("optinsync speaks protocol version {PROTOCOL_VERSION}");
        let answer = process
            .call_id(HELLO_ID, Method::Hello, to_value(&hello), None)
            .await
            .and_then(|v| result_as::<HelloResult>(Method::Hello, v));
        let hello = match answer {
            Ok(h) => h,
            Err(ConnectorError::Config { setting, message }) => {
                return Err(self.start_error(
                    "command",
                    format!(
                        "it refused hello ({versions}; it answered, about `{setting}`: {})",
                        Escaped(&message)
                    ),
                ));
            }
            Err(e) => {
                return Err(self.start_error(
                    "command",
                    format!("hello failed ({versions}): {}", Escaped(e.to_string())),
                ));
            }
        };
        if !offered.contains(&hello.protocol_version) {
            return Err(self.start_error(
                "command",
                format!(
                    "it picked protocol version {}, but {versions} ({})",
                    hello.protocol_version,
                    Escaped(&hello.connector)
                ),
            ));
        }
        if !hello.roles.iter().any(|r| r == self.role.as_str()) {
            return Err(self.start_error(
                "command",
                format!(
                    "it does not serve the {} role (it serves: {}; {})",
                    self.role,
                    Escaped(hello.roles.join(", ")),
                    Escaped(&hello.connector)
                ),
            ));
        }
        // Without the capability no state is kept, and none is handed over.
        let state = if hello.capabilities.contains(&Capability::State) {
            guard(&self.state).clone()
        } else {
            None
        };
        let configure = ConfigureParams {
            settings: self.config.settings.clone(),
            base_dir: self.base_dir.to_string_lossy().into_owned(),
            state,
        };
        let answer = process
            .call_id(CONFIGURE_ID, Method::Configure, to_value(&configure), None)
            .await
            .and_then(|v| result_as::<ConfigureResult>(Method::Configure, v));
        let configured = match answer {
            Ok(c) => c,
            Err(ConnectorError::Config { setting, message }) => {
                let key = if setting == "command" {
                    setting
                } else {
                    format!("settings.{setting}")
                };
                return Err(StartError {
                    message: format!(
                        "connector `{}` (command `{}`, {}) refused its settings: {}",
                        self.name,
                        command_text(&self.config.command),
                        Escaped(&hello.connector),
                        Escaped(&message)
                    ),
                    key,
                });
            }
            Err(e) => {
                return Err(self.start_error(
                    "command",
                    format!(
                        "configure failed ({}): {}",
                        Escaped(&hello.connector),
                        Escaped(e.to_string())
                    ),
                ));
            }
        };
        tracing::info!(
            connector = %self.name,
            peer = %Escaped(&hello.connector),
            "exec connector started (protocol version {})",
            hello.protocol_version
        );
        let max_batch = configured.max_batch.or(hello.max_batch);
        let interval = configured
            .status_interval_ms
            .unwrap_or(hello.status_interval_ms);
        Ok(Limits {
            capabilities: hello.capabilities,
            max_batch: max_batch.map_or(1, |n| n.get()),
            status_interval: interval.map(Duration::from_millis),
        })
    }

    /// The running process, restarting it when it died and the backoff has passed.
    async fn process(&self) -> ConnectorResult<Arc<Process>> {
        let mut sup = self.supervision.lock().await;
        loop {
            match &sup.slot {
                Slot::Up(p) => {
                    let Some((died, reason)) = p.death() else {
                        return Ok(p.clone());
                    };
                    if died.duration_since(p.started) >= HEALTHY_UPTIME {
                        sup.failures = 0;
                    }
                    let wait = backoff(sup.failures);
                    sup.failures = sup.failures.saturating_add(1);
                    sup.slot = Slot::Down {
                        retry_at: died + wait,
                        reason,
                    };
                }
                Slot::Down { retry_at, reason } => {
                    let now = Instant::now();
                    if now < *retry_at {
                        let wait = *retry_at - now;
                        return Err(ConnectorError::Transient {
                            message: format!(
                                "{reason}; restarting in {}",
                                duration_text(Duration::from_millis(
                                    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
                                ))
                            ),
                            retry_after: Some(wait),
                            scope: Default::default(),
                        });
                    }
                    match self.launch().await {
                        Ok(p) => {
                            metrics::counter!("optinsync_exec_restarts_total", "connector" => self.name.to_string(), "result" => "ok")
                                .increment(1);
                            let p = Arc::new(p);
                            sup.slot = Slot::Up(p.clone());
                            return Ok(p);
                        }
                        Err(e) => {
                            metrics::counter!("optinsync_exec_restarts_total", "connector" => self.name.to_string(), "result" => "failed")
                                .increment(1);
                            // A failed restart is like a crash: calls wait out the next backoff.
                            tracing::warn!(connector = %self.name, "restart failed: {}", e.message);
                            let wait = backoff(sup.failures);
                            sup.failures = sup.failures.saturating_add(1);
                            sup.slot = Slot::Down {
                                retry_at: Instant::now() + wait,
                                reason: e.message.clone(),
                            };
                            return Err(ConnectorError::Transient {
                                message: e.message,
                                retry_after: Some(wait),
                                scope: Default::default(),
                            });
                        }
                    }
                }
                Slot::Stopped => {
                    return Err(ConnectorError::transient(format!(
                        "connector `{}` is shut down",
                        self.name
                    )));
                }
            }
        }
    }

    async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        params: &P,
    ) -> ConnectorResult<R> {
        let params = serde_json::to_value(params).map_err(|e| {
            ConnectorError::permanent(format!("cannot encode the `{method}` request: {e}"))
        })?;
        let process = self.process().await?;
        let value = process.call(method, params, self.config.timeout).await?;
        result_as(method, value).map_err(|e| {
            tracing::error!(connector = %self.name, method = %method, "{}", Escaped(e.to_string()));
            match e {
                ConnectorError::Transient {
                    message,
                    retry_after,
                    scope,
                } => ConnectorError::Transient {
                    message: format!("connector `{}`: {message}", self.name),
                    retry_after,
                    scope,
                },
                other => other,
            }
        })
    }

    async fn batch<P: Serialize>(&self, method: Method, n: usize, params: &P) -> BatchResult {
        if n == 0 {
            return Ok(Vec::new());
        }
        let answer = self
            .call::<_, BatchResults>(method, params)
            .await
            .map(BatchResults::into_results);
        match answer {
            Err(e) => Err(e),
            ok => Ok(per_item(n, ok)),
        }
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    // Our own params types: plain structs of strings, numbers and maps always encode.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[async_trait]
impl Connector for ExecConnector {
    async fn health(&self) -> ConnectorResult<Health> {
        self.call(Method::Health, &Empty {}).await
    }

    async fn maintain(&self) -> ConnectorResult<()> {
        if !self.has(Capability::Maintain) {
            return Ok(());
        }
        self.call::<_, Empty>(Method::Maintain, &Empty {})
            .await
            .map(|_| ())
    }

    async fn export_state(&self) -> Option<String> {
        if !self.has(Capability::State) {
            return None;
        }
        match self
            .call::<_, ExportStateResult>(Method::ExportState, &Empty {})
            .await
        {
            Ok(r) => {
                guard(&self.state).clone_from(&r.state);
                r.state
            }
            Err(e) => {
                // Keep what was exported before: losing it would reset the connector's budgets.
                tracing::warn!(connector = %self.name, "export_state failed: {}", Escaped(e.to_string()));
                guard(&self.state).clone()
            }
        }
    }

    fn accepts_webhooks(&self) -> bool {
        self.has(Capability::Webhook)
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        if !self.has(Capability::Webhook) {
            return Err(ConnectorError::InvalidInput {
                message: "this connector takes no webhooks".into(),
            });
        }
        self.call(Method::Webhook, request).await
    }

    async fn shutdown(&self) {
        let slot = std::mem::replace(&mut self.supervision.lock().await.slot, Slot::Stopped);
        let Slot::Up(process) = slot else {
            return;
        };
        if process.death().is_none() {
            let _ = process
                .call(
                    Method::Shutdown,
                    to_value(&Empty {}),
                    self.config.timeout.min(SHUTDOWN_GRACE),
                )
                .await;
        }
        process.close_stdin();
        if !process.wait_exit(SHUTDOWN_GRACE).await {
            tracing::warn!(connector = %self.name, "still running 5s after shutdown: killed");
            process.kill();
            process.wait_exit(SHUTDOWN_GRACE).await;
        }
    }
}

#[async_trait]
impl CrmConnector for ExecConnector {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        let params = ChangesParams {
            cursor: cursor.cloned(),
            limit,
        };
        self.call(Method::Changes, &params).await
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        let params = FetchParams {
            record: record.clone(),
        };
        self.call::<_, FetchResult>(Method::Fetch, &params)
            .await
            .map(|r| r.record)
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        self.call::<_, Empty>(Method::WriteBack, consent)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl CampaignsConnector for ExecConnector {
    fn max_batch(&self) -> usize {
        guard(&self.limits).max_batch
    }

    fn status_interval(&self) -> Option<Duration> {
        guard(&self.limits).status_interval
    }

    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult {
        let params = SubscribeParams {
            list: list.to_owned(),
            items: items.iter().map(SubscribeItem::from).collect(),
        };
        self.batch(Method::Subscribe, items.len(), &params).await
    }

    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        let params = RemoveParams {
            list: list.to_owned(),
            items: items.iter().map(RemoveItem::from).collect(),
        };
        self.batch(Method::Remove, items.len(), &params).await
    }

    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        let params = StatusEventsParams {
            list: list.to_owned(),
            cursor: cursor.cloned(),
        };
        self.call(Method::StatusEvents, &params).await
    }

    async fn request_doi(&self, list: &str, subscriber: &Keyed<Subscriber>) -> ConnectorResult<()> {
        if !self.has(Capability::RequestDoi) {
            return Err(ConnectorError::Permanent {
                message: "this campaigns connector cannot run a double opt-in".into(),
            });
        }
        let params = RequestDoiParams {
            list: list.to_owned(),
            key: subscriber.key.clone(),
            subscriber: subscriber.item.clone(),
        };
        self.call::<_, Empty>(Method::RequestDoi, &params)
            .await
            .map(|_| ())
    }

    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        if !self.has(Capability::ListMembers) {
            return Err(ConnectorError::Permanent {
                message: "this campaigns connector cannot list members".into(),
            });
        }
        let params = ListMembersParams {
            list: list.to_owned(),
            cursor: cursor.cloned(),
        };
        self.call(Method::ListMembers, &params).await
    }
}

#[async_trait]
impl MailTransport for ExecConnector {
    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage> {
        self.call(Method::Send, message).await
    }

    async fn forget(&self, idempotency_keys: &[String]) -> ConnectorResult<u64> {
        let params = ForgetParams {
            keys: idempotency_keys.to_vec(),
        };
        self.call::<_, ForgetResult>(Method::Forget, &params)
            .await
            .map(|r| r.deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_doubling_up_to_a_minute() {
        let waits: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
