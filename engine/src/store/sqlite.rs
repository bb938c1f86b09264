//! SQLite store: the embedded default. One file, WAL journal, one connection — a single
//! writer, so appends to the ledger are serialised without lock statements.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one writer connection.
    pool: SqlitePool,
    /// Read-only connections: in WAL mode readers never wait for the writer (or its fsync),
    /// so link pages and lookups keep flowing while a batch commits.
    reader: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if missing) the database file at `path`.
    pub async fn open(path: &str) -> super::StoreResult<Self> {
        let url = format!("sqlite://{path}");
        let open_err = |source| super::StoreError::Open {
            url: url.clone(),
            source,
        };
        if let Some(parent) = std::path::Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // Erasure must leave no copy behind: without this, SQLite keeps deleted and
            // overwritten rows (an erased address, its evidence) in free pages and cell gaps
            // of the file until they happen to be reused.
            .pragma("secure_delete", "ON")
            // 64 MiB of page cache instead of SQLite's 2 MiB default: the ledger's and the
            // outbox's unique indexes take random keys, and a cache that holds their inner
            // pages keeps bulk inserts from re-reading them for every row.
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory");
        // No ping before each use: a local file connection does not go stale, and the ping is
        // one more round trip to the connection's worker thread per query.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            // Readers look up single rows: a small cache each keeps memory bounded.
            .connect_lazy_with(
                opts.read_only(true)
                    .create_if_missing(false)
                    .pragma("cache_size", "-8192"),
            );
        Ok(Self { pool, reader })
    }

    async fn run_migrations(&self) -> super::StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

/// Run after an erasure commits: the WAL still holds the pages as they were before it, and a
/// WAL file is reused from its start, not cleared, so copy everything into the main file
/// (where `secure_delete` zeroed the old content) and truncate the WAL to nothing.
const AFTER_ERASURE: &str = "PRAGMA wal_checkpoint(TRUNCATE)";

mod shared {
    use super::SqliteStore;

    crate::store::sql::shared_store_impl!(
        SqliteStore,
        sqlx::Sqlite,
        lock = "SELECT 1",
        for_update = "",
        skip_locked = ""
    );
}
