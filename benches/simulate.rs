//! Benchmark: `rules simulate` over 100,000 contacts on SQLite.
//!
//! Run: `cargo bench --bench simulate` (optionally `-- 20000` for another size).
//! Prints the seeding time, the simulation time and rate, the per-action counts and diff of
//! a candidate rule set against the default policy, peak memory, and checks that the store is
//! unchanged. It asserts nothing about speed.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use optinsync_engine::config::ListConfig;
use optinsync_engine::ledger::format_time;
use optinsync_engine::rules::RuleSet;
use optinsync_engine::rules::simulate::simulate;
use optinsync_engine::store::{self, SqliteStore};
use optinsync_engine::tokens::TokenKeys;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn count(pool: &sqlx::SqlitePool, table: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let url = format!("sqlite://{}", db.display());
    let store = store::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    drop(store);

    // Seed directly in one transaction: the point is the simulation, not the seeding.
    let seed_start = Instant::now();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let now = chrono::Utc::now();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..n {
        let id = format!("{i:08}");
        let ts = format_time(now);
        sqlx::query("INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) VALUES ($1, $2, 'en', '{}', '[]', $3, $3)")
            .bind(&id)
            .bind(format!("person{i}@example.org"))
            .bind(&ts)
            .execute(&mut *tx)
            .await
            .unwrap();
        // A realistic mix: most confirmed over the past two years, some pending/asserted/withdrawn.
        let (state, age_days, confirmed) = match i % 10 {
            0..=5 => ("confirmed", (i % 730) as i64, true),
            6 | 7 => ("pending", (i % 20) as i64, false),
            8 => ("asserted", 0, false),
            _ => ("withdrawn", (i % 300) as i64, false),
        };
        let since = format_time(now - chrono::Duration::days(age_days));
        sqlx::query("INSERT INTO consents (contact_id, list_id, state, since, signup_token, doi_mails, reminders_sent, confirmed_at, confirmed_token, last_seq) VALUES ($1, 'newsletter', $2, $3, 'tok', 1, 0, $4, NULL, 0)")
            .bind(&id)
            .bind(state)
            .bind(&since)
            .bind(confirmed.then_some(since.clone()))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let seeded = seed_start.elapsed();
    let (ledger_before, consents_before) =
        (count(&pool, "ledger").await, count(&pool, "consents").await);

    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let running = RuleSet::load_checked(&rules_dir).unwrap();
    // Candidate: re-permission after half the inactivity window.
    let src = std::fs::read_to_string(rules_dir.join("consent.rhai"))
        .unwrap()
        .replace(
            "consent.inactive_for >= list.inactivity",
            "consent.inactive_for >= list.inactivity / 2",
        );
    let candidate = RuleSet::compile_sources(
        &rules_dir,
        &[(PathBuf::from("candidate.rhai"), src)],
        vec![],
    )
    .unwrap();
    let list: ListConfig = toml::from_str("id = \"newsletter\"\nname = \"Newsletter\"").unwrap();
    let keys = TokenKeys::new("k1", b"bench-secret-bench-secret-bench-secret", vec![]);

    let sqlite = SqliteStore::open(&db.display().to_string()).await.unwrap();
    let start = Instant::now();
    let report = simulate(
        std::sync::Arc::new(sqlite),
        std::slice::from_ref(&list),
        &keys,
        &candidate,
        Some(&running),
        3,
        |_| {},
    )
    .await
    .unwrap();
    let took = start.elapsed();

    println!("simulate benchmark: {n} contacts on SQLite");
    println!("  seeding:     {:.2} s", seeded.as_secs_f64());
    println!(
        "  simulation:  {:.2} s ({:.0} contacts/s, two rule sets each)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!("  peak RSS:    {:.1} MiB", peak_rss_mib());
    println!(
        "  candidate would apply: {:?}",
        report.candidate.would_apply
    );
    println!(
        "  running would apply:   {:?}",
        report.running.as_ref().map(|r| &r.would_apply)
    );
    println!(
        "  diff (candidate - running): {:?}; {} pairs decided differently",
        report.diff(),
        report.changed_pairs
    );
    let unchanged = count(&pool, "ledger").await == ledger_before
        && count(&pool, "consents").await == consents_before;
    println!("  store unchanged: {unchanged}");
}
