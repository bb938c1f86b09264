//! The ceiling beside rows 8 and 9: how many link look-ups per second the store can answer on
//! this machine, with nothing else running. Each confirm request reads its contact and consent
//! once (`Store::contact_with_consent`); measured here through the daemon's own read path
//! (sqlx's SQLite pool, as `optinsync run` opens it, 64 tasks at once), and the same query
//! straight through SQLite's C API (rusqlite, one connection per core, no thread hop; every
//! column copied out, but not parsed into engine types). The gap between the two is mostly
//! what sqlx's hop to its per-connection worker thread costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The look-up the link endpoints make (kept equal to the store's `contact_with_consent`).
const LOOKUP: &str = "SELECT c.id, c.email, c.erased, c.language, c.fields, c.crm_records, \
     c.created_at, c.updated_at, s.list_id, s.state, s.since, s.signup_token, \
     s.doi_mails, s.reminders_sent, s.confirmed_at, s.confirmed_token, s.last_seq \
     FROM contacts c LEFT JOIN consents s ON s.contact_id = c.id AND s.list_id = ?2 \
     WHERE c.id = ?1";

/// Look-ups per second of both paths, each for `secs`.
#[derive(Debug, Clone, Copy)]
pub struct ReadCeiling {
    pub sqlx: f64,
    pub direct: f64,
}

/// `(contact_id, list_id)` pairs of the SQLite store at `url` (its pending consents).
async fn pairs(url: &str, limit: usize) -> anyhow::Result<Vec<(String, String)>> {
    let pool = sqlx::SqlitePool::connect(url).await?;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT contact_id, list_id FROM consents ORDER BY contact_id LIMIT $1")
            .bind(limit as i64)
            .fetch_all(&pool)
            .await
            .context("reading consents")?;
    pool.close().await;
    anyhow::ensure!(!rows.is_empty(), "no consents to look up in {url}");
    Ok(rows)
}

pub async fn measure(url: &str, tasks: usize, secs: Duration) -> anyhow::Result<ReadCeiling> {
    let pairs = Arc::new(pairs(url, 20_000).await?);
    let sqlx = through_store(url, &pairs, tasks, secs).await?;
    let path = url
        .strip_prefix("sqlite://")
        .context("the read ceiling needs a SQLite store")?
        .to_owned();
    let p = Arc::clone(&pairs);
    let direct = tokio::task::spawn_blocking(move || direct(&path, &p, secs)).await??;
    Ok(ReadCeiling { sqlx, direct })
}

/// The daemon's read path: `tasks` look-ups at once through the engine's store.
async fn through_store(
    url: &str,
    pairs: &Arc<Vec<(String, String)>>,
    tasks: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    let store = optinsync_engine::store::open(url).await?;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let (store, pairs, done, stop) = (
            Arc::clone(&store),
            Arc::clone(pairs),
            Arc::clone(&done),
            Arc::clone(&stop),
        );
        handles.push(tokio::spawn(async move {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let (c, l) = &pairs[i % pairs.len()];
                store
                    .contact_with_consent(c, l)
                    .await?
                    .context("contact gone")?;
                done.fetch_add(1, Ordering::Relaxed);
                i += tasks;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let wall = start.elapsed();
    for h in handles {
        h.await??;
    }
    Ok(n as f64 / wall.as_secs_f64())
}

/// The same query through SQLite's C API: one thread and read-only connection per core.
fn direct(path: &str, pairs: &Arc<Vec<(String, String)>>, secs: Duration) -> anyhow::Result<f64> {
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let start = Instant::now();
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let pairs = Arc::clone(pairs);
                s.spawn(move || -> anyhow::Result<u64> {
                    let conn = rusqlite::Connection::open_with_flags(
                        path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    let mut stmt = conn.prepare_cached(LOOKUP)?;
                    let (mut n, mut i) = (0u64, t);
                    while start.elapsed() < secs {
                        let (c, l) = &pairs[i % pairs.len()];
                        // Every column copied out, as the store's row reader does (it then
                        // also parses the JSON and time columns into engine types).
                        let row = stmt.query_row(rusqlite::params![c, l], |r| {
                            (0..17)
                                .map(|k| r.get::<_, rusqlite::types::Value>(k))
                                .collect::<Result<Vec<_>, _>>()
                        })?;
                        std::hint::black_box(row);
                        n += 1;
                        i += threads;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reader panicked")))
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut n = 0;
    for r in results {
        n += r?;
    }
    Ok(n as f64 / wall.as_secs_f64())
}
