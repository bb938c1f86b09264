//! The ceiling beside rows 8 and 9: how many link look-ups per second the store can answer on
//! this machine, with nothing else running. Each confirm request reads its contact and consent
//! once (`Store::contact_with_consent`); measured here through the daemon's own read path
//! (on SQLite, SQLite's C API on the calling thread; 64 tasks at once), and, for reference,
//! the same query through a sqlx SQLite pool like the store's other readers: the path the
//! look-up took until December 2026, when this pair of rows showed sqlx's hop to its
//! per-connection worker thread holding it to about a fifth of the C API's rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::Row as _;

/// Look-ups per second of both paths, each for `secs`.
#[derive(Debug, Clone, Copy)]
pub struct ReadCeiling {
    pub store: f64,
    pub sqlx: f64,
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
    anyhow::ensure!(
        url.starts_with("sqlite://"),
        "the read ceiling needs a SQLite store"
    );
    let pairs = Arc::new(pairs(url, 20_000).await?);
    let store = through_store(url, &pairs, tasks, secs).await?;
    let sqlx = through_sqlx(url, &pairs, tasks, secs).await?;
    Ok(ReadCeiling { store, sqlx })
}

/// Run `look_up` over `pairs` from `tasks` tasks for `secs`; look-ups per second. Each task
/// stops at the deadline by itself: the store's SQLite look-up completes without yielding to
/// the runtime, so a task loop would never let a timer task run.
async fn drive<F, Fut>(
    pairs: &Arc<Vec<(String, String)>>,
    tasks: usize,
    secs: Duration,
    look_up: F,
) -> anyhow::Result<f64>
where
    F: Fn(String, String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let (pairs, look_up) = (Arc::clone(pairs), look_up.clone());
        handles.push(tokio::spawn(async move {
            let (mut n, mut i) = (0u64, t);
            while start.elapsed() < secs {
                let (c, l) = &pairs[i % pairs.len()];
                look_up(c.clone(), l.clone()).await?;
                n += 1;
                i += tasks;
            }
            anyhow::Ok(n)
        }));
    }
    let mut n = 0;
    for h in handles {
        n += h.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The daemon's read path: `tasks` look-ups at once through the engine's store.
async fn through_store(
    url: &str,
    pairs: &Arc<Vec<(String, String)>>,
    tasks: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    let store = optinsync_engine::store::open(url).await?;
    drive(pairs, tasks, secs, move |c, l| {
        let store = Arc::clone(&store);
        async move {
            store
                .contact_with_consent(&c, &l)
                .await?
                .context("contact gone")?;
            Ok(())
        }
    })
    .await
}

/// The same query through a sqlx SQLite pool: read-only, as many connections and as much
/// cache as the store's own readers, `tasks` look-ups at once.
async fn through_sqlx(
    url: &str,
    pairs: &Arc<Vec<(String, String)>>,
    tasks: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    use std::str::FromStr as _;
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .read_only(true)
        .pragma("cache_size", "-8192");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect_with(opts)
        .await?;
    let sql: &'static str = &optinsync_engine::store::CONTACT_WITH_CONSENT_SQL;
    let p = pool.clone();
    let rate = drive(pairs, tasks, secs, move |c, l| {
        let pool = p.clone();
        async move {
            let row = sqlx::query(sql).bind(c).bind(l).fetch_one(&pool).await?;
            // Every column copied out with its type, as the store's row reader does (which
            // then also parses the JSON and time texts: more work than here).
            let mut texts: Vec<Option<String>> = Vec::with_capacity(17);
            for k in [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15] {
                texts.push(row.try_get(k)?);
            }
            let erased: bool = row.try_get(2)?;
            let counts: (Option<i32>, Option<i32>, Option<i64>) =
                (row.try_get(12)?, row.try_get(13)?, row.try_get(16)?);
            std::hint::black_box((texts, erased, counts));
            Ok(())
        }
    })
    .await?;
    pool.close().await;
    Ok(rate)
}
