//! SQLite store: the embedded default. One file, WAL journal, one connection — a single
//! writer, so appends to the ledger are serialised without lock statements.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        Ok(Self { pool })
    }

    async fn run_migrations(&self) -> super::StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

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
