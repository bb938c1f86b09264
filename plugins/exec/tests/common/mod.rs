//! Helpers shared by the exec connector's tests: build a connector of `kind = "exec"` the way
//! the engine does, in a temporary base directory.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optinsync_plugin_api::{
    BuildContext, Built, CampaignsConnector, ConnectorError, CrmConnector, HttpDefaults, Role,
    Settings, SettingsError,
};
use serde_json::{Value, json};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `["python3", "<absolute path of examples/connectors/NAME>"]`.
pub fn example(name: &str) -> Value {
    let path = repo()
        .join("examples/connectors")
        .join(name)
        .canonicalize()
        .expect("example exists");
    json!(["python3", path.to_string_lossy()])
}

/// A temporary base directory holding copies of the named fixture files.
pub fn base_dir(fixtures: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in fixtures {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(f);
        std::fs::copy(&from, dir.path().join(f)).expect("fixture copied");
    }
    dir
}

pub fn ctx(role: Role, dir: &Path, state: Option<String>) -> BuildContext {
    BuildContext {
        name: role.as_str().to_owned(),
        role,
        base_dir: dir.to_path_buf(),
        state,
        quota: None,
        marks: None,
        http: HttpDefaults {
            timeout: Duration::from_secs(30),
            user_agent: "optinsync-test".into(),
        },
    }
}

pub async fn build(
    role: Role,
    dir: &Path,
    section: Value,
    state: Option<String>,
) -> Result<Built, SettingsError> {
    let Value::Object(map) = section else {
        panic!("a section is a table")
    };
    let factories = optinsync_plugin_exec::factories();
    let factory = factories
        .iter()
        .find(|f| f.kind() == "exec")
        .expect("exec registered");
    assert_eq!(factory.roles(), Role::ALL);
    factory
        .build(Settings::new(map), &ctx(role, dir, state))
        .await
}

pub async fn crm(dir: &Path, section: Value) -> Arc<dyn CrmConnector> {
    match build(Role::Crm, dir, section, None).await {
        Ok(Built::Crm(c)) => c,
        Ok(other) => panic!("built a {} connector", other.role()),
        Err(e) => panic!("build failed: {e}"),
    }
}

pub async fn campaigns(
    dir: &Path,
    section: Value,
    state: Option<String>,
) -> Arc<dyn CampaignsConnector> {
    match build(Role::Campaigns, dir, section, state).await {
        Ok(Built::Campaigns(c)) => c,
        Ok(other) => panic!("built a {} connector", other.role()),
        Err(e) => panic!("build failed: {e}"),
    }
}

/// The wait a transient error asks for, if it is one.
pub fn transient_wait(e: &ConnectorError) -> Option<Option<Duration>> {
    match e {
        ConnectorError::Transient { retry_after, .. } => Some(*retry_after),
        _ => None,
    }
}

/// Call `f` again while it fails transiently (waiting what it asks, or 100 ms), for at most
/// 30 s; the first other outcome.
pub async fn retrying<T, F, Fut>(mut f: F) -> Result<T, ConnectorError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ConnectorError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Err(e) if Instant::now() < deadline => match transient_wait(&e) {
                Some(wait) => tokio::time::sleep(wait.unwrap_or(Duration::from_millis(100))).await,
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// A Python script written into `dir`, run as the connector.
pub fn script(dir: &Path, name: &str, source: &str) -> Value {
    let path = dir.join(name);
    std::fs::write(&path, source).expect("script written");
    json!(["python3", path.to_string_lossy()])
}
