//! Row 1's ceiling: the rows the sync wrote, written again by SQLite alone. A fresh file gets
//! the store's schema (indexes included) and settings (WAL, `synchronous = FULL`, the 64 MiB
//! page cache); then the contacts, ledger, consents and outbox rows of the store row 1 left
//! are copied into it with `INSERT … SELECT`, in as many transactions as the sync committed
//! batches (one per 2,000 contacts), each table's rows in creation order. No Rust code runs
//! per row: what is left is what the row format and its indexes cost SQLite on this machine,
//! so the sync cannot go above it without writing less. (Foreign keys are not checked, and
//! the rows are read from a file the sync just wrote, most of it in the OS cache.)

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::Connection;

/// The tables an initial sync fills, in the order a batch writes them.
const TABLES: [&str; 4] = ["contacts", "ledger", "consents", "outbox"];
/// Contacts per transaction, as the sync's `BATCH_RECORDS`.
const BATCH: u64 = 2_000;

/// The time SQLite took to write row 1's rows again (see the module docs).
pub fn run(store: &Path, dir: &Path, contacts: u64) -> anyhow::Result<Duration> {
    let floor = dir.join("floor.db");
    remove_database(&floor);
    let mut conn = Connection::open(&floor).context("creating the ceiling's database")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "foreign_keys", false)?;
    let source = store
        .to_str()
        .context("the store's path is not UTF-8")?
        .to_owned();
    conn.execute("ATTACH DATABASE ?1 AS src", [source])?;
    // Tables before their indexes and triggers; the migrations' own bookkeeping left out.
    let schema: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT sql FROM src.sqlite_master WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' \
             ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid",
        )?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    anyhow::ensure!(!schema.is_empty(), "no schema in {}", store.display());
    for sql in &schema {
        conn.execute_batch(sql)
            .with_context(|| format!("creating {sql}"))?;
    }
    // Each table's rowid range, cut into as many slices as batches.
    let mut ranges = Vec::new();
    for t in TABLES {
        let (lo, hi): (i64, i64) = conn.query_row(
            &format!("SELECT coalesce(min(rowid), 0), coalesce(max(rowid), -1) FROM src.{t}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        ranges.push((t, lo, hi + 1));
    }
    let batches = contacts.div_ceil(BATCH).max(1) as i64;
    let start = Instant::now();
    for k in 0..batches {
        let tx = conn.transaction()?;
        for (t, lo, end) in &ranges {
            let span = end - lo;
            let (from, to) = (lo + span * k / batches, lo + span * (k + 1) / batches);
            tx.execute(
                &format!(
                    "INSERT INTO main.{t} SELECT * FROM src.{t} WHERE rowid >= ?1 AND rowid < ?2"
                ),
                [from, to],
            )
            .with_context(|| format!("copying {t}"))?;
        }
        tx.commit()?;
    }
    let took = start.elapsed();
    let copied: i64 = conn.query_row("SELECT count(*) FROM main.contacts", [], |r| r.get(0))?;
    anyhow::ensure!(
        copied as u64 == contacts,
        "the ceiling copied {copied} contacts, expected {contacts}"
    );
    drop(conn);
    remove_database(&floor);
    Ok(took)
}

/// Remove a SQLite file and its WAL and shared-memory files, whichever exist.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
