//! Row 2, the raw baseline: the real Zoho CRM connector's `changes()` paging against the fake
//! (fetch + parse), and a plain insert of each record into one SQLite table, one transaction
//! per page, with the store's own settings (WAL, `synchronous = FULL`). No rules, no ledger,
//! no consent: what an initial sync cannot go below.

use std::path::Path;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use optinsync_plugin_api::{CrmConnector, Cursor};
use optinsync_plugin_zoho::crm::ZohoCrm;
use optinsync_testkit::zoho::FakeZoho;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Contacts read and inserted, and the wall time.
/// Records read, the whole run's time, and the part of it spent in `changes()` (fetch + parse:
/// what reading the CRM alone costs, next to storing it).
pub async fn run(fake: &FakeZoho, dir: &Path) -> anyhow::Result<(u64, Duration, Duration)> {
    let section = crate::setup::crm_section(fake, 9);
    let table: toml::Table = toml::from_str(&section).context("parsing the CRM section")?;
    let mut settings = table
        .get("connectors")
        .and_then(|c| c.get("crm"))
        .and_then(|c| c.as_table())
        .cloned()
        .context("no [connectors.crm]")?;
    // `kind` picks the connector in the registry; the connector's own settings lack it.
    settings.remove("kind");
    let crm = ZohoCrm::from_config(settings, dir).context("building the Zoho CRM connector")?;
    let db = dir.join("baseline.db");
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query(
        "CREATE TABLE raw_contacts (record TEXT PRIMARY KEY, email TEXT, language TEXT, \
         opted_out INTEGER NOT NULL, asserted TEXT NOT NULL, fields TEXT NOT NULL, modified TEXT)",
    )
    .execute(&pool)
    .await?;
    let start = Instant::now();
    let mut cursor: Option<Cursor> = None;
    let mut n = 0u64;
    let mut fetching = Duration::ZERO;
    loop {
        let t = Instant::now();
        let page = crm
            .changes(cursor.as_ref(), 200)
            .await
            .context("Zoho CRM changes()")?;
        fetching += t.elapsed();
        let mut tx = pool.begin().await?;
        for r in &page.records {
            sqlx::query("INSERT OR REPLACE INTO raw_contacts VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(r.record.to_string())
                .bind(r.email.as_deref())
                .bind(r.language.as_deref())
                .bind(r.opted_out)
                .bind(serde_json::to_string(&r.asserted_lists)?)
                .bind(serde_json::to_string(&r.fields)?)
                .bind(r.modified_at.map(|t| t.to_rfc3339()))
                .execute(&mut *tx)
                .await?;
            n += 1;
        }
        tx.commit().await?;
        if page.next_cursor.is_some() {
            cursor = page.next_cursor;
        }
        if !page.has_more {
            break;
        }
    }
    let took = start.elapsed();
    pool.close().await;
    Ok((n, took, fetching))
}
