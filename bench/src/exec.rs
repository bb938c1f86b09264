//! Row 10, the exec connector protocol against an in-process connector on the same work: `n`
//! records paged through `changes` (1,000 per call) from
//!
//! - the Python example CRM (`examples/connectors/file_crm.py`, kind `exec`), reading its
//!   JSON-lines file;
//! - a replay connector (`bench/fixtures/replay_crm.py`, kind `exec`) that answers with one
//!   page it serialised once: the protocol alone (pipe, framing, decoding), the ceiling any exec
//!   connector can reach;
//! - the CSV connector (in process), reading a CSV of the same records.
//!
//! Each connector is built through its factory, as the daemon builds it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use optinsync_plugin_api::{
    BuildContext, Built, ConnectorFactory, CrmConnector, Cursor, HttpDefaults, Role, Settings,
};

/// Records/s of the Python example, of the replay (the protocol's ceiling), and of the CSV
/// connector.
pub struct Figures {
    pub example: f64,
    pub replay: f64,
    pub csv: f64,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Largest size row 10 runs at. Its reference, the CSV connector, reads and diffs the whole
/// file for every page (a CSV has no change log; see `plugins/files/src/csv_crm`): 1,000 pages
/// of a million rows had not finished after nine minutes, more than rows 1-6 at 1M had taken.
pub const MAX_CONTACTS: u64 = 100_000;

pub async fn run(n: u64, dir: &Path) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(dir)?;
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(dir.join("crm.jsonl"))?);
    let mut csv = std::io::BufWriter::new(std::fs::File::create(dir.join("contacts.csv"))?);
    writeln!(csv, "Id,Email,Language,First_Name,Newsletter")?;
    for i in 0..n {
        writeln!(
            jsonl,
            r#"{{"id": "{i}", "email": "person{i}@example.org", "language": "en", "lists": ["newsletter"], "fields": {{"First_Name": "P{i}"}}}}"#
        )?;
        writeln!(csv, "{i},person{i}@example.org,en,P{i},true")?;
    }
    jsonl.flush()?;
    csv.flush()?;
    drop((jsonl, csv));

    let exec = optinsync_plugin_exec::factories();
    let files = optinsync_plugin_files::factories();
    let example = build(
        &exec,
        "exec",
        dir,
        serde_json::json!({
            "command": ["python3", repo().join("examples/connectors/file_crm.py")],
            "timeout": "120s",
            "settings": {"path": "crm.jsonl", "write_back_path": "wb.jsonl"},
        }),
    )
    .await?;
    let replay = build(
        &exec,
        "exec",
        dir,
        serde_json::json!({
            "command": ["python3", repo().join("bench/fixtures/replay_crm.py")],
            "timeout": "120s",
            "settings": {"total": n},
        }),
    )
    .await?;
    let csv = build(
        &files,
        "csv",
        dir,
        serde_json::json!({
            "path": "contacts.csv",
            "asserts": {"newsletter": "Newsletter"},
        }),
    )
    .await?;
    let figures = Figures {
        example: rate(
            n,
            pull(example.as_ref(), n)
                .await
                .context("the Python example")?,
        ),
        replay: rate(
            n,
            pull(replay.as_ref(), n)
                .await
                .context("the replay connector")?,
        ),
        csv: rate(n, pull(csv.as_ref(), n).await.context("the CSV connector")?),
    };
    example.shutdown().await;
    replay.shutdown().await;
    Ok(figures)
}

fn rate(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

async fn build(
    factories: &[Arc<dyn ConnectorFactory>],
    kind: &str,
    dir: &Path,
    settings: serde_json::Value,
) -> anyhow::Result<Arc<dyn CrmConnector>> {
    let factory = factories
        .iter()
        .find(|f| f.kind() == kind)
        .with_context(|| format!("no `{kind}` factory"))?;
    let settings = match settings {
        serde_json::Value::Object(map) => Settings::new(map),
        _ => bail!("settings must be a table"),
    };
    let ctx = BuildContext {
        name: "crm".into(),
        role: Role::Crm,
        base_dir: dir.to_path_buf(),
        state: None,
        quota: None,
        marks: None,
        http: HttpDefaults {
            timeout: Duration::from_secs(30),
            user_agent: "optinsync-bench".into(),
        },
    };
    match factory.build(settings, &ctx).await? {
        Built::Crm(c) => Ok(c),
        other => bail!("`{kind}` built a {} connector", other.role()),
    }
}

/// Page through the whole feed; every record must come exactly once.
async fn pull(crm: &dyn CrmConnector, n: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut cursor: Option<Cursor> = None;
    let mut records = 0u64;
    loop {
        let page = crm.changes(cursor.as_ref(), 1000).await?;
        records += page.records.len() as u64;
        if page.next_cursor.is_some() {
            cursor = page.next_cursor;
        }
        if !page.has_more {
            break;
        }
    }
    let took = start.elapsed();
    if records != n {
        bail!("{records} records read, expected {n}");
    }
    Ok(took)
}
